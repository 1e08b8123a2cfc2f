//! A real etcd cluster on loopback: Debian's `etcd-server`, members on
//! ports from the OS, data in a temporary directory, stopped by PID.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::client::http1_client;

/// The etcd binary, or `None` (and a line saying the test was skipped)
/// when it is not installed. In CI a missing etcd fails the test.
pub fn etcd() -> Option<PathBuf> {
    let found = std::env::var_os("ETCD")
        .map(PathBuf::from)
        .into_iter()
        .chain([PathBuf::from("/usr/bin/etcd")])
        .find(|path| path.exists());
    if found.is_none() {
        assert!(
            std::env::var_os("CI").is_none(),
            "etcd is missing in CI (.ci/run installs etcd-server)"
        );
        eprintln!("skipped: etcd is not installed (apt-get install etcd-server)");
    }
    found
}

struct Member {
    name: String,
    client: SocketAddr,
    peer: SocketAddr,
    child: Option<Child>,
}

pub struct EtcdCluster {
    binary: PathBuf,
    dir: tempfile::TempDir,
    members: Vec<Member>,
}

/// A port for an etcd member. Not from the OS's ephemeral range: a port
/// it handed out and got back could be handed to a parallel test before
/// etcd binds it. Each test process counts up from its own offset in
/// 20000–29999, skipping ports in use.
fn free_port() -> SocketAddr {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let _ = NEXT.compare_exchange(
        0,
        20_000 + (std::process::id() % 400) as u16 * 25,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    loop {
        let port = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = 20_000 + (port - 20_000) % 10_000;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        if std::net::TcpListener::bind(addr).is_ok() {
            return addr;
        }
    }
}

impl EtcdCluster {
    /// Starts `count` members and waits until every one answers healthy.
    pub async fn start(binary: PathBuf, count: usize) -> EtcdCluster {
        let members: Vec<Member> = (0..count)
            .map(|i| Member {
                name: format!("m{i}"),
                client: free_port(),
                peer: free_port(),
                child: None,
            })
            .collect();
        let mut cluster = EtcdCluster {
            binary,
            dir: tempfile::tempdir().unwrap(),
            members,
        };
        for i in 0..count {
            cluster.start_member(i);
        }
        for i in 0..count {
            cluster.wait_healthy(i).await;
        }
        cluster
    }

    fn start_member(&mut self, index: usize) {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, m.peer))
            .collect();
        let member = &self.members[index];
        let log =
            std::fs::File::create(self.dir.path().join(format!("{}.log", member.name))).unwrap();
        let child = Command::new(&self.binary)
            .arg("--name")
            .arg(&member.name)
            .arg("--data-dir")
            .arg(self.dir.path().join(&member.name))
            .arg("--listen-client-urls")
            .arg(format!("http://{}", member.client))
            .arg("--advertise-client-urls")
            .arg(format!("http://{}", member.client))
            .arg("--listen-peer-urls")
            .arg(format!("http://{}", member.peer))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://{}", member.peer))
            .arg("--initial-cluster")
            .arg(initial.join(","))
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--initial-cluster-token")
            .arg("tether-test")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start etcd");
        self.members[index].child = Some(child);
    }

    async fn wait_healthy(&self, index: usize) {
        let client = http1_client();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Ok(answer)) = tokio::time::timeout(
                Duration::from_secs(2),
                super::client::get_with(&client, self.members[index].client, None, "/health", &[]),
            )
            .await
            {
                if answer.status == 200 && answer.text().contains("true") {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "etcd member {index} not healthy:\n{}",
                self.log(index)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log(&self, index: usize) -> String {
        std::fs::read_to_string(
            self.dir
                .path()
                .join(format!("{}.log", self.members[index].name)),
        )
        .unwrap_or_default()
    }

    /// `etcd://HOST:PORT,…/PREFIX` for tether's `--store`.
    pub fn url(&self, prefix: &str) -> String {
        let hosts: Vec<String> = self.members.iter().map(|m| m.client.to_string()).collect();
        format!("etcd://{}/{prefix}", hosts.join(","))
    }

    /// Member `index`'s client url.
    pub fn endpoint(&self, index: usize) -> String {
        format!("http://{}", self.members[index].client)
    }

    /// SIGKILL one member.
    pub fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.members[index].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts a killed member again on its data.
    pub async fn restart(&mut self, index: usize) {
        self.kill(index);
        self.start_member(index);
        self.wait_healthy(index).await;
    }

    /// Starts every member again (none is healthy before a quorum is up).
    pub async fn restart_all(&mut self) {
        for index in 0..self.members.len() {
            self.kill(index);
            self.start_member(index);
        }
        for index in 0..self.members.len() {
            self.wait_healthy(index).await;
        }
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for index in 0..self.members.len() {
            self.kill(index);
        }
    }
}
