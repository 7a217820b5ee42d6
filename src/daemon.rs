//! Wiring and lifecycle of `clbd`: open storage, start Raft, serve the API
//! and peer RPCs on one listener, and shut down in order.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use openraft::error::Fatal;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::{self, AppState, FailureLimit, Tokens};
use crate::config::{Config, Role};
use crate::consensus::{rpc, Consensus, ConsensusError, StartError, Written};
use crate::failover::{self, Failover};
use crate::model::{Command, Proposal, Response};
use crate::render::{
    self, ApplyOutcome, NodeContext, Peer, RenderInput, RenderSettings, RenderStatus, Template,
    TemplateError,
};
use crate::restore::Plan;
use crate::views;

/// How long in-flight requests get after SIGTERM before the server stops anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Exit status asking the supervisor to start clbd again later (EX_TEMPFAIL):
/// the data dir could not be written, or Raft stopped on its own. Every
/// other failure exits 1: a refusal that restarting cannot fix.
pub const EXIT_RETRY: i32 = 75;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The data dir cannot be written (full, read-only, failing), at start or
    /// while running. sled cannot carry on after a failed write; a restart
    /// reopens it and Raft catches up from the leader.
    #[error("storage failed: {cause} {during} {dir}; exiting so the supervisor restarts clbd when the disk is writable")]
    Storage {
        cause: String,
        during: &'static str,
        dir: String,
    },
    #[error("raft stopped: {0}; exiting so the supervisor restarts clbd")]
    RaftStopped(String),
    #[error("bind {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("token file {path}: {source}")]
    TokenFile {
        path: String,
        source: std::io::Error,
    },
    #[error("token file {0} has no tokens")]
    NoTokens(String),
    #[error("cluster secret {0}: the first line must hold at least 16 characters")]
    BadSecret(String),
    #[error("listener: {0}")]
    Listener(std::io::Error),
    #[error("{0}")]
    Start(#[from] StartError),
    #[error("serve: {0}")]
    Serve(api::serve::ServeError),
    #[error("{0}")]
    Template(#[from] TemplateError),
    #[error("--restore {path}: {reason}")]
    Restore { path: String, reason: String },
}

impl DaemonError {
    /// [`EXIT_RETRY`] for what may pass (disk full or read-only, address in
    /// use), 1 for refusals a restart cannot fix (configuration, wrong data dir).
    pub fn exit_code(&self) -> i32 {
        match self {
            DaemonError::Storage { .. }
            | DaemonError::RaftStopped(_)
            | DaemonError::Bind { .. } => EXIT_RETRY,
            DaemonError::Start(StartError::OpenStore { .. } | StartError::Raft(_)) => EXIT_RETRY,
            _ => 1,
        }
    }
}

/// Creates the data dir and writes, syncs and removes a probe file in it,
/// so a full or read-only disk stops start-up with its own OS error.
fn check_writable(dir: &Path) -> Result<(), DaemonError> {
    use std::io::Write;
    let probe = dir.join(".clbd-write-probe");
    let attempt = || -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let mut f = std::fs::File::create(&probe)?;
        f.write_all(b"clbd")?;
        f.sync_all()?;
        std::fs::remove_file(&probe)
    };
    attempt().map_err(|e| {
        // A partly written probe must not take the last free bytes.
        let _ = std::fs::remove_file(&probe);
        DaemonError::Storage {
            cause: e.to_string(),
            during: "writing",
            dir: dir.display().to_string(),
        }
    })
}

/// Resolves when Raft fails: a storage error or a panic stopped it, and a
/// stopped Raft never restarts in-process, so the daemon must exit. A
/// normal stop (our shutdown, or a duplicate node id halting) never resolves.
async fn raft_failed(consensus: Consensus, dir: PathBuf) -> DaemonError {
    let mut metrics = consensus.raft.metrics();
    loop {
        let state = metrics.borrow_and_update().running_state.clone();
        match state {
            Ok(()) | Err(Fatal::Stopped) => {}
            Err(Fatal::StorageError(e)) => return storage_failed(&e.to_string(), &dir),
            Err(Fatal::Panicked) => return DaemonError::RaftStopped("raft panicked".into()),
        }
        if metrics.changed().await.is_err() {
            let last = metrics.borrow().running_state.clone();
            return match last {
                Err(Fatal::StorageError(e)) => storage_failed(&e.to_string(), &dir),
                Err(Fatal::Stopped) => std::future::pending().await,
                // A panicking core unwinds without a last report.
                Ok(()) | Err(Fatal::Panicked) => DaemonError::RaftStopped("raft panicked".into()),
            };
        }
    }
}

