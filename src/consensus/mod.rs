//! Raft: openraft type configuration, the sled log store and state machine,
//! the HTTP peer transport, and [`Consensus`], the handle the rest of clb
//! uses to write (from any node) and to read linearizably.

pub mod acks;
pub mod batch;
pub mod elect;
pub mod heartbeat;
pub mod incarnation;
pub mod leader;
pub mod network;
pub mod rpc;
mod snapshot_file;
pub mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Cursor;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{CheckIsLeaderError, ClientWriteError, InitializeError, RaftError};
use openraft::{BasicNode, ChangeMembers, ServerState};
use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::auth::Scope;
use crate::model::{Command, Proposal, Response};
use network::{CallError, Network, PeerClient};
pub use store::Applied;

openraft::declare_raft_types!(
    /// clb's Raft types: registry commands in, apply outcomes out.
    pub TypeConfig:
        D = Proposal,
        R = Response,
        NodeId = NodeId,
        Node = openraft::BasicNode,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type NodeId = u64;
pub type Raft = openraft::Raft<TypeConfig>;
pub type LogId = openraft::LogId<NodeId>;
pub type StorageError = openraft::StorageError<NodeId>;

/// How a node finds its cluster on first start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bootstrap {
    /// A cluster of this node alone (the embedded default).
    Single { addr: String },
    /// The `--peers` set; identical on every node, so every node may initialize.
    Peers(BTreeMap<NodeId, String>),
    /// Wait to be added by `clb cluster add`.
    Join,
}

/// What a node is for: a balancer renders haproxy and may hold the VIP; a
/// witness only votes and stores, and leads only when no balancer can.
/// (Here, below api and config, which both use it.)
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Balancer,
    Witness,
}

impl Role {
    /// The name the API and `--role` use.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Balancer => "balancer",
            Role::Witness => "witness",
        }
    }
}

/// Timers and role for the Raft instance.
#[derive(Debug, Clone)]
pub struct RaftSettings {
    pub heartbeat_ms: u64,
    pub election_timeout_min_ms: u64,
    pub election_timeout_max_ms: u64,
    /// False for a witness: it campaigns only when failover allows it.
    pub elect: bool,
    /// How long a write waits for a leader before answering 503.
    pub forward_timeout: Duration,
    /// `Some`: peers serve HTTPS and are called over it.
    pub peer_tls: Option<network::PeerTls>,
    /// `Some`: every peer RPC must carry it, and ours do.
    pub cluster_secret: Option<String>,
    pub guardrail: leader::Guardrail,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("open data dir {dir}: {source}")]
    OpenStore {
        dir: String,
        source: store::StoreError,
    },
    #[error("data dir {dir} belongs to node {stored}, not --node-id {given}")]
    WrongNode {
        dir: String,
        stored: String,
        given: NodeId,
    },
    #[error("data dir {dir} belongs to cluster {stored}, but --peers describe cluster {given}; keep --peers as they were at first start, or use a fresh data dir")]
    WrongCluster {
        dir: String,
        stored: String,
        given: String,
    },
    #[error("--node-id {0} is not in --peers")]
    NotInPeers(NodeId),
    #[error("data dir {dir} is new, but {peer} knows node {id} from before ({why}); a voter that lost its data must not vote. Remove it (`clb cluster remove {id}`), then start it with --join and add it back (`clb cluster add {id} ADDR`)")]
    Replaced {
        dir: String,
        id: NodeId,
        peer: String,
        why: String,
    },
    #[error("raft config: {0}")]
    Config(String),
    #[error("start raft: {0}")]
    Raft(String),
}

/// Why a write, read or membership change did not happen.
#[derive(Debug, Clone, thiserror::Error, Serialize, Deserialize)]
pub enum ConsensusError {
    /// Retryable: no leader, leader unreachable, or no quorum.
    #[error("{0}")]
    Unavailable(String),
    /// The write may or may not have been applied (the leader went away mid-call).
    #[error("outcome unknown: {0}")]
    Unknown(String),
    /// The request itself cannot succeed (for example an invalid membership change).
    #[error("{0}")]
    Rejected(String),
}

