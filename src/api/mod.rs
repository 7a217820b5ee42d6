//! HTTP API v1 (axum): JSON, `Authorization: Bearer TOKEN`, same listener as
//! the peer RPCs. Handlers validate, build a [`Command`], and hand it to
//! [`Consensus`], which replicates it through the leader from any node.

mod authn;
mod error;
/// `GET /metrics`: the Prometheus exposition.
mod metrics;
/// The listener: accept loop, TLS with certificate reload, connection limits.
pub mod serve;
/// `GET /ui`: the server-rendered status page.
mod ui;

use std::sync::Arc;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use serde::Deserialize;

pub use authn::{FailureLimit, Principal, Tokens};
pub use error::ApiError;
pub use metrics::Metrics;

use crate::auth::{self, Need, Scope, Token};
use crate::bgp::BgpStatus;
use crate::clock::now_ms;
use crate::consensus::{Consensus, NodeId, Role, Written};
use crate::failover::Failover;
use crate::model::{
    self, Command, MemberSpec, MemberState, Proposal, Registry, Response as Outcome, ServiceDef,
};
use crate::render::{self, NodeContext, RenderInput, RenderStatus, Template};
use crate::views::{
    self, AddNodeBody, Audit, AuditQuery, Backup, ClusterView, FailoverView, Healthz, NodeStatus,
    NodeView, OneServiceView, RegisterBody, Renewed, ServiceBody, ServiceView, ServicesView,
    StateBody, TokenBody, TokenCreated, TokenInfo, Tokens as TokenList, BACKUP_FORMAT,
};
use tokio::sync::watch;

/// Client request bodies are small; anything larger is a mistake or an attack.
pub const BODY_LIMIT: usize = 64 * 1024;

/// Everything a handler needs.
#[derive(Clone)]
pub struct AppState {
    pub consensus: Consensus,
    pub tokens: Arc<Tokens>,
    pub auth_failures: Arc<FailureLimit>,
    pub role: Role,
    pub advertise: String,
    /// How unknown services are created on first registration; `None`: never.
    pub service_defaults: Option<model::ServiceDefaults>,
    /// `None` on a witness, which renders nothing.
    pub render: Option<watch::Receiver<RenderStatus>>,
    pub template: Option<Arc<Template>>,
    pub render_node: NodeContext,
    /// The /metrics registry, with the write latencies as this node's
    /// clients see them.
    pub metrics: Arc<Metrics>,
    /// What the renderer renders from; the dry run uses the same input.
    pub render_input: watch::Receiver<RenderInput>,
    /// VIP status and graceful step-down.
    pub failover: Failover,
    /// haproxy's own view (`show stat`); `None` without an admin socket.
    pub haproxy_stat: Option<render::stat::Latest>,
    /// This node's recent VIP, leader and render events.
    pub timeline: crate::timeline::Timeline,
    /// `--vip-mode bgp` on a balancer: the announcement and drain.
    pub bgp: Option<crate::bgp::Bgp>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/services", get(list_services))
        .route(
            "/v1/services/{service}",
            get(get_service).put(define_service),
        )
        .route(
            "/v1/services/{service}/members/{member}",
            put(register).delete(unregister),
        )
        .route(
            "/v1/services/{service}/members/{member}/state",
            put(set_member_state),
        )
        .route("/v1/services/{service}/members/{member}/renew", put(renew))
        .route("/v1/cluster", get(cluster))
        .route("/ui", get(ui::page).post(ui::sign_in_post))
        .route("/v1/node", get(node_status))
        .route("/v1/render", get(dry_run))
        .route("/v1/cluster/nodes", post(add_node))
        .route("/v1/cluster/failover", post(failover))
        .route("/v1/cluster/nodes/{id}", delete(remove_node))
        .route("/v1/cluster/nodes/{id}/drain", post(drain_node))
        .route("/v1/cluster/nodes/{id}/ready", post(ready_node))
        .route("/v1/tokens", get(list_tokens).post(create_token))
        .route("/v1/tokens/{id}", delete(revoke_token))
        .route("/v1/audit", get(audit))
        .route("/v1/snapshot", get(snapshot))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics::scrape))
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .fallback(not_found)
        .layer(axum::middleware::from_fn(announced_size))
        .with_state(state)
}

