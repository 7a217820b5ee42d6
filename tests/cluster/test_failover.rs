//! The leader holds the VIP: real `clbd` processes with an exec hook that
//! appends `time_ns node action term` lines to a shared log.

use std::path::Path;
use std::time::Duration;

use clb::views::RaftState;

use crate::harness::{eventually, ClusterExt, NodeExt};
use lab::netns::Netns;
use lab::{hook_events, now_ns, vip_hook, Cluster, HookEvent as Event, Proc};

/// Quick but not twitchy on a loaded 2-core CI machine. openraft 0.9 waits
/// `max + rand(min, max)` after the last heartbeat (300–360 ms), plus `2 *
/// max` more on a node that saw a longer log in an earlier election (as
/// after formation): at worst ~720 ms. The lease defaults to 80 ms.
const TIMERS: [&str; 6] = [
    "--heartbeat-ms",
    "20",
    "--election-timeout-min-ms",
    "120",
    "--election-timeout-max-ms",
    "180",
];
const VIP: &str = "192.0.2.77";

/// Every node gets the VIP and hook; `witness` (if any) gets `--role witness`.
fn args(script: &Path, witness: Option<u64>, extra: Vec<String>) -> impl Fn(u64) -> Vec<String> {
    let script = script.display().to_string();
    move |id| {
        let mut a: Vec<String> = [
            "--vip",
            VIP,
            "--vip-hook",
            &script,
            // Rendering is not under test; never let a missing haproxy matter.
            "--validate-cmd",
            "true",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if witness == Some(id) {
            a.extend(["--role".to_string(), "witness".to_string()]);
        }
        a.extend(extra.iter().cloned());
        a
    }
}

/// Waits until `node`'s own status says it holds the VIP; returns the term.
async fn holds(c: &Cluster, node: u64, within: Duration) -> u64 {
    eventually(within, &format!("node {node} to hold the VIP"), || async {
        let v = c.node(node).view().await?;
        v.vip.held_term.filter(|_| v.vip.held)
    })
    .await
}

/// The leader all nodes agree on, once it holds the VIP.
async fn holder(c: &Cluster) -> u64 {
    let leader = c.leader(Duration::from_secs(10)).await;
    holds(c, leader, Duration::from_secs(5)).await;
    leader
}

fn last_claim_index(ev: &[Event], node: u64) -> Option<usize> {
    ev.iter()
        .rposition(|e| e.node == node && e.action == "claim")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn voters_with_a_shorter_election_timeout_give_the_leader_no_lease() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (script, _log) = vip_hook(dir.path()).expect("write hook");
    let base = args(&script, None, vec![]);
    // Only node 1 may lead (2 and 3 are witnesses). Its window is 600 ms and
    // its lease 450 ms; theirs is 200 ms: they could vote for someone else
    // 200 ms after its last heartbeat, inside its lease, so their acks must
    // not let it hold the VIP.
    let c = Cluster::start_custom(3, &[], move |id| {
        let mut a = base(id);
        let (min, max) = if id == 1 {
            ("300", "600")
        } else {
            ("100", "200")
        };
        a.extend(
            [
                "--heartbeat-ms",
                "50",
                "--election-timeout-min-ms",
                min,
                "--election-timeout-max-ms",
                max,
            ]
            .map(String::from),
        );
        if id != 1 {
            a.extend(["--role", "witness"].map(String::from));
        }
        a
    })
    .await;
    assert_eq!(c.leader(Duration::from_secs(10)).await, 1);
    eventually(
        Duration::from_secs(10),
        "the leader's error naming the shorter window",
        || async {
            c.node(1)
                .log_text()
                .contains("election timeout is shorter than ours")
                .then_some(())
        },
    )
    .await;
    // A quorum follows it (a write commits), which without the check would
    // have given it a lease and a claim long before the error above; it
    // never claimed.
    c.node(1)
        .client()
        .register("http", "w", "10.0.0.1", None, None, None)
        .await
        .expect("a write through the leader");
    let v = c.node(1).view().await.expect("view");
    assert_eq!(v.state, RaftState::Leader, "{v:?}");
    assert!(!v.vip.held, "{v:?}");
    assert_eq!(v.vip.claims_ok, 0, "{v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_leader_new_claim_within_a_second_and_witness_never_holds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (script, log) = vip_hook(dir.path()).expect("write hook");
    let mut c = Cluster::start_custom(3, &TIMERS, args(&script, Some(3), vec![])).await;
    let old = holder(&c).await;
    assert_ne!(old, 3, "the witness must never lead for long");

    let killed_at = now_ns();
    c.node_mut(old).kill();
    let new = if old == 1 { 2 } else { 1 };
    let claim = eventually(
        Duration::from_secs(5),
        "a claim by the survivor",
        || async {
            hook_events(&log)
                .into_iter()
                .find(|e| e.node == new && e.action == "claim" && e.at_ns > killed_at)
        },
    )
    .await;
    let latency_ms = (claim.at_ns - killed_at) / 1_000_000;
    eprintln!("claim by node {new} ran {latency_ms} ms after SIGKILL of node {old}");
    assert!(latency_ms < 1_000, "claim took {latency_ms} ms");

    let ev = hook_events(&log);
    let new_claim = ev.iter().position(|e| *e == claim).expect("claim in log");
    let old_claim = last_claim_index(&ev, old).expect("the old leader had claimed");
    assert!(old_claim < new_claim, "{ev:?}");
    assert!(ev[old_claim].at_ns < claim.at_ns, "{ev:?}");
    assert!(
        ev[old_claim].term < claim.term,
        "fencing terms must grow: {ev:?}"
    );
    holds(&c, new, Duration::from_secs(2)).await;

    // The witness never ran a hook and says it never campaigns.
    assert!(
        ev.iter().all(|e| e.node != 3),
        "witness ran a VIP hook: {ev:?}"
    );
    let w = c.node(3).view().await.expect("witness view");
    assert!(!w.vip.held);
    assert_eq!(w.vip.claims_ok, 0);
    assert!(!w.vip.may_campaign);
    assert_eq!(w.vip_holder, Some(new));
    // ... and renders nothing: no config file, no render status, while the
    // balancers rendered theirs.
    assert!(
        c.dir.path().join("haproxy1.cfg").exists() || c.dir.path().join("haproxy2.cfg").exists()
    );
    assert!(
        !c.dir.path().join("haproxy3.cfg").exists(),
        "the witness rendered a config"
    );
    let status = c.node(3).client().cluster().await.expect("cluster view");
    assert!(
        status.node(3).and_then(|n| n.render.as_ref()).is_none(),
        "{status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigstop_leader_others_claim_and_it_releases_first_on_sigcont() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (script, log) = vip_hook(dir.path()).expect("write hook");
    let c = Cluster::start_custom(3, &TIMERS, args(&script, Some(3), vec![])).await;
    let old = holder(&c).await;
    let other = if old == 1 { 2 } else { 1 };

    let stopped_at = now_ns();
    c.node(old).signal(libc::SIGSTOP);
    let claim = eventually(
        Duration::from_secs(5),
        "a claim while the leader is stopped",
        || async {
            hook_events(&log)
                .into_iter()
                .find(|e| e.node == other && e.action == "claim" && e.at_ns > stopped_at)
        },
    )
    .await;
    eprintln!(
        "node {other} claimed {} ms after SIGSTOP of node {old}",
        (claim.at_ns - stopped_at) / 1_000_000
    );

    let resumed_at = now_ns();
    c.node(old).signal(libc::SIGCONT);
    let first = eventually(
        Duration::from_secs(5),
        "the old leader's first hook after SIGCONT",
        || async {
            hook_events(&log)
                .into_iter()
                .find(|e| e.node == old && e.at_ns > resumed_at)
        },
    )
    .await;
    assert_eq!(
        first.action, "release",
        "first hook after SIGCONT: {first:?}"
    );
    eprintln!(
        "node {old} released {} ms after SIGCONT",
        (first.at_ns - resumed_at) / 1_000_000
    );
    let v = c.node(old).view().await.expect("old leader view");
    assert!(v.vip.lease_expiries >= 1, "{:?}", v.vip);
    // On a loaded machine the resumed node may win a later election (openraft
    // 0.9 has no pre-vote); then it claims again, but only with a newer term,
    // never with the stale one it held before the stop.
    let leader = c.leader(Duration::from_secs(5)).await;
    let held_term = holds(&c, leader, Duration::from_secs(2)).await;
    let ev = hook_events(&log);
    for e in ev
        .iter()
        .filter(|e| e.node == old && e.action == "claim" && e.at_ns > resumed_at)
    {
        assert!(e.term > claim.term, "stale claim after SIGCONT: {ev:?}");
    }
    if leader == old {
        assert!(held_term > claim.term, "{ev:?}");
    }
    assert!(
        ev.iter().all(|e| e.node != 3),
        "witness ran a VIP hook: {ev:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_leader_hands_over_and_clb_failover_moves_the_vip() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (script, log) = vip_hook(dir.path()).expect("write hook");
    let sick = |id: u64| dir.path().join(format!("sick{id}"));
    let health = format!("test ! -e {}/sick$CLB_NODE", dir.path().display());
    let make_args = {
        let base = args(
            &script,
            None,
            vec![
                "--health-interval-ms".into(),
                "100".into(),
                "--health-failures".into(),
                "2".into(),
            ],
        );
        let health = health.clone();
        move |id: u64| {
            let mut a = base(id);
            a.extend([
                "--health-cmd".to_string(),
                health.replace("$CLB_NODE", &id.to_string()),
            ]);
            a
        }
    };
    let c = Cluster::start_custom(3, &TIMERS, make_args).await;
    let old = holder(&c).await;

    std::fs::write(sick(old), "").expect("make the leader sick");
    let sick_at = now_ns();
    let new = eventually(
        Duration::from_secs(10),
        "a healthy leader holding the VIP",
        || async {
            let l = c.node(1).view().await?.leader?;
            if l == old {
                return None;
            }
            let v = c.node(l).view().await?;
            v.vip.held.then_some(l)
        },
    )
    .await;
    eprintln!(
        "unhealthy node {old} handed over to node {new} within {} ms of the health failure",
        (now_ns() - sick_at) / 1_000_000
    );
    let v = c.node(old).view().await.expect("old leader view");
    assert!(!v.vip.healthy);
    assert!(!v.vip.held);
    assert!(v.vip.health_reason.contains("--health-cmd"));
    let ev = hook_events(&log);
    let release = ev
        .iter()
        .rposition(|e| e.node == old && e.action == "release")
        .expect("old leader released");
    let claim = last_claim_index(&ev, new).expect("new leader claimed");
    assert!(
        release < claim,
        "release must precede the new claim: {ev:?}"
    );

    // No preemption: the recovered node stays a follower.
    std::fs::remove_file(sick(old)).expect("heal");
    eventually(
        Duration::from_secs(5),
        "the old leader healthy again",
        || async {
            let v = c.node(old).view().await?;
            v.vip.healthy.then_some(())
        },
    )
    .await;
    for _ in 0..10 {
        assert_eq!(c.node(old).view().await.expect("view").leader, Some(new));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // `clb failover` through a follower: the leader steps down gracefully.
    let follower = c.followers(new)[0];
    let answer = c
        .node(follower)
        .client()
        .failover()
        .await
        .expect("failover");
    eprintln!("clb failover: {answer:?}");
    assert_eq!(answer.from, new);
    let moved_to = answer.new_leader;
    assert_ne!(moved_to, new);
    assert_eq!(answer.vip_holder, Some(moved_to));
    assert!(answer.vip_took_ms.expect("vip took") < 5_000);
    let ev = hook_events(&log);
    let release = ev
        .iter()
        .rposition(|e| e.node == new && e.action == "release")
        .expect("stepped-down leader released");
    let claim = last_claim_index(&ev, moved_to).expect("successor claimed");
    assert!(release < claim, "{ev:?}");
}

/// A network namespace with a veth pair `vip0`/`vip1`, both up; deleted
/// (with its interfaces) on drop.
fn vip_netns() -> Result<Netns, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("not root".into());
    }
    let name = format!("clbt-{}-{}", std::process::id(), now_ns() % 1_000_000);
    let made = || -> anyhow::Result<Netns> {
        let ns = Netns::new(&name)?;
        // veth, not dummy: container kernels often lack the dummy module.
        ns.ip(&[
            "link", "add", "vip0", "type", "veth", "peer", "name", "vip1",
        ])?;
        ns.ip(&["link", "set", "vip1", "up"])?;
        ns.ip(&["link", "set", "vip0", "up"])?;
        Ok(ns)
    };
    made().map_err(|e| format!("{e:#}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linux_vip_hook_moves_a_real_address_in_a_network_namespace() {
    linux_vip_moves(Family::V4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn linux_vip_hook_moves_a_real_ipv6_address_in_a_network_namespace() {
    linux_vip_moves(Family::V6).await;
}

#[derive(Clone, Copy, PartialEq)]
enum Family {
    V4,
    V6,
}

/// The address added and removed on vip0, and announced to a neighbour on
/// its link (gratuitous ARP / unsolicited neighbour advertisement).
async fn linux_vip_moves(family: Family) {
    let ns = match vip_netns() {
        Ok(ns) => ns,
        Err(why) => {
            eprintln!("SKIPPED linux_vip_hook_moves_a_real_address: cannot create a network namespace ({why}); run as root");
            return;
        }
    };
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("tokens"), "t\n").expect("tokens");
    let (vip, cidr, shown, neighbour, learn) = match family {
        Family::V4 => (
            "198.51.100.7",
            "198.51.100.7/32",
            "inet 198.51.100.7/32",
            "198.51.100.8/24",
            vec!["net.ipv4.conf.vip1.arp_accept=1"],
        ),
        // A neighbour takes an advertisement for an address it never
        // looked up only as a router that accepts untracked ones.
        Family::V6 => (
            "2001:db8:7::7",
            "2001:db8:7::7/128",
            "inet6 2001:db8:7::7/128",
            "2001:db8:7::8/64",
            vec![
                "net.ipv6.conf.vip1.forwarding=1",
                "net.ipv6.conf.vip1.accept_untracked_na=1",
            ],
        ),
    };
    let has_vip = || {
        ns.ip(&["addr", "show", "dev", "vip0"])
            .map(|out| out.contains(shown))
            .unwrap_or(false)
    };
    // A crashed holder's leftover address is removed at start-up.
    ns.ip(&["addr", "add", cidr, "dev", "vip0"])
        .expect("leftover address");
    // A neighbour on vip0's link, which takes gratuitous ARP as news.
    let peer = Netns::new(&format!("{}-n", ns.name())).expect("neighbour ns");
    ns.ip(&["link", "set", "vip1", "netns", peer.name()])
        .expect("vip1 to the neighbour");
    peer.ip(&["addr", "add", neighbour, "dev", "vip1"])
        .expect("neighbour address");
    peer.ip(&["link", "set", "vip1", "up"]).expect("vip1 up");
    let sysctl = std::process::Command::new("ip")
        .args(["netns", "exec", peer.name(), "sysctl", "-qw"])
        .args(&learn)
        .status()
        .expect("sysctl");
    assert!(sysctl.success(), "{learn:?} on the neighbour");
    let mac = ns
        .ip(&["link", "show", "vip0"])
        .expect("vip0")
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .expect("vip0's MAC")
        .to_string();
    let mut cmd = std::process::Command::new("ip");
    cmd.args(["netns", "exec", ns.name(), env!("CARGO_BIN_EXE_clbd")])
        .args([
            "--node-id",
            "1",
            "--listen",
            "127.0.0.1:8090",
            "--validate-cmd",
            "true",
        ])
        .args(["--vip", vip, "--vip-hook", "linux-vip:vip0"])
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--token-file")
        .arg(dir.path().join("tokens"))
        .arg("-o")
        .arg(dir.path().join("haproxy.cfg"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("log")).expect("log"));
    let mut child = Proc::build(&mut cmd)
        .spawn()
        .expect("spawn clbd in the namespace");
    // The single node leads, so it claims: the address is (again) on vip0.
    let log = || std::fs::read_to_string(dir.path().join("log")).unwrap_or_default();
    eventually(
        Duration::from_secs(10),
        "a claim, and the VIP on vip0",
        || async { (log().contains("action=\"claim\"") && has_vip()).then_some(()) },
    )
    .await;
    // clbd's own gratuitous ARP taught the neighbour where the VIP is.
    eventually(
        Duration::from_secs(5),
        "the neighbour learning the VIP's MAC",
        || async {
            let n = peer.ip(&["neigh", "show", vip, "dev", "vip1"]).ok()?;
            n.contains(&mac).then_some(())
        },
    )
    .await;
    let text = log();
    assert!(!text.contains("advertisement failed"), "{text}");
    assert!(!text.contains("gratuitous ARP failed"), "{text}");
    // The start-up release runs first, before any claim (a claim on the
    // leftover address would leave an IPv6 one tentative: nothing could be
    // sent from it).
    let first_hook = text
        .lines()
        .find_map(|l| l.split("action=\"").nth(1)?.split('"').next());
    assert_eq!(first_hook, Some("release"), "{text}");
    // `ip netns exec` execs clbd in place: the signal reaches clbd.
    child.signal(libc::SIGTERM);
    let status = child.wait().expect("wait clbd");
    assert!(status.success(), "clbd exit: {status}");
    assert!(!has_vip(), "the VIP must be released on shutdown");
    let text = log();
    assert!(text.matches("action=\"release\"").count() >= 1, "{text}");
}

/// With every balancer unfit to lead (here haproxy rejects every config, so
/// none has taken one), the registry still needs a leader: an unfit node
/// campaigns as a fallback, and a hand-over goes only to a node fit to lead.
/// Before, the winner handed over to the next unfit node, which did the
/// same: leadership moved every few hundred ms and writes failed with 503.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_balancer_unfit_the_registry_keeps_a_steady_leader() {
    // The default preset: the race that let it pass leadership on (two
    // survivors campaigning at once, the loser still in its fallback when
    // asked to take over) needs elections as quick as these.
    let mut c = Cluster::start_custom(3, &["--timers", "default"], |_| {
        vec!["--validate-cmd".into(), "false".into()]
    })
    .await;
    let first = c.leader(Duration::from_secs(20)).await;
    for n in c.nodes.values() {
        let v = n.view().await.expect("view");
        assert!(!v.vip.healthy, "node {} is fit: {v:?}", n.id);
    }
    c.node_mut(first).kill();
    let leader = c.leader(Duration::from_secs(20)).await;
    assert_ne!(leader, first);
    c.node(leader)
        .client()
        .register("http", "web1", "10.0.0.1", Some(8080), None, None)
        .await
        .expect("a write after the leader's death");
    // Then it stays put: no term change over 3 s of watching.
    let start = c.node(leader).view().await.expect("view").term;
    let until = std::time::Instant::now() + Duration::from_secs(3);
    while std::time::Instant::now() < until {
        for n in c.nodes.values().filter(|n| n.child.is_some()) {
            if let Some(v) = n.view().await {
                assert_eq!(v.leader, Some(leader), "leadership moved: {v:?}");
                assert_eq!(v.term, start, "a new term: {v:?}");
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