/// What only the leader can do; followers forward these over `/raft/leader`.
/// (One per request and moved, never stored: a boxed write would only add
/// an allocation.)
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum LeaderRequest {
    /// A write, and the scope of the token that asked for it: the leader
    /// checks both again, whichever node took the request.
    Write {
        proposal: Proposal,
        scope: Scope,
    },
    ReadIndex,
    AddNode {
        id: NodeId,
        addr: String,
        learner: bool,
    },
    RemoveNode {
        id: NodeId,
    },
    Renew {
        service: String,
        member: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum LeaderReply {
    Written { index: u64, response: Response },
    ReadIndex(u64),
    Membership { index: u64 },
    Renewed(bool),
}

/// A leader's refusal; `NotLeader` and `NoQuorum` are worth retrying.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum LeaderError {
    NotLeader,
    NoQuorum(String),
    Rejected(String),
    Failed(String),
}

/// The part of the Raft node failover uses: who leads, the quorum lease,
/// the VIP state the vote rules read, the election gate, and the peer
/// client for hand-overs. Not the registry: failover never writes or reads it.
#[derive(Clone)]
pub struct Leadership {
    pub raft: Raft,
    pub id: NodeId,
    /// This node's own peer client: the cluster's scheme, CA and secret.
    pub peers: PeerClient,
    /// When a leader was last heard, VIP holding, hand-over target.
    pub liveness: Arc<elect::Liveness>,
    acks: Arc<acks::Acks>,
    allow_elect: Arc<watch::Sender<bool>>,
}

impl Leadership {
    /// Lets the election timer campaign, or stops it (a witness, an
    /// unhealthy balancer, a node handing leadership over).
    pub fn allow_elect(&self, allowed: bool) {
        self.allow_elect.send_if_modified(|a| {
            let changed = *a != allowed;
            *a = allowed;
            changed
        });
    }

    /// The instant from which a quorum is known to follow this node as
    /// leader of the current term, if it leads.
    pub fn quorum_ack(&self, now: Instant) -> Option<(u64, Instant)> {
        quorum_ack(&self.raft, &self.acks, self.id, now)
    }

    /// Each follower's latest ack age in the current term (for a log line).
    pub fn ack_ages(&self, now: Instant) -> String {
        let term = self.raft.metrics().borrow().current_term;
        self.acks.ages(term, now)
    }
}

fn quorum_ack(raft: &Raft, acks: &acks::Acks, id: NodeId, now: Instant) -> Option<(u64, Instant)> {
    let m = raft.metrics().borrow().clone();
    if m.state != ServerState::Leader {
        return None;
    }
    let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
    acks.quorum_ack(m.current_term, &voters, id, now)
        .map(|at| (m.current_term, at))
}

/// An acknowledged write: durable on a quorum and applied on the leader.
#[derive(Debug, Clone)]
pub struct Written {
    pub index: u64,
    pub response: Response,
}

/// The running Raft node and everything needed to use it from any node.
#[derive(Clone)]
pub struct Consensus {
    pub raft: Raft,
    pub id: NodeId,
    applied: watch::Receiver<Arc<Applied>>,
    peers: PeerClient,
    forward_timeout: Duration,
    db: sled::Db,
    leader_state: Arc<leader::LeaderState>,
    /// Requests this node sent on to the leader (exported by /metrics).
    forwarded: Counter,
    /// Batches writes while this node leads.
    proposer: batch::Proposer,
    /// The followers' acks (the quorum lease) and which peers answer.
    acks: Arc<acks::Acks>,
    /// When a leader was last heard, VIP holding, hand-over target.
    liveness: Arc<elect::Liveness>,
    /// Whether the election timer may campaign (failover's health gate).
    allow_elect: Arc<watch::Sender<bool>>,
    /// Timers, for the vote rules.
    election_timeout_max: Duration,
    /// How long a pre-vote answer may wait for this voter's window to close
    /// (elect.rs `prevote_wait`).
    prevote_patience: Duration,
    /// Reads the last log id for pre-votes.
    log: store::LogStore,
}

impl Consensus {
    /// Opens the data dir, checks it belongs to this node and cluster, starts
    /// Raft and initializes the cluster on first start.
    pub async fn start(
        id: NodeId,
        data_dir: &Path,
        bootstrap: Bootstrap,
        settings: &RaftSettings,
    ) -> Result<Self, StartError> {
        let dir = data_dir.display().to_string();
        let stores = store::open(data_dir).map_err(|source| StartError::OpenStore {
            dir: dir.clone(),
            source,
        })?;
        let meta = |key: &str| {
            store::get_meta(&stores.db, key).map_err(|source| StartError::OpenStore {
                dir: dir.clone(),
                source,
            })
        };
        let set_meta = |key: &str, value: &str| {
            store::set_meta(&stores.db, key, value).map_err(|source| StartError::OpenStore {
                dir: dir.clone(),
                source,
            })
        };
        match meta("node_id")? {
            Some(stored) if stored != id.to_string() => {
                return Err(StartError::WrongNode {
                    dir,
                    stored,
                    given: id,
                })
            }
            Some(_) => {}
            None => set_meta("node_id", &id.to_string())?,
        }
        // Created with the data dir; a new one means this node remembers
        // no vote and no log (incarnation.rs).
        // Written before the peers are asked (below), so a crash right after
        // they heard of it reuses it; removed again when a peer refuses it,
        // so the refused data dir stays as new as it was.
        let (incarnation, fresh) =
            match meta("incarnation")?.and_then(|v| u64::from_str_radix(&v, 16).ok()) {
                Some(inc) => (inc, false),
                None => {
                    let inc = rand::random::<u64>();
                    set_meta("incarnation", &format!("{inc:016x}"))?;
                    (inc, true)
                }
            };
        let identity = Arc::new(
            incarnation::Incarnations::load(stores.db.clone(), id, incarnation).map_err(
                |source| StartError::OpenStore {
                    dir: dir.clone(),
                    source,
                },
            )?,
        );
        let stored_cluster = meta("cluster_id")?;
        let cluster_id = match (&bootstrap, stored_cluster) {
            (Bootstrap::Peers(peers), stored) => {
                if !peers.contains_key(&id) {
                    return Err(StartError::NotInPeers(id));
                }
                let given = peers_cluster_id(peers);
                match stored {
                    Some(stored) if stored != given => {
                        return Err(StartError::WrongCluster { dir, stored, given })
                    }
                    _ => given,
                }
            }
            (_, Some(stored)) => stored,
            (Bootstrap::Single { .. }, None) => format!("s-{:016x}", rand::random::<u64>()),
            // Adopted from the first peer that contacts us.
            (Bootstrap::Join, None) => String::new(),
        };
        if !cluster_id.is_empty() {
            set_meta("cluster_id", &cluster_id)?;
        }

        let config = openraft::Config {
            cluster_name: "clb".into(),
            heartbeat_interval: settings.heartbeat_ms,
            election_timeout_min: settings.election_timeout_min_ms,
            election_timeout_max: settings.election_timeout_max_ms,
            // clb's own timer with a pre-vote round elects (elect.rs).
            enable_elect: false,
            // Per chunk, and the last chunk includes the install itself (decode
            // and write the registry: seconds at 100k members on a busy node).
            // A chunk that times out restarts the whole transfer.
            install_snapshot_timeout: 30_000,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(SNAPSHOT_EVERY),
            // Entries, and an entry may hold a batch of writes: keep enough
            // for a follower that lags briefly, not a second copy of the
            // registry.
            max_in_snapshot_log_to_keep: 200,
            purge_batch_size: 256,
            ..Default::default()
        }
        .validate()
        .map_err(|e| StartError::Config(e.to_string()))?;

        let peers = PeerClient::with_tls(cluster_id, settings.peer_tls.as_ref())
            .map_err(|e| StartError::Config(e.to_string()))?
            .with_secret(settings.cluster_secret.clone())
            .with_identity(identity.clone());
        if let (true, Bootstrap::Peers(all)) = (fresh, &bootstrap) {
            if let Err(e) = refuse_if_known(&peers, id, all, &dir).await {
                let _ = store::del_meta(&stores.db, "incarnation");
                return Err(e);
            }
        }
        let applied = stores.sm.subscribe();
        // Whether this node ever voted: only then has it a leader to forget.
        let remembers = {
            use openraft::storage::RaftLogStorage;
            let mut log = stores.log.clone();
            let vote = log.read_vote().await.map_err(|e| StartError::OpenStore {
                dir: dir.clone(),
                source: store::StoreError::Decode {
                    what: "vote".into(),
                    reason: e.to_string(),
                },
            })?;
            vote.is_some_and(|v| v.leader_id.term > 0)
        };
        let acks = Arc::new(acks::Acks::default());
        acks.set_own_window(Duration::from_millis(settings.election_timeout_max_ms));
        let log_reader = stores.log.clone();
        let log = stores.log.clone();
        let raft = Raft::new(
            id,
            Arc::new(config),
            // Appends stay on the wire up to an election timeout (see
            // network::Peer::append); an unreachable peer is retried after
            // half the shortest election timeout, so a restarted peer hears
            // from the leader before it would campaign.
            Network::new(
                peers.clone(),
                Duration::from_millis(settings.election_timeout_max_ms),
                Duration::from_millis((settings.election_timeout_min_ms / 2).max(1)),
                acks.clone(),
            ),
            stores.log,
            stores.sm,
        )
        .await
        .map_err(|e| StartError::Raft(e.to_string()))?;

        let members = match &bootstrap {
            Bootstrap::Single { addr } => Some(BTreeMap::from([(id, addr.clone())])),
            Bootstrap::Peers(peers) => Some(peers.clone()),
            Bootstrap::Join => None,
        };
        let initialized = raft
            .is_initialized()
            .await
            .map_err(|e| StartError::Raft(e.to_string()))?;
        // A witness leads only as a last resort, and openraft's initialize
        // starts an election: it waits for a balancer to initialize the cluster.
        let members = members.filter(|_| settings.elect);
        if let (false, Some(members)) = (initialized, members) {
            let nodes: BTreeMap<NodeId, BasicNode> = members
                .into_iter()
                .map(|(id, addr)| (id, BasicNode { addr }))
                .collect();
            match raft.initialize(nodes).await {
                Ok(()) => tracing::info!("initialized a new cluster"),
                // Another node's identical initialize got here first.
                Err(RaftError::APIError(InitializeError::NotAllowed(e))) => {
                    tracing::info!(reason = %e, "cluster already initialized")
                }
                Err(e) => return Err(StartError::Raft(e.to_string())),
            }
        }
        spawn_compaction(raft.clone(), id, applied.clone());
        spawn_forget_removed(raft.clone(), identity);
        heartbeat::spawn(heartbeat::Pinger {
            raft: raft.clone(),
            id,
            peers: peers.clone(),
            acks: acks.clone(),
            every: Duration::from_millis(settings.heartbeat_ms),
            timeout: Duration::from_millis(settings.election_timeout_max_ms),
        });
        let liveness = Arc::new(elect::Liveness::new(remembers));
        let (allow_elect, allowed) = watch::channel(settings.elect);
        elect::spawn(elect::Elector {
            raft: raft.clone(),
            id,
            peers: peers.clone(),
            liveness: liveness.clone(),
            min: Duration::from_millis(settings.election_timeout_min_ms),
            max: Duration::from_millis(settings.election_timeout_max_ms),
            allowed,
            last_log_id: Box::new(move || log_reader.last_log_id()),
        });
        Ok(Self {
            proposer: batch::Proposer::start(raft.clone()),
            raft,
            id,
            applied,
            peers,
            forward_timeout: settings.forward_timeout,
            db: stores.db,
            leader_state: Arc::new(leader::LeaderState::new(settings.guardrail)),
            forwarded: Counter::default(),
            acks,
            liveness,
            allow_elect: Arc::new(allow_elect),
            election_timeout_max: Duration::from_millis(settings.election_timeout_max_ms),
            prevote_patience: elect::prevote_patience(
                Duration::from_millis(settings.election_timeout_min_ms),
                Duration::from_millis(settings.election_timeout_max_ms),
            ),
            log,
        })
    }

    /// Expires members whose TTL ran out, while this node leads. Runs until
    /// Raft shuts down.
    pub fn spawn_ttl_reaper(&self) {
        let c = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let m = c.raft.metrics().borrow().clone();
                if m.running_state.is_err() {
                    return;
                }
                if m.state != ServerState::Leader {
                    continue;
                }
                let registry = c.applied().registry.clone();
                for (service, member) in
                    c.leader_state
                        .expired(m.current_term, &registry, Instant::now())
                {
                    let proposal = Proposal {
                        cmd: Command::Unregister {
                            service: service.clone(),
                            member: member.clone(),
                        },
                        by: "ttl".into(),
                        at_ms: crate::clock::now_ms(),
                        force: false,
                    };
                    let req = LeaderRequest::Write {
                        proposal,
                        scope: Scope::Admin,
                    };
                    match c.on_leader(req).await {
                        Ok(_) => tracing::info!(%service, %member, "TTL expired: member removed"),
                        Err(e) => {
                            tracing::warn!(%service, %member, cause = ?e, "TTL expired but the member was not removed")
                        }
                    }
                }
            }
        });
    }

    /// Renews a TTL member's lease on the leader (no Raft write). False when
    /// the member does not exist.
    pub async fn renew(&self, service: &str, member: &str) -> Result<bool, ConsensusError> {
        let req = LeaderRequest::Renew {
            service: service.into(),
            member: member.into(),
        };
        match self.to_leader(req).await? {
            LeaderReply::Renewed(found) => Ok(found),
            other => Err(unexpected(other)),
        }
    }

    /// The followers' acks and the peers' state (leader side).
    pub fn acks(&self) -> &Arc<acks::Acks> {
        &self.acks
    }

    /// When a leader was last heard, and what the vote rules need.
    pub fn liveness(&self) -> &Arc<elect::Liveness> {
        &self.liveness
    }

    /// What failover needs of this node (see [`Leadership`]).
    pub fn leadership(&self) -> Leadership {
        Leadership {
            raft: self.raft.clone(),
            id: self.id,
            peers: self.peers.clone(),
            liveness: self.liveness.clone(),
            acks: self.acks.clone(),
            allow_elect: self.allow_elect.clone(),
        }
    }

    /// See [`Leadership::quorum_ack`].
    pub fn quorum_ack(&self, now: Instant) -> Option<(u64, Instant)> {
        quorum_ack(&self.raft, &self.acks, self.id, now)
    }

    /// How long this node refuses votes after hearing from its leader.
    pub fn election_timeout_max(&self) -> Duration {
        self.election_timeout_max
    }

    /// See [`elect::prevote_wait`].
    pub fn prevote_patience(&self) -> Duration {
        self.prevote_patience
    }

    /// What this node weighs when `candidate` asks for a (pre-)vote.
    pub fn voter_view(&self, candidate: NodeId) -> elect::VoterView {
        let last_log_id = self.log.last_log_id();
        let now = Instant::now();
        let window = self.election_timeout_max;
        let m = self.raft.metrics().borrow().clone();
        let leading_with_quorum = self
            .quorum_ack(now)
            .is_some_and(|(_, at)| now.duration_since(at) < window);
        elect::VoterView {
            now,
            // A vote it granted counts like hearing from a leader: the
            // candidate it elected gets its window too.
            last_heard: self.liveness.last_contact(),
            window,
            term: m.current_term,
            last_log_id,
            leading_with_quorum,
            holding_vip: self.liveness.holding(),
            transfer_to_candidate: self.liveness.transferring_to(candidate, now),
        }
    }

    /// The latest applied registry on this node.
    pub fn applied(&self) -> Arc<Applied> {
        self.applied.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Applied>> {
        self.applied.clone()
    }

    pub fn cluster_id(&self) -> String {
        self.peers.cluster_id()
    }

    /// This node's incarnation and the ones it knows of its peers.
    pub fn identity(&self) -> Option<&Arc<incarnation::Incarnations>> {
        self.peers.identity()
    }

    /// The client for calls to other nodes: the cluster's scheme and trust.
    pub fn peer_client(&self) -> &PeerClient {
        &self.peers
    }

    /// True when the peer credential is right, or none is configured.
    pub fn accept_secret(&self, presented: Option<&str>) -> bool {
        self.peers.secret_matches(presented)
    }

    /// Accepts a peer's cluster id: equal, or adopted when this node joined
    /// with none. Returns false for a stranger.
    pub fn accept_cluster(&self, claimed: &str) -> bool {
        if claimed.is_empty() {
            return false;
        }
        let ours = self.peers.cluster_id();
        if ours == claimed {
            return true;
        }
        if ours.is_empty() && self.peers.adopt_cluster_id(claimed) {
            if let Err(e) = store::set_meta(&self.db, "cluster_id", claimed) {
                tracing::error!(cause = %e, "could not persist the adopted cluster id");
                return false;
            }
            tracing::info!(cluster = claimed, "joined cluster");
            return true;
        }
        false
    }

    /// Replicates `proposal` through the leader, from any node, on behalf of
    /// a caller with `scope`.
    pub async fn write(&self, proposal: Proposal, scope: Scope) -> Result<Written, ConsensusError> {
        match self
            .to_leader(LeaderRequest::Write { proposal, scope })
            .await?
        {
            LeaderReply::Written { index, response } => Ok(Written { index, response }),
            other => Err(unexpected(other)),
        }
    }

    /// Waits until this node has applied everything committed before the call:
    /// a linearizable read of local state after it returns. Returns the index.
    pub async fn read_barrier(&self) -> Result<u64, ConsensusError> {
        let index = match self.to_leader(LeaderRequest::ReadIndex).await? {
            LeaderReply::ReadIndex(index) => index,
            other => return Err(unexpected(other)),
        };
        self.raft
            .wait(Some(self.forward_timeout))
            .applied_index_at_least(Some(index), "read barrier")
            .await
            .map_err(|e| ConsensusError::Unavailable(format!("catching up to {index}: {e}")))?;
        Ok(index)
    }

    pub async fn add_node(
        &self,
        id: NodeId,
        addr: String,
        learner: bool,
    ) -> Result<u64, ConsensusError> {
        match self
            .to_leader(LeaderRequest::AddNode { id, addr, learner })
            .await?
        {
            LeaderReply::Membership { index } => Ok(index),
            other => Err(unexpected(other)),
        }
    }

    pub async fn remove_node(&self, id: NodeId) -> Result<u64, ConsensusError> {
        match self.to_leader(LeaderRequest::RemoveNode { id }).await? {
            LeaderReply::Membership { index } => Ok(index),
            other => Err(unexpected(other)),
        }
    }

    /// Runs `req` on the leader: locally when this node leads, else forwarded.
    /// Retries with backoff while there is no leader or it is unreachable, for
    /// at most `forward_timeout`.
    async fn to_leader(&self, req: LeaderRequest) -> Result<LeaderReply, ConsensusError> {
        let deadline = Instant::now() + self.forward_timeout;
        let mut backoff = Duration::from_millis(10);
        loop {
            let metrics = self.raft.metrics().borrow().clone();
            let attempt = match metrics.current_leader {
                Some(leader) if leader == self.id => self.on_leader(req.clone()).await,
                Some(leader) => {
                    let addr = metrics
                        .membership_config
                        .membership()
                        .get_node(&leader)
                        .map(|n| n.addr.clone());
                    match addr {
                        Some(addr) => {
                            self.forwarded.inc();
                            self.forward(leader, &addr, &req).await
                        }
                        None => Err(LeaderError::NotLeader),
                    }
                }
                None => Err(LeaderError::NotLeader),
            };
            let last = match attempt {
                Ok(reply) => return Ok(reply),
                Err(LeaderError::NotLeader) => match metrics.current_leader {
                    Some(l) => format!("leader {l} stepped down or is unreachable"),
                    None => "no leader elected".into(),
                },
                Err(LeaderError::NoQuorum(why)) => why,
                Err(LeaderError::Rejected(why)) => return Err(ConsensusError::Rejected(why)),
                Err(LeaderError::Failed(why)) => return Err(ConsensusError::Unknown(why)),
            };
            if Instant::now() + backoff > deadline {
                return Err(ConsensusError::Unavailable(format!(
                    "{last}; gave up after {:?}",
                    self.forward_timeout
                )));
            }
            // Wake early when the leader changes, else after the backoff.
            let mut m = self.raft.metrics();
            let before = metrics.current_leader;
            let _ = tokio::time::timeout(backoff, async {
                while m.changed().await.is_ok() {
                    let now = m.borrow().current_leader;
                    if now.is_some() && now != before {
                        break;
                    }
                }
            })
            .await;
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
    }

    async fn forward(
        &self,
        leader: NodeId,
        addr: &str,
        req: &LeaderRequest,
    ) -> Result<LeaderReply, LeaderError> {
        let reply: Result<Result<LeaderReply, LeaderError>, CallError> = self
            .peers
            .call(addr, "/raft/leader", req, self.forward_timeout)
            .await;
        match reply {
            Ok(answer) => answer,
            // The request never left: safe to retry elsewhere.
            Err(e) if e.never_sent() => {
                tracing::debug!(leader, cause = %e, "leader unreachable");
                Err(LeaderError::NotLeader)
            }
            Err(e) => match req {
                // Reads and membership reads are safe to repeat.
                LeaderRequest::ReadIndex => Err(LeaderError::NoQuorum(e.to_string())),
                _ => Err(LeaderError::Failed(format!(
                    "forwarding to node {leader}: {e}"
                ))),
            },
        }
    }

    /// Executes a leader request on this node, which believes it leads.
    pub async fn on_leader(&self, req: LeaderRequest) -> Result<LeaderReply, LeaderError> {
        match req {
            LeaderRequest::Write { proposal, scope } => {
                // Whatever reaches the log was validated here, by the leader,
                // whichever node took the request (a forwarded write is only
                // as trustworthy as the peer that sent it).
                if let Err(e) = proposal.cmd.validate() {
                    return Err(LeaderError::Rejected(format!("invalid command: {e}")));
                }
                if !proposal.cmd.allowed_by(&scope) {
                    return Err(LeaderError::Rejected(format!(
                        "scope {scope} does not allow this command"
                    )));
                }
                // A refused command (unknown member, port taken) must write nothing.
                // Our applied state may lag; the barrier makes it include every
                // acknowledged write before we answer a refusal from it. (A
                // refusal it misses is caught by apply, which changes nothing.)
                if self.applied().registry.refusal(&proposal.cmd).is_some() {
                    let index = self.leader_barrier().await?;
                    if let Some(response) = self.applied().registry.refusal(&proposal.cmd) {
                        return Ok(LeaderReply::Written { index, response });
                    }
                }
                let term = self.raft.metrics().borrow().current_term;
                if !proposal.force {
                    self.leader_state
                        .admit(
                            term,
                            &self.applied().registry,
                            &proposal.cmd,
                            Instant::now(),
                        )
                        .map_err(LeaderError::Rejected)?;
                }
                let renews = match &proposal.cmd {
                    crate::model::Command::Register {
                        service,
                        member,
                        spec,
                        ..
                    } if spec.ttl_s.is_some() => Some((service.clone(), member.clone())),
                    _ => None,
                };
                let (index, response) = self.proposer.propose(proposal).await?;
                // A registration is the first renewal.
                if let Some((service, member)) = renews {
                    self.leader_state
                        .renewed(term, &service, &member, Instant::now());
                }
                Ok(LeaderReply::Written { index, response })
            }
            LeaderRequest::Renew { service, member } => {
                // No read barrier: renewals are frequent, and a member a new
                // leader has not applied yet just re-registers.
                let found = self.applied().registry.member(&service, &member).is_some();
                if found {
                    let term = self.raft.metrics().borrow().current_term;
                    self.leader_state
                        .renewed(term, &service, &member, Instant::now());
                }
                Ok(LeaderReply::Renewed(found))
            }
            LeaderRequest::ReadIndex => Ok(LeaderReply::ReadIndex(self.leader_barrier().await?)),
            LeaderRequest::AddNode { id, addr, learner } => {
                let node = BasicNode { addr };
                let mut resp = self
                    .raft
                    .add_learner(id, node, true)
                    .await
                    .map_err(write_error)?;
                if !learner {
                    resp = self
                        .raft
                        .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                        .await
                        .map_err(write_error)?;
                }
                Ok(LeaderReply::Membership {
                    index: resp.log_id.index,
                })
            }
            LeaderRequest::RemoveNode { id } => {
                let metrics = self.raft.metrics().borrow().clone();
                let membership = metrics.membership_config.membership().clone();
                if membership.get_node(&id).is_none() {
                    return Err(LeaderError::Rejected(format!(
                        "node {id} is not a member of the cluster"
                    )));
                }
                let is_voter = membership.voter_ids().any(|v| v == id);
                let change = if is_voter {
                    ChangeMembers::RemoveVoters(BTreeSet::from([id]))
                } else {
                    ChangeMembers::RemoveNodes(BTreeSet::from([id]))
                };
                // retain=false: a removed voter leaves the cluster instead of staying a learner.
                let resp = self
                    .raft
                    .change_membership(change, false)
                    .await
                    .map_err(write_error)?;
                Ok(LeaderReply::Membership {
                    index: resp.log_id.index,
                })
            }
        }
    }

    async fn leader_barrier(&self) -> Result<u64, LeaderError> {
        match self.raft.ensure_linearizable().await {
            Ok(read) => Ok(read.map(|l| l.index).unwrap_or(0)),
            Err(RaftError::APIError(CheckIsLeaderError::ForwardToLeader(_))) => {
                Err(LeaderError::NotLeader)
            }
            Err(RaftError::APIError(CheckIsLeaderError::QuorumNotEnough(e))) => {
                Err(LeaderError::NoQuorum(format!("leader has no quorum: {e}")))
            }
            Err(e) => Err(LeaderError::Failed(e.to_string())),
        }
    }

    /// This node's copy of the replicated audit history, newest first.
    pub fn audit(
        &self,
        keep: impl Fn(&crate::model::AuditEntry) -> bool,
        limit: usize,
    ) -> Result<Vec<crate::model::AuditEntry>, store::StoreError> {
        store::read_audit(&self.db, keep, limit)
    }

    /// How many requests this node forwarded to a leader; a handle to the
    /// counter itself, which the metrics registry holds.
    pub fn forwarded(&self) -> &Counter {
        &self.forwarded
    }

    /// The commit index as far as this node knows: on the leader the highest
    /// index a quorum of voters has; elsewhere the applied index.
    pub fn commit_index(&self) -> u64 {
        let m = self.raft.metrics().borrow().clone();
        let applied = self.applied().index;
        let Some(repl) = &m.replication else {
            return applied;
        };
        let voters: Vec<NodeId> = m.membership_config.membership().voter_ids().collect();
        let mut matched: Vec<u64> = voters
            .iter()
            .map(|v| {
                if *v == self.id {
                    m.last_log_index.unwrap_or(0)
                } else {
                    repl.get(v).cloned().flatten().map(|l| l.index).unwrap_or(0)
                }
            })
            .collect();
        matched.sort_unstable_by(|a, b| b.cmp(a));
        matched.get(voters.len() / 2).copied().unwrap_or(applied)
    }

    /// True when this node is the leader.
    pub fn is_leader(&self) -> bool {
        let m = self.raft.metrics().borrow().clone();
        m.state == ServerState::Leader
    }

    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!(cause = %e, "raft shutdown");
        }
        if let Err(e) = self.db.flush_async().await {
            tracing::warn!(cause = %e, "final flush");
        }
    }
}

