//! enbd-server: an NBD server (fixed newstyle) for files and block devices.

mod backend;
mod export;
mod handshake;
mod link;
#[cfg(test)]
mod testutil;
mod transmission;

use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use tracing::{info, warn};

use export::{ExportSpec, Exports};
use handshake::{TlsMode, TlsPolicy};
use link::Link;

#[derive(Parser)]
#[command(
    name = "enbd-server",
    version,
    about = "Serve files and block devices over the NBD protocol",
    long_about = "Serves one or more named exports over the NBD fixed newstyle protocol, \
                  to enbd-client, Linux nbd-client, qemu and libnbd tools. The first export \
                  is also the default one (empty name).",
    after_help = "Example:\n  enbd-server --export disk=/srv/disk.img --export iso=/srv/x.iso,ro --listen 0.0.0.0:10809"
)]
struct Cli {
    /// An export: NAME=PATH[,ro][,desc=TEXT]. PATH is a regular file or a
    /// block device. Repeat for more exports.
    #[arg(short, long = "export", value_name = "SPEC", required = true)]
    exports: Vec<ExportSpec>,
    /// TCP address to listen on.
    #[arg(short, long, default_value = "0.0.0.0:10809", value_name = "ADDR")]
    listen: String,
    /// Also (or, with --no-tcp, only) listen on this unix socket.
    #[arg(long, value_name = "PATH")]
    unix: Option<PathBuf>,
    /// Do not listen on TCP.
    #[arg(long, requires = "unix")]
    no_tcp: bool,
    /// Worker threads per connection.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    workers: u16,
    /// Most connections served at once; more are refused.
    #[arg(long, default_value_t = 256)]
    max_connections: usize,
    /// TLS policy for TCP clients: off, allow (STARTTLS optional) or
    /// require (plaintext clients get NBD_REP_ERR_TLS_REQD). Defaults to
    /// require when --tls-cert is given, else off.
    #[arg(long, value_enum)]
    tls: Option<TlsMode>,
    /// Server certificate chain (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Require client certificates signed by this CA (PEM): mutual TLS.
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
}

struct Shared {
    exports: Exports,
    tls: TlsPolicy,
    /// Connections whose TLS session is in the kernel; on SIGTERM each gets
    /// a close_notify.
    ktls_fds: std::sync::Mutex<Vec<std::os::fd::RawFd>>,
    workers: usize,
    max_connections: usize,
    active: AtomicUsize,
}

/// Moves a TLS session into the kernel (or, failing that, behind a proxy
/// thread) and serves the connection in plaintext from there on.
fn serve_tls(
    tls: rustls::StreamOwned<rustls::ServerConnection, TcpStream>,
    export: Arc<export::Export>,
    shared: &Shared,
    peer: &str,
) -> std::io::Result<transmission::ConnStats> {
    let rustls::StreamOwned { conn, sock } = tls;
    let fd = sock.as_raw_fd();
    match enbd_tls::ktls::attach_ulp(fd) {
        Ok(()) => {
            enbd_tls::ktls::install(fd, rustls::Connection::Server(conn))
                .map_err(std::io::Error::other)?;
            let mut sock = sock;
            shared.lock_ktls().push(fd);
            let r = transmission::serve(&mut sock, fd, export, shared.workers);
            shared.lock_ktls().retain(|&f| f != fd);
            r
        }
        Err(e) => {
            warn!(%peer, "{e}; serving this connection through a userspace TLS proxy");
            // Write fencing watches the TCP socket itself for the client's
            // hang-up: the proxy may still hold requests sent before it. The
            // duplicate keeps the descriptor valid until serving ends.
            let watch = sock.try_clone()?;
            let (mut inner, _pump) =
                enbd_tls::proxy::spawn(rustls::Connection::Server(conn), sock)?;
            let fd = inner.as_raw_fd();
            transmission::serve_watching(&mut inner, fd, watch.as_raw_fd(), export, shared.workers)
        }
    }
}

fn handle(mut s: Link, peer: String, shared: Arc<Shared>) {
    let export = match handshake::run(&mut s, &shared.exports, &shared.tls) {
        Ok(handshake::Outcome::Transmission(e)) => e,
        Ok(handshake::Outcome::Closed) => {
            info!(%peer, "handshake ended without an export");
            return;
        }
        Err(e) => {
            warn!(%peer, "handshake failed: {e}");
            return;
        }
    };
    info!(%peer, export = export.name(), tls = s.is_tls(), "serving");
    let served = match s {
        Link::Tcp(mut t) => {
            let fd = t.as_raw_fd();
            transmission::serve(&mut t, fd, export, shared.workers)
        }
        Link::Unix(mut u) => {
            let fd = u.as_raw_fd();
            transmission::serve(&mut u, fd, export, shared.workers)
        }
        Link::Tls(t) => serve_tls(*t, export, &shared, &peer),
        Link::Upgrading => return,
    };
    match served {
        Ok(st) => info!(
            %peer,
            requests = st.requests,
            refused = st.errors,
            dropped = st.dropped,
            "disconnected"
        ),
        Err(e) => warn!(%peer, "connection closed: {e}"),
    }
}

