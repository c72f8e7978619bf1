//! enbd-server: an NBD server (fixed newstyle) for files and block devices.

mod backend;
mod budget;
mod cache;
mod checksum;
mod config;
mod export;
mod handshake;
mod limits;
mod link;
mod listen;
mod proxy;
mod raid;
#[cfg(test)]
mod testutil;
mod transmission;
mod verified;

use std::io::{self, Read};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{CommandFactory, FromArgMatches, Parser};
use tracing::{debug, error, info, warn};

use export::{ExportSpec, Exports};
use handshake::{TlsMode, TlsPolicy};
use limits::{AcceptBackoff, Limits};
use link::{Bare, IdleLimit, Link};

#[derive(Parser)]
#[command(
    name = "enbd-server",
    version,
    about = "Serve files and block devices over the NBD protocol",
    long_about = "Serves one or more named exports over the NBD fixed newstyle protocol, \
                  to enbd-client, Linux nbd-client, qemu and libnbd tools. The first export \
                  is also the default one (empty name).",
    after_help = "Example:\n  enbd-server --export disk=/srv/disk.img --export iso=/srv/x.iso,ro --listen 0.0.0.0:10809",
    // Serving takes the options; a subcommand (`checksum`, `verify`) none.
    subcommand_negates_reqs = true,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// Work on an image's checksums instead of serving.
    #[command(subcommand)]
    command: Option<checksum::Command>,
    /// An export: NAME=PATH, NAME=raid0:PATH,PATH...[,stripe=SIZE] or
    /// NAME=linear:PATH,PATH..., then [,ro][,shared][,desc=TEXT]. A PATH is
    /// a regular file or a block device; `,,` is a literal comma. Repeat
    /// for more exports. A read-only image can be served with the block
    /// checksums `enbd-server checksum` wrote: [,crc[=FILE]][,scrub=SECS].
    #[arg(
        short,
        long = "export",
        value_name = "SPEC",
        required_unless_present_any = ["config", "proxy_exports", "proxy_any"]
    )]
    exports: Vec<ExportSpec>,
    /// A TOML file of exports and options; options given on the command
    /// line win over it. SIGHUP re-reads its exports.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// TCP address to listen on (HOST:PORT, [IPV6]:PORT); repeat for more.
    /// Default: [::]:10809 taking IPv4 clients too, or 0.0.0.0:10809
    /// without IPv6.
    #[arg(short, long, value_name = "ADDR")]
    listen: Vec<String>,
    /// Also (or, with --no-tcp, only) listen on this unix socket. A stale
    /// socket left at PATH is replaced; any other file there is an error.
    #[arg(long, value_name = "PATH")]
    unix: Option<PathBuf>,
    /// Upstream NBD server (HOST:PORT) of the caching proxy; repeat for
    /// more. The proxy serves each --proxy-export from a local cache filled
    /// from the upstream with the shortest round trip, failing over to the
    /// others.
    #[arg(long = "proxy", value_name = "HOST:PORT")]
    proxy_upstreams: Vec<String>,
    /// An export to proxy from the upstreams, read-only, under its
    /// upstream name; repeat for more.
    #[arg(long = "proxy-export", value_name = "NAME", value_parser = parse_proxy_name)]
    proxy_exports: Vec<String>,
    /// Also serve, through the proxy, any other export name a client asks
    /// for that the upstreams have, opened at its first request.
    #[arg(long)]
    proxy_any: bool,
    /// Directory of the proxy's cache files (NAME.cache, NAME.map), kept
    /// across restarts.
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Seconds the proxy waits for an upstream to connect or to answer
    /// before it tries the next one.
    #[arg(long, default_value_t = 5, value_name = "SECS",
          value_parser = clap::value_parser!(u64).range(1..))]
    proxy_timeout: u64,
    /// Allow several --proxy upstreams for an export whose upstreams serve
    /// no checksums (NAME.crc): nothing then tells apart two different
    /// images of one size.
    #[arg(long)]
    proxy_unchecked: bool,
    /// Fill each proxied export's whole cache in the background, fetching
    /// at most RATE bytes a second (K, M, G suffixes).
    #[arg(long, value_name = "RATE", value_parser = budget::parse_size)]
    replicate: Option<u64>,
    /// Do not listen on TCP.
    #[arg(long)]
    no_tcp: bool,
    /// Worker threads per connection.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..=256))]
    workers: u16,
    /// Most connections served at once; more are refused.
    #[arg(long, default_value_t = 256)]
    max_connections: usize,
    /// Most connections served at once from one IP address; more from it
    /// are refused, so one client cannot take every --max-connections
    /// slot. Unix-socket clients are not counted.
    #[arg(long, default_value_t = 16, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    max_connections_per_client: u32,
    /// Seconds a client has for the whole handshake (greeting, options,
    /// STARTTLS and its TLS handshake); one that takes longer is
    /// disconnected. 0: no limit.
    #[arg(long, default_value_t = 30, value_name = "SECS")]
    handshake_timeout: u64,
    /// Seconds a client may send nothing after the handshake before it is
    /// disconnected. Requests still being executed do not count as
    /// activity, so keep this well above the slowest request. 0: no limit.
    #[arg(long, default_value_t = 0, value_name = "SECS")]
    idle_timeout: u64,
    /// Connections still in the handshake at once; a new connection beyond
    /// this evicts the oldest of them. Served connections do not count.
    #[arg(long, default_value_t = 64, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..))]
    max_handshakes: u32,
    /// Request data (WRITE payloads, READ data) the whole server holds at
    /// once; past it, connections stop reading requests until replies go
    /// out. Suffixes K, M, G are powers of 1024. At least
    /// --max-inflight-per-connection.
    #[arg(long, default_value = "1G", value_name = "SIZE", value_parser = budget::parse_size)]
    memory_budget: u64,
    /// The same for one connection; at least 32M, the largest request.
    #[arg(long, default_value = "64M", value_name = "SIZE", value_parser = budget::parse_size)]
    max_inflight_per_connection: u64,
    /// Seconds a reply may make no progress (a client that does not read
    /// its replies) before the connection is dropped, freeing the memory it
    /// holds. 0: no limit.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    send_timeout: u64,
    /// TLS policy for TCP clients: off, allow (STARTTLS optional) or
    /// require (plaintext clients get NBD_REP_ERR_TLS_REQD). Defaults to
    /// require when --tls-cert is given, else off. Unix-socket clients
    /// never use TLS.
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
    /// Swapped whole by a reload; a handshake keeps the set it started with.
    exports: std::sync::RwLock<Arc<Exports>>,
    tls: TlsPolicy,
    /// Connections whose TLS session is in the kernel; on SIGTERM each gets
    /// a close_notify.
    ktls_fds: std::sync::Mutex<Vec<std::os::fd::RawFd>>,
    /// Workers, memory budgets and the send timeout of every connection.
    transmission: transmission::Resources,
    limits: Arc<Limits>,
    handshake_timeout: Option<Duration>,
    idle_timeout: Option<Duration>,
}

