//! Client side of the NBD fixed newstyle handshake.

use std::io::{Read, Write};

use enbd_core::wire::{
    self, handshake, info, opt, rep, ExportNameReply, GoRequest, Greeting, Info, OptionHeader,
    OptionReplyHeader,
};

/// What the server told us about the export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    /// (minimum, preferred, maximum) block sizes, if the server sent them.
    pub block_sizes: Option<(u32, u32, u32)>,
}

#[derive(Debug, thiserror::Error)]
pub enum NegotiateError {
    #[error("connection failed during the handshake")]
    Io(#[from] std::io::Error),
    #[error("not an NBD server, or a broken one: {0}")]
    Protocol(wire::WireError),
    #[error("the server does not speak the fixed newstyle protocol")]
    NotFixedNewstyle,
    #[error("server refused export '{export}': {reason}{}", msg_suffix(.message))]
    Refused {
        export: String,
        /// The reply type (`rep::ERR_*`), so callers can tell "unknown
        /// export" from other refusals.
        code: u32,
        reason: &'static str,
        message: String,
    },
    #[error("server closed the connection: export '{0}' probably does not exist")]
    ClosedOnExportName(String),
    #[error("unexpected reply {reply:#x} to option {option}")]
    Unexpected { option: &'static str, reply: u32 },
    #[error("server sent no export information")]
    NoExportInfo,
    #[error("server sent more than {MAX_REPLIES} replies to one option")]
    TooManyReplies,
    #[error("server refused TLS: {reason}{}", msg_suffix(.message))]
    NoTls {
        reason: &'static str,
        message: String,
    },
}

fn msg_suffix(m: &str) -> String {
    if m.is_empty() {
        String::new()
    } else {
        format!(" ({m})")
    }
}

impl NegotiateError {
    /// Whether the server said it has no such export (`ERR_UNKNOWN`), as
    /// opposed to failing or refusing for another reason.
    pub fn is_unknown_export(&self) -> bool {
        matches!(self, NegotiateError::Refused { code, .. } if *code == rep::ERR_UNKNOWN)
    }
}

impl From<wire::WireError> for NegotiateError {
    fn from(e: wire::WireError) -> Self {
        NegotiateError::Protocol(e)
    }
}

fn read_array<const N: usize>(s: &mut impl Read) -> std::io::Result<[u8; N]> {
    let mut b = [0u8; N];
    s.read_exact(&mut b)?;
    Ok(b)
}

fn send_option(s: &mut impl Write, option: u32, payload: &[u8]) -> Result<(), NegotiateError> {
    let len = u32::try_from(payload.len()).map_err(|_| wire::WireError::BadLength)?;
    let mut buf = Vec::with_capacity(OptionHeader::LEN + payload.len());
    buf.extend_from_slice(
        &OptionHeader {
            option,
            length: len,
        }
        .encode(),
    );
    buf.extend_from_slice(payload);
    s.write_all(&buf)?;
    s.flush()?;
    Ok(())
}

/// Longest option reply accepted.
pub const MAX_REPLY_LEN: u32 = 1 << 20;
/// Most replies accepted to one `GO` (the client asks for one `INFO` type):
/// a server cannot keep the client in the loop.
pub const MAX_REPLIES: usize = 64;

fn read_reply(
    s: &mut impl Read,
    option: u32,
) -> Result<(OptionReplyHeader, Vec<u8>), NegotiateError> {
    let h = OptionReplyHeader::decode(&read_array(s)?)?;
    if h.option != option {
        return Err(wire::WireError::Invalid("option reply for another option").into());
    }
    // The server is not trusted with our memory: no reply the client asks
    // for comes near this (a LIST entry is a name of at most 4 KiB and its
    // description).
    if h.length > MAX_REPLY_LEN {
        return Err(wire::WireError::TooLong(h.length).into());
    }
    let mut payload = vec![0u8; h.length as usize];
    s.read_exact(&mut payload)?;
    Ok((h, payload))
}

/// Reads the greeting and sends the client flags; returns whether the server
/// omits the 124 zero bytes after `OPT_EXPORT_NAME`.
pub fn greet(s: &mut (impl Read + Write)) -> Result<bool, NegotiateError> {
    let g = Greeting::decode(&read_array(s)?)?;
    if g.flags & handshake::FIXED_NEWSTYLE == 0 {
        return Err(NegotiateError::NotFixedNewstyle);
    }
    let no_zeroes = g.flags & handshake::NO_ZEROES != 0;
    let mut cflags = handshake::C_FIXED_NEWSTYLE;
    if no_zeroes {
        cflags |= handshake::C_NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes())?;
    s.flush()?;
    Ok(no_zeroes)
}

/// Asks to upgrade the connection to TLS; `Ok` means the server agreed and
/// the TLS handshake must follow at once.
pub fn starttls(s: &mut (impl Read + Write)) -> Result<(), NegotiateError> {
    send_option(s, opt::STARTTLS, &[])?;
    let (h, payload) = read_reply(s, opt::STARTTLS)?;
    match h.reply {
        rep::ACK => Ok(()),
        r if rep::is_err(r) => Err(NegotiateError::NoTls {
            reason: rep::describe(r),
            message: String::from_utf8_lossy(&payload).into_owned(),
        }),
        r => Err(NegotiateError::Unexpected {
            option: "STARTTLS",
            reply: r,
        }),
    }
}

/// Chooses `export` and ends the handshake. Uses `OPT_GO` and falls back to
/// `OPT_EXPORT_NAME` for servers that do not know it.
pub fn go(
    s: &mut (impl Read + Write),
    export: &str,
    no_zeroes: bool,
) -> Result<ExportInfo, NegotiateError> {
    let mut payload = vec![0u8; 4 + export.len() + 2 + 2];
    let n = GoRequest::encode(export.as_bytes(), &[info::BLOCK_SIZE], &mut payload)?;
    send_option(s, opt::GO, &payload[..n])?;
    let mut export_info = None;
    let mut block_sizes = None;
    let mut replies = 0;
    loop {
        replies += 1;
        if replies > MAX_REPLIES {
            return Err(NegotiateError::TooManyReplies);
        }
        let (h, payload) = read_reply(s, opt::GO)?;
        match h.reply {
            rep::ACK => break,
            rep::INFO => match Info::decode(&payload)? {
                Info::Export { size, flags } => export_info = Some((size, flags)),
                Info::BlockSize {
                    min,
                    preferred,
                    max,
                } => block_sizes = Some((min, preferred, max)),
                _ => {}
            },
            rep::ERR_UNSUP => return export_name(s, export, no_zeroes),
            r if rep::is_err(r) => {
                return Err(NegotiateError::Refused {
                    export: export.to_owned(),
                    code: r,
                    reason: rep::describe(r),
                    message: String::from_utf8_lossy(&payload).into_owned(),
                })
            }
            r => {
                return Err(NegotiateError::Unexpected {
                    option: "GO",
                    reply: r,
                })
            }
        }
    }
    let (size, flags) = export_info.ok_or(NegotiateError::NoExportInfo)?;
    Ok(ExportInfo {
        size,
        flags,
        block_sizes,
    })
}

fn export_name(
    s: &mut (impl Read + Write),
    export: &str,
    no_zeroes: bool,
) -> Result<ExportInfo, NegotiateError> {
    send_option(s, opt::EXPORT_NAME, export.as_bytes())?;
    let buf: [u8; ExportNameReply::LEN] = match read_array(s) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            return Err(NegotiateError::ClosedOnExportName(export.to_owned()))
        }
        Err(e) => return Err(e.into()),
    };
    let r = ExportNameReply::decode(&buf)?;
    if !no_zeroes {
        let _: [u8; ExportNameReply::ZEROES] = read_array(s)?;
    }
    Ok(ExportInfo {
        size: r.size,
        flags: r.flags,
        block_sizes: None,
    })
}

