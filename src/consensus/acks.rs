//! What the leader knows of its followers, measured by clb rather than
//! openraft: the send time of the latest request each follower accepted
//! (the quorum lease is built from these), whether each peer answers, and
//! counters for `/metrics`.
//!
//! openraft 0.9 counts an ack only if it arrives within one heartbeat
//! interval and reports its age floored to whole milliseconds. Here every
//! answer counts, including answers to calls openraft gave up on, and the
//! instant recorded is when the request was *sent*: a follower that
//! accepted a request sent at `s` had not voted for anyone else at `s`, so
//! the lease measured from `s` is never optimistic.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;

use super::NodeId;

#[derive(Debug, Default)]
pub struct Acks {
    inner: Mutex<Inner>,
    /// Appends whose answer arrived after openraft stopped waiting.
    pub late_answers: Counter,
    /// Appends openraft gave up on before they were sent (their entries
    /// went with the next request).
    pub abandoned: Counter,
}

#[derive(Debug, Default)]
struct Inner {
    /// Per follower: the leader term and send instant of its latest ack.
    acked: HashMap<NodeId, (u64, Instant)>,
    /// Per peer: answering or not, and when its latest answer arrived.
    up: HashMap<NodeId, (bool, Option<Instant>)>,
    /// Per follower: the vote-refusal window (its election_timeout_max) it
    /// last reported with a lease ping.
    windows: HashMap<NodeId, Duration>,
    /// This node's own window; a follower's ack counts for the lease only if
    /// its window is at least as long (zero: not checked).
    own_window: Duration,
}

impl Acks {
    /// This node's election_timeout_max: the lease assumes every voter that
    /// acks refuses votes for at least that long.
    pub fn set_own_window(&self, window: Duration) {
        self.lock().own_window = window;
    }

    /// `peer` refuses votes for `window` after hearing from its leader.
    /// Returns true when that is shorter than this node's own window (its
    /// acks then never count for the lease).
    pub fn window(&self, peer: NodeId, window: Duration) -> bool {
        let mut g = self.lock();
        let before = g.windows.insert(peer, window);
        window < g.own_window && before != Some(window)
    }

    /// `target` accepted a request of leader term `term` sent at `sent`.
    pub fn acked(&self, target: NodeId, term: u64, sent: Instant) {
        let mut g = self.lock();
        let e = g.acked.entry(target).or_insert((term, sent));
        if (term, sent) > *e {
            *e = (term, sent);
        }
    }

    /// The instant from which a quorum of `voters` is known to have followed
    /// this node (`me`) as leader of `term`: the quorum-th most recent ack,
    /// counting `me` as acking `now`. `None` without a quorum of acks.
    pub fn quorum_ack(
        &self,
        term: u64,
        voters: &[NodeId],
        me: NodeId,
        now: Instant,
    ) -> Option<Instant> {
        let g = self.lock();
        // A voter whose window is shorter than ours (other timers: an
        // upgrade, a mistake) could vote before our lease ends; one whose
        // window we have not learned yet does not count either.
        let long_enough = |v: &NodeId| {
            g.own_window.is_zero() || g.windows.get(v).is_some_and(|w| *w >= g.own_window)
        };
        let mut times: Vec<Instant> = voters
            .iter()
            .filter_map(|v| {
                if *v == me {
                    return Some(now);
                }
                g.acked
                    .get(v)
                    .filter(|(t, _)| *t == term)
                    .filter(|_| long_enough(v))
                    .map(|(_, at)| *at)
            })
            .collect();
        let quorum = voters.len() / 2 + 1;
        if times.len() < quorum {
            return None;
        }
        times.sort_unstable_by(|a, b| b.cmp(a));
        times.get(quorum - 1).copied()
    }

    /// For a log line when the lease runs out: each follower's latest ack
    /// in `term`, as milliseconds since its request was sent at `now`.
    pub fn ages(&self, term: u64, now: Instant) -> String {
        let g = self.lock();
        let mut v: Vec<String> = g
            .acked
            .iter()
            .map(|(peer, (t, at))| match *t == term {
                true => format!(
                    "{peer}: {} ms",
                    now.saturating_duration_since(*at).as_millis()
                ),
                false => format!("{peer}: none in this term"),
            })
            .collect();
        v.sort_unstable();
        v.join(", ")
    }

    /// Records whether a call to `peer` sent at `sent` was answered (at
    /// `now`); returns the previous state when it changed (`None` on the
    /// first report), so the caller logs transitions only: one line when a
    /// peer goes, one when it is back. A failed call counts only if nothing
    /// at all was answered while it waited: a call queued during a pause that
    /// times out just after the peer resumed, or one slow answer among quick
    /// ones, is not a peer that stopped answering.
    pub fn answered(
        &self,
        peer: NodeId,
        up: bool,
        sent: Instant,
        now: Instant,
    ) -> Option<Option<bool>> {
        let mut g = self.lock();
        let before = g.up.get(&peer).copied();
        let last_answer = before.and_then(|(_, t)| t);
        if !up && last_answer.is_some_and(|t| t >= sent) {
            return None;
        }
        let last_answer = if up { Some(now) } else { last_answer };
        g.up.insert(peer, (up, last_answer));
        let before = before.map(|(u, _)| u);
        (before != Some(up)).then_some(before)
    }

