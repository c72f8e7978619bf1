//! The transmission phase: requests are read in order by the connection's
//! thread and executed by a small pool of workers, so one slow request does
//! not hold up the others. Replies go out under a lock in completion order.
//! Read data is read into the worker's buffer before the reply header goes
//! out, so a failed read is an NBD error reply on that request alone, not a
//! broken stream.
//!
//! # Write fencing
//!
//! A request read from a connection that has since died is never executed.
//! A client that gives up on a connection (enbd does after `request_timeout`)
//! shuts it down and may send the same WRITE again on another connection; if
//! this server executed the stale copy later, after a newer write to the same
//! blocks, the old data would come back. [`Conn`] enforces the rule.
//!
//! # Memory
//!
//! The reader takes each WRITE's payload buffer, and each READ's data
//! buffer, from the budgets of [`crate::budget`] before it reads the payload
//! or queues the READ, and waits when they are spent: it stops reading the
//! socket rather than allocate. The buffer is given back when the reply has
//! been sent or the request is dropped. A client that never reads its
//! replies blocks the workers in `send`; the send timeout
//! ([`Resources::send_timeout`]) then kills the connection, which frees
//! what it held.

use std::io::{self, Read};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use enbd_core::wire::{
    self, chunk, cmd_flags, errno, reply_flags, state, BlockStatus, ChunkHeader, Cmd, ErrorChunk,
    Extent, Request, SimpleReply,
};
use tracing::{debug, error, warn};

use crate::backend::{Run, Storage};
use crate::budget::{Buffer, ConnMemory, Memory};
use crate::export::{Export, MAX_PAYLOAD};

/// The write side of a connection, shared by the workers.
struct Writer {
    fd: RawFd,
    lock: Mutex<()>,
    /// What the handshake agreed on: structured replies, contexts.
    neg: Negotiated,
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

impl Writer {
    /// The reply to a request that carries no data: a simple reply, or with
    /// structured replies a `NONE` chunk or an `ERROR` chunk (the protocol
    /// wants READ answered in chunks even when it fails).
    fn reply(&self, cookie: u64, error: u32) -> io::Result<()> {
        if !self.neg.structured {
            let h = SimpleReply { error, cookie }.encode();
            let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            return send_all(self.fd, &h, false);
        }
        if error == 0 {
            return self.reply_chunk(cookie, chunk::NONE, &[]);
        }
        let mut b = [0u8; 64];
        let message = errno_text(error).as_bytes();
        let e = ErrorChunk {
            error,
            message,
            offset: None,
        };
        let n = e.encode(&mut b).map_err(io::Error::other)?;
        self.reply_chunk(cookie, chunk::ERROR, &b[..n])
    }

    /// One structured chunk with `DONE`: the whole reply.
    fn reply_chunk(&self, cookie: u64, kind: u16, payload: &[u8]) -> io::Result<()> {
        let h = chunk_header(cookie, kind, reply_flags::DONE, payload.len())?;
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        send_all(self.fd, &h, !payload.is_empty())?;
        send_all(self.fd, payload, false)
    }

    /// A successful READ of `data`, read at `offset`. With structured
    /// replies, `runs` splits it into data and hole chunks (see
    /// [`read_runs`]); the last chunk carries `DONE`.
    fn reply_data(&self, cookie: u64, offset: u64, data: &[u8], runs: &[Run]) -> io::Result<()> {
        if !self.neg.structured {
            let h = SimpleReply { error: 0, cookie }.encode();
            let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            send_all(self.fd, &h, !data.is_empty())?;
            return send_all(self.fd, data, false);
        }
        if data.is_empty() {
            return self.reply_chunk(cookie, chunk::NONE, &[]);
        }
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut at = 0usize;
        for (i, r) in runs.iter().enumerate() {
            let flags = if i + 1 == runs.len() {
                reply_flags::DONE
            } else {
                0
            };
            let len = r.len as usize;
            let chunk_data = data
                .get(at..at + len)
                .ok_or_else(|| io::Error::other("read runs past the data"))?;
            let off = offset + at as u64;
            if r.hole {
                let p = wire::encode_hole(off, len as u32);
                let h = chunk_header(cookie, chunk::OFFSET_HOLE, flags, p.len())?;
                send_all(self.fd, &h, true)?;
                send_all(self.fd, &p, flags == 0)?;
            } else {
                let h = chunk_header(cookie, chunk::OFFSET_DATA, flags, 8 + len)?;
                send_all(self.fd, &h, true)?;
                send_all(self.fd, &off.to_be_bytes(), true)?;
                send_all(self.fd, chunk_data, flags == 0)?;
            }
            at += len;
        }
        Ok(())
    }
}

fn chunk_header(
    cookie: u64,
    kind: u16,
    flags: u16,
    len: usize,
) -> io::Result<[u8; ChunkHeader::LEN]> {
    let length = u32::try_from(len).map_err(|_| io::Error::other("chunk too long"))?;
    Ok(ChunkHeader {
        flags,
        kind,
        cookie,
        length,
    }
    .encode())
}

/// A message for an error chunk.
fn errno_text(error: u32) -> &'static str {
    match error {
        errno::EPERM => "operation not permitted",
        errno::EIO => "input/output error",
        errno::ENOMEM => "out of memory",
        errno::EINVAL => "invalid request",
        errno::ENOSPC => "no space left on the export",
        errno::EOVERFLOW => "value too large",
        errno::ENOTSUP => "not supported",
        errno::ESHUTDOWN => "the server is shutting down",
        _ => "error",
    }
}

/// What the handshake agreed on for this connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Negotiated {
    /// `OPT_STRUCTURED_REPLY` was acknowledged.
    pub structured: bool,
    /// `base:allocation` was selected for this export (`SET_META_CONTEXT`).
    pub base_allocation: bool,
}

/// The id this server gives `base:allocation` in `REP_META_CONTEXT`.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// Most extents in one `BLOCK_STATUS` reply, and most chunks in one READ
/// reply: a bound on the work and reply size one request can cause.
pub const MAX_EXTENTS: usize = 1024;

/// How a READ's data is sent as chunks: the storage's holes, but only
/// where `data`, read after the holes were looked up, is all zeroes. So a
/// hole chunk never stands for bytes that read as anything else, even when
/// the file changed between the lookup and the read. A failed lookup, or
/// `df`, sends it all as one data chunk.
fn read_runs(data: &[u8], holes: io::Result<Vec<Run>>, df: bool) -> Vec<Run> {
    let all = vec![Run {
        len: data.len() as u64,
        hole: false,
    }];
    let runs = match holes {
        Ok(r) if !df => r,
        _ => return all,
    };
    let mut out: Vec<Run> = Vec::with_capacity(runs.len() + 1);
    let mut at = 0usize;
    let mut push = |len: usize, hole: bool| match out.last_mut() {
        Some(last) if last.hole == hole => last.len += len as u64,
        _ => out.push(Run {
            len: len as u64,
            hole,
        }),
    };
    for r in runs {
        let len = (r.len as usize).min(data.len() - at);
        if len == 0 {
            break;
        }
        let hole = r.hole && data[at..at + len].iter().all(|&b| b == 0);
        push(len, hole);
        at += len;
    }
    if at < data.len() {
        push(data.len() - at, false);
    }
    out
}

/// A request ready for a worker.
struct Job {
    req: Request,
    cmd: Cmd,
    /// A WRITE's payload, or the buffer a READ's data goes in.
    payload: Buffer,
}

/// Whether a command changes the export's data: what fencing is about.
fn modifies(cmd: Cmd) -> bool {
    matches!(cmd, Cmd::Write | Cmd::Trim | Cmd::WriteZeroes)
}

/// Whether the peer has closed or shut down its side, or the socket has
/// failed, even if requests it sent before are still unread in the buffer.
fn peer_hung_up(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLRDHUP,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd; a zero timeout never blocks.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0
}

/// The connection is being served.
const OPEN: u8 = 0;
/// `NBD_CMD_DISC` was read: every request read before it is executed.
const CLOSING: u8 = 1;
/// The connection died: no request that has not started yet is executed.
const DEAD: u8 = 2;

/// One connection's liveness, shared by its reader and workers: the
/// write-fencing rule is enforced here.
///
/// * The connection is dead once its reader meets EOF without
///   `NBD_CMD_DISC`, a read error or a protocol violation, or once a reply
///   cannot be sent ([`Conn::kill`]).
/// * Each worker calls [`Conn::admit`] right before it starts a request: a
///   dead connection's requests are dropped, unanswered, without touching
///   the backend. The check is one atomic load, plus a non-blocking
///   `poll(2)` before a WRITE, TRIM or WRITE_ZEROES (see next point).
/// * The reader can learn of the death late: requests the client sent
///   before it hung up are still read from the socket buffer, and the reader
///   may be blocked on a full queue. So before a WRITE, TRIM or WRITE_ZEROES
///   the worker also asks the socket whether the peer has hung up
///   (`POLLRDHUP`). If it has, the request is parked until the reader has
///   read the rest of the stream, which is then finite: EOF kills the
///   connection and drops what is parked; `NBD_CMD_DISC`, after which the
///   protocol wants every earlier request handled, runs it.
///
/// A request that has started when the connection dies is finished (its
/// reply is lost): the server cannot take back a write in progress.
struct Conn {
    fd: RawFd,
    state: AtomicU8,
    /// Modifying requests seen after the peer hung up, awaiting the verdict.
    /// State changes happen under this lock, so nothing is parked after it.
    parked: Mutex<Vec<Job>>,
    /// Requests read but never started because the connection died.
    dropped: AtomicU64,
}

