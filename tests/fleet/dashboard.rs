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
    let mut last_ack = String::new();
    while acked.len() < 2 {
        let ack = until(&mut live, |e| is(e, "ack", "a", 1) || is(e, "ack", "b", 1)).await;
        acked.push(ack.data["node"].as_str().unwrap().to_owned());
        last_ack = ack.id.clone().unwrap();
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
    // The snapshot names the newest event it surely reflects: here, at
    // least the last ACK, in the stream's own ids.
    let through = fleet["events_through"].as_str().unwrap();
    let number = |id: &str| -> u64 { id.rsplit_once('-').unwrap().1.parse().unwrap() };
    let run = |id: &str| id.rsplit_once('-').unwrap().0.to_owned();
    assert_eq!(run(through), run(&last_ack));
    assert!(number(through) >= number(&last_ack), "{through} {last_ack}");

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
    assert!(
        stderr.contains("is not loopback: give --dashboard-tokens"),
        "{stderr}"
    );
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

/// One request over `io`; the status, the headers and the JSON body.
async fn request<I>(
    io: I,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, http::HeaderMap, serde_json::Value)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(connection);
    let mut request = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "127.0.0.1");
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let request = request
        .body(http_body_util::Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    let response = sender.send_request(request).await.unwrap();
    let (parts, body) = response.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    (
        parts.status.as_u16(),
        parts.headers,
        serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    )
}

/// Off loopback the dashboard is HTTPS with the controller's certificate,
/// and shows the fleet only to operators who signed in with a token (or
/// send it as a bearer token); actions need an operator, JSON, and the
/// dashboard's own origin.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_loopback_the_dashboard_is_tls_and_for_signed_in_operators_only() {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new("fleet ca");
    let server = ca.issue(&["127.0.0.1"]);
    let token = "ops-token-0123456789";
    write_files(
        dir.path(),
        &[
            ("ca.pem", ca.pem().as_bytes()),
            ("controller.pem", server.cert_pem.as_bytes()),
            ("controller-key.pem", server.key_pem.as_bytes()),
            ("tokens", format!("alice {token}\n").as_bytes()),
        ],
    );
    let path = |name: &str| dir.path().join(name).display().to_string();
    let port = free_addr().port();
    let dashboard = format!("0.0.0.0:{port}");
    let controller = Controller::start(
        &dir.path().join("store"),
        &[
            "--cert",
            &path("controller.pem"),
            "--key",
            &path("controller-key.pem"),
            "--client-ca",
            &path("ca.pem"),
            "--dashboard",
            &dashboard,
            "--dashboard-tokens",
            &path("tokens"),
        ],
    );
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let ca_pem = ca.pem();
    let call = |method: &'static str,
                path: &'static str,
                headers: Vec<(&'static str, String)>,
                body: &'static str| {
        let ca_pem = ca_pem.clone();
        async move {
            let tls = tls_connect(addr, "127.0.0.1", &ca_pem, &[b"http/1.1"]).await;
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            request(tls, method, path, &headers, body).await
        }
    };
    let json = || ("content-type", "application/json".to_owned());

    // Nothing about the fleet before signing in; the page itself loads.
    assert_eq!(call("GET", "/api/fleet", vec![], "").await.0, 401);
    assert_eq!(call("GET", "/api/events", vec![], "").await.0, 401);
    let (status, _, session) = call("GET", "/api/session", vec![], "").await;
    assert_eq!(status, 200);
    assert_eq!(
        session,
        serde_json::json!({ "operator": null, "sign_in": true, "may_read": false })
    );
    let (status, headers, _) = call("GET", "/", vec![], "").await;
    assert_eq!(status, 200);
    assert!(headers["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("script-src 'self'"));

    // A wrong token is refused; the right one opens a session whose cookie
    // only travels over TLS and never reaches scripts.
    let (status, headers, _) = call(
        "POST",
        "/api/session",
        vec![json()],
        r#"{"token":"ops-token-wrong-0000"}"#,
    )
    .await;
    assert_eq!(status, 401);
    assert!(headers.get("set-cookie").is_none());
    let sign_in = format!(r#"{{"token":"{token}"}}"#);
    let sign_in: &'static str = Box::leak(sign_in.into_boxed_str());
    let (status, headers, answer) = call("POST", "/api/session", vec![json()], sign_in).await;
    assert_eq!(status, 200);
    assert_eq!(answer["operator"], "alice");
    let cookie = headers["set-cookie"].to_str().unwrap().to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Secure"] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    let session = cookie.split(';').next().unwrap().to_owned();
    let with_session = || ("cookie", session.clone());
    let (status, _, fleet) = call("GET", "/api/fleet", vec![with_session()], "").await;
    assert_eq!(status, 200);
    assert_eq!(fleet["versions"], serde_json::json!([]));
    let bearer = ("authorization", format!("Bearer {token}"));
    assert_eq!(call("GET", "/api/fleet", vec![bearer], "").await.0, 200);

    // Actions: an operator, JSON, from the dashboard's own origin.
    let rollback = r#"{"version":1}"#;
    assert_eq!(
        call("POST", "/api/rollback", vec![json()], rollback)
            .await
            .0,
        401
    );
    let text = ("content-type", "text/plain".to_owned());
    assert_eq!(
        call(
            "POST",
            "/api/rollback",
            vec![with_session(), text],
            rollback
        )
        .await
        .0,
        415
    );
    let elsewhere = ("origin", "https://evil.example".to_owned());
    assert_eq!(
        call(
            "POST",
            "/api/rollback",
            vec![with_session(), json(), elsewhere],
            rollback
        )
        .await
        .0,
        403
    );
    let own = ("origin", "https://127.0.0.1".to_owned());
    let (status, _, answer) = call(
        "POST",
        "/api/rollback",
        vec![with_session(), json(), own],
        rollback,
    )
    .await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (404, Some("no version 1"))
    );

    // Signed out, the session is gone.
    assert_eq!(
        call("DELETE", "/api/session", vec![with_session()], "")
            .await
            .0,
        200
    );
    assert_eq!(
        call("GET", "/api/fleet", vec![with_session()], "").await.0,
        401
    );
    drop(controller);
}

/// What the dashboard refuses to start with, each said clearly.
#[test]
fn the_dashboard_refuses_unsafe_or_broken_settings() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(&tokens, "alice short\nbob\n").unwrap();
    let good = dir.path().join("good");
    std::fs::write(&good, "alice 0123456789abcdef\n").unwrap();
    let refusal = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
            .args(["controller", "--listen", "127.0.0.1:0", "--data"])
            .arg(dir.path().join("store"))
            .args(args)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1), "{args:?}");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let good = good.to_str().unwrap();
    let stderr = refusal(&["--dashboard", "0.0.0.0:0", "--dashboard-tokens", good]);
    assert!(
        stderr.contains("give --cert and --key so that tokens travel over TLS"),
        "{stderr}"
    );
    let stderr = refusal(&[
        "--dashboard",
        "127.0.0.1:0",
        "--dashboard-tokens",
        tokens.to_str().unwrap(),
    ]);
    let at = tokens.display();
    assert!(
        stderr.contains(&format!(
            "{at}:1: the token of \"alice\" is shorter than 16"
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains(&format!("{at}:2: expected `OPERATOR TOKEN`")),
        "{stderr}"
    );
}
