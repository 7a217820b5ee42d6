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
//! The namespaces, processes and traffic helpers are the lab's (`lab/`).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use clb::model::{Check, Mode};
use clb::views::{ClusterView, OneServiceView, RegisterBody, ServiceBody};
use serde::Serialize;

use crate::harness::{SECRET, TOKEN};
use lab::netns::{self, Host, Lab, LogsOnPanic};
use lab::traffic::{self, longest_gap, served_since, Sample};

/// Much slower than the `default` preset (300-600 ms, lease 200 ms): the
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
/// A client as patient as a real one (Linux gives up a connect after six
/// SYN retransmissions, ~127 s): 7 s covers three (1 + 2 + 4 s), so a SYN
/// dropped by one drain and again by the next restart's still connects.
const PATIENT_CONNECT: Duration = Duration::from_secs(7);
/// Hard stop for the background client and sampler threads.
const DRILL_MAX: Duration = Duration::from_secs(90);
const RUST_LOG: &[(&str, &str)] = &[("RUST_LOG", clb::DEFAULT_LOG)];

/// Polls `f` every 20 ms until it returns `Some`; panics at the deadline.
fn wait_for<T>(within: Duration, what: &str, f: impl FnMut() -> Option<T>) -> T {
    lab::poll(within, what, f).unwrap_or_else(|e| panic!("{e}"))
}

