//! shadow: the candidate receives copies of `mirror_percent` of production
//! requests; users only get stable's answers. Comparisons (and the latest
//! disagreements among them) accumulate as the controller counts them; with
//! at least `min_comparisons` pairs agreeing at ≥ `min_agreement` (and
//! analysis passing, when configured), `then` decides: `promote`, `manual`
//! (wait for a person) or `canary` (real users next). Too little agreement
//! with enough pairs aborts. Every decision's event carries the evidence.
//!
//! Steps ([`ShadowStep`]): mirroring, decided, then the canary's steps.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Phase, Plan, RolloutState, Waiting, canary, succeed};
use crate::analysis::Outcome;
use crate::gateway::RoutePolicy;
use crate::gateway::policy::{Compare, ShadowPolicy};
use crate::records::EventKind;
use crate::spec::{RolloutSpec, ShadowSpec, ShadowThen};

/// Where a shadow rollout is, read from the stored step index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShadowStep {
    /// Copies go to the candidate; comparisons accumulate.
    Mirroring,
    /// Decided to promote (the next pass ends the rollout).
    Decided,
    /// `then: canary`: the canary's own step index.
    Canary(usize),
}

/// Steps before a `then: canary`'s own (they keep their numbering).
const CANARY_OFFSET: usize = 2;

impl ShadowStep {
    pub fn at(i: usize) -> ShadowStep {
        match i {
            0 => ShadowStep::Mirroring,
            1 => ShadowStep::Decided,
            i => ShadowStep::Canary(i - CANARY_OFFSET),
        }
    }

    pub fn index(self) -> usize {
        match self {
            ShadowStep::Mirroring => 0,
            ShadowStep::Decided => 1,
            ShadowStep::Canary(i) => i + CANARY_OFFSET,
        }
    }
}

/// A shadow's own state, stored flattened into the rollout's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShadowState {
    /// Comparisons counted since mirroring began.
    #[serde(rename = "shadow", default)]
    pub compared: ShadowProgress,
}

impl ShadowState {
    /// Adds the comparisons counted since the last observation (the plan
    /// does with each; a stopping instance without planning).
    pub fn add(&mut self, w: &ShadowProgress) {
        self.compared.add(w);
    }
}

/// Shadow comparisons accumulated since mirroring began, with the latest
/// disagreements among them (so the counts always cover the examples).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShadowProgress {
    pub agree: u64,
    pub disagree: u64,
    /// Copies the shadow failed to answer.
    pub errors: u64,
    /// Copies dropped because the shadow was saturated.
    pub dropped: u64,
    /// The latest disagreements (at most [`SHADOW_EXAMPLES`]).
    #[serde(default)]
    pub examples: Vec<crate::metrics::Disagreement>,
    /// On a shared store, per instance (by id), the last 5-second bucket
    /// (its epoch) whose comparisons are in these counts: the leader counts
    /// each instance's buckets as that instance flushes them, late or not,
    /// and a new leader counts on from here, so nothing is counted twice or
    /// skipped. Empty on one node, which counts its live counters.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub counted_through: BTreeMap<String, u64>,
}

/// Disagreements a shadow rollout keeps as examples.
pub const SHADOW_EXAMPLES: usize = 5;

impl ShadowProgress {
    fn add(&mut self, w: &ShadowProgress) {
        self.agree += w.agree;
        self.disagree += w.disagree;
        self.errors += w.errors;
        self.dropped += w.dropped;
        self.examples.extend(w.examples.iter().cloned());
        let extra = self.examples.len().saturating_sub(SHADOW_EXAMPLES);
        self.examples.drain(..extra);
        for (instance, epoch) in &w.counted_through {
            let through = self.counted_through.entry(instance.clone()).or_default();
            *through = (*through).max(*epoch);
        }
    }

    pub fn compared(&self) -> u64 {
        self.agree + self.disagree
    }

    pub fn agreement(&self) -> Option<f64> {
        (self.compared() > 0).then(|| self.agree as f64 / self.compared() as f64)
    }
}

/// Whether the rollout mirrors to its candidate now (and so counts
/// comparisons).
pub fn mirroring(spec: &RolloutSpec, state: &RolloutState) -> bool {
    ShadowStep::at(state.step) == ShadowStep::Mirroring
        && state
            .route
            .shadow
            .as_ref()
            .is_some_and(|s| s.version == spec.version)
}

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

fn mirror_route(before: &RoutePolicy, spec: &RolloutSpec, sh: &ShadowSpec) -> RoutePolicy {
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
    let s = &p.state.shadow.compared;
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
    let s = &p.state.shadow.compared;
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
            p.goto(ShadowStep::Canary(0).index(), now_ms);
            p.event(
                EventKind::Step,
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
            p.state.step = ShadowStep::Decided.index();
            p.requeue_ms = Some(0);
            p.event(
                EventKind::Step,
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
    match ShadowStep::at(p.state.step) {
        ShadowStep::Canary(_) => {
            let c = sh
                .canary
                .as_ref()
                .expect("then: canary has a canary block (validated)");
            canary::plan(spec, c, p, promote, CANARY_OFFSET, now_ms);
        }
        ShadowStep::Decided => succeed(p, spec),
        ShadowStep::Mirroring => mirror(spec, sh, p, promote, now_ms),
    }
}

/// Mirrors, counts, and decides once the comparisons say enough (or a
/// person promoted).
fn mirror(
    spec: &RolloutSpec,
    sh: &ShadowSpec,
    p: &mut Plan,
    promote: Option<(bool, String)>,
    now_ms: u64,
) {
    let wanted = mirror_route(&p.state.before, spec, sh);
    if p.state.route.shadow.is_none() {
        p.set_route(wanted);
        p.event(
            EventKind::Step,
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
    let compared = p.state.shadow.compared.compared();
    if compared < sh.min_comparisons {
        p.waiting(format!(
            "step 1/{}: mirroring: {} (need {})",
            total(sh),
            tally(p),
            sh.min_comparisons
        ));
        return;
    }
    let agreement = p.state.shadow.compared.agreement().unwrap_or(0.0);
    if agreement < sh.min_agreement {
        p.end_restored(
            Phase::Aborted,
            EventKind::Aborted,
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
        p.waiting(format!(
            "step 1/{}: agreement {agreement:.4} is enough; waiting for a passing analysis window",
            total(sh)
        ));
        return;
    }
    decide(spec, sh, p, None, now_ms);
}
