//! HTTPS and connection limits against real `clbd` processes: a test CA made
//! at test time, `clb --ca`, certificates rotated without a restart, the
//! plain-HTTP token guard, slow clients, the connection cap, and a 3-node
//! cluster whose peers talk HTTPS.

#[path = "common/forge.rs"]
mod forge;
#[path = "cluster/harness.rs"]
mod harness;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clb::client::{Client, ClientOptions};
use clb::views::{OneServiceView, ServiceBody};
use harness::{eventually, ClusterExt, TOKEN};
use lab::{free_port, peer_addr_for, Cluster};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A CA and the files a node serves, in the cluster's temp dir.
struct Pki {
    ca_cert: rcgen::Certificate,
    ca_key: KeyPair,
    ca_file: PathBuf,
    cert_file: PathBuf,
    key_file: PathBuf,
}

impl Pki {
    fn new(dir: &Path) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "clb test CA");
        let ca_key = KeyPair::generate().expect("ca key");
        let ca_cert = params.self_signed(&ca_key).expect("ca cert");
        let ca_file = dir.join("ca.pem");
        std::fs::write(&ca_file, ca_cert.pem()).expect("write ca");
        Pki {
            ca_cert,
            ca_key,
            ca_file,
            cert_file: dir.join("server.pem"),
            key_file: dir.join("server.key"),
        }
    }

    /// Signs a new server certificate for loopback, writes it and its key
    /// over the served files (in place), and returns its DER.
    fn issue(&self, name: &str) -> CertificateDer<'static> {
        let sans = vec!["127.0.0.1".to_string(), "::1".into(), "localhost".into()];
        let mut params = CertificateParams::new(sans).expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.ca_cert, &self.ca_key)
            .expect("sign leaf");
        std::fs::write(&self.cert_file, cert.pem()).expect("write cert");
        std::fs::write(&self.key_file, key.serialize_pem()).expect("write key");
        cert.der().clone()
    }

    fn args(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            self.cert_file.display().to_string(),
            "--tls-key".into(),
            self.key_file.display().to_string(),
            "--tls-ca".into(),
            self.ca_file.display().to_string(),
        ]
    }

    fn client(&self, servers: &str) -> Client {
        let options = ClientOptions {
            ca: Some(self.ca_file.clone()),
            insecure: false,
        };
        Client::with_options(servers, Some(TOKEN.into()), options).expect("client")
    }

    /// The leaf certificate `addr` presents in a TLS handshake, trusting
    /// only this CA.
    async fn served(&self, addr: &str) -> Option<CertificateDer<'static>> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_cert.der().clone()).ok()?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .ok()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let tcp = TcpStream::connect(addr).await.ok()?;
        let name = ServerName::try_from("127.0.0.1").ok()?;
        let tls = connector.connect(name, tcp).await.ok()?;
        tls.get_ref().1.peer_certificates()?.first().cloned()
    }
}

async fn https_healthy(pki: &Pki, addr: &str) {
    let client = pki.client(&format!("https://{addr}"));
    eventually(Duration::from_secs(20), "node healthy over HTTPS", || {
        let client = client.clone();
        async move { client.healthz().await.ok() }
    })
    .await;
}

/// A single TLS node with its own CA.
async fn tls_node(extra: &[&str]) -> (Cluster, Pki, String) {
    let mut cluster = Cluster::empty();
    let pki = Pki::new(cluster.dir.path());
    pki.issue("node one");
    let addr = format!("127.0.0.1:{}", free_port());
    let mut args = pki.args();
    args.extend(extra.iter().map(|s| s.to_string()));
    cluster.add_node(1, addr.clone(), args);
    https_healthy(&pki, &addr).await;
    (cluster, pki, addr)
}

/// Runs `clb` with a clean environment and `args`.
fn clb(args: &[&str]) -> Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_clb"))
        .args(args)
        .env_remove("CLB_SERVER")
        .env_remove("CLB_TOKEN")
        .env_remove("CLB_TOKEN_FILE")
        .env_remove("CLB_CA")
        .env_remove("CLB_INSECURE")
        .output()
        .expect("run clb")
}

