//! The controller and its fleet: real `tether controller` and `tether node`
//! processes on loopback, real Sync streams, real HTTP through the nodes.

#[path = "../support/mod.rs"]
mod support;

mod controller;
mod controller_integrity;
mod dashboard;
mod dashboard_page;
mod fleet_health;
#[cfg(feature = "etcd")]
mod replicas;
#[cfg(not(feature = "etcd"))]
mod replicas_skipped;
mod rollout;
