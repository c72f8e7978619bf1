//! The seed corpus, made with the wire encoders so that it is valid where it
//! means to be. `seeds/<target>/<name>` holds these files; the test below
//! checks them, and `ENBD_FUZZ_BLESS=1 cargo test` rewrites them.

use enbd_core::wire::{
    cmd_flags, handshake as hs, info, opt, Cmd, ExportNameReply, GoRequest, Greeting, Info,
    OptionHeader, OptionReplyHeader, Request, SimpleReply, IHAVEOPT,
};
use enbd_server::handshake::TlsMode;

use crate::handshake::Setup as Hs;
use crate::transmission::Setup as Tx;

pub type Seeds = Vec<(&'static str, Vec<u8>)>;

fn option(o: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = OptionHeader {
        option: o,
        length: payload.len() as u32,
    }
    .encode()
    .to_vec();
    b.extend_from_slice(payload);
    b
}

fn go(name: &[u8], infos: &[u16]) -> Vec<u8> {
    let mut b = vec![0u8; 6 + name.len() + 2 * infos.len()];
    let n = GoRequest::encode(name, infos, &mut b).unwrap_or(0);
    b.truncate(n);
    b
}

fn hs_seed(setup: Hs, cflags: u32, options: &[Vec<u8>]) -> Vec<u8> {
    let mut b = vec![setup.to_byte()];
    b.extend_from_slice(&cflags.to_be_bytes());
    for o in options {
        b.extend_from_slice(o);
    }
    b
}

/// Seeds of the `handshake` target.
pub fn handshake() -> Seeds {
    let unix = Hs {
        tcp: false,
        mode: TlsMode::Off,
        cert: true,
    };
    let tcp_allow = Hs {
        tcp: true,
        mode: TlsMode::Allow,
        cert: true,
    };
    let tcp_require = Hs {
        mode: TlsMode::Require,
        ..tcp_allow
    };
    let fixed = hs::C_FIXED_NEWSTYLE | hs::C_NO_ZEROES;
    let all_infos = [
        info::EXPORT,
        info::NAME,
        info::DESCRIPTION,
        info::BLOCK_SIZE,
        99,
    ];
    vec![
        (
            "go-default",
            hs_seed(unix, fixed, &[option(opt::GO, &go(b"", &[]))]),
        ),
        (
            "list-info-go",
            hs_seed(
                unix,
                fixed,
                &[
                    option(opt::LIST, &[]),
                    option(opt::INFO, &go(b"iso", &all_infos)),
                    option(opt::GO, &go(b"disk", &all_infos)),
                ],
            ),
        ),
        (
            "export-name-with-zeroes",
            hs_seed(
                unix,
                hs::C_FIXED_NEWSTYLE,
                &[option(opt::EXPORT_NAME, b"iso")],
            ),
        ),
        (
            "export-name-unknown",
            hs_seed(unix, fixed, &[option(opt::EXPORT_NAME, b"nope")]),
        ),
        (
            "starttls-refused-then-abort",
            hs_seed(
                unix,
                fixed,
                &[option(opt::STARTTLS, &[]), option(opt::ABORT, &[])],
            ),
        ),
        (
            "starttls-then-garbage",
            hs_seed(
                tcp_allow,
                fixed,
                &[
                    option(opt::STARTTLS, &[]),
                    vec![0x16, 3, 1, 0, 5, 1, 2, 3, 4, 5],
                ],
            ),
        ),
        (
            "tls-required-go-list-refused",
            hs_seed(
                tcp_require,
                fixed,
                &[
                    option(opt::GO, &go(b"disk", &[])),
                    option(opt::LIST, &[]),
                    option(opt::STARTTLS, b"x"),
                    option(opt::EXPORT_NAME, b"disk"),
                ],
            ),
        ),
        (
            "unknown-and-malformed-options",
            hs_seed(
                unix,
                fixed,
                &[
                    option(opt::STRUCTURED_REPLY, &[]),
                    option(9, b"\0\0\0\0\0\0\0\x0fbase:allocation"),
                    option(999, b"abc"),
                    option(opt::LIST, b"x"),
                    option(opt::GO, &[0xff, 0xff, 0xff, 0xff, 0, 0]),
                    option(opt::INFO, &go(b"nope", &[])),
                    option(opt::ABORT, &[]),
                ],
            ),
        ),
        (
            "bad-option-magic",
            hs_seed(unix, fixed, &[Greeting { flags: 3 }.encode().to_vec()]),
        ),
        (
            "oversized-option",
            hs_seed(
                unix,
                fixed,
                &[(IHAVEOPT, opt::INFO, 65537u32)].map(|(m, o, l)| {
                    [
                        m.to_be_bytes().as_slice(),
                        &o.to_be_bytes(),
                        &l.to_be_bytes(),
                    ]
                    .concat()
                }),
            ),
        ),
        ("not-fixed-newstyle", hs_seed(unix, 0, &[])),
        (
            "cut-option",
            hs_seed(
                unix,
                fixed,
                &[option(opt::GO, &go(b"disk", &[]))[..20].to_vec()],
            ),
        ),
    ]
}

fn tx_seed(setup: Tx, reqs: &[(Cmd, u16, u64, u32)]) -> Vec<u8> {
    let mut b = vec![setup.to_byte()];
    for (i, &(cmd, flags, off, len)) in reqs.iter().enumerate() {
        b.extend_from_slice(&Request::new(cmd, flags, i as u64, off, len).encode());
        if cmd == Cmd::Write {
            b.extend((0..len).map(|k| (k as u8).wrapping_mul(31).wrapping_add(i as u8)));
        }
    }
    b
}

/// Seeds of the `transmission` target.
pub fn transmission() -> Seeds {
    let one = Tx {
        read_only: false,
        workers: 1,
        raw: false,
    };
    let ro = Tx {
        read_only: true,
        ..one
    };
    let raw = Tx { raw: true, ..one };
    let many = Tx { workers: 4, ..one };
    let fua = cmd_flags::FUA;
    let end = crate::transmission::SIZE as u64;
    let mut bad_magic = tx_seed(one, &[(Cmd::Read, 0, 0, 512)]);
    bad_magic.extend_from_slice(&SimpleReply::default().encode());
    bad_magic.extend_from_slice(&[0; 12]);
    vec![
        (
            "write-read-flush",
            tx_seed(
                one,
                &[
                    (Cmd::Write, 0, 4096, 512),
                    (Cmd::Read, 0, 4000, 1024),
                    (Cmd::Flush, 0, 0, 0),
                ],
            ),
        ),
        (
            "every-command",
            tx_seed(
                one,
                &[
                    (Cmd::Read, fua, 0, 4096),
                    (Cmd::Write, fua, 100, 300),
                    (Cmd::Trim, 0, 8192, 8192),
                    (Cmd::WriteZeroes, cmd_flags::NO_HOLE, 20000, 1000),
                    (Cmd::WriteZeroes, fua, 30000, 5000),
                    (Cmd::Cache, 0, 0, 4096),
                    (Cmd::Flush, fua, 0, 0),
                    (Cmd::Read, 0, 0, 65536),
                    (Cmd::Disc, 0, 0, 0),
                ],
            ),
        ),
        (
            "out-of-range-and-bad-flags",
            tx_seed(
                one,
                &[
                    (Cmd::Read, 0, end - 1, 2),
                    (Cmd::Read, 0, u64::MAX - 1, 4096),
                    (Cmd::Write, 0, end, 16),
                    (Cmd::Write, cmd_flags::NO_HOLE, 0, 16),
                    (Cmd::Trim, cmd_flags::DF, 0, 512),
                    (Cmd::WriteZeroes, cmd_flags::FAST_ZERO, 0, 512),
                    (Cmd::Read, 0, 0, 33 << 20),
                    (Cmd::Disc, 1 << 9, 0, 0),
                ],
            ),
        ),
        (
            "unknown-command",
            [tx_seed(one, &[]), {
                let mut r = Request::new(Cmd::Read, 0, 1, 0, 8);
                r.cmd = 9;
                r.encode().to_vec()
            }]
            .concat(),
        ),
        (
            "read-only-export",
            tx_seed(
                ro,
                &[
                    (Cmd::Read, 0, 0, 512),
                    (Cmd::Write, 0, 0, 512),
                    (Cmd::Trim, 0, 0, 512),
                    (Cmd::WriteZeroes, 0, 0, 512),
                    (Cmd::Flush, 0, 0, 0),
                ],
            ),
        ),
        (
            // Enough that workers start while the server still reads.
            "hang-up-without-disc",
            tx_seed(
                raw,
                &[(Cmd::Write, 0, 0, 512), (Cmd::Read, 0, 0, 512)].repeat(24),
            ),
        ),
        (
            "hang-up-after-disc",
            tx_seed(
                raw,
                &[
                    (Cmd::Write, 0, 0, 512),
                    (Cmd::Disc, 0, 0, 0),
                    (Cmd::Read, 0, 0, 8),
                ],
            ),
        ),
        ("bad-magic", bad_magic),
        (
            "cut-write",
            tx_seed(raw, &[(Cmd::Write, 0, 0, 512)])[..200].to_vec(),
        ),
        (
            "four-workers",
            tx_seed(
                many,
                &[
                    (Cmd::Write, 0, 0, 4096),
                    (Cmd::Read, 0, 0, 4096),
                    (Cmd::Write, fua, 4096, 4096),
                    (Cmd::Flush, 0, 0, 0),
                    (Cmd::Read, 0, 4096, 4096),
                ],
            ),
        ),
    ]
}

/// Seeds of the `wire_decode` target: one of each message, valid.
pub fn wire_decode() -> Seeds {
    let mut b = [0u8; 64];
    let mut info = |i: Info| {
        let n = i.encode(&mut b).unwrap_or(0);
        b[..n].to_vec()
    };
    let mut entry = vec![0u8; 12];
    let n = enbd_core::wire::encode_list_entry(b"disk", &mut entry).unwrap_or(0);
    entry.truncate(n);
    entry.extend_from_slice(b"a description");
    vec![
        ("greeting", Greeting { flags: 3 }.encode().to_vec()),
        (
            "option-header",
            OptionHeader {
                option: opt::GO,
                length: 12,
            }
            .encode()
            .to_vec(),
        ),
        (
            "option-reply",
            OptionReplyHeader {
                option: opt::GO,
                reply: 3,
                length: 12,
            }
            .encode()
            .to_vec(),
        ),
        ("go-request", go(b"disk", &[info::NAME, info::BLOCK_SIZE])),
        (
            "info-export",
            info(Info::Export {
                size: 1 << 30,
                flags: 0x1ed,
            }),
        ),
        (
            "info-block-size",
            info(Info::BlockSize {
                min: 1,
                preferred: 4096,
                max: 32 << 20,
            }),
        ),
        ("info-name", info(Info::Name(b"disk"))),
        ("list-entry", entry),
        (
            "export-name-reply",
            ExportNameReply {
                size: 1 << 20,
                flags: 1,
            }
            .encode()
            .to_vec(),
        ),
        (
            "request",
            Request::new(Cmd::Write, cmd_flags::FUA, 7, 4096, 512)
                .encode()
                .to_vec(),
        ),
        (
            "simple-reply",
            SimpleReply {
                error: 5,
                cookie: 7,
            }
            .encode()
            .to_vec(),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    /// The files under `seeds/` are these seeds, byte for byte.
    #[test]
    fn checked_in_seeds_are_current() {
        let bless = std::env::var_os("ENBD_FUZZ_BLESS").is_some();
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("seeds");
        for (target, seeds) in [
            ("handshake", super::handshake()),
            ("transmission", super::transmission()),
            ("wire_decode", super::wire_decode()),
        ] {
            let dir = root.join(target);
            if bless {
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(&dir).unwrap();
            }
            let mut names: Vec<String> = seeds.iter().map(|(n, _)| n.to_string()).collect();
            for (name, data) in &seeds {
                let p = dir.join(name);
                if bless {
                    std::fs::write(&p, data).unwrap();
                }
                let on_disk = std::fs::read(&p).unwrap_or_default();
                assert!(
                    on_disk == *data,
                    "{} is stale: ENBD_FUZZ_BLESS=1 cargo test",
                    p.display()
                );
            }
            // Crash inputs found later are kept too (their names start with
            // "crash-"); anything else is a seed this file no longer makes.
            let mut on_disk: Vec<String> = std::fs::read_dir(&dir)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| !n.starts_with("crash-"))
                .collect();
            on_disk.sort();
            names.sort();
            assert_eq!(on_disk, names, "{}", dir.display());
        }
    }
}
