//! The `tether` command line. `main` stays thin: parse arguments, then call
//! into the node (or, later, controller) code.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;
use crate::supervisor::{self, ApplyError, ApplySource};

#[derive(Parser)]
#[command(
    name = "tether",
    version,
    about = "A fleet of reverse-proxy nodes run from one controller"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a proxy node. SIGHUP re-reads the config file; SIGTERM or
    /// SIGINT stop it gracefully (a second one stops it at once).
    Node {
        /// The node's TOML config file.
        #[arg(short, long)]
        config: PathBuf,
    },
    /// Validate a config file without applying it, like `nginx -t`.
    Check {
        /// The TOML config file to check.
        file: PathBuf,
    },
    /// Drive a running node over its control service.
    Ctl(crate::ctl::CtlArgs),
    /// Run the controller: stores config versions and pushes them to nodes.
    Controller(crate::controller::ControllerArgs),
    /// Drive the fleet through the controller: publish, nodes, versions,
    /// rollback, watch.
    Fleet(crate::controller::fleet_cli::FleetArgs),
    /// Make a CA and the controller, node and operator certificates for mTLS.
    Certs(crate::certs::CertsArgs),
}

/// How long the control service may take to answer its last calls once
/// the node has drained.
const CONTROL_SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Node { .. } | Command::Controller(_)) {
        exit_quietly_on_closed_pipe();
    }
    match cli.command {
        Command::Check { file } => check(&file),
        Command::Ctl(args) => client_runtime(crate::ctl::run(args)),
        Command::Fleet(args) => client_runtime(crate::controller::fleet_cli::run(args)),
        Command::Certs(args) => crate::certs::run(args),
        Command::Controller(args) => {
            crate::telemetry::init_logging();
            raise_fd_limit();
            disable_transparent_huge_pages();
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    eprintln!("tether: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match runtime.block_on(crate::controller::run(args)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(message) => {
                    eprintln!("tether controller: {message}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Node { config } => {
            crate::telemetry::init_logging();
            raise_fd_limit();
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    eprintln!("tether: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            runtime.block_on(run_node(config))
        }
    }
}

/// The command-line tools end quietly when their output pipe closes
/// (`tether check f.toml | head -1`), as Unix tools do: Rust ignores
/// SIGPIPE, which makes `println!` panic instead. The node and the
/// controller keep ignoring it; their sockets report EPIPE as an error.
fn exit_quietly_on_closed_pipe() {
    // SAFETY: resets one signal's disposition before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

/// Lifts the soft open-file limit to the hard one: a proxy or a
/// controller holds one descriptor per connection (nginx's
/// `worker_rlimit_nofile`, done by default).
pub fn raise_fd_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// The controller holds thousands of mostly idle connections, each with a
/// few small buffers; backed by 2 MiB transparent huge pages they cost
/// about twice the memory (bench/fleet.sh: 304 MiB → 175 MiB RSS at
/// 5,000 nodes).
fn disable_transparent_huge_pages() {
    // SAFETY: prctl with integer arguments only.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}

/// Command-line clients run on one thread.
fn client_runtime(client: impl std::future::Future<Output = ExitCode>) -> ExitCode {
    match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(client),
        Err(e) => {
            eprintln!("tether: cannot start the runtime: {e}");
            ExitCode::from(2)
        }
    }
}

fn check(file: &Path) -> ExitCode {
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("{}: cannot read: {e}", file.display());
            return ExitCode::FAILURE;
        }
    };
    let base_dir = file.parent().unwrap_or(Path::new("."));
    match Config::parse(&text, base_dir) {
        Ok(config) => {
            println!("{}: ok: {}", file.display(), config.summary());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            print_config_errors(file, &errors);
            eprintln!(
                "{}: {} error{}",
                file.display(),
                errors.len(),
                if errors.len() == 1 { "" } else { "s" }
            );
            ExitCode::FAILURE
        }
    }
}

fn print_config_errors(file: &Path, errors: &[crate::config::ConfigError]) {
    for error in errors {
        eprintln!("{}:{error}", file.display());
    }
}

/// The node's own file, parsed for its node-local settings; `None` if it
/// does not parse (the first apply reports why).
fn local_config(config_path: &Path) -> Option<Config> {
    let text = std::fs::read_to_string(config_path).ok()?;
    let base_dir = config_path.parent().unwrap_or(Path::new("."));
    Config::parse(&text, base_dir).ok()
}

/// Starts the node on the last config its controller pushed, if it has
/// one, so that a restart while the controller is down serves what the
/// fleet last agreed on; otherwise (or if that config no longer applies
/// here) on the config file.
async fn start_node(
    config_path: &Path,
    local: Option<&Config>,
) -> Result<supervisor::NodeHandle, ApplyError> {
    let file = Some(config_path.to_path_buf());
    let last_acked = local
        .and_then(|config| config.controller.clone())
        .and_then(
            |controller| match crate::agent::state::load(&controller.state_dir) {
                Ok(state) => state,
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring the saved controller config");
                    None
                }
            },
        );
    if let Some(state) = last_acked {
        let source = ApplySource::Controller {
            version: state.controller_version(),
            text: state.config,
            traceparent: String::new(),
        };
        match supervisor::start(file.clone(), source).await {
            Ok(node) => {
                tracing::info!(
                    version = state.version,
                    "serving the last config acknowledged to the controller"
                );
                return Ok(node);
            }
            Err(e) => {
                tracing::warn!(error = %e, version = state.version, "the saved controller config does not apply; starting from the file")
            }
        }
    }
    supervisor::start(file, ApplySource::File).await
}

