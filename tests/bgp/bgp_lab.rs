//! The routed lab of tests/bgp (and benches/bgp): a router namespace
//! running BIRD 2 with BFD and ECMP (lab::ecmp forwards, hash-threshold or
//! resilient), a client namespace behind it, and three balancers on one
//! bridge, each with BIRD 2, haproxy (supervised by clbd) and clbd (all
//! three voters). Each balancer also runs a tiny backend on 127.0.0.1 that
//! answers its own name, registered once as the member `127.0.0.1:PORT`: an
//! answer names the balancer that carried the connection. The BIRD configs
//! are deploy/bird/*.conf as shipped, filled in.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clb::bgp::BgpStatus;
use clb::model::{Check, Mode};
use clb::views::{NodeView, RegisterBody, ServiceBody};
use lab::ecmp::{Hashing, Router};
use lab::netns::{self, Host, Lab};
use lab::traffic::{self, ClientOpts, Shot};

pub const TOKEN: &str = "bgp-lab-admin-token-0123456789";
pub const SECRET: &str = "bgp-lab-cluster-secret-0123456789";
pub const TIMERS: [&str; 6] = [
    "--heartbeat-ms",
    "50",
    "--election-timeout-min-ms",
    "600",
    "--election-timeout-max-ms",
    "900",
];
/// The lab's lag bound: a balancer withdraws when a committed change is not
/// live in its haproxy this long after it saw it.
pub const MAX_LAG_MS: u64 = 500;
/// Hard stop for every background thread.
pub const LAB_MAX: Duration = Duration::from_secs(300);
pub const RUST_LOG: &[(&str, &str)] = &[("RUST_LOG", clb::DEFAULT_LOG)];
/// The router's BIRD exports BGP routes here; [`Router`] forwards from it.
pub const BGP_TABLE: u32 = 100;

pub fn wait_for<T>(within: Duration, what: &str, f: impl FnMut() -> Option<T>) -> T {
    lab::poll(within, what, f).unwrap_or_else(|e| panic!("{e}"))
}

pub struct Balancer {
    pub host: Host,
    pub api: SocketAddr,
    pub args: Vec<String>,
    pub bird_conf: PathBuf,
    pub bird_sock: PathBuf,
}

impl Balancer {
    pub fn clbd(&self) -> String {
        format!("clbd-{}", self.host.name)
    }

    pub fn bird(&self) -> String {
        format!("bird-{}", self.host.name)
    }

    pub fn http(&self, method: &str, path: &str, body: Option<&str>) -> Option<(u16, String)> {
        netns::http(
            &self.host.ns,
            self.api,
            method,
            path,
            Some(TOKEN),
            body,
            Duration::from_secs(40),
        )
    }

    pub fn view(&self) -> Option<NodeView> {
        let (status, body) = self.http("GET", "/v1/node", None)?;
        (status == 200).then_some(())?;
        serde_json::from_str(&body).ok()
    }

    pub fn bgp(&self) -> Option<BgpStatus> {
        self.view()?.bgp
    }
}

pub struct BgpLab {
    pub lab: Lab,
    pub client: Host,
    pub balancers: Vec<Balancer>,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub dir: PathBuf,
    pub ecmp: Router,
}

impl BgpLab {
    /// The next hops the router forwards the VIP to.
    pub fn next_hops(&self) -> Vec<Ipv4Addr> {
        self.ecmp.next_hops()
    }

    pub fn all_hops(&self) -> Vec<Ipv4Addr> {
        let mut all: Vec<Ipv4Addr> = self.balancers.iter().map(|b| b.host.ip).collect();
        all.sort();
        all
    }

    pub fn hops_without(&self, b: &Balancer) -> Vec<Ipv4Addr> {
        self.all_hops()
            .into_iter()
            .filter(|h| *h != b.host.ip)
            .collect()
    }

    pub fn wait_hops(&self, want: &[Ipv4Addr], within: Duration, what: &str) {
        wait_for(within, what, || (self.next_hops() == want).then_some(()));
    }

    pub fn start_bird(&mut self, i: usize) {
        let b = &self.balancers[i];
        let args = vec![
            "-f".into(),
            "-c".into(),
            b.bird_conf.display().to_string(),
            "-s".into(),
            b.bird_sock.display().to_string(),
        ];
        let (label, ns) = (b.bird(), b.host.ns.clone());
        self.lab
            .spawn(&label, &ns, "bird", &args, &[])
            .expect("spawn bird");
    }

