//! The leader's lease heartbeat, apart from replication.
//!
//! openraft 0.9 sends a heartbeat to a follower only when nothing else is
//! on its way there: under a write load the only acks are the answers to
//! log batches, and one batch slowed by a busy disk or CPU lets the quorum
//! lease run out although every follower still follows (the VIP flaps).
//! So the leader also sends, every heartbeat interval, a small `/raft/lease`
//! call on its own connection: "do you follow my vote?". A follower that
//! does says yes and counts it as hearing from the leader (it then refuses
//! votes, elect.rs); the yes counts as an ack from the moment the call was
//! sent (acks.rs). At most one call per follower is in flight.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::{ServerState, Vote};
use serde::{Deserialize, Serialize};

use super::acks::Acks;
use super::network::{Lane, PeerClient};
use super::{NodeId, Raft};

/// "Do you follow `vote`?"
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeasePing {
    pub vote: Vote<NodeId>,
}

/// A follower's answer to a lease ping.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LeaseAnswer {
    /// It follows the vote named in the ping.
    pub follows: bool,
    /// How long it refuses votes after hearing from its leader (its
    /// election_timeout_max), in milliseconds; see `Acks::window`.
    pub window_ms: u64,
}

/// The follower's answer: whether the given vote is the one it follows.
pub fn follows(mine: &Vote<NodeId>, state: ServerState, ping: &LeasePing) -> bool {
    mine.is_committed() && *mine == ping.vote && state != ServerState::Leader
}

/// Sends lease pings while this node leads, until Raft stops.
///
/// The pings run on a thread and runtime of their own, with connections of
/// their own: a ping sent late shortens the lease by as much (it counts from
/// its send time), so a runtime busy with client requests, storage or a
/// snapshot must not hold it back. Falls back to the main runtime if the
/// thread cannot be started.
pub fn spawn(p: Pinger) {
    let p = Pinger {
        peers: p.peers.with_own_urgent_pool(),
        ..p
    };
    let own = p.clone();
    let started = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .and_then(|rt| {
            std::thread::Builder::new()
                .name("clb-lease".into())
                .spawn(move || rt.block_on(own.run()))
        });
    if let Err(e) = started {
        tracing::warn!(cause = %e, "lease heartbeat thread not started; using the main runtime");
        tokio::spawn(p.run());
    }
}

/// What the lease pings need: a ping every `every`, each answer awaited at
/// most `timeout`.
#[derive(Clone)]
pub struct Pinger {
    pub raft: Raft,
    pub id: NodeId,
    pub peers: PeerClient,
    pub acks: Arc<Acks>,
    pub every: Duration,
    pub timeout: Duration,
}

impl Pinger {
    async fn run(self) {
        let Pinger {
            raft,
            id,
            peers,
            acks,
            every,
            timeout,
        } = self;
        let mut metrics = raft.metrics();
        let mut in_flight: HashMap<NodeId, Arc<AtomicBool>> = HashMap::new();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let m = metrics.borrow_and_update().clone();
            if m.running_state.is_err() {
                return;
            }
            if m.state != ServerState::Leader {
                if metrics.changed().await.is_err() {
                    return;
                }
                continue;
            }
            tick.tick().await;
            let membership = m.membership_config.membership();
            for voter in membership.voter_ids().filter(|v| *v != id) {
                let Some(addr) = membership.get_node(&voter).map(|n| n.addr.clone()) else {
                    continue;
                };
                let busy = in_flight.entry(voter).or_default().clone();
                if busy.swap(true, Ordering::AcqRel) {
                    continue;
                }
                let ping = LeasePing { vote: m.vote };
                let (peers, acks) = (peers.clone(), acks.clone());
                let term = m.current_term;
                tokio::spawn(async move {
                    let sent = Instant::now();
                    let answer: Result<LeaseAnswer, _> = peers
                        .call_on(Lane::Urgent, &addr, "/raft/lease", &ping, timeout)
                        .await;
                    if let Ok(a) = &answer {
                        let window = Duration::from_millis(a.window_ms);
                        if acks.window(voter, window) {
                            tracing::error!(
                                peer = voter,
                                peer_window_ms = a.window_ms,
                                "this voter's election timeout is shorter than ours: its acks do not count for the VIP lease (give every node the same --timers)"
                            );
                        }
                        if a.follows {
                            acks.acked(voter, term, sent);
                        }
                    }
                    busy.store(false, Ordering::Release);
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_follower_of_that_very_vote_says_yes() {
        let leader = Vote::new_committed(5, 1);
        let ping = LeasePing { vote: leader };
        assert!(follows(&leader, ServerState::Follower, &ping));
        // A newer term, an uncommitted vote (an election under way), or a
        // node that leads itself: no.
        assert!(!follows(
            &Vote::new_committed(6, 2),
            ServerState::Follower,
            &ping
        ));
        assert!(!follows(&Vote::new(5, 1), ServerState::Candidate, &ping));
        assert!(!follows(&leader, ServerState::Leader, &ping));
    }
}
