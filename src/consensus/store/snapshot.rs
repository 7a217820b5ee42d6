//! Snapshots: built from the applied registry on a background thread at
//! low priority and kept as a file beside the database (`snapshot_file`);
//! an older version's snapshot tree moved to that file. Installing one from
//! a leader is the state machine's (`state_machine.rs`).

use super::*;
/// Older versions kept the current snapshot in the `snapshot` tree, its
/// data as one value (in sled's unsynced `blobs/` once over ~128 KiB): it
/// becomes a file. Unreadable, it is dropped; openraft builds a new one
/// when it needs one.
pub(super) fn move_snapshot_to_file(
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
pub(super) const BACKGROUND_NICE: libc::c_int = 10;

/// Runs `f` on a new thread at [`BACKGROUND_NICE`]. Raising one's own
/// niceness needs no privilege; if it fails the work runs at normal priority.
pub(super) fn background<T: Send + 'static>(
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
