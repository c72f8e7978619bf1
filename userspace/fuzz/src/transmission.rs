//! The `transmission` target: `enbd_server::transmission::serve`, the whole
//! request loop with its workers, on a socket pair, against a small file.
//!
//! Input: one byte choosing the run ([`Setup`]), then the request stream.
//! The harness frames the stream as the protocol does (28-byte headers, a
//! WRITE's payload after it) and rewrites each cookie to the request's index,
//! so every reply names exactly one request; cookies are opaque to servers.

use std::io::Write;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use enbd_core::wire::{Cmd, Request, SimpleReply, REQUEST_MAGIC};
use enbd_server::backend::{Backend, Storage};
use enbd_server::budget::Memory;
use enbd_server::export::Export;
use enbd_server::link::IdleLimit;
use enbd_server::transmission::{serve, Negotiated, Resources, POOL_KEEP};

/// Size of the exports: small, so that the fuzzer hits valid ranges.
pub const SIZE: usize = 64 << 10;
/// Most zero bytes the harness adds to complete a truncated WRITE.
const MAX_PAD: usize = 1 << 20;

/// How a run goes, from the input's first byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Setup {
    pub read_only: bool,
    pub workers: usize,
    /// The stream as given, the client hanging up after it. Otherwise the
    /// stream is completed (a cut WRITE padded, a cut header or anything
    /// after a bad magic dropped) and ended with `NBD_CMD_DISC`, the client
    /// staying connected until the server is done.
    pub raw: bool,
}

impl Setup {
    pub fn from_byte(b: u8) -> Self {
        Self {
            read_only: b & 1 != 0,
            workers: [1, 2, 4, 1][usize::from(b >> 1 & 3)],
            raw: b & 8 != 0,
        }
    }

    pub fn to_byte(self) -> u8 {
        let w = match self.workers {
            2 => 1,
            4 => 2,
            _ => 0,
        };
        u8::from(self.read_only) | w << 1 | u8::from(self.raw) << 3
    }
}

/// The real backend, counting what changes data: the fencing oracle needs
/// to know what ran, not only what was answered.
#[derive(Debug)]
struct Counting {
    inner: Backend,
    modified: Arc<AtomicU64>,
}

impl Storage for Counting {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        self.inner.read_at(buf, off)
    }
    fn write_at(&self, buf: &[u8], off: u64, fua: bool) -> std::io::Result<()> {
        self.modified.fetch_add(1, Ordering::SeqCst);
        self.inner.write_at(buf, off, fua)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn trim(&self, off: u64, len: u64) -> std::io::Result<()> {
        self.modified.fetch_add(1, Ordering::SeqCst);
        self.inner.trim(off, len)
    }
    fn write_zeroes(&self, off: u64, len: u64, may_trim: bool) -> std::io::Result<()> {
        self.modified.fetch_add(1, Ordering::SeqCst);
        self.inner.write_zeroes(off, len, may_trim)
    }
}

/// One export over a file of [`SIZE`] bytes, opened once per process.
struct Fixture {
    export: Arc<Export>,
    path: PathBuf,
    /// The counter of the export's [`Counting`] storage.
    modified: Arc<AtomicU64>,
}

fn fixture(read_only: bool) -> &'static Fixture {
    static RW: OnceLock<Fixture> = OnceLock::new();
    static RO: OnceLock<Fixture> = OnceLock::new();
    let (cell, name) = if read_only {
        (&RO, "transmission-ro")
    } else {
        (&RW, "transmission-rw")
    };
    cell.get_or_init(|| {
        let path = crate::backing_file(name, SIZE);
        let inner = match Backend::open(&path, read_only, false) {
            Ok(b) => b,
            Err(e) => panic!("harness set-up: {e:#}"),
        };
        let modified = Arc::new(AtomicU64::new(0));
        let storage = Counting {
            inner,
            modified: modified.clone(),
        };
        let export = Export::with_storage(name, "", Box::new(storage));
        Fixture {
            export: Arc::new(export),
            path,
            modified,
        }
    })
}

