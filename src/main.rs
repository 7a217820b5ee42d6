//! `clbd`: the clb daemon.

use clap::Parser;
use clb::config::{Config, Settings};
use clb::daemon::DaemonError;

#[derive(Parser)]
#[command(
    name = "clbd",
    version,
    about = "clb daemon: replicated registry, haproxy renderer, VIP holder"
)]
struct Cli {
    /// TOML file with the same settings (flags and env win)
    #[arg(long, env = "CLB_CONFIG")]
    config: Option<std::path::PathBuf>,
    #[command(flatten)]
    settings: Settings,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("clbd: {e:#}");
        // The supervisor restarts clbd on EXIT_RETRY (disk full, read-only),
        // not on 1 (a refusal restarting cannot fix).
        let code = e
            .downcast_ref::<DaemonError>()
            .map_or(1, DaemonError::exit_code);
        std::process::exit(code);
    }
}

#[tokio::main]
async fn run(cli: Cli) -> anyhow::Result<()> {
    let file = match &cli.config {
        Some(path) => Settings::from_file(path)?,
        None => Settings::default(),
    };
    let config = Config::from_settings(cli.settings.or(file))?;
    clb::init_tracing(Some(config.node_id));
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| DaemonError::Bind {
            addr: config.listen,
            source,
        })?;
    clb::daemon::run(config, listener, clb::shutdown_signal()).await?;
    Ok(())
}
