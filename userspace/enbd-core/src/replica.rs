// SPDX-License-Identifier: GPL-2.0
//! Choosing among replica servers by round-trip time, as dnbd3's clients do
//! (issue 14): each server's RTT is the average of its last few probes; the
//! fastest server carries the I/O; the client moves to another only when
//! that one is clearly faster, so two servers of equal speed never make it
//! flap; probes back off while nothing changes and come every couple of
//! seconds while no server works ("panic mode").
//!
//! Pure logic, no clock and no I/O: the kernel module, the helper and the
//! caching proxy feed it samples and act on its answers. RTTs are in
//! microseconds.

/// Probes averaged into a server's RTT.
pub const SAMPLES: usize = 4;

/// The RTT recorded for a probe that failed or timed out (about 134 s, as
/// dnbd3's `RTT_UNREACHABLE`): it drags the average up without overflowing
/// it, so one lost probe makes a server look slow, several make it unusable.
pub const UNREACHABLE_US: u32 = 0x7ff_ffff;

/// Hysteresis of [`choose`]: another server must be faster than 3/4 of the
/// current one's RTT by more than this. dnbd3 uses the same rule (its
/// `RTT_THRESHOLD_FACTOR` and 1.8 ms); the margin keeps servers on one LAN
/// (RTTs of tens of microseconds, where 3/4 is noise) from trading places.
pub const SWITCH_MARGIN_US: u32 = 1_800;

/// The last [`SAMPLES`] probe times of one server.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rtt {
    samples: [u32; SAMPLES],
    len: u8,
    next: u8,
}

impl Rtt {
    /// A probe answered after `us` microseconds.
    pub fn record(&mut self, us: u32) {
        let us = us.min(UNREACHABLE_US);
        let i = usize::from(self.next) % SAMPLES;
        self.samples[i] = us;
        self.next = ((i + 1) % SAMPLES) as u8;
        if usize::from(self.len) < SAMPLES {
            self.len += 1;
        }
    }

    /// A probe that failed: counted as [`UNREACHABLE_US`].
    pub fn record_failure(&mut self) {
        self.record(UNREACHABLE_US);
    }

    /// The average of the recorded probes; `None` before the first one.
    pub fn average(&self) -> Option<u32> {
        let n = usize::from(self.len).min(SAMPLES);
        if n == 0 {
            return None;
        }
        let sum: u64 = self.samples[..n].iter().map(|&s| u64::from(s)).sum();
        Some((sum / n as u64) as u32)
    }

    /// Whether the server answers at all: measured, and its average below
    /// the failure mark (a server whose every recent probe failed is not).
    pub fn usable(&self) -> bool {
        self.average().is_some_and(|a| a < UNREACHABLE_US)
    }
}

/// Whether a server with RTT `candidate` is clearly faster than the current
/// one at `current`: `current * 3/4 > candidate + SWITCH_MARGIN_US`.
pub fn clearly_faster(candidate: u32, current: u32) -> bool {
    u64::from(current) * 3 > (u64::from(candidate) + u64::from(SWITCH_MARGIN_US)) * 4
}

/// The server the I/O should go to, given the current one and every
/// server's RTT (`None` for one not measured yet). Stays with `current`
/// while it is usable and no other is [`clearly_faster`]; moves to the
/// fastest usable server otherwise (the first of equals). `None` when no
/// server is usable: panic mode.
pub fn choose(current: Option<usize>, rtts: &[Rtt]) -> Option<usize> {
    let mut best: Option<(usize, u32)> = None;
    for (i, r) in rtts.iter().enumerate() {
        if !r.usable() {
            continue;
        }
        let avg = r.average().unwrap_or(UNREACHABLE_US);
        match best {
            Some((_, b)) if b <= avg => {}
            _ => best = Some((i, avg)),
        }
    }
    let (best, best_avg) = best?;
    let Some(cur) = current else {
        return Some(best);
    };
    match rtts.get(cur) {
        Some(r) if r.usable() => {
            let cur_avg = r.average().unwrap_or(UNREACHABLE_US);
            Some(if clearly_faster(best_avg, cur_avg) {
                best
            } else {
                cur
            })
        }
        _ => Some(best),
    }
}

