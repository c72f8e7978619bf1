//! A client connection that may be upgraded to TLS in the middle of the
//! handshake (`NBD_OPT_STARTTLS`), and the time limits on it: a deadline for
//! the whole handshake and an optional idle limit for transmission.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use enbd_nbd::timed::Timed;
use rustls::{ServerConnection, StreamOwned};

/// What the handshake runs on.
pub enum Link {
    Tcp(Timed<TcpStream>),
    Unix(Timed<UnixStream>),
    Tls(Box<StreamOwned<ServerConnection, Timed<TcpStream>>>),
    /// Only while an upgrade is in progress.
    Upgrading,
}

/// A link once the handshake is over: the bare socket, blocking with no
/// timeouts, and the TLS session if there is one.
pub enum Bare {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<ServerConnection>, TcpStream),
}

impl Link {
    pub fn tcp(s: TcpStream) -> Self {
        Link::Tcp(Timed::new(s, None))
    }

    pub fn unix(s: UnixStream) -> Self {
        Link::Unix(Timed::new(s, None))
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Link::Tls(_))
    }

    /// Another descriptor of the socket, to shut it down by from another
    /// thread (eviction during the handshake).
    pub fn try_clone_fd(&self) -> io::Result<std::os::fd::OwnedFd> {
        use std::os::fd::AsFd;
        match self {
            Link::Tcp(s) => s.get_ref().as_fd().try_clone_to_owned(),
            Link::Unix(s) => s.get_ref().as_fd().try_clone_to_owned(),
            Link::Tls(s) => s.sock.get_ref().as_fd().try_clone_to_owned(),
            Link::Upgrading => Err(gone()),
        }
    }

    /// Every read and write from now on, TLS included, fails with
    /// `TimedOut` once `deadline` has passed (`None`: no limit).
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        match self {
            Link::Tcp(s) => s.set_deadline(deadline),
            Link::Unix(s) => s.set_deadline(deadline),
            Link::Tls(s) => s.sock.set_deadline(deadline),
            Link::Upgrading => {}
        }
    }

    /// Ends the handshake: the socket for transmission, its timeouts cleared.
    pub fn into_bare(self) -> io::Result<Bare> {
        Ok(match self {
            Link::Tcp(s) => Bare::Tcp(s.into_inner()?),
            Link::Unix(s) => Bare::Unix(s.into_inner()?),
            Link::Tls(s) => {
                let StreamOwned { conn, sock } = *s;
                Bare::Tls(Box::new(conn), sock.into_inner()?)
            }
            Link::Upgrading => return Err(gone()),
        })
    }
}

fn gone() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "connection lost during TLS upgrade",
    )
}

impl Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Link::Tcp(s) => s.read(buf),
            Link::Unix(s) => s.read(buf),
            Link::Tls(s) => s.read(buf),
            Link::Upgrading => Err(gone()),
        }
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Link::Tcp(s) => s.write(buf),
            Link::Unix(s) => s.write(buf),
            Link::Tls(s) => s.write(buf),
            Link::Upgrading => Err(gone()),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Link::Tcp(s) => s.flush(),
            Link::Unix(s) => s.flush(),
            Link::Tls(s) => s.flush(),
            Link::Upgrading => Err(gone()),
        }
    }
}

/// The transmission stream, closed with `TimedOut` when the client sends
/// nothing for `limit`. Waiting happens in `poll(2)`, not in a socket
/// timeout, so the socket itself stays blocking with none.
pub struct IdleLimit<'a, S> {
    inner: &'a mut S,
    limit: Option<Duration>,
}

impl<'a, S> IdleLimit<'a, S> {
    pub fn new(inner: &'a mut S, limit: Option<Duration>) -> Self {
        Self { inner, limit }
    }
}

/// Waits until `fd` is readable (or hung up: the read reports that), for
/// at most `limit`.
fn wait_readable(fd: &impl AsRawFd, limit: Duration) -> io::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // Round up: a zero timeout would spin through the last millisecond.
        let ms = left.as_micros().div_ceil(1000).min(i32::MAX as u128) as i32;
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `p` is one valid pollfd for the duration of the call.
        match unsafe { libc::poll(&mut p, 1, ms) } {
            n if n > 0 => return Ok(()),
            0 => {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("idle for {} s", limit.as_secs()),
                ))
            }
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
}

impl<S: Read + AsRawFd> Read for IdleLimit<'_, S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if let Some(limit) = self.limit {
            wait_readable(self.inner, limit)?;
        }
        self.inner.read(buf)
    }
}

