//! Scoped tokens, revocation on every node, legacy password, the failed-auth
//! rate limit, the audit history, and attack strings against every field that
//! reaches haproxy.cfg.

#[path = "cluster/harness.rs"]
mod harness;

use std::time::{Duration, Instant};

use clb::model::Check;
use clb::views::{
    Audit, ClusterView, ErrorBody, OneServiceView, RegisterBody, ServiceBody, StateBody, TokenBody,
    TokenCreated, Written,
};
use harness::{eventually, ClusterExt, TOKEN};
use lab::Cluster;
use reqwest::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A request body as it goes on the wire: JSON text.
fn wire(body: impl Serialize) -> String {
    serde_json::to_string(&body).expect("a request body")
}

/// `PUT .../members/{member}`.
fn member_body(address: &str, port: Option<u32>) -> String {
    wire(RegisterBody {
        address: address.into(),
        port,
        ..Default::default()
    })
}

/// `PUT /v1/services/{service}`.
fn service_body(port: u32) -> String {
    wire(ServiceBody {
        port,
        ..Default::default()
    })
}

/// `POST /v1/tokens`.
fn token_body(scope: &str) -> String {
    wire(TokenBody {
        scope: scope.into(),
        ..Default::default()
    })
}

/// One request; the status and the body's text.
async fn call(
    addr: &str,
    token: &str,
    method: Method,
    path: &str,
    body: Option<String>,
) -> (u16, String) {
    let mut req = reqwest::Client::new()
        .request(method, format!("http://{addr}{path}"))
        .bearer_auth(token);
    if let Some(b) = body {
        req = req.header("content-type", "application/json").body(b);
    }
    let resp = req.send().await.expect("send");
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_default();
    (status, text)
}

/// An answer read as the view `T`.
fn parse<T: DeserializeOwned>(text: &str) -> T {
    serde_json::from_str(text)
        .unwrap_or_else(|e| panic!("not a {}: {e}: {text:?}", std::any::type_name::<T>()))
}

/// The error message of a refusal.
fn error(text: &str) -> String {
    parse::<ErrorBody>(text).error
}

/// The log's last index, as node `addr` sees it.
async fn last_log_index(addr: &str) -> Option<u64> {
    let (_, v) = call(addr, TOKEN, Method::GET, "/v1/cluster", None).await;
    parse::<ClusterView>(&v).last_log_index
}

