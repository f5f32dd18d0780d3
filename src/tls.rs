//! TLS for `amqps` listeners. The certificate, key and CA files are read once, when
//! the configuration is loaded, so a missing or unreadable file stops start-up (and
//! `check-config`) with the key that names it; each connection then runs its TLS
//! handshake in its own task, within the handshake timeout, so a slow or hostile
//! client never holds up the accept loop. The client certificate's common name is
//! what the EXTERNAL mechanism logs in as (RabbitMQ's `ssl_cert_login_from =
//! common_name`).

use std::path::Path;
use std::sync::Arc;

use tokio_rustls::rustls::crypto::ring;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, RootCertStore, ServerConfig};

use crate::config::{TlsConfig, Verify};

/// Builds the rustls configuration a TLS listener serves with. An error names the
/// `[tls]` key whose file or value is at fault.
pub fn server_config(tls: &TlsConfig) -> Result<Arc<ServerConfig>, (&'static str, String)> {
    let provider = Arc::new(ring::default_provider());
    let versions: &[&rustls::SupportedProtocolVersion] = match min_version(&tls.min_version) {
        Some(13) => &[&rustls::version::TLS13],
        Some(_) => &[&rustls::version::TLS12, &rustls::version::TLS13],
        None => {
            return Err((
                "min_version",
                format!(
                    "tls.min_version: '{}' is not one of \"1.2\", \"1.3\"",
                    tls.min_version
                ),
            ))
        }
    };
    if tls.listen.is_empty() {
        return Err((
            "listen",
            "tls.listen: at least one address is needed".into(),
        ));
    }
    let certs =
        read_certs(&tls.certfile).map_err(|e| ("certfile", format!("tls.certfile: {e}")))?;
    if certs.is_empty() {
        return Err((
            "certfile",
            format!(
                "tls.certfile: {}: no PEM certificate in it",
                tls.certfile.display()
            ),
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&tls.keyfile).map_err(|e| {
        (
            "keyfile",
            format!(
                "tls.keyfile: {}: no usable PEM private key: {e}",
                tls.keyfile.display()
            ),
        )
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| ("min_version", format!("tls.min_version: {e}")))?;
    let builder = match tls.verify {
        Verify::VerifyNone if tls.fail_if_no_peer_cert => {
            return Err((
                "fail_if_no_peer_cert",
                "tls.fail_if_no_peer_cert: needs verify = \"verify_peer\" (no certificate is asked for otherwise)".into(),
            ))
        }
        Verify::VerifyNone => builder.with_no_client_auth(),
        Verify::VerifyPeer => {
            let Some(ca) = &tls.cacertfile else {
                return Err((
                    "verify",
                    "tls.verify: verify_peer needs tls.cacertfile (the CAs that sign client certificates)".into(),
                ));
            };
            let mut roots = RootCertStore::empty();
            for cert in read_certs(ca).map_err(|e| ("cacertfile", format!("tls.cacertfile: {e}")))? {
                roots.add(cert).map_err(|e| {
                    (
                        "cacertfile",
                        format!("tls.cacertfile: {}: {e}", ca.display()),
                    )
                })?;
            }
            if roots.is_empty() {
                return Err((
                    "cacertfile",
                    format!("tls.cacertfile: {}: no PEM certificate in it", ca.display()),
                ));
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if tls.fail_if_no_peer_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| ("cacertfile", format!("tls.cacertfile: {e}")))?,
            )
        }
    };
    let config = builder.with_single_cert(certs, key).map_err(|e| {
        (
            "keyfile",
            format!("tls.keyfile: does not go with tls.certfile: {e}"),
        )
    })?;
    Ok(Arc::new(config))
}

/// "1.2" or "1.3", also in RabbitMQ's spelling ("tlsv1.2").
fn min_version(v: &str) -> Option<u8> {
    match v.trim_start_matches("tlsv") {
        "1.2" => Some(12),
        "1.3" => Some(13),
        _ => None,
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let key = |e: String| format!("{}: {e}", path.display());
    CertificateDer::pem_file_iter(path)
        .map_err(|e| key(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| key(e.to_string()))
}

/// The common name in the subject of a (verified) client certificate.
pub fn common_name(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}
