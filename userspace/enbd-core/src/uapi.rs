// SPDX-License-Identifier: GPL-2.0
//! The ioctl interface between `enbd-client` and `enbd.ko`.
//!
//! Like `wire.rs`, this file is compiled into both the module and userspace,
//! so the two sides cannot disagree. Arguments cross the boundary as byte
//! arrays with an explicit layout (native endianness, no padding) that
//! `to_bytes`/`from_bytes` encode, so neither side needs `unsafe` casts.
//!
//! All ioctls are issued on the block device (`/dev/enbdN`) and need
//! `CAP_SYS_ADMIN`; see `Documentation/ioctl.md`.

// The module may be built with rustc as old as 6.12's minimum (1.78), which
// lacks `is_multiple_of`.
#![allow(clippy::manual_is_multiple_of)]

/// ioctl "type" byte; 0xEB is unused in `ioctl-number.rst`.
pub const IOC_MAGIC: u32 = 0xEB;

const IOC_NONE: u32 = 0;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

const fn ioc(dir: u32, nr: u32, size: usize) -> u32 {
    (dir << 30) | ((size as u32) << 16) | (IOC_MAGIC << 8) | nr
}

/// Configure an idle device from the handshake's results. In: [`Config`];
/// out: the same with `token` filled in. `EBUSY` if already configured.
pub const IOC_CONFIGURE: u32 = ioc(IOC_READ | IOC_WRITE, 1, Config::SIZE);
/// Hand a connected socket to the device as a new channel. In: [`SockArg`].
pub const IOC_ADD_SOCK: u32 = ioc(IOC_WRITE, 2, SockArg::SIZE);
/// Send `NBD_CMD_DISC` on every channel once in-flight requests are answered,
/// release the channels and return the device to the unconfigured state.
pub const IOC_DISCONNECT: u32 = ioc(IOC_NONE, 3, 0);
/// Fail every pending request with an I/O error and release every channel at
/// once (ENBD's SIGUSR2 eject). The device returns to the unconfigured state.
pub const IOC_EJECT: u32 = ioc(IOC_NONE, 4, 0);
/// Read the device's state. Out: [`Status`].
pub const IOC_STATUS: u32 = ioc(IOC_READ, 5, Status::SIZE);
/// Wait until the device's epoch differs from the one given (a channel came
/// up or went down, or the state changed) or `timeout_ms` passed.
/// In/out: [`WaitArg`]; on return its `status` is current.
pub const IOC_WAIT: u32 = ioc(IOC_READ | IOC_WRITE, 6, WaitArg::SIZE);
/// Tell the device about its servers (multi-server mode): their addresses
/// and measured RTTs, for `/proc/nbdinfo`, and which one carries the I/O.
/// In: [`ServersArg`].
pub const IOC_SERVERS: u32 = ioc(IOC_WRITE, 7, ServersArg::SIZE);

/// Length of the device token in bytes (128 bits).
pub const TOKEN_LEN: usize = 16;
/// Length of the server and export name fields, NUL-padded.
pub const NAME_LEN: usize = 64;

/// Most servers one device knows (`SockArg::server` is below it).
pub const MAX_SERVERS: usize = 8;
/// `ServersArg::active` when no server is preferred: every channel carries.
pub const NO_SERVER: u32 = u32::MAX;

/// Smallest logical block size a device accepts.
pub const MIN_BLOCK_SIZE: u32 = 512;
/// Largest logical block size a device accepts (the page size on x86).
pub const MAX_BLOCK_SIZE: u32 = 4096;

/// Device states, as `Status::state` and in `/proc/nbdinfo`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum DevState {
    /// No export configured; capacity 0.
    Unconfigured = 0,
    /// Configured, but no working channel: requests wait.
    Waiting = 1,
    /// At least one working channel.
    Connected = 2,
    /// Disconnect or eject in progress.
    Closing = 3,
    /// No channel for longer than `dead_timeout`: requests fail with EIO at
    /// once until a channel is added again.
    Dead = 4,
}

