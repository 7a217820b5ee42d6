//! Whether this balancer is fit to carry traffic: the pure part of the
//! announcer, so every rule has a unit test.
//!
//! A balancer announces only while its haproxy answers, its health gate
//! passes (`--health-cmd`, haproxy running a configuration), it hears from
//! a Raft leader, and it keeps up: every index the leader said was
//! committed is applied here within `max_lag`, and every registry this node
//! applied is live in haproxy within `max_lag` once its render failed, or
//! within `STUCK` × `max_lag` while it is only slow. A follower cannot know
//! whether entries it has not received change the configuration, so it
//! holds itself to all of them. docs/bgp.md has the bounds this gives.
//!
//! Silence is different: when the leader dies every follower stops hearing
//! it, and nothing can be committed until the next leader is elected, so
//! withdrawing then would take the VIP off every balancer for an election.
//! A balancer withdraws after `silence` without a leader (`max_lag` plus
//! four maximum election timeouts).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// How many `max_lag`s a render without an error may take before the
/// balancer counts as stuck.
pub const STUCK: u32 = 5;

/// Samples kept per queue; past that the newest is raised instead of
/// pushed, which only makes the rule stricter.
const MAX_SAMPLES: usize = 4096;

/// What the announcer sees at one tick.
#[derive(Debug, Clone)]
pub struct Inputs {
    pub now: Instant,
    /// clbd is stopping: withdraw for good.
    pub stopping: bool,
    /// An operator drained this balancer (`clb drain-node`).
    pub drained: bool,
    /// haproxy's admin socket answered; else why not.
    pub haproxy: Result<(), String>,
    /// The health gate; `Err(reason)` when it fails.
    pub health: Result<(), String>,
    /// This node leads, with a quorum ack this recent.
    pub leading: Option<Duration>,
    /// The last time a leader's AppendEntries or heartbeat was accepted.
    pub heard: Option<Instant>,
    /// Raft's applied log index here.
    pub raft_applied: u64,
    /// The registry index haproxy runs (the renderer's `applied_index`).
    pub live_index: u64,
    /// The renderer's last error, shown when the registry is not live.
    pub render_error: Option<String>,
}

/// Index samples with the instant each was first seen.
#[derive(Debug, Default)]
struct Queue(VecDeque<(Instant, u64)>);

impl Queue {
    fn see(&mut self, at: Instant, index: u64) {
        let full = self.0.len() >= MAX_SAMPLES;
        match self.0.back_mut() {
            Some((_, last)) if *last >= index => {}
            Some((_, last)) if full => *last = index,
            _ => self.0.push_back((at, index)),
        }
    }

    /// Drops the samples `reached` covers; true if any was dropped.
    fn settle(&mut self, reached: u64) -> bool {
        let mut any = false;
        while self.0.front().is_some_and(|(_, i)| *i <= reached) {
            self.0.pop_front();
            any = true;
        }
        any
    }

    /// The oldest index not yet reached, if it is older than `max`.
    fn overdue(&self, now: Instant, max: Duration) -> Option<(u64, Duration)> {
        let (at, index) = *self.0.front()?;
        let age = now.saturating_duration_since(at);
        (age > max).then_some((index, age))
    }
}

/// The lag bookkeeping between ticks.
#[derive(Debug)]
pub struct Fitness {
    max_lag: Duration,
    /// How long no leader may be heard: `max_lag` plus four maximum
    /// election timeouts, so the election after a leader's death (during which
    /// nothing can be committed) withdraws nobody.
    silence: Duration,
    /// Leader commit indexes not yet applied here.
    commits: Queue,
    /// Registry indexes applied here, not yet live in haproxy.
    registry: Queue,
    /// Applied a commit the leader announced since start: before that a
    /// restarted follower may be far behind without knowing it.
    synced: bool,
}

impl Fitness {
    pub fn new(max_lag: Duration, silence: Duration) -> Fitness {
        Fitness {
            max_lag,
            silence: silence.max(max_lag),
            commits: Queue::default(),
            registry: Queue::default(),
            synced: false,
        }
    }

    /// A leader's commit index, as an AppendEntries carried it.
    pub fn leader_committed(&mut self, at: Instant, index: u64) {
        self.commits.see(at, index);
    }

    /// The registry index applied by Raft here (`consensus.applied().index`).
    pub fn registry_applied(&mut self, at: Instant, index: u64) {
        self.registry.see(at, index);
    }