async fn run_node(config_path: PathBuf) -> ExitCode {
    let (mut hangup, mut terminate, mut interrupt) = match (
        signal(SignalKind::hangup()),
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) {
        (Ok(h), Ok(t), Ok(i)) => (h, t, i),
        _ => {
            eprintln!("tether: cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    // Telemetry first, so the first apply is measured too. An unreadable
    // file is reported by the apply below.
    let local = local_config(&config_path);
    let telemetry_settings = local
        .as_ref()
        .map(|c| c.telemetry.clone())
        .unwrap_or_default();
    let node_id = local
        .as_ref()
        .map_or_else(crate::config::hostname, |c| c.node.id.clone());
    let identity = crate::telemetry::Identity {
        service: "tether-node",
        instance_id: &node_id,
    };
    let mut telemetry = match crate::telemetry::start(&telemetry_settings, identity) {
        Ok(telemetry) => telemetry,
        Err(e) => {
            eprintln!("tether: telemetry: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Ready from the first generation until the node begins to stop.
    let serving = Arc::new(AtomicBool::new(false));
    let ready = serving.clone();
    let readiness = Arc::new(move || ready.load(Ordering::Relaxed));
    if let Err(e) = telemetry.serve_prometheus(readiness).await {
        eprintln!("tether: {e}");
        return ExitCode::FAILURE;
    }
    let node = match start_node(&config_path, local.as_ref()).await {
        Ok(node) => node,
        Err(ApplyError::Invalid(errors) | ApplyError::Bind(errors)) => {
            print_config_errors(&config_path, &errors);
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("tether: {e}");
            return ExitCode::FAILURE;
        }
    };
    let Some(generation) = node.current() else {
        return ExitCode::FAILURE;
    };
    crate::telemetry::metrics::observe_node(Arc::new(node.clone()));
    serving.store(true, Ordering::Relaxed);
    for listener in &generation.listeners {
        tracing::info!(listener = %listener.config.name, address = %listener.bound, protocol = listener.config.protocol.as_str(), "listening");
    }
    let control_settings = generation.config.control.clone();
    // `[controller]` is read once, at start: the agent's connection is not
    // re-pointed by a reload.
    let agent = generation.config.controller.clone().map(|settings| {
        let id = generation.config.node.id.clone();
        tokio::spawn(crate::agent::run(node.clone(), settings, id))
    });
    let control_listen = control_settings.listen;
    drop(generation);
    let control = match tokio::net::TcpListener::bind(control_listen).await {
        Ok(listener) => listener,
        Err(e) => {
            eprintln!("tether: cannot bind the control service to {control_listen}: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        address = %control.local_addr().unwrap_or(control_listen),
        mtls = control_settings.tls.is_some(),
        "control service listening"
    );
    let control = tokio::spawn({
        let node = node.clone();
        async move {
            let stopped = node.clone();
            let result =
                crate::control::serve(control, control_settings.tls.as_ref(), node, async move {
                    stopped.stopped().await
                })
                .await;
            if let Err(e) = result {
                tracing::error!(error = %e, "control service failed");
            }
        }
    });
    loop {
        tokio::select! {
            _ = node.stopped() => break,
            _ = hangup.recv() => {
                // The outcome is logged by the supervisor.
                let _ = node.apply(ApplySource::File).await;
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    serving.store(false, Ordering::Relaxed);
    node.stop(None).await;
    let code = tokio::select! {
        _ = node.stopped() => ExitCode::SUCCESS,
        _ = terminate.recv() => return ExitCode::FAILURE,
        _ = interrupt.recv() => return ExitCode::FAILURE,
    };
    // Lets the control service finish answering (a Stop call, say), but a
    // client that keeps its connection open does not hold the exit.
    let _ = tokio::time::timeout(CONTROL_SHUTDOWN_GRACE, control).await;
    if let Some(agent) = agent {
        agent.abort();
    }
    telemetry.shutdown();
    tracing::info!("stopped");
    code
}
