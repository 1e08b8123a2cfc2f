//! Generations: every config change goes through one apply path, and no
//! request or connection is lost on the way.

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use support::*;
use tether::proto::v1 as pb;
use tonic::Code;

fn config(listen: &str, route_to: &str, upstreams: &str, extra_routes: &str) -> String {
    format!(
        r#"
[node]
drain_timeout = "10s"

[[listener]]
name = "web"
listen = "{listen}"
{extra_routes}
[[listener.route]]
path = "/"
upstream = "{route_to}"
{upstreams}
"#
    )
}

fn upstream(name: &str, origins: &[&Origin], balance: &str) -> String {
    let servers: Vec<String> = origins
        .iter()
        .map(|o| format!("{{ addr = \"{}\" }}", o.addr))
        .collect();
    format!(
        "[upstream.{name}]\nservers = [{}]\nbalance = \"{balance}\"\n",
        servers.join(", ")
    )
}

/// A client that never retries on its own, so every lost request counts.
fn strict_client() -> Client<HttpConnector, Full<Bytes>> {
    Client::builder(TokioExecutor::new())
        .retry_canceled_requests(false)
        .pool_max_idle_per_host(1)
        .build(HttpConnector::new())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_reloads_under_load_lose_nothing() {
    let (a, b, c) = (
        Origin::start("a").await,
        Origin::start("b").await,
        Origin::start("c").await,
    );
    let listen = free_addr().to_string();
    let blue = config(
        &listen,
        "blue",
        &(upstream("blue", &[&a, &b], "round_robin") + &upstream("green", &[&c], "least_conn")),
        "",
    );
    let green = config(
        &listen,
        "green",
        &(upstream("green", &[&b, &c], "least_conn") + &upstream("blue", &[&a], "power_of_two")),
        "[[listener.route]]\npath = \"/extra/\"\nupstream = \"blue\"\n",
    );
    let node = Node::start(&blue);
    let web = node.listener("web").await;

    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for _ in 0..32 {
        let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
        clients.push(tokio::spawn(async move {
            let client = strict_client();
            let started = Instant::now();
            // Bounded by a flag and by time.
            while !stop.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
                let request = Request::get(format!("http://{web}/"))
                    .body(Full::default())
                    .unwrap();
                match client.request(request).await {
                    Ok(response) if response.status() == StatusCode::OK => {
                        match response.into_body().collect().await {
                            Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                            Err(e) => {
                                eprintln!("body error: {e}");
                                failed.fetch_add(1, Ordering::Relaxed)
                            }
                        };
                    }
                    Ok(response) => {
                        eprintln!("status {}", response.status());
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("request error: {e:?}");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut generation = 1;
    for i in 0..50 {
        let next = if i % 2 == 0 { &green } else { &blue };
        let applied = node.reload(next).await.expect("reload");
        generation = applied.config.unwrap().generation;
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    assert_eq!(generation, 51);
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed across 50 reloads",
        ok + failed
    );
    assert!(ok > 1000, "only {ok} requests went through");
    assert!(
        c.requests() > 0 && a.requests() > 0,
        "both configs served traffic"
    );
}

#[tokio::test]
async fn a_download_started_before_a_reload_completes_after_it() {
    const SIZE: u64 = 32 * 1024 * 1024;
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    let listen = free_addr().to_string();
    let node = Node::start(&config(
        &listen,
        "u",
        &upstream("u", &[&a], "round_robin"),
        "",
    ));
    let web = node.listener("web").await;
    let client = strict_client();
    let response = client
        .request(
            Request::get(format!("http://{web}/bytes/{SIZE}"))
                .body(Full::default())
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = response.into_body();
    let mut received = body
        .frame()
        .await
        .unwrap()
        .unwrap()
        .into_data()
        .unwrap()
        .len() as u64;

    let applied = node
        .reload(&config(
            &listen,
            "u",
            &upstream("u", &[&b], "round_robin"),
            "",
        ))
        .await
        .unwrap();
    assert_eq!(applied.config.unwrap().generation, 2);
    let state = node.get_config().await;
    assert_eq!(
        state.draining.len(),
        1,
        "generation 1 drains while the download runs"
    );
    assert_eq!(state.draining[0].generation, 1);
    assert!(state.draining[0].open_connections >= 1);
    // New requests already go to the new generation.
    assert_eq!(get(&http1_client(), web, None, "/").await.text(), "b");

    while let Some(frame) = body.frame().await {
        received += frame
            .expect("the download is not cut by the reload")
            .into_data()
            .map_or(0, |d| d.len() as u64);
    }
    assert_eq!(received, SIZE);
    drop(client);
    node.wait_drained(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn listeners_come_and_go_and_failed_applies_change_nothing() {
    let origin = Origin::start("o").await;
    let listen = free_addr().to_string();
    let base = config(&listen, "u", &upstream("u", &[&origin], "round_robin"), "");
    let node = Node::start(&base);
    let web = node.listener("web").await;
    let client = http1_client();

    // Add a listener.
    let second = free_addr();
    let with_admin = format!("{base}\n[[listener]]\nname = \"admin\"\nlisten = \"{second}\"\n[[listener.route]]\nupstream = \"u\"\n");
    node.reload(&with_admin).await.expect("adding a listener");
    assert_eq!(get(&client, second, None, "/").await.status, StatusCode::OK);
    assert_eq!(get(&client, web, None, "/").await.status, StatusCode::OK);

    // Remove it: its address is released, the other keeps serving.
    node.reload(&base).await.expect("removing a listener");
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpListener::bind(second).is_err() {
        assert!(
            Instant::now() < deadline,
            "removed listener's address should be released"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(get(&client, web, None, "/").await.status, StatusCode::OK);

    // An invalid config: every error with its location, nothing changes.
    let before = node.get_config().await.config.unwrap();
    let invalid = base
        .replace("balance = \"round_robin\"", "balance = \"fastest\"")
        .replace("path = \"/\"", "path = \"nope\"");
    let status = node.reload(&invalid).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("listener[0].route[0].path"),
        "{}",
        status.message()
    );
    assert!(
        status.message().contains("upstream.u.balance"),
        "{}",
        status.message()
    );
    let details = tonic_types::StatusExt::get_error_details(&status);
    let violations = &details
        .bad_request()
        .expect("BadRequest details")
        .field_violations;
    assert_eq!(violations.len(), 2);
    assert_eq!(node.get_config().await.config.unwrap(), before);

    // A bind failure: the address is held by another socket.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let held_addr = held.local_addr().unwrap();
    let blocked = format!("{base}\n[[listener]]\nname = \"blocked\"\nlisten = \"{held_addr}\"\n[[listener.route]]\nupstream = \"u\"\n");
    let status = node.reload(&blocked).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert!(
        status.message().contains("listener[1].listen"),
        "{}",
        status.message()
    );
    assert!(
        status
            .message()
            .contains(&format!("cannot bind {held_addr}")),
        "{}",
        status.message()
    );
    assert_eq!(node.get_config().await.config.unwrap(), before);
    assert_eq!(get(&client, web, None, "/").await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_request_that_outlives_the_drain_timeout_is_closed() {
    let origin = Origin::start("o").await;
    let listen = free_addr().to_string();
    let short = config(&listen, "u", &upstream("u", &[&origin], "round_robin"), "")
        .replace("drain_timeout = \"10s\"", "drain_timeout = \"1s\"");
    let node = Node::start(&short);
    let web = node.listener("web").await;
    let mut watch = node.watch_health().await;
    let first = watch.message().await.unwrap().unwrap();
    assert!(matches!(
        first.event,
        Some(pb::node_event::Event::Snapshot(_))
    ));

    let hanging =
        tokio::spawn(async move { get_with(&strict_client(), web, None, "/hang", &[]).await });
    let deadline = Instant::now() + Duration::from_secs(5);
    while origin.requests() == 0 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let started = Instant::now();
    let changed = config(&listen, "u", &upstream("u", &[&origin], "least_conn"), "")
        .replace("drain_timeout = \"10s\"", "drain_timeout = \"1s\"");
    node.reload(&changed).await.unwrap();
    let outcome = tokio::time::timeout(Duration::from_secs(10), hanging)
        .await
        .expect("closed at the drain deadline")
        .unwrap();
    assert!(outcome.is_err(), "the hanging request is cut off");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "not before the drain timeout"
    );

    // The watcher saw the apply and the forced drain of generation 1.
    let mut drained = None;
    while drained.is_none() {
        let event = tokio::time::timeout(Duration::from_secs(5), watch.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Some(pb::node_event::Event::GenerationDrained(d)) = event.event {
            drained = Some(d);
        }
    }
    let drained = drained.unwrap();
    assert_eq!((drained.generation, drained.closed_at_timeout), (1, 1));
    assert!(node.get_config().await.draining.is_empty());
}

#[tokio::test]
async fn two_hundred_reloads_leak_no_descriptors_threads_or_generations() {
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    let listen = free_addr().to_string();
    let one = config(&listen, "u", &upstream("u", &[&a], "round_robin"), "");
    let two = config(
        &listen,
        "u",
        &upstream("u", &[&b], "least_conn"),
        "[[listener.route]]\npath = \"/x/\"\nupstream = \"u\"\n",
    );
    let node = Node::start(&one);
    let web = node.listener("web").await;
    let client = http1_client();
    for config in [&two, &one] {
        node.reload(config).await.unwrap();
        get(&client, web, None, "/").await;
    }
    drop(client);
    node.wait_drained(Duration::from_secs(10)).await;
    let (fds, threads, tasks) = (
        node.fd_count(),
        node.threads(),
        node.get_config().await.runtime_tasks,
    );
    for i in 0..200 {
        node.reload(if i % 2 == 0 { &two } else { &one })
            .await
            .unwrap();
        if i % 20 == 0 {
            let client = http1_client();
            assert_eq!(get(&client, web, None, "/").await.status, StatusCode::OK);
        }
    }
    node.wait_drained(Duration::from_secs(10)).await;
    let config = node.get_config().await;
    assert_eq!(config.config.unwrap().generation, 203);
    assert!(
        node.fd_count() <= fds + 4,
        "fds {fds} before, {} after 200 reloads",
        node.fd_count()
    );
    assert!(
        node.threads() <= threads + 2,
        "threads {threads} before, {} after",
        node.threads()
    );
    assert!(tasks > 0, "runtime_tasks counts the accept loops at least");
    let tasks_after = config.runtime_tasks;
    assert!(
        tasks_after <= tasks + 4,
        "tasks {tasks} before, {tasks_after} after 200 reloads"
    );
}

/// `[node] workers = 3`: every listener is three sockets on one port (a
/// SO_REUSEPORT group, one per worker thread), and a reload keeps those
/// very sockets: a closed member of the group would drop the connections
/// waiting in its accept queue.
#[tokio::test]
async fn each_worker_listens_on_its_own_socket_and_reloads_keep_them() {
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    let listen = free_addr().to_string();
    let with_workers = |origin: &Origin| {
        config(&listen, "u", &upstream("u", &[origin], "round_robin"), "")
            .replace("[node]\n", "[node]\nworkers = 3\n")
    };
    let node = Node::start(&with_workers(&a));
    let web = node.listener("web").await;
    let sockets = node.listening_sockets(web.port());
    assert_eq!(sockets.len(), 3, "one listening socket per worker");
    node.reload(&with_workers(&b)).await.unwrap();
    assert_eq!(
        node.listening_sockets(web.port()),
        sockets,
        "the reload kept the same sockets"
    );
    // Fresh connections land on all three sockets; every one is served.
    for _ in 0..30 {
        let client = http1_client();
        let answer = get(&client, web, None, "/").await;
        assert_eq!(
            (answer.status, answer.text().as_str()),
            (StatusCode::OK, "b")
        );
    }
    // Connections held open on whichever workers took them are counted
    // once, summed over the workers.
    let mut held = Vec::new();
    for _ in 0..24 {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(web).await.unwrap();
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        while !answer.ends_with(b"\r\n\r\nb") {
            let mut buf = [0u8; 512];
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the answer");
            answer.extend_from_slice(&buf[..n]);
        }
        held.push(stream);
    }
    // (The 30 connections above close as their clients went away.)
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let open = node
            .get_config()
            .await
            .listeners
            .into_iter()
            .find(|l| l.name == "web")
            .unwrap()
            .open_connections;
        if open == 24 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{open} open connections, 24 held"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(held);
}

#[tokio::test]
async fn sighup_rereads_the_file_and_a_bad_file_keeps_the_config_in_force() {
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    let listen = free_addr().to_string();
    let node = Node::start(&config(
        &listen,
        "u",
        &upstream("u", &[&a], "round_robin"),
        "",
    ));
    let web = node.listener("web").await;
    let client = http1_client();
    assert_eq!(get(&client, web, None, "/").await.text(), "a");

    node.write_config(&config(
        &listen,
        "u",
        &upstream("u", &[&b], "round_robin"),
        "",
    ));
    node.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    while node.get_config().await.config.unwrap().generation != 2 {
        assert!(Instant::now() < deadline, "SIGHUP should apply the file");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A new connection gets the new config (one already open finishes its
    // next request on the old one, then is closed).
    let client = http1_client();
    assert_eq!(get(&client, web, None, "/").await.text(), "b");
    let info = node.get_config().await.config.unwrap();
    assert_eq!(info.source, pb::ConfigSource::File as i32);
    assert!(info.version.starts_with("sha256:"));

    node.write_config("[[listener]]\nname = 1\n");
    node.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !node.log().contains("config refused") {
        assert!(Instant::now() < deadline, "{}", node.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(node.get_config().await.config.unwrap().generation, 2);
    assert_eq!(get(&client, web, None, "/").await.text(), "b");
    assert!(node.log().contains("config refused"), "{}", node.log());
}

#[tokio::test]
async fn sigterm_finishes_in_flight_requests_then_exits_zero() {
    let origin = Origin::start("o").await;
    let mut node = Node::start(&config(
        "127.0.0.1:0",
        "u",
        &upstream("u", &[&origin], "round_robin"),
        "",
    ));
    let web = node.listener("web").await;
    let slow = tokio::spawn(async move { get(&strict_client(), web, None, "/slow/700").await });
    while origin.requests() == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    node.signal(libc::SIGTERM);
    let answer = slow.await.unwrap();
    assert_eq!(
        (answer.status, answer.text().as_str()),
        (StatusCode::OK, "o")
    );
    assert_eq!(node.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(
        tokio::net::TcpStream::connect(web).await.is_err(),
        "no longer accepting"
    );
}

#[tokio::test]
async fn old_connections_are_told_to_close_and_idle_ones_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let origin = Origin::start("o").await;
    let listen = free_addr().to_string();
    let first = config(&listen, "u", &upstream("u", &[&origin], "round_robin"), "");
    let node = Node::start(&first);
    let web = node.listener("web").await;

    // An HTTP/1.1 request in flight across the switch: its response says
    // `Connection: close`, and the connection then closes.
    let mut busy = tokio::net::TcpStream::connect(web).await.unwrap();
    busy.write_all(b"GET /slow/600 HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // An idle keep-alive connection that already served a request.
    let mut idle = tokio::net::TcpStream::connect(web).await.unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = idle.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // An HTTP/2 connection, idle at the switch.
    let h2 = tokio::net::TcpStream::connect(web).await.unwrap();
    let (mut h2_sender, h2_conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(h2),
    )
    .await
    .unwrap();
    let h2_done = tokio::spawn(h2_conn);
    let request = Request::get(format!("http://{web}/"))
        .body(http_body_util::Empty::<Bytes>::new())
        .unwrap();
    assert_eq!(
        h2_sender.send_request(request).await.unwrap().status(),
        StatusCode::OK
    );

    tokio::time::sleep(Duration::from_millis(100)).await;
    node.reload(&config(
        &listen,
        "u",
        &upstream("u", &[&origin], "least_conn"),
        "",
    ))
    .await
    .unwrap();

    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), busy.read_to_end(&mut answer))
        .await
        .unwrap()
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).to_lowercase();
    assert!(
        answer.starts_with("http/1.1 200") && answer.contains("connection: close"),
        "{answer}"
    );

    // Idle connections of the old generation are closed after the grace period.
    let closed = tokio::time::timeout(Duration::from_secs(3), idle.read(&mut buf))
        .await
        .unwrap();
    assert!(
        matches!(closed, Ok(0) | Err(_)),
        "the idle HTTP/1 connection is closed"
    );
    let h2_closed = tokio::time::timeout(Duration::from_secs(3), h2_done).await;
    assert!(
        h2_closed.is_ok(),
        "the HTTP/2 connection is sent GOAWAY and ends"
    );
}
