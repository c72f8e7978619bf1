//! Limits on connections: how many are served at once, overall and per
//! client address, and how fast a failing `accept()` is retried.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::io;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Why a new connection was turned away.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("{0} connections already")]
    Full(usize),
    #[error("{ip} already has {max} connections")]
    PerClient { ip: IpAddr, max: usize },
}

/// Connections being served, overall and per client address.
#[derive(Debug)]
pub struct Limits {
    max: usize,
    per_client: usize,
    active: AtomicUsize,
    clients: Mutex<HashMap<IpAddr, usize>>,
}

/// One admitted connection's place; dropping it, on whatever path the
/// connection ends, gives the place back.
#[derive(Debug)]
pub struct Slot {
    limits: Arc<Limits>,
    ip: Option<IpAddr>,
}

impl Limits {
    pub fn new(max: usize, per_client: usize) -> Self {
        Self {
            max,
            per_client,
            active: AtomicUsize::new(0),
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// Connections being served.
    #[cfg(test)]
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Connections being served from `ip`.
    #[cfg(test)]
    pub fn connections_from(&self, ip: IpAddr) -> usize {
        self.lock().get(&ip.to_canonical()).copied().unwrap_or(0)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for a new connection from `ip`; `None` (a unix socket) is
    /// not counted per address. An IPv4 client reaching a dual-stack socket
    /// (`::ffff:a.b.c.d`) counts as `a.b.c.d`, so it has one share however
    /// it connects.
    pub fn admit(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<Slot, Refused> {
        let ip = ip.map(|ip| ip.to_canonical());
        if self.active.fetch_add(1, Ordering::SeqCst) >= self.max {
            self.active.fetch_sub(1, Ordering::SeqCst);
            return Err(Refused::Full(self.max));
        }
        // From here on, dropping the slot gives back what it holds.
        let mut slot = Slot {
            limits: self.clone(),
            ip: None,
        };
        if let Some(ip) = ip {
            self.take_client(ip)?;
            slot.ip = Some(ip);
        }
        Ok(slot)
    }

    fn take_client(&self, ip: IpAddr) -> Result<(), Refused> {
        let mut clients = self.lock();
        let n = clients.get(&ip).copied().unwrap_or(0);
        if n >= self.per_client {
            return Err(Refused::PerClient {
                ip,
                max: self.per_client,
            });
        }
        clients.insert(ip, n + 1);
        Ok(())
    }

    fn release_client(&self, ip: IpAddr) {
        // Addresses at zero are removed, so the map is no larger than the
        // number of connections.
        if let Entry::Occupied(mut e) = self.lock().entry(ip) {
            if *e.get() <= 1 {
                e.remove();
            } else {
                *e.get_mut() -= 1;
            }
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(ip) = self.ip {
            self.limits.release_client(ip);
        }
        self.limits.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Whether a failed `accept()` concerns only the connection being accepted
/// (it was reset, or a network error was pending on it): the next one can
/// be accepted at once. See accept(2), "Error handling".
pub fn is_transient(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::EINTR
                | libc::EPERM
                | libc::EPROTO
                | libc::ENETDOWN
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
        )
    )
}

/// Paces the accept loop after errors such as `EMFILE`, `ENFILE`,
/// `ENOBUFS` or `ENOMEM`, which would otherwise repeat at once and spin:
/// sleeps from 10 ms doubling to 1 s, reported at most once a second.
#[derive(Debug)]
pub struct AcceptBackoff {
    delay: Duration,
    last_report: Option<Instant>,
    unreported: u64,
}

/// What to do after a failed `accept()`.
#[derive(Debug, PartialEq, Eq)]
pub struct Pause {
    pub sleep: Duration,
    /// Report this failure, counting the silent ones since the last report.
    pub report: Option<u64>,
}

impl AcceptBackoff {
    const FIRST: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);
    const REPORT_EVERY: Duration = Duration::from_secs(1);

    pub fn failed(&mut self, now: Instant) -> Pause {
        let sleep = self.delay;
        self.delay = (self.delay * 2).min(Self::MAX);
        self.unreported += 1;
        let due = match self.last_report {
            Some(t) => now.duration_since(t) >= Self::REPORT_EVERY,
            None => true,
        };
        let report = due.then(|| {
            self.last_report = Some(now);
            std::mem::take(&mut self.unreported)
        });
        Pause { sleep, report }
    }

    pub fn succeeded(&mut self) {
        self.delay = Self::FIRST;
    }
}

impl Default for AcceptBackoff {
    fn default() -> Self {
        Self {
            delay: Self::FIRST,
            last_report: None,
            unreported: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn one_address_gets_at_most_its_share() {
        let l = Arc::new(Limits::new(10, 2));
        let a = [
            l.admit(ip("10.0.0.1")).unwrap(),
            l.admit(ip("10.0.0.1")).unwrap(),
        ];
        let ten = "10.0.0.1".parse().unwrap();
        assert_eq!(
            l.admit(Some(ten)).unwrap_err(),
            Refused::PerClient { ip: ten, max: 2 }
        );
        // The refusal took no place; other addresses and unix sockets go on.
        assert_eq!(l.active(), 2);
        let _b = l.admit(ip("10.0.0.2")).unwrap();
        let _u = [
            l.admit(None).unwrap(),
            l.admit(None).unwrap(),
            l.admit(None).unwrap(),
        ];
        assert_eq!(l.active(), 6);
        drop(a);
        assert_eq!((l.connections_from(ten), l.active()), (0, 4));
        assert!(!l.lock().contains_key(&ten), "no entry left at zero");
        let _a = l.admit(Some(ten)).unwrap();
    }

    #[test]
    fn a_v4_mapped_address_counts_as_its_ipv4_address() {
        let l = Arc::new(Limits::new(10, 2));
        let _a = l.admit(ip("::ffff:10.0.0.1")).unwrap();
        let _b = l.admit(ip("10.0.0.1")).unwrap();
        let v4 = "10.0.0.1".parse().unwrap();
        assert_eq!(
            l.admit(ip("::ffff:10.0.0.1")).unwrap_err(),
            Refused::PerClient { ip: v4, max: 2 }
        );
        assert_eq!(l.lock().get(&v4), Some(&2));
        // A true IPv6 address is its own client.
        let _c = l.admit(ip("::1")).unwrap();
        assert_eq!(l.active(), 3);
    }

    #[test]
    fn the_overall_limit_comes_first_and_refusals_hold_nothing() {
        let l = Arc::new(Limits::new(2, 2));
        let _a = l.admit(ip("::1")).unwrap();
        let b = l.admit(None).unwrap();
        assert_eq!(l.admit(ip("::1")).unwrap_err(), Refused::Full(2));
        assert_eq!(l.admit(None).unwrap_err(), Refused::Full(2));
        assert_eq!(
            (l.active(), l.connections_from("::1".parse().unwrap())),
            (2, 1)
        );
        drop(b);
        let _c = l.admit(ip("::1")).unwrap();
        assert_eq!(l.active(), 2);
    }

    #[test]
    fn accept_backoff_doubles_to_a_second_and_resets_on_success() {
        let mut b = AcceptBackoff::default();
        let now = Instant::now();
        let sleeps: Vec<u64> = (0..9)
            .map(|_| b.failed(now).sleep.as_millis() as u64)
            .collect();
        assert_eq!(sleeps, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        b.succeeded();
        assert_eq!(b.failed(now).sleep, Duration::from_millis(10));
    }

    #[test]
    fn accept_errors_are_reported_at_most_once_a_second() {
        let mut b = AcceptBackoff::default();
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        assert_eq!(b.failed(at(0)).report, Some(1));
        assert_eq!(b.failed(at(10)).report, None);
        assert_eq!(b.failed(at(999)).report, None);
        // The next report counts the silent ones too.
        assert_eq!(b.failed(at(1000)).report, Some(3));
        b.succeeded();
        assert_eq!(b.failed(at(1500)).report, None, "success does not reset it");
        assert_eq!(b.failed(at(2000)).report, Some(2));
    }

    #[test]
    fn only_resource_errors_are_paced() {
        for e in [libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            assert!(!is_transient(&io::Error::from_raw_os_error(e)), "{e}");
        }
        for e in [libc::ECONNABORTED, libc::EINTR, libc::EPROTO] {
            assert!(is_transient(&io::Error::from_raw_os_error(e)), "{e}");
        }
    }
}
