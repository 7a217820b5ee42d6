//! A network-namespace lab: hosts in their own namespaces, plugged into a
//! bridge that lives in a separate "switch" namespace (nothing is added to
//! the machine's own namespace), processes spawned inside them and killed by
//! pid, links cut and restored, and the traffic helpers the drills use (a
//! backend, a client, a VIP sampler).
//!
//! Shared by the partition test (`tests/cluster/test_partition.rs`) and the
//! failover benchmark (`benches/failover.rs`, which includes this file by
//! path), so nothing here panics on a failed step: errors are returned, and
//! `Drop` only logs. Every namespace and process group the lab creates is
//! also recorded process-wide, so a Ctrl-C handler can remove them with
//! [`cleanup_all`].
//!
//! Sockets are opened inside a namespace by a thread that `setns(2)`-es into
//! it; a socket stays in the namespace it was created in, and threads spawned
//! by such a thread start in the same namespace.

#![allow(dead_code)]

use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};

/// Process groups and namespaces alive anywhere in this process.
static LIVE: Mutex<Live> = Mutex::new(Live {
    groups: Vec::new(),
    namespaces: Vec::new(),
    dirs: Vec::new(),
});

struct Live {
    groups: Vec<i32>,
    namespaces: Vec<String>,
    /// Lab temp dirs: an exit from a signal handler runs no `Drop`.
    dirs: Vec<PathBuf>,
}

/// Kills every process group and deletes every namespace any lab of this
/// process still has: for a Ctrl-C handler, which cannot reach the labs.
pub fn cleanup_all() {
    let (groups, namespaces, dirs) = match LIVE.lock() {
        Ok(mut l) => (
            std::mem::take(&mut l.groups),
            std::mem::take(&mut l.namespaces),
            std::mem::take(&mut l.dirs),
        ),
        Err(_) => return,
    };
    for pgid in groups {
        // SAFETY: kill(2) on a process group we created (process_group(0)).
        unsafe { libc::kill(-pgid, libc::SIGKILL) };
    }
    for ns in namespaces.iter().rev() {
        let _ = Command::new("ip").args(["netns", "del", ns]).output();
    }
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
}

fn forget_group(pgid: i32) {
    if let Ok(mut l) = LIVE.lock() {
        l.groups.retain(|g| *g != pgid);
    }
}

/// Runs `f` on a fresh thread inside network namespace `ns`.
pub fn in_ns<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            enter_ns(ns)?;
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow!("thread in namespace {ns} panicked"))?
    })
}

/// Moves the calling thread into namespace `ns`.
pub fn enter_ns(ns: &str) -> Result<()> {
    let file =
        File::open(format!("/var/run/netns/{ns}")).with_context(|| format!("open netns {ns}"))?;
    // SAFETY: setns(2) on a namespace fd we own; affects this thread only.
    let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        bail!("setns {ns}: {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `ip args`; an error carries its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip").args(args).output().context("run ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A free TCP port inside `ns` (bind port 0 there, read it, release it).
pub fn free_port_in(ns: &str, ip: Ipv4Addr) -> Result<u16> {
    in_ns(ns, || -> Result<u16> {
        let l = TcpListener::bind((ip, 0)).context("bind port 0 in namespace")?;
        Ok(l.local_addr()?.port())
    })?
}

/// True when the calling thread's namespace has `addr` on any interface.
pub fn has_addr(addr: Ipv4Addr) -> bool {
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a list we free below; we only read it.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return false;
    }
    let mut found = false;
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr of the family it names.
            let family = i32::from(unsafe { (*ifa.ifa_addr).sa_family });
            if family == libc::AF_INET {
                // SAFETY: an AF_INET sockaddr is a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                if Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)) == addr {
                    found = true;
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: the list from getifaddrs above, freed once.
    unsafe { libc::freeifaddrs(ifap) };
    found
}

/// Sets interface `name` of the calling thread's namespace up or down with
/// one ioctl: microseconds, where `ip link set` takes milliseconds.
fn set_if_up(name: &str, up: bool) -> Result<()> {
    if name.len() >= libc::IFNAMSIZ {
        bail!("interface name {name:?} too long");
    }
    // SAFETY: a zeroed ifreq is a valid value; we fill the name below.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: plain socket(2); closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        bail!("socket: {}", std::io::Error::last_os_error());
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the flags field of
    // the ifreq we own; fd is the socket opened above.
    let rc = unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) != 0 {
            -1
        } else {
            let flags = req.ifr_ifru.ifru_flags;
            let up_flag = libc::IFF_UP as libc::c_short;
            req.ifr_ifru.ifru_flags = if up {
                flags | up_flag
            } else {
                flags & !up_flag
            };
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &req)
        }
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing the socket opened above, once.
    unsafe { libc::close(fd) };
    if rc != 0 {
        bail!("set {name} {}: {err}", if up { "up" } else { "down" });
    }
    Ok(())
}

