//! Controller replicas on a real 3-member etcd cluster: one history seen
//! by every replica, nodes that fail over to another replica without
//! re-applying anything, publishes from several replicas at once.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tether::proto::v1::{self as pb};

use crate::support::*;

/// A node config naming every replica, `first` first.
fn node_on_replicas(id: &str, replicas: &[&Controller], first: usize) -> String {
    let urls: Vec<String> = (0..replicas.len())
        .map(|i| format!("\"{}\"", replicas[(first + i) % replicas.len()].url()))
        .collect();
    node_config(id, &replicas[0].url(), r#"env = "prod""#).replace(
        &format!("url = \"{}\"", replicas[0].url()),
        &format!("url = [{}]", urls.join(", ")),
    )
}

/// (number, comment) of every version, as `replica` lists them.
async fn history(replica: &Controller) -> Vec<(u64, String)> {
    replica
        .versions()
        .await
        .into_iter()
        .map(|v| (v.version, v.comment))
        .collect()
}

async fn publish_on(replica: &Controller, config: &str, comment: &str) -> u64 {
    replica
        .fleet()
        .await
        .publish_config(pb::PublishConfigRequest {
            config: config.to_owned(),
            comment: comment.to_owned(),
            ..Default::default()
        })
        .await
        .expect("publish")
        .into_inner()
        .version
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_share_one_history_and_nodes_fail_over_without_reapplying() {
    let Some(binary) = etcd() else { return };
    let cluster = EtcdCluster::start(binary, 3).await;
    let store = cluster.url("fleet");
    let mut replicas: Vec<Controller> = (0..3)
        .map(|i| Controller::start_replica(&store, &format!("r{i}"), &[]))
        .collect();
    let origin = Origin::start("app").await;
    let ids: Vec<String> = (0..6).map(|i| format!("n{i}")).collect();
    let _nodes: Vec<Node> = {
        let all: Vec<&Controller> = replicas.iter().collect();
        ids.iter()
            .enumerate()
            .map(|(i, id)| Node::start(&node_on_replicas(id, &all, i % 3)))
            .collect()
    };
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    // Every replica sees every node, whichever holds its stream.
    for replica in &replicas {
        wait_connected(replica, &ids).await;
    }

    // v1, v2, v3 from three replicas: every node runs v3, and every
    // replica lists the same history. WatchFleet on r0 tells every node's
    // ACK, whichever replica holds its stream.
    let mut watch = replicas[0].watch().await;
    for (i, replica) in replicas.iter().enumerate() {
        let listen = format!("127.0.0.{}:0", i + 1);
        let version = publish_on(replica, &traffic(&listen, &origin), &format!("from r{i}")).await;
        assert_eq!(version, i as u64 + 1);
    }
    for replica in &replicas {
        wait_acked(replica, &ids, 3).await;
    }
    let mut acked = std::collections::BTreeSet::new();
    let deadline = Instant::now() + WAIT;
    while acked.len() < ids.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = tokio::time::timeout(left, watch.message())
            .await
            .unwrap_or_else(|_| panic!("ACKs of v3 seen on r0: {acked:?}"))
            .unwrap()
            .unwrap();
        if let Some(pb::fleet_event::Event::Acked(ack)) = event.event {
            if ack.version == 3 {
                acked.insert(event.node_id);
            }
        }
    }
    let expected: Vec<(u64, String)> = (1..=3)
        .rev()
        .map(|v| (v, format!("from r{}", v - 1)))
        .collect();
    for replica in &replicas {
        assert_eq!(history(replica).await, expected);
    }

    // r1 dies without a word: the nodes it held (n1, n4) are back on
    // another replica within 3 s, still on generation they had (nothing
    // re-applied), and no version is lost.
    let generations: BTreeMap<String, u64> = replicas[0]
        .nodes()
        .await
        .into_iter()
        .map(|n| (n.id, n.generation))
        .collect();
    replicas[1].kill();
    let killed_at = Instant::now();
    let moved = ["n1", "n4"];
    // Each said Hello to r0 or r2.
    let survivors = [&replicas[0], &replicas[2]];
    let deadline = killed_at + Duration::from_secs(3);
    'held: loop {
        let mut held = 0;
        for replica in survivors {
            let log = replica.log();
            held += moved
                .iter()
                .filter(|id| log.contains(&format!("node connected node={id}")))
                .count();
        }
        if held >= moved.len() {
            break 'held;
        }
        assert!(
            Instant::now() < deadline,
            "n1, n4 did not reconnect within 3 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for replica in survivors {
        for node in replica.nodes().await {
            assert!(node.connected, "{node:?}");
            assert_eq!(node.version, 3, "{node:?}");
            assert_eq!(
                node.generation, generations[&node.id],
                "re-applied: {node:?}"
            );
        }
        assert_eq!(history(replica).await, expected);
    }

    // A replica started now holds no stream, and shows every node as
    // connected all the same, with the history.
    let late = Controller::start_replica(&store, "r3", &[]);
    let listed = late.nodes().await;
    assert_eq!(listed.len(), 6, "{listed:?}");
    for node in listed {
        assert!(node.connected && node.version == 3, "{node:?}");
    }
    assert_eq!(history(&late).await, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_publishing_at_once_get_distinct_numbers_in_one_order() {
    let Some(binary) = etcd() else { return };
    let cluster = EtcdCluster::start(binary, 3).await;
    let store = cluster.url("race");
    let a = Controller::start_replica(&store, "a", &[]);
    let b = Controller::start_replica(&store, "b", &[]);
    let config = "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n[[listener.route]]\nstatic = { root = \"site\" }\n";
    let publishes = |replica: &Controller, name: &'static str| {
        let url = replica.url();
        async move {
            let mut client = pb::fleet_service_client::FleetServiceClient::connect(url)
                .await
                .unwrap();
            let mut numbers = Vec::new();
            for i in 0..100 {
                let answer = client
                    .publish_config(pb::PublishConfigRequest {
                        config: config.to_owned(),
                        comment: format!("{name}-{i}"),
                        ..Default::default()
                    })
                    .await
                    .expect("publish");
                numbers.push(answer.into_inner().version);
            }
            numbers
        }
    };
    let (from_a, from_b) = tokio::join!(publishes(&a, "a"), publishes(&b, "b"));
    let mut all: Vec<u64> = from_a.iter().chain(&from_b).copied().collect();
    all.sort_unstable();
    all.dedup();
    assert_eq!(
        all,
        (1..=200).collect::<Vec<u64>>(),
        "a: {from_a:?}\nb: {from_b:?}"
    );
    // Both list the same 200, each under the number its publisher was told.
    let deadline = Instant::now() + WAIT;
    loop {
        let (on_a, on_b) = (history(&a).await, history(&b).await);
        if on_a.len() == 200 && on_a == on_b {
            for (number, comment) in &on_a {
                let (name, i) = comment.split_once('-').unwrap();
                let told = if name == "a" { &from_a } else { &from_b };
                assert_eq!(told[i.parse::<usize>().unwrap()], *number, "{comment}");
            }
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a: {} versions, b: {}",
            on_a.len(),
            on_b.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_etcd_publishes_are_unavailable_nodes_serve_and_all_recovers() {
    let Some(binary) = etcd() else { return };
    let mut cluster = EtcdCluster::start(binary, 3).await;
    let store = cluster.url("outage");
    let replica = Controller::start_replica(&store, "r0", &[]);
    let origin = Origin::start("app").await;
    let node = Node::start(&node_config("n0", &replica.url(), r#"env = "prod""#));
    wait_connected(&replica, &["n0"]).await;
    // One member down changes nothing: a quorum is left.
    cluster.kill(2);
    publish_on(&replica, &traffic("127.0.0.1:0", &origin), "v1").await;
    wait_acked(&replica, &["n0"], 1).await;

    for member in 0..2 {
        cluster.kill(member);
    }
    let refused = replica
        .fleet()
        .await
        .publish_config(pb::PublishConfigRequest {
            config: traffic("127.0.0.2:0", &origin),
            ..Default::default()
        })
        .await
        .expect_err("no etcd, no publish");
    assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused:?}");
    assert!(
        refused.message().contains("etcd unreachable"),
        "{refused:?}"
    );
    // The node serves what it runs, and its stream stays open.
    origin_answers(&node, &origin).await;
    assert!(replica.node("n0").await.unwrap().connected);

    cluster.restart_all().await;
    let deadline = Instant::now() + WAIT;
    let version = loop {
        let answer = replica
            .fleet()
            .await
            .publish_config(pb::PublishConfigRequest {
                config: traffic("127.0.0.2:0", &origin),
                comment: "after the outage".to_owned(),
                ..Default::default()
            })
            .await;
        match answer {
            Ok(answer) => break answer.into_inner().version,
            Err(status) if Instant::now() < deadline => {
                assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(status) => panic!("etcd is back, publishes are not: {status:?}"),
        }
    };
    assert_eq!(version, 2);
    wait_acked(&replica, &["n0"], 2).await;
}

/// The replica that logged last that it leads (`None`: none yet).
fn leader<'a>(replicas: &[&'a Controller]) -> Option<&'a Controller> {
    replicas.iter().copied().find(|r| {
        r.log()
            .lines()
            .rev()
            .find(|l| l.contains("leadership changed"))
            .is_some_and(|l| l.contains("leads=true"))
    })
}

/// Replicas r0 and r1 of `store`, and which of them leads.
async fn two_replicas(store: &str) -> (Vec<Controller>, usize) {
    let replicas: Vec<Controller> = (0..2)
        .map(|i| Controller::start_replica(store, &format!("r{i}"), &[]))
        .collect();
    let all: Vec<&Controller> = replicas.iter().collect();
    let leader = wait_leader(&all, Duration::from_secs(10)).await;
    let leading = all.iter().position(|r| std::ptr::eq(*r, leader)).unwrap();
    (replicas, leading)
}

async fn wait_leader<'a>(replicas: &[&'a Controller], within: Duration) -> &'a Controller {
    let deadline = Instant::now() + within;
    loop {
        if let Some(leader) = leader(replicas) {
            return leader;
        }
        assert!(Instant::now() < deadline, "no leader within {within:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_and_no_publish_is_lost() {
    let Some(binary) = etcd() else { return };
    let cluster = EtcdCluster::start(binary, 3).await;
    let store = cluster.url("burst");
    let mut replicas: Vec<Controller> = (0..3)
        .map(|i| Controller::start_replica(&store, &format!("r{i}"), &[]))
        .collect();
    let leading = {
        let all: Vec<&Controller> = replicas.iter().collect();
        let leader = wait_leader(&all, Duration::from_secs(10)).await;
        all.iter().position(|r| std::ptr::eq(*r, leader)).unwrap()
    };
    let follower = (leading + 1) % 3;

    // Publishes on the leader and a follower while the leader is killed:
    // every one answered as stored is listed once, under its number.
    let config = "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n[[listener.route]]\nstatic = { root = \"site\" }\n";
    let burst = |url: String, name: &'static str| async move {
        let mut stored = Vec::new();
        for i in 0..40 {
            let Ok(mut client) =
                pb::fleet_service_client::FleetServiceClient::connect(url.clone()).await
            else {
                break;
            };
            let answer = client
                .publish_config(pb::PublishConfigRequest {
                    config: config.to_owned(),
                    comment: format!("{name}-{i}"),
                    ..Default::default()
                })
                .await;
            match answer {
                Ok(answer) => stored.push((answer.into_inner().version, format!("{name}-{i}"))),
                Err(status) => {
                    eprintln!("{name}-{i}: {status:?}");
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        stored
    };
    let on_leader = tokio::spawn(burst(replicas[leading].url(), "leader"));
    let on_follower = tokio::spawn(burst(replicas[follower].url(), "follower"));
    tokio::time::sleep(Duration::from_millis(150)).await;
    replicas[leading].kill();
    // A new leader within the lease's TTL and 2 s, while the burst goes on.
    let survivors: Vec<&Controller> = replicas
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != leading)
        .map(|(_, r)| r)
        .collect();
    wait_leader(&survivors, Duration::from_secs(7)).await;
    let mut stored = on_follower.await.unwrap();
    assert_eq!(
        stored.len(),
        40,
        "the follower's publishes all stored: {stored:?}"
    );
    stored.extend(on_leader.await.unwrap());
    let listed = history(&replicas[follower]).await;
    let mut numbers: Vec<u64> = listed.iter().map(|(n, _)| *n).collect();
    numbers.dedup();
    assert_eq!(numbers.len(), listed.len(), "a number twice: {listed:?}");
    for (number, comment) in &stored {
        assert!(
            listed.contains(&(*number, comment.clone())),
            "v{number} ({comment}) was answered as stored and is not listed"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_paused_past_its_lease_cannot_write_when_it_wakes() {
    let Some(binary) = etcd() else { return };
    let cluster = EtcdCluster::start(binary, 3).await;
    let store = cluster.url("paused");
    let (replicas, leading) = two_replicas(&store).await;
    let (leader, other) = (&replicas[leading], &replicas[1 - leading]);
    let origin = Origin::start("app").await;
    let _nodes: Vec<Node> = ["n0", "n1"]
        .iter()
        .map(|id| Node::start(&node_on_replicas(id, &[other], 0)))
        .collect();
    wait_connected(other, &["n0", "n1"]).await;
    publish_on(other, &traffic("127.0.0.1:0", &origin), "v1").await;
    wait_acked(other, &["n0", "n1"], 1).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("v2.toml");
    std::fs::write(&file, traffic("127.0.0.2:0", &origin)).unwrap();
    let (code, _, err) = other
        .cli(&[
            "publish",
            file.to_str().unwrap(),
            "--waves",
            "1,100%",
            "--bake",
            "1h",
        ])
        .await;
    assert_eq!(code, Some(0), "{err}");

    // The leader stops past its lease; the other takes over and the
    // rollout is aborted there.
    leader.signal("-STOP");
    let deadline = Instant::now() + Duration::from_secs(12);
    while leader_of(other).is_none() {
        assert!(
            Instant::now() < deadline,
            "the other replica never led:\n{}",
            other.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (code, out, err) = other
        .cli(&["rollout", "abort", "2", "--reason", "while r0 slept"])
        .await;
    let (_, status, _) = other.cli(&["rollout", "status", "2"]).await;
    assert_eq!(code, Some(0), "{out}{err}{status}\n{}", other.log());
    leader.signal("-CONT");

    // Awake, it steps down, learns the abort, and what it wrote meanwhile
    // did not land: the rollout stays aborted everywhere.
    let deadline = Instant::now() + WAIT;
    loop {
        let steps_down = leader
            .log()
            .lines()
            .rev()
            .find(|l| l.contains("leadership changed"))
            .is_some_and(|l| l.contains("leads=false"));
        let (_, on_leader, _) = leader.cli(&["rollout", "status", "2"]).await;
        if steps_down && on_leader.starts_with("v2 rollout aborted") {
            break;
        }
        assert!(Instant::now() < deadline, "{on_leader}\n{}", leader.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    for replica in &replicas {
        let (_, status, _) = replica.cli(&["rollout", "status", "2"]).await;
        assert!(status.starts_with("v2 rollout aborted"), "{status}");
        assert!(status.contains("while r0 slept"), "{status}");
    }
    wait_acked(other, &["n0", "n1"], 1).await;
}

/// Whether `replica` logged last that it leads.
fn leader_of(replica: &Controller) -> Option<&Controller> {
    leader(&[replica])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_larger_than_etcd_takes_is_refused_with_the_limit() {
    let Some(binary) = etcd() else { return };
    let cluster = EtcdCluster::start(binary, 1).await;
    let replica = Controller::start_replica(&cluster.url("big"), "r0", &[]);
    let origin = Origin::start("app").await;
    // A valid config made large by a comment.
    let big = format!(
        "# {}\n{}",
        "x".repeat(2 << 20),
        traffic("127.0.0.1:0", &origin)
    );
    let refused = replica
        .fleet()
        .await
        .publish_config(pb::PublishConfigRequest {
            config: big,
            ..Default::default()
        })
        .await
        .expect_err("too large for etcd");
    assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("a store on etcd takes at most 1532 KiB"),
        "{refused:?}"
    );
    // Nothing was stored; the next publish is v1.
    assert_eq!(
        publish_on(&replica, &traffic("127.0.0.1:0", &origin), "small").await,
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_judges_the_error_rate_of_nodes_another_replica_holds() {
    let Some(binary) = etcd() else { return };
    let cluster = EtcdCluster::start(binary, 3).await;
    let store = cluster.url("answers");
    let (replicas, leading) = two_replicas(&store).await;
    let (leader, other) = (&replicas[leading], &replicas[1 - leading]);
    // The first wave's node streams to the replica that does not lead.
    let ids = ids(4);
    let targets: Vec<&str> = ids.iter().map(String::as_str).collect();
    let waves = waves_of(4, "1,100%");
    let first = waves.iter().find(|(_, w)| **w == 0).unwrap().0.as_str();
    let nodes: Vec<Node> = targets
        .iter()
        .map(|id| {
            let on: [&Controller; 2] = if *id == first {
                [other, leader]
            } else {
                [leader, other]
            };
            Node::start(&node_on_replicas(id, &on, 0))
        })
        .collect();
    wait_connected(leader, &targets).await;
    let app = Origin::start("app").await;
    let broken = Origin::start("api").await;
    broken.set_failing(true);
    publish_on(leader, &with_api(&app, None), "v1").await;
    wait_acked(leader, &targets, 1).await;
    let mut addrs = Vec::new();
    for node in &nodes {
        addrs.push(node.listener("web").await);
    }
    let asking = KeepAsking::start(addrs, "/api/items");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("v2.toml");
    std::fs::write(&file, with_api(&app, Some(&broken))).unwrap();
    let (code, out, err) = other
        .cli(&[
            "publish",
            file.to_str().unwrap(),
            "--waves",
            "1,100%",
            "--bake",
            "10s",
            "--wait",
        ])
        .await;
    asking.stop().await;
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains("error-rate gate: 5xx on ")
            && err.contains(&format!("from 1 node running v2 ({first} ")),
        "{err}"
    );
    wait_acked(leader, &targets, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_whose_watch_fell_behind_compaction_reads_the_store_again() {
    let Some(binary) = etcd() else { return };
    let mut cluster = EtcdCluster::start(binary, 3).await;
    let store = cluster.url("compacted");
    let a = Controller::start_replica(&store, "a", &[]);
    let b = Controller::start_replica(&store, "b", &[]);
    let config = |n: u64| {
        format!("# v{n}\n[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n[[listener.route]]\nstatic = {{ root = \"site\" }}\n")
    };
    publish_on(&a, &config(1), "v1").await;
    let deadline = Instant::now() + WAIT;
    while history(&b).await.is_empty() {
        assert!(Instant::now() < deadline, "b never saw v1");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // b sleeps; its watch's connection dies with whichever member held it
    // (each is restarted in turn); versions are published and the history
    // compacted past b's watch.
    b.signal("-STOP");
    for member in 0..3 {
        cluster.restart(member).await;
    }
    for n in 2..=4 {
        publish_on(&a, &config(n), &format!("v{n}")).await;
    }
    let mut etcd = etcd_client::Client::connect([cluster.endpoint(0)], None)
        .await
        .unwrap();
    let now = etcd.get("/compacted/store_id", None).await.unwrap();
    let revision = now.header().unwrap().revision();
    etcd.compact(revision, None).await.unwrap();
    b.signal("-CONT");

    // Awake, b's watch resumes from a compacted revision: it reads the
    // store again and lists every version.
    let deadline = Instant::now() + WAIT;
    loop {
        let listed = history(&b).await;
        if listed.len() == 4 {
            assert_eq!(listed, history(&a).await);
            break;
        }
        assert!(Instant::now() < deadline, "b lists {listed:?}\n{}", b.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        b.log().contains("fell behind the compacted history"),
        "b did not take the reload path:\n{}",
        b.log()
    );
}
