//! Server side of the peer transport: `/raft/*` routes on the peer
//! listener, legacy (bincode) in and out, and the same routes under
//! [`V1_PREFIX`] in [`Codec::V1`]. A body's codec is named by its path, not
//! a header: a node of the release before answers 404 to a v1 path instead
//! of decoding postcard as bincode.
//!
//! Every request is authenticated from its headers alone (the cluster
//! secret, then the cluster id) before any of its body is read; a refusal
//! says only that, never the cluster id, the node's state or its term.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use openraft::error::RaftError;
use openraft::raft::{AppendEntriesResponse, VoteRequest, VoteResponse};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::elect::{self, PreVoteReply, PreVoteRequest};
use super::heartbeat::{self, LeasePing};
use super::incarnation::{Mismatch, FROM_HEADER};
use super::network::{CLUSTER_HEADER, SECRET_HEADER};
use super::{Consensus, LeaderRequest, NodeId};
use crate::codec::{Codec, ACCEPTS_HEADER};

/// What [`ACCEPTS_HEADER`] says: the codecs this node reads beyond legacy.
const ACCEPTS: &str = "1";

/// Snapshot chunks and append batches are far larger than client requests;
/// only an authenticated peer gets this far.
const PEER_BODY_LIMIT: usize = 64 << 20;

/// Every peer RPC: Raft's, write forwarding, hand-over, the identity probe,
/// and `extra` (peer routes of the API layer), behind one authentication
/// gate. Unknown paths are refused like the rest when unauthenticated.
pub fn routes(consensus: Consensus, may_campaign: watch::Receiver<bool>, extra: Router) -> Router {
    let gate = std::sync::Arc::new(Gate {
        consensus: consensus.clone(),
        refused: Mutex::new(Throttle::default()),
    });
    let rpcs = Router::new()
        .route("/raft/append", post(append))
        .route("/raft/vote", post(vote))
        .route("/raft/snapshot", post(snapshot))
        .route("/raft/prevote", post(prevote))
        .route("/raft/lease", post(lease))
        // Answers nothing but the gate's checks: a node starting with a new
        // data dir asks it whether its peers know it from before.
        .route("/raft/hello", post(|| async { encode(&()) }))
        .route("/raft/leader", post(leader))
        .layer(DefaultBodyLimit::max(PEER_BODY_LIMIT))
        .with_state(consensus.clone())
        .merge(campaign_route(consensus.clone(), may_campaign))
        .merge(identity_route(consensus))
        .merge(extra);
    let v1 = rpcs
        .clone()
        .layer(middleware::from_fn(|req: Request, next: Next| {
            CODEC.scope(Codec::V1, next.run(req))
        }));
    rpcs.nest(V1_PREFIX, v1)
        .fallback(|| async { (StatusCode::NOT_FOUND, "no such peer RPC") })
        .layer(middleware::from_fn_with_state(gate, authenticate))
}

/// Path prefix of the peer RPCs in [`Codec::V1`] (`/codec-v1/raft/append`).
pub const V1_PREFIX: &str = "/codec-v1";

tokio::task_local! {
    /// The codec of the peer request being answered.
    static CODEC: Codec;
}

/// The codec of the request being answered: legacy outside [`V1_PREFIX`].
fn codec() -> Codec {
    CODEC.try_with(|c| *c).unwrap_or(Codec::Legacy)
}

/// The authentication gate and its log throttle.
struct Gate {
    consensus: Consensus,
    refused: Mutex<Throttle>,
}

/// At most one log line per [`Throttle::EVERY`] for refused peer requests,
/// with a count of the ones not logged: a flood must not flood the log too.
#[derive(Default)]
struct Throttle {
    last: Option<Instant>,
    quiet: u64,
}

impl Throttle {
    const EVERY: Duration = Duration::from_secs(10);

    /// `Some(requests not logged since the last line)` when a line is due.
    fn due(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|t| now.duration_since(t) < Self::EVERY)
        {
            self.quiet += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.quiet))
    }
}

