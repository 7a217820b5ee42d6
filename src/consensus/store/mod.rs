//! sled-backed Raft storage: the log store (entries, vote, committed, last
//! purged) and the state machine (the registry, persisted key by key). One
//! `sled::Db` holds every tree; the current snapshot is a file beside it
//! (see `snapshot_file`).
//!
//! Trees: `log` (big-endian index → encoded entry, or its parts), `meta`
//! (vote, committed, last purged), `sm` (registry keys, a backup being
//! restored, applied log id and membership), `snapshot` (a counter for
//! snapshot ids) and `ident` (node identity, see [`get_meta`]).
//!
//! Files: `keys.rs` (encodings and key layout), `log.rs` (the log store),
//! `state_machine.rs` (apply, persist, the published registry, snapshot
//! install), `snapshot.rs` (snapshot build); this file opens the database and
//! holds what they share (errors, tree names, node identity).
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
use crate::codec::{Codec, CodecError};
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
    if let Some(m) = migrate::to_current(&db, &log)? {
        if m != migrate::Migrated::default() {
            tracing::info!(
                entries = m.entries,
                values = m.values,
                "migrated the data dir from the previous release's encoding"
            );
        }
    }
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

mod keys;
mod log;
mod migrate;
mod snapshot;
mod state_machine;

