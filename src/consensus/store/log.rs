//! The Raft log store: entries (split into parts of at most
//! [`MAX_VALUE`](super::MAX_VALUE) bytes), vote, committed and last purged,
//! in the `log` and `meta` trees.

use super::*;

/// The Raft log, vote, committed and last purged log id. Clones share the
/// same trees (a `sled::Tree` is a reference-counted handle).
#[derive(Clone)]
pub struct LogStore {
    pub(super) log: sled::Tree,
    pub(super) meta: sled::Tree,
    /// sled's data file, see [`LogStore::sync`].
    pub(super) file: Arc<std::fs::File>,
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
    pub(super) fn decode(
        items: impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        Self::decode_with(Codec::V1, items)
    }

    /// [`LogStore::decode`] of values in `codec` (a data dir being migrated).
    pub(super) fn decode_with(
        codec: Codec,
        items: impl Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError> {
        let finish = |entries: &mut Vec<Entry<TypeConfig>>,
                      parts: Option<([u8; 8], Vec<u8>)>|
         -> Result<(), StorageError> {
            if let Some((_, value)) = parts {
                entries.push(codec.decode(&value).map_err(read_logs_err)?);
            }
            Ok(())
        };
        let mut entries = Vec::new();
        let mut parts: Option<([u8; 8], Vec<u8>)> = None;
        for item in items {
            let (key, value) = item.map_err(read_logs_err)?;
            match key.len() {
                8 => {
                    finish(&mut entries, parts.take())?;
                    entries.push(codec.decode(&value).map_err(read_logs_err)?);
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
    pub(super) fn sync(&self) -> Result<(), sled::Error> {
        self.file.sync_data().map_err(sled::Error::from)
    }

    /// The writes that append `entries`: each under its index, or in parts
    /// of at most [`MAX_VALUE`] bytes.
    pub(super) fn append_batch(
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
