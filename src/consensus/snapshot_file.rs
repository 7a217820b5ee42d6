//! The current Raft snapshot as a file in the data dir (`snapshots/`), not a
//! sled value: sled 0.34 writes a value that large to its `blobs/` directory
//! and never fsyncs it, so a power cut could lose a snapshot openraft had
//! already purged the log for.
//!
//! A snapshot is written to a temp file, fsynced, renamed into place and the
//! directory fsynced; the file it replaces is removed only after that. A
//! file is one line of JSON ([`Header`]) followed by the snapshot data.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use openraft::{BasicNode, SnapshotMeta};
use serde::{Deserialize, Serialize};

use super::NodeId;

type Meta = SnapshotMeta<NodeId, BasicNode>;

/// The directory inside the data dir.
pub const DIR: &str = "snapshots";
const FORMAT: &str = "clb-snapshot-file-1";
const SUFFIX: &str = ".snap";
const TEMP_SUFFIX: &str = ".tmp";

#[derive(Serialize, Deserialize)]
struct Header {
    format: String,
    meta: Meta,
    /// Bytes of data after the header line: a shorter file is refused.
    len: u64,
}

struct Current {
    meta: Meta,
    path: PathBuf,
}

/// The snapshot files of one data dir.
pub struct SnapshotFiles {
    dir: PathBuf,
    /// Also serializes stores and reads: a read never sees a file removed
    /// under it, and a build that finishes after a newer install is dropped.
    current: Mutex<Option<Current>>,
}

