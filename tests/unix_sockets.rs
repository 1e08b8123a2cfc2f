//! Listeners on Unix sockets: HTTP and TCP, stale socket files, a live one
//! held by someone else, and the socket kept across reloads.

mod support;

use std::path::Path;
use std::time::Duration;

use http::StatusCode;
use support::*;
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
