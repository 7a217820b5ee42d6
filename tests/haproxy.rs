//! Rendering against a real haproxy (Debian package, master-worker mode) with
//! real backend HTTP servers on loopback.

#[path = "cluster/harness.rs"]
mod harness;

#[path = "common/haproxy.rs"]
mod common;

use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::Duration;

use clb::model::Check;
use clb::render::ApplyOutcome;
use clb::views::{AuditQuery, ServiceBody};
use common::{backend, define_svc, define_web, traffic, Balancer, Haproxy};
use harness::{eventually, ClusterExt, NodeExt};
use lab::{free_port, Cluster, Proc};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_reach_haproxy_through_the_runtime_api() {
    let b = Balancer::start(&[]).await;
    let port = free_port();
    define_web(&b.client(), port).await;
    let _haproxy = b.start_haproxy().await;
    b.applied().await;
    let (a, c) = (backend("a").await, backend("c").await);
    for be in [&a, &c] {
        b.client()
            .register("web", &be.name, "127.0.0.1", Some(be.port), None, None)
            .await
            .unwrap();
    }
    let live = b.live().await;
    assert_eq!(
        live.last_apply,
        Some(ApplyOutcome::Runtime),
        "member adds need no reload: {live:?}"
    );
    // The file follows by itself (FILE_QUIET after the burst; --file-lag-ms
    // bounds it under a stream of writes).
    let t = std::time::Instant::now();
    let status = b.applied().await;
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "the file trailed haproxy {:?}",
        t.elapsed()
    );
    let reloads = status.reloads;
    let (seen, failed) = traffic(port, 40).await;
    assert_eq!(failed, 0);
    assert!(
        seen.get("a").copied().unwrap_or(0) > 0 && seen.get("c").copied().unwrap_or(0) > 0,
        "{seen:?}"
    );
    // The file on disk says the same as the runtime change.
    let text = std::fs::read_to_string(&b.cfg).unwrap();
    assert!(
        text.contains(&format!("server a 127.0.0.1:{} weight 100", a.port)),
        "{text}"
    );

    // Unregister: no new requests reach it.
    b.client().unregister("web", "a").await.unwrap();
    b.applied().await;
    let before = a.hits.load(Ordering::SeqCst);
    let (seen, failed) = traffic(port, 30).await;
    assert_eq!((failed, seen.get("a")), (0, None), "{seen:?}");
    assert_eq!(a.hits.load(Ordering::SeqCst), before);

    // Drain: no new sessions to it either; ready brings it back.
    b.client()
        .register("web", "a", "127.0.0.1", Some(a.port), None, None)
        .await
        .unwrap();
    b.client().set_state("web", "a", "drain").await.unwrap();
    b.applied().await;
    let (seen, failed) = traffic(port, 30).await;
    assert_eq!(
        (failed, seen.get("a")),
        (0, None),
        "drained member got sessions: {seen:?}"
    );
    assert!(std::fs::read_to_string(&b.cfg)
        .unwrap()
        .contains(&format!("server a 127.0.0.1:{} weight 0", a.port)));
    b.client().set_state("web", "a", "active").await.unwrap();
    let status = b.applied().await;
    let (seen, _) = traffic(port, 40).await;
    assert!(seen.get("a").copied().unwrap_or(0) > 0, "{seen:?}");
    assert_eq!(status.reloads, reloads, "member changes never reloaded");
}

