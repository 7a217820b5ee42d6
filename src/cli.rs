//! The `clb` command line: clap definitions, calls through [`Client`], and
//! output as readable tables or `--json`. Exit codes are stable for scripts.

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};
use serde::Serialize;

use crate::client::{Client, ClientError, ClientOptions};
use crate::model;
use crate::views::{
    Audit, AuditQuery, ClusterView, FailoverView, NodeStatus, ServiceBody, ServiceView, TokenBody,
    Written,
};

/// Exit codes: 0 success; these otherwise (2 is clap's usage error).
pub mod exit {
    pub const FAILED: i32 = 1;
    pub const USAGE: i32 = 2;
    pub const NOT_FOUND: i32 = 3;
    pub const AUTH: i32 = 4;
    pub const UNAVAILABLE: i32 = 5;
    pub const INVALID: i32 = 6;
}

#[derive(Parser, Debug)]
#[command(name = "clb", version, about = "Talk to a clb cluster")]
pub struct Cli {
    /// Servers to try in turn, comma-separated HOST:PORT or URLs
    #[arg(
        long,
        env = "CLB_SERVER",
        default_value = "127.0.0.1:8090",
        global = true
    )]
    pub server: String,
    /// API token
    #[arg(long, env = "CLB_TOKEN", global = true, hide_env_values = true)]
    pub token: Option<String>,
    /// File holding the API token (first line)
    #[arg(long, env = "CLB_TOKEN_FILE", global = true)]
    pub token_file: Option<PathBuf>,
    /// Print JSON instead of tables
    #[arg(long, global = true)]
    pub json: bool,
    /// PEM CA certificate(s) to trust for https:// servers [default: the bundled web roots]
    #[arg(long, env = "CLB_CA", global = true)]
    pub ca: Option<PathBuf>,
    /// Send the token over plain http:// to a non-loopback server anyway
    #[arg(long, env = "CLB_INSECURE", global = true)]
    pub insecure: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Register (or update) a member of a service
    Register {
        service: String,
        member: String,
        #[arg(long)]
        address: String,
        /// Member port [default: the service's member port]
        #[arg(long)]
        port: Option<u16>,
        #[arg(long)]
        weight: Option<u16>,
        /// Remove the member unless re-registered within this many seconds
        #[arg(long)]
        ttl: Option<u32>,
    },
    /// Remove a member from a service
    Unregister {
        service: String,
        member: String,
        /// Override the removal guardrail
        #[arg(long)]
        force: bool,
    },
    /// Stop new sessions to a member, keep existing ones
    Drain {
        service: String,
        member: String,
        /// Override the removal guardrail
        #[arg(long)]
        force: bool,
    },
    /// Take a member out of rotation
    Maint {
        service: String,
        member: String,
        /// Override the removal guardrail
        #[arg(long)]
        force: bool,
    },
    /// Keep a member registered while this process runs (for systemd):
    /// renew every TTL/3; on SIGTERM drain, wait for its connections, unregister
    Agent {
        service: String,
        member: String,
        #[arg(long)]
        address: String,
        /// The member's port (also where the agent counts open connections)
        #[arg(long)]
        port: u16,
        #[arg(long)]
        weight: Option<u16>,
        /// Seconds without renewal after which the leader removes the member
        #[arg(long, default_value_t = 30)]
        ttl: u32,
        /// Longest wait for the member's connections to end after draining
        #[arg(long, default_value_t = 30)]
        drain_timeout: u64,
    },
    /// Backups of the registry and tokens
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Put a member back into rotation
    Ready { service: String, member: String },
    /// List members of one service or all
    Members {
        service: Option<String>,
        /// Linearizable read through the leader
        #[arg(long)]
        consistent: bool,
    },
    /// Define services
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Show this cluster's nodes, leader and indexes
    Status,
    /// Print the haproxy config the server would render now (dry run)
    Render,
    /// Change cluster membership
    #[command(subcommand)]
    Cluster(ClusterCmd),
    /// Create, list and revoke API tokens
    #[command(subcommand)]
    Token(TokenCmd),
    /// Show the replicated history of accepted writes, newest first
    Audit {
        #[arg(long)]
        service: Option<String>,
        /// Only entries newer than this: a duration ago (90d, 12h, 30m) or Unix milliseconds
        #[arg(long)]
        since: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: usize,
    },
    /// Ask the leader to step down: it releases the VIP and a healthy voter takes over
    Failover,
    /// bgp mode: drain balancer ID (hold new connections back, wait for open ones) and withdraw its VIP route; it stays out, also across restarts, until ready-node
    DrainNode { id: crate::consensus::NodeId },
    /// bgp mode: let balancer ID announce the VIP again (as soon as it is fit)
    ReadyNode { id: crate::consensus::NodeId },
    /// Print a new random cluster secret (256 bits, hex) for --cluster-secret-file
    GenSecret,
    /// Start a throw-away local cluster (2 balancers + witness), kill its leader, print the timeline
    Demo {
        /// Do not run haproxy even when it is installed
        #[arg(long)]
        no_haproxy: bool,
        /// Keep the temp dir with logs, data and rendered configs
        #[arg(long)]
        keep: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum ServiceCmd {
    /// Define or change a service
    Set {
        service: String,
        /// Frontend port on the balancers
        #[arg(long)]
        port: u16,
        /// Default member port [default: --port]
        #[arg(long)]
        member_port: Option<u16>,
        /// http or tcp
        #[arg(long)]
        mode: Option<String>,
        /// roundrobin, leastconn, first or random
        #[arg(long)]
        balance: Option<String>,
        /// none, tcp or http:/PATH
        #[arg(long)]
        check: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum SnapshotCmd {
    /// Write the leader's registry and tokens to FILE (restore with clbd --restore FILE)
    Save { file: PathBuf },
}

#[derive(Subcommand, Debug)]
pub enum TokenCmd {
    /// Create a token; its secret is printed once
    Create {
        /// admin, read, register:SERVICE or register:SERVICE:MEMBER-GLOB
        #[arg(long)]
        scope: String,
        /// Lifetime such as 90d, 12h, 30m [default: no expiry]
        #[arg(long)]
        ttl: Option<String>,
        #[arg(long)]
        name: Option<String>,
    },
    /// List tokens (never their secrets)
    List,
    /// Revoke a token on every node
    Revoke { id: String },
}

#[derive(Subcommand, Debug)]
pub enum ClusterCmd {
    /// Add a node: it catches up as a learner, then becomes a voter unless --learner
    Add {
        id: u64,
        addr: String,
        #[arg(long)]
        learner: bool,
    },
    /// Remove a node from the cluster
    Remove { id: u64 },
}

/// A failure with the exit code it maps to.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub message: String,
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        let code = match &e {
            ClientError::Api { status, .. } => match status {
                404 => exit::NOT_FOUND,
                401 | 403 => exit::AUTH,
                503 => exit::UNAVAILABLE,
                400 | 409 | 413 | 415 | 422 => exit::INVALID,
                _ => exit::FAILED,
            },
            ClientError::Unreachable(_) => exit::UNAVAILABLE,
            ClientError::Usage(_) => exit::USAGE,
            ClientError::Decode { .. } => exit::FAILED,
        };
        Failure {
            code,
            message: e.to_string(),
        }
    }
}

impl From<model::InvalidField> for Failure {
    fn from(e: model::InvalidField) -> Self {
        Failure {
            code: exit::INVALID,
            message: e.to_string(),
        }
    }
}

/// Resolves the token from `--token`, then `--token-file`.
pub fn token(cli_token: Option<String>, file: Option<&PathBuf>) -> Result<Option<String>, Failure> {
    if cli_token.is_some() {
        return Ok(cli_token);
    }
    let Some(path) = file else { return Ok(None) };
    let text = std::fs::read_to_string(path).map_err(|e| Failure {
        code: exit::USAGE,
        message: format!("token file {}: {e}", path.display()),
    })?;
    Ok(text
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string))
}

