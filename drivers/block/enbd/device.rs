// SPDX-License-Identifier: GPL-2.0
//! One `/dev/enbdN`: configuration, the request journal, channels and the
//! control ioctls.
//!
//! # Locks
//!
//! Taken in this order, never the other way round:
//!
//! 1. `Device::ctl` (mutex): the control path. Serialises ioctls and
//!    teardown, owns the channel threads. May sleep while held (it joins
//!    threads and freezes the queue).
//! 2. `Device::io` (spinlock): the journal, channel states and device state.
//!    Held only for short, non-sleeping sections, including from `queue_rq`.
//!    Requests are never completed while it is held: completion can re-enter
//!    the block layer.
//!
//! The condition variables `work` (senders wait for queued requests and
//! probes), `idle` (disconnect waits for the journal to drain) and `events`
//! (`IOC_WAIT` waits for the epoch to change) are used with `io`; a sender
//! may wake `work` while it holds `io` (the wait queue's own lock nests
//! inside `io`, as in every wait).
//!
//! The module's manager thread calls `tick` every 200 ms: it ages in-flight
//! requests, probes quiet channels, drops channels that fail their probe or
//! hold a timed-out write (write fencing) and fails requests once no
//! channel was seen for `dead_timeout`.
//!
//! # Write fencing
//!
//! A modifying request is resubmitted only by `Journal::drop_channel`, which
//! `channel_failed` calls after the channel's socket was aborted
//! (`Socket::abort`: unsent data dropped, the peer reset), so the old channel
//! can deliver nothing more of it. A server that executes only what it read
//! from a live connection (enbd-server does) therefore never lands an old
//! copy after a newer write.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

use kernel::error::{code, Result};
use kernel::prelude::*;
use kernel::sync::{Arc, ArcBorrow, CondVar, Mutex, SpinLock};
use kernel::uaccess::UserSlice;

use crate::channel::{self, ChanInfo, ChanState, Channel};
use crate::health::Tick;
use crate::journal::{self, Journal, Kind, Outcome, Slot};
use crate::ratelimit::RateLimit;
use crate::sys::{self, BlkStatus, BlockDriver, DiskRef, Limits, Param, ReqOp, Rq, Socket, Thread};
use crate::uapi::{self, Config, DevState, ServerArg, ServersArg, SockArg, Status, WaitArg};
use crate::wake::{Wake, Wakeups};
use crate::wire::{tx, Cmd, Request};

pub(crate) type RqJournal = Journal<Rq, KVec<Slot<Rq>>>;

/// State under `Device::io`.
pub(crate) struct Io {
    pub(crate) state: DevState,
    pub(crate) config: Config,
    pub(crate) token_rejects: u64,
    pub(crate) journal: RqJournal,
    /// One record per channel id (`ChanState::Unused` for free ids).
    pub(crate) chans: KVec<ChanSlot>,
    /// Channels in state `Up`.
    pub(crate) live: u32,
    /// The servers `IOC_SERVERS` described (`server_count` of them) and the
    /// bytes sent to each.
    pub(crate) servers: [ServerInfo; uapi::MAX_SERVERS],
    server_count: u32,
    /// The server whose channels carry the requests while any of them can.
    active_server: Option<u32>,
    /// Whether the configuration reached the disk (first channel).
    applied: bool,
    /// When the last channel went away.
    waiting_since: u64,
    /// Bumped on every channel or state change; `IOC_WAIT` waits for it.
    pub(crate) epoch: u32,
    next_serial: u64,
    /// Channel up/drop messages: a reconnect storm must not flood the log.
    chan_log: RateLimit,
    /// Given-up request messages.
    gave_up_log: RateLimit,
    /// A wake-up queued requests may still be owed (see `wake.rs`).
    pub(crate) wakeups: Wakeups,
}

impl Io {
    /// The info of `chan` if it is still the live channel of its id.
    pub(crate) fn chan_mut(&mut self, chan: &Channel) -> Option<&mut ChanInfo> {
        self.chans
            .get_mut(chan.id as usize)
            .map(|s| &mut s.info)
            .filter(|c| c.state == ChanState::Up && c.serial == chan.serial)
    }

    /// The infos of all channel ids.
    fn infos(&self) -> impl Iterator<Item = &ChanInfo> {
        self.chans.iter().map(|s| &s.info)
    }

    /// The info of channel id `id`.
    fn info_mut(&mut self, id: usize) -> Option<&mut ChanInfo> {
        self.chans.get_mut(id).map(|s| &mut s.info)
    }

    /// Whether several channels may carry requests at once. Without the
    /// server's `CAN_MULTI_CONN` the NBD spec promises no consistency across
    /// connections, so only one channel is active and the others are warm
    /// reserves (probed, but given no requests). Several servers are used
    /// only for exports the helper knows to be consistent across them
    /// (read-only, or a backend the user said is shared), so their channels
    /// count as multi-conn.
    fn multi_conn(&self) -> bool {
        self.config.nbd_flags & u32::from(tx::CAN_MULTI_CONN) != 0 || self.server_count > 1
    }

    /// Whether some channel to the chosen server takes requests now (true
    /// when no server is chosen).
    fn active_server_can(&self) -> bool {
        self.active_server.map_or(true, |a| {
            self.infos()
                .any(|c| c.state == ChanState::Up && c.server == a && c.health.takes_requests())
        })
    }

