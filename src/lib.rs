//! clb: control plane for redundant haproxy balancers behind one elastic IP.
//!
//! # Components, lowest layer first
//!
//! A module uses only the modules of the lines above its own (never its
//! line or below), so each can be read, and tested, without those that use
//! it. `tests/layers.rs` fails on an import that climbs.
//!
//! - [`clock`], [`names`], [`pem`]: leaves. Wall-clock ms; the name rule and
//!   [`InvalidField`](names::InvalidField); CA certificates from PEM files.
//! - [`auth`]: token scopes, secrets and their hashes; pure.
//! - [`model`]: the registry, the commands that change it, and validation;
//!   pure and deterministic.
//! - [`restore`]: a backup as bounded log entries; pure.
//! - [`consensus`], [`render`]: Raft (openraft types, sled storage, peer
//!   transport, write forwarding, vote rules); haproxy.cfg from the
//!   registry (template, `haproxy -c`, install, runtime API, reload).
//! - [`failover`]: the leader holds the VIP (quorum lease, hooks, health
//!   gate, hand-over); it takes [`consensus::Leadership`], not the registry.
//! - [`timeline`]: recent VIP, leader and render events of this node.
//! - [`views`]: the JSON contract of API v1, typed: what the API answers,
//!   the client returns and the CLI, `/ui` and the tests read.
//! - [`api`]: HTTP API v1, token checks, `/ui`, `/metrics`, the serve loop.
//! - [`client`], [`config`]: the typed HTTP client; `clbd` settings.
//! - [`daemon`], [`agent`], [`demo`]: `clbd`'s wiring and shutdown order;
//!   `clb agent`; `clb demo`.
//! - [`cli`]: the `clb` command line.
//!
//! # The path of a registration
//!
//! ```text
//! clb register, clb_register ─► cli ─► client ──HTTP──► api: token, scope, validate
//!   ─► consensus::Consensus::write ─► the leader (forwarded over /raft/leader
//!      from a follower): validate again, Command::allowed_by, batch ─► Raft log
//!   ─► committed on a quorum ─► consensus::store applies it on every node
//!      (model::Registry::apply; Command::touches names the keys to persist)
//!      ─► watch<Applied>
//!   ─► render::Renderer::pass: template ─► haproxy -c ─► install ─► runtime
//!      API or reload
//! failover watches Raft: failover::decide picks; the leader with a quorum
//! lease claims the VIP by a hook
//! ```
//!
//! The test lab (processes, ports, clusters, network namespaces, traffic)
//! is the workspace crate `lab`, which `clb demo` uses too.

/// `clb agent`: keeps a member registered, drains it on shutdown.
pub mod agent;
/// HTTP API v1 routes and errors.
pub mod api;
/// Token scopes and permissions; pure.
pub mod auth;
pub mod bgp;
/// The `clb` command line: parsing and output.
pub mod cli;
/// Typed HTTP client for the API.
pub mod client;
/// Wall-clock milliseconds; a leaf.
pub mod clock;
/// The binary format peers speak and the store keeps, with its version.
pub mod codec;
/// Settings from flags, env and file.
pub mod config;
/// Raft types, sled storage, peer transport.
pub mod consensus;
/// Wiring and lifecycle of `clbd`.
pub mod daemon;
/// `clb demo`: a throw-away local cluster that shows a failover.
pub mod demo;
/// The leader holds the VIP: quorum lease, claim/release hooks, health gate.
pub mod failover;
/// Registry, commands and validation; pure.
pub mod model;
/// The name rule and the validation error; a leaf.
pub mod names;
/// CA certificates from PEM files; a leaf.
pub mod pem;
/// haproxy.cfg rendering, validation and apply.
pub mod render;
/// `clbd --restore`: a backup as bounded log entries; pure.
pub mod restore;
/// Recent VIP, leader and render events of this node, for `/ui`.
pub mod timeline;
/// The JSON contract of API v1: request bodies and answers, defined once.
pub mod views;

// The surface the binaries and an embedding program need.
pub use client::{Client, ClientError, ClientOptions};
pub use config::{Config, Settings};
pub use consensus::{NodeId, Role};
pub use daemon::{DaemonError, Listeners};

/// Where a system program is: on PATH, or in the sbin directories (a
/// unit's or a user's PATH may lack them; Debian puts haproxy and nft there).
pub fn find_program(name: &str) -> Option<std::path::PathBuf> {
    on_path(name).or_else(|| {
        ["/usr/sbin", "/sbin"]
            .map(|d| std::path::Path::new(d).join(name))
            .into_iter()
            .find(|p| p.is_file())
    })
}

/// `name` on PATH only: for commands run by name through a shell.
pub fn on_path(name: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The default log filter. openraft's replication logs an error for every
/// heartbeat a peer misses; clb logs one line when a peer stops answering
/// and one when it is back (consensus::network), and counts the rest in
/// `/metrics`.
pub const DEFAULT_LOG: &str =
    "info,openraft=warn,openraft::replication=off,openraft::engine::handler::replication_handler=off";

/// Logs to stderr, every line prefixed with `node=N` (openraft's and axum's
/// tasks do not inherit our spans); `RUST_LOG` filters (default [`DEFAULT_LOG`]).
pub fn init_tracing(node_id: Option<u64>) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG));
    let format = NodeFormat {
        node_id,
        inner: tracing_subscriber::fmt::format(),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .event_format(format)
        .try_init();
}

struct NodeFormat<F> {
    node_id: Option<u64>,
    inner: F,
}

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for NodeFormat<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        if let Some(id) = self.node_id {
            write!(writer, "node={id} ")?;
        }
        self.inner.format_event(ctx, writer, event)
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(cause = %e, "cannot listen for SIGTERM");
            std::future::pending::<()>().await;
            return;
        }
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("shutdown signal received");
}
