//! The sockets the server accepts on: TCP addresses it binds (by default
//! `[::]:10809`, dual-stack), or the listening sockets systemd passes it
//! (socket activation).

use std::io;
use std::net::{Ipv6Addr, SocketAddr, TcpListener, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;

use anyhow::{bail, Context, Result};
use socket2::{Domain, Socket, Type};
use tracing::info;

/// The NBD port (IANA).
pub const NBD_PORT: u16 = 10809;

/// How many connections wait to be accepted before the kernel drops more.
const BACKLOG: i32 = 1024;

/// A socket to accept connections on.
#[derive(Debug)]
pub enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// What it listens on, for the logs.
    pub fn describe(&self) -> String {
        match self {
            Listener::Tcp(l) => match l.local_addr() {
                Ok(a) => a.to_string(),
                Err(_) => "tcp:?".into(),
            },
            Listener::Unix(l) => match l
                .local_addr()
                .ok()
                .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
            {
                Some(p) => format!("unix:{p}"),
                None => "unix:(unnamed)".into(),
            },
        }
    }
}

/// Binds one TCP address for listening. An IPv6 address listens on IPv6
/// only, so `[::]:P` and `0.0.0.0:P` can both be given; a host name binds
/// the first of its addresses that works.
pub fn bind_tcp(addr: &str) -> Result<TcpListener> {
    let addrs: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .with_context(|| format!("cannot listen on {addr}: not an address"))?
        .collect();
    let mut last = None;
    for a in &addrs {
        match bind(*a, true) {
            Ok(l) => return Ok(l),
            Err(e) => last = Some(e),
        }
    }
    match last {
        Some(e) => Err(e).with_context(|| format!("cannot listen on {addr}")),
        None => bail!("cannot listen on {addr}: no address"),
    }
}

fn bind(addr: SocketAddr, v6_only: bool) -> io::Result<TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    if addr.is_ipv6() {
        s.set_only_v6(v6_only)?;
    }
    // As std's TcpListener::bind does: a restart need not wait out the
    // TIME_WAIT of its old connections.
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(BACKLOG)?;
    Ok(s.into())
}

/// Whether an IPv6 socket failed because this host has no IPv6 (a kernel
/// booted with `ipv6.disable=1`, or built without it).
fn ipv6_unavailable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EAFNOSUPPORT | libc::EPROTONOSUPPORT | libc::EADDRNOTAVAIL)
    )
}

/// The default: `[::]:PORT` taking IPv4 clients too (as v4-mapped
/// addresses), or `0.0.0.0:PORT` where IPv6 is unavailable.
pub fn bind_default(port: u16) -> Result<TcpListener> {
    let any6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    match bind(any6, false) {
        Ok(l) => Ok(l),
        Err(e) if ipv6_unavailable(&e) => {
            info!("IPv6 unavailable ({e}): listening on IPv4 only");
            let any4 = SocketAddr::from(([0, 0, 0, 0], port));
            bind(any4, false).with_context(|| format!("cannot listen on {any4}"))
        }
        Err(e) => Err(e).with_context(|| format!("cannot listen on {any6}")),
    }
}

/// The first descriptor systemd passes (`SD_LISTEN_FDS_START`).
const FIRST_FD: RawFd = 3;

/// How many sockets systemd passed us, from `LISTEN_PID` and `LISTEN_FDS`
/// as sd_listen_fds(3) reads them: none unless `LISTEN_PID` is our pid.
fn passed_count(pid: Option<&str>, fds: Option<&str>, our_pid: u32) -> Result<usize> {
    let Some(pid) = pid else { return Ok(0) };
    let pid: u32 = pid
        .trim()
        .parse()
        .with_context(|| format!("LISTEN_PID={pid}: not a pid"))?;
    if pid != our_pid {
        return Ok(0);
    }
    let Some(fds) = fds else {
        bail!("LISTEN_PID is set but LISTEN_FDS is not")
    };
    let n: usize = fds
        .trim()
        .parse()
        .with_context(|| format!("LISTEN_FDS={fds}: not a count"))?;
    if n > 4096 {
        bail!("LISTEN_FDS={n}: too many");
    }
    Ok(n)
}

/// Takes a passed socket: it must be a listening stream socket, TCP or
/// unix.
fn passed_listener(fd: OwnedFd) -> Result<Listener> {
    let raw = fd.as_raw_fd();
    let s = Socket::from(fd);
    let listening = s.r#type().ok() == Some(Type::STREAM) && s.is_listener().unwrap_or(false);
    if !listening {
        bail!("descriptor {raw} from systemd is not a listening stream socket");
    }
    let domain = s
        .domain()
        .with_context(|| format!("descriptor {raw} from systemd"))?;
    if domain == Domain::IPV4 || domain == Domain::IPV6 {
        Ok(Listener::Tcp(s.into()))
    } else if domain == Domain::UNIX {
        Ok(Listener::Unix(OwnedFd::from(s).into()))
    } else {
        bail!("descriptor {raw} from systemd is neither a TCP nor a unix socket")
    }
}

