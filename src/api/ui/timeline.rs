//! The page's timeline: every node's recent events (VIP claims and
//! releases, leader changes, renders), merged into one strip per node that
//! shows who held the VIP and who led when, with marks for reloads and
//! failures, and a list of the latest events. Plain HTML and CSS.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::{ago, esc};
use crate::timeline::{Event, Kind, KEEP_MS};
use crate::views::NodeView;

/// The strip spans the smallest of these that covers the oldest event.
const SPANS_MIN: [u64; 6] = [2, 10, 30, 60, 180, 360];
/// Events listed under the strip, newest first.
const LISTED: usize = 40;

/// What the timeline needs of one node.
pub struct NodeEvents {
    pub id: u64,
    /// `None`: the node did not answer.
    pub events: Option<Vec<Event>>,
    /// Whether it says it holds the VIP now.
    pub holds_vip: bool,
}

/// A node's events from its `node_view` (`None`: it did not answer).
pub fn node_events(id: u64, status: Option<&NodeView>) -> NodeEvents {
    NodeEvents {
        id,
        events: status.map(|s| s.timeline.clone()),
        holds_vip: status.is_some_and(|s| s.vip_held),
    }
}

/// A leader change, with every node that saw it.
struct LeaderChange {
    at_ms: u64,
    term: u64,
    leader: u64,
    seen_by: Vec<u64>,
}

/// Leader changes over all nodes, one per (term, leader), at the earliest
/// time any node saw it; oldest first.
fn leader_changes(nodes: &[NodeEvents]) -> Vec<LeaderChange> {
    let mut by_key: BTreeMap<(u64, u64), LeaderChange> = BTreeMap::new();
    for n in nodes {
        for e in n.events.iter().flatten().filter(|e| e.kind == Kind::Leader) {
            let (Some(term), Some(leader)) = (e.term, e.leader) else {
                continue;
            };
            let c = by_key.entry((term, leader)).or_insert(LeaderChange {
                at_ms: e.at_ms,
                term,
                leader,
                seen_by: Vec::new(),
            });
            c.at_ms = c.at_ms.min(e.at_ms);
            if !c.seen_by.contains(&n.id) {
                c.seen_by.push(n.id);
            }
        }
    }
    let mut out: Vec<LeaderChange> = by_key.into_values().collect();
    out.sort_by_key(|c| (c.at_ms, c.term));
    out
}

/// `HH:MM:SS` UTC.
fn clock(ms: u64) -> String {
    let s = (ms / 1_000) % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3_600, s / 60 % 60, s % 60)
}

/// Spans of time as (start, end) during which the node held the VIP, from
/// its claims and releases; a hold still open runs to `now`.
fn vip_holds(n: &NodeEvents, window_start: u64, now_ms: u64) -> Vec<(u64, u64)> {
    let mut holds = Vec::new();
    let mut since = None;
    for e in n.events.iter().flatten().filter(|e| e.ok) {
        match e.kind {
            Kind::VipClaim => {
                since.get_or_insert(e.at_ms);
            }
            Kind::VipRelease => {
                if let Some(s) = since.take() {
                    holds.push((s, e.at_ms));
                }
            }
            _ => {}
        }
    }
    match since {
        Some(s) => holds.push((s, now_ms)),
        // Held since before the oldest event kept.
        None if n.holds_vip && holds.is_empty() => holds.push((window_start, now_ms)),
        None => {}
    }
    holds
}

fn describe(e: &Event) -> String {
    let term = e.term.map(|t| format!(" (term {t})")).unwrap_or_default();
    let times = if e.count > 1 {
        format!(" ×{}", e.count)
    } else {
        String::new()
    };
    let detail = e
        .detail
        .as_deref()
        .map(|d| format!(": {d}"))
        .unwrap_or_default();
    let what = match (e.kind, e.ok) {
        (Kind::VipClaim, true) => format!("claimed the VIP{term}"),
        (Kind::VipClaim, false) => format!("VIP claim failed{term}"),
        (Kind::VipRelease, true) => format!("released the VIP{term}"),
        (Kind::VipRelease, false) => format!("VIP release failed{term}"),
        (Kind::Leader, _) => format!("saw node {} lead{term}", e.leader.unwrap_or(0)),
        (Kind::Render, true) => match e.how.as_deref() {
            Some("reload") => "haproxy reloaded".into(),
            _ => "changes applied through the runtime API".into(),
        },
        (Kind::Render, false) => match e.how.as_deref() {
            Some("validate") => "haproxy rejected the rendered config".into(),
            Some("apply") => "applying the config failed".into(),
            _ => "rendering failed".into(),
        },
    };
    let index = e.index.map(|i| format!(" (index {i})")).unwrap_or_default();
    format!("{what}{index}{times}{detail}")
}