/// Lists the server's exports, then aborts the handshake.
pub fn list(s: &mut (impl Read + Write)) -> Result<Vec<(String, String)>, NegotiateError> {
    send_option(s, opt::LIST, &[])?;
    let mut out = Vec::new();
    loop {
        let (h, payload) = read_reply(s, opt::LIST)?;
        match h.reply {
            rep::ACK => break,
            rep::SERVER => {
                let (name, desc) = wire::decode_list_entry(&payload)?;
                out.push((
                    String::from_utf8_lossy(name).into_owned(),
                    String::from_utf8_lossy(desc).into_owned(),
                ));
            }
            r if rep::is_err(r) => {
                return Err(NegotiateError::Refused {
                    export: String::new(),
                    code: r,
                    reason: rep::describe(r),
                    message: String::from_utf8_lossy(&payload).into_owned(),
                })
            }
            r => {
                return Err(NegotiateError::Unexpected {
                    option: "LIST",
                    reply: r,
                })
            }
        }
    }
    send_option(s, opt::ABORT, &[])?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A scripted peer: reads come from `input`, writes are collected.
    struct Peer {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }

    impl Read for Peer {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(buf)
        }
    }
    impl Write for Peer {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.output.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn reply(option: u32, reply: u32, payload: &[u8]) -> Vec<u8> {
        let mut v = OptionReplyHeader {
            option,
            reply,
            length: payload.len() as u32,
        }
        .encode()
        .to_vec();
        v.extend_from_slice(payload);
        v
    }

    fn greeting() -> Vec<u8> {
        Greeting {
            flags: handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES,
        }
        .encode()
        .to_vec()
    }

    #[test]
    fn go_collects_info() {
        let mut input = greeting();
        let mut b = [0u8; 16];
        let n = Info::Export {
            size: 1 << 20,
            flags: 0x41,
        }
        .encode(&mut b)
        .unwrap();
        input.extend(reply(opt::GO, rep::INFO, &b[..n]));
        let n = Info::BlockSize {
            min: 512,
            preferred: 4096,
            max: 1 << 25,
        }
        .encode(&mut b)
        .unwrap();
        input.extend(reply(opt::GO, rep::INFO, &b[..n]));
        input.extend(reply(opt::GO, rep::ACK, &[]));
        let mut p = Peer {
            input: Cursor::new(input),
            output: vec![],
        };
        let nz = greet(&mut p).unwrap();
        assert!(nz);
        let info = go(&mut p, "disk", nz).unwrap();
        assert_eq!(
            info,
            ExportInfo {
                size: 1 << 20,
                flags: 0x41,
                block_sizes: Some((512, 4096, 1 << 25))
            }
        );
        // Client flags, then IHAVEOPT + GO.
        assert_eq!(&p.output[..4], &3u32.to_be_bytes());
        assert_eq!(&p.output[4..12], b"IHAVEOPT");
    }

    #[test]
    fn refusal_is_reported_with_message() {
        let mut input = greeting();
        input.extend(reply(opt::GO, rep::ERR_UNKNOWN, b"no such export: nope"));
        let mut p = Peer {
            input: Cursor::new(input),
            output: vec![],
        };
        greet(&mut p).unwrap();
        let e = go(&mut p, "nope", true).unwrap_err();
        assert!(e.is_unknown_export());
        assert_eq!(
            e.to_string(),
            "server refused export 'nope': no such export (no such export: nope)"
        );
    }

    #[test]
    fn oldstyle_server_is_refused() {
        let mut g = greeting();
        g[8..16].copy_from_slice(&0x0000_4202_8186_1253u64.to_be_bytes());
        let mut p = Peer {
            input: Cursor::new(g),
            output: vec![],
        };
        assert!(matches!(greet(&mut p), Err(NegotiateError::Protocol(_))));
    }

    #[test]
    fn an_oversized_reply_is_refused_unread() {
        let mut input = greeting();
        input.extend(
            OptionReplyHeader {
                option: opt::GO,
                reply: rep::INFO,
                length: u32::MAX,
            }
            .encode(),
        );
        let mut p = Peer {
            input: Cursor::new(input),
            output: vec![],
        };
        greet(&mut p).unwrap();
        let e = go(&mut p, "d", true).unwrap_err();
        assert!(
            matches!(e, NegotiateError::Protocol(wire::WireError::TooLong(_))),
            "{e}"
        );
    }

    #[test]
    fn endless_info_replies_are_refused() {
        let mut input = greeting();
        let mut b = [0u8; 16];
        let n = Info::Export {
            size: 4096,
            flags: 1,
        }
        .encode(&mut b)
        .unwrap();
        for _ in 0..MAX_REPLIES + 1 {
            input.extend(reply(opt::GO, rep::INFO, &b[..n]));
        }
        input.extend(reply(opt::GO, rep::ACK, &[]));
        let mut p = Peer {
            input: Cursor::new(input),
            output: vec![],
        };
        greet(&mut p).unwrap();
        let e = go(&mut p, "d", true).unwrap_err();
        assert!(matches!(e, NegotiateError::TooManyReplies), "{e}");
        assert!(!e.is_unknown_export());
    }

    #[test]
    fn falls_back_to_export_name() {
        let mut input = greeting();
        input.extend(reply(opt::GO, rep::ERR_UNSUP, &[]));
        input.extend(
            ExportNameReply {
                size: 4096,
                flags: 1,
            }
            .encode(),
        );
        let mut p = Peer {
            input: Cursor::new(input),
            output: vec![],
        };
        greet(&mut p).unwrap();
        let info = go(&mut p, "", true).unwrap();
        assert_eq!(info.size, 4096);
    }
}
