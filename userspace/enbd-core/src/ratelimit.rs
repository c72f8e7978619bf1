// SPDX-License-Identifier: GPL-2.0
//! A log rate limit (the kernel's `printk_ratelimited`, per caller): at most
//! `burst` messages per `interval`, and a count of what it held back, so a
//! reconnect storm cannot flood a serial console.
//!
//! Kernel-independent (`no_std`, no allocation); times in the caller's unit.

/// One rate-limited message stream.
#[derive(Clone, Copy, Debug, Default)]
pub struct RateLimit {
    start: u64,
    used: u32,
    suppressed: u32,
}

impl RateLimit {
    /// Whether a message may be logged at `now`. `Some(n)`: log it, and
    /// say that `n` messages were suppressed before it; `None`: drop it.
    pub fn allow(&mut self, now: u64, interval: u64, burst: u32) -> Option<u32> {
        if self.used == 0 || now.saturating_sub(self.start) >= interval {
            self.start = now;
            self.used = 0;
        }
        if self.used < burst {
            self.used += 1;
            Some(core::mem::take(&mut self.suppressed))
        } else {
            self.suppressed = self.suppressed.saturating_add(1);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bursts_then_suppresses_then_reports_the_count() {
        let mut r = RateLimit::default();
        for t in 0..5 {
            assert_eq!(r.allow(100 + t, 1000, 5), Some(0));
        }
        for t in 5..50 {
            assert_eq!(r.allow(100 + t, 1000, 5), None);
        }
        assert_eq!(r.allow(1100, 1000, 5), Some(45));
        assert_eq!(r.allow(1101, 1000, 5), Some(0));
    }

    proptest::proptest! {
        /// Never more than `burst` messages in any window that starts at a
        /// logged message, and every message is either logged or counted.
        #[test]
        fn bounded_and_nothing_unaccounted(gaps in proptest::collection::vec(0u64..300, 1..400), burst in 1u32..8) {
            let mut r = RateLimit::default();
            let (mut now, mut logged, mut reported) = (0u64, Vec::new(), 0u64);
            for g in &gaps {
                now += g;
                if let Some(n) = r.allow(now, 1000, burst) {
                    logged.push(now);
                    reported += u64::from(n);
                }
            }
            for (i, &t) in logged.iter().enumerate() {
                let in_window = logged[i..].iter().take_while(|&&u| u < t + 1000).count();
                proptest::prop_assert!(in_window <= 2 * burst as usize);
            }
            let pending = u64::from(r.suppressed);
            proptest::prop_assert_eq!(logged.len() as u64 + reported + pending, gaps.len() as u64);
        }
    }
}
