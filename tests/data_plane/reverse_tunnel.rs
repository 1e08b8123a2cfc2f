//! Reverse tunnels between two real nodes (processes): `nas` dials the
//! public node's tunnel listener over mTLS and serves an HTTP origin, a
//! TCP echo server and a WebSocket server through it; the public node
//! reaches them as `tunnel:nas/…` upstreams.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::support::*;
use tether::proto::v1 as pb;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Echoes every byte until the client half-closes, then half-closes too.
async fn byte_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.into_split();
                if tokio::io::copy(&mut read, &mut write).await.is_ok() {
                    let _ = write.shutdown().await;
                }
            });
        }
    });
    addr
}

struct Services {
    origin: Origin,
    echo: SocketAddr,
    ws: SocketAddr,
}

impl Services {
    async fn start() -> Services {
        Services {
            origin: Origin::start("nas-origin").await,
            echo: byte_echo().await,
            ws: crate::websocket::echo_server().await,
        }
    }
}

/// The certificates both nodes read, written into their directories.
struct Pki {
    ca: TestCa,
}

impl Pki {
    fn new() -> Pki {
        Pki {
            ca: TestCa::new("tunnel test CA"),
        }
    }

    /// A node directory with the CA, the public node's server certificate
    /// and the client certificate of `identity`.
    fn dir(&self, identity: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let server = self.ca.issue(&["public.test"]);
        let client = self.ca.issue_identity(identity);
        write_files(
            dir.path(),
            &[
                ("ca.pem", self.ca.pem().as_bytes()),
                ("public.pem", server.cert_pem.as_bytes()),
                ("public-key.pem", server.key_pem.as_bytes()),
                ("client.pem", client.cert_pem.as_bytes()),
                ("client-key.pem", client.key_pem.as_bytes()),
            ],
        );
        dir
    }
}

/// The public node: the tunnel listener, an HTTP listener routing `/ws`
/// and the rest to nas's services, a TCP listener to nas's echo.
/// `extra` is appended (to make a reload change something).
fn public_config(tunnel: SocketAddr, web: SocketAddr, tcp: SocketAddr, extra: &str) -> String {
    format!(
        r#"[node]
id = "public"
drain_timeout = "60s"

[[listener]]
name = "tunnels"
listen = "{tunnel}"
protocol = "tunnel"
[[listener.tls.certificate]]
cert = "public.pem"
key = "public-key.pem"
[listener.tunnel]
client_ca = "ca.pem"
[[listener.tunnel.peer]]
node = "nas"
services = ["web", "echo", "ws", "extra"]

[[listener]]
name = "web"
listen = "{web}"
[[listener.route]]
path = "/ws"
upstream = "nas-ws"
[[listener.route]]
upstream = "nas-web"

[[listener]]
name = "echo"
listen = "{tcp}"
protocol = "tcp"
upstream = "nas-echo"

[upstream.nas-web]
servers = [{{ addr = "tunnel:nas/web" }}]
[upstream.nas-web.health]
type = "http"
path = "/"
interval = "200ms"
[upstream.nas-echo]
servers = [{{ addr = "tunnel:nas/echo" }}]
[upstream.nas-ws]
servers = [{{ addr = "tunnel:nas/ws" }}]
{extra}"#
    )
}

/// The node behind NAT: two connections to the public node, three
/// services (and `extra_service` when given).
fn inner_config(id: &str, tunnel: SocketAddr, services: &Services, extra_service: bool) -> String {
    let extra = if extra_service {
        format!(
            "[[tunnel.service]]\nname = \"extra\"\naddr = \"{}\"\n",
            services.echo
        )
    } else {
        String::new()
    };
    format!(
        r#"[node]
id = "{id}"
drain_timeout = "60s"

[[tunnel]]
name = "home"
connect = "{tunnel}"
server_name = "public.test"
connections = 2
max_backoff = "500ms"
[tunnel.tls]
ca = "ca.pem"
cert = "client.pem"
key = "client-key.pem"
[[tunnel.service]]
name = "web"
addr = "{}"
[[tunnel.service]]
name = "echo"
addr = "{}"
[[tunnel.service]]
name = "ws"
addr = "{}"
{extra}"#,
        services.origin.addr, services.echo, services.ws
    )
}

struct Pair {
    pki: Pki,
    services: Services,
    public: Node,
    inner: Node,
    tunnel: SocketAddr,
    web: SocketAddr,
    tcp: SocketAddr,
}

