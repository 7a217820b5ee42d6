//! Member churn against a real haproxy 2.6 (issue 13, part 3): members of one
//! service register and unregister at 20 changes/s while clients hold
//! WebSocket-like upgrades, slow downloads and keep-alive requests through
//! every member, and a new service (hence a reload) arrives at a fixed
//! interval. Debian's haproxy 2.6 has known crashes on this path (dynamic
//! servers added and deleted under traffic); this proves clb's use of it.
//!
//! CI runs 30 s with a reload every 10 s. The long run (docs/benchmarks.md):
//!
//! ```text
//! CLB_CHURN_SECS=300 cargo test --test haproxy_churn -- --nocapture
//! ```
//!
//! which reloads every 30 s (`CLB_CHURN_RELOAD_SECS` sets that interval);
//! `CLB_CHURN_LOGS=DIR` keeps haproxy's and clbd's logs and any core there.

#[path = "cluster/harness.rs"]
mod harness;

#[path = "common/haproxy.rs"]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clb::model::{Check, Mode, ServerOptions};
use clb::render::haproxy::exchange;
use clb::views::ServiceBody;
use common::Balancer;
use harness::{eventually, NodeExt};
use lab::free_port;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Members never removed.
const STABLE: usize = 3;
/// Members that come and go, one change every `CHANGE_EVERY`, in turn: each
/// is in for `CHURN × CHANGE_EVERY` (800 ms), then out as long.
const CHURN: usize = 16;
const CHANGE_EVERY: Duration = Duration::from_millis(50);
/// Clients: keep-alive request loops, slow downloads, upgraded sessions.
const KEEPALIVE_CLIENTS: usize = 4;
const SLOW_CLIENTS: usize = 3;
const UPGRADE_CLIENTS: usize = 3;
/// Pause between two keep-alive requests of one client (pacing, not waiting).
const KEEPALIVE_PACE: Duration = Duration::from_millis(5);
/// A slow download sends one chunk per `CHUNK_EVERY`; an upgraded session
/// exchanges one line per `CHUNK_EVERY`; either lasts 1 to 4 s, longer than
/// a churn member stays in, so most outlive their member's registration.
const CHUNK_EVERY: Duration = Duration::from_millis(200);
const CHUNK: usize = 1024;
const SESSION_STEPS: std::ops::RangeInclusive<u64> = 5..=20;
/// Any single client operation: far above loopback latency.
const OP_TIMEOUT: Duration = Duration::from_secs(10);

fn churn_secs() -> u64 {
    std::env::var("CLB_CHURN_SECS")
        .ok()
        .map(|s| {
            s.parse()
                .unwrap_or_else(|_| panic!("CLB_CHURN_SECS={s}: want whole seconds"))
        })
        .unwrap_or(30)
}

// ---------------------------------------------------------------- backends

/// A raw HTTP/1.1 backend: `/ka/ID` answers its name, `/slow/ID/N` sends N
/// chunks slowly, `/ws/ID` upgrades and echoes. Every answer carries
/// `X-Member` so the client knows which member served it. Nothing stops it:
/// every member stays reachable, so any failed request is haproxy's or clb's.
struct RawBackend {
    name: String,
    port: u16,
}

async fn raw_backend(name: &str) -> RawBackend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let member: Arc<str> = name.into();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(serve(s, member.clone()));
        }
    });
    RawBackend {
        name: name.into(),
        port,
    }
}

async fn serve(s: TcpStream, member: Arc<str>) -> std::io::Result<()> {
    let mut c = Conn::new(s);
    loop {
        let head = match c.read_head().await {
            Ok(h) => h,
            Err(_) => return Ok(()),
        };
        let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
        let parts: Vec<&str> = path.split('/').collect();
        match parts.get(1).copied() {
            Some("ws") => {
                let answer = format!(
                    "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                     Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nX-Member: {member}\r\n\r\n"
                );
                c.s.write_all(answer.as_bytes()).await?;
                // Echo until the client closes; bytes already read come first.
                let early = std::mem::take(&mut c.buf);
                c.s.write_all(&early).await?;
                let mut b = [0u8; 4096];
                loop {
                    let n = c.s.read(&mut b).await?;
                    if n == 0 {
                        return Ok(());
                    }
                    c.s.write_all(&b[..n]).await?;
                }
            }
            Some("slow") => {
                let chunks: usize = parts.get(3).and_then(|n| n.parse().ok()).unwrap_or(1);
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Member: {member}\r\n\r\n",
                    chunks * CHUNK
                );
                c.s.write_all(head.as_bytes()).await?;
                for _ in 0..chunks {
                    tokio::time::sleep(CHUNK_EVERY).await;
                    c.s.write_all(&[b'x'; CHUNK]).await?;
                }
            }
            _ => {
                let answer = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Member: {member}\r\n\r\n{member}",
                    member.len()
                );
                c.s.write_all(answer.as_bytes()).await?;
            }
        }
    }
}

