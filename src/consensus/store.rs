//! sled-backed Raft storage: the log store (entries, vote, committed, last
//! purged) and the state machine (the registry, persisted key by key). One
//! `sled::Db` holds every tree; the current snapshot is a file beside it
//! (see `snapshot_file`).
//!
//! Trees: `log` (big-endian index → bincode entry, or its parts), `meta`
//! (vote, committed, last purged), `sm` (registry keys, a backup being
//! restored, applied log id and membership), `snapshot` (a counter for
//! snapshot ids) and `ident` (node identity, see [`get_meta`]).
//!
//! Every value stays at most [`MAX_VALUE`] bytes: sled 0.34 writes a page
//! larger than a quarter of its 512 KiB segment to a file under `blobs/`
//! and never fsyncs it: a crash of the machine can lose it while its
//! pointer survives, and sled then stops reading its log there. A leaf page
//! holds up to about 17 values, so 4 KiB values keep pages near 70 KiB.

// openraft's traits fix the error type; the helpers feeding them return it too.
#![allow(clippy::result_large_err)]

use std::collections::{BTreeMap, BTreeSet};
use std::error::Error;
use std::fmt::Debug;
use std::io::Cursor;
use std::ops::{Bound, RangeBounds};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, RaftLogStorage, RaftStateMachine};
use openraft::{
    BasicNode, Entry, EntryPayload, LogState, OptionalSend, RaftLogReader, RaftSnapshotBuilder,
    Snapshot, SnapshotMeta, StorageIOError, StoredMembership, Vote,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::snapshot_file::SnapshotFiles;
use super::{LogId, NodeId, StorageError, TypeConfig};
use crate::auth::Token;
use crate::model::{
    AuditEntry, Command, Member, Members, Registry, Response, Service, ServiceDef, StagedRestore,
    Touched,
};

/// How many audit records the replicated history keeps (the newest).
pub const AUDIT_KEEP: u64 = 50_000;

const VOTE_KEY: &[u8] = b"vote";
const COMMITTED_KEY: &[u8] = b"committed";
const PURGED_KEY: &[u8] = b"last_purged";
const APPLIED_KEY: &[u8] = b"applied";
const MEMBERSHIP_KEY: &[u8] = b"membership";
/// Where older versions kept the current snapshot; moved to a file at start.
const SNAP_META_KEY: &[u8] = b"meta";
const SNAP_DATA_KEY: &[u8] = b"data";
const SNAP_COUNTER_KEY: &[u8] = b"counter";
/// Prefix of the live registry keys in the state machine tree: absent for
/// "", or the prefix a committed backup was staged under.
const PREFIX_KEY: &[u8] = b"registry_prefix";
/// `(id, parts)` of the backup being staged, if any.
const RESTORE_KEY: &[u8] = b"restore";

/// Largest value written to sled (see the module docs). Log entries above
/// it are stored in parts; every other value is far smaller.
pub const MAX_VALUE: usize = 4 << 10;

type Membership = StoredMembership<NodeId, BasicNode>;

/// sled's page cache. Its default (1 GiB) keeps the whole database in memory
/// as it grows: at 78k members nodes used 255-296 MiB. The hot pages are the
/// log's tail and the keys being written; the rest is read back on demand
/// (snapshots, restarts).
const CACHE_BYTES: u64 = 16 << 20;

/// Why the data dir could not be opened or read outside of Raft.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("open database: {0}")]
    Open(#[source] sled::Error),
    #[error("open tree {tree}: {source}")]
    OpenTree {
        tree: &'static str,
        source: sled::Error,
    },
    #[error("read {what}: {source}")]
    Read { what: String, source: sled::Error },
    #[error("write {what}: {source}")]
    Write { what: String, source: sled::Error },
    #[error("flush: {0}")]
    Flush(#[source] sled::Error),
    #[error("decode {what}: {reason}")]
    Decode { what: String, reason: String },
    #[error("snapshot file: {0}")]
    SnapshotFile(#[source] std::io::Error),
}

/// Everything opened from one data dir.
pub struct Stores {
    pub log: LogStore,
    pub sm: StateMachine,
    pub db: sled::Db,
}

/// Opens (or creates) the database in `dir` and loads the state machine.
pub fn open(dir: &Path) -> Result<Stores, StoreError> {
    let db = sled::Config::new()
        .path(dir)
        .cache_capacity(CACHE_BYTES)
        .open()
        .map_err(StoreError::Open)?;
    let tree = |name: &'static str| {
        db.open_tree(name)
            .map_err(|source| StoreError::OpenTree { tree: name, source })
    };
    let log = LogStore {
        log: tree("log")?,
        meta: tree("meta")?,
        file: Arc::new(sync_created(dir).map_err(|e| StoreError::Open(e.into()))?),
    };
    let files = SnapshotFiles::open(dir).map_err(StoreError::SnapshotFile)?;
    let sm = StateMachine::load(db.clone(), tree("snapshot")?, files)?;
    Ok(Stores { log, sm, db })
}

/// Makes sled's files and their names durable (sled 0.34 never syncs its
/// `conf`), and returns its data file for [`LogStore::sync`].
fn sync_created(dir: &Path) -> std::io::Result<std::fs::File> {
    std::fs::File::open(dir.join("conf"))?.sync_all()?;
    std::fs::File::open(dir)?.sync_all()?;
    std::fs::File::open(dir.join("db"))
}

/// Key of the db's default tree naming the tree that holds the state
/// machine: `sm` until the first snapshot install, which writes a fresh tree
/// and then switches this key to it.
const SM_TREE_KEY: &[u8] = b"sm_tree";

/// The tree the state machine lives in.
fn sm_tree(db: &sled::Db) -> Result<sled::Tree, StoreError> {
    let name = db
        .get(SM_TREE_KEY)
        .map_err(|source| StoreError::Read {
            what: "sm tree name".into(),
            source,
        })?
        .map(|n| String::from_utf8_lossy(&n).into_owned())
        .unwrap_or_else(|| "sm".into());
    db.open_tree(name.as_bytes())
        .map_err(|source| StoreError::OpenTree { tree: "sm", source })
}

/// Reads a node identity value (node id, cluster id) from tree `ident`.
pub fn get_meta(db: &sled::Db, key: &str) -> Result<Option<String>, StoreError> {
    let tree = db
        .open_tree("ident")
        .map_err(|source| StoreError::OpenTree {
            tree: "ident",
            source,
        })?;
    let Some(raw) = tree.get(key).map_err(|source| StoreError::Read {
        what: format!("ident {key}"),
        source,
    })?
    else {
        return Ok(None);
    };
    String::from_utf8(raw.to_vec())
        .map(Some)
        .map_err(|e| StoreError::Decode {
            what: format!("ident {key}"),
            reason: e.to_string(),
        })
}

/// Writes a node identity value and flushes: it must survive a crash right after start.
pub fn set_meta(db: &sled::Db, key: &str, value: &str) -> Result<(), StoreError> {
    let tree = db
        .open_tree("ident")
        .map_err(|source| StoreError::OpenTree {
            tree: "ident",
            source,
        })?;
    tree.insert(key, value.as_bytes())
        .map_err(|source| StoreError::Write {
            what: format!("ident {key}"),
            source,
        })?;
    db.flush().map_err(StoreError::Flush)?;
    Ok(())
}

/// Removes an identity value (flushed like [`set_meta`]).
pub fn del_meta(db: &sled::Db, key: &str) -> Result<(), StoreError> {
    let tree = db
        .open_tree("ident")
        .map_err(|source| StoreError::OpenTree {
            tree: "ident",
            source,
        })?;
    tree.remove(key).map_err(|source| StoreError::Write {
        what: format!("ident {key}"),
        source,
    })?;
    db.flush().map_err(StoreError::Flush)?;
    Ok(())
}

/// Every identity value whose key starts with `prefix`, with the prefix cut.
pub fn meta_with_prefix(db: &sled::Db, prefix: &str) -> Result<Vec<(String, String)>, StoreError> {
    let tree = db
        .open_tree("ident")
        .map_err(|source| StoreError::OpenTree {
            tree: "ident",
            source,
        })?;
    let mut out = Vec::new();
    for item in tree.scan_prefix(prefix) {
        let (k, v) = item.map_err(|source| StoreError::Read {
            what: format!("ident {prefix}*"),
            source,
        })?;
        let key = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
        out.push((key, String::from_utf8_lossy(&v).into_owned()));
    }
    Ok(out)
}

/// Runs blocking disk I/O (a flush, an fdatasync) where it is: without a
/// hand-off to another thread, which would add latency to every write, but
/// telling a multi-threaded runtime first, so it moves the other tasks of
/// this worker (heartbeats, the lease, API requests) elsewhere meanwhile.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    use tokio::runtime::{Handle, RuntimeFlavor};
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

// ---- error mapping --------------------------------------------------------

fn read_logs_err<E: Error + 'static>(e: E) -> StorageError {
    StorageIOError::read_logs(&e).into()
}

fn write_logs_err<E: Error + 'static>(e: E) -> StorageError {
    StorageIOError::write_logs(&e).into()
}

fn read_vote_err<E: Error + 'static>(e: E) -> StorageError {
    StorageIOError::read_vote(&e).into()
}

