//! blue_green: green (the candidate) is loaded into `staging`, reached only by
//! requests with `x-ferry-env: staging`; production (blue) is untouched. An
//! optional QA gate runs a labelled dataset against green (the controller runs
//! it and passes the result in). Promotion — after `auto_promote_after`, or
//! by `ferry promote` — swaps production to green atomically; blue stays
//! loaded for `scale_down_delay` (rollback is instant meanwhile). An optional
//! `post_promotion` analysis window switches back to blue on failure.

use serde::{Deserialize, Serialize};

use super::{Phase, Plan, secs, succeed};
use crate::analysis::qa::QaResult;
use crate::gateway::policy::WarmVersion;
use crate::records::EventKind;
use crate::spec::{BlueGreenSpec, QaSpec, RolloutSpec};

/// Blue-green's steps, in order; the stored step index is the position.
/// Their serde names are the names the status lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlueGreenStep {
    /// Green is loading into staging.
    Staging,
    /// The QA gate runs against green.
    Qa,
    /// Green is ready in staging; waiting to promote.
    Waiting,
    /// Production switches to green.
    Promoted,
    /// Watching green in production while blue stays loaded.
    PostPromotion,
}

crate::records::display_from_serde!(BlueGreenStep);

impl BlueGreenStep {
    pub const ALL: [BlueGreenStep; 5] = [
        BlueGreenStep::Staging,
        BlueGreenStep::Qa,
        BlueGreenStep::Waiting,
        BlueGreenStep::Promoted,
        BlueGreenStep::PostPromotion,
    ];

    /// The step stored as index `i` (past the last: the last).
    pub fn at(i: usize) -> BlueGreenStep {
        Self::ALL[i.min(Self::ALL.len() - 1)]
    }

    pub fn index(self) -> usize {
        self as usize
    }

    /// `step 3/5`, as messages number it.
    pub fn shown(self) -> String {
        format!("step {}/{}", self.index() + 1, Self::ALL.len())
    }
}

/// The steps as the status lists them.
pub fn steps() -> Vec<String> {
    BlueGreenStep::ALL.iter().map(|s| s.to_string()).collect()
}

/// Blue-green's own state, stored flattened into the rollout's.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BlueGreenState {
    /// The QA gate's result, once it ran.
    #[serde(default)]
    pub qa: Option<QaResult>,
}

/// The QA gate to run now: configured, at the QA step, not yet run.
pub fn qa_due<'a>(b: &'a BlueGreenSpec, state: &super::RolloutState) -> Option<&'a QaSpec> {
    let qa = b.qa.as_ref()?;
    (BlueGreenStep::at(state.step) == BlueGreenStep::Qa && state.blue_green.qa.is_none())
        .then_some(qa)
}

fn goto(p: &mut Plan, step: BlueGreenStep, now_ms: u64) {
    p.state.step = step.index();
    p.state.step_started_ms = now_ms;
}

pub fn plan(
    spec: &RolloutSpec,
    b: &BlueGreenSpec,
    p: &mut Plan,
    promote: Option<(bool, String)>,
    now_ms: u64,
) {
    loop {
        let go_on = match BlueGreenStep::at(p.state.step) {
            BlueGreenStep::Staging => stage(spec, p, now_ms),
            BlueGreenStep::Qa => qa_gate(b, p, now_ms),
            BlueGreenStep::Waiting => wait_to_promote(spec, b, p, promote.as_ref(), now_ms),
            BlueGreenStep::Promoted => switch(spec, b, p, now_ms),
            BlueGreenStep::PostPromotion => {
                post_promotion(spec, b, p, now_ms);
                false
            }
        };
        if !go_on {
            return;
        }
    }
}

/// Loads green into staging; production stays on blue.
fn stage(spec: &RolloutSpec, p: &mut Plan, now_ms: u64) -> bool {
    let mut route = p.state.before.clone();
    route.staging = Some(spec.version.clone());
    p.set_route(route);
    p.goto(BlueGreenStep::Qa.index(), now_ms);
    p.event(
        EventKind::Step,
        format!(
            "{}: green (version {}) loaded in staging; reach it with x-ferry-env: staging; production stays on blue (version {})",
            BlueGreenStep::Staging.shown(),
            spec.version,
            p.state.before.stable
        ),
    );
    false
}