    pub fn start_clbd(&mut self, i: usize) {
        let b = &self.balancers[i];
        let (label, ns, args) = (b.clbd(), b.host.ns.clone(), b.args.clone());
        self.lab
            .spawn(&label, &ns, env!("CARGO_BIN_EXE_clbd"), &args, RUST_LOG)
            .expect("spawn clbd");
    }

    pub fn client(&self, opts: ClientOpts, stop: Arc<AtomicBool>) -> Arc<Mutex<Vec<Shot>>> {
        traffic::client(
            &self.client.ns,
            SocketAddr::from((self.vip, self.port)),
            opts,
            stop,
            LAB_MAX,
        )
    }

    /// `clb ARGS` against balancer `i`, from inside its namespace; stdout.
    pub fn clb(&self, i: usize, args: &[&str]) -> String {
        let b = &self.balancers[i];
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &b.host.ns, env!("CARGO_BIN_EXE_clb")])
            .args(["--server", &format!("http://{}", b.api), "--insecure"])
            .args(args)
            .env("CLB_TOKEN", TOKEN)
            .output()
            .expect("run clb");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "clb {args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    }

    pub fn define(&self, name: &str) {
        let port = netns::free_port_in(&self.balancers[0].host.ns, Ipv4Addr::UNSPECIFIED)
            .expect("free port");
        let body = serde_json::to_string(&ServiceBody {
            port: port.into(),
            mode: Some(Mode::Tcp),
            check: Some(Check::None),
            ..Default::default()
        })
        .unwrap();
        let r = self.balancers[0].http("PUT", &format!("/v1/services/{name}"), Some(&body));
        assert_eq!(r.as_ref().map(|r| r.0), Some(200), "define {name}: {r:?}");
    }
}

/// `text` with each `(from, to)` replaced; panics when `from` is missing,
/// so a template that drifts from what the lab expects fails here.
pub fn fill(name: &str, text: &str, pairs: &[(&str, String)]) -> String {
    pairs.iter().fold(text.to_string(), |t, (from, to)| {
        assert!(t.contains(from), "{name} has no {from:?}");
        t.replace(from, to)
    })
}

