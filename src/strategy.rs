//! Strategies as pure functions: `plan(spec, state, observations, now)` →
//! the new state, the route to publish, the events to record and when to look
//! again. No I/O, no clock: the controller passes time in, persists what comes
//! back, then applies the route. A test drives a whole canary through its
//! steps with a fake clock in microseconds.
//!
//! What every strategy shares lives here (commands, background analysis,
//! failure and abort); each strategy's own steps, step type, state and
//! special cases live in its file: [`basic`], [`multi`], [`canary`],
//! [`rolling`], [`blue_green`], [`shadow`].

pub mod basic;
pub mod blue_green;
pub mod canary;
pub mod multi;
pub mod rolling;
pub mod shadow;

use serde::{Deserialize, Serialize};

use crate::analysis::{Outcome, Verdict};
use crate::gateway::RoutePolicy;
use crate::records::EventKind;
use crate::spec::{QaSpec, RolloutSpec, ShadowSpec, Strategy};

pub use shadow::{SHADOW_EXAMPLES, ShadowProgress};

/// Where a rollout is (DESIGN.md §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Progressing,
    Paused,
    Succeeded,
    Aborted,
    Failed,
    RolledBack,
}

impl Phase {
    /// `progressing` or `paused`: the model's one active rollout.
    pub fn is_active(self) -> bool {
        matches!(self, Phase::Progressing | Phase::Paused)
    }
}

/// What ends a pause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Waiting {
    Promote,
    Resume,
}

/// What a rollout is: its strategy, or a rollback (`ferry rollback`). Stored
/// with the rollout and shown as `strategy` in the status and history.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutKind {
    Basic,
    Multi,
    Canary,
    Rolling,
    BlueGreen,
    Shadow,
    Rollback,
}

impl RolloutKind {
    /// The kind of a rollout with this strategy.
    pub fn of(strategy: &Strategy) -> RolloutKind {
        match strategy {
            Strategy::Basic(_) => RolloutKind::Basic,
            Strategy::Multi(_) => RolloutKind::Multi,
            Strategy::Canary(_) => RolloutKind::Canary,
            Strategy::Rolling(_) => RolloutKind::Rolling,
            Strategy::BlueGreen(_) => RolloutKind::BlueGreen,
            Strategy::Shadow(_) => RolloutKind::Shadow,
        }
    }

    /// The kind named `text` as stored, if this build knows it.
    pub fn parse(text: &str) -> Option<RolloutKind> {
        use serde::de::IntoDeserializer;
        let de: serde::de::value::StrDeserializer<'_, serde::de::value::Error> =
            text.into_deserializer();
        RolloutKind::deserialize(de).ok()
    }
}

crate::records::display_from_serde!(Phase, Waiting, RolloutKind);

/// Background analysis bookkeeping.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AnalysisProgress {
    pub consecutive_failures: u32,
    pub consecutive_inconclusive: u32,
    /// Passing windows since the current analysis gate began.
    pub gate_passes: u32,
    /// The latest verdict, with its numbers.
    pub last: Option<Verdict>,
    /// When the latest window closed (Unix ms).
    pub last_at_ms: u64,
}

/// A rollout's durable state: everything needed to continue it after a
/// restart, with timers as stored timestamps. Stored as JSON: the field
/// names are the stored ones (each strategy's own state is flattened in, so
/// its fields keep their top-level names), and fields added later default
/// so older rows still read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutState {
    pub phase: Phase,
    pub waiting_for: Option<Waiting>,
    /// Index of the current step (a strategy's own numbering, read through
    /// its step type: [`blue_green::BlueGreenStep`], …).
    pub step: usize,
    /// When the current step began (Unix ms); timed pauses count from it.
    pub step_started_ms: u64,
    /// The route before the rollout began: abort and failure restore it.
    pub before: RoutePolicy,
    /// The route the rollout wants published now.
    pub route: RoutePolicy,
    pub analysis: AnalysisProgress,
    pub message: String,
    /// A shadow's comparisons (`shadow`).
    #[serde(flatten)]
    pub shadow: shadow::ShadowState,
    /// Blue-green's QA gate (`qa`).
    #[serde(flatten)]
    pub blue_green: blue_green::BlueGreenState,
    /// A rolling update taking its batches back (`rolling_back`).
    #[serde(flatten)]
    pub rolling: rolling::RollingState,
    /// When a pause that waits for `resume` began (Unix ms): its timers
    /// stand still until then, and resume moves them on by the time paused.
    #[serde(default)]
    pub paused_at_ms: Option<u64>,
    /// Set when this rollout is a rollback (`ferry rollback`).
    #[serde(default)]
    pub rollback: Option<Rollback>,
    /// The previous stable version's figures from just before production
    /// switched away from it: what "stable" means in later windows.
    #[serde(default)]
    pub baseline: Option<Baseline>,
}

