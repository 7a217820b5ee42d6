//! Talking to a running haproxy: the runtime API on the admin socket for
//! member changes, and reloads through `--reload-cmd` or the master CLI.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{Mutex, Notify};

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
    #[error("reload through the master CLI did not start a new worker within {0:?}")]
    ReloadUnconfirmed(Duration),
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

/// Runs a runtime API command whose success answer is `ok` (often empty).
async fn expect(socket: &Path, command: &str, ok: &[&str]) -> Result<(), HaproxyError> {
    let answer = exchange(socket, command).await?;
    let trimmed = answer.trim();
    if ok.contains(&trimmed) {
        Ok(())
    } else {
        Err(HaproxyError::Refused {
            command: command.to_string(),
            answer: trimmed.to_string(),
        })
    }
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
        for (server, m) in &old_svc.members {
            if !new_svc.members.contains_key(server) {
                ops.push(Op::Delete {
                    backend: backend.clone(),
                    server: server.clone(),
                    member: m.clone(),
                });
            }
        }
        for (server, m) in &new_svc.members {
            match old_svc.members.get(server) {
                None => {
                    // The runtime API wants an address it need not resolve.
                    if m.address.parse::<std::net::IpAddr>().is_err() {
                        return Plan::Reload;
                    }
                    ops.push(Op::Add {
                        backend: backend.clone(),
                        server: server.clone(),
                        member: m.clone(),
                        options: runtime_add_options(new_svc, m),
                    });
                }
                Some(old) => diff_member(&backend, server, old, m, &mut ops),
            }
        }
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

/// haproxy's answers to `del server` that clb acts on.
const DELETED: &str = "Server deleted.";
/// The server is gone already: a reload (ours or anyone's) dropped it.
const NO_SUCH_SERVER: &str = "No such server.";
/// Streams, queued requests or pooled idle connections still use it.
const STILL_CONNECTED: &str = "Server still has connections attached to it";

/// First and longest pause between two `del server` attempts on a removed
/// server that still has connections. Idle pooled connections of a server
/// put in maint are closed by haproxy's threads a few milliseconds later,
/// and a request in flight usually ends as fast; a long-lived one (an
/// upgraded session, a download) ends when it ends. `del server` stops every
/// haproxy thread while it runs, so a server held for long is asked at most
/// once per `RETRY_MAX`.
const RETRY_FIRST: Duration = Duration::from_millis(2);
const RETRY_MAX: Duration = Duration::from_secs(1);

/// A server removed from the registry that haproxy still has, in maint,
/// because connections were open when it was removed.
#[derive(Debug)]
struct Leaving {
    member: Member,
    since: tokio::time::Instant,
    next_try: tokio::time::Instant,
    pause: Duration,
}

#[derive(Debug, Default)]
struct LeavingSet {
    /// By `backend/server`.
    servers: BTreeMap<String, Leaving>,
    /// Whether a reaper task is running for them.
    reaper: bool,
}

/// The running worker's runtime API: applies member changes, and deletes
/// removed servers once their last connection has closed.
///
/// A removal is `drain` (when the member was active), then `maint`, then
/// `del server`. Drain first makes haproxy log the server going down at
/// notice rather than alert level (it only raises an alert for a server
/// that was taking new sessions); maint closes its idle pooled connections
/// and stops the rest from taking new requests. When connections remain,
/// the server stays in maint, out of rotation, and a background task retries
/// the delete. A member registered again under the same name meanwhile takes
/// that server back instead of adding a second one, which haproxy refuses.
pub struct Runtime {
    socket: PathBuf,
    /// Held across every exchange with haproxy about a leaving server, by the
    /// render task and the reaper alike, so a re-registration or a reload
    /// never races a delete.
    leaving: Arc<Mutex<LeavingSet>>,
    /// Wakes a sleeping reaper when a server starts leaving.
    wake: Arc<Notify>,
}

impl Runtime {
    pub fn new(socket: PathBuf) -> Runtime {
        Runtime {
            socket,
            leaving: Arc::default(),
            wake: Arc::default(),
        }
    }

    /// Servers waiting for their connections to close before deletion.
    pub async fn leaving(&self) -> usize {
        self.leaving.lock().await.servers.len()
    }

    /// Called before a reload: the new worker loads the file, which no longer
    /// has these servers, and the old worker keeps serving their connections
    /// until they close, so nothing remains to delete. (Should the reload
    /// fail, the next apply is a reload too, which drops them all the same.)
    pub async fn forget_leaving(&self) {
        let mut set = self.leaving.lock().await;
        if !set.servers.is_empty() {
            tracing::info!(
                servers = set.servers.len(),
                "reload: removed servers that still had connections are left to the old worker"
            );
            set.servers.clear();
        }
    }

    /// Applies runtime ops in order.
    pub async fn apply(&self, ops: &[Op]) -> Result<(), HaproxyError> {
        let socket = self.socket.as_path();
        let mut set = self.leaving.lock().await;
        for op in ops {
            match op {
                Op::Add {
                    backend,
                    server,
                    member,
                    options,
                } => {
                    let target = format!("{backend}/{server}");
                    if let Some(old) = set.servers.remove(&target) {
                        take_back(socket, &target, &old.member, member).await?;
                        tracing::info!(server = %target, "registered again while leaving: haproxy's server is back in service");
                        continue;
                    }
                    let addr = server_addr(&member.address);
                    expect(
                        socket,
                        &format!("add server {target} {addr}:{} {options}", member.port),
                        &["New server registered."],
                    )
                    .await?;
                    if options.contains(" check") {
                        expect(socket, &format!("enable health {target}"), &[""]).await?;
                    }
                    if member.state != MemberState::Maint {
                        let st = state_word(member.state);
                        expect(socket, &format!("set server {target} state {st}"), &[""]).await?;
                    }
                }
                Op::Delete {
                    backend,
                    server,
                    member,
                } => {
                    let target = format!("{backend}/{server}");
                    if member.state == MemberState::Active {
                        expect(socket, &format!("set server {target} state drain"), &[""]).await?;
                    }
                    if member.state != MemberState::Maint {
                        expect(socket, &format!("set server {target} state maint"), &[""]).await?;
                    }
                    match delete(socket, &target).await? {
                        Deleted::Now => tracing::info!(server = %target, "removed from haproxy"),
                        Deleted::Busy => {
                            tracing::info!(server = %target, "removed from rotation; haproxy deletes it once its open connections close");
                            let now = tokio::time::Instant::now();
                            set.servers.insert(
                                target,
                                Leaving {
                                    member: member.clone(),
                                    since: now,
                                    next_try: now + RETRY_FIRST,
                                    pause: RETRY_FIRST,
                                },
                            );
                        }
                    }
                }
                Op::SetAddr {
                    backend,
                    server,
                    addr,
                    port,
                } => set_addr(socket, &format!("{backend}/{server}"), addr, *port).await?,
                Op::SetWeight {
                    backend,
                    server,
                    weight,
                } => {
                    let cmd = format!("set server {backend}/{server} weight {weight}");
                    expect(socket, &cmd, &[""]).await?;
                }
                Op::SetState {
                    backend,
                    server,
                    state,
                } => {
                    let cmd = format!("set server {backend}/{server} state {}", state_word(*state));
                    expect(socket, &cmd, &[""]).await?;
                }
            }
        }
        if !set.servers.is_empty() {
            if set.reaper {
                self.wake.notify_one();
            } else {
                set.reaper = true;
                let (leaving, wake) = (self.leaving.clone(), self.wake.clone());
                tokio::spawn(reap(socket.to_path_buf(), leaving, wake));
            }
        }
        Ok(())
    }
}

enum Deleted {
    /// Gone, or already gone.
    Now,
    /// Still has connections; in maint meanwhile.
    Busy,
}

async fn delete(socket: &Path, target: &str) -> Result<Deleted, HaproxyError> {
    let command = format!("del server {target}");
    let answer = exchange(socket, &command).await?;
    let answer = answer.trim();
    if answer == DELETED || answer == NO_SUCH_SERVER {
        Ok(Deleted::Now)
    } else if answer.starts_with(STILL_CONNECTED) {
        Ok(Deleted::Busy)
    } else {
        Err(HaproxyError::Refused {
            command,
            answer: answer.to_string(),
        })
    }
}

/// `set server ... addr`: haproxy describes the change, or says why not.
async fn set_addr(socket: &Path, target: &str, addr: &str, port: u16) -> Result<(), HaproxyError> {
    let cmd = format!("set server {target} addr {addr} port {port}");
    let answer = exchange(socket, &cmd).await?;
    if !answer.contains("changed") && !answer.trim().is_empty() {
        return Err(HaproxyError::Refused {
            command: cmd,
            answer: answer.trim().into(),
        });
    }
    Ok(())
}

/// Puts a leaving server (in maint, same service definition, so the same
/// options) back in service as `member`.
async fn take_back(
    socket: &Path,
    target: &str,
    old: &Member,
    member: &Member,
) -> Result<(), HaproxyError> {
    if old.address != member.address || old.port != member.port {
        set_addr(socket, target, &member.address, member.port).await?;
    }
    if old.weight != member.weight {
        let cmd = format!("set server {target} weight {}", member.weight);
        expect(socket, &cmd, &[""]).await?;
    }
    if member.state != MemberState::Maint {
        // `ready` and `drain` both leave maint, and clear the drain the
        // removal set where the member is active again.
        let st = state_word(member.state);
        expect(socket, &format!("set server {target} state {st}"), &[""]).await?;
    }
    Ok(())
}

/// Retries `del server` on leaving servers until none is left; a reload or
/// a re-registration takes a server off the list.
async fn reap(socket: PathBuf, leaving: Arc<Mutex<LeavingSet>>, wake: Arc<Notify>) {
    loop {
        let next = {
            let mut set = leaving.lock().await;
            let now = tokio::time::Instant::now();
            let due: Vec<String> = set
                .servers
                .iter()
                .filter(|(_, l)| l.next_try <= now)
                .map(|(t, _)| t.clone())
                .collect();
            for target in due {
                match delete(&socket, &target).await {
                    Ok(Deleted::Now) => {
                        if let Some(l) = set.servers.remove(&target) {
                            tracing::info!(
                                server = %target,
                                after_ms = l.since.elapsed().as_millis() as u64,
                                "removed from haproxy once its connections closed"
                            );
                        }
                    }
                    Ok(Deleted::Busy) => {
                        if let Some(l) = set.servers.get_mut(&target) {
                            l.pause = (l.pause * 2).min(RETRY_MAX);
                            l.next_try = tokio::time::Instant::now() + l.pause;
                        }
                    }
                    Err(e) => {
                        // haproxy is away or refused for another reason: the
                        // server stays in maint; retry at the slow pace.
                        tracing::debug!(server = %target, cause = %e, "del server failed; will retry");
                        if let Some(l) = set.servers.get_mut(&target) {
                            l.pause = RETRY_MAX;
                            l.next_try = tokio::time::Instant::now() + l.pause;
                        }
                    }
                }
            }
            match set.servers.values().map(|l| l.next_try).min() {
                Some(t) => t,
                None => {
                    set.reaper = false;
                    return;
                }
            }
        };
        tokio::select! {
            _ = tokio::time::sleep_until(next) => {}
            _ = wake.notified() => {}
        }
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
    let before = worker_pids(master).await?;
    // The master re-executes itself; the connection closes without an answer in 2.6.
    let _ = exchange(master, "reload").await;
    let wait = Duration::from_secs(10);
    let deadline = tokio::time::Instant::now() + wait;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if let Ok(now) = worker_pids(master).await {
            if now.iter().any(|p| !before.contains(p)) {
                return Ok(());
            }
        }
    }
    Err(HaproxyError::ReloadUnconfirmed(wait))
}

/// Pids of current workers per the master CLI's `show proc`.
pub async fn worker_pids(master: &Path) -> Result<Vec<u32>, HaproxyError> {
    let out = exchange(master, "show proc").await?;
    Ok(parse_current_workers(&out))
}

/// `show proc` lists the master, current workers, then old workers under a
/// `# old workers` heading; we want the current ones.
fn parse_current_workers(text: &str) -> Vec<u32> {
    let mut pids = Vec::new();
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
    }
    pids
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Command, MemberSpec, ServiceDef};

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

    /// A stand-in for haproxy's admin socket: answers each command with
    /// `answer(command)` and records the commands in order.
    struct FakeSocket {
        path: PathBuf,
        log: Arc<std::sync::Mutex<Vec<String>>>,
        _dir: tempfile::TempDir,
    }

    fn fake_socket(answer: impl Fn(&str) -> String + Send + Sync + 'static) -> FakeSocket {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let log: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
        let (l, answer) = (log.clone(), Arc::new(answer));
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut cmd = String::new();
                let _ = s.read_to_string(&mut cmd).await;
                let cmd = cmd.trim().to_string();
                let out = answer(&cmd);
                l.lock().unwrap().push(cmd);
                let _ = s.write_all(out.as_bytes()).await;
            }
        });
        FakeSocket {
            path,
            log,
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
    async fn a_removal_drains_then_maints_then_deletes_and_a_gone_server_is_done() {
        let fake = fake_socket(|cmd| match cmd {
            "del server be_web/a" => "Server deleted.\n".into(),
            "del server be_web/gone" => "No such server.\n".into(),
            _ => "\n".into(),
        });
        let rt = Runtime::new(fake.path.clone());
        rt.apply(&[
            delete("a", member("10.0.0.1", MemberState::Active)),
            delete("gone", member("10.0.0.2", MemberState::Drain)),
        ])
        .await
        .unwrap();
        assert_eq!(
            *fake.log.lock().unwrap(),
            [
                "set server be_web/a state drain",
                "set server be_web/a state maint",
                "del server be_web/a",
                // Already drained: straight to maint.
                "set server be_web/gone state maint",
                "del server be_web/gone",
            ]
        );
        assert_eq!(rt.leaving().await, 0);
    }

    #[tokio::test]
    async fn a_busy_server_is_deleted_once_its_connections_close() {
        let tries = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let t = tries.clone();
        let fake = fake_socket(move |cmd| {
            if cmd.starts_with("del server") {
                // Busy for the first three attempts.
                if t.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 3 {
                    return "Server still has connections attached to it, cannot remove it.\n"
                        .into();
                }
                return "Server deleted.\n".into();
            }
            "\n".into()
        });
        let rt = Runtime::new(fake.path.clone());
        rt.apply(&[delete("a", member("10.0.0.1", MemberState::Maint))])
            .await
            .unwrap();
        assert_eq!(rt.leaving().await, 1, "left in maint, waiting");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while rt.leaving().await > 0 {
            assert!(tokio::time::Instant::now() < deadline, "never deleted");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(tries.load(std::sync::atomic::Ordering::SeqCst), 4);
        // In maint already: no state change, only deletes.
        assert!(fake
            .log
            .lock()
            .unwrap()
            .iter()
            .all(|c| c == "del server be_web/a"));
    }

    #[tokio::test]
    async fn a_member_registered_again_while_leaving_takes_its_server_back() {
        let fake = fake_socket(|cmd| match cmd {
            c if c.starts_with("del server") => {
                "Server still has connections attached to it, cannot remove it.\n".into()
            }
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
        assert_eq!(rt.leaving().await, 0);
        let log = fake.log.lock().unwrap().clone();
        let after: Vec<&str> = log
            .iter()
            .skip_while(|c| !c.starts_with("set server be_web/a addr"))
            .filter(|c| !c.starts_with("del server"))
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
    }

    #[tokio::test]
    async fn a_reload_forgets_leaving_servers() {
        let fake = fake_socket(|cmd| {
            if cmd.starts_with("del server") {
                "Server still has connections attached to it, cannot remove it.\n".into()
            } else {
                "\n".into()
            }
        });
        let rt = Runtime::new(fake.path.clone());
        rt.apply(&[delete("a", member("10.0.0.1", MemberState::Active))])
            .await
            .unwrap();
        assert_eq!(rt.leaving().await, 1);
        rt.forget_leaving().await;
        assert_eq!(rt.leaving().await, 0);
        // The reaper stops: no delete reaches the new worker.
        let n = fake.log.lock().unwrap().len();
        tokio::time::sleep(RETRY_FIRST * 20).await;
        assert_eq!(fake.log.lock().unwrap().len(), n);
    }

    #[test]
    fn show_proc_current_workers() {
        let text = "#<PID>          <type>          <reloads>       <uptime>        <version>\n\
                    100             master          1               0d00h00m05s     2.6.12\n\
                    # workers\n\
                    201             worker          0               0d00h00m01s     2.6.12\n\
                    # old workers\n\
                    150             worker          1               0d00h00m05s     2.6.12\n";
        assert_eq!(parse_current_workers(text), vec![201]);
    }
}
