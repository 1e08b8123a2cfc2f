//! The shared store: the controller's records as keys in etcd, so that
//! several controller replicas serve one fleet.
//!
//! Under the prefix P:
//! - `P/store_id`: the store's identity, made by the first replica;
//! - `P/versions/N`: each published version; a publish creates the key only
//!   if it is absent (a transaction), so two replicas publishing at once get
//!   two numbers and neither is lost;
//! - `P/rollouts/N`: a staged rollout's state, each write compared with the
//!   key's revision the writer last saw (an operator's abort on one replica
//!   and the leader's step on another cannot overwrite each other);
//! - `P/nodes/ID`: what a node runs, written by the replica holding its
//!   stream;
//! - `P/streams/ID`: that replica's name, under its lease: when the replica
//!   dies its nodes show as disconnected within the lease's TTL;
//! - `P/answers/N/REPLICA`: a rollout's answer counts from the nodes that
//!   replica holds, under its lease, for the leader's error-rate gate;
//! - `P/leader`: the replica that drives rollouts, under its lease. Its
//!   rollout writes also compare this key's creation revision, so a replica
//!   that was paused past its lease and wakes up cannot write.
//!
//! Every replica watches the prefix and hands what other replicas wrote to
//! the fleet (`Remote`). When etcd cannot be reached, writes that must be
//! durable fail with the reason and the others are kept, newest per key,
//! and written when it is back.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::{mpsc, watch};

use super::store::{Append, Loaded, Record, Remote, Store, StoredNode};

/// How long a replica's lease outlives its last keep-alive: its nodes show
/// as disconnected, and another replica may lead, this long after it dies.
pub const LEASE_TTL: i64 = 5;
/// How often a replica that does not lead tries to.
const CAMPAIGN_EVERY: Duration = Duration::from_millis(500);
/// The largest version record written: etcd refuses requests above 1.5 MiB
/// unless started with a larger `--max-request-bytes`.
const MAX_VERSION_BYTES: usize = 1536 * 1024 - 4096;
/// How much of etcd's history the leader keeps (see `compact`).
const KEEP_HISTORY: Duration = Duration::from_secs(600);
/// Appends taken from the queue at once.
const MAX_BATCH: usize = 4096;
/// Operations in one etcd transaction (etcd's default `--max-txn-ops`).
const TXN_OPS: usize = 128;
/// How often writes that failed are tried again.
const RETRY_EVERY: Duration = Duration::from_secs(1);

/// Where the shared store is and how to reach it.
#[derive(Debug, Clone)]
pub struct Settings {
    pub endpoints: Vec<String>,
    pub prefix: String,
    /// CA (PEM), and the client's certificate and key (PEM).
    pub ca: Option<Vec<u8>>,
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
    /// This replica's name, unique among the replicas.
    pub replica: String,
}

/// Connects, reads everything under the prefix, and starts the writer, the
/// watcher, the lease and the campaign for leadership.
pub async fn open(
    settings: Settings,
) -> Result<(Store, Loaded, mpsc::UnboundedReceiver<Remote>), String> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(5))
        .with_timeout(Duration::from_secs(5))
        .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
        .with_require_leader(true);
    if settings.ca.is_some() || settings.identity.is_some() {
        let mut tls = TlsOptions::new();
        if let Some(ca) = &settings.ca {
            tls = tls.ca_certificate(Certificate::from_pem(ca));
        }
        if let Some((cert, key)) = &settings.identity {
            tls = tls.identity(Identity::from_pem(cert, key));
        }
        options = options.with_tls(tls);
    }
    let describe = format!(
        "etcd {} under {}",
        settings.endpoints.join(","),
        settings.prefix
    );
    let mut client = Client::connect(&settings.endpoints, Some(options))
        .await
        .map_err(|e| format!("cannot reach {describe}: {e}"))?;
    let keys = Keys::new(&settings.prefix);
    let (loaded, live_state, revision) = load(&mut client, &keys)
        .await
        .map_err(|e| format!("cannot read {describe}: {e}"))?;
    let lease = client
        .lease_grant(LEASE_TTL, None)
        .await
        .map_err(|e| format!("cannot get a lease from {describe}: {e}"))?
        .id();
    let shared = Arc::new(Shared {
        keys,
        replica: settings.replica,
        lease: Mutex::new(lease),
        written: Mutex::new(HashMap::new()),
        fence: Mutex::new(None),
        held: Mutex::new(BTreeSet::new()),
    });
    let (writes, queue) = mpsc::unbounded_channel();
    let (remote_tx, remote) = mpsc::unbounded_channel();
    // Nodes held by other replicas now show as connected from the start.
    for live in live_state {
        let _ = remote_tx.send(live);
    }
    let (leader_tx, leader) = watch::channel(false);
    tokio::spawn(keep_lease(
        client.clone(),
        shared.clone(),
        leader_tx.clone(),
    ));
    tokio::spawn(campaign(client.clone(), shared.clone(), leader_tx));
    tokio::spawn(compact(client.clone(), shared.clone(), leader.clone()));
    tokio::spawn(follow(client.clone(), shared.clone(), revision, remote_tx));
    tokio::spawn(write(client, shared, queue));
    tracing::info!(store = %describe, lease, "shared store opened");
    Ok((Store::shared(writes, describe, leader), loaded, remote))
}