/// A baseline window of the version that was stable when the rollout
/// began, taken by the controller at the switch (DESIGN.md §3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    pub version: String,
    /// When it was taken (Unix ms).
    pub taken_at_ms: u64,
    pub summary: crate::metrics::Summary,
    /// The summary's latency sketch (the summary's own is not serialized).
    pub latency: crate::metrics::sketch::Sketch,
}

impl Baseline {
    pub fn new(version: &str, now_ms: u64, summary: crate::metrics::Summary) -> Baseline {
        Baseline {
            version: version.to_string(),
            taken_at_ms: now_ms,
            latency: summary.latency.clone(),
            summary,
        }
    }

    /// The figures to compare with, sketch included.
    pub fn figures(&self) -> crate::metrics::Summary {
        let mut s = self.summary.clone();
        s.latency = self.latency.clone();
        s
    }
}

/// Whether production no longer reaches the version that was stable when
/// the rollout began (blue-green after its switch, rolling's last batch, a
/// canary at 100 % of everyone): it has no live figures to compare with.
pub fn switched_away(state: &RolloutState) -> bool {
    let route = &state.route;
    route.stable != state.before.stable
        || route
            .candidate
            .as_ref()
            .is_some_and(|c| c.weight >= 100.0 && c.matches.is_empty())
}

/// Whether the pass from `old` to `new` switches production away from the
/// stable version while the rollout goes on: the controller then keeps a
/// baseline of its figures from just before the switch.
pub fn takes_baseline(old: &RolloutState, new: &RolloutState) -> bool {
    new.phase.is_active() && switched_away(new) && !switched_away(old) && new.baseline.is_none()
}

/// The baseline that stands for stable now, if production switched away.
pub fn baseline_in_use(state: &RolloutState) -> Option<&Baseline> {
    state.baseline.as_ref().filter(|_| switched_away(state))
}

/// What a rollback undoes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollback {
    /// The rollout it undoes (`r-3`), when there is one.
    pub undoes: Option<String>,
}

/// A person's (or a pipeline's) command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Promote { full: bool },
    Pause,
    Resume,
    Abort,
}

/// What happened since the last plan.
#[derive(Debug, Clone, Default)]
pub struct Observations {
    /// An analysis window that just closed.
    pub verdict: Option<Verdict>,
    /// A command, and who gave it.
    pub command: Option<(Command, String)>,
    /// Publishing the last route failed (a version could not start).
    pub route_failed: Option<String>,
    /// Shadow comparisons counted since the last observation.
    pub shadow_window: Option<ShadowProgress>,
    /// The QA gate's result, when it just ran.
    pub qa: Option<crate::analysis::qa::QaResult>,
}

impl Observations {
    /// Nothing observed: a pass driven by the clock alone.
    pub fn is_empty(&self) -> bool {
        self.verdict.is_none()
            && self.command.is_none()
            && self.route_failed.is_none()
            && self.shadow_window.is_none()
            && self.qa.is_none()
    }
}

/// An event to record: kind and a sentence a person can read.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedEvent {
    pub kind: EventKind,
    pub message: String,
    /// The numbers behind it (an analysis window's verdict), or null.
    pub data: serde_json::Value,
}

/// The outcome of one plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub state: RolloutState,
    /// Publish this route (already in `state.route`) when it changed.
    pub publish: bool,
    pub events: Vec<PlannedEvent>,
    /// Look again after this many milliseconds (None: only on a new event).
    pub requeue_ms: Option<u64>,
}

