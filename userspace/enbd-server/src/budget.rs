//! Memory for request data: budgets of bytes in flight, per connection and
//! per server, and a pool of buffers reused between requests.
//!
//! A connection's reader takes a [`Buffer`] for each WRITE's payload before
//! it reads it, and for each READ's data before it queues it. The buffer
//! holds its bytes against both budgets until it is dropped: when the reply
//! has been sent, or when fencing drops the request. When a budget is spent
//! the reader waits, and so stops reading the socket: a client that sends
//! faster than the server answers is slowed down (TCP backpressure) instead
//! of making the server allocate.
//!
//! Dropped buffers go back to a server-wide pool, still counted in the
//! server budget, so the memory the server holds never exceeds it. The pool
//! gives its buffers up as soon as anyone waits for the budget, and when
//! the last connection ends.

use std::collections::VecDeque;
use std::ops::{Deref, DerefMut};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// How often a waiter asks whether to give up (its connection may die
/// while nothing is released).
const CHECK: Duration = Duration::from_millis(100);

/// Buffers the pool keeps at most, whatever their size.
const POOL_BUFFERS: usize = 64;

/// Bytes that may be reserved at once; whoever asks for more waits, in
/// turn (first come, first served, so a large request is not starved by a
/// stream of small ones).
#[derive(Debug)]
pub struct Budget {
    limit: u64,
    state: Mutex<State>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct State {
    used: u64,
    /// Tickets of the waiters, oldest first.
    waiting: VecDeque<u64>,
    next_ticket: u64,
}

impl Budget {
    pub fn new(limit: u64) -> Self {
        Self {
            limit,
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes reserved now.
    #[cfg(test)]
    pub fn used(&self) -> u64 {
        self.lock().used
    }

    fn has_waiters(&self) -> bool {
        !self.lock().waiting.is_empty()
    }

    /// Reserves `n` bytes, waiting until they are free and every earlier
    /// waiter is served. While it waits it calls `stalled`, right away and
    /// then at each release or every `CHECK`: it may free memory (the
    /// pool does), and its `true` gives up. Returns whether `n` bytes were
    /// reserved; more than the limit never are.
    pub fn reserve(&self, n: u64, stalled: &mut dyn FnMut() -> bool) -> bool {
        if n > self.limit {
            return false;
        }
        let mut st = self.lock();
        if st.waiting.is_empty() && st.used + n <= self.limit {
            st.used += n;
            return true;
        }
        let ticket = st.next_ticket;
        st.next_ticket += 1;
        st.waiting.push_back(ticket);
        // `stalled` goes first: what it frees may be all that is needed.
        let mut waited = true;
        loop {
            if st.waiting.front() == Some(&ticket) && st.used + n <= self.limit {
                st.used += n;
                st.waiting.pop_front();
                // The next in line may fit too.
                self.cv.notify_all();
                return true;
            }
            if waited {
                drop(st);
                let give_up = stalled();
                st = self.lock();
                if give_up {
                    st.waiting.retain(|&t| t != ticket);
                    self.cv.notify_all();
                    return false;
                }
                // What `stalled` freed may be enough.
                waited = false;
                continue;
            }
            st = self
                .cv
                .wait_timeout(st, CHECK)
                .map_or_else(|p| p.into_inner().0, |(g, _)| g);
            waited = true;
        }
    }

    /// Reserves `n` bytes if that needs no waiting.
    fn try_reserve(&self, n: u64) -> bool {
        let mut st = self.lock();
        let ok = st.waiting.is_empty() && st.used + n <= self.limit;
        if ok {
            st.used += n;
        }
        ok
    }

    pub fn release(&self, n: u64) {
        if n == 0 {
            return;
        }
        let mut st = self.lock();
        st.used = st.used.saturating_sub(n);
        if !st.waiting.is_empty() {
            self.cv.notify_all();
        }
    }
}

/// The server's budget and its pool of idle buffers.
#[derive(Debug)]
pub struct Memory {
    budget: Budget,
    pool: Mutex<Pool>,
    /// Bytes the pool may hold.
    keep: u64,
    /// Connections being served: the last one to end empties the pool.
    connections: AtomicUsize,
}

#[derive(Debug, Default)]
struct Pool {
    bufs: Vec<Pooled>,
    bytes: u64,
}

/// An idle buffer and the bytes of the server budget it holds.
#[derive(Debug)]
struct Pooled {
    data: Vec<u8>,
    counted: u64,
}

impl Memory {
    /// A server budget of `limit` bytes; the pool keeps up to `keep` of them.
    pub fn new(limit: u64, keep: u64) -> Self {
        Self {
            budget: Budget::new(limit),
            pool: Mutex::new(Pool::default()),
            keep: keep.min(limit),
            connections: AtomicUsize::new(0),
        }
    }

    /// A new connection's memory, with a budget of `limit` bytes of its own.
    pub fn connection(self: &Arc<Self>, limit: u64) -> ConnMemory {
        self.connections.fetch_add(1, Ordering::SeqCst);
        ConnMemory {
            memory: self.clone(),
            budget: Arc::new(Budget::new(limit)),
        }
    }

    fn lock_pool(&self) -> MutexGuard<'_, Pool> {
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Bytes of the server budget in use, by requests and the pool.
    #[cfg(test)]
    pub fn used(&self) -> u64 {
        self.budget.used()
    }

    /// Bytes the pool holds.
    #[cfg(test)]
    pub fn pooled(&self) -> u64 {
        self.lock_pool().bytes
    }

    /// Frees every idle buffer and gives its bytes back to the budget.
    fn trim(&self) {
        let freed = {
            let mut pool = self.lock_pool();
            pool.bufs.clear();
            std::mem::take(&mut pool.bytes)
        };
        self.budget.release(freed);
    }

    /// The pooled buffer that best fits `n` bytes: the smallest that holds
    /// them, else the largest.
    fn take_pooled(&self, n: u64) -> Option<Pooled> {
        let mut pool = self.lock_pool();
        let fits = |p: &&Pooled| p.counted >= n;
        let i = match pool
            .bufs
            .iter()
            .enumerate()
            .filter(|(_, p)| fits(p))
            .min_by_key(|(_, p)| p.counted)
        {
            Some((i, _)) => i,
            None => {
                pool.bufs
                    .iter()
                    .enumerate()
                    .max_by_key(|(_, p)| p.counted)?
                    .0
            }
        };
        let p = pool.bufs.swap_remove(i);
        pool.bytes -= p.counted;
        Some(p)
    }

    /// Takes back a buffer holding `counted` bytes of the budget: kept for
    /// reuse while nobody waits for the budget and the pool has room,
    /// else freed.
    fn give_back(&self, data: Vec<u8>, counted: u64) {
        if counted == 0 {
            return;
        }
        {
            let mut pool = self.lock_pool();
            // A buffer that grew beyond what it holds (it never should) is
            // not kept: the budget would no longer bound it.
            let keep = data.capacity() as u64 <= counted
                && pool.bytes + counted <= self.keep
                && pool.bufs.len() < POOL_BUFFERS
                && !self.budget.has_waiters();
            if keep {
                pool.bytes += counted;
                pool.bufs.push(Pooled { data, counted });
                return;
            }
        }
        self.budget.release(counted);
    }

    /// A buffer of `n` bytes held against `conn` and this server's budget,
    /// waiting for both as needed; `None` if `give_up` said so while
    /// waiting. Growing a reused buffer zeroes only its new bytes. A request
    /// larger than a budget (options keep both at least `MAX_PAYLOAD`, the
    /// largest one) takes the whole budget rather than never being served.
    pub fn buffer(
        self: &Arc<Self>,
        conn: &Arc<Budget>,
        n: usize,
        give_up: &mut dyn FnMut() -> bool,
    ) -> Option<Buffer> {
        if n == 0 {
            return Some(Buffer::default());
        }
        let want = n as u64;
        let conn_bytes = want.min(conn.limit);
        if !conn.reserve(conn_bytes, give_up) {
            return None;
        }
        // From here on, dropping `b` gives back what it holds.
        let mut b = Buffer {
            data: Vec::new(),
            len: 0,
            conn_bytes,
            counted: 0,
            owner: Some((conn.clone(), self.clone())),
        };
        if let Some(p) = self.take_pooled(want) {
            b.data = p.data;
            b.counted = p.counted;
        }
        let target = want.min(self.budget.limit);
        if b.counted < target {
            let extra = target - b.counted;
            let enough = self.budget.try_reserve(extra)
                || self.budget.reserve(extra, &mut || {
                    // Idle buffers go before anyone waits for their bytes.
                    self.trim();
                    give_up()
                });
            if !enough {
                return None;
            }
            b.counted = target;
        }
        if b.data.len() < n {
            b.data.reserve_exact(n - b.data.len());
            b.data.resize(n, 0);
        }
        b.len = n;
        Some(b)
    }
}

/// A size for an option: bytes, or with a suffix K, M, G or T (powers of
/// 1024; `KiB` and the like are accepted too).
pub fn parse_size(s: &str) -> Result<u64, String> {
    parse_size::Config::new()
        .with_binary()
        .parse_size(s)
        .map_err(|e| format!("{e} (a size such as 64M or 1G)"))
}

/// One connection's share of memory: its own budget and the server's.
#[derive(Debug)]
pub struct ConnMemory {
    memory: Arc<Memory>,
    budget: Arc<Budget>,
}

impl ConnMemory {
    /// [`Memory::buffer`] against this connection's budget.
    pub fn buffer(&self, n: usize, give_up: &mut dyn FnMut() -> bool) -> Option<Buffer> {
        self.memory.buffer(&self.budget, n, give_up)
    }
}

impl Drop for ConnMemory {
    fn drop(&mut self) {
        // An idle server holds no buffers.
        if self.memory.connections.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.memory.trim();
        }
    }
}

/// Request data, holding its bytes against a connection's budget and the
/// server's until dropped.
#[derive(Debug, Default)]
pub struct Buffer {
    /// Its length is the bytes initialised so far, which reuse keeps.
    data: Vec<u8>,
    /// The request's bytes: what the buffer derefs to.
    len: usize,
    conn_bytes: u64,
    /// Bytes of the server budget held: the capacity asked for.
    counted: u64,
    owner: Option<(Arc<Budget>, Arc<Memory>)>,
}

impl Buffer {
    /// The vector itself, for code that fills a `Vec` (the READ path sizes
    /// it to the request). Its capacity stays counted in the budgets.
    pub fn vec_mut(&mut self) -> &mut Vec<u8> {
        &mut self.data
    }
}

impl Deref for Buffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        let n = self.len.min(self.data.len());
        &self.data[..n]
    }
}