/// Runs one command and returns what to print.
pub async fn run(cli: Cli) -> Result<String, Failure> {
    let token = token(cli.token.clone(), cli.token_file.as_ref())?;
    let options = ClientOptions {
        ca: cli.ca.clone(),
        insecure: cli.insecure,
    };
    // Built before dispatching: a bad --server, --ca or token file fails
    // every command alike, even those that send nothing (gen-secret, demo).
    let client = Client::with_options(&cli.server, token, options)?;
    let ctx = Ctx {
        client,
        json: cli.json,
    };
    match cli.command {
        Command::Register {
            service,
            member,
            address,
            port,
            weight,
            ttl,
        } => register(&ctx, &service, &member, &address, port, weight, ttl).await,
        Command::Unregister {
            service,
            member,
            force,
        } => unregister(&ctx, &service, &member, force).await,
        Command::Drain {
            service,
            member,
            force,
        } => set_state(&ctx, &service, &member, "drain", force).await,
        Command::Maint {
            service,
            member,
            force,
        } => set_state(&ctx, &service, &member, "maint", force).await,
        Command::Ready { service, member } => {
            set_state(&ctx, &service, &member, "active", false).await
        }
        Command::Agent {
            service,
            member,
            address,
            port,
            weight,
            ttl,
            drain_timeout,
        } => {
            let cfg = crate::agent::AgentConfig {
                service,
                member,
                address,
                port,
                weight,
                ttl_s: ttl,
                drain_timeout: std::time::Duration::from_secs(drain_timeout),
            };
            agent(&ctx.client, &cfg).await
        }
        Command::Snapshot(SnapshotCmd::Save { file }) => snapshot_save(&ctx.client, &file).await,
        Command::Members {
            service,
            consistent,
        } => members(&ctx, service.as_deref(), consistent).await,
        Command::Service(ServiceCmd::Set {
            service,
            port,
            member_port,
            mode,
            balance,
            check,
        }) => service_set(&ctx, &service, port, member_port, mode, balance, check).await,
        Command::Status => status(&ctx).await,
        Command::Render => render(&ctx.client).await,
        Command::Token(cmd) => token_cmd(&ctx, cmd).await,
        Command::Audit {
            service,
            since,
            limit,
        } => audit(&ctx, service.as_deref(), since.as_deref(), limit).await,
        Command::Cluster(ClusterCmd::Add { id, addr, learner }) => {
            cluster_add(&ctx, id, &addr, learner).await
        }
        Command::Failover => failover(&ctx).await,
        Command::DrainNode { id } => {
            let v = ctx.client.drain_node(id, true).await?;
            Ok(ctx.show(v, |b| bgp_text(id, b)))
        }
        Command::ReadyNode { id } => {
            let v = ctx.client.drain_node(id, false).await?;
            Ok(ctx.show(v, |b| bgp_text(id, b)))
        }
        Command::GenSecret => Ok(crate::auth::new_cluster_secret()),
        Command::Demo { no_haproxy, keep } => demo(no_haproxy, keep).await,
        Command::Cluster(ClusterCmd::Remove { id }) => cluster_remove(&ctx, id).await,
    }
}

