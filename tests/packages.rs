//! The Debian packages as an operator uses them (issue #15): built and
//! installed by the docs' own blocks (docs/operations.md's "Build the
//! packages", the README's "Debian packages"), clbd started from the
//! packaged /etc/clb/clbd.toml the way its unit starts it (CI machines have
//! no systemd: the unit's ExecStart as its User), haproxy run the way
//! Debian's haproxy.service runs it with the packaged drop-in, a member
//! registered with the 2010 `clb_register`, a request through haproxy; then
//! a reinstall over a changed conffile, remove, purge, and what is left.
//!
//! It installs packages on the machine, so it runs as root only and refuses
//! to touch a machine where clb-server is already installed. The processes
//! run in a network namespace of the test's own, so the packaged config's
//! fixed ports (8090, 8404, 8080 below) clash with nothing; the files it
//! touches (/etc/haproxy, /run/haproxy*) are the machine's, restored at the
//! end.

#[path = "common/docs.rs"]
mod docs;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use lab::netns::Netns;
use lab::Proc;

const SERVER: &str = "clb-server";
const CLIENT: &str = "clb-client";

/// Runs a shell block of the docs from the repository's root, as a user
/// would paste it (stopping at the first failing command).
fn doc_block(what: &str, script: &str) {
    let out = Command::new("bash")
        .args(["-e", "-o", "pipefail", "-c", script])
        .current_dir(root())
        .env("DEBIAN_FRONTEND", "noninteractive")
        .output()
        .expect("bash");
    // The reason is at the end, after cargo's "Compiling" lines: show that.
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(20).collect();
    assert!(
        out.status.success(),
        "{what} failed:\n{script}\nthe end of its stderr:\n{}",
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn run(program: &str, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e}"))
}

/// Runs and insists on success, printing what it said otherwise.
fn ok(program: &str, args: &[&str]) -> String {
    let out = run(program, args);
    assert!(
        out.status.success(),
        "{program} {}: {}\n{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn known(package: &str) -> bool {
    run("dpkg-query", &["-W", package]).status.success()
}

fn owner_mode(path: &str) -> (u32, u32, u32) {
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    (m.uid(), m.gid(), m.mode() & 0o7777)
}

fn uid_gid(user: &str) -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        ok("id", &[flag, user])
            .trim()
            .parse()
            .expect("a numeric id")
    };
    (id("-u"), id("-g"))
}

fn poll<T>(within: Duration, what: &str, f: impl FnMut() -> Option<T>) -> T {
    lab::wait::poll_every(within, Duration::from_millis(50), what, f)
        .unwrap_or_else(|e| panic!("{e}"))
}

/// The value of `Key=` in a systemd unit file (the first one).
fn unit_value(unit: &str, key: &str) -> String {
    let text = std::fs::read_to_string(unit).unwrap_or_else(|e| panic!("{unit}: {e}"));
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{unit} has no {key}="))
        .to_string()
}

/// Everything the test started or changed, undone however it ends.
struct Machine {
    ns: String,
    netns: Option<Netns>,
    children: Vec<Proc>,
    haproxy_cfg: Option<(Vec<u8>, (u32, u32, u32))>,
}

impl Machine {
    fn spawn(&mut self, program: &str, args: &[&str], log: &Path) -> u32 {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns, program]).args(args);
        let child = Proc::build(&mut cmd)
            .log(log)
            .truncate()
            .group()
            .spawn()
            .unwrap_or_else(|e| panic!("{program}: {e}"));
        let pid = child.id();
        self.children.push(child);
        pid
    }

    fn in_ns(&self, program: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.ns, program])
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("{program}: {e}"))
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        // Dropping kills each process group, then the namespace goes.
        self.children.clear();
        self.netns = None;
        for f in [
            "/run/haproxy.pid",
            "/run/haproxy-master.sock",
            "/run/haproxy/clb-admin.sock",
        ] {
            let _ = std::fs::remove_file(f);
        }
        if known(SERVER) || known(CLIENT) {
            let _ = run("apt-get", &["purge", "-y", "-q", SERVER, CLIENT]);
        }
        if let Some((text, (uid, gid, mode))) = &self.haproxy_cfg {
            let _ = std::fs::write("/etc/haproxy/haproxy.cfg", text);
            let _ = std::os::unix::fs::chown("/etc/haproxy/haproxy.cfg", Some(*uid), Some(*gid));
            use std::os::unix::fs::PermissionsExt;
            let _ = std::fs::set_permissions(
                "/etc/haproxy/haproxy.cfg",
                std::fs::Permissions::from_mode(*mode),
            );
        }
    }
}

