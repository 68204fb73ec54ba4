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

use serde::{Deserialize, Serialize};

use super::{Phase, Plan, secs, succeed};
use crate::analysis::Verdict;
use crate::gateway::RoutePolicy;
use crate::gateway::policy::CandidateSplit;
use crate::records::EventKind;
use crate::spec::{RollingRollback, RollingSpec, RolloutSpec};

fn batches(r: &RollingSpec) -> usize {
    r.replicas.div_ceil(r.batch_size) as usize
}

pub fn steps(r: &RollingSpec) -> Vec<String> {
    let mut v = vec![format!("scale up to {}", r.replicas)];
    for b in 1..=batches(r) {
        let k = (b as u32 * r.batch_size).min(r.replicas);
        v.push(format!("batch {b}: {k}/{}", r.replicas));
    }
    v.push("done".into());
    v
}

/// The route with `k` of `n` replicas on the candidate.
pub fn route_for(before: &RoutePolicy, spec: &RolloutSpec, n: u32, k: u32) -> RoutePolicy {
    if k >= n {
        let mut r = RoutePolicy::stable_only(&spec.version);
        r.timeout = before.timeout;
        r.breaker = before.breaker.clone();
        r.replicas.insert(spec.version.clone(), n);
        return r;
    }
    let mut r = before.clone();
    r.replicas.insert(before.stable.clone(), n - k);
    if k == 0 {
        r.candidate = None;
        r.replicas.remove(&spec.version);
    } else {
        r.candidate = Some(CandidateSplit {
            version: spec.version.clone(),
            weight: (f64::from(k) * 10_000.0 / f64::from(n)).round() / 100.0,
            sticky_header: None,
            matches: Vec::new(),
        });
        r.replicas.insert(spec.version.clone(), k);
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

/// A rolling update's own state, stored flattened into the rollout's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RollingState {
    /// Why the update is taking its batches back (after a failed batch).
    #[serde(default)]
    pub rolling_back: Option<String>,
}

/// Where a rolling update is, read from the stored step index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RollingStep {
    /// Step 0: the stable version scales up to the pool size.
    ScaleUp,
    /// Batch `b` (from 1): `b × batch_size` replicas run the candidate.
    Batch(u32),
    /// Every batch settled.
    Done,
}

impl RollingStep {
    pub fn at(r: &RollingSpec, i: usize) -> RollingStep {
        match i {
            0 => RollingStep::ScaleUp,
            b if b <= batches(r) => RollingStep::Batch(b as u32),
            _ => RollingStep::Done,
        }
    }
}

/// A batch's route could not be published: the previous batch serves (the
/// failed route never did), and the update takes its batches back.
pub fn batch_failed(spec: &RolloutSpec, r: &RollingSpec, p: &mut Plan, why: &str, now_ms: u64) {
    if p.state.rolling.rolling_back.is_some() {
        return;
    }
    p.state.rolling.rolling_back = Some(format!("a batch could not start: {why}"));
    let done = p.state.step.saturating_sub(1) as u32; // batches fully up
    let k = (done * r.batch_size).min(r.replicas);
    p.state.route = route_for(&p.state.before, spec, r.replicas, k);
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
    if let Some(why) = p.state.rolling.rolling_back.clone() {
        roll_back(spec, r, p, &why, now_ms);
        return;
    }
    match RollingStep::at(r, p.state.step) {
        RollingStep::ScaleUp => scale_up(spec, r, p, now_ms),
        RollingStep::Batch(b) => batch(spec, r, p, b, promote.is_some(), now_ms),
        RollingStep::Done => succeed(p, spec),
    }
}

/// Takes one batch back per `batch_pause` (or all at once), then ends the
/// update aborted with every replica on the stable version.
fn roll_back(spec: &RolloutSpec, r: &RollingSpec, p: &mut Plan, why: &str, now_ms: u64) {
    let n = r.replicas;
    let k = on_candidate(&p.state.route, spec);
    let pause_over = now_ms >= p.state.step_started_ms + r.batch_pause.0.as_millis() as u64;
    if k == 0 || r.rollback == RollingRollback::All || (k <= r.batch_size && pause_over) {
        let restored = route_for(&p.state.before, spec, n, 0);
        p.set_route(restored);
        p.state.phase = Phase::Aborted;
        p.state.waiting_for = None;
        p.requeue_ms = None;
        p.event(
            EventKind::Aborted,
            format!(
                "aborted: {why}; all {n} replicas back on version {}",
                p.state.before.stable
            ),
        );
    } else if pause_over {
        let k = k - r.batch_size.min(k);
        put_on_candidate(spec, r, p, k, now_ms);
        p.event(
            EventKind::Step,
            format!(
                "rolling back: {k} of {n} replicas left on version {}",
                spec.version
            ),
        );
    } else {
        p.requeue_ms = Some(200);
    }
}

/// Runs `k` of the pool's replicas on the candidate (the rest stable),
/// restarting the batch's clock, and plans again at once.
fn put_on_candidate(spec: &RolloutSpec, r: &RollingSpec, p: &mut Plan, k: u32, now_ms: u64) {
    p.set_route(route_for(&p.state.before, spec, r.replicas, k));
    p.state.step_started_ms = now_ms;
    p.requeue_ms = Some(0);
}

fn scale_up(spec: &RolloutSpec, r: &RollingSpec, p: &mut Plan, now_ms: u64) {
    let n = r.replicas;
    p.set_route(route_for(&p.state.before, spec, n, 0));
    p.goto(1, now_ms);
    p.event(
        EventKind::Step,
        format!(
            "step 1/{}: version {} runs {n} replicas (the pool for this update)",
            batches(r) + 2,
            p.state.before.stable
        ),
    );
}

/// Batch `b`: start its replicas, let it settle for `batch_pause`, and (the
/// last batch) wait for a passing window; then the next batch.
fn batch(spec: &RolloutSpec, r: &RollingSpec, p: &mut Plan, b: u32, promoted: bool, now_ms: u64) {
    let n = r.replicas;
    let shown = format!("step {}/{}", b + 1, batches(r) + 2);
    let k = (b * r.batch_size).min(n);
    if on_candidate(&p.state.route, spec) < k {
        put_on_candidate(spec, r, p, k, now_ms);
        p.event(
            EventKind::Step,
            format!(
                "{shown}: batch {b}: {k} of {n} replicas run version {} (about {:.0}% of traffic)",
                spec.version,
                f64::from(k) * 100.0 / f64::from(n)
            ),
        );
        return;
    }
    if !promoted && let Some(left) = p.timer(r.batch_pause.0, now_ms) {
        p.state.message = format!(
            "{shown}: batch {b} ({k}/{n}) settling, {}s left",
            secs(left)
        );
        return;
    }
    if b as usize == batches(r)
        && !promoted
        && let Some(why) = p.last_step_waits(spec)
    {
        p.waiting(format!(
            "{shown}: all {n} replicas run version {}; waiting for a passing analysis window before it is done ({why})",
            spec.version
        ));
        return;
    }
    // The batch's replicas are up (the route was published) and the analysis
    // has not failed since it started: next batch.
    p.state.message = format!("{shown}: batch {b} ({k}/{n}) settled");
    p.state.step += 1;
    p.state.step_started_ms = now_ms;
    p.requeue_ms = Some(0);
    if RollingStep::at(r, p.state.step) == RollingStep::Done {
        succeed(p, spec);
    }
}
