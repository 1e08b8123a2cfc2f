//! Runs `tether controller` as a child process, with its FleetService
//! client.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use tether::proto::v1::fleet_service_client::FleetServiceClient;
use tether::proto::v1::{self as pb};
use tonic::transport::Channel;

use super::client::{get, http1_client};
use super::control::ControlClient;
use super::node::{address_in, spawn_until, Node, SharedLog};
use super::origin::Origin;

pub struct Controller {
    child: Child,
    pub data: PathBuf,
    pub addr: SocketAddr,
    /// `--data DIR`, or `--store URL --replica NAME`.
    store: Vec<String>,
    extra: Vec<String>,
    log: SharedLog,
}

impl Controller {
    /// Starts a controller with its store in `data` on an ephemeral
    /// loopback port, plus `extra` arguments (TLS files).
    pub fn start(data: &Path, extra: &[&str]) -> Controller {
        Self::start_at(data, "127.0.0.1:0".parse().unwrap(), extra)
    }

    /// Starts a controller listening on `listen`.
    pub fn start_at(data: &Path, listen: SocketAddr, extra: &[&str]) -> Controller {
        let store = vec!["--data".to_owned(), data.display().to_string()];
        let mut controller = Self::spawn(listen, store, extra);
        controller.data = data.to_owned();
        controller
    }

    /// Starts replica `name` of a controller whose store is shared
    /// (`etcd://…`).
    pub fn start_replica(store: &str, name: &str, extra: &[&str]) -> Controller {
        let store = ["--store", store, "--replica", name]
            .map(str::to_owned)
            .to_vec();
        Self::spawn("127.0.0.1:0".parse().unwrap(), store, extra)
    }

    fn spawn(listen: SocketAddr, store: Vec<String>, extra: &[&str]) -> Controller {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tether"));
        command
            .args(["controller", "--listen", &listen.to_string()])
            .args(&store)
            .args(extra);
        let (child, log, line) = spawn_until(command, "controller listening", "controller")
            .unwrap_or_else(|log| panic!("controller did not start:\n{log}"));
        Controller {
            child,
            data: PathBuf::new(),
            addr: address_in(&line),
            store,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            log,
        }
    }

    /// The process, for signals.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends it `signal` (`-STOP`, `-CONT`).
    pub fn signal(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill {signal} {}", self.pid());
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// SIGKILL: no chance to flush or say goodbye.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts again on the same address and store.
    pub fn restart(&mut self) {
        self.kill();
        let extra: Vec<&str> = self.extra.iter().map(String::as_str).collect();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            // The old socket may linger for a moment.
            match std::net::TcpListener::bind(self.addr) {
                Ok(probe) => drop(probe),
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
                Err(e) => panic!("{} stays busy: {e}", self.addr),
            }
            break;
        }
        let data = self.data.clone();
        *self = Controller::spawn(self.addr, self.store.clone(), &extra);
        self.data = data;
    }

    /// Runs `tether fleet ARGS…` against this controller: exit code,
    /// stdout, stderr.
    pub async fn cli(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let mut command = Command::new(env!("CARGO_BIN_EXE_tether"));
        command
            .args(["fleet", "--controller", &self.url()])
            .args(args);
        let output = tokio::task::spawn_blocking(move || command.output().unwrap())
            .await
            .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    }

