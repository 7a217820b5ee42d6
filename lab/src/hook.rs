//! A VIP hook that moves nothing and only logs, and the reader of its log:
//! tests and the demo see every claim and release with a wall-clock time.

use std::io;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// One line of the hook's log: `time_ns node action term`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookEvent {
    /// Wall clock, nanoseconds since the epoch (`date +%s%N`), comparable
    /// with [`now_ns`].
    pub at_ns: u128,
    pub node: u64,
    /// `claim` or `release`.
    pub action: String,
    pub term: u64,
}

/// Writes an exec VIP hook into `dir` that only appends `time_ns node
/// action term` to a log (it touches no interface); returns (script, log).
pub fn vip_hook(dir: &Path) -> io::Result<(PathBuf, PathBuf)> {
    let log = dir.join("vip-events.log");
    let script = dir.join("vip-hook.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n# claim|release VIP NODE TERM: only logs, moves nothing\n\
             echo \"$(date +%s%N) $3 $1 $4\" >> '{}'\n",
            log.display()
        ),
    )?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    Ok((script, log))
}

/// The events in a [`vip_hook`] log, in the order written (none if the
/// log does not exist yet; a torn last line is skipped).
pub fn hook_events(log: &Path) -> Vec<HookEvent> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some(HookEvent {
                at_ns: f.next()?.parse().ok()?,
                node: f.next()?.parse().ok()?,
                action: f.next()?.to_string(),
                term: f.next()?.parse().ok()?,
            })
        })
        .collect()
}

/// Wall-clock nanoseconds since the epoch, as the hook stamps its lines.
pub fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_nanos()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hook_logs_what_it_is_called_with() {
        let dir = tempfile::tempdir().unwrap();
        let (script, log) = vip_hook(dir.path()).unwrap();
        let before = now_ns();
        for (action, node, term) in [("claim", "2", "7"), ("release", "2", "7")] {
            let ok = std::process::Command::new(&script)
                .args([action, "192.0.2.1", node, term])
                .status()
                .unwrap();
            assert!(ok.success());
        }
        let events = hook_events(&log);
        assert_eq!(events.len(), 2);
        assert_eq!((events[0].node, events[0].term), (2, 7));
        assert_eq!(events[0].action, "claim");
        assert_eq!(events[1].action, "release");
        assert!(events[0].at_ns >= before && events[1].at_ns <= now_ns());
    }

    #[test]
    fn a_torn_line_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        std::fs::write(&log, "1 1 claim 3\n2 1 rel").unwrap();
        assert_eq!(hook_events(&log).len(), 1);
    }
}