/// A body announced larger than the limit is refused from its headers,
/// before authentication and before any of it is read.
async fn announced_size(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let announced = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > BODY_LIMIT as u64) {
        return ApiError::BadRequest {
            message: format!("request body larger than {BODY_LIMIT} bytes"),
            status: StatusCode::PAYLOAD_TOO_LARGE,
        }
        .into_response();
    }
    next.run(req).await
}

async fn not_found() -> ApiError {
    ApiError::NotFound("route".into())
}

/// Turns a replicated outcome into the HTTP answer.
fn answer(w: Written) -> Result<Json<views::Written>, ApiError> {
    match w.response {
        Outcome::Done => Ok(Json(views::Written { index: w.index })),
        Outcome::NotFound { what } => Err(ApiError::NotFound(what)),
        Outcome::Rejected { reason } => Err(ApiError::Conflict(reason)),
        // Consensus answers each batched proposal with its own response.
        Outcome::Batch(_) => Err(ApiError::Consensus(
            crate::consensus::ConsensusError::Unknown("a batch response reached the API".into()),
        )),
    }
}

async fn write(
    state: &AppState,
    by: &Principal,
    cmd: Command,
) -> Result<Json<views::Written>, ApiError> {
    write_forced(state, by, cmd, false).await
}

/// `force` overrides the removal guardrail.
async fn write_forced(
    state: &AppState,
    by: &Principal,
    cmd: Command,
    force: bool,
) -> Result<Json<views::Written>, ApiError> {
    cmd.validate()?;
    let proposal = Proposal {
        cmd,
        by: by.id.clone(),
        at_ms: now_ms(),
        force,
    };
    let started = std::time::Instant::now();
    let written = state.consensus.write(proposal, by.scope.clone()).await;
    state.metrics.observe_write(started.elapsed());
    answer(written?)
}

async fn register(
    State(state): State<AppState>,
    p: Principal,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Result<Json<RegisterBody>, JsonRejection>,
) -> Result<Json<views::Written>, ApiError> {
    let Path((service, member)) = path?;
    p.require(Need::Member {
        service: &service,
        member: &member,
    })?;
    let Json(body) = body?;
    model::validate_name("service", &service)?;
    model::validate_name("member", &member)?;
    let spec = MemberSpec {
        address: body.address,
        port: body
            .port
            .map(|p| model::validate_port("port", p))
            .transpose()?,
        weight: body.weight.map(model::validate_weight).transpose()?,
        ttl_s: body.ttl_s,
    };
    let create = state
        .service_defaults
        .as_ref()
        .and_then(|d| d.definition(&service));
    let cmd = Command::Register {
        service: service.clone(),
        member,
        spec,
        create,
        at_ms: now_ms(),
    };
    write(&state, &p, cmd).await.map_err(|e| match e {
        ApiError::NotFound(what) if what.starts_with("service") => ApiError::NotFound(format!(
            "{what} (define it first: PUT /v1/services/{service} with its port)"
        )),
        e => e,
    })
}

