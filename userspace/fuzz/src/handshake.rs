//! The `handshake` target: `enbd_server::handshake::run`, the option
//! negotiation, on a socket pair, with the client's bytes from the fuzzer.
//!
//! Input: one byte choosing the connection ([`Setup`]), then what the client
//! sends after the greeting (client flags, then options).

use std::io::Write;
use std::net::{Shutdown, TcpStream};
use std::os::fd::OwnedFd;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use enbd_core::wire::{
    decode_list_entry, handshake as hs, opt, rep, ExportNameReply, Greeting, Info,
    OptionReplyHeader, IHAVEOPT, MAX_OPTION_LEN,
};
use enbd_server::export::{ExportSpec, Exports};
use enbd_server::handshake::{run as negotiate, Outcome, TlsMode, TlsPolicy};
use enbd_server::link::Link;
use rustls::ServerConfig;

/// The connection a run uses, from the input's first byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Setup {
    /// A TCP link (`Link::Tcp`); otherwise a unix one. Both are a socket
    /// pair underneath: `TcpStream` is only a descriptor wrapper, and TLS
    /// policy is what tells them apart.
    pub tcp: bool,
    pub mode: TlsMode,
    /// Whether the server has a certificate.
    pub cert: bool,
}

impl Setup {
    pub fn from_byte(b: u8) -> Self {
        let mode = match b >> 1 & 3 {
            0 => TlsMode::Off,
            1 => TlsMode::Allow,
            2 => TlsMode::Require,
            _ => TlsMode::Off,
        };
        Self {
            tcp: b & 1 != 0,
            mode,
            cert: b & 0x80 == 0,
        }
    }

    /// The byte [`Setup::from_byte`] reads back as `self`.
    pub fn to_byte(self) -> u8 {
        let mode = match self.mode {
            TlsMode::Off => 0,
            TlsMode::Allow => 1,
            TlsMode::Require => 2,
        };
        u8::from(self.tcp) | mode << 1 | if self.cert { 0 } else { 0x80 }
    }
}

/// The exports every run sees: "disk" (default, with a description) and
/// "iso" (read-only), small files opened once per process.
fn exports() -> &'static Exports {
    static E: OnceLock<Exports> = OnceLock::new();
    E.get_or_init(|| {
        let disk = crate::backing_file("handshake-disk", 64 << 10);
        let iso = crate::backing_file("handshake-iso", 4 << 10);
        let specs = [
            format!("disk={},desc=the disk", disk.display()),
            format!("iso={},ro", iso.display()),
        ];
        let specs: Result<Vec<ExportSpec>, _> = specs.iter().map(|s| s.parse()).collect();
        match specs
            .map_err(anyhow::Error::msg)
            .and_then(|s| Exports::open(&s))
        {
            Ok(e) => e,
            Err(e) => panic!("harness set-up: exports: {e:#}"),
        }
    })
}

/// A self-signed certificate's server config, made once per process.
fn tls_config() -> Arc<ServerConfig> {
    static C: OnceLock<Arc<ServerConfig>> = OnceLock::new();
    C.get_or_init(|| {
        let made = (|| -> anyhow::Result<Arc<ServerConfig>> {
            let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])?;
            let dir = crate::scratch_dir();
            let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
            std::fs::write(&cert, ck.cert.pem())?;
            std::fs::write(&key, ck.key_pair.serialize_pem())?;
            Ok(enbd_tls::server_config(&cert, &key, None)?)
        })();
        match made {
            Ok(c) => c,
            Err(e) => panic!("harness set-up: TLS config: {e:#}"),
        }
    })
    .clone()
}

/// How `run` ended, without the export itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ended {
    Transmission(String),
    Closed,
    Error(String),
    /// The handshake deadline ran out: the client had sent everything and
    /// hung up long before, so the server hung.
    TimedOut,
}

/// Runs one input; panics if the server broke the protocol.
pub fn fuzz(data: &[u8]) {
    let Some((&first, client)) = data.split_first() else {
        return;
    };
    let setup = Setup::from_byte(first);
    let (ended, output) = exchange(setup, client);
    if let Err(e) = check(setup, client, &output, &ended) {
        panic!("{e}\nsetup {setup:?}, ended {ended:?}\nclient {client:02x?}\nserver {output:02x?}");
    }
}

