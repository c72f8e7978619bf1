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
use kernel::sync::{Arc, CondVar, Mutex};

mod channel;
mod device;
mod procfs;
mod sys;

#[path = "../../../userspace/enbd-core/src/health.rs"]
#[allow(dead_code, unreachable_pub)]
mod health;
#[path = "../../../userspace/enbd-core/src/journal.rs"]
#[allow(dead_code, unreachable_pub)]
mod journal;
#[path = "../../../userspace/enbd-core/src/ratelimit.rs"]
#[allow(dead_code, unreachable_pub)]
mod ratelimit;
#[path = "../../../userspace/enbd-core/src/replica.rs"]
#[allow(dead_code, unreachable_pub)]
mod replica;
#[path = "../../../userspace/enbd-core/src/uapi.rs"]
#[allow(dead_code, unreachable_pub)]
mod uapi;
#[path = "../../../userspace/enbd-core/src/wake.rs"]
#[allow(dead_code, unreachable_pub)]
mod wake;
#[path = "../../../userspace/enbd-core/src/wire.rs"]
#[allow(dead_code, unreachable_pub)]
mod wire;

use device::Device;
use procfs::Devices;
use sys::{Disk, Param, ProcEntry, Thread};

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
    // Dropped in declaration order: the manager first (it ticks the
    // devices), then /proc, then the disks.
    _manager: Manager,
    _proc: ProcEntry<Devices>,
    _disks: KVec<Disk<Device>>,
}

/// Lets the manager thread sleep between ticks and be stopped at once.
#[pin_data]
struct Ticker {
    #[pin]
    stop: Mutex<bool>,
    #[pin]
    cv: CondVar,
}

/// The module's one periodic thread: every 200 ms it runs `Device::tick`
/// (aging, keep-alives, dead timeout) on every device.
struct Manager {
    ticker: Arc<Ticker>,
    // Joined in `drop`, after the stop flag is set.
    thread: Option<Thread>,
}

impl Manager {
    fn start(devices: Arc<Devices>) -> Result<Self> {
        let ticker = Arc::pin_init(
            pin_init!(Ticker {
                stop <- kernel::new_mutex!(false, "enbd:ticker"),
                cv <- kernel::new_condvar!("enbd:ticker"),
            }),
            GFP_KERNEL,
        )?;
        let t = ticker.clone();
        let thread = Thread::spawn(format_args!("enbd-manager"), move || loop {
            {
                let mut stop = t.stop.lock();
                if !*stop {
                    let _ = t
                        .cv
                        .wait_interruptible_timeout(&mut stop, kernel::time::msecs_to_jiffies(200));
                }
                if *stop {
                    return;
                }
            }
            let now = sys::now_ns();
            for dev in devices.0.iter() {
                dev.tick(now);
            }
        })?;
        Ok(Self {
            ticker,
            thread: Some(thread),
        })
    }
}

impl Drop for Manager {
    fn drop(&mut self) {
        *self.ticker.stop.lock() = true;
        self.ticker.cv.notify_all();
        drop(self.thread.take());
    }
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
        let devices = Arc::new(Devices(devs), GFP_KERNEL)?;
        let manager = Manager::start(devices.clone())?;
        let proc = ProcEntry::new(c_str!("nbdinfo"), devices)?;
        pr_info!(
            "enbd {}: {} devices, queue depth {}\n",
            VERSION,
            proc.data().0.len(),
            depth
        );
        Ok(Self {
            _manager: manager,
            _proc: proc,
            _disks: disks,
        })
    }
}
