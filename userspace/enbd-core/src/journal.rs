// SPDX-License-Identifier: GPL-2.0
//! The journal of in-flight requests (ENBD's doubly linked request list).
//!
//! Every request the block layer hands to a device lives in one slot of the
//! journal, indexed by its blk-mq tag, from arrival until completion. Slots
//! are threaded on two doubly linked lists:
//!
//! * the **queue** of requests waiting for a channel (FIFO; rolled-back
//!   requests go to the front, as they are the oldest), and
//! * the **in-flight** list of requests handed to a channel, in send order,
//!   so aging only ever looks at the head.
//!
//! A request is identified on the wire by a cookie `gen << 32 | tag`, where
//! `gen` changes on every transmission. A reply whose cookie no longer
//! matches is recognised as late (its request was rolled back and resent) or
//! duplicate (already answered) through the slot's small record of earlier
//! transmissions ("ghosts"), and is discarded; any other unknown cookie means
//! a corrupt stream and drops the channel.
//!
//! While a channel's thread works on a request's data (sending a write,
//! receiving a read) it *holds* the payload outside the journal, so nothing
//! else can complete it. Events that arrive meanwhile (the channel died, the
//! request aged, the device is being ejected) are recorded in the slot and
//! acted on when the holder gives the payload back.
//!
//! The journal is kernel-independent: `no_std`, no allocation, no locking.
//! The module wraps it in a spinlock; cargo tests drive it directly.

use core::ops::DerefMut;

const NIL: u16 = u16::MAX;

/// Largest number of slots (tags) a journal may have.
pub const MAX_DEPTH: usize = 4096;
/// Largest channel number; channel sets are 64-bit masks.
pub const MAX_CHANNELS: usize = 64;
/// Earlier transmissions remembered per slot for late and duplicate replies.
const GHOSTS: usize = 2;

/// Where a request is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Slot unused.
    Free,
    /// Waiting in the queue for a channel.
    Queued,
    /// A channel is sending it and holds its payload (a write's data).
    Sending,
    /// Sent; waiting for the reply.
    Sent,
    /// The reply arrived; a channel holds the payload to receive read data.
    Receiving,
}

