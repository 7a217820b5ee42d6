//! Multi-process tests: real `clbd` binaries on loopback.

mod harness;
mod linearizability;
mod test_chaos;
mod test_disk;
mod test_failover;
mod test_formation;
mod test_handoff;
mod test_lifecycle;
mod test_membership;
mod test_partition;
mod test_restore;
mod test_stability;
mod test_upgrade;
mod test_wiped;
