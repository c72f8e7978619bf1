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
//! The condition variables `work` (senders wait for queued requests) and
//! `idle` (disconnect waits for the journal to drain) are used with `io`.

use core::sync::atomic::{AtomicU64, Ordering::Relaxed};

use kernel::error::{code, Result};
use kernel::prelude::*;
use kernel::sync::{Arc, ArcBorrow, CondVar, Mutex, SpinLock};
use kernel::uaccess::UserSlice;

use crate::channel::{self, ChanInfo, ChanState, Channel};
use crate::journal::{self, Journal, Outcome, Slot};
use crate::sys::{self, BlkStatus, DiskRef, Limits, Param, ReqOp, Rq, Socket, Thread};
use crate::uapi::{self, Config, DevState, SockArg, Status};
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
    /// Channels in state `Up`.
    pub(crate) live: u32,
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
    /// Whether the configuration was applied to the disk (first channel).
    applied: bool,
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
        let mut handles = KVec::with_capacity(max_channels as usize, GFP_KERNEL)?;
        for _ in 0..max_channels {
            chans.push(ChanInfo::default(), GFP_KERNEL)?;
            handles.push(None, GFP_KERNEL)?;
        }
        Arc::pin_init(
            pin_init!(Self {
                index,
                ctl <- kernel::new_mutex!(Ctl { handles, applied: false }, "enbd:ctl"),
                io <- kernel::new_spinlock!(Io {
                    state: DevState::Unconfigured,
                    config: Config::default(),
                    token_rejects: 0,
                    journal: Journal::new(slots),
                    chans,
                    live: 0,
                }, "enbd:io"),
                work <- kernel::new_condvar!("enbd:work"),
                idle <- kernel::new_condvar!("enbd:idle"),
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
        let refused = {
            let mut io = self.io.lock();
            if io.state != DevState::Connected {
                Some(rq)
            } else {
                io.journal.push(tag, rq, read_len).err().map(|(_, rq)| rq)
            }
        };
        match refused {
            None => self.work.notify_one(),
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

    /// A channel broke (socket error, bad reply, unknown cookie): roll its
    /// requests back for the other channels, or fail them if none is left.
    pub(crate) fn channel_failed(&self, chan: &Channel, why: &str) {
        let none_left = {
            let mut io = self.io.lock();
            let Some(info) = io.chans.get_mut(chan.id as usize) else {
                return;
            };
            if info.state != ChanState::Up {
                return;
            }
            info.state = ChanState::Dead;
            info.errors += 1;
            io.live = io.live.saturating_sub(1);
            let n = io.journal.drop_channel(chan.id);
            if let Some(info) = io.chans.get_mut(chan.id as usize) {
                info.resubmits += u64::from(n);
            }
            if io.live == 0 && io.state == DevState::Connected {
                io.state = DevState::Waiting;
            }
            io.live == 0
        };
        if !why.is_empty() {
            pr_warn!("enbd{}: channel {} dropped: {}\n", self.index, chan.id, why);
        }
        chan.sock.shutdown();
        if none_left {
            // No channel to resubmit on (reconnection is the helper's job):
            // fail what is pending now rather than leave it hanging.
            self.fail_pending();
        }
        self.work.notify_all();
        self.idle.notify_all();
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
    }

    /// Joins channels that died on their own, freeing their ids.
    fn reap(&self, ctl: &mut Ctl) {
        for (id, slot) in ctl.handles.iter_mut().enumerate() {
            let dead = {
                let mut io = self.io.lock();
                match io.chans.get_mut(id) {
                    Some(info) if slot.is_some() && info.state == ChanState::Dead => {
                        *info = ChanInfo::default();
                        true
                    }
                    _ => false,
                }
            };
            if dead {
                drop(slot.take());
            }
        }
    }

    /// Returns the device to the unconfigured state.
    fn reset(&self, ctl: &mut Ctl, disk: Option<DiskRef<'_>>) {
        self.fail_pending();
        if let Some(disk) = disk {
            disk.invalidate();
        }
        ctl.applied = false;
        let mut io = self.io.lock();
        io.state = DevState::Unconfigured;
        io.config = Config::default();
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
            uapi::IOC_CONFIGURE => dev.ioctl_configure(arg),
            uapi::IOC_ADD_SOCK => dev.ioctl_add_sock(this.into(), disk, arg),
            uapi::IOC_DISCONNECT => dev.ioctl_disconnect(disk),
            uapi::IOC_EJECT => dev.ioctl_eject(disk),
            _ => Err(code::ENOTTY),
        }
    }

    fn ioctl_status(&self, arg: usize) -> Result {
        let st = {
            let io = self.io.lock();
            Status {
                state: io.state as u32,
                channels: io.live,
                inflight: io.journal.len(),
                reserved: 0,
                size: io.config.size,
                token_rejects: io.token_rejects,
            }
        };
        UserSlice::new(arg, Status::SIZE)
            .writer()
            .write_slice(&st.to_bytes())
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
        if sa.flags != 0 {
            return Err(code::EINVAL);
        }
        let mut ctl = self.ctl.lock();
        self.reap(&mut ctl);
        let cfg = {
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
            io.config
        };
        let sock = Socket::from_fd(sa.fd)?;
        let id = ctl
            .handles
            .iter()
            .position(|h| h.is_none())
            .ok_or(code::ENOSPC)?;
        if !ctl.applied {
            self.apply(disk, &cfg)?;
            ctl.applied = true;
        }
        let chan = Arc::new(Channel::new(id as u8, sock), GFP_KERNEL)?;
        {
            let mut io = self.io.lock();
            if let Some(info) = io.chans.get_mut(id) {
                *info = ChanInfo::up();
            }
            io.live += 1;
            io.state = DevState::Connected;
        }
        let rx = {
            let (dev, chan) = (dev.clone(), chan.clone());
            Thread::spawn(format_args!("enbd{}.{}rx", self.index, id), move || {
                channel::receiver(&dev, &chan)
            })
        };
        let rx = match rx {
            Ok(t) => t,
            Err(e) => {
                self.channel_failed(&chan, "");
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
                self.channel_failed(&chan, "");
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
