// SPDX-License-Identifier: GPL-2.0
//! The NBD wire format: fixed newstyle handshake and transmission phase.
//!
//! This is the only copy of the protocol in enbd. The kernel module compiles
//! this file into `enbd.ko` (`#[path]` include) and userspace uses it through
//! the `enbd-core` crate, so it must stay `no_std`, allocation-free and free of
//! `unsafe`. Every decoder takes untrusted bytes and returns an error rather
//! than panicking. All integers are big-endian on the wire.
//!
//! Reference: the NBD protocol, `doc/proto.md` in NetworkBlockDevice/nbd.

use core::fmt;

/// `"NBDMAGIC"`: the first eight bytes a server sends.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
/// `"IHAVEOPT"`: newstyle marker, and the magic of every option request.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk (only sent after `OPT_STRUCTURED_REPLY`).
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags, sent by the server in the greeting.
pub mod handshake {
    /// The server speaks the fixed newstyle protocol.
    pub const FIXED_NEWSTYLE: u16 = 1 << 0;
    /// The server can omit the 124 zero bytes after `OPT_EXPORT_NAME`.
    pub const NO_ZEROES: u16 = 1 << 1;
    /// Client flag: the client speaks the fixed newstyle protocol.
    pub const C_FIXED_NEWSTYLE: u32 = 1 << 0;
    /// Client flag: omit the 124 zero bytes.
    pub const C_NO_ZEROES: u32 = 1 << 1;
    /// Every client flag this implementation knows.
    pub const C_KNOWN: u32 = C_FIXED_NEWSTYLE | C_NO_ZEROES;
}

/// Transmission flags, sent with the export size.
pub mod tx {
    /// Must be set by servers.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// The export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// The server supports `CMD_FLUSH`.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// The server supports the `FUA` command flag.
    pub const SEND_FUA: u16 = 1 << 3;
    /// The export has rotational characteristics.
    pub const ROTATIONAL: u16 = 1 << 4;
    /// The server supports `CMD_TRIM`.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// The server supports `CMD_WRITE_ZEROES`.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// The server supports the `DF` command flag.
    pub const SEND_DF: u16 = 1 << 7;
    /// Several connections to this export see one consistent cache.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
    /// The server supports `CMD_RESIZE`.
    pub const SEND_RESIZE: u16 = 1 << 9;
    /// The server supports `CMD_CACHE`.
    pub const SEND_CACHE: u16 = 1 << 10;
    /// The server supports the `FAST_ZERO` command flag.
    pub const SEND_FAST_ZERO: u16 = 1 << 11;
}

/// Option codes sent by the client during the handshake.
pub mod opt {
    /// Choose an export and end the handshake (no error reporting).
    pub const EXPORT_NAME: u32 = 1;
    /// Abort the handshake.
    pub const ABORT: u32 = 2;
    /// List the exports.
    pub const LIST: u32 = 3;
    /// Upgrade the connection to TLS.
    pub const STARTTLS: u32 = 5;
    /// Ask about an export without choosing it.
    pub const INFO: u32 = 6;
    /// Choose an export and end the handshake.
    pub const GO: u32 = 7;
    /// Ask for structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
    /// List the metadata contexts matching some queries.
    pub const LIST_META_CONTEXT: u32 = 9;
    /// Select the metadata contexts `CMD_BLOCK_STATUS` reports.
    pub const SET_META_CONTEXT: u32 = 10;

    /// A short name for logs and errors.
    pub fn name(option: u32) -> &'static str {
        match option {
            EXPORT_NAME => "EXPORT_NAME",
            ABORT => "ABORT",
            LIST => "LIST",
            4 => "PEEK_EXPORT",
            STARTTLS => "STARTTLS",
            INFO => "INFO",
            GO => "GO",
            STRUCTURED_REPLY => "STRUCTURED_REPLY",
            LIST_META_CONTEXT => "LIST_META_CONTEXT",
            SET_META_CONTEXT => "SET_META_CONTEXT",
            11 => "EXTENDED_HEADERS",
            _ => "unknown",
        }
    }
}

/// Option reply types.
pub mod rep {
    /// The option succeeded; ends the reply.
    pub const ACK: u32 = 1;
    /// One export in a `LIST` reply.
    pub const SERVER: u32 = 2;
    /// One piece of information in an `INFO`/`GO` reply.
    pub const INFO: u32 = 3;
    /// One metadata context in a `LIST_META_CONTEXT`/`SET_META_CONTEXT` reply.
    pub const META_CONTEXT: u32 = 4;
    /// Bit set in every error reply type.
    pub const ERR: u32 = 1 << 31;
    /// The option is not known to the server.
    pub const ERR_UNSUP: u32 = ERR | 1;
    /// Forbidden by server policy.
    pub const ERR_POLICY: u32 = ERR | 2;
    /// Syntactically or semantically invalid.
    pub const ERR_INVALID: u32 = ERR | 3;
    /// Not supported on this platform.
    pub const ERR_PLATFORM: u32 = ERR | 4;
    /// TLS is required first.
    pub const ERR_TLS_REQD: u32 = ERR | 5;
    /// The export does not exist.
    pub const ERR_UNKNOWN: u32 = ERR | 6;
    /// The server is shutting down.
    pub const ERR_SHUTDOWN: u32 = ERR | 7;
    /// The client must ask for block sizes.
    pub const ERR_BLOCK_SIZE_REQD: u32 = ERR | 8;
    /// The request or reply is too large.
    pub const ERR_TOO_BIG: u32 = ERR | 9;

    /// Whether a reply type is an error.
    pub fn is_err(reply: u32) -> bool {
        reply & ERR != 0
    }

    /// A short description of an error reply, for users.
    pub fn describe(reply: u32) -> &'static str {
        match reply {
            ACK => "acknowledged",
            SERVER => "export list entry",
            INFO => "export information",
            META_CONTEXT => "metadata context",
            ERR_UNSUP => "option not supported by the server",
            ERR_POLICY => "refused by server policy",
            ERR_INVALID => "invalid request",
            ERR_PLATFORM => "not supported on the server's platform",
            ERR_TLS_REQD => "the server requires TLS",
            ERR_UNKNOWN => "no such export",
            ERR_SHUTDOWN => "the server is shutting down",
            ERR_BLOCK_SIZE_REQD => "the server requires block size negotiation",
            ERR_TOO_BIG => "request too big",
            _ if is_err(reply) => "unknown server error",
            _ => "unknown reply",
        }
    }
}

/// Information types in `INFO`/`GO` requests and `REP_INFO` replies.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Canonical export name.
    pub const NAME: u16 = 1;
    /// Human-readable description.
    pub const DESCRIPTION: u16 = 2;
    /// Minimum, preferred and maximum block sizes.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Cmd {
    /// Read `length` bytes at `offset`; the reply carries the data.
    Read = 0,
    /// Write the `length` bytes that follow the request.
    Write = 1,
    /// Disconnect; no reply.
    Disc = 2,
    /// Flush the server's write cache.
    Flush = 3,
    /// Discard a range.
    Trim = 4,
    /// Prefetch a range.
    Cache = 5,
    /// Write zeroes to a range without sending them.
    WriteZeroes = 6,
    /// Report the status (allocation, ...) of a range; structured reply only.
    BlockStatus = 7,
}

