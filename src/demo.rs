//! `clb demo`: a throw-away cluster on loopback that shows a failover.
//!
//! Two balancers and a witness (`clbd` from the directory of the running
//! `clb`), probed ports, a temp dir, haproxy per balancer when installed
//! (both share the service port through SO_REUSEPORT, haproxy's default),
//! and two sample backends served by this process. The VIP (192.0.2.10, a
//! documentation address that is never configured) is "moved" by an exec
//! hook that only appends `unix_ns node action term` to a log, so the
//! timeline shows every claim. The leader is SIGKILLed half-way. Children
//! are killed (by process group) and the temp dir removed on every exit path.

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::views::{ClusterView, ServiceBody};

use crate::client::Client;
use crate::clock::now_ms;

/// The address the demo's hook pretends to move (TEST-NET-1).
const VIP: &str = "192.0.2.10";
/// Upper bound of every wait: a stuck demo ends with an error, never hangs.
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("clbd not found next to this clb ({0}); build both binaries")]
    NoClbd(String),
    #[error("temp dir {path}: {source}")]
    TempDir {
        path: String,
        source: std::io::Error,
    },
    #[error("start {what}: {source}")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error("probe a free port: {0}")]
    Port(std::io::Error),
    #[error("timed out after {0:?} waiting for {1}; node logs are in the temp dir (kept: {2})")]
    Timeout(Duration, String, String),
    #[error("API call: {0}")]
    Api(#[from] crate::client::ClientError),
}

/// What `clb demo` does differently on request.
#[derive(Debug, Clone, Default)]
pub struct DemoOptions {
    /// Skip haproxy even when it is installed.
    pub no_haproxy: bool,
    /// Keep the temp dir (logs, data, rendered configs) after the demo.
    pub keep: bool,
}

/// One line of the timeline.
struct Event {
    at_ms: u64,
    text: String,
}

/// The demo's children and temp dir; cleaned up on drop.
struct Lab {
    dir: PathBuf,
    keep: bool,
    children: Vec<(String, Child)>,
}

impl Lab {
    fn spawn(&mut self, label: &str, mut cmd: Command) -> Result<(), DemoError> {
        let log =
            std::fs::File::create(self.dir.join(format!("{label}.log"))).map_err(|source| {
                DemoError::Spawn {
                    what: label.into(),
                    source,
                }
            })?;
        let err = log.try_clone().map_err(|source| DemoError::Spawn {
            what: label.into(),
            source,
        })?;
        // SAFETY: prctl(2) only, between fork and exec: the child gets
        // SIGKILL if clb dies without running this Lab's Drop (e.g. SIGKILL).
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(|source| DemoError::Spawn {
                what: label.into(),
                source,
            })?;
        self.children.push((label.to_string(), child));
        Ok(())
    }

    /// SIGKILLs the process group of `label` and reaps it.
    fn kill(&mut self, label: &str) {
        if let Some(i) = self.children.iter().position(|(l, _)| l == label) {
            let (_, mut child) = self.children.remove(i);
            if let Ok(pid) = i32::try_from(child.id()) {
                // SAFETY: kill(2) on the process group of our own child,
                // created with process_group(0).
                unsafe { libc::kill(-pid, libc::SIGKILL) };
            }
            let _ = child.wait();
        }
    }

    fn timeout(&self, what: &str) -> DemoError {
        DemoError::Timeout(STEP_TIMEOUT, what.into(), self.dir.display().to_string())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let labels: Vec<String> = self.children.iter().map(|(l, _)| l.clone()).collect();
        for l in labels {
            self.kill(&l);
        }
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

fn free_port() -> Result<u16, DemoError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(DemoError::Port)?;
    Ok(l.local_addr().map_err(DemoError::Port)?.port())
}

fn haproxy_installed() -> bool {
    crate::on_path("haproxy").is_some()
}

/// `(unix_ms, node, action, term)` lines the hook appended.
fn hook_events(log: &Path) -> Vec<(u64, u64, String, u64)> {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let ns: u128 = f.next()?.parse().ok()?;
            let node = f.next()?.parse().ok()?;
            let action = f.next()?.to_string();
            let term = f.next()?.parse().ok()?;
            Some(((ns / 1_000_000) as u64, node, action, term))
        })
        .collect()
}

