//! Benchmarks against real processes on loopback:
//!
//! - `writes`: registrations/s and ack latency on a 3-node clb cluster beside
//!   a 3-node etcd 3.4 cluster, same load generator, same counts;
//! - `propagation`: registration acknowledged → live in haproxy on every node,
//!   runtime-API path and reload path;
//! - `render`: in-process render and `haproxy -c` time at 1k, 10k and 100k
//!   members;
//! - `scale`: a 3-node cluster loaded to 1k, 10k and 100k members (load rate,
//!   `clbd` RSS), then a 4th node's catch-up by snapshot install;
//! - `codec`: in-process size and encode + decode time of the AppendEntries
//!   shapes a write sends, in postcard (v1) and in the legacy bincode.
//!
//! ```text
//! cargo bench --bench clb -- [writes|propagation|render|scale|codec|all] [--json FILE] [--quick]
//!     [--prefill 0,10000,100000] [--clients 1,16,64] [--secs 10] [--reps 3] [--file-only]
//! ```
//!
//! `--prefill`, `--clients`, `--secs` and `--reps` override the writes
//! benchmark's registry sizes, client counts, seconds per row and runs. The
//! writes rows run each clbd with the haproxy it supervises (the production
//! shape: member changes go live through haproxy's runtime API);
//! `--file-only` runs clbd writing only its file, as without haproxy.
//!
//! Needs `haproxy` and, for the etcd rows, `etcd` (`apt-get install -y haproxy
//! etcd-server`); it installs nothing itself. Every child is killed by pid on
//! exit (also on Ctrl-C), every load loop is bounded in count and time, and all
//! traffic goes to 127.0.0.1.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use clb::model::{self, Check, MemberSpec, Mode, Registry, ServiceDef};
use clb::render::template::{NodeContext, Template};
use clb::views::{AddNodeBody, NodeView, RegisterBody, ServiceBody, Written};
use lab::wait::eventually_every;
use lab::{free_port, free_ports, Proc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

const TOKEN: &str = "bench-token";
const SECRET: &str = "bench-cluster-secret-0123456789abcdef";
const USAGE: &str = "usage: cargo bench --bench clb -- [writes|propagation|render|scale|codec|all] \
     [--json FILE] [--quick] [--prefill 0,10000,100000] [--clients 1,16,64] [--secs 10] [--reps 3] [--file-only]";

// ---------------------------------------------------------------- arguments

struct Opts {
    writes: bool,
    propagation: bool,
    render: bool,
    scale: bool,
    codec: bool,
    json: Option<PathBuf>,
    quick: bool,
    /// Seconds per writes row, instead of 10 (5 with `quick`).
    secs: Option<u64>,
    /// Runs per writes row, instead of 3 (1 with `quick`).
    reps: Option<usize>,
    /// Writes rows, instead of 1, 16 and 64 clients.
    clients: Option<Vec<usize>>,
    /// Registry sizes the writes rows start from, instead of 0, 10k, 100k.
    prefill: Option<Vec<usize>>,
    /// Writes with clbd only writing its file, no haproxy.
    file_only: bool,
}

fn parse_args() -> Result<Opts> {
    let mut which = BTreeSet::new();
    let mut json = None;
    let mut quick = false;
    let mut secs = None;
    let mut reps = None;
    let mut clients = None;
    let mut prefill = None;
    let mut file_only = false;
    let mut bench = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            // cargo bench passes --bench to harness = false targets;
            // cargo test (e.g. --all-targets) passes nothing.
            "--bench" => bench = true,
            "--quick" => quick = true,
            "--json" => json = Some(PathBuf::from(args.next().context(USAGE)?)),
            "--secs" => secs = Some(args.next().context(USAGE)?.parse()?),
            "--reps" => reps = Some(args.next().context(USAGE)?.parse()?),
            "--clients" => clients = Some(list(args.next())?),
            "--prefill" => prefill = Some(list(args.next())?),
            "--file-only" => file_only = true,
            "writes" | "propagation" | "render" | "scale" | "codec" | "all" => {
                bench = true;
                which.insert(a);
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}\n{USAGE}"),
        }
    }
    if !bench {
        // Under `cargo test --all-targets`: minutes of load are not a test.
        println!("clb benchmarks: nothing to do without `cargo bench`\n{USAGE}");
        std::process::exit(0);
    }
    let all = which.is_empty() || which.contains("all");
    Ok(Opts {
        writes: all || which.contains("writes"),
        propagation: all || which.contains("propagation"),
        render: all || which.contains("render"),
        scale: all || which.contains("scale"),
        codec: all || which.contains("codec"),
        json,
        quick,
        secs,
        reps,
        clients,
        prefill,
        file_only,
    })
}

/// A comma-separated list of counts (`0,10000,100000`).
fn list(arg: Option<String>) -> Result<Vec<usize>> {
    let list = arg.context(USAGE)?;
    let parsed: Result<Vec<usize>, _> = list.split(',').map(str::parse).collect();
    parsed.with_context(|| format!("{list:?} is not a list of counts\n{USAGE}"))
}

fn main() -> Result<()> {
    let opts = parse_args()?;
    // Ctrl-C kills every child by pid; before the runtime's threads exist.
    lab::cleanup_on_signals();
    // Two workers: the load generator should not take more than the
    // machine's share the servers need (the reference machine has 2 cores).
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let out = rt.block_on(run(&opts));
    lab::proc::kill_all();
    out
}

async fn run(opts: &Opts) -> Result<()> {
    let mut report = serde_json::Map::new();
    let machine = machine();
    println!("# clb benchmarks\n");
    println!(
        "machine: {} CPUs, {} GiB RAM, kernel {}, clb {}{}\n",
        machine.cpus,
        machine.mem_gib,
        machine.kernel,
        machine.commit.as_deref().unwrap_or("?"),
        if opts.quick { " (--quick)" } else { "" }
    );
    report.insert("machine".into(), serde_json::to_value(&machine)?);
    report.insert("quick".into(), json!(opts.quick));
    if opts.writes {
        report.insert("writes".into(), bench_writes(opts).await?);
    }
    if opts.propagation {
        report.insert("propagation".into(), bench_propagation(opts.quick).await?);
    }
    if opts.render {
        report.insert("render".into(), bench_render().await?);
    }
    if opts.scale {
        report.insert("scale".into(), bench_scale(opts.quick).await?);
    }
    if opts.codec {
        report.insert("codec".into(), bench_codec()?);
    }
    if let Some(path) = &opts.json {
        std::fs::write(path, serde_json::to_string_pretty(&Value::Object(report))?)
            .with_context(|| format!("write {}", path.display()))?;
        println!("JSON written to {}", path.display());
    }
    Ok(())
}

/// The report's `machine` object.
#[derive(Serialize)]
struct Machine {
    cpus: usize,
    mem_gib: u64,
    kernel: String,
    commit: Option<String>,
    haproxy: Option<String>,
    etcd: Option<String>,
}

fn machine() -> Machine {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let mem_kib: u64 = read("/proc/meminfo")
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0);
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    Machine {
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        mem_gib: mem_kib / (1024 * 1024),
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        commit,
        haproxy: tool_version("haproxy", &["-v"]),
        etcd: tool_version("etcd", &["--version"]),
    }
}

fn tool_version(bin: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(bin).args(args).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines().next().map(|l| l.trim().to_string())
}

fn have(bin: &str) -> bool {
    Command::new(bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

// ---------------------------------------------------------------- processes

/// How often a wait looks again: fine enough for the settle times reported.
const POLL: Duration = Duration::from_millis(10);

fn rss_kib(pid: i32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        l.strip_prefix(field)?
            .strip_prefix(':')?
            .trim()
            .strip_suffix("kB")?
            .trim()
            .parse()
            .ok()
    })
}

