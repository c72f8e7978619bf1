//! A blocking NBD connection for reading: connect, negotiate one export,
//! then `READ`s one at a time with simple replies. Every wait is bounded
//! by the timeout given at connect time. The server is not trusted: each
//! reply's magic and cookie are checked, and a reply that does not match
//! the request ends the connection with an error, never a panic.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use enbd_core::wire::{errno, Cmd, Request, SimpleReply};

use crate::negotiate::{self, ExportInfo, NegotiateError};

/// Why a connection could not be made or a read failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to {addr}: {source}")]
    Connect { addr: String, source: io::Error },
    #[error("handshake with {addr}: {source}")]
    Handshake {
        addr: String,
        source: NegotiateError,
    },
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("the server answered error {0} ({1})")]
    Server(u32, &'static str),
    #[error("a reply for cookie {got:#x} where {want:#x} was expected")]
    WrongCookie { got: u64, want: u64 },
    #[error("a malformed reply: {0}")]
    Protocol(enbd_core::wire::WireError),
    #[error("read of {len} bytes at {off} is past the end of the export ({size} bytes)")]
    OutOfRange { off: u64, len: usize, size: u64 },
}

impl ClientError {
    /// Whether the connection is still usable after this error (only an
    /// error reply leaves it in step).
    pub fn connection_ok(&self) -> bool {
        matches!(
            self,
            ClientError::Server(..) | ClientError::OutOfRange { .. }
        )
    }
}

fn errno_name(e: u32) -> &'static str {
    match e {
        errno::EPERM => "EPERM",
        errno::EIO => "EIO",
        errno::ENOMEM => "ENOMEM",
        errno::EINVAL => "EINVAL",
        errno::ENOSPC => "ENOSPC",
        errno::EOVERFLOW => "EOVERFLOW",
        errno::ENOTSUP => "ENOTSUP",
        errno::ESHUTDOWN => "ESHUTDOWN",
        _ => "unknown",
    }
}

/// One negotiated connection to one export.
#[derive(Debug)]
pub struct Conn {
    stream: TcpStream,
    info: ExportInfo,
    next_cookie: u64,
}

impl Conn {
    /// Connects to `addr` (`HOST:PORT`), trying each address it resolves to
    /// within `timeout`, and negotiates `export`. The timeout then bounds
    /// every read and write on the connection.
    pub fn connect(addr: &str, export: &str, timeout: Duration) -> Result<Self, ClientError> {
        let err = |source| ClientError::Connect {
            addr: addr.to_owned(),
            source,
        };
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
        let mut stream = None;
        for a in addr.to_socket_addrs().map_err(err)? {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = e,
            }
        }
        let mut stream = stream.ok_or_else(|| err(last))?;
        stream.set_read_timeout(Some(timeout)).map_err(err)?;
        stream.set_write_timeout(Some(timeout)).map_err(err)?;
        let _ = stream.set_nodelay(true);
        let hs = |source| ClientError::Handshake {
            addr: addr.to_owned(),
            source,
        };
        let nz = negotiate::greet(&mut stream).map_err(hs)?;
        let info = negotiate::go(&mut stream, export, nz).map_err(hs)?;
        Ok(Self {
            stream,
            info,
            next_cookie: 1,
        })
    }

    /// What the server announced for the export.
    pub fn info(&self) -> &ExportInfo {
        &self.info
    }

    /// The export's size.
    pub fn size(&self) -> u64 {
        self.info.size
    }

    /// Fills `buf` from the export at `off` with one `READ` (so `buf` must
    /// be within the server's maximum request size).
    pub fn read(&mut self, buf: &mut [u8], off: u64) -> Result<(), ClientError> {
        let len = u32::try_from(buf.len()).map_err(|_| ClientError::OutOfRange {
            off,
            len: buf.len(),
            size: self.info.size,
        })?;
        let past_end = match off.checked_add(u64::from(len)) {
            Some(end) => end > self.info.size,
            None => true,
        };
        if past_end {
            return Err(ClientError::OutOfRange {
                off,
                len: buf.len(),
                size: self.info.size,
            });
        }
        let cookie = self.next_cookie;
        self.next_cookie = self.next_cookie.wrapping_add(1);
        let req = Request::new(Cmd::Read, 0, cookie, off, len);
        self.stream.write_all(&req.encode())?;
        let mut h = [0u8; SimpleReply::LEN];
        self.stream.read_exact(&mut h)?;
        let r = SimpleReply::decode(&h).map_err(ClientError::Protocol)?;
        if r.cookie != cookie {
            return Err(ClientError::WrongCookie {
                got: r.cookie,
                want: cookie,
            });
        }
        if r.error != 0 {
            return Err(ClientError::Server(r.error, errno_name(r.error)));
        }
        self.stream.read_exact(buf)?;
        Ok(())
    }

    /// Ends the session politely (`NBD_CMD_DISC`); errors are ignored, the
    /// connection is going anyway.
    pub fn close(mut self) {
        let req = Request::new(Cmd::Disc, 0, 0, 0, 0);
        let _ = self.stream.write_all(&req.encode());
    }
}
