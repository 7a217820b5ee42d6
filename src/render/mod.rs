//! Every balancer renders its own haproxy.cfg: watch the applied registry →
//! coalesce → render → skip if identical → write a temp file → validate →
//! atomic rename (previous kept as `.last-good`) → apply through the runtime
//! API, or reload. A config that fails validation never goes live.

pub mod haproxy;
pub mod stat;
pub mod supervise;
pub mod template;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::clock::now_ms;
use crate::model::Registry;
use haproxy::Plan;

/// After a pass (render, write, validate) that took `t`, the next pass waits
/// until `PACE × t` has passed. Under a stream of writes this bounds the
/// share of time a node spends here to 1 / (1 + PACE), however large the
/// config, and everything that changed meanwhile goes into one pass; a lone
/// change after a quiet spell does not wait at all.
const PACE: u32 = 3;
/// The longest such wait. A pass that includes `haproxy -c` is slow on a
/// busy node (it runs at a low priority), and the next change should not
/// wait for long after it: up to 1 s here put the propagation p99 over 1 s.
const MAX_PACE_WAIT: Duration = Duration::from_millis(200);
/// The first and the longest wait after a failed apply (see `run`): a
/// balancer is unfit to lead until haproxy runs its configuration, so it
/// asks again at least every second.
const FIRST_RETRY: Duration = Duration::from_millis(50);
const MAX_RETRY: Duration = Duration::from_secs(1);
/// With haproxy's runtime API, a member-only change goes live without the
/// file (see `Renderer::runtime_fast`); the file follows once writes pause for
/// this long, or at the latest `--file-lag-ms` after the first change it
/// lacks. Under a stream of writes the O(registry) render and write then run
/// once per that interval instead of once per paced pass.
const FILE_QUIET: Duration = Duration::from_millis(200);
/// In haproxy 2.6 an `add server` and a state change each cost time in
/// proportion to the servers of the backend (measured: 0.9 and 0.5 ms at
/// 30k servers, 2.2 ms per added member at 78k), while a reload costs the
/// same for any number of changes. Past this many ops a pass reloads.
const RUNTIME_OPS_MAX: usize = 500;
/// Validation runs at this nice value: it is background work that should
/// not take CPU from Raft on a busy node.
const VALIDATE_NICE: i32 = 10;
pub use template::{NodeContext, Peer, Template, TemplateError};

/// What the renderer renders: the registry plus cluster facts the template may use.
#[derive(Debug, Clone, Default)]
pub struct RenderInput {
    pub index: u64,
    pub registry: Arc<Registry>,
    pub leader: Option<u64>,
    pub peers: Vec<Peer>,
}

pub struct RenderSettings {
    pub output: PathBuf,
    pub template: Arc<Template>,
    /// `{}` is replaced by the file to check; `None` writes unvalidated.
    pub validate_cmd: Option<String>,
    pub haproxy_socket: Option<PathBuf>,
    pub master_socket: Option<PathBuf>,
    pub reload_cmd: Option<String>,
    pub reload_min_interval: Duration,
    pub coalesce: Duration,
    /// How long the file may trail runtime-only changes (see FILE_QUIET);
    /// zero writes it in every pass.
    pub file_lag: Duration,
    pub node: NodeContext,
    /// The built-in template: member-only changes need no `haproxy -c`.
    pub builtin_template: bool,
}

/// How the last apply ended. Serialized lowercase (`"runtime"`), the form
/// `last_apply` has always had in `/v1/node`, `/v1/cluster` and peers' views.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApplyOutcome {
    /// Member changes went live through haproxy's runtime API.
    Runtime,
    /// haproxy reloaded the file.
    Reload,
    /// Written only: no haproxy control is configured.
    Written,
    /// haproxy could not be reached or the reload failed.
    Failed,
}

impl ApplyOutcome {
    /// The serialized name, for text that carries it (the timeline's `how`).
    pub fn as_str(self) -> &'static str {
        match self {
            ApplyOutcome::Runtime => "runtime",
            ApplyOutcome::Reload => "reload",
            ApplyOutcome::Written => "written",
            ApplyOutcome::Failed => "failed",
        }
    }
}

