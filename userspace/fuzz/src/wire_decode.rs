//! The `wire_decode` target: every decoder in `enbd_core::wire`, the file the
//! kernel module compiles too, on arbitrary bytes. Decoding must never
//! panic, and what decodes must encode back to the same bytes, so that no
//! field is silently dropped or misread.

use enbd_core::wire::{
    decode_list_entry, encode_list_entry, errno, opt, rep, Cmd, ExportNameReply, GoRequest,
    Greeting, Info, OptionHeader, OptionReplyHeader, Reader, Request, SimpleReply, WireError,
    MAX_NAME_LEN, MAX_OPTION_LEN,
};

fn fixed<const N: usize>(data: &[u8]) -> Option<&[u8; N]> {
    data.get(..N).and_then(|b| b.try_into().ok())
}

/// Checks that a fixed-size decoder's result encodes back to its input.
macro_rules! round_trip {
    ($t:ty, $data:expr) => {
        if let Some(b) = fixed::<{ <$t>::LEN }>($data) {
            if let Ok(v) = <$t>::decode(b) {
                if &v.encode() != b {
                    return Err(format!("{}: {v:?} encodes differently", stringify!($t)));
                }
            }
        }
    };
}

/// Runs every decoder on `data`; panics on a broken round trip.
pub fn fuzz(data: &[u8]) {
    if let Err(e) = check(data) {
        panic!("{e}\ninput {data:02x?}");
    }
}

/// See the module documentation.
pub fn check(data: &[u8]) -> Result<(), String> {
    round_trip!(Greeting, data);
    round_trip!(OptionHeader, data);
    round_trip!(OptionReplyHeader, data);
    round_trip!(ExportNameReply, data);
    round_trip!(Request, data);
    round_trip!(SimpleReply, data);
    if let Some(b) = fixed::<{ OptionReplyHeader::LEN }>(data) {
        if let Ok(h) = OptionReplyHeader::decode(b) {
            if h.length > MAX_OPTION_LEN {
                return Err(format!("option reply of {} bytes accepted", h.length));
            }
            let _ = (
                rep::is_err(h.reply),
                rep::describe(h.reply),
                opt::name(h.option),
            );
        }
    }
    if let Some(b) = fixed::<{ Request::LEN }>(data) {
        if let Ok(r) = Request::decode(b) {
            let cmd = r.command();
            if cmd.map(|c| c as u16) != cmd.map(|_| r.cmd) {
                return Err(format!("{r:?}: command {cmd:?} is not its number"));
            }
            if r.payload_len() != 0 && cmd != Some(Cmd::Write) {
                return Err(format!("{r:?}: a payload on a command other than WRITE"));
            }
            let _ = cmd.map(Cmd::name);
        }
    }
    if let Ok(g) = GoRequest::decode(data) {
        if g.name.len() > MAX_NAME_LEN {
            return Err(format!("a {}-byte export name accepted", g.name.len()));
        }
        let infos: Vec<u16> = g.info_requests().collect();
        let mut b = vec![0u8; data.len()];
        match GoRequest::encode(g.name, &infos, &mut b) {
            Ok(n) if b[..n] == *data => {}
            r => return Err(format!("GoRequest {g:?} encodes as {r:?} {:02x?}", b)),
        }
    }
    match Info::decode(data) {
        Ok(Info::Unknown(kind)) => {
            if fixed::<2>(data) != Some(&kind.to_be_bytes()) {
                return Err(format!("info type {kind} is not the first two bytes"));
            }
        }
        Ok(i) => {
            let mut b = vec![0u8; data.len()];
            match i.encode(&mut b) {
                Ok(n) if b[..n] == *data => {}
                r => return Err(format!("{i:?} encodes as {r:?}")),
            }
            if let Info::BlockSize { min, preferred, .. } = i {
                if !(min.is_power_of_two() && preferred.is_power_of_two() && min <= preferred) {
                    return Err(format!("{i:?} accepted"));
                }
            }
        }
        Err(_) => {}
    }
    if let Ok((name, desc)) = decode_list_entry(data) {
        let mut b = vec![0u8; data.len()];
        match encode_list_entry(name, &mut b) {
            Ok(n) if [&b[..n], desc].concat() == data => {}
            r => return Err(format!("list entry encodes as {r:?}")),
        }
    }
    // Encoders into a buffer of any size report a short one, never panic.
    let room = usize::from(data.first().copied().unwrap_or(0));
    let mut small = vec![0u8; room];
    let name = data.get(1..).unwrap_or_default();
    let infos: Vec<u16> = name
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    for r in [
        GoRequest::encode(name, &infos, &mut small),
        Info::Name(name).encode(&mut small),
        encode_list_entry(name, &mut small),
    ] {
        match r {
            Ok(n) if n <= room => {}
            Err(WireError::Short | WireError::BadLength) => {}
            r => return Err(format!("encoding into {room} bytes: {r:?}")),
        }
    }
    // The Reader reads what it is asked, or fails, never more.
    let mut r = Reader::new(data);
    for &op in data.iter().take(64) {
        let before = r.remaining();
        let want = match op % 4 {
            0 => r.u16().map(|_| 2),
            1 => r.u32().map(|_| 4),
            2 => r.u64().map(|_| 8),
            _ => r.bytes(usize::from(op >> 2)).map(|b| b.len()),
        };
        match want {
            Ok(n) if before - r.remaining() == n => {}
            Err(WireError::Short) if r.remaining() == before => {}
            w => {
                return Err(format!(
                    "Reader: {w:?} moved from {before} to {}",
                    r.remaining()
                ))
            }
        }
    }
    let e = errno::from_linux(i32::from_be_bytes(
        fixed::<4>(data).copied().unwrap_or_default(),
    ));
    if !crate::PROTOCOL_ERRORS.contains(&e) {
        return Err(format!("errno {e} outside the protocol"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seeds;

    #[test]
    fn every_seed_passes() {
        for (name, data) in seeds::wire_decode() {
            if let Err(e) = check(&data) {
                panic!("seed {name}: {e}");
            }
        }
    }
}
