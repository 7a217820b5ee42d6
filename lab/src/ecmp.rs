//! The lab router's forwarding of an anycast prefix: BIRD exports its BGP
//! routes into a routing table of their own, and [`Router`] mirrors the
//! prefix's next hops from there into the main table, in one of the two ways
//! routers spread flows:
//!
//! - [`Hashing::Threshold`]: a plain multipath route, Linux's default
//!   hash-threshold ECMP. When a next hop joins or leaves, hash regions move,
//!   so some flows of the *other* next hops move too (and are reset by the
//!   host they land on).
//! - [`Hashing::Resilient`]: a resilient nexthop group (Linux 5.13+): flows
//!   of a next hop that leaves move, nothing else; a next hop that joins only
//!   takes buckets that were idle for `idle_timer`. What "resilient hashing"
//!   means on Arista, Juniper or Cumulus routers.
//!
//! Mirroring (rather than BIRD programming the kernel) is the lab's own glue:
//! BIRD 2.0 does not create nexthop objects.

use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::netns::ip;

/// How the router spreads flows over the next hops.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hashing {
    Threshold = 0,
    Resilient = 1,
}

/// The group id of the resilient nexthop group; next hops get ids from 1.
const GROUP: u32 = 900;

/// A running mirror; stops when the lab's stop flag is set or after `max`.
pub struct Router {
    hashing: Arc<AtomicU8>,
    kick: mpsc::Sender<()>,
    /// What the main table forwards to now (sorted), and how.
    installed: Arc<Mutex<(Vec<Ipv4Addr>, u8)>>,
}

impl Router {
    /// Mirrors `prefix` (`A.B.C.D/32`) of table `table` in namespace `ns`,
    /// through interface `dev`.
    pub fn start(
        ns: &str,
        prefix: &str,
        table: u32,
        dev: &str,
        stop: Arc<AtomicBool>,
        max: Duration,
    ) -> Result<Router> {
        let (kick, events) = mpsc::channel();
        let mut monitor = Command::new("ip")
            .args(["-n", ns, "monitor", "route"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("ip monitor route")?;
        let out = monitor.stdout.take().context("ip monitor stdout")?;
        let tx = kick.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                if line.is_err() || tx.send(()).is_err() {
                    return;
                }
            }
        });
        let router = Router {
            hashing: Arc::new(AtomicU8::new(Hashing::Threshold as u8)),
            kick,
            installed: Arc::new(Mutex::new((Vec::new(), Hashing::Threshold as u8))),
        };
        let mut state = Mirror {
            ns: ns.to_string(),
            prefix: prefix.to_string(),
            table: table.to_string(),
            dev: dev.to_string(),
            hashing: router.hashing.clone(),
            installed: router.installed.clone(),
            programmed: None,
        };
        let deadline = Instant::now() + max;
        std::thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                if let Err(e) = state.sync() {
                    eprintln!("lab router: {e:#}");
                }
                // Events wake it at once; the timeout bounds a missed one
                // and notices the stop flag.
                let _ = events.recv_timeout(Duration::from_millis(100));
                while events.try_recv().is_ok() {}
            }
            let _ = monitor.kill();
            let _ = monitor.wait();
        });
        Ok(router)
    }

    /// Switches how flows are spread, and waits (up to `within`) until the
    /// kernel forwards that way.
    pub fn set_hashing(&self, h: Hashing, within: Duration) -> Result<()> {
        self.hashing.store(h as u8, Ordering::SeqCst);
        let _ = self.kick.send(());
        crate::poll(within, "the router's hashing switched", || {
            let now = self.installed.lock().ok()?.1;
            (now == h as u8).then_some(())
        })
        .map_err(anyhow::Error::msg)
    }

    /// The next hops the main table forwards the prefix to.
    pub fn next_hops(&self) -> Vec<Ipv4Addr> {
        self.installed
            .lock()
            .map(|h| h.0.clone())
            .unwrap_or_default()
    }
}

struct Mirror {
    ns: String,
    prefix: String,
    table: String,
    dev: String,
    hashing: Arc<AtomicU8>,
    installed: Arc<Mutex<(Vec<Ipv4Addr>, u8)>>,
    /// The hops and hashing last programmed.
    programmed: Option<(Vec<Ipv4Addr>, u8)>,
}

impl Mirror {
    fn ip(&self, args: &[&str]) -> Result<String> {
        let mut all = vec!["-n", self.ns.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    fn sync(&mut self) -> Result<()> {
        // The table exists once BIRD put a route in it.
        let shown = self
            .ip(&["route", "show", "table", &self.table, &self.prefix])
            .unwrap_or_default();
        let hops = via_addresses(&shown);
        let hashing = self.hashing.load(Ordering::SeqCst);
        if self.programmed.as_ref() == Some(&(hops.clone(), hashing)) {
            return Ok(());
        }
        if hops.is_empty() {
            let _ = self.ip(&["route", "del", &self.prefix]);
            let _ = self.ip(&["nexthop", "del", "id", &GROUP.to_string()]);
        } else if hashing == Hashing::Threshold as u8 {
            let mut args = vec!["route".to_string(), "replace".into(), self.prefix.clone()];
            for h in &hops {
                args.extend(["nexthop".into(), "via".into(), h.to_string()]);
                args.extend(["dev".into(), self.dev.clone()]);
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            self.ip(&args)?;
            let _ = self.ip(&["nexthop", "del", "id", &GROUP.to_string()]);
        } else {
            let mut ids = Vec::new();
            for h in &hops {
                // One id per address: its last two octets.
                let [.., c, d] = h.octets();
                let id = (u32::from(c) << 8 | u32::from(d)) + 1;
                self.ip(&[
                    "nexthop",
                    "replace",
                    "id",
                    &id.to_string(),
                    "via",
                    &h.to_string(),
                    "dev",
                    &self.dev,
                ])?;
                ids.push(id.to_string());
            }
            let group = ids.join("/");
            self.ip(&[
                "nexthop",
                "replace",
                "id",
                &GROUP.to_string(),
                "group",
                &group,
                "type",
                "resilient",
                "buckets",
                "128",
                "idle_timer",
                "1",
            ])?;
            self.ip(&["route", "replace", &self.prefix, "nhid", &GROUP.to_string()])?;
        }
        if let Ok(mut i) = self.installed.lock() {
            *i = (hops.clone(), hashing);
        }
        self.programmed = Some((hops, hashing));
        Ok(())
    }
}

/// The addresses after `via` in `ip route` output, sorted.
pub fn via_addresses(shown: &str) -> Vec<Ipv4Addr> {
    let words: Vec<&str> = shown.split_whitespace().collect();
    let mut hops: Vec<Ipv4Addr> = words
        .windows(2)
        .filter(|w| w[0] == "via")
        .filter_map(|w| w[1].parse().ok())
        .collect();
    hops.sort();
    hops.dedup();
    hops
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_hops_of_single_and_multipath_routes() {
        let multi = "10.216.1.10 proto bird metric 32 \n\tnexthop via 10.214.1.12 dev eth0 weight 1 \n\tnexthop via 10.214.1.11 dev eth0 weight 1 \n";
        assert_eq!(
            via_addresses(multi),
            vec![Ipv4Addr::new(10, 214, 1, 11), Ipv4Addr::new(10, 214, 1, 12)]
        );
        let single = "10.216.1.10 via 10.214.1.13 dev eth0 proto bird metric 32 \n";
        assert_eq!(via_addresses(single), vec![Ipv4Addr::new(10, 214, 1, 13)]);
        assert!(via_addresses("").is_empty());
    }
}
