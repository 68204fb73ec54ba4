//! Strategies driven through their whole lives with a fake clock and fake
//! verdicts, in microseconds.

use super::*;
use crate::analysis::{Outcome, Verdict};

fn spec(yaml: &str) -> RolloutSpec {
    RolloutSpec::from_yaml(&format!("model: cancer\nversion: \"2\"\n{yaml}")).unwrap()
}

fn verdict(outcome: Outcome) -> Verdict {
    Verdict {
        outcome,
        candidate_requests: 412,
        stable_requests: 4000,
        checks: vec![],
        reason: match outcome {
            Outcome::Fail => "candidate error_rate 0.0410 > 0.0100".into(),
            _ => "fine".into(),
        },
    }
}

/// Runs plans the way the controller does: after a published route, plan
/// again at once.
struct Driver {
    spec: RolloutSpec,
    state: RolloutState,
    now: u64,
    events: Vec<String>,
}

impl Driver {
    fn new(spec: RolloutSpec) -> Driver {
        Driver {
            state: initial_state(&RoutePolicy::stable_only("1"), 0),
            spec,
            now: 0,
            events: vec![],
        }
    }

    fn tick(&mut self, obs: Observations) -> Plan {
        let mut plan = plan(&self.spec, &self.state, &obs, self.now);
        loop {
            self.events.extend(
                plan.events
                    .iter()
                    .map(|e| format!("{}: {}", e.kind, e.message)),
            );
            self.state = plan.state.clone();
            if plan.requeue_ms != Some(0) || !self.state.phase.is_active() {
                return plan;
            }
            plan = super::plan(&self.spec, &self.state, &Observations::default(), self.now);
        }
    }

    fn idle(&mut self) -> Plan {
        self.tick(Observations::default())
    }

    fn weight(&self) -> Option<f64> {
        self.state.route.candidate.as_ref().map(|c| c.weight)
    }
}

const CANARY: &str = "strategy: { canary: { steps: [ { weight: 10 }, { pause: 30s }, { analysis: {} }, { weight: 50 }, { pause: {} }, { weight: 100 } ] } }\nanalysis: { interval: 10s, failure_limit: 2, max_inconclusive: 3 }\n";

#[test]
fn a_canary_walks_its_steps_and_promotes() {
    let mut d = Driver::new(spec(CANARY));
    d.idle();
    assert_eq!(d.weight(), Some(10.0));
    assert_eq!(d.state.step, 1);
    d.now = 29_000;
    let p = d.idle();
    assert_eq!(p.requeue_ms, Some(1_000), "1 s of the 30 s pause left");
    assert!(d.state.message.contains("1s left"), "{}", d.state.message);
    d.now = 30_000;
    d.idle();
    assert_eq!(d.state.step, 2, "waiting at the analysis gate");
    d.tick(Observations {
        verdict: Some(verdict(Outcome::Inconclusive)),
        ..Default::default()
    });
    assert_eq!(
        d.state.step, 2,
        "an inconclusive window does not open a gate"
    );
    d.tick(Observations {
        verdict: Some(verdict(Outcome::Pass)),
        ..Default::default()
    });
    assert_eq!(d.weight(), Some(50.0));
    assert_eq!(
        (d.state.phase, d.state.waiting_for),
        (Phase::Paused, Some(Waiting::Promote))
    );
    // Time alone does not end an indefinite pause.
    d.now = 10_000_000;
    d.idle();
    assert_eq!(d.state.phase, Phase::Paused);
    d.tick(Observations {
        command: Some((Command::Promote { full: false }, "alice".into())),
        ..Default::default()
    });
    assert_eq!(d.state.phase, Phase::Succeeded);
    assert_eq!(d.state.route, RoutePolicy::stable_only("2"));
    assert!(
        d.events
            .iter()
            .any(|e| e.contains("promoted past step 5/7 (pause until promoted) by alice")),
        "{:#?}",
        d.events
    );
    assert_eq!(
        d.events.last().unwrap(),
        "succeeded: succeeded: version 2 is the stable version of cancer"
    );
}

#[test]
fn failed_windows_abort_after_the_failure_limit_and_restore_the_route() {
    let mut d = Driver::new(spec(CANARY));
    d.idle();
    d.tick(Observations {
        verdict: Some(verdict(Outcome::Fail)),
        ..Default::default()
    });
    assert_eq!(
        d.state.phase,
        Phase::Progressing,
        "one failed window of two"
    );
    d.tick(Observations {
        verdict: Some(verdict(Outcome::Pass)),
        ..Default::default()
    });
    d.tick(Observations {
        verdict: Some(verdict(Outcome::Fail)),
        ..Default::default()
    });
    assert_eq!(
        d.state.phase,
        Phase::Progressing,
        "failures must be consecutive"
    );
    let p = d.tick(Observations {
        verdict: Some(verdict(Outcome::Fail)),
        ..Default::default()
    });
    assert_eq!(d.state.phase, Phase::Aborted);
    assert!(p.publish);
    assert_eq!(d.state.route, RoutePolicy::stable_only("1"));
    assert_eq!(
        d.state.message,
        "aborted: candidate error_rate 0.0410 > 0.0100 in 2 consecutive windows (412 candidate requests); all traffic back on version 1"
    );
    // A finished rollout ignores everything.
    let p = d.tick(Observations {
        command: Some((Command::Resume, "bob".into())),
        ..Default::default()
    });
    assert!(p.events.is_empty() && !p.publish);
}

