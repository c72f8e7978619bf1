//! `enbd-client connect`: negotiate, configure the device, hand in sockets,
//! then leave a guardian and helper resident (see `daemon.rs`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use enbd_core::uapi::{self, Config, DevState, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};
use enbd_core::wire::tx;
use tracing::{info, warn};

use crate::daemon::{self, State};
use crate::ioctl::EnbdDev;
use crate::negotiate::{self, ExportInfo};

/// Default NBD port.
pub const DEFAULT_PORT: u16 = 10809;

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Tcp(String),
    Unix(PathBuf),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Tcp(a) => f.write_str(a),
            Target::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl std::str::FromStr for Target {
    type Err = String;

    /// `HOST`, `HOST:PORT`, `[V6]:PORT`, or `unix:/path`.
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("empty unix socket path".into());
            }
            return Ok(Target::Unix(p.into()));
        }
        if s.is_empty() {
            return Err("empty server address".into());
        }
        let with_port = if s.parse::<SocketAddr>().is_ok() {
            s.to_owned()
        } else if s.parse::<std::net::Ipv6Addr>().is_ok() {
            format!("[{s}]:{DEFAULT_PORT}")
        } else if s.starts_with('[')
            || s.rsplit_once(':')
                .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            s.to_owned()
        } else if s.contains(':') {
            return Err(format!("bad port in '{s}'"));
        } else {
            format!("{s}:{DEFAULT_PORT}")
        };
        Ok(Target::Tcp(with_port))
    }
}

/// A connected stream of either kind.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Stream {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match self {
            Stream::Tcp(s) => s.as_raw_fd(),
            Stream::Unix(s) => s.as_raw_fd(),
        }
    }
}

impl Stream {
    /// Connects, with `timeout` for the connection and the handshake.
    pub fn connect(t: &Target, timeout: Duration) -> Result<Self> {
        let s = match t {
            Target::Unix(p) => {
                let s = UnixStream::connect(p).with_context(|| format!("cannot connect to {t}"))?;
                s.set_read_timeout(Some(timeout))?;
                Stream::Unix(s)
            }
            Target::Tcp(a) => {
                let addrs: Vec<SocketAddr> = a
                    .to_socket_addrs()
                    .with_context(|| format!("cannot resolve {a}"))?
                    .collect();
                let mut last = None;
                let mut ok = None;
                for addr in addrs {
                    match TcpStream::connect_timeout(&addr, timeout) {
                        Ok(s) => {
                            ok = Some(s);
                            break;
                        }
                        Err(e) => last = Some(e),
                    }
                }
                let s = match (ok, last) {
                    (Some(s), _) => s,
                    (None, Some(e)) => {
                        return Err(e).with_context(|| format!("cannot connect to {t}"))
                    }
                    (None, None) => bail!("cannot connect to {t}: no address"),
                };
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(timeout))?;
                Stream::Tcp(s)
            }
        };
        Ok(s)
    }

    /// Back to blocking without timeouts, as the kernel expects.
    fn clear_timeouts(&self) -> std::io::Result<()> {
        self.set_timeouts(None)
    }

    /// Read and write timeouts (`None`: block for ever).
    pub fn set_timeouts(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
            Stream::Unix(s) => {
                s.set_read_timeout(t)?;
                s.set_write_timeout(t)
            }
        }
    }
}

/// What to do when the kernel cannot take the TLS session (no kTLS).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Fallback {
    /// Refuse to connect.
    Error,
    /// Keep TLS in a userspace proxy thread of the helper (the data path
    /// then depends on the helper staying alive).
    Proxy,
    /// Always use the userspace proxy, even where kTLS works (to compare
    /// the two, or to test the fallback).
    AlwaysProxy,
}

/// The option's spelling (`error`, `proxy`, `always-proxy`), as clap's
/// `ValueEnum` derives it; the state file keeps the same strings.
impl std::fmt::Display for Fallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use clap::ValueEnum as _;
        let v = self
            .to_possible_value()
            .expect("no Fallback variant is skipped");
        f.write_str(v.get_name())
    }
}

