//! Dynamic membership and start-up identity checks.

use std::process::Command;
use std::time::Duration;

use crate::harness::{eventually, ClusterExt, NodeExt, TOKEN};
use lab::{free_port, Cluster};

fn clb(args: &[&str], server: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_clb"))
        .args(args)
        .env("CLB_SERVER", server)
        .env("CLB_TOKEN", TOKEN)
        .output()
        .expect("run clb")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_add_grows_to_four_and_remove_shrinks_back() {
    let mut c = Cluster::start(3).await;
    c.leader(Duration::from_secs(10)).await;
    c.any_client()
        .register("http", "web1", "10.0.0.1", None, None, None)
        .await
        .expect("register");

    let addr = format!("127.0.0.1:{}", free_port());
    c.add_node(4, addr, vec!["--join".into()]);
    let n4 = c.node(4);
    eventually(Duration::from_secs(10), "node 4 healthy", || async {
        n4.healthy().await.then_some(())
    })
    .await;

    let server = c.node(1).addr.clone();
    let out = clb(&["cluster", "add", "4", &n4.peer_addr], &server);
    assert!(
        out.status.success(),
        "clb cluster add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let view = c.node(1).view().await.expect("view");
    assert_eq!(view.voters, [1, 2, 3, 4]);
    // The new node caught up with the registry.
    eventually(
        Duration::from_secs(10),
        "node 4 has the registry",
        || async {
            let s = n4.services().await?;
            s.services
                .get("http")
                .is_some_and(|h| h.members.contains_key("web1"))
                .then_some(())
        },
    )
    .await;

    let out = clb(&["cluster", "remove", "4"], &server);
    assert!(
        out.status.success(),
        "clb cluster remove: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually(Duration::from_secs(5), "3 voters again", || async {
        let v = c.node(2).view().await?;
        (v.voters == [1, 2, 3] && !v.nodes.contains_key(&4)).then_some(())
    })
    .await;
    // Writes still work with the shrunk cluster.
    c.any_client()
        .register("http", "web2", "10.0.0.2", None, None, None)
        .await
        .expect("register after remove");

    // Removing an unknown node is refused with a clear answer.
    let out = clb(&["cluster", "remove", "9"], &server);
    assert_eq!(
        out.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_learner_stays_a_learner() {
    let mut c = Cluster::start(3).await;
    c.leader(Duration::from_secs(10)).await;
    let addr = format!("127.0.0.1:{}", free_port());
    c.add_node(4, addr, vec!["--join".into()]);
    let n4 = c.node(4);
    eventually(Duration::from_secs(10), "node 4 healthy", || async {
        n4.healthy().await.then_some(())
    })
    .await;
    c.node(2)
        .client()
        .add_node(4, &n4.peer_addr, true)
        .await
        .expect("add learner through a follower");
    // The add is committed; node 1 may apply it a moment later.
    let v = eventually(
        Duration::from_secs(10),
        "node 1 sees the learner",
        || async {
            let v = c.node(1).view().await?;
            (v.learners == [4]).then_some(v)
        },
    )
    .await;
    assert_eq!(v.voters, [1, 2, 3]);
}

/// Starts clbd with `args` and expects it to exit non-zero with one line on stderr.
fn refused(args: &[String]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_clbd"))
        .args(args)
        .output()
        .expect("run clbd");
    assert!(!out.status.success(), "clbd should refuse {args:?}");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    let last = err.lines().last().unwrap_or("").to_string();
    assert!(last.starts_with("clbd: "), "one-line reason, got {err:?}");
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_dir_of_another_node_or_cluster_is_refused() {
    let mut c = Cluster::start(3).await;
    c.leader(Duration::from_secs(10)).await;
    c.node_mut(3).kill();
    let n3 = c.node(3);
    let dir = n3.data_dir.display().to_string();
    let tokens = c.token_file.display().to_string();
    let secret = c.secret_file.display().to_string();
    let base = |node: &str, peers: &str| -> Vec<String> {
        [
            "--node-id",
            node,
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--peer-listen",
            &format!("127.0.0.1:{}", free_port()),
            "--data-dir",
            &dir,
            "--token-file",
            &tokens,
            "--cluster-secret-file",
            &secret,
            "--peers",
            peers,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let peers = c.peers_arg();
    // Node 3's data dir used as node 2.
    let msg = refused(&base("2", &peers));
    assert!(msg.contains("belongs to node 3"), "{msg}");
    // Same node, but --peers describe another cluster.
    let other = format!("{peers},4=127.0.0.1:{}", free_port());
    let msg = refused(&base("3", &other));
    assert!(msg.contains("belongs to cluster"), "{msg}");
    // And the node still starts with its own settings and rejoins.
    c.node_mut(3).spawn();
    let n3 = c.node(3);
    eventually(Duration::from_secs(10), "node 3 rejoins", || async {
        let v = n3.view().await?;
        v.leader.map(|_| ())
    })
    .await;
}

#[test]
fn bad_flags_exit_non_zero_with_one_line() {
    for (args, needle) in [
        (vec!["--role", "boss"], "--role"),
        (vec!["--peers", "1=a"], "--peers"),
        (vec!["--listen", "nowhere"], "--listen"),
        (
            vec!["--node-id", "2", "--peers", "1=127.0.0.1:1"],
            "does not name this node",
        ),
        // Several nodes share a secret, or say plainly that they do not.
        (
            vec!["--peers", "1=127.0.0.1:1,2=127.0.0.1:2"],
            "--cluster-secret-file: a cluster of several nodes needs a shared peer secret",
        ),
        (vec!["--join"], "--cluster-secret-file"),
        (
            vec!["--listen", "127.0.0.1:9", "--peer-listen", "127.0.0.1:9"],
            "--peer-listen",
        ),
    ] {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let msg = refused(&args);
        assert!(msg.contains(needle), "{args:?}: {msg}");
    }
}

/// A second process started with an id already in use: with a data dir of
/// its own it is a new incarnation the peers refuse, so it does not start;
/// with a copy of the node's data dir it stops taking part in Raft (and says
/// why), whether it starts while the real node runs or the real node comes
/// back while it runs; the cluster keeps working.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_with_the_same_node_id_halts_with_an_error() {
    let mut c = Cluster::start(3).await;
    c.leader(Duration::from_secs(10)).await;
    let peers = c.node(1).args[c
        .node(1)
        .args
        .iter()
        .position(|a| a == "--peers")
        .expect("--peers")
        + 1]
    .clone();
    let halted = "two processes run with --node-id 2; this one stops taking part in Raft";
    let probed = "another process started with --node-id 2 probed this node's address";
    let impostor = |c: &Cluster, name: &str| {
        let dir = c.dir.path().join(name);
        lab::Node {
            id: 2,
            addr: format!("127.0.0.1:{}", free_port()),
            peer_addr: format!("127.0.0.1:{}", free_port()),
            log: c.dir.path().join(format!("{name}.log")),
            args: Vec::new(),
            clbd: c.clbd.clone(),
            env: c.env.clone(),
            own_group: false,
            child: None,
            data_dir: dir,
        }
    };
    let secret = c.secret_file.clone();
    let spawn = |n: &mut lab::Node, token_file: &std::path::Path| {
        n.args = vec![
            "--node-id".into(),
            "2".into(),
            "--listen".into(),
            n.addr.clone(),
            "--peer-listen".into(),
            n.peer_addr.clone(),
            "--cluster-secret-file".into(),
            secret.display().to_string(),
            "--peers".into(),
            peers.clone(),
            "--data-dir".into(),
            n.data_dir.display().to_string(),
            "--token-file".into(),
            token_file.display().to_string(),
            "--validate-cmd".into(),
            "true".into(),
            "-o".into(),
            n.data_dir.with_extension("cfg").display().to_string(),
        ];
        n.spawn();
    };

    // 0. With a data dir of its own: a new incarnation of node 2, which the
    // peers know from before, so it refuses to start.
    let mut fresh = impostor(&c, "dup0");
    spawn(&mut fresh, &c.token_file);
    let status = fresh.child.as_mut().expect("spawned").wait().expect("wait");
    fresh.child = None;
    assert_eq!(status.code(), Some(1), "{}", fresh.log_text());
    assert!(
        fresh.log_text().contains("knows node 2 from before"),
        "{}",
        fresh.log_text()
    );

    // A copy of node 2's own data dir carries its incarnation: only the
    // identity probe tells the two processes apart.
    c.node_mut(2).kill();
    let copy = |name: &str| {
        let to = c.dir.path().join(name);
        let ok = std::process::Command::new("cp")
            .arg("-a")
            .arg(&c.node(2).data_dir)
            .arg(&to)
            .status()
            .expect("cp");
        assert!(ok.success());
        to
    };
    let (copy1, copy2) = (copy("dup1"), copy("dup2"));
    c.node_mut(2).spawn();
    eventually(Duration::from_secs(10), "node 2 back", || async {
        c.node(2).healthy().await.then_some(())
    })
    .await;

    // 1. Started while node 2 runs: halts at once.
    let mut first = impostor(&c, "dup1");
    first.data_dir = copy1;
    spawn(&mut first, &c.token_file);
    eventually(Duration::from_secs(10), "the duplicate to halt", || async {
        first.log_text().contains(halted).then_some(())
    })
    .await;
    eventually(Duration::from_secs(5), "node 2 to report it", || async {
        c.node(2).log_text().contains(probed).then_some(())
    })
    .await;
    first.kill();

    // 2. Started while node 2 is down: halts once node 2 is back.
    c.node_mut(2).kill();
    let mut second = impostor(&c, "dup2");
    second.data_dir = copy2;
    spawn(&mut second, &c.token_file);
    let n = &second;
    eventually(Duration::from_secs(10), "the duplicate serving", || async {
        n.healthy().await.then_some(())
    })
    .await;
    assert!(!n.log_text().contains(halted), "{}", n.log_text());
    c.node_mut(2).spawn();
    eventually(
        Duration::from_secs(10),
        "the duplicate to halt after node 2 returned",
        || async { n.log_text().contains(halted).then_some(()) },
    )
    .await;
    // The real cluster is unharmed: node 2 follows a leader and writes work.
    c.any_client()
        .register("http", "after-dup", "10.0.0.9", None, None, None)
        .await
        .expect("write after the duplicate halted");
    let leader = c.leader(Duration::from_secs(10)).await;
    eprintln!("duplicate node id detected both ways; leader {leader}");
}
