//! openraft's own storage conformance suite against the sled stores.

use clb::consensus::store::{open, LogStore, StateMachine};
use clb::consensus::{StorageError, TypeConfig};
use openraft::testing::{StoreBuilder, Suite};
use openraft::StorageIOError;
use tempfile::TempDir;

/// Opens fresh stores in a new temp dir; the dir lives as long as the guard.
struct SledBuilder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for SledBuilder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError> {
        let dir = tempfile::tempdir().map_err(|e| StorageIOError::write(&e))?;
        let stores = open(dir.path()).map_err(|e| StorageIOError::write(&e))?;
        Ok((dir, stores.log, stores.sm))
    }
}

// Suite::test_all runs every case on its own fresh tokio runtime, so it is
// called from a plain (non-async) test.
#[test]
fn openraft_storage_suite() {
    Suite::test_all(SledBuilder).expect("openraft storage suite");
}
