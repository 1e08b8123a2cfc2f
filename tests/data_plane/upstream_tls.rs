//! TLS to upstream servers: verification against a configured CA, the SNI
//! name, client certificates for servers that require them, and HTTP/2
//! chosen by ALPN.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use crate::support::*;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// An HTTPS origin for `origin.test` that answers "VERSION client-cert:BOOL".
async fn tls_origin(ca: &TestCa, require_client_cert: bool) -> SocketAddr {
    let issued = ca.issue(&["origin.test"]);
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(issued.cert_pem.as_bytes())
            .map(Result::unwrap)
            .collect();
    let key = PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = if require_client_cert {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(ca.pem().as_bytes()).unwrap())
            .unwrap();
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .unwrap();
        builder.with_client_cert_verifier(verifier)
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder.with_single_cert(chain, key).unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let acceptor = TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                let client_cert = stream.get_ref().1.peer_certificates().is_some();
                let service = hyper::service::service_fn(
                    move |request: Request<hyper::body::Incoming>| async move {
                        let text = format!("{:?} client-cert:{client_cert}", request.version());
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(text))))
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

struct Files(tempfile::TempDir);

impl Files {
    fn write(&self, name: &str, text: &str) -> String {
        let path = self.0.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    }
}

fn config(origin: SocketAddr, protocol: &str, tls: &str) -> String {
    format!(
        "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n[[listener.route]]\nupstream = \"secure\"\n[upstream.secure]\nservers = [{{ addr = \"{origin}\" }}]\nprotocol = \"{protocol}\"\n[upstream.secure.tls]\n{tls}"
    )
}

#[tokio::test]
async fn verifies_the_server_against_the_ca_and_speaks_h2_by_alpn() {
    let ca = TestCa::new("upstream CA");
    let origin = tls_origin(&ca, false).await;
    let files = Files(tempfile::tempdir().unwrap());
    let ca_path = files.write("ca.pem", &ca.pem());
    let tls = format!("ca = \"{ca_path}\"\nserver_name = \"origin.test\"\n");

    let node = LocalNode::start(&config(origin, "http1", &tls)).await;
    let answer = get(&http1_client(), node.listener("web").await, None, "/").await;
    assert_eq!(
        (answer.status, answer.text().as_str()),
        (StatusCode::OK, "HTTP/1.1 client-cert:false")
    );

    let node = LocalNode::start(&config(origin, "h2", &tls)).await;
    let answer = get(&http1_client(), node.listener("web").await, None, "/").await;
    assert_eq!(answer.text(), "HTTP/2.0 client-cert:false", "ALPN picks h2");

    // The wrong name, or another CA: the server is not trusted.
    let node = LocalNode::start(&config(
        origin,
        "http1",
        &format!("ca = \"{ca_path}\"\nserver_name = \"other.test\"\n"),
    ))
    .await;
    assert_eq!(
        get(&http1_client(), node.listener("web").await, None, "/")
            .await
            .status,
        StatusCode::BAD_GATEWAY
    );
    let other = files.write("other.pem", &TestCa::new("someone else").pem());
    let node = LocalNode::start(&config(
        origin,
        "http1",
        &format!("ca = \"{other}\"\nserver_name = \"origin.test\"\n"),
    ))
    .await;
    assert_eq!(
        get(&http1_client(), node.listener("web").await, None, "/")
            .await
            .status,
        StatusCode::BAD_GATEWAY
    );
}

