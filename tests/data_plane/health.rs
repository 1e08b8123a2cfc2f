//! Active and passive health checks against real upstream servers that are
//! stopped, broken and restarted mid-test.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::support::*;
use http::StatusCode;
use tether::proto::v1::{self as pb, node_event::Event};

fn config(upstreams: &str) -> String {
    format!("[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n[[listener.route]]\nupstream = \"u\"\n{upstreams}")
}

fn servers(origins: &[&Origin]) -> String {
    let list: Vec<String> = origins
        .iter()
        .map(|o| format!("{{ addr = \"{}\" }}", o.addr))
        .collect();
    format!("[{}]", list.join(", "))
}

const FAST_CHECK: &str = "[upstream.u.health]\ntype = \"http\"\npath = \"/healthz\"\ninterval = \"100ms\"\ntimeout = \"80ms\"\nrise = 2\nfall = 2\njitter = \"0ms\"\n";

/// Polls until the server's health is `state`; answers how long it took.
async fn wait_for(
    node: &impl ControlClient,
    upstream: &str,
    addr: SocketAddr,
    state: pb::HealthState,
    within: Duration,
) -> Duration {
    node.wait_health(upstream, &addr.to_string(), state, within)
        .await
}

#[tokio::test]
async fn a_dead_server_stops_taking_traffic_and_comes_back_after_rise_checks() {
    let (a, b, c) = (
        Origin::start("a").await,
        Origin::start("b").await,
        Origin::start("c").await,
    );
    let node = LocalNode::start(&config(&format!(
        "[upstream.u]\nservers = {}\n{FAST_CHECK}",
        servers(&[&a, &b, &c])
    )))
    .await;
    let web = node.listener("web").await;
    for origin in [&a, &b, &c] {
        wait_for(
            &node,
            "u",
            origin.addr,
            pb::HealthState::Healthy,
            Duration::from_secs(5),
        )
        .await;
    }
    let b_addr = b.addr;
    b.stop();
    drop(b);
    // interval × fall + timeout = 280 ms; allow scheduling slack.
    let took = wait_for(
        &node,
        "u",
        b_addr,
        pb::HealthState::Unhealthy,
        Duration::from_secs(3),
    )
    .await;
    assert!(took < Duration::from_secs(2), "took {took:?}");
    let client = http1_client();
    for _ in 0..30 {
        let answer = get(&client, web, None, "/").await;
        assert_eq!(answer.status, StatusCode::OK);
        assert_ne!(answer.text(), "b");
    }
    // Back on the same address: healthy after `rise` passing checks.
    let b = Origin::start_on(b_addr, "b").await;
    wait_for(
        &node,
        "u",
        b_addr,
        pb::HealthState::Healthy,
        Duration::from_secs(3),
    )
    .await;
    let before = b.traffic();
    for _ in 0..30 {
        get(&client, web, None, "/").await;
    }
    assert!(
        b.traffic() - before >= 5,
        "a recovered server takes traffic again"
    );
}

#[tokio::test]
async fn wrong_status_wrong_body_and_a_hung_server_are_all_down() {
    let origin = Origin::start("o").await;
    let check = |extra: &str| {
        format!(
            "[upstream.u]\nservers = {}\n[upstream.u.health]\ntype = \"http\"\ninterval = \"100ms\"\ntimeout = \"80ms\"\nfall = 1\njitter = \"0ms\"\n{extra}",
            servers(&[&origin])
        )
    };
    for (extra, case) in [
        ("path = \"/status/500\"\n", "500"),
        (
            "path = \"/healthz\"\nexpect_body = \"all good\"\n",
            "wrong body",
        ),
        ("path = \"/hang\"\n", "no answer"),
        (
            "path = \"/status/204\"\nexpect_status = [\"200\"]\n",
            "unexpected 204",
        ),
    ] {
        let node = LocalNode::start(&config(&check(extra))).await;
        wait_for(
            &node,
            "u",
            origin.addr,
            pb::HealthState::Unhealthy,
            Duration::from_secs(3),
        )
        .await;
        let web = node.listener("web").await;
        let started = Instant::now();
        let answer = get(&http1_client(), web, None, "/").await;
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE, "{case}");
        assert!(
            answer
                .text()
                .contains("no server of upstream \"u\" is available"),
            "{case}: {}",
            answer.text()
        );
        assert!(
            started.elapsed() < Duration::from_millis(500),
            "{case}: all-down answers at once"
        );
    }
    // The same body check passes when the body matches.
    let node = LocalNode::start(&config(&check(
        "path = \"/healthz\"\nexpect_body = \"o\"\nexpect_status = [\"2xx\"]\n",
    )))
    .await;
    wait_for(
        &node,
        "u",
        origin.addr,
        pb::HealthState::Healthy,
        Duration::from_secs(3),
    )
    .await;
}