fn mib(kib: Option<u64>) -> Value {
    kib.map_or(Value::Null, |k| json!(round1(k as f64 / 1024.0)))
}

// ---------------------------------------------------------------- clb cluster

/// Real `clbd` processes (the lab's cluster: reserved loopback ports,
/// temp data dirs) and an HTTP client for the bench's requests.
struct ClbCluster {
    lab: lab::Cluster,
    http: reqwest::Client,
}

impl std::ops::Deref for ClbCluster {
    type Target = lab::Cluster;
    fn deref(&self) -> &lab::Cluster {
        &self.lab
    }
}

impl ClbCluster {
    /// `n` nodes from `--peers` on clbd's default timers; `extra(id, dir)`
    /// adds per-node flags.
    async fn start(n: u64, extra: &dyn Fn(u64, &Path) -> Vec<String>) -> Result<ClbCluster> {
        let mut lab = lab::Cluster::new(
            env!("CARGO_BIN_EXE_clbd"),
            "clb-bench",
            TOKEN,
            SECRET,
            // The production default filter, spelled out so the caller's env cannot change it.
            &[("RUST_LOG", clb::DEFAULT_LOG)],
        )?;
        let dir = lab.path().to_path_buf();
        lab.spawn_peers(n, &[], |id| extra(id, &dir))?;
        lab.healthy(Duration::from_secs(30))
            .await
            .map_err(|e| anyhow!(e))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .build()?;
        let cluster = ClbCluster { lab, http };
        cluster.leader(Duration::from_secs(20)).await?;
        Ok(cluster)
    }

    fn spawn_node(&mut self, id: u64, addr: String, peer: String, extra: Vec<String>) {
        self.lab.add_node_at(id, addr, peer, &[], extra);
    }

    async fn wait_healthy(&self, id: u64) -> Result<()> {
        let node = &self.nodes[&id];
        eventually_every(Duration::from_secs(30), POLL, "clbd healthy", || async {
            node.healthy().await.then_some(())
        })
        .await
        .with_context(|| {
            let text = node.log_text();
            let tail: Vec<&str> = text.lines().rev().take(10).collect();
            format!("node {id} log tail: {tail:?}")
        })
    }

    fn url(&self, id: u64, path: &str) -> String {
        format!("http://{}{path}", self.nodes[&id].addr)
    }

    /// One API call; the answer read as the view `T`.
    async fn request<T: DeserializeOwned>(
        &self,
        id: u64,
        method: reqwest::Method,
        path: &str,
        body: Option<&impl Serialize>,
        timeout: Duration,
    ) -> Result<T> {
        let mut req = self
            .http
            .request(method, self.url(id, path))
            .bearer_auth(TOKEN)
            .timeout(timeout);
        if let Some(b) = body {
            req = req.json(b);
        }
        let resp = req.send().await?;
        let status = resp.status();
        let body = resp.bytes().await?;
        if !status.is_success() {
            // Any JSON: the error answer is quoted whole.
            let v: Value = serde_json::from_slice(&body)?;
            bail!("{path} on node {id}: {status} {v}");
        }
        Ok(serde_json::from_slice(&body)?)
    }

    /// `GET /v1/node`: this node's own state (no fan-out).
    async fn node_view(&self, id: u64) -> Option<NodeView> {
        let get = reqwest::Method::GET;
        self.request(id, get, "/v1/node", None::<&()>, Duration::from_secs(5))
            .await
            .ok()
    }

    async fn leader(&self, within: Duration) -> Result<u64> {
        let ids: Vec<u64> = self.nodes.keys().copied().collect();
        let (leader, _) = eventually_every(within, POLL, "a leader every node agrees on", || {
            lab::agreed_leader(&ids, |id| async move {
                let v = self.node_view(id).await?;
                Some((v.leader, v.term))
            })
        })
        .await?;
        Ok(leader)
    }

    async fn put(&self, id: u64, path: &str, body: &impl Serialize) -> Result<Written> {
        let put = reqwest::Method::PUT;
        self.request(id, put, path, Some(body), Duration::from_secs(30))
            .await
    }

    /// Waits until every node applied `index` and rendered it.
    async fn settled(&self, index: u64, within: Duration) -> Result<()> {
        let waited = self.settled_quietly(index, within).await;
        if waited.is_err() {
            for id in self.nodes.keys() {
                let v = self.node_view(*id).await;
                let r = v.as_ref().map(|v| (v.applied_index, v.render.clone()));
                eprintln!("node {id} at {index}: {r:?}");
                let log = std::fs::read_to_string(&self.nodes[id].log).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                for line in tail.iter().rev() {
                    eprintln!("  {line}");
                }
            }
        }
        waited
    }

    async fn settled_quietly(&self, index: u64, within: Duration) -> Result<()> {
        eventually_every(within, POLL, "every node applied and rendered", || async {
            for id in self.nodes.keys() {
                let v = self.node_view(*id).await?;
                let rendered = v.render.as_ref().map_or(index, |r| r.rendered_index);
                if v.applied_index < index || rendered < index {
                    return None;
                }
            }
            Some(())
        })
        .await
        .map_err(Into::into)
    }
}

// ---------------------------------------------------------------- etcd cluster

/// etcd's `GET /health`.
#[derive(Deserialize)]
struct EtcdHealth {
    health: String,
}

/// What the bench reads of etcd's `POST /v3/maintenance/status` (the JSON
/// gateway spells member ids as strings).
#[derive(Deserialize)]
struct EtcdStatus {
    #[serde(default)]
    leader: Option<String>,
    #[serde(default)]
    header: Option<EtcdHeader>,
}

#[derive(Deserialize)]
struct EtcdHeader {
    #[serde(default)]
    member_id: Option<String>,
}

/// etcd's `POST /v3/kv/put`: base64 key and value.
#[derive(Serialize)]
struct EtcdPut {
    key: String,
    value: String,
}

struct EtcdCluster {
    _dir: tempfile::TempDir,
    _procs: Vec<Proc>,
    clients: Vec<String>,
    http: reqwest::Client,
}