impl DevState {
    /// Decodes a state number.
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            0 => DevState::Unconfigured,
            1 => DevState::Waiting,
            2 => DevState::Connected,
            3 => DevState::Closing,
            4 => DevState::Dead,
            _ => return None,
        })
    }

    /// The name used in `/proc/nbdinfo`.
    pub fn name(self) -> &'static str {
        match self {
            DevState::Unconfigured => "unconfigured",
            DevState::Waiting => "waiting",
            DevState::Connected => "connected",
            DevState::Closing => "closing",
            DevState::Dead => "dead",
        }
    }
}

/// Why an argument was refused; the kernel maps every variant to `EINVAL`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ArgError {
    /// The block size is not a power of two in 512..=4096.
    BlockSize,
    /// The maximum payload is below 4096 bytes or not a multiple of the
    /// block size.
    MaxPayload,
    /// The size is not a multiple of the block size, or too large.
    Size,
    /// Reserved bits or fields are set.
    Reserved,
    /// A name is not NUL-terminated.
    Name,
    /// A server index or count out of range.
    Server,
}

impl core::fmt::Display for ArgError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            ArgError::BlockSize => "block size must be a power of two from 512 to 4096",
            ArgError::MaxPayload => {
                "maximum payload must be 0 or a multiple of the block size of at least 4096"
            }
            ArgError::Size => "size must be a multiple of the block size and below 2^63",
            ArgError::Reserved => "reserved field set",
            ArgError::Name => "name not NUL-terminated",
            ArgError::Server => "server index or count out of range",
        })
    }
}

impl core::error::Error for ArgError {}

/// Little cursor over a fixed array, in native byte order.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl Cursor<'_> {
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        if let Some(src) = self.buf.get(self.pos..self.pos + N) {
            out.copy_from_slice(src);
        }
        self.pos += N;
        out
    }
    fn u32(&mut self) -> u32 {
        u32::from_ne_bytes(self.take())
    }
    fn u64(&mut self) -> u64 {
        u64::from_ne_bytes(self.take())
    }
}

struct Out<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl Out<'_> {
    fn put(&mut self, b: &[u8]) {
        if let Some(dst) = self.buf.get_mut(self.pos..self.pos + b.len()) {
            dst.copy_from_slice(b);
        }
        self.pos += b.len();
    }
}

/// Argument of [`IOC_CONFIGURE`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags from the handshake (`wire::tx::*`).
    pub nbd_flags: u32,
    /// Logical block size; 0 means 512.
    pub block_size: u32,
    /// Largest request payload the server accepts; 0 means 32 MiB.
    pub max_payload: u32,
    /// Must be 0.
    pub reserved: u32,
    /// Server address, for `/proc/nbdinfo` only.
    pub server: [u8; NAME_LEN],
    /// Export name, for `/proc/nbdinfo` only.
    pub export: [u8; NAME_LEN],
    /// Out: the device's token, needed by every later `IOC_ADD_SOCK`.
    pub token: [u8; TOKEN_LEN],
}

impl Default for Config {
    fn default() -> Self {
        Self {
            size: 0,
            nbd_flags: 0,
            block_size: 0,
            max_payload: 0,
            reserved: 0,
            server: [0; NAME_LEN],
            export: [0; NAME_LEN],
            token: [0; TOKEN_LEN],
        }
    }
}

impl Config {
    /// Size of the encoded argument.
    pub const SIZE: usize = 8 + 4 * 4 + 2 * NAME_LEN + TOKEN_LEN;

    /// Encodes the argument.
    pub fn to_bytes(self) -> [u8; Self::SIZE] {
        let mut buf = [0u8; Self::SIZE];
        let mut o = Out {
            buf: &mut buf,
            pos: 0,
        };
        o.put(&self.size.to_ne_bytes());
        o.put(&self.nbd_flags.to_ne_bytes());
        o.put(&self.block_size.to_ne_bytes());
        o.put(&self.max_payload.to_ne_bytes());
        o.put(&self.reserved.to_ne_bytes());
        o.put(&self.server);
        o.put(&self.export);
        o.put(&self.token);
        buf
    }

