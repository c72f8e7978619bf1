//! The caching proxy (`--proxy`): exports that live on upstream NBD
//! servers, fetched on demand into a local cache (`cache.rs`) and served
//! from it. Upstreams are chosen by round-trip time, with hysteresis and
//! a probe schedule, by `enbd_core::replica`; a failing upstream is left
//! for the next. With the upstream's checksums (its `NAME.crc`
//! export) every fetched block is checked before it is cached or served,
//! and a bad one is fetched again from another upstream. Every cached read
//! is checked against the chunk's CRC in the map, so a cache file changed
//! underneath is caught at the next read and fetched again. Without
//! upstream checksums nothing ties the cache to the upstream's image, so
//! it starts empty at each open and one upstream only is allowed (unless
//! `--proxy-unchecked`).
//!
//! `Documentation/server.md` ("The caching proxy") describes it for users.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use enbd_core::replica::{self, ProbeSchedule, Round, Rtt};
use enbd_nbd::client::{ClientError, Conn};
use tracing::{error, info, warn};

use crate::backend::Storage;
use crate::cache::{Cache, Header, CHUNK};
use crate::checksum::Sums;
use crate::export::{Export, CRC_SUFFIX};

/// Locks that make concurrent misses of one fetch unit fetch it once.
const LOCKS: usize = 64;
/// Bytes asked for in one upstream `READ` (less if the upstream's
/// maximum block size is smaller).
const PIECE: u64 = 4 << 20;
/// Largest checksum sidecar accepted from an upstream (that of a 256 TiB
/// image): the upstream is not trusted with our memory.
const MAX_SIDECAR: u64 = 64 << 20;
/// Bytes of the probe `READ` that measures an upstream's round trip.
const PROBE_LEN: u64 = 4096;
/// A fetch of one unit from one upstream ends within this many
/// `--proxy-timeout`s (connecting aside), so an upstream that trickles
/// bytes, each within the timeout, cannot hold a unit's lock for long.
const FETCH_TIMEOUTS: u32 = 4;
/// Tries of one unit by the replication before it is skipped.
const REPLICATE_TRIES: u32 = 3;
/// The replication's pause before it tries a unit again.
const REPLICATE_PAUSE: Duration = Duration::from_millis(if cfg!(test) { 50 } else { 5000 });

/// What the command line says about proxying.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Upstream servers, `HOST:PORT`, in order of preference among equals.
    pub upstreams: Vec<String>,
    /// Where each export's cache files live.
    pub cache_dir: PathBuf,
    /// Bound on each connect and each upstream read or write.
    pub timeout: Duration,
    /// Fill the whole cache in the background at this many bytes a second.
    pub replicate: Option<u64>,
    /// Allow several upstreams for an export without upstream checksums
    /// (`--proxy-unchecked`): nothing then tells their images apart.
    pub unchecked: bool,
}

/// An export name the proxy can keep a cache for: it becomes a file name.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 255 - ".cache".len()
        || name.contains('/')
        || name.contains('\0')
        || name.starts_with('.')
    {
        return Err(format!(
            "'{name}': a proxied export's name must be a plain file name (not empty, no '/', \
             not starting with '.')"
        ));
    }
    Ok(())
}

/// The upstream servers of one export, with their round-trip times.
#[derive(Debug)]
struct Upstreams {
    addrs: Vec<String>,
    export: String,
    size: u64,
    timeout: Duration,
    /// Which upstreams serve the export at our size: one of another size
    /// (another image) is never used.
    compatible: Vec<bool>,
    sel: Mutex<Selection>,
    /// Idle connections to each upstream, reused by the next fetch.
    idle: Vec<Mutex<Vec<Conn>>>,
}

#[derive(Debug, Default)]
struct Selection {
    rtts: Vec<Rtt>,
    current: Option<usize>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Reads `buf.len()` bytes at `off` over `c` in pieces within the
/// upstream's maximum request size (if it gave one), all by `deadline`
/// (each socket wait is bounded by the connection's timeout shrunk toward
/// it).
fn read_by(c: &mut Conn, buf: &mut [u8], off: u64, deadline: Instant) -> Result<(), ClientError> {
    let piece = c
        .info()
        .block_sizes
        .map_or(PIECE, |(_, _, max)| u64::from(max).clamp(4096, PIECE)) as usize;
    c.set_deadline(Some(deadline));
    let mut done = 0usize;
    while done < buf.len() {
        let n = (buf.len() - done).min(piece);
        c.read(&mut buf[done..done + n], off + done as u64)?;
        done += n;
    }
    c.set_deadline(None);
    Ok(())
}

impl Upstreams {
    fn connect(&self, i: usize) -> Result<Conn, ClientError> {
        let c = Conn::connect(&self.addrs[i], &self.export, self.timeout)?;
        if c.size() != self.size {
            return Err(ClientError::Io(io::Error::other(format!(
                "it now serves {} bytes, not {}",
                c.size(),
                self.size
            ))));
        }
        Ok(c)
    }

    /// Runs `f` on a connection to upstream `i`: an idle one, and if that
    /// fails on the connection (the upstream may have closed it while it
    /// was idle) a new one, unless `deadline` has passed. The connection
    /// goes back to the idle list unless it failed.
    fn with_conn<T>(
        &self,
        i: usize,
        deadline: Instant,
        mut f: impl FnMut(&mut Conn) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        let pooled = lock(&self.idle[i]).pop();
        let mut tries = Vec::new();
        if let Some(c) = pooled {
            tries.push(Some(c));
        }
        tries.push(None);
        let mut last = None;
        for c in tries {
            let mut c = match c {
                Some(c) => c,
                None if last.is_some() && Instant::now() >= deadline => break,
                None => self.connect(i)?,
            };
            match f(&mut c) {
                Ok(v) => {
                    lock(&self.idle[i]).push(c);
                    return Ok(v);
                }
                Err(e) if e.connection_ok() => {
                    lock(&self.idle[i]).push(c);
                    return Err(e);
                }
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| ClientError::Io(io::Error::other("no connection"))))
    }

    /// Reads `buf.len()` bytes at `off` from upstream `i`, in pieces,
    /// within [`FETCH_TIMEOUTS`] timeouts.
    fn read(&self, i: usize, buf: &mut [u8], off: u64) -> Result<(), ClientError> {
        let deadline = Instant::now() + self.timeout * FETCH_TIMEOUTS;
        self.with_conn(i, deadline, |c| read_by(c, buf, off, deadline))
    }

    /// The upstreams to try, best first: the chosen one, then the usable
    /// ones by RTT, then the others (they may have come back).
    fn order(&self) -> Vec<usize> {
        let sel = lock(&self.sel);
        let mut v: Vec<usize> = (0..self.addrs.len())
            .filter(|&i| self.compatible[i])
            .collect();
        let key = |i: usize| {
            let r = &sel.rtts[i];
            (
                Some(i) != sel.current,
                !r.usable(),
                r.average().unwrap_or(u32::MAX),
                i,
            )
        };
        v.sort_by_key(|&i| key(i));
        v
    }

    /// Records a failed exchange with upstream `i` and chooses again.
    fn failed(&self, i: usize) {
        let mut sel = lock(&self.sel);
        sel.rtts[i].record_failure();
        let next = replica::choose(sel.current, &sel.rtts);
        if next != sel.current {
            sel.current = next;
            drop(sel);
            self.log_choice(next);
        }
        lock(&self.idle[i]).clear();
    }

