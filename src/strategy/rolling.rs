//! rolling: the model runs a pool of `replicas`; the candidate replaces the
//! stable version `batch_size` replicas at a time. Step 0 scales the stable
//! version up to the pool size; batch k runs k×batch_size candidate replicas
//! and the rest stable, with traffic split in the same proportion (after k of
//! n, the candidate answers about k/n). Each batch waits `batch_pause`, then
//! checks health (its replicas started and warmed, or the route would not
//! have been published) and the analysis. A failed batch rolls the pool back,
//! batch by batch or all at once (`rollback`).
//!
//! New replicas are warm before the swap that adds them, so fewer than
//! `replicas` are never ready: `max_unavailable` is always met, and the
//! surge is the batch being started.
//!
//! With `scope: instances` the batches are whole instances sharing the
//! store: the controller fixes the live ones, ordered by address then id,
//! in the state when the rollout starts ([`RollingState::instances`]), and
//! batch k names the first k×batch_size of them in the route
//! (`candidate_instances`): each resolves its own route from it
//! ([`RoutePolicy::for_instance`]). Step 0 takes no action then; the
//! candidate's weight is the instances' share, shown as the traffic (the
//! load balancer's spread decides it); the last batch makes the candidate
//! the route's stable version everywhere, as per-replica rolling's does.

use serde::{Deserialize, Serialize};

use super::{Phase, Plan, secs, succeed};
use crate::analysis::Verdict;
use crate::gateway::RoutePolicy;
use crate::gateway::policy::CandidateSplit;
use crate::records::EventKind;
use crate::spec::{RollingRollback, RollingScope, RollingSpec, RolloutSpec};

/// What an update replaces, batch by batch: `n` replicas of the pool, or
/// the `n` instances fixed when it started.
#[derive(Debug, Clone, Copy)]
struct Units<'a> {
    n: u32,
    batch: u32,
    /// The instances, in order (`scope: instances`); none for replicas.
    instances: Option<&'a [RollingInstance]>,
}

impl Units<'_> {
    fn of<'a>(r: &RollingSpec, state: &'a RollingState) -> Units<'a> {
        match r.scope {
            RollingScope::Replicas => Units {
                n: r.replicas,
                batch: r.batch_size,
                instances: None,
            },
            RollingScope::Instances => Units {
                n: state.instances.len() as u32,
                batch: r.batch_size,
                instances: Some(&state.instances),
            },
        }
    }

    fn batches(&self) -> usize {
        self.n.div_ceil(self.batch.max(1)) as usize
    }

    /// How many units run the candidate once batch `b` is up.
    fn after(&self, b: u32) -> u32 {
        (b * self.batch).min(self.n)
    }

    /// `replicas` or `instances`, as messages count them.
    fn word(&self) -> &'static str {
        match self.instances {
            None => "replicas",
            Some(_) => "instances",
        }
    }

    /// The route with `k` of the units on the candidate.
    fn route(&self, before: &RoutePolicy, spec: &RolloutSpec, k: u32) -> RoutePolicy {
        match self.instances {
            None => route_for(before, spec, self.n, k),
            Some(ids) => instances_route(before, spec, ids, k),
        }
    }

    /// Units on the candidate in a route.
    fn on_candidate(&self, route: &RoutePolicy, spec: &RolloutSpec) -> u32 {
        let Some(_) = self.instances else {
            return on_candidate(route, spec);
        };
        if route.stable == spec.version {
            return self.n;
        }
        match &route.candidate {
            Some(c) if c.version == spec.version => route.candidate_instances.len() as u32,
            _ => 0,
        }
    }
}