fn text(o: &Output) -> String {
    format!(
        "status {:?}\nstdout: {}\nstderr: {}",
        o.status.code(),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Reads until the server closes; `None` if it did not within `within`.
async fn closed_after(stream: &mut TcpStream, within: Duration) -> Option<Duration> {
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    let read_all = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    };
    tokio::time::timeout(within, read_all).await.ok()?;
    Some(start.elapsed())
}

#[tokio::test]
async fn the_api_works_over_https_with_the_cli_and_refuses_unverified_or_plain() {
    let (cluster, pki, addr) = tls_node(&[]).await;
    let server = format!("https://{addr}");
    let ca = pki.ca_file.display().to_string();
    let base = ["--server", server.as_str(), "--token", TOKEN, "--ca", &ca];

    let o = clb(&[&base[..], &["service", "set", "web", "--port", "8080"]].concat());
    assert!(o.status.success(), "{}", text(&o));
    let o = clb(&[
        &base[..],
        &[
            "register",
            "web",
            "a1",
            "--address",
            "10.0.0.5",
            "--port",
            "80",
        ],
    ]
    .concat());
    assert!(o.status.success(), "{}", text(&o));
    let o = clb(&[&base[..], &["--json", "members", "web"]].concat());
    assert!(o.status.success(), "{}", text(&o));
    let v: OneServiceView = serde_json::from_slice(&o.stdout).expect("json");
    assert_eq!(
        v.definition.members.get("a1").map(|m| m.address.as_str()),
        Some("10.0.0.5")
    );

    // Without the CA the server's certificate does not verify.
    let o = clb(&["--server", &server, "--token", TOKEN, "status"]);
    assert!(!o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("certificate"),
        "{}",
        text(&o)
    );

    // A token never goes over plain HTTP to a non-loopback address (refused
    // before anything is sent, so no traffic leaves the machine).
    let o = clb(&[
        "--server",
        "192.0.2.10:8090",
        "--token",
        TOKEN,
        "--ca",
        &ca,
        "status",
    ]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("--insecure"),
        "{}",
        text(&o)
    );

    // A client stuck before its handshake does not hold up the others.
    let _silent = TcpStream::connect(&addr).await.expect("connect");
    let started = Instant::now();
    pki.client(&server)
        .cluster()
        .await
        .expect("cluster over https");
    assert!(started.elapsed() < Duration::from_secs(5));
    drop(cluster);
}

#[tokio::test]
async fn a_rotated_certificate_is_served_without_restart() {
    let (cluster, pki, addr) = tls_node(&[]).await;
    let node = cluster.node(1);
    let first = pki.served(&addr).await.expect("served");

    // SIGHUP: new files, but with the old mtimes, so only the signal can
    // make the node notice.
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).unwrap();
    let (cert_mtime, key_mtime) = (mtime(&pki.cert_file), mtime(&pki.key_file));
    let second = pki.issue("node one, second");
    for (p, t) in [(&pki.cert_file, cert_mtime), (&pki.key_file, key_mtime)] {
        let f = std::fs::File::options().write(true).open(p).unwrap();
        f.set_modified(t).unwrap();
    }
    assert_ne!(first, second);
    node.signal(libc::SIGHUP);
    eventually(
        Duration::from_secs(10),
        "the SIGHUP certificate",
        || async { (pki.served(&addr).await? == second).then_some(()) },
    )
    .await;
    assert!(node
        .log_text()
        .lines()
        .any(|l| l.contains("reloaded the TLS certificate") && l.contains("SIGHUP")));

    // A changed file alone.
    let third = pki.issue("node one, third");
    eventually(
        Duration::from_secs(10),
        "the changed-file certificate",
        || async { (pki.served(&addr).await? == third).then_some(()) },
    )
    .await;

    assert!(node
        .log_text()
        .lines()
        .any(|l| l.contains("reloaded the TLS certificate") && l.contains("file change")));

    // A broken file keeps the last good certificate serving.
    let failures = || {
        node.log_text()
            .matches("TLS certificate reload failed")
            .count()
    };
    let before = failures();
    std::fs::write(&pki.cert_file, "garbage\n").unwrap();
    node.signal(libc::SIGHUP);
    eventually(
        Duration::from_secs(10),
        "the reload error in the log",
        || async { (failures() > before).then_some(()) },
    )
    .await;
    assert_eq!(pki.served(&addr).await, Some(third));
    pki.client(&format!("https://{addr}"))
        .cluster()
        .await
        .expect("still serving");
    assert!(node.child.is_some());
    drop(cluster);
}

