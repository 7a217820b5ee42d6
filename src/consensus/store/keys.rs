//! How the store encodes: [`crate::codec`] values, big-endian log keys, the
//! registry's text keys (service, member, token, staged backup) and audit
//! records.

use super::*;

pub(super) fn bin<T: Serialize>(v: &T) -> Result<Vec<u8>, CodecError> {
    crate::codec::encode(v)
}

pub(super) fn unbin<T: DeserializeOwned>(raw: &[u8]) -> Result<T, CodecError> {
    crate::codec::decode(raw)
}

pub(super) fn index_key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

/// Part `part` of the entry at `index`, for entries over [`MAX_VALUE`]. It
/// sorts after `index_key(index)` and before `index_key(index + 1)`.
pub(super) fn part_key(index: u64, part: u32) -> [u8; 12] {
    let mut key = [0; 12];
    key[..8].copy_from_slice(&index.to_be_bytes());
    key[8..].copy_from_slice(&part.to_be_bytes());
    key
}

// Registry keys live under a prefix (see PREFIX_KEY); a staged backup's
// under `stage_prefix(id)`.

pub(super) fn service_key(prefix: &str, service: &str) -> String {
    format!("{prefix}s/{service}")
}

pub(super) fn member_key(prefix: &str, service: &str, member: &str) -> String {
    format!("{prefix}m/{service}/{member}")
}

pub(super) fn member_prefix(prefix: &str, service: &str) -> String {
    format!("{prefix}m/{service}/")
}

pub(super) fn token_key(prefix: &str, id: &str) -> String {
    format!("{prefix}t/{id}")
}

pub(super) fn stage_prefix(id: u64) -> String {
    format!("r/{id:016x}/")
}

/// The `n`th audit record of log entry `index` (a batch entry has several).
/// Zero-padded so keys sort by index, then by position. Older data dirs also
/// hold `a/{index:020}` keys, which sort the same way.
pub(super) fn audit_key(index: u64, n: usize) -> String {
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