async fn unregister(
    State(state): State<AppState>,
    p: Principal,
    path: Result<Path<(String, String)>, PathRejection>,
    force: Result<Query<ForceParams>, QueryRejection>,
) -> Result<Json<views::Written>, ApiError> {
    let Query(force) = force?;
    let Path((service, member)) = path?;
    p.require(Need::Member {
        service: &service,
        member: &member,
    })?;
    let cmd = Command::Unregister { service, member };
    write_forced(&state, &p, cmd, force.force.unwrap_or(false)).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ForceParams {
    force: Option<bool>,
}

async fn renew(
    State(state): State<AppState>,
    p: Principal,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Result<Json<Renewed>, ApiError> {
    let Path((service, member)) = path?;
    model::validate_name("service", &service)?;
    model::validate_name("member", &member)?;
    p.require(Need::Member {
        service: &service,
        member: &member,
    })?;
    if state.consensus.renew(&service, &member).await? {
        Ok(Json(Renewed { renewed: true }))
    } else {
        Err(ApiError::NotFound(format!(
            "member {member} of service {service}"
        )))
    }
}

async fn set_member_state(
    State(state): State<AppState>,
    p: Principal,
    path: Result<Path<(String, String)>, PathRejection>,
    force: Result<Query<ForceParams>, QueryRejection>,
    body: Result<Json<StateBody>, JsonRejection>,
) -> Result<Json<views::Written>, ApiError> {
    let Query(force) = force?;
    let Path((service, member)) = path?;
    p.require(Need::Member {
        service: &service,
        member: &member,
    })?;
    let Json(body) = body?;
    let new_state: MemberState = body.state.parse()?;
    let cmd = Command::SetMemberState {
        service,
        member,
        state: new_state,
    };
    write_forced(&state, &p, cmd, force.force.unwrap_or(false)).await
}

async fn define_service(
    State(state): State<AppState>,
    p: Principal,
    path: Result<Path<String>, PathRejection>,
    body: Result<Json<ServiceBody>, JsonRejection>,
) -> Result<Json<views::Written>, ApiError> {
    let Path(service) = path?;
    p.require(Need::Admin)?;
    let Json(body) = body?;
    let port = model::validate_port("port", body.port)?;
    let def = ServiceDef {
        port,
        member_port: body
            .member_port
            .map(|p| model::validate_port("member_port", p))
            .transpose()?
            .unwrap_or(port),
        mode: body.mode.unwrap_or_default(),
        balance: body.balance.unwrap_or_default(),
        check: body.check.unwrap_or_default(),
        server: body.server.unwrap_or_default(),
    };
    write(&state, &p, Command::DefineService { service, def }).await
}

#[derive(Debug, Deserialize)]
struct ReadParams {
    consistent: Option<bool>,
}

/// The registry to answer a read from: local, or after a read barrier.
async fn read_registry(
    state: &AppState,
    params: Result<Query<ReadParams>, QueryRejection>,
) -> Result<(u64, Arc<Registry>), ApiError> {
    let Query(params) = params?;
    if params.consistent.unwrap_or(false) {
        state.consensus.read_barrier().await?;
    }
    let applied = state.consensus.applied();
    Ok((applied.index, applied.registry.clone()))
}

fn service_view(svc: &model::Service) -> ServiceView {
    ServiceView {
        def: svc.def.clone(),
        members: svc.members.clone(),
    }
}

async fn list_services(
    State(state): State<AppState>,
    p: Principal,
    params: Result<Query<ReadParams>, QueryRejection>,
) -> Result<Json<ServicesView>, ApiError> {
    p.require(Need::Read)?;
    let (index, reg) = read_registry(&state, params).await?;
    let services = reg
        .services
        .iter()
        .map(|(name, svc)| (name.clone(), service_view(svc)))
        .collect();
    Ok(Json(ServicesView { index, services }))
}

async fn get_service(
    State(state): State<AppState>,
    p: Principal,
    path: Result<Path<String>, PathRejection>,
    params: Result<Query<ReadParams>, QueryRejection>,
) -> Result<Json<OneServiceView>, ApiError> {
    let Path(service) = path?;
    p.require(Need::Read)?;
    model::validate_name("service", &service)?;
    let (index, reg) = read_registry(&state, params).await?;
    let svc = reg
        .services
        .get(&service)
        .ok_or_else(|| ApiError::NotFound(format!("service {service}")))?;
    Ok(Json(OneServiceView {
        index,
        definition: service_view(svc),
        service,
    }))
}

/// This node's view of the cluster (without the other nodes' status).
pub fn cluster_view(state: &AppState) -> ClusterView {
    let m = state.consensus.raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let applied = state.consensus.applied();
    let codecs = state.consensus.peer_client().codecs();
    ClusterView {
        node_id: state.consensus.id,
        role: Some(state.role),
        advertise: state.advertise.clone(),
        cluster_id: state.consensus.cluster_id(),
        state: m.state.into(),
        leader: m.current_leader,
        term: m.current_term,
        voters: membership.voter_ids().collect(),
        learners: membership.learner_ids().collect(),
        nodes: membership
            .nodes()
            .map(|(id, n)| (*id, n.addr.clone()))
            .collect(),
        applied_index: applied.index,
        last_log_index: m.last_log_index,
        purged_index: m.purged.map(|l| l.index),
        millis_since_quorum_ack: m.millis_since_quorum_ack,
        members: applied.registry.member_count() as u64,
        vip_holder: state.failover.holder(state.consensus.id, m.current_leader),
        vip: state.failover.status(),
        node_status: Default::default(),
        peer_codecs: membership
            .nodes()
            .filter_map(|(id, n)| Some((*id, codecs.get(&n.addr)?.name().to_string())))
            .collect(),
    }
}

/// This node's own state: what `/v1/cluster` collects from every node.
pub fn node_view(state: &AppState) -> NodeView {
    let m = state.consensus.raft.metrics().borrow().clone();
    let vip = state.failover.status();
    NodeView {
        node_id: state.consensus.id,
        role: Some(state.role),
        advertise: state.advertise.clone(),
        state: m.state.into(),
        term: m.current_term,
        leader: m.current_leader,
        applied_index: state.consensus.applied().index,
        vip_held: vip.held,
        healthy: vip.healthy,
        may_campaign: vip.may_campaign,
        health_reason: vip.health_reason,
        render: state.render.as_ref().map(|r| r.borrow().clone()),
        haproxy: state.haproxy_stat.as_ref().and_then(|s| s.borrow().clone()),
        timeline: state.timeline.events(now_ms()),
        bgp: state.bgp.as_ref().map(|b| b.status()),
    }
}

async fn node_status(
    State(state): State<AppState>,
    p: Principal,
) -> Result<Json<NodeView>, ApiError> {
    p.require(Need::Read)?;
    Ok(Json(node_view(&state)))
}

/// The cluster as this node sees it, plus every node's own status.
async fn cluster(
    State(state): State<AppState>,
    p: Principal,
) -> Result<Json<ClusterView>, ApiError> {
    p.require(Need::Read)?;
    Ok(Json(collect_cluster(&state).await))
}

/// How long a node's status may take to arrive for `/v1/cluster` and `/ui`.
const NODE_STATUS_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(500);

/// Another node's [`node_view`], over its peer listener (the caller's
/// read scope was checked here).
async fn fetch_node_view(state: &AppState, addr: &str) -> Result<NodeView, String> {
    let text: String = state
        .consensus
        .peer_client()
        .call(addr, "/raft/node", &(), NODE_STATUS_TIMEOUT)
        .await
        .map_err(|e| e.to_string())?;
    serde_json::from_str(&text).map_err(|e| format!("bad status from {addr}: {e}"))
}

/// [`cluster_view`] plus every node's [`node_view`] (unreachable nodes say
/// so); what `/v1/cluster` and `/ui` show.
async fn collect_cluster(state: &AppState) -> ClusterView {
    let mut view = cluster_view(state);
    let me = state.consensus.id;
    let fetches = view.nodes.iter().map(|(&id, addr)| async move {
        if id == me {
            return (id, NodeStatus::Up(Box::new(node_view(state))));
        }
        let status = match fetch_node_view(state, addr).await {
            Ok(v) => NodeStatus::Up(Box::new(v)),
            Err(e) => NodeStatus::Unreachable {
                error: format!("unreachable: {e}"),
            },
        };
        (id, status)
    });
    let statuses = futures::future::join_all(fetches).await;
    view.node_status = statuses.into_iter().collect();
    view
}

/// Peer RPCs of the API layer, served on the peer listener behind the peer
/// authentication gate: a node's own status, and `clb failover` forwarded
/// to the leader.
pub fn peer_routes(state: AppState) -> Router {
    Router::new()
        .route("/raft/node", post(peer_node))
        .route("/raft/failover", post(peer_failover))
        .route("/raft/bgp-drain", post(peer_bgp_drain))
        .with_state(state)
}

async fn peer_node(State(state): State<AppState>) -> Response {
    let text = serde_json::to_string(&node_view(&state)).unwrap_or_default();
    crate::consensus::rpc::encode(&text)
}

/// A failover refusal as it crosses to the node that took the request.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct FailoverRefusal {
    /// A hand-over is already running (409), else unavailable (503).
    busy: bool,
    message: String,
}

async fn peer_failover(State(state): State<AppState>) -> Response {
    let answer: Result<String, FailoverRefusal> = match failover_here(&state).await {
        Ok(v) => Ok(serde_json::to_string(&v).unwrap_or_default()),
        Err(e) => Err(FailoverRefusal {
            busy: matches!(e, ApiError::Conflict(_)),
            message: e.to_string(),
        }),
    };
    crate::consensus::rpc::encode(&answer)
}

/// The config this node would render from its current registry: a dry run.
async fn dry_run(State(state): State<AppState>, p: Principal) -> Result<Response, ApiError> {
    p.require(Need::Read)?;
    let Some(template) = &state.template else {
        return Err(ApiError::Conflict("a witness renders nothing".into()));
    };
    let input = state.render_input.borrow().clone();
    let text = render::render_text(template, &state.render_node, &input)
        .map_err(|e| ApiError::Conflict(e.to_string()))?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

async fn add_node(
    State(state): State<AppState>,
    p: Principal,
    body: Result<Json<AddNodeBody>, JsonRejection>,
) -> Result<Json<views::Written>, ApiError> {
    p.require(Need::Admin)?;
    let Json(body) = body?;
    if body.id == 0 {
        return Err(model::InvalidField {
            field: "id",
            reason: "must be at least 1".into(),
        }
        .into());
    }
    model::validate_host_port("addr", &body.addr)?;
    let index = state
        .consensus
        .add_node(body.id, body.addr, body.learner)
        .await?;
    Ok(Json(views::Written { index }))
}

async fn remove_node(
    State(state): State<AppState>,
    p: Principal,
    path: Result<Path<NodeId>, PathRejection>,
) -> Result<Json<views::Written>, ApiError> {
    let Path(id) = path?;
    p.require(Need::Admin)?;
    let index = state.consensus.remove_node(id).await?;
    Ok(Json(views::Written { index }))
}

async fn create_token(
    State(state): State<AppState>,
    p: Principal,
    body: Result<Json<TokenBody>, JsonRejection>,
) -> Result<Json<TokenCreated>, ApiError> {
    p.require(Need::Admin)?;
    let Json(body) = body?;
    let scope: Scope = body.scope.parse()?;
    let now = now_ms();
    let expires_at_ms = body
        .ttl
        .as_deref()
        .map(auth::parse_ttl)
        .transpose()?
        .map(|s| now + s * 1_000);
    let (id, secret) = auth::new_secret();
    let name = body.name.unwrap_or_default();
    let token = Token {
        name: name.clone(),
        scope: scope.clone(),
        hash: auth::sha256_hex(secret.as_bytes()),
        created_at_ms: now,
        expires_at_ms,
        created_by: p.id.clone(),
    };
    let Json(written) = write(
        &state,
        &p,
        Command::CreateToken {
            id: id.clone(),
            token,
        },
    )
    .await?;
    // The secret is shown once; only its hash is stored.
    Ok(Json(TokenCreated {
        index: written.index,
        id,
        secret,
        name,
        scope: scope.to_string(),
        expires_at_ms,
    }))
}

async fn list_tokens(
    State(state): State<AppState>,
    p: Principal,
) -> Result<Json<TokenList>, ApiError> {
    p.require(Need::Admin)?;
    let applied = state.consensus.applied();
    let tokens = applied
        .registry
        .tokens
        .iter()
        .map(|(id, t)| TokenInfo {
            id: id.clone(),
            name: t.name.clone(),
            scope: t.scope.to_string(),
            created_at_ms: t.created_at_ms,
            created_by: t.created_by.clone(),
            expires_at_ms: t.expires_at_ms,
        })
        .collect();
    Ok(Json(TokenList {
        index: applied.index,
        tokens,
    }))
}

async fn revoke_token(
    State(state): State<AppState>,
    p: Principal,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<views::Written>, ApiError> {
    p.require(Need::Admin)?;
    let Path(id) = path?;
    write(&state, &p, Command::RevokeToken { id }).await
}

async fn audit(
    State(state): State<AppState>,
    p: Principal,
    params: Result<Query<AuditQuery>, QueryRejection>,
) -> Result<Json<Audit>, ApiError> {
    p.require(Need::Read)?;
    let Query(q) = params?;
    if let Some(s) = &q.service {
        model::validate_name("service", s)?;
    }
    let since = q.since.unwrap_or(0);
    let limit = q.limit.unwrap_or(1_000).min(10_000);
    let entries = state
        .consensus
        .audit(
            |e| {
                e.at_ms >= since
                    && q.service
                        .as_ref()
                        .is_none_or(|s| e.service.as_ref() == Some(s))
            },
            limit,
        )
        .map_err(|e| ApiError::Internal(format!("reading the audit log: {e}")))?;
    Ok(Json(Audit { entries }))
}

/// A linearizable copy of the registry and tokens (hashes only), for backups.
async fn snapshot(State(state): State<AppState>, p: Principal) -> Result<Json<Backup>, ApiError> {
    p.require(Need::Admin)?;
    let index = state.consensus.read_barrier().await?;
    let applied = state.consensus.applied();
    Ok(Json(Backup {
        format: BACKUP_FORMAT.into(),
        index: index.max(applied.index),
        registry: (*applied.registry).clone(),
    }))
}

async fn healthz(State(state): State<AppState>) -> Response {
    let m = state.consensus.raft.metrics().borrow().clone();
    let ok = m.running_state.is_ok();
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(Healthz {
            ok,
            node_id: state.consensus.id,
            leader: m.current_leader,
            vip_held: state.failover.status().held,
        }),
    )
        .into_response()
}

/// `POST /v1/cluster/failover`: the leader steps down gracefully and reports
/// where leadership and the VIP went; a follower forwards to the leader over
/// the peer listener.
async fn failover(
    State(state): State<AppState>,
    p: Principal,
) -> Result<Json<FailoverView>, ApiError> {
    p.require(Need::Admin)?;
    let m = state.consensus.raft.metrics().borrow().clone();
    match m.current_leader {
        Some(l) if l == state.consensus.id => Ok(Json(failover_here(&state).await?)),
        Some(l) => {
            let addr = m
                .membership_config
                .membership()
                .get_node(&l)
                .map(|n| n.addr.clone())
                .ok_or_else(|| unavailable(format!("no address for leader {l}")))?;
            let answer: Result<String, FailoverRefusal> = state
                .consensus
                .peer_client()
                .call(
                    &addr,
                    "/raft/failover",
                    &(),
                    std::time::Duration::from_secs(30),
                )
                .await
                .map_err(|e| ApiError::Forward(format!("forward to leader {l}: {e}")))?;
            match answer {
                Ok(text) => serde_json::from_str(&text)
                    .map(Json)
                    .map_err(|e| unavailable(format!("leader {l}: {e}"))),
                Err(r) if r.busy => Err(ApiError::Conflict(r.message)),
                Err(r) => Err(ApiError::Failover(format!("leader {l}: {}", r.message))),
            }
        }
        None => Err(unavailable("no leader elected".into())),
    }
}

/// How long `clb drain-node` waits for the drain and withdrawal; past it
/// the answer shows where the announcer is.
const DRAIN_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

async fn drain_node(
    state: State<AppState>,
    p: Principal,
    path: Result<Path<NodeId>, PathRejection>,
) -> Result<Json<BgpStatus>, ApiError> {
    let Path(id) = path?;
    set_drained(state, p, id, true).await
}

async fn ready_node(
    state: State<AppState>,
    p: Principal,
    path: Result<Path<NodeId>, PathRejection>,
) -> Result<Json<BgpStatus>, ApiError> {
    let Path(id) = path?;
    set_drained(state, p, id, false).await
}

/// `clb drain-node` / `clb ready-node`: node-local state (an operator's
/// maintenance is no Raft entry), so it is carried to node `id` over the
/// peer listener when it is another node.
async fn set_drained(
    State(state): State<AppState>,
    p: Principal,
    id: NodeId,
    drained: bool,
) -> Result<Json<BgpStatus>, ApiError> {
    p.require(Need::Admin)?;
    if id == state.consensus.id {
        return Ok(Json(drain_here(&state, drained).await?));
    }
    let m = state.consensus.raft.metrics().borrow().clone();
    let addr = m
        .membership_config
        .membership()
        .get_node(&id)
        .map(|n| n.addr.clone())
        .ok_or_else(|| ApiError::NotFound(format!("node {id} is not a member of the cluster")))?;
    let answer: Result<BgpStatus, String> = state
        .consensus
        .peer_client()
        .call(&addr, "/raft/bgp-drain", &drained, DRAIN_WAIT + DRAIN_WAIT)
        .await
        .map_err(|e| ApiError::Forward(format!("forward to node {id}: {e}")))?;
    answer.map(Json).map_err(ApiError::Conflict)
}

async fn drain_here(state: &AppState, drained: bool) -> Result<BgpStatus, ApiError> {
    let Some(bgp) = &state.bgp else {
        return Err(ApiError::Conflict(format!(
            "node {} does not announce the VIP (it runs --vip-mode arp, or is a witness): nothing to drain",
            state.consensus.id
        )));
    };
    bgp.set_drained(drained, DRAIN_WAIT)
        .await
        .map_err(|e| ApiError::Internal(format!("record the drain: {e}")))
}

async fn peer_bgp_drain(State(state): State<AppState>, body: axum::body::Bytes) -> Response {
    let drained: bool = match crate::consensus::rpc::decode(&body) {
        Ok(d) => d,
        Err(r) => return r,
    };
    let answer: Result<BgpStatus, String> =
        drain_here(&state, drained).await.map_err(|e| e.to_string());
    crate::consensus::rpc::encode(&answer)
}

fn unavailable(why: String) -> ApiError {
    ApiError::Consensus(crate::consensus::ConsensusError::Unavailable(why))
}

/// The hand-over on this node, which leads: step down, then follow the VIP
/// to the new leader.
async fn failover_here(state: &AppState) -> Result<FailoverView, ApiError> {
    use crate::failover::FailoverError;
    let started = std::time::Instant::now();
    let done = state.failover.step_down().await.map_err(|e| match e {
        FailoverError::Busy => ApiError::Conflict(e.to_string()),
        FailoverError::NotLeader(_) => unavailable(e.to_string()),
        e => ApiError::Failover(e.to_string()),
    })?;
    let addr = state
        .consensus
        .raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .get_node(&done.new_leader)
        .map(|n| n.addr.clone());
    // Follow the VIP to the new leader (bounded: the answer is still useful without it).
    let vip_configured = state.failover.status().vip.is_some();
    let mut vip_holder = None;
    if let (true, Some(addr)) = (vip_configured, addr) {
        let deadline = started + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline {
            let held = fetch_node_view(state, &addr)
                .await
                .is_ok_and(|v| v.vip_held);
            if held {
                vip_holder = Some(done.new_leader);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
    Ok(FailoverView {
        from: done.from,
        term: done.term,
        new_leader: done.new_leader,
        new_term: done.new_term,
        leader_took_ms: done.took_ms,
        vip_configured,
        vip_holder,
        vip_took_ms: vip_holder.map(|_| started.elapsed().as_millis() as u64),
        release: done.release,
    })
}
