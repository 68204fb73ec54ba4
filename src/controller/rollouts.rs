//! Rollouts: creating them, stepping them through their strategy's plan,
//! commands from people, the background loop (timers, analysis windows with
//! the stable baseline after a switch, live shadow counts), and the status
//! view. Every pass persists the new state with its events
//! *before* the route it wants is applied; a restart picks up from the store.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{ControlError, Controller, dataset, external};
use crate::analysis::qa::QaResult;
use crate::analysis::{self, CheckResult, Outcome};
use crate::gateway::RoutePolicy;
use crate::metrics::{Role, SeriesSummary};
use crate::records::EventKind;
use crate::registry::RegistryError;
use crate::spec::{BasicSpec, QaSpec, RolloutSpec, Strategy};
use crate::store::{Fence, NewEvent, NotCreated, RolloutRecord, Term};
use crate::strategy::{self, Command, Observations, Phase, RolloutKind, RolloutState, Waiting};
use crate::units::now_ms;

/// A mirroring rollout's shadow counters as last fed to it.
#[derive(Debug, Clone, Copy)]
pub(super) struct ShadowReading {
    /// Agreed, disagreed, failed, dropped (the Prometheus counters).
    counts: [u64; 4],
    /// The last disagreement example number taken.
    example: u64,
    fed_at_ms: u64,
}

/// Whether `apply` created a rollout or found the same one running.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Applied {
    Created,
    Unchanged,
}

/// The latest analysis window, as the status shows it.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AnalysisView {
    pub verdict: Outcome,
    /// The window's length, e.g. `10s`.
    pub window: String,
    pub reason: String,
    pub candidate_requests: u64,
    pub stable_requests: u64,
    pub checks: Vec<CheckResult>,
    pub consecutive_failures: u32,
    pub consecutive_inconclusive: u32,
}

/// A shadow rollout's comparisons so far.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ShadowView {
    pub comparisons: u64,
    pub agreement: Option<f64>,
    pub disagree: u64,
    pub errors: u64,
    pub dropped: u64,
    /// The latest disagreements (request id and both outputs).
    pub examples: Vec<crate::metrics::Disagreement>,
}

impl AnalysisView {
    /// A rollout's latest analysis window, live or, once the rollout has
    /// ended, the one it ended with (the evidence behind an abort).
    fn of(r: &RolloutRecord) -> Option<AnalysisView> {
        let v = r.state.analysis.last.as_ref()?;
        let interval = r
            .spec
            .analysis
            .as_ref()
            .map_or(Duration::from_secs(10), |a| a.interval.0);
        Some(AnalysisView {
            verdict: v.outcome,
            window: crate::units::HumanDuration(interval).to_string(),
            reason: v.reason.clone(),
            candidate_requests: v.candidate_requests,
            stable_requests: v.stable_requests,
            checks: v.checks.clone(),
            consecutive_failures: r.state.analysis.consecutive_failures,
            consecutive_inconclusive: r.state.analysis.consecutive_inconclusive,
        })
    }
}

impl ShadowView {
    /// A shadow rollout's comparisons and examples, as stored with it (so
    /// the counts always cover the examples).
    fn of(r: &RolloutRecord) -> Option<ShadowView> {
        let s = &r.state.shadow.compared;
        matches!(r.spec.strategy, Strategy::Shadow(_)).then(|| ShadowView {
            comparisons: s.compared(),
            agreement: s.agreement(),
            disagree: s.disagree,
            errors: s.errors,
            dropped: s.dropped,
            examples: s.examples.clone(),
        })
    }
}

/// A model's phase in the status: its active rollout's, or `idle` when none
/// is active.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelPhase {
    Idle,
    #[serde(untagged)]
    Rollout(Phase),
}

impl std::fmt::Display for ModelPhase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ModelPhase::Rollout(phase) => phase.fmt(f),
            idle => f.write_str(crate::records::variant_name(idle).unwrap_or("idle")),
        }
    }
}

/// The last rollout when none is active, so a watcher can tell how it ended.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct LastRollout {
    pub rollout: String,
    #[schema(value_type = String)]
    pub strategy: RolloutKind,
    pub phase: Phase,
    pub message: String,
}

/// A model's rollout status (DESIGN.md §5).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Status {
    pub model: String,
    pub stable: Option<String>,
    pub candidate: Option<String>,
    pub rollout: Option<String>,
    #[schema(value_type = Option<String>)]
    pub strategy: Option<RolloutKind>,
    /// `idle` when no rollout is active, else the rollout's phase.
    #[schema(value_type = String)]
    pub phase: ModelPhase,
    pub waiting_for: Option<Waiting>,
    pub steps: Vec<String>,
    pub step: Option<usize>,
    /// Configured share of production traffic per version (of the cohort,
    /// for a cohort canary).
    pub traffic: BTreeMap<String, f64>,
    /// Share actually answered over the last 10 s.
    pub observed: BTreeMap<String, f64>,
    /// The same requests by the protocol they came over (REST or gRPC).
    #[serde(default)]
    pub protocols: Protocols,
    pub message: String,
    pub analysis: Option<AnalysisView>,
    pub updated_at: Option<String>,
    pub last_rollout: Option<LastRollout>,
    /// Shadow rollouts: agreement so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shadow: Option<ShadowView>,
    /// Blue-green rollouts: the QA gate's result.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qa: Option<QaResult>,
    /// Blue-green rollouts: the version in staging.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub staging: Option<String>,
}

/// How long back the status's traffic figures (`observed`, `protocols`) look.
const OBSERVED_WINDOW: Duration = Duration::from_secs(10);

/// Requests answered over the status's recent window, by the front door
/// they came through: the requests `observed` shares out (production's
/// versions: stable, candidate and fallbacks; not shadow copies, staging or
/// version-addressed requests).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Protocols {
    /// Seconds the counts cover.
    pub seconds: u64,
    pub rest: u64,
    pub grpc: u64,
    /// The same split for each version that answered.
    pub versions: BTreeMap<String, ProtocolCounts>,
}

/// Requests over REST and over gRPC.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ProtocolCounts {
    pub rest: u64,
    pub grpc: u64,
}

/// What an A/B report covers: the 5-second buckets from the one the
/// rollout started in through the one filling now (this instance's part of
/// it: the others flush theirs as it closes), at most 15 minutes of them,
/// what the buckets keep. The start's bucket also holds what came just
/// before the start: stable's own traffic, a fair part of its arm, but
/// also, when the previous rollout ended in it, that rollout's candidate
/// traffic; then it is left out (`None` while it is the one filling).
#[derive(Debug, Clone, Copy, PartialEq)]
struct ReportSpan {
    /// The last bucket counted (the filling one).
    last: u64,
    window: Duration,
    /// The seconds of traffic it holds so far.
    seconds: u64,
}

fn report_span(started_ms: u64, previous_end_ms: Option<u64>, now_ms: u64) -> Option<ReportSpan> {
    use crate::metrics::window::{BUCKET_SECS, RING};
    let bucket = |ms: u64| ms / 1000 / BUCKET_SECS;
    let first = match previous_end_ms {
        Some(end) if bucket(end) == bucket(started_ms) => started_ms.div_ceil(1000 * BUCKET_SECS),
        _ => bucket(started_ms),
    };
    let filling = bucket(now_ms);
    let buckets = (filling + 1).checked_sub(first).filter(|n| *n > 0)?;
    let buckets = buckets.min(RING as u64);
    let from_ms = (filling + 1 - buckets) * BUCKET_SECS * 1000;
    Some(ReportSpan {
        last: filling,
        window: Duration::from_secs(buckets * BUCKET_SECS),
        seconds: (now_ms - from_ms) / 1000,
    })
}