struct Keys {
    prefix: String,
}

impl Keys {
    fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_owned(),
        }
    }
    fn all(&self) -> String {
        format!("{}/", self.prefix)
    }
    fn store_id(&self) -> String {
        format!("{}/store_id", self.prefix)
    }
    fn version(&self, number: u64) -> String {
        format!("{}/versions/{number:020}", self.prefix)
    }
    fn rollout(&self, number: u64) -> String {
        format!("{}/rollouts/{number:020}", self.prefix)
    }
    fn node(&self, id: &str) -> String {
        format!("{}/nodes/{id}", self.prefix)
    }
    fn stream(&self, id: &str) -> String {
        format!("{}/streams/{id}", self.prefix)
    }
    fn answers(&self, version: u64, replica: &str) -> String {
        format!("{}/answers/{version:020}/{replica}", self.prefix)
    }
    fn leader(&self) -> String {
        format!("{}/leader", self.prefix)
    }
}

/// What the replica's tasks share.
struct Shared {
    keys: Keys,
    replica: String,
    lease: Mutex<i64>,
    /// Key → the revision of this replica's last write to it: the watcher
    /// skips the echoes of its own writes, and rollout writes compare it.
    written: Mutex<HashMap<String, i64>>,
    /// While leading: the leader key's creation revision.
    fence: Mutex<Option<i64>>,
    /// The nodes whose streams this replica holds, to claim again under a
    /// new lease.
    held: Mutex<BTreeSet<String>>,
}

impl Shared {
    fn lease(&self) -> i64 {
        *self.lease.lock().unwrap_or_else(|e| e.into_inner())
    }
    fn written(&self, key: &str) -> i64 {
        let written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        written.get(key).copied().unwrap_or(0)
    }
    fn wrote(&self, key: String, revision: i64) {
        let mut written = self.written.lock().unwrap_or_else(|e| e.into_inner());
        let entry = written.entry(key).or_insert(0);
        *entry = (*entry).max(revision);
    }
    /// Remembers the nodes whose streams this replica holds.
    fn holding(&self, node: &str, held: bool) {
        let mut holding = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if held {
            holding.insert(node.to_owned());
        } else {
            holding.remove(node);
        }
    }

