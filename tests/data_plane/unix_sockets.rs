//! Listeners on Unix sockets: HTTP and TCP, stale socket files, a live one
//! held by someone else, and the socket kept across reloads.

use std::path::Path;
use std::time::Duration;

use crate::support::*;
use http::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

async fn get_over_unix(socket: &Path, path: &str) -> (StatusCode, String) {
    let answer = get_over(
        UnixStream::connect(socket).await.unwrap(),
        "unix.test",
        path,
    )
    .await;
    (answer.status, answer.text())
}

fn config(web: &Path, tcp: &Path, origin: &Origin) -> String {
    format!(
        "[[listener]]\nname = \"web\"\nlisten = \"unix:{}\"\n[[listener.route]]\nupstream = \"u\"\n[[listener]]\nname = \"raw\"\nlisten = \"unix:{}\"\nprotocol = \"tcp\"\nupstream = \"u\"\n[upstream.u]\nservers = [{{ addr = \"{}\" }}]\n",
        web.display(),
        tcp.display(),
        origin.addr
    )
}

#[tokio::test]
async fn http_and_tcp_listeners_serve_on_unix_sockets_across_reloads() {
    let origin = Origin::start("o").await;
    let dir = tempfile::tempdir().unwrap();
    let (web, raw) = (dir.path().join("web.sock"), dir.path().join("raw.sock"));
    // A stale socket file from a process that is gone is replaced.
    drop(std::os::unix::net::UnixListener::bind(&web).unwrap());
    assert!(web.exists());
    let node = Node::start(&config(&web, &raw, &origin));

    assert_eq!(
        get_over_unix(&web, "/x").await,
        (StatusCode::OK, "o".to_owned())
    );
    let seen = origin.seen().pop().unwrap();
    assert_eq!(seen.headers["x-forwarded-for"], "127.0.0.1");
    assert_eq!(seen.headers["host"], "unix.test");

    // The tcp listener relays raw bytes: an HTTP request written by hand.
    let mut stream = UnixStream::connect(&raw).await.unwrap();
    stream
        .write_all(b"GET /raw HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with('o'),
        "{answer}"
    );

    // A connection made before a reload is served after it; the socket stays.
    let early = UnixStream::connect(&web).await.unwrap();
    let listed = node.get_config().await.listeners;
    assert_eq!(listed[0].bound, format!("unix:{}", web.display()));
    node.reload(&config(&web, &raw, &origin).replace("upstream = \"u\"\n[[listener]]", "upstream = \"u\"\nhost = \"other.test\"\n[[listener.route]]\nupstream = \"u\"\n[[listener]]")).await.unwrap();
    let response = get_over(early, "x", "/early").await;
    assert_eq!(response.status, StatusCode::OK);
    assert_eq!(get_over_unix(&web, "/after").await.0, StatusCode::OK);
}

#[tokio::test]
async fn a_socket_another_process_listens_on_is_a_bind_failure() {
    let origin = Origin::start("o").await;
    let dir = tempfile::tempdir().unwrap();
    let (web, raw, held) = (
        dir.path().join("web.sock"),
        dir.path().join("raw.sock"),
        dir.path().join("held.sock"),
    );
    let node = Node::start(&config(&web, &raw, &origin));
    let _holder = std::os::unix::net::UnixListener::bind(&held).unwrap();
    let status = node
        .reload(&config(&web, &held, &origin))
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(
        status.message().contains(&format!(
            "listener[1].listen: cannot bind unix:{}",
            held.display()
        )),
        "{}",
        status.message()
    );
    assert_eq!(
        get_over_unix(&web, "/").await.0,
        StatusCode::OK,
        "the config in force keeps serving"
    );
}

/// An HTTP/1.1 origin on a Unix socket answering `unix-origin PATH`.
fn unix_origin(path: &Path) -> tokio::task::JoinHandle<()> {
    let listener = tokio::net::UnixListener::bind(path).unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    |request: http::Request<hyper::body::Incoming>| async move {
                        let body = format!("unix-origin {}", request.uri().path());
                        Ok::<_, std::convert::Infallible>(http::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from(body)),
                        ))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    })
}

#[tokio::test]
async fn upstream_servers_may_listen_on_unix_sockets() {
    let dir = tempfile::tempdir().unwrap();
    let origin_socket = dir.path().join("origin.sock");
    let origin = unix_origin(&origin_socket);
    let node = Node::start(&format!(
        r#"
[[listener]]
name = "web"
listen = "127.0.0.1:0"
[[listener.route]]
upstream = "u"
[[listener.route]]
path = "/gone/"
upstream = "gone"
[[listener]]
name = "raw"
listen = "127.0.0.1:0"
protocol = "tcp"
upstream = "u"
[upstream.u]
servers = [{{ addr = "unix:{}" }}]
[upstream.u.health]
type = "http"
interval = "100ms"
path = "/health"
[upstream.gone]
servers = [{{ addr = "unix:{}" }}]
"#,
        origin_socket.display(),
        dir.path().join("nobody.sock").display()
    ));
    // Proxied HTTP, on pooled connections.
    let client = http1_client();
    let web = node.listener("web").await;
    for path in ["/a", "/b"] {
        let answer = get(&client, web, None, path).await;
        assert_eq!(answer.status, 200, "{}", node.log());
        assert_eq!(answer.text(), format!("unix-origin {path}"));
    }
    // The health check reaches it too, and says so.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let config = node.get_config().await;
        let upstream = config.upstreams.iter().find(|u| u.name == "u").unwrap();
        let server = &upstream.servers[0];
        assert_eq!(server.address, format!("unix:{}", origin_socket.display()));
        if server.health == tether::proto::v1::HealthState::Healthy as i32 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never healthy: {server:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The TCP listener copies bytes to the same socket.
    let mut raw = tokio::net::TcpStream::connect(node.listener("raw").await)
        .await
        .unwrap();
    raw.write_all(b"GET /raw HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut response = String::new();
    raw.read_to_string(&mut response).await.unwrap();
    assert!(response.ends_with("unix-origin /raw"), "{response}");

    // Nobody listening on the path: 502 at once, not a hang.
    let answer = get(&http1_client(), web, None, "/gone/c").await;
    assert_eq!(answer.status, 502);
    origin.abort();
}