#[test]
fn packages_install_run_keep_a_changed_conffile_and_purge_clean() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED packages: installing packages needs root (CI runs as root)");
        return;
    }
    assert!(
        !known(SERVER) && !known(CLIENT),
        "{SERVER} or {CLIENT} is already on this machine: this test installs and purges them"
    );
    assert!(
        Command::new("cargo-deb").arg("--version").output().is_ok(),
        "cargo-deb is missing: cargo install cargo-deb --version 3.8.0 --locked (scripts/test.sh does)"
    );

    // The docs' blocks, as written: docs/operations.md's "Build the
    // packages", then the README's, which builds and installs. The README's
    // install names the packages by a glob, so only this build's may lie
    // there.
    if let Ok(dir) = std::fs::read_dir(root().join("target/debian")) {
        for e in dir.flatten() {
            if e.path().extension().is_some_and(|x| x == "deb") {
                std::fs::remove_file(e.path()).expect("remove an old package");
            }
        }
    }
    let build = docs::sh_block_with("docs/operations.md", "bash scripts/deb.sh");
    doc_block("docs/operations.md, Build the packages", &build);
    let debs: Vec<PathBuf> = std::fs::read_dir(root().join("target/debian"))
        .expect("target/debian")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    let version = |p: &Path| ok("dpkg-deb", &["-f", &p.display().to_string(), "Version"]);
    let find = |name: &str| -> PathBuf {
        let mut matching: Vec<&PathBuf> = debs
            .iter()
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{name}_")) && n.ends_with(".deb"))
            })
            .collect();
        // Several versions may lie there: the one just built is newest.
        matching.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
        (*matching
            .last()
            .unwrap_or_else(|| panic!("no {name} package in {debs:?}")))
        .clone()
    };
    let (server, client) = (find(SERVER), find(CLIENT));
    let v = version(&server).trim().to_string();
    assert_eq!(version(&client).trim(), v);
    // The server needs the client (for `clb`) at its own version.
    let depends = ok(
        "dpkg-deb",
        &["-f", &server.display().to_string(), "Depends"],
    );
    assert!(
        depends.contains(&format!("{CLIENT} (= {v})")),
        "Depends does not name {CLIENT} (= {v}): {depends}"
    );
    assert!(depends.contains("haproxy"), "{depends}");

    let pid = std::process::id();
    let mut m = Machine {
        ns: format!("clbpkg{pid}"),
        netns: None,
        children: Vec::new(),
        haproxy_cfg: None,
    };
    // apt pulls haproxy in: it was installed by scripts/test.sh already, but
    // keep its config to put back.
    if let Ok(text) = std::fs::read("/etc/haproxy/haproxy.cfg") {
        m.haproxy_cfg = Some((text, owner_mode("/etc/haproxy/haproxy.cfg")));
    }
    let install = docs::sh_block_with("README.md", "apt-get install -y ./target/debian/");
    doc_block("README.md, Debian packages", &install);
    assert!(
        known(SERVER) && known(CLIENT),
        "the README's block installed both"
    );
    let server_s = server.display().to_string();

    // What the package set up.
    let (clb_uid, clb_gid) = uid_gid("clb");
    assert_eq!(owner_mode("/var/lib/clb"), (clb_uid, clb_gid, 0o700));
    assert_eq!(owner_mode("/etc/clb"), (0, clb_gid, 0o750));
    assert_eq!(owner_mode("/etc/clb/clbd.toml"), (0, clb_gid, 0o640));
    assert_eq!(owner_mode("/etc/haproxy"), (0, clb_gid, 0o775));
    let conffiles = ok("dpkg-query", &["-W", "-f=${Conffiles}", SERVER]);
    assert!(conffiles.contains("/etc/clb/clbd.toml"), "{conffiles}");
    for f in [
        "/usr/bin/clbd",
        "/usr/bin/clb",
        "/usr/bin/clb_register",
        "/usr/bin/clb_unregister",
        "/var/lib/clb-server/templates/haproxy.cfg.j2",
        "/usr/lib/systemd/system/clbd.service",
        "/usr/lib/systemd/system/clb-agent@.service",
        "/usr/lib/systemd/system/haproxy.service.d/clb.conf",
        "/usr/lib/sysusers.d/clb-server.conf",
        "/usr/share/clb-server/hooks/aws-eip.sh",
    ] {
        assert!(Path::new(f).exists(), "{f} not installed");
    }
    if Path::new("/usr/bin/systemd-analyze").exists() {
        ok(
            "systemd-analyze",
            &[
                "verify",
                "/usr/lib/systemd/system/clbd.service",
                "/usr/lib/systemd/system/clb-agent@.service",
            ],
        );
    }

    // haproxy as Debian's haproxy.service starts it, with the drop-in's
    // EXTRAOPTS (the master socket for group clb) and its runtime dir.
    let dropin = "/usr/lib/systemd/system/haproxy.service.d/clb.conf";
    let extra = unit_value(dropin, "Environment");
    let extra = extra
        .trim_matches('"')
        .strip_prefix("EXTRAOPTS=")
        .expect("the drop-in sets EXTRAOPTS")
        .to_string();
    m.netns = Some(Netns::new(&m.ns).unwrap_or_else(|e| panic!("{e:#}")));
    std::fs::create_dir_all("/run/haproxy").expect("/run/haproxy");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut haproxy_args = vec![
        "-Ws",
        "-f",
        "/etc/haproxy/haproxy.cfg",
        "-p",
        "/run/haproxy.pid",
    ];
    haproxy_args.extend(extra.split_whitespace());
    m.spawn(
        "/usr/sbin/haproxy",
        &haproxy_args,
        &dir.path().join("haproxy.log"),
    );

    // clbd as its unit runs it: ExecStart as User, with the unit's Environment.
    let unit = "/usr/lib/systemd/system/clbd.service";
    assert_eq!(unit_value(unit, "User"), "clb");
    let exec = unit_value(unit, "ExecStart");
    let exec: Vec<&str> = exec.split_whitespace().collect();
    assert_eq!(
        exec[..],
        ["/usr/bin/clbd", "--config", "/etc/clb/clbd.toml"]
    );
    let mut clbd = vec![
        "-u",
        "clb",
        "--",
        "env",
        "HOME=/var/lib/clb",
        "RUST_LOG=info",
    ];
    clbd.extend(&exec);
    let clbd_log = dir.path().join("clbd.log");
    m.spawn("runuser", &clbd, &clbd_log);
    let log = || std::fs::read_to_string(&clbd_log).unwrap_or_default();
    // With no token_file configured, clbd makes the first admin token.
    let token = poll(Duration::from_secs(30), "the generated admin token", || {
        std::fs::read_to_string("/var/lib/clb/token")
            .ok()
            .map(|t| t.trim().to_string())
            .filter(|t| !t.is_empty())
    });

    // A backend, a service, a member the 2010 way, a request through haproxy.
    let site = dir.path().join("site");
    std::fs::create_dir_all(&site).expect("site");
    std::fs::write(site.join("index.html"), "served by the packaged clb\n").expect("index");
    let site_s = site.display().to_string();
    m.spawn(
        "python3",
        &[
            "-m",
            "http.server",
            "9000",
            "--bind",
            "127.0.0.1",
            "--directory",
            &site_s,
        ],
        &dir.path().join("backend.log"),
    );
    let as_admin = [("CLB_TOKEN", token.as_str())];
    poll(Duration::from_secs(30), "the service definition", || {
        let out = m.in_ns(
            "clb",
            &[
                "service",
                "set",
                "web",
                "--port",
                "8080",
                "--member-port",
                "9000",
                "--mode",
                "http",
            ],
            &as_admin,
        );
        out.status.success().then_some(())
    });
    let reg = m.in_ns("clb_register", &[&token, "127.0.0.1", "web"], &[]);
    assert!(
        reg.status.success(),
        "clb_register: {}{}",
        String::from_utf8_lossy(&reg.stdout),
        String::from_utf8_lossy(&reg.stderr)
    );
    let body = poll(Duration::from_secs(30), "a request through haproxy", || {
        let out = m.in_ns(
            "curl",
            &["-fsS", "--max-time", "2", "http://127.0.0.1:8080/"],
            &[],
        );
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    });
    assert_eq!(body, "served by the packaged clb\n", "{}", log());
    let cfg = std::fs::read_to_string("/etc/haproxy/haproxy.cfg").expect("haproxy.cfg");
    assert!(
        cfg.contains("stats socket /run/haproxy/clb-admin.sock mode 660 group clb level admin"),
        "{cfg}"
    );
    // Member changes went through the runtime API as user clb (group clb on
    // the admin socket), not only reloads.
    let unreg = m.in_ns("clb_unregister", &[&token, "127.0.0.1", "web"], &[]);
    assert!(
        unreg.status.success(),
        "{}",
        String::from_utf8_lossy(&unreg.stderr)
    );
    poll(
        Duration::from_secs(30),
        "the member out of rotation",
        || {
            let out = m.in_ns(
                "curl",
                &[
                    "-sS",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}",
                    "--max-time",
                    "2",
                    "http://127.0.0.1:8080/",
                ],
                &[],
            );
            (String::from_utf8_lossy(&out.stdout) == "503").then_some(())
        },
    );
    assert!(!log().contains("Permission denied"), "{}", log());
    for c in &mut m.children {
        c.signal_all(libc::SIGTERM);
        let _ = c.wait();
    }
    m.children.clear();

    // A changed conffile survives a reinstall (an upgrade keeps it the same way).
    let mut conf = std::fs::read_to_string("/etc/clb/clbd.toml").expect("conffile");
    conf.push_str("# the operator's change\n");
    std::fs::write("/etc/clb/clbd.toml", &conf).expect("change the conffile");
    ok(
        "apt-get",
        &["install", "-y", "-q", "--reinstall", &server_s],
    );
    assert_eq!(std::fs::read_to_string("/etc/clb/clbd.toml").unwrap(), conf);

    // Remove: programs go, configuration and data stay.
    ok("apt-get", &["remove", "-y", "-q", SERVER, CLIENT]);
    assert!(!Path::new("/usr/bin/clbd").exists());
    assert!(!Path::new("/usr/bin/clb").exists());
    assert_eq!(std::fs::read_to_string("/etc/clb/clbd.toml").unwrap(), conf);
    assert!(
        Path::new("/var/lib/clb/db").exists(),
        "remove deleted the data dir"
    );

    // Purge: nothing of clb is left but its user and the rendered haproxy.cfg.
    ok("apt-get", &["purge", "-y", "-q", SERVER, CLIENT]);
    for gone in [
        "/etc/clb",
        "/var/lib/clb",
        "/var/lib/clb-server",
        "/etc/haproxy/haproxy.cfg.last-good",
        "/etc/haproxy/haproxy.cfg.services",
        "/usr/lib/systemd/system/haproxy.service.d/clb.conf",
    ] {
        assert!(!Path::new(gone).exists(), "{gone} left after purge");
    }
    assert_eq!(owner_mode("/etc/haproxy"), (0, 0, 0o755));
    assert_eq!(owner_mode("/etc/haproxy/haproxy.cfg").0, 0);
    let overrides = ok("dpkg-statoverride", &["--list"]);
    assert!(!overrides.contains("/etc/haproxy"), "{overrides}");
}
