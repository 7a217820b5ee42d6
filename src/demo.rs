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
//! The processes, ports, hook and backends are the `lab` crate's, the one
//! the tests and benches use.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::views::{ClusterView, ServiceBody};
use lab::traffic::HttpBackend;
use lab::{hook_events, Cluster, Proc};

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

/// The demo's cluster (its nodes and temp dir) and haproxies; killed and
/// removed on drop unless kept.
struct Demo {
    /// Before `cluster`: stopped before the temp dir they use goes.
    haproxies: BTreeMap<u64, Proc>,
    cluster: Cluster,
}

impl Demo {
    fn dir(&self) -> PathBuf {
        self.cluster.path().to_path_buf()
    }

    /// A step that did not happen in time; the temp dir is kept so the
    /// node logs the message points to are still there.
    fn timeout(&mut self, what: &str) -> DemoError {
        self.cluster.dir.disable_cleanup(true);
        DemoError::Timeout(STEP_TIMEOUT, what.into(), self.dir().display().to_string())
    }

    /// Polls `f` until it returns `Some`, for at most [`STEP_TIMEOUT`].
    async fn poll<T, F, Fut>(&mut self, what: &str, f: F) -> Result<T, DemoError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        match lab::eventually(STEP_TIMEOUT, what, f).await {
            Ok(v) => Ok(v),
            Err(_) => Err(self.timeout(what)),
        }
    }
}

fn haproxy_installed() -> bool {
    crate::on_path("haproxy").is_some()
}

/// A sample backend on 127.0.0.1 answering its name; lives as long as the runtime.
async fn backend(name: &str) -> Result<u16, DemoError> {
    let b = HttpBackend::start(format!("hello from {name}\n"))
        .await
        .map_err(DemoError::Port)?;
    Ok(b.port)
}