#[tokio::test]
async fn bad_tls_files_stop_start_up_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    pki.issue("x");
    std::fs::write(&pki.key_file, "not a key\n").unwrap();
    let port = free_port().to_string();
    let listen = format!("127.0.0.1:{port}");
    let data = dir.path().join("data").display().to_string();
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_clbd"))
            .args(["--listen", &listen, "--data-dir", &data])
            .args(["--peer-listen", "127.0.0.1:0"])
            .args(args)
            .output()
            .expect("run clbd")
    };
    let cert = pki.cert_file.display().to_string();
    let key = pki.key_file.display().to_string();
    let o = run(&["--tls-cert", &cert, "--tls-key", &key]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.starts_with("clbd: --tls-key:") && err.contains("server.key"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let o = run(&["--tls-cert", &cert]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("needs --tls-key"));
    let o = run(&["--tls-cert", "/nonexistent.pem", "--tls-key", &key]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent.pem"));
}

#[tokio::test]
async fn slow_clients_are_cut_off_and_connections_are_capped() {
    let mut cluster = Cluster::empty();
    let slow = format!("127.0.0.1:{}", free_port());
    cluster.add_node(
        1,
        slow.clone(),
        vec!["--header-read-timeout-ms".into(), "300".into()],
    );
    let capped = format!("127.0.0.1:{}", free_port());
    cluster.add_node(
        2,
        capped.clone(),
        vec!["--max-connections".into(), "2".into()],
    );
    for node in cluster.nodes.values() {
        eventually(Duration::from_secs(20), "node healthy", || async {
            node.healthy().await.then_some(())
        })
        .await;
    }

    // Half a request line, then nothing: closed after the header timeout.
    let mut half = TcpStream::connect(&slow).await.unwrap();
    half.write_all(b"GET /healthz HT").await.unwrap();
    let after = closed_after(&mut half, Duration::from_secs(5))
        .await
        .expect("closed after the header timeout");
    assert!(after >= Duration::from_millis(250), "{after:?}");

    // Two kept-alive connections fill the cap; a third client is served
    // by closing the older idle one, so silent clients cannot starve it.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(&capped).await.unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = [0u8; 512];
        assert!(c.read(&mut buf).await.unwrap() > 0);
        held.push(c);
    }
    let url = format!("http://{capped}/healthz");
    let status = tokio::time::timeout(Duration::from_secs(5), reqwest::get(url))
        .await
        .expect("served over the cap by closing an idle connection")
        .unwrap()
        .status();
    assert_eq!(status, 200);
    let oldest = closed_after(&mut held[0], Duration::from_secs(5)).await;
    assert!(
        oldest.is_some(),
        "the oldest idle connection was not closed"
    );
}

#[tokio::test]
async fn a_three_node_cluster_forms_and_replicates_over_https() {
    let mut cluster = Cluster::empty();
    // Each node serves its own certificate, made by the script the AWS
    // walk-through (docs/operations.md) has operators run.
    let dir = cluster.dir.path().join("pki");
    let made = std::process::Command::new("bash")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/deploy/tls/clb-certs.sh"
        ))
        .arg(&dir)
        .args([
            "node1=127.0.0.1",
            "node2=127.0.0.1,localhost",
            "node3=127.0.0.1,::1",
        ])
        .output()
        .expect("run deploy/tls/clb-certs.sh");
    assert!(made.status.success(), "clb-certs.sh: {}", text(&made));
    let key_mode = std::fs::metadata(dir.join("node1.key"))
        .unwrap()
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&key_mode) & 0o777,
        0o600,
        "keys are private"
    );
    let pki = Pki {
        ca_file: dir.join("ca.crt"),
        ..Pki::new(cluster.dir.path())
    };
    let node_tls = |id: usize| -> Vec<String> {
        let f = |ext: &str| dir.join(format!("node{id}.{ext}")).display().to_string();
        vec![
            "--tls-cert".into(),
            f("crt"),
            "--tls-key".into(),
            f("key"),
            "--tls-ca".into(),
            pki.ca_file.display().to_string(),
        ]
    };
    let addrs: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port()))
        .collect();
    let peer_addrs: Vec<String> = addrs.iter().map(|a| peer_addr_for(a)).collect();
    let peers = peer_addrs
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{}={a}", i + 1))
        .collect::<Vec<_>>()
        .join(",");
    for (i, (addr, peer)) in addrs.iter().zip(&peer_addrs).enumerate() {
        let mut args = vec!["--peers".to_string(), peers.clone()];
        args.extend(node_tls(i + 1));
        cluster.add_node_at(
            i as u64 + 1,
            addr.clone(),
            peer.clone(),
            &lab::FAST_TIMERS,
            args,
        );
    }
    for addr in &addrs {
        https_healthy(&pki, addr).await;
    }
    let all = addrs
        .iter()
        .map(|a| format!("https://{a}"))
        .collect::<Vec<_>>()
        .join(",");
    let any = pki.client(&all);
    eventually(
        Duration::from_secs(20),
        "a write through the cluster",
        || {
            let any = any.clone();
            async move {
                let web = ServiceBody {
                    port: 8080,
                    ..Default::default()
                };
                any.define_service("web", &web).await.ok()?;
                any.register("web", "a1", "10.0.0.5", Some(80), None, None)
                    .await
                    .ok()
            }
        },
    )
    .await;
    for addr in &addrs {
        let client = pki.client(&format!("https://{addr}"));
        eventually(
            Duration::from_secs(10),
            &format!("{addr} to replicate the member"),
            || {
                let client = client.clone();
                async move {
                    let v = client.service("web", false).await.ok()?;
                    v.definition.members.get("a1").map(|_| ())
                }
            },
        )
        .await;
    }
    let leaders: Vec<Option<u64>> = futures::future::join_all(addrs.iter().map(|a| {
        let client = pki.client(&format!("https://{a}"));
        async move { client.cluster().await.ok()?.leader }
    }))
    .await;
    assert!(
        leaders[0].is_some() && leaders.iter().all(|l| *l == leaders[0]),
        "{leaders:?}"
    );
    // The cluster view collects every node's status over HTTPS too.
    let view = pki
        .client(&format!("https://{}", addrs[0]))
        .cluster()
        .await
        .unwrap();
    for id in [1, 2, 3] {
        let st = view.node_status.get(&id);
        assert!(
            st.and_then(|s| s.up()).is_some_and(|n| n.node_id == id),
            "node {id}: {st:?}"
        );
    }
    // The walk-through's check from another host: `clb status` over HTTPS
    // against all three nodes, trusting the script's CA.
    // Polled: a status taken during an election names no leader.
    let status = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_clb"))
            .arg("status")
            .env("CLB_SERVER", &all)
            .env("CLB_CA", &pki.ca_file)
            .env("CLB_TOKEN", TOKEN)
            .env_remove("CLB_TOKEN_FILE")
            .env_remove("CLB_INSECURE")
            .output()
            .expect("run clb status")
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut o = status();
    while !String::from_utf8_lossy(&o.stdout).contains("leader")
        && std::time::Instant::now() < deadline
    {
        std::thread::sleep(std::time::Duration::from_millis(100));
        o = status();
    }
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && out.contains("leader") && !out.contains("unreachable"),
        "clb status: {}",
        text(&o)
    );
    // TLS authenticates the server, not the caller: forged peer RPCs over
    // HTTPS are refused like over HTTP, and change nothing.
    let term = view.term;
    let last = view.last_log_index.expect("last_log_index");
    let cluster_id = view.cluster_id.clone();
    let ca = reqwest::Certificate::from_pem(&std::fs::read(&pki.ca_file).unwrap()).unwrap();
    let https = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap();
    for peer in &peer_addrs {
        forge::assert_all_refused(
            &https,
            &format!("https://{peer}"),
            &cluster_id,
            &["wrong-secret-but-long-enough"],
        )
        .await;
    }
    let after = pki
        .client(&format!("https://{}", addrs[0]))
        .cluster()
        .await
        .unwrap();
    assert_eq!(after.term, term);
    assert_eq!(after.last_log_index, Some(last));
}