fn write_vote_err<E: Error + 'static>(e: E) -> StorageError {
    StorageIOError::write_vote(&e).into()
}

fn read_sm_err<E: Error + 'static>(e: E) -> StorageError {
    StorageIOError::read_state_machine(&e).into()
}

fn write_sm_err<E: Error + 'static>(e: E) -> StorageError {
    StorageIOError::write_state_machine(&e).into()
}

fn read_snapshot_err<E: Error + 'static>(e: E) -> StorageError {
    StorageIOError::read_snapshot(None, &e).into()
}

fn write_snapshot_err<E: Error + 'static>(
    meta: &SnapshotMeta<NodeId, BasicNode>,
    e: E,
) -> StorageError {
    StorageIOError::write_snapshot(Some(meta.signature()), &e).into()
}

// ---- encoding -------------------------------------------------------------

fn bin<T: Serialize>(v: &T) -> Result<Vec<u8>, bincode::Error> {
    bincode::serialize(v)
}

fn unbin<T: DeserializeOwned>(raw: &[u8]) -> Result<T, bincode::Error> {
    bincode::deserialize(raw)
}

fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// Part `part` of the entry at `index`, for entries over [`MAX_VALUE`]. It
/// sorts after `index_key(index)` and before `index_key(index + 1)`.
fn part_key(index: u64, part: u32) -> [u8; 12] {
    let mut key = [0; 12];
    key[..8].copy_from_slice(&index.to_be_bytes());
    key[8..].copy_from_slice(&part.to_be_bytes());
    key
}

// Registry keys live under a prefix (see PREFIX_KEY); a staged backup's
// under `stage_prefix(id)`.

fn service_key(prefix: &str, service: &str) -> String {
    format!("{prefix}s/{service}")
}

fn member_key(prefix: &str, service: &str, member: &str) -> String {
    format!("{prefix}m/{service}/{member}")
}

fn member_prefix(prefix: &str, service: &str) -> String {
    format!("{prefix}m/{service}/")
}

fn token_key(prefix: &str, id: &str) -> String {
    format!("{prefix}t/{id}")
}

fn stage_prefix(id: u64) -> String {
    format!("r/{id:016x}/")
}

/// The `n`th audit record of log entry `index` (a batch entry has several).
/// Zero-padded so keys sort by index, then by position. Older data dirs also
/// hold `a/{index:020}` keys, which sort the same way.
fn audit_key(index: u64, n: usize) -> String {
    format!("a/{index:020}/{n:05}")
}

/// Audit entries of the `sm` tree in `db`, newest first, that pass `keep`,
/// at most `limit`.
pub fn read_audit(
    db: &sled::Db,
    keep: impl Fn(&AuditEntry) -> bool,
    limit: usize,
) -> Result<Vec<AuditEntry>, StoreError> {
    let tree = sm_tree(db)?;
    let mut out = Vec::new();
    for item in tree.scan_prefix("a/").rev() {
        let (key, value) = item.map_err(|source| StoreError::Read {
            what: "audit".into(),
            source,
        })?;
        let entry: AuditEntry = serde_json::from_slice(&value).map_err(|e| decode_err(&key, e))?;
        if keep(&entry) {
            out.push(entry);
            if out.len() >= limit {
                break;
            }
        }
    }
    Ok(out)
}

// ---- log store ------------------------------------------------------------

/// The Raft log, vote, committed and last purged log id. Clones share the
/// same trees (a `sled::Tree` is a reference-counted handle).
#[derive(Clone)]
pub struct LogStore {
    log: sled::Tree,
    meta: sled::Tree,
    /// sled's data file, see [`LogStore::sync`].
    file: Arc<std::fs::File>,
}

impl LogStore {
    fn get_meta<T: DeserializeOwned>(
        &self,
        key: &[u8],
        err: fn(StoreError) -> StorageError,
    ) -> Result<Option<T>, StorageError> {
        let what = String::from_utf8_lossy(key).into_owned();
        let raw = self.meta.get(key).map_err(|source| {
            err(StoreError::Read {
                what: what.clone(),
                source,
            })
        })?;
        raw.map(|raw| {
            unbin(&raw).map_err(|e| {
                err(StoreError::Decode {
                    what,
                    reason: e.to_string(),
                })
            })
        })
        .transpose()
    }

    fn last_purged(&self) -> Result<Option<LogId>, StorageError> {
        self.get_meta(PURGED_KEY, read_logs_err)
    }

    /// The id of the last entry on disk (or of the last purged one): what a
    /// pre-vote compares. `None` for an empty log, or when it cannot be read
    /// (the pre-vote then claims the least, which only makes it lose).
    pub fn last_log_id(&self) -> Option<LogId> {
        let last = match self.log.last().ok().flatten() {
            Some((key, _)) => Self::decode(self.log.scan_prefix(&key[..8]))
                .ok()
                .and_then(|mut e| e.pop())
                .map(|e| e.log_id),
            None => None,
        };
        last.or_else(|| self.last_purged().ok().flatten())
    }

    /// The entries among `items` (log tree pairs in key order), each
    /// whole or put together from its parts.
    fn decode(
        items: impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        fn finish(
            entries: &mut Vec<Entry<TypeConfig>>,
            parts: Option<([u8; 8], Vec<u8>)>,
        ) -> Result<(), StorageError> {
            if let Some((_, value)) = parts {
                entries.push(unbin(&value).map_err(read_logs_err)?);
            }
            Ok(())
        }
        let mut entries = Vec::new();
        let mut parts: Option<([u8; 8], Vec<u8>)> = None;
        for item in items {
            let (key, value) = item.map_err(read_logs_err)?;
            match key.len() {
                8 => {
                    finish(&mut entries, parts.take())?;
                    entries.push(unbin(&value).map_err(read_logs_err)?);
                }
                12 => {
                    let index: [u8; 8] = key[..8].try_into().expect("12-byte key");
                    match &mut parts {
                        Some((at, value_so_far)) if *at == index => {
                            value_so_far.extend_from_slice(&value)
                        }
                        _ => {
                            finish(&mut entries, parts.take())?;
                            parts = Some((index, value.to_vec()));
                        }
                    }
                }
                n => {
                    return Err(read_logs_err(std::io::Error::other(format!(
                        "log key of {n} bytes"
                    ))))
                }
            }
        }
        finish(&mut entries, parts)?;
        Ok(entries)
    }

    async fn flush(&self, err: fn(sled::Error) -> StorageError) -> Result<(), StorageError> {
        self.log.flush_async().await.map_err(err)?;
        blocking(|| self.sync()).map_err(err)
    }

    /// sled 0.34 flushes with `sync_file_range`, which syncs neither the
    /// file's size and extents nor the disk's cache: a kernel or file system
    /// crash (power loss, ext4 turning read-only after an error) would lose
    /// what it called flushed, and Raft must never forget a vote or an
    /// entry it acknowledged. fdatasync closes that gap.
    fn sync(&self) -> Result<(), sled::Error> {
        self.file.sync_data().map_err(sled::Error::from)
    }

