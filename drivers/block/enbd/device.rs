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
//! (`IOC_WAIT` waits for the epoch to change) are used with `io`.
//!
//! The module's manager thread calls `tick` every 200 ms: it ages in-flight
//! requests, probes quiet channels, drops channels that fail their probe and
//! fails requests once no channel was seen for `dead_timeout`.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};

use kernel::error::{code, Result};
use kernel::prelude::*;
use kernel::sync::{Arc, ArcBorrow, CondVar, Mutex, SpinLock};
use kernel::uaccess::UserSlice;

use crate::channel::{self, ChanInfo, ChanState, Channel};
use crate::health::Tick;
use crate::journal::{self, Journal, Outcome, Slot};
use crate::sys::{self, BlkStatus, DiskRef, Limits, Param, ReqOp, Rq, Socket, Thread};
use crate::uapi::{self, Config, DevState, SockArg, Status, WaitArg};
use crate::wire::{tx, Cmd, Request};

pub(crate) type RqJournal = Journal<Rq, KVec<Slot<Rq>>>;

/// State under `Device::io`.
pub(crate) struct Io {
    pub(crate) state: DevState,
    pub(crate) config: Config,
    pub(crate) token_rejects: u64,
    pub(crate) journal: RqJournal,
    /// Per channel id; `ChanState::Unused` for free ids.
    pub(crate) chans: KVec<ChanInfo>,
    /// The channels themselves, so the manager can shut a condemned one down.
    links: KVec<Option<Arc<Channel>>>,
    /// Channels in state `Up`.
    pub(crate) live: u32,
    /// Whether the configuration reached the disk (first channel).
    applied: bool,
    /// When the last channel went away.
    waiting_since: u64,
    /// Bumped on every channel or state change; `IOC_WAIT` waits for it.
    pub(crate) epoch: u32,
    next_serial: u64,
}

