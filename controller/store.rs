//! The controller's durable store: an append-only log of JSON lines in
//! `DATA/fleet.log`.
//!
//! Every published version and every change to what a node runs is one
//! record. Records are appended by one writer task that batches whatever
//! is queued into one write and one fsync (group commit), so 5,000 ACKs
//! cost a handful of fsyncs, not 5,000. A publish waits for its record to
//! be on disk before any node sees it. At open the log is replayed and, if
//! it holds many superseded node records, rewritten compacted (temp file,
//! fsync, rename).
//!
//! Each line is `{"seq":N,"sum":"xxh3:…","data":RECORD}`: sequence numbers
//! count up by one and the sum covers the record's bytes, so a changed
//! letter, a deleted, repeated or reordered line is found at open; so is a
//! version whose number does not follow the one before it or whose text no
//! longer matches its checksum. A torn last line (a crash mid-write) is
//! dropped; any other damage refuses to start, naming the line, unless the
//! operator asks for `--repair`, which keeps a copy of the log and cuts it
//! at the last good record. The first record gives the store its identity,
//! a random id that nodes learn with every push: a version number means
//! the same content only within one store.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::error_rate::Tally;
pub use super::rollout::StoredRollout;
use tokio::sync::{mpsc, oneshot, watch};

const LOG_FILE: &str = "fleet.log";
const SUM_PREFIX: &str = "xxh3:";

/// A published version, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredVersion {
    pub version: u64,
    pub config: String,
    pub checksum: String,
    pub selector: String,
    pub comment: String,
    pub author: String,
    /// Milliseconds since the Unix epoch.
    pub published_at: u64,
    #[serde(default)]
    pub rollback_of: u64,
    /// The publish request's idempotency key (empty: none given).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub idempotency_key: String,
    /// A staged version's rollout as it started, in the same record: no
    /// crash can leave the version stored without it (and so released to
    /// every node at once). Later states follow as `Rollout` records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<StoredRollout>,
    /// Why it went to every node at once when publishes are staged by
    /// default.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub all_at_once_reason: String,
}

/// What the controller last knew about a node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredNode {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    /// Controller version the node runs (0: none).
    pub version: u64,
    pub generation: u64,
    pub last_nack: Option<StoredNack>,
    /// Milliseconds since the Unix epoch.
    pub last_seen: u64,
    pub build: String,
    /// Upstream servers as the node last reported them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub health: Vec<StoredHealth>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredHealth {
    pub upstream: String,
    pub server: String,
    /// A `tether.v1.HealthState`.
    pub state: i32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredNack {
    pub version: u64,
    pub reason: String,
    pub errors: Vec<StoredConfigError>,
    pub at: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredConfigError {
    pub path: String,
    pub line: u32,
    pub column: u32,
    pub message: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "record", rename_all = "snake_case")]
pub enum Record {
    /// The store's identity; the first record of every log.
    Store {
        id: String,
    },
    Version(StoredVersion),
    Node(StoredNode),
    /// A staged rollout's state; a version's last one holds.
    Rollout(StoredRollout),
}

/// One line of the log: a record, its place, and a sum of its bytes.
#[derive(Serialize)]
struct Line<'a> {
    seq: u64,
    sum: String,
    data: &'a serde_json::value::RawValue,
}

#[derive(Deserialize)]
struct ReadLine<'a> {
    seq: u64,
    sum: String,
    #[serde(borrow)]
    data: &'a serde_json::value::RawValue,
}

fn sum(bytes: &[u8]) -> String {
    format!("{SUM_PREFIX}{:016x}", xxhash_rust::xxh3::xxh3_64(bytes))
}

/// Serializes `record` as the log line numbered `seq`, newline included.
fn encode(seq: u64, record: &Record, into: &mut Vec<u8>) {
    let data = serde_json::to_string(record).expect("records serialize");
    let data = serde_json::value::RawValue::from_string(data).expect("a record is JSON");
    let line = Line {
        seq,
        sum: sum(data.get().as_bytes()),
        data: &data,
    };
    serde_json::to_writer(&mut *into, &line).expect("lines serialize");
    into.push(b'\n');
}

