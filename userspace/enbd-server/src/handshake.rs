//! Server side of the NBD fixed newstyle handshake.

use std::io::{self, Read, Write};
use std::sync::Arc;

use rustls::{ServerConfig, ServerConnection, StreamOwned};

use enbd_core::wire::{
    self, handshake, info, opt, rep, ExportNameReply, GoRequest, Greeting, Info, OptionHeader,
    OptionReplyHeader, MAX_OPTION_LEN,
};
use tracing::{debug, warn};

use crate::export::{Export, Exports};
use crate::link::Link;

/// Whether and how clients may or must use TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsMode {
    /// No TLS: STARTTLS is refused as unsupported.
    Off,
    /// Clients may upgrade with STARTTLS.
    Allow,
    /// Clients must upgrade before anything else.
    Require,
}

/// The server's TLS settings.
pub struct TlsPolicy {
    pub mode: TlsMode,
    pub config: Option<Arc<ServerConfig>>,
}

/// How a handshake ended.
pub enum Outcome {
    /// Enter transmission on this export.
    Transmission(Arc<Export>),
    /// The client aborted or was refused; close the connection.
    Closed,
}

#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("protocol violation: {0}")]
    Protocol(#[from] wire::WireError),
    #[error("client does not speak fixed newstyle (flags {0:#x})")]
    NotFixed(u32),
    #[error("client sent unknown flags {0:#x}")]
    UnknownFlags(u32),
    #[error("option payload of {0} bytes is too large")]
    TooLarge(u32),
    #[error("TLS handshake failed: {0}")]
    Tls(io::Error),
}

fn reply(s: &mut impl Write, option: u32, kind: u32, payload: &[u8]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(OptionReplyHeader::LEN + payload.len());
    buf.extend_from_slice(
        &OptionReplyHeader {
            option,
            reply: kind,
            length: payload.len() as u32,
        }
        .encode(),
    );
    buf.extend_from_slice(payload);
    s.write_all(&buf)?;
    // Through TLS, this is what pushes the record out.
    s.flush()
}

/// Upgrades a plain TCP link to TLS after STARTTLS was acknowledged.
fn upgrade(link: &mut Link, config: &Arc<ServerConfig>) -> Result<(), HandshakeError> {
    let Link::Tcp(sock) = std::mem::replace(link, Link::Upgrading) else {
        return Err(HandshakeError::Tls(io::Error::other(
            "not a TCP connection",
        )));
    };
    let conn = ServerConnection::new(config.clone())
        .map_err(|e| HandshakeError::Tls(io::Error::other(e)))?;
    let mut tls = StreamOwned::new(conn, sock);
    while tls.conn.is_handshaking() {
        tls.conn
            .complete_io(&mut tls.sock)
            .map_err(HandshakeError::Tls)?;
    }
    *link = Link::Tls(Box::new(tls));
    Ok(())
}