impl Shared {
    fn lock_ktls(&self) -> std::sync::MutexGuard<'_, Vec<std::os::fd::RawFd>> {
        self.ktls_fds.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// On SIGTERM or SIGINT: end every kernel-TLS session with close_notify,
/// so clients see a clean TLS shutdown, then exit.
fn shutdown_on_signal(shared: Arc<Shared>) -> Result<()> {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    std::thread::spawn(move || loop {
        std::thread::sleep(std::time::Duration::from_millis(100));
        if !stop.load(Ordering::Relaxed) {
            continue;
        }
        let fds = shared.lock_ktls();
        let mut sent = 0;
        let mut held = Vec::new();
        for &fd in fds.iter() {
            if enbd_tls::ktls::send_close_notify(fd).is_ok() {
                sent += 1;
            }
            // SAFETY: the fd is registered only while its connection serves,
            // and the lock held here keeps it from being closed. The dup
            // keeps the socket open when its worker ends, so the peer reads
            // the close_notify and our FIN rather than a reset.
            unsafe {
                held.push(libc::dup(fd));
                libc::shutdown(fd, libc::SHUT_WR);
            }
        }
        drop(fds);
        info!("shutting down: sent TLS close_notify on {sent} connection(s)");
        if sent > 0 {
            // Time for the peers to act on the close_notify; exit resets
            // whatever they still send.
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
        std::process::exit(0);
    });
    Ok(())
}

fn spawn(s: Link, peer: String, shared: &Arc<Shared>) {
    if shared.active.fetch_add(1, Ordering::SeqCst) >= shared.max_connections {
        shared.active.fetch_sub(1, Ordering::SeqCst);
        warn!(%peer, "refused: {} connections already", shared.max_connections);
        return;
    }
    let shared = shared.clone();
    std::thread::spawn(move || {
        handle(s, peer, shared.clone());
        shared.active.fetch_sub(1, Ordering::SeqCst);
    });
}

fn run(cli: Cli) -> Result<()> {
    let exports = Exports::open(&cli.exports)?;
    let config = match (&cli.tls_cert, &cli.tls_key) {
        (Some(cert), Some(key)) => Some(enbd_tls::server_config(
            cert,
            key,
            cli.tls_client_ca.as_deref(),
        )?),
        _ => None,
    };
    let mode = cli.tls.unwrap_or(if config.is_some() {
        TlsMode::Require
    } else {
        TlsMode::Off
    });
    if mode != TlsMode::Off && config.is_none() {
        anyhow::bail!(
            "--tls {} needs --tls-cert and --tls-key",
            if mode == TlsMode::Allow {
                "allow"
            } else {
                "require"
            }
        );
    }
    if mode != TlsMode::Off {
        info!(mode = ?mode, client_auth = cli.tls_client_ca.is_some(), "TLS enabled");
    }
    for e in exports.iter() {
        info!(
            export = e.name(),
            path = %e.backend().path().display(),
            size = e.size(),
            ro = e.backend().read_only(),
            "export ready"
        );
    }
    let shared = Arc::new(Shared {
        exports,
        tls: TlsPolicy { mode, config },
        ktls_fds: std::sync::Mutex::new(Vec::new()),
        workers: usize::from(cli.workers),
        max_connections: cli.max_connections,
        active: AtomicUsize::new(0),
    });
    shutdown_on_signal(shared.clone())?;
    let mut listeners = Vec::new();
    if let Some(path) = cli.unix.clone() {
        let _ = std::fs::remove_file(&path);
        let l = UnixListener::bind(&path)
            .with_context(|| format!("cannot listen on {}", path.display()))?;
        info!(path = %path.display(), "listening");
        let shared = shared.clone();
        listeners.push(std::thread::spawn(move || {
            for s in l.incoming() {
                match s {
                    Ok(s) => spawn(Link::Unix(s), format!("unix:{}", path.display()), &shared),
                    Err(e) => warn!("accept: {e}"),
                }
            }
        }));
    }
    if !cli.no_tcp {
        let l = TcpListener::bind(&cli.listen)
            .with_context(|| format!("cannot listen on {}", cli.listen))?;
        info!(addr = %cli.listen, "listening");
        let shared = shared.clone();
        listeners.push(std::thread::spawn(move || {
            for s in l.incoming() {
                match s {
                    Ok(s) => {
                        let peer = s.peer_addr().map(|a| a.to_string()).unwrap_or_default();
                        let _ = s.set_nodelay(true);
                        spawn(Link::Tcp(s), peer, &shared);
                    }
                    Err(e) => warn!("accept: {e}"),
                }
            }
        }));
    }
    for l in listeners {
        let _ = l.join();
    }
    Ok(())
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ENBD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("enbd-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}
