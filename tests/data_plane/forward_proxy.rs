//! Forward proxy (CONNECT and absolute-form) and SOCKS5, with credentials
//! and destination rules, driven by real clients.

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Echoes what it reads, prefixed once with "echo:".
async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                stream.write_all(b"echo:").await.ok();
                let mut buf = [0u8; 1024];
                while let Ok(n) = stream.read(&mut buf).await {
                    if n == 0 || stream.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

fn config(protocol: &str, proxy: &str) -> String {
    format!("[[listener]]\nname = \"p\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"{protocol}\"\n[listener.proxy]\n{proxy}")
}

/// A SOCKS5 connect the proxy refused with "not allowed by ruleset" (2).
fn assert_not_allowed<S: std::fmt::Debug>(result: Result<S, tokio_socks::Error>) {
    assert!(
        matches!(
            result,
            Err(tokio_socks::Error::ConnectionNotAllowedByRuleset)
        ),
        "{result:?}"
    );
}

const ALICE: &str = "users = [{ name = \"alice\", password = \"s3cret\" }]\n";
// "alice:s3cret"
const ALICE_BASIC: &str = "Basic YWxpY2U6czNjcmV0";

/// Sends a CONNECT and answers the status line and the stream.
async fn connect_via(proxy: SocketAddr, target: &str, auth: Option<&str>) -> (String, TcpStream) {
    let mut stream = TcpStream::connect(proxy).await.unwrap();
    let auth = auth
        .map(|a| format!("Proxy-Authorization: {a}\r\n"))
        .unwrap_or_default();
    stream
        .write_all(format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n").as_bytes())
        .await
        .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.unwrap() == 0 {
            break;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    (head.lines().next().unwrap_or("").to_owned(), stream)
}

#[tokio::test]
async fn connect_tunnels_with_credentials_and_refuses_without() {
    let echo = echo_server().await;
    let node = LocalNode::start(&config(
        "forward",
        &format!("{ALICE}allow = [\"127.0.0.1\"]\n"),
    ))
    .await;
    let proxy = node.listener("p").await;

    let (status, _) = connect_via(proxy, &echo.to_string(), None).await;
    assert!(status.starts_with("HTTP/1.1 407"), "{status}");
    let (status, _) = connect_via(proxy, &echo.to_string(), Some("Basic YWxpY2U6d3Jvbmc=")).await;
    assert!(status.starts_with("HTTP/1.1 407"), "{status}");

    let (status, mut tunnel) = connect_via(proxy, &echo.to_string(), Some(ALICE_BASIC)).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    tunnel.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 9];
    tunnel.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"echo:ping");

    // Loopback but not 127.0.0.1: not allowed.
    let other = format!("127.0.0.2:{}", echo.port());
    let (status, _) = connect_via(proxy, &other, Some(ALICE_BASIC)).await;
    assert!(status.starts_with("HTTP/1.1 403"), "{status}");
}

#[tokio::test]
async fn by_default_private_and_loopback_destinations_are_refused() {
    let echo = echo_server().await;
    let node = LocalNode::start(&config("forward", "")).await;
    let proxy = node.listener("p").await;
    for target in [echo.to_string(), format!("localhost:{}", echo.port())] {
        let (status, _) = connect_via(proxy, &target, None).await;
        assert!(status.starts_with("HTTP/1.1 403"), "{target}: {status}");
    }
    // Deny rules win over allow rules.
    let node = LocalNode::start(&config(
        "forward",
        "allow = [\"127.0.0.0/8\"]\ndeny = [\"localhost\"]\n",
    ))
    .await;
    let proxy = node.listener("p").await;
    let (status, _) = connect_via(proxy, &format!("localhost:{}", echo.port()), None).await;
    assert!(status.starts_with("HTTP/1.1 403"), "{status}");
    let (status, _) = connect_via(proxy, &echo.to_string(), None).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
}

#[tokio::test]
async fn absolute_form_requests_are_forwarded_without_proxy_credentials() {
    let origin = Origin::start("o").await;
    let node = LocalNode::start(&config(
        "forward",
        &format!("{ALICE}allow = [\"127.0.0.1\"]\n"),
    ))
    .await;
    let proxy = node.listener("p").await;
    let request = format!(
        "GET http://{}/path?q=1 HTTP/1.1\r\nHost: {}\r\nProxy-Authorization: {ALICE_BASIC}\r\nConnection: close\r\n\r\n",
        origin.addr, origin.addr
    );
    let answer = raw_exchange(proxy, request.as_bytes(), Duration::from_secs(5)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with('o'),
        "{answer}"
    );
    let seen = origin.seen().pop().unwrap();
    assert_eq!(seen.uri, "/path?q=1");
    assert!(seen.headers.get("proxy-authorization").is_none());
    assert_eq!(seen.headers["host"], origin.addr.to_string().as_str());
    // Origin-form is not a proxy request.
    let answer = raw_exchange(
        proxy,
        b"GET / HTTP/1.1\r\nHost: x\r\nProxy-Authorization: Basic YWxpY2U6czNjcmV0\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(answer.starts_with(b"HTTP/1.1 400"));
}

#[tokio::test]
async fn socks5_connects_ipv4_and_domain_destinations_with_credentials() {
    use tokio_socks::tcp::Socks5Stream;
    let echo = echo_server().await;
    let node = LocalNode::start(&config(
        "socks5",
        &format!("{ALICE}allow = [\"127.0.0.1\", \"localhost\"]\n"),
    ))
    .await;
    let proxy = node.listener("p").await;

    let mut stream = Socks5Stream::connect_with_password(proxy, echo, "alice", "s3cret")
        .await
        .unwrap();
    stream.write_all(b"v4").await.unwrap();
    let mut buf = [0u8; 7];
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"echo:v4");

    let mut stream =
        Socks5Stream::connect_with_password(proxy, ("localhost", echo.port()), "alice", "s3cret")
            .await
            .unwrap();
    stream.write_all(b"dn").await.unwrap();
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"echo:dn");

    assert!(
        Socks5Stream::connect_with_password(proxy, echo, "alice", "wrong")
            .await
            .is_err(),
        "bad password"
    );
    assert!(
        Socks5Stream::connect(proxy, echo).await.is_err(),
        "no credentials offered"
    );
    let denied =
        Socks5Stream::connect_with_password(proxy, ("127.0.0.3", echo.port()), "alice", "s3cret")
            .await;
    assert_not_allowed(denied);
}