impl Plan {
    /// Whether a pass driven by the clock alone changed nothing worth
    /// storing: no event, no route, the same phase and step — at most a
    /// countdown's message moved, which the status computes live from the
    /// stored start.
    pub fn only_countdown(&self, before: &RolloutState) -> bool {
        self.events.is_empty()
            && !self.publish
            && self.state.phase == before.phase
            && self.state.step == before.step
    }

    fn event(&mut self, kind: EventKind, message: impl Into<String>) {
        let message = message.into();
        self.state.message = message.clone();
        self.events.push(PlannedEvent {
            kind,
            message,
            data: serde_json::Value::Null,
        });
    }

    /// Moves to `step`, starting its timers now, and plans again at once.
    fn goto(&mut self, step: usize, now_ms: u64) {
        self.state.step = step;
        self.state.step_started_ms = now_ms;
        self.requeue_ms = Some(0);
    }

    /// The route where `version` takes all traffic, keeping the model's
    /// timeout and breaker settings from before the rollout.
    fn all_to(&self, version: &str) -> RoutePolicy {
        let mut route = RoutePolicy::stable_only(version);
        route.timeout = self.state.before.timeout;
        route.breaker = self.state.before.breaker.clone();
        route
    }

    fn set_route(&mut self, route: RoutePolicy) {
        if route != self.state.route {
            self.state.route = route;
            self.publish = true;
        }
    }

    /// Ends the rollout with the route restored to what it was before.
    fn end_restored(&mut self, phase: Phase, kind: EventKind, message: String) {
        self.state.phase = phase;
        self.state.waiting_for = None;
        let before = self.state.before.clone();
        self.set_route(before);
        self.event(kind, message);
        self.requeue_ms = None;
    }

    fn pause(&mut self, waiting: Waiting, message: String) {
        self.state.phase = Phase::Paused;
        self.state.waiting_for = Some(waiting);
        self.event(EventKind::Paused, message);
    }

    /// Pauses until `resume`, stopping the current step's clock.
    fn pause_for_resume(&mut self, now_ms: u64, message: String) {
        self.pause(Waiting::Resume, message);
        self.state.paused_at_ms = Some(now_ms);
    }

    /// Waits for `ferry promote` (once: a rollout already waiting is left as
    /// it is).
    fn wait_for_promote(&mut self, message: impl FnOnce() -> String) {
        if self.state.waiting_for != Some(Waiting::Promote) {
            self.pause(Waiting::Promote, message());
        }
    }

    /// Ends a `resume` wait: the current step's timers move on by the time
    /// paused, so it continues with the time that was left.
    fn unfreeze(&mut self, now_ms: u64) {
        if let Some(at) = self.state.paused_at_ms.take() {
            self.state.step_started_ms += now_ms.saturating_sub(at);
        }
    }

    /// A timed wait of `length` from the current step's start: `Some(left)`
    /// in milliseconds while it runs (and plans again when it ends).
    fn timer(&mut self, length: std::time::Duration, now_ms: u64) -> Option<u64> {
        let end = self.state.step_started_ms + length.as_millis() as u64;
        let left = end.checked_sub(now_ms).filter(|l| *l > 0)?;
        self.requeue_ms = Some(left);
        Some(left)
    }

    /// With analysis configured, the step that ends a rollout is never taken
    /// on inconclusive windows alone: it waits until the latest window
    /// passed. `Some(why)` while it waits. A candidate that takes no traffic
    /// gets no windows, so nothing is waited for then.
    fn last_step_waits(&self, spec: &RolloutSpec) -> Option<String> {
        spec.analysis.as_ref()?;
        if !analysing(spec, &self.state) {
            return None;
        }
        match &self.state.analysis.last {
            Some(v) if v.outcome == Outcome::Pass => None,
            Some(v) => Some(format!("latest window {}", v.reason)),
            None => Some("no window judged yet".into()),
        }
    }

    /// Says what the rollout waits for and looks again in a second.
    fn waiting(&mut self, message: String) {
        self.state.message = message;
        self.requeue_ms = Some(1_000);
    }
}

/// Seconds left, rounded up, as countdowns show them.
fn secs(ms: u64) -> u64 {
    ms.div_ceil(1000)
}

