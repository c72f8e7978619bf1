//! enbd-client: the helper daemon of the enbd network block device.
//!
//! It negotiates with an NBD server, configures `/dev/enbdN` through ioctls,
//! hands it connected sockets and reports the device's state.

mod connect;
mod daemon;
mod ioctl;
mod negotiate;
mod procinfo;
mod replicas;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};

use connect::{ConnectOpts, Fallback, Session, Target, TlsOpts};
use ioctl::EnbdDev;
use procinfo::ProcInfo;

const PROC_PATH: &str = "/proc/nbdinfo";

#[derive(Parser)]
#[command(
    name = "enbd-client",
    version,
    about = "Helper daemon for enbd, the Enhanced Network Block Device",
    long_about = "Connects /dev/enbdN to an NBD server (enbd-server, nbd-server, nbdkit, \
                  qemu-nbd), keeps the connection alive, and reports device state. \
                  Device control needs root."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Connect a device to an export, then stay resident: a helper keeps the
    /// channels up (reconnecting with backoff) and a guardian restarts the
    /// helper if it dies. SIGTERM disconnects cleanly, SIGUSR2 ejects.
    Connect {
        /// The device, for example /dev/enbd0.
        device: PathBuf,
        /// Server as HOST, HOST:PORT, [IPv6]:PORT or unix:/path (port 10809
        /// by default). Several servers (at most 8) must offer the same
        /// export, size and flags: replicas of a read-only image, or
        /// gateways to one shared backend (--shared-backend). Each gets an
        /// even share of the channels (at least one); the helper probes
        /// their round-trip times and the fastest carries the I/O, the
        /// others take over at once when its channels fail.
        #[arg(required = true)]
        servers: Vec<Target>,
        /// Export name (empty means the server's default export).
        #[arg(short, long, default_value = "")]
        export: String,
        /// Connections to open; requests go to whichever is free. A server
        /// without CAN_MULTI_CONN gets 1 active channel, the others are kept
        /// connected as warm reserves.
        #[arg(short, long, default_value_t = 1)]
        channels: u32,
        /// Seconds allowed for connecting and negotiating each channel.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
        /// Upgrade every connection with NBD_OPT_STARTTLS (TLS 1.3, rustls),
        /// then hand the session to kernel TLS.
        #[arg(long, requires = "ca")]
        tls: bool,
        /// CA certificate(s) (PEM) the server's certificate must chain to.
        #[arg(long, value_name = "FILE", requires = "tls")]
        ca: Option<PathBuf>,
        /// Client certificate (PEM) for servers that require one.
        #[arg(long, value_name = "FILE", requires_all = ["key", "tls"])]
        cert: Option<PathBuf>,
        /// Private key (PEM) of --cert.
        #[arg(long, value_name = "FILE", requires = "cert")]
        key: Option<PathBuf>,
        /// Name the server certificate must carry (default: the host given).
        #[arg(long, value_name = "NAME", requires = "tls")]
        tls_hostname: Option<String>,
        /// When the kernel cannot take the TLS session: fail (error) or keep
        /// TLS in a userspace proxy thread (proxy).
        #[arg(long, value_enum, default_value = "error")]
        tls_fallback: Fallback,
        /// Longest wait between reconnection attempts, in seconds (the wait
        /// starts at 0.1 s and doubles; a channel that goes down within 5 s
        /// of being handed in counts as a failed attempt).
        #[arg(long, default_value_t = 5.0)]
        retry_max: f64,
        /// The servers given share one writable backend (NBD gateways in
        /// front of one Ceph RBD image, say), so any of them may take any
        /// request. Without it several servers need a read-only export.
        #[arg(long)]
        shared_backend: bool,
        /// Longest interval between probe rounds of several servers, in
        /// seconds (rounds start 2 s apart and double while nothing
        /// changes).
        #[arg(long, default_value_t = 60.0)]
        probe_max: f64,
        /// Stay in the foreground instead of forking into the background.
        #[arg(short, long)]
        foreground: bool,
        /// Append the daemon's log to this file (default: discard it).
        #[arg(long)]
        log: Option<PathBuf>,
    },
    /// Put a guardian and helper back on a device that is still connected,
    /// using the token in /run/enbd/<device>.state.
    Attach {
        /// The device, for example /dev/enbd0.
        device: PathBuf,
        /// Stay in the foreground instead of forking into the background.
        #[arg(short, long)]
        foreground: bool,
        /// Append the daemon's log to this file (default: discard it).
        #[arg(long)]
        log: Option<PathBuf>,
    },
    /// List the exports a server offers.
    List {
        /// Server as HOST, HOST:PORT, [IPv6]:PORT or unix:/path.
        server: Target,
        /// Seconds allowed for connecting and listing.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Disconnect a device cleanly: cached writes go out and in-flight
    /// requests finish, then the server is told NBD_CMD_DISC and the device
    /// returns to capacity 0. Fails, keeping the device and its data, when
    /// cached writes cannot reach the server.
    Disconnect {
        /// The device, for example /dev/enbd0.
        device: PathBuf,
    },
    /// Fail every pending request with an I/O error and drop all channels at
    /// once (what SIGUSR2 does to a running helper).
    Eject {
        /// The device, for example /dev/enbd0.
        device: PathBuf,
    },
    /// Show every device's state, server, export and counters.
    Status {
        /// Only this device (enbd0 or /dev/enbd0).
        device: Option<String>,
        /// Print /proc/nbdinfo as the kernel writes it.
        #[arg(long)]
        raw: bool,
    },
}

