//! What the end-to-end tests share: the node binary as it ships, started on
//! loopback with ephemeral ports; real upstream HTTP servers; real clients.
#![allow(dead_code, unused_imports)]

pub mod browser;
pub mod certs;
pub mod client;
pub mod control;
pub mod controller;
pub mod etcd;
pub mod local;
pub mod node;
pub mod origin;
pub mod rollout;

pub use certs::*;
pub use client::*;
pub use control::*;
pub use controller::*;
pub use etcd::*;
pub use local::*;
pub use node::*;
pub use origin::*;
pub use rollout::*;
