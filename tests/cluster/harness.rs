//! The test side of the lab (`lab/`): clusters of the `clbd` built for this
//! test run with the test token and secret, and what nodes report read
//! through clb's own client. Processes, ports, waits and hooks are the lab's.

// Each test binary that includes this file uses only part of it.
#![allow(dead_code)]

use std::time::Duration;

use clb::client::{Client, ClientOptions};
use clb::views::{ClusterView, ServicesView};
use lab::{Cluster, Node, FAST_TIMERS};

pub const TOKEN: &str = "test-admin-token";

/// The secret in every test cluster's `--cluster-secret-file`.
pub const SECRET: &str = "test-cluster-secret-0123456789abcdef";

/// [`lab::eventually`] that fails the test at the deadline.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    lab::eventually(within, what, f)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
}

/// A client with the test token. Plain HTTP is allowed beyond loopback: a
/// node outside loopback lives in a namespace the test made.
pub fn test_client(servers: &str) -> Client {
    let options = ClientOptions {
        insecure: true,
        ..Default::default()
    };
    Client::with_options(servers, Some(TOKEN.into()), options).expect("client")
}

/// A node's client and views.
pub trait NodeExt {
    fn client(&self) -> Client;
    /// `GET /v1/cluster` from this node.
    async fn view(&self) -> Option<ClusterView>;
    /// Local (not linearizable) registry of this node.
    async fn services(&self) -> Option<ServicesView>;
}

impl NodeExt for Node {
    fn client(&self) -> Client {
        test_client(&self.addr)
    }

    async fn view(&self) -> Option<ClusterView> {
        self.client().cluster().await.ok()
    }

    async fn services(&self) -> Option<ServicesView> {
        self.client().services(false).await.ok()
    }
}

/// Test clusters: started with this run's `clbd`, read through clients.
pub trait ClusterExt: Sized {
    /// A temp dir and token file, no nodes yet: for tests that add nodes
    /// with their own arguments and readiness check (e.g. over HTTPS).
    fn empty() -> Self;
    /// `n` nodes from `--peers`, started and healthy.
    async fn start(n: u64) -> Self;
    async fn start_with(n: u64, extra: &[&str]) -> Self;
    /// `n` nodes from `--peers` with `timers` instead of [`FAST_TIMERS`] and
    /// per-node extra arguments; started and healthy.
    async fn start_custom(n: u64, timers: &[&str], args: impl Fn(u64) -> Vec<String>) -> Self;
    /// Every node's client, in id order (for "try in turn").
    fn any_client(&self) -> Client;
    /// The leader all running nodes agree on.
    async fn leader(&self, within: Duration) -> u64;
    /// Waits until every running node has applied at least `index`.
    async fn converged(&self, index: u64, within: Duration);
}

impl ClusterExt for Cluster {
    fn empty() -> Cluster {
        Cluster::new(
            env!("CARGO_BIN_EXE_clbd"),
            ".tmp",
            TOKEN,
            SECRET,
            &[("RUST_LOG", clb::DEFAULT_LOG)],
        )
        .expect("cluster temp dir")
    }

    async fn start(n: u64) -> Cluster {
        Self::start_with(n, &[]).await
    }

    async fn start_with(n: u64, extra: &[&str]) -> Cluster {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Self::start_custom(n, &FAST_TIMERS, |_| extra.clone()).await
    }

    async fn start_custom(n: u64, timers: &[&str], args: impl Fn(u64) -> Vec<String>) -> Cluster {
        let mut c = Self::empty();
        c.spawn_peers(n, timers, args).expect("spawn clbd");
        c.healthy(Duration::from_secs(20))
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        c
    }

    fn any_client(&self) -> Client {
        test_client(&self.servers())
    }

    async fn leader(&self, within: Duration) -> u64 {
        let running: Vec<u64> = self
            .nodes
            .values()
            .filter(|n| n.child.is_some())
            .map(|n| n.id)
            .collect();
        let (leader, _) = eventually(within, "a leader all running nodes agree on", || {
            lab::agreed_leader(&running, |id| async move {
                let v = self.nodes[&id].view().await?;
                Some((v.leader, v.term))
            })
        })
        .await;
        leader
    }

    async fn converged(&self, index: u64, within: Duration) {
        for n in self.nodes.values().filter(|n| n.child.is_some()) {
            eventually(
                within,
                &format!("node {} to apply {index}", n.id),
                || async {
                    let v = n.view().await?;
                    (v.applied_index >= index).then_some(())
                },
            )
            .await;
        }
    }
}
