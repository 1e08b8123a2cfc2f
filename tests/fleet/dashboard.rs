//! The controller's dashboard API over real HTTP: the JSON snapshot and
//! the Server-Sent Events stream with `Last-Event-ID` resumption.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;

use crate::support::*;

/// GET `path` from the dashboard; the status and the body.
async fn get_json(addr: SocketAddr, path: &str) -> (u16, serde_json::Value) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = http::Request::get(path)
        .header("host", "dashboard")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let status = response.status().as_u16();
    let body = response.into_body().collect().await.unwrap().to_bytes();
    (
        status,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

/// One Server-Sent Event: its id (if any), type and data.
#[derive(Debug)]
struct Sse {
    id: Option<String>,
    event: Option<String>,
    data: serde_json::Value,
}

/// Opens `/api/events` (resuming after `last_id`); events arrive on the
/// channel as the body streams in.
async fn events(addr: SocketAddr, last_id: Option<&str>) -> mpsc::UnboundedReceiver<Sse> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut request = http::Request::get("/api/events").header("host", "dashboard");
    if let Some(id) = last_id {
        request = request.header("last-event-id", id);
    }
    let response = sender
        .send_request(request.body(Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut body = response.into_body();
        let mut pending = String::new();
        while let Some(Ok(frame)) = body.frame().await {
            let Some(data) = frame.data_ref() else {
                continue;
            };
            pending.push_str(std::str::from_utf8(data).unwrap());
            while let Some(end) = pending.find("\n\n") {
                let message: String = pending.drain(..end + 2).collect();
                let field = |name: &str| {
                    message
                        .lines()
                        .find_map(|l| l.strip_prefix(name).map(str::to_owned))
                };
                let sse = Sse {
                    id: field("id: "),
                    event: field("event: "),
                    data: serde_json::from_str(&field("data: ").unwrap_or_default())
                        .unwrap_or_default(),
                };
                if tx.send(sse).is_err() {
                    return;
                }
            }
        }
    });
    rx
}

async fn next(events: &mut mpsc::UnboundedReceiver<Sse>) -> Sse {
    tokio::time::timeout(Duration::from_secs(10), events.recv())
        .await
        .expect("an event in time")
        .expect("the stream is open")
}

/// Reads events until one matches.
async fn until(events: &mut mpsc::UnboundedReceiver<Sse>, what: impl Fn(&Sse) -> bool) -> Sse {
    loop {
        let event = next(events).await;
        if what(&event) {
            return event;
        }
    }
}

fn is(event: &Sse, kind: &str, node: &str, version: u64) -> bool {
    event.data["event"] == kind
        && event.data["node"] == node
        && event.data["detail"]["version"] == version
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_snapshot_and_the_event_stream_show_the_fleet_and_resume_where_a_client_left() {
    let data = tempfile::tempdir().unwrap();
    let dashboard = free_addr();
    let dashboard_arg = dashboard.to_string();
    let controller = Controller::start(data.path(), &["--dashboard", &dashboard_arg]);
    let url = controller.url();
    let a = Node::start(&node_config("a", &url, r#"env = "prod""#));
    let b = Node::start(&node_config("b", &url, r#"env = "prod""#));
    wait_connected(&controller, &["a", "b"]).await;
    let origin = Origin::start("app").await;

    let mut live = events(dashboard, None).await;
    controller
        .publish(&traffic("127.0.0.1:0", &origin), "")
        .await
        .unwrap();
    let published = until(&mut live, |e| e.data["event"] == "published").await;
    assert_eq!(published.data["detail"]["version"], 1);
    let mut acked = Vec::new();
    while acked.len() < 2 {
        let ack = until(&mut live, |e| is(e, "ack", "a", 1) || is(e, "ack", "b", 1)).await;
        acked.push(ack.data["node"].as_str().unwrap().to_owned());
    }
    acked.sort();
    assert_eq!(acked, ["a", "b"]);
    wait_acked(&controller, &["a", "b"], 1).await;

    let (status, fleet) = get_json(dashboard, "/api/fleet").await;
    assert_eq!(status, 200);
    let mut ids: Vec<&str> = fleet["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            assert_eq!(n["version"], 1, "{n}");
            assert_eq!(n["connected"], true, "{n}");
            n["id"].as_str().unwrap()
        })
        .collect();
    ids.sort();
    assert_eq!(ids, ["a", "b"]);
    assert_eq!(fleet["versions"][0]["version"], 1);

    // A client that left after the publish event gets the ACKs it missed
    // at once, in order, without new activity.
    let left_at = published.id.clone().expect("events carry ids");
    let mut resumed = events(dashboard, Some(&left_at)).await;
    let mut acks = Vec::new();
    for _ in 0..2 {
        let ack = until(&mut resumed, |e| e.data["event"] == "ack").await;
        acks.push(ack.data["node"].as_str().unwrap().to_owned());
    }
    acks.sort();
    assert_eq!(acks, ["a", "b"]);

    // An id it does not know (another run's): start over from the snapshot.
    let mut stale = events(dashboard, Some("0123456789abcdef-3")).await;
    assert_eq!(next(&mut stale).await.event.as_deref(), Some("reset"));

    // Read-only, and only these two paths.
    assert_eq!(get_json(dashboard, "/nothing").await.0, 404);

    // After a restart the events kept before are gone: a client that
    // reconnects with its last id is told to read the snapshot again, and
    // the snapshot has the fleet as the store and the nodes tell it.
    let mut controller = controller;
    controller.restart();
    let mut after_restart = events(dashboard, Some(&left_at)).await;
    assert_eq!(
        next(&mut after_restart).await.event.as_deref(),
        Some("reset")
    );
    wait_connected(&controller, &["a", "b"]).await;
    let (_, fleet) = get_json(dashboard, "/api/fleet").await;
    assert_eq!(fleet["versions"][0]["version"], 1);
    drop((a, b));
}

#[test]
fn the_dashboard_refuses_an_address_off_loopback() {
    let data = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["controller", "--listen", "127.0.0.1:0", "--data"])
        .arg(data.path())
        .args(["--dashboard", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("loopback only"), "{stderr}");
}

/// A connection that never sends a request is closed once the request
/// head is 10 s late, like the node's listeners do.
#[tokio::test]
async fn a_dashboard_connection_that_sends_nothing_is_closed() {
    use tokio::io::AsyncReadExt;
    let data = tempfile::tempdir().unwrap();
    let dashboard = free_addr();
    let dashboard_arg = dashboard.to_string();
    let _controller = Controller::start(data.path(), &["--dashboard", &dashboard_arg]);
    let mut silent = tokio::net::TcpStream::connect(dashboard).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(20), silent.read(&mut buf))
        .await
        .expect("closed within 20 s");
    assert_eq!(read.unwrap_or(0), 0, "closed without an answer");
}
