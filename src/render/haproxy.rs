//! Talking to a running haproxy: the runtime API on the admin socket for
//! member changes, and reloads through `--reload-cmd` or the master CLI.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::Mutex;

use super::template::{server_addr, server_options};
use crate::model::{Member, MemberState, Registry, Service};

/// One socket exchange must not hang the renderer.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum HaproxyError {
    #[error("connect {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("talk to {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} did not answer within {SOCKET_TIMEOUT:?}")]
    Timeout { path: String },
    #[error("haproxy refused `{command}`: {answer}")]
    Refused { command: String, answer: String },
    #[error("reload command `{command}` failed: {detail}")]
    ReloadCmd { command: String, detail: String },
    #[error("haproxy's master rejected the reloaded config; the old workers keep serving")]
    ReloadFailed,
    #[error("the reload issued {:.1} s ago is still loading (the master CLI does not answer until it has)", .0.issued.elapsed().as_secs_f64())]
    ReloadLoading(PendingReload),
}

/// Sends one command line and reads the whole answer. The master CLI only
/// answers after our write half is closed, so we always close it.
pub async fn exchange(socket: &Path, command: &str) -> Result<String, HaproxyError> {
    let path = socket.display().to_string();
    let work = async {
        let mut s = UnixStream::connect(socket)
            .await
            .map_err(|source| HaproxyError::Connect {
                path: path.clone(),
                source,
            })?;
        let io = |source| HaproxyError::Io {
            path: path.clone(),
            source,
        };
        s.write_all(format!("{command}\n").as_bytes())
            .await
            .map_err(io)?;
        s.shutdown().await.map_err(io)?;
        let mut out = String::new();
        s.read_to_string(&mut out).await.map_err(io)?;
        Ok(out)
    };
    tokio::time::timeout(SOCKET_TIMEOUT, work)
        .await
        .map_err(|_| HaproxyError::Timeout { path: path.clone() })?
}

/// A member-level change the runtime API can make without a reload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Add {
        backend: String,
        server: String,
        member: Member,
        options: String,
    },
    /// `member` is what it was, for the removal steps.
    Delete {
        backend: String,
        server: String,
        member: Member,
    },
    SetAddr {
        backend: String,
        server: String,
        addr: String,
        port: u16,
    },
    SetWeight {
        backend: String,
        server: String,
        weight: u16,
    },
    SetState {
        backend: String,
        server: String,
        state: MemberState,
    },
}

/// How to bring haproxy from `live` to `next`.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan {
    Nothing,
    Runtime(Vec<Op>),
    Reload,
}

pub fn backend_name(service: &str) -> String {
    format!("be_{service}")
}

/// Member changes go through the runtime API; anything structural (services
/// or their definitions changed, a hostname member) needs a reload.
pub fn plan(live: &Registry, next: &Registry) -> Plan {
    use imbl::ordmap::DiffItem;
    if !live.services.keys().eq(next.services.keys()) {
        return Plan::Reload;
    }
    let mut ops = Vec::new();
    for (name, new_svc) in &next.services {
        let Some(old_svc) = live.services.get(name) else {
            return Plan::Reload;
        };
        if old_svc.def != new_svc.def {
            return Plan::Reload;
        }
        if std::sync::Arc::ptr_eq(old_svc, new_svc) {
            continue;
        }
        let backend = backend_name(name);
        // The maps share every node a write did not touch, and `diff` skips
        // shared nodes: a pass costs the members that changed, not all of
        // them (a full walk parsed 100k addresses per pass).
        let mut adds = Vec::new();
        for item in old_svc.members.diff(&new_svc.members) {
            match item {
                DiffItem::Remove(server, m) => ops.push(Op::Delete {
                    backend: backend.clone(),
                    server: server.clone(),
                    member: m.clone(),
                }),
                DiffItem::Add(server, m) => {
                    // The runtime API wants an address it need not resolve.
                    if m.address.parse::<std::net::IpAddr>().is_err() {
                        return Plan::Reload;
                    }
                    adds.push(Op::Add {
                        backend: backend.clone(),
                        server: server.clone(),
                        member: m.clone(),
                        options: runtime_add_options(new_svc, m),
                    });
                }
                DiffItem::Update {
                    old: (_, old),
                    new: (server, m),
                } => diff_member(&backend, server, old, m, &mut adds),
            }
        }
        // Removals before additions and changes, the order apply has always had.
        ops.extend(adds);
    }
    if ops.is_empty() {
        Plan::Nothing
    } else {
        Plan::Runtime(ops)
    }
}

