//! VIP hooks: an external command, or the built-in `linux-vip:IFACE`.
//!
//! Every run is bounded by a timeout; on timeout the hook's whole process
//! group is killed, so a hung `aws` or `curl` cannot outlive its turn.

use std::net::IpAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use serde::Serialize;

use super::{garp, netlink};
use crate::consensus::NodeId;

/// How the VIP is claimed and released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hook {
    /// Run through `sh -c` as `CMD claim|release VIP NODE_ID TERM`.
    Exec(String),
    /// Add/remove VIP/32 (or /128) on the interface, then announce it.
    LinuxVip { interface: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Claim,
    Release,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Claim => "claim",
            Action::Release => "release",
        }
    }
}

/// One hook invocation; `term` is the fencing token.
#[derive(Debug, Clone)]
pub struct HookCall {
    pub action: Action,
    pub vip: IpAddr,
    pub node: NodeId,
    pub term: u64,
    /// Passed as `CLB_INTERFACE`; empty when none is known.
    pub interface: String,
    /// Passed as `CLB_LEASE_END_MS`: Unix milliseconds at which this node's
    /// quorum lease ends (a claim) or ended (a release); empty when it never
    /// had one. A hook talking to an external system can use it as a
    /// deadline; after it, another node may claim.
    pub lease_end_ms: Option<u64>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum HookError {
    #[error("start {program}: {reason}")]
    Spawn { program: String, reason: String },
    #[error("{program} did not finish within {timeout:?}; killed")]
    Timeout { program: String, timeout: Duration },
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        program: String,
        status: String,
        stderr: String,
    },
}

impl Hook {
    /// Parses `--vip-hook`. `linux-vip:IFACE` needs the interface to exist now.
    pub fn parse(text: &str) -> Result<Hook, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("is empty".into());
        }
        if let Some(iface) = text.strip_prefix("linux-vip:") {
            let valid = !iface.is_empty()
                && iface.len() <= 15
                && iface
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.@".contains(&b));
            if !valid {
                return Err(format!("{iface:?} is not an interface name"));
            }
            if !Path::new("/sys/class/net").join(iface).exists() {
                return Err(format!("no network interface {iface:?} on this host"));
            }
            return Ok(Hook::LinuxVip {
                interface: iface.to_string(),
            });
        }
        let program = text.split_whitespace().next().unwrap_or(text);
        if program.contains('/') && !Path::new(program).is_file() {
            return Err(format!("{program} does not exist"));
        }
        Ok(Hook::Exec(text.to_string()))
    }

    /// The interface to report as `CLB_INTERFACE`, if the hook names one.
    pub fn interface(&self) -> Option<&str> {
        match self {
            Hook::LinuxVip { interface } => Some(interface),
            Hook::Exec(_) => None,
        }
    }

    /// Runs the hook once. `Ok(Some(note))` is success with a warning worth
    /// showing (for example: the address moved but no announcement was sent).
    pub async fn run(
        &self,
        call: &HookCall,
        timeout: Duration,
    ) -> Result<Option<String>, HookError> {
        match self {
            Hook::Exec(cmd) => {
                let script = format!("{cmd} \"$@\"");
                let term = call.term.to_string();
                let node = call.node.to_string();
                let vip = call.vip.to_string();
                let args = [
                    "-c",
                    &script,
                    "clb-vip-hook",
                    call.action.as_str(),
                    &vip,
                    &node,
                    &term,
                ];
                let lease_end = call
                    .lease_end_ms
                    .map(|ms| ms.to_string())
                    .unwrap_or_default();
                let env = [
                    ("CLB_VIP", vip.as_str()),
                    ("CLB_NODE_ID", node.as_str()),
                    ("CLB_TERM", term.as_str()),
                    ("CLB_INTERFACE", call.interface.as_str()),
                    ("CLB_ACTION", call.action.as_str()),
                    ("CLB_LEASE_END_MS", lease_end.as_str()),
                ];
                run_command("sh", &args, &env, timeout).await.map(|_| None)
            }
            Hook::LinuxVip { interface } => linux_vip(call, interface, timeout).await,
        }
    }
}

/// Adds or removes the address with one rtnetlink request (netlink.rs: no
/// forked `ip`, so a release takes well under a millisecond), idempotent.
/// After a claim, one gratuitous ARP (IPv4) or unsolicited neighbour
/// advertisement (IPv6) from clbd itself (garp.rs), so switches and
/// neighbours learn the new owner at once. A failed announcement leaves the
/// claim done (the address is ours) with a note saying why.
async fn linux_vip(
    call: &HookCall,
    iface: &str,
    timeout: Duration,
) -> Result<Option<String>, HookError> {
    let add = matches!(call.action, Action::Claim);
    let (vip, name) = (call.vip, iface.to_string());
    let changed = tokio::task::spawn_blocking(move || {
        netlink::change_address(add, &name, vip, timeout)?;
        Ok::<_, std::io::Error>(match (add, vip) {
            (true, IpAddr::V4(v4)) => garp::announce(&name, v4)
                .err()
                .map(|e| format!("address added; gratuitous ARP failed: {e}")),
            (true, IpAddr::V6(v6)) => match garp::advertise(&name, v6) {
                Ok(()) => None,
                // Right after the interface came up IPv6 may not send yet:
                // try again for a second, from a thread of its own. Each try
                // is sent from the VIP, so none goes out once it is released.
                Err(first) => {
                    tracing::debug!(cause = %first, "neighbour advertisement: trying again");
                    std::thread::spawn(move || {
                        let mut last = first;
                        for _ in 0..5 {
                            std::thread::sleep(Duration::from_millis(200));
                            match garp::advertise(&name, v6) {
                                Ok(()) => return,
                                Err(e) => last = e,
                            }
                        }
                        tracing::warn!(cause = %last, vip = %v6, "address added; neighbour advertisement failed");
                    });
                    None
                }
            },
            (false, _) => None,
        })
    })
    .await;
    let failed = |reason: String| HookError::Failed {
        program: "linux-vip".into(),
        status: format!(
            "{} {} on {iface}",
            if add { "add" } else { "del" },
            call.vip
        ),
        stderr: reason,
    };
    let note = match changed {
        Ok(Ok(note)) => note,
        Ok(Err(e)) => return Err(failed(e.to_string())),
        Err(e) => return Err(failed(e.to_string())),
    };
    if let Some(note) = &note {
        tracing::warn!(vip = %call.vip, "{note}");
    }
    Ok(note)
}