/// The state of a rollout that has not taken a step yet.
pub fn initial_state(current: &RoutePolicy, now_ms: u64) -> RolloutState {
    RolloutState {
        phase: Phase::Progressing,
        waiting_for: None,
        step: 0,
        step_started_ms: now_ms,
        before: current.clone(),
        route: current.clone(),
        analysis: AnalysisProgress {
            last_at_ms: now_ms,
            ..AnalysisProgress::default()
        },
        message: "starting".into(),
        shadow: Default::default(),
        blue_green: Default::default(),
        rolling: Default::default(),
        paused_at_ms: None,
        rollback: None,
        baseline: None,
    }
}

/// The strategy's own steps, as the status lists them (rolling across
/// instances counts the instances its state fixed).
pub fn steps(spec: &RolloutSpec, state: &RolloutState) -> Vec<String> {
    match &spec.strategy {
        Strategy::Canary(c) => canary::steps(c),
        Strategy::Multi(_) | Strategy::Basic(_) => vec!["switch".into(), "done".into()],
        Strategy::Rolling(r) => rolling::steps(r, &state.rolling),
        Strategy::BlueGreen(_) => blue_green::steps(),
        Strategy::Shadow(sh) => shadow::steps(sh),
    }
}

/// The QA gate to run against green now, if the rollout waits for one (the
/// controller runs it and passes the result in).
pub fn qa_due<'a>(spec: &'a RolloutSpec, state: &RolloutState) -> Option<&'a QaSpec> {
    match &spec.strategy {
        Strategy::BlueGreen(b) if state.phase.is_active() => blue_green::qa_due(b, state),
        _ => None,
    }
}

/// Whether the rollout is mirroring and counting comparisons now (the
/// controller feeds it the shadow counters then).
pub fn counts_comparisons<'a>(
    spec: &'a RolloutSpec,
    state: &RolloutState,
) -> Option<&'a ShadowSpec> {
    match &spec.strategy {
        Strategy::Shadow(sh) if state.phase.is_active() && shadow::mirroring(spec, state) => {
            Some(sh)
        }
        _ => None,
    }
}

/// Which role's telemetry is the candidate's, for analysis: mirrored copies
/// for a shadow, staging traffic for a blue-green candidate before
/// promotion, production traffic otherwise.
pub fn candidate_role(spec: &RolloutSpec, state: &RolloutState) -> crate::metrics::Role {
    use crate::metrics::Role;
    let route = &state.route;
    if route
        .shadow
        .as_ref()
        .is_some_and(|s| s.version == spec.version)
    {
        Role::Shadow
    } else if route.staging.as_deref() == Some(spec.version.as_str()) {
        Role::Staging
    } else if route.stable == spec.version {
        Role::Stable
    } else {
        Role::Candidate
    }
}

/// Whether the candidate takes traffic now, so analysis windows count.
pub fn analysing(spec: &RolloutSpec, state: &RolloutState) -> bool {
    let route = &state.route;
    let takes_traffic = route
        .candidate
        .as_ref()
        .is_some_and(|c| c.version == spec.version && c.weight > 0.0)
        || route
            .shadow
            .as_ref()
            .is_some_and(|s| s.version == spec.version)
        || route.staging.as_deref() == Some(spec.version.as_str())
        // After blue-green's switch and during rolling's last batch the
        // candidate serves production as the stable version.
        || (route.stable == spec.version
            && matches!(spec.strategy, Strategy::BlueGreen(_) | Strategy::Rolling(_)));
    // A shadow counts comparisons every window, with or without checks.
    let counts = matches!(spec.strategy, Strategy::Shadow(_));
    state.phase.is_active() && takes_traffic && (spec.analysis.is_some() || counts)
}

/// Whether the pass goes on after the shared part, or has said all it will.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    Continue,
    Stop,
}

