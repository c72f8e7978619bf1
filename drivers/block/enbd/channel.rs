// SPDX-License-Identifier: GPL-2.0
//! A channel: one socket to the server with its own sender and receiver
//! thread.
//!
//! Senders pull from the device's shared queue whenever they are free, so the
//! channel that drains its socket fastest takes the most requests (ENBD's
//! demand multiplexing); a dead or suspect channel simply stops pulling. The
//! receiver matches replies to the journal by cookie. Keep-alive probes are
//! sent by the channel's own sender, so the socket has a single writer.

use core::sync::atomic::Ordering::Relaxed;

use crate::device::Device;
use crate::health::{Health, PROBE_TAG};
use crate::journal::{cookie, split_cookie, Reply};
use crate::sys::{self, Socket};
use crate::wire::{Cmd, Request, SimpleReply};

/// A channel's life, as kept in the device's `Io`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(crate) enum ChanState {
    /// Id free.
    #[default]
    Unused,
    /// Working.
    Up,
    /// Broken; its threads are exiting and the id is freed when reaped.
    Dead,
}

/// Per-channel state and counters, under the device's `io` lock.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ChanInfo {
    pub(crate) state: ChanState,
    /// Identifies this channel among all channels the device ever had, so a
    /// stale reference cannot act on a newer channel with the same id.
    pub(crate) serial: u64,
    pub(crate) health: Health,
    /// Bytes a keep-alive probe reads.
    pub(crate) probe_len: u32,
    pub(crate) requests: u64,
    pub(crate) bytes: u64,
    pub(crate) errors: u64,
    pub(crate) resubmits: u64,
    pub(crate) spoiled: u64,
    pub(crate) latency_sum_ns: u64,
    pub(crate) replies: u64,
    /// `uapi::SOCK_KTLS`, `uapi::SOCK_TLS_PROXY` or 0.
    pub(crate) tls: u32,
    /// The server it leads to (`SockArg::server`, below `MAX_SERVERS`).
    pub(crate) server: u32,
    /// Why the channel is being dropped, once that has begun.
    pub(crate) condemned: Option<&'static str>,
}

impl ChanInfo {
    pub(crate) fn up(serial: u64, now: u64, probe_len: u32, tls: u32, server: u32) -> Self {
        Self {
            state: ChanState::Up,
            serial,
            health: Health::new(now),
            probe_len,
            tls,
            server,
            ..Self::default()
        }
    }

    /// The TLS state as `/proc/nbdinfo` shows it.
    pub(crate) fn tls_name(&self) -> &'static str {
        match self.tls {
            crate::uapi::SOCK_KTLS => "ktls",
            crate::uapi::SOCK_TLS_PROXY => "proxy",
            _ => "none",
        }
    }

    /// The state as `/proc/nbdinfo` shows it.
    pub(crate) fn state_name(&self) -> &'static str {
        match self.state {
            ChanState::Unused => "unused",
            ChanState::Up if self.health.is_suspect() => "suspect",
            ChanState::Up => "up",
            ChanState::Dead => "dead",
        }
    }

    /// Average time from sending a request to its reply, in microseconds.
    pub(crate) fn avg_latency_us(&self) -> u64 {
        self.latency_sum_ns.checked_div(self.replies).unwrap_or(0) / 1000
    }
}

/// What the channel threads share.
pub(crate) struct Channel {
    pub(crate) id: u8,
    pub(crate) serial: u64,
    pub(crate) sock: Socket,
}

/// What a sender does next.
enum Next {
    Probe(Request),
    Send(crate::journal::Taken<sys::Rq, Request>),
}

