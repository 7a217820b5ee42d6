//! The quorum lease, on this node's monotonic clock.
//!
//! The lease runs from the send time of the latest request a quorum of
//! voters accepted (consensus::acks), not from when an answer arrived or
//! when openraft reported it: after SIGSTOP or starvation the lease is
//! judged on the time that really passed, and a quorum that accepted a
//! request sent at `s` had voted for nobody else at `s`.

use std::time::{Duration, Instant};

/// The term and instant until which this node may hold the VIP: `ack` is
/// `(term, instant a quorum followed)`, `leading` the term this node leads.
pub fn until(
    ack: Option<(u64, Instant)>,
    leading: Option<u64>,
    lease: Duration,
) -> Option<(u64, Instant)> {
    let (term, at) = ack?;
    (leading == Some(term)).then_some((term, at + lease))
}

/// Whether a claim started at `now` and taking about `expected` returns
/// before the lease ends at `until`; if not, it is not started.
pub fn claim_in_time(now: Instant, expected: Duration, until: Instant) -> bool {
    now + expected < until
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_lease_belongs_to_the_term_that_leads() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(
            until(Some((4, t0)), Some(4), ms(100)),
            Some((4, t0 + ms(100)))
        );
        // Acks of an older term, or not leading: no lease.
        assert_eq!(until(Some((3, t0)), Some(4), ms(100)), None);
        assert_eq!(until(Some((4, t0)), None, ms(100)), None);
        assert_eq!(until(None, Some(4), ms(100)), None);
    }

    #[test]
    fn a_claim_that_could_outlive_the_lease_is_not_started() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        assert!(claim_in_time(t0, ms(10), t0 + ms(100)));
        assert!(!claim_in_time(t0 + ms(95), ms(10), t0 + ms(100)));
        assert!(!claim_in_time(t0 + ms(100), ms(0), t0 + ms(100)));
    }
}
