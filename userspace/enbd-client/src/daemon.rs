//! The resident part of enbd-client: the guardian and the helper it keeps
//! alive.
//!
//! The **helper** watches its device (`IOC_WAIT`), reconnects channels that
//! died with exponential backoff, renegotiates and hands the new sockets in
//! with the device's token; SIGTERM disconnects cleanly, SIGUSR2 ejects.
//! The **guardian** is its parent: when the helper dies for any other
//! reason (even `kill -9`), it starts a new one, which re-attaches to the
//! device using the token kept in a root-only runtime file. The kernel keeps
//! the sockets, so I/O does not notice either death.

use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use enbd_core::replica::{self, PROBE_MAX_MS};
use enbd_core::uapi::{DevState, TOKEN_LEN};
use tracing::{error, info, warn};

use crate::connect::{open_channel, Fallback, Session, Target, TlsOpts};
use crate::ioctl::{EnbdDev, IoctlError};
use crate::replicas::{ProberCtl, View};

/// Where runtime files live; `ENBD_RUN_DIR` overrides it.
pub fn run_dir() -> PathBuf {
    std::env::var_os("ENBD_RUN_DIR").map_or_else(|| PathBuf::from("/run/enbd"), PathBuf::from)
}

/// What a helper needs to re-attach to a device: kept in
/// `/run/enbd/<dev>.state`, mode 0600, because the token is a secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub device: PathBuf,
    pub session: Session,
    pub size: u64,
    pub flags: u16,
    pub token: [u8; TOKEN_LEN],
}

fn dev_name(device: &Path) -> String {
    device
        .file_name()
        .map_or_else(|| "enbd".into(), |n| n.to_string_lossy().into_owned())
}

pub fn state_path(device: &Path) -> PathBuf {
    run_dir().join(format!("{}.state", dev_name(device)))
}

pub fn pid_path(device: &Path, guardian: bool) -> PathBuf {
    let suffix = if guardian { ".guardian.pid" } else { ".pid" };
    run_dir().join(format!("{}{suffix}", dev_name(device)))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; TOKEN_LEN]> {
    let mut out = [0u8; TOKEN_LEN];
    if s.len() != TOKEN_LEN * 2 {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

impl State {
    fn render(&self) -> String {
        let targets: Vec<String> = self
            .session
            .targets
            .iter()
            .map(ToString::to_string)
            .collect();
        let mut s = format!(
            "device={}\ntargets={}\nexport={}\nchannels={}\ntimeout_ms={}\nretry_max_ms={}\nshared_backend={}\nprobe_max_ms={}\nsize={}\nflags={}\ntoken={}\n",
            self.device.display(),
            targets.join(" "),
            self.session.export,
            self.session.channels,
            self.session.timeout.as_millis(),
            self.session.retry_max.as_millis(),
            u8::from(self.session.shared_backend),
            self.session.probe_max.as_millis(),
            self.size,
            self.flags,
            hex(&self.token)
        );
        if let Some(t) = &self.session.tls {
            let p = |o: &Option<PathBuf>| {
                o.as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            };
            s += &format!(
                "tls_ca={}\ntls_cert={}\ntls_key={}\ntls_hostname={}\ntls_fallback={}\n",
                t.ca.display(),
                p(&t.cert),
                p(&t.key),
                t.hostname.clone().unwrap_or_default(),
                t.fallback
            );
        }
        s
    }

    fn parse(text: &str) -> Result<Self> {
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k).and_then(|r| r.strip_prefix('=')))
                .ok_or_else(|| anyhow!("state file lacks {k}"))
        };
        let num = |k: &str| -> Result<u64> { get(k)?.parse().with_context(|| format!("bad {k}")) };
        let targets = get("targets")?
            .split_whitespace()
            .map(|t| t.parse::<Target>().map_err(|e| anyhow!(e)))
            .collect::<Result<Vec<_>>>()?;
        if targets.is_empty() {
            bail!("state file lists no server");
        }
        let opt = |k: &str| get(k).ok().filter(|v| !v.is_empty()).map(str::to_owned);
        let tls = match opt("tls_ca") {
            None => None,
            Some(ca) => Some(TlsOpts {
                ca: ca.into(),
                cert: opt("tls_cert").map(Into::into),
                key: opt("tls_key").map(Into::into),
                hostname: opt("tls_hostname"),
                fallback: match opt("tls_fallback") {
                    Some(f) => f
                        .parse()
                        .map_err(|e: String| anyhow!("bad tls_fallback: {e}"))?,
                    None => Fallback::Error,
                },
            }),
        };
        Ok(Self {
            device: get("device")?.into(),
            session: Session {
                targets,
                export: get("export")?.to_owned(),
                channels: u32::try_from(num("channels")?)?,
                timeout: Duration::from_millis(num("timeout_ms")?),
                retry_max: Duration::from_millis(num("retry_max_ms")?),
                tls,
                // Absent from the state files of older helpers.
                shared_backend: num("shared_backend").is_ok_and(|v| v == 1),
                probe_max: Duration::from_millis(
                    num("probe_max_ms").unwrap_or(u64::from(PROBE_MAX_MS)),
                ),
            },
            size: num("size")?,
            flags: u16::try_from(num("flags")?)?,
            token: unhex(get("token")?).context("bad token")?,
        })
    }

    /// Writes the state file, readable by root only.
    pub fn save(&self) -> Result<()> {
        let dir = run_dir();
        fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))?;
        let path = state_path(&self.device);
        let tmp = path.with_extension("tmp");
        let mut f = fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(self.render().as_bytes())?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        Ok(())
    }

    pub fn load(device: &Path) -> Result<Self> {
        let path = state_path(device);
        let text = fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read {} (was the device connected by enbd-client?)",
                path.display()
            )
        })?;
        Self::parse(&text).with_context(|| format!("{}", path.display()))
    }

    fn remove(device: &Path) {
        let _ = fs::remove_file(state_path(device));
    }
}

