//! Peer transport: Raft RPCs as HTTP POSTs with [`crate::codec`] bodies,
//! under `/raft/` on the same listener as the client API.
//!
//! The codec is chosen per peer: legacy (the release before postcard) until
//! the peer's answers say it reads v1 ([`ACCEPTS_HEADER`]), and legacy again
//! once a peer answers a v1 path with 404 without saying so (it was
//! downgraded). A mixed cluster keeps working during a rolling upgrade.
//!
//! Every request carries the cluster id in `x-clb-cluster`, so a node of
//! another cluster (or a stray data dir) is refused instead of corrupting us.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Timeout, Unreachable,
};
use openraft::network::{Backoff, RPCOption, RPCTypes, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::acks::Acks;
use super::incarnation::{Incarnations, FROM_HEADER};
use super::{NodeId, TypeConfig};
use crate::codec::{Codec, CodecError, ACCEPTS_HEADER};
use crate::pem::{load_ca, CaError};

/// Header naming the cluster a peer request belongs to.
pub const CLUSTER_HEADER: &str = "x-clb-cluster";

/// The error half of an RPC: what the peer transport reports to openraft.
type RpcErr<E> = RPCError<NodeId, BasicNode, RaftError<NodeId, E>>;

/// Why an HTTP call to a peer failed.
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
    #[error("{addr} answered as a replaced node: {source}")]
    Replaced {
        addr: String,
        source: super::incarnation::Mismatch,
    },
    #[error("encode request: {0}")]
    Encode(CodecError),
    #[error("decode answer from {addr}: {source}")]
    Decode { addr: String, source: CodecError },
}

impl CallError {
    /// True when the request surely never reached the peer, so resending it
    /// cannot apply anything twice.
    pub fn never_sent(&self) -> bool {
        matches!(self, CallError::Connect { .. } | CallError::Encode(_))
    }
}

/// How peers are called when the cluster serves HTTPS.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerTls {
    /// PEM CA certificate(s) peers' certificates are checked against;
    /// `None`: the bundled web roots.
    pub ca: Option<PathBuf>,
}

/// Why the HTTPS peer client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum PeerTlsError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("build the HTTPS client: {0}")]
    Build(reqwest::Error),
}

/// A small HTTP client for peer calls, shared by Raft RPCs and write forwarding.
#[derive(Clone)]
pub struct PeerClient {
    http: reqwest::Client,
    /// Its own connection pool for what must not queue behind a large
    /// append on a busy connection: heartbeats, votes, pre-votes.
    urgent: reqwest::Client,
    /// `http` or `https`, as the cluster serves.
    scheme: &'static str,
    /// The CA certificates an HTTPS client trusts instead of the web roots.
    tls_roots: Option<Arc<Vec<reqwest::Certificate>>>,
    /// Empty until a joining node adopts the id of the cluster that added it.
    cluster_id: Arc<RwLock<String>>,
    /// The cluster secret sent with, and required of, every peer RPC.
    secret: Option<Arc<str>>,
    /// This node's incarnation, sent with every call; answers from a known
    /// node with another incarnation are refused.
    identity: Option<Arc<Incarnations>>,
    /// The codec each peer address last said it reads (legacy until then).
    codecs: Arc<Mutex<HashMap<String, Codec>>>,
}

/// Header carrying the cluster secret.
pub const SECRET_HEADER: &str = "x-clb-secret";

fn builder() -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_millis(500))
        .pool_idle_timeout(Duration::from_secs(30))
        .tcp_nodelay(true)
}

/// An HTTPS-only client trusting `roots` (the bundled web roots if none).
fn https_client(
    roots: Option<&Vec<reqwest::Certificate>>,
) -> Result<reqwest::Client, reqwest::Error> {
    let mut b = builder().https_only(true);
    if let Some(certs) = roots {
        b = b.tls_built_in_root_certs(false);
        for cert in certs {
            b = b.add_root_certificate(cert.clone());
        }
    }
    b.build()
}

impl PeerClient {
    /// Calls peers over plain HTTP.
    pub fn new(cluster_id: String) -> Self {
        let http = builder().build().unwrap_or_default();
        let urgent = builder().build().unwrap_or_default();
        Self {
            http,
            urgent,
            scheme: "http",
            tls_roots: None,
            cluster_id: Arc::new(RwLock::new(cluster_id)),
            secret: None,
            identity: None,
            codecs: Default::default(),
        }
    }

