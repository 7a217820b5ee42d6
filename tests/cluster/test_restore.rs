//! Large values and sled (issue #13, part 1): sled 0.34 keeps any page over
//! a quarter of a segment in a file under `blobs/` it never fsyncs. A big
//! `--restore` and the snapshot after it must leave nothing there, and a
//! restore killed at any point leaves the old registry or the whole backup.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clb::auth::{Scope, Token};
use clb::consensus::store::MAX_VALUE;
use clb::model::{
    Balance, Check, Member, MemberState, Members, Mode, Registry, ServerOptions, Service,
    ServiceDef,
};
use clb::views::{AuditQuery, Backup, BACKUP_FORMAT};

use crate::harness::{eventually, ClusterExt, NodeExt};
use lab::{Cluster, Node};

/// Writes a `clb snapshot save` file: `per_service` members in each of
/// `services`, and one token.
fn write_backup(path: &Path, services: &[&str], per_service: usize) {
    let mut registry = Registry::default();
    for (n, name) in services.iter().enumerate() {
        let members: Members = (0..per_service)
            .map(|i| {
                let member = Member {
                    address: format!("10.{n}.{}.{}", i >> 8, i & 255),
                    port: 8080,
                    weight: 100,
                    state: MemberState::Active,
                    registered_at_ms: 1_700_000_000_000u64 + i as u64,
                    ttl_s: None,
                };
                (format!("m{i:06}"), member)
            })
            .collect();
        let def = ServiceDef {
            port: 8000 + n as u16,
            member_port: 8080,
            mode: Mode::Http,
            balance: Balance::default(),
            check: Check::default(),
            server: ServerOptions::default(),
        };
        registry
            .services
            .insert(name.to_string(), Arc::new(Service { def, members }));
    }
    let token = Token {
        name: "restored".into(),
        scope: Scope::Read,
        hash: "00".repeat(32),
        created_at_ms: 1,
        expires_at_ms: None,
        created_by: "test".into(),
    };
    registry.tokens.insert("0123456789abcdef".into(), token);
    let backup = Backup {
        format: BACKUP_FORMAT.into(),
        index: 1,
        registry,
    };
    std::fs::write(path, serde_json::to_vec(&backup).unwrap()).unwrap();
}