// ------------------------------------------------------- a small HTTP/1.1 client

/// A TCP stream with a read buffer, for both ends of the raw protocol.
struct Conn {
    s: TcpStream,
    buf: Vec<u8>,
}

enum ReadError {
    /// The peer closed (or reset) before sending a single byte.
    ClosedEmpty,
    Other(String),
}

impl std::fmt::Display for ReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReadError::ClosedEmpty => f.write_str("closed before answering"),
            ReadError::Other(e) => f.write_str(e),
        }
    }
}

impl Conn {
    fn new(s: TcpStream) -> Conn {
        Conn { s, buf: Vec::new() }
    }

    async fn connect(port: u16) -> Result<Conn, String> {
        match tokio::time::timeout(OP_TIMEOUT, TcpStream::connect(("127.0.0.1", port))).await {
            Ok(Ok(s)) => Ok(Conn::new(s)),
            Ok(Err(e)) => Err(format!("connect: {e}")),
            Err(_) => Err("connect: timed out".into()),
        }
    }

    /// Reads up to and including the blank line; the rest stays buffered.
    async fn read_head(&mut self) -> Result<String, ReadError> {
        let mut got_any = !self.buf.is_empty();
        loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head: Vec<u8> = self.buf.drain(..i + 4).collect();
                return Ok(String::from_utf8_lossy(&head).into_owned());
            }
            let mut b = [0u8; 4096];
            let n = match tokio::time::timeout(OP_TIMEOUT, self.s.read(&mut b)).await {
                Ok(Ok(n)) => n,
                Ok(Err(_)) if !got_any => return Err(ReadError::ClosedEmpty),
                Ok(Err(e)) => return Err(ReadError::Other(format!("read head: {e}"))),
                Err(_) => return Err(ReadError::Other("read head: timed out".into())),
            };
            if n == 0 {
                return Err(if got_any {
                    ReadError::Other("closed in the middle of a head".into())
                } else {
                    ReadError::ClosedEmpty
                });
            }
            got_any = true;
            self.buf.extend_from_slice(&b[..n]);
        }
    }

    async fn read_exact(&mut self, n: usize) -> Result<Vec<u8>, String> {
        while self.buf.len() < n {
            let mut b = [0u8; 8192];
            let got = match tokio::time::timeout(OP_TIMEOUT, self.s.read(&mut b)).await {
                Ok(Ok(0)) => return Err(format!("closed after {} of {n} bytes", self.buf.len())),
                Ok(Ok(got)) => got,
                Ok(Err(e)) => return Err(format!("read body: {e}")),
                Err(_) => return Err("read body: timed out".into()),
            };
            self.buf.extend_from_slice(&b[..got]);
        }
        Ok(self.buf.drain(..n).collect())
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), String> {
        match tokio::time::timeout(OP_TIMEOUT, self.s.write_all(bytes)).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("write: {e}")),
            Err(_) => Err("write: timed out".into()),
        }
    }
}

fn header<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

fn status(head: &str) -> u16 {
    head.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

// ---------------------------------------------------------------- records

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    KeepAlive,
    Slow,
    Upgrade,
}

/// One request or session as the client saw it.
#[derive(Debug, Clone)]
struct Record {
    kind: Kind,
    start: Instant,
    end: Instant,
    member: Option<String>,
    error: Option<String>,
}

/// A keep-alive connection that haproxy closed as a request went out on it,
/// before any byte of the answer: HTTP lets a client retry that (RFC 9112
/// §9.3.1), and an old worker does it to its idle connections when a reload
/// stops it. Counted, retried once, and checked against the reload times.
#[derive(Debug, Clone)]
struct IdleClose {
    at: Instant,
}

#[derive(Default)]
struct Log {
    records: Vec<Record>,
    idle_closes: Vec<IdleClose>,
}

type Shared = Arc<Mutex<Log>>;

