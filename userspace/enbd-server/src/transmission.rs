//! The transmission phase: requests are read in order by the connection's
//! thread and executed by a small pool of workers, so one slow request does
//! not hold up the others. Replies go out under a lock in completion order;
//! read data is sent with `sendfile` straight from the backing file.

use std::io::{self, Read};
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use enbd_core::wire::{cmd_flags, errno, Cmd, Request, SimpleReply};
use tracing::{debug, warn};

use crate::export::{Export, MAX_PAYLOAD};

/// The write side of a connection, shared by the workers.
struct Writer {
    fd: RawFd,
    lock: Mutex<()>,
}

fn send_all(fd: RawFd, mut buf: &[u8], more: bool) -> io::Result<()> {
    let flags = libc::MSG_NOSIGNAL | if more { libc::MSG_MORE } else { 0 };
    while !buf.is_empty() {
        // SAFETY: `buf` is valid for reads of its length; `fd` is the open socket.
        let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), flags) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        buf = &buf[n as usize..];
    }
    Ok(())
}

fn sendfile_all(out: RawFd, file: RawFd, mut off: u64, mut len: u64) -> io::Result<()> {
    while len > 0 {
        let mut o = off as libc::off_t;
        // SAFETY: plain syscall on open descriptors; `o` is a valid offset pointer.
        let n = unsafe { libc::sendfile(out, file, &mut o, len as usize) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "backing file shrank",
            ));
        }
        off += n as u64;
        len -= n as u64;
    }
    Ok(())
}

impl Writer {
    fn reply(&self, cookie: u64, error: u32) -> io::Result<()> {
        let h = SimpleReply { error, cookie }.encode();
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        send_all(self.fd, &h, false)
    }

    fn reply_read(&self, cookie: u64, file: RawFd, off: u64, len: u32) -> io::Result<()> {
        let h = SimpleReply { error: 0, cookie }.encode();
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        send_all(self.fd, &h, len > 0)?;
        // Once the header is out, a failure leaves the stream unusable: the
        // caller closes the connection.
        sendfile_all(self.fd, file, off, u64::from(len))
    }
}

/// A request ready for a worker.
struct Job {
    req: Request,
    cmd: Cmd,
    payload: Vec<u8>,
}

/// Checks a request against the export. `Err` is the NBD error to reply.
fn validate(req: &Request, export: &Export) -> Result<Cmd, u32> {
    let cmd = req.command().ok_or(errno::EINVAL)?;
    let allowed = match cmd {
        Cmd::Write => cmd_flags::FUA,
        Cmd::WriteZeroes => cmd_flags::FUA | cmd_flags::NO_HOLE,
        Cmd::Trim => cmd_flags::FUA,
        _ => 0,
    };
    if req.flags & !allowed != 0 {
        return Err(errno::EINVAL);
    }
    match cmd {
        Cmd::Read | Cmd::Write | Cmd::Trim | Cmd::WriteZeroes => {
            let end = req
                .offset
                .checked_add(u64::from(req.length))
                .ok_or(errno::EINVAL)?;
            if end > export.size() {
                return Err(errno::EINVAL);
            }
            if matches!(cmd, Cmd::Read | Cmd::Write) && req.length > MAX_PAYLOAD {
                return Err(errno::EINVAL);
            }
            if cmd != Cmd::Read && export.backend().read_only() {
                return Err(errno::EPERM);
            }
        }
        Cmd::Flush | Cmd::Disc => {}
        // Not announced (no SEND_CACHE).
        Cmd::Cache => return Err(errno::EINVAL),
    }
    Ok(cmd)
}

fn os_errno(e: &io::Error) -> u32 {
    errno::from_linux(e.raw_os_error().unwrap_or(libc::EIO))
}

/// Executes a job and sends its reply; an error means the connection is broken.
fn execute(job: Job, export: &Export, out: &Writer) -> io::Result<()> {
    let b = export.backend();
    let Request {
        cookie,
        offset,
        length,
        flags,
        ..
    } = job.req;
    let fua = flags & cmd_flags::FUA != 0;
    let result = match job.cmd {
        Cmd::Read => return out.reply_read(cookie, b.fd(), offset, length),
        Cmd::Write => b.write_at(&job.payload, offset),
        Cmd::Flush => b.flush(),
        Cmd::Trim => b.trim(offset, u64::from(length)),
        Cmd::WriteZeroes => {
            b.write_zeroes(offset, u64::from(length), flags & cmd_flags::NO_HOLE == 0)
        }
        Cmd::Disc | Cmd::Cache => Ok(()),
    };
    let result = result.and_then(|()| if fua { b.flush() } else { Ok(()) });
    let error = match result {
        Ok(()) => 0,
        Err(e) => {
            warn!(
                export = export.name(),
                "{} at {offset}+{length}: {e}",
                job.cmd.name()
            );
            os_errno(&e)
        }
    };
    out.reply(cookie, error)
}

fn discard(s: &mut impl Read, mut len: u64) -> io::Result<()> {
    let mut buf = vec![0u8; len.min(1 << 20) as usize];
    while len > 0 {
        let n = len.min(buf.len() as u64) as usize;
        s.read_exact(&mut buf[..n])?;
        len -= n as u64;
    }
    Ok(())
}

/// Per-connection counters, logged at close.
#[derive(Debug, Default)]
pub struct ConnStats {
    pub requests: u64,
    pub errors: u64,
}

/// Serves requests on `stream` (whose raw descriptor is `fd`) until the
/// client disconnects or breaks the protocol.
pub fn serve(
    stream: &mut impl Read,
    fd: RawFd,
    export: Arc<Export>,
    workers: usize,
) -> io::Result<ConnStats> {
    let out = Arc::new(Writer {
        fd,
        lock: Mutex::new(()),
    });
    let (tx, rx) = crossbeam_channel::bounded::<Job>(workers * 8);
    let mut pool = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (rx, out, export) = (rx.clone(), out.clone(), export.clone());
        pool.push(std::thread::spawn(move || {
            for job in rx.iter() {
                if let Err(e) = execute(job, &export, &out) {
                    debug!("reply failed: {e}");
                    // SAFETY: shutting down our own socket makes the reader stop.
                    unsafe { libc::shutdown(out.fd, libc::SHUT_RDWR) };
                    break;
                }
            }
        }));
    }
    let mut stats = ConnStats::default();
    let result = (|| -> io::Result<()> {
        loop {
            let mut hb = [0u8; Request::LEN];
            match stream.read_exact(&mut hb) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) => return Err(e),
            }
            let req = match Request::decode(&hb) {
                Ok(r) => r,
                Err(e) => {
                    warn!("closing connection: {e}");
                    return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string()));
                }
            };
            stats.requests += 1;
            let checked = validate(&req, &export);
            let payload_len = u64::from(req.payload_len());
            match checked {
                Ok(Cmd::Disc) => return Ok(()),
                Ok(cmd) => {
                    let mut payload = Vec::new();
                    if cmd == Cmd::Write {
                        payload = vec![0u8; payload_len as usize];
                        stream.read_exact(&mut payload)?;
                    }
                    if tx.send(Job { req, cmd, payload }).is_err() {
                        return Ok(());
                    }
                }
                Err(error) => {
                    stats.errors += 1;
                    debug!(?req, error, "refused");
                    discard(stream, payload_len)?;
                    out.reply(req.cookie, error)?;
                }
            }
        }
    })();
    drop(tx);
    for t in pool {
        let _ = t.join();
    }
    // Make what clients wrote durable before they see the connection close.
    if !export.backend().read_only() {
        let _ = export.backend().flush();
    }
    result.map(|()| stats)
}
