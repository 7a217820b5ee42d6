//! The JSON contract of HTTP API v1: every request body and answer, defined
//! once. The API builds these, the client returns them, and the CLI tables,
//! `/ui`, `clb demo` and the tests read their fields, so a renamed field is
//! a compile error rather than a `null` at run time.
//!
//! Answers that cross between nodes of different versions during a rolling
//! upgrade ([`NodeView`] for `/v1/cluster`) take defaults for fields they do
//! not know, so an older peer shows up with blanks rather than as
//! unreachable.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::consensus::{NodeId, Role};
use crate::failover::{HookOutcome, VipStatus};
use crate::model::{
    AuditEntry, Balance, Check, Members, Mode, Registry, ServerOptions, ServiceDef,
};
use crate::render::stat;
use crate::render::RenderStatus;
use crate::timeline::Event;

/// `PUT`/`DELETE` of members, services, nodes, tokens: the log index the
/// change was committed at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Written {
    pub index: u64,
}

/// `PUT /v1/services/{service}/members/{member}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterBody {
    pub address: String,
    /// Wider than the field so an out-of-range value gets the field-level
    /// 400 of the validation rather than a parse error.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_s: Option<u32>,
}

/// `PUT .../members/{member}/state`: `active`, `drain` or `maint`; text so
/// a bad value gets the field-level 400 of the validation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateBody {
    pub state: String,
}

/// `PUT .../members/{member}/renew`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Renewed {
    pub renewed: bool,
}

/// `PUT /v1/services/{service}`: unset fields take their defaults
/// (`member_port`: `port`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceBody {
    /// Wider than a port so an out-of-range value gets the field-level 400.
    pub port: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member_port: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<Mode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balance: Option<Balance>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check: Option<Check>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerOptions>,
}

/// One service: its definition and its members.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceView {
    #[serde(flatten)]
    pub def: ServiceDef,
    /// Shares its nodes with the registry it was read from: answering a
    /// read of a large service copies no member.
    pub members: Members,
}

/// `GET /v1/services`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicesView {
    /// The registry index the answer was read at.
    pub index: u64,
    pub services: BTreeMap<String, ServiceView>,
}

/// `GET /v1/services/{service}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OneServiceView {
    pub index: u64,
    pub service: String,
    pub definition: ServiceView,
}

/// Raft's state of a node, as openraft names it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RaftState {
    Leader,
    Follower,
    Candidate,
    Learner,
    Shutdown,
    /// A peer of a newer version said something this one does not know.
    #[default]
    #[serde(other)]
    Unknown,
}

impl RaftState {
    pub fn as_str(self) -> &'static str {
        match self {
            RaftState::Leader => "leader",
            RaftState::Follower => "follower",
            RaftState::Candidate => "candidate",
            RaftState::Learner => "learner",
            RaftState::Shutdown => "shutdown",
            RaftState::Unknown => "unknown",
        }
    }
}

impl From<openraft::ServerState> for RaftState {
    fn from(s: openraft::ServerState) -> Self {
        match s {
            openraft::ServerState::Leader => RaftState::Leader,
            openraft::ServerState::Follower => RaftState::Follower,
            openraft::ServerState::Candidate => RaftState::Candidate,
            openraft::ServerState::Learner => RaftState::Learner,
            openraft::ServerState::Shutdown => RaftState::Shutdown,
        }
    }
}

/// One node's own state (`/raft/node`): what `/v1/cluster` collects from
/// every node. Only `node_id` is required, so an error body never reads as
/// a view.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeView {
    pub node_id: NodeId,
    #[serde(default)]
    pub role: Option<Role>,
    #[serde(default)]
    pub advertise: String,
    #[serde(default)]
    pub state: RaftState,
    #[serde(default)]
    pub term: u64,
    #[serde(default)]
    pub leader: Option<NodeId>,
    #[serde(default)]
    pub applied_index: u64,
    #[serde(default)]
    pub vip_held: bool,
    /// Its health gate passes (`--health-cmd`, haproxy running its config).
    #[serde(default = "yes")]
    pub healthy: bool,
    /// Whether this node would take over now: false on a witness and while
    /// its health gate fails (haproxy not yet running its config).
    #[serde(default)]
    pub may_campaign: bool,
    #[serde(default)]
    pub health_reason: String,
    /// `None` on a witness.
    #[serde(default)]
    pub render: Option<RenderStatus>,
    /// What haproxy's checks say (`None` on a witness or before the first
    /// poll).
    #[serde(default)]
    pub haproxy: Option<Arc<stat::Snapshot>>,
    /// What happened here lately, oldest first.
    #[serde(default)]
    pub timeline: Vec<Event>,
    /// `--vip-mode bgp`: whether this balancer announces the VIP, and why
    /// not; `None` in arp mode and on a witness.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bgp: Option<crate::bgp::BgpStatus>,
}

