//! `GET /metrics`: every series clbd exports, encoded by the prometheus-client
//! crate in the Prometheus text format 0.0.4.
//!
//! The alert rules and the dashboard in deploy/ name these series, so names,
//! labels and meanings are a contract (tests/monitoring.rs checks the names
//! against a live node).
//!
//! Two kinds of source:
//! - Counted here or in consensus, for /metrics alone: the write latency
//!   histogram and the election and append counters are the crate's
//!   `Histogram` and `Counter`, registered once.
//! - Mirrors of state another module keeps (Raft metrics, the registry, the
//!   render and VIP status): read when scraped, by [`NodeState`]. That state
//!   already lives in watch channels that /v1/cluster and /ui read too;
//!   copying it into gauges on every change would need a hook in each owner,
//!   could disagree with them, and would have to remove the series of
//!   deleted services and departed peers. Its counters (renders, hook runs)
//!   are fields of those status values, so they are read the same way and
//!   encoded as the crate's `ConstCounter`.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    prometheus_text, DescriptorEncoder, EncodeGaugeValue, EncodeMetric,
};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::sync::watch;

use super::AppState;
use crate::consensus::acks::Acks;
use crate::consensus::elect::Liveness;
use crate::consensus::{Consensus, NodeId};
use crate::failover::{Failover, VipStatus};
use crate::model::{self, MemberState};
use crate::render::RenderStatus;

/// Upper bounds of the write latency buckets, in seconds: from a lone node's
/// sub-millisecond fsync to a write forwarded through an election.
const WRITE_BUCKETS: [f64; 13] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// The registry, built once at start, and the histogram handlers observe.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    write_latency: Histogram,
}

impl Metrics {
    pub fn new(
        consensus: &Consensus,
        render: Option<watch::Receiver<RenderStatus>>,
        failover: Failover,
        bgp: Option<crate::bgp::Bgp>,
    ) -> Self {
        Metrics::build(
            consensus_counters(
                consensus.forwarded(),
                consensus.acks(),
                consensus.liveness(),
            ),
            Sources {
                consensus: consensus.clone(),
                render,
                failover,
                bgp,
            },
        )
    }

    fn build(
        counters: impl IntoIterator<Item = (&'static str, &'static str, Counter)>,
        state: impl Collector,
    ) -> Self {
        let mut registry = Registry::default();
        let write_latency = Histogram::new(WRITE_BUCKETS);
        registry.register(
            "clb_write_duration_seconds",
            "Time from a write request to its acknowledgement, as seen by this node",
            write_latency.clone(),
        );
        for (name, help, counter) in counters {
            registry.register(name, help, counter);
        }
        registry.register_collector(Box::new(state));
        Metrics {
            registry,
            write_latency,
        }
    }

    /// Records one write's latency as its client saw it.
    pub fn observe_write(&self, took: Duration) {
        self.write_latency.observe(took.as_secs_f64());
    }