/// What production answered over the status's window: each version's share
/// of the requests (in percent, to a tenth), and those requests by protocol.
fn observed(summaries: &[SeriesSummary]) -> (BTreeMap<String, f64>, Protocols) {
    let mut by_version: BTreeMap<String, ProtocolCounts> = BTreeMap::new();
    for s in summaries {
        if matches!(s.role, Role::Stable | Role::Candidate | Role::Fallback) {
            let counts = by_version.entry(s.version.clone()).or_default();
            counts.grpc += s.summary.grpc;
            counts.rest += s.summary.requests.saturating_sub(s.summary.grpc);
        }
    }
    let seconds = summaries
        .first()
        .map_or(OBSERVED_WINDOW.as_secs(), |s| s.summary.seconds);
    by_version.retain(|_, c| c.rest + c.grpc > 0);
    let rest = by_version.values().map(|c| c.rest).sum();
    let grpc = by_version.values().map(|c| c.grpc).sum();
    let total = (rest + grpc) as f64;
    let shares = by_version
        .iter()
        .map(|(v, c)| {
            (
                v.clone(),
                ((c.rest + c.grpc) as f64 * 1000.0 / total).round() / 10.0,
            )
        })
        .collect();
    let protocols = Protocols {
        seconds,
        rest,
        grpc,
        versions: by_version,
    };
    (shares, protocols)
}

/// The rollout's message as of `now`: a pause's countdown is computed from
/// its stored start rather than persisted every second. When a wait is over
/// but the controller has not yet taken the step, the plan says what comes
/// next — never the countdown stored at the last change.
fn live_message(spec: &RolloutSpec, state: &RolloutState, now: u64) -> String {
    strategy::plan(spec, state, &Observations::default(), now)
        .state
        .message
}

/// The spec as the `rollout_started` event records it: a QA dataset sent
/// with it (up to 64 MiB) is left out — the rollout record keeps it.
fn without_qa_content(spec: &RolloutSpec) -> serde_json::Value {
    let mut spec = spec.clone();
    if let Strategy::BlueGreen(b) = &mut spec.strategy
        && let Some(qa) = &mut b.qa
        && let Some(content) = qa.content.take()
    {
        qa.content = Some(format!("({} bytes, kept with the rollout)", content.len()));
    }
    serde_json::to_value(&spec).unwrap_or_default()
}

fn traffic(route: &RoutePolicy) -> BTreeMap<String, f64> {
    let mut t = BTreeMap::new();
    match &route.candidate {
        Some(c) => {
            t.insert(route.stable.clone(), 100.0 - c.weight);
            t.insert(c.version.clone(), c.weight);
        }
        None => {
            t.insert(route.stable.clone(), 100.0);
        }
    }
    t
}

impl Controller {
    /// Starts a rollout from a validated spec, or finds the identical one
    /// already running (so pipelines can apply on every run). The spec is
    /// validated once, where it enters: the control API parses it with
    /// [`RolloutSpec::from_yaml`], and `retry` passes a stored spec that was
    /// validated when it was first applied. What is checked here is what
    /// only the server knows: reach, versions, the signature contract.
    pub async fn apply_rollout(
        &self,
        spec: RolloutSpec,
        who: &str,
    ) -> Result<(Applied, Status), ControlError> {
        self.check_reach(&spec).await?;
        let model = spec.model.clone();
        {
            let _guard = self.lock.lock().await;
            let store = self.registry.store().clone();
            let current = self.route(&model)?;
            self.in_service(&model)?;
            if let Some(active) = store
                .rollouts(&model, 1)?
                .into_iter()
                .find(|r| r.state.phase.is_active())
            {
                if active.spec == spec {
                    drop(_guard);
                    return Ok((Applied::Unchanged, self.status(&model)?));
                }
                return Err(ControlError::Conflict(format!(
                    "model \"{model}\" already has an active rollout, {} ({} of version {}, {}); abort it (`ferry abort {model}`) or wait for it to end",
                    active.name(),
                    active.kind,
                    active.spec.version,
                    active.state.phase
                )));
            }
            let candidate = self.registry.version(&model, &spec.version)?;
            if current.stable == spec.version {
                return Err(ControlError::Invalid(format!(
                    "version \"{}\" is already the stable version of model \"{model}\"; nothing to roll out",
                    spec.version
                )));
            }
            if !spec.allow_signature_change {
                let stable = self.registry.version(&model, &current.stable)?;
                let diffs = stable.signature.contract_differences(&candidate.signature);
                if !diffs.is_empty() {
                    return Err(ControlError::Invalid(format!(
                        "version \"{}\" breaks the contract of the stable version \"{}\": {}; set allow_signature_change: true to roll it out anyway",
                        spec.version,
                        current.stable,
                        diffs.join("; ")
                    )));
                }
            }
            if let Strategy::Shadow(sh) = &spec.strategy {
                let stable = self.registry.version(&model, &current.stable)?;
                let (field, output) = ("strategy.shadow.compare.output", &sh.compare.output);
                super::compare_output(field, output, &stable, &candidate)?;
            }
            let mut state = strategy::initial_state(&current, now_ms());
            if let Strategy::Rolling(r) = &spec.strategy
                && r.scope == crate::spec::RollingScope::Instances
            {
                state.rolling.instances = self.fix_rolling_instances()?;
            }
            let kind = RolloutKind::of(&spec.strategy);
            let started = NewEvent::new(
                &model,
                EventKind::RolloutStarted,
                format!(
                    "{kind} of version {} started (by {who}); stable is version {}",
                    spec.version, current.stable
                ),
                serde_json::json!({"spec": without_qa_content(&spec), "by": who}),
            );
            let record = match store.create_rollout(
                &model,
                kind,
                &spec,
                &state,
                None,
                vec![started],
                self.fence(),
            )? {
                Ok(r) => r,
                Err(NotCreated::Active(a)) => {
                    return Err(ControlError::Conflict(format!(
                        "model \"{model}\" already has an active rollout, {}",
                        a.name()
                    )));
                }
            };
            if matches!(record.spec.strategy, Strategy::Shadow(_)) {
                // Comparisons count from here: the shadow may be compared
                // before the rollout loop first looks.
                let reading = self.shadow_reading(&model, &record.spec.version, now_ms());
                let mut seen = self.shadow_seen.lock().unwrap_or_else(|p| p.into_inner());
                seen.insert(record.id, reading);
            }
            self.step(record, Observations::default(), self.fence())
                .await?;
        }
        Ok((Applied::Created, self.status(&model)?))
    }

