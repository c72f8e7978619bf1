// SPDX-License-Identifier: GPL-2.0
//! The journal of in-flight requests (ENBD's doubly linked request list).
//!
//! Every request the block layer hands to a device lives in one slot of the
//! journal, indexed by its blk-mq tag, from arrival until completion. Slots
//! are threaded on three doubly linked lists:
//!
//! * the **queue** of requests waiting for a channel (FIFO; rolled-back
//!   requests go to the front, as they are the oldest),
//! * the **in-flight** list of requests handed to a channel, in send order,
//!   so aging only ever looks at the head, and
//! * the **given-up** list of requests that were resubmitted
//!   `max_resubmits` times and failed once more; the caller fails them with
//!   an I/O error ([`Journal::pop_given_up`]).
//!
//! A request is identified on the wire by a cookie `gen << 32 | tag`, where
//! `gen` changes on every transmission. A reply whose cookie no longer
//! matches is recognised as late (its request was rolled back and resent) or
//! duplicate (already answered) through the slot's record of earlier
//! transmissions ("ghosts"), and is discarded; any other unknown cookie means
//! a corrupt stream and drops the channel. A slot remembers more ghosts than
//! a request can have transmissions (`GHOSTS > MAX_RESUBMITS`), so a late
//! reply to *any* earlier transmission of a live request is recognised.
//!
//! # Who pays for a lost channel
//!
//! `max_resubmits` caps a request's rollbacks, but a channel that dies
//! takes every request it carried with it, and only one of them may be to
//! blame (a poison request that makes the server drop the connection). So
//! a rollback by channel loss is charged to a request only when it was the
//! channel's only request; otherwise the rolled-back requests are *tainted*, and a
//! tainted request is sent *solo*, on an otherwise idle channel that takes
//! nothing else until it is answered. The poison request then exhausts its
//! budget alone, while the others complete. Aging is always charged. Each
//! request therefore has at most one uncharged rollback.
//!
//! # Write fencing
//!
//! A modifying request (WRITE, TRIM, WRITE_ZEROES) is never resubmitted
//! while a channel that carried it could still deliver it. Aging therefore
//! never rolls a modifying request back: it reports the channel in
//! [`Aged::fence`], and the request stays on that channel until the caller
//! has shut the channel down and called [`Journal::drop_channel`]. A write
//! whose data could not be sent completely stays on its channel too (the
//! caller drops the channel next). Reads and flushes may be resubmitted
//! while their old transmission is outstanding; the late reply is a ghost.
//!
//! While a channel's thread works on a request's data (sending a write,
//! receiving a read) it *holds* the payload outside the journal, so nothing
//! else can complete it. Events that arrive meanwhile (the channel was
//! dropped, the device is being ejected, the reply came) are recorded in the
//! slot and acted on when the holder gives the payload back.
//!
//! The journal is kernel-independent: `no_std`, no allocation, no locking.
//! The module wraps it in a spinlock; cargo tests drive it directly.

use core::ops::DerefMut;

const NIL: u16 = u16::MAX;

/// Largest number of slots (tags) a journal may have.
pub const MAX_DEPTH: usize = 4096;
/// Largest channel number; channel sets are 64-bit masks.
pub const MAX_CHANNELS: usize = 64;
/// Largest `max_resubmits` a journal honours.
pub const MAX_RESUBMITS: u32 = 16;
/// Earlier transmissions remembered per slot for late and duplicate replies:
/// every earlier transmission of a request that was resubmitted the most
/// times allowed, plus one of the slot's previous request.
const GHOSTS: usize = MAX_RESUBMITS as usize + 1;

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
    /// Out of resubmissions; waiting for [`Journal::pop_given_up`].
    GivenUp,
}

/// A misuse by the caller; the journal is left unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JournalError {
    /// The tag is outside the journal.
    BadTag,
    /// The slot is not in the state the operation needs.
    WrongState,
}

/// An earlier transmission whose reply may still arrive.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Ghost {
    valid: bool,
    chan: u8,
    gen: u32,
    read_len: u32,
}

/// Events recorded while a channel thread holds the payload.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Pending {
    /// The reply (with this NBD error) came while the payload was held.
    answered: Option<u32>,
    /// The channel was dropped: roll back when the payload is returned.
    orphaned: bool,
    /// The device is failing everything: fail when the payload is returned.
    failed: bool,
}

/// One journal entry.
#[derive(Debug)]
pub struct Slot<T> {
    state: State,
    payload: Option<T>,
    prev: u16,
    next: u16,
    chan: u8,
    modifies: bool,
    /// Rolled back with its channel: it goes out solo from now on.
    tainted: bool,
    /// Its current transmission is the only one on its channel.
    solo: bool,
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
            modifies: false,
            tainted: false,
            solo: false,
            gen: 0,
            read_len: 0,
            sent_at: 0,
            resubmits: 0,
            pending: Pending::default(),
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

/// The journal's lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Which {
    Queue,
    InFlight,
    GivenUp,
}