    fn encode(&self) -> Result<String, fmt::Error> {
        let mut out = String::new();
        prometheus_text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// `GET /metrics`. The classic text format rather than OpenMetrics: it is
/// what this endpoint always served, every Prometheus reads it, and nothing
/// here needs OpenMetrics' additions (exemplars, units, `_created`).
pub(super) async fn scrape(State(state): State<AppState>) -> Response {
    match state.metrics.encode() {
        Ok(text) => (
            [(header::CONTENT_TYPE, prometheus_text::CONTENT_TYPE)],
            text,
        )
            .into_response(),
        Err(fmt::Error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding the metrics failed",
        )
            .into_response(),
    }
}

/// The counters consensus keeps, with their names and help texts: without
/// `_total` and without the full stop, which the registry adds.
fn consensus_counters(
    forwarded: &Counter,
    acks: &Acks,
    l: &Liveness,
) -> [(&'static str, &'static str, Counter); 8] {
    [
        (
            "clb_forwarded_requests",
            "Requests this node forwarded to the leader",
            forwarded,
        ),
        (
            "clb_append_late_answers",
            "Append answers that came after openraft stopped waiting (they still count for the lease)",
            &acks.late_answers,
        ),
        (
            "clb_append_abandoned",
            "Appends openraft gave up on before they were sent",
            &acks.abandoned,
        ),
        (
            "clb_prevotes_refused",
            "Pre-votes this node refused as a voter",
            &l.prevotes_refused,
        ),
        (
            "clb_prevotes_granted",
            "Pre-votes this node granted as a voter",
            &l.prevotes_granted,
        ),
        (
            "clb_votes_refused",
            "Votes refused while the leader was alive or this node might hold the VIP",
            &l.votes_refused,
        ),
        (
            "clb_prevote_rounds_lost",
            "Pre-vote rounds this node lost: it heard no leader, the others did",
            &l.prevote_rounds_lost,
        ),
        (
            "clb_elections_started",
            "Elections this node started after winning a pre-vote",
            &l.elections,
        ),
    ]
    .map(|(name, help, c)| (name, help, c.clone()))
}

/// Where [`NodeState`] is read from at each scrape.
struct Sources {
    consensus: Consensus,
    /// `None` on a witness, which renders nothing.
    render: Option<watch::Receiver<RenderStatus>>,
    failover: Failover,
    bgp: Option<crate::bgp::Bgp>,
}

impl fmt::Debug for Sources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sources").finish_non_exhaustive()
    }
}

impl Collector for Sources {
    fn encode(&self, encoder: DescriptorEncoder) -> fmt::Result {
        NodeState::read(self).encode(encoder)
    }
}

/// The state the gauges mirror, as one scrape reads it: each source is read
/// once, so the series taken from it agree with each other.
#[derive(Debug, Default)]
struct NodeState {
    node_id: NodeId,
    term: u64,
    leader: Option<NodeId>,
    last_log_index: u64,
    applied_index: u64,
    commit_index: u64,
    registry: Arc<model::Registry>,
    peers_up: Vec<(NodeId, bool)>,
    render: Option<RenderStatus>,
    vip: VipStatus,
    bgp: Option<crate::bgp::BgpStatus>,
}

impl NodeState {
    fn read(s: &Sources) -> Self {
        let c = &s.consensus;
        let m = c.raft.metrics().borrow().clone();
        let applied = c.applied();
        NodeState {
            node_id: c.id,
            term: m.current_term,
            leader: m.current_leader,
            last_log_index: m.last_log_index.unwrap_or(0),
            applied_index: applied.index,
            commit_index: c.commit_index(),
            registry: applied.registry.clone(),
            peers_up: c.acks().peers_up(),
            render: s.render.as_ref().map(|r| r.borrow().clone()),
            vip: s.failover.status(),
            bgp: s.bgp.as_ref().map(|b| b.status()),
        }
    }
}

impl Collector for NodeState {
    fn encode(&self, mut e: DescriptorEncoder) -> fmt::Result {
        gauge(&mut e, "clb_raft_term", "Current Raft term.", self.term)?;
        gauge(
            &mut e,
            "clb_raft_leader",
            "Node id of the known leader, 0 when none.",
            self.leader.unwrap_or(0),
        )?;
        gauge(
            &mut e,
            "clb_raft_is_leader",
            "1 when this node is the leader.",
            flag(self.leader == Some(self.node_id)),
        )?;
        gauge(
            &mut e,
            "clb_raft_last_log_index",
            "Last log index on this node.",
            self.last_log_index,
        )?;
        gauge(
            &mut e,
            "clb_raft_applied_index",
            "Last applied log index on this node.",
            self.applied_index,
        )?;
        let mut members = e.encode_descriptor(
            "clb_members",
            "Registered members per service and state.",
            None,
            MetricType::Gauge,
        )?;
        for (name, svc) in &self.registry.services {
            for st in [MemberState::Active, MemberState::Drain, MemberState::Maint] {
                let n = svc.members.values().filter(|m| m.state == st).count();
                let labels = [("service", name.to_string()), ("state", st.to_string())];
                ConstGauge::new(n as u64).encode(members.encode_family(&labels)?)?;
            }
        }
        if let Some(r) = &self.render {
            render(&mut e, r)?;
        }
        gauge(
            &mut e,
            "clb_raft_commit_index",
            "Highest index a quorum has (the leader's view; applied index elsewhere).",
            self.commit_index,
        )?;
        let mut peer_up = e.encode_descriptor(
            "clb_peer_up",
            "1 while a peer answers this leader's appends.",
            None,
            MetricType::Gauge,
        )?;
        for (peer, up) in &self.peers_up {
            ConstGauge::new(flag(*up)).encode(peer_up.encode_family(&[("peer", *peer)])?)?;
        }
        if let Some(b) = &self.bgp {
            bgp(&mut e, b)?;
        }
        vip(&mut e, &self.vip)
    }
}

