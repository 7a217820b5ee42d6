//! `clbd`: the clb daemon.

use clap::Parser;
use clb::config::{Config, Settings};

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
        std::process::exit(1);
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
        .map_err(|e| anyhow::anyhow!("bind {}: {e}", config.listen))?;
    clb::daemon::run(config, listener, clb::shutdown_signal()).await?;
    Ok(())
}