/// Runs the handshake up to transmission or close.
pub fn run(s: &mut Link, exports: &Exports, tls: &TlsPolicy) -> Result<Outcome, HandshakeError> {
    s.write_all(
        &Greeting {
            flags: handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES,
        }
        .encode(),
    )?;
    let mut cf = [0u8; 4];
    s.read_exact(&mut cf)?;
    let cflags = u32::from_be_bytes(cf);
    if cflags & !handshake::C_KNOWN != 0 {
        return Err(HandshakeError::UnknownFlags(cflags));
    }
    if cflags & handshake::C_FIXED_NEWSTYLE == 0 {
        return Err(HandshakeError::NotFixed(cflags));
    }
    let no_zeroes = cflags & handshake::C_NO_ZEROES != 0;
    loop {
        let mut hb = [0u8; OptionHeader::LEN];
        s.read_exact(&mut hb)?;
        let h = OptionHeader::decode(&hb)?;
        if h.length > MAX_OPTION_LEN {
            return Err(HandshakeError::TooLarge(h.length));
        }
        let mut payload = vec![0u8; h.length as usize];
        s.read_exact(&mut payload)?;
        debug!(option = opt::name(h.option), len = h.length, "option");
        if tls.mode == TlsMode::Require
            && !s.is_tls()
            && !matches!(h.option, opt::STARTTLS | opt::ABORT)
        {
            if h.option == opt::EXPORT_NAME {
                warn!("plaintext EXPORT_NAME refused: TLS is required");
                return Ok(Outcome::Closed);
            }
            reply(
                s,
                h.option,
                rep::ERR_TLS_REQD,
                b"TLS is required: use NBD_OPT_STARTTLS",
            )?;
            continue;
        }
        match h.option {
            opt::STARTTLS => {
                let refusal: Option<(u32, &[u8])> = if !payload.is_empty() {
                    Some((rep::ERR_INVALID, b"STARTTLS takes no data"))
                } else if s.is_tls() {
                    Some((rep::ERR_INVALID, b"TLS is already on"))
                } else if tls.mode == TlsMode::Off || !matches!(s, Link::Tcp(_)) {
                    Some((rep::ERR_UNSUP, b"TLS is not configured on this server"))
                } else {
                    None
                };
                if let Some((kind, msg)) = refusal {
                    reply(s, h.option, kind, msg)?;
                    continue;
                }
                let Some(config) = &tls.config else {
                    reply(
                        s,
                        h.option,
                        rep::ERR_UNSUP,
                        b"TLS is not configured on this server",
                    )?;
                    continue;
                };
                reply(s, h.option, rep::ACK, &[])?;
                upgrade(s, config)?;
                debug!("TLS established");
            }
            opt::EXPORT_NAME => {
                let Some(e) = exports.find(&payload) else {
                    // The protocol has no error reply here: just close.
                    warn!(
                        "unknown export '{}' asked with EXPORT_NAME",
                        String::from_utf8_lossy(&payload)
                    );
                    return Ok(Outcome::Closed);
                };
                s.write_all(
                    &ExportNameReply {
                        size: e.size(),
                        flags: e.tx_flags(),
                    }
                    .encode(),
                )?;
                if !no_zeroes {
                    s.write_all(&[0u8; ExportNameReply::ZEROES])?;
                }
                s.flush()?;
                return Ok(Outcome::Transmission(e));
            }
            opt::ABORT => {
                let _ = reply(s, h.option, rep::ACK, &[]);
                return Ok(Outcome::Closed);
            }
            opt::LIST => {
                if !payload.is_empty() {
                    reply(s, h.option, rep::ERR_INVALID, b"LIST takes no data")?;
                    continue;
                }
                for e in exports.iter() {
                    let mut b = vec![0u8; 4 + e.name().len()];
                    let n = wire::encode_list_entry(e.name().as_bytes(), &mut b)?;
                    reply(s, h.option, rep::SERVER, &b[..n])?;
                }
                reply(s, h.option, rep::ACK, &[])?;
            }
            opt::INFO | opt::GO => {
                let req = match GoRequest::decode(&payload) {
                    Ok(r) => r,
                    Err(e) => {
                        reply(s, h.option, rep::ERR_INVALID, e.to_string().as_bytes())?;
                        continue;
                    }
                };
                let Some(e) = exports.find(req.name) else {
                    let msg = format!("no export named '{}'", String::from_utf8_lossy(req.name));
                    reply(s, h.option, rep::ERR_UNKNOWN, msg.as_bytes())?;
                    continue;
                };
                let mut b = [0u8; 64];
                let n = Info::Export {
                    size: e.size(),
                    flags: e.tx_flags(),
                }
                .encode(&mut b)?;
                reply(s, h.option, rep::INFO, &b[..n])?;
                for want in req.info_requests() {
                    let i = match want {
                        info::BLOCK_SIZE => Info::BlockSize {
                            min: 1,
                            preferred: 4096,
                            max: crate::export::MAX_PAYLOAD,
                        },
                        info::NAME => Info::Name(e.name().as_bytes()),
                        info::DESCRIPTION => Info::Description(e.description().as_bytes()),
                        _ => continue,
                    };
                    let mut b = vec![0u8; 16 + e.name().len() + e.description().len()];
                    let n = i.encode(&mut b)?;
                    reply(s, h.option, rep::INFO, &b[..n])?;
                }
                reply(s, h.option, rep::ACK, &[])?;
                if h.option == opt::GO {
                    return Ok(Outcome::Transmission(e));
                }
            }
            other => {
                let msg = format!("option {} ({other}) not supported", opt::name(other));
                reply(s, h.option, rep::ERR_UNSUP, msg.as_bytes())?;
            }
        }
    }
}
