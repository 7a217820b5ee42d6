//! Real `clbd` processes on loopback: start, wait, kill by pid, restart.
//! Children are killed in `Drop`; on a failing test their logs are printed.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clb::client::{Client, ClientOptions};
use clb::views::{ClusterView, ServicesView};

pub const TOKEN: &str = "test-admin-token";

/// Fast timers so failover tests finish quickly; still far above loopback RTT.
pub const FAST_TIMERS: [&str; 6] = [
    "--heartbeat-ms",
    "50",
    "--election-timeout-min-ms",
    "300",
    "--election-timeout-max-ms",
    "600",
];

/// A port that was free a moment ago and never handed out before in this
/// process (two calls in a row must not give the same port to an API and a
/// peer listener). Taken below the kernel's ephemeral range (32768–60999 by
/// default), not from a bind to port 0: a node restarted on its port would
/// otherwise find it taken by another test's outgoing connection, which
/// the kernel gives ports from that range (seen: "Address already in use"
/// when test_wiped restarted a killed node).
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    // Start where the process id points, so test binaries run one after
    // another do not walk the same ports.
    let start = std::process::id().wrapping_mul(2_654_435_761) % SPAN;
    for i in 0..SPAN {
        let port = (LOW + (start + i * 7) % SPAN) as u16;
        if given.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    panic!("no free port in {LOW}..{}", LOW + SPAN);
}

/// Polls `f` until it returns `Some`, or panics with `what` at the deadline.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A client with the test token. Plain HTTP is allowed beyond loopback: a
/// node outside loopback lives in a namespace the test made.
fn test_client(servers: &str) -> Client {
    let options = ClientOptions {
        insecure: true,
        ..Default::default()
    };
    Client::with_options(servers, Some(TOKEN.into()), options).expect("client")
}

pub struct Node {
    pub id: u64,
    /// The client API.
    pub addr: String,
    /// The peer listener (what `--peers` and the membership name).
    pub peer_addr: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    pub args: Vec<String>,
    pub child: Option<Child>,
}

impl Node {
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(|c| c.id() as i32)
    }

    pub fn client(&self) -> Client {
        test_client(&self.addr)
    }

    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "node {} already running", self.id);
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let child = Command::new(env!("CARGO_BIN_EXE_clbd"))
            .args(&self.args)
            .env("RUST_LOG", clb::DEFAULT_LOG)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("spawn clbd");
        self.child = Some(child);
    }

    /// Sends `sig` to our own child by pid.
    pub fn signal(&self, sig: i32) {
        if let Some(pid) = self.pid() {
            // SAFETY: plain kill(2) on a pid we spawned and have not reaped.
            unsafe { libc::kill(pid, sig) };
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            // SIGCONT first: a stopped process cannot die until it runs.
            let _ = unsafe { libc::kill(c.id() as i32, libc::SIGCONT) };
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        c.wait().expect("wait")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub async fn healthy(&self) -> bool {
        let url = format!("http://{}/healthz", self.addr);
        matches!(reqwest::get(url).await, Ok(r) if r.status().is_success())
    }

    pub async fn view(&self) -> Option<ClusterView> {
        self.client().cluster().await.ok()
    }

    /// Local (not linearizable) registry of this node.
    pub async fn services(&self) -> Option<ServicesView> {
        self.client().services(false).await.ok()
    }
}

pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: BTreeMap<u64, Node>,
    pub token_file: PathBuf,
    /// The cluster secret every node is given.
    pub secret_file: PathBuf,
}

/// The secret in every test cluster's `--cluster-secret-file`.
pub const SECRET: &str = "test-cluster-secret-0123456789abcdef";

/// A peer address beside the API address `addr`: a free port on loopback;
/// in a namespace the test made (its own address), the next port.
pub fn peer_addr_for(addr: &str) -> String {
    let (host, port) = addr.rsplit_once(':').expect("HOST:PORT");
    if host == "127.0.0.1" {
        format!("{host}:{}", free_port())
    } else {
        let port: u16 = port.parse().expect("port");
        format!("{host}:{}", port + 1)
    }
}