/// A member change goes live through the runtime API before the file holds
/// it. A haproxy restarted outside clbd in that window loads the stale file:
/// clbd sees another worker answer and reloads it with a current one. On
/// shutdown the file catches up, so a haproxy started later loads what ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_haproxy_restarted_while_the_file_trails_gets_a_current_config() {
    // The file never catches up by time in this test, only by the events under test.
    let mut b = Balancer::start(&["--file-lag-ms", "600000"]).await;
    let port = free_port();
    define_web(&b.client(), port).await;
    let haproxy = b.start_haproxy().await;
    b.applied().await;
    let (a, c, d) = (backend("a").await, backend("c").await, backend("d").await);
    let line = |be: &common::Backend| format!("server {} 127.0.0.1:{} ", be.name, be.port);
    b.client()
        .register("web", "a", "127.0.0.1", Some(a.port), None, None)
        .await
        .unwrap();
    let live = b.live().await;
    assert_eq!(live.last_apply, Some(ApplyOutcome::Runtime), "{live:?}");
    assert!(live.rendered_index < live.applied_index, "{live:?}");
    assert!(!std::fs::read_to_string(&b.cfg).unwrap().contains(&line(&a)));
    let (seen, _) = traffic(port, 20).await;
    assert!(seen.get("a").copied().unwrap_or(0) > 0, "{seen:?}");

    // Restarted by someone else: the new haproxy loads the file, which lacks
    // a. clbd notices another worker at its next pass (the next change, or
    // the file's catch-up) and reloads it with a current config; without
    // that, a would stay out of it for --file-lag-ms.
    let old = worker_pid(&b.admin).await.expect("haproxy answers");
    let Haproxy { child } = haproxy;
    child.terminate(Duration::from_secs(10));
    let _haproxy = Haproxy::start(&b.cfg, &b.master);
    eventually(
        Duration::from_secs(10),
        "the restarted haproxy answers",
        || async { worker_pid(&b.admin).await.filter(|p| *p != old) },
    )
    .await;
    b.client()
        .register("web", "c", "127.0.0.1", Some(c.port), None, None)
        .await
        .unwrap();
    let status = b.applied().await;
    assert!(status.reloads > live.reloads, "{status:?}");
    let text = std::fs::read_to_string(&b.cfg).unwrap();
    assert!(
        text.contains(&line(&a)) && text.contains(&line(&c)),
        "{text}"
    );
    let (seen, failed) = eventually(
        Duration::from_secs(10),
        "the restarted haproxy serves a and c",
        || async {
            let (seen, failed) = traffic(port, 40).await;
            (seen.contains_key("a") && seen.contains_key("c")).then_some((seen, failed))
        },
    )
    .await;
    assert_eq!(failed, 0, "{seen:?}");

    // A runtime-only change, then SIGTERM: the file holds it when clbd exits.
    b.client()
        .register("web", "d", "127.0.0.1", Some(d.port), None, None)
        .await
        .unwrap();
    let live = b.live().await;
    assert!(live.rendered_index < live.applied_index, "{live:?}");
    assert!(!std::fs::read_to_string(&b.cfg).unwrap().contains(&line(&d)));
    b.cluster.node_mut(1).terminate();
    let text = std::fs::read_to_string(&b.cfg).unwrap();
    assert!(text.contains(&line(&d)), "{text}");
}

