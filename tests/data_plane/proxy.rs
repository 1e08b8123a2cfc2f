//! The HTTP reverse proxy end to end: the shipped binary in front of real
//! upstream servers, driven by real HTTP/1.1 and HTTP/2 clients.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use crate::support::*;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;

fn upstream_block(name: &str, origins: &[&Origin], extra: &str) -> String {
    let servers: Vec<String> = origins
        .iter()
        .map(|o| format!("{{ addr = \"{}\" }}", o.addr))
        .collect();
    format!(
        "[upstream.{name}]\nservers = [{}]\n{extra}\n",
        servers.join(", ")
    )
}

#[tokio::test]
async fn routes_by_host_then_longest_path_prefix_over_http1_and_http2() {
    let (api, api_v2, www, wild, fallback) = (
        Origin::start("api").await,
        Origin::start("api-v2").await,
        Origin::start("www").await,
        Origin::start("wild").await,
        Origin::start("fallback").await,
    );
    let config = format!(
        r#"
[[listener]]
name = "web"
listen = "127.0.0.1:0"
[[listener.route]]
host = "example.com"
path = "/api/"
upstream = "api"
[[listener.route]]
host = "example.com"
path = "/api/v2/"
upstream = "api_v2"
[[listener.route]]
host = "example.com"
upstream = "www"
[[listener.route]]
host = "*.example.com"
upstream = "wild"
[[listener.route]]
path = "/"
upstream = "fallback"
{}{}{}{}{}"#,
        upstream_block("api", &[&api], ""),
        upstream_block("api_v2", &[&api_v2], ""),
        upstream_block("www", &[&www], ""),
        upstream_block("wild", &[&wild], ""),
        upstream_block("fallback", &[&fallback], ""),
    );
    let node = LocalNode::start(&config).await;
    let web = node.listener("web").await;
    let cases = [
        (Some("example.com"), "/api/users", "api"),
        (Some("EXAMPLE.com:8080"), "/api/v2/users", "api-v2"),
        (Some("example.com"), "/about", "www"),
        (Some("shop.example.com"), "/api/x", "wild"),
        (Some("other.test"), "/anything", "fallback"),
    ];
    for client in [http1_client(), http2_client()] {
        for (host, path, expected) in cases {
            let answer = get(&client, web, host, path).await;
            assert_eq!(answer.status, StatusCode::OK, "{host:?} {path}");
            assert_eq!(answer.text(), expected, "{host:?} {path}");
        }
    }
    // The upstream sees the path and query unchanged.
    get(
        &http1_client(),
        web,
        Some("example.com"),
        "/api/users?id=7&x=%20",
    )
    .await;
    assert_eq!(
        api.seen().last().unwrap().uri.to_string(),
        "/api/users?id=7&x=%20"
    );
}

#[tokio::test]
async fn no_matching_route_is_404() {
    let origin = Origin::start("only").await;
    let node = LocalNode::start(&format!(
        "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n[[listener.route]]\nhost = \"a.test\"\npath = \"/app/\"\nupstream = \"u\"\n{}",
        upstream_block("u", &[&origin], "")
    )).await;
    let web = node.listener("web").await;
    let client = http1_client();
    assert_eq!(
        get(&client, web, Some("a.test"), "/other").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(&client, web, Some("b.test"), "/app/").await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(&client, web, Some("a.test"), "/app/x").await.status,
        StatusCode::OK
    );
    assert_eq!(origin.requests(), 1);
}

