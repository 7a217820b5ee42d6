//! The Raft leader holds the VIP (invariant 2 of DESIGN.md).
//!
//! A watcher reads `raft.metrics()` and its own monotonic tick, and decides
//! what this node *wants*: hold the VIP for term T, or not hold it. One hook
//! runner task turns that wish into `claim`/`release` runs, one at a time, so
//! a claim for a stale term can never run after a newer release (the wish is
//! a `watch`: queued stale claims are simply overwritten). Health gates
//! leadership: an unhealthy leader releases and hands leadership to a healthy
//! voter through `/raft/campaign`. docs/failover.md has the timing argument.

mod decide;
use decide::{decide, Running, Wish, World};
pub mod drain;
mod garp;
mod health;
mod hooks;
mod lease;
pub mod netlink;

use std::net::IpAddr;
use std::time::{Duration, Instant};

use openraft::ServerState;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

pub use health::{health_input, Health, HealthCheck, HealthSender};
pub use hooks::{Action, Hook, HookCall, HookError};

use crate::clock::now_ms;
use crate::consensus::network::PeerClient;
use crate::consensus::rpc::CampaignRequest;
use crate::consensus::{Leadership, NodeId, Raft};

/// First and largest pause between retries of a failed hook.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, thiserror::Error, Serialize)]
pub enum FailoverError {
    #[error("this node is not the leader (leader: {0:?})")]
    NotLeader(Option<NodeId>),
    #[error("a failover is already in progress")]
    Busy,
    #[error("no voter took over leadership: {0}")]
    NoSuccessor(String),
    #[error("the failover task has stopped")]
    Stopped,
}

/// Validated failover settings (see `config.rs` for the flags).
#[derive(Debug, Clone)]
pub struct FailoverConfig {
    pub vip: Option<IpAddr>,
    pub hook: Option<Hook>,
    /// `CLB_INTERFACE` for the hook; defaults to the linux-vip interface.
    pub interface: Option<String>,
    /// How long a quorum ack entitles the leader to hold the VIP; below
    /// `election_timeout_min`.
    pub lease: Duration,
    pub hook_timeout: Duration,
    pub health: Option<HealthCheck>,
    /// A witness votes and never holds the VIP; it leads only as a last
    /// resort (see `fallback` in `Watcher::run`) and then hands over.
    pub witness: bool,
    /// How long a hand-over waits for a peer's campaign to win.
    pub handover_wait: Duration,
    /// Drain before a planned release (`linux-vip` only; `--drain-ms`).
    pub drain: Option<drain::DrainConfig>,
}

/// The outcome of one hook run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct HookOutcome {
    pub action: Action,
    pub term: u64,
    pub ok: bool,
    pub error: Option<String>,
    /// Success with a caveat (e.g. the announcement failed).
    pub note: Option<String>,
    /// Unix time of the end of the run, in milliseconds.
    pub at_ms: u64,
    pub took_ms: u64,
}

/// This node's VIP state, for `GET /v1/cluster` and `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(default)]
pub struct VipStatus {
    pub vip: Option<String>,
    /// The last hook run that succeeded was a claim, and it is still wanted.
    pub held: bool,
    pub held_term: Option<u64>,
    /// The watcher wants the VIP here now (leader, healthy, lease valid).
    pub wanted: bool,
    pub lease_ms: u64,
    pub healthy: bool,
    pub health_reason: String,
    /// False on a witness and while unhealthy: this node does not campaign.
    pub may_campaign: bool,
    pub last_hook: Option<HookOutcome>,
    /// The most recent failed hook run, kept after later successes.
    pub last_error: Option<HookOutcome>,
    pub claims_ok: u64,
    pub claims_failed: u64,
    pub releases_ok: u64,
    pub releases_failed: u64,
    /// Times a leader let the VIP go because its quorum lease ran out.
    pub lease_expiries: u64,
    /// Leadership hand-overs this node started (unhealthy or `clb failover`).
    pub handovers: u64,
    /// Drains before a planned release (`--drain-ms`).
    pub drains: u64,
    /// Drains that let the VIP go with requests still open (timed out) or
    /// could not hold new connections back (nft failed).
    pub drains_cut: u64,
}