/// This node's render and apply state, for `/v1/cluster` and `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RenderStatus {
    /// Registry index of the config on disk.
    pub rendered_index: u64,
    /// Registry index haproxy is known to run.
    pub applied_index: u64,
    /// The last render, validation or apply error; `None` once one succeeds.
    pub last_error: Option<String>,
    pub last_apply_at_ms: Option<u64>,
    pub last_apply: Option<ApplyOutcome>,
    pub renders: u64,
    pub validate_failures: u64,
    pub runtime_applies: u64,
    pub reloads: u64,
    pub apply_failures: u64,
    pub last_render_ms: f64,
    pub last_validate_ms: f64,
    pub last_apply_ms: f64,
    /// False when rendered files are written without validation (no haproxy).
    pub validating: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("{0}")]
    Template(#[from] TemplateError),
    #[error("write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("haproxy rejected the rendered config: {0}")]
    Invalid(String),
    #[error("run validate command: {0}")]
    ValidateCmd(std::io::Error),
}

/// Renders `input` with `template` for the node described by `node`.
pub fn render_text(
    template: &Template,
    node: &NodeContext,
    input: &RenderInput,
) -> Result<String, TemplateError> {
    let mut node = node.clone();
    node.leader = input.leader;
    node.peers = input.peers.clone();
    template.render(&input.registry, &node)
}

/// Runs the pipeline until `shutdown` turns true. Returns the status channel
/// and the task, which ends once the file holds what haproxy runs.
pub fn spawn(
    settings: RenderSettings,
    input: watch::Receiver<RenderInput>,
    shutdown: watch::Receiver<bool>,
) -> (watch::Receiver<RenderStatus>, tokio::task::JoinHandle<()>) {
    let (tx, rx) = watch::channel(RenderStatus {
        validating: settings.validate_cmd.is_some(),
        ..Default::default()
    });
    (rx, tokio::spawn(run(settings, input, shutdown, tx)))
}

#[tracing::instrument(skip_all, name = "render")]
async fn run(
    settings: RenderSettings,
    mut input: watch::Receiver<RenderInput>,
    mut shutdown: watch::Receiver<bool>,
    status: watch::Sender<RenderStatus>,
) {
    let coalesce = settings.coalesce;
    let mut r = Renderer::new(settings, status);
    input.mark_changed();
    loop {
        let file_due = r.file_due();
        // Due, even while changes keep coming (a wake would always win).
        if file_due.is_some_and(|at| at <= Instant::now()) {
            r.write_behind(&mut shutdown).await;
            continue;
        }
        let wake = async {
            if r.failing {
                tokio::time::sleep(r.retry).await;
                r.retry = (r.retry * 2).min(MAX_RETRY);
            } else {
                let _ = input.changed().await;
            }
        };
        let file = async {
            match file_due {
                Some(at) => tokio::time::sleep_until(at.into()).await,
                None => std::future::pending().await,
            }
        };
        let file_time = tokio::select! {
            // A new registry first: its pass may bring the file up to date anyway.
            biased;
            _ = wake => false,
            _ = shutdown.wait_for(|s| *s) => false,
            _ = file => true,
        };
        if file_time || *shutdown.borrow() {
            r.write_behind(&mut shutdown).await;
            if *shutdown.borrow() {
                return;
            }
            continue;
        }
        // Let a burst of writes land, then render only the latest.
        if !coalesce.is_zero() {
            tokio::time::sleep(coalesce).await;
        }
        if let Some(at) = r.not_before.take() {
            let stop = tokio::select! {
                _ = tokio::time::sleep_until(at.into()) => false,
                _ = shutdown.wait_for(|s| *s) => true,
            };
            if stop {
                r.write_behind(&mut shutdown).await;
                return;
            }
        }
        let current = input.borrow_and_update().clone();
        r.pass(current, &mut shutdown).await;
    }
}

