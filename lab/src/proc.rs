//! Child processes killed by pid on drop, and a process-wide list of them
//! so a signal handler (which cannot reach any owner) can kill them too.

use std::fs::File;
use std::io;
use std::ops::{Deref, DerefMut};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

/// Every live [`Proc`] of this process: `(pid, group, graceful)`.
static LIVE: Mutex<Vec<(i32, bool, bool)>> = Mutex::new(Vec::new());

/// How long a graceful child gets between SIGTERM and SIGKILL.
const GRACE: Duration = Duration::from_secs(5);

/// How to start a [`Proc`]; see [`Proc::build`].
pub struct Spawn<'a> {
    cmd: &'a mut Command,
    log: Option<&'a Path>,
    truncate: bool,
    group: bool,
    graceful: bool,
    die_with_parent: bool,
}

impl<'a> Spawn<'a> {
    /// Stdout and stderr appended to `log` (created if missing).
    pub fn log(mut self, log: &'a Path) -> Self {
        self.log = Some(log);
        self
    }

    /// Start `log` empty instead of appending to it.
    pub fn truncate(mut self) -> Self {
        self.truncate = true;
        self
    }

    /// A process group of its own: kill takes everything it forked
    /// (clbd's hooks, haproxy's workers, keepalived's children).
    pub fn group(mut self) -> Self {
        self.group = true;
        self
    }

    /// SIGTERM first on drop, SIGKILL after [`GRACE`]: a haproxy master
    /// stops its workers only when asked.
    pub fn graceful(mut self) -> Self {
        self.graceful = true;
        self
    }

    /// SIGKILL from the kernel when this process dies without running any
    /// `Drop` (SIGKILL, abort): for `clb demo`, which has no signal handler.
    pub fn die_with_parent(mut self) -> Self {
        self.die_with_parent = true;
        self
    }

    pub fn spawn(self) -> io::Result<Proc> {
        let cmd = self.cmd;
        cmd.stdin(Stdio::null());
        if let Some(log) = self.log {
            let f = File::options()
                .create(true)
                .write(true)
                .append(!self.truncate)
                .truncate(self.truncate)
                .open(log)?;
            cmd.stdout(f.try_clone()?).stderr(f);
        }
        if self.group {
            cmd.process_group(0);
        }
        if self.die_with_parent {
            // SAFETY: prctl(2) only, between fork and exec.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
        }
        let child = cmd
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("spawn {:?}: {e}", cmd.get_program())))?;
        let pid = child.id() as i32;
        if let Ok(mut l) = LIVE.lock() {
            l.push((pid, self.group, self.graceful));
        }
        Ok(Proc {
            child,
            group: self.group,
            graceful: self.graceful,
        })
    }
}

/// A child we spawned; killed (by pid, or by process group) and reaped on
/// drop. Derefs to [`Child`] for `wait`, `try_wait` and `id`.
#[derive(Debug)]
pub struct Proc {
    child: Child,
    group: bool,
    graceful: bool,
}

impl Proc {
    /// Starts describing how to spawn `cmd`.
    pub fn build(cmd: &mut Command) -> Spawn<'_> {
        Spawn {
            cmd,
            log: None,
            truncate: false,
            group: false,
            graceful: false,
            die_with_parent: false,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends `sig` to the child alone (it may pass it on to its own).
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child; owners signal before they wait
        // for it (`Drop` checks), so the id cannot have been reused.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Sends `sig` to the child's process group when it has one, else to
    /// the child.
    pub fn signal_all(&self, sig: i32) {
        let target = if self.group { -self.pid() } else { self.pid() };
        // SAFETY: as in `signal`; a group id stays ours while the group has
        // a member, and the leader is not reaped before drop.
        unsafe { libc::kill(target, sig) };
    }

    /// SIGTERM to the child alone (it shuts its own children down), up to
    /// `within` for it to exit; then SIGKILL to whatever is left. The exit
    /// status if it exited by itself.
    pub fn terminate(mut self, within: Duration) -> Option<std::process::ExitStatus> {
        self.signal(libc::SIGTERM);
        self.wait_within(within)
        // `self` drops here: SIGKILL to the group and the reap.
    }

    /// The exit status once the child exits, or `None` if it still runs
    /// after `within` (or cannot be waited for).
    pub fn wait_within(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        let every = Duration::from_millis(10);
        crate::wait::poll_every(within, every, "exit", || match self.child.try_wait() {
            Ok(Some(s)) => Some(Some(s)),
            Ok(None) => None,
            Err(_) => Some(None),
        })
        .ok()
        .flatten()
    }

    /// SIGKILL (after SIGCONT: a stopped process cannot die) without
    /// reaping, so several die at one instant; drop reaps.
    pub fn kill_now(&self) {
        self.signal_all(libc::SIGCONT);
        self.signal_all(libc::SIGKILL);
    }
}

impl Deref for Proc {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.child
    }
}

