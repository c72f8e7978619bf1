// SPDX-License-Identifier: GPL-2.0
//! enbd: the Enhanced Network Block Device, as a Rust blk-mq driver.
//!
//! Creates `/dev/enbd0..N-1`. The helper (`enbd-client`) negotiates with an
//! NBD server, configures a device through ioctls and hands it connected
//! sockets; the driver speaks the NBD transmission protocol on them.
//!
//! Files: `sys.rs` is the only `unsafe` layer; `device.rs` a device, its
//! locks and ioctls; `channel.rs` the per-socket sender and receiver threads;
//! `procfs.rs` `/proc/nbdinfo`. The wire format, ioctl ABI and request
//! journal are the shared `no_std` sources in `userspace/enbd-core`.

use kernel::c_str;
use kernel::prelude::*;
use kernel::sync::Arc;

mod channel;
mod device;
mod procfs;
mod sys;

#[path = "../../../userspace/enbd-core/src/journal.rs"]
#[allow(dead_code, unreachable_pub)]
mod journal;
#[path = "../../../userspace/enbd-core/src/uapi.rs"]
#[allow(dead_code, unreachable_pub)]
mod uapi;
#[path = "../../../userspace/enbd-core/src/wire.rs"]
#[allow(dead_code, unreachable_pub)]
mod wire;

use device::Device;
use procfs::Devices;
use sys::{Disk, Param, ProcEntry};

/// Version shown in `/proc/nbdinfo`.
pub(crate) const VERSION: &str = "0.1.0";

module! {
    type: Enbd,
    name: "enbd",
    author: "enbd developers",
    description: "Enhanced Network Block Device (NBD protocol, Rust blk-mq)",
    license: "GPL",
}

struct Enbd {
    // Dropped in declaration order: /proc first, then the disks.
    _proc: ProcEntry<Devices>,
    _disks: KVec<Disk>,
}

/// Compares tokens in time independent of where they differ.
pub(crate) fn token_eq(a: &[u8; uapi::TOKEN_LEN], b: &[u8; uapi::TOKEN_LEN]) -> bool {
    a.iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y))
        == 0
}

impl kernel::Module for Enbd {
    fn init(_module: &'static ThisModule) -> Result<Self> {
        let n = sys::param(Param::NrDevices);
        let depth = sys::param(Param::QueueDepth);
        let max_channels = sys::param(Param::MaxChannels);
        let mut disks = KVec::with_capacity(n as usize, GFP_KERNEL)?;
        let mut devs = KVec::with_capacity(n as usize, GFP_KERNEL)?;
        for i in 0..n {
            let dev = Device::new(i, depth, max_channels)?;
            devs.push(dev.clone(), GFP_KERNEL)?;
            disks.push(Disk::new(i, dev, depth)?, GFP_KERNEL)?;
        }
        let proc = ProcEntry::new(c_str!("nbdinfo"), Arc::new(Devices(devs), GFP_KERNEL)?)?;
        pr_info!(
            "enbd {}: {} devices, queue depth {}\n",
            VERSION,
            proc.data().0.len(),
            depth
        );
        Ok(Self {
            _proc: proc,
            _disks: disks,
        })
    }
}