fn yes() -> bool {
    true
}

/// A node's entry in [`ClusterView::node_status`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum NodeStatus {
    /// Checked first: a [`NodeView`] never has an `error` field.
    Unreachable {
        error: String,
    },
    Up(Box<NodeView>),
}

impl NodeStatus {
    pub fn up(&self) -> Option<&NodeView> {
        match self {
            NodeStatus::Up(v) => Some(v),
            NodeStatus::Unreachable { .. } => None,
        }
    }
}

/// `GET /v1/cluster`: the cluster as the answering node sees it, and every
/// node's own [`NodeView`]. Only `node_id` is required, as in [`NodeView`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterView {
    /// The node that answered.
    pub node_id: NodeId,
    #[serde(default)]
    pub role: Option<Role>,
    #[serde(default)]
    pub advertise: String,
    #[serde(default)]
    pub cluster_id: String,
    #[serde(default)]
    pub state: RaftState,
    #[serde(default)]
    pub leader: Option<NodeId>,
    #[serde(default)]
    pub term: u64,
    #[serde(default)]
    pub voters: Vec<NodeId>,
    #[serde(default)]
    pub learners: Vec<NodeId>,
    /// Peer address of every member of the configuration.
    #[serde(default)]
    pub nodes: BTreeMap<NodeId, String>,
    #[serde(default)]
    pub applied_index: u64,
    #[serde(default)]
    pub last_log_index: Option<u64>,
    /// The last log index this node purged after a snapshot: a follower
    /// behind it catches up by snapshot, not by log entries.
    #[serde(default)]
    pub purged_index: Option<u64>,
    #[serde(default)]
    pub millis_since_quorum_ack: Option<u64>,
    /// Members in the registry.
    #[serde(default)]
    pub members: u64,
    /// The node this one believes holds the VIP.
    #[serde(default)]
    pub vip_holder: Option<NodeId>,
    /// This node's VIP state.
    #[serde(default)]
    pub vip: VipStatus,
    #[serde(default)]
    pub node_status: BTreeMap<NodeId, NodeStatus>,
    /// The encoding this node speaks to each peer it has called: `legacy`
    /// (a peer of the release before postcard, during a rolling upgrade) or
    /// `v1`.
    #[serde(default)]
    pub peer_codecs: BTreeMap<NodeId, String>,
}

impl ClusterView {
    /// The status of node `id`, if it answered.
    pub fn node(&self, id: NodeId) -> Option<&NodeView> {
        self.node_status.get(&id).and_then(NodeStatus::up)
    }
}

/// `GET /healthz`: no token needed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Healthz {
    pub ok: bool,
    pub node_id: NodeId,
    pub leader: Option<NodeId>,
    pub vip_held: bool,
}

/// `POST /v1/cluster/nodes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddNodeBody {
    pub id: NodeId,
    pub addr: String,
    #[serde(default)]
    pub learner: bool,
}

/// `POST /v1/cluster/failover`: where leadership and the VIP went.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FailoverView {
    pub from: NodeId,
    pub term: u64,
    pub new_leader: NodeId,
    pub new_term: u64,
    pub leader_took_ms: u64,
    pub vip_configured: bool,
    /// The new leader, once it reported holding the VIP (within 10 s).
    pub vip_holder: Option<NodeId>,
    pub vip_took_ms: Option<u64>,
    /// The old leader's release.
    pub release: Option<HookOutcome>,
}