/// `n` seconds, where 0 means no limit.
fn secs(n: u64) -> Option<Duration> {
    (n > 0).then(|| Duration::from_secs(n))
}

impl Shared {
    fn new(cli: &Cli) -> Result<Self> {
        // Option errors first: they need no image opened (and locked).
        let tls = tls_policy(cli)?;
        let transmission = resources(cli)?;
        let mut exports = Exports::open(&cli.exports)?;
        if let Some(cfg) = proxy_config(cli)? {
            exports.add_proxied(proxy::open_exports(&cli.proxy_exports, &cfg)?)?;
            if cli.proxy_any {
                exports.set_on_demand(Arc::new(proxy::OnDemand::new(cfg)));
            }
        }
        for e in exports.iter() {
            e.log_ready();
        }
        Ok(Self {
            exports: std::sync::RwLock::new(Arc::new(exports)),
            tls,
            ktls_fds: std::sync::Mutex::new(Vec::new()),
            transmission,
            limits: Arc::new(Limits::new(
                cli.max_connections,
                cli.max_connections_per_client as usize,
                cli.max_handshakes as usize,
            )),
            handshake_timeout: secs(cli.handshake_timeout),
            idle_timeout: secs(cli.idle_timeout),
        })
    }

    /// The exports in force.
    fn exports(&self) -> Arc<Exports> {
        self.exports
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn set_exports(&self, exports: Arc<Exports>) {
        *self.exports.write().unwrap_or_else(|p| p.into_inner()) = exports;
    }

    fn lock_ktls(&self) -> std::sync::MutexGuard<'_, Vec<std::os::fd::RawFd>> {
        self.ktls_fds.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn parse_proxy_name(s: &str) -> Result<String, String> {
    proxy::check_name(s).map(|()| s.to_owned())
}

/// The proxy's settings, when it proxies anything. (Clap checks that the
/// options go together on the command line; this checks them once the
/// config file's are in.)
fn proxy_config(cli: &Cli) -> Result<Option<proxy::ProxyConfig>> {
    if cli.proxy_exports.is_empty() && !cli.proxy_any {
        if !cli.proxy_upstreams.is_empty() {
            anyhow::bail!("--proxy needs --proxy-export or --proxy-any (proxy-export, proxy-any)");
        }
        return Ok(None);
    }
    if cli.proxy_upstreams.is_empty() {
        anyhow::bail!("--proxy-export and --proxy-any need at least one --proxy upstream (proxy)");
    }
    let Some(cache_dir) = cli.cache_dir.clone() else {
        anyhow::bail!("the proxy needs --cache-dir (cache-dir)");
    };
    Ok(Some(proxy::ProxyConfig {
        upstreams: cli.proxy_upstreams.clone(),
        cache_dir,
        timeout: Duration::from_secs(cli.proxy_timeout),
        replicate: cli.replicate,
        unchecked: cli.proxy_unchecked,
    }))
}

/// The memory budgets, checked against each other and the largest request.
fn resources(cli: &Cli) -> Result<transmission::Resources> {
    let (server, conn) = (cli.memory_budget, cli.max_inflight_per_connection);
    let min = u64::from(export::MAX_PAYLOAD);
    if conn < min {
        anyhow::bail!(
            "--max-inflight-per-connection {conn} is below {min} bytes (32M), the largest request"
        );
    }
    if server < conn {
        anyhow::bail!("--memory-budget {server} is below --max-inflight-per-connection {conn}");
    }
    Ok(transmission::Resources {
        workers: usize::from(cli.workers),
        memory: Arc::new(budget::Memory::new(server, transmission::POOL_KEEP)),
        per_connection: conn,
        send_timeout: secs(cli.send_timeout),
    })
}

fn tls_policy(cli: &Cli) -> Result<TlsPolicy> {
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
    Ok(TlsPolicy { mode, config })
}

/// Serves a connection in plaintext, subject to the idle timeout.
fn serve_plain<S: Read + AsRawFd>(
    s: &mut S,
    export: Arc<export::Export>,
    neg: transmission::Negotiated,
    shared: &Shared,
) -> io::Result<transmission::ConnStats> {
    let fd = s.as_raw_fd();
    let mut s = IdleLimit::new(s, shared.idle_timeout);
    transmission::serve(&mut s, fd, export, neg, &shared.transmission)
}

/// Moves a TLS session into the kernel (or, failing that, behind a proxy
/// thread) and serves the connection in plaintext from there on.
fn serve_tls(
    conn: Box<rustls::ServerConnection>,
    mut sock: TcpStream,
    export: Arc<export::Export>,
    neg: transmission::Negotiated,
    shared: &Shared,
    peer: &str,
) -> io::Result<transmission::ConnStats> {
    let fd = sock.as_raw_fd();
    match enbd_tls::ktls::attach_ulp(fd) {
        Ok(()) => {
            enbd_tls::ktls::install(fd, rustls::Connection::Server(*conn))
                .map_err(io::Error::other)?;
            shared.lock_ktls().push(fd);
            let r = serve_plain(&mut sock, export, neg, shared);
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
                enbd_tls::proxy::spawn(rustls::Connection::Server(*conn), sock)?;
            let fd = inner.as_raw_fd();
            let mut inner = IdleLimit::new(&mut inner, shared.idle_timeout);
            transmission::serve_watching(
                &mut inner,
                fd,
                watch.as_raw_fd(),
                export,
                neg,
                &shared.transmission,
            )
        }
    }
}

/// Runs the handshake within the handshake timeout; the export chosen, if
/// any, and what was negotiated for it.
fn negotiate(
    s: &mut Link,
    peer: &str,
    shared: &Shared,
    slot: &limits::Slot,
) -> Option<(Arc<export::Export>, transmission::Negotiated)> {
    s.set_deadline(shared.handshake_timeout.map(|t| Instant::now() + t));
    match handshake::run(s, &shared.exports(), &shared.tls) {
        Ok(handshake::Outcome::Transmission(e, neg)) => Some((e, neg)),
        Ok(handshake::Outcome::Closed) => {
            info!(%peer, "handshake ended without an export");
            None
        }
        Err(e) if e.is_timeout() => {
            let limit = shared.handshake_timeout.unwrap_or_default();
            warn!(%peer, "handshake not done within {} s: disconnected", limit.as_secs());
            None
        }
        // Counted in the accept thread's summary, not one line each.
        Err(_) if slot.evicted() => {
            debug!(%peer, "evicted during the handshake");
            None
        }
        Err(e) => {
            warn!(%peer, "handshake failed: {e}");
            None
        }
    }
}

fn handle(mut s: Link, peer: &str, shared: &Shared, slot: &mut limits::Slot) {
    let Some((export, neg)) = negotiate(&mut s, peer, shared, slot) else {
        return;
    };
    if let Err(e) = slot.established() {
        warn!(%peer, "refused after the handshake: {e}");
        return;
    }
    info!(%peer, export = export.name(), tls = s.is_tls(), structured = neg.structured, "serving");
    let storage = export.clone();
    let served = s.into_bare().and_then(|bare| match bare {
        Bare::Tcp(mut t) => serve_plain(&mut t, export, neg, shared),
        Bare::Unix(mut u) => serve_plain(&mut u, export, neg, shared),
        Bare::Tls(conn, sock) => serve_tls(conn, sock, export, neg, shared, peer),
    });
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
    if let Some(r) = storage.backend().report() {
        info!(%peer, "{r}");
    }
}

/// On SIGTERM or SIGINT: end every kernel-TLS session with close_notify,
/// so clients see a clean TLS shutdown, then exit.
fn shutdown_on_signal(shared: Arc<Shared>) -> Result<()> {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, stop.clone())?;
    }
    let watch = move || loop {
        std::thread::sleep(Duration::from_millis(100));
        if !stop.load(Ordering::Relaxed) {
            continue;
        }
        let fds = shared.lock_ktls();
        let mut sent = 0;
        let mut held = Vec::new();
        for &fd in fds.iter() {
            // Never wait on a peer whose socket is full: one stalled client
            // must not keep the server from exiting (nor the others from
            // their close_notify). The process exits next, so the workers
            // may as well see EAGAIN.
            // SAFETY: the fd is open (registered while its connection serves,
            // and the lock held here keeps it from being closed); F_SETFL only
            // changes its file status flags.
            unsafe {
                let flags = libc::fcntl(fd, libc::F_GETFL);
                if flags >= 0 {
                    libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
                }
            }
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
            std::thread::sleep(Duration::from_secs(1));
        }
        std::process::exit(0);
    };
    std::thread::Builder::new()
        .name("enbd-signals".into())
        .spawn(watch)
        .context("cannot start the signal thread")?;
    Ok(())
}

