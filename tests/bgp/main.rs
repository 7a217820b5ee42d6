//! `--vip-mode bgp` in a real routed lab (bgp_lab.rs). One lab, phases in
//! order (each needs the lab the previous one left): spread, a config one
//! balancer's haproxy rejects, a balancer cut off from Raft, a planned drain
//! and a SIGTERM under load, and ten host deaths. Figures are printed as
//! `BGP-LAB ...` lines; `cargo bench --bench bgp` runs the longer version
//! that docs/bgp.md quotes.

mod bgp_lab;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bgp_lab::*;
use clb::model::{Check, Mode};
use clb::views::ServiceBody;
use lab::ecmp::Hashing;
use lab::netns::{self, LogsOnPanic};
use lab::traffic::{ClientOpts, Shot};
use std::net::Ipv4Addr;

#[test]
fn bgp_mode_spreads_drains_and_survives_host_deaths() {
    let Some(mut bl) = build() else { return };
    let mut logs: Vec<PathBuf> = vec![bl.lab.log("bird-r")];
    for b in &bl.balancers {
        logs.push(bl.lab.log(&b.clbd()));
        logs.push(bl.lab.log(&b.bird()));
    }
    let _logs = LogsOnPanic(logs);
    let all = bl.all_hops();
    bl.wait_hops(
        &all,
        Duration::from_secs(40),
        "all three balancers announced at the router",
    );
    for b in &bl.balancers {
        // Status, session and BFD as the node reports them.
        wait_for(
            Duration::from_secs(15),
            "announced, session and BFD up",
            || {
                b.bgp()
                    .filter(|s| s.announced && s.session_up && s.bfd == "Up")
            },
        );
    }

    // What operators see: clb status, /metrics and /ui.
    let status = bl.clb(0, &["status"]);
    assert!(
        status.contains("ANNOUNCED") && status.matches("Established").count() == 3,
        "{status}"
    );
    let (code, metrics) = bl.balancers[1]
        .http("GET", "/metrics", None)
        .expect("metrics");
    assert_eq!(code, 200);
    for line in [
        "clb_bgp_announced 1",
        "clb_bgp_session_up 1",
        "clb_bgp_bfd_up 1",
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no {line:?} in\n{metrics}"
        );
    }
    let (code, ui) = bl.balancers[2].http("GET", "/ui", None).expect("ui");
    assert_eq!(code, 200);
    assert!(
        ui.contains("BGP announcements") && ui.matches(">announced<").count() == 3,
        "{ui}"
    );

    // 1. Spread: 3,000 new connections from one client.
    let stop = Arc::new(AtomicBool::new(false));
    let opts = ClientOpts {
        workers: 8,
        interval: Duration::from_micros(500),
        connect_timeout: Duration::from_secs(2),
        read_timeout: Duration::from_secs(2),
        path: "/",
    };
    let shots = bl.client(opts, stop.clone());
    wait_for(Duration::from_secs(60), "3,000 requests", || {
        (shots.lock().unwrap().len() >= 3000).then_some(())
    });
    stop.store(true, Ordering::SeqCst);
    let shots: Vec<Shot> = shots.lock().unwrap().iter().take(3000).cloned().collect();
    let by = spread(&shots);
    eprintln!("BGP-LAB spread over 3000 connections: {by:?}");
    assert!(
        failures(&shots).is_empty(),
        "failed: {:?}",
        failures(&shots).first()
    );
    for b in &bl.balancers {
        let n = by.get(&b.host.name).copied().unwrap_or(0);
        assert!(
            (600..=1410).contains(&n),
            "balancer {} carried {n} of 3000 (outside 20-47 %): {by:?}",
            b.host.name
        );
    }

    // 2. A config node 3's haproxy rejects: it withdraws within the lag
    // bound and never announces while it runs an older config.
    let b3 = 2;
    std::fs::write(bl.dir.join("reject"), "").unwrap();
    bl.define("rejected-here");
    let s = wait_for(
        Duration::from_secs(10),
        "node 3 withdrawn after the rejection",
        || {
            bl.balancers[b3]
                .bgp()
                .filter(|s| !s.announced && s.reason.contains("rejected"))
        },
    );
    let without3 = bl.hops_without(&bl.balancers[b3]);
    bl.wait_hops(
        &without3,
        Duration::from_secs(5),
        "the router without node 3",
    );
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        let hops = bl.next_hops();
        assert!(
            !hops.contains(&bl.balancers[b3].host.ip),
            "node 3 announced while its config was rejected: {hops:?}"
        );
        let s = bl.balancers[b3].bgp().expect("status");
        assert!(!s.announced, "{s:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::fs::remove_file(bl.dir.join("reject")).unwrap();
    bl.define("accepted-here");
    bl.wait_hops(
        &all,
        Duration::from_secs(10),
        "node 3 back after a config it accepts",
    );
    eprintln!(
        "BGP-LAB rejected config: node 3 withdrew ({}), announced again once fit",
        s.reason
    );

    // 3. Node 3 cut off from Raft (its BGP session stays up): it withdraws
    // and stays out while the others commit changes it lacks.
    let (b1h, b2h, b3h) = (
        bl.balancers[0].host.clone(),
        bl.balancers[1].host.clone(),
        bl.balancers[b3].host.clone(),
    );
    bl.lab
        .partition(&[&[&b3h], &[&b1h, &b2h]])
        .expect("partition");
    bl.wait_hops(
        &without3,
        Duration::from_secs(10),
        "node 3 withdrawn when cut off from Raft",
    );
    let s = bl.balancers[b3].bgp().expect("status");
    assert!(!s.announced && s.session_up, "{s:?}");
    let lagging = s.reason.clone();
    let spare = netns::free_port_in(&b1h.ns, Ipv4Addr::UNSPECIFIED).expect("free port");
    wait_for(
        Duration::from_secs(10),
        "a change committed without node 3",
        || {
            let body = serde_json::to_string(&ServiceBody {
                port: spare.into(),
                mode: Some(Mode::Tcp),
                check: Some(Check::None),
                ..Default::default()
            })
            .ok()?;
            let r = bl.balancers[0].http("PUT", "/v1/services/while-cut-off", Some(&body))?;
            (r.0 == 200).then_some(())
        },
    );
    let until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < until {
        // The others may withdraw for a moment too (a slow reload of the
        // new service); node 3 must not come back.
        let hops = bl.next_hops();
        assert!(
            !hops.contains(&b3h.ip),
            "node 3 announced while behind the registry: {hops:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    bl.lab.recover().expect("recover");
    bl.wait_hops(
        &all,
        Duration::from_secs(15),
        "node 3 back after catching up",
    );
    eprintln!("BGP-LAB lagging node: withdrew ({lagging}), announced again after catching up");

    // 4. Planned drain of node 2 under load, then SIGTERM of node 1: no
    // request fails (a held-back SYN is sent again after ~1 s).
    let stop = Arc::new(AtomicBool::new(false));
    let patient = ClientOpts {
        workers: 4,
        interval: Duration::from_millis(5),
        connect_timeout: Duration::from_secs(7),
        read_timeout: Duration::from_secs(7),
        path: "/",
    };
    // A router with resilient hashing: a next hop that leaves or joins
    // moves no flow of the others (with hash-threshold some do, and their
    // host resets them: phase 5 counts them).
    bl.ecmp
        .set_hashing(Hashing::Resilient, Duration::from_secs(5))
        .expect("resilient hashing");
    let shots = bl.client(patient, stop.clone());
    wait_for(Duration::from_secs(10), "load running", || {
        (shots.lock().unwrap().len() >= 100).then_some(())
    });
    // Through the CLI, asked of node 1 (it forwards to node 2).
    let out = bl.clb(0, &["drain-node", "2"]);
    assert!(
        out.contains("node 2 does not announce the VIP: drained by an operator"),
        "{out}"
    );
    let drained = bl.balancers[1].bgp().expect("node 2 status");
    assert!(!drained.announced && drained.drained, "{drained:?}");
    let without2 = bl.hops_without(&bl.balancers[1]);
    bl.wait_hops(
        &without2,
        Duration::from_secs(5),
        "the router without node 2",
    );
    let mark = shots.lock().unwrap().len();
    wait_for(Duration::from_secs(10), "more load after the drain", || {
        (shots.lock().unwrap().len() >= mark + 300).then_some(())
    });
    let after: Vec<Shot> = shots.lock().unwrap()[mark..].to_vec();
    assert_eq!(
        spread(&after).get("b2"),
        None,
        "node 2 carried new connections after its drain"
    );
    let out = bl.clb(2, &["ready-node", "2"]);
    assert!(out.contains("node 2 announces the VIP"), "{out}");
    bl.wait_hops(
        &all,
        Duration::from_secs(10),
        "node 2 back after ready-node",
    );
    // SIGTERM: node 1 drains and withdraws before it stops.
    let label = bl.balancers[0].clbd();
    let status = bl.lab.terminate(&label, Duration::from_secs(20));
    assert!(
        status.is_some_and(|s| s.success()),
        "clbd-b1 exit: {status:?}"
    );
    let without1 = bl.hops_without(&bl.balancers[0]);
    assert_eq!(
        bl.next_hops(),
        without1,
        "node 1 still announced after it stopped"
    );
    let mark = shots.lock().unwrap().len();
    wait_for(Duration::from_secs(10), "more load after the stop", || {
        (shots.lock().unwrap().len() >= mark + 200).then_some(())
    });
    stop.store(true, Ordering::SeqCst);
    let shots: Vec<Shot> = shots.lock().unwrap().clone();
    let failed = failures(&shots);
    eprintln!(
        "BGP-LAB planned drain + SIGTERM under load: {} requests, {} failed, slowest {:?}",
        shots.len(),
        failed.len(),
        shots.iter().map(|s| s.at - s.start).max()
    );
    assert!(
        failed.is_empty(),
        "{} failed, first: {:?}",
        failed.len(),
        failed.first()
    );
    bl.start_clbd(0);
    bl.wait_hops(
        &all,
        Duration::from_secs(20),
        "node 1 back after its restart",
    );

    // 5. Host deaths: clbd, haproxy and BIRD SIGKILLed and the link cut.
    let mut recoveries = Vec::new();
    let (mut survivors_kept, mut survivors_broken) = (0, 0);
    let mut broken_by = BTreeMap::new();
    for drill in 0..10 {
        let v = drill % 3;
        let hashing = if drill % 2 == 0 {
            Hashing::Threshold
        } else {
            Hashing::Resilient
        };
        let d = bgp_lab::host_death(&mut bl, v, hashing);
        assert!(
            d.new_after >= 20 && d.lost_after == 0,
            "drill {drill}: {} of {} new connections failed after the router dropped the dead host at {:?}: {:?}",
            d.lost_after,
            d.new_after,
            d.rerouted,
            d.first_lost
        );
        let (last_failed, failed_before, kept, broken) =
            (d.rerouted, d.failed_before, d.kept, d.broken);
        recoveries.push(last_failed.as_secs_f64() * 1e3);
        survivors_kept += kept;
        survivors_broken += broken;
        let e = broken_by.entry(format!("{hashing:?}")).or_insert((0, 0));
        e.0 += kept;
        e.1 += broken;
        eprintln!(
            "BGP-LAB host death {drill} (node {}, {hashing:?} hashing): the router stopped sending new connections \
             to it {:.0} ms after the kill ({failed_before} sent there failed, none after); \
             open connections on survivors: {kept} kept, {broken} broken by the rehash",
            v + 1,
            last_failed.as_secs_f64() * 1e3
        );
    }
    let p50 = pct(&mut recoveries, 0.5);
    let p99 = pct(&mut recoveries, 0.99);
    eprintln!(
        "BGP-LAB host deaths: new connections all succeed again after p50 {p50:.0} ms, p99 {p99:.0} ms (10 drills); \
         survivors' open connections: {survivors_kept} kept, {survivors_broken} broken; (kept, broken) by hashing: {broken_by:?}"
    );
    assert_eq!(
        broken_by.get("Resilient").map(|e| e.1),
        Some(0),
        "resilient hashing broke open connections on survivors: {broken_by:?}"
    );
    assert!(
        p99 < 1000.0,
        "p99 recovery {p99:.0} ms (recoveries {recoveries:?})"
    );
    assert!(
        survivors_kept > 0,
        "every open connection on a survivor broke"
    );
}