fn write_pid(device: &Path, guardian: bool) {
    let _ = fs::create_dir_all(run_dir());
    let _ = fs::write(
        pid_path(device, guardian),
        format!("{}\n", std::process::id()),
    );
}

/// Signals a resident process reacts to.
struct Signals {
    term: Arc<AtomicBool>,
    eject: Arc<AtomicBool>,
}

impl Signals {
    fn install() -> Result<Self> {
        let s = Self {
            term: Arc::new(AtomicBool::new(false)),
            eject: Arc::new(AtomicBool::new(false)),
        };
        for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::flag::register(sig, s.term.clone())?;
        }
        signal_hook::flag::register(signal_hook::consts::SIGUSR2, s.eject.clone())?;
        Ok(s)
    }
}

/// Exponential backoff between reconnection attempts.
///
/// A channel that dies soon after it was handed in (within
/// [`Backoff::STABLE`]) counts as a failed attempt, so a server that accepts
/// connections and drops them at once is retried at the backed-off pace,
/// not in a storm. The wait starts over only once a channel handed in has
/// stayed up for `STABLE` with all channels up.
#[derive(Debug)]
pub struct Backoff {
    /// The wait after the next failure.
    next: Duration,
    max: Duration,
    /// No attempt before this.
    at: Option<Instant>,
    /// When the newest channel was handed in, while it is on probation.
    fresh: Option<Instant>,
}

impl Backoff {
    const START: Duration = Duration::from_millis(100);
    /// How long a channel must stay up before its reconnection counts as a
    /// success.
    pub const STABLE: Duration = Duration::from_secs(5);

    pub fn new(max: Duration) -> Self {
        Self {
            next: Self::START,
            max: max.max(Self::START),
            at: None,
            fresh: None,
        }
    }

    /// Whether an attempt may be made now.
    pub fn ready(&self, now: Instant) -> bool {
        self.at.is_none_or(|t| now >= t)
    }