/// On the first start of a data dir: if any of `--peers` answers that it
/// knows this node id with another incarnation, this node lost its data
/// and must not take part as the voter it was.
async fn refuse_if_known(
    peers: &PeerClient,
    id: NodeId,
    all: &BTreeMap<NodeId, String>,
    dir: &str,
) -> Result<(), StartError> {
    let asks = all
        .iter()
        .filter(|(p, _)| **p != id)
        .map(|(p, addr)| async move {
            let r: Result<(), CallError> = peers
                .call_on(
                    network::Lane::Urgent,
                    addr,
                    "/raft/hello",
                    &(),
                    Duration::from_secs(1),
                )
                .await;
            (*p, r)
        });
    for (p, r) in futures::future::join_all(asks).await {
        // The gate answers 409 to a known node id with another incarnation.
        if let Err(CallError::Status {
            status: 409, body, ..
        }) = r
        {
            return Err(StartError::Replaced {
                dir: dir.to_string(),
                id,
                peer: format!("node {p}"),
                why: body,
            });
        }
    }
    Ok(())
}

/// Forgets the incarnations of nodes that left the membership.
fn spawn_forget_removed(raft: Raft, identity: Arc<incarnation::Incarnations>) {
    tokio::spawn(async move {
        let mut metrics = raft.metrics();
        let mut last: Option<BTreeSet<NodeId>> = None;
        loop {
            let members: BTreeSet<NodeId> = {
                let m = metrics.borrow_and_update();
                if m.running_state.is_err() {
                    return;
                }
                m.membership_config
                    .membership()
                    .nodes()
                    .map(|(id, _)| *id)
                    .collect()
            };
            // An uninitialized node has no membership yet: nothing to judge.
            if !members.is_empty() && last.as_ref() != Some(&members) {
                identity.keep_only(&members);
                last = Some(members);
            }
            if metrics.changed().await.is_err() {
                return;
            }
        }
    });
}