/// Whether a channel to server `server` takes requests, `active` being the
/// chosen server (if any) and `active_can` whether some channel to it takes
/// requests now. The chosen server's channels carry the I/O; the others are
/// warm standbys that take over at once, with no help from userspace,
/// while none of the chosen server's can (all dead, or suspect because a
/// request timed out), so a failover never waits for the next probe round.
pub fn carries(server: u32, active: Option<u32>, active_can: bool) -> bool {
    match active {
        None => true,
        Some(a) => server == a || !active_can,
    }
}

/// The channels to suspect when requests timed out on the channels in the
/// mask `aged`, `server_of(c)` being channel `c`'s server (`None` for a
/// channel that is not up): every channel to a server that one of them
/// leads to. Channels to one server share its fate, and a request moved
/// from a stalled server's channel to a sibling not yet suspect would
/// wait a second `request_timeout` there before a standby server got it.
/// A sibling that is well answers its probe and is cleared at once.
pub fn suspects_of(aged: u64, server_of: impl Fn(usize) -> Option<u32>) -> u64 {
    // The common tick: nothing aged, no channel to look up.
    if aged == 0 {
        return 0;
    }
    let mut servers = 0u64;
    let mut out = aged;
    for c in (0..64).filter(|c| aged & (1 << c) != 0) {
        if let Some(s) = server_of(c).filter(|&s| s < 64) {
            servers |= 1 << s;
        }
    }
    for c in 0..64 {
        if server_of(c).is_some_and(|s| s < 64 && servers & (1 << s) != 0) {
            out |= 1 << c;
        }
    }
    out
}

/// How many of `channels` channels server `i` of `n` should have: an even
/// share, the first servers taking one more when it does not divide.
pub fn share(channels: u32, n: usize, i: usize) -> u32 {
    let n32 = n.max(1) as u32;
    channels / n32 + u32::from((i as u32) < channels % n32)
}

/// The server the next replacement channel should go to: of those with
/// fewer working channels (`have`) than their [`share`] and not known to be
/// down (`usable`), the one missing the most, the first of equals. `None`
/// when no usable server misses a channel.
pub fn refill(channels: u32, have: &[u8], usable: &[bool]) -> Option<usize> {
    let n = have.len();
    let mut best: Option<(usize, u32)> = None;
    for (i, &h) in have.iter().enumerate() {
        let missing = share(channels, n, i).saturating_sub(u32::from(h));
        if missing == 0 || !usable.get(i).copied().unwrap_or(true) {
            continue;
        }
        match best {
            Some((_, m)) if m >= missing => {}
            _ => best = Some((i, missing)),
        }
    }
    best.map(|(i, _)| i)
}

/// First and shortest interval between probe rounds, in milliseconds; also
/// the interval in panic mode.
pub const PROBE_MIN_MS: u32 = 2_000;
/// Longest interval between probe rounds while nothing changes.
pub const PROBE_MAX_MS: u32 = 60_000;

/// What a probe round found, for [`ProbeSchedule::after`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Round {
    /// Every server answered as before and the choice stayed.
    Stable,
    /// A server failed or came back, or the choice moved.
    Changed,
    /// No server is usable.
    Panic,
}

/// When the next probe round is due: the interval doubles after each stable
/// round up to [`PROBE_MAX_MS`], and falls back to [`PROBE_MIN_MS`] as soon
/// as anything changes or no server works.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProbeSchedule {
    interval_ms: u32,
}

impl Default for ProbeSchedule {
    fn default() -> Self {
        Self {
            interval_ms: PROBE_MIN_MS,
        }
    }
}

impl ProbeSchedule {
    /// The interval until the next round.
    pub fn interval_ms(&self) -> u32 {
        self.interval_ms
    }