/// A fatal storage error, with the OS error pulled out of sled's text
/// (`IO error: Os { code: 28, .. }` or `(os error 5)`) so the line reads
/// like any other.
fn storage_failed(text: &str, dir: &Path) -> DaemonError {
    DaemonError::Storage {
        cause: os_error_in(text)
            .map(|e| e.to_string())
            .unwrap_or_else(|| text.to_string()),
        during: if text.starts_with("when Read") {
            "reading"
        } else {
            "writing"
        },
        dir: dir.display().to_string(),
    }
}

fn os_error_in(text: &str) -> Option<std::io::Error> {
    let code = ["code: ", "(os error "].iter().find_map(|tag| {
        let rest = &text[text.find(tag)? + tag.len()..];
        let end = rest.find(|c: char| !c.is_ascii_digit())?;
        rest[..end].parse().ok()
    })?;
    Some(std::io::Error::from_raw_os_error(code))
}

/// Reads a `clb snapshot save` file, as the entries that restore it.
fn read_restore(path: &Path) -> Result<Plan, DaemonError> {
    let err = |reason: String| DaemonError::Restore {
        path: path.display().to_string(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    // The format tag first, so another JSON file gets that one-line reason.
    #[derive(serde::Deserialize)]
    struct Tag {
        format: Option<String>,
    }
    let tag: Tag = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    if tag.format.as_deref() != Some(views::BACKUP_FORMAT) {
        return Err(err(format!("not a {} file", views::BACKUP_FORMAT)));
    }
    let backup: views::Backup = serde_json::from_str(&text).map_err(|e| err(e.to_string()))?;
    let plan = Plan::new(backup.registry);
    // Everything must pass today's validation before anything is written.
    for cmd in plan.commands() {
        cmd.validate().map_err(|e| err(e.to_string()))?;
    }
    Ok(plan)
}

/// Proposes the backup once the cluster has a leader: its parts in order,
/// then the commit that makes them live at once, into an empty registry
/// only. Every node given the same file proposes the same entries, and a
/// part already staged is answered `Done` again, so any number of nodes may
/// be given `--restore`, and one restarted midway carries on where it was:
/// the backup goes live exactly once.
fn spawn_restore(consensus: Consensus, plan: Plan, path: String) {
    tokio::spawn(async move {
        let members = plan.registry.member_count();
        let commands = plan.commands();
        if commands.is_empty() {
            tracing::warn!(%path, "--restore: the backup is empty; nothing to restore");
            return;
        }
        let parts = commands.len() - 1;
        let mut index = 0;
        for cmd in commands {
            // Staged already (this node's run before a restart, or another
            // node's): committed, so the leader has it too.
            if let Command::RestoreChunk { seq, .. } = &cmd {
                let staged = consensus.applied().registry.restoring.clone();
                if staged.is_some_and(|s| s.id == plan.id && s.parts > *seq) {
                    continue;
                }
            }
            match propose_restore(&consensus, cmd).await {
                Some(Ok(w)) if w.response == Response::Done => index = w.index,
                Some(outcome) => {
                    // This node's restore before a restart, or another node's
                    // of the same file, may have gone live already.
                    let restored = consensus.read_barrier().await.is_ok()
                        && *consensus.applied().registry == plan.registry;
                    if restored {
                        tracing::info!(%path, "--restore: the registry already holds this backup");
                    } else {
                        let outcome = outcome.map(|w| w.response);
                        tracing::warn!(%path, ?outcome, "--restore not applied");
                    }
                    return;
                }
                None => {
                    tracing::error!(%path, "--restore gave up: no leader");
                    return;
                }
            }
        }
        tracing::info!(%path, index, members, parts, "restored the registry");
    });
}

/// Writes one restore entry, retrying while there is no leader, and after an
/// unknown outcome: a part staged twice is staged once, and a commit that
/// went through is recognized afterwards. `None` when no leader answered.
async fn propose_restore(
    consensus: &Consensus,
    cmd: Command,
) -> Option<Result<Written, ConsensusError>> {
    let proposal = Proposal {
        cmd,
        by: "restore".into(),
        at_ms: crate::clock::now_ms(),
        force: true,
    };
    // The write waits for a leader for the forward timeout; retry a few times.
    for _ in 0..12 {
        match consensus
            .write(proposal.clone(), crate::auth::Scope::Admin)
            .await
        {
            Ok(w) => return Some(Ok(w)),
            Err(e @ ConsensusError::Rejected(_)) => return Some(Err(e)),
            Err(e) => tracing::warn!(cause = %e, "--restore: waiting for a leader"),
        }
    }
    None
}

/// The command that validates rendered configs. Without haproxy installed
/// (a first try on a laptop) the default cannot run: files are then written
/// unvalidated, and there is no haproxy they could go live in.
fn validate_cmd(config: &Config) -> Option<String> {
    if let Some(cmd) = &config.validate_cmd {
        return Some(cmd.clone());
    }
    // By name through `sh`, so it must be on PATH.
    if crate::on_path("haproxy").is_some() {
        Some("haproxy -c -q -f {}".into())
    } else {
        tracing::warn!("haproxy is not installed: rendered configs are written unvalidated");
        None
    }
}

/// Turns render status into failover health: until the first apply, and
/// after an apply failure (haproxy down, its socket missing, a reload that
/// failed), the node is unhealthy; a config haproxy rejected is not, since
/// the last good one keeps serving. Before the first apply a restarted
/// balancer could otherwise take the VIP while its haproxy is still starting
/// (seen in the failover drills: campaigning 100 ms after start, haproxy
/// answering a second later).
fn render_health(s: &RenderStatus) -> failover::Health {
    match s.last_apply {
        None => failover::Health::unhealthy("haproxy has not taken a configuration yet"),
        Some(ApplyOutcome::Failed) => failover::Health::unhealthy(
            s.last_error
                .clone()
                .unwrap_or_else(|| "haproxy apply failed".into()),
        ),
        Some(_) => failover::Health::healthy(),
    }
}

fn feed_health(mut status: watch::Receiver<RenderStatus>, tx: failover::HealthSender) {
    tokio::spawn(async move {
        loop {
            let health = render_health(&status.borrow_and_update());
            tx.send_if_modified(|cur| {
                let changed = *cur != health;
                *cur = health;
                changed
            });
            if status.changed().await.is_err() {
                return;
            }
        }
    });
}

/// Node-local template values from the config.
pub fn node_context(config: &Config) -> NodeContext {
    NodeContext {
        node_id: config.node_id,
        role: match config.role {
            Role::Balancer => "balancer".into(),
            Role::Witness => "witness".into(),
        },
        vip: config.vip.clone(),
        haproxy_socket: config
            .haproxy_socket
            .as_ref()
            .map(|p| p.display().to_string()),
        haproxy_socket_group: config.haproxy_socket_group.clone(),
        bind_address: config.bind_address.clone(),
        stats_bind: "127.0.0.1".into(),
        stats_port: config.stats_port,
        ..Default::default()
    }
}

/// The renderer's input: applied registry plus leader and peers, updated
/// only when one of them changes.
pub fn render_input(consensus: &Consensus) -> watch::Receiver<RenderInput> {
    let (tx, rx) = watch::channel(input_now(consensus));
    let mut applied = consensus.subscribe();
    let mut metrics = consensus.raft.metrics();
    let consensus = consensus.clone();
    tokio::spawn(async move {
        loop {
            tokio::select! {
                r = applied.changed() => if r.is_err() { return },
                r = metrics.changed() => if r.is_err() { return },
            }
            let next = input_now(&consensus);
            tx.send_if_modified(|cur| {
                let same =
                    cur.index == next.index && cur.leader == next.leader && cur.peers == next.peers;
                if !same {
                    *cur = next;
                }
                !same
            });
            if tx.is_closed() {
                return;
            }
        }
    });
    rx
}

fn input_now(consensus: &Consensus) -> RenderInput {
    let applied = consensus.applied();
    let m = consensus.raft.metrics().borrow().clone();
    RenderInput {
        index: applied.index,
        registry: applied.registry.clone(),
        leader: m.current_leader,
        peers: m
            .membership_config
            .membership()
            .nodes()
            .map(|(id, n)| Peer {
                id: *id,
                addr: n.addr.clone(),
            })
            .collect(),
    }
}

/// The two bound sockets: clients, and peers apart from them, so a flood of
/// clients cannot starve replication.
pub struct Listeners {
    pub api: TcpListener,
    pub peer: TcpListener,
}

impl Listeners {
    /// Binds `--listen` and `--peer-listen`.
    pub async fn bind(config: &Config) -> Result<Listeners, DaemonError> {
        Ok(Listeners {
            api: listen(config.listen)?,
            peer: listen(config.peer_listen)?,
        })
    }
}

/// How many connections the kernel queues before we accept them. A burst of
/// clients (a flood, or members registering at boot) must not fill the queue:
/// the kernel then drops new SYNs, and a health probe arriving behind the
/// burst waits for TCP's 1 s SYN retransmission (measured in tests/flood.rs).
/// The kernel caps it at net.core.somaxconn.
const ACCEPT_BACKLOG: u32 = 8192;

/// A listener with [`ACCEPT_BACKLOG`] and address reuse, like `TcpListener::bind`.
pub fn listen(addr: std::net::SocketAddr) -> Result<TcpListener, DaemonError> {
    let bind = || -> std::io::Result<TcpListener> {
        let socket = match addr {
            std::net::SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            std::net::SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(ACCEPT_BACKLOG)
    };
    bind().map_err(|source| DaemonError::Bind { addr, source })
}

/// Limits of the peer listener: peers are few but may run many requests at
/// once (forwarded writes under load), so no small per-address cap.
fn peer_limits(client: &api::serve::Limits) -> api::serve::Limits {
    api::serve::Limits {
        max_connections_per_ip: client.max_connections,
        ..client.clone()
    }
}

/// The cluster secret of a lone node: DATA_DIR/cluster-secret, made on
/// first start like the admin token; nodes it adds are given a copy.
fn generated_secret(dir: &Path) -> Result<String, DaemonError> {
    let path = dir.join("cluster-secret");
    if !path.exists() {
        write_new_secret(&path)?;
        tracing::info!(path = %path.display(), "generated the cluster secret; nodes added later need a copy (--cluster-secret-file)");
    }
    let text = std::fs::read_to_string(&path).map_err(|source| DaemonError::TokenFile {
        path: path.display().to_string(),
        source,
    })?;
    match text.lines().map(str::trim).find(|l| !l.is_empty()) {
        Some(s) if s.len() >= 16 => Ok(s.to_string()),
        _ => Err(DaemonError::BadSecret(path.display().to_string())),
    }
}

/// Runs a node until `shutdown` resolves. The listeners are already bound,
/// so callers (and tests) choose the ports, including port 0.
pub async fn run(
    mut config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    let Listeners {
        api: listener,
        peer: peer_listener,
    } = listeners;
    let api_bound = listener.local_addr().map_err(DaemonError::Listener)?;
    let bound = peer_listener.local_addr().map_err(DaemonError::Listener)?;
    check_writable(&config.data_dir)?;
    match config.peer_auth {
        crate::config::PeerAuth::Secret(_) => {}
        crate::config::PeerAuth::Generated => {
            config.raft.cluster_secret = Some(generated_secret(&config.data_dir)?);
        }
        crate::config::PeerAuth::Insecure => tracing::warn!(
            peer_listen = %bound,
            "--insecure-peers: peer RPCs are not authenticated; anyone who reaches the peer \
             port can rewrite the registry, create admin tokens and depose the leader"
        ),
    }
    let tokens = load_tokens(&config)?;
    // A bad backup stops start-up before anything runs.
    let restore = config.restore.as_deref().map(read_restore).transpose()?;
    let advertise = config.advertise_addr(bound);
    // A broken template stops start-up, before anything else happens.
    let template = match config.role {
        Role::Balancer => Some(Arc::new(Template::load(config.template_dir.as_deref())?)),
        Role::Witness => None,
    };
    let (stop_tx, mut stop_rx) = watch::channel(false);
    let stop_tx = Arc::new(stop_tx);
    // SIGTERM first hands leadership over (below), then stops everything.
    let (asked_tx, asked_rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        shutdown.await;
        let _ = asked_tx.send(());
    });
    let consensus = Consensus::start(
        config.node_id,
        &config.data_dir,
        config.bootstrap(bound),
        &config.raft,
    )
    .await?;
    tracing::info!(listen = %api_bound, peer_listen = %bound, %advertise, role = ?config.role, "clbd ready");
    // A failed disk stops Raft for good: shut down like on SIGTERM (the VIP
    // is released first) and exit with the reason.
    let (failed_tx, mut failed_rx) = tokio::sync::oneshot::channel();
    tokio::spawn({
        let failed = raft_failed(consensus.clone(), config.data_dir.clone());
        let mut stopping = stop_rx.clone();
        let stop_tx = stop_tx.clone();
        async move {
            tokio::select! {
                biased;
                _ = stopping.wait_for(|s| *s) => {}
                e = failed => {
                    tracing::error!("{e}");
                    let _ = failed_tx.send(e);
                    let _ = stop_tx.send(true);
                }
            }
        }
    });
    consensus.spawn_ttl_reaper();
    if let (Some(path), Some(plan)) = (&config.restore, restore) {
        spawn_restore(consensus.clone(), plan, path.display().to_string());
    }

    let (health_tx, health_rx) = failover::health_input();
    let failover = Failover::start(
        consensus.leadership(),
        config.failover.clone(),
        health_rx,
        stop_rx.clone(),
    );

    let input = render_input(&consensus);
    // A witness renders nothing.
    let rendering = template.clone().map(|template| {
        let settings = RenderSettings {
            output: config.output.clone(),
            template,
            validate_cmd: validate_cmd(&config),
            haproxy_socket: config.haproxy_socket.clone(),
            master_socket: config.haproxy_master_socket.clone(),
            reload_cmd: config.reload_cmd.clone(),
            reload_min_interval: config.reload_min_interval,
            coalesce: config.render_coalesce,
            file_lag: config.file_lag,
            node: node_context(&config),
            builtin_template: config.template_dir.is_none(),
        };
        render::spawn(settings, input.clone(), stop_rx.clone())
    });
    let (render_status, render_task) = rendering.unzip();
    // `--haproxy supervise`: haproxy starts once the first config is in place.
    let supervisor = match (&config.supervise, config.role) {
        (Some(s), Role::Balancer) => match render::supervise::Supervisor::start(s.clone()) {
            Ok(sup) => Some(sup),
            Err(e) => {
                tracing::error!(cause = %e, "cannot start the haproxy supervisor thread; haproxy will not run");
                None
            }
        },
        _ => None,
    };
    // A balancer whose haproxy cannot take its config does not lead.
    match &render_status {
        Some(status) => feed_health(status.clone(), health_tx),
        // A witness has no haproxy to gate it; keep the sender alive.
        None => drop(tokio::spawn(async move {
            health_tx.closed().await;
        })),
    }

    // bgp mode: announce the VIP while fit. Its own stop signal, so the
    // withdrawal (and its drain) runs before anything else stops.
    let (bgp_stop_tx, bgp_stop_rx) = watch::channel(false);
    let bgp = match (&config.bgp, &render_status) {
        (Some(cfg), Some(render)) => Some(crate::bgp::Bgp::start(
            cfg.clone(),
            crate::bgp::Sources {
                consensus: consensus.clone(),
                render: render.clone(),
                failover: failover.subscribe(),
            },
            bgp_stop_rx,
        )),
        _ => None,
    };
    tokio::spawn({
        let (consensus, failover, stop_tx) = (consensus.clone(), failover.clone(), stop_tx.clone());
        let drain = config
            .failover
            .drain
            .as_ref()
            .map(|d| d.max)
            .unwrap_or_default();
        let bgp = bgp.clone();
        let bgp_drain = config
            .bgp
            .as_ref()
            .and_then(|b| b.drain.as_ref())
            .map(|d| d.max)
            .unwrap_or_default();
        let mut failed = stop_rx.clone();
        async move {
            let asked = tokio::select! {
                r = asked_rx => r.is_ok(),
                // A failed disk stops the node too: withdraw first.
                _ = failed.wait_for(|s| *s) => false,
            };
            // Traffic leaves this balancer before leadership does.
            if let Some(bgp) = &bgp {
                let _ = bgp_stop_tx.send(true);
                bgp.stopped(bgp_drain + Duration::from_secs(3)).await;
            }
            if asked {
                hand_over_before_stopping(&consensus, &failover, SHUTDOWN_GRACE + drain).await;
            }
            let _ = stop_tx.send(true);
        }
    });

    // haproxy's own view, for /ui: a balancer with an admin socket.
    let haproxy_stat = match (&render_status, &config.haproxy_socket) {
        (Some(status), Some(socket)) => Some(render::stat::spawn(
            socket.clone(),
            status.clone(),
            stop_rx.clone(),
        )),
        _ => None,
    };
    let timeline = crate::timeline::Timeline::default();
    crate::timeline::record(
        timeline.clone(),
        consensus.raft.clone(),
        failover.subscribe(),
        render_status.clone(),
        stop_rx.clone(),
    );

    let tokens = Arc::new(tokens);
    spawn_token_reload(config.clone(), tokens.clone());
    let state = AppState {
        consensus: consensus.clone(),
        tokens,
        auth_failures: Arc::new(FailureLimit::new(
            config.auth_failures_per_minute,
            Duration::from_secs(60),
        )),
        role: config.role,
        advertise,
        service_defaults: config.service_defaults.clone(),
        metrics: Arc::new(api::Metrics::new(
            &consensus,
            render_status.clone(),
            failover.clone(),
            bgp.clone(),
        )),
        render: render_status,
        template,
        render_node: node_context(&config),
        render_input: input,
        failover: failover.clone(),
        haproxy_stat,
        timeline,
        bgp: bgp.clone(),
    };
    let peer_app = rpc::routes(
        consensus.clone(),
        failover.may_campaign(),
        api::peer_routes(state.clone()),
    );
    let app = api::router(state);

    let serve_peers = api::serve::serve(
        peer_listener,
        peer_app,
        config.tls.clone(),
        peer_limits(&config.limits),
        stop_rx.clone(),
    );
    let serve_clients = api::serve::serve(
        listener,
        app,
        config.tls.clone(),
        config.limits.clone(),
        stop_rx.clone(),
    );
    let serve = async move {
        let (peers, clients) = tokio::join!(serve_peers, serve_clients);
        peers.and(clients)
    };
    let grace = async move {
        let _ = stop_rx.wait_for(|s| *s).await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    let result = tokio::select! {
        r = serve => r.map_err(DaemonError::Serve),
        _ = grace => {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "requests still open after the grace period; stopping anyway");
            Ok(())
        }
    };
    // The VIP is released before Raft stops, so a peer can take it over.
    failover.stopped().await;
    if let Some(bgp) = &bgp {
        bgp.stopped(Duration::from_secs(1)).await;
    }
    // The renderer's last act brings a lagging file up to what haproxy
    // runs, so a haproxy started later loads it; bounded, as a render is.
    if let Some(task) = render_task {
        if tokio::time::timeout(Duration::from_secs(10), task)
            .await
            .is_err()
        {
            tracing::warn!(
                "the config file was not brought up to date before exit; the next start renders it"
            );
        }
    }
    // haproxy stops only after the VIP left this host, so no request to it
    // was refused while it was still here.
    if let Some(sup) = supervisor {
        sup.stop().await;
    }
    if let Ok(e) = failed_rx.try_recv() {
        // Raft is already down, and a final flush can only fail again; worse,
        // sled's drop panics when its last sync fails. Keep the database
        // open until the process exits: the next start recovers from what
        // is on disk.
        std::mem::forget(consensus);
        return Err(e);
    }
    tracing::info!("shutting down raft");
    consensus.shutdown().await;
    result
}

/// A leader asked to stop first moves leadership and the VIP to another
/// voter (release, then the successor claims), so a planned restart of the
/// holder is no outage; bounded, and skipped when it has no one to hand to.
async fn hand_over_before_stopping(consensus: &Consensus, failover: &Failover, within: Duration) {
    let m = consensus.raft.metrics().borrow().clone();
    let others = m
        .membership_config
        .membership()
        .voter_ids()
        .filter(|v| *v != consensus.id)
        .count();
    if m.current_leader != Some(consensus.id) || others == 0 {
        return;
    }
    tracing::info!("stopping: handing leadership over first");
    match tokio::time::timeout(within, failover.step_down()).await {
        Ok(Ok(done)) => tracing::info!(
            new_leader = done.new_leader,
            took_ms = done.took_ms,
            "leadership handed over; stopping"
        ),
        Ok(Err(e)) => {
            tracing::warn!(cause = %e, "hand-over before stopping failed; stopping anyway")
        }
        Err(_) => {
            tracing::warn!(grace = ?within, "hand-over before stopping took too long; stopping anyway")
        }
    }
}

/// Re-reads the token files on SIGHUP, so bootstrap tokens rotate without a
/// restart. A file that fails to read keeps the old tokens.
fn spawn_token_reload(config: Config, tokens: Arc<Tokens>) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(cause = %e, "cannot listen for SIGHUP; token files reload only on restart");
            return;
        }
    };
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            match load_tokens(&config) {
                Ok(new) => {
                    tokens.replace(new);
                    tracing::info!("SIGHUP: token files re-read");
                }
                Err(e) => {
                    tracing::error!(cause = %e, "SIGHUP: token files not re-read; the old tokens stay")
                }
            }
        }
    });
}

