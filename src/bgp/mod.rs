//! `--vip-mode bgp`: every fit balancer announces the VIP to the router
//! through BIRD, and the router spreads connections over them (ECMP).
//!
//! The VIP sits on this host's loopback; haproxy binds it. BIRD's config
//! includes a file clbd writes at start (bird.rs): a static protocol with
//! the VIP's route that starts `disabled`, the BGP session towards the
//! router and BFD. At run time clbd only enables or disables that static
//! protocol through BIRD's control socket: no `birdc configure` per change
//! (a reconfigure re-reads everything and may restart sessions), no file
//! write on the hot path, and a BIRD that restarts comes back withdrawn
//! until clbd, which checks fitness every tick, enables it again.
//!
//! A withdrawal that someone planned (drain, SIGTERM, unfit) first holds new
//! connections to the VIP back (the nftables SYN drop of failover/drain.rs:
//! TCP sends a dropped SYN again a second later, by then through another
//! balancer) and waits for open requests to end, bounded by `--drain-ms`;
//! only then is the route withdrawn. Withdrawing first would not drain:
//! the router's ECMP hash moves every packet of an open connection to
//! another balancer the moment the route is gone, and that balancer resets
//! it.

pub mod bird;
pub mod fit;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::clock::now_ms;
use crate::consensus::Consensus;
use crate::failover::drain::{self, DrainConfig, Hold};
use crate::failover::VipStatus;
use crate::render::RenderStatus;

/// How often fitness is checked and BIRD's state read.
const TICK: Duration = Duration::from_millis(50);

/// How long haproxy's admin socket may not answer before this balancer
/// counts its haproxy as down.
const HAPROXY_GRACE: Duration = Duration::from_millis(150);

/// Validated bgp-mode settings (config.rs has the flags).
#[derive(Debug, Clone)]
pub struct BgpConfig {
    /// The protocol, session and VIP BIRD is told about.
    pub include: bird::Include,
    pub socket: PathBuf,
    pub include_file: PathBuf,
    pub max_lag: Duration,
    /// How long without a Raft leader before withdrawing (fit.rs).
    pub leader_silence: Duration,
    /// `None` with `--drain-ms 0`: withdraw at once.
    pub drain: Option<DrainConfig>,
    pub haproxy_socket: PathBuf,
    /// Present while an operator keeps this balancer drained; survives a
    /// restart, so maintenance is not undone by one.
    pub drained_file: PathBuf,
}

/// This balancer's announcement, for `clb status`, /ui and /metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct BgpStatus {
    pub vip: String,
    /// BIRD exports the VIP's route (its static protocol is up).
    pub announced: bool,
    /// Why it is not announced, or `fit`.
    pub reason: String,
    pub drained: bool,
    /// The BGP session's state as BIRD names it (`Established`, `Active`...).
    pub session: String,
    pub session_up: bool,
    /// The BFD session towards the router (`Up`, `Down`, `Init`), or empty.
    pub bfd: String,
    /// Connections open on haproxy now (`CurrConns`) and since it started.
    pub connections: u64,
    pub connections_total: u64,
    pub announces: u64,
    pub withdrawals: u64,
    /// Withdrawals that let requests go unfinished (drain timed out).
    pub drains_cut: u64,
    /// Unix ms of the last announce or withdrawal.
    pub changed_at_ms: Option<u64>,
    /// The last error talking to BIRD; `None` once a request succeeds.
    pub bird_error: Option<String>,
}

/// Handle to the announcer.
#[derive(Clone)]
pub struct Bgp {
    status: watch::Receiver<BgpStatus>,
    drained: std::sync::Arc<watch::Sender<bool>>,
    drained_file: PathBuf,
    done: watch::Receiver<bool>,
}

/// What the announcer reads of the rest of the node.
pub struct Sources {
    pub consensus: Consensus,
    pub render: watch::Receiver<RenderStatus>,
    pub failover: watch::Receiver<VipStatus>,
}