impl SnapshotFiles {
    /// Opens `data_dir/snapshots`, creating it. Keeps the newest complete
    /// snapshot; removes temp files and older snapshots a crash left behind.
    pub fn open(data_dir: &Path) -> io::Result<Self> {
        let dir = data_dir.join(DIR);
        if !dir.is_dir() {
            std::fs::create_dir_all(&dir)?;
            sync_dir(data_dir)?;
        }
        let mut found: Vec<Current> = Vec::new();
        for item in std::fs::read_dir(&dir)? {
            let path = item?.path();
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            if name.ends_with(TEMP_SUFFIX) {
                std::fs::remove_file(&path)?;
            } else if name.ends_with(SUFFIX) {
                match read_header(&path) {
                    Ok((meta, _)) => found.push(Current { meta, path }),
                    // Never renamed into place unfinished; a damaged file
                    // is worth a look, not a refusal to start: openraft
                    // builds a new snapshot when it needs one.
                    Err(e) => {
                        tracing::warn!(path = %path.display(), cause = %e, "ignoring an unreadable snapshot file")
                    }
                }
            }
        }
        found.sort_by_key(|c| c.meta.last_log_id);
        let current = found.pop();
        for old in found {
            std::fs::remove_file(&old.path)?;
        }
        Ok(Self {
            dir,
            current: Mutex::new(current),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Option<Current>> {
        self.current.lock().unwrap_or_else(|p| p.into_inner())
    }

    #[cfg(test)]
    pub fn meta(&self) -> Option<Meta> {
        self.lock().as_ref().map(|c| c.meta.clone())
    }

    /// The current snapshot's meta and data.
    pub fn read(&self) -> io::Result<Option<(Meta, Vec<u8>)>> {
        let current = self.lock();
        let Some(c) = current.as_ref() else {
            return Ok(None);
        };
        let (meta, mut reader) = read_header(&c.path)?;
        let mut data = Vec::new();
        reader.read_to_end(&mut data)?;
        Ok(Some((meta, data)))
    }

    /// Makes `meta`/`data` the current snapshot, durably, unless a newer one
    /// is already stored (a build may finish after an install overtook it).
    /// Returns whether it was stored.
    pub fn store(&self, meta: &Meta, data: &[u8]) -> io::Result<bool> {
        let mut current = self.lock();
        if current
            .as_ref()
            .is_some_and(|c| c.meta.last_log_id > meta.last_log_id)
        {
            return Ok(false);
        }
        let name = format!(
            "{:020}-{:016x}",
            meta.last_log_id.map_or(0, |l| l.index),
            rand::random::<u64>()
        );
        let temp = self.dir.join(format!("{name}{TEMP_SUFFIX}"));
        let path = self.dir.join(format!("{name}{SUFFIX}"));
        let header = Header {
            format: FORMAT.into(),
            meta: meta.clone(),
            len: data.len() as u64,
        };
        let written = (|| {
            let mut f = File::create(&temp)?;
            let mut line = serde_json::to_vec(&header).map_err(io::Error::other)?;
            line.push(b'\n');
            f.write_all(&line)?;
            f.write_all(data)?;
            f.sync_all()?;
            std::fs::rename(&temp, &path)?;
            sync_dir(&self.dir)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&temp);
            return Err(e);
        }
        // Only now that the new file and its name are durable.
        let old = current.replace(Current {
            meta: meta.clone(),
            path: path.clone(),
        });
        if let Some(old) = old.filter(|o| o.path != path) {
            // Not worth failing the snapshot for (openraft would stop): the
            // next start removes it.
            if let Err(e) = std::fs::remove_file(&old.path) {
                tracing::warn!(path = %old.path.display(), cause = %e, "could not remove the replaced snapshot");
            }
        }
        Ok(true)
    }
}

/// The header of the snapshot file at `path`, and a reader at its data,
/// whose length was checked.
fn read_header(path: &Path) -> io::Result<(Meta, BufReader<File>)> {
    let file = File::open(path)?;
    let size = file.metadata()?.len();
    let mut reader = BufReader::new(file);
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line)?;
    let header: Header = serde_json::from_slice(&line).map_err(io::Error::other)?;
    if header.format != FORMAT {
        return Err(io::Error::other(format!(
            "format {:?}, not {FORMAT}",
            header.format
        )));
    }
    if size != line.len() as u64 + header.len {
        return Err(io::Error::other(format!(
            "{size} bytes, the header says {}",
            line.len() as u64 + header.len
        )));
    }
    Ok((header.meta, reader))
}

/// Makes the names in `dir` durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{CommittedLeaderId, LogId, StoredMembership};

    fn meta(index: u64) -> Meta {
        SnapshotMeta {
            last_log_id: Some(LogId::new(CommittedLeaderId::new(1, 1), index)),
            last_membership: StoredMembership::default(),
            snapshot_id: format!("1-{index}-1"),
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(dir.join(DIR))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn the_newest_snapshot_is_kept_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let files = SnapshotFiles::open(dir.path()).unwrap();
        assert!(files.read().unwrap().is_none());
        assert!(files.store(&meta(5), b"five").unwrap());
        assert!(files.store(&meta(9), b"nine").unwrap());
        // A build that finished after a newer install is dropped.
        assert!(!files.store(&meta(7), b"seven").unwrap());
        assert_eq!(files.read().unwrap(), Some((meta(9), b"nine".to_vec())));
        assert_eq!(names(dir.path()).len(), 1, "{:?}", names(dir.path()));

        // What a crash leaves: a temp file and an older snapshot not yet removed.
        let snaps = dir.path().join(DIR);
        std::fs::write(snaps.join("x.tmp"), b"half").unwrap();
        let stale = snaps.join("00000000000000000003-0000000000000000.snap");
        let mut f = File::create(&stale).unwrap();
        let mut line = serde_json::to_vec(&Header {
            format: FORMAT.into(),
            meta: meta(3),
            len: 5,
        })
        .unwrap();
        line.push(b'\n');
        f.write_all(&line).unwrap();
        f.write_all(b"three").unwrap();
        drop(f);
        let files = SnapshotFiles::open(dir.path()).unwrap();
        assert_eq!(files.meta(), Some(meta(9)));
        assert_eq!(files.read().unwrap().unwrap().1, b"nine");
        assert_eq!(names(dir.path()).len(), 1, "{:?}", names(dir.path()));
    }

    #[test]
    fn a_short_file_is_not_taken_for_a_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let files = SnapshotFiles::open(dir.path()).unwrap();
        files.store(&meta(4), b"four").unwrap();
        let path = dir.path().join(DIR).join(&names(dir.path())[0]);
        let len = std::fs::metadata(&path).unwrap().len();
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(len - 1)
            .unwrap();
        let files = SnapshotFiles::open(dir.path()).unwrap();
        assert_eq!(files.meta(), None);
    }
}