impl Which {
    /// The list a slot in `state` is on.
    fn of(state: State) -> Option<Which> {
        match state {
            State::Free => None,
            State::Queued => Some(Which::Queue),
            State::Sending | State::Sent | State::Receiving => Some(Which::InFlight),
            State::GivenUp => Some(Which::GivenUp),
        }
    }
}

/// Builds the wire cookie of a transmission.
pub fn cookie(tag: u32, gen: u32) -> u64 {
    (u64::from(gen) << 32) | u64::from(tag)
}

/// Splits a wire cookie into (tag, generation).
pub fn split_cookie(cookie: u64) -> (u32, u32) {
    (cookie as u32, (cookie >> 32) as u32)
}

/// What kind of request [`Journal::push`] adds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A read: its reply carries this many bytes of data.
    Read(u32),
    /// A WRITE, TRIM or WRITE_ZEROES: subject to write fencing.
    Modify,
    /// Anything else (FLUSH): no data back, may be resubmitted freely.
    Other,
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
    /// The request went back to the queue (or gave up): wake a sender and
    /// look at [`Journal::pop_given_up`].
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
    /// Reads and flushes rolled back to the queue.
    pub rolled_back: u32,
    /// Channels with a spoiled read or flush (bit per channel): mark them
    /// suspect and probe them.
    pub suspects: u64,
    /// Channels holding a spoiled modifying request: shut them down, then
    /// call [`Journal::drop_channel`], which resubmits it (write fencing).
    pub fence: u64,
    /// Channels stuck transferring a spoiled request's data: drop them.
    pub stuck: u64,
}

/// A request that ran out of resubmissions, from [`Journal::pop_given_up`].
#[derive(Debug, PartialEq, Eq)]
pub struct GivenUp<T> {
    /// The request, to fail with an I/O error.
    pub payload: T,
    /// How often it was resubmitted.
    pub resubmits: u32,
}

/// The journal. `S` is the slot storage (a `Vec` or the kernel's `KVec`).
pub struct Journal<T, S> {
    slots: S,
    queue: List,
    inflight: List,
    given_up: List,
    /// Requests in flight per channel.
    load: [u16; MAX_CHANNELS],
    /// Channels carrying a solo request.
    solo: u64,
    held: u32,
    max_resubmits: u32,
    resubmits: u64,
    late: u64,
    gave_up: u64,
    _t: core::marker::PhantomData<T>,
}

impl<T, S: DerefMut<Target = [Slot<T>]>> Journal<T, S> {
    /// Wraps `slots` (all `Slot::default()`) as an empty journal. Storage
    /// beyond `MAX_DEPTH` slots is not used. Requests may be resubmitted
    /// `MAX_RESUBMITS` times until [`Journal::set_max_resubmits`] says
    /// otherwise.
    pub fn new(slots: S) -> Self {
        Self {
            slots,
            queue: List::EMPTY,
            inflight: List::EMPTY,
            given_up: List::EMPTY,
            load: [0; MAX_CHANNELS],
            solo: 0,
            held: 0,
            max_resubmits: MAX_RESUBMITS,
            resubmits: 0,
            late: 0,
            gave_up: 0,
            _t: core::marker::PhantomData,
        }
    }