#[tokio::test]
async fn presents_a_client_certificate_to_servers_that_require_one() {
    let ca = TestCa::new("upstream CA");
    let origin = tls_origin(&ca, true).await;
    let files = Files(tempfile::tempdir().unwrap());
    let ca_path = files.write("ca.pem", &ca.pem());
    let node_cert = ca.issue(&["tether-node"]);
    let (cert, key) = (
        files.write("node.crt", &node_cert.cert_pem),
        files.write("node.key", &node_cert.key_pem),
    );

    let without = LocalNode::start(&config(
        origin,
        "http1",
        &format!("ca = \"{ca_path}\"\nserver_name = \"origin.test\"\n"),
    ))
    .await;
    assert_eq!(
        get(&http1_client(), without.listener("web").await, None, "/")
            .await
            .status,
        StatusCode::BAD_GATEWAY
    );

    let with = LocalNode::start(&config(
        origin,
        "http1",
        &format!("ca = \"{ca_path}\"\nserver_name = \"origin.test\"\ncert = \"{cert}\"\nkey = \"{key}\"\n"),
    )).await;
    let answer = get(&http1_client(), with.listener("web").await, None, "/").await;
    assert_eq!(answer.text(), "HTTP/1.1 client-cert:true");
}

#[test]
fn bad_upstream_tls_settings_are_config_errors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.toml");
    std::fs::write(
        &path,
        "[[listener]]\nname = \"w\"\nlisten = \"127.0.0.1:0\"\n[[listener.route]]\nupstream = \"a\"\n[upstream.a]\nservers = [{ addr = \"127.0.0.1:1\" }]\nprotocol = \"h2\"\n[upstream.b]\nservers = [{ addr = \"127.0.0.1:1\" }]\n[upstream.b.tls]\nca = \"missing.pem\"\ncert = \"x.pem\"\n",
    )
    .unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .arg("check")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("upstream.a.protocol: protocol = \"h2\" is HTTP/2 over TLS"),
        "{stderr}"
    );
    assert!(
        stderr.contains("upstream.b.tls.ca: cannot read"),
        "{stderr}"
    );
}

#[tokio::test]
async fn http_health_checks_can_probe_over_tls() {
    let ca = TestCa::new("upstream CA");
    let origin = tls_origin(&ca, false).await;
    let files = Files(tempfile::tempdir().unwrap());
    let good_ca = files.write("ca.pem", &ca.pem());
    let wrong_ca = files.write("other.pem", &TestCa::new("someone else").pem());
    let check = "[upstream.secure.health]\ntype = \"http\"\ntls = true\ninterval = \"100ms\"\ntimeout = \"80ms\"\nfall = 1\njitter = \"0ms\"\n";
    for (ca_path, expected) in [
        (&good_ca, tether::proto::v1::HealthState::Healthy),
        (&wrong_ca, tether::proto::v1::HealthState::Unhealthy),
    ] {
        let tls = format!("ca = \"{ca_path}\"\nserver_name = \"origin.test\"\n");
        let node = LocalNode::start(&(config(origin, "http1", &tls) + check)).await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            let health = node.get_config().await.upstreams[0].servers[0].health;
            if health == expected as i32 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "expected {expected:?}, still {health}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

/// An HTTP check over TLS with the system's trust roots reads them once,
/// when its checker starts: a probe every interval must not re-read the
/// trust store (slow, and a store being rewritten would fail the probes).
#[tokio::test]
async fn tls_health_checks_read_the_system_trust_roots_once() {
    let ca = TestCa::new("system CA");
    let origin = tls_origin(&ca, false).await;
    let files = Files(tempfile::tempdir().unwrap());
    let system_roots = files.write("system-roots.pem", &ca.pem());
    let config = format!(
        "{}server_name = \"origin.test\"\n[upstream.secure.health]\ntype = \"http\"\ntls = true\ninterval = \"100ms\"\ntimeout = \"100ms\"\nfall = 1\nrise = 1\n",
        config(origin, "http1", "")
    );
    let roots_for_node = system_roots.clone();
    let node = Node::start_customized(&config, move |command| {
        command.env("SSL_CERT_FILE", &roots_for_node);
    });
    let addr = origin.to_string();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while node.server_health("secure", &addr).await != tether::proto::v1::HealthState::Healthy {
        assert!(
            std::time::Instant::now() < deadline,
            "the origin never turned healthy"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // The trust store is emptied: probes keep the roots they started with.
    std::fs::write(&system_roots, "").unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(800)).await;
    assert_eq!(
        node.server_health("secure", &addr).await,
        tether::proto::v1::HealthState::Healthy
    );
}
