//! Node incarnations: a random id created with a node's data dir, carried in
//! every peer request and answer (`x-clb-from: NODE/INCARNATION`).
//!
//! A voter whose data dir was wiped comes back with the same node id but
//! without its log or its vote. Raft's safety rests on a voter never
//! forgetting either: such a node could vote for a candidate that misses
//! acknowledged writes, or vote twice in a term. So each node remembers,
//! in its own data dir, the incarnation it first saw for every peer, and
//! refuses requests from, and ignores answers of, a known node id with
//! another incarnation. A node leaves that record when it leaves the
//! membership (`clb cluster remove`), so it can be added back with a new
//! data dir. A node starting with a new data dir also asks its `--peers`
//! first, and refuses to start when one of them knows it from before
//! (see `Consensus::start`).

use std::collections::{BTreeSet, HashMap};
use std::sync::RwLock;

use super::store;
use super::NodeId;

/// Header naming the sender (or answerer) of a peer RPC.
pub const FROM_HEADER: &str = "x-clb-from";

const KEY_PREFIX: &str = "peer-incarnation/";

/// Why a peer's request or answer is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Mismatch {
    #[error("node {node} was known as incarnation {known:016x}, this is {presented:016x}: it lost its data dir, or another process runs with its id")]
    Replaced {
        node: NodeId,
        known: u64,
        presented: u64,
    },
    #[error("no or unreadable x-clb-from header")]
    Missing,
}

/// This node's incarnation and what it knows of its peers'.
#[derive(Debug)]
pub struct Incarnations {
    db: Option<sled::Db>,
    me: NodeId,
    mine: u64,
    known: RwLock<HashMap<NodeId, u64>>,
}

impl Incarnations {
    /// Reads the peers' incarnations recorded in the data dir.
    pub fn load(db: sled::Db, me: NodeId, mine: u64) -> Result<Self, store::StoreError> {
        let mut known = HashMap::new();
        for (key, value) in store::meta_with_prefix(&db, KEY_PREFIX)? {
            let id = key.parse::<NodeId>().ok();
            let inc = u64::from_str_radix(&value, 16).ok();
            if let (Some(id), Some(inc)) = (id, inc) {
                known.insert(id, inc);
            }
        }
        Ok(Incarnations {
            db: Some(db),
            me,
            mine,
            known: RwLock::new(known),
        })
    }

    /// An identity that records nothing (tools and tests that act as a peer).
    pub fn ephemeral(me: NodeId, mine: u64) -> Self {
        Incarnations {
            db: None,
            me,
            mine,
            known: RwLock::new(HashMap::new()),
        }
    }

    /// The value of [`FROM_HEADER`] for what this node sends.
    pub fn header(&self) -> String {
        format!("{}/{:016x}", self.me, self.mine)
    }

    /// Checks a peer's [`FROM_HEADER`]: the first incarnation seen of a
    /// node is recorded, another one later is refused. This node's own id
    /// is left to the identity probe (rpc.rs), which tells the duplicate.
    pub fn check(&self, header: Option<&str>) -> Result<(), Mismatch> {
        let (node, presented) = header.and_then(parse).ok_or(Mismatch::Missing)?;
        if node == self.me {
            return Ok(());
        }
        if let Some(known) = self.read().get(&node).copied() {
            return match known == presented {
                true => Ok(()),
                false => Err(Mismatch::Replaced {
                    node,
                    known,
                    presented,
                }),
            };
        }
        let mut w = self.known.write().unwrap_or_else(|p| p.into_inner());
        let known = *w.entry(node).or_insert(presented);
        drop(w);
        if known != presented {
            return Err(Mismatch::Replaced {
                node,
                known,
                presented,
            });
        }
        if let Some(db) = &self.db {
            let key = format!("{KEY_PREFIX}{node}");
            if let Err(e) = store::set_meta(db, &key, &format!("{presented:016x}")) {
                tracing::warn!(node, cause = %e, "could not record a peer's incarnation");
            } else {
                tracing::info!(node, incarnation = %format!("{presented:016x}"), "recorded a peer's incarnation");
            }
        }
        Ok(())
    }

    /// Forgets every node not in `members`: a removed node may come back
    /// with a new data dir and be added again.
    pub fn keep_only(&self, members: &BTreeSet<NodeId>) {
        let gone: Vec<NodeId> = self
            .read()
            .keys()
            .filter(|id| !members.contains(id))
            .copied()
            .collect();
        if gone.is_empty() {
            return;
        }
        let mut w = self.known.write().unwrap_or_else(|p| p.into_inner());
        for id in gone {
            w.remove(&id);
            if let Some(db) = &self.db {
                let _ = store::del_meta(db, &format!("{KEY_PREFIX}{id}"));
            }
            tracing::info!(
                node = id,
                "forgot the incarnation of a node that left the cluster"
            );
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<NodeId, u64>> {
        self.known.read().unwrap_or_else(|p| p.into_inner())
    }
}

fn parse(header: &str) -> Option<(NodeId, u64)> {
    let (node, inc) = header.trim().split_once('/')?;
    Some((node.parse().ok()?, u64::from_str_radix(inc, 16).ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_node_is_refused_until_it_leaves_the_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::open(dir.path()).unwrap();
        let me = Incarnations::load(db.clone(), 1, 0xaa).unwrap();
        assert_eq!(me.header(), "1/00000000000000aa");
        assert_eq!(me.check(None), Err(Mismatch::Missing));
        assert_eq!(me.check(Some("garbage")), Err(Mismatch::Missing));
        // First sight is recorded; the same one passes again.
        me.check(Some("3/0000000000000007")).unwrap();
        me.check(Some("3/0000000000000007")).unwrap();
        // A wiped node 3 comes back with another incarnation.
        let e = me.check(Some("3/0000000000000008")).unwrap_err();
        assert!(e.to_string().contains("lost its data dir"), "{e}");
        // The record survives a restart of this node.
        drop(me);
        let me = Incarnations::load(db.clone(), 1, 0xaa).unwrap();
        assert!(me.check(Some("3/0000000000000008")).is_err());
        // Removed from the membership, it may come back as new.
        me.keep_only(&BTreeSet::from([1, 2]));
        me.check(Some("3/0000000000000008")).unwrap();
        // Its own id is the identity probe's business.
        me.check(Some("1/0000000000000001")).unwrap();
    }
}
