//! WebSocket (HTTP/1.1 Upgrade) through the node, including across a reload.

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::*;
use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

/// A WebSocket echo server; answers each text message with "echo: …".
async fn echo_server() -> SocketAddr {
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

async fn roundtrip(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
    text: &str,
) -> String {
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
