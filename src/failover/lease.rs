//! The quorum lease, measured on this node's monotonic clock.
//!
//! openraft reports `millis_since_quorum_ack` relative to the moment it
//! *reported* metrics, and only reports on change. A value read late (the
//! process was stopped, or starved) would look fresher than it is, so the ack
//! instant is anchored to the previous time we looked: a metrics value we had
//! not seen then was reported after it, so `previous_look - millis` is never
//! later than the real ack. After a long stop that anchor is old, and the
//! lease reads as expired — the safe direction.

use std::time::{Duration, Instant};

/// What one metrics value says about leadership.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation {
    /// `Some(term)` when this node is the leader of `term`.
    pub leading: Option<u64>,
    /// openraft's `millis_since_quorum_ack`, meaningful only while leading.
    pub millis_since_quorum_ack: Option<u64>,
}

#[derive(Debug)]
pub struct LeaseClock {
    lease: Duration,
    /// When we last looked at the metrics; `None` before the first look.
    last_look: Option<Instant>,
    /// Term and the earliest instant the quorum ack can have happened.
    ack: Option<(u64, Instant)>,
}

impl LeaseClock {
    pub fn new(lease: Duration) -> Self {
        Self {
            lease,
            last_look: None,
            ack: None,
        }
    }

    /// Records a look at the metrics at `now` (taken *before* reading them).
    /// `seen` is the value when it had changed since the last look, else `None`.
    pub fn look(&mut self, now: Instant, seen: Option<Observation>) {
        let anchor = self.last_look;
        self.last_look = Some(now);
        let Some(obs) = seen else { return };
        let (Some(term), Some(ms)) = (obs.leading, obs.millis_since_quorum_ack) else {
            self.ack = None;
            return;
        };
        // The very first value may predate the watcher: trust no ack from it.
        let Some(anchor) = anchor else {
            self.ack = None;
            return;
        };
        let Some(at) = anchor.checked_sub(Duration::from_millis(ms)) else {
            self.ack = None;
            return;
        };
        self.ack = match self.ack {
            // A later report may carry an older ack (same heartbeat round):
            // keep the freshest bound we have for this term.
            Some((t, prev)) if t == term && prev > at => Some((t, prev)),
            _ => Some((term, at)),
        };
    }

    /// The term and instant until which this node may hold the VIP.
    pub fn valid_until(&self) -> Option<(u64, Instant)> {
        self.ack.map(|(t, at)| (t, at + self.lease))
    }

    /// The term of a lease still valid at `now`.
    pub fn valid_at(&self, now: Instant) -> Option<u64> {
        self.valid_until()
            .filter(|(_, until)| now < *until)
            .map(|(t, _)| t)
    }

    /// Forgets the ack: leadership must be re-proven before the next claim.
    pub fn reset(&mut self) {
        self.ack = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leading(term: u64, ms: u64) -> Option<Observation> {
        Some(Observation {
            leading: Some(term),
            millis_since_quorum_ack: Some(ms),
        })
    }

    #[test]
    fn first_look_never_grants_a_lease() {
        let t0 = Instant::now();
        let mut l = LeaseClock::new(Duration::from_millis(100));
        l.look(t0, leading(3, 0));
        assert_eq!(l.valid_at(t0), None);
        l.look(t0 + Duration::from_millis(5), leading(3, 1));
        assert_eq!(l.valid_at(t0 + Duration::from_millis(5)), Some(3));
    }

    #[test]
    fn ack_is_anchored_to_the_previous_look_not_to_now() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut l = LeaseClock::new(ms(100));
        l.look(t0, None);
        // Stopped for 5 s; the value read on waking was reported before the stop.
        let wake = t0 + Duration::from_secs(5);
        l.look(wake, leading(3, 10));
        assert_eq!(
            l.valid_at(wake),
            None,
            "a stale value must not renew the lease"
        );
        let (_, until) = l.valid_until().unwrap();
        assert_eq!(until, t0 - ms(10) + ms(100));
    }

    #[test]
    fn lease_expires_without_new_metrics_and_resets_on_term_change() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let mut l = LeaseClock::new(ms(100));
        l.look(t0, None);
        l.look(t0 + ms(10), leading(4, 0));
        assert_eq!(l.valid_at(t0 + ms(99)), Some(4));
        assert_eq!(l.valid_at(t0 + ms(100)), None);
        // An older ack in a later report keeps the fresher bound.
        l.look(t0 + ms(20), leading(4, 30));
        assert_eq!(l.valid_until().unwrap().1, t0 + ms(100));
        l.look(t0 + ms(30), leading(5, 0));
        assert_eq!(l.valid_until().unwrap(), (5, t0 + ms(120)));
        l.look(
            t0 + ms(40),
            Some(Observation {
                leading: None,
                millis_since_quorum_ack: None,
            }),
        );
        assert_eq!(l.valid_until(), None);
    }
}