/// The render pipeline's state between passes: what is written, validated
/// and live, and the pacing and retry of the next pass.
struct Renderer {
    settings: RenderSettings,
    status: watch::Sender<RenderStatus>,
    /// The text of the file last installed.
    written: Option<String>,
    /// Services are never deleted, so a registry with fewer services than
    /// the last installed config is transient (a node catching up after a
    /// restart or a fresh data dir): it must not empty a serving balancer.
    services_file: PathBuf,
    installed_services: Vec<String>,
    /// The registry haproxy runs; `None` until our first reload, since we
    /// do not know what a running haproxy loaded before we started.
    live: Option<Arc<Registry>>,
    /// The registry of the last file the validate command accepted.
    validated: Option<Arc<Registry>>,
    last_reload: Option<Instant>,
    /// Member changes through the admin socket, and servers being removed.
    runtime: Option<haproxy::Runtime>,
    /// After a failed apply: the wait before the next try, doubling to 1 s.
    /// It starts short because the usual failure is a haproxy that is still
    /// starting beside a restarted clbd, and the node may not lead until
    /// haproxy runs its configuration (failover's health gate).
    retry: Duration,
    failing: bool,
    /// When the next pass may start (see PACE).
    not_before: Option<Instant>,
    /// What haproxy runs when the file lacks it (member changes applied
    /// through the runtime API only), and since when; `None` while the file
    /// is current.
    file_behind: Option<RenderInput>,
    behind_since: Option<Instant>,
    /// When the last runtime-only change went live.
    last_fast: Option<Instant>,
    /// The haproxy worker that runs `live`, by pid, once known. The file
    /// lags what that process runs, so another process (haproxy restarted
    /// by its supervisor or by systemd, or reloaded by someone else) loaded
    /// a stale file and must be reloaded with a current one.
    haproxy_pid: Option<u32>,
    /// Counts installed files, so a reload that finished late can be
    /// matched to the file it loaded.
    installs: u64,
    /// A master-CLI reload still loading when its wait ended, and the
    /// install it loads: followed instead of issued again.
    pending_reload: Option<(haproxy::PendingReload, u64)>,
}

impl Renderer {
    fn new(settings: RenderSettings, status: watch::Sender<RenderStatus>) -> Self {
        let services_file = sibling(&settings.output, ".services");
        let installed_services = std::fs::read_to_string(&services_file)
            .map(|t| t.lines().map(str::to_string).collect())
            .unwrap_or_default();
        let runtime = settings.haproxy_socket.clone().map(haproxy::Runtime::new);
        Renderer {
            settings,
            status,
            written: None,
            services_file,
            installed_services,
            live: None,
            validated: None,
            last_reload: None,
            runtime,
            retry: FIRST_RETRY,
            failing: false,
            not_before: None,
            file_behind: None,
            behind_since: None,
            last_fast: None,
            haproxy_pid: None,
            installs: 0,
            pending_reload: None,
        }
    }

    /// A runtime plan of more than RUNTIME_OPS_MAX ops becomes a reload,
    /// where one can be made.
    fn bulk_reloads(&self, plan: Plan) -> Plan {
        match plan {
            Plan::Runtime(ops) if self.can_reload() && ops.len() > RUNTIME_OPS_MAX => {
                tracing::info!(
                    ops = ops.len(),
                    "a large member change: reloading instead of one runtime command per server"
                );
                Plan::Reload
            }
            plan => plan,
        }
    }

    fn can_reload(&self) -> bool {
        self.settings.reload_cmd.is_some() || self.settings.master_socket.is_some()
    }

    /// When the file must catch up with what haproxy runs (see FILE_QUIET).
    fn file_due(&self) -> Option<Instant> {
        self.file_behind.as_ref()?;
        let first = self.behind_since?;
        let lag = self.settings.file_lag;
        let quiet = self.last_fast.unwrap_or(first) + FILE_QUIET.min(lag);
        Some(quiet.min(first + lag))
    }