#[test]
fn too_many_inconclusive_windows_pause_for_a_person() {
    let mut d = Driver::new(spec(CANARY));
    d.idle();
    for _ in 0..3 {
        d.tick(Observations {
            verdict: Some(verdict(Outcome::Inconclusive)),
            ..Default::default()
        });
    }
    assert_eq!(
        (d.state.phase, d.state.waiting_for),
        (Phase::Paused, Some(Waiting::Resume))
    );
    // promote does not end a resume wait by itself, resume does.
    d.now = 60_000;
    d.tick(Observations {
        command: Some((Command::Resume, "bob".into())),
        ..Default::default()
    });
    assert_eq!(d.state.phase, Phase::Progressing);
    assert_eq!(d.state.analysis.consecutive_inconclusive, 0);
}

#[test]
fn pause_and_abort_commands() {
    let mut d = Driver::new(spec(CANARY));
    d.idle();
    d.tick(Observations {
        command: Some((Command::Pause, "ops".into())),
        ..Default::default()
    });
    assert_eq!(
        (d.state.phase, d.state.waiting_for),
        (Phase::Paused, Some(Waiting::Resume))
    );
    d.now = 100_000;
    d.idle();
    assert_eq!(
        d.state.step, 1,
        "a paused canary does not advance its timer steps"
    );
    let p = d.tick(Observations {
        command: Some((Command::Abort, "ops".into())),
        ..Default::default()
    });
    assert_eq!(d.state.phase, Phase::Aborted);
    assert!(p.publish);
    assert!(d.state.message.starts_with("aborted by ops"));
}

#[test]
fn promote_full_jumps_to_the_end() {
    let mut d = Driver::new(spec(CANARY));
    d.idle();
    d.tick(Observations {
        command: Some((Command::Promote { full: true }, "ci".into())),
        ..Default::default()
    });
    assert_eq!(d.state.phase, Phase::Succeeded);
    assert_eq!(d.state.route.stable, "2");
}

#[test]
fn a_restart_resumes_the_same_step_with_the_remaining_time() {
    let mut d = Driver::new(spec(
        "strategy: { canary: { steps: [ { weight: 25 }, { pause: 5m }, { weight: 100 } ] } }\n",
    ));
    d.idle();
    // Three minutes into the pause the process dies; the stored state is all
    // that is left. Planning from it later sees the same step and two minutes.
    let stored = serde_json::to_string(&d.state).unwrap();
    let restored: RolloutState = serde_json::from_str(&stored).unwrap();
    let p = plan(&d.spec, &restored, &Observations::default(), 180_000);
    assert_eq!(p.state.step, 1);
    assert_eq!(p.requeue_ms, Some(120_000));
    assert_eq!(p.state.route.candidate.unwrap().weight, 25.0);
}

#[test]
fn a_candidate_that_cannot_start_fails_the_rollout_and_stable_keeps_serving() {
    let mut d = Driver::new(spec("strategy: { basic: {} }\n"));
    let p = plan(&d.spec, &d.state, &Observations::default(), 0);
    assert!(p.publish);
    assert_eq!(p.state.route.stable, "2");
    d.state = p.state;
    d.tick(Observations {
        route_failed: Some("version 2 could not start: warm-up failed".into()),
        ..Default::default()
    });
    assert_eq!(d.state.phase, Phase::Failed);
    assert_eq!(d.state.route, RoutePolicy::stable_only("1"));
    assert!(d.state.message.contains("version 1 keeps serving"));
}

#[test]
fn basic_switches_and_succeeds() {
    let mut d = Driver::new(spec("strategy: { basic: {} }\n"));
    d.idle();
    assert_eq!(d.state.phase, Phase::Succeeded);
    assert_eq!(d.state.route, RoutePolicy::stable_only("2"));
}

#[test]
fn multi_keeps_the_previous_versions_as_a_failover_chain() {
    let mut d = Driver::new(spec("strategy: { multi: { keep: 2, timeout: 500ms } }\n"));
    d.state.before.failover = vec!["0".into(), "-1".into()];
    d.idle();
    assert_eq!(d.state.phase, Phase::Succeeded);
    assert_eq!(d.state.route.stable, "2");
    assert_eq!(
        d.state.route.failover,
        vec!["1".to_string(), "0".to_string()]
    );
    assert_eq!(d.state.route.timeout.unwrap().to_string(), "500ms");
}

#[test]
fn cohort_canaries_say_so_in_their_messages() {
    let mut d = Driver::new(spec(
        "strategy: { canary: { steps: [ { weight: 20 } ], match: [ { header: x-region, values: [eu-west] } ] } }\n",
    ));
    let p = plan(&d.spec, &d.state, &Observations::default(), 0);
    d.state = p.state;
    assert!(
        d.state.message.contains("weight 20% of the cohort"),
        "{}",
        d.state.message
    );
}