/// What the commands share: the client, and whether to print JSON.
struct Ctx {
    client: Client,
    json: bool,
}

impl Ctx {
    /// What a write prints: its index, as JSON or after `what`.
    fn done(&self, index: u64, what: String) -> String {
        if self.json {
            to_json(&Written { index })
        } else {
            format!("{what} (index {index})")
        }
    }

    /// `v` itself under `--json`, else `text(&v)`.
    fn show<T: Serialize>(&self, v: T, text: impl FnOnce(&T) -> String) -> String {
        if self.json {
            to_json(&v)
        } else {
            text(&v)
        }
    }
}

/// An answer as the API sent it (`--json`); it came from JSON, so it goes
/// back to JSON.
fn to_json(v: &impl Serialize) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

async fn register(
    ctx: &Ctx,
    service: &str,
    member: &str,
    address: &str,
    port: Option<u16>,
    weight: Option<u16>,
    ttl: Option<u32>,
) -> Result<String, Failure> {
    validate_member(service, member)?;
    let i = ctx
        .client
        .register(service, member, address, port, weight, ttl)
        .await?;
    Ok(ctx.done(i, format!("registered {member} in {service}")))
}

async fn unregister(
    ctx: &Ctx,
    service: &str,
    member: &str,
    force: bool,
) -> Result<String, Failure> {
    validate_member(service, member)?;
    let i = ctx.client.unregister_forced(service, member, force).await?;
    Ok(ctx.done(i, format!("unregistered {member} from {service}")))
}

