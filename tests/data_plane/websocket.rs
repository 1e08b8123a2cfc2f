//! WebSocket through the node: HTTP/1.1 Upgrade, including across a
//! reload, and WebSocket over HTTP/2 (RFC 8441 extended CONNECT).

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::*;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

/// A WebSocket echo server; answers each text message with "echo: …".
pub(crate) async fn echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut ws) = tokio_tungstenite::accept_async(stream).await else {
                    return;
                };
                while let Some(Ok(message)) = ws.next().await {
                    match message {
                        Message::Text(text) => {
                            let reply = Message::text(format!("echo: {text}"));
                            if ws.send(reply).await.is_err() {
                                return;
                            }
                        }
                        Message::Close(_) => return,
                        _ => {}
                    }
                }
            });
        }
    });
    addr
}

fn config(listen: &str, upstream: SocketAddr, drain: &str) -> String {
    format!(
        "[node]\ndrain_timeout = \"{drain}\"\n[[listener]]\nname = \"web\"\nlisten = \"{listen}\"\n[[listener.route]]\npath = \"/ws\"\nupstream = \"ws\"\n[upstream.ws]\nservers = [{{ addr = \"{upstream}\" }}]\n"
    )
}

pub(crate) async fn roundtrip<S>(
    ws: &mut tokio_tungstenite::WebSocketStream<S>,
    text: &str,
) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    ws.send(Message::text(text)).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    reply.into_text().unwrap().to_string()
}

#[tokio::test]
async fn a_websocket_passes_through_and_survives_a_reload() {
    let upstream = echo_server().await;
    let listen = free_addr().to_string();
    let node = LocalNode::start(&config(&listen, upstream, "10s")).await;
    let web = node.listener("web").await;
    let (mut ws, response) = tokio_tungstenite::connect_async(format!("ws://{web}/ws"))
        .await
        .unwrap();
    assert_eq!(response.status(), 101);
    assert_eq!(roundtrip(&mut ws, "hello").await, "echo: hello");

    // The generation that carries the socket retires; the socket goes on.
    node.reload(&config(&listen, upstream, "9s")).await.unwrap();
    let state = node.get_config().await;
    assert_eq!(
        state.draining.len(),
        1,
        "generation 1 drains while its WebSocket is open"
    );
    assert_eq!(
        roundtrip(&mut ws, "after reload").await,
        "echo: after reload"
    );
    ws.close(None).await.unwrap();
    drop(ws);

    // Once the WebSocket closes, the old generation is gone.
    node.wait_drained(Duration::from_secs(5)).await;
    // New WebSockets work on the new generation.
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{web}/ws"))
        .await
        .unwrap();
    assert_eq!(roundtrip(&mut ws, "again").await, "echo: again");
}

#[tokio::test]
async fn a_websocket_outliving_the_drain_timeout_is_closed() {
    let upstream = echo_server().await;
    let listen = free_addr().to_string();
    let node = LocalNode::start(&config(&listen, upstream, "500ms")).await;
    let web = node.listener("web").await;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{web}/ws"))
        .await
        .unwrap();
    assert_eq!(roundtrip(&mut ws, "hi").await, "echo: hi");
    node.reload(&config(&listen, upstream, "600ms"))
        .await
        .unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the tunnel is closed at the drain deadline");
}

/// Over `io`, an HTTP/2 client opens a WebSocket to `/ws` with an
/// extended CONNECT and exchanges two messages through it.
async fn websocket_over_http2<S>(io: S, authority: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use http_body_util::Empty;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tokio_tungstenite::tungstenite::protocol::Role;

    let (mut sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, Empty<bytes::Bytes>>(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(connection);
    // The node's SETTINGS (which allow extended CONNECT) arrive with the
    // answer to a first request.
    let plain = http::Request::get(format!("https://{authority}/elsewhere"))
        .body(Empty::new())
        .unwrap();
    let plain = sender.send_request(plain).await.unwrap();
    assert_eq!(plain.status(), 404, "no route but /ws");

    let connect = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("https://{authority}/ws"))
        .header("sec-websocket-version", "13")
        .extension(hyper::ext::Protocol::from_static("websocket"))
        .body(Empty::new())
        .unwrap();
    let response = sender.send_request(connect).await.unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers().get("sec-websocket-accept").is_none());
    let upgraded = hyper::upgrade::on(response).await.unwrap();
    let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
        TokioIo::new(upgraded),
        Role::Client,
        None,
    )
    .await;
    assert_eq!(roundtrip(&mut ws, "over h2").await, "echo: over h2");
    assert_eq!(roundtrip(&mut ws, "again").await, "echo: again");
    ws.close(None).await.unwrap();
}

/// WebSocket over HTTP/2 (RFC 8441) on an h2c and an https listener: the
/// node asks the HTTP/1.1 upstream with an ordinary Upgrade and answers the
/// stream with 200; the stream carries the WebSocket both ways, next to
/// ordinary requests on the same connection.
#[tokio::test]
async fn websocket_over_http2_reaches_an_http1_upstream() {
    let upstream = echo_server().await;
    let ca = TestCa::new("ws test CA");
    let issued = ca.issue(&["ws.test"]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ws.crt"), &issued.cert_pem).unwrap();
    std::fs::write(dir.path().join("ws.key"), &issued.key_pem).unwrap();
    let tls = format!(
        "[[listener]]\nname = \"tls\"\nlisten = \"127.0.0.1:0\"\nprotocol = \"https\"\n\
         [[listener.tls.certificate]]\ncert = \"{0}/ws.crt\"\nkey = \"{0}/ws.key\"\n\
         [[listener.route]]\npath = \"/ws\"\nupstream = \"ws\"\n",
        dir.path().display()
    );
    // An HTTP/2 upstream cannot be asked with an HTTP/1.1 Upgrade.
    let h2_upstream = format!(
        "[[listener.route]]\npath = \"/h2ws\"\nupstream = \"h2\"\n\
         [upstream.h2]\nprotocol = \"h2c\"\nservers = [{{ addr = \"{upstream}\" }}]\n"
    );
    let web_config = config("127.0.0.1:0", upstream, "5s").replacen(
        "[upstream.ws]",
        &format!("{h2_upstream}[upstream.ws]"),
        1,
    );
    let node = LocalNode::start(&format!("{web_config}{tls}")).await;

    let web = node.listener("web").await;
    let plain = tokio::net::TcpStream::connect(web).await.unwrap();
    websocket_over_http2(plain, &web.to_string()).await;

    let refused = tokio::net::TcpStream::connect(web).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake::<_, http_body_util::Empty<bytes::Bytes>>(hyper_util::rt::TokioIo::new(
                refused,
            ))
            .await
            .unwrap();
    tokio::spawn(connection);
    let warm = http::Request::get(format!("http://{web}/elsewhere"))
        .body(http_body_util::Empty::new())
        .unwrap();
    sender.send_request(warm).await.unwrap();
    let connect = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(format!("http://{web}/h2ws"))
        .extension(hyper::ext::Protocol::from_static("websocket"))
        .body(http_body_util::Empty::new())
        .unwrap();
    let answer = sender.send_request(connect).await.unwrap();
    assert_eq!(answer.status(), 501);

    let https = node.listener("tls").await;
    let stream = tls_connect(https, "ws.test", &ca.pem(), &[b"h2"]).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    websocket_over_http2(stream, "ws.test").await;
}
