// SPDX-License-Identifier: GPL-2.0
//! Channel health: keep-alive probes and suspicion (ENBD's "keep-alives in
//! quiet intervals" and "request aging").
//!
//! A channel is *quiet* when nothing was sent or received on it for the
//! keep-alive interval; it is then probed with a request any NBD server
//! answers (a small READ at offset 0). A channel on which a request spoiled
//! (aged past the request timeout) becomes *suspect*: it takes no new
//! requests and is probed at once. Any valid reply clears suspicion. A probe
//! left unanswered for the request timeout condemns the channel.
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

    /// A valid reply arrived at `now`: the channel works.
    pub fn replied(&mut self, now: u64) {
        self.last_activity = self.last_activity.max(now);
        self.suspect = false;
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
            return if now.saturating_sub(p.sent_at) >= timeout {
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

    /// A probe reply with sequence `seq` arrived. `false` if no such probe
    /// is outstanding (a confused server).
    pub fn probe_reply(&mut self, seq: u32, now: u64) -> bool {
        match self.outstanding {
            Some(p) if p.seq == seq => {
                self.outstanding = None;
                self.replied(now);
                true
            }
            _ => false,
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
        assert!(!h.probe_reply(seq + 1, 41));
        assert!(h.probe_reply(seq, 41));
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
        assert!(h.probe_reply(seq, 2));
        assert!(h.takes_requests());
        // A plain reply clears suspicion too.
        h.suspect();
        h.replied(3);
        assert!(h.takes_requests());
    }
}
