//! Failover beside keepalived, in network namespaces on one machine.
//!
//! - `drills`: "the leader host dies" (its clbd or keepalived and its haproxy
//!   SIGKILLed, its link cut, at one instant) → the first successful response
//!   through the VIP seen by a client sending every ~1 ms; ≥ 20 drills per
//!   timer profile per system, with a sampler checking the VIP is never on
//!   both balancers.
//! - `stability`: no fault, for `--duration` seconds: clb under write load and
//!   a keepalived pair side by side; leader changes, VRRP MASTER transitions
//!   and moments with two VIP holders.
//!
//! ```text
//! cargo bench --bench failover -- drills [--drills N] [--profiles relaxed,default,fast,extreme] [--json FILE]
//! cargo bench --bench failover -- stability [--duration SECS] [--profiles ...] [--json FILE]
//! ```
//!
//! Both systems get the same topology (see `lab`): balancers A and B, each
//! with its own haproxy 2.6 in front of one backend K, a client C, and for
//! clb a witness W; every host in its own namespace on a bridge (the helpers
//! are the `lab` crate's `netns` and `traffic`). Needs root, `haproxy`, `keepalived` and `ip`,
//! nothing else; it installs nothing. Every process is killed by pid and every
//! namespace removed at the end, on error and on Ctrl-C.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clb::model::{self, Check};
use clb::views::{ClusterView, Healthz, NodeView, RegisterBody, ServiceBody};
use lab::netns::{self, Host, Lab};
use lab::traffic::{self, Sample, Shot};
use lab::wait::poll_every;
use rand::Rng;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

const USAGE: &str = "usage: cargo bench --bench failover -- drills|stability \
[--drills N] [--duration SECS] [--profiles relaxed,default,fast,extreme] [--json FILE]";
const TOKEN: &str = "bench-token";
/// Fixed ports are fine here: every address belongs to our own namespaces.
const API_PORT: u16 = 7000;
const SVC_PORT: u16 = 80;
const LOAD_PORT: u16 = 81;
const BACKEND_PORT: u16 = 8080;
const VIP_LAST: u8 = 100;
const BACKEND_LAST: u8 = 20;
const CLIENT_LAST: u8 = 10;
/// clb's presets; keepalived runs beside each with an advert interval of
/// 1 s (its default), 0.1 s and 0.01 s.
const PROFILES: [&str; 4] = ["relaxed", "default", "fast", "extreme"];
/// Sampler period: overlaps shorter than this can be missed.
const SAMPLE_EVERY: Duration = Duration::from_millis(5);
/// How long one drill may wait for anything (election, catch-up).
const STEP_MAX: Duration = Duration::from_secs(60);
/// Upper bound on any lab's lifetime (background threads stop after it).
const LAB_MAX: Duration = Duration::from_secs(3 * 3600);

// ---------------------------------------------------------------- arguments

#[derive(PartialEq)]
enum Mode {
    Drills,
    Stability,
}

struct Opts {
    mode: Mode,
    drills: usize,
    duration: Duration,
    profiles: Vec<String>,
    json: Option<PathBuf>,
}

fn parse_args() -> Result<Opts> {
    let mut mode = None;
    let mut bench = false;
    let mut drills = 20;
    let mut duration = Duration::from_secs(600);
    let mut profiles: Vec<String> = PROFILES.iter().map(|p| p.to_string()).collect();
    let mut json = None;
    let mut unknown = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().context(USAGE);
        match a.as_str() {
            // cargo bench passes --bench to harness = false targets; cargo
            // test (e.g. --all-targets) passes nothing: then we do nothing.
            "--bench" => bench = true,
            "drills" => mode = Some(Mode::Drills),
            "stability" => mode = Some(Mode::Stability),
            "--drills" => drills = value()?.parse().context("--drills N")?,
            "--duration" => {
                duration = Duration::from_secs(value()?.parse().context("--duration SECS")?)
            }
            "--profiles" => {
                profiles = value()?.split(',').map(|p| p.trim().to_string()).collect();
                if let Some(p) = profiles.iter().find(|p| !PROFILES.contains(&p.as_str())) {
                    bail!("unknown profile {p:?}\n{USAGE}");
                }
            }
            "--json" => json = Some(PathBuf::from(value()?)),
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            // Refused below, in bench mode only: `cargo test --all-targets --
            // --nocapture` passes test-harness flags here too.
            other => unknown.push(other.to_string()),
        }
    }
    if bench && mode.is_some() {
        if let Some(other) = unknown.first() {
            bail!("unknown argument {other:?}\n{USAGE}");
        }
    }
    let Some(mode) = mode.filter(|_| bench) else {
        // Under `cargo test --all-targets`, or `cargo bench` without a mode:
        // minutes of namespaces and load are not a test.
        println!("failover benchmark: nothing to do without `cargo bench --bench failover -- drills|stability`\n{USAGE}");
        std::process::exit(0);
    };
    Ok(Opts {
        mode,
        drills: drills.max(1),
        duration,
        profiles,
        json,
    })
}

fn main() -> Result<()> {
    let opts = parse_args()?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("network namespaces need root");
    }
    for tool in ["haproxy", "keepalived", "ip"] {
        if which(tool).is_none() {
            bail!("{tool} not found (apt-get install -y haproxy keepalived iproute2)");
        }
    }
    lab::cleanup_on_signals();
    let out = run(&opts);
    netns::cleanup_all();
    out
}