    /// `Ok` when fit to announce, else the reason, most basic first.
    pub fn check(&mut self, i: &Inputs) -> Result<(), String> {
        if self.commits.settle(i.raft_applied) {
            self.synced = true;
        }
        self.registry.settle(i.live_index);
        if i.leading.is_some() {
            self.synced = true;
        }
        if i.stopping {
            return Err("stopping".into());
        }
        if i.drained {
            return Err("drained by an operator (clb ready-node to undo)".into());
        }
        i.haproxy.clone().map_err(|e| format!("haproxy: {e}"))?;
        i.health.clone().map_err(|e| format!("unhealthy: {e}"))?;
        let ms = |d: Duration| d.as_millis();
        match (i.leading, i.heard) {
            (Some(ack), _) if ack <= self.silence => {}
            (Some(ack), _) => {
                return Err(format!(
                    "leads without a quorum: last ack {} ms ago",
                    ms(ack)
                ))
            }
            (None, Some(h)) if i.now.saturating_duration_since(h) <= self.silence => {}
            (None, Some(h)) => {
                return Err(format!(
                    "no Raft leader heard for {} ms",
                    ms(i.now.saturating_duration_since(h))
                ))
            }
            (None, None) => return Err("no Raft leader heard yet".into()),
        }
        if !self.synced {
            return Err(format!(
                "catching up: applied {} of the leader's commit {}",
                i.raft_applied,
                self.commits.0.front().map(|s| s.1).unwrap_or(0)
            ));
        }
        if let Some((index, age)) = self.commits.overdue(i.now, self.max_lag) {
            return Err(format!(
                "behind the leader: its commit {index} ({} ms ago) is not applied here (at {})",
                ms(age),
                i.raft_applied
            ));
        }
        // A render that failed (haproxy rejected the config, the apply
        // failed) withdraws after `max_lag`. One that is only slow does not
        // until `STUCK` times that: every balancer renders the same change
        // at once, and a reload slower than the bound (a big config, a busy
        // host) must not take the VIP off all of them together.
        let bound = match i.render_error {
            Some(_) => self.max_lag,
            None => self.max_lag * STUCK,
        };
        if let Some((index, age)) = self.registry.overdue(i.now, bound) {
            let why = i
                .render_error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_else(|| ": the render has not finished".into());
            return Err(format!(
                "configuration behind: registry {index} ({} ms ago) is not live in haproxy (runs {}){why}",
                ms(age),
                i.live_index
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAG: Duration = Duration::from_millis(1000);
    const SILENCE: Duration = Duration::from_millis(2500);

    fn fine(now: Instant) -> Inputs {
        Inputs {
            now,
            stopping: false,
            drained: false,
            haproxy: Ok(()),
            health: Ok(()),
            leading: None,
            heard: Some(now),
            raft_applied: 10,
            live_index: 10,
            render_error: None,
        }
    }

    fn synced(now: Instant) -> Fitness {
        let mut f = Fitness::new(LAG, SILENCE);
        f.leader_committed(now, 10);
        assert_eq!(f.check(&fine(now)), Ok(()));
        f
    }

    #[test]
    fn a_follower_is_fit_only_after_applying_a_commit_it_was_told_of() {
        let now = Instant::now();
        let mut f = Fitness::new(LAG, SILENCE);
        // Heard a leader, but no commit yet: it may be far behind.
        assert!(f.check(&fine(now)).unwrap_err().starts_with("catching up"));
        f.leader_committed(now, 50);
        let mut i = fine(now);
        assert!(f.check(&i).unwrap_err().starts_with("catching up"));
        i.raft_applied = 50;
        i.live_index = 50;
        assert_eq!(f.check(&i), Ok(()));
    }

    #[test]
    fn a_leader_with_a_fresh_quorum_ack_is_synced() {
        let now = Instant::now();
        let mut f = Fitness::new(LAG, SILENCE);
        let mut i = fine(now);
        i.heard = None;
        i.leading = Some(Duration::from_millis(20));
        assert_eq!(f.check(&i), Ok(()));
        i.leading = Some(Duration::from_millis(2400));
        assert_eq!(f.check(&i), Ok(()));
        i.leading = Some(Duration::from_millis(2600));
        assert!(f.check(&i).unwrap_err().contains("without a quorum"));
    }

    #[test]
    fn an_election_keeps_balancers_in_and_longer_silence_withdraws() {
        let t0 = Instant::now();
        let mut f = synced(t0);
        // The leader died at t0: past the lag, but an election may take
        // that long, and nothing is committed meanwhile.
        let mut i = fine(t0 + Duration::from_millis(2400));
        i.heard = Some(t0);
        assert_eq!(f.check(&i), Ok(()));
        i.now = t0 + Duration::from_millis(2501);
        assert!(f.check(&i).unwrap_err().contains("no Raft leader heard"));
        i.heard = None;
        assert!(f.check(&i).unwrap_err().contains("heard yet"));
    }

    #[test]
    fn a_commit_not_applied_within_the_lag_withdraws_and_a_steady_trail_does_not() {
        let t0 = Instant::now();
        let mut f = synced(t0);
        // Under load the follower always trails by a few entries, each
        // applied within milliseconds: fit throughout.
        for k in 1..100u64 {
            let at = t0 + Duration::from_millis(20 * k);
            f.leader_committed(at, 10 + 2 * k);
            let mut i = fine(at);
            i.heard = Some(at);
            i.raft_applied = 10 + 2 * k - 2;
            i.live_index = i.raft_applied;
            assert_eq!(f.check(&i), Ok(()), "k={k}");
        }
        // Stuck at 206 while the leader is at 208 and beyond.
        let stuck = t0 + Duration::from_millis(2000);
        f.leader_committed(stuck, 300);
        let mut i = fine(stuck + LAG + Duration::from_millis(1));
        i.raft_applied = 206;
        i.live_index = 206;
        let e = f.check(&i).unwrap_err();
        assert!(e.starts_with("behind the leader: its commit 208"), "{e}");
        i.raft_applied = 300;
        i.live_index = 300;
        assert_eq!(f.check(&i), Ok(()));
    }

    #[test]
    fn a_registry_haproxy_never_took_withdraws_with_the_render_error() {
        let t0 = Instant::now();
        let mut f = synced(t0);
        f.registry_applied(t0, 11);
        let mut i = fine(t0 + Duration::from_millis(500));
        i.raft_applied = 11;
        assert_eq!(f.check(&i), Ok(()), "within the lag");
        i.now = t0 + Duration::from_millis(1200);
        i.heard = Some(i.now);
        i.render_error = Some("haproxy rejected the rendered config: bad".into());
        let e = f.check(&i).unwrap_err();
        assert!(e.starts_with("configuration behind: registry 11"), "{e}");
        assert!(e.ends_with("rejected the rendered config: bad"), "{e}");
        // A later registry that goes live covers the rejected one.
        f.registry_applied(i.now, 12);
        i.live_index = 12;
        assert_eq!(f.check(&i), Ok(()));
    }

    #[test]
    fn a_slow_render_withdraws_only_once_it_looks_stuck() {
        let t0 = Instant::now();
        let mut f = synced(t0);
        f.registry_applied(t0, 11);
        let mut i = fine(t0 + LAG * 3);
        i.heard = Some(i.now);
        i.raft_applied = 11;
        // Every balancer reloads the same change: slow is not unfit.
        assert_eq!(f.check(&i), Ok(()));
        i.now = t0 + LAG * STUCK + Duration::from_millis(1);
        i.heard = Some(i.now);
        let e = f.check(&i).unwrap_err();
        assert!(e.ends_with("the render has not finished"), "{e}");
    }

    #[test]
    fn the_basic_reasons_come_first() {
        let now = Instant::now();
        let mut f = synced(now);
        let mut i = fine(now);
        i.health = Err("check failed".into());
        assert_eq!(f.check(&i), Err("unhealthy: check failed".into()));
        i.haproxy = Err("connect: refused".into());
        assert_eq!(f.check(&i), Err("haproxy: connect: refused".into()));
        i.drained = true;
        assert!(f.check(&i).unwrap_err().starts_with("drained"));
        i.stopping = true;
        assert_eq!(f.check(&i), Err("stopping".into()));
    }

    #[test]
    fn samples_stay_bounded() {
        let t0 = Instant::now();
        let mut q = Queue::default();
        for k in 0..(3 * MAX_SAMPLES as u64) {
            q.see(t0 + Duration::from_micros(k), k + 1);
        }
        assert_eq!(q.0.len(), MAX_SAMPLES);
        assert_eq!(q.0.back().unwrap().1, 3 * MAX_SAMPLES as u64);
        assert!(q.settle(3 * MAX_SAMPLES as u64));
        assert!(q.0.is_empty());
    }
}
