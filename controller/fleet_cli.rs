//! `tether fleet`: the operator's command line for FleetService. Prints
//! for people by default, JSON (one object per line for `watch`) with
//! `--json`. Exit codes: 0 done, 1 refused (invalid config, unknown
//! version) or, with `publish --wait`, not running on every target, 2 the
//! controller could not be reached or failed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use serde_json::{json, Value};
use tonic::transport::Channel;
use tonic::{Code, Status};

use super::json::{event_json, health_name, node_json, rollout_json, time, version_json};
use super::progress::Mode;
use super::publish_wait::{wait_for_answers, NotApplied};
use super::rollout_cli;
use crate::grpc::ClientTlsArgs;
use crate::proto::v1::fleet_event::Event;
use crate::proto::v1::fleet_service_client::FleetServiceClient;
use crate::proto::v1::{self as pb};

#[derive(Args)]
pub struct FleetArgs {
    /// The controller's URL (https:// with --ca, --cert and --key).
    #[arg(long, global = true, default_value = super::DEFAULT_URL)]
    controller: String,
    #[command(flatten)]
    tls: ClientTlsArgs,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: FleetCommand,
}

#[derive(Subcommand)]
enum FleetCommand {
    /// Validate, store and push a config to the nodes matching --selector.
    Publish {
        /// The config file: listeners, routes, upstreams (no node-local sections).
        file: PathBuf,
        /// Node labels that must all match, e.g. env=prod,region=eu (default: every node).
        #[arg(long, default_value = "")]
        selector: String,
        #[arg(long, default_value = "")]
        comment: String,
        /// Recorded with the version (default: $USER; with mTLS, the certificate's name).
        #[arg(long)]
        author: Option<String>,
        /// Follow the target nodes: print each ACK and NACK as it arrives;
        /// exit 0 once every target runs the version, 1 on a NACK or when
        /// a target has not answered within --ack-timeout.
        #[arg(long)]
        wait: bool,
        /// With --wait, or for each wave of a rollout: how long the
        /// targets have to run the version.
        #[arg(long, default_value = "60s", value_parser = crate::config::parse_duration)]
        ack_timeout: Duration,
        /// Stage the version: the cumulative share of the targets by the
        /// end of each wave, e.g. 1,10%,50%,100%. Each wave must ACK and
        /// bake with its health green before the next; a failed gate
        /// withdraws the version from every wave reached.
        #[arg(long, conflicts_with = "waves_by")]
        waves: Option<String>,
        /// Stage the version one value of this node label after another
        /// (sorted), then the nodes without it: e.g. region.
        #[arg(long)]
        waves_by: Option<String>,
        /// With --waves or --waves-by: how long each wave runs the
        /// version, gates green, before the next.
        #[arg(long, default_value = "30s", value_parser = crate::config::parse_duration)]
        bake: Duration,
        /// With --waves or --waves-by: how far the 5xx share of the nodes
        /// on the new version may rise above that of the nodes not reached
        /// yet before the version is withdrawn.
        #[arg(long, default_value = "1%")]
        max_5xx_increase: String,
        /// Every matching node at once, although the controller stages
        /// publishes by default (--default-waves); needs --reason.
        #[arg(long, requires = "reason", conflicts_with_all = ["waves", "waves_by"])]
        all_at_once: bool,
        /// Why it goes at once: recorded in the version history.
        #[arg(long, requires = "all_at_once")]
        reason: Option<String>,
    },
    /// Staged rollouts: their progress; pause, resume, promote, abort.
    Rollout {
        #[command(subcommand)]
        command: RolloutCommand,
    },
    /// Every node: connected, the version it runs and should run, its last NACK, health.
    Nodes {
        #[arg(long, default_value = "")]
        selector: String,
    },
    /// Published versions, newest first.
    Versions,
    /// One version with its config text.
    Show { version: u64 },
    /// Publish an earlier version again, as a new version.
    Rollback {
        version: u64,
        #[arg(long, default_value = "")]
        comment: String,
        #[arg(long)]
        author: Option<String>,
    },
    /// Stream fleet events: connects, disconnects, publishes, ACKs, NACKs, health.
    Watch,
    /// Each upstream server as the connected nodes see it: up, down, unchecked.
    Health {
        /// Only this upstream.
        #[arg(long, default_value = "")]
        upstream: String,
    },
}