impl std::str::FromStr for Fallback {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        <Self as clap::ValueEnum>::from_str(s, false)
    }
}

/// TLS settings of a connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsOpts {
    pub ca: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// Name to verify the server certificate against; default: the host.
    pub hostname: Option<String>,
    pub fallback: Fallback,
}

impl TlsOpts {
    fn config(&self) -> Result<Arc<rustls::ClientConfig>> {
        let id = match (&self.cert, &self.key) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            (None, None) => None,
            _ => bail!("--cert and --key go together"),
        };
        Ok(enbd_tls::client_config(&self.ca, id)?)
    }
}

/// A negotiated connection; [`Handoff::ready`] makes it one for `IOC_ADD_SOCK`.
pub enum Handoff {
    Plain(Stream),
    /// TCP with the TLS session in the kernel.
    Ktls(TcpStream),
    /// A TLS session that stays in userspace, its proxy thread not started
    /// yet: `connect` only probes with it and forks afterwards, and a thread
    /// does not survive a fork (nor may one run while the process forks).
    Proxy(Box<(rustls::ClientConnection, TcpStream)>),
}

/// A connection ready for `IOC_ADD_SOCK`.
pub enum Ready {
    Plain(Stream),
    Ktls(TcpStream),
    /// Plaintext end of a socketpair; a proxy thread of this process does TLS.
    Proxied(UnixStream),
}

impl Handoff {
    /// Starts the proxy thread of a userspace TLS session, in this process.
    pub fn ready(self) -> Result<Ready> {
        Ok(match self {
            Handoff::Plain(s) => Ready::Plain(s),
            Handoff::Ktls(s) => Ready::Ktls(s),
            Handoff::Proxy(b) => {
                let (conn, sock) = *b;
                let (inner, _pump) = enbd_tls::proxy::spawn(rustls::Connection::Client(conn), sock)
                    .context("cannot start the TLS proxy thread")?;
                Ready::Proxied(inner)
            }
        })
    }

    /// Ends a connection that is not handed in; a TLS session says so
    /// with close_notify.
    pub fn close(self) {
        if let Handoff::Proxy(b) = self {
            let (mut conn, mut sock) = *b;
            conn.send_close_notify();
            while conn.wants_write() && conn.write_tls(&mut sock).is_ok() {}
        }
    }
}

impl Ready {
    pub fn fd(&self) -> std::os::fd::RawFd {
        match self {
            Ready::Plain(s) => s.as_raw_fd(),
            Ready::Ktls(s) => s.as_raw_fd(),
            Ready::Proxied(s) => s.as_raw_fd(),
        }
    }

    /// `SockArg::flags` for this connection.
    pub fn flags(&self) -> u32 {
        match self {
            Ready::Plain(_) => 0,
            Ready::Ktls(_) => uapi::SOCK_KTLS,
            Ready::Proxied(_) => uapi::SOCK_TLS_PROXY,
        }
    }
}

fn host_of(t: &Target) -> String {
    match t {
        Target::Tcp(a) => match a.rsplit_once(':') {
            Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']').to_owned(),
            None => a.clone(),
        },
        Target::Unix(p) => p.display().to_string(),
    }
}