    /// How long until an attempt may be made (zero if it may now).
    pub fn until_ready(&self, now: Instant) -> Duration {
        self.at
            .map_or(Duration::ZERO, |t| t.saturating_duration_since(now))
    }

    /// An attempt failed: wait longer before the next one.
    pub fn failed(&mut self, now: Instant) -> Duration {
        let d = self.next;
        self.at = Some(now + d);
        self.next = (self.next * 2).min(self.max);
        d
    }

    /// An attempt handed a channel in. The wait does not start over yet:
    /// the channel is on probation for `STABLE`.
    pub fn connected(&mut self, now: Instant) {
        self.fresh = Some(now);
    }

    /// A channel went down. If a channel was handed in less than `STABLE`
    /// ago, that attempt counts as failed: returns how long the channel had
    /// been up and the wait before the next attempt.
    pub fn lost(&mut self, now: Instant) -> Option<(Duration, Duration)> {
        let t = self.fresh.take()?;
        let lived = now.saturating_duration_since(t);
        (lived < Self::STABLE).then(|| (lived, self.failed(now)))
    }

    /// All channels are up: once no channel is on probation any more, the
    /// wait starts over. Returns whether it did.
    pub fn settle(&mut self, now: Instant) -> bool {
        if self
            .fresh
            .is_some_and(|t| now.saturating_duration_since(t) < Self::STABLE)
        {
            return false;
        }
        self.fresh = None;
        self.at = None;
        std::mem::replace(&mut self.next, Self::START) != Self::START
    }
}

/// How long the helper sleeps in `IOC_WAIT` when nothing happens, between
/// looks at its signals.
const POLL: Duration = Duration::from_millis(200);

