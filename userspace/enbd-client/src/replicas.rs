//! Multi-server mode: the helper measures each server's round-trip time
//! and tells the device which one carries the I/O (dnbd3's replica
//! selection; the rules are `enbd_core::replica`'s, shared with the proxy).
//!
//! A probe is what dnbd3's clients do: a fresh connection, the handshake,
//! then timed `READ`s of a block. Only the `READ`s are timed, so a TLS
//! handshake does not count as distance, and the fastest of
//! [`PROBE_READS`] counts, so a busy client's scheduling delays (the
//! probes of all servers run at once) do not. Every server is probed in each
//! round, the one in use too, on a schedule that backs off while nothing
//! changes (`ProbeSchedule`, capped by `--probe-max`) and probes every 2 s
//! while no server answers. The kernel does not wait for a round to fail
//! over: while none of the chosen server's channels can take requests, the
//! other servers' channels do (`replica::carries`).

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use enbd_core::replica::{self, ProbeSchedule, Round, Rtt};
use enbd_core::uapi::{self, ServerArg, ServersArg, NO_SERVER};
use enbd_core::wire::{Cmd, Request};
use enbd_nbd::client::exchange;
use tracing::{info, warn};

use crate::connect::{open_channel, Handoff, Session, Target};
use crate::ioctl::{EnbdDev, IoctlError};

/// Bytes a probe reads (offset 0, so the server answers from its cache
/// and the time is the network's).
const PROBE_LEN: u64 = 4096;
/// `READ`s per probe; the fastest is the probe's RTT.
const PROBE_READS: u64 = 3;
/// Longest a probe may take, connection and handshake included.
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// What the prober found: each server's RTT and the chosen one. Shared
/// with the helper's loop, which sends replacement channels only to
/// servers that answer.
#[derive(Clone, Debug)]
pub struct View {
    pub rtts: Vec<Rtt>,
    pub probes: Vec<u32>,
    /// Whether each server's last probe failed: it is down now, whatever
    /// its average (which takes 4 failures to mark it unusable).
    pub failed: Vec<bool>,
    pub active: Option<usize>,
}

impl View {
    pub fn new(n: usize) -> Self {
        Self {
            rtts: vec![Rtt::default(); n],
            probes: vec![0; n],
            failed: vec![false; n],
            active: None,
        }
    }

    /// Whether a channel to server `i` is worth trying: it answered its
    /// last probe, or was not probed yet.
    pub fn usable(&self) -> Vec<bool> {
        self.failed.iter().map(|f| !f).collect()
    }

    /// The device's argument for `IOC_SERVERS`.
    pub fn servers_arg(&self, targets: &[Target], token: [u8; uapi::TOKEN_LEN]) -> ServersArg {
        let mut a = ServersArg {
            token,
            count: targets.len().min(uapi::MAX_SERVERS) as u32,
            active: self.active.map_or(NO_SERVER, |i| i as u32),
            ..ServersArg::default()
        };
        for (i, (s, t)) in a.servers.iter_mut().zip(targets).enumerate() {
            let r = self.rtts[i];
            *s = ServerArg {
                addr: uapi::name_field(t.to_string().as_bytes()),
                rtt_us: r.average().unwrap_or(0),
                probes: self.probes[i],
                state: match r.average() {
                    None => uapi::SERVER_UNKNOWN,
                    Some(_) if r.usable() && !self.failed[i] => uapi::SERVER_UP,
                    Some(_) => uapi::SERVER_DOWN,
                },
            };
        }
        a
    }
}

/// Reads or writes on a probe's connection, whatever carries TLS.
trait Conn: Read + Write {}
impl<T: Read + Write> Conn for T {}

/// One probe of `t`: connect and negotiate, then time a `READ`.
pub fn probe(t: &Target, s: &Session, size: u64) -> Result<Duration> {
    let (h, _) = open_channel(t, &s.export, PROBE_TIMEOUT, s.tls.as_ref())?;
    let mut conn: Box<dyn Conn> = match h {
        Handoff::Plain(st) => {
            st.set_timeouts(Some(PROBE_TIMEOUT))?;
            Box::new(st)
        }
        Handoff::Ktls(tcp) => {
            tcp.set_read_timeout(Some(PROBE_TIMEOUT))?;
            tcp.set_write_timeout(Some(PROBE_TIMEOUT))?;
            Box::new(tcp)
        }
        Handoff::Proxy(b) => {
            let (c, tcp) = *b;
            tcp.set_read_timeout(Some(PROBE_TIMEOUT))?;
            tcp.set_write_timeout(Some(PROBE_TIMEOUT))?;
            Box::new(rustls::StreamOwned::new(c, tcp))
        }
    };
    let len = PROBE_LEN.min(size) as u32;
    let mut data = vec![0u8; len as usize];
    let mut best = Duration::MAX;
    for cookie in 0..PROBE_READS {
        let start = Instant::now();
        let req = Request::new(Cmd::Read, 0, cookie, 0, len);
        exchange(&mut conn, &req, &mut data).context("probe READ")?;
        best = best.min(start.elapsed());
    }
    let _ = conn.write_all(&Request::new(Cmd::Disc, 0, 0, 0, 0).encode());
    Ok(best)
}

