// SPDX-License-Identifier: GPL-2.0
//! `/proc/nbdinfo`: one line per fact, each starting with the device name and
//! followed by `key=value` fields, so both people and scripts can read it.
//! The format is documented in `Documentation/procfs.md`.

use core::fmt::{self, Write};
use core::sync::atomic::Ordering::Relaxed;

use kernel::prelude::*;
use kernel::sync::Arc;

use crate::channel::ChanState;
use crate::device::Device;
use crate::sys::{self, Param, ProcShow, SeqWriter};
use crate::uapi::{self, name_str};
use crate::wire::tx;

/// All devices of the module, as `/proc/nbdinfo` shows them.
pub(crate) struct Devices(pub(crate) KVec<Arc<Device>>);

/// Writes a name field, or `-` when empty, with spaces escaped so the line
/// stays splittable.
fn name(out: &mut SeqWriter<'_>, field: &[u8]) -> fmt::Result {
    let s = name_str(field);
    if s.is_empty() {
        return out.write_char('-');
    }
    for &c in s {
        if c.is_ascii_graphic() {
            out.write_char(c as char)?;
        } else {
            write!(out, "\\x{:02x}", c)?;
        }
    }
    Ok(())
}

fn flags(out: &mut SeqWriter<'_>, f: u16) -> fmt::Result {
    const NAMES: [(u16, &str); 7] = [
        (tx::READ_ONLY, "ro"),
        (tx::SEND_FLUSH, "flush"),
        (tx::SEND_FUA, "fua"),
        (tx::SEND_TRIM, "trim"),
        (tx::SEND_WRITE_ZEROES, "zeroes"),
        (tx::ROTATIONAL, "rotational"),
        (tx::CAN_MULTI_CONN, "multi_conn"),
    ];
    let mut first = true;
    for (bit, n) in NAMES {
        if f & bit != 0 {
            if !first {
                out.write_char(',')?;
            }
            out.write_str(n)?;
            first = false;
        }
    }
    if first {
        out.write_char('-')?;
    }
    Ok(())
}

impl ProcShow for Devices {
    fn show(&self, out: &mut SeqWriter<'_>) -> fmt::Result {
        writeln!(
            out,
            "# enbd {} nr_devices={} max_channels={} queue_depth={} max_sectors_kb={} request_timeout={} dead_timeout={} keepalive_interval={} max_resubmits={}",
            crate::VERSION,
            self.0.len(),
            sys::param(Param::MaxChannels),
            sys::param(Param::QueueDepth),
            sys::param(Param::MaxSectorsKb),
            sys::param(Param::RequestTimeout),
            sys::param(Param::DeadTimeout),
            sys::param(Param::KeepaliveInterval),
            sys::param(Param::MaxResubmits),
        )?;
        for dev in self.0.iter() {
            let s = dev.snapshot();
            let i = dev.index();
            write!(
                out,
                "enbd{} state={} size={} blksize={} flags=",
                i,
                s.state.name(),
                s.config.size,
                s.config.logical_block_size(),
            )?;
            flags(out, s.config.nbd_flags as u16)?;
            out.write_str(" server=")?;
            name(out, &s.config.server)?;
            out.write_str(" export=")?;
            name(out, &s.config.export)?;
            writeln!(
                out,
                " channels={} queued={} inflight={}",
                s.live, s.queued, s.in_flight
            )?;
            let st = &dev.stats;
            writeln!(
                out,
                "enbd{} stats requests={} reads={} writes={} flushes={} trims={} zeroes={} read_bytes={} written_bytes={} errors={} resubmits={} late_replies={} token_rejects={} gave_up={}",
                i,
                st.requests.load(Relaxed),
                st.reads.load(Relaxed),
                st.writes.load(Relaxed),
                st.flushes.load(Relaxed),
                st.trims.load(Relaxed),
                st.zeroes.load(Relaxed),
                st.read_bytes.load(Relaxed),
                st.written_bytes.load(Relaxed),
                st.errors.load(Relaxed),
                s.resubmits,
                st.late_replies.load(Relaxed),
                s.token_rejects,
                s.gave_up,
            )?;
            for id in 0..uapi::MAX_SERVERS {
                let Some((srv, active, chans)) = dev.server_info(id) else {
                    break;
                };
                write!(out, "enbd{} server id={} addr=", i, id)?;
                name(out, &srv.arg.addr)?;
                writeln!(
                    out,
                    " state={} role={} rtt_us={} probes={} channels={} bytes={}",
                    match srv.arg.state {
                        uapi::SERVER_UP => "up",
                        uapi::SERVER_DOWN => "down",
                        _ => "unknown",
                    },
                    if active { "active" } else { "standby" },
                    srv.arg.rtt_us,
                    srv.arg.probes,
                    chans,
                    srv.bytes,
                )?;
            }
            for id in 0..s.max_channels {
                let Some((c, role)) = dev.chan_info(id) else {
                    break;
                };
                if c.state == ChanState::Unused {
                    continue;
                }
                writeln!(
                    out,
                    "enbd{} channel id={} server={} state={} role={} tls={} requests={} bytes={} errors={} resubmits={} spoiled={} probes={} latency_us={}",
                    i,
                    id,
                    c.server,
                    c.state_name(),
                    role,
                    c.tls_name(),
                    c.requests,
                    c.bytes,
                    c.errors,
                    c.resubmits,
                    c.spoiled,
                    c.health.probes(),
                    c.avg_latency_us(),
                )?;
            }
        }
        Ok(())
    }
}