    /// Whether channel `id` is active (not a reserve): every live channel
    /// with `CAN_MULTI_CONN`, else the oldest live one. A reserve becomes
    /// active only once the active channel is dead, which `channel_failed`
    /// marks after aborting its socket.
    pub(crate) fn is_active(&self, id: usize) -> bool {
        let Some(c) = self
            .chans
            .get(id)
            .map(|s| &s.info)
            .filter(|c| c.state == ChanState::Up)
        else {
            return false;
        };
        self.multi_conn()
            || !self
                .infos()
                .any(|o| o.state == ChanState::Up && o.serial < c.serial)
    }

    /// Whether channel `id` may take requests now: healthy, active, and
    /// leading to the chosen server unless none of that server's channels
    /// can (`replica::carries`).
    pub(crate) fn takes_requests(&self, id: usize) -> bool {
        self.chans.get(id).is_some_and(|s| {
            s.info.health.takes_requests()
                && crate::replica::carries(
                    s.info.server,
                    self.active_server,
                    self.active_server_can(),
                )
        }) && self.is_active(id)
    }

    /// Whether some live sender would refuse a request (a suspect, reserve
    /// or standby channel), so a single wake-up could be lost on it.
    fn has_idle_refusers(&self) -> bool {
        (!self.multi_conn() && self.live > 1)
            || self.infos().any(|c| {
                c.state == ChanState::Up
                    && (!c.health.takes_requests()
                        || self.active_server.is_some_and(|a| a != c.server))
            })
    }

    /// Working channels to each server.
    fn server_channels(&self) -> [u8; uapi::MAX_SERVERS] {
        let mut n = [0u8; uapi::MAX_SERVERS];
        for c in self.infos().filter(|c| c.state == ChanState::Up) {
            if let Some(k) = n.get_mut(c.server as usize) {
                *k = k.saturating_add(1);
            }
        }
        n
    }

    /// Whether new requests are taken (possibly to wait for a channel).
    fn accepts(&self) -> bool {
        self.state == DevState::Connected || (self.state == DevState::Waiting && self.applied)
    }

    fn bump(&mut self) {
        self.epoch = self.epoch.wrapping_add(1);
    }
}

const NSEC_PER_SEC: u64 = 1_000_000_000;
/// At most `LOG_BURST` messages of a kind per `LOG_INTERVAL` and device.
const LOG_INTERVAL: u64 = 5 * NSEC_PER_SEC;
const LOG_BURST: u32 = 10;

fn param_ns(p: Param) -> u64 {
    u64::from(sys::param(p)) * NSEC_PER_SEC
}

/// Iterates the set bits of a channel mask.
fn bits(mask: u64) -> impl Iterator<Item = usize> {
    (0..64).filter(move |i| mask & (1u64 << i) != 0)
}

/// One channel id: its state and counters and, while the id is taken, the
/// running channel. A single record, so nothing has to be kept in step.
#[derive(Default)]
pub(crate) struct ChanSlot {
    pub(crate) info: ChanInfo,
    /// Set by `IOC_ADD_SOCK` and taken again only by the control path
    /// (under `ctl`), which drops it outside the spinlock: dropping joins
    /// the threads.
    run: Option<ChanHandle>,
}

/// A running channel and its threads. Dropping it shuts the socket down,
/// which ends both threads, and joins them.
struct ChanHandle {
    chan: Arc<Channel>,
    tx: Option<Thread>,
    rx: Option<Thread>,
}

impl ChanHandle {
    /// Joins the sender, tells the server NBD_CMD_DISC, then closes. Only
    /// for a channel whose requests are all answered, so the sender is idle
    /// and the DISC cannot interleave with a request on the wire.
    fn close_with_disc(mut self) {
        drop(self.tx.take());
        let d = Request::new(Cmd::Disc, 0, 0, 0, 0).encode();
        let _ = self.chan.sock.send(&d, false);
    }
}

impl Drop for ChanHandle {
    fn drop(&mut self) {
        self.chan.sock.shutdown();
        drop(self.tx.take());
        drop(self.rx.take());
    }
}

/// What the device knows of one server: what the helper last told it
/// (`IOC_SERVERS`), and the payload bytes of the requests sent to it.
#[derive(Clone, Copy, Default)]
pub(crate) struct ServerInfo {
    pub(crate) arg: ServerArg,
    pub(crate) bytes: u64,
}

/// Proof that `Device::ctl` is held: it guards no data of its own, it
/// serialises the control path (channel start and teardown, configuration).
struct Ctl;

/// Counters read by `/proc/nbdinfo`; relaxed, as they are statistics only.
#[derive(Default)]
pub(crate) struct Stats {
    pub(crate) requests: AtomicU64,
    pub(crate) reads: AtomicU64,
    pub(crate) writes: AtomicU64,
    pub(crate) flushes: AtomicU64,
    pub(crate) trims: AtomicU64,
    pub(crate) zeroes: AtomicU64,
    pub(crate) read_bytes: AtomicU64,
    pub(crate) written_bytes: AtomicU64,
    pub(crate) errors: AtomicU64,
    pub(crate) late_replies: AtomicU64,
}

/// How the kernel log names a request's operation.
fn op_name(op: ReqOp) -> &'static str {
    match op {
        ReqOp::Read => "READ",
        ReqOp::Write => "WRITE",
        ReqOp::Flush => "FLUSH",
        ReqOp::Discard => "TRIM",
        ReqOp::WriteZeroes => "WRITE_ZEROES",
        ReqOp::Other(_) => "unknown request",
    }
}