impl DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        let n = self.len.min(self.data.len());
        &mut self.data[..n]
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        if let Some((conn, mem)) = self.owner.take() {
            conn.release(self.conn_bytes);
            mem.give_back(std::mem::take(&mut self.data), self.counted);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;

    use super::*;
    use crate::testutil::PATIENCE;

    const MIB: u64 = 1 << 20;

    fn never() -> impl FnMut() -> bool {
        || false
    }

    fn mem(limit: u64, keep: u64) -> Arc<Memory> {
        Arc::new(Memory::new(limit, keep))
    }

    /// Waits until `f` holds.
    fn until(what: &str, f: impl Fn() -> bool) {
        let start = Instant::now();
        while !f() {
            assert!(start.elapsed() < PATIENCE, "never: {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn reserve_and_release_within_the_limit() {
        let b = Budget::new(100);
        assert!(b.reserve(60, &mut never()));
        assert!(b.reserve(40, &mut never()));
        assert_eq!(b.used(), 100);
        b.release(40);
        assert!(b.try_reserve(40));
        assert!(!b.try_reserve(1));
        b.release(100);
        assert_eq!(b.used(), 0);
        // A request as big as the budget fits an empty one; beyond never.
        assert!(b.reserve(100, &mut never()));
        b.release(100);
        assert!(!b.reserve(101, &mut never()));
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn a_request_beyond_the_budgets_takes_them_whole() {
        let m = mem(2 * MIB, 2 * MIB);
        let conn = Arc::new(Budget::new(MIB));
        let a = m.buffer(&conn, 3 << 20, &mut never()).unwrap();
        assert_eq!(a.len(), 3 << 20);
        assert_eq!((conn.used(), m.used()), (MIB, 2 * MIB));
        drop(a);
        // Bigger than what it holds: freed, not pooled.
        assert_eq!((conn.used(), m.used(), m.pooled()), (0, 0, 0));
    }

    #[test]
    fn a_waiter_wakes_when_bytes_are_released() {
        let b = Arc::new(Budget::new(100));
        assert!(b.reserve(80, &mut never()));
        let done = Arc::new(AtomicBool::new(false));
        let (b2, d2) = (b.clone(), done.clone());
        let t = std::thread::spawn(move || {
            let ok = b2.reserve(50, &mut never());
            d2.store(true, Ordering::SeqCst);
            ok
        });
        until("the waiter is queued", || b.has_waiters());
        std::thread::sleep(Duration::from_millis(50));
        assert!(!done.load(Ordering::SeqCst), "reserved beyond the limit");
        let t0 = Instant::now();
        b.release(80);
        assert!(t.join().unwrap());
        // Woken by the release, not by the periodic check.
        assert!(t0.elapsed() < CHECK, "woke after {:?}", t0.elapsed());
        assert_eq!(b.used(), 50);
    }

    #[test]
    fn waiters_are_served_in_turn() {
        let b = Arc::new(Budget::new(100));
        assert!(b.reserve(60, &mut never()));
        let b2 = b.clone();
        let big = std::thread::spawn(move || b2.reserve(100, &mut never()));
        until("the big waiter is queued", || b.has_waiters());
        // Small requests that fit the bytes left must not overtake the big
        // one that came first, or it could wait for ever.
        assert!(!b.try_reserve(30));
        assert!(!b.reserve(30, &mut || true), "overtook the waiter");
        b.release(60);
        assert!(big.join().unwrap());
        assert_eq!(b.used(), 100);
    }

    #[test]
    fn a_waiter_of_a_dying_connection_gives_up() {
        let b = Arc::new(Budget::new(100));
        assert!(b.reserve(100, &mut never()));
        let dead = Arc::new(AtomicBool::new(false));
        let (b2, d2) = (b.clone(), dead.clone());
        let t = std::thread::spawn(move || b2.reserve(10, &mut || d2.load(Ordering::SeqCst)));
        until("the waiter is queued", || b.has_waiters());
        dead.store(true, Ordering::SeqCst);
        // Nothing is released: the periodic check alone ends the wait.
        assert!(!t.join().unwrap());
        assert!(!b.has_waiters(), "the ticket is left in the queue");
        assert_eq!(b.used(), 100);
        b.release(100);
        assert!(b.try_reserve(100), "a gone waiter blocks the next");
    }

    #[test]
    fn a_buffer_holds_both_budgets_until_dropped() {
        let m = mem(64 * MIB, 0);
        let conn = Arc::new(Budget::new(32 * MIB));
        let mut a = m.buffer(&conn, 4096, &mut never()).unwrap();
        assert_eq!(a.len(), 4096);
        a[0] = 1;
        assert_eq!((conn.used(), m.used()), (4096, 4096));
        drop(a);
        assert_eq!((conn.used(), m.used(), m.pooled()), (0, 0, 0));
        // An empty request holds nothing.
        let e = m.buffer(&conn, 0, &mut never()).unwrap();
        assert!(e.is_empty());
        assert_eq!(conn.used(), 0);
    }

    #[test]
    fn a_request_as_big_as_the_connection_budget_is_served() {
        let m = mem(64 * MIB, 0);
        let conn = Arc::new(Budget::new(32 * MIB));
        let a = m.buffer(&conn, 32 << 20, &mut never()).unwrap();
        assert_eq!(a.len(), 32 << 20);
        // The next one waits for it: backpressure, not allocation.
        let (m2, c2) = (m.clone(), conn.clone());
        let t = std::thread::spawn(move || m2.buffer(&c2, 1 << 20, &mut never()).map(|b| b.len()));
        until("the next request waits", || conn.has_waiters());
        assert_eq!(m.used(), 32 * MIB);
        drop(a);
        assert_eq!(t.join().unwrap(), Some(1 << 20));
        assert_eq!((conn.used(), m.used()), (0, 0));
    }

    #[test]
    fn the_server_budget_is_shared_by_connections() {
        let m = mem(48 * MIB, 0);
        let c1 = Arc::new(Budget::new(32 * MIB));
        let c2 = Arc::new(Budget::new(32 * MIB));
        let a = m.buffer(&c1, 32 << 20, &mut never()).unwrap();
        let dead = Arc::new(AtomicBool::new(false));
        let (m2, c, d) = (m.clone(), c2.clone(), dead.clone());
        let t = std::thread::spawn(move || {
            m2.buffer(&c, 32 << 20, &mut || d.load(Ordering::SeqCst))
                .is_some()
        });
        until("the second connection waits", || m.budget.has_waiters());
        // It holds its own connection's bytes while it waits for the
        // server's; giving up returns them.
        assert_eq!(c2.used(), 32 * MIB);
        dead.store(true, Ordering::SeqCst);
        assert!(!t.join().unwrap());
        assert_eq!((c2.used(), m.used()), (0, 32 * MIB));
        drop(a);
        assert_eq!(m.used(), 0);
    }

    #[test]
    fn buffers_are_reused_and_keep_their_length() {
        let m = mem(64 * MIB, 8 * MIB);
        let conn = Arc::new(Budget::new(32 * MIB));
        let mut a = m.buffer(&conn, 1 << 20, &mut never()).unwrap();
        a.fill(7);
        let ptr = a.as_ptr();
        drop(a);
        // Idle in the pool, its bytes still counted in the server budget.
        assert_eq!((conn.used(), m.used(), m.pooled()), (0, MIB, MIB));
        // A smaller request gets it back as it was: nothing zeroed.
        let b = m.buffer(&conn, 4096, &mut never()).unwrap();
        assert_eq!((b.as_ptr(), b.len()), (ptr, 4096));
        assert_eq!(b[4095], 7);
        assert_eq!((conn.used(), m.used(), m.pooled()), (4096, MIB, 0));
        drop(b);
        // A larger one grows it; only the new bytes are zeroed.
        let c = m.buffer(&conn, 2 << 20, &mut never()).unwrap();
        assert_eq!((c[(1 << 20) - 1], c[1 << 20]), (7, 0));
        assert_eq!(m.used(), 2 * MIB);
        drop(c);
        assert_eq!(m.pooled(), 2 * MIB);
    }

    #[test]
    fn the_last_connection_to_end_empties_the_pool() {
        let m = mem(64 * MIB, 8 * MIB);
        let (a, b) = (m.connection(32 * MIB), m.connection(32 * MIB));
        drop(a.buffer(1 << 20, &mut never()).unwrap());
        drop(a);
        assert_eq!(m.pooled(), MIB, "emptied while a connection is left");
        drop(b.buffer(4096, &mut never()).unwrap());
        drop(b);
        assert_eq!((m.pooled(), m.used()), (0, 0));
    }

    #[test]
    fn the_pool_is_bounded_and_yields_to_waiters() {
        let m = mem(64 * MIB, 2 * MIB);
        let conn = Arc::new(Budget::new(64 * MIB));
        let bufs: Vec<Buffer> = (0..3)
            .map(|_| m.buffer(&conn, 1 << 20, &mut never()).unwrap())
            .collect();
        drop(bufs);
        // Two fit the pool; the third is freed.
        assert_eq!((m.pooled(), m.used()), (2 * MIB, 2 * MIB));
        // Someone who needs the pooled bytes gets them: the pool is trimmed
        // rather than left holding what a waiter needs.
        let big = m.buffer(&conn, 64 << 20, &mut never()).unwrap();
        assert_eq!((m.pooled(), m.used()), (0, 64 * MIB));
        drop(big);
        assert_eq!(m.used(), 0, "64 MiB is beyond what the pool keeps");
    }
}
