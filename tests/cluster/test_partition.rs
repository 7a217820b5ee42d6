//! The real partition drill: balancers A and B (clbd + haproxy in
//! master-worker mode), witness W and a client C, each in its own network
//! namespace, all plugged into a bridge that lives in a fifth "switch"
//! namespace (nothing is added to the host's own namespace). The VIP moves
//! with the built-in `linux-vip:eth0` hook; the client sends a request to the
//! VIP every 20 ms throughout, and a sampler checks every ~20 ms that the VIP
//! is never configured on both balancers.
//!
//! The backend is a tiny HTTP server on 127.0.0.1 inside *each* balancer's
//! namespace, on the same port: one registered member (`127.0.0.1:PORT`)
//! then means "the local backend" on every balancer, and its answer names
//! the balancer that served the request. That keeps backend traffic off the
//! bridge, so only the VIP path is under test.
//!
//! Sockets are opened inside a namespace by a short-lived thread that
//! `setns(2)`-es into it; a socket stays in the namespace it was created in.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::TOKEN;

/// A little slower than the `default` preset (300-600 ms, lease 200 ms): the
/// margin between an isolated leader's lease end and the earliest election is
/// what keeps two holders apart, and a loaded 2-core CI machine can delay the
/// release task; here it is at least 300 ms.
const TIMERS: [&str; 8] = [
    "--heartbeat-ms",
    "50",
    "--election-timeout-min-ms",
    "600",
    "--election-timeout-max-ms",
    "900",
    "--lease-ms",
    "300",
];
/// Generous on a loaded 2-core machine: openraft may wait twice the election
/// timeout on a node that saw a longer log in its previous election.
const GAP_BOUND: Duration = Duration::from_secs(8);
/// Hard stop for the background client and sampler threads.
const DRILL_MAX: Duration = Duration::from_secs(90);

/// Runs `f` on a fresh thread inside network namespace `ns`.
fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter_ns(ns);
            f()
        })
        .join()
        .expect("namespace thread")
    })
}

/// Moves the calling thread into namespace `ns`.
fn enter_ns(ns: &str) {
    let file = File::open(format!("/var/run/netns/{ns}")).expect("open netns");
    // SAFETY: setns(2) on a namespace fd we own; affects this thread only.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    assert_eq!(rc, 0, "setns {ns}: {}", std::io::Error::last_os_error());
}

/// A free TCP port inside `ns` (bind port 0 there, read it, release it).
fn free_port_in(ns: &str, ip: Ipv4Addr) -> u16 {
    in_ns(ns, || {
        let l = TcpListener::bind((ip, 0)).expect("bind port 0 in namespace");
        l.local_addr().expect("local addr").port()
    })
}

/// True when the calling thread's namespace has `vip` on any interface.
fn has_addr(vip: Ipv4Addr) -> bool {
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we free below; we only read it.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return false;
    }
    let mut found = false;
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr of the family it names.
            let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
            if family == libc::AF_INET {
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                if Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)) == vip {
                    found = true;
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: the list from getifaddrs above, freed once.
    unsafe { libc::freeifaddrs(ifap) };
    found
}