fn file_contents(path: &Path) -> Vec<u8> {
    let mut buf = vec![0u8; SIZE];
    let read = std::fs::File::open(path).and_then(|f| f.read_exact_at(&mut buf, 0));
    if let Err(e) = read {
        panic!("harness: reading {} back: {e}", path.display());
    }
    buf
}

/// One request as framed by the harness.
#[derive(Clone, Debug)]
pub struct Framed {
    pub req: Request,
    /// Where its WRITE payload sits in the stream sent.
    pub payload: std::ops::Range<usize>,
}

/// The stream to send and its requests, framed; cookies rewritten.
#[derive(Clone, Debug, Default)]
pub struct Stream {
    pub bytes: Vec<u8>,
    pub requests: Vec<Framed>,
}

/// Frames `data` as requests; with `complete`, makes it end cleanly with a
/// `NBD_CMD_DISC` (see [`Setup::raw`]).
pub fn frame(data: &[u8], complete: bool) -> Stream {
    let mut s = Stream::default();
    let mut rest = data;
    while rest.len() >= Request::LEN {
        let (h, tail) = rest.split_at(Request::LEN);
        let Ok(mut req) = Request::decode(h.try_into().unwrap_or(&[0; Request::LEN])) else {
            break;
        };
        req.cookie = s.requests.len() as u64;
        let plen = req.payload_len() as usize;
        let start = s.bytes.len() + Request::LEN;
        let have = plen.min(tail.len());
        if complete && have < plen && plen - have > MAX_PAD {
            break;
        }
        s.bytes.extend_from_slice(&req.encode());
        s.bytes.extend_from_slice(&tail[..have]);
        if complete {
            s.bytes.resize(start + plen, 0);
        }
        s.requests.push(Framed {
            req,
            payload: start..s.bytes.len(),
        });
        rest = &tail[have..];
        if have < plen {
            rest = &[];
        }
    }
    if complete {
        let disc = Request::new(Cmd::Disc, 0, s.requests.len() as u64, 0, 0);
        let start = s.bytes.len() + Request::LEN;
        s.bytes.extend_from_slice(&disc.encode());
        s.requests.push(Framed {
            req: disc,
            payload: start..start,
        });
    } else {
        // What follows the last whole request goes as it is: a cut header,
        // a bad magic and what comes after it.
        s.bytes.extend_from_slice(rest);
    }
    s
}

/// What a run produced.
#[derive(Debug)]
pub struct Run {
    pub output: Vec<u8>,
    /// Data-changing calls into the storage.
    pub modified: u64,
    /// Whether the client had hung up before the server started.
    pub hung_up_first: bool,
    /// The file before and after.
    pub before: Vec<u8>,
    pub after: Vec<u8>,
    pub served: Result<(), String>,
    /// `serve` ended on the idle limit: with the client's bytes all sent,
    /// the server waited for more.
    pub timed_out: bool,
}

/// Runs one input; panics if the server broke the protocol.
pub fn fuzz(data: &[u8]) {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let setup = Setup::from_byte(first);
    let stream = frame(rest, !setup.raw);
    let run = exchange(setup, &stream);
    if let Err(e) = check(setup, &stream, &run) {
        panic!(
            "{e}\nsetup {setup:?}, served {:?}, {} modifications, hung up first: {}\nrequests {:?}",
            run.served,
            run.modified,
            run.hung_up_first,
            stream.requests.iter().map(|f| f.req).collect::<Vec<_>>()
        );
    }
}