    /// Decodes the argument.
    pub fn from_bytes(buf: &[u8; Self::SIZE]) -> Self {
        let mut c = Cursor { buf, pos: 0 };
        Self {
            size: c.u64(),
            nbd_flags: c.u32(),
            block_size: c.u32(),
            max_payload: c.u32(),
            reserved: c.u32(),
            server: c.take(),
            export: c.take(),
            token: c.take(),
        }
    }

    /// The effective logical block size.
    pub fn logical_block_size(&self) -> u32 {
        if self.block_size == 0 {
            MIN_BLOCK_SIZE
        } else {
            self.block_size
        }
    }

    /// Checks what the kernel relies on: a sane block size, a size that is a
    /// whole number of blocks, NUL-terminated names, zero reserved fields.
    pub fn validate(&self) -> Result<(), ArgError> {
        let bs = self.logical_block_size();
        if !bs.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&bs) {
            return Err(ArgError::BlockSize);
        }
        if self.size % u64::from(bs) != 0 || self.size > i64::MAX as u64 {
            return Err(ArgError::Size);
        }
        // The block layer needs room for at least one page per request.
        if self.max_payload != 0
            && (self.max_payload < MAX_BLOCK_SIZE || self.max_payload % bs != 0)
        {
            return Err(ArgError::MaxPayload);
        }
        if self.reserved != 0 || self.nbd_flags > u32::from(u16::MAX) {
            return Err(ArgError::Reserved);
        }
        if !self.server.contains(&0) || !self.export.contains(&0) {
            return Err(ArgError::Name);
        }
        Ok(())
    }
}

/// Copies `s` into a NUL-padded name field, truncating it so a NUL remains.
pub fn name_field(s: &[u8]) -> [u8; NAME_LEN] {
    let mut out = [0u8; NAME_LEN];
    let n = s.len().min(NAME_LEN - 1);
    out[..n].copy_from_slice(&s[..n]);
    out
}

/// The bytes of a NUL-padded name field before the first NUL.
pub fn name_str(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}

/// `SockArg::flags`: the socket carries kernel TLS (`TLS_TX`/`TLS_RX` set).
pub const SOCK_KTLS: u32 = 1 << 0;
/// `SockArg::flags`: the socket is a plaintext pipe to a userspace TLS proxy.
pub const SOCK_TLS_PROXY: u32 = 1 << 1;
/// Every flag `IOC_ADD_SOCK` accepts.
pub const SOCK_FLAGS: u32 = SOCK_KTLS | SOCK_TLS_PROXY;

/// Argument of [`IOC_ADD_SOCK`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SockArg {
    /// A connected socket, past the handshake.
    pub fd: i32,
    /// `SOCK_KTLS` or `SOCK_TLS_PROXY` (shown in `/proc/nbdinfo`), or 0.
    pub flags: u32,
    /// Which of the device's servers the socket leads to, below
    /// [`MAX_SERVERS`]; 0 with a single server.
    pub server: u32,
    /// The token `IOC_CONFIGURE` returned.
    pub token: [u8; TOKEN_LEN],
}

impl SockArg {
    /// Size of the encoded argument.
    pub const SIZE: usize = 4 + 4 + 4 + TOKEN_LEN;

    /// Encodes the argument.
    pub fn to_bytes(self) -> [u8; Self::SIZE] {
        let mut buf = [0u8; Self::SIZE];
        let mut o = Out {
            buf: &mut buf,
            pos: 0,
        };
        o.put(&self.fd.to_ne_bytes());
        o.put(&self.flags.to_ne_bytes());
        o.put(&self.server.to_ne_bytes());
        o.put(&self.token);
        buf
    }