fn run(opts: &Opts) -> Result<()> {
    let machine = machine();
    println!("# failover: clb beside keepalived\n");
    println!(
        "machine: {} CPUs, kernel {}, {}, {}, clb {}\n",
        machine.nproc,
        machine.kernel,
        machine.haproxy.as_deref().unwrap_or("?"),
        machine.keepalived.as_deref().unwrap_or("?"),
        machine.commit.as_deref().unwrap_or("?"),
    );
    let mut report = serde_json::Map::new();
    report.insert("machine".into(), serde_json::to_value(&machine)?);
    match opts.mode {
        Mode::Drills => {
            report.insert("drills".into(), drills(opts)?);
        }
        Mode::Stability => {
            report.insert("stability".into(), stability(opts)?);
        }
    }
    if let Some(path) = &opts.json {
        std::fs::write(path, serde_json::to_string_pretty(&Value::Object(report))?)
            .with_context(|| format!("write {}", path.display()))?;
        println!("\nJSON written to {}", path.display());
    }
    Ok(())
}

fn which(bin: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    std::env::split_paths(&format!("{path}:/usr/sbin:/sbin"))
        .map(|d| d.join(bin))
        .find(|p| p.is_file())
}

fn first_line(bin: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(which(bin)?).args(args).output().ok()?;
    // keepalived prints its version on stderr.
    let text = [out.stdout, out.stderr].concat();
    String::from_utf8_lossy(&text)
        .lines()
        .next()
        .map(|l| l.trim().to_string())
}

/// The report's `machine` object.
#[derive(Serialize)]
struct Machine {
    nproc: usize,
    kernel: String,
    loadavg_at_start: String,
    commit: Option<String>,
    haproxy: Option<String>,
    keepalived: Option<String>,
}

fn machine() -> Machine {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let commit = Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string());
    Machine {
        nproc: std::thread::available_parallelism().map_or(0, |n| n.get()),
        kernel: read("/proc/sys/kernel/osrelease").trim().to_string(),
        loadavg_at_start: read("/proc/loadavg").trim().to_string(),
        commit,
        haproxy: first_line("haproxy", &["-v"]),
        keepalived: first_line("keepalived", &["--version"]),
    }
}

/// A value as JSON text: how the tables have always shown report cells
/// (`600.0`, `null`, quoted strings).
fn json_text(v: &impl Serialize) -> String {
    serde_json::to_value(v).unwrap_or(Value::Null).to_string()
}

/// [`json_text`], or – where the report has `null`.
fn dash(v: &impl Serialize) -> String {
    match serde_json::to_value(v).unwrap_or(Value::Null) {
        Value::Null => "–".into(),
        v => v.to_string(),
    }
}

// ---------------------------------------------------------------- the lab

#[derive(Clone, Copy, PartialEq, Debug)]
enum System {
    Clb,
    Keepalived,
}

impl System {
    fn name(self) -> &'static str {
        match self {
            System::Clb => "clb",
            System::Keepalived => "keepalived",
        }
    }
}

/// One system's namespaces and processes: balancers A and B (haproxy each),
/// backend K, client C, and for clb witness W.
struct Pair {
    system: System,
    profile: String,
    lab: Lab,
    bal: [Host; 2],
    witness: Option<Host>,
    client: Host,
    vip: Ipv4Addr,
    samples: Arc<Mutex<Vec<Sample>>>,
}

impl Pair {
    fn new(system: System, profile: &str, third_octet: u8) -> Result<Pair> {
        let prefix = format!("fo{}{}", std::process::id() % 100_000, &system.name()[..1]);
        let mut lab = Lab::new(&prefix, [10, 77, third_octet])?;
        let a = lab.add_host("a", 1)?;
        let b = lab.add_host("b", 2)?;
        let witness = match system {
            System::Clb => Some(lab.add_host("w", 3)?),
            System::Keepalived => None,
        };
        let k = lab.add_host("k", BACKEND_LAST)?;
        let client = lab.add_host("c", CLIENT_LAST)?;
        let backend = SocketAddr::from((k.ip, BACKEND_PORT));
        traffic::backend(&k.ns, backend, "k", lab.stop.clone(), LAB_MAX)?;
        let vip = lab.addr(VIP_LAST);
        let samples = traffic::sampler(
            vec![a.ns.clone(), b.ns.clone()],
            vip,
            SAMPLE_EVERY,
            lab.stop.clone(),
            LAB_MAX,
        );
        let mut pair = Pair {
            system,
            profile: profile.to_string(),
            lab,
            bal: [a, b],
            witness,
            client,
            vip,
            samples,
        };
        pair.start()
            .with_context(|| format!("{} {profile}: start", system.name()))?;
        Ok(pair)
    }

    fn start(&mut self) -> Result<()> {
        match self.system {
            System::Clb => {
                self.spawn_clbd(2)?;
                for i in 0..2 {
                    self.spawn_clbd(i)?;
                }
                for i in 0..2 {
                    let cfg = self.cfg(i);
                    poll_every(STEP_MAX, ms(20), "a rendered haproxy config", || {
                        cfg.exists().then_some(())
                    })?;
                    self.spawn_haproxy(i)?;
                }
                let api = self.api(0);
                let ns = self.bal[0].ns.clone();
                let put = |path: &str, body: String| {
                    poll_every(STEP_MAX, ms(50), path, || {
                        let r =
                            netns::http(&ns, api, "PUT", path, Some(TOKEN), Some(&body), ms(3000))?;
                        (r.0 == 200).then_some(())
                    })
                };
                let service = |port: u16, mode: model::Mode| ServiceBody {
                    port: port.into(),
                    mode: Some(mode),
                    check: Some(Check::None),
                    ..Default::default()
                };
                put(
                    "/v1/services/web",
                    serde_json::to_string(&service(SVC_PORT, model::Mode::Http))?,
                )?;
                put(
                    "/v1/services/web/members/k",
                    serde_json::to_string(&RegisterBody {
                        address: self.lab.addr(BACKEND_LAST).to_string(),
                        port: Some(BACKEND_PORT.into()),
                        ..Default::default()
                    })?,
                )?;
                // The write load's service: members on loopback ports nobody
                // connects to, no health checks, so churn sends no traffic.
                put(
                    "/v1/services/load",
                    serde_json::to_string(&service(LOAD_PORT, model::Mode::Tcp))?,
                )?;
            }
            System::Keepalived => {
                for i in 0..2 {
                    self.write_keepalived_files(i)?;
                    self.spawn_haproxy(i)?;
                    self.spawn_keepalived(i)?;
                }
            }
        }
        Ok(())
    }