/// Files under the data dir's `blobs/` (sled creates it empty at open: its
/// absence would make the check pass for nothing).
fn blobs(data_dir: &Path) -> Vec<String> {
    std::fs::read_dir(data_dir.join("blobs"))
        .expect("sled's blobs/ directory")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Index of the newest snapshot file in the data dir, if any.
fn snapshot_index(data_dir: &Path) -> Option<u64> {
    std::fs::read_dir(data_dir.join("snapshots"))
        .ok()?
        .filter_map(|e| {
            let name = e.ok()?.file_name().to_string_lossy().into_owned();
            let stem = name.strip_suffix(".snap")?;
            stem.split('-').next()?.parse().ok()
        })
        .max()
}

/// Elections that allow for a loaded machine (the restore and the
/// snapshot after it are seconds of CPU in a debug build), not the
/// harness's fast ones.
const TIMERS: [&str; 6] = [
    "--heartbeat-ms",
    "100",
    "--election-timeout-min-ms",
    "1500",
    "--election-timeout-max-ms",
    "3000",
];

async fn members(node: &Node) -> Option<u64> {
    Some(node.view().await?.members)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_and_the_snapshot_after_it_leave_nothing_in_sleds_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let backup = dir.path().join("backup.json");
    // 100,000 members: a 3.5 MB restore, and a snapshot at 100k after it.
    write_backup(&backup, &["web", "api"], 50_000);
    let started = Instant::now();
    let file = backup.to_str().unwrap().to_string();
    // Nodes 2 and 3 are witnesses: they store everything a balancer does
    // but render no haproxy.cfg, which at 100k members in a debug build
    // would take the two cores this suite may run on.
    let mut c = Cluster::start_custom(3, &TIMERS, move |id| {
        let mut a = vec!["--validate-cmd", "true", "--stats-port", "0"];
        if id == 1 {
            a.extend(["--restore", &file]);
        } else {
            a.extend(["--role", "witness"]);
        }
        a.into_iter().map(String::from).collect()
    })
    .await;
    for node in c.nodes.values() {
        eventually(
            Duration::from_secs(90),
            &format!("node {} to apply the backup", node.id),
            || async { (members(node).await? == 100_000).then_some(()) },
        )
        .await;
    }
    let restored = started.elapsed();
    eprintln!("restored on every node after {} ms", restored.as_millis());
    // A restore counts as that many writes: every node snapshots after it.
    let leader = c.leader(Duration::from_secs(10)).await;
    let commit = c.node(leader).view().await.unwrap().applied_index;
    for node in c.nodes.values() {
        eventually(
            Duration::from_secs(60),
            &format!("node {} to snapshot at 100k members", node.id),
            || async { (snapshot_index(&node.data_dir)? >= commit).then_some(()) },
        )
        .await;
    }
    // Concurrent writes: batch entries of up to 256 registrations, tens of
    // KiB each, which the log stores in parts.
    let client = c.any_client();
    let writes: Vec<_> = (0..256)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let address = format!("10.9.{}.{}", i >> 8, i & 255);
                client
                    .register("http", &format!("b{i}"), &address, Some(80), None, None)
                    .await
            })
        })
        .collect();
    for w in writes {
        w.await.unwrap().expect("a registration");
    }

    // One audit record for the restore, none for its parts.
    let audit = client
        .audit(&AuditQuery {
            limit: Some(10_000),
            ..Default::default()
        })
        .await
        .unwrap();
    let actions: Vec<&str> = audit
        .entries
        .iter()
        .map(|e| e.action.as_str())
        .filter(|a| a.starts_with("restore"))
        .collect();
    assert_eq!(actions, ["restore"], "{audit:?}");

    for node in c.nodes.values_mut() {
        assert!(node.terminate().success());
    }
    for node in c.nodes.values() {
        assert_eq!(
            blobs(&node.data_dir),
            Vec::<String>::new(),
            "node {}",
            node.id
        );
        // Every value sled holds, read back: none near the threshold that
        // sled's own config sets (a quarter of a segment, less headers).
        // Text lines, then a checksum.
        let conf = std::fs::read(node.data_dir.join("conf")).unwrap();
        let conf = String::from_utf8_lossy(&conf);
        let segment: usize = conf
            .lines()
            .find_map(|l| l.strip_prefix("segment_size: "))
            .and_then(|v| v.trim().parse().ok())
            .expect("segment_size in sled's conf");
        let threshold = segment / 4 - 20 - 32;
        let stores = clb::consensus::store::open(&node.data_dir).unwrap();
        let mut longest = 0;
        for name in stores.db.tree_names() {
            let tree = stores.db.open_tree(&name).unwrap();
            for value in tree.iter().values() {
                longest = longest.max(value.unwrap().len());
            }
        }
        // A leaf page holds up to ~17 values (sled splits past 16).
        assert!(
            longest <= MAX_VALUE,
            "node {}: a value of {longest} bytes",
            node.id
        );
        assert!(20 * (MAX_VALUE + 256) < threshold, "{threshold}");
    }
    eprintln!(
        "restore of 100k members on 3 nodes: {} ms; whole test {} ms",
        restored.as_millis(),
        started.elapsed().as_millis()
    );
}

/// Sets or clears `--restore FILE` in the node's arguments for its next start.
fn set_restore(node: &mut Node, file: Option<&Path>) {
    if let Some(i) = node.args.iter().position(|a| a == "--restore") {
        node.args.drain(i..i + 2);
    }
    if let Some(f) = file {
        node.args
            .extend(["--restore".into(), f.display().to_string()]);
    }
}

