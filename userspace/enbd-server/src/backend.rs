//! Storage behind an export: a regular file or a block device.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

/// What transmission needs from an export's storage. [`Backend`] is the real
/// one; tests wrap it to count or hold operations.
pub trait Storage: Send + Sync + std::fmt::Debug {
    /// Size in bytes, fixed when the export was opened.
    fn size(&self) -> u64;
    /// Where the data lives, for logs.
    fn path(&self) -> &Path;
    fn read_only(&self) -> bool;
    /// Fills `buf` from offset `off`; a short read (the file shrank) is an
    /// error, so the request fails rather than the connection.
    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()>;
    /// Writes `buf` at `off`; with `fua` it is durable on return
    /// (`RWF_DSYNC` on this range, not a flush of the whole file).
    fn write_at(&self, buf: &[u8], off: u64, fua: bool) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Discards a range; a hint, so "not supported" is success.
    fn trim(&self, off: u64, len: u64) -> io::Result<()>;
    /// Writes zeroes to a range, punching a hole when `may_trim` allows it.
    fn write_zeroes(&self, off: u64, len: u64, may_trim: bool) -> io::Result<()>;

    /// Splits `off..off + len` into runs of data and holes, in order and
    /// at most `max` of them: they cover the start of the range, maybe not
    /// all of it. A hole is a region the storage says reads as zeroes
    /// without being allocated. The default knows of no holes.
    fn extents(&self, off: u64, len: u64, max: usize) -> io::Result<Vec<Run>> {
        let _ = (off, max);
        Ok(vec![Run { len, hole: false }])
    }

    /// Starts reading a range into the page cache; a hint, so the default
    /// does nothing.
    fn cache(&self, off: u64, len: u64) -> io::Result<()> {
        let _ = (off, len);
        Ok(())
    }

    /// Zeroes a range only if that is fast (no data written), like
    /// [`Storage::write_zeroes`] otherwise; fails with `EOPNOTSUPP` having
    /// changed nothing when it cannot be. The default never can.
    fn write_zeroes_fast(&self, off: u64, len: u64, may_trim: bool) -> io::Result<()> {
        let _ = (off, len, may_trim);
        Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
    }

    /// A line of counters to log when a client disconnects (the caching
    /// proxy's upstream and cache bytes); none by default.
    fn report(&self) -> Option<String> {
        None
    }

    /// The block checksums every read is checked against (an export with
    /// `crc`), which its `NAME.crc` export serves; none by default.
    fn sums(&self) -> Option<&crate::checksum::Sums> {
        None
    }
}

/// A run of bytes with one allocation status (see [`Storage::extents`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub len: u64,
    /// Unallocated, reading as zeroes.
    pub hole: bool,
}

/// An export's storage: a regular file or a block device.
#[derive(Debug)]
pub struct Backend {
    file: File,
    path: PathBuf,
    size: u64,
    block_device: bool,
    read_only: bool,
}

// From <linux/fs.h>.
const BLKDISCARD: libc::c_ulong = 0x1277;
const BLKZEROOUT: libc::c_ulong = 0x127f;

impl Backend {
    /// Opens `path` (read-only if `read_only`), checking it is a regular file
    /// or a block device, and locks it unless `shared` (see [`lock_image`]).
    pub fn open(path: &Path, read_only: bool, shared: bool) -> anyhow::Result<Self> {
        use anyhow::Context;
        let ft = std::fs::metadata(path)
            .with_context(|| format!("cannot open {}", path.display()))?
            .file_type();
        let block_device = ft.is_block_device();
        if !ft.is_file() && !block_device {
            anyhow::bail!(
                "{} is neither a regular file nor a block device",
                path.display()
            );
        }
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        if !shared {
            lock_image(&file, read_only)
                .with_context(|| format!("cannot serve {}", path.display()))?;
        }
        // Works for both kinds; a block device's metadata length is 0.
        let size = {
            use std::io::Seek;
            let mut f = &file;
            f.seek(io::SeekFrom::End(0))?
        };
        Ok(Self {
            file,
            path: path.to_owned(),
            size,
            block_device,
            read_only,
        })
    }