/// STARTTLS, TLS handshake, NBD negotiation over TLS, then the session into
/// the kernel (or a proxy).
fn open_tls_channel(
    t: &Target,
    export: &str,
    timeout: Duration,
    tls: &TlsOpts,
) -> Result<(Handoff, ExportInfo)> {
    let Stream::Tcp(mut tcp) = Stream::connect(t, timeout)? else {
        bail!("TLS needs a TCP server address, not {t}");
    };
    negotiate::greet(&mut tcp).with_context(|| format!("handshake with {t}"))?;
    negotiate::starttls(&mut tcp).with_context(|| format!("handshake with {t}"))?;
    let name = tls.hostname.clone().unwrap_or_else(|| host_of(t));
    let conn = rustls::ClientConnection::new(tls.config()?, enbd_tls::server_name(&name)?)
        .with_context(|| format!("TLS with {t}"))?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn
            .complete_io(&mut s.sock)
            .with_context(|| format!("TLS handshake with {t} (verifying as '{name}')"))?;
    }
    // Fixed newstyle: the option haggling continues inside TLS.
    // A server that wants a client certificate says so only now: TLS 1.3
    // finishes the client's side of the handshake first.
    let info = negotiate::go(&mut s, export, true).with_context(|| {
        let hint = if tls.cert.is_none() {
            " (does the server require a client certificate? see --cert/--key)"
        } else {
            ""
        };
        format!("TLS session with {t} after the handshake{hint}")
    })?;
    let rustls::StreamOwned { conn, sock } = s;
    sock.set_read_timeout(None)?;
    let attached = if tls.fallback == Fallback::AlwaysProxy {
        Err(enbd_tls::ktls::KtlsError::Failed(
            "--tls-fallback always-proxy".into(),
        ))
    } else {
        enbd_tls::ktls::attach_ulp(sock.as_raw_fd())
    };
    match attached {
        Ok(()) => {
            enbd_tls::ktls::install(sock.as_raw_fd(), rustls::Connection::Client(conn))?;
            Ok((Handoff::Ktls(sock), info))
        }
        Err(e) if tls.fallback != Fallback::Error => {
            warn!(
                "{e}; keeping TLS in a userspace proxy: the data path now depends on this helper"
            );
            Ok((Handoff::Proxy(Box::new((conn, sock))), info))
        }
        Err(e) => Err(anyhow::Error::new(e)
            .context("use --tls-fallback proxy to run TLS in userspace instead")),
    }
}

/// Connects to `t` and negotiates `export`, with TLS if `tls` is given.
pub fn open_channel(
    t: &Target,
    export: &str,
    timeout: Duration,
    tls: Option<&TlsOpts>,
) -> Result<(Handoff, ExportInfo)> {
    if let Some(tls) = tls {
        return open_tls_channel(t, export, timeout, tls);
    }
    let mut s = Stream::connect(t, timeout)?;
    let nz = negotiate::greet(&mut s).with_context(|| format!("handshake with {t}"))?;
    let info = negotiate::go(&mut s, export, nz).with_context(|| format!("handshake with {t}"))?;
    s.clear_timeouts()?;
    Ok((Handoff::Plain(s), info))
}

/// The largest minimum block size the NBD spec allows (2^16).
const NBD_MAX_MIN_BLOCK: u32 = 1 << 16;
/// A maximum block size of 0xffffffff means "no inherent limit".
const NBD_NO_MAX: u32 = u32::MAX;
/// The smallest request size limit enbd can give the block layer: one page
/// (4096 bytes on x86; below it `blk_validate_limits` warns).
pub const MIN_MAX_PAYLOAD: u32 = 4096;

/// What the device takes from the server's `NBD_INFO_BLOCK_SIZE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLimits {
    /// Logical block size: the server's minimum, at least 512.
    pub logical: u32,
    /// Largest request payload, a multiple of `logical`; 0 for the kernel's
    /// default (the server announced no limit, or no block sizes at all).
    pub max_payload: u32,
}

