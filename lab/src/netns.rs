//! A network-namespace lab: hosts in their own namespaces, plugged into a
//! bridge that lives in a separate "switch" namespace (nothing is added to
//! the machine's own namespace), processes spawned inside them and killed by
//! pid, links cut and restored, and the traffic helpers the drills use (a
//! backend, a client, a VIP sampler).
//!
//! Used by the partition and chaos tests and the failover benchmark, so
//! nothing here panics on a failed step: errors are returned, and `Drop`
//! only logs. Every namespace and temp dir a lab creates is also recorded
//! process-wide (processes are, by [`crate::proc`]), so a signal handler can
//! remove them with [`cleanup_all`].
//!
//! Faults come as verbs in the style of raft-rs's test network:
//! [`Lab::isolate`] unplugs a host, [`Lab::partition`] splits hosts into
//! groups that cannot reach each other, [`Lab::recover`] undoes both.
//!
//! Sockets are opened inside a namespace by a thread that `setns(2)`-es into
//! it; a socket stays in the namespace it was created in, and threads spawned
//! by such a thread start in the same namespace.

use std::collections::BTreeSet;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};

use crate::proc::Proc;

/// Namespaces and lab temp dirs alive anywhere in this process.
static LIVE: Mutex<Live> = Mutex::new(Live {
    namespaces: Vec::new(),
    dirs: Vec::new(),
});

struct Live {
    namespaces: Vec<String>,
    /// Lab temp dirs: an exit from a signal handler runs no `Drop`.
    dirs: Vec<PathBuf>,
}

/// Kills every process this process started through the lab and deletes
/// every namespace and lab dir still there: for a signal handler, which
/// cannot reach the labs.
pub fn cleanup_all() {
    crate::proc::kill_all();
    let (namespaces, dirs) = match LIVE.lock() {
        Ok(mut l) => (
            std::mem::take(&mut l.namespaces),
            std::mem::take(&mut l.dirs),
        ),
        Err(_) => return,
    };
    for ns in namespaces.iter().rev() {
        let _ = Command::new("ip").args(["netns", "del", ns]).output();
    }
    for d in dirs {
        let _ = std::fs::remove_dir_all(d);
    }
}

/// A network namespace we made; deleted on drop (its veth ends go with it).
#[derive(Debug)]
pub struct Netns {
    /// Empty once deleted.
    name: String,
}