    /// True when haproxy runs a process other than the one `live` was
    /// applied to (or cannot say which); remembers the pid on first sight.
    async fn haproxy_replaced(&mut self) -> bool {
        let Some(rt) = &self.runtime else {
            return false;
        };
        match (rt.pid().await, self.haproxy_pid) {
            (Ok(now), Some(known)) if now == known => false,
            (Ok(now), None) => {
                self.haproxy_pid = Some(now);
                false
            }
            (Ok(now), Some(known)) => {
                tracing::warn!(
                    known,
                    now,
                    "haproxy was restarted or reloaded outside clbd; reloading it with a current config"
                );
                true
            }
            (Err(e), _) => {
                tracing::warn!(cause = %e, "cannot ask haproxy which process runs; reloading");
                true
            }
        }
    }

    /// A member-only change with the built-in template goes live through
    /// the runtime API and leaves the file for later: rendering and writing
    /// it is O(registry), the runtime ops are O(change). True when done;
    /// false (with `live` forgotten when haproxy's state is unknown) when
    /// the full pass must run instead.
    async fn runtime_fast(&mut self, current: &RenderInput) -> bool {
        if self.failing || !self.settings.builtin_template || self.settings.file_lag.is_zero() {
            return false;
        }
        let (Some(live), Some(_)) = (&self.live, &self.runtime) else {
            return false;
        };
        let plan = self.bulk_reloads(haproxy::plan(live, &current.registry));
        if !matches!(plan, Plan::Runtime(_) | Plan::Nothing) {
            return false;
        }
        if self.haproxy_replaced().await {
            self.live = None;
            return false;
        }
        let t = Instant::now();
        let Some(rt) = &self.runtime else {
            return false;
        };
        let applied = match &plan {
            Plan::Runtime(ops) => rt.apply(ops).await,
            _ => Ok(()),
        };
        // Removed servers stay in maint; past a bound a reload drops them,
        // and a failed op leaves haproxy's state unknown: both take the full
        // pass, which writes the file before it reloads.
        if applied.is_err() || rt.retired().await >= haproxy::RETIRED_RELOAD_AT {
            if let Err(e) = applied {
                tracing::warn!(cause = %e, "runtime API change failed; reloading instead");
            }
            self.live = None;
            return false;
        }
        let now = Instant::now();
        if self.file_behind.replace(current.clone()).is_none() {
            self.behind_since = Some(now);
        }
        self.last_fast = Some(now);
        self.record(current, Ok(ApplyOutcome::Runtime), ms(t.elapsed()));
        true
    }

    /// Brings the file up to what haproxy runs, after runtime-only changes
    /// (also on shutdown, so a haproxy restarted later loads what it ran).
    async fn write_behind(&mut self, shutdown: &mut watch::Receiver<bool>) {
        let Some(ran) = self.file_behind.take() else {
            return;
        };
        // A replaced haproxy loaded the stale file: reload it with this one.
        if !*shutdown.borrow() && self.haproxy_replaced().await {
            self.live = None;
            self.pass(ran, shutdown).await;
            return;
        }
        let t0 = Instant::now();
        let rendered = self.render(&ran).await;
        let render_ms = ms(t0.elapsed());
        let written = match rendered {
            // Differs from the last validated file only in server lines, as
            // a runtime-applied pass's file always did (see `pass`).
            Some(text) if self.written.as_deref() == Some(text.as_str()) => true,
            Some(text) => self.install(&ran, text, false).await,
            None => false,
        };
        if !written {
            // Logged and shown by render/install; try again a quiet period
            // from now rather than at once (a full disk stays full a while).
            self.file_behind = Some(ran);
            self.behind_since = Some(Instant::now());
            self.last_fast = None;
            return;
        }
        self.not_before = pace(t0.elapsed());
        self.status.send_modify(|s| {
            s.rendered_index = ran.index;
            s.renders += 1;
            s.last_render_ms = render_ms;
        });
    }