/// The journal's kind of a request.
fn kind_of(rq: &Rq) -> Kind {
    match rq.op() {
        ReqOp::Read => Kind::Read(rq.len()),
        ReqOp::Write | ReqOp::Discard | ReqOp::WriteZeroes => Kind::Modify,
        ReqOp::Flush | ReqOp::Other(_) => Kind::Other,
    }
}

/// See `Device::snapshot`.
pub(crate) struct Snapshot {
    pub(crate) state: DevState,
    pub(crate) config: Config,
    pub(crate) token_rejects: u64,
    pub(crate) live: u32,
    pub(crate) queued: u32,
    pub(crate) in_flight: u32,
    pub(crate) resubmits: u64,
    pub(crate) gave_up: u64,
    pub(crate) max_channels: usize,
}

#[pin_data]
pub(crate) struct Device {
    index: u32,
    #[pin]
    ctl: Mutex<Ctl>,
    #[pin]
    pub(crate) io: SpinLock<Io>,
    #[pin]
    pub(crate) work: CondVar,
    #[pin]
    idle: CondVar,
    #[pin]
    events: CondVar,
    /// Sender threads neither asleep on `work` nor in the middle of a send.
    /// Each looks at the queue (under `io`) before it sleeps, so queue_rq
    /// wakes a sleeper only when the queue holds more requests than there
    /// are free senders: fewer context switches, and the channel that comes
    /// back first takes the next request. A sender counts itself before it
    /// takes `io`, so a request queued while the count says "free" is seen.
    pub(crate) free_senders: AtomicU32,
    pub(crate) stats: Stats,
}

/// Maps a block request to the NBD request header (cookie filled in later)
/// and whether its payload must be held while sending (it carries data).
pub(crate) fn header_of(rq: &Rq) -> (Request, bool) {
    let (cmd, offset, len) = match rq.op() {
        ReqOp::Read => (Cmd::Read, rq.offset(), rq.len()),
        ReqOp::Write => (Cmd::Write, rq.offset(), rq.len()),
        ReqOp::Flush => (Cmd::Flush, 0, 0),
        ReqOp::Discard => (Cmd::Trim, rq.offset(), rq.len()),
        // queue_rq refuses anything else before it reaches the journal.
        ReqOp::WriteZeroes | ReqOp::Other(_) => (Cmd::WriteZeroes, rq.offset(), rq.len()),
    };
    let mut flags = 0;
    if rq.fua() {
        flags |= crate::wire::cmd_flags::FUA;
    }
    if cmd == Cmd::WriteZeroes && rq.nounmap() {
        flags |= crate::wire::cmd_flags::NO_HOLE;
    }
    (Request::new(cmd, flags, 0, offset, len), cmd == Cmd::Write)
}

impl Device {
    pub(crate) fn new(index: u32, depth: u32, max_channels: u32) -> Result<Arc<Self>> {
        let mut slots = KVec::with_capacity(depth as usize, GFP_KERNEL)?;
        for _ in 0..depth {
            slots.push(Slot::default(), GFP_KERNEL)?;
        }
        let mut journal = Journal::new(slots);
        journal.set_max_resubmits(sys::param(Param::MaxResubmits));
        let mut chans = KVec::with_capacity(max_channels as usize, GFP_KERNEL)?;
        for _ in 0..max_channels {
            chans.push(ChanSlot::default(), GFP_KERNEL)?;
        }
        Arc::pin_init(
            pin_init!(Self {
                index,
                ctl <- kernel::new_mutex!(Ctl, "enbd:ctl"),
                io <- kernel::new_spinlock!(Io {
                    state: DevState::Unconfigured,
                    config: Config::default(),
                    token_rejects: 0,
                    journal,
                    chans,
                    live: 0,
                    servers: Default::default(),
                    server_count: 0,
                    active_server: None,
                    applied: false,
                    waiting_since: 0,
                    epoch: 0,
                    next_serial: 0,
                    chan_log: RateLimit::default(),
                    gave_up_log: RateLimit::default(),
                    wakeups: Wakeups::default(),
                }, "enbd:io"),
                work <- kernel::new_condvar!("enbd:work"),
                idle <- kernel::new_condvar!("enbd:idle"),
                events <- kernel::new_condvar!("enbd:events"),
                free_senders: AtomicU32::new(0),
                stats: Stats::default(),
            }),
            GFP_KERNEL,
        )
    }

    pub(crate) fn index(&self) -> u32 {
        self.index
    }

    /// A consistent copy of what `/proc/nbdinfo` shows.
    pub(crate) fn snapshot(&self) -> Snapshot {
        let io = self.io.lock();
        Snapshot {
            state: io.state,
            config: io.config,
            token_rejects: io.token_rejects,
            live: io.live,
            queued: io.journal.queued(),
            in_flight: io.journal.in_flight(),
            resubmits: io.journal.resubmits(),
            gave_up: io.journal.gave_up(),
            max_channels: io.chans.len(),
        }
    }

    /// One channel's state and counters, and its role: `active`,
    /// `standby` (it leads to a server other than the chosen one),
    /// `reserve` (a warm reserve without `CAN_MULTI_CONN`) or `-` (not up).
    pub(crate) fn chan_info(&self, id: usize) -> Option<(ChanInfo, &'static str)> {
        let io = self.io.lock();
        io.chans.get(id).map(|s| {
            let role = if s.info.state != ChanState::Up {
                "-"
            } else if !io.is_active(id) {
                "reserve"
            } else if io.active_server.is_some_and(|a| a != s.info.server) {
                "standby"
            } else {
                "active"
            };
            (s.info, role)
        })
    }

