// SPDX-License-Identifier: GPL-2.0
//! Channel health: keep-alive probes and suspicion (ENBD's "keep-alives in
//! quiet intervals" and "request aging").
//!
//! A channel is *quiet* when nothing was sent or received on it for the
//! keep-alive interval; it is then probed with a request any NBD server
//! answers (a small READ at offset 0). A channel on which a request spoiled
//! (aged past the request timeout) becomes *suspect*: it takes no new
//! requests and is probed at once. Any valid reply clears suspicion.
//!
//! A probe left unanswered for the request timeout condemns the channel,
//! unless other replies kept arriving meanwhile: a server that answers in
//! order may keep a probe waiting behind a slow request (a long FLUSH), and
//! a channel whose replies keep coming is alive.
//!
//! Kernel-independent (`no_std`, no allocation): the module keeps one
//! `Health` per channel under its device lock and drives it from the
//! channel threads and the periodic manager.

/// The journal tag of probe cookies; never a real request's tag.
pub const PROBE_TAG: u32 = u32::MAX;

/// What the periodic check asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tick {
    /// Nothing to do.
    Idle,
    /// A probe should go out (the sender picks it up with `take_probe`).
    SendProbe,
    /// The channel failed its probe: drop it.
    Drop,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Probe {
    seq: u32,
    sent_at: u64,
}

/// Health of one channel. Times are in the caller's unit (ns in the kernel).
#[derive(Clone, Copy, Debug, Default)]
pub struct Health {
    last_activity: u64,
    last_reply: u64,
    suspect: bool,
    due: bool,
    outstanding: Option<Probe>,
    seq: u32,
    probes: u64,
}

impl Health {
    /// A new channel, active at `now`.
    pub fn new(now: u64) -> Self {
        Self {
            last_activity: now,
            last_reply: now,
            ..Self::default()
        }
    }

    /// Whether the channel may take new requests.
    pub fn takes_requests(&self) -> bool {
        !self.suspect
    }

    /// Whether a request spoiled on this channel and it is not cleared yet.
    pub fn is_suspect(&self) -> bool {
        self.suspect
    }

    /// Probes sent so far.
    pub fn probes(&self) -> u64 {
        self.probes
    }

    /// A request went out at `now`.
    pub fn sent(&mut self, now: u64) {
        self.last_activity = self.last_activity.max(now);
    }

    /// A valid reply arrived at `now`: the channel works. Returns whether
    /// that cleared a suspicion (the channel takes requests again, so the
    /// caller wakes a sender).
    pub fn replied(&mut self, now: u64) -> bool {
        self.last_activity = self.last_activity.max(now);
        self.last_reply = self.last_reply.max(now);
        core::mem::replace(&mut self.suspect, false)
    }

    /// A request spoiled on this channel: stop feeding it, probe it.
    pub fn suspect(&mut self) {
        self.suspect = true;
        if self.outstanding.is_none() {
            self.due = true;
        }
    }

    /// The periodic check. `keepalive` 0 disables probes of quiet channels;
    /// `timeout` is how long a probe may stay unanswered.
    pub fn tick(&mut self, now: u64, keepalive: u64, timeout: u64) -> Tick {
        if let Some(p) = self.outstanding {
            let alive_at = p.sent_at.max(self.last_reply);
            return if now.saturating_sub(alive_at) >= timeout {
                Tick::Drop
            } else {
                Tick::Idle
            };
        }
        if self.due {
            return Tick::SendProbe;
        }
        if keepalive > 0 && now.saturating_sub(self.last_activity) >= keepalive {
            self.due = true;
            return Tick::SendProbe;
        }
        Tick::Idle
    }

    /// The sender asks whether to send a probe now; returns its sequence
    /// number (the cookie's generation) and marks it outstanding.
    pub fn take_probe(&mut self, now: u64) -> Option<u32> {
        if !self.due || self.outstanding.is_some() {
            return None;
        }
        self.due = false;
        self.seq = self.seq.wrapping_add(1);
        self.probes += 1;
        self.outstanding = Some(Probe {
            seq: self.seq,
            sent_at: now,
        });
        Some(self.seq)
    }