/// One planning pass: the shared part (failure, commands, observations,
/// analysis), then the strategy's own steps.
pub fn plan(spec: &RolloutSpec, state: &RolloutState, obs: &Observations, now_ms: u64) -> Plan {
    let mut p = Plan {
        state: state.clone(),
        publish: false,
        events: Vec::new(),
        requeue_ms: None,
    };
    if !state.phase.is_active() {
        return p;
    }
    if let Some(why) = &obs.route_failed {
        route_failed(spec, &mut p, why, now_ms);
        return p;
    }
    if let Some((command, who)) = &obs.command
        && take_command(&mut p, command, who, now_ms) == Next::Stop
    {
        return p;
    }
    take_observations(spec, &mut p, obs, now_ms);
    if let Some(verdict) = obs.verdict.as_ref().filter(|_| spec.analysis.is_some())
        && judge(spec, &mut p, verdict, now_ms) == Next::Stop
    {
        return p;
    }
    let promote = match &obs.command {
        Some((Command::Promote { full }, who)) => Some((*full, who.clone())),
        _ => None,
    };
    if p.state.phase == Phase::Paused
        && p.state.waiting_for == Some(Waiting::Resume)
        && promote.is_none()
    {
        return p;
    }
    match &spec.strategy {
        Strategy::Basic(_) => basic::plan(spec, &mut p, now_ms),
        Strategy::Multi(m) => multi::plan(spec, m, &mut p, now_ms),
        Strategy::Canary(c) => canary::plan(spec, c, &mut p, promote, 0, now_ms),
        Strategy::Rolling(r) => rolling::plan(spec, r, &mut p, promote, now_ms),
        Strategy::BlueGreen(b) => blue_green::plan(spec, b, &mut p, promote, now_ms),
        Strategy::Shadow(sh) => shadow::plan(spec, sh, &mut p, promote, now_ms),
    }
    p
}

/// A route that could not be published (a version could not start): the
/// rollout fails with the route from before, unless the strategy takes its
/// own way back (rolling's batches).
fn route_failed(spec: &RolloutSpec, p: &mut Plan, why: &str, now_ms: u64) {
    if let Strategy::Rolling(r) = &spec.strategy {
        rolling::batch_failed(spec, r, p, why, now_ms);
        return;
    }
    let message = format!(
        "failed: {why}; version {} keeps serving",
        p.state.before.stable
    );
    p.end_restored(Phase::Failed, EventKind::Failed, message);
}

/// A person's command: abort and pause end the pass; resume and promote
/// restart the clocks and go on.
fn take_command(p: &mut Plan, command: &Command, who: &str, now_ms: u64) -> Next {
    match command {
        Command::Abort => {
            let message = format!(
                "aborted by {who}: all traffic back on version {}",
                p.state.before.stable
            );
            p.end_restored(Phase::Aborted, EventKind::Aborted, message);
            Next::Stop
        }
        Command::Pause => {
            p.pause_for_resume(now_ms, format!("paused by {who}"));
            Next::Stop
        }
        Command::Resume => {
            if p.state.waiting_for == Some(Waiting::Resume) {
                p.state.phase = Phase::Progressing;
                p.state.waiting_for = None;
                p.state.analysis.consecutive_inconclusive = 0;
                p.unfreeze(now_ms);
                p.event(EventKind::Resumed, format!("resumed by {who}"));
            }
            Next::Continue
        }
        Command::Promote { .. } => {
            // A person looked: inconclusive windows count afresh.
            p.state.analysis.consecutive_inconclusive = 0;
            p.unfreeze(now_ms);
            Next::Continue
        }
    }
}

/// Keeps what the controller measured: shadow comparisons, the QA gate's
/// result, when the latest window closed.
fn take_observations(spec: &RolloutSpec, p: &mut Plan, obs: &Observations, now_ms: u64) {
    if let Some(w) = &obs.shadow_window {
        p.state.shadow.add(w);
    }
    if let (Some(qa), Strategy::BlueGreen(_)) = (&obs.qa, &spec.strategy) {
        p.state.blue_green.qa = Some(qa.clone());
    }
    if obs.verdict.is_some() {
        p.state.analysis.last_at_ms = now_ms;
    }
}

