//! Moving a rustls session into kernel TLS.
//!
//! After `TCP_ULP "tls"` and the `TLS_TX`/`TLS_RX` crypto parameters are set
//! on a TCP socket, the kernel encrypts what is sent and decrypts what is
//! received; records that are not application data (alerts, close_notify)
//! make a plain `recv` fail instead of being read as data.

use std::io;
use std::os::fd::RawFd;

use rustls::{ConnectionTrafficSecrets, ExtractedSecrets, ProtocolVersion};

// From <linux/tcp.h> and <linux/tls.h>.
const TCP_ULP: libc::c_int = 31;
const SOL_TLS: libc::c_int = 282;
const TLS_TX: libc::c_int = 1;
const TLS_RX: libc::c_int = 2;
const TLS_SET_RECORD_TYPE: libc::c_int = 1;
const TLS_RECORD_TYPE_ALERT: u8 = 21;
const TLS_1_2_VERSION: u16 = 0x0303;
const TLS_1_3_VERSION: u16 = 0x0304;
const TLS_CIPHER_AES_GCM_128: u16 = 51;
const TLS_CIPHER_AES_GCM_256: u16 = 52;
const TLS_CIPHER_CHACHA20_POLY1305: u16 = 54;

/// Why the session could not move into the kernel.
#[derive(Debug, thiserror::Error)]
pub enum KtlsError {
    /// The kernel has no TLS ULP (module missing); the socket is untouched
    /// and the rustls session can still be used in userspace.
    #[error("kernel TLS is not available (is the tls module loaded?): {0}")]
    Unavailable(io::Error),
    /// Secrets could not be extracted, or the kernel refused them; the
    /// socket is no longer usable.
    #[error("handing the TLS session to the kernel failed: {0}")]
    Failed(String),
}

fn setsockopt(fd: RawFd, level: libc::c_int, name: libc::c_int, val: &[u8]) -> io::Result<()> {
    // SAFETY: `val` is valid for reads of its length for the duration of the call.
    let r = unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            val.as_ptr().cast(),
            val.len() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// The `struct tls12_crypto_info_*` for one direction (the "12" in the
/// kernel's names is historical; the version field says which TLS).
///
/// rustls gives AES-GCM's 12-byte nonce base for both versions; the kernel
/// wants it split into salt and IV. In TLS 1.2 the last 8 bytes are the
/// first explicit nonce, which goes on the wire, so the peer never depends
/// on how the kernel advances it.
fn crypto_info(
    version: ProtocolVersion,
    seq: u64,
    secrets: &ConnectionTrafficSecrets,
) -> Result<Vec<u8>, KtlsError> {
    let version = match version {
        ProtocolVersion::TLSv1_3 => TLS_1_3_VERSION,
        ProtocolVersion::TLSv1_2 => TLS_1_2_VERSION,
        v => {
            return Err(KtlsError::Failed(format!(
                "{v:?} is not supported by kernel TLS"
            )))
        }
    };
    let mut v = Vec::with_capacity(64);
    let (cipher, key, iv): (u16, &[u8], &[u8]) = match secrets {
        ConnectionTrafficSecrets::Aes128Gcm { key, iv } => {
            (TLS_CIPHER_AES_GCM_128, key.as_ref(), iv.as_ref())
        }
        ConnectionTrafficSecrets::Aes256Gcm { key, iv } => {
            (TLS_CIPHER_AES_GCM_256, key.as_ref(), iv.as_ref())
        }
        ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
            (TLS_CIPHER_CHACHA20_POLY1305, key.as_ref(), iv.as_ref())
        }
        _ => {
            return Err(KtlsError::Failed(
                "cipher suite not supported by kernel TLS".into(),
            ))
        }
    };
    if iv.len() != 12 {
        return Err(KtlsError::Failed(format!(
            "unexpected IV length {}",
            iv.len()
        )));
    }
    v.extend_from_slice(&version.to_ne_bytes());
    v.extend_from_slice(&cipher.to_ne_bytes());
    if cipher == TLS_CIPHER_CHACHA20_POLY1305 {
        // iv[12], key[32], rec_seq[8]
        v.extend_from_slice(iv);
        v.extend_from_slice(key);
    } else {
        // iv[8] (the nonce's last 8 bytes), key, salt[4] (its first 4), rec_seq[8]
        v.extend_from_slice(&iv[4..]);
        v.extend_from_slice(key);
        v.extend_from_slice(&iv[..4]);
    }
    v.extend_from_slice(&seq.to_be_bytes());
    Ok(v)
}