/// A misuse by the caller; the journal is left unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JournalError {
    /// The tag is outside the journal.
    BadTag,
    /// The slot is not in the state the operation needs.
    WrongState,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Ghost {
    valid: bool,
    chan: u8,
    gen: u32,
    read_len: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pending {
    None,
    /// Roll back when the holder returns the payload.
    Rollback,
    /// Fail when the holder returns the payload.
    Fail,
    /// The reply (with this error) came while the payload was held.
    Answered(u32),
}

/// One journal entry.
#[derive(Debug)]
pub struct Slot<T> {
    state: State,
    payload: Option<T>,
    prev: u16,
    next: u16,
    chan: u8,
    gen: u32,
    read_len: u32,
    sent_at: u64,
    resubmits: u32,
    pending: Pending,
    ghosts: [Ghost; GHOSTS],
}

impl<T> Default for Slot<T> {
    fn default() -> Self {
        Self {
            state: State::Free,
            payload: None,
            prev: NIL,
            next: NIL,
            chan: 0,
            gen: 0,
            read_len: 0,
            sent_at: 0,
            resubmits: 0,
            pending: Pending::None,
            ghosts: [Ghost::default(); GHOSTS],
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct List {
    head: u16,
    tail: u16,
    len: u32,
}

impl List {
    const EMPTY: List = List {
        head: NIL,
        tail: NIL,
        len: 0,
    };
}

/// Builds the wire cookie of a transmission.
pub fn cookie(tag: u32, gen: u32) -> u64 {
    (u64::from(gen) << 32) | u64::from(tag)
}

/// Splits a wire cookie into (tag, generation).
pub fn split_cookie(cookie: u64) -> (u32, u32) {
    (cookie as u32, (cookie >> 32) as u32)
}

/// A request handed to a channel by [`Journal::take`].
#[derive(Debug)]
pub struct Taken<T, H> {
    /// The request's tag.
    pub tag: u32,
    /// The cookie to put on the wire.
    pub cookie: u64,
    /// What the caller's closure extracted (typically the request header).
    pub header: H,
    /// The payload, when the caller asked to hold it while sending.
    pub held: Option<T>,
    /// How often this request was resubmitted before.
    pub resubmits: u32,
}

/// What the caller must do after an operation.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome<T> {
    /// Nothing more to do.
    Done,
    /// Complete this request with the NBD error (0 = success).
    Complete(T, u32),
    /// Fail this request (device ejected or dead).
    Fail(T),
    /// The request went back to the queue; wake a sender.
    Requeued,
}

/// How a reply header matched.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply<T> {
    /// Complete this request with the NBD error (0 = success).
    Complete(T, u32),
    /// Receive `len` bytes of read data into the held payload, then call
    /// [`Journal::received`].
    Receive(T, u32),
    /// The request's payload is held by its sender; the reply was recorded
    /// and the sender completes it.
    Deferred,
    /// A late or duplicate reply: discard `discard` bytes of data after it.
    Late {
        /// Bytes of read data that follow the header on the wire.
        discard: u32,
    },
    /// Not a cookie this channel could have been given: drop the channel.
    Corrupt,
}

/// Result of [`Journal::age`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Aged {
    /// Requests rolled back to the queue.
    pub rolled_back: u32,
    /// Channels with a spoiled request (bit per channel): mark them suspect.
    pub suspects: u64,
    /// Channels stuck transferring a spoiled request's data: drop them.
    pub stuck: u64,
}

/// The journal. `S` is the slot storage (a `Vec` or the kernel's `KVec`).
pub struct Journal<T, S> {
    slots: S,
    queue: List,
    inflight: List,
    held: u32,
    resubmits: u64,
    late: u64,
    _t: core::marker::PhantomData<T>,
}

impl<T, S: DerefMut<Target = [Slot<T>]>> Journal<T, S> {
    /// Wraps `slots` (all `Slot::default()`) as an empty journal. Storage
    /// beyond `MAX_DEPTH` slots is not used.
    pub fn new(slots: S) -> Self {
        Self {
            slots,
            queue: List::EMPTY,
            inflight: List::EMPTY,
            held: 0,
            resubmits: 0,
            late: 0,
            _t: core::marker::PhantomData,
        }
    }

    /// Number of slots.
    pub fn depth(&self) -> usize {
        self.slots.len().min(MAX_DEPTH)
    }

    /// Requests waiting for a channel.
    pub fn queued(&self) -> u32 {
        self.queue.len
    }

    /// Requests handed to channels (sending, sent or receiving).
    pub fn in_flight(&self) -> u32 {
        self.inflight.len
    }

    /// Requests in the journal.
    pub fn len(&self) -> u32 {
        self.queue.len + self.inflight.len
    }

    /// Whether the journal holds no request.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Total resubmissions so far.
    pub fn resubmits(&self) -> u64 {
        self.resubmits
    }

    /// Late and duplicate replies discarded so far.
    pub fn late_replies(&self) -> u64 {
        self.late
    }

    /// When the request with `tag` was last handed to a channel.
    pub fn sent_at(&self, tag: u32) -> Option<u64> {
        self.slot(tag).map(|s| s.sent_at)
    }

    /// State of a slot (for reports and tests).
    pub fn state(&self, tag: u32) -> Option<State> {
        self.slot(tag).map(|s| s.state)
    }

    fn slot(&self, tag: u32) -> Option<&Slot<T>> {
        if (tag as usize) < self.depth() {
            self.slots.get(tag as usize)
        } else {
            None
        }
    }

    fn idx(&self, tag: u32) -> Result<usize, JournalError> {
        if (tag as usize) < self.depth() {
            Ok(tag as usize)
        } else {
            Err(JournalError::BadTag)
        }
    }

    fn list_mut(&mut self, queue: bool) -> &mut List {
        if queue {
            &mut self.queue
        } else {
            &mut self.inflight
        }
    }

    fn link_back(&mut self, i: usize, queue: bool) {
        let tail = self.list_mut(queue).tail;
        self.slots[i].prev = tail;
        self.slots[i].next = NIL;
        if tail == NIL {
            self.list_mut(queue).head = i as u16;
        } else {
            self.slots[tail as usize].next = i as u16;
        }
        let l = self.list_mut(queue);
        l.tail = i as u16;
        l.len += 1;
    }

    fn link_front(&mut self, i: usize, queue: bool) {
        let head = self.list_mut(queue).head;
        self.slots[i].prev = NIL;
        self.slots[i].next = head;
        if head == NIL {
            self.list_mut(queue).tail = i as u16;
        } else {
            self.slots[head as usize].prev = i as u16;
        }
        let l = self.list_mut(queue);
        l.head = i as u16;
        l.len += 1;
    }

    fn unlink(&mut self, i: usize, queue: bool) {
        let (prev, next) = (self.slots[i].prev, self.slots[i].next);
        if prev == NIL {
            self.list_mut(queue).head = next;
        } else {
            self.slots[prev as usize].next = next;
        }
        if next == NIL {
            self.list_mut(queue).tail = prev;
        } else {
            self.slots[next as usize].prev = prev;
        }
        self.slots[i].prev = NIL;
        self.slots[i].next = NIL;
        let l = self.list_mut(queue);
        l.len -= 1;
    }

    fn remember(&mut self, i: usize) {
        let s = &mut self.slots[i];
        s.ghosts.rotate_right(1);
        s.ghosts[0] = Ghost {
            valid: true,
            chan: s.chan,
            gen: s.gen,
            read_len: s.read_len,
        };
    }

    /// Frees an unlinked slot and returns its payload.
    fn free(&mut self, i: usize) -> Option<T> {
        let s = &mut self.slots[i];
        s.state = State::Free;
        s.pending = Pending::None;
        s.payload.take()
    }

    /// Puts a request that is not on any list back at the queue's front.
    fn requeue(&mut self, i: usize) {
        let s = &mut self.slots[i];
        s.state = State::Queued;
        s.pending = Pending::None;
        s.resubmits = s.resubmits.saturating_add(1);
        self.resubmits += 1;
        self.link_front(i, true);
    }

    /// Adds a new request. `read_len` is the data length its reply carries
    /// (the length of a READ, else 0).
    pub fn push(&mut self, tag: u32, payload: T, read_len: u32) -> Result<(), (JournalError, T)> {
        let i = match self.idx(tag) {
            Ok(i) => i,
            Err(e) => return Err((e, payload)),
        };
        if self.slots[i].state != State::Free {
            return Err((JournalError::WrongState, payload));
        }
        let s = &mut self.slots[i];
        s.state = State::Queued;
        s.payload = Some(payload);
        s.read_len = read_len;
        s.resubmits = 0;
        s.pending = Pending::None;
        self.link_back(i, true);
        Ok(())
    }

    /// Hands the oldest queued request to channel `chan` at time `now`.
    ///
    /// `f` looks at the payload and returns the header to send and whether
    /// the sender must hold the payload while sending (it has data to send).
    pub fn take<H>(
        &mut self,
        chan: u8,
        now: u64,
        f: impl FnOnce(&T) -> (H, bool),
    ) -> Option<Taken<T, H>> {
        let head = self.queue.head;
        if head == NIL {
            return None;
        }
        let i = head as usize;
        let (header, hold) = f(self.slots[i].payload.as_ref()?);
        self.unlink(i, true);
        let s = &mut self.slots[i];
        s.gen = s.gen.wrapping_add(1);
        s.chan = chan;
        s.sent_at = now;
        let held = if hold {
            s.state = State::Sending;
            s.payload.take()
        } else {
            s.state = State::Sent;
            None
        };
        let (gen, resubmits) = (s.gen, s.resubmits);
        if held.is_some() {
            self.held += 1;
        }
        self.link_back(i, false);
        Some(Taken {
            tag: i as u32,
            cookie: cookie(i as u32, gen),
            header,
            held,
            resubmits,
        })
    }

    /// The sender of a held request is done with it; `ok` says whether the
    /// whole request reached the socket.
    pub fn sent(
        &mut self,
        tag: u32,
        payload: T,
        ok: bool,
        now: u64,
    ) -> Result<Outcome<T>, (JournalError, T)> {
        let i = match self.idx(tag) {
            Ok(i) => i,
            Err(e) => return Err((e, payload)),
        };
        if self.slots[i].state != State::Sending {
            return Err((JournalError::WrongState, payload));
        }
        self.held -= 1;
        let pending = self.slots[i].pending;
        self.slots[i].pending = Pending::None;
        match pending {
            Pending::Answered(err) => {
                self.unlink(i, false);
                self.remember(i);
                self.slots[i].payload = Some(payload);
                let p = self.free(i);
                Ok(p.map_or(Outcome::Done, |p| Outcome::Complete(p, err)))
            }
            Pending::Fail => {
                self.unlink(i, false);
                self.free(i);
                Ok(Outcome::Fail(payload))
            }
            Pending::Rollback | Pending::None if !ok || pending == Pending::Rollback => {
                self.unlink(i, false);
                self.slots[i].payload = Some(payload);
                self.requeue(i);
                Ok(Outcome::Requeued)
            }
            _ => {
                let s = &mut self.slots[i];
                s.payload = Some(payload);
                s.state = State::Sent;
                s.sent_at = now;
                // Keep the in-flight list in send order: move to the tail.
                self.unlink(i, false);
                self.link_back(i, false);
                Ok(Outcome::Done)
            }
        }
    }

    /// Matches a reply header that arrived on channel `chan`.
    pub fn reply(&mut self, chan: u8, cookie: u64, error: u32) -> Reply<T> {
        let (tag, gen) = split_cookie(cookie);
        let Ok(i) = self.idx(tag) else {
            return Reply::Corrupt;
        };
        let s = &self.slots[i];
        let current = s.gen == gen && s.chan == chan;
        match s.state {
            State::Sent if current => {
                if error == 0 && s.read_len > 0 {
                    let len = s.read_len;
                    let s = &mut self.slots[i];
                    s.state = State::Receiving;
                    match s.payload.take() {
                        Some(p) => {
                            self.held += 1;
                            Reply::Receive(p, len)
                        }
                        None => Reply::Corrupt,
                    }
                } else {
                    self.unlink(i, false);
                    self.remember(i);
                    match self.free(i) {
                        Some(p) => Reply::Complete(p, error),
                        None => Reply::Corrupt,
                    }
                }
            }
            State::Sending if current => {
                // A write answered before all of its data left: only an
                // error reply can legitimately do that. An eject still wins.
                if self.slots[i].pending != Pending::Fail {
                    self.slots[i].pending = Pending::Answered(error);
                }
                Reply::Deferred
            }
            State::Receiving if current => Reply::Corrupt,
            _ => {
                let hit = self.slots[i]
                    .ghosts
                    .iter_mut()
                    .find(|g| g.valid && g.chan == chan && g.gen == gen);
                match hit {
                    Some(g) => {
                        g.valid = false;
                        let discard = if error == 0 { g.read_len } else { 0 };
                        self.late += 1;
                        Reply::Late { discard }
                    }
                    None => Reply::Corrupt,
                }
            }
        }
    }

    /// The receiver of a read is done; `ok` says whether all data arrived.
    pub fn received(
        &mut self,
        tag: u32,
        payload: T,
        ok: bool,
    ) -> Result<Outcome<T>, (JournalError, T)> {
        let i = match self.idx(tag) {
            Ok(i) => i,
            Err(e) => return Err((e, payload)),
        };
        if self.slots[i].state != State::Receiving {
            return Err((JournalError::WrongState, payload));
        }
        self.held -= 1;
        self.unlink(i, false);
        let pending = self.slots[i].pending;
        if pending == Pending::Fail {
            self.free(i);
            return Ok(Outcome::Fail(payload));
        }
        self.slots[i].payload = Some(payload);
        if ok {
            // Data arrived intact: a spoil noted meanwhile no longer matters.
            self.remember(i);
            let p = self.free(i);
            return Ok(p.map_or(Outcome::Done, |p| Outcome::Complete(p, 0)));
        }
        self.requeue(i);
        Ok(Outcome::Requeued)
    }

    /// Rolls back every request on channel `chan`, which is gone. Requests
    /// its threads hold are rolled back when they are returned.
    pub fn drop_channel(&mut self, chan: u8) -> u32 {
        let mut n = 0;
        let mut cur = self.inflight.head;
        while cur != NIL {
            let i = cur as usize;
            cur = self.slots[i].next;
            if self.slots[i].chan != chan {
                continue;
            }
            match self.slots[i].state {
                State::Sent => {
                    self.unlink(i, false);
                    self.requeue(i);
                    n += 1;
                }
                State::Sending | State::Receiving if self.slots[i].pending == Pending::None => {
                    self.slots[i].pending = Pending::Rollback;
                }
                _ => {}
            }
        }
        n
    }

    /// Spoils requests sent at or before `now - timeout`: sent ones are
    /// rolled back to the queue (their channel may still answer; that reply
    /// will be discarded as late), held ones are flagged and their channel
    /// reported as stuck.
    pub fn age(&mut self, now: u64, timeout: u64) -> Aged {
        let mut out = Aged::default();
        let mut cur = self.inflight.head;
        while cur != NIL {
            let i = cur as usize;
            cur = self.slots[i].next;
            let s = &self.slots[i];
            if now.saturating_sub(s.sent_at) < timeout {
                // The list is in send order, so the rest is younger.
                break;
            }
            let bit = 1u64 << (s.chan as usize % MAX_CHANNELS);
            out.suspects |= bit;
            match s.state {
                State::Sent => {
                    self.unlink(i, false);
                    self.remember(i);
                    self.requeue(i);
                    out.rolled_back += 1;
                }
                State::Sending | State::Receiving => {
                    if self.slots[i].pending == Pending::None {
                        self.slots[i].pending = Pending::Rollback;
                    }
                    out.stuck |= bit;
                }
                _ => {}
            }
        }
        out
    }

    /// Takes one request out to fail it (eject, or no channel for too long).
    /// Held requests are flagged and failed when returned. Call until `None`.
    pub fn fail_one(&mut self) -> Option<T> {
        let head = self.queue.head;
        if head != NIL {
            self.unlink(head as usize, true);
            return self.free(head as usize);
        }
        let mut cur = self.inflight.head;
        while cur != NIL {
            let i = cur as usize;
            cur = self.slots[i].next;
            if self.slots[i].state == State::Sent {
                self.unlink(i, false);
                return self.free(i);
            }
            self.slots[i].pending = Pending::Fail;
        }
        None
    }

    /// Requests whose payload a channel thread holds right now.
    pub fn held(&self) -> u32 {
        self.held
    }

    /// Checks every structural invariant; for tests and debug builds.
    pub fn check(&self) -> Result<(), &'static str> {
        let mut seen_q = 0u32;
        let mut seen_f = 0u32;
        for (queue, l) in [(true, &self.queue), (false, &self.inflight)] {
            let mut prev = NIL;
            let mut cur = l.head;
            let mut n = 0u32;
            while cur != NIL {
                let s = self.slots.get(cur as usize).ok_or("link out of range")?;
                if s.prev != prev {
                    return Err("broken prev link");
                }
                let ok = if queue {
                    s.state == State::Queued
                } else {
                    matches!(s.state, State::Sending | State::Sent | State::Receiving)
                };
                if !ok {
                    return Err("slot on the wrong list");
                }
                n += 1;
                if n as usize > self.depth() {
                    return Err("list cycle");
                }
                prev = cur;
                cur = s.next;
            }
            if l.tail != prev || l.len != n {
                return Err("list tail or length wrong");
            }
            if queue {
                seen_q = n;
            } else {
                seen_f = n;
            }
        }
        let mut held = 0u32;
        for s in self.slots.iter().take(self.depth()) {
            match s.state {
                State::Free => {
                    if s.payload.is_some() {
                        return Err("free slot with payload");
                    }
                }
                State::Queued | State::Sent => {
                    if s.payload.is_none() {
                        return Err("queued or sent slot without payload");
                    }
                }
                State::Sending | State::Receiving => {
                    if s.payload.is_some() {
                        return Err("held slot still has its payload");
                    }
                    held += 1;
                }
            }
        }
        let in_lists = self
            .slots
            .iter()
            .take(self.depth())
            .filter(|s| s.state != State::Free)
            .count() as u32;
        if in_lists != seen_q + seen_f {
            return Err("slot in use but on no list");
        }
        if held != self.held {
            return Err("held count wrong");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    type J = Journal<u32, Vec<Slot<u32>>>;

    fn journal(depth: usize) -> J {
        Journal::new((0..depth).map(|_| Slot::default()).collect())
    }

    /// Takes the next request, holding the payload when `hold`.
    fn take(j: &mut J, chan: u8, now: u64, hold: bool) -> Taken<u32, ()> {
        let t = j.take(chan, now, |_| ((), hold)).expect("queue empty");
        j.check().unwrap();
        t
    }

    #[test]
    fn read_round_trip() {
        let mut j = journal(4);
        j.push(2, 100, 4096).unwrap();
        let t = take(&mut j, 0, 10, false);
        assert_eq!(t.tag, 2);
        assert_eq!(j.state(2), Some(State::Sent));
        let Reply::Receive(p, len) = j.reply(0, t.cookie, 0) else {
            panic!()
        };
        assert_eq!((p, len), (100, 4096));
        assert_eq!(j.received(2, p, true).unwrap(), Outcome::Complete(100, 0));
        assert!(j.is_empty());
        j.check().unwrap();
        // The same reply again is a duplicate with 4096 bytes to skip.
        assert_eq!(j.reply(0, t.cookie, 0), Reply::Late { discard: 4096 });
        // And a third time it is unknown.
        assert_eq!(j.reply(0, t.cookie, 0), Reply::Corrupt);
    }

    #[test]
    fn write_holds_payload_and_early_error_reply() {
        let mut j = journal(4);
        j.push(1, 7, 0).unwrap();
        let t = take(&mut j, 3, 0, true);
        assert_eq!(t.held, Some(7));
        assert_eq!(j.reply(3, t.cookie, 1), Reply::Deferred);
        assert_eq!(j.sent(1, 7, true, 5).unwrap(), Outcome::Complete(7, 1));
        assert!(j.is_empty());
        j.check().unwrap();
    }

    #[test]
    fn error_replies_carry_no_data() {
        let mut j = journal(2);
        j.push(0, 1, 512).unwrap();
        let t = take(&mut j, 0, 0, false);
        assert_eq!(j.reply(0, t.cookie, 5), Reply::Complete(1, 5));
        assert_eq!(j.reply(0, t.cookie, 5), Reply::Late { discard: 0 });
    }

    #[test]
    fn unknown_cookies_are_corrupt() {
        let mut j = journal(2);
        assert_eq!(j.reply(0, cookie(9, 1), 0), Reply::Corrupt);
        j.push(0, 1, 0).unwrap();
        let t = take(&mut j, 0, 0, false);
        // Right tag, wrong generation or wrong channel.
        assert_eq!(j.reply(0, t.cookie + (1 << 32), 0), Reply::Corrupt);
        assert_eq!(j.reply(1, t.cookie, 0), Reply::Corrupt);
        assert_eq!(j.reply(0, t.cookie, 0), Reply::Complete(1, 0));
    }

    #[test]
    fn channel_drop_rolls_back_to_front_of_queue() {
        let mut j = journal(8);
        for tag in 0..4 {
            j.push(tag, tag, 0).unwrap();
        }
        let a = take(&mut j, 0, 0, false);
        let b = take(&mut j, 1, 0, false);
        let c = take(&mut j, 0, 0, true);
        assert_eq!(j.drop_channel(0), 1);
        j.check().unwrap();
        // `a` is first in the queue again; `c` is held and rolls back on return.
        assert_eq!(j.sent(c.tag, 2, false, 1).unwrap(), Outcome::Requeued);
        let order: Vec<u32> =
            core::iter::from_fn(|| j.take(2, 5, |p| (*p, false)).map(|t| t.header)).collect();
        assert_eq!(order, vec![2, 0, 3]);
        assert_eq!(j.resubmits(), 2);
        // `b` on channel 1 is untouched; the old cookie of `a` on channel 0 is corrupt
        // (the channel is gone, so no ghost was kept).
        assert_eq!(j.state(b.tag), Some(State::Sent));
        assert_eq!(j.reply(0, a.cookie, 0), Reply::Corrupt);
        j.check().unwrap();
    }

    #[test]
    fn aging_resubmits_and_late_reply_is_discarded() {
        let mut j = journal(4);
        j.push(0, 10, 4096).unwrap();
        j.push(1, 11, 0).unwrap();
        let a = take(&mut j, 0, 100, false);
        let b = take(&mut j, 0, 150, false);
        let aged = j.age(200, 100);
        assert_eq!(
            aged,
            Aged {
                rolled_back: 1,
                suspects: 1,
                stuck: 0
            }
        );
        assert_eq!(j.state(a.tag), Some(State::Queued));
        assert_eq!(j.state(b.tag), Some(State::Sent));
        let a2 = take(&mut j, 1, 200, false);
        assert_eq!(a2.tag, a.tag);
        assert_eq!(a2.resubmits, 1);
        // The slow channel finally answers the first transmission.
        assert_eq!(j.reply(0, a.cookie, 0), Reply::Late { discard: 4096 });
        assert_eq!(j.late_replies(), 1);
        let Reply::Receive(p, _) = j.reply(1, a2.cookie, 0) else {
            panic!()
        };
        assert_eq!(
            j.received(a.tag, p, true).unwrap(),
            Outcome::Complete(10, 0)
        );
        j.check().unwrap();
    }

    #[test]
    fn aging_flags_held_requests_as_stuck() {
        let mut j = journal(2);
        j.push(0, 1, 0).unwrap();
        let t = take(&mut j, 5, 0, true);
        let aged = j.age(1000, 10);
        assert_eq!(aged.stuck, 1 << 5);
        assert_eq!(j.sent(t.tag, 1, true, 1000).unwrap(), Outcome::Requeued);
        j.check().unwrap();
    }

    #[test]
    fn failed_receive_rolls_back() {
        let mut j = journal(2);
        j.push(0, 1, 512).unwrap();
        let t = take(&mut j, 0, 0, false);
        let Reply::Receive(p, _) = j.reply(0, t.cookie, 0) else {
            panic!()
        };
        assert_eq!(j.received(0, p, false).unwrap(), Outcome::Requeued);
        assert_eq!(j.state(0), Some(State::Queued));
        j.check().unwrap();
    }

    #[test]
    fn fail_one_drains_everything_and_flags_held() {
        let mut j = journal(8);
        for tag in 0..5 {
            j.push(tag, tag, 0).unwrap();
        }
        let held = take(&mut j, 0, 0, true);
        let _sent = take(&mut j, 0, 0, false);
        let mut failed: Vec<u32> = core::iter::from_fn(|| j.fail_one()).collect();
        failed.sort();
        assert_eq!(failed, vec![1, 2, 3, 4]);
        assert_eq!(j.len(), 1);
        assert_eq!(j.sent(held.tag, 0, true, 0).unwrap(), Outcome::Fail(0));
        assert!(j.is_empty());
        j.check().unwrap();
    }

    #[test]
    fn misuse_is_refused_without_damage() {
        let mut j = journal(2);
        assert_eq!(j.push(2, 1, 0), Err((JournalError::BadTag, 1)));
        j.push(0, 1, 0).unwrap();
        assert_eq!(j.push(0, 2, 0), Err((JournalError::WrongState, 2)));
        assert_eq!(j.sent(0, 3, true, 0), Err((JournalError::WrongState, 3)));
        assert_eq!(j.received(0, 3, true), Err((JournalError::WrongState, 3)));
        j.check().unwrap();
    }

    #[test]
    fn journal_depth_is_capped() {
        let j = journal(MAX_DEPTH + 10);
        assert_eq!(j.depth(), MAX_DEPTH);
    }

    /// One step of a random schedule.
    #[derive(Clone, Debug)]
    enum Op {
        Push(u32, bool),
        Take(u8, bool),
        ReplyTo(usize, u32),
        ReplyRandom(u8, u64),
        FinishHeld(usize, bool),
        DropChan(u8),
        Age(u64),
        FailOne,
        Tick(u64),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0u32..8, any::<bool>()).prop_map(|(t, r)| Op::Push(t, r)),
            4 => (0u8..3, any::<bool>()).prop_map(|(c, h)| Op::Take(c, h)),
            4 => (0usize..16, prop_oneof![Just(0u32), Just(5u32)]).prop_map(|(i, e)| Op::ReplyTo(i, e)),
            1 => (0u8..3, any::<u64>()).prop_map(|(c, k)| Op::ReplyRandom(c, k)),
            3 => (0usize..16, any::<bool>()).prop_map(|(i, ok)| Op::FinishHeld(i, ok)),
            1 => (0u8..3).prop_map(Op::DropChan),
            1 => (1u64..50).prop_map(Op::Age),
            1 => Just(Op::FailOne),
            2 => (1u64..20).prop_map(Op::Tick),
        ]
    }

    proptest::proptest! {
        /// Whatever happens, every request ends exactly once, nothing is
        /// lost, and the lists stay consistent.
        #[test]
        fn no_request_lost_or_completed_twice(ops in proptest::collection::vec(op(), 1..300)) {
            let mut j = journal(8);
            let mut now = 0u64;
            let mut next_id = 0u32;
            // id -> ended?
            let mut live: BTreeMap<u32, ()> = BTreeMap::new();
            let mut ended: BTreeMap<u32, ()> = BTreeMap::new();
            // Cookies sent, with their channel; payloads held by "threads".
            let mut sent: Vec<(u8, u64)> = Vec::new();
            let mut held: Vec<(u32, u32, bool)> = Vec::new(); // (tag, payload, is_send)
            let mut end = |id: u32, live: &mut BTreeMap<u32, ()>| {
                assert!(live.remove(&id).is_some(), "request {id} ended twice or never existed");
                assert!(ended.insert(id, ()).is_none());
            };
            for op in ops {
                match op {
                    Op::Push(tag, read) => {
                        let id = next_id;
                        if j.push(tag, id, if read { 512 } else { 0 }).is_ok() {
                            next_id += 1;
                            live.insert(id, ());
                        }
                    }
                    Op::Take(chan, hold) => {
                        if let Some(t) = j.take(chan, now, |_| ((), hold)) {
                            sent.push((chan, t.cookie));
                            if let Some(p) = t.held {
                                held.push((t.tag, p, true));
                            }
                        }
                    }
                    Op::ReplyTo(i, err) => {
                        if !sent.is_empty() {
                            let (chan, c) = sent[i % sent.len()];
                            match j.reply(chan, c, err) {
                                Reply::Complete(p, _) => end(p, &mut live),
                                Reply::Receive(p, _) => held.push((split_cookie(c).0, p, false)),
                                _ => {}
                            }
                        }
                    }
                    Op::ReplyRandom(chan, c) => {
                        match j.reply(chan, c, 0) {
                            Reply::Complete(p, _) => end(p, &mut live),
                            Reply::Receive(p, _) => held.push((split_cookie(c).0, p, false)),
                            _ => {}
                        }
                    }
                    Op::FinishHeld(i, ok) => {
                        if !held.is_empty() {
                            let (tag, p, is_send) = held.remove(i % held.len());
                            let r = if is_send { j.sent(tag, p, ok, now) } else { j.received(tag, p, ok) };
                            match r.expect("holder's return refused") {
                                Outcome::Complete(p, _) | Outcome::Fail(p) => end(p, &mut live),
                                Outcome::Done | Outcome::Requeued => {}
                            }
                        }
                    }
                    Op::DropChan(c) => { j.drop_channel(c); }
                    Op::Age(t) => { j.age(now, t); }
                    Op::FailOne => {
                        if let Some(p) = j.fail_one() { end(p, &mut live); }
                    }
                    Op::Tick(t) => now += t,
                }
                proptest::prop_assert_eq!(j.check(), Ok(()));
                proptest::prop_assert_eq!(j.held() as usize, held.len());
            }
            // Drain: return what threads hold, fail the rest; nothing may remain.
            for (tag, p, is_send) in held.drain(..) {
                let r = if is_send { j.sent(tag, p, false, now) } else { j.received(tag, p, false) };
                if let Outcome::Complete(p, _) | Outcome::Fail(p) = r.unwrap() { end(p, &mut live); }
            }
            while let Some(p) = j.fail_one() { end(p, &mut live); }
            proptest::prop_assert!(j.is_empty());
            proptest::prop_assert!(live.is_empty(), "lost requests: {:?}", live);
        }
    }
}