    /// The writes that append `entries`: each under its index, or in parts
    /// of at most [`MAX_VALUE`] bytes.
    fn append_batch(
        &self,
        entries: impl IntoIterator<Item = Entry<TypeConfig>>,
    ) -> Result<sled::Batch, StorageError> {
        let mut values: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut indexes = None;
        for entry in entries {
            let index = entry.log_id.index;
            let first = indexes.map_or(index, |(first, _)| first);
            indexes = Some((first, index));
            let value = bin(&entry).map_err(write_logs_err)?;
            if value.len() <= MAX_VALUE {
                values.push((index_key(index).to_vec(), value));
            } else {
                for (n, part) in value.chunks(MAX_VALUE).enumerate() {
                    values.push((part_key(index, n as u32).to_vec(), part.to_vec()));
                }
            }
        }
        let mut batch = sled::Batch::default();
        // An entry written again must not keep parts of its older form.
        if let Some((first, last)) = indexes {
            let end = last.checked_add(1).map(index_key);
            let stale = match end {
                Some(end) => self.log.range(index_key(first)..end),
                None => self.log.range(index_key(first)..),
            };
            for key in stale.keys() {
                batch.remove(key.map_err(read_logs_err)?);
            }
        }
        for (key, value) in values {
            batch.insert(key, value);
        }
        Ok(batch)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        let start = match range.start_bound() {
            Bound::Included(&i) => i,
            Bound::Excluded(&i) => match i.checked_add(1) {
                Some(i) => i,
                None => return Ok(Vec::new()),
            },
            Bound::Unbounded => 0,
        };
        // Exclusive end; None means to the end of the log.
        let end = match range.end_bound() {
            Bound::Included(&i) => i.checked_add(1),
            Bound::Excluded(&i) => Some(i),
            Bound::Unbounded => None,
        };
        let iter = match end {
            Some(end) if start >= end => return Ok(Vec::new()),
            Some(end) => self.log.range(index_key(start)..index_key(end)),
            None => self.log.range(index_key(start)..),
        };
        Self::decode(iter)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let last_purged_log_id = self.last_purged()?;
        let last_entry = match self.log.last().map_err(read_logs_err)? {
            Some((key, _)) => Self::decode(self.log.scan_prefix(&key[..8]))?
                .pop()
                .map(|e| e.log_id),
            None => None,
        };
        Ok(LogState {
            last_log_id: last_entry.or(last_purged_log_id),
            last_purged_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError> {
        let value = bin(vote).map_err(write_vote_err)?;
        self.meta.insert(VOTE_KEY, value).map_err(write_vote_err)?;
        // A vote must be durable before it is acted upon.
        self.flush(write_vote_err).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError> {
        self.get_meta(VOTE_KEY, read_vote_err)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        match committed {
            Some(log_id) => {
                let value = bin(&log_id).map_err(write_logs_err)?;
                self.meta
                    .insert(COMMITTED_KEY, value)
                    .map_err(write_logs_err)?;
            }
            None => {
                self.meta.remove(COMMITTED_KEY).map_err(write_logs_err)?;
            }
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        self.get_meta(COMMITTED_KEY, read_logs_err)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let batch = self.append_batch(entries)?;
        self.log.apply_batch(batch).map_err(write_logs_err)?;
        // Raft may only count these entries once they are on disk. A blocking
        // flush (about 0.3 ms here) rather than `flush_async`: openraft 0.9's
        // core waits for this callback before it does anything else, and the
        // async form adds two thread hand-offs to every write's critical path.
        // sled's flush alone does not make the file's size durable, hence
        // the fdatasync (see LogStore::sync).
        match blocking(|| self.log.flush().and_then(|_| self.sync())) {
            Ok(()) => {
                callback.log_io_completed(Ok(()));
                Ok(())
            }
            Err(e) => {
                callback.log_io_completed(Err(std::io::Error::other(e.to_string())));
                Err(write_logs_err(e))
            }
        }
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        let mut batch = sled::Batch::default();
        for item in self.log.range(index_key(log_id.index)..) {
            let (key, _) = item.map_err(read_logs_err)?;
            batch.remove(key);
        }
        self.log.apply_batch(batch).map_err(write_logs_err)?;
        self.flush(write_logs_err).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        // Record the purge point first so a crash midway never hides it.
        let value = bin(&log_id).map_err(write_logs_err)?;
        self.meta
            .insert(PURGED_KEY, value)
            .map_err(write_logs_err)?;
        let mut batch = sled::Batch::default();
        // Up to and including the entry's parts.
        let upto = match log_id.index.checked_add(1) {
            Some(next) => self.log.range(..index_key(next)),
            None => self.log.range::<&[u8], _>(..),
        };
        for key in upto.keys() {
            batch.remove(key.map_err(read_logs_err)?);
        }
        self.log.apply_batch(batch).map_err(write_logs_err)?;
        self.flush(write_logs_err).await
    }
}

// ---- state machine --------------------------------------------------------

/// The applied registry as of a log index, published after every change.
#[derive(Debug, Clone, Default)]
pub struct Applied {
    /// Index of the last applied log entry; 0 when none.
    pub index: u64,
    pub registry: Arc<Registry>,
    /// Proposals this process applied (a batch entry holds many, a restore
    /// counts its members); for compaction, which openraft counts in entries.
    pub proposals: u64,
}

/// In-memory mirror of the state machine tree.
struct SmState {
    /// The tree (see [`SM_TREE_KEY`]).
    tree: sled::Tree,
    /// With the backup being staged, if any, in `registry.restoring`.
    registry: Registry,
    /// Prefix of the live registry keys in `tree` (see [`PREFIX_KEY`]).
    prefix: String,
    last_applied: Option<LogId>,
    last_membership: Membership,
    /// Audit records in the tree.
    audit_len: usize,
    /// See [`Applied::proposals`].
    proposals: u64,
}

/// The snapshot data: the whole state machine.
#[derive(Serialize, Deserialize)]
struct SnapshotState {
    last_applied: Option<LogId>,
    last_membership: Membership,
    registry: Registry,
    /// The audit history up to `last_applied`, oldest first.
    #[serde(default)]
    audit: Vec<AuditEntry>,
    /// The backup being staged (`registry` leaves it out).
    #[serde(default)]
    restore: Option<StagedRestore>,
}

/// The registry state machine. Clones share state, so a clone serves as the
/// snapshot builder.
#[derive(Clone)]
pub struct StateMachine {
    state: Arc<Mutex<SmState>>,
    db: sled::Db,
    /// Holds the snapshot id counter.
    snapshot: sled::Tree,
    /// Serializes the snapshot id counter.
    snapshot_lock: Arc<Mutex<()>>,
    files: Arc<SnapshotFiles>,
    applied_tx: Arc<watch::Sender<Arc<Applied>>>,
}

/// Service definitions and members are JSON so that fields added later with
/// `#[serde(default)]` still decode from older data.
fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, serde_json::Error> {
    serde_json::to_vec(v)
}

fn decode_err(what: &[u8], reason: impl ToString) -> StoreError {
    StoreError::Decode {
        what: format!("sm key {}", String::from_utf8_lossy(what)),
        reason: reason.to_string(),
    }
}

/// Registry keys read from a tree (without their prefix), then assembled.
#[derive(Default)]
struct RegistryKeys {
    defs: BTreeMap<String, ServiceDef>,
    members: Vec<(String, String, Member)>,
    tokens: BTreeMap<String, Token>,
}

impl RegistryKeys {
    /// Takes `rest` (a key less its prefix) if it is a registry key.
    fn add(&mut self, key: &[u8], rest: &str, value: &[u8]) -> Result<bool, StoreError> {
        if let Some(service) = rest.strip_prefix("s/") {
            let def = serde_json::from_slice(value).map_err(|e| decode_err(key, e))?;
            self.defs.insert(service.to_owned(), def);
        } else if let Some(rest) = rest.strip_prefix("m/") {
            let (service, member) = rest
                .split_once('/')
                .ok_or_else(|| decode_err(key, "member key without service"))?;
            let m = serde_json::from_slice(value).map_err(|e| decode_err(key, e))?;
            self.members
                .push((service.to_owned(), member.to_owned(), m));
        } else if let Some(id) = rest.strip_prefix("t/") {
            let t = serde_json::from_slice(value).map_err(|e| decode_err(key, e))?;
            self.tokens.insert(id.to_owned(), t);
        } else {
            return Ok(false);
        }
        Ok(true)
    }

    fn build(self) -> Result<Registry, StoreError> {
        let mut services: BTreeMap<String, Service> = self
            .defs
            .into_iter()
            .map(|(name, def)| {
                let svc = Service {
                    def,
                    members: Members::new(),
                };
                (name, svc)
            })
            .collect();
        for (service, member, m) in self.members {
            let svc = services
                .get_mut(&service)
                .ok_or_else(|| StoreError::Decode {
                    what: format!("member {member}"),
                    reason: format!("its service {service} is not stored"),
                })?;
            svc.members.insert(member, m);
        }
        Ok(Registry {
            services: services
                .into_iter()
                .map(|(name, svc)| (name, Arc::new(svc)))
                .collect(),
            tokens: self.tokens,
            restoring: None,
        })
    }
}

/// `r/{id:016x}/` of a staged or committed backup's key, with the rest.
fn split_stage_key(text: &str) -> Option<(&str, &str)> {
    let len = "r/".len() + 16 + 1;
    let prefix = text.get(..len)?;
    (prefix.starts_with("r/") && prefix.ends_with('/')).then(|| (prefix, &text[len..]))
}

/// Rebuilds the state from the state machine tree. Also returns the prefixes
/// of staged backups nothing refers to any more (see [`remove_prefix`]).
fn load_state(tree: sled::Tree) -> Result<(SmState, BTreeSet<String>), StoreError> {
    let read = |key: &[u8]| {
        tree.get(key).map_err(|source| StoreError::Read {
            what: String::from_utf8_lossy(key).into_owned(),
            source,
        })
    };
    let prefix = read(PREFIX_KEY)?
        .map(|raw| String::from_utf8_lossy(&raw).into_owned())
        .unwrap_or_default();
    let staged_marker: Option<(u64, u32)> = read(RESTORE_KEY)?
        .map(|raw| unbin(&raw).map_err(|e| decode_err(RESTORE_KEY, e)))
        .transpose()?;
    let staged_prefix = staged_marker.map(|(id, _)| stage_prefix(id));
    let mut live = RegistryKeys::default();
    let mut staged = RegistryKeys::default();
    let mut garbage = BTreeSet::new();
    let mut last_applied = None;
    let mut last_membership = Membership::default();
    let mut audit_len = 0;
    for item in tree.iter() {
        let (key, value) = item.map_err(|source| StoreError::Read {
            what: "state machine".into(),
            source,
        })?;
        let text = std::str::from_utf8(&key).map_err(|e| decode_err(&key, e))?;
        let known = if text.starts_with("a/") {
            // Audit history: read on demand by read_audit.
            audit_len += 1;
            true
        } else if *key == *APPLIED_KEY {
            last_applied = unbin(&value).map_err(|e| decode_err(&key, e))?;
            true
        } else if *key == *MEMBERSHIP_KEY {
            last_membership = unbin(&value).map_err(|e| decode_err(&key, e))?;
            true
        } else if *key == *PREFIX_KEY || *key == *RESTORE_KEY {
            true
        } else if let Some((at, rest)) = split_stage_key(text) {
            if at == prefix {
                live.add(&key, rest, &value)?
            } else if staged_prefix.as_deref() == Some(at) {
                staged.add(&key, rest, &value)?
            } else {
                garbage.insert(at.to_owned());
                true
            }
        } else if prefix.is_empty() {
            live.add(&key, text, &value)?
        } else {
            false
        };
        if !known {
            tracing::warn!(key = text, "ignoring unknown state machine key");
        }
    }
    let mut registry = live.build()?;
    if let Some((id, parts)) = staged_marker {
        registry.restoring = Some(Arc::new(StagedRestore {
            id,
            parts,
            registry: staged.build()?,
        }));
    }
    let state = SmState {
        tree,
        registry,
        prefix,
        last_applied,
        last_membership,
        audit_len,
        proposals: 0,
    };
    Ok((state, garbage))
}

/// Removes every key under `prefix`, in batches of [`Chunked::KEYS`]: for
/// the keys of a staged backup that was dropped or replaced. Nothing reads
/// them, so this need not be atomic; a start finishes what a crash cut short.
fn remove_prefix(tree: &sled::Tree, prefix: &str) -> Result<(), sled::Error> {
    loop {
        let mut batch = sled::Batch::default();
        let mut n = 0;
        for key in tree.scan_prefix(prefix).keys().take(Chunked::KEYS) {
            batch.remove(key?);
            n += 1;
        }
        if n == 0 {
            return Ok(());
        }
        tree.apply_batch(batch)?;
    }
}

/// The id of the last backup `cmd` committed, given its response.
fn committed_restore(cmd: &Command, response: &Response) -> Option<u64> {
    match (cmd, response) {
        (Command::RestoreCommit { id, .. }, Response::Done) => Some(*id),
        (Command::Batch(proposals), Response::Batch(each)) => proposals
            .iter()
            .zip(each)
            .rev()
            .find_map(|(p, r)| committed_restore(&p.cmd, r)),
        _ => None,
    }
}

/// Staged parts are not worth an audit record each: the commit has one.
fn audited(cmd: &Command) -> bool {
    !matches!(cmd, Command::RestoreChunk { .. })
}

/// Adds to `batch` the writes that turn the stored `old` registry keys under
/// `prefix` into `new` ones, for the keys touched.
fn diff_into_batch(
    batch: &mut sled::Batch,
    tree: &sled::Tree,
    prefix: &str,
    old: &Registry,
    new: &Registry,
    touched: &Touched,
) -> Result<(), StorageError> {
    let Touched {
        services,
        members,
        tokens,
    } = touched;
    for id in tokens {
        let key = token_key(prefix, id);
        match new.tokens.get(id) {
            Some(t) if old.tokens.get(id) != Some(t) => {
                batch.insert(key.as_bytes(), json(t).map_err(write_sm_err)?)
            }
            Some(_) => {}
            None => batch.remove(key.as_bytes()),
        }
    }
    for service in services {
        let before = old.services.get(service).map(|s| &s.def);
        let after = new.services.get(service).map(|s| &s.def);
        if before == after {
            continue;
        }
        match after {
            Some(def) => batch.insert(
                service_key(prefix, service).as_bytes(),
                json(def).map_err(write_sm_err)?,
            ),
            None => {
                // A service gone takes its members with it.
                batch.remove(service_key(prefix, service).as_bytes());
                for item in tree.scan_prefix(member_prefix(prefix, service)) {
                    let (key, _) = item.map_err(read_sm_err)?;
                    batch.remove(key);
                }
            }
        }
    }
    for (service, member) in members {
        let before = old.member(service, member);
        let after = new.member(service, member);
        if before == after {
            continue;
        }
        let key = member_key(prefix, service, member);
        match after {
            Some(m) => batch.insert(key.as_bytes(), json(m).map_err(write_sm_err)?),
            None => batch.remove(key.as_bytes()),
        }
    }
    Ok(())
}

/// Writes to a tree in batches of [`Chunked::KEYS`] keys: for a tree
/// that is not live yet, where the whole need not be atomic.
struct Chunked<'a> {
    tree: &'a sled::Tree,
    batch: sled::Batch,
    keys: usize,
}

impl<'a> Chunked<'a> {
    const KEYS: usize = 2_000;

    fn new(tree: &'a sled::Tree) -> Self {
        Self {
            tree,
            batch: sled::Batch::default(),
            keys: 0,
        }
    }

    fn insert(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<(), StorageError> {
        self.batch.insert(key, value);
        self.keys += 1;
        if self.keys >= Self::KEYS {
            self.finish()?;
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<(), StorageError> {
        let batch = std::mem::take(&mut self.batch);
        self.keys = 0;
        self.tree.apply_batch(batch).map_err(write_sm_err)
    }
}

/// Writes the full registry under `prefix`.
fn registry_into(
    out: &mut Chunked<'_>,
    prefix: &str,
    registry: &Registry,
) -> Result<(), StorageError> {
    for (id, t) in &registry.tokens {
        out.insert(
            token_key(prefix, id).into_bytes(),
            json(t).map_err(write_sm_err)?,
        )?;
    }
    for (name, svc) in &registry.services {
        out.insert(
            service_key(prefix, name).into_bytes(),
            json(&svc.def).map_err(write_sm_err)?,
        )?;
        for (member, m) in &svc.members {
            out.insert(
                member_key(prefix, name, member).into_bytes(),
                json(m).map_err(write_sm_err)?,
            )?;
        }
    }
    Ok(())
}

fn applied_of(state: &SmState) -> Arc<Applied> {
    Arc::new(Applied {
        index: state.last_applied.map(|l| l.index).unwrap_or(0),
        registry: Arc::new(state.registry.clone()),
        proposals: state.proposals,
    })
}

/// Entries applied in memory and not yet written: one sled batch.
struct Pending {
    registry: Registry,
    last_applied: Option<LogId>,
    last_membership: Membership,
    touched: Touched,
    staged: Touched,
    /// The last backup committed, if any.
    committed: Option<u64>,
    /// (key, record) of every command that changed something.
    audit: Vec<(String, AuditEntry)>,
    proposals: u64,
    entries: usize,
}

impl Pending {
    fn new(st: &SmState) -> Self {
        Self {
            registry: st.registry.clone(),
            last_applied: st.last_applied,
            last_membership: st.last_membership.clone(),
            touched: Touched::default(),
            staged: Touched::default(),
            committed: None,
            audit: Vec::new(),
            proposals: 0,
            entries: 0,
        }
    }

    /// Keys this batch will write, about.
    fn keys(&self) -> usize {
        let Touched {
            services,
            members,
            tokens,
        } = &self.touched;
        let staged = &self.staged;
        services.len()
            + members.len()
            + tokens.len()
            + staged.services.len()
            + staged.members.len()
            + staged.tokens.len()
            + self.audit.len()
    }

    fn apply(&mut self, entry: Entry<TypeConfig>) -> Response {
        self.entries += 1;
        self.last_applied = Some(entry.log_id);
        let index = entry.log_id.index;
        match entry.payload {
            EntryPayload::Blank => Response::Done,
            EntryPayload::Normal(proposal) => {
                self.proposals += match &proposal.cmd {
                    Command::Batch(each) => each.len() as u64,
                    _ => 1,
                };
                proposal.cmd.touches(&mut self.touched, &mut self.staged);
                let response = self.registry.apply(&proposal.cmd);
                if let Some(id) = committed_restore(&proposal.cmd, &response) {
                    self.committed = Some(id);
                    // A restore is as much change as its members registering.
                    self.proposals += self.registry.member_count() as u64;
                }
                match (&proposal.cmd, &response) {
                    (Command::Batch(proposals), Response::Batch(each)) => {
                        let done = proposals
                            .iter()
                            .zip(each)
                            .filter(|(p, r)| **r == Response::Done && audited(&p.cmd));
                        for (n, (p, _)) in done.enumerate() {
                            self.audit.push((audit_key(index, n), p.audit(index)));
                        }
                    }
                    (cmd, Response::Done) if audited(cmd) => self
                        .audit
                        .push((audit_key(index, 0), proposal.audit(index))),
                    _ => {}
                }
                response
            }
            EntryPayload::Membership(m) => {
                self.last_membership = StoredMembership::new(Some(entry.log_id), m);
                Response::Done
            }
        }
    }
}

/// Writes `p` in one sled batch and makes it the state.
///
/// No flush here. Every entry applied was committed, so it is in the
/// flushed log of a quorum including, for a leader, this node (a follower
/// learns of a commit only for entries it has flushed too). After a crash,
/// openraft starts from the `applied` id stored in this tree and re-applies
/// the log after it; a lost unflushed apply is simply applied again (sled
/// recovers a prefix of its writes, and each batch is atomic and carries
/// its own `applied` id, so the tree is never half-applied). The log is
/// purged only up to a snapshot, and a snapshot is flushed before openraft
/// learns of it (build_snapshot, install_snapshot), so the entries a lost
/// apply needs are still in the log.
fn persist(st: &mut SmState, p: Pending) -> Result<(), StorageError> {
    let Pending {
        registry,
        last_applied,
        last_membership,
        mut touched,
        staged,
        committed,
        audit,
        proposals,
        entries: _,
    } = p;
    let mut batch = sled::Batch::default();
    let before = st.registry.restoring.clone();
    let after = registry.restoring.clone();
    let empty = Registry::default();
    // What backup `id` had staged before this batch, if it is that backup.
    let staged_before = |id: u64| {
        before
            .as_deref()
            .filter(|b| b.id == id)
            .map_or(&empty, |b| &b.registry)
    };
    let prefix = match committed {
        // The backup goes live in this one batch: its keys were staged under
        // its own prefix, which becomes the registry's.
        Some(id) => {
            let prefix = stage_prefix(id);
            // The registry it replaced was empty at that point; only tokens
            // created and revoked within this batch can still be stored.
            let mut all = Touched::default();
            all.registry(&st.registry);
            diff_into_batch(&mut batch, &st.tree, &st.prefix, &st.registry, &empty, &all)?;
            touched.extend(staged);
            diff_into_batch(
                &mut batch,
                &st.tree,
                &prefix,
                staged_before(id),
                &registry,
                &touched,
            )?;
            batch.insert(PREFIX_KEY, prefix.as_bytes());
            prefix
        }
        None => {
            diff_into_batch(
                &mut batch,
                &st.tree,
                &st.prefix,
                &st.registry,
                &registry,
                &touched,
            )?;
            if let Some(s) = &after {
                diff_into_batch(
                    &mut batch,
                    &st.tree,
                    &stage_prefix(s.id),
                    staged_before(s.id),
                    &s.registry,
                    &staged,
                )?;
            }
            st.prefix.clone()
        }
    };
    let marker = |r: &Option<Arc<StagedRestore>>| r.as_deref().map(|s| (s.id, s.parts));
    match marker(&after) {
        Some(m) if marker(&before) != Some(m) => {
            batch.insert(RESTORE_KEY, bin(&m).map_err(write_sm_err)?)
        }
        Some(_) => {}
        None if before.is_some() => batch.remove(RESTORE_KEY),
        None => {}
    }
    // Retention keeps the newest AUDIT_KEEP records: every node applies the
    // same records in the same order, so every node drops the same ones.
    let keep = AUDIT_KEEP as usize;
    let new = &audit[audit.len().saturating_sub(keep)..];
    let excess = (st.audit_len + new.len()).saturating_sub(keep);
    for key in st.tree.scan_prefix("a/").keys().take(excess) {
        batch.remove(key.map_err(read_sm_err)?);
    }
    for (key, record) in new {
        batch.insert(key.as_bytes(), json(record).map_err(write_sm_err)?);
    }
    batch.insert(APPLIED_KEY, bin(&last_applied).map_err(write_sm_err)?);
    if last_membership != st.last_membership {
        batch.insert(MEMBERSHIP_KEY, bin(&last_membership).map_err(write_sm_err)?);
    }
    st.tree.apply_batch(batch).map_err(write_sm_err)?;

    // A staged backup dropped or replaced: its keys go once the batch that
    // stopped referring to them is written. Never a prefix still in use (the
    // same backup staged anew shares it).
    if let Some(b) = &before {
        let dropped = stage_prefix(b.id);
        let in_use = dropped == prefix || after.as_ref().is_some_and(|a| a.id == b.id);
        if !in_use {
            remove_prefix(&st.tree, &dropped).map_err(write_sm_err)?;
        }
    }

    st.registry = registry;
    st.prefix = prefix;
    st.last_applied = last_applied;
    st.last_membership = last_membership;
    st.audit_len = st.audit_len + new.len() - excess;
    st.proposals += proposals;
    Ok(())
}

impl StateMachine {
    fn load(db: sled::Db, snapshot: sled::Tree, files: SnapshotFiles) -> Result<Self, StoreError> {
        let tree = sm_tree(&db)?;
        // An install that crashed before its switch left its tree behind.
        for name in db.tree_names() {
            if name.starts_with(b"sm-") && name != tree.name() {
                db.drop_tree(&name).map_err(|source| StoreError::Write {
                    what: "stale sm tree".into(),
                    source,
                })?;
            }
        }
        let (state, garbage) = load_state(tree)?;
        for prefix in garbage {
            remove_prefix(&state.tree, &prefix).map_err(|source| StoreError::Write {
                what: format!("dropped restore {prefix}"),
                source,
            })?;
        }
        move_snapshot_to_file(&db, &snapshot, &files)?;
        let (applied_tx, _) = watch::channel(applied_of(&state));
        Ok(Self {
            state: Arc::new(Mutex::new(state)),
            db,
            snapshot,
            snapshot_lock: Arc::new(Mutex::new(())),
            files: Arc::new(files),
            applied_tx: Arc::new(applied_tx),
        })
    }

    /// Watches the applied registry; the current value is available at once.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Applied>> {
        self.applied_tx.subscribe()
    }

    fn lock(&self) -> MutexGuard<'_, SmState> {
        // A panic while holding the lock leaves the state consistent: every
        // change is computed aside and swapped in after its write succeeded.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn publish(&self, state: &SmState) {
        self.applied_tx.send_replace(applied_of(state));
    }

    /// Stores the current snapshot's file (see [`SnapshotFiles::store`]) on
    /// the blocking pool: writing and fsyncing megabytes would hold up a
    /// runtime thread, and with it heartbeats. Gives `data` back.
    async fn store_snapshot(
        &self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        data: Vec<u8>,
    ) -> Result<Vec<u8>, StorageError> {
        let files = self.files.clone();
        let owned = meta.clone();
        tokio::task::spawn_blocking(move || files.store(&owned, &data).map(|_| data))
            .await
            .map_err(|e| write_snapshot_err(meta, std::io::Error::other(e)))?
            .map_err(|e| write_snapshot_err(meta, e))
    }

    /// A snapshot id unique for this data dir.
    fn next_snapshot_counter(&self) -> Result<u64, StorageError> {
        let _guard = self.snapshot_lock.lock().unwrap_or_else(|p| p.into_inner());
        let last = match self
            .snapshot
            .get(SNAP_COUNTER_KEY)
            .map_err(read_snapshot_err)?
        {
            Some(raw) => {
                let bytes: [u8; 8] = raw.as_ref().try_into().map_err(|_| {
                    read_snapshot_err(std::io::Error::other("bad snapshot counter"))
                })?;
                u64::from_be_bytes(bytes)
            }
            None => 0,
        };
        let next = last + 1;
        // Flushed with the state machine before the snapshot is used.
        self.snapshot
            .insert(SNAP_COUNTER_KEY, &next.to_be_bytes()[..])
            .map_err(read_snapshot_err)?;
        Ok(next)
    }
}

/// Older versions kept the current snapshot in the `snapshot` tree, its
/// data as one value (in sled's unsynced `blobs/` once over ~128 KiB): it
/// becomes a file. Unreadable, it is dropped; openraft builds a new one
/// when it needs one.
fn move_snapshot_to_file(
    db: &sled::Db,
    tree: &sled::Tree,
    files: &SnapshotFiles,
) -> Result<(), StoreError> {
    let read = |key: &[u8]| {
        tree.get(key).map_err(|source| StoreError::Read {
            what: "snapshot".into(),
            source,
        })
    };
    let Some(raw) = read(SNAP_META_KEY)? else {
        return Ok(());
    };
    let meta: Result<SnapshotMeta<NodeId, BasicNode>, _> = serde_json::from_slice(&raw);
    match (meta, read(SNAP_DATA_KEY)) {
        (Ok(meta), Ok(Some(data))) => {
            files
                .store(&meta, &data)
                .map_err(StoreError::SnapshotFile)?;
        }
        (meta, data) => tracing::warn!(
            meta = ?meta.err().map(|e| e.to_string()),
            data = ?data.err().map(|e| e.to_string()),
            "dropping an unreadable snapshot kept by an older version"
        ),
    }
    let mut batch = sled::Batch::default();
    batch.remove(SNAP_META_KEY);
    batch.remove(SNAP_DATA_KEY);
    tree.apply_batch(batch)
        .map_err(|source| StoreError::Write {
            what: "snapshot".into(),
            source,
        })?;
    db.flush().map_err(StoreError::Flush)?;
    Ok(())
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let (mut blob, tree) = {
            let st = self.lock();
            let blob = SnapshotState {
                last_applied: st.last_applied,
                last_membership: st.last_membership.clone(),
                registry: st.registry.clone(),
                audit: Vec::new(),
                restore: st.registry.restoring.as_deref().cloned(),
            };
            (blob, st.tree.clone())
        };
        // Reading the audit history and encoding the registry take seconds
        // at 100k members: on a thread of its own, not on a runtime thread
        // that also carries heartbeats and the lease, and at a lower CPU
        // priority, so on a busy host the lease path gets the CPU first.
        let (blob, data) = background(move || {
            // Entries applied after the state was taken are left for the next snapshot.
            let upto = blob.last_applied.map(|l| l.index).unwrap_or(0);
            for item in tree.scan_prefix("a/") {
                let (key, value) = item.map_err(read_sm_err)?;
                let entry: AuditEntry =
                    serde_json::from_slice(&value).map_err(|e| read_sm_err(decode_err(&key, e)))?;
                if entry.index <= upto {
                    blob.audit.push(entry);
                }
            }
            let data = serde_json::to_vec(&blob).map_err(read_sm_err)?;
            Ok::<_, StorageError>((blob, data))
        })
        .await
        .map_err(|_| read_sm_err(std::io::Error::other("the snapshot thread died")))??;
        let counter = self.next_snapshot_counter()?;
        let snapshot_id = match blob.last_applied {
            Some(l) => format!("{}-{}-{}", l.leader_id.term, l.index, counter),
            None => format!("0-0-{counter}"),
        };
        let meta = SnapshotMeta {
            last_log_id: blob.last_applied,
            last_membership: blob.last_membership,
            snapshot_id,
        };
        // openraft purges the log up to the snapshot once this returns: the
        // state machine must be on disk up to it by then (sled's flush
        // covers every tree).
        self.db
            .flush_async()
            .await
            .map_err(|e| write_snapshot_err(&meta, e))?;
        let data = self.store_snapshot(&meta, data).await?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

/// Niceness of background work (snapshot builds): below everything else in
/// clbd and below haproxy, which run at 0.
const BACKGROUND_NICE: libc::c_int = 10;

/// Runs `f` on a new thread at [`BACKGROUND_NICE`]. Raising one's own
/// niceness needs no privilege; if it fails the work runs at normal priority.
fn background<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> tokio::sync::oneshot::Receiver<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("clb-snapshot".into())
        .spawn(move || {
            // SAFETY: plain syscalls on this thread's own id.
            unsafe {
                let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
                libc::setpriority(libc::PRIO_PROCESS, tid, BACKGROUND_NICE);
            }
            let _ = tx.send(f());
        });
    if let Err(e) = spawned {
        tracing::error!(cause = %e, "cannot start the snapshot thread");
    }
    rx
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = StateMachine;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, Membership), StorageError> {
        let st = self.lock();
        Ok((st.last_applied, st.last_membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut st = self.lock();
        let mut pending = Pending::new(&st);
        let mut responses = Vec::new();
        for entry in entries {
            responses.push(pending.apply(entry));
            // Many restore parts applied at once (catching up, or after a
            // restart) would make one huge sled batch: write what is
            // pending every few thousand keys instead.
            if pending.keys() >= Chunked::KEYS {
                persist(&mut st, pending)?;
                pending = Pending::new(&st);
            }
        }
        if pending.entries > 0 {
            persist(&mut st, pending)?;
        }
        if !responses.is_empty() {
            self.publish(&st);
        }
        Ok(responses)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        let blob: SnapshotState = serde_json::from_slice(&data).map_err(|e| {
            StorageError::from(StorageIOError::read_snapshot(Some(meta.signature()), &e))
        })?;
        // A fresh tree, written in chunks and switched to in one step: one
        // sled batch of the whole registry held 800 MiB at 100k members
        // (sled keeps every node version of a batch until it completes).
        // Random: install counters are not stored, and this must never name the live tree.
        let name = format!("sm-{:016x}", rand::random::<u64>());
        let tree = self.db.open_tree(&name).map_err(write_sm_err)?;
        tree.clear().map_err(write_sm_err)?;
        let mut out = Chunked::new(&tree);
        registry_into(&mut out, "", &blob.registry)?;
        if let Some(s) = &blob.restore {
            registry_into(&mut out, &stage_prefix(s.id), &s.registry)?;
            out.insert(
                RESTORE_KEY.to_vec(),
                bin(&(s.id, s.parts)).map_err(write_sm_err)?,
            )?;
        }
        // Records of one batch entry share an index: number them in order.
        let mut prev = None;
        let mut n = 0;
        for entry in &blob.audit {
            n = if prev == Some(entry.index) { n + 1 } else { 0 };
            prev = Some(entry.index);
            out.insert(
                audit_key(entry.index, n).into_bytes(),
                json(entry).map_err(write_sm_err)?,
            )?;
        }
        // The meta is authoritative for what the snapshot covers.
        out.insert(
            APPLIED_KEY.to_vec(),
            bin(&meta.last_log_id).map_err(write_sm_err)?,
        )?;
        out.insert(
            MEMBERSHIP_KEY.to_vec(),
            bin(&meta.last_membership).map_err(write_sm_err)?,
        )?;
        out.finish()?;
        // The new tree is durable before the switch, and the switch before
        // openraft learns the install is done.
        let flush = |e| write_snapshot_err(meta, e);
        self.db.flush_async().await.map_err(flush)?;
        self.db
            .insert(SM_TREE_KEY, name.as_bytes())
            .map_err(write_sm_err)?;
        self.db.flush_async().await.map_err(flush)?;
        let mut registry = blob.registry;
        registry.restoring = blob.restore.map(Arc::new);
        let old = {
            let mut st = self.lock();
            let proposals = st.proposals;
            let old = std::mem::replace(
                &mut *st,
                SmState {
                    tree,
                    registry,
                    prefix: String::new(),
                    last_applied: meta.last_log_id,
                    last_membership: meta.last_membership.clone(),
                    audit_len: blob.audit.len(),
                    proposals,
                },
            );
            self.publish(&st);
            old.tree
        };
        // A snapshot build may still read the old tree: it then fails, and
        // openraft builds again later.
        if let Err(e) = self.db.drop_tree(old.name()) {
            tracing::warn!(cause = %e, "could not drop the replaced state machine tree");
        }
        self.store_snapshot(meta, data).await?;
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        let files = self.files.clone();
        let read = tokio::task::spawn_blocking(move || files.read())
            .await
            .map_err(|e| read_snapshot_err(std::io::Error::other(e)))?;
        let Some((meta, data)) = read.map_err(read_snapshot_err)? else {
            return Ok(None);
        };
        Ok(Some(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Check, MemberSpec, MemberState};
    use openraft::{CommittedLeaderId, Membership as RaftMembership};

    fn log_id(term: u64, index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(term, 1), index)
    }

    fn normal(index: u64, cmd: Command) -> Entry<TypeConfig> {
        Entry {
            log_id: log_id(1, index),
            payload: EntryPayload::Normal(crate::model::Proposal {
                cmd,
                by: "test".into(),
                at_ms: index,
                force: false,
            }),
        }
    }

    fn register(service: &str, member: &str, address: &str) -> Command {
        Command::Register {
            service: service.into(),
            member: member.into(),
            spec: MemberSpec {
                address: address.into(),
                port: Some(8080),
                weight: None,
                ttl_s: Some(30),
            },
            create: ServiceDef::well_known("http"),
            at_ms: 5,
        }
    }

    fn membership_entry(index: u64) -> Entry<TypeConfig> {
        let nodes = BTreeMap::from([(
            1,
            BasicNode {
                addr: "127.0.0.1:1".into(),
            },
        )]);
        Entry {
            log_id: log_id(1, index),
            payload: EntryPayload::Membership(RaftMembership::new(
                vec![BTreeSet::from([1])],
                nodes,
            )),
        }
    }

    fn api_def() -> ServiceDef {
        ServiceDef {
            port: 8443,
            member_port: 9000,
            mode: crate::model::Mode::Http,
            balance: crate::model::Balance::Leastconn,
            check: Check::Http {
                path: "/health".into(),
            },
            server: Default::default(),
        }
    }

    #[tokio::test]
    async fn applied_state_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let (want_registry, want_membership) = {
            let mut stores = open(dir.path()).unwrap();
            let rx = stores.sm.subscribe();
            assert_eq!(rx.borrow().index, 0);
            let responses = stores
                .sm
                .apply(vec![
                    membership_entry(1),
                    Entry {
                        log_id: log_id(1, 2),
                        payload: EntryPayload::Blank,
                    },
                    normal(
                        3,
                        Command::DefineService {
                            service: "api".into(),
                            def: api_def(),
                        },
                    ),
                    normal(4, register("http", "a", "10.0.0.1")),
                    normal(5, register("http", "b", "10.0.0.2")),
                ])
                .await
                .unwrap();
            assert_eq!(responses, vec![Response::Done; 5]);
            let responses = stores
                .sm
                .apply(vec![
                    normal(6, register("api", "x", "10.0.0.3")),
                    normal(
                        7,
                        Command::Unregister {
                            service: "http".into(),
                            member: "a".into(),
                        },
                    ),
                    normal(
                        8,
                        Command::SetMemberState {
                            service: "http".into(),
                            member: "b".into(),
                            state: MemberState::Drain,
                        },
                    ),
                    normal(
                        9,
                        Command::Unregister {
                            service: "http".into(),
                            member: "zz".into(),
                        },
                    ),
                ])
                .await
                .unwrap();
            assert!(responses[..3].iter().all(|r| *r == Response::Done));
            assert!(matches!(responses[3], Response::NotFound { .. }));
            assert_eq!(rx.borrow().index, 9);
            let (applied, membership) = stores.sm.applied_state().await.unwrap();
            assert_eq!(applied, Some(log_id(1, 9)));
            let registry = rx.borrow().registry.clone();
            assert!(registry.member("http", "a").is_none());
            assert_eq!(
                registry.member("http", "b").map(|m| m.state),
                Some(MemberState::Drain)
            );
            ((*registry).clone(), membership)
        };

        let mut stores = reopen(dir.path());
        let applied = stores.sm.subscribe().borrow().clone();
        assert_eq!(applied.index, 9);
        assert_eq!(*applied.registry, want_registry);
        assert_eq!(want_registry.services["api"].def, api_def());
        let (last, membership) = stores.sm.applied_state().await.unwrap();
        assert_eq!(last, Some(log_id(1, 9)));
        assert_eq!(membership, want_membership);
        assert_eq!(membership.log_id(), &Some(log_id(1, 1)));
    }

    #[tokio::test]
    async fn installed_snapshot_replaces_state() {
        let leader_dir = tempfile::tempdir().unwrap();
        let follower_dir = tempfile::tempdir().unwrap();
        let mut leader = open(leader_dir.path()).unwrap();
        leader
            .sm
            .apply(vec![
                membership_entry(1),
                normal(2, register("http", "a", "10.0.0.1")),
                normal(
                    3,
                    Command::DefineService {
                        service: "api".into(),
                        def: api_def(),
                    },
                ),
            ])
            .await
            .unwrap();
        let snap = leader
            .sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();
        assert_eq!(snap.meta.last_log_id, Some(log_id(1, 3)));

        {
            let mut follower = open(follower_dir.path()).unwrap();
            follower
                .sm
                .apply(vec![
                    normal(1, register("http", "old", "10.9.9.9")),
                    normal(2, register("redis", "r", "10.9.9.8")),
                ])
                .await
                .unwrap();
            let mut rx = follower.sm.subscribe();
            rx.mark_unchanged();
            let mut incoming = follower.sm.begin_receiving_snapshot().await.unwrap();
            *incoming = *snap.snapshot.clone();
            follower
                .sm
                .install_snapshot(&snap.meta, incoming)
                .await
                .unwrap();
            assert!(rx.has_changed().unwrap());
            let applied = rx.borrow().clone();
            assert_eq!(applied.index, 3);
            assert!(applied.registry.member("http", "old").is_none());
            assert!(!applied.registry.services.contains_key("redis"));
            let current = follower.sm.get_current_snapshot().await.unwrap().unwrap();
            assert_eq!(current.meta, snap.meta);
        }

        // The replaced tree is what a restart sees.
        let mut follower = reopen(follower_dir.path());
        let leader_registry = leader.sm.subscribe().borrow().registry.clone();
        let applied = follower.sm.subscribe().borrow().clone();
        assert_eq!(applied.registry, leader_registry);
        assert_eq!(applied.index, 3);
        assert_eq!(
            follower.sm.applied_state().await.unwrap(),
            (snap.meta.last_log_id, snap.meta.last_membership.clone())
        );
        let current = follower.sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(current.meta, snap.meta);
    }

    #[tokio::test]
    async fn log_meta_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut stores = open(dir.path()).unwrap();
            stores.log.save_vote(&Vote::new(3, 2)).await.unwrap();
            stores.log.save_committed(Some(log_id(2, 7))).await.unwrap();
            stores.log.purge(log_id(2, 7)).await.unwrap();
            stores.db.flush().unwrap();
        }
        let mut stores = reopen(dir.path());
        assert_eq!(stores.log.read_vote().await.unwrap(), Some(Vote::new(3, 2)));
        assert_eq!(
            stores.log.read_committed().await.unwrap(),
            Some(log_id(2, 7))
        );
        let state = stores.log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(2, 7)));
        assert_eq!(state.last_log_id, Some(log_id(2, 7)));
    }

    #[test]
    fn log_entries_round_trip_through_bincode() {
        let entry = normal(
            4,
            Command::Register {
                service: "api".into(),
                member: "m".into(),
                spec: MemberSpec {
                    address: "h.example".into(),
                    port: None,
                    weight: Some(3),
                    ttl_s: None,
                },
                create: Some(api_def()),
                at_ms: 1,
            },
        );
        let back: Entry<TypeConfig> = unbin(&bin(&entry).unwrap()).unwrap();
        assert_eq!(back.log_id, entry.log_id);
        match (back.payload, entry.payload) {
            (EntryPayload::Normal(a), EntryPayload::Normal(b)) => assert_eq!(a, b),
            _ => panic!("payload changed"),
        }
    }

    #[tokio::test]
    async fn a_batch_entry_writes_an_audit_record_per_change() {
        let p = |cmd| crate::model::Proposal {
            cmd,
            by: "test".into(),
            at_ms: 2,
            force: false,
        };
        let dir = tempfile::tempdir().unwrap();
        let audit_of = |db: &sled::Db| -> Vec<(u64, Option<String>)> {
            read_audit(db, |_| true, 10)
                .unwrap()
                .into_iter()
                .map(|e| (e.index, e.member))
                .collect()
        };
        let want = vec![
            (2, Some("c".to_string())),
            (2, Some("b".to_string())),
            (1, Some("a".to_string())),
        ];
        let snap = {
            let mut stores = open(dir.path()).unwrap();
            let responses = stores
                .sm
                .apply(vec![
                    normal(1, register("http", "a", "10.0.0.1")),
                    normal(
                        2,
                        Command::Batch(vec![
                            p(register("http", "b", "10.0.0.2")),
                            p(Command::Unregister {
                                service: "http".into(),
                                member: "zz".into(),
                            }),
                            p(register("http", "c", "10.0.0.3")),
                        ]),
                    ),
                ])
                .await
                .unwrap();
            assert_eq!(responses[0], Response::Done);
            assert!(matches!(&responses[1], Response::Batch(each) if each.len() == 3));
            assert_eq!(audit_of(&stores.db), want);
            stores
                .sm
                .get_snapshot_builder()
                .await
                .build_snapshot()
                .await
                .unwrap()
        };
        // A restart counts the records and finds every member.
        let stores = reopen(dir.path());
        assert_eq!(stores.sm.lock().audit_len, 3);
        let registry = stores.sm.subscribe().borrow().registry.clone();
        assert_eq!(registry.services["http"].members.len(), 3);

        // A node that installs the snapshot gets the same history.
        let other = tempfile::tempdir().unwrap();
        let mut follower = open(other.path()).unwrap();
        let mut incoming = follower.sm.begin_receiving_snapshot().await.unwrap();
        *incoming = *snap.snapshot.clone();
        follower
            .sm
            .install_snapshot(&snap.meta, incoming)
            .await
            .unwrap();
        assert_eq!(audit_of(&follower.db), want);
        assert_eq!(follower.sm.lock().audit_len, 3);
    }

    #[tokio::test]
    async fn an_install_cut_short_leaves_the_live_state_alone() {
        let dir = tempfile::tempdir().unwrap();
        {
            let mut stores = open(dir.path()).unwrap();
            stores
                .sm
                .apply(vec![normal(1, register("http", "a", "10.0.0.1"))])
                .await
                .unwrap();
            // What a crash in the middle of install_snapshot leaves: a
            // half-written tree the switch never pointed to.
            let partial = stores.db.open_tree("sm-00000000000000ff").unwrap();
            partial.insert("m/http/zz", &b"{}"[..]).unwrap();
            stores.db.flush().unwrap();
        }
        let stores = reopen(dir.path());
        let names = stores.db.tree_names();
        assert!(!names.iter().any(|n| n.starts_with(b"sm-")), "{names:?}");
        let applied = stores.sm.subscribe().borrow().clone();
        assert_eq!(applied.index, 1);
        assert!(applied.registry.member("http", "a").is_some());
        assert!(applied.registry.member("http", "zz").is_none());
    }

    #[test]
    fn services_stored_with_btreemap_members_still_decode() {
        // The shape of `Service` before members became a persistent map, as
        // older log entries (Restore) and snapshots hold it.
        #[derive(Serialize)]
        struct OldService {
            def: ServiceDef,
            members: BTreeMap<String, Member>,
        }
        let member = Member {
            address: "10.0.0.1".into(),
            port: 80,
            weight: 1,
            state: crate::model::MemberState::Drain,
            registered_at_ms: 3,
            ttl_s: None,
        };
        let old = OldService {
            def: api_def(),
            members: BTreeMap::from([("a".to_string(), member.clone())]),
        };
        let from_bincode: Service = unbin(&bin(&old).unwrap()).unwrap();
        let from_json: Service = serde_json::from_slice(&json(&old).unwrap()).unwrap();
        for svc in [from_bincode, from_json] {
            assert_eq!(svc.def, api_def());
            assert_eq!(svc.members.get("a"), Some(&member));
            assert_eq!(svc.members.len(), 1);
        }
    }

    /// A backup of `n` members in service `http`, and the entries that
    /// restore it, from log index `first`.
    fn restore_entries(n: usize, first: u64) -> (Registry, Vec<Entry<TypeConfig>>) {
        let mut backup = Registry::default();
        for i in 0..n {
            backup.apply(&register("http", &format!("m{i:05}"), "10.0.0.1"));
        }
        let plan = crate::restore::Plan::new(backup.clone());
        let entries = plan
            .commands()
            .into_iter()
            .enumerate()
            .map(|(i, cmd)| normal(first + i as u64, cmd))
            .collect();
        (backup, entries)
    }

    /// Opens `dir` again once the last handle's sled threads (a page table
    /// snapshot after many writes) have let go of its lock.
    fn reopen(dir: &Path) -> Stores {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match open(dir) {
                Ok(stores) => return stores,
                Err(StoreError::Open(e))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                Err(e) => panic!("reopen {}: {e}", dir.display()),
            }
        }
    }

    fn keys_under(db: &sled::Db, prefix: &str) -> usize {
        sm_tree(db).unwrap().scan_prefix(prefix).count()
    }

    #[tokio::test]
    async fn a_restore_in_parts_is_invisible_until_its_commit_across_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let (backup, entries) = restore_entries(5_000, 1);
        let parts = entries.len() - 1;
        assert!(parts > 2, "{parts}");
        for (i, entry) in entries.into_iter().enumerate() {
            // A restart after every entry: the registry is empty or whole.
            let mut stores = reopen(dir.path());
            assert_eq!(
                stores.sm.apply(vec![entry]).await.unwrap(),
                [Response::Done]
            );
            drop(stores);
            let stores = reopen(dir.path());
            let registry = stores.sm.subscribe().borrow().registry.clone();
            if i < parts {
                assert!(registry.services.is_empty(), "live after part {i}");
                let staged = registry.restoring.as_ref().expect("staged");
                assert_eq!(staged.parts as usize, i + 1);
            } else {
                assert_eq!(*registry, backup);
            }
        }
        // Later writes land beside the restored keys, and one audit record
        // says what happened.
        let mut stores = reopen(dir.path());
        let index = parts as u64 + 2;
        stores
            .sm
            .apply(vec![
                normal(index, register("http", "late", "10.0.0.2")),
                normal(
                    index + 1,
                    Command::Unregister {
                        service: "http".into(),
                        member: "m00000".into(),
                    },
                ),
            ])
            .await
            .unwrap();
        drop(stores);
        let stores = reopen(dir.path());
        let registry = stores.sm.subscribe().borrow().registry.clone();
        assert!(registry.member("http", "late").is_some());
        assert!(registry.member("http", "m00000").is_none());
        assert_eq!(registry.member_count(), 5_000);
        let audit = read_audit(&stores.db, |_| true, 10).unwrap();
        let actions: Vec<&str> = audit.iter().map(|a| a.action.as_str()).collect();
        assert_eq!(actions, ["unregister", "register", "restore"]);
    }