    /// A probe reply with sequence `seq` arrived. `None` if no such probe
    /// is outstanding (a confused server), else whether it cleared a
    /// suspicion (see [`Health::replied`]).
    pub fn probe_reply(&mut self, seq: u32, now: u64) -> Option<bool> {
        match self.outstanding {
            Some(p) if p.seq == seq => {
                self.outstanding = None;
                Some(self.replied(now))
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_channel_is_probed_and_answer_keeps_it() {
        let mut h = Health::new(0);
        assert_eq!(h.tick(5, 10, 30), Tick::Idle);
        h.sent(8);
        assert_eq!(h.tick(15, 10, 30), Tick::Idle);
        assert_eq!(h.tick(18, 10, 30), Tick::SendProbe);
        let seq = h.take_probe(18).unwrap();
        assert_eq!(h.take_probe(19), None, "one probe at a time");
        assert_eq!(
            h.tick(40, 10, 30),
            Tick::Idle,
            "answer still within timeout"
        );
        assert_eq!(h.probe_reply(seq + 1, 41), None);
        assert_eq!(h.probe_reply(seq, 41), Some(false));
        assert_eq!(h.tick(45, 10, 30), Tick::Idle);
        assert_eq!(h.probes(), 1);
    }

    #[test]
    fn unanswered_probe_drops_channel() {
        let mut h = Health::new(0);
        assert_eq!(h.tick(10, 10, 30), Tick::SendProbe);
        h.take_probe(10).unwrap();
        assert_eq!(h.tick(39, 10, 30), Tick::Idle);
        assert_eq!(h.tick(40, 10, 30), Tick::Drop);
    }

    #[test]
    fn keepalive_zero_never_probes_quiet_channels() {
        let mut h = Health::new(0);
        assert_eq!(h.tick(1_000_000, 0, 30), Tick::Idle);
    }

    #[test]
    fn suspicion_stops_requests_until_a_reply() {
        let mut h = Health::new(0);
        h.suspect();
        assert!(!h.takes_requests());
        assert_eq!(
            h.tick(1, 0, 30),
            Tick::SendProbe,
            "suspect channels are probed even without keep-alives"
        );
        let seq = h.take_probe(1).unwrap();
        assert_eq!(h.probe_reply(seq, 2), Some(true), "clearing is reported");
        assert!(h.takes_requests());
        // A plain reply clears suspicion too.
        h.suspect();
        assert!(h.replied(3));
        assert!(!h.replied(4), "nothing left to clear");
        assert!(h.takes_requests());
    }

    #[test]
    fn probe_behind_a_slow_request_does_not_drop_a_channel_that_answers() {
        let mut h = Health::new(0);
        assert_eq!(h.tick(10, 10, 30), Tick::SendProbe);
        h.take_probe(10).unwrap();
        // Replies to other requests keep coming while the probe waits.
        for t in (15..100).step_by(5) {
            h.replied(t);
            assert_eq!(h.tick(t, 10, 30), Tick::Idle, "at {t}");
        }
        // Then silence: the probe's timeout counts from the last reply.
        assert_eq!(h.tick(124, 10, 30), Tick::Idle);
        assert_eq!(h.tick(125, 10, 30), Tick::Drop);
    }

    /// One event in a channel's life.
    #[derive(Clone, Debug)]
    enum Ev {
        Sent,
        Replied,
        Suspect,
        Tick,
        TakeProbe,
        AnswerProbe,
        Wait(u64),
    }

    fn ev() -> impl proptest::strategy::Strategy<Value = Ev> {
        use proptest::prelude::*;
        prop_oneof![
            1 => Just(Ev::Sent),
            1 => Just(Ev::Replied),
            1 => Just(Ev::Suspect),
            3 => Just(Ev::Tick),
            1 => Just(Ev::TakeProbe),
            1 => Just(Ev::AnswerProbe),
            3 => (1u64..20).prop_map(Ev::Wait),
        ]
    }

    proptest::proptest! {
        /// Whatever happens: at most one probe is outstanding; a channel is
        /// dropped only after both its probe and its last reply are at least
        /// `timeout` old, and then it is dropped at the next tick; a suspect
        /// channel takes no requests until a reply; a quiet channel with
        /// keep-alives on is probed.
        #[test]
        fn health_invariants(evs in proptest::collection::vec(ev(), 1..200), keepalive in 0u64..40) {
            const TIMEOUT: u64 = 30;
            let mut h = Health::new(0);
            let mut now = 0u64;
            let (mut last_reply, mut last_activity) = (0u64, 0u64);
            let mut probe: Option<(u32, u64)> = None;
            let mut suspect = false;
            for e in evs {
                match e {
                    Ev::Sent => { h.sent(now); last_activity = now; }
                    Ev::Replied => {
                        proptest::prop_assert_eq!(h.replied(now), suspect);
                        suspect = false;
                        last_reply = now;
                        last_activity = now;
                    }
                    Ev::Suspect => { h.suspect(); suspect = true; }
                    Ev::Tick => {
                        let t = h.tick(now, keepalive, TIMEOUT);
                        match probe {
                            Some((_, at)) => {
                                let dead = now - at.max(last_reply) >= TIMEOUT;
                                proptest::prop_assert_eq!(t == Tick::Drop, dead);
                                if dead {
                                    return Ok(());
                                }
                            }
                            None => {
                                proptest::prop_assert!(t != Tick::Drop, "dropped without a probe");
                                if keepalive > 0 && now - last_activity >= keepalive {
                                    proptest::prop_assert_eq!(t, Tick::SendProbe);
                                }
                                if suspect {
                                    proptest::prop_assert_eq!(t, Tick::SendProbe);
                                }
                            }
                        }
                    }
                    Ev::TakeProbe => {
                        let got = h.take_probe(now);
                        if probe.is_some() {
                            proptest::prop_assert_eq!(got, None, "two probes outstanding");
                        } else if let Some(seq) = got {
                            probe = Some((seq, now));
                        }
                    }
                    Ev::AnswerProbe => {
                        if let Some((seq, _)) = probe.take() {
                            proptest::prop_assert_eq!(h.probe_reply(seq.wrapping_add(1), now), None);
                            proptest::prop_assert_eq!(h.probe_reply(seq, now), Some(suspect));
                            suspect = false;
                            last_reply = now;
                            last_activity = now;
                        }
                    }
                    Ev::Wait(d) => now += d,
                }
                proptest::prop_assert_eq!(h.takes_requests(), !suspect);
                proptest::prop_assert_eq!(h.is_suspect(), suspect);
            }
        }
    }
}