    /// Sets how often a request may be resubmitted before it gives up
    /// (capped at [`MAX_RESUBMITS`]).
    pub fn set_max_resubmits(&mut self, n: u32) {
        self.max_resubmits = n.min(MAX_RESUBMITS);
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
        self.queue.len + self.inflight.len + self.given_up.len
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

    /// Requests that ran out of resubmissions so far.
    pub fn gave_up(&self) -> u64 {
        self.gave_up
    }

    /// When the request with `tag` was last handed to a channel.
    pub fn sent_at(&self, tag: u32) -> Option<u64> {
        self.slot(tag).map(|s| s.sent_at)
    }

    /// State of a slot (for reports and tests).
    pub fn state(&self, tag: u32) -> Option<State> {
        self.slot(tag).map(|s| s.state)
    }

    /// The channel a slot was last handed to (for reports and tests).
    pub fn channel_of(&self, tag: u32) -> Option<u8> {
        self.slot(tag).map(|s| s.chan)
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

    fn list_mut(&mut self, which: Which) -> &mut List {
        match which {
            Which::Queue => &mut self.queue,
            Which::InFlight => &mut self.inflight,
            Which::GivenUp => &mut self.given_up,
        }
    }

    fn link_back(&mut self, i: usize, which: Which) {
        let tail = self.list_mut(which).tail;
        self.slots[i].prev = tail;
        self.slots[i].next = NIL;
        if tail == NIL {
            self.list_mut(which).head = i as u16;
        } else {
            self.slots[tail as usize].next = i as u16;
        }
        let l = self.list_mut(which);
        l.tail = i as u16;
        l.len += 1;
        if which == Which::InFlight {
            let s = &self.slots[i];
            let c = s.chan as usize % MAX_CHANNELS;
            self.load[c] += 1;
            if s.solo {
                self.solo |= 1 << c;
            }
        }
    }

    fn link_front(&mut self, i: usize, which: Which) {
        let head = self.list_mut(which).head;
        self.slots[i].prev = NIL;
        self.slots[i].next = head;
        if head == NIL {
            self.list_mut(which).tail = i as u16;
        } else {
            self.slots[head as usize].prev = i as u16;
        }
        let l = self.list_mut(which);
        l.head = i as u16;
        l.len += 1;
    }

    /// Takes slot `i` off the list its state puts it on.
    fn unlink(&mut self, i: usize) {
        let Some(which) = Which::of(self.slots[i].state) else {
            return;
        };
        let (prev, next) = (self.slots[i].prev, self.slots[i].next);
        if prev == NIL {
            self.list_mut(which).head = next;
        } else {
            self.slots[prev as usize].next = next;
        }
        if next == NIL {
            self.list_mut(which).tail = prev;
        } else {
            self.slots[next as usize].prev = prev;
        }
        self.slots[i].prev = NIL;
        self.slots[i].next = NIL;
        self.list_mut(which).len -= 1;
        if which == Which::InFlight {
            let s = &self.slots[i];
            let c = s.chan as usize % MAX_CHANNELS;
            self.load[c] -= 1;
            if s.solo {
                self.solo &= !(1 << c);
            }
        }
    }

    /// Records the current transmission of slot `i` as one whose reply may
    /// still arrive; the oldest record makes room.
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
        s.pending = Pending::default();
        s.payload.take()
    }

    /// Whether in-flight slot `i` is the only request on its channel, so a
    /// loss of the channel is its own doing.
    fn alone(&self, i: usize) -> bool {
        let s = &self.slots[i];
        s.solo || self.load[s.chan as usize % MAX_CHANNELS] == 1
    }

    /// Puts an unlinked request (payload present) back at the queue's
    /// front, or on the given-up list once it was resubmitted
    /// `max_resubmits` times. `charged`: the rollback counts against its
    /// budget (see "Who pays for a lost channel").
    fn requeue(&mut self, i: usize, charged: bool) {
        let max = self.max_resubmits;
        let s = &mut self.slots[i];
        s.pending = Pending::default();
        if !charged {
            s.tainted = true;
            s.state = State::Queued;
            self.resubmits += 1;
            self.link_front(i, Which::Queue);
            return;
        }
        if s.resubmits >= max {
            s.state = State::GivenUp;
            self.gave_up += 1;
            self.link_back(i, Which::GivenUp);
            return;
        }
        s.state = State::Queued;
        s.resubmits += 1;
        self.resubmits += 1;
        self.link_front(i, Which::Queue);
    }

    /// Adds a new request of `kind`.
    pub fn push(&mut self, tag: u32, payload: T, kind: Kind) -> Result<(), (JournalError, T)> {
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
        s.read_len = match kind {
            Kind::Read(len) => len,
            Kind::Modify | Kind::Other => 0,
        };
        s.modifies = kind == Kind::Modify;
        s.tainted = false;
        s.resubmits = 0;
        s.pending = Pending::default();
        self.link_back(i, Which::Queue);
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
        let c = chan as usize % MAX_CHANNELS;
        if head == NIL || self.solo & (1 << c) != 0 {
            return None;
        }
        let i = head as usize;
        // A tainted request waits for an idle channel.
        let solo = self.slots[i].tainted;
        if solo && self.load[c] > 0 {
            return None;
        }
        let (header, hold) = f(self.slots[i].payload.as_ref()?);
        self.unlink(i);
        let s = &mut self.slots[i];
        s.gen = s.gen.wrapping_add(1);
        s.chan = chan;
        s.solo = solo;
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
        self.link_back(i, Which::InFlight);
        Some(Taken {
            tag: i as u32,
            cookie: cookie(i as u32, gen),
            header,
            held,
            resubmits,
        })
    }

    /// The sender of a held request is done with it; `ok` says whether the
    /// whole request reached the socket. A request that did not is never
    /// completed as a success: it stays on its channel, which the caller
    /// must drop next ([`Journal::drop_channel`] resubmits it).
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
        let pending = core::mem::take(&mut self.slots[i].pending);
        self.slots[i].payload = Some(payload);
        if pending.failed {
            self.unlink(i);
            let p = self.free(i);
            return Ok(p.map_or(Outcome::Done, Outcome::Fail));
        }
        match pending.answered {
            // An error reply may come before all data left (the server
            // refused the request early); success only after.
            Some(err) if ok || err != 0 => {
                self.unlink(i);
                self.remember(i);
                let p = self.free(i);
                return Ok(p.map_or(Outcome::Done, |p| Outcome::Complete(p, err)));
            }
            _ => {}
        }
        if pending.orphaned {
            self.unlink(i);
            self.requeue(i, self.slots[i].solo);
            return Ok(Outcome::Requeued);
        }
        // Sent (or broken and waiting for its channel to be dropped). Keep
        // the in-flight list in send order: move to the tail.
        self.unlink(i);
        let s = &mut self.slots[i];
        s.state = State::Sent;
        s.sent_at = now;
        self.link_back(i, Which::InFlight);
        Ok(Outcome::Done)
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
                    self.unlink(i);
                    self.remember(i);
                    match self.free(i) {
                        Some(p) => Reply::Complete(p, error),
                        None => Reply::Corrupt,
                    }
                }
            }
            State::Sending if current => {
                // The sender completes it when it returns the payload.
                self.slots[i].pending.answered = Some(error);
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
        let alone = self.alone(i);
        self.unlink(i);
        let pending = self.slots[i].pending;
        self.slots[i].payload = Some(payload);
        if pending.failed {
            let p = self.free(i);
            return Ok(p.map_or(Outcome::Done, Outcome::Fail));
        }
        if ok {
            // Data arrived intact: a spoil noted meanwhile no longer matters.
            self.remember(i);
            let p = self.free(i);
            return Ok(p.map_or(Outcome::Done, |p| Outcome::Complete(p, 0)));
        }
        // A read is not modifying: it may go out again at once.
        self.requeue(i, alone);
        Ok(Outcome::Requeued)
    }

    /// Channel `chan` is gone and can deliver nothing more: rolls its
    /// requests back (requests its threads hold roll back when returned)
    /// and forgets its late replies. Returns the number rolled back now.
    pub fn drop_channel(&mut self, chan: u8) -> u32 {
        let mut n = 0;
        let alone = self.load[chan as usize % MAX_CHANNELS] == 1;
        let mut cur = self.inflight.head;
        while cur != NIL {
            let i = cur as usize;
            cur = self.slots[i].next;
            if self.slots[i].chan != chan {
                continue;
            }
            if alone && !self.slots[i].solo {
                // The channel's only request: the blame is clear.
                self.slots[i].solo = true;
                self.solo |= 1 << (chan as usize % MAX_CHANNELS);
            }
            match self.slots[i].state {
                State::Sent => {
                    self.unlink(i);
                    self.requeue(i, self.slots[i].solo);
                    n += 1;
                }
                State::Sending | State::Receiving => self.slots[i].pending.orphaned = true,
                _ => {}
            }
        }
        let depth = self.depth();
        for s in self.slots.iter_mut().take(depth) {
            for g in s.ghosts.iter_mut().filter(|g| g.chan == chan) {
                g.valid = false;
            }
        }
        n
    }

    /// Spoils requests sent at or before `now - timeout`. Sent reads and
    /// flushes are rolled back to the queue (their channel may still answer;
    /// that reply is discarded as late). Modifying requests stay where they
    /// are and their channel is reported for fencing; held ones report
    /// their channel as stuck.
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
            match s.state {
                State::Sent if s.modifies => out.fence |= bit,
                State::Sent => {
                    out.suspects |= bit;
                    self.unlink(i);
                    self.remember(i);
                    self.requeue(i, true);
                    out.rolled_back += 1;
                }
                State::Sending | State::Receiving => out.stuck |= bit,
                _ => {}
            }
        }
        out
    }

    /// Whether channel `chan` is idle while the queue's head waits for an
    /// idle channel (it is tainted and goes out solo): wake its sender.
    pub fn solo_ready(&self, chan: u8) -> bool {
        let head = self.queue.head;
        head != NIL
            && self.slots[head as usize].tainted
            && self.load[chan as usize % MAX_CHANNELS] == 0
    }

    /// Takes out the next request that ran out of resubmissions, to fail.
    pub fn pop_given_up(&mut self) -> Option<GivenUp<T>> {
        let head = self.given_up.head;
        if head == NIL {
            return None;
        }
        let i = head as usize;
        let resubmits = self.slots[i].resubmits;
        self.unlink(i);
        self.free(i).map(|payload| GivenUp { payload, resubmits })
    }

    /// Takes one request out to fail it (eject, or no channel for too long).
    /// Held requests are flagged and failed when returned. Call until `None`.
    pub fn fail_one(&mut self) -> Option<T> {
        for head in [self.queue.head, self.given_up.head] {
            if head != NIL {
                self.unlink(head as usize);
                return self.free(head as usize);
            }
        }
        let mut cur = self.inflight.head;
        while cur != NIL {
            let i = cur as usize;
            cur = self.slots[i].next;
            if self.slots[i].state == State::Sent {
                self.unlink(i);
                return self.free(i);
            }
            self.slots[i].pending.failed = true;
        }
        None
    }

    /// Requests whose payload a channel thread holds right now.
    pub fn held(&self) -> u32 {
        self.held
    }

    /// Checks every structural invariant; for tests and debug builds.
    pub fn check(&self) -> Result<(), &'static str> {
        let mut on_lists = 0u32;
        for which in [Which::Queue, Which::InFlight, Which::GivenUp] {
            let l = match which {
                Which::Queue => &self.queue,
                Which::InFlight => &self.inflight,
                Which::GivenUp => &self.given_up,
            };
            let mut prev = NIL;
            let mut cur = l.head;
            let mut n = 0u32;
            while cur != NIL {
                let s = self.slots.get(cur as usize).ok_or("link out of range")?;
                if s.prev != prev {
                    return Err("broken prev link");
                }
                if Which::of(s.state) != Some(which) {
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
            on_lists += n;
        }
        let mut held = 0u32;
        for s in self.slots.iter().take(self.depth()) {
            match s.state {
                State::Free => {
                    if s.payload.is_some() {
                        return Err("free slot with payload");
                    }
                }
                State::Queued | State::Sent | State::GivenUp => {
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
            if s.resubmits > MAX_RESUBMITS {
                return Err("resubmitted more often than allowed");
            }
        }
        let in_use = self
            .slots
            .iter()
            .take(self.depth())
            .filter(|s| s.state != State::Free)
            .count() as u32;
        if in_use != on_lists {
            return Err("slot in use but on no list");
        }
        if held != self.held {
            return Err("held count wrong");
        }
        let mut load = [0u16; MAX_CHANNELS];
        let mut solo = 0u64;
        let mut cur = self.inflight.head;
        while cur != NIL {
            let s = &self.slots[cur as usize];
            let c = s.chan as usize % MAX_CHANNELS;
            load[c] += 1;
            if s.solo {
                solo |= 1 << c;
            }
            cur = s.next;
        }
        if load != self.load || solo != self.solo {
            return Err("channel load or solo set wrong");
        }
        if (0..MAX_CHANNELS).any(|c| solo & (1 << c) != 0 && load[c] != 1) {
            return Err("a solo request shares its channel");
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
        j.push(2, 100, Kind::Read(4096)).unwrap();
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
        j.push(1, 7, Kind::Modify).unwrap();
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
        j.push(0, 1, Kind::Read(512)).unwrap();
        let t = take(&mut j, 0, 0, false);
        assert_eq!(j.reply(0, t.cookie, 5), Reply::Complete(1, 5));
        assert_eq!(j.reply(0, t.cookie, 5), Reply::Late { discard: 0 });
    }

    #[test]
    fn unknown_cookies_are_corrupt() {
        let mut j = journal(2);
        assert_eq!(j.reply(0, cookie(9, 1), 0), Reply::Corrupt);
        j.push(0, 1, Kind::Other).unwrap();
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
            j.push(tag, tag, Kind::Other).unwrap();
        }
        let a = take(&mut j, 0, 0, false);
        let b = take(&mut j, 1, 0, false);
        let c = take(&mut j, 0, 0, true);
        assert_eq!(j.drop_channel(0), 1);
        j.check().unwrap();
        // `a` is first in the queue again; `c` is held and rolls back on return.
        assert_eq!(j.sent(c.tag, 2, false, 1).unwrap(), Outcome::Requeued);
        // Rolled back with their channel, they are tainted: each goes out
        // solo, on an idle channel, and the rollback is not charged.
        let mut chan = 2;
        let order: Vec<(u32, u32)> = core::iter::from_fn(|| {
            chan += 1;
            j.take(chan, 5, |p| (*p, false))
                .map(|t| (t.header, t.resubmits))
        })
        .collect();
        assert_eq!(order, vec![(2, 0), (0, 0), (3, 0)]);
        assert!(j.take(3, 5, |p| (*p, false)).is_none(), "solo channel");
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
        j.push(0, 10, Kind::Read(4096)).unwrap();
        j.push(1, 11, Kind::Other).unwrap();
        let a = take(&mut j, 0, 100, false);
        let b = take(&mut j, 0, 150, false);
        let aged = j.age(200, 100);
        assert_eq!(
            aged,
            Aged {
                rolled_back: 1,
                suspects: 1,
                fence: 0,
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
        j.push(0, 1, Kind::Modify).unwrap();
        let t = take(&mut j, 5, 0, true);
        let aged = j.age(1000, 10);
        assert_eq!(aged.stuck, 1 << 5);
        // The caller drops the stuck channel; the write rolls back when its
        // sender returns it, never before.
        assert_eq!(j.drop_channel(5), 0);
        assert_eq!(j.state(0), Some(State::Sending));
        assert_eq!(j.sent(t.tag, 1, true, 1000).unwrap(), Outcome::Requeued);
        j.check().unwrap();
    }

    #[test]
    fn failed_receive_rolls_back() {
        let mut j = journal(2);
        j.push(0, 1, Kind::Read(512)).unwrap();
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
            j.push(tag, tag, Kind::Other).unwrap();
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
        assert_eq!(j.push(2, 1, Kind::Other), Err((JournalError::BadTag, 1)));
        j.push(0, 1, Kind::Other).unwrap();
        assert_eq!(
            j.push(0, 2, Kind::Other),
            Err((JournalError::WrongState, 2))
        );
        assert_eq!(j.sent(0, 3, true, 0), Err((JournalError::WrongState, 3)));
        assert_eq!(j.received(0, 3, true), Err((JournalError::WrongState, 3)));
        j.check().unwrap();
    }

    #[test]
    fn journal_depth_is_capped() {
        let j = journal(MAX_DEPTH + 10);
        assert_eq!(j.depth(), MAX_DEPTH);
    }

    #[test]
    fn aged_write_is_fenced_until_its_channel_is_dropped() {
        let mut j = journal(4);
        j.push(0, 1, Kind::Modify).unwrap();
        let t = take(&mut j, 0, 0, true);
        assert_eq!(j.sent(0, 1, true, 0).unwrap(), Outcome::Done);
        let aged = j.age(100, 10);
        assert_eq!(
            aged,
            Aged {
                rolled_back: 0,
                suspects: 0,
                fence: 1,
                stuck: 0
            }
        );
        // Still on channel 0: no other channel can take it.
        assert_eq!(j.state(0), Some(State::Sent));
        assert!(j.take(1, 100, |_| ((), true)).is_none());
        // A reply on the still-open channel completes it normally.
        assert_eq!(j.reply(0, t.cookie, 0), Reply::Complete(1, 0));

        j.push(1, 2, Kind::Modify).unwrap();
        let t = take(&mut j, 0, 200, false);
        assert_eq!(j.age(300, 10).fence, 1);
        assert_eq!(j.drop_channel(0), 1);
        let t2 = take(&mut j, 1, 300, false);
        // It was alone on channel 0, so the rollback is charged.
        assert_eq!((t2.tag, t2.resubmits), (1, 1));
        // The old channel is gone; its cookie is not a late reply but corrupt.
        assert_eq!(j.reply(0, t.cookie, 0), Reply::Corrupt);
        assert_eq!(j.reply(1, t2.cookie, 0), Reply::Complete(2, 0));
        j.check().unwrap();
    }

    #[test]
    fn tainted_request_waits_for_an_idle_channel() {
        let mut j = journal(4);
        for tag in 0..3 {
            j.push(tag, tag, Kind::Other).unwrap();
        }
        take(&mut j, 0, 0, false);
        take(&mut j, 0, 0, false);
        let c = take(&mut j, 1, 0, false);
        assert_eq!(j.drop_channel(0), 2);
        assert!(!j.solo_ready(1));
        assert!(j.take(1, 0, |p| (*p, false)).is_none(), "channel 1 is busy");
        assert_eq!(j.reply(1, c.cookie, 0), Reply::Complete(2, 0));
        assert!(j.solo_ready(1), "idle now: its sender must be woken");
        assert_eq!(j.take(1, 0, |p| (*p, false)).map(|t| t.header), Some(1));
        assert!(j.take(1, 0, |p| (*p, false)).is_none(), "solo");
        assert!(!j.solo_ready(1));
        assert!(j.solo_ready(2));
        j.check().unwrap();
    }

    #[test]
    fn poison_request_fails_alone() {
        let mut j = journal(8);
        j.set_max_resubmits(3);
        for tag in 0..5 {
            j.push(tag, tag, Kind::Read(512)).unwrap();
        }
        // The server drops any connection that carries request 2.
        let (mut chan, mut done, mut gave_up) = (0u8, Vec::new(), Vec::new());
        for _ in 0..50 {
            let taken: Vec<_> = core::iter::from_fn(|| j.take(chan, 0, |p| (*p, false))).collect();
            if taken.iter().any(|t| t.header == 2) {
                j.drop_channel(chan);
                chan += 1;
            } else {
                for t in taken {
                    let Reply::Receive(p, _) = j.reply(chan, t.cookie, 0) else {
                        panic!()
                    };
                    if let Outcome::Complete(p, 0) = j.received(t.tag, p, true).unwrap() {
                        done.push(p);
                    }
                }
            }
            while let Some(g) = j.pop_given_up() {
                gave_up.push((g.payload, g.resubmits));
            }
            j.check().unwrap();
            if j.is_empty() {
                break;
            }
        }
        done.sort();
        assert_eq!(done, vec![0, 1, 3, 4]);
        assert_eq!(gave_up, vec![(2, 3)]);
    }

    #[test]
    fn half_sent_write_never_completes_as_success() {
        let mut j = journal(2);
        j.push(0, 1, Kind::Modify).unwrap();
        let t = take(&mut j, 0, 0, true);
        assert_eq!(j.reply(0, t.cookie, 0), Reply::Deferred);
        // The data did not all leave: the success reply is not believed.
        assert_eq!(j.sent(0, 1, false, 0).unwrap(), Outcome::Done);
        assert_eq!(j.state(0), Some(State::Sent));
        assert_eq!(j.drop_channel(0), 1);
        assert_eq!(j.state(0), Some(State::Queued));
        // An error reply is believed even for a half-sent write.
        let t = take(&mut j, 1, 0, true);
        assert_eq!(j.reply(1, t.cookie, 28), Reply::Deferred);
        assert_eq!(j.sent(0, 1, false, 0).unwrap(), Outcome::Complete(1, 28));
        j.check().unwrap();
    }

    #[test]
    fn gives_up_after_max_resubmits_and_knows_every_late_reply() {
        let mut j = journal(2);
        j.set_max_resubmits(3);
        j.push(1, 9, Kind::Read(512)).unwrap();
        let mut cookies = Vec::new();
        for round in 0..4u64 {
            let t = take(&mut j, 0, round * 100, false);
            assert_eq!(t.resubmits as u64, round);
            cookies.push(t.cookie);
            j.age(round * 100 + 50, 10);
            j.check().unwrap();
        }
        assert_eq!(j.state(1), Some(State::GivenUp));
        assert!(j.take(0, 500, |_| ((), false)).is_none());
        assert_eq!(j.len(), 1);
        assert_eq!(j.gave_up(), 1);
        assert_eq!(
            j.pop_given_up(),
            Some(GivenUp {
                payload: 9,
                resubmits: 3
            })
        );
        assert!(j.is_empty());
        // Every one of the four transmissions may still answer, once.
        for c in &cookies {
            assert_eq!(j.reply(0, *c, 0), Reply::Late { discard: 512 });
        }
        for c in &cookies {
            assert_eq!(j.reply(0, *c, 0), Reply::Corrupt);
        }
        j.check().unwrap();
    }

    #[test]
    fn late_replies_of_the_most_resubmitted_request_are_all_known() {
        let mut j = journal(1);
        j.push(0, 1, Kind::Read(4096)).unwrap();
        let mut cookies = Vec::new();
        for round in 0..=u64::from(MAX_RESUBMITS) {
            cookies.push(take(&mut j, (round % 3) as u8, round * 10, false).cookie);
            if round < u64::from(MAX_RESUBMITS) {
                j.age(round * 10 + 10, 5);
            }
        }
        let last = cookies.pop().unwrap();
        for (n, c) in cookies.iter().enumerate() {
            let chan = (n % 3) as u8;
            assert_eq!(
                j.reply(chan, *c, 0),
                Reply::Late { discard: 4096 },
                "transmission {n}"
            );
        }
        let Reply::Receive(p, _) = j.reply((u64::from(MAX_RESUBMITS) % 3) as u8, last, 0) else {
            panic!("the last transmission completes")
        };
        assert_eq!(j.received(0, p, true).unwrap(), Outcome::Complete(1, 0));
    }

    #[test]
    fn dropped_channel_forgets_its_late_replies() {
        let mut j = journal(2);
        j.push(0, 1, Kind::Read(512)).unwrap();
        let t = take(&mut j, 2, 0, false);
        j.age(100, 10);
        j.drop_channel(2);
        // A new channel with the same id cannot pass the old cookie off as late.
        assert_eq!(j.reply(2, t.cookie, 0), Reply::Corrupt);
    }

    /// One step of a random schedule.
    #[derive(Clone, Debug)]
    enum Op {
        /// A request of kind 0 (read), 1 (write) or 2 (flush).
        Push(u32, u8),
        Take(u8, bool),
        ReplyTo(usize, u32),
        ReplyRandom(u8, u64),
        FinishHeld(usize, bool),
        DropChan(u8),
        /// Age with this timeout; drop the fenced and stuck channels (as the
        /// kernel does) when the flag is set.
        Age(u64, bool),
        FailOne,
        PopGivenUp,
        SetMax(u32),
        Tick(u64),
    }

    fn op() -> impl proptest::strategy::Strategy<Value = Op> {
        use proptest::prelude::*;
        prop_oneof![
            4 => (0u32..8, 0u8..3).prop_map(|(t, k)| Op::Push(t, k)),
            4 => (0u8..3, any::<bool>()).prop_map(|(c, h)| Op::Take(c, h)),
            4 => (0usize..16, prop_oneof![Just(0u32), Just(5u32)]).prop_map(|(i, e)| Op::ReplyTo(i, e)),
            1 => (0u8..3, any::<u64>()).prop_map(|(c, k)| Op::ReplyRandom(c, k)),
            3 => (0usize..16, any::<bool>()).prop_map(|(i, ok)| Op::FinishHeld(i, ok)),
            1 => (0u8..3).prop_map(Op::DropChan),
            2 => (1u64..50, any::<bool>()).prop_map(|(t, d)| Op::Age(t, d)),
            1 => Just(Op::FailOne),
            1 => Just(Op::PopGivenUp),
            1 => (0u32..4).prop_map(Op::SetMax),
            2 => (1u64..20).prop_map(Op::Tick),
        ]
    }

    /// One transmission as the test's "network" sees it.
    #[derive(Clone, Copy, Debug)]
    struct Wire {
        chan: u8,
        /// The channel's incarnation: a dropped channel delivers nothing.
        inc: u32,
        cookie: u64,
        id: u32,
    }

    proptest::proptest! {
        /// Whatever happens: every request ends exactly once and nothing is
        /// lost; only a request's latest transmission completes it; a
        /// modifying request is never handed to a channel while an earlier
        /// transmission of it could still be delivered (write fencing),
        /// however slow its channel; and resubmissions stay capped.
        #[test]
        fn requests_end_once_and_writes_are_fenced(ops in proptest::collection::vec(op(), 1..300)) {
            let mut j = journal(8);
            let mut now = 0u64;
            let mut next_id = 0u32;
            let mut live: BTreeMap<u32, u8> = BTreeMap::new(); // id -> kind
            let mut ended: BTreeMap<u32, ()> = BTreeMap::new();
            let mut latest: BTreeMap<u32, u64> = BTreeMap::new(); // id -> cookie
            let mut inc = [0u32; 3];
            // Transmissions whose reply may still come.
            let mut wire: Vec<Wire> = Vec::new();
            let mut held: Vec<(u32, u32, bool)> = Vec::new(); // (tag, id, is_send)
            let mut end = |id: u32, live: &mut BTreeMap<u32, u8>| {
                assert!(live.remove(&id).is_some(), "request {id} ended twice or never existed");
                assert!(ended.insert(id, ()).is_none());
            };
            let deliverable = |w: &Wire, inc: &[u32; 3]| w.inc == inc[w.chan as usize];
            for op in ops {
                match op {
                    Op::Push(tag, k) => {
                        let id = next_id;
                        let kind = match k { 0 => Kind::Read(512), 1 => Kind::Modify, _ => Kind::Other };
                        if j.push(tag, id, kind).is_ok() {
                            next_id += 1;
                            live.insert(id, k);
                        }
                    }
                    Op::Take(chan, hold) => {
                        let kinds = &live;
                        if let Some(t) = j.take(chan, now, |p| (*p, hold && kinds[p] == 1)) {
                            let id = t.header;
                            proptest::prop_assert!(t.resubmits <= MAX_RESUBMITS);
                            if live[&id] == 1 {
                                let open = wire.iter().filter(|w| w.id == id && deliverable(w, &inc)).count();
                                proptest::prop_assert_eq!(open, 0, "write {} resubmitted while a channel may still deliver it", id);
                            }
                            wire.push(Wire { chan, inc: inc[chan as usize], cookie: t.cookie, id });
                            latest.insert(id, t.cookie);
                            if t.held.is_some() {
                                held.push((t.tag, id, true));
                            }
                        }
                    }
                    Op::ReplyTo(i, err) => {
                        wire.retain(|w| deliverable(w, &inc));
                        if !wire.is_empty() {
                            let w = wire.remove(i % wire.len());
                            let r = j.reply(w.chan, w.cookie, err);
                            if matches!(r, Reply::Complete(..) | Reply::Receive(..) | Reply::Deferred) {
                                proptest::prop_assert_eq!(latest.get(&w.id), Some(&w.cookie), "a stale reply matched request {}", w.id);
                            }
                            match r {
                                Reply::Complete(p, _) => end(p, &mut live),
                                Reply::Receive(p, _) => held.push((split_cookie(w.cookie).0, p, false)),
                                // Only a request that already ended (ejected, or
                                // its record evicted) may be unknown.
                                Reply::Corrupt => proptest::prop_assert!(!live.contains_key(&w.id), "a reply to live request {} was called corrupt", w.id),
                                _ => {}
                            }
                        }
                    }
                    Op::ReplyRandom(chan, c) => {
                        if wire.iter().any(|w| w.cookie == c && w.chan == chan) {
                            continue;
                        }
                        match j.reply(chan, c, 0) {
                            Reply::Corrupt | Reply::Late { .. } => {}
                            r => proptest::prop_assert!(false, "a made-up cookie matched: {:?}", r),
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
                    Op::DropChan(c) => {
                        inc[c as usize] += 1;
                        j.drop_channel(c);
                    }
                    Op::Age(t, drop) => {
                        let aged = j.age(now, t);
                        if drop {
                            for c in 0..3u8 {
                                if (aged.fence | aged.stuck) & (1 << c) != 0 {
                                    inc[c as usize] += 1;
                                    j.drop_channel(c);
                                }
                            }
                        }
                    }
                    Op::FailOne => {
                        if let Some(p) = j.fail_one() { end(p, &mut live); }
                    }
                    Op::PopGivenUp => {
                        if let Some(g) = j.pop_given_up() { end(g.payload, &mut live); }
                    }
                    Op::SetMax(n) => j.set_max_resubmits(n),
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
            while let Some(g) = j.pop_given_up() { end(g.payload, &mut live); }
            while let Some(p) = j.fail_one() { end(p, &mut live); }
            proptest::prop_assert!(j.is_empty());
            proptest::prop_assert!(live.is_empty(), "lost requests: {:?}", live);
        }
    }
}
