//! A blocking NBD connection for reading: connect, negotiate one export,
//! then `READ`s one at a time with simple replies. Every wait is bounded
//! by the timeout given at connect time, and the whole handshake by twice
//! it (name resolution aside: the system resolver has no timeout we can
//! set). The server is not trusted: each
//! reply's magic and cookie are checked, and a reply that does not match
//! the request ends the connection with an error, never a panic.

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use enbd_core::wire::{errno, Cmd, Request, SimpleReply};

use crate::negotiate::{self, ExportInfo, NegotiateError};
use crate::timed::Timed;

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

/// Sends `req` (a `READ` of `buf.len()` bytes) and reads its simple reply
/// into `buf`: the magic, cookie and error are checked. Also for callers
/// with a stream of their own (the helper's RTT probes, over TLS).
pub fn exchange(
    s: &mut (impl Read + Write),
    req: &Request,
    buf: &mut [u8],
) -> Result<(), ClientError> {
    s.write_all(&req.encode())?;
    let mut h = [0u8; SimpleReply::LEN];
    s.read_exact(&mut h)?;
    let r = SimpleReply::decode(&h).map_err(ClientError::Protocol)?;
    if r.cookie != req.cookie {
        return Err(ClientError::WrongCookie {
            got: r.cookie,
            want: req.cookie,
        });
    }
    if r.error != 0 {
        return Err(ClientError::Server(r.error, errno_name(r.error)));
    }
    s.read_exact(buf)?;
    Ok(())
}

/// One negotiated connection to one export.
#[derive(Debug)]
pub struct Conn {
    /// Each wait bounded by the connect timeout, and by the deadline
    /// when one is set.
    stream: Timed<TcpStream>,
    info: ExportInfo,
    next_cookie: u64,
}

impl Conn {
    /// Connects to `addr` (`HOST:PORT`), trying each address it resolves to
    /// within `timeout`, and negotiates `export` within twice `timeout`.
    /// The timeout then bounds every read and write on the connection.
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
        let stream = stream.ok_or_else(|| err(last))?;
        let _ = stream.set_nodelay(true);
        let mut stream = Timed::new(stream, Some(timeout));
        let hs = |source| ClientError::Handshake {
            addr: addr.to_owned(),
            source,
        };
        stream.set_deadline(Some(Instant::now() + timeout * 2));
        let nz = negotiate::greet(&mut stream).map_err(hs)?;
        let info = negotiate::go(&mut stream, export, nz).map_err(hs)?;
        stream.set_deadline(None);
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

