//! deploy/: the example clbd.toml parses and names every setting, the
//! configs the cloud-init files write parse, and the systemd units call
//! flags that exist.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use clap::Args;
use clb::config::{Config, Settings};

fn read(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `#key = value` and `#[table]` lines uncommented; prose (`# ...`) stays.
fn uncomment_all(text: &str) -> String {
    text.lines()
        .map(|l| match l.strip_prefix('#') {
            Some(rest) if rest.starts_with(|c: char| c.is_ascii_lowercase() || c == '[') => rest,
            _ => l,
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every key of `Settings`, from its flags (snake_case) plus the file-only ones.
fn settings_keys() -> BTreeSet<String> {
    let cmd = Settings::augment_args(clap::Command::new("clbd"));
    let mut keys: BTreeSet<String> = cmd
        .get_arguments()
        .filter_map(|a| a.get_long())
        .map(|l| l.replace('-', "_"))
        .collect();
    keys.insert("service_defaults".into());
    keys
}

#[test]
fn example_config_parses_and_names_every_setting() {
    let text = read("deploy/clbd.toml.example");
    toml::from_str::<Settings>(&text).expect("the example as shipped");

    let all = uncomment_all(&text);
    let settings: Settings =
        toml::from_str(&all).unwrap_or_else(|e| panic!("with every key uncommented: {e}\n{all}"));
    let table: toml::Table = toml::from_str(&all).unwrap();
    let present: BTreeSet<String> = table.keys().cloned().collect();
    let missing: Vec<_> = settings_keys().difference(&present).cloned().collect();
    assert!(
        missing.is_empty(),
        "keys missing from deploy/clbd.toml.example: {missing:?}"
    );

    // The listed values validate, apart from what depends on files of the
    // target host (secrets, certificates, hook scripts, backups).
    let local = Settings {
        cluster_secret_file: None,
        // Uncommented, it would contradict the secret file; the example
        // only shows it.
        insecure_peers: Some(true),
        tls_cert: None,
        tls_key: None,
        tls_ca: None,
        vip_hook: Some("true".into()),
        restore: None,
        join: None,
        // The bgp block is shown for bgp mode; checked below.
        bgp_neighbor: None,
        bgp_asn: None,
        bgp_peer_asn: None,
        bird_socket: None,
        bird_include: None,
        bgp_bfd_ms: None,
        bgp_max_lag_ms: None,
        ..settings.clone()
    };
    let bgp = Settings {
        vip_mode: Some("bgp".into()),
        vip_hook: None,
        drain_ms: Some(0),
        ..local.clone()
    };
    let bgp = Settings {
        bgp_neighbor: settings.bgp_neighbor.clone(),
        bgp_asn: settings.bgp_asn,
        bgp_peer_asn: settings.bgp_peer_asn,
        bird_socket: settings.bird_socket.clone(),
        bird_include: settings.bird_include.clone(),
        bgp_bfd_ms: settings.bgp_bfd_ms,
        bgp_max_lag_ms: settings.bgp_max_lag_ms,
        ..bgp
    };
    let bgp = Config::from_settings(bgp).unwrap_or_else(|e| panic!("bgp block: {e}"));
    assert!(bgp.bgp.is_some());
    let config = Config::from_settings(local).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(config.node_id, 1);
    assert_eq!(config.listen.to_string(), "0.0.0.0:8090");
    assert_eq!(config.peer_listen.to_string(), "0.0.0.0:8091");
}

/// The `content: |` block written to `path` by a cloud-init file.
fn written_file(cloud_init: &str, path: &str) -> String {
    let mut lines = cloud_init
        .lines()
        .skip_while(|l| !l.contains(&format!("path: {path}")));
    lines
        .next()
        .unwrap_or_else(|| panic!("no write_files entry for {path}"));
    let mut lines = lines.skip_while(|l| !l.trim_start().starts_with("content: |"));
    lines.next().expect("content block");
    let mut out = Vec::new();
    let mut indent = None;
    for l in lines {
        if l.trim().is_empty() {
            out.push(String::new());
            continue;
        }
        let n = l.len() - l.trim_start().len();
        let want = *indent.get_or_insert(n);
        if n < want {
            break;
        }
        out.push(l[want..].to_string());
    }
    out.join("\n")
}

#[test]
fn cloud_init_configs_parse_and_hold_no_secrets() {
    for (file, role) in [
        ("balancer.yaml", "balancer"),
        ("balancer-bgp.yaml", "balancer"),
        ("witness.yaml", "witness"),
    ] {
        let text = read(&format!("deploy/cloud-init/{file}"));
        assert!(text.starts_with("#cloud-config\n"), "{file}");
        let toml_text = written_file(&text, "/etc/clb/clbd.toml");
        let s: Settings = toml::from_str(&toml_text).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(s.role.as_deref(), Some(role), "{file}");
        assert!(s.peers.is_some(), "{file}");
        // Tokens and the cluster secret cross the VPC: both ports on TLS.
        assert!(
            s.tls_cert.is_some() && s.tls_key.is_some() && s.tls_ca.is_some(),
            "{file} serves plain HTTP"
        );
        // Secrets arrive at boot, never in user-data.
        assert!(
            text.contains("aws ssm get-parameter --with-decryption"),
            "{file}"
        );
    }
    // Every recipe installs the packages (checked against a checksum), not
    // files by hand, and the balancer's hook is one the package ships.
    for file in [
        "balancer.yaml",
        "balancer-bgp.yaml",
        "witness.yaml",
        "member.yaml",
    ] {
        let text = read(&format!("deploy/cloud-init/{file}"));
        assert!(text.contains("apt-get install -y"), "{file}");
        assert!(text.contains("/tmp/clb-client.deb"), "{file}");
        assert!(text.contains("sha256sum -c -"), "{file}");
        assert!(
            !text.contains("tar -xzf") && !text.contains("/usr/local/bin"),
            "{file}"
        );
    }
    let balancer = read("deploy/cloud-init/balancer.yaml");
    let s: Settings = toml::from_str(&written_file(&balancer, "/etc/clb/clbd.toml")).unwrap();
    let hook = s.vip_hook.expect("the balancer's hook");
    let name = hook
        .strip_prefix("/usr/share/clb-server/hooks/")
        .unwrap_or_else(|| panic!("{hook} is not a packaged hook"));
    assert!(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/hooks")
            .join(name)
            .exists(),
        "{hook}"
    );
    // The bgp balancer validates in bgp mode (drains off here: nft may be
    // missing on the machine running the test), and ships the same BIRD
    // config and drop-in as deploy/.
    let bgp = read("deploy/cloud-init/balancer-bgp.yaml");
    let s: Settings = toml::from_str(&written_file(&bgp, "/etc/clb/clbd.toml")).unwrap();
    assert_eq!(s.vip_mode.as_deref(), Some("bgp"));
    let c = Config::from_settings(Settings {
        drain_ms: Some(0),
        cluster_secret_file: None,
        insecure_peers: Some(true),
        tls_cert: None,
        tls_key: None,
        tls_ca: None,
        token_file: None,
        ..s
    })
    .unwrap_or_else(|e| panic!("balancer-bgp.yaml: {e}"));
    assert!(c.bgp.is_some());
    let same = |written: &str, shipped: &str| {
        let strip = |t: &str| {
            t.lines()
                .map(|l| l.split('#').next().unwrap_or("").trim().to_string())
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            strip(written),
            strip(shipped),
            "balancer-bgp.yaml and deploy/ differ"
        );
    };
    same(
        &written_file(&bgp, "/etc/systemd/system/clbd.service.d/bgp.conf"),
        &read("deploy/systemd/clbd.service.d/bgp.conf"),
    );
    same(
        &written_file(&bgp, "/etc/bird/bird.conf"),
        &read("deploy/bird/balancer.conf"),
    );
    let member = read("deploy/cloud-init/member.yaml");
    assert!(member.starts_with("#cloud-config\n"));
    let agent_env = written_file(&member, "/etc/clb/agent.env");
    let servers = agent_env
        .lines()
        .find_map(|l| l.strip_prefix("CLB_SERVER="))
        .expect("CLB_SERVER in agent.env");
    assert!(
        servers.split(',').all(|a| a.starts_with("https://")),
        "the agent sends its token over HTTPS only: {servers}"
    );
    assert!(agent_env.contains("CLB_CA=/etc/clb/ca.crt"));
    assert!(member.contains("clb-agent@http"));
}

/// `cloud-init schema` on a file: its exit status and what it printed.
fn cloud_init_schema(file: &Path) -> (bool, String) {
    let out = Command::new("cloud-init")
        .args(["schema", "--config-file"])
        .arg(file)
        .output()
        .expect("cloud-init is installed (scripts/test.sh installs it)");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Every recipe is valid for cloud-init itself (Debian 12's 22.4), not only
/// YAML: a wrong key type fails the boot silently on the instance.
#[test]
fn cloud_init_recipes_pass_cloud_inits_own_schema() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/cloud-init");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("deploy/cloud-init") {
        let path = entry.expect("entry").path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let (ok, text) = cloud_init_schema(&path);
        assert!(
            ok && text.contains("Valid cloud-config"),
            "{}: {text}",
            path.display()
        );
        checked += 1;
    }
    assert_eq!(
        checked, 4,
        "balancer (arp and bgp), witness and member recipes"
    );
    // The check can fail: a recipe with wrong types is refused.
    let bad = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(bad.path(), "#cloud-config\npackages: 5\n").expect("write");
    let (ok, text) = cloud_init_schema(bad.path());
    assert!(!ok && text.contains("packages"), "{text}");
}

#[test]
fn units_are_hardened_and_call_existing_flags() {
    let clbd = read("deploy/systemd/clbd.service");
    for line in [
        "User=clb",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/clb /etc/haproxy",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=\n",
        "ExecStart=/usr/bin/clbd --config /etc/clb/clbd.toml",
    ] {
        assert!(clbd.contains(line), "clbd.service lacks {line:?}");
    }
    let vip = read("deploy/systemd/clbd.service.d/linux-vip.conf");
    assert!(vip.contains("AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW"));

    let agent = read("deploy/systemd/clb-agent@.service");
    let help = Command::new(env!("CARGO_BIN_EXE_clb"))
        .args(["agent", "--help"])
        .output()
        .expect("run clb agent --help");
    let help = String::from_utf8_lossy(&help.stdout);
    let exec = agent
        .lines()
        .find(|l| l.starts_with("ExecStart="))
        .expect("ExecStart");
    for flag in exec.split_whitespace().filter(|w| w.starts_with("--")) {
        assert!(help.contains(flag), "clb agent has no {flag}:\n{help}");
    }
    for flag in ["--ttl", "--drain-timeout"] {
        assert!(help.contains(flag), "clb agent has no {flag}");
        assert!(read("deploy/cloud-init/member.yaml").contains(flag));
    }
    let sudoers = read("deploy/sudoers.d/clb");
    let rules: Vec<&str> = sudoers
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .collect();
    assert_eq!(rules.len(), 2, "one alias, one rule: {rules:?}");
    assert!(rules
        .iter()
        .all(|r| !r.contains("ALL) ALL") && !r.contains("NOPASSWD: ALL")));
}