impl Pair {
    async fn start() -> Pair {
        let pki = Pki::new();
        let services = Services::start().await;
        let (tunnel, web, tcp) = (free_addr(), free_addr(), free_addr());
        let public = Node::try_start_in(
            pki.dir("spiffe://tether/node/public"),
            &public_config(tunnel, web, tcp, ""),
        )
        .unwrap();
        let inner = Node::try_start_in(
            pki.dir("spiffe://tether/node/nas"),
            &inner_config("nas", tunnel, &services, false),
        )
        .unwrap();
        let pair = Pair {
            pki,
            services,
            public,
            inner,
            tunnel,
            web,
            tcp,
        };
        pair.wait_up(Duration::from_secs(10)).await;
        pair
    }

    /// Waits until both ends report both connections up (the public node
    /// also counts replaced ones still finishing their streams); answers
    /// how long that took.
    async fn wait_up(&self, within: Duration) -> Duration {
        let started = Instant::now();
        loop {
            let public = tunnel_of(&self.public).await;
            let inner = tunnel_of(&self.inner).await;
            if public.as_ref().is_some_and(|t| t.connections_up >= 2)
                && inner.as_ref().is_some_and(|t| t.connections_up == 2)
            {
                return started.elapsed();
            }
            assert!(
                started.elapsed() < within,
                "the tunnel did not come up within {within:?}: public {public:?}, inner {inner:?}\npublic log:\n{}\ninner log:\n{}",
                self.public.log(),
                self.inner.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The node's one tunnel, as GetConfig reports it.
async fn tunnel_of(node: &Node) -> Option<pb::TunnelStatus> {
    node.get_config().await.tunnels.into_iter().next()
}

/// Sends `payload` on a new connection to `addr`, half-closes, and reads
/// until the other side closes.
async fn echo_through(addr: SocketAddr, payload: Vec<u8>) -> Vec<u8> {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        write.write_all(&payload).await.unwrap();
        write.shutdown().await.unwrap();
    });
    let mut echoed = Vec::new();
    read.read_to_end(&mut echoed).await.unwrap();
    writer.await.unwrap();
    echoed
}

/// A payload that differs from every other of the same length.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Reads an HTTP/1.1 response head and then `Content-Length` bytes of
/// body, counting them; answers (status, body length).
async fn read_response(stream: &mut TcpStream, pace: Option<Duration>) -> (u16, u64) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).unwrap();
    let status: u16 = head[9..12].parse().unwrap();
    let length: u64 = head
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut buffer = vec![0u8; 64 * 1024];
    let mut read = 0u64;
    while read < length {
        let n = stream.read(&mut buffer).await.unwrap();
        assert!(n > 0, "the body ended after {read} of {length} bytes");
        read += n as u64;
        if let Some(pace) = pace {
            tokio::time::sleep(pace).await;
        }
    }
    (status, read)
}

#[tokio::test]
async fn http_goes_through_the_tunnel_with_the_real_client_and_big_bodies_both_ways() {
    let pair = Pair::start().await;
    let client = http1_client();
    let answer = get(&client, pair.web, Some("app.example"), "/hello").await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("x-origin"), Some("nas-origin"));
    let seen = pair.services.origin.seen();
    let request = seen
        .iter()
        .find(|s| s.uri.path() == "/hello")
        .expect("the origin saw the request");
    assert_eq!(request.headers["host"], "app.example");
    assert_eq!(
        request.headers["x-forwarded-for"], "127.0.0.1",
        "X-Forwarded-For carries the client of the public node"
    );

    // Active health checks reach the origin through the tunnel too.
    let deadline = Instant::now() + Duration::from_secs(5);
    while pair.services.origin.probes() == 0 {
        assert!(
            Instant::now() < deadline,
            "no health probe came through the tunnel"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        pair.public.server_health("nas-web", "tunnel:nas/web").await,
        pb::HealthState::Healthy
    );

    // 100 MB down, then 100 MB up, each streamed.
    const BODY: u64 = 100 * 1024 * 1024;
    let mut stream = TcpStream::connect(pair.web).await.unwrap();
    stream
        .write_all(format!("GET /bytes/{BODY} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    assert_eq!(read_response(&mut stream, None).await, (200, BODY));
    stream
        .write_all(
            format!("POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {BODY}\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let chunk = vec![b'u'; 1024 * 1024];
    for _ in 0..BODY / chunk.len() as u64 {
        stream.write_all(&chunk).await.unwrap();
    }
    let mut answer = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(30), stream.read(&mut answer))
        .await
        .expect("the upload is answered")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with(&BODY.to_string()), "{answer}");

    // Bounded memory: neither node held a body (100 MB) in memory.
    for (name, node) in [("public", &pair.public), ("inner", &pair.inner)] {
        let peak = node.peak_rss_kib() / 1024;
        println!("{name} node peak RSS: {peak} MiB");
        assert!(peak < 80, "the {name} node peaked at {peak} MiB");
    }
}

#[tokio::test]
async fn tcp_through_the_tunnel_echoes_a_gibibyte_exactly_and_passes_half_close() {
    let pair = Pair::start().await;
    // Half-close: the echo server answers and closes only after the
    // client's FIN came through the tunnel.
    assert_eq!(echo_through(pair.tcp, b"ping".to_vec()).await, b"ping");

    const TOTAL: usize = 1024 * 1024 * 1024;
    const CHUNK: usize = 1024 * 1024;
    let stream = TcpStream::connect(pair.tcp).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        for i in 0..TOTAL / CHUNK {
            write.write_all(&pattern(i as u64, CHUNK)).await.unwrap();
        }
        write.shutdown().await.unwrap();
    });
    let started = Instant::now();
    let mut buffer = vec![0u8; CHUNK];
    for i in 0..TOTAL / CHUNK {
        read.read_exact(&mut buffer).await.unwrap();
        assert!(
            buffer == pattern(i as u64, CHUNK),
            "chunk {i} came back different"
        );
    }
    assert_eq!(
        read.read(&mut buffer).await.unwrap(),
        0,
        "closed after the echo"
    );
    writer.await.unwrap();
    println!("1 GiB echoed through the tunnel in {:?}", started.elapsed());
}