impl EtcdCluster {
    /// `n` etcd members on loopback, fsync on (etcd's default).
    async fn start(n: usize) -> Result<EtcdCluster> {
        let dir = tempfile::Builder::new().prefix("etcd-bench").tempdir()?;
        let mut ports = Vec::new();
        for _ in 0..n {
            ports.push((free_port(), free_port()));
        }
        let initial = ports
            .iter()
            .enumerate()
            .map(|(i, (_, peer))| format!("e{i}=http://127.0.0.1:{peer}"))
            .collect::<Vec<_>>()
            .join(",");
        let mut procs = Vec::new();
        let mut clients = Vec::new();
        for (i, (client, peer)) in ports.iter().enumerate() {
            let client_url = format!("http://127.0.0.1:{client}");
            let peer_url = format!("http://127.0.0.1:{peer}");
            let mut cmd = Command::new("etcd");
            cmd.args(["--name", &format!("e{i}")])
                .arg("--data-dir")
                .arg(dir.path().join(format!("e{i}")))
                .args(["--listen-client-urls", &client_url])
                .args(["--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &initial])
                .args(["--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", "clb-bench"])
                .args(["--logger", "zap", "--log-level", "warn"]);
            let log = dir.path().join(format!("e{i}.log"));
            procs.push(Proc::build(&mut cmd).log(&log).spawn()?);
            clients.push(client_url);
        }
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?;
        let cluster = EtcdCluster {
            _dir: dir,
            _procs: procs,
            clients,
            http,
        };
        for c in &cluster.clients {
            let url = format!("{c}/health");
            eventually_every(Duration::from_secs(30), POLL, "etcd healthy", || async {
                let v: EtcdHealth = cluster
                    .http
                    .get(&url)
                    .send()
                    .await
                    .ok()?
                    .json()
                    .await
                    .ok()?;
                (v.health == "true").then_some(())
            })
            .await?;
        }
        Ok(cluster)
    }

    /// The client URL of the current leader.
    async fn leader(&self) -> Result<String> {
        eventually_every(Duration::from_secs(20), POLL, "an etcd leader", || async {
            for c in &self.clients {
                let resp = self
                    .http
                    .post(format!("{c}/v3/maintenance/status"))
                    .json(&json!({}))
                    .send()
                    .await
                    .ok()?;
                let v: EtcdStatus = resp.json().await.ok()?;
                let member = v.header.and_then(|h| h.member_id);
                if v.leader.is_some() && v.leader == member {
                    return Some(c.clone());
                }
            }
            None
        })
        .await
        .map_err(Into::into)
    }
}

/// Standard base64 with padding (the etcd gateway's JSON wants it).
fn b64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b1 = chunk.get(1).copied().unwrap_or(0);
        let b2 = chunk.get(2).copied().unwrap_or(0);
        let n = (u32::from(chunk[0]) << 16) | (u32::from(b1) << 8) | u32::from(b2);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * k)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

// ---------------------------------------------------------------- load generator

/// Where registrations go. Both sides get the same member name and the same
/// JSON body, so request sizes match.
#[derive(Clone)]
enum Target {
    /// `PUT /v1/services/{svc}/members/{name}`; `services == 0` means `web`,
    /// else member `i` goes to `svc{i % services}`.
    Clb { base: String, services: usize },
    /// `POST /v3/kv/put` with base64 key and value.
    Etcd { base: String },
}

fn ip_of(i: usize) -> String {
    let n = i + 1;
    format!("10.{}.{}.{}", (n >> 16) & 255, (n >> 8) & 255, n & 255)
}

impl Target {
    async fn register(&self, http: &reqwest::Client, name: &str, i: usize) -> Result<(), String> {
        let body = RegisterBody {
            address: ip_of(i),
            port: Some(8080),
            ..Default::default()
        };
        let sent = match self {
            Target::Clb { base, services } => {
                let svc = match services {
                    0 => "web".to_string(),
                    n => format!("svc{}", i % n),
                };
                http.put(format!("{base}/v1/services/{svc}/members/{name}"))
                    .bearer_auth(TOKEN)
                    .json(&body)
                    .send()
                    .await
            }
            Target::Etcd { base } => {
                let key = format!("/clb/services/web/members/{name}");
                let value = serde_json::to_string(&body).map_err(|e| e.to_string())?;
                let kv = EtcdPut {
                    key: b64(key.as_bytes()),
                    value: b64(value.as_bytes()),
                };
                http.post(format!("{base}/v3/kv/put"))
                    .json(&kv)
                    .send()
                    .await
            }
        };
        let resp = sent.map_err(|e| e.to_string())?;
        let status = resp.status();
        let answer = resp.bytes().await.map_err(|e| e.to_string())?;
        if !status.is_success() {
            let text = String::from_utf8_lossy(&answer);
            return Err(format!(
                "{status}: {}",
                text.chars().take(200).collect::<String>()
            ));
        }
        Ok(())
    }
}

struct LoadOut {
    ok: usize,
    errors: usize,
    first_error: Option<String>,
    secs: f64,
    /// Ack latencies in ms, sorted.
    lat_ms: Vec<f64>,
    capped: bool,
}

impl LoadOut {
    fn rate(&self) -> f64 {
        if self.secs > 0.0 {
            self.ok as f64 / self.secs
        } else {
            0.0
        }
    }

    fn json(&self) -> Value {
        json!({
            "ok": self.ok,
            "errors": self.errors,
            "first_error": self.first_error,
            "secs": round3(self.secs),
            "writes_per_s": round1(self.rate()),
            "p50_ms": round3(pct(&self.lat_ms, 0.50)),
            "p99_ms": round3(pct(&self.lat_ms, 0.99)),
            "max_ms": round3(self.lat_ms.last().copied().unwrap_or(0.0)),
            "capped_by_time": self.capped,
        })
    }
}

/// `clients` workers, each with its own keep-alive connection, register
/// members `range` (named `{prefix}{i}`) until done or `cap` has passed.
async fn load(
    target: &Target,
    clients: usize,
    range: std::ops::Range<usize>,
    prefix: &str,
    cap: Duration,
) -> Result<LoadOut> {
    let next = Arc::new(AtomicUsize::new(range.start));
    let barrier = Arc::new(tokio::sync::Barrier::new(clients + 1));
    let deadline = Instant::now() + cap;
    let mut tasks = Vec::new();
    for w in 0..clients {
        let (target, next, barrier) = (target.clone(), next.clone(), barrier.clone());
        let (prefix, end) = (prefix.to_string(), range.end);
        tasks.push(tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .pool_max_idle_per_host(1)
                .timeout(Duration::from_secs(10))
                .build();
            // Warm-up outside the timing: opens this worker's connection.
            if let Ok(h) = &http {
                let _ = target.register(h, &format!("{prefix}w{w}"), w).await;
            }
            barrier.wait().await;
            let http = http.map_err(|e| e.to_string())?;
            let mut lat = Vec::new();
            let (mut errors, mut first_error) = (0usize, None);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= end || Instant::now() >= deadline {
                    break;
                }
                let t = Instant::now();
                match target.register(&http, &format!("{prefix}{i}"), i).await {
                    Ok(()) => lat.push(t.elapsed().as_secs_f64() * 1e3),
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert(e);
                    }
                }
            }
            Ok::<_, String>((lat, errors, first_error))
        }));
    }
    barrier.wait().await;
    let t0 = Instant::now();
    let mut out = LoadOut {
        ok: 0,
        errors: 0,
        first_error: None,
        secs: 0.0,
        lat_ms: Vec::new(),
        capped: false,
    };
    for t in tasks {
        let (lat, errors, first) = t.await?.map_err(|e| anyhow!(e))?;
        out.lat_ms.extend(lat);
        out.errors += errors;
        if out.first_error.is_none() {
            out.first_error = first;
        }
    }
    out.secs = t0.elapsed().as_secs_f64();
    out.ok = out.lat_ms.len();
    out.capped = next.load(Ordering::Relaxed) < range.end;
    out.lat_ms.sort_by(f64::total_cmp);
    Ok(out)
}

/// Nearest-rank percentile of sorted `v`.
fn pct(v: &[f64], q: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let rank = (q * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    pct(&s, 0.5)
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Nearest-rank percentiles of a set of latencies, as the report has them.
#[derive(Serialize)]
struct Summary {
    n: usize,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
}

fn summary(v: &[f64]) -> Summary {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    Summary {
        n: s.len(),
        p50_ms: round3(pct(&s, 0.5)),
        p99_ms: round3(pct(&s, 0.99)),
        max_ms: round3(s.last().copied().unwrap_or(0.0)),
    }
}

// ---------------------------------------------------------------- writes

/// `CLB_BENCH_CLBD_ARGS` (split on spaces) is appended to every clbd of the
/// writes benchmark: a hook for attributing costs, e.g. `--validate-cmd true`.
fn extra_clbd_args() -> Vec<String> {
    std::env::var("CLB_BENCH_CLBD_ARGS")
        .map(|v| v.split_whitespace().map(String::from).collect())
        .unwrap_or_default()
}

/// Flags for node `id` to run the haproxy it supervises; frontends bind to
/// its own loopback address so three haproxies do not collide.
fn supervised_haproxy(id: u64) -> Vec<String> {
    [
        "--haproxy",
        "supervise",
        "--stats-port",
        "0",
        "--bind-address",
        &format!("127.0.0.{id}"),
    ]
    .map(String::from)
    .to_vec()
}

/// CPU time (user + system, the process and its reaped children such as
/// `haproxy -c`) of `pids`, in µs, from /proc/PID/stat.
fn cpu_us(pids: &[i32]) -> u64 {
    cpu_fields_us(pids, 4)
}

/// User + system time of `pids` themselves, without reaped children, in µs.
fn own_cpu_us(pids: &[i32]) -> u64 {
    cpu_fields_us(pids, 2)
}

/// The sum of the first `n` of utime, stime, cutime, cstime of `pids`, in µs.
fn cpu_fields_us(pids: &[i32], n: usize) -> u64 {
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    pids.iter()
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // Fields after the parenthesised name; utime is field 14 overall.
            let rest = &stat[stat.rfind(')')? + 2..];
            let f: Vec<u64> = rest
                .split(' ')
                .skip(11)
                .take(n)
                .filter_map(|v| v.parse().ok())
                .collect();
            Some(f.iter().sum::<u64>() * 1_000_000 / tck)
        })
        .sum()
}