    /// Refuses a spec that names what this server does not let specs reach:
    /// a host off `--allow-outbound`, or a server-side QA dataset that is not
    /// a regular file inside `--qa-dir` (checked off the async threads).
    async fn check_reach(&self, spec: &RolloutSpec) -> Result<(), ControlError> {
        if let Some(list) = &self.reach.outbound {
            list.check_spec(spec).map_err(ControlError::Invalid)?;
        }
        if let Strategy::BlueGreen(b) = &spec.strategy
            && let Some(qa) = &b.qa
            && qa.content.is_none()
        {
            dataset::off_thread(
                self.reach.qa_dir.clone(),
                qa.dataset.clone(),
                dataset::check,
            )
            .await
            .map_err(ControlError::Invalid)?;
        }
        Ok(())
    }

    /// A person's command to the model's active rollout.
    pub async fn command(
        &self,
        model: &str,
        command: Command,
        who: &str,
    ) -> Result<Status, ControlError> {
        {
            let _guard = self.lock.lock().await;
            let active = self.active(model)?;
            match (&command, active.state.waiting_for, active.state.phase) {
                (Command::Resume, w, phase) if w != Some(Waiting::Resume) => {
                    return Err(ControlError::Conflict(format!(
                        "{} is not waiting for resume (it is {}{}); resume only ends a pause",
                        active.name(),
                        phase,
                        w.map_or(String::new(), |w| format!(", waiting for {w}"))
                    )));
                }
                (Command::Promote { .. }, Some(Waiting::Resume), _) => {
                    return Err(ControlError::Conflict(format!(
                        "{} is paused waiting for resume; `ferry resume {model}` first",
                        active.name()
                    )));
                }
                (Command::Pause, _, Phase::Paused) => {
                    return Err(ControlError::Conflict(format!(
                        "{} is already paused",
                        active.name()
                    )));
                }
                _ => {}
            }
            let obs = Observations {
                command: Some((command, who.to_string())),
                ..Observations::default()
            };
            self.step(active, obs, self.fence()).await?;
        }
        self.status(model)
    }

    /// Starts a new rollout with the spec of the model's last one (which must
    /// have ended aborted or failed).
    pub async fn retry(&self, model: &str, who: &str) -> Result<Status, ControlError> {
        let last = self
            .registry
            .store()
            .rollouts(model, 20)?
            .into_iter()
            .find(|r| r.kind != RolloutKind::Rollback)
            .ok_or_else(|| {
                ControlError::Conflict(format!("model \"{model}\" has no rollout to retry"))
            })?;
        if !matches!(last.state.phase, Phase::Aborted | Phase::Failed) {
            return Err(ControlError::Conflict(format!(
                "the last rollout of \"{model}\", {}, is {}; only an aborted or failed rollout can be retried",
                last.name(),
                last.state.phase
            )));
        }
        // Stored before this version refused something in it.
        last.spec.validate().map_err(|e| {
            ControlError::Invalid(format!(
                "{}'s spec no longer passes this version's checks: {e}. Apply a corrected spec instead (ferry apply -f)",
                last.name()
            ))
        })?;
        let by = format!("{who} (retry of {})", last.name());
        self.apply_rollout(last.spec, &by).await.map(|(_, s)| s)
    }

    /// Switches production back to the previous stable version (or `to`), as
    /// a recorded rollout of its own; the rollout it undoes is marked
    /// `rolled_back`.
    pub async fn rollback(
        &self,
        model: &str,
        to: Option<&str>,
        who: &str,
    ) -> Result<Status, ControlError> {
        {
            let _guard = self.lock.lock().await;
            let store = self.registry.store().clone();
            self.in_service(model)?;
            let history = store.rollouts(model, 50)?;
            if let Some(active) = history.iter().find(|r| r.state.phase.is_active()) {
                return Err(ControlError::Conflict(format!(
                    "{} is still active; `ferry abort {model}` puts traffic back on the stable version at once",
                    active.name()
                )));
            }
            let current = self.route(model)?;
            let undone = history
                .iter()
                .find(|r| {
                    r.state.phase == Phase::Succeeded && r.state.route.stable == current.stable
                })
                .cloned();
            let target = match (to, &undone) {
                (Some(v), _) => v.to_string(),
                (None, Some(u)) => u.state.before.stable.clone(),
                (None, None) => {
                    return Err(ControlError::Conflict(format!(
                        "no rollout of \"{model}\" to roll back; name the version with `ferry rollback {model} --to VERSION`"
                    )));
                }
            };
            self.registry.version(model, &target)?;
            if target == current.stable {
                return Err(ControlError::Invalid(format!(
                    "version \"{target}\" is already the stable version"
                )));
            }
            let spec = RolloutSpec {
                model: model.to_string(),
                version: target.clone(),
                allow_signature_change: true,
                strategy: Strategy::Basic(BasicSpec {}),
                analysis: None,
                notify: undone
                    .as_ref()
                    .map(|u| u.spec.notify.clone())
                    .unwrap_or_default(),
            };
            let warm = self.serves(model, &target);
            let event = NewEvent::new(
                model,
                EventKind::RollbackStarted,
                format!(
                    "rollback to version {target} (by {who}){}{}",
                    undone
                        .as_ref()
                        .map_or(String::new(), |u| format!(", undoing {}", u.name())),
                    if warm {
                        "; it is still loaded, so the switch is instant"
                    } else {
                        "; loading it first"
                    }
                ),
                serde_json::json!({"to": target, "undoes": undone.as_ref().map(|u| u.name()), "by": who}),
            );
            let mut state = strategy::initial_state(&current, now_ms());
            state.rollback = Some(strategy::Rollback {
                undoes: undone.as_ref().map(|u| u.name()),
            });
            let record = match store.create_rollout(
                model,
                RolloutKind::Rollback,
                &spec,
                &state,
                undone.as_ref().map(|u| u.id),
                vec![event],
                self.fence(),
            )? {
                Ok(r) => r,
                Err(NotCreated::Active(a)) => {
                    return Err(ControlError::Conflict(format!(
                        "{} is still active",
                        a.name()
                    )));
                }
            };
            self.step(record, Observations::default(), self.fence())
                .await?;
        }
        self.status(model)
    }

    /// The fence of a write this instance makes now: its term while it
    /// leads. A command taken while it does not lead is not fenced (the
    /// store's write lock orders it with the leader's writes).
    fn fence(&self) -> Fence {
        Fence::of(self.registry.store().leading())
    }

    fn active(&self, model: &str) -> Result<RolloutRecord, ControlError> {
        self.route(model)?;
        self.registry
            .store()
            .rollouts(model, 1)?
            .into_iter()
            .find(|r| r.state.phase.is_active())
            .ok_or_else(|| {
                ControlError::Conflict(format!(
                    "model \"{model}\" has no active rollout; start one with `ferry deploy` or `ferry apply`"
                ))
            })
    }

