//! Elections that only happen when the leader is really gone: clb's own
//! election timer with a pre-vote round, and the rules by which a node
//! refuses votes (openraft 0.9 has neither pre-vote nor a leader that
//! refuses votes while it leads).
//!
//! openraft's own election timer is off (`enable_elect = false`). When this
//! node has heard from no leader for `election_timeout_max` plus a random
//! part of `max - min`, it first asks every voter whether it *would* vote,
//! without bumping any term: a voter agrees only when it has not heard from
//! a leader for `election_timeout_max` either, does not lead with a quorum,
//! does not hold the VIP, and the candidate's log is at least as up to date
//! as its own. Only with a quorum of such answers does it call
//! `trigger().elect()`. A follower that was merely paused, or cut off from
//! the leader alone, therefore never deposes a healthy leader.
//!
//! The window is `election_timeout_max`, not `min`, because openraft's
//! voters refuse real votes for `max` after their last heartbeat anyway: a
//! pre-vote that passes predicts a real vote that passes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use openraft::ServerState;
use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::network::{Lane, PeerClient};
use super::{LogId, NodeId, Raft};

/// "Would you vote for me?", sent before a real election.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreVoteRequest {
    pub candidate: NodeId,
    /// The term the candidate would campaign for (its current term + 1).
    pub term: u64,
    pub last_log_id: Option<LogId>,
}

/// The answer; `refused` says why, for the candidate's log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PreVoteReply {
    pub granted: bool,
    pub refused: Option<String>,
}

/// What a voter knows when it is asked for a (pre-)vote.
#[derive(Debug, Clone)]
pub struct VoterView {
    pub now: Instant,
    /// When this node last heard from a leader (or started, if later).
    pub last_heard: Instant,
    /// openraft's refusal window, `election_timeout_max`.
    pub window: Duration,
    pub term: u64,
    pub last_log_id: Option<LogId>,
    /// This node leads and a quorum followed it within `window`.
    pub leading_with_quorum: bool,
    /// This node may hold the VIP (a claim started and no release finished).
    pub holding_vip: bool,
    /// This node is handing leadership to the asking candidate.
    pub transfer_to_candidate: bool,
}

/// Whether a voter grants a pre-vote; `Err(reason)` when not.
pub fn prevote_decision(v: &VoterView, req: &PreVoteRequest) -> Result<(), &'static str> {
    if req.term <= v.term {
        return Err("the candidate's term is not newer than mine");
    }
    if let Some(why) = sticky(v) {
        return Err(why);
    }
    if req.last_log_id < v.last_log_id {
        return Err("the candidate's log is behind mine");
    }
    Ok(())
}

/// How long a voter may hold a pre-vote answer whose only obstacle is its
/// own window closing soon: the jitter of the election timer (`max - min`),
/// and under half the candidate's wait for the answer (`min`).
pub fn prevote_patience(min: Duration, max: Duration) -> Duration {
    max.saturating_sub(min).min(min / 2)
}

/// When a pre-vote is refused only because this voter heard from the
/// leader a little more recently than the candidate, and its window closes
/// within `patience`: how long to wait before deciding again. Candidates
/// and voters hear the leader's last heartbeat at slightly different
/// moments; without the wait the candidate loses the round, waits for the
/// dead leader's answer to time out and backs off (measured: a 47 ms
/// election instead of 22 at the extreme timers). A live leader's next
/// heartbeat arrives within the wait and the answer stays no.
pub fn prevote_wait(v: &VoterView, req: &PreVoteRequest, patience: Duration) -> Option<Duration> {
    if prevote_decision(v, req).is_ok() {
        return None;
    }
    let closes = v.last_heard + v.window;
    let later = VoterView {
        now: closes.max(v.now),
        ..v.clone()
    };
    let wait = closes.saturating_duration_since(v.now);
    (prevote_decision(&later, req).is_ok() && wait <= patience).then_some(wait)
}

/// Why a node refuses any vote while the leader it knows is alive, or
/// while it may itself hold the VIP; `None` when nothing holds it back. A
/// hand-over to the asking candidate lifts the refusal.
pub fn sticky(v: &VoterView) -> Option<&'static str> {
    if v.transfer_to_candidate {
        return None;
    }
    if v.holding_vip {
        return Some("I may still hold the VIP");
    }
    if v.leading_with_quorum {
        return Some("I lead and a quorum follows me");
    }
    if v.now < v.last_heard + v.window {
        return Some("I heard from the leader too recently");
    }
    None
}

