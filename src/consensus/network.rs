//! Peer transport: Raft RPCs as HTTP POSTs with bincode bodies, under `/raft/`
//! on the same listener as the client API.
//!
//! Every request carries the cluster id in `x-clb-cluster`, so a node of
//! another cluster (or a stray data dir) is refused instead of corrupting us.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{NodeId, TypeConfig};

/// Header naming the cluster a peer request belongs to.
pub const CLUSTER_HEADER: &str = "x-clb-cluster";

/// The error half of an RPC: what the peer transport reports to openraft.
type RpcErr<E> = RPCError<NodeId, BasicNode, RaftError<NodeId, E>>;

/// Why a bincode HTTP call to a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: reqwest::Error,
    },
    #[error("no answer from {addr} within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("request to {addr}: {source}")]
    Request {
        addr: String,
        source: reqwest::Error,
    },
    #[error("{addr} answered HTTP {status}: {body}")]
    Status {
        addr: String,
        status: u16,
        body: String,
    },
    #[error("encode request: {0}")]
    Encode(bincode::Error),
    #[error("decode answer from {addr}: {source}")]
    Decode {
        addr: String,
        source: bincode::Error,
    },
}

impl CallError {
    /// True when the request surely never reached the peer, so resending it
    /// cannot apply anything twice.
    pub fn never_sent(&self) -> bool {
        matches!(self, CallError::Connect { .. } | CallError::Encode(_))
    }
}

/// A small HTTP client for peer calls, shared by Raft RPCs and write forwarding.
#[derive(Clone)]
pub struct PeerClient {
    http: reqwest::Client,
    /// Empty until a joining node adopts the id of the cluster that added it.
    cluster_id: Arc<RwLock<String>>,
}

impl PeerClient {
    pub fn new(cluster_id: String) -> Self {
        let cluster_id = Arc::new(RwLock::new(cluster_id));
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_millis(500))
            .pool_idle_timeout(Duration::from_secs(30))
            .tcp_nodelay(true)
            .build()
            .unwrap_or_default();
        Self { http, cluster_id }
    }

    pub fn cluster_id(&self) -> String {
        self.cluster_id
            .read()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    /// Sets the cluster id once; false if one was already set.
    pub fn adopt_cluster_id(&self, id: &str) -> bool {
        match self.cluster_id.write() {
            Ok(mut ours) if ours.is_empty() => {
                *ours = id.to_string();
                true
            }
            _ => false,
        }
    }

    /// POSTs `req` as bincode to `http://{addr}{path}` and decodes the answer.
    pub async fn call<Req, Resp>(
        &self,
        addr: &str,
        path: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, CallError>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
    {
        let body = bincode::serialize(req).map_err(CallError::Encode)?;
        let url = format!("http://{addr}{path}");
        let send = self
            .http
            .post(url)
            .header(CLUSTER_HEADER, self.cluster_id())
            .header("content-type", "application/octet-stream")
            .body(body)
            .send();
        let fut = async {
            let resp = send.await.map_err(|source| {
                if source.is_connect() {
                    CallError::Connect {
                        addr: addr.to_string(),
                        source,
                    }
                } else {
                    CallError::Request {
                        addr: addr.to_string(),
                        source,
                    }
                }
            })?;
            let status = resp.status();
            let bytes = resp.bytes().await.map_err(|source| CallError::Request {
                addr: addr.to_string(),
                source,
            })?;
            if !status.is_success() {
                return Err(CallError::Status {
                    addr: addr.to_string(),
                    status: status.as_u16(),
                    body: String::from_utf8_lossy(&bytes).chars().take(200).collect(),
                });
            }
            bincode::deserialize(&bytes).map_err(|source| CallError::Decode {
                addr: addr.to_string(),
                source,
            })
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Timeout {
                addr: addr.to_string(),
                timeout,
            }),
        }
    }
}

/// Creates one [`Peer`] per target node.
#[derive(Clone)]
pub struct Network {
    client: PeerClient,
}

impl Network {
    pub fn new(client: PeerClient) -> Self {
        Self { client }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        Peer {
            client: self.client.clone(),
            target,
            addr: node.addr.clone(),
        }
    }
}

/// The connection to one peer.
pub struct Peer {
    client: PeerClient,
    target: NodeId,
    addr: String,
}

impl Peer {
    async fn rpc<Req, Resp, E>(
        &self,
        path: &str,
        req: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RpcErr<E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let ttl = option.hard_ttl();
        let answer: Result<Resp, RaftError<NodeId, E>> = self
            .client
            .call(&self.addr, path, req, ttl)
            .await
            .map_err(|e| match e {
                // Unreachable makes openraft back off instead of hammering a dead peer.
                CallError::Connect { .. } => RPCError::Unreachable(Unreachable::new(&e)),
                CallError::Timeout { .. } => RPCError::Timeout(Timeout {
                    action: openraft::RPCTypes::AppendEntries,
                    id: 0,
                    target: self.target,
                    timeout: ttl,
                }),
                _ => RPCError::Network(NetworkError::new(&e)),
            })?;
        answer.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr<openraft::error::Infallible>> {
        self.rpc("/raft/append", &rpc, &option).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        self.rpc("/raft/snapshot", &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr<openraft::error::Infallible>> {
        self.rpc("/raft/vote", &rpc, &option).await
    }
}