/// A blocking HTTP/1.1 request from inside `ns`; `(status, body)`.
fn http(
    ns: &str,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Option<(u16, String)> {
    let timeout = Duration::from_secs(2);
    let mut s = in_ns(ns, || TcpStream::connect_timeout(&addr, timeout)).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.set_write_timeout(Some(timeout)).ok()?;
    let body = body.unwrap_or("");
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {TOKEN}\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let (_, body) = text.split_once("\r\n\r\n")?;
    Some((status, body.to_string()))
}

/// Polls `f` every 20 ms until it returns `Some`; panics at the deadline.
fn wait_for<T>(within: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One host of the drill: its namespace, address and switch port.
#[derive(Clone)]
struct Host {
    name: &'static str,
    ns: String,
    ip: Ipv4Addr,
    /// The host's veth end in the switch namespace (`ip link set down` there
    /// unplugs the host).
    port: String,
}

/// Namespaces, processes and temp files of one drill; torn down in `Drop`.
struct Lab {
    switch: String,
    namespaces: Vec<String>,
    /// Process-group leaders we spawned: (label, child).
    procs: Vec<(String, Child)>,
    dir: tempfile::TempDir,
    stop: Arc<AtomicBool>,
}

impl Lab {
    fn ip(&self, args: &[&str]) {
        let out = Command::new("ip").args(args).output().expect("run ip");
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }

    fn add_ns(&mut self, name: &str) {
        self.ip(&["netns", "add", name]);
        self.namespaces.push(name.to_string());
        self.ip(&["-n", name, "link", "set", "lo", "up"]);
    }

    /// Plugs `host` into the bridge with a veth pair: `eth0` inside its
    /// namespace, `host.port` on the switch.
    fn plug(&self, host: &Host) {
        let sw = self.switch.as_str();
        self.ip(&[
            "-n", sw, "link", "add", &host.port, "type", "veth", "peer", "name", "eth0", "netns",
            &host.ns,
        ]);
        self.ip(&["-n", sw, "link", "set", &host.port, "master", "br0"]);
        self.ip(&["-n", sw, "link", "set", &host.port, "up"]);
        let cidr = format!("{}/24", host.ip);
        self.ip(&["-n", &host.ns, "addr", "add", &cidr, "dev", "eth0"]);
        self.ip(&["-n", &host.ns, "link", "set", "eth0", "up"]);
    }

    fn link(&self, host: &Host, up: bool) {
        let state = if up { "up" } else { "down" };
        self.ip(&["-n", &self.switch, "link", "set", &host.port, state]);
    }

    /// Spawns `program args` inside `ns`, in its own process group, logging to `log`.
    fn spawn(&mut self, label: &str, ns: &str, program: &str, args: &[String], log: &Path) {
        let out = File::create(log).expect("log file");
        let child = Command::new("ip")
            .args(["netns", "exec", ns, program])
            .args(args)
            .env("RUST_LOG", "info,openraft=warn")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {program} in {ns}: {e}"));
        self.procs.push((label.to_string(), child));
    }

    /// SIGKILLs the process group of `label` (clbd with its hooks, or
    /// haproxy with its workers) and reaps it.
    fn kill(&mut self, label: &str) {
        if let Some(i) = self.procs.iter().position(|(l, _)| l == label) {
            let (_, mut child) = self.procs.remove(i);
            // SAFETY: kill(2) on the process group of a child we spawned with
            // process_group(0) (`ip netns exec` execs in place).
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
        }
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if std::thread::panicking() {
            for (label, _) in &self.procs {
                let text = std::fs::read_to_string(self.log(label)).unwrap_or_default();
                let tail: Vec<&str> = text
                    .lines()
                    .filter(|l| !l.contains("identity probe"))
                    .rev()
                    .take(60)
                    .collect();
                eprintln!("---- {label} log (last 60 lines) ----");
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        let labels: Vec<String> = self.procs.iter().map(|(l, _)| l.clone()).collect();
        for l in labels {
            self.kill(&l);
        }
        for ns in self.namespaces.iter().rev() {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// A backend answering `name` on `port` at 127.0.0.1 inside `ns`, until `stop`.
fn backend(ns: &str, port: u16, name: &'static str, stop: Arc<AtomicBool>) {
    let listener = in_ns(ns, || {
        TcpListener::bind(("127.0.0.1", port)).expect("bind backend")
    });
    listener.set_nonblocking(true).expect("nonblocking");
    std::thread::spawn(move || {
        let deadline = Instant::now() + DRILL_MAX;
        while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            match listener.accept() {
                Ok((mut s, _)) => {
                    let _ = s.set_nonblocking(false);
                    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                    let mut buf = [0u8; 2048];
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => got.extend_from_slice(&buf[..n]),
                        }
                    }
                    let _ = write!(
                        s,
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{name}",
                        name.len()
                    );
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    });
}

/// One client request: when it ended, and the backend that answered (if any).
#[derive(Clone, Debug)]
struct Shot {
    at: Instant,
    served_by: Option<String>,
}

/// Sends `GET /` to `vip:port` from inside `ns` every 20 ms until `stop`.
fn client(ns: String, vip: SocketAddr, stop: Arc<AtomicBool>) -> Arc<Mutex<Vec<Shot>>> {
    let shots = Arc::new(Mutex::new(Vec::new()));
    let out = shots.clone();
    std::thread::spawn(move || {
        enter_ns(&ns);
        let deadline = Instant::now() + DRILL_MAX;
        while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            let served_by = one_request(vip);
            out.lock().expect("shots").push(Shot {
                at: Instant::now(),
                served_by,
            });
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    shots
}

fn one_request(vip: SocketAddr) -> Option<String> {
    let timeout = Duration::from_millis(300);
    let mut s = TcpStream::connect_timeout(&vip, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.set_write_timeout(Some(timeout)).ok()?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: vip\r\n\r\n").ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    if !text.starts_with("HTTP/1.0 200") && !text.starts_with("HTTP/1.1 200") {
        return None;
    }
    Some(text.split_once("\r\n\r\n")?.1.trim().to_string())
}

/// One sample of where the VIP is configured.
#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Instant,
    a: bool,
    b: bool,
}

/// Checks both balancers' namespaces for the VIP every ~20 ms until `stop`.
fn sampler(a: String, b: String, vip: Ipv4Addr, stop: Arc<AtomicBool>) -> Arc<Mutex<Vec<Sample>>> {
    let samples = Arc::new(Mutex::new(Vec::new()));
    let out = samples.clone();
    std::thread::spawn(move || {
        let deadline = Instant::now() + DRILL_MAX;
        while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            enter_ns(&a);
            let on_a = has_addr(vip);
            enter_ns(&b);
            let on_b = has_addr(vip);
            out.lock().expect("samples").push(Sample {
                at: Instant::now(),
                a: on_a,
                b: on_b,
            });
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    samples
}

/// Longest time without a successful request in `[from, to]`, and how
/// many requests failed in it.
fn longest_gap(shots: &[Shot], from: Instant, to: Instant) -> (Duration, usize) {
    let mut last = from;
    let mut gap = Duration::ZERO;
    let mut failed = 0;
    for s in shots.iter().filter(|s| s.at >= from && s.at <= to) {
        if s.served_by.is_some() {
            gap = gap.max(s.at - last);
            last = s.at;
        } else {
            failed += 1;
        }
    }
    (gap.max(to.saturating_duration_since(last)), failed)
}

/// Successful requests after `since`, served by `by` when given.
fn served_since(shots: &Mutex<Vec<Shot>>, since: Instant, by: Option<&str>) -> usize {
    shots
        .lock()
        .expect("shots")
        .iter()
        .filter(|s| s.at > since)
        .filter(|s| match (&s.served_by, by) {
            (Some(got), Some(want)) => got == want,
            (Some(_), None) => true,
            (None, _) => false,
        })
        .count()
}

#[test]
fn partition_drill_moves_the_vip_without_two_holders() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED partition_drill: network namespaces need root (CI runs as root)");
        return;
    }
    let pid = std::process::id();
    let prefix = format!("clbp{pid}");
    let subnet = format!("10.213.{}", pid % 200 + 20);
    let stop = Arc::new(AtomicBool::new(false));
    let mut lab = Lab {
        switch: format!("{prefix}-sw"),
        namespaces: Vec::new(),
        procs: Vec::new(),
        dir: tempfile::tempdir().expect("tempdir"),
        stop: stop.clone(),
    };
    let host = |name: &'static str, last: u8| Host {
        name,
        ns: format!("{prefix}-{name}"),
        ip: format!("{subnet}.{last}").parse().expect("ip"),
        port: format!("p{name}"),
    };
    let (a, b, w, c) = (host("a", 1), host("b", 2), host("w", 3), host("c", 10));
    let vip: Ipv4Addr = format!("{subnet}.100").parse().expect("vip");

    let sw = lab.switch.clone();
    lab.add_ns(&sw);
    lab.ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"]);
    lab.ip(&["-n", &sw, "link", "set", "br0", "up"]);
    for h in [&a, &b, &w, &c] {
        lab.add_ns(&h.ns);
        lab.plug(h);
    }
    let arping = Command::new("arping").arg("-V").output().is_ok();
    if !arping {
        eprintln!("NOTE: arping (iputils-arping) is missing: no gratuitous ARP; the test flushes the client's neighbour cache after each VIP move");
    }

    // clbd on every host; the balancers also run haproxy and a local backend.
    let api_port = |h: &Host| free_port_in(&h.ns, h.ip);
    let nodes = [(1u64, a.clone()), (2, b.clone()), (3, w.clone())];
    let addrs: Vec<(u64, SocketAddr)> = nodes
        .iter()
        .map(|(id, h)| (*id, SocketAddr::from((h.ip, api_port(h)))))
        .collect();
    let peers = addrs
        .iter()
        .map(|(id, a)| format!("{id}={a}"))
        .collect::<Vec<_>>()
        .join(",");
    let tokens = lab.dir.path().join("tokens");
    std::fs::write(&tokens, format!("{TOKEN}\n")).expect("tokens");
    let d = lab.dir.path().to_path_buf();
    for ((id, h), (_, addr)) in nodes.iter().zip(&addrs) {
        let mut args: Vec<String> = vec![
            "--node-id".into(),
            id.to_string(),
            "--listen".into(),
            addr.to_string(),
            "--peers".into(),
            peers.clone(),
            "--data-dir".into(),
            d.join(format!("data-{}", h.name)).display().to_string(),
            "--token-file".into(),
            tokens.display().to_string(),
            "-o".into(),
            d.join(format!("haproxy-{}.cfg", h.name))
                .display()
                .to_string(),
            "--stats-port".into(),
            "0".into(),
        ];
        args.extend(TIMERS.iter().map(|s| s.to_string()));
        if h.name == "w" {
            args.extend(["--role".into(), "witness".into()]);
        } else {
            args.extend([
                "--vip".into(),
                vip.to_string(),
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
                "--reload-min-interval-ms".into(),
                "200".into(),
            ]);
        }
        let label = format!("clbd-{}", h.name);
        let log = lab.log(&label);
        lab.spawn(&label, &h.ns, env!("CARGO_BIN_EXE_clbd"), &args, &log);
    }
    let backend_port = free_port_in(&a.ns, Ipv4Addr::LOCALHOST);
    for h in [&a, &b] {
        let cfg = d.join(format!("haproxy-{}.cfg", h.name));
        wait_for(Duration::from_secs(20), "a rendered config", || {
            cfg.exists().then_some(())
        });
        let args: Vec<String> = vec![
            "-W".into(),
            "-db".into(),
            "-S".into(),
            d.join(format!("master-{}.sock", h.name))
                .display()
                .to_string(),
            "-f".into(),
            cfg.display().to_string(),
        ];
        let label = format!("haproxy-{}", h.name);
        let log = lab.log(&label);
        lab.spawn(&label, &h.ns, "haproxy", &args, &log);
        backend(&h.ns, backend_port, h.name, stop.clone());
    }

    let api_a = addrs[0].1;
    let svc_port = free_port_in(&a.ns, a.ip);
    wait_for(Duration::from_secs(20), "the service defined", || {
        let body = format!(r#"{{"port": {svc_port}, "mode": "http", "check": "none"}}"#);
        let r = http(&a.ns, api_a, "PUT", "/v1/services/web", Some(&body))?;
        (r.0 == 200).then_some(())
    });
    let body = format!(r#"{{"address": "127.0.0.1", "port": {backend_port}}}"#);
    let r = http(
        &a.ns,
        api_a,
        "PUT",
        "/v1/services/web/members/local",
        Some(&body),
    );
    assert_eq!(r.as_ref().map(|r| r.0), Some(200), "register: {r:?}");

    let zero = Instant::now();
    let mut marks: Vec<(&str, Instant)> = Vec::new();
    let samples = sampler(a.ns.clone(), b.ns.clone(), vip, stop.clone());
    let vip_addr = SocketAddr::from((vip, svc_port));
    let shots = client(c.ns.clone(), vip_addr, stop.clone());
    let flush_client = || {
        if !arping {
            let _ = Command::new("ip")
                .args(["-n", &c.ns, "neigh", "flush", "dev", "eth0"])
                .output();
        }
    };
    let holder = || {
        let s = *samples.lock().expect("samples").last()?;
        match (s.a, s.b) {
            (true, false) => Some(a.clone()),
            (false, true) => Some(b.clone()),
            _ => None,
        }
    };
    let first = wait_for(Duration::from_secs(30), "a VIP holder", holder);
    let started = Instant::now();
    wait_for(Duration::from_secs(20), "requests through the VIP", || {
        (served_since(&shots, started, Some(first.name)) >= 10).then_some(())
    });
    eprintln!(
        "VIP {vip} held by balancer {}; client traffic flows",
        first.name
    );
    let mut report = Vec::new();

    // (c) The witness is unplugged: nothing may move, nothing may fail.
    let t = Instant::now();
    marks.push(("witness isolated", t));
    lab.link(&w, false);
    wait_for(
        Duration::from_secs(10),
        "1 s of traffic with the witness cut off",
        || (served_since(&shots, t, Some(first.name)) >= 50).then_some(()),
    );
    lab.link(&w, true);
    let end = Instant::now();
    let (gap, failed) = longest_gap(&shots.lock().expect("shots"), t, end);
    report.push(format!(
        "witness isolated: longest gap {} ms, {failed} failed requests",
        gap.as_millis()
    ));
    let (moved, flaps) = {
        let samples = samples.lock().expect("samples");
        let window: Vec<&Sample> = samples
            .iter()
            .filter(|s| s.at >= t && s.at <= end)
            .collect();
        let other = |s: &&&Sample| if first.name == "a" { s.b } else { s.a };
        let mine = |s: &&&Sample| if first.name == "a" { s.a } else { s.b };
        (
            window.iter().filter(other).count(),
            window.iter().filter(|s| !mine(s)).count(),
        )
    };
    report.push(format!(
        "witness isolated: {flaps} samples without the VIP on its holder"
    ));
    assert_eq!(moved, 0, "the VIP moved while only the witness was cut off");
    assert!(gap < GAP_BOUND, "witness isolated: gap {gap:?}");
    let api_w = addrs[2].1;
    wait_for(
        Duration::from_secs(10),
        "the witness back in the cluster",
        || {
            let (_, body) = http(&w.ns, api_w, "GET", "/v1/cluster", None)?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            let want = if first.name == "a" { 1 } else { 2 };
            (v["leader"] == want).then_some(())
        },
    );

    // (b) The leader is unplugged from the switch: cut off from both peers
    // (and from the client). The other balancer must take over.
    let (old, other) = if first.name == "a" {
        (a.clone(), b.clone())
    } else {
        (b.clone(), a.clone())
    };
    let t = Instant::now();
    marks.push(("leader isolated", t));
    lab.link(&old, false);
    wait_for(
        Duration::from_secs(15),
        "the VIP on the other balancer",
        || (holder()?.name == other.name).then_some(()),
    );
    flush_client();
    wait_for(
        Duration::from_secs(15),
        "traffic through the new holder",
        || (served_since(&shots, t, Some(other.name)) >= 25).then_some(()),
    );
    let end = Instant::now();
    let (gap, failed) = longest_gap(&shots.lock().expect("shots"), t, end);
    report.push(format!(
        "leader {} isolated: longest gap {} ms, {failed} failed requests",
        old.name,
        gap.as_millis()
    ));
    assert!(gap < GAP_BOUND, "leader isolated: gap {gap:?}");
    marks.push(("old leader reconnected", Instant::now()));
    lab.link(&old, true);
    let old_api = addrs[if old.name == "a" { 0 } else { 1 }].1;
    let other_id = if other.name == "a" { 1 } else { 2 };
    wait_for(
        Duration::from_secs(15),
        "the old leader rejoined as a follower",
        || {
            let (_, body) = http(&old.ns, old_api, "GET", "/v1/cluster", None)?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            (v["leader"] == other_id && v["vip"]["held"] == false).then_some(())
        },
    );

    // (a) The new leader's host dies: clbd and haproxy SIGKILLed, link cut.
    let t = Instant::now();
    marks.push(("leader killed", t));
    lab.kill(&format!("clbd-{}", other.name));
    lab.kill(&format!("haproxy-{}", other.name));
    lab.ip(&["-n", &other.ns, "link", "set", "eth0", "down"]);
    let dead = (other.name, t);
    wait_for(
        Duration::from_secs(15),
        "the VIP back on the first balancer",
        || {
            let s = *samples.lock().expect("samples").last()?;
            let on_old = if old.name == "a" { s.a } else { s.b };
            (s.at > t && on_old).then_some(())
        },
    );
    flush_client();
    wait_for(
        Duration::from_secs(15),
        "traffic through the survivor",
        || (served_since(&shots, t, Some(old.name)) >= 25).then_some(()),
    );
    let end = Instant::now();
    let (gap, failed) = longest_gap(&shots.lock().expect("shots"), t, end);
    report.push(format!(
        "leader {} killed: longest gap {} ms, {failed} failed requests",
        other.name,
        gap.as_millis()
    ));
    assert!(gap < GAP_BOUND, "leader killed: gap {gap:?}");

    stop.store(true, Ordering::SeqCst);
    // A dead host's leftover address (SIGKILL runs no release) is unreachable
    // and does not count; every other sample must show at most one holder.
    let samples = samples.lock().expect("samples").clone();
    let both: Vec<&Sample> = samples
        .iter()
        .filter(|s| {
            let alive = |name: &str| !(dead.0 == name && s.at >= dead.1);
            s.a && alive("a") && s.b && alive("b")
        })
        .collect();
    report.push(format!(
        "{} VIP samples (every ~20 ms), {} with two holders",
        samples.len(),
        both.len()
    ));
    for line in &report {
        eprintln!("partition drill: {line}");
    }
    let when: Vec<String> = both
        .iter()
        .map(|s| {
            let (name, at) = marks
                .iter()
                .rev()
                .find(|(_, at)| *at <= s.at)
                .copied()
                .unwrap_or(("start-up", zero));
            format!("{name} +{} ms", (s.at - at).as_millis())
        })
        .collect();
    assert!(
        both.is_empty(),
        "the VIP was on both balancers at: {when:?}"
    );
}
