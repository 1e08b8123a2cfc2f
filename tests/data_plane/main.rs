//! The data plane end to end: real clients, real origins, real sockets on
//! loopback; nodes run in-process (`LocalNode`) unless a test is about
//! what only a process shows. One test binary, one module per concern.

#[path = "../support/mod.rs"]
mod support;

mod forward_proxy;
mod hardening;
mod health;
mod http1_path;
mod proxy;
mod reverse_tunnel;
mod static_files;
mod tcp;
mod tls;
mod unix_sockets;
mod upstream_tls;
mod websocket;
