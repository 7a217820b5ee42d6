//! What happened on this node lately, for `/ui`'s timeline: VIP claims and
//! releases (and failed hook runs), leader changes as this node saw them,
//! and renders that went live or failed. In memory only, bounded by age
//! ([`KEEP_MS`]) and count ([`CAPACITY`]); it crosses to other nodes inside
//! `node_view`, so one page can merge every node's.
//!
//! The recorders only watch the status channels the failover, consensus
//! and render tasks already publish: nothing on their paths waits for this.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::consensus::{NodeId, Raft};
use crate::failover::{Action, VipStatus};
use crate::render::{ApplyOutcome, RenderStatus};

/// Events older than this are dropped (6 hours).
pub const KEEP_MS: u64 = 6 * 3_600 * 1_000;
/// At most this many events are kept; the oldest go first.
pub const CAPACITY: usize = 300;
/// Like events within this span of each other share one entry (runtime
/// applies under member churn, a hook or apply failing on every retry), so
/// churn does not push the rare events out.
pub const MERGE_MS: u64 = 60_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    VipClaim,
    VipRelease,
    /// A leader this node had not seen for that term.
    Leader,
    /// A config went live (`how`: `runtime` or `reload`), or a render,
    /// validation or apply failed (`ok` false).
    Render,
}

fn yes() -> bool {
    true
}

fn one() -> u32 {
    1
}

/// One entry of the timeline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Unix milliseconds.
    pub at_ms: u64,
    pub kind: Kind,
    #[serde(default = "yes")]
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub term: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<NodeId>,
    /// Renders: `runtime` or `reload` (an [`ApplyOutcome`] that went live),
    /// or the stage that failed: `validate`, `apply` or `render`. Text, since
    /// it mixes the two and crosses to peers as such.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub how: Option<String>,
    /// Renders: the registry index that went live.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u64>,
    /// The error of a failure, or a note on a success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// How many like events this entry stands for (see [`MERGE_MS`]).
    #[serde(default = "one")]
    pub count: u32,
    /// When the last of them happened, when more than one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_ms: Option<u64>,
}

impl Event {
    pub fn new(at_ms: u64, kind: Kind) -> Event {
        Event {
            at_ms,
            kind,
            ok: true,
            term: None,
            leader: None,
            how: None,
            index: None,
            detail: None,
            count: 1,
            last_ms: None,
        }
    }

    /// When the last event this entry stands for happened.
    pub fn end_ms(&self) -> u64 {
        self.last_ms.unwrap_or(self.at_ms)
    }

    /// Whether `next` only repeats this entry: a runtime apply, or the same
    /// failure again, soon after.
    fn absorbs(&self, next: &Event) -> bool {
        let repeatable = !self.ok
            || (self.kind == Kind::Render
                && self.how.as_deref() == Some(ApplyOutcome::Runtime.as_str()));
        repeatable
            && self.kind == next.kind
            && self.ok == next.ok
            && self.how == next.how
            && self.term == next.term
            && self.detail == next.detail
            && next.at_ms >= self.at_ms
            && next.at_ms.saturating_sub(self.end_ms()) <= MERGE_MS
    }
}

/// This node's recent events, oldest first; cheap to clone and share.
#[derive(Debug, Clone, Default)]
pub struct Timeline(Arc<Mutex<VecDeque<Event>>>);

impl Timeline {
    pub fn push(&self, e: Event) {
        self.push_at(e, crate::clock::now_ms());
    }

    /// [`Timeline::push`] with the clock given (tests).
    pub fn push_at(&self, e: Event, now_ms: u64) {
        let mut ring = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(last) = ring.back_mut().filter(|l| l.absorbs(&e)) {
            last.count = last.count.saturating_add(e.count);
            last.last_ms = Some(e.end_ms());
            last.index = e.index.or(last.index);
            return;
        }
        // Events can arrive a little out of order (a hook's time is when
        // it finished, seen later): keep the ring sorted by time.
        let at = ring
            .iter()
            .rposition(|x| x.at_ms <= e.at_ms)
            .map_or(0, |i| i + 1);
        ring.insert(at, e);
        while ring.len() > CAPACITY {
            ring.pop_front();
        }
        let oldest = now_ms.saturating_sub(KEEP_MS);
        while ring.front().is_some_and(|e| e.end_ms() < oldest) {
            ring.pop_front();
        }
    }