    fn log_choice(&self, c: Option<usize>) {
        match c {
            Some(i) => {
                info!(export = %self.export, upstream = %self.addrs[i], "proxy: upstream chosen")
            }
            None => warn!(export = %self.export, "proxy: no upstream answers"),
        }
    }

    /// Times a small read on each upstream, records it, chooses again.
    fn probe_round(&self) -> Round {
        let mut times = Vec::with_capacity(self.addrs.len());
        for i in 0..self.addrs.len() {
            if !self.compatible[i] {
                times.push(None);
                continue;
            }
            let len = PROBE_LEN.min(self.size) as usize;
            let mut buf = vec![0u8; len];
            // Connecting is not part of the round trip: a connection is made
            // first if none is idle.
            let deadline = Instant::now() + self.timeout;
            let t = self.with_conn(i, deadline, |c| {
                let start = Instant::now();
                read_by(c, &mut buf, 0, start + self.timeout)?;
                Ok(start.elapsed())
            });
            times.push(t.ok());
        }
        let mut sel = lock(&self.sel);
        let before: Vec<bool> = sel.rtts.iter().map(Rtt::usable).collect();
        for (r, t) in sel.rtts.iter_mut().zip(&times) {
            match t {
                Some(t) => r.record(u32::try_from(t.as_micros()).unwrap_or(u32::MAX)),
                None => r.record_failure(),
            }
        }
        let after: Vec<bool> = sel.rtts.iter().map(Rtt::usable).collect();
        let next = replica::choose(sel.current, &sel.rtts);
        let moved = next != sel.current;
        sel.current = next;
        drop(sel);
        if moved {
            self.log_choice(next);
        }
        if next.is_none() {
            Round::Panic
        } else if moved || before != after {
            Round::Changed
        } else {
            Round::Stable
        }
    }
}

/// A proxied export's storage; see the module's doc.
#[derive(Debug)]
pub struct Proxy(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    name: String,
    cache: Cache,
    ups: Upstreams,
    /// The upstream's block checksums, if it serves them.
    sums: Option<Sums>,
    /// Bytes of one fetch: a checksum block with sums, else a chunk.
    unit: u64,
    locks: Vec<Mutex<()>>,
    stats: Stats,
}

/// Counters of one proxied export since it was opened.
#[derive(Debug, Default)]
pub struct Stats {
    /// Bytes fetched from upstreams (whole fetch units, refetches included).
    pub upstream_bytes: AtomicU64,
    /// Bytes of READs served from chunks already in the cache.
    pub cache_bytes: AtomicU64,
    /// Cached chunks that failed their check and were fetched again.
    pub cache_corrupt: AtomicU64,
    /// Fetched blocks that failed the upstream's checksums.
    pub upstream_bad: AtomicU64,
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

impl Proxy {
    /// Opens proxied export `name`: asks the upstreams for its size (the
    /// first that answers decides; one announcing another size is not
    /// used) and its checksums, opens the cache, measures the upstreams'
    /// round trips, and starts the probe thread (and the replication
    /// thread with `cfg.replicate`).
    pub fn open(name: &str, cfg: &ProxyConfig) -> Result<Self> {
        check_name(name).map_err(anyhow::Error::msg)?;
        if cfg.upstreams.is_empty() {
            anyhow::bail!("export '{name}': no upstream server given");
        }
        std::fs::create_dir_all(&cfg.cache_dir).with_context(|| {
            format!(
                "cannot create the cache directory {}",
                cfg.cache_dir.display()
            )
        })?;
        let n = cfg.upstreams.len();
        let mut size = None;
        let mut compatible = vec![false; n];
        let mut reached = vec![false; n];
        let mut conns: Vec<Option<Conn>> = Vec::new();
        let mut errors = Vec::new();
        for (i, a) in cfg.upstreams.iter().enumerate() {
            match Conn::connect(a, name, cfg.timeout) {
                Ok(c) => {
                    let s = *size.get_or_insert(c.size());
                    reached[i] = true;
                    if c.size() == s {
                        compatible[i] = true;
                        conns.push(Some(c));
                    } else {
                        warn!(
                            export = name,
                            upstream = %a,
                            "proxy: this upstream serves {} bytes, another {s}: not used",
                            c.size()
                        );
                        conns.push(None);
                    }
                }
                Err(e) => {
                    warn!(export = name, upstream = %a, "proxy: {e}");
                    errors.push(e.to_string());
                    // Not reachable now; used once it answers with our size.
                    compatible[i] = true;
                    conns.push(None);
                }
            }
        }
        let Some(size) = size else {
            anyhow::bail!(
                "export '{name}': no upstream answered: {}",
                errors.join("; ")
            );
        };
        let got = fetch_sums(name, cfg, size, &mut compatible, &reached)?;
        let (sums, sidecar) = got.map_or((None, None), |(s, b)| (Some(s), Some(b)));
        if sums.is_none() {
            unchecked_allowed(name, cfg)?;
        }
        // Never 0, which says "no sidecar".
        let sums_digest = sidecar.as_ref().map_or(0, |b| crc32c::crc32c(b).max(1));
        let unit = sums.as_ref().map_or(CHUNK, Sums::block_size);
        let header = Header {
            chunk: CHUNK as u32,
            image_size: size,
            sums_digest,
        };
        let cache = Cache::open(&cfg.cache_dir, name, header, sidecar.as_deref())
            .with_context(|| format!("export '{name}'"))?;
        let ups = Upstreams {
            addrs: cfg.upstreams.clone(),
            export: name.to_owned(),
            size,
            timeout: cfg.timeout,
            compatible,
            sel: Mutex::new(Selection {
                rtts: vec![Rtt::default(); n],
                current: None,
            }),
            idle: conns
                .into_iter()
                .map(|c| Mutex::new(c.into_iter().collect()))
                .collect(),
        };
        ups.probe_round();
        let inner = Arc::new(Inner {
            name: name.to_owned(),
            cache,
            ups,
            sums,
            unit,
            locks: (0..LOCKS).map(|_| Mutex::new(())).collect(),
            stats: Stats::default(),
        });
        let weak = Arc::downgrade(&inner);
        std::thread::Builder::new()
            .name(format!("probe {name}"))
            .spawn(move || probe_loop(weak))
            .context("cannot start the probe thread")?;
        if let Some(rate) = cfg.replicate {
            let weak = Arc::downgrade(&inner);
            std::thread::Builder::new()
                .name(format!("replicate {name}"))
                .spawn(move || replicate_loop(weak, rate))
                .context("cannot start the replication thread")?;
        }
        Ok(Self(inner))
    }