/// Everything the log held at open.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The store's identity.
    pub store_id: String,
    pub versions: Vec<StoredVersion>,
    pub nodes: BTreeMap<String, StoredNode>,
    pub rollouts: BTreeMap<u64, StoredRollout>,
}

/// What another replica of a shared store wrote.
#[derive(Debug)]
pub enum Remote {
    Version(StoredVersion),
    Rollout(StoredRollout),
    Node(StoredNode),
    /// The replica holding the node's stream (`None`: nobody).
    Stream {
        node: String,
        replica: Option<String>,
    },
    /// A rollout's answer counts from the nodes a replica holds.
    Answers {
        version: u64,
        replica: String,
        tally: Tally,
    },
}

/// What the writer is asked to do. Each is moved once, through the
/// writer's queue: a box would only add an allocation.
#[allow(clippy::large_enum_variant)]
pub(super) enum Append {
    /// Store a record; `done` learns when it is durable (or why not).
    Record {
        record: Record,
        done: Option<oneshot::Sender<std::io::Result<()>>>,
    },
    /// This controller holds (or no longer holds) the node's stream: what
    /// other replicas of a shared store go by. The file store has no other
    /// replicas.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    Stream { node: String, held: bool },
    /// A rollout's answer counts from the nodes this controller holds, for
    /// the replica that judges the rollout.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    Answers { version: u64, tally: Tally },
}

/// A handle to the writer task: the log file's, or a shared store's.
#[derive(Clone)]
pub struct Store {
    writes: mpsc::UnboundedSender<Append>,
    describe: String,
    /// Whether this controller does the work that must happen once
    /// (driving rollouts): always with the file store; with a shared one,
    /// while it holds the leadership.
    leader: watch::Receiver<bool>,
    shared: bool,
}

/// What to do with a damaged log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Damaged {
    /// Refuse to start, naming the first bad line.
    Refuse,
    /// Keep a copy of the log, cut it at the last good record, and go on.
    Repair,
}

impl Store {
    /// Opens (or creates) the log in `dir`, replays it, compacts it when
    /// worthwhile, and starts the writer.
    pub fn open(dir: &Path, damaged: Damaged) -> Result<(Store, Loaded), String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let path = dir.join(LOG_FILE);
        let replayed = replay(&path, damaged)?;
        let mut loaded = replayed.loaded;
        let live = loaded.versions.len() + loaded.nodes.len() + loaded.rollouts.len() + 1;
        let fresh = loaded.store_id.is_empty();
        if fresh {
            loaded.store_id = format!("{:032x}", rand::random::<u128>());
        }
        // A new store, a log written before lines carried sums, or one
        // mostly made of superseded records is written anew.
        let rewrite =
            fresh || replayed.legacy || (replayed.records > 1024 && replayed.records > 2 * live);
        let next_seq = if rewrite {
            let written = compact(&path, &loaded)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
            if replayed.records > 0 {
                tracing::info!(
                    records = replayed.records,
                    live,
                    "store rewritten compacted"
                );
            }
            written + 1
        } else {
            replayed.last_seq + 1
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let (writes, queue) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("tether-store".into())
            .spawn(move || writer(file, queue, next_seq))
            .map_err(|e| format!("cannot start the store writer: {e}"))?;
        let store = Store {
            writes,
            describe: path.display().to_string(),
            leader: watch::channel(true).1,
            shared: false,
        };
        Ok((store, loaded))
    }

    /// A store whose writer reads `writes` elsewhere.
    #[cfg_attr(not(feature = "etcd"), allow(dead_code))]
    pub(super) fn shared(
        writes: mpsc::UnboundedSender<Append>,
        describe: String,
        leader: watch::Receiver<bool>,
    ) -> Store {
        Store {
            writes,
            describe,
            leader,
            shared: true,
        }
    }