    /// Plans and applies until the rollout waits: start what the new route
    /// needs, persist the new state with its events (and the model's route,
    /// when it changes) in one transaction, then publish the route; a route
    /// that cannot start is stored only as the rollout's wish and fed back
    /// as an observation. Every write carries `fence` (the leader's term):
    /// a newer leader's lease refuses it, and nothing is published.
    pub(super) async fn step(
        &self,
        mut record: RolloutRecord,
        mut obs: Observations,
        fence: Fence,
    ) -> Result<RolloutRecord, ControlError> {
        let store = self.registry.store().clone();
        let name = record.name();
        self.publish_phase(&record);
        for pass in 0..32 {
            let now = now_ms();
            let mut plan = strategy::plan(&record.spec, &record.state, &obs, now);
            if strategy::takes_baseline(&record.state, &plan.state) {
                let baseline = self.baseline(&record);
                plan.state.baseline = Some(strategy::Baseline::new(
                    &record.state.before.stable,
                    now,
                    baseline,
                ));
            }
            let unchanged = plan.state == record.state && plan.events.is_empty();
            // A look driven by the clock alone that only moved a countdown:
            // nothing to persist (the status computes it live).
            let countdown = pass == 0 && obs.is_empty() && plan.only_countdown(&record.state);
            if unchanged || countdown {
                return Ok(record);
            }
            let mine = self.own_route(&plan.state.route);
            let prepared = match plan.publish {
                true => Some(self.prepare(&record.model, &mine).await),
                false => None,
            };
            let route_changed = matches!(prepared, Some(Ok(_)))
                .then(|| super::route_changed(&record.model, &plan.state.route, &name));
            let events: Vec<NewEvent> = plan
                .events
                .iter()
                .map(|e| {
                    NewEvent::new(
                        &record.model,
                        e.kind.clone(),
                        e.message.clone(),
                        e.data.clone(),
                    )
                })
                .collect();
            store.update_rollout(record.id, &plan.state, events, route_changed, fence)?;
            self.metrics.set_rollout_phase(
                &record.model,
                &record.kind.to_string(),
                &plan.state.phase.to_string(),
            );
            external::notify(
                &self.http.control,
                self.reach.outbound.as_ref(),
                &record,
                &plan.events,
            );
            let ended = record.state.phase.is_active() && !plan.state.phase.is_active();
            record.state = plan.state.clone();
            obs = Observations::default();
            match prepared {
                Some(Ok(pools)) => self.publish(&record.model, mine, pools),
                Some(Err(e)) => {
                    obs.route_failed = Some(e.to_string());
                    continue;
                }
                None => {}
            }
            if ended {
                self.store_report(&record, fence);
            }
            if plan.requeue_ms != Some(0) || !record.state.phase.is_active() {
                return Ok(record);
            }
        }
        Ok(record)
    }

    /// Sets `ferry_rollout_phase` to the phase of the model's latest
    /// rollout (this one).
    pub(super) fn publish_phase(&self, record: &RolloutRecord) {
        self.metrics.set_rollout_phase(
            &record.model,
            &record.kind.to_string(),
            &record.state.phase.to_string(),
        );
    }

    /// The stable version's production figures just before a switch: the
    /// last analysis interval, at least 30 s.
    fn baseline(&self, record: &RolloutRecord) -> crate::metrics::Summary {
        let interval = record
            .spec
            .analysis
            .as_ref()
            .map_or(Duration::from_secs(10), |a| a.interval.0);
        let window = interval.max(Duration::from_secs(30));
        let read = self.cluster_read(&record.model, window);
        let stable = (&*record.model, &*record.state.before.stable, Role::Stable);
        self.merged_summary(&read, stable, window, now_ms())
    }

    fn store_report(&self, record: &RolloutRecord, fence: Fence) {
        let report = self.report_of(record);
        if let Err(e) = self.registry.store().set_rollout_report(
            record.id,
            &serde_json::to_value(&report).unwrap_or_default(),
            fence,
        ) {
            tracing::warn!("could not store the report of {}: {e}", record.name());
        }
    }