/// Renders `enbd-client status` from the text of `/proc/nbdinfo`.
fn render_status(text: &str, device: Option<&str>) -> Result<String> {
    use std::fmt::Write as _;
    let info = ProcInfo::parse(text);
    let want = device.map(|d| d.trim_start_matches("/dev/"));
    let mut out = String::new();
    writeln!(
        out,
        "enbd {} ({} devices)",
        info.version,
        info.devices().len()
    )?;
    let mut shown = 0;
    for dev in info.devices() {
        if want.is_some_and(|w| w != dev) {
            continue;
        }
        shown += 1;
        for l in info.lines_of(dev) {
            match l.tag.as_deref() {
                None => {
                    let g = |k| l.get(k).unwrap_or("-");
                    // Without CAN_MULTI_CONN one channel is active and the
                    // rest are warm reserves.
                    let roles = match info.roles(dev) {
                        Some((a, r)) if r > 0 => format!(" ({a} active, {r} reserve)"),
                        _ => String::new(),
                    };
                    writeln!(
                        out,
                        "/dev/{dev}: {} size {} block {} server {} export {} flags {} channels {}{roles}",
                        g("state"),
                        g("size"),
                        g("blksize"),
                        g("server"),
                        g("export"),
                        g("flags"),
                        g("channels"),
                    )?;
                }
                Some("channel") if l.get("id").is_some() => {
                    // `channel 0 (active): state up, ...`
                    let role = l.get("role").map(|r| format!(" ({r})")).unwrap_or_default();
                    let f: Vec<String> = l
                        .fields
                        .iter()
                        .filter(|(k, _)| k != "id" && k != "role")
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect();
                    writeln!(
                        out,
                        "    channel {}{role}: {}",
                        l.get("id").unwrap_or("-"),
                        f.join(", ")
                    )?;
                }
                Some(tag) => {
                    let f: Vec<String> = l.fields.iter().map(|(k, v)| format!("{k} {v}")).collect();
                    writeln!(out, "    {tag}: {}", f.join(", "))?;
                }
            }
        }
    }
    if let Some(w) = want {
        if shown == 0 {
            anyhow::bail!("no device {w} in {PROC_PATH}");
        }
    }
    Ok(out)
}

