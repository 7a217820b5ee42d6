//! Chaos: clients register, unregister and read through random nodes while
//! nodes are SIGKILLed and restarted, SIGSTOPped and continued and, where
//! network namespaces are available (root), cut off from all peers or from
//! one peer (each node then runs in its own namespace on a bridge, the
//! clients in another). Afterwards:
//! acknowledged writes survived, the history is linearizable, the nodes
//! converge and render identical configs, and the VIP never had two holders.
//!
//! `CLB_CHAOS_SEED=N` replays a run's random choices (timing still differs);
//! `CLB_CHAOS_DURATION_S` lengthens the fault phase (default 60 s).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clb::views::{
    ErrorBody, ErrorDetail, OneServiceView, RegisterBody, ServiceBody, ServiceView, ServicesView,
    Written,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::Method;

use crate::harness::{eventually, ClusterExt, NodeExt, TOKEN};
use crate::linearizability::{self as lin, Entry, Op, Outcome};
use lab::netns::{self, Host, Lab};
use lab::{
    free_port, hook_events, now_ns, peer_addr_for, vip_hook, Cluster, HookEvent, FAST_TIMERS,
};

const SERVICE: &str = "http";
const KEYS: usize = 8;
const CLIENTS: usize = 6;
/// History bounds that keep the checker fast: at most this many writes per
/// member and reads overall (each read is in every member's history).
const WRITES_PER_KEY: usize = 250;
const READS: usize = 100;
/// The hook only logs; nothing touches an interface.
const VIP: &str = "127.0.0.77";
/// Below election-timeout-min (300 ms) with a margin for a slow machine.
const LEASE_MS: &str = "150";
const REQUEST_TIMEOUT: Duration = Duration::from_secs(20);
/// A stopped holder, continued after its lease ran out, must release within
/// this long; until then another node's newer claim is expected.
const RESUME_GRACE_NS: u128 = 3_000_000_000;

#[derive(Debug, Clone)]
enum Kind {
    Put(u32),
    Del,
    Read,
}

#[derive(Debug, Clone)]
enum Answer {
    Ok {
        index: u64,
    },
    NotFound,
    /// May or may not have taken effect.
    Unknown(String),
    /// Certainly did not take effect: never sent, or a retryable refusal.
    NotApplied(String),
    /// A read's answer: member → port.
    Read {
        index: u64,
        members: BTreeMap<String, u32>,
    },
    /// An answer the API must never give here; fails the test.
    Unexpected(String),
}

#[derive(Debug, Clone)]
struct Record {
    id: usize,
    client: usize,
    node: u64,
    key: Option<usize>,
    kind: Kind,
    /// Monotonic nanoseconds since the start of the run.
    call: u64,
    ret: u64,
    result: Answer,
}

impl Record {
    fn line(&self) -> String {
        let what = match (&self.kind, self.key) {
            (Kind::Put(v), Some(k)) => format!("put k{k}={v}"),
            (Kind::Del, Some(k)) => format!("del k{k}"),
            _ => "read".to_string(),
        };
        let result = match &self.result {
            Answer::Ok { index } => format!("ok i={index}"),
            Answer::NotFound => "404".into(),
            Answer::Unknown(why) => format!("UNKNOWN ({})", short(why)),
            Answer::NotApplied(why) => format!("not applied ({})", short(why)),
            Answer::Read { index, members } => format!(
                "i={index} {{{}}}",
                members
                    .iter()
                    .map(|(m, p)| format!("{m}={p}"))
                    .collect::<Vec<_>>()
                    .join(",")
            ),
            Answer::Unexpected(why) => format!("UNEXPECTED ({why})"),
        };
        format!(
            "#{:<5} c{}@n{} {:>9.3}-{:>9.3} {what:<13} {result}",
            self.id,
            self.client,
            self.node,
            self.call as f64 / 1e9,
            self.ret as f64 / 1e9,
        )
    }
}

fn short(s: &str) -> String {
    s.chars().take(80).collect()
}

/// A fault the harness injected, for the report and the VIP check.
#[derive(Debug, Clone)]
struct Fault {
    mono: u64,
    wall: u128,
    node: u64,
    what: &'static str,
}

/// Budget of operations left, shared by the clients.
struct Budget {
    writes: Vec<AtomicUsize>,
    reads: AtomicUsize,
}

impl Budget {
    fn take(counter: &AtomicUsize, limit: usize) -> bool {
        counter
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .is_ok()
    }
}

/// What one client needs; the fault loop owns the cluster.
struct Shared {
    addrs: BTreeMap<u64, String>,
    http: reqwest::Client,
    t0: Instant,
    stop: AtomicBool,
    budget: Budget,
    next_id: AtomicUsize,
    next_value: AtomicU32,
    history: Mutex<Vec<Record>>,
    /// Mean pause between one client's operations.
    pace: Duration,
}