    /// Drives every active rollout: timers, and an analysis window every
    /// `interval` while the candidate takes traffic. Runs until the process ends.
    pub async fn run_rollouts(self: Arc<Self>) {
        let mut ticks: u64 = 0;
        // A store failure: said once per 30 s, not at every tick; an
        // unreachable store not at all (the store logs its outage once when
        // it starts and once when it ends).
        let mut quiet_until: Option<std::time::Instant> = None;
        let mut store_failed = |what: &str, e: crate::store::StoreError| {
            if e.unreachable() {
                return;
            }
            let now = std::time::Instant::now();
            if quiet_until.is_none_or(|t| now >= t) {
                tracing::error!("{what}: {e} (said again in 30 s if it goes on)");
                quiet_until = Some(now + std::time::Duration::from_secs(30));
            }
        };
        // The term this loop last led in: a new one is a takeover.
        let mut led: Option<Term> = None;
        loop {
            tokio::time::sleep(next_wake(now_ms())).await;
            if !self.is_ready() {
                continue;
            }
            ticks += 1;
            if ticks.is_multiple_of(5) {
                self.expire_warm().await;
            }
            // Another instance on the shared store steps them, unless
            // this one holds the lease.
            let Some(term) = self.registry.store().leading() else {
                led = None;
                continue;
            };
            if led != Some(term) {
                led = Some(term);
                self.take_over(term).await;
            }
            let active = match self.registry.store().active_rollouts() {
                Ok(a) => a,
                Err(e) => {
                    store_failed("cannot read active rollouts", e);
                    continue;
                }
            };
            self.shadow_seen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|id, _| active.iter().any(|r| r.id == *id));
            for record in active {
                match self.tick(record, term).await {
                    Ok(()) => {}
                    // Said once by the store; no other step of this term.
                    Err(e) if e.fenced() => break,
                    Err(e) => tracing::warn!("rollout step failed: {e}"),
                }
            }
        }
    }

    /// On becoming the leader in `term`: nothing remembered from before is
    /// trusted (per-rollout counts and waits start again), this instance
    /// serves what the store says (the last leader's steps followed), and
    /// a route a step stored but did not publish everywhere is applied, as
    /// after a restart. The rollouts are read from the store at every tick.
    async fn take_over(&self, term: Term) {
        self.shadow_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.warm_waits
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        if let Err(e) = self.catch_up().await {
            tracing::warn!("taking over as leader (term {term}): cannot follow the store: {e}");
        }
        let _guard = self.lock.lock().await;
        if let Err(e) = self.resume_rollouts().await {
            tracing::warn!("taking over as leader (term {term}): resuming rollouts: {e}");
        }
    }

    /// One look at an active rollout: what was measured since the last
    /// (an analysis window when one is due, the QA gate, shadow counts),
    /// then a step with it under the lock.
    async fn tick(&self, record: RolloutRecord, term: Term) -> Result<(), ControlError> {
        let now = now_ms();
        let mut obs = Observations::default();
        // Other instances may still be warming what the route needs: no
        // step (nor window) counts until every live one serves it.
        match self.cluster_readiness(&record)? {
            super::cluster::Readiness::Go => {}
            super::cluster::Readiness::Wait(who) => {
                tracing::debug!(rollout = %record.name(), "waiting for {who} to warm the route");
                return Ok(());
            }
            super::cluster::Readiness::Fail(why) => obs.route_failed = Some(why),
        }
        if obs.route_failed.is_none() && window_due(&record, now) {
            obs.verdict = self.judge_window(&record, now).await;
        }
        if let Some(qa) = strategy::qa_due(&record.spec, &record.state) {
            obs.qa = self.run_qa(&record.model, &record.spec.version, qa).await;
        }
        obs.shadow_window = self.shadow_counted(&record, now, false);
        let _guard = self.lock.lock().await;
        // Re-read under the lock: a command may have changed it meanwhile.
        let Some(current) = self.registry.store().rollout(record.id)? else {
            return Ok(());
        };
        if !current.state.phase.is_active() {
            return Ok(());
        }
        crate::crashpoint::reach("rollout.leader_step");
        self.step(current, obs, Fence::Term(term)).await?;
        Ok(())
    }

    /// Judges the analysis window that just closed: the candidate's figures
    /// against the stable arm — the version that served production when
    /// the rollout began, or once production switched away from it, its
    /// baseline from just before the switch — merged over every instance.
    /// None while another instance has not flushed the window's buckets and
    /// the grace after its close is not over; after it, an incomplete window
    /// is judged with what arrived, says so, and cannot pass.
    async fn judge_window(&self, record: &RolloutRecord, now: u64) -> Option<analysis::Verdict> {
        let spec = record.spec.analysis.clone().unwrap_or_default();
        let interval = spec.interval.0;
        let read = self.cluster_read(&record.model, interval);
        let last = super::telemetry::epoch_at(now).saturating_sub(1);
        let completeness = read.completeness(last, interval);
        if !super::telemetry::may_judge(&completeness, now) {
            return None;
        }
        let role = strategy::candidate_role(&record.spec, &record.state);
        let candidate = (&*record.model, &*record.spec.version, role);
        let candidate = self.merged_summary(&read, candidate, interval, now);
        let baseline = strategy::baseline_in_use(&record.state);
        let stable = match baseline {
            Some(b) => b.figures(),
            None => {
                let stable = (&*record.model, &*record.state.before.stable, Role::Stable);
                self.merged_summary(&read, stable, interval, now)
            }
        };
        let checks = record.spec.checks();
        let external = external::fetch(
            &self.http.control,
            self.reach.outbound.as_ref(),
            record,
            &checks,
            &candidate,
            &stable,
        )
        .await;
        let settings = analysis::Settings {
            min_requests: spec.min_requests,
            confidence: spec.confidence,
        };
        let mut verdict = analysis::evaluate(&checks, &candidate, &stable, &external, settings);
        let against_stable = checks.iter().any(|c| {
            matches!(c, crate::spec::Check::Metric { condition, .. } if condition.against_stable())
        });
        if let Some(b) = baseline
            && against_stable
        {
            verdict.reason = format!(
                "{} (stable: version {}'s baseline from before the switch)",
                verdict.reason, b.version
            );
        }
        Some(incomplete(verdict, &completeness))
    }

    /// The shadow counters of `version` now: where a new rollout's
    /// comparisons start.
    fn shadow_reading(&self, model: &str, version: &str, now: u64) -> ShadowReading {
        let (_, example) = self.telemetry.disagreements_since(model, version, u64::MAX);
        ShadowReading {
            counts: self.metrics.for_version(model, version).shadow_counts(),
            example,
            fed_at_ms: now,
        }
    }

    /// The shadow comparisons counted since they were last fed to a
    /// mirroring rollout, with the disagreements among them: read live from
    /// the counters each tick, so the decision is taken as soon as
    /// `min_comparisons` is reached, not at the next analysis window. Fed at
    /// most once a second otherwise (each feed is a store write), or at
    /// once when `stopping` ([`Controller::store_last_comparisons`]).
    fn shadow_counted(
        &self,
        record: &RolloutRecord,
        now: u64,
        stopping: bool,
    ) -> Option<strategy::ShadowProgress> {
        let (model, version) = (&record.model, &record.spec.version);
        let Some(sh) = strategy::counts_comparisons(&record.spec, &record.state) else {
            let mut seen = self.shadow_seen.lock().unwrap_or_else(|p| p.into_inner());
            seen.remove(&record.id);
            return None;
        };
        if self.me.get().is_some() && self.registry.store().keeps_buckets() {
            return self.shadow_counted_in_cluster(record, now);
        }
        let mut seen = self.shadow_seen.lock().unwrap_or_else(|p| p.into_inner());
        // Without a reading (the first look since a restart) everything this
        // process counted is this rollout's: the counters started at zero,
        // and a shadow created here took its reading when it was created.
        let reading = seen.get(&record.id).copied().unwrap_or(ShadowReading {
            counts: [0; 4],
            example: 0,
            fed_at_ms: 0,
        });
        // Examples first, then counts: the gateway counts a disagreement
        // before keeping it as an example, so the counts cover the examples.
        let (examples, example) =
            self.telemetry
                .disagreements_since(model, version, reading.example);
        let counts = self.metrics.for_version(model, version).shadow_counts();
        let [agree, disagree, errors, dropped] =
            std::array::from_fn(|i| counts[i].saturating_sub(reading.counts[i]));
        let delta = strategy::ShadowProgress {
            agree,
            disagree,
            errors,
            dropped,
            examples,
            counted_through: Default::default(),
        };
        let reached =
            record.state.shadow.compared.compared() + delta.compared() >= sh.min_comparisons;
        let due = stopping || now >= reading.fed_at_ms + 1_000;
        if delta == strategy::ShadowProgress::default() || !(reached || due) {
            return None;
        }
        seen.insert(
            record.id,
            ShadowReading {
                counts,
                example,
                fed_at_ms: now,
            },
        );
        Some(delta)
    }

    /// At a graceful stop, once the listeners have drained and the
    /// rollout loop has ended ([`Controller::stop_background`]): the shadow
    /// comparisons counted since they were last fed (at most a second's)
    /// are added to their rollouts as they are stored, so that a restart
    /// goes on from every comparison made. Nothing is decided here: the
    /// next tick, after the restart, decides on them (and says so). On a
    /// shared store they are in the buckets [`Controller::leave`] flushes.
    pub async fn store_last_comparisons(&self) {
        let store = self.registry.store().clone();
        if store.keeps_buckets() {
            return;
        }
        let Some(term) = store.leading() else { return };
        let Ok(active) = store.active_rollouts() else {
            return;
        };
        let _guard = self.lock.lock().await;
        for record in active {
            let Some(counted) = self.shadow_counted(&record, now_ms(), true) else {
                continue;
            };
            let mut state = record.state.clone();
            state.shadow.add(&counted);
            if let Err(e) =
                store.update_rollout(record.id, &state, Vec::new(), None, Fence::Term(term))
            {
                tracing::warn!(
                    "stopping: cannot store rollout {}'s last shadow comparisons: {e}",
                    record.name()
                );
            }
        }
    }

    /// The shadow comparisons of every instance sharing the store, from
    /// their buckets ([`crate::metrics::Telemetry::count_on`]): this
    /// instance's closed ones, and each other instance's as it flushes them
    /// (a frozen instance's count once it thaws), each after the bucket the
    /// stored counts went through for it, so a new leader goes on from
    /// there and counts nothing twice. A comparison counts once its bucket
    /// closed and was flushed: a cluster decides a few seconds after one
    /// node would. Disagreement examples are this instance's own (the
    /// buckets carry counts only), from this rollout's start.
    fn shadow_counted_in_cluster(
        &self,
        record: &RolloutRecord,
        now: u64,
    ) -> Option<strategy::ShadowProgress> {
        use super::telemetry::{FLUSH_AFTER, epoch_at};
        use crate::metrics::window::{BUCKET_SECS, RING};
        let (model, version) = (&record.model, &record.spec.version);
        let me = &self.me.get()?.id;
        let counted = &record.state.shadow.compared.counted_through;
        // Mirroring began with the rollout's first step: its bucket counts.
        let start = epoch_at(record.state.step_started_ms).saturating_sub(1);
        // This instance's own buckets once closed (and a request recorded
        // just before the close has taken the bucket's lock).
        let last = epoch_at(now.saturating_sub(FLUSH_AFTER.as_millis() as u64)).saturating_sub(1);
        let oldest = counted
            .values()
            .copied()
            .chain([start])
            .min()
            .unwrap_or(start);
        let buckets = last.saturating_sub(oldest).clamp(1, RING as u64) as u32;
        let read = self.cluster_read(model, Duration::from_secs(BUCKET_SECS) * buckets);
        let role = (model.as_str(), version.as_str(), Role::Shadow);
        let (sum, through) =
            self.telemetry
                .count_on(role, (me, last), start, counted, read.peers());
        if through.is_empty() {
            return None;
        }
        let mut seen = self.shadow_seen.lock().unwrap_or_else(|p| p.into_inner());
        // Without a reading (this instance leads since): examples from now
        // on, never an earlier rollout's.
        let taken = match seen.get(&record.id) {
            Some(r) => r.example,
            None => {
                self.telemetry
                    .disagreements_since(model, version, u64::MAX)
                    .1
            }
        };
        let (examples, example) = self.telemetry.disagreements_since(model, version, taken);
        seen.insert(
            record.id,
            ShadowReading {
                counts: [0; 4],
                example,
                fed_at_ms: now,
            },
        );
        Some(strategy::ShadowProgress {
            agree: sum.agree,
            disagree: sum.disagree,
            errors: sum.compare_errors,
            dropped: sum.dropped,
            examples,
            counted_through: through,
        })
    }

    /// Runs the labelled dataset against green's replicas (directly, not as
    /// staging traffic) and judges the answers. None while green is not
    /// published yet: the rollout stores the QA step before the route that
    /// stages green is published, and this loop reads the store without the
    /// controller's lock, so it may see the step first; the gate then runs
    /// at a later tick, against a loaded and warm green.
    async fn run_qa(&self, model: &str, version: &str, qa: &QaSpec) -> Option<QaResult> {
        let Some(pool) = self
            .routes
            .model(model)
            .and_then(|r| r.pools.get(version).cloned())
        else {
            tracing::debug!(
                model,
                version,
                "the QA gate waits for green to be published"
            );
            return None;
        };
        let refused = |reason: String| QaResult {
            rows: 0,
            failures: 0,
            accuracy: None,
            mean_abs_error: None,
            passed: false,
            reason,
        };
        let text = match &qa.content {
            Some(c) => c.clone(),
            None => {
                let read = dataset::off_thread(
                    self.reach.qa_dir.clone(),
                    qa.dataset.clone(),
                    dataset::read,
                );
                match read.await {
                    Ok(t) => t,
                    Err(e) => return Some(refused(format!("the QA dataset cannot be used: {e}"))),
                }
            }
        };
        let rows = match analysis::qa::parse_dataset(&text) {
            Ok(r) => r,
            Err(e) => return Some(refused(e)),
        };
        let mut answers = Vec::with_capacity(rows.len());
        for row in &rows {
            let body = serde_json::to_vec(&row.request).unwrap_or_default();
            let answer = match crate::protocol::decode_request(&body, None) {
                Ok(req) if pool.signature.check_inputs(&req.inputs).is_ok() => {
                    pool.infer(req.inputs, pool.timeout()).await.ok()
                }
                _ => None,
            };
            answers.push(answer);
        }
        let labels: Vec<f64> = rows.iter().map(|r| r.label).collect();
        Some(analysis::qa::judge(qa, &labels, &answers))
    }

    /// Unloads versions a route kept warm once their time is up (blue after
    /// a blue-green switch), unless a rollout owns the model.
    pub(super) async fn expire_warm(&self) {
        let now = now_ms();
        for (model, route) in self.routes.snapshot_policies() {
            if !route.warm.iter().any(|w| w.until_ms <= now) {
                continue;
            }
            let _guard = self.lock.lock().await;
            let active = self
                .registry
                .store()
                .rollouts(&model, 1)
                .map(|r| r.iter().any(|r| r.state.phase.is_active()))
                .unwrap_or(true);
            if active {
                continue;
            }
            // The stored route, not this instance's share of it (the
            // same but for a route across instances).
            let Ok(mut next) = self.route(&model) else {
                continue;
            };
            let gone: Vec<String> = next
                .warm
                .iter()
                .filter(|w| w.until_ms <= now)
                .map(|w| w.version.clone())
                .collect();
            next.warm.retain(|w| w.until_ms > now);
            let who = format!("scale-down of {} after its delay", gone.join(", "));
            if let Err(e) = self.apply(&model, Some((next, &who))).await {
                tracing::warn!(model = %model, "scale-down failed: {e}");
            }
        }
    }

    /// After a restart: make the published routes match what each active
    /// rollout last persisted (a crash may have come between the two).
    pub(super) async fn resume_rollouts(&self) -> Result<(), ControlError> {
        let Some(term) = self.registry.store().leading() else {
            // The leader re-applies them; this one serves the routes it
            // loaded (stored with each step).
            return Ok(());
        };
        for record in self.registry.store().active_rollouts()? {
            // Stored before this version refused something in it (e.g. an
            // agreement check against stable): it goes on without the
            // parts that cannot be read, and says so once here.
            if let Err(e) = record.spec.validate() {
                tracing::warn!(
                    rollout = %record.name(),
                    "its stored spec no longer passes this version's checks ({e}); it goes on, and what cannot be read (an analysis check, say) is left out: abort it and apply a corrected spec if that matters"
                );
            }
            let published = self.route(&record.model)?;
            if published != record.state.route {
                tracing::info!(rollout = %record.name(), "re-applying the route of an interrupted step");
                let name = record.name();
                if let Err(e) = self
                    .apply(&record.model, Some((record.state.route.clone(), &name)))
                    .await
                {
                    self.step(
                        record,
                        Observations {
                            route_failed: Some(e.to_string()),
                            ..Default::default()
                        },
                        Fence::Term(term),
                    )
                    .await?;
                }
            }
        }
        Ok(())
    }

    /// A model's rollouts, newest first; at most `limit`.
    pub fn rollouts(&self, model: &str, limit: usize) -> Result<Vec<RolloutRecord>, ControlError> {
        Ok(self.registry.store().rollouts(model, limit)?)
    }

    /// A page of a rollout's events, oldest first.
    pub fn rollout_events(
        &self,
        rollout: &RolloutRecord,
        page: crate::store::Page,
    ) -> Result<Vec<crate::store::Event>, ControlError> {
        Ok(self.registry.store().rollout_events(rollout.id, page)?)
    }

    /// The model's status.
    pub fn status(&self, model: &str) -> Result<Status, ControlError> {
        let history = self.registry.store().rollouts(model, 1)?;
        // Read after the rollout: a rollout that ended in between has its
        // restored route read with it, never the route before its end.
        let route = self.route(model)?;
        let (observed, protocols) = observed(&self.merged_summaries(model, OBSERVED_WINDOW).0);
        let mut latest = history.into_iter().next();
        let Some(r) = latest.take_if(|r| r.state.phase.is_active()) else {
            let last = latest;
            return Ok(Status {
                model: model.to_string(),
                stable: Some(route.stable.clone()),
                candidate: None,
                rollout: None,
                strategy: None,
                phase: ModelPhase::Idle,
                waiting_for: None,
                steps: vec![],
                step: None,
                traffic: traffic(&route),
                observed,
                protocols,
                message: last.as_ref().map_or("no rollout yet".to_string(), |l| {
                    format!("last rollout {}: {}", l.name(), l.state.message)
                }),
                // So is the analysis window a rollout ended with.
                analysis: last.as_ref().and_then(AnalysisView::of),
                updated_at: last.as_ref().map(|l| l.updated_at.clone()),
                last_rollout: last.clone().map(|l| LastRollout {
                    rollout: l.name(),
                    strategy: l.kind,
                    phase: l.state.phase,
                    message: l.state.message,
                }),
                // A shadow's evidence stays on view after its decision.
                shadow: last.as_ref().and_then(ShadowView::of),
                qa: None,
                staging: route.staging.clone(),
            });
        };
        Ok(Status {
            model: model.to_string(),
            stable: Some(r.state.before.stable.clone()),
            candidate: Some(r.spec.version.clone()),
            rollout: Some(r.name()),
            strategy: Some(r.kind),
            phase: ModelPhase::Rollout(r.state.phase),
            waiting_for: r.state.waiting_for,
            steps: strategy::steps(&r.spec, &r.state),
            step: Some(r.state.step),
            traffic: traffic(&r.state.route),
            observed,
            protocols,
            message: live_message(&r.spec, &r.state, now_ms()),
            analysis: AnalysisView::of(&r),
            updated_at: Some(r.updated_at.clone()),
            last_rollout: None,
            shadow: ShadowView::of(&r),
            qa: r.state.blue_green.qa.clone(),
            staging: r.state.route.staging.clone(),
        })
    }

    /// The A/B report of a rollout: the stored one when it has ended, else
    /// computed from the live windows (at most the last 15 minutes).
    pub fn report_of(&self, record: &RolloutRecord) -> analysis::report::Report {
        if let Some(stored) = record
            .report
            .as_ref()
            .and_then(|r| serde_json::from_value(r.clone()).ok())
        {
            return stored;
        }
        use crate::units::ms_of_rfc3339 as ms;
        // When the rollout before this one ended (its last update).
        let previous_end = self
            .registry
            .store()
            .rollouts(&record.model, 3)
            .unwrap_or_default()
            .into_iter()
            .find(|r| r.id < record.id)
            .and_then(|r| ms(&r.updated_at));
        let now = now_ms();
        let span = report_span(ms(&record.created_at).unwrap_or(0), previous_end, now);
        let window = span.map_or(Duration::ZERO, |s| s.window);
        let stable_version = &record.state.before.stable;
        let read = self.cluster_read(&record.model, window.max(Duration::from_secs(5)));
        // An arm is its version's buckets in the roles it served in during
        // the rollout: stable's production traffic; the candidate's as a
        // canary, a shadow, in staging, or once it serves production (a
        // blue-green switch, rolling's last batch). It was not stable
        // before, so all of that is the rollout's.
        let summary = |version: &str, roles: &[Role]| match span {
            Some(s) => {
                let (after, covered) = crate::metrics::window::span(s.last, s.window);
                let mut total = crate::metrics::window::Bucket::default();
                for role in roles {
                    total.merge(&self.telemetry.merged_between(
                        (&record.model, version, *role),
                        after,
                        s.last,
                        read.peers(),
                    ));
                }
                crate::metrics::window::summarize([&total], covered)
            }
            // The bucket the start fell in is still filling.
            None => crate::metrics::Summary::default(),
        };
        let stable = summary(stable_version, &[Role::Stable]);
        let candidate = summary(
            &record.spec.version,
            &[Role::Candidate, Role::Shadow, Role::Staging, Role::Stable],
        );
        let confidence = record.spec.analysis.as_ref().map_or(0.95, |a| a.confidence);
        let mut report = analysis::report::compare(
            stable_version,
            &stable,
            &record.spec.version,
            &candidate,
            confidence,
            span.map_or(0, |s| s.seconds),
        );
        let last = super::telemetry::epoch_at(now).saturating_sub(1);
        let completeness = read.completeness(last, window);
        report.cluster = completeness.shared().then_some(completeness);
        report
    }

    /// A rollout by name (`r-17`) or the model's latest.
    pub fn rollout(&self, model: &str, name: Option<&str>) -> Result<RolloutRecord, ControlError> {
        let store = self.registry.store();
        let found = match name {
            Some(n) => {
                let id = crate::store::rollout_id(n).ok_or_else(|| {
                    ControlError::Invalid(format!(
                        "rollout \"{n}\" is not a rollout name (like r-17)"
                    ))
                })?;
                store.rollout(id)?.filter(|r| r.model == model)
            }
            None => store.rollouts(model, 1)?.into_iter().next(),
        };
        if found.is_none() && self.registry.stable(model)?.is_none() {
            return Err(ControlError::Registry(RegistryError::NotFound(format!(
                "model \"{model}\" is not registered"
            ))));
        }
        found.ok_or_else(|| {
            ControlError::Registry(RegistryError::NotFound(match name {
                Some(n) => format!("model \"{model}\" has no rollout {n}"),
                None => format!("model \"{model}\" has no rollouts yet"),
            }))
        })
    }
}