impl Cmd {
    /// Decodes a command type; `None` for types this implementation does not know.
    pub fn from_u16(v: u16) -> Option<Self> {
        Some(match v {
            0 => Cmd::Read,
            1 => Cmd::Write,
            2 => Cmd::Disc,
            3 => Cmd::Flush,
            4 => Cmd::Trim,
            5 => Cmd::Cache,
            6 => Cmd::WriteZeroes,
            7 => Cmd::BlockStatus,
            _ => return None,
        })
    }

    /// The command's protocol name.
    pub fn name(self) -> &'static str {
        match self {
            Cmd::Read => "READ",
            Cmd::Write => "WRITE",
            Cmd::Disc => "DISC",
            Cmd::Flush => "FLUSH",
            Cmd::Trim => "TRIM",
            Cmd::Cache => "CACHE",
            Cmd::WriteZeroes => "WRITE_ZEROES",
            Cmd::BlockStatus => "BLOCK_STATUS",
        }
    }
}

/// Command flags.
pub mod cmd_flags {
    /// Force unit access: the data is stable before the reply.
    pub const FUA: u16 = 1 << 0;
    /// `WRITE_ZEROES` must write, not punch a hole.
    pub const NO_HOLE: u16 = 1 << 1;
    /// Do not fragment a structured read reply.
    pub const DF: u16 = 1 << 2;
    /// `BLOCK_STATUS`: one extent per context is enough.
    pub const REQ_ONE: u16 = 1 << 3;
    /// Fail `WRITE_ZEROES` fast instead of writing slowly.
    pub const FAST_ZERO: u16 = 1 << 4;
}

/// Error values in replies. They are Linux errno values; others must be mapped.
pub mod errno {
    /// Operation not permitted (for example a write to a read-only export).
    pub const EPERM: u32 = 1;
    /// I/O error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument (for example an out-of-range offset).
    pub const EINVAL: u32 = 22;
    /// No space left.
    pub const ENOSPC: u32 = 28;
    /// Value too large (a request longer than the server allows).
    pub const EOVERFLOW: u32 = 75;
    /// Operation not supported.
    pub const ENOTSUP: u32 = 95;
    /// The server is shutting down.
    pub const ESHUTDOWN: u32 = 108;

    /// Maps any Linux errno to the set the protocol allows.
    pub fn from_linux(e: i32) -> u32 {
        match e.unsigned_abs() {
            v @ (EPERM | EIO | ENOMEM | EINVAL | ENOSPC | EOVERFLOW | ENOTSUP | ESHUTDOWN) => v,
            13 /* EACCES */ | 30 /* EROFS */ => EPERM,
            27 /* EFBIG */ => ENOSPC,
            122 /* EDQUOT */ => ENOSPC,
            _ => EIO,
        }
    }
}

/// The protocol's limit on an option payload this implementation accepts.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Longest export name accepted (the protocol allows 4096 bytes).
pub const MAX_NAME_LEN: usize = 4096;
/// Default maximum payload of one request (32 MiB, what Linux nbd also assumes).
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 << 20;

/// A decoding error. Each one means the peer is broken or hostile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireError {
    /// The buffer is shorter than the structure.
    Short,
    /// A magic number did not match.
    BadMagic(u64),
    /// A length field is larger than allowed.
    TooLong(u32),
    /// A length field disagrees with the data.
    BadLength,
    /// A field holds a value the protocol forbids.
    Invalid(&'static str),
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Short => f.write_str("message too short"),
            WireError::BadMagic(m) => write!(f, "bad magic {m:#x}"),
            WireError::TooLong(n) => write!(f, "length {n} too large"),
            WireError::BadLength => f.write_str("inconsistent length"),
            WireError::Invalid(what) => write!(f, "invalid {what}"),
        }
    }
}

impl core::error::Error for WireError {}

/// Reads big-endian fields from untrusted bytes without panicking.
#[derive(Clone, Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Starts reading at the beginning of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// Takes the next `n` bytes.
    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if n > self.buf.len() {
            return Err(WireError::Short);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    /// Reads a big-endian `u16`.
    pub fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    /// Reads a big-endian `u32`.
    pub fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    /// Reads a big-endian `u64`.
    pub fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array()?))
    }
}

/// Writes big-endian fields into a fixed buffer. Overflow is a caller bug, so
/// it is reported as a short buffer rather than a panic.
pub struct Writer<'a> {
    buf: &'a mut [u8],
    pos: usize,
}

impl<'a> Writer<'a> {
    /// Starts writing at the beginning of `buf`.
    pub fn new(buf: &'a mut [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.pos
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }

    /// Appends raw bytes.
    pub fn bytes(&mut self, b: &[u8]) -> Result<&mut Self, WireError> {
        let end = self.pos.checked_add(b.len()).ok_or(WireError::Short)?;
        self.buf
            .get_mut(self.pos..end)
            .ok_or(WireError::Short)?
            .copy_from_slice(b);
        self.pos = end;
        Ok(self)
    }

    /// Appends a big-endian `u16`.
    pub fn u16(&mut self, v: u16) -> Result<&mut Self, WireError> {
        self.bytes(&v.to_be_bytes())
    }

    /// Appends a big-endian `u32`.
    pub fn u32(&mut self, v: u32) -> Result<&mut Self, WireError> {
        self.bytes(&v.to_be_bytes())
    }

    /// Appends a big-endian `u64`.
    pub fn u64(&mut self, v: u64) -> Result<&mut Self, WireError> {
        self.bytes(&v.to_be_bytes())
    }
}

fn encode<const N: usize>(f: impl FnOnce(&mut Writer<'_>) -> Result<(), WireError>) -> [u8; N] {
    let mut buf = [0u8; N];
    // The fixed-size encoders below write exactly N bytes; a mismatch would be
    // caught by the round-trip tests, so the result can be ignored here.
    let _ = f(&mut Writer::new(&mut buf));
    buf
}

/// The server's first message: `NBDMAGIC`, `IHAVEOPT`, handshake flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Greeting {
    /// Handshake flags (`handshake::FIXED_NEWSTYLE`, ...).
    pub flags: u16,
}

impl Greeting {
    /// Encoded length.
    pub const LEN: usize = 18;

    /// Encodes the greeting.
    pub fn encode(&self) -> [u8; Self::LEN] {
        encode(|w| {
            w.u64(NBDMAGIC)?.u64(IHAVEOPT)?.u16(self.flags)?;
            Ok(())
        })
    }

    /// Decodes a greeting; oldstyle servers are refused as bad magic.
    pub fn decode(buf: &[u8; Self::LEN]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf);
        let m = r.u64()?;
        if m != NBDMAGIC {
            return Err(WireError::BadMagic(m));
        }
        let m = r.u64()?;
        if m != IHAVEOPT {
            return Err(WireError::BadMagic(m));
        }
        Ok(Self { flags: r.u16()? })
    }
}