impl Shared {
    fn mono(&self) -> u64 {
        self.t0.elapsed().as_nanos() as u64
    }
}

enum Reply {
    /// The status and the text of the body.
    Status(u16, String),
    NotSent(String),
    Lost(String),
}

async fn send(
    http: &reqwest::Client,
    addr: &str,
    method: Method,
    path: &str,
    body: Option<RegisterBody>,
) -> Reply {
    let mut req = http
        .request(method, format!("http://{addr}{path}"))
        .bearer_auth(TOKEN);
    if let Some(b) = body {
        req = req.json(&b);
    }
    match req.send().await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            match resp.text().await {
                Ok(text) => Reply::Status(status, text),
                Err(e) => Reply::Lost(format!("{status}, body lost: {e}")),
            }
        }
        // A refused connection carried nothing: the request never ran.
        Err(e) if e.is_connect() => Reply::NotSent(e.to_string()),
        Err(e) => Reply::Lost(e.to_string()),
    }
}

fn classify_write(reply: Reply, is_del: bool) -> Answer {
    match reply {
        Reply::NotSent(why) => Answer::NotApplied(why),
        Reply::Lost(why) => Answer::Unknown(why),
        Reply::Status(200, text) => match serde_json::from_str::<Written>(&text) {
            Ok(w) => Answer::Ok { index: w.index },
            Err(_) => Answer::Unexpected(format!("200 without index: {text}")),
        },
        Reply::Status(404, _) if is_del => Answer::NotFound,
        Reply::Status(503, text) => {
            let e = error_of(&text);
            match e.detail {
                Some(ErrorDetail::Situation {
                    retryable: false, ..
                }) => Answer::Unknown(e.error),
                _ => Answer::NotApplied(e.error),
            }
        }
        // The guardrail refuses before proposing; --guardrail-share 1 should
        // make this impossible, and it writes nothing either way.
        Reply::Status(409, text) => Answer::NotApplied(format!("409 {}", error_of(&text).error)),
        // The server's request timeout fired: the write may still commit.
        Reply::Status(408, text) => Answer::Unknown(format!("408 {}", error_of(&text).error)),
        Reply::Status(s, text) => Answer::Unexpected(format!("{s} {text}")),
    }
}

/// The error of a 4xx or 5xx answer; its whole text when it is not one.
fn error_of(text: &str) -> ErrorBody {
    serde_json::from_str(text).unwrap_or_else(|_| ErrorBody {
        error: text.to_string(),
        detail: None,
    })
}

fn members_of(definition: &ServiceView) -> BTreeMap<String, u32> {
    definition
        .members
        .iter()
        .map(|(name, m)| (name.clone(), u32::from(m.port)))
        .collect()
}

fn classify_read(reply: Reply) -> Answer {
    match reply {
        Reply::NotSent(why) | Reply::Lost(why) => Answer::NotApplied(why),
        Reply::Status(200, text) => match serde_json::from_str::<OneServiceView>(&text) {
            Ok(v) => Answer::Read {
                index: v.index,
                members: members_of(&v.definition),
            },
            Err(_) => Answer::Unexpected(format!("bad read answer: {text}")),
        },
        Reply::Status(503 | 408, text) => Answer::NotApplied(error_of(&text).error),
        Reply::Status(s, text) => Answer::Unexpected(format!("{s} {text}")),
    }
}

/// One consistent read of the service through `node`, recorded.
async fn read(shared: &Shared, client: usize, node: u64) -> Record {
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let call = shared.mono();
    let reply = send(
        &shared.http,
        &shared.addrs[&node],
        Method::GET,
        &format!("/v1/services/{SERVICE}?consistent=true"),
        None,
    )
    .await;
    let result = classify_read(reply);
    Record {
        id,
        client,
        node,
        key: None,
        kind: Kind::Read,
        call,
        ret: shared.mono(),
        result,
    }
}