async fn set_state(
    ctx: &Ctx,
    service: &str,
    member: &str,
    state: &str,
    force: bool,
) -> Result<String, Failure> {
    validate_member(service, member)?;
    let i = ctx
        .client
        .set_state_forced(service, member, state, force)
        .await?;
    Ok(ctx.done(i, format!("{member} of {service} is now {state}")))
}

async fn agent(client: &Client, cfg: &crate::agent::AgentConfig) -> Result<String, Failure> {
    validate_member(&cfg.service, &cfg.member)?;
    model::validate_address(&cfg.address)?;
    if cfg.ttl_s == 0 {
        return Err(Failure {
            code: exit::USAGE,
            message: "--ttl must be at least 1".into(),
        });
    }
    match crate::agent::run(client, cfg, crate::shutdown_signal()).await {
        crate::agent::AgentExit::Unregistered => {
            Ok("agent stopped: drained and unregistered".into())
        }
        crate::agent::AgentExit::LeftToTtl(why) => Err(Failure {
            code: exit::FAILED,
            message: format!(
                "agent stopped without unregistering ({why}); the TTL removes the member"
            ),
        }),
    }
}

async fn snapshot_save(client: &Client, file: &Path) -> Result<String, Failure> {
    let v = client.snapshot().await?;
    let text = serde_json::to_string_pretty(&v).map_err(|e| Failure {
        code: exit::FAILED,
        message: e.to_string(),
    })?;
    std::fs::write(file, text).map_err(|e| Failure {
        code: exit::FAILED,
        message: format!("write {}: {e}", file.display()),
    })?;
    Ok(format!(
        "saved the registry at index {} to {}",
        v.index,
        file.display()
    ))
}

async fn members(ctx: &Ctx, service: Option<&str>, consistent: bool) -> Result<String, Failure> {
    if let Some(s) = service {
        model::validate_name("service", s)?;
    }
    if let Some(s) = service {
        let v = ctx.client.service(s, consistent).await?;
        return Ok(ctx.show(v, |v| {
            members_table([(v.service.as_str(), &v.definition)], v.index)
        }));
    }
    let v = ctx.client.services(consistent).await?;
    Ok(ctx.show(v, |v| {
        members_table(v.services.iter().map(|(n, s)| (n.as_str(), s)), v.index)
    }))
}

async fn service_set(
    ctx: &Ctx,
    service: &str,
    port: u16,
    member_port: Option<u16>,
    mode: Option<String>,
    balance: Option<String>,
    check: Option<String>,
) -> Result<String, Failure> {
    model::validate_name("service", service)?;
    let def = ServiceBody {
        port: port.into(),
        member_port: member_port.map(u32::from),
        mode: mode.map(|m| parse_word("--mode", &m)).transpose()?,
        balance: balance.map(|b| parse_word("--balance", &b)).transpose()?,
        check: check.map(|c| parse_check(&c)).transpose()?,
        server: None,
    };
    let i = ctx.client.define_service(service, &def).await?;
    Ok(ctx.done(i, format!("service {service} defined")))
}

async fn status(ctx: &Ctx) -> Result<String, Failure> {
    let v = ctx.client.cluster().await?;
    Ok(ctx.show(v, status_table))
}

async fn render(client: &Client) -> Result<String, Failure> {
    Ok(client.render().await?.trim_end().to_string())
}

async fn audit(
    ctx: &Ctx,
    service: Option<&str>,
    since: Option<&str>,
    limit: usize,
) -> Result<String, Failure> {
    let mut q = AuditQuery {
        limit: Some(limit),
        ..Default::default()
    };
    if let Some(s) = service {
        model::validate_name("service", s)?;
        q.service = Some(s.to_string());
    }
    if let Some(since) = since {
        q.since = Some(match since.parse::<u64>() {
            Ok(ms) => ms,
            Err(_) => {
                let ago = crate::auth::parse_ttl(since)?;
                crate::clock::now_ms().saturating_sub(ago * 1_000)
            }
        });
    }
    let v = ctx.client.audit(&q).await?;
    Ok(ctx.show(v, audit_table))
}