    /// Where it keeps its records, for logs.
    pub fn describe(&self) -> &str {
        &self.describe
    }

    pub fn is_leader(&self) -> bool {
        *self.leader.borrow()
    }

    /// Whether other replicas share this store.
    pub fn is_shared(&self) -> bool {
        self.shared
    }

    /// Hands a rollout's answer counts to the other replicas.
    pub fn share_answers(&self, version: u64, tally: Tally) {
        let _ = self.writes.send(Append::Answers { version, tally });
    }

    /// Tells other replicas of a shared store whether this controller
    /// holds `node`'s stream.
    pub fn hold_stream(&self, node: &str, held: bool) {
        let _ = self.writes.send(Append::Stream {
            node: node.to_owned(),
            held,
        });
    }

    /// Appends and waits until the record is on disk.
    pub async fn append_durable(&self, record: Record) -> std::io::Result<()> {
        let (done, wait) = oneshot::channel();
        self.writes
            .send(Append::Record {
                record,
                done: Some(done),
            })
            .map_err(|_| std::io::Error::other("the store is closed"))?;
        wait.await
            .unwrap_or_else(|_| Err(std::io::Error::other("the store is closed")))
    }

    /// Appends without waiting; the writer makes it durable with the next
    /// batch (within milliseconds).
    pub fn append(&self, record: Record) {
        let _ = self.writes.send(Append::Record { record, done: None });
    }
}

/// The writer: one blocking thread, one write and one fsync per batch.
fn writer(mut file: File, mut queue: mpsc::UnboundedReceiver<Append>, mut seq: u64) {
    let mut buffer = Vec::with_capacity(64 * 1024);
    let mut waiting = Vec::new();
    while let Some(first) = queue.blocking_recv() {
        let mut next = Some(first);
        while let Some(append) = next {
            if let Append::Record { record, done } = append {
                encode(seq, &record, &mut buffer);
                seq += 1;
                waiting.extend(done);
            }
            next = queue.try_recv().ok();
        }
        if buffer.is_empty() {
            continue;
        }
        let result = file.write_all(&buffer).and_then(|()| file.sync_data());
        if let Err(e) = &result {
            tracing::error!(error = %e, "cannot write the store");
        }
        buffer.clear();
        for done in waiting.drain(..) {
            let _ = done.send(match &result {
                Ok(()) => Ok(()),
                Err(e) => Err(std::io::Error::new(e.kind(), e.to_string())),
            });
        }
    }
}

/// What replaying the log found.
#[derive(Default)]
struct Replayed {
    loaded: Loaded,
    records: usize,
    last_seq: u64,
    /// Lines without sequence numbers and sums (written before they had
    /// them): accepted once, and the log is rewritten.
    legacy: bool,
}

/// Replays the log, checking every line (see the module's header).
fn replay(path: &Path, damaged: Damaged) -> Result<Replayed, String> {
    let mut replayed = Replayed::default();
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(replayed),
        Err(e) => return Err(format!("cannot open {}: {e}", path.display())),
    };
    let mut reader = BufReader::new(file);
    let mut line = Vec::new();
    let mut good_until = 0u64;
    let mut line_number = 0;
    loop {
        line.clear();
        let read = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        if read == 0 {
            break;
        }
        line_number += 1;
        if !line.ends_with(b"\n") {
            tracing::warn!(path = %path.display(), line = line_number, "dropping a torn last record (the controller stopped mid-write)");
            truncate(path, good_until)?;
            break;
        }
        if let Err(problem) = replay_line(&line, &mut replayed) {
            let problem = format!("{}:{line_number}: {problem}", path.display());
            if damaged == Damaged::Refuse {
                return Err(format!(
                    "{problem}; refusing to start on a damaged store (restore it from a copy, or \
                     start with --repair to keep only the records before this line)"
                ));
            }
            let copy = path.with_extension(format!("log.damaged-{}", std::process::id()));
            std::fs::copy(path, &copy)
                .map_err(|e| format!("cannot keep a copy of {}: {e}", path.display()))?;
            truncate(path, good_until)?;
            tracing::warn!(%problem, copy = %copy.display(), kept = replayed.records, "store repaired: cut at the last good record");
            break;
        }
        good_until += read as u64;
    }
    Ok(replayed)
}