/// A blocking HTTP/1.1 request from inside `ns`, with an optional bearer
/// token; `(status, body)`, or `None` on any failure or timeout.
pub fn http(
    ns: &str,
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
    timeout: Duration,
) -> Option<(u16, String)> {
    in_ns(ns, || http_here(addr, method, path, token, body, timeout)).ok()?
}

/// [`http`] from the calling thread's namespace (for a thread that entered
/// one with [`enter_ns`] and sends many requests).
pub fn http_here(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
    timeout: Duration,
) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    s.set_write_timeout(Some(timeout)).ok()?;
    let body = body.unwrap_or("");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let (_, body) = text.split_once("\r\n\r\n")?;
    Some((status, body.to_string()))
}

/// Polls `f` every `every` until it returns `Some`; an error at the deadline.
pub fn poll<T>(
    within: Duration,
    every: Duration,
    what: &str,
    mut f: impl FnMut() -> Option<T>,
) -> Result<T> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        std::thread::sleep(every);
    }
}

/// One host of the lab: its namespace, address and switch port.
#[derive(Clone, Debug)]
pub struct Host {
    pub name: String,
    pub ns: String,
    pub ip: Ipv4Addr,
    /// The host's veth end in the switch namespace; down unplugs the host.
    pub port: String,
}

/// A process group we spawned.
struct Proc {
    label: String,
    child: Child,
}

/// Namespaces on one bridge, the processes started in them and a temp dir
/// for their files; everything is removed in `Drop`.
pub struct Lab {
    prefix: String,
    subnet: [u8; 3],
    switch: String,
    namespaces: Vec<String>,
    procs: Vec<Proc>,
    dir: tempfile::TempDir,
    /// Set on drop: background threads (backend, client, sampler) stop.
    pub stop: Arc<AtomicBool>,
}