fn audit_table(v: &Audit) -> String {
    let rows: Vec<Vec<String>> = v
        .entries
        .iter()
        .map(|e| {
            vec![
                e.index.to_string(),
                e.at_ms.to_string(),
                e.by.clone(),
                e.action.clone(),
                e.service.clone().unwrap_or_else(|| "-".into()),
                e.member.clone().unwrap_or_else(|| "-".into()),
                e.detail.clone(),
            ]
        })
        .collect();
    table(
        &[
            "INDEX", "AT_MS", "BY", "ACTION", "SERVICE", "MEMBER", "DETAIL",
        ],
        &rows,
    )
}

async fn cluster_add(ctx: &Ctx, id: u64, addr: &str, learner: bool) -> Result<String, Failure> {
    let i = ctx.client.add_node(id, addr, learner).await?;
    let role = if learner { "learner" } else { "voter" };
    Ok(ctx.done(i, format!("node {id} added as {role}")))
}

async fn cluster_remove(ctx: &Ctx, id: u64) -> Result<String, Failure> {
    let i = ctx.client.remove_node(id).await?;
    Ok(ctx.done(i, format!("node {id} removed")))
}

async fn failover(ctx: &Ctx) -> Result<String, Failure> {
    let v = ctx.client.failover().await?;
    Ok(ctx.show(v, failover_text))
}

async fn demo(no_haproxy: bool, keep: bool) -> Result<String, Failure> {
    let opts = crate::demo::DemoOptions { no_haproxy, keep };
    crate::demo::run(opts).await.map_err(|e| Failure {
        code: exit::FAILED,
        message: format!("demo: {e}"),
    })
}

async fn token_cmd(ctx: &Ctx, cmd: TokenCmd) -> Result<String, Failure> {
    let client = &ctx.client;
    match cmd {
        TokenCmd::Create { scope, ttl, name } => {
            let body = TokenBody { scope, ttl, name };
            let v = client.create_token(&body).await?;
            Ok(ctx.show(v, |v| {
                format!(
                    "token {} ({}) created; its secret, shown only now:\n{}",
                    v.id, v.scope, v.secret
                )
            }))
        }
        TokenCmd::List => {
            let v = client.tokens().await?;
            Ok(ctx.show(v, |v| {
                let rows: Vec<Vec<String>> = v
                    .tokens
                    .iter()
                    .map(|t| {
                        vec![
                            t.id.clone(),
                            t.name.clone(),
                            t.scope.clone(),
                            t.expires_at_ms.map_or("null".into(), |e| e.to_string()),
                        ]
                    })
                    .collect();
                table(&["ID", "NAME", "SCOPE", "EXPIRES_AT_MS"], &rows)
            }))
        }
        TokenCmd::Revoke { id } => {
            model::validate_name("id", &id)?;
            let i = client.revoke_token(&id).await?;
            Ok(ctx.done(i, format!("token {id} revoked")))
        }
    }
}

/// Checks names locally, so a bad one fails with exit code 6 before any request.
fn validate_member(service: &str, member: &str) -> Result<(), Failure> {
    model::validate_name("service", service)?;
    model::validate_name("member", member)?;
    Ok(())
}

fn parse_check(text: &str) -> Result<model::Check, Failure> {
    match text {
        "none" => Ok(model::Check::None),
        "tcp" => Ok(model::Check::Tcp),
        _ => match text.strip_prefix("http:") {
            Some(path) => Ok(model::Check::Http { path: path.into() }),
            None => Err(Failure {
                code: exit::USAGE,
                message: format!("--check {text:?}: use none, tcp or http:/PATH"),
            }),
        },
    }
}

/// A one-word setting (`--mode http`) by the name the API uses for it.
fn parse_word<T: serde::de::DeserializeOwned>(flag: &str, text: &str) -> Result<T, Failure> {
    serde_json::from_value(serde_json::Value::String(text.to_string())).map_err(|e| Failure {
        code: exit::USAGE,
        message: format!("{flag} {text:?}: {e}"),
    })
}

