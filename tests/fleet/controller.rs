//! The controller and its fleet: real `tether controller` and `tether node`
//! processes on loopback, real Sync streams, real HTTP through the nodes.

use std::time::Duration;

use crate::support::*;
use tether::proto::v1::fleet_event::Event;
use tether::proto::v1::{self as pb};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_reaches_exactly_the_matching_nodes_and_they_serve_it() {
    let data = tempfile::tempdir().unwrap();
    let controller = Controller::start(data.path(), &[]);
    let url = controller.url();
    let eu = Node::start(&node_config("eu-1", &url, r#"env = "prod", region = "eu""#));
    let us = Node::start(&node_config("us-1", &url, r#"env = "prod", region = "us""#));
    let staging = Node::start(&node_config("stage-1", &url, r#"env = "staging""#));
    wait_connected(&controller, &["eu-1", "us-1", "stage-1"]).await;
    let mut watch = controller.watch().await;

    let origin = Origin::start("prod-app").await;
    let published = controller
        .publish(&traffic("127.0.0.1:0", &origin), "env=prod")
        .await
        .expect("publish");
    assert_eq!(published.version, 1);
    let mut targets = published.targets.clone();
    targets.sort();
    assert_eq!(targets, ["eu-1", "us-1"]);

    wait_acked(&controller, &["eu-1", "us-1"], 1).await;
    origin_answers(&eu, &origin).await;
    origin_answers(&us, &origin).await;
    // The staging node was not targeted: still no listener, no version.
    assert!(staging.get_config().await.listeners.is_empty());
    let nodes = controller.nodes().await;
    let stage = nodes.iter().find(|n| n.id == "stage-1").unwrap();
    assert_eq!((stage.version, stage.desired_version), (0, 0));
    let eu_status = nodes.iter().find(|n| n.id == "eu-1").unwrap();
    assert_eq!(eu_status.desired_version, 1);
    assert_eq!(
        eu_status.labels.get("region").map(String::as_str),
        Some("eu")
    );

    // The node itself records the controller's version as the config in force.
    let info = eu.get_config().await.config.unwrap();
    assert_eq!(info.version, "v1");
    assert_eq!(info.source, pb::ConfigSource::Controller as i32);

    // WatchFleet saw the publish and both ACKs, naming version and nonce.
    let mut acked = Vec::new();
    let mut published_seen = false;
    while acked.len() < 2 {
        let event = tokio::time::timeout(WAIT, watch.message())
            .await
            .expect("fleet event in time")
            .unwrap()
            .unwrap();
        match event.event {
            Some(Event::Published(info)) => published_seen = info.version == 1,
            Some(Event::Acked(ack)) => {
                assert_eq!(ack.version, 1);
                assert!(!ack.nonce.is_empty());
                acked.push(event.node_id);
            }
            _ => {}
        }
    }
    acked.sort();
    assert!(published_seen);
    assert_eq!(acked, ["eu-1", "us-1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_config_is_refused_at_publish_with_every_error_and_nothing_is_stored() {
    let data = tempfile::tempdir().unwrap();
    let controller = Controller::start(data.path(), &[]);
    let config = r#"
[[listener]]
name = "web"
listen = "127.0.0.1:not-a-port"

[[listener.route]]
path = "/"
upstream = "missing"
"#;
    let status = controller.publish(config, "").await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("listener[0].listen"),
        "{}",
        status.message()
    );
    assert!(status.message().contains("missing"), "{}", status.message());
    assert!(
        status.message().contains("4:"),
        "the line is given: {}",
        status.message()
    );

    // Node-local sections are never pushed.
    let local = "[control]\nlisten = \"0.0.0.0:9000\"\n";
    let status = controller.publish(local, "").await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("[control] is node-local"),
        "{}",
        status.message()
    );

    let bad_selector = controller.publish("", "env").await.unwrap_err();
    assert_eq!(bad_selector.code(), Code::InvalidArgument);

    let versions = controller.versions().await;
    assert!(versions.is_empty(), "{versions:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_bind_nacks_with_the_reason_and_the_others_ack() {
    let data = tempfile::tempdir().unwrap();
    let controller = Controller::start(data.path(), &[]);
    let url = controller.url();
    let a = Node::start(&node_config("a", &url, r#"env = "prod""#));
    let b = Node::start(&node_config("b", &url, r#"env = "prod""#));
    let c = Node::start(&node_config("c", &url, r#"env = "prod""#));
    wait_connected(&controller, &["a", "b", "c"]).await;
    let origin = Origin::start("app").await;
    controller
        .publish(&traffic("127.0.0.1:0", &origin), "")
        .await
        .unwrap();
    wait_acked(&controller, &["a", "b", "c"], 1).await;

    // Version 2 listens on a Unix socket next to each node's config; on
    // node b something already listens there.
    let held = std::os::unix::net::UnixListener::bind(b.path("web.sock")).unwrap();
    let mut watch = controller.watch().await;
    controller
        .publish(&traffic("unix:web.sock", &origin), "")
        .await
        .unwrap();
    wait_acked(&controller, &["a", "c"], 2).await;
    let nodes = controller
        .wait_nodes(WAIT, "b NACKs v2", |nodes| {
            nodes
                .iter()
                .any(|n| n.id == "b" && n.last_nack.as_ref().is_some_and(|nack| nack.version == 2))
        })
        .await;
    let b_status = nodes.iter().find(|n| n.id == "b").unwrap();
    assert_eq!(b_status.version, 1, "b keeps running v1");
    assert_eq!(b_status.desired_version, 2);
    let nack = b_status.last_nack.as_ref().unwrap();
    assert_eq!(nack.errors.len(), 1, "{nack:?}");
    assert_eq!(nack.errors[0].path, "listener[0].listen");
    assert!(nack.errors[0].message.contains("listening"), "{nack:?}");
    assert!(nack.reason.starts_with("cannot bind"), "{nack:?}");

    // b still serves v1 over TCP.
    origin_answers(&b, &origin).await;
    assert_eq!(b.get_config().await.config.unwrap().version, "v1");

    // WatchFleet carried the NACK with its error.
    loop {
        let event = tokio::time::timeout(WAIT, watch.message())
            .await
            .expect("NACK event in time")
            .unwrap()
            .unwrap();
        if let Some(Event::Nacked(nack)) = event.event {
            assert_eq!(event.node_id, "b");
            assert_eq!(nack.version, 2);
            assert_eq!(nack.errors[0].path, "listener[0].listen");
            break;
        }
    }
    drop(held);
    drop((a, c));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_publishes_an_earlier_version_again() {
    let data = tempfile::tempdir().unwrap();
    let controller = Controller::start(data.path(), &[]);
    let node = Node::start(&node_config("n", &controller.url(), r#"env = "prod""#));
    wait_connected(&controller, &["n"]).await;
    let (old, new) = (Origin::start("old").await, Origin::start("new").await);
    controller
        .publish(&traffic("127.0.0.1:0", &old), "env=prod")
        .await
        .unwrap();
    wait_acked(&controller, &["n"], 1).await;
    controller
        .publish(&traffic("127.0.0.1:0", &new), "env=prod")
        .await
        .unwrap();
    wait_acked(&controller, &["n"], 2).await;
    origin_answers(&node, &new).await;

    let rolled = controller
        .fleet()
        .await
        .rollback(pb::RollbackRequest {
            version: 1,
            comment: String::new(),
            author: "test".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rolled.version, 3);
    wait_acked(&controller, &["n"], 3).await;
    origin_answers(&node, &old).await;
    let versions = controller.versions().await;
    let numbers: Vec<u64> = versions.iter().map(|v| v.version).collect();
    assert_eq!(numbers, [3, 2, 1], "newest first");
    assert_eq!(versions[0].rollback_of, 1);
    assert_eq!(versions[0].selector, "env=prod");
    assert_eq!(versions[0].checksum, versions[2].checksum);

    let missing = controller
        .fleet()
        .await
        .rollback(pb::RollbackRequest {
            version: 42,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_controller_comes_back_with_every_version_and_node_state() {
    let data = tempfile::tempdir().unwrap();
    let mut controller = Controller::start(data.path(), &[]);
    let url = controller.url();
    let a = Node::start(&node_config("a", &url, r#"env = "prod""#));
    let b = Node::start(&node_config("b", &url, r#"env = "prod""#));
    wait_connected(&controller, &["a", "b"]).await;
    let origin = Origin::start("app").await;
    controller
        .publish(&traffic("127.0.0.1:0", &origin), "")
        .await
        .unwrap();
    wait_acked(&controller, &["a", "b"], 1).await;
    let generation_before = a.get_config().await.config.unwrap().generation;

    controller.restart();
    // Versions are on disk, and so is what each node ACKed — read before
    // the nodes are back.
    let versions = controller.versions().await;
    assert_eq!(versions.len(), 1);
    let nodes = controller.nodes().await;
    for id in ["a", "b"] {
        let node = nodes.iter().find(|n| n.id == id).expect("node record kept");
        assert_eq!(node.version, 1, "{node:?}");
    }

    // The nodes reconnect, already running the desired version: nothing is
    // pushed or re-applied.
    wait_connected(&controller, &["a", "b"]).await;
    let config = a.get_config().await.config.unwrap();
    assert_eq!(config.generation, generation_before);
    assert!(
        !controller.log().contains("push"),
        "nothing is pushed:\n{}",
        controller.log()
    );
    origin_answers(&a, &origin).await;
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restarted_while_the_controller_is_down_serves_its_last_acked_config() {
    let data = tempfile::tempdir().unwrap();
    let mut controller = Controller::start(data.path(), &[]);
    let mut node = Node::start(&node_config("n", &controller.url(), r#"env = "prod""#));
    wait_connected(&controller, &["n"]).await;
    let origin = Origin::start("app").await;
    controller
        .publish(&traffic("127.0.0.1:0", &origin), "")
        .await
        .unwrap();
    wait_acked(&controller, &["n"], 1).await;

    controller.kill();
    node.restart();
    let config = node.get_config().await.config.unwrap();
    assert_eq!(config.version, "v1");
    assert_eq!(config.source, pb::ConfigSource::Controller as i32);
    origin_answers(&node, &origin).await;
}

/// mTLS: identities come from certificates.
mod identity {
    use super::*;
    use std::path::Path;

    /// A fleet PKI made by `tether certs`, as an operator would.
    struct Pki {
        dir: tempfile::TempDir,
    }

    impl Pki {
        fn new() -> Pki {
            let pki = Pki {
                dir: tempfile::tempdir().unwrap(),
            };
            pki.certs(&["ca"]);
            pki.certs(&["controller", "--name", "localhost", "--name", "127.0.0.1"]);
            pki
        }

        fn certs(&self, args: &[&str]) {
            let output = std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
                .args(["certs", "--dir"])
                .arg(self.dir.path())
                .args(args)
                .output()
                .unwrap();
            assert!(
                output.status.success(),
                "tether certs {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        }

        fn path(&self, name: &str) -> String {
            self.dir.path().join(name).display().to_string()
        }

        fn controller_args(&self) -> Vec<String> {
            [
                "--cert",
                "controller.pem",
                "--key",
                "controller-key.pem",
                "--client-ca",
                "ca.pem",
            ]
            .iter()
            .map(|a| {
                if a.ends_with(".pem") {
                    self.path(a)
                } else {
                    a.to_string()
                }
            })
            .collect()
        }

        fn node_config(&self, id: &str, identity: &str, controller: &Controller) -> String {
            format!(
                r#"
[node]
id = "{id}"

[controller]
url = "https://localhost:{port}"
labels = {{ env = "prod" }}
state_dir = "state"

[controller.tls]
ca = "{ca}"
cert = "{cert}"
key = "{key}"
"#,
                port = controller.addr.port(),
                ca = self.path("ca.pem"),
                cert = self.path(&format!("{identity}.pem")),
                key = self.path(&format!("{identity}-key.pem")),
            )
        }

        async fn fleet_client(
            &self,
            identity: &str,
            controller: &Controller,
        ) -> pb::fleet_service_client::FleetServiceClient<tonic::transport::Channel> {
            let read = |name: &str| std::fs::read(Path::new(&self.path(name))).unwrap();
            let (ca, cert, key) = (
                read("ca.pem"),
                read(&format!("{identity}.pem")),
                read(&format!("{identity}-key.pem")),
            );
            let tls = tether::grpc::ClientTls {
                ca_pem: &ca,
                identity: Some((&cert, &key)),
                server_name: None,
            };
            let url = format!("https://localhost:{}", controller.addr.port());
            let channel = tether::grpc::endpoint(&url, Some(tls))
                .unwrap()
                .connect()
                .await
                .unwrap();
            pb::fleet_service_client::FleetServiceClient::new(channel)
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn node_and_operator_identities_come_from_their_certificates() {
        let pki = Pki::new();
        pki.certs(&["node", "a"]);
        pki.certs(&["node", "--group", "web-"]);
        pki.certs(&["operator", "alice"]);
        let key_mode = std::fs::metadata(pki.path("node-a-key.pem")).unwrap();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&key_mode.permissions()) & 0o777,
            0o600
        );
        let data = tempfile::tempdir().unwrap();
        let args = pki.controller_args();
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let controller = Controller::start(data.path(), &args);

        let honest = Node::start(&pki.node_config("a", "node-a", &controller));
        // One certificate for a group of nodes: any id with its prefix.
        let web = Node::start(&pki.node_config("web-7f9c", "nodes-web-", &controller));
        let outsider = Node::start(&pki.node_config("db-1", "nodes-web-", &controller));
        // The same certificate claiming to be node b.
        let impostor = Node::start(&pki.node_config("b", "node-a", &controller));

        let mut operator = pki.fleet_client("operator-alice", &controller).await;
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let nodes = operator
                .list_nodes(pb::ListNodesRequest::default())
                .await
                .expect("an operator certificate may list nodes")
                .into_inner()
                .nodes;
            let connected = |id: &str| nodes.iter().any(|n| n.id == id && n.connected);
            if connected("a") && connected("web-7f9c") {
                assert!(
                    nodes.iter().all(|n| n.id != "b" && n.id != "db-1"),
                    "{nodes:?}"
                );
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "node a never connected"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The impostor was told why.
        let deadline = std::time::Instant::now() + WAIT;
        while !impostor.log().contains(r#"cannot speak for node "b""#) {
            assert!(
                std::time::Instant::now() < deadline,
                "impostor not refused:\n{}",
                impostor.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // A node certificate cannot publish.
        let mut as_node = pki.fleet_client("node-a", &controller).await;
        let refused = as_node
            .publish_config(pb::PublishConfigRequest {
                config: String::new(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Code::PermissionDenied, "{refused:?}");

        // An operator can, and is recorded as the author whatever it claims.
        let published = operator
            .publish_config(pb::PublishConfigRequest {
                config: String::new(),
                selector: "env=prod".into(),
                comment: "empty".into(),
                author: "mallory".into(),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(published.targets, ["a", "web-7f9c"]);
        let versions = operator
            .list_versions(pb::ListVersionsRequest {})
            .await
            .unwrap()
            .into_inner()
            .versions;
        assert_eq!(versions[0].author, "alice");
        let deadline = std::time::Instant::now() + WAIT;
        while !outsider.log().contains("cannot speak for node") {
            assert!(std::time::Instant::now() < deadline, "{}", outsider.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        drop((honest, web));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_command_line_publishes_lists_and_shows() {
    let data = tempfile::tempdir().unwrap();
    let controller = Controller::start(data.path(), &[]);
    let node = Node::start(&node_config(
        "cli-node",
        &controller.url(),
        r#"env = "prod""#,
    ));
    wait_connected(&controller, &["cli-node"]).await;
    let origin = Origin::start("app").await;
    let file = data.path().join("site.toml");
    std::fs::write(&file, traffic("127.0.0.1:0", &origin)).unwrap();
    let fleet = |args: &[&str]| {
        let output = std::process::Command::new(env!("CARGO_BIN_EXE_tether"))
            .args(["fleet", "--controller", &controller.url()])
            .args(args)
            .output()
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };

    let (code, out, err) = fleet(&[
        "publish",
        file.to_str().unwrap(),
        "--selector",
        "env=prod",
        "--comment",
        "first",
    ]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("published version 1 to 1 node: cli-node"),
        "{out}"
    );
    wait_acked(&controller, &["cli-node"], 1).await;

    let (code, out, _) = fleet(&["nodes", "--json"]);
    assert_eq!(code, Some(0));
    let nodes: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(nodes[0]["id"], "cli-node");
    assert_eq!(nodes[0]["version"], 1);
    assert_eq!(nodes[0]["connected"], true);
    assert_eq!(nodes[0]["labels"]["env"], "prod");

    let (code, out, _) = fleet(&["nodes"]);
    assert_eq!(code, Some(0));
    assert!(
        out.lines()
            .any(|l| l.starts_with("cli-node") && l.contains("v1")),
        "{out}"
    );

    let (code, out, _) = fleet(&["versions"]);
    assert_eq!(code, Some(0));
    assert!(
        out.lines()
            .any(|l| l.starts_with("v1") && l.contains("first")),
        "{out}"
    );

    let (code, out, _) = fleet(&["show", "1"]);
    assert_eq!(code, Some(0));
    assert!(out.contains(&origin.addr.to_string()), "{out}");

    // An invalid file: exit 1, every error on stderr, nothing stored.
    std::fs::write(&file, "[[listener]]\nlisten = 5\n").unwrap();
    let (code, _, err) = fleet(&["publish", file.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("listener[0]"), "{err}");
    let (_, out, _) = fleet(&["versions", "--json"]);
    let versions: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(versions.as_array().unwrap().len(), 1);

    let (code, _, err) = fleet(&["rollback", "9"]);
    assert_eq!(code, Some(1), "{err}");
    drop(node);
}

/// `tether fleet publish --wait`: exit 0 once every target runs the
/// version; exit 1 with the node and its reason when one NACKs; exit 1
/// naming the node that did not answer in time (a stopped one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_wait_follows_every_target_to_its_answer() {
    let data = tempfile::tempdir().unwrap();
    let controller = Controller::start(data.path(), &[]);
    let url = controller.url();
    let a = Node::start(&node_config("a", &url, r#"env = "prod""#));
    let b = Node::start(&node_config("b", &url, r#"env = "prod""#));
    wait_connected(&controller, &["a", "b"]).await;
    let origin = Origin::start("app").await;
    let dir = tempfile::tempdir().unwrap();
    let publish = |name: &str, config: String, extra: &[&str]| {
        let file = dir.path().join(name);
        std::fs::write(&file, config).unwrap();
        let mut args = vec!["publish".to_owned(), "--wait".to_owned()];
        args.push(file.display().to_string());
        args.extend(extra.iter().map(|a| a.to_string()));
        let controller = &controller;
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            controller.cli(&args).await
        }
    };

    let (code, out, err) = publish("v1.toml", traffic("127.0.0.1:0", &origin), &[]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("a runs v1") && out.contains("b runs v1"),
        "{out}"
    );
    assert!(out.contains("v1: 2 of 2 nodes ACKed"), "{out}");

    // On b something already listens where v2 wants to.
    let _held = std::os::unix::net::UnixListener::bind(b.path("web.sock")).unwrap();
    let (code, out, err) = publish("v2.toml", traffic("unix:web.sock", &origin), &[]).await;
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("a runs v2"), "{out}");
    assert!(out.contains("b NACKed v2: cannot bind"), "{out}");
    assert!(err.contains("v2 was NACKed by b"), "{err}");

    drop(a);
    let (code, out, err) = publish(
        "v3.toml",
        traffic("127.0.0.1:0", &origin),
        &["--ack-timeout", "2s"],
    )
    .await;
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.contains("b runs v3"), "{out}");
    assert!(err.contains("v3: no answer within 2s from a"), "{err}");
}

mod store {
    use std::io::Write;

    use tether::controller::store::{Damaged, Record, Store};

    fn version(n: u64) -> Record {
        super::stored_version(n, &format!("# version {n}\n"))
    }

    #[tokio::test]
    async fn a_torn_last_record_is_dropped_and_a_damaged_one_refuses_to_start() {
        let dir = tempfile::tempdir().unwrap();
        {
            let (store, loaded) = Store::open(dir.path(), Damaged::Refuse).unwrap();
            assert!(loaded.versions.is_empty());
            store.append_durable(version(1)).await.unwrap();
            store.append_durable(version(2)).await.unwrap();
        }
        // A crash in the middle of writing record 3.
        let log = dir.path().join("fleet.log");
        let mut file = std::fs::OpenOptions::new().append(true).open(&log).unwrap();
        file.write_all(br#"{"seq":4,"sum":"xxh3:0","data":{"record":"version","version":3,"con"#)
            .unwrap();
        drop(file);
        let (store, loaded) = Store::open(dir.path(), Damaged::Refuse).unwrap();
        let numbers: Vec<u64> = loaded.versions.iter().map(|v| v.version).collect();
        assert_eq!(numbers, [1, 2]);
        // Appends after the repair land on a clean line.
        store.append_durable(version(3)).await.unwrap();
        drop(store);
        let (_, loaded) = Store::open(dir.path(), Damaged::Refuse).unwrap();
        assert_eq!(loaded.versions.len(), 3);

        // Damage before the end is not guessed around.
        let text = std::fs::read_to_string(&log).unwrap();
        std::fs::write(&log, text.replacen("version", "vers!on", 1)).unwrap();
        let error = Store::open(dir.path(), Damaged::Refuse)
            .err()
            .expect("damaged store refused");
        // Line 1 is the store's identity; the first version is line 2.
        assert!(error.contains("fleet.log:2"), "{error}");
    }
}

#[test]
fn controller_settings_are_validated_with_their_locations() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("labels"), "app=\"web\"\nzone=\"eu-1a\"\n").unwrap();
    let good = r#"
[controller]
url = "http://127.0.0.1:8840"
labels_file = "labels"
labels = { zone = "eu-1b" }
"#;
    let config = tether::config::Config::parse(good, dir.path()).unwrap();
    let controller = config.controller.unwrap();
    assert_eq!(controller.labels["app"], "web");
    assert_eq!(
        controller.labels["zone"], "eu-1b",
        "labels win over the file"
    );
    assert_eq!(
        controller.state_dir,
        std::path::Path::new("/var/lib/tether")
    );

    let bad = r#"
[controller]
url = "https://controller:8840"
labels = { "a,b" = "x" }
"#;
    let errors = tether::config::Config::parse(bad, dir.path()).unwrap_err();
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    assert!(paths.contains(&"controller.url"), "{errors:?}");
    assert!(paths.contains(&"controller.labels.a,b"), "{errors:?}");
    assert_eq!(errors[0].line, 3, "{errors:?}");

    // A controller cannot push node-local sections; the node refuses them
    // too, with their location in the pushed text.
    let pushed =
        "[[listener]]\nlisten = \"127.0.0.1:0\"\n\n[controller]\nurl = \"http://evil:1\"\n";
    let errors = tether::config::check_pushed(pushed).unwrap_err();
    assert_eq!(errors.len(), 1);
    assert_eq!((errors[0].path.as_str(), errors[0].line), ("controller", 4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_to_back_publishes_converge_on_the_newest_version() {
    let data = tempfile::tempdir().unwrap();
    let controller = Controller::start(data.path(), &[]);
    let node = Node::start(&node_config("n", &controller.url(), r#"env = "prod""#));
    wait_connected(&controller, &["n"]).await;
    let origins = [
        Origin::start("o1").await,
        Origin::start("o2").await,
        Origin::start("o3").await,
        Origin::start("o4").await,
        Origin::start("o5").await,
    ];
    let mut watch = controller.watch().await;
    // No waiting between publishes: the node may skip versions, never
    // regress, and ends on the newest.
    for origin in &origins {
        controller
            .publish(&traffic("127.0.0.1:0", origin), "")
            .await
            .unwrap();
    }
    wait_acked(&controller, &["n"], 5).await;
    origin_answers(&node, &origins[4]).await;
    let mut acked = Vec::new();
    while acked.last() != Some(&5) {
        let event = tokio::time::timeout(WAIT, watch.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match event.event {
            Some(Event::Acked(ack)) => acked.push(ack.version),
            Some(Event::Nacked(nack)) => panic!("unexpected NACK {nack:?}"),
            _ => {}
        }
    }
    assert!(acked.windows(2).all(|w| w[0] < w[1]), "in order: {acked:?}");
    let generation = node.get_config().await.config.unwrap().generation;
    assert!(
        generation <= 6,
        "at most one generation per version: {generation}"
    );
}

#[tokio::test]
async fn a_log_of_mostly_superseded_records_is_compacted_at_open() {
    use tether::controller::store::{Damaged, Record, Store, StoredNode};
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, _) = Store::open(dir.path(), Damaged::Refuse).unwrap();
        for generation in 0..1100 {
            let node = StoredNode {
                id: "n".into(),
                generation,
                ..StoredNode::default()
            };
            store.append(Record::Node(node));
        }
        store
            .append_durable(Record::Node(StoredNode {
                id: "n".into(),
                generation: 1100,
                ..StoredNode::default()
            }))
            .await
            .unwrap();
    }
    let (_, loaded) = Store::open(dir.path(), Damaged::Refuse).unwrap();
    assert_eq!(loaded.nodes["n"].generation, 1100);
    let log = std::fs::read_to_string(dir.path().join("fleet.log")).unwrap();
    assert_eq!(
        log.lines().count(),
        2,
        "the store's identity and one record per node left"
    );
    let (_, reloaded) = Store::open(dir.path(), Damaged::Refuse).unwrap();
    assert_eq!(reloaded.nodes["n"].generation, 1100);
}