/// Probes every server, in parallel, once.
fn round(targets: &[Target], s: &Session, size: u64) -> Vec<Result<Duration>> {
    std::thread::scope(|sc| {
        let hs: Vec<_> = targets
            .iter()
            .map(|t| sc.spawn(move || probe(t, s, size)))
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap_or_else(|_| bail!("probe thread panicked")))
            .collect()
    })
}

/// How the helper's loop steers the prober thread.
#[derive(Default)]
pub struct ProberCtl {
    /// End the thread.
    pub stop: AtomicBool,
    /// Start the next round now: a channel was lost, so a server may have
    /// died, and `/proc/nbdinfo` and the helper's choice of where
    /// replacement channels go should not wait out a long back-off.
    pub wake: AtomicBool,
}

/// The prober thread of a multi-server helper: probe rounds until
/// `ctl.stop`, each ending with `IOC_SERVERS`. Returns if the device
/// refuses the token.
pub fn run(
    dev: EnbdDev,
    targets: Vec<Target>,
    session: Session,
    size: u64,
    token: [u8; uapi::TOKEN_LEN],
    view: Arc<Mutex<View>>,
    ctl: Arc<ProberCtl>,
) {
    let mut schedule = ProbeSchedule::default();
    let max = session.probe_max;
    while !ctl.stop.load(Ordering::Relaxed) {
        ctl.wake.store(false, Ordering::Relaxed);
        let results = round(&targets, &session, size);
        let (arg, outcome) = {
            let mut v = view.lock().unwrap_or_else(|e| e.into_inner());
            let before = v.usable();
            for (i, r) in results.iter().enumerate() {
                v.probes[i] += 1;
                match r {
                    Ok(d) => {
                        if v.failed[i] {
                            info!("{} answers its probes again", targets[i]);
                        }
                        v.failed[i] = false;
                        v.rtts[i].record(u32::try_from(d.as_micros()).unwrap_or(u32::MAX));
                    }
                    Err(e) => {
                        if !v.failed[i] {
                            warn!("probe of {} failed: {e:#}", targets[i]);
                        }
                        v.failed[i] = true;
                        v.rtts[i].record_failure();
                    }
                }
            }
            let chosen = replica::choose(v.active, &v.rtts);
            let outcome = if chosen.is_none() {
                Round::Panic
            } else if chosen != v.active || v.usable() != before {
                Round::Changed
            } else {
                Round::Stable
            };
            if chosen != v.active {
                let ms = |i: Option<usize>| {
                    i.and_then(|i| v.rtts[i].average())
                        .map_or("-".into(), |us| format!("{:.1} ms", f64::from(us) / 1000.0))
                };
                match chosen {
                    Some(c) => info!(
                        "I/O moves to {} (RTT {}), from {}",
                        targets[c],
                        ms(chosen),
                        v.active.map_or("none".into(), |a| format!(
                            "{} (RTT {})",
                            targets[a],
                            ms(v.active)
                        ))
                    ),
                    None => warn!("no server answers its probes: probing every 2 s"),
                }
                v.active = chosen;
            }
            (v.servers_arg(&targets, token), outcome)
        };
        match dev.set_servers(&arg) {
            Ok(()) => {}
            Err(e @ (IoctlError::BadToken { .. } | IoctlError::NotConnected { .. })) => {
                warn!("{e}; the prober stops");
                return;
            }
            Err(e) => warn!("cannot tell the device about its servers: {e}"),
        }
        let wait = Duration::from_millis(u64::from(schedule.after(outcome))).min(max);
        let until = Instant::now() + wait;
        while !ctl.stop.load(Ordering::Relaxed)
            && !ctl.wake.load(Ordering::Relaxed)
            && Instant::now() < until
        {
            std::thread::sleep(Duration::from_millis(100).min(until - Instant::now()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_whose_last_probe_failed_is_down_and_gets_no_channels() {
        let targets: Vec<Target> = vec!["a:1".parse().unwrap(), "b:1".parse().unwrap()];
        let mut v = View::new(2);
        let state = |v: &View| -> Vec<u32> {
            let a = v.servers_arg(&targets, [0; uapi::TOKEN_LEN]);
            a.servers[..2].iter().map(|s| s.state).collect()
        };
        assert_eq!(state(&v), [uapi::SERVER_UNKNOWN; 2]);
        assert_eq!(v.usable(), [true, true], "not probed yet: worth trying");
        for _ in 0..4 {
            v.rtts[0].record(5_000);
            v.rtts[1].record(20_000);
        }
        assert_eq!(state(&v), [uapi::SERVER_UP; 2]);
        // One failed probe: its average still counts it usable, but it is
        // down now.
        v.rtts[0].record_failure();
        v.failed[0] = true;
        assert!(v.rtts[0].usable());
        assert_eq!(state(&v), [uapi::SERVER_DOWN, uapi::SERVER_UP]);
        assert_eq!(v.usable(), [false, true]);
        assert_eq!(replica::choose(Some(0), &v.rtts), Some(1));
    }
}