/// The css class of an event's mark on the strip.
fn mark_class(e: &Event) -> Option<&'static str> {
    match (e.kind, e.ok, e.how.as_deref()) {
        (Kind::Leader, ..) | (Kind::VipClaim | Kind::VipRelease, true, _) => None,
        (_, false, _) => Some("tl-fail"),
        (Kind::Render, true, Some("reload")) => Some("tl-reload"),
        (Kind::Render, true, _) => Some("tl-runtime"),
    }
}

/// The timeline section.
pub fn section(nodes: &[NodeEvents], now_ms: u64) -> String {
    let oldest = nodes
        .iter()
        .flat_map(|n| n.events.iter().flatten())
        .map(|e| e.at_ms)
        .min()
        .unwrap_or(now_ms);
    let need = now_ms.saturating_sub(oldest).min(KEEP_MS);
    let span = SPANS_MIN
        .iter()
        .map(|m| m * 60_000)
        .find(|s| *s >= need)
        .unwrap_or(KEEP_MS);
    let start = now_ms.saturating_sub(span);
    let x = |t: u64| (t.clamp(start, now_ms) - start) as f64 * 100.0 / span as f64;
    let changes = leader_changes(nodes);

    let mut out = String::new();
    let _ = write!(
        out,
        "<section id=\"timeline\"><h2>Timeline <span class=\"muted\">last {} · times in UTC</span></h2>\
         <div class=\"tl\">",
        if span >= 3_600_000 {
            format!("{} h", span / 3_600_000)
        } else {
            format!("{} min", span / 60_000)
        }
    );
    for n in nodes {
        let _ = write!(
            out,
            "<div class=\"tl-row\" id=\"tl-node-{0}\"><span class=\"tl-label\">node {0}</span><div class=\"tl-track\">",
            n.id
        );
        if n.events.is_none() {
            out.push_str("<span class=\"tl-none muted\">no answer</span>");
        }
        for (from, to) in vip_holds(n, start, now_ms) {
            if to < start {
                continue;
            }
            let _ = write!(
                out,
                "<div class=\"tl-vip\" style=\"left:{:.3}%;width:{:.3}%\" title=\"node {} held the VIP {}–{}\"></div>",
                x(from),
                (x(to) - x(from)).max(0.4),
                n.id,
                clock(from),
                if to == now_ms { "now".into() } else { clock(to) },
            );
        }
        for (i, c) in changes.iter().enumerate().filter(|(_, c)| c.leader == n.id) {
            let to = changes.get(i + 1).map_or(now_ms, |next| next.at_ms);
            if to < start {
                continue;
            }
            let _ = write!(
                out,
                "<div class=\"tl-lead\" style=\"left:{:.3}%;width:{:.3}%\" title=\"node {} led from {} (term {})\"></div>\
                 <div class=\"tl-mark tl-elect\" style=\"left:{:.3}%\" title=\"{} node {} became leader (term {})\"></div>",
                x(c.at_ms),
                (x(to) - x(c.at_ms)).max(0.4),
                n.id,
                clock(c.at_ms),
                c.term,
                x(c.at_ms),
                clock(c.at_ms),
                n.id,
                c.term,
            );
        }
        for e in n.events.iter().flatten().filter(|e| e.end_ms() >= start) {
            if let Some(class) = mark_class(e) {
                let _ = write!(
                    out,
                    "<div class=\"tl-mark {class}\" style=\"left:{:.3}%\" title=\"{} {}\"></div>",
                    x(e.at_ms),
                    clock(e.at_ms),
                    esc(&describe(e)),
                );
            }
        }
        out.push_str("</div></div>\n");
    }
    out.push_str("<div class=\"tl-axis\"><span class=\"tl-label\"></span><div class=\"tl-ticks\">");
    for i in 0..=4u64 {
        let _ = write!(
            out,
            "<span style=\"left:{}%\">{}</span>",
            i * 25,
            clock(start + span * i / 4)
        );
    }
    out.push_str(
        "</div></div><p class=\"tl-legend muted\"><span class=\"tl-key tl-vip\"></span> held the VIP \
         <span class=\"tl-key tl-lead\"></span> led \
         <span class=\"tl-key tl-reload\"></span> reload \
         <span class=\"tl-key tl-runtime\"></span> runtime API change \
         <span class=\"tl-key tl-fail\"></span> failure</p></div>\n",
    );

    // The latest events, newest first; a leader change once, with who saw it.
    enum Row<'a> {
        Node(u64, &'a Event),
        Leader(&'a LeaderChange),
    }
    let mut rows: Vec<(u64, Row)> = nodes
        .iter()
        .flat_map(|n| {
            n.events
                .iter()
                .flatten()
                .filter(|e| e.kind != Kind::Leader)
                .map(move |e| (e.end_ms(), Row::Node(n.id, e)))
        })
        .chain(changes.iter().map(|c| (c.at_ms, Row::Leader(c))))
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.0));
    if rows.is_empty() {
        out.push_str("<p class=\"muted\">No events yet.</p>");
    } else {
        out.push_str(
            "<table class=\"events\"><thead><tr><th>time</th><th></th><th>node</th><th>event</th></tr></thead><tbody>",
        );
    }
    for (at, row) in rows.iter().take(LISTED) {
        let when = format!(
            "<td><code>{}</code></td><td class=\"muted\">{}</td>",
            clock(*at),
            esc(&ago(now_ms, Some(*at)))
        );
        match row {
            Row::Node(id, e) => {
                let kind = serde_json::to_value(e.kind)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default();
                let class = if e.ok { "" } else { " err" };
                let _ = write!(
                    out,
                    "<tr class=\"event{class}\" data-kind=\"{}\" data-node=\"{id}\" data-ok=\"{}\"{}>{when}<td>node {id}</td><td>{}</td></tr>",
                    esc(&kind),
                    e.ok,
                    e.term.map(|t| format!(" data-term=\"{t}\"")).unwrap_or_default(),
                    esc(&describe(e)),
                );
            }
            Row::Leader(c) => {
                let seen: Vec<String> = c.seen_by.iter().map(u64::to_string).collect();
                let _ = write!(
                    out,
                    "<tr class=\"event\" data-kind=\"leader\" data-leader=\"{0}\" data-term=\"{1}\">{when}\
                     <td>node {0}</td><td><b>became leader</b> (term {1}) <span class=\"muted\">seen by node {2}</span></td></tr>",
                    c.leader,
                    c.term,
                    seen.join(", "),
                );
            }
        }
    }
    if !rows.is_empty() {
        out.push_str("</tbody></table>");
        if rows.len() > LISTED {
            let _ = write!(
                out,
                "<p class=\"muted\">{} older events are on the strip only.</p>",
                rows.len() - LISTED
            );
        }
    }
    out.push_str("</section>\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(at_ms: u64, kind: Kind) -> Event {
        Event::new(at_ms, kind)
    }

    fn leader(at_ms: u64, term: u64, l: u64) -> Event {
        Event {
            term: Some(term),
            leader: Some(l),
            ..ev(at_ms, Kind::Leader)
        }
    }

    fn node(id: u64, events: Vec<Event>, holds_vip: bool) -> NodeEvents {
        NodeEvents {
            id,
            events: Some(events),
            holds_vip,
        }
    }

    #[test]
    fn leader_changes_merge_across_nodes_at_the_first_sighting() {
        let nodes = [
            node(1, vec![leader(100, 1, 1), leader(500, 2, 2)], false),
            node(2, vec![leader(90, 1, 1), leader(480, 2, 2)], false),
        ];
        let c = leader_changes(&nodes);
        let got: Vec<(u64, u64, u64, Vec<u64>)> = c
            .iter()
            .map(|c| (c.at_ms, c.term, c.leader, c.seen_by.clone()))
            .collect();
        assert_eq!(got, [(90, 1, 1, vec![1, 2]), (480, 2, 2, vec![1, 2])]);
    }

    #[test]
    fn vip_holds_pair_claims_with_releases() {
        let n = node(
            1,
            vec![
                ev(5, Kind::VipRelease), // the start-up release: no hold
                ev(10, Kind::VipClaim),
                ev(20, Kind::VipRelease),
                Event {
                    ok: false,
                    ..ev(25, Kind::VipClaim)
                },
                ev(30, Kind::VipClaim),
            ],
            true,
        );
        assert_eq!(vip_holds(&n, 0, 100), [(10, 20), (30, 100)]);
        // Held since before anything kept.
        assert_eq!(vip_holds(&node(2, vec![], true), 7, 100), [(7, 100)]);
        assert!(vip_holds(&node(3, vec![], false), 7, 100).is_empty());
    }

    #[test]
    fn the_section_lists_events_newest_first_and_escapes() {
        let now = 3_600_000 * 30;
        let nodes = [
            node(
                1,
                vec![
                    leader(now - 60_000, 2, 1),
                    Event {
                        term: Some(2),
                        ..ev(now - 59_000, Kind::VipClaim)
                    },
                    Event {
                        ok: false,
                        how: Some("validate".into()),
                        detail: Some("<bad> cfg".into()),
                        ..ev(now - 1_000, Kind::Render)
                    },
                ],
                true,
            ),
            NodeEvents {
                id: 2,
                events: None,
                holds_vip: false,
            },
        ];
        let html = section(&nodes, now);
        assert!(html.contains("last 2 min"), "{html}");
        assert!(html.contains("&lt;bad&gt; cfg") && !html.contains("<bad>"));
        let fail = html.find("data-kind=\"render\"").unwrap();
        let claim = html
            .find("data-kind=\"vip_claim\" data-node=\"1\"")
            .unwrap();
        let lead = html
            .find("data-kind=\"leader\" data-leader=\"1\" data-term=\"2\"")
            .unwrap();
        assert!(fail < claim && claim < lead, "newest first");
        assert!(html.contains("class=\"tl-vip\""), "the hold is drawn");
        assert!(html.contains("id=\"tl-node-2\"") && html.contains("no answer"));
        assert_eq!(clock(now - 1_000), "05:59:59");
    }
}
