//! The fleet as replicas of a shared store see it: what other replicas
//! wrote (versions, rollouts, nodes they hold and their answer counts) is
//! applied here, and this replica's answer counts are shared.

use std::sync::Arc;
use std::time::Duration;

use super::{wire_errors, Event, Fleet, NodeEntry, Remote, StoredNode, Tally, Version};
use crate::proto::v1::{self as pb};

impl Fleet {
    /// With a shared store, hands the answer counts of live rollouts to
    /// the replica that judges them, every second, for as long as the
    /// fleet lives.
    pub async fn share_answers(self: Arc<Self>) {
        if !self.store.is_shared() {
            return;
        }
        let mut every = tokio::time::interval(Duration::from_secs(1));
        loop {
            every.tick().await;
            let tallies: Vec<(u64, Tally)> = {
                let inner = self.lock();
                inner.answers.iter().map(|(v, t)| (*v, t.clone())).collect()
            };
            for (version, tally) in tallies {
                self.store.share_answers(version, tally);
            }
        }
    }

    /// Applies what other replicas of a shared store write, for as long as
    /// the store runs.
    pub async fn follow_store(
        self: Arc<Self>,
        mut remote: tokio::sync::mpsc::UnboundedReceiver<Remote>,
    ) {
        while let Some(change) = remote.recv().await {
            self.apply_remote(change);
        }
    }

    fn apply_remote(&self, change: Remote) {
        let mut inner = self.lock();
        match change {
            Remote::Version(stored) => {
                if inner.versions.contains_key(&stored.version) {
                    return;
                }
                let number = stored.version;
                let rollout = stored.rollout.clone();
                let version = match Version::from_stored(stored) {
                    Ok(version) => Arc::new(version),
                    Err(e) => {
                        tracing::error!(error = %e, "a version from the store cannot be read; ignored");
                        return;
                    }
                };
                if let Some(rollout) = rollout {
                    inner.rollouts.entry(number).or_insert(rollout);
                }
                inner.add_version(version.clone());
                inner.push_desired();
                drop(inner);
                tracing::info!(version = number, "version published by another replica");
                self.emit("", Event::Published(version.info()));
            }
            Remote::Rollout(rollout) => {
                let number = rollout.version;
                if inner.rollouts.get(&number) == Some(&rollout) {
                    return;
                }
                let status = inner.rollout_status(&rollout);
                inner.rollouts.insert(number, rollout);
                inner.push_desired();
                drop(inner);
                self.rollout_nudge.notify_one();
                self.emit_rollout(number, status);
            }
            Remote::Node(stored) => {
                let entry = inner
                    .nodes
                    .entry(stored.id.clone())
                    .or_insert_with(|| NodeEntry::new(stored.clone()));
                // A node whose stream is here is what this replica says.
                if entry.connection.is_some() {
                    return;
                }
                let fresh = NodeEntry::new(stored);
                let before = std::mem::replace(&mut entry.stored, fresh.stored);
                entry.health = fresh.health;
                let after = entry.stored.clone();
                drop(inner);
                self.rollout_nudge.notify_one();
                // WatchFleet on every replica tells what nodes held
                // elsewhere answered.
                if after.version != before.version && after.version != 0 {
                    let ack = pb::Ack {
                        version: after.version,
                        nonce: String::new(),
                        generation: after.generation,
                    };
                    self.emit(&after.id, Event::Acked(ack));
                }
                if let Some(nack) = after
                    .last_nack
                    .as_ref()
                    .filter(|n| Some(*n) != before.last_nack.as_ref())
                {
                    let nack = pb::Nack {
                        version: nack.version,
                        nonce: String::new(),
                        errors: wire_errors(&nack.errors),
                        reason: nack.reason.clone(),
                    };
                    self.emit(&after.id, Event::Nacked(nack));
                }
            }
            Remote::Answers {
                version,
                replica,
                tally,
            } => {
                inner
                    .shared_answers
                    .entry(version)
                    .or_default()
                    .insert(replica, tally);
                drop(inner);
                self.rollout_nudge.notify_one();
            }
            Remote::Stream { node, replica } => {
                let Some(entry) = inner.nodes.get_mut(&node) else {
                    if let Some(replica) = replica {
                        let mut entry = NodeEntry::new(StoredNode {
                            id: node.clone(),
                            ..StoredNode::default()
                        });
                        entry.elsewhere = Some(replica);
                        inner.nodes.insert(node, entry);
                    }
                    return;
                };
                if entry.connection.is_some() && replica.is_some() {
                    // It moved on to another replica; this stream is dead.
                    tracing::info!(node = %node, "node's stream taken by another replica");
                }
                let moved = entry.elsewhere != replica;
                let held_here = entry.connection.is_some();
                entry.elsewhere = replica.clone();
                let (labels, version) = (entry.stored.labels.clone(), entry.stored.version);
                drop(inner);
                if !moved || held_here {
                    return;
                }
                self.rollout_nudge.notify_one();
                let event = match replica {
                    Some(replica) => Event::Connected(pb::NodeConnected {
                        labels: labels.into_iter().collect(),
                        version,
                        address: format!("via replica {replica}"),
                    }),
                    None => Event::Disconnected(pb::NodeDisconnected {
                        reason: "its stream ended on another replica".to_owned(),
                    }),
                };
                self.emit(&node, event);
            }
        }
    }
}