/// One keep-alive request on `conn` (opened if `None`). `Ok(None)` when the
/// connection was reused and closed before any answer (see [`IdleClose`]).
async fn keepalive_once(
    conn: &mut Option<(Conn, u64)>,
    port: u16,
    id: u64,
) -> Result<Option<String>, String> {
    if conn.is_none() {
        *conn = Some((Conn::connect(port).await?, 0));
    }
    let (c, served) = conn.as_mut().expect("just set");
    let reused = *served > 0;
    let req = format!("GET /ka/{id} HTTP/1.1\r\nHost: churn\r\n\r\n");
    let sent = c.send(req.as_bytes()).await;
    let head = match sent {
        Ok(()) => c.read_head().await,
        Err(_) => Err(ReadError::ClosedEmpty),
    };
    let head = match head {
        Ok(h) => h,
        Err(ReadError::ClosedEmpty) if reused => {
            *conn = None;
            return Ok(None);
        }
        Err(e) => {
            *conn = None;
            return Err(e.to_string());
        }
    };
    let len: usize = header(&head, "content-length")
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| format!("no length: {head:?}"))?;
    let body = c.read_exact(len).await?;
    if status(&head) != 200 {
        *conn = None;
        return Err(format!(
            "status {}: {}",
            status(&head),
            head.lines().next().unwrap_or("")
        ));
    }
    *served += 1;
    if header(&head, "connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
        *conn = None;
    }
    Ok(Some(String::from_utf8_lossy(&body).into_owned()))
}

async fn keepalive_client(port: u16, until: Instant, log: Shared, seed: u64) {
    let mut conn = None;
    let mut id = seed << 32;
    // Bounded in time and in count.
    for _ in 0..1_000_000 {
        if Instant::now() >= until {
            break;
        }
        id += 1;
        let start = Instant::now();
        let mut outcome = keepalive_once(&mut conn, port, id).await;
        if let Ok(None) = outcome {
            log.lock()
                .unwrap()
                .idle_closes
                .push(IdleClose { at: start });
            // Once, on a fresh connection: a second close is a failure.
            outcome = match keepalive_once(&mut conn, port, id).await {
                Ok(None) => Err("closed before an answer twice".into()),
                o => o,
            };
        }
        let (member, error) = match outcome {
            Ok(m) => (m, None),
            Err(e) => (None, Some(e)),
        };
        log.lock().unwrap().records.push(Record {
            kind: Kind::KeepAlive,
            start,
            end: Instant::now(),
            member,
            error,
        });
        tokio::time::sleep(KEEPALIVE_PACE).await;
    }
}

async fn slow_session(port: u16, id: u64, chunks: u64) -> Result<String, String> {
    let mut c = Conn::connect(port).await?;
    c.send(format!("GET /slow/{id}/{chunks} HTTP/1.1\r\nHost: churn\r\n\r\n").as_bytes())
        .await?;
    let head = c.read_head().await.map_err(|e| e.to_string())?;
    if status(&head) != 200 {
        return Err(format!("status {}", status(&head)));
    }
    let member = header(&head, "x-member").unwrap_or("?").to_string();
    let len: usize = header(&head, "content-length")
        .and_then(|v| v.parse().ok())
        .ok_or("no length")?;
    if len != chunks as usize * CHUNK {
        return Err(format!("length {len}"));
    }
    c.read_exact(len)
        .await
        .map_err(|e| format!("via {member}: {e}"))?;
    Ok(member)
}