/// Header of an option request (`IHAVEOPT`, option, payload length).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionHeader {
    /// Option code (`opt::*`).
    pub option: u32,
    /// Length of the payload that follows.
    pub length: u32,
}

impl OptionHeader {
    /// Encoded length.
    pub const LEN: usize = 16;

    /// Encodes the header.
    pub fn encode(&self) -> [u8; Self::LEN] {
        encode(|w| {
            w.u64(IHAVEOPT)?.u32(self.option)?.u32(self.length)?;
            Ok(())
        })
    }

    /// Decodes a header. The payload length is checked by the caller against
    /// its own limit, because it must still skip or refuse the payload.
    pub fn decode(buf: &[u8; Self::LEN]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf);
        let m = r.u64()?;
        if m != IHAVEOPT {
            return Err(WireError::BadMagic(m));
        }
        Ok(Self {
            option: r.u32()?,
            length: r.u32()?,
        })
    }
}

/// Header of an option reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct OptionReplyHeader {
    /// The option being answered.
    pub option: u32,
    /// Reply type (`rep::*`).
    pub reply: u32,
    /// Length of the payload that follows.
    pub length: u32,
}

impl OptionReplyHeader {
    /// Encoded length.
    pub const LEN: usize = 20;

    /// Encodes the header.
    pub fn encode(&self) -> [u8; Self::LEN] {
        encode(|w| {
            w.u64(OPT_REPLY_MAGIC)?
                .u32(self.option)?
                .u32(self.reply)?
                .u32(self.length)?;
            Ok(())
        })
    }

    /// Decodes a header; refuses payloads above `MAX_OPTION_LEN`.
    pub fn decode(buf: &[u8; Self::LEN]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf);
        let m = r.u64()?;
        if m != OPT_REPLY_MAGIC {
            return Err(WireError::BadMagic(m));
        }
        let h = Self {
            option: r.u32()?,
            reply: r.u32()?,
            length: r.u32()?,
        };
        if h.length > MAX_OPTION_LEN {
            return Err(WireError::TooLong(h.length));
        }
        Ok(h)
    }
}

/// The payload of `OPT_INFO` and `OPT_GO`: an export name and the
/// information types the client asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GoRequest<'a> {
    /// The export name (not necessarily UTF-8).
    pub name: &'a [u8],
    requests: &'a [u8],
}

impl<'a> GoRequest<'a> {
    /// Parses an `INFO`/`GO` payload.
    pub fn decode(payload: &'a [u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(payload);
        let name_len = r.u32()?;
        if name_len as usize > MAX_NAME_LEN {
            return Err(WireError::TooLong(name_len));
        }
        let name = r.bytes(name_len as usize)?;
        let n = r.u16()? as usize;
        let requests = r.bytes(n.checked_mul(2).ok_or(WireError::BadLength)?)?;
        if r.remaining() != 0 {
            return Err(WireError::BadLength);
        }
        Ok(Self { name, requests })
    }

    /// The information types asked for, in order.
    pub fn info_requests(&self) -> impl Iterator<Item = u16> + 'a {
        self.requests
            .chunks_exact(2)
            .map(|c| u16::from_be_bytes([c[0], c[1]]))
    }

    /// Encodes a payload into `out`, returning its length.
    pub fn encode(name: &[u8], infos: &[u16], out: &mut [u8]) -> Result<usize, WireError> {
        let name_len = u32::try_from(name.len()).map_err(|_| WireError::BadLength)?;
        let n = u16::try_from(infos.len()).map_err(|_| WireError::BadLength)?;
        let mut w = Writer::new(out);
        w.u32(name_len)?.bytes(name)?.u16(n)?;
        for i in infos {
            w.u16(*i)?;
        }
        Ok(w.len())
    }
}

/// One `REP_INFO` payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Info<'a> {
    /// `INFO_EXPORT`: size in bytes and transmission flags.
    Export {
        /// Export size in bytes.
        size: u64,
        /// Transmission flags (`tx::*`).
        flags: u16,
    },
    /// `INFO_BLOCK_SIZE`.
    BlockSize {
        /// Smallest block size the server handles.
        min: u32,
        /// Preferred block size.
        preferred: u32,
        /// Largest request payload the server accepts.
        max: u32,
    },
    /// `INFO_NAME`.
    Name(&'a [u8]),
    /// `INFO_DESCRIPTION`.
    Description(&'a [u8]),
    /// A type this implementation does not know; clients must ignore it.
    Unknown(u16),
}

impl<'a> Info<'a> {
    /// Length of an encoded `INFO_EXPORT`.
    pub const EXPORT_LEN: usize = 12;
    /// Length of an encoded `INFO_BLOCK_SIZE`.
    pub const BLOCK_SIZE_LEN: usize = 14;

    /// Parses a `REP_INFO` payload.
    pub fn decode(payload: &'a [u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(payload);
        let kind = r.u16()?;
        let info = match kind {
            info::EXPORT => Info::Export {
                size: r.u64()?,
                flags: r.u16()?,
            },
            info::BLOCK_SIZE => Info::BlockSize {
                min: r.u32()?,
                preferred: r.u32()?,
                max: r.u32()?,
            },
            info::NAME => Info::Name(r.bytes(r.remaining())?),
            info::DESCRIPTION => Info::Description(r.bytes(r.remaining())?),
            other => {
                let _ = r.bytes(r.remaining());
                Info::Unknown(other)
            }
        };
        if r.remaining() != 0 {
            return Err(WireError::BadLength);
        }
        if let Info::BlockSize {
            min,
            preferred,
            max,
        } = info
        {
            let ok = min.is_power_of_two()
                && preferred.is_power_of_two()
                && min <= preferred
                && min <= 65536
                && preferred >= 512
                && (max == u32::MAX || (max >= preferred && max % min == 0));
            if !ok {
                return Err(WireError::Invalid("block size constraints"));
            }
        }
        Ok(info)
    }

    /// Encodes into `out`, returning the length.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, WireError> {
        let mut w = Writer::new(out);
        match *self {
            Info::Export { size, flags } => {
                w.u16(info::EXPORT)?.u64(size)?.u16(flags)?;
            }
            Info::BlockSize {
                min,
                preferred,
                max,
            } => {
                w.u16(info::BLOCK_SIZE)?
                    .u32(min)?
                    .u32(preferred)?
                    .u32(max)?;
            }
            Info::Name(n) => {
                w.u16(info::NAME)?.bytes(n)?;
            }
            Info::Description(d) => {
                w.u16(info::DESCRIPTION)?.bytes(d)?;
            }
            Info::Unknown(kind) => {
                w.u16(kind)?;
            }
        }
        Ok(w.len())
    }
}