    #[tokio::test]
    async fn a_snapshot_taken_mid_restore_carries_the_staged_parts() {
        let (backup, entries) = restore_entries(3_000, 2);
        let (first, rest) = entries.split_at(2);
        let leader_dir = tempfile::tempdir().unwrap();
        let mut leader = reopen(leader_dir.path());
        let mut head = vec![membership_entry(1)];
        head.extend(first.iter().cloned());
        leader.sm.apply(head).await.unwrap();
        let snap = leader
            .sm
            .get_snapshot_builder()
            .await
            .build_snapshot()
            .await
            .unwrap();

        let follower_dir = tempfile::tempdir().unwrap();
        {
            let mut follower = reopen(follower_dir.path());
            let mut incoming = follower.sm.begin_receiving_snapshot().await.unwrap();
            *incoming = *snap.snapshot.clone();
            follower
                .sm
                .install_snapshot(&snap.meta, incoming)
                .await
                .unwrap();
        }
        // Restarted, the follower still has the parts, and finishes the
        // restore as the leader does.
        let mut follower = reopen(follower_dir.path());
        let staged = follower.sm.subscribe().borrow().registry.restoring.clone();
        assert_eq!(staged.map(|s| s.parts), Some(2));
        for node in [&mut leader, &mut follower] {
            node.sm.apply(rest.to_vec()).await.unwrap();
            assert_eq!(*node.sm.subscribe().borrow().registry, backup);
        }
        drop(follower);
        let follower = reopen(follower_dir.path());
        assert_eq!(*follower.sm.subscribe().borrow().registry, backup);
    }

