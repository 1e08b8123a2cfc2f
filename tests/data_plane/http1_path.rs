//! The node's own HTTP/1.1 path beside hyper: requests of every shape on
//! one connection come back whole and in order whichever of the two
//! serves them, line ends and framing are read strictly on both sides, and
//! what a server sends that the node cannot pass on safely never reaches
//! the client as if it were fine.

use std::net::SocketAddr;
use std::time::Duration;

use crate::support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

fn config(upstream: SocketAddr) -> String {
    format!(
        "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n[[listener.route]]\nupstream = \"u\"\n\
         [upstream.u]\nservers = [{{ addr = \"{upstream}\" }}]\n"
    )
}

/// Writes `bytes` on a new connection and reads until the node closes it.
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    String::from_utf8_lossy(&raw_exchange(addr, bytes, Duration::from_secs(5)).await).into_owned()
}

#[tokio::test]
async fn pipelined_requests_of_mixed_shapes_are_answered_in_order() {
    let origin = Origin::start("o").await;
    let node = LocalNode::start(&config(origin.addr)).await;
    let web = node.listener("web").await;
    // Plain GETs, a POST with its body, a chunked upload (hyper's from
    // there on), then plain GETs again, all sent at once.
    let requests = b"GET /status/201 HTTP/1.1\r\nHost: a\r\n\r\n\
        POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello\
        GET /status/202 HTTP/1.1\r\nHost: a\r\n\r\n\
        POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nb\r\nhello world\r\n0\r\n\r\n\
        GET /status/203 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n";
    let answer = exchange(web, requests).await;
    let order: Vec<&str> = [
        "HTTP/1.1 201",
        "\r\n\r\n5",
        "HTTP/1.1 202",
        "\r\n\r\n11",
        "HTTP/1.1 203",
    ]
    .into_iter()
    .filter(|marker| answer.contains(marker))
    .collect();
    assert_eq!(order.len(), 5, "{answer}");
    let positions: Vec<usize> = order.iter().map(|m| answer.find(m).unwrap()).collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "out of order: {answer}"
    );
    assert_eq!(origin.requests(), 5);
}

#[tokio::test]
async fn a_bare_lf_or_a_length_beside_chunked_is_refused_and_reaches_no_server() {
    let origin = Origin::start("o").await;
    let node = LocalNode::start(&config(origin.addr)).await;
    let web = node.listener("web").await;
    for request in [
        &b"GET / HTTP/1.1\nHost: a\n\n"[..],
        b"GET / HTTP/1.1\r\nHost: a\nX-Smuggled: 1\r\n\r\n",
        b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\
          Transfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
    ] {
        let answer = exchange(web, request).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    }
    assert_eq!(origin.requests(), 0);
    let client = http1_client();
    assert_eq!(get(&client, web, None, "/").await.text(), "o");
}

/// A server that reads one request head per connection and answers each
/// with the next of `answers` (pausing 100 ms at each `PAUSE`), then
/// closes.
const PAUSE: &str = "<pause>";

async fn scripted_origin(answers: Vec<&'static [u8]>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        for answer in answers {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") {
                if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                    break;
                }
                head.push(byte[0]);
            }
            let text = String::from_utf8_lossy(answer).into_owned();
            for (i, part) in text.split(PAUSE).enumerate() {
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                let _ = stream.write_all(part.as_bytes()).await;
            }
            let _ = stream.shutdown().await;
        }
    });
    addr
}

#[tokio::test]
async fn interim_responses_are_skipped_and_bodies_until_close_are_chunked_for_the_client() {
    let origin = scripted_origin(vec![
        b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.0 200 OK\r\n\r\nuntil the end",
    ])
    .await;
    let node = LocalNode::start(&config(origin)).await;
    let web = node.listener("web").await;
    let mut stream = TcpStream::connect(web).await.unwrap();
    let mut answers = String::new();
    for _ in 0..2 {
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 4096];
        // Each answer ends with its body: "ok", or the last chunk.
        while !(answers.ends_with("ok") || answers.ends_with("0\r\n\r\n")) {
            let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
                .await
                .expect("an answer in time")
                .unwrap();
            assert!(n > 0, "closed after {answers:?}");
            answers.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        answers.push('|');
    }
    let (first, second) = answers.split_once('|').unwrap();
    assert!(first.starts_with("HTTP/1.1 200 OK\r\n"), "{first}");
    assert!(!first.contains("103"), "{first}");
    assert!(second.starts_with("HTTP/1.1 200 OK\r\n"), "{second}");
    assert!(
        second.contains("transfer-encoding: chunked\r\n"),
        "{second}"
    );
    assert!(
        second.ends_with("d\r\nuntil the end\r\n0\r\n\r\n|"),
        "{second}"
    );
}

#[tokio::test]
async fn a_response_with_ambiguous_or_broken_framing_never_passes_as_whole() {
    let origin = scripted_origin(vec![
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n<pause>XX0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort",
    ])
    .await;
    let node = LocalNode::start(&config(origin)).await;
    let web = node.listener("web").await;
    let request = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
    // Two lengths, length and chunked, a broken chunk before anything
    // went out: the client's 502.
    for _ in 0..3 {
        let answer = exchange(web, request).await;
        assert!(answer.starts_with("HTTP/1.1 502"), "{answer}");
    }
    // Broken mid-body: the head has gone out, so the client connection is
    // closed before the body is complete, and nothing else is sent.
    let answer = exchange(web, request).await;
    assert!(answer.ends_with("5\r\nhello\r\n"), "{answer}");
    let answer = exchange(web, request).await;
    assert!(answer.ends_with("\r\n\r\nshort"), "{answer}");
}

#[tokio::test]
async fn http2_clients_get_whole_bodies_of_every_framing_over_one_upstream_connection() {
    let origin = Origin::start("o").await;
    let node = LocalNode::start(&format!("[node]\nworkers = 1\n{}", config(origin.addr))).await;
    let web = node.listener("web").await;
    let h2 = http2_client();
    for round in 0..5 {
        let sized = get(&h2, web, None, "/bytes/100000").await;
        assert_eq!(sized.body.len(), 100_000, "round {round}");
        let chunked = get(&h2, web, None, "/chunked/70000").await;
        assert_eq!(chunked.body.len(), 70_000, "round {round}");
        assert_eq!(chunked.header("transfer-encoding"), None);
        let empty = get(&h2, web, None, "/status/204").await;
        assert_eq!(empty.status, http::StatusCode::NO_CONTENT);
        assert_eq!(get(&h2, web, None, "/").await.text(), "o");
    }
    assert_eq!(origin.requests(), 20);
    assert_eq!(
        origin.connections(),
        1,
        "every request on one upstream connection"
    );
}