    /// Decodes the argument.
    pub fn from_bytes(buf: &[u8; Self::SIZE]) -> Self {
        let mut c = Cursor { buf, pos: 0 };
        Self {
            fd: i32::from_ne_bytes(c.take()),
            flags: c.u32(),
            server: c.u32(),
            token: c.take(),
        }
    }
}

/// Argument of [`IOC_STATUS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Status {
    /// A [`DevState`] number.
    pub state: u32,
    /// Working channels.
    pub channels: u32,
    /// Requests in the journal (queued or sent).
    pub inflight: u32,
    /// Changes whenever a channel comes up or goes down or the state
    /// changes; what `IOC_WAIT` waits on.
    pub epoch: u32,
    /// Configured size in bytes.
    pub size: u64,
    /// Socket handoffs refused for a wrong token.
    pub token_rejects: u64,
    /// Working channels to each server (by `SockArg::server`).
    pub server_channels: [u8; MAX_SERVERS],
}

impl Status {
    /// Size of the encoded argument.
    pub const SIZE: usize = 4 * 4 + 8 * 2 + MAX_SERVERS;

    /// Encodes the argument.
    pub fn to_bytes(self) -> [u8; Self::SIZE] {
        let mut buf = [0u8; Self::SIZE];
        let mut o = Out {
            buf: &mut buf,
            pos: 0,
        };
        o.put(&self.state.to_ne_bytes());
        o.put(&self.channels.to_ne_bytes());
        o.put(&self.inflight.to_ne_bytes());
        o.put(&self.epoch.to_ne_bytes());
        o.put(&self.size.to_ne_bytes());
        o.put(&self.token_rejects.to_ne_bytes());
        o.put(&self.server_channels);
        buf
    }

    /// Decodes the argument.
    pub fn from_bytes(buf: &[u8; Self::SIZE]) -> Self {
        let mut c = Cursor { buf, pos: 0 };
        Self {
            state: c.u32(),
            channels: c.u32(),
            inflight: c.u32(),
            epoch: c.u32(),
            size: c.u64(),
            token_rejects: c.u64(),
            server_channels: c.take(),
        }
    }
}

/// Argument of [`IOC_WAIT`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct WaitArg {
    /// In: the epoch the caller last saw.
    pub epoch: u32,
    /// In: longest wait in milliseconds.
    pub timeout_ms: u32,
    /// Out: the device's status when the call returns.
    pub status: Status,
}

impl WaitArg {
    /// Size of the encoded argument.
    pub const SIZE: usize = 8 + Status::SIZE;

    /// Encodes the argument.
    pub fn to_bytes(self) -> [u8; Self::SIZE] {
        let mut buf = [0u8; Self::SIZE];
        let mut o = Out {
            buf: &mut buf,
            pos: 0,
        };
        o.put(&self.epoch.to_ne_bytes());
        o.put(&self.timeout_ms.to_ne_bytes());
        o.put(&self.status.to_bytes());
        buf
    }

    /// Decodes the argument.
    pub fn from_bytes(buf: &[u8; Self::SIZE]) -> Self {
        let mut c = Cursor { buf, pos: 0 };
        let epoch = c.u32();
        let timeout_ms = c.u32();
        let status: [u8; Status::SIZE] = c.take();
        Self {
            epoch,
            timeout_ms,
            status: Status::from_bytes(&status),
        }
    }
}

/// `ServerArg::state`: not probed yet.
pub const SERVER_UNKNOWN: u32 = 0;
/// `ServerArg::state`: the last probes were answered.
pub const SERVER_UP: u32 = 1;
/// `ServerArg::state`: the helper cannot reach it.
pub const SERVER_DOWN: u32 = 2;

/// One server of [`ServersArg`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerArg {
    /// Address, NUL-terminated, for `/proc/nbdinfo` only.
    pub addr: [u8; NAME_LEN],
    /// Average probe round trip in microseconds; 0 if not measured.
    pub rtt_us: u32,
    /// Probes sent so far.
    pub probes: u32,
    /// `SERVER_UNKNOWN`, `SERVER_UP` or `SERVER_DOWN`.
    pub state: u32,
}