fn render(e: &mut DescriptorEncoder, r: &RenderStatus) -> fmt::Result {
    counter(
        e,
        "clb_render_renders",
        "Configs rendered, validated and installed.",
        r.renders,
    )?;
    counter(
        e,
        "clb_render_validate_failures",
        "Rendered configs haproxy rejected.",
        r.validate_failures,
    )?;
    counter(
        e,
        "clb_render_runtime_applies",
        "Changes applied through the runtime API.",
        r.runtime_applies,
    )?;
    counter(e, "clb_render_reloads", "haproxy reloads.", r.reloads)?;
    counter(
        e,
        "clb_render_apply_failures",
        "Failed applies (runtime API or reload).",
        r.apply_failures,
    )?;
    gauge(
        e,
        "clb_render_rendered_index",
        "Registry index of the config on disk.",
        r.rendered_index,
    )?;
    gauge(
        e,
        "clb_render_applied_index",
        "Registry index haproxy runs.",
        r.applied_index,
    )?;
    gauge(
        e,
        "clb_render_ok",
        "1 when the last render and apply succeeded.",
        flag(r.last_error.is_none()),
    )?;
    gauge(
        e,
        "clb_render_last_render_seconds",
        "Duration of the last render.",
        r.last_render_ms / 1e3,
    )?;
    gauge(
        e,
        "clb_render_last_validate_seconds",
        "Duration of the last write and validation.",
        r.last_validate_ms / 1e3,
    )?;
    gauge(
        e,
        "clb_render_last_apply_seconds",
        "Duration of the last apply.",
        r.last_apply_ms / 1e3,
    )
}

/// `--vip-mode bgp` only: absent series mean arp mode, not "withdrawn".
fn bgp(e: &mut DescriptorEncoder, b: &crate::bgp::BgpStatus) -> fmt::Result {
    gauge(
        e,
        "clb_bgp_announced",
        "1 while BIRD announces the VIP from this balancer.",
        flag(b.announced),
    )?;
    gauge(
        e,
        "clb_bgp_session_up",
        "1 while the BGP session to the router is established.",
        flag(b.session_up),
    )?;
    gauge(
        e,
        "clb_bgp_bfd_up",
        "1 while BFD towards the router is up.",
        flag(b.bfd == "Up"),
    )?;
    gauge(
        e,
        "clb_bgp_drained",
        "1 while an operator keeps this balancer drained.",
        flag(b.drained),
    )?;
    gauge(
        e,
        "clb_haproxy_connections",
        "Connections open on this balancer's haproxy.",
        b.connections,
    )?;
    counter(
        e,
        "clb_bgp_withdrawals",
        "Times this balancer withdrew the VIP.",
        b.withdrawals,
    )?;
    counter(
        e,
        "clb_bgp_drains_cut",
        "Withdrawals that left requests open (the drain timed out).",
        b.drains_cut,
    )
}