/// `GET /v1/cluster` on one node, bounded.
async fn view(client: &Client) -> Option<ClusterView> {
    tokio::time::timeout(Duration::from_secs(2), client.cluster())
        .await
        .ok()?
        .ok()
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
    let token = format!("demo-{:016x}", rand::random::<u64>());
    // The nodes share a cluster secret, as a real cluster must.
    let secret = crate::auth::new_cluster_secret();
    let temp = |source| DemoError::TempDir {
        path: std::env::temp_dir().display().to_string(),
        source,
    };
    let mut cluster = Cluster::new(
        &clbd,
        "clb-demo-",
        &token,
        &secret,
        &[("RUST_LOG", crate::DEFAULT_LOG)],
    )
    .map_err(temp)?;
    cluster.own_group = true;
    if opts.keep {
        cluster.dir.disable_cleanup(true);
    }
    let dir = cluster.path().to_path_buf();
    let (hook, hook_log) = lab::vip_hook(&dir).map_err(|source| DemoError::TempDir {
        path: dir.display().to_string(),
        source,
    })?;

    let t0 = now_ms();
    let mut events: Vec<Event> = Vec::new();
    let note = |events: &mut Vec<Event>, at_ms: u64, text: String| {
        events.push(Event { at_ms, text });
    };

    // Balancers 1 and 2 move the VIP and drive their haproxy; 3 is a witness.
    let args = |id: u64| {
        let mut a: Vec<String> = vec!["--stats-port".into(), "0".into()];
        if id == 3 {
            a.extend(["--role".into(), "witness".into()]);
        } else {
            a.extend(["--vip".into(), VIP.into(), "--vip-hook".into()]);
            a.push(hook.display().to_string());
            if haproxy {
                let sock = |kind: &str| dir.join(format!("{kind}{id}.sock")).display().to_string();
                a.extend(["--haproxy-socket".into(), sock("admin")]);
                a.extend(["--haproxy-master-socket".into(), sock("master")]);
                a.extend(["--reload-min-interval-ms".into(), "200".into()]);
            }
        }
        a
    };
    // clbd's own timers: the demo shows the defaults an operator gets.
    cluster
        .spawn_peers(3, &[], args)
        .map_err(|source| DemoError::Spawn {
            what: "clbd".into(),
            source,
        })?;
    let mut demo = Demo {
        haproxies: BTreeMap::new(),
        cluster,
    };
    let addrs: Vec<(u64, String)> = demo
        .cluster
        .nodes
        .values()
        .map(|n| (n.id, n.addr.clone()))
        .collect();
    note(
        &mut events,
        now_ms(),
        format!(
            "started balancers 1 and 2 and witness 3 on {}",
            addrs
                .iter()
                .map(|(_, a)| a.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    if haproxy {
        for id in 1..=2u64 {
            let cfg = dir.join(format!("haproxy{id}.cfg"));
            demo.poll("the first rendered haproxy config", || async {
                cfg.exists().then_some(())
            })
            .await?;
            let mut cmd = Command::new("haproxy");
            cmd.args(["-W", "-db", "-S"])
                .arg(dir.join(format!("master{id}.sock")))
                .arg("-f")
                .arg(&cfg);
            let log = dir.join(format!("haproxy{id}.log"));
            let child = Proc::build(&mut cmd)
                .log(&log)
                .truncate()
                .group()
                .die_with_parent()
                .spawn()
                .map_err(|source| DemoError::Spawn {
                    what: format!("haproxy{id}"),
                    source,
                })?;
            demo.haproxies.insert(id, child);
        }
    }

    let clients: Vec<(u64, Client)> = addrs
        .iter()
        .map(|(id, a)| Ok((*id, Client::new(a, Some(token.clone()))?)))
        .collect::<Result<_, DemoError>>()?;
    let agreed = |alive: Vec<u64>| {
        let clients = &clients;
        async move {
            lab::agreed_leader(&alive, |id| async move {
                let c = &clients.iter().find(|(n, _)| *n == id)?.1;
                let v = view(c).await?;
                Some((v.leader, v.term))
            })
            .await
        }
    };
    let (leader, term) = demo
        .poll("a leader all nodes agree on", || agreed(vec![1, 2, 3]))
        .await?;
    note(
        &mut events,
        now_ms(),
        format!("node {leader} seen as leader by all nodes (term {term})"),
    );

    let any = Client::new(
        &addrs
            .iter()
            .map(|(_, a)| a.as_str())
            .collect::<Vec<_>>()
            .join(","),
        Some(token.clone()),
    )?;
    let svc_port = lab::free_ports(1).map_err(DemoError::Port)?;
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

    // The hook stamps nanoseconds; the timeline is in milliseconds.
    let ms = |e: &lab::HookEvent| (e.at_ns / 1_000_000) as u64;
    let claim = |node: u64, after: u64| {
        let log = hook_log.clone();
        async move {
            hook_events(&log)
                .into_iter()
                .find(|e| e.node == node && e.action == "claim" && ms(e) >= after)
        }
    };
    // The first leader may have handed over since (its haproxy had not
    // taken a configuration yet): the holder is the node all agree leads
    // and that claimed.
    let (leader, first) = demo
        .poll("the leader's VIP claim", || async {
            let (l, _) = agreed(vec![1, 2, 3]).await?;
            Some((l, claim(l, 0).await?))
        })
        .await?;
    note(
        &mut events,
        ms(&first),
        format!("node {leader} claimed the VIP {VIP} (term {})", first.term),
    );
    if haproxy {
        let answer = demo
            .poll("an answer through haproxy", || async {
                let a = through_haproxy(svc_port).await?;
                a.starts_with("hello").then_some(a)
            })
            .await?;
        note(
            &mut events,
            now_ms(),
            format!("request through haproxy: {answer:?}"),
        );
    }

    let killed_at = now_ms();
    demo.cluster.node_mut(leader).kill();
    demo.haproxies.remove(&leader);
    note(
        &mut events,
        killed_at,
        format!("killed node {leader} (SIGKILL to clbd and its haproxy)"),
    );
    let survivors: Vec<u64> = [1, 2, 3].into_iter().filter(|&i| i != leader).collect();
    let (next, next_term) = demo
        .poll("a new leader", || agreed(survivors.clone()))
        .await?;
    note(
        &mut events,
        now_ms(),
        format!("node {next} seen as the new leader (term {next_term})"),
    );
    let second = demo
        .poll("the new leader's VIP claim", || claim(next, killed_at))
        .await?;
    note(
        &mut events,
        ms(&second),
        format!("node {next} claimed the VIP {VIP} (term {})", second.term),
    );
    if haproxy {
        let answer = demo
            .poll("an answer through the surviving haproxy", || async {
                let a = through_haproxy(svc_port).await?;
                a.starts_with("hello").then_some(a)
            })
            .await?;
        note(
            &mut events,
            now_ms(),
            format!("request through the surviving haproxy: {answer:?}"),
        );
    }

    let all = hook_events(&hook_log);
    let last_old = all
        .iter()
        .filter(|e| e.node == leader && e.action == "claim")
        .map(|e| (ms(e), e.term))
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
            if at < ms(&second) { "before" } else { "NOT before" },
            rel(ms(&second)),
            second.term
        ));
    }
    out.push(format!(
        "the VIP moved to node {next} {} ms after node {leader} was killed",
        ms(&second).saturating_sub(killed_at)
    ));
    drop(demo);
    Ok(out.join("\n"))
}