/// Left-aligned columns, two spaces apart.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = vec![line(header.iter().map(|h| h.to_string()).collect())];
    out.extend(rows.iter().map(|r| line(r.clone())));
    out.join("\n")
}

fn members_table<'a>(
    services: impl IntoIterator<Item = (&'a str, &'a ServiceView)>,
    index: u64,
) -> String {
    let mut rows = Vec::new();
    for (name, svc) in services {
        for (member, m) in &svc.members {
            rows.push(vec![
                name.to_string(),
                member.clone(),
                format!("{}:{}", m.address, m.port),
                m.weight.to_string(),
                m.state.to_string(),
            ]);
        }
    }
    format!(
        "{}\n({} members, applied index {index})",
        table(&["SERVICE", "MEMBER", "ADDRESS", "WEIGHT", "STATE"], &rows),
        rows.len()
    )
}

fn status_table(v: &ClusterView) -> String {
    let mut rows = Vec::new();
    for (&id, addr) in &v.nodes {
        let raft = if Some(id) == v.leader {
            "leader"
        } else if v.voters.contains(&id) {
            "voter"
        } else {
            "learner"
        };
        let (role, applied, haproxy, error) = match v.node_status.get(&id) {
            Some(NodeStatus::Up(st)) => {
                let role = st.role.map_or("?".into(), |r| r.as_str().to_string());
                match &st.render {
                    None => (
                        role,
                        st.applied_index.to_string(),
                        "none (witness)".to_string(),
                        String::new(),
                    ),
                    Some(r) => (
                        role,
                        st.applied_index.to_string(),
                        format!(
                            "{} @{}",
                            r.last_apply.map_or("pending", |a| a.as_str()),
                            r.applied_index
                        ),
                        r.last_error.clone().unwrap_or_default(),
                    ),
                }
            }
            Some(NodeStatus::Unreachable { error }) => {
                ("?".into(), "-".into(), "-".into(), error.clone())
            }
            None => ("?".into(), "-".into(), "-".into(), "no status".into()),
        };
        rows.push(vec![
            id.to_string(),
            addr.clone(),
            raft.to_string(),
            role,
            applied,
            haproxy,
            error,
        ]);
    }
    format!(
        "node {} ({}), term {}, applied index {}, {} members\n{}",
        v.node_id,
        v.role.map_or("", |r| r.as_str()),
        v.term,
        v.applied_index,
        v.members,
        table(
            &["ID", "ADDRESS", "RAFT", "ROLE", "APPLIED", "HAPROXY", "ERROR"],
            &rows
        )
    ) + &bgp_table(v)
        .map(|t| format!("\nbgp mode, every fit balancer announces the VIP:\n{t}"))
        .unwrap_or_default()
        + &legacy_peers(v)
}

/// A line naming the peers this node still speaks the previous release's
/// encoding to (a rolling upgrade in progress); empty when none.
fn legacy_peers(v: &ClusterView) -> String {
    let legacy: Vec<String> = v
        .peer_codecs
        .iter()
        .filter(|(_, c)| c.as_str() == crate::codec::Codec::Legacy.name())
        .map(|(id, _)| id.to_string())
        .collect();
    if legacy.is_empty() {
        return String::new();
    }
    format!(
        "\nnode {} speaks the previous release's encoding to node {} \
         (not upgraded yet, or not called since it was)",
        v.node_id,
        legacy.join(", ")
    )
}

/// One balancer's announcement, after `drain-node` / `ready-node`.
fn bgp_text(id: crate::consensus::NodeId, b: &crate::bgp::BgpStatus) -> String {
    let state = if b.announced {
        "announces the VIP".to_string()
    } else {
        format!("does not announce the VIP: {}", b.reason)
    };
    format!(
        "node {id} {state}
drained: {}, connections open: {}, BGP session: {}, BFD: {}",
        if b.drained { "yes" } else { "no" },
        b.connections,
        or_dash(&b.session),
        or_dash(&b.bfd)
    )
}

fn or_dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