#[tokio::test]
async fn tcp_checks_and_try_all() {
    let origin = Origin::start("o").await;
    let closed = free_addr();
    let upstreams = format!(
        "[upstream.u]\nservers = [{{ addr = \"{}\" }}, {{ addr = \"{closed}\" }}]\nall_down = \"try_all\"\n[upstream.u.health]\ntype = \"tcp\"\ninterval = \"100ms\"\ntimeout = \"80ms\"\nfall = 1\njitter = \"0ms\"\n",
        origin.addr
    );
    let node = LocalNode::start(&config(&upstreams)).await;
    wait_for(
        &node,
        "u",
        origin.addr,
        pb::HealthState::Healthy,
        Duration::from_secs(3),
    )
    .await;
    wait_for(
        &node,
        "u",
        closed,
        pb::HealthState::Unhealthy,
        Duration::from_secs(3),
    )
    .await;
    // With every server down, try_all still tries them.
    origin.stop();
    wait_for(
        &node,
        "u",
        origin.addr,
        pb::HealthState::Unhealthy,
        Duration::from_secs(3),
    )
    .await;
    let answer = get(&http1_client(), node.listener("web").await, None, "/").await;
    assert_eq!(
        answer.status,
        StatusCode::BAD_GATEWAY,
        "try_all tries the servers and reports their failure"
    );
}