impl Lab {
    /// A switch namespace `PREFIX-sw` with bridge `br0`, for hosts in
    /// `A.B.C.0/24`. `prefix` must be short (veth names are at most 15 bytes).
    pub fn new(prefix: &str, subnet: [u8; 3]) -> Result<Lab> {
        let mut lab = Lab {
            prefix: prefix.to_string(),
            subnet,
            switch: format!("{prefix}-sw"),
            namespaces: Vec::new(),
            procs: Vec::new(),
            dir: tempfile::Builder::new()
                .prefix(&format!("{prefix}-"))
                .tempdir()
                .context("tempdir")?,
            stop: Arc::new(AtomicBool::new(false)),
        };
        if let Ok(mut l) = LIVE.lock() {
            l.dirs.push(lab.dir.path().to_path_buf());
        }
        let sw = lab.switch.clone();
        lab.add_ns(&sw)?;
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        Ok(lab)
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// An address in the lab's /24.
    pub fn addr(&self, last: u8) -> Ipv4Addr {
        let [a, b, c] = self.subnet;
        Ipv4Addr::new(a, b, c, last)
    }

    fn add_ns(&mut self, name: &str) -> Result<()> {
        ip(&["netns", "add", name])?;
        self.namespaces.push(name.to_string());
        if let Ok(mut l) = LIVE.lock() {
            l.namespaces.push(name.to_string());
        }
        ip(&["-n", name, "link", "set", "lo", "up"])
    }

    fn del_ns(&mut self, name: &str) -> Result<()> {
        self.namespaces.retain(|n| n != name);
        if let Ok(mut l) = LIVE.lock() {
            l.namespaces.retain(|n| n != name);
        }
        ip(&["netns", "del", name])
    }

    /// A new host `name` (namespace `PREFIX-name`) at `.last`, plugged into
    /// the bridge by a veth pair: `eth0` inside, `p<name>` on the switch.
    pub fn add_host(&mut self, name: &str, last: u8) -> Result<Host> {
        let host = Host {
            name: name.to_string(),
            ns: format!("{}-{name}", self.prefix),
            ip: self.addr(last),
            port: format!("p{name}"),
        };
        self.add_ns(&host.ns)?;
        let sw = self.switch.as_str();
        ip(&[
            "-n", sw, "link", "add", &host.port, "type", "veth", "peer", "name", "eth0", "netns",
            &host.ns,
        ])?;
        ip(&["-n", sw, "link", "set", &host.port, "master", "br0"])?;
        ip(&["-n", sw, "link", "set", &host.port, "up"])?;
        let cidr = format!("{}/24", host.ip);
        ip(&["-n", &host.ns, "addr", "add", &cidr, "dev", "eth0"])?;
        ip(&["-n", &host.ns, "link", "set", "eth0", "up"])?;
        Ok(host)
    }

    /// Kills the processes started in `host`'s namespace and deletes it
    /// (its veth pair goes with it).
    pub fn remove_host(&mut self, host: &Host) -> Result<()> {
        let labels: Vec<String> = self
            .procs
            .iter()
            .filter(|p| p.label.starts_with(&format!("{}/", host.ns)))
            .map(|p| p.label.clone())
            .collect();
        for l in labels {
            self.kill(&l);
        }
        self.del_ns(&host.ns)
    }

    /// Plugs (`up`) or unplugs `host` at its switch port. The host's own
    /// `eth0` loses carrier, as when a cable is pulled.
    pub fn set_link(&self, host: &Host, up: bool) -> Result<()> {
        let port = host.port.clone();
        in_ns(&self.switch, || set_if_up(&port, up))?
    }

    /// Spawns `program args` inside `ns` in a new process group, stdout and
    /// stderr appended to `log(label)`. Returns the pid (= process group id).
    pub fn spawn(
        &mut self,
        label: &str,
        ns: &str,
        program: &str,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Result<u32> {
        if self.procs.iter().any(|p| p.label == label) {
            bail!("{label} is already running");
        }
        let out = File::options()
            .create(true)
            .append(true)
            .open(self.log(label))
            .context("log file")?;
        // `ip netns exec` execs the program in place, so the pid we get is
        // the program's, and the group holds everything it forks.
        let child = Command::new("ip")
            .args(["netns", "exec", ns, program])
            .args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone().context("log")?)
            .stderr(out)
            .process_group(0)
            .spawn()
            .with_context(|| format!("spawn {program} in {ns}"))?;
        let pid = child.id();
        if let Ok(mut l) = LIVE.lock() {
            l.groups.push(pid as i32);
        }
        self.procs.push(Proc {
            label: label.to_string(),
            child,
        });
        Ok(pid)
    }

    /// The pid of `label`, if we started it and have not killed it.
    pub fn pid(&self, label: &str) -> Option<u32> {
        self.procs
            .iter()
            .find(|p| p.label == label)
            .map(|p| p.child.id())
    }

    /// True while `label` runs (false once it exited by itself).
    pub fn running(&mut self, label: &str) -> bool {
        self.procs
            .iter_mut()
            .find(|p| p.label == label)
            .is_some_and(|p| matches!(p.child.try_wait(), Ok(None)))
    }

    /// SIGKILLs the process group of `label` (the program and everything it
    /// forked: clbd's hooks, haproxy's workers, keepalived's children) and
    /// reaps it. False if there was no such process.
    pub fn kill(&mut self, label: &str) -> bool {
        self.kill_all_of(&[label]) == 1
    }

    /// Sends SIGKILL to the process groups of `labels` without reaping
    /// them (they stay listed until [`Lab::kill_all_of`]).
    pub fn sigkill_now(&self, labels: &[&str]) {
        for p in self
            .procs
            .iter()
            .filter(|p| labels.contains(&p.label.as_str()))
        {
            // SAFETY: kill(2) on a process group we spawned and have not
            // reaped, so its id cannot have been reused.
            unsafe { libc::kill(-(p.child.id() as i32), libc::SIGKILL) };
        }
    }

    /// SIGKILLs the process groups of all `labels` first and reaps them
    /// after, so they die at (nearly) one instant. Returns how many it found.
    pub fn kill_all_of(&mut self, labels: &[&str]) -> usize {
        let mut dying = Vec::new();
        for label in labels {
            if let Some(i) = self.procs.iter().position(|p| p.label == *label) {
                let p = self.procs.remove(i);
                let pgid = p.child.id() as i32;
                // SAFETY: kill(2) on the process group of a child we spawned
                // with process_group(0); SIGCONT first, a stopped process
                // cannot die.
                unsafe {
                    libc::kill(-pgid, libc::SIGCONT);
                    libc::kill(-pgid, libc::SIGKILL);
                }
                dying.push(p);
            }
        }
        let n = dying.len();
        for mut p in dying {
            let _ = p.child.wait();
            forget_group(p.child.id() as i32);
        }
        n
    }

    /// SIGTERM to `label` alone (not its group: the program shuts its own
    /// children down) and waits up to `within` for it to exit, then
    /// SIGKILLs what is left. Returns the exit status if it exited by itself.
    pub fn terminate(&mut self, label: &str, within: Duration) -> Option<std::process::ExitStatus> {
        let i = self.procs.iter().position(|p| p.label == label)?;
        let mut p = self.procs.remove(i);
        let pid = p.child.id() as i32;
        // SAFETY: kill(2) on a child we spawned and have not reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + within;
        let status = loop {
            match p.child.try_wait() {
                Ok(Some(s)) => break Some(s),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => break None,
            }
        };
        // SAFETY: as above, on its process group.
        unsafe { libc::kill(-pid, libc::SIGKILL) };
        let _ = p.child.wait();
        forget_group(pid);
        status
    }

    /// The log file of `label`.
    pub fn log(&self, label: &str) -> PathBuf {
        self.dir
            .path()
            .join(format!("{}.log", label.replace('/', "_")))
    }

    /// The last `n` lines of `label`'s log.
    pub fn log_tail(&self, label: &str, n: usize) -> String {
        let text = std::fs::read_to_string(self.log(label)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Labels of the processes still running.
    pub fn labels(&self) -> Vec<String> {
        self.procs.iter().map(|p| p.label.clone()).collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for l in self.labels() {
            self.kill(&l);
        }
        for ns in self.namespaces.clone().iter().rev() {
            if let Err(e) = self.del_ns(ns) {
                eprintln!("netns: {e}");
            }
        }
        if let Ok(mut l) = LIVE.lock() {
            l.dirs.retain(|d| d != self.dir.path());
        }
        // CLB_LAB_KEEP=DIR: a copy of the lab's logs and data dirs, to look
        // into a slow drill afterwards.
        if let Some(keep) = std::env::var_os("CLB_LAB_KEEP") {
            let copied = Command::new("cp")
                .arg("-a")
                .arg(self.dir.path())
                .arg(&keep)
                .status();
            eprintln!("lab copied to {}: {copied:?}", keep.to_string_lossy());
        }
    }
}

/// Spawns a thread that calls `step` until it returns false, `stop` is set,
/// or `max` has passed.
fn bounded_loop(
    ns: Option<String>,
    stop: Arc<AtomicBool>,
    max: Duration,
    mut step: impl FnMut() -> bool + Send + 'static,
) {
    std::thread::spawn(move || {
        if let Some(ns) = ns {
            if let Err(e) = enter_ns(&ns) {
                eprintln!("netns: {e}");
                return;
            }
        }
        let deadline = Instant::now() + max;
        while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            if !step() {
                return;
            }
        }
    });
}

/// An HTTP backend answering `200 name` on `addr` inside `ns`, until `stop`
/// or `max`.
pub fn backend(
    ns: &str,
    addr: SocketAddr,
    name: &str,
    stop: Arc<AtomicBool>,
    max: Duration,
) -> Result<()> {
    let listener = in_ns(ns, || TcpListener::bind(addr))?.context("bind backend")?;
    listener.set_nonblocking(true)?;
    let name = name.to_string();
    bounded_loop(None, stop, max, move || {
        match listener.accept() {
            // A thread per connection: a half-open connection from a killed
            // balancer (its link cut, no FIN ever comes) must not hold up
            // the answers to the live one.
            Ok((s, _)) => {
                let name = name.clone();
                std::thread::spawn(move || answer(s, &name));
            }
            Err(_) => std::thread::sleep(Duration::from_millis(1)),
        }
        true
    });
    Ok(())
}

fn answer(mut s: TcpStream, name: &str) {
    let _ = s.set_nonblocking(false);
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 2048];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    if got.starts_with(b"GET /slow ") {
        std::thread::sleep(SLOW);
    }
    let _ = write!(
        s,
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{name}",
        name.len()
    );
}

/// One client request: when it started and ended, and the backend that
/// answered (if it succeeded).
#[derive(Clone, Debug)]
pub struct Shot {
    pub start: Instant,
    pub at: Instant,
    pub served_by: Option<String>,
    /// Why it failed: the phase and the OS error (`connect: Connection
    /// refused (os error 111)`, `connect: timed out`, `read: ...`, `status: ...`).
    pub error: Option<String>,
}

/// How a [`client`] sends.
#[derive(Clone, Copy, Debug)]
pub struct ClientOpts {
    /// Concurrent workers; each waits `workers × interval` after a success,
    /// so the total rate is one request per `interval` while all goes well,
    /// and a failed connect is retried at once by the same worker.
    pub workers: u32,
    pub interval: Duration,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    /// `/`, or `/slow`: the backend answers after [`SLOW`], so a request
    /// is open on the balancer almost all the time.
    pub path: &'static str,
}

/// How long the backend takes to answer `GET /slow`.
pub const SLOW: Duration = Duration::from_millis(300);

/// Sends `GET /` to `target` from inside `ns` until `stop` or `max`.
pub fn client(
    ns: &str,
    target: SocketAddr,
    opts: ClientOpts,
    stop: Arc<AtomicBool>,
    max: Duration,
) -> Arc<Mutex<Vec<Shot>>> {
    let shots = Arc::new(Mutex::new(Vec::new()));
    for w in 0..opts.workers.max(1) {
        let out = shots.clone();
        let pause = opts.interval * opts.workers.max(1);
        // Stagger the workers so requests spread over the interval.
        let mut first = true;
        bounded_loop(Some(ns.to_string()), stop.clone(), max, move || {
            if first {
                first = false;
                std::thread::sleep(opts.interval * w);
            }
            let start = Instant::now();
            let answer = one_request(target, opts);
            let ok = answer.is_ok();
            if let Ok(mut s) = out.lock() {
                let (served_by, error) = match answer {
                    Ok(by) => (Some(by), None),
                    Err(e) => (None, Some(e)),
                };
                s.push(Shot {
                    start,
                    at: Instant::now(),
                    served_by,
                    error,
                });
            }
            // A fast failure (refused, unreachable) must not spin.
            std::thread::sleep(if ok { pause } else { opts.interval });
            true
        });
    }
    shots
}

/// One `GET /`: the backend's answer, or the phase that failed and why.
fn one_request(target: SocketAddr, opts: ClientOpts) -> std::result::Result<String, String> {
    fn phase(p: &'static str) -> impl Fn(std::io::Error) -> String {
        move |e| format!("{p}: {e}")
    }
    let mut s =
        TcpStream::connect_timeout(&target, opts.connect_timeout).map_err(phase("connect"))?;
    s.set_read_timeout(Some(opts.read_timeout))
        .map_err(phase("setup"))?;
    s.set_write_timeout(Some(opts.read_timeout))
        .map_err(phase("setup"))?;
    s.write_all(format!("GET {} HTTP/1.0\r\nHost: vip\r\n\r\n", opts.path).as_bytes())
        .map_err(phase("write"))?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(phase("read"))?;
    if !text.starts_with("HTTP/1.0 200") && !text.starts_with("HTTP/1.1 200") {
        let first = text.lines().next().unwrap_or("(nothing)");
        return Err(format!("status: {first}"));
    }
    text.split_once("\r\n\r\n")
        .map(|(_, body)| body.trim().to_string())
        .ok_or_else(|| "status: no body".to_string())
}

/// One sample of where an address is configured: `held[i]` for the i-th
/// namespace given to [`sampler`].
#[derive(Clone, Debug)]
pub struct Sample {
    pub at: Instant,
    pub held: Vec<bool>,
}

impl Sample {
    pub fn holders(&self) -> usize {
        self.held.iter().filter(|h| **h).count()
    }
}

/// Checks every namespace in `namespaces` for `addr` every `period` until
/// `stop` or `max`.
pub fn sampler(
    namespaces: Vec<String>,
    addr: Ipv4Addr,
    period: Duration,
    stop: Arc<AtomicBool>,
    max: Duration,
) -> Arc<Mutex<Vec<Sample>>> {
    let samples = Arc::new(Mutex::new(Vec::new()));
    let out = samples.clone();
    bounded_loop(None, stop, max, move || {
        let mut held = Vec::with_capacity(namespaces.len());
        for ns in &namespaces {
            if let Err(e) = enter_ns(ns) {
                eprintln!("netns sampler: {e}");
                return false;
            }
            held.push(has_addr(addr));
        }
        if let Ok(mut s) = out.lock() {
            s.push(Sample {
                at: Instant::now(),
                held,
            });
        }
        std::thread::sleep(period);
        true
    });
    samples
}

/// Longest time without a successful request in `[from, to]`, and how
/// many requests failed in it.
pub fn longest_gap(shots: &[Shot], from: Instant, to: Instant) -> (Duration, usize) {
    let mut last = from;
    let mut gap = Duration::ZERO;
    let mut failed = 0;
    for s in shots.iter().filter(|s| s.at >= from && s.at <= to) {
        if s.served_by.is_some() {
            gap = gap.max(s.at - last);
            last = s.at;
        } else {
            failed += 1;
        }
    }
    (gap.max(to.saturating_duration_since(last)), failed)
}

/// Successful requests that started after `since`, served by `by` when given.
pub fn served_since(shots: &Mutex<Vec<Shot>>, since: Instant, by: Option<&str>) -> usize {
    shots
        .lock()
        .map(|s| {
            s.iter()
                .filter(|s| s.start > since)
                .filter(|s| match (&s.served_by, by) {
                    (Some(got), Some(want)) => got == want,
                    (Some(_), None) => true,
                    (None, _) => false,
                })
                .count()
        })
        .unwrap_or(0)
}

/// The end of the first successful request that started after `since`.
pub fn first_success_after(shots: &Mutex<Vec<Shot>>, since: Instant) -> Option<Instant> {
    let s = shots.lock().ok()?;
    s.iter()
        .filter(|s| s.start > since && s.served_by.is_some())
        .map(|s| s.at)
        .min()
}