/// Shared between the peer RPC handlers, the election timer and failover.
#[derive(Debug)]
pub struct Liveness {
    started: Instant,
    inner: Mutex<Inner>,
    /// A VIP claim started here and no release has finished since.
    holding: AtomicBool,
    /// Held by the vote handler from its checks until openraft answered
    /// (and [`Liveness::granted_vote`]), and by the election timer from its
    /// last check until `elect()` is queued: a vote granted in between
    /// would otherwise be followed by this node's own campaign for the next
    /// term, deposing the candidate it just elected. openraft takes both
    /// through one queue, in order.
    pub vote_gate: tokio::sync::Mutex<()>,
    /// The highest commit index a leader's AppendEntries carried here (bgp
    /// mode's lag check: a follower knows no other measure of the leader).
    leader_commit: AtomicU64,
    /// Pre-votes this node refused / granted as a voter.
    pub prevotes_refused: Counter,
    pub prevotes_granted: Counter,
    /// Real votes this node refused while its leader (or itself) was alive.
    pub votes_refused: Counter,
    /// Pre-vote rounds this node lost as a candidate, and elections it started.
    pub prevote_rounds_lost: Counter,
    pub elections: Counter,
}

#[derive(Debug)]
struct Inner {
    last_heard: Instant,
    /// When this node last granted a real vote.
    last_granted: Option<Instant>,
    /// While leading: the candidate this node hands leadership to, until when.
    transfer: Option<(NodeId, Instant)>,
    /// When this node was first seen leading its current term.
    leading_since: Option<(u64, Instant)>,
}