    fn fence(&self) -> Option<i64> {
        *self.fence.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Everything under the prefix: the records, the live state (streams held,
/// answer counts), and the revision it was read at.
async fn load(
    client: &mut Client,
    keys: &Keys,
) -> Result<(Loaded, Vec<Remote>, i64), etcd_client::Error> {
    // The identity first: made once, by whichever replica comes first.
    let id = format!("{:032x}", rand::random::<u128>());
    client
        .txn(
            Txn::new()
                .when([Compare::create_revision(
                    keys.store_id(),
                    CompareOp::Equal,
                    0,
                )])
                .and_then([TxnOp::put(keys.store_id(), id, None)]),
        )
        .await?;
    let all = client
        .get(keys.all(), Some(GetOptions::new().with_prefix()))
        .await?;
    let revision = revision(all.header());
    let mut loaded = Loaded::default();
    let mut live_state = Vec::new();
    for kv in all.kvs() {
        let key = kv.key_str().unwrap_or_default();
        let Some(kind) = key.strip_prefix(&keys.prefix) else {
            continue;
        };
        match parse(kind, kv.value()) {
            Some(Parsed::StoreId(id)) => loaded.store_id = id,
            Some(Parsed::Remote(Remote::Version(version))) => loaded.versions.push(version),
            Some(Parsed::Remote(Remote::Rollout(rollout))) => {
                loaded.rollouts.insert(rollout.version, rollout);
            }
            Some(Parsed::Remote(Remote::Node(node))) => {
                loaded.nodes.insert(node.id.clone(), node);
            }
            // Live state: handed to the fleet once it exists.
            Some(Parsed::Remote(live @ (Remote::Stream { .. } | Remote::Answers { .. }))) => {
                live_state.push(live)
            }
            None => {}
        }
    }
    loaded.versions.sort_by_key(|v| v.version);
    // Rollouts stored with their version hold until a later state exists.
    for version in &loaded.versions {
        if let Some(rollout) = &version.rollout {
            loaded
                .rollouts
                .entry(version.version)
                .or_insert_with(|| rollout.clone());
        }
    }
    Ok((loaded, live_state, revision))
}

/// One key's value, read once and handed on.
#[allow(clippy::large_enum_variant)]
enum Parsed {
    StoreId(String),
    Remote(Remote),
}

/// A key below the prefix (`/versions/…`) and its value.
fn parse(kind: &str, value: &[u8]) -> Option<Parsed> {
    let parsed = if kind == "/store_id" {
        Parsed::StoreId(String::from_utf8_lossy(value).into_owned())
    } else if kind.starts_with("/versions/") {
        Parsed::Remote(Remote::Version(serde_json::from_slice(value).ok()?))
    } else if kind.starts_with("/rollouts/") {
        Parsed::Remote(Remote::Rollout(serde_json::from_slice(value).ok()?))
    } else if kind.starts_with("/nodes/") {
        Parsed::Remote(Remote::Node(serde_json::from_slice(value).ok()?))
    } else if let Some(rest) = kind.strip_prefix("/answers/") {
        let (version, replica) = rest.split_once('/')?;
        Parsed::Remote(Remote::Answers {
            version: version.parse().ok()?,
            replica: replica.to_owned(),
            tally: serde_json::from_slice(value).ok()?,
        })
    } else if let Some(node) = kind.strip_prefix("/streams/") {
        Parsed::Remote(Remote::Stream {
            node: node.to_owned(),
            replica: Some(String::from_utf8_lossy(value).into_owned()),
        })
    } else {
        return None;
    };
    Some(parsed)
}

/// Keeps the lease alive; when it was lost (etcd away past its TTL), takes
/// a new one and leaves the leadership.
async fn keep_lease(mut client: Client, shared: Arc<Shared>, leader: watch::Sender<bool>) {
    let every = Duration::from_secs((LEASE_TTL as u64 / 3).max(1));
    loop {
        let lease = shared.lease();
        let alive = match client.lease_keep_alive(lease).await {
            Ok((mut keeper, mut answers)) => loop {
                if keeper.keep_alive().await.is_err() {
                    break false;
                }
                match answers.message().await {
                    Ok(Some(answer)) if answer.ttl() > 0 => {}
                    Ok(Some(_)) => break false,
                    _ => break true,
                }
                tokio::time::sleep(every).await;
            },
            Err(_) => true,
        };
        if !alive {
            tracing::warn!(lease, "lost the etcd lease; taking a new one");
            set_leader(&shared, &leader, None);
            match client.lease_grant(LEASE_TTL, None).await {
                Ok(granted) => {
                    *shared.lease.lock().unwrap_or_else(|e| e.into_inner()) = granted.id();
                    // The old lease took this replica's stream keys with it.
                    let held: Vec<String> = shared
                        .held
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .iter()
                        .cloned()
                        .collect();
                    for node in held {
                        let put = PutOptions::new().with_lease(granted.id());
                        let key = shared.keys.stream(&node);
                        if let Ok(answer) = client
                            .put(key.clone(), shared.replica.clone(), Some(put))
                            .await
                        {
                            shared.wrote(key, revision(answer.header()));
                        }
                    }
                    continue;
                }
                Err(e) => tracing::warn!(error = %e, "etcd unreachable"),
            }
        }
        tokio::time::sleep(every).await;
    }
}

/// Tries to become the leader while nobody is; steps down when the key is
/// no longer ours.
async fn campaign(client: Client, shared: Arc<Shared>, leader: watch::Sender<bool>) {
    let key = shared.keys.leader();
    loop {
        let lease = shared.lease();
        let txn = Txn::new()
            .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                key.clone(),
                shared.replica.clone(),
                Some(PutOptions::new().with_lease(lease)),
            )])
            .or_else([TxnOp::get(key.clone(), None)]);
        let answer = txn_retried(&client, &txn).await;
        let holder = match answer {
            Ok(answer) if answer.succeeded() => {
                let created = revision(answer.header());
                Some((shared.replica.clone(), created, lease))
            }
            Ok(answer) => answer.op_responses().into_iter().find_map(|op| match op {
                TxnOpResponse::Get(get) => get.kvs().first().map(|kv| {
                    (
                        String::from_utf8_lossy(kv.value()).into_owned(),
                        kv.create_revision(),
                        kv.lease(),
                    )
                }),
                _ => None,
            }),
            Err(e) => {
                tracing::debug!(error = %e, "campaign: etcd unreachable");
                None
            }
        };
        let fence = match holder {
            Some((name, created, held_lease)) if name == shared.replica && held_lease == lease => {
                Some(created)
            }
            _ => None,
        };
        set_leader(&shared, &leader, fence);
        tokio::time::sleep(CAMPAIGN_EVERY).await;
    }
}

