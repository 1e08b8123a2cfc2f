//! A node run in the test's own process through the library entry point
//! (`tether::Node`): bound addresses come from its handle, nothing is
//! read from logs, nothing races for a free port. For what only a process
//! shows (signals, exit codes, descriptor limits, restarts), `Node` runs
//! the shipped binary instead.

use std::net::SocketAddr;
use std::path::PathBuf;

use super::control::ControlClient;
use super::node::with_ephemeral_control;

pub struct LocalNode {
    node: Option<tether::Node>,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
}

impl LocalNode {
    /// Starts a node on `config` (written to a temp dir, the base for
    /// relative paths) in this process.
    pub async fn start(config: &str) -> LocalNode {
        Self::start_in(tempfile::tempdir().expect("temp dir"), config).await
    }

    pub async fn start_in(dir: tempfile::TempDir, config: &str) -> LocalNode {
        let config_path = dir.path().join("node.toml");
        std::fs::write(&config_path, with_ephemeral_control(config)).expect("write config");
        let node = tether::Node::start(&config_path)
            .await
            .unwrap_or_else(|e| panic!("node did not start: {e}"));
        LocalNode {
            node: Some(node),
            dir,
            config_path,
        }
    }

    pub fn node(&self) -> &tether::Node {
        self.node.as_ref().expect("running")
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }

    /// Stops the node, draining for at most `drain`.
    pub async fn shutdown(mut self, drain: std::time::Duration) {
        if let Some(node) = self.node.take() {
            node.shutdown(Some(drain)).await;
        }
    }
}

impl ControlClient for LocalNode {
    fn control_addr(&self) -> SocketAddr {
        self.node().control_addr()
    }
}
