//! Limits on connections: how many are served at once, overall and per
//! client address, how many may be in the handshake, and how fast a failing
//! `accept()` is retried.
//!
//! Connections still in the handshake have a cap of their own, apart from
//! `--max-connections`: when a new connection arrives and the cap is
//! reached, the oldest handshaking connection is evicted (its socket shut
//! down). A good client finishes its handshake in milliseconds, so idle
//! connections, however many and from however many addresses, cannot keep
//! it out; they cannot take the slots of served connections either.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, OwnedFd};
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
    #[error("evicted during the handshake by newer connections")]
    Evicted,
}

/// Connections admitted, overall, per client address and in the handshake.
#[derive(Debug)]
pub struct Limits {
    /// Most connections served (past the handshake).
    max: usize,
    per_client: usize,
    max_handshakes: usize,
    /// Connections admitted, in the handshake or served.
    active: AtomicUsize,
    /// Connections past the handshake.
    serving: AtomicUsize,
    clients: Mutex<HashMap<IpAddr, usize>>,
    handshakes: Mutex<Handshakes>,
}

/// Connections in the handshake, oldest first, each with a descriptor of
/// its socket to shut it down by. A duplicate, so a connection that ends
/// meanwhile cannot have its number reused by another socket.
#[derive(Debug, Default)]
struct Handshakes {
    queue: VecDeque<(u64, OwnedFd)>,
    next_id: u64,
    /// Evictions not yet reported, and when the last report was.
    unreported: u64,
    last_report: Option<Instant>,
}

/// One admitted connection's place; dropping it, on whatever path the
/// connection ends, gives the place back.
#[derive(Debug)]
pub struct Slot {
    limits: Arc<Limits>,
    ip: Option<IpAddr>,
    /// Its entry among the handshaking connections, until it is served.
    handshake: Option<u64>,
    serving: bool,
}

impl Limits {
    pub fn new(max: usize, per_client: usize, max_handshakes: usize) -> Self {
        Self {
            max,
            per_client,
            max_handshakes: max_handshakes.max(1),
            active: AtomicUsize::new(0),
            serving: AtomicUsize::new(0),
            clients: Mutex::new(HashMap::new()),
            handshakes: Mutex::new(Handshakes::default()),
        }
    }

    /// Connections admitted, in the handshake or served.
    #[cfg(test)]
    pub fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Connections in the handshake.
    #[cfg(test)]
    pub fn handshaking(&self) -> usize {
        self.lock_handshakes().queue.len()
    }

