//! The watcher's decision, as a pure function of what it sees at one
//! instant: whether this node campaigns, whether it wants the VIP, whether
//! a hand-over starts or is called off. The watcher (mod.rs) gathers the
//! [`World`], calls [`decide`], and carries the [`Decision`] out (logs,
//! watch channels, the hand-over task), so every rule here is unit-tested
//! without Raft, clocks or hooks.

use std::time::Instant;

/// What the watcher asks of the hook runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wish {
    /// Hold the VIP for this term; the lease ends at the instant given, and
    /// a claim that could return after it is not started.
    Hold(u64, Instant),
    Release(u64),
}

/// A hand-over of leadership this node is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Running {
    /// An operator asked for it (`clb failover`, SIGTERM): it goes on even
    /// if the node is fit again.
    pub operator: bool,
    /// It has let the VIP go already.
    pub released: bool,
}

/// What the watcher sees.
#[derive(Debug, Clone, Copy)]
pub struct World {
    pub now: Instant,
    /// The term this node leads in, if it leads.
    pub leading: Option<u64>,
    pub term: u64,
    /// The quorum lease: (term, end), from [`super::lease::until`].
    pub lease: Option<(u64, Instant)>,
    pub vip_configured: bool,
    pub witness: bool,
    /// The health gate passes.
    pub healthy: bool,
    /// No fit node is left: this one campaigns even though unfit, so the
    /// cluster keeps a leader for writes.
    pub fallback: bool,
    pub handover: Option<Running>,
    /// The last wish sent to the hook runner.
    pub before: Wish,
    /// The wait since the last hand-over this node started has passed.
    pub handover_due: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Let openraft start elections here.
    pub may_campaign: bool,
    /// What a leader handing over is told: this node is fit to take over.
    pub takes_over: bool,
    pub wish: Wish,
    /// The lease held the VIP, and ran out while this node still leads.
    pub expired: bool,
    /// Abort the running hand-over: this node is fit again.
    pub call_off_handover: bool,
    /// Hand leadership over: this node leads but is unfit.
    pub start_handover: bool,
}

