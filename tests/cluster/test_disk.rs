//! Disk faults (issue #7): a node whose data dir fills up or turns read-only
//! stops, says why, releases the VIP and exits 75; restarted the way systemd
//! would once the disk is writable, it catches up and loses nothing.
//!
//! The data dirs live on mounts these tests make (tmpfs, or ext4 on a loop
//! device for a read-only fault under a running node), so they need root.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::storage::RaftLogStorage;

use crate::harness::{eventually, ClusterExt, NodeExt, TOKEN};
use lab::{hook_events, vip_hook, Cluster, Node};

/// clbd's exit status for "start me again later" (`daemon::EXIT_RETRY`).
const EXIT_RETRY: i32 = 75;
/// How often the test, playing systemd, restarts a node that exits at once.
const RESTARTS: u32 = 5;

fn run(cmd: &str, args: &[&str]) -> Result<(), String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// File systems mounted by one test, unmounted in `Drop` (also on failure).
/// Declare it before the `Cluster` so the nodes are killed first.
struct Mounts {
    dir: tempfile::TempDir,
    points: Vec<PathBuf>,
}

impl Mounts {
    /// `None`, with the reason printed, where this process cannot mount.
    fn new(test: &str) -> Option<Mounts> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            println!("SKIP {test}: needs root to mount file systems");
            return None;
        }
        let mut m = Mounts {
            dir: tempfile::tempdir().expect("tempdir"),
            points: Vec::new(),
        };
        if let Err(e) = m.tmpfs("probe", "1m") {
            println!("SKIP {test}: cannot mount tmpfs: {e}");
            return None;
        }
        Some(m)
    }

    fn point(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(&p).expect("mount point");
        p
    }

    fn tmpfs(&mut self, name: &str, size: &str) -> Result<PathBuf, String> {
        let p = self.point(name);
        let opts = format!("size={size},mode=0700");
        run("mount", &["-t", "tmpfs", "-o", &opts, "tmpfs", &path(&p)])?;
        self.points.push(p.clone());
        Ok(p)
    }

    /// ext4 in an image file on a loop device, mounted `errors=remount-ro`:
    /// the kernel makes it read-only under running writers after an error.
    fn ext4(&mut self, name: &str) -> Result<PathBuf, String> {
        let image = self.dir.path().join(format!("{name}.img"));
        std::fs::File::create(&image)
            .and_then(|f| f.set_len(32 << 20))
            .map_err(|e| format!("image: {e}"))?;
        run("mkfs.ext4", &["-q", "-F", &path(&image)])?;
        let p = self.point(name);
        self.mount_ext4(name)?;
        self.points.push(p.clone());
        Ok(p)
    }

    /// Mounts the image through a loop device of its own. `mount -o loop`
    /// would reuse one still bound to the image, and after an umount the
    /// kernel keeps the old file system (read-only after a fault) for as long
    /// as another mount namespace holds a copy of the mount: every `ip netns
    /// exec` a concurrent test runs makes one. A new mount would get that
    /// read-only file system back.
    fn mount_ext4(&self, name: &str) -> Result<(), String> {
        let image = self.dir.path().join(format!("{name}.img"));
        let p = self.dir.path().join(name);
        let out = Command::new("losetup")
            .args(["--find", "--show", &path(&image)])
            .output()
            .map_err(|e| format!("losetup: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "losetup: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        let dev = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let mounted = run("mount", &["-o", "errors=remount-ro", &dev, &path(&p)]);
        // Detaching a device in use only marks it to go with its last user,
        // the mount.
        let _ = run("losetup", &["-d", &dev]);
        mounted
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for p in self.points.iter().rev() {
            if run("umount", &[&path(p)]).is_err() {
                // Busy (a child still exiting) or already unmounted: detach
                // it anyway so no mount outlives the test.
                let _ = run("umount", &["-l", &path(p)]);
            }
        }
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

/// Fills the file system of `dir` with a file of zeros until it is full.
fn fill(dir: &Path) -> PathBuf {
    let filler = dir.join("filler");
    let mut f = std::fs::File::create(&filler).expect("filler");
    let chunk = vec![0u8; 64 << 10];
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", dir.display()),
        }
    }
    // Smaller pieces take the last pages.
    while f.write(&[0u8; 512]).is_ok_and(|n| n > 0) {}
    filler
}

/// Waits for a node's clbd to exit by itself; returns its exit code.
async fn exit_code(node: &mut Node, within: Duration, what: &str) -> Option<i32> {
    let child = node.child.as_mut().expect("running");
    let status = eventually(within, what, || {
        let r = child.try_wait().expect("try_wait");
        async move { r }
    })
    .await;
    node.child = None;
    status.code()
}

/// Plays systemd (`Restart=on-failure`): starts the node and starts it again
/// while it exits before it is healthy, at most [`RESTARTS`] times. Returns
/// the exit codes of the failed starts.
async fn supervise(node: &mut Node) -> Vec<Option<i32>> {
    let mut failed = Vec::new();
    for _ in 0..RESTARTS {
        node.spawn();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = node
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                node.child = None;
                failed.push(status.code());
                break;
            }
            if node.healthy().await {
                return failed;
            }
            assert!(
                Instant::now() < deadline,
                "node {} neither healthy nor exited",
                node.id
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    panic!(
        "node {} did not come back after {RESTARTS} starts: {failed:?}\n{}",
        node.id,
        node.log_text()
    );
}

/// Registrations through a fixed set of nodes, one after another, until
/// stopped; remembers which were acknowledged.
struct Writes {
    acked: Arc<Mutex<Vec<(String, u64)>>>,
    failed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Writes {
    fn start(c: &Cluster, through: &[u64]) -> Writes {
        let servers: Vec<&str> = through.iter().map(|id| c.node(*id).addr.as_str()).collect();
        let client =
            clb::client::Client::new(&servers.join(","), Some(TOKEN.into())).expect("client");
        let acked = Arc::new(Mutex::new(Vec::new()));
        let failed = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let (acked, failed, stop) = (acked.clone(), failed.clone(), stop.clone());
            async move {
                let mut i = 0u32;
                while !stop.load(Ordering::Relaxed) {
                    let member = format!("w{i}");
                    let address = format!("10.{}.{}.{}", i >> 16, (i >> 8) & 255, i & 255);
                    match client
                        .register("http", &member, &address, Some(80), None, None)
                        .await
                    {
                        Ok(index) => acked.lock().unwrap().push((member, index)),
                        // A 503 during an election, or an unknown outcome: not acknowledged.
                        Err(_) => {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    i += 1;
                }
            }
        });
        Writes {
            acked,
            failed,
            stop,
            task,
        }
    }

    fn count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Waits until `more` writes beyond the count now are acknowledged.
    async fn progress(&self, more: usize, within: Duration, what: &str) {
        let want = self.count() + more;
        eventually(within, what, || async {
            (self.count() >= want).then_some(())
        })
        .await;
    }

    /// Stops writing; returns every acknowledged (member, index).
    async fn finish(self) -> Vec<(String, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.expect("writer");
        let acked = self.acked.lock().unwrap().clone();
        eprintln!(
            "writes: {} acknowledged, {} not",
            acked.len(),
            self.failed.load(Ordering::Relaxed)
        );
        acked
    }
}

/// Every node applied every acknowledged write and all registries are equal.
async fn caught_up(c: &Cluster, acked: &[(String, u64)]) {
    let last = acked.iter().map(|(_, i)| *i).max().expect("some writes");
    c.converged(last, Duration::from_secs(30)).await;
    // Nodes may still apply entries past `last` (a write whose outcome was
    // unknown): compare once they agree.
    let registries = eventually(
        Duration::from_secs(10),
        "identical registries on every node",
        || async {
            let mut all = Vec::new();
            for n in c.nodes.values() {
                all.push(n.services().await?.services);
            }
            all.windows(2).all(|w| w[0] == w[1]).then_some(all)
        },
    )
    .await;
    let members: BTreeSet<&str> = registries[0]
        .get("http")
        .expect("http members")
        .members
        .keys()
        .map(String::as_str)
        .collect();
    let lost: Vec<&str> = acked
        .iter()
        .map(|(m, _)| m.as_str())
        .filter(|m| !members.contains(m))
        .collect();
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
}

/// Restarts `victim` like systemd and returns how long after `since` it had
/// applied what the leader had applied when it was restarted.
async fn restart_and_catch_up(c: &mut Cluster, victim: u64, since: Instant) -> Duration {
    let leader = c.leader(Duration::from_secs(10)).await;
    let target = applied(c.node(leader)).await.expect("leader's index");
    let failed = supervise(c.node_mut(victim)).await;
    assert!(
        failed.iter().all(|code| *code == Some(EXIT_RETRY)),
        "{failed:?}"
    );
    let node = c.node(victim);
    eventually(
        Duration::from_secs(30),
        "the restarted node to catch up",
        || async { (applied(node).await? >= target).then_some(()) },
    )
    .await;
    since.elapsed()
}

async fn applied(node: &Node) -> Option<u64> {
    Some(node.view().await?.applied_index)
}

/// The one line that says why the node stopped, with one of `causes`.
fn says_why(node: &Node, causes: &[&str]) -> String {
    let text = node.log_text();
    let dir = node.data_dir.display();
    let line = text
        .lines()
        .find(|l| {
            causes
                .iter()
                .any(|cause| l.contains(&format!("storage failed: {cause} writing {dir}; ")))
        })
        .unwrap_or_else(|| {
            panic!(
                "no 'storage failed: {causes:?} writing {dir}' in node {}'s log:\n{text}",
                node.id
            )
        });
    assert!(
        !text.contains("panicked"),
        "node {} panicked:\n{text}",
        node.id
    );
    line.to_string()
}

/// Three nodes, each with its data dir on its own tmpfs, a test VIP hook,
/// rendering not under test.
async fn on_tmpfs(mounts: &mut Mounts, hook: &Path) -> Cluster {
    let dirs: Vec<PathBuf> = (1..=3)
        .map(|id| {
            let m = mounts.tmpfs(&format!("node{id}"), "8m").expect("tmpfs");
            m.join("data")
        })
        .collect();
    let hook = path(hook);
    Cluster::start_custom(3, &lab::FAST_TIMERS, move |id| {
        [
            "--data-dir",
            &path(&dirs[id as usize - 1]),
            "--vip",
            "192.0.2.7",
            "--vip-hook",
            &hook,
            "--validate-cmd",
            "true",
            "--stats-port",
            "0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    })
    .await
}

/// Fills `victim`'s disk under writes through the others; checks it stops,
/// says why and exits 75 while the others keep acknowledging; frees the disk,
/// restarts it and checks that it catches up.
/// Three nodes, node 3's data dir at `data`, and writes through nodes 1 and
/// 2 already under way.
async fn node3_on(data: &Path) -> (Cluster, Writes) {
    let c = Cluster::start_custom(3, &lab::FAST_TIMERS, |id| {
        let mut a = vec!["--validate-cmd".to_string(), "true".into()];
        if id == 3 {
            a.extend(["--data-dir".to_string(), path(data)]);
        }
        a
    })
    .await;
    c.leader(Duration::from_secs(10)).await;
    let writes = Writes::start(&c, &[1, 2]);
    writes
        .progress(20, Duration::from_secs(10), "writes before the fault")
        .await;
    (c, writes)
}

async fn full_disk(c: &mut Cluster, victim: u64) {
    let others: Vec<u64> = c.nodes.keys().copied().filter(|&id| id != victim).collect();
    let writes = Writes::start(c, &others);
    writes
        .progress(20, Duration::from_secs(10), "writes before the fault")
        .await;

    let filled = Instant::now();
    let filler = fill(c.node(victim).data_dir.parent().expect("mount"));
    let code = exit_code(
        c.node_mut(victim),
        Duration::from_secs(20),
        "the node with a full disk to exit",
    )
    .await;
    let detect = filled.elapsed();
    assert_eq!(code, Some(EXIT_RETRY), "{}", c.node(victim).log_text());
    let line = says_why(c.node(victim), &["No space left on device (os error 28)"]);
    assert!(
        line.contains("exiting so the supervisor restarts clbd"),
        "{line}"
    );

    // The others keep acknowledging without it.
    let new_leader = c.leader(Duration::from_secs(10)).await;
    assert_ne!(new_leader, victim);
    writes
        .progress(20, Duration::from_secs(10), "writes while the node is down")
        .await;

    // Still full: a restart exits at once, saying why.
    c.node_mut(victim).spawn();
    let code = exit_code(
        c.node_mut(victim),
        Duration::from_secs(20),
        "a start on a full disk to fail",
    )
    .await;
    assert_eq!(code, Some(EXIT_RETRY), "{}", c.node(victim).log_text());

    std::fs::remove_file(&filler).expect("remove filler");
    let recover = restart_and_catch_up(c, victim, Instant::now()).await;
    writes
        .progress(20, Duration::from_secs(10), "writes after the restart")
        .await;
    let acked = writes.finish().await;
    caught_up(c, &acked).await;
    eprintln!(
        "node {victim}: exited {} ms after its disk filled; caught up {} ms after space returned",
        detect.as_millis(),
        recover.as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_whose_disk_fills_exits_and_catches_up_when_space_returns() {
    let Some(mut mounts) = Mounts::new("follower disk full") else {
        return;
    };
    let (hook, _) = vip_hook(mounts.dir.path()).expect("write hook");
    let mut c = on_tmpfs(&mut mounts, &hook).await;
    let leader = c.leader(Duration::from_secs(10)).await;
    let victim = c.followers(leader)[0];
    full_disk(&mut c, victim).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_whose_disk_fills_releases_the_vip_and_a_new_leader_loses_nothing() {
    let Some(mut mounts) = Mounts::new("leader disk full") else {
        return;
    };
    let (hook, events) = vip_hook(mounts.dir.path()).expect("write hook");
    let mut c = on_tmpfs(&mut mounts, &hook).await;
    let victim = c.leader(Duration::from_secs(10)).await;
    eventually(
        Duration::from_secs(10),
        "the leader to hold the VIP",
        || async { c.node(victim).view().await?.vip.held.then_some(()) },
    )
    .await;
    full_disk(&mut c, victim).await;

    // The failed leader released the VIP before it exited, and the next
    // claim was another node's, in a later term.
    let ev = hook_events(&events);
    let claim = ev
        .iter()
        .rposition(|e| e.node == victim && e.action == "claim")
        .expect("the leader had claimed");
    let release = ev[claim..]
        .iter()
        .position(|e| e.node == victim && e.action == "release")
        .map(|i| claim + i)
        .unwrap_or_else(|| panic!("no release after the claim: {ev:?}"));
    let next = ev[claim + 1..]
        .iter()
        .find(|e| e.action == "claim")
        .unwrap_or_else(|| panic!("nobody claimed after the failed leader: {ev:?}"));
    assert_ne!(next.node, victim, "{ev:?}");
    assert!(next.term > ev[claim].term, "{ev:?}");
    assert!(ev[release].at_ns <= next.at_ns, "{ev:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_that_turns_read_only_under_a_running_node_stops_it_until_it_is_writable() {
    let Some(mut mounts) = Mounts::new("read-only under a running node") else {
        return;
    };
    // `mount -o remount,ro` is refused (EBUSY) while a process has a file
    // open for writing, as clbd always does: a file system turns read-only
    // under a running writer only by the kernel's own hand, as ext4 does
    // after an error with errors=remount-ro.
    let disk = match mounts.ext4("ext4") {
        Ok(p) => p,
        Err(e) => {
            println!("SKIP read-only under a running node: no ext4 on a loop device: {e}");
            return;
        }
    };
    let data = disk.join("data");
    let (mut c, writes) = node3_on(&data).await;

    let source = Command::new("findmnt")
        .args(["-n", "-o", "SOURCE", &path(&disk)])
        .output()
        .expect("findmnt");
    let dev = String::from_utf8_lossy(&source.stdout).trim().to_string();
    let trigger = format!(
        "/sys/fs/ext4/{}/trigger_fs_error",
        dev.trim_start_matches("/dev/")
    );
    let applied_before = applied(c.node(3)).await.expect("node 3's index");
    let failed_at = Instant::now();
    std::fs::write(&trigger, "clb test: read-only fault").expect("trigger an ext4 error");
    let code = exit_code(
        c.node_mut(3),
        Duration::from_secs(20),
        "the node on a read-only disk to exit",
    )
    .await;
    let detect = failed_at.elapsed();
    assert_eq!(code, Some(EXIT_RETRY), "{}", c.node(3).log_text());
    // Writes fail read-only; a sync after ext4 aborted its journal, EIO.
    says_why(
        c.node(3),
        &[
            "Read-only file system (os error 30)",
            "Input/output error (os error 5)",
        ],
    );
    writes
        .progress(20, Duration::from_secs(10), "writes while the node is down")
        .await;

    // Back to read-write the way an operator would: unmount, check, mount.
    run("umount", &[&path(&disk)]).expect("umount");
    let image = mounts.dir.path().join("ext4.img");
    let fsck = Command::new("e2fsck")
        .args(["-f", "-y", &path(&image)])
        .output()
        .expect("e2fsck");
    // 0: clean, 1: errors corrected.
    assert!(matches!(fsck.status.code(), Some(0 | 1)), "{fsck:?}");
    mounts.mount_ext4("ext4").expect("mount again");
    // The error threw away what ext4 had not committed: the node must still
    // have its vote and every entry it had applied, or it would rejoin with
    // amnesia (a leader's Raft panics on a follower whose log went back).
    {
        let mut stores = clb::consensus::store::open(&data).expect("the data dir opens");
        let vote = stores.log.read_vote().await.expect("read vote");
        assert!(vote.is_some(), "node 3 forgot its vote");
        let last = stores
            .log
            .get_log_state()
            .await
            .expect("log state")
            .last_log_id;
        assert!(
            last.map(|l| l.index) >= Some(applied_before),
            "node 3 lost log entries: it had applied {applied_before}, its log ends at {last:?}"
        );
    }
    let recover = restart_and_catch_up(&mut c, 3, Instant::now()).await;
    let acked = writes.finish().await;
    caught_up(&c, &acked).await;
    eprintln!(
        "node 3: exited {} ms after its disk turned read-only; caught up {} ms after it was writable",
        detect.as_millis(),
        recover.as_millis()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_started_on_a_read_only_data_dir_exits_with_one_line_and_starts_once_writable() {
    let Some(mut mounts) = Mounts::new("start on a read-only data dir") else {
        return;
    };
    // A fresh data dir on a read-only mount: one line, exit 75.
    let ro = mounts.tmpfs("ro", "1m").expect("tmpfs");
    run("mount", &["-o", "remount,ro", &path(&ro)]).expect("remount ro");
    for dir in [ro.clone(), ro.join("data")] {
        let out = Command::new(env!("CARGO_BIN_EXE_clbd"))
            .args(["--data-dir", &path(&dir), "--listen", "127.0.0.1:0"])
            .args(["--peer-listen", "127.0.0.1:0"])
            .output()
            .expect("run clbd");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(EXIT_RETRY), "{stderr}");
        assert_eq!(
            stderr.trim_end(),
            format!(
                "clbd: storage failed: Read-only file system (os error 30) writing {}; \
                 exiting so the supervisor restarts clbd when the disk is writable",
                dir.display()
            )
        );
    }

    // A node's data dir remounted read-only while it is down (the only time
    // the kernel allows it): it refuses to start until the dir is writable
    // again, then catches up.
    let disk = mounts.tmpfs("node3", "8m").expect("tmpfs");
    let data = disk.join("data");
    let (mut c, writes) = node3_on(&data).await;
    assert!(c.node_mut(3).terminate().success());
    run("mount", &["-o", "remount,ro", &path(&disk)]).expect("remount ro");
    c.node_mut(3).spawn();
    let code = exit_code(
        c.node_mut(3),
        Duration::from_secs(20),
        "a start on a read-only data dir to fail",
    )
    .await;
    assert_eq!(code, Some(EXIT_RETRY), "{}", c.node(3).log_text());
    let last = c
        .node(3)
        .log_text()
        .lines()
        .last()
        .unwrap_or("")
        .to_string();
    assert!(
        last.starts_with("clbd: storage failed: Read-only file system (os error 30) writing "),
        "{last}"
    );
    writes
        .progress(20, Duration::from_secs(10), "writes while the node is down")
        .await;

    run("mount", &["-o", "remount,rw", &path(&disk)]).expect("remount rw");
    let recover = restart_and_catch_up(&mut c, 3, Instant::now()).await;
    let acked = writes.finish().await;
    caught_up(&c, &acked).await;
    eprintln!(
        "node 3: caught up {} ms after its data dir was writable again",
        recover.as_millis()
    );
}
