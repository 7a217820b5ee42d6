//! Formation from `--peers`, replication through followers, leader kill,
//! restart and catch-up, and acknowledged writes surviving kill/restart.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clb::client::ClientError;
use clb::views::{ErrorDetail, ServicesView};

use crate::harness::{eventually, ClusterExt, NodeExt};
use lab::Cluster;

fn member_names(services: &ServicesView, service: &str) -> BTreeSet<String> {
    services
        .services
        .get(service)
        .map(|s| s.members.keys().cloned().collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_form_and_a_write_to_a_follower_reaches_all() {
    let c = Cluster::start(3).await;
    let leader = c.leader(Duration::from_secs(10)).await;
    let follower = c.followers(leader)[0];
    let v = c.node(leader).view().await.expect("view");
    assert_eq!(v.voters, [1, 2, 3]);

    let index = c
        .node(follower)
        .client()
        .register("http", "web1", "10.0.0.1", Some(8080), Some(10), None)
        .await
        .expect("register through a follower");
    assert!(index > 0);
    for n in c.nodes.values() {
        let m = eventually(Duration::from_secs(5), "member on every node", || async {
            let s = n.services().await?;
            s.services.get("http")?.members.get("web1").cloned()
        })
        .await;
        assert_eq!(m.address, "10.0.0.1");
        assert_eq!(m.port, 8080);
        assert_eq!(m.weight, 10);
    }
    // The follower counted the write it forwarded.
    let m = reqwest::get(format!("http://{}/metrics", c.node(follower).addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("clb_forwarded_requests_total 1"), "{m}");
    // A consistent read through a follower sees the write too.
    let s = c
        .node(follower)
        .client()
        .service("http", true)
        .await
        .expect("consistent read");
    assert!(s.index >= index);
    assert_eq!(
        s.definition.members.get("web1").map(|m| m.address.as_str()),
        Some("10.0.0.1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_elects_a_new_one_and_the_old_one_catches_up() {
    let mut c = Cluster::start(3).await;
    let leader = c.leader(Duration::from_secs(10)).await;
    c.any_client()
        .register("http", "before", "10.0.0.1", None, None, None)
        .await
        .expect("register");

    c.node_mut(leader).kill();
    let killed_at = Instant::now();
    // Writes through either survivor succeed within 2 s of the kill.
    for id in c.followers(leader) {
        let client = c.node(id).client();
        let name = format!("after-via-{id}");
        eventually(
            Duration::from_secs(2),
            "a write through a survivor",
            || async {
                client
                    .register("http", &name, "10.0.0.2", None, None, None)
                    .await
                    .ok()
            },
        )
        .await;
        assert!(
            killed_at.elapsed() < Duration::from_secs(2),
            "write through node {id} took {:?} after the kill",
            killed_at.elapsed()
        );
    }
    let new_leader = c.leader(Duration::from_secs(5)).await;
    assert_ne!(new_leader, leader);

    // The killed node restarts from its data dir, without re-initializing, and catches up.
    c.node_mut(leader).spawn();
    let want: BTreeSet<String> = ["before", "after-via-1", "after-via-2", "after-via-3"]
        .iter()
        .map(|s| s.to_string())
        .filter(|s| s != &format!("after-via-{leader}"))
        .collect();
    let restarted = c.node(leader);
    eventually(
        Duration::from_secs(10),
        "restarted node catches up",
        || async {
            let s = restarted.services().await?;
            (member_names(&s, "http") == want).then_some(())
        },
    )
    .await;
    assert!(
        !restarted.log_text().contains("initialized a new cluster")
            || restarted
                .log_text()
                .matches("initialized a new cluster")
                .count()
                <= 1,
        "a restart must not initialize again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_acknowledged_registrations_survive_a_kill_and_restart() {
    let mut c = Cluster::start(3).await;
    c.leader(Duration::from_secs(10)).await;
    let acked = Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let servers: Vec<String> = c.nodes.values().map(|n| n.addr.clone()).collect();

    // 8 writers, 125 registrations each, spread over all nodes (try in turn).
    let mut writers = Vec::new();
    for w in 0..8usize {
        let mut order = servers.clone();
        let n = order.len();
        order.rotate_left(w % n);
        let client = clb::client::Client::new(&order.join(","), Some(crate::harness::TOKEN.into()))
            .expect("client");
        let acked = acked.clone();
        writers.push(tokio::spawn(async move {
            for i in 0..125usize {
                let name = format!("m-{w}-{i}");
                // Bounded retries: a write refused during the election is retried.
                for _ in 0..20 {
                    if client
                        .register("http", &name, "10.1.0.1", Some(80), None, None)
                        .await
                        .is_ok()
                    {
                        acked.lock().unwrap().insert(name.clone());
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }));
    }
    // Kill the leader while the writers run, then restart it.
    eventually(
        Duration::from_secs(30),
        "some writes acknowledged",
        || async { (acked.lock().unwrap().len() >= 200).then_some(()) },
    )
    .await;
    let leader = c.leader(Duration::from_secs(5)).await;
    c.node_mut(leader).kill();
    eventually(Duration::from_secs(30), "writes after the kill", || async {
        (acked.lock().unwrap().len() >= 500).then_some(())
    })
    .await;
    c.node_mut(leader).spawn();
    for w in writers {
        w.await.expect("writer");
    }
    let acked = acked.lock().unwrap().clone();
    assert_eq!(
        acked.len(),
        1000,
        "every registration was eventually acknowledged"
    );

    for n in c.nodes.values() {
        eventually(
            Duration::from_secs(20),
            &format!("node {} has every acknowledged member", n.id),
            || async {
                let s = n.services().await?;
                let names = member_names(&s, "http");
                acked.is_subset(&names).then_some(())
            },
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_quorum_a_write_answers_503_naming_the_situation() {
    let mut c = Cluster::start_with(3, &["--forward-timeout-ms", "1000"]).await;
    let leader = c.leader(Duration::from_secs(10)).await;
    let followers = c.followers(leader);
    // Leave one follower alone: no leader can be elected.
    c.node_mut(leader).kill();
    c.node_mut(followers[1]).kill();
    let lonely = c.node(followers[0]);
    let started = Instant::now();
    let err = lonely
        .client()
        .register("http", "x", "10.0.0.1", None, None, None)
        .await
        .unwrap_err();
    let waited = started.elapsed();
    match &err {
        ClientError::Api {
            status,
            message,
            detail,
        } => {
            assert_eq!(*status, 503, "{err}");
            assert!(message.contains("gave up after"), "{message}");
            assert!(
                matches!(
                    detail,
                    Some(ErrorDetail::Situation {
                        retryable: true,
                        ..
                    })
                ),
                "{detail:?}"
            );
        }
        other => panic!("expected a 503, got {other}"),
    }
    assert!(
        waited >= Duration::from_millis(900),
        "retried for the forward timeout, not {waited:?}"
    );
    // Local reads still answer, with the node's applied index (`index` is
    // not optional: an answer without it does not parse).
    lonely.services().await.expect("local read");
}
