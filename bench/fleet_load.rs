//! Fleet load: N simulated nodes, each with its own HTTP/2 connection and
//! Sync stream, against one running controller. Each simulated node ACKs a
//! push as soon as it arrives (no proxy behind it), so what is measured is
//! the controller: store, fan-out, and ACK bookkeeping.
//!
//! For each round it publishes a config and records, per node, the time
//! from the PublishConfig call to the node's ACK as seen on WatchFleet.
//! Prints one JSON line per round.
//!
//!     cargo run --release --example fleet-load -- \
//!         --controller URL[,URL…] --nodes 1000 --rounds 3 --pid PID[,PID…] [--etcd-pid PID,…] \
//!         [--delay SECONDS before the first round] [--hold SECONDS after the last] \
//!         [--waves 1,10%,50%,100%: each round a staged rollout, bake 0] \
//!         [--report-every MS: each node sends its answer counts this often,
//!          and the controller's CPU over --delay is printed first]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tether::proto::v1::controller_message::Message as Down;
use tether::proto::v1::controller_service_client::ControllerServiceClient;
use tether::proto::v1::fleet_event::Event;
use tether::proto::v1::fleet_service_client::FleetServiceClient;
use tether::proto::v1::node_message::Message as Up;
use tether::proto::v1::{self as pb};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

struct Options {
    /// One url, or replicas (comma-separated): nodes are spread over them;
    /// publishes and WatchFleet go to the first.
    controller: String,
    nodes: usize,
    rounds: usize,
    /// The controller's pid, or the replicas' (comma-separated).
    pids: Vec<u32>,
    /// etcd members' pids, for their CPU.
    etcd_pids: Vec<u32>,
    /// Seconds to wait after connecting, before the first round.
    delay: u64,
    /// Seconds to stay connected after the last round.
    hold: u64,
    /// Publish as a staged rollout with these waves, bake 0.
    waves: Option<String>,
    /// Send a TrafficReport this often, in ms (0: never).
    report_every: u64,
    /// After the rounds, SIGKILL this replica and time until every node
    /// has a stream again.
    failover: Option<u32>,
}

fn options() -> Options {
    let mut options = Options {
        controller: "http://127.0.0.1:8840".into(),
        nodes: 100,
        rounds: 3,
        pids: Vec::new(),
        etcd_pids: Vec::new(),
        delay: 0,
        hold: 0,
        waves: None,
        report_every: 0,
        failover: None,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    for pair in args.chunks(2) {
        let value = pair.get(1).cloned().unwrap_or_default();
        match pair[0].as_str() {
            "--controller" => options.controller = value,
            "--nodes" => options.nodes = value.parse().expect("--nodes N"),
            "--rounds" => options.rounds = value.parse().expect("--rounds N"),
            "--pid" => options.pids = pids(&value),
            "--etcd-pid" => options.etcd_pids = pids(&value),
            "--delay" => options.delay = value.parse().expect("--delay SECONDS"),
            "--hold" => options.hold = value.parse().expect("--hold SECONDS"),
            "--waves" => options.waves = Some(value),
            "--failover" => options.failover = Some(value.parse().expect("--failover PID")),
            "--report-every" => options.report_every = value.parse().expect("--report-every MS"),
            other => panic!("unknown argument {other}"),
        }
    }
    options
}

fn pids(text: &str) -> Vec<u32> {
    text.split(',')
        .map(|p| p.parse().expect("PID[,PID…]"))
        .collect()
}

/// Total CPU ticks of `pids`, and each one's RSS and peak RSS.
fn usage(pids: &[u32]) -> (u64, Vec<(u64, u64)>) {
    let mut ticks = 0;
    let mut memory = Vec::new();
    for pid in pids {
        let (t, rss, peak) = process_usage(*pid);
        ticks += t;
        memory.push((rss, peak));
    }
    (ticks, memory)
}

/// One simulated node: a stream to the `first` controller; with several
/// (replicas), when it ends, one to the next, as a node does.
async fn simulated_node(
    endpoints: Arc<Vec<Endpoint>>,
    first: usize,
    id: String,
    connected: Arc<AtomicUsize>,
    report_every: u64,
) {
    for attempt in 0.. {
        let endpoint = endpoints[(first + attempt) % endpoints.len()].clone();
        session(endpoint, id.clone(), connected.clone(), report_every).await;
        if endpoints.len() == 1 {
            return;
        }
    }
}

/// Opens one stream; it ACKs every push at once, and reports answer
/// counts every `report_every` ms (0: never). `connected` counts it while
/// it lasts.
async fn session(endpoint: Endpoint, id: String, connected: Arc<AtomicUsize>, report_every: u64) {
    let channel = match endpoint.connect().await {
        Ok(channel) => channel,
        Err(e) => {
            eprintln!("{id}: cannot connect: {e}");
            return;
        }
    };
    let (up, queue) = mpsc::channel(4);
    let hello = pb::Hello {
        node_id: id.clone(),
        labels: HashMap::from([("env".to_owned(), "bench".to_owned())]),
        build: "fleet-load".into(),
        traffic_report_ms: report_every,
        ..Default::default()
    };
    up.send(pb::NodeMessage {
        message: Some(Up::Hello(hello)),
    })
    .await
    .unwrap();
    let mut pushes = match ControllerServiceClient::new(channel)
        .sync(ReceiverStream::new(queue))
        .await
    {
        Ok(response) => response.into_inner(),
        Err(status) => {
            eprintln!("{id}: {status}");
            return;
        }
    };
    connected.fetch_add(1, Ordering::Relaxed);
    struct Counted(Arc<AtomicUsize>);
    impl Drop for Counted {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::Relaxed);
        }
    }
    let _counted = Counted(connected);
    let mut report = tokio::time::interval(Duration::from_millis(report_every.max(1)));
    let mut answered = 0;
    loop {
        let message = tokio::select! {
            message = pushes.message() => message,
            _ = report.tick(), if report_every > 0 => {
                answered += 100;
                let traffic = pb::TrafficReport { answered, server_errors: answered / 100, version: 0 };
                if up.send(pb::NodeMessage { message: Some(Up::Traffic(traffic)) }).await.is_err() {
                    return;
                }
                continue;
            }
        };
        let Ok(Some(message)) = message else {
            return;
        };
        if let Some(Down::Push(push)) = message.message {
            let ack = pb::Ack {
                version: push.version,
                nonce: push.nonce,
                generation: push.version,
            };
            if up
                .send(pb::NodeMessage {
                    message: Some(Up::Ack(ack)),
                })
                .await
                .is_err()
            {
                return;
            }
        }
    }
}

