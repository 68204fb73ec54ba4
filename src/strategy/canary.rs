//! canary: an ordered list of steps — `weight` (share of eligible traffic to
//! the candidate), `pause` (timed, or until `promote`), `analysis` (a gate
//! that waits for passing verdicts) — with optional stickiness and cohort.
//! After the last step the candidate takes all traffic and becomes stable.
//!
//! A shadow rollout with `then: canary` continues here: `offset` is the
//! number of steps before the canary's (they keep their numbering).

use super::{Phase, Plan, Waiting, succeed};
use crate::gateway::RoutePolicy;
use crate::gateway::policy::CandidateSplit;
use crate::spec::{CanarySpec, Pause, RolloutSpec, Step};

/// The steps as the status lists them, plus the final promotion.
pub fn steps(c: &CanarySpec) -> Vec<String> {
    c.steps
        .iter()
        .map(Step::describe)
        .chain(["promote".to_string()])
        .collect()
}

fn route_at(before: &RoutePolicy, spec: &RolloutSpec, c: &CanarySpec, weight: f64) -> RoutePolicy {
    let mut r = before.clone();
    r.candidate = Some(CandidateSplit {
        version: spec.version.clone(),
        weight,
        sticky_header: c.sticky.as_ref().map(|s| s.header.clone()),
        matches: c.matches.clone(),
    });
    r
}

fn advance(p: &mut Plan, now_ms: u64) {
    p.state.step += 1;
    p.state.step_started_ms = now_ms;
    p.state.analysis.gate_passes = 0;
}

/// Whether the candidate already takes all of its (cohort's) traffic.
fn takes_all(route: &RoutePolicy, spec: &RolloutSpec) -> bool {
    route.stable == spec.version
        || route
            .candidate
            .as_ref()
            .is_some_and(|c| c.version == spec.version && c.weight >= 100.0)
}

fn wait_for_a_pass(p: &mut Plan, spec: &RolloutSpec, shown: usize, total: usize, why: &str) {
    p.state.message = format!(
        "step {shown}/{total}: waiting for a passing analysis window before version {} takes all traffic ({why})",
        spec.version
    );
    p.requeue_ms = Some(1_000);
}

/// `promote`: `Some((full, who))` when a person asked to advance.
pub fn plan(
    spec: &RolloutSpec,
    c: &CanarySpec,
    p: &mut Plan,
    promote: Option<(bool, String)>,
    offset: usize,
    now_ms: u64,
) {
    let n = c.steps.len();
    let total = offset + n + 1;
    let cohort = if c.matches.is_empty() {
        String::new()
    } else {
        " of the cohort".to_string()
    };
    // A person's promote takes the last step without a passing window.
    let forced = promote.is_some();
    if let Some((full, who)) = promote {
        p.state.phase = Phase::Progressing;
        p.state.waiting_for = None;
        let i = p.state.step.saturating_sub(offset);
        if full {
            p.state.step = offset + n;
            p.event("promoted", format!("promoted to the end by {who}"));
        } else if i < n {
            if matches!(c.steps[i], Step::Pause(_) | Step::Analysis(_)) {
                advance(p, now_ms);
            }
            p.event(
                "promoted",
                format!(
                    "promoted past step {}/{total} ({}) by {who}",
                    offset + i + 1,
                    c.steps[i].describe()
                ),
            );
        }
    }
    loop {
        let i = p.state.step.saturating_sub(offset);
        if i > n {
            succeed(p, spec);
            return;
        }
        if i == n {
            if !forced
                && !takes_all(&p.state.route, spec)
                && let Some(why) = p.last_step_waits(spec)
            {
                wait_for_a_pass(p, spec, total, total, &why);
                return;
            }
            let route = p.all_to(&spec.version);
            p.set_route(route);
            p.goto(offset + n + 1, now_ms);
            p.event(
                "step",
                format!(
                    "step {total}/{total}: promoting: version {} takes all traffic",
                    spec.version
                ),
            );
            return;
        }
        let shown = offset + i + 1;
        match &c.steps[i] {
            Step::Weight(w) => {
                if *w >= 100.0
                    && !forced
                    && !takes_all(&p.state.route, spec)
                    && let Some(why) = p.last_step_waits(spec)
                {
                    wait_for_a_pass(p, spec, shown, total, &why);
                    return;
                }
                let route = route_at(&p.state.before, spec, c, *w);
                p.set_route(route);
                p.event("step", format!("step {shown}/{total}: weight {w}%{cohort}"));
                advance(p, now_ms);
                p.requeue_ms = Some(0);
                // Publish this weight before taking further steps.
                return;
            }
            Step::Pause(Pause::For(d)) => {
                let end = p.state.step_started_ms + d.0.as_millis() as u64;
                if now_ms >= end {
                    advance(p, now_ms);
                    continue;
                }
                let left = (end - now_ms).div_ceil(1000);
                p.state.message = format!("step {shown}/{total}: pause {d}, {left}s left");
                p.requeue_ms = Some(end - now_ms);
                return;
            }
            Step::Pause(Pause::UntilPromoted(_)) => {
                if p.state.waiting_for != Some(Waiting::Promote) {
                    p.pause(
                        Waiting::Promote,
                        "paused",
                        format!(
                            "step {shown}/{total}: waiting for `ferry promote {}`",
                            spec.model
                        ),
                    );
                }
                return;
            }
            Step::Analysis(gate) => {
                if p.state.analysis.gate_passes >= gate.passes {
                    p.event(
                        "step",
                        format!(
                            "step {shown}/{total}: analysis gate passed ({} passing windows)",
                            gate.passes
                        ),
                    );
                    advance(p, now_ms);
                    continue;
                }
                p.state.message = format!(
                    "step {shown}/{total}: analysis gate, {} passing windows of {}",
                    p.state.analysis.gate_passes, gate.passes
                );
                p.requeue_ms = Some(1_000);
                return;
            }
        }
    }
}