    /// One pass: render `current`, install it if it changed, apply it.
    async fn pass(&mut self, current: RenderInput, shutdown: &mut watch::Receiver<bool>) {
        if let Some(msg) = self.catching_up(&current) {
            tracing::warn!("{msg}");
            self.status.send_modify(|s| s.last_error = Some(msg));
            self.failing = false;
            return;
        }
        if self.runtime_fast(&current).await {
            return;
        }
        let t0 = Instant::now();
        let Some(text) = self.render(&current).await else {
            return;
        };
        let render_ms = ms(t0.elapsed());
        let unchanged = self.written.as_deref() == Some(text.as_str());
        if unchanged {
            self.file_behind = None;
        }
        self.not_before = pace(t0.elapsed());
        if unchanged && !self.failing {
            self.same_text(&current);
            return;
        }
        // Apply: runtime API when only members changed, else a reload.
        let plan = match (&self.live, &self.runtime) {
            (Some(l), Some(_)) => self.bulk_reloads(haproxy::plan(l, &current.registry)),
            _ => Plan::Reload,
        };
        // A member-only change with the built-in template differs from the
        // last validated file only in server lines built from validated
        // values; haproxy's runtime API checks each one as it applies it, and
        // the file is validated again before any reload reads it. Skipping
        // `haproxy -c` here keeps a member change cheap at any registry size.
        // The same holds against the last validated registry when no runtime
        // API is configured (the file is only written): otherwise every node
        // runs `haproxy -c` for every batch of registrations.
        let member_only = |base: &Registry| {
            matches!(
                haproxy::plan(base, &current.registry),
                Plan::Runtime(_) | Plan::Nothing
            )
        };
        let runtime_only = matches!(plan, Plan::Runtime(_) | Plan::Nothing)
            || self.validated.as_deref().is_some_and(member_only);
        let validate = !(runtime_only && self.settings.builtin_template);
        if !unchanged {
            let t1 = Instant::now();
            if !self.install(&current, text, validate).await {
                return;
            }
            self.file_behind = None;
            let validate_ms = ms(t1.elapsed());
            self.not_before = pace(t0.elapsed());
            self.status.send_modify(|s| {
                s.rendered_index = current.index;
                s.renders += 1;
                s.last_render_ms = render_ms;
                s.last_validate_ms = validate_ms;
            });
        }
        let t2 = Instant::now();
        let outcome = self.apply(plan, validate, shutdown).await;
        self.record(&current, outcome, ms(t2.elapsed()));
    }

    /// Why `current` must not be rendered yet: it lacks services the
    /// installed config serves.
    fn catching_up(&self, current: &RenderInput) -> Option<String> {
        let missing: Vec<&String> = self
            .installed_services
            .iter()
            .filter(|s| !current.registry.services.contains_key(*s))
            .collect();
        (!missing.is_empty()).then(|| {
            format!(
                "registry at index {} lacks services the installed config serves ({}); waiting to catch up before rendering",
                current.index,
                missing.iter().take(5).map(|s| s.as_str()).collect::<Vec<_>>().join(", ")
            )
        })
    }

