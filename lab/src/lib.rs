//! One lab for clb's tests, benches and `clb demo`: real processes and
//! real networks, cleaned up on every exit path.
//!
//! - [`proc`]: children killed by pid (or process group) on drop, and
//!   [`proc::kill_all`] for a signal handler;
//! - [`ports`]: ports for children that bind them, handed out once;
//! - [`wait`]: [`eventually`] and [`poll`], a condition with a deadline;
//! - [`cluster`]: real `clbd` nodes with sled data dirs in a temp dir;
//! - [`netns`]: hosts in network namespaces on a bridge, with fault verbs;
//! - [`ecmp`]: a router's ECMP forwarding, hash-threshold or resilient;
//! - [`traffic`]: backends, a recording client, a VIP sampler, gap stats;
//! - [`hook`]: a VIP hook that only logs, and the reader of its log.
//!
//! This crate does not depend on `clb` (clb's demo depends on it): what
//! the nodes report is read by the caller through clb's own client.

pub mod cluster;
pub mod ecmp;
pub mod hook;
pub mod netns;
pub mod ports;
pub mod proc;
pub mod traffic;
pub mod wait;

pub use cluster::{agreed_leader, peer_addr_for, Cluster, Node, FAST_TIMERS};
pub use hook::{hook_events, now_ns, vip_hook, HookEvent};
pub use ports::{free_port, free_ports};
pub use proc::Proc;
pub use wait::{eventually, poll, TimedOut};

/// Blocks SIGINT and SIGTERM in every thread and handles them on one:
/// kills every process and removes every namespace and lab dir this process
/// made ([`netns::cleanup_all`]), then exits 130. Call it first in `main`,
/// before any other thread exists: later threads inherit the mask.
pub fn cleanup_on_signals() {
    // SAFETY: sigset manipulation on a local set, then pthread_sigmask on
    // the calling thread (std resets the mask in spawned children).
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::spawn(move || {
        let mut sig = 0;
        // SAFETY: sigwait on the set blocked above.
        unsafe { libc::sigwait(&set, &mut sig) };
        eprintln!("signal {sig}: killing our processes, removing our namespaces");
        netns::cleanup_all();
        std::process::exit(130);
    });
}