/// The answer to `clb failover`, from the old leader.
#[derive(Debug, Clone, Serialize)]
pub struct StepDown {
    pub from: NodeId,
    pub term: u64,
    pub new_leader: NodeId,
    pub new_term: u64,
    /// From the request until another node leads.
    pub took_ms: u64,
    pub release: Option<HookOutcome>,
}

enum Cmd {
    StepDown(oneshot::Sender<Result<StepDown, FailoverError>>),
}

/// Handle to the running failover tasks.
#[derive(Clone)]
pub struct Failover {
    status: watch::Receiver<VipStatus>,
    may_campaign: watch::Receiver<bool>,
    commands: mpsc::Sender<Cmd>,
    hooks_done: watch::Receiver<bool>,
    hook_timeout: Duration,
}

impl Failover {
    /// Starts the watcher (and the hook runner when a VIP is configured).
    /// `leadership` is all it takes of the Raft node; `external` is the
    /// daemon's health input; `stop` flips to true on shutdown, after which
    /// a held VIP is released.
    pub fn start(
        leadership: Leadership,
        cfg: FailoverConfig,
        external: watch::Receiver<Health>,
        stop: watch::Receiver<bool>,
    ) -> Failover {
        let initial = VipStatus {
            vip: cfg.vip.map(|v| v.to_string()),
            lease_ms: cfg.lease.as_millis() as u64,
            healthy: true,
            may_campaign: !cfg.witness,
            ..Default::default()
        };
        let (status_tx, status) = watch::channel(initial);
        let (campaign_tx, may_campaign) = watch::channel(!cfg.witness);
        let term = leadership.raft.metrics().borrow().current_term;
        let (wish_tx, wish_rx) = watch::channel(Wish::Release(term));
        let (done_tx, hooks_done) = watch::channel(false);
        let (cmd_tx, cmd_rx) = mpsc::channel(4);

        let liveness = leadership.liveness.clone();
        let lease_end = LeaseEnd::default();
        let runner = match (cfg.vip, cfg.hook.clone(), cfg.witness) {
            (Some(vip), Some(hook), false) => {
                // Until the start-up release has run, a crashed holder's
                // address may still be here: refuse votes meanwhile.
                liveness.set_holding(true);
                Some(HookRunner {
                    interface: cfg
                        .interface
                        .clone()
                        .or_else(|| hook.interface().map(str::to_string))
                        .unwrap_or_default(),
                    hook,
                    vip,
                    node: leadership.id,
                    timeout: cfg.hook_timeout,
                    status: status_tx.clone(),
                    liveness: liveness.clone(),
                    claim_estimate: Duration::ZERO,
                    lease: cfg.lease,
                    lease_end: lease_end.clone(),
                    drain: cfg.drain.is_some(),
                })
            }
            _ => {
                let _ = done_tx.send(true);
                None
            }
        };
        let health_cmd = cfg
            .health
            .clone()
            .map(|check| health::spawn_check(check, stop.clone()));
        let watcher = Watcher {
            raft: leadership.raft.clone(),
            id: leadership.id,
            leadership: leadership.clone(),
            tick: (cfg.lease / 4).max(Duration::from_millis(1)),
            cfg: cfg.clone(),
            wish: wish_tx,
            status: status_tx,
            may_campaign: campaign_tx,
            elect_enabled: None,
            external,
            health_cmd,
            handover: None,
            reply: None,
            next_handover: Instant::now(),
            last_leader_seen: Instant::now(),
            liveness_after: Duration::from_millis(
                3 * leadership.raft.config().election_timeout_max,
            ),
            fallback: false,
            lease_end,
            handing_over: Default::default(),
            wake: Default::default(),
        };
        // The lease watcher and the hook runner get a thread and runtime of
        // their own: a runtime busy with writes, storage or snapshots must
        // never delay a release.
        let spawned = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .and_then(|rt| {
                std::thread::Builder::new()
                    .name("clb-failover".into())
                    .spawn(move || {
                        rt.block_on(async move {
                            let runner =
                                runner.map(|r| tokio::spawn(r.run(wish_rx, stop.clone(), done_tx)));
                            watcher.run(cmd_rx, stop).await;
                            if let Some(r) = runner {
                                let _ = r.await;
                            }
                        })
                    })
            });
        if let Err(e) = spawned {
            // Without it there is no VIP handling at all: say so loudly.
            tracing::error!(cause = %e, "could not start the failover thread; this node will never hold the VIP");
        }
        Failover {
            status,
            may_campaign,
            commands: cmd_tx,
            hooks_done,
            hook_timeout: cfg.hook_timeout,
        }
    }