#[derive(Subcommand)]
enum RolloutCommand {
    /// The rollout of VERSION (default: the newest one): its state, each
    /// wave's nodes running it, the bake, why it stopped.
    Status {
        version: Option<u64>,
        /// Follow it until it ends: exit 0 when it completes, 1 when it
        /// failed or was stopped.
        #[arg(long)]
        watch: bool,
    },
    /// Stop a rollout and withdraw its version from the waves it reached:
    /// their nodes go back to the version they ran before.
    Abort {
        version: u64,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Hold a running rollout where it is: no gate runs, no wave starts.
    Pause { version: u64 },
    /// Carry on with a paused rollout; the current wave's ACK clock and
    /// bake start again.
    Resume { version: u64 },
    /// Skip the rest of the current wave's bake.
    Promote { version: u64 },
}

pub async fn run(args: FleetArgs) -> ExitCode {
    let json = args.json;
    // Publishing changes the fleet: it is retried, with one idempotency key,
    // while the controller cannot be reached or the call breaks off.
    let key = format!("{:032x}", rand::random::<u128>());
    let result = match &args.command {
        FleetCommand::Publish {
            file,
            selector,
            comment,
            author,
            wait,
            ack_timeout,
            waves,
            waves_by,
            bake,
            max_5xx_increase,
            all_at_once: _,
            reason,
        } => {
            let config = match std::fs::read_to_string(file) {
                Ok(config) => config,
                Err(e) => {
                    eprintln!("tether fleet: {}: {e}", file.display());
                    return ExitCode::from(1);
                }
            };
            let request = pb::PublishConfigRequest {
                config,
                selector: selector.clone(),
                comment: comment.clone(),
                author: author.clone().unwrap_or_else(default_author),
                idempotency_key: key,
                rollout: (waves.is_some() || waves_by.is_some()).then(|| pb::RolloutPlan {
                    waves: waves.iter().cloned().collect(),
                    waves_by: waves_by.clone().unwrap_or_default(),
                    bake_ms: bake.as_millis() as u64,
                    ack_timeout_ms: ack_timeout.as_millis() as u64,
                    max_5xx_increase: max_5xx_increase.clone(),
                }),
                all_at_once_reason: reason.clone().unwrap_or_default(),
            };
            let published = with_retries(&args, |mut client| {
                let request = request.clone();
                async move { client.publish_config(request).await }
            })
            .await
            .map(|r| r.into_inner());
            match published {
                Ok(published) => {
                    print_published(&published, json);
                    if *wait && published.rollout.is_some() {
                        follow_rollout(&args, published.version).await
                    } else if *wait {
                        follow(&args, &published, selector, *ack_timeout).await
                    } else {
                        Ok(())
                    }
                }
                Err(failed) => Err(failed),
            }
        }
        FleetCommand::Rollback {
            version,
            comment,
            author,
        } => {
            let request = pb::RollbackRequest {
                version: *version,
                comment: comment.clone(),
                author: author.clone().unwrap_or_else(default_author),
                idempotency_key: key,
            };
            with_retries(&args, |mut client| {
                let request = request.clone();
                async move { client.rollback(request).await }
            })
            .await
            .map(|r| print_published(&r.into_inner(), json))
        }
        FleetCommand::Rollout {
            command:
                RolloutCommand::Status {
                    version,
                    watch: true,
                },
        } => {
            let version = match connect(&args).await {
                Ok(mut client) => rollout_cli::status(&mut client, *version)
                    .await
                    .map(|(version, _)| version)
                    .map_err(Failed::Refused),
                Err(message) => Err(Failed::Unreachable(message)),
            };
            match version {
                Ok(version) => follow_rollout(&args, version).await,
                Err(failed) => Err(failed),
            }
        }
        _ => match connect(&args).await {
            Ok(mut client) => read(&mut client, &args.command, json)
                .await
                .map_err(Failed::Refused),
            Err(message) => Err(Failed::Unreachable(message)),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failed::Unreachable(message)) => {
            eprintln!("tether fleet: cannot reach {}: {message}", args.controller);
            ExitCode::from(2)
        }
        Err(Failed::NotApplied(message)) => {
            eprintln!("tether fleet: {message}");
            ExitCode::from(1)
        }
        Err(Failed::Refused(status)) => {
            eprintln!("tether fleet: {}", status.message());
            match status.code() {
                Code::InvalidArgument
                | Code::NotFound
                | Code::PermissionDenied
                | Code::FailedPrecondition
                | Code::AlreadyExists => ExitCode::from(1),
                _ => ExitCode::from(2),
            }
        }
    }
}

/// The commands that only read.
async fn read(
    client: &mut FleetServiceClient<Channel>,
    command: &FleetCommand,
    json: bool,
) -> Result<(), Status> {
    match command {
        FleetCommand::Nodes { selector } => client
            .list_nodes(pb::ListNodesRequest {
                selector: selector.clone(),
            })
            .await
            .map(|r| print_nodes(&r.into_inner().nodes, json)),
        FleetCommand::Versions => client
            .list_versions(pb::ListVersionsRequest {})
            .await
            .map(|r| print_versions(&r.into_inner().versions, json)),
        FleetCommand::Show { version } => client
            .get_version(pb::GetVersionRequest { version: *version })
            .await
            .map(|r| print_version(&r.into_inner(), json)),
        FleetCommand::Watch => watch(client, json).await,
        FleetCommand::Health { upstream } => client
            .fleet_health(pb::FleetHealthRequest {
                upstream: upstream.clone(),
            })
            .await
            .map(|r| print_fleet_health(&r.into_inner().servers, json)),
        FleetCommand::Rollout {
            command: RolloutCommand::Status { version, .. },
        } => {
            let (version, status) = rollout_cli::status(client, *version).await?;
            if json {
                println!("{}", rollout_cli::status_json(version, &status));
            } else {
                println!("{}", rollout_cli::status_line(version, &status));
            }
            Ok(())
        }
        FleetCommand::Rollout { command } => {
            let (version, action, reason) = match command {
                RolloutCommand::Abort { version, reason } => {
                    (*version, pb::RolloutAction::Abort, reason.clone())
                }
                RolloutCommand::Pause { version } => {
                    (*version, pb::RolloutAction::Pause, String::new())
                }
                RolloutCommand::Resume { version } => {
                    (*version, pb::RolloutAction::Resume, String::new())
                }
                RolloutCommand::Promote { version } => {
                    (*version, pb::RolloutAction::Promote, String::new())
                }
                RolloutCommand::Status { .. } => unreachable!("matched above"),
            };
            let status = client
                .control_rollout(pb::ControlRolloutRequest {
                    version,
                    action: action as i32,
                    reason,
                })
                .await?
                .into_inner()
                .status
                .unwrap_or_default();
            if json {
                println!("{}", rollout_cli::status_json(version, &status));
            } else {
                println!("{}", rollout_cli::status_line(version, &status));
            }
            Ok(())
        }
        FleetCommand::Publish { .. } | FleetCommand::Rollback { .. } => {
            unreachable!("publishing is retried by run")
        }
    }
}

enum Failed {
    Unreachable(String),
    Refused(Status),
    /// Published, but not every target runs it (`--wait`).
    NotApplied(String),
}

/// `publish --wait`: follows the targets until each has answered.
async fn follow(
    args: &FleetArgs,
    published: &pb::PublishConfigResponse,
    selector: &str,
    timeout: Duration,
) -> Result<(), Failed> {
    let mut client = connect(args).await.map_err(Failed::Unreachable)?;
    let version = published.version;
    let targets = &published.targets;
    let Err(not_applied) = wait_for_answers(
        &mut client,
        version,
        selector,
        targets,
        timeout,
        Mode::of_stdout(args.json),
    )
    .await
    else {
        return Ok(());
    };
    let message = not_applied.message(version, timeout);
    match not_applied {
        NotApplied::Unreachable(status) if broke_off(&status) => Err(Failed::Unreachable(message)),
        _ => Err(Failed::NotApplied(message)),
    }
}

/// `publish --waves --wait`, `rollout status --watch`: follows the
/// rollout until it ends.
async fn follow_rollout(args: &FleetArgs, version: u64) -> Result<(), Failed> {
    let mut client = connect(args).await.map_err(Failed::Unreachable)?;
    match rollout_cli::follow(&mut client, version, Mode::of_stdout(args.json)).await {
        Ok(rollout_cli::Ended::Completed) => Ok(()),
        Ok(rollout_cli::Ended::Stopped(reason)) => Err(Failed::NotApplied(reason)),
        Err(status) if broke_off(&status) => Err(Failed::Unreachable(status.message().to_owned())),
        Err(status) => Err(Failed::Refused(status)),
    }
}

/// How long a publish keeps trying: about 6 s, doubling from 200 ms.
const RETRY_DELAYS: [Duration; 5] = [
    Duration::from_millis(200),
    Duration::from_millis(400),
    Duration::from_millis(800),
    Duration::from_millis(1600),
    Duration::from_millis(3200),
];

/// Calls `call` on a fresh connection until it answers, retrying when the
/// controller cannot be reached or the call breaks off (the controller
/// stopped mid-call: it may or may not have stored the publish, and the
/// idempotency key makes the retry safe either way).
async fn with_retries<T, F, Fut>(args: &FleetArgs, mut call: F) -> Result<T, Failed>
where
    F: FnMut(FleetServiceClient<Channel>) -> Fut,
    Fut: std::future::Future<Output = Result<T, Status>>,
{
    let mut delays = RETRY_DELAYS.iter();
    loop {
        let failure = match connect(args).await {
            Ok(client) => match call(client).await {
                Ok(answer) => return Ok(answer),
                Err(status) if broke_off(&status) => Failed::Refused(status),
                Err(status) => return Err(Failed::Refused(status)),
            },
            Err(message) => Failed::Unreachable(message),
        };
        let Some(delay) = delays.next() else {
            return Err(failure);
        };
        tokio::time::sleep(*delay).await;
    }
}

/// A call that ended without the controller's answer.
fn broke_off(status: &Status) -> bool {
    matches!(
        status.code(),
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
    )
}

fn default_author() -> String {
    std::env::var("USER").unwrap_or_default()
}

async fn connect(args: &FleetArgs) -> Result<FleetServiceClient<Channel>, String> {
    Ok(FleetServiceClient::new(
        args.tls.connect(&args.controller).await?,
    ))
}

async fn watch(client: &mut FleetServiceClient<Channel>, json: bool) -> Result<(), Status> {
    let mut events = client
        .watch_fleet(pb::WatchFleetRequest {})
        .await?
        .into_inner();
    while let Some(event) = events.message().await? {
        if json {
            println!("{}", event_json(&event));
        } else {
            println!("{}", event_line(&event));
        }
    }
    Ok(())
}

fn print_published(response: &pb::PublishConfigResponse, json: bool) {
    if json {
        let mut value = json!({ "version": response.version, "targets": response.targets });
        if let Some(rollout) = &response.rollout {
            value["rollout"] = rollout_json(rollout);
        }
        println!("{value}");
    } else {
        println!(
            "published version {} to {} node{}{}",
            response.version,
            response.targets.len(),
            if response.targets.len() == 1 { "" } else { "s" },
            if response.targets.is_empty() {
                String::new()
            } else {
                format!(": {}", response.targets.join(", "))
            }
        );
        if let Some(rollout) = &response.rollout {
            println!("{}", rollout_cli::status_line(response.version, rollout));
        }
    }
}

fn labels(labels: &std::collections::HashMap<String, String>) -> String {
    let sorted: BTreeMap<_, _> = labels.iter().collect();
    sorted
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// "api/10.0.0.7:8080 down on 3 of 60 nodes: eu-1, eu-2, eu-3".
fn print_fleet_health(servers: &[pb::ServerFleetHealth], json: bool) {
    if json {
        let rows = servers.iter().map(|s| {
            json!({
                "upstream": s.upstream, "server": s.server,
                "up": s.up, "down": s.down, "unknown": s.unknown,
            })
        });
        println!("{}", Value::Array(rows.collect()));
        return;
    }
    for server in servers {
        let nodes = server.up.len() + server.down.len() + server.unknown.len();
        let name = format!("{}/{}", server.upstream, server.server);
        if server.down.is_empty() {
            println!("{name} up on {} of {nodes} nodes", server.up.len());
        } else {
            println!(
                "{name} down on {} of {nodes} nodes: {}",
                server.down.len(),
                server.down.join(", ")
            );
        }
    }
}

fn print_nodes(nodes: &[pb::NodeStatus], json: bool) {
    if json {
        println!("{}", Value::Array(nodes.iter().map(node_json).collect()));
        return;
    }
    println!(
        "{:<20} {:<10} {:>7} {:>7} {:>9}  {:<28} LABELS",
        "NODE", "STATE", "VERSION", "DESIRED", "UP/DOWN", "LAST NACK"
    );
    for node in nodes {
        let state = if node.connected { "connected" } else { "away" };
        let nack = node
            .last_nack
            .as_ref()
            .map(|n| format!("v{}: {}", n.version, n.reason))
            .unwrap_or_else(|| "-".to_owned());
        println!(
            "{:<20} {:<10} {:>7} {:>7} {:>9}  {:<28} {}",
            node.id,
            state,
            version(node.version),
            version(node.desired_version),
            format!("{}/{}", node.servers_up, node.servers_down),
            nack,
            labels(&node.labels)
        );
        if let Some(nack) = &node.last_nack {
            for error in &nack.errors {
                println!("    {error_line}", error_line = error_line(error));
            }
        }
        for down in &node.down {
            println!("    down: {down}");
        }
    }
}

fn version(number: u64) -> String {
    if number == 0 {
        "-".to_owned()
    } else {
        format!("v{number}")
    }
}

fn error_line(error: &pb::ConfigError) -> String {
    format!(
        "{}:{}: {}: {}",
        error.line, error.column, error.path, error.message
    )
}

fn print_versions(versions: &[pb::VersionInfo], json: bool) {
    if json {
        println!(
            "{}",
            Value::Array(versions.iter().map(version_json).collect())
        );
        return;
    }
    println!(
        "{:<8} {:<30} {:<16} {:<20} {:<12} COMMENT",
        "VERSION", "PUBLISHED", "AUTHOR", "SELECTOR", "ROLLOUT"
    );
    for info in versions {
        let comment = if info.rollback_of > 0 && info.comment.is_empty() {
            format!("rollback of v{}", info.rollback_of)
        } else {
            info.comment.clone()
        };
        let rollout = match &info.rollout {
            Some(status) => status.state.as_str(),
            None if !info.all_at_once_reason.is_empty() => "at once",
            None => "-",
        };
        let comment = match info.all_at_once_reason.as_str() {
            "" => comment,
            reason if comment.is_empty() => format!("(at once: {reason})"),
            reason => format!("{comment} (at once: {reason})"),
        };
        println!(
            "{:<8} {:<30} {:<16} {:<20} {:<12} {}",
            format!("v{}", info.version),
            time(info.published_at.as_ref()),
            info.author,
            if info.selector.is_empty() {
                "(all)"
            } else {
                &info.selector
            },
            rollout,
            comment
        );
    }
}

fn print_version(response: &pb::GetVersionResponse, json: bool) {
    let info = response.info.clone().unwrap_or_default();
    if json {
        let mut value = version_json(&info);
        value["config"] = Value::String(response.config.clone());
        println!("{value}");
    } else {
        println!(
            "# version {} ({}), by {}, selector {:?}: {}",
            info.version,
            time(info.published_at.as_ref()),
            info.author,
            info.selector,
            info.comment
        );
        print!("{}", response.config);
    }
}

fn event_line(event: &pb::FleetEvent) -> String {
    let at = time(event.at.as_ref());
    let node = &event.node_id;
    match &event.event {
        Some(Event::Connected(c)) => format!(
            "{at}  {node}: connected from {} running {} [{}]",
            c.address,
            version(c.version),
            labels(&c.labels)
        ),
        Some(Event::Disconnected(d)) => format!("{at}  {node}: disconnected ({})", d.reason),
        Some(Event::Published(info)) => format!(
            "{at}  published v{} to {:?} by {}: {}",
            info.version, info.selector, info.author, info.comment
        ),
        Some(Event::Acked(ack)) => format!(
            "{at}  {node}: ACK v{} (generation {})",
            ack.version, ack.generation
        ),
        Some(Event::Nacked(nack)) => {
            let mut line = format!("{at}  {node}: NACK v{}: {}", nack.version, nack.reason);
            for error in &nack.errors {
                line.push_str(&format!("\n    {}", error_line(error)));
            }
            line
        }
        Some(Event::Health(t)) => format!(
            "{at}  {node}: {}/{} {} -> {} ({})",
            t.upstream,
            t.server,
            health_name(t.from),
            health_name(t.to),
            t.reason
        ),
        Some(Event::EventsMissed(m)) => format!("{at}  ({} events missed)", m.count),
        Some(Event::Rollout(r)) => format!(
            "{at}  {}",
            rollout_cli::status_line(r.version, &r.status.clone().unwrap_or_default())
        ),
        None => format!("{at}  {node}: (unknown event)"),
    }
}