/// A connection just accepted.
struct Accepted {
    link: Link,
    /// Names the client in the logs.
    peer: String,
    /// What the per-client limit counts; none for unix sockets.
    ip: Option<IpAddr>,
}

/// Serves a connection on its own thread, if the limits let it in.
fn spawn(a: Accepted, shared: &Arc<Shared>) {
    let Accepted { link, peer, ip } = a;
    let sock = match link.try_clone_fd() {
        Ok(fd) => fd,
        Err(e) => {
            warn!(%peer, "refused: {e}");
            return;
        }
    };
    let mut slot = match shared.limits.admit(ip, sock) {
        Ok((slot, evicted)) => {
            if evicted {
                debug!(%peer, "evicted the oldest connection in the handshake");
            }
            if let Some(n) = shared.limits.evictions_to_report(Instant::now()) {
                warn!("{n} connection(s) evicted during the handshake by newer ones (--max-handshakes)");
            }
            slot
        }
        Err(e) => {
            warn!(%peer, "refused: {e}");
            return;
        }
    };
    let name = format!("conn {peer}");
    let (shared, who) = (shared.clone(), peer.clone());
    let started = std::thread::Builder::new().name(name).spawn(move || {
        handle(link, &who, &shared, &mut slot);
    });
    if let Err(e) = started {
        // The closure is dropped: the connection closes, the slot is freed.
        error!(%peer, "refused: cannot start a thread: {e}");
    }
}