/// utime + stime of a process, in clock ticks; and its RSS and peak RSS in KiB.
fn process_usage(pid: u32) -> (u64, u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = fields
        .get(11)
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        + fields
            .get(12)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (ticks, field("VmRSS:"), field("VmHWM:"))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index]
}

#[tokio::main]
async fn main() {
    let options = options();
    // One connection per simulated node.
    tether::cli::raise_fd_limit();
    let endpoints: Vec<Endpoint> = options
        .controller
        .split(',')
        .map(|url| {
            Endpoint::from_shared(url.to_owned())
                .expect("controller url")
                .connect_timeout(Duration::from_secs(10))
        })
        .collect();
    let endpoint = endpoints[0].clone();
    let endpoints = Arc::new(endpoints);
    let connected = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    // Connect in waves so the accept queue is not the thing measured.
    for wave in (0..options.nodes).collect::<Vec<_>>().chunks(250) {
        for &i in wave {
            tokio::spawn(simulated_node(
                endpoints.clone(),
                i % endpoints.len(),
                format!("sim-{i:05}"),
                connected.clone(),
                options.report_every,
            ));
        }
        let target = wave.last().map_or(0, |last| last + 1);
        let deadline = Instant::now() + Duration::from_secs(30);
        while connected.load(Ordering::Relaxed) < target && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let connected_count = connected.load(Ordering::Relaxed);
    eprintln!(
        "{connected_count}/{} nodes connected in {:?}",
        options.nodes,
        started.elapsed()
    );
    let (t0, _) = usage(&options.pids);
    tokio::time::sleep(Duration::from_secs(options.delay)).await;
    if !options.pids.is_empty() && options.delay > 0 {
        let (t1, memory) = usage(&options.pids);
        let rss = memory.iter().map(|m| m.0).max().unwrap_or(0);
        println!(
            "{{\"nodes\":{},\"idle_seconds\":{},\"report_every_ms\":{},\"controller_cpu_ms\":{},\"controller_rss_kib\":{rss}}}",
            options.nodes,
            options.delay,
            options.report_every,
            (t1 - t0) * 10
        );
    }
    let mut fleet = FleetServiceClient::new(endpoint.connect().await.expect("fleet client"));
    let mut events = fleet
        .watch_fleet(pb::WatchFleetRequest {})
        .await
        .expect("WatchFleet")
        .into_inner();
    for round in 1..=options.rounds {
        let config = format!(
            "# round {round}\n[[listener]]\nname = \"web\"\nlisten = \"127.0.0.1:0\"\n\
             [[listener.route]]\npath = \"/\"\nupstream = \"app\"\n\
             [upstream.app]\nservers = [{{ addr = \"127.0.0.1:9\" }}]\n"
        );
        let before = (usage(&options.pids).0, usage(&options.etcd_pids).0);
        let published_at = Instant::now();
        // ACKs can arrive before the publish is answered: read both at once.
        let publish = tokio::spawn({
            let mut fleet = fleet.clone();
            let waves = options.waves.clone();
            async move {
                let request = pb::PublishConfigRequest {
                    config,
                    selector: "env=bench".into(),
                    comment: format!("fleet-load round {round}"),
                    author: "fleet-load".into(),
                    rollout: waves.map(|waves| pb::RolloutPlan {
                        waves: vec![waves],
                        bake_ms: 0,
                        ack_timeout_ms: 60_000,
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                let version = fleet.publish_config(request).await.expect("publish");
                (version.into_inner().version, published_at.elapsed())
            }
        });
        // Versions are numbered from 1 in a fresh store, one per round.
        let version = round as u64;
        let mut latencies = Vec::with_capacity(connected_count);
        let deadline = published_at + Duration::from_secs(60);
        while latencies.len() < connected_count {
            let Ok(Ok(Some(event))) =
                tokio::time::timeout_at(deadline.into(), events.message()).await
            else {
                eprintln!("round {round}: only {} ACKs within 60s", latencies.len());
                break;
            };
            if let Some(Event::Acked(ack)) = event.event {
                if ack.version == version {
                    latencies.push(published_at.elapsed().as_secs_f64() * 1000.0);
                }
            }
        }
        let (after, memory) = usage(&options.pids);
        let etcd_after = usage(&options.etcd_pids).0;
        let (published, publish_answered) = publish.await.expect("publish task");
        assert_eq!(published, version, "run against a fresh controller store");
        latencies.sort_by(|a, b| a.total_cmp(b));
        let ticks_per_second = 100.0;
        let cpu_ms = (after - before.0) as f64 * 1000.0 / ticks_per_second;
        let etcd_cpu_ms = (etcd_after - before.1) as f64 * 1000.0 / ticks_per_second;
        // Each replica's memory: the largest.
        let rss_kib = memory.iter().map(|m| m.0).max().unwrap_or(0);
        let peak_kib = memory.iter().map(|m| m.1).max().unwrap_or(0);
        println!(
            "{{\"nodes\":{},\"round\":{round},\"version\":{version},\"acks\":{},\"publish_ms\":{:.1},\"p50_ms\":{:.1},\"p99_ms\":{:.1},\"last_ms\":{:.1},\"controller_cpu_ms\":{cpu_ms:.0},\"controller_rss_kib\":{rss_kib},\"controller_peak_rss_kib\":{peak_kib},\"etcd_cpu_ms\":{etcd_cpu_ms:.0}}}",
            options.nodes,
            latencies.len(),
            publish_answered.as_secs_f64() * 1000.0,
            percentile(&latencies, 0.50),
            percentile(&latencies, 0.99),
            latencies.last().copied().unwrap_or(f64::NAN),
        );
    }
    if let Some(pid) = options.failover {
        let killed = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(killed.success(), "kill -9 {pid}");
        let at = Instant::now();
        // First the broken streams are seen, then they come back.
        while connected.load(Ordering::Relaxed) == connected_count
            && at.elapsed() < Duration::from_secs(5)
        {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let mut lost = 0;
        while connected.load(Ordering::Relaxed) < connected_count
            && at.elapsed() < Duration::from_secs(60)
        {
            lost = lost.max(connected_count - connected.load(Ordering::Relaxed));
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        println!(
            "{{\"nodes\":{},\"failover\":true,\"streams_lost\":{lost},\"all_back_ms\":{:.0},\"connected\":{}}}",
            options.nodes,
            at.elapsed().as_secs_f64() * 1000.0,
            connected.load(Ordering::Relaxed)
        );
    }
    tokio::time::sleep(Duration::from_secs(options.hold)).await;
}