impl Io {
    /// The info of `chan` if it is still the live channel of its id.
    pub(crate) fn chan_mut(&mut self, chan: &Channel) -> Option<&mut ChanInfo> {
        self.chans
            .get_mut(chan.id as usize)
            .filter(|c| c.state == ChanState::Up && c.serial == chan.serial)
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

fn param_ns(p: Param) -> u64 {
    u64::from(sys::param(p)) * NSEC_PER_SEC
}

/// Iterates the set bits of a channel mask.
fn bits(mask: u64) -> impl Iterator<Item = usize> {
    (0..64).filter(move |i| mask & (1u64 << i) != 0)
}

/// A running channel, owned by the control path. Dropping it shuts the
/// socket down, which ends both threads, and joins them.
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

/// State under `Device::ctl`.
struct Ctl {
    handles: KVec<Option<ChanHandle>>,
}

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

/// See `Device::snapshot`.
pub(crate) struct Snapshot {
    pub(crate) state: DevState,
    pub(crate) config: Config,
    pub(crate) token_rejects: u64,
    pub(crate) live: u32,
    pub(crate) queued: u32,
    pub(crate) in_flight: u32,
    pub(crate) resubmits: u64,
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
    let flags = if rq.fua() {
        crate::wire::cmd_flags::FUA
    } else {
        0
    };
    (Request::new(cmd, flags, 0, offset, len), cmd == Cmd::Write)
}

impl Device {
    pub(crate) fn new(index: u32, depth: u32, max_channels: u32) -> Result<Arc<Self>> {
        let mut slots = KVec::with_capacity(depth as usize, GFP_KERNEL)?;
        for _ in 0..depth {
            slots.push(Slot::default(), GFP_KERNEL)?;
        }
        let mut chans = KVec::with_capacity(max_channels as usize, GFP_KERNEL)?;
        let mut links = KVec::with_capacity(max_channels as usize, GFP_KERNEL)?;
        let mut handles = KVec::with_capacity(max_channels as usize, GFP_KERNEL)?;
        for _ in 0..max_channels {
            chans.push(ChanInfo::default(), GFP_KERNEL)?;
            links.push(None, GFP_KERNEL)?;
            handles.push(None, GFP_KERNEL)?;
        }
        Arc::pin_init(
            pin_init!(Self {
                index,
                ctl <- kernel::new_mutex!(Ctl { handles }, "enbd:ctl"),
                io <- kernel::new_spinlock!(Io {
                    state: DevState::Unconfigured,
                    config: Config::default(),
                    token_rejects: 0,
                    journal: Journal::new(slots),
                    chans,
                    links,
                    live: 0,
                    applied: false,
                    waiting_since: 0,
                    epoch: 0,
                    next_serial: 0,
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
            max_channels: io.chans.len(),
        }
    }

    /// One channel's state and counters.
    pub(crate) fn chan_info(&self, id: usize) -> Option<ChanInfo> {
        self.io.lock().chans.get(id).copied()
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
        let read_len = if op == ReqOp::Read { rq.len() } else { 0 };
        let tag = rq.tag();
        let (refused, wake) = {
            let mut io = self.io.lock();
            if !io.accepts() {
                (Some(rq), false)
            } else {
                let r = io.journal.push(tag, rq, read_len).err().map(|(_, rq)| rq);
                (r, io.journal.queued() > self.free_senders.load(Relaxed))
            }
        };
        match refused {
            None => {
                if wake {
                    self.work.notify_one();
                }
            }
            Some(rq) => {
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
            Ok(Outcome::Requeued) => self.work.notify_one(),
            Err((e, rq)) => {
                pr_err!("enbd{}: journal refused a request: {:?}\n", self.index, e);
                self.fail(rq);
            }
        }
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
    /// probe): roll its requests back to the queue, where the other channels,
    /// or a replacement the helper hands in, pick them up.
    pub(crate) fn channel_failed(&self, chan: &Channel, why: &str) {
        {
            let mut io = self.io.lock();
            let Some(info) = io.chan_mut(chan) else {
                return;
            };
            info.state = ChanState::Dead;
            info.errors += 1;
            io.live = io.live.saturating_sub(1);
            let n = io.journal.drop_channel(chan.id);
            if let Some(info) = io.chans.get_mut(chan.id as usize) {
                info.resubmits += u64::from(n);
            }
            if io.live == 0 && io.state == DevState::Connected {
                io.state = DevState::Waiting;
                io.waiting_since = sys::now_ns();
            }
            io.bump();
        }
        if !why.is_empty() {
            pr_warn!("enbd{}: channel {} dropped: {}\n", self.index, chan.id, why);
        }
        chan.sock.shutdown();
        self.work.notify_all();
        self.idle.notify_all();
        self.events.notify_all();
    }

    /// Periodic work, from the module's manager thread.
    pub(crate) fn tick(&self, now: u64) {
        let timeout = param_ns(Param::RequestTimeout);
        let keepalive = param_ns(Param::KeepaliveInterval);
        let dead = param_ns(Param::DeadTimeout);
        let (stuck, silent, wake, expired) = {
            let mut io = self.io.lock();
            if !matches!(io.state, DevState::Connected | DevState::Waiting) {
                return;
            }
            let aged = io.journal.age(now, timeout);
            for id in bits(aged.suspects) {
                if let Some(info) = io.chans.get_mut(id) {
                    if info.state == ChanState::Up {
                        info.health.suspect();
                        info.spoiled += 1;
                    }
                }
            }
            let mut wake = aged.rolled_back > 0 || aged.suspects != 0;
            let mut silent = 0u64;
            for (id, info) in io.chans.iter_mut().enumerate() {
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
            (aged.stuck, silent, wake, expired)
        };
        if wake {
            self.work.notify_all();
        }
        for (mask, why) in [
            (stuck, "request timed out in mid-transfer"),
            (silent, "keep-alive unanswered"),
        ] {
            for id in bits(mask) {
                let chan = self.io.lock().links.get(id).and_then(|l| l.clone());
                if let Some(chan) = chan {
                    self.channel_failed(&chan, why);
                }
            }
        }
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
    fn stop_channels(&self, ctl: &mut Ctl, disc: bool) {
        {
            let mut io = self.io.lock();
            for info in io.chans.iter_mut() {
                if info.state == ChanState::Up {
                    info.state = ChanState::Dead;
                }
            }
            io.live = 0;
        }
        self.work.notify_all();
        for id in 0..ctl.handles.len() {
            // Dropped outside the spinlock: it may be the last reference.
            let link = self.io.lock().links.get_mut(id).and_then(|l| l.take());
            drop(link);
        }
        for slot in ctl.handles.iter_mut() {
            match slot.take() {
                Some(h) if disc => h.close_with_disc(),
                h => drop(h),
            }
        }
        let mut io = self.io.lock();
        for info in io.chans.iter_mut() {
            *info = ChanInfo::default();
        }
        io.bump();
    }

    /// Undoes a channel whose threads could not all be started.
    fn abandon(&self, chan: &Channel) {
        self.channel_failed(chan, "");
        let link = {
            let mut io = self.io.lock();
            if let Some(info) = io.chans.get_mut(chan.id as usize) {
                *info = ChanInfo::default();
            }
            io.links.get_mut(chan.id as usize).and_then(|l| l.take())
        };
        drop(link);
    }

    /// Joins channels that died on their own, freeing their ids.
    fn reap(&self, ctl: &mut Ctl) {
        for (id, slot) in ctl.handles.iter_mut().enumerate() {
            let link = {
                let mut io = self.io.lock();
                match io.chans.get_mut(id) {
                    Some(info) if slot.is_some() && info.state == ChanState::Dead => {
                        *info = ChanInfo::default();
                        io.links.get_mut(id).map(|l| l.take())
                    }
                    _ => None,
                }
            };
            if let Some(link) = link {
                drop(link);
                drop(slot.take());
            }
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
        if sa.flags & !uapi::SOCK_FLAGS != 0 || sa.flags == uapi::SOCK_FLAGS {
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
        let id = ctl
            .handles
            .iter()
            .position(|h| h.is_none())
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
            let probe_len = cfg.size.min(512) as u32;
            let mut io = self.io.lock();
            if let Some(info) = io.chans.get_mut(id) {
                *info = ChanInfo::up(serial, sys::now_ns(), probe_len, sa.flags);
            }
            if let Some(link) = io.links.get_mut(id) {
                *link = Some(chan.clone());
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
                self.abandon(&chan);
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
                self.abandon(&chan);
                drop(rx);
                return Err(e);
            }
        };
        if let Some(slot) = ctl.handles.get_mut(id) {
            *slot = Some(ChanHandle {
                chan,
                tx: Some(tx),
                rx: Some(rx),
            });
        }
        pr_info!("enbd{}: channel {} up\n", self.index, id);
        Ok(())
    }

    fn ioctl_disconnect(&self, disk: DiskRef<'_>) -> Result {
        let mut ctl = self.ctl.lock();
        if self.io.lock().state == DevState::Unconfigured {
            return Err(sys::enotconn());
        }
        // Write back cached data while the channels still work.
        let synced = disk.sync();
        self.io.lock().state = DevState::Closing;
        // Let in-flight requests finish, bounded by twice the request timeout.
        let limit = u64::from(sys::param(Param::RequestTimeout)) * 2_000_000_000;
        let start = sys::now_ns();
        let mut io = self.io.lock();
        while !io.journal.is_empty() && io.live > 0 && sys::now_ns() - start < limit {
            let _ = self
                .idle
                .wait_interruptible_timeout(&mut io, kernel::time::msecs_to_jiffies(100));
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