impl Liveness {
    /// `remembers` is false for a node that never voted (a new cluster):
    /// it has no leader to be loyal to.
    pub fn new(remembers: bool) -> Self {
        let now = Instant::now();
        // A node that restarted has forgotten when it last heard from the
        // leader (and may have acked it just before it crashed): count its
        // start as hearing from one. A node that never voted has nothing to
        // forget, and a new cluster elects at once.
        let last_heard = match remembers {
            true => now,
            false => now.checked_sub(Duration::from_secs(3600)).unwrap_or(now),
        };
        Liveness {
            started: now,
            inner: Mutex::new(Inner {
                last_heard,
                last_granted: None,
                transfer: None,
                leading_since: None,
            }),
            holding: AtomicBool::new(false),
            vote_gate: tokio::sync::Mutex::new(()),
            leader_commit: AtomicU64::new(0),
            prevotes_refused: Counter::default(),
            prevotes_granted: Counter::default(),
            votes_refused: Counter::default(),
            prevote_rounds_lost: Counter::default(),
            elections: Counter::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A leader's AppendEntries (or snapshot) was accepted here.
    pub fn heard(&self) {
        let now = Instant::now();
        let mut g = self.lock();
        if now > g.last_heard {
            g.last_heard = now;
        }
    }

    /// An accepted AppendEntries said the leader committed up to `index`.
    pub fn leader_committed(&self, index: u64) {
        self.leader_commit.fetch_max(index, Ordering::SeqCst);
    }

    pub fn leader_commit(&self) -> u64 {
        self.leader_commit.load(Ordering::SeqCst)
    }

    pub fn last_heard(&self) -> Instant {
        self.lock().last_heard
    }

    /// This node granted a candidate its vote. As in Raft (§5.2: a follower
    /// times out without hearing from the leader *or granting a vote*), that
    /// restarts the election timer: the candidate gets a whole timeout to
    /// win and be heard before this node campaigns itself.
    pub fn granted_vote(&self) {
        let now = Instant::now();
        let mut g = self.lock();
        g.last_granted = Some(g.last_granted.map_or(now, |t| t.max(now)));
    }

    /// The later of hearing from a leader and granting a vote: what the
    /// election timer and the voting rules count from.
    pub fn last_contact(&self) -> Instant {
        let g = self.lock();
        g.last_granted.map_or(g.last_heard, |t| t.max(g.last_heard))
    }

    pub fn started(&self) -> Instant {
        self.started
    }

    /// Set by the VIP hook runner: true when a claim starts, false once a
    /// release succeeded.
    pub fn set_holding(&self, holding: bool) {
        self.holding.store(holding, Ordering::SeqCst);
    }

    pub fn holding(&self) -> bool {
        self.holding.load(Ordering::SeqCst)
    }

    /// Records that this node leads `term` (the first time it is seen).
    pub fn leading(&self, term: u64, now: Instant) {
        let mut g = self.lock();
        if g.leading_since.is_none_or(|(t, _)| t != term) {
            g.leading_since = Some((term, now));
        }
    }

    /// Since when this node leads `term`, as far as it has seen.
    pub fn leading_since(&self, term: u64) -> Option<Instant> {
        self.lock()
            .leading_since
            .filter(|(t, _)| *t == term)
            .map(|(_, at)| at)
    }

    /// While leading: let `to` win votes from this node until `until`.
    pub fn set_transfer(&self, to: Option<(NodeId, Instant)>) {
        self.lock().transfer = to;
    }

    /// Whether this node is handing leadership to `candidate` right now.
    pub fn transferring_to(&self, candidate: NodeId, now: Instant) -> bool {
        self.lock()
            .transfer
            .is_some_and(|(to, until)| to == candidate && now < until)
    }
}

impl Default for Liveness {
    fn default() -> Self {
        Self::new(true)
    }
}

/// What the election timer needs; see [`spawn`].
pub struct Elector {
    pub raft: Raft,
    pub id: NodeId,
    pub peers: PeerClient,
    pub liveness: std::sync::Arc<Liveness>,
    pub min: Duration,
    pub max: Duration,
    /// False on a witness and while failover says this node may not lead.
    pub allowed: watch::Receiver<bool>,
    /// This node's last log id, as stored.
    pub last_log_id: Box<dyn Fn() -> Option<LogId> + Send + Sync>,
}

/// Runs the election timer until Raft stops.
pub fn spawn(e: Elector) {
    tokio::spawn(e.run());
}

impl Elector {
    #[tracing::instrument(name = "elect", skip_all, fields(node = self.id))]
    async fn run(mut self) {
        let mut metrics = self.raft.metrics();
        // A lost pre-vote round is tried again soon, then less and less
        // often: a voter that refused only because its own window had a few
        // milliseconds left (it heard the dead leader's last heartbeat a
        // little later) says yes moments later, while a node cut off from a
        // live leader asks at most once per timeout.
        let mut not_before = Instant::now();
        let mut losing_streak = 0u32;
        let mut lost_at: Option<Instant> = None;
        let first_retry = (self.max.saturating_sub(self.min) / 2).max(Duration::from_millis(1));
        // The timeout drawn for the latest leader contact. Drawn once per
        // contact, not per wake: redrawn at every metrics change, the first
        // draw to fall due wins, so every follower fired near the low end of
        // the range, together, and split the vote (seen: two candidates 13 ms
        // apart after a leader's death, the election 1.2 s late).
        let mut drawn: Option<(Instant, Duration)> = None;
        loop {
            let m = metrics.borrow_and_update().clone();
            if m.running_state.is_err() {
                return;
            }
            let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
            let now = Instant::now();
            let heard = self.liveness.last_contact();
            let timeout = match drawn {
                Some((for_contact, t)) if for_contact == heard => t,
                _ => {
                    let jitter = self.max.saturating_sub(self.min).as_millis() as u64;
                    let t = self.max + Duration::from_millis(rand::random::<u64>() % (jitter + 1));
                    drawn = Some((heard, t));
                    t
                }
            };
            // A leader was heard since the last lost round: start afresh.
            if lost_at.is_some_and(|at| heard > at) {
                losing_streak = 0;
                lost_at = None;
                not_before = now;
            }
            let due = (heard + timeout).max(not_before);
            let eligible = *self.allowed.borrow()
                && voters.contains(&self.id)
                && m.state != ServerState::Leader;
            if !eligible || now < due {
                let wake = if eligible { due } else { now + self.min };
                tokio::select! {
                    _ = tokio::time::sleep_until(wake.into()) => {}
                    r = metrics.changed() => if r.is_err() { return },
                    r = self.allowed.changed() => if r.is_err() { return },
                }
                continue;
            }
            let mut gate = None;
            if voters.len() > 1 {
                let (granted, refusals) = self.prevote(&m, &voters).await;
                if granted < voters.len() / 2 + 1 {
                    self.liveness.prevote_rounds_lost.inc();
                    losing_streak += 1;
                    lost_at = Some(Instant::now());
                    if losing_streak == 1 {
                        tracing::info!(
                            granted,
                            voters = voters.len(),
                            refusals = %refusals.join("; "),
                            "no leader heard from, but the other voters still follow one: not campaigning"
                        );
                    }
                    let backoff = first_retry
                        .saturating_mul(1 << losing_streak.min(16))
                        .min(timeout);
                    let jitter = Duration::from_micros(
                        rand::random::<u64>() % (backoff.as_micros() as u64 + 1),
                    );
                    not_before = Instant::now() + backoff / 2 + jitter / 2;
                    continue;
                }
                // The round took time: this node may have voted for another
                // candidate meanwhile (which then won) or heard a leader.
                // Campaigning anyway would bump the term past that leader's
                // and depose it a moment after it claimed the VIP: the
                // second VIP move for one failure tests/cluster saw.
                gate = Some(self.liveness.vote_gate.lock().await);
                let after = metrics.borrow().clone();
                if let Err(why) = still_campaign(
                    (&m.vote, heard),
                    (&after.vote, self.liveness.last_contact()),
                    after.state,
                ) {
                    tracing::info!(granted, why, "pre-vote passed, but not campaigning");
                    continue;
                }
                tracing::info!(
                    granted,
                    voters = voters.len(),
                    term = m.current_term + 1,
                    "no leader heard from for {} ms and a quorum agrees: starting an election",
                    now.saturating_duration_since(heard).as_millis()
                );
            }
            losing_streak = 0;
            lost_at = None;
            self.liveness.elections.inc();
            // Queued while the gate is held: a vote request answered after
            // it meets the new term.
            let elected = self.raft.trigger().elect().await;
            drop(gate);
            if elected.is_err() {
                return;
            }
            // Give the election a timeout to conclude before the next try,
            // and spread retries over a whole timeout more: two candidates
            // that split the vote rarely collide again.
            let spread =
                Duration::from_millis(rand::random::<u64>() % (self.max.as_millis() as u64 + 1));
            not_before = Instant::now() + timeout + spread;
        }
    }

    /// Asks every other voter; returns the grants (counting this node's
    /// own) and the refusals' reasons. It returns as soon as the outcome is
    /// known: waiting for every answer would make each failover wait the
    /// whole pre-vote timeout for the voter that just died (measured: 110 ms
    /// of a 295 ms failover at the then default timers, today's relaxed).
    async fn prevote(
        &self,
        m: &openraft::RaftMetrics<NodeId, openraft::BasicNode>,
        voters: &[NodeId],
    ) -> (usize, Vec<String>) {
        use futures::StreamExt;
        let req = PreVoteRequest {
            candidate: self.id,
            term: m.current_term + 1,
            last_log_id: (self.last_log_id)(),
        };
        let membership = m.membership_config.membership();
        let mut asks: futures::stream::FuturesUnordered<_> = voters
            .iter()
            .filter(|v| **v != self.id)
            .map(|v| {
                let addr = membership.get_node(v).map(|n| n.addr.clone());
                let req = &req;
                async move {
                    let Some(addr) = addr else {
                        return (*v, Err("no address".to_string()));
                    };
                    let answer: Result<PreVoteReply, _> = self
                        .peers
                        .call_on(Lane::Urgent, &addr, "/raft/prevote", req, self.min)
                        .await;
                    (*v, answer.map_err(|e| e.to_string()))
                }
            })
            .collect();
        let mut tally = Tally::new(voters.len());
        while let Some((v, a)) = asks.next().await {
            match a {
                Ok(r) if r.granted => tally.grant(),
                Ok(r) => tally.refuse(format!(
                    "node {v}: {}",
                    r.refused.unwrap_or_else(|| "refused".into())
                )),
                Err(e) => tally.refuse(format!("node {v}: {e}")),
            }
            if tally.decided() {
                break;
            }
        }
        (tally.granted, tally.refusals)
    }
}

/// Whether a pre-vote that passed may still become an election: not when
/// this node's vote moved during the round (it voted for another candidate,
/// or a leader of a newer term reached it), when it heard from a leader or
/// granted a vote, or when it leads. `before` and `after` are (vote, last
/// contact) at the start and end of the round. The moment between this
/// check and `elect()` is closed by [`Liveness::vote_gate`].
pub fn still_campaign(
    before: (&openraft::Vote<NodeId>, Instant),
    after: (&openraft::Vote<NodeId>, Instant),
    state: ServerState,
) -> Result<(), &'static str> {
    if state == ServerState::Leader {
        return Err("this node leads");
    }
    if after.0 != before.0 {
        return Err("this node's vote changed during the pre-vote round");
    }
    if after.1 > before.1 {
        return Err("a leader was heard, or a vote granted, during the pre-vote round");
    }
    Ok(())
}

/// Pre-vote answers so far; this node's own grant counts from the start.
struct Tally {
    voters: usize,
    granted: usize,
    refusals: Vec<String>,
}

impl Tally {
    fn new(voters: usize) -> Self {
        Tally {
            voters,
            granted: 1,
            refusals: Vec::new(),
        }
    }