    /// The export's counters.
    #[cfg(test)]
    pub fn stats(&self) -> &Stats {
        &self.0.stats
    }
}

/// Opens each proxied export of `names`.
pub fn open_exports(names: &[String], cfg: &ProxyConfig) -> Result<Vec<Arc<Export>>> {
    names
        .iter()
        .map(|n| {
            let p = Proxy::open(n, cfg)?;
            let desc = format!("proxied from {}", cfg.upstreams.join(", "));
            Ok(Arc::new(Export::with_storage(n, &desc, Box::new(p))))
        })
        .collect()
}

/// How long a name that could not be opened on demand is not tried again.
const RETRY_OPEN: Duration = Duration::from_secs(10);
/// Names remembered as failed at most (a client may ask for any number).
const MAX_FAILED: usize = 1024;

/// Exports opened when a client first asks for them (`--proxy-any`): any
/// name the upstreams serve.
#[derive(Debug)]
pub struct OnDemand {
    cfg: ProxyConfig,
    opened: Mutex<Vec<Arc<Export>>>,
    /// Held while an export is opened: one open at a time, each name once.
    opening: Mutex<()>,
    /// Names that failed lately, and when.
    failed: Mutex<Vec<(String, Instant)>>,
}

impl OnDemand {
    pub fn new(cfg: ProxyConfig) -> Self {
        Self {
            cfg,
            opened: Mutex::new(Vec::new()),
            opening: Mutex::new(()),
            failed: Mutex::new(Vec::new()),
        }
    }

    fn opened_named(&self, name: &str) -> Option<Arc<Export>> {
        lock(&self.opened)
            .iter()
            .find(|e| e.name() == name)
            .cloned()
    }

    /// The export `name`, opened now if it was not (which takes a round
    /// trip to each upstream, and is not retried for [`RETRY_OPEN`] after
    /// it failed). `None` when no upstream serves it.
    pub fn find(&self, name: &[u8]) -> Option<Arc<Export>> {
        let name = std::str::from_utf8(name).ok()?;
        check_name(name).ok()?;
        if let Some(e) = self.opened_named(name) {
            return Some(e);
        }
        let _g = lock(&self.opening);
        if let Some(e) = self.opened_named(name) {
            return Some(e);
        }
        let now = Instant::now();
        {
            let mut failed = lock(&self.failed);
            failed.retain(|(_, t)| now.duration_since(*t) < RETRY_OPEN);
            if failed.iter().any(|(n, _)| n == name) {
                return None;
            }
        }
        match open_exports(&[name.to_owned()], &self.cfg) {
            Ok(mut v) => {
                let e = v.pop()?;
                e.log_ready();
                lock(&self.opened).push(e.clone());
                Some(e)
            }
            Err(e) => {
                warn!(export = name, "proxy: cannot open on demand: {e:#}");
                let mut failed = lock(&self.failed);
                if failed.len() >= MAX_FAILED {
                    failed.remove(0);
                }
                failed.push((name.to_owned(), now));
                None
            }
        }
    }

    /// The exports opened so far.
    pub fn opened(&self) -> Vec<Arc<Export>> {
        lock(&self.opened).clone()
    }
}

/// Whether export `name` may be served without upstream checksums. Not
/// if its cache was filled with them (the upstream lost them, or another
/// server answers now: checking is not switched off silently), nor from
/// several upstreams unless `--proxy-unchecked` (nothing tells their images
/// apart if they hold different ones of one size).
fn unchecked_allowed(name: &str, cfg: &ProxyConfig) -> Result<()> {
    if crate::cache::recorded(&cfg.cache_dir, name).is_some_and(|h| h.sums_digest != 0) {
        anyhow::bail!(
            "export '{name}': its cache in {} was filled with the upstream's checksums \
             ({name}{CRC_SUFFIX}), which no upstream serves now: not served unchecked (remove \
             {name}.map there to accept that)",
            cfg.cache_dir.display()
        );
    }
    if cfg.upstreams.len() > 1 && !cfg.unchecked {
        anyhow::bail!(
            "export '{name}': no upstream serves checksums ({name}{CRC_SUFFIX}), so nothing \
             tells the upstreams' images apart: give one upstream, serve checksums \
             (`enbd-server checksum`, ',crc'), or accept the risk with --proxy-unchecked"
        );
    }
    warn!(
        export = name,
        "proxy: no upstream serves checksums ({name}{CRC_SUFFIX}): fetched data is not \
         checked, only the cache against local corruption, and the cache starts empty at \
         every open"
    );
    Ok(())
}

/// The upstreams' checksums of `name` (their `NAME.crc` export) and the
/// sidecar's bytes: those of the first upstream of `reached` (it answered
/// just now) that serves good ones (their own checksum right, our image
/// size, a block size the proxy can fetch whole). An upstream that serves
/// other or damaged checksums is marked incompatible in `compatible`, never
/// used. `Ok(None)` only when every upstream asked says it has no such
/// export; an upstream that cannot be asked (twice) fails the open unless
/// another serves checksums, as does a damaged sidecar unless another
/// serves a good one: checking is never switched off by a failure.
fn fetch_sums(
    name: &str,
    cfg: &ProxyConfig,
    size: u64,
    compatible: &mut [bool],
    reached: &[bool],
) -> Result<Option<(Sums, Vec<u8>)>> {
    let crc_name = format!("{name}{CRC_SUFFIX}");
    let mut chosen: Option<(Sums, Vec<u8>)> = None;
    let mut failures = Vec::new();
    for ((a, ok), _) in cfg
        .upstreams
        .iter()
        .zip(compatible.iter_mut())
        .zip(reached)
        .filter(|(_, r)| **r)
    {
        if !*ok {
            continue;
        }
        let mut got = read_sums(a, &crc_name, cfg.timeout, size);
        if let Sidecar::Failed(e) = &got {
            warn!(export = name, upstream = %a, "proxy: cannot read {crc_name}: {e}; again");
            got = read_sums(a, &crc_name, cfg.timeout, size);
        }
        let (got, bytes) = match got {
            Sidecar::Good(s, b) => (s, b),
            Sidecar::Absent => continue,
            Sidecar::Failed(e) => {
                warn!(export = name, upstream = %a, "proxy: cannot read {crc_name}: {e}");
                failures.push(format!("{a}: {e}"));
                continue;
            }
            Sidecar::Bad(e) => {
                warn!(
                    export = name,
                    upstream = %a,
                    "proxy: this upstream's {crc_name} is damaged ({e}): not used"
                );
                failures.push(format!("{a}: damaged {crc_name}: {e}"));
                *ok = false;
                continue;
            }
        };
        match &chosen {
            None => {
                info!(
                    export = name,
                    upstream = %a,
                    blocks = got.blocks(),
                    "proxy: upstream checksums loaded; every fetch is checked"
                );
                chosen = Some((got, bytes));
            }
            Some((_, c)) if *c == bytes => {}
            Some(_) => {
                warn!(
                    export = name,
                    upstream = %a,
                    "proxy: this upstream's checksums differ from the first upstream's \
                     (another image): not used"
                );
                *ok = false;
            }
        }
    }
    if chosen.is_none() && !failures.is_empty() {
        anyhow::bail!(
            "export '{name}': cannot tell whether the upstreams serve checksums \
             ({}): not served unchecked",
            failures.join("; ")
        );
    }
    Ok(chosen)
}

/// What an upstream answered for the checksum sidecar.
#[derive(Debug)]
enum Sidecar {
    /// The checksums and the sidecar's bytes, checked.
    Good(Sums, Vec<u8>),
    /// It said it has no such export.
    Absent,
    /// It could not be asked (connect, handshake, read): try again.
    Failed(String),
    /// It served a sidecar that is damaged or not for our image.
    Bad(String),
}

/// Upstream `addr`'s checksums from export `crc_name`, checked.
fn read_sums(addr: &str, crc_name: &str, timeout: Duration, size: u64) -> Sidecar {
    let mut c = match Conn::connect(addr, crc_name, timeout) {
        Ok(c) => c,
        Err(ClientError::Handshake { source, .. }) if source.is_unknown_export() => {
            info!(upstream = %addr, "proxy: no checksums here: {source}");
            return Sidecar::Absent;
        }
        Err(e) => return Sidecar::Failed(e.to_string()),
    };
    if c.size() > MAX_SIDECAR {
        return Sidecar::Bad(format!("{} bytes is too large for a sidecar", c.size()));
    }
    let mut b = vec![0u8; c.size() as usize];
    let deadline = Instant::now() + timeout * FETCH_TIMEOUTS;
    if let Err(e) = read_by(&mut c, &mut b, 0, deadline) {
        return Sidecar::Failed(e.to_string());
    }
    c.close();
    let s = match Sums::decode(&b) {
        Ok(s) => s,
        Err(e) => return Sidecar::Bad(e.to_string()),
    };
    if s.image_size() != size {
        return Sidecar::Bad(format!(
            "they are for {} bytes, the export has {size}",
            s.image_size()
        ));
    }
    let bs = s.block_size();
    if bs % CHUNK != 0 || bs > u64::from(crate::export::MAX_PAYLOAD) {
        return Sidecar::Bad(format!(
            "their block size {bs} is not a multiple of {CHUNK} up to 32 MiB"
        ));
    }
    Sidecar::Good(s, b)
}

impl Inner {
    fn lock(&self, unit: u64) -> MutexGuard<'_, ()> {
        lock(&self.locks[(unit % LOCKS as u64) as usize])
    }