/// Polls `f` every 20 ms until it returns `Some`, for at most [`STEP_TIMEOUT`].
async fn poll<T, F, Fut>(mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + STEP_TIMEOUT;
    while Instant::now() < deadline {
        if let Some(v) = f().await {
            return Some(v);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    None
}

/// `GET /v1/cluster` on one node, bounded.
async fn view(client: &Client) -> Option<ClusterView> {
    tokio::time::timeout(Duration::from_secs(2), client.cluster())
        .await
        .ok()?
        .ok()
}

/// A sample backend on 127.0.0.1 answering its name; lives as long as the runtime.
async fn backend(name: &'static str) -> Result<u16, DemoError> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(DemoError::Port)?;
    let port = listener.local_addr().map_err(DemoError::Port)?.port();
    let app = axum::Router::new().fallback(move || async move { format!("hello from {name}\n") });
    tokio::spawn(async move { axum::serve(listener, app).await });
    Ok(port)
}

/// One request through haproxy's frontend; the backend's answer.
async fn through_haproxy(port: u16) -> Option<String> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .pool_max_idle_per_host(0)
        .build()
        .ok()?;
    let r = http
        .get(format!("http://127.0.0.1:{port}/"))
        .send()
        .await
        .ok()?;
    if !r.status().is_success() {
        return None;
    }
    Some(r.text().await.ok()?.trim().to_string())
}

/// Runs the demo and returns the timeline to print.
pub async fn run(opts: DemoOptions) -> Result<String, DemoError> {
    let exe = std::env::current_exe().map_err(|e| DemoError::NoClbd(e.to_string()))?;
    let clbd = exe.with_file_name("clbd");
    if !clbd.is_file() {
        return Err(DemoError::NoClbd(clbd.display().to_string()));
    }
    let haproxy = !opts.no_haproxy && haproxy_installed();
    let dir = std::env::temp_dir().join(format!(
        "clb-demo-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).map_err(|source| DemoError::TempDir {
        path: dir.display().to_string(),
        source,
    })?;
    let mut lab = Lab {
        dir: dir.clone(),
        keep: opts.keep,
        children: Vec::new(),
    };
    let write = |name: &str, text: String| {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(|source| DemoError::TempDir {
            path: path.display().to_string(),
            source,
        })?;
        Ok::<PathBuf, DemoError>(path)
    };
    let token = format!("demo-{:016x}", rand::random::<u64>());
    let token_file = write("token", format!("{token}\n"))?;
    let hook_log = dir.join("vip-events.log");
    let hook = write(
        "vip-hook.sh",
        format!(
            "#!/bin/sh\n# claim|release VIP NODE TERM: only logs, moves nothing\necho \"$(date +%s%N) $3 $1 $4\" >> '{}'\n",
            hook_log.display()
        ),
    )?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&hook, std::fs::Permissions::from_mode(0o755)).map_err(
            |source| DemoError::TempDir {
                path: hook.display().to_string(),
                source,
            },
        )?;
    }

    let t0 = now_ms();
    let mut events: Vec<Event> = Vec::new();
    let note = |events: &mut Vec<Event>, at_ms: u64, text: String| {
        events.push(Event { at_ms, text });
    };

    let mut addrs = Vec::new();
    for id in 1..=3u64 {
        let api = format!("127.0.0.1:{}", free_port()?);
        let peer = format!("127.0.0.1:{}", free_port()?);
        addrs.push((id, api, peer));
    }
    let peers = addrs
        .iter()
        .map(|(id, _, p)| format!("{id}={p}"))
        .collect::<Vec<_>>()
        .join(",");
    // The nodes share a cluster secret, as a real cluster must.
    let secret_file = write("cluster-secret", crate::auth::new_cluster_secret() + "\n")?;
    for (id, addr, peer) in &addrs {
        let mut cmd = Command::new(&clbd);
        cmd.args([
            "--node-id",
            &id.to_string(),
            "--listen",
            addr,
            "--peer-listen",
            peer,
            "--peers",
            &peers,
        ])
        .arg("--cluster-secret-file")
        .arg(&secret_file)
        .arg("--data-dir")
        .arg(dir.join(format!("data{id}")))
        .arg("--token-file")
        .arg(&token_file)
        .arg("-o")
        .arg(dir.join(format!("haproxy{id}.cfg")))
        .args(["--stats-port", "0"])
        .env("RUST_LOG", crate::DEFAULT_LOG);
        if *id == 3 {
            cmd.args(["--role", "witness"]);
        } else {
            cmd.args(["--vip", VIP, "--vip-hook"]).arg(&hook);
            if haproxy {
                cmd.arg("--haproxy-socket")
                    .arg(dir.join(format!("admin{id}.sock")))
                    .arg("--haproxy-master-socket")
                    .arg(dir.join(format!("master{id}.sock")))
                    .args(["--reload-min-interval-ms", "200"]);
            }
        }
        lab.spawn(&format!("node{id}"), cmd)?;
    }
    note(
        &mut events,
        now_ms(),
        format!(
            "started balancers 1 and 2 and witness 3 on {}",
            addrs
                .iter()
                .map(|(_, a, _)| a.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    if haproxy {
        for id in 1..=2u64 {
            let cfg = dir.join(format!("haproxy{id}.cfg"));
            poll(|| async { cfg.exists().then_some(()) })
                .await
                .ok_or_else(|| lab.timeout("the first rendered haproxy config"))?;
            let mut cmd = Command::new("haproxy");
            cmd.args(["-W", "-db", "-S"])
                .arg(dir.join(format!("master{id}.sock")))
                .arg("-f")
                .arg(&cfg);
            lab.spawn(&format!("haproxy{id}"), cmd)?;
        }
    }

    let clients: Vec<(u64, Client)> = addrs
        .iter()
        .map(|(id, a, _)| Ok((*id, Client::new(a, Some(token.clone()))?)))
        .collect::<Result<_, DemoError>>()?;
    let agreed = |alive: Vec<u64>| {
        let clients = &clients;
        async move {
            let mut seen: Option<(u64, u64)> = None;
            for (id, c) in clients.iter().filter(|(id, _)| alive.contains(id)) {
                let v = view(c).await?;
                let l = (v.leader?, v.term);
                if seen.is_some_and(|s| s.0 != l.0) {
                    return None;
                }
                let _ = id;
                seen = Some(l);
            }
            seen.filter(|(l, _)| alive.contains(l))
        }
    };
    let (leader, term) = poll(|| agreed(vec![1, 2, 3]))
        .await
        .ok_or_else(|| lab.timeout("a leader all nodes agree on"))?;
    note(
        &mut events,
        now_ms(),
        format!("node {leader} seen as leader by all nodes (term {term})"),
    );

    let any = Client::new(
        &addrs
            .iter()
            .map(|(_, a, _)| a.as_str())
            .collect::<Vec<_>>()
            .join(","),
        Some(token.clone()),
    )?;
    let svc_port = free_port()?;
    let web = ServiceBody {
        port: svc_port.into(),
        mode: Some(crate::model::Mode::Http),
        check: Some(crate::model::Check::None),
        ..Default::default()
    };
    any.define_service("web", &web).await?;
    for name in ["a", "b"] {
        let port = backend(if name == "a" {
            "backend a"
        } else {
            "backend b"
        })
        .await?;
        any.register("web", name, "127.0.0.1", Some(port), None, None)
            .await?;
    }
    note(
        &mut events,
        now_ms(),
        format!("registered backends a and b in service web (port {svc_port})"),
    );

    let claim = |node: u64, after: u64| {
        let log = hook_log.clone();
        async move {
            hook_events(&log)
                .into_iter()
                .find(|e| e.1 == node && e.2 == "claim" && e.0 >= after)
        }
    };
    let first = poll(|| claim(leader, 0))
        .await
        .ok_or_else(|| lab.timeout("the leader's VIP claim"))?;
    note(
        &mut events,
        first.0,
        format!("node {leader} claimed the VIP {VIP} (term {})", first.3),
    );
    if haproxy {
        let answer = poll(|| async {
            let a = through_haproxy(svc_port).await?;
            a.starts_with("hello").then_some(a)
        })
        .await
        .ok_or_else(|| lab.timeout("an answer through haproxy"))?;
        note(
            &mut events,
            now_ms(),
            format!("request through haproxy: {answer:?}"),
        );
    }

    let killed_at = now_ms();
    lab.kill(&format!("node{leader}"));
    lab.kill(&format!("haproxy{leader}"));
    note(
        &mut events,
        killed_at,
        format!("killed node {leader} (SIGKILL to clbd and its haproxy)"),
    );
    let survivors: Vec<u64> = [1, 2, 3].into_iter().filter(|&i| i != leader).collect();
    let (next, next_term) = poll(|| agreed(survivors.clone()))
        .await
        .ok_or_else(|| lab.timeout("a new leader"))?;
    note(
        &mut events,
        now_ms(),
        format!("node {next} seen as the new leader (term {next_term})"),
    );
    let second = poll(|| claim(next, killed_at))
        .await
        .ok_or_else(|| lab.timeout("the new leader's VIP claim"))?;
    note(
        &mut events,
        second.0,
        format!("node {next} claimed the VIP {VIP} (term {})", second.3),
    );
    if haproxy {
        let answer = poll(|| async {
            let a = through_haproxy(svc_port).await?;
            a.starts_with("hello").then_some(a)
        })
        .await
        .ok_or_else(|| lab.timeout("an answer through the surviving haproxy"))?;
        note(
            &mut events,
            now_ms(),
            format!("request through the surviving haproxy: {answer:?}"),
        );
    }

    let all = hook_events(&hook_log);
    let last_old = all
        .iter()
        .filter(|e| e.1 == leader && e.2 == "claim")
        .map(|e| (e.0, e.3))
        .max();
    events.sort_by_key(|e| e.at_ms);
    let rel = |ms: u64| format!("+{:.3}s", ms.saturating_sub(t0) as f64 / 1_000.0);
    let mut out = vec![format!(
        "clb demo: 2 balancers and a witness on 127.0.0.1, haproxy: {}, files in {}{}",
        if haproxy {
            "yes"
        } else {
            "no (not installed or --no-haproxy)"
        },
        dir.display(),
        if opts.keep { " (kept)" } else { " (removed)" }
    )];
    out.extend(
        events
            .iter()
            .map(|e| format!("  {:>9}  {}", rel(e.at_ms), e.text)),
    );
    if let Some((at, t)) = last_old {
        out.push(format!(
            "old holder's last claim: node {leader} at {} (term {t}), {} the new claim at {} (term {})",
            rel(at),
            if at < second.0 { "before" } else { "NOT before" },
            rel(second.0),
            second.3
        ));
    }
    out.push(format!(
        "the VIP moved to node {next} {} ms after node {leader} was killed",
        second.0.saturating_sub(killed_at)
    ));
    drop(lab);
    Ok(out.join("\n"))
}