impl Conn {
    fn new(fd: RawFd) -> Self {
        Self {
            fd,
            state: AtomicU8::new(OPEN),
            parked: Mutex::new(Vec::new()),
            dropped: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Job>> {
        self.parked.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn has_parked(&self) -> bool {
        !self.lock().is_empty()
    }

    fn is_dead(&self) -> bool {
        self.state.load(Ordering::Acquire) == DEAD
    }

    /// Called right before a job starts: the job back if it may run now.
    fn admit(&self, job: Job) -> Option<Job> {
        match self.state.load(Ordering::Acquire) {
            OPEN if !modifies(job.cmd) || !peer_hung_up(self.fd) => Some(job),
            CLOSING => Some(job),
            _ => self.park(job),
        }
    }

    fn park(&self, job: Job) -> Option<Job> {
        let mut parked = self.lock();
        match self.state.load(Ordering::Acquire) {
            OPEN => parked.push(job),
            CLOSING => return Some(job),
            _ => {
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
        None
    }

    /// The connection died: drop what is parked and whatever is not started.
    /// After `NBD_CMD_DISC` the requests before it still run.
    fn kill(&self) {
        let mut parked = self.lock();
        if self.state.load(Ordering::Acquire) == CLOSING {
            return;
        }
        self.state.store(DEAD, Ordering::Release);
        self.dropped
            .fetch_add(parked.len() as u64, Ordering::Relaxed);
        parked.clear();
    }

    /// `NBD_CMD_DISC` was read: every request before it runs. Returns the
    /// parked ones, to be queued again.
    fn closing(&self) -> Vec<Job> {
        let mut parked = self.lock();
        if self.state.load(Ordering::Acquire) == DEAD {
            return Vec::new();
        }
        self.state.store(CLOSING, Ordering::Release);
        std::mem::take(&mut *parked)
    }
}

/// Checks a request against the export and what was negotiated. `Err` is
/// the NBD error to reply.
fn validate(req: &Request, export: &Export, neg: Negotiated) -> Result<Cmd, u32> {
    let cmd = req.command().ok_or(errno::EINVAL)?;
    // With SEND_FUA announced, the protocol has servers accept FUA on every
    // command, ignoring it where nothing is written.
    let allowed = match cmd {
        Cmd::WriteZeroes => cmd_flags::FUA | cmd_flags::NO_HOLE | cmd_flags::FAST_ZERO,
        // DF is announced only with structured replies.
        Cmd::Read if neg.structured => cmd_flags::FUA | cmd_flags::DF,
        Cmd::BlockStatus => cmd_flags::FUA | cmd_flags::REQ_ONE,
        _ => cmd_flags::FUA,
    };
    if req.flags & !allowed != 0 {
        return Err(errno::EINVAL);
    }
    match cmd {
        Cmd::Read | Cmd::Write | Cmd::Trim | Cmd::WriteZeroes | Cmd::Cache | Cmd::BlockStatus => {
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
            if modifies(cmd) && export.backend().read_only() {
                return Err(errno::EPERM);
            }
            // Only with base:allocation selected, which needs structured
            // replies; an empty query has no extent to answer with.
            if cmd == Cmd::BlockStatus && (!neg.base_allocation || req.length == 0) {
                return Err(errno::EINVAL);
            }
        }
        Cmd::Flush | Cmd::Disc => {}
    }
    Ok(cmd)
}

fn os_errno(e: &io::Error) -> u32 {
    errno::from_linux(e.raw_os_error().unwrap_or(libc::EIO))
}

/// Executes a job and sends its reply; an error means the connection is
/// broken. A READ's data is read into `read_buf`, the request's budgeted
/// buffer.
fn execute(job: Job, export: &Export, out: &Writer, read_buf: &mut Vec<u8>) -> io::Result<()> {
    let b = export.backend();
    let Request {
        cookie,
        offset,
        length,
        flags,
        ..
    } = job.req;
    let fua = flags & cmd_flags::FUA != 0 && modifies(job.cmd);
    // WRITE makes just its range durable; the others flush afterwards.
    let flush_after = fua && job.cmd != Cmd::Write;
    let may_trim = flags & cmd_flags::NO_HOLE == 0;
    let result = match job.cmd {
        Cmd::Read => {
            // Holes are looked up before the read: see `read_runs`.
            let holes = if out.neg.structured {
                b.extents(offset, u64::from(length), MAX_EXTENTS)
            } else {
                Ok(Vec::new())
            };
            read_buf.resize(length as usize, 0);
            match b.read_at(read_buf, offset) {
                Ok(()) => {
                    let runs = if out.neg.structured {
                        read_runs(read_buf, holes, flags & cmd_flags::DF != 0)
                    } else {
                        Vec::new()
                    };
                    return out.reply_data(cookie, offset, read_buf, &runs);
                }
                Err(e) => Err(e),
            }
        }
        Cmd::Write => b.write_at(&job.payload, offset, fua),
        Cmd::Flush => b.flush(),
        Cmd::Trim => b.trim(offset, u64::from(length)),
        Cmd::WriteZeroes if flags & cmd_flags::FAST_ZERO != 0 => {
            b.write_zeroes_fast(offset, u64::from(length), may_trim)
        }
        Cmd::WriteZeroes => b.write_zeroes(offset, u64::from(length), may_trim),
        Cmd::Cache => b.cache(offset, u64::from(length)),
        Cmd::BlockStatus => {
            let one = flags & cmd_flags::REQ_ONE != 0;
            return reply_block_status(b, out, cookie, offset, length, one);
        }
        Cmd::Disc => Ok(()),
    };
    let result = result.and_then(|()| if flush_after { b.flush() } else { Ok(()) });
    let error = match result {
        Ok(()) => 0,
        // The client asked for a fast zero or none: refusing it is normal.
        Err(e) if job.cmd == Cmd::WriteZeroes && e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            debug!(
                export = export.name(),
                "fast zero at {offset}+{length} refused"
            );
            errno::ENOTSUP
        }
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

/// Answers `BLOCK_STATUS` for `base:allocation` (validated: in range, not
/// empty): the storage's data and holes, a hole being `HOLE | ZERO`. The
/// extents never go past the request, so never past the export's end.
fn reply_block_status(
    b: &dyn Storage,
    out: &Writer,
    cookie: u64,
    offset: u64,
    length: u32,
    one: bool,
) -> io::Result<()> {
    let max = if one { 1 } else { MAX_EXTENTS };
    let runs = b
        .extents(offset, u64::from(length), max)
        .unwrap_or_else(|e| {
            // The protocol allows "status unknown" (0) rather than an error.
            debug!("extents at {offset}+{length}: {e}; reporting all data");
            Vec::new()
        });
    let mut extents: Vec<Extent> = Vec::with_capacity(runs.len().min(max));
    let mut total = 0u64;
    for r in runs.into_iter().take(max) {
        // Clamped to the request; u32 since the request length is.
        let len = r.len.min(u64::from(length) - total) as u32;
        if len == 0 {
            break;
        }
        let flags = if r.hole { state::HOLE | state::ZERO } else { 0 };
        extents.push(Extent { length: len, flags });
        total += u64::from(len);
    }
    if extents.is_empty() {
        extents.push(Extent { length, flags: 0 });
    }
    let mut p = vec![0u8; 4 + wire::EXTENT_LEN * extents.len()];
    let n = BlockStatus::encode(BASE_ALLOCATION_ID, &extents, &mut p).map_err(io::Error::other)?;
    out.reply_chunk(cookie, chunk::BLOCK_STATUS, &p[..n])
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

/// Most bytes of the server budget that idle buffers keep for reuse.
pub const POOL_KEEP: u64 = 64 << 20;

/// What the connections of a server share, and the limits each gets.
#[derive(Debug, Clone)]
pub struct Resources {
    /// Worker threads per connection.
    pub workers: usize,
    /// The server's budget of request data in flight, and its pool.
    pub memory: Arc<Memory>,
    /// Each connection's budget, at least `MAX_PAYLOAD`.
    pub per_connection: u64,
    /// How long a reply may make no progress before the connection is
    /// given up (`SO_SNDTIMEO`); `None`: no limit.
    pub send_timeout: Option<Duration>,
}

impl Resources {
    /// The command line's default budgets (1 GiB, and two of the largest
    /// requests per connection), for `workers` threads per connection.
    #[cfg(test)]
    pub fn new(workers: usize) -> Self {
        Self {
            workers,
            memory: Arc::new(Memory::new(1 << 30, POOL_KEEP)),
            per_connection: 2 * u64::from(MAX_PAYLOAD),
            send_timeout: None,
        }
    }
}

/// Whether the socket has failed (a reset): its unread requests are lost
/// anyway. A mere hang-up does not count: requests before a DISC still run.
fn socket_failed(fd: RawFd) -> bool {
    let mut p = libc::pollfd {
        fd,
        events: 0,
        revents: 0,
    };
    // SAFETY: `p` is one valid pollfd; a zero timeout never blocks.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n > 0 && p.revents & libc::POLLERR != 0
}

/// Arms `SO_SNDTIMEO` on the socket replies go out on: a `send` that makes
/// no progress for `t` fails with `EAGAIN`, which kills the connection.
/// Without a limit the socket is left as it is.
fn set_send_timeout(fd: RawFd, t: Option<Duration>) -> io::Result<()> {
    let Some(t) = t else {
        return Ok(());
    };
    let tv = libc::timeval {
        tv_sec: t.as_secs().min(libc::time_t::MAX as u64) as libc::time_t,
        tv_usec: t.subsec_micros() as libc::suseconds_t,
    };
    // SAFETY: `tv` is a valid timeval of the size passed; `fd` is a socket.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_SNDTIMEO,
            std::ptr::addr_of!(tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Per-connection counters, logged at close.
#[derive(Debug, Default)]
pub struct ConnStats {
    pub requests: u64,
    pub errors: u64,
    /// Requests read but never executed because the connection died.
    pub dropped: u64,
}

/// How the request stream ended.
enum End {
    /// EOF where a request would start, without `NBD_CMD_DISC`.
    Eof,
    /// `NBD_CMD_DISC`.
    Disc,
}

/// Reads requests until the stream ends, refusing invalid ones itself and
/// queueing the rest for the workers.
fn read_requests(
    stream: &mut impl Read,
    export: &Export,
    out: &Writer,
    conn: &Conn,
    memory: &ConnMemory,
    tx: &crossbeam_channel::Sender<Job>,
    stats: &mut ConnStats,
) -> io::Result<End> {
    loop {
        let mut hb = [0u8; Request::LEN];
        match stream.read_exact(&mut hb) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(End::Eof),
            Err(e) => return Err(e),
        }
        let req = match Request::decode(&hb) {
            Ok(r) => r,
            Err(e) => {
                warn!("closing connection: {e}");
                return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string()));
            }
        };
        if conn.is_dead() {
            // A reply failed; the socket is shut down and nothing read from
            // it runs any more.
            return Ok(End::Eof);
        }
        stats.requests += 1;
        let checked = validate(&req, export, out.neg);
        let payload_len = u64::from(req.payload_len());
        match checked {
            Ok(Cmd::Disc) => return Ok(End::Disc),
            Ok(cmd) => {
                // The memory the request needs, before its payload is read
                // (or, for a READ, before a worker fills it). Waiting here
                // stops reading the socket: backpressure.
                let need = match cmd {
                    Cmd::Write => payload_len,
                    Cmd::Read => u64::from(req.length),
                    _ => 0,
                };
                // Also when the peer has hung up and requests are parked:
                // their memory comes back only once the stream ends, which
                // this wait would never reach.
                let mut give_up = || {
                    conn.is_dead()
                        || socket_failed(conn.fd)
                        || (conn.has_parked() && peer_hung_up(conn.fd))
                };
                let Some(mut payload) = memory.buffer(need as usize, &mut give_up) else {
                    // The connection died while the request waited for
                    // memory (validation keeps `need` within the budgets).
                    debug!(?req, "connection gone while waiting for memory");
                    return Ok(End::Eof);
                };
                if cmd == Cmd::Write {
                    stream.read_exact(&mut payload)?;
                }
                if tx.send(Job { req, cmd, payload }).is_err() {
                    return Err(io::Error::other("no worker left"));
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
}

/// Serves requests on `stream` (whose raw descriptor is `fd`) until the
/// client disconnects or breaks the protocol.
pub fn serve(
    stream: &mut impl Read,
    fd: RawFd,
    export: Arc<Export>,
    neg: Negotiated,
    res: &Resources,
) -> io::Result<ConnStats> {
    serve_watching(stream, fd, fd, export, neg, res)
}

/// [`serve`], with `peer_fd` the socket whose hang-up fencing watches when
/// it is not `fd` itself: the TCP socket behind a userspace TLS proxy, which
/// may still hold requests the client sent before it hung up.
pub fn serve_watching(
    stream: &mut impl Read,
    fd: RawFd,
    peer_fd: RawFd,
    export: Arc<Export>,
    neg: Negotiated,
    res: &Resources,
) -> io::Result<ConnStats> {
    let workers = res.workers;
    set_send_timeout(fd, res.send_timeout)?;
    let memory = res.memory.connection(res.per_connection);
    let out = Arc::new(Writer {
        fd,
        lock: Mutex::new(()),
        neg,
    });
    let conn = Arc::new(Conn::new(peer_fd));
    let (tx, rx) = crossbeam_channel::bounded::<Job>(workers * 8);
    let mut pool = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (rx, out, conn, export) = (rx.clone(), out.clone(), conn.clone(), export.clone());
        let worker = std::thread::Builder::new().name("enbd-worker".into());
        let started = worker.spawn(move || {
            // A worker keeps taking jobs after the connection died, dropping
            // them, so the reader is never stuck on a full queue.
            for job in rx.iter() {
                // Fencing: the liveness check right before the request starts.
                let Some(mut job) = conn.admit(job) else {
                    continue;
                };
                // A READ's data goes into the buffer reserved for it, given
                // back once its reply is sent; other commands need none.
                let mut data = Buffer::default();
                if job.cmd == Cmd::Read {
                    data = std::mem::take(&mut job.payload);
                }
                let r = execute(job, &export, &out, data.vec_mut());
                drop(data);
                if let Err(e) = r {
                    debug!("reply failed: {e}");
                    conn.kill();
                    // SAFETY: shutting down our own socket makes the reader stop.
                    unsafe { libc::shutdown(out.fd, libc::SHUT_RDWR) };
                }
            }
        });
        match started {
            Ok(t) => pool.push(t),
            // Out of threads: serve with the workers there are, or not at all.
            Err(e) if pool.is_empty() => {
                return Err(io::Error::new(
                    e.kind(),
                    format!("cannot start a worker: {e}"),
                ))
            }
            Err(e) => {
                warn!("serving with {} of {workers} workers: {e}", pool.len());
                break;
            }
        }
    }
    drop(rx);
    let mut stats = ConnStats::default();
    let result = read_requests(stream, &export, &out, &conn, &memory, &tx, &mut stats);
    match result {
        Ok(End::Disc) => {
            for job in conn.closing() {
                let _ = tx.send(job);
            }
        }
        // EOF without NBD_CMD_DISC, a read error or a protocol violation.
        _ => conn.kill(),
    }
    drop(tx);
    for t in pool {
        let _ = t.join();
    }
    stats.dropped = conn.dropped.load(Ordering::Relaxed);
    if stats.dropped > 0 {
        warn!(
            export = export.name(),
            "connection died: {} request(s) read but not started were dropped", stats.dropped
        );
    }
    // Make what clients wrote durable before they see the connection close.
    if !export.backend().read_only() {
        if let Err(e) = export.backend().flush() {
            error!(
                export = export.name(),
                "flushing {} at disconnect failed: {e}; writes of this connection may be lost",
                export.backend().path().display()
            );
        }
    }
    result.map(|_| stats)
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::net::UnixStream;
    use std::sync::atomic::Ordering;
    use std::thread::JoinHandle;

    use enbd_core::wire::{cmd_flags, errno, Cmd, Request, REQUEST_MAGIC};

    use std::os::unix::fs::FileExt;

    use super::*;
    use crate::testutil::{
        pair, probed_export, read_reply, read_rest, send_request, wait_consumed, Counts, TempFile,
        PATIENCE,
    };

    const SIZE: u64 = 1 << 20;
    const FILL: u8 = 0xab;

    /// `serve` on one end of a socket pair; the test drives the other end.
    struct Session {
        client: UnixStream,
        server: JoinHandle<io::Result<ConnStats>>,
        counts: Arc<Counts>,
        file: TempFile,
    }

    fn start_with(file: TempFile, read_only: bool, workers: usize) -> Session {
        start_res(file, read_only, Resources::new(workers))
    }

    fn start_res(file: TempFile, read_only: bool, res: Resources) -> Session {
        let (export, counts) = probed_export("disk", &file, read_only);
        serve_export(export, counts, file, Negotiated::default(), res)
    }

    fn serve_export(
        export: Arc<Export>,
        counts: Arc<Counts>,
        file: TempFile,
        neg: Negotiated,
        res: Resources,
    ) -> Session {
        let (client, mut server_end) = pair();
        let server = std::thread::spawn(move || {
            let fd = std::os::fd::AsRawFd::as_raw_fd(&server_end);
            serve(&mut server_end, fd, export, neg, &res)
        });
        Session {
            client,
            server,
            counts,
            file,
        }
    }

    fn start(read_only: bool, workers: usize) -> Session {
        start_with(TempFile::new(SIZE, FILL), read_only, workers)
    }

    fn req(cmd: Cmd, flags: u16, cookie: u64, offset: u64, length: u32) -> Request {
        Request::new(cmd, flags, cookie, offset, length)
    }

    impl Session {
        fn send(&mut self, r: Request, payload: &[u8]) {
            send_request(&mut self.client, r, payload);
        }

        /// Sends a request without payload data and returns its reply's error.
        fn call(&mut self, r: Request) -> u32 {
            self.send(r, &[]);
            let rep = read_reply(&mut self.client);
            assert_eq!(rep.cookie, r.cookie, "reply to the wrong request");
            rep.error
        }

        fn write(&mut self, cookie: u64, flags: u16, offset: u64, data: &[u8]) -> u32 {
            self.send(
                req(Cmd::Write, flags, cookie, offset, data.len() as u32),
                data,
            );
            let rep = read_reply(&mut self.client);
            assert_eq!(rep.cookie, cookie);
            rep.error
        }

        fn read(&mut self, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
            assert_eq!(self.call(req(Cmd::Read, 0, cookie, offset, len)), 0);
            let mut data = vec![0u8; len as usize];
            self.client.read_exact(&mut data).unwrap();
            data
        }

        /// Ends with NBD_CMD_DISC; the server closes without a reply.
        fn disconnect(mut self) -> (ConnStats, Arc<Counts>, TempFile) {
            self.send(req(Cmd::Disc, 0, 0, 0, 0), &[]);
            let stats = self.server.join().unwrap().unwrap();
            assert!(read_rest(&mut self.client).is_empty(), "DISC has no reply");
            (stats, self.counts, self.file)
        }
    }

    #[test]
    fn read_and_write_round_trip() {
        let mut c = start(false, 4);
        assert_eq!(c.read(1, 0, 16), vec![FILL; 16]);
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        assert_eq!(c.write(2, 0, 8192, &data), 0);
        assert_eq!(c.read(3, 8192, 4096), data);
        // The last byte of the export and an empty read are in range.
        assert_eq!(c.read(4, SIZE - 1, 1), vec![FILL]);
        assert!(c.read(5, SIZE, 0).is_empty());
        let (stats, counts, file) = c.disconnect();
        assert_eq!(file.read(8192, 4096), data);
        assert_eq!(counts.writes(), 1);
        assert_eq!((stats.requests, stats.errors, stats.dropped), (6, 0, 0));
    }

    #[test]
    fn flush_trim_and_write_zeroes() {
        let mut c = start(false, 2);
        assert_eq!(c.call(req(Cmd::Flush, 0, 1, 0, 0)), 0);
        assert_eq!(c.counts.flushes(), 1);
        assert_eq!(c.call(req(Cmd::Trim, 0, 2, 0, 8192)), 0);
        assert_eq!(c.counts.trims.load(Ordering::SeqCst), 1);
        // Punching a hole and writing zeroes must both read back as zeroes.
        assert_eq!(c.call(req(Cmd::WriteZeroes, 0, 3, 65536, 4096)), 0);
        let no_hole = cmd_flags::NO_HOLE;
        assert_eq!(c.call(req(Cmd::WriteZeroes, no_hole, 4, 131072, 100)), 0);
        assert_eq!(c.counts.zeroes.load(Ordering::SeqCst), 2);
        assert_eq!(c.read(5, 65536, 4096), vec![0; 4096]);
        assert_eq!(c.read(6, 131072 - 1, 102), {
            let mut v = vec![0u8; 102];
            v[0] = FILL;
            v[101] = FILL;
            v
        });
        let (stats, _, _) = c.disconnect();
        assert_eq!(stats.errors, 0);
    }

    #[test]
    fn fua_is_durable_before_the_reply_and_is_accepted_everywhere() {
        let mut c = start(false, 1);
        let fua = cmd_flags::FUA;
        let fua_writes = |c: &Session| c.counts.fua_writes.load(Ordering::SeqCst);
        assert_eq!(c.write(1, 0, 0, &[1; 512]), 0);
        assert_eq!(c.counts.flushes(), 0, "no FUA, no flush");
        assert_eq!(fua_writes(&c), 0);
        // A FUA WRITE syncs its own range (RWF_DSYNC), counted before the
        // reply goes out; it does not flush the whole file.
        assert_eq!(c.write(2, fua, 0, &[2; 512]), 0);
        assert_eq!((fua_writes(&c), c.counts.flushes()), (1, 0));
        assert_eq!(c.read(20, 0, 512), vec![2; 512]);
        assert_eq!(c.call(req(Cmd::Trim, fua, 3, 0, 4096)), 0);
        assert_eq!(c.counts.flushes(), 1);
        assert_eq!(c.call(req(Cmd::WriteZeroes, fua, 4, 0, 4096)), 0);
        assert_eq!(c.counts.flushes(), 2);
        // FUA where nothing is written is accepted and ignored.
        assert_eq!(c.call(req(Cmd::Flush, fua, 5, 0, 0)), 0);
        assert_eq!(c.counts.flushes(), 3, "one flush, not two");
        c.send(req(Cmd::Read, fua, 6, 0, 8), &[]);
        let rep = read_reply(&mut c.client);
        assert_eq!((rep.error, rep.cookie), (0, 6));
        let mut d = [0u8; 8];
        c.client.read_exact(&mut d).unwrap();
        assert_eq!(c.counts.flushes(), 3);
        c.disconnect();
    }

    #[test]
    fn a_failed_read_is_an_error_reply_on_that_request_alone() {
        let mut c = start(false, 2);
        assert_eq!(c.write(1, 0, 4096, &[7; 4096]), 0);
        c.counts.fail_reads.store(libc::EIO, Ordering::SeqCst);
        // The reply carries the error and no data: the stream stays in step.
        assert_eq!(c.call(req(Cmd::Read, 0, 2, 4096, 4096)), errno::EIO);
        assert_eq!(c.read(3, 4096, 4096), vec![7; 4096]);
        // A backing file that shrank underneath: the same, not a dropped
        // connection.
        c.file.truncate(8192);
        assert_eq!(c.call(req(Cmd::Read, 0, 4, SIZE - 4096, 4096)), errno::EIO);
        assert_eq!(c.read(5, 4096, 8), vec![7; 8]);
        let (stats, _, _) = c.disconnect();
        assert_eq!(stats.errors, 0);
    }

    #[test]
    fn flags_not_valid_for_the_command_get_einval() {
        let mut c = start(false, 2);
        // NO_HOLE only applies to WRITE_ZEROES; its payload is still read.
        assert_eq!(c.write(1, cmd_flags::NO_HOLE, 0, &[7; 512]), errno::EINVAL);
        // DF is not announced without structured replies; unknown bits are
        // refused too.
        assert_eq!(
            c.call(req(Cmd::Read, cmd_flags::DF, 2, 0, 512)),
            errno::EINVAL
        );
        assert_eq!(c.call(req(Cmd::Trim, 1 << 9, 3, 0, 512)), errno::EINVAL);
        assert_eq!(
            c.call(req(Cmd::WriteZeroes, cmd_flags::REQ_ONE, 4, 0, 512)),
            errno::EINVAL
        );
        assert_eq!(c.counts.writes(), 0);
        // The connection stays in step.
        assert_eq!(c.read(5, 0, 4), vec![FILL; 4]);
        let (stats, counts, _) = c.disconnect();
        assert_eq!(stats.errors, 4);
        assert_eq!(counts.zeroes.load(Ordering::SeqCst), 0);
        assert_eq!(counts.trims.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn requests_beyond_the_end_get_einval_and_touch_nothing() {
        let mut c = start(false, 2);
        let e = errno::EINVAL;
        // Straddling the end, starting at the end, and overflowing u64.
        assert_eq!(c.call(req(Cmd::Read, 0, 1, SIZE - 512, 1024)), e);
        assert_eq!(c.call(req(Cmd::Read, 0, 2, SIZE, 1)), e);
        assert_eq!(c.call(req(Cmd::Read, 0, 3, u64::MAX - 10, 4096)), e);
        // A refused write's payload is read and dropped.
        assert_eq!(c.write(4, 0, SIZE - 100, &[9; 512]), e);
        assert_eq!(c.write(5, 0, u64::MAX, &[9; 1]), e);
        assert_eq!(c.call(req(Cmd::Trim, 0, 6, SIZE, 4096)), e);
        assert_eq!(c.call(req(Cmd::WriteZeroes, 0, 7, SIZE - 1, 2)), e);
        // Still in step, and nothing changed.
        assert_eq!(c.read(8, SIZE - 512, 512), vec![FILL; 512]);
        let (stats, counts, file) = c.disconnect();
        assert_eq!(stats.errors, 7);
        assert_eq!(counts.writes(), 0);
        assert_eq!(counts.trims.load(Ordering::SeqCst), 0);
        assert_eq!(counts.zeroes.load(Ordering::SeqCst), 0);
        assert_eq!(file.read(SIZE - 100, 100), vec![FILL; 100]);
    }

    #[test]
    fn oversize_reads_and_writes_get_einval() {
        // Big enough that only the payload limit applies.
        let big = u64::from(MAX_PAYLOAD) * 2;
        let mut c = start_with(TempFile::new(big, 0), false, 2);
        let e = errno::EINVAL;
        assert_eq!(c.call(req(Cmd::Read, 0, 1, 0, MAX_PAYLOAD + 1)), e);
        // The refused write's payload is drained, from another thread, so
        // the stream stays in step.
        let mut w = c.client.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            let payload = vec![5u8; MAX_PAYLOAD as usize + 1];
            send_request(&mut w, req(Cmd::Write, 0, 2, 0, MAX_PAYLOAD + 1), &payload);
        });
        let rep = read_reply(&mut c.client);
        writer.join().unwrap();
        assert_eq!((rep.error, rep.cookie), (e, 2));
        // TRIM and WRITE_ZEROES carry no payload: no such limit.
        assert_eq!(c.call(req(Cmd::Trim, 0, 3, 0, MAX_PAYLOAD + 4096)), 0);
        assert_eq!(
            c.call(req(Cmd::WriteZeroes, 0, 4, 0, MAX_PAYLOAD + 4096)),
            0
        );
        assert_eq!(c.read(5, 0, 4), vec![0; 4]);
        let (stats, counts, _) = c.disconnect();
        assert_eq!(stats.errors, 2);
        assert_eq!(counts.writes(), 0);
    }

    #[test]
    fn read_only_export_refuses_changes_with_eperm() {
        let mut c = start(true, 2);
        let e = errno::EPERM;
        assert_eq!(c.write(1, 0, 0, &[1; 4096]), e);
        assert_eq!(c.call(req(Cmd::Trim, 0, 2, 0, 4096)), e);
        assert_eq!(c.call(req(Cmd::WriteZeroes, 0, 3, 0, 4096)), e);
        // Bounds come first: past the end is EINVAL even here.
        assert_eq!(c.write(4, 0, SIZE, &[1; 512]), errno::EINVAL);
        // Reads and flushes work.
        assert_eq!(c.read(5, 0, 4096), vec![FILL; 4096]);
        assert_eq!(c.call(req(Cmd::Flush, 0, 6, 0, 0)), 0);
        let (stats, counts, file) = c.disconnect();
        assert_eq!(stats.errors, 4);
        assert_eq!(counts.writes(), 0);
        assert_eq!(file.read(0, 4096), vec![FILL; 4096]);
    }

    #[test]
    fn unknown_commands_get_einval() {
        let mut c = start(false, 2);
        // 7 is BLOCK_STATUS, without a metadata context here; the rest are
        // unknown.
        for (cookie, cmd) in [(1, 9u16), (2, 7), (3, 8), (4, 0xffff)] {
            let r = Request {
                cmd,
                cookie,
                length: 512,
                ..Request::default()
            };
            assert_eq!(c.call(r), errno::EINVAL, "command {cmd}");
        }
        assert_eq!(c.read(5, 0, 1), vec![FILL]);
        let (stats, _, _) = c.disconnect();
        assert_eq!(stats.errors, 4);
    }

    #[test]
    fn backend_errors_are_mapped_to_protocol_errors() {
        let mut c = start(false, 1);
        for (cookie, os, nbd) in [
            (1, libc::EIO, errno::EIO),
            (2, libc::ENOSPC, errno::ENOSPC),
            (3, libc::EDQUOT, errno::ENOSPC),
            (4, libc::EFBIG, errno::ENOSPC),
            (5, libc::EROFS, errno::EPERM),
            (6, libc::ENOENT, errno::EIO),
        ] {
            c.counts.fail_writes.store(os, Ordering::SeqCst);
            assert_eq!(c.write(cookie, 0, 0, &[1; 512]), nbd, "errno {os}");
        }
        assert_eq!(c.write(7, 0, 0, &[1; 512]), 0);
        c.disconnect();
    }

    #[test]
    fn disc_ends_the_connection_without_a_reply() {
        let c = start(false, 2);
        let (stats, counts, _) = c.disconnect();
        assert_eq!((stats.requests, stats.errors, stats.dropped), (1, 0, 0));
        // The server makes writes durable before it closes.
        assert_eq!(counts.flushes(), 1);
    }

    #[test]
    fn bad_request_magic_closes_the_connection() {
        let mut c = start(false, 2);
        let mut b = req(Cmd::Read, 0, 1, 0, 512).encode();
        b[..4].copy_from_slice(&(REQUEST_MAGIC ^ 1).to_be_bytes());
        c.client.write_all(&b).unwrap();
        let err = c.server.join().unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(read_rest(&mut c.client).is_empty(), "no reply, just close");
    }

    // Write fencing: a request read from a connection that has since died
    // is never executed.

    /// Sends a FLUSH that the backend holds, so the one worker is busy, and
    /// then `n` 512-byte WRITEs of 0x55 at distinct offsets behind it.
    fn flush_held_then_writes(c: &mut Session, n: u64) {
        c.counts.hold_next_flush();
        c.send(req(Cmd::Flush, 0, 1, 0, 0), &[]);
        c.counts.wait_held();
        for i in 0..n {
            c.send(req(Cmd::Write, 0, 100 + i, i * 4096, 512), &[0x55; 512]);
        }
    }

    fn assert_untouched(file: &TempFile, n: u64) {
        for i in 0..n {
            assert_eq!(file.read(i * 4096, 512), vec![FILL; 512], "write {i} ran");
        }
    }

    #[test]
    fn fencing_drops_queued_writes_when_the_client_hangs_up() {
        // The client gives up on the connection while four writes sit in
        // the queue behind a slow FLUSH, and keeps only its read side open,
        // so the FLUSH's reply still goes out.
        let mut c = start(false, 1);
        flush_held_then_writes(&mut c, 4);
        wait_consumed(&c.client);
        c.client.shutdown(std::net::Shutdown::Write).unwrap();
        c.counts.release();
        let rep = read_reply(&mut c.client);
        assert_eq!((rep.error, rep.cookie), (0, 1));
        assert!(
            read_rest(&mut c.client).is_empty(),
            "a dropped write replied"
        );
        let stats = c.server.join().unwrap().unwrap();
        assert_eq!(c.counts.writes(), 0, "a write of a dead connection ran");
        assert_eq!((stats.requests, stats.dropped), (5, 4));
        assert_untouched(&c.file, 4);
    }

    #[test]
    fn fencing_drops_queued_writes_when_the_connection_is_gone() {
        // As above, but the client closes both ways: the slow request's
        // reply fails too.
        let mut c = start(false, 1);
        flush_held_then_writes(&mut c, 4);
        wait_consumed(&c.client);
        drop(c.client);
        c.counts.release();
        let stats = c.server.join().unwrap().unwrap();
        assert_eq!(c.counts.writes(), 0, "a write of a dead connection ran");
        assert_eq!(stats.dropped, 4);
        assert_untouched(&c.file, 4);
    }

    #[test]
    fn fencing_drops_writes_still_unread_behind_a_full_queue() {
        // 20 writes behind the slow FLUSH: 8 fill the queue, one waits in
        // the reader's hand and the rest are still in the socket buffer
        // when the client hangs up. The reader cannot see the EOF before
        // the worker is free again; the worker must notice the hang-up
        // itself.
        let mut c = start(false, 1);
        flush_held_then_writes(&mut c, 20);
        c.client.shutdown(std::net::Shutdown::Write).unwrap();
        c.counts.release();
        let rep = read_reply(&mut c.client);
        assert_eq!((rep.error, rep.cookie), (0, 1));
        assert!(
            read_rest(&mut c.client).is_empty(),
            "a dropped write replied"
        );
        let stats = c.server.join().unwrap().unwrap();
        assert_eq!(c.counts.writes(), 0, "a write of a dead connection ran");
        assert_eq!((stats.requests, stats.dropped), (21, 20));
        assert_untouched(&c.file, 20);
    }

    #[test]
    fn fencing_drops_a_write_whose_payload_never_arrived() {
        let mut c = start(false, 1);
        c.send(req(Cmd::Write, 0, 1, 0, 4096), &[0x55; 1000]);
        drop(c.client);
        let err = c.server.join().unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(c.counts.writes(), 0);
        assert_untouched(&c.file, 1);
    }

    #[test]
    fn fencing_watches_the_socket_behind_a_proxy() {
        // `serve_watching` polls another socket for the hang-up, as it does
        // for the TCP socket behind a TLS proxy: the peer hangs up there
        // while the plaintext stream is still open, so writes queued behind
        // the slow FLUSH wait; the stream then ends without DISC.
        let file = TempFile::new(SIZE, FILL);
        let (export, counts) = probed_export("disk", &file, false);
        let (mut client, mut server_end) = pair();
        let (tcp_peer, tcp) = pair();
        let server = std::thread::spawn(move || {
            let fd = std::os::fd::AsRawFd::as_raw_fd(&server_end);
            let watch = std::os::fd::AsRawFd::as_raw_fd(&tcp);
            serve_watching(
                &mut server_end,
                fd,
                watch,
                export,
                Negotiated::default(),
                &Resources::new(1),
            )
        });
        counts.hold_next_flush();
        send_request(&mut client, req(Cmd::Flush, 0, 1, 0, 0), &[]);
        counts.wait_held();
        for i in 0..4 {
            send_request(
                &mut client,
                req(Cmd::Write, 0, 100 + i, i * 4096, 512),
                &[0x55; 512],
            );
        }
        wait_consumed(&client);
        drop(tcp_peer);
        counts.release();
        let rep = read_reply(&mut client);
        assert_eq!((rep.error, rep.cookie), (0, 1));
        // The writes are parked, not run, while the stream is still open.
        std::thread::sleep(std::time::Duration::from_millis(100));
        assert_eq!(counts.writes(), 0, "a write ran after the peer hung up");
        client.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(read_rest(&mut client).is_empty(), "a dropped write replied");
        let stats = server.join().unwrap().unwrap();
        assert_eq!(counts.writes(), 0, "a write of a dead connection ran");
        assert_eq!((stats.requests, stats.dropped), (5, 4));
        assert_untouched(&file, 4);
    }

    #[test]
    fn disc_still_runs_every_request_sent_before_it() {
        // The protocol wants everything before NBD_CMD_DISC handled, even
        // when the client then shuts down its write side (libnbd does) and
        // some of it is still unread behind a full queue.
        let mut c = start(false, 1);
        flush_held_then_writes(&mut c, 20);
        c.send(req(Cmd::Disc, 0, 0, 0, 0), &[]);
        c.client.shutdown(std::net::Shutdown::Write).unwrap();
        c.counts.release();
        let mut cookies: Vec<u64> = (0..21)
            .map(|_| read_reply(&mut c.client))
            .map(|r| {
                assert_eq!(r.error, 0);
                r.cookie
            })
            .collect();
        cookies.sort_unstable();
        assert_eq!(cookies, [1].into_iter().chain(100..120).collect::<Vec<_>>());
        assert!(read_rest(&mut c.client).is_empty());
        let stats = c.server.join().unwrap().unwrap();
        assert_eq!(c.counts.writes(), 20);
        assert_eq!((stats.requests, stats.dropped), (22, 0));
        for i in 0..20 {
            assert_eq!(c.file.read(i * 4096, 512), vec![0x55; 512]);
        }
    }

    // Structured replies, BLOCK_STATUS, CACHE and FAST_ZERO.

    const STRUCTURED: Negotiated = Negotiated {
        structured: true,
        base_allocation: false,
    };
    const WITH_CONTEXT: Negotiated = Negotiated {
        structured: true,
        base_allocation: true,
    };
    const MIB: u64 = 1 << 20;

    /// A sparse 4 MiB file with 4 KiB of data at 1 MiB (and zeroes, also
    /// allocated, in the middle of that page's neighbours: none).
    fn sparse_file() -> TempFile {
        let f = TempFile::new(4 * MIB, 0);
        std::fs::OpenOptions::new()
            .write(true)
            .open(f.path())
            .unwrap()
            .write_all_at(&[0x5a; 4096], MIB)
            .unwrap();
        f
    }

    fn start_structured(file: TempFile, neg: Negotiated) -> Session {
        let (export, counts) = probed_export("disk", &file, false);
        serve_export(export, counts, file, neg, Resources::new(2))
    }

    /// One structured chunk: header and payload.
    fn read_chunk(s: &mut impl Read) -> (ChunkHeader, Vec<u8>) {
        let mut b = [0u8; ChunkHeader::LEN];
        s.read_exact(&mut b).unwrap();
        let h = ChunkHeader::decode(&b).unwrap();
        let mut p = vec![0u8; h.length as usize];
        s.read_exact(&mut p).unwrap();
        (h, p)
    }

    /// Every chunk of one reply, up to the one with DONE.
    fn read_chunks(s: &mut impl Read, cookie: u64) -> Vec<(u16, Vec<u8>)> {
        let mut v = Vec::new();
        loop {
            let (h, p) = read_chunk(s);
            assert_eq!(h.cookie, cookie, "chunk of another request");
            assert_eq!(h.flags & !reply_flags::DONE, 0);
            v.push((h.kind, p));
            if h.flags & reply_flags::DONE != 0 {
                return v;
            }
        }
    }

    /// A content chunk of a READ reply: offset, length, whether a hole.
    type Piece = (u64, u64, bool);

    /// What a structured READ reply says: (offset, length, hole) of each
    /// content chunk, and the data reassembled; or the error.
    fn structured_read(
        c: &mut Session,
        cookie: u64,
        flags: u16,
        offset: u64,
        len: u32,
    ) -> Result<(Vec<Piece>, Vec<u8>), u32> {
        c.send(req(Cmd::Read, flags, cookie, offset, len), &[]);
        let mut data = vec![0xeeu8; len as usize];
        let mut pieces = Vec::new();
        for (kind, p) in read_chunks(&mut c.client, cookie) {
            match kind {
                chunk::OFFSET_DATA => {
                    let off = u64::from_be_bytes(p[..8].try_into().unwrap());
                    let at = (off - offset) as usize;
                    data[at..at + p.len() - 8].copy_from_slice(&p[8..]);
                    pieces.push((off, p.len() as u64 - 8, false));
                }
                chunk::OFFSET_HOLE => {
                    let (off, n) = wire::decode_hole(&p).unwrap();
                    let at = (off - offset) as usize;
                    data[at..at + n as usize].fill(0);
                    pieces.push((off, u64::from(n), true));
                }
                chunk::ERROR => {
                    return Err(ErrorChunk::decode(kind, &p).unwrap().error);
                }
                chunk::NONE => assert!(p.is_empty()),
                other => panic!("chunk type {other} in a READ reply"),
            }
        }
        // Content chunks cover the request exactly, without overlap.
        let mut sorted = pieces.clone();
        sorted.sort_unstable();
        let mut at = offset;
        for (off, n, _) in &sorted {
            assert_eq!(*off, at, "a gap or an overlap in {pieces:?}");
            at += n;
        }
        assert_eq!(at, offset + u64::from(len), "{pieces:?}");
        Ok((pieces, data))
    }

    /// A structured reply of one chunk with DONE: its type and payload.
    fn structured_call(c: &mut Session, r: Request) -> (u16, Vec<u8>) {
        c.send(r, &[]);
        let mut v = read_chunks(&mut c.client, r.cookie);
        assert_eq!(v.len(), 1, "more than one chunk");
        v.remove(0)
    }

    /// The error of a structured reply with no data (0 for `NONE`).
    fn structured_error(c: &mut Session, r: Request) -> u32 {
        match structured_call(c, r) {
            (chunk::NONE, p) if p.is_empty() => 0,
            (chunk::ERROR, p) => ErrorChunk::decode(chunk::ERROR, &p).unwrap().error,
            (kind, _) => panic!("chunk type {kind}"),
        }
    }

    #[test]
    fn structured_reads_send_holes_as_hole_chunks_and_data_as_data() {
        let file = sparse_file();
        let expected = file.read(0, 2 * MIB as usize);
        let mut c = start_structured(file, STRUCTURED);
        let (pieces, data) = structured_read(&mut c, 1, 0, 0, 2 * MIB as u32).unwrap();
        assert_eq!(data, expected);
        assert_eq!(
            pieces,
            [
                (0, MIB, true),
                (MIB, 4096, false),
                (MIB + 4096, MIB - 4096, true)
            ]
        );
        // Don't fragment: one data chunk, zeroes included.
        let df = cmd_flags::DF;
        let (pieces, data) = structured_read(&mut c, 2, df, MIB - 512, 8192).unwrap();
        assert_eq!(pieces, [(MIB - 512, 8192, false)]);
        assert_eq!(data, expected[(MIB - 512) as usize..][..8192]);
        // All data, and an empty read.
        let (pieces, _) = structured_read(&mut c, 3, 0, MIB + 8, 100).unwrap();
        assert_eq!(pieces, [(MIB + 8, 100, false)]);
        let (pieces, _) = structured_read(&mut c, 4, 0, 0, 0).unwrap();
        assert!(pieces.is_empty());
        c.disconnect();
    }

    /// Storage that claims these runs for any range, whatever it holds:
    /// wrong, too long or too many, as a careless `Storage` might.
    #[derive(Debug)]
    struct Claims(Box<dyn Storage>, Vec<Run>);

    impl Claims {
        fn export(file: &TempFile, runs: Vec<Run>) -> Arc<Export> {
            let b = crate::backend::Backend::open(file.path(), false, true).unwrap();
            let c = Claims(Box::new(b), runs);
            Arc::new(Export::with_storage("disk", "", Box::new(c)))
        }
    }

    impl Storage for Claims {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn path(&self) -> &std::path::Path {
            self.0.path()
        }
        fn read_only(&self) -> bool {
            self.0.read_only()
        }
        fn read_at(&self, buf: &mut [u8], off: u64) -> io::Result<()> {
            self.0.read_at(buf, off)
        }
        fn write_at(&self, buf: &[u8], off: u64, fua: bool) -> io::Result<()> {
            self.0.write_at(buf, off, fua)
        }
        fn flush(&self) -> io::Result<()> {
            self.0.flush()
        }
        fn trim(&self, off: u64, len: u64) -> io::Result<()> {
            self.0.trim(off, len)
        }
        fn write_zeroes(&self, off: u64, len: u64, may_trim: bool) -> io::Result<()> {
            self.0.write_zeroes(off, len, may_trim)
        }
        fn extents(&self, _off: u64, _len: u64, _max: usize) -> io::Result<Vec<Run>> {
            Ok(self.1.clone())
        }
    }

    #[test]
    fn a_hole_chunk_never_stands_for_data_that_is_not_zero() {
        // The lookup said "hole" but the bytes read are not all zero (the
        // file changed between the two): they go out as data.
        let file = sparse_file();
        let expected = file.read(0, 2 * MIB as usize);
        // One hole, longer than any request.
        let export = Claims::export(
            &file,
            vec![Run {
                len: 8 * MIB,
                hole: true,
            }],
        );
        let counts = Arc::new(Counts::default());
        let mut c = serve_export(export, counts, file, STRUCTURED, Resources::new(1));
        let (pieces, data) = structured_read(&mut c, 1, 0, 0, 2 * MIB as u32).unwrap();
        assert_eq!(data, expected);
        assert_eq!(pieces, [(0, 2 * MIB, false)]);
        let (pieces, _) = structured_read(&mut c, 2, 0, 2 * MIB, 4096).unwrap();
        assert_eq!(pieces, [(2 * MIB, 4096, true)], "zeroes may be a hole");
        c.disconnect();
    }

    #[test]
    fn structured_errors_and_successes_are_single_done_chunks() {
        let mut c = start_structured(TempFile::new(SIZE, FILL), STRUCTURED);
        // A failed READ: one ERROR chunk, no data, the stream in step.
        c.counts.fail_reads.store(libc::EIO, Ordering::SeqCst);
        assert_eq!(structured_read(&mut c, 1, 0, 0, 4096), Err(errno::EIO));
        // Refused before execution, by the reader: the same form.
        assert_eq!(
            structured_read(&mut c, 2, 0, SIZE, 4096),
            Err(errno::EINVAL)
        );
        // A WRITE, a FLUSH: NONE with DONE.
        c.send(req(Cmd::Write, 0, 3, 0, 512), &[1; 512]);
        let (kind, p) = read_chunk(&mut c.client);
        assert_eq!(
            (kind.kind, kind.flags, kind.cookie, p.len()),
            (chunk::NONE, 1, 3, 0)
        );
        assert_eq!(structured_error(&mut c, req(Cmd::Flush, 0, 4, 0, 0)), 0);
        // BLOCK_STATUS without a metadata context is invalid.
        assert_eq!(
            structured_error(&mut c, req(Cmd::BlockStatus, 0, 5, 0, 4096)),
            errno::EINVAL
        );
        let (_, data) = structured_read(&mut c, 6, 0, 0, 513).unwrap();
        assert_eq!(data[..512], [1; 512]);
        assert_eq!(data[512], FILL);
        c.disconnect();
    }

    /// BLOCK_STATUS for base:allocation: the extents as (length, flags).
    fn block_status(
        c: &mut Session,
        cookie: u64,
        flags: u16,
        off: u64,
        len: u32,
    ) -> Vec<(u32, u32)> {
        let (kind, p) = structured_call(c, req(Cmd::BlockStatus, flags, cookie, off, len));
        assert_eq!(kind, chunk::BLOCK_STATUS, "{p:?}");
        let b = BlockStatus::decode(&p).unwrap();
        assert_eq!(b.context, BASE_ALLOCATION_ID);
        let v: Vec<_> = b.extents().map(|e| (e.length, e.flags)).collect();
        let total: u64 = v.iter().map(|e| u64::from(e.0)).sum();
        assert!(total <= u64::from(len), "extents past the request: {v:?}");
        v
    }

    #[test]
    fn block_status_reports_holes_and_data_within_the_request() {
        let mut c = start_structured(sparse_file(), WITH_CONTEXT);
        let hole = state::HOLE | state::ZERO;
        let m = MIB as u32;
        assert_eq!(
            block_status(&mut c, 1, 0, 0, 4 * m),
            [(m, hole), (4096, 0), (3 * m - 4096, hole)]
        );
        // Clamped to the request, which ends inside a hole or inside data.
        assert_eq!(
            block_status(&mut c, 2, 0, 512, m),
            [(m - 512, hole), (512, 0)]
        );
        assert_eq!(block_status(&mut c, 3, 0, MIB + 100, 10), [(10, 0)]);
        // REQ_ONE: exactly one extent.
        assert_eq!(
            block_status(&mut c, 4, cmd_flags::REQ_ONE, 0, 4 * m),
            [(m, hole)]
        );
        assert_eq!(
            block_status(&mut c, 5, cmd_flags::REQ_ONE, MIB, 4 * m - m),
            [(4096, 0)]
        );
        // Past the end, empty, with an unknown flag: EINVAL.
        for (cookie, r) in [
            (6, req(Cmd::BlockStatus, 0, 6, 4 * MIB - 512, 1024)),
            (7, req(Cmd::BlockStatus, 0, 7, 0, 0)),
            (8, req(Cmd::BlockStatus, cmd_flags::DF, 8, 0, 512)),
        ] {
            assert_eq!(
                structured_error(&mut c, r),
                errno::EINVAL,
                "request {cookie}"
            );
        }
        // A write fills part of a hole: the next answer shows it.
        c.send(req(Cmd::Write, 0, 9, 0, 4096), &[3; 4096]);
        read_chunks(&mut c.client, 9);
        assert_eq!(
            block_status(&mut c, 10, 0, 0, 2 * m),
            [(4096, 0), (m - 4096, hole), (4096, 0), (m - 4096, hole)]
        );
        let (stats, _, _) = c.disconnect();
        assert_eq!(stats.errors, 3);
    }

    #[test]
    fn block_status_stays_within_the_request_whatever_storage_says() {
        // Alternating 512-byte holes and data, 3000 of them, for any range.
        let runs = (0..3000)
            .map(|i| Run {
                len: 512,
                hole: i % 2 == 0,
            })
            .collect();
        let file = TempFile::new(4 * MIB, 0);
        let export = Claims::export(&file, runs);
        let mut c = serve_export(
            export,
            Arc::new(Counts::default()),
            file,
            WITH_CONTEXT,
            Resources::new(1),
        );
        let hole = state::HOLE | state::ZERO;
        assert_eq!(
            block_status(&mut c, 1, cmd_flags::REQ_ONE, 0, 4096),
            [(512, hole)]
        );
        assert_eq!(block_status(&mut c, 2, 0, 0, 1000), [(512, hole), (488, 0)]);
        assert_eq!(
            block_status(&mut c, 3, 0, 0, 4 * MIB as u32).len(),
            MAX_EXTENTS
        );
        c.disconnect();
    }

    #[test]
    fn block_status_bounds_its_extent_count() {
        // 3000 data pages with holes between them: more runs than a reply
        // carries.
        let file = TempFile::new(8 * MIB, 0);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(file.path())
            .unwrap();
        for i in 0..(8 * MIB / 8192) {
            f.write_all_at(&[1; 4096], i * 8192).unwrap();
        }
        let mut c = start_structured(file, WITH_CONTEXT);
        let v = block_status(&mut c, 1, 0, 0, 8 * MIB as u32);
        assert_eq!(v.len(), MAX_EXTENTS);
        assert_eq!(v[..2], [(4096, 0), (4096, state::HOLE | state::ZERO)]);
        c.disconnect();
    }

    #[test]
    fn cache_is_a_bounded_readahead_hint() {
        let mut c = start(true, 1);
        // Allowed on a read-only export; no payload limit applies.
        assert_eq!(c.call(req(Cmd::Cache, 0, 1, 0, SIZE as u32)), 0);
        assert_eq!(c.call(req(Cmd::Cache, cmd_flags::FUA, 2, 4096, 512)), 0);
        assert_eq!(c.counts.caches.load(Ordering::SeqCst), 2);
        assert_eq!(
            c.call(req(Cmd::Cache, 0, 3, SIZE - 512, 1024)),
            errno::EINVAL
        );
        assert_eq!(
            c.call(req(Cmd::Cache, cmd_flags::DF, 4, 0, 512)),
            errno::EINVAL
        );
        let (stats, counts, _) = c.disconnect();
        assert_eq!(counts.caches.load(Ordering::SeqCst), 2);
        assert_eq!(stats.errors, 2);
    }

    #[test]
    fn a_fast_zero_that_would_be_slow_fails_with_enotsup_and_writes_nothing() {
        let mut c = start(false, 1);
        let fast = cmd_flags::FAST_ZERO;
        c.counts.slow_zeroes.store(true, Ordering::SeqCst);
        assert_eq!(
            c.call(req(Cmd::WriteZeroes, fast, 1, 0, 8192)),
            errno::ENOTSUP
        );
        assert_eq!(
            c.call(req(Cmd::WriteZeroes, fast | cmd_flags::NO_HOLE, 2, 0, 8192)),
            errno::ENOTSUP
        );
        assert_eq!(c.read(3, 0, 8192), vec![FILL; 8192]);
        assert_eq!(c.counts.writes(), 0);
        // Where it is fast (a hole punch in this file) it is done.
        c.counts.slow_zeroes.store(false, Ordering::SeqCst);
        assert_eq!(c.call(req(Cmd::WriteZeroes, fast, 4, 4096, 8192)), 0);
        let mut want = vec![FILL; 16384];
        want[4096..12288].fill(0);
        assert_eq!(c.read(5, 0, 16384), want);
        c.disconnect();
    }

    // Memory: request data is held against budgets, and a spent budget
    // stops the reader instead of allocating.

    /// One worker, a connection budget of two 4 KiB requests, and a server
    /// budget with no pool, so what is in use is what is in flight.
    fn small_budget(send_timeout: Option<Duration>) -> Resources {
        Resources {
            workers: 1,
            memory: Arc::new(Memory::new(16384, 0)),
            per_connection: 8192,
            send_timeout,
        }
    }

    /// Whether the client's send queue still holds bytes after a while:
    /// the server has stopped reading.
    fn stays_unread(s: &UnixStream) -> bool {
        std::thread::sleep(Duration::from_millis(200));
        let mut queued: libc::c_int = 0;
        // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one int through the pointer.
        let r = unsafe {
            libc::ioctl(
                std::os::fd::AsRawFd::as_raw_fd(s),
                libc::TIOCOUTQ,
                &mut queued,
            )
        };
        assert_eq!(r, 0);
        queued > 0
    }

    #[test]
    fn a_spent_budget_stops_the_reader_until_replies_go_out() {
        let res = small_budget(None);
        let memory = res.memory.clone();
        let mut c = start_res(TempFile::new(SIZE, FILL), false, res);
        // Two writes fill the connection's budget behind a slow FLUSH; the
        // third one's payload is left unread in the socket.
        flush_held_then_writes_of(&mut c, 3, 4096);
        assert!(stays_unread(&c.client), "the third payload was read");
        assert_eq!(memory.used(), 8192);
        c.counts.release();
        let mut cookies: Vec<u64> = (0..4).map(|_| read_reply(&mut c.client).cookie).collect();
        cookies.sort_unstable();
        assert_eq!(cookies, [1, 100, 101, 102]);
        let (stats, counts, file) = c.disconnect();
        assert_eq!((counts.writes(), stats.dropped), (3, 0));
        assert_eq!(file.read(2 * 4096, 4096), vec![0x55; 4096]);
        assert_eq!(memory.used(), 0, "memory of finished requests is held");
    }

    #[test]
    fn reads_hold_the_budget_too() {
        let res = small_budget(None);
        let memory = res.memory.clone();
        let mut c = start_res(TempFile::new(SIZE, FILL), false, res);
        c.counts.hold_next_flush();
        c.send(req(Cmd::Flush, 0, 1, 0, 0), &[]);
        c.counts.wait_held();
        for i in 0..2 {
            c.send(req(Cmd::Read, 0, 100 + i, 0, 4096), &[]);
        }
        wait_consumed(&c.client);
        // A third READ's request is read, but waits for memory; a WRITE
        // behind it is not read at all.
        c.send(req(Cmd::Read, 0, 102, 0, 4096), &[]);
        c.send(req(Cmd::Write, 0, 103, 0, 4096), &[0x55; 4096]);
        assert!(stays_unread(&c.client));
        assert_eq!(memory.used(), 8192);
        c.counts.release();
        for _ in 0..5 {
            let rep = read_reply(&mut c.client);
            assert_eq!(rep.error, 0);
            if rep.cookie != 1 && rep.cookie != 103 {
                let mut d = vec![0u8; 4096];
                c.client.read_exact(&mut d).unwrap();
            }
        }
        c.disconnect();
        assert_eq!(memory.used(), 0);
    }

    #[test]
    fn a_connection_that_dies_while_waiting_for_memory_runs_nothing_more() {
        let res = small_budget(None);
        let memory = res.memory.clone();
        let mut c = start_res(TempFile::new(SIZE, FILL), false, res);
        flush_held_then_writes_of(&mut c, 3, 4096);
        assert!(stays_unread(&c.client));
        // The client goes: the FLUSH's reply fails, which kills the
        // connection; the queued writes are dropped, and the one waiting
        // for their memory is read (its payload is in the socket) and
        // dropped too.
        drop(c.client);
        c.counts.release();
        let stats = c.server.join().unwrap().unwrap();
        assert_eq!(c.counts.writes(), 0, "a write of a dead connection ran");
        assert_eq!(stats.dropped, 3);
        assert_untouched(&c.file, 3);
        assert_eq!(memory.used(), 0, "a dead connection's memory is held");
    }

    #[test]
    fn a_half_closed_client_does_not_leave_the_reader_waiting_for_parked_memory() {
        // As above, but the client only shuts down its write side: the
        // FLUSH's reply goes out, the queued writes are parked (the peer
        // hung up) holding their memory, and the reader waits for memory
        // only they could give back. It must stop waiting and drop them.
        let res = small_budget(None);
        let memory = res.memory.clone();
        let mut c = start_res(TempFile::new(SIZE, FILL), false, res);
        flush_held_then_writes_of(&mut c, 3, 4096);
        assert!(stays_unread(&c.client));
        c.client.shutdown(std::net::Shutdown::Write).unwrap();
        c.counts.release();
        let rep = read_reply(&mut c.client);
        assert_eq!((rep.error, rep.cookie), (0, 1));
        let start = std::time::Instant::now();
        while !c.server.is_finished() {
            assert!(start.elapsed() < PATIENCE, "the reader waits for ever");
            std::thread::sleep(Duration::from_millis(10));
        }
        let stats = c.server.join().unwrap().unwrap();
        assert_eq!(c.counts.writes(), 0, "a write of a dead connection ran");
        // Two parked; the third never got its memory, so it was not read.
        assert_eq!(stats.dropped, 2);
        assert_untouched(&c.file, 3);
        assert_eq!(memory.used(), 0, "a dead connection's memory is held");
    }

    #[test]
    fn a_client_that_never_reads_is_dropped_after_the_send_timeout() {
        let timeout = Duration::from_millis(300);
        let mut res = small_budget(Some(timeout));
        res.per_connection = 1 << 20;
        res.memory = Arc::new(Memory::new(1 << 20, 0));
        let memory = res.memory.clone();
        let mut c = start_res(TempFile::new(SIZE, FILL), false, res);
        // 64 KiB READs until the replies fill the socket: the worker is
        // stuck in send and the reader in the budget.
        for i in 0..64 {
            c.send(req(Cmd::Read, 0, i, 0, 65536), &[]);
        }
        let start = std::time::Instant::now();
        while !c.server.is_finished() {
            let took = start.elapsed();
            assert!(took < timeout * 10, "still served after {took:?}");
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = c.server.join().unwrap();
        assert_eq!(memory.used(), 0, "the dropped connection's memory is held");
    }

    #[test]
    fn buffers_are_reused_across_requests() {
        let res = Resources {
            memory: Arc::new(Memory::new(1 << 30, 1 << 20)),
            ..Resources::new(1)
        };
        let memory = res.memory.clone();
        let mut c = start_res(TempFile::new(SIZE, FILL), false, res);
        // A buffer goes back right after its reply is sent.
        let pooled = |n: u64| {
            let start = std::time::Instant::now();
            while memory.pooled() != n {
                assert!(start.elapsed() < PATIENCE, "pooled {}", memory.pooled());
                std::thread::sleep(Duration::from_millis(2));
            }
        };
        assert_eq!(c.write(1, 0, 0, &[1; 65536]), 0);
        pooled(65536);
        // The READ takes the payload's buffer, and gives it back.
        assert_eq!(c.read(2, 0, 4096), vec![1; 4096]);
        pooled(65536);
        assert_eq!(c.write(3, 0, 4096, &[3; 4096]), 0);
        pooled(65536);
        assert_eq!(c.read(4, 0, 8192), [[1; 4096], [3; 4096]].concat());
        pooled(65536);
        assert_eq!(memory.used(), 65536, "more than one buffer was used");
        c.disconnect();
        // The last connection is gone: nothing is kept.
        assert_eq!((memory.pooled(), memory.used()), (0, 0));
    }

    #[test]
    fn a_reset_connection_stops_waiting_for_the_server_budget() {
        // Connection A holds the whole server budget with two writes queued
        // behind a slow FLUSH; connection B's write waits for it. B's client
        // then resets its connection: B gives up at once instead of waiting
        // for A, and its write never runs.
        let file = TempFile::new(SIZE, FILL);
        let (export, counts) = probed_export("disk", &file, false);
        let res = small_budget(None);
        let memory = res.memory.clone();
        let mut res_a = res.clone();
        res_a.per_connection = 16384;
        let (mut a, mut a_end) = pair();
        let (ea, eb) = (export.clone(), export);
        let server_a = std::thread::spawn(move || {
            let fd = std::os::fd::AsRawFd::as_raw_fd(&a_end);
            serve(&mut a_end, fd, ea, Negotiated::default(), &res_a)
        });
        counts.hold_next_flush();
        send_request(&mut a, req(Cmd::Flush, 0, 1, 0, 0), &[]);
        counts.wait_held();
        for i in 0..4 {
            send_request(
                &mut a,
                req(Cmd::Write, 0, 100 + i, i * 4096, 4096),
                &[0x55; 4096],
            );
        }
        wait_consumed(&a);
        assert_eq!(memory.used(), 16384);
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut b = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let mut b_end = l.accept().unwrap().0;
        let server_b = std::thread::spawn(move || {
            let fd = std::os::fd::AsRawFd::as_raw_fd(&b_end);
            serve(&mut b_end, fd, eb, Negotiated::default(), &res)
        });
        send_request(
            &mut b,
            req(Cmd::Write, 0, 200, 5 * 4096, 4096),
            &[0x66; 4096],
        );
        std::thread::sleep(Duration::from_millis(100));
        let linger = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: `linger` is a valid struct of the size passed; the fd is
        // `b`'s open socket. A zero linger makes the close a reset.
        let r = unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&b),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                std::ptr::addr_of!(linger).cast(),
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        assert_eq!(r, 0);
        drop(b);
        let start = std::time::Instant::now();
        while !server_b.is_finished() {
            assert!(start.elapsed() < PATIENCE / 4, "B still waits for memory");
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = server_b.join().unwrap();
        assert_eq!(counts.writes(), 0);
        assert_eq!(memory.used(), 16384, "A's memory was touched");
        counts.release();
        for _ in 0..5 {
            assert_eq!(read_reply(&mut a).error, 0);
        }
        drop(a);
        let _ = server_a.join().unwrap();
        assert_eq!(counts.writes(), 4, "B's write ran");
        assert_eq!(file.read(5 * 4096, 4096), vec![FILL; 4096]);
        assert_eq!(memory.used(), 0);
    }

    /// Like [`flush_held_then_writes`], with `len`-byte writes.
    fn flush_held_then_writes_of(c: &mut Session, n: u64, len: usize) {
        c.counts.hold_next_flush();
        c.send(req(Cmd::Flush, 0, 1, 0, 0), &[]);
        c.counts.wait_held();
        for i in 0..n {
            c.send(
                req(Cmd::Write, 0, 100 + i, i * 4096, len as u32),
                &vec![0x55; len],
            );
        }
    }
}
