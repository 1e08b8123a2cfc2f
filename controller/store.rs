//! The controller's durable store: an append-only log of JSON lines in
//! `DATA/fleet.log`.
//!
//! Every published version and every change to what a node runs is one
//! record. Records are appended by one writer task that batches whatever
//! is queued into one write and one fsync (group commit), so 5,000 ACKs
//! cost a handful of fsyncs, not 5,000. A publish waits for its record to
//! be on disk before any node sees it. At open the log is replayed and, if
//! it holds many superseded node records, rewritten compacted (temp file,
//! fsync, rename). A torn last line (a crash mid-write) is dropped; damage
//! anywhere else refuses to start rather than guess.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

const LOG_FILE: &str = "fleet.log";

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
    Version(StoredVersion),
    Node(StoredNode),
}

/// Everything the log held at open.
#[derive(Debug, Default)]
pub struct Loaded {
    pub versions: Vec<StoredVersion>,
    pub nodes: BTreeMap<String, StoredNode>,
}

/// One record for the writer, and who waits for it to be on disk.
struct Append {
    record: Record,
    done: Option<oneshot::Sender<std::io::Result<()>>>,
}

/// A handle to the writer task.
#[derive(Clone)]
pub struct Store {
    writes: mpsc::UnboundedSender<Append>,
    path: PathBuf,
}

impl Store {
    /// Opens (or creates) the log in `dir`, replays it, compacts it when
    /// worthwhile, and starts the writer.
    pub fn open(dir: &Path) -> Result<(Store, Loaded), String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let path = dir.join(LOG_FILE);
        let (loaded, records) = replay(&path)?;
        let live = loaded.versions.len() + loaded.nodes.len();
        if records > 1024 && records > 2 * live {
            compact(&path, &loaded)
                .map_err(|e| format!("cannot compact {}: {e}", path.display()))?;
            tracing::info!(records, live, "store compacted");
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let (writes, queue) = mpsc::unbounded_channel();
        std::thread::Builder::new()
            .name("tether-store".into())
            .spawn(move || writer(file, queue))
            .map_err(|e| format!("cannot start the store writer: {e}"))?;
        Ok((Store { writes, path }, loaded))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends and waits until the record is on disk.
    pub async fn append_durable(&self, record: Record) -> std::io::Result<()> {
        let (done, wait) = oneshot::channel();
        self.writes
            .send(Append {
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
        let _ = self.writes.send(Append { record, done: None });
    }
}

/// The writer: one blocking thread, one write and one fsync per batch.
fn writer(mut file: File, mut queue: mpsc::UnboundedReceiver<Append>) {
    let mut buffer = Vec::with_capacity(64 * 1024);
    let mut waiting = Vec::new();
    while let Some(first) = queue.blocking_recv() {
        let mut next = Some(first);
        while let Some(Append { record, done }) = next {
            serde_json::to_writer(&mut buffer, &record).expect("records serialize");
            buffer.push(b'\n');
            waiting.extend(done);
            next = queue.try_recv().ok();
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

/// Replays the log; returns the state and how many records it held.
fn replay(path: &Path) -> Result<(Loaded, usize), String> {
    let mut loaded = Loaded::default();
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((loaded, 0)),
        Err(e) => return Err(format!("cannot open {}: {e}", path.display())),
    };
    let mut reader = BufReader::new(file);
    let mut line = Vec::new();
    let mut records = 0;
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
            let file = OpenOptions::new()
                .write(true)
                .open(path)
                .map_err(|e| format!("cannot repair {}: {e}", path.display()))?;
            file.set_len(good_until)
                .and_then(|()| file.sync_all())
                .map_err(|e| format!("cannot repair {}: {e}", path.display()))?;
            break;
        }
        let record = serde_json::from_slice::<Record>(&line).map_err(|e| {
            format!(
                "{}:{line_number}: damaged record: {e}; refusing to start on a store that \
                 may have lost versions",
                path.display()
            )
        })?;
        records += 1;
        good_until += read as u64;
        match record {
            Record::Version(version) => loaded.versions.push(version),
            Record::Node(node) => {
                loaded.nodes.insert(node.id.clone(), node);
            }
        }
    }
    loaded.versions.sort_by_key(|v| v.version);
    loaded.versions.dedup_by_key(|v| v.version);
    Ok((loaded, records))
}

/// Rewrites the log with one record per version and per node.
fn compact(path: &Path, loaded: &Loaded) -> std::io::Result<()> {
    let mut buffer = Vec::new();
    let records = loaded
        .versions
        .iter()
        .cloned()
        .map(Record::Version)
        .chain(loaded.nodes.values().cloned().map(Record::Node));
    for record in records {
        serde_json::to_writer(&mut buffer, &record).map_err(std::io::Error::other)?;
        buffer.push(b'\n');
    }
    crate::durable::replace_file(path, &buffer)
}