impl Bgp {
    /// Writes BIRD's include, puts the VIP on loopback and starts the
    /// announcer. `stop` turns true when clbd stops: the announcer drains,
    /// withdraws, and then reports done ([`Bgp::stopped`]).
    pub fn start(cfg: BgpConfig, src: Sources, stop: watch::Receiver<bool>) -> Bgp {
        let drained_now = cfg.drained_file.exists();
        let (status_tx, status) = watch::channel(BgpStatus {
            vip: cfg.include.vip.to_string(),
            drained: drained_now,
            reason: "starting".into(),
            ..Default::default()
        });
        let (drained_tx, drained_rx) = watch::channel(drained_now);
        let (done_tx, done) = watch::channel(false);
        let bgp = Bgp {
            status,
            drained: std::sync::Arc::new(drained_tx),
            drained_file: cfg.drained_file.clone(),
            done,
        };
        let announcer = Announcer {
            fitness: fit::Fitness::new(cfg.max_lag, cfg.leader_silence),
            cfg,
            src,
            status: status_tx,
            drained: drained_rx,
            hold: None,
            configured: false,
            vip_on_lo: false,
            tick: 0,
            bird_up: None,
            haproxy_down_since: None,
        };
        // A thread and runtime of its own, like failover's: a runtime busy
        // with writes must not delay a withdrawal.
        let spawned = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .and_then(|rt| {
                std::thread::Builder::new()
                    .name("clb-bgp".into())
                    .spawn(move || rt.block_on(announcer.run(stop, done_tx)))
            });
        if let Err(e) = spawned {
            tracing::error!(cause = %e, "could not start the BGP announcer; this balancer will never announce the VIP");
        }
        bgp
    }