/// Leads with `fence` (the leader key's creation revision), or not.
fn set_leader(shared: &Shared, leader: &watch::Sender<bool>, fence: Option<i64>) {
    *shared.fence.lock().unwrap_or_else(|e| e.into_inner()) = fence;
    let leads = fence.is_some();
    if *leader.borrow() != leads {
        tracing::info!(replica = %shared.replica, leads, "leadership changed");
        leader.send_replace(leads);
    }
}

/// Hands what other replicas write to the fleet, from `revision` on.
async fn follow(
    mut client: Client,
    shared: Arc<Shared>,
    revision: i64,
    remote: mpsc::UnboundedSender<Remote>,
) {
    let mut next = revision + 1;
    loop {
        let options = WatchOptions::new().with_prefix().with_start_revision(next);
        let mut stream = match client.watch(shared.keys.all(), Some(options)).await {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "cannot watch etcd; trying again");
                tokio::time::sleep(RETRY_EVERY).await;
                continue;
            }
        };
        while let Ok(Some(answer)) = stream.message().await {
            if answer.canceled() {
                // It fell behind the compacted history: read everything
                // again and go on from there.
                tracing::warn!(
                    compacted = answer.compact_revision(),
                    "the etcd watch fell behind the compacted history; reading the store again"
                );
                match reload(&mut client, &shared, &remote).await {
                    Ok(revision) => next = revision + 1,
                    Err(e) => tracing::warn!(error = %e, "cannot read the store; trying again"),
                }
                break;
            }
            for event in answer.events() {
                let Some(kv) = event.kv() else { continue };
                next = next.max(kv.mod_revision() + 1);
                let key = kv.key_str().unwrap_or_default();
                if kv.mod_revision() <= shared.written(key) {
                    continue;
                }
                let Some(kind) = key.strip_prefix(&shared.keys.prefix) else {
                    continue;
                };
                let change = match event.event_type() {
                    EventType::Put => match parse(kind, kv.value()) {
                        // Its own claim, seen before its write was answered.
                        Some(Parsed::Remote(Remote::Stream {
                            replica: Some(replica),
                            ..
                        }))
                        | Some(Parsed::Remote(Remote::Answers { replica, .. }))
                            if replica == shared.replica =>
                        {
                            continue
                        }
                        Some(Parsed::Remote(change)) => change,
                        _ => continue,
                    },
                    EventType::Delete => match kind.strip_prefix("/streams/") {
                        Some(node) => Remote::Stream {
                            node: node.to_owned(),
                            replica: None,
                        },
                        None => continue,
                    },
                };
                // Rollout writes compare the revision last seen.
                if matches!(change, Remote::Rollout(_)) {
                    shared.wrote(key.to_owned(), kv.mod_revision());
                }
                if remote.send(change).is_err() {
                    return;
                }
            }
        }
        tokio::time::sleep(RETRY_EVERY).await;
    }
}