    fn dir(&self) -> PathBuf {
        self.lab.dir().to_path_buf()
    }

    fn cfg(&self, i: usize) -> PathBuf {
        self.dir().join(format!("haproxy-{}.cfg", self.bal[i].name))
    }

    /// Node `i`'s API address (clb: 0 = A, 1 = B, 2 = W).
    fn api(&self, i: usize) -> SocketAddr {
        let ip = if i < 2 {
            self.bal[i].ip
        } else {
            self.witness
                .as_ref()
                .map(|w| w.ip)
                .unwrap_or(Ipv4Addr::LOCALHOST)
        };
        SocketAddr::from((ip, API_PORT))
    }

    /// Node `i`'s peer address: the API's host, the next port.
    fn peer(&self, i: usize) -> SocketAddr {
        let api = self.api(i);
        SocketAddr::new(api.ip(), api.port() + 1)
    }

    fn host(&self, i: usize) -> &Host {
        if i < 2 {
            &self.bal[i]
        } else {
            self.witness.as_ref().unwrap_or(&self.bal[0])
        }
    }

    fn spawn_clbd(&mut self, i: usize) -> Result<()> {
        let peers = (0..3)
            .map(|j| format!("{}={}", j + 1, self.peer(j)))
            .collect::<Vec<_>>()
            .join(",");
        let d = self.dir();
        let h = self.host(i).clone();
        let tokens = d.join("tokens");
        // Written once: rewriting it races with a node reading it.
        if !tokens.exists() {
            std::fs::write(&tokens, format!("{TOKEN}\n"))?;
        }
        let secret = d.join("cluster-secret");
        if !secret.exists() {
            std::fs::write(&secret, format!("{}\n", clb::auth::new_cluster_secret()))?;
        }
        let mut args: Vec<String> = [
            "--node-id",
            &(i + 1).to_string(),
            "--listen",
            &self.api(i).to_string(),
            "--peer-listen",
            &self.peer(i).to_string(),
            "--cluster-secret-file",
            &secret.display().to_string(),
            "--peers",
            &peers,
            "--data-dir",
            &d.join(format!("data-{}", h.name)).display().to_string(),
            "--token-file",
            &tokens.display().to_string(),
            "-o",
            &d.join(format!("haproxy-{}.cfg", h.name))
                .display()
                .to_string(),
            "--stats-port",
            "0",
            "--timers",
            &self.profile,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if i == 2 {
            args.extend(["--role".into(), "witness".into()]);
        } else {
            args.extend([
                "--vip".into(),
                self.vip.to_string(),
                "--vip-hook".into(),
                "linux-vip:eth0".into(),
                "--haproxy-socket".into(),
                d.join(format!("admin-{}.sock", h.name))
                    .display()
                    .to_string(),
                "--haproxy-master-socket".into(),
                d.join(format!("master-{}.sock", h.name))
                    .display()
                    .to_string(),
            ]);
        }
        // CLB_BENCH_LOG: another RUST_LOG for the nodes, to look into a slow drill.
        let log = std::env::var("CLB_BENCH_LOG").unwrap_or_else(|_| clb::DEFAULT_LOG.into());
        let env = [("RUST_LOG", log.as_str())];
        self.lab.spawn(
            &format!("clbd-{}", h.name),
            &h.ns,
            env!("CARGO_BIN_EXE_clbd"),
            &args,
            &env,
        )?;
        Ok(())
    }

    fn spawn_haproxy(&mut self, i: usize) -> Result<()> {
        let d = self.dir();
        let h = self.bal[i].clone();
        let mut args: Vec<String> = vec!["-W".into(), "-db".into()];
        if self.system == System::Clb {
            args.extend([
                "-S".into(),
                d.join(format!("master-{}.sock", h.name))
                    .display()
                    .to_string(),
            ]);
        }
        args.extend(["-f".into(), self.cfg(i).display().to_string()]);
        self.lab
            .spawn(&format!("haproxy-{}", h.name), &h.ns, "haproxy", &args, &[])?;
        Ok(())
    }

    /// keepalived's config (the profile's advert interval, both BACKUP with
    /// nopreempt, as clb never preempts), its notify script, and a haproxy
    /// config with the same defaults as clb's built-in template.
    fn write_keepalived_files(&self, i: usize) -> Result<()> {
        let d = self.dir();
        let name = &self.bal[i].name;
        let (version, advert) = match self.profile.as_str() {
            "relaxed" => (2, "1"),
            "default" | "fast" => (3, "0.1"),
            _ => (3, "0.01"),
        };
        let notify = d.join(format!("notify-{name}.sh"));
        let notify_log = d.join(format!("notify-{name}.log"));
        // $3 is the new state; the time lets transitions be placed in a run.
        std::fs::write(
            &notify,
            format!(
                "#!/bin/sh\necho \"$(date +%s.%N) $3\" >> {}\n",
                notify_log.display()
            ),
        )?;
        std::fs::set_permissions(&notify, std::os::unix::fs::PermissionsExt::from_mode(0o700))?;
        let conf = format!(
            "global_defs {{\n    router_id ka_{name}\n    vrrp_version {version}\n    script_user root\n}}\n\
             vrrp_instance vi {{\n    state BACKUP\n    nopreempt\n    interface eth0\n    \
             virtual_router_id 51\n    priority 100\n    advert_int {advert}\n    \
             virtual_ipaddress {{\n        {}/32 dev eth0\n    }}\n    notify {}\n}}\n",
            self.vip,
            notify.display()
        );
        std::fs::write(d.join(format!("keepalived-{name}.conf")), conf)?;
        let haproxy = format!(
            "global\n    master-worker\n    log stderr format short local0 notice\n\n\
             defaults\n    log global\n    option dontlognull\n    option redispatch\n    retries 3\n    \
             timeout connect 5s\n    timeout client 60s\n    timeout server 60s\n    \
             timeout http-request 10s\n\n\
             frontend fe_web\n    bind *:{SVC_PORT}\n    mode http\n    option forwardfor\n    \
             default_backend be_web\n\n\
             backend be_web\n    mode http\n    balance roundrobin\n    server k {}:{BACKEND_PORT}\n",
            self.lab.addr(BACKEND_LAST)
        );
        std::fs::write(self.cfg(i), haproxy)?;
        Ok(())
    }

    fn spawn_keepalived(&mut self, i: usize) -> Result<()> {
        let d = self.dir();
        let h = self.bal[i].clone();
        let p = |what: &str| {
            d.join(format!("{what}-{}.pid", h.name))
                .display()
                .to_string()
        };
        // A killed instance leaves its pid files; keepalived refuses to start
        // ("already running") when a pid in them was reused meanwhile.
        for what in ["keepalived", "vrrp", "checkers"] {
            let _ = std::fs::remove_file(p(what));
        }
        let args: Vec<String> = vec![
            "--dont-fork".into(),
            "--log-console".into(),
            "--log-detail".into(),
            "--vrrp".into(),
            "-f".into(),
            d.join(format!("keepalived-{}.conf", h.name))
                .display()
                .to_string(),
            // Own pid files: two instances on one machine must not collide.
            "--pid".into(),
            p("keepalived"),
            "--vrrp_pid".into(),
            p("vrrp"),
            "--checkers_pid".into(),
            p("checkers"),
        ];
        self.lab.spawn(
            &format!("keepalived-{}", h.name),
            &h.ns,
            "/usr/sbin/keepalived",
            &args,
            &[],
        )?;
        Ok(())
    }

    fn daemon_label(&self, i: usize) -> String {
        let d = match self.system {
            System::Clb => "clbd",
            System::Keepalived => "keepalived",
        };
        format!("{d}-{}", self.bal[i].name)
    }

    /// The balancer holding the VIP in the latest sample, if exactly one does.
    fn holder(&self) -> Option<usize> {
        let s = self.samples.lock().ok()?.last()?.clone();
        match (s.held[0], s.held[1]) {
            (true, false) => Some(0),
            (false, true) => Some(1),
            _ => None,
        }
    }

    /// `GET path` on node `i`, read as the view `T`; `None` unless a 200.
    fn get<T: DeserializeOwned>(&self, i: usize, path: &str) -> Option<T> {
        let (code, body) = netns::http(
            &self.host(i).ns,
            self.api(i),
            "GET",
            path,
            Some(TOKEN),
            None,
            ms(1000),
        )?;
        if code != 200 {
            return None;
        }
        serde_json::from_str(&body).ok()
    }

    /// The latest state keepalived `i` reported to its notify script.
    fn notify_states(&self, i: usize) -> Vec<(f64, String)> {
        let path = self.dir().join(format!("notify-{}.log", self.bal[i].name));
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| {
                let (t, s) = l.split_once(' ')?;
                Some((t.parse().ok()?, s.trim().to_string()))
            })
            .collect()
    }