async fn authenticate(
    State(gate): State<std::sync::Arc<Gate>>,
    req: Request,
    next: Next,
) -> Response {
    let c = &gate.consensus;
    let headers = req.headers();
    let secret = headers.get(SECRET_HEADER).and_then(|v| v.to_str().ok());
    let refusal = if !c.accept_secret(secret) {
        Some((StatusCode::UNAUTHORIZED, "unauthenticated peer".to_string()))
    } else {
        let claimed = headers
            .get(CLUSTER_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        (!c.accept_cluster(claimed))
            .then(|| (StatusCode::FORBIDDEN, "peer of another cluster".to_string()))
    };
    // A known node id with another incarnation lost its data (or is a
    // second process with that id): it may neither vote nor append.
    let refusal = refusal.or_else(|| {
        let identity = c.identity()?;
        let from = headers.get(FROM_HEADER).and_then(|v| v.to_str().ok());
        match identity.check(from) {
            Ok(()) => None,
            Err(Mismatch::Missing) => Some((
                StatusCode::BAD_REQUEST,
                "peer request without x-clb-from".to_string(),
            )),
            Err(e) => Some((StatusCode::CONFLICT, e.to_string())),
        }
    });
    let Some((status, why)) = refusal else {
        tracing::debug!(path = %req.uri().path(), from = ?headers.get(FROM_HEADER), "peer request");
        let mut resp = next.run(req).await;
        resp.headers_mut().insert(
            ACCEPTS_HEADER,
            axum::http::HeaderValue::from_static(ACCEPTS),
        );
        if let Some(value) = c
            .identity()
            .and_then(|i| axum::http::HeaderValue::from_str(&i.header()).ok())
        {
            resp.headers_mut().insert(FROM_HEADER, value);
        }
        return resp;
    };
    let from = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string())
        .unwrap_or_default();
    let due = gate.refused.lock().unwrap_or_else(|p| p.into_inner()).due();
    if let Some(not_logged) = due {
        tracing::warn!(
            %from,
            path = %req.uri().path(),
            presented_secret = secret.is_some(),
            not_logged,
            "refused a peer request: {why}"
        );
    }
    (status, why).into_response()
}

/// Decodes an authenticated peer's request body, in the request's codec.
#[allow(clippy::result_large_err)]
pub fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, Response> {
    codec()
        .decode(body)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("decode: {e}")).into_response())
}

/// Encodes an answer in the request's codec.
pub fn encode<T: Serialize>(value: &T) -> Response {
    match codec().encode(value) {
        Ok(bytes) => bytes.into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("encode: {e}")).into_response(),
    }
}

async fn append(State(c): State<Consensus>, body: Bytes) -> Response {
    let req: openraft::raft::AppendEntriesRequest<crate::consensus::TypeConfig> =
        match decode(&body) {
            Ok(req) => req,
            Err(r) => return r,
        };
    let commit = req.leader_commit.map(|l| l.index);
    let answer = c.raft.append_entries(req).await;
    // Accepted (even with a log conflict): the sender is the leader we follow.
    if matches!(&answer, Ok(r) if !matches!(r, AppendEntriesResponse::HigherVote(_))) {
        c.liveness().heard();
        if let Some(index) = commit {
            c.liveness().leader_committed(index);
        }
    }
    encode(&answer)
}

/// The leader's lease heartbeat (heartbeat.rs): yes when this node follows
/// the very vote it names, which also counts as hearing from the leader.
async fn lease(State(c): State<Consensus>, body: Bytes) -> Response {
    let ping: LeasePing = match decode(&body) {
        Ok(p) => p,
        Err(r) => return r,
    };
    let (vote, state) = {
        let m = c.raft.metrics();
        let m = m.borrow();
        (m.vote, m.state)
    };
    let yes = heartbeat::follows(&vote, state, &ping);
    if yes {
        c.liveness().heard();
    }
    encode(&heartbeat::LeaseAnswer {
        follows: yes,
        window_ms: c.election_timeout_max().as_millis() as u64,
    })
}

/// A candidate asks whether this node would vote for it (elect.rs). Nothing
/// changes here: no term, no vote.
async fn prevote(State(c): State<Consensus>, body: Bytes) -> Response {
    let req: PreVoteRequest = match decode(&body) {
        Ok(req) => req,
        Err(r) => return r,
    };
    let mut view = c.voter_view(req.candidate);
    if let Some(wait) = elect::prevote_wait(&view, &req, c.prevote_patience()) {
        tokio::time::sleep(wait).await;
        view = c.voter_view(req.candidate);
    }
    let decision = elect::prevote_decision(&view, &req);
    let l = c.liveness();
    let counter = match decision {
        Ok(()) => &l.prevotes_granted,
        Err(_) => &l.prevotes_refused,
    };
    counter.inc();
    encode(&PreVoteReply {
        granted: decision.is_ok(),
        refused: decision.err().map(str::to_string),
    })
}