async fn client_loop(shared: Arc<Shared>, client: usize, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed ^ (0x9e37_79b9 * (client as u64 + 1)));
    let nodes: Vec<u64> = shared.addrs.keys().copied().collect();
    while !shared.stop.load(Ordering::Relaxed) {
        let pause = shared.pace.mul_f64(rng.gen_range(0.0..2.0));
        tokio::time::sleep(pause).await;
        if shared.stop.load(Ordering::Relaxed) {
            break;
        }
        let node = nodes[rng.gen_range(0..nodes.len())];
        let record = if rng.gen_bool(0.12) && Budget::take(&shared.budget.reads, READS) {
            read(&shared, client, node).await
        } else {
            let open: Vec<usize> = (0..KEYS)
                .filter(|&k| shared.budget.writes[k].load(Ordering::Relaxed) < WRITES_PER_KEY)
                .collect();
            if open.is_empty() {
                if shared.budget.reads.load(Ordering::Relaxed) >= READS {
                    break;
                }
                continue;
            }
            let key = open[rng.gen_range(0..open.len())];
            if !Budget::take(&shared.budget.writes[key], WRITES_PER_KEY) {
                continue;
            }
            let path = format!("/v1/services/{SERVICE}/members/k{key}");
            let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
            let (kind, method, body) = if rng.gen_bool(0.55) {
                // A unique value per register tells which write a read saw.
                let v = shared.next_value.fetch_add(1, Ordering::Relaxed);
                let body = RegisterBody {
                    address: "10.0.0.1".into(),
                    port: Some(v),
                    ..Default::default()
                };
                (Kind::Put(v), Method::PUT, Some(body))
            } else {
                (Kind::Del, Method::DELETE, None)
            };
            let is_del = matches!(kind, Kind::Del);
            let call = shared.mono();
            let reply = send(&shared.http, &shared.addrs[&node], method, &path, body).await;
            Record {
                id,
                client,
                node,
                key: Some(key),
                kind,
                call,
                ret: shared.mono(),
                result: classify_write(reply, is_del),
            }
        };
        shared.history.lock().expect("history").push(record);
    }
}

/// The fault loop: one fault at a time, each undone before the next, until
/// `until`; every node is running when it returns.
async fn faults(
    c: &mut Cluster,
    net: Option<&Net>,
    rng: &mut StdRng,
    t0: Instant,
    until: Instant,
) -> Vec<Fault> {
    let mut log = Vec::new();
    let record = |log: &mut Vec<Fault>, node: u64, what: &'static str| {
        log.push(Fault {
            mono: t0.elapsed().as_nanos() as u64,
            wall: now_ns(),
            node,
            what,
        })
    };
    let ids: Vec<u64> = c.nodes.keys().copied().collect();
    // Bounded in count as well as time.
    for _ in 0..1_000 {
        tokio::time::sleep(Duration::from_millis(rng.gen_range(200..1_500))).await;
        if Instant::now() >= until {
            break;
        }
        // A leader everyone agrees on before each fault: a majority is up.
        let leader = c.leader(Duration::from_secs(30)).await;
        let target = if rng.gen_bool(0.4) {
            leader
        } else {
            ids[rng.gen_range(0..ids.len())]
        };
        // Long enough, sometimes, for an election (timeout 300–600 ms).
        let down = Duration::from_millis(rng.gen_range(100..2_000));
        let kinds = if net.is_some() { 4 } else { 2 };
        match rng.gen_range(0..kinds) {
            0 => {
                record(&mut log, target, "kill");
                c.node_mut(target).kill();
                tokio::time::sleep(down).await;
                record(&mut log, target, "spawn");
                match net {
                    // A child starts in the spawning thread's namespace.
                    Some(net) => netns::in_ns(&net.hosts[&target].ns, || {
                        c.node_mut(target).spawn();
                    })
                    .expect("spawn in the node's namespace"),
                    None => c.node_mut(target).spawn(),
                }
                let node = c.node(target);
                eventually(
                    Duration::from_secs(30),
                    "restarted node healthy",
                    || async { node.healthy().await.then_some(()) },
                )
                .await;
            }
            1 => {
                record(&mut log, target, "stop");
                c.node(target).signal(libc::SIGSTOP);
                tokio::time::sleep(down).await;
                record(&mut log, target, "cont");
                c.node(target).signal(libc::SIGCONT);
            }
            2 => {
                let net = net.expect("partitions need the namespace lab");
                let host = &net.hosts[&target];
                record(&mut log, target, "cut");
                net.lab.isolate(host).expect("cut the link");
                tokio::time::sleep(down).await;
                record(&mut log, target, "heal");
                net.lab.recover().expect("restore the link");
            }
            _ => {
                // Target and one other node lose each other; both still
                // reach the third (the classic partial partition).
                let net = net.expect("partitions need the namespace lab");
                let other = *ids
                    .iter()
                    .filter(|&&id| id != target)
                    .nth(rng.gen_range(0..ids.len() - 1))
                    .expect("another node");
                record(&mut log, target, "split");
                let (a, b) = (&net.hosts[&target], &net.hosts[&other]);
                net.lab.partition(&[&[a], &[b]]).expect("split two nodes");
                tokio::time::sleep(down).await;
                record(&mut log, target, "heal");
                net.lab.recover().expect("rejoin two nodes");
            }
        }
    }
    log
}

