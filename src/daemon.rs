//! Wiring and lifecycle of `clbd`: open storage, start Raft, serve the API
//! and peer RPCs on one listener, and shut down in order.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::api::{self, AppState, Tokens};
use crate::config::Config;
use crate::consensus::{rpc, Consensus, StartError};

/// How long in-flight requests get after SIGTERM before the server stops anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("create data dir {dir}: {source}")]
    DataDir { dir: String, source: std::io::Error },
    #[error("token file {path}: {source}")]
    TokenFile {
        path: String,
        source: std::io::Error,
    },
    #[error("token file {0} has no tokens")]
    NoTokens(String),
    #[error("listener: {0}")]
    Listener(std::io::Error),
    #[error("{0}")]
    Start(#[from] StartError),
    #[error("serve: {0}")]
    Serve(std::io::Error),
}

/// Runs a node until `shutdown` resolves. The listener is already bound, so
/// callers (and tests) choose the port, including port 0.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), DaemonError> {
    let bound = listener.local_addr().map_err(DaemonError::Listener)?;
    std::fs::create_dir_all(&config.data_dir).map_err(|source| DaemonError::DataDir {
        dir: config.data_dir.display().to_string(),
        source,
    })?;
    let tokens = load_tokens(&config)?;
    let advertise = config.advertise_addr(bound);
    let consensus = Consensus::start(
        config.node_id,
        &config.data_dir,
        config.bootstrap(bound),
        &config.raft,
    )
    .await?;
    tracing::info!(listen = %bound, %advertise, role = ?config.role, "clbd ready");

    let state = AppState {
        consensus: consensus.clone(),
        tokens: Arc::new(tokens),
        role: config.role,
        advertise,
        auto_create_services: config.auto_create_services,
    };
    let app = api::router(state).merge(rpc::routes(consensus.clone()));

    let (stop_tx, mut stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let mut graceful_rx = stop_rx.clone();
    let serve = axum::serve(listener, app).with_graceful_shutdown(async move {
        let _ = graceful_rx.wait_for(|s| *s).await;
    });
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
    tracing::info!("shutting down raft");
    consensus.shutdown().await;
    result
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
    let tokens = Tokens::parse(&text);
    if tokens.is_empty() {
        return Err(DaemonError::NoTokens(path.display().to_string()));
    }
    Ok(tokens)
}

fn write_new_token(path: &Path) -> Result<(), DaemonError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let secret: [u8; 32] = rand::random();
    let hex: String = secret.iter().map(|b| format!("{b:02x}")).collect();
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
    f.write_all(format!("{hex}\n").as_bytes()).map_err(err)?;
    f.sync_all().map_err(err)
}