    fn grant(&mut self) {
        self.granted += 1;
    }

    fn refuse(&mut self, why: String) {
        self.refusals.push(why);
    }

    /// A quorum granted, or too many refused for one to be possible.
    fn decided(&self) -> bool {
        let quorum = self.voters / 2 + 1;
        self.granted >= quorum || self.voters - self.refusals.len() < quorum
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::CommittedLeaderId;

    fn log(term: u64, index: u64) -> Option<LogId> {
        Some(LogId::new(CommittedLeaderId::new(term, 1), index))
    }

    fn view(now: Instant) -> VoterView {
        VoterView {
            now,
            last_heard: now - Duration::from_secs(1),
            window: Duration::from_millis(150),
            term: 3,
            last_log_id: log(3, 10),
            leading_with_quorum: false,
            holding_vip: false,
            transfer_to_candidate: false,
        }
    }

    fn req(term: u64, last: Option<LogId>) -> PreVoteRequest {
        PreVoteRequest {
            candidate: 2,
            term,
            last_log_id: last,
        }
    }

    #[test]
    fn a_passed_prevote_is_dropped_when_the_node_voted_or_heard_meanwhile() {
        let t0 = Instant::now();
        let mine = openraft::Vote::new(30, 2);
        let follows = ServerState::Follower;
        assert_eq!(still_campaign((&mine, t0), (&mine, t0), follows), Ok(()));
        // It granted node 3 a vote in term 31 during the round: campaigning
        // for 32 would depose node 3 the moment it won.
        let voted = openraft::Vote::new(31, 3);
        assert!(still_campaign((&mine, t0), (&voted, t0), follows).is_err());
        let mut committed = voted;
        committed.commit();
        assert!(still_campaign((&mine, t0), (&committed, t0), follows).is_err());
        let later = t0 + Duration::from_millis(5);
        assert!(still_campaign((&mine, t0), (&mine, later), follows).is_err());
        assert!(still_campaign((&mine, t0), (&mine, t0), ServerState::Leader).is_err());
    }

    #[test]
    fn a_voter_grants_a_prevote_only_when_the_leader_is_gone() {
        let now = Instant::now();
        let v = view(now);
        assert_eq!(prevote_decision(&v, &req(4, log(3, 10))), Ok(()));
        // It heard from the leader within the window: a paused follower's
        // campaign goes nowhere.
        let recent = VoterView {
            last_heard: now - Duration::from_millis(100),
            ..v.clone()
        };
        assert!(prevote_decision(&recent, &req(4, log(3, 10))).is_err());
        // The leader itself refuses while a quorum follows it.
        let leader = VoterView {
            leading_with_quorum: true,
            ..v.clone()
        };
        assert!(prevote_decision(&leader, &req(4, log(3, 10))).is_err());
        // A node that may still hold the VIP refuses, unless it is handing
        // leadership to this very candidate.
        let holding = VoterView {
            holding_vip: true,
            ..v.clone()
        };
        assert!(prevote_decision(&holding, &req(4, log(3, 10))).is_err());
        let handing = VoterView {
            transfer_to_candidate: true,
            ..holding
        };
        assert_eq!(prevote_decision(&handing, &req(4, log(3, 10))), Ok(()));
        // A shorter log, or a term not newer than the voter's, is refused.
        assert!(prevote_decision(&v, &req(4, log(3, 9))).is_err());
        assert!(prevote_decision(&v, &req(4, log(2, 20))).is_err());
        assert!(prevote_decision(&v, &req(3, log(3, 10))).is_err());
        assert_eq!(prevote_decision(&v, &req(4, log(4, 1))), Ok(()));
    }

    /// The second VIP move tests/cluster test_handoff saw: a survivor that
    /// granted its vote to the other one (which then won) still had its own
    /// timer running from the dead leader's last heartbeat, passed a pre-vote
    /// and campaigned for the next term.
    #[test]
    fn granting_a_vote_restarts_the_election_timer() {
        let l = Liveness::new(false);
        let heard = l.last_heard();
        assert_eq!(l.last_contact(), heard);
        std::thread::sleep(Duration::from_millis(2));
        l.granted_vote();
        let contact = l.last_contact();
        assert!(contact > heard);
        // Only the election rules count it: failover's "heard a leader" not.
        assert_eq!(l.last_heard(), heard);
        let vote = openraft::Vote::new(5, 2);
        assert_eq!(
            still_campaign((&vote, heard), (&vote, contact), ServerState::Follower),
            Err("a leader was heard, or a vote granted, during the pre-vote round")
        );
    }

    #[test]
    fn hearing_from_a_leader_moves_the_window() {
        let l = Liveness::new(true);
        let start = l.last_heard();
        assert_eq!(start, l.started());
        assert!(Liveness::new(false).last_heard() < start);
        std::thread::sleep(Duration::from_millis(2));
        l.heard();
        assert!(l.last_heard() > start);
        assert!(!l.transferring_to(2, Instant::now()));
        l.set_transfer(Some((2, Instant::now() + Duration::from_secs(1))));
        assert!(l.transferring_to(2, Instant::now()));
        assert!(!l.transferring_to(3, Instant::now()));
    }

    #[test]
    fn a_prevote_round_ends_as_soon_as_its_outcome_is_known() {
        // Three voters: this node and one grant are a quorum; the third
        // (perhaps the dead leader) is not waited for.
        let mut t = Tally::new(3);
        assert!(!t.decided());
        t.grant();
        assert!(t.decided());
        // Two refusals of three: lost without waiting further.
        let mut t = Tally::new(3);
        t.refuse("node 2: no".into());
        assert!(!t.decided());
        t.refuse("node 3: no".into());
        assert!(t.decided() && t.granted < 2);
        // Five voters: one refusal and one grant decide nothing yet.
        let mut t = Tally::new(5);
        t.refuse("node 2: no".into());
        t.grant();
        assert!(!t.decided());
        t.grant();
        assert!(t.decided());
    }

    #[test]
    fn a_voter_whose_window_is_about_to_close_answers_when_it_has() {
        let ms = Duration::from_millis;
        let patience = prevote_patience(ms(15), ms(20));
        assert_eq!(patience, ms(5));
        let mut v = view(Instant::now());
        v.window = ms(20);
        // Heard the leader 17 ms ago, window 20 ms: wait 3 ms, then yes.
        v.last_heard = v.now - ms(17);
        assert_eq!(prevote_wait(&v, &req(4, log(3, 10)), patience), Some(ms(3)));
        // 10 ms left is more than the patience: refuse now.
        v.last_heard = v.now - ms(10);
        assert_eq!(prevote_wait(&v, &req(4, log(3, 10)), patience), None);
        // Already closed: no wait, the answer is yes.
        v.last_heard = v.now - ms(25);
        assert_eq!(prevote_wait(&v, &req(4, log(3, 10)), patience), None);
        // Another reason than the window: no wait either.
        v.last_heard = v.now - ms(17);
        v.holding_vip = true;
        assert_eq!(prevote_wait(&v, &req(4, log(3, 10)), patience), None);
        v.holding_vip = false;
        assert_eq!(prevote_wait(&v, &req(4, log(3, 9)), patience), None);
    }
}