async fn upgrade_session(port: u16, id: u64, steps: u64) -> Result<String, String> {
    let mut c = Conn::connect(port).await?;
    let req = format!(
        "GET /ws/{id} HTTP/1.1\r\nHost: churn\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    c.send(req.as_bytes()).await?;
    let head = c.read_head().await.map_err(|e| e.to_string())?;
    if status(&head) != 101 {
        return Err(format!("status {}", status(&head)));
    }
    let member = header(&head, "x-member").unwrap_or("?").to_string();
    for step in 0..steps {
        let line = format!("ping {id} {step}\n");
        c.send(line.as_bytes())
            .await
            .map_err(|e| format!("via {member}: {e}"))?;
        let echo = c
            .read_exact(line.len())
            .await
            .map_err(|e| format!("via {member}: {e}"))?;
        if echo != line.as_bytes() {
            return Err(format!("via {member}: echo {echo:?}"));
        }
        tokio::time::sleep(CHUNK_EVERY).await;
    }
    Ok(member)
}

async fn session_client(kind: Kind, port: u16, until: Instant, log: Shared, seed: u64) {
    let mut id = seed << 32;
    for _ in 0..100_000 {
        if Instant::now() >= until {
            break;
        }
        id += 1;
        let steps = *SESSION_STEPS.start() + id % (SESSION_STEPS.end() - SESSION_STEPS.start() + 1);
        let start = Instant::now();
        let outcome = match kind {
            Kind::Slow => slow_session(port, id, steps).await,
            _ => upgrade_session(port, id, steps).await,
        };
        let (member, error) = match outcome {
            Ok(m) => (Some(m), None),
            Err(e) => (None, Some(e)),
        };
        log.lock().unwrap().records.push(Record {
            kind,
            start,
            end: Instant::now(),
            member,
            error,
        });
    }
}

// ---------------------------------------------------------------- haproxy facts

/// `show proc` on the master CLI: (master pid, master reloads, current
/// worker pids, old worker pids).
#[derive(Debug, Default, Clone)]
struct Procs {
    master: u32,
    reloads: u64,
    current: Vec<u32>,
    old: Vec<u32>,
}

async fn show_proc(master: &Path) -> Option<Procs> {
    let text = exchange(master, "show proc").await.ok()?;
    let mut p = Procs::default();
    let mut old = false;
    for line in text.lines() {
        if line.starts_with('#') {
            old = line.contains("old workers");
            continue;
        }
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 3 {
            continue;
        }
        let Ok(pid) = cols[0].parse() else { continue };
        match cols[1] {
            "master" => {
                p.master = pid;
                p.reloads = cols[2].parse().unwrap_or(0);
            }
            "worker" if old => p.old.push(pid),
            "worker" => p.current.push(pid),
            _ => {}
        }
    }
    (p.master != 0).then_some(p)
}

/// A server as the file or the runtime API has it: (addr:port, weight, in maint).
type ServerView = (String, u64, bool);

/// `be_web`'s servers in the rendered file.
fn file_servers(cfg: &str) -> BTreeMap<String, ServerView> {
    let mut out = BTreeMap::new();
    let mut inside = false;
    for line in cfg.lines() {
        if !line.starts_with(' ') && !line.is_empty() {
            inside = line.trim() == "backend be_web";
            continue;
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        if inside && f.first() == Some(&"server") && f.len() >= 3 {
            let weight = f
                .iter()
                .position(|w| *w == "weight")
                .and_then(|i| f.get(i + 1)?.parse().ok())
                .unwrap_or(1);
            out.insert(
                f[1].to_string(),
                (f[2].to_string(), weight, f.contains(&"disabled")),
            );
        }
    }
    out
}

/// `be_web`'s servers in the running worker (`show servers state`).
async fn runtime_servers(admin: &Path) -> Option<BTreeMap<String, ServerView>> {
    let text = exchange(admin, "show servers state be_web").await.ok()?;
    let mut lines = text.lines();
    let header: Vec<&str> = lines
        .find(|l| l.starts_with("# be_id"))?
        .trim_start_matches('#')
        .split_whitespace()
        .collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let (name, addr, port, weight, admin_state) = (
        col("srv_name")?,
        col("srv_addr")?,
        col("srv_port")?,
        col("srv_uweight")?,
        col("srv_admin_state")?,
    );
    let mut out = BTreeMap::new();
    for l in lines.filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let f: Vec<&str> = l.split_whitespace().collect();
        let admin_bits: u64 = f.get(admin_state)?.parse().ok()?;
        out.insert(
            f.get(name)?.to_string(),
            (
                format!("{}:{}", f.get(addr)?, f.get(port)?),
                f.get(weight)?.parse().ok()?,
                // SRV_ADMF_FMAINT: forced maintenance, what `disabled` sets.
                admin_bits & 1 == 1,
            ),
        );
    }
    Some(out)
}

// ---------------------------------------------------------------- the test

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_survives_member_churn_under_long_lived_traffic() {
    let secs = churn_secs();
    assert!(secs >= 10, "CLB_CHURN_SECS={secs}: at least 10");
    let reload_every = match std::env::var("CLB_CHURN_RELOAD_SECS") {
        Ok(r) => Duration::from_secs(r.parse().expect("CLB_CHURN_RELOAD_SECS: whole seconds")),
        Err(_) => Duration::from_secs((secs / 3).clamp(1, 30)),
    };
    let run = Duration::from_secs(secs);

    let b = Balancer::start(&[]).await;
    let client = b.client();
    let port = free_port();
    client
        .define_service(
            "web",
            // Health checks too: `del server` must stop a dynamic server's check task.
            &ServiceBody {
                port: port.into(),
                mode: Some(Mode::Http),
                check: Some(Check::Tcp),
                server: Some(ServerOptions {
                    check_inter_ms: Some(200),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let hlog = b.cluster.dir.path().join("haproxy.log");
    // Cores on: a worker that dies must show where (see `is_haproxy_2114`).
    let mut haproxy = b.start_haproxy_logged(&hlog, true).await;
    let _keep = KeepLogs {
        to: std::env::var_os("CLB_CHURN_LOGS").map(Into::into),
        haproxy_log: hlog.clone(),
        clbd_log: b.node().log.clone(),
    };
    let hdir = hlog.parent().unwrap().to_path_buf();
    let cores = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let mut stable = Vec::new();
    for i in 0..STABLE {
        let be = raw_backend(&format!("stable{i}")).await;
        client
            .register("web", &be.name, "127.0.0.1", Some(be.port), None, None)
            .await
            .unwrap();
        stable.push(be);
    }
    let mut churn = Vec::new();
    for i in 0..CHURN {
        churn.push(raw_backend(&format!("churn{i:02}")).await);
    }
    let churn = Arc::new(churn);
    let status0 = b.applied().await;
    let reloads0 = status0.reloads;
    let procs0 = eventually(Duration::from_secs(10), "haproxy's master CLI", || {
        show_proc(&b.master)
    })
    .await;
    assert_eq!(procs0.master, haproxy.pid(), "the master we started");

    let t0 = Instant::now();
    let until = t0 + run;
    let log: Shared = Arc::default();
    let mut clients = Vec::new();
    for i in 0..KEEPALIVE_CLIENTS {
        clients.push(tokio::spawn(keepalive_client(
            port,
            until,
            log.clone(),
            i as u64,
        )));
    }
    for i in 0..SLOW_CLIENTS {
        let seed = 100 + i as u64;
        clients.push(tokio::spawn(session_client(
            Kind::Slow,
            port,
            until,
            log.clone(),
            seed,
        )));
    }
    for i in 0..UPGRADE_CLIENTS {
        let seed = 200 + i as u64;
        clients.push(tokio::spawn(session_client(
            Kind::Upgrade,
            port,
            until,
            log.clone(),
            seed,
        )));
    }

    // Churn: one change every CHANGE_EVERY, members in turn. A member's next
    // change waits for its previous one, so the order per member holds even
    // when a write is slow.
    let churn_task = {
        let (client, churn) = (client.clone(), churn.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(CHANGE_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut pending: Vec<Option<tokio::task::JoinHandle<Result<Instant, String>>>> =
                (0..CHURN).map(|_| None).collect();
            let mut is_in = [false; CHURN];
            // (member, registered?, when the write was acknowledged)
            let mut events: Vec<(usize, bool, Instant)> = Vec::new();
            let mut errors = Vec::new();
            let max_changes = run.as_millis() / CHANGE_EVERY.as_millis() + 1;
            for n in 0..max_changes as usize {
                tick.tick().await;
                if Instant::now() >= until {
                    break;
                }
                let k = n % CHURN;
                if let Some(h) = pending[k].take() {
                    match h.await.unwrap() {
                        Ok(at) => events.push((k, is_in[k], at)),
                        Err(e) => errors.push(e),
                    }
                }
                is_in[k] = !is_in[k];
                let (client, be, register) = (client.clone(), &churn[k], is_in[k]);
                let (name, bport) = (be.name.clone(), be.port);
                pending[k] = Some(tokio::spawn(async move {
                    let r = if register {
                        client
                            .register("web", &name, "127.0.0.1", Some(bport), None, None)
                            .await
                    } else {
                        client.unregister("web", &name).await
                    };
                    r.map(|_| Instant::now())
                        .map_err(|e| format!("{name} register={register}: {e}"))
                }));
            }
            for (k, h) in pending.into_iter().enumerate() {
                if let Some(h) = h {
                    match h.await.unwrap() {
                        Ok(at) => events.push((k, is_in[k], at)),
                        Err(e) => errors.push(e),
                    }
                }
            }
            (events, errors)
        })
    };

    // Structural changes: a new service, hence a reload, every reload_every.
    let reload_task = {
        let client = client.clone();
        let node = b.node().client();
        tokio::spawn(async move {
            let mut windows = Vec::new();
            let mut n = 0u64;
            while t0.elapsed() + reload_every < run && n < 100 {
                tokio::time::sleep_until((t0 + reload_every * (n as u32 + 1)).into()).await;
                let view = node.cluster().await.unwrap();
                let before = view
                    .node(1)
                    .and_then(|n| n.render.as_ref())
                    .expect("node 1's render status")
                    .reloads;
                let start = Instant::now();
                client
                    .define_service(
                        &format!("extra{n}"),
                        &ServiceBody {
                            port: free_port().into(),
                            check: Some(Check::Tcp),
                            ..Default::default()
                        },
                    )
                    .await
                    .unwrap();
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    let v = node.cluster().await.ok();
                    let r = v.and_then(|v| v.node(1)?.render.clone());
                    if r.as_ref().map(|r| r.reloads) > Some(before) {
                        break;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "no reload 30 s after defining extra{n}; render status: {r:?}"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                windows.push((start, Instant::now()));
                n += 1;
            }
            windows
        })
    };

    // Every worker pid haproxy's master reports over the run.
    let watch_task = {
        let (master, hdir, cores) = (b.master.clone(), hdir.clone(), cores.clone());
        tokio::spawn(async move {
            let mut seen = BTreeSet::new();
            let mut masters = BTreeSet::new();
            for _ in 0..10_000 {
                if Instant::now() >= until {
                    break;
                }
                if let Some(p) = show_proc(&master).await {
                    masters.insert(p.master);
                    seen.extend(p.current.iter().chain(&p.old));
                }
                keep_core(&hdir, &cores);
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            (seen, masters)
        })
    };

    let (events, churn_errors) = churn_task.await.unwrap();
    let reload_windows = reload_task.await.unwrap();
    let (mut worker_pids, masters) = watch_task.await.unwrap();
    for c in clients {
        c.await.unwrap();
    }
    let elapsed = t0.elapsed();
    assert!(
        churn_errors.is_empty(),
        "churn writes failed: {churn_errors:?}"
    );

    // The file and the running worker agree, but for removed members, which
    // the worker keeps in maint (retired, never deleted) until a reload.
    let status = b.applied().await;
    let cfg = b.cfg.clone();
    let (file, runtime) = eventually(
        Duration::from_secs(20),
        "the runtime servers to match the file",
        || async {
            let file = file_servers(&std::fs::read_to_string(&cfg).ok()?);
            let mut runtime = runtime_servers(&b.admin).await?;
            let retired: Vec<String> = runtime
                .iter()
                .filter(|(name, (_, _, maint))| *maint && !file.contains_key(*name))
                .map(|(name, _)| name.clone())
                .collect();
            for name in retired {
                runtime.remove(&name);
            }
            (file == runtime).then_some((file, runtime))
        },
    )
    .await;
    assert_eq!(file, runtime);

    // haproxy's side: its master, its workers, how each worker left.
    let master_alive = haproxy.child.try_wait().unwrap().is_none();
    let procs = eventually(Duration::from_secs(30), "old workers to finish", || async {
        keep_core(&hdir, &cores);
        let p = show_proc(&b.master).await?;
        p.old.is_empty().then_some(p)
    })
    .await;
    keep_core(&hdir, &cores);
    worker_pids.extend(&procs.current);
    let exe = std::fs::read_link(format!("/proc/{}/exe", haproxy.pid())).unwrap();
    let backtraces = core_backtraces(&hdir, &exe);
    let htext = std::fs::read_to_string(&hlog).unwrap();
    let exits: Vec<&str> = htext
        .lines()
        .filter(|l| l.contains("exited with code"))
        .collect();
    // Requests: none failed. An idle keep-alive connection closed by an old
    // worker as a request went out is retried once, and only near a reload.
    let log = log.lock().unwrap();
    let failed: Vec<&Record> = log.records.iter().filter(|r| r.error.is_some()).collect();
    let by_kind = |k: Kind| log.records.iter().filter(|r| r.kind == k).count();
    let near_reload = |at: Instant| {
        reload_windows.iter().any(|(s, e)| {
            at + Duration::from_millis(100) >= *s && at <= *e + Duration::from_secs(2)
        })
    };
    let stray: Vec<Duration> = log
        .idle_closes
        .iter()
        .filter(|c| !near_reload(c.at))
        .map(|c| c.at - t0)
        .collect();

    // Sessions that were open when their member was unregistered, and so
    // lived through its drain and removal.
    let removed_under: Vec<&Record> = log
        .records
        .iter()
        .filter(|r| r.kind != Kind::KeepAlive && r.error.is_none())
        .filter(|r| {
            let k = churn
                .iter()
                .position(|be| Some(&be.name) == r.member.as_ref());
            k.is_some_and(|k| {
                events
                    .iter()
                    .any(|(m, reg, at)| *m == k && !reg && *at > r.start && *at < r.end)
            })
        })
        .collect();
    let answered: BTreeSet<&str> = log
        .records
        .iter()
        .filter(|r| r.kind == Kind::KeepAlive)
        .filter_map(|r| r.member.as_deref())
        .collect();

    // Removals that found a long-lived session open on their member: the
    // ones that may wait for it (a keep-alive request in flight may hold one
    // for a few milliseconds too).
    let removals = events.iter().filter(|(_, reg, _)| !reg).count();
    let removals_held = events
        .iter()
        .filter(|(k, reg, at)| {
            !reg && log.records.iter().any(|r| {
                r.kind != Kind::KeepAlive
                    && r.member.as_deref() == Some(churn[*k].name.as_str())
                    && r.start < *at
                    && *at < r.end
            })
        })
        .count();

    // What clbd did: every removal out of rotation at once (drain, maint;
    // never `del server`), members taking back their retired server, and
    // anything that fell back to a reload.
    let clbd = b.node().log_text();
    let count = |needle: &str| clbd.lines().filter(|l| l.contains(needle)).count();
    let retired = count("removed from rotation; its open sessions finish");
    let taken_back = count("its retired server is back in service");
    let alerts = htext
        .lines()
        .filter(|l| l.starts_with("<0>") || l.starts_with("<1>") || l.starts_with("<2>"))
        .count();
    let down_notices = htext
        .lines()
        .filter(|l| l.starts_with("<5>") && l.contains("going DOWN for maintenance"))
        .count();
    eprintln!(
        "churn: {:.0} s, {} changes ({:.1}/s, {removals} removals, {removals_held} with a long \
         session open), {} reloads (longest {:?} from the new service to the reload); requests: {} keep-alive, {} slow, {} upgraded, {} failed, \
         {} idle closes retried ({} away from a reload); {} sessions outlived their member's \
         removal; clbd: {retired} removed from rotation at once, {taken_back} retired servers \
         taken back by a new registration, {} runtime fallbacks to reload; haproxy: {} workers \
         ({} exit lines not \"code 0\"), {alerts} alert lines, {down_notices} 'going DOWN for maintenance' at notice",
        elapsed.as_secs_f64(),
        events.len(),
        events.len() as f64 / run.as_secs_f64(),
        reload_windows.len(),
        reload_windows.iter().map(|(s, e)| *e - *s).max().unwrap_or_default(),
        by_kind(Kind::KeepAlive),
        by_kind(Kind::Slow),
        by_kind(Kind::Upgrade),
        failed.len(),
        log.idle_closes.len(),
        stray.len(),
        removed_under.len(),
        count("reloading instead"),
        worker_pids.len(),
        exits.iter().filter(|l| !l.contains("code 0 (Exit)")).count(),
    );

    // haproxy: the same master throughout, and every worker that left did so
    // with status 0 (an old worker after its last session).
    assert!(master_alive, "the haproxy master exited");
    assert_eq!(
        procs.master,
        haproxy.pid(),
        "the haproxy master was replaced"
    );
    assert_eq!(
        masters.into_iter().collect::<Vec<_>>(),
        vec![haproxy.pid()],
        "one master all along"
    );
    assert!(
        !exits.iter().any(|l| l.contains("Current worker")),
        "a serving worker died: {exits:?}"
    );
    for pid in worker_pids.iter().filter(|p| !procs.current.contains(p)) {
        let line = exits
            .iter()
            .find(|l| l.contains(&format!("Former worker ({pid}) exited")))
            .unwrap_or_else(|| panic!("worker {pid} never exited: {exits:?}"));
        if line.contains("code 0 (Exit)") {
            continue;
        }
        let bt = backtraces.get(pid).map(String::as_str).unwrap_or("no core");
        // A former worker that served everything and crashed in haproxy's
        // own exit path is Debian's haproxy, not clb (seen once in CI in a
        // run without `del server`): said, not failed. Anything else fails.
        assert!(
            is_haproxy_2114(bt),
            "worker {pid} died (not a known crash): {line}\nits core:\n{bt}"
        );
        eprintln!("former worker {pid} crashed at exit (haproxy#2114, Debian's 2.6.12): {line}");
    }
    assert!(
        worker_pids.len() as u64 > reload_windows.len() as u64,
        "each reload started a worker: {worker_pids:?}"
    );

    assert!(
        failed.is_empty(),
        "{} requests failed, first: {:?}",
        failed.len(),
        failed.iter().take(5).collect::<Vec<_>>()
    );
    assert!(
        stray.is_empty(),
        "idle connections closed away from a reload at {stray:?}"
    );
    assert!(
        events.len() as f64 >= 0.8 * run.as_secs_f64() * 1_000.0 / CHANGE_EVERY.as_millis() as f64,
        "the churn kept its pace: {} changes in {run:?}",
        events.len()
    );
    for be in stable.iter().chain(churn.iter()) {
        assert!(
            answered.contains(be.name.as_str()),
            "{} never answered",
            be.name
        );
    }
    assert!(
        removed_under.len() >= 5,
        "few sessions spanned a removal: {}",
        removed_under.len()
    );
    assert_eq!(
        status.reloads - reloads0,
        reload_windows.len() as u64,
        "only structural changes reloaded"
    );
    assert_eq!(
        count("reloading instead"),
        0,
        "a runtime change fell back to a reload"
    );
    assert_eq!(alerts, 0, "haproxy logged at alert level:\n{htext}");
    assert!(down_notices >= removals / 2, "removals log at notice level");
    // Every removal that reached haproxy took its server out of rotation at
    // once: at least one per churn cycle a member was out for.
    assert!(
        retired + taken_back > 0 && retired <= removals,
        "{retired} removals retired for {removals} unregistrations"
    );
}

/// Renames a core haproxy left in `dir` (the kernel's core_pattern `core`
/// here) to `core.N`, so the next crash does not overwrite it.
fn keep_core(dir: &Path, n: &std::sync::atomic::AtomicU32) {
    let core = dir.join("core");
    if core.exists() {
        let i = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let _ = std::fs::rename(&core, dir.join(format!("core.{i}")));
    }
}

/// The backtrace in each core in `dir`, by the pid of the process that
/// dumped it (its main thread's LWP), read with gdb.
fn core_backtraces(dir: &Path, exe: &Path) -> BTreeMap<u32, String> {
    let mut out = BTreeMap::new();
    for f in std::fs::read_dir(dir).unwrap().flatten() {
        if !f.file_name().to_string_lossy().starts_with("core.") {
            continue;
        }
        let Ok(o) = std::process::Command::new("gdb")
            .args(["-batch", "-ex", "bt 20", "-ex", "info threads"])
            .arg(exe)
            .arg(f.path())
            .output()
        else {
            continue;
        };
        let text = String::from_utf8_lossy(&o.stdout).into_owned();
        let pid = text
            .split("(LWP ")
            .skip(1)
            .filter_map(|t| t.split(')').next()?.parse::<u32>().ok())
            .min();
        if let Some(pid) = pid {
            out.insert(pid, text);
        }
    }
    out
}

/// Debian 12's haproxy 2.6.12 crashes now and then as a worker exits, after
/// its last connection: `deinit` unbinds a listener and `_fd_delete_orphan`
/// touches the poller's update list its threads already freed (haproxy#2114,
/// fixed in 2.6.14; runtime server deletion seems to make it likelier, see
/// docs/benchmarks.md, though a run without it hit it too). Such a worker
/// served all it had; any other death fails the test.
fn is_haproxy_2114(backtrace: &str) -> bool {
    backtrace.contains("_fd_delete_orphan") && backtrace.contains("deinit")
}

/// Copies haproxy's stderr, clbd's log and any core to `CLB_CHURN_LOGS`
/// when the test ends, passed or failed.
struct KeepLogs {
    to: Option<std::path::PathBuf>,
    haproxy_log: std::path::PathBuf,
    clbd_log: std::path::PathBuf,
}

impl Drop for KeepLogs {
    fn drop(&mut self) {
        let Some(to) = &self.to else { return };
        let _ = std::fs::create_dir_all(to);
        let _ = std::fs::copy(&self.haproxy_log, to.join("haproxy.log"));
        let _ = std::fs::copy(&self.clbd_log, to.join("clbd.log"));
        let Some(dir) = self.haproxy_log.parent() else {
            return;
        };
        for f in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if f.file_name().to_string_lossy().starts_with("core") {
                let _ = std::fs::copy(f.path(), to.join(f.file_name()));
            }
        }
    }
}