    /// Server `id` as `IOC_SERVERS` described it, its counters, whether it
    /// is the chosen one and its working channels; `None` past the last.
    pub(crate) fn server_info(&self, id: usize) -> Option<(ServerInfo, bool, u8)> {
        let io = self.io.lock();
        if id >= io.server_count as usize {
            return None;
        }
        let s = io.servers.get(id)?;
        let chans = io.server_channels().get(id).copied().unwrap_or(0);
        Some((*s, io.active_server == Some(id as u32), chans))
    }

    /// Takes a new request from blk-mq. Called in atomic context.
    pub(crate) fn queue_rq(&self, rq: Rq) {
        let op = rq.op();
        let supported = matches!(
            op,
            ReqOp::Read | ReqOp::Write | ReqOp::Flush | ReqOp::Discard | ReqOp::WriteZeroes
        );
        if !supported {
            self.stats.errors.fetch_add(1, Relaxed);
            rq.end(BlkStatus::NOTSUPP);
            return;
        }
        let kind = kind_of(&rq);
        let tag = rq.tag();
        let refused = {
            let mut io = self.io.lock();
            if !io.accepts() {
                Err(rq)
            } else {
                match io.journal.push(tag, rq, kind) {
                    Ok(()) => {
                        let queued = io.journal.queued();
                        let free = self.free_senders.load(Relaxed);
                        // Only asked when it matters (it walks the channels).
                        let refusers = queued > free && io.has_idle_refusers();
                        Ok(io.wakeups.queued(queued, free, refusers))
                    }
                    Err((_, rq)) => Err(rq),
                }
            }
        };
        match refused {
            Ok(Wake::None) => {}
            Ok(Wake::One) => self.work.notify_one(),
            Ok(Wake::All) => self.work.notify_all(),
            Err(rq) => {
                self.stats.errors.fetch_add(1, Relaxed);
                rq.end(BlkStatus::IOERR);
            }
        }
    }

    /// Completes a request the server answered with NBD error `err`.
    pub(crate) fn complete(&self, rq: Rq, err: u32) {
        let s = &self.stats;
        s.requests.fetch_add(1, Relaxed);
        let len = u64::from(rq.len());
        match rq.op() {
            ReqOp::Read => {
                s.reads.fetch_add(1, Relaxed);
                if err == 0 {
                    s.read_bytes.fetch_add(len, Relaxed);
                }
            }
            ReqOp::Write => {
                s.writes.fetch_add(1, Relaxed);
                if err == 0 {
                    s.written_bytes.fetch_add(len, Relaxed);
                }
            }
            ReqOp::Flush => {
                s.flushes.fetch_add(1, Relaxed);
            }
            ReqOp::Discard => {
                s.trims.fetch_add(1, Relaxed);
            }
            ReqOp::WriteZeroes | ReqOp::Other(_) => {
                s.zeroes.fetch_add(1, Relaxed);
            }
        }
        if err == 0 {
            rq.end(BlkStatus::OK);
        } else {
            s.errors.fetch_add(1, Relaxed);
            rq.end(BlkStatus::from_errno(err));
        }
    }

    /// Fails a request with an I/O error (no channel, eject).
    fn fail(&self, rq: Rq) {
        self.stats.errors.fetch_add(1, Relaxed);
        rq.end(BlkStatus::IOERR);
    }

    /// Acts on what a journal operation asks for.
    pub(crate) fn finish(
        &self,
        out: core::result::Result<Outcome<Rq>, (journal::JournalError, Rq)>,
    ) {
        match out {
            Ok(Outcome::Done) => {}
            Ok(Outcome::Complete(rq, err)) => self.complete(rq, err),
            Ok(Outcome::Fail(rq)) => self.fail(rq),
            Ok(Outcome::Requeued) => {
                self.work.notify_all();
                self.fail_given_up();
            }
            Err((e, rq)) => {
                pr_err!("enbd{}: journal refused a request: {:?}\n", self.index, e);
                self.fail(rq);
            }
        }
    }

    /// Fails the requests that ran out of resubmissions, each with one
    /// (rate-limited) log line.
    pub(crate) fn fail_given_up(&self) {
        loop {
            let (g, log) = {
                let mut io = self.io.lock();
                let Some(g) = io.journal.pop_given_up() else {
                    return;
                };
                let log = io.gave_up_log.allow(sys::now_ns(), LOG_INTERVAL, LOG_BURST);
                (g, log)
            };
            let rq = g.payload;
            if let Some(suppressed) = log {
                pr_err!(
                    "enbd{}: giving up on {} of {} bytes at offset {} after {} resubmits ({} similar messages suppressed)\n",
                    self.index,
                    op_name(rq.op()),
                    rq.len(),
                    rq.offset(),
                    g.resubmits,
                    suppressed
                );
            }
            self.fail(rq);
        }
    }

    /// Whether a channel up/drop message may be logged now.
    fn chan_log(&self) -> Option<u32> {
        self.io
            .lock()
            .chan_log
            .allow(sys::now_ns(), LOG_INTERVAL, LOG_BURST)
    }

    /// Fails everything in the journal; held requests fail when returned.
    fn fail_pending(&self) {
        loop {
            let rq = self.io.lock().journal.fail_one();
            match rq {
                Some(rq) => self.fail(rq),
                None => break,
            }
        }
    }

