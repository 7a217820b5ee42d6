//! `--haproxy supervise`: clbd runs haproxy itself.
//!
//! haproxy runs in master-worker mode as clbd's child (`haproxy -W -db -S
//! MASTER -f CONFIG`), started once the renderer has written a validated
//! configuration, restarted with backoff if it exits, and stopped after the
//! VIP was released on shutdown. The renderer then drives it exactly as it
//! drives a haproxy run by systemd: runtime API on the admin socket for
//! member changes, reloads through the master socket.
//!
//! The child is watched from a thread of its own, not from the async
//! runtime: the kernel signal that stops haproxy if clbd dies (SIGKILL, a
//! crash) is tied to the thread that started it, which must live as long
//! as haproxy does.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// First and largest pause before starting haproxy again after it exited.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How often the thread looks at the child and the stop flag.
const POLL: Duration = Duration::from_millis(20);
/// On shutdown haproxy finishes open connections (soft stop) for this long,
/// then it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// What to run.
#[derive(Debug, Clone)]
pub struct Supervise {
    pub program: PathBuf,
    pub config: PathBuf,
    pub master_socket: PathBuf,
}

/// The running supervisor; [`Supervisor::stop`] stops haproxy and waits.
pub struct Supervisor {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Where `haproxy` is.
pub fn find_haproxy() -> Option<PathBuf> {
    crate::find_program("haproxy")
}

/// The arguments haproxy is started with.
pub fn args(s: &Supervise) -> Vec<String> {
    vec![
        "-W".into(),
        "-db".into(),
        "-S".into(),
        format!("{},mode,600", s.master_socket.display()),
        "-f".into(),
        s.config.display().to_string(),
    ]
}

impl Supervisor {
    pub fn start(s: Supervise) -> std::io::Result<Supervisor> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("clb-haproxy".into())
            .spawn(move || run(&s, &flag))?;
        Ok(Supervisor {
            stop,
            thread: Some(thread),
        })
    }

    /// Soft-stops haproxy (open connections get [`STOP_GRACE`]) and waits.
    pub async fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn run(s: &Supervise, stop: &AtomicBool) {
    let mut backoff = BACKOFF_MIN;
    loop {
        // haproxy cannot start without a configuration; the renderer writes
        // only validated ones (or unvalidated ones where haproxy is missing,
        // and then this mode refused to start).
        while !s.config.exists() {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(POLL);
        }
        if stop.load(Ordering::SeqCst) {
            return;
        }
        // A socket file left by a killed haproxy would make the bind fail.
        let _ = std::fs::remove_file(&s.master_socket);
        let started = Instant::now();
        let mut child = match spawn(s) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(program = %s.program.display(), cause = %e, "cannot start haproxy");
                if pause(stop, backoff) {
                    return;
                }
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        tracing::info!(pid = child.id(), config = %s.config.display(), "haproxy started");
        let status = loop {
            if stop.load(Ordering::SeqCst) {
                stop_child(&mut child);
                return;
            }
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => std::thread::sleep(POLL),
                Err(e) => {
                    tracing::error!(cause = %e, "cannot watch haproxy; stopping it");
                    stop_child(&mut child);
                    return;
                }
            }
        };
        // A haproxy that ran a while gets a quick restart; one that dies at
        // once (a port it cannot bind) is retried ever more slowly.
        if started.elapsed() > BACKOFF_MAX * 2 {
            backoff = BACKOFF_MIN;
        }
        tracing::warn!(%status, restart_in_ms = backoff.as_millis() as u64, "haproxy exited; starting it again");
        if pause(stop, backoff) {
            return;
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

/// Sleeps `d` unless stopped first; true when stopped.
fn pause(stop: &AtomicBool, d: Duration) -> bool {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if stop.load(Ordering::SeqCst) {
            return true;
        }
        std::thread::sleep(POLL);
    }
    stop.load(Ordering::SeqCst)
}

fn spawn(s: &Supervise) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(&s.program);
    cmd.args(args(s))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // haproxy's own log lines (`log stderr` in the built-in template)
        // land beside clbd's.
        .stderr(Stdio::inherit());
    // SAFETY: only prctl(2) between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            // If clbd dies without stopping it, haproxy stops too: a
            // restarted clbd starts its own and could not bind the ports.
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
            Ok(())
        });
    }
    cmd.spawn()
}

/// SIGUSR1 (soft stop: listeners close, open connections finish), then
/// SIGTERM and SIGKILL if it takes longer than [`STOP_GRACE`].
fn stop_child(child: &mut Child) {
    let pid = child.id() as libc::pid_t;
    signal(pid, libc::SIGUSR1);
    if wait_until(child, Instant::now() + STOP_GRACE).is_some() {
        tracing::info!("haproxy stopped");
        return;
    }
    tracing::warn!(grace = ?STOP_GRACE, "haproxy still running after the grace; terminating it");
    signal(pid, libc::SIGTERM);
    if wait_until(child, Instant::now() + Duration::from_secs(2)).is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn wait_until(child: &mut Child, until: Instant) -> Option<ExitStatus> {
    while Instant::now() < until {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(POLL);
    }
    None
}

fn signal(pid: libc::pid_t, sig: libc::c_int) {
    // SAFETY: a signal to our own child, whose pid is not yet reaped.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Where supervise mode puts haproxy's sockets when no flag names them.
pub fn default_sockets(data_dir: &Path) -> (PathBuf, PathBuf) {
    (
        data_dir.join("haproxy.sock"),
        data_dir.join("haproxy-master.sock"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn haproxy_runs_in_the_foreground_with_a_private_master_socket() {
        let s = Supervise {
            program: "haproxy".into(),
            config: "/d/haproxy.cfg".into(),
            master_socket: "/d/haproxy-master.sock".into(),
        };
        assert_eq!(
            args(&s),
            [
                "-W",
                "-db",
                "-S",
                "/d/haproxy-master.sock,mode,600",
                "-f",
                "/d/haproxy.cfg"
            ]
        );
    }
}