/// Waits for the QA gate's result (when there is a gate): a failed gate
/// aborts with blue serving; a passed one goes on to wait for promotion.
fn qa_gate(b: &BlueGreenSpec, p: &mut Plan, now_ms: u64) -> bool {
    let shown = BlueGreenStep::Qa.shown();
    let blue = p.state.before.stable.clone();
    match (&b.qa, &p.state.blue_green.qa) {
        (None, _) => {
            goto(p, BlueGreenStep::Waiting, now_ms);
            true
        }
        (Some(qa), None) => {
            p.state.message = format!(
                "{shown}: running the QA gate ({}) against green",
                qa.dataset
            );
            p.requeue_ms = Some(200);
            false
        }
        (Some(_), Some(result)) if !result.passed => {
            let message = format!(
                "aborted: {}; green leaves staging, blue (version {blue}) keeps serving",
                result.reason
            );
            p.end_restored(Phase::Aborted, EventKind::Aborted, message);
            false
        }
        (Some(_), Some(result)) => {
            let message = format!("{shown}: {}", result.reason);
            goto(p, BlueGreenStep::Waiting, now_ms);
            p.event(EventKind::QaPassed, message);
            true
        }
    }
}

/// Green is ready in staging: promote when a person says so, or after
/// `auto_promote_after` (with a passing window of staging traffic when the
/// switch is the last step).
fn wait_to_promote(
    spec: &RolloutSpec,
    b: &BlueGreenSpec,
    p: &mut Plan,
    promote: Option<&(bool, String)>,
    now_ms: u64,
) -> bool {
    let shown = BlueGreenStep::Waiting.shown();
    if let Some((_, who)) = promote {
        p.state.phase = Phase::Progressing;
        p.state.waiting_for = None;
        p.event(EventKind::Promoted, format!("promoted by {who}"));
        p.state.step = BlueGreenStep::Promoted.index();
        return true;
    }
    let Some(d) = b.auto_promote_after else {
        p.wait_for_promote(|| {
            format!(
                "{shown}: green ready in staging; waiting for `ferry promote {}`",
                spec.model
            )
        });
        return false;
    };
    if let Some(left) = p.timer(d.0, now_ms) {
        p.state.message = format!(
            "{shown}: green ready in staging; auto-promotion in {}s",
            secs(left)
        );
        return false;
    }
    // Without a post-promotion window, the switch is the last step:
    // analysis of staging traffic must pass.
    if b.post_promotion.is_none()
        && let Some(why) = p.last_step_waits(spec)
    {
        p.waiting(format!(
            "{shown}: green ready in staging; auto-promotion waits for a passing analysis window of staging traffic ({why})"
        ));
        return false;
    }
    p.event(EventKind::Promoted, format!("auto-promoting after {d}"));
    p.state.step = BlueGreenStep::Promoted.index();
    true
}

/// Switches production to green; blue stays loaded for `scale_down_delay`.
fn switch(spec: &RolloutSpec, b: &BlueGreenSpec, p: &mut Plan, now_ms: u64) -> bool {
    let blue = p.state.before.stable.clone();
    let mut route = p.all_to(&spec.version);
    route.warm = vec![WarmVersion {
        version: blue.clone(),
        until_ms: now_ms + b.scale_down_delay.0.as_millis() as u64,
    }];
    p.set_route(route);
    p.goto(BlueGreenStep::PostPromotion.index(), now_ms);
    p.event(
        EventKind::Step,
        format!(
            "{}: production switched to green (version {}); blue (version {blue}) stays loaded for {}",
            BlueGreenStep::Promoted.shown(),
            spec.version,
            b.scale_down_delay
        ),
    );
    false
}

/// The post-promotion window (when configured) must run out and its
/// analysis pass before blue is let go; then the rollout succeeds.
fn post_promotion(spec: &RolloutSpec, b: &BlueGreenSpec, p: &mut Plan, now_ms: u64) {
    let shown = BlueGreenStep::PostPromotion.shown();
    let blue = p.state.before.stable.clone();
    if let Some(d) = b.post_promotion {
        if let Some(left) = p.timer(d.0, now_ms) {
            p.state.message = format!(
                "{shown}: post-promotion analysis, {}s left; failure switches back to blue (version {blue})",
                secs(left)
            );
            return;
        }
        if let Some(why) = p.last_step_waits(spec) {
            p.waiting(format!(
                "{shown}: post-promotion window over; waiting for a passing analysis window before blue (version {blue}) is let go ({why})"
            ));
            return;
        }
    }
    succeed(p, spec);
}

#[cfg(test)]
mod tests {
    use super::BlueGreenStep;

    #[test]
    fn steps_are_named_and_numbered_from_one_place() {
        assert_eq!(
            super::steps(),
            ["staging", "qa", "waiting", "promoted", "post-promotion"]
        );
        assert_eq!(BlueGreenStep::Waiting.shown(), "step 3/5");
        assert_eq!(BlueGreenStep::at(1), BlueGreenStep::Qa);
        assert_eq!(BlueGreenStep::at(9), BlueGreenStep::PostPromotion);
        for (i, step) in BlueGreenStep::ALL.iter().enumerate() {
            assert_eq!(step.index(), i);
        }
    }
}