fn accept_tcp(l: &TcpListener) -> io::Result<Accepted> {
    let (s, addr) = l.accept()?;
    let _ = s.set_nodelay(true);
    // An IPv4 client on a dual-stack socket is named, and counted, by its
    // IPv4 address.
    let ip = addr.ip().to_canonical();
    Ok(Accepted {
        link: Link::tcp(s),
        peer: std::net::SocketAddr::new(ip, addr.port()).to_string(),
        ip: Some(ip),
    })
}

fn accept_unix(l: &UnixListener, name: &str) -> io::Result<Accepted> {
    let (s, _) = l.accept()?;
    Ok(Accepted {
        link: Link::unix(s),
        peer: name.to_owned(),
        ip: None,
    })
}

/// Accepts connections forever. Errors that concern one connection are
/// skipped; others (out of descriptors or memory) would repeat at once, so
/// they are retried with backoff.
fn accept_loop(mut accept: impl FnMut() -> io::Result<Accepted>, shared: &Arc<Shared>) -> ! {
    let mut backoff = AcceptBackoff::default();
    loop {
        match accept() {
            Ok(a) => {
                backoff.succeeded();
                spawn(a, shared);
            }
            Err(e) if limits::is_transient(&e) => debug!("accept: {e}"),
            Err(e) => {
                let pause = backoff.failed(Instant::now());
                if let Some(n) = pause.report {
                    error!("accept: {e} ({n} failure(s) since the last report); pausing");
                }
                std::thread::sleep(pause.sleep);
            }
        }
    }
}

/// Runs [`accept_loop`] on a thread of its own.
fn listen(
    name: &str,
    accept: impl FnMut() -> io::Result<Accepted> + Send + 'static,
    shared: &Arc<Shared>,
) -> Result<JoinHandle<()>> {
    let shared = shared.clone();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || accept_loop(accept, &shared))
        .with_context(|| format!("cannot start the {name} thread"))
}

