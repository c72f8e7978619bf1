//! A socket whose every read and write ends by a deadline, shared by the
//! server's handshake (where a client must not trickle bytes to hold a
//! slot) and the client's connection (where a server must not trickle a
//! reply past the caller's deadline).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// The socket timeouts std offers on both stream types, but in no trait.
pub trait Timeouts {
    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()>;
    fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()>;
}

macro_rules! impl_timeouts {
    ($t:ty) => {
        impl Timeouts for $t {
            fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
                <$t>::set_read_timeout(self, t)
            }
            fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
                <$t>::set_write_timeout(self, t)
            }
        }
    };
}
impl_timeouts!(TcpStream);
impl_timeouts!(UnixStream);

/// A socket whose every read and write waits at most `cap` and ends by
/// `deadline`, each when set. Each call arms `SO_RCVTIMEO`/`SO_SNDTIMEO`
/// with the time left rather than a fixed span, so a peer trickling bytes
/// cannot push the deadline out. It sits under rustls too: one TLS read
/// can take many socket reads. A wait that runs out is `TimedOut`, never
/// the `WouldBlock` the socket reports, so callers test for one kind only.
#[derive(Debug)]
pub struct Timed<S> {
    sock: S,
    cap: Option<Duration>,
    deadline: Option<Instant>,
}

fn timed_out(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::TimedOut, what.to_owned())
}

impl<S: Timeouts> Timed<S> {
    /// `sock` with each wait bounded by `cap` (`None`: the socket's own
    /// timeouts are left as they are until a deadline is set).
    pub fn new(sock: S, cap: Option<Duration>) -> Self {
        Self {
            sock,
            cap,
            deadline: None,
        }
    }

    /// From now on every call must end by `deadline` (`None`: no limit
    /// but the cap).
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
    }

    pub fn get_ref(&self) -> &S {
        &self.sock
    }

    /// The bare socket, blocking with no timeouts: what comes after (the
    /// kernel, kernel TLS) must not see these.
    pub fn into_inner(self) -> io::Result<S> {
        self.sock.set_read_timeout(None)?;
        self.sock.set_write_timeout(None)?;
        Ok(self.sock)
    }

    /// How long the next call may wait; `None` if nothing bounds it here.
    fn limit(&self) -> io::Result<Option<Duration>> {
        let Some(d) = self.deadline else {
            return Ok(self.cap);
        };
        match d.checked_duration_since(Instant::now()) {
            Some(left) if !left.is_zero() => Ok(Some(self.cap.map_or(left, |c| c.min(left)))),
            _ => Err(timed_out("time limit reached")),
        }
    }

    /// Runs one socket call with its timeout armed; running out of it
    /// (`EAGAIN`) is reported as `TimedOut`.
    fn bounded<T>(
        &mut self,
        arm: fn(&S, Option<Duration>) -> io::Result<()>,
        io: impl FnOnce(&mut S) -> io::Result<T>,
    ) -> io::Result<T> {
        let limit = self.limit()?;
        if limit.is_some() {
            arm(&self.sock, limit)?;
        }
        match io(&mut self.sock) {
            Err(e) if limit.is_some() && e.kind() == io::ErrorKind::WouldBlock => {
                Err(timed_out(match self.deadline {
                    Some(d) if Instant::now() >= d => "time limit reached",
                    _ => "no answer within the timeout",
                }))
            }
            r => r,
        }
    }
}

impl<S: Read + Timeouts> Read for Timed<S> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.bounded(S::set_read_timeout, |s| s.read(buf))
    }
}

impl<S: Write + Timeouts> Write for Timed<S> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.bounded(S::set_write_timeout, |s| s.write(buf))
    }
    fn flush(&mut self) -> io::Result<()> {
        self.sock.flush()
    }
}