/// A request to the clb API from inside `ns`.
fn http(
    ns: &str,
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Option<(u16, String)> {
    netns::http(
        ns,
        addr,
        method,
        path,
        Some(TOKEN),
        body,
        Duration::from_secs(2),
    )
}

/// `/v1/cluster` as the node at `addr` in `ns` answers it. Only a 200: the
/// view takes defaults for missing fields, so an error body would parse.
fn cluster_view(ns: &str, addr: SocketAddr) -> Option<ClusterView> {
    let (status, body) = http(ns, addr, "GET", "/v1/cluster", None)?;
    (status == 200).then_some(())?;
    serde_json::from_str(&body).ok()
}

/// A request body as the API takes it.
fn body_of(body: &impl Serialize) -> String {
    serde_json::to_string(body).expect("a request body")
}

/// Each node's API and peer address (free ports on its host) and the
/// `--peers` value that names them.
fn node_addrs(nodes: &[(u64, Host)]) -> (Vec<SocketAddr>, Vec<SocketAddr>, String) {
    let port = |h: &Host| netns::free_port_in(&h.ns, h.ip).expect("free port");
    let api = nodes
        .iter()
        .map(|(_, h)| SocketAddr::from((h.ip, port(h))))
        .collect();
    let peer: Vec<SocketAddr> = nodes
        .iter()
        .map(|(_, h)| SocketAddr::from((h.ip, port(h))))
        .collect();
    let peers = nodes
        .iter()
        .zip(&peer)
        .map(|((id, _), p)| format!("{id}={p}"))
        .collect::<Vec<_>>()
        .join(",");
    (api, peer, peers)
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
    let subnet = [10, 213, (pid % 200 + 20) as u8];
    let mut lab = Lab::new(&prefix, subnet).expect("lab");
    let stop = lab.stop.clone();
    let labels = ["clbd-a", "clbd-b", "clbd-w", "haproxy-a", "haproxy-b"];
    let _logs = LogsOnPanic(labels.iter().map(|l| lab.log(l)).collect());
    let mut host = |name: &str, last: u8| lab.add_host(name, last).expect("add host");
    let (a, b, w, c) = (host("a", 1), host("b", 2), host("w", 3), host("c", 10));
    let vip = lab.addr(100);

    // clbd on every host; the balancers also run haproxy and a local backend.
    let nodes = [(1u64, a.clone()), (2, b.clone()), (3, w.clone())];
    let (api, peer_addrs, peers) = node_addrs(&nodes);
    let addrs: Vec<(u64, SocketAddr)> = nodes.iter().map(|(id, _)| *id).zip(api).collect();
    let tokens = lab.dir().join("tokens");
    std::fs::write(&tokens, format!("{TOKEN}\n")).expect("tokens");
    let secret = lab.dir().join("cluster-secret");
    std::fs::write(&secret, format!("{SECRET}\n")).expect("secret");
    let d = lab.dir().to_path_buf();
    let mut clbd_args: std::collections::HashMap<String, Vec<String>> = Default::default();
    for (((id, h), (_, addr)), peer) in nodes.iter().zip(&addrs).zip(&peer_addrs) {
        let mut args: Vec<String> = vec![
            "--node-id".into(),
            id.to_string(),
            "--listen".into(),
            addr.to_string(),
            "--peer-listen".into(),
            peer.to_string(),
            "--cluster-secret-file".into(),
            secret.display().to_string(),
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
        lab.spawn(&label, &h.ns, env!("CARGO_BIN_EXE_clbd"), &args, RUST_LOG)
            .expect("spawn clbd");
        clbd_args.insert(h.name.clone(), args);
    }
    let backend_port = netns::free_port_in(&a.ns, Ipv4Addr::LOCALHOST).expect("free port");
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
        lab.spawn(&label, &h.ns, "haproxy", &args, &[])
            .expect("spawn haproxy");
        let at = SocketAddr::from((Ipv4Addr::LOCALHOST, backend_port));
        traffic::backend(&h.ns, at, &h.name, stop.clone(), DRILL_MAX).expect("backend");
    }

    let api_a = addrs[0].1;
    let svc_port = netns::free_port_in(&a.ns, a.ip).expect("free port");
    wait_for(Duration::from_secs(20), "the service defined", || {
        let body = body_of(&ServiceBody {
            port: svc_port.into(),
            mode: Some(Mode::Http),
            check: Some(Check::None),
            ..Default::default()
        });
        let r = http(&a.ns, api_a, "PUT", "/v1/services/web", Some(&body))?;
        (r.0 == 200).then_some(())
    });
    let body = body_of(&RegisterBody {
        address: "127.0.0.1".into(),
        port: Some(backend_port.into()),
        ..Default::default()
    });
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
    let every = Duration::from_millis(20);
    let samples = traffic::sampler(
        vec![a.ns.clone(), b.ns.clone()],
        vip,
        every,
        stop.clone(),
        DRILL_MAX,
    );
    let vip_addr = SocketAddr::from((vip, svc_port));
    let opts = traffic::ClientOpts {
        workers: 1,
        interval: every,
        connect_timeout: Duration::from_millis(300),
        read_timeout: Duration::from_millis(300),
        path: "/",
    };
    let shots = traffic::client(&c.ns, vip_addr, opts, stop.clone(), DRILL_MAX);
    let holder = || {
        let s = samples.lock().expect("samples").last()?.clone();
        match (s.held[0], s.held[1]) {
            (true, false) => Some(a.clone()),
            (false, true) => Some(b.clone()),
            _ => None,
        }
    };
    // The first holder, once it has held for a second: at start-up a
    // balancer whose haproxy is not up yet may lead and hand over.
    let mut seen: Option<(String, Instant)> = None;
    let first = wait_for(Duration::from_secs(30), "a steady VIP holder", || {
        let h = holder()?;
        match &seen {
            Some((name, since)) if *name == h.name => {
                (since.elapsed() >= Duration::from_secs(1)).then_some(h)
            }
            _ => {
                seen = Some((h.name.clone(), Instant::now()));
                None
            }
        }
    });
    let started = Instant::now();
    wait_for(Duration::from_secs(20), "requests through the VIP", || {
        (served_since(&shots, started, Some(&first.name)) >= 10).then_some(())
    });
    eprintln!(
        "VIP {vip} held by balancer {}; client traffic flows",
        first.name
    );
    let mut report = Vec::new();

    // (d) Planned restarts: SIGTERM to the holder's clbd, then a rolling
    // restart of all three. A leader drains and hands leadership over before
    // it stops: new connections are held back (their SYN dropped, sent again
    // by TCP after 1 s), open requests finish, then release, then the
    // successor claims. So no request may fail for a client as patient as a
    // real one (see PATIENT_CONNECT), not even one open when the address moved.
    // The drill client's 300 ms timeout is reported beside it.
    let t = Instant::now();
    marks.push(("planned restarts", t));
    let patient_stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let patient = traffic::client(
        &c.ns,
        vip_addr,
        traffic::ClientOpts {
            workers: 1,
            interval: every,
            connect_timeout: PATIENT_CONNECT,
            read_timeout: Duration::from_secs(3),
            path: "/",
        },
        patient_stop.clone(),
        DRILL_MAX,
    );
    // Two workers asking for an answer that takes 300 ms: a request is
    // open on the holder nearly all the time, so without the drain every
    // move would reset one (checked: with --drain-ms 0 this fails).
    let slow = traffic::client(
        &c.ns,
        vip_addr,
        traffic::ClientOpts {
            workers: 2,
            interval: every,
            connect_timeout: PATIENT_CONNECT,
            read_timeout: Duration::from_secs(3),
            path: "/slow",
        },
        patient_stop.clone(),
        DRILL_MAX,
    );
    let hosts = [a.clone(), b.clone(), w.clone()];
    let api_of = |h: &Host| addrs[hosts.iter().position(|x| x.name == h.name).expect("host")].1;
    let mut order = vec![first.clone()];
    order.extend(hosts.iter().cloned());
    for h in &order {
        let label = format!("clbd-{}", h.name);
        let status = lab.terminate(&label, Duration::from_secs(10));
        assert!(
            status.is_some_and(|s| s.success()),
            "clbd-{} did not stop cleanly on SIGTERM: {status:?}",
            h.name
        );
        lab.spawn(
            &label,
            &h.ns,
            env!("CARGO_BIN_EXE_clbd"),
            &clbd_args[&h.name],
            RUST_LOG,
        )
        .expect("restart clbd");
        let api = api_of(h);
        wait_for(
            Duration::from_secs(20),
            "the restarted node to follow",
            || cluster_view(&h.ns, api)?.leader.map(|_| ()),
        );
        let since = Instant::now();
        wait_for(Duration::from_secs(20), "traffic after the restart", || {
            (served_since(&shots, since, None) >= 10).then_some(())
        });
    }
    let end = Instant::now();
    patient_stop.store(true, Ordering::SeqCst);
    let (gap, failed) = longest_gap(&shots.lock().expect("shots"), t, end);
    let (pgap, pfailed) = longest_gap(&patient.lock().expect("shots"), t, end);
    let sent = patient.lock().expect("shots").len();
    // A request open on the old holder when the address moved would be
    // reset by the new one (its connection lives on the old host) unless
    // the drain let it finish first; one that could not connect within PATIENT_CONNECT
    // would be a gap. Neither may happen.
    let slow_sent = slow.lock().expect("shots").len();
    let errors: Vec<String> = [&patient, &slow]
        .iter()
        .flat_map(|c| c.lock().expect("shots").clone())
        .filter(|s| s.start >= t && s.at <= end)
        .filter_map(|s| s.error)
        .collect();
    report.push(format!(
        "holder restarted, then all three in turn: patient client {sent} requests, \
         {pfailed} failed, longest gap {} ms; {slow_sent} slow requests ({} ms each), {} \
         failed; drill client (300 ms connect timeout) {failed} failed, longest gap {} ms",
        pgap.as_millis(),
        traffic::SLOW.as_millis(),
        errors.len() - pfailed.min(errors.len()),
        gap.as_millis()
    ));
    assert!(
        errors.is_empty(),
        "planned restarts failed requests of a patient client: {errors:?} (longest gap {pgap:?})"
    );
    // The drains really waited for open requests: else this phase proves
    // nothing about requests open at a move.
    let waited: usize = [&a, &b]
        .iter()
        .map(|h| std::fs::read_to_string(lab.log(&format!("clbd-{}", h.name))).unwrap_or_default())
        .flat_map(|log| {
            log.lines()
                .filter(|l| l.contains("drained: no request open"))
                .filter_map(|l| {
                    l.split("waited_for=")
                        .nth(1)?
                        .split(' ')
                        .next()?
                        .parse::<usize>()
                        .ok()
                })
                .collect::<Vec<_>>()
        })
        .sum();
    report.push(format!("drains waited for {waited} open requests in all"));
    assert!(
        waited >= 1,
        "no drain found a request open: the slow clients did not test the drain"
    );
    let first = wait_for(Duration::from_secs(10), "a VIP holder", holder);

    // (c) The witness is unplugged: nothing may move, nothing may fail.
    let t = Instant::now();
    marks.push(("witness isolated", t));
    lab.set_link(&w, false).expect("unplug");
    wait_for(
        Duration::from_secs(10),
        "1 s of traffic with the witness cut off",
        || (served_since(&shots, t, Some(&first.name)) >= 50).then_some(()),
    );
    lab.set_link(&w, true).expect("plug");
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
        let other = |s: &&&Sample| s.held[if first.name == "a" { 1 } else { 0 }];
        let mine = |s: &&&Sample| s.held[if first.name == "a" { 0 } else { 1 }];
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
            let v = cluster_view(&w.ns, api_w)?;
            let want = if first.name == "a" { 1 } else { 2 };
            (v.leader == Some(want)).then_some(())
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
    lab.set_link(&old, false).expect("unplug");
    wait_for(
        Duration::from_secs(15),
        "the VIP on the other balancer",
        || (holder()?.name == other.name).then_some(()),
    );
    wait_for(
        Duration::from_secs(15),
        "traffic through the new holder",
        || (served_since(&shots, t, Some(&other.name)) >= 25).then_some(()),
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
    lab.set_link(&old, true).expect("plug");
    let old_api = addrs[if old.name == "a" { 0 } else { 1 }].1;
    let other_id = if other.name == "a" { 1 } else { 2 };
    wait_for(
        Duration::from_secs(15),
        "the old leader rejoined as a follower",
        || {
            let v = cluster_view(&old.ns, old_api)?;
            (v.leader == Some(other_id) && !v.vip.held).then_some(())
        },
    );

    // (a) The new leader's host dies: clbd and haproxy SIGKILLed, link cut.
    let t = Instant::now();
    marks.push(("leader killed", t));
    lab.kill(&format!("clbd-{}", other.name));
    lab.kill(&format!("haproxy-{}", other.name));
    netns::ip(&["-n", &other.ns, "link", "set", "eth0", "down"]).expect("link down");
    let dead = (other.name.clone(), t);
    wait_for(
        Duration::from_secs(15),
        "the VIP back on the first balancer",
        || {
            let s = samples.lock().expect("samples").last()?.clone();
            let on_old = s.held[if old.name == "a" { 0 } else { 1 }];
            (s.at > t && on_old).then_some(())
        },
    );
    wait_for(
        Duration::from_secs(15),
        "traffic through the survivor",
        || (served_since(&shots, t, Some(&old.name)) >= 25).then_some(()),
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
            s.held[0] && alive("a") && s.held[1] && alive("b")
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

/// A balancer cut off while the other balancer and the witness commit
/// entries is behind the witness; when the other balancer then dies, the
/// survivor cannot win the witness's vote (its log is shorter). The witness
/// must lead just long enough to bring it up to date and hand over, or the
/// VIP stays unclaimed until the dead balancer returns (seen in CI: the
/// partition drill above killed the new leader just after the old one
/// reconnected, before it had caught up).
#[test]
fn a_balancer_behind_the_witness_takes_over_once_the_witness_caught_it_up() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED witness catch-up: network namespaces need root (CI runs as root)");
        return;
    }
    let pid = std::process::id();
    let subnet = [10, 214, (pid % 200 + 20) as u8];
    let mut lab = Lab::new(&format!("clbw{pid}"), subnet).expect("lab");
    let labels = ["clbd-a", "clbd-b", "clbd-w"];
    let _logs = LogsOnPanic(labels.iter().map(|l| lab.log(l)).collect());
    let mut host = |name: &str, last: u8| lab.add_host(name, last).expect("add host");
    let hosts = [(1u64, host("a", 1)), (2, host("b", 2)), (3, host("w", 3))];
    let (api, peer, peers) = node_addrs(&hosts);
    let d = lab.dir().to_path_buf();
    std::fs::write(d.join("tokens"), format!("{TOKEN}\n")).expect("tokens");
    std::fs::write(d.join("secret"), format!("{SECRET}\n")).expect("secret");
    let (hook, events) = lab::vip_hook(&d).expect("write hook");
    for (i, (id, h)) in hosts.iter().enumerate() {
        let mut args: Vec<String> = [
            "--node-id",
            &id.to_string(),
            "--listen",
            &api[i].to_string(),
            "--peer-listen",
            &peer[i].to_string(),
            "--peers",
            &peers,
            "--cluster-secret-file",
            &d.join("secret").display().to_string(),
            "--token-file",
            &d.join("tokens").display().to_string(),
            "--data-dir",
            &d.join(format!("data-{}", h.name)).display().to_string(),
            "-o",
            &d.join(format!("haproxy-{}.cfg", h.name))
                .display()
                .to_string(),
            "--validate-cmd",
            "true",
            "--stats-port",
            "0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(TIMERS.iter().map(|s| s.to_string()));
        if h.name == "w" {
            args.extend(["--role".into(), "witness".into()]);
        } else {
            let vip = lab.addr(100).to_string();
            args.extend(["--vip".into(), vip, "--vip-hook".into()]);
            args.push(hook.display().to_string());
        }
        lab.spawn(
            &format!("clbd-{}", h.name),
            &h.ns,
            env!("CARGO_BIN_EXE_clbd"),
            &args,
            RUST_LOG,
        )
        .expect("spawn clbd");
    }
    let leader_of = |i: usize| -> Option<u64> { cluster_view(&hosts[i].1.ns, api[i])?.leader };
    let first = wait_for(Duration::from_secs(20), "a leader", || {
        leader_of(0).filter(|&l| l != 3 && leader_of(1) == Some(l))
    });
    let (lead, lag) = if first == 1 { (0, 1) } else { (1, 0) };
    wait_for(Duration::from_secs(10), "the leader's claim", || {
        lab::hook_events(&events)
            .iter()
            .any(|e| e.node == first && e.action == "claim")
            .then_some(())
    });

    // The lagging balancer is unplugged; the leader and the witness commit
    // what it then misses.
    lab.set_link(&hosts[lag].1, false).expect("unplug");
    for n in 0..5 {
        let body = body_of(&RegisterBody {
            address: "10.9.9.9".into(),
            port: Some(80),
            ..Default::default()
        });
        let path = format!("/v1/services/web/members/m{n}");
        wait_for(Duration::from_secs(10), "an acknowledged write", || {
            let (status, _) = http(&hosts[lead].1.ns, api[lead], "PUT", &path, Some(&body))?;
            (status == 200).then_some(())
        });
    }
    // The leader's host dies, then the lagging balancer comes back.
    let killed = lab::hook_events(&events).len();
    lab.kill(&format!("clbd-{}", hosts[lead].1.name));
    lab.set_link(&hosts[lead].1, false)
        .expect("unplug the dead host");
    lab.set_link(&hosts[lag].1, true).expect("plug");
    let survivor = hosts[lag].0;
    let claim = wait_for(
        Duration::from_secs(30),
        "a claim by the balancer that was behind",
        || {
            lab::hook_events(&events)[killed..]
                .iter()
                .find(|e| e.node == survivor && e.action == "claim")
                .cloned()
        },
    );
    // It leads with every acknowledged write.
    let (_, body) = http(&hosts[lag].1.ns, api[lag], "GET", "/v1/services/web", None)
        .expect("the survivor answers");
    let v: OneServiceView = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    for n in 0..5 {
        assert!(
            v.definition.members.contains_key(&format!("m{n}")),
            "m{n} lost: {body}"
        );
    }
    assert_eq!(leader_of(lag), Some(survivor));
    // The witness led in between (a term of its own) and never claimed.
    let log = std::fs::read_to_string(lab.log("clbd-w")).unwrap_or_default();
    assert!(
        log.contains("unfit to lead: handing leadership over"),
        "the witness never led: {log}"
    );
    assert!(lab::hook_events(&events).iter().all(|e| e.node != 3));
    eprintln!("the survivor claimed in term {}", claim.term);
}