fn diff_member(backend: &str, server: &str, old: &Member, m: &Member, ops: &mut Vec<Op>) {
    if old.address != m.address || old.port != m.port {
        ops.push(Op::SetAddr {
            backend: backend.into(),
            server: server.into(),
            addr: m.address.clone(),
            port: m.port,
        });
    }
    if old.weight != m.weight {
        ops.push(Op::SetWeight {
            backend: backend.into(),
            server: server.into(),
            weight: m.weight,
        });
    }
    if old.state != m.state {
        ops.push(Op::SetState {
            backend: backend.into(),
            server: server.into(),
            state: m.state,
        });
    }
}

/// `add server` options: the file's, minus the state (a new dynamic server
/// starts in maint; we set its state after), with the real weight.
fn runtime_add_options(svc: &Service, m: &Member) -> String {
    let active = Member {
        state: MemberState::Active,
        ..m.clone()
    };
    server_options(svc, &active)
}

fn state_word(state: MemberState) -> &'static str {
    match state {
        MemberState::Active => "ready",
        MemberState::Drain => "drain",
        MemberState::Maint => "maint",
    }
}

/// How many removed servers haproxy may keep in maint before clbd reloads
/// to drop them (a reload loads the file, which no longer has them).
pub const RETIRED_RELOAD_AT: usize = 1_000;

/// The running worker's runtime API: applies member changes.
///
/// A removal is `drain` (when the member was active), then `maint`; the
/// server is then *retired*, not deleted. Drain first makes haproxy log the
/// server going down at notice rather than alert level (it only raises an
/// alert for a server that was taking new sessions); maint takes it out of
/// rotation and lets the sessions it still carries finish. clbd never sends
/// `del server`: on Debian's haproxy 2.6.12 a worker that had deleted
/// servers sometimes crashed as it exited after a reload (haproxy#2114,
/// fixed in 2.6.14; measured in docs/benchmarks.md), and one that only kept
/// them in maint never did. A member registered again under the same name
/// takes its retired server back. The next reload drops every retired
/// server (the file no longer has them); with more than
/// [`RETIRED_RELOAD_AT`] of them, clbd reloads for that alone.
pub struct Runtime {
    socket: PathBuf,
    /// Retired servers by `backend/server`, with the member they served.
    retired: Mutex<BTreeMap<String, Member>>,
    /// The id the next added server of a backend gets, per backend, for the
    /// running worker (a reload starts over).
    next_id: Mutex<BTreeMap<String, u32>>,
}

impl Runtime {
    pub fn new(socket: PathBuf) -> Runtime {
        Runtime {
            socket,
            retired: Mutex::default(),
            next_id: Mutex::default(),
        }
    }

    /// Servers removed from the registry that haproxy keeps in maint.
    pub async fn retired(&self) -> usize {
        self.retired.lock().await.len()
    }

    /// Called before a reload: the new worker loads the file, which no longer
    /// has these servers, and the old worker keeps serving their connections
    /// until they close.
    pub async fn forget_retired(&self) {
        self.next_id.lock().await.clear();
        let mut set = self.retired.lock().await;
        if !set.is_empty() {
            tracing::info!(
                servers = set.len(),
                "reload: removed servers kept in maint are dropped by the new worker"
            );
            set.clear();
        }
    }

