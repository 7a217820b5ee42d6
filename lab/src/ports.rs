//! Ports for processes the caller starts on loopback (or in a namespace).
//!
//! Why not hand over a bound listener: `clbd` binds `--listen` itself and
//! takes no inherited socket, so a port must be free again when the child
//! starts. What can race is then (a) two callers in this process getting
//! the same port, and (b) the kernel giving the port to an outgoing
//! connection in between. (a) is closed by a process-wide set: a port is
//! handed out once per process, even after its user exits (a node restarted
//! on its port must find it still its own). (b) is closed by taking ports
//! below the kernel's ephemeral range (32768-60999 by default), which
//! outgoing connections never use (seen before: "Address already in use"
//! when a killed node restarted on a port another test's client had been
//! given). The probe is a plain bind, which on Unix sets SO_REUSEADDR as
//! clbd's listener does, so it answers exactly "could clbd bind this now"
//! (a port in TIME_WAIT counts as free, as it is for clbd). Other test
//! processes are the one race left; each starts at a place derived from its
//! pid, so two of them walk different ports.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::sync::Mutex;

static GIVEN: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

const LOW: u32 = 20_000;
const SPAN: u32 = 12_000;

/// A free port on 127.0.0.1 never handed out before in this process.
/// Panics when the whole range is taken (12,000 ports: a leak, not load).
pub fn free_port() -> u16 {
    free_ports_on(Ipv4Addr::LOCALHOST.into(), 1).unwrap_or_else(|e| panic!("{e}"))
}

/// `n` consecutive free ports on 127.0.0.1; the first of them.
pub fn free_ports(n: u16) -> io::Result<u16> {
    free_ports_on(Ipv4Addr::LOCALHOST.into(), n)
}

/// `n` consecutive ports free on `ip` in the calling thread's network
/// namespace (see [`crate::netns::in_ns`]); the first of them.
pub fn free_ports_on(ip: IpAddr, n: u16) -> io::Result<u16> {
    let n = u32::from(n.max(1));
    let mut given = GIVEN.lock().unwrap_or_else(|p| p.into_inner());
    // Start where the process id points, so test binaries run one after
    // another (or a bench beside a test) do not walk the same ports.
    let start = std::process::id().wrapping_mul(2_654_435_761) % SPAN;
    for i in 0..SPAN {
        let first = LOW + (start + i * 7) % SPAN;
        if first + n > LOW + SPAN {
            continue;
        }
        let run = (first..first + n).map(|p| p as u16);
        if run
            .clone()
            .all(|p| !given.contains(&p) && TcpListener::bind((ip, p)).is_ok())
        {
            given.extend(run);
            return Ok(first as u16);
        }
    }
    Err(io::Error::new(
        io::ErrorKind::AddrInUse,
        format!("no run of {n} free ports on {ip} in {LOW}..{}", LOW + SPAN),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_port_is_never_handed_out_twice() {
        let mut seen = BTreeSet::new();
        for _ in 0..200 {
            let p = free_port();
            assert!(seen.insert(p), "port {p} handed out twice");
            assert!((LOW..LOW + SPAN).contains(&u32::from(p)));
        }
        let first = free_ports(3).unwrap();
        for p in first..first + 3 {
            assert!(seen.insert(p), "port {p} of a run handed out twice");
        }
    }

    #[test]
    fn threads_get_distinct_ports() {
        let got: Vec<u16> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| s.spawn(|| (0..20).map(|_| free_port()).collect::<Vec<_>>()))
                .collect();
            hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        let unique: BTreeSet<u16> = got.iter().copied().collect();
        assert_eq!(unique.len(), got.len());
    }
}