/// Sends `stream` to `serve` and collects what comes back.
pub fn exchange(setup: Setup, stream: &Stream) -> Run {
    // The files are shared: one run at a time (the unit tests run threads).
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = ONE.lock().unwrap_or_else(|p| p.into_inner());
    let f = fixture(setup.read_only);
    let before = file_contents(&f.path);
    let modified_before = f.modified.load(Ordering::SeqCst);
    let (mut c, mut s) = crate::socket_pair();
    let mut hung_up_first = false;
    let mut writer = None;
    if setup.raw {
        // Hang up before the server starts if the stream fits in the socket
        // buffer: then fencing must drop every write not followed by DISC.
        let sent = c.set_nonblocking(true).and_then(|()| {
            let mut n = 0;
            while n < stream.bytes.len() {
                match c.write(&stream.bytes[n..]) {
                    Ok(k) => n += k,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e),
                }
            }
            c.set_nonblocking(false)?;
            Ok(n)
        });
        let n = match sent {
            Ok(n) => n,
            Err(e) => panic!("harness: sending: {e}"),
        };
        if n == stream.bytes.len() {
            hung_up_first = c.shutdown(Shutdown::Write).is_ok();
        } else {
            let rest = stream.bytes[n..].to_vec();
            let mut w = match c.try_clone() {
                Ok(w) => w,
                Err(e) => panic!("harness set-up: {e}"),
            };
            writer = Some(std::thread::spawn(move || {
                let _ = w.write_all(&rest);
                let _ = w.shutdown(Shutdown::Write);
            }));
        }
    } else {
        let bytes = stream.bytes.clone();
        let mut w = match c.try_clone() {
            Ok(w) => w,
            Err(e) => panic!("harness set-up: {e}"),
        };
        // The client stays connected: the server ends on the DISC.
        writer = Some(std::thread::spawn(move || {
            let _ = w.write_all(&bytes);
        }));
    }
    let reader = crate::drain(c);
    let fd = s.as_raw_fd();
    let served = {
        // The server's idle limit ends a server waiting for bytes that the
        // client never sends; the oracle reports it.
        let mut idle = IdleLimit::new(&mut s, Some(crate::PATIENCE));
        // The server's default budgets; simple replies (the oracle reads
        // those only).
        let res = Resources {
            workers: setup.workers,
            memory: Arc::new(Memory::new(1 << 30, POOL_KEEP)),
            per_connection: 64 << 20,
            send_timeout: None,
        };
        serve(&mut idle, fd, f.export.clone(), Negotiated::default(), &res).map(|_| ())
    };
    let timed_out = matches!(&served, Err(e) if e.kind() == std::io::ErrorKind::TimedOut);
    let served = served.map_err(|e| e.to_string());
    drop(s);
    if let Some(w) = writer {
        if w.join().is_err() {
            panic!("harness: the writer thread panicked");
        }
    }
    let output = crate::drained(reader);
    Run {
        output,
        modified: f.modified.load(Ordering::SeqCst) - modified_before,
        hung_up_first,
        after: file_contents(&f.path),
        before,
        served,
        timed_out,
    }
}

fn modifies(cmd: Option<Cmd>) -> bool {
    matches!(cmd, Some(Cmd::Write | Cmd::Trim | Cmd::WriteZeroes))
}

