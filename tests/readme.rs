//! The docs' shell blocks, run as written. The README's first screen: its
//! first command (clbd on embedded defaults, running haproxy itself) and the
//! block after it (a service, a backend, a registration, a request through
//! haproxy), and its three-node block; both inside network namespaces this
//! test creates, so the fixed ports they name clash with nothing on the
//! machine, and only the build (`cargo run ... --`, `cargo build`) is replaced
//! by the binaries cargo built for this test. Then docs/operations.md's blocks
//! that can run on one machine, against a live cluster.

#[path = "common/docs.rs"]
mod docs;
#[path = "cluster/harness.rs"]
mod harness;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use harness::{ClusterExt, NodeExt};
use lab::netns::Netns;
use lab::Proc;
use std::time::{Duration, Instant};

/// The blocks' processes and their namespace, removed however the test ends.
struct Lab {
    /// Before `ns`: killed before the namespace goes.
    procs: Vec<Proc>,
    ns: Netns,
}

impl Lab {
    /// A fresh namespace named `prefix` + this process's id, loopback up.
    fn new(prefix: &str) -> Lab {
        let ns = format!("{prefix}{}", std::process::id());
        // One left by an earlier run of this process id that was killed.
        let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        let ns = Netns::new(&ns).unwrap_or_else(|e| panic!("ip netns add {ns}: {e:#}"));
        Lab { procs: vec![], ns }
    }
}

/// PATH with the binaries cargo built for this test first.
fn test_path() -> String {
    let bin = Path::new(env!("CARGO_BIN_EXE_clbd")).parent().unwrap();
    format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

fn in_ns(lab: &Lab, dir: &Path, path: &str, program: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", lab.ns.name(), program])
        .args(args)
        .current_dir(dir)
        .env("PATH", path)
        .env_remove("CLB_TOKEN_FILE")
        .env_remove("CLB_TOKEN")
        .env_remove("CLB_SERVER")
        .stdin(Stdio::null())
        .process_group(0);
    cmd
}

/// Runs a block (a command from `in_ns`) with its output in files under
/// `dir`: files, not pipes, since a process the block leaves running (a
/// backend) inherits them and would hold a pipe open. Its process group goes
/// with the lab. The exit status (`None`: still running after `within`),
/// stdout and stderr.
fn run_block(
    lab: &mut Lab,
    dir: &Path,
    mut block: Command,
    within: Duration,
) -> (Option<std::process::ExitStatus>, String, String) {
    let (out_path, err_path) = (dir.join("block.out"), dir.join("block.err"));
    block
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap());
    let child = Proc::build(&mut block)
        .group()
        .spawn()
        .expect("run the block");
    lab.procs.push(child);
    let status = lab
        .procs
        .last_mut()
        .expect("just pushed")
        .wait_within(within);
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    (status, read(&out_path), read(&err_path))
}

#[test]
fn readme_first_screen_runs_as_written() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: a network namespace needs root (CI runs as root)");
        return;
    }
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let blocks = docs::sh_blocks(&readme);
    let prefix = "cargo run --release --bin clbd -- ";
    let clbd_args: Vec<&str> = blocks[0]
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .expect("the README's first block starts clbd")
        .split_whitespace()
        .collect();
    let quick = &blocks[1];
    assert!(
        quick.contains("clb register") && quick.contains("curl"),
        "the README's second block registers a backend and sends a request: {quick}"
    );

    let mut lab = Lab::new("clbreadme");
    let dir = tempfile::tempdir().unwrap();
    let path = test_path();
    let log = std::fs::File::create(dir.path().join("clbd.log")).unwrap();
    let mut cmd = in_ns(
        &lab,
        dir.path(),
        &path,
        env!("CARGO_BIN_EXE_clbd"),
        &clbd_args,
    );
    cmd.stdout(Stdio::null()).stderr(log);
    let mut clbd = Proc::build(&mut cmd).group().spawn().expect("start clbd");

    // The reader types the next block once clbd is up: its token is written
    // and it answers.
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let ready = dir.path().join("clb-data/token").exists()
            && in_ns(&lab, dir.path(), &path, "clb", &["status"])
                .env("CLB_TOKEN_FILE", "./clb-data/token")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
        if ready {
            break;
        }
        assert!(
            Instant::now() < until,
            "clbd did not come up: {}",
            std::fs::read_to_string(dir.path().join("clbd.log")).unwrap_or_default()
        );
        assert!(clbd.try_wait().unwrap().is_none(), "clbd exited");
        std::thread::sleep(Duration::from_millis(100));
    }

    let block = in_ns(
        &lab,
        dir.path(),
        &path,
        "bash",
        &["-e", "-o", "pipefail", "-c", quick],
    );
    let (status, out, err) = run_block(&mut lab, dir.path(), block, Duration::from_secs(60));
    assert!(
        status.is_some_and(|s| s.success()),
        "the README block failed ({status:?}):\n{quick}\nstdout:\n{out}\nstderr:\n{err}\nclbd:\n{}",
        std::fs::read_to_string(dir.path().join("clbd.log")).unwrap_or_default()
    );
    assert!(
        out.contains("Directory listing for /"),
        "the request through haproxy was answered by the backend: {out}"
    );
    assert!(
        out.contains("web1"),
        "`clb members` lists the member: {out}"
    );

    // clbd stops cleanly, and takes its haproxy with it.
    clbd.signal(libc::SIGTERM);
    let stopped = clbd.wait_within(Duration::from_secs(20));
    assert!(
        stopped.is_some_and(|s| s.success()),
        "clbd stops on SIGTERM: {stopped:?}"
    );
}

