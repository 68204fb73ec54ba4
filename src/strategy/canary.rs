//! canary: an ordered list of steps — `weight` (share of eligible traffic to
//! the candidate), `pause` (timed, or until `promote`), `analysis` (a gate
//! that waits for passing verdicts) — with optional stickiness and cohort.
//! After the last step the candidate takes all traffic and becomes stable.
//!
//! A shadow rollout with `then: canary` continues here: `offset` is the
//! number of steps before the canary's (they keep their numbering).

use super::{Phase, Plan, secs, succeed};
use crate::gateway::RoutePolicy;
use crate::gateway::policy::CandidateSplit;
use crate::records::EventKind;
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
    p.waiting(format!(
        "step {shown}/{total}: waiting for a passing analysis window before version {} takes all traffic ({why})",
        spec.version
    ));
}

/// Where a canary is, read from the stored step index.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum CanaryStep<'a> {
    /// One of the spec's steps (its index among them).
    Listed(usize, &'a Step),
    /// The final promotion: the candidate takes all traffic.
    Promote,
    /// Promoted; the next pass ends the rollout.
    Done,
}

impl<'a> CanaryStep<'a> {
    /// The step at index `i` of the canary's own numbering.
    pub fn at(c: &'a CanarySpec, i: usize) -> CanaryStep<'a> {
        match c.steps.get(i) {
            Some(step) => CanaryStep::Listed(i, step),
            None if i == c.steps.len() => CanaryStep::Promote,
            None => CanaryStep::Done,
        }
    }
}

/// One pass through the canary's steps: how they are numbered in messages
/// (`offset` steps come before them, a shadow's; the promotion is the
/// last), and whether a person's promote forces the last step.
struct Walk {
    offset: usize,
    total: usize,
    /// A person's promote takes the last step without a passing window.
    forced: bool,
}

impl Walk {
    fn new(c: &CanarySpec, offset: usize, forced: bool) -> Walk {
        Walk {
            offset,
            total: offset + c.steps.len() + 1,
            forced,
        }
    }

    /// The canary's own index of the rollout's current step.
    fn own(&self, p: &Plan) -> usize {
        p.state.step.saturating_sub(self.offset)
    }

    /// `step 3/7` for the canary's step `i`.
    fn shown(&self, i: usize) -> String {
        format!("step {}/{}", self.offset + i + 1, self.total)
    }
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
    let at = Walk::new(c, offset, promote.is_some());
    if let Some((full, who)) = promote {
        promoted(c, p, &at, full, &who, now_ms);
    }
    loop {
        let i = at.own(p);
        let done = match CanaryStep::at(c, i) {
            CanaryStep::Done => {
                succeed(p, spec);
                true
            }
            CanaryStep::Promote => {
                promote_all(spec, p, &at, now_ms);
                true
            }
            CanaryStep::Listed(i, _) => take(spec, c, p, &at, i, now_ms),
        };
        if done {
            return;
        }
    }
}

/// A person's promote: to the end (`full`), or past a pause or gate.
fn promoted(c: &CanarySpec, p: &mut Plan, at: &Walk, full: bool, who: &str, now_ms: u64) {
    p.state.phase = Phase::Progressing;
    p.state.waiting_for = None;
    let i = at.own(p);
    if full {
        p.state.step = at.offset + c.steps.len();
        p.event(EventKind::Promoted, format!("promoted to the end by {who}"));
    } else if let CanaryStep::Listed(i, step) = CanaryStep::at(c, i) {
        if matches!(step, Step::Pause(_) | Step::Analysis(_)) {
            advance(p, now_ms);
        }
        p.event(
            EventKind::Promoted,
            format!(
                "promoted past {} ({}) by {who}",
                at.shown(i),
                step.describe()
            ),
        );
    }
}

/// The last step: the candidate takes all traffic (after a passing window,
/// unless a person promoted).
fn promote_all(spec: &RolloutSpec, p: &mut Plan, at: &Walk, now_ms: u64) {
    let total = at.total;
    if !at.forced
        && !takes_all(&p.state.route, spec)
        && let Some(why) = p.last_step_waits(spec)
    {
        wait_for_a_pass(p, spec, total, total, &why);
        return;
    }
    let route = p.all_to(&spec.version);
    p.set_route(route);
    p.goto(total, now_ms);
    p.event(
        EventKind::Step,
        format!(
            "step {total}/{total}: promoting: version {} takes all traffic",
            spec.version
        ),
    );
}

/// Takes listed step `i`; true when the pass ends here, false to go on to
/// the next step at once.
fn take(
    spec: &RolloutSpec,
    c: &CanarySpec,
    p: &mut Plan,
    at: &Walk,
    i: usize,
    now_ms: u64,
) -> bool {
    let shown = at.shown(i);
    match &c.steps[i] {
        Step::Weight(w) => {
            if *w >= 100.0
                && !at.forced
                && !takes_all(&p.state.route, spec)
                && let Some(why) = p.last_step_waits(spec)
            {
                wait_for_a_pass(p, spec, at.offset + i + 1, at.total, &why);
                return true;
            }
            let cohort = if c.matches.is_empty() {
                ""
            } else {
                " of the cohort"
            };
            let route = route_at(&p.state.before, spec, c, *w);
            p.set_route(route);
            p.event(EventKind::Step, format!("{shown}: weight {w}%{cohort}"));
            advance(p, now_ms);
            // Publish this weight before taking further steps.
            p.requeue_ms = Some(0);
            true
        }
        Step::Pause(Pause::For(d)) => match p.timer(d.0, now_ms) {
            None => {
                advance(p, now_ms);
                false
            }
            Some(left) => {
                p.state.message = format!("{shown}: pause {d}, {}s left", secs(left));
                true
            }
        },
        Step::Pause(Pause::UntilPromoted(_)) => {
            p.wait_for_promote(|| format!("{shown}: waiting for `ferry promote {}`", spec.model));
            true
        }
        Step::Analysis(gate) => {
            let passes = p.state.analysis.gate_passes;
            if passes >= gate.passes {
                p.event(
                    EventKind::Step,
                    format!(
                        "{shown}: analysis gate passed ({} passing windows)",
                        gate.passes
                    ),
                );
                advance(p, now_ms);
                return false;
            }
            p.waiting(format!(
                "{shown}: analysis gate, {passes} passing windows of {}",
                gate.passes
            ));
            true
        }
    }
}