    /// Balancer `i` is a healthy standby behind `holder`: clb caught up with
    /// the leader, `/healthz` ok and not holding; keepalived in BACKUP.
    fn standby_ready(&mut self, i: usize, holder: usize) -> bool {
        let label = self.daemon_label(i);
        if !self.lab.running(&label) || self.holder() != Some(holder) {
            return false;
        }
        match self.system {
            System::Clb => {
                let Some(h) = self.get::<Healthz>(i, "/healthz") else {
                    return false;
                };
                let leader = self.get::<NodeView>(holder, "/v1/node");
                let mine = self.get::<NodeView>(i, "/v1/node");
                let (Some(leader), Some(mine)) = (leader, mine) else {
                    return false;
                };
                // Fit to take over: its haproxy runs the configuration and
                // its health gate lets it campaign.
                h.ok && mine.may_campaign
                    && !h.vip_held
                    && h.leader == Some(holder as u64 + 1)
                    && mine.applied_index >= leader.applied_index
            }
            System::Keepalived => self
                .notify_states(i)
                .last()
                .is_some_and(|(_, s)| s == "BACKUP"),
        }
    }

    /// Waits until host `i` opens TCP connections to the others, as a booting
    /// host's network-online target does before clbd starts. Right after
    /// the link comes back, the kernel's first ARP requests can go unanswered
    /// and every connect stalls until it retries: measured 0.66-0.9 s in this
    /// lab, during which a restarted clbd could not reach the witness and the
    /// next drill's election waited for it.
    fn network_online(&self, i: usize) -> Result<()> {
        let ns = self.host(i).ns.clone();
        let others: Vec<SocketAddr> = (0..3)
            .filter(|j| *j != i && (self.system == System::Clb || *j < 2))
            .map(|j| match self.system {
                System::Clb => self.peer(j),
                System::Keepalived => SocketAddr::new(self.bal[j].ip.into(), SVC_PORT),
            })
            .collect();
        poll_every(STEP_MAX, ms(10), "the restored host's network up", || {
            let reached = netns::in_ns(&ns, || {
                others
                    .iter()
                    .all(|a| std::net::TcpStream::connect_timeout(a, ms(50)).is_ok())
            });
            reached.ok().filter(|r| *r).map(|_| ())
        })?;
        Ok(())
    }