impl Netns {
    /// `ip netns add NAME` with its loopback up.
    pub fn new(name: &str) -> Result<Netns> {
        ip(&["netns", "add", name])?;
        if let Ok(mut l) = LIVE.lock() {
            l.namespaces.push(name.to_string());
        }
        let ns = Netns {
            name: name.to_string(),
        };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n NAME ARGS`; its stdout.
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    /// Deletes the namespace now, for the error `Drop` could only print.
    pub fn delete(mut self) -> Result<()> {
        let name = std::mem::take(&mut self.name);
        if let Ok(mut l) = LIVE.lock() {
            l.namespaces.retain(|n| *n != name);
        }
        ip(&["netns", "del", &name]).map(drop)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.name.is_empty() {
            return; // deleted by `delete`
        }
        let name = std::mem::take(&mut self.name);
        if let Err(e) = (Netns { name }).delete() {
            eprintln!("netns: {e}");
        }
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

/// Runs `ip args`; its stdout, or an error carrying its stderr.
pub fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip").args(args).output().context("run ip")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A free TCP port on `ip` inside `ns`, reserved as [`crate::ports`] does.
pub fn free_port_in(ns: &str, ip: Ipv4Addr) -> Result<u16> {
    Ok(in_ns(ns, || crate::ports::free_ports_on(ip.into(), 1))??)
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

/// Prints the tail of each log when the test fails (declare it after the
/// lab, so it runs before the lab's drop removes the files). Lines of
/// clbd's identity probe, which fill every log, are left out.
pub struct LogsOnPanic(pub Vec<PathBuf>);

impl Drop for LogsOnPanic {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        for path in &self.0 {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let tail: Vec<&str> = text
                .lines()
                .filter(|l| !l.contains("identity probe"))
                .rev()
                .take(60)
                .collect();
            eprintln!("---- {} (last 60 lines) ----", path.display());
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
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

/// Namespaces on one bridge, the processes started in them and a temp dir
/// for their files; everything is removed in `Drop`.
pub struct Lab {
    prefix: String,
    subnet: [u8; 3],
    switch: String,
    /// In creation order; dropped in reverse (hosts before the switch).
    namespaces: Vec<Netns>,
    hosts: Vec<Host>,
    procs: Vec<(String, Proc)>,
    /// Faults in force: unplugged switch ports and blackholed `(ns, ip)`
    /// routes, so [`Lab::recover`] undoes exactly them.
    faults: Mutex<Faults>,
    dir: tempfile::TempDir,
    /// Set on drop: background threads (backend, client, sampler) stop.
    pub stop: Arc<AtomicBool>,
}

#[derive(Default)]
struct Faults {
    unplugged: BTreeSet<String>,
    blackholes: BTreeSet<(String, Ipv4Addr)>,
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
            hosts: Vec::new(),
            procs: Vec::new(),
            faults: Mutex::new(Faults::default()),
            dir: tempfile::Builder::new()
                .prefix(&format!("{prefix}-"))
                .tempdir()
                .context("tempdir")?,
            stop: Arc::new(AtomicBool::new(false)),
        };
        if let Ok(mut l) = LIVE.lock() {
            l.dirs.push(lab.dir.path().to_path_buf());
        }
        let sw = Netns::new(&lab.switch)?;
        sw.ip(&["link", "add", "br0", "type", "bridge"])?;
        sw.ip(&["link", "set", "br0", "up"])?;
        lab.namespaces.push(sw);
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

    /// A new host `name` (namespace `PREFIX-name`) at `.last`, plugged into
    /// the bridge by a veth pair: `eth0` inside, `p<name>` on the switch.
    pub fn add_host(&mut self, name: &str, last: u8) -> Result<Host> {
        let host = Host {
            name: name.to_string(),
            ns: format!("{}-{name}", self.prefix),
            ip: self.addr(last),
            port: format!("p{name}"),
        };
        let ns = Netns::new(&host.ns)?;
        self.namespaces.push(ns);
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
        self.hosts.push(host.clone());
        Ok(host)
    }

    /// A host behind `via` rather than on the bridge (a client behind a
    /// router): a veth pair `v<name>` (in `via`, at `.1` of `subnet`) to
    /// `eth0` (in the new host, at `.2`), and the new host's default route
    /// through `via`. Unplugging it is deleting it; [`Lab::set_link`] is
    /// for bridge hosts.
    pub fn add_routed_host(&mut self, name: &str, via: &Host, subnet: [u8; 3]) -> Result<Host> {
        let [a, b, c] = subnet;
        let host = Host {
            name: name.to_string(),
            ns: format!("{}-{name}", self.prefix),
            ip: Ipv4Addr::new(a, b, c, 2),
            port: format!("v{name}"),
        };
        let gateway = Ipv4Addr::new(a, b, c, 1);
        let ns = Netns::new(&host.ns)?;
        self.namespaces.push(ns);
        ip(&[
            "-n", &via.ns, "link", "add", &host.port, "type", "veth", "peer", "name", "eth0",
            "netns", &host.ns,
        ])?;
        ip(&[
            "-n",
            &via.ns,
            "addr",
            "add",
            &format!("{gateway}/24"),
            "dev",
            &host.port,
        ])?;
        ip(&["-n", &via.ns, "link", "set", &host.port, "up"])?;
        ip(&[
            "-n",
            &host.ns,
            "addr",
            "add",
            &format!("{}/24", host.ip),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &host.ns, "link", "set", "eth0", "up"])?;
        ip(&[
            "-n",
            &host.ns,
            "route",
            "add",
            "default",
            "via",
            &gateway.to_string(),
        ])?;
        self.hosts.push(host.clone());
        Ok(host)
    }

    /// Kills the processes started in `host`'s namespace and deletes it
    /// (its veth pair goes with it).
    pub fn remove_host(&mut self, host: &Host) -> Result<()> {
        let prefix = format!("{}/", host.ns);
        let labels: Vec<String> = self
            .procs
            .iter()
            .filter(|(l, _)| l.starts_with(&prefix))
            .map(|(l, _)| l.clone())
            .collect();
        for l in labels {
            self.kill(&l);
        }
        self.hosts.retain(|h| h.ns != host.ns);
        if let Some(i) = self.namespaces.iter().position(|n| n.name() == host.ns) {
            self.namespaces.remove(i).delete()?;
        }
        Ok(())
    }

    /// Plugs (`up`) or unplugs `host` at its switch port. The host's own
    /// `eth0` loses carrier, as when a cable is pulled.
    pub fn set_link(&self, host: &Host, up: bool) -> Result<()> {
        let port = host.port.clone();
        in_ns(&self.switch, || set_if_up(&port, up))??;
        if let Ok(mut f) = self.faults.lock() {
            if up {
                f.unplugged.remove(&host.port);
            } else {
                f.unplugged.insert(host.port.clone());
            }
        }
        Ok(())
    }

    /// Cuts `host` off from every other host (its cable pulled).
    pub fn isolate(&self, host: &Host) -> Result<()> {
        self.set_link(host, false)
    }

    /// Splits hosts into groups: a host reaches the hosts of its own group
    /// and of no other (blackhole routes both ways; hosts in no group are
    /// untouched, so `partition(&[&[a], &[b]])` is a partial partition in
    /// which both still reach a third).
    pub fn partition(&self, groups: &[&[&Host]]) -> Result<()> {
        for (i, from) in groups.iter().enumerate() {
            for (j, to) in groups.iter().enumerate() {
                if i == j {
                    continue;
                }
                for a in from.iter() {
                    for b in to.iter() {
                        let dst = format!("{}/32", b.ip);
                        ip(&["-n", &a.ns, "route", "add", "blackhole", &dst])?;
                        if let Ok(mut f) = self.faults.lock() {
                            f.blackholes.insert((a.ns.clone(), b.ip));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Undoes every [`Lab::isolate`] and [`Lab::partition`] in force: all
    /// hosts plugged in, all blackholes gone.
    pub fn recover(&self) -> Result<()> {
        let (unplugged, blackholes) = match self.faults.lock() {
            Ok(mut f) => (
                std::mem::take(&mut f.unplugged),
                std::mem::take(&mut f.blackholes),
            ),
            Err(_) => bail!("lab fault list poisoned"),
        };
        for port in unplugged {
            in_ns(&self.switch, || set_if_up(&port, true))??;
        }
        for (ns, to) in blackholes {
            let dst = format!("{to}/32");
            ip(&["-n", &ns, "route", "del", "blackhole", &dst])?;
        }
        Ok(())
    }

    /// The hosts added so far, in order.
    pub fn hosts(&self) -> &[Host] {
        &self.hosts
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
        if self.procs.iter().any(|(l, _)| l == label) {
            bail!("{label} is already running");
        }
        // `ip netns exec` execs the program in place, so the pid we get is
        // the program's, and the group holds everything it forks.
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns, program])
            .args(args)
            .envs(env.iter().copied());
        let log = self.log(label);
        let child = Proc::build(&mut cmd)
            .log(&log)
            .group()
            .spawn()
            .with_context(|| format!("spawn {program} in {ns}"))?;
        let pid = child.id();
        self.procs.push((label.to_string(), child));
        Ok(pid)
    }

    /// The pid of `label`, if we started it and have not killed it.
    pub fn pid(&self, label: &str) -> Option<u32> {
        self.procs
            .iter()
            .find(|(l, _)| l == label)
            .map(|(_, p)| p.id())
    }

    /// True while `label` runs (false once it exited by itself).
    pub fn running(&mut self, label: &str) -> bool {
        self.procs
            .iter_mut()
            .find(|(l, _)| l == label)
            .is_some_and(|(_, p)| matches!(p.try_wait(), Ok(None)))
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
        for (_, p) in self
            .procs
            .iter()
            .filter(|(l, _)| labels.contains(&l.as_str()))
        {
            p.kill_now();
        }
    }

    /// SIGKILLs the process groups of all `labels` first and reaps them
    /// after, so they die at (nearly) one instant. Returns how many it found.
    pub fn kill_all_of(&mut self, labels: &[&str]) -> usize {
        let mut dying = Vec::new();
        for label in labels {
            if let Some(i) = self.procs.iter().position(|(l, _)| l == label) {
                let (_, p) = self.procs.remove(i);
                p.kill_now();
                dying.push(p);
            }
        }
        // Dropping reaps.
        dying.len()
    }

    /// SIGTERM to `label` alone (not its group: the program shuts its own
    /// children down) and waits up to `within` for it to exit, then
    /// SIGKILLs what is left. Returns the exit status if it exited by itself.
    pub fn terminate(&mut self, label: &str, within: Duration) -> Option<std::process::ExitStatus> {
        let i = self.procs.iter().position(|(l, _)| l == label)?;
        let (_, p) = self.procs.remove(i);
        p.terminate(within)
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
        self.procs.iter().map(|(l, _)| l.clone()).collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.procs.clear();
        while let Some(ns) = self.namespaces.pop() {
            drop(ns);
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