/// Checks one line against what came before and adds its record.
fn replay_line(line: &[u8], replayed: &mut Replayed) -> Result<(), String> {
    let record = match serde_json::from_slice::<ReadLine>(line) {
        Ok(read) => {
            if replayed.legacy {
                return Err("a checked record after unchecked ones".to_owned());
            }
            if read.seq != replayed.last_seq + 1 {
                return Err(format!(
                    "record {} follows record {}: a record is missing, repeated or moved",
                    read.seq, replayed.last_seq
                ));
            }
            if sum(read.data.get().as_bytes()) != read.sum {
                return Err("the record does not match its sum (it was changed)".to_owned());
            }
            replayed.last_seq = read.seq;
            serde_json::from_str::<Record>(read.data.get())
                .map_err(|e| format!("damaged record: {e}"))?
        }
        // Lines of a log written before records were checked.
        Err(_) if replayed.last_seq == 0 => {
            let record = serde_json::from_slice::<Record>(line)
                .map_err(|e| format!("damaged record: {e}"))?;
            replayed.legacy = true;
            record
        }
        Err(e) => return Err(format!("damaged record: {e}")),
    };
    let loaded = &mut replayed.loaded;
    match record {
        Record::Store { id } => {
            if replayed.records != 0 || id.is_empty() {
                return Err("a store identity that is not the first record".to_owned());
            }
            loaded.store_id = id;
        }
        Record::Version(version) => {
            let expected = loaded.versions.last().map_or(1, |v| v.version + 1);
            if version.version != expected {
                return Err(format!(
                    "version {} where version {expected} should be",
                    version.version
                ));
            }
            if crate::config::content_version(&version.config) != version.checksum {
                return Err(format!(
                    "version {}'s text does not match its checksum",
                    version.version
                ));
            }
            if let Some(rollout) = &version.rollout {
                loaded.rollouts.insert(version.version, rollout.clone());
            }
            loaded.versions.push(version);
        }
        Record::Node(node) => {
            loaded.nodes.insert(node.id.clone(), node);
        }
        Record::Rollout(rollout) => {
            if !loaded.versions.iter().any(|v| v.version == rollout.version) {
                return Err(format!(
                    "a rollout of version {}, which is not stored",
                    rollout.version
                ));
            }
            loaded.rollouts.insert(rollout.version, rollout);
        }
    }
    if !replayed.legacy && loaded.store_id.is_empty() {
        return Err("the first record is not the store's identity".to_owned());
    }
    replayed.records += 1;
    Ok(())
}

fn truncate(path: &Path, length: u64) -> Result<(), String> {
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| format!("cannot repair {}: {e}", path.display()))?;
    file.set_len(length)
        .and_then(|()| file.sync_all())
        .map_err(|e| format!("cannot repair {}: {e}", path.display()))
}

/// Rewrites the log with its identity, then one record per version, per
/// node and per rollout. Answers the last sequence number written.
fn compact(path: &Path, loaded: &Loaded) -> std::io::Result<u64> {
    let mut buffer = Vec::new();
    let records = std::iter::once(Record::Store {
        id: loaded.store_id.clone(),
    })
    .chain(loaded.versions.iter().cloned().map(Record::Version))
    .chain(loaded.nodes.values().cloned().map(Record::Node))
    .chain(loaded.rollouts.values().cloned().map(Record::Rollout));
    let mut seq = 0;
    for record in records {
        seq += 1;
        encode(seq, &record, &mut buffer);
    }
    crate::durable::replace_file(path, &buffer)?;
    Ok(seq)
}