/// The steps of a rolling update as the status lists them: per-replica
/// batches as `batch 2: 2/4`, batches of instances as `batch 2: 2/3
/// instances`.
pub fn steps(r: &RollingSpec, state: &RollingState) -> Vec<String> {
    let u = Units::of(r, state);
    let mut v = match u.instances {
        None => vec![format!("scale up to {}", u.n)],
        Some(_) => vec![format!("fix {} instances", u.n)],
    };
    for b in 1..=u.batches() {
        v.push(format!(
            "batch {b}: {}/{}{}",
            u.after(b as u32),
            u.n,
            unit_suffix(&u)
        ));
    }
    v.push("done".into());
    v
}

/// The candidate's share when `k` of `n` units run it, in percent to 0.01.
fn split(spec: &RolloutSpec, n: u32, k: u32) -> CandidateSplit {
    CandidateSplit {
        version: spec.version.clone(),
        weight: (f64::from(k) * 10_000.0 / f64::from(n)).round() / 100.0,
        sticky_header: None,
        matches: Vec::new(),
    }
}

/// The route where the candidate replaced the stable version everywhere.
fn all_on_candidate(before: &RoutePolicy, spec: &RolloutSpec) -> RoutePolicy {
    let mut r = RoutePolicy::stable_only(&spec.version);
    r.timeout = before.timeout;
    r.breaker = before.breaker.clone();
    r
}

/// The route with `k` of `n` replicas on the candidate.
pub fn route_for(before: &RoutePolicy, spec: &RolloutSpec, n: u32, k: u32) -> RoutePolicy {
    if k >= n {
        let mut r = all_on_candidate(before, spec);
        r.replicas.insert(spec.version.clone(), n);
        return r;
    }
    let mut r = before.clone();
    r.replicas.insert(before.stable.clone(), n - k);
    if k == 0 {
        r.candidate = None;
        r.replicas.remove(&spec.version);
    } else {
        r.candidate = Some(split(spec, n, k));
        r.replicas.insert(spec.version.clone(), k);
    }
    r
}

/// The route with the first `k` of `instances` on the candidate: they are
/// named in it, and the weight is their share.
pub fn instances_route(
    before: &RoutePolicy,
    spec: &RolloutSpec,
    instances: &[RollingInstance],
    k: u32,
) -> RoutePolicy {
    let n = instances.len() as u32;
    if k >= n {
        return all_on_candidate(before, spec);
    }
    let mut r = before.clone();
    if k > 0 {
        r.candidate = Some(split(spec, n, k));
        r.candidate_instances = instances[..k as usize]
            .iter()
            .map(|i| i.id.clone())
            .collect();
    }
    r
}

/// Candidate replicas in a route.
fn on_candidate(route: &RoutePolicy, spec: &RolloutSpec) -> u32 {
    if route.stable == spec.version {
        return route.replicas.get(&spec.version).copied().unwrap_or(0);
    }
    route
        .candidate
        .as_ref()
        .filter(|c| c.version == spec.version)
        .and_then(|_| route.replicas.get(&spec.version).copied())
        .unwrap_or(0)
}

/// An instance taking part in a rolling update across instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RollingInstance {
    pub id: String,
    /// Its `--advertise-url`, for messages.
    pub url: String,
}

impl std::fmt::Display for RollingInstance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} ({})", self.id, self.url)
    }
}

/// A rolling update's own state, stored flattened into the rollout's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RollingState {
    /// Why the update is taking its batches back (after a failed batch).
    #[serde(default)]
    pub rolling_back: Option<String>,
    /// `scope: instances`: the instances taking part, in batch order, fixed
    /// when the rollout started (so a restart or another driving instance
    /// takes the same batches).
    #[serde(
        default,
        rename = "rolling_instances",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub instances: Vec<RollingInstance>,
}

/// Where a rolling update is, read from the stored step index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RollingStep {
    /// Step 0: the stable version scales up to the pool size (the
    /// instances are fixed, with `scope: instances`).
    ScaleUp,
    /// Batch `b` (from 1): `b × batch_size` replicas (or instances) run the
    /// candidate.
    Batch(u32),
    /// Every batch settled.
    Done,
}