    /// Makes every later read and write on the connection end by
    /// `deadline` (a `READ` fails with `TimedOut` past it), on top of the
    /// timeout of each; `None` lifts it.
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.stream.set_deadline(deadline);
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
        exchange(&mut self.stream, &req, buf)
    }

    /// Ends the session politely (`NBD_CMD_DISC`); errors are ignored, the
    /// connection is going anyway.
    pub fn close(mut self) {
        let req = Request::new(Cmd::Disc, 0, 0, 0, 0);
        let _ = self.stream.write_all(&req.encode());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use enbd_core::wire::{handshake, opt, rep, Greeting, Info, OptionReplyHeader};
    use std::net::TcpListener;

    /// The server's side of a handshake: the greeting, then whatever one
    /// option the client sends is answered as `GO` for an export of `size`
    /// bytes.
    fn handshake_go(s: &mut TcpStream, size: u64) {
        let g = Greeting {
            flags: handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES,
        };
        s.write_all(&g.encode()).unwrap();
        let mut b = [0u8; 4 + 16];
        s.read_exact(&mut b).unwrap();
        let len = u32::from_be_bytes(b[16..20].try_into().unwrap());
        s.read_exact(&mut vec![0u8; len as usize]).unwrap();
        let mut i = [0u8; 16];
        let n = Info::Export { size, flags: 1 }.encode(&mut i).unwrap();
        for (reply, body) in [(rep::INFO, &i[..n]), (rep::ACK, &[][..])] {
            let h = OptionReplyHeader {
                option: opt::GO,
                reply,
                length: body.len() as u32,
            };
            s.write_all(&h.encode()).unwrap();
            s.write_all(body).unwrap();
        }
    }

    /// A scripted server: the handshake for an export of `size` bytes, then
    /// for each request read, the bytes `answer` makes of its cookie.
    fn server(size: u64, answer: fn(u64) -> Vec<u8>) -> String {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            handshake_go(&mut s, size);
            let mut req = [0u8; Request::LEN];
            while s.read_exact(&mut req).is_ok() {
                let r = Request::decode(&req).unwrap();
                if s.write_all(&answer(r.cookie)).is_err() {
                    break;
                }
            }
        });
        addr
    }

    fn reply(error: u32, cookie: u64, data: &[u8]) -> Vec<u8> {
        let mut v = SimpleReply { error, cookie }.encode().to_vec();
        v.extend_from_slice(data);
        v
    }

    const T: Duration = Duration::from_secs(5);

    #[test]
    fn reads_and_checks_each_reply() {
        let addr = server(8192, |c| reply(0, c, &[7u8; 512]));
        let mut c = Conn::connect(&addr, "d", T).unwrap();
        assert_eq!(c.size(), 8192);
        let mut buf = [0u8; 512];
        c.read(&mut buf, 0).unwrap();
        assert_eq!(buf, [7u8; 512]);
        c.read(&mut buf, 8192 - 512).unwrap();
        let e = c.read(&mut buf, 8192 - 511).unwrap_err();
        assert!(matches!(e, ClientError::OutOfRange { .. }) && e.connection_ok());
        assert!(c.read(&mut buf, u64::MAX).is_err());
        c.close();
    }

    #[test]
    fn error_replies_and_broken_replies_are_told_apart() {
        let addr = server(4096, |c| reply(5, c, &[]));
        let mut c = Conn::connect(&addr, "d", T).unwrap();
        let e = c.read(&mut [0u8; 16], 0).unwrap_err();
        assert!(
            matches!(e, ClientError::Server(5, "EIO")) && e.connection_ok(),
            "{e}"
        );
        let addr = server(4096, |c| reply(0, c + 1, &[0u8; 16]));
        let mut c = Conn::connect(&addr, "d", T).unwrap();
        let e = c.read(&mut [0u8; 16], 0).unwrap_err();
        assert!(
            matches!(e, ClientError::WrongCookie { .. }) && !e.connection_ok(),
            "{e}"
        );
        let addr = server(4096, |_| b"not an NBD reply".to_vec());
        let mut c = Conn::connect(&addr, "d", T).unwrap();
        let e = c.read(&mut [0u8; 16], 0).unwrap_err();
        assert!(
            matches!(e, ClientError::Protocol(_)) && !e.connection_ok(),
            "{e}"
        );
    }

    #[test]
    fn a_trickling_server_meets_the_deadline() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            handshake_go(&mut s, 4096);
            let mut req = [0u8; Request::LEN];
            s.read_exact(&mut req).unwrap();
            let r = Request::decode(&req).unwrap();
            s.write_all(&reply(0, r.cookie, &[])).unwrap();
            // A byte every 70 ms, each well within the timeout; the
            // deadline then falls in a wait, whose socket timeout the
            // caller must see as `TimedOut` too.
            while s.write_all(&[0]).is_ok() {
                std::thread::sleep(Duration::from_millis(70));
            }
        });
        let mut c = Conn::connect(&addr, "d", Duration::from_secs(1)).unwrap();
        let start = Instant::now();
        c.set_deadline(Some(start + Duration::from_millis(300)));
        let e = c.read(&mut [0u8; 4096], 0).unwrap_err();
        assert!(
            matches!(&e, ClientError::Io(e) if e.kind() == io::ErrorKind::TimedOut),
            "{e:?}"
        );
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    #[test]
    fn a_silent_server_times_out() {
        let addr = server(4096, |_| Vec::new());
        let mut c = Conn::connect(&addr, "d", Duration::from_millis(200)).unwrap();
        let e = c.read(&mut [0u8; 16], 0).unwrap_err();
        assert!(matches!(e, ClientError::Io(_)), "{e}");
        let dead = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = dead.local_addr().unwrap().to_string();
        drop(dead);
        let e = Conn::connect(&addr, "d", T).unwrap_err();
        assert!(matches!(e, ClientError::Connect { .. }), "{e}");
    }
}
