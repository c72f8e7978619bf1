// SPDX-License-Identifier: GPL-2.0
//! A channel: one socket to the server with its own sender and receiver
//! thread.
//!
//! Senders pull from the device's shared queue whenever they are free, so the
//! channel that drains its socket fastest takes the most requests (ENBD's
//! demand multiplexing); a dead channel simply stops pulling. The receiver
//! matches replies to the journal by cookie.

use core::sync::atomic::Ordering::Relaxed;

use crate::device::Device;
use crate::journal::{split_cookie, Reply};
use crate::sys::{self, Socket};
use crate::wire::{Request, SimpleReply};

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

impl ChanState {
    pub(crate) fn name(self) -> &'static str {
        match self {
            ChanState::Unused => "unused",
            ChanState::Up => "up",
            ChanState::Dead => "dead",
        }
    }
}

/// Per-channel state and counters, under the device's `io` lock.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct ChanInfo {
    pub(crate) state: ChanState,
    pub(crate) requests: u64,
    pub(crate) bytes: u64,
    pub(crate) errors: u64,
    pub(crate) resubmits: u64,
}

impl ChanInfo {
    pub(crate) fn up() -> Self {
        Self {
            state: ChanState::Up,
            ..Self::default()
        }
    }
}

/// What the channel threads share.
pub(crate) struct Channel {
    pub(crate) id: u8,
    pub(crate) sock: Socket,
}

impl Channel {
    pub(crate) fn new(id: u8, sock: Socket) -> Self {
        Self { id, sock }
    }
}

/// The sender thread: takes the next queued request whenever it is free and
/// writes it (and a write's data) to the socket.
pub(crate) fn sender(dev: &Device, chan: &Channel) {
    loop {
        let taken = {
            let mut io = dev.io.lock();
            loop {
                if io.chans.get(chan.id as usize).map(|c| c.state)
                    != Some(crate::channel::ChanState::Up)
                {
                    drop(io);
                    // Pass on a wake-up this thread may have consumed.
                    dev.work.notify_one();
                    return;
                }
                let now = sys::now_ns();
                if let Some(t) = io.journal.take(chan.id, now, crate::device::header_of) {
                    if let Some(info) = io.chans.get_mut(chan.id as usize) {
                        info.requests += 1;
                        info.bytes += u64::from(t.header.length);
                    }
                    break t;
                }
                let _ = dev.work.wait_interruptible(&mut io);
            }
        };
        let header = Request {
            cookie: taken.cookie,
            ..taken.header
        }
        .encode();
        let ok = match taken.held {
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
        if chan.sock.recv(&mut hdr).is_err() {
            break "connection closed";
        }
        let Ok(reply) = SimpleReply::decode(&hdr) else {
            break "bad reply magic";
        };
        let m = dev
            .io
            .lock()
            .journal
            .reply(chan.id, reply.cookie, reply.error);
        match m {
            Reply::Complete(rq, err) => dev.complete(rq, err),
            Reply::Receive(rq, len) => {
                let ok = chan.sock.recv_data(&rq, len).is_ok();
                let (tag, _) = split_cookie(reply.cookie);
                let out = dev.io.lock().journal.received(tag, rq, ok);
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