    pub fn status(&self) -> VipStatus {
        self.status.borrow().clone()
    }

    /// Who holds the VIP as far as this node knows: itself when its claim
    /// succeeded, else the leader it follows (whose own status is the
    /// authority). `None` without a VIP or while nobody is known to hold it.
    pub fn holder(&self, me: NodeId, leader: Option<NodeId>) -> Option<NodeId> {
        let s = self.status.borrow();
        s.vip.as_ref()?;
        if s.held {
            return Some(me);
        }
        leader.filter(|&l| l != me)
    }

    pub fn subscribe(&self) -> watch::Receiver<VipStatus> {
        self.status.clone()
    }

    /// True while this node may campaign (for the `/raft/campaign` route).
    pub fn may_campaign(&self) -> watch::Receiver<bool> {
        self.may_campaign.clone()
    }

    /// Graceful step-down on the leader: release the VIP, make a healthy
    /// voter campaign, and return once another node leads.
    pub async fn step_down(&self) -> Result<StepDown, FailoverError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Cmd::StepDown(tx))
            .await
            .map_err(|_| FailoverError::Stopped)?;
        rx.await.map_err(|_| FailoverError::Stopped)?
    }

    /// Waits (bounded) until the hook runner has released the VIP after stop.
    pub async fn stopped(&self) {
        let mut done = self.hooks_done.clone();
        let bound = self.hook_timeout * 2 + Duration::from_secs(1);
        if tokio::time::timeout(bound, done.wait_for(|d| *d))
            .await
            .is_err()
        {
            tracing::warn!(?bound, "VIP release did not finish before shutdown");
        }
    }
}