    #[tokio::test]
    async fn a_restore_given_up_leaves_no_keys_behind() {
        let dir = tempfile::tempdir().unwrap();
        let (_, entries) = restore_entries(3_000, 1);
        {
            let mut stores = reopen(dir.path());
            stores.sm.apply(entries[..2].to_vec()).await.unwrap();
            assert!(keys_under(&stores.db, "r/") > 1_500);
            // A registration: the backup can no longer go live.
            stores
                .sm
                .apply(vec![normal(3, register("web", "a", "10.0.0.3"))])
                .await
                .unwrap();
            assert_eq!(keys_under(&stores.db, "r/"), 0);
            // What a crash while removing them would leave.
            sm_tree(&stores.db)
                .unwrap()
                .insert("r/00000000000000aa/m/http/x", &b"{}"[..])
                .unwrap();
            stores.db.flush().unwrap();
        }
        let stores = reopen(dir.path());
        assert_eq!(keys_under(&stores.db, "r/"), 0);
        let registry = stores.sm.subscribe().borrow().registry.clone();
        assert!(registry.restoring.is_none());
        assert_eq!(registry.member_count(), 1);
    }

    #[tokio::test]
    async fn log_entries_over_the_value_bound_are_stored_in_parts() {
        let dir = tempfile::tempdir().unwrap();
        let mut stores = reopen(dir.path());
        let p = |cmd| crate::model::Proposal {
            cmd,
            by: "test".into(),
            at_ms: 2,
            force: false,
        };
        let batch = |n: usize| {
            Command::Batch(
                (0..n)
                    .map(|i| p(register("http", &format!("m{i}"), "10.0.0.1")))
                    .collect(),
            )
        };
        let entries: Vec<_> = (1..=20)
            .map(|i| normal(i, batch(if i % 2 == 0 { 256 } else { 1 })))
            .collect();
        let batch_of = stores.log.append_batch(entries.clone()).unwrap();
        stores.log.log.apply_batch(batch_of).unwrap();
        let longest = stores
            .log
            .log
            .iter()
            .values()
            .map(|v| v.unwrap().len())
            .max();
        assert!(longest.unwrap() <= MAX_VALUE, "{longest:?}");
        assert!(stores.log.log.len() > 40, "{}", stores.log.log.len());
        let read = stores.log.try_get_log_entries(3..=12).await.unwrap();
        assert_eq!(read.len(), 10);
        for (got, want) in read.iter().zip(&entries[2..12]) {
            assert_eq!(got.log_id, want.log_id);
            match (&got.payload, &want.payload) {
                (EntryPayload::Normal(a), EntryPayload::Normal(b)) => assert_eq!(a, b),
                _ => panic!("payload changed"),
            }
        }
        let state = stores.log.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id, Some(log_id(1, 20)));
        // Written again in the other form: no part of the old one stays.
        let again: Vec<_> = (19..=20).map(|i| normal(i, batch(1))).collect();
        let batch_of = stores.log.append_batch(again).unwrap();
        stores.log.log.apply_batch(batch_of).unwrap();
        let tail = stores.log.try_get_log_entries(19..).await.unwrap();
        assert_eq!(tail.len(), 2);
        stores.log.truncate(log_id(1, 12)).await.unwrap();
        stores.log.purge(log_id(1, 4)).await.unwrap();
        let left = stores.log.try_get_log_entries(0..).await.unwrap();
        let indexes: Vec<u64> = left.iter().map(|e| e.log_id.index).collect();
        assert_eq!(indexes, (5..=11).collect::<Vec<_>>());
        let state = stores.log.get_log_state().await.unwrap();
        assert_eq!(state.last_log_id, Some(log_id(1, 11)));
    }

    #[tokio::test]
    async fn a_snapshot_kept_in_sled_by_an_older_version_moves_to_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let meta = SnapshotMeta {
            last_log_id: Some(log_id(1, 3)),
            last_membership: Membership::default(),
            snapshot_id: "1-3-1".into(),
        };
        {
            let stores = reopen(dir.path());
            let tree = stores.db.open_tree("snapshot").unwrap();
            tree.insert(SNAP_META_KEY, serde_json::to_vec(&meta).unwrap())
                .unwrap();
            tree.insert(SNAP_DATA_KEY, &b"{}"[..]).unwrap();
            stores.db.flush().unwrap();
        }
        let mut stores = reopen(dir.path());
        let snap = stores.sm.get_current_snapshot().await.unwrap().unwrap();
        assert_eq!(
            (snap.meta, snap.snapshot.into_inner()),
            (meta, b"{}".to_vec())
        );
        let tree = stores.db.open_tree("snapshot").unwrap();
        assert!(tree.get(SNAP_DATA_KEY).unwrap().is_none());
    }

    #[test]
    fn identity_meta_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let stores = open(dir.path()).unwrap();
        assert_eq!(get_meta(&stores.db, "node_id").unwrap(), None);
        set_meta(&stores.db, "node_id", "7").unwrap();
        assert_eq!(
            get_meta(&stores.db, "node_id").unwrap().as_deref(),
            Some("7")
        );
    }
}
