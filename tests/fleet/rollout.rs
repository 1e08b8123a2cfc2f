//! Staged rollouts with real nodes: waves released one after another, a
//! health gate and a NACK that withdraw the version, abort, and a
//! controller killed mid-bake that carries on.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

use tether::controller::rollout::{parse_waves, StoredRollout};
use tether::proto::v1::fleet_event::Event;

use crate::support::*;

/// `count` nodes n0…, connected and running v1 (`config`).
async fn fleet_on_v1(controller: &Controller, count: usize, config: &str) -> Vec<Node> {
    let ids = ids(count);
    let nodes: Vec<(&str, &str)> = ids
        .iter()
        .map(|id| (id.as_str(), r#"env = "prod""#))
        .collect();
    labelled_fleet_on_v1(controller, &nodes, config).await
}

/// Nodes (id, labels), connected and running v1 (`config`).
async fn labelled_fleet_on_v1(
    controller: &Controller,
    nodes: &[(&str, &str)],
    config: &str,
) -> Vec<Node> {
    let url = controller.url();
    let started: Vec<Node> = nodes
        .iter()
        .map(|(id, labels)| Node::start(&node_config(id, &url, labels)))
        .collect();
    let ids: Vec<&str> = nodes.iter().map(|(id, _)| *id).collect();
    wait_connected(controller, &ids).await;
    controller.publish(config, "").await.unwrap();
    wait_acked(controller, &ids, 1).await;
    started
}

fn write(dir: &tempfile::TempDir, name: &str, text: &str) -> String {
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

/// The ACKs of `version` seen on a WatchFleet stream until `count` came
/// or `within` passed: node id → when the controller received it.
async fn acks(
    watch: &mut tonic::Streaming<tether::proto::v1::FleetEvent>,
    version: u64,
    count: usize,
    within: Duration,
) -> BTreeMap<String, SystemTime> {
    let mut seen = BTreeMap::new();
    let deadline = Instant::now() + within;
    while seen.len() < count {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(Ok(Some(event))) = tokio::time::timeout(left, watch.message()).await else {
            break;
        };
        if let Some(Event::Acked(ack)) = &event.event {
            if ack.version == version {
                let at = SystemTime::try_from(event.at.unwrap()).unwrap();
                seen.entry(event.node_id.clone()).or_insert(at);
            }
        }
    }
    seen
}

/// A traffic config whose upstream has TCP health checks on `servers`.
fn checked(servers: &[String]) -> String {
    let servers: Vec<String> = servers
        .iter()
        .map(|s| format!("{{ addr = \"{s}\" }}"))
        .collect();
    format!(
        "[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n[[listener.route]]\npath = \"/\"\nupstream = \"app\"\n\
         [upstream.app]\nservers = [{}]\n\
         [upstream.app.health]\ntype = \"tcp\"\ninterval = \"100ms\"\ntimeout = \"100ms\"\nrise = 1\nfall = 1\n",
        servers.join(", ")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_good_config_reaches_the_nodes_wave_by_wave() {
    let data = tempfile::tempdir().unwrap();
    let controller = Controller::start(data.path(), &[]);
    let origin = Origin::start("app").await;
    let v1 = checked(&[origin.addr.to_string()]);
    let _nodes = fleet_on_v1(&controller, 10, &v1).await;
    let mut watch = controller.watch().await;
    let mut rollout_events = controller.watch().await;

    let dir = tempfile::tempdir().unwrap();
    let file = write(&dir, "v2.toml", &format!("# v2\n{v1}"));
    let started = Instant::now();
    let (code, out, err) = controller
        .cli(&[
            "publish",
            &file,
            "--waves",
            "1,30%,100%",
            "--bake",
            "2s",
            "--wait",
        ])
        .await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("v2 rollout completed: wave 3 of 3 released; wave 1 1/1, wave 2 2/2, wave 3 7/7 running"), "{out}");
    // Two bakes of 2 s at least.
    assert!(started.elapsed() >= Duration::from_secs(4), "{out}");

    let acked = acks(&mut watch, 2, 10, Duration::from_secs(5)).await;
    assert_eq!(acked.len(), 10, "{acked:?}");
    // WatchFleet told each move: a wave baking, the next released, done.
    let mut moves = Vec::new();
    while moves.last().map(|(_, state, _)| state) != Some(&"completed".to_owned()) {
        let event = tokio::time::timeout(Duration::from_secs(5), rollout_events.message())
            .await
            .expect("rollout events")
            .unwrap()
            .unwrap();
        if let Some(Event::Rollout(changed)) = event.event {
            let status = changed.status.unwrap();
            moves.push((status.released, status.state, status.baking_since.is_some()));
        }
    }
    let moves: Vec<(u32, &str, bool)> =
        moves.iter().map(|(w, s, b)| (*w, s.as_str(), *b)).collect();
    assert_eq!(
        moves,
        [
            (1, "running", true),
            (2, "running", false),
            (2, "running", true),
            (3, "running", false),
            (3, "running", true),
            (3, "completed", true)
        ]
    );
    let waves = waves_of(10, "1,30%,100%");
    for later in 1..3 {
        let last_before = waves
            .iter()
            .filter(|(_, w)| **w == later - 1)
            .map(|(id, _)| acked[id])
            .max()
            .unwrap();
        for (id, _) in waves.iter().filter(|(_, w)| **w == later) {
            let gap = acked[id].duration_since(last_before).unwrap_or_default();
            assert!(
                gap >= Duration::from_millis(1900),
                "{id} (wave {}) ACKed {gap:?} after wave {} finished",
                later + 1,
                later
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_server_fails_the_health_gate_and_the_first_wave_goes_back() {
    let data = tempfile::tempdir().unwrap();
    let controller = Controller::start(data.path(), &[]);
    let origin = Origin::start("app").await;
    let nodes = fleet_on_v1(&controller, 10, &checked(&[origin.addr.to_string()])).await;
    let mut watch = controller.watch().await;

    // Valid, so no NACK: only the health checks can tell.
    let dead = free_addr().to_string();
    let dir = tempfile::tempdir().unwrap();
    let file = write(&dir, "v2.toml", &checked(std::slice::from_ref(&dead)));
    let (code, out, err) = controller
        .cli(&[
            "publish",
            &file,
            "--waves",
            "1,30%,100%",
            "--bake",
            "5s",
            "--wait",
        ])
        .await;
    assert_eq!(code, Some(1), "{out}{err}");
    let gate = format!("health gate: app/{dead} down on 1 of 1 nodes running v2");
    assert!(
        err.contains("v2 rollout failed") && err.contains(&gate),
        "{err}"
    );

    // The first wave's node is back on v1, serving it; no other node ever
    // ran v2.
    let waves = waves_of(10, "1,30%,100%");
    let first = waves.iter().find(|(_, w)| **w == 0).unwrap().0.clone();
    wait_acked(&controller, &[&first], 1).await;
    let index: usize = first[1..].parse().unwrap();
    origin_answers(&nodes[index], &origin).await;
    let acked = acks(&mut watch, 2, 10, Duration::from_secs(1)).await;
    assert_eq!(
        acked.keys().collect::<Vec<_>>(),
        [&first],
        "only the first wave ran v2"
    );
    for node in controller.nodes().await {
        assert_eq!(node.version, 1, "{node:?}");
        assert_eq!(node.desired_version, 1, "{node:?}");
    }
    let (code, out, _) = controller.cli(&["rollout", "status"]).await;
    assert_eq!(code, Some(0));
    assert!(
        out.starts_with("v2 rollout failed: wave 1 of 3 released"),
        "{out}"
    );
    assert!(out.contains(&gate), "{out}");

    // Back on v1, the node no longer checks the dead server, and the
    // controller forgets it: the next rollout is not failed by it.
    let status = controller.node(&first).await.unwrap();
    assert!(status.down.is_empty(), "{status:?}");
    let v3 = format!("# v3\n{}", checked(&[origin.addr.to_string()]));
    let file = write(&dir, "v3.toml", &v3);
    let (code, out, err) = controller
        .cli(&[
            "publish",
            &file,
            "--waves",
            "1,30%,100%",
            "--bake",
            "200ms",
            "--wait",
        ])
        .await;
    assert_eq!(code, Some(0), "{out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_turning_to_5xx_fail_the_error_rate_gate_and_the_first_wave_goes_back() {
    let data = tempfile::tempdir().unwrap();
    let controller = Controller::start(data.path(), &[]);
    let app = Origin::start("app").await;
    let broken = Origin::start("api").await;
    broken.set_failing(true);
    let nodes = fleet_on_v1(&controller, 10, &with_api(&app, None)).await;
    let mut addrs = Vec::new();
    for node in &nodes {
        addrs.push(node.listener("web").await);
    }
    // Clients keep asking every node for /api/ until the rollout ends
    // (at most 30 s): a 200 from app on v1, a 502 from api on v2.
    let asking = KeepAsking::start(addrs, "/api/items");
    let mut watch = controller.watch().await;

    let dir = tempfile::tempdir().unwrap();
    let file = write(&dir, "v2.toml", &with_api(&app, Some(&broken)));
    let (code, out, err) = controller
        .cli(&[
            "publish",
            &file,
            "--waves",
            "1,30%,100%",
            "--bake",
            "10s",
            "--wait",
        ])
        .await;
    let statuses = asking.stop().await;
    assert_eq!(code, Some(1), "{out}{err}");
    let waves = waves_of(10, "1,30%,100%");
    let first = waves.iter().find(|(_, w)| **w == 0).unwrap().0.clone();
    // The new version's share: nearly all (an answer the old generation
    // was finishing may count under v2); the old one's: none.
    let share: f64 = err
        .split_once("v2 rollout failed: error-rate gate: 5xx on ")
        .and_then(|(_, rest)| rest.split_once('%'))
        .and_then(|(share, _)| share.parse().ok())
        .unwrap_or_else(|| panic!("{err}"));
    assert!(share >= 80.0, "{err}");
    assert!(
        err.contains(&format!("from 1 node running v2 ({first} "))
            && err.contains("), 0.0% of ")
            && err.contains("from 9 nodes still on the previous version (--max-5xx-increase 1%)"),
        "{err}"
    );
    assert!(statuses.get(&502).is_some_and(|n| *n >= 20), "{statuses:?}");

    // Only the first wave ever ran v2, and it is back on v1, answering
    // /api/ from app again.
    let acked = acks(&mut watch, 2, 10, Duration::from_secs(1)).await;
    assert_eq!(
        acked.keys().collect::<Vec<_>>(),
        [&first],
        "only the first wave ran v2"
    );
    wait_acked(&controller, &[&first], 1).await;
    let index: usize = first[1..].parse().unwrap();
    let answer = get(
        &http1_client(),
        nodes[index].listener("web").await,
        None,
        "/api/items",
    )
    .await;
    assert_eq!(answer.status, 200);
    assert_eq!(answer.header("x-origin"), Some("app"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nack_in_the_second_wave_withdraws_the_version_from_both_waves() {
    let data = tempfile::tempdir().unwrap();
    let controller = Controller::start(data.path(), &[]);
    let origin = Origin::start("app").await;
    let nodes = fleet_on_v1(&controller, 4, &traffic("127.0.0.1:0", &origin)).await;
    let waves = waves_of(4, "1,50%,100%");
    let in_wave = |wave: usize| -> Vec<String> {
        waves
            .iter()
            .filter(|(_, w)| **w == wave)
            .map(|(id, _)| id.clone())
            .collect()
    };
    let (first, second, third) = (in_wave(0), in_wave(1), in_wave(2));
    assert_eq!((first.len(), second.len(), third.len()), (1, 1, 2));
    // v2 listens on a Unix socket beside each node's config; on the second
    // wave's node something already listens there.
    let index: usize = second[0][1..].parse().unwrap();
    let _held = std::os::unix::net::UnixListener::bind(nodes[index].path("web.sock")).unwrap();
    let mut watch = controller.watch().await;

    let dir = tempfile::tempdir().unwrap();
    let file = write(&dir, "v2.toml", &traffic("unix:web.sock", &origin));
    let (code, out, err) = controller
        .cli(&[
            "publish",
            &file,
            "--waves",
            "1,50%,100%",
            "--bake",
            "500ms",
            "--wait",
        ])
        .await;
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        err.contains(&format!(
            "NACK gate: v2 NACKed by {} (cannot bind",
            second[0]
        )),
        "{err}"
    );
    let acked = acks(&mut watch, 2, 4, Duration::from_secs(1)).await;
    assert_eq!(
        acked.keys().cloned().collect::<Vec<_>>(),
        first,
        "{acked:?}"
    );
    let all = ids(4);
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    wait_acked(&controller, &all, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_carries_on_after_a_controller_restart_and_stops_when_aborted() {
    let data = tempfile::tempdir().unwrap();
    let mut controller = Controller::start(data.path(), &[]);
    let origin = Origin::start("app").await;
    let _nodes = fleet_on_v1(&controller, 4, &traffic("127.0.0.1:0", &origin)).await;
    let waves = waves_of(4, "1,100%");
    let first = waves.iter().find(|(_, w)| **w == 0).unwrap().0.clone();

    let dir = tempfile::tempdir().unwrap();
    let file = write(&dir, "v2.toml", &traffic("127.0.0.2:0", &origin));
    let (code, out, err) = controller
        .cli(&["publish", &file, "--waves", "1,100%", "--bake", "3s"])
        .await;
    assert_eq!(code, Some(0), "{out}{err}");
    wait_acked(&controller, &[&first], 2).await;
    let generation = controller.node(&first).await.unwrap().generation;

    // Killed mid-bake: the restarted controller resumes the rollout, and
    // the node that ran v2 is not pushed it again.
    controller.kill();
    controller.restart();
    let (code, out, err) = controller.cli(&["rollout", "status", "2", "--watch"]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("v2 rollout completed"), "{out}");
    let all = ids(4);
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    wait_acked(&controller, &all, 2).await;
    assert_eq!(
        controller.node(&first).await.unwrap().generation,
        generation
    );

    // Abort: the first wave goes back to v2, the rest never sees v3.
    let file = write(&dir, "v3.toml", &traffic("127.0.0.3:0", &origin));
    let (code, _, err) = controller
        .cli(&["publish", &file, "--waves", "1,100%", "--bake", "1h"])
        .await;
    assert_eq!(code, Some(0), "{err}");
    wait_acked(&controller, &[&first], 3).await;
    // Paused, nothing moves, not even a promote; resumed, it waits again.
    let (code, out, err) = controller.cli(&["rollout", "pause", "3"]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.starts_with("v3 rollout paused: wave 1 of 2"), "{out}");
    let (code, _, err) = controller.cli(&["rollout", "promote", "3"]).await;
    assert_eq!(code, Some(1));
    assert!(
        err.contains("the rollout of version 3 is paused; Promote needs it running"),
        "{err}"
    );
    let (code, out, err) = controller.cli(&["rollout", "resume", "3"]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.starts_with("v3 rollout running: wave 1 of 2"), "{out}");
    let (code, out, err) = controller
        .cli(&["rollout", "abort", "3", "--reason", "looks wrong"])
        .await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("v3 rollout aborted") && out.contains("aborted: looks wrong"),
        "{out}"
    );
    wait_acked(&controller, &all, 2).await;
    let (code, _, err) = controller.cli(&["rollout", "abort", "3"]).await;
    assert_eq!(code, Some(1));
    assert!(
        err.contains("the rollout of version 3 is aborted; Abort needs it running"),
        "{err}"
    );

    // Promote: each wave's long bake skipped, the rollout completes.
    let file = write(&dir, "v4.toml", &traffic("127.0.0.4:0", &origin));
    let (code, _, err) = controller
        .cli(&["publish", &file, "--waves", "1,100%", "--bake", "1h"])
        .await;
    assert_eq!(code, Some(0), "{err}");
    let deadline = Instant::now() + WAIT;
    let mut promoted = 0;
    loop {
        let (_, status, _) = controller.cli(&["rollout", "status", "4"]).await;
        if status.starts_with("v4 rollout completed") {
            break;
        }
        // Refused until the wave's nodes all run it and its bake started.
        let (code, _, _) = controller.cli(&["rollout", "promote", "4"]).await;
        promoted += usize::from(code == Some(0));
        assert!(Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(promoted >= 2, "a promote per wave: {promoted}");
    wait_acked(&controller, &all, 4).await;
}

/// A staged version and its rollout are one record: reopened from a log
/// that ends right after it, the version is still staged, never released
/// to every node at once.
#[tokio::test]
async fn a_staged_version_is_stored_with_its_rollout_in_one_record() {
    use tether::controller::store::{Damaged, Record, Store};
    let dir = tempfile::tempdir().unwrap();
    let (store, _) = Store::open(dir.path(), Damaged::Refuse).unwrap();
    let Record::Version(mut version) = stored_version(1, "# staged\n") else {
        unreachable!()
    };
    let plan = parse_waves(&["1,100%".to_owned()]).unwrap();
    let rollout = StoredRollout::start(1, &plan, Duration::ZERO, Duration::ZERO, &["a", "b"], 0);
    version.rollout = Some(rollout.clone());
    store
        .append_durable(Record::Version(version))
        .await
        .unwrap();
    drop(store);
    let (_, loaded) = Store::open(dir.path(), Damaged::Refuse).unwrap();
    assert_eq!(loaded.rollouts.get(&1), Some(&rollout));
}

/// `--waves-by region`: one region after another, each baked before the
/// next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waves_by_a_label_go_one_value_after_another() {
    let data = tempfile::tempdir().unwrap();
    let controller = Controller::start(data.path(), &[]);
    let origin = Origin::start("app").await;
    let (eu, us) = (r#"region = "eu""#, r#"region = "us""#);
    let regions = [("eu-1", eu), ("eu-2", eu), ("us-1", us), ("us-2", us)];
    let v1 = traffic("127.0.0.1:0", &origin);
    let _nodes = labelled_fleet_on_v1(&controller, &regions, &v1).await;
    let mut watch = controller.watch().await;

    let dir = tempfile::tempdir().unwrap();
    let file = write(&dir, "v2.toml", &traffic("127.0.0.2:0", &origin));
    let (code, out, err) = controller
        .cli(&[
            "publish",
            &file,
            "--waves-by",
            "region",
            "--bake",
            "1s",
            "--wait",
        ])
        .await;
    assert_eq!(code, Some(0), "{out}{err}");
    // eu, us, then the nodes without a region (none here).
    assert!(
        out.contains("v2 rollout completed: wave 3 of 3 released; wave 1 2/2, wave 2 2/2, wave 3 0/0 running"),
        "{out}"
    );
    let acked = acks(&mut watch, 2, 4, Duration::from_secs(5)).await;
    let last_eu = acked["eu-1"].max(acked["eu-2"]);
    for us in ["us-1", "us-2"] {
        let gap = acked[us].duration_since(last_eu).unwrap_or_default();
        assert!(
            gap >= Duration::from_millis(900),
            "{us} ACKed {gap:?} after eu"
        );
    }
    let (code, _, err) = controller
        .cli(&["publish", &file, "--waves", "1", "--waves-by", "region"])
        .await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cannot be used with"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_default_policy_stages_every_publish_unless_told_why_not() {
    let data = tempfile::tempdir().unwrap();
    let controller = Controller::start(
        data.path(),
        &["--default-waves", "1,100%", "--default-bake", "200ms"],
    );
    let origin = Origin::start("app").await;
    let _nodes = fleet_on_v1(&controller, 3, &traffic("127.0.0.1:0", &origin)).await;
    let dir = tempfile::tempdir().unwrap();

    // No plan given: the controller's.
    let file = write(&dir, "v2.toml", &traffic("127.0.0.2:0", &origin));
    let (code, out, err) = controller.cli(&["publish", &file, "--wait"]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("v2 rollout running: wave 1 of 2 released")
            && out.contains("v2 rollout completed: wave 2 of 2 released"),
        "{out}"
    );

    // At once, only with a reason, and the reason stays in the history.
    let file = write(&dir, "v3.toml", &traffic("127.0.0.3:0", &origin));
    let (code, _, err) = controller.cli(&["publish", &file, "--all-at-once"]).await;
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--reason"), "{err}");
    let (code, out, err) = controller
        .cli(&[
            "publish",
            &file,
            "--all-at-once",
            "--reason",
            "INC-42: certificate expires in an hour",
            "--wait",
        ])
        .await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(!out.contains("rollout"), "{out}");
    let all = ids(3);
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    wait_acked(&controller, &all, 3).await;
    // A rollback is never staged by default either.
    let (code, out, err) = controller.cli(&["rollback", "2"]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    wait_acked(&controller, &all, 4).await;

    let (code, out, _) = controller.cli(&["versions"]).await;
    assert_eq!(code, Some(0));
    let row = |v: &str| {
        out.lines()
            .find(|l| l.starts_with(v))
            .unwrap_or_else(|| panic!("{out}"))
            .to_owned()
    };
    assert!(row("v2 ").contains("completed"), "{out}");
    assert!(
        row("v3 ").contains("at once")
            && row("v3 ").ends_with("(at once: INC-42: certificate expires in an hour)"),
        "{out}"
    );
    assert!(
        row("v4 ").contains(" - ") && row("v4 ").ends_with("rollback to version 2"),
        "{out}"
    );
    let versions = controller.versions().await;
    let v3 = versions.iter().find(|v| v.version == 3).unwrap();
    assert_eq!(
        v3.all_at_once_reason,
        "INC-42: certificate expires in an hour"
    );
    assert!(v3.rollout.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_wait_draws_bars_on_a_terminal_and_lines_elsewhere() {
    let data = tempfile::tempdir().unwrap();
    let controller = Controller::start(data.path(), &[]);
    let origin = Origin::start("app").await;
    let _nodes = fleet_on_v1(&controller, 3, &traffic("127.0.0.1:0", &origin)).await;
    let dir = tempfile::tempdir().unwrap();

    // On a terminal: a bar per wave that fills as its nodes ACK, the bake
    // counting down, the outcome last.
    let file = write(&dir, "v2.toml", &traffic("127.0.0.2:0", &origin));
    let (code, screen) = controller
        .cli_on_terminal(&[
            "publish", &file, "--waves", "1,100%", "--bake", "2s", "--wait",
        ])
        .await;
    assert_eq!(code, Some(0), "{screen}");
    for drawn in [
        "wave 1 ",
        "wave 2 ",
        "baking, 2s left",
        "not released",
        "█",
        "\x1b[",
        "v2 rollout completed: wave 2 of 2 released; wave 1 1/1, wave 2 2/2 running",
    ] {
        assert!(screen.contains(drawn), "{drawn:?} not drawn in:\n{screen}");
    }
    let file = write(&dir, "v3.toml", &traffic("127.0.0.3:0", &origin));
    let (code, screen) = controller
        .cli_on_terminal(&["publish", &file, "--wait"])
        .await;
    assert_eq!(code, Some(0), "{screen}");
    assert!(
        screen.contains("█") && screen.contains("v3: 3 of 3 nodes ACKed"),
        "{screen}"
    );

    // Into a pipe: plain lines, no drawing.
    let file = write(&dir, "v4.toml", &traffic("127.0.0.4:0", &origin));
    let (code, out, err) = controller
        .cli(&[
            "publish", &file, "--waves", "1,100%", "--bake", "200ms", "--wait",
        ])
        .await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(!out.contains('\x1b') && !out.contains('█'), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("v4 rollout running: wave 1 of 2 released"))
            && out.lines().last()
                == Some(
                    "v4 rollout completed: wave 2 of 2 released; wave 1 1/1, wave 2 2/2 running"
                ),
        "{out}"
    );
    // --json: one object per line, on a terminal too.
    let file = write(&dir, "v5.toml", &traffic("127.0.0.5:0", &origin));
    let (code, screen) = controller
        .cli_on_terminal(&[
            "--json", "publish", &file, "--waves", "1,100%", "--bake", "200ms", "--wait",
        ])
        .await;
    assert_eq!(code, Some(0), "{screen}");
    let objects: Vec<serde_json::Value> = screen
        .lines()
        .map(|l| serde_json::from_str(l.trim()).unwrap_or_else(|e| panic!("{e}: {l:?}")))
        .collect();
    assert_eq!(objects.last().unwrap()["state"], "completed", "{screen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_wait_exits_2_when_the_controller_goes_away() {
    let data = tempfile::tempdir().unwrap();
    let mut controller = Controller::start(data.path(), &[]);
    let origin = Origin::start("app").await;
    let _nodes = fleet_on_v1(&controller, 2, &traffic("127.0.0.1:0", &origin)).await;
    let dir = tempfile::tempdir().unwrap();
    let file = write(&dir, "v2.toml", &traffic("127.0.0.2:0", &origin));
    let waiting = {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_tether"));
        command
            .args(["fleet", "--controller", &controller.url(), "publish"])
            .arg(&file)
            .args(["--waves", "1,100%", "--bake", "1h", "--wait"]);
        tokio::task::spawn_blocking(move || command.output().unwrap())
    };
    let versions = controller.versions().await;
    let deadline = Instant::now() + WAIT;
    let mut versions = versions.len();
    while versions < 2 {
        assert!(Instant::now() < deadline, "v2 never published");
        tokio::time::sleep(Duration::from_millis(50)).await;
        versions = controller.versions().await.len();
    }
    controller.kill();
    let output = tokio::time::timeout(WAIT, waiting)
        .await
        .expect("publish --wait ends")
        .unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{err}");
    assert!(err.contains("tether fleet: cannot reach"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newer_publish_supersedes_a_running_rollout_and_starts_from_its_first_wave() {
    let data = tempfile::tempdir().unwrap();
    let controller = Controller::start(data.path(), &[]);
    let origin = Origin::start("app").await;
    let _nodes = fleet_on_v1(&controller, 4, &traffic("127.0.0.1:0", &origin)).await;
    let waves = waves_of(4, "1,100%");
    let first = waves.iter().find(|(_, w)| **w == 0).unwrap().0.clone();
    let all = ids(4);
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    let others: Vec<&str> = all.iter().copied().filter(|id| *id != first).collect();
    let dir = tempfile::tempdir().unwrap();

    let file = write(&dir, "v2.toml", &traffic("127.0.0.2:0", &origin));
    let (code, _, err) = controller
        .cli(&["publish", &file, "--waves", "1,100%", "--bake", "1h"])
        .await;
    assert_eq!(code, Some(0), "{err}");
    wait_acked(&controller, &[&first], 2).await;

    let file = write(&dir, "v3.toml", &traffic("127.0.0.3:0", &origin));
    let (code, out, err) = controller
        .cli(&["publish", &file, "--waves", "1,100%", "--bake", "1h"])
        .await;
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("v3 rollout running: wave 1 of 2 released"),
        "{out}"
    );
    let (_, out, _) = controller.cli(&["rollout", "status", "2"]).await;
    assert!(
        out.starts_with("v2 rollout superseded: wave 1 of 2 released")
            && out.contains("superseded by v3"),
        "{out}"
    );
    // The first wave moves on to v3; the rest never saw v2 and wait for
    // v3's second wave on v1.
    wait_acked(&controller, &[&first], 3).await;
    for node in controller.nodes().await {
        if node.id != first {
            assert_eq!((node.version, node.desired_version), (1, 1), "{node:?}");
        }
    }
    let deadline = Instant::now() + WAIT;
    while controller.cli(&["rollout", "promote", "3"]).await.0 != Some(0) {
        assert!(Instant::now() < deadline, "v3's first wave never baked");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_acked(&controller, &others, 3).await;
}
