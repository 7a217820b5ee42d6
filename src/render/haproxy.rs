//! Talking to a running haproxy: the runtime API on the admin socket for
//! member changes, and reloads through `--reload-cmd` or the master CLI.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

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
    Delete {
        backend: String,
        server: String,
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
        for server in old_svc.members.keys() {
            if !new_svc.members.contains_key(server) {
                ops.push(Op::Delete {
                    backend: backend.clone(),
                    server: server.clone(),
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

/// Applies runtime ops in order. A delete whose server still has
/// connections is left in maint and retried in the background.
pub async fn run_ops(socket: &Path, ops: &[Op]) -> Result<(), HaproxyError> {
    for op in ops {
        match op {
            Op::Add {
                backend,
                server,
                member,
                options,
            } => {
                let target = format!("{backend}/{server}");
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
            Op::Delete { backend, server } => {
                let target = format!("{backend}/{server}");
                expect(socket, &format!("set server {target} state maint"), &[""]).await?;
                if let Err(e) = expect(
                    socket,
                    &format!("del server {target}"),
                    &["Server deleted."],
                )
                .await
                {
                    tracing::info!(server = %target, cause = %e, "server busy; deleting once its connections end");
                    tokio::spawn(delete_later(socket.to_path_buf(), target));
                }
            }
            Op::SetAddr {
                backend,
                server,
                addr,
                port,
            } => {
                let cmd = format!("set server {backend}/{server} addr {addr} port {port}");
                let answer = exchange(socket, &cmd).await?;
                // haproxy answers with a description of the change, or an error.
                if !answer.contains("changed") && !answer.trim().is_empty() {
                    return Err(HaproxyError::Refused {
                        command: cmd,
                        answer: answer.trim().into(),
                    });
                }
            }
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

/// Retries `del server` for a bounded time; the server is in maint meanwhile,
/// and the next reload drops it anyway.
async fn delete_later(socket: PathBuf, target: String) {
    for _ in 0..120 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        if expect(
            &socket,
            &format!("del server {target}"),
            &["Server deleted."],
        )
        .await
        .is_ok()
        {
            return;
        }
    }
    tracing::warn!(server = %target, "server still busy after 60 s; it stays in maint until the next reload");
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
        assert!(ops.contains(&Op::Delete {
            backend: "be_http".into(),
            server: "b".into()
        }));
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
