//! Server side of the peer transport: `/raft/*` routes, bincode in and out.

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::network::CLUSTER_HEADER;
use super::{Consensus, LeaderRequest};

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