impl RollingStep {
    pub fn at(r: &RollingSpec, state: &RollingState, i: usize) -> RollingStep {
        match i {
            0 => RollingStep::ScaleUp,
            b if b <= Units::of(r, state).batches() => RollingStep::Batch(b as u32),
            _ => RollingStep::Done,
        }
    }
}

/// A batch's route could not be served: the update goes back to the
/// previous batch — published again, as the instances that could serve the
/// failed batch's route (on a shared store) serve it until told otherwise —
/// and takes its batches back. One that fails on the way back (an instance cannot serve a batch of the
/// rollback: its route would never be served) ends the update at once,
/// every unit back on the stable version.
pub fn batch_failed(spec: &RolloutSpec, r: &RollingSpec, p: &mut Plan, why: &str, now_ms: u64) {
    let rolling = p.state.rolling.clone();
    let u = Units::of(r, &rolling);
    if let Some(back) = &rolling.rolling_back {
        let why = format!("{back}; then a batch on the way back could not start: {why}");
        roll_back(spec, r, &u, p, &why, now_ms, true);
        return;
    }
    p.state.rolling.rolling_back = Some(format!("a batch could not start: {why}"));
    let done = p.state.step.saturating_sub(1) as u32; // batches fully up
    p.set_route(u.route(&p.state.before, spec, u.after(done)));
    p.state.step_started_ms = now_ms;
    p.event(
        EventKind::BatchFailed,
        format!("batch failed: {why}; rolling back"),
    );
}

/// A failed analysis window: the update takes its batches back.
pub fn window_failed(p: &mut Plan, verdict: &Verdict, now_ms: u64) {
    if p.state.rolling.rolling_back.is_none() {
        p.state.rolling.rolling_back = Some(format!("analysis failed: {}", verdict.reason));
        p.state.step_started_ms = now_ms;
    }
}

pub fn plan(
    spec: &RolloutSpec,
    r: &RollingSpec,
    p: &mut Plan,
    promote: Option<(bool, String)>,
    now_ms: u64,
) {
    let rolling = p.state.rolling.clone();
    let u = Units::of(r, &rolling);
    if let Some(why) = &rolling.rolling_back {
        roll_back(spec, r, &u, p, why, now_ms, false);
        return;
    }
    match RollingStep::at(r, &rolling, p.state.step) {
        RollingStep::ScaleUp => scale_up(spec, &u, p, now_ms),
        RollingStep::Batch(b) => batch(spec, r, &u, p, b, promote.is_some(), now_ms),
        RollingStep::Done => succeed(p, spec),
    }
}

/// Takes one batch back per `batch_pause` (or all at once: `rollback: all`,
/// or `at_once`), then ends the update aborted with every replica (or
/// instance) on the stable version.
fn roll_back(
    spec: &RolloutSpec,
    r: &RollingSpec,
    u: &Units,
    p: &mut Plan,
    why: &str,
    now_ms: u64,
    at_once: bool,
) {
    let (n, word) = (u.n, u.word());
    let k = u.on_candidate(&p.state.route, spec);
    let pause_over = now_ms >= p.state.step_started_ms + r.batch_pause.0.as_millis() as u64;
    let all = at_once || r.rollback == RollingRollback::All;
    if k == 0 || all || (k <= u.batch && pause_over) {
        let restored = u.route(&p.state.before, spec, 0);
        p.set_route(restored);
        p.state.phase = Phase::Aborted;
        p.state.waiting_for = None;
        p.requeue_ms = None;
        p.event(
            EventKind::Aborted,
            format!(
                "aborted: {why}; all {n} {word} back on version {}",
                p.state.before.stable
            ),
        );
    } else if pause_over {
        let k = k - u.batch.min(k);
        put_on_candidate(spec, u, p, k, now_ms);
        p.event(
            EventKind::Step,
            format!(
                "rolling back: {k} of {n} {word} left on version {}",
                spec.version
            ),
        );
    } else {
        p.requeue_ms = Some(200);
    }
}