/// Checks a run:
///
/// * every reply is well formed, answers a request sent, once at most, with
///   an error value the protocol allows; a successful READ carries exactly
///   its length in data;
/// * a request succeeds only if it is a known command other than DISC and
///   BLOCK_STATUS (no meta context is negotiated), within the export, and
///   not a change to a read-only export;
/// * the first DISC left unanswered ends the stream: every request before it
///   has its reply and none after it does. A completed stream must end so,
///   with `serve` returning `Ok`;
/// * fencing: a client that hung up before the server started, without a
///   DISC that ends the stream, has no change executed at all;
/// * with one worker and a completed stream, requests run in order: each
///   READ returns what the writes before it left, and the file ends as the
///   successful changes made it (TRIM leaves its range unknown).
pub fn check(setup: Setup, stream: &Stream, run: &Run) -> Result<(), String> {
    if run.timed_out {
        return Err("the server waited for more than the client sent".into());
    }
    let reqs = &stream.requests;
    let mut replies: Vec<Option<(u32, std::ops::Range<usize>)>> = vec![None; reqs.len()];
    let mut out = &run.output[..];
    let mut at = 0usize;
    while !out.is_empty() {
        let h: &[u8; SimpleReply::LEN] = out
            .get(..SimpleReply::LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(format!("a cut reply header at byte {at}"))?;
        let r = SimpleReply::decode(h).map_err(|e| format!("reply at byte {at}: {e}"))?;
        out = &out[SimpleReply::LEN..];
        at += SimpleReply::LEN;
        let i = usize::try_from(r.cookie)
            .ok()
            .filter(|&i| i < reqs.len())
            .ok_or(format!("a reply to cookie {} never sent", r.cookie))?;
        if replies[i].is_some() {
            return Err(format!("request {i} answered twice"));
        }
        if r.error != 0 && !crate::PROTOCOL_ERRORS.contains(&r.error) {
            return Err(format!(
                "request {i}: error {} outside the protocol",
                r.error
            ));
        }
        let req = reqs[i].req;
        let cmd = req.command();
        let mut data = at..at;
        if r.error == 0 {
            match cmd {
                // BLOCK_STATUS needs a meta context, never set up here.
                None | Some(Cmd::Disc | Cmd::BlockStatus) => {
                    return Err(format!("request {i} ({req:?}) succeeded"))
                }
                Some(Cmd::Read | Cmd::Write | Cmd::Trim | Cmd::WriteZeroes | Cmd::Cache) => {
                    let end = req.offset.checked_add(u64::from(req.length));
                    if end.is_none_or(|e| e > SIZE as u64) {
                        return Err(format!("request {i} ({req:?}) succeeded out of range"));
                    }
                }
                _ => {}
            }
            if setup.read_only && modifies(cmd) {
                return Err(format!("request {i} ({req:?}) changed a read-only export"));
            }
            if cmd == Some(Cmd::Read) {
                let n = req.length as usize;
                if out.len() < n {
                    return Err(format!("request {i}: READ data cut short"));
                }
                out = &out[n..];
                data = at..at + n;
                at += n;
            }
        }
        replies[i] = Some((r.error, data));
    }
    let disc = reqs
        .iter()
        .zip(&replies)
        .position(|(f, r)| f.req.command() == Some(Cmd::Disc) && r.is_none());
    match disc {
        Some(d) => {
            if let Some(i) = replies[..d].iter().position(Option::is_none) {
                return Err(format!("request {i} unanswered before the DISC at {d}"));
            }
            if let Some(i) = replies[d..].iter().position(Option::is_some) {
                return Err(format!("request {} after the DISC at {d} answered", d + i));
            }
        }
        None if !setup.raw => return Err("the DISC ending the stream was answered".into()),
        None if run.hung_up_first && run.modified > 0 => {
            return Err(format!(
                "{} change(s) executed for a client that hung up without DISC",
                run.modified
            ))
        }
        None => {}
    }
    if !setup.raw {
        if let Err(e) = &run.served {
            return Err(format!("serve failed on a clean stream: {e}"));
        }
    }
    if setup.workers == 1 && !setup.raw {
        check_data(stream, &replies, run)?;
    } else if run.modified == 0 && run.after != run.before {
        return Err("the file changed with no change executed".into());
    }
    Ok(())
}

/// The data oracle for one worker (see [`check`]). Ranges once trimmed stay
/// unknown for the rest of the run. Comparisons are whole slices: per-byte
/// ones are slow under the fuzzer's comparison tracing.
#[allow(clippy::type_complexity)]
fn check_data(
    stream: &Stream,
    replies: &[Option<(u32, std::ops::Range<usize>)>],
    run: &Run,
) -> Result<(), String> {
    let mut model = run.before.clone();
    let mut trimmed: Vec<std::ops::Range<usize>> = Vec::new();
    // `actual` with the trimmed parts of `model`'s range `at` taken from it.
    let masked = |model: &[u8], at: usize, actual: &[u8], trimmed: &[std::ops::Range<usize>]| {
        let mut m = model.to_vec();
        for t in trimmed {
            let (lo, hi) = (t.start.max(at), t.end.min(at + m.len()));
            if lo < hi {
                m[lo - at..hi - at].copy_from_slice(&actual[lo - at..hi - at]);
            }
        }
        m == actual
    };
    for (i, (f, r)) in stream.requests.iter().zip(replies).enumerate() {
        let Some((0, data)) = r else { continue };
        // `check` let only in-range data commands succeed.
        let (off, len) = (f.req.offset as usize, f.req.length as usize);
        let range = off..off.saturating_add(len).min(SIZE);
        match f.req.command() {
            Some(Cmd::Read) => {
                let got = &run.output[data.clone()];
                if !masked(&model[range], off, got, &trimmed) {
                    return Err(format!("READ {i} at {off}+{len}: not what was written"));
                }
            }
            Some(Cmd::Write) => model[range].copy_from_slice(&stream.bytes[f.payload.clone()]),
            Some(Cmd::Trim) => trimmed.push(range),
            Some(Cmd::WriteZeroes) => model[range].fill(0),
            _ => {}
        }
    }
    if masked(&model, 0, &run.after, &trimmed) {
        Ok(())
    } else {
        Err("the file differs from what the requests made it".into())
    }
}

/// The magic, for seeds.
pub const MAGIC: u32 = REQUEST_MAGIC;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seeds;

    #[test]
    fn setup_byte_round_trips() {
        for b in 0..16u8 {
            let s = Setup::from_byte(b);
            assert_eq!(Setup::from_byte(s.to_byte()), s, "{b}");
        }
    }

    #[test]
    fn framing_completes_cut_writes_and_ends_with_disc() {
        let w = Request::new(Cmd::Write, 0, 77, 0, 8);
        let mut data = w.encode().to_vec();
        data.extend_from_slice(b"abc");
        let s = frame(&data, true);
        assert_eq!(s.requests.len(), 2);
        assert_eq!(s.requests[0].req.cookie, 0, "cookies are indices");
        assert_eq!(&s.bytes[28..36], b"abc\0\0\0\0\0");
        assert_eq!(s.requests[1].req.command(), Some(Cmd::Disc));
        // Raw: as given, but for the cookie.
        let r = frame(&data, false);
        assert_eq!(r.requests.len(), 1);
        assert_eq!(r.bytes.len(), data.len());
    }

    #[test]
    fn every_seed_passes_the_oracle() {
        for (name, data) in seeds::transmission() {
            let setup = Setup::from_byte(data[0]);
            let stream = frame(&data[1..], !setup.raw);
            let run = exchange(setup, &stream);
            if let Err(e) = check(setup, &stream, &run) {
                panic!("seed {name}: {e}");
            }
        }
    }

    /// Each rule of the oracle, broken on a real run, is caught.
    #[test]
    fn the_oracle_catches_a_misbehaving_server() {
        let setup = Setup::from_byte(0);
        let data = seeds::transmission()
            .into_iter()
            .find(|(n, _)| *n == "write-read-flush")
            .map(|(_, d)| d)
            .unwrap();
        let stream = frame(&data[1..], true);
        let run = exchange(setup, &stream);
        check(setup, &stream, &run).unwrap();
        let with = |f: &dyn Fn(&mut Run)| {
            let mut r = Run {
                output: run.output.clone(),
                before: run.before.clone(),
                after: run.after.clone(),
                served: run.served.clone(),
                ..run
            };
            f(&mut r);
            check(setup, &stream, &r)
        };
        // The write not on disk as sent.
        assert!(with(&|r| r.after[4096 + 511] ^= 1).is_err());
        // Read data changed.
        assert!(with(&|r| {
            let n = r.output.len();
            r.output[n - 1] ^= 1
        })
        .is_err());
        // A reply missing, or one twice.
        assert!(with(&|r| r.output.truncate(SimpleReply::LEN)).is_err());
        assert!(with(&|r| {
            let first = r.output[..SimpleReply::LEN].to_vec();
            r.output.extend_from_slice(&first)
        })
        .is_err());
        assert!(with(&|r| r.served = Err("x".into())).is_err());
        assert!(with(&|r| r.timed_out = true).is_err());
        // Fencing: a change executed for a client gone without DISC.
        let raw = Setup { raw: true, ..setup };
        let mut cut = frame(&data[1..], false);
        cut.requests.truncate(1);
        let gone = Run {
            output: Vec::new(),
            modified: 1,
            hung_up_first: true,
            before: run.before.clone(),
            after: run.after.clone(),
            served: Ok(()),
            timed_out: false,
        };
        assert!(check(raw, &cut, &gone).is_err());
        assert!(check(
            raw,
            &cut,
            &Run {
                modified: 0,
                after: run.before.clone(),
                ..gone
            }
        )
        .is_ok());
    }
}
