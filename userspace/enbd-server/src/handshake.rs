//! Server side of the NBD fixed newstyle handshake.

use std::io::{self, Read, Write};
use std::sync::Arc;

use rustls::{ServerConfig, ServerConnection, StreamOwned};

use enbd_core::wire::{
    self, handshake, info, opt, rep, tx, ExportNameReply, GoRequest, Greeting, Info,
    MetaContextRequest, OptionHeader, OptionReplyHeader, BASE_ALLOCATION, MAX_OPTION_LEN,
};
use tracing::{debug, warn};

use crate::export::{Export, Exports};
use crate::link::Link;
use crate::transmission::{Negotiated, BASE_ALLOCATION_ID};

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
    /// Enter transmission on this export, with what was negotiated.
    Transmission(Arc<Export>, Negotiated),
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

impl HandshakeError {
    /// Whether the handshake ran out of time (see [`Link::set_deadline`]).
    pub fn is_timeout(&self) -> bool {
        matches!(self, Self::Io(e) | Self::Tls(e) if e.kind() == io::ErrorKind::TimedOut)
    }
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

/// What the options so far have agreed on.
#[derive(Default)]
struct State {
    structured: bool,
    /// The export `SET_META_CONTEXT` named, and whether it selected
    /// `base:allocation`. Only valid for that export.
    meta: Option<(String, bool)>,
}

impl State {
    /// The transmission flags of `e` on this connection: `DF` needs
    /// structured replies.
    fn flags(&self, e: &Export) -> u16 {
        let mut f = e.tx_flags();
        if self.structured {
            f |= tx::SEND_DF;
        }
        f
    }