    /// Calls peers over HTTPS when `tls` is given (trusting only its CA if
    /// it names one), else like [`PeerClient::new`].
    pub fn with_tls(cluster_id: String, tls: Option<&PeerTls>) -> Result<Self, PeerTlsError> {
        let Some(tls) = tls else {
            return Ok(Self::new(cluster_id));
        };
        let roots = match &tls.ca {
            Some(ca) => Some(load_ca(ca)?),
            None => None,
        };
        let roots = roots.map(Arc::new);
        let build = || https_client(roots.as_deref()).map_err(PeerTlsError::Build);
        Ok(Self {
            http: build()?,
            urgent: build()?,
            scheme: "https",
            tls_roots: roots.clone(),
            cluster_id: Arc::new(RwLock::new(cluster_id)),
            secret: None,
            identity: None,
            codecs: Default::default(),
        })
    }

    /// Sends, and requires, `secret` on peer RPCs.
    pub fn with_secret(mut self, secret: Option<String>) -> Self {
        self.secret = secret.map(Arc::from);
        self
    }

    /// Sends this node's incarnation and checks the answerers' (see
    /// incarnation.rs).
    pub fn with_identity(mut self, identity: Arc<Incarnations>) -> Self {
        self.identity = Some(identity);
        self
    }

    /// The same client with a connection pool of its own for the urgent
    /// lane, for a caller on another runtime (a pooled connection is driven
    /// by the runtime that opened it).
    pub fn with_own_urgent_pool(&self) -> Self {
        let urgent = match self.scheme {
            "https" => https_client(self.tls_roots.as_deref()),
            _ => builder().build(),
        };
        let mut c = self.clone();
        if let Ok(urgent) = urgent {
            c.urgent = urgent;
        }
        c
    }

    /// This node's incarnations record, if it has one.
    pub fn identity(&self) -> Option<&Arc<Incarnations>> {
        self.identity.as_ref()
    }

    /// Constant-time check of a presented secret; true when none is configured.
    pub fn secret_matches(&self, presented: Option<&str>) -> bool {
        match (&self.secret, presented) {
            (None, _) => true,
            (Some(ours), Some(p)) => crate::auth::constant_time_eq(ours.as_bytes(), p.as_bytes()),
            (Some(_), None) => false,
        }
    }

    /// `{scheme}://{addr}{path}` for a peer's advertised address.
    pub fn url(&self, addr: &str, path: &str) -> String {
        format!("{}://{addr}{path}", self.scheme)
    }

    /// A GET to a peer, with this client's scheme and trust (for API calls
    /// between nodes, such as `/v1/node`).
    pub fn get(&self, addr: &str, path: &str) -> reqwest::RequestBuilder {
        self.http.get(self.url(addr, path))
    }

    /// A POST to a peer, like [`PeerClient::get`].
    pub fn post(&self, addr: &str, path: &str) -> reqwest::RequestBuilder {
        self.http.post(self.url(addr, path))
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

    /// POSTs `req` to `{scheme}://{addr}{path}` and decodes the answer.
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
        self.call_on(Lane::Bulk, addr, path, req, timeout).await
    }

    /// The codec calls to `addr` use now.
    fn codec_for(&self, addr: &str) -> Codec {
        let codecs = self.codecs.lock().unwrap_or_else(|p| p.into_inner());
        codecs.get(addr).copied().unwrap_or_default()
    }

    fn learn_codec(&self, addr: &str, codec: Codec) {
        let mut codecs = self.codecs.lock().unwrap_or_else(|p| p.into_inner());
        let before = codecs.insert(addr.to_string(), codec);
        if before.unwrap_or_default() != codec {
            tracing::info!(peer = addr, codec = codec.name(), "peer codec changed");
        }
    }

    /// The codec used with each peer address called so far.
    pub fn codecs(&self) -> BTreeMap<String, Codec> {
        let codecs = self.codecs.lock().unwrap_or_else(|p| p.into_inner());
        codecs.iter().map(|(a, c)| (a.clone(), *c)).collect()
    }

