//! `amqps` listeners: a client that trusts the broker's CA talks AMQP over TLS;
//! with client certificates required, EXTERNAL logs the certificate's common name
//! in, a client without a certificate is refused during the TLS handshake, and a
//! bad certificate file stops start-up at its key.

mod common;
mod support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A CA, a server certificate for localhost signed by it, and a client
/// certificate whose common name is `alice`, as PEM files in `dir`.
struct Pki {
    ca: String,
    client_cert: String,
    client_key: String,
}

fn make_pki(dir: &Path) -> Pki {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "WarrenMQ test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();

    let leaf = |names: Vec<String>, cn: &str, usage: ExtendedKeyUsagePurpose| {
        let mut params = CertificateParams::new(names).unwrap();
        params.distinguished_name.push(DnType::CommonName, cn);
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &ca).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(
        vec!["localhost".into()],
        "localhost",
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client_cert, client_key) = leaf(vec![], "alice", ExtendedKeyUsagePurpose::ClientAuth);
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    std::fs::write(dir.join("server.pem"), server_cert).unwrap();
    std::fs::write(dir.join("server.key"), server_key).unwrap();
    Pki {
        ca: ca.pem(),
        client_cert,
        client_key,
    }
}

fn config_text(dir: &Path, tls: &str) -> String {
    format!(
        r#"listen = ["127.0.0.1:0"]
data_dir = {data:?}

[[vhosts]]
name = "/"

[[users]]
name = "guest"
password = "guest"

# Logs in with its certificate only (EXTERNAL).
[[users]]
name = "alice"
password_hash = ""

[tls]
listen = ["127.0.0.1:0"]
certfile = "server.pem"
keyfile = "server.key"
{tls}
"#,
        data = dir.join("data").display().to_string(),
    )
}

/// Starts a broker on `config_text` (file names relative to `dir`, as a real
/// configuration file would have them); returns it and its TLS address.
async fn start(dir: &Path, tls: &str) -> (warrenmq::BrokerHandle, SocketAddr) {
    let file = dir.join("warrenmq.toml");
    std::fs::write(&file, config_text(dir, tls)).unwrap();
    let config = warrenmq::Config::load(&file).expect("configuration loads");
    let handle = warrenmq::start(config).await.expect("broker starts");
    let tls_addr = handle.local_addrs()[1];
    (handle, tls_addr)
}

async fn connect_tls(uri: &str, tls: OwnedTLSConfig) -> lapin::Result<lapin::Connection> {
    lapin::Connection::connect_with_config(
        uri,
        Default::default(),
        tls,
        lapin::runtime::default_runtime()?,
    )
    .await
}

