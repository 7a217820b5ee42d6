//! Whether this balancer is fit to lead: `--health-cmd` run on an interval
//! (N failures in a row make it unhealthy, one success heals it) combined
//! with an external input that the daemon feeds (haproxy down, last config
//! failed to apply).

use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;

use super::hooks::run_command;

/// A health verdict and, when unhealthy, why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Health {
    pub ok: bool,
    pub reason: String,
}

impl Health {
    pub fn healthy() -> Self {
        Health {
            ok: true,
            reason: String::new(),
        }
    }

    pub fn unhealthy(reason: impl Into<String>) -> Self {
        Health {
            ok: false,
            reason: reason.into(),
        }
    }

    /// Both must be healthy; the first failure's reason wins.
    pub fn and(&self, other: &Health) -> Health {
        if !self.ok {
            self.clone()
        } else {
            other.clone()
        }
    }
}

/// Sender half of an external health input (for example from the renderer).
pub type HealthSender = watch::Sender<Health>;

/// A new external health input, healthy until told otherwise.
pub fn health_input() -> (HealthSender, watch::Receiver<Health>) {
    watch::channel(Health::healthy())
}

/// `--health-cmd` settings.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    pub cmd: String,
    pub interval: Duration,
    /// Consecutive failures that make the node unhealthy (1 or more).
    pub failures: u32,
}

/// Runs the check until `stop` flips; publishes on the returned channel.
pub fn spawn_check(check: HealthCheck, mut stop: watch::Receiver<bool>) -> watch::Receiver<Health> {
    let (tx, rx) = watch::channel(Health::healthy());
    tokio::spawn(async move {
        let mut failed: u32 = 0;
        let mut ticker = tokio::time::interval(check.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            // A check may take up to one interval; a slower one counts as failed.
            let result = run_command(
                "sh",
                &["-c", &check.cmd],
                &[],
                check.interval.max(Duration::from_millis(100)),
            )
            .await;
            let verdict = match result {
                Ok(_) => {
                    failed = 0;
                    Health::healthy()
                }
                Err(e) => {
                    failed = failed.saturating_add(1);
                    tracing::warn!(failed, cause = %e, "health command failed");
                    if failed >= check.failures {
                        Health::unhealthy(format!(
                            "--health-cmd failed {failed} times in a row: {e}"
                        ))
                    } else {
                        continue;
                    }
                }
            };
            tx.send_if_modified(|cur| {
                if *cur == verdict {
                    return false;
                }
                *cur = verdict;
                true
            });
        }
    });
    rx
}