/// Whether an analysis window is due now. Windows are whole 5 s buckets:
/// one is judged just after a bucket closes, so a breach is seen at most one
/// interval (plus this slack) after it began, and consecutive windows never
/// overlap.
fn window_due(record: &RolloutRecord, now: u64) -> bool {
    if !strategy::analysing(&record.spec, &record.state) {
        return false;
    }
    let interval = record.spec.analysis.clone().unwrap_or_default().interval.0;
    let bucket_ms = crate::metrics::window::BUCKET_SECS * 1000;
    let since_boundary = now % bucket_ms;
    // Until the grace is over, a window waiting for another instance's
    // flush is looked at again at each tick.
    let last_look = super::telemetry::GRACE.as_millis() as u64 + 400;
    now + bucket_ms / 2 >= record.state.analysis.last_at_ms + interval.as_millis() as u64
        && (50..last_look).contains(&since_boundary)
}

/// A verdict over a window some instance had not reported: it says so, and
/// a pass becomes inconclusive (a breach in part of the traffic is still a
/// breach; a pass on part of it is not evidence enough).
fn incomplete(
    mut verdict: analysis::Verdict,
    completeness: &crate::metrics::cluster::Completeness,
) -> analysis::Verdict {
    let Some(shortfall) = completeness.shortfall() else {
        return verdict;
    };
    if verdict.outcome == analysis::Outcome::Pass {
        verdict.outcome = analysis::Outcome::Inconclusive;
    }
    verdict.reason = format!("{} ({shortfall})", verdict.reason);
    verdict
}