/// Attaches the TLS ULP. Done before the secrets are extracted, because
/// failing here leaves the rustls session usable (for a proxy fallback).
pub fn attach_ulp(fd: RawFd) -> Result<(), KtlsError> {
    setsockopt(fd, libc::SOL_TCP, TCP_ULP, b"tls").map_err(KtlsError::Unavailable)
}

/// Moves an idle session (no plaintext buffered either way) into the
/// kernel: both directions, on a socket that has the ULP attached.
pub fn install(fd: RawFd, conn: rustls::Connection) -> Result<(), KtlsError> {
    let version = conn
        .protocol_version()
        .ok_or_else(|| KtlsError::Failed("the TLS handshake has not finished".into()))?;
    let secrets: ExtractedSecrets = conn
        .dangerous_extract_secrets()
        .map_err(|e| KtlsError::Failed(format!("extracting the session keys: {e}")))?;
    let (tx_seq, tx) = secrets.tx;
    let (rx_seq, rx) = secrets.rx;
    setsockopt(fd, SOL_TLS, TLS_TX, &crypto_info(version, tx_seq, &tx)?)
        .map_err(|e| KtlsError::Failed(format!("TLS_TX: {e}")))?;
    setsockopt(fd, SOL_TLS, TLS_RX, &crypto_info(version, rx_seq, &rx)?)
        .map_err(|e| KtlsError::Failed(format!("TLS_RX: {e}")))?;
    Ok(())
}

/// Sends a TLS close_notify alert on a kernel-TLS socket, telling the peer
/// the session ends here.
pub fn send_close_notify(fd: RawFd) -> io::Result<()> {
    // level warning (1), description close_notify (0)
    let alert = [1u8, 0u8];
    let mut iov = libc::iovec {
        iov_base: alert.as_ptr() as *mut libc::c_void,
        iov_len: alert.len(),
    };
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(1) } as usize;
    let mut control = vec![0u64; space.div_ceil(8)];
    // SAFETY: zeroed msghdr is valid; every pointer set below outlives the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: `msg` has a control buffer of CMSG_SPACE(1) bytes, so the first
    // header and its one data byte fit.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = SOL_TLS;
        (*c).cmsg_type = TLS_SET_RECORD_TYPE;
        (*c).cmsg_len = libc::CMSG_LEN(1) as _;
        *libc::CMSG_DATA(c) = TLS_RECORD_TYPE_ALERT;
    }
    // SAFETY: `msg` is fully initialised above.
    let r = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aes_gcm_layout_matches_linux_tls_h() {
        let key = rustls::crypto::cipher::AeadKey::from([7u8; 32]);
        let iv = rustls::crypto::cipher::Iv::new([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        let v = crypto_info(
            ProtocolVersion::TLSv1_3,
            0x0102,
            &ConnectionTrafficSecrets::Aes256Gcm { key, iv },
        )
        .unwrap();
        // struct tls12_crypto_info_aes_gcm_256: 4 + 8 + 32 + 4 + 8 bytes.
        assert_eq!(v.len(), 56);
        assert_eq!(&v[..2], &0x0304u16.to_ne_bytes());
        assert_eq!(&v[2..4], &52u16.to_ne_bytes());
        assert_eq!(&v[4..12], &[5, 6, 7, 8, 9, 10, 11, 12]);
        assert_eq!(&v[44..48], &[1, 2, 3, 4]);
        assert_eq!(&v[48..], &[0, 0, 0, 0, 0, 0, 1, 2]);
    }

    #[test]
    fn tls12_sets_its_version_and_older_ones_are_refused() {
        let secrets = || ConnectionTrafficSecrets::Aes128Gcm {
            key: rustls::crypto::cipher::AeadKey::from([7u8; 32]),
            iv: rustls::crypto::cipher::Iv::new([0; 12]),
        };
        let v = crypto_info(ProtocolVersion::TLSv1_2, 0, &secrets()).unwrap();
        assert_eq!(&v[..2], &0x0303u16.to_ne_bytes());
        assert!(crypto_info(ProtocolVersion::TLSv1_1, 0, &secrets()).is_err());
    }
}