    fn unit_range(&self, u: u64) -> std::ops::Range<u64> {
        let start = u * self.unit;
        start..(start + self.unit).min(self.ups.size)
    }

    /// Fetches unit `u` from the upstreams, best first, until one delivers
    /// it with the right checksum; a lone upstream is asked twice.
    fn fetch(&self, u: u64) -> io::Result<Vec<u8>> {
        let r = self.unit_range(u);
        let mut buf = vec![0u8; (r.end - r.start) as usize];
        let mut order = self.ups.order();
        if order.len() == 1 {
            order.push(order[0]);
        }
        for i in order {
            let addr = &self.ups.addrs[i];
            if let Err(e) = self.ups.read(i, &mut buf, r.start) {
                warn!(
                    export = %self.name,
                    upstream = %addr,
                    "proxy: fetch of bytes {}..{} failed: {e}; trying the next upstream",
                    r.start,
                    r.end
                );
                self.ups.failed(i);
                continue;
            }
            self.stats
                .upstream_bytes
                .fetch_add(buf.len() as u64, Ordering::Relaxed);
            if let Some(sums) = &self.sums {
                // A unit past the sums cannot be checked: never served.
                let want = usize::try_from(u)
                    .ok()
                    .and_then(|u| sums.get(u))
                    .ok_or_else(eio)?;
                let got = crc32c::crc32c(&buf);
                if got != want {
                    self.stats.upstream_bad.fetch_add(1, Ordering::Relaxed);
                    error!(
                        export = %self.name,
                        upstream = %addr,
                        "proxy: checksum mismatch: block {u} (bytes {}..{}) from this upstream \
                         sums to 0x{got:08x}, 0x{want:08x} expected; fetching it again",
                        r.start,
                        r.end
                    );
                    // An upstream that sends bad data is left like one that
                    // fails; its probes bring it back.
                    self.ups.failed(i);
                    continue;
                }
            }
            return Ok(buf);
        }
        error!(
            export = %self.name,
            "proxy: no upstream delivered bytes {}..{}: the read fails with EIO",
            r.start,
            r.end
        );
        Err(eio())
    }

    /// Fetches unit `u` (under its lock) and stores its absent chunks.
    /// Returns the unit's bytes.
    fn fill(&self, u: u64) -> io::Result<Vec<u8>> {
        let data = self.fetch(u)?;
        let r = self.unit_range(u);
        let first = r.start / CHUNK;
        for (k, piece) in data.chunks(CHUNK as usize).enumerate() {
            let c = first + k as u64;
            if self.cache.get(c).is_some() {
                continue;
            }
            if let Err(e) = self.cache.store_chunk(c, piece) {
                warn!(
                    export = %self.name,
                    cache = %self.cache.path().display(),
                    "proxy: cannot cache chunk {c}: {e}"
                );
            }
        }
        Ok(data)
    }

    /// Fills `out` (chunk `c`'s bytes, or fewer: from the chunk's start)
    /// from the cache if it holds the chunk intact, else from upstream.
    fn chunk(&self, c: u64, scratch: &mut Vec<u8>) -> io::Result<bool> {
        let r = self.cache.range(c);
        scratch.resize((r.end - r.start) as usize, 0);
        match self.cached(c, scratch) {
            Some(true) => return Ok(true),
            Some(false) => self.corrupt(c, scratch),
            None => {}
        }
        let u = r.start / self.unit;
        let _g = self.lock(u);
        // Fetched meanwhile by the reader that held the lock?
        match self.cached(c, scratch) {
            Some(true) => return Ok(false),
            Some(false) => self.corrupt(c, scratch),
            None => {}
        }
        let data = self.fill(u)?;
        let at = (r.start - self.unit_range(u).start) as usize;
        let src = data.get(at..at + scratch.len()).ok_or_else(eio)?;
        scratch.copy_from_slice(src);
        Ok(false)
    }

    /// Chunk `c` from the cache into `buf`: whether it is intact, `None`
    /// if absent. One that cannot be read (a short file, `EIO`) is dropped
    /// like a corrupt one, so it is fetched again rather than failing
    /// every read.
    fn cached(&self, c: u64, buf: &mut [u8]) -> Option<bool> {
        match self.cache.read_chunk(c, buf) {
            Ok(v) => v,
            Err(e) => {
                self.stats.cache_corrupt.fetch_add(1, Ordering::Relaxed);
                error!(
                    export = %self.name,
                    cache = %self.cache.path().display(),
                    "proxy: cache read error: chunk {c}: {e}; fetching it again"
                );
                let _ = self.cache.drop_chunk(c);
                None
            }
        }
    }

    fn corrupt(&self, c: u64, bytes: &[u8]) {
        self.stats.cache_corrupt.fetch_add(1, Ordering::Relaxed);
        let r = self.cache.range(c);
        error!(
            export = %self.name,
            cache = %self.cache.path().display(),
            "proxy: cache corruption: chunk {c} (bytes {}..{}) sums to 0x{:08x}, 0x{:08x} \
             expected; fetching it again",
            r.start,
            r.end,
            crc32c::crc32c(bytes),
            self.cache.get(c).unwrap_or(0)
        );
        let _ = self.cache.drop_chunk(c);
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        let end = off
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.ups.size)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        let mut scratch = Vec::with_capacity(CHUNK as usize);
        let mut pos = off;
        while pos < end {
            let c = pos / CHUNK;
            let r = self.cache.range(c);
            let hit = self.chunk(c, &mut scratch)?;
            let to = r.end.min(end);
            let (from, n) = ((pos - r.start) as usize, (to - pos) as usize);
            let dst = (pos - off) as usize;
            buf[dst..dst + n].copy_from_slice(&scratch[from..from + n]);
            if hit {
                self.stats
                    .cache_bytes
                    .fetch_add(n as u64, Ordering::Relaxed);
            }
            pos = to;
        }
        Ok(())
    }