impl DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.child
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let pid = self.pid();
        if self.graceful && matches!(self.child.try_wait(), Ok(None)) {
            self.signal(libc::SIGTERM);
            self.wait_within(GRACE);
        }
        // A child already reaped (an owner's `wait`) may have its pid
        // reused: only its group, which outlives it while a fork lives, is
        // still ours to kill.
        let reaped = matches!(self.child.try_wait(), Ok(Some(_)));
        if self.group || !reaped {
            self.kill_now();
        }
        let _ = self.child.wait();
        if let Ok(mut l) = LIVE.lock() {
            l.retain(|p| p.0 != pid);
        }
    }
}

/// Kills every [`Proc`] still alive in this process (graceful ones get
/// SIGTERM and a moment first); for a signal handler, which cannot reach
/// their owners. They are not reaped: the process is about to exit.
pub fn kill_all() {
    let live: Vec<(i32, bool, bool)> = match LIVE.lock() {
        Ok(mut l) => std::mem::take(&mut *l),
        Err(_) => return,
    };
    let target = |&(pid, group, _): &(i32, bool, bool)| if group { -pid } else { pid };
    for p in live.iter().filter(|p| p.2) {
        // SAFETY: kill(2) on children we spawned and have not reaped.
        unsafe { libc::kill(target(p), libc::SIGTERM) };
    }
    if live.iter().any(|p| p.2) {
        std::thread::sleep(Duration::from_millis(300));
    }
    for p in &live {
        // SAFETY: as above.
        unsafe { libc::kill(target(p), libc::SIGKILL) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alive(pid: i32) -> bool {
        // A reaped child's /proc entry is gone (the pid is not reused this fast).
        Path::new(&format!("/proc/{pid}")).exists()
    }

    #[test]
    fn a_child_is_killed_and_reaped_on_drop() {
        let p = Proc::build(Command::new("sleep").arg("30"))
            .spawn()
            .expect("spawn sleep");
        let pid = p.pid();
        assert!(alive(pid));
        drop(p);
        assert!(!alive(pid), "sleep {pid} outlived its Proc");
        assert!(!LIVE.lock().unwrap().iter().any(|l| l.0 == pid));
    }

    #[test]
    fn a_group_dies_with_its_leader() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("grandchild");
        // The shell forks a sleep and waits for it: the grandchild is ours
        // only through the group.
        let script = format!("sleep 30 & echo $! > {}; wait", pidfile.display());
        let p = Proc::build(Command::new("sh").args(["-c", &script]))
            .group()
            .spawn()
            .expect("spawn sh");
        let grandchild = crate::wait::poll(Duration::from_secs(5), "the pid file", || {
            std::fs::read_to_string(&pidfile)
                .ok()?
                .trim()
                .parse::<i32>()
                .ok()
        })
        .unwrap();
        drop(p);
        crate::wait::poll(Duration::from_secs(5), "the grandchild gone", || {
            // Killed; a zombie until init reaps it, so read its state.
            let stat = std::fs::read_to_string(format!("/proc/{grandchild}/stat")).ok();
            stat.is_none_or(|s| s.contains(") Z ")).then_some(())
        })
        .unwrap();
    }
}
