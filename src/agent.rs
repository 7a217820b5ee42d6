//! `clb agent`: keeps one member registered while its server runs. Registers
//! with a TTL, renews every TTL/3 (renewals are not Raft writes), and on
//! shutdown drains, waits (bounded) for the member's connections to end, and
//! unregisters. If no node answers it keeps retrying; the member then leaves
//! only by TTL.

use std::future::Future;
use std::time::{Duration, Instant};

use crate::client::Client;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub service: String,
    pub member: String,
    pub address: String,
    pub port: u16,
    pub weight: Option<u16>,
    pub ttl_s: u32,
    /// Longest wait for connections to end after draining.
    pub drain_timeout: Duration,
}

/// How the agent ended.
#[derive(Debug, PartialEq, Eq)]
pub enum AgentExit {
    /// Drained and unregistered.
    Unregistered,
    /// Could not unregister; the TTL will remove the member.
    LeftToTtl(String),
}

/// Runs until `shutdown` resolves, then drains and unregisters.
#[tracing::instrument(skip_all, fields(service = %cfg.service, member = %cfg.member))]
pub async fn run(
    client: &Client,
    cfg: &AgentConfig,
    shutdown: impl Future<Output = ()>,
) -> AgentExit {
    tokio::pin!(shutdown);
    let renew_every =
        Duration::from_millis(u64::from(cfg.ttl_s) * 1_000 / 3).max(Duration::from_millis(100));
    let mut registered = false;
    let mut failing_since: Option<Instant> = None;
    let mut backoff = Duration::from_millis(200);
    let mut next = Duration::ZERO;
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = tokio::time::sleep(next) => {}
        }
        let result = if registered {
            client.renew(&cfg.service, &cfg.member).await
        } else {
            client
                .register(
                    &cfg.service,
                    &cfg.member,
                    &cfg.address,
                    Some(cfg.port),
                    cfg.weight,
                    Some(cfg.ttl_s),
                )
                .await
                .map(|_| true)
        };
        match result {
            Ok(true) => {
                if !registered {
                    tracing::info!(ttl_s = cfg.ttl_s, "registered");
                }
                if let Some(since) = failing_since.take() {
                    tracing::info!(after = ?since.elapsed(), "reached the cluster again");
                }
                registered = true;
                backoff = Duration::from_millis(200);
                next = renew_every;
            }
            Ok(false) => {
                tracing::warn!("the member is gone (expired or removed); registering again");
                registered = false;
                next = Duration::ZERO;
            }
            Err(e) => {
                if failing_since.is_none() {
                    tracing::warn!(cause = %e, "cannot reach the cluster; retrying with backoff (the member leaves only by TTL)");
                    failing_since = Some(Instant::now());
                } else {
                    tracing::debug!(cause = %e, "still cannot reach the cluster");
                }
                next = backoff;
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
        }
    }

    tracing::info!("stopping: draining");
    if let Err(e) = client.set_state(&cfg.service, &cfg.member, "drain").await {
        tracing::warn!(cause = %e, "drain failed; unregistering anyway");
    } else {
        let deadline = Instant::now() + cfg.drain_timeout;
        loop {
            let open = established_connections(cfg.port);
            if open == 0 || Instant::now() >= deadline {
                tracing::info!(open, "connections drained or drain timeout reached");
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    match client.unregister(&cfg.service, &cfg.member).await {
        Ok(_) => {
            tracing::info!("unregistered");
            AgentExit::Unregistered
        }
        Err(e) => {
            tracing::warn!(cause = %e, "unregister failed; the TTL will remove the member");
            AgentExit::LeftToTtl(e.to_string())
        }
    }
}

/// Established TCP connections whose local port is `port`, from
/// /proc/net/tcp and tcp6: the connections this member is serving.
pub fn established_connections(port: u16) -> usize {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .map(|text| count_established(&text, port))
        .sum()
}

fn count_established(table: &str, port: u16) -> usize {
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let local_port = cols
                .get(1)
                .and_then(|a| a.rsplit_once(':'))
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            // State 01 is ESTABLISHED.
            local_port == Some(port) && cols.get(3) == Some(&"01")
        })
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_established_connections_on_the_local_port() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 1 1\n\
   1: 0100007F:1F90 0100007F:D2F0 01 00000000:00000000 00:00000000 00000000     0        0 2 1\n\
   2: 0100007F:D2F0 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 3 1\n";
        // Only the server side of the one connection to 8080 (0x1F90) counts.
        assert_eq!(count_established(table, 8080), 1);
        assert_eq!(count_established(table, 9), 0);
    }
}