    /// The events of the last [`KEEP_MS`], oldest first.
    pub fn events(&self, now_ms: u64) -> Vec<Event> {
        let oldest = now_ms.saturating_sub(KEEP_MS);
        let ring = self.0.lock().unwrap_or_else(|p| p.into_inner());
        ring.iter()
            .filter(|e| e.end_ms() >= oldest)
            .cloned()
            .collect()
    }
}

/// A leader change, when `(term, leader)` differs from the last one seen.
pub fn leader_event(
    seen: &mut Option<(u64, NodeId)>,
    term: u64,
    leader: Option<NodeId>,
    now_ms: u64,
) -> Option<Event> {
    let leader = leader?;
    if *seen == Some((term, leader)) {
        return None;
    }
    *seen = Some((term, leader));
    Some(Event {
        term: Some(term),
        leader: Some(leader),
        ..Event::new(now_ms, Kind::Leader)
    })
}

/// The hook runs between two VIP statuses. The watch channel keeps only the
/// latest status, so two runs in quick succession arrive together: the
/// counters say what ran, and all but the last get the last one's start as
/// an approximate time.
pub fn vip_events(prev: &VipStatus, cur: &VipStatus) -> Vec<Event> {
    let Some(last) = &cur.last_hook else {
        return Vec::new();
    };
    let runs = [
        (
            Action::Claim,
            true,
            cur.claims_ok.saturating_sub(prev.claims_ok),
        ),
        (
            Action::Claim,
            false,
            cur.claims_failed.saturating_sub(prev.claims_failed),
        ),
        (
            Action::Release,
            true,
            cur.releases_ok.saturating_sub(prev.releases_ok),
        ),
        (
            Action::Release,
            false,
            cur.releases_failed.saturating_sub(prev.releases_failed),
        ),
    ];
    let kind = |a: Action| match a {
        Action::Claim => Kind::VipClaim,
        Action::Release => Kind::VipRelease,
    };
    let mut out = Vec::new();
    for (action, ok, n) in runs {
        let earlier = if action == last.action && ok == last.ok {
            n.saturating_sub(1)
        } else {
            n
        };
        if earlier > 0 {
            out.push(Event {
                ok,
                count: earlier as u32,
                detail: Some("seen together with a later run; time approximate".into()),
                ..Event::new(last.at_ms.saturating_sub(last.took_ms), kind(action))
            });
        }
    }
    if runs.iter().any(|r| r.2 > 0) {
        out.push(Event {
            ok: last.ok,
            term: Some(last.term),
            detail: last.error.clone().or_else(|| last.note.clone()),
            ..Event::new(last.at_ms, kind(last.action))
        });
    }
    out
}

/// Renders that went live or failed between two render statuses.
pub fn render_events(prev: &RenderStatus, cur: &RenderStatus, now_ms: u64) -> Vec<Event> {
    let at = cur.last_apply_at_ms.unwrap_or(now_ms);
    let mut out = Vec::new();
    let mut failed = false;
    let mut went = |how: &str, ok: bool, n: u64, at: u64| {
        if n == 0 {
            return;
        }
        failed |= !ok;
        out.push(Event {
            ok,
            how: Some(how.into()),
            index: ok.then_some(cur.applied_index),
            detail: (!ok).then(|| cur.last_error.clone()).flatten(),
            count: n as u32,
            ..Event::new(at, Kind::Render)
        });
    };
    went(
        "validate",
        false,
        cur.validate_failures.saturating_sub(prev.validate_failures),
        now_ms,
    );
    went(
        "apply",
        false,
        cur.apply_failures.saturating_sub(prev.apply_failures),
        at,
    );
    went(
        ApplyOutcome::Runtime.as_str(),
        true,
        cur.runtime_applies.saturating_sub(prev.runtime_applies),
        at,
    );
    went(
        ApplyOutcome::Reload.as_str(),
        true,
        cur.reloads.saturating_sub(prev.reloads),
        at,
    );
    // A template error (or a registry still catching up) counts nowhere
    // but is the new last error.
    if !failed && cur.last_error.is_some() && cur.last_error != prev.last_error {
        out.push(Event {
            ok: false,
            how: Some("render".into()),
            detail: cur.last_error.clone(),
            ..Event::new(now_ms, Kind::Render)
        });
    }
    out
}

