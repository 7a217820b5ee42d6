//! `clbd`: the clb daemon.

use clap::Parser;
use clb::{Config, DaemonError, Settings};

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
    raise_fd_limit();
    let listeners = clb::Listeners::bind(&config).await?;
    clb::daemon::run(config, listeners, clb::shutdown_signal()).await?;
    Ok(())
}

/// Every connection is a descriptor: take the hard limit rather than the
/// soft default (often 1024), so a burst of clients cannot make accept fail.
fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}