    /// What transmission on `e` gets.
    fn negotiated(&self, e: &Export) -> Negotiated {
        Negotiated {
            structured: self.structured,
            base_allocation: self.structured
                && matches!(&self.meta, Some((name, true)) if name == e.name()),
        }
    }
}

/// Answers `LIST_META_CONTEXT` or `SET_META_CONTEXT` (only
/// `base:allocation` exists here).
fn meta_context(
    s: &mut impl Write,
    option: u32,
    payload: &[u8],
    exports: &Exports,
    st: &mut State,
) -> io::Result<()> {
    let set = option == opt::SET_META_CONTEXT;
    if set {
        // A failed SET leaves nothing selected.
        st.meta = None;
        if !st.structured {
            let msg = b"structured replies must be negotiated first";
            return reply(s, option, rep::ERR_INVALID, msg);
        }
    }
    let req = match MetaContextRequest::decode(payload) {
        Ok(r) => r,
        Err(e) => return reply(s, option, rep::ERR_INVALID, e.to_string().as_bytes()),
    };
    let Some(e) = exports.find(req.name) else {
        let msg = format!("no export named '{}'", String::from_utf8_lossy(req.name));
        return reply(s, option, rep::ERR_UNKNOWN, msg.as_bytes());
    };
    // LIST with no query, or the query "base:", lists the whole namespace;
    // SET selects exact names only. Unknown namespaces match nothing.
    let matched = req
        .queries()
        .any(|q| q == BASE_ALLOCATION || (!set && q == b"base:"))
        || (!set && req.count == 0);
    if matched {
        let mut b = [0u8; 4 + BASE_ALLOCATION.len()];
        let n = wire::encode_meta_context(BASE_ALLOCATION_ID, BASE_ALLOCATION, &mut b)
            .map_err(io::Error::other)?;
        reply(s, option, rep::META_CONTEXT, &b[..n])?;
    }
    if set {
        debug!(
            export = e.name(),
            base_allocation = matched,
            "meta contexts set"
        );
        st.meta = Some((e.name().to_owned(), matched));
    }
    reply(s, option, rep::ACK, &[])
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
    let mut st = State::default();
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
        // TLS is for TCP: a unix socket is as private as its permissions.
        if tls.mode == TlsMode::Require
            && matches!(s, Link::Tcp(_))
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
                let ready: Result<&Arc<ServerConfig>, (u32, &[u8])> = if !payload.is_empty() {
                    Err((rep::ERR_INVALID, b"STARTTLS takes no data"))
                } else if s.is_tls() {
                    Err((rep::ERR_INVALID, b"TLS is already on"))
                } else {
                    match &tls.config {
                        Some(c) if tls.mode != TlsMode::Off => match s {
                            Link::Tcp(_) => Ok(c),
                            _ => Err((rep::ERR_UNSUP, b"TLS is for TCP connections only")),
                        },
                        _ => Err((rep::ERR_UNSUP, b"TLS is not configured on this server")),
                    }
                };
                let config = match ready {
                    Ok(c) => c,
                    Err((kind, msg)) => {
                        reply(s, h.option, kind, msg)?;
                        continue;
                    }
                };
                reply(s, h.option, rep::ACK, &[])?;
                // What was agreed in plaintext does not carry into TLS.
                st = State::default();
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
                        flags: st.flags(&e),
                    }
                    .encode(),
                )?;
                if !no_zeroes {
                    s.write_all(&[0u8; ExportNameReply::ZEROES])?;
                }
                s.flush()?;
                let neg = st.negotiated(&e);
                return Ok(Outcome::Transmission(e, neg));
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
                    let (name, desc) = (e.name().as_bytes(), e.description().as_bytes());
                    let mut b = vec![0u8; 4 + name.len() + desc.len()];
                    let n = wire::encode_list_entry_described(name, desc, &mut b)?;
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
                    flags: st.flags(&e),
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
                    let neg = st.negotiated(&e);
                    return Ok(Outcome::Transmission(e, neg));
                }
            }
            opt::STRUCTURED_REPLY => {
                if !payload.is_empty() {
                    reply(
                        s,
                        h.option,
                        rep::ERR_INVALID,
                        b"STRUCTURED_REPLY takes no data",
                    )?;
                    continue;
                }
                st.structured = true;
                reply(s, h.option, rep::ACK, &[])?;
            }
            opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT => {
                meta_context(s, h.option, &payload, exports, &mut st)?;
            }
            other => {
                let msg = format!("option {} ({other}) not supported", opt::name(other));
                reply(s, h.option, rep::ERR_UNSUP, msg.as_bytes())?;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::unix::net::UnixStream;
    use std::thread::JoinHandle;
    use std::time::{Duration, Instant};

    use enbd_core::wire::{
        decode_list_entry, tx, IHAVEOPT, MAX_OPTION_LEN, NBDMAGIC, OPT_REPLY_MAGIC,
    };

    use super::*;
    use crate::export::{ExportSpec, MAX_PAYLOAD};
    use crate::testutil::{pair, read_option_reply, read_rest, send_option, TempFile, PATIENCE};

    const DISK_SIZE: u64 = 1 << 20;
    const ISO_SIZE: u64 = 64 << 10;

    /// Two exports: "disk" (the default, read-write, with a description)
    /// and "iso" (read-only).
    struct Fixture {
        exports: Arc<Exports>,
        _files: [TempFile; 2],
    }

    fn fixture() -> Fixture {
        let disk = TempFile::new(DISK_SIZE, 0);
        let iso = TempFile::new(ISO_SIZE, 0);
        let spec = |s: String| s.parse::<ExportSpec>().unwrap();
        let exports = Exports::open(&[
            spec(format!("disk={},desc=the disk", disk.path().display())),
            spec(format!("iso={},ro", iso.path().display())),
        ])
        .unwrap();
        Fixture {
            exports: Arc::new(exports),
            _files: [disk, iso],
        }
    }

    /// How `run` ended: the export chosen, or `None` for a close.
    type Ended = Result<Option<String>, HandshakeError>;

    fn outcome(r: Result<Outcome, HandshakeError>) -> Ended {
        r.map(|o| match o {
            Outcome::Transmission(e, _) => Some(e.name().to_owned()),
            Outcome::Closed => None,
        })
    }

    fn policy(mode: TlsMode, config: Option<Arc<ServerConfig>>) -> TlsPolicy {
        TlsPolicy { mode, config }
    }

    /// Runs the handshake on one end of a socket pair; the server's end is
    /// closed when it returns.
    fn start(f: &Fixture, tls: TlsPolicy) -> (UnixStream, JoinHandle<Ended>) {
        let (client, server) = pair();
        let exports = f.exports.clone();
        let t = std::thread::spawn(move || {
            let mut link = Link::unix(server);
            outcome(run(&mut link, &exports, &tls))
        });
        (client, t)
    }

    /// Reads the greeting, checks it, and answers with `cflags`.
    fn greet(c: &mut (impl Read + Write), cflags: u32) {
        let mut g = [0u8; Greeting::LEN];
        c.read_exact(&mut g).unwrap();
        assert_eq!(
            Greeting::decode(&g),
            Ok(Greeting {
                flags: handshake::FIXED_NEWSTYLE | handshake::NO_ZEROES
            })
        );
        c.write_all(&cflags.to_be_bytes()).unwrap();
    }

    const FIXED: u32 = handshake::C_FIXED_NEWSTYLE;

    /// Open connection past the greeting, speaking fixed newstyle.
    fn open(f: &Fixture, tls: TlsPolicy) -> (UnixStream, JoinHandle<Ended>) {
        let (mut c, t) = start(f, tls);
        greet(&mut c, FIXED | handshake::C_NO_ZEROES);
        (c, t)
    }

    fn off() -> TlsPolicy {
        policy(TlsMode::Off, None)
    }

    /// Sends an option and expects a single reply of type `kind`.
    fn expect(c: &mut (impl Read + Write), option: u32, payload: &[u8], kind: u32) -> Vec<u8> {
        send_option(c, option, payload);
        let (h, p) = read_option_reply(c);
        assert_eq!(
            (h.option, h.reply),
            (option, kind),
            "{} answered {}: {}",
            opt::name(option),
            rep::describe(h.reply),
            String::from_utf8_lossy(&p)
        );
        p
    }

    fn go_payload(name: &[u8], infos: &[u16]) -> Vec<u8> {
        let mut b = vec![0u8; 6 + name.len() + 2 * infos.len()];
        let n = GoRequest::encode(name, infos, &mut b).unwrap();
        b.truncate(n);
        b
    }

    /// Ends the handshake with ABORT and checks it closed.
    fn abort(mut c: UnixStream, t: JoinHandle<Ended>) {
        expect(&mut c, opt::ABORT, &[], rep::ACK);
        assert_eq!(t.join().unwrap().unwrap(), None);
        assert!(read_rest(&mut c).is_empty());
    }

    fn disk_flags() -> u16 {
        tx::HAS_FLAGS
            | tx::SEND_FLUSH
            | tx::SEND_FUA
            | tx::SEND_TRIM
            | tx::SEND_WRITE_ZEROES
            | tx::CAN_MULTI_CONN
            | tx::SEND_CACHE
            | tx::SEND_FAST_ZERO
    }

    #[test]
    fn greeting_announces_fixed_newstyle_and_no_zeroes() {
        let f = fixture();
        let (mut c, t) = start(&f, off());
        let mut g = [0u8; Greeting::LEN];
        c.read_exact(&mut g).unwrap();
        assert_eq!(&g[..8], &NBDMAGIC.to_be_bytes());
        assert_eq!(&g[8..16], &IHAVEOPT.to_be_bytes());
        assert_eq!(u16::from_be_bytes([g[16], g[17]]), 3);
        drop(c);
        assert!(matches!(t.join().unwrap(), Err(HandshakeError::Io(_))));
    }

    #[test]
    fn a_client_without_fixed_newstyle_is_closed() {
        let f = fixture();
        for cflags in [0, handshake::C_NO_ZEROES] {
            let (mut c, t) = start(&f, off());
            greet(&mut c, cflags);
            assert!(matches!(
                t.join().unwrap(),
                Err(HandshakeError::NotFixed(x)) if x == cflags
            ));
            assert!(read_rest(&mut c).is_empty());
        }
    }

    #[test]
    fn unknown_client_flags_close() {
        let f = fixture();
        let (mut c, t) = start(&f, off());
        greet(&mut c, FIXED | 1 << 2);
        assert!(matches!(
            t.join().unwrap(),
            Err(HandshakeError::UnknownFlags(5))
        ));
        assert!(read_rest(&mut c).is_empty());
    }

    #[test]
    fn export_name_sends_size_flags_and_124_zeroes() {
        let f = fixture();
        let (mut c, t) = start(&f, off());
        greet(&mut c, FIXED);
        send_option(&mut c, opt::EXPORT_NAME, b"disk");
        assert_eq!(t.join().unwrap().unwrap().as_deref(), Some("disk"));
        let rest = read_rest(&mut c);
        assert_eq!(rest.len(), ExportNameReply::LEN + ExportNameReply::ZEROES);
        let r = ExportNameReply::decode(rest[..10].try_into().unwrap()).unwrap();
        assert_eq!((r.size, r.flags), (DISK_SIZE, disk_flags()));
        assert!(rest[10..].iter().all(|&b| b == 0));
    }

    #[test]
    fn export_name_with_no_zeroes_and_the_default_export() {
        let f = fixture();
        let (mut c, t) = open(&f, off());
        // The empty name is the first export.
        send_option(&mut c, opt::EXPORT_NAME, b"");
        assert_eq!(t.join().unwrap().unwrap().as_deref(), Some("disk"));
        let rest = read_rest(&mut c);
        assert_eq!(rest.len(), ExportNameReply::LEN, "no zeroes");
        let r = ExportNameReply::decode(rest[..].try_into().unwrap()).unwrap();
        assert_eq!(r.size, DISK_SIZE);
        // A read-only export says so.
        let (mut c, t) = open(&f, off());
        send_option(&mut c, opt::EXPORT_NAME, b"iso");
        assert_eq!(t.join().unwrap().unwrap().as_deref(), Some("iso"));
        let rest = read_rest(&mut c);
        let r = ExportNameReply::decode(rest[..].try_into().unwrap()).unwrap();
        assert_eq!((r.size, r.flags), (ISO_SIZE, disk_flags() | tx::READ_ONLY));
    }

    #[test]
    fn export_name_of_an_unknown_export_closes() {
        // The protocol has no error reply for EXPORT_NAME.
        let f = fixture();
        let (mut c, t) = open(&f, off());
        send_option(&mut c, opt::EXPORT_NAME, b"nope");
        assert_eq!(t.join().unwrap().unwrap(), None);
        assert!(read_rest(&mut c).is_empty());
    }

    #[test]
    fn go_answers_every_info_request_then_enters_transmission() {
        let f = fixture();
        let (mut c, t) = open(&f, off());
        let infos = [info::BLOCK_SIZE, info::NAME, info::DESCRIPTION, 77];
        send_option(&mut c, opt::GO, &go_payload(b"disk", &infos));
        let mut got = Vec::new();
        loop {
            let (h, p) = read_option_reply(&mut c);
            assert_eq!(h.option, opt::GO);
            if h.reply == rep::ACK {
                assert!(p.is_empty());
                break;
            }
            assert_eq!(h.reply, rep::INFO);
            got.push(p);
        }
        let got: Vec<Info<'_>> = got.iter().map(|p| Info::decode(p).unwrap()).collect();
        assert_eq!(
            got,
            [
                Info::Export {
                    size: DISK_SIZE,
                    flags: disk_flags()
                },
                Info::BlockSize {
                    min: 1,
                    preferred: 4096,
                    max: MAX_PAYLOAD
                },
                Info::Name(b"disk"),
                Info::Description(b"the disk"),
            ],
            "unknown info types are skipped"
        );
        assert_eq!(t.join().unwrap().unwrap().as_deref(), Some("disk"));
        assert!(read_rest(&mut c).is_empty());
    }

    #[test]
    fn info_answers_without_ending_the_handshake() {
        let f = fixture();
        let (mut c, t) = open(&f, off());
        let p = expect(&mut c, opt::INFO, &go_payload(b"iso", &[]), rep::INFO);
        assert_eq!(
            Info::decode(&p),
            Ok(Info::Export {
                size: ISO_SIZE,
                flags: disk_flags() | tx::READ_ONLY
            })
        );
        let (h, _) = read_option_reply(&mut c);
        assert_eq!((h.option, h.reply), (opt::INFO, rep::ACK));
        // INFO with no data at all is malformed; the handshake goes on.
        expect(&mut c, opt::INFO, &[], rep::ERR_INVALID);
        // Then GO on the default export.
        expect(&mut c, opt::GO, &go_payload(b"", &[]), rep::INFO);
        let (h, _) = read_option_reply(&mut c);
        assert_eq!(h.reply, rep::ACK);
        assert_eq!(t.join().unwrap().unwrap().as_deref(), Some("disk"));
    }

    #[test]
    fn go_and_info_on_an_unknown_export_get_err_unknown() {
        let f = fixture();
        let (mut c, t) = open(&f, off());
        for o in [opt::GO, opt::INFO] {
            let msg = expect(&mut c, o, &go_payload(b"nope", &[]), rep::ERR_UNKNOWN);
            assert_eq!(msg, b"no export named 'nope'");
        }
        abort(c, t);
    }

    #[test]
    fn malformed_go_and_info_get_err_invalid() {
        let f = fixture();
        let (mut c, t) = open(&f, off());
        let good = go_payload(b"disk", &[info::NAME]);
        let mut trailing = good.clone();
        trailing.push(0);
        let short = &good[..good.len() - 1];
        let huge_name = [0xff, 0xff, 0xff, 0xff, 0, 0];
        for (o, p) in [
            (opt::GO, &trailing[..]),
            (opt::GO, short),
            (opt::INFO, &huge_name[..]),
            (opt::GO, &[0, 0, 0][..]),
        ] {
            expect(&mut c, o, p, rep::ERR_INVALID);
        }
        abort(c, t);
    }

    #[test]
    fn list_names_every_export() {
        let f = fixture();
        let (mut c, t) = open(&f, off());
        send_option(&mut c, opt::LIST, &[]);
        let (mut names, mut descs) = (Vec::new(), Vec::new());
        loop {
            let (h, p) = read_option_reply(&mut c);
            assert_eq!(h.option, opt::LIST);
            if h.reply == rep::ACK {
                break;
            }
            assert_eq!(h.reply, rep::SERVER);
            let (name, desc) = decode_list_entry(&p).unwrap();
            names.push(String::from_utf8(name.to_vec()).unwrap());
            descs.push(String::from_utf8(desc.to_vec()).unwrap());
        }
        assert_eq!(names, ["disk", "iso"]);
        assert_eq!(descs, ["the disk", ""], "LIST shows the descriptions");
        expect(&mut c, opt::LIST, b"x", rep::ERR_INVALID);
        abort(c, t);
    }

    /// Like [`start`] past the greeting, but the handshake's result keeps
    /// what was negotiated.
    fn open_negotiated(f: &Fixture) -> (UnixStream, JoinHandle<Option<(String, Negotiated)>>) {
        let (mut client, server) = pair();
        let exports = f.exports.clone();
        let t = std::thread::spawn(move || {
            let mut link = Link::unix(server);
            match run(&mut link, &exports, &off()).unwrap() {
                Outcome::Transmission(e, neg) => Some((e.name().to_owned(), neg)),
                Outcome::Closed => None,
            }
        });
        greet(&mut client, FIXED | handshake::C_NO_ZEROES);
        (client, t)
    }

    fn meta_payload(name: &[u8], queries: &[&[u8]]) -> Vec<u8> {
        let mut b = vec![0u8; 4096];
        let n = MetaContextRequest::encode(name, queries, &mut b).unwrap();
        b.truncate(n);
        b
    }

    /// Sends a meta context option; the contexts it answered, before ACK.
    fn contexts(c: &mut UnixStream, option: u32, payload: &[u8]) -> Vec<(u32, Vec<u8>)> {
        send_option(c, option, payload);
        let mut v = Vec::new();
        loop {
            let (h, p) = read_option_reply(c);
            assert_eq!(h.option, option);
            match h.reply {
                rep::ACK => return v,
                rep::META_CONTEXT => {
                    let (id, name) = wire::decode_meta_context(&p).unwrap();
                    v.push((id, name.to_vec()));
                }
                other => panic!("unexpected reply {}", rep::describe(other)),
            }
        }
    }

    /// GO on `name`; the flags announced.
    fn go_flags(c: &mut UnixStream, name: &[u8]) -> u16 {
        let p = expect(c, opt::GO, &go_payload(name, &[]), rep::INFO);
        let Ok(Info::Export { flags, .. }) = Info::decode(&p) else {
            panic!("not INFO_EXPORT");
        };
        let (h, _) = read_option_reply(c);
        assert_eq!(h.reply, rep::ACK);
        flags
    }

    #[test]
    fn structured_replies_are_acknowledged_and_df_announced_with_them() {
        let f = fixture();
        // Without them: no DF, simple replies.
        let (mut c, t) = open_negotiated(&f);
        assert_eq!(go_flags(&mut c, b"disk"), disk_flags());
        assert_eq!(
            t.join().unwrap(),
            Some(("disk".into(), Negotiated::default()))
        );
        let (mut c, t) = open_negotiated(&f);
        expect(&mut c, opt::STRUCTURED_REPLY, b"x", rep::ERR_INVALID);
        assert!(expect(&mut c, opt::STRUCTURED_REPLY, &[], rep::ACK).is_empty());
        assert_eq!(go_flags(&mut c, b"disk"), disk_flags() | tx::SEND_DF);
        let (_, neg) = t.join().unwrap().unwrap();
        assert_eq!(
            neg,
            Negotiated {
                structured: true,
                base_allocation: false
            }
        );
    }

    #[test]
    fn set_meta_context_needs_structured_replies() {
        let f = fixture();
        let (mut c, t) = open_negotiated(&f);
        let q = meta_payload(b"disk", &[BASE_ALLOCATION]);
        let msg = expect(&mut c, opt::SET_META_CONTEXT, &q, rep::ERR_INVALID);
        assert_eq!(msg, b"structured replies must be negotiated first");
        // LIST is allowed anyway.
        let base = vec![(BASE_ALLOCATION_ID, BASE_ALLOCATION.to_vec())];
        assert_eq!(contexts(&mut c, opt::LIST_META_CONTEXT, &q), base);
        go_flags(&mut c, b"disk");
        let (_, neg) = t.join().unwrap().unwrap();
        assert!(!neg.base_allocation && !neg.structured);
    }

    #[test]
    fn meta_contexts_are_listed_and_selected_for_one_export() {
        let f = fixture();
        let (mut c, t) = open_negotiated(&f);
        expect(&mut c, opt::STRUCTURED_REPLY, &[], rep::ACK);
        let base = vec![(BASE_ALLOCATION_ID, BASE_ALLOCATION.to_vec())];
        let list = opt::LIST_META_CONTEXT;
        // No query lists all; "base:" lists the namespace; other namespaces
        // and unknown names match nothing.
        assert_eq!(contexts(&mut c, list, &meta_payload(b"disk", &[])), base);
        assert_eq!(
            contexts(&mut c, list, &meta_payload(b"", &[b"base:"])),
            base
        );
        let other: [&[u8]; 3] = [b"qemu:allocation-depth", b"base:nothing", b"x"];
        assert!(contexts(&mut c, list, &meta_payload(b"disk", &other)).is_empty());
        // SET takes whole names only, and an empty SET selects nothing.
        let set = opt::SET_META_CONTEXT;
        assert!(contexts(&mut c, set, &meta_payload(b"disk", &[b"base:"])).is_empty());
        assert!(contexts(&mut c, set, &meta_payload(b"disk", &[])).is_empty());
        // Unknown exports and malformed payloads are refused.
        expect(
            &mut c,
            set,
            &meta_payload(b"nope", &[BASE_ALLOCATION]),
            rep::ERR_UNKNOWN,
        );
        expect(&mut c, list, &meta_payload(b"nope", &[]), rep::ERR_UNKNOWN);
        let mut bad = meta_payload(b"disk", &[BASE_ALLOCATION]);
        bad.pop();
        expect(&mut c, set, &bad, rep::ERR_INVALID);
        expect(&mut c, list, &[0, 0], rep::ERR_INVALID);
        let q = meta_payload(b"disk", &[b"qemu:dirty-bitmap:x", BASE_ALLOCATION]);
        assert_eq!(contexts(&mut c, set, &q), base);
        go_flags(&mut c, b"disk");
        let (_, neg) = t.join().unwrap().unwrap();
        assert_eq!(
            neg,
            Negotiated {
                structured: true,
                base_allocation: true
            }
        );
        // Selected for "disk", but GO on "iso": nothing is selected there.
        let (mut c, t) = open_negotiated(&f);
        expect(&mut c, opt::STRUCTURED_REPLY, &[], rep::ACK);
        let q = meta_payload(b"disk", &[BASE_ALLOCATION]);
        assert_eq!(contexts(&mut c, set, &q), base);
        go_flags(&mut c, b"iso");
        let (_, neg) = t.join().unwrap().unwrap();
        assert!(neg.structured && !neg.base_allocation);
        // A SET that fails drops an earlier selection.
        let (mut c, t) = open_negotiated(&f);
        expect(&mut c, opt::STRUCTURED_REPLY, &[], rep::ACK);
        assert_eq!(contexts(&mut c, set, &q), base);
        expect(&mut c, set, &bad, rep::ERR_INVALID);
        go_flags(&mut c, b"disk");
        assert!(!t.join().unwrap().unwrap().1.base_allocation);
    }

    #[test]
    fn abort_is_acknowledged_and_closes() {
        let f = fixture();
        let (c, t) = open(&f, off());
        abort(c, t);
    }

    #[test]
    fn unknown_options_get_err_unsup_and_the_handshake_goes_on() {
        let f = fixture();
        let (mut c, t) = open(&f, off());
        for (o, p) in [(4, &b""[..]), (11, b""), (999, b"abc"), (u32::MAX, b"")] {
            expect(&mut c, o, p, rep::ERR_UNSUP);
        }
        expect(&mut c, opt::GO, &go_payload(b"disk", &[]), rep::INFO);
        let (h, _) = read_option_reply(&mut c);
        assert_eq!(h.reply, rep::ACK);
        assert_eq!(t.join().unwrap().unwrap().as_deref(), Some("disk"));
    }

    #[test]
    fn an_option_payload_over_the_limit_closes() {
        let f = fixture();
        // Exactly the limit is read (and LIST refuses the data)...
        let (mut c, t) = open(&f, off());
        expect(
            &mut c,
            opt::LIST,
            &vec![0u8; MAX_OPTION_LEN as usize],
            rep::ERR_INVALID,
        );
        abort(c, t);
        // ...one byte more closes without reading it.
        let (mut c, t) = open(&f, off());
        let h = OptionHeader {
            option: opt::INFO,
            length: MAX_OPTION_LEN + 1,
        };
        c.write_all(&h.encode()).unwrap();
        assert!(matches!(
            t.join().unwrap(),
            Err(HandshakeError::TooLarge(n)) if n == MAX_OPTION_LEN + 1
        ));
        assert!(read_rest(&mut c).is_empty());
    }

    #[test]
    fn a_bad_option_magic_closes() {
        let f = fixture();
        let (mut c, t) = open(&f, off());
        let mut h = OptionHeader {
            option: opt::GO,
            length: 0,
        }
        .encode();
        h[..8].copy_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        c.write_all(&h).unwrap();
        assert!(matches!(
            t.join().unwrap(),
            Err(HandshakeError::Protocol(wire::WireError::BadMagic(m))) if m == OPT_REPLY_MAGIC
        ));
        assert!(read_rest(&mut c).is_empty());
    }

    #[test]
    fn eof_inside_an_option_is_an_error() {
        let f = fixture();
        let (mut c, t) = open(&f, off());
        let h = OptionHeader {
            option: opt::GO,
            length: 10,
        };
        c.write_all(&h.encode()).unwrap();
        c.write_all(b"abc").unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(matches!(t.join().unwrap(), Err(HandshakeError::Io(_))));
    }

    #[test]
    fn starttls_without_tls_is_err_unsup() {
        let f = fixture();
        let (mut c, t) = open(&f, off());
        let msg = expect(&mut c, opt::STARTTLS, &[], rep::ERR_UNSUP);
        assert_eq!(msg, b"TLS is not configured on this server");
        // Data is refused before anything else is looked at.
        expect(&mut c, opt::STARTTLS, b"x", rep::ERR_INVALID);
        abort(c, t);
    }

    #[test]
    fn tls_required_refuses_plaintext_options_with_err_tls_reqd() {
        let f = fixture();
        let (server_cfg, _) = tls_configs();
        let (mut c, t) = start_tcp(&f, policy(TlsMode::Require, Some(server_cfg)));
        greet(&mut c, FIXED | handshake::C_NO_ZEROES);
        for (o, p) in [
            (opt::GO, go_payload(b"disk", &[])),
            (opt::INFO, go_payload(b"disk", &[])),
            (opt::LIST, Vec::new()),
            (opt::STRUCTURED_REPLY, Vec::new()),
            (999, b"abc".to_vec()),
        ] {
            let msg = expect(&mut c, o, &p, rep::ERR_TLS_REQD);
            assert_eq!(msg, b"TLS is required: use NBD_OPT_STARTTLS");
        }
        expect(&mut c, opt::ABORT, &[], rep::ACK);
        let (ended, is_tls) = t.join().unwrap();
        assert_eq!((ended.unwrap(), is_tls), (None, false));
    }

    #[test]
    fn tls_required_closes_a_plaintext_export_name() {
        let f = fixture();
        let (mut c, t) = start_tcp(&f, policy(TlsMode::Require, None));
        greet(&mut c, FIXED | handshake::C_NO_ZEROES);
        send_option(&mut c, opt::EXPORT_NAME, b"disk");
        assert_eq!(t.join().unwrap().0.unwrap(), None);
        assert!(read_rest(&mut c).is_empty());
    }

    #[test]
    fn unix_clients_are_exempt_from_required_tls() {
        // Documentation/cli.md: "TLS applies to TCP clients only."
        let f = fixture();
        let (server_cfg, _) = tls_configs();
        let (mut c, t) = open(&f, policy(TlsMode::Require, Some(server_cfg)));
        let msg = expect(&mut c, opt::STARTTLS, &[], rep::ERR_UNSUP);
        assert_eq!(msg, b"TLS is for TCP connections only");
        expect(&mut c, opt::GO, &go_payload(b"disk", &[]), rep::INFO);
        let (h, _) = read_option_reply(&mut c);
        assert_eq!(h.reply, rep::ACK);
        assert_eq!(t.join().unwrap().unwrap().as_deref(), Some("disk"));
    }

    /// The handshake on a TCP connection from 127.0.0.1; returns the client
    /// end and how `run` ended, plus whether the link was TLS by then.
    fn start_tcp(f: &Fixture, tls: TlsPolicy) -> (TcpStream, JoinHandle<(Ended, bool)>) {
        start_tcp_within(f, tls, None)
    }

    /// [`start_tcp`], with the handshake limited to `limit` from now.
    fn start_tcp_within(
        f: &Fixture,
        tls: TlsPolicy,
        limit: Option<Duration>,
    ) -> (TcpStream, JoinHandle<(Ended, bool)>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let c = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        c.set_read_timeout(Some(PATIENCE)).unwrap();
        let (s, _) = l.accept().unwrap();
        s.set_read_timeout(Some(PATIENCE)).unwrap();
        let exports = f.exports.clone();
        let deadline = limit.map(|l| Instant::now() + l);
        let t = std::thread::spawn(move || {
            let mut link = Link::tcp(s);
            link.set_deadline(deadline);
            let r = outcome(run(&mut link, &exports, &tls));
            (r, link.is_tls())
        });
        (c, t)
    }

    #[test]
    fn starttls_on_tcp_without_a_certificate_or_with_tls_off_is_err_unsup() {
        let f = fixture();
        let (server_cfg, _) = tls_configs();
        for tls in [
            policy(TlsMode::Allow, None),
            policy(TlsMode::Off, Some(server_cfg)),
        ] {
            let (mut c, t) = start_tcp(&f, tls);
            greet(&mut c, FIXED);
            let msg = expect(&mut c, opt::STARTTLS, &[], rep::ERR_UNSUP);
            assert_eq!(msg, b"TLS is not configured on this server");
            expect(&mut c, opt::ABORT, &[], rep::ACK);
            let (ended, is_tls) = t.join().unwrap();
            assert_eq!((ended.unwrap(), is_tls), (None, false));
        }
    }

    /// A self-signed certificate for "localhost": server and client configs.
    fn tls_configs() -> (Arc<ServerConfig>, Arc<rustls::ClientConfig>) {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("enbd-server-tls-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
        let server = enbd_tls::server_config(&cert, &key, None).unwrap();
        let client = enbd_tls::client_config(&cert, None).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        (server, client)
    }

    #[test]
    fn starttls_upgrades_and_the_handshake_goes_on_inside_tls() {
        let f = fixture();
        let (server_cfg, client_cfg) = tls_configs();
        let (mut c, t) = start_tcp(&f, policy(TlsMode::Require, Some(server_cfg)));
        greet(&mut c, FIXED | handshake::C_NO_ZEROES);
        // Plaintext GO is refused, STARTTLS acknowledged.
        expect(
            &mut c,
            opt::GO,
            &go_payload(b"disk", &[]),
            rep::ERR_TLS_REQD,
        );
        assert!(expect(&mut c, opt::STARTTLS, &[], rep::ACK).is_empty());
        let name = enbd_tls::server_name("localhost").unwrap();
        let mut tls =
            rustls::StreamOwned::new(rustls::ClientConnection::new(client_cfg, name).unwrap(), c);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock).unwrap();
        }
        // Inside TLS: a second STARTTLS is invalid, and GO now works.
        let msg = expect(&mut tls, opt::STARTTLS, &[], rep::ERR_INVALID);
        assert_eq!(msg, b"TLS is already on");
        let p = expect(&mut tls, opt::GO, &go_payload(b"iso", &[]), rep::INFO);
        assert!(matches!(
            Info::decode(&p),
            Ok(Info::Export { size: ISO_SIZE, .. })
        ));
        let (h, _) = read_option_reply(&mut tls);
        assert_eq!(h.reply, rep::ACK);
        let (ended, is_tls) = t.join().unwrap();
        assert_eq!(ended.unwrap().as_deref(), Some("iso"));
        assert!(is_tls);
    }

    #[test]
    fn starttls_forgets_what_was_negotiated_in_plaintext() {
        let f = fixture();
        let (server_cfg, client_cfg) = tls_configs();
        let (mut c, t) = start_tcp(&f, policy(TlsMode::Allow, Some(server_cfg)));
        greet(&mut c, FIXED | handshake::C_NO_ZEROES);
        expect(&mut c, opt::STRUCTURED_REPLY, &[], rep::ACK);
        expect(&mut c, opt::STARTTLS, &[], rep::ACK);
        let name = enbd_tls::server_name("localhost").unwrap();
        let mut tls =
            rustls::StreamOwned::new(rustls::ClientConnection::new(client_cfg, name).unwrap(), c);
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock).unwrap();
        }
        // No structured replies any more: no DF, and SET is refused.
        let q = {
            let mut b = vec![0u8; 64];
            let n = MetaContextRequest::encode(b"disk", &[BASE_ALLOCATION], &mut b).unwrap();
            b.truncate(n);
            b
        };
        expect(&mut tls, opt::SET_META_CONTEXT, &q, rep::ERR_INVALID);
        let p = expect(&mut tls, opt::GO, &go_payload(b"disk", &[]), rep::INFO);
        assert_eq!(
            Info::decode(&p),
            Ok(Info::Export {
                size: DISK_SIZE,
                flags: disk_flags()
            })
        );
        let (h, _) = read_option_reply(&mut tls);
        assert_eq!(h.reply, rep::ACK);
        assert_eq!(t.join().unwrap().0.unwrap().as_deref(), Some("disk"));
    }

    #[test]
    fn a_failed_tls_handshake_is_an_error() {
        let f = fixture();
        let (server_cfg, _) = tls_configs();
        let (mut c, t) = start_tcp(&f, policy(TlsMode::Allow, Some(server_cfg)));
        greet(&mut c, FIXED);
        expect(&mut c, opt::STARTTLS, &[], rep::ACK);
        // Not a TLS ClientHello.
        c.write_all(&[0x16, 0x03, 0x01, 0x00, 0x05, 1, 2, 3, 4, 5])
            .unwrap();
        let (ended, is_tls) = t.join().unwrap();
        assert!(matches!(ended, Err(HandshakeError::Tls(_))), "{ended:?}");
        assert!(!is_tls);
    }

    const LIMIT: Duration = Duration::from_millis(500);

    /// Checks that `t` ended in a timeout, well before the client was done.
    fn timed_out(t: JoinHandle<(Ended, bool)>, start: Instant) {
        let (ended, _) = t.join().unwrap();
        let took = start.elapsed();
        assert!(
            matches!(&ended, Err(e) if e.is_timeout()),
            "{ended:?} after {took:?}"
        );
        assert!(took < LIMIT * 4, "the handshake went on for {took:?}");
    }

    /// A TCP handshake with the deadline set, STARTTLS acknowledged.
    fn start_tls_within(limit: Duration) -> (TcpStream, JoinHandle<(Ended, bool)>, Fixture) {
        let f = fixture();
        let (server_cfg, _) = tls_configs();
        let (mut c, t) =
            start_tcp_within(&f, policy(TlsMode::Allow, Some(server_cfg)), Some(limit));
        greet(&mut c, FIXED);
        expect(&mut c, opt::STARTTLS, &[], rep::ACK);
        (c, t, f)
    }

    #[test]
    fn a_client_stalling_before_its_options_times_out() {
        let f = fixture();
        let start = Instant::now();
        let (mut c, t) = start_tcp_within(&f, off(), Some(LIMIT));
        greet(&mut c, FIXED);
        timed_out(t, start);
        assert!(read_rest(&mut c).is_empty());
    }

    #[test]
    fn a_client_stalling_the_tls_handshake_times_out() {
        let start = Instant::now();
        let (_c, t, _f) = start_tls_within(LIMIT);
        timed_out(t, start);
    }

    #[test]
    fn a_client_trickling_its_client_hello_times_out() {
        let start = Instant::now();
        let (mut c, t, _f) = start_tls_within(LIMIT);
        let (_, client_cfg) = tls_configs();
        let name = enbd_tls::server_name("localhost").unwrap();
        let mut hello = Vec::new();
        rustls::ClientConnection::new(client_cfg, name)
            .unwrap()
            .write_tls(&mut hello)
            .unwrap();
        // One byte every 20 ms: each read is quick, the whole takes seconds.
        let gap = Duration::from_millis(20);
        assert!(gap * hello.len() as u32 > LIMIT * 4);
        std::thread::spawn(move || {
            for b in hello {
                std::thread::sleep(gap);
                if c.write_all(&[b]).is_err() {
                    return;
                }
            }
        });
        timed_out(t, start);
    }
}
