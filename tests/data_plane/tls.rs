//! HTTPS listeners: certificates chosen by SNI, ALPN h2 and http/1.1 on one
//! port, certificates re-read on reload, bad TLS material refused with its
//! location.

use std::net::SocketAddr;
use std::path::Path;

use crate::support::*;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::CertificateDer;

struct Certs {
    ca: TestCa,
    dir: tempfile::TempDir,
}

impl Certs {
    fn new() -> Certs {
        Certs {
            ca: TestCa::new("tether test CA"),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    /// Writes a certificate for `names` as NAME.crt / NAME.key; answers its DER.
    fn write(&self, file: &str, names: &[&str]) -> Vec<u8> {
        let issued = self.ca.issue(names);
        std::fs::write(
            self.dir.path().join(format!("{file}.crt")),
            &issued.cert_pem,
        )
        .unwrap();
        std::fs::write(self.dir.path().join(format!("{file}.key")), &issued.key_pem).unwrap();
        rustls::pki_types::pem::PemObject::from_pem_slice(issued.cert_pem.as_bytes())
            .map(|c: CertificateDer| c.to_vec())
            .unwrap()
    }

    fn path(&self, file: &str) -> String {
        self.dir.path().join(file).display().to_string()
    }
}

fn https_config(certs: &Certs, origin: &Origin) -> String {
    format!(
        r#"
[[listener]]
name = "tls"
listen = "127.0.0.1:0"
protocol = "https"
[listener.tls]
min_version = "1.2"
[[listener.tls.certificate]]
cert = "{default_crt}"
key = "{default_key}"
[[listener.tls.certificate]]
cert = "{a_crt}"
key = "{a_key}"
names = ["a.test"]
[[listener.tls.certificate]]
cert = "{wild_crt}"
key = "{wild_key}"
names = ["*.b.test"]
[[listener.route]]
upstream = "u"
[upstream.u]
servers = [{{ addr = "{}" }}]
"#,
        origin.addr,
        default_crt = certs.path("default.crt"),
        default_key = certs.path("default.key"),
        a_crt = certs.path("a.crt"),
        a_key = certs.path("a.key"),
        wild_crt = certs.path("wild.crt"),
        wild_key = certs.path("wild.key"),
    )
}

/// Connects with SNI `name` (offering `alpn`); answers the served
/// certificate, the negotiated protocol, and the stream.
async fn connect(
    addr: SocketAddr,
    ca: &TestCa,
    name: &str,
    alpn: &[&[u8]],
) -> (
    Vec<u8>,
    Option<Vec<u8>>,
    tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) {
    let stream = tls_connect(addr, name, &ca.pem(), alpn).await;
    let (_, session) = stream.get_ref();
    let served = session.peer_certificates().unwrap()[0].to_vec();
    let alpn = session.alpn_protocol().map(|p| p.to_vec());
    (served, alpn, stream)
}

#[tokio::test]
async fn sni_picks_the_certificate_and_alpn_serves_h2_and_http1() {
    let origin = Origin::start("o").await;
    let certs = Certs::new();
    let default = certs.write("default", &["default.test"]);
    let a = certs.write("a", &["a.test"]);
    let wild = certs.write("wild", &["*.b.test"]);
    let node = LocalNode::start(&https_config(&certs, &origin)).await;
    let addr = node.listener("tls").await;

    for (name, expected) in [
        ("a.test", &a),
        ("x.b.test", &wild),
        ("default.test", &default),
    ] {
        let (served, _, _) = connect(addr, &certs.ca, name, &[b"http/1.1"]).await;
        assert_eq!(&served, expected, "certificate served for {name}");
    }

    // ALPN h2: an HTTP/2 request over TLS, proxied, with X-Forwarded-Proto.
    let (_, alpn, stream) = connect(addr, &certs.ca, "a.test", &[b"h2", b"http/1.1"]).await;
    assert_eq!(alpn.as_deref(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let response = sender
        .send_request(
            Request::get("https://a.test/h2")
                .body(Empty::<Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.into_body().collect().await.unwrap().to_bytes(),
        "o"
    );
    let seen = origin.seen().pop().unwrap();
    assert_eq!(seen.headers["x-forwarded-proto"], "https");
    assert_eq!(seen.headers["host"], "a.test");

    // ALPN http/1.1 on the same port.
    let (_, alpn, stream) = connect(addr, &certs.ca, "x.b.test", &[b"http/1.1"]).await;
    assert_eq!(alpn.as_deref(), Some(&b"http/1.1"[..]));
    let response = get_over(stream, "x.b.test", "/h1").await;
    assert_eq!(response.status, StatusCode::OK);
}

#[tokio::test]
async fn replaced_certificate_files_are_served_after_a_reload() {
    let origin = Origin::start("o").await;
    let certs = Certs::new();
    certs.write("default", &["default.test"]);
    let old = certs.write("a", &["a.test"]);
    certs.write("wild", &["*.b.test"]);
    let node = LocalNode::start(&https_config(&certs, &origin)).await;
    let addr = node.listener("tls").await;
    assert_eq!(connect(addr, &certs.ca, "a.test", &[]).await.0, old);

    let new = certs.write("a", &["a.test"]);
    assert_ne!(old, new);
    node.reload(&https_config(&certs, &origin)).await.unwrap();
    assert_eq!(connect(addr, &certs.ca, "a.test", &[]).await.0, new);
}

#[tokio::test]
async fn missing_or_mismatched_tls_material_is_a_config_error_with_its_location() {
    let origin = Origin::start("o").await;
    let certs = Certs::new();
    certs.write("default", &["default.test"]);
    certs.write("a", &["a.test"]);
    certs.write("wild", &["*.b.test"]);
    let node = LocalNode::start(&https_config(&certs, &origin)).await;

    // a.key now belongs to another certificate.
    let other = certs.ca.issue(&["a.test"]);
    std::fs::write(Path::new(&certs.path("a.key")), other.key_pem).unwrap();
    let status = node
        .reload(&https_config(&certs, &origin))
        .await
        .unwrap_err();
    assert!(
        status.message().contains(
            "listener[0].tls.certificate[1].key: the key does not belong to the certificate"
        ),
        "{}",
        status.message()
    );

    std::fs::remove_file(certs.path("wild.crt")).unwrap();
    let status = node
        .reload(&https_config(&certs, &origin))
        .await
        .unwrap_err();
    assert!(
        status
            .message()
            .contains("listener[0].tls.certificate[2].cert: cannot read"),
        "{}",
        status.message()
    );
    assert_eq!(
        node.get_config().await.config.unwrap().generation,
        1,
        "the config in force is untouched"
    );

    // Garbage instead of a handshake costs only that connection.
    let addr = node.listener("tls").await;
    raw_exchange(
        addr,
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        std::time::Duration::from_secs(2),
    )
    .await;
    std::fs::write(
        certs.path("wild.crt"),
        certs.ca.issue(&["*.b.test"]).cert_pem,
    )
    .ok();
    let (_, _, _) = connect(addr, &certs.ca, "default.test", &[]).await;
}