    fn range_ioctl(&self, req: libc::c_ulong, off: u64, len: u64) -> io::Result<()> {
        let range = [off, len];
        // SAFETY: BLKDISCARD and BLKZEROOUT read two u64s from the pointer.
        let r = unsafe { libc::ioctl(self.file.as_raw_fd(), req, range.as_ptr()) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// `lseek(2)` with `SEEK_DATA` or `SEEK_HOLE`; `None` when there is no
    /// data from `off` on (`ENXIO`).
    fn seek(&self, off: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        let o =
            libc::off_t::try_from(off).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: plain syscall on our descriptor. The file offset it moves
        // is unused: all I/O here is positioned (pread/pwrite).
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), o, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        }
    }

    fn fallocate(&self, mode: libc::c_int, off: u64, len: u64) -> io::Result<()> {
        let (o, l) = (off as libc::off_t, len as libc::off_t);
        // SAFETY: plain syscall on our descriptor.
        let r = unsafe { libc::fallocate(self.file.as_raw_fd(), mode, o, l) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    /// Deallocates a range of a file, which then reads as zeroes.
    fn punch_hole(&self, off: u64, len: u64) -> io::Result<()> {
        self.fallocate(
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            off,
            len,
        )
    }
}

/// Another process holds a conflicting lock on the image.
#[derive(Debug, thiserror::Error)]
#[error(
    "it is in use: another process (another enbd-server, qemu, ...) holds a {held} lock \
     on it; add ',shared' to the export to serve it anyway"
)]
pub struct ImageLocked {
    held: &'static str,
}

/// Takes an open-file-description lock on the whole image: shared when
/// serving read-only, exclusive when writing, so two writers (or a writer
/// and a reader) cannot serve one image and corrupt it. The lock lives as
/// long as the descriptor; qemu takes the same kind of lock on its images.
pub(crate) fn lock_image(file: &File, read_only: bool) -> anyhow::Result<()> {
    // SAFETY: an all-zero `flock` is a valid value (a lock on the whole
    // file from offset 0); the fields that matter are set below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = if read_only {
        libc::F_RDLCK
    } else {
        libc::F_WRLCK
    } as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    // SAFETY: `fl` is a valid flock for F_OFD_SETLK on our descriptor.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &fl) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if !matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) {
        return Err(anyhow::Error::new(e).context("cannot lock it"));
    }
    // Which lock is in the way, for the message.
    // SAFETY: as above; F_OFD_GETLK fills `fl` with the conflicting lock.
    let held = if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) } == 0
        && fl.l_type == libc::F_RDLCK as libc::c_short
    {
        "read"
    } else {
        "write"
    };
    Err(ImageLocked { held }.into())
}