#[tokio::test]
async fn malformed_socks5_handshakes_get_closed_and_good_ones_still_work() {
    let echo = echo_server().await;
    let node = LocalNode::start(&config("socks5", "allow = [\"127.0.0.1\"]\n")).await;
    let proxy = node.listener("p").await;
    for garbage in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        &[5, 1, 0, 5, 9, 0, 1],
        &[5, 1, 0, 5, 1, 0, 7, 1, 2],
        &[5, 0],
        b"\x05",
    ] {
        let answer = raw_exchange(proxy, garbage, Duration::from_secs(2)).await;
        assert!(answer.len() <= 12, "{answer:?}");
    }
    // Unsupported command (BIND) gets reply 7.
    let answer = raw_exchange(
        proxy,
        &[5, 1, 0, 5, 2, 0, 1, 127, 0, 0, 1, 0, 80],
        Duration::from_secs(2),
    )
    .await;
    assert_eq!(&answer[..4], &[5, 0, 5, 7]);
    let mut stream = tokio_socks::tcp::Socks5Stream::connect(proxy, echo)
        .await
        .unwrap();
    stream.write_all(b"ok").await.unwrap();
    let mut buf = [0u8; 7];
    stream.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"echo:ok");
}

#[tokio::test]
async fn garbage_to_the_forward_proxy_costs_only_its_connection() {
    let echo = echo_server().await;
    let node = LocalNode::start(&config("forward", "allow = [\"127.0.0.1\"]\n")).await;
    let proxy = node.listener("p").await;
    for garbage in [
        &b"\x16\x03\x01\x00\xff\x00\x00"[..],
        b"CONNECT\r\n\r\n",
        b"CONNECT nohost HTTP/1.1\r\n\r\n",
        b"GET ftp://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
    ] {
        let answer = raw_exchange(proxy, garbage, Duration::from_secs(2)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(
            answer.is_empty() || answer.starts_with("HTTP/1.1 4"),
            "{answer}"
        );
    }
    let (status, _) = connect_via(proxy, &echo.to_string(), None).await;
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
}

#[tokio::test]
async fn ipv6_spellings_of_loopback_and_metadata_addresses_are_refused() {
    let echo = echo_server().await;
    let node = LocalNode::start(&config("forward", "")).await;
    let proxy = node.listener("p").await;
    let port = echo.port();
    for target in [
        format!("[64:ff9b::7f00:1]:{port}"),  // NAT64 of 127.0.0.1
        "[64:ff9b::a9fe:a9fe]:80".to_owned(), // NAT64 of 169.254.169.254
        format!("[::127.0.0.1]:{port}"),      // IPv4-compatible
        "[2002:a9fe:a9fe::1]:80".to_owned(),  // 6to4 of 169.254.169.254
        "[2001:0:4136:e378:8000:63bf:f5ff:fffe]:80".to_owned(), // Teredo, client 10.0.0.1
        "[fec0::1]:80".to_owned(),            // site-local
    ] {
        let (status, _) = connect_via(proxy, &target, None).await;
        assert!(status.starts_with("HTTP/1.1 403"), "{target}: {status}");
    }
    // A deny rule by IPv4 network sees through the same spellings.
    let node = LocalNode::start(&config(
        "forward",
        "allow = [\"::/0\", \"0.0.0.0/0\"]\ndeny = [\"127.0.0.0/8\"]\n",
    ))
    .await;
    let proxy = node.listener("p").await;
    let (status, _) = connect_via(proxy, &format!("[::ffff:127.0.0.1]:{port}"), None).await;
    assert!(status.starts_with("HTTP/1.1 403"), "{status}");
}

#[tokio::test]
async fn a_deny_rule_by_name_holds_for_every_spelling_of_the_name() {
    let echo = echo_server().await;
    let node = LocalNode::start(&config(
        "forward",
        "allow = [\"127.0.0.0/8\"]\ndeny = [\"localhost\"]\n",
    ))
    .await;
    let proxy = node.listener("p").await;
    for name in ["localhost.", "LocalHost", "LOCALHOST."] {
        let (status, _) = connect_via(proxy, &format!("{name}:{}", echo.port()), None).await;
        assert!(status.starts_with("HTTP/1.1 403"), "{name}: {status}");
    }
    let node = LocalNode::start(&config(
        "socks5",
        "allow = [\"127.0.0.0/8\"]\ndeny = [\"localhost\"]\n",
    ))
    .await;
    let proxy = node.listener("p").await;
    let denied = tokio_socks::tcp::Socks5Stream::connect(proxy, ("localhost.", echo.port())).await;
    assert_not_allowed(denied);
}

#[tokio::test]
async fn an_ipv4_mapped_network_rule_with_a_short_prefix_matches() {
    let echo = echo_server().await;
    let node = LocalNode::start(&config(
        "forward",
        "allow = [\"127.0.0.0/8\"]\ndeny = [\"::ffff:0.0.0.0/96\"]\n",
    ))
    .await;
    let proxy = node.listener("p").await;
    let (status, _) = connect_via(proxy, &echo.to_string(), None).await;
    assert!(status.starts_with("HTTP/1.1 403"), "{status}");
}