    /// The pid of the haproxy process answering the socket (`show info`).
    pub async fn pid(&self) -> Result<u32, HaproxyError> {
        let answer = exchange(&self.socket, "show info").await?;
        answer
            .lines()
            .find_map(|l| l.strip_prefix("Pid:")?.trim().parse().ok())
            .ok_or_else(|| HaproxyError::Refused {
                command: "show info".into(),
                answer: answer.lines().take(3).collect::<Vec<_>>().join(" | "),
            })
    }

    /// Applies runtime ops in order, many commands per connection (see
    /// [`Batch`]).
    pub async fn apply(&self, ops: &[Op]) -> Result<(), HaproxyError> {
        let mut retired = self.retired.lock().await;
        let mut next_id = self.next_id.lock().await;
        let mut batch = Batch::default();
        for op in ops {
            match op {
                Op::Add {
                    backend,
                    server,
                    member,
                    options,
                } => {
                    let target = format!("{backend}/{server}");
                    if let Some(old) = retired.remove(&target) {
                        take_back(&mut batch, &target, &old, member);
                        tracing::info!(server = %target, "registered again: its retired server is back in service");
                        continue;
                    }
                    // haproxy 2.6 picks a free id by walking the ids in use:
                    // O(servers) per add, 10 ms at 30k. An explicit id is O(log).
                    let id = match next_id.get_mut(backend) {
                        Some(id) => id,
                        None => next_id
                            .entry(backend.clone())
                            .or_insert(first_free_id(&self.socket, backend).await?),
                    };
                    let addr = server_addr(&member.address);
                    batch.push(
                        format!(
                            "add server {target} {addr}:{} id {id} {options}",
                            member.port
                        ),
                        Answer::Registered,
                    );
                    *id += 1;
                    if options.contains(" check") {
                        batch.push(format!("enable health {target}"), Answer::Empty);
                    }
                    if member.state != MemberState::Maint {
                        let st = state_word(member.state);
                        batch.push(format!("set server {target} state {st}"), Answer::Empty);
                    }
                }
                Op::Delete {
                    backend,
                    server,
                    member,
                } => {
                    let target = format!("{backend}/{server}");
                    if member.state == MemberState::Active {
                        batch.push(format!("set server {target} state drain"), Answer::Empty);
                    }
                    if member.state != MemberState::Maint {
                        batch.push(format!("set server {target} state maint"), Answer::Empty);
                    }
                    tracing::info!(server = %target, "removed from rotation; its open sessions finish, the next reload drops it");
                    retired.insert(target, member.clone());
                }
                Op::SetAddr {
                    backend,
                    server,
                    addr,
                    port,
                } => set_addr(&mut batch, &format!("{backend}/{server}"), addr, *port),
                Op::SetWeight {
                    backend,
                    server,
                    weight,
                } => batch.push(
                    format!("set server {backend}/{server} weight {weight}"),
                    Answer::Empty,
                ),
                Op::SetState {
                    backend,
                    server,
                    state,
                } => batch.push(
                    format!("set server {backend}/{server} state {}", state_word(*state)),
                    Answer::Empty,
                ),
            }
        }
        batch.run(&self.socket).await
    }
}

/// The id after the highest one `backend` uses (`show servers state`);
/// asked once per worker and backend, then counted up.
async fn first_free_id(socket: &Path, backend: &str) -> Result<u32, HaproxyError> {
    let command = format!("show servers state {backend}");
    let answer = exchange(socket, &command).await?;
    parse_first_free_id(&answer, backend).ok_or_else(|| HaproxyError::Refused {
        command,
        answer: answer.trim().chars().take(200).collect(),
    })
}

/// `show servers state BACKEND`: the format version (1), a `#` header, then
/// `be_id be_name srv_id srv_name ...` per server. `None` for anything else
/// (`Can't find backend.`).
fn parse_first_free_id(answer: &str, backend: &str) -> Option<u32> {
    let mut lines = answer.lines();
    if lines.next()?.trim() != "1" {
        return None;
    }
    let mut max = 0;
    for line in lines.filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
        let mut cols = line.split_whitespace();
        let (_, name, id) = (cols.next()?, cols.next()?, cols.next()?);
        if name == backend {
            max = max.max(id.parse::<u32>().ok()?);
        }
    }
    Some(max + 1)
}

