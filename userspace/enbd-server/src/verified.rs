//! Serving an image with its block checksums (`,crc`): a [`Storage`] that
//! checks each block against the sidecar (`checksum.rs`) the first time any
//! byte of it is read, never serves a block that fails, and re-checks
//! everything in a slow background scrub.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tracing::{error, info, warn};

use crate::backend::{Run, Storage};
use crate::checksum::{block_crc, Sums, CHUNK};

/// Bytes per second the scrub reads, so it leaves the disk to clients.
pub const SCRUB_RATE: u64 = 32 << 20;
/// Locks that serialize first checks: one block maps to one of them, so two
/// first reads of a block check it once, and reads of other blocks mostly
/// do not wait.
const LOCKS: usize = 64;
/// At most one "refused read" summary per export this often.
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

const UNCHECKED: u8 = 0;
const GOOD: u8 = 1;
const BAD: u8 = 2;

/// An image served with checksums; see the module's doc.
#[derive(Debug)]
pub struct Verified(Arc<Checked>);

#[derive(Debug)]
struct Checked {
    inner: Box<dyn Storage>,
    sums: Sums,
    sidecar: PathBuf,
    /// One of UNCHECKED, GOOD, BAD per block. BAD is final.
    state: Vec<AtomicU8>,
    locks: Vec<Mutex<()>>,
    /// Blocks read and summed, by first reads and the scrub (for tests).
    checks: AtomicU64,
    /// Reads refused since the last summary line, and when that was.
    refused: Mutex<(u64, Option<Instant>)>,
}

fn bad_block() -> io::Error {
    io::Error::from_raw_os_error(libc::EIO)
}

impl Verified {
    /// Wraps read-only `inner` with the checksums in `sidecar`, whose
    /// header must match it. With `scrub`, every block is checked again
    /// that often, reading at most `rate` bytes a second.
    pub fn open(
        inner: Box<dyn Storage>,
        sidecar: &Path,
        scrub: Option<Duration>,
        rate: u64,
    ) -> Result<Self> {
        if !inner.read_only() {
            bail!("checksums need a read-only export (add ',ro'): a write would invalidate them");
        }
        let sums = Sums::load(sidecar)?;
        if sums.image_size() != inner.size() {
            bail!(
                "checksum file {} is for an image of {} bytes, {} is {} bytes: \
                 run `enbd-server checksum` again",
                sidecar.display(),
                sums.image_size(),
                inner.path().display(),
                inner.size()
            );
        }
        let checked = Arc::new(Checked {
            state: (0..sums.blocks())
                .map(|_| AtomicU8::new(UNCHECKED))
                .collect(),
            locks: (0..LOCKS).map(|_| Mutex::new(())).collect(),
            inner,
            sums,
            sidecar: sidecar.to_owned(),
            checks: AtomicU64::new(0),
            refused: Mutex::new((0, None)),
        });
        info!(
            image = %checked.inner.path().display(),
            checksums = %sidecar.display(),
            blocks = checked.sums.blocks(),
            scrub_secs = scrub.map_or(0, |d| d.as_secs()),
            "block checksums loaded; each block is checked when first read"
        );
        if let Some(every) = scrub.filter(|d| !d.is_zero()) {
            let weak = Arc::downgrade(&checked);
            std::thread::Builder::new()
                .name("enbd-scrub".into())
                .spawn(move || scrub_loop(weak, every, rate))
                .context("cannot start the scrub thread")?;
        }
        Ok(Self(checked))
    }

    /// Blocks summed so far.
    #[cfg(test)]
    fn checks(&self) -> u64 {
        self.0.checks.load(Ordering::Relaxed)
    }
}