pub fn deploy_file(rel: &str) -> String {
    std::fs::read_to_string(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(rel))
        .unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// deploy/bird/router.conf as shipped, filled in for the lab; its kernel
/// routes go to [`BGP_TABLE`] for [`Router`] to forward from.
pub fn router_conf(router: &Host, balancers: &[Host], vip: Ipv4Addr, bfd_ms: u64) -> String {
    let [a, b, c, _] = vip.octets();
    let mut pairs = vec![
        ("router id 10.0.1.1;", format!("router id {};", router.ip)),
        ("log syslog all;", "log stderr all;".into()),
        (
            "min rx interval 100 ms;",
            format!("min rx interval {bfd_ms} ms;"),
        ),
        (
            "min tx interval 100 ms;",
            format!("min tx interval {bfd_ms} ms;"),
        ),
        (
            "merge paths on;",
            format!("merge paths on;\n  kernel table {BGP_TABLE};"),
        ),
        (
            "203.0.113.0/24{32,32}",
            format!("{a}.{b}.{c}.0/24{{32,32}}"),
        ),
    ];
    for (i, h) in balancers.iter().enumerate() {
        pairs.push((["10.0.1.11", "10.0.1.12", "10.0.1.13"][i], h.ip.to_string()));
    }
    fill(
        "deploy/bird/router.conf",
        &deploy_file("deploy/bird/router.conf"),
        &pairs,
    )
}

/// deploy/bird/balancer.conf as shipped, filled in for balancer `h`.
pub fn balancer_conf(h: &Host, include: &std::path::Path) -> String {
    fill(
        "deploy/bird/balancer.conf",
        &deploy_file("deploy/bird/balancer.conf"),
        &[
            ("router id 10.0.1.11;", format!("router id {};", h.ip)),
            ("log syslog all;", "log stderr all;".into()),
            ("/etc/bird/clb.conf", include.display().to_string()),
        ],
    )
}

/// The lab with BFD at 100 ms (deploy/bird/router.conf's and clbd's default).
pub fn build() -> Option<BgpLab> {
    build_with(100)
}

/// The lab with BFD every `bfd_ms` on both sides; `None` when not root.
pub fn build_with(bfd_ms: u64) -> Option<BgpLab> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED bgp lab: network namespaces need root (CI runs as root)");
        return None;
    }
    assert!(
        clb::find_program("bird").is_some(),
        "bird is not installed: scripts/test.sh installs bird2 (apt-get install -y bird2)"
    );
    let pid = std::process::id();
    let x = (pid % 200 + 20) as u8;
    let mut lab = Lab::new(&format!("clg{pid}"), [10, 214, x]).expect("lab");
    let router = lab.add_host("r", 1).expect("router");
    let hosts: Vec<Host> = (1..=3u8)
        .map(|i| lab.add_host(&format!("b{i}"), 10 + i).expect("balancer"))
        .collect();
    let client = lab
        .add_routed_host("c", &router, [10, 215, x])
        .expect("client");
    let vip = Ipv4Addr::new(10, 216, x, 10);
    let run = |args: &[&str]| {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .expect("ip netns exec");
        assert!(out.status.success(), "{args:?}: {out:?}");
    };
    // L4 hashing: one client's connections differ only in source port.
    run(&[
        "netns",
        "exec",
        &router.ns,
        "sysctl",
        "-qw",
        "net.ipv4.ip_forward=1",
        "net.ipv4.fib_multipath_hash_policy=1",
    ]);
    for h in &hosts {
        netns::ip(&[
            "-n",
            &h.ns,
            "route",
            "add",
            "default",
            "via",
            &router.ip.to_string(),
        ])
        .expect("default route");
    }
    let dir = lab.dir().to_path_buf();
    let router_cfg = dir.join("bird-r.conf");
    std::fs::write(&router_cfg, router_conf(&router, &hosts, vip, bfd_ms)).unwrap();
    let args = vec![
        "-f".into(),
        "-c".into(),
        router_cfg.display().to_string(),
        "-s".into(),
        dir.join("bird-r.sock").display().to_string(),
    ];
    lab.spawn("bird-r", &router.ns, "bird", &args, &[])
        .expect("router bird");
    let ecmp = Router::start(
        &router.ns,
        &format!("{vip}/32"),
        BGP_TABLE,
        "eth0",
        lab.stop.clone(),
        LAB_MAX,
    )
    .expect("router forwarding");

    let tokens = dir.join("tokens");
    std::fs::write(&tokens, format!("{TOKEN}\n")).unwrap();
    let secret = dir.join("secret");
    std::fs::write(&secret, format!("{SECRET}\n")).unwrap();
    let port = |h: &Host| netns::free_port_in(&h.ns, h.ip).expect("free port");
    let addrs: Vec<(SocketAddr, SocketAddr)> = hosts
        .iter()
        .map(|h| {
            (
                SocketAddr::from((h.ip, port(h))),
                SocketAddr::from((h.ip, port(h))),
            )
        })
        .collect();
    let peers = addrs
        .iter()
        .enumerate()
        .map(|(i, (_, p))| format!("{}={p}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    // Node 3's validation fails while `reject` exists: a config its
    // haproxy refuses, the others take.
    let validate = dir.join("validate-b3.sh");
    std::fs::write(
        &validate,
        format!(
            "#!/bin/sh\n[ -e {} ] && {{ echo 'rejected by the lab' >&2; exit 1; }}\nexec haproxy -c -q -f \"$1\"\n",
            dir.join("reject").display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &validate,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let mut balancers = Vec::new();
    for (i, (h, (api, peer))) in hosts.iter().zip(&addrs).enumerate() {
        let id = i as u64 + 1;
        let include = dir.join(format!("clb-{}.conf", h.name));
        std::fs::write(&include, "").unwrap();
        let bird_conf = dir.join(format!("bird-{}.conf", h.name));
        std::fs::write(&bird_conf, balancer_conf(h, &include)).unwrap();
        let bird_sock = dir.join(format!("bird-{}.sock", h.name));
        let d = |f: &str| dir.join(format!("{f}-{}", h.name)).display().to_string();
        let mut args: Vec<String> = [
            "--node-id",
            &id.to_string(),
            "--listen",
            &api.to_string(),
            "--peer-listen",
            &peer.to_string(),
            "--peers",
            &peers,
            "--cluster-secret-file",
            &secret.display().to_string(),
            "--token-file",
            &tokens.display().to_string(),
            "--data-dir",
            &d("data"),
            "-o",
            &d("haproxy.cfg"),
            "--haproxy",
            "supervise",
            "--stats-port",
            "0",
            "--reload-min-interval-ms",
            "200",
            "--vip",
            &vip.to_string(),
            "--vip-mode",
            "bgp",
            "--bgp-neighbor",
            &router.ip.to_string(),
            "--bird-socket",
            &bird_sock.display().to_string(),
            "--bird-include",
            &include.display().to_string(),
            "--bgp-max-lag-ms",
            &MAX_LAG_MS.to_string(),
            "--bgp-bfd-ms",
            &bfd_ms.to_string(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(TIMERS.iter().map(|s| s.to_string()));
        if id == 3 {
            args.extend([
                "--validate-cmd".into(),
                format!("{} {{}}", validate.display()),
            ]);
        }
        balancers.push(Balancer {
            host: h.clone(),
            api: *api,
            args,
            bird_conf,
            bird_sock,
        });
    }
    let mut bl = BgpLab {
        lab,
        client,
        balancers,
        vip,
        port: 0,
        dir,
        ecmp,
    };
    for i in 0..3 {
        bl.start_bird(i);
        bl.start_clbd(i);
    }
    // The local backends, and the service every balancer serves.
    let backend_port = netns::free_port_in(&bl.balancers[0].host.ns, Ipv4Addr::LOCALHOST).unwrap();
    for b in &bl.balancers {
        let at = SocketAddr::from((Ipv4Addr::LOCALHOST, backend_port));
        traffic::backend(&b.host.ns, at, &b.host.name, bl.lab.stop.clone(), LAB_MAX)
            .expect("backend");
    }
    bl.port = netns::free_port_in(&bl.balancers[0].host.ns, Ipv4Addr::UNSPECIFIED).unwrap();
    let svc = serde_json::to_string(&ServiceBody {
        port: bl.port.into(),
        mode: Some(Mode::Http),
        check: Some(Check::None),
        ..Default::default()
    })
    .unwrap();
    wait_for(Duration::from_secs(30), "the service defined", || {
        let r = bl.balancers[0].http("PUT", "/v1/services/web", Some(&svc))?;
        (r.0 == 200).then_some(())
    });
    let member = serde_json::to_string(&RegisterBody {
        address: "127.0.0.1".into(),
        port: Some(backend_port.into()),
        ..Default::default()
    })
    .unwrap();
    let r = bl.balancers[0].http("PUT", "/v1/services/web/members/local", Some(&member));
    assert_eq!(r.as_ref().map(|r| r.0), Some(200), "register: {r:?}");
    // Every haproxy serves the service before the phases start: a balancer
    // may announce while its reload with the new port is still due (within
    // the lag bound), and a connection it gets then is refused.
    for b in &bl.balancers {
        let at = SocketAddr::from((Ipv4Addr::LOCALHOST, bl.port));
        wait_for(
            Duration::from_secs(20),
            "haproxy serving the service",
            || {
                let (code, body) = netns::http(
                    &b.host.ns,
                    at,
                    "GET",
                    "/",
                    None,
                    None,
                    Duration::from_secs(1),
                )?;
                (code == 200 && body == b.host.name).then_some(())
            },
        );
    }
    Some(bl)
}

/// Counts answers per balancer.
pub fn spread(shots: &[Shot]) -> BTreeMap<String, usize> {
    let mut by = BTreeMap::new();
    for s in shots {
        if let Some(b) = &s.served_by {
            *by.entry(b.clone()).or_insert(0) += 1;
        }
    }
    by
}

pub fn failures(shots: &[Shot]) -> Vec<&Shot> {
    shots.iter().filter(|s| s.error.is_some()).collect()
}

/// A client keep-alive connection to the VIP, and who answered it.
pub struct Open {
    pub stream: TcpStream,
    pub by: String,
}

pub fn one_answer(s: &mut TcpStream) -> Option<String> {
    s.write_all(b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n").ok()?;
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            return None;
        }
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len: usize = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap_or(0))
                })
                .unwrap_or(0);
            if body.len() >= len && head.starts_with("HTTP/1.1 200") {
                return Some(body[..len].to_string());
            }
        }
    }
}