/// Parses one `REP_SERVER` payload of a `LIST` reply: (name, description).
pub fn decode_list_entry(payload: &[u8]) -> Result<(&[u8], &[u8]), WireError> {
    let mut r = Reader::new(payload);
    let n = r.u32()?;
    if n as usize > MAX_NAME_LEN {
        return Err(WireError::TooLong(n));
    }
    let name = r.bytes(n as usize)?;
    let desc = r.bytes(r.remaining())?;
    Ok((name, desc))
}

/// Encodes a `REP_SERVER` payload into `out`, returning its length.
pub fn encode_list_entry(name: &[u8], out: &mut [u8]) -> Result<usize, WireError> {
    encode_list_entry_described(name, b"", out)
}

/// Encodes a `REP_SERVER` payload with a description after the name.
pub fn encode_list_entry_described(
    name: &[u8],
    description: &[u8],
    out: &mut [u8],
) -> Result<usize, WireError> {
    let n = u32::try_from(name.len()).map_err(|_| WireError::BadLength)?;
    let mut w = Writer::new(out);
    w.u32(n)?.bytes(name)?.bytes(description)?;
    Ok(w.len())
}

/// The server's answer to `OPT_EXPORT_NAME`: size, flags and, unless the
/// client set `C_NO_ZEROES`, 124 zero bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExportNameReply {
    /// Export size in bytes.
    pub size: u64,
    /// Transmission flags.
    pub flags: u16,
}

impl ExportNameReply {
    /// Length without the zero padding.
    pub const LEN: usize = 10;
    /// Length of the zero padding.
    pub const ZEROES: usize = 124;

    /// Encodes the reply without padding.
    pub fn encode(&self) -> [u8; Self::LEN] {
        encode(|w| {
            w.u64(self.size)?.u16(self.flags)?;
            Ok(())
        })
    }

    /// Decodes the reply (without padding).
    pub fn decode(buf: &[u8; Self::LEN]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf);
        Ok(Self {
            size: r.u64()?,
            flags: r.u16()?,
        })
    }
}

/// A transmission request header. A `WRITE` is followed by `length` bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Request {
    /// Command flags (`cmd_flags::*`).
    pub flags: u16,
    /// Command type; see [`Cmd`]. Kept raw so unknown commands can be refused
    /// with `EINVAL` instead of dropping the connection.
    pub cmd: u16,
    /// Opaque cookie echoed in the reply ("handle" in older texts).
    pub cookie: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length.
    pub length: u32,
}

impl Request {
    /// Encoded length.
    pub const LEN: usize = 28;

    /// Builds a request for a known command.
    pub fn new(cmd: Cmd, flags: u16, cookie: u64, offset: u64, length: u32) -> Self {
        Self {
            flags,
            cmd: cmd as u16,
            cookie,
            offset,
            length,
        }
    }

    /// Encodes the header.
    pub fn encode(&self) -> [u8; Self::LEN] {
        encode(|w| {
            w.u32(REQUEST_MAGIC)?
                .u16(self.flags)?
                .u16(self.cmd)?
                .u64(self.cookie)?
                .u64(self.offset)?
                .u32(self.length)?;
            Ok(())
        })
    }

    /// Decodes a header; only the magic is checked here.
    pub fn decode(buf: &[u8; Self::LEN]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf);
        let m = r.u32()?;
        if m != REQUEST_MAGIC {
            return Err(WireError::BadMagic(m.into()));
        }
        Ok(Self {
            flags: r.u16()?,
            cmd: r.u16()?,
            cookie: r.u64()?,
            offset: r.u64()?,
            length: r.u32()?,
        })
    }

    /// The command, if known.
    pub fn command(&self) -> Option<Cmd> {
        Cmd::from_u16(self.cmd)
    }

    /// Bytes of payload that follow this request on the wire.
    pub fn payload_len(&self) -> u32 {
        if self.cmd == Cmd::Write as u16 {
            self.length
        } else {
            0
        }
    }
}

/// A simple reply header. A successful `READ` reply is followed by the data.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SimpleReply {
    /// 0 or an `errno::*` value.
    pub error: u32,
    /// The request's cookie.
    pub cookie: u64,
}

impl SimpleReply {
    /// Encoded length.
    pub const LEN: usize = 16;

    /// Encodes the header.
    pub fn encode(&self) -> [u8; Self::LEN] {
        encode(|w| {
            w.u32(SIMPLE_REPLY_MAGIC)?
                .u32(self.error)?
                .u64(self.cookie)?;
            Ok(())
        })
    }

    /// Decodes a header. A structured reply magic is refused too: enbd never
    /// negotiates structured replies, so one means a confused peer.
    pub fn decode(buf: &[u8; Self::LEN]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf);
        let m = r.u32()?;
        if m != SIMPLE_REPLY_MAGIC {
            return Err(WireError::BadMagic(m.into()));
        }
        Ok(Self {
            error: r.u32()?,
            cookie: r.u64()?,
        })
    }
}

/// Flags of a structured reply chunk.
pub mod reply_flags {
    /// The last chunk of its reply.
    pub const DONE: u16 = 1 << 0;
}

/// Structured reply chunk types.
pub mod chunk {
    /// No payload: ends a reply that needs nothing more.
    pub const NONE: u16 = 0;
    /// `READ` data: offset, then the bytes.
    pub const OFFSET_DATA: u16 = 1;
    /// `READ` of a region that reads as zeroes: offset and length, no data.
    pub const OFFSET_HOLE: u16 = 2;
    /// `BLOCK_STATUS` extents of one metadata context.
    pub const BLOCK_STATUS: u16 = 5;
    /// An error for the whole request.
    pub const ERROR: u16 = (1 << 15) + 1;
    /// An error at one offset of the request.
    pub const ERROR_OFFSET: u16 = (1 << 15) + 2;

    /// Whether a chunk type is in the error category (bit 15).
    pub fn is_error(kind: u16) -> bool {
        kind & (1 << 15) != 0
    }
}

/// Status flags of the `base:allocation` metadata context.
pub mod state {
    /// The extent is not allocated (a hole).
    pub const HOLE: u32 = 1 << 0;
    /// The extent reads as zeroes.
    pub const ZERO: u32 = 1 << 1;
}

/// The one metadata context everyone knows: allocation status.
pub const BASE_ALLOCATION: &[u8] = b"base:allocation";

/// Header of a structured reply chunk; `length` payload bytes follow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ChunkHeader {
    /// `reply_flags::*`.
    pub flags: u16,
    /// Chunk type (`chunk::*`).
    pub kind: u16,
    /// The request's cookie.
    pub cookie: u64,
    /// Length of the payload that follows.
    pub length: u32,
}

impl ChunkHeader {
    /// Encoded length.
    pub const LEN: usize = 20;

    /// Encodes the header.
    pub fn encode(&self) -> [u8; Self::LEN] {
        encode(|w| {
            w.u32(STRUCTURED_REPLY_MAGIC)?
                .u16(self.flags)?
                .u16(self.kind)?
                .u64(self.cookie)?
                .u32(self.length)?;
            Ok(())
        })
    }

