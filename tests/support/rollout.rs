//! What the rollout tests share: node ids and the waves they fall in, a
//! config whose new route fails, and clients that keep asking every node
//! while a rollout runs.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tether::controller::rollout::{parse_waves, StoredRollout};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::client::{get_with, http1_client};
use super::controller::traffic;
use super::origin::Origin;

/// n0, n1, …
pub fn ids(count: usize) -> Vec<String> {
    (0..count).map(|i| format!("n{i}")).collect()
}

/// The wave (from 0) of each of `ids(count)`, as the controller cuts them.
pub fn waves_of(count: usize, waves: &str) -> BTreeMap<String, usize> {
    let ids = ids(count);
    let targets: Vec<&str> = ids.iter().map(String::as_str).collect();
    let plan = parse_waves(&[waves.to_owned()]).unwrap();
    let rollout = StoredRollout::start(2, &plan, Duration::ZERO, Duration::ZERO, &targets, 0);
    ids.iter()
        .map(|id| (id.clone(), rollout.wave_of(id, &BTreeMap::new())))
        .collect()
}

/// v1: everything to `app`. v2 adds `/api/` to `broken`, which answers
/// every request 502.
pub fn with_api(app: &Origin, broken: Option<&Origin>) -> String {
    let mut config = traffic("127.0.0.1:0", app);
    if let Some(broken) = broken {
        config.push_str(&format!(
            "\n[[listener.route]]\npath = \"/api/\"\nupstream = \"api\"\n\
             [upstream.api]\nservers = [{{ addr = \"{}\" }}]\n",
            broken.addr
        ));
    }
    config
}

/// Clients asking every address for `path` in turn, 50 rounds a second,
/// until stopped (at most 30 s).
pub struct KeepAsking {
    stop: CancellationToken,
    task: JoinHandle<BTreeMap<u16, usize>>,
}

impl KeepAsking {
    pub fn start(addrs: Vec<SocketAddr>, path: &'static str) -> KeepAsking {
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let client = http1_client();
                let deadline = Instant::now() + Duration::from_secs(30);
                let mut statuses = BTreeMap::<u16, usize>::new();
                while !stop.is_cancelled() && Instant::now() < deadline {
                    for addr in &addrs {
                        if let Ok(answer) = get_with(&client, *addr, None, path, &[]).await {
                            *statuses.entry(answer.status.as_u16()).or_default() += 1;
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                statuses
            }
        });
        KeepAsking { stop, task }
    }

    /// Stops, and answers how many of each status came back.
    pub async fn stop(self) -> BTreeMap<u16, usize> {
        self.stop.cancel();
        self.task.await.unwrap()
    }
}