/// `POST /v1/tokens`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBody {
    /// `read`, `admin`, `register:SERVICE`.
    pub scope: String,
    /// `90d`, `12h`, `30m`, `45s`; none: no expiry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// The answer to `POST /v1/tokens`: the secret is shown once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCreated {
    pub index: u64,
    pub id: String,
    pub secret: String,
    pub name: String,
    pub scope: String,
    pub expires_at_ms: Option<u64>,
}

/// One token in `GET /v1/tokens` (never its hash).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    pub scope: String,
    pub created_at_ms: u64,
    pub created_by: String,
    pub expires_at_ms: Option<u64>,
}

/// `GET /v1/tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tokens {
    pub index: u64,
    pub tokens: Vec<TokenInfo>,
}

/// `GET /v1/audit` query.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<String>,
    /// Milliseconds since the Unix epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<usize>,
}

/// `GET /v1/audit`: oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Audit {
    pub entries: Vec<AuditEntry>,
}

/// The format `clb snapshot save` writes and `clbd --restore` reads.
pub const BACKUP_FORMAT: &str = "clb-snapshot-1";

/// `GET /v1/snapshot`, as `clb snapshot save` writes it: a linearizable copy
/// of the registry and tokens (hashes only).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backup {
    /// [`BACKUP_FORMAT`].
    pub format: String,
    pub index: u64,
    pub registry: Registry,
}

/// The body of every 4xx and 5xx answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
    /// `null` when the message says it all.
    #[serde(default)]
    pub detail: Option<ErrorDetail>,
}

impl ErrorBody {
    /// Whether trying again may succeed; `None` when the answer does not say.
    pub fn retryable(&self) -> Option<bool> {
        self.detail.as_ref().and_then(ErrorDetail::retryable)
    }
}

impl ErrorDetail {
    pub fn retryable(&self) -> Option<bool> {
        match self {
            ErrorDetail::Situation { retryable, .. } => Some(*retryable),
            ErrorDetail::Field { .. } => None,
        }
    }
}

/// What was wrong, for a program to act on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ErrorDetail {
    /// A bad request field (400).
    Field { field: String, reason: String },
    /// The cluster could not do it now (503, 500): whether to try again.
    Situation { retryable: bool, situation: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_node_and_an_older_peer_both_parse() {
        let s: NodeStatus = serde_json::from_str(r#"{"error": "unreachable: refused"}"#).unwrap();
        assert_eq!(
            s,
            NodeStatus::Unreachable {
                error: "unreachable: refused".into()
            }
        );
        // An error body is not a view.
        assert!(serde_json::from_str::<ClusterView>(r#"{"error": "x", "detail": null}"#).is_err());
        assert!(serde_json::from_str::<NodeView>(r#"{"error": "x"}"#).is_err());
        // A peer that knows fewer fields, and a Raft state this one does not.
        let s: NodeStatus =
            serde_json::from_str(r#"{"node_id": 3, "state": "observer", "term": 7}"#).unwrap();
        let v = s.up().expect("a node view");
        assert_eq!((v.node_id, v.term, v.state), (3, 7, RaftState::Unknown));
    }

    #[test]
    fn a_cluster_view_round_trips_with_numeric_node_keys() {
        let mut view = ClusterView {
            node_id: 1,
            leader: Some(2),
            voters: vec![1, 2],
            ..Default::default()
        };
        view.nodes.insert(2, "127.0.0.1:9".into());
        view.node_status.insert(
            2,
            NodeStatus::Up(Box::new(NodeView {
                node_id: 2,
                state: RaftState::Leader,
                ..Default::default()
            })),
        );
        let text = serde_json::to_string(&view).unwrap();
        assert!(text.contains(r#""nodes":{"2":"127.0.0.1:9"}"#), "{text}");
        assert!(text.contains(r#""state":"leader""#), "{text}");
        let back: ClusterView = serde_json::from_str(&text).unwrap();
        assert_eq!(back, view);
        assert_eq!(back.node(2).map(|n| n.state), Some(RaftState::Leader));
    }

    #[test]
    fn a_service_view_keeps_the_definition_flat() {
        let text = r#"{"port": 80, "member_port": 8080, "members": {}}"#;
        let v: ServiceView = serde_json::from_str(text).unwrap();
        assert_eq!((v.def.port, v.def.member_port), (80, 8080));
        let again = serde_json::to_value(&v).unwrap();
        assert_eq!(again["port"], 80);
    }
}