    fn report(&self) -> String {
        let s = &self.stats;
        let present = (0..self.cache.chunks())
            .filter(|&c| self.cache.get(c).is_some())
            .count();
        format!(
            "proxy {}: {} bytes from upstream, {} bytes from cache, {} corrupt cache chunk(s) \
             refetched, {} bad upstream block(s), {present}/{} chunks cached",
            self.name,
            s.upstream_bytes.load(Ordering::Relaxed),
            s.cache_bytes.load(Ordering::Relaxed),
            s.cache_corrupt.load(Ordering::Relaxed),
            s.upstream_bad.load(Ordering::Relaxed),
            self.cache.chunks()
        )
    }
}

/// Sleeps `d` in short steps; false when the export is gone meanwhile.
fn sleep_while_alive<T>(w: &Weak<T>, d: Duration) -> bool {
    let due = Instant::now() + d;
    loop {
        if w.strong_count() == 0 {
            return false;
        }
        let now = Instant::now();
        if now >= due {
            return true;
        }
        std::thread::sleep((due - now).min(Duration::from_millis(200)));
    }
}

/// Probes the upstreams on the schedule of `replica::ProbeSchedule` until
/// the export is closed.
fn probe_loop(w: Weak<Inner>) {
    let mut sched = ProbeSchedule::default();
    loop {
        if !sleep_while_alive(&w, Duration::from_millis(u64::from(sched.interval_ms()))) {
            return;
        }
        let Some(p) = w.upgrade() else { return };
        let round = p.ups.probe_round();
        sched.after(round);
    }
}

/// Fetches every unit that has an absent chunk, at most `rate` bytes a
/// second, until the cache is full or the export is closed.
fn replicate_loop(w: Weak<Inner>, rate: u64) {
    let start = Instant::now();
    let mut bytes = 0u64;
    let mut u = 0u64;
    let mut tries = 0u32;
    let mut skipped = 0u64;
    loop {
        let Some(p) = w.upgrade() else { return };
        let units = p.ups.size.div_ceil(p.unit);
        if u >= units {
            info!(
                export = %p.name,
                "proxy: replication done in {:.1} s ({skipped} unit(s) skipped): {}",
                start.elapsed().as_secs_f64(),
                p.report()
            );
            return;
        }
        let r = p.unit_range(u);
        let chunks = r.start / CHUNK..r.end.div_ceil(CHUNK);
        if chunks.clone().any(|c| p.cache.get(c).is_none()) {
            let g = p.lock(u);
            if chunks.clone().any(|c| p.cache.get(c).is_none()) {
                match p.fill(u) {
                    Ok(d) => bytes += d.len() as u64,
                    Err(_) if tries + 1 < REPLICATE_TRIES => {
                        tries += 1;
                        drop(g);
                        drop(p);
                        // Upstreams down: try this unit again later.
                        if !sleep_while_alive(&w, REPLICATE_PAUSE) {
                            return;
                        }
                        continue;
                    }
                    Err(_) => {
                        // Bad everywhere, say: not worth blocking the rest;
                        // a READ of it will try again.
                        error!(
                            export = %p.name,
                            "proxy: replication skips bytes {}..{} after {REPLICATE_TRIES} \
                             failed tries",
                            r.start,
                            r.end
                        );
                        skipped += 1;
                    }
                }
            }
        }
        u += 1;
        tries = 0;
        drop(p);
        let target = Duration::from_secs_f64(bytes as f64 / rate.max(1) as f64);
        if let Some(wait) = target.checked_sub(start.elapsed()) {
            if !sleep_while_alive(&w, wait) {
                return;
            }
        }
    }
}

fn read_only() -> io::Error {
    io::Error::from_raw_os_error(libc::EPERM)
}

impl Storage for Proxy {
    fn size(&self) -> u64 {
        self.0.ups.size
    }

    fn path(&self) -> &Path {
        self.0.cache.path()
    }

    fn read_only(&self) -> bool {
        true
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.0.read_at(buf, off)
    }