/// The namespace lab the nodes run in: one host per node, one for clients.
struct Net {
    lab: Lab,
    hosts: BTreeMap<u64, Host>,
    client: Host,
}

/// Clients of the namespaced cluster reach the nodes at this port.
const NS_PORT: u16 = 7000;

impl Net {
    /// Three node hosts and a client host, or `None` (with the reason
    /// printed) where namespaces cannot be made: not root, no `ip netns`.
    fn create() -> Option<Net> {
        // SAFETY: geteuid(2) has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("chaos: not root, running without partitions");
            return None;
        }
        let made = (|| -> anyhow::Result<Net> {
            let mut lab = Lab::new("cx", [10, 77, 9])?;
            let mut hosts = BTreeMap::new();
            for id in 1..=3u64 {
                hosts.insert(id, lab.add_host(&format!("n{id}"), 10 + id as u8)?);
            }
            let client = lab.add_host("cl", 100)?;
            Ok(Net { lab, hosts, client })
        })();
        match made {
            Ok(net) => Some(net),
            Err(e) => {
                eprintln!("chaos: no network namespaces ({e:#}), running without partitions");
                None
            }
        }
    }

    fn addr(&self, id: u64) -> String {
        format!("{}:{NS_PORT}", self.hosts[&id].ip)
    }
}

/// Per member: the projection of every operation onto it, for the checker.
/// Reads see all members at once; checking each member's projection alone is
/// sound because the members are independent registers (no operation's
/// effect on one depends on another): a linearization of the whole history
/// projects to one of each member's history, so a member without one is a
/// real violation. (The converse does not hold: a read mixing members from
/// different moments would pass; per-member checking misses only that.)
fn projections(history: &[Record]) -> Vec<Vec<Entry>> {
    let mut per_key = vec![Vec::new(); KEYS];
    for r in history {
        let outcome = match &r.result {
            Answer::Ok { .. } | Answer::Read { .. } => Outcome::Ok,
            Answer::NotFound => Outcome::NotFound,
            Answer::Unknown(_) => Outcome::Unknown,
            Answer::NotApplied(_) | Answer::Unexpected(_) => continue,
        };
        let entry = |op| Entry {
            id: r.id,
            op,
            outcome,
            call: r.call,
            ret: r.ret,
        };
        match (&r.kind, r.key, &r.result) {
            (Kind::Put(v), Some(k), _) => per_key[k].push(entry(Op::Put(*v))),
            (Kind::Del, Some(k), _) => per_key[k].push(entry(Op::Del)),
            (Kind::Read, _, Answer::Read { members, .. }) => {
                for (k, list) in per_key.iter_mut().enumerate() {
                    list.push(entry(Op::Read(members.get(&format!("k{k}")).copied())));
                }
            }
            _ => {}
        }
    }
    per_key
}

/// Check 1: each member's final state is the effect of a write no
/// acknowledged operation on it started after (or the initial absence).
fn final_state_explained(history: &[Record], key: usize, fin: Option<u32>) -> Result<(), String> {
    let ops: Vec<&Record> = history.iter().filter(|r| r.key == Some(key)).collect();
    let acked = |r: &Record| matches!(r.result, Answer::Ok { .. } | Answer::NotFound);
    let superseded = |x: Option<&Record>| {
        let done = x.map_or(0, |x| if acked(x) { x.ret } else { u64::MAX });
        ops.iter()
            .any(|w| acked(w) && x.is_none_or(|x| x.id != w.id) && w.call > done)
    };
    let candidates: Vec<Option<&Record>> = match fin {
        Some(v) => ops
            .iter()
            .filter(|r| matches!(r.kind, Kind::Put(p) if p == v))
            .filter(|r| matches!(r.result, Answer::Ok { .. } | Answer::Unknown(_)))
            .map(|r| Some(*r))
            .collect(),
        None => std::iter::once(None)
            .chain(
                ops.iter()
                    .filter(|r| matches!(r.kind, Kind::Del))
                    .filter(|r| !matches!(r.result, Answer::NotApplied(_)))
                    .map(|r| Some(*r)),
            )
            .collect(),
    };
    if candidates.iter().any(|x| !superseded(*x)) {
        return Ok(());
    }
    Err(format!(
        "k{key} ends as {fin:?}, which no write explains that is not superseded by a later acknowledged one"
    ))
}