pub fn open_connections(bl: &BgpLab, n: usize) -> Vec<Open> {
    let target = SocketAddr::from((bl.vip, bl.port));
    netns::in_ns(&bl.client.ns, || {
        (0..n)
            .filter_map(|_| {
                let mut stream =
                    TcpStream::connect_timeout(&target, Duration::from_secs(1)).ok()?;
                stream.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
                let by = one_answer(&mut stream)?;
                Some(Open { stream, by })
            })
            .collect()
    })
    .expect("client namespace")
}

pub fn pct(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// One host death: balancer `v`'s link cut, its clbd, haproxy and BIRD
/// SIGKILLed under new-connection load, with 24 keep-alive connections open
/// beforehand; then the balancer is brought back.
pub fn host_death(bl: &mut BgpLab, v: usize, hashing: Hashing) -> Drill {
    bl.ecmp
        .set_hashing(hashing, Duration::from_secs(5))
        .expect("hashing");
    let victim = bl.balancers[v].host.clone();
    let open = open_connections(bl, 24);
    let stop = Arc::new(AtomicBool::new(false));
    // Many workers, so some are free to connect while others wait out
    // a connection sent to the dead host.
    let quick = ClientOpts {
        workers: 12,
        interval: Duration::from_millis(2),
        connect_timeout: Duration::from_millis(300),
        read_timeout: Duration::from_secs(1),
        path: "/",
    };
    let shots = bl.client(quick, stop.clone());
    wait_for(Duration::from_secs(10), "load running", || {
        (shots.lock().unwrap().len() >= 50).then_some(())
    });
    // The link first: a process killed first would have its kernel
    // close BIRD's BGP connection, and the router would hear of the
    // death at once instead of through BFD.
    // The link first: a process killed first would have its kernel
    // close BIRD's BGP connection, and the router would hear of the
    // death at once instead of through BFD.
    let killed = Instant::now();
    bl.lab.set_link(&victim, false).expect("link down");
    let labels = [bl.balancers[v].clbd(), bl.balancers[v].bird()];
    bl.lab
        .kill_all_of(&[labels[0].as_str(), labels[1].as_str()]);
    // When the router stops sending new connections to the dead host.
    let rerouted = lab::wait::poll_every(
        Duration::from_secs(5),
        Duration::from_millis(2),
        "the router drops the dead balancer",
        || (!bl.next_hops().contains(&victim.ip)).then(|| killed.elapsed()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // Long enough for a connection sent to the dead host just before
    // to time out.
    let settle = killed + rerouted + Duration::from_millis(600);
    std::thread::sleep(settle.saturating_duration_since(Instant::now()));
    stop.store(true, Ordering::SeqCst);
    let shots: Vec<Shot> = shots.lock().unwrap().clone();
    let after: Vec<&Shot> = shots
        .iter()
        .filter(|s| s.start >= killed + rerouted)
        .collect();
    let lost: Vec<&&Shot> = after.iter().filter(|s| s.error.is_some()).collect();
    let failed_before = shots
        .iter()
        .filter(|s| s.error.is_some() && s.start >= killed && s.start < killed + rerouted)
        .count();
    let first_lost = lost.first().map(|s| format!("{s:?}"));
    let (new_after, lost_after) = (after.len(), lost.len());
    // Open connections on the survivors: the rehash may move some.
    let (mut kept, mut broken) = (0, 0);
    netns::in_ns(&bl.client.ns, || {
        for mut o in open.into_iter().filter(|o| o.by != victim.name) {
            match one_answer(&mut o.stream) {
                Some(by) if by == o.by => kept += 1,
                _ => broken += 1,
            }
        }
    })
    .unwrap();
    // Bring it back.
    bl.lab.set_link(&victim, true).expect("link up");
    bl.start_bird(v);
    bl.start_clbd(v);
    let all = bl.all_hops();
    bl.wait_hops(
        &all,
        Duration::from_secs(30),
        "the balancer back after the drill",
    );
    Drill {
        rerouted,
        failed_before,
        new_after,
        lost_after,
        first_lost,
        kept,
        broken,
    }
}

/// What one host death did.
#[derive(Debug)]
pub struct Drill {
    /// From the kill until the router sent no new connection there.
    pub rerouted: Duration,
    /// Connections sent to the dead host before that (they failed).
    pub failed_before: usize,
    /// Connections started after it, and how many of those failed.
    pub new_after: usize,
    pub lost_after: usize,
    pub first_lost: Option<String>,
    /// Keep-alive connections open on the survivors that still answered
    /// from the same balancer, and those the rehash broke.
    pub kept: usize,
    pub broken: usize,
}
