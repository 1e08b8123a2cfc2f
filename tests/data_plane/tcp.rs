//! The TCP (L4) listener: balancing, half-close, idle timeout, draining,
//! and garbage that costs nothing but its own connection.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Answers "NAME:" and then echoes what it reads until the client's EOF,
/// then closes: a half-close must reach it for the client to get an EOF.
async fn echo_server(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                stream.write_all(format!("{name}:").as_bytes()).await.ok();
                let mut buf = [0u8; 4096];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

fn config(listen: &str, servers: &[SocketAddr], idle: &str, drain: &str) -> String {
    let list: Vec<String> = servers
        .iter()
        .map(|a| format!("{{ addr = \"{a}\" }}"))
        .collect();
    format!(
        "[node]\ndrain_timeout = \"{drain}\"\n[[listener]]\nname = \"tcp\"\nlisten = \"{listen}\"\nprotocol = \"tcp\"\nupstream = \"echo\"\nidle_timeout = \"{idle}\"\n[upstream.echo]\nservers = [{}]\n",
        list.join(", ")
    )
}

/// Sends `text`, half-closes, and reads until the server closes.
async fn exchange(addr: SocketAddr, text: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(text.as_bytes()).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut answer))
        .await
        .unwrap()
        .unwrap();
    answer
}

#[tokio::test]
async fn balances_copies_both_ways_and_passes_half_close() {
    let (a, b) = (echo_server("a").await, echo_server("b").await);
    let node = LocalNode::start(&config("127.0.0.1:0", &[a, b], "10s", "5s")).await;
    let addr = node.listener("tcp").await;
    let mut answers = Vec::new();
    for i in 0..4 {
        answers.push(exchange(addr, &format!("hello {i}")).await);
    }
    assert_eq!(
        answers,
        ["a:hello 0", "b:hello 1", "a:hello 2", "b:hello 3"]
    );
    // A large transfer, both directions at once.
    let payload: String = "0123456789".repeat(200_000);
    assert_eq!(exchange(addr, &payload).await.len(), payload.len() + 2);
}

#[tokio::test]
async fn an_idle_session_is_closed_and_a_dead_server_is_skipped() {
    let a = echo_server("a").await;
    let dead = free_addr();
    let node = LocalNode::start(&config("127.0.0.1:0", &[dead, a], "300ms", "5s")).await;
    let addr = node.listener("tcp").await;
    for _ in 0..2 {
        assert_eq!(
            exchange(addr, "x").await,
            "a:x",
            "a refused connect goes to the next server"
        );
    }
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let started = Instant::now();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(buf, b"a:");
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "not before the idle timeout"
    );
}

#[tokio::test]
async fn a_session_survives_a_reload_until_the_drain_deadline() {
    let a = echo_server("a").await;
    let listen = free_addr().to_string();
    let node = LocalNode::start(&config(&listen, &[a], "10s", "1s")).await;
    let addr = node.listener("tcp").await;
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 64];
    let n = stream.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"a:");
    node.reload(&config(&listen, &[a], "9s", "1s"))
        .await
        .unwrap();
    stream.write_all(b"still here").await.unwrap();
    let n = stream.read(&mut buf).await.unwrap();
    assert_eq!(&buf[..n], b"still here", "the session outlives the switch");
    // New connections go to the new generation meanwhile.
    assert_eq!(exchange(addr, "new").await, "a:new");
    // At the old generation's drain deadline the session is closed.
    let closed = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .unwrap();
    assert!(matches!(closed, Ok(0) | Err(_)));
}

#[tokio::test]
async fn garbage_and_aborted_connections_cost_only_themselves() {
    let a = echo_server("a").await;
    let origin = Origin::start("o").await;
    let node = LocalNode::start(&format!(
        "{}[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n[[listener.route]]\nupstream = \"h\"\n[upstream.h]\nservers = [{{ addr = \"{}\" }}]\n",
        config("127.0.0.1:0", &[a], "10s", "5s"),
        origin.addr
    )).await;
    let (tcp, web) = (node.listener("tcp").await, node.listener("web").await);
    for addr in [tcp, web] {
        for garbage in [
            &b"\x00\xff\x16\x03garbage\r\n\r\n"[..],
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00",
            b"",
        ] {
            let mut stream = TcpStream::connect(addr).await.unwrap();
            stream.write_all(garbage).await.ok();
            drop(stream);
        }
    }
    assert_eq!(exchange(tcp, "after").await, "a:after");
    assert_eq!(get(&http1_client(), web, None, "/").await.text(), "o");

    // Two listeners on port 0 have ports of their own, kept across reloads.
    assert_ne!(tcp.port(), web.port());
    let config_text = std::fs::read_to_string(&node.config_path).unwrap();
    node.reload(&config_text.replace("[control]\nlisten = \"127.0.0.1:0\"\n\n", ""))
        .await
        .unwrap();
    assert_eq!(
        (node.listener("tcp").await, node.listener("web").await),
        (tcp, web)
    );
    assert_eq!(exchange(tcp, "reloaded").await, "a:reloaded");
}