/// Check 2b: log indexes follow real time. A write acknowledged before
/// another operation started has a smaller index than that write, and no
/// larger one than the applied index such a read reports.
fn indexes_follow_real_time(history: &[Record]) -> Vec<String> {
    let indexed: Vec<(&Record, u64, bool)> = history
        .iter()
        .filter_map(|r| match r.result {
            Answer::Ok { index } => Some((r, index, true)),
            Answer::Read { index, .. } => Some((r, index, false)),
            _ => None,
        })
        .collect();
    let mut by_ret: Vec<&(&Record, u64, bool)> = indexed.iter().collect();
    by_ret.sort_by_key(|(r, ..)| r.ret);
    let mut by_call: Vec<&(&Record, u64, bool)> = indexed.iter().collect();
    by_call.sort_by_key(|(r, ..)| r.call);
    let mut problems = Vec::new();
    let mut done = 0;
    let mut max: Option<(u64, usize)> = None;
    for (r, index, is_write) in by_call {
        while done < by_ret.len() && by_ret[done].0.ret < r.call {
            let (d, di, _) = by_ret[done];
            if max.is_none_or(|(m, _)| *di > m) {
                max = Some((*di, d.id));
            }
            done += 1;
        }
        if let Some((m, before)) = max {
            if *index < m || (*is_write && *index == m) {
                problems.push(format!(
                    "#{} has index {index}, but #{before} (index {m}) completed before it started",
                    r.id
                ));
            }
        }
    }
    problems
}

/// Check 4: intervals during which each node held the VIP, from the hook
/// log and the faults, and no two nodes' intervals overlap.
///
/// A SIGKILLed node cannot run its release hook, so its interval ends at the
/// kill; the lease makes that right: it stopped being entitled to the VIP
/// one lease after its last quorum ack, before any successor could be
/// elected (with a real VIP the successor's claim takes the address over).
/// A SIGSTOPped node likewise cannot act: its interval is cut at the stop.
/// If it is continued still holding, it holds again from then on, but if its
/// lease ran out meanwhile a newer term may have claimed; the stale holder
/// must then let go first thing (release, or be killed or stopped again),
/// within `RESUME_GRACE_NS`, and only that overlap is allowed. Hook runs by a node while it is dead (a hook it had
/// forked just before the kill) are ignored.
/// Returns the problems, the number of holding intervals and of tolerated
/// stale overlaps, and how long each SIGSTOPped holder kept the address
/// configured (from the stop to its release, or its kill): what clb cannot
/// prevent while clbd itself is stopped on a live host (README).
fn vip_violations(
    hooks: &[HookEvent],
    faults: &[Fault],
    end: u128,
) -> (Vec<String>, usize, usize, Vec<u128>) {
    let mut kept_while_stopped: Vec<u128> = Vec::new();
    #[derive(Debug)]
    struct Interval {
        node: u64,
        term: u64,
        from: u128,
        to: u128,
        resumed: bool,
        /// What ended it: release, kill, stop, claim (of a newer term) or end.
        ended_by: &'static str,
    }
    let mut intervals = Vec::new();
    let mut problems = Vec::new();
    let nodes: std::collections::BTreeSet<u64> = hooks
        .iter()
        .map(|h| h.node)
        .chain(faults.iter().map(|f| f.node))
        .collect();
    for node in nodes {
        // (time, order on ties, event)
        let mut events: Vec<(u128, u8, &str, u64)> = faults
            .iter()
            .filter(|f| f.node == node)
            .map(|f| (f.wall, 0, f.what, 0))
            .chain(
                hooks
                    .iter()
                    .filter(|h| h.node == node)
                    .map(|h| (h.at_ns, 1, h.action.as_str(), h.term)),
            )
            .collect();
        events.sort_by_key(|e| (e.0, e.1));
        let (mut dead, mut stopped) = (false, false);
        // Since when a stopped holder keeps the address without acting.
        let mut kept_from: Option<u128> = None;
        let mut holding: Option<(u128, u64, bool)> = None;
        let mut suspended: Option<u64> = None;
        let mut close =
            |holding: &mut Option<(u128, u64, bool)>, to: u128, ended_by: &'static str| {
                if let Some((from, term, resumed)) = holding.take() {
                    intervals.push(Interval {
                        node,
                        term,
                        from,
                        to,
                        resumed,
                        ended_by,
                    });
                }
            };
        for (at, _, what, term) in events {
            if let (Some(from), "kill" | "release") = (kept_from, what) {
                kept_while_stopped.push(at - from);
                kept_from = None;
            }
            match what {
                "kill" => {
                    close(&mut holding, at, "kill");
                    suspended = None;
                    dead = true;
                }
                "spawn" => dead = false,
                // A cut-off holder keeps running and releases by itself
                // when its lease runs out: its hook log says when.
                "cut" | "split" | "heal" => {}
                "stop" => {
                    if holding.is_some() && kept_from.is_none() {
                        kept_from = Some(at);
                    }
                    suspended = holding.map(|h| h.1);
                    close(&mut holding, at, "stop");
                    stopped = true;
                }
                "cont" => {
                    stopped = false;
                    holding = suspended.take().map(|term| (at, term, true));
                }
                _ if dead => {}
                "claim" if stopped => suspended = Some(term),
                "release" if stopped => suspended = None,
                "claim" => match holding {
                    Some((_, held, false)) if held == term => {}
                    _ => {
                        close(&mut holding, at, "claim");
                        holding = Some((at, term, false));
                    }
                },
                "release" => close(&mut holding, at, "release"),
                other => problems.push(format!("node {node}: unknown hook action {other}")),
            }
        }
        close(&mut holding, end, "end");
    }
    let mut tolerated = 0;
    for a in &intervals {
        for b in &intervals {
            if a.node >= b.node || a.from >= b.to || b.from >= a.to {
                continue;
            }
            let stale_ok = |s: &Interval, t: &Interval| {
                s.resumed
                    && matches!(s.ended_by, "release" | "kill" | "stop")
                    && t.term > s.term
                    && s.to - s.from < RESUME_GRACE_NS
            };
            if stale_ok(a, b) || stale_ok(b, a) {
                tolerated += 1;
            } else {
                problems.push(format!("two VIP holders: {a:?} and {b:?}"));
            }
        }
    }
    // Fencing: a claim never runs after another node's claim of a newer term.
    let mut newest: Option<&HookEvent> = None;
    let live = |h: &HookEvent| {
        let last = faults
            .iter()
            .rfind(|f| f.node == h.node && f.wall <= h.at_ns && matches!(f.what, "kill" | "spawn"));
        last.is_none_or(|f| f.what == "spawn")
    };
    let mut claims: Vec<&HookEvent> = hooks
        .iter()
        .filter(|h| h.action == "claim" && live(h))
        .collect();
    claims.sort_by_key(|h| h.at_ns);
    for h in claims {
        if let Some(n) = newest {
            if n.node != h.node && h.term <= n.term {
                problems.push(format!("stale claim {h:?} after {n:?}"));
            }
        }
        if newest.is_none_or(|n| h.term >= n.term) {
            newest = Some(h);
        }
    }
    (problems, intervals.len(), tolerated, kept_while_stopped)
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

