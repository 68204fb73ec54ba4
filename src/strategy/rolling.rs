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

use super::{Phase, Plan, succeed};
use crate::gateway::RoutePolicy;
use crate::gateway::policy::CandidateSplit;
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

pub fn plan(
    spec: &RolloutSpec,
    r: &RollingSpec,
    p: &mut Plan,
    promote: Option<(bool, String)>,
    now_ms: u64,
) {
    let n = r.replicas;
    let total = batches(r) + 2;
    if let Some(why) = p.state.rolling_back.clone() {
        let k = on_candidate(&p.state.route, spec);
        let pause_over = now_ms >= p.state.step_started_ms + r.batch_pause.0.as_millis() as u64;
        if k == 0 || r.rollback == RollingRollback::All || (k <= r.batch_size && pause_over) {
            let restored = route_for(&p.state.before, spec, n, 0);
            p.set_route(restored);
            p.state.phase = Phase::Aborted;
            p.state.waiting_for = None;
            p.requeue_ms = None;
            p.event(
                "aborted",
                format!(
                    "aborted: {why}; all {n} replicas back on version {}",
                    p.state.before.stable
                ),
            );
        } else if pause_over {
            let k = k - r.batch_size.min(k);
            p.set_route(route_for(&p.state.before, spec, n, k));
            p.state.step_started_ms = now_ms;
            p.requeue_ms = Some(0);
            p.event(
                "step",
                format!(
                    "rolling back: {k} of {n} replicas left on version {}",
                    spec.version
                ),
            );
        } else {
            p.requeue_ms = Some(200);
        }
        return;
    }
    let step = p.state.step;
    if step == 0 {
        p.set_route(route_for(&p.state.before, spec, n, 0));
        p.goto(1, now_ms);
        p.event(
            "step",
            format!(
                "step 1/{total}: version {} runs {n} replicas (the pool for this update)",
                p.state.before.stable
            ),
        );
        return;
    }
    if step > batches(r) {
        succeed(p, spec);
        return;
    }
    let k_target = (step as u32 * r.batch_size).min(n);
    if on_candidate(&p.state.route, spec) < k_target {
        p.set_route(route_for(&p.state.before, spec, n, k_target));
        p.state.step_started_ms = now_ms;
        p.requeue_ms = Some(0);
        p.event(
            "step",
            format!(
                "step {}/{total}: batch {step}: {k_target} of {n} replicas run version {} (about {:.0}% of traffic)",
                step + 1,
                spec.version,
                f64::from(k_target) * 100.0 / f64::from(n)
            ),
        );
        return;
    }
    let end = p.state.step_started_ms + r.batch_pause.0.as_millis() as u64;
    if now_ms < end && promote.is_none() {
        p.state.message = format!(
            "step {}/{total}: batch {step} ({k_target}/{n}) settling, {}s left",
            step + 1,
            (end - now_ms).div_ceil(1000)
        );
        p.requeue_ms = Some(end - now_ms);
        return;
    }
    if step == batches(r)
        && promote.is_none()
        && let Some(why) = p.last_step_waits(spec)
    {
        p.state.message = format!(
            "step {}/{total}: all {n} replicas run version {}; waiting for a passing analysis window before it is done ({why})",
            step + 1,
            spec.version
        );
        p.requeue_ms = Some(1_000);
        return;
    }
    // The batch's replicas are up (the route was published) and the analysis
    // has not failed since it started: next batch.
    p.state.message = format!(
        "step {}/{total}: batch {step} ({k_target}/{n}) settled",
        step + 1
    );
    p.state.step += 1;
    p.state.step_started_ms = now_ms;
    p.requeue_ms = Some(0);
    if p.state.step > batches(r) {
        succeed(p, spec);
    }
}
