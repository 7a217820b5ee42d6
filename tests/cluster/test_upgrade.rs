//! A rolling upgrade from the previous release, walked as
//! docs/operations.md "Upgrading" tells: one node at a time, a mixed
//! cluster keeps taking writes with an old leader and with a new one, every
//! data dir is migrated on its first start, the wire moves to v1 once both
//! ends run this release, and the previous release refuses a migrated data
//! dir instead of misreading it.
//!
//! The previous release is built from this repository's history (the commit
//! before the postcard codec) into `target/previous-release`, once.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::harness::*;
use lab::{Cluster, FAST_TIMERS};

/// The last commit whose clbd stores and speaks bincode only.
const PREVIOUS_RELEASE: &str = "e81176cecdb8f52bf053147e9daf51080e0c0c26";

/// Builds the previous release's clbd (skipped when already built); one
/// build at a time in this process.
fn previous_release_clbd() -> PathBuf {
    static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = BUILDING.lock().unwrap_or_else(|p| p.into_inner());
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let base = root.join("target/previous-release");
    let bin = base.join("target/debug/clbd");
    let stamp = base.join("built-from");
    if bin.exists() && std::fs::read_to_string(&stamp).ok().as_deref() == Some(PREVIOUS_RELEASE) {
        return bin;
    }
    let src = base.join("src");
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src).expect("mkdir");
    let mut archive = Command::new("git")
        .arg("-C")
        .arg(root)
        .args(["archive", "--format=tar", PREVIOUS_RELEASE])
        .stdout(Stdio::piped())
        .spawn()
        .expect("git archive");
    let untar = Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(&src)
        .stdin(archive.stdout.take().expect("piped"))
        .status()
        .expect("tar");
    let archived = archive.wait().expect("git archive");
    assert!(
        archived.success() && untar.success(),
        "commit {PREVIOUS_RELEASE} (the previous release) is not in this clone's \
         history; the upgrade test needs a clone with history (not --depth 1)"
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let built = Command::new(cargo)
        // Without debug info: faster to build, and never debugged.
        .env("CARGO_PROFILE_DEV_DEBUG", "0")
        .args([
            "build",
            "--locked",
            "--quiet",
            "--bin",
            "clbd",
            "--manifest-path",
        ])
        .arg(src.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(base.join("target"))
        .status()
        .expect("cargo build");
    assert!(built.success(), "building the previous release failed");
    std::fs::write(&stamp, PREVIOUS_RELEASE).expect("stamp");
    bin
}

/// scripts/test.sh runs this alone before the suite, so the build does not
/// starve the timing-sensitive cluster tests beside it.
#[test]
fn the_previous_release_builds() {
    let clbd = previous_release_clbd();
    let out = Command::new(&clbd).arg("--version").output().expect("run");
    assert!(out.status.success(), "{}", clbd.display());
}

const WAIT: Duration = Duration::from_secs(20);

/// Registers `member` through node `via` (forwarded to the leader when
/// `via` follows), retrying while leadership moves, then waits until
/// every running node has it.
async fn write_through(c: &Cluster, via: u64, member: &str) {
    let client = c.node(via).client();
    let index = eventually(
        WAIT,
        &format!("register {member} via node {via}"),
        || async {
            client
                .register("web", member, "10.0.0.1", Some(80), None, None)
                .await
                .ok()
        },
    )
    .await;
    c.converged(index, WAIT).await;
}

/// Members of `web` on node `id`.
async fn members(c: &Cluster, id: u64) -> Vec<String> {
    let view = c.node(id).services().await.expect("services");
    view.services
        .get("web")
        .map(|s| s.members.keys().cloned().collect())
        .unwrap_or_default()
}

/// What node `id` says it speaks to node `peer`, once it has said.
async fn codec_towards(c: &Cluster, id: u64, peer: u64, want: &str) {
    eventually(
        WAIT,
        &format!("node {id} to speak {want} to node {peer}"),
        || async {
            let v = c.node(id).view().await?;
            (v.peer_codecs.get(&peer).map(String::as_str) == Some(want)).then_some(())
        },
    )
    .await;
}

/// Starts the stopped node `id` on `clbd`.
fn start_on(c: &mut Cluster, id: u64, clbd: &Path) {
    c.node_mut(id).clbd = clbd.to_path_buf();
    c.node_mut(id).spawn();
}

/// Restarts node `id` on `clbd` and waits until it answers.
async fn restart_on(c: &mut Cluster, id: u64, clbd: &Path) {
    let status = c.node_mut(id).terminate();
    assert!(status.success(), "node {id} SIGTERM exit {status:?}");
    start_on(c, id, clbd);
    eventually(WAIT, &format!("node {id} healthy"), || async {
        c.node(id).healthy().await.then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rolling_upgrade_from_the_previous_release_keeps_every_write() {
    let previous = tokio::task::spawn_blocking(previous_release_clbd)
        .await
        .expect("build");
    let current = PathBuf::from(env!("CARGO_BIN_EXE_clbd"));
    let mut c = Cluster::empty();
    c.clbd = previous.clone();
    c.spawn_peers(3, &FAST_TIMERS, |_| Vec::new())
        .expect("spawn");
    c.healthy(WAIT).await.unwrap_or_else(|e| panic!("{e}"));
    let leader = c.leader(WAIT).await;
    let mut written = Vec::new();
    for i in 0..20 {
        let m = format!("old-{i}");
        write_through(&c, leader, &m).await;
        written.push(m);
    }

    // Followers first: each comes back on this release beside an old
    // leader, migrates its data dir, and forwards a write to the old
    // leader in legacy.
    let followers = c.followers(leader);
    for &id in &followers {
        restart_on(&mut c, id, &current).await;
        assert!(
            c.node(id).log_text().contains("migrated the data dir"),
            "node {id} did not migrate its data dir"
        );
        let m = format!("mixed-{id}");
        write_through(&c, id, &m).await;
        written.push(m);
        codec_towards(&c, id, leader, "legacy").await;
    }
    codec_towards(&c, followers[0], followers[1], "v1").await;

    // A new leader with an old follower: the old leader hands over (to a
    // node of this release, the only others), then a write replicates to it.
    let old_leader = c.node(leader).client();
    eventually(WAIT, "the old leader hands over", || async {
        old_leader.failover().await.ok()
    })
    .await;
    let new_leader = c.leader(WAIT).await;
    assert!(followers.contains(&new_leader), "leader {new_leader}");
    for i in 0..10 {
        let m = format!("new-leader-{i}");
        write_through(&c, new_leader, &m).await;
        written.push(m);
    }
    written.sort();
    assert_eq!(members(&c, leader).await, written, "the old follower");

    // The last node; then every pair speaks v1.
    restart_on(&mut c, leader, &current).await;
    let m = "all-new".to_string();
    write_through(&c, leader, &m).await;
    written.push(m);
    written.sort();
    for id in 1..=3 {
        for peer in (1..=3).filter(|p| *p != id) {
            codec_towards(&c, id, peer, "v1").await;
        }
        assert_eq!(members(&c, id).await, written, "node {id}");
    }

    // The previous release refuses a data dir this one wrote: it exits with
    // a decode error instead of joining with a misread vote or log.
    let back = followers[0];
    assert!(c.node_mut(back).terminate().success());
    start_on(&mut c, back, &previous);
    let exit = c
        .node_mut(back)
        .child
        .as_mut()
        .expect("spawned")
        .wait_within(WAIT)
        .expect("the previous release to give up on a migrated dir");
    assert!(
        !exit.success(),
        "the previous release ran on a migrated dir"
    );
    let log = c.node(back).log_text();
    let tail: String = log.lines().rev().take(5).collect::<Vec<_>>().join("\n");
    assert!(tail.contains("decode"), "{tail}");
    c.node_mut(back).kill();
    // This release still opens it, and the cluster goes on.
    start_on(&mut c, back, &current);
    let m = "after-refusal".to_string();
    write_through(&c, back, &m).await;
    written.push(m);
    written.sort();
    assert_eq!(members(&c, back).await, written);
}