/// Runs the handshake with `client` as everything the client sends; returns
/// how it ended and everything the server sent.
pub fn exchange(setup: Setup, client: &[u8]) -> (Ended, Vec<u8>) {
    let (c, s) = crate::socket_pair();
    let mut link = if setup.tcp {
        Link::tcp(TcpStream::from(OwnedFd::from(s)))
    } else {
        Link::unix(s)
    };
    // The server's own limit, as in production: a server waiting for bytes
    // after the client's EOF ends here, and the oracle reports it.
    link.set_deadline(Some(Instant::now() + crate::PATIENCE));
    let tls = TlsPolicy {
        mode: setup.mode,
        config: setup.cert.then(tls_config),
    };
    let reader = match c.try_clone() {
        Ok(r) => crate::drain(r),
        Err(e) => panic!("harness set-up: {e}"),
    };
    let input = client.to_vec();
    let writer = std::thread::spawn(move || {
        let mut c = c;
        // The server may close before it read everything: not an error.
        let _ = c.write_all(&input);
        let _ = c.shutdown(Shutdown::Write);
    });
    let ended = match negotiate(&mut link, exports(), &tls) {
        Ok(Outcome::Transmission(e, _)) => Ended::Transmission(e.name().to_owned()),
        Ok(Outcome::Closed) => Ended::Closed,
        Err(e) if e.is_timeout() => Ended::TimedOut,
        Err(e) => Ended::Error(e.to_string()),
    };
    // Closing the server's end ends the drain.
    drop(link);
    if writer.join().is_err() {
        panic!("harness: the writer thread panicked");
    }
    (ended, crate::drained(reader))
}

/// Splits `n` bytes off the front of `b`.
fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if b.len() < n {
        return None;
    }
    let (head, tail) = b.split_at(n);
    *b = tail;
    Some(head)
}

fn array<const N: usize>(b: &mut &[u8]) -> Option<[u8; N]> {
    take(b, N).and_then(|h| h.try_into().ok())
}

