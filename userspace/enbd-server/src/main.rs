//! enbd-server: an NBD server (fixed newstyle) for files and block devices.

mod backend;
mod export;
mod handshake;
mod transmission;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Parser;
use tracing::{info, warn};

use export::{ExportSpec, Exports};

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
}

struct Shared {
    exports: Exports,
    workers: usize,
    max_connections: usize,
    active: AtomicUsize,
}

/// A client connection of either kind.
trait Conn: Read + Write + AsRawFd + Send + 'static {}
impl Conn for TcpStream {}
impl Conn for UnixStream {}

fn handle(mut s: impl Conn, peer: String, shared: Arc<Shared>) {
    let export = match handshake::run(&mut s, &shared.exports) {
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
    info!(%peer, export = export.name(), "serving");
    let fd = s.as_raw_fd();
    match transmission::serve(&mut s, fd, export, shared.workers) {
        Ok(st) => info!(%peer, requests = st.requests, refused = st.errors, "disconnected"),
        Err(e) => warn!(%peer, "connection closed: {e}"),
    }
}

fn spawn(s: impl Conn, peer: String, shared: &Arc<Shared>) {
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
        workers: usize::from(cli.workers),
        max_connections: cli.max_connections,
        active: AtomicUsize::new(0),
    });
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
                    Ok(s) => spawn(s, format!("unix:{}", path.display()), &shared),
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
                        spawn(s, peer, &shared);
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