    pub fn status(&self) -> BgpStatus {
        self.status.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<BgpStatus> {
        self.status.clone()
    }

    /// `clb drain-node` (true) / `clb ready-node` (false): recorded in the
    /// data dir first, so a restart keeps it; returns once the announcer
    /// acted on it (withdrawn after the drain, or announced if fit), or
    /// after `within`.
    pub async fn set_drained(&self, drained: bool, within: Duration) -> std::io::Result<BgpStatus> {
        if drained {
            std::fs::write(&self.drained_file, b"drained by clb drain-node\n")?;
        } else {
            match std::fs::remove_file(&self.drained_file) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
        self.drained.send_replace(drained);
        let mut status = self.status.clone();
        let settled = status.wait_for(|s| {
            s.drained == drained
                && if drained {
                    !s.announced
                } else {
                    s.announced || s.reason != "fit"
                }
        });
        let _ = tokio::time::timeout(within, settled).await;
        Ok(self.status())
    }

    /// Waits (bounded) until the announcer withdrew after stop.
    pub async fn stopped(&self, within: Duration) {
        let mut done = self.done.clone();
        if tokio::time::timeout(within, done.wait_for(|d| *d))
            .await
            .is_err()
        {
            tracing::warn!(?within, "BGP withdrawal did not finish before shutdown");
        }
    }
}

struct Announcer {
    cfg: BgpConfig,
    src: Sources,
    fitness: fit::Fitness,
    status: watch::Sender<BgpStatus>,
    drained: watch::Receiver<bool>,
    /// New connections held back since the last withdrawal; released just
    /// before the next announce.
    hold: Option<Hold>,
    /// BIRD read the include we wrote.
    configured: bool,
    vip_on_lo: bool,
    tick: u64,
    /// BIRD's static protocol state as last read: `Some(true)` exported.
    bird_up: Option<bool>,
    /// When haproxy's admin socket stopped answering, if it has.
    haproxy_down_since: Option<Instant>,
}

impl Announcer {
    #[tracing::instrument(name = "bgp", skip_all, fields(vip = %self.cfg.include.vip))]
    async fn run(mut self, mut stop: watch::Receiver<bool>, done: watch::Sender<bool>) {
        // A rule a crashed clbd left would drop every new connection once
        // we announce.
        if self.cfg.drain.is_some() {
            if let Err(e) = drain::clear().await {
                tracing::error!(cause = %e, "could not remove a drain rule left by an earlier run");
            }
        }
        loop {
            let stopping = *stop.borrow() || stop.has_changed().is_err();
            self.step(stopping).await;
            if stopping && self.bird_up != Some(true) {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(TICK) => {}
                _ = stop.wait_for(|s| *s), if !stopping => {}
                _ = self.drained.changed() => {}
            }
        }
        // Withdrawn: let the router's last in-flight SYNs meet the drop
        // rule rather than a closing haproxy, then take it away.
        if let Some(hold) = self.hold.take() {
            tokio::time::sleep(Duration::from_millis(200)).await;
            hold.end().await;
        }
        let _ = done.send(true);
    }

    async fn step(&mut self, stopping: bool) {
        self.tick += 1;
        if !self.configured {
            self.configure().await;
        }
        if !self.vip_on_lo && self.tick % 20 == 1 {
            self.vip_on_lo = self.vip_to_loopback();
        }
        let (haproxy, conns) = self.haproxy_info().await;
        // One unanswered `show info` (a reload swapping workers, a busy
        // tick) is not a dead haproxy: every balancer reloads at the same
        // moment, and withdrawing all of them for it would be an outage.
        let haproxy = match haproxy {
            Ok(()) => {
                self.haproxy_down_since = None;
                Ok(())
            }
            Err(e) => {
                let since = *self.haproxy_down_since.get_or_insert_with(Instant::now);
                if since.elapsed() < HAPROXY_GRACE {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        };
        let inputs = self.inputs(stopping, haproxy);
        let verdict = match (self.vip_on_lo, self.configured) {
            (false, _) => Err("the VIP is not on the loopback interface".to_string()),
            (_, false) => Err(format!(
                "BIRD has not read {}",
                self.cfg.include_file.display()
            )),
            _ => self.fitness.check(&inputs),
        };
        // Read BIRD every tick while a change may be due, else every 4th.
        if self.bird_up.is_none()
            || self.tick.is_multiple_of(4)
            || verdict.is_ok() != (self.bird_up == Some(true))
        {
            self.read_bird().await;
        }
        match (&verdict, self.bird_up) {
            (Ok(()), Some(false)) => self.announce().await,
            (Err(why), Some(true)) => self.withdraw(why).await,
            _ => {}
        }
        let drained = inputs.drained;
        let reason = match &verdict {
            Ok(()) => "fit".to_string(),
            Err(why) => why.clone(),
        };
        if let Some((cur, total)) = conns {
            self.status.send_modify(|s| {
                s.connections = cur;
                s.connections_total = total;
            });
        }
        let announced = self.bird_up == Some(true);
        self.status.send_if_modified(|s| {
            let changed = s.reason != reason || s.drained != drained || s.announced != announced;
            s.reason = reason;
            s.drained = drained;
            s.announced = announced;
            changed
        });
    }

    fn inputs(&mut self, stopping: bool, haproxy: Result<(), String>) -> fit::Inputs {
        let now = Instant::now();
        let c = &self.src.consensus;
        let m = c.raft.metrics().borrow().clone();
        let leading = (m.current_leader == Some(c.id))
            .then(|| m.millis_since_quorum_ack.map(Duration::from_millis))
            .flatten();
        let liveness = c.liveness();
        self.fitness.leader_committed(now, liveness.leader_commit());
        let applied = c.applied().index;
        self.fitness.registry_applied(now, applied);
        let render = self.src.render.borrow().clone();
        let vip = self.src.failover.borrow().clone();
        fit::Inputs {
            now,
            stopping,
            drained: *self.drained.borrow(),
            haproxy,
            health: if vip.healthy {
                Ok(())
            } else {
                Err(vip.health_reason)
            },
            leading,
            // Not gated on `current_leader`: a candidate has none, and an
            // election must not withdraw anyone (fit.rs).
            heard: Some(liveness.last_heard()),
            raft_applied: m.last_applied.map(|l| l.index).unwrap_or(0),
            live_index: render.applied_index,
            render_error: render.last_error,
        }
    }

    /// Writes the include and has BIRD read it when it changed (or once at
    /// start, in case BIRD read an older one).
    async fn configure(&mut self) {
        let text = self.cfg.include.text();
        if let Err(e) = bird::write_include(&self.cfg.include_file, &text) {
            self.bird_error(format!("write {}: {e}", self.cfg.include_file.display()));
            return;
        }
        match bird::request(&self.cfg.socket, "configure").await {
            Ok(_) => {
                tracing::info!(include = %self.cfg.include_file.display(), "BIRD read clbd's include");
                self.configured = true;
                self.status.send_modify(|s| s.bird_error = None);
            }
            Err(e) => self.bird_error(e),
        }
    }

    fn vip_to_loopback(&self) -> bool {
        match crate::failover::netlink::change_address(
            true,
            "lo",
            self.cfg.include.vip,
            Duration::from_secs(1),
        ) {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(cause = %e, "could not add the VIP to lo; not announcing");
                false
            }
        }
    }

    /// haproxy answers `show info`: its current and total connections.
    async fn haproxy_info(&self) -> (Result<(), String>, Option<(u64, u64)>) {
        match crate::render::haproxy::exchange(&self.cfg.haproxy_socket, "show info").await {
            Ok(text) => {
                let field = |name: &str| {
                    text.lines()
                        .find_map(|l| l.strip_prefix(name)?.strip_prefix(": "))
                        .and_then(|v| v.trim().parse().ok())
                        .unwrap_or(0)
                };
                (Ok(()), Some((field("CurrConns"), field("CumConns"))))
            }
            Err(e) => (Err(e.to_string()), None),
        }
    }

    /// Reads the static protocol's state, the BGP session and BFD.
    async fn read_bird(&mut self) {
        let protocols = match bird::request(&self.cfg.socket, "show protocols").await {
            Ok(lines) => bird::protocols(&lines),
            Err(e) => {
                // Unknown: a BIRD that comes back starts withdrawn.
                self.bird_up = None;
                self.configured = false;
                self.bird_error(e);
                return;
            }
        };
        let name = &self.cfg.include.protocol;
        let session_name = self.cfg.include.session_name();
        match protocols.iter().find(|p| &p.name == name) {
            Some(p) => self.bird_up = Some(p.state == "up"),
            None => {
                self.bird_up = None;
                self.configured = false;
                self.bird_error(format!(
                    "BIRD has no protocol {name}: does its config include {}?",
                    self.cfg.include_file.display()
                ));
                return;
            }
        }
        let session = protocols
            .iter()
            .find(|p| p.name == session_name)
            .map(|p| {
                if p.info.is_empty() {
                    p.state.clone()
                } else {
                    p.info.clone()
                }
            })
            .unwrap_or_default();
        let bfd = if self.cfg.include.bfd_interval_ms > 0 {
            match bird::request(&self.cfg.socket, "show bfd sessions").await {
                Ok(lines) => bird::bfd_sessions(&lines)
                    .into_iter()
                    .find(|s| s.neighbor == self.cfg.include.neighbor)
                    .map(|s| s.state)
                    .unwrap_or_else(|| "none".into()),
                Err(_) => String::new(),
            }
        } else {
            String::new()
        };
        self.status.send_if_modified(|s| {
            let up = session == "Established";
            let changed = s.session != session || s.bfd != bfd || s.bird_error.is_some();
            s.session_up = up;
            s.session = session;
            s.bfd = bfd;
            s.bird_error = None;
            changed
        });
    }

    async fn announce(&mut self) {
        // The drop rule of the last withdrawal goes first: announcing with
        // it in place would drop every new connection sent here.
        if let Some(hold) = self.hold.take() {
            hold.end().await;
        }
        match bird::request(
            &self.cfg.socket,
            &format!("enable {}", self.cfg.include.protocol),
        )
        .await
        {
            Ok(_) => {
                tracing::info!("VIP announced");
                self.bird_up = Some(true);
                self.status.send_modify(|s| {
                    s.announces += 1;
                    s.changed_at_ms = Some(now_ms());
                });
            }
            Err(e) => self.bird_error(e),
        }
    }

    async fn withdraw(&mut self, why: &str) {
        let mut cut = false;
        if let (Some(cfg), None) = (&self.cfg.drain, &self.hold) {
            match drain::drain(self.cfg.include.vip, cfg).await {
                Ok((hold, drained)) => {
                    cut = drained.left > 0;
                    tracing::info!(
                        took_ms = drained.took.as_millis() as u64,
                        open = drained.open,
                        left = drained.left,
                        "drained before withdrawing"
                    );
                    self.hold = Some(hold);
                }
                Err(e) => {
                    cut = true;
                    tracing::error!(cause = %e, "could not hold new connections back; withdrawing anyway");
                }
            }
        }
        match bird::request(
            &self.cfg.socket,
            &format!("disable {}", self.cfg.include.protocol),
        )
        .await
        {
            Ok(_) => {
                tracing::info!(reason = why, "VIP withdrawn");
                self.bird_up = Some(false);
                self.status.send_modify(|s| {
                    s.withdrawals += 1;
                    s.drains_cut += u64::from(cut);
                    s.changed_at_ms = Some(now_ms());
                });
            }
            Err(e) => self.bird_error(e),
        }
    }

    fn bird_error(&self, e: String) {
        self.status.send_if_modified(|s| {
            if s.bird_error.as_deref() == Some(e.as_str()) {
                return false;
            }
            tracing::warn!(cause = %e, "BIRD");
            s.bird_error = Some(e);
            true
        });
    }
}
