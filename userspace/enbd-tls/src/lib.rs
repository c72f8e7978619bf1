//! TLS for enbd, shared by the client helper and the server.
//!
//! The handshake runs in userspace with rustls, inside the
//! NBD handshake after `NBD_OPT_STARTTLS`. Once the export is chosen, the
//! session keys move into the kernel (kTLS, `TLS_TX` and `TLS_RX`), so the
//! socket can be handed to enbd.ko (or served with plain `send`/`sendfile`)
//! and nobody in userspace has to stay alive for the data path. Where kTLS
//! is missing, [`proxy`] pumps between a socketpair and the rustls session
//! instead, with the helper's life tied to the data path again.
//!
//! Our client speaks TLS 1.3 only. The server also accepts TLS 1.2 (AEAD
//! suites only, which kTLS handles too): Linux `nbd-client` 3.24 offers
//! nothing newer.

pub mod ktls;
pub mod proxy;

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// A TLS set-up error, worded for users.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}")]
    Read {
        what: &'static str,
        path: String,
        source: rustls::pki_types::pem::Error,
    },
    #[error("{path} holds no certificate")]
    NoCertificate { path: String },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("'{0}' is not a valid TLS server name")]
    ServerName(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Reads every certificate in a PEM file.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let display = path.display().to_string();
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|source| TlsError::Read {
            what: "certificates",
            path: display.clone(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { path: display });
    }
    Ok(certs)
}

/// Reads a private key (PKCS#8, PKCS#1 or SEC1) from a PEM file.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|source| TlsError::Read {
        what: "private key",
        path: path.display().to_string(),
        source,
    })
}

fn roots(ca: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for c in load_certs(ca)? {
        store.add(c)?;
    }
    Ok(store)
}

/// Client configuration: trust `ca`; present `cert`/`key` if given (mutual
/// TLS). Secret extraction is on, for the kTLS handoff.
pub fn client_config(
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let b = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(ca)?);
    let mut cfg = match identity {
        Some((cert, key)) => b.with_client_auth_cert(load_certs(cert)?, load_key(key)?)?,
        None => b.with_no_client_auth(),
    };
    cfg.enable_secret_extraction = true;
    Ok(Arc::new(cfg))
}

/// Server configuration from a certificate chain and key; with `client_ca`,
/// clients must present a certificate it signed. No session tickets are
/// sent: after the handoff to kTLS nothing but data may arrive.
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<ServerConfig>, TlsError> {
    let b = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?;
    let b = match client_ca {
        Some(ca) => b.with_client_cert_verifier(
            WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                .build()?,
        ),
        None => b.with_no_client_auth(),
    };
    let mut cfg = b.with_single_cert(load_certs(cert)?, load_key(key)?)?;
    cfg.send_tls13_tickets = 0;
    cfg.enable_secret_extraction = true;
    Ok(Arc::new(cfg))
}

/// The name to verify the server's certificate against.
pub fn server_name(host: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(host.to_owned()).map_err(|_| TlsError::ServerName(host.to_owned()))
}