/// What a runtime command answers when it worked.
#[derive(Debug, Clone, Copy)]
enum Answer {
    Empty,
    Registered,
    /// `set server ... addr`: a description of the change, or nothing.
    AddrChanged,
}

impl Answer {
    fn ok(self, answer: &str) -> bool {
        match self {
            Answer::Empty => answer.is_empty(),
            Answer::Registered => answer == "New server registered.",
            Answer::AddrChanged => answer.is_empty() || answer.contains("changed"),
        }
    }
}

/// Runtime commands sent `;`-separated on one line, one connection per
/// line: haproxy runs them in order and ends each answer with an empty
/// line. A connection per command cost more than the command (three per
/// added member, on every balancer).
#[derive(Default)]
struct Batch {
    commands: Vec<(String, Answer)>,
}

/// Well under haproxy's default 16 kB buffer, which a command line must fit.
const BATCH_BYTES: usize = 8 * 1024;

impl Batch {
    fn push(&mut self, command: String, answer: Answer) {
        self.commands.push((command, answer));
    }

    async fn run(self, socket: &Path) -> Result<(), HaproxyError> {
        let mut rest = self.commands.as_slice();
        while !rest.is_empty() {
            let mut n = 0;
            let mut len = 0;
            while n < rest.len() && (n == 0 || len + rest[n].0.len() < BATCH_BYTES) {
                len += rest[n].0.len() + 1;
                n += 1;
            }
            let (chunk, tail) = rest.split_at(n);
            rest = tail;
            if let Some((c, _)) = chunk.iter().find(|(c, _)| c.contains([';', '\n'])) {
                // Names are validated by the leader; this only keeps a line one command each.
                return Err(HaproxyError::Refused {
                    command: c.clone(),
                    answer: "not sent: a runtime command may not contain ';' or a newline".into(),
                });
            }
            let line = chunk
                .iter()
                .map(|(c, _)| c.as_str())
                .collect::<Vec<_>>()
                .join(";");
            let out = exchange(socket, &line).await?;
            let answers = split_answers(&out);
            for (i, (command, want)) in chunk.iter().enumerate() {
                let got = answers.get(i).copied().unwrap_or("(no answer)");
                if !want.ok(got) {
                    return Err(HaproxyError::Refused {
                        command: command.clone(),
                        answer: got.to_string(),
                    });
                }
            }
        }
        Ok(())
    }
}

/// One answer per command of a `;` line: each ends with an empty line (an
/// empty answer is that empty line alone).
fn split_answers(out: &str) -> Vec<&str> {
    let mut answers = Vec::new();
    let mut rest = out;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix('\n') {
            answers.push("");
            rest = r;
        } else if let Some(end) = rest.find("\n\n") {
            answers.push(rest[..end].trim());
            rest = &rest[end + 2..];
        } else {
            answers.push(rest.trim());
            break;
        }
    }
    answers
}

/// `set server ... addr`: haproxy describes the change, or says why not.
fn set_addr(batch: &mut Batch, target: &str, addr: &str, port: u16) {
    batch.push(
        format!("set server {target} addr {addr} port {port}"),
        Answer::AddrChanged,
    );
}

/// Puts a retired server (in maint, same service definition, so the same
/// options) back in service as `member`.
fn take_back(batch: &mut Batch, target: &str, old: &Member, member: &Member) {
    if old.address != member.address || old.port != member.port {
        set_addr(batch, target, &member.address, member.port);
    }
    if old.weight != member.weight {
        batch.push(
            format!("set server {target} weight {}", member.weight),
            Answer::Empty,
        );
    }
    if member.state != MemberState::Maint {
        // `ready` and `drain` both leave maint, and clear the drain the
        // removal set where the member is active again.
        let st = state_word(member.state);
        batch.push(format!("set server {target} state {st}"), Answer::Empty);
    }
}