/// Resolves when `stop` is true or its sender is gone.
async fn stopping(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

struct HookRunner {
    hook: Hook,
    vip: IpAddr,
    node: NodeId,
    interface: String,
    timeout: Duration,
    status: watch::Sender<VipStatus>,
    /// Told when a claim starts and a release finished (vote rules).
    liveness: std::sync::Arc<crate::consensus::elect::Liveness>,
    /// The longest a successful claim took so far. A claim is not started
    /// with less than that (at most half a lease: a cloud hook may take
    /// longer than any lease) left of the lease.
    claim_estimate: Duration,
    lease: Duration,
    /// The end of the latest quorum lease (`CLB_LEASE_END_MS`).
    lease_end: LeaseEnd,
    /// Drains are on: a rule a crashed clbd left is removed at start.
    drain: bool,
}

/// The end of this node's latest quorum lease, shared by watcher and runner.
type LeaseEnd = std::sync::Arc<std::sync::Mutex<Option<Instant>>>;

/// Unix milliseconds of a monotonic instant.
fn wall_ms(at: Instant) -> u64 {
    let now = Instant::now();
    let wall = now_ms();
    if at >= now {
        wall + at.duration_since(now).as_millis() as u64
    } else {
        wall.saturating_sub(now.duration_since(at).as_millis() as u64)
    }
}

impl HookRunner {
    /// Runs hooks one at a time until stopped, then releases.
    #[tracing::instrument(name = "vip_hooks", skip_all, fields(vip = %self.vip))]
    async fn run(
        mut self,
        mut wish: watch::Receiver<Wish>,
        mut stop: watch::Receiver<bool>,
        done: watch::Sender<bool>,
    ) {
        // Unknown at start: a crash may have left the address configured
        // here, so the first wish (release) really runs.
        let mut done_last: Option<Wish> = None;
        let mut backoff = BACKOFF_MIN;
        if self.drain {
            if let Err(e) = drain::clear().await {
                tracing::error!(cause = %e, "could not remove a drain rule left by an earlier run: new connections to the VIP may be dropped here");
            }
        }
        // The start-up release runs first, also when leadership came while
        // this runner was starting: a claim on a leftover address would keep
        // it as it was (an IPv6 address someone added with DAD stays
        // tentative for seconds, and nothing can be sent from it).
        let first = match *wish.borrow() {
            Wish::Hold(t, _) | Wish::Release(t) => t,
        };
        if self.run_once(Action::Release, first).await {
            self.liveness.set_holding(false);
            done_last = Some(Wish::Release(first));
        }
        loop {
            let stop_now = *stop.borrow() || stop.has_changed().is_err();
            let want = *wish.borrow_and_update();
            let want = match (stop_now, want) {
                (true, Wish::Hold(t, _)) => Wish::Release(t),
                (_, w) => w,
            };
            let needed = match (want, done_last) {
                (Wish::Hold(t, _), Some(Wish::Hold(h, _))) if t == h => None,
                (Wish::Release(_), Some(Wish::Release(_))) => None,
                (w, _) => Some(w),
            };
            // A claim that could still be running when the lease ends is
            // not started; a fresher lease brings a new wish.
            let late = match needed {
                Some(Wish::Hold(_, until)) => !lease::claim_in_time(
                    Instant::now(),
                    self.claim_estimate.min(self.lease / 2),
                    until,
                ),
                _ => false,
            };
            let needed = if late {
                tracing::debug!("claim dropped: the lease could end before it returns");
                None
            } else {
                needed
            };
            let Some(w) = needed else {
                if stop_now {
                    break;
                }
                tokio::select! {
                    r = wish.changed() => if r.is_err() { break },
                    _ = stopping(&mut stop) => {}
                }
                continue;
            };
            let (action, term) = match w {
                Wish::Hold(t, _) => (Action::Claim, t),
                Wish::Release(t) => (Action::Release, t),
            };
            if action == Action::Claim {
                // From its first instruction a claim may have taken effect.
                self.liveness.set_holding(true);
            }
            let started = Instant::now();
            let ok = self.run_once(action, term).await;
            match (action, ok) {
                (Action::Claim, true) => {
                    self.claim_estimate = self.claim_estimate.max(started.elapsed())
                }
                (Action::Release, true) => self.liveness.set_holding(false),
                _ => {}
            }
            if ok {
                done_last = Some(w);
                backoff = BACKOFF_MIN;
                continue;
            }
            // A failed run may have half-applied: assume nothing.
            done_last = None;
            if stop_now {
                break;
            }
            // Retry while still wanted; a new wish cuts the pause short.
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                r = wish.changed() => if r.is_err() { break },
                _ = stopping(&mut stop) => {}
            }
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
        let _ = done.send(true);
    }

    async fn run_once(&self, action: Action, term: u64) -> bool {
        let lease_end_ms = self
            .lease_end
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .map(wall_ms);
        let call = HookCall {
            lease_end_ms,
            action,
            vip: self.vip,
            node: self.node,
            term,
            interface: self.interface.clone(),
        };
        let started = Instant::now();
        let result = self.hook.run(&call, self.timeout).await;
        let took_ms = started.elapsed().as_millis() as u64;
        let outcome = HookOutcome {
            action,
            term,
            ok: result.is_ok(),
            error: result.as_ref().err().map(|e| e.to_string()),
            note: result.as_ref().ok().cloned().flatten(),
            at_ms: now_ms(),
            took_ms,
        };
        match &result {
            Ok(note) => tracing::info!(
                action = action.as_str(),
                term,
                took_ms,
                note = note.as_deref(),
                "VIP hook done"
            ),
            Err(e) => {
                tracing::warn!(action = action.as_str(), term, took_ms, cause = %e, "VIP hook failed")
            }
        }
        self.status.send_modify(|s| {
            match (action, outcome.ok) {
                (Action::Claim, true) => {
                    s.claims_ok += 1;
                    s.held = true;
                    s.held_term = Some(term);
                }
                (Action::Claim, false) => s.claims_failed += 1,
                (Action::Release, true) => {
                    s.releases_ok += 1;
                    s.held = false;
                    s.held_term = None;
                }
                (Action::Release, false) => s.releases_failed += 1,
            }
            if !outcome.ok {
                s.last_error = Some(outcome.clone());
            }
            s.last_hook = Some(outcome);
        });
        result.is_ok()
    }
}

enum Event {
    Wake,
    Quit,
    StepDown(oneshot::Sender<Result<StepDown, FailoverError>>),
    HandoverDone(Result<Result<StepDown, FailoverError>, tokio::task::JoinError>),
}

struct Watcher {
    raft: Raft,
    id: NodeId,
    /// Leadership, the quorum lease, the election gate: all it needs of Raft.
    leadership: Leadership,
    cfg: FailoverConfig,
    /// How often the watcher looks at the clock and the metrics.
    tick: Duration,
    wish: watch::Sender<Wish>,
    status: watch::Sender<VipStatus>,
    may_campaign: watch::Sender<bool>,
    /// What we last told openraft (`None`: nothing yet).
    elect_enabled: Option<bool>,
    external: watch::Receiver<Health>,
    health_cmd: Option<watch::Receiver<Health>>,
    handover: Option<JoinHandle<Result<StepDown, FailoverError>>>,
    reply: Option<oneshot::Sender<Result<StepDown, FailoverError>>>,
    next_handover: Instant,
    /// When a leader was last known; an unhealthy node campaigns again after
    /// `liveness_after` without one, so the registry never loses its leader
    /// because every balancer's haproxy is down (it still never claims the VIP).
    last_leader_seen: Instant,
    liveness_after: Duration,
    fallback: bool,
    /// Where the end of the latest lease is told to the hook runner.
    lease_end: LeaseEnd,
    /// Set by a hand-over once it may release the VIP.
    handing_over: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Wakes the watcher before its next tick.
    wake: std::sync::Arc<tokio::sync::Notify>,
}

impl Watcher {
    #[tracing::instrument(name = "failover", skip_all, fields(node = self.id))]
    async fn run(mut self, mut commands: mpsc::Receiver<Cmd>, mut stop: watch::Receiver<bool>) {
        let mut metrics = self.raft.metrics();
        let mut inputs_open = (true, true);
        loop {
            // The clock first: after a stop (SIGSTOP, starvation) the lease
            // is judged on time that really passed.
            let now = Instant::now();
            if metrics.has_changed().is_err() {
                break;
            }
            let m = metrics.borrow_and_update().clone();
            let leading = (m.state == ServerState::Leader && m.current_leader == Some(self.id))
                .then_some(m.current_term);
            if let Some(term) = leading {
                self.leadership.liveness.leading(term, now);
            }
            let lease = lease::until(self.leadership.quorum_ack(now), leading, self.cfg.lease);
            // openraft keeps naming a dead leader until another is elected
            // (clb runs its own election timer), so what counts is hearing
            // from one, or leading.
            if leading.is_some() {
                self.last_leader_seen = now;
            }
            self.last_leader_seen = self
                .last_leader_seen
                .max(self.leadership.liveness.last_heard());
            let voters = m.membership_config.membership().voter_ids().count();
            // Alone, or leaderless for long: lead anyway, without the VIP.
            // A witness too, after twice as long: a balancer cut off while
            // the other and the witness committed entries cannot win while
            // the witness has entries it lacks, so once the other balancer
            // is gone only the witness can lead and bring it up to date. It
            // then hands over as any unfit leader does (below).
            let leaderless = now.duration_since(self.last_leader_seen);
            self.fallback = if self.cfg.witness {
                leaderless >= 2 * self.liveness_after
            } else {
                voters <= 1 || leaderless >= self.liveness_after
            };
            self.decide(now, leading, m.current_term, lease);

            let wake = match lease {
                Some((_, until)) if until > now => until.min(now + self.tick),
                _ => now + self.tick,
            };
            let event = {
                let nudge = self.wake.clone();
                let external = &mut self.external;
                let health_cmd = &mut self.health_cmd;
                let handover = &mut self.handover;
                tokio::select! {
                    r = metrics.changed() => if r.is_err() {
                        Event::Quit
                    } else {
                        Event::Wake
                    },
                    _ = tokio::time::sleep_until(wake.into()) => Event::Wake,
                    _ = nudge.notified() => Event::Wake,
                    r = external.changed(), if inputs_open.0 => {
                        // A dropped input keeps its last value.
                        inputs_open.0 = r.is_ok();
                        Event::Wake
                    }
                    r = async {
                        match health_cmd.as_mut() {
                            Some(h) => h.changed().await.is_ok(),
                            None => std::future::pending().await,
                        }
                    }, if inputs_open.1 => {
                        inputs_open.1 = r;
                        Event::Wake
                    }
                    cmd = commands.recv() => match cmd {
                        Some(Cmd::StepDown(reply)) => Event::StepDown(reply),
                        None => Event::Quit,
                    },
                    r = async {
                        match handover.as_mut() {
                            Some(h) => h.await,
                            None => std::future::pending().await,
                        }
                    } => Event::HandoverDone(r),
                    _ = stopping(&mut stop) => Event::Quit,
                }
            };
            match event {
                Event::Wake => {}
                Event::Quit => break,
                Event::StepDown(reply) => self.start_step_down(reply, leading, m.current_leader),
                Event::HandoverDone(r) => self.handover_done(r),
            }
        }
        // Leaving: no more claims. The hook runner releases on stop.
        let _ = self
            .wish
            .send(Wish::Release(self.raft.metrics().borrow().current_term));
    }

    fn health(&self) -> Health {
        let mut h = self.external.borrow().clone();
        if let Some(cmd) = &self.health_cmd {
            h = cmd.borrow().and(&h);
        }
        h
    }

    /// Sets the wish, the campaign gate and hand-overs from the current
    /// view: gathers the [`World`], lets [`decide`] choose, carries it out.
    fn decide(
        &mut self,
        now: Instant,
        leading: Option<u64>,
        term: u64,
        lease: Option<(u64, Instant)>,
    ) {
        use std::sync::atomic::Ordering::SeqCst;
        let health = self.health();
        let before = *self.wish.borrow();
        let world = World {
            now,
            leading,
            term,
            lease,
            vip_configured: self.cfg.vip.is_some(),
            witness: self.cfg.witness,
            healthy: health.ok,
            fallback: self.fallback,
            handover: self.handover.as_ref().map(|_| Running {
                operator: self.reply.is_some(),
                released: self.handing_over.load(SeqCst),
            }),
            before,
            handover_due: now >= self.next_handover,
        };
        let d = decide(&world);
        let stepping_down = world.handover.is_some();

        if self.elect_enabled != Some(d.may_campaign) {
            self.leadership.allow_elect(d.may_campaign);
            self.elect_enabled = Some(d.may_campaign);
            if !d.may_campaign && !self.cfg.witness {
                tracing::warn!(reason = %health.reason, stepping_down, "not campaigning");
            }
        }
        self.may_campaign.send_if_modified(|c| {
            let changed = *c != d.takes_over;
            *c = d.takes_over;
            changed
        });
        if let Some((_, until)) = lease.filter(|(_, until)| now < *until) {
            *self.lease_end.lock().unwrap_or_else(|p| p.into_inner()) = Some(until);
        }
        let wish = d.wish;
        if before != wish {
            match wish {
                Wish::Hold(t, _) if !matches!(before, Wish::Hold(h, _) if h == t) => {
                    tracing::info!(term = t, "leader with a quorum lease: claiming the VIP")
                }
                Wish::Hold(..) => {}
                Wish::Release(_) if d.expired => {
                    tracing::warn!(
                        term,
                        acks = %self.leadership.ack_ages(now),
                        "quorum lease expired: releasing the VIP"
                    )
                }
                Wish::Release(_) if matches!(before, Wish::Hold(..)) => {
                    tracing::info!(
                        term,
                        leading = leading.is_some(),
                        healthy = health.ok,
                        "releasing the VIP"
                    )
                }
                Wish::Release(_) => {}
            }
            let _ = self.wish.send(wish);
        }
        self.status.send_if_modified(|s| {
            let new_wanted = matches!(wish, Wish::Hold(..));
            let changed = s.wanted != new_wanted
                || s.healthy != health.ok
                || s.health_reason != health.reason
                || s.may_campaign != d.may_campaign
                || d.expired;
            s.wanted = new_wanted;
            s.healthy = health.ok;
            s.health_reason = health.reason.clone();
            s.may_campaign = d.may_campaign;
            if d.expired {
                s.lease_expiries += 1;
            }
            changed
        });

        if d.call_off_handover {
            if let Some(h) = self.handover.take() {
                h.abort();
                tracing::info!("fit to lead again: hand-over called off");
            }
        }
        if d.start_handover {
            tracing::warn!(reason = %health.reason, witness = self.cfg.witness, "unfit to lead: handing leadership over");
            self.next_handover = now + self.cfg.handover_wait;
            self.spawn_handover();
        }
    }

    fn start_step_down(
        &mut self,
        reply: oneshot::Sender<Result<StepDown, FailoverError>>,
        leading: Option<u64>,
        leader: Option<NodeId>,
    ) {
        if leading.is_none() {
            let _ = reply.send(Err(FailoverError::NotLeader(leader)));
            return;
        }
        if self.handover.is_some() {
            let _ = reply.send(Err(FailoverError::Busy));
            return;
        }
        tracing::info!("step-down requested: handing leadership over (the VIP is released first)");
        self.reply = Some(reply);
        self.spawn_handover();
        // Release at once, without waiting for the next tick.
        let term = self.raft.metrics().borrow().current_term;
        let now = Instant::now();
        let lease = lease::until(self.leadership.quorum_ack(now), leading, self.cfg.lease);
        self.decide(now, leading, term, lease);
    }

    fn spawn_handover(&mut self) {
        self.status.send_modify(|s| s.handovers += 1);
        self.handing_over
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let ctx = Handover {
            release_now: self.handing_over.clone(),
            wake: self.wake.clone(),
            raft: self.raft.clone(),
            id: self.id,
            peers: self.leadership.peers.clone(),
            liveness: self.leadership.liveness.clone(),
            status: self.status.subscribe(),
            wait_release: self.cfg.hook_timeout + Duration::from_secs(1),
            wait_leader: self.cfg.handover_wait,
            drain: self.cfg.vip.zip(self.cfg.drain.clone()),
            counters: self.status.clone(),
        };
        self.handover = Some(tokio::spawn(ctx.run()));
    }

    fn handover_done(
        &mut self,
        r: Result<Result<StepDown, FailoverError>, tokio::task::JoinError>,
    ) {
        self.handover = None;
        let r =
            r.unwrap_or_else(|e| Err(FailoverError::NoSuccessor(format!("hand-over task: {e}"))));
        match &r {
            Ok(s) => tracing::info!(
                new_leader = s.new_leader,
                took_ms = s.took_ms,
                "leadership handed over"
            ),
            Err(e) => tracing::warn!(cause = %e, "hand-over failed"),
        }
        if let Some(reply) = self.reply.take() {
            let _ = reply.send(r);
        }
    }
}

/// One attempt to move leadership off this node.
struct Handover {
    raft: Raft,
    id: NodeId,
    /// The node's own peer client: the cluster's scheme, CA and secret.
    peers: PeerClient,
    /// Where this node names the candidate it lets win its vote.
    liveness: std::sync::Arc<crate::consensus::elect::Liveness>,
    /// Set once the VIP may go; `wake` makes the watcher act on it at once.
    release_now: std::sync::Arc<std::sync::atomic::AtomicBool>,
    wake: std::sync::Arc<tokio::sync::Notify>,
    status: watch::Receiver<VipStatus>,
    wait_release: Duration,
    wait_leader: Duration,
    /// The VIP and drain settings, when a planned release drains first.
    drain: Option<(IpAddr, drain::DrainConfig)>,
    /// Where the drain counters go.
    counters: watch::Sender<VipStatus>,
}

impl Handover {
    /// Holds new connections back and lets open requests finish while the
    /// VIP is still here, so the move resets none of them.
    async fn drain(&self) -> Option<drain::Hold> {
        let (vip, cfg) = self.drain.as_ref()?;
        if !self.status.borrow().held {
            return None;
        }
        let outcome = drain::drain(*vip, cfg).await;
        let cut = !matches!(&outcome, Ok((_, d)) if d.left == 0);
        self.counters.send_modify(|s| {
            s.drains += 1;
            s.drains_cut += u64::from(cut);
        });
        match outcome {
            Ok((hold, d)) if d.left == 0 => {
                tracing::info!(
                    took_ms = d.took.as_millis() as u64,
                    waited_for = d.open,
                    "drained: no request open, releasing the VIP"
                );
                Some(hold)
            }
            Ok((hold, d)) => {
                tracing::warn!(
                    took_ms = d.took.as_millis() as u64,
                    waited_for = d.open,
                    open = d.left,
                    "drain timed out: releasing the VIP with requests open (--drain-ms)"
                );
                Some(hold)
            }
            Err(e) => {
                tracing::warn!(cause = %e, "cannot hold new connections back: releasing the VIP without a drain");
                None
            }
        }
    }

    #[tracing::instrument(name = "handover", skip_all, fields(node = self.id))]
    async fn run(mut self) -> Result<StepDown, FailoverError> {
        let started = Instant::now();
        let m = self.raft.metrics().borrow().clone();
        if m.current_leader != Some(self.id) {
            return Err(FailoverError::NotLeader(m.current_leader));
        }
        let term = m.current_term;
        // openraft's leader grants no vote until `election_timeout_max`
        // after it took office (its own leader lease); a candidate asked
        // sooner would lose. A long-standing leader waits for nothing, and
        // the VIP stays here meanwhile.
        let window = Duration::from_millis(self.raft.config().election_timeout_max);
        if let Some(since) = self.liveness.leading_since(term) {
            tokio::time::sleep_until((since + window + Duration::from_millis(1)).into()).await;
        }
        // Kept until the release is done; dropping it (also when this task
        // is aborted) lets new connections in again.
        let hold = self.drain().await;
        self.release_now
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.wake.notify_one();
        // The VIP leaves this node before anyone else may claim it; if the
        // release did not finish, nobody is asked to take over (the address
        // could be on two hosts), and the release is retried meanwhile.
        let released = matches!(
            tokio::time::timeout(self.wait_release, self.status.wait_for(|s| !s.held)).await,
            Ok(Ok(_))
        );
        if !released {
            let why = self
                .status
                .borrow()
                .last_error
                .as_ref()
                .and_then(|h| h.error.clone())
                .unwrap_or_else(|| "it did not finish in time".into());
            return Err(FailoverError::NoSuccessor(format!(
                "the VIP release failed, so no other node may claim it yet: {why}"
            )));
        }
        if let Some(hold) = hold {
            hold.end().await;
        }
        let release = self
            .status
            .borrow()
            .last_hook
            .clone()
            .filter(|h| h.action == Action::Release);

        // Most up-to-date voters first: the old leader only votes for a
        // candidate whose log is at least as long as its own.
        let membership = m.membership_config.membership().clone();
        let mut candidates: Vec<(Option<u64>, NodeId, String)> = membership
            .voter_ids()
            .filter(|&v| v != self.id)
            .filter_map(|v| {
                let addr = membership.get_node(&v)?.addr.clone();
                let matched = m
                    .replication
                    .as_ref()
                    .and_then(|r| r.get(&v).cloned().flatten())
                    .map(|l| l.index);
                Some((matched, v, addr))
            })
            .collect();
        candidates.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));

        let peers = &self.peers;
        let request = CampaignRequest {
            from: self.id,
            term,
        };
        let mut why = Vec::new();
        for (_, candidate, addr) in candidates {
            // This node's vote goes to the candidate although it still leads.
            self.liveness
                .set_transfer(Some((candidate, Instant::now() + self.wait_leader)));
            let answer: Result<Result<(), String>, _> = peers
                .call(&addr, "/raft/campaign", &request, self.wait_leader)
                .await;
            match answer {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    why.push(format!("node {candidate}: {e}"));
                    continue;
                }
                Err(e) => {
                    why.push(format!("node {candidate}: {e}"));
                    continue;
                }
            }
            let mut metrics = self.raft.metrics();
            let won = tokio::time::timeout(
                self.wait_leader,
                metrics.wait_for(|x| x.current_leader.is_some_and(|l| l != self.id)),
            )
            .await;
            self.liveness.set_transfer(None);
            if let Ok(Ok(x)) = won {
                return Ok(StepDown {
                    from: self.id,
                    term,
                    new_leader: x.current_leader.unwrap_or(candidate),
                    new_term: x.current_term,
                    took_ms: started.elapsed().as_millis() as u64,
                    release,
                });
            }
            why.push(format!("node {candidate} campaigned but did not win"));
        }
        self.liveness.set_transfer(None);
        if why.is_empty() {
            why.push("no other voter".into());
        }
        Err(FailoverError::NoSuccessor(why.join("; ")))
    }
}