impl Cluster {
    /// `n` nodes from `--peers`, started and healthy.
    pub async fn start(n: u64) -> Cluster {
        Self::start_with(n, &[]).await
    }

    pub async fn start_with(n: u64, extra: &[&str]) -> Cluster {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        Self::start_custom(n, &FAST_TIMERS, |_| extra.clone()).await
    }

    /// Defines and spawns a node; `args` come after the common ones.
    pub fn add_node(&mut self, id: u64, addr: String, args: Vec<String>) -> &mut Node {
        self.add_node_with_timers(id, addr, &FAST_TIMERS, args)
    }

    /// The paths of a fresh cluster's temp dir, token and secret files.
    fn files() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().expect("tempdir");
        let token_file = dir.path().join("tokens");
        std::fs::write(&token_file, format!("{TOKEN}\n")).expect("token file");
        let secret_file = dir.path().join("cluster-secret");
        std::fs::write(&secret_file, format!("{SECRET}\n")).expect("secret file");
        (dir, token_file, secret_file)
    }

    /// `n` nodes from `--peers` with `timers` instead of [`FAST_TIMERS`] and
    /// per-node extra arguments; started and healthy.
    pub async fn start_custom(
        n: u64,
        timers: &[&str],
        args: impl Fn(u64) -> Vec<String>,
    ) -> Cluster {
        let (dir, token_file, secret_file) = Self::files();
        let addrs: BTreeMap<u64, (String, String)> = (1..=n)
            .map(|id| {
                let api = format!("127.0.0.1:{}", free_port());
                let peer = peer_addr_for(&api);
                (id, (api, peer))
            })
            .collect();
        let peers = addrs
            .iter()
            .map(|(id, (_, peer))| format!("{id}={peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = Cluster {
            dir,
            nodes: BTreeMap::new(),
            token_file,
            secret_file,
        };
        for (id, (addr, peer)) in addrs {
            let mut all = vec!["--peers".to_string(), peers.clone()];
            all.extend(args(id));
            cluster.add_node_at(id, addr, peer, timers, all);
        }
        for node in cluster.nodes.values() {
            let _ = eventually(Duration::from_secs(20), "node healthy", || async {
                node.healthy().await.then_some(())
            })
            .await;
        }
        cluster
    }

    /// Like [`Cluster::add_node`], with `timers` instead of [`FAST_TIMERS`].
    pub fn add_node_with_timers(
        &mut self,
        id: u64,
        addr: String,
        timers: &[&str],
        args: Vec<String>,
    ) -> &mut Node {
        let peer = peer_addr_for(&addr);
        self.add_node_at(id, addr, peer, timers, args)
    }

    /// Defines and spawns a node with its API at `addr` and its peer
    /// listener at `peer_addr`, given the cluster secret unless `args`
    /// choose otherwise (`--cluster-secret-file`, `--insecure-peers`).
    pub fn add_node_at(
        &mut self,
        id: u64,
        addr: String,
        peer_addr: String,
        timers: &[&str],
        args: Vec<String>,
    ) -> &mut Node {
        // A `--data-dir` in `args` (a mount the test made) replaces the default.
        let given = args
            .iter()
            .position(|a| a == "--data-dir")
            .and_then(|i| args.get(i + 1));
        let data_dir = match given {
            Some(d) => PathBuf::from(d),
            None => self.dir.path().join(format!("node{id}")),
        };
        let log = self.dir.path().join(format!("node{id}.log"));
        let mut all = vec![
            "--node-id".to_string(),
            id.to_string(),
            "--listen".into(),
            addr.clone(),
            "--peer-listen".into(),
            peer_addr.clone(),
        ];
        if given.is_none() {
            all.extend(["--data-dir".into(), data_dir.display().to_string()]);
        }
        // A lone node makes its own secret (the default under test); a
        // cluster shares the harness's unless the test chose otherwise.
        let shared = args.iter().any(|a| a == "--peers" || a == "--join");
        let own_auth = args
            .iter()
            .any(|a| a == "--cluster-secret-file" || a.starts_with("--insecure-peers"));
        if shared && !own_auth {
            all.extend([
                "--cluster-secret-file".into(),
                self.secret_file.display().to_string(),
            ]);
        }
        all.extend([
            "--token-file".into(),
            self.token_file.display().to_string(),
            "-o".into(),
            self.dir
                .path()
                .join(format!("haproxy{id}.cfg"))
                .display()
                .to_string(),
        ]);
        all.extend(timers.iter().map(|s| s.to_string()));
        all.extend(args);
        let mut node = Node {
            id,
            addr,
            peer_addr,
            data_dir,
            log,
            args: all,
            child: None,
        };
        node.spawn();
        self.nodes.insert(id, node);
        self.nodes.get_mut(&id).expect("just inserted")
    }

    /// A temp dir and token file, no nodes yet: for tests that add nodes
    /// with their own arguments and readiness check (e.g. over HTTPS).
    pub fn empty() -> Cluster {
        let (dir, token_file, secret_file) = Self::files();
        Cluster {
            dir,
            nodes: BTreeMap::new(),
            token_file,
            secret_file,
        }
    }

    /// `--peers` for the nodes defined so far.
    pub fn peers_arg(&self) -> String {
        self.nodes
            .values()
            .map(|n| format!("{}={}", n.id, n.peer_addr))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn node(&self, id: u64) -> &Node {
        &self.nodes[&id]
    }

    pub fn node_mut(&mut self, id: u64) -> &mut Node {
        self.nodes.get_mut(&id).expect("node")
    }

    /// Every node's client, in id order (for "try in turn").
    pub fn any_client(&self) -> Client {
        let servers: Vec<&str> = self.nodes.values().map(|n| n.addr.as_str()).collect();
        test_client(&servers.join(","))
    }

    /// The leader all running nodes agree on.
    pub async fn leader(&self, within: Duration) -> u64 {
        eventually(within, "a leader all running nodes agree on", || async {
            let mut seen = None;
            for n in self.nodes.values().filter(|n| n.child.is_some()) {
                let v = n.view().await?;
                let l = v.leader?;
                if seen.is_some_and(|s| s != l) {
                    return None;
                }
                seen = Some(l);
            }
            seen.filter(|l| self.nodes.get(l).is_some_and(|n| n.child.is_some()))
        })
        .await
    }

    pub fn followers(&self, leader: u64) -> Vec<u64> {
        self.nodes
            .keys()
            .copied()
            .filter(|&id| id != leader && self.nodes[&id].child.is_some())
            .collect()
    }

    /// Waits until every running node has applied at least `index`.
    pub async fn converged(&self, index: u64, within: Duration) {
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

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // CLB_TEST_LOG_LINES=N shows more of each node's log.
            let lines = std::env::var("CLB_TEST_LOG_LINES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(40);
            for n in self.nodes.values() {
                let text = n.log_text();
                let tail: Vec<&str> = text.lines().rev().take(lines).collect();
                eprintln!("---- node {} log (last {lines} lines) ----", n.id);
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        for n in self.nodes.values_mut() {
            n.kill();
        }
    }
}

pub fn path_str(p: &Path) -> String {
    p.display().to_string()
}

/// One line of the test VIP hook's log: `time_ns node action term`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookEvent {
    pub at_ns: u128,
    pub node: u64,
    pub action: String,
    pub term: u64,
}

/// Writes an exec VIP hook that only appends `time_ns node action term` to a
/// log (it touches no interface); returns (script, log).
pub fn vip_hook(dir: &Path) -> (PathBuf, PathBuf) {
    let log = dir.join("vip-events.log");
    let script = dir.join("vip-hook.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n# claim|release VIP NODE TERM\necho \"$(date +%s%N) $3 $1 $4\" >> {}\n",
            log.display()
        ),
    )
    .expect("write hook");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod hook");
    (script, log)
}

/// The events in a [`vip_hook`] log, in the order written.
pub fn hook_events(log: &Path) -> Vec<HookEvent> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some(HookEvent {
                at_ns: f.next()?.parse().ok()?,
                node: f.next()?.parse().ok()?,
                action: f.next()?.to_string(),
                term: f.next()?.parse().ok()?,
            })
        })
        .collect()
}