#[cfg(test)]
mod tests {
    use std::net::TcpListener;

    use super::*;
    use crate::testutil::{pair, PATIENCE};

    const LIMIT: Duration = Duration::from_millis(300);

    fn tcp_pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        c.set_read_timeout(Some(PATIENCE)).unwrap();
        let s = l.accept().unwrap().0;
        // So that a broken deadline fails the test instead of hanging it.
        s.set_write_timeout(Some(PATIENCE)).unwrap();
        (c, s)
    }

    /// Writes one byte every `gap` until the peer goes away.
    fn trickle(mut c: impl Write + Send + 'static, gap: Duration) {
        std::thread::spawn(move || {
            while c.write_all(b"x").is_ok() {
                std::thread::sleep(gap);
            }
        });
    }

    fn is_timeout(r: io::Result<()>) -> bool {
        matches!(r, Err(e) if e.kind() == io::ErrorKind::TimedOut)
    }

    #[test]
    fn a_silent_peer_times_out_at_the_deadline() {
        let (_c, s) = pair();
        let mut link = Link::unix(s);
        let start = Instant::now();
        link.set_deadline(Some(start + LIMIT));
        assert!(is_timeout(link.read_exact(&mut [0u8; 1])));
        let took = start.elapsed();
        assert!(took >= LIMIT && took < LIMIT * 4, "{took:?}");
    }

    #[test]
    fn trickling_bytes_does_not_extend_the_deadline() {
        let (c, s) = pair();
        trickle(c, LIMIT / 6);
        let mut link = Link::unix(s);
        let start = Instant::now();
        link.set_deadline(Some(start + LIMIT));
        // Each byte comes well within the time left, but not all of them.
        assert!(is_timeout(link.read_exact(&mut [0u8; 100])));
        let took = start.elapsed();
        assert!(took < LIMIT * 4, "the trickle held the link for {took:?}");
    }

    #[test]
    fn a_peer_that_does_not_read_times_out_on_write() {
        let (_c, s) = tcp_pair();
        let mut link = Link::tcp(s);
        let start = Instant::now();
        link.set_deadline(Some(start + LIMIT));
        // Far more than the socket buffers hold.
        assert!(is_timeout(link.write_all(&vec![0u8; 64 << 20])));
        assert!(start.elapsed() < LIMIT * 4, "{:?}", start.elapsed());
    }

    #[test]
    fn the_bare_socket_has_no_timeouts_left() {
        let (mut c, s) = tcp_pair();
        let mut link = Link::tcp(s);
        link.set_deadline(Some(Instant::now() + PATIENCE));
        link.write_all(b"hi").unwrap();
        c.write_all(b"yo").unwrap();
        link.read_exact(&mut [0u8; 2]).unwrap();
        let Link::Tcp(t) = &link else { unreachable!() };
        assert!(
            t.get_ref().read_timeout().unwrap().is_some(),
            "armed while handshaking"
        );
        assert!(t.get_ref().write_timeout().unwrap().is_some());
        let Bare::Tcp(bare) = link.into_bare().unwrap() else {
            unreachable!()
        };
        assert_eq!(bare.read_timeout().unwrap(), None);
        assert_eq!(bare.write_timeout().unwrap(), None);
    }

    #[test]
    fn without_a_deadline_the_socket_timeouts_are_left_alone() {
        let (_c, s) = pair();
        let mut link = Link::unix(s);
        // `pair` gives up after PATIENCE; a short one shows it is kept.
        let Link::Unix(u) = &link else { unreachable!() };
        u.get_ref().set_read_timeout(Some(LIMIT)).unwrap();
        let e = link.read_exact(&mut [0u8; 1]).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn idle_limit_closes_a_silent_stream_but_not_a_slow_one() {
        let (mut c, mut s) = pair();
        let start = Instant::now();
        let r = IdleLimit::new(&mut s, Some(LIMIT)).read_exact(&mut [0u8; 1]);
        assert!(is_timeout(r));
        assert!(start.elapsed() >= LIMIT);
        // Bytes every LIMIT/3 keep it open, however long the read takes.
        c.write_all(b"x").unwrap();
        trickle(c, LIMIT / 3);
        let mut buf = [0u8; 8];
        IdleLimit::new(&mut s, Some(LIMIT))
            .read_exact(&mut buf)
            .unwrap();
        // And without a limit it waits as long as the socket does.
        assert_eq!(s.read_timeout().unwrap(), Some(PATIENCE));
        IdleLimit::new(&mut s, None).read_exact(&mut buf).unwrap();
    }
}
