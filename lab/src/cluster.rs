//! Real `clbd` processes: a temp dir with a token and a cluster secret,
//! nodes on reserved ports with sled data dirs of their own, spawned,
//! killed and restarted by pid. Children are killed in `Drop`; when a test
//! fails, the tail of every node's log is printed.
//!
//! What a node *says* (its status JSON) is read by the caller, through
//! clb's client (for tests: the extension traits in
//! `tests/cluster/harness.rs`); this module only starts, stops and waits
//! for `/healthz`.

use std::collections::BTreeMap;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::ports::free_port;
use crate::proc::Proc;
use crate::wait::eventually;

/// Fast timers so failover tests finish quickly; still far above loopback RTT.
pub const FAST_TIMERS: [&str; 6] = [
    "--heartbeat-ms",
    "50",
    "--election-timeout-min-ms",
    "300",
    "--election-timeout-max-ms",
    "600",
];

/// One `clbd`: where it listens, its files, and the process while it runs.
#[derive(Debug)]
pub struct Node {
    pub id: u64,
    /// The client API.
    pub addr: String,
    /// The peer listener (what `--peers` and the membership name).
    pub peer_addr: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    /// Every argument `clbd` is started with.
    pub args: Vec<String>,
    /// The binary and its environment.
    pub clbd: PathBuf,
    pub env: Vec<(String, String)>,
    /// See [`Cluster::own_group`].
    pub own_group: bool,
    pub child: Option<Proc>,
}

impl Node {
    pub fn pid(&self) -> Option<i32> {
        self.child.as_ref().map(Proc::pid)
    }

    /// Starts `clbd` with [`Node::args`], its output appended to the log
    /// (a restart keeps the earlier runs' lines). In the calling thread's
    /// network namespace. Panics if it cannot: for tests.
    pub fn spawn(&mut self) {
        self.start()
            .unwrap_or_else(|e| panic!("node {}: {e}", self.id));
    }

    /// [`Node::spawn`], returning the error.
    pub fn start(&mut self) -> io::Result<()> {
        assert!(self.child.is_none(), "node {} already running", self.id);
        let mut cmd = Command::new(&self.clbd);
        cmd.args(&self.args).envs(self.env.iter().cloned());
        let mut how = Proc::build(&mut cmd).log(&self.log);
        if self.own_group {
            how = how.group().die_with_parent();
        }
        self.child = Some(how.spawn()?);
        Ok(())
    }