    /// The config text, or `None` after reporting why there is none.
    async fn render(&mut self, current: &RenderInput) -> Option<String> {
        // Off the async workers: at 100k members a render takes tens of ms,
        // which would stall the Raft and API tasks sharing those threads.
        let job = (
            self.settings.template.clone(),
            self.settings.node.clone(),
            current.clone(),
        );
        let rendered = tokio::task::spawn_blocking(move || render_text(&job.0, &job.1, &job.2))
            .await
            .unwrap_or_else(|e| Err(TemplateError::Task(e.to_string())));
        match rendered {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::error!(cause = %e, "render failed; the last good config keeps serving");
                self.status
                    .send_modify(|s| s.last_error = Some(e.to_string()));
                self.failing = false;
                None
            }
        }
    }

    /// The text is what haproxy already has (or was given): only indexes move.
    fn same_text(&mut self, current: &RenderInput) {
        let live_now = self.live.as_ref().is_some_and(|l| **l == *current.registry);
        self.status.send_modify(|s| {
            s.rendered_index = current.index;
            if live_now {
                s.applied_index = current.index;
            }
        });
        if let Some(l) = &mut self.live {
            // Same text, so haproxy already runs this; keep the newest registry for diffs.
            if **l == *current.registry {
                *l = current.registry.clone();
            }
        }
    }

    /// Records the services, then validates (when `validate`) and installs
    /// `text`; false after reporting a failure.
    async fn install(&mut self, current: &RenderInput, text: String, validate: bool) -> bool {
        // Recorded before the config goes live: a clbd killed between the
        // two would otherwise come back with a config serving services its
        // record lacks, and an empty data dir would then empty it. Services
        // are never deleted, so the record may run ahead of a config that
        // then fails to install.
        let names: Vec<String> = current.registry.services.keys().cloned().collect();
        if names != self.installed_services {
            // Best effort: without it the guard only covers this process's lifetime.
            if let Err(e) = record_services(&self.services_file, &names).await {
                tracing::warn!(cause = %e, file = %self.services_file.display(), "could not record installed services");
            }
            self.installed_services = names;
        }
        if let Err(e) = install(&self.settings, &text, validate).await {
            tracing::error!(cause = %e, "config not installed; the last good config keeps serving");
            self.status.send_modify(|s| {
                s.last_error = Some(e.to_string());
                if matches!(e, RenderError::Invalid(_)) {
                    s.validate_failures += 1;
                }
            });
            self.failing = false;
            return false;
        }
        self.written = Some(text);
        self.installs += 1;
        if validate && self.settings.validate_cmd.is_some() {
            self.validated = Some(current.registry.clone());
        }
        true
    }

    /// Makes haproxy run the installed file: through the runtime API, a
    /// reload, or not at all (no haproxy control configured).
    async fn apply(
        &mut self,
        plan: Plan,
        validated: bool,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<ApplyOutcome, String> {
        let can_reload = self.can_reload();
        match plan {
            Plan::Nothing => Ok(ApplyOutcome::Runtime),
            Plan::Runtime(ops) => {
                let Some(rt) = &self.runtime else {
                    unreachable!("a runtime plan is only made with a runtime (pass)")
                };
                let applied = rt.apply(&ops).await;
                // Removed servers stay in maint (haproxy.rs, Runtime); past a
                // bound a reload drops them.
                let crowded = applied.is_ok() && rt.retired().await >= haproxy::RETIRED_RELOAD_AT;
                match applied {
                    Ok(()) if !(can_reload && crowded) => Ok(ApplyOutcome::Runtime),
                    Err(e) if !can_reload => Err(e.to_string()),
                    other => {
                        match other {
                            Ok(()) => tracing::info!(
                                retired = haproxy::RETIRED_RELOAD_AT,
                                "many removed servers kept in maint: reloading to drop them"
                            ),
                            Err(e) => {
                                tracing::warn!(cause = %e, "runtime API change failed; reloading instead")
                            }
                        }
                        self.reload(validated, shutdown).await
                    }
                }
            }
            Plan::Reload if can_reload => self.reload(validated, shutdown).await,
            Plan::Reload => Ok(ApplyOutcome::Written),
        }
    }

    /// Reloads haproxy with the installed file, which `validated` says was
    /// validated when installed, or follows a reload still loading.
    async fn reload(
        &mut self,
        validated: bool,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Result<ApplyOutcome, String> {
        // The new worker's pid is learnt at the next runtime-only change.
        self.haproxy_pid = None;
        if let Some(outcome) = self.follow_pending().await {
            return outcome;
        }
        // A member-only file may have skipped validation (pass); a reload
        // reads only a validated one.
        validate_installed(&self.settings, validated)
            .await
            .map_err(|e| e.to_string())?;
        let done = reload(
            &self.settings,
            self.runtime.as_ref(),
            &mut self.last_reload,
            shutdown,
        )
        .await;
        match done {
            Ok(()) => Ok(ApplyOutcome::Reload),
            Err(ReloadError::Haproxy(haproxy::HaproxyError::ReloadLoading(p))) => {
                Err(self.keep_pending(p, self.installs))
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// Follows a reload still loading from an earlier pass: `Some` while it
    /// loads, or once it finished with the file installed now; `None` when
    /// a reload must be issued.
    async fn follow_pending(&mut self) -> Option<Result<ApplyOutcome, String>> {
        let (pending, installs) = self.pending_reload.take()?;
        let progress = match self.settings.master_socket.as_deref() {
            Some(master) => haproxy::reload_progress(master, &pending).await,
            None => haproxy::ReloadProgress::Failed,
        };
        match progress {
            haproxy::ReloadProgress::Loading => Some(Err(self.keep_pending(pending, installs))),
            // It loaded the file installed now: nothing more to do.
            haproxy::ReloadProgress::Done if installs == self.installs => {
                tracing::info!(
                    after_s = pending.issued.elapsed().as_secs(),
                    "a slow reload finished"
                );
                Some(Ok(ApplyOutcome::Reload))
            }
            // A newer file, or a failed load: reload now.
            _ => None,
        }
    }

    /// Remembers `pending` (loading the file of install `installs`) for
    /// the next pass to follow; returns what the status says meanwhile.
    fn keep_pending(&mut self, pending: haproxy::PendingReload, installs: u64) -> String {
        let said = haproxy::HaproxyError::ReloadLoading(pending.clone()).to_string();
        self.pending_reload = Some((pending, installs));
        said
    }

    /// What the apply did, for the status and the next pass.
    fn record(
        &mut self,
        current: &RenderInput,
        outcome: Result<ApplyOutcome, String>,
        apply_ms: f64,
    ) {
        match outcome {
            Ok(how) => {
                if self.failing {
                    tracing::info!("haproxy caught up");
                }
                self.failing = false;
                self.retry = FIRST_RETRY;
                self.live = (how != ApplyOutcome::Written).then(|| current.registry.clone());
                self.status.send_modify(|s| {
                    s.applied_index = current.index;
                    s.last_error = None;
                    s.last_apply = Some(how);
                    s.last_apply_at_ms = Some(now_ms());
                    s.last_apply_ms = apply_ms;
                    match how {
                        ApplyOutcome::Reload => s.reloads += 1,
                        ApplyOutcome::Runtime => s.runtime_applies += 1,
                        ApplyOutcome::Written | ApplyOutcome::Failed => {}
                    }
                });
            }
            Err(e) => {
                if !self.failing {
                    tracing::error!(cause = %e, "apply failed; the file is written and will be applied when haproxy answers");
                }
                self.failing = true;
                // Unknown state: the next success must be a full reload.
                self.live = None;
                self.status.send_modify(|s| {
                    s.last_error = Some(format!("apply: {e}"));
                    s.last_apply = Some(ApplyOutcome::Failed);
                    s.last_apply_at_ms = Some(now_ms());
                    s.apply_failures += 1;
                });
            }
        }
    }
}

/// When the next pass may start, after one that kept this task busy for
/// `busy` (see PACE).
fn pace(busy: Duration) -> Option<Instant> {
    Some(Instant::now() + (busy * PACE).min(MAX_PACE_WAIT))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1_000.0
}

/// At most one reload at a time (this task is the only caller) and at most one
/// per `reload_min_interval`.
async fn reload(
    settings: &RenderSettings,
    runtime: Option<&haproxy::Runtime>,
    last: &mut Option<Instant>,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), ReloadError> {
    if let Some(prev) = *last {
        let wait = settings.reload_min_interval.saturating_sub(prev.elapsed());
        if !wait.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.wait_for(|s| *s) => return Err(ReloadError::ShuttingDown),
            }
        }
    }
    *last = Some(Instant::now());
    if let Some(rt) = runtime {
        rt.forget_retired().await;
    }
    haproxy::reload(
        settings.reload_cmd.as_deref(),
        settings.master_socket.as_deref(),
    )
    .await
    .map_err(ReloadError::Haproxy)
}

#[derive(Debug, thiserror::Error)]
enum ReloadError {
    #[error("shutting down")]
    ShuttingDown,
    #[error("{0}")]
    Haproxy(haproxy::HaproxyError),
}

/// Validates the installed file before a reload, unless `install` already did.
async fn validate_installed(settings: &RenderSettings, validated: bool) -> Result<(), RenderError> {
    match (&settings.validate_cmd, validated) {
        (Some(cmd), false) => validate(cmd, &settings.output).await,
        _ => Ok(()),
    }
}

/// Replaces the record of installed services whole (write, sync, rename),
/// so a crash leaves the old record or the new one.
async fn record_services(path: &Path, names: &[String]) -> std::io::Result<()> {
    let tmp = sibling(path, ".tmp");
    write_synced(&tmp, names.join("\n").as_bytes()).await?;
    tokio::fs::rename(&tmp, path).await
}

/// Creates `path` with `bytes` and syncs it before returning.
async fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let mut f = tokio::fs::File::create(path).await?;
    f.write_all(bytes).await?;
    f.sync_all().await
}

/// Writes `text` beside the output, validates it (when `validate_it` and a
/// validate command is set), keeps the previous file as `.last-good`, and
/// renames the new one into place.
pub async fn install(
    settings: &RenderSettings,
    text: &str,
    validate_it: bool,
) -> Result<(), RenderError> {
    let out = &settings.output;
    let tmp = sibling(out, ".tmp");
    let write_err = |source| RenderError::Write {
        path: tmp.display().to_string(),
        source,
    };
    write_synced(&tmp, text.as_bytes())
        .await
        .map_err(write_err)?;
    if let (Some(cmd), true) = (&settings.validate_cmd, validate_it) {
        if let Err(e) = validate(cmd, &tmp).await {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
    }
    let rename_err = |source| RenderError::Write {
        path: out.display().to_string(),
        source,
    };
    if tokio::fs::metadata(out).await.is_ok() {
        // hard link + rename: `.last-good` is replaced atomically too.
        let lg_tmp = sibling(out, ".last-good.tmp");
        let _ = tokio::fs::remove_file(&lg_tmp).await;
        // A file clbd does not own (the packaged haproxy.cfg, root's) cannot
        // be hard-linked under fs.protected_hardlinks: copy it that once.
        if tokio::fs::hard_link(out, &lg_tmp).await.is_err() {
            tokio::fs::copy(out, &lg_tmp).await.map_err(rename_err)?;
        }
        tokio::fs::rename(&lg_tmp, sibling(out, ".last-good"))
            .await
            .map_err(rename_err)?;
    }
    tokio::fs::rename(&tmp, out).await.map_err(rename_err)?;
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        if let Ok(d) = tokio::fs::File::open(dir).await {
            let _ = d.sync_all().await;
        }
    }
    Ok(())
}

fn sibling(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

async fn validate(cmd: &str, file: &Path) -> Result<(), RenderError> {
    let line = cmd.replace("{}", &file.display().to_string());
    let mut command = tokio::process::Command::new("sh");
    command.arg("-c").arg(&line).kill_on_drop(true);
    // SAFETY: the closure runs in the forked child before exec and only makes
    // setpriority(2), which is async-signal-safe; failure just keeps the nice.
    unsafe {
        command.pre_exec(|| {
            libc::setpriority(libc::PRIO_PROCESS, 0, VALIDATE_NICE);
            Ok(())
        });
    }
    let out = command.output().await.map_err(RenderError::ValidateCmd)?;
    if out.status.success() {
        return Ok(());
    }
    let mut msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
    if msg.is_empty() {
        msg = String::from_utf8_lossy(&out.stdout).trim().to_string();
    }
    let msg: String = msg.lines().take(6).collect::<Vec<_>>().join(" | ");
    Err(RenderError::Invalid(format!("{}: {msg}", out.status)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `last_apply` keeps the JSON it had as a string, and `as_str` agrees with it.
    #[test]
    fn apply_outcomes_serialize_as_before() {
        use ApplyOutcome::*;
        for (how, text) in [
            (Runtime, "runtime"),
            (Reload, "reload"),
            (Written, "written"),
            (Failed, "failed"),
        ] {
            assert_eq!(serde_json::to_value(how).unwrap(), text);
            assert_eq!(how.as_str(), text);
            let back: ApplyOutcome = serde_json::from_value(text.into()).unwrap();
            assert_eq!(back, how);
        }
        let s = RenderStatus {
            last_apply: Some(Runtime),
            ..Default::default()
        };
        let v = serde_json::to_value(&s).unwrap();
        assert_eq!(v["last_apply"], "runtime");
        let none = serde_json::to_value(RenderStatus::default()).unwrap();
        assert!(none["last_apply"].is_null());
    }
}