/// Tokens from `--token-file`; without one, a generated token in
/// `DATA_DIR/token` (0600) so a fresh node is never open to anyone.
fn load_tokens(config: &Config) -> Result<Tokens, DaemonError> {
    let path: PathBuf = match &config.token_file {
        Some(p) => p.clone(),
        None => {
            let p = config.data_dir.join("token");
            if !p.exists() {
                write_new_token(&p)?;
                tracing::info!(path = %p.display(), "generated an admin token");
            }
            p
        }
    };
    let text = std::fs::read_to_string(&path).map_err(|source| DaemonError::TokenFile {
        path: path.display().to_string(),
        source,
    })?;
    let legacy = match &config.legacy_password_file {
        Some(p) => Some(
            std::fs::read_to_string(p).map_err(|source| DaemonError::TokenFile {
                path: p.display().to_string(),
                source,
            })?,
        ),
        None => None,
    };
    let tokens = Tokens::new(&text, legacy.as_deref());
    if tokens.is_empty() {
        return Err(DaemonError::NoTokens(path.display().to_string()));
    }
    Ok(tokens)
}

fn write_new_token(path: &Path) -> Result<(), DaemonError> {
    write_new_secret(path)
}

/// 256 random bits in hex, into a new file only its owner can read.
fn write_new_secret(path: &Path) -> Result<(), DaemonError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let err = |source| DaemonError::TokenFile {
        path: path.display().to_string(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(err)?;
    f.write_all(format!("{}\n", crate::auth::new_cluster_secret()).as_bytes())
        .map_err(err)?;
    f.sync_all().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_balancer_is_unfit_until_haproxy_took_a_configuration() {
        let mut s = RenderStatus::default();
        assert!(!render_health(&s).ok, "before the first apply");
        s.last_apply = Some(ApplyOutcome::Failed);
        s.last_error = Some("apply: connect: refused".into());
        assert_eq!(render_health(&s).reason, "apply: connect: refused");
        for how in [
            ApplyOutcome::Reload,
            ApplyOutcome::Runtime,
            ApplyOutcome::Written,
        ] {
            s.last_apply = Some(how);
            assert!(render_health(&s).ok, "{how:?}");
        }
    }

    #[test]
    fn a_sled_io_error_reads_as_the_os_error() {
        let text = "when Write Logs: sled::result::Error: IO error: Os { code: 28, kind: StorageFull, message: \"No space left on device\" }";
        let e = storage_failed(text, Path::new("/var/lib/clb"));
        assert_eq!(
            e.to_string(),
            "storage failed: No space left on device (os error 28) writing /var/lib/clb; \
             exiting so the supervisor restarts clbd when the disk is writable"
        );
        assert_eq!(e.exit_code(), EXIT_RETRY);
        let e = storage_failed(
            "when Write Logs: sled::result::Error: IO error: Input/output error (os error 5)",
            Path::new("/d"),
        );
        assert!(
            e.to_string()
                .starts_with("storage failed: Input/output error (os error 5) writing /d;"),
            "{e}"
        );
        // Without an OS error the text stays whole.
        let e = storage_failed("when Read Vote: decode failed", Path::new("/d"));
        assert!(e.to_string().contains("decode failed reading /d;"), "{e}");
    }

    #[test]
    fn a_read_only_data_dir_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        check_writable(&data).unwrap();
        assert!(!data.join(".clbd-write-probe").exists());
        // A file where the dir should be: create_dir_all fails like on a read-only disk.
        let blocked = dir.path().join("file");
        std::fs::write(&blocked, "x").unwrap();
        let e = check_writable(&blocked.join("data")).unwrap_err();
        assert!(e.to_string().starts_with("storage failed: "), "{e}");
        assert_eq!(e.exit_code(), EXIT_RETRY);
    }
}