    fn lock_handshakes(&self) -> MutexGuard<'_, Handshakes> {
        self.handshakes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connections being served from `ip`.
    #[cfg(test)]
    pub fn connections_from(&self, ip: IpAddr) -> usize {
        self.lock().get(&ip.to_canonical()).copied().unwrap_or(0)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<IpAddr, usize>> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place in the handshake for a new connection from `ip` (`None`, a
    /// unix socket, is not counted per address), whose socket `sock`
    /// duplicates. When the handshake cap is reached the oldest handshaking
    /// connection is evicted; whether one was is returned too. An IPv4
    /// client reaching a dual-stack socket (`::ffff:a.b.c.d`) counts as
    /// `a.b.c.d`, so it has one share however it connects.
    pub fn admit(
        self: &Arc<Self>,
        ip: Option<IpAddr>,
        sock: OwnedFd,
    ) -> Result<(Slot, bool), Refused> {
        let ip = ip.map(|ip| ip.to_canonical());
        // Served connections at the limit: the handshake would be in vain.
        if self.serving.load(Ordering::SeqCst) >= self.max {
            return Err(Refused::Full(self.max));
        }
        self.active.fetch_add(1, Ordering::SeqCst);
        // From here on, dropping the slot gives back what it holds.
        let mut slot = Slot {
            limits: self.clone(),
            ip: None,
            handshake: None,
            serving: false,
        };
        if let Some(ip) = ip {
            self.take_client(ip)?;
            slot.ip = Some(ip);
        }
        let mut hs = self.lock_handshakes();
        let mut evicted = false;
        while hs.queue.len() >= self.max_handshakes {
            let Some((_, oldest)) = hs.queue.pop_front() else {
                break;
            };
            // SAFETY: `oldest` is an open descriptor we own; shutting its
            // socket down makes the handshake's next read or write fail.
            unsafe { libc::shutdown(oldest.as_raw_fd(), libc::SHUT_RDWR) };
            evicted = true;
            hs.unreported += 1;
        }
        let id = hs.next_id;
        hs.next_id += 1;
        hs.queue.push_back((id, sock));
        slot.handshake = Some(id);
        Ok((slot, evicted))
    }

    /// Evictions to report now, at most once a second: how many since the
    /// last report.
    pub fn evictions_to_report(&self, now: Instant) -> Option<u64> {
        let mut hs = self.lock_handshakes();
        let due = match hs.last_report {
            _ if hs.unreported == 0 => false,
            Some(t) => now.duration_since(t) >= Duration::from_secs(1),
            None => true,
        };
        due.then(|| {
            hs.last_report = Some(now);
            std::mem::take(&mut hs.unreported)
        })
    }

    /// Removes a handshake's entry; whether it was still there (not evicted).
    fn end_handshake(&self, id: u64) -> bool {
        let mut hs = self.lock_handshakes();
        let before = hs.queue.len();
        hs.queue.retain(|(i, _)| *i != id);
        hs.queue.len() != before
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

impl Slot {
    /// Whether it was evicted during its handshake.
    pub fn evicted(&self) -> bool {
        self.handshake.is_some_and(|id| {
            !self
                .limits
                .lock_handshakes()
                .queue
                .iter()
                .any(|(i, _)| *i == id)
        })
    }

    /// The handshake is done: the connection is to be served, if it was not
    /// evicted meanwhile and a served connection's place is free.
    pub fn established(&mut self) -> Result<(), Refused> {
        let l = &self.limits;
        if let Some(id) = self.handshake.take() {
            if !l.end_handshake(id) {
                return Err(Refused::Evicted);
            }
        }
        if self.serving {
            return Ok(());
        }
        if l.serving.fetch_add(1, Ordering::SeqCst) >= l.max {
            l.serving.fetch_sub(1, Ordering::SeqCst);
            return Err(Refused::Full(l.max));
        }
        self.serving = true;
        Ok(())
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(id) = self.handshake {
            self.limits.end_handshake(id);
        }
        if self.serving {
            self.limits.serving.fetch_sub(1, Ordering::SeqCst);
        }
        if let Some(ip) = self.ip {
            self.limits.release_client(ip);
        }
        self.limits.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Raises the soft limit on open descriptors to the hard one, so that many
/// connections (two descriptors each while handshaking) do not run into
/// the usual 1024. Returns the limits before and after.
pub fn raise_fd_limit() -> io::Result<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `r` is a valid rlimit for getrlimit to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let before = r.rlim_cur;
    if r.rlim_cur < r.rlim_max {
        r.rlim_cur = r.rlim_max;
        // SAFETY: `r` is a valid rlimit; raising the soft limit to the
        // hard one needs no privilege.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok((before, r.rlim_cur))
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
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    use super::*;

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    /// A duplicate of a connection's socket for the limits, its peer, and
    /// the socket itself (which the connection keeps open).
    fn sock() -> (OwnedFd, UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(crate::testutil::PATIENCE)).unwrap();
        (a.try_clone().unwrap().into(), b, a)
    }

    trait AdmitNew {
        fn admit_new(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<Slot, Refused>;
    }

    impl AdmitNew for Limits {
        /// Admits a connection and completes its handshake at once.
        fn admit_new(self: &Arc<Self>, ip: Option<IpAddr>) -> Result<Slot, Refused> {
            let (mut slot, _) = self.admit(ip, sock().0)?;
            slot.established()?;
            Ok(slot)
        }
    }

    #[test]
    fn one_address_gets_at_most_its_share() {
        let l = Arc::new(Limits::new(10, 2, 4));
        let a = [
            l.admit_new(ip("10.0.0.1")).unwrap(),
            l.admit_new(ip("10.0.0.1")).unwrap(),
        ];
        let ten = "10.0.0.1".parse().unwrap();
        assert_eq!(
            l.admit_new(Some(ten)).unwrap_err(),
            Refused::PerClient { ip: ten, max: 2 }
        );
        // The refusal took no place; other addresses and unix sockets go on.
        assert_eq!(l.active(), 2);
        let _b = l.admit_new(ip("10.0.0.2")).unwrap();
        let _u = [
            l.admit_new(None).unwrap(),
            l.admit_new(None).unwrap(),
            l.admit_new(None).unwrap(),
        ];
        assert_eq!(l.active(), 6);
        drop(a);
        assert_eq!((l.connections_from(ten), l.active()), (0, 4));
        assert!(!l.lock().contains_key(&ten), "no entry left at zero");
        let _a = l.admit_new(Some(ten)).unwrap();
    }

    #[test]
    fn a_v4_mapped_address_counts_as_its_ipv4_address() {
        let l = Arc::new(Limits::new(10, 2, 10));
        let _a = l.admit_new(ip("::ffff:10.0.0.1")).unwrap();
        let _b = l.admit_new(ip("10.0.0.1")).unwrap();
        let v4 = "10.0.0.1".parse().unwrap();
        assert_eq!(
            l.admit_new(ip("::ffff:10.0.0.1")).unwrap_err(),
            Refused::PerClient { ip: v4, max: 2 }
        );
        assert_eq!(l.lock().get(&v4), Some(&2));
        // A true IPv6 address is its own client.
        let _c = l.admit_new(ip("::1")).unwrap();
        assert_eq!(l.active(), 3);
    }

    #[test]
    fn the_overall_limit_comes_first_and_refusals_hold_nothing() {
        let l = Arc::new(Limits::new(2, 2, 4));
        let _a = l.admit_new(ip("::1")).unwrap();
        let b = l.admit_new(None).unwrap();
        assert_eq!(l.admit_new(ip("::1")).unwrap_err(), Refused::Full(2));
        assert_eq!(l.admit_new(None).unwrap_err(), Refused::Full(2));
        assert_eq!(
            (l.active(), l.connections_from("::1".parse().unwrap())),
            (2, 1)
        );
        drop(b);
        let _c = l.admit_new(ip("::1")).unwrap();
        assert_eq!(l.active(), 2);
    }

    #[test]
    fn the_oldest_handshake_is_evicted_by_a_new_connection() {
        let l = Arc::new(Limits::new(10, 100, 2));
        let (fa, mut pa, _ka) = sock();
        let (fb, mut pb, _kb) = sock();
        let (mut a, ev) = l.admit(ip("10.0.0.1"), fa).unwrap();
        assert!(!ev);
        let (mut b, ev) = l.admit(ip("10.0.0.2"), fb).unwrap();
        assert!(!ev);
        assert_eq!(l.evictions_to_report(Instant::now()), None);
        // A third: the oldest (a) goes, its socket shut down.
        let (fc, _pc, _kc) = sock();
        let (mut c, ev) = l.admit(ip("10.0.0.3"), fc).unwrap();
        assert!(ev);
        assert_eq!(pa.read(&mut [0u8; 1]).unwrap(), 0, "a is not shut down");
        assert_eq!((l.handshaking(), l.active()), (2, 3));
        // Its handshake cannot complete now; the others' can.
        assert!(a.evicted() && !b.evicted());
        assert_eq!(a.established().unwrap_err(), Refused::Evicted);
        b.established().unwrap();
        assert_eq!(l.handshaking(), 1);
        // A served connection no longer counts against the handshake cap,
        // nor can it be evicted.
        let (fd, _pd, _kd) = sock();
        let (_d, ev) = l.admit(None, fd).unwrap();
        assert!(!ev, "evicted with room left");
        let (fe, _pe, _ke) = sock();
        let (_e, ev) = l.admit(None, fe).unwrap();
        assert!(ev);
        assert_eq!(c.established().unwrap_err(), Refused::Evicted);
        pb.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let e = pb.read(&mut [0u8; 1]).unwrap_err();
        assert_eq!(
            e.kind(),
            io::ErrorKind::WouldBlock,
            "a served connection was shut down"
        );
        let now = Instant::now();
        assert_eq!(l.evictions_to_report(now), Some(2));
        assert_eq!(l.evictions_to_report(now), None);
        drop((a, b, c));
        assert_eq!((l.active(), l.handshaking()), (2, 2));
    }

    #[test]
    fn handshakes_do_not_take_the_places_of_served_connections() {
        let l = Arc::new(Limits::new(1, 100, 2));
        let (fa, _pa, _ka) = sock();
        let (mut a, _) = l.admit(None, fa).unwrap();
        // Handshakes may be up to their own cap whatever is served.
        let (fb, _pb, _kb) = sock();
        let (mut b, _) = l.admit(None, fb).unwrap();
        a.established().unwrap();
        // Served connections at the limit: new ones are refused at once,
        // and a handshake that ends meanwhile is refused at its end.
        let (fc, _pc, _kc) = sock();
        assert_eq!(l.admit(None, fc).unwrap_err(), Refused::Full(1));
        assert_eq!(b.established().unwrap_err(), Refused::Full(1));
        drop(a);
        b.established().unwrap();
        drop(b);
        assert_eq!((l.active(), l.handshaking()), (0, 0));
    }

    #[test]
    fn the_fd_limit_is_raised_to_the_hard_limit() {
        let (_, after) = raise_fd_limit().unwrap();
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `r` is a valid rlimit for getrlimit to fill.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) }, 0);
        assert_eq!((r.rlim_cur, after), (r.rlim_max, r.rlim_max));
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
