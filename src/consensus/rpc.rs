//! Server side of the peer transport: `/raft/*` routes, bincode in and out.

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::network::{CLUSTER_HEADER, SECRET_HEADER};
use super::{Consensus, LeaderRequest, NodeId};

/// Snapshot chunks and append batches are far larger than client requests.
const PEER_BODY_LIMIT: usize = 64 << 20;

pub fn routes(consensus: Consensus) -> Router {
    Router::new()
        .route("/raft/append", post(append))
        .route("/raft/vote", post(vote))
        .route("/raft/snapshot", post(snapshot))
        .route("/raft/leader", post(leader))
        .layer(DefaultBodyLimit::max(PEER_BODY_LIMIT))
        .with_state(consensus)
}

/// Decodes a peer request after checking it comes from our cluster.
#[allow(clippy::result_large_err)]
fn admit<T: DeserializeOwned>(
    c: &Consensus,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<T, Response> {
    let secret = headers.get(SECRET_HEADER).and_then(|v| v.to_str().ok());
    if !c.accept_secret(secret) {
        tracing::warn!(
            presented = secret.is_some(),
            "refused a peer request without the cluster credential"
        );
        return Err((
            StatusCode::UNAUTHORIZED,
            "peer requests need the cluster credential".to_string(),
        )
            .into_response());
    }
    let claimed = headers
        .get(CLUSTER_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !c.accept_cluster(claimed) {
        tracing::warn!(claimed, ours = %c.cluster_id(), "refused a peer request from another cluster");
        return Err((
            StatusCode::FORBIDDEN,
            format!("this node belongs to cluster {:?}", c.cluster_id()),
        )
            .into_response());
    }
    bincode::deserialize(body)
        .map_err(|e| (StatusCode::BAD_REQUEST, format!("decode: {e}")).into_response())
}

fn encode<T: Serialize>(value: &T) -> Response {
    match bincode::serialize(value) {
        Ok(bytes) => bytes.into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("encode: {e}")).into_response(),
    }
}

async fn append(State(c): State<Consensus>, headers: HeaderMap, body: Bytes) -> Response {
    match admit(&c, &headers, &body) {
        Ok(req) => encode(&c.raft.append_entries(req).await),
        Err(r) => r,
    }
}

async fn vote(State(c): State<Consensus>, headers: HeaderMap, body: Bytes) -> Response {
    match admit(&c, &headers, &body) {
        Ok(req) => encode(&c.raft.vote(req).await),
        Err(r) => r,
    }
}

async fn snapshot(State(c): State<Consensus>, headers: HeaderMap, body: Bytes) -> Response {
    match admit(&c, &headers, &body) {
        Ok(req) => encode(&c.raft.install_snapshot(req).await),
        Err(r) => r,
    }
}

async fn leader(State(c): State<Consensus>, headers: HeaderMap, body: Bytes) -> Response {
    match admit::<LeaderRequest>(&c, &headers, &body) {
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
pub fn campaign_route(consensus: Consensus, may_campaign: watch::Receiver<bool>) -> Router {
    Router::new()
        .route("/raft/campaign", post(campaign))
        .with_state((consensus, may_campaign))
}

async fn campaign(
    State((c, may_campaign)): State<(Consensus, watch::Receiver<bool>)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let req = match admit::<CampaignRequest>(&c, &headers, &body) {
        Ok(req) => req,
        Err(r) => return r,
    };
    let answer: Result<(), String> = if *may_campaign.borrow() {
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
