//! `clb demo` end to end: it starts its own cluster, kills the leader and
//! prints a timeline in which the new claim follows the old holder's last.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use lab::Proc;

/// Runs `clb demo ARGS`, killing it if it takes longer than `within`.
fn demo(args: &[&str], within: Duration) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_clb"));
    cmd.arg("demo")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = Proc::build(&mut cmd).spawn().expect("spawn clb demo");
    // On a panic the drop kills it; its children get SIGKILL when it dies
    // (PR_SET_PDEATHSIG).
    let status = child
        .wait_within(within)
        .unwrap_or_else(|| panic!("clb demo ran longer than {within:?}"));
    let (mut out, mut err) = (String::new(), String::new());
    child
        .stdout
        .take()
        .expect("stdout")
        .read_to_string(&mut out)
        .expect("read stdout");
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .expect("read stderr");
    (status.success(), out, err)
}

fn check_timeline(out: &str) {
    let lines: Vec<&str> = out.lines().collect();
    let line = |needle: &str| {
        lines
            .iter()
            .position(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} line in:\n{out}"))
    };
    let killed = line("killed node");
    let first_claim = line("claimed the VIP");
    let new_leader = line("seen as the new leader");
    let last_claim = lines
        .iter()
        .rposition(|l| l.contains("claimed the VIP"))
        .expect("claims");
    assert!(first_claim < killed && killed < last_claim, "{out}");
    assert!(killed < new_leader, "{out}");
    assert!(line("seen as leader by all nodes") < killed, "{out}");
    let old = out
        .lines()
        .find(|l| l.starts_with("old holder's last claim: node"))
        .unwrap_or_else(|| panic!("no old-holder line in:\n{out}"));
    assert!(old.contains(", before the new claim"), "{out}");
    let moved = out
        .lines()
        .find(|l| l.starts_with("the VIP moved to node"))
        .unwrap_or_else(|| panic!("no summary in:\n{out}"));
    let ms: u64 = moved
        .split_whitespace()
        .rev()
        .nth(6)
        .and_then(|w| w.parse().ok())
        .unwrap_or_else(|| panic!("no duration in {moved:?}"));
    assert!(ms < 10_000, "{moved}");
}

#[test]
fn clb_demo_prints_a_failover_timeline_and_cleans_up() {
    let (ok, out, err) = demo(&[], Duration::from_secs(90));
    assert!(ok, "clb demo failed:\n{out}\n{err}");
    eprintln!("{out}");
    check_timeline(&out);
    let haproxy = std::process::Command::new("haproxy")
        .arg("-v")
        .output()
        .is_ok();
    if haproxy {
        assert!(out.contains("haproxy: yes"), "{out}");
        assert!(
            out.contains("request through the surviving haproxy: \"hello from backend"),
            "{out}"
        );
    }
    // The temp dir named in the first line is gone.
    let dir = out
        .lines()
        .next()
        .and_then(|l| l.split("files in ").nth(1))
        .and_then(|r| r.split(' ').next())
        .expect("temp dir in the first line");
    assert!(!std::path::Path::new(dir).exists(), "{dir} left behind");
}