/// Checks the server's (minimum, preferred, maximum) block sizes against the
/// NBD spec and against what the Linux block layer can take, and derives
/// the device's limits. Every problem found is named in the error.
pub fn block_limits(sizes: Option<(u32, u32, u32)>, export_size: u64) -> Result<BlockLimits> {
    let Some((min, pref, max)) = sizes else {
        // Spec defaults: minimum 1, preferred 4096, maximum 32 MiB (which
        // is also the kernel's default).
        return Ok(BlockLimits {
            logical: MIN_BLOCK_SIZE,
            max_payload: 0,
        });
    };
    let mut problems: Vec<String> = Vec::new();
    // NBD spec (doc/proto.md, "Block size constraints").
    if !min.is_power_of_two() || min > NBD_MAX_MIN_BLOCK {
        problems.push(format!(
            "minimum block size {min} is not a power of two from 1 to {NBD_MAX_MIN_BLOCK} (NBD spec)"
        ));
    }
    if !pref.is_power_of_two() || pref < min.max(MIN_BLOCK_SIZE) {
        problems.push(format!(
            "preferred block size {pref} is not a power of two of at least {} (NBD spec)",
            min.max(MIN_BLOCK_SIZE)
        ));
    }
    if max != NBD_NO_MAX {
        if min != 0 && max % min != 0 {
            problems.push(format!(
                "maximum block size {max} is not a multiple of the minimum {min} (NBD spec)"
            ));
        }
        // At least the smaller of the preferred block size and the export
        // size.
        let floor = u64::from(pref).min(export_size);
        if u64::from(max) < floor {
            problems.push(format!(
                "maximum block size {max} is below {floor}, the smaller of the preferred block size and the export size (NBD spec)"
            ));
        }
    }
    // What the Linux block layer takes.
    let logical = min.max(MIN_BLOCK_SIZE);
    if min > MAX_BLOCK_SIZE {
        problems.push(format!(
            "minimum block size {min} is above {MAX_BLOCK_SIZE} bytes, the largest logical block size Linux supports"
        ));
    }
    let need = MIN_MAX_PAYLOAD.max(logical);
    // A maximum at or above the export size limits nothing: no request can
    // be longer than the export (the spec has clients treat the export size
    // as the effective maximum then).
    let unlimited = max == NBD_NO_MAX || u64::from(max) >= export_size;
    if max < need && !unlimited {
        problems.push(format!(
            "maximum block size {max} is below {need} bytes, which enbd needs"
        ));
    }
    if !problems.is_empty() {
        bail!(
            "server announces block sizes min={min} preferred={pref} max={max}: {}",
            problems.join("; ")
        );
    }
    Ok(BlockLimits {
        logical,
        max_payload: if max == NBD_NO_MAX || (max < need && unlimited) {
            0
        } else {
            // The spec only makes the maximum a multiple of the minimum; the
            // kernel counts in logical blocks, so round down: still within
            // the server's limit, and still at least `need` (which is a
            // multiple of `logical`).
            max - max % logical
        },
    })
}

/// The device configuration that follows from the negotiation.
pub fn device_config(info: &ExportInfo, server: &str, export: &str) -> Result<Config> {
    let limits = block_limits(info.block_sizes, info.size)?;
    let block_size = limits.logical;
    let size = info.size - info.size % u64::from(block_size);
    if size != info.size {
        warn!(
            "export size {} is not a multiple of {block_size}; the last {} bytes are not accessible",
            info.size,
            info.size - size
        );
    }
    let cfg = Config {
        size,
        nbd_flags: u32::from(info.flags),
        block_size,
        max_payload: limits.max_payload,
        server: uapi::name_field(server.as_bytes()),
        export: uapi::name_field(export.as_bytes()),
        ..Config::default()
    };
    cfg.validate()
        .map_err(|e| anyhow::anyhow!("server's export cannot be used: {e}"))?;
    Ok(cfg)
}

/// What `connect` says about several channels to a server without
/// `NBD_FLAG_CAN_MULTI_CONN`: the kernel then sends requests on one channel
/// at a time and keeps the others connected as warm reserves.
fn multi_conn_note(channels: u32, flags: u16) -> Option<String> {
    (channels > 1 && flags & tx::CAN_MULTI_CONN == 0).then(|| {
        format!(
            "server lacks CAN_MULTI_CONN: 1 active channel, {} warm reserve{}",
            channels - 1,
            if channels == 2 { "" } else { "s" }
        )
    })
}

/// Where and how a device's channels connect: given to `connect`, and kept
/// in the state file for the helper that re-attaches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    pub targets: Vec<Target>,
    pub export: String,
    pub channels: u32,
    /// For connecting and negotiating each channel.
    pub timeout: Duration,
    /// Longest wait between reconnection attempts.
    pub retry_max: Duration,
    pub tls: Option<TlsOpts>,
    /// Several servers share one writable backend (the user says so).
    pub shared_backend: bool,
    /// Longest interval between probe rounds of several servers.
    pub probe_max: Duration,
}