impl Default for ServerArg {
    fn default() -> Self {
        Self {
            addr: [0; NAME_LEN],
            rtt_us: 0,
            probes: 0,
            state: SERVER_UNKNOWN,
        }
    }
}

impl ServerArg {
    const SIZE: usize = NAME_LEN + 3 * 4;
}

/// Argument of [`IOC_SERVERS`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ServersArg {
    /// The token `IOC_CONFIGURE` returned.
    pub token: [u8; TOKEN_LEN],
    /// Servers described, 1..=[`MAX_SERVERS`]; the rest of `servers` is
    /// ignored.
    pub count: u32,
    /// The server whose channels carry the requests while any of them can,
    /// or [`NO_SERVER`].
    pub active: u32,
    pub servers: [ServerArg; MAX_SERVERS],
}

impl ServersArg {
    /// Size of the encoded argument.
    pub const SIZE: usize = TOKEN_LEN + 2 * 4 + MAX_SERVERS * ServerArg::SIZE;

    /// Encodes the argument.
    pub fn to_bytes(self) -> [u8; Self::SIZE] {
        let mut buf = [0u8; Self::SIZE];
        let mut o = Out {
            buf: &mut buf,
            pos: 0,
        };
        o.put(&self.token);
        o.put(&self.count.to_ne_bytes());
        o.put(&self.active.to_ne_bytes());
        for s in &self.servers {
            o.put(&s.addr);
            o.put(&s.rtt_us.to_ne_bytes());
            o.put(&s.probes.to_ne_bytes());
            o.put(&s.state.to_ne_bytes());
        }
        buf
    }

    /// Decodes the argument.
    pub fn from_bytes(buf: &[u8; Self::SIZE]) -> Self {
        let mut c = Cursor { buf, pos: 0 };
        let token = c.take();
        let count = c.u32();
        let active = c.u32();
        let mut servers = [ServerArg::default(); MAX_SERVERS];
        for s in &mut servers {
            s.addr = c.take();
            s.rtt_us = c.u32();
            s.probes = c.u32();
            s.state = c.u32();
        }
        Self {
            token,
            count,
            active,
            servers,
        }
    }