    /// Exactly one holder and the client getting 200s; returns the holder.
    fn steady(&self, shots: &Mutex<Vec<Shot>>) -> Result<usize> {
        let since = Instant::now();
        poll_every(
            STEP_MAX,
            ms(10),
            "one VIP holder and 200s through it",
            || {
                let h = self.holder()?;
                (traffic::served_since(shots, since, None) >= 50).then_some(h)
            },
        )
        .map_err(Into::into)
    }

    /// Two holders in samples within `[from, to]`, ignoring a dead host's
    /// leftover address while it is dead (`dead`: index and interval).
    fn overlaps(
        &self,
        from: Instant,
        to: Instant,
        dead: Option<(usize, Instant, Instant)>,
    ) -> usize {
        let Ok(samples) = self.samples.lock() else {
            return 0;
        };
        samples
            .iter()
            .filter(|s| s.at >= from && s.at <= to)
            .filter(|s| {
                let counts = |i: usize| match dead {
                    Some((d, t0, t1)) if d == i => !(s.at >= t0 && s.at <= t1),
                    _ => true,
                };
                s.held[0] && counts(0) && s.held[1] && counts(1)
            })
            .count()
    }

    fn tail_logs(&self) -> String {
        self.lab
            .labels()
            .iter()
            .map(|l| format!("---- {l} ----\n{}", self.lab.log_tail(l, 15)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

// ---------------------------------------------------------------- drills

struct Drill {
    victim: String,
    /// Kill → first 200 through the VIP (a request started after the kill).
    failover: Option<Duration>,
    /// Kill → the VIP configured on the survivor (sampler).
    vip_moved: Option<Duration>,
    overlap_samples: usize,
    restore: Duration,
    /// Requests started after the VIP moved that failed before the first
    /// 200: how many of each phase and OS error (the client-side tail).
    tail: Vec<(String, usize)>,
    /// The first 200 after the kill: when it was sent and how long it took,
    /// relative to the VIP move (ms); and how many requests were still open
    /// at the move, started before it (each blocks its client worker).
    first_ok: Option<(f64, f64)>,
    open_at_move: usize,
}

/// A row of a table and of the report: a system's numbers, or why it has none.
#[derive(Serialize)]
#[serde(untagged)]
enum Row<T> {
    Done(T),
    Failed {
        system: String,
        profile: String,
        error: String,
    },
}

/// One system and profile's drills.
#[derive(Serialize)]
struct DrillStats {
    system: &'static str,
    profile: String,
    n: usize,
    failed: usize,
    p50_ms: Option<f64>,
    p90_ms: Option<f64>,
    p99_ms: Option<f64>,
    max_ms: Option<f64>,
    vip_moved_p50_ms: Option<f64>,
    overlap_moments: usize,
    seconds: u64,
    /// Each drill's own numbers (the report only).
    drills: Vec<Value>,
}

fn drills(opts: &Opts) -> Result<Value> {
    let mut rows = Vec::new();
    for profile in &opts.profiles {
        for (n, system) in [System::Clb, System::Keepalived].into_iter().enumerate() {
            let started = Instant::now();
            let result = run_drills(system, profile, opts.drills, 1 + n as u8);
            let drills = match result {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("{} {profile}: {e:#}", system.name());
                    rows.push(Row::Failed {
                        system: system.name().into(),
                        profile: profile.clone(),
                        error: format!("{e:#}"),
                    });
                    continue;
                }
            };
            let row = drill_row(system, profile, &drills, started.elapsed());
            let row = Row::Done(row);
            eprintln!("{}", row_line(&row));
            rows.push(row);
        }
    }
    println!("\n## Drills: the leader host dies (kill → first 200 through the VIP)\n");
    println!("| system | profile | n | failed | p50 ms | p90 ms | p99 ms | max ms | VIP moved p50 ms | overlap moments |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for r in &rows {
        println!("{}", row_line(r));
    }
    println!(
        "\n(percentiles are nearest-rank over the drills; \"overlap moments\" counts sampler readings \
         every {} ms with the VIP on both live balancers)",
        SAMPLE_EVERY.as_millis()
    );
    Ok(serde_json::to_value(rows)?)
}

impl<T> Row<T> {
    /// The table line: `done`'s cells, or a failed row's, JSON-quoted as
    /// the tables have always shown them.
    fn line(&self, done: impl FnOnce(&T) -> String) -> String {
        match self {
            Row::Done(r) => done(r),
            Row::Failed {
                system,
                profile,
                error,
            } => format!(
                "| {} | {} | error: {} |",
                json_text(system),
                json_text(profile),
                json_text(error)
            ),
        }
    }
}

fn row_line(r: &Row<DrillStats>) -> String {
    r.line(drill_line)
}

fn drill_line(r: &DrillStats) -> String {
    let f = |v: Option<f64>| match v {
        Some(v) => format!("{v:.0}"),
        None => "–".into(),
    };
    format!(
        "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
        r.system,
        r.profile,
        r.n,
        r.failed,
        f(r.p50_ms),
        f(r.p90_ms),
        f(r.p99_ms),
        f(r.max_ms),
        f(r.vip_moved_p50_ms),
        r.overlap_moments,
    )
}

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.clamp(1, sorted.len()) - 1])
}