    /// Every peer's last known state, for `clb_peer_up`.
    pub fn peers_up(&self) -> Vec<(NodeId, bool)> {
        let mut v: Vec<(NodeId, bool)> =
            self.lock().up.iter().map(|(k, (u, _))| (*k, *u)).collect();
        v.sort_unstable();
        v
    }

    pub fn count_late(&self) {
        self.late_answers.inc();
    }

    pub fn count_abandoned(&self) {
        self.abandoned.inc();
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_lease_starts_at_the_quorum_th_freshest_send() {
        let a = Acks::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let voters = [1, 2, 3];
        // No ack yet: only the leader itself.
        assert_eq!(a.quorum_ack(5, &voters, 1, t0 + ms(50)), None);
        a.acked(2, 5, t0 + ms(10));
        assert_eq!(a.quorum_ack(5, &voters, 1, t0 + ms(50)), Some(t0 + ms(10)));
        a.acked(3, 5, t0 + ms(30));
        assert_eq!(a.quorum_ack(5, &voters, 1, t0 + ms(50)), Some(t0 + ms(30)));
        // An answer to an older request never moves the lease back.
        a.acked(3, 5, t0 + ms(20));
        assert_eq!(a.quorum_ack(5, &voters, 1, t0 + ms(50)), Some(t0 + ms(30)));
        // Acks of another term do not count.
        assert_eq!(a.quorum_ack(6, &voters, 1, t0 + ms(50)), None);
        // Five voters need two acks besides the leader.
        let five = [1, 2, 3, 4, 5];
        assert_eq!(a.quorum_ack(5, &five, 1, t0 + ms(50)), Some(t0 + ms(10)));
    }

    #[test]
    fn a_follower_with_a_shorter_window_never_counts_for_the_lease() {
        let a = Acks::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        a.set_own_window(ms(150));
        a.acked(2, 5, t0 + ms(10));
        a.acked(3, 5, t0 + ms(20));
        // Windows not learned yet: no lease.
        assert_eq!(a.quorum_ack(5, &[1, 2, 3], 1, t0 + ms(50)), None);
        assert!(!a.window(2, ms(150)));
        assert_eq!(
            a.quorum_ack(5, &[1, 2, 3], 1, t0 + ms(50)),
            Some(t0 + ms(10))
        );
        // Node 3 runs shorter timers: reported once, and its fresher ack
        // still does not count.
        assert!(a.window(3, ms(50)));
        assert!(!a.window(3, ms(50)));
        assert_eq!(
            a.quorum_ack(5, &[1, 2, 3], 1, t0 + ms(50)),
            Some(t0 + ms(10))
        );
    }

    #[test]
    fn peer_state_changes_are_reported_once() {
        let a = Acks::default();
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        // (sent, answered or timed out at): calls take 5 ms, timeouts 300.
        assert_eq!(a.answered(2, true, at(0), at(5)), Some(None));
        assert_eq!(a.answered(2, true, at(10), at(15)), None);
        assert_eq!(a.answered(2, false, at(20), at(320)), Some(Some(true)));
        assert_eq!(a.answered(2, false, at(330), at(630)), None);
        assert_eq!(a.answered(2, true, at(640), at(645)), Some(Some(false)));
        assert_eq!(a.peers_up(), vec![(2, true)]);
    }

    #[test]
    fn a_timeout_while_the_peer_answered_other_calls_changes_nothing() {
        let a = Acks::default();
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        a.answered(3, true, at(0), at(5));
        // Paused from 50 to 700: the call sent at 100 times out; the one
        // sent at 500 is answered when the peer resumes at 700; the call
        // sent at 450, queued during the pause, times out at 750.
        assert_eq!(a.answered(3, false, at(100), at(400)), Some(Some(true)));
        assert_eq!(a.answered(3, true, at(500), at(700)), Some(Some(false)));
        assert_eq!(a.answered(3, false, at(450), at(750)), None);
        // One slow call among quick ones: still answering.
        assert_eq!(a.answered(3, true, at(800), at(805)), None);
        assert_eq!(a.answered(3, false, at(760), at(1060)), None);
        assert_eq!(a.peers_up(), vec![(3, true)]);
        // A call that waited its whole timeout with no answer at all is news.
        assert_eq!(a.answered(3, false, at(900), at(1200)), Some(Some(true)));
    }
}