/// Everything under the prefix handed to the fleet again; the revision it
/// was read at.
async fn reload(
    client: &mut Client,
    shared: &Shared,
    remote: &mpsc::UnboundedSender<Remote>,
) -> Result<i64, etcd_client::Error> {
    let all = client
        .get(shared.keys.all(), Some(GetOptions::new().with_prefix()))
        .await?;
    for kv in all.kvs() {
        let key = kv.key_str().unwrap_or_default();
        let Some(kind) = key.strip_prefix(&shared.keys.prefix) else {
            continue;
        };
        if let Some(Parsed::Remote(change)) = parse(kind, kv.value()) {
            if matches!(change, Remote::Rollout(_)) {
                shared.wrote(key.to_owned(), kv.mod_revision());
            }
            let _ = remote.send(change);
        }
    }
    Ok(revision(all.header()))
}

/// While leading, compacts etcd's history older than `KEEP_HISTORY`: the
/// store needs only the newest state, and replicas' watches a short past.
async fn compact(mut client: Client, shared: Arc<Shared>, leader: watch::Receiver<bool>) {
    let mut marks: std::collections::VecDeque<(tokio::time::Instant, i64)> = Default::default();
    loop {
        tokio::time::sleep(KEEP_HISTORY / 5).await;
        let Ok(now) = client.get(shared.keys.store_id(), None).await else {
            continue;
        };
        marks.push_back((tokio::time::Instant::now(), revision(now.header())));
        let mut older = None;
        while let Some(&(at, revision)) = marks.front() {
            if at.elapsed() < KEEP_HISTORY {
                break;
            }
            older = Some(revision);
            marks.pop_front();
        }
        let leads = *leader.borrow();
        if let (Some(revision), true) = (older, leads) {
            match client.compact(revision, None).await {
                Ok(_) => tracing::info!(revision, "etcd history compacted"),
                Err(e) => tracing::warn!(error = %e, revision, "cannot compact etcd's history"),
            }
        }
    }
}

/// Writes what the fleet appends, in order; what cannot be written now is
/// kept (the newest per key) and tried again.
async fn write(
    mut client: Client,
    shared: Arc<Shared>,
    mut queue: mpsc::UnboundedReceiver<Append>,
) {
    let mut pending: BTreeMap<String, Append> = BTreeMap::new();
    let mut retry = tokio::time::interval(RETRY_EVERY);
    loop {
        tokio::select! {
            append = queue.recv() => {
                let Some(first) = append else { return };
                // What queued meanwhile goes with it: node records in
                // batches, one etcd round trip for many ACKs.
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match queue.try_recv() {
                        Ok(append) => batch.push(append),
                        Err(_) => break,
                    }
                }
                let mut puts = BTreeMap::new();
                for append in batch {
                    match append {
                        Append::Record { record: Record::Node(node), done: None } => {
                            puts.insert(shared.keys.node(&node.id), Put::Node(node));
                        }
                        Append::Stream { node, held: true } => {
                            shared.holding(&node, true);
                            puts.insert(shared.keys.stream(&node), Put::Stream(node));
                        }
                        other => {
                            // In order: what came before it is written first.
                            pending.extend(write_puts(&mut client, &shared, std::mem::take(&mut puts)).await);
                            if let Some((key, kept)) = apply(&mut client, &shared, other).await {
                                pending.insert(key, kept);
                            }
                        }
                    }
                }
                pending.extend(write_puts(&mut client, &shared, puts).await);
            }
            _ = retry.tick(), if !pending.is_empty() => {
                for (_, append) in std::mem::take(&mut pending) {
                    if let Some((key, kept)) = apply(&mut client, &shared, append).await {
                        pending.insert(key, kept);
                    }
                }
            }
        }
    }
}

/// A write that goes in a batch: a node's record, or a claim on its
/// stream under this replica's lease.
enum Put {
    Node(StoredNode),
    Stream(String),
}

impl Put {
    fn op(&self, key: &str, shared: &Shared) -> TxnOp {
        match self {
            Put::Node(node) => {
                let value = serde_json::to_vec(node).expect("records serialize");
                TxnOp::put(key, value, None)
            }
            Put::Stream(_) => TxnOp::put(
                key,
                shared.replica.clone(),
                Some(PutOptions::new().with_lease(shared.lease())),
            ),
        }
    }