/// Prints to stdout; a reader that went away (`| head`) is not an error.
fn print_out(s: &str) -> Result<()> {
    use std::io::Write as _;
    match std::io::stdout().lock().write_all(s.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

fn status(device: Option<String>, raw: bool) -> Result<()> {
    let text = std::fs::read_to_string(PROC_PATH)
        .with_context(|| format!("cannot read {PROC_PATH}: is enbd.ko loaded?"))?;
    if raw {
        return print_out(&text);
    }
    print_out(&render_status(&text, device.as_deref())?)
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        Cmd::Connect {
            device,
            servers,
            export,
            channels,
            timeout,
            retry_max,
            tls,
            ca,
            cert,
            key,
            tls_hostname,
            tls_fallback,
            shared_backend,
            probe_max,
            foreground,
            log,
        } => {
            if !(0.1..=3600.0).contains(&retry_max) {
                anyhow::bail!("--retry-max must be between 0.1 and 3600 seconds");
            }
            if !(2.0..=3600.0).contains(&probe_max) {
                anyhow::bail!("--probe-max must be between 2 and 3600 seconds");
            }
            connect::run(ConnectOpts {
                device,
                session: Session {
                    targets: servers,
                    export,
                    channels,
                    timeout: Duration::from_secs(timeout),
                    retry_max: Duration::from_secs_f64(retry_max),
                    shared_backend,
                    probe_max: Duration::from_secs_f64(probe_max),
                    tls: match (tls, ca) {
                        (true, Some(ca)) => Some(TlsOpts {
                            ca,
                            cert,
                            key,
                            hostname: tls_hostname,
                            fallback: tls_fallback,
                        }),
                        _ => None,
                    },
                },
                foreground,
                log,
            })
        }
        Cmd::Attach {
            device,
            foreground,
            log,
        } => connect::attach(&device, foreground, log.as_deref()),
        Cmd::List { server, timeout } => {
            let mut s = connect::Stream::connect(&server, Duration::from_secs(timeout))?;
            negotiate::greet(&mut s)?;
            for (name, desc) in negotiate::list(&mut s)? {
                if desc.is_empty() {
                    println!("{name}");
                } else {
                    println!("{name}\t{desc}");
                }
            }
            Ok(())
        }
        Cmd::Disconnect { device } => {
            EnbdDev::open(&device)?.disconnect()?;
            println!("{}: disconnected", device.display());
            Ok(())
        }
        Cmd::Eject { device } => {
            EnbdDev::open(&device)?.eject()?;
            println!("{}: ejected", device.display());
            Ok(())
        }
        Cmd::Status { device, raw } => status(device, raw),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A daemon logging to a file must not write terminal colour codes there.
    let to_file = matches!(
        cli.cmd,
        Cmd::Connect { log: Some(_), .. } | Cmd::Attach { log: Some(_), .. }
    );
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("ENBD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(!to_file && std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("enbd-client: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROC: &str = "# enbd 0.2.0 nr_devices=2\n\
        enbd0 state=connected size=4096 blksize=512 flags=flush server=h:1 export=e channels=2\n\
        enbd0 stats requests=5 errors=0 gave_up=2\n\
        enbd0 channel id=0 state=up role=active tls=none requests=5\n\
        enbd0 channel id=1 state=up role=reserve tls=none requests=0\n\
        enbd1 state=unconfigured size=0\n";

    #[test]
    fn status_lists_each_server() {
        let text = "# enbd 0.2.0 nr_devices=1\n\
            enbd0 state=connected size=4096 server=a:1 channels=2\n\
            enbd0 server id=0 addr=a:1 state=up role=active rtt_us=5210 probes=7 channels=1 bytes=8192\n\
            enbd0 server id=1 addr=b:1 state=down role=standby rtt_us=134217727 probes=7 channels=0 bytes=0\n\
            enbd0 channel id=0 server=0 state=up role=active tls=none requests=2\n\
            enbd0 channel id=1 server=1 state=up role=standby tls=none requests=0\n";
        let out = render_status(text, None).unwrap();
        assert!(
            out.contains("    server: id 0, addr a:1, state up, role active, rtt_us 5210, probes 7, channels 1, bytes 8192\n"),
            "{out}"
        );
        assert!(
            out.contains("    server: id 1, addr b:1, state down, role standby"),
            "{out}"
        );
        assert!(
            out.contains("    channel 1 (standby): server 1, state up"),
            "{out}"
        );
    }

    #[test]
    fn status_shows_roles_and_gave_up() {
        let out = render_status(PROC, Some("/dev/enbd0")).unwrap();
        assert_eq!(
            out,
            "enbd 0.2.0 (2 devices)\n\
             /dev/enbd0: connected size 4096 block 512 server h:1 export e flags flush channels 2 (1 active, 1 reserve)\n    \
             stats: requests 5, errors 0, gave_up 2\n    \
             channel 0 (active): state up, tls none, requests 5\n    \
             channel 1 (reserve): state up, tls none, requests 0\n"
        );
        let out = render_status(PROC, Some("enbd1")).unwrap();
        assert!(out.contains("/dev/enbd1: unconfigured size 0 block -"));
        assert!(render_status(PROC, Some("enbd7")).is_err());
    }

    #[test]
    fn status_of_an_older_module() {
        let old = "# enbd 0.1.0 nr_devices=1\n\
            enbd0 state=connected channels=1\n\
            enbd0 channel id=0 state=up tls=ktls requests=5\n\
            enbd0 channel 1 state=up\n";
        let out = render_status(old, None).unwrap();
        assert!(out.contains("channels 1\n"), "{out}");
        assert!(
            out.contains("    channel 0: state up, tls ktls, requests 5\n"),
            "{out}"
        );
        assert!(out.contains("    channel: state up\n"), "{out}");
    }
}
