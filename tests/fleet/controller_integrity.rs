//! The controller never reports a node as running what it does not run:
//! versions are told apart by their store and content, not their number;
//! a damaged store is found at open (and can be repaired on purpose); a
//! retried publish stores one version.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::support::*;
use tether::controller::store::{Damaged, Store};
use tether::proto::v1 as pb;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_controller_on_a_fresh_store_never_matches_a_node_by_version_number() {
    let (first_store, second_store) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut controller = Controller::start(first_store.path(), &[]);
    let addr = controller.addr;
    let node = Node::start(&node_config("n", &controller.url(), r#"env = "prod""#));
    let (old, new) = (Origin::start("old").await, Origin::start("new").await);
    controller
        .publish(&traffic("127.0.0.1:0", &old), "")
        .await
        .unwrap();
    wait_acked(&controller, &["n"], 1).await;
    origin_answers(&node, &old).await;

    // Another store at the same address: it has no version 1 of its own.
    controller.kill();
    let controller = Controller::start_at(second_store.path(), addr, &[]);
    let reconnected = controller
        .wait_nodes(WAIT, "n reconnected", |nodes| {
            nodes.iter().any(|n| n.id == "n" && n.connected)
        })
        .await;
    assert_eq!(
        reconnected[0].version, 0,
        "the node runs version 1 of another store, not of this one"
    );

    // Its own version 1, with other content, is applied, not taken as run.
    let generation_before = node.get_config().await.config.unwrap().generation;
    controller
        .publish(&traffic("127.0.0.1:0", &new), "")
        .await
        .unwrap();
    wait_acked(&controller, &["n"], 1).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let answer = get(&http1_client(), node.listener("web").await, None, "/").await;
        if answer.header("x-origin") == Some("new") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the node ACKed v1 but serves the old content:\n{}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(node.get_config().await.config.unwrap().generation > generation_before);
}

/// A store holding versions 1 to 3; answers its log's lines (the first
/// is the store's identity).
async fn three_versions(dir: &Path) -> Vec<String> {
    let (store, _) = Store::open(dir, Damaged::Refuse).unwrap();
    for n in 1..=3 {
        store
            .append_durable(stored_version(n, &format!("# version {n}\n")))
            .await
            .unwrap();
    }
    drop(store);
    let text = std::fs::read_to_string(dir.join("fleet.log")).unwrap();
    text.lines().map(str::to_owned).collect()
}

#[tokio::test]
async fn any_damage_inside_the_store_refuses_to_start_naming_the_line() {
    let dir = tempfile::tempdir().unwrap();
    let lines = three_versions(dir.path()).await;
    assert_eq!(lines.len(), 4);
    let log = dir.path().join("fleet.log");
    let damages: Vec<(&str, Vec<String>, &str)> = vec![
        (
            "a version number changed",
            {
                let mut l = lines.clone();
                l[2] = l[2].replace(r#""version":2"#, r#""version":7"#);
                l
            },
            "fleet.log:3: the record does not match its sum",
        ),
        (
            "a letter of a config changed",
            {
                let mut l = lines.clone();
                l[3] = l[3].replace("# version 3", "# versiom 3");
                l
            },
            "fleet.log:4: the record does not match its sum",
        ),
        (
            "a line deleted",
            vec![lines[0].clone(), lines[1].clone(), lines[3].clone()],
            "fleet.log:3: record 4 follows record 2",
        ),
        (
            "a line repeated",
            vec![
                lines[0].clone(),
                lines[1].clone(),
                lines[1].clone(),
                lines[2].clone(),
            ],
            "fleet.log:3: record 2 follows record 2",
        ),
        (
            "the identity removed",
            lines[1..].to_vec(),
            "fleet.log:1: record 2 follows record 0",
        ),
    ];
    for (what, damaged, expected) in damages {
        std::fs::write(&log, damaged.join("\n") + "\n").unwrap();
        let error = Store::open(dir.path(), Damaged::Refuse)
            .err()
            .unwrap_or_else(|| panic!("{what}: the store opened"));
        assert!(error.contains(expected), "{what}: {error}");
    }

    // A sum recomputed over a changed record still cannot make a version
    // number skip.
    let mut forged = lines.clone();
    let tampered: serde_json::Value = serde_json::from_str(&lines[2]).unwrap();
    let mut data = tampered["data"].clone();
    data["version"] = 7.into();
    let data = serde_json::to_string(&data).unwrap();
    forged[2] = format!(
        r#"{{"seq":3,"sum":"xxh3:{:016x}","data":{data}}}"#,
        xxhash_rust::xxh3::xxh3_64(data.as_bytes())
    );
    std::fs::write(&log, forged.join("\n") + "\n").unwrap();
    let error = Store::open(dir.path(), Damaged::Refuse).err().unwrap();
    assert!(
        error.contains("fleet.log:3: version 7 where version 2 should be"),
        "{error}"
    );
}

#[tokio::test]
async fn repair_keeps_a_copy_and_the_records_before_the_damage() {
    let data = tempfile::tempdir().unwrap();
    let mut lines = three_versions(data.path()).await;
    lines[3] = lines[3].replace("# version 3", "# versiom 3");
    let log = data.path().join("fleet.log");
    std::fs::write(&log, lines.join("\n") + "\n").unwrap();

    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(["controller", "--listen", "127.0.0.1:0", "--data"])
        .arg(data.path())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("fleet.log:4"), "{stderr}");
    assert!(stderr.contains("--repair"), "{stderr}");

    let controller = Controller::start(data.path(), &["--repair"]);
    let numbers: Vec<u64> = controller
        .versions()
        .await
        .iter()
        .map(|v| v.version)
        .collect();
    assert_eq!(numbers, [2, 1]);
    let copies: Vec<_> = std::fs::read_dir(data.path())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().contains("damaged"))
        .collect();
    assert_eq!(copies.len(), 1, "one copy of the damaged log");
    assert_eq!(
        std::fs::read_to_string(copies[0].path()).unwrap(),
        lines.join("\n") + "\n"
    );
    // The next publish follows the records kept.
    let published = controller.publish("", "").await.unwrap();
    assert_eq!(published.version, 3);
}

async fn publish(
    controller: &Controller,
    request: pb::PublishConfigRequest,
) -> Result<tonic::Response<pb::PublishConfigResponse>, tonic::Status> {
    controller.fleet().await.publish_config(request).await
}

#[tokio::test]
async fn a_publish_repeated_with_its_idempotency_key_stores_one_version() {
    let data = tempfile::tempdir().unwrap();
    let mut controller = Controller::start(data.path(), &[]);
    let origin = Origin::start("o").await;
    let request = pb::PublishConfigRequest {
        config: traffic("127.0.0.1:0", &origin),
        idempotency_key: "k-1".into(),
        ..Default::default()
    };
    let first = publish(&controller, request.clone()).await.unwrap();
    let again = publish(&controller, request.clone()).await.unwrap();
    assert_eq!(
        (first.into_inner().version, again.into_inner().version),
        (1, 1)
    );
    // The key is durable: a retry after a crash finds it.
    controller.restart();
    let after_restart = publish(&controller, request.clone()).await.unwrap();
    assert_eq!(after_restart.into_inner().version, 1);
    assert_eq!(controller.versions().await.len(), 1);
    // The same key for something else is refused.
    let other = pb::PublishConfigRequest {
        config: String::new(),
        ..request
    };
    let reused = publish(&controller, other).await.unwrap_err();
    assert_eq!(reused.code(), Code::AlreadyExists, "{reused:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_command_retries_a_publish_until_the_controller_answers() {
    let data = tempfile::tempdir().unwrap();
    let addr = free_addr();
    let file = data.path().join("site.toml");
    let origin = Origin::start("o").await;
    std::fs::write(&file, traffic("127.0.0.1:0", &origin)).unwrap();
    let publishing = std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
        .args([
            "fleet",
            "--controller",
            &format!("http://{addr}"),
            "publish",
        ])
        .arg(&file)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The controller comes up while the command is retrying.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let store = data.path().join("store");
    let controller = Controller::start_at(&store, addr, &[]);
    let output = publishing.wait_with_output().unwrap();
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(controller.versions().await.len(), 1);
}