/// Runs `program args` in its own process group with `env` added; kills the
/// group at `timeout`. Returns stdout.
pub async fn run_command(
    program: &str,
    args: &[&str],
    env: &[(&str, &str)],
    timeout: Duration,
) -> Result<String, HookError> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    let child = cmd.spawn().map_err(|e| HookError::Spawn {
        program: program.to_string(),
        reason: e.to_string(),
    })?;
    let pid = child.id();
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(Ok(out)) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).into()),
        Ok(Ok(out)) => Err(HookError::Failed {
            program: program.to_string(),
            status: out.status.to_string(),
            stderr: tail(&String::from_utf8_lossy(&out.stderr)),
        }),
        Ok(Err(e)) => Err(HookError::Spawn {
            program: program.to_string(),
            reason: e.to_string(),
        }),
        Err(_) => {
            if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
                // SAFETY: kill(2) on the process group we created for this child;
                // dropping the future already killed the child itself.
                unsafe { libc::kill(-pid, libc::SIGKILL) };
            }
            Err(HookError::Timeout {
                program: program.to_string(),
                timeout,
            })
        }
    }
}

/// The last few hundred bytes of a hook's stderr, on one line.
fn tail(text: &str) -> String {
    let text = text.trim();
    let start = text
        .char_indices()
        .rev()
        .nth(300)
        .map(|(i, _)| i)
        .unwrap_or(0);
    text[start..].replace('\n', " | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn call(action: Action) -> HookCall {
        HookCall {
            lease_end_ms: None,
            action,
            vip: "192.0.2.10".parse().unwrap(),
            node: 2,
            term: 7,
            interface: "eth9".into(),
        }
    }

    #[test]
    fn parse_refuses_missing_interfaces_and_programs() {
        assert_eq!(
            Hook::parse("linux-vip:lo").unwrap(),
            Hook::LinuxVip {
                interface: "lo".into()
            }
        );
        assert!(Hook::parse("linux-vip:nosuchif0")
            .unwrap_err()
            .contains("no network interface"));
        assert!(Hook::parse("linux-vip:a b").is_err());
        assert!(Hook::parse("linux-vip:").is_err());
        assert!(Hook::parse("/nonexistent/hook --x")
            .unwrap_err()
            .contains("does not exist"));
        assert_eq!(
            Hook::parse("my-hook --x").unwrap(),
            Hook::Exec("my-hook --x".into())
        );
        assert!(Hook::parse("  ").is_err());
    }

    #[tokio::test]
    async fn exec_hook_gets_arguments_and_env() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        let hook = Hook::Exec(format!(
            "echo \"$CLB_VIP $CLB_NODE_ID $CLB_TERM $CLB_INTERFACE\" >> {} && echo",
            out.display()
        ));
        hook.run(&call(Action::Claim), Duration::from_secs(5))
            .await
            .unwrap();
        let text = std::fs::read_to_string(&out).unwrap();
        assert_eq!(text, "192.0.2.10 2 7 eth9\n");

        let args = dir.path().join("args");
        let hook = Hook::Exec(format!("printf '%s,' >> {}", args.display()));
        hook.run(&call(Action::Release), Duration::from_secs(5))
            .await
            .unwrap();
        let text = std::fs::read_to_string(&args).unwrap();
        assert_eq!(text, "release,192.0.2.10,2,7,");
    }

    #[tokio::test]
    async fn failing_and_hanging_hooks_are_reported_and_killed() {
        let hook = Hook::Exec("echo nope >&2; exit 3; :".into());
        let e = hook
            .run(&call(Action::Claim), Duration::from_secs(5))
            .await
            .unwrap_err();
        assert!(
            matches!(&e, HookError::Failed { stderr, .. } if stderr == "nope"),
            "{e}"
        );

        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        // The grandchild (sleep) must die with the group, not only `sh`.
        let hook = Hook::Exec(format!(
            "sleep 30 & echo $! > {}; wait; :",
            pidfile.display()
        ));
        let started = std::time::Instant::now();
        let e = hook
            .run(&call(Action::Claim), Duration::from_millis(300))
            .await
            .unwrap_err();
        assert!(matches!(e, HookError::Timeout { .. }), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let mut gone = false;
        for _ in 0..100 {
            // SAFETY: signal 0 only probes whether the pid exists.
            let alive = unsafe { libc::kill(pid, 0) } == 0;
            let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .map(|s| s.contains(") Z"))
                .unwrap_or(true);
            if !alive || zombie {
                gone = true;
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(gone, "the hook's child process outlived the timeout");
    }
}
