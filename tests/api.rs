//! One `clbd` process: the API's answers to bad input, auth, and the CLI's
//! exit codes. Every refusal must leave the registry and the log untouched.

#[path = "cluster/harness.rs"]
mod harness;

use std::process::Command;
use std::time::Duration;

use clb::model::{Balance, MemberState};
use clb::views::{
    ClusterView, ErrorBody, ErrorDetail, Healthz, OneServiceView, ServiceView, ServicesView,
    Written,
};
use harness::{eventually, ClusterExt, NodeExt, TOKEN};
use lab::{free_port, Cluster, Proc};
use reqwest::Method;
use serde::de::DeserializeOwned;
use std::collections::BTreeMap;

/// One request as sent, bytes and all; the status and the body's text.
async fn raw(
    addr: &str,
    method: Method,
    path: &str,
    token: Option<&str>,
    body: Option<Vec<u8>>,
) -> (u16, String) {
    let mut req = reqwest::Client::new().request(method, format!("http://{addr}{path}"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b);
    }
    let resp = req.send().await.expect("send");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    (status, text)
}

/// An answer read as the view `T`.
fn parse<T: DeserializeOwned>(text: &str) -> T {
    serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("not a {}: {e}: {text:?}", std::any::type_name::<T>()))
}

/// method, path, token, body, expected status, a word the error must contain.
type Case<'a> = (
    Method,
    String,
    Option<&'a str>,
    Option<Vec<u8>>,
    u16,
    &'a str,
);