/// The listening sockets systemd passed (socket activation), if any. Reads
/// and clears `LISTEN_PID`, `LISTEN_FDS` and `LISTEN_FDNAMES`, so no child
/// takes them for its own; call it before any thread starts, as it changes
/// the environment.
pub fn take_passed() -> Result<Option<Vec<Listener>>> {
    let var = |k| std::env::var(k).ok();
    let n = passed_count(
        var("LISTEN_PID").as_deref(),
        var("LISTEN_FDS").as_deref(),
        std::process::id(),
    );
    for k in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(k);
    }
    let n = n?;
    if n == 0 {
        return Ok(None);
    }
    let mut listeners = Vec::with_capacity(n);
    for i in 0..n {
        let fd = FIRST_FD + i as RawFd;
        // SAFETY: F_GETFD only reads the descriptor's flags; on a number
        // that is not open it fails with EBADF, which is checked.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            bail!("LISTEN_FDS={n}, but descriptor {fd} is not open");
        }
        // SAFETY: the descriptor is open (checked above), and by the
        // sd_listen_fds protocol systemd passed it to this process alone:
        // nothing else in the server owns or closes it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // Not for the processes the server might start.
        // SAFETY: sets a flag on a descriptor we own.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
        listeners.push(passed_listener(fd)?);
    }
    Ok(Some(listeners))
}

#[cfg(test)]
mod tests {
    use std::net::TcpStream;
    use std::os::unix::net::UnixStream;

    use super::*;

    #[test]
    fn listen_fds_are_ours_only_when_listen_pid_is_our_pid() {
        assert_eq!(passed_count(None, None, 7).unwrap(), 0);
        assert_eq!(passed_count(None, Some("2"), 7).unwrap(), 0);
        assert_eq!(passed_count(Some("8"), Some("2"), 7).unwrap(), 0);
        assert_eq!(passed_count(Some("7"), Some("2"), 7).unwrap(), 2);
        assert_eq!(passed_count(Some("7"), Some("0"), 7).unwrap(), 0);
        for (pid, fds, msg) in [
            (Some("x"), Some("1"), "LISTEN_PID=x: not a pid"),
            (Some("7"), Some("-1"), "LISTEN_FDS=-1: not a count"),
            (Some("7"), Some(""), "LISTEN_FDS=: not a count"),
            (Some("7"), None, "LISTEN_FDS is not"),
            (Some("7"), Some("100000"), "too many"),
        ] {
            let e = format!("{:#}", passed_count(pid, fds, 7).unwrap_err());
            assert!(e.contains(msg), "{e}");
        }
    }

    #[test]
    fn passed_tcp_and_unix_sockets_are_served_and_others_refused() {
        let tcp = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = tcp.local_addr().unwrap();
        let Listener::Tcp(tcp) = passed_listener(tcp.into()).unwrap() else {
            panic!("a TCP listener taken for unix")
        };
        let _c = TcpStream::connect(addr).unwrap();
        tcp.accept().unwrap();

        let dir = std::env::temp_dir().join(format!("enbd-listen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("sock");
        let _ = std::fs::remove_file(&path);
        let unix = UnixListener::bind(&path).unwrap();
        let l = passed_listener(unix.into()).unwrap();
        assert_eq!(l.describe(), format!("unix:{}", path.display()));
        let Listener::Unix(unix) = l else {
            panic!("a unix listener taken for TCP")
        };
        let _c = UnixStream::connect(&path).unwrap();
        unix.accept().unwrap();
        std::fs::remove_dir_all(dir).unwrap();

        // A connected socket, a datagram socket and a file are refused.
        let (a, _b) = UnixStream::pair().unwrap();
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let file = std::fs::File::open("/dev/null").unwrap();
        for fd in [OwnedFd::from(a), udp.into(), file.into()] {
            let e = passed_listener(fd).unwrap_err().to_string();
            assert!(e.contains("not a listening stream socket"), "{e}");
        }
    }

    #[test]
    fn the_default_takes_ipv4_clients_too() {
        let l = bind_default(0).unwrap();
        let port = l.local_addr().unwrap().port();
        let _c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        let (_s, peer) = l.accept().unwrap();
        if l.local_addr().unwrap().is_ipv6() {
            assert!(
                matches!(peer.ip(), std::net::IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some()),
                "{peer}"
            );
        }
        assert_eq!(peer.ip().to_canonical().to_string(), "127.0.0.1");
    }

    #[test]
    fn an_ipv6_address_given_listens_on_ipv6_only() {
        // Some build hosts lack IPv6 altogether: nothing to check there.
        // (A specific address such as [::1] is IPv6-only anyway: the
        // wildcard is what the option decides.)
        let Ok(l) = bind_tcp("[::]:0") else { return };
        let s = Socket::from(OwnedFd::from(l));
        assert!(s.only_v6().unwrap());
        let l4 = bind_tcp("127.0.0.1:0").unwrap();
        assert!(l4.local_addr().unwrap().is_ipv4());
        let e = format!("{:#}", bind_tcp("nonsense").unwrap_err());
        assert!(e.contains("cannot listen on nonsense"), "{e}");
    }

    #[test]
    fn only_a_missing_ipv6_falls_back_to_ipv4() {
        for e in [libc::EAFNOSUPPORT, libc::EADDRNOTAVAIL] {
            assert!(ipv6_unavailable(&io::Error::from_raw_os_error(e)));
        }
        assert!(!ipv6_unavailable(&io::Error::from_raw_os_error(
            libc::EADDRINUSE
        )));
    }
}