/// A vote is refused while the leader this node follows is alive, while
/// this node leads with a quorum or may hold the VIP, and for
/// `election_timeout_max` after a restart (elect.rs `sticky`): the old
/// leader's VIP lease relies on it (docs/failover.md). A restarted process
/// has forgotten when it last heard from the leader, so without the pause a
/// quick restart could vote a new leader in while the old one still holds
/// the VIP on the strength of an ack this very node gave before it crashed;
/// a node that never voted has no such ack to honour.
async fn vote(State(c): State<Consensus>, body: Bytes) -> Response {
    let req: VoteRequest<u64> = match decode(&body) {
        Ok(req) => req,
        Err(r) => return r,
    };
    let candidate = req.vote.leader_id.node_id;
    let liveness = c.liveness();
    let _gate = liveness.vote_gate.lock().await;
    let view = c.voter_view(candidate);
    // The candidate this node already voted for in that term asks again (a
    // lost answer, a retry): openraft answers as before.
    let again = c.raft.metrics().borrow().vote.leader_id == req.vote.leader_id;
    // A restarted voter's window after start: its `last_heard` starts at
    // its start (elect.rs).
    let sticky = elect::sticky(&view).filter(|_| !again);
    if sticky.is_some() {
        // openraft's leader grants votes while it leads (only followers keep
        // its refusal window), so the rules of elect.rs are applied here,
        // before openraft sees the request.
        liveness.votes_refused.inc();
        tracing::info!(
            candidate,
            term = req.vote.leader_id.term,
            reason = sticky.unwrap_or_default(),
            "refused a vote"
        );
        let vote = c.raft.metrics().borrow().vote;
        let refused: Result<VoteResponse<u64>, RaftError<u64>> =
            Ok(VoteResponse::new(vote, None, false));
        return encode(&refused);
    }
    let answer = c.raft.vote(req).await;
    if matches!(&answer, Ok(r) if r.vote_granted) {
        liveness.granted_vote();
    }
    encode(&answer)
}

async fn snapshot(State(c): State<Consensus>, body: Bytes) -> Response {
    let req: openraft::raft::InstallSnapshotRequest<super::TypeConfig> = match decode(&body) {
        Ok(req) => req,
        Err(r) => return r,
    };
    let sender = req.vote;
    let answer = c.raft.install_snapshot(req).await;
    if matches!(&answer, Ok(r) if r.vote <= sender) {
        c.liveness().heard();
    }
    encode(&answer)
}

async fn leader(State(c): State<Consensus>, body: Bytes) -> Response {
    match decode::<LeaderRequest>(&body) {
        Ok(req) => encode(&c.on_leader(req).await),
        Err(r) => r,
    }
}

/// A leader handing over asks a peer to start an election now.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CampaignRequest {
    pub from: NodeId,
    pub term: u64,
}

/// `/raft/campaign`: answers `Result<(), String>`. `may_campaign` is false
/// on a node that must not lead (a witness, an unhealthy balancer), which
/// refuses so the old leader tries another voter.
fn campaign_route(consensus: Consensus, may_campaign: watch::Receiver<bool>) -> Router {
    Router::new()
        .route("/raft/campaign", post(campaign))
        .with_state((consensus, may_campaign))
}

async fn campaign(
    State((c, may_campaign)): State<(Consensus, watch::Receiver<bool>)>,
    body: Bytes,
) -> Response {
    let req = match decode::<CampaignRequest>(&body) {
        Ok(req) => req,
        Err(r) => return r,
    };
    // Checked and acted on under the gate, like the election timer's.
    let _gate = c.liveness().vote_gate.lock().await;
    let (term, leader) = {
        let m = c.raft.metrics();
        let m = m.borrow();
        (m.current_term, m.current_leader)
    };
    let answer: Result<(), String> = if req.term != term || leader != Some(req.from) {
        // Late (a hand-over that moved on to another candidate, a request
        // held up in a queue) or not from the leader this node follows: an
        // election now would bump the term past a healthy leader's and
        // depose it, a VIP move for nothing.
        tracing::info!(
            from = req.from,
            term = req.term,
            my_term = term,
            ?leader,
            "asked to campaign by a node that is not my leader in my term: refused"
        );
        Err(format!(
            "node {} does not lead term {} here (term {term}, leader {leader:?})",
            req.from, req.term
        ))
    } else if *may_campaign.borrow() {
        tracing::info!(
            from = req.from,
            term = req.term,
            "asked to campaign: starting an election"
        );
        c.raft.trigger().elect().await.map_err(|e| e.to_string())
    } else {
        tracing::info!(
            from = req.from,
            term = req.term,
            "asked to campaign, but this node may not lead"
        );
        Err("this node may not lead (witness or unhealthy)".into())
    };
    encode(&answer)
}

