//! The fallback when kernel TLS is unavailable: a thread that pumps
//! plaintext between one end of a socketpair and the rustls session on the
//! TCP socket. The other end of the pair goes where the TCP socket would
//! have gone (the kernel, or the server's transmission loop).
//!
//! This is what Linux nbd-client does with its forked TLS process, with the
//! same weakness: when the process that runs the pump dies, the link dies.

use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

use tracing::debug;

/// Starts the pump; returns the plaintext end and the thread.
pub fn spawn(conn: rustls::Connection, tcp: TcpStream) -> io::Result<(UnixStream, JoinHandle<()>)> {
    let (inner, outer) = UnixStream::pair()?;
    let t = std::thread::Builder::new()
        .name("enbd-tls-proxy".into())
        .spawn(move || {
            if let Err(e) = pump(conn, &tcp, &outer) {
                debug!("TLS proxy ended: {e}");
            }
            let _ = tcp.shutdown(std::net::Shutdown::Both);
            let _ = outer.shutdown(std::net::Shutdown::Both);
        })?;
    Ok((inner, t))
}

/// Plaintext from the peer waiting for the local end, at most this much
/// before the pump stops reading the network.
const PENDING_MAX: usize = 256 * 1024;

fn would_block(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
    )
}

/// Waits for the given interests; returns each fd's `revents`.
fn poll2(
    a: &impl AsRawFd,
    a_ev: libc::c_short,
    b: &impl AsRawFd,
    b_ev: libc::c_short,
) -> io::Result<(libc::c_short, libc::c_short)> {
    let mut fds = [
        libc::pollfd {
            fd: a.as_raw_fd(),
            events: a_ev,
            revents: 0,
        },
        libc::pollfd {
            fd: b.as_raw_fd(),
            events: b_ev,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd structures.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r >= 0 {
            return Ok((fds[0].revents, fds[1].revents));
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Moves the plaintext rustls holds into `pending`. Returns whether the
/// peer has closed its side (close_notify read).
fn drain_plaintext(
    conn: &mut rustls::Connection,
    buf: &mut [u8],
    pending: &mut Vec<u8>,
) -> io::Result<bool> {
    loop {
        match conn.reader().read(buf) {
            Ok(0) => return Ok(true),
            Ok(n) => pending.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
            Err(e) => return Err(e),
        }
    }
}

/// Moves bytes both ways without ever blocking on one direction: a pump that
/// blocks writing to the network while the peer blocks writing its replies
/// to us would deadlock both. Each direction closes on its own: the local
/// end's EOF becomes a close_notify, the peer's close_notify (or EOF) the
/// local end's EOF, and the pump ends when both have closed.
fn pump(
    mut conn: rustls::Connection,
    mut tcp: &TcpStream,
    mut local: &UnixStream,
) -> io::Result<()> {
    tcp.set_nonblocking(true)?;
    local.set_nonblocking(true)?;
    // Local reads are gated on the TLS output having drained instead.
    conn.set_buffer_limit(None);
    let mut buf = vec![0u8; 64 * 1024];
    let mut pending: Vec<u8> = Vec::new();
    // The session may arrive with records already read from the socket, or
    // plaintext already decrypted, by whoever used it before: poll() below
    // reports only what is still in the socket, so hand that on now.
    conn.process_new_packets().map_err(io::Error::other)?;
    let mut peer_done = drain_plaintext(&mut conn, &mut buf, &mut pending)?;
    let (mut local_done, mut local_shut) = (false, false);
    loop {
        while conn.wants_write() {
            match conn.write_tls(&mut tcp) {
                Ok(_) => {}
                Err(e) if would_block(&e) => break,
                Err(e) => return Err(e),
            }
        }
        while !pending.is_empty() {
            match local.write(&pending) {
                Ok(n) => drop(pending.drain(..n)),
                Err(e) if would_block(&e) => break,
                Err(e) => return Err(e),
            }
        }
        if peer_done && pending.is_empty() && !local_shut {
            local.shutdown(std::net::Shutdown::Write)?;
            local_shut = true;
        }
        if local_shut && local_done && !conn.wants_write() {
            return Ok(());
        }
        let mut net_ev = 0;
        if !peer_done && pending.len() < PENDING_MAX {
            net_ev |= libc::POLLIN;
        }
        if conn.wants_write() {
            net_ev |= libc::POLLOUT;
        }
        let mut app_ev = 0;
        if !local_done && !conn.wants_write() {
            app_ev |= libc::POLLIN;
        }
        if !pending.is_empty() {
            app_ev |= libc::POLLOUT;
        }
        let (net, app) = poll2(tcp, net_ev, local, app_ev)?;
        // Hang-ups are reported whether asked for or not: act on them
        // rather than spin.
        let hup = libc::POLLHUP | libc::POLLERR;
        if local_done && app & hup != 0 {
            // The local end is gone both ways: nothing more to deliver.
            return Ok(());
        }
        if peer_done && net & hup != 0 && pending.is_empty() {
            return Ok(());
        }
        if !peer_done && net & (libc::POLLIN | hup) != 0 {
            match conn.read_tls(&mut tcp) {
                Ok(0) => peer_done = true,
                Ok(_) => {
                    conn.process_new_packets().map_err(io::Error::other)?;
                    peer_done = drain_plaintext(&mut conn, &mut buf, &mut pending)?;
                }
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(e),
            }
        }
        let local_readable = app & libc::POLLIN != 0 && !conn.wants_write();
        if !local_done && (local_readable || app & hup != 0) {
            match local.read(&mut buf) {
                Ok(0) => {
                    conn.send_close_notify();
                    local_done = true;
                }
                Ok(n) => conn.writer().write_all(&buf[..n])?,
                Err(e) if would_block(&e) => {}
                Err(e) => return Err(e),
            }
        }
    }
}