#[tokio::test]
async fn a_websocket_goes_through_the_tunnel() {
    let pair = Pair::start().await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", pair.web))
        .await
        .expect("WebSocket handshake through the tunnel");
    for i in 0..10 {
        let text = format!("message {i}");
        assert_eq!(
            crate::websocket::roundtrip(&mut ws, &text).await,
            format!("echo: {text}")
        );
    }
    ws.close(None).await.unwrap();
}

#[tokio::test]
async fn a_stalled_stream_does_not_slow_another_on_the_same_tunnel() {
    let pair = Pair::start().await;
    const MOVED: usize = 64 * 1024 * 1024;
    let timed = |seed| async move {
        let started = Instant::now();
        let echoed = echo_through(pair.tcp, pattern(seed, MOVED)).await;
        assert!(
            echoed == pattern(seed, MOVED),
            "stream {seed} came back different"
        );
        started.elapsed()
    };
    let alone = timed(1).await;

    // A stream whose reader stops: it writes 32 MiB that nobody reads, so
    // its windows fill on both nodes and it stops moving.
    let stalled = TcpStream::connect(pair.tcp).await.unwrap();
    let (mut stalled_read, mut stalled_write) = stalled.into_split();
    const STALLED: usize = 32 * 1024 * 1024;
    let stalled_writer = tokio::spawn(async move {
        stalled_write.write_all(&pattern(7, STALLED)).await.unwrap();
        stalled_write.shutdown().await.unwrap();
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !stalled_writer.is_finished(),
        "the stalled stream still has bytes to send"
    );

    let beside = tokio::time::timeout(Duration::from_secs(60), timed(2))
        .await
        .expect("a stream beside a stalled one is never blocked");
    println!(
        "64 MiB echoed: {alone:?} alone, {beside:?} beside a stalled stream ({:.2}x)",
        beside.as_secs_f64() / alone.as_secs_f64()
    );

    // The stalled stream lost nothing: reading it now gets every byte.
    let mut echoed = Vec::new();
    stalled_read.read_to_end(&mut echoed).await.unwrap();
    stalled_writer.await.unwrap();
    assert!(
        echoed == pattern(7, STALLED),
        "the stalled stream came back different"
    );
}

/// Requests that must each come back with their own answer: concurrent
/// downloads of different sizes and echoes of different payloads.
async fn nothing_mixed(pair: &Pair) {
    let mut tasks = Vec::new();
    for i in 0..16u64 {
        let web = pair.web;
        let tcp = pair.tcp;
        tasks.push(tokio::spawn(async move {
            let mut stream = TcpStream::connect(web).await.unwrap();
            let size = 100_000 + i * 7_919;
            stream
                .write_all(format!("GET /bytes/{size} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
                .await
                .unwrap();
            assert_eq!(read_response(&mut stream, None).await, (200, size));
            let payload = pattern(i, 200_000 + i as usize);
            assert!(echo_through(tcp, payload.clone()).await == payload);
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
}

/// While the tunnel is down the public node answers at once, 502 or 503.
async fn answered_without_the_tunnel(web: SocketAddr) {
    let client = http1_client();
    let started = Instant::now();
    let answer = tokio::time::timeout(
        Duration::from_secs(3),
        get_with(&client, web, None, "/", &[]),
    )
    .await
    .expect("answered, not hung")
    .unwrap();
    assert!(
        matches!(answer.status.as_u16(), 502 | 503),
        "answered {} without the tunnel",
        answer.status
    );
    println!(
        "answered {} in {:?} without the tunnel",
        answer.status,
        started.elapsed()
    );
}

#[tokio::test]
async fn the_tunnel_comes_back_after_either_node_restarts() {
    let mut pair = Pair::start().await;
    nothing_mixed(&pair).await;

    // The inner node dies: the public node answers 502/503 at once.
    pair.inner.signal(libc::SIGKILL);
    let _ = pair.inner.wait_exit(Duration::from_secs(5));
    let deadline = Instant::now() + Duration::from_secs(5);
    while tunnel_of(&pair.public).await.is_some() {
        assert!(
            Instant::now() < deadline,
            "the public node still lists the dead tunnel"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        pair.public.server_health("nas-web", "tunnel:nas/web").await,
        pb::HealthState::Unhealthy,
        "a server whose tunnel is down is down"
    );
    answered_without_the_tunnel(pair.web).await;
    pair.inner.restart();
    let back = pair.wait_up(Duration::from_secs(10)).await;
    println!("tunnel back {back:?} after the inner node restarted");
    nothing_mixed(&pair).await;

    // The public node dies: the inner node dials again with its backoff
    // (at most 500 ms here) until the public node is back.
    pair.public.restart();
    let back = pair.wait_up(Duration::from_secs(5)).await;
    println!("tunnel back {back:?} after the public node restarted");
    nothing_mixed(&pair).await;
}

#[tokio::test]
async fn a_download_and_a_websocket_survive_twenty_reloads_of_each_side() {
    let pair = Pair::start().await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/ws", pair.web))
        .await
        .unwrap();
    // About 40 MB read at a pace that keeps the download open across the
    // reloads.
    const BODY: u64 = 40 * 1024 * 1024;
    let web = pair.web;
    let download = tokio::spawn(async move {
        let mut stream = TcpStream::connect(web).await.unwrap();
        stream
            .write_all(format!("GET /bytes/{BODY} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        read_response(&mut stream, Some(Duration::from_millis(10))).await
    });
    for round in 0..20 {
        // The public node: a listener comes and goes.
        let extra = if round % 2 == 0 {
            format!(
                "[[listener]]\nname = \"extra\"\nlisten = \"{}\"\nprotocol = \"tcp\"\nupstream = \"nas-echo\"\n",
                free_addr()
            )
        } else {
            String::new()
        };
        pair.public
            .reload(&public_config(pair.tunnel, pair.web, pair.tcp, &extra))
            .await
            .unwrap_or_else(|e| panic!("public reload {round}: {e}"));
        // The inner node: its tunnel gains and loses a service, so its
        // connections are replaced and the old ones drain.
        pair.inner
            .reload(&inner_config(
                "nas",
                pair.tunnel,
                &pair.services,
                round % 2 == 0,
            ))
            .await
            .unwrap_or_else(|e| panic!("inner reload {round}: {e}"));
        assert_eq!(
            crate::websocket::roundtrip(&mut ws, &format!("after reload {round}")).await,
            format!("echo: after reload {round}")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !download.is_finished(),
        "the download was still running during the reloads"
    );
    let (status, read) = tokio::time::timeout(Duration::from_secs(120), download)
        .await
        .expect("the download finishes")
        .unwrap();
    assert_eq!((status, read), (200, BODY));
    assert_eq!(
        crate::websocket::roundtrip(&mut ws, "at the end").await,
        "echo: at the end"
    );
    pair.wait_up(Duration::from_secs(10)).await;
    nothing_mixed(&pair).await;
}

#[tokio::test]
async fn unknown_nodes_and_certificates_for_another_node_are_refused() {
    let pair = Pair::start().await;
    // A certificate for "other", claiming to be "nas".
    let impostor = Node::try_start_in(
        pair.pki.dir("spiffe://tether/node/other"),
        &inner_config("nas", pair.tunnel, &pair.services, false),
    )
    .unwrap();
    // A node the public node does not expect at all.
    let stranger = Node::try_start_in(
        pair.pki.dir("spiffe://tether/node/other"),
        &inner_config("other", pair.tunnel, &pair.services, false),
    )
    .unwrap();
    for (node, reason) in [
        (
            &impostor,
            "(spiffe://tether/node/other) is not node \"nas\"'s",
        ),
        (
            &stranger,
            "node \"other\" is not a [[listener.tunnel.peer]]",
        ),
    ] {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let status = tunnel_of(node).await.expect("the tunnel is listed");
            assert_eq!(status.connections_up, 0, "{status:?}");
            if status.last_error.contains(reason) {
                assert!(status.last_error.starts_with("refused by"), "{status:?}");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "not refused as expected: {status:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            pair.public.log().contains(reason),
            "the public node logs why"
        );
    }
    // The real nas still has its two connections, and only those.
    let public = tunnel_of(&pair.public).await.unwrap();
    assert_eq!((public.peer.as_str(), public.connections_up), ("nas", 2));
    let answer = get(&http1_client(), pair.web, None, "/").await;
    assert_eq!(answer.header("x-origin"), Some("nas-origin"));
}
