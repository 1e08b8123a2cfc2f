//! The `tether` command line. `main` stays thin: parse arguments, then call
//! into the node (or, later, controller) code.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{Parser, Subcommand};
use tokio::signal::unix::{signal, SignalKind};

use crate::config::Config;
use crate::run::Node;

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
            let runtime = match server_runtime() {
                Ok(runtime) => runtime,
                Err(code) => return code,
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
            disable_transparent_huge_pages();
            match server_runtime() {
                Ok(runtime) => runtime.block_on(run_node(config)),
                Err(code) => code,
            }
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

/// The multi-threaded runtime the node and the controller run on.
fn server_runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("tether: cannot start the runtime: {e}");
            ExitCode::FAILURE
        })
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
    let local = crate::run::local_config(&config_path);
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
    let node = match Node::start(&config_path).await {
        Ok(node) => node,
        Err(e) => {
            match e.config_errors() {
                Some(errors) => print_config_errors(&config_path, errors),
                None => eprintln!("tether: {e}"),
            }
            return ExitCode::FAILURE;
        }
    };
    crate::telemetry::metrics::observe_node(Arc::new(node.handle().clone()));
    serving.store(true, Ordering::Relaxed);
    if let Some(generation) = node.handle().current() {
        for listener in &generation.listeners {
            tracing::info!(listener = %listener.config.name, address = %listener.bound, protocol = listener.config.protocol.as_str(), "listening");
        }
    }
    let mtls = node
        .handle()
        .current()
        .is_some_and(|generation| generation.config.control.tls.is_some());
    tracing::info!(address = %node.control_addr(), mtls, "control service listening");
    loop {
        tokio::select! {
            _ = node.stopped() => break,
            _ = hangup.recv() => {
                // The outcome is logged by the supervisor.
                let _ = node.reload().await;
            }
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
        }
    }
    serving.store(false, Ordering::Relaxed);
    // A second signal while draining stops at once.
    let code = tokio::select! {
        _ = node.shutdown(None) => ExitCode::SUCCESS,
        _ = terminate.recv() => return ExitCode::FAILURE,
        _ = interrupt.recv() => return ExitCode::FAILURE,
    };
    telemetry.shutdown();
    tracing::info!("stopped");
    code
}