/// Runs `k` of the units on the candidate (the rest stable), restarting the
/// batch's clock, and plans again at once.
fn put_on_candidate(spec: &RolloutSpec, u: &Units, p: &mut Plan, k: u32, now_ms: u64) {
    p.set_route(u.route(&p.state.before, spec, k));
    p.state.step_started_ms = now_ms;
    p.requeue_ms = Some(0);
}

fn scale_up(spec: &RolloutSpec, u: &Units, p: &mut Plan, now_ms: u64) {
    let n = u.n;
    let total = u.batches() + 2;
    let Some(instances) = u.instances else {
        p.set_route(route_for(&p.state.before, spec, n, 0));
        p.goto(1, now_ms);
        p.event(
            EventKind::Step,
            format!(
                "step 1/{total}: version {} runs {n} replicas (the pool for this update)",
                p.state.before.stable
            ),
        );
        return;
    };
    if instances.is_empty() {
        let message = format!(
            "failed: no live instance was known when the update started; version {} keeps serving",
            p.state.before.stable
        );
        p.end_restored(Phase::Failed, EventKind::Failed, message);
        return;
    }
    p.goto(1, now_ms);
    let order: Vec<String> = instances.iter().map(ToString::to_string).collect();
    p.event(
        EventKind::Step,
        format!(
            "step 1/{total}: {n} instances take part, {} at a time, in this order: {}",
            u.batch,
            order.join(", ")
        ),
    );
}

/// Batch `b`: start its replicas (or move its instances), let it settle
/// for `batch_pause`, and (the last batch) wait for a passing window; then
/// the next batch.
fn batch(
    spec: &RolloutSpec,
    r: &RollingSpec,
    u: &Units,
    p: &mut Plan,
    b: u32,
    promoted: bool,
    now_ms: u64,
) {
    let (n, word) = (u.n, u.word());
    let batches = u.batches();
    let shown = format!("step {}/{}", b + 1, batches + 2);
    let k = u.after(b);
    let already = u.on_candidate(&p.state.route, spec);
    if already < k {
        put_on_candidate(spec, u, p, k, now_ms);
        let which = match u.instances {
            None => String::new(),
            Some(ids) => {
                let moved: Vec<String> = ids[already as usize..k as usize]
                    .iter()
                    .map(ToString::to_string)
                    .collect();
                format!(
                    ", the load balancer's spread; now on it: {}",
                    moved.join(", ")
                )
            }
        };
        p.event(
            EventKind::Step,
            format!(
                "{shown}: batch {b}: {k} of {n} {word} run version {} (about {:.0}% of traffic{which})",
                spec.version,
                f64::from(k) * 100.0 / f64::from(n)
            ),
        );
        return;
    }
    if !promoted && let Some(left) = p.timer(r.batch_pause.0, now_ms) {
        p.state.message = format!(
            "{shown}: batch {b} ({k}/{n}{}) settling, {}s left",
            unit_suffix(u),
            secs(left)
        );
        return;
    }
    if b as usize == batches
        && !promoted
        && let Some(why) = p.last_step_waits(spec)
    {
        p.waiting(format!(
            "{shown}: all {n} {word} run version {}; waiting for a passing analysis window before it is done ({why})",
            spec.version
        ));
        return;
    }
    // The batch's replicas are up (the route was published) and the analysis
    // has not failed since it started: next batch.
    p.state.message = format!("{shown}: batch {b} ({k}/{n}{}) settled", unit_suffix(u));
    p.state.step += 1;
    p.state.step_started_ms = now_ms;
    p.requeue_ms = Some(0);
    if p.state.step > batches {
        succeed(p, spec);
    }
}

/// ` instances` after a count of instances; nothing after replicas (the
/// messages per-replica updates always had).
fn unit_suffix(u: &Units) -> &'static str {
    match u.instances {
        None => "",
        Some(_) => " instances",
    }
}