/// `pids` and every process below them, from /proc/PID/stat's ppid.
fn with_descendants(mut pids: Vec<i32>) -> Vec<i32> {
    let procs: Vec<(i32, i32)> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(e.path().join("stat")).ok()?;
            let ppid = stat[stat.rfind(')')? + 2..]
                .split(' ')
                .nth(1)?
                .parse()
                .ok()?;
            Some((pid, ppid))
        })
        .collect();
    let mut i = 0;
    while i < pids.len() {
        let parent = pids[i];
        pids.extend(
            procs
                .iter()
                .filter(|(_, pp)| *pp == parent)
                .map(|(p, _)| *p),
        );
        i += 1;
    }
    pids
}

/// How long the writes benchmark watches an idle cluster's CPU.
const IDLE: Duration = Duration::from_secs(5);

/// One timed row of the writes benchmark: the load and the CPU all server
/// processes used meanwhile.
struct Row {
    out: LoadOut,
    cpu_us: u64,
    /// Members in the registry (or keys in etcd) when the row started.
    size: usize,
}

impl Row {
    fn cpu_per_write_us(&self) -> f64 {
        self.cpu_us as f64 / self.out.ok.max(1) as f64
    }
}

/// What one side of the comparison needs: where to send, whose CPU to count,
/// and how to wait for the previous load to be fully applied.
trait Side {
    fn target(&self) -> Target;
    fn pids(&self) -> Vec<i32>;
    /// The server processes themselves, whose own CPU the row reports apart
    /// from their children's (clb: clbd apart from haproxy and validation).
    fn own_pids(&self) -> Vec<i32> {
        self.pids()
    }
    async fn settle(&self) -> Result<()>;
    /// Counters that say where a row's work went (clb: haproxy reloads and
    /// runtime passes, summed over the nodes).
    async fn counters(&self) -> [u64; 2] {
        [0, 0]
    }
}

impl Side for (ClbCluster, u64) {
    fn target(&self) -> Target {
        Target::Clb {
            base: self.0.url(self.1, ""),
            services: 0,
        }
    }
    fn pids(&self) -> Vec<i32> {
        // With the haproxies they supervise: their runtime API work is part
        // of what a write costs.
        with_descendants(self.own_pids())
    }
    fn own_pids(&self) -> Vec<i32> {
        let c = &self.0;
        c.nodes.keys().filter_map(|id| c.node(*id).pid()).collect()
    }
    async fn settle(&self) -> Result<()> {
        let v = self.0.node_view(self.1).await.context("leader view")?;
        self.0
            .settled(v.applied_index, Duration::from_secs(300))
            .await
    }
    async fn counters(&self) -> [u64; 2] {
        let mut sum = [0, 0];
        for id in self.0.nodes.keys() {
            if let Some(r) = self.0.node_view(*id).await.and_then(|v| v.render) {
                sum[0] += r.reloads;
                sum[1] += r.runtime_applies;
            }
        }
        sum
    }
}

impl Side for (EtcdCluster, String) {
    fn target(&self) -> Target {
        Target::Etcd {
            base: self.1.clone(),
        }
    }
    fn pids(&self) -> Vec<i32> {
        self.0._procs.iter().map(Proc::pid).collect()
    }
    async fn settle(&self) -> Result<()> {
        // etcd acknowledges once applied on the leader; followers apply as
        // they commit, which a quiet moment lets them finish.
        tokio::time::sleep(Duration::from_millis(500)).await;
        Ok(())
    }
}