/// Records this node's events into `timeline` until `stop` turns true.
pub fn record(
    timeline: Timeline,
    raft: Raft,
    vip: watch::Receiver<VipStatus>,
    render: Option<watch::Receiver<RenderStatus>>,
    stop: watch::Receiver<bool>,
) {
    let leaders = {
        let (timeline, mut metrics) = (timeline.clone(), raft.metrics());
        let mut seen = None;
        async move {
            loop {
                let (term, leader) = {
                    let m = metrics.borrow_and_update();
                    (m.current_term, m.current_leader)
                };
                if let Some(e) = leader_event(&mut seen, term, leader, crate::clock::now_ms()) {
                    timeline.push(e);
                }
                if metrics.changed().await.is_err() {
                    return;
                }
            }
        }
    };
    spawn_until(leaders, stop.clone());
    spawn_until(
        follow(timeline.clone(), vip, |p, c, _| vip_events(p, c)),
        stop.clone(),
    );
    if let Some(render) = render {
        spawn_until(follow(timeline, render, render_events), stop);
    }
}

/// Pushes the events `diff` finds between each status and the next.
async fn follow<T: Clone + Send + Sync + 'static>(
    timeline: Timeline,
    mut rx: watch::Receiver<T>,
    diff: impl Fn(&T, &T, u64) -> Vec<Event>,
) {
    let mut prev = rx.borrow_and_update().clone();
    while rx.changed().await.is_ok() {
        let cur = rx.borrow_and_update().clone();
        for e in diff(&prev, &cur, crate::clock::now_ms()) {
            timeline.push(e);
        }
        prev = cur;
    }
}