async fn healthy(node: &Node) {
    eventually(
        Duration::from_secs(60),
        &format!("node {} to start", node.id),
        || async { node.healthy().await.then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restore_killed_at_any_point_leaves_the_empty_registry_or_the_whole_backup() {
    const MEMBERS: u64 = 50_000;
    let dir = tempfile::tempdir().unwrap();
    let backup = dir.path().join("backup.json");
    write_backup(&backup, &["web"], MEMBERS as usize);
    let started = Instant::now();
    let file = backup.to_str().unwrap().to_string();
    let mut c = Cluster::start_custom(1, &TIMERS, move |_| {
        [
            "--restore",
            &file,
            "--validate-cmd",
            "true",
            "--stats-port",
            "0",
        ]
        .map(String::from)
        .to_vec()
    })
    .await;

    // Everything the registry is seen to hold meanwhile: never part of it.
    let seen = Arc::new(Mutex::new(BTreeSet::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = tokio::spawn({
        let client = c.node(1).client();
        let (seen, stop) = (seen.clone(), stop.clone());
        async move {
            while !stop.load(Ordering::Relaxed) {
                if let Some(n) = client.cluster().await.ok().map(|v| v.members) {
                    seen.lock().unwrap().insert(n);
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });

    // 51 parts at indexes 2 to 52, then the commit. Killed while staging
    // (three times, each run carrying on from the parts staged), and once
    // after the backup went live, as the snapshot that follows it is
    // written: at the first sight of its temp file, else of the file.
    for (n, point) in [8u64, 25, 45, u64::MAX].into_iter().enumerate() {
        let node = c.node(1);
        eventually(
            Duration::from_secs(60),
            &format!("kill point {n}"),
            || async {
                let v = node.view().await?;
                let reached = if point == u64::MAX {
                    v.members == MEMBERS
                } else {
                    v.applied_index >= point
                };
                reached.then_some(())
            },
        )
        .await;
        if point == u64::MAX {
            let snapshots = node.data_dir.join("snapshots");
            let deadline = Instant::now() + Duration::from_secs(60);
            let seen = loop {
                let names: Vec<String> = std::fs::read_dir(&snapshots)
                    .unwrap()
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                // Staging alone never triggers one.
                if let Some(name) = names.into_iter().next() {
                    break name;
                }
                assert!(Instant::now() < deadline, "no snapshot after the restore");
                tokio::time::sleep(Duration::from_millis(1)).await;
            };
            eprintln!("killing as {seen} appeared");
        }
        let at = c.node(1).view().await.map(|v| v.applied_index);
        let at = at.expect("applied index");
        let node = c.node_mut(1);
        node.kill();
        eprintln!("killed at point {n}: applied index {at}");
        // Restarted without the flag, it starts, with the registry as it was
        // before the restore or with all of it. (A kill can cost sled's
        // unwritten buffer: the node then applies the last entries again
        // from its log, so look once it is back where it was.)
        set_restore(node, None);
        node.spawn();
        healthy(node).await;
        let node = c.node(1);
        let after = eventually(
            Duration::from_secs(60),
            &format!("the node to apply up to {at} again"),
            || async {
                let v = node.view().await?;
                (v.applied_index >= at).then_some(v.members)
            },
        )
        .await;
        let node = c.node_mut(1);
        let want = if point == u64::MAX { MEMBERS } else { 0 };
        assert_eq!(after, want, "after kill point {n}");
        let leftovers: Vec<_> = std::fs::read_dir(node.data_dir.join("snapshots"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|name| !name.ends_with(".snap"))
            .collect();
        // A temp file a kill left is gone at start.
        assert!(leftovers.is_empty(), "{leftovers:?}");
        assert!(node.terminate().success());
        // With the flag again, as after a crash mid-restore.
        set_restore(node, Some(&backup));
        node.spawn();
        healthy(node).await;
    }
    // The last start found the backup restored already, and said so.
    let node = c.node(1);
    eventually(
        Duration::from_secs(60),
        "the last start to recognize the backup",
        || async {
            let log = node.log_text();
            log.contains("the registry already holds this backup")
                .then_some(())
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    watcher.await.unwrap();
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen, BTreeSet::from([0, MEMBERS]), "registry sizes seen");
    let audit = node.client().audit(&AuditQuery::default()).await.unwrap();
    let restores = audit
        .entries
        .iter()
        .filter(|e| e.action == "restore")
        .count();
    assert_eq!(restores, 1, "{audit:?}");
    let text = node.log_text();
    assert!(!text.contains("panicked"), "{text}");
    assert_eq!(blobs(&node.data_dir), Vec::<String>::new());
    eprintln!(
        "restore killed at 4 points: {} ms",
        started.elapsed().as_millis()
    );
}
