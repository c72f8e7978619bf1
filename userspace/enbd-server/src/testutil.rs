//! Helpers for the handshake and transmission tests: temporary backing
//! files, a storage wrapper that counts operations and can hold one, and a
//! raw NBD client speaking the wire format of `enbd_core::wire`.

use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use enbd_core::wire::{OptionHeader, OptionReplyHeader, Request, SimpleReply};

use crate::backend::{Backend, Run, Storage};
use crate::export::Export;

/// How long a test waits for anything before it fails instead of hanging.
pub const PATIENCE: Duration = Duration::from_secs(20);

/// Pseudo-random bytes (xorshift), the same for the same seed.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A file in the temp directory, removed on drop.
pub struct TempFile(PathBuf);

impl TempFile {
    /// A file of `len` bytes. Small files are filled with `fill`; large ones
    /// are sparse (zeroes).
    pub fn new(len: u64, fill: u8) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let p = std::env::temp_dir().join(format!(
            "enbd-server-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        if len <= 1 << 20 {
            std::fs::write(&p, vec![fill; len as usize]).unwrap();
        } else {
            std::fs::File::create(&p).unwrap().set_len(len).unwrap();
        }
        Self(p)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Cuts the file to `len` bytes underneath whoever serves it.
    pub fn truncate(&self, len: u64) {
        std::fs::OpenOptions::new()
            .write(true)
            .open(&self.0)
            .unwrap()
            .set_len(len)
            .unwrap();
    }

    /// `len` bytes at `off`, read straight from the file.
    pub fn read(&self, off: u64, len: usize) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let mut buf = vec![0u8; len];
        std::fs::File::open(&self.0)
            .unwrap()
            .read_exact_at(&mut buf, off)
            .unwrap();
        buf
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// What a [`Probe`] saw, and the switch that holds the next FLUSH.
#[derive(Debug, Default)]
pub struct Counts {
    pub writes: AtomicU64,
    pub flushes: AtomicU64,
    pub trims: AtomicU64,
    pub zeroes: AtomicU64,
    pub caches: AtomicU64,
    /// Pretend fast zeroing is not possible here.
    pub slow_zeroes: std::sync::atomic::AtomicBool,
    /// Writes made durable on their own (`RWF_DSYNC`).
    pub fua_writes: AtomicU64,
    /// Make the next `write_at` fail with this errno (0: don't).
    pub fail_writes: std::sync::atomic::AtomicI32,
    /// Make the next `read_at` fail with this errno (0: don't).
    pub fail_reads: std::sync::atomic::AtomicI32,
    hold: Mutex<Hold>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct Hold {
    armed: bool,
    entered: bool,
    released: bool,
}

impl Counts {
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    pub fn flushes(&self) -> u64 {
        self.flushes.load(Ordering::SeqCst)
    }

    /// The next FLUSH blocks inside the backend until [`Counts::release`]:
    /// a slow request that keeps one worker busy.
    pub fn hold_next_flush(&self) {
        *self.hold.lock().unwrap() = Hold {
            armed: true,
            ..Hold::default()
        };
    }

    /// Waits until the held FLUSH has started.
    pub fn wait_held(&self) {
        let g = self.hold.lock().unwrap();
        let (g, t) = self
            .cv
            .wait_timeout_while(g, PATIENCE, |h| !h.entered)
            .unwrap();
        assert!(!t.timed_out() && g.entered, "the held FLUSH never started");
    }

    /// Lets the held FLUSH finish.
    pub fn release(&self) {
        self.hold.lock().unwrap().released = true;
        self.cv.notify_all();
    }

    fn maybe_hold(&self) {
        let mut g = self.hold.lock().unwrap();
        if !g.armed {
            return;
        }
        g.armed = false;
        g.entered = true;
        self.cv.notify_all();
        let (mut g, _) = self
            .cv
            .wait_timeout_while(g, PATIENCE, |h| !h.released)
            .unwrap();
        g.entered = false;
    }
}

/// A real [`Backend`] that counts what it executes.
#[derive(Debug)]
pub struct Probe {
    inner: Backend,
    counts: Arc<Counts>,
}

impl Storage for Probe {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn path(&self) -> &Path {
        self.inner.path()
    }
    fn read_only(&self) -> bool {
        self.inner.read_only()
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        match self.counts.fail_reads.swap(0, Ordering::SeqCst) {
            0 => self.inner.read_at(buf, off),
            e => Err(io::Error::from_raw_os_error(e)),
        }
    }
    fn write_at(&self, buf: &[u8], off: u64, fua: bool) -> io::Result<()> {
        self.counts.writes.fetch_add(1, Ordering::SeqCst);
        if fua {
            self.counts.fua_writes.fetch_add(1, Ordering::SeqCst);
        }
        match self.counts.fail_writes.swap(0, Ordering::SeqCst) {
            0 => self.inner.write_at(buf, off, fua),
            e => Err(io::Error::from_raw_os_error(e)),
        }
    }
    fn flush(&self) -> io::Result<()> {
        self.counts.maybe_hold();
        self.counts.flushes.fetch_add(1, Ordering::SeqCst);
        self.inner.flush()
    }
    fn trim(&self, off: u64, len: u64) -> io::Result<()> {
        self.counts.trims.fetch_add(1, Ordering::SeqCst);
        self.inner.trim(off, len)
    }
    fn write_zeroes(&self, off: u64, len: u64, may_trim: bool) -> io::Result<()> {
        self.counts.zeroes.fetch_add(1, Ordering::SeqCst);
        self.inner.write_zeroes(off, len, may_trim)
    }
    fn extents(&self, off: u64, len: u64, max: usize) -> io::Result<Vec<Run>> {
        self.inner.extents(off, len, max)
    }
    fn cache(&self, off: u64, len: u64) -> io::Result<()> {
        self.counts.caches.fetch_add(1, Ordering::SeqCst);
        self.inner.cache(off, len)
    }
    fn write_zeroes_fast(&self, off: u64, len: u64, may_trim: bool) -> io::Result<()> {
        self.counts.zeroes.fetch_add(1, Ordering::SeqCst);
        if self.counts.slow_zeroes.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        }
        self.inner.write_zeroes_fast(off, len, may_trim)
    }
}

/// An export named `name` over `file`, with its counters.
pub fn probed_export(name: &str, file: &TempFile, read_only: bool) -> (Arc<Export>, Arc<Counts>) {
    let counts = Arc::new(Counts::default());
    let probe = Probe {
        inner: Backend::open(file.path(), read_only, true).unwrap(),
        counts: counts.clone(),
    };
    let export = Export::with_storage(name, &format!("{name} for tests"), Box::new(probe));
    (Arc::new(export), counts)
}

/// A connected socket pair whose ends give up after [`PATIENCE`].
pub fn pair() -> (UnixStream, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    for s in [&a, &b] {
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        s.set_write_timeout(Some(PATIENCE)).unwrap();
    }
    (a, b)
}

/// Waits until the peer has read everything sent on `s` (its send queue is
/// empty), so requests sent are known to be in the server's hands.
pub fn wait_consumed(s: &UnixStream) {
    let start = Instant::now();
    loop {
        let mut queued: libc::c_int = 0;
        // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int through the pointer.
        let r = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
        assert_eq!(r, 0, "SIOCOUTQ: {}", io::Error::last_os_error());
        if queued == 0 {
            return;
        }
        assert!(start.elapsed() < PATIENCE, "the server stopped reading");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// Sends one transmission request (and its payload).
pub fn send_request(s: &mut impl Write, req: Request, payload: &[u8]) {
    let mut b = req.encode().to_vec();
    b.extend_from_slice(payload);
    s.write_all(&b).unwrap();
}

/// Reads one simple reply header.
pub fn read_reply(s: &mut impl Read) -> SimpleReply {
    let mut b = [0u8; SimpleReply::LEN];
    s.read_exact(&mut b).unwrap();
    SimpleReply::decode(&b).unwrap()
}

/// Reads what is left until the peer closes.
pub fn read_rest(s: &mut impl Read) -> Vec<u8> {
    let mut v = Vec::new();
    s.read_to_end(&mut v).unwrap();
    v
}

/// Sends one option request.
pub fn send_option(s: &mut impl Write, option: u32, payload: &[u8]) {
    let mut b = OptionHeader {
        option,
        length: payload.len() as u32,
    }
    .encode()
    .to_vec();
    b.extend_from_slice(payload);
    s.write_all(&b).unwrap();
    s.flush().unwrap();
}

/// Reads one option reply: header and payload.
pub fn read_option_reply(s: &mut impl Read) -> (OptionReplyHeader, Vec<u8>) {
    let mut b = [0u8; OptionReplyHeader::LEN];
    s.read_exact(&mut b).unwrap();
    let h = OptionReplyHeader::decode(&b).unwrap();
    let mut payload = vec![0u8; h.length as usize];
    s.read_exact(&mut payload).unwrap();
    (h, payload)
}