fn spawn_until(
    work: impl std::future::Future<Output = ()> + Send + 'static,
    mut stop: watch::Receiver<bool>,
) {
    tokio::spawn(async move {
        tokio::select! {
            _ = work => {}
            _ = stop.wait_for(|s| *s) => {}
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::failover::HookOutcome;

    fn render_at(at: u64, how: &str) -> Event {
        Event {
            how: Some(how.into()),
            ..Event::new(at, Kind::Render)
        }
    }

    #[test]
    fn keeps_time_order_and_drops_by_age() {
        let t = Timeline::default();
        let h = 3_600_000;
        t.push_at(Event::new(10 * h, Kind::VipClaim), 10 * h);
        // Arrives after a later event: still sorted.
        t.push_at(Event::new(10 * h + 5, Kind::Leader), 10 * h + 5);
        t.push_at(Event::new(10 * h + 2, Kind::VipRelease), 10 * h + 6);
        let kinds: Vec<Kind> = t.events(10 * h + 6).iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [Kind::VipClaim, Kind::VipRelease, Kind::Leader]);
        // Six hours on, the claim (at 10 h) is past KEEP_MS; the others not yet.
        let later = 10 * h + KEEP_MS + 1;
        assert_eq!(t.events(later).len(), 2);
        // A push drops what has aged out for good.
        t.push_at(Event::new(later, Kind::VipClaim), later);
        let kept: Vec<u64> = t.0.lock().unwrap().iter().map(|e| e.at_ms).collect();
        assert_eq!(kept, [10 * h + 2, 10 * h + 5, later]);
    }

    #[test]
    fn holds_at_most_capacity_newest_kept() {
        let t = Timeline::default();
        for i in 0..(CAPACITY as u64 + 50) {
            // Reloads never merge.
            t.push_at(render_at(i, "reload"), i);
        }
        let ev = t.events(CAPACITY as u64 + 50);
        assert_eq!(ev.len(), CAPACITY);
        assert_eq!(ev.first().unwrap().at_ms, 50);
        assert_eq!(ev.last().unwrap().at_ms, CAPACITY as u64 + 49);
        assert!(ev.windows(2).all(|w| w[0].at_ms <= w[1].at_ms));
    }

    #[test]
    fn runtime_applies_and_repeated_failures_share_an_entry() {
        let t = Timeline::default();
        t.push_at(render_at(1_000, "runtime"), 1_000);
        t.push_at(render_at(2_000, "runtime"), 2_000);
        t.push_at(render_at(2_000 + MERGE_MS, "runtime"), 2_000 + MERGE_MS);
        let ev = t.events(70_000);
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(
            (ev[0].count, ev[0].at_ms, ev[0].last_ms),
            (3, 1_000, Some(62_000))
        );
        // Too long after the last: a new entry.
        let far = 63_000 + MERGE_MS;
        t.push_at(render_at(far, "runtime"), far);
        // A reload in between stops the merging.
        t.push_at(render_at(far + 1, "reload"), far + 1);
        t.push_at(render_at(far + 2, "runtime"), far + 2);
        let fail = |at, d: &str| Event {
            ok: false,
            detail: Some(d.into()),
            ..Event::new(at, Kind::VipClaim)
        };
        t.push_at(fail(far + 3, "boom"), far + 3);
        t.push_at(fail(far + 4, "boom"), far + 4);
        t.push_at(fail(far + 5, "other"), far + 5);
        // Successful claims never merge: each is a hold that began.
        t.push_at(Event::new(far + 6, Kind::VipClaim), far + 6);
        t.push_at(Event::new(far + 7, Kind::VipClaim), far + 7);
        let counts: Vec<u32> = t.events(far + 7).iter().map(|e| e.count).collect();
        assert_eq!(counts, [3, 1, 1, 1, 2, 1, 1, 1]);
    }

    #[test]
    fn leader_changes_are_recorded_once_per_term_and_leader() {
        let mut seen = None;
        assert!(
            leader_event(&mut seen, 1, None, 5).is_none(),
            "no leader yet"
        );
        let e = leader_event(&mut seen, 1, Some(2), 6).unwrap();
        assert_eq!(
            (e.kind, e.term, e.leader, e.at_ms),
            (Kind::Leader, Some(1), Some(2), 6)
        );
        assert!(leader_event(&mut seen, 1, Some(2), 7).is_none());
        assert!(leader_event(&mut seen, 2, None, 8).is_none(), "an election");
        assert_eq!(
            leader_event(&mut seen, 2, Some(3), 9).unwrap().leader,
            Some(3)
        );
    }

    fn hook(action: Action, ok: bool, at_ms: u64) -> HookOutcome {
        HookOutcome {
            action,
            term: 4,
            ok,
            error: (!ok).then(|| "exit 1".into()),
            note: None,
            at_ms,
            took_ms: 10,
        }
    }

    #[test]
    fn every_hook_run_is_recorded_even_when_seen_together() {
        let none = VipStatus::default();
        let claimed = VipStatus {
            claims_ok: 1,
            last_hook: Some(hook(Action::Claim, true, 100)),
            ..Default::default()
        };
        let ev = vip_events(&none, &claimed);
        assert_eq!(ev.len(), 1);
        assert_eq!(
            (ev[0].kind, ev[0].ok, ev[0].term, ev[0].at_ms),
            (Kind::VipClaim, true, Some(4), 100)
        );
        assert!(
            vip_events(&claimed, &claimed.clone()).is_empty(),
            "nothing ran"
        );
        // A failed release, then a release that worked, seen at once.
        let released = VipStatus {
            claims_ok: 1,
            releases_failed: 1,
            releases_ok: 1,
            last_hook: Some(hook(Action::Release, true, 300)),
            ..Default::default()
        };
        let ev = vip_events(&claimed, &released);
        let got: Vec<(Kind, bool, u64)> = ev.iter().map(|e| (e.kind, e.ok, e.at_ms)).collect();
        assert_eq!(
            got,
            [
                (Kind::VipRelease, false, 290),
                (Kind::VipRelease, true, 300)
            ]
        );
        let failed = VipStatus {
            claims_failed: 1,
            last_hook: Some(hook(Action::Claim, false, 400)),
            ..Default::default()
        };
        let ev = vip_events(&none, &failed);
        assert_eq!(ev[0].detail.as_deref(), Some("exit 1"));
    }

    #[test]
    fn renders_that_went_live_or_failed() {
        let a = RenderStatus::default();
        let b = RenderStatus {
            reloads: 1,
            applied_index: 9,
            last_apply_at_ms: Some(50),
            ..Default::default()
        };
        let ev = render_events(&a, &b, 60);
        assert_eq!(ev.len(), 1);
        assert_eq!(
            (ev[0].how.as_deref(), ev[0].index, ev[0].at_ms),
            (Some("reload"), Some(9), 50)
        );
        let c = RenderStatus {
            validate_failures: 1,
            last_error: Some("haproxy rejected".into()),
            ..b.clone()
        };
        let ev = render_events(&b, &c, 70);
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(
            (ev[0].ok, ev[0].how.as_deref(), ev[0].at_ms),
            (false, Some("validate"), 70)
        );
        assert_eq!(ev[0].detail.as_deref(), Some("haproxy rejected"));
        // A template error moves no counter.
        let d = RenderStatus {
            last_error: Some("template line 3".into()),
            ..b.clone()
        };
        let ev = render_events(&b, &d, 80);
        assert_eq!((ev[0].how.as_deref(), ev[0].ok), (Some("render"), false));
        assert!(render_events(&d, &d.clone(), 90).is_empty());
    }
}
