//! `enbd-client connect`: negotiate, configure the device, hand in sockets,
//! then leave a guardian and helper resident (see `daemon.rs`).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use enbd_core::uapi::{self, Config, DevState, MAX_BLOCK_SIZE, MIN_BLOCK_SIZE};
use enbd_core::wire::tx;
use tracing::warn;

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
        match self {
            Stream::Tcp(s) => s.set_read_timeout(None),
            Stream::Unix(s) => s.set_read_timeout(None),
        }
    }
}

/// Connects to `t` and negotiates `export`.
pub fn open_channel(t: &Target, export: &str, timeout: Duration) -> Result<(Stream, ExportInfo)> {
    let mut s = Stream::connect(t, timeout)?;
    let nz = negotiate::greet(&mut s).with_context(|| format!("handshake with {t}"))?;
    let info = negotiate::go(&mut s, export, nz).with_context(|| format!("handshake with {t}"))?;
    s.clear_timeouts()?;
    Ok((s, info))
}

/// The device configuration that follows from the negotiation.
pub fn device_config(info: &ExportInfo, server: &str, export: &str) -> Result<Config> {
    let (min, _pref, max) = info.block_sizes.unwrap_or((1, 4096, 0));
    if min > MAX_BLOCK_SIZE {
        bail!("server requires {min}-byte blocks; Linux supports at most {MAX_BLOCK_SIZE}");
    }
    let block_size = min.max(MIN_BLOCK_SIZE);
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
        max_payload: if max == u32::MAX { 0 } else { max },
        server: uapi::name_field(server.as_bytes()),
        export: uapi::name_field(export.as_bytes()),
        ..Config::default()
    };
    cfg.validate()
        .map_err(|e| anyhow::anyhow!("server's export cannot be used: {e}"))?;
    Ok(cfg)
}

/// Options of `connect`.
pub struct ConnectOpts {
    pub device: PathBuf,
    pub targets: Vec<Target>,
    pub export: String,
    pub channels: u32,
    pub timeout: Duration,
    pub retry_max: Duration,
    pub foreground: bool,
    pub log: Option<PathBuf>,
}

pub fn run(o: ConnectOpts) -> Result<()> {
    if o.channels == 0 {
        bail!("--channels must be at least 1");
    }
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
    for i in 0..o.channels as usize {
        let t = &o.targets[i % o.targets.len()];
        let (s, info) = open_channel(t, &o.export, o.timeout)?;
        if let Some(f) = &first {
            if f.size != info.size || f.flags != info.flags {
                bail!(
                    "{t} offers export '{}' with a different size or flags than {}",
                    o.export,
                    o.targets[0]
                );
            }
        } else {
            first = Some(info);
        }
        streams.push(s);
    }
    let info = first.context("no channel")?;
    if o.channels > 1 && info.flags & tx::CAN_MULTI_CONN == 0 {
        warn!("the server does not promise consistency across connections (no CAN_MULTI_CONN)");
    }
    let server = o.targets[0].to_string();
    let cfg = dev.configure(&device_config(&info, &server, &o.export)?)?;
    let state = State {
        device: o.device.clone(),
        targets: o.targets.clone(),
        export: o.export.clone(),
        channels: o.channels,
        timeout: o.timeout,
        retry_max: o.retry_max,
        size: info.size,
        flags: info.flags,
        token: cfg.token,
    };
    if let Err(e) = state.save() {
        let _ = dev.eject();
        return Err(e);
    }
    for s in &streams {
        if let Err(e) = dev.add_sock(s.as_raw_fd(), &cfg.token) {
            let _ = dev.eject();
            return Err(e.into());
        }
    }
    drop(streams);
    drop(dev);
    println!(
        "{}: connected to {} export '{}', {} bytes, {} channel(s)",
        o.device.display(),
        server,
        o.export,
        cfg.size,
        o.channels
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
        state.export,
        st.channels,
        state.channels
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
}