/// How often a node checks that it alone answers at its own address.
const IDENTITY_PROBE_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// "Who answers at the address the membership gives to node `id`?", sent
/// by node `id` itself; `instance` is random per process.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdentityProbe {
    pub id: NodeId,
    pub instance: u64,
}

/// The answer: the node id and process instance that serve this address.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct IdentityReply {
    pub id: NodeId,
    pub instance: u64,
}

/// `/raft/identity`, and the task that probes this node's own address.
///
/// Two processes started with the same `--node-id` would both vote and
/// campaign as one Raft node, which breaks Raft's safety silently. Each
/// process therefore asks, at start and every [`IDENTITY_PROBE_INTERVAL`],
/// who answers at the address the membership gives to its id. Its own
/// instance: fine. Another instance of the same id: this process is the
/// impostor (the address belongs to the other one), so it logs an error and
/// shuts its Raft down, which also releases the VIP; the process that was
/// probed logs an error too. Whichever starts first, the duplicate stops
/// within one interval of both running.
fn identity_route(consensus: Consensus) -> Router {
    let instance: u64 = rand::random();
    tokio::spawn(probe_own_address(consensus.clone(), instance));
    Router::new()
        .route("/raft/identity", post(identity))
        .with_state((consensus, instance))
}

async fn identity(State((c, instance)): State<(Consensus, u64)>, body: Bytes) -> Response {
    let probe = match decode::<IdentityProbe>(&body) {
        Ok(p) => p,
        Err(r) => return r,
    };
    if probe.id == c.id && probe.instance != instance {
        tracing::error!(
            node = c.id,
            "another process started with --node-id {} probed this node's address; \
             it stops taking part in Raft. Give every node its own id",
            c.id
        );
    }
    encode(&IdentityReply { id: c.id, instance })
}

#[tracing::instrument(name = "identity", skip_all, fields(node = c.id))]
async fn probe_own_address(c: Consensus, instance: u64) {
    let mut metrics = c.raft.metrics();
    let mut warned_other = false;
    loop {
        let m = metrics.borrow_and_update().clone();
        if m.running_state.is_err() {
            return;
        }
        let addr = m
            .membership_config
            .membership()
            .get_node(&c.id)
            .map(|n| n.addr.clone());
        if let Some(addr) = addr {
            let probe = IdentityProbe { id: c.id, instance };
            let answer: Result<IdentityReply, _> = c
                .peer_client()
                .call(&addr, "/raft/identity", &probe, IDENTITY_PROBE_INTERVAL)
                .await;
            match answer {
                Ok(r) if r.instance == instance => {}
                Ok(r) if r.id == c.id => {
                    tracing::error!(
                        %addr,
                        "another process answers at {addr} as node {}: two processes run with \
                         --node-id {}; this one stops taking part in Raft",
                        c.id,
                        c.id
                    );
                    if let Err(e) = c.raft.shutdown().await {
                        tracing::warn!(cause = %e, "raft shutdown");
                    }
                    return;
                }
                Ok(r) if !warned_other => {
                    warned_other = true;
                    tracing::warn!(%addr, other = r.id, "this node's address in the membership is served by another node");
                }
                Ok(_) => {}
                // Not up yet, or not reachable from here: try again later.
                Err(e) => tracing::debug!(%addr, cause = %e, "identity probe"),
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(IDENTITY_PROBE_INTERVAL) => {}
            // Only to notice a shutdown: metrics change on every heartbeat.
            _ = metrics.wait_for(|m| m.running_state.is_err()) => return,
        }
    }
}