/// Past 500 runtime ops a pass reloads instead: haproxy 2.6 spends time in
/// proportion to the backend's servers on each added server, a reload the
/// same for any number of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_member_change_reloads_instead_of_one_command_per_server() {
    // A long coalescing window lands the whole burst in one pass.
    let b = Balancer::start(&["--render-coalesce-ms", "8000"]).await;
    let port = free_port();
    define_web(&b.client(), port).await;
    let _haproxy = b.start_haproxy().await;
    let before = b.applied().await;
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..16u32 {
        let client = b.client();
        tasks.spawn(async move {
            for i in 0..38u32 {
                let n = w * 38 + i;
                let addr = format!("10.1.{}.{}", n / 250, n % 250 + 1);
                client
                    .register("web", &format!("m{n}"), &addr, Some(80), None, None)
                    .await
                    .unwrap();
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    let after = b.applied().await;
    assert_eq!(after.last_apply, Some(ApplyOutcome::Reload), "{after:?}");
    assert!(after.reloads > before.reloads, "{after:?}");
    let state = clb::render::haproxy::exchange(&b.admin, "show servers state be_web")
        .await
        .unwrap();
    let servers = state.lines().filter(|l| l.contains(" m")).count();
    assert_eq!(servers, 16 * 38, "{}", &state[..state.len().min(500)]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_structural_change_reloads_without_failing_a_request() {
    let b = Balancer::start(&[]).await;
    let port = free_port();
    define_web(&b.client(), port).await;
    let _haproxy = b.start_haproxy().await;
    let be = backend("a").await;
    b.client()
        .register("web", "a", "127.0.0.1", Some(be.port), None, None)
        .await
        .unwrap();
    let reloads = b.applied().await.reloads;

    // A client loop runs while three new services (structural) force reloads.
    let load = tokio::spawn(traffic(port, 400));
    for i in 0..3 {
        eventually(Duration::from_secs(5), "some traffic first", || async {
            (be.hits.load(Ordering::SeqCst) > 30 * (i + 1)).then_some(())
        })
        .await;
        define_svc(&b.client(), &format!("extra{i}")).await;
        eventually(Duration::from_secs(10), "reload done", || async {
            let r = b.render_status().await?;
            (r.reloads > reloads + i).then_some(())
        })
        .await;
    }
    let (seen, failed) = load.await.unwrap();
    assert_eq!(failed, 0, "requests failed across reloads: {seen:?}");
    assert_eq!(seen.get("a"), Some(&400));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_haproxy_rejects_never_goes_live() {
    // A custom template that emits an invalid directive for one service name.
    let tdir = tempfile::tempdir().unwrap();
    let builtin = clb::render::template::BUILTIN;
    let poisoned = builtin.replace(
        "    default_backend be_{{ svc.name }}",
        "    default_backend be_{{ svc.name }}\n{%- if svc.name == \"poison\" %}\n    no-such-directive here\n{%- endif %}",
    );
    std::fs::write(tdir.path().join("haproxy.cfg.j2"), poisoned).unwrap();
    let b = Balancer::start(&["--template-dir", tdir.path().to_str().unwrap()]).await;
    let port = free_port();
    define_web(&b.client(), port).await;
    let _haproxy = b.start_haproxy().await;
    let be = backend("a").await;
    b.client()
        .register("web", "a", "127.0.0.1", Some(be.port), None, None)
        .await
        .unwrap();
    b.applied().await;
    let good = std::fs::read_to_string(&b.cfg).unwrap();

    define_svc(&b.client(), "poison").await;
    let status = b.error_saying("rejected", Duration::from_secs(10)).await;
    assert!(status.validate_failures >= 1);
    assert_eq!(
        std::fs::read_to_string(&b.cfg).unwrap(),
        good,
        "the rejected config went live"
    );
    assert!(
        !b.cfg.with_extension("cfg.tmp").exists(),
        "a half-written file was left"
    );
    let (seen, failed) = traffic(port, 20).await;
    assert_eq!(
        (failed, seen.get("a")),
        (0, Some(&20)),
        "traffic keeps flowing"
    );
    let m = reqwest::get(format!("http://{}/metrics", b.node().addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(m.contains("clb_render_validate_failures_total 1"), "{m}");
}

/// A reload that takes longer than clbd waits for it (a config of 100k
/// servers without ids took haproxy 2.6 164 s to load) is followed until it
/// finishes, not issued again: each new reload would start the load over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_slower_than_its_wait_is_followed_not_issued_again() {
    // haproxy runs this Lua file as it loads a config: it sleeps while the
    // marker file names a number of seconds.
    let tdir = tempfile::tempdir().unwrap();
    let marker = tdir.path().join("slow");
    let lua = tdir.path().join("slow.lua");
    std::fs::write(
        &lua,
        format!(
            "local f = io.open(\"{}\", \"r\")\n\
             if f then local secs = f:read(\"*n\"); f:close(); os.execute(\"sleep \" .. secs) end\n",
            marker.display()
        ),
    )
    .unwrap();
    let template = clb::render::template::BUILTIN.replace(
        "    master-worker\n",
        &format!("    master-worker\n    lua-load {}\n", lua.display()),
    );
    std::fs::write(tdir.path().join("haproxy.cfg.j2"), template).unwrap();
    // `true`: a validating `haproxy -c` would sleep as well.
    let b = Balancer::start(&[
        "--template-dir",
        tdir.path().to_str().unwrap(),
        "--validate-cmd",
        "true",
    ])
    .await;
    let port = free_port();
    define_web(&b.client(), port).await;
    let _haproxy = b.start_haproxy().await;
    let before = b.applied().await;
    let master_before = master_reloads(&b.master).await.expect("show proc");

    let load = clb::render::haproxy::RELOAD_WAIT + Duration::from_secs(3);
    std::fs::write(&marker, load.as_secs().to_string()).unwrap();
    // A new service: a reload.
    define_svc(&b.client(), "extra").await;
    b.error_saying(
        "still loading",
        clb::render::haproxy::RELOAD_WAIT + Duration::from_secs(5),
    )
    .await;
    let after = eventually(
        Duration::from_secs(30),
        "the slow reload to be seen finished",
        || async {
            let r = b.render_status().await?;
            (r.last_error.is_none() && r.reloads > before.reloads).then_some(r)
        },
    )
    .await;
    std::fs::remove_file(&marker).unwrap();
    assert_eq!(after.last_apply, Some(ApplyOutcome::Reload), "{after:?}");
    assert_eq!(after.reloads, before.reloads + 1, "{after:?}");
    assert_eq!(
        master_reloads(&b.master).await,
        Some(master_before + 1),
        "haproxy was reloaded more than once for one change"
    );
    let state = clb::render::haproxy::exchange(&b.admin, "show servers state be_extra").await;
    assert!(
        state.is_ok(),
        "the new worker serves the new service: {state:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_haproxy_the_file_is_still_written_and_applied_later() {
    let b = Balancer::start(&[]).await;
    let port = free_port();
    define_web(&b.client(), port).await;
    b.client()
        .register("web", "late", "127.0.0.1", Some(free_port()), None, None)
        .await
        .unwrap();
    let cfg = b.cfg.clone();
    eventually(Duration::from_secs(10), "member in the file", || async {
        std::fs::read_to_string(&cfg)
            .ok()?
            .contains("server late ")
            .then_some(())
    })
    .await;
    let status = eventually(Duration::from_secs(10), "apply error reported", || async {
        let r = b.render_status().await?;
        r.last_error
            .as_deref()
            .is_some_and(|e| e.starts_with("apply"))
            .then_some(r)
    })
    .await;
    assert_eq!(status.last_apply, Some(ApplyOutcome::Failed));
    let _haproxy = Haproxy::start(&b.cfg, &b.master);
    let status = b.applied().await;
    assert_eq!(status.last_apply, Some(ApplyOutcome::Reload), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_template_syntax_error_stops_start_up_naming_file_and_line() {
    let tdir = tempfile::tempdir().unwrap();
    std::fs::write(
        tdir.path().join("haproxy.cfg.j2"),
        "global\n{% for x in %}\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_clbd"))
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--peer-listen", "127.0.0.1:0"])
        .args(["--data-dir", tdir.path().join("d").to_str().unwrap()])
        .args(["--template-dir", tdir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or("");
    assert!(last.contains("haproxy.cfg.j2 line 2"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_render_byte_identical_configs() {
    let c = Cluster::start(3).await;
    c.leader(Duration::from_secs(10)).await;
    let client = c.any_client();
    client
        .define_service(
            "web",
            &ServiceBody {
                port: free_port().into(),
                check: Some(Check::Http {
                    path: "/health".into(),
                }),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    for i in 0..20 {
        client
            .register(
                "web",
                &format!("m{i:02}"),
                &format!("10.0.{}.{}", i / 10, i % 250 + 1),
                Some(8080),
                Some(i as u16),
                None,
            )
            .await
            .unwrap();
    }
    client.set_state("web", "m03", "drain").await.unwrap();
    let index = client.set_state("web", "m04", "maint").await.unwrap();
    c.converged(index, Duration::from_secs(10)).await;
    let files: Vec<String> = eventually(
        Duration::from_secs(10),
        "every node rendered the last index",
        || async {
            let mut out = Vec::new();
            for n in c.nodes.values() {
                let v = n.client().cluster().await.ok()?;
                let r = v.node(n.id)?.render.as_ref()?;
                if r.rendered_index < index {
                    return None;
                }
                out.push(
                    std::fs::read_to_string(c.dir.path().join(format!("haproxy{}.cfg", n.id)))
                        .ok()?,
                );
            }
            Some(out)
        },
    )
    .await;
    assert!(
        files[0].contains(
            "server m04 10.0.0.5:8080 weight 4 check inter 2000ms fall 3 rise 2 disabled"
        ),
        "{}",
        files[0]
    );
    assert_eq!(files[0], files[1]);
    assert_eq!(files[1], files[2]);
    // One node's /v1/cluster shows every node's render state; so does `clb status`.
    let v = c.node(1).client().cluster().await.unwrap();
    for id in [1, 2, 3] {
        let r = v.node(id).and_then(|n| n.render.as_ref());
        assert!(
            r.is_some_and(|r| r.rendered_index >= index),
            "node {id}: {r:?}"
        );
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_clb"))
        .args([
            "--server",
            &c.node(3).addr,
            "--token",
            harness::TOKEN,
            "status",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("HAPROXY"), "{text}");
    assert_eq!(
        text.lines().filter(|l| l.contains(" balancer ")).count(),
        3,
        "{text}"
    );
    // The dry run prints the same text.
    assert_eq!(c.node(2).client().render().await.unwrap(), files[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_balancer_whose_haproxy_is_down_does_not_lead() {
    // Node 1's haproxy sockets lead nowhere: every apply fails.
    let dead = tempfile::tempdir().unwrap();
    let master = dead.path().join("master.sock").display().to_string();
    let admin = dead.path().join("admin.sock").display().to_string();
    let timers = lab::FAST_TIMERS;
    let c = Cluster::start_custom(3, &timers, |id| {
        let mut args = vec!["--stats-port".to_string(), "0".into()];
        if id == 1 {
            args.extend([
                "--haproxy-master-socket".into(),
                master.clone(),
                "--haproxy-socket".into(),
                admin.clone(),
            ]);
        }
        args
    })
    .await;
    let n1 = c.node(1);
    let v = eventually(
        Duration::from_secs(10),
        "node 1 reports itself unhealthy",
        || async {
            // First "has not taken a configuration yet", then the apply error.
            let v = n1.client().cluster().await.ok()?;
            (!v.vip.healthy && v.vip.health_reason.contains("apply")).then_some(v)
        },
    )
    .await;
    assert!(v.vip.health_reason.contains("apply"), "{v:?}");
    // Whoever led at formation, a healthy balancer leads now.
    let leader = eventually(Duration::from_secs(10), "a healthy leader", || async {
        let l = c.leader(Duration::from_secs(5)).await;
        (l != 1).then_some(l)
    })
    .await;
    assert_ne!(leader, 1);
    // Writes work, and node 1 still renders its file.
    let index = c
        .any_client()
        .register("http", "w", "10.0.0.1", None, None, None)
        .await
        .unwrap();
    let cfg = c.dir.path().join("haproxy1.cfg");
    eventually(Duration::from_secs(10), "node 1 renders", || async {
        std::fs::read_to_string(&cfg)
            .ok()?
            .contains("server w ")
            .then_some(())
    })
    .await;
    assert!(index > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_stopped_with_sigterm_drains_before_unregistering() {
    let b = Balancer::start(&[]).await;
    let port = free_port();
    define_web(&b.client(), port).await;
    let _haproxy = b.start_haproxy().await;
    let (stay, leaving) = (backend("stay").await, backend("leaving").await);
    b.client()
        .register("web", "stay", "127.0.0.1", Some(stay.port), None, None)
        .await
        .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_clb"));
    cmd.args(["agent", "web", "leaving", "--address", "127.0.0.1"])
        .args([
            "--port",
            &leaving.port.to_string(),
            "--ttl",
            "30",
            "--drain-timeout",
            "2",
        ])
        .env("CLB_SERVER", &b.node().addr)
        .env("CLB_TOKEN", harness::TOKEN)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut agent = Proc::build(&mut cmd).spawn().unwrap();
    eventually(
        Duration::from_secs(10),
        "the agent's member takes traffic",
        || async {
            b.applied().await;
            (leaving.hits.load(Ordering::SeqCst) > 0
                || traffic(port, 10).await.0.contains_key("leaving"))
            .then_some(())
        },
    )
    .await;
    let load = tokio::spawn(traffic(port, 300));
    eventually(Duration::from_secs(10), "traffic under way", || async {
        (stay.hits.load(Ordering::SeqCst) > 40).then_some(())
    })
    .await;
    agent.signal(libc::SIGTERM);
    let status = agent.wait().unwrap();
    assert!(
        status.success(),
        "the agent drained and unregistered: {status:?}"
    );
    let (seen, failed) = load.await.unwrap();
    assert_eq!(failed, 0, "requests failed while the member left: {seen:?}");
    let v = b.client().service("web", false).await.unwrap();
    assert!(!v.definition.members.contains_key("leaving"));
    let audit = b
        .client()
        .audit(&AuditQuery {
            service: Some("web".into()),
            ..Default::default()
        })
        .await
        .unwrap();
    let actions: Vec<&str> = audit.entries.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(
        &actions[..2],
        ["unregister", "set-state"],
        "drain came before unregister: {actions:?}"
    );
}

/// The pid of the worker answering the admin socket.
async fn worker_pid(socket: &std::path::Path) -> Option<u32> {
    let text = clb::render::haproxy::exchange(socket, "show info")
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("Pid:")?.trim().parse().ok())
}

/// How many reloads haproxy's master counts, per its `show proc`.
async fn master_reloads(socket: &std::path::Path) -> Option<u64> {
    master_column(socket, 2).await?.parse().ok()
}

/// The master's pid per its own `show proc`.
async fn master_pid(socket: &std::path::Path) -> Option<i32> {
    master_column(socket, 0).await?.parse().ok()
}

/// Column `n` of the master's line of `show proc` (pid, type, reloads, ...).
async fn master_column(socket: &std::path::Path, n: usize) -> Option<String> {
    let text = clb::render::haproxy::exchange(socket, "show proc")
        .await
        .ok()?;
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let cols: Vec<&str> = l.split_whitespace().collect();
        (cols.get(1) == Some(&"master")).then(|| cols.get(n).map(|c| c.to_string()))?
    })
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

/// `--haproxy supervise`: clbd alone gives a balancer that forwards traffic
/// (the README's first command), starts haproxy again when it dies, and
/// stops it when clbd stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn supervised_haproxy_forwards_restarts_and_stops_with_clbd() {
    let mut c = Cluster::start_with(
        1,
        &[
            "--haproxy",
            "supervise",
            "--stats-port",
            "0",
            "--guardrail-share",
            "1",
        ],
    )
    .await;
    let master = c.node(1).data_dir.join("haproxy-master.sock");
    let port = free_port();
    define_web(&c.node(1).client(), port).await;
    let be = backend("a").await;
    c.node(1)
        .client()
        .register("web", "a", "127.0.0.1", Some(be.port), None, None)
        .await
        .unwrap();
    let through = || async {
        let (seen, failed) = traffic(port, 5).await;
        (failed == 0 && seen.get("a") == Some(&5)).then_some(())
    };
    eventually(
        Duration::from_secs(20),
        "traffic through the supervised haproxy",
        through,
    )
    .await;
    let first = eventually(Duration::from_secs(5), "the master's pid", || {
        master_pid(&master)
    })
    .await;

    // haproxy dies: clbd starts it again, and it serves the registry.
    unsafe { libc::kill(first, libc::SIGKILL) };
    let second = eventually(Duration::from_secs(20), "a new haproxy master", || async {
        master_pid(&master).await.filter(|p| *p != first)
    })
    .await;
    eventually(
        Duration::from_secs(20),
        "traffic after the restart",
        through,
    )
    .await;
    assert!(
        c.node(1)
            .log_text()
            .contains("haproxy exited; starting it again"),
        "the restart is logged"
    );

    // clbd stops: so does its haproxy, and nothing listens on the port.
    let status = c.node_mut(1).terminate();
    assert!(status.success(), "clbd stopped cleanly: {status:?}");
    eventually(
        Duration::from_secs(10),
        "haproxy gone with clbd",
        || async { (!alive(second)).then_some(()) },
    )
    .await;
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
        "nothing listens on the service port once clbd stopped"
    );
}

#[test]
fn supervise_refuses_what_cannot_work() {
    let clbd = env!("CARGO_BIN_EXE_clbd");
    for (args, want) in [
        (
            &["--haproxy", "sometimes"][..],
            "--haproxy: \"sometimes\" is not external, supervise or auto",
        ),
        (
            &["--haproxy", "supervise", "--role", "witness"][..],
            "--haproxy: a witness runs no haproxy",
        ),
        (
            &["--haproxy", "supervise", "--reload-cmd", "true"][..],
            "--reload-cmd: clbd reloads",
        ),
    ] {
        let out = Command::new(clbd)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}