/// Options of `connect`.
pub struct ConnectOpts {
    pub device: PathBuf,
    pub session: Session,
    pub foreground: bool,
    pub log: Option<PathBuf>,
}

pub fn run(o: ConnectOpts) -> Result<()> {
    if let Some(tls) = &o.session.tls {
        // Bad certificate files fail here, before anything connects.
        tls.config()?;
    }
    if o.session.channels == 0 {
        bail!("--channels must be at least 1");
    }
    let n = o.session.targets.len();
    if n > uapi::MAX_SERVERS {
        bail!("at most {} servers per device", uapi::MAX_SERVERS);
    }
    for (i, t) in o.session.targets.iter().enumerate() {
        if o.session.targets[..i].contains(t) {
            bail!("server {t} is given twice");
        }
    }
    let mut session = o.session.clone();
    if session.channels < n as u32 {
        info!(
            "{n} servers: opening {n} channels, one to each (--channels {})",
            session.channels
        );
        session.channels = n as u32;
    }
    let o = ConnectOpts { session, ..o };
    let dev = EnbdDev::open(&o.device)?;
    let st = dev.status()?;
    if DevState::from_u32(st.state) != Some(DevState::Unconfigured) {
        bail!(
            "{}: already connected (disconnect it first)",
            o.device.display()
        );
    }
    let mut streams = Vec::new();
    let mut first: Option<ExportInfo> = None;
    for i in 0..o.session.channels as usize {
        let t = &o.session.targets[i % o.session.targets.len()];
        let (s, info) = open_channel(
            t,
            &o.session.export,
            o.session.timeout,
            o.session.tls.as_ref(),
        )?;
        if let Some(f) = &first {
            if f.size != info.size || f.flags != info.flags {
                bail!(
                    "{t} offers export '{}' with a different size or flags than {}",
                    o.session.export,
                    o.session.targets[0]
                );
            }
        } else {
            first = Some(info);
        }
        streams.push(s);
    }
    let info = first.context("no channel")?;
    if n > 1 && info.flags & tx::READ_ONLY == 0 && !o.session.shared_backend {
        bail!(
            "export '{}' is writable: several servers may serve it only if they share one \
             backend (say so with --shared-backend); replicas of an image must be read-only",
            o.session.export
        );
    }
    if n == 1 {
        if let Some(msg) = multi_conn_note(o.session.channels, info.flags) {
            info!("{msg}");
        }
    }
    let server = o.session.targets[0].to_string();
    let cfg = dev.configure(&device_config(&info, &server, &o.session.export)?)?;
    let state = State {
        device: o.device.clone(),
        session: o.session.clone(),
        size: info.size,
        flags: info.flags,
        token: cfg.token,
    };
    if let Err(e) = state.save() {
        let _ = dev.eject();
        return Err(e);
    }
    let mut proxied = 0;
    for (i, s) in streams.into_iter().enumerate() {
        if matches!(s, Handoff::Proxy(_)) {
            // Its proxy thread would not survive the fork into the
            // background; the helper opens these channels itself.
            proxied += 1;
            s.close();
            continue;
        }
        let added = s
            .ready()
            .and_then(|s| Ok(dev.add_sock(s.fd(), s.flags(), i % n, &cfg.token)?));
        if let Err(e) = added {
            let _ = dev.eject();
            return Err(e);
        }
    }
    if n > 1 {
        // Every channel carries until the helper's first probe round.
        let arg = crate::replicas::View::new(n).servers_arg(&o.session.targets, cfg.token);
        if let Err(e) = dev.set_servers(&arg) {
            let _ = dev.eject();
            return Err(e.into());
        }
    }
    if proxied > 0 {
        println!(
            "{}: {proxied} TLS proxy channel(s) will be opened by the helper",
            o.device.display()
        );
    }
    drop(dev);
    let servers: Vec<String> = o.session.targets.iter().map(ToString::to_string).collect();
    println!(
        "{}: connected to {} export '{}', {} bytes, {} channel(s)",
        o.device.display(),
        servers.join(" "),
        o.session.export,
        cfg.size,
        o.session.channels
    );
    if !o.foreground {
        daemon::daemonize(o.log.as_deref())?;
    }
    daemon::guardian(&o.device)
}

