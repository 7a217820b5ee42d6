//! Drain before a planned release of a `linux-vip` address.
//!
//! When the address moves, a request still open on this host's haproxy is
//! reset by the new holder: the client's next packet reaches a host with no
//! socket for it. So a planned hand-over first holds back new connections
//! to the VIP (an nftables rule drops their SYN, which TCP sends again after
//! about a second, by then to the new holder), waits until haproxy has no
//! request open (bounded by `--drain-ms`), and only then releases. A drop,
//! not a reject: a reset would fail the new connection instead of delaying it.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

/// nftables table that holds the one drain rule; its own, so removing it
/// never touches the host's firewall.
const TABLE: &str = "clb_drain";

/// How often haproxy is asked for its open requests while draining.
const POLL: Duration = Duration::from_millis(10);

#[derive(Debug, Clone)]
pub struct DrainConfig {
    /// The longest a drain waits for open requests; then the VIP goes anyway.
    pub max: Duration,
    /// haproxy's admin socket, to count open requests; without one there is
    /// nothing to wait for, and the rule only covers release and claim.
    pub socket: Option<PathBuf>,
}

/// How one drain went, for the log and `/v1/vip`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Drained {
    pub took: Duration,
    /// Requests open when new connections were held back.
    pub open: usize,
    /// Requests still open when the drain gave up (0: all finished).
    pub left: usize,
}

/// The nftables script that installs the rule, replacing any earlier one
/// (add + delete first makes it one atomic swap that never fails on a
/// missing table).
pub fn hold_script(vip: IpAddr) -> String {
    let family = match vip {
        IpAddr::V4(_) => "ip",
        IpAddr::V6(_) => "ip6",
    };
    format!(
        "add table inet {TABLE}\ndelete table inet {TABLE}\ntable inet {TABLE} {{\n  \
         chain hold {{\n    type filter hook input priority filter - 10; policy accept;\n    \
         {family} daddr {vip} tcp flags & (syn | ack) == syn drop\n  }}\n}}\n"
    )
}

/// Removes the rule; succeeds when there is none.
pub fn unhold_script() -> String {
    format!("add table inet {TABLE}\ndelete table inet {TABLE}\n")
}

/// Where `nft` is.
pub fn nft_path() -> Option<PathBuf> {
    crate::find_program("nft")
}

async fn nft(script: &str) -> Result<(), String> {
    let program = nft_path().ok_or("nft not found (Debian package nftables)")?;
    let mut child = tokio::process::Command::new(&program)
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("start {}: {e}", program.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .await
            .map_err(|e| format!("nft stdin: {e}"))?;
    }
    let out = tokio::time::timeout(Duration::from_secs(5), child.wait_with_output())
        .await
        .map_err(|_| "nft did not finish within 5 s".to_string())?
        .map_err(|e| format!("nft: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "nft failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Removes a rule a crashed clbd may have left; a held-back VIP would
/// otherwise drop every new connection once this node claims it again.
pub async fn clear() -> Result<(), String> {
    nft(&unhold_script()).await
}

/// Client streams in `show sess` output: every stream but the admin
/// socket's own (frontend GLOBAL). An idle keep-alive connection has no
/// stream, so it does not hold the drain up.
pub fn open_requests(show_sess: &str) -> usize {
    show_sess
        .lines()
        .filter(|l| l.contains(" fe=") && !l.contains(" fe=GLOBAL "))
        .count()
}

/// Holds new connections back until dropped (the rule is removed then, also
/// when the hand-over is called off or aborted).
pub struct Hold {
    armed: bool,
}

impl Hold {
    /// Removes the rule and waits for that, so a process about to exit
    /// leaves none behind.
    pub async fn end(mut self) {
        self.armed = false;
        remove().await;
    }
}

/// Removes the rule; a failure is logged, since nothing can be done about it
/// here (the next start removes it again).
async fn remove() {
    if let Err(e) = clear().await {
        tracing::error!(cause = %e, "could not remove the drain rule: new connections to the VIP are dropped here");
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // Drop cannot wait; the runtime the hand-over ran on removes the
        // rule. Removal is idempotent and never adds, so racing a later
        // claim is harmless.
        match tokio::runtime::Handle::try_current() {
            Ok(rt) => drop(rt.spawn(remove())),
            Err(_) => tracing::error!(
                "drain rule left in place (no runtime to remove it); the next start removes it"
            ),
        }
    }
}

/// Holds new connections to `vip` back and waits until haproxy's open
/// requests finished or `cfg.max` passed. The returned `Hold` keeps the
/// rule until the release is done.
pub async fn drain(vip: IpAddr, cfg: &DrainConfig) -> Result<(Hold, Drained), String> {
    let started = Instant::now();
    nft(&hold_script(vip)).await?;
    let hold = Hold { armed: true };
    let (open, left) = match &cfg.socket {
        Some(socket) => wait_open(socket, started + cfg.max).await,
        None => (0, 0),
    };
    Ok((
        hold,
        Drained {
            took: started.elapsed(),
            open,
            left,
        },
    ))
}

/// Polls haproxy until no request is open or `until`; returns how many were
/// open at first and how many are left. A haproxy that does not answer has
/// nothing to drain.
async fn wait_open(socket: &Path, until: Instant) -> (usize, usize) {
    // Zero twice in a row: a connection the kernel accepted just before the
    // rule went in may not have reached haproxy (or sent its request) at
    // the first look.
    let mut zeros = 0;
    let mut first = None;
    loop {
        let open = match crate::render::haproxy::exchange(socket, "show sess").await {
            Ok(text) => open_requests(&text),
            Err(e) => {
                tracing::debug!(cause = %e, "haproxy does not answer: nothing to drain");
                return (first.unwrap_or(0), 0);
            }
        };
        let at_start = *first.get_or_insert(open);
        zeros = if open == 0 { zeros + 1 } else { 0 };
        if zeros == 2 || Instant::now() >= until {
            return (at_start, open);
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule_drops_only_new_connections_to_the_vip() {
        let v4 = hold_script("10.0.0.9".parse().unwrap());
        assert!(v4.contains("ip daddr 10.0.0.9 tcp flags & (syn | ack) == syn drop"));
        assert!(v4.starts_with("add table inet clb_drain\ndelete table inet clb_drain\n"));
        let v6 = hold_script("fd00::9".parse().unwrap());
        assert!(v6.contains("ip6 daddr fd00::9 "));
        assert_eq!(
            unhold_script(),
            "add table inet clb_drain\ndelete table inet clb_drain\n"
        );
    }

    #[test]
    fn open_requests_skip_the_admin_socket_itself() {
        let text = "0x55d0c0b0a000: proto=tcpv4 src=10.0.0.1:41000 fe=web be=svc srv=m1 ts=00 epoch=0 age=0s calls=2 rate=0 cpu=0 lat=0 rq[f=848000h,i=0,an=00h,rx=,wx=,ax=] rp[f=80048202h,i=0,an=00h,rx=,wx=,ax=]\n\
                    0x55d0c0b0b000: proto=unix_stream src=unix:1 fe=GLOBAL be=<NONE> srv=<none> ts=00 epoch=0 age=0s calls=1\n\n";
        assert_eq!(open_requests(text), 1);
        assert_eq!(open_requests(""), 0);
    }
}