    /// [`PeerClient::call`] on the given lane.
    pub async fn call_on<Req, Resp>(
        &self,
        lane: Lane,
        addr: &str,
        path: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, CallError>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
    {
        let fut = async {
            let codec = self.codec_for(addr);
            match self.post_once(lane, addr, path, req, codec).await {
                // A peer without the v1 routes (404) that does not advertise
                // v1 runs an older release: it decoded nothing, so legacy may
                // follow.
                Err(CallError::Status { status: 404, .. })
                    if codec != Codec::Legacy && self.codec_for(addr) == Codec::Legacy =>
                {
                    self.post_once(lane, addr, path, req, Codec::Legacy).await
                }
                r => r,
            }
        };
        match tokio::time::timeout(timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(CallError::Timeout {
                addr: addr.to_string(),
                timeout,
            }),
        }
    }

    /// One POST of `req` in `codec`; learns the codec the peer reads from
    /// its answer.
    async fn post_once<Req, Resp>(
        &self,
        lane: Lane,
        addr: &str,
        path: &str,
        req: &Req,
        codec: Codec,
    ) -> Result<Resp, CallError>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
    {
        let body = codec.encode(req).map_err(CallError::Encode)?;
        let url = match codec {
            Codec::Legacy => self.url(addr, path),
            Codec::V1 => self.url(addr, &format!("{}{path}", super::rpc::V1_PREFIX)),
        };
        let http = match lane {
            Lane::Bulk => &self.http,
            Lane::Urgent => &self.urgent,
        };
        let mut req = http
            .post(url)
            .header(CLUSTER_HEADER, self.cluster_id())
            .header("content-type", "application/octet-stream");
        if let Some(secret) = &self.secret {
            req = req.header(SECRET_HEADER, secret.as_ref());
        }
        if let Some(id) = &self.identity {
            req = req.header(FROM_HEADER, id.header());
        }
        let resp = req.body(body).send().await.map_err(|source| {
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
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let from = header(FROM_HEADER);
        // A success, or a route's 400/404, says what the peer reads (a gate
        // refusal of a new node may say legacy; the next answer corrects
        // it). 401/403/409 refusals say nothing of its release.
        if status.is_success() || matches!(status.as_u16(), 400 | 404) {
            self.learn_codec(
                addr,
                Codec::best_accepted(header(ACCEPTS_HEADER).as_deref()),
            );
        }
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
        // A vote or an ack from a node that lost its data must not count.
        if let Some(id) = &self.identity {
            id.check(from.as_deref())
                .map_err(|source| CallError::Replaced {
                    addr: addr.to_string(),
                    source,
                })?;
        }
        codec.decode(&bytes).map_err(|source| CallError::Decode {
            addr: addr.to_string(),
            source,
        })
    }
}

/// Which connection pool a call uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Log entries, snapshots, forwarded writes.
    Bulk,
    /// Heartbeats, votes and pre-votes: small, and late is as bad as lost.
    Urgent,
}

/// Creates one [`Peer`] per target node.
#[derive(Clone)]
pub struct Network {
    client: PeerClient,
    append_timeout: Duration,
    backoff: Duration,
    acks: Arc<Acks>,
}

impl Network {
    /// `append_timeout` bounds how long an AppendEntries request may stay on
    /// the wire (see [`Peer::append`]); `backoff` is the pause between
    /// attempts to reach an unreachable peer.
    pub fn new(
        client: PeerClient,
        append_timeout: Duration,
        backoff: Duration,
        acks: Arc<Acks>,
    ) -> Self {
        Self {
            client,
            append_timeout,
            backoff,
            acks,
        }
    }
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Peer;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Peer {
        Peer {
            client: self.client.clone(),
            target,
            addr: node.addr.clone(),
            append_timeout: self.append_timeout,
            on_wire: Arc::new(tokio::sync::Mutex::new(())),
            backoff: self.backoff,
            acks: self.acks.clone(),
        }
    }
}

/// The connection to one peer.
pub struct Peer {
    client: PeerClient,
    target: NodeId,
    addr: String,
    append_timeout: Duration,
    /// Held while an AppendEntries request is on the wire to this peer.
    on_wire: Arc<tokio::sync::Mutex<()>>,
    backoff: Duration,
    acks: Arc<Acks>,
}

fn rpc_error<E: std::error::Error>(
    e: CallError,
    action: RPCTypes,
    target: NodeId,
    timeout: Duration,
) -> RpcErr<E> {
    match e {
        // Unreachable makes openraft back off instead of hammering a dead peer.
        CallError::Connect { .. } => RPCError::Unreachable(Unreachable::new(&e)),
        CallError::Timeout { .. } => RPCError::Timeout(Timeout {
            action,
            id: 0,
            target,
            timeout,
        }),
        _ => RPCError::Network(NetworkError::new(&e)),
    }
}

impl Peer {
    async fn rpc<Req, Resp, E>(
        &self,
        path: &str,
        action: RPCTypes,
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
            .map_err(|e| rpc_error(e, action, self.target, ttl))?;
        answer.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    /// Sends an AppendEntries request: entries at most one request at a
    /// time to this peer, heartbeats at once on their own connection.
    ///
    /// openraft 0.9 gives every AppendEntries the heartbeat interval as a
    /// hard timeout, drops the call when it expires and sends the entries
    /// again on its next tick. A follower slowed by a busy CPU then receives
    /// the same batch every tick, which slows it further. So the request
    /// runs in its own task that outlives openraft's timeout, bounded by
    /// `append_timeout` instead; a request openraft gave up on while an
    /// earlier one was still on the wire is never sent (its entries go with
    /// the next). The answer of a call openraft abandoned still counts as an
    /// ack for the lease ([`Acks`]), timed from when it was sent. A
    /// heartbeat never waits behind entries: the lease must not expire
    /// because a batch is slow.
    async fn append(
        &self,
        rpc: AppendEntriesRequest<TypeConfig>,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr<openraft::error::Infallible>> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let (client, addr, on_wire) =
            (self.client.clone(), self.addr.clone(), self.on_wire.clone());
        let (acks, target) = (self.acks.clone(), self.target);
        let timeout = self.append_timeout;
        let heartbeat = rpc.entries.is_empty();
        let term = rpc.vote.leader_id.term;
        tokio::spawn(async move {
            let _on_wire = match heartbeat {
                true => None,
                false => Some(on_wire.lock_owned().await),
            };
            if tx.is_closed() {
                acks.count_abandoned();
                return;
            }
            let lane = if heartbeat { Lane::Urgent } else { Lane::Bulk };
            let sent = Instant::now();
            let answer: Result<Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>>, _> =
                client
                    .call_on(lane, &addr, "/raft/append", &rpc, timeout)
                    .await;
            match &answer {
                Ok(Ok(resp)) => {
                    peer_answered(&acks, target, sent, None);
                    // Success or a log conflict: the follower took our vote.
                    if !matches!(resp, AppendEntriesResponse::HigherVote(_)) {
                        acks.acked(target, term, sent);
                    }
                }
                Ok(Err(_)) => peer_answered(&acks, target, sent, None),
                Err(e) => peer_answered(&acks, target, sent, Some(e)),
            }
            if tx.send(answer).is_err() {
                acks.count_late();
            }
        });
        let answer: Result<AppendEntriesResponse<NodeId>, RaftError<NodeId>> = rx
            .await
            .map_err(|_| {
                let e = std::io::Error::other("append task ended without an answer");
                RPCError::Network(NetworkError::new(&e))
            })?
            .map_err(|e| rpc_error(e, RPCTypes::AppendEntries, self.target, timeout))?;
        answer.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

/// Logs a peer going away or coming back, once per change (openraft's own
/// per-request replication errors are filtered out of the default log).
fn peer_answered(acks: &Acks, peer: NodeId, sent: Instant, failed: Option<&CallError>) {
    match (
        acks.answered(peer, failed.is_none(), sent, Instant::now()),
        failed,
    ) {
        (Some(Some(true) | None), Some(e)) => {
            tracing::warn!(peer, cause = %e, "peer stopped answering")
        }
        (Some(Some(false)), None) => tracing::info!(peer, "peer answers again"),
        _ => {}
    }
}

impl RaftNetwork<TypeConfig> for Peer {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr<openraft::error::Infallible>> {
        // openraft applies its own timeout around this call.
        let _ = option;
        self.append(rpc).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        self.rpc("/raft/snapshot", RPCTypes::InstallSnapshot, &rpc, &option)
            .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr<openraft::error::Infallible>> {
        let ttl = option.hard_ttl();
        let answer: Result<VoteResponse<NodeId>, RaftError<NodeId>> = self
            .client
            .call_on(Lane::Urgent, &self.addr, "/raft/vote", &rpc, ttl)
            .await
            .map_err(|e| rpc_error(e, RPCTypes::Vote, self.target, ttl))?;
        answer.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }

    /// openraft waits 500 ms by default before retrying a peer it could not
    /// reach. A restarted follower then hears no heartbeat within its
    /// election timeout, campaigns with a short log, is refused, and carries
    /// openraft's "saw a longer log" penalty (2 × election-timeout-max) into
    /// the next real failover; retrying well within the election timeout
    /// avoids that (docs/failover.md, Measured).
    fn backoff(&self) -> Backoff {
        Backoff::new(std::iter::repeat(self.backoff))
    }
}