/// Prefills `side` to `size` members with 64 clients, then runs one timed
/// row per client count on the same cluster.
async fn run_side(
    side: &impl Side,
    name: &str,
    size: usize,
    rows: &[usize],
    secs: Duration,
    rep: usize,
) -> Result<Vec<Row>> {
    let target = side.target();
    if size > 0 {
        let t = Instant::now();
        let out = load(&target, 64, 0..size, "pre", Duration::from_secs(600)).await?;
        ensure!(
            out.errors == 0 && !out.capped,
            "{name}: prefill to {size} failed: {} errors (first {:?}), capped {}",
            out.errors,
            out.first_error,
            out.capped
        );
        side.settle().await?;
        eprintln!(
            "writes rep {rep} {name}: prefilled {size} in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    // What the cluster costs doing nothing (heartbeats, leases, health and
    // stats polling), which a slow row's CPU per write includes.
    let pids = side.pids();
    let (idle0, own0) = (cpu_us(&pids), own_cpu_us(&side.own_pids()));
    tokio::time::sleep(IDLE).await;
    eprintln!(
        "writes rep {rep} size {size}: {name} idle {:.0} ms CPU/s ({:.0} ms/s {name} itself)",
        (cpu_us(&pids) - idle0) as f64 / 1e3 / IDLE.as_secs_f64(),
        (own_cpu_us(&side.own_pids()) - own0) as f64 / 1e3 / IDLE.as_secs_f64(),
    );
    let mut done = size;
    let mut out_rows = Vec::new();
    for &clients in rows {
        let prefix = format!("r{rep}c{clients}-");
        let pids = side.pids();
        let cpu0 = cpu_us(&pids);
        let own0 = own_cpu_us(&side.own_pids());
        let counted0 = side.counters().await;
        // Bounded by time; the count bound is only a backstop.
        let out = load(&target, clients, 0..10_000_000, &prefix, secs).await?;
        let cpu = cpu_us(&pids).saturating_sub(cpu0);
        let own = own_cpu_us(&side.own_pids()).saturating_sub(own0);
        // Read after the row's writes are applied everywhere.
        side.settle().await?;
        let counted = side.counters().await;
        eprintln!(
            "writes rep {rep} size {size} clients {clients}: {name} {:.0}/s p50 {:.2} ms p99 {:.2} ms \
             cpu/write {:.0} µs ({:.0} µs {name} itself) errors {} (reloads {}, runtime passes {} \
             on all nodes)",
            out.rate(),
            pct(&out.lat_ms, 0.5),
            pct(&out.lat_ms, 0.99),
            cpu as f64 / out.ok.max(1) as f64,
            own as f64 / out.ok.max(1) as f64,
            out.errors,
            counted[0] - counted0[0],
            counted[1] - counted0[1],
        );
        let ok = out.ok;
        out_rows.push(Row {
            out,
            cpu_us: cpu,
            size: done,
        });
        done += ok;
    }
    Ok(out_rows)
}

async fn bench_writes(opts: &Opts) -> Result<Value> {
    let quick = opts.quick;
    let reps = opts.reps.unwrap_or(if quick { 1 } else { 3 });
    let secs = Duration::from_secs(opts.secs.unwrap_or(if quick { 5 } else { 10 }));
    let rows = opts.clients.clone().unwrap_or_else(|| vec![1, 16, 64]);
    let sizes = opts.prefill.clone().unwrap_or_else(|| {
        if quick {
            vec![0, 10_000]
        } else {
            vec![0, 10_000, 100_000]
        }
    });
    let etcd = have("etcd") && std::env::var_os("CLB_BENCH_NO_ETCD").is_none();
    let with_haproxy = !opts.file_only && have("haproxy");
    println!("## writes\n");
    println!(
        "clbd {}.\n",
        if with_haproxy {
            "supervises haproxy 2.6 (`--haproxy supervise`, service `web` without health checks): \
             member changes go live through haproxy's runtime API"
        } else {
            "writes its haproxy.cfg only (`--file-only`, or haproxy not installed)"
        }
    );
    println!(
        "Every request registers a member never written before into one service \
         (etcd: a key of the same name, the same JSON value). 3 nodes each, fsync on, \
         requests to the leader over keep-alive connections (one HTTP client per worker). \
         Per registry size a fresh cluster is prefilled by 64 clients, then runs one \
         {secs:?} row per client count (the registry grows by each row's writes); median of \
         {reps} run(s) by throughput. CPU per write is user + system time of all three \
         server processes (and their reaped children) over the row, divided by its writes."
    );
    if !etcd {
        println!(
            "\n`etcd` not found: skipping the etcd rows (install with `apt-get install -y etcd-server`)."
        );
    }
    // (size, clients) → runs
    let mut clb_runs: BTreeMap<(usize, usize), Vec<Row>> = BTreeMap::new();
    let mut etcd_runs: BTreeMap<(usize, usize), Vec<Row>> = BTreeMap::new();
    for rep in 0..reps {
        for &size in &sizes {
            let cluster = ClbCluster::start(3, &|id, _| {
                let mut args = extra_clbd_args();
                if with_haproxy {
                    args.extend(supervised_haproxy(id));
                }
                args
            })
            .await?;
            let leader = cluster.leader(Duration::from_secs(20)).await?;
            if with_haproxy {
                // No health checks: 100k servers checking 10.x addresses
                // would be traffic off this host, and not what is measured.
                let web = ServiceBody {
                    port: u32::from(free_port()),
                    mode: Some(Mode::Http),
                    check: Some(Check::None),
                    ..Default::default()
                };
                cluster.put(leader, "/v1/services/web", &web).await?;
            }
            let side = (cluster, leader);
            for (clients, row) in rows
                .iter()
                .zip(run_side(&side, "clb", size, &rows, secs, rep).await?)
            {
                clb_runs.entry((size, *clients)).or_default().push(row);
            }
            drop(side);
            if etcd {
                let cluster = EtcdCluster::start(3).await?;
                let leader = cluster.leader().await?;
                let side = (cluster, leader);
                for (clients, row) in rows
                    .iter()
                    .zip(run_side(&side, "etcd", size, &rows, secs, rep).await?)
                {
                    etcd_runs.entry((size, *clients)).or_default().push(row);
                }
            }
        }
    }
    println!(
        "\n| registry | clients | clb writes/s | clb p50 ms | clb p99 ms | clb CPU µs/write | etcd writes/s | etcd p50 ms | etcd p99 ms | etcd CPU µs/write | clb/etcd writes/s | errors clb/etcd |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let median_row = |runs: &[Row]| -> Option<usize> {
        let mut idx: Vec<usize> = (0..runs.len()).collect();
        idx.sort_by(|a, b| runs[*a].out.rate().total_cmp(&runs[*b].out.rate()));
        idx.get(idx.len() / 2).copied()
    };
    let mut json_rows = Vec::new();
    for (key, runs) in &clb_runs {
        let (size, clients) = *key;
        let c = &runs[median_row(runs).context("no clb run")?];
        let e = etcd_runs
            .get(key)
            .and_then(|r| median_row(r).map(|i| &r[i]));
        let cell = |f: &dyn Fn(&Row) -> String| e.map(f).unwrap_or_else(|| "–".into());
        let ratio = e.map(|e| c.out.rate() / e.out.rate());
        println!(
            "| {} | {clients} | {:.0} | {:.2} | {:.2} | {:.0} | {} | {} | {} | {} | {} | {}/{} |",
            c.size,
            c.out.rate(),
            pct(&c.out.lat_ms, 0.5),
            pct(&c.out.lat_ms, 0.99),
            c.cpu_per_write_us(),
            cell(&|e| format!("{:.0}", e.out.rate())),
            cell(&|e| format!("{:.2}", pct(&e.out.lat_ms, 0.5))),
            cell(&|e| format!("{:.2}", pct(&e.out.lat_ms, 0.99))),
            cell(&|e| format!("{:.0}", e.cpu_per_write_us())),
            ratio.map_or("–".into(), |r| format!("{r:.2}")),
            c.out.errors,
            cell(&|e| e.out.errors.to_string()),
        );
        let row_json = |r: &Row| {
            let mut v = r.out.json();
            v["registry"] = json!(r.size);
            v["cpu_us_per_write"] = json!(round1(r.cpu_per_write_us()));
            v
        };
        json_rows.push(json!({
            "prefill": size,
            "clients": clients,
            "clb": row_json(c),
            "etcd": e.map(row_json),
            "ratio_writes_per_s": ratio.map(round3),
            "clb_runs_writes_per_s": runs.iter().map(|r| round1(r.out.rate())).collect::<Vec<_>>(),
            "etcd_runs_writes_per_s": etcd_runs.get(key).map(|r| r.iter().map(|r| round1(r.out.rate())).collect::<Vec<_>>()),
        }));
        for (name, runs) in [("clb", Some(runs)), ("etcd", etcd_runs.get(key))] {
            for r in runs.into_iter().flatten() {
                if let Some(err) = &r.out.first_error {
                    println!("\n{name} at {size} prefilled, {clients} clients, first error: {err}");
                }
            }
        }
    }
    println!();
    Ok(
        json!({"secs": secs.as_secs(), "repetitions": reps, "etcd": etcd, "haproxy": with_haproxy, "rows": json_rows}),
    )
}

// ---------------------------------------------------------------- propagation

/// One exchange on a haproxy CLI socket, given up after 2 s (the bench
/// polls every millisecond and must not hang on one socket).
async fn haproxy_cmd(socket: &Path, command: &str) -> Option<String> {
    let work = clb::render::haproxy::exchange(socket, command);
    tokio::time::timeout(Duration::from_secs(2), work)
        .await
        .ok()?
        .ok()
}

/// True when `show servers state` lists `server` running (op state 2) and
/// not in maintenance (admin state 0).
fn server_ready(state: &str, server: &str) -> bool {
    let mut cols: Vec<&str> = Vec::new();
    for line in state.lines() {
        if let Some(header) = line.strip_prefix("# ") {
            cols = header.split_whitespace().collect();
            continue;
        }
        let col = |name: &str| cols.iter().position(|c| *c == name);
        let (Some(n), Some(op), Some(admin)) =
            (col("srv_name"), col("srv_op_state"), col("srv_admin_state"))
        else {
            continue;
        };
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.get(n) == Some(&server) {
            return f.get(op) == Some(&"2") && f.get(admin) == Some(&"0");
        }
    }
    false
}

/// How a change is seen as live on one node's admin socket.
#[derive(Clone, Copy)]
enum Live<'a> {
    Server(&'a str),
    Backend(&'a str),
}

async fn is_live(socket: &Path, what: Live<'_>) -> bool {
    match what {
        Live::Server(name) => haproxy_cmd(socket, "show servers state be_web")
            .await
            .is_some_and(|s| server_ready(&s, name)),
        Live::Backend(be) => haproxy_cmd(socket, "show backend")
            .await
            .is_some_and(|s| s.lines().any(|l| l.trim() == be)),
    }
}

struct Sample {
    ack_ms: f64,
    /// Ack → live, per node.
    live_ms: Vec<f64>,
    timed_out: bool,
}

/// Polls every node's admin socket (1 ms apart) until `what` is live on all,
/// returning ack → live per node.
async fn wait_live(sockets: &[PathBuf], what: Live<'_>, acked: Instant) -> (Vec<f64>, bool) {
    let mut live: Vec<Option<f64>> = vec![None; sockets.len()];
    let deadline = acked + Duration::from_secs(10);
    loop {
        for (i, s) in sockets.iter().enumerate() {
            if live[i].is_none() && is_live(s, what).await {
                live[i] = Some(acked.elapsed().as_secs_f64() * 1e3);
            }
        }
        if live.iter().all(Option::is_some) {
            return (live.into_iter().flatten().collect(), false);
        }
        if Instant::now() > deadline {
            let ms = live.into_iter().map(|l| l.unwrap_or(10_000.0)).collect();
            return (ms, true);
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

async fn bench_propagation(quick: bool) -> Result<Value> {
    let n = if quick { 50 } else { 200 };
    println!("## propagation\n");
    if !have("haproxy") {
        println!("`haproxy` not found: skipped (install with `apt-get install -y haproxy`).\n");
        return Ok(json!({"skipped": "haproxy not found"}));
    }
    // Three haproxies on one machine would all bind `*:PORT` for a service
    // and collide; each node binds its frontends to its own loopback address
    // (127.0.0.N, `--bind-address`) with the built-in template, the one whose
    // member-only changes skip `haproxy -c`.
    let args = move |id: u64, dir: &Path| -> Vec<String> {
        let h = dir.join(format!("hap{id}"));
        let _ = std::fs::create_dir_all(&h);
        vec![
            "--haproxy-socket".into(),
            h.join("admin.sock").display().to_string(),
            "--haproxy-master-socket".into(),
            h.join("master.sock").display().to_string(),
            "--stats-port".into(),
            "0".into(),
            "--reload-min-interval-ms".into(),
            "100".into(),
            "--bind-address".into(),
            format!("127.0.0.{id}"),
        ]
    };
    let cluster = ClbCluster::start(3, &args).await?;
    let leader = cluster.leader(Duration::from_secs(20)).await?;
    let ids: Vec<u64> = cluster.nodes.keys().copied().collect();
    let dir = cluster.dir.path().to_path_buf();
    let sockets: Vec<PathBuf> = ids
        .iter()
        .map(|id| dir.join(format!("hap{id}/admin.sock")))
        .collect();

    let web_port = free_ports(3)?;
    let v = cluster
        .put(
            leader,
            "/v1/services/web",
            &ServiceBody {
                port: web_port.into(),
                mode: Some(Mode::Http),
                check: Some(Check::None),
                ..Default::default()
            },
        )
        .await?;
    let index = v.index;
    cluster.settled(index, Duration::from_secs(30)).await?;
    let mut haproxies = Vec::new();
    for id in &ids {
        let mut cmd = Command::new("haproxy");
        cmd.args(["-W", "-db", "-S"])
            .arg(dir.join(format!("hap{id}/master.sock")))
            .arg("-f")
            .arg(dir.join(format!("haproxy{id}.cfg")));
        let log = dir.join(format!("hap{id}.log"));
        // SIGTERM first: the master stops its workers.
        haproxies.push(Proc::build(&mut cmd).log(&log).graceful().spawn()?);
    }
    // clbd retries a failed apply with backoff (≤ 5 s) and reloads once haproxy answers.
    eventually_every(
        Duration::from_secs(30),
        POLL,
        "every haproxy runs the rendered config",
        || async {
            for id in &ids {
                let v = cluster.node_view(*id).await?;
                let r = v.render.as_ref()?;
                let ok = r.applied_index >= v.applied_index && r.last_error.is_none();
                if !ok {
                    return None;
                }
            }
            for s in &sockets {
                if !is_live(s, Live::Backend("be_web")).await {
                    return None;
                }
            }
            Some(())
        },
    )
    .await?;

    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let leader_url = cluster.url(leader, "");
    let started = Instant::now();
    let budget = Duration::from_secs(if quick { 120 } else { 600 });

    let mut runtime = Vec::new();
    let mut breakdown: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for i in 0..n {
        if started.elapsed() > budget {
            break;
        }
        let name = format!("m{i}");
        let t = Instant::now();
        let resp = http
            .put(format!("{leader_url}/v1/services/web/members/{name}"))
            .bearer_auth(TOKEN)
            .json(&RegisterBody {
                address: "127.0.0.1".into(),
                port: Some(9 + u32::try_from(i)?),
                ..Default::default()
            })
            .send()
            .await?;
        ensure!(
            resp.status().is_success(),
            "register {name}: {}",
            resp.status()
        );
        let acked = Instant::now();
        let ack_ms = (acked - t).as_secs_f64() * 1e3;
        let (live_ms, timed_out) = wait_live(&sockets, Live::Server(&name), acked).await;
        runtime.push(Sample {
            ack_ms,
            live_ms,
            timed_out,
        });
        // What the render pipeline spent on this change, per node.
        for id in &ids {
            if let Some(r) = cluster.node_view(*id).await.and_then(|v| v.render) {
                for (key, x) in [
                    ("last_render_ms", r.last_render_ms),
                    ("last_validate_ms", r.last_validate_ms),
                    ("last_apply_ms", r.last_apply_ms),
                ] {
                    breakdown.entry(key).or_default().push(x);
                }
            }
        }
    }
    let mut reload = Vec::new();
    for i in 0..n {
        if started.elapsed() > budget * 2 {
            break;
        }
        let svc = format!("bsvc{i}");
        let port = free_ports(3)?;
        let t = Instant::now();
        let resp = http
            .put(format!("{leader_url}/v1/services/{svc}"))
            .bearer_auth(TOKEN)
            .json(&ServiceBody {
                port: port.into(),
                mode: Some(Mode::Http),
                check: Some(Check::None),
                ..Default::default()
            })
            .send()
            .await?;
        ensure!(
            resp.status().is_success(),
            "define {svc}: {}",
            resp.status()
        );
        let acked = Instant::now();
        let ack_ms = (acked - t).as_secs_f64() * 1e3;
        let be = format!("be_{svc}");
        let (live_ms, timed_out) = wait_live(&sockets, Live::Backend(&be), acked).await;
        reload.push(Sample {
            ack_ms,
            live_ms,
            timed_out,
        });
    }
    let mut stats = Vec::new();
    for id in &ids {
        if let Some(v) = cluster.node_view(*id).await {
            stats.push(json!({"node": id, "render": v.render}));
        }
    }
    drop(haproxies);

    let row = |name: &str, goal: &str, s: &[Sample]| -> Value {
        let ack: Vec<f64> = s.iter().map(|x| x.ack_ms).collect();
        let all: Vec<f64> = s
            .iter()
            .map(|x| x.live_ms.iter().copied().fold(0.0, f64::max))
            .collect();
        let total: Vec<f64> = s.iter().zip(&all).map(|(x, a)| x.ack_ms + a).collect();
        let per_node: Vec<f64> = s.iter().flat_map(|x| x.live_ms.iter().copied()).collect();
        let timeouts = s.iter().filter(|x| x.timed_out).count();
        let (a, l, t) = (summary(&ack), summary(&all), summary(&total));
        let f = |v: f64| format!("{v:.1}");
        println!(
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {goal} | {timeouts} |",
            s.len(),
            f(a.p50_ms),
            f(a.p99_ms),
            f(l.p50_ms),
            f(l.p99_ms),
            f(l.max_ms),
            f(t.p50_ms),
            f(t.p99_ms),
        );
        json!({
            "path": name,
            "ack": a,
            "ack_to_live_on_all_nodes": l,
            "ack_to_live_per_node": summary(&per_node),
            "request_to_live_on_all_nodes": t,
            "timeouts": timeouts,
            "goal": goal,
        })
    };
    println!(
        "{n} changes per path, one at a time, 3 clbd nodes each with its own haproxy \
         (master-worker); live = every node's admin socket shows it (`show servers state be_web`: \
         op state 2, admin state 0; `show backend` for new services), polled every 1 ms. \
         `--reload-min-interval-ms 100`, render coalescing at its default (5 ms).\n"
    );
    println!(
        "| path | n | ack p50 ms | ack p99 ms | ack→live on all p50 ms | ack→live on all p99 ms | max ms | request→live p50 ms | request→live p99 ms | goal (p99) | timeouts |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|");
    let rt = row("runtime API (member add)", "≤ 50 ms", &runtime);
    let rl = row("reload (new service)", "≤ 1 s", &reload);
    let med = |k: &str| breakdown.get(k).map(|v| round3(median(v)));
    println!(
        "\nRuntime path, median per node per change (clbd's own timings): render {} ms, \
         write + fsync + `haproxy -c` {} ms, runtime API apply {} ms.\n",
        json!(med("last_render_ms")),
        json!(med("last_validate_ms")),
        json!(med("last_apply_ms")),
    );
    Ok(json!({
        "changes_per_path": n,
        "reload_min_interval_ms": 100,
        "runtime": rt,
        "reload": rl,
        "runtime_breakdown_median_ms": {
            "render": med("last_render_ms"),
            "write_validate": med("last_validate_ms"),
            "apply": med("last_apply_ms"),
        },
        "final_render_status": stats,
    }))
}

// ---------------------------------------------------------------- render and scale

const SERVICES: usize = 10;

/// `members` members spread over 10 services with tcp checks, built the way
/// every node builds it: through `Registry::apply`.
fn registry(members: usize) -> Registry {
    let mut r = Registry::default();
    for s in 0..SERVICES {
        r.apply(&model::Command::DefineService {
            service: format!("svc{s}"),
            // Through serde, so fields added later with defaults need no change here.
            def: serde_json::from_value::<ServiceDef>(json!({
                "port": 10_000 + s,
                "member_port": 8080,
                "mode": "http",
                "balance": "roundrobin",
                "check": "tcp",
            }))
            .expect("a valid service definition"),
        });
    }
    for i in 0..members {
        r.apply(&model::Command::Register {
            service: format!("svc{}", i % SERVICES),
            member: format!("m{i}"),
            spec: MemberSpec {
                address: ip_of(i),
                port: Some(8080),
                weight: None,
                ttl_s: None,
            },
            create: None,
            at_ms: 0,
        });
    }
    r
}

fn time_ms<T>(f: impl FnOnce() -> T) -> (f64, T) {
    let t = Instant::now();
    let v = f();
    (t.elapsed().as_secs_f64() * 1e3, v)
}

async fn bench_render() -> Result<Value> {
    println!("## render\n");
    let haproxy = have("haproxy");
    let sizes = [1_000usize, 10_000, 100_000];
    let template = Template::load(None)?;
    let node = NodeContext {
        node_id: 1,
        role: "balancer".into(),
        haproxy_socket: Some("/run/haproxy/admin.sock".into()),
        bind_address: "*".into(),
        stats_bind: "127.0.0.1".into(),
        stats_port: Some(8404),
        ..Default::default()
    };
    let tmp = tempfile::Builder::new()
        .prefix("clb-bench-render")
        .tempdir()?;
    println!(
        "In-process: `Template::load(None)` (built-in) and `render()` over a `Registry` of \
         {SERVICES} services (tcp checks) built with `Registry::apply`; median of 5 renders \
         (3 at 100k) after one warm-up. `haproxy -c -q -f` on the written file, median of 3.\n"
    );
    println!(
        "| members | render median ms | render min ms | config KiB | write + fsync ms | haproxy -c ms | goal (render) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---|");
    let mut rows = Vec::new();
    for &n in &sizes {
        let reg = registry(n);
        let _ = template.render(&reg, &node)?;
        let reps = if n >= 100_000 { 3 } else { 5 };
        let mut times = Vec::new();
        let mut text = String::new();
        for _ in 0..reps {
            let (ms, t) = time_ms(|| template.render(&reg, &node));
            times.push(ms);
            text = t?;
        }
        let path = tmp.path().join(format!("haproxy-{n}.cfg"));
        let (write_ms, written) = time_ms(|| -> std::io::Result<()> {
            use std::io::Write;
            let mut f = File::create(&path)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()
        });
        written?;
        let mut check_ms = Vec::new();
        let mut check_error = None;
        if haproxy {
            for _ in 0..3 {
                let (ms, out) = time_ms(|| {
                    Command::new("haproxy")
                        .args(["-c", "-q", "-f"])
                        .arg(&path)
                        .output()
                });
                let out = out?;
                if !out.status.success() {
                    check_error = Some(String::from_utf8_lossy(&out.stderr).into_owned());
                }
                check_ms.push(ms);
            }
        }
        let goal = match n {
            10_000 => "≤ 5 ms",
            100_000 => "≤ 50 ms",
            _ => "",
        };
        let check = (!check_ms.is_empty()).then(|| median(&check_ms));
        println!(
            "| {n} | {:.2} | {:.2} | {} | {:.2} | {} | {goal} |",
            median(&times),
            times.iter().copied().fold(f64::INFINITY, f64::min),
            text.len() / 1024,
            write_ms,
            check.map_or("–".into(), |c| format!("{c:.1}")),
        );
        if let Some(e) = &check_error {
            println!("\nhaproxy -c rejected the {n}-member config: {e}\n");
        }
        rows.push(json!({
            "members": n,
            "render_ms": times.iter().map(|t| round3(*t)).collect::<Vec<_>>(),
            "render_median_ms": round3(median(&times)),
            "config_bytes": text.len(),
            "write_fsync_ms": round3(write_ms),
            "haproxy_check_ms": check_ms.iter().map(|t| round1(*t)).collect::<Vec<_>>(),
            "haproxy_check_error": check_error,
        }));
    }
    println!();
    Ok(json!({"in_process": rows}))
}

/// RSS at growing member counts on a 3-node cluster, then a 4th node's catch-up.
async fn bench_scale(quick: bool) -> Result<Value> {
    println!("## scale\n");
    let sizes: &[usize] = if quick {
        &[1_000, 10_000]
    } else {
        &[1_000, 10_000, 100_000]
    };
    let budget = Duration::from_secs(if quick { 120 } else { 600 });
    let workers = 64;
    // Validation is measured above; here `--validate-cmd true` keeps three
    // `haproxy -c` runs of a 100k-server file from eating the 2 cores while
    // we load. clbd still renders and writes every config.
    let args = |_: u64, _: &Path| -> Vec<String> {
        ["--validate-cmd", "true", "--stats-port", "0"]
            .map(String::from)
            .to_vec()
    };
    let mut cluster = ClbCluster::start(3, &args).await?;
    let leader = cluster.leader(Duration::from_secs(20)).await?;
    for s in 0..SERVICES {
        let port = u32::try_from(10_000 + s)?;
        cluster
            .put(
                leader,
                &format!("/v1/services/svc{s}"),
                &ServiceBody {
                    port,
                    mode: Some(Mode::Http),
                    check: Some(Check::Tcp),
                    ..Default::default()
                },
            )
            .await?;
    }
    let target = Target::Clb {
        base: cluster.url(leader, ""),
        services: SERVICES,
    };
    println!(
        "3-node cluster (`--validate-cmd true`: validation is timed above; clbd still renders \
         and writes every config), members registered through the API by {workers} concurrent \
         keep-alive clients into {SERVICES} services; RSS read from /proc/PID/status once every \
         node applied and rendered the last write. Total loading time capped at {budget:?}.\n"
    );
    println!(
        "| members | registered in s | registrations/s | settle s | RSS node 1 MiB | RSS node 2 MiB | RSS node 3 MiB | peak RSS max MiB | goal |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    let started = Instant::now();
    let mut done = 0usize;
    let mut rows = Vec::new();
    for &size in sizes {
        let left = budget.saturating_sub(started.elapsed());
        if left.is_zero() {
            println!("\nloading budget {budget:?} spent before {size} members");
            break;
        }
        let out = load(&target, workers, done..size, "m", left).await?;
        done += out.ok + out.errors;
        let t = Instant::now();
        let index = cluster
            .node_view(leader)
            .await
            .context("leader view")?
            .applied_index;
        cluster.settled(index, Duration::from_secs(180)).await?;
        let settle = t.elapsed().as_secs_f64();
        let members = cluster.node_view(leader).await.and_then(|v| v.render);
        let rss: Vec<Option<u64>> = cluster
            .nodes
            .keys()
            .map(|id| cluster.node(*id).pid().and_then(|p| rss_kib(p, "VmRSS")))
            .collect();
        let hwm = cluster
            .nodes
            .keys()
            .filter_map(|id| cluster.node(*id).pid().and_then(|p| rss_kib(p, "VmHWM")))
            .max();
        let goal = if size == 10_000 { "RSS ≤ 64 MiB" } else { "" };
        println!(
            "| {size} | {:.1} | {:.0} | {settle:.1} | {} | {} | {} | {} | {goal} |",
            out.secs,
            out.rate(),
            mib(rss[0]),
            mib(rss[1]),
            mib(rss[2]),
            mib(hwm),
        );
        if out.errors > 0 || out.capped {
            println!(
                "\n{} errors (first: {:?}), capped by time: {}\n",
                out.errors, out.first_error, out.capped
            );
        }
        rows.push(json!({
            "members_target": size,
            "load": out.json(),
            "settle_s": round3(settle),
            "rss_mib": rss.iter().map(|r| mib(*r)).collect::<Vec<_>>(),
            "peak_rss_mib": mib(hwm),
            "leader_render_status": members,
        }));
        if out.capped {
            break;
        }
    }

    // A 4th node joins at the largest size: `clb cluster add` is
    // POST /v1/cluster/nodes, which returns once the learner caught up
    // (snapshot install: the log was compacted every 5,000 entries).
    let members = done;
    let addr = format!("127.0.0.1:{}", free_port());
    let peer = format!("127.0.0.1:{}", free_port());
    cluster.spawn_node(
        4,
        addr,
        peer.clone(),
        [args(4, Path::new("")), vec!["--join".into()]].concat(),
    );
    cluster.wait_healthy(4).await?;
    let target_index = cluster
        .node_view(leader)
        .await
        .context("leader view")?
        .applied_index;
    let t = Instant::now();
    let post = reqwest::Method::POST;
    let body = AddNodeBody {
        id: 4,
        addr: peer,
        learner: false,
    };
    let added = cluster
        .request::<Written>(
            leader,
            post,
            "/v1/cluster/nodes",
            Some(&body),
            Duration::from_secs(300),
        )
        .await;
    let add_s = t.elapsed().as_secs_f64();
    let caught_up = eventually_every(
        Duration::from_secs(300),
        POLL,
        "node 4 caught up",
        || async {
            let v = cluster.node_view(4).await?;
            (v.applied_index >= target_index).then_some(())
        },
    )
    .await;
    let catch_s = t.elapsed().as_secs_f64();
    let rendered = eventually_every(
        Duration::from_secs(120),
        POLL,
        "node 4 rendered",
        || async {
            let v = cluster.node_view(4).await?;
            (v.render?.rendered_index >= target_index).then_some(())
        },
    )
    .await;
    let render_s = t.elapsed().as_secs_f64();
    let rss4 = cluster.node(4).pid().and_then(|p| rss_kib(p, "VmRSS"));
    let log4 = std::fs::read_to_string(&cluster.nodes[&4].log).unwrap_or_default();
    let snapshot_seen = log4.to_lowercase().contains("snapshot");
    println!(
        "\nNew node catch-up at {members} members: `POST /v1/cluster/nodes` (clb cluster add) \
         answered in {add_s:.2} s{}; node 4 applied index {target_index} after {catch_s:.2} s{}, \
         rendered it after {render_s:.2} s{}; node 4 RSS {} MiB.\n",
        added
            .as_ref()
            .err()
            .map_or(String::new(), |e| format!(" with an error: {e}")),
        caught_up
            .as_ref()
            .err()
            .map_or(String::new(), |e| format!(" ({e})")),
        rendered
            .as_ref()
            .err()
            .map_or(String::new(), |e| format!(" ({e})")),
        mib(rss4),
    );
    Ok(json!({
        "sizes": rows,
        "catch_up": {
            "members": members,
            "target_index": target_index,
            "add_call_s": round3(add_s),
            "add_error": added.err().map(|e| e.to_string()),
            "applied_s": caught_up.is_ok().then_some(round3(catch_s)),
            "rendered_s": rendered.is_ok().then_some(round3(render_s)),
            "rss_mib": mib(rss4),
            "log_mentions_snapshot": snapshot_seen,
        },
    }))
}

// ---------------------------------------------------------------- codec

/// Size and encode + decode time of one AppendEntries as a leader sends it:
/// one entry of one registration (a lone client), one batch entry of 64
/// (64 clients), and 16 such batch entries (a follower catching up).
fn bench_codec() -> Result<Value> {
    use clb::codec::Codec;
    use clb::consensus::TypeConfig;
    use openraft::raft::AppendEntriesRequest;
    use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, Vote};

    println!("\n## codec\n");
    println!("| AppendEntries | codec | bytes | encode + decode µs |");
    println!("|---|---|---|---|");
    let proposal = |i: usize| model::Proposal {
        cmd: model::Command::Register {
            service: "web".into(),
            member: format!("m-{i:07}"),
            spec: MemberSpec {
                address: ip_of(i),
                port: Some(8080),
                weight: None,
                ttl_s: None,
            },
            create: ServiceDef::well_known("web"),
            at_ms: 1_764_000_000_000 + i as u64,
        },
        by: "tok-0123456789".into(),
        at_ms: 1_764_000_000_000 + i as u64,
        force: false,
    };
    let log_id = |index| LogId::new(CommittedLeaderId::new(7, 1), index);
    let entry = |index: u64, batch: usize| Entry::<TypeConfig> {
        log_id: log_id(index),
        payload: EntryPayload::Normal(if batch == 1 {
            proposal(index as usize)
        } else {
            model::Proposal {
                cmd: model::Command::Batch(
                    (0..batch)
                        .map(|i| proposal(index as usize * batch + i))
                        .collect(),
                ),
                by: String::new(),
                at_ms: 0,
                force: false,
            }
        }),
    };
    let shapes = [
        ("1 entry × 1 write", 1, 1),
        ("1 entry × 64 writes", 1, 64),
        ("16 entries × 64 writes", 16, 64),
    ];
    let mut out = Vec::new();
    for (name, entries, batch) in shapes {
        let req = AppendEntriesRequest::<TypeConfig> {
            vote: Vote::new_committed(7, 1),
            prev_log_id: Some(log_id(1000)),
            entries: (0..entries).map(|i| entry(1001 + i, batch)).collect(),
            leader_commit: Some(log_id(1000)),
        };
        for codec in [Codec::V1, Codec::Legacy] {
            let bytes = codec.encode(&req)?.len();
            // About 20,000 writes' worth of rounds per shape (at least 10).
            let rounds = 20_000 / (entries as usize * batch).max(1) + 10;
            let start = Instant::now();
            for _ in 0..rounds {
                let raw = codec.encode(std::hint::black_box(&req))?;
                let back: AppendEntriesRequest<TypeConfig> = codec.decode(&raw)?;
                std::hint::black_box(back);
            }
            let us = start.elapsed().as_secs_f64() * 1e6 / rounds as f64;
            println!("| {name} | {} | {bytes} | {:.1} |", codec.name(), us);
            out.push(
                json!({"shape": name, "codec": codec.name(), "bytes": bytes, "us": round1(us)}),
            );
        }
    }
    Ok(Value::Array(out))
}