#[tokio::test]
async fn forwarding_headers_as_nginx_users_expect() {
    let origin = Origin::start("o").await;
    let node = LocalNode::start(&format!(
        "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nvia = true\n[[listener.route]]\nupstream = \"u\"\n{}",
        upstream_block("u", &[&origin], "")
    )).await;
    let web = node.listener("web").await;
    let answer = get_with(
        &http1_client(),
        web,
        Some("shop.test"),
        "/",
        &[
            ("x-forwarded-for", "203.0.113.9"),
            ("x-forwarded-proto", "https"),
            ("connection", "x-private"),
            ("x-private", "secret"),
            ("x-custom", "kept"),
        ],
    )
    .await
    .unwrap();
    let seen = origin.seen().pop().unwrap();
    let header = |name: &str| {
        seen.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    };
    assert_eq!(
        header("host").as_deref(),
        Some("shop.test"),
        "Host is preserved"
    );
    assert_eq!(
        header("x-forwarded-for").as_deref(),
        Some("203.0.113.9, 127.0.0.1")
    );
    assert_eq!(header("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(header("x-forwarded-host").as_deref(), Some("shop.test"));
    assert_eq!(header("x-custom").as_deref(), Some("kept"));
    assert_eq!(
        header("x-private"),
        None,
        "headers named by Connection are hop-by-hop"
    );
    assert_eq!(header("via").as_deref(), Some("1.1 tether"));
    assert_eq!(
        answer.header("keep-alive"),
        None,
        "the upstream's hop-by-hop headers are removed"
    );
    assert_eq!(answer.header("x-origin"), Some("o"));
    assert_eq!(answer.header("via"), Some("1.1 tether"));

    // An HTTP/2 client sends :authority, which becomes Host upstream.
    let answer = get(&http2_client(), web, None, "/h2").await;
    assert_eq!(answer.status, StatusCode::OK);
    let seen = origin.seen().pop().unwrap();
    assert_eq!(seen.headers["host"], web.to_string().as_str());
}

async fn distribution(
    balance: &str,
    extra_headers: &[(&str, &str)],
    requests: usize,
    weights: &[u32],
) -> Vec<usize> {
    let mut origins = Vec::new();
    for i in 0..weights.len() {
        origins.push(Origin::start(&format!("s{i}")).await);
    }
    let servers: Vec<String> = origins
        .iter()
        .zip(weights)
        .map(|(o, w)| format!("{{ addr = \"{}\", weight = {w} }}", o.addr))
        .collect();
    let node = LocalNode::start(&format!(
        "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n[[listener.route]]\nupstream = \"u\"\n[upstream.u]\nservers = [{}]\n{balance}\n",
        servers.join(", ")
    )).await;
    let web = node.listener("web").await;
    let client = http1_client();
    for _ in 0..requests {
        let answer = get_with(&client, web, None, "/", extra_headers)
            .await
            .unwrap();
        assert_eq!(answer.status, StatusCode::OK);
    }
    origins.iter().map(|o| o.requests()).collect()
}

#[tokio::test]
async fn round_robin_spreads_evenly() {
    assert_eq!(
        distribution("balance = \"round_robin\"", &[], 30, &[1, 1, 1]).await,
        vec![10, 10, 10]
    );
}

#[tokio::test]
async fn weighted_round_robin_follows_weights() {
    assert_eq!(
        distribution("balance = \"weighted_round_robin\"", &[], 70, &[5, 1, 1]).await,
        vec![50, 10, 10]
    );
}

#[tokio::test]
async fn consistent_hash_on_a_header_keeps_a_key_on_one_server() {
    let counts = distribution(
        "balance = \"consistent_hash\"\nhash_on = \"header:x-user\"",
        &[("x-user", "alice")],
        20,
        &[1, 1, 1],
    )
    .await;
    assert_eq!(counts.iter().filter(|&&c| c == 20).count(), 1, "{counts:?}");
}

#[tokio::test]
async fn consistent_hash_spreads_different_keys() {
    let mut origins = Vec::new();
    for i in 0..3 {
        origins.push(Origin::start(&format!("s{i}")).await);
    }
    let node = LocalNode::start(&format!(
        "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n[[listener.route]]\nupstream = \"u\"\n{}",
        upstream_block("u", &origins.iter().collect::<Vec<_>>(), "balance = \"consistent_hash\"\nhash_on = \"header:x-user\"")
    )).await;
    let web = node.listener("web").await;
    let client = http1_client();
    let mut owner = HashMap::new();
    for round in 0..2 {
        for user in 0..60 {
            let user = format!("user-{user}");
            let answer = get_with(&client, web, None, "/", &[("x-user", &user)])
                .await
                .unwrap();
            let server = answer.text();
            if round == 0 {
                owner.insert(user, server);
            } else {
                assert_eq!(owner[&user], server, "a key moved between servers");
            }
        }
    }
    for origin in &origins {
        assert!(origin.requests() > 0, "60 keys should reach every server");
    }
}

#[tokio::test]
async fn least_conn_and_power_of_two_avoid_a_busy_server() {
    for balance in ["least_conn", "power_of_two"] {
        let (busy, idle) = (Origin::start("busy").await, Origin::start("idle").await);
        let node = LocalNode::start(&format!(
            "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n[[listener.route]]\nupstream = \"u\"\n{}",
            upstream_block("u", &[&busy, &idle], &format!("balance = \"{balance}\""))
        )).await;
        let web = node.listener("web").await;
        // One slow request holds one server busy...
        let client = http1_client();
        let slow = {
            let client = client.clone();
            tokio::spawn(async move { get(&client, web, None, "/slow/1500").await })
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while busy.requests() + idle.requests() < 1 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (holding, free) = if busy.requests() == 1 {
            (&busy, &idle)
        } else {
            (&idle, &busy)
        };
        // ...so every new request goes to the other one.
        for _ in 0..5 {
            assert_eq!(get(&client, web, None, "/").await.status, StatusCode::OK);
        }
        assert_eq!((holding.requests(), free.requests()), (1, 5), "{balance}");
        assert_eq!(slow.await.unwrap().status, StatusCode::OK);
    }
}

#[tokio::test]
async fn refused_upstream_is_502_and_slow_upstream_is_504() {
    let origin = Origin::start("o").await;
    let dead = free_addr();
    let node = LocalNode::start(&format!(
        r#"
[[listener]]
name = "web"
listen = "127.0.0.1:0"
[[listener.route]]
path = "/dead/"
upstream = "dead"
[[listener.route]]
path = "/"
upstream = "slow"
[upstream.dead]
servers = [{{ addr = "{dead}" }}]
[upstream.slow]
servers = [{{ addr = "{}" }}]
read_timeout = "300ms"
"#,
        origin.addr
    ))
    .await;
    let web = node.listener("web").await;
    let client = http1_client();
    let answer = get(&client, web, None, "/dead/x").await;
    assert_eq!(answer.status, StatusCode::BAD_GATEWAY);
    assert!(answer.text().starts_with("502"));
    let started = Instant::now();
    let answer = get(&client, web, None, "/hang").await;
    assert_eq!(answer.status, StatusCode::GATEWAY_TIMEOUT);
    assert!(started.elapsed() < Duration::from_secs(5));
    // The node is fine afterwards.
    assert_eq!(get(&client, web, None, "/").await.status, StatusCode::OK);
}

#[tokio::test]
async fn large_bodies_stream_both_ways_in_bounded_memory() {
    const SIZE: u64 = 100 * 1024 * 1024;
    let origin = Origin::start("o").await;
    // Its own process: the test measures the node's peak memory.
    let node = Node::start(&format!(
        "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n[[listener.route]]\nupstream = \"u\"\n{}",
        upstream_block("u", &[&origin], "")
    ));
    let web = node.listener("web").await;

    // Download: count bytes as they arrive, keep none.
    let client = http1_client();
    let response = client
        .request(
            Request::get(format!("http://{web}/bytes/{SIZE}"))
                .body(Default::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        received += frame.unwrap().data_ref().map_or(0, |d| d.len() as u64);
    }
    assert_eq!(received, SIZE);

    // Upload: a streamed request body of the same size.
    let chunk = Bytes::from(vec![b'u'; 256 * 1024]);
    let chunks = (0..SIZE / chunk.len() as u64)
        .map(move |_| Ok::<_, std::convert::Infallible>(Frame::data(chunk.clone())));
    let upload = StreamBody::new(futures_util::stream::iter(chunks));
    let uploader: hyper_util::client::legacy::Client<_, _> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let response = uploader
        .request(
            Request::post(format!("http://{web}/upload"))
                .body(upload)
                .unwrap(),
        )
        .await
        .unwrap();
    let text = response.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(text, SIZE.to_string());

    let peak_mib = node.peak_rss_kib() / 1024;
    assert!(
        peak_mib < 64,
        "peak RSS {peak_mib} MiB while moving 2 × 100 MiB: bodies must stream, not buffer"
    );
}

#[tokio::test]
async fn malformed_and_oversized_requests_get_4xx_and_the_node_keeps_serving() {
    let origin = Origin::start("o").await;
    let node = LocalNode::start(&format!(
        "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\nmax_header_bytes = 8192\nheader_read_timeout = \"500ms\"\n[[listener.route]]\nupstream = \"u\"\n{}",
        upstream_block("u", &[&origin], "")
    )).await;
    let web = node.listener("web").await;
    let garbage = raw_exchange(
        web,
        b"\x16\x03\x01\x02\x00garbage\r\n\r\n",
        Duration::from_secs(2),
    )
    .await;
    assert!(
        garbage.is_empty() || garbage.starts_with(b"HTTP/1.1 400"),
        "{:?}",
        String::from_utf8_lossy(&garbage)
    );
    let huge = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let answer = raw_exchange(web, huge.as_bytes(), Duration::from_secs(2)).await;
    assert!(
        answer.starts_with(b"HTTP/1.1 431"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
    // A client that never finishes its request head is cut off (slowloris).
    let started = Instant::now();
    let answer = raw_exchange(
        web,
        b"GET / HTTP/1.1\r\nHost: x\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "header_read_timeout should close the connection"
    );
    assert!(answer.is_empty() || answer.starts_with(b"HTTP/1.1 408"));
    assert_eq!(
        get(&http1_client(), web, None, "/").await.status,
        StatusCode::OK
    );
}

/// One worker, sequential requests of every body shape: a single
/// upstream connection carries them all; when the server closes its idle
/// connections (a restart), the next request goes on a new connection
/// instead of failing; past `idle_timeout` a pooled connection is not
/// reused.
#[tokio::test]
async fn upstream_connections_are_reused_and_stale_ones_are_replaced() {
    let origin = Origin::start("o").await;
    let node = LocalNode::start(&format!(
        "[node]\nworkers = 1\n[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n[[listener.route]]\nupstream = \"u\"\n{}",
        upstream_block("u", &[&origin], "idle_timeout = \"1s\"")
    ))
    .await;
    let web = node.listener("web").await;
    let client = http1_client();
    for round in 0..10 {
        assert_eq!(get(&client, web, None, "/").await.text(), "o");
        let sized = get(&client, web, None, "/bytes/100000").await;
        assert_eq!(sized.body.len(), 100_000, "round {round}");
        let chunked = get(&client, web, None, "/chunked/70000").await;
        assert_eq!(chunked.body.len(), 70_000, "round {round}");
        let upload = client
            .request(
                Request::post(format!("http://{web}/upload"))
                    .body(http_body_util::Full::new(Bytes::from(vec![b'u'; 5000])))
                    .unwrap(),
            )
            .await
            .unwrap();
        let uploaded = upload.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&uploaded[..], b"5000");
        let empty = get(&client, web, None, "/status/204").await;
        assert_eq!(empty.status, StatusCode::NO_CONTENT);
    }
    assert_eq!(
        origin.connections(),
        1,
        "50 requests on one upstream connection"
    );

    // The origin restarts: its connections close while they sit idle in the pool.
    let addr = origin.addr;
    origin.stop();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let origin = Origin::start_on(addr, "o2").await;
    for _ in 0..3 {
        let answer = get(&client, web, None, "/").await;
        assert_eq!(
            (answer.status, answer.text().as_str()),
            (StatusCode::OK, "o2")
        );
    }
    assert_eq!(origin.connections(), 1);

    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(get(&client, web, None, "/").await.text(), "o2");
    assert_eq!(
        origin.connections(),
        2,
        "an idle connection past idle_timeout is not reused"
    );
}