    /// A channel broke (socket error, bad reply, unknown cookie, failed
    /// probe, timed-out write): abort its socket, then roll its requests
    /// back to the queue, where the other channels, or a replacement the
    /// helper hands in, pick them up. The abort comes first, so a write is
    /// resubmitted only once its old channel cannot deliver it (write
    /// fencing); a reserve channel becomes active only then too.
    pub(crate) fn channel_failed(&self, chan: &Channel, why: &'static str) {
        // The first reason given is the one logged: the abort below makes
        // the channel's own threads fail too, with a less telling one.
        match self.io.lock().chan_mut(chan) {
            Some(info) => {
                info.condemned.get_or_insert(why);
            }
            None => return,
        }
        chan.sock.abort();
        let why = {
            let mut io = self.io.lock();
            let Some(info) = io.chan_mut(chan) else {
                return;
            };
            let why = info.condemned.unwrap_or(why);
            info.state = ChanState::Dead;
            info.errors += 1;
            io.live = io.live.saturating_sub(1);
            let n = io.journal.drop_channel(chan.id);
            if let Some(info) = io.info_mut(chan.id as usize) {
                info.resubmits += u64::from(n);
            }
            if io.live == 0 && io.state == DevState::Connected {
                io.state = DevState::Waiting;
                io.waiting_since = sys::now_ns();
            }
            io.bump();
            why
        };
        if !why.is_empty() {
            if let Some(suppressed) = self.chan_log() {
                pr_warn!(
                    "enbd{}: channel {} dropped: {} ({} similar messages suppressed)\n",
                    self.index,
                    chan.id,
                    why,
                    suppressed
                );
            }
        }
        self.work.notify_all();
        self.idle.notify_all();
        self.events.notify_all();
        self.fail_given_up();
    }

    /// Periodic work, from the module's manager thread.
    pub(crate) fn tick(&self, now: u64) {
        let timeout = param_ns(Param::RequestTimeout);
        let keepalive = param_ns(Param::KeepaliveInterval);
        let dead = param_ns(Param::DeadTimeout);
        // The serial of each channel judged here, so a channel that takes
        // the id of one that died meanwhile is not dropped in its place.
        let mut serials = [0u64; journal::MAX_CHANNELS];
        let (fence, stuck, silent, wake, expired) = {
            let mut io = self.io.lock();
            if !matches!(io.state, DevState::Connected | DevState::Waiting) {
                return;
            }
            for (id, s) in io.chans.iter().enumerate().take(serials.len()) {
                serials[id] = s.info.serial;
            }
            io.journal
                .set_max_resubmits(sys::param(Param::MaxResubmits));
            let aged = io.journal.age(now, timeout);
            // With several servers, a timeout makes the server suspect:
            // all its channels, so the standbys take over at once.
            let suspects = if io.server_count > 1 {
                crate::replica::suspects_of(aged.suspects, |id| {
                    io.chans
                        .get(id)
                        .map(|s| &s.info)
                        .filter(|c| c.state == ChanState::Up)
                        .map(|c| c.server)
                })
            } else {
                aged.suspects
            };
            for id in bits(suspects) {
                if let Some(info) = io.info_mut(id) {
                    if info.state == ChanState::Up {
                        info.health.suspect();
                        if aged.suspects & (1u64 << id) != 0 {
                            info.spoiled += 1;
                        }
                    }
                }
            }
            let mut wake = aged.rolled_back > 0 || suspects != 0;
            let mut silent = 0u64;
            for (id, info) in io.chans.iter_mut().map(|s| &mut s.info).enumerate() {
                if info.state != ChanState::Up {
                    continue;
                }
                match info.health.tick(now, keepalive, timeout) {
                    Tick::Idle => {}
                    Tick::SendProbe => wake = true,
                    Tick::Drop => silent |= 1u64 << id,
                }
            }
            let expired = io.state == DevState::Waiting
                && io.applied
                && dead > 0
                && now.saturating_sub(io.waiting_since) >= dead;
            if expired {
                io.state = DevState::Dead;
                io.bump();
            }
            (aged.fence, aged.stuck, silent, wake, expired)
        };
        if wake {
            self.work.notify_all();
        }
        for (mask, why) in [
            (fence, "write timed out; fenced before it is resubmitted"),
            (stuck, "request timed out in mid-transfer"),
            (silent, "keep-alive unanswered"),
        ] {
            for id in bits(mask) {
                let chan = {
                    let io = self.io.lock();
                    let run = io.chans.get(id).and_then(|s| s.run.as_ref());
                    run.filter(|r| r.chan.serial == serials[id])
                        .map(|r| r.chan.clone())
                };
                if let Some(chan) = chan {
                    self.channel_failed(&chan, why);
                }
            }
        }
        self.fail_given_up();
        if expired {
            pr_warn!(
                "enbd{}: no channel for {} s (dead_timeout): failing I/O\n",
                self.index,
                dead / NSEC_PER_SEC
            );
            self.fail_pending();
            self.events.notify_all();
        }
    }

    /// Marks every channel dead, wakes their threads and joins them. With
    /// `disc`, each server is told NBD_CMD_DISC first.
    fn stop_channels(&self, _ctl: &mut Ctl, disc: bool) {
        let n = {
            let mut io = self.io.lock();
            for s in io.chans.iter_mut() {
                if s.info.state == ChanState::Up {
                    s.info.state = ChanState::Dead;
                }
            }
            io.live = 0;
            io.chans.len()
        };
        self.work.notify_all();
        for id in 0..n {
            // Taken out under the spinlock, joined outside it.
            let run = self.io.lock().chans.get_mut(id).and_then(|s| s.run.take());
            match run {
                Some(h) if disc => h.close_with_disc(),
                h => drop(h),
            }
        }
        let mut io = self.io.lock();
        for s in io.chans.iter_mut() {
            s.info = ChanInfo::default();
        }
        io.bump();
    }