#[tokio::test]
async fn passive_checks_eject_a_failing_server_and_let_it_back_after_the_period() {
    let (good, bad) = (Origin::start("good").await, Origin::start("bad").await);
    let upstreams = format!(
        "[upstream.u]\nservers = {}\n[upstream.u.passive]\nconsecutive_failures = 3\nejection = \"700ms\"\nmax_ejected_percent = 50\n",
        servers(&[&good, &bad])
    );
    let node = LocalNode::start(&config(&upstreams)).await;
    let web = node.listener("web").await;
    let mut watch = node.watch_health().await;
    watch.message().await.unwrap();
    bad.set_failing(true);
    let client = http1_client();
    let mut failures = 0;
    for _ in 0..20 {
        if get(&client, web, None, "/").await.status == StatusCode::BAD_GATEWAY {
            failures += 1;
        }
    }
    assert_eq!(
        failures, 3,
        "exactly `consecutive_failures` requests reach the bad server before it is ejected"
    );
    assert_eq!(
        node.server_health("u", &bad.addr.to_string()).await,
        pb::HealthState::Unhealthy
    );
    let event = tokio::time::timeout(Duration::from_secs(2), watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let Some(Event::Transition(t)) = event.event else {
        panic!("{event:?}")
    };
    assert_eq!(
        (t.server.as_str(), t.to),
        (
            bad.addr.to_string().as_str(),
            pb::HealthState::Unhealthy as i32
        )
    );
    assert!(
        t.reason.contains("3 consecutive failed requests"),
        "{}",
        t.reason
    );

    // Fixed, and back once the ejection period ends.
    bad.set_failing(false);
    let before = bad.traffic();
    let deadline = Instant::now() + Duration::from_secs(5);
    while bad.traffic() == before {
        assert!(
            Instant::now() < deadline,
            "the server is used again once the ejection ends"
        );
        assert_eq!(get(&client, web, None, "/").await.status, StatusCode::OK);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_failed_connect_is_retried_on_another_server() {
    let good = Origin::start("good").await;
    let closed = free_addr();
    let node = LocalNode::start(&config(&format!(
        "[upstream.u]\nservers = [{{ addr = \"{closed}\" }}, {{ addr = \"{}\" }}]\nretries = 1\n",
        good.addr
    )))
    .await;
    let web = node.listener("web").await;
    let client = http1_client();
    for _ in 0..10 {
        assert_eq!(
            get(&client, web, None, "/").await.text(),
            "good",
            "GETs never see the dead server"
        );
    }
    // A request with a body is never sent twice.
    let mut posts_failed = 0;
    for _ in 0..10 {
        let request = http::Request::post(format!("http://{web}/upload"))
            .body(http_body_util::Full::new(bytes::Bytes::from_static(
                b"data",
            )))
            .unwrap();
        let response = client.request(request).await.unwrap();
        if response.status() == StatusCode::BAD_GATEWAY {
            posts_failed += 1;
        }
    }
    assert_eq!(
        posts_failed, 5,
        "round robin sends half of the POSTs to the dead server, and they fail"
    );
}

/// Four workers too: checks run once per (server, check), not per worker.
#[tokio::test]
async fn health_state_survives_a_reload_and_shared_servers_get_one_checker() {
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    let two_upstreams = |extra_route: &str| {
        format!(
            "[node]\nworkers = 4\n[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n{extra_route}[[listener.route]]\nupstream = \"u\"\n[[listener.route]]\npath = \"/v/\"\nupstream = \"v\"\n[upstream.u]\nservers = {s}\n{FAST_CHECK}[upstream.v]\nservers = {s}\nbalance = \"least_conn\"\n{}",
            FAST_CHECK.replace("upstream.u", "upstream.v"),
            s = servers(&[&a, &b])
        )
    };
    let node = LocalNode::start(&two_upstreams("")).await;
    wait_for(
        &node,
        "u",
        a.addr,
        pb::HealthState::Healthy,
        Duration::from_secs(3),
    )
    .await;
    b.set_failing(true);
    wait_for(
        &node,
        "u",
        b.addr,
        pb::HealthState::Unhealthy,
        Duration::from_secs(3),
    )
    .await;
    wait_for(
        &node,
        "v",
        b.addr,
        pb::HealthState::Unhealthy,
        Duration::from_secs(3),
    )
    .await;

    // One checker per (address, check): two upstreams, one probe stream.
    let before = a.probes();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let probes = a.probes() - before;
    assert!(
        (6..=13).contains(&probes),
        "{probes} probes in 1 s at a 100 ms interval: one checker, not one per upstream or worker"
    );

    // A reload that changes routes keeps the state: no reset to unknown.
    node.reload(&two_upstreams(
        "[[listener.route]]\npath = \"/new/\"\nupstream = \"v\"\n",
    ))
    .await
    .unwrap();
    assert_eq!(
        node.server_health("u", &b.addr.to_string()).await,
        pb::HealthState::Unhealthy
    );
    assert_eq!(
        node.server_health("u", &a.addr.to_string()).await,
        pb::HealthState::Healthy
    );
    let web = node.listener("web").await;
    for _ in 0..10 {
        assert_eq!(get(&http1_client(), web, None, "/").await.text(), "a");
    }
}

#[tokio::test]
async fn watch_health_streams_a_transition_when_a_server_stops() {
    let (a, b) = (Origin::start("a").await, Origin::start("b").await);
    let node = LocalNode::start(&config(&format!(
        "[upstream.u]\nservers = {}\n{FAST_CHECK}",
        servers(&[&a, &b])
    )))
    .await;
    wait_for(
        &node,
        "u",
        b.addr,
        pb::HealthState::Healthy,
        Duration::from_secs(3),
    )
    .await;
    let mut watch = node.watch_health().await;
    let Some(Event::Snapshot(snapshot)) = watch.message().await.unwrap().unwrap().event else {
        panic!("snapshot first")
    };
    assert!(snapshot.upstreams[0]
        .servers
        .iter()
        .all(|s| s.health == pb::HealthState::Healthy as i32));
    let b_addr = b.addr;
    b.stop();
    let transition = loop {
        let event = tokio::time::timeout(Duration::from_secs(3), watch.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Some(Event::Transition(t)) = event.event {
            break t;
        }
    };
    assert_eq!(transition.upstream, "u");
    assert_eq!(transition.server, b_addr.to_string());
    assert_eq!(
        (transition.from, transition.to),
        (
            pb::HealthState::Healthy as i32,
            pb::HealthState::Unhealthy as i32
        )
    );
    assert!(
        transition.reason.contains("consecutive failed checks"),
        "{}",
        transition.reason
    );
}