impl Checked {
    fn lock(&self, block: usize) -> std::sync::MutexGuard<'_, ()> {
        self.locks[block % LOCKS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Sums block `i` and records the verdict; `Ok(false)` if it is bad.
    /// The caller holds the block's lock. A read error is no verdict: it
    /// may pass, and the block is left as it was.
    fn check(&self, i: usize, chunk: &mut [u8], by: &str) -> io::Result<bool> {
        let range = self.sums.range(i);
        let crc = block_crc(&*self.inner, range.clone(), chunk)?;
        self.checks.fetch_add(1, Ordering::Relaxed);
        if Some(crc) == self.sums.get(i) {
            // Never undo a BAD: a block once bad stays refused.
            let _ = self.state[i].compare_exchange(
                UNCHECKED,
                GOOD,
                Ordering::AcqRel,
                Ordering::Acquire,
            );
            return Ok(true);
        }
        self.state[i].store(BAD, Ordering::Release);
        error!(
            image = %self.inner.path().display(),
            checksums = %self.sidecar.display(),
            "checksum mismatch ({by}): block {i} (bytes {}..{}) of {} sums to {crc:#010x}, \
             {:#010x} expected; reads of it fail with EIO from now on",
            range.start,
            range.end,
            self.inner.path().display(),
            self.sums.get(i).unwrap_or_default(),
        );
        Ok(false)
    }

    /// Makes sure block `i` was found good, checking it if no one has.
    fn ensure(&self, i: usize, chunk: &mut Option<Vec<u8>>) -> io::Result<()> {
        let state = self.state.get(i).ok_or_else(bad_block)?;
        match state.load(Ordering::Acquire) {
            GOOD => return Ok(()),
            BAD => return Err(self.refuse()),
            _ => {}
        }
        let _g = self.lock(i);
        // Another reader may have checked it while this one waited.
        match state.load(Ordering::Acquire) {
            GOOD => return Ok(()),
            BAD => return Err(self.refuse()),
            _ => {}
        }
        let chunk = chunk.get_or_insert_with(|| vec![0u8; CHUNK]);
        if self.check(i, chunk, "first read")? {
            Ok(())
        } else {
            Err(bad_block())
        }
    }

    /// Counts a read refused for a known bad block, logging a summary at
    /// most every [`REFUSAL_LOG_EVERY`]; the EIO to return.
    fn refuse(&self) -> io::Error {
        let mut r = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        r.0 += 1;
        if r.1.is_none_or(|t| t.elapsed() >= REFUSAL_LOG_EVERY) {
            warn!(
                image = %self.inner.path().display(),
                "{} read(s) of blocks that failed their checksum refused with EIO",
                r.0
            );
            *r = (0, Some(Instant::now()));
        }
        bad_block()
    }
}

/// Every `every`, checks each block again (but those already bad) at
/// `rate` bytes a second; ends when the export is closed.
fn scrub_loop(export: Weak<Checked>, every: Duration, rate: u64) {
    let mut chunk = vec![0u8; CHUNK];
    let tick = Duration::from_millis(200).min(every);
    loop {
        let due = Instant::now() + every;
        while Instant::now() < due {
            if export.strong_count() == 0 {
                return;
            }
            std::thread::sleep(tick);
        }
        let start = Instant::now();
        let (mut bytes, mut bad) = (0u64, 0usize);
        for i in 0.. {
            let Some(c) = export.upgrade() else { return };
            let Some(state) = c.state.get(i) else {
                info!(
                    image = %c.inner.path().display(),
                    "scrub done: {i} blocks, {bad} bad, in {:.1} s",
                    start.elapsed().as_secs_f64()
                );
                break;
            };
            if state.load(Ordering::Acquire) == BAD {
                bad += 1;
                continue;
            }
            let verdict = {
                let _g = c.lock(i);
                c.check(i, &mut chunk, "scrub")
            };
            match verdict {
                Ok(true) => {}
                Ok(false) => bad += 1,
                Err(e) => warn!(
                    image = %c.inner.path().display(),
                    "scrub: cannot read block {i}: {e}"
                ),
            }
            bytes += c.sums.range(i).end - c.sums.range(i).start;
            drop(c);
            // Paces the reads: `bytes` should have taken this long.
            let target = Duration::from_secs_f64(bytes as f64 / rate.max(1) as f64);
            if let Some(wait) = target.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
}

impl Storage for Verified {
    fn size(&self) -> u64 {
        self.0.inner.size()
    }

    fn sums(&self) -> Option<&Sums> {
        Some(&self.0.sums)
    }

    fn path(&self) -> &Path {
        self.0.inner.path()
    }

    fn read_only(&self) -> bool {
        self.0.inner.read_only()
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        if !buf.is_empty() {
            let bs = self.0.sums.block_size();
            let last = off
                .checked_add(buf.len() as u64 - 1)
                .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
            let mut chunk = None;
            for i in off / bs..=last / bs {
                // Past the sums: the read fails below anyway.
                let i = usize::try_from(i).map_err(|_| bad_block())?;
                self.0.ensure(i, &mut chunk)?;
            }
        }
        self.0.inner.read_at(buf, off)
    }

    fn write_at(&self, buf: &[u8], off: u64, fua: bool) -> io::Result<()> {
        self.0.inner.write_at(buf, off, fua)
    }

    fn flush(&self) -> io::Result<()> {
        self.0.inner.flush()
    }

    fn trim(&self, off: u64, len: u64) -> io::Result<()> {
        self.0.inner.trim(off, len)
    }

    fn write_zeroes(&self, off: u64, len: u64, may_trim: bool) -> io::Result<()> {
        self.0.inner.write_zeroes(off, len, may_trim)
    }

    fn extents(&self, off: u64, len: u64, max: usize) -> io::Result<Vec<Run>> {
        self.0.inner.extents(off, len, max)
    }

    fn cache(&self, off: u64, len: u64) -> io::Result<()> {
        self.0.inner.cache(off, len)
    }

    fn write_zeroes_fast(&self, off: u64, len: u64, may_trim: bool) -> io::Result<()> {
        self.0.inner.write_zeroes_fast(off, len, may_trim)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;
    use std::sync::Barrier;

    use super::*;
    use crate::backend::Backend;
    use crate::checksum::default_path;
    use crate::export::{Export, ExportSpec};
    use crate::testutil::{TempFile, PATIENCE};

    const BS: u64 = 64 << 10;
    /// Four whole blocks and a short fifth.
    const LEN: usize = 4 * BS as usize + 1000;

    /// An image of varied bytes and its sidecar (`IMAGE.crc`, removed with
    /// the returned guard).
    struct Image {
        file: TempFile,
        _crc: TempFile,
    }

    impl Image {
        fn new() -> Self {
            let file = TempFile::new(0, 0);
            let data: Vec<u8> = (0..LEN).map(|i| (i * 13 + i / 509) as u8).collect();
            std::fs::write(file.path(), data).unwrap();
            let b = Backend::open(file.path(), true, true).unwrap();
            let sums = Sums::compute(&b, BS, |_, _| {}).unwrap();
            let crc = TempFile::new(0, 0);
            sums.store(crc.path()).unwrap();
            Self { file, _crc: crc }
        }

        fn crc(&self) -> &Path {
            self._crc.path()
        }

        fn flip(&self, off: u64) {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(self.file.path())
                .unwrap();
            let mut b = [0u8];
            f.read_exact_at(&mut b, off).unwrap();
            f.write_all_at(&[b[0] ^ 0x40], off).unwrap();
        }

        fn open_with(&self, inner: Box<dyn Storage>, scrub: Option<Duration>) -> Verified {
            Verified::open(inner, self.crc(), scrub, 1 << 30).unwrap()
        }

        fn open(&self) -> Verified {
            let b = Backend::open(self.file.path(), true, true).unwrap();
            self.open_with(Box::new(b), None)
        }
    }

    fn read(v: &Verified, off: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        v.read_at(&mut buf, off).map(|()| buf)
    }

    #[test]
    fn each_block_is_checked_once_on_first_read() {
        let img = Image::new();
        let v = img.open();
        assert_eq!(v.checks(), 0);
        assert_eq!(read(&v, BS + 10, 100).unwrap(), img.file.read(BS + 10, 100));
        assert_eq!(v.checks(), 1);
        read(&v, BS, BS as usize).unwrap();
        read(&v, 2 * BS - 1, 1).unwrap();
        assert_eq!(v.checks(), 1);
        // Spans blocks 1 to 3: two new ones.
        read(&v, BS + 5, 2 * BS as usize).unwrap();
        assert_eq!(v.checks(), 3);
        // The short last block.
        let last = 4 * BS;
        assert_eq!(read(&v, last, 1000).unwrap(), img.file.read(last, 1000));
        assert_eq!(v.checks(), 4);
    }

    #[test]
    fn a_flipped_byte_fails_reads_of_its_block_only() {
        let img = Image::new();
        img.flip(2 * BS + 777);
        let v = img.open();
        for (off, len) in [
            (2 * BS, 4096),
            (2 * BS + 777, 1),
            (3 * BS - 1, 1),
            (BS, 2 * BS),
        ] {
            let e = read(&v, off, len as usize).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EIO), "read at {off}+{len}");
        }
        // Checked once: known bad from then on.
        assert_eq!(v.checks(), 2);
        for off in [0, BS, 3 * BS, 4 * BS] {
            assert_eq!(read(&v, off, 1000).unwrap(), img.file.read(off, 1000));
        }
        // Even put right, a block once bad stays refused.
        img.flip(2 * BS + 777);
        assert!(read(&v, 2 * BS, 1).is_err());
    }

    #[test]
    fn a_flipped_byte_in_the_short_last_block_is_caught() {
        let img = Image::new();
        img.flip(LEN as u64 - 1);
        let v = img.open();
        assert!(read(&v, 4 * BS, 1).is_err());
        assert!(read(&v, 3 * BS, 1).is_ok());
    }

    #[test]
    fn reads_past_the_end_fail_without_panic() {
        let img = Image::new();
        let v = img.open();
        assert!(read(&v, LEN as u64 - 10, 20).is_err());
        assert!(read(&v, 100 * BS, 1).is_err());
        assert!(read(&v, u64::MAX - 1, 8).is_err());
        assert!(read(&v, 0, 0).is_ok());
    }

    /// A storage whose reads take a while, so concurrent ones overlap.
    #[derive(Debug)]
    struct Slow(Backend);

    impl Storage for Slow {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn path(&self) -> &Path {
            self.0.path()
        }
        fn read_only(&self) -> bool {
            true
        }
        fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
            std::thread::sleep(Duration::from_millis(30));
            self.0.read_at(buf, off)
        }
        fn write_at(&self, _: &[u8], _: u64, _: bool) -> io::Result<()> {
            unreachable!()
        }
        fn flush(&self) -> io::Result<()> {
            Ok(())
        }
        fn trim(&self, _: u64, _: u64) -> io::Result<()> {
            Ok(())
        }
        fn write_zeroes(&self, _: u64, _: u64, _: bool) -> io::Result<()> {
            unreachable!()
        }
    }

    #[test]
    fn concurrent_first_reads_check_a_block_once() {
        let img = Image::new();
        let b = Backend::open(img.file.path(), true, true).unwrap();
        let v = img.open_with(Box::new(Slow(b)), None);
        let go = Barrier::new(8);
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let (v, go, img) = (&v, &go, &img);
                s.spawn(move || {
                    go.wait();
                    let off = BS + t * 100;
                    assert_eq!(read(v, off, 50).unwrap(), img.file.read(off, 50));
                });
            }
        });
        assert_eq!(v.checks(), 1);
    }

    #[test]
    fn the_scrub_finds_later_corruption() {
        let img = Image::new();
        let b = Backend::open(img.file.path(), true, true).unwrap();
        let v = img.open_with(Box::new(b), Some(Duration::from_millis(50)));
        read(&v, BS, 10).unwrap();
        img.flip(BS + 5);
        // Block 1 is known good, so only the scrub can find it out.
        let start = Instant::now();
        while read(&v, BS, 10).is_ok() {
            assert!(start.elapsed() < PATIENCE, "the scrub never found block 1");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(read(&v, 0, 10).is_ok());
        assert!(read(&v, 2 * BS, 10).is_ok());
    }

    #[test]
    fn the_scrub_stops_with_its_export() {
        let img = Image::new();
        let b = Backend::open(img.file.path(), true, true).unwrap();
        let v = img.open_with(Box::new(b), Some(Duration::from_millis(10)));
        let weak = Arc::downgrade(&v.0);
        drop(v);
        // The scrub holds the export only while it checks a block.
        let start = Instant::now();
        while weak.strong_count() > 0 {
            assert!(start.elapsed() < PATIENCE);
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn a_mismatched_or_corrupt_sidecar_is_refused() {
        let img = Image::new();
        let open = || Backend::open(img.file.path(), true, true).unwrap();
        // Another image's size.
        let other = TempFile::new(LEN as u64 + 1, 1);
        let sums = Sums::compute(
            &Backend::open(other.path(), true, true).unwrap(),
            BS,
            |_, _| {},
        )
        .unwrap();
        sums.store(img.crc()).unwrap();
        let e = Verified::open(Box::new(open()), img.crc(), None, 1).unwrap_err();
        assert!(format!("{e:#}").contains("for an image of"), "{e:#}");
        // One byte of the list flipped.
        let mut b = Sums::compute(&open(), BS, |_, _| {}).unwrap().encode();
        b[41] ^= 1;
        std::fs::write(img.crc(), &b).unwrap();
        let e = Verified::open(Box::new(open()), img.crc(), None, 1).unwrap_err();
        assert!(format!("{e:#}").contains("corrupt"), "{e:#}");
        // No sidecar.
        let e = Verified::open(Box::new(open()), Path::new("/nonexistent.crc"), None, 1);
        assert!(e.is_err());
    }

    #[test]
    fn a_writable_image_is_refused() {
        let img = Image::new();
        let rw = Backend::open(img.file.path(), false, true).unwrap();
        let e = Verified::open(Box::new(rw), img.crc(), None, 1).unwrap_err();
        assert!(format!("{e}").contains("read-only"), "{e}");
    }

    #[test]
    fn over_nbd_a_bad_block_is_an_eio_reply_and_the_connection_goes_on() {
        use enbd_core::wire::{errno, Cmd, Request};
        use std::io::Read;

        use crate::testutil::{pair, read_reply, send_request};
        use crate::transmission::{serve, Negotiated, Resources};

        let img = Image::new();
        img.flip(BS + 1);
        let export = Export::with_storage("d", "", Box::new(img.open()));
        let (mut client, mut server_end) = pair();
        let server = std::thread::spawn(move || {
            let fd = std::os::fd::AsRawFd::as_raw_fd(&server_end);
            serve(
                &mut server_end,
                fd,
                Arc::new(export),
                Negotiated::default(),
                &Resources::new(2),
            )
        });
        let mut read = |cookie: u64, off: u64, len: u32| {
            send_request(
                &mut client,
                Request::new(Cmd::Read, 0, cookie, off, len),
                &[],
            );
            let rep = read_reply(&mut client);
            assert_eq!(rep.cookie, cookie);
            let mut data = vec![0u8; len as usize];
            if rep.error == 0 {
                client.read_exact(&mut data).unwrap();
            }
            (rep.error, data)
        };
        assert_eq!(read(1, BS, 4096).0, errno::EIO);
        assert_eq!(read(2, 0, 4096), (0, img.file.read(0, 4096)));
        assert_eq!(read(3, 2 * BS - 512, 1024).0, errno::EIO);
        assert_eq!(read(4, 2 * BS, 4096), (0, img.file.read(2 * BS, 4096)));
        send_request(&mut client, Request::new(Cmd::Disc, 0, 5, 0, 0), &[]);
        let stats = server.join().unwrap().unwrap();
        assert_eq!(stats.requests, 5);
    }

    #[test]
    fn an_export_with_crc_verifies_its_reads() {
        let img = Image::new();
        img.flip(3 * BS);
        let spec: ExportSpec = format!(
            "d={},ro,crc={},scrub=0",
            img.file.path().display(),
            img.crc().display()
        )
        .parse()
        .unwrap();
        let e = Export::open(&spec).unwrap();
        let mut buf = [0u8; 16];
        e.backend().read_at(&mut buf, 0).unwrap();
        assert!(e.backend().read_at(&mut buf, 3 * BS).is_err());
        // Without the sidecar at its default place, `crc` fails to open.
        let spec: ExportSpec = format!("d={},ro,crc", img.file.path().display())
            .parse()
            .unwrap();
        assert_eq!(spec.crc, Some(default_path(img.file.path())));
        assert!(Export::open(&spec).is_err());
    }
}