/// The sender thread: takes the next queued request whenever it is free and
/// writes it (and a write's data) to the socket; sends keep-alive probes.
pub(crate) fn sender(dev: &Device, chan: &Channel) {
    loop {
        // Free again: counted before `io` is taken (see `free_senders`).
        dev.free_senders.fetch_add(1, Relaxed);
        let next = {
            let mut io = dev.io.lock();
            loop {
                let now = sys::now_ns();
                let Some(info) = io.chan_mut(chan) else {
                    dev.free_senders.fetch_sub(1, Relaxed);
                    drop(io);
                    // Pass on a wake-up this thread may have consumed.
                    dev.work.notify_one();
                    return;
                };
                if let Some(seq) = info.health.take_probe(now) {
                    let len = info.probe_len;
                    break Next::Probe(Request::new(Cmd::Read, 0, cookie(PROBE_TAG, seq), 0, len));
                }
                if io.takes_requests(chan.id as usize) {
                    if let Some(t) = io.journal.take(chan.id, now, crate::device::header_of) {
                        let len = u64::from(t.header.length);
                        if let Some(info) = io.chan_mut(chan) {
                            info.requests += 1;
                            info.bytes += len;
                            info.health.sent(now);
                            let server = info.server as usize;
                            if let Some(s) = io.servers.get_mut(server) {
                                s.bytes += len;
                            }
                        }
                        break Next::Send(t);
                    }
                }
                // Requests wait that this channel will not take: it may
                // hold the one wake-up meant for them (see `wake.rs`).
                let queued = io.journal.queued();
                if io.wakeups.refused(queued) {
                    dev.work.notify_all();
                }
                dev.free_senders.fetch_sub(1, Relaxed);
                let _ = dev.work.wait_interruptible(&mut io);
                dev.free_senders.fetch_add(1, Relaxed);
            }
        };
        dev.free_senders.fetch_sub(1, Relaxed);
        let ok = match next {
            Next::Probe(req) => chan.sock.send(&req.encode(), false).is_ok(),
            Next::Send(taken) => {
                let header = Request {
                    cookie: taken.cookie,
                    ..taken.header
                }
                .encode();
                match taken.held {
                    None => chan.sock.send(&header, false).is_ok(),
                    Some(rq) => {
                        let ok = chan
                            .sock
                            .send(&header, true)
                            .and_then(|()| chan.sock.send_data(&rq))
                            .is_ok();
                        let out = dev.io.lock().journal.sent(taken.tag, rq, ok, sys::now_ns());
                        dev.finish(out);
                        ok
                    }
                }
            }
        };
        if !ok {
            dev.channel_failed(chan, "send failed");
            return;
        }
    }
}

/// The receiver thread: reads replies, matches them in the journal and
/// completes requests. Any protocol violation drops the channel.
pub(crate) fn receiver(dev: &Device, chan: &Channel) {
    let why = loop {
        let mut hdr = [0u8; SimpleReply::LEN];
        if let Err(e) = chan.sock.recv(&mut hdr) {
            break if sys::is_tls_control(e) {
                "TLS alert or close_notify"
            } else {
                "connection closed"
            };
        }
        let Ok(reply) = SimpleReply::decode(&hdr) else {
            break "bad reply magic";
        };
        let now = sys::now_ns();
        let (tag, gen) = split_cookie(reply.cookie);
        if tag == PROBE_TAG {
            let answered = {
                let mut io = dev.io.lock();
                io.chan_mut(chan).and_then(|info| {
                    let cleared = info.health.probe_reply(gen, now)?;
                    Some((info.probe_len, cleared))
                })
            };
            let Some((len, cleared)) = answered else {
                break "unexpected keep-alive reply";
            };
            if cleared {
                // The channel takes requests again: a queued one may wait.
                dev.work.notify_all();
            }
            if reply.error == 0 && chan.sock.discard(len).is_err() {
                break "connection closed";
            }
            continue;
        }
        let (m, wake) = {
            let mut io = dev.io.lock();
            let sent_at = io.journal.sent_at(tag).unwrap_or(now);
            let m = io.journal.reply(chan.id, reply.cookie, reply.error);
            // A reply may leave this channel idle for a request that must
            // go out solo; the sender then has to look again.
            let mut wake = io.journal.solo_ready(chan.id);
            if !matches!(m, Reply::Corrupt) {
                if let Some(info) = io.chan_mut(chan) {
                    wake |= info.health.replied(now);
                    if !matches!(m, Reply::Late { .. }) {
                        info.replies += 1;
                        info.latency_sum_ns += now.saturating_sub(sent_at);
                    }
                }
            }
            (m, wake)
        };
        if wake {
            dev.work.notify_all();
        }
        match m {
            Reply::Complete(rq, err) => dev.complete(rq, err),
            Reply::Receive(rq, len) => {
                let ok = chan.sock.recv_data(&rq, len).is_ok();
                let (out, wake) = {
                    let mut io = dev.io.lock();
                    let out = io.journal.received(tag, rq, ok);
                    (out, io.journal.solo_ready(chan.id))
                };
                if wake {
                    dev.work.notify_all();
                }
                dev.finish(out);
                if !ok {
                    break "read data truncated";
                }
            }
            Reply::Deferred => {}
            Reply::Late { discard } => {
                dev.stats.late_replies.fetch_add(1, Relaxed);
                if chan.sock.discard(discard).is_err() {
                    break "connection closed";
                }
            }
            Reply::Corrupt => break "reply with an unknown handle",
        }
    };
    dev.channel_failed(chan, why);
}