fn dir() -> PathBuf {
    common::temp_data_dir()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_trusting_the_ca_publishes_and_consumes_over_tls() {
    let dir = dir();
    let pki = make_pki(&dir);
    let (broker, addr) = start(&dir, "").await;

    let conn = connect_tls(
        &format!("amqps://guest:guest@localhost:{}/%2f", addr.port()),
        OwnedTLSConfig {
            identity: None,
            cert_chain: Some(pki.ca.clone()),
        },
    )
    .await
    .expect("TLS connection with guest/guest");
    let ch = support::channel(&conn).await;
    let q = support::temp_queue(&ch, "tls").await;
    // Bigger than a TLS record (16 KiB): the body crosses several of them.
    let body = vec![7u8; 100_000];
    support::publish(&ch, "", &q, &body).await;
    assert_eq!(support::get_body(&ch, &q).await, Some(body));
    conn.close(200, "bye".into()).await.unwrap();

    // The plain listener is still plain.
    let plain = support::connect_url(&format!(
        "amqp://guest:guest@{}/%2f",
        broker.local_addrs()[0]
    ))
    .await;
    plain.close(200, "bye".into()).await.unwrap();
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_logs_in_as_the_certificate_common_name() {
    let dir = dir();
    let pki = make_pki(&dir);
    let (broker, addr) = start(
        &dir,
        "cacertfile = \"ca.pem\"\nverify = \"verify_peer\"\nfail_if_no_peer_cert = true\n",
    )
    .await;
    let with_cert = || OwnedTLSConfig {
        identity: Some(OwnedIdentity::PKCS8 {
            pem: pki.client_cert.clone().into_bytes(),
            key: pki.client_key.clone().into_bytes(),
        }),
        cert_chain: Some(pki.ca.clone()),
    };

    let conn = connect_tls(
        &format!(
            "amqps://localhost:{}/%2f?auth_mechanism=external",
            addr.port()
        ),
        with_cert(),
    )
    .await
    .expect("EXTERNAL login with alice's certificate");
    let ch = support::channel(&conn).await;
    let q = support::temp_queue(&ch, "external").await;
    support::publish(&ch, "", &q, b"as alice").await;
    assert_eq!(
        support::get_body(&ch, &q).await.as_deref(),
        Some(&b"as alice"[..])
    );
    conn.close(200, "bye".into()).await.unwrap();

    // The certificate does not make a password user out of the one it names: a
    // PLAIN login is checked against the password, as always.
    let plain = connect_tls(
        &format!("amqps://alice:guess@localhost:{}/%2f", addr.port()),
        with_cert(),
    )
    .await;
    assert!(plain.is_err(), "alice has no password to log in with");

    // No client certificate: refused before AMQP starts.
    let anonymous = connect_tls(
        &format!("amqps://guest:guest@localhost:{}/%2f", addr.port()),
        OwnedTLSConfig {
            identity: None,
            cert_chain: Some(pki.ca.clone()),
        },
    )
    .await;
    assert!(anonymous.is_err(), "a client without a certificate got in");
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_is_not_offered_without_a_client_certificate() {
    let dir = dir();
    let pki = make_pki(&dir);
    let (broker, addr) = start(&dir, "").await;
    let refused = connect_tls(
        &format!(
            "amqps://localhost:{}/%2f?auth_mechanism=external",
            addr.port()
        ),
        OwnedTLSConfig {
            identity: None,
            cert_chain: Some(pki.ca.clone()),
        },
    )
    .await;
    assert!(refused.is_err(), "EXTERNAL without a certificate got in");
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_certificate_file_stops_start_up_at_its_key() {
    let dir = dir();
    make_pki(&dir);
    let file = dir.join("warrenmq.toml");
    std::fs::write(
        &file,
        config_text(&dir, "").replace("server.pem", "missing.pem"),
    )
    .unwrap();
    let err = warrenmq::Config::load(&file).unwrap_err().to_string();
    let line = config_text(&dir, "")
        .lines()
        .position(|l| l.starts_with("certfile"))
        .unwrap()
        + 1;
    assert!(
        err.starts_with(&format!("{}:{line}:1: tls.certfile: ", file.display())),
        "{err}"
    );
    assert!(err.contains("missing.pem"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_amqp_client_on_the_tls_port_gets_nothing_it_can_use() {
    let dir = dir();
    make_pki(&dir);
    let (broker, addr) = start(&dir, "").await;
    let attempt = tokio::time::timeout(
        std::time::Duration::from_secs(15),
        lapin::Connection::connect(
            &format!("amqp://guest:guest@{addr}/%2f"),
            Default::default(),
        ),
    )
    .await
    .expect("the broker answers (or closes) rather than hanging");
    assert!(attempt.is_err());
    // The broker is still serving TLS clients.
    let pki_ca = std::fs::read_to_string(dir.join("ca.pem")).unwrap();
    let conn = connect_tls(
        &format!("amqps://guest:guest@localhost:{}/%2f", addr.port()),
        OwnedTLSConfig {
            identity: None,
            cert_chain: Some(pki_ca),
        },
    )
    .await
    .expect("TLS still works");
    conn.close(200, "bye".into()).await.unwrap();
    broker.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_serves_new_certificates_to_new_connections() {
    let dir = dir();
    let first = make_pki(&dir);
    let (broker, addr) = start(&dir, "").await;
    let uri = format!("amqps://guest:guest@localhost:{}/%2f", addr.port());
    let trusting = |ca: &str| OwnedTLSConfig {
        identity: None,
        cert_chain: Some(ca.to_string()),
    };
    let old = connect_tls(&uri, trusting(&first.ca))
        .await
        .expect("first CA");

    // Certificates renewed under a new CA, then the configuration re-read.
    let second = make_pki(&dir);
    broker.reload(warrenmq::Config::load(&dir.join("warrenmq.toml")).unwrap());
    let new = connect_tls(&uri, trusting(&second.ca))
        .await
        .expect("the renewed certificate is served after the reload");
    assert!(
        connect_tls(&uri, trusting(&first.ca)).await.is_err(),
        "the old certificate is still served"
    );
    // The connection made before the renewal goes on.
    let ch = support::channel(&old).await;
    let q = support::temp_queue(&ch, "renewed").await;
    support::publish(&ch, "", &q, b"still here").await;
    assert_eq!(
        support::get_body(&ch, &q).await.as_deref(),
        Some(&b"still here"[..])
    );
    let q2 = support::temp_queue(&support::channel(&new).await, "renewed").await;
    assert!(!q2.is_empty());
    broker.shutdown().await;
}

/// The management API over HTTPS (management.tls_listen) with the `[tls]`
/// certificate: a client trusting the CA gets the same answers as over HTTP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_management_api_answers_over_https() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls::pki_types::{pem::PemObject, CertificateDer, ServerName};
    use tokio_rustls::rustls::{ClientConfig, RootCertStore};

    let dir = dir();
    let pki = make_pki(&dir);
    let file = dir.join("warrenmq.toml");
    let text = config_text(&dir, "")
        .replace(
            "[tls]",
            "[management]\nlisten = []\ntls_listen = [\"127.0.0.1:0\"]\n\n[tls]",
        )
        .replace(
            "password = \"guest\"",
            "password = \"guest\"\ntags = [\"administrator\"]\nvhosts = [\"/\"]",
        );
    std::fs::write(&file, text).unwrap();
    let config = warrenmq::Config::load(&file).expect("configuration loads");
    let broker = warrenmq::start(config).await.expect("broker starts");
    let api = broker.management_addrs()[0];

    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pki.ca.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let client = ClientConfig::builder_with_provider(Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(api).await.unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(client))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .expect("TLS handshake with the API");
    tls.write_all(
        b"GET /api/overview HTTP/1.1\r\nHost: localhost\r\n\
          Authorization: Basic Z3Vlc3Q6Z3Vlc3Q=\r\nConnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let mut raw = Vec::new();
    let _ = tls.read_to_end(&mut raw).await;
    let raw = String::from_utf8_lossy(&raw);
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert!(raw.contains("\"rabbitmq_version\""), "{raw}");
    let body: serde_json::Value =
        serde_json::from_str(raw.split_once("\r\n\r\n").map_or("", |(_, b)| b)).unwrap();
    assert!(
        body["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["protocol"] == "https" && l["port"] == api.port()),
        "the HTTPS listener is listed: {body}"
    );

    // Plain HTTP on the HTTPS port gets no answer it can use.
    let mut plain = tokio::net::TcpStream::connect(api).await.unwrap();
    plain
        .write_all(b"GET /api/overview HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let _ = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        plain.read_to_end(&mut got),
    )
    .await;
    assert!(!String::from_utf8_lossy(&got).contains("rabbitmq_version"));
    broker.shutdown().await;
}

#[test]
fn https_without_a_certificate_is_refused_at_its_key() {
    let text = "listen = [\"127.0.0.1:0\"]\ndata_dir = \"d\"\n[management]\ntls_listen = [\"127.0.0.1:0\"]\n";
    let err = warrenmq::Config::parse(text, "https.toml")
        .expect_err("no [tls] table")
        .to_string();
    assert!(err.starts_with("https.toml:4:"), "{err}");
    assert!(err.contains("management.tls_listen"), "{err}");
}