#[test]
fn chaos_kill_stop_and_partition_under_load_loses_nothing_and_stays_linearizable() {
    let runtime = || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("tokio runtime")
    };
    match Net::create() {
        // The runtime's threads start in the namespace of the thread that
        // builds it, so every request the test sends leaves from the
        // client host.
        Some(net) => {
            let ns = net.client.ns.clone();
            netns::in_ns(&ns, move || runtime().block_on(chaos(Some(net))))
                .expect("the chaos run (its panic is printed above)")
        }
        None => runtime().block_on(chaos(None)),
    }
}

/// Three nodes, one in each of `net`'s node hosts; started and healthy.
async fn start_in(net: &Net, args: impl Fn(u64) -> Vec<String>) -> Cluster {
    let mut c = Cluster::empty();
    let peers = net
        .hosts
        .keys()
        .map(|id| format!("{id}={}", peer_addr_for(&net.addr(*id))))
        .collect::<Vec<_>>()
        .join(",");
    for (id, host) in &net.hosts {
        let mut all = vec!["--peers".to_string(), peers.clone()];
        all.extend(args(*id));
        let addr = net.addr(*id);
        let peer = peer_addr_for(&addr);
        netns::in_ns(&host.ns, || {
            c.add_node_at(*id, addr, peer, &FAST_TIMERS, all);
        })
        .expect("spawn in the node's namespace");
    }
    c.healthy(Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    c
}

async fn chaos(net: Option<Net>) {
    let seed = env_u64("CLB_CHAOS_SEED").unwrap_or_else(|| now_ns() as u64 % 1_000_000_007);
    let duration = Duration::from_secs(env_u64("CLB_CHAOS_DURATION_S").unwrap_or(60));
    eprintln!(
        "chaos: CLB_CHAOS_SEED={seed} CLB_CHAOS_DURATION_S={}",
        duration.as_secs()
    );
    let mut rng = StdRng::seed_from_u64(seed);

    let dir = tempfile::tempdir().expect("tempdir");
    let (script, hook_log) = vip_hook(dir.path()).expect("write hook");
    let script = script.display().to_string();
    let args = |_| {
        [
            "--vip",
            VIP,
            "--vip-hook",
            &script,
            "--lease-ms",
            LEASE_MS,
            "--guardrail-share",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let mut c = match &net {
        Some(net) => start_in(net, args).await,
        None => Cluster::start_custom(3, &FAST_TIMERS, args).await,
    };
    c.leader(Duration::from_secs(30)).await;
    c.any_client()
        .define_service(
            SERVICE,
            &ServiceBody {
                port: free_port().into(),
                ..Default::default()
            },
        )
        .await
        .expect("define the service");

    let t0 = Instant::now();
    let total_ops = KEYS * WRITES_PER_KEY + READS;
    let shared = Arc::new(Shared {
        addrs: c
            .nodes
            .iter()
            .map(|(id, n)| (*id, n.addr.clone()))
            .collect(),
        // No idle connections: a request to a killed node then fails to
        // connect (certainly not applied) instead of dying mid-flight.
        http: reqwest::Client::builder()
            .pool_max_idle_per_host(0)
            .connect_timeout(Duration::from_secs(2))
            .timeout(REQUEST_TIMEOUT)
            .build()
            .expect("http client"),
        t0,
        stop: AtomicBool::new(false),
        budget: Budget {
            writes: (0..KEYS).map(|_| AtomicUsize::new(0)).collect(),
            reads: AtomicUsize::new(0),
        },
        next_id: AtomicUsize::new(0),
        next_value: AtomicU32::new(1_024),
        history: Mutex::new(Vec::new()),
        pace: duration.mul_f64(CLIENTS as f64 / total_ops as f64),
    });
    let clients: Vec<_> = (0..CLIENTS)
        .map(|i| tokio::spawn(client_loop(shared.clone(), i, seed)))
        .collect();
    let fault_log = faults(&mut c, net.as_ref(), &mut rng, t0, t0 + duration).await;
    shared.stop.store(true, Ordering::Relaxed);
    for client in clients {
        tokio::time::timeout(REQUEST_TIMEOUT * 3, client)
            .await
            .expect("clients stop within a request timeout")
            .expect("client task");
    }
    let ops_done = t0.elapsed();

    // Final reads through every node: part of the history, and the state
    // the nodes must agree on.
    c.leader(Duration::from_secs(30)).await;
    let mut finals = Vec::new();
    for id in shared.addrs.keys().copied() {
        let r = eventually(
            Duration::from_secs(30),
            "a final consistent read",
            || async {
                let r = read(&shared, CLIENTS, id).await;
                matches!(r.result, Answer::Read { .. }).then_some(r)
            },
        )
        .await;
        finals.push(r.clone());
        shared.history.lock().expect("history").push(r);
    }
    let mut history = shared.history.lock().expect("history").clone();
    history.sort_by_key(|r| r.call);

    let mut problems: Vec<String> = Vec::new();
    let mut bad_keys = Vec::new();
    for r in history
        .iter()
        .filter(|r| matches!(r.result, Answer::Unexpected(_)))
    {
        problems.push(format!("unexpected answer: {}", r.line()));
    }

    // (1) every acknowledged write survived or was superseded.
    let Answer::Read {
        members: final_members,
        ..
    } = &finals[0].result
    else {
        unreachable!("final reads are answered");
    };
    for f in &finals[1..] {
        if let Answer::Read { members, .. } = &f.result {
            if members != final_members {
                problems.push(format!(
                    "final reads differ: {} vs {}",
                    finals[0].line(),
                    f.line()
                ));
            }
        }
    }
    for key in 0..KEYS {
        let fin = final_members.get(&format!("k{key}")).copied();
        if let Err(e) = final_state_explained(&history, key, fin) {
            problems.push(e);
            bad_keys.push(key);
        }
    }

    // (2) linearizable, member by member, and indexes follow real time.
    let check_started = Instant::now();
    for (key, entries) in projections(&history).iter().enumerate() {
        if let Err(v) = lin::check(entries) {
            problems.push(format!(
                "k{key} ({} ops) is not linearizable: {v:?}",
                entries.len()
            ));
            bad_keys.push(key);
        }
    }
    let check_took = check_started.elapsed();
    problems.extend(indexes_follow_real_time(&history));

    // (3) the nodes converge on one registry and render identical configs.
    let services = eventually(
        Duration::from_secs(60),
        "every node's registry equal",
        || async {
            let mut all = Vec::new();
            for addr in shared.addrs.values() {
                match send(
                    &shared.http,
                    addr,
                    Method::GET,
                    "/v1/services?consistent=true",
                    None,
                )
                .await
                {
                    Reply::Status(200, text) => {
                        let v: ServicesView =
                            serde_json::from_str(&text).expect("a services answer");
                        all.push(v.services);
                    }
                    _ => return None,
                }
            }
            all.windows(2).all(|w| w[0] == w[1]).then(|| all[0].clone())
        },
    )
    .await;
    let registered = services.get(SERVICE).map(members_of).unwrap_or_default();
    if &registered != final_members {
        problems.push(format!(
            "registry {registered:?} differs from the final reads {final_members:?}"
        ));
    }
    let expected_lines: Vec<String> = registered
        .iter()
        .map(|(m, p)| format!("server {m} 10.0.0.1:{p} "))
        .collect();
    let configs = eventually(
        Duration::from_secs(60),
        "every node rendering the final registry",
        || async {
            let mut out = Vec::new();
            for id in shared.addrs.keys() {
                let text =
                    std::fs::read_to_string(c.dir.path().join(format!("haproxy{id}.cfg"))).ok()?;
                let servers = text
                    .lines()
                    .filter(|l| l.trim_start().starts_with("server k"))
                    .count();
                if servers != expected_lines.len()
                    || !expected_lines.iter().all(|l| text.contains(l))
                {
                    return None;
                }
                out.push(text);
            }
            Some(out)
        },
    )
    .await;
    if configs.windows(2).any(|w| w[0] != w[1]) {
        problems.push("rendered configs differ between nodes".into());
    }
    for n in c.nodes.values() {
        let v = n.client().node().await.expect("node status");
        if let Some(e) = v.render.as_ref().and_then(|r| r.last_error.as_ref()) {
            problems.push(format!("node {} render error: {e:?}", n.id));
        }
    }

    // (4) never two VIP holders.
    let hooks = hook_events(&hook_log);
    let (vip_problems, held, stale, kept) = vip_violations(&hooks, &fault_log, now_ns());
    problems.extend(vip_problems);
    let kept_ms: Vec<u128> = kept.iter().map(|ns| ns / 1_000_000).collect();

    let count = |f: fn(&Answer) -> bool| history.iter().filter(|r| f(&r.result)).count();
    let kinds: Vec<String> = ["kill", "stop", "cut", "split"]
        .iter()
        .map(|k| format!("{k} {}", fault_log.iter().filter(|f| f.what == *k).count()))
        .collect();
    let summary = format!(
        "seed {seed}: {} ops in {:.1} s ({} ok, {} 404, {} unknown, {} not applied, {} reads), {} faults ({}), {} VIP hook runs ({held} holding intervals, {stale} stale overlaps after SIGCONT; {} SIGSTOPped holders kept the address configured {:?} ms until their release or kill), checker {:?}",
        history.len(),
        ops_done.as_secs_f64(),
        count(|r| matches!(r, Answer::Ok { .. })),
        count(|r| matches!(r, Answer::NotFound)),
        count(|r| matches!(r, Answer::Unknown(_))),
        count(|r| matches!(r, Answer::NotApplied(_))),
        count(|r| matches!(r, Answer::Read { .. })),
        fault_log.len(),
        kinds.join(", "),
        hooks.len(),
        kept_ms.len(),
        kept_ms,
        check_took,
    );
    eprintln!("chaos: {summary}");
    if problems.is_empty() {
        return;
    }

    // Everything needed to understand the failure: the faults, the hook log,
    // and the history of the members that failed (all of it goes to a file).
    let mut report = String::new();
    let _ = writeln!(
        report,
        "chaos FAILED ({}); rerun with CLB_CHAOS_SEED={seed} CLB_CHAOS_DURATION_S={}",
        if net.is_some() {
            "with partitions"
        } else {
            "loopback, no partitions"
        },
        duration.as_secs()
    );
    let _ = writeln!(report, "{summary}");
    for p in &problems {
        let _ = writeln!(report, "PROBLEM: {p}");
    }
    let _ = writeln!(report, "faults (s since start):");
    for f in &fault_log {
        let _ = writeln!(
            report,
            "  {:>9.3} {} node {} (wall {})",
            f.mono as f64 / 1e9,
            f.what,
            f.node,
            f.wall
        );
    }
    let _ = writeln!(report, "VIP hook log (wall ns, node, action, term):");
    for h in &hooks {
        let _ = writeln!(report, "  {} {} {} {}", h.at_ns, h.node, h.action, h.term);
    }
    let full: String = history.iter().map(|r| r.line() + "\n").collect();
    let file = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("chaos-history-{seed}.txt"));
    let _ = std::fs::write(&file, format!("{report}history:\n{full}"));
    bad_keys.sort_unstable();
    bad_keys.dedup();
    for key in bad_keys {
        let _ = writeln!(report, "history of k{key} (reads shown in full):");
        for r in history
            .iter()
            .filter(|r| r.key == Some(key) || r.key.is_none())
        {
            let _ = writeln!(report, "  {}", r.line());
        }
    }
    panic!("{report}\nfull history: {}", file.display());
}
