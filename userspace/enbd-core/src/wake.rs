// SPDX-License-Identifier: GPL-2.0
//! Which sender threads a queued request wakes.
//!
//! The channels' sender threads sleep on one wait queue. A sender that is
//! *free* (done sending, not yet asleep) looks at the queue before it
//! sleeps, so queueing a request needs to wake a sleeper only when the
//! queue holds more requests than there are free senders, and then one.
//!
//! That holds only if every sender takes requests. Some refuse them for a
//! while: a suspect channel, a standby server's channel, a warm reserve,
//! a channel carrying a solo request. A free sender that refuses, or the
//! one sleeper a wake-up reached, would leave the request with nobody
//! coming for it until the next keep-alive. So a wake-up that was skipped
//! or given to one sender is *owed*: a sender that refuses while requests
//! wait pays it by waking all the others. Each queued request causes at
//! most one such extra round, so refusers cannot wake each other forever.
//!
//! Kernel-independent (`no_std`, no allocation); the caller holds the lock
//! that orders queueing and the senders' looks at the queue.

/// Whom to wake for a queued request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    None,
    One,
    All,
}

/// The wake-up owed to requests no sender may be coming for.
#[derive(Clone, Copy, Debug, Default)]
pub struct Wakeups {
    owed: bool,
}

impl Wakeups {
    /// A request was queued: `queued` requests wait, `free` senders will
    /// look at the queue before they sleep, and `refusers` says whether a
    /// live sender is known to refuse requests now (with one, a single
    /// wake-up could reach it, so all are woken).
    pub fn queued(&mut self, queued: u32, free: u32, refusers: bool) -> Wake {
        if queued <= free {
            self.owed = true;
            Wake::None
        } else if refusers {
            self.owed = false;
            Wake::All
        } else {
            self.owed = true;
            Wake::One
        }
    }

    /// A sender will not take any of the `queued` waiting requests and is
    /// about to sleep: whether it must wake all the others first.
    pub fn refused(&mut self, queued: u32) -> bool {
        let pay = self.owed && queued > 0;
        if pay {
            self.owed = false;
        }
        pay
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    enum S {
        /// On the wait queue.
        Asleep,
        /// Woken, waiting for the lock; not counted free (it counts itself
        /// once it holds the lock, and looks at once).
        Woken,
        /// Counted free, looks at the queue when it gets the lock.
        Free,
        /// Sending (a request, a probe); free when done.
        Busy,
    }

    #[derive(Clone, Debug, PartialEq, Eq, Hash)]
    struct State {
        senders: Vec<S>,
        queued: u32,
        to_queue: u32,
        owed: bool,
    }

    /// The rule before `Wakeups`: wake one if the queue outgrew the free
    /// senders, all if a refuser is known; nothing owed.
    fn old_queued(queued: u32, free: u32, refusers: bool) -> Wake {
        match (queued > free, refusers) {
            (false, _) => Wake::None,
            (true, true) => Wake::All,
            (true, false) => Wake::One,
        }
    }

    /// Explores every interleaving of `to_queue` requests with senders
    /// that take requests (`takes[i]`) or refuse them, from every mix of
    /// starting states, and returns a state where all senders sleep while
    /// a request waits and one of them would take it.
    fn stranded(takes: &[bool], known: bool, to_queue: u32, old: bool) -> Option<State> {
        let n = takes.len();
        let refusers = known && takes.iter().any(|t| !t);
        let mut todo = Vec::new();
        for mut code in 0..3usize.pow(n as u32) {
            let senders = (0..n)
                .map(|_| {
                    let s = [S::Asleep, S::Free, S::Busy][code % 3];
                    code /= 3;
                    s
                })
                .collect();
            todo.push(State {
                senders,
                queued: 0,
                to_queue,
                owed: false,
            });
        }
        let mut seen = HashSet::new();
        while let Some(st) = todo.pop() {
            if !seen.insert(st.clone()) {
                continue;
            }
            if st.senders.iter().all(|s| *s == S::Asleep)
                && st.queued > 0
                && takes.iter().any(|t| *t)
            {
                return Some(st);
            }
            let wake_all = |st: &mut State| {
                for s in st.senders.iter_mut().filter(|s| **s == S::Asleep) {
                    *s = S::Woken;
                }
            };
            if st.to_queue > 0 {
                let mut next = st.clone();
                next.to_queue -= 1;
                next.queued += 1;
                let free = next.senders.iter().filter(|s| **s == S::Free).count() as u32;
                let mut w = Wakeups { owed: next.owed };
                let wake = if old {
                    old_queued(next.queued, free, refusers)
                } else {
                    w.queued(next.queued, free, refusers)
                };
                next.owed = w.owed;
                match wake {
                    Wake::None => todo.push(next),
                    Wake::All => {
                        wake_all(&mut next);
                        todo.push(next);
                    }
                    Wake::One => {
                        let asleep: Vec<_> =
                            (0..n).filter(|&i| next.senders[i] == S::Asleep).collect();
                        // A wait queue picks one; any of them.
                        for &i in &asleep {
                            let mut one = next.clone();
                            one.senders[i] = S::Woken;
                            todo.push(one);
                        }
                        if asleep.is_empty() {
                            todo.push(next);
                        }
                    }
                }
            }
            for (i, &takes_i) in takes.iter().enumerate() {
                let mut next = st.clone();
                match st.senders[i] {
                    S::Asleep => continue,
                    S::Busy => next.senders[i] = S::Free,
                    S::Free | S::Woken => {
                        if takes_i && next.queued > 0 {
                            next.queued -= 1;
                            next.senders[i] = S::Busy;
                        } else {
                            let mut w = Wakeups { owed: next.owed };
                            let pay = !old && next.queued > 0 && w.refused(next.queued);
                            next.owed = w.owed;
                            next.senders[i] = S::Asleep;
                            if pay {
                                wake_all(&mut next);
                            }
                        }
                    }
                }
                todo.push(next);
            }
        }
        None
    }

    /// Every mix of takers and refusers among `n` senders with a taker.
    fn mixes(n: usize) -> impl Iterator<Item = Vec<bool>> {
        (1..1u32 << n).map(move |m| (0..n).map(|i| m & (1 << i) != 0).collect())
    }

    #[test]
    fn no_request_waits_while_a_taker_sleeps() {
        for n in 1..=3 {
            for takes in mixes(n) {
                for known in [false, true] {
                    let s = stranded(&takes, known, 3, false);
                    assert!(s.is_none(), "{takes:?} known={known}: {s:?}");
                }
            }
        }
    }

    #[test]
    fn the_old_rule_strands_requests() {
        // A taker and a refuser: the refuser is free when the request is
        // queued, so nobody is woken.
        let s = stranded(&[true, false], true, 1, true).expect("a free refuser");
        assert_eq!(s.queued, 1);
        // One wake-up given to a refuser queue_rq did not know of (a
        // channel carrying a solo request).
        assert!(stranded(&[true, false], false, 1, true).is_some());
        // Takers only: the old rule was right.
        assert!(stranded(&[true, true], false, 3, true).is_none());
    }

    #[test]
    fn a_refuser_pays_a_wake_up_once() {
        let mut w = Wakeups::default();
        assert_eq!(w.queued(1, 1, false), Wake::None);
        assert!(!w.refused(0), "nothing waits");
        assert!(w.refused(1));
        assert!(!w.refused(1), "paid");
        assert_eq!(w.queued(2, 0, true), Wake::All);
        assert!(!w.refused(2), "all were woken already");
        assert_eq!(w.queued(3, 0, false), Wake::One);
        assert!(w.refused(3));
    }
}