    fn write_at(&self, _: &[u8], _: u64, _: bool) -> io::Result<()> {
        Err(read_only())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn trim(&self, _: u64, _: u64) -> io::Result<()> {
        Err(read_only())
    }

    fn write_zeroes(&self, _: u64, _: u64, _: bool) -> io::Result<()> {
        Err(read_only())
    }

    fn report(&self) -> Option<String> {
        Some(self.0.report())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsRawFd;
    use std::sync::atomic::AtomicBool;

    use crate::checksum::Sums;
    use crate::export::{ExportSpec, Exports};
    use crate::handshake::{self, Outcome, TlsMode, TlsPolicy};
    use crate::link::{Bare, Link};
    use crate::transmission::{self, Resources};

    /// Test images: not a multiple of the chunk, with a short last block.
    const SIZE: u64 = 3 * (1 << 20) + 5 * 4096 + 17;
    /// Checksum blocks of 1 MiB (8 chunks) keep the tests small.
    const BLOCK: u64 = 1 << 20;

    fn pattern(seed: u8) -> Vec<u8> {
        crate::testutil::noise(SIZE as usize, u64::from(seed))
    }

    /// A temporary directory, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new() -> Self {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            let d = std::env::temp_dir().join(format!(
                "enbd-proxy-test-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            std::fs::create_dir_all(&d).unwrap();
            Self(d)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// An in-process upstream server: the real handshake and transmission
    /// loop on a localhost port, serving export `disk` (with `disk.crc`
    /// when `sums` are given) from `data`.
    struct Upstream {
        addr: String,
        killed: Arc<AtomicBool>,
        conns: Arc<Mutex<Vec<TcpStream>>>,
        _dir: TempDir,
    }

    impl Upstream {
        fn start(data: &[u8], sums: Option<&Sums>) -> Self {
            Self::serving(data, sums, true)
        }

        /// With `verify` false, `disk.crc` is served but `disk` is not
        /// checked against it: a server that sends bad data.
        fn serving(data: &[u8], sums: Option<&Sums>, verify: bool) -> Self {
            let dir = TempDir::new();
            let img = dir.0.join("disk.img");
            std::fs::write(&img, data).unwrap();
            let mut spec = format!("disk={},ro", img.display());
            if let (Some(s), true) = (sums, verify) {
                let crc = dir.0.join("disk.img.crc");
                s.store(&crc).unwrap();
                spec.push_str(",crc,scrub=0");
            }
            let spec: ExportSpec = spec.parse().unwrap();
            let mut exports = Exports::open(&[spec]).unwrap();
            if let (Some(s), false) = (sums, verify) {
                let b = crate::export::Bytes::new(s.encode(), "sums".into());
                let e = Export::with_storage("disk.crc", "", Box::new(b));
                exports.add_proxied(vec![Arc::new(e)]).unwrap();
            }
            Self::serve(exports, dir)
        }

        /// Serves `data` as `disk` and `extra` (a `disk.crc` of our making).
        fn with_extra(data: &[u8], extra: Export) -> Self {
            let dir = TempDir::new();
            let img = dir.0.join("disk.img");
            std::fs::write(&img, data).unwrap();
            let spec: ExportSpec = format!("disk={},ro", img.display()).parse().unwrap();
            let mut exports = Exports::open(&[spec]).unwrap();
            exports.add_proxied(vec![Arc::new(extra)]).unwrap();
            Self::serve(exports, dir)
        }

        /// Serves `exports` on a localhost port.
        fn serve(exports: Exports, dir: TempDir) -> Self {
            let exports = Arc::new(exports);
            let l = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = l.local_addr().unwrap().to_string();
            let killed = Arc::new(AtomicBool::new(false));
            let conns = Arc::new(Mutex::new(Vec::new()));
            let (k, cs) = (killed.clone(), conns.clone());
            std::thread::spawn(move || {
                for s in l.incoming() {
                    let Ok(s) = s else { continue };
                    if k.load(Ordering::SeqCst) {
                        continue;
                    }
                    lock(&cs).push(s.try_clone().unwrap());
                    let exports = exports.clone();
                    std::thread::spawn(move || serve_one(s, &exports));
                }
            });
            Self {
                addr,
                killed,
                conns,
                _dir: dir,
            }
        }

        /// Dies: every connection is cut, new ones are closed at once.
        fn kill(&self) {
            self.killed.store(true, Ordering::SeqCst);
            for c in lock(&self.conns).iter() {
                let _ = c.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    fn serve_one(s: TcpStream, exports: &Exports) {
        let mut link = Link::tcp(s);
        let tls = TlsPolicy {
            mode: TlsMode::Off,
            config: None,
        };
        if let Ok(Outcome::Transmission(e, neg)) = handshake::run(&mut link, exports, &tls) {
            if let Ok(Bare::Tcp(mut t)) = link.into_bare() {
                let fd = t.as_raw_fd();
                let _ = transmission::serve(&mut t, fd, e, neg, &Resources::new(2));
            }
        }
    }

    fn sums_of(data: &[u8]) -> Sums {
        let dir = TempDir::new();
        let p = dir.0.join("x");
        std::fs::write(&p, data).unwrap();
        let b = crate::backend::Backend::open(&p, true, true).unwrap();
        Sums::compute(&b, BLOCK, |_, _| {}).unwrap()
    }

    fn config(ups: &[&Upstream], dir: &TempDir) -> ProxyConfig {
        ProxyConfig {
            upstreams: ups.iter().map(|u| u.addr.clone()).collect(),
            cache_dir: dir.0.clone(),
            timeout: Duration::from_secs(5),
            replicate: None,
            unchecked: false,
        }
    }

    fn read(p: &Proxy, off: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut b = vec![0u8; len];
        p.read_at(&mut b, off)?;
        Ok(b)
    }

    fn upstream_bytes(p: &Proxy) -> u64 {
        p.stats().upstream_bytes.load(Ordering::SeqCst)
    }

    fn cache_bytes(p: &Proxy) -> u64 {
        p.stats().cache_bytes.load(Ordering::SeqCst)
    }

    #[test]
    fn cold_then_warm_then_restarted_then_corrupted() {
        let data = pattern(1);
        let sums = sums_of(&data);
        let up = Upstream::start(&data, Some(&sums));
        let dir = TempDir::new();
        let cfg = config(&[&up], &dir);
        let p = Proxy::open("disk", &cfg).unwrap();
        assert_eq!(p.size(), SIZE);
        assert!(p.read_only());
        assert_eq!(p.0.unit, BLOCK, "whole checksum blocks are fetched");
        // Cold: all from upstream, once (the first chunk of each block
        // fetches the block, the read's next chunks find it cached).
        assert_eq!(read(&p, 0, 4096).unwrap(), &data[..4096]);
        assert_eq!((upstream_bytes(&p), cache_bytes(&p)), (BLOCK, 0));
        assert_eq!(read(&p, 0, SIZE as usize).unwrap(), data);
        assert_eq!(upstream_bytes(&p), SIZE);
        let cached = cache_bytes(&p);
        // Warm: nothing from upstream.
        assert_eq!(read(&p, 0, SIZE as usize).unwrap(), data);
        assert_eq!((upstream_bytes(&p), cache_bytes(&p)), (SIZE, cached + SIZE));
        assert!(p.report().unwrap().contains(&format!(
            "proxy disk: {SIZE} bytes from upstream, {} bytes from cache",
            cached + SIZE
        )));
        drop(p);
        // Restarted: the cache is still there.
        let p = Proxy::open("disk", &cfg).unwrap();
        assert_eq!(read(&p, 4000, 300_000).unwrap(), &data[4000..304_000]);
        assert_eq!(
            read(&p, SIZE - 10, 10).unwrap(),
            &data[SIZE as usize - 10..]
        );
        assert_eq!(upstream_bytes(&p), 0);
        // A byte flipped in the cache file: caught at the next read,
        // fetched again (its whole checksum block), served right.
        let (cache_file, _) = crate::cache::paths(&dir.0, "disk");
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&cache_file)
            .unwrap();
        use std::os::unix::fs::FileExt;
        let at = BLOCK + 3 * CHUNK + 5;
        let mut b = [0u8];
        f.read_exact_at(&mut b, at).unwrap();
        f.write_all_at(&[!b[0]], at).unwrap();
        assert_eq!(
            read(&p, at - 2, 8).unwrap(),
            &data[at as usize - 2..at as usize + 6]
        );
        assert_eq!(p.stats().cache_corrupt.load(Ordering::SeqCst), 1);
        assert_eq!(upstream_bytes(&p), BLOCK);
        f.read_exact_at(&mut b, at).unwrap();
        assert_eq!(b[0], data[at as usize], "the cache file is repaired");
        assert_eq!(read(&p, 0, SIZE as usize).unwrap(), data);
        assert_eq!(upstream_bytes(&p), BLOCK);
    }

    #[test]
    fn without_upstream_checksums_chunks_are_fetched() {
        let data = pattern(2);
        let up = Upstream::start(&data, None);
        let dir = TempDir::new();
        let p = Proxy::open("disk", &config(&[&up], &dir)).unwrap();
        assert_eq!(p.0.unit, CHUNK);
        assert_eq!(
            read(&p, CHUNK + 10, 20).unwrap(),
            &data[CHUNK as usize + 10..][..20]
        );
        assert_eq!(upstream_bytes(&p), CHUNK, "a cold read costs one chunk");
        assert_eq!(read(&p, 0, SIZE as usize).unwrap(), data);
        assert_eq!(upstream_bytes(&p), SIZE);
        // Reads past the end fail without a panic.
        assert!(read(&p, SIZE - 1, 2).is_err());
        assert!(read(&p, u64::MAX, 1).is_err());
    }

    #[test]
    fn concurrent_misses_of_a_block_fetch_it_once() {
        let data = pattern(3);
        let up = Upstream::start(&data, Some(&sums_of(&data)));
        let dir = TempDir::new();
        let p = Arc::new(Proxy::open("disk", &config(&[&up], &dir)).unwrap());
        let threads: Vec<_> = (0..8u64)
            .map(|i| {
                let p = p.clone();
                std::thread::spawn(move || read(&p, BLOCK + i * 70_000, 4096).unwrap())
            })
            .collect();
        for (i, t) in threads.into_iter().enumerate() {
            let off = BLOCK as usize + i * 70_000;
            assert_eq!(t.join().unwrap(), &data[off..off + 4096]);
        }
        assert_eq!(upstream_bytes(&p), BLOCK);
    }

    #[test]
    fn a_dead_upstream_is_failed_over() {
        let data = pattern(4);
        let sums = sums_of(&data);
        let (a, b) = (
            Upstream::start(&data, Some(&sums)),
            Upstream::start(&data, Some(&sums)),
        );
        // An address where nobody listens, first in the list.
        let dead = TcpListener::bind("127.0.0.1:0").unwrap();
        let dead_addr = dead.local_addr().unwrap().to_string();
        drop(dead);
        let dir = TempDir::new();
        let mut cfg = config(&[&a, &b], &dir);
        cfg.upstreams.insert(0, dead_addr);
        let p = Proxy::open("disk", &cfg).unwrap();
        assert_eq!(read(&p, 0, 1000).unwrap(), &data[..1000]);
        let chosen = lock(&p.0.ups.sel).current.unwrap();
        assert!(chosen == 1 || chosen == 2, "{chosen}");
        // Kill the chosen one: the next cold read comes from the other.
        [&a, &b][chosen - 1].kill();
        assert_eq!(
            read(&p, 2 * BLOCK, 5000).unwrap(),
            &data[2 * BLOCK as usize..][..5000]
        );
        let now = lock(&p.0.ups.sel).current;
        assert_eq!(now, Some(3 - chosen), "moved to the live upstream");
        // Both dead: a cold read fails with EIO, a cached one still works.
        [&a, &b][2 - chosen].kill();
        let e = read(&p, BLOCK, 10).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        assert_eq!(read(&p, 0, 1000).unwrap(), &data[..1000]);
    }

    #[test]
    fn a_block_that_fails_the_checksums_is_fetched_from_another_upstream() {
        let data = pattern(5);
        let sums = sums_of(&data);
        let mut bad = data.clone();
        bad[BLOCK as usize + 12345] ^= 0x40;
        let (b, g) = (
            Upstream::serving(&bad, Some(&sums), false),
            Upstream::start(&data, Some(&sums)),
        );
        let dir = TempDir::new();
        let p = Proxy::open("disk", &config(&[&b, &g], &dir)).unwrap();
        // Make the bad upstream the one asked first.
        lock(&p.0.ups.sel).current = Some(0);
        assert_eq!(read(&p, 0, SIZE as usize).unwrap(), data);
        assert_eq!(p.stats().upstream_bad.load(Ordering::SeqCst), 1);
        assert_eq!(upstream_bytes(&p), SIZE + BLOCK);
        drop(p);
        // With the bad upstream alone, that block is never served: EIO
        // after a second try; the other blocks are fine.
        let dir = TempDir::new();
        let p = Proxy::open("disk", &config(&[&b], &dir)).unwrap();
        let e = read(&p, BLOCK, 4096).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EIO));
        assert_eq!(p.stats().upstream_bad.load(Ordering::SeqCst), 2);
        assert_eq!(read(&p, 0, 4096).unwrap(), &data[..4096]);
    }

    #[test]
    fn an_upstream_of_another_size_is_not_used() {
        let data = pattern(6);
        let a = Upstream::start(&data, None);
        let b = Upstream::start(&data[..4096], None);
        let dir = TempDir::new();
        let mut cfg = config(&[&a, &b], &dir);
        cfg.unchecked = true;
        let p = Proxy::open("disk", &cfg).unwrap();
        assert_eq!(p.0.ups.compatible, vec![true, false]);
        a.kill();
        assert!(read(&p, 0, 10).is_err(), "never read from the other image");
    }

    #[test]
    fn an_upstream_with_other_checksums_is_not_used() {
        let (data, other) = (pattern(9), pattern(10));
        let a = Upstream::start(&data, Some(&sums_of(&data)));
        let b = Upstream::start(&other, Some(&sums_of(&other)));
        let c = Upstream::start(&data, Some(&sums_of(&data)));
        let dir = TempDir::new();
        let p = Proxy::open("disk", &config(&[&a, &b, &c], &dir)).unwrap();
        assert_eq!(p.0.ups.compatible, vec![true, false, true]);
        a.kill();
        assert_eq!(read(&p, 0, SIZE as usize).unwrap(), data, "from c, never b");
    }

    #[test]
    fn replication_fills_the_cache() {
        let data = pattern(7);
        let up = Upstream::start(&data, Some(&sums_of(&data)));
        let dir = TempDir::new();
        let mut cfg = config(&[&up], &dir);
        cfg.replicate = Some(1 << 30);
        let p = Proxy::open("disk", &cfg).unwrap();
        let start = Instant::now();
        // Counted when fetched, so wait for the chunks to be stored.
        while (0..p.0.cache.chunks()).any(|c| p.0.cache.get(c).is_none()) {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "replication stalled"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(read(&p, 0, SIZE as usize).unwrap(), data);
        assert_eq!(upstream_bytes(&p), SIZE);
        assert_eq!(cache_bytes(&p), SIZE);
    }

    #[test]
    fn replication_skips_a_unit_no_upstream_delivers() {
        let data = pattern(17);
        let sums = sums_of(&data);
        let mut bad = data.clone();
        bad[BLOCK as usize + 5] ^= 1;
        let up = Upstream::serving(&bad, Some(&sums), false);
        let dir = TempDir::new();
        let mut cfg = config(&[&up], &dir);
        cfg.replicate = Some(1 << 30);
        let p = Proxy::open("disk", &cfg).unwrap();
        let start = Instant::now();
        // Block 1 fails its checksum (twice a try), the others come after it.
        while (0..p.0.cache.chunks())
            .filter(|&c| c / (BLOCK / CHUNK) != 1)
            .any(|c| p.0.cache.get(c).is_none())
        {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "replication stalled"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let tries = u64::from(REPLICATE_TRIES) * 2;
        assert_eq!(p.stats().upstream_bad.load(Ordering::SeqCst), tries);
        assert!((8..16).all(|c| p.0.cache.get(c).is_none()));
    }

    #[test]
    fn any_name_the_upstream_has_is_opened_on_demand_once() {
        let data = pattern(8);
        let up = Upstream::start(&data, Some(&sums_of(&data)));
        let dir = TempDir::new();
        let mut x = Exports::default();
        x.set_on_demand(Arc::new(OnDemand::new(config(&[&up], &dir))));
        assert_eq!(x.iter().count(), 0);
        let e = x.find(b"disk").unwrap();
        assert_eq!(e.size(), SIZE);
        assert!(e.backend().read_only());
        let mut b = vec![0u8; 1000];
        e.backend().read_at(&mut b, 5).unwrap();
        assert_eq!(b, &data[5..1005]);
        assert!(Arc::ptr_eq(&e, &x.find(b"disk").unwrap()), "opened once");
        assert_eq!(
            x.iter().map(|e| e.name().to_owned()).collect::<Vec<_>>(),
            ["disk"]
        );
        assert!(dir.0.join("disk.cache").exists());
        // Names the upstream lacks, or that are no file names, open nothing.
        assert!(x.find(b"nope").is_none());
        assert!(x.find(b"nope").is_none(), "remembered as failed");
        assert!(x.find(b"../disk").is_none());
        assert!(x.find(b"\xff").is_none());
        assert!(!dir.0.join("nope.cache").exists());
        // A reload keeps what was opened.
        let y = Exports::open_reusing(&[], &x).unwrap();
        assert!(Arc::ptr_eq(&e, &y.find(b"disk").unwrap()));
    }

    #[test]
    fn a_client_reads_through_the_proxy_over_nbd() {
        let data = pattern(11);
        let up = Upstream::start(&data, Some(&sums_of(&data)));
        let dir = TempDir::new();
        let cfg = config(&[&up], &dir);
        let mut x = Exports::default();
        x.add_proxied(open_exports(&["disk".to_owned()], &cfg).unwrap())
            .unwrap();
        let proxy = Upstream::serve(x, TempDir::new());
        let mut c = Conn::connect(&proxy.addr, "disk", Duration::from_secs(5)).unwrap();
        assert_eq!(c.size(), SIZE);
        assert_ne!(c.info().flags & enbd_core::wire::tx::READ_ONLY, 0);
        let mut b = vec![0u8; 300_000];
        c.read(&mut b, 777).unwrap();
        assert_eq!(b, &data[777..300_777]);
        // The default export is the proxied one; the upstream's sidecar is
        // no export of the proxy.
        assert!(Conn::connect(&proxy.addr, "", Duration::from_secs(5)).is_ok());
        assert!(Conn::connect(&proxy.addr, "disk.crc", Duration::from_secs(5)).is_err());
        c.close();
    }

    /// Storage whose every read fails (a sidecar that cannot be read).
    #[derive(Debug)]
    struct Failing(u64);

    impl Storage for Failing {
        fn size(&self) -> u64 {
            self.0
        }
        fn path(&self) -> &Path {
            Path::new("failing")
        }
        fn read_only(&self) -> bool {
            true
        }
        fn read_at(&self, _: &mut [u8], _: u64) -> io::Result<()> {
            Err(eio())
        }
        fn write_at(&self, _: &[u8], _: u64, _: bool) -> io::Result<()> {
            Err(read_only())
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
        fn trim(&self, _: u64, _: u64) -> io::Result<()> {
            Err(read_only())
        }
        fn write_zeroes(&self, _: u64, _: u64, _: bool) -> io::Result<()> {
            Err(read_only())
        }
    }

    fn sidecar_export(bytes: Vec<u8>) -> Export {
        let b = crate::export::Bytes::new(bytes, "sums".into());
        Export::with_storage("disk.crc", "", Box::new(b))
    }

    #[test]
    fn without_checksums_the_cache_starts_empty_and_one_upstream_is_required() {
        let (old, new) = (pattern(12), pattern(13));
        let dir = TempDir::new();
        {
            let up = Upstream::start(&old, None);
            let p = Proxy::open("disk", &config(&[&up], &dir)).unwrap();
            assert_eq!(read(&p, 0, SIZE as usize).unwrap(), old);
        }
        // The upstream's image replaced by another of the same size: no
        // chunk of the old one is served.
        let up = Upstream::start(&new, None);
        let p = Proxy::open("disk", &config(&[&up], &dir)).unwrap();
        assert_eq!(read(&p, 0, SIZE as usize).unwrap(), new);
        assert_eq!(upstream_bytes(&p), SIZE, "nothing came from the old cache");
        drop(p);
        // Two upstreams without checksums may hold two images of one size.
        let other = Upstream::start(&old, None);
        let mut cfg = config(&[&up, &other], &dir);
        let e = format!("{:#}", Proxy::open("disk", &cfg).unwrap_err());
        assert!(e.contains("--proxy-unchecked"), "{e}");
        cfg.unchecked = true;
        assert!(Proxy::open("disk", &cfg).is_ok());
    }

    #[test]
    fn a_sidecar_that_cannot_be_fetched_does_not_switch_checking_off() {
        let data = pattern(14);
        let sums = sums_of(&data);
        let len = sums.encode().len() as u64;
        let failing = Export::with_storage("disk.crc", "", Box::new(Failing(len)));
        let up = Upstream::with_extra(&data, failing);
        let dir = TempDir::new();
        let e = format!(
            "{:#}",
            Proxy::open("disk", &config(&[&up], &dir)).unwrap_err()
        );
        assert!(e.contains("cannot tell whether"), "{e}");
        // A cache filled with checksums is not served without them.
        let good = Upstream::start(&data, Some(&sums));
        drop(Proxy::open("disk", &config(&[&good], &dir)).unwrap());
        let bare = Upstream::start(&data, None);
        let e = format!(
            "{:#}",
            Proxy::open("disk", &config(&[&bare], &dir)).unwrap_err()
        );
        assert!(e.contains("filled with the upstream's checksums"), "{e}");
    }

    #[test]
    fn a_damaged_sidecar_excludes_its_upstream() {
        let data = pattern(15);
        let sums = sums_of(&data);
        let mut damaged = sums.encode();
        let last = damaged.len() - 1;
        damaged[last] ^= 1;
        let bad = Upstream::with_extra(&data, sidecar_export(damaged));
        let good = Upstream::start(&data, Some(&sums));
        let dir = TempDir::new();
        let p = Proxy::open("disk", &config(&[&bad, &good], &dir)).unwrap();
        assert_eq!(p.0.ups.compatible, vec![false, true]);
        assert!(p.0.sums.is_some());
        good.kill();
        assert!(read(&p, 0, 10).is_err(), "never read from the excluded one");
        drop(p);
        // Alone, it is not served unchecked.
        let dir = TempDir::new();
        let e = format!(
            "{:#}",
            Proxy::open("disk", &config(&[&bad], &dir)).unwrap_err()
        );
        assert!(e.contains("damaged"), "{e}");
    }

    #[test]
    fn a_cache_read_error_fetches_the_chunk_again() {
        let data = pattern(16);
        let up = Upstream::start(&data, Some(&sums_of(&data)));
        let dir = TempDir::new();
        let p = Proxy::open("disk", &config(&[&up], &dir)).unwrap();
        assert_eq!(read(&p, 0, SIZE as usize).unwrap(), data);
        // The cache file cut short: its last chunks cannot be read.
        let (cache_file, _) = crate::cache::paths(&dir.0, "disk");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&cache_file)
            .unwrap();
        f.set_len(2 * BLOCK + 100).unwrap();
        assert_eq!(read(&p, 0, SIZE as usize).unwrap(), data);
        assert!(p.stats().cache_corrupt.load(Ordering::SeqCst) > 0);
        // (Each unreadable chunk refetches its unit.)
        let fetched = upstream_bytes(&p);
        assert!(fetched >= SIZE + (SIZE - 2 * BLOCK), "{fetched}");
        // Repaired: all from the cache now.
        assert_eq!(read(&p, 0, SIZE as usize).unwrap(), data);
        assert_eq!(upstream_bytes(&p), fetched);
    }

    #[test]
    fn names_that_are_not_file_names_are_refused() {
        for bad in ["", "a/b", ".hidden", "..", "x\0y"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_name("disk-1.img").is_ok());
    }
}