/// Checks the server's output against the client's input:
///
/// * the greeting, then nothing unless the client flags are fixed newstyle
///   with no unknown bits;
/// * for each complete option, in order, replies to that option alone:
///   any number of non-final ones (`REP_SERVER` only for LIST, `REP_INFO`
///   only for INFO/GO, each payload decodable) and then exactly one final
///   one (ACK or an error), except EXPORT_NAME, answered with the export
///   reply or nothing;
/// * nothing after an ACKed ABORT, GO or EXPORT_NAME (or after an ACKed
///   STARTTLS: TLS follows), nor after an incomplete or malformed option;
/// * `run` ending in transmission exactly after GO's ACK or the export
///   reply, in `Closed` after ABORT's ACK or an unanswered EXPORT_NAME, and
///   in an error otherwise.
pub fn check(setup: Setup, mut client: &[u8], mut out: &[u8], ended: &Ended) -> Result<(), String> {
    if *ended == Ended::TimedOut {
        return Err("the server waited for the client after its EOF".into());
    }
    let g = array::<{ Greeting::LEN }>(&mut out).ok_or("no complete greeting")?;
    let g = Greeting::decode(&g).map_err(|e| format!("greeting: {e}"))?;
    if g.flags & hs::FIXED_NEWSTYLE == 0 {
        return Err("greeting without FIXED_NEWSTYLE".into());
    }
    let expect_end = |out: &[u8], want_error: bool| -> Result<(), String> {
        if !out.is_empty() {
            return Err(format!("{} bytes sent after the end", out.len()));
        }
        match ended {
            Ended::Error(_) if want_error => Ok(()),
            Ended::Closed if !want_error => Ok(()),
            _ => Err(format!("the handshake ended in {ended:?}")),
        }
    };
    let Some(cf) = array::<4>(&mut client) else {
        return expect_end(out, true);
    };
    let cflags = u32::from_be_bytes(cf);
    if cflags & !hs::C_KNOWN != 0 || cflags & hs::C_FIXED_NEWSTYLE == 0 {
        return expect_end(out, true);
    }
    let no_zeroes = cflags & hs::C_NO_ZEROES != 0;
    let mut n = 0usize;
    loop {
        n += 1;
        let Some(h) = array::<16>(&mut client) else {
            return expect_end(out, true);
        };
        let magic = u64::from_be_bytes(h[..8].try_into().unwrap_or_default());
        let option = u32::from_be_bytes(h[8..12].try_into().unwrap_or_default());
        let len = u32::from_be_bytes(h[12..].try_into().unwrap_or_default());
        if magic != IHAVEOPT || len > MAX_OPTION_LEN || take(&mut client, len as usize).is_none() {
            return expect_end(out, true);
        }
        let what = format!("option #{n} ({} {option})", opt::name(option));
        // Over TCP with TLS required, only STARTTLS and ABORT are looked at.
        let gated = setup.tcp
            && setup.mode == TlsMode::Require
            && !matches!(option, opt::STARTTLS | opt::ABORT);
        if option == opt::EXPORT_NAME {
            if out.is_empty() {
                return expect_end(out, false);
            }
            if gated {
                return Err(format!("{what}: answered before TLS"));
            }
            take(&mut out, ExportNameReply::LEN).ok_or(format!("{what}: short reply"))?;
            if !no_zeroes {
                let z = take(&mut out, ExportNameReply::ZEROES)
                    .ok_or(format!("{what}: no zero padding"))?;
                if z.iter().any(|&b| b != 0) {
                    return Err(format!("{what}: padding is not zeroes"));
                }
            }
            return match ended {
                Ended::Transmission(_) if out.is_empty() => Ok(()),
                _ => Err(format!(
                    "{what}: answered, then {ended:?} with {} bytes",
                    out.len()
                )),
            };
        }
        // This option's replies, up to the final one.
        let mut replies = 0;
        let last = loop {
            replies += 1;
            let h = array::<{ OptionReplyHeader::LEN }>(&mut out)
                .ok_or(format!("{what}: no final reply"))?;
            let h = OptionReplyHeader::decode(&h).map_err(|e| format!("{what}: reply: {e}"))?;
            let p = take(&mut out, h.length as usize).ok_or(format!("{what}: short payload"))?;
            if h.option != option {
                return Err(format!("{what}: answered as option {}", h.option));
            }
            match h.reply {
                rep::ACK => break h.reply,
                r if rep::is_err(r) => break r,
                rep::SERVER if option != opt::LIST => {
                    return Err(format!("{what}: REP_SERVER outside LIST"))
                }
                rep::SERVER => {
                    decode_list_entry(p).map_err(|e| format!("{what}: list entry: {e}"))?;
                }
                rep::INFO if !matches!(option, opt::INFO | opt::GO) => {
                    return Err(format!("{what}: REP_INFO outside INFO/GO"))
                }
                rep::INFO => {
                    Info::decode(p).map_err(|e| format!("{what}: info: {e}"))?;
                }
                rep::META_CONTEXT
                    if !matches!(option, opt::LIST_META_CONTEXT | opt::SET_META_CONTEXT) =>
                {
                    return Err(format!(
                        "{what}: REP_META_CONTEXT outside the meta-context options"
                    ))
                }
                _ => {}
            }
        };
        if gated && (last != rep::ERR_TLS_REQD || replies > 1) {
            return Err(format!("{what}: {} before TLS", rep::describe(last)));
        }
        if last != rep::ACK {
            continue;
        }
        match option {
            opt::ABORT => return expect_end(out, false),
            opt::GO => {
                return match ended {
                    Ended::Transmission(_) if out.is_empty() => Ok(()),
                    _ => Err(format!(
                        "{what}: ACKed, then {ended:?}, {} bytes",
                        out.len()
                    )),
                }
            }
            opt::STARTTLS => {
                if !(setup.tcp && setup.cert && setup.mode != TlsMode::Off) {
                    return Err(format!("{what}: ACKed without TLS on offer"));
                }
                // TLS records follow; what the client sent is no ClientHello
                // a fuzzer can forge, so the handshake fails.
                return match ended {
                    Ended::Error(_) => Ok(()),
                    _ => Err(format!("{what}: TLS, then {ended:?}")),
                };
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seeds;

    #[test]
    fn setup_byte_round_trips() {
        for b in 0..=255u8 {
            let s = Setup::from_byte(b);
            assert_eq!(Setup::from_byte(s.to_byte()), s);
        }
    }

    #[test]
    fn every_seed_passes_the_oracle() {
        for (name, data) in seeds::handshake() {
            let setup = Setup::from_byte(data[0]);
            let (ended, out) = exchange(setup, &data[1..]);
            if let Err(e) = check(setup, &data[1..], &out, &ended) {
                panic!("seed {name}: {e}");
            }
        }
    }

    /// The oracle finds a server that breaks the rules: each corruption of
    /// a real exchange is caught.
    #[test]
    fn the_oracle_catches_a_misbehaving_server() {
        let setup = Setup::from_byte(0);
        let data = seeds::handshake()
            .into_iter()
            .find(|(n, _)| *n == "list-info-go")
            .map(|(_, d)| d)
            .unwrap();
        let client = &data[1..];
        let (ended, out) = exchange(setup, client);
        check(setup, client, &out, &ended).unwrap();
        // A reply to another option than asked.
        let mut wrong = out.clone();
        wrong[Greeting::LEN + 8..Greeting::LEN + 12].copy_from_slice(&opt::GO.to_be_bytes());
        assert!(check(setup, client, &wrong, &ended).is_err());
        // Output cut short, and extra output.
        assert!(check(setup, client, &out[..out.len() - 1], &ended).is_err());
        let mut extra = out.clone();
        extra.push(0);
        assert!(check(setup, client, &extra, &ended).is_err());
        // A different ending, or a hang.
        assert!(check(setup, client, &out, &Ended::Closed).is_err());
        assert!(check(setup, client, &out, &Ended::TimedOut).is_err());
        // An unknown client flag must end it after the greeting.
        let mut bad = client.to_vec();
        bad[3] |= 4;
        assert!(check(setup, &bad, &out, &ended).is_err());
    }
}