/// Writes between snapshots, at least.
const SNAPSHOT_EVERY: u64 = 5_000;

/// openraft's snapshot policy counts log entries, but a batch entry holds up
/// to 256 writes, so the log could grow to a million writes before it is
/// compacted. This also snapshots once as many writes have been applied since
/// the last trigger as the registry has members (at least [`SNAPSHOT_EVERY`]):
/// a snapshot costs time proportional to the registry, so that spreads it
/// over as many writes whatever the size.
///
/// Every node applies the same writes, so without more they would all build
/// at once: hosts that share CPUs (or a disk) then stall together, long
/// enough for a leader to miss its lease (seen in the stability benchmark:
/// three builds and a reload at once starved the lease pings for 45 ms).
/// Nodes 1, 2 and 3 (by id mod 3) get a head start of a third of a period
/// apart, so their builds come a third of a period apart.
fn spawn_compaction(raft: Raft, id: NodeId, mut applied: watch::Receiver<Arc<Applied>>) {
    tokio::spawn(async move {
        // Counted as if this many writes had been applied already.
        let mut head_start = SNAPSHOT_EVERY * (id % 3) / 3;
        let mut since = applied.borrow().proposals;
        while applied.changed().await.is_ok() {
            let (now, members) = {
                let a = applied.borrow_and_update();
                (a.proposals, a.registry.member_count() as u64)
            };
            if now.saturating_sub(since) + head_start < SNAPSHOT_EVERY.max(members) {
                continue;
            }
            since = now;
            head_start = 0;
            if raft.trigger().snapshot().await.is_err() {
                return;
            }
        }
    });
}

fn unexpected(reply: LeaderReply) -> ConsensusError {
    ConsensusError::Unknown(format!("unexpected leader reply {reply:?}"))
}

fn write_error(e: RaftError<NodeId, ClientWriteError<NodeId, BasicNode>>) -> LeaderError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => LeaderError::NotLeader,
        RaftError::APIError(ClientWriteError::ChangeMembershipError(e)) => {
            LeaderError::Rejected(e.to_string())
        }
        RaftError::Fatal(e) => LeaderError::Failed(e.to_string()),
    }
}

/// The cluster id of a `--peers` set: the same on every node given the same set.
pub fn peers_cluster_id(peers: &BTreeMap<NodeId, String>) -> String {
    // FNV-1a: stable across builds and platforms, unlike std's hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (id, addr) in peers {
        for b in format!("{id}={addr};").bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("p-{h:016x}")
}