async fn create_token(addr: &str, scope: &str, ttl: Option<&str>) -> (String, String) {
    let body = TokenBody {
        scope: scope.into(),
        ttl: ttl.map(String::from),
        name: Some(format!("test {scope}")),
    };
    let (s, v) = call(addr, TOKEN, Method::POST, "/v1/tokens", Some(wire(body))).await;
    assert_eq!(s, 200, "{v}");
    let created: TokenCreated = parse(&v);
    (created.id, created.secret)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_scope_allows_exactly_what_it_should() {
    let c = Cluster::start(1).await;
    c.leader(Duration::from_secs(10)).await;
    let addr = c.node(1).addr.clone();
    let (_, admin) = create_token(&addr, "admin", None).await;
    let (_, read) = create_token(&addr, "read", Some("90d")).await;
    let (_, web) = create_token(&addr, "register:web", None).await;
    let (_, api) = create_token(&addr, "register:web:api-*", None).await;
    let (_, any) = create_token(&addr, "register:*", None).await;
    let member = |svc: &str, m: &str| format!("/v1/services/{svc}/members/{m}");
    let reg = member_body("10.0.0.1", Some(80));
    call(
        &addr,
        TOKEN,
        Method::PUT,
        "/v1/services/web",
        Some(service_body(8080)),
    )
    .await;
    call(
        &addr,
        TOKEN,
        Method::PUT,
        "/v1/services/db",
        Some(service_body(5432)),
    )
    .await;

    // (token, method, path, body, expected status)
    let cases: Vec<(&str, Method, String, Option<String>, u16)> = vec![
        (
            &admin,
            Method::PUT,
            member("web", "a1"),
            Some(reg.clone()),
            200,
        ),
        (&admin, Method::GET, "/v1/services".into(), None, 200),
        (&admin, Method::GET, "/v1/tokens".into(), None, 200),
        (&read, Method::GET, "/v1/services".into(), None, 200),
        (&read, Method::GET, "/v1/cluster".into(), None, 200),
        (&read, Method::GET, "/v1/audit".into(), None, 200),
        (
            &read,
            Method::PUT,
            member("web", "r1"),
            Some(reg.clone()),
            403,
        ),
        (
            &read,
            Method::PUT,
            "/v1/services/x".into(),
            Some(service_body(9)),
            403,
        ),
        (&read, Method::GET, "/v1/tokens".into(), None, 403),
        (
            &web,
            Method::PUT,
            member("web", "w1"),
            Some(reg.clone()),
            200,
        ),
        (
            &web,
            Method::PUT,
            format!("{}/state", member("web", "w1")),
            Some(wire(StateBody {
                state: "drain".into(),
            })),
            200,
        ),
        (&web, Method::DELETE, member("web", "w1"), None, 200),
        (
            &web,
            Method::PUT,
            member("db", "w1"),
            Some(reg.clone()),
            403,
        ),
        (&web, Method::GET, "/v1/services".into(), None, 403),
        (
            &web,
            Method::PUT,
            "/v1/services/web".into(),
            Some(service_body(8080)),
            403,
        ),
        (
            &web,
            Method::POST,
            "/v1/tokens".into(),
            Some(token_body("admin")),
            403,
        ),
        (
            &web,
            Method::DELETE,
            "/v1/cluster/nodes/2".into(),
            None,
            403,
        ),
        (
            &api,
            Method::PUT,
            member("web", "api-1"),
            Some(reg.clone()),
            200,
        ),
        (
            &api,
            Method::PUT,
            member("web", "web-1"),
            Some(reg.clone()),
            403,
        ),
        (
            &api,
            Method::PUT,
            member("db", "api-1"),
            Some(reg.clone()),
            403,
        ),
        (
            &any,
            Method::PUT,
            member("db", "x1"),
            Some(reg.clone()),
            200,
        ),
        (&any, Method::GET, "/v1/services".into(), None, 403),
    ];
    for (token, method, path, body, want) in cases {
        let (status, v) = call(&addr, token, method.clone(), &path, body).await;
        assert_eq!(status, want, "{method} {path} with {}: {v}", &token[..12]);
        if want == 403 {
            assert!(error(&v).contains("scope"), "{v}");
        }
    }
    // A refused request wrote nothing: w1 in db does not exist.
    let (_, v) = call(&addr, TOKEN, Method::GET, "/v1/services/db", None).await;
    let v: OneServiceView = parse(&v);
    assert!(!v.definition.members.contains_key("w1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_token_is_refused_on_every_node_within_a_second() {
    let c = Cluster::start(3).await;
    c.leader(Duration::from_secs(10)).await;
    let leader_addr = c.node(1).addr.clone();
    let (id, secret) = create_token(&leader_addr, "register:web", None).await;
    let body = member_body("10.0.0.1", Some(80));
    for n in c.nodes.values() {
        let s = eventually(
            Duration::from_secs(5),
            "token known on every node",
            || async {
                let (s, _) = call(
                    &n.addr,
                    &secret,
                    Method::PUT,
                    "/v1/services/web/members/m1",
                    Some(body.clone()),
                )
                .await;
                (s == 200).then_some(s)
            },
        )
        .await;
        assert_eq!(s, 200);
    }
    let (s, v) = call(
        &c.node(2).addr,
        TOKEN,
        Method::DELETE,
        &format!("/v1/tokens/{id}"),
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let revoked_at = Instant::now();
    for n in c.nodes.values() {
        eventually(
            Duration::from_secs(1),
            "revocation on every node",
            || async {
                let (s, _) = call(
                    &n.addr,
                    &secret,
                    Method::PUT,
                    "/v1/services/web/members/m1",
                    Some(body.clone()),
                )
                .await;
                (s == 401).then_some(())
            },
        )
        .await;
    }
    assert!(revoked_at.elapsed() < Duration::from_secs(1));
    // Listing never shows secrets or hashes.
    let (_, text) = call(&leader_addr, TOKEN, Method::GET, "/v1/tokens", None).await;
    assert!(
        !text.contains(&secret[20..]) && !text.contains("hash"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_tokens_and_the_legacy_password() {
    let dir = tempfile::tempdir().unwrap();
    let legacy = dir.path().join("legacy");
    std::fs::write(&legacy, "my-clb-password\n").unwrap();
    let c = Cluster::start_with(1, &["--legacy-password-file", legacy.to_str().unwrap()]).await;
    c.leader(Duration::from_secs(10)).await;
    let addr = c.node(1).addr.clone();
    let (_, short) = create_token(&addr, "read", Some("1s")).await;
    let (s, _) = call(&addr, &short, Method::GET, "/v1/services", None).await;
    assert_eq!(s, 200);
    let v = eventually(Duration::from_secs(5), "the token expires", || async {
        let (s, v) = call(&addr, &short, Method::GET, "/v1/services", None).await;
        (s == 401).then_some(v)
    })
    .await;
    assert!(error(&v).contains("expired"), "{v}");

    // The 2010 password registers (scope register:*) and can do nothing else.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_clb_register"))
        .args(["my-clb-password", "10.0.0.7", "http"])
        .env("CLB_SERVER", &addr)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (s, _) = call(&addr, "my-clb-password", Method::GET, "/v1/services", None).await;
    assert_eq!(s, 403);
    let (s, _) = call(
        &addr,
        "my-clb-password",
        Method::POST,
        "/v1/tokens",
        Some(token_body("admin")),
    )
    .await;
    assert_eq!(s, 403);
    let (_, v) = call(&addr, TOKEN, Method::GET, "/v1/audit?service=http", None).await;
    let audit: Audit = parse(&v);
    let e = audit.entries.first();
    assert_eq!(
        (
            e.map(|e| e.by.as_str()),
            e.map(|e| e.action.as_str()),
            e.and_then(|e| e.member.as_deref())
        ),
        (Some("legacy"), Some("register"), Some("10.0.0.7")),
        "{v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_authentication_is_rate_limited_with_retry_after() {
    let c = Cluster::start_with(1, &["--auth-failures-per-minute", "5"]).await;
    c.leader(Duration::from_secs(10)).await;
    let url = format!("http://{}/v1/services", c.node(1).addr);
    let http = reqwest::Client::new();
    for i in 0..5 {
        let r = http
            .get(&url)
            .bearer_auth(format!("guess-{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    let r = http.get(&url).bearer_auth("guess-6").send().await.unwrap();
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry), "{retry}");
    let v: ErrorBody = r.json().await.unwrap();
    assert!(v.error.contains("retry in"), "{v:?}");
    // While blocked, even the right token waits.
    let r = http.get(&url).bearer_auth(TOKEN).send().await.unwrap();
    assert_eq!(r.status(), 429);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_history_names_who_did_what_on_every_node() {
    let c = Cluster::start(3).await;
    c.leader(Duration::from_secs(10)).await;
    let addr = c.node(1).addr.clone();
    let (web_id, web) = create_token(&addr, "register:web", None).await;
    call(
        &addr,
        TOKEN,
        Method::PUT,
        "/v1/services/web",
        Some(service_body(8080)),
    )
    .await;
    let (s, v) = call(
        &addr,
        &web,
        Method::PUT,
        "/v1/services/web/members/w1",
        Some(member_body("10.0.0.1", None)),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let index = parse::<Written>(&v).index;
    call(
        &addr,
        &web,
        Method::DELETE,
        "/v1/services/web/members/w1",
        None,
    )
    .await;
    // A refused request is not in the history.
    call(
        &addr,
        &web,
        Method::DELETE,
        "/v1/services/web/members/nobody",
        None,
    )
    .await;
    c.converged(index + 1, Duration::from_secs(5)).await;
    for n in c.nodes.values() {
        let (_, v) = call(&n.addr, TOKEN, Method::GET, "/v1/audit?service=web", None).await;
        let audit: Audit = parse(&v);
        let actions: Vec<(&str, &str)> = audit
            .entries
            .iter()
            .map(|e| (e.action.as_str(), e.by.as_str()))
            .collect();
        assert_eq!(
            actions,
            vec![
                ("unregister", web_id.as_str()),
                ("register", web_id.as_str()),
                ("define-service", "bootstrap")
            ],
            "node {}",
            n.id
        );
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_clb"))
        .args([
            "--server",
            &addr,
            "--token",
            TOKEN,
            "audit",
            "--service",
            "web",
            "--since",
            "1h",
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("unregister") && text.contains(&web_id),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attack_strings_are_refused_in_every_field_that_reaches_haproxy() {
    let c = Cluster::start(1).await;
    c.leader(Duration::from_secs(10)).await;
    let addr = c.node(1).addr.clone();
    let before = last_log_index(&addr).await;
    let long = "a".repeat(10_000);
    let attacks = [
        "a\nserver evil 6.6.6.6:80",
        "a b",
        "a#b",
        "a\"b",
        "a'b",
        "a\0b",
        long.as_str(),
        "wеb",    // Cyrillic е
        "ｗｅｂ", // fullwidth
        "../../etc/passwd",
        "..",
        "a/b",
        "a\\b",
        "a;b",
        "${x}",
        "{{ x }}",
    ];
    let enc = |s: &str| -> String { s.bytes().map(|b| format!("%{b:02X}")).collect() };
    for attack in attacks {
        // service name and member name in the path
        for path in [
            format!("/v1/services/{}/members/m", enc(attack)),
            format!("/v1/services/web/members/{}", enc(attack)),
        ] {
            let (s, v) = call(
                &addr,
                TOKEN,
                Method::PUT,
                &path,
                Some(member_body("10.0.0.1", None)),
            )
            .await;
            assert!(s == 400 || s == 404, "{attack:?} in {path}: {s} {v}");
            error(&v);
        }
        // address, check path, service definition name
        let (s, v) = call(
            &addr,
            TOKEN,
            Method::PUT,
            "/v1/services/http/members/m",
            Some(member_body(attack, None)),
        )
        .await;
        assert_eq!(s, 400, "address {attack:?}: {v}");
        // "/a/b" is a fine URL path; everything else must be refused.
        if attack != "a/b" {
            let (s, v) = call(
                &addr,
                TOKEN,
                Method::PUT,
                "/v1/services/web",
                Some(wire(ServiceBody {
                    port: 81,
                    check: Some(Check::Http {
                        path: format!("/{attack}"),
                    }),
                    ..Default::default()
                })),
            )
            .await;
            assert_eq!(s, 400, "check path {attack:?}: {v}");
        }
        let (s, v) = call(
            &addr,
            TOKEN,
            Method::POST,
            "/v1/tokens",
            Some(token_body(&format!("register:{attack}"))),
        )
        .await;
        assert_eq!(s, 400, "scope {attack:?}: {v}");
    }
    let after = last_log_index(&addr).await;
    assert_eq!(before, after, "a refused request wrote to the log");
}

/// Two `Authorization` headers are refused whatever their order (a proxy
/// and clbd could pick different ones); the scheme is case-insensitive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authorization_headers_are_read_strictly() {
    let c = Cluster::start(1).await;
    c.leader(Duration::from_secs(10)).await;
    let url = format!("http://{}/v1/services", c.node(1).addr);
    let http = reqwest::Client::new();
    let admin = format!("Bearer {TOKEN}");
    for pair in [
        [admin.as_str(), "Bearer junk"],
        ["Bearer junk", admin.as_str()],
    ] {
        let r = http
            .get(&url)
            .header("authorization", pair[0])
            .header("authorization", pair[1])
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{pair:?}");
        let v: ErrorBody = r.json().await.unwrap();
        assert!(v.error.contains("more than one"), "{v:?}");
    }
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let r = http
            .get(&url)
            .header("authorization", format!("{scheme} {TOKEN}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{scheme}");
    }
    // A body announced over the limit is refused from the headers alone,
    // before authentication: the answer comes without a byte of the body.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(&c.node(1).addr)
        .await
        .unwrap();
    conn.write_all(
        b"PUT /v1/services/x/members/y HTTP/1.1\r\nhost: x\r\ncontent-length: 10000000\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut head))
        .await
        .expect("answered before the body")
        .unwrap();
    let head = String::from_utf8_lossy(&head[..n]);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bootstrap_tokens_rotate_on_sighup_without_a_restart() {
    let c = Cluster::start(1).await;
    c.leader(Duration::from_secs(10)).await;
    let addr = c.node(1).addr.clone();
    std::fs::write(&c.token_file, "rotated-admin-token\n").unwrap();
    let pid = c.node(1).pid().unwrap();
    c.node(1).signal(libc::SIGHUP);
    eventually(
        Duration::from_secs(5),
        "the new token is accepted",
        || async {
            let (s, _) = call(
                &addr,
                "rotated-admin-token",
                Method::GET,
                "/v1/services",
                None,
            )
            .await;
            (s == 200).then_some(())
        },
    )
    .await;
    let (s, _) = call(&addr, TOKEN, Method::GET, "/v1/services", None).await;
    assert_eq!(s, 401, "the old token still works");
    assert_eq!(c.node(1).pid(), Some(pid));
    assert!(c.node(1).healthy().await, "SIGHUP must not stop clbd");
}