/// "Three nodes on one machine", as written but for the build: the binaries
/// cargo built for this test come first on PATH. It runs in a namespace of
/// its own with a private /tmp (its files and fixed ports clash with nothing),
/// kills its own leader and must go on.
#[test]
fn readme_three_nodes_run_as_written() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: a network namespace needs root (CI runs as root)");
        return;
    }
    let block = docs::sh_block_with("README.md", "clbd --node-id $i");
    let build = [
        "cargo build --release",
        "export PATH=$PWD/target/release:$PATH",
    ];
    for line in build {
        assert!(block.contains(line), "the block no longer has {line:?}");
    }
    let script: String = block
        .lines()
        .filter(|l| !build.contains(&l.trim()))
        .map(|l| format!("{l}\n"))
        .collect();

    let mut lab = Lab::new("clbreadme3n");
    let dir = tempfile::tempdir().unwrap();
    let path = test_path();
    // `ip netns exec` gives the command a mount namespace of its own: the
    // tmpfs on /tmp is seen by the block and its nodes only. It hides this
    // test's own dir under /tmp, so the block runs from /: haproxy -c fails
    // ("Impossible to get back to initial directory") in a cwd it cannot
    // find again, and every balancer would be unfit.
    let mut block = in_ns(
        &lab,
        dir.path(),
        &path,
        "bash",
        &[
            "-c",
            "mount -t tmpfs clb-readme /tmp && cd / && exec bash -e -o pipefail -c \"$BLOCK\"",
        ],
    );
    block.env("BLOCK", &script);
    let (status, out, err) = run_block(&mut lab, dir.path(), block, Duration::from_secs(90));
    assert!(
        status.is_some_and(|s| s.success()),
        "the README block failed ({status:?}):\n{script}\nstdout:\n{out}\nstderr:\n{err}"
    );
    // The last `clb members`, after the leader died, lists all three.
    let last = out.rsplit("SERVICE").next().unwrap_or("");
    for member in ["web1", "web2", "10.0.0.3"] {
        assert!(
            last.contains(member),
            "{member} missing after the kill:\n{out}"
        );
    }
    assert!(out.contains("registered 10.0.0.3 in http"), "{out}");
}

/// docs/operations.md's blocks that run on one machine, as written, against
/// a live three-node cluster: the failover drill's graceful half and the
/// backup. (tests/packages.rs runs "Build the packages"; tests/tls.rs the
/// certificates and `clb status` of the AWS walk-through on loopback; the
/// rest needs AWS, systemd or several hosts: the rolling upgrade, the
/// data-dir recovery, the hard kill and the walk-through's `aws` steps.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_blocks_that_run_on_one_machine_run_as_written() {
    let find = |needle: &str| docs::sh_block_with("docs/operations.md", needle);
    let drill = find("clb failover                    # graceful");
    let backup = find("clb snapshot save /var/backups/clb/");

    let c = lab::Cluster::start_custom(3, &lab::FAST_TIMERS, |_| {
        ["--vip", "127.0.0.79", "--vip-hook", "true"]
            .map(String::from)
            .to_vec()
    })
    .await;
    // "leader N holds the VIP": the drill starts from a settled cluster (a
    // node leading just after start may still be handing over while its
    // haproxy side takes a first config, and a failover then answers 409).
    let leader = harness::eventually(
        Duration::from_secs(20),
        "a leader holding the VIP",
        || async {
            let l = c.leader(Duration::from_secs(20)).await;
            let v = c.node(l).view().await?;
            (v.vip.held && v.vip.healthy).then_some(l)
        },
    )
    .await;
    let servers: Vec<String> = c.nodes.values().map(|n| n.addr.clone()).collect();
    let run = |script: String| {
        let servers = servers.join(",");
        async move {
            tokio::task::spawn_blocking(move || {
                Command::new("bash")
                    .args(["-e", "-o", "pipefail", "-c", &script])
                    .env("PATH", test_path())
                    .env("CLB_SERVER", servers)
                    .env("CLB_TOKEN", harness::TOKEN)
                    .env_remove("CLB_TOKEN_FILE")
                    .stdin(Stdio::null())
                    .output()
                    .expect("bash")
            })
            .await
            .expect("join")
        }
    };

    let out = run(drill.clone()).await;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{drill}\n{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains(&format!("leadership moved from node {leader}")),
        "{text}"
    );
    assert!(text.contains("VIP now held by node"), "{text}");

    // The backup writes where the block says; a private tmpfs there keeps
    // the machine's /var/backups untouched (root only, as CI runs).
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped the backup block: a private /var/backups needs root");
        return;
    }
    let wrapped = format!(
        "mount -t tmpfs clb-backup /var/backups && mkdir -p /var/backups/clb\n{backup}\n\
         test -s /var/backups/clb/registry-$(date +%F).json"
    );
    let script = format!(
        "exec unshare --mount bash -e -o pipefail -c {}",
        shell_quote(&wrapped)
    );
    let out = run(script).await;
    assert!(
        out.status.success(),
        "{backup}\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `s` as one single-quoted shell word.
fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}