/// Clears the way for a unix socket at `path`: a socket left by an earlier
/// run is removed, anything else is kept and is an error.
fn remove_stale_socket(path: &Path) -> Result<()> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the old socket {}", path.display())),
        Ok(_) => anyhow::bail!("refusing to replace {}: not a socket", path.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("cannot inspect {}", path.display())),
    }
}

fn bind_unix(path: &Path) -> Result<UnixListener> {
    remove_stale_socket(path)?;
    UnixListener::bind(path).with_context(|| format!("cannot listen on {}", path.display()))
}

/// Binds what the options ask for: the unix socket, then each TCP address
/// (or the default one).
fn bind_all(cli: &Cli) -> Result<Vec<listen::Listener>> {
    let mut v = Vec::new();
    if let Some(path) = &cli.unix {
        v.push(listen::Listener::Unix(bind_unix(path)?));
    }
    if !cli.no_tcp {
        if cli.listen.is_empty() {
            v.push(listen::Listener::Tcp(listen::bind_default(
                listen::NBD_PORT,
            )?));
        }
        for addr in &cli.listen {
            v.push(listen::Listener::Tcp(listen::bind_tcp(addr)?));
        }
    }
    Ok(v)
}

fn run(mut cli: Cli, matches: &clap::ArgMatches) -> Result<()> {
    // First, while no thread runs: it clears LISTEN_PID and LISTEN_FDS.
    let passed = listen::take_passed()?;
    let hup = config::catch_sighup()?;
    let reloader = config::load_into(&mut cli, matches)?;
    // Checked here rather than by clap: `unix` may come from the file.
    if cli.no_tcp && cli.unix.is_none() && passed.is_none() {
        anyhow::bail!("--no-tcp needs --unix: there would be nothing to listen on");
    }
    let shared = Arc::new(Shared::new(&cli)?);
    match limits::raise_fd_limit() {
        Ok((before, after)) if after > before => {
            info!("open file limit raised from {before} to {after}")
        }
        Ok(_) => {}
        Err(e) => warn!("cannot raise the open file limit: {e}"),
    }
    shutdown_on_signal(shared.clone())?;
    config::reload_on_sighup(hup, reloader, shared.clone())?;
    let sockets = match passed {
        Some(passed) => {
            info!("socket activation: {} socket(s) from systemd", passed.len());
            if !cli.listen.is_empty() || cli.unix.is_some() {
                warn!("socket activation: --listen and --unix are ignored");
            }
            passed
        }
        None => bind_all(&cli)?,
    };
    let mut threads = Vec::new();
    for (i, l) in sockets.into_iter().enumerate() {
        let name = l.describe();
        info!(on = %name, "listening");
        threads.push(match l {
            listen::Listener::Tcp(l) => {
                listen(&format!("enbd-tcp-{i}"), move || accept_tcp(&l), &shared)?
            }
            listen::Listener::Unix(l) => listen(
                &format!("enbd-unix-{i}"),
                move || accept_unix(&l, &name),
                &shared,
            )?,
        });
    }
    for t in threads {
        let _ = t.join();
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
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    if let Some(cmd) = cli.command.take() {
        return match checksum::run(cmd) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(e) => {
                eprintln!("enbd-server: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    match run(cli, &matches) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("enbd-server: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::net::SocketAddr;
    use std::os::unix::net::UnixStream;

    use enbd_core::wire::{handshake as hs, opt, rep, Cmd, GoRequest, Greeting, Request};

    use super::*;
    use crate::testutil::{
        read_option_reply, read_reply, read_rest, send_option, send_request, TempFile, PATIENCE,
    };

    /// A timeout short enough for tests, set on `Shared` directly.
    const SHORT: Duration = Duration::from_millis(300);

    fn cli(args: &[&str], disk: &TempFile) -> Cli {
        let export = format!("disk={}", disk.path().display());
        let argv = ["enbd-server", "--export", &export];
        Cli::try_parse_from(argv.iter().chain(args)).unwrap()
    }

    fn shared(args: &[&str], disk: &TempFile) -> Shared {
        Shared::new(&cli(args, disk)).unwrap()
    }

    /// Serves TCP on an ephemeral port of 127.0.0.1.
    fn serve_tcp(shared: Shared) -> (SocketAddr, Arc<Shared>) {
        let shared = Arc::new(shared);
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        listen("test-tcp", move || accept_tcp(&l), &shared).unwrap();
        (addr, shared)
    }

    fn connect(addr: SocketAddr) -> TcpStream {
        let c = TcpStream::connect(addr).unwrap();
        c.set_read_timeout(Some(PATIENCE)).unwrap();
        c
    }

    /// Whether the server greets a new connection, rather than closing it.
    fn greeted(c: &mut impl Read) -> bool {
        let mut g = [0u8; Greeting::LEN];
        match c.read_exact(&mut g) {
            Ok(()) => true,
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => false,
            Err(e) => panic!("no greeting nor close: {e}"),
        }
    }

    /// Negotiates the default export with GO.
    fn go(c: &mut (impl Read + Write)) {
        assert!(greeted(c));
        let cflags = hs::C_FIXED_NEWSTYLE | hs::C_NO_ZEROES;
        c.write_all(&cflags.to_be_bytes()).unwrap();
        let mut p = [0u8; 6];
        let n = GoRequest::encode(b"", &[], &mut p).unwrap();
        send_option(c, opt::GO, &p[..n]);
        loop {
            match read_option_reply(c).0.reply {
                rep::ACK => return,
                r => assert_eq!(r, rep::INFO, "{}", rep::describe(r)),
            }
        }
    }

    fn flush(c: &mut (impl Read + Write), cookie: u64) {
        send_request(c, Request::new(Cmd::Flush, 0, cookie, 0, 0), &[]);
        let r = read_reply(c);
        assert_eq!((r.cookie, r.error), (cookie, 0));
    }

    /// Waits until every connection has given its slot back.
    fn wait_all_released(shared: &Shared) {
        let start = Instant::now();
        while shared.limits.active() > 0 {
            assert!(start.elapsed() < PATIENCE, "a slot was never released");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// A fresh directory under the temp directory.
    fn temp_dir() -> PathBuf {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let d = std::env::temp_dir().join(format!("enbd-server-main-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn proxy_options_go_together() {
        let parse = |args: &[&str]| {
            let argv = std::iter::once("enbd-server").chain(args.iter().copied());
            Cli::try_parse_from(argv)
        };
        let c = parse(&["--proxy-export", "disk", "--cache-dir", "/tmp/x"]).unwrap();
        let e = format!("{:#}", proxy_config(&c).unwrap_err());
        assert!(e.contains("need at least one --proxy upstream"), "{e}");
        let c = parse(&["--proxy-export", "disk", "--proxy", "h:1"]).unwrap();
        let e = format!("{:#}", proxy_config(&c).unwrap_err());
        assert!(e.contains("needs --cache-dir"), "{e}");
        let c = parse(&["--proxy-any", "--proxy", "h:1", "--cache-dir", "/c"]).unwrap();
        assert!(proxy_config(&c).unwrap().is_some());
        let c = parse(&["--export", "d=/x", "--proxy", "h:1"]).unwrap();
        let e = format!("{:#}", proxy_config(&c).unwrap_err());
        assert!(
            e.contains("--proxy needs --proxy-export or --proxy-any"),
            "{e}"
        );
        assert!(parse(&["--proxy-export", "a/b", "--proxy", "h:1"]).is_err());
        let c = parse(&[
            "--proxy-export",
            "disk",
            "--proxy",
            "h:1",
            "--proxy",
            "g:2",
            "--cache-dir",
            "/c",
            "--replicate",
            "32M",
        ])
        .unwrap();
        let cfg = proxy_config(&c).unwrap().unwrap();
        assert_eq!(cfg.upstreams, ["h:1", "g:2"]);
        assert_eq!(cfg.timeout, Duration::from_secs(5));
        assert_eq!(cfg.replicate, Some(32 << 20));
        assert!(parse(&[]).is_err(), "some export is needed");
    }

    #[test]
    fn connection_limits_have_their_documented_defaults() {
        let disk = TempFile::new(4096, 0);
        let c = cli(&[], &disk);
        assert_eq!(c.max_connections_per_client, 16);
        let s = Shared::new(&c).unwrap();
        assert_eq!(s.handshake_timeout, Some(Duration::from_secs(30)));
        assert_eq!(s.idle_timeout, None);
        drop(s);
        let s = shared(&["--handshake-timeout", "0", "--idle-timeout", "5"], &disk);
        assert_eq!(s.handshake_timeout, None);
        assert_eq!(s.idle_timeout, Some(Duration::from_secs(5)));
        let export = format!("disk={}", disk.path().display());
        let zero = [
            "enbd-server",
            "--export",
            &export,
            "--max-connections-per-client",
            "0",
        ];
        assert!(Cli::try_parse_from(zero).is_err());
    }

    #[test]
    fn memory_budgets_have_their_defaults_and_are_checked() {
        let disk = TempFile::new(4096, 0);
        let c = cli(&[], &disk);
        assert_eq!(
            (
                c.memory_budget,
                c.max_inflight_per_connection,
                c.send_timeout
            ),
            (1 << 30, 64 << 20, 60)
        );
        assert_eq!(c.max_handshakes, 64);
        let s = shared(&["--memory-budget", "512M", "--send-timeout", "0"], &disk);
        assert_eq!(s.transmission.per_connection, 64 << 20);
        assert_eq!(s.transmission.send_timeout, None);
        // The image is locked while a Shared holds it.
        drop(s);
        let s = shared(&["--max-inflight-per-connection", "32M"], &disk);
        assert_eq!(s.transmission.per_connection, 32 << 20);
        drop(s);
        let err = |args: &[&str]| match Shared::new(&cli(args, &disk)) {
            Ok(_) => panic!("{args:?} accepted"),
            Err(e) => e.to_string(),
        };
        // A request of the largest size must fit a connection's budget, and
        // a connection's budget the server's.
        assert!(err(&["--max-inflight-per-connection", "16M"]).contains("the largest request"));
        assert!(err(&["--memory-budget", "32M"]).contains("below --max-inflight"));
        let export = format!("disk={}", disk.path().display());
        for bad in ["12Q", "-1", "", "1.5.5G"] {
            let argv = ["enbd-server", "--export", &export, "--memory-budget", bad];
            assert!(Cli::try_parse_from(argv).is_err(), "{bad:?} parsed");
        }
        let argv = ["enbd-server", "--export", &export, "--max-handshakes", "0"];
        assert!(Cli::try_parse_from(argv).is_err());
    }

    #[test]
    fn subcommands_sit_beside_the_serving_options() {
        let parse = |argv: &[&str]| Cli::try_parse_from(argv);
        let c = parse(&["enbd-server", "checksum", "/a.img", "-o", "/b.crc"]).unwrap();
        assert!(matches!(
            c.command,
            Some(checksum::Command::Checksum { ref image, output: Some(ref o) })
                if image == Path::new("/a.img") && o == Path::new("/b.crc")
        ));
        let c = parse(&["enbd-server", "verify", "/a.img"]).unwrap();
        assert!(matches!(
            c.command,
            Some(checksum::Command::Verify { crc: None, .. })
        ));
        // Serving is as before: no subcommand, and --export required.
        let c = parse(&["enbd-server", "--export", "d=/a.img"]).unwrap();
        assert!(c.command.is_none() && c.exports.len() == 1);
        assert!(parse(&["enbd-server"]).is_err());
        assert!(parse(&["enbd-server", "checksum"]).is_err());
        assert!(parse(&["enbd-server", "--workers", "2", "checksum", "/a.img"]).is_err());
    }

    #[test]
    fn idle_connections_do_not_keep_a_good_client_out() {
        let disk = TempFile::new(4096, 0);
        let args = [
            "--max-handshakes",
            "4",
            "--max-connections",
            "8",
            "--max-connections-per-client",
            "100",
        ];
        let (addr, s) = serve_tcp(shared(&args, &disk));
        // More idle connections than every limit; the per-client limit is
        // set out of the way, as for a flood from many addresses.
        let idle: Vec<TcpStream> = (0..40).map(|_| connect(addr)).collect();
        // Each new one evicts the oldest: the server has closed all but the
        // last few, which it still waits on.
        let start = Instant::now();
        while s.limits.active() > 4 {
            assert!(start.elapsed() < PATIENCE, "idle connections kept");
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut c = connect(addr);
        go(&mut c);
        flush(&mut c, 1);
        assert!(s.limits.handshaking() <= 4);
        drop(idle);
    }

    #[test]
    fn a_stalled_handshake_is_disconnected_and_its_slot_freed() {
        let disk = TempFile::new(4096, 0);
        let mut s = shared(&[], &disk);
        s.handshake_timeout = Some(SHORT);
        let (addr, s) = serve_tcp(s);
        let start = Instant::now();
        let mut c = connect(addr);
        assert!(greeted(&mut c));
        assert!(read_rest(&mut c).is_empty());
        let took = start.elapsed();
        assert!(took >= SHORT && took < SHORT * 4, "closed after {took:?}");
        wait_all_released(&s);
    }

    #[test]
    fn transmission_is_not_bound_by_the_handshake_timeout() {
        let disk = TempFile::new(4096, 0);
        let mut s = shared(&[], &disk);
        s.handshake_timeout = Some(SHORT);
        let (addr, _s) = serve_tcp(s);
        let mut c = connect(addr);
        go(&mut c);
        flush(&mut c, 1);
        std::thread::sleep(SHORT * 2);
        flush(&mut c, 2);
    }

    #[test]
    fn an_idle_client_is_disconnected_but_a_busy_one_is_not() {
        let disk = TempFile::new(4096, 0);
        let mut s = shared(&[], &disk);
        s.idle_timeout = Some(SHORT);
        let (addr, s) = serve_tcp(s);
        let mut c = connect(addr);
        go(&mut c);
        // Busy for twice the limit.
        for cookie in 0..6 {
            std::thread::sleep(SHORT / 3);
            flush(&mut c, cookie);
        }
        // The clock started when the server read the last request.
        let start = Instant::now();
        assert!(read_rest(&mut c).is_empty());
        let took = start.elapsed();
        assert!(
            took >= SHORT / 2 && took < SHORT * 4,
            "closed after {took:?}"
        );
        wait_all_released(&s);
    }

    #[test]
    fn one_address_cannot_take_every_slot() {
        let disk = TempFile::new(4096, 0);
        let (addr, s) = serve_tcp(shared(&["--max-connections-per-client", "2"], &disk));
        let mut a = connect(addr);
        let mut b = connect(addr);
        assert!(greeted(&mut a) && greeted(&mut b));
        let mut c = connect(addr);
        assert!(
            !greeted(&mut c),
            "a third connection from 127.0.0.1 is refused"
        );
        let ip = "127.0.0.1".parse().unwrap();
        assert_eq!((s.limits.active(), s.limits.connections_from(ip)), (2, 2));
        // Once the server has seen one go, its place is free again.
        drop(a);
        let start = Instant::now();
        while !greeted(&mut connect(addr)) {
            assert!(start.elapsed() < PATIENCE, "the slot was never released");
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(b);
        wait_all_released(&s);
        assert_eq!(s.limits.connections_from(ip), 0);
    }

    #[test]
    fn unix_clients_are_not_limited_per_address() {
        let disk = TempFile::new(4096, 0);
        let s = Arc::new(shared(&["--max-connections-per-client", "1"], &disk));
        let dir = temp_dir();
        let path = dir.join("sock");
        let l = bind_unix(&path).unwrap();
        listen("test-unix", move || accept_unix(&l, "unix:test"), &s).unwrap();
        let mut held = Vec::new();
        for _ in 0..3 {
            let mut c = UnixStream::connect(&path).unwrap();
            c.set_read_timeout(Some(PATIENCE)).unwrap();
            assert!(greeted(&mut c));
            held.push(c);
        }
        assert_eq!(s.limits.active(), 3);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_connection_keeps_its_export_across_a_swap_of_the_exports() {
        let disk = TempFile::new(4096, 0);
        let other = TempFile::new(8192, 0);
        let (addr, s) = serve_tcp(shared(&[], &disk));
        let mut old = connect(addr);
        go(&mut old);
        // "disk" removed, "other" the new default.
        let spec: ExportSpec = format!("other={}", other.path().display()).parse().unwrap();
        let next = Exports::open_reusing(&[spec], &s.exports()).unwrap();
        s.set_exports(Arc::new(next));
        assert!(s.exports().find(b"disk").is_none());
        // The old connection still writes to "disk".
        send_request(&mut old, Request::new(Cmd::Write, 0, 7, 0, 4), b"kept");
        assert_eq!(read_reply(&mut old).error, 0);
        flush(&mut old, 8);
        assert_eq!(disk.read(0, 4), b"kept");
        // A new one gets the new default export, whose size it is told.
        let mut new = connect(addr);
        assert!(greeted(&mut new));
        let cflags = hs::C_FIXED_NEWSTYLE | hs::C_NO_ZEROES;
        new.write_all(&cflags.to_be_bytes()).unwrap();
        send_option(&mut new, opt::EXPORT_NAME, b"");
        let mut info = [0u8; 10];
        new.read_exact(&mut info).unwrap();
        assert_eq!(u64::from_be_bytes(info[..8].try_into().unwrap()), 8192);
        flush(&mut new, 9);
        flush(&mut old, 10);
    }

    #[test]
    fn an_ipv4_client_of_the_dual_stack_socket_is_named_by_its_ipv4_address() {
        let l = listen::bind_default(0).unwrap();
        let _c = TcpStream::connect(("127.0.0.1", l.local_addr().unwrap().port())).unwrap();
        let a = accept_tcp(&l).unwrap();
        assert_eq!(a.ip, Some("127.0.0.1".parse().unwrap()));
        assert!(a.peer.starts_with("127.0.0.1:"), "{}", a.peer);
    }

    #[test]
    fn only_a_stale_socket_is_replaced() {
        let dir = temp_dir();
        let sock = dir.join("sock");
        drop(bind_unix(&sock).unwrap());
        assert!(sock.exists(), "a stale socket is left behind");
        drop(bind_unix(&sock).unwrap());
        let file = dir.join("file");
        std::fs::write(&file, "keep").unwrap();
        let link = dir.join("link");
        std::os::unix::fs::symlink(&sock, &link).unwrap();
        for p in [&file, &link, &dir] {
            let e = bind_unix(p).unwrap_err().to_string();
            assert_eq!(
                e,
                format!("refusing to replace {}: not a socket", p.display())
            );
        }
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
        assert!(link.symlink_metadata().is_ok());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