pub use keys::read_audit;
use keys::*;
pub use log::LogStore;
use snapshot::*;
use state_machine::*;
pub use state_machine::{Applied, StateMachine};

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

    /// The model's test registration, with a TTL so that is stored too.
    fn register(service: &str, member: &str, address: &str) -> Command {
        let mut cmd = crate::model::register_for_test(service, member, address);
        if let Command::Register { spec, .. } = &mut cmd {
            spec.ttl_s = Some(30);
        }
        cmd
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

    /// Rewrites the encoded values of the closed data dir `dir` the way the
    /// release before postcard wrote them: bincode, entries cut in parts of
    /// its own size, no format mark.
    fn make_legacy(dir: &Path) {
        fn legacy<T: Serialize>(v: &T) -> Vec<u8> {
            Codec::Legacy.encode(v).unwrap()
        }
        let stores = reopen(dir);
        let entries = LogStore::decode(stores.log.log.iter()).unwrap();
        stores.log.log.clear().unwrap();
        for entry in entries {
            let value = legacy(&entry);
            let index = entry.log_id.index;
            if value.len() <= MAX_VALUE {
                stores.log.log.insert(index_key(index), value).unwrap();
            } else {
                for (n, part) in value.chunks(MAX_VALUE).enumerate() {
                    stores
                        .log
                        .log
                        .insert(part_key(index, n as u32), part)
                        .unwrap();
                }
            }
        }
        let meta = &stores.log.meta;
        let vote: Vote<NodeId> = unbin(&meta.get(VOTE_KEY).unwrap().unwrap()).unwrap();
        meta.insert(VOTE_KEY, legacy(&vote)).unwrap();
        for key in [COMMITTED_KEY, PURGED_KEY] {
            let id: LogId = unbin(&meta.get(key).unwrap().unwrap()).unwrap();
            meta.insert(key, legacy(&id)).unwrap();
        }
        let sm = sm_tree(&stores.db).unwrap();
        let applied: Option<LogId> = unbin(&sm.get(APPLIED_KEY).unwrap().unwrap()).unwrap();
        sm.insert(APPLIED_KEY, legacy(&applied)).unwrap();
        let m: Membership = unbin(&sm.get(MEMBERSHIP_KEY).unwrap().unwrap()).unwrap();
        sm.insert(MEMBERSHIP_KEY, legacy(&m)).unwrap();
        stores.db.remove(b"format").unwrap();
        stores.db.flush().unwrap();
        // Really legacy: the current decoder cannot read it.
        assert!(unbin::<Vote<NodeId>>(&meta.get(VOTE_KEY).unwrap().unwrap()).is_err());
    }

    /// A data dir of the release before postcard opens with everything it
    /// held: log entries (some in parts), vote, committed, purged, applied
    /// state and membership. It is migrated once, and a dir marked with a
    /// newer format is refused rather than misread.
    #[tokio::test]
    async fn a_legacy_data_dir_is_migrated_once_and_reads_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let big = |n: usize| {
            Command::Batch(
                (0..n)
                    .map(|i| crate::model::Proposal {
                        cmd: register("http", &format!("m{i}"), "10.0.0.1"),
                        by: "test".into(),
                        at_ms: 2,
                        force: false,
                    })
                    .collect(),
            )
        };
        let mut entries = vec![membership_entry(1)];
        entries.extend((2..=12).map(|i| normal(i, big(if i % 3 == 0 { 200 } else { 1 }))));
        let want = {
            let mut stores = open(dir.path()).unwrap();
            let batch = stores.log.append_batch(entries.clone()).unwrap();
            stores.log.log.apply_batch(batch).unwrap();
            stores
                .log
                .save_vote(&Vote::new_committed(4, 2))
                .await
                .unwrap();
            stores.log.save_committed(Some(log_id(1, 9))).await.unwrap();
            stores.log.purge(log_id(1, 2)).await.unwrap();
            stores.sm.apply(entries[..9].to_vec()).await.unwrap();
            let registry = stores.sm.subscribe().borrow().registry.clone();
            assert_eq!(registry.member_count(), 200);
            (registry, stores.sm.applied_state().await.unwrap())
        };
        make_legacy(dir.path());

        let mut stores = reopen(dir.path());
        // Every entry, whole or its first part, now starts with the format byte.
        for item in stores.log.log.iter() {
            let (key, value) = item.unwrap();
            if key.len() == 8 || key[8..] == [0; 4] {
                assert_eq!(value[0], crate::codec::FORMAT_V1, "{key:?}");
            }
        }
        let read = stores.log.try_get_log_entries(0..).await.unwrap();
        let indexes: Vec<u64> = read.iter().map(|e| e.log_id.index).collect();
        assert_eq!(indexes, (3..=12).collect::<Vec<_>>());
        for (got, want) in read.iter().zip(&entries[2..]) {
            assert_eq!(got.log_id, want.log_id);
            match (&got.payload, &want.payload) {
                (EntryPayload::Normal(a), EntryPayload::Normal(b)) => assert_eq!(a, b),
                _ => panic!("payload changed"),
            }
        }
        assert!(
            stores.log.log.len() > read.len(),
            "big entries are in parts"
        );
        assert_eq!(
            stores.log.read_vote().await.unwrap(),
            Some(Vote::new_committed(4, 2))
        );
        assert_eq!(
            stores.log.read_committed().await.unwrap(),
            Some(log_id(1, 9))
        );
        let state = stores.log.get_log_state().await.unwrap();
        assert_eq!(state.last_purged_log_id, Some(log_id(1, 2)));
        assert_eq!(stores.sm.subscribe().borrow().registry, want.0);
        assert_eq!(stores.sm.applied_state().await.unwrap(), want.1);
        assert_eq!(migrate::to_current(&stores.db, &stores.log).unwrap(), None);

        stores.db.insert(b"format", &[0xC2][..]).unwrap();
        drop(stores);
        let e = reopen_err(dir.path());
        assert!(e.contains("newer clbd"), "{e}");
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
    fn log_entries_round_trip_through_the_codec() {
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
        let from_codec: Service = unbin(&bin(&old).unwrap()).unwrap();
        let from_json: Service = serde_json::from_slice(&json(&old).unwrap()).unwrap();
        for svc in [from_codec, from_json] {
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
        reopen_result(dir).unwrap_or_else(|e| panic!("reopen {}: {e}", dir.display()))
    }

    fn reopen_result(dir: &Path) -> Result<Stores, StoreError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match open(dir) {
                Err(StoreError::Open(e))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10))
                }
                r => return r,
            }
        }
    }

    fn reopen_err(dir: &Path) -> String {
        match reopen_result(dir) {
            Ok(_) => panic!("{} opened", dir.display()),
            Err(e) => e.to_string(),
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
            .map(|i| normal(i, batch(if i % 2 == 0 { 512 } else { 1 })))
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