    /// Decodes a header; only the magic is checked here.
    pub fn decode(buf: &[u8; Self::LEN]) -> Result<Self, WireError> {
        let mut r = Reader::new(buf);
        let m = r.u32()?;
        if m != STRUCTURED_REPLY_MAGIC {
            return Err(WireError::BadMagic(m.into()));
        }
        Ok(Self {
            flags: r.u16()?,
            kind: r.u16()?,
            cookie: r.u64()?,
            length: r.u32()?,
        })
    }
}

/// The payload of an `ERROR` or `ERROR_OFFSET` chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrorChunk<'a> {
    /// An `errno::*` value; never 0.
    pub error: u32,
    /// A message for humans.
    pub message: &'a [u8],
    /// Where the error happened (`ERROR_OFFSET` only).
    pub offset: Option<u64>,
}

impl<'a> ErrorChunk<'a> {
    /// Encodes the payload into `out`, returning its length. The chunk type
    /// is `ERROR_OFFSET` when `offset` is set, `ERROR` otherwise.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, WireError> {
        if self.error == 0 {
            return Err(WireError::Invalid("error chunk without an error"));
        }
        let n = u16::try_from(self.message.len()).map_err(|_| WireError::BadLength)?;
        let mut w = Writer::new(out);
        w.u32(self.error)?.u16(n)?.bytes(self.message)?;
        if let Some(o) = self.offset {
            w.u64(o)?;
        }
        Ok(w.len())
    }

    /// Decodes the payload of a chunk of type `kind`.
    pub fn decode(kind: u16, payload: &'a [u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(payload);
        let error = r.u32()?;
        if error == 0 {
            return Err(WireError::Invalid("error chunk without an error"));
        }
        let n = r.u16()?;
        let message = r.bytes(n.into())?;
        let offset = match kind {
            chunk::ERROR_OFFSET => Some(r.u64()?),
            // Other error types may carry more; the message is all we know.
            _ => {
                let _ = r.bytes(r.remaining())?;
                None
            }
        };
        if r.remaining() != 0 {
            return Err(WireError::BadLength);
        }
        Ok(Self {
            error,
            message,
            offset,
        })
    }
}

/// Length of an `OFFSET_HOLE` payload.
pub const HOLE_CHUNK_LEN: usize = 12;

/// Encodes an `OFFSET_HOLE` payload: offset and length.
pub fn encode_hole(offset: u64, length: u32) -> [u8; HOLE_CHUNK_LEN] {
    encode(|w| {
        w.u64(offset)?.u32(length)?;
        Ok(())
    })
}

/// Decodes an `OFFSET_HOLE` payload; an empty hole is invalid.
pub fn decode_hole(payload: &[u8]) -> Result<(u64, u32), WireError> {
    let mut r = Reader::new(payload);
    let v = (r.u64()?, r.u32()?);
    if r.remaining() != 0 {
        return Err(WireError::BadLength);
    }
    if v.1 == 0 {
        return Err(WireError::Invalid("empty hole"));
    }
    Ok(v)
}

/// Length of one `BLOCK_STATUS` descriptor.
pub const EXTENT_LEN: usize = 8;

/// One `BLOCK_STATUS` descriptor: a run of bytes with one status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes, never 0.
    pub length: u32,
    /// Status flags of the context (`state::*` for `base:allocation`).
    pub flags: u32,
}

/// A `BLOCK_STATUS` chunk payload: a context id and its extents.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockStatus<'a> {
    /// The metadata context the extents describe.
    pub context: u32,
    extents: &'a [u8],
}

impl<'a> BlockStatus<'a> {
    /// Encodes the payload into `out`, returning its length.
    pub fn encode(context: u32, extents: &[Extent], out: &mut [u8]) -> Result<usize, WireError> {
        let mut w = Writer::new(out);
        w.u32(context)?;
        for e in extents {
            if e.length == 0 {
                return Err(WireError::Invalid("empty extent"));
            }
            w.u32(e.length)?.u32(e.flags)?;
        }
        Ok(w.len())
    }

    /// Decodes a payload: at least one descriptor, none empty.
    pub fn decode(payload: &'a [u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(payload);
        let context = r.u32()?;
        let extents = r.bytes(r.remaining())?;
        if extents.is_empty() || extents.len() % EXTENT_LEN != 0 {
            return Err(WireError::BadLength);
        }
        let s = Self { context, extents };
        if s.extents().any(|e| e.length == 0) {
            return Err(WireError::Invalid("empty extent"));
        }
        Ok(s)
    }

    /// The descriptors, in order.
    pub fn extents(&self) -> impl Iterator<Item = Extent> + 'a {
        self.extents.chunks_exact(EXTENT_LEN).map(|c| {
            let mut r = Reader::new(c);
            // `chunks_exact` gives 8 bytes: both reads succeed.
            Extent {
                length: r.u32().unwrap_or(0),
                flags: r.u32().unwrap_or(0),
            }
        })
    }
}

/// The payload of `LIST_META_CONTEXT` and `SET_META_CONTEXT`: an export
/// name and the context queries (`"base:allocation"`, `"base:"`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MetaContextRequest<'a> {
    /// The export name (not necessarily UTF-8).
    pub name: &'a [u8],
    /// The number of queries.
    pub count: u32,
    queries: &'a [u8],
}

impl<'a> MetaContextRequest<'a> {
    /// Parses a payload; every query is checked here, so iterating the
    /// queries afterwards cannot fail.
    pub fn decode(payload: &'a [u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(payload);
        let name_len = r.u32()?;
        if name_len as usize > MAX_NAME_LEN {
            return Err(WireError::TooLong(name_len));
        }
        let name = r.bytes(name_len as usize)?;
        let count = r.u32()?;
        let queries = r.buf;
        for _ in 0..count {
            let n = r.u32()?;
            if n as usize > MAX_NAME_LEN {
                return Err(WireError::TooLong(n));
            }
            r.bytes(n as usize)?;
        }
        if r.remaining() != 0 {
            return Err(WireError::BadLength);
        }
        Ok(Self {
            name,
            count,
            queries,
        })
    }

    /// The queries, in order.
    pub fn queries(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        let mut r = Reader::new(self.queries);
        core::iter::from_fn(move || {
            let n = r.u32().ok()?;
            r.bytes(n as usize).ok()
        })
    }

    /// Encodes a payload into `out`, returning its length.
    pub fn encode(name: &[u8], queries: &[&[u8]], out: &mut [u8]) -> Result<usize, WireError> {
        let len = |b: &[u8]| u32::try_from(b.len()).map_err(|_| WireError::BadLength);
        let count = u32::try_from(queries.len()).map_err(|_| WireError::BadLength)?;
        let mut w = Writer::new(out);
        w.u32(len(name)?)?.bytes(name)?.u32(count)?;
        for q in queries {
            w.u32(len(q)?)?.bytes(q)?;
        }
        Ok(w.len())
    }
}

