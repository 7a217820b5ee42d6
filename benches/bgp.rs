//! bgp mode's failover, spread and planned drains, in the routed lab of
//! tests/bgp (router with BIRD 2, BFD and ECMP; three balancers with BIRD,
//! haproxy and clbd; a client behind the router). Needs root and bird2.
//!
//! ```sh
//! cargo bench --bench bgp                                  # BFD 100 and 30 ms, 20 drills, 10,000 connections
//! cargo bench --bench bgp -- --bfd-ms 100 --drills 30 --connections 30000 --json bgp.json
//! ```
//!
//! arp mode's figures beside it come from `cargo bench --bench failover --
//! drills` (docs/failover.md), run in the same session: docs/bgp.md.

#[path = "../tests/bgp/bgp_lab.rs"]
mod bgp_lab;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bgp_lab::*;
use lab::ecmp::Hashing;
use lab::traffic::{ClientOpts, Shot};
use serde_json::json;

const USAGE: &str = "cargo bench --bench bgp -- [--bfd-ms 100,30] [--drills N] [--connections N] [--drains N] [--json FILE]";

struct Opts {
    bfd: Vec<u64>,
    drills: usize,
    connections: usize,
    drains: usize,
    json: Option<String>,
}

fn opts() -> Result<Option<Opts>> {
    let mut o = Opts {
        bfd: vec![100, 30],
        drills: 20,
        connections: 10_000,
        drains: 3,
        json: None,
    };
    let mut bench = false;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        // cargo bench passes --bench to harness = false targets; cargo test
        // (e.g. --all-targets, as CI runs) passes nothing: then do nothing.
        if a == "--bench" {
            bench = true;
            continue;
        }
        let mut value = || {
            args.next()
                .with_context(|| format!("{a} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--bfd-ms" => {
                o.bfd = value()?
                    .split(',')
                    .map(|v| v.trim().parse().context("--bfd-ms"))
                    .collect::<Result<_>>()?
            }
            "--drills" => o.drills = value()?.parse().context("--drills")?,
            "--connections" => o.connections = value()?.parse().context("--connections")?,
            "--drains" => o.drains = value()?.parse().context("--drains")?,
            "--json" => o.json = Some(value()?),
            other => bail!("unknown argument {other}\n{USAGE}"),
        }
    }
    Ok(bench.then_some(o))
}

fn pct(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1;
    v[i]
}

/// Planned drains of each balancer in turn under new-connection load:
/// requests sent, failed, and the slowest (a held-back SYN is resent after
/// about a second).
fn drains(bl: &mut BgpLab, n: usize, hashing: Hashing) -> (usize, usize, Duration) {
    bl.ecmp
        .set_hashing(hashing, Duration::from_secs(5))
        .expect("hashing");
    let stop = Arc::new(AtomicBool::new(false));
    let shots = bl.client(
        ClientOpts {
            workers: 4,
            interval: Duration::from_millis(5),
            connect_timeout: Duration::from_secs(7),
            read_timeout: Duration::from_secs(7),
            path: "/",
        },
        stop.clone(),
    );
    let all = bl.all_hops();
    for k in 0..n {
        let i = k % 3;
        let id = (i + 1).to_string();
        bl.clb((i + 1) % 3, &["drain-node", &id]);
        let without = bl.hops_without(&bl.balancers[i]);
        bl.wait_hops(&without, Duration::from_secs(10), "drained");
        std::thread::sleep(Duration::from_millis(1500));
        bl.clb((i + 1) % 3, &["ready-node", &id]);
        bl.wait_hops(&all, Duration::from_secs(10), "ready again");
        std::thread::sleep(Duration::from_millis(500));
    }
    stop.store(true, Ordering::SeqCst);
    // Let requests in flight finish.
    std::thread::sleep(Duration::from_secs(1));
    let shots: Vec<Shot> = shots.lock().unwrap().clone();
    let failed = shots.iter().filter(|s| s.error.is_some()).count();
    let slowest = shots
        .iter()
        .map(|s| s.at - s.start)
        .max()
        .unwrap_or_default();
    (shots.len(), failed, slowest)
}

fn main() -> Result<()> {
    lab::cleanup_on_signals();
    let Some(o) = opts()? else {
        println!("benches/bgp: not run as a benchmark (cargo bench --bench bgp runs it)");
        return Ok(());
    };
    let mut rows = Vec::new();
    for &bfd in &o.bfd {
        eprintln!("bfd {bfd} ms: building the lab");
        let Some(mut bl) = build_with(bfd) else {
            bail!("the bgp lab needs root (network namespaces)");
        };
        let all = bl.all_hops();
        bl.wait_hops(&all, Duration::from_secs(40), "all three announced");

        // Spread of new connections, hash-threshold ECMP.
        bl.ecmp
            .set_hashing(Hashing::Threshold, Duration::from_secs(5))
            .expect("hashing");
        let stop = Arc::new(AtomicBool::new(false));
        let shots = bl.client(
            ClientOpts {
                workers: 8,
                interval: Duration::from_micros(500),
                connect_timeout: Duration::from_secs(2),
                read_timeout: Duration::from_secs(2),
                path: "/",
            },
            stop.clone(),
        );
        let started = Instant::now();
        while shots.lock().unwrap().len() < o.connections {
            std::thread::sleep(Duration::from_millis(50));
            if started.elapsed() > Duration::from_secs(600) {
                bail!("{} connections took over 10 minutes", o.connections);
            }
        }
        stop.store(true, Ordering::SeqCst);
        let shots: Vec<Shot> = shots
            .lock()
            .unwrap()
            .iter()
            .take(o.connections)
            .cloned()
            .collect();
        let by = spread(&shots);
        let shares: Vec<f64> = bl
            .balancers
            .iter()
            .map(|b| {
                100.0 * by.get(&b.host.name).copied().unwrap_or(0) as f64 / o.connections as f64
            })
            .collect();
        eprintln!("bfd {bfd} ms: spread {shares:.1?} %");

        // Host deaths, alternating hashing.
        let mut rerouted = Vec::new();
        let mut lost_after = 0;
        let mut kept_broken = [(0, 0), (0, 0)];
        for d in 0..o.drills {
            let hashing = if d % 2 == 0 {
                Hashing::Threshold
            } else {
                Hashing::Resilient
            };
            let r = host_death(&mut bl, d % 3, hashing);
            eprintln!("bfd {bfd} ms: drill {d} ({hashing:?}): {r:?}");
            rerouted.push(r.rerouted.as_secs_f64() * 1e3);
            lost_after += r.lost_after;
            let k = &mut kept_broken[d % 2];
            k.0 += r.kept;
            k.1 += r.broken;
        }
        let (sent_r, failed_r, slowest_r) = drains(&mut bl, o.drains, Hashing::Resilient);
        let (sent_t, failed_t, slowest_t) = drains(&mut bl, o.drains, Hashing::Threshold);
        rows.push(json!({
            "bfd_ms": bfd,
            "spread_pct": shares,
            "connections": o.connections,
            "drills": o.drills,
            "rerouted_ms": { "p50": pct(&rerouted, 0.5), "p90": pct(&rerouted, 0.9), "p99": pct(&rerouted, 0.99) },
            "failed_after_reroute": lost_after,
            "survivor_connections_threshold": { "kept": kept_broken[0].0, "broken": kept_broken[0].1 },
            "survivor_connections_resilient": { "kept": kept_broken[1].0, "broken": kept_broken[1].1 },
            "drains": o.drains,
            "drain_resilient": { "requests": sent_r, "failed": failed_r, "slowest_ms": slowest_r.as_millis() as u64 },
            "drain_threshold": { "requests": sent_t, "failed": failed_t, "slowest_ms": slowest_t.as_millis() as u64 },
        }));
    }
    println!("| BFD | spread of {} connections (b1/b2/b3 %) | dead balancer out of ECMP p50 / p90 / p99 ms | failed after | survivors' open connections broken (threshold / resilient) | planned drains: failed requests (resilient / threshold) |", o.connections);
    println!("|---|---|---|---|---|---|");
    for r in &rows {
        let s: Vec<String> = r["spread_pct"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|v| format!("{:.1}", v.as_f64().unwrap_or(0.0)))
                    .collect()
            })
            .unwrap_or_default();
        let frac = |k: &str| {
            format!(
                "{} of {}",
                r[k]["broken"],
                r[k]["kept"].as_u64().unwrap_or(0) + r[k]["broken"].as_u64().unwrap_or(0)
            )
        };
        println!(
            "| {} ms × 3 | {} | {:.0} / {:.0} / {:.0} ({} drills) | {} | {} / {} | {} of {} / {} of {} |",
            r["bfd_ms"],
            s.join(" / "),
            r["rerouted_ms"]["p50"].as_f64().unwrap_or(f64::NAN),
            r["rerouted_ms"]["p90"].as_f64().unwrap_or(f64::NAN),
            r["rerouted_ms"]["p99"].as_f64().unwrap_or(f64::NAN),
            r["drills"],
            r["failed_after_reroute"],
            frac("survivor_connections_threshold"),
            frac("survivor_connections_resilient"),
            r["drain_resilient"]["failed"],
            r["drain_resilient"]["requests"],
            r["drain_threshold"]["failed"],
            r["drain_threshold"]["requests"],
        );
    }
    if let Some(path) = o.json {
        std::fs::write(&path, serde_json::to_string_pretty(&rows)?)?;
    }
    Ok(())
}