    /// Checks what the kernel relies on: a count in range, an active server
    /// among them (or none), known states and NUL-terminated addresses.
    pub fn validate(&self) -> Result<(), ArgError> {
        let n = self.count as usize;
        if n == 0 || n > MAX_SERVERS || (self.active != NO_SERVER && self.active >= self.count) {
            return Err(ArgError::Server);
        }
        for s in &self.servers[..n] {
            if !s.addr.contains(&0) {
                return Err(ArgError::Name);
            }
            if s.state > SERVER_DOWN {
                return Err(ArgError::Reserved);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_are_stable() {
        // _IOWR(0xEB, 1, 168), _IOW(0xEB, 2, 28), _IO(0xEB, 3), _IO(0xEB, 4),
        // _IOR(0xEB, 5, 40), _IOWR(0xEB, 6, 48), _IOW(0xEB, 7, 632)
        assert_eq!(Config::SIZE, 168);
        assert_eq!(IOC_CONFIGURE, 0xC0A8_EB01);
        assert_eq!(IOC_ADD_SOCK, 0x401C_EB02);
        assert_eq!(IOC_DISCONNECT, 0x0000_EB03);
        assert_eq!(IOC_EJECT, 0x0000_EB04);
        assert_eq!(IOC_STATUS, 0x8028_EB05);
        assert_eq!(IOC_WAIT, 0xC030_EB06);
        assert_eq!(ServersArg::SIZE, 632);
        assert_eq!(IOC_SERVERS, 0x4278_EB07);
    }

    #[test]
    fn config_round_trip_and_validation() {
        let mut c = Config {
            size: 1 << 30,
            nbd_flags: 0x1ff,
            block_size: 4096,
            max_payload: 1 << 20,
            server: name_field(b"10.0.0.1:10809"),
            export: name_field(b"disk"),
            token: [7; TOKEN_LEN],
            ..Config::default()
        };
        assert_eq!(Config::from_bytes(&c.to_bytes()), c);
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(name_str(&c.export), b"disk");
        c.block_size = 1024 + 512;
        assert_eq!(c.validate(), Err(ArgError::BlockSize));
        c.block_size = 8192;
        assert_eq!(c.validate(), Err(ArgError::BlockSize));
        c.block_size = 0;
        c.size = 1000;
        assert_eq!(c.validate(), Err(ArgError::Size));
        c.size = 1024;
        c.server = [b'x'; NAME_LEN];
        assert_eq!(c.validate(), Err(ArgError::Name));
        c.server = name_field(&[b'y'; 200]);
        assert_eq!(c.validate(), Ok(()));
        c.reserved = 1;
        assert_eq!(c.validate(), Err(ArgError::Reserved));
        c.reserved = 0;
        for bad in [1, 511, 512, 4095, 4096 + 512 + 1] {
            c.max_payload = bad;
            assert_eq!(c.validate(), Err(ArgError::MaxPayload), "max_payload {bad}");
        }
        for good in [0, 4096, 4096 + 512, 1 << 25, u32::MAX - 511] {
            c.max_payload = good;
            assert_eq!(c.validate(), Ok(()), "max_payload {good}");
        }
    }

    #[test]
    fn sock_and_status_round_trip() {
        let s = SockArg {
            fd: -3,
            flags: 0,
            server: 2,
            token: [0xaa; TOKEN_LEN],
        };
        assert_eq!(SockArg::from_bytes(&s.to_bytes()), s);
        let st = Status {
            state: DevState::Connected as u32,
            channels: 4,
            inflight: 17,
            epoch: 9,
            size: 5 << 30,
            token_rejects: 2,
            server_channels: [1, 2, 0, 0, 0, 0, 0, 9],
        };
        assert_eq!(Status::from_bytes(&st.to_bytes()), st);
        assert_eq!(DevState::from_u32(st.state), Some(DevState::Connected));
        assert_eq!(DevState::from_u32(9), None);
        let w = WaitArg {
            epoch: 3,
            timeout_ms: 1000,
            status: st,
        };
        assert_eq!(WaitArg::from_bytes(&w.to_bytes()), w);
    }

    #[test]
    fn servers_round_trip_and_validation() {
        let mut a = ServersArg {
            token: [3; TOKEN_LEN],
            count: 3,
            active: 1,
            ..ServersArg::default()
        };
        for (i, s) in a.servers.iter_mut().enumerate() {
            s.addr = name_field(format!("10.99.{i}.2:10809").as_bytes());
            s.rtt_us = 1000 * i as u32;
            s.probes = i as u32;
            s.state = SERVER_UP;
        }
        assert_eq!(ServersArg::from_bytes(&a.to_bytes()), a);
        assert_eq!(a.validate(), Ok(()));
        a.active = NO_SERVER;
        assert_eq!(a.validate(), Ok(()));
        a.active = 3;
        assert_eq!(a.validate(), Err(ArgError::Server));
        a.active = 0;
        for bad in [0, MAX_SERVERS as u32 + 1, u32::MAX] {
            a.count = bad;
            assert_eq!(a.validate(), Err(ArgError::Server), "count {bad}");
        }
        a.count = 3;
        a.servers[2].state = 3;
        assert_eq!(a.validate(), Err(ArgError::Reserved));
        a.servers[2].state = SERVER_DOWN;
        a.servers[1].addr = [b'x'; NAME_LEN];
        assert_eq!(a.validate(), Err(ArgError::Name));
        // Only the described servers are checked.
        a.servers[1].addr = name_field(b"h");
        a.servers[5].addr = [b'x'; NAME_LEN];
        a.servers[5].state = 77;
        assert_eq!(a.validate(), Ok(()));
    }
}