    /// Undoes a channel whose threads could not all be started.
    fn abandon(&self, _ctl: &mut Ctl, chan: &Channel) {
        self.channel_failed(chan, "");
        let run = {
            let mut io = self.io.lock();
            io.chans.get_mut(chan.id as usize).and_then(|s| {
                s.info = ChanInfo::default();
                s.run.take()
            })
        };
        drop(run);
    }

    /// Joins channels that died on their own, freeing their ids.
    fn reap(&self, _ctl: &mut Ctl) {
        let n = self.io.lock().chans.len();
        for id in 0..n {
            let run = {
                let mut io = self.io.lock();
                match io.chans.get_mut(id) {
                    Some(s) if s.run.is_some() && s.info.state == ChanState::Dead => {
                        s.info = ChanInfo::default();
                        s.run.take()
                    }
                    _ => None,
                }
            };
            // Joined outside the spinlock.
            drop(run);
        }
    }

    /// Returns the device to the unconfigured state.
    fn reset(&self, _ctl: &mut Ctl, disk: Option<DiskRef<'_>>) {
        self.fail_pending();
        if let Some(disk) = disk {
            disk.invalidate();
        }
        let mut io = self.io.lock();
        io.state = DevState::Unconfigured;
        io.config = Config::default();
        io.applied = false;
        io.servers = Default::default();
        io.server_count = 0;
        io.active_server = None;
        io.bump();
        drop(io);
        self.events.notify_all();
    }

    /// Fails everything pending and releases the channels; used before the
    /// disk is deleted at module exit.
    pub(crate) fn shutdown(&self) {
        let mut ctl = self.ctl.lock();
        self.io.lock().state = DevState::Closing;
        self.fail_pending();
        self.stop_channels(&mut ctl, false);
        self.fail_pending();
    }

    /// Handles an ioctl on the block device. `this` is a borrowed reference,
    /// so new channel threads can take references of their own.
    pub(crate) fn ioctl(
        this: ArcBorrow<'_, Self>,
        disk: DiskRef<'_>,
        cmd: u32,
        arg: usize,
    ) -> Result {
        if !sys::capable_sys_admin() {
            return Err(code::EPERM);
        }
        let dev: &Self = &this;
        match cmd {
            uapi::IOC_STATUS => dev.ioctl_status(arg),
            uapi::IOC_WAIT => dev.ioctl_wait(arg),
            uapi::IOC_CONFIGURE => dev.ioctl_configure(arg),
            uapi::IOC_ADD_SOCK => dev.ioctl_add_sock(this.into(), disk, arg),
            uapi::IOC_DISCONNECT => dev.ioctl_disconnect(disk),
            uapi::IOC_EJECT => dev.ioctl_eject(disk),
            uapi::IOC_SERVERS => dev.ioctl_servers(arg),
            _ => Err(code::ENOTTY),
        }
    }

    fn status(io: &Io) -> Status {
        Status {
            state: io.state as u32,
            channels: io.live,
            inflight: io.journal.len(),
            epoch: io.epoch,
            size: io.config.size,
            token_rejects: io.token_rejects,
            server_channels: io.server_channels(),
        }
    }

    fn ioctl_status(&self, arg: usize) -> Result {
        let st = Self::status(&self.io.lock());
        UserSlice::new(arg, Status::SIZE)
            .writer()
            .write_slice(&st.to_bytes())
    }

    /// Sleeps until the epoch moves past the caller's or the timeout ends.
    fn ioctl_wait(&self, arg: usize) -> Result {
        let (mut reader, mut writer) = UserSlice::new(arg, WaitArg::SIZE).reader_writer();
        let mut raw = [0u8; WaitArg::SIZE];
        reader.read_slice(&mut raw)?;
        let mut w = WaitArg::from_bytes(&raw);
        let mut left = kernel::time::msecs_to_jiffies(w.timeout_ms);
        let mut io = self.io.lock();
        while io.epoch == w.epoch && left > 0 {
            use kernel::sync::CondVarTimeoutResult as R;
            match self.events.wait_interruptible_timeout(&mut io, left) {
                R::Timeout => break,
                R::Woken { jiffies } => left = jiffies,
                R::Signal { .. } => return Err(code::EINTR),
            }
        }
        w.status = Self::status(&io);
        drop(io);
        writer.write_slice(&w.to_bytes())
    }

    fn ioctl_configure(&self, arg: usize) -> Result {
        let (mut reader, mut writer) = UserSlice::new(arg, Config::SIZE).reader_writer();
        let mut raw = [0u8; Config::SIZE];
        reader.read_slice(&mut raw)?;
        let mut cfg = Config::from_bytes(&raw);
        if let Err(e) = cfg.validate() {
            pr_warn!("enbd{}: configure refused: {}\n", self.index, e);
            return Err(code::EINVAL);
        }
        sys::random_bytes(&mut cfg.token);
        let _ctl = self.ctl.lock();
        {
            let mut io = self.io.lock();
            if io.state != DevState::Unconfigured {
                return Err(code::EBUSY);
            }
            io.config = cfg;
            io.state = DevState::Waiting;
        }
        writer.write_slice(&cfg.to_bytes())
    }

