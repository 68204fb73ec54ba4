//! shadow: the candidate receives copies of `mirror_percent` of production
//! requests; users only get stable's answers. Comparisons (and the latest
//! disagreements among them) accumulate as the controller counts them; with
//! at least `min_comparisons` pairs agreeing at ≥ `min_agreement` (and
//! analysis passing, when configured), `then` decides: `promote`, `manual`
//! (wait for a person) or `canary` (real users next). Too little agreement
//! with enough pairs aborts. Every decision's event carries the evidence.
//!
//! Steps: 0 mirroring, 1 decided, then the canary's steps (offset 2).

use super::{Phase, Plan, Waiting, canary, succeed};
use crate::analysis::Outcome;
use crate::gateway::RoutePolicy;
use crate::gateway::policy::{Compare, ShadowPolicy};
use crate::spec::{RolloutSpec, ShadowSpec, ShadowThen};

pub fn steps(sh: &ShadowSpec) -> Vec<String> {
    let mut v = vec!["mirroring".to_string(), "decided".to_string()];
    if let Some(c) = &sh.canary {
        v.extend(canary::steps(c));
    }
    v
}

fn total(sh: &ShadowSpec) -> usize {
    steps(sh).len()
}

fn mirroring(before: &RoutePolicy, spec: &RolloutSpec, sh: &ShadowSpec) -> RoutePolicy {
    let mut r = before.clone();
    r.shadow = Some(ShadowPolicy {
        version: spec.version.clone(),
        percent: sh.mirror_percent,
        compare: Compare {
            output: sh.compare.output.clone(),
            mode: sh.compare.mode,
            tolerance: sh.compare.tolerance,
        },
        max_in_flight: 64,
    });
    r
}

/// The comparisons so far, in words.
fn tally(p: &Plan) -> String {
    let s = &p.state.shadow;
    format!(
        "{} comparisons, agreement {}, {} disagreed, {} shadow errors, {} copies dropped",
        s.compared(),
        s.agreement().map_or("-".into(), |a| format!("{a:.4}")),
        s.disagree,
        s.errors,
        s.dropped
    )
}

/// The evidence behind a decision, for its event: the numbers, the
/// thresholds and the example disagreements.
fn evidence(sh: &ShadowSpec, p: &Plan) -> serde_json::Value {
    let s = &p.state.shadow;
    serde_json::json!({
        "comparisons": s.compared(),
        "agree": s.agree,
        "disagree": s.disagree,
        "agreement": s.agreement(),
        "errors": s.errors,
        "dropped": s.dropped,
        "min_comparisons": sh.min_comparisons,
        "min_agreement": sh.min_agreement,
        "examples": s.examples,
    })
}

/// Attaches the evidence to the event just planned.
fn with_evidence(sh: &ShadowSpec, p: &mut Plan) {
    let data = evidence(sh, p);
    if let Some(e) = p.events.last_mut() {
        e.data = data;
    }
}

/// Acts on `then` once the shadow has proved itself (or a person promoted).
fn decide(
    spec: &RolloutSpec,
    sh: &ShadowSpec,
    p: &mut Plan,
    promoted_by: Option<String>,
    now_ms: u64,
) {
    let why = match &promoted_by {
        Some(who) => format!("promoted by {who} ({})", tally(p)),
        None => format!("shadow passed: {}", tally(p)),
    };
    match (sh.then, promoted_by.is_some()) {
        (ShadowThen::Manual, false) => {
            if p.state.waiting_for != Some(Waiting::Promote) {
                p.pause(
                    Waiting::Promote,
                    "paused",
                    format!(
                        "step 1/{}: {why}; waiting for `ferry promote {}`",
                        total(sh),
                        spec.model
                    ),
                );
                with_evidence(sh, p);
            }
        }
        (ShadowThen::Canary, _) => {
            let before = p.state.before.clone();
            p.set_route(before);
            p.state.phase = Phase::Progressing;
            p.state.waiting_for = None;
            p.state.step = 2;
            p.state.step_started_ms = now_ms;
            p.requeue_ms = Some(0);
            p.event(
                "step",
                format!(
                    "step 2/{}: {why}; continuing as a canary with real users",
                    total(sh)
                ),
            );
            with_evidence(sh, p);
        }
        _ => {
            let route = p.all_to(&spec.version);
            p.set_route(route);
            p.state.phase = Phase::Progressing;
            p.state.waiting_for = None;
            p.state.step = 1;
            p.requeue_ms = Some(0);
            p.event(
                "step",
                format!(
                    "step 2/{}: {why}; production switched to version {}",
                    total(sh),
                    spec.version
                ),
            );
            with_evidence(sh, p);
        }
    }
}

pub fn plan(
    spec: &RolloutSpec,
    sh: &ShadowSpec,
    p: &mut Plan,
    promote: Option<(bool, String)>,
    now_ms: u64,
) {
    if p.state.step >= 2 {
        let c = sh
            .canary
            .as_ref()
            .expect("then: canary has a canary block (validated)");
        canary::plan(spec, c, p, promote, 2, now_ms);
        return;
    }
    if p.state.step == 1 {
        succeed(p, spec);
        return;
    }
    let wanted = mirroring(&p.state.before, spec, sh);
    if p.state.route.shadow.is_none() {
        p.set_route(wanted);
        p.event(
            "step",
            format!(
                "step 1/{}: mirroring {}% of production to version {}; users only get version {}'s answers",
                total(sh),
                sh.mirror_percent,
                spec.version,
                p.state.before.stable
            ),
        );
        return;
    }
    if let Some((_, who)) = promote {
        decide(spec, sh, p, Some(who), now_ms);
        return;
    }
    let compared = p.state.shadow.compared();
    if compared < sh.min_comparisons {
        p.state.message = format!(
            "step 1/{}: mirroring: {} (need {})",
            total(sh),
            tally(p),
            sh.min_comparisons
        );
        p.requeue_ms = Some(1_000);
        return;
    }
    let agreement = p.state.shadow.agreement().unwrap_or(0.0);
    if agreement < sh.min_agreement {
        p.end_restored(
            Phase::Aborted,
            "aborted",
            format!(
                "aborted: shadow agreement {agreement:.4} < {} ({}); version {} keeps serving",
                sh.min_agreement,
                tally(p),
                p.state.before.stable
            ),
        );
        with_evidence(sh, p);
        return;
    }
    let analysis_ok = spec.analysis.is_none()
        || p.state
            .analysis
            .last
            .as_ref()
            .is_some_and(|v| v.outcome == Outcome::Pass);
    if !analysis_ok {
        p.state.message = format!(
            "step 1/{}: agreement {agreement:.4} is enough; waiting for a passing analysis window",
            total(sh)
        );
        p.requeue_ms = Some(1_000);
        return;
    }
    decide(spec, sh, p, None, now_ms);
}
