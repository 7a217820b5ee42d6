//! No unauthenticated peer RPC in any configuration a user can start with:
//! forged RPCs against the embedded default (a lone node) and a three-node
//! cluster are refused from their headers, change nothing, and say nothing;
//! an authenticated peer's invalid command is refused by the leader.
//! (The TLS cluster's case is in tests/tls.rs.)

#[path = "common/forge.rs"]
mod forge;
#[path = "cluster/harness.rs"]
mod harness;

use std::time::Duration;

use clb::auth::Scope;
use clb::consensus::{LeaderError, LeaderReply, LeaderRequest};
use clb::model::{Command, Proposal};
use harness::{eventually, ClusterExt, NodeExt, SECRET};
use lab::{free_port, Cluster, FAST_TIMERS};

/// What an attack must not change on a node.
#[derive(Debug, PartialEq)]
struct Footprint {
    term: u64,
    last_log_index: u64,
    tokens: usize,
}

async fn footprint(node: &lab::Node) -> Footprint {
    let v = node.view().await.expect("view");
    let tokens = node.client().tokens().await.expect("tokens");
    Footprint {
        term: v.term,
        last_log_index: v.last_log_index.expect("last_log_index"),
        tokens: tokens.tokens.len(),
    }
}

/// Forges every RPC against every node, then checks nothing moved: no term
/// change, nothing appended, no token, no evil line in any haproxy.cfg, and
/// the attacker's token opens nothing.
async fn attack_and_check(c: &Cluster, wrong: &[&str]) {
    let http = reqwest::Client::new();
    let mut before = Vec::new();
    for n in c.nodes.values() {
        before.push(footprint(n).await);
    }
    for n in c.nodes.values() {
        let cluster_id = n.view().await.unwrap().cluster_id;
        forge::assert_all_refused(
            &http,
            &format!("http://{}", n.peer_addr),
            &cluster_id,
            wrong,
        )
        .await;
        // The client listener serves no peer RPC at all.
        let r = http
            .post(format!("http://{}/raft/leader", n.addr))
            .body(vec![0u8; 8])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 404);
    }
    let mut after = Vec::new();
    for n in c.nodes.values() {
        after.push(footprint(n).await);
    }
    assert_eq!(before, after, "a forged RPC changed a node");
    for n in c.nodes.values() {
        let cfg = c.dir.path().join(format!("haproxy{}.cfg", n.id));
        let text = std::fs::read_to_string(&cfg).unwrap_or_default();
        assert!(!text.contains(forge::EVIL), "{}: {text}", cfg.display());
        let r = reqwest::Client::new()
            .get(format!("http://{}/v1/services", n.addr))
            .bearer_auth(forge::EVIL_TOKEN)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_default_refuses_every_unauthenticated_peer_rpc() {
    // A lone node started as the README starts it: no secret given, so it
    // makes one in its data dir.
    let mut c = Cluster::empty();
    let addr = format!("127.0.0.1:{}", free_port());
    let peer = lab::peer_addr_for(&addr);
    c.add_node_at(1, addr, peer, &FAST_TIMERS, vec![]);
    c.leader(Duration::from_secs(20)).await;
    c.any_client()
        .register("http", "m1", "10.0.0.1", None, None, None)
        .await
        .expect("register");
    let made = std::fs::read_to_string(c.node(1).data_dir.join("cluster-secret")).unwrap();
    assert_eq!(made.trim().len(), 64);
    attack_and_check(&c, &["wrong-secret-but-long-enough", SECRET]).await;
    // The refusals are logged, a line per burst rather than per request.
    let log = c.node(1).log_text();
    let lines = log
        .lines()
        .filter(|l| l.contains("refused a peer request"))
        .count();
    assert!((1..=3).contains(&lines), "{lines} refusal lines");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_refuses_forged_rpcs_and_its_leader_refuses_invalid_commands() {
    let c = Cluster::start(3).await;
    let leader = c.leader(Duration::from_secs(10)).await;
    let index = c
        .any_client()
        .register("http", "m1", "10.0.0.1", None, None, None)
        .await
        .expect("register");
    c.converged(index, Duration::from_secs(10)).await;
    attack_and_check(&c, &["wrong-secret-but-long-enough"]).await;

    // With the right secret (a peer, or a bug in one), the leader still
    // validates what it appends: invalid values, a scope that does not
    // allow the command, and a batch only the leader may build.
    let l = c.node(leader);
    let cluster_id = l.view().await.unwrap().cluster_id;
    let before = footprint(l).await;
    let proposal = |cmd| Proposal {
        cmd,
        by: "peer".into(),
        at_ms: 0,
        force: false,
    };
    let web: Scope = "register:web".parse().unwrap();
    let cases = [
        (forge::injected_member(), Scope::Admin, "invalid command"),
        (forge::evil_token(), web, "does not allow"),
        (
            Command::Batch(vec![proposal(forge::evil_token())]),
            Scope::Admin,
            "does not allow",
        ),
    ];
    let peers = clb::consensus::network::PeerClient::new(cluster_id)
        .with_secret(Some(SECRET.to_string()))
        .with_identity(std::sync::Arc::new(
            clb::consensus::incarnation::Incarnations::ephemeral(99, 1),
        ));
    for (cmd, scope, want) in cases {
        let req = LeaderRequest::Write {
            proposal: proposal(cmd.clone()),
            scope,
        };
        let answer: Result<LeaderReply, LeaderError> = peers
            .call(&l.peer_addr, "/raft/leader", &req, Duration::from_secs(5))
            .await
            .expect("the leader answers an authenticated peer");
        match answer {
            Err(LeaderError::Rejected(why)) => assert!(why.contains(want), "{cmd:?}: {why}"),
            other => panic!("{cmd:?} was not refused: {other:?}"),
        }
    }
    assert_eq!(before, footprint(l).await, "a refused command was appended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insecure_peers_is_a_choice_that_is_said_at_every_start() {
    let c = Cluster::start_with(1, &["--insecure-peers"]).await;
    c.leader(Duration::from_secs(10)).await;
    let n = c.node(1);
    eventually(Duration::from_secs(5), "the warning", || async {
        n.log_text()
            .contains("--insecure-peers: peer RPCs are not authenticated")
            .then_some(())
    })
    .await;
    assert!(n.log_text().contains("WARN"));
    // A secret file too short to be a secret is refused at start-up.
    let short = c.dir.path().join("short-secret");
    std::fs::write(&short, "short\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_clbd"))
        .args(["--cluster-secret-file", short.to_str().unwrap()])
        .args(["--data-dir", c.dir.path().join("x").to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.starts_with("clbd: --cluster-secret-file:"), "{err}");
}
