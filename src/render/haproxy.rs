//! Talking to a running haproxy: the runtime API on the admin socket for
//! member changes, and reloads through `--reload-cmd` or the master CLI.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
}

impl Runtime {
    pub fn new(socket: PathBuf) -> Runtime {
        Runtime {
            socket,
            retired: Mutex::default(),
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

    /// Applies runtime ops in order.
    pub async fn apply(&self, ops: &[Op]) -> Result<(), HaproxyError> {
        let socket = self.socket.as_path();
        let mut retired = self.retired.lock().await;
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
                        take_back(socket, &target, &old, member).await?;
                        tracing::info!(server = %target, "registered again: its retired server is back in service");
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
                    tracing::info!(server = %target, "removed from rotation; its open sessions finish, the next reload drops it");
                    retired.insert(target, member.clone());
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
        Ok(())
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

/// Puts a retired server (in maint, same service definition, so the same
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
