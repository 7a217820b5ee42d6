//! The data dir's format, and the one-time move of a data dir written by
//! the release before postcard ([`Codec::Legacy`] values) to
//! [`Codec::V1`], at open, before anything reads it.
//!
//! One sled transaction over every tree that holds encoded values, with the
//! format mark in the same transaction: a crash leaves the dir all legacy
//! (and unmarked, so the next open migrates again) or all v1 and marked.

use super::*;
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

/// Key of the db's default tree holding the data dir's format byte
/// ([`crate::codec::FORMAT_V1`]); absent in data dirs of the release before.
const FORMAT_KEY: &[u8] = b"format";

/// What a migration rewrote, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Migrated {
    pub entries: usize,
    pub values: usize,
}

/// Brings the data dir in `db` to the current format. `Ok(None)` when it
/// already was, `Ok(Some(_))` after a migration (a new dir's is empty).
pub(super) fn to_current(db: &sled::Db, store: &LogStore) -> Result<Option<Migrated>, StoreError> {
    let read_err = |what: &str| {
        let what = what.to_string();
        move |source| StoreError::Read { what, source }
    };
    match db.get(FORMAT_KEY).map_err(read_err("format"))? {
        Some(f) if f.as_ref() == [crate::codec::FORMAT_V1] => return Ok(None),
        Some(f) => {
            return Err(StoreError::Decode {
                what: "data dir format".into(),
                reason: format!(
                    "{:02x?}: written by a newer clbd; this one reads {:#04x}",
                    f.as_ref(),
                    crate::codec::FORMAT_V1
                ),
            })
        }
        None => {}
    }
    let sm = sm_tree(db)?;

    // The log: each entry re-encoded; the batch drops every key of the
    // range first, as the parts are cut anew (the encoded size changed).
    let entries =
        LogStore::decode_with(Codec::Legacy, store.log.iter()).map_err(|e| StoreError::Decode {
            what: "log entry (legacy)".into(),
            reason: e.to_string(),
        })?;
    let count = entries.len();
    let new_entries = store
        .append_batch(entries)
        .map_err(|e| StoreError::Decode {
            what: "log entry".into(),
            reason: e.to_string(),
        })?;

    // Single values: read as legacy, written as v1.
    fn convert<T: Serialize + DeserializeOwned>(
        tree: &sled::Tree,
        key: &[u8],
        out: &mut sled::Batch,
    ) -> Result<usize, StoreError> {
        let what = String::from_utf8_lossy(key).into_owned();
        let Some(raw) = tree.get(key).map_err(|source| StoreError::Read {
            what: what.clone(),
            source,
        })?
        else {
            return Ok(0);
        };
        let value: T = Codec::Legacy.decode(&raw).map_err(|e| StoreError::Decode {
            what: format!("{what} (legacy)"),
            reason: e.to_string(),
        })?;
        let new = bin(&value).map_err(|e| StoreError::Decode {
            what,
            reason: e.to_string(),
        })?;
        out.insert(key, new);
        Ok(1)
    }
    let mut meta_batch = sled::Batch::default();
    let mut values = 0;
    values += convert::<Vote<NodeId>>(&store.meta, VOTE_KEY, &mut meta_batch)?;
    values += convert::<LogId>(&store.meta, COMMITTED_KEY, &mut meta_batch)?;
    values += convert::<LogId>(&store.meta, PURGED_KEY, &mut meta_batch)?;
    let mut sm_batch = sled::Batch::default();
    values += convert::<Option<LogId>>(&sm, APPLIED_KEY, &mut sm_batch)?;
    values += convert::<Membership>(&sm, MEMBERSHIP_KEY, &mut sm_batch)?;
    values += convert::<(u64, u32)>(&sm, RESTORE_KEY, &mut sm_batch)?;

    let default: &sled::Tree = db;
    (&store.log, &store.meta, &sm, default)
        .transaction(|(log, meta, sm, default)| {
            log.apply_batch(&new_entries)?;
            meta.apply_batch(&meta_batch)?;
            sm.apply_batch(&sm_batch)?;
            default.insert(FORMAT_KEY, &[crate::codec::FORMAT_V1][..])?;
            Ok::<_, ConflictableTransactionError<()>>(())
        })
        .map_err(|e| match e {
            TransactionError::Storage(source) => StoreError::Write {
                what: "format migration".into(),
                source,
            },
            TransactionError::Abort(()) => unreachable!("the migration never aborts"),
        })?;
    // Durable before anything is read or acknowledged from the new values.
    db.flush().map_err(StoreError::Flush)?;
    store.sync().map_err(StoreError::Flush)?;
    Ok(Some(Migrated {
        entries: count,
        values,
    }))
}