/// The bgp-mode rows of `clb status`, when any balancer runs bgp mode.
fn bgp_table(v: &ClusterView) -> Option<String> {
    let rows: Vec<Vec<String>> = v
        .node_status
        .iter()
        .filter_map(|(id, st)| {
            let b = st.up()?.bgp.as_ref()?;
            Some(vec![
                id.to_string(),
                if b.announced { "yes" } else { "no" }.to_string(),
                b.reason.clone(),
                or_dash(&b.session).to_string(),
                or_dash(&b.bfd).to_string(),
                b.connections.to_string(),
            ])
        })
        .collect();
    (!rows.is_empty()).then(|| {
        table(
            &["ID", "ANNOUNCED", "WHY", "BGP", "BFD", "CONNECTIONS"],
            &rows,
        )
    })
}

fn failover_text(v: &FailoverView) -> String {
    let mut out = format!(
        "leadership moved from node {} (term {}) to node {} (term {}) in {} ms",
        v.from, v.term, v.new_leader, v.new_term, v.leader_took_ms
    );
    match (v.vip_configured, v.vip_holder) {
        (false, _) => out.push_str("\nno VIP configured"),
        (_, Some(holder)) => out.push_str(&format!(
            "\nVIP now held by node {holder}, {} ms after the request",
            v.vip_took_ms.unwrap_or(0)
        )),
        _ => out.push_str("\nthe new leader has not reported holding the VIP yet (see clb status)"),
    }
    if let Some(e) = v.release.as_ref().and_then(|r| r.error.as_deref()) {
        out.push_str(&format!(
            "\nwarning: the old leader's release hook failed: {e}"
        ));
    }
    out
}

/// The 2010 calling form: `clb_register PASSWORD NODE SERVICE`. NODE is both
/// the member's name and its address; the service's member port applies.
pub async fn legacy(register: bool, args: &[String]) -> Result<String, Failure> {
    let prog = if register {
        "clb_register"
    } else {
        "clb_unregister"
    };
    let [password, node, service] = args else {
        return Err(Failure {
            code: exit::USAGE,
            message: format!("usage: {prog} PASSWORD NODE SERVICE"),
        });
    };
    validate_member(service, node)?;
    model::validate_address(node)?;
    let server = std::env::var("CLB_SERVER").unwrap_or_else(|_| "localhost:8090".into());
    let client = Client::with_options(&server, Some(password.clone()), ClientOptions::from_env())?;
    if register {
        let i = client
            .register(service, node, node, None, None, None)
            .await?;
        Ok(format!("registered {node} in {service} (index {i})"))
    } else {
        let i = client.unregister(service, node).await?;
        Ok(format!("unregistered {node} from {service} (index {i})"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_columns() {
        let t = table(
            &["A", "BB"],
            &[
                vec!["xyz".into(), "1".into()],
                vec!["q".into(), "22".into()],
            ],
        );
        assert_eq!(t, "A    BB\nxyz  1\nq    22");
    }

    #[test]
    fn status_names_peers_on_the_previous_release() {
        let mut v = ClusterView {
            node_id: 1,
            ..Default::default()
        };
        v.peer_codecs = [(2, "v1".to_string()), (3, "v1".to_string())].into();
        assert!(!status_table(&v).contains("previous release"));
        v.peer_codecs.insert(3, "legacy".into());
        assert!(
            status_table(&v).ends_with("node 1 speaks the previous release's encoding to node 3 (not upgraded yet, or not called since it was)"),
            "{}",
            status_table(&v)
        );
    }

    #[test]
    fn check_syntax() {
        assert_eq!(parse_check("tcp").unwrap(), model::Check::Tcp);
        assert_eq!(
            parse_check("http:/health").unwrap(),
            model::Check::Http {
                path: "/health".into()
            }
        );
        assert_eq!(parse_check("ping").unwrap_err().code, exit::USAGE);
        let mode: model::Mode = parse_word("--mode", "tcp").unwrap();
        assert_eq!(mode, model::Mode::Tcp);
        let bad = parse_word::<model::Mode>("--mode", "udp").unwrap_err();
        assert_eq!(bad.code, exit::USAGE);
        assert!(
            bad.message.starts_with("--mode \"udp\": unknown variant"),
            "{}",
            bad.message
        );
    }
}
