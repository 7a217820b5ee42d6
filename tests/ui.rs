//! `GET /ui` against a live 3-node cluster: auth answers over plain HTTP, and
//! the real page in Debian's headless Chromium (DOM dump and a screenshot),
//! with each balancer's own haproxy and a `clb failover` on its timeline.
//! Skipped, with a message, only when /usr/bin/chromium is missing
//! (scripts/test.sh installs it).

#[path = "common/haproxy.rs"]
mod haproxy;
#[path = "cluster/harness.rs"]
mod harness;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clb::model::{Balance, Mode};
use clb::views::{FailoverView, ServiceBody, TokenBody};
use harness::{eventually, ClusterExt, NodeExt, TOKEN};
use lab::{free_port, Cluster};
use reqwest::redirect::Policy;

const CHROMIUM: &str = "/usr/bin/chromium";

/// A cluster of two balancers (holding a VIP through a no-op hook, each
/// running its own haproxy) and a witness, with two services whose members
/// are in every state. In `api`, `live` answers on a real port and `dead`
/// points at a closed one; haproxy checks both.
async fn cluster_with_members() -> (Cluster, haproxy::Backend) {
    let c = Cluster::start_custom(3, &lab::FAST_TIMERS, |id| {
        if id == 3 {
            vec!["--role".into(), "witness".into()]
        } else {
            // Each haproxy on its own loopback address, so the two can
            // listen on the same service ports.
            let bind = format!("127.0.0.{}", 100 + id);
            [
                "--vip",
                "127.0.0.77",
                "--vip-hook",
                "true",
                "--haproxy",
                "supervise",
                "--bind-address",
                &bind,
                "--stats-port",
                "0",
            ]
            .map(String::from)
            .to_vec()
        }
    })
    .await;
    c.leader(Duration::from_secs(20)).await;
    let client = c.any_client();
    for (svc, body) in [
        (
            "http",
            ServiceBody {
                port: free_port().into(),
                mode: Some(Mode::Http),
                ..Default::default()
            },
        ),
        (
            "api",
            ServiceBody {
                port: free_port().into(),
                balance: Some(Balance::Leastconn),
                ..Default::default()
            },
        ),
    ] {
        client
            .define_service(svc, &body)
            .await
            .unwrap_or_else(|e| panic!("define {svc}: {e}"));
    }
    let live = haproxy::backend("live").await;
    // A port nothing listens on: bound, then let go.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    for (svc, m, addr, port) in [
        ("http", "web1", "10.0.0.1", 8080),
        ("http", "web2", "10.0.0.2", 8080),
        ("http", "web3", "10.0.0.3", 8080),
        ("http", "web4", "10.0.0.4", 8080),
        ("http", "web5", "10.0.0.5", 8080),
        ("api", "api1", "10.0.1.1", 8080),
        ("api", "api2", "10.0.1.2", 8080),
        ("api", "api3", "10.0.1.3", 8080),
        ("api", "live", "127.0.0.1", live.port),
        ("api", "dead", "127.0.0.1", closed),
    ] {
        client
            .register(svc, m, addr, Some(port), None, None)
            .await
            .unwrap_or_else(|e| panic!("register {svc}/{m}: {e}"));
    }
    let mut last = 0;
    for (svc, m, st) in [
        ("http", "web2", "drain"),
        ("http", "web3", "maint"),
        ("api", "api2", "drain"),
    ] {
        last = client
            .set_state(svc, m, st)
            .await
            .unwrap_or_else(|e| panic!("{st} {svc}/{m}: {e}"));
    }
    c.converged(last, Duration::from_secs(10)).await;
    (c, live)
}

/// The status page as served to a script (bearer token).
async fn page_text(ui: &str) -> Option<String> {
    let r = http().get(ui).bearer_auth(TOKEN).send().await.ok()?;
    if r.status() != 200 {
        return None;
    }
    r.text().await.ok()
}

/// The VIP holder node 1 reports, once there is one.
async fn vip_holder(c: &Cluster) -> u64 {
    eventually(Duration::from_secs(15), "a VIP holder", || async {
        c.node(1).view().await?.vip_holder
    })
    .await
}

fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .expect("client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ui_needs_a_read_token_by_header_or_sign_in_cookie() {
    let c = Cluster::start(1).await;
    c.leader(Duration::from_secs(10)).await;
    let addr = c.node(1).addr.clone();
    let url = format!("http://{addr}/ui");
    let http = http();

    // No credentials: the sign-in form, 401, no data.
    let r = http.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let body = r.text().await.unwrap();
    assert!(
        body.contains("<form method=\"post\" action=\"/ui\""),
        "{body}"
    );
    assert!(!body.contains("id=\"nodes\""));

    // Bearer header: the page, without the token in it.
    let r = http.get(&url).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    // Browsers must not guess another type for it.
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    let body = r.text().await.unwrap();
    assert!(body.contains("id=\"node-1\""), "{body}");
    assert!(!body.contains(TOKEN));

    // Wrong token in the form: 401 and no cookie.
    let r = http
        .post(&url)
        .form(&[("token", "wrong")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().get("set-cookie").is_none());

    // A register-only token is refused (403): the page needs read scope.
    let created = c
        .node(1)
        .client()
        .create_token(&TokenBody {
            scope: "register:http".into(),
            ..Default::default()
        })
        .await
        .expect("create token");
    let register_only = created.secret;
    let r = http
        .post(&url)
        .form(&[("token", register_only.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // The right token: 303 to /ui with an HttpOnly cookie that opens the page.
    let r = http
        .post(&url)
        .form(&[("token", TOKEN)])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/ui");
    let cookie = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"));
    let pair = cookie.split(';').next().unwrap().to_string();
    let r = http.get(&url).header("cookie", &pair).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(!r.text().await.unwrap().contains(TOKEN));

    // A forged cookie is refused and cleared.
    let r = http
        .get(&url)
        .header("cookie", "clb_ui=forged")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers()["set-cookie"]
        .to_str()
        .unwrap()
        .contains("Max-Age=0"));
}

/// Serves one page on 127.0.0.1 that posts the sign-in form to `ui` (a test
/// fixture: the status page itself has no script). Returns its URL.
async fn sign_in_fixture(ui: &str) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let page = format!(
        "<!DOCTYPE html><html><body><form id=\"f\" method=\"post\" action=\"{ui}\">\
         <input name=\"token\" value=\"{TOKEN}\"></form>\
         <script>document.getElementById('f').submit()</script></body></html>"
    );
    let app = axum::Router::new().route(
        "/",
        axum::routing::get(move || {
            let page = page.clone();
            async move { axum::response::Html(page) }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://127.0.0.1:{port}/")
}

/// Runs headless Chromium on `url` with `extra` arguments (its own profile
/// in `profile`), bounded in time; returns stdout.
async fn chromium(profile: &Path, extra: &[String], url: &str) -> String {
    let mut cmd = tokio::process::Command::new(CHROMIUM);
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        // Lets the sign-in redirect finish; below the page's 5 s refresh.
        "--virtual-time-budget=3000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .args(extra)
    .arg(url)
    .stdin(std::process::Stdio::null())
    .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(90), cmd.output())
        .await
        .expect("chromium finished within 90 s")
        .expect("run chromium");
    assert!(
        out.status.success(),
        "chromium failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Width and height from a PNG's IHDR chunk.
fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    assert_eq!(&bytes[12..16], b"IHDR", "IHDR first");
    let be = |i: usize| u32::from_be_bytes(bytes[i..i + 4].try_into().unwrap());
    (be(16), be(20))
}

/// Distinct pixel values of a decoded PNG (any colour type).
fn distinct_colours(bytes: &[u8]) -> usize {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().expect("png header");
    let mut buf = vec![0; reader.output_buffer_size().expect("buffer size")];
    let info = reader.next_frame(&mut buf).expect("png frame");
    let px = info.color_type.samples() * info.bit_depth as usize / 8;
    let px = px.max(1);
    buf[..info.buffer_size()]
        .chunks(px)
        .map(|c| c.to_vec())
        .collect::<HashSet<_>>()
        .len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_page_shows_the_live_cluster_in_headless_chromium() {
    if !Path::new(CHROMIUM).exists() {
        eprintln!(
            "SKIPPED status_page_shows_the_live_cluster_in_headless_chromium: {CHROMIUM} \
             is missing (apt-get install chromium; scripts/test.sh does it)"
        );
        return;
    }
    let (c, _live) = cluster_with_members().await;
    let holder = vip_holder(&c).await;
    let ui = format!("http://{}/ui", c.node(1).addr);
    let start = sign_in_fixture(&ui).await;
    let profile = tempfile::tempdir().unwrap();
    let balancers = [1u64, 2];
    let cell = |svc: &str, m: &str, n: u64, status: &str| {
        format!("id=\"hap-{svc}-{m}-{n}\" data-status=\"{status}\"")
    };

    // haproxy's checks take their own time (fall 3, 2 s apart): wait until
    // the page, as served, shows both balancers' verdicts.
    eventually(
        Duration::from_secs(45),
        "both haproxys' checks on the page",
        || async {
            let page = page_text(&ui).await?;
            balancers
                .iter()
                .all(|&n| {
                    page.contains(&cell("api", "live", n, "UP"))
                        && page.contains(&cell("api", "dead", n, "DOWN"))
                })
                .then_some(())
        },
    )
    .await;

    let dom = chromium(profile.path(), &["--dump-dom".into()], &start).await;
    assert!(dom.contains("id=\"nodes\""), "not the status page:\n{dom}");
    assert!(!dom.contains(TOKEN), "the token leaked into the page");
    for n in c.nodes.values() {
        assert!(
            dom.contains(&format!("id=\"node-{}\"", n.id)),
            "node {}",
            n.id
        );
        assert!(dom.contains(&n.peer_addr), "address of node {}", n.id);
    }
    assert!(dom.contains("witness"), "node 3's role");
    assert!(
        dom.contains(&format!("id=\"vip-holder\">node {holder}<")),
        "VIP holder node {holder}:\n{dom}"
    );
    assert!(dom.contains("127.0.0.77"), "the VIP");
    for (svc, m, st) in [
        ("http", "web1", "active"),
        ("http", "web2", "drain"),
        ("http", "web3", "maint"),
        ("http", "web4", "active"),
        ("http", "web5", "active"),
        ("api", "api1", "active"),
        ("api", "api2", "drain"),
        ("api", "api3", "active"),
        ("api", "live", "active"),
        ("api", "dead", "active"),
    ] {
        let row = format!("id=\"member-{svc}-{m}\" data-state=\"{st}\"");
        assert!(dom.contains(&row), "{svc}/{m} {st}:\n{dom}");
    }
    // haproxy's own view on each balancer: the live member UP, the one on a
    // closed port DOWN and marked as contradicting the registry (active);
    // registry maint is haproxy's MAINT; the witness has no haproxy.
    for n in balancers {
        assert!(
            dom.contains(&cell("api", "live", n, "UP")),
            "live on {n}:\n{dom}"
        );
        let dead = format!("{} class=\"disagree\"", cell("api", "dead", n, "DOWN"));
        assert!(dom.contains(&dead), "dead on {n}:\n{dom}");
        assert!(
            dom.contains(&cell("http", "web3", n, "MAINT")),
            "web3 on {n}"
        );
    }
    assert!(!dom.contains("id=\"hap-api-live-3\""), "a witness column");
    assert!(dom.contains("none (witness)"), "node 3's haproxy:\n{dom}");
    // The timeline has the holder's claim.
    let claim = |n: u64| format!("data-kind=\"vip_claim\" data-node=\"{n}\" data-ok=\"true\"");
    assert!(dom.contains(&claim(holder)), "claim by {holder}:\n{dom}");

    // A planned failover: the timeline shows the new leader with its term,
    // the old holder's release and the new holder's claim.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_clb"))
        .args([
            "--server",
            &c.node(3).addr,
            "--token",
            TOKEN,
            "--json",
            "failover",
        ])
        .output()
        .expect("run clb failover");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "clb failover: {said}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let moved: FailoverView = serde_json::from_str(&said).expect("clb --json failover");
    let (new_leader, new_term) = (moved.new_leader, moved.new_term);
    assert_ne!(new_leader, holder);
    let elected =
        format!("data-kind=\"leader\" data-leader=\"{new_leader}\" data-term=\"{new_term}\"");
    // Of the hold that ended (every balancer also releases once at start-up).
    let old_term = moved.term;
    // The new holder's claim is for the new term.
    let claimed = format!("{} data-term=\"{new_term}\"", claim(new_leader));
    let released = format!(
        "data-kind=\"vip_release\" data-node=\"{holder}\" data-ok=\"true\" data-term=\"{old_term}\""
    );
    eventually(
        Duration::from_secs(20),
        "the failover on the page's timeline",
        || async {
            let page = page_text(&ui).await?;
            (page.contains(&elected) && page.contains(&released) && page.contains(&claimed))
                .then_some(())
        },
    )
    .await;
    let dom = chromium(profile.path(), &["--dump-dom".into()], &start).await;
    for want in [&elected, &released, &claimed, &claim(holder)] {
        assert!(dom.contains(want.as_str()), "{want}:\n{dom}");
    }
    assert!(
        dom.contains(&format!("id=\"tl-node-{new_leader}\"")) && dom.contains("class=\"tl-vip\""),
        "the strip draws VIP holds:\n{dom}"
    );

    let shot: PathBuf = profile.path().join("ui.png");
    chromium(
        profile.path(),
        &[
            format!("--screenshot={}", shot.display()),
            "--window-size=1280,1000".into(),
        ],
        &start,
    )
    .await;
    let bytes = std::fs::read(&shot).expect("screenshot written");
    let (w, h) = png_size(&bytes);
    assert!(
        (1000..=4000).contains(&w) && (700..=4000).contains(&h),
        "{w}x{h}"
    );
    let colours = distinct_colours(&bytes);
    assert!(colours > 16, "a near-blank screenshot: {colours} colours");
    if let Ok(dir) = std::env::var("CLB_UI_SCREENSHOT_DIR") {
        let _ = std::fs::copy(&shot, Path::new(&dir).join("ui.png"));
    }
    c.node(1).view().await.expect("cluster still answers");
}
