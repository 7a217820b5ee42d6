//! Dynamic membership and start-up identity checks.

use std::process::Command;
use std::time::Duration;

use crate::harness::{eventually, free_port, Cluster, TOKEN};

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
    c.add_node(4, addr.clone(), vec!["--join".into()]);
    let n4 = c.node(4);
    eventually(Duration::from_secs(10), "node 4 healthy", || async {
        n4.healthy().await.then_some(())
    })
    .await;

    let server = c.node(1).addr.clone();
    let out = clb(&["cluster", "add", "4", &addr], &server);
    assert!(
        out.status.success(),
        "clb cluster add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let view = c.node(1).view().await.expect("view");
    assert_eq!(view["voters"], serde_json::json!([1, 2, 3, 4]));
    // The new node caught up with the registry.
    eventually(
        Duration::from_secs(10),
        "node 4 has the registry",
        || async {
            let s = n4.services().await?;
            (!s["services"]["http"]["members"]["web1"].is_null()).then_some(())
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
        (v["voters"] == serde_json::json!([1, 2, 3]) && v["nodes"].get("4").is_none()).then_some(())
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
    c.add_node(4, addr.clone(), vec!["--join".into()]);
    let n4 = c.node(4);
    eventually(Duration::from_secs(10), "node 4 healthy", || async {
        n4.healthy().await.then_some(())
    })
    .await;
    c.node(2)
        .client()
        .add_node(4, &addr, true)
        .await
        .expect("add learner through a follower");
    let v = c.node(1).view().await.expect("view");
    assert_eq!(v["voters"], serde_json::json!([1, 2, 3]));
    assert_eq!(v["learners"], serde_json::json!([4]));
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
    let base = |node: &str, peers: &str| -> Vec<String> {
        [
            "--node-id",
            node,
            "--listen",
            &format!("127.0.0.1:{}", free_port()),
            "--data-dir",
            &dir,
            "--token-file",
            &tokens,
            "--peers",
            peers,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let peers = c
        .nodes
        .values()
        .map(|n| format!("{}={}", n.id, n.addr))
        .collect::<Vec<_>>()
        .join(",");
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
        v["leader"].as_u64().map(|_| ())
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
    ] {
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let msg = refused(&args);
        assert!(msg.contains(needle), "{args:?}: {msg}");
    }
}