fn drill_row(system: System, profile: &str, drills: &[Drill], took: Duration) -> DrillStats {
    let millis = |d: &Duration| d.as_secs_f64() * 1000.0;
    let mut ok: Vec<f64> = drills
        .iter()
        .filter_map(|d| d.failover.as_ref().map(millis))
        .collect();
    ok.sort_by(f64::total_cmp);
    let mut moved: Vec<f64> = drills
        .iter()
        .filter_map(|d| d.vip_moved.as_ref().map(millis))
        .collect();
    moved.sort_by(f64::total_cmp);
    DrillStats {
        system: system.name(),
        profile: profile.to_string(),
        n: drills.len(),
        failed: drills.iter().filter(|d| d.failover.is_none()).count(),
        p50_ms: pct(&ok, 50.0),
        p90_ms: pct(&ok, 90.0),
        p99_ms: pct(&ok, 99.0),
        max_ms: ok.last().copied(),
        vip_moved_p50_ms: pct(&moved, 50.0),
        overlap_moments: drills.iter().map(|d| d.overlap_samples).sum::<usize>(),
        seconds: took.as_secs(),
        drills: drills.iter().map(|d| json!({
            "victim": d.victim,
            "failover_ms": d.failover.as_ref().map(millis),
            "vip_moved_ms": d.vip_moved.as_ref().map(millis),
            "overlap_samples": d.overlap_samples,
            "restore_ms": millis(&d.restore),
            "tail": d.tail.iter().map(|(e, n)| json!({"error": e, "count": n})).collect::<Vec<_>>(),
            "first_ok_sent_after_move_ms": d.first_ok.map(|f| f.0),
            "first_ok_took_ms": d.first_ok.map(|f| f.1),
            "open_at_move": d.open_at_move,
        })).collect::<Vec<_>>(),
    }
}

fn run_drills(system: System, profile: &str, count: usize, octet: u8) -> Result<Vec<Drill>> {
    let mut pair = Pair::new(system, profile, octet)?;
    let out = drill_loop(&mut pair, count);
    if out.is_err() {
        eprintln!("{}", pair.tail_logs());
    }
    out
}

fn drill_loop(pair: &mut Pair, count: usize) -> Result<Vec<Drill>> {
    // 32 workers, each sending every 32 ms: ~1 request per ms in all. A
    // worker with a request open on the dead host blocks (read timeout) and
    // one whose SYN went to the dead MAC blocks for the connect timeout; with
    // only 4 workers all of them could be blocked at once, and the client
    // sent nothing for up to 0.8 s after the address had moved (the
    // "client-side tail" of the earlier runs: the late first request then
    // took 1-2 ms). With 32, most keep sending.
    let opts = traffic::ClientOpts {
        workers: 32,
        interval: ms(1),
        connect_timeout: ms(20),
        read_timeout: ms(500),
        path: "/",
    };
    let target = SocketAddr::from((pair.vip, SVC_PORT));
    let shots = traffic::client(
        &pair.client.ns,
        target,
        opts,
        pair.lab.stop.clone(),
        LAB_MAX,
    );
    let mut out = Vec::new();
    for n in 0..count {
        let begin = Instant::now();
        let victim = pair.steady(&shots)?;
        let survivor = 1 - victim;
        // Restored hosts must be healthy standbys before the next drill.
        poll_every(
            STEP_MAX,
            ms(20),
            "the other balancer a healthy standby",
            || pair.standby_ready(survivor, victim).then_some(()),
        )?;
        // Pruned between drills so a long run does not grow without bound.
        if let Ok(mut s) = shots.lock() {
            s.retain(|s| s.at >= begin);
        }

        // The leader host dies: SIGKILL to both process groups, then the
        // link cut (one ioctl), within a fraction of a millisecond.
        let daemon = pair.daemon_label(victim);
        let haproxy = format!("haproxy-{}", pair.bal[victim].name);
        let t0 = Instant::now();
        pair.lab.sigkill_now(&[&daemon, &haproxy]);
        pair.lab.set_link(&pair.bal[victim], false)?;
        let cut = Instant::now();
        pair.lab.kill_all_of(&[&daemon, &haproxy]);
        // Measured from t0; only requests sent after the cut count, so no
        // answer from the dying host's last moment is taken for a failover.
        let failover = poll_every(
            STEP_MAX,
            ms(1),
            "a 200 through the VIP after the kill",
            || traffic::first_success_after(&shots, cut),
        )
        .map(|at| at - t0)
        .map_err(|e| eprintln!("drill {n}: {e}"))
        .ok();
        let vip_moved = poll_every(STEP_MAX, ms(5), "the VIP on the survivor", || {
            let s = pair.samples.lock().ok()?;
            s.iter()
                .find(|s| s.at > t0 && s.held[survivor])
                .map(|s| s.at - t0)
        })
        .ok();

        // A slow election: what the nodes said (the lab's logs go with it).
        let max_ms = clb::config::Timers::parse(&pair.profile)
            .map(|t| t.election_timeout_max_ms)
            .unwrap_or(150);
        let slow = max_ms * 2 + 100;
        if vip_moved.is_some_and(|d| d > ms(slow)) {
            eprintln!(
                "drill {n}: the VIP moved after {vip_moved:?} (over {slow} ms); logs:\n{}",
                pair.tail_logs()
            );
        }
        // The client-side tail: why requests sent after the address had
        // moved still failed, by phase and OS error.
        let tail = match (vip_moved, failover) {
            (Some(moved), Some(first)) => {
                let (moved, first) = (t0 + moved, t0 + first);
                let mut by: std::collections::BTreeMap<String, usize> = Default::default();
                if let Ok(s) = shots.lock() {
                    for shot in s.iter().filter(|s| s.start >= moved && s.at <= first) {
                        if let Some(e) = &shot.error {
                            *by.entry(e.clone()).or_default() += 1;
                        }
                    }
                }
                by.into_iter().collect()
            }
            _ => Vec::new(),
        };
        let (first_ok, open_at_move) = match (vip_moved, failover) {
            (Some(moved), Some(first)) => {
                let (moved, first) = (t0 + moved, t0 + first);
                let ms = |a: Instant, b: Instant| {
                    if a >= b {
                        (a - b).as_secs_f64() * 1e3
                    } else {
                        -((b - a).as_secs_f64() * 1e3)
                    }
                };
                let s = shots.lock().map(|s| s.clone()).unwrap_or_default();
                let ok = s
                    .iter()
                    .find(|x| x.at == first && x.served_by.is_some())
                    .map(|x| (ms(x.start, moved), ms(x.at, x.start)));
                let open = s.iter().filter(|x| x.start < moved && x.at > moved).count();
                (ok, open)
            }
            _ => (None, 0),
        };

        // The host comes back as after a reboot: without the address it held.
        let t1 = Instant::now();
        let vip = format!("{}/32", pair.vip);
        let _ = netns::ip(&[
            "-n",
            &pair.bal[victim].ns,
            "addr",
            "del",
            &vip,
            "dev",
            "eth0",
        ]);
        let cleared = Instant::now();
        pair.lab.set_link(&pair.bal[victim], true)?;
        pair.network_online(victim)?;
        pair.spawn_haproxy(victim)?;
        match pair.system {
            System::Clb => pair.spawn_clbd(victim)?,
            System::Keepalived => pair.spawn_keepalived(victim)?,
        }
        poll_every(
            STEP_MAX,
            ms(20),
            "the restored host a healthy standby",
            || pair.standby_ready(victim, survivor).then_some(()),
        )?;
        let restore = t1.elapsed();
        let overlap = pair.overlaps(begin, Instant::now(), Some((victim, t0, cleared)));
        let d = Drill {
            victim: pair.bal[victim].name.clone(),
            failover,
            vip_moved,
            overlap_samples: overlap,
            restore,
            tail,
            first_ok,
            open_at_move,
        };
        eprintln!(
            "{} {} drill {}/{count}: {} died, first 200 after {:?}, VIP moved after {:?}, {} overlap samples, restored in {:?}, failed after the move: {:?}, first 200 (sent, took) ms after the move: {:?}, open at the move: {}",
            pair.system.name(),
            pair.profile,
            n + 1,
            d.victim,
            d.failover,
            d.vip_moved,
            d.overlap_samples,
            d.restore,
            d.tail,
            d.first_ok,
            d.open_at_move
        );
        out.push(d);
    }
    Ok(out)
}