fn vip(e: &mut DescriptorEncoder, v: &VipStatus) -> fmt::Result {
    gauge(
        e,
        "clb_vip_configured",
        "1 when this node has a VIP and hook.",
        flag(v.vip.is_some()),
    )?;
    gauge(
        e,
        "clb_vip_held",
        "1 while this node holds the VIP.",
        flag(v.held),
    )?;
    gauge(
        e,
        "clb_vip_wanted",
        "1 while this node is leader with a valid quorum lease.",
        flag(v.wanted),
    )?;
    gauge(
        e,
        "clb_vip_held_term",
        "Raft term of the held claim, 0 when not held.",
        v.held_term.unwrap_or(0),
    )?;
    gauge(
        e,
        "clb_node_healthy",
        "1 when this node is fit to lead.",
        flag(v.healthy),
    )?;
    counter(
        e,
        "clb_vip_lease_expiries",
        "Releases because the quorum lease ran out.",
        v.lease_expiries,
    )?;
    counter(
        e,
        "clb_leader_handovers",
        "Leadership hand-overs started by this node.",
        v.handovers,
    )?;
    counter(
        e,
        "clb_vip_drains",
        "Drains of open requests before a planned release.",
        v.drains,
    )?;
    counter(
        e,
        "clb_vip_drains_cut",
        "Drains that released with requests still open or could not hold new connections.",
        v.drains_cut,
    )?;
    let mut runs = e.encode_descriptor(
        "clb_vip_hook_runs",
        "VIP hook runs by action and result.",
        None,
        MetricType::Counter,
    )?;
    for (action, result, n) in [
        ("claim", "ok", v.claims_ok),
        ("claim", "error", v.claims_failed),
        ("release", "ok", v.releases_ok),
        ("release", "error", v.releases_failed),
    ] {
        let labels = [("action", action), ("result", result)];
        ConstCounter::new(n).encode(runs.encode_family(&labels)?)?;
    }
    // No run yet counts as fine: nothing has failed.
    let last_ok = v.last_hook.as_ref().is_none_or(|h| h.ok);
    gauge(
        e,
        "clb_vip_hook_last_ok",
        "0 when the last VIP hook run failed.",
        flag(last_ok),
    )
}

fn flag(b: bool) -> u64 {
    u64::from(b)
}

