//! clb: control plane for redundant haproxy balancers behind one elastic IP.
//!
//! ```text
//! api (axum) ─► consensus (openraft, sled) ─► watch<Applied> ─► render, failover, reads
//! ```
//!
//! - [`model`]: registry, commands, validation; pure and deterministic.
//! - [`consensus`]: Raft types, sled storage, peer transport, write forwarding.
//! - [`api`]: HTTP API v1 and its JSON errors.
//! - [`daemon`]: wiring, start-up and shutdown order.
//! - [`client`], [`cli`]: the typed HTTP client and the `clb` command line.

/// HTTP API v1 routes and errors.
pub mod api;
/// The `clb` command line: parsing and output.
pub mod cli;
/// Typed HTTP client for the API.
pub mod client;
/// Settings from flags, env and file.
pub mod config;
/// Raft types, sled storage, peer transport.
pub mod consensus;
/// Wiring and lifecycle of `clbd`.
pub mod daemon;
/// Registry, commands and validation; pure.
pub mod model;

/// Logs to stderr; `RUST_LOG` filters (default `info`).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,openraft=warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
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