// ---------------------------------------------------------------- stability

/// One system's stability run.
#[derive(Serialize)]
struct StabilityStats {
    system: &'static str,
    profile: String,
    seconds: f64,
    leader_changes: Option<u64>,
    vip_moves: usize,
    overlap_moments: usize,
    writes_per_s: Option<f64>,
    write_errors: Option<u64>,
    members_at_end: Option<u64>,
    /// clb's alone: keepalived's row has none of these keys.
    #[serde(flatten)]
    clb: Option<ClbStability>,
}

#[derive(Serialize)]
struct ClbStability {
    vip_claims_after_first: Option<u64>,
    writes_ok: u64,
    unregister_absent: u64,
}

fn stability(opts: &Opts) -> Result<Value> {
    let mut rows = Vec::new();
    for profile in &opts.profiles {
        match stability_one(profile, opts.duration) {
            Ok(r) => rows.extend(r.into_iter().map(Row::Done)),
            Err(e) => {
                eprintln!("stability {profile}: {e:#}");
                rows.push(Row::Failed {
                    system: "both".into(),
                    profile: profile.clone(),
                    error: format!("{e:#}"),
                });
            }
        }
    }
    println!(
        "\n## Stability: {} s without faults, clb under write load beside keepalived\n",
        opts.duration.as_secs()
    );
    println!("| system | profile | seconds | leader changes | VIP claims after the first | VIP moves (sampler) | overlap moments | writes/s | write errors | members at end |");
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for row in &rows {
        let line = row.line(|r| {
            let claims = r.clb.as_ref().and_then(|c| c.vip_claims_after_first);
            format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.system,
                r.profile,
                json_text(&r.seconds),
                json_text(&r.leader_changes),
                dash(&claims),
                r.vip_moves,
                r.overlap_moments,
                dash(&r.writes_per_s),
                dash(&r.write_errors),
                dash(&r.members_at_end),
            )
        });
        println!("{line}");
    }
    println!("\n(clb leader changes: Raft term changes seen by the witness; keepalived: MASTER transitions after the first)");
    Ok(serde_json::to_value(rows)?)
}

/// Counters of the write load.
#[derive(Default)]
struct Load {
    ok: AtomicU64,
    absent: AtomicU64,
    errors: AtomicU64,
}

fn stability_one(profile: &str, duration: Duration) -> Result<Vec<StabilityStats>> {
    let clb = Pair::new(System::Clb, profile, 11)?;
    let ka = Pair::new(System::Keepalived, profile, 12)?;
    let out = stability_run(&clb, &ka, duration);
    if out.is_err() {
        eprintln!("{}\n{}", clb.tail_logs(), ka.tail_logs());
    }
    out
}