/// How long the rollout loop sleeps: 200 ms, or less so that it wakes 60 ms
/// after the next 5-second bucket closes — analysis judges a window then,
/// so a breach is acted on within one interval and about 60 ms, not the
/// up to 400 ms a fixed 200 ms tick allowed.
fn next_wake(now_ms: u64) -> Duration {
    let bucket_ms = crate::metrics::window::BUCKET_SECS * 1000;
    // In 1..=bucket_ms: a wake exactly at boundary + 60 ms aims at the next.
    let until = (bucket_ms + 60 - now_ms % bucket_ms - 1) % bucket_ms + 1;
    Duration::from_millis(until.min(200))
}

#[cfg(test)]
mod tests {
    use super::{ProtocolCounts, incomplete, live_message, next_wake, observed, report_span};
    use crate::gateway::RoutePolicy;
    use crate::metrics::{Role, SeriesSummary, Summary};
    use crate::spec::RolloutSpec;
    use crate::strategy::{self, Observations};
    use std::time::Duration;

    /// A report counts the buckets from the start's through the filling
    /// one, at most 15 minutes; the start's bucket is left out when the
    /// rollout before ended in it (its candidate traffic is there).
    #[test]
    fn a_report_covers_the_buckets_since_the_start() {
        let span = |start, previous, now| {
            report_span(start, previous, now).map(|s| (s.last, s.window.as_secs(), s.seconds))
        };
        assert_eq!(
            span(12_300, None, 14_000),
            Some((2, 5, 4)),
            "10-15 s, so far"
        );
        assert_eq!(span(12_300, Some(3_000), 17_600), Some((3, 10, 7)));
        // The previous rollout ended at 11.9 s, in the start's bucket.
        assert_eq!(span(12_300, Some(11_900), 14_000), None);
        assert_eq!(span(12_300, Some(11_900), 17_600), Some((3, 5, 2)));
        assert_eq!(
            span(15_000, Some(14_999), 15_100),
            Some((3, 5, 0)),
            "on a bucket's edge"
        );
        assert_eq!(span(12_300, None, 10_000_000).map(|s| s.1), Some(900));
    }