/// Records an analysis window with its numbers (so history can say why) and
/// acts on it: too many failed windows abort (rolling takes its batches
/// back), too many inconclusive ones pause for a person.
fn judge(spec: &RolloutSpec, p: &mut Plan, verdict: &Verdict, now_ms: u64) -> Next {
    let limits = spec.analysis.clone().unwrap_or_default();
    record_window(p, verdict, &limits);
    let a = &mut p.state.analysis;
    a.last = Some(verdict.clone());
    match verdict.outcome {
        Outcome::Pass => {
            a.consecutive_failures = 0;
            a.consecutive_inconclusive = 0;
            a.gate_passes += 1;
            Next::Continue
        }
        Outcome::Fail => {
            a.consecutive_failures += 1;
            a.consecutive_inconclusive = 0;
            let n = a.consecutive_failures;
            if let Strategy::Rolling(_) = &spec.strategy {
                rolling::window_failed(p, verdict, now_ms);
                Next::Continue
            } else if n >= limits.failure_limit {
                abort_on_failures(p, verdict, n);
                Next::Stop
            } else {
                Next::Continue
            }
        }
        // A rollout already waiting for a person is not paused again,
        // so its inconclusive windows are not counted towards that.
        Outcome::Inconclusive if p.state.waiting_for.is_none() => {
            a.consecutive_inconclusive += 1;
            let n = a.consecutive_inconclusive;
            if n < limits.max_inconclusive {
                return Next::Continue;
            }
            let message = format!(
                "paused: {n} consecutive inconclusive analysis windows ({}); `ferry resume` to continue",
                verdict.reason
            );
            p.pause_for_resume(now_ms, message);
            Next::Stop
        }
        Outcome::Inconclusive => Next::Continue,
    }
}

/// The window's event: its outcome, where it stands against the limits,
/// and the verdict as data.
fn record_window(p: &mut Plan, verdict: &Verdict, limits: &crate::spec::AnalysisSpec) {
    let a = &p.state.analysis;
    let (kind, count) = match verdict.outcome {
        Outcome::Pass => (
            EventKind::AnalysisPassed,
            format!(" ({} candidate requests)", verdict.candidate_requests),
        ),
        Outcome::Fail => (
            EventKind::AnalysisFailed,
            format!(
                " (failed window {} in a row; {} abort)",
                a.consecutive_failures + 1,
                limits.failure_limit
            ),
        ),
        Outcome::Inconclusive => (
            EventKind::AnalysisInconclusive,
            match p.state.waiting_for {
                Some(w) => format!(" (not counted: already waiting for {w})"),
                None => format!(
                    " ({} of {} before pausing)",
                    a.consecutive_inconclusive + 1,
                    limits.max_inconclusive
                ),
            },
        ),
    };
    p.events.push(PlannedEvent {
        kind,
        message: format!("analysis window{count}: {}", verdict.reason),
        data: serde_json::to_value(verdict).unwrap_or_default(),
    });
}

/// Aborts after `n` failed windows in a row. Inconclusive windows neither
/// break nor extend the run: only a passing window resets it.
fn abort_on_failures(p: &mut Plan, verdict: &Verdict, n: u32) {
    let windows = match n {
        1 => "1 failed window".to_string(),
        n => format!("{n} failed windows with no passing window between them"),
    };
    let requests = verdict.candidate_requests;
    let message = format!(
        "aborted: {} in {windows} ({requests} candidate requests); all traffic back on version {}",
        verdict.reason, p.state.before.stable
    );
    p.end_restored(Phase::Aborted, EventKind::Aborted, message);
}

/// Marks the end of a successful rollout: `route` (already published by the
/// previous pass) is how the model now serves.
fn succeed(p: &mut Plan, spec: &RolloutSpec) {
    p.state.phase = Phase::Succeeded;
    p.state.waiting_for = None;
    p.requeue_ms = None;
    match &p.state.rollback {
        // A rollback's end is what `rolled_back` hooks wait for.
        Some(r) => {
            let undone = r.undoes.as_ref().map_or(String::new(), |u| format!(" {u}"));
            let message = format!(
                "rolled back{undone}: version {} is the stable version of {} again",
                spec.version, spec.model
            );
            p.event(EventKind::RolledBack, message);
        }
        None => p.event(
            EventKind::Succeeded,
            format!(
                "succeeded: version {} is the stable version of {}",
                spec.version, spec.model
            ),
        ),
    }
}

#[cfg(test)]
mod tests;