impl Storage for Backend {
    fn size(&self) -> u64 {
        self.size
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, off)
    }

    fn write_at(&self, mut buf: &[u8], mut off: u64, fua: bool) -> io::Result<()> {
        if !fua {
            return self.file.write_all_at(buf, off);
        }
        while !buf.is_empty() {
            let iov = libc::iovec {
                iov_base: buf.as_ptr().cast_mut().cast(),
                iov_len: buf.len(),
            };
            // SAFETY: `iov` describes `buf`, valid for reads for the call;
            // pwritev2 only reads from it.
            let n = unsafe {
                libc::pwritev2(
                    self.file.as_raw_fd(),
                    &iov,
                    1,
                    off as libc::off_t,
                    libc::RWF_DSYNC,
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    // A kernel or file system without RWF_DSYNC: the same
                    // guarantee the slow way.
                    Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) => {
                        self.file.write_all_at(buf, off)?;
                        return self.file.sync_data();
                    }
                    _ => return Err(e),
                }
            }
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            buf = &buf[n as usize..];
            off += n as u64;
        }
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn trim(&self, off: u64, len: u64) -> io::Result<()> {
        let r = if self.block_device {
            self.range_ioctl(BLKDISCARD, off, len)
        } else {
            self.punch_hole(off, len)
        };
        match r {
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY)
                ) =>
            {
                Ok(())
            }
            r => r,
        }
    }

    fn write_zeroes(&self, off: u64, len: u64, may_trim: bool) -> io::Result<()> {
        let fast = if self.block_device {
            self.range_ioctl(BLKZEROOUT, off, len)
        } else if may_trim {
            self.punch_hole(off, len)
        } else {
            self.fallocate(libc::FALLOC_FL_ZERO_RANGE, off, len)
        };
        match fast {
            Ok(()) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::EINVAL)
                ) =>
            {
                let zeroes = vec![0u8; len.min(1 << 20) as usize];
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(zeroes.len() as u64) as usize;
                    self.write_at(&zeroes[..n], off + done, false)?;
                    done += n as u64;
                }
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// Data and holes from `SEEK_DATA`/`SEEK_HOLE` on a regular file; a
    /// block device has no holes to tell.
    fn extents(&self, off: u64, len: u64, max: usize) -> io::Result<Vec<Run>> {
        let end = off.saturating_add(len);
        if self.block_device {
            return Ok(vec![Run { len, hole: false }]);
        }
        let mut runs: Vec<Run> = Vec::new();
        let mut pos = off;
        while pos < end && runs.len() < max.max(1) {
            // Past the last data (or past the end of a file that shrank)
            // everything reads as zeroes.
            let data = self.seek(pos, libc::SEEK_DATA)?.unwrap_or(end).min(end);
            let (next, hole) = if data > pos {
                (data, true)
            } else {
                // Every file ends with an implicit hole, so there is one.
                let h = self.seek(pos, libc::SEEK_HOLE)?.unwrap_or(end).min(end);
                (h, false)
            };
            if next <= pos {
                // The file changed under the two seeks; stop here rather
                // than loop: fewer runs than the range is allowed.
                break;
            }
            runs.push(Run {
                len: next - pos,
                hole,
            });
            pos = next;
        }
        if runs.is_empty() && len > 0 {
            runs.push(Run { len, hole: false });
        }
        Ok(runs)
    }

    fn cache(&self, off: u64, len: u64) -> io::Result<()> {
        let (o, l) = (off as libc::off_t, len as libc::off_t);
        // SAFETY: plain syscall on our descriptor; it only reads the file.
        match unsafe { libc::posix_fadvise(self.file.as_raw_fd(), o, l, libc::POSIX_FADV_WILLNEED) }
        {
            0 => Ok(()),
            e => Err(io::Error::from_raw_os_error(e)),
        }
    }

    /// Fast means the file system or device drops or zeroes the blocks
    /// without writing data: a hole punch (or `FALLOC_FL_ZERO_RANGE` when
    /// holes are not allowed) on a file; on a block device a punch, which
    /// the kernel turns into a write-zeroes command without fallback
    /// (`BLKDEV_ZERO_NOFALLBACK`), and nothing when holes are not allowed,
    /// since the device may unmap.
    fn write_zeroes_fast(&self, off: u64, len: u64, may_trim: bool) -> io::Result<()> {
        let r = if may_trim {
            self.punch_hole(off, len)
        } else if self.block_device {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        } else {
            self.fallocate(
                libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                off,
                len,
            )
        };
        match r {
            // Not supported here, or (EINVAL) not for this alignment: the
            // slow way would be needed, which is what the client refused.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::EINVAL)
                ) =>
            {
                Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
            }
            r => r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(len: usize) -> (PathBuf, Backend) {
        let p = std::env::temp_dir().join(format!("enbd-backend-{}-{}", std::process::id(), len));
        std::fs::write(&p, vec![0xabu8; len]).unwrap();
        let b = Backend::open(&p, false, false).unwrap();
        (p, b)
    }

    #[test]
    fn read_write_zero_trim() {
        let (p, b) = temp(1 << 16);
        assert_eq!(b.size(), 1 << 16);
        b.write_at(&[1, 2, 3], 100, false).unwrap();
        let mut buf = [0u8; 4];
        b.read_at(&mut buf, 99).unwrap();
        assert_eq!(buf, [0xab, 1, 2, 3]);
        b.write_zeroes(0, 8192, false).unwrap();
        b.read_at(&mut buf, 100).unwrap();
        assert_eq!(buf, [0; 4]);
        b.write_at(&[9; 4], 8192, true).unwrap();
        b.read_at(&mut buf, 8192).unwrap();
        assert_eq!(buf, [9; 4], "a FUA write lands like any other");
        b.trim(8192, 4096).unwrap();
        b.flush().unwrap();
        assert!(
            b.read_at(&mut buf, (1 << 16) - 2).is_err(),
            "read past the end"
        );
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn extents_follow_seek_data_and_seek_hole() {
        let p = std::env::temp_dir().join(format!("enbd-backend-sparse-{}", std::process::id()));
        let f = File::create(&p).unwrap();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(&[7; 4096], 65536).unwrap();
        drop(f);
        let b = Backend::open(&p, false, false).unwrap();
        let run = |len, hole| Run { len, hole };
        assert_eq!(
            b.extents(0, 1 << 20, 100).unwrap(),
            [
                run(65536, true),
                run(4096, false),
                run((1 << 20) - 69632, true)
            ]
        );
        // From inside the data, clamped to the range, bounded in count.
        assert_eq!(b.extents(65536 + 100, 10, 100).unwrap(), [run(10, false)]);
        assert_eq!(b.extents(0, 1 << 20, 2).unwrap().len(), 2);
        assert_eq!(b.extents(4096, 4096, 1).unwrap(), [run(4096, true)]);
        // Past the end of a file that shrank: zeroes, not an error.
        assert_eq!(b.extents(1 << 21, 512, 4).unwrap(), [run(512, true)]);
        b.cache(0, 1 << 20).unwrap();
        // A punch is fast here; the data goes, the neighbours stay.
        b.write_zeroes_fast(65536, 2048, true).unwrap();
        let mut buf = [1u8; 4096];
        b.read_at(&mut buf, 65536).unwrap();
        assert_eq!(buf[..2048], [0; 2048]);
        assert_eq!(buf[2048..], [7; 2048]);
        drop(b);
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn an_image_in_use_is_refused_unless_shared() {
        let (p, writer) = temp(4096);
        let e = format!("{:#}", Backend::open(&p, false, false).unwrap_err());
        assert!(
            e.contains("in use") && e.contains("write lock") && e.contains(",shared"),
            "{e}"
        );
        let e = format!("{:#}", Backend::open(&p, true, false).unwrap_err());
        assert!(e.contains("in use"), "a reader next to a writer: {e}");
        Backend::open(&p, false, true).expect("shared overrides the lock");
        drop(writer);
        // Readers share; a writer is kept out while one reads.
        let r1 = Backend::open(&p, true, false).unwrap();
        let _r2 = Backend::open(&p, true, false).expect("two readers");
        let e = format!("{:#}", Backend::open(&p, false, false).unwrap_err());
        assert!(e.contains("read lock"), "{e}");
        drop((r1, _r2));
        Backend::open(&p, false, false).expect("the lock ends with its holder");
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn refuses_directories_and_missing_files() {
        let e = Backend::open(Path::new("/"), true, false)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("neither a regular file nor a block device"),
            "{e}"
        );
        let e = Backend::open(Path::new("/nonexistent/x"), true, false).unwrap_err();
        assert!(format!("{e:#}").contains("No such file"), "{e:#}");
    }
}