/// The helper's loop. Returns when the device is disconnected or ejected.
pub fn helper(state: &State) -> Result<()> {
    let sig = Signals::install()?;
    write_pid(&state.device, false);
    let dev = EnbdDev::open(&state.device)?;
    let name = state.device.display();
    let wanted = state.session.channels;
    info!(
        "{name}: helper running (pid {}), keeping {wanted} channel(s)",
        std::process::id(),
    );
    let mut backoff = Backoff::new(state.session.retry_max);
    let targets = &state.session.targets;
    // Several servers: a prober thread measures them and picks the one
    // that carries the I/O; replacement channels go to servers it found
    // answering.
    let view = Arc::new(Mutex::new(View::new(targets.len())));
    let prober = Arc::new(ProberCtl::default());
    if targets.len() > 1 {
        let (v, ctl) = (view.clone(), prober.clone());
        let (pdev, s) = (EnbdDev::open(&state.device)?, state.session.clone());
        let (size, token, t) = (state.size, state.token, targets.clone());
        std::thread::Builder::new()
            .name("prober".into())
            .spawn(move || crate::replicas::run(pdev, t, s, size, token, v, ctl))
            .context("cannot start the prober thread")?;
    }
    let st = dev.status()?;
    let mut epoch = st.epoch;
    // The channels the helper believes up: fewer means channels were lost.
    let mut known = st.channels;
    let mut lost_at: Option<Instant> = None;
    // SIGTERM/SIGINT asked for a disconnect, which has not happened yet.
    let mut disconnecting = false;
    // The last disconnect failed for want of a channel: retry it once one
    // is up again.
    let mut stalled = false;
    // The device is being disconnected or ejected (by anyone).
    let mut closing = false;
    loop {
        if sig.eject.load(Ordering::Relaxed) {
            info!("SIGUSR2: ejecting {name}");
            dev.eject()?;
            break;
        }
        if sig.term.swap(false, Ordering::Relaxed) {
            disconnecting = true;
            stalled = false;
        }
        if disconnecting && !stalled {
            info!("disconnecting {name}");
            match dev.disconnect() {
                Ok(()) => break,
                Err(IoctlError::NotConnected { .. }) => {
                    info!("{name} was already disconnected");
                    break;
                }
                Err(e @ IoctlError::Unflushed { .. }) => {
                    // Never eject on our own: that would discard the data.
                    error!(
                        "{e}; the helper keeps the device and reconnects, and retries the \
                         disconnect once a channel is up"
                    );
                    stalled = true;
                }
                // A signal: look at the flags again, then retry.
                Err(IoctlError::Interrupted { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        // Missing channels: wake up when the next attempt is due.
        let timeout = if known < wanted && !closing {
            backoff.until_ready(Instant::now()).min(POLL)
        } else {
            POLL
        };
        let st = match dev.wait(epoch, u32::try_from(timeout.as_millis()).unwrap_or(200)) {
            Ok(st) => st,
            Err(IoctlError::Other { source, .. }) if source.raw_os_error() == Some(libc::EINTR) => {
                continue
            }
            Err(e) => return Err(e.into()),
        };
        epoch = st.epoch;
        closing = false;
        match DevState::from_u32(st.state) {
            Some(DevState::Unconfigured) => {
                info!("{name} was disconnected; exiting");
                break;
            }
            Some(DevState::Closing) => {
                closing = true;
                continue;
            }
            _ => {}
        }
        let now = Instant::now();
        if st.channels < known {
            prober.wake.store(true, Ordering::Relaxed);
            if let Some((lived, d)) = backoff.lost(now) {
                warn!(
                    "{name}: a channel went down {:.2} s after it was handed in; counting that \
                     as a failed attempt, next attempt in {d:?}",
                    lived.as_secs_f64()
                );
            }
        }
        known = st.channels;
        if stalled && st.channels > 0 {
            stalled = false;
            continue;
        }
        if st.channels >= wanted {
            if let Some(t) = lost_at.take() {
                info!(
                    "{name}: all {wanted} channel(s) up again after {:.1} s",
                    now.duration_since(t).as_secs_f64()
                );
            }
            backoff.settle(now);
            continue;
        }
        lost_at.get_or_insert(now);
        if !backoff.ready(now) {
            continue;
        }
        let usable = view.lock().unwrap_or_else(|e| e.into_inner()).usable();
        let have = &st.server_channels[..targets.len().min(st.server_channels.len())];
        let Some(server) = replica::refill(wanted, have, &usable) else {
            // Only servers that fail their probes miss channels.
            continue;
        };
        let t = &targets[server];
        match reconnect(&dev, state, t, server) {
            Ok(()) => {
                backoff.connected(Instant::now());
                known = st.channels + 1;
                info!(
                    "{name}: channel to {t} reconnected ({} of {wanted} up)",
                    st.channels + 1,
                );
            }
            Err(e) => {
                if let Some(IoctlError::BadToken { .. }) = e.downcast_ref::<IoctlError>() {
                    return Err(e.context("the device no longer accepts this helper's token"));
                }
                let d = backoff.failed(Instant::now());
                warn!("{name}: reconnecting to {t} failed: {e:#}; retrying in {d:?}");
            }
        }
    }
    prober.stop.store(true, Ordering::Relaxed);
    State::remove(&state.device);
    let _ = fs::remove_file(pid_path(&state.device, false));
    Ok(())
}

fn reconnect(dev: &EnbdDev, state: &State, t: &Target, server: usize) -> Result<()> {
    let (s, info) = open_channel(
        t,
        &state.session.export,
        state.session.timeout,
        state.session.tls.as_ref(),
    )?;
    if info.size != state.size || info.flags != state.flags {
        bail!(
            "{t} now offers export '{}' with size {} flags {:#x}, not {} {:#x}",
            state.session.export,
            info.size,
            info.flags,
            state.size,
            state.flags
        );
    }
    let s = s.ready()?;
    dev.add_sock(s.fd(), s.flags(), server, &state.token)?;
    Ok(())
}

fn fork() -> Result<libc::pid_t> {
    // SAFETY: the guardian is single-threaded (signal-hook only registers
    // handlers), so the child may run Rust code after fork().
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        bail!("fork: {}", std::io::Error::last_os_error());
    }
    Ok(pid)
}

/// The guardian: runs the helper in a child process and restarts it until it
/// exits cleanly (device disconnected or ejected). SIGTERM and SIGUSR2 are
/// passed on to the helper.
pub fn guardian(device: &Path) -> Result<()> {
    let sig = Signals::install()?;
    write_pid(device, true);
    let mut restarts = 0u32;
    loop {
        let state = State::load(device)?;
        let child = fork()?;
        if child == 0 {
            let code = match helper(&state) {
                Ok(()) => 0,
                Err(e) => {
                    error!("helper: {e:#}");
                    2
                }
            };
            std::process::exit(code);
        }
        info!(
            "{}: guardian (pid {}) started helper {child}",
            device.display(),
            std::process::id()
        );
        let status = loop {
            let mut status = 0;
            // SAFETY: waits for our own child; `status` is a valid out pointer.
            let r = unsafe { libc::waitpid(child, &mut status, libc::WNOHANG) };
            if r == child {
                break status;
            }
            for (flag, signo) in [(&sig.term, libc::SIGTERM), (&sig.eject, libc::SIGUSR2)] {
                if flag.swap(false, Ordering::Relaxed) {
                    // SAFETY: signals our own child.
                    unsafe { libc::kill(child, signo) };
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let clean = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
        if clean {
            info!("{}: helper finished; guardian exiting", device.display());
            break;
        }
        if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 2 {
            error!("{}: helper failed; not restarting it", device.display());
            break;
        }
        restarts += 1;
        let how = if libc::WIFSIGNALED(status) {
            format!("killed by signal {}", libc::WTERMSIG(status))
        } else {
            format!("exited with status {}", libc::WEXITSTATUS(status))
        };
        warn!(
            "{}: helper {child} {how}; restarting it (restart {restarts})",
            device.display()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = fs::remove_file(pid_path(device, true));
    Ok(())
}

/// Forks into the background; the parent exits once the child runs.
pub fn daemonize(log: Option<&Path>) -> Result<()> {
    use std::os::fd::AsRawFd;
    std::io::stdout().flush()?;
    let out = match log {
        Some(p) => fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .with_context(|| format!("cannot open log {}", p.display()))?,
        None => fs::OpenOptions::new().write(true).open("/dev/null")?,
    };
    if fork()? != 0 {
        std::process::exit(0);
    }
    // SAFETY: plain syscalls on descriptors this process owns.
    unsafe {
        libc::setsid();
        libc::dup2(out.as_raw_fd(), 1);
        libc::dup2(out.as_raw_fd(), 2);
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY);
        if null >= 0 {
            libc::dup2(null, 0);
            libc::close(null);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_round_trip() {
        let s = State {
            device: "/dev/enbd3".into(),
            session: Session {
                targets: vec![
                    "10.0.0.1:10809".parse().unwrap(),
                    "unix:/run/x".parse().unwrap(),
                ],
                export: "disk".into(),
                channels: 4,
                timeout: Duration::from_secs(30),
                retry_max: Duration::from_secs(5),
                shared_backend: true,
                probe_max: Duration::from_secs(4),
                tls: Some(TlsOpts {
                    ca: "/etc/ca.pem".into(),
                    cert: None,
                    key: None,
                    hostname: Some("srv".into()),
                    fallback: Fallback::Proxy,
                }),
            },
            size: 1 << 30,
            flags: 0x1ff,
            token: [0xab; TOKEN_LEN],
        };
        assert_eq!(State::parse(&s.render()).unwrap(), s);
        assert!(State::parse("device=/dev/enbd0\n").is_err());
        assert!(unhex("zz").is_none());
    }

    #[test]
    fn state_keeps_every_fallback() {
        use clap::ValueEnum as _;
        let mut s = State {
            device: "/dev/enbd0".into(),
            session: Session {
                targets: vec!["h:1".parse().unwrap()],
                export: String::new(),
                channels: 1,
                timeout: Duration::from_secs(30),
                retry_max: Duration::from_secs(5),
                shared_backend: false,
                probe_max: Duration::from_secs(60),
                tls: Some(TlsOpts {
                    ca: "/ca.pem".into(),
                    cert: Some("/c.pem".into()),
                    key: Some("/k.pem".into()),
                    hostname: None,
                    fallback: Fallback::Error,
                }),
            },
            size: 4096,
            flags: 1,
            token: [1; TOKEN_LEN],
        };
        for (f, name) in Fallback::value_variants()
            .iter()
            .zip(["error", "proxy", "always-proxy"])
        {
            s.session.tls.as_mut().unwrap().fallback = *f;
            let text = s.render();
            assert!(text.contains(&format!("\ntls_fallback={name}\n")), "{text}");
            assert_eq!(State::parse(&text).unwrap(), s);
        }
        // Files written before tls_fallback existed, and a corrupt one.
        let text = s.render().replace("tls_fallback=always-proxy\n", "");
        let old = State::parse(&text).unwrap();
        assert_eq!(old.session.tls.unwrap().fallback, Fallback::Error);
        let text = s.render().replace("=always-proxy", "=sometimes");
        assert!(State::parse(&text).is_err());
    }

    #[test]
    fn backoff_doubles_to_the_cap() {
        let mut b = Backoff::new(Duration::from_millis(500));
        let t = Instant::now();
        assert!(b.ready(t));
        let waits: Vec<u128> = (0..5).map(|_| b.failed(t).as_millis()).collect();
        assert_eq!(waits, vec![100, 200, 400, 500, 500]);
        assert!(!b.ready(t));
        assert!(b.ready(t + Duration::from_millis(500)));
        assert!(b.settle(t + Duration::from_millis(500)));
        assert!(b.ready(t));
        assert_eq!(b.failed(t), Duration::from_millis(100));
    }

    #[test]
    fn backoff_counts_a_channel_that_dies_at_once_as_failed() {
        // The reconnect storm: every channel handed in drops 50 ms later.
        let mut b = Backoff::new(Duration::from_secs(5));
        let mut now = Instant::now();
        let mut waits = Vec::new();
        for _ in 0..8 {
            assert!(b.ready(now));
            b.connected(now);
            // All channels up for a moment: no reset while on probation.
            assert!(!b.settle(now + Duration::from_millis(10)));
            now += Duration::from_millis(50);
            let (lived, d) = b.lost(now).expect("counted as a failure");
            assert_eq!(lived, Duration::from_millis(50));
            assert!(!b.ready(now));
            assert_eq!(b.until_ready(now), d);
            waits.push(d.as_millis());
            now += d;
        }
        assert_eq!(waits, [100, 200, 400, 800, 1600, 3200, 5000, 5000]);
    }

    #[test]
    fn backoff_resets_only_after_a_channel_stayed_up() {
        let mut b = Backoff::new(Duration::from_secs(5));
        let t = Instant::now();
        b.failed(t);
        b.failed(t);
        b.failed(t);
        let t = t + Duration::from_secs(1);
        b.connected(t);
        // Up for just under STABLE: still on probation.
        assert!(!b.settle(t + Backoff::STABLE - Duration::from_millis(1)));
        assert!(b.settle(t + Backoff::STABLE));
        assert_eq!(b.failed(t + Backoff::STABLE), Duration::from_millis(100));
    }

    #[test]
    fn backoff_ignores_the_loss_of_a_settled_channel() {
        let mut b = Backoff::new(Duration::from_secs(5));
        let t = Instant::now();
        // Lost with nothing handed in lately: the next attempt is at once.
        assert_eq!(b.lost(t), None);
        assert!(b.ready(t));
        // Handed in, then lost after it stayed up long enough.
        b.connected(t);
        assert_eq!(b.lost(t + Backoff::STABLE), None);
        assert!(b.ready(t + Backoff::STABLE));
        // Each channel handed in is on probation once: one loss per attempt.
        b.connected(t);
        assert!(b.lost(t + Duration::from_millis(10)).is_some());
        assert_eq!(b.lost(t + Duration::from_millis(20)), None);
    }
}