fn stability_run(clb: &Pair, ka: &Pair, duration: Duration) -> Result<Vec<StabilityStats>> {
    // Steady state for both before the window opens.
    let target = |p: &Pair| SocketAddr::from((p.vip, SVC_PORT));
    let opts = traffic::ClientOpts {
        workers: 1,
        interval: ms(10),
        connect_timeout: ms(100),
        read_timeout: ms(500),
        path: "/",
    };
    for p in [clb, ka] {
        let stop = Arc::new(AtomicBool::new(false));
        let shots = traffic::client(&p.client.ns, target(p), opts, stop.clone(), STEP_MAX);
        let r = p.steady(&shots);
        stop.store(true, Ordering::SeqCst);
        r.with_context(|| format!("{} steady state", p.system.name()))?;
    }
    let term = |p: &Pair| p.get::<NodeView>(2, "/v1/node").map(|v| v.term);
    let claims = |p: &Pair| -> Option<u64> {
        (0..2)
            .map(|i| {
                p.get::<ClusterView>(i, "/v1/cluster")
                    .map(|v| v.vip.claims_ok)
            })
            .sum()
    };
    let term0 = term(clb).context("witness term")?;
    let claims0 = claims(clb).context("VIP claims")?;
    let masters = |p: &Pair| -> usize {
        (0..2)
            .map(|i| {
                p.notify_states(i)
                    .iter()
                    .filter(|(_, s)| s == "MASTER")
                    .count()
            })
            .sum()
    };
    let masters0 = masters(ka);

    let start = Instant::now();
    let deadline = start + duration;
    let load = Arc::new(Load::default());
    let mut workers = Vec::new();
    // Two writers per clb node: writes to followers are forwarded.
    for w in 0..6 {
        let api = clb.api(w % 3);
        let ns = clb.client.ns.clone();
        let load = load.clone();
        workers.push(std::thread::spawn(move || {
            write_load(&ns, api, deadline, &load)
        }));
    }
    for w in workers {
        let _ = w.join();
    }
    let end = Instant::now();
    let secs = (end - start).as_secs_f64();
    let term1 = term(clb);
    let claims1 = claims(clb);
    let members = clb.get::<ClusterView>(2, "/v1/cluster").map(|v| v.members);
    let masters1 = masters(ka);

    let moves = |p: &Pair| -> usize {
        let Ok(s) = p.samples.lock() else { return 0 };
        let mut last = None;
        let mut n = 0;
        for s in s.iter().filter(|s| s.at >= start && s.at <= end) {
            let h = match (s.held[0], s.held[1]) {
                (true, false) => Some(0),
                (false, true) => Some(1),
                _ => None,
            };
            if let (Some(h), Some(l)) = (h, last) {
                if h != l {
                    n += 1;
                }
            }
            if h.is_some() {
                last = h;
            }
        }
        n
    };
    let ok = load.ok.load(Ordering::SeqCst);
    let clb_row = StabilityStats {
        system: "clb",
        profile: clb.profile.clone(),
        seconds: secs.round(),
        leader_changes: term1.map(|t| t - term0),
        vip_moves: moves(clb),
        overlap_moments: clb.overlaps(start, end, None),
        writes_per_s: Some((ok as f64 / secs).round()),
        write_errors: Some(load.errors.load(Ordering::SeqCst)),
        members_at_end: members,
        clb: Some(ClbStability {
            vip_claims_after_first: claims1.map(|c| c - claims0),
            writes_ok: ok,
            unregister_absent: load.absent.load(Ordering::SeqCst),
        }),
    };
    let ka_row = StabilityStats {
        system: "keepalived",
        profile: ka.profile.clone(),
        seconds: secs.round(),
        leader_changes: Some((masters1 - masters0) as u64),
        vip_moves: moves(ka),
        overlap_moments: ka.overlaps(start, end, None),
        writes_per_s: None,
        write_errors: None,
        members_at_end: None,
        clb: None,
    };
    eprintln!(
        "stability {}: clb {}\nkeepalived {}",
        clb.profile,
        json_text(&clb_row),
        json_text(&ka_row)
    );
    Ok(vec![clb_row, ka_row])
}

/// Registers and unregisters members of `load` from a bounded key set
/// (3,000 names, 60 % registers: ~1,800 members) until `deadline`.
fn write_load(ns: &str, api: SocketAddr, deadline: Instant, load: &Load) {
    if let Err(e) = netns::enter_ns(ns) {
        eprintln!("write load: {e}");
        return;
    }
    let mut rng = rand::thread_rng();
    while Instant::now() < deadline {
        let key: u32 = rng.gen_range(0..3000);
        let path = format!("/v1/services/load/members/m{key}");
        let r = if rng.gen_bool(0.6) {
            let body = RegisterBody {
                address: "127.0.0.1".into(),
                port: Some(10_000 + key),
                ..Default::default()
            };
            let body = serde_json::to_string(&body).unwrap_or_default();
            netns::http_here(api, "PUT", &path, Some(TOKEN), Some(&body), ms(3000))
        } else {
            // force: churn is the point here, the removal guardrail would refuse it.
            let path = format!("{path}?force=true");
            netns::http_here(api, "DELETE", &path, Some(TOKEN), None, ms(3000))
        };
        match r {
            Some((200, _)) => load.ok.fetch_add(1, Ordering::Relaxed),
            Some((404, _)) => load.absent.fetch_add(1, Ordering::Relaxed),
            _ => {
                load.errors.fetch_add(1, Ordering::Relaxed);
                // A refused or timed-out request must not spin.
                std::thread::sleep(ms(10));
                0
            }
        };
    }
}
