//! A voter that lost its data dir must not vote as if it remembered.
//!
//! Writes are acknowledged by {leader, N} while the third node F is stopped,
//! so they live on those two only. Then the leader and N die and N's data
//! dir is wiped. While a peer that knows N is up, N refuses to start with a
//! one-line reason naming the way back; when none is up, N starts, but F
//! neither counts N's vote nor grants it one, so F cannot be elected without
//! the writes. The leader returns and nothing acknowledged is lost. Then N
//! is removed and added back with `--join`, and catches up.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use clb::views::RaftState;

use crate::harness::{eventually, ClusterExt, NodeExt, TOKEN};
use lab::Cluster;

const WRITES: usize = 20;

async fn members(c: &Cluster, id: u64) -> Option<BTreeSet<String>> {
    let s = c.node(id).services().await?;
    Some(s.services.get("http")?.members.keys().cloned().collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wiped_voter_neither_votes_nor_loses_acknowledged_writes() {
    let mut c = Cluster::start(3).await;
    let leader = c.leader(Duration::from_secs(10)).await;
    let followers = c.followers(leader);
    let (n, f) = (followers[0], followers[1]);
    let client = c.node(leader).client();
    // N has answered the leader (and recorded who is who) before anything.
    let first = client
        .register("http", "before", "10.0.0.1", None, None, None)
        .await
        .expect("write");
    c.converged(first, Duration::from_secs(10)).await;

    // F stops: the next writes are acknowledged by {leader, N} alone.
    c.node(f).signal(libc::SIGSTOP);
    let mut acked = BTreeSet::from(["before".to_string()]);
    for i in 0..WRITES {
        let name = format!("w{i}");
        client
            .register("http", &name, "10.0.0.2", None, None, None)
            .await
            .expect("a write with F stopped");
        acked.insert(name);
    }

    // N dies and loses its data dir. With the leader up, it refuses to start.
    c.node_mut(n).kill();
    let data = c.node(n).data_dir.clone();
    std::fs::remove_dir_all(&data).expect("wipe N");
    let out = Command::new(env!("CARGO_BIN_EXE_clbd"))
        .args(&c.node(n).args)
        .output()
        .expect("run clbd");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let last = err.lines().last().unwrap_or("");
    assert!(
        last.contains(&format!("knows node {n} from before"))
            && last.contains(&format!("clb cluster remove {n}"))
            && last.contains("--join"),
        "{last}"
    );

    // Now the leader dies too, and N (wiped again) starts with no peer up
    // to tell it: it comes up empty. F resumes.
    c.node_mut(leader).kill();
    std::fs::remove_dir_all(&data).expect("wipe N again");
    c.node_mut(n).spawn();
    c.node(f).signal(libc::SIGCONT);
    // For several election timeouts, F must not become leader: N's votes
    // (for F, or for itself) do not count.
    let deadline = std::time::Instant::now() + Duration::from_secs(4);
    while std::time::Instant::now() < deadline {
        if let Some(v) = c.node(f).view().await {
            assert_ne!(
                v.state,
                RaftState::Leader,
                "F was elected with the vote of a node that lost its data"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = c.node(f).log_text();
    assert!(
        log.contains("lost its data dir"),
        "F never refused the wiped node"
    );

    // The leader comes back: every acknowledged write is there.
    c.node_mut(leader).spawn();
    let got = eventually(
        Duration::from_secs(30),
        "a leader with the writes",
        || async {
            let l = c.nodes.get(&leader)?;
            let v = l.view().await?;
            v.leader?;
            members(&c, leader).await
        },
    )
    .await;
    assert!(acked.is_subset(&got), "lost: {:?}", acked.difference(&got));
    let on_f = eventually(Duration::from_secs(30), "F to catch up", || async {
        let m = members(&c, f).await?;
        acked.is_subset(&m).then_some(m)
    })
    .await;
    assert!(acked.is_subset(&on_f));

    // The way back: remove N, start it empty with --join, add it again.
    c.node_mut(n).kill();
    std::fs::remove_dir_all(&data).expect("wipe N for the re-add");
    let servers = format!("{},{}", c.node(leader).addr, c.node(f).addr);
    let clb = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_clb"))
            .args(args)
            .env("CLB_SERVER", &servers)
            .env("CLB_TOKEN", TOKEN)
            .output()
            .expect("run clb")
    };
    let out = clb(&["cluster", "remove", &n.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let node = c.node_mut(n);
    let peers = node
        .args
        .iter()
        .position(|a| a == "--peers")
        .expect("--peers");
    node.args.drain(peers..peers + 2);
    node.args.push("--join".into());
    node.spawn();
    let peer_addr = c.node(n).peer_addr.clone();
    eventually(Duration::from_secs(20), "N added back", || async {
        let out = clb(&["cluster", "add", &n.to_string(), &peer_addr]);
        out.status.success().then_some(())
    })
    .await;
    let back = eventually(Duration::from_secs(30), "N to catch up", || async {
        let m = members(&c, n).await?;
        acked.is_subset(&m).then_some(m)
    })
    .await;
    assert!(acked.is_subset(&back));
}