/// The applied index and the whole registry: what "nothing changed" compares.
async fn snapshot(addr: &str) -> (u64, BTreeMap<String, ServiceView>) {
    let (_, cluster) = raw(addr, Method::GET, "/v1/cluster", Some(TOKEN), None).await;
    let (_, services) = raw(addr, Method::GET, "/v1/services", Some(TOKEN), None).await;
    let cluster: ClusterView = parse(&cluster);
    let services: ServicesView = parse(&services);
    (
        cluster.last_log_index.expect("last_log_index"),
        services.services,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_is_refused_with_json_naming_the_field_and_changes_nothing() {
    let c = Cluster::start(1).await;
    c.leader(Duration::from_secs(10)).await;
    let addr = c.node(1).addr.clone();
    c.node(1)
        .client()
        .register("http", "web1", "10.0.0.1", Some(8080), None, None)
        .await
        .expect("seed member");
    let before = snapshot(&addr).await;

    let long = "a".repeat(64);
    let big = format!("{{\"address\":\"{}\"}}", "a".repeat(70 * 1024));
    let put = Method::PUT;
    let cases: Vec<Case> = vec![
        // names
        (
            put.clone(),
            "/v1/services/http/members/a%20b".into(),
            Some(TOKEN),
            Some(br#"{"address":"10.0.0.2"}"#.to_vec()),
            400,
            "member",
        ),
        (
            put.clone(),
            "/v1/services/http/members/a%0Aserver%20x".into(),
            Some(TOKEN),
            Some(br#"{"address":"10.0.0.2"}"#.to_vec()),
            400,
            "member",
        ),
        (
            put.clone(),
            "/v1/services/http/members/a%23b".into(),
            Some(TOKEN),
            Some(br#"{"address":"10.0.0.2"}"#.to_vec()),
            400,
            "member",
        ),
        (
            put.clone(),
            "/v1/services/http/members/-x".into(),
            Some(TOKEN),
            Some(br#"{"address":"10.0.0.2"}"#.to_vec()),
            400,
            "member",
        ),
        (
            put.clone(),
            format!("/v1/services/http/members/{long}"),
            Some(TOKEN),
            Some(br#"{"address":"10.0.0.2"}"#.to_vec()),
            400,
            "member",
        ),
        (
            put.clone(),
            "/v1/services/ht%22tp/members/a".into(),
            Some(TOKEN),
            Some(br#"{"address":"10.0.0.2"}"#.to_vec()),
            400,
            "service",
        ),
        // values
        (
            put.clone(),
            "/v1/services/http/members/a".into(),
            Some(TOKEN),
            Some(br#"{"address":"10.0.0.2 backup"}"#.to_vec()),
            400,
            "address",
        ),
        (
            put.clone(),
            "/v1/services/http/members/a".into(),
            Some(TOKEN),
            Some(b"{\"address\":\"10.0.0.2\\nserver evil 6.6.6.6:80\"}".to_vec()),
            400,
            "address",
        ),
        (
            put.clone(),
            "/v1/services/http/members/a".into(),
            Some(TOKEN),
            Some(br#"{"address":"10.0.0.2#"}"#.to_vec()),
            400,
            "address",
        ),
        (
            put.clone(),
            "/v1/services/http/members/a".into(),
            Some(TOKEN),
            Some(br#"{"address":"10.0.0.2","port":0}"#.to_vec()),
            400,
            "port",
        ),
        (
            put.clone(),
            "/v1/services/http/members/a".into(),
            Some(TOKEN),
            Some(br#"{"address":"10.0.0.2","port":70000}"#.to_vec()),
            400,
            "port",
        ),
        (
            put.clone(),
            "/v1/services/http/members/a".into(),
            Some(TOKEN),
            Some(br#"{"address":"10.0.0.2","weight":257}"#.to_vec()),
            400,
            "weight",
        ),
        (
            put.clone(),
            "/v1/services/http/members/a".into(),
            Some(TOKEN),
            Some(br#"{"address":"10.0.0.2","port":-1}"#.to_vec()),
            400,
            "port",
        ),
        (
            put.clone(),
            "/v1/services/http/members/a".into(),
            Some(TOKEN),
            Some(br#"{"address":"10.0.0.2","wieght":5}"#.to_vec()),
            400,
            "wieght",
        ),
        (
            put.clone(),
            "/v1/services/http/members/a".into(),
            Some(TOKEN),
            Some(br#"{"port":80}"#.to_vec()),
            400,
            "address",
        ),
        (
            put.clone(),
            "/v1/services/http/members/a".into(),
            Some(TOKEN),
            Some(br#"{"address":"#.to_vec()),
            400,
            "JSON",
        ),
        (
            put.clone(),
            "/v1/services/http/members/a".into(),
            Some(TOKEN),
            Some(big.into_bytes()),
            413,
            "larger",
        ),
        (
            put.clone(),
            "/v1/services/http/members/web1/state".into(),
            Some(TOKEN),
            Some(br#"{"state":"bogus"}"#.to_vec()),
            400,
            "state",
        ),
        (
            put.clone(),
            "/v1/services/web".into(),
            Some(TOKEN),
            Some(br#"{"port":80}"#.to_vec()),
            409,
            "already used",
        ),
        (
            put.clone(),
            "/v1/services/web".into(),
            Some(TOKEN),
            Some(br#"{"port":81,"check":{"http":{"path":"/a b"}}}"#.to_vec()),
            400,
            "check.path",
        ),
        (
            put.clone(),
            "/v1/services/custom/members/a".into(),
            Some(TOKEN),
            Some(br#"{"address":"10.0.0.2"}"#.to_vec()),
            404,
            "define it first",
        ),
        // node addresses
        (
            Method::POST,
            "/v1/cluster/nodes".into(),
            Some(TOKEN),
            Some(br#"{"id":5,"addr":"a b:80"}"#.to_vec()),
            400,
            "addr",
        ),
        (
            Method::POST,
            "/v1/cluster/nodes".into(),
            Some(TOKEN),
            Some(br#"{"id":5,"addr":"127.0.0.1"}"#.to_vec()),
            400,
            "addr",
        ),
        // auth
        (
            put.clone(),
            "/v1/services/http/members/a".into(),
            None,
            Some(br#"{"address":"10.0.0.2"}"#.to_vec()),
            401,
            "token",
        ),
        (
            put.clone(),
            "/v1/services/http/members/a".into(),
            Some("wrong"),
            Some(br#"{"address":"10.0.0.2"}"#.to_vec()),
            401,
            "token",
        ),
        (
            Method::GET,
            "/v1/services".into(),
            Some("wrong"),
            None,
            401,
            "token",
        ),
        // absent things
        (
            Method::DELETE,
            "/v1/services/http/members/nobody".into(),
            Some(TOKEN),
            None,
            404,
            "nobody",
        ),
        (
            Method::DELETE,
            "/v1/services/nosvc/members/web1".into(),
            Some(TOKEN),
            None,
            404,
            "nosvc",
        ),
        (
            put.clone(),
            "/v1/services/http/members/nobody/state".into(),
            Some(TOKEN),
            Some(br#"{"state":"drain"}"#.to_vec()),
            404,
            "nobody",
        ),
        (
            Method::GET,
            "/v1/services/nosvc".into(),
            Some(TOKEN),
            None,
            404,
            "nosvc",
        ),
    ];
    for (method, path, token, body, want, needle) in cases {
        let (status, text) = raw(&addr, method.clone(), &path, token, body).await;
        assert_eq!(status, want, "{method} {path}: {text}");
        let _: ErrorBody = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{method} {path}: no error field in {text}: {e}"));
        assert!(
            text.contains(needle),
            "{method} {path}: {text} should mention {needle:?}"
        );
    }
    assert_eq!(
        snapshot(&addr).await,
        before,
        "a refused request changed the log or the registry"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_does_what_the_table_says() {
    let c = Cluster::start(1).await;
    c.leader(Duration::from_secs(10)).await;
    let addr = c.node(1).addr.clone();
    let def =
        br#"{"port":8443,"member_port":9000,"mode":"tcp","balance":"leastconn","check":"tcp"}"#;
    let (s, v) = raw(
        &addr,
        Method::PUT,
        "/v1/services/api",
        Some(TOKEN),
        Some(def.to_vec()),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let first = parse::<Written>(&v).index;
    let (s, v) = raw(
        &addr,
        Method::PUT,
        "/v1/services/api/members/m1",
        Some(TOKEN),
        Some(br#"{"address":"api-1.internal","ttl_s":30}"#.to_vec()),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    assert!(parse::<Written>(&v).index > first);
    let (_, v) = raw(
        &addr,
        Method::GET,
        "/v1/services/api?consistent=true",
        Some(TOKEN),
        None,
    )
    .await;
    let v: OneServiceView = parse(&v);
    let m = &v.definition.members["m1"];
    assert_eq!(m.port, 9000, "member port defaults to the service's");
    assert_eq!(m.ttl_s, Some(30));
    assert_eq!(v.definition.def.balance, Balance::Leastconn);
    let (s, _) = raw(
        &addr,
        Method::PUT,
        "/v1/services/api/members/m1/state",
        Some(TOKEN),
        Some(br#"{"state":"drain"}"#.to_vec()),
    )
    .await;
    assert_eq!(s, 200);
    let (_, v) = raw(&addr, Method::GET, "/v1/services", Some(TOKEN), None).await;
    let v: ServicesView = parse(&v);
    assert_eq!(v.services["api"].members["m1"].state, MemberState::Drain);
    let (s, _) = raw(
        &addr,
        Method::DELETE,
        "/v1/services/api/members/m1",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(s, 200);
    let (s, _) = raw(
        &addr,
        Method::DELETE,
        "/v1/services/api/members/m1",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(s, 404, "a second delete finds nothing");
    let (s, v) = raw(&addr, Method::GET, "/healthz", None, None).await;
    assert_eq!((s, parse::<Healthz>(&v).ok), (200, true));
    let metrics = reqwest::get(format!("http://{addr}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for series in [
        "clb_raft_term",
        "clb_raft_leader",
        "clb_raft_applied_index",
        "clb_raft_commit_index",
        "clb_members{service=\"api\",state=\"drain\"} 0",
        "clb_write_duration_seconds_bucket{le=\"+Inf\"} 5",
        "clb_write_duration_seconds_count 5",
        "clb_forwarded_requests_total 0",
        "clb_render_renders_total",
        "clb_render_apply_failures_total",
        "clb_vip_held",
    ] {
        assert!(metrics.contains(series), "metrics lack {series}");
    }
}

fn run(bin: &str, args: &[&str], server: &str, token: Option<&str>) -> (i32, String, String) {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .env("CLB_SERVER", server)
        .env_remove("CLB_TOKEN");
    if let Some(t) = token {
        cmd.env("CLB_TOKEN", t);
    }
    let out = cmd.output().expect("run");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cli_and_2010_commands_work_and_exit_codes_are_trustworthy() {
    // Draining web1 and then unregistering the only other member would trip
    // the removal guardrail, which has its own test.
    let c = Cluster::start_with(1, &["--guardrail-share", "1"]).await;
    c.leader(Duration::from_secs(10)).await;
    let server = c.node(1).addr.clone();
    let clb = env!("CARGO_BIN_EXE_clb");
    let t = Some(TOKEN);

    let (code, out, err) = run(
        clb,
        &[
            "register",
            "http",
            "web1",
            "--address",
            "10.0.0.1",
            "--port",
            "8080",
        ],
        &server,
        t,
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("registered web1"), "{out}");
    let (code, out, _) = run(clb, &["members", "--json"], &server, t);
    assert_eq!(code, 0);
    let v: ServicesView = serde_json::from_str(&out).expect("--json prints the services view");
    assert_eq!(v.services["http"].members["web1"].port, 8080);
    let (code, out, _) = run(clb, &["members"], &server, t);
    assert_eq!(code, 0);
    assert!(out.lines().next().unwrap().starts_with("SERVICE"), "{out}");
    assert!(out.contains("10.0.0.1:8080"), "{out}");
    let (code, out, _) = run(clb, &["status"], &server, t);
    assert_eq!(code, 0);
    assert!(out.contains("leader"), "{out}");
    assert_eq!(run(clb, &["drain", "http", "web1"], &server, t).0, 0);
    assert_eq!(run(clb, &["unregister", "http", "nobody"], &server, t).0, 3);
    assert_eq!(run(clb, &["members"], &server, Some("wrong")).0, 4);
    assert_eq!(
        run(
            clb,
            &["register", "http", "a b", "--address", "10.0.0.1"],
            &server,
            t
        )
        .0,
        6
    );
    assert_eq!(
        run(
            clb,
            &["register", "http", "x", "--address", "bad host"],
            &server,
            t
        )
        .0,
        6
    );
    assert_eq!(
        run(clb, &["members"], &format!("127.0.0.1:{}", free_port()), t).0,
        5
    );
    assert_eq!(run(clb, &["frobnicate"], &server, t).0, 2);
    // --server tries each in turn: a dead one first does not matter.
    let both = format!("127.0.0.1:{},{server}", free_port());
    assert_eq!(run(clb, &["members"], &both, t).0, 0);

    // The 2010 calling form: PASSWORD NODE SERVICE; the service's port applies.
    let reg = env!("CARGO_BIN_EXE_clb_register");
    let unreg = env!("CARGO_BIN_EXE_clb_unregister");
    let (code, _, err) = run(reg, &[TOKEN, "10.0.0.9", "http"], &server, None);
    assert_eq!(code, 0, "{err}");
    let v = c.node(1).client().service("http", false).await.unwrap();
    assert_eq!(v.definition.members["10.0.0.9"].port, 80);
    assert_eq!(
        run(reg, &["wrong-password", "10.0.0.9", "http"], &server, None).0,
        4
    );
    assert_eq!(run(reg, &[TOKEN, "10.0.0.9"], &server, None).0, 2);
    assert_eq!(run(unreg, &[TOKEN, "10.0.0.9", "http"], &server, None).0, 0);
    let v = c.node(1).client().service("http", false).await.unwrap();
    assert!(!v.definition.members.contains_key("10.0.0.9"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_default_runs_with_no_config_and_a_generated_token() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let data = dir.path().join("clb-data");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_clbd"));
    cmd.args([
        "--data-dir",
        data.to_str().unwrap(),
        "-o",
        dir.path().join("haproxy.cfg").to_str().unwrap(),
        "--listen",
        &addr,
        "--peer-listen",
        "127.0.0.1:0",
    ])
    .stderr(std::process::Stdio::null());
    let mut child = Proc::build(&mut cmd).spawn().unwrap();
    let token_path = data.join("token");
    let token = eventually(Duration::from_secs(10), "generated token", || async {
        std::fs::read_to_string(&token_path)
            .ok()
            .filter(|t| t.ends_with('\n'))
    })
    .await;
    let token = token.trim().to_string();
    assert_eq!(token.len(), 64, "256-bit hex token");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&token_path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // A lone node makes its own peer secret, like its token.
    let secret = std::fs::read_to_string(data.join("cluster-secret")).unwrap();
    assert_eq!(secret.trim().len(), 64, "256-bit hex secret");
    assert_eq!(
        std::fs::metadata(data.join("cluster-secret"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    let client = clb::client::Client::new(&addr, Some(token)).unwrap();
    eventually(
        Duration::from_secs(10),
        "single node accepts writes",
        || async {
            client
                .register("http", "w", "10.0.0.1", None, None, None)
                .await
                .ok()
        },
    )
    .await;
    // SIGTERM: a clean exit.
    child.signal(libc::SIGTERM);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_defaults_from_the_config_file_and_turning_auto_create_off() {
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("clbd.toml");
    std::fs::write(
        &toml,
        "[service_defaults]\nbalance = \"leastconn\"\n[service_defaults.ports]\nmyapp = 8081\n",
    )
    .unwrap();
    let c = Cluster::start_with(1, &["--config", toml.to_str().unwrap()]).await;
    c.leader(Duration::from_secs(10)).await;
    let client = c.node(1).client();
    client
        .register("myapp", "a", "10.0.0.1", None, None, None)
        .await
        .expect("myapp is created from [service_defaults]");
    let v = client.service("myapp", false).await.unwrap();
    assert_eq!(v.definition.def.port, 8081);
    assert_eq!(v.definition.def.balance, Balance::Leastconn);
    assert_eq!(v.definition.members["a"].port, 8081);

    let off = Cluster::start_with(1, &["--auto-create-services", "false"]).await;
    off.leader(Duration::from_secs(10)).await;
    let err = off
        .node(1)
        .client()
        .register("http", "a", "10.0.0.1", None, None, None)
        .await
        .unwrap_err();
    assert_eq!(err.status(), Some(404), "{err}");
}

/// A failover nobody can take over says so: not "no leader reachable with a
/// quorum" (there is one, and it still leads).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failover_without_a_successor_says_the_leader_still_leads() {
    let c = Cluster::start(1).await;
    c.leader(Duration::from_secs(30)).await;
    let addr = c.node(1).addr.clone();
    let (status, v) = raw(
        &addr,
        Method::POST,
        "/v1/cluster/failover",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 503, "{v}");
    let e: ErrorBody = parse(&v);
    assert!(
        matches!(
            &e.detail,
            Some(ErrorDetail::Situation { situation, .. })
                if situation == "the leader could not hand leadership over; it still leads"
        ),
        "{v}"
    );
    assert!(e.error.contains("no voter took over"), "{v}");
    assert_eq!(c.leader(Duration::from_secs(5)).await, 1);
}