    /// A window some instance had not reported cannot pass, says so, and a
    /// failure stays a failure; a complete one is left as judged.
    #[test]
    fn an_incomplete_window_says_so_and_never_passes() {
        use crate::analysis::{Outcome, Verdict};
        use crate::metrics::cluster::Completeness;
        let verdict = |outcome| Verdict {
            outcome,
            candidate_requests: 40,
            stable_requests: 90,
            checks: vec![],
            reason: "all checks passed".into(),
        };
        let short = Completeness {
            complete: false,
            instances_expected: 3,
            instances_reporting: 2,
            missing: vec!["c7e9d5f31a24".into()],
        };
        let judged = incomplete(verdict(Outcome::Pass), &short);
        assert_eq!(judged.outcome, Outcome::Inconclusive);
        assert_eq!(
            judged.reason,
            "all checks passed (window incomplete: 2 of 3 instances reported (not yet: c7e9d5f31a24))"
        );
        assert_eq!(
            incomplete(verdict(Outcome::Fail), &short).outcome,
            Outcome::Fail
        );
        let whole = incomplete(verdict(Outcome::Pass), &Completeness::alone());
        assert_eq!(whole, verdict(Outcome::Pass));
    }

    /// A rolling batch's countdown only goes down: once the pause is over
    /// and before the controller takes the next batch, the status does not
    /// fall back to the countdown stored at the batch's last change (it
    /// went "1s left", then "4s left").
    #[test]
    fn the_rolling_countdown_never_goes_back_up() {
        let spec = RolloutSpec::from_yaml(
            "model: m\nversion: \"2\"\nstrategy: { rolling: { replicas: 2, batch_size: 1, batch_pause: 5s } }",
        )
        .unwrap();
        let mut state = strategy::initial_state(&RoutePolicy::stable_only("1"), 0);
        // As the controller does: plan again at once after each change.
        for _ in 0..4 {
            state = strategy::plan(&spec, &state, &Observations::default(), 0).state;
        }
        assert!(state.message.contains("5s left"), "{}", state.message);
        // Stored one second in (an analysis window persisted it).
        let stored = strategy::plan(&spec, &state, &Observations::default(), 1_000).state;
        assert!(stored.message.contains("4s left"), "{}", stored.message);
        let mut last_left = u64::MAX;
        for now in (1_000..=5_600).step_by(100) {
            let message = live_message(&spec, &stored, now);
            if let Some(left) = message
                .split_whitespace()
                .find_map(|w| w.strip_suffix('s').and_then(|n| n.parse::<u64>().ok()))
                .filter(|_| message.contains(" left"))
            {
                assert!(left <= last_left, "at {now} ms: {message}");
                last_left = left;
            } else {
                last_left = 0;
            }
        }
    }

    /// The status's phase reads and prints as it always did: `idle`, or
    /// the rollout's phase.
    #[test]
    fn the_model_phase_is_idle_or_the_rollouts() {
        use super::ModelPhase;
        use crate::strategy::Phase;
        for (phase, text) in [
            (ModelPhase::Idle, "idle"),
            (ModelPhase::Rollout(Phase::RolledBack), "rolled_back"),
            (ModelPhase::Rollout(Phase::Progressing), "progressing"),
        ] {
            assert_eq!(phase.to_string(), text);
            assert_eq!(serde_json::to_value(phase).unwrap(), text);
            assert_eq!(
                serde_json::from_value::<ModelPhase>(text.into()).unwrap(),
                phase
            );
        }
    }

    #[test]
    fn the_loop_wakes_just_after_each_bucket_closes() {
        let ms = Duration::from_millis;
        assert_eq!(next_wake(10_000), ms(60), "at a boundary");
        assert_eq!(next_wake(10_030), ms(30));
        assert_eq!(next_wake(10_059), ms(1));
        assert_eq!(next_wake(10_060), ms(200), "then the usual tick");
        assert_eq!(
            next_wake(14_900),
            ms(160),
            "shortened to reach 15 s + 60 ms"
        );
        assert_eq!(next_wake(14_700), ms(200));
    }

    /// `observed` and `protocols` count the same production requests: a
    /// shadow's copies and version-addressed requests are in neither.
    #[test]
    fn the_status_splits_production_traffic_by_protocol() {
        let series = |version: &str, role, requests, grpc| SeriesSummary {
            version: version.into(),
            role,
            summary: Summary {
                seconds: 10,
                requests,
                grpc,
                ..Summary::default()
            },
        };
        let (shares, protocols) = observed(&[
            series("1", Role::Stable, 60, 20),
            series("1", Role::Direct, 500, 500),
            series("2", Role::Candidate, 30, 30),
            series("2", Role::Shadow, 60, 20),
            series("3", Role::Fallback, 10, 0),
            series("4", Role::Candidate, 0, 0),
        ]);
        assert_eq!(
            shares.into_iter().collect::<Vec<_>>(),
            [("1".into(), 60.0), ("2".into(), 30.0), ("3".into(), 10.0)]
        );
        assert_eq!(
            (protocols.seconds, protocols.rest, protocols.grpc),
            (10, 50, 50)
        );
        assert_eq!(
            protocols.versions.into_iter().collect::<Vec<_>>(),
            [
                ("1".into(), ProtocolCounts { rest: 40, grpc: 20 }),
                ("2".into(), ProtocolCounts { rest: 0, grpc: 30 }),
                ("3".into(), ProtocolCounts { rest: 10, grpc: 0 }),
            ]
        );
        let (shares, protocols) = observed(&[]);
        assert!(shares.is_empty());
        assert_eq!(
            (protocols.seconds, protocols.rest + protocols.grpc),
            (10, 0)
        );
    }
}
