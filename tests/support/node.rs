//! Runs `tether node` as a child process and drives it over gRPC.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::control::ControlClient;
use tether::proto::v1::control_service_client::ControlServiceClient;
use tether::proto::v1::{self as pb, reload_request};
use tonic::transport::Channel;

pub struct Node {
    child: Child,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub control_addr: SocketAddr,
    log: SharedLog,
    customize: Customize,
}

/// Changes to the node's process before it starts (environment, limits),
/// applied again on restart.
pub type Customize = Arc<dyn Fn(&mut Command) + Send + Sync>;

/// Adds `[control] listen = "127.0.0.1:0"` unless the config has a control section.
pub fn with_ephemeral_control(config: &str) -> String {
    if config.contains("[control]") {
        config.to_owned()
    } else {
        format!("[control]\nlisten = \"127.0.0.1:0\"\n\n{config}")
    }
}

impl Node {
    /// Starts a node on `config` (written to a temp dir, which is also the
    /// base for relative paths) and waits until its control service answers.
    pub fn start(config: &str) -> Node {
        Self::try_start(config).unwrap_or_else(|log| panic!("node did not start:\n{log}"))
    }

    /// Like `start`, but answers the node's output if it exits instead.
    pub fn try_start(config: &str) -> Result<Node, String> {
        let dir = tempfile::tempdir().expect("temp dir");
        Self::try_start_in(dir, config)
    }

    pub fn try_start_in(dir: tempfile::TempDir, config: &str) -> Result<Node, String> {
        Self::try_start_customized(dir, config, Arc::new(|_| {}))
    }

    /// Starts a node whose process `customize` adjusts first.
    pub fn start_customized(
        config: &str,
        customize: impl Fn(&mut Command) + Send + Sync + 'static,
    ) -> Node {
        let dir = tempfile::tempdir().expect("temp dir");
        Self::try_start_customized(dir, config, Arc::new(customize))
            .unwrap_or_else(|log| panic!("node did not start:\n{log}"))
    }

    fn try_start_customized(
        dir: tempfile::TempDir,
        config: &str,
        customize: Customize,
    ) -> Result<Node, String> {
        let config_path = dir.path().join("node.toml");
        std::fs::write(&config_path, with_ephemeral_control(config)).expect("write config");
        let (child, log, control_addr) = spawn_node(&config_path, &customize)?;
        Ok(Node {
            child,
            dir,
            config_path,
            control_addr,
            log,
            customize,
        })
    }

    /// Stops the node at once (SIGKILL) and starts it again on the same
    /// config file and directory.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let (child, log, control_addr) = spawn_node(&self.config_path, &self.customize)
            .unwrap_or_else(|log| panic!("node did not restart:\n{log}"));
        self.child = child;
        self.log = log;
        self.control_addr = control_addr;
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn write_config(&self, config: &str) {
        std::fs::write(&self.config_path, with_ephemeral_control(config)).expect("write config");
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: plain kill(2) on our own child.
        unsafe {
            libc::kill(self.child.id() as i32, signal);
        }
    }

    /// Waits for the process to exit; answers its exit code.
    pub fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    /// Open file descriptors of the node process.
    pub fn fd_count(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// The inodes of the node process's TCP sockets listening on `port`.
    pub fn listening_sockets(&self, port: u16) -> std::collections::BTreeSet<u64> {
        let own: std::collections::BTreeSet<u64> =
            std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
                .into_iter()
                .flatten()
                .filter_map(|entry| {
                    let target = std::fs::read_link(entry.ok()?.path()).ok()?;
                    let target = target.to_str()?;
                    target
                        .strip_prefix("socket:[")?
                        .strip_suffix(']')?
                        .parse()
                        .ok()
                })
                .collect();
        let table = std::fs::read_to_string(format!("/proc/{}/net/tcp", self.pid())).unwrap();
        table
            .lines()
            .skip(1)
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let local_port = u16::from_str_radix(fields[1].rsplit(':').next()?, 16).ok()?;
                let listening = fields[3] == "0A";
                let inode: u64 = fields[9].parse().ok()?;
                (listening && local_port == port && own.contains(&inode)).then_some(inode)
            })
            .collect()
    }

    /// Peak resident memory (VmHWM) of the node process, in KiB.
    pub fn peak_rss_kib(&self) -> u64 {
        proc_status_field(self.pid(), "VmHWM:")
    }

    pub fn threads(&self) -> u64 {
        proc_status_field(self.pid(), "Threads:")
    }

    /// How many log lines contain `text`.
    pub fn log_lines_with(&self, text: &str) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains(text))
            .count()
    }

    pub fn path(&self, relative: &str) -> PathBuf {
        self.dir.path().join(relative)
    }
}

fn proc_status_field(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

impl ControlClient for Node {
    fn control_addr(&self) -> SocketAddr {
        self.control_addr
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `tether node --config PATH` and waits for its control service.
fn spawn_node(
    config_path: &Path,
    customize: &Customize,
) -> Result<(Child, SharedLog, SocketAddr), String> {
    let mut command = Command::new(env!("CARGO_BIN_EXE_tether"));
    command.args(["node", "--config"]).arg(config_path);
    customize(&mut command);
    let (child, log, line) = spawn_until(command, "control service listening", "node")?;
    Ok((child, log, address_in(&line)))
}

pub type SharedLog = Arc<Mutex<Vec<String>>>;

/// The `address=` field of a log line.
pub fn address_in(line: &str) -> SocketAddr {
    line.split("address=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in log line {line:?}"))
}

/// Spawns `command` (a tether process), collects its log, and waits for
/// the first line containing `ready`. Answers the log if it exits first.
pub fn spawn_until(
    mut command: Command,
    ready: &'static str,
    label: &'static str,
) -> Result<(Child, SharedLog, String), String> {
    let mut child = command
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn tether");
    let stderr = child.stderr.take().expect("stderr");
    let log: SharedLog = Arc::new(Mutex::new(Vec::new()));
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    {
        let log = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains(ready) {
                    let _ = ready_tx.send(line.clone());
                }
                if std::env::var_os("TETHER_TEST_LOG").is_some() {
                    eprintln!("[{label}] {line}");
                }
                log.lock().unwrap().push(line);
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(line) = ready_rx.recv_timeout(Duration::from_millis(50)) {
            return Ok((child, log, line));
        }
        if let Ok(Some(_)) = child.try_wait() {
            std::thread::sleep(Duration::from_millis(100));
            return Err(log.lock().unwrap().join("\n"));
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            return Err(format!("timed out\n{}", log.lock().unwrap().join("\n")));
        }
    }
}

/// A free loopback address: bound, read back, released. For a listener a
/// test brings back at the same address, or a server nothing listens on.
pub fn free_addr() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Writes `files` (relative path, content) under `dir`.
pub fn write_files(dir: &Path, files: &[(&str, &[u8])]) {
    for (path, content) in files {
        let path = dir.join(path);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, content).unwrap();
    }
}
