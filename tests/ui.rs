//! `GET /ui` against a live 3-node cluster: auth answers over plain HTTP, and
//! the real page in Debian's headless Chromium (DOM dump and a screenshot).
//! Skipped, with a message, only when /usr/bin/chromium is missing
//! (scripts/test.sh installs it).

#[path = "cluster/harness.rs"]
mod harness;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use harness::{eventually, Cluster, TOKEN};
use reqwest::redirect::Policy;
use serde_json::{json, Value};

const CHROMIUM: &str = "/usr/bin/chromium";

/// A cluster of two balancers (holding a VIP through a no-op hook) and a
/// witness, with two services whose members are in every state.
async fn cluster_with_members() -> Cluster {
    let c = Cluster::start_custom(3, &harness::FAST_TIMERS, |id| {
        if id == 3 {
            vec!["--role".into(), "witness".into()]
        } else {
            ["--vip", "127.0.0.77", "--vip-hook", "true"]
                .map(String::from)
                .to_vec()
        }
    })
    .await;
    c.leader(Duration::from_secs(20)).await;
    let client = c.any_client();
    client
        .define_service("api", json!({"port": 18081, "balance": "leastconn"}))
        .await
        .expect("define api");
    for (svc, m, addr) in [
        ("http", "web1", "10.0.0.1"),
        ("http", "web2", "10.0.0.2"),
        ("http", "web3", "10.0.0.3"),
        ("http", "web4", "10.0.0.4"),
        ("http", "web5", "10.0.0.5"),
        ("api", "api1", "10.0.1.1"),
        ("api", "api2", "10.0.1.2"),
        ("api", "api3", "10.0.1.3"),
    ] {
        client
            .register(svc, m, addr, Some(8080), None, None)
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
    c
}

/// The VIP holder node 1 reports, once there is one.
async fn vip_holder(c: &Cluster) -> u64 {
    eventually(Duration::from_secs(15), "a VIP holder", || async {
        c.node(1).view().await?["vip_holder"].as_u64()
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
        .request(
            reqwest::Method::POST,
            "/v1/tokens",
            Some(json!({"scope": "register:http"})),
        )
        .await
        .expect("create token");
    let register_only = created["secret"].as_str().unwrap().to_string();
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
    let c = cluster_with_members().await;
    let holder = vip_holder(&c).await;
    let ui = format!("http://{}/ui", c.node(1).addr);
    let start = sign_in_fixture(&ui).await;
    let profile = tempfile::tempdir().unwrap();

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
    ] {
        let row = format!("id=\"member-{svc}-{m}\" data-state=\"{st}\"");
        assert!(dom.contains(&row), "{svc}/{m} {st}:\n{dom}");
    }

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
    let _: Value = c.node(1).view().await.expect("cluster still answers");
}