    fn append(self) -> Append {
        match self {
            Put::Node(node) => Append::Record {
                record: Record::Node(node),
                done: None,
            },
            Put::Stream(node) => Append::Stream { node, held: true },
        }
    }
}

/// Puts, newest per key, in transactions of up to etcd's 128 operations;
/// gives back those that could not be written.
async fn write_puts(
    client: &mut Client,
    shared: &Shared,
    puts: BTreeMap<String, Put>,
) -> Vec<(String, Append)> {
    let mut kept = Vec::new();
    let mut puts = puts.into_iter().peekable();
    while puts.peek().is_some() {
        let chunk: Vec<(String, Put)> = puts.by_ref().take(TXN_OPS).collect();
        let ops: Vec<TxnOp> = chunk.iter().map(|(key, put)| put.op(key, shared)).collect();
        let txn = Txn::new().and_then(ops);
        let answer = txn_retried(client, &txn).await;
        match answer {
            Ok(answer) => {
                let revision = revision(answer.header());
                for (key, _) in &chunk {
                    shared.wrote(key.clone(), revision);
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, writes = chunk.len(), "kept until etcd is back");
                kept.extend(chunk.into_iter().map(|(key, put)| (key, put.append())));
            }
        }
    }
    kept
}

/// Writes one append; gives it back with its key when etcd cannot be
/// reached and it is worth trying again.
async fn apply(client: &mut Client, shared: &Shared, append: Append) -> Option<(String, Append)> {
    let keys = &shared.keys;
    match append {
        Append::Record {
            record: Record::Version(version),
            done,
        } => {
            let key = keys.version(version.version);
            let value = serde_json::to_vec(&version).expect("records serialize");
            if value.len() > MAX_VERSION_BYTES {
                let refused = std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!(
                        "the version is {} KiB as stored; a store on etcd takes at most {} KiB \
                         (etcd's request limit): split the config, or raise etcd's \
                         --max-request-bytes",
                        value.len() / 1024,
                        MAX_VERSION_BYTES / 1024
                    ),
                );
                tell(done, Err(refused));
                return None;
            }
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key.clone(), value.clone(), None)])
                .or_else([TxnOp::get(key.clone(), None)]);
            let result = match txn_retried(client, &txn).await {
                Ok(answer) if answer.succeeded() => {
                    shared.wrote(key, revision(answer.header()));
                    Ok(())
                }
                // A retry of a write that had landed finds its own value.
                Ok(answer) if stored_value(&answer).is_some_and(|(v, _)| v == value) => {
                    let (_, landed) = stored_value(&answer).unwrap_or_default();
                    shared.wrote(key, landed);
                    Ok(())
                }
                Ok(_) => Err(std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    format!(
                        "version {} was published by another replica",
                        version.version
                    ),
                )),
                Err(e) => Err(unreachable(e)),
            };
            tell(done, result);
            None
        }
        Append::Record {
            record: Record::Rollout(rollout),
            done,
        } => {
            let key = keys.rollout(rollout.version);
            let value = serde_json::to_vec(&rollout).expect("records serialize");
            let mut compare = vec![Compare::mod_revision(
                key.clone(),
                CompareOp::Equal,
                shared.written(&key),
            )];
            // The leader's steps are fenced by its leadership; an
            // operator's action is not a step and needs none.
            if let Some(fence) = shared.fence() {
                compare.push(Compare::create_revision(
                    keys.leader(),
                    CompareOp::Equal,
                    fence,
                ));
            }
            let txn = Txn::new()
                .when(compare)
                .and_then([TxnOp::put(key.clone(), value, None)]);
            let result = match txn_retried(client, &txn).await {
                Ok(answer) if answer.succeeded() => {
                    shared.wrote(key, revision(answer.header()));
                    Ok(())
                }
                Ok(_) => {
                    tracing::info!(
                        version = rollout.version,
                        "rollout write lost a race; the newer state comes from the watch"
                    );
                    Err(std::io::Error::other("the rollout changed meanwhile"))
                }
                Err(e) => Err(unreachable(e)),
            };
            tell(done, result);
            None
        }
        Append::Record {
            record: Record::Node(node),
            done,
        } => {
            let key = keys.node(&node.id);
            let value = serde_json::to_vec(&node).expect("records serialize");
            match retried(|| {
                let (mut client, key, value) = (client.clone(), key.clone(), value.clone());
                async move { client.put(key, value, None).await }
            })
            .await
            {
                Ok(answer) => {
                    shared.wrote(key, revision(answer.header()));
                    tell(done, Ok(()));
                    None
                }
                Err(e) => {
                    tracing::debug!(error = %e, node = %node.id, "node record kept until etcd is back");
                    Some((
                        key,
                        Append::Record {
                            record: Record::Node(node),
                            done,
                        },
                    ))
                }
            }
        }
        Append::Record {
            record: Record::Store { .. },
            done,
        } => {
            tell(done, Ok(()));
            None
        }
        Append::Answers { version, tally } => {
            let key = keys.answers(version, &shared.replica);
            let value = serde_json::to_vec(&tally).expect("tallies serialize");
            let put = PutOptions::new().with_lease(shared.lease());
            if let Err(e) = client.put(key, value, Some(put)).await {
                // The next share (a second later) carries the same counts.
                tracing::debug!(error = %e, version, "answer counts not shared this time");
            }
            None
        }
        Append::Stream { node, held } => {
            let key = keys.stream(&node);
            shared.holding(&node, held);
            let result = if held {
                client
                    .put(
                        key.clone(),
                        shared.replica.clone(),
                        Some(PutOptions::new().with_lease(shared.lease())),
                    )
                    .await
                    .map(|answer| revision(answer.header()))
            } else {
                // Only if it is still ours: the node may have moved on.
                let txn = Txn::new()
                    .when([Compare::value(
                        key.clone(),
                        CompareOp::Equal,
                        shared.replica.clone(),
                    )])
                    .and_then([TxnOp::delete(key.clone(), None)]);
                client
                    .txn(txn)
                    .await
                    .map(|answer| revision(answer.header()))
            };
            match result {
                Ok(revision) => {
                    shared.wrote(key, revision);
                    None
                }
                Err(_) => Some((key, Append::Stream { node, held })),
            }
        }
    }
}

