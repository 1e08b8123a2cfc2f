//! tether: a reverse-proxy node (this crate's `node/` tree) and the
//! controller that runs a fleet of them.
//!
//! The node's modules follow the path a request takes: `listen` accepts,
//! `tls` terminates TLS, `http` speaks HTTP (or `tcp_proxy` and `proxy`
//! handle TCP, CONNECT and SOCKS5, over a `relay`), `route` picks a
//! target, `tunnel` carries services of nodes behind NAT to a public node, `upstream` picks a server and holds the connection pools,
//! `health` checks the servers, `http` also serves static files.
//! `config` turns TOML into a validated `Config`; `supervisor` applies
//! configs as `generation`s; `control` serves the gRPC control API and
//! `ctl` is its command-line client; `agent` subscribes the node to a
//! controller. The controller itself is the `controller/` tree. The
//! modules are layers that point one way (README, "Layout";
//! tests/layers.rs keeps the order).

pub mod agent;
pub mod certs;
pub mod cli;
pub mod config;
pub mod control;
#[path = "../controller/mod.rs"]
pub mod controller;
pub mod ctl;
pub mod durable;
pub mod events;
pub mod generation;
pub mod grpc;
pub mod health;
pub mod http;
pub mod identity;
pub mod lifecycle;
pub mod listen;
pub mod pki;
pub mod proto;
pub mod proxy;
pub mod relay;
pub mod report;
pub mod route;
pub mod run;
pub mod stream;
pub mod supervisor;
pub mod tcp_proxy;
pub mod telemetry;
pub mod tls;
pub mod tunnel;
pub mod upstream;
pub mod wire;
pub mod workers;

pub use run::{Node, StartError};