    /// Takes the helper's view of the servers: addresses and RTTs to show,
    /// and the server whose channels should carry the requests.
    fn ioctl_servers(&self, arg: usize) -> Result {
        let mut raw = [0u8; ServersArg::SIZE];
        UserSlice::new(arg, ServersArg::SIZE)
            .reader()
            .read_slice(&mut raw)?;
        let a = ServersArg::from_bytes(&raw);
        if let Err(e) = a.validate() {
            pr_warn!("enbd{}: server list refused: {}\n", self.index, e);
            return Err(code::EINVAL);
        }
        let moved = {
            let mut io = self.io.lock();
            if matches!(io.state, DevState::Unconfigured | DevState::Closing) {
                return Err(sys::enotconn());
            }
            if !crate::token_eq(&a.token, &io.config.token) {
                io.token_rejects += 1;
                return Err(code::EACCES);
            }
            let n = a.count as usize;
            for (i, s) in io.servers.iter_mut().enumerate() {
                match a.servers.get(i).filter(|_| i < n) {
                    Some(arg) => s.arg = *arg,
                    None => *s = ServerInfo::default(),
                }
            }
            io.server_count = a.count;
            let active = (a.active != uapi::NO_SERVER).then_some(a.active);
            let moved = io.active_server != active;
            io.active_server = active;
            moved.then(|| {
                let rtt = active
                    .and_then(|i| io.servers.get(i as usize))
                    .map_or(0, |s| s.arg.rtt_us);
                (active, rtt)
            })
        };
        if let Some((active, rtt)) = moved {
            // Standby channels may take requests now, or stop taking them.
            self.work.notify_all();
            match active {
                Some(i) => pr_info!(
                    "enbd{}: server {} now carries the I/O (probe RTT {} us)\n",
                    self.index,
                    i,
                    rtt
                ),
                None => pr_info!(
                    "enbd{}: no server chosen: every channel carries I/O\n",
                    self.index
                ),
            }
        }
        Ok(())
    }

    /// Applies the configuration to the disk: queue limits, read-only flag
    /// and capacity. Done when the first channel arrives, so no I/O can reach
    /// a device that has nowhere to send it.
    fn apply(&self, disk: DiskRef<'_>, cfg: &Config) -> Result {
        let flags = cfg.nbd_flags as u16;
        let max_kb = sys::param(Param::MaxSectorsKb);
        let server_max = if cfg.max_payload == 0 {
            crate::wire::DEFAULT_MAX_PAYLOAD
        } else {
            cfg.max_payload
        };
        let limits = Limits {
            block_size: cfg.logical_block_size(),
            max_bytes: server_max.min(max_kb.saturating_mul(1024)),
            flush: flags & tx::SEND_FLUSH != 0,
            fua: flags & tx::SEND_FUA != 0,
            rotational: flags & tx::ROTATIONAL != 0,
            discard: flags & tx::SEND_TRIM != 0,
            write_zeroes: flags & tx::SEND_WRITE_ZEROES != 0,
        };
        disk.configure(cfg.size, flags & tx::READ_ONLY != 0, &limits)
    }

    fn ioctl_add_sock(&self, dev: Arc<Device>, disk: DiskRef<'_>, arg: usize) -> Result {
        let mut raw = [0u8; SockArg::SIZE];
        UserSlice::new(arg, SockArg::SIZE)
            .reader()
            .read_slice(&mut raw)?;
        let sa = SockArg::from_bytes(&raw);
        if sa.flags & !uapi::SOCK_FLAGS != 0
            || sa.flags == uapi::SOCK_FLAGS
            || sa.server as usize >= uapi::MAX_SERVERS
        {
            return Err(code::EINVAL);
        }
        let mut ctl = self.ctl.lock();
        self.reap(&mut ctl);
        let (cfg, applied) = {
            let mut io = self.io.lock();
            if matches!(io.state, DevState::Unconfigured | DevState::Closing) {
                return Err(sys::enotconn());
            }
            if !crate::token_eq(&sa.token, &io.config.token) {
                io.token_rejects += 1;
                pr_warn!(
                    "enbd{}: socket handoff with a wrong token refused\n",
                    self.index
                );
                return Err(code::EACCES);
            }
            (io.config, io.applied)
        };
        let sock = Socket::from_fd(sa.fd)?;
        let id = self
            .io
            .lock()
            .chans
            .iter()
            .position(|s| s.run.is_none())
            .ok_or(code::ENOSPC)?;
        if !applied {
            self.apply(disk, &cfg)?;
            self.io.lock().applied = true;
        }
        let serial = {
            let mut io = self.io.lock();
            io.next_serial += 1;
            io.next_serial
        };
        let chan = Arc::new(
            Channel {
                id: id as u8,
                serial,
                sock,
            },
            GFP_KERNEL,
        )?;
        {
            // One logical block: the server's minimum request size.
            let probe_len = cfg.size.min(u64::from(cfg.logical_block_size())) as u32;
            let mut io = self.io.lock();
            if let Some(s) = io.chans.get_mut(id) {
                s.info = ChanInfo::up(serial, sys::now_ns(), probe_len, sa.flags, sa.server);
                // Threads follow below; until then the handle only owns the socket.
                s.run = Some(ChanHandle {
                    chan: chan.clone(),
                    tx: None,
                    rx: None,
                });
            }
            io.live += 1;
            io.state = DevState::Connected;
            io.bump();
        }
        self.events.notify_all();
        // Requests that waited for a channel can go now.
        self.work.notify_all();
        let rx = {
            let (dev, chan) = (dev.clone(), chan.clone());
            Thread::spawn(format_args!("enbd{}.{}rx", self.index, id), move || {
                channel::receiver(&dev, &chan)
            })
        };
        let rx = match rx {
            Ok(t) => t,
            Err(e) => {
                self.abandon(&mut ctl, &chan);
                return Err(e);
            }
        };
        let tx = {
            let (dev, chan) = (dev.clone(), chan.clone());
            Thread::spawn(format_args!("enbd{}.{}tx", self.index, id), move || {
                channel::sender(&dev, &chan)
            })
        };
        let tx = match tx {
            Ok(t) => t,
            Err(e) => {
                self.abandon(&mut ctl, &chan);
                drop(rx);
                return Err(e);
            }
        };
        let unowned = {
            let mut io = self.io.lock();
            match io.chans.get_mut(id).and_then(|s| s.run.as_mut()) {
                Some(run) => {
                    run.tx = Some(tx);
                    run.rx = Some(rx);
                    None
                }
                // Only the control path, which `ctl` excludes, takes `run`.
                None => Some((tx, rx)),
            }
        };
        // Joined outside the spinlock, should it ever happen.
        drop(unowned);
        if let Some(suppressed) = self.chan_log() {
            pr_info!(
                "enbd{}: channel {} up ({} similar messages suppressed)\n",
                self.index,
                id,
                suppressed
            );
        }
        Ok(())
    }