    /// Sends `sig` to our own child by pid.
    pub fn signal(&self, sig: i32) {
        if let Some(c) = &self.child {
            c.signal(sig);
        }
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        self.child = None;
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("running");
        c.signal(libc::SIGTERM);
        c.wait().expect("wait")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /healthz` answered 2xx.
    pub async fn healthy(&self) -> bool {
        let url = format!("http://{}/healthz", self.addr);
        matches!(reqwest::get(url).await, Ok(r) if r.status().is_success())
    }
}

/// A peer address beside the API address `addr`: a reserved port on
/// loopback; in a namespace the caller made (its own address), the next
/// port.
pub fn peer_addr_for(addr: &str) -> String {
    let (host, port) = addr.rsplit_once(':').expect("HOST:PORT");
    if host == "127.0.0.1" {
        format!("{host}:{}", free_port())
    } else {
        let port: u16 = port.parse().expect("port");
        format!("{host}:{}", port + 1)
    }
}

/// Nodes sharing a temp dir, a token file and a cluster secret.
#[derive(Debug)]
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub nodes: BTreeMap<u64, Node>,
    pub token_file: PathBuf,
    /// The cluster secret every node is given.
    pub secret_file: PathBuf,
    /// The `clbd` binary every node runs, and its environment.
    pub clbd: PathBuf,
    pub env: Vec<(String, String)>,
    /// Each node in a process group of its own, killed with its hooks, and
    /// by the kernel if this process dies first (`clb demo`). Tests leave
    /// it off: a kill there is of clbd alone, as a crash would be.
    pub own_group: bool,
    /// Lines of each node's log printed when a test fails in its drop
    /// (`CLB_TEST_LOG_LINES` overrides).
    pub log_lines_on_panic: usize,
}

impl Cluster {
    /// No nodes yet: a temp dir (named `prefix…`) holding `token` and
    /// `secret` files, and the `clbd` to run with `env`.
    pub fn new(
        clbd: impl Into<PathBuf>,
        prefix: &str,
        token: &str,
        secret: &str,
        env: &[(&str, &str)],
    ) -> io::Result<Cluster> {
        let dir = tempfile::Builder::new().prefix(prefix).tempdir()?;
        let token_file = dir.path().join("tokens");
        std::fs::write(&token_file, format!("{token}\n"))?;
        let secret_file = dir.path().join("cluster-secret");
        std::fs::write(&secret_file, format!("{secret}\n"))?;
        Ok(Cluster {
            dir,
            nodes: BTreeMap::new(),
            token_file,
            secret_file,
            clbd: clbd.into(),
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            own_group: false,
            log_lines_on_panic: 40,
        })
    }

    /// Defines and spawns `n` nodes (ids 1..=n) on reserved loopback ports,
    /// all named in `--peers`, with `timers` and per-node `args`; does not
    /// wait for them (see [`Cluster::healthy`]).
    pub fn spawn_peers(
        &mut self,
        n: u64,
        timers: &[&str],
        args: impl Fn(u64) -> Vec<String>,
    ) -> io::Result<()> {
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
        for (id, (addr, peer)) in addrs {
            let mut all = vec!["--peers".to_string(), peers.clone()];
            all.extend(args(id));
            self.define_node(id, addr, peer, timers, all).start()?;
        }
        Ok(())
    }

    /// Waits until every node answers `/healthz`; the error names the
    /// first that did not, with the tail of its log.
    pub async fn healthy(&self, within: Duration) -> Result<(), String> {
        for node in self.nodes.values() {
            let what = format!("node {} healthy", node.id);
            eventually(within, &what, || async {
                node.healthy().await.then_some(())
            })
            .await
            .map_err(|e| format!("{e}; log tail:\n{}", tail(&node.log_text(), 10)))?;
        }
        Ok(())
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
        let node = self.define_node(id, addr, peer_addr, timers, args);
        node.spawn();
        node
    }

    /// [`Cluster::add_node_at`] without the spawn.
    pub fn define_node(
        &mut self,
        id: u64,
        addr: String,
        peer_addr: String,
        timers: &[&str],
        args: Vec<String>,
    ) -> &mut Node {
        // A `--data-dir` in `args` (a mount the caller made) replaces the default.
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
        // cluster shares this one unless the caller chose otherwise.
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
        let node = Node {
            id,
            addr,
            peer_addr,
            data_dir,
            log,
            args: all,
            clbd: self.clbd.clone(),
            env: self.env.clone(),
            own_group: self.own_group,
            child: None,
        };
        self.nodes.insert(id, node);
        self.nodes.get_mut(&id).expect("just inserted")
    }

    /// Like [`Cluster::add_node_at`], the peer address chosen by
    /// [`peer_addr_for`].
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

    /// Like [`Cluster::add_node_with_timers`] with [`FAST_TIMERS`].
    pub fn add_node(&mut self, id: u64, addr: String, args: Vec<String>) -> &mut Node {
        self.add_node_with_timers(id, addr, &FAST_TIMERS, args)
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

    /// The running nodes other than `leader`, in id order.
    pub fn followers(&self, leader: u64) -> Vec<u64> {
        self.nodes
            .keys()
            .copied()
            .filter(|&id| id != leader && self.nodes[&id].child.is_some())
            .collect()
    }

    /// Every node's API address, comma-separated (a client's "try in turn").
    pub fn servers(&self) -> String {
        let all: Vec<&str> = self.nodes.values().map(|n| n.addr.as_str()).collect();
        all.join(",")
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let lines = std::env::var("CLB_TEST_LOG_LINES")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(self.log_lines_on_panic);
            for n in self.nodes.values() {
                eprintln!("---- node {} log (last {lines} lines) ----", n.id);
                eprintln!("{}", tail(&n.log_text(), lines));
            }
        }
        for n in self.nodes.values_mut() {
            n.kill();
        }
    }
}

/// The leader every one of `nodes` names, with the highest term they
/// report, if they all name the same one and it is among them. `report`
/// gives a node's `(leader, term)`; a node that does not answer, one that
/// knows no leader, or a disagreement (an election under way) is `None`:
/// poll again.
pub async fn agreed_leader<F, Fut>(nodes: &[u64], mut report: F) -> Option<(u64, u64)>
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = Option<(Option<u64>, u64)>>,
{
    let mut seen: Option<(u64, u64)> = None;
    for &id in nodes {
        let (leader, term) = report(id).await?;
        let leader = leader?;
        seen = match seen {
            Some((l, _)) if l != leader => return None,
            Some((_, t)) => Some((leader, t.max(term))),
            None => Some((leader, term)),
        };
    }
    seen.filter(|(l, _)| nodes.contains(l))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A node's (leader, term), or no answer.
    type Report = Option<(Option<u64>, u64)>;

    fn block<T>(f: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn a_leader_counts_only_when_every_node_names_it() {
        let views = |v: Vec<(u64, Report)>| {
            move |id: u64| {
                let r = v.iter().find(|(n, _)| *n == id).and_then(|(_, r)| *r);
                async move { r }
            }
        };
        let all = [1, 2, 3];
        let agree = views(vec![
            (1, Some((Some(2), 4))),
            (2, Some((Some(2), 5))),
            (3, Some((Some(2), 5))),
        ]);
        assert_eq!(block(agreed_leader(&all, agree)), Some((2, 5)));
        let split = views(vec![
            (1, Some((Some(2), 4))),
            (2, Some((Some(3), 5))),
            (3, Some((Some(3), 5))),
        ]);
        assert_eq!(block(agreed_leader(&all, split)), None);
        let silent = views(vec![
            (1, Some((Some(2), 4))),
            (2, None),
            (3, Some((Some(2), 4))),
        ]);
        assert_eq!(block(agreed_leader(&all, silent)), None);
        let unknown = views(vec![
            (1, Some((None, 4))),
            (2, Some((Some(2), 4))),
            (3, Some((Some(2), 4))),
        ]);
        assert_eq!(block(agreed_leader(&all, unknown)), None);
        // A leader that is not among the nodes asked (killed, say) is no answer.
        let gone = views(vec![(1, Some((Some(3), 4))), (2, Some((Some(3), 4)))]);
        assert_eq!(block(agreed_leader(&[1, 2], gone)), None);
    }
}