    /// Records a round's outcome and returns the interval until the next.
    pub fn after(&mut self, round: Round) -> u32 {
        self.interval_ms = match round {
            Round::Stable => self.interval_ms.saturating_mul(2).min(PROBE_MAX_MS),
            Round::Changed | Round::Panic => PROBE_MIN_MS,
        };
        self.interval_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rtt(samples: &[u32]) -> Rtt {
        let mut r = Rtt::default();
        for &s in samples {
            r.record(s);
        }
        r
    }

    fn ms(n: u32) -> u32 {
        n * 1000
    }

    #[test]
    fn a_timeout_makes_every_channel_to_that_server_suspect() {
        // Channels 0..6 over servers 0, 1, 2, 0, 1, 2; channel 4 is down.
        let server_of = |c: usize| match c {
            4 => None,
            0..=5 => Some(c as u32 % 3),
            _ => None,
        };
        assert_eq!(suspects_of(0, server_of), 0);
        assert_eq!(suspects_of(1 << 0, server_of), 1 << 0 | 1 << 3);
        assert_eq!(suspects_of(1 << 3, server_of), 1 << 0 | 1 << 3);
        // A channel that is not up stays out, and so does its server's
        // other channel unless it aged itself.
        assert_eq!(suspects_of(1 << 4, server_of), 1 << 4);
        assert_eq!(suspects_of(1 << 1, server_of), 1 << 1);
        assert_eq!(
            suspects_of(1 << 2 | 1 << 1, server_of),
            1 << 1 | 1 << 2 | 1 << 5
        );
    }

    #[test]
    fn channels_are_shared_evenly_and_refilled_where_missing() {
        assert_eq!(
            (0..3).map(|i| share(4, 3, i)).collect::<Vec<_>>(),
            [2, 1, 1]
        );
        assert_eq!(share(3, 1, 0), 3);
        assert_eq!(refill(3, &[1, 1, 1], &[true; 3]), None);
        assert_eq!(refill(3, &[1, 0, 1], &[true; 3]), Some(1));
        assert_eq!(refill(4, &[0, 0, 1], &[true; 3]), Some(0), "misses 2");
        // A server known to be down is not tried; the others are full.
        assert_eq!(refill(3, &[1, 0, 1], &[true, false, true]), None);
        assert_eq!(refill(6, &[1, 0, 2], &[true, false, true]), Some(0));
        // A single server: every missing channel goes to it.
        assert_eq!(refill(2, &[1], &[]), Some(0));
    }

    #[test]
    fn standby_channels_carry_only_while_the_chosen_server_cannot() {
        assert!(carries(0, None, false));
        assert!(carries(2, None, true));
        assert!(carries(1, Some(1), true));
        assert!(carries(1, Some(1), false));
        assert!(!carries(0, Some(1), true));
        assert!(carries(0, Some(1), false));
    }

    #[test]
    fn the_average_covers_the_last_samples_only() {
        assert_eq!(Rtt::default().average(), None);
        assert!(!Rtt::default().usable());
        assert_eq!(rtt(&[100]).average(), Some(100));
        assert_eq!(rtt(&[100, 300]).average(), Some(200));
        // The fifth sample pushes out the first.
        assert_eq!(rtt(&[9000, 100, 100, 100, 100]).average(), Some(100));
        assert_eq!(rtt(&[u32::MAX; 8]).average(), Some(UNREACHABLE_US));
    }

    #[test]
    fn failed_probes_make_a_server_slow_then_unusable() {
        let mut r = rtt(&[ms(5); 4]);
        r.record_failure();
        assert!(r.usable(), "one lost probe is not a dead server");
        assert!(r.average().unwrap() > ms(10_000));
        for _ in 0..3 {
            r.record_failure();
        }
        assert!(!r.usable());
        r.record(ms(5));
        assert!(r.usable(), "a server that answers again is usable again");
    }

    #[test]
    fn the_fastest_server_is_chosen_first() {
        let rtts = [rtt(&[ms(20)]), rtt(&[ms(5)]), rtt(&[ms(40)])];
        assert_eq!(choose(None, &rtts), Some(1));
        // Unmeasured servers are not chosen.
        assert_eq!(choose(None, &[Rtt::default(), rtt(&[ms(40)])]), Some(1));
        assert_eq!(choose(None, &[]), None);
        assert_eq!(choose(None, &[Rtt::default()]), None);
    }

    #[test]
    fn equal_servers_do_not_flap() {
        let mut rtts = [rtt(&[ms(5)]), rtt(&[ms(5)])];
        assert_eq!(choose(Some(1), &rtts), Some(1));
        // 4.9 ms against 5 ms, or even 1.95 ms: not clearly faster.
        rtts[0] = rtt(&[4_900]);
        assert_eq!(choose(Some(1), &rtts), Some(1));
        rtts[0] = rtt(&[1_950]);
        assert_eq!(choose(Some(1), &rtts), Some(1));
        // 1.949 ms + 1.8 ms < 3.75 ms: clearly faster.
        rtts[0] = rtt(&[1_949]);
        assert_eq!(choose(Some(1), &rtts), Some(0));
    }

    #[test]
    fn a_dead_or_unknown_current_server_is_left_at_once() {
        let dead = rtt(&[UNREACHABLE_US; SAMPLES]);
        assert_eq!(choose(Some(0), &[dead, rtt(&[ms(40)])]), Some(1));
        assert_eq!(choose(Some(7), &[rtt(&[ms(40)])]), Some(0));
        assert_eq!(choose(Some(0), &[dead, dead]), None, "panic mode");
    }

    #[test]
    fn a_slowed_server_is_left_within_two_probe_rounds() {
        // The scenario: 5, 20 and 40 ms; then 60 ms more on the first.
        let mut rtts = [rtt(&[ms(5); 4]), rtt(&[ms(20); 4]), rtt(&[ms(40); 4])];
        let mut cur = choose(None, &rtts);
        assert_eq!(cur, Some(0));
        let slow = [ms(65), ms(20), ms(40)];
        let mut moved_at = None;
        for round in 1..=6 {
            for (r, s) in rtts.iter_mut().zip(slow) {
                r.record(s);
            }
            let next = choose(cur, &rtts);
            if next != cur && moved_at.is_none() {
                moved_at = Some(round);
            }
            cur = next;
        }
        assert_eq!(moved_at, Some(2));
        assert_eq!(cur, Some(1), "and it stays on the 20 ms server");
    }

    #[test]
    fn probes_back_off_while_stable_and_hurry_otherwise() {
        let mut s = ProbeSchedule::default();
        assert_eq!(s.interval_ms(), PROBE_MIN_MS);
        let stable: [u32; 7] = core::array::from_fn(|_| s.after(Round::Stable));
        assert_eq!(
            stable,
            [4_000, 8_000, 16_000, 32_000, 60_000, 60_000, 60_000]
        );
        assert_eq!(s.after(Round::Changed), PROBE_MIN_MS);
        s.after(Round::Stable);
        assert_eq!(s.after(Round::Panic), PROBE_MIN_MS);
        assert_eq!(s.after(Round::Panic), PROBE_MIN_MS);
    }

    proptest::proptest! {
        /// Whatever the RTTs: the choice is a usable server or none when
        /// none is; a move goes to the fastest; staying never keeps a server
        /// that another clearly beats.
        #[test]
        fn choose_is_sound(
            avgs in proptest::collection::vec(proptest::option::of(0u32..=UNREACHABLE_US), 0..6),
            cur in proptest::option::of(0usize..8),
        ) {
            let rtts: Vec<Rtt> = avgs
                .iter()
                .map(|a| a.map_or(Rtt::default(), |a| rtt(&[a])))
                .collect();
            let best = rtts.iter().filter(|r| r.usable()).filter_map(Rtt::average).min();
            match choose(cur, &rtts) {
                None => proptest::prop_assert!(best.is_none()),
                Some(c) => {
                    proptest::prop_assert!(rtts[c].usable());
                    let avg = rtts[c].average().unwrap();
                    let best = best.unwrap();
                    if Some(c) != cur {
                        proptest::prop_assert_eq!(avg, best);
                    } else {
                        proptest::prop_assert!(!clearly_faster(best, avg));
                    }
                }
            }
        }

        /// Deciding again on the same RTTs never moves: no flapping.
        #[test]
        fn choose_is_stable(
            avgs in proptest::collection::vec(0u32..=UNREACHABLE_US, 1..6),
            cur in proptest::option::of(0usize..6),
        ) {
            let rtts: Vec<Rtt> = avgs.iter().map(|&a| rtt(&[a])).collect();
            let first = choose(cur, &rtts);
            proptest::prop_assert_eq!(choose(first, &rtts), first);
        }
    }
}
