//! A client connection that may be upgraded to TLS in the middle of the
//! handshake (`NBD_OPT_STARTTLS`).

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;

use rustls::{ServerConnection, StreamOwned};

/// What the handshake runs on.
pub enum Link {
    Tcp(TcpStream),
    Unix(UnixStream),
    Tls(Box<StreamOwned<ServerConnection, TcpStream>>),
    /// Only while an upgrade is in progress.
    Upgrading,
}

impl Link {
    pub fn is_tls(&self) -> bool {
        matches!(self, Link::Tls(_))
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
