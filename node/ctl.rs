//! `tether ctl`: a small client of a node's ControlService for people
//! without grpcurl. Human-readable output; exit codes scripts can rely on:
//! 0 success, 1 the node refused (invalid config, bind failure) or a local
//! file could not be read, 2 the node could not be reached or the call
//! failed otherwise.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use clap::{Args, Subcommand};
use tonic::transport::Channel;
use tonic::Code;

use crate::config::{format_duration, parse_duration, DEFAULT_CONTROL_LISTEN};
use crate::grpc::ClientTlsArgs;
use crate::proto::v1::control_service_client::ControlServiceClient;
use crate::proto::v1::{self as pb, node_event::Event};

#[derive(Args)]
pub struct CtlArgs {
    /// The node's control address.
    #[arg(long, default_value = DEFAULT_CONTROL_LISTEN, global = true)]
    addr: String,
    #[command(flatten)]
    tls: ClientTlsArgs,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Apply a config: the node re-reads its own file, or applies --file.
    Reload {
        /// A local config file to send to the node.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Validate a local config file on the node without applying it.
    Validate { file: PathBuf },
    /// Show the config in force and what is live.
    Config {
        /// Print the config text too.
        #[arg(long)]
        text: bool,
    },
    /// Stop the node gracefully.
    Stop {
        /// How long in-flight work may take (default: the node's drain_timeout).
        #[arg(long, value_parser = parse_duration)]
        drain: Option<Duration>,
    },
    /// Show upstream server health; --watch streams every event after.
    Health {
        #[arg(long)]
        watch: bool,
    },
}

pub async fn run(args: CtlArgs) -> ExitCode {
    // A file that cannot be read is the caller's mistake (exit 1), found
    // before the node is even asked.
    let file_text = match &args.command {
        CtlCommand::Reload { file: Some(file) } | CtlCommand::Validate { file } => {
            match std::fs::read_to_string(file) {
                Ok(text) => Some(text),
                Err(e) => {
                    eprintln!("tether ctl: cannot read {}: {e}", file.display());
                    return ExitCode::FAILURE;
                }
            }
        }
        _ => None,
    };
    let mut client = match connect(&args).await {
        Ok(client) => client,
        Err(message) => {
            eprintln!("tether ctl: cannot reach {}: {message}", args.addr);
            return ExitCode::from(2);
        }
    };
    let result = match args.command {
        CtlCommand::Reload { .. } => reload(&mut client, file_text).await,
        CtlCommand::Validate { file } => {
            validate(&mut client, &file, file_text.unwrap_or_default()).await
        }
        CtlCommand::Config { text } => config(&mut client, text).await,
        CtlCommand::Stop { drain } => stop(&mut client, drain).await,
        CtlCommand::Health { watch } => health(&mut client, watch).await,
    };
    match result {
        Ok(code) => code,
        Err(status) => {
            eprintln!(
                "tether ctl: {}: {}",
                code_name(status.code()),
                status.message()
            );
            ExitCode::from(2)
        }
    }
}

async fn connect(args: &CtlArgs) -> Result<ControlServiceClient<Channel>, String> {
    let scheme = if args.tls.enabled() { "https" } else { "http" };
    let channel = args
        .tls
        .connect(&format!("{scheme}://{}", args.addr))
        .await?;
    Ok(ControlServiceClient::new(channel))
}

type CtlResult = Result<ExitCode, tonic::Status>;

/// `text`: a local file's config; `None`: the node re-reads its own file.
async fn reload(client: &mut ControlServiceClient<Channel>, text: Option<String>) -> CtlResult {
    let source = match text {
        Some(text) => pb::reload_request::Source::ConfigText(text),
        None => pb::reload_request::Source::FromFile(true),
    };
    match client
        .reload(pb::ReloadRequest {
            source: Some(source),
        })
        .await
    {
        Ok(response) => {
            let response = response.into_inner();
            let info = response.config.unwrap_or_default();
            let took = response
                .apply_duration
                .and_then(|d| Duration::try_from(d).ok())
                .unwrap_or_default();
            println!(
                "applied: generation {} version {} in {took:.1?}",
                info.generation, info.version
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(status)
            if matches!(
                status.code(),
                Code::InvalidArgument | Code::FailedPrecondition
            ) =>
        {
            eprintln!("refused; the config in force is unchanged:");
            for line in status.message().lines().skip(1) {
                eprintln!("{}", line.trim_start());
            }
            if status.message().lines().count() <= 1 {
                eprintln!("{}", status.message());
            }
            Ok(ExitCode::FAILURE)
        }
        Err(status) => Err(status),
    }
}

async fn validate(
    client: &mut ControlServiceClient<Channel>,
    file: &Path,
    text: String,
) -> CtlResult {
    let request = pb::ValidateRequest {
        source: Some(pb::validate_request::Source::ConfigText(text)),
    };
    let response = client.validate(request).await?.into_inner();
    if response.valid {
        println!("{}: ok: {}", file.display(), response.summary);
        return Ok(ExitCode::SUCCESS);
    }
    for error in &response.errors {
        eprintln!(
            "{}:{}:{}: {}: {}",
            file.display(),
            error.line,
            error.column,
            error.path,
            error.message
        );
    }
    eprintln!("{}: {}", file.display(), response.summary);
    Ok(ExitCode::FAILURE)
}

async fn config(client: &mut ControlServiceClient<Channel>, text: bool) -> CtlResult {
    let config = client
        .get_config(pb::GetConfigRequest {})
        .await?
        .into_inner();
    let info = config.config.clone().unwrap_or_default();
    println!("node        {}", config.node_id);
    println!("generation  {}", info.generation);
    println!("version     {}", info.version);
    println!(
        "source      {}{}",
        source_name(info.source),
        if info.source_detail.is_empty() {
            String::new()
        } else {
            format!(" {}", info.source_detail)
        }
    );
    println!(
        "applied     {}",
        info.applied_at.map(ago).unwrap_or_default()
    );
    println!("\nlisteners");
    for l in &config.listeners {
        println!(
            "  {:<16} {:<8} {:<22} {} routes, {} connections",
            l.name, l.protocol, l.bound, l.routes, l.open_connections
        );
    }
    println!("\nupstreams");
    print_upstreams(&config.upstreams);
    if !config.tunnels.is_empty() {
        println!("\ntunnels");
        for t in &config.tunnels {
            println!("  {}", tunnel_line(t));
        }
    }
    if !config.draining.is_empty() {
        println!("\ndraining");
        for d in &config.draining {
            println!(
                "  generation {} ({}): {} connections, {} requests in flight, since {}",
                d.generation,
                d.version,
                d.open_connections,
                d.requests_in_flight,
                d.draining_since.map(ago).unwrap_or_default()
            );
        }
    }
    if text {
        println!("\n{}", config.config_text);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_upstreams(upstreams: &[pb::UpstreamStatus]) {
    for u in upstreams {
        println!("  {} ({})", u.name, u.balance);
        for s in &u.servers {
            println!(
                "    {:<22} weight {:<3} {:<9} {} active",
                s.address,
                s.weight,
                health_name(s.health),
                s.active_requests
            );
        }
    }
}

async fn stop(client: &mut ControlServiceClient<Channel>, drain: Option<Duration>) -> CtlResult {
    let drain = drain.and_then(|d| prost_types::Duration::try_from(d).ok());
    let response = client.stop(pb::StopRequest { drain }).await?.into_inner();
    println!(
        "stopping: generation {} no longer accepts; draining {} connections",
        response.generation, response.open_connections
    );
    Ok(ExitCode::SUCCESS)
}

async fn health(client: &mut ControlServiceClient<Channel>, watch: bool) -> CtlResult {
    let mut stream = client
        .watch_health(pb::WatchHealthRequest {})
        .await?
        .into_inner();
    while let Some(event) = stream.message().await? {
        let at = event.at.map(ago).unwrap_or_default();
        match event.event {
            Some(Event::Snapshot(snapshot)) => {
                if let Some(info) = snapshot.config {
                    println!("generation {} version {}", info.generation, info.version);
                }
                print_upstreams(&snapshot.upstreams);
                for t in &snapshot.tunnels {
                    println!("tunnel {}", tunnel_line(t));
                }
                if !watch {
                    return Ok(ExitCode::SUCCESS);
                }
            }
            Some(Event::Transition(t)) => println!(
                "{at}  {} {} {} -> {} ({})",
                t.upstream,
                t.server,
                health_name(t.from),
                health_name(t.to),
                t.reason
            ),
            Some(Event::ConfigApplied(applied)) => {
                let info = applied.config.unwrap_or_default();
                println!(
                    "{at}  config applied: generation {} version {}",
                    info.generation, info.version
                );
            }
            Some(Event::GenerationDrained(d)) => {
                println!(
                    "{at}  generation {} drained ({} closed at the deadline)",
                    d.generation, d.closed_at_timeout
                );
            }
            Some(Event::Tunnel(t)) => println!("{at}  tunnel {}", tunnel_line(&t)),
            Some(Event::EventsMissed(m)) => {
                println!("{at}  missed {} events; a fresh snapshot follows", m.count)
            }
            None => {}
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `home dial 203.0.113.7:7443 up 2/2, 3 streams [web, ssh]`, and the
/// last error when there is one.
fn tunnel_line(t: &pb::TunnelStatus) -> String {
    let mut line = format!(
        "{:<12} {:<6} {:<22} up {}/{}, {} streams [{}]",
        t.name,
        t.role,
        t.peer,
        t.connections_up,
        t.connections_wanted,
        t.open_streams,
        t.services.join(", ")
    );
    if !t.last_error.is_empty() {
        line.push_str(&format!(" ({})", t.last_error));
    }
    line
}

fn ago(timestamp: prost_types::Timestamp) -> String {
    let Ok(time) = SystemTime::try_from(timestamp) else {
        return String::new();
    };
    let date = httpdate::fmt_http_date(time);
    match SystemTime::now().duration_since(time) {
        Ok(elapsed) => format!(
            "{date} ({} ago)",
            format_duration(Duration::from_secs(elapsed.as_secs()))
        ),
        Err(_) => date,
    }
}

fn source_name(source: i32) -> &'static str {
    match pb::ConfigSource::try_from(source) {
        Ok(pb::ConfigSource::File) => "file",
        Ok(pb::ConfigSource::Inline) => "inline",
        Ok(pb::ConfigSource::Controller) => "controller",
        _ => "unknown",
    }
}

fn health_name(health: i32) -> &'static str {
    match pb::HealthState::try_from(health) {
        Ok(pb::HealthState::Healthy) => "healthy",
        Ok(pb::HealthState::Unhealthy) => "unhealthy",
        Ok(pb::HealthState::Unknown) => "unknown",
        _ => "-",
    }
}

fn code_name(code: Code) -> String {
    format!("{code:?}").to_lowercase()
}