/// Reload haproxy: `--reload-cmd` when given, else the master CLI.
pub async fn reload(
    reload_cmd: Option<&str>,
    master_socket: Option<&Path>,
) -> Result<(), HaproxyError> {
    if let Some(cmd) = reload_cmd {
        let out = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(cmd)
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(30), out)
            .await
            .map_err(|_| HaproxyError::ReloadCmd {
                command: cmd.into(),
                detail: "timed out after 30 s".into(),
            })?
            .map_err(|e| HaproxyError::ReloadCmd {
                command: cmd.into(),
                detail: e.to_string(),
            })?;
        if !out.status.success() {
            return Err(HaproxyError::ReloadCmd {
                command: cmd.into(),
                detail: format!(
                    "{}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        return Ok(());
    }
    let Some(master) = master_socket else {
        return Ok(());
    };
    let before = show_proc(master).await?;
    let pending = PendingReload {
        before: before.workers,
        master_reloads: before.master_reloads,
        issued: Instant::now(),
    };
    // The master re-executes itself; the connection closes without an answer in 2.6.
    let _ = exchange(master, "reload").await;
    let deadline = Instant::now() + RELOAD_WAIT;
    loop {
        tokio::time::sleep(Duration::from_millis(20)).await;
        match reload_progress(master, &pending).await {
            ReloadProgress::Done => return Ok(()),
            ReloadProgress::Failed => return Err(HaproxyError::ReloadFailed),
            ReloadProgress::Loading if Instant::now() < deadline => {}
            ReloadProgress::Loading => return Err(HaproxyError::ReloadLoading(pending)),
        }
    }
}

/// How long [`reload`] waits for the master to start a new worker.
pub const RELOAD_WAIT: Duration = Duration::from_secs(10);

/// A master-CLI reload that had not finished when [`reload`] stopped
/// waiting. The master answers nothing while it loads the new config (164 s
/// for 100k servers without ids in haproxy 2.6), so a caller that issued
/// another reload then would start the load over, again and again.
#[derive(Debug, Clone)]
pub struct PendingReload {
    /// The workers it replaces.
    before: Vec<u32>,
    /// The master's reload count before it, when `show proc` gives one.
    master_reloads: Option<u64>,
    pub issued: Instant,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadProgress {
    /// The master is still loading the config (or has not begun).
    Loading,
    /// A new worker runs it.
    Done,
    /// The master loaded it and started no worker: it rejected the config
    /// and the old workers keep serving.
    Failed,
}

/// Where `pending` stands, per the master CLI.
pub async fn reload_progress(master: &Path, pending: &PendingReload) -> ReloadProgress {
    let Ok(now) = show_proc(master).await else {
        return ReloadProgress::Loading;
    };
    if now.workers.iter().any(|p| !pending.before.contains(p)) {
        return ReloadProgress::Done;
    }
    match (pending.master_reloads, now.master_reloads) {
        // The master counts a reload once it has re-executed and loaded.
        (Some(before), Some(n)) if n > before => ReloadProgress::Failed,
        _ => ReloadProgress::Loading,
    }
}

/// Pids of current workers per the master CLI's `show proc`.
pub async fn worker_pids(master: &Path) -> Result<Vec<u32>, HaproxyError> {
    Ok(show_proc(master).await?.workers)
}

async fn show_proc(master: &Path) -> Result<Procs, HaproxyError> {
    let out = exchange(master, "show proc").await?;
    Ok(parse_show_proc(&out))
}

/// What `show proc` says: the current workers and the master's reload count.
#[derive(Debug, PartialEq)]
struct Procs {
    workers: Vec<u32>,
    master_reloads: Option<u64>,
}

/// `show proc` lists the master (pid, type, reloads), current workers, then
/// old workers under a `# old workers` heading; we want the current ones.
fn parse_show_proc(text: &str) -> Procs {
    let mut pids = Vec::new();
    let mut master_reloads = None;
    let mut section = "";
    for line in text.lines() {
        if let Some(h) = line.strip_prefix('#') {
            section = if h.contains("old workers") {
                "old"
            } else if h.contains("workers") {
                "workers"
            } else {
                section
            };
            continue;
        }
        let mut cols = line.split_whitespace();
        let (Some(pid), Some(kind)) = (cols.next(), cols.next()) else {
            continue;
        };
        if kind == "worker" && section != "old" {
            if let Ok(p) = pid.parse() {
                pids.push(p);
            }
        }
        if kind == "master" {
            master_reloads = cols.next().and_then(|n| n.parse().ok());
        }
    }
    Procs {
        workers: pids,
        master_reloads,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Command, MemberSpec, ServiceDef};
    use std::sync::Arc;

    fn reg(members: &[(&str, &str)]) -> Registry {
        let mut r = Registry::default();
        for (name, addr) in members {
            r.apply(&Command::Register {
                service: "http".into(),
                member: (*name).into(),
                spec: MemberSpec {
                    address: (*addr).into(),
                    port: Some(80),
                    weight: None,
                    ttl_s: None,
                },
                create: ServiceDef::well_known("http"),
                at_ms: 0,
            });
        }
        r
    }

    #[test]
    fn member_changes_plan_runtime_ops() {
        let live = reg(&[("a", "10.0.0.1"), ("b", "10.0.0.2")]);
        let mut next = reg(&[("a", "10.0.0.9"), ("c", "10.0.0.3")]);
        next.apply(&Command::SetMemberState {
            service: "http".into(),
            member: "a".into(),
            state: MemberState::Drain,
        });
        let Plan::Runtime(ops) = plan(&live, &next) else {
            panic!("expected runtime plan");
        };
        assert!(ops.iter().any(|o| matches!(
            o,
            Op::Delete { backend, server, member }
                if backend == "be_http" && server == "b" && member.address == "10.0.0.2"
        )));
        assert!(ops
            .iter()
            .any(|o| matches!(o, Op::Add { server, .. } if server == "c")));
        assert!(ops
            .iter()
            .any(|o| matches!(o, Op::SetAddr { addr, .. } if addr == "10.0.0.9")));
        assert!(ops.iter().any(|o| matches!(
            o,
            Op::SetState {
                state: MemberState::Drain,
                ..
            }
        )));
    }

    #[test]
    fn structural_changes_and_hostnames_reload() {
        let live = reg(&[("a", "10.0.0.1")]);
        assert_eq!(plan(&live, &live.clone()), Plan::Nothing);
        assert_eq!(plan(&Registry::default(), &live), Plan::Reload);
        assert_eq!(
            plan(&live, &reg(&[("a", "10.0.0.1"), ("h", "web.internal")])),
            Plan::Reload
        );
        let mut redefined = live.clone();
        redefined.apply(&Command::DefineService {
            service: "http".into(),
            def: ServiceDef {
                port: 8080,
                ..ServiceDef::well_known("http").unwrap()
            },
        });
        assert_eq!(plan(&live, &redefined), Plan::Reload);
    }

    /// A stand-in for haproxy's admin socket: answers each command of a
    /// `;` line with `answer(command)` and records the commands in order.
    struct FakeSocket {
        path: PathBuf,
        log: Arc<std::sync::Mutex<Vec<String>>>,
        /// Connections, one command line each.
        lines: Arc<std::sync::Mutex<usize>>,
        _dir: tempfile::TempDir,
    }

    fn fake_socket(answer: impl Fn(&str) -> String + Send + Sync + 'static) -> FakeSocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let log: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let lines: Arc<std::sync::Mutex<usize>> = Arc::default();
        let (l, n, answer) = (log.clone(), lines.clone(), Arc::new(answer));
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut line = String::new();
                let _ = s.read_to_string(&mut line).await;
                *n.lock().unwrap() += 1;
                // As haproxy: `;` separates commands, an empty line ends each answer.
                let mut out = String::new();
                for cmd in line.trim().split(';') {
                    let body = answer(cmd);
                    let body = body.trim();
                    out.push_str(body);
                    if !body.is_empty() {
                        out.push('\n');
                    }
                    out.push('\n');
                    l.lock().unwrap().push(cmd.to_string());
                }
                let _ = s.write_all(out.as_bytes()).await;
            }
        });
        FakeSocket {
            path,
            log,
            lines,
            _dir: dir,
        }
    }

    fn member(addr: &str, state: MemberState) -> Member {
        Member {
            address: addr.into(),
            port: 80,
            weight: 100,
            state,
            registered_at_ms: 0,
            ttl_s: None,
        }
    }

    fn delete(server: &str, m: Member) -> Op {
        Op::Delete {
            backend: "be_web".into(),
            server: server.into(),
            member: m,
        }
    }

    fn add(server: &str, m: Member) -> Op {
        Op::Add {
            backend: "be_web".into(),
            server: server.into(),
            member: m,
            options: "weight 100".into(),
        }
    }

    #[tokio::test]
    async fn a_removal_drains_then_maints_and_never_deletes() {
        let fake = fake_socket(|_| "\n".into());
        let rt = Runtime::new(fake.path.clone());
        rt.apply(&[
            delete("a", member("10.0.0.1", MemberState::Active)),
            delete("b", member("10.0.0.2", MemberState::Drain)),
        ])
        .await
        .unwrap();
        assert_eq!(
            *fake.log.lock().unwrap(),
            [
                "set server be_web/a state drain",
                "set server be_web/a state maint",
                // Already drained: straight to maint.
                "set server be_web/b state maint",
            ]
        );
        assert_eq!(rt.retired().await, 2);
    }

    #[tokio::test]
    async fn a_member_registered_again_takes_its_retired_server_back() {
        let fake = fake_socket(|cmd| match cmd {
            c if c.contains(" addr ") => "IP changed from '10.0.0.1' to '10.0.0.9'\n".into(),
            _ => "\n".into(),
        });
        let rt = Runtime::new(fake.path.clone());
        rt.apply(&[delete("a", member("10.0.0.1", MemberState::Active))])
            .await
            .unwrap();
        rt.apply(&[add("a", member("10.0.0.9", MemberState::Active))])
            .await
            .unwrap();
        assert_eq!(rt.retired().await, 0);
        let log = fake.log.lock().unwrap().clone();
        let after: Vec<&str> = log
            .iter()
            .skip_while(|c| !c.starts_with("set server be_web/a addr"))
            .map(String::as_str)
            .collect();
        assert_eq!(
            after,
            [
                "set server be_web/a addr 10.0.0.9 port 80",
                "set server be_web/a state ready"
            ],
            "{log:?}"
        );
        assert!(!log.iter().any(|c| c.starts_with("add server")), "{log:?}");
        assert!(!log.iter().any(|c| c.starts_with("del server")), "{log:?}");
    }

    #[tokio::test]
    async fn a_reload_forgets_retired_servers() {
        let fake = fake_socket(|cmd| match cmd {
            c if c.starts_with("show servers state") => "1\n# be_id be_name srv_id\n".into(),
            c if c.starts_with("add server") => "New server registered.\n".into(),
            _ => "\n".into(),
        });
        let rt = Runtime::new(fake.path.clone());
        rt.apply(&[delete("a", member("10.0.0.1", MemberState::Active))])
            .await
            .unwrap();
        assert_eq!(rt.retired().await, 1);
        rt.forget_retired().await;
        assert_eq!(rt.retired().await, 0);
        // A registration after the reload adds a new server.
        rt.apply(&[add("a", member("10.0.0.1", MemberState::Active))])
            .await
            .unwrap();
        assert!(fake
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|c| c.starts_with("add server be_web/a")));
    }

    #[test]
    fn answers_of_a_command_line_split_at_empty_lines() {
        // What haproxy 2.6 answered to `set;set;add;set` with an unknown server last.
        let out = "\n\nNew server registered.\n\nNo such server.\n\n";
        assert_eq!(
            split_answers(out),
            ["", "", "New server registered.", "No such server."]
        );
    }

    #[test]
    fn the_first_free_id_follows_the_highest_in_use() {
        let state = "1\n# be_id be_name srv_id srv_name srv_addr\n\
                     3 be_web 1 a 10.0.0.1 2 0\n\
                     3 be_web 7 b 10.0.0.2 2 0\n\
                     3 be_web 2 c 10.0.0.3 2 0\n";
        assert_eq!(parse_first_free_id(state, "be_web"), Some(8));
        assert_eq!(
            parse_first_free_id("1\n# be_id be_name\n", "be_web"),
            Some(1)
        );
        assert_eq!(parse_first_free_id("Can't find backend.\n", "be_web"), None);
    }

    #[tokio::test]
    async fn adds_name_their_ids_and_share_one_connection() {
        let fake = fake_socket(|cmd| match cmd {
            c if c.starts_with("show servers state") => {
                "1\n# be_id be_name srv_id srv_name\n3 be_web 4 x 10.0.0.4\n".into()
            }
            c if c.starts_with("add server") => "New server registered.\n".into(),
            _ => "\n".into(),
        });
        let rt = Runtime::new(fake.path.clone());
        rt.apply(&[
            add("a", member("10.0.0.1", MemberState::Active)),
            add("b", member("10.0.0.2", MemberState::Active)),
        ])
        .await
        .unwrap();
        rt.apply(&[add("c", member("10.0.0.3", MemberState::Active))])
            .await
            .unwrap();
        let log = fake.log.lock().unwrap().clone();
        assert_eq!(
            log,
            [
                // Asked once; then counted up.
                "show servers state be_web",
                "add server be_web/a 10.0.0.1:80 id 5 weight 100",
                "set server be_web/a state ready",
                "add server be_web/b 10.0.0.2:80 id 6 weight 100",
                "set server be_web/b state ready",
                "add server be_web/c 10.0.0.3:80 id 7 weight 100",
                "set server be_web/c state ready",
            ]
        );
        assert_eq!(
            *fake.lines.lock().unwrap(),
            3,
            "one line per apply, and the id query"
        );
    }

    #[tokio::test]
    async fn a_refused_command_in_a_line_is_named() {
        let fake = fake_socket(|cmd| match cmd {
            "set server be_web/b weight 5" => "No such server.\n".into(),
            _ => "\n".into(),
        });
        let rt = Runtime::new(fake.path.clone());
        let weight = |server: &str| Op::SetWeight {
            backend: "be_web".into(),
            server: server.into(),
            weight: 5,
        };
        let err = rt
            .apply(&[weight("a"), weight("b"), weight("c")])
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("be_web/b weight 5") && err.contains("No such server"),
            "{err}"
        );
    }

    #[test]
    fn show_proc_current_workers() {
        let text = "#<PID>          <type>          <reloads>       <uptime>        <version>\n\
                    100             master          1               0d00h00m05s     2.6.12\n\
                    # workers\n\
                    201             worker          0               0d00h00m01s     2.6.12\n\
                    # old workers\n\
                    150             worker          1               0d00h00m05s     2.6.12\n";
        assert_eq!(
            parse_show_proc(text),
            Procs {
                workers: vec![201],
                master_reloads: Some(1)
            }
        );
        let failed = "#<PID> <type> <reloads> <uptime> <version>\n\
                      100 master 2 [failed: 1] 0d00h01m31s 2.6.12\n\
                      # workers\n\
                      201 worker 1 0d00h01m17s 2.6.12\n";
        assert_eq!(parse_show_proc(failed).master_reloads, Some(2));
    }
}
