//! blue_green: green (the candidate) is loaded into `staging`, reached only by
//! requests with `x-ferry-env: staging`; production (blue) is untouched. An
//! optional QA gate runs a labelled dataset against green (the controller runs
//! it and passes the result in). Promotion — after `auto_promote_after`, or
//! by `ferry promote` — swaps production to green atomically; blue stays
//! loaded for `scale_down_delay` (rollback is instant meanwhile). An optional
//! `post_promotion` analysis window switches back to blue on failure.

use super::{Phase, Plan, Waiting, succeed};
use crate::gateway::policy::WarmVersion;
use crate::spec::{BlueGreenSpec, RolloutSpec};

pub const STEPS: [&str; 5] = ["staging", "qa", "waiting", "promoted", "post-promotion"];

pub fn plan(
    spec: &RolloutSpec,
    b: &BlueGreenSpec,
    p: &mut Plan,
    promote: Option<(bool, String)>,
    now_ms: u64,
) {
    let blue = p.state.before.stable.clone();
    loop {
        match p.state.step {
            0 => {
                let mut route = p.state.before.clone();
                route.staging = Some(spec.version.clone());
                p.set_route(route);
                p.goto(1, now_ms);
                p.event(
                    "step",
                    format!(
                        "step 1/5: green (version {}) loaded in staging; reach it with x-ferry-env: staging; production stays on blue (version {blue})",
                        spec.version
                    ),
                );
                return;
            }
            1 => match (&b.qa, &p.state.qa) {
                (None, _) => {
                    p.state.step = 2;
                    p.state.step_started_ms = now_ms;
                }
                (Some(qa), None) => {
                    p.state.message = format!(
                        "step 2/5: running the QA gate ({}) against green",
                        qa.dataset
                    );
                    p.requeue_ms = Some(200);
                    return;
                }
                (Some(_), Some(result)) if !result.passed => {
                    let reason = result.reason.clone();
                    p.end_restored(
                        Phase::Aborted,
                        "aborted",
                        format!("aborted: {reason}; green leaves staging, blue (version {blue}) keeps serving"),
                    );
                    return;
                }
                (Some(_), Some(result)) => {
                    let reason = result.reason.clone();
                    p.state.step = 2;
                    p.state.step_started_ms = now_ms;
                    p.event("qa_passed", format!("step 2/5: {reason}"));
                }
            },
            2 => {
                if let Some((_, who)) = &promote {
                    p.state.phase = Phase::Progressing;
                    p.state.waiting_for = None;
                    p.event("promoted", format!("promoted by {who}"));
                    p.state.step = 3;
                    continue;
                }
                match b.auto_promote_after {
                    Some(d) => {
                        let end = p.state.step_started_ms + d.0.as_millis() as u64;
                        // Without a post-promotion window, the switch is the
                        // last step: analysis of staging traffic must pass.
                        let waits = b
                            .post_promotion
                            .is_none()
                            .then(|| p.last_step_waits(spec))
                            .flatten();
                        if now_ms >= end
                            && let Some(why) = waits
                        {
                            p.state.message = format!(
                                "step 3/5: green ready in staging; auto-promotion waits for a passing analysis window of staging traffic ({why})"
                            );
                            p.requeue_ms = Some(1_000);
                            return;
                        }
                        if now_ms >= end {
                            p.event("promoted", format!("auto-promoting after {d}"));
                            p.state.step = 3;
                            continue;
                        }
                        p.state.message = format!(
                            "step 3/5: green ready in staging; auto-promotion in {}s",
                            (end - now_ms).div_ceil(1000)
                        );
                        p.requeue_ms = Some(end - now_ms);
                        return;
                    }
                    None => {
                        if p.state.waiting_for != Some(Waiting::Promote) {
                            p.pause(
                                Waiting::Promote,
                                "paused",
                                format!("step 3/5: green ready in staging; waiting for `ferry promote {}`", spec.model),
                            );
                        }
                        return;
                    }
                }
            }
            3 => {
                let mut route = p.all_to(&spec.version);
                route.warm = vec![WarmVersion {
                    version: blue.clone(),
                    until_ms: now_ms + b.scale_down_delay.0.as_millis() as u64,
                }];
                p.set_route(route);
                p.goto(4, now_ms);
                p.event(
                    "step",
                    format!(
                        "step 4/5: production switched to green (version {}); blue (version {blue}) stays loaded for {}",
                        spec.version, b.scale_down_delay
                    ),
                );
                return;
            }
            _ => {
                if let Some(d) = b.post_promotion {
                    let end = p.state.step_started_ms + d.0.as_millis() as u64;
                    if now_ms < end {
                        p.state.message = format!(
                            "step 5/5: post-promotion analysis, {}s left; failure switches back to blue (version {blue})",
                            (end - now_ms).div_ceil(1000)
                        );
                        p.requeue_ms = Some(end - now_ms);
                        return;
                    }
                    if let Some(why) = p.last_step_waits(spec) {
                        p.state.message = format!(
                            "step 5/5: post-promotion window over; waiting for a passing analysis window before blue (version {blue}) is let go ({why})"
                        );
                        p.requeue_ms = Some(1_000);
                        return;
                    }
                }
                succeed(p, spec);
                return;
            }
        }
    }
}