/// `attach`: puts a guardian and helper back on a device that is still
/// connected (for example after the guardian itself was killed).
pub fn attach(device: &Path, foreground: bool, log: Option<&Path>) -> Result<()> {
    let state = State::load(device)?;
    let st = EnbdDev::open(device)?.status()?;
    if DevState::from_u32(st.state) == Some(DevState::Unconfigured) {
        bail!("{}: not connected", device.display());
    }
    println!(
        "{}: attaching to export '{}' ({} of {} channel(s) up)",
        device.display(),
        state.session.export,
        st.channels,
        state.session.channels
    );
    if !foreground {
        daemon::daemonize(log)?;
    }
    daemon::guardian(device)
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse() {
        let t = |s: &str| s.parse::<Target>();
        assert_eq!(t("10.0.0.1"), Ok(Target::Tcp("10.0.0.1:10809".into())));
        assert_eq!(t("10.0.0.1:99"), Ok(Target::Tcp("10.0.0.1:99".into())));
        assert_eq!(t("::1"), Ok(Target::Tcp("[::1]:10809".into())));
        assert_eq!(t("[::1]:5"), Ok(Target::Tcp("[::1]:5".into())));
        assert_eq!(t("server"), Ok(Target::Tcp("server:10809".into())));
        assert_eq!(
            t("unix:/run/x.sock"),
            Ok(Target::Unix("/run/x.sock".into()))
        );
        assert!(t("host:port").is_err());
        assert!(t("").is_err());
    }

    #[test]
    fn config_from_negotiation() {
        let info = ExportInfo {
            size: 1_000_000,
            flags: tx::HAS_FLAGS | tx::SEND_FLUSH,
            block_sizes: Some((1, 4096, 1 << 20)),
        };
        let c = device_config(&info, "h:1", "e").unwrap();
        assert_eq!(c.block_size, 512);
        assert_eq!(c.size, 1_000_000 - 1_000_000 % 512);
        assert_eq!(c.max_payload, 1 << 20);
        let big = ExportInfo {
            block_sizes: Some((8192, 8192, 1 << 20)),
            ..info
        };
        assert!(device_config(&big, "h", "e").is_err());
    }

    fn limits(min: u32, pref: u32, max: u32) -> Result<BlockLimits> {
        block_limits(Some((min, pref, max)), 1 << 30)
    }

    fn refusal(min: u32, pref: u32, max: u32) -> String {
        format!("{:#}", limits(min, pref, max).unwrap_err())
    }

    #[test]
    fn block_sizes_that_work() {
        let l = |logical, max_payload| BlockLimits {
            logical,
            max_payload,
        };
        // No NBD_INFO_BLOCK_SIZE: 512-byte blocks, the kernel's default limit.
        assert_eq!(block_limits(None, 1 << 30).unwrap(), l(512, 0));
        // enbd-server, nbdkit, qemu-nbd.
        assert_eq!(limits(1, 4096, 32 << 20).unwrap(), l(512, 32 << 20));
        assert_eq!(limits(512, 4096, 32 << 20).unwrap(), l(512, 32 << 20));
        // The server's minimum is the logical block size.
        assert_eq!(limits(4096, 4096, 1 << 20).unwrap(), l(4096, 1 << 20));
        assert_eq!(limits(1024, 1024, 8192).unwrap(), l(1024, 8192));
        // No limit.
        assert_eq!(limits(1, 512, u32::MAX).unwrap(), l(512, 0));
        // A maximum that is no multiple of the logical block size is rounded
        // down to one.
        assert_eq!(limits(1, 4096, 5000).unwrap(), l(512, 4608));
        // A maximum at least the export size limits nothing, however small.
        assert_eq!(
            block_limits(Some((512, 512, 1024)), 1024).unwrap(),
            l(512, 0)
        );
        // The maximum needs only reach the export size when that is below
        // the preferred block size.
        assert_eq!(
            block_limits(Some((512, 65536, 16384)), 8192).unwrap(),
            l(512, 16384)
        );
    }

    #[test]
    fn block_sizes_that_are_refused() {
        assert_eq!(
            refusal(1, 1, 512),
            "server announces block sizes min=1 preferred=1 max=512: \
             preferred block size 1 is not a power of two of at least 512 (NBD spec); \
             maximum block size 512 is below 4096 bytes, which enbd needs"
        );
        assert_eq!(
            refusal(1, 512, 512),
            "server announces block sizes min=1 preferred=512 max=512: \
             maximum block size 512 is below 4096 bytes, which enbd needs"
        );
        assert_eq!(
            refusal(8192, 8192, 1 << 20),
            "server announces block sizes min=8192 preferred=8192 max=1048576: \
             minimum block size 8192 is above 4096 bytes, the largest logical block size Linux supports"
        );
        assert!(refusal(0, 4096, 1 << 20).contains("minimum block size 0 is not a power of two"));
        assert!(refusal(3, 4096, 3 << 20).contains("minimum block size 3 is not a power of two"));
        assert!(refusal(1 << 17, 1 << 17, 1 << 20)
            .contains("minimum block size 131072 is not a power of two from 1 to 65536"));
        assert!(refusal(512, 3000, 1 << 20)
            .contains("preferred block size 3000 is not a power of two of at least 512"));
        assert!(refusal(2048, 1024, 1 << 20)
            .contains("preferred block size 1024 is not a power of two of at least 2048"));
        assert!(refusal(1024, 4096, 5000)
            .contains("maximum block size 5000 is not a multiple of the minimum 1024"));
        assert!(refusal(512, 65536, 8192).contains(
            "maximum block size 8192 is below 65536, the smaller of the preferred block size and the export size"
        ));
        assert!(refusal(1, 4096, 0).contains("maximum block size 0 is below"));
    }

    #[test]
    fn refused_block_sizes_fail_device_config() {
        let info = ExportInfo {
            size: 1 << 20,
            flags: tx::HAS_FLAGS,
            block_sizes: Some((1, 1, 512)),
        };
        let e = format!("{:#}", device_config(&info, "h", "e").unwrap_err());
        assert!(e.contains("which enbd needs"), "{e}");
        let info = ExportInfo {
            block_sizes: Some((4096, 4096, 1 << 20)),
            size: 10_000,
            ..info
        };
        let c = device_config(&info, "h", "e").unwrap();
        assert_eq!((c.block_size, c.size, c.max_payload), (4096, 8192, 1 << 20));
    }

    #[test]
    fn multi_conn_note() {
        assert_eq!(super::multi_conn_note(1, tx::HAS_FLAGS), None);
        assert_eq!(
            super::multi_conn_note(4, tx::HAS_FLAGS | tx::CAN_MULTI_CONN),
            None
        );
        assert_eq!(
            super::multi_conn_note(2, tx::HAS_FLAGS).as_deref(),
            Some("server lacks CAN_MULTI_CONN: 1 active channel, 1 warm reserve")
        );
        assert_eq!(
            super::multi_conn_note(4, tx::HAS_FLAGS).as_deref(),
            Some("server lacks CAN_MULTI_CONN: 1 active channel, 3 warm reserves")
        );
    }

    #[test]
    fn fallback_names_are_the_option_values() {
        use clap::ValueEnum as _;
        let names: Vec<String> = Fallback::value_variants()
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(names, ["error", "proxy", "always-proxy"]);
        for f in Fallback::value_variants() {
            assert_eq!(f.to_string().parse::<Fallback>(), Ok(*f));
        }
        assert!("Proxy".parse::<Fallback>().is_err());
    }
}
