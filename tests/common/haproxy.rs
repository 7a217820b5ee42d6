//! A one-node clb driving a real haproxy (Debian package, master-worker
//! mode) and real backend HTTP servers on loopback: shared by the haproxy
//! test files, which include it with `#[path]` beside `cluster/harness.rs`.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use clb::client::Client;
use clb::model::{Check, Mode};
use clb::render::RenderStatus;
use clb::views::ServiceBody;

use crate::harness::{eventually, ClusterExt, NodeExt};
use lab::traffic::HttpBackend;
use lab::{free_port, Cluster, Node, Proc};

/// A backend HTTP server answering its own name, counting requests.
pub struct Backend {
    pub name: String,
    pub port: u16,
    pub hits: Arc<AtomicU64>,
}

pub async fn backend(name: &str) -> Backend {
    let b = HttpBackend::start(name).await.expect("backend");
    Backend {
        name: name.into(),
        port: b.port,
        hits: b.hits,
    }
}

/// haproxy in master-worker mode on a config clbd rendered; stopped on
/// drop (SIGTERM: the master stops its workers).
pub struct Haproxy {
    pub child: Proc,
}

impl Haproxy {
    pub fn start(cfg: &Path, master: &Path) -> Haproxy {
        Self::spawn(Self::command(cfg, master, Stdio::null()))
    }

    /// Like [`Haproxy::start`], with the master's and workers' stderr (the
    /// master's notes on workers, haproxy's own log lines) in `log`. With
    /// `cores`, haproxy runs in `log`'s directory with core dumps allowed, so
    /// a crashed worker leaves a core there (where the kernel's core_pattern
    /// is a plain file name).
    pub fn start_logged(cfg: &Path, master: &Path, log: &Path, cores: bool) -> Haproxy {
        let f = std::fs::File::create(log).expect("haproxy log file");
        let mut cmd = Self::command(cfg, master, Stdio::from(f));
        if cores {
            cmd.current_dir(log.parent().expect("log in a directory"));
            use std::os::unix::process::CommandExt;
            // SAFETY: only setrlimit(2) between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    let unlimited = libc::rlimit {
                        rlim_cur: libc::RLIM_INFINITY,
                        rlim_max: libc::RLIM_INFINITY,
                    };
                    libc::setrlimit(libc::RLIMIT_CORE, &unlimited);
                    Ok(())
                });
            }
        }
        Self::spawn(cmd)
    }

    fn command(cfg: &Path, master: &Path, stderr: Stdio) -> Command {
        let mut cmd = Command::new("haproxy");
        cmd.args(["-W", "-db", "-S"])
            .arg(master)
            .arg("-f")
            .arg(cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        cmd
    }

    fn spawn(mut cmd: Command) -> Haproxy {
        let child = Proc::build(&mut cmd)
            .graceful()
            .spawn()
            .expect("haproxy is installed (scripts/test.sh installs it)");
        Haproxy { child }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// A one-node clb with haproxy control, plus the paths a test needs.
pub struct Balancer {
    pub cluster: Cluster,
    pub cfg: PathBuf,
    pub master: PathBuf,
    pub admin: PathBuf,
}

impl Balancer {
    pub async fn start(extra: &[&str]) -> Balancer {
        let dir = tempfile::tempdir().unwrap().keep();
        let master = dir.join("master.sock");
        let admin = dir.join("admin.sock");
        let mut args = vec![
            "--haproxy-socket".to_string(),
            admin.display().to_string(),
            "--haproxy-master-socket".into(),
            master.display().to_string(),
            "--stats-port".into(),
            "0".into(),
            "--reload-min-interval-ms".into(),
            "200".into(),
            // These tests move members in and out on purpose; the guardrail has its own test.
            "--guardrail-share".into(),
            "1".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let cluster = Cluster::start_with(1, &refs).await;
        let cfg = cluster.dir.path().join("haproxy1.cfg");
        Balancer {
            cluster,
            cfg,
            master,
            admin,
        }
    }

    pub fn node(&self) -> &Node {
        self.cluster.node(1)
    }

    pub fn client(&self) -> Client {
        self.node().client()
    }

    /// The node's render state; `None` while it does not show one.
    pub async fn render_status(&self) -> Option<RenderStatus> {
        let v = self.client().cluster().await.unwrap();
        v.node(1)?.render.clone()
    }

    /// Waits until the node's render error says `what`.
    pub async fn error_saying(&self, what: &str, within: Duration) -> RenderStatus {
        let waiting_for = format!("the render error to say {what:?}");
        eventually(within, &waiting_for, || async {
            let r = self.render_status().await?;
            r.last_error
                .as_deref()
                .is_some_and(|e| e.contains(what))
                .then_some(r)
        })
        .await
    }

    /// Waits until haproxy runs the registry's latest index and the file
    /// on disk holds it too (a member-only change reaches haproxy first and
    /// the file up to --file-lag-ms later; see [`Balancer::live`]).
    pub async fn applied(&self) -> RenderStatus {
        self.caught_up(true).await
    }

    /// Waits until haproxy runs the registry's latest index, whether or not
    /// the file holds it yet.
    pub async fn live(&self) -> RenderStatus {
        self.caught_up(false).await
    }

    async fn caught_up(&self, file_too: bool) -> RenderStatus {
        let what = if file_too {
            "haproxy runs the latest config and the file holds it"
        } else {
            "haproxy runs the latest config"
        };
        eventually(Duration::from_secs(15), what, || async {
            let v = self.client().cluster().await.ok()?;
            let r = v.node(1)?.render.clone()?;
            let file = !file_too || r.rendered_index >= r.applied_index;
            (r.applied_index >= v.applied_index && file && r.last_error.is_none()).then_some(r)
        })
        .await
    }

    async fn first_config(&self) {
        let cfg = self.cfg.clone();
        eventually(Duration::from_secs(10), "first rendered config", || async {
            cfg.exists().then_some(())
        })
        .await;
    }

    pub async fn start_haproxy(&self) -> Haproxy {
        self.first_config().await;
        Haproxy::start(&self.cfg, &self.master)
    }

    /// [`Balancer::start_haproxy`] with haproxy's stderr in `log` (see
    /// [`Haproxy::start_logged`]).
    pub async fn start_haproxy_logged(&self, log: &Path, cores: bool) -> Haproxy {
        self.first_config().await;
        Haproxy::start_logged(&self.cfg, &self.master, log, cores)
    }
}

/// `n` requests on fresh connections; counts answers per backend name and failures.
pub async fn traffic(port: u16, n: usize) -> (BTreeMap<String, usize>, usize) {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut seen = BTreeMap::new();
    let mut failed = 0;
    for _ in 0..n {
        match http.get(format!("http://127.0.0.1:{port}/")).send().await {
            Ok(r) if r.status().is_success() => {
                *seen.entry(r.text().await.unwrap_or_default()).or_insert(0) += 1
            }
            _ => failed += 1,
        }
    }
    (seen, failed)
}

pub async fn define_web(client: &Client, port: u16) {
    client
        .define_service(
            "web",
            &ServiceBody {
                port: port.into(),
                mode: Some(Mode::Http),
                check: Some(Check::None),
                ..Default::default()
            },
        )
        .await
        .expect("define service");
}

pub async fn define_svc(client: &Client, name: &str) {
    client
        .define_service(
            name,
            &ServiceBody {
                port: free_port().into(),
                check: Some(Check::Tcp),
                ..Default::default()
            },
        )
        .await
        .unwrap();
}