pub fn decide(w: &World) -> Decision {
    let stepping_down = w.handover.is_some();
    // A hand-over first waits until openraft would let this node's vote go;
    // the VIP stays until then, so the gap is only the release, one
    // election and the claim.
    let releasing = w.handover.is_some_and(|h| h.released);
    let may_lead = !w.witness && w.healthy;
    let may_campaign = (may_lead || w.fallback) && !stepping_down;
    // Only a node fit to lead takes leadership over. One that campaigns only
    // as a fallback would be unfit as leader too and hand over again, so
    // leadership would pass between unfit nodes, a gap for writes at every
    // move.
    let takes_over = may_lead && !stepping_down;

    let valid = w.lease.filter(|(_, until)| w.now < *until);
    let lease_term = valid.map(|(t, _)| t);
    let wants = w.vip_configured
        && may_lead
        && !releasing
        && w.leading.is_some()
        && lease_term == w.leading;
    let wish = match (wants, valid) {
        (true, Some((t, until))) => Wish::Hold(t, until),
        _ => Wish::Release(w.term),
    };
    let expired = matches!(w.before, Wish::Hold(..))
        && matches!(wish, Wish::Release(_))
        && w.leading.is_some()
        && lease_term.is_none();

    // A hand-over started because this node was unfit is called off if it
    // is fit again before it let the VIP go (haproxy came up while the
    // hand-over waited): the VIP would otherwise move for nothing.
    let call_off_handover = may_lead && w.handover.is_some_and(|h| !h.operator && !h.released);
    // An unfit leader hands over, at most once per hand-over wait; not when
    // it is the fallback (no fit node to hand to).
    let alone = w.fallback && !w.healthy;
    let start_handover =
        w.leading.is_some() && !may_lead && !alone && !stepping_down && w.handover_due;
    Decision {
        may_campaign,
        takes_over,
        wish,
        expired,
        call_off_handover,
        start_handover,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A healthy balancer leading term 5 with a lease 100 ms ahead.
    fn leader(now: Instant) -> World {
        World {
            now,
            leading: Some(5),
            term: 5,
            lease: Some((5, now + Duration::from_millis(100))),
            vip_configured: true,
            witness: false,
            healthy: true,
            fallback: false,
            handover: None,
            before: Wish::Release(4),
            handover_due: true,
        }
    }

    #[test]
    fn a_healthy_leader_with_a_lease_holds_until_its_end() {
        let now = Instant::now();
        let d = decide(&leader(now));
        assert_eq!(d.wish, Wish::Hold(5, now + Duration::from_millis(100)));
        assert!(d.may_campaign && d.takes_over);
        assert!(!d.expired && !d.start_handover && !d.call_off_handover);
    }

    #[test]
    fn no_hold_without_a_valid_lease_of_the_term_it_leads() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        let cases = [
            // Ended at `now`: the lease is exclusive of its end.
            Some((5, now)),
            Some((5, now - ms(1))),
            // A lease of an earlier term.
            Some((4, now + ms(100))),
            None,
        ];
        for lease in cases {
            let w = World {
                lease,
                ..leader(now)
            };
            assert_eq!(decide(&w).wish, Wish::Release(5), "{lease:?}");
        }
        // A follower never holds, even with a lease of its old term.
        let w = World {
            leading: None,
            term: 6,
            ..leader(now)
        };
        assert_eq!(decide(&w).wish, Wish::Release(6));
        // Nothing to hold without a VIP.
        let w = World {
            vip_configured: false,
            ..leader(now)
        };
        assert_eq!(decide(&w).wish, Wish::Release(5));
    }

    #[test]
    fn a_lease_running_out_while_leading_is_an_expiry() {
        let now = Instant::now();
        let held = Wish::Hold(5, now);
        let w = World {
            lease: Some((5, now)),
            before: held,
            ..leader(now)
        };
        let d = decide(&w);
        assert_eq!(d.wish, Wish::Release(5));
        assert!(d.expired);
        // Losing leadership is not an expiry; neither is a release for health.
        let lost = World {
            leading: None,
            term: 6,
            lease: None,
            before: held,
            ..leader(now)
        };
        assert!(!decide(&lost).expired);
        let sick = World {
            healthy: false,
            before: held,
            ..leader(now)
        };
        let d = decide(&sick);
        assert!(!d.expired);
        assert_eq!(d.wish, Wish::Release(5));
    }

    #[test]
    fn an_unfit_leader_releases_and_hands_over_once_per_wait() {
        let now = Instant::now();
        let sick = World {
            healthy: false,
            ..leader(now)
        };
        let d = decide(&sick);
        assert_eq!(d.wish, Wish::Release(5));
        assert!(d.start_handover);
        assert!(!d.may_campaign && !d.takes_over);
        let not_yet = World {
            handover_due: false,
            ..sick
        };
        assert!(!decide(&not_yet).start_handover);
        // A witness that leads hands over too, healthy or not.
        let witness = World {
            witness: true,
            ..leader(now)
        };
        let d = decide(&witness);
        assert!(d.start_handover);
        assert_eq!(d.wish, Wish::Release(5));
        assert!(!d.may_campaign);
    }

    #[test]
    fn the_last_node_standing_keeps_leading_though_unfit() {
        let now = Instant::now();
        let alone = World {
            healthy: false,
            fallback: true,
            ..leader(now)
        };
        let d = decide(&alone);
        assert!(d.may_campaign, "campaigns so writes have a leader");
        assert!(
            !d.takes_over,
            "but is not offered leadership by a hand-over"
        );
        assert!(!d.start_handover);
        assert_eq!(d.wish, Wish::Release(5), "and never holds the VIP");
    }

    #[test]
    fn a_hand_over_holds_the_vip_until_it_releases_and_is_called_off_only_if_unasked() {
        let now = Instant::now();
        let running = |operator, released| World {
            handover: Some(Running { operator, released }),
            ..leader(now)
        };
        // Before its release: the VIP stays, no campaigning, nothing new.
        let d = decide(&running(true, false));
        assert!(matches!(d.wish, Wish::Hold(5, _)));
        assert!(!d.may_campaign && !d.takes_over && !d.start_handover);
        assert!(!d.call_off_handover, "an operator's hand-over goes on");
        // After it: the VIP goes.
        assert_eq!(decide(&running(true, true)).wish, Wish::Release(5));
        // One started for health, fit again before the release: called off.
        assert!(decide(&running(false, false)).call_off_handover);
        assert!(!decide(&running(false, true)).call_off_handover);
        let still_sick = World {
            healthy: false,
            ..running(false, false)
        };
        assert!(!decide(&still_sick).call_off_handover);
    }
}