/// Encodes a `REP_META_CONTEXT` payload: context id and name.
pub fn encode_meta_context(id: u32, name: &[u8], out: &mut [u8]) -> Result<usize, WireError> {
    let mut w = Writer::new(out);
    w.u32(id)?.bytes(name)?;
    Ok(w.len())
}

/// Decodes a `REP_META_CONTEXT` payload: (context id, name).
pub fn decode_meta_context(payload: &[u8]) -> Result<(u32, &[u8]), WireError> {
    let mut r = Reader::new(payload);
    let id = r.u32()?;
    let name = r.bytes(r.remaining())?;
    if name.len() > MAX_NAME_LEN {
        return Err(WireError::BadLength);
    }
    Ok((id, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_layout() {
        let g = Greeting {
            flags: handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES,
        };
        let b = g.encode();
        assert_eq!(&b[..8], b"NBDMAGIC");
        assert_eq!(&b[8..16], b"IHAVEOPT");
        assert_eq!(&b[16..], &[0, 3]);
        assert_eq!(Greeting::decode(&b), Ok(g));
        let mut old = b;
        old[8..16].copy_from_slice(&0x0000_4202_8186_1253u64.to_be_bytes());
        assert!(matches!(
            Greeting::decode(&old),
            Err(WireError::BadMagic(_))
        ));
    }

    #[test]
    fn request_layout_matches_spec() {
        let r = Request::new(Cmd::Write, cmd_flags::FUA, 0x0102_0304_0506_0708, 4096, 512);
        let b = r.encode();
        assert_eq!(
            b,
            [
                0x25, 0x60, 0x95, 0x13, 0, 1, 0, 1, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 0, 0, 0, 0x10,
                0, 0, 0, 2, 0
            ]
        );
        assert_eq!(Request::decode(&b), Ok(r));
        assert_eq!(r.payload_len(), 512);
        assert_eq!(Request::new(Cmd::Read, 0, 1, 0, 512).payload_len(), 0);
    }

    #[test]
    fn reply_magic_checked() {
        let r = SimpleReply {
            error: errno::EINVAL,
            cookie: 7,
        };
        let mut b = r.encode();
        assert_eq!(&b[..4], &[0x67, 0x44, 0x66, 0x98]);
        assert_eq!(SimpleReply::decode(&b), Ok(r));
        b[..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        assert_eq!(
            SimpleReply::decode(&b),
            Err(WireError::BadMagic(STRUCTURED_REPLY_MAGIC.into()))
        );
    }

    #[test]
    fn option_reply_rejects_huge_payload() {
        let h = OptionReplyHeader {
            option: opt::GO,
            reply: rep::INFO,
            length: MAX_OPTION_LEN + 1,
        };
        assert_eq!(
            OptionReplyHeader::decode(&h.encode()),
            Err(WireError::TooLong(MAX_OPTION_LEN + 1))
        );
    }

    #[test]
    fn go_request_round_trip() {
        let mut buf = [0u8; 64];
        let n = GoRequest::encode(b"disk", &[info::BLOCK_SIZE, info::NAME], &mut buf).unwrap();
        let g = GoRequest::decode(&buf[..n]).unwrap();
        assert_eq!(g.name, b"disk");
        let v: [u16; 2] = {
            let mut it = g.info_requests();
            [it.next().unwrap(), it.next().unwrap()]
        };
        assert_eq!(v, [info::BLOCK_SIZE, info::NAME]);
        // A count that promises more entries than the payload holds.
        let mut bad = buf;
        bad[8..10].copy_from_slice(&5u16.to_be_bytes());
        assert_eq!(GoRequest::decode(&bad[..n]), Err(WireError::Short));
        // Trailing garbage.
        assert_eq!(GoRequest::decode(&buf[..n + 1]), Err(WireError::BadLength));
        // A name length beyond the limit.
        let mut huge = [0u8; 6];
        huge[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            GoRequest::decode(&huge),
            Err(WireError::TooLong(_))
        ));
    }

    #[test]
    fn info_round_trip_and_validation() {
        let mut buf = [0u8; 32];
        for info in [
            Info::Export {
                size: 1 << 40,
                flags: tx::HAS_FLAGS | tx::SEND_FLUSH,
            },
            Info::BlockSize {
                min: 512,
                preferred: 4096,
                max: 32 << 20,
            },
            Info::Name(b"x"),
            Info::Description(b""),
        ] {
            let n = info.encode(&mut buf).unwrap();
            assert_eq!(Info::decode(&buf[..n]), Ok(info));
        }
        let bad = Info::BlockSize {
            min: 3,
            preferred: 4096,
            max: 4096,
        };
        let n = bad.encode(&mut buf).unwrap();
        assert!(matches!(
            Info::decode(&buf[..n]),
            Err(WireError::Invalid(_))
        ));
        // An export info with a missing flags field.
        assert_eq!(
            Info::decode(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 1]),
            Err(WireError::Short)
        );
        assert_eq!(Info::decode(&[0, 99, 1, 2]), Ok(Info::Unknown(99)));
    }

    #[test]
    fn list_entry_round_trip() {
        let mut buf = [0u8; 16];
        let n = encode_list_entry(b"abc", &mut buf).unwrap();
        assert_eq!(decode_list_entry(&buf[..n]), Ok((&b"abc"[..], &b""[..])));
        assert_eq!(decode_list_entry(&buf[..n - 1]), Err(WireError::Short));
    }

    #[test]
    fn list_entry_with_a_description() {
        let mut buf = [0u8; 16];
        let n = encode_list_entry_described(b"abc", b"a disk", &mut buf).unwrap();
        assert_eq!(&buf[..4], &[0, 0, 0, 3]);
        assert_eq!(
            decode_list_entry(&buf[..n]),
            Ok((&b"abc"[..], &b"a disk"[..]))
        );
        assert_eq!(
            encode_list_entry_described(b"abc", b"too long a text", &mut buf),
            Err(WireError::Short)
        );
    }

    #[test]
    fn chunk_header_layout_matches_spec() {
        let h = ChunkHeader {
            flags: reply_flags::DONE,
            kind: chunk::OFFSET_HOLE,
            cookie: 0x0102_0304_0506_0708,
            length: 12,
        };
        let b = h.encode();
        assert_eq!(
            b,
            [0x66, 0x8e, 0x33, 0xef, 0, 1, 0, 2, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 12]
        );
        assert_eq!(ChunkHeader::decode(&b), Ok(h));
        let mut simple = b;
        simple[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        assert_eq!(
            ChunkHeader::decode(&simple),
            Err(WireError::BadMagic(SIMPLE_REPLY_MAGIC.into()))
        );
        assert!(chunk::is_error(chunk::ERROR) && chunk::is_error(chunk::ERROR_OFFSET));
        assert!(!chunk::is_error(chunk::BLOCK_STATUS));
    }

    #[test]
    fn error_chunks_round_trip_and_are_checked() {
        let mut buf = [0u8; 32];
        let e = ErrorChunk {
            error: errno::EIO,
            message: b"bad",
            offset: None,
        };
        let n = e.encode(&mut buf).unwrap();
        assert_eq!(&buf[..n], &[0, 0, 0, 5, 0, 3, b'b', b'a', b'd']);
        assert_eq!(ErrorChunk::decode(chunk::ERROR, &buf[..n]), Ok(e));
        let o = ErrorChunk {
            offset: Some(4096),
            ..e
        };
        let n = o.encode(&mut buf).unwrap();
        assert_eq!(n, 17);
        assert_eq!(ErrorChunk::decode(chunk::ERROR_OFFSET, &buf[..n]), Ok(o));
        // The offset is missing, the message is longer than the chunk, or
        // there is no error at all.
        assert_eq!(
            ErrorChunk::decode(chunk::ERROR_OFFSET, &buf[..9]),
            Err(WireError::Short)
        );
        assert_eq!(
            ErrorChunk::decode(chunk::ERROR, &[0, 0, 0, 5, 0, 9, 1]),
            Err(WireError::Short)
        );
        assert!(matches!(
            ErrorChunk::decode(chunk::ERROR, &[0, 0, 0, 0, 0, 0]),
            Err(WireError::Invalid(_))
        ));
        let zero = ErrorChunk { error: 0, ..e };
        assert!(zero.encode(&mut buf).is_err());
    }

    #[test]
    fn hole_and_block_status_payloads() {
        let h = encode_hole(1 << 33, 4096);
        assert_eq!(h, [0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0x10, 0]);
        assert_eq!(decode_hole(&h), Ok((1 << 33, 4096)));
        assert!(decode_hole(&encode_hole(0, 0)).is_err());
        assert_eq!(decode_hole(&h[..11]), Err(WireError::Short));

        let ext = [
            Extent {
                length: 65536,
                flags: state::HOLE | state::ZERO,
            },
            Extent {
                length: 512,
                flags: 0,
            },
        ];
        let mut buf = [0u8; 32];
        let n = BlockStatus::encode(1, &ext, &mut buf).unwrap();
        assert_eq!(n, 20);
        assert_eq!(&buf[..12], &[0, 0, 0, 1, 0, 1, 0, 0, 0, 0, 0, 3]);
        let b = BlockStatus::decode(&buf[..n]).unwrap();
        assert_eq!(b.context, 1);
        assert!(b.extents().eq(ext.iter().copied()));
        // No descriptor, half a descriptor, an empty one.
        assert_eq!(BlockStatus::decode(&buf[..4]), Err(WireError::BadLength));
        assert_eq!(BlockStatus::decode(&buf[..16]), Err(WireError::BadLength));
        let empty = [Extent {
            length: 0,
            flags: 0,
        }];
        assert!(BlockStatus::encode(1, &empty, &mut buf).is_err());
        buf[4..8].copy_from_slice(&[0; 4]);
        assert!(matches!(
            BlockStatus::decode(&buf[..n]),
            Err(WireError::Invalid(_))
        ));
    }

    #[test]
    fn meta_context_request_round_trip_and_validation() {
        let mut buf = [0u8; 64];
        let q: [&[u8]; 2] = [b"base:allocation", b"qemu:"];
        let n = MetaContextRequest::encode(b"disk", &q, &mut buf).unwrap();
        let r = MetaContextRequest::decode(&buf[..n]).unwrap();
        assert_eq!((r.name, r.count), (&b"disk"[..], 2));
        assert!(r.queries().eq(q.iter().copied()));
        // A count promising more queries than there are, trailing bytes,
        // a query length running past the end.
        let mut more = buf;
        more[11] = 3;
        assert_eq!(
            MetaContextRequest::decode(&more[..n]),
            Err(WireError::Short)
        );
        assert_eq!(
            MetaContextRequest::decode(&buf[..n + 1]),
            Err(WireError::BadLength)
        );
        let mut long = buf;
        long[12..16].copy_from_slice(&100u32.to_be_bytes());
        assert_eq!(
            MetaContextRequest::decode(&long[..n]),
            Err(WireError::Short)
        );
        let none = MetaContextRequest::encode(b"", &[], &mut buf).unwrap();
        let r = MetaContextRequest::decode(&buf[..none]).unwrap();
        assert_eq!((r.count, r.queries().count()), (0, 0));

        let n = encode_meta_context(1, BASE_ALLOCATION, &mut buf).unwrap();
        assert_eq!(decode_meta_context(&buf[..n]), Ok((1, BASE_ALLOCATION)));
        assert_eq!(decode_meta_context(&buf[..3]), Err(WireError::Short));
    }

    #[test]
    fn writer_never_overflows() {
        let mut buf = [0u8; 3];
        let mut w = Writer::new(&mut buf);
        assert!(w.u16(1).is_ok());
        assert_eq!(w.u16(2).err(), Some(WireError::Short));
        assert_eq!(w.len(), 2);
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(errno::from_linux(-5), errno::EIO);
        assert_eq!(errno::from_linux(30), errno::EPERM);
        assert_eq!(errno::from_linux(-28), errno::ENOSPC);
        assert_eq!(errno::from_linux(-2), errno::EIO);
    }

    proptest::proptest! {
        #[test]
        fn request_round_trip(flags: u16, cmd: u16, cookie: u64, offset: u64, length: u32) {
            let r = Request { flags, cmd, cookie, offset, length };
            proptest::prop_assert_eq!(Request::decode(&r.encode()), Ok(r));
        }

        #[test]
        fn chunk_header_round_trip(flags: u16, kind: u16, cookie: u64, length: u32) {
            let h = ChunkHeader { flags, kind, cookie, length };
            proptest::prop_assert_eq!(ChunkHeader::decode(&h.encode()), Ok(h));
        }

        #[test]
        fn reply_round_trip(error: u32, cookie: u64) {
            let r = SimpleReply { error, cookie };
            proptest::prop_assert_eq!(SimpleReply::decode(&r.encode()), Ok(r));
        }

        #[test]
        fn decoders_never_panic(bytes: Vec<u8>) {
            let _ = GoRequest::decode(&bytes);
            let _ = Info::decode(&bytes);
            let _ = decode_list_entry(&bytes);
            let _ = MetaContextRequest::decode(&bytes).map(|r| r.queries().count());
            let _ = BlockStatus::decode(&bytes).map(|b| b.extents().count());
            let _ = ErrorChunk::decode(chunk::ERROR, &bytes);
            let _ = ErrorChunk::decode(chunk::ERROR_OFFSET, &bytes);
            let _ = decode_hole(&bytes);
            let _ = decode_meta_context(&bytes);
            if let Ok(b) = <[u8; ChunkHeader::LEN]>::try_from(&bytes[..bytes.len().min(ChunkHeader::LEN)]) {
                let _ = ChunkHeader::decode(&b);
            }
            if let Ok(b) = <[u8; Request::LEN]>::try_from(&bytes[..bytes.len().min(Request::LEN)]) {
                let _ = Request::decode(&b);
            }
        }
    }

    /// Handshake magics, or anything else: arbitrary bytes alone almost never
    /// hit a valid magic, so half the cases start with the right one.
    fn magic_or_not(valid: u64) -> impl proptest::strategy::Strategy<Value = u64> {
        proptest::prop_oneof![
            proptest::strategy::Just(valid),
            proptest::arbitrary::any::<u64>()
        ]
    }

    proptest::proptest! {
        #[test]
        fn greeting_round_trip(flags: u16) {
            let g = Greeting { flags };
            proptest::prop_assert_eq!(Greeting::decode(&g.encode()), Ok(g));
        }

        #[test]
        fn option_header_round_trip(option: u32, length: u32) {
            // Any length decodes: the caller checks it against its limit.
            let h = OptionHeader { option, length };
            proptest::prop_assert_eq!(OptionHeader::decode(&h.encode()), Ok(h));
        }

        #[test]
        fn option_reply_header_round_trip(option: u32, reply: u32, length in 0..=MAX_OPTION_LEN) {
            let h = OptionReplyHeader { option, reply, length };
            proptest::prop_assert_eq!(OptionReplyHeader::decode(&h.encode()), Ok(h));
        }

        #[test]
        fn option_reply_header_refuses_long_payloads(option: u32, reply: u32, length in MAX_OPTION_LEN + 1..) {
            let h = OptionReplyHeader { option, reply, length };
            proptest::prop_assert_eq!(
                OptionReplyHeader::decode(&h.encode()),
                Err(WireError::TooLong(length))
            );
        }

        #[test]
        fn export_name_reply_round_trip(size: u64, flags: u16) {
            let r = ExportNameReply { size, flags };
            proptest::prop_assert_eq!(ExportNameReply::decode(&r.encode()), Ok(r));
        }

        /// Arbitrary bytes: no panic; whatever is accepted had the right
        /// magic and encodes back to the same bytes.
        #[test]
        fn handshake_decoders_take_any_bytes(
            m1 in magic_or_not(NBDMAGIC),
            m2 in magic_or_not(IHAVEOPT),
            m3 in magic_or_not(OPT_REPLY_MAGIC),
            tail: [u8; 12],
        ) {
            let mut b = [0u8; 20];
            b[..8].copy_from_slice(&m1.to_be_bytes());
            b[8..].copy_from_slice(&tail);
            b[8..16].copy_from_slice(&m2.to_be_bytes());
            let g: [u8; Greeting::LEN] = b[..Greeting::LEN].try_into().unwrap();
            match Greeting::decode(&g) {
                Ok(v) => {
                    proptest::prop_assert!(m1 == NBDMAGIC && m2 == IHAVEOPT);
                    proptest::prop_assert_eq!(v.encode(), g);
                }
                Err(e) => proptest::prop_assert!(
                    e == WireError::BadMagic(m1) && m1 != NBDMAGIC
                        || e == WireError::BadMagic(m2) && m1 == NBDMAGIC && m2 != IHAVEOPT,
                    "{:?}", e
                ),
            }
            b[..8].copy_from_slice(&m2.to_be_bytes());
            b[8..].copy_from_slice(&tail);
            let o: [u8; OptionHeader::LEN] = b[..OptionHeader::LEN].try_into().unwrap();
            match OptionHeader::decode(&o) {
                Ok(v) => {
                    proptest::prop_assert_eq!(m2, IHAVEOPT);
                    proptest::prop_assert_eq!(v.encode(), o);
                }
                Err(e) => {
                    proptest::prop_assert_ne!(m2, IHAVEOPT);
                    proptest::prop_assert_eq!(e, WireError::BadMagic(m2));
                }
            }
            b[..8].copy_from_slice(&m3.to_be_bytes());
            match OptionReplyHeader::decode(&b) {
                Ok(v) => {
                    proptest::prop_assert_eq!(m3, OPT_REPLY_MAGIC);
                    proptest::prop_assert!(v.length <= MAX_OPTION_LEN);
                    proptest::prop_assert_eq!(v.encode(), b);
                }
                Err(WireError::TooLong(n)) => {
                    proptest::prop_assert_eq!(m3, OPT_REPLY_MAGIC);
                    proptest::prop_assert!(n > MAX_OPTION_LEN);
                }
                Err(e) => {
                    proptest::prop_assert_ne!(m3, OPT_REPLY_MAGIC);
                    proptest::prop_assert_eq!(e, WireError::BadMagic(m3));
                }
            }
            // No magic here: every 10 bytes are a reply.
            let x: [u8; ExportNameReply::LEN] = b[8..18].try_into().unwrap();
            let r = ExportNameReply::decode(&x);
            proptest::prop_assert!(r.is_ok());
            proptest::prop_assert_eq!(r.unwrap().encode(), x);
        }

        /// One flipped bit: in a magic it is always caught, elsewhere it
        /// decodes to exactly the flipped value.
        #[test]
        fn a_flipped_bit_in_a_magic_is_always_caught(
            flags: u16,
            option: u32,
            length in 0..=MAX_OPTION_LEN,
            bit in 0usize..OptionReplyHeader::LEN * 8,
        ) {
            let flip = |b: &mut [u8]| b[bit / 8] ^= 1 << (bit % 8);
            if bit < Greeting::LEN * 8 {
                let mut g = Greeting { flags }.encode();
                flip(&mut g);
                match Greeting::decode(&g) {
                    Ok(v) => {
                        proptest::prop_assert!(bit >= 128);
                        proptest::prop_assert_eq!(v.encode(), g);
                    }
                    Err(e) => {
                        proptest::prop_assert!(bit < 128);
                        proptest::prop_assert!(matches!(e, WireError::BadMagic(_)));
                    }
                }
            }
            if bit < OptionHeader::LEN * 8 {
                let mut h = OptionHeader { option, length }.encode();
                flip(&mut h);
                match OptionHeader::decode(&h) {
                    Ok(v) => {
                        proptest::prop_assert!(bit >= 64);
                        proptest::prop_assert_eq!(v.encode(), h);
                    }
                    Err(e) => {
                        proptest::prop_assert!(bit < 64);
                        proptest::prop_assert!(matches!(e, WireError::BadMagic(_)));
                    }
                }
            }
            let mut r = OptionReplyHeader { option, reply: rep::ACK, length }.encode();
            flip(&mut r);
            match OptionReplyHeader::decode(&r) {
                Ok(v) => {
                    proptest::prop_assert!(bit >= 64);
                    proptest::prop_assert_eq!(v.encode(), r);
                }
                Err(WireError::TooLong(n)) => {
                    // Only a bit of the length field can make it too long.
                    proptest::prop_assert!(bit >= 128);
                    let shift = (19 - bit / 8) * 8 + bit % 8;
                    proptest::prop_assert_eq!(n, length ^ 1 << shift);
                }
                Err(e) => {
                    proptest::prop_assert!(bit < 64);
                    proptest::prop_assert!(matches!(e, WireError::BadMagic(_)));
                }
            }
        }
    }
}