    /// `tether fleet ARGS` with a terminal for its output: util-linux
    /// `script` runs it on a pseudo-terminal and copies what it draws.
    /// Returns its exit code and everything it wrote.
    pub async fn cli_on_terminal(&self, args: &[&str]) -> (Option<i32>, String) {
        let quote = |arg: &str| format!("'{}'", arg.replace('\'', r"'\''"));
        let mut line = vec![
            quote(env!("CARGO_BIN_EXE_tether")),
            "fleet".to_owned(),
            "--controller".to_owned(),
            quote(&self.url()),
        ];
        line.extend(args.iter().map(|a| quote(a)));
        let mut command = Command::new("script");
        command
            .args(["--quiet", "--return", "--command"])
            .arg(line.join(" "))
            .arg("/dev/null")
            .stdin(std::process::Stdio::null());
        let output = tokio::task::spawn_blocking(move || {
            command
                .output()
                .expect("util-linux `script` (Debian: bsdutils) runs the command on a terminal")
        })
        .await
        .unwrap();
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
        )
    }

    pub async fn fleet(&self) -> FleetServiceClient<Channel> {
        FleetServiceClient::connect(self.url())
            .await
            .expect("connect to the controller")
    }

    pub async fn publish(
        &self,
        config: &str,
        selector: &str,
    ) -> Result<pb::PublishConfigResponse, tonic::Status> {
        self.fleet()
            .await
            .publish_config(pb::PublishConfigRequest {
                config: config.to_owned(),
                selector: selector.to_owned(),
                comment: String::new(),
                author: "test".to_owned(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
    }

    /// Published versions, newest first.
    pub async fn versions(&self) -> Vec<pb::VersionInfo> {
        self.fleet()
            .await
            .list_versions(pb::ListVersionsRequest {})
            .await
            .expect("ListVersions")
            .into_inner()
            .versions
    }

    /// Opens a WatchFleet stream.
    pub async fn watch(&self) -> tonic::Streaming<pb::FleetEvent> {
        self.fleet()
            .await
            .watch_fleet(pb::WatchFleetRequest {})
            .await
            .expect("WatchFleet")
            .into_inner()
    }

    pub async fn nodes(&self) -> Vec<pb::NodeStatus> {
        self.fleet()
            .await
            .list_nodes(pb::ListNodesRequest::default())
            .await
            .expect("ListNodes")
            .into_inner()
            .nodes
    }

    pub async fn node(&self, id: &str) -> Option<pb::NodeStatus> {
        self.nodes().await.into_iter().find(|n| n.id == id)
    }

    /// Polls ListNodes until `done` holds for it, or panics with the last
    /// answer after `within`.
    pub async fn wait_nodes(
        &self,
        within: Duration,
        what: &str,
        done: impl Fn(&[pb::NodeStatus]) -> bool,
    ) -> Vec<pb::NodeStatus> {
        let deadline = Instant::now() + within;
        loop {
            let nodes = self.nodes().await;
            if done(&nodes) {
                return nodes;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {within:?}: {nodes:#?}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill();
    }
}

pub const WAIT: Duration = Duration::from_secs(15);

/// A node subscribed to `controller` with `labels` (TOML inline table body).
pub fn node_config(id: &str, controller: &str, labels: &str) -> String {
    format!(
        r#"
[node]
id = "{id}"
drain_timeout = "2s"

[controller]
url = "{controller}"
labels = {{ {labels} }}
state_dir = "state"
report_interval = "200ms"
"#
    )
}

/// Traffic config: one listener on an ephemeral port, `/` to `origin`.
pub fn traffic(listen: &str, origin: &Origin) -> String {
    format!(
        r#"
[[listener]]
name = "web"
listen = "{listen}"

[[listener.route]]
path = "/"
upstream = "app"

[upstream.app]
servers = [{{ addr = "{}" }}]
"#,
        origin.addr
    )
}

pub async fn wait_acked(controller: &Controller, ids: &[&str], version: u64) {
    controller
        .wait_nodes(WAIT, &format!("{ids:?} ACK v{version}"), |nodes| {
            ids.iter().all(|id| {
                nodes
                    .iter()
                    .any(|n| n.id == *id && n.connected && n.version == version)
            })
        })
        .await;
}

pub async fn wait_connected(controller: &Controller, ids: &[&str]) {
    controller
        .wait_nodes(WAIT, &format!("{ids:?} connected"), |nodes| {
            ids.iter()
                .all(|id| nodes.iter().any(|n| n.id == *id && n.connected))
        })
        .await;
}

pub async fn origin_answers(node: &Node, origin: &Origin) {
    let client = http1_client();
    let addr = node.listener("web").await;
    let answer = get(&client, addr, None, "/hello").await;
    assert_eq!(answer.status, 200, "{}", node.log());
    assert_eq!(answer.header("x-origin"), Some(origin.name.as_str()));
}

/// A version record for a store, with `config` as its text.
pub fn stored_version(number: u64, config: &str) -> tether::controller::store::Record {
    tether::controller::store::Record::Version(tether::controller::store::StoredVersion {
        version: number,
        checksum: tether::config::content_version(config),
        config: config.to_owned(),
        selector: String::new(),
        comment: String::new(),
        author: String::new(),
        published_at: 0,
        rollback_of: 0,
        idempotency_key: String::new(),
        rollout: None,
        all_at_once_reason: String::new(),
    })
}