    /// Writes back the page cache while channels carry it, without `ctl`,
    /// so a reconnect (`IOC_ADD_SOCK`) or `IOC_EJECT` can run meanwhile.
    /// Returns `ETIMEDOUT` once no channel was up for `request_timeout`
    /// (the data stays queued; eject discards it), `EINTR` on a signal, and
    /// the writeback error, if any, once everything is written.
    fn write_back(&self, disk: DiskRef<'_>) -> Result {
        let limit = param_ns(Param::RequestTimeout);
        let mut no_channel_since: Option<u64> = None;
        loop {
            let (state, live, free) = {
                let io = self.io.lock();
                let free = io.journal.depth() as u32 - io.journal.len();
                (io.state, io.live, free)
            };
            if matches!(state, DevState::Unconfigured | DevState::Closing) {
                // Ejected or disconnected meanwhile.
                return Ok(());
            }
            let now = sys::now_ns();
            // A dead device fails writes at once, which also ends writeback.
            if live > 0 || state == DevState::Dead {
                no_channel_since = None;
                if free > 0 {
                    disk.start_writeback(free);
                }
            } else {
                let since = *no_channel_since.get_or_insert(now);
                if now - since >= limit {
                    pr_warn!(
                        "enbd{}: disconnect: cached writes cannot reach the server (no channel for {} s); eject discards them\n",
                        self.index,
                        limit / NSEC_PER_SEC
                    );
                    return Err(sys::etimedout());
                }
            }
            if !disk.writeback_pending() {
                // Nothing is dirty now, so this only collects write errors.
                return disk.sync();
            }
            let mut io = self.io.lock();
            use kernel::sync::CondVarTimeoutResult as R;
            let woke = self
                .idle
                .wait_interruptible_timeout(&mut io, kernel::time::msecs_to_jiffies(100));
            if let R::Signal { .. } = woke {
                return Err(code::EINTR);
            }
        }
    }

    fn ioctl_disconnect(&self, disk: DiskRef<'_>) -> Result {
        if self.io.lock().state == DevState::Unconfigured {
            return Err(sys::enotconn());
        }
        let synced = self.write_back(disk);
        if let Err(e) = synced {
            if e == sys::etimedout() || e == code::EINTR {
                return Err(e);
            }
        }
        let mut ctl = self.ctl.lock();
        if matches!(
            self.io.lock().state,
            DevState::Unconfigured | DevState::Closing
        ) {
            // Someone else ejected or disconnected it meanwhile.
            return Ok(());
        }
        self.io.lock().state = DevState::Closing;
        // Let in-flight requests finish, bounded by twice the request timeout.
        let limit = u64::from(sys::param(Param::RequestTimeout)) * 2_000_000_000;
        let start = sys::now_ns();
        let mut io = self.io.lock();
        while !io.journal.is_empty() && io.live > 0 && sys::now_ns() - start < limit {
            use kernel::sync::CondVarTimeoutResult as R;
            let woke = self
                .idle
                .wait_interruptible_timeout(&mut io, kernel::time::msecs_to_jiffies(100));
            if let R::Signal { .. } = woke {
                // A pending signal would make every wait return at once.
                break;
            }
        }
        let drained = io.journal.is_empty();
        drop(io);
        self.stop_channels(&mut ctl, drained);
        self.reset(&mut ctl, Some(disk));
        if let Err(e) = synced {
            pr_warn!(
                "enbd{}: writing back cached data before disconnect failed: {:?}\n",
                self.index,
                e
            );
        }
        pr_info!("enbd{}: disconnected\n", self.index);
        Ok(())
    }

    fn ioctl_eject(&self, disk: DiskRef<'_>) -> Result {
        let mut ctl = self.ctl.lock();
        if self.io.lock().state == DevState::Unconfigured {
            return Err(sys::enotconn());
        }
        self.io.lock().state = DevState::Closing;
        self.fail_pending();
        self.stop_channels(&mut ctl, false);
        self.reset(&mut ctl, Some(disk));
        pr_info!("enbd{}: ejected\n", self.index);
        Ok(())
    }
}

impl BlockDriver for Device {
    fn queue_rq(&self, rq: Rq) {
        Device::queue_rq(self, rq)
    }

    fn ioctl(this: ArcBorrow<'_, Self>, disk: DiskRef<'_>, cmd: u32, arg: usize) -> Result {
        Device::ioctl(this, disk, cmd, arg)
    }

    fn shutdown(&self) {
        Device::shutdown(self)
    }
}