/// One unlabelled gauge. Unlike `Registry::register`, the descriptor takes
/// help texts as they are, full stop included.
fn gauge(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: impl EncodeGaugeValue,
) -> fmt::Result {
    ConstGauge::new(value).encode(e.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

/// One unlabelled counter; `name` without `_total`, which the encoder adds.
fn counter(e: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> fmt::Result {
    ConstCounter::new(value).encode(e.encode_descriptor(name, help, None, MetricType::Counter)?)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;
    use crate::consensus::acks::Acks;
    use crate::consensus::elect::Liveness;
    use crate::failover::{Action, HookOutcome};
    use crate::model::Command;

    /// Every family /metrics exports and its type: the names the rules,
    /// the dashboard and the docs rely on.
    const FAMILIES: &[(&str, &str)] = &[
        ("clb_raft_term", "gauge"),
        ("clb_raft_leader", "gauge"),
        ("clb_raft_is_leader", "gauge"),
        ("clb_raft_last_log_index", "gauge"),
        ("clb_raft_applied_index", "gauge"),
        ("clb_raft_commit_index", "gauge"),
        ("clb_members", "gauge"),
        ("clb_render_renders_total", "counter"),
        ("clb_render_validate_failures_total", "counter"),
        ("clb_render_runtime_applies_total", "counter"),
        ("clb_render_reloads_total", "counter"),
        ("clb_render_apply_failures_total", "counter"),
        ("clb_render_rendered_index", "gauge"),
        ("clb_render_applied_index", "gauge"),
        ("clb_render_ok", "gauge"),
        ("clb_render_last_render_seconds", "gauge"),
        ("clb_render_last_validate_seconds", "gauge"),
        ("clb_render_last_apply_seconds", "gauge"),
        ("clb_forwarded_requests_total", "counter"),
        ("clb_peer_up", "gauge"),
        ("clb_append_late_answers_total", "counter"),
        ("clb_append_abandoned_total", "counter"),
        ("clb_prevotes_refused_total", "counter"),
        ("clb_prevotes_granted_total", "counter"),
        ("clb_votes_refused_total", "counter"),
        ("clb_prevote_rounds_lost_total", "counter"),
        ("clb_elections_started_total", "counter"),
        ("clb_write_duration_seconds", "histogram"),
        ("clb_vip_configured", "gauge"),
        ("clb_vip_held", "gauge"),
        ("clb_vip_wanted", "gauge"),
        ("clb_vip_held_term", "gauge"),
        ("clb_node_healthy", "gauge"),
        ("clb_vip_lease_expiries_total", "counter"),
        ("clb_leader_handovers_total", "counter"),
        ("clb_vip_drains_total", "counter"),
        ("clb_vip_drains_cut_total", "counter"),
        ("clb_vip_hook_runs_total", "counter"),
        ("clb_vip_hook_last_ok", "gauge"),
    ];

    #[derive(Debug, Default)]
    struct Family {
        kind: String,
        /// Series (name and labels, as written) and value, in order.
        samples: Vec<(String, f64)>,
    }

    /// Parses the text format strictly: HELP then TYPE for each family,
    /// declared once, and every sample under the family it belongs to.
    fn parse(text: &str) -> BTreeMap<String, Family> {
        let mut families: BTreeMap<String, Family> = BTreeMap::new();
        let mut current: Option<String> = None;
        let mut lines = text.lines();
        while let Some(line) = lines.next() {
            if let Some(help) = line.strip_prefix("# HELP ") {
                let (name, help) = help.split_once(' ').expect("HELP name text");
                assert!(help.ends_with('.') && !help.ends_with(".."), "{line}");
                let ty = lines.next().expect("TYPE after HELP");
                let kind = ty
                    .strip_prefix(&format!("# TYPE {name} "))
                    .unwrap_or_else(|| panic!("HELP {name} not followed by its TYPE: {ty}"));
                assert!(["counter", "gauge", "histogram"].contains(&kind), "{ty}");
                if kind == "counter" {
                    assert!(name.ends_with("_total"), "counter {name}");
                }
                let new = families.insert(
                    name.to_string(),
                    Family {
                        kind: kind.to_string(),
                        samples: vec![],
                    },
                );
                assert!(new.is_none(), "{name} declared twice");
                current = Some(name.to_string());
                continue;
            }
            assert!(!line.starts_with('#'), "unexpected comment: {line}");
            let (series, value) = line.rsplit_once(' ').expect("series value");
            let value: f64 = value.parse().unwrap_or_else(|_| panic!("{line}"));
            let sample = series.split('{').next().unwrap();
            let family = current.as_ref().unwrap_or_else(|| panic!("{line}"));
            let f = families.get_mut(family).unwrap();
            let ok = match f.kind.as_str() {
                "histogram" => ["_bucket", "_sum", "_count"]
                    .iter()
                    .any(|s| sample == format!("{family}{s}")),
                _ => sample == family,
            };
            assert!(ok, "{line} is not part of {family}");
            f.samples.push((series.to_string(), value));
        }
        families
    }

    fn member(service: &str, member: &str) -> Command {
        model::register_for_test(service, member, "10.0.0.1")
    }

    #[test]
    fn every_family_has_help_and_type_and_histogram_buckets_are_cumulative() {
        let mut registry = model::Registry::default();
        registry.apply(&member("http", "web1"));
        registry.apply(&member("http", "web2"));
        let state = NodeState {
            node_id: 1,
            term: 4,
            leader: Some(1),
            registry: Arc::new(registry),
            peers_up: vec![(2, true), (3, false)],
            render: Some(RenderStatus {
                renders: 3,
                last_error: Some("apply: refused".into()),
                last_render_ms: 1.5,
                ..Default::default()
            }),
            vip: VipStatus {
                vip: Some("192.0.2.10".into()),
                claims_ok: 2,
                releases_failed: 1,
                last_hook: Some(HookOutcome {
                    action: Action::Release,
                    term: 3,
                    ok: false,
                    error: Some("exit 1".into()),
                    note: None,
                    at_ms: 0,
                    took_ms: 0,
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let (forwarded, acks, liveness) =
            (Counter::default(), Acks::default(), Liveness::new(false));
        let metrics = Metrics::build(consensus_counters(&forwarded, &acks, &liveness), state);
        forwarded.inc();
        liveness.elections.inc();
        for ms in [0.3, 3.0, 30.0, 3000.0] {
            metrics.observe_write(Duration::from_secs_f64(ms / 1e3));
        }
        let text = metrics.encode().unwrap();
        let families = parse(&text);

        // Exactly the families of the contract, each with its type.
        let want: BTreeSet<(&str, &str)> = FAMILIES.iter().copied().collect();
        let got: BTreeSet<(&str, &str)> = families
            .iter()
            .map(|(name, f)| (name.as_str(), f.kind.as_str()))
            .collect();
        assert_eq!(got, want, "{text}");

        let value = |series: &str| {
            families
                .values()
                .flat_map(|f| &f.samples)
                .find(|(s, _)| s == series)
                .unwrap_or_else(|| panic!("{series} missing:\n{text}"))
                .1
        };
        assert_eq!(value("clb_forwarded_requests_total"), 1.0);
        assert_eq!(value("clb_elections_started_total"), 1.0);
        assert_eq!(value("clb_votes_refused_total"), 0.0);
        assert_eq!(value("clb_raft_is_leader"), 1.0);
        assert_eq!(value("clb_members{service=\"http\",state=\"active\"}"), 2.0);
        assert_eq!(value("clb_members{service=\"http\",state=\"maint\"}"), 0.0);
        assert_eq!(value("clb_peer_up{peer=\"3\"}"), 0.0);
        assert_eq!(value("clb_render_renders_total"), 3.0);
        assert_eq!(value("clb_render_ok"), 0.0);
        assert_eq!(value("clb_render_last_render_seconds"), 0.0015);
        assert_eq!(
            value("clb_vip_hook_runs_total{action=\"claim\",result=\"ok\"}"),
            2.0
        );
        assert_eq!(
            value("clb_vip_hook_runs_total{action=\"release\",result=\"error\"}"),
            1.0
        );
        assert_eq!(value("clb_vip_hook_last_ok"), 0.0);
        assert_eq!(value("clb_vip_configured"), 1.0);

        // Buckets: today's bounds in order, then +Inf, counts cumulative.
        let h = &families["clb_write_duration_seconds"].samples;
        let buckets: Vec<(String, f64)> = h
            .iter()
            .filter_map(|(s, v)| {
                let le = s.strip_prefix("clb_write_duration_seconds_bucket{le=\"")?;
                Some((le.trim_end_matches("\"}").to_string(), *v))
            })
            .collect();
        let mut bounds: Vec<String> = WRITE_BUCKETS.iter().map(|b| b.to_string()).collect();
        bounds.push("+Inf".into());
        assert_eq!(
            buckets.iter().map(|(le, _)| le.clone()).collect::<Vec<_>>(),
            bounds
        );
        assert!(
            buckets.windows(2).all(|w| w[0].1 <= w[1].1),
            "not cumulative: {buckets:?}"
        );
        let at = |le: &str| buckets.iter().find(|(b, _)| b == le).unwrap().1;
        assert_eq!(
            [
                at("0.0005"),
                at("0.002"),
                at("0.005"),
                at("0.05"),
                at("2.5"),
                at("5")
            ],
            [1.0, 1.0, 2.0, 3.0, 3.0, 4.0]
        );
        assert_eq!(at("+Inf"), value("clb_write_duration_seconds_count"));
        assert_eq!(value("clb_write_duration_seconds_count"), 4.0);
        assert!((value("clb_write_duration_seconds_sum") - 3.0333).abs() < 1e-9);
    }
}