/// The value and mod revision a transaction's `get` branch read.
fn stored_value(answer: &etcd_client::TxnResponse) -> Option<(Vec<u8>, i64)> {
    answer.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Get(get) => get
            .kvs()
            .first()
            .map(|kv| (kv.value().to_vec(), kv.mod_revision())),
        _ => None,
    })
}

/// `call`, again after 50, 100, 200 ms when it fails on the way (a member
/// that went away while the client still routed to it); other errors and
/// the fourth failure are returned.
async fn retried<T, F, Fut>(mut call: F) -> Result<T, etcd_client::Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let mut delay = Duration::from_millis(50);
    let mut attempts = 1;
    loop {
        match call().await {
            Err(e) if attempts < 4 && transient(&e) => {
                tracing::debug!(error = %e, attempts, "etcd call failed on the way; again");
                tokio::time::sleep(delay).await;
                delay *= 2;
                attempts += 1;
            }
            result => return result,
        }
    }
}

fn transient(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(status) => {
            matches!(
                status.code(),
                tonic::Code::Unavailable
                    | tonic::Code::Unknown
                    | tonic::Code::Cancelled
                    | tonic::Code::DeadlineExceeded
            )
        }
        _ => false,
    }
}

/// `txn`, tried again when it fails on the way (see `retried`).
async fn txn_retried(
    client: &Client,
    txn: &Txn,
) -> Result<etcd_client::TxnResponse, etcd_client::Error> {
    retried(|| {
        let (mut client, txn) = (client.clone(), txn.clone());
        async move { client.txn(txn).await }
    })
    .await
}

/// The revision an answer was made at (0 without a header).
fn revision(header: Option<&etcd_client::ResponseHeader>) -> i64 {
    header.map_or(0, |h| h.revision())
}

/// Tells whoever waits for a write how it went.
fn tell(
    done: Option<tokio::sync::oneshot::Sender<std::io::Result<()>>>,
    result: std::io::Result<()>,
) {
    if let Some(done) = done {
        let _ = done.send(result);
    }
}

fn unreachable(e: etcd_client::Error) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::NotConnected,
        format!("etcd unreachable: {e}"),
    )
}
