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
        "aborted: candidate error_rate 0.0410 > 0.0100 in 2 failed windows with no passing window between them (412 candidate requests); all traffic back on version 1"
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

/// A person's pause stops a timed pause's clock; resume continues with the
/// time that was left, also after a restart while paused.
#[test]
fn a_manual_pause_stops_a_timed_pause_and_resume_continues_with_the_time_left() {
    let mut d = Driver::new(spec(
        "strategy: { canary: { steps: [ { weight: 10 }, { pause: 30s }, { weight: 50 }, { pause: {} } ] } }\n",
    ));
    d.idle();
    d.now = 10_000;
    d.tick(Observations {
        command: Some((Command::Pause, "ops".into())),
        ..Default::default()
    });
    d.now = 50_000;
    d.idle();
    assert_eq!(d.weight(), Some(10.0), "paused: the timer does not run out");
    // The process restarts while paused.
    let stored = serde_json::to_string(&d.state).unwrap();
    d.state = serde_json::from_str(&stored).unwrap();
    d.now = 100_000;
    let p = d.tick(Observations {
        command: Some((Command::Resume, "ops".into())),
        ..Default::default()
    });
    assert_eq!(d.weight(), Some(10.0), "20 s of the pause are left");
    assert_eq!(p.requeue_ms, Some(20_000));
    assert!(d.state.message.contains("20s left"), "{}", d.state.message);
    d.now = 119_999;
    d.idle();
    assert_eq!(d.weight(), Some(10.0));
    d.now = 120_000;
    d.idle();
    assert_eq!(d.weight(), Some(50.0));
}

const LAST_STEP: &str = "strategy: { canary: { steps: [ { weight: 10 }, { pause: 12s }, { weight: 100 } ] } }\nanalysis: { interval: 10s, max_inconclusive: 3 }\n";

/// With analysis configured, inconclusive windows alone never take the last
/// step: it waits for a passing window, and pauses for a person after
/// `max_inconclusive` of them.
#[test]
fn the_last_step_waits_for_a_passing_window() {
    let mut d = Driver::new(spec(LAST_STEP));
    d.idle();
    d.now = 5_000;
    d.tick(Observations {
        verdict: Some(verdict(Outcome::Inconclusive)),
        ..Default::default()
    });
    d.now = 12_000;
    d.idle();
    assert_eq!(d.state.phase, Phase::Progressing);
    assert_eq!(
        d.weight(),
        Some(10.0),
        "the pause ran out, but no window passed"
    );
    assert!(
        d.state
            .message
            .contains("waiting for a passing analysis window"),
        "{}",
        d.state.message
    );
    for _ in 0..2 {
        d.tick(Observations {
            verdict: Some(verdict(Outcome::Inconclusive)),
            ..Default::default()
        });
    }
    assert_eq!(
        (d.state.phase, d.state.waiting_for),
        (Phase::Paused, Some(Waiting::Resume)),
        "3 inconclusive windows in a row pause for a person"
    );
    d.tick(Observations {
        command: Some((Command::Resume, "ops".into())),
        ..Default::default()
    });
    assert_eq!(d.weight(), Some(10.0), "resume alone is no passing window");
    d.tick(Observations {
        verdict: Some(verdict(Outcome::Pass)),
        ..Default::default()
    });
    assert_eq!(d.state.phase, Phase::Succeeded);

    // A person may take the step anyway.
    let mut d = Driver::new(spec(LAST_STEP));
    d.idle();
    d.now = 12_000;
    d.idle();
    d.tick(Observations {
        command: Some((Command::Promote { full: false }, "ann".into())),
        ..Default::default()
    });
    assert_eq!(d.state.phase, Phase::Succeeded);
}

/// Failures separated by inconclusive windows still count (no window passed
/// between them), and the message says so rather than "consecutive".
#[test]
fn the_abort_message_counts_what_the_failure_limit_counts() {
    let mut d = Driver::new(spec(CANARY));
    d.idle();
    for outcome in [
        Outcome::Fail,
        Outcome::Inconclusive,
        Outcome::Inconclusive,
        Outcome::Fail,
    ] {
        d.tick(Observations {
            verdict: Some(verdict(outcome)),
            ..Default::default()
        });
    }
    assert_eq!(d.state.phase, Phase::Aborted);
    assert!(
        d.state
            .message
            .contains("in 2 failed windows with no passing window between them"),
        "{}",
        d.state.message
    );
}

/// A rollout already waiting for `promote` is not paused again by
/// inconclusive windows, so they are not counted towards it.
#[test]
fn inconclusive_windows_while_waiting_for_promote_do_not_count_towards_pausing() {
    let mut d = Driver::new(spec(
        "strategy: { canary: { steps: [ { weight: 10 }, { pause: {} }, { weight: 100 } ] } }\nanalysis: { interval: 10s, max_inconclusive: 3 }\n",
    ));
    d.idle();
    assert_eq!(d.state.waiting_for, Some(Waiting::Promote));
    for _ in 0..5 {
        d.tick(Observations {
            verdict: Some(verdict(Outcome::Inconclusive)),
            ..Default::default()
        });
    }
    assert_eq!(d.state.waiting_for, Some(Waiting::Promote));
    let windows: Vec<&String> = d
        .events
        .iter()
        .filter(|e| e.starts_with("analysis_inconclusive"))
        .collect();
    assert_eq!(windows.len(), 5);
    for w in windows {
        assert!(
            !w.contains("before pausing") && w.contains("already waiting for promote"),
            "{w}"
        );
    }
    assert_eq!(d.state.analysis.consecutive_inconclusive, 0);
}

/// A rollback's end is `rolled_back` (what notify hooks subscribe to), not
/// `succeeded`.
#[test]
fn a_rollback_ends_with_a_rolled_back_event() {
    let mut d = Driver::new(spec("strategy: { basic: {} }\n"));
    d.state.rollback = Some(Rollback {
        undoes: Some("r-1".into()),
    });
    d.idle();
    assert_eq!(d.state.phase, Phase::Succeeded);
    assert_eq!(
        d.events.last().unwrap(),
        "rolled_back: rolled back r-1: version 2 is the stable version of cancer again"
    );
    assert!(!d.events.iter().any(|e| e.starts_with("succeeded")));
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
fn multi_takes_every_setting_of_a_route_policys_breaker() {
    let mut d = Driver::new(spec(
        "strategy: { multi: { keep: 1, breaker: { error_rate: 0.3, consecutive_failures: 2, window: 20s, min_requests: 40, probe_every: 3s } } }\n",
    ));
    d.idle();
    assert_eq!(d.state.phase, Phase::Succeeded);
    let b = &d.state.route.breaker;
    assert_eq!(b.error_rate, 0.3);
    assert_eq!(b.consecutive_failures, 2);
    assert_eq!(b.window.to_string(), "20s");
    assert_eq!(b.min_requests, 40);
    assert_eq!(b.probe_every.to_string(), "3s");
    // What is left out takes the route policy's defaults.
    let mut d = Driver::new(spec(
        "strategy: { multi: { keep: 1, breaker: { consecutive_failures: 3 } } }\n",
    ));
    d.idle();
    assert_eq!(
        d.state.route.breaker,
        crate::gateway::policy::BreakerSettings {
            consecutive_failures: 3,
            ..Default::default()
        }
    );
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

fn window(agree: u64, disagree: u64) -> Observations {
    let examples = (0..disagree.min(3))
        .map(|i| crate::metrics::Disagreement {
            id: format!("req-{agree}-{i}"),
            primary: serde_json::json!({"data": [0]}),
            shadow: serde_json::json!({"data": [1]}),
        })
        .collect();
    Observations {
        shadow_window: Some(ShadowProgress {
            agree,
            disagree,
            errors: 0,
            dropped: 0,
            examples,
            counted_through: Default::default(),
        }),
        ..Default::default()
    }
}

/// On a shared store the counts say, per instance, through which flushed
/// bucket they go: stored with them (a new leader reads it back and counts
/// on from the next bucket of each), never moving back.
#[test]
fn shadow_counts_keep_the_last_bucket_counted_per_instance_in_the_stored_state() {
    let through = |pairs: &[(&str, u64)]| -> std::collections::BTreeMap<String, u64> {
        pairs.iter().map(|(i, e)| (i.to_string(), *e)).collect()
    };
    let mut d = Driver::new(spec(SHADOW));
    d.idle();
    let mut w = window(40, 0);
    w.shadow_window.as_mut().unwrap().counted_through = through(&[("a", 1_000), ("b", 998)]);
    d.tick(w);
    let stored = serde_json::to_string(&d.state).unwrap();
    assert!(
        stored.contains("\"counted_through\":{\"a\":1000,\"b\":998}"),
        "{stored}"
    );
    d.state = serde_json::from_str(&stored).unwrap();
    let mut w = window(20, 0);
    w.shadow_window.as_mut().unwrap().counted_through = through(&[("b", 1_003), ("c", 1_001)]);
    d.tick(w);
    assert_eq!(
        d.state.shadow.compared.counted_through,
        through(&[("a", 1_000), ("b", 1_003), ("c", 1_001)])
    );
    assert_eq!(d.state.shadow.compared.compared(), 60);
    let mut w = window(1, 0);
    w.shadow_window.as_mut().unwrap().counted_through = through(&[("a", 999)]);
    d.tick(w);
    assert_eq!(
        d.state.shadow.compared.counted_through["a"], 1_000,
        "never back"
    );
    let one_node = serde_json::to_string(&Driver::new(spec(SHADOW)).state).unwrap();
    assert!(!one_node.contains("counted_through"), "{one_node}");
}

const SHADOW: &str = "strategy: { shadow: { mirror_percent: 100, compare: { output: probabilities }, min_comparisons: 100, min_agreement: 0.95, then: promote } }\n";

#[test]
fn a_shadow_that_agrees_is_promoted_and_users_never_saw_it() {
    let mut d = Driver::new(spec(SHADOW));
    d.idle();
    let shadow = d.state.route.shadow.clone().expect("mirroring");
    assert_eq!((shadow.version.as_str(), shadow.percent), ("2", 100.0));
    assert_eq!(d.state.route.stable, "1", "users keep the stable answers");
    d.tick(window(60, 1));
    assert_eq!(
        d.state.phase,
        Phase::Progressing,
        "61 comparisons are not enough"
    );
    d.tick(window(59, 1));
    assert_eq!(d.state.phase, Phase::Succeeded);
    assert_eq!(d.state.route, RoutePolicy::stable_only("2"));
}

#[test]
fn a_shadow_that_disagrees_is_aborted_with_the_numbers() {
    let mut d = Driver::new(spec(SHADOW));
    d.idle();
    d.tick(window(61, 39));
    assert_eq!(d.state.phase, Phase::Aborted);
    assert_eq!(d.state.route, RoutePolicy::stable_only("1"));
    assert!(
        d.state
            .message
            .starts_with("aborted: shadow agreement 0.6100 < 0.95 (100 comparisons"),
        "{}",
        d.state.message
    );
}

/// The decision keeps its evidence: the abort event carries the numbers
/// and the latest example disagreements, which the counts cover.
#[test]
fn a_shadow_decision_event_carries_the_numbers_and_the_examples() {
    let mut d = Driver::new(spec(SHADOW));
    d.idle();
    d.tick(window(30, 2));
    assert_eq!(d.state.shadow.compared.examples.len(), 2);
    d.tick(window(31, 37));
    let s = &d.state.shadow.compared;
    assert_eq!(s.examples.len(), SHADOW_EXAMPLES, "the latest few");
    assert_eq!(s.examples.last().unwrap().id, "req-31-2");
    let p = plan(&d.spec, &d.state, &Observations::default(), d.now);
    assert!(p.events.is_empty(), "already decided");
    assert_eq!(d.state.phase, Phase::Aborted);
    let mut d2 = Driver::new(spec(SHADOW));
    d2.idle();
    d2.tick(window(30, 2));
    let p = d2.tick(window(31, 37));
    let aborted = p
        .events
        .iter()
        .find(|e| e.kind == EventKind::Aborted)
        .unwrap();
    assert_eq!(aborted.data["comparisons"], 100);
    assert_eq!(aborted.data["disagree"], 39);
    assert_eq!(aborted.data["min_comparisons"], 100);
    let examples = aborted.data["examples"].as_array().unwrap();
    assert_eq!(examples.len(), SHADOW_EXAMPLES);
    assert!(examples.len() as u64 <= aborted.data["disagree"].as_u64().unwrap());
}

#[test]
fn shadow_then_manual_waits_and_shadow_then_canary_hands_over() {
    let mut d = Driver::new(spec(&SHADOW.replace("then: promote", "then: manual")));
    d.idle();
    d.tick(window(100, 0));
    assert_eq!(
        (d.state.phase, d.state.waiting_for),
        (Phase::Paused, Some(Waiting::Promote))
    );
    d.tick(Observations {
        command: Some((Command::Promote { full: false }, "ann".into())),
        ..Default::default()
    });
    assert_eq!(d.state.phase, Phase::Succeeded);

    let mut d = Driver::new(spec(&SHADOW.replace(
        "then: promote",
        "then: canary, canary: { steps: [ { weight: 10 }, { pause: 1m }, { weight: 100 } ] }",
    )));
    d.idle();
    d.tick(window(100, 0));
    assert!(
        d.state.route.shadow.is_none(),
        "mirroring ends when real users start"
    );
    assert_eq!(d.weight(), Some(10.0));
    assert_eq!(steps(&d.spec, &d.state)[d.state.step], "pause 1m");
    d.now = 60_000;
    d.idle();
    assert_eq!(d.state.phase, Phase::Succeeded);
    assert!(
        d.events
            .iter()
            .any(|e| e.contains("continuing as a canary")),
        "{:#?}",
        d.events
    );
}

const BLUE_GREEN: &str = "strategy: { blue_green: { qa: { dataset: holdout.jsonl, output: probabilities, min_accuracy: 0.9 }, auto_promote_after: 30s, scale_down_delay: 5m, post_promotion: 20s } }\nanalysis: { interval: 10s, failure_limit: 1 }\n";

fn qa(passed: bool) -> Observations {
    Observations {
        qa: Some(crate::analysis::qa::QaResult {
            rows: 171,
            failures: 0,
            accuracy: Some(if passed { 0.959 } else { 0.567 }),
            mean_abs_error: None,
            passed,
            reason: format!(
                "QA accuracy {} 0.9 on 171 rows (0 failed)",
                if passed { "0.9590 >=" } else { "0.5670 <" }
            ),
        }),
        ..Default::default()
    }
}

#[test]
fn blue_green_stages_checks_qa_promotes_and_keeps_blue_warm() {
    let mut d = Driver::new(spec(BLUE_GREEN));
    d.idle();
    assert_eq!(d.state.route.staging.as_deref(), Some("2"));
    assert_eq!(d.state.route.stable, "1");
    assert_eq!(d.state.step, 1, "waiting for the QA gate");
    d.tick(qa(true));
    assert_eq!(d.state.step, 2);
    d.now = 29_000;
    d.idle();
    assert_eq!(d.state.route.stable, "1");
    d.now = 30_000;
    d.idle();
    assert_eq!(d.state.route.stable, "2", "auto-promoted");
    assert_eq!(d.state.route.warm[0].version, "1");
    assert_eq!(d.state.route.warm[0].until_ms, 30_000 + 300_000);
    assert_eq!(d.state.phase, Phase::Progressing, "post-promotion window");
    d.now = 50_000;
    d.idle();
    assert_eq!(
        d.state.phase,
        Phase::Progressing,
        "no window passed after the switch yet"
    );
    d.tick(Observations {
        verdict: Some(verdict(Outcome::Pass)),
        ..Default::default()
    });
    assert_eq!(d.state.phase, Phase::Succeeded);
}

/// After the switch blue takes no traffic: the pass that switches asks for
/// a baseline of blue's figures, and later windows compare with it.
#[test]
fn a_blue_green_switch_takes_a_baseline_that_stands_for_stable_afterwards() {
    let mut d = Driver::new(spec(BLUE_GREEN));
    d.idle();
    d.tick(qa(true));
    assert!(!switched_away(&d.state));
    d.now = 30_000;
    let mut p = plan(&d.spec, &d.state, &Observations::default(), d.now);
    while !p.publish {
        p = plan(&d.spec, &p.state, &Observations::default(), d.now);
    }
    assert_eq!(p.state.route.stable, "2", "the switch");
    assert!(takes_baseline(&d.state, &p.state));
    p.state.baseline = Some(Baseline::new("1", d.now, Default::default()));
    d.state = p.state;
    assert_eq!(
        baseline_in_use(&d.state).map(|b| b.version.as_str()),
        Some("1")
    );
    d.now = 35_000;
    let p = plan(&d.spec, &d.state, &Observations::default(), d.now);
    assert!(!takes_baseline(&d.state, &p.state), "taken once");
    // A canary's weights below 100 % leave stable with live figures.
    let mut c = Driver::new(spec(CANARY));
    c.idle();
    assert!(!switched_away(&c.state));
}

#[test]
fn blue_green_qa_failure_and_post_promotion_failure_go_back_to_blue() {
    let mut d = Driver::new(spec(BLUE_GREEN));
    d.idle();
    d.tick(qa(false));
    assert_eq!(d.state.phase, Phase::Aborted);
    assert_eq!(d.state.route, RoutePolicy::stable_only("1"));
    assert!(
        d.state.message.contains("QA accuracy 0.5670 < 0.9"),
        "{}",
        d.state.message
    );

    let mut d = Driver::new(spec(BLUE_GREEN));
    d.idle();
    d.tick(qa(true));
    d.tick(Observations {
        command: Some((Command::Promote { full: false }, "ann".into())),
        ..Default::default()
    });
    assert_eq!(d.state.route.stable, "2");
    d.tick(Observations {
        verdict: Some(verdict(Outcome::Fail)),
        ..Default::default()
    });
    assert_eq!(d.state.phase, Phase::Aborted);
    assert_eq!(
        d.state.route,
        RoutePolicy::stable_only("1"),
        "switched back to blue"
    );
}

const ROLLING: &str = "strategy: { rolling: { replicas: 4, batch_size: 1, batch_pause: 10s } }\n";

fn split_of(d: &Driver) -> (Option<u32>, Option<u32>, f64) {
    let r = &d.state.route;
    (
        r.replicas.get("1").copied(),
        r.replicas.get("2").copied(),
        r.candidate
            .as_ref()
            .map_or(if r.stable == "2" { 100.0 } else { 0.0 }, |c| c.weight),
    )
}

#[test]
fn rolling_replaces_one_replica_per_batch() {
    let mut d = Driver::new(spec(ROLLING));
    d.idle();
    assert_eq!(
        split_of(&d),
        (Some(3), Some(1), 25.0),
        "scaled up to 4, then batch 1"
    );
    for (t, want) in [
        (10_000, (Some(2), Some(2), 50.0)),
        (20_000, (Some(1), Some(3), 75.0)),
        (30_000, (None, Some(4), 100.0)),
    ] {
        d.now = t;
        d.idle();
        assert_eq!(split_of(&d), want, "at {t} ms");
    }
    d.now = 40_000;
    d.idle();
    assert_eq!(d.state.phase, Phase::Succeeded);
    assert_eq!(d.state.route.stable, "2");
}

#[test]
fn a_rolling_batch_that_fails_rolls_back_batch_by_batch() {
    let mut d = Driver::new(spec(
        &ROLLING.replace("batch_pause: 10s", "batch_pause: 10s, rollback: batch"),
    ));
    d.idle();
    d.now = 10_000;
    d.idle();
    assert_eq!(split_of(&d).1, Some(2));
    d.now = 20_000;
    // Batch 3's replicas cannot start: the pass that publishes it fails.
    let mut p = plan(&d.spec, &d.state, &Observations::default(), d.now);
    while !p.publish {
        p = plan(&d.spec, &p.state, &Observations::default(), d.now);
    }
    d.state = p.state;
    assert_eq!(split_of(&d).1, Some(3));
    d.tick(Observations {
        route_failed: Some("replica 3 would not warm up".into()),
        ..Default::default()
    });
    assert!(d.state.rolling.rolling_back.is_some());
    assert_eq!(
        split_of(&d).1,
        Some(2),
        "back to the last batch that was up"
    );
    d.now = 30_000;
    d.idle();
    assert_eq!(split_of(&d).1, Some(1));
    d.now = 40_000;
    d.idle();
    assert_eq!(d.state.phase, Phase::Aborted);
    assert_eq!(split_of(&d), (Some(4), None, 0.0));
    assert!(
        d.state.message.contains("replica 3 would not warm up"),
        "{}",
        d.state.message
    );
}

/// With analysis, rolling's last batch is done only after a passing window
/// (its windows compare with stable's baseline from before the batch).
#[test]
fn rolling_s_last_batch_waits_for_a_passing_window() {
    let mut d = Driver::new(spec(&format!(
        "{ROLLING}analysis: {{ interval: 10s, max_inconclusive: 2 }}\n"
    )));
    d.idle();
    for t in [10_000, 20_000, 30_000, 40_000] {
        d.now = t;
        d.idle();
    }
    assert_eq!(split_of(&d), (None, Some(4), 100.0));
    assert!(
        analysing(&d.spec, &d.state),
        "windows go on during the last batch"
    );
    assert_eq!(d.state.phase, Phase::Progressing, "no window passed");
    assert!(
        d.state
            .message
            .contains("waiting for a passing analysis window"),
        "{}",
        d.state.message
    );
    d.tick(Observations {
        verdict: Some(verdict(Outcome::Pass)),
        ..Default::default()
    });
    assert_eq!(d.state.phase, Phase::Succeeded);
}

const ACROSS: &str =
    "strategy: { rolling: { scope: instances, batch_size: 1, batch_pause: 10s } }\n";

/// A rolling update across the instances `ids` (as the controller fixes
/// them when the rollout starts).
fn across(yaml: &str, ids: &[&str]) -> Driver {
    let mut d = Driver::new(spec(yaml));
    d.state.rolling.instances = ids
        .iter()
        .map(|id| rolling::RollingInstance {
            id: id.to_string(),
            url: format!("http://{id}:8080"),
        })
        .collect();
    d
}

/// Which version each instance answers with now, resolved as each of
/// them resolves its own route.
fn answers(d: &Driver, ids: &[&str]) -> Vec<String> {
    ids.iter()
        .map(|id| {
            let mine = d.state.route.for_instance(Some(id));
            match &mine.candidate {
                Some(c) if c.weight >= 100.0 => c.version.clone(),
                Some(c) => panic!("{id} splits inside itself: {c:?}"),
                None => mine.stable.clone(),
            }
        })
        .collect()
}

#[test]
fn rolling_across_instances_moves_one_instance_per_batch() {
    let ids = ["a", "b", "c"];
    let mut d = across(ACROSS, &ids);
    assert_eq!(
        steps(&d.spec, &d.state),
        [
            "fix 3 instances",
            "batch 1: 1/3 instances",
            "batch 2: 2/3 instances",
            "batch 3: 3/3 instances",
            "done"
        ]
    );
    d.idle();
    assert!(
        d.events[0].contains("3 instances take part, 1 at a time, in this order: a (http://a:8080), b (http://b:8080), c (http://c:8080)"),
        "{:?}",
        d.events
    );
    assert_eq!(answers(&d, &ids), ["2", "1", "1"]);
    assert_eq!(d.weight(), Some(33.33), "the instances' share, as shown");
    assert!(d.state.route.replicas.is_empty(), "no pool split");
    d.now = 9_000;
    d.idle();
    assert_eq!(
        d.state.message,
        "step 2/5: batch 1 (1/3 instances) settling, 1s left"
    );
    for (t, want, weight) in [
        (10_000, ["2", "2", "1"], Some(66.67)),
        (20_000, ["2", "2", "2"], None),
    ] {
        d.now = t;
        d.idle();
        assert_eq!(answers(&d, &ids), want, "at {t} ms");
        assert_eq!(d.weight(), weight, "at {t} ms");
    }
    assert_eq!(
        d.state.route,
        RoutePolicy::stable_only("2"),
        "the last batch: everywhere"
    );
    assert!(
        answers(&d, &["joined-later"]) == ["2"],
        "an instance that joined serves the candidate only once it is everywhere"
    );
    d.now = 30_000;
    d.idle();
    assert_eq!(d.state.phase, Phase::Succeeded);
    assert!(
        d.events.iter().any(|e| e.contains("batch 2: 2 of 3 instances run version 2 (about 67% of traffic, the load balancer's spread; now on it: b (http://b:8080))")),
        "{:?}",
        d.events
    );
}

#[test]
fn an_instance_that_joins_mid_rollout_keeps_the_stable_version() {
    let mut d = across(ACROSS, &["a", "b", "c"]);
    d.idle();
    d.now = 10_000;
    d.idle();
    assert_eq!(answers(&d, &["a", "b", "c", "new"]), ["2", "2", "1", "1"]);
    assert_eq!(
        d.state.route.for_instance(Some("new")).versions().len(),
        1,
        "it does not even load the candidate"
    );
}

#[test]
fn a_failed_window_takes_the_instances_back_batch_by_batch() {
    let ids = ["a", "b", "c"];
    let mut d = across(&format!("{ACROSS}analysis: {{ interval: 10s }}\n"), &ids);
    d.idle();
    d.now = 10_000;
    d.idle();
    assert_eq!(answers(&d, &ids), ["2", "2", "1"]);
    d.now = 12_000;
    d.tick(Observations {
        verdict: Some(verdict(Outcome::Fail)),
        ..Default::default()
    });
    assert_eq!(answers(&d, &ids), ["2", "2", "1"], "one batch per pause");
    d.now = 22_000;
    d.idle();
    assert_eq!(answers(&d, &ids), ["2", "1", "1"]);
    assert!(
        d.state
            .message
            .contains("rolling back: 1 of 3 instances left on version 2"),
        "{}",
        d.state.message
    );
    d.now = 32_000;
    d.idle();
    assert_eq!(d.state.phase, Phase::Aborted);
    assert_eq!(answers(&d, &ids), ["1", "1", "1"]);
    assert_eq!(
        d.state.route,
        RoutePolicy::stable_only("1"),
        "the route from before"
    );
    assert!(
        d.state.message.starts_with("aborted: analysis failed: candidate error_rate 0.0410 > 0.0100; all 3 instances back on version 1"),
        "{}",
        d.state.message
    );

    // `rollback: all` takes every instance back at once.
    let mut d = across(
        &format!(
            "{}analysis: {{ interval: 10s }}\n",
            ACROSS.replace("batch_pause: 10s", "batch_pause: 10s, rollback: all")
        ),
        &ids,
    );
    d.idle();
    d.now = 10_000;
    d.idle();
    d.tick(Observations {
        verdict: Some(verdict(Outcome::Fail)),
        ..Default::default()
    });
    assert_eq!(d.state.phase, Phase::Aborted);
    assert_eq!(answers(&d, &ids), ["1", "1", "1"]);
}

#[test]
fn a_batch_of_instances_that_cannot_start_goes_back_to_the_last_batch_up() {
    let ids = ["a", "b", "c", "d"];
    let mut d = across(&ACROSS.replace("batch_size: 1", "batch_size: 2"), &ids);
    d.idle();
    assert_eq!(answers(&d, &ids), ["2", "2", "1", "1"]);
    assert_eq!(
        steps(&d.spec, &d.state)[1..3],
        ["batch 1: 2/4 instances", "batch 2: 4/4 instances"]
    );
    d.now = 10_000;
    d.idle();
    assert_eq!(answers(&d, &ids), ["2", "2", "2", "2"]);
    let failed = d.tick(Observations {
        route_failed: Some("instance c (http://c:8080) could not load version cancer/2: no".into()),
        ..Default::default()
    });
    assert_eq!(answers(&d, &ids), ["2", "2", "1", "1"], "batch 1 was up");
    assert!(
        failed.publish,
        "batch 1's route is published again: a and b served batch 2's"
    );
    d.now = 20_000;
    d.idle();
    assert_eq!(d.state.phase, Phase::Aborted);
    assert_eq!(answers(&d, &ids), ["1", "1", "1", "1"]);
}

/// A batch of the way back that cannot be served (an instance cannot load
/// what it needs for it) does not hold the rollback up: every instance goes
/// back to the stable version at once.
#[test]
fn a_batch_that_fails_on_the_way_back_ends_the_rollback_at_once() {
    let ids = ["a", "b", "c"];
    let mut d = across(&format!("{ACROSS}analysis: {{ interval: 10s }}\n"), &ids);
    d.idle();
    d.now = 10_000;
    d.idle();
    d.tick(Observations {
        verdict: Some(verdict(Outcome::Fail)),
        ..Default::default()
    });
    d.now = 20_000;
    d.idle();
    assert_eq!(answers(&d, &ids), ["2", "1", "1"], "one batch back");
    d.tick(Observations {
        route_failed: Some("instance a (http://a:8080) could not load version cancer/1: no".into()),
        ..Default::default()
    });
    assert_eq!(d.state.phase, Phase::Aborted);
    assert_eq!(d.state.route, RoutePolicy::stable_only("1"));
    assert!(
        d.state
            .message
            .contains("then a batch on the way back could not start: instance a"),
        "{}",
        d.state.message
    );
}

/// The instances are fixed in the stored state: a restart (or another
/// instance driving the rollouts) reads them back and takes the same
/// batches; a state without them still reads (per-replica updates).
#[test]
fn the_instances_of_a_rolling_update_are_stored_with_it() {
    let mut d = across(ACROSS, &["a", "b", "c"]);
    d.idle();
    let stored = serde_json::to_value(&d.state).unwrap();
    assert_eq!(stored["rolling_instances"][1]["id"], "b");
    assert_eq!(
        stored["route"]["candidate_instances"],
        serde_json::json!(["a"])
    );
    let mut resumed = across(ACROSS, &[]);
    resumed.state = serde_json::from_value(stored).unwrap();
    resumed.now = 10_000;
    resumed.idle();
    assert_eq!(answers(&resumed, &["a", "b", "c"]), ["2", "2", "1"]);
    let per_replica = serde_json::to_value(Driver::new(spec(ROLLING)).state).unwrap();
    assert!(per_replica.get("rolling_instances").is_none());
}

#[test]
fn rolling_across_no_instance_fails_and_stable_keeps_serving() {
    let mut d = across(ACROSS, &[]);
    d.idle();
    assert_eq!(d.state.phase, Phase::Failed);
    assert_eq!(d.state.route, RoutePolicy::stable_only("1"));
    assert!(
        d.state.message.contains("no live instance"),
        "{}",
        d.state.message
    );
}

/// A rollout's state as the store holds it, written by the build before
/// each strategy owned its state: the per-strategy fields (`shadow`, `qa`,
/// `rolling_back`) stay top-level, read back, and are written back under
/// the same names; a row from before they existed still reads.
#[test]
fn stored_state_json_of_the_previous_build_still_reads() {
    let stored = r#"{"phase":"paused","waiting_for":"resume","step":1,"step_started_ms":1000,
        "before":{"stable":"1"},"route":{"stable":"1","staging":"2"},
        "analysis":{"consecutive_failures":1,"consecutive_inconclusive":0,"gate_passes":2,
            "last":{"outcome":"fail","candidate_requests":412,"stable_requests":4000,"checks":[],"reason":"bad"},
            "last_at_ms":900},
        "message":"paused by ops",
        "shadow":{"agree":40,"disagree":2,"errors":1,"dropped":0,
            "examples":[{"id":"r-9","primary":[1],"shadow":[0]}]},
        "qa":{"rows":10,"failures":0,"accuracy":0.9,"mean_abs_error":null,"passed":true,"reason":"accuracy 0.9000 >= 0.8"},
        "rolling_back":"analysis failed: bad",
        "paused_at_ms":1500,"rollback":{"undoes":"r-3"},"baseline":null}"#;
    let state: RolloutState = serde_json::from_str(stored).unwrap();
    assert_eq!((state.phase, state.step), (Phase::Paused, 1));
    assert_eq!(state.waiting_for, Some(Waiting::Resume));
    assert_eq!(state.route.staging.as_deref(), Some("2"));
    assert_eq!(state.shadow.compared.agree, 40);
    assert_eq!(state.shadow.compared.examples[0].id, "r-9");
    assert_eq!(state.blue_green.qa.as_ref().unwrap().accuracy, Some(0.9));
    assert_eq!(
        state.rolling.rolling_back.as_deref(),
        Some("analysis failed: bad")
    );
    assert_eq!(state.paused_at_ms, Some(1500));
    let written = serde_json::to_value(&state).unwrap();
    let original: serde_json::Value = serde_json::from_str(stored).unwrap();
    for field in [
        "shadow",
        "qa",
        "rolling_back",
        "analysis",
        "paused_at_ms",
        "rollback",
    ] {
        assert_eq!(written[field], original[field], "{field}");
    }
    assert_eq!(
        serde_json::from_value::<RolloutState>(written).unwrap(),
        state
    );

    let older = r#"{"phase":"progressing","waiting_for":null,"step":0,"step_started_ms":0,
        "before":{"stable":"1"},"route":{"stable":"1"},
        "analysis":{"consecutive_failures":0,"consecutive_inconclusive":0,"gate_passes":0,"last":null,"last_at_ms":0},
        "message":"starting"}"#;
    let state: RolloutState = serde_json::from_str(older).unwrap();
    assert_eq!(state, initial_state(&RoutePolicy::stable_only("1"), 0));
}

#[test]
fn only_a_countdown_is_not_worth_storing() {
    let mut d = Driver::new(spec(CANARY));
    d.idle();
    d.now = 1_000;
    let before = d.state.clone();
    let p = plan(&d.spec, &before, &Observations::default(), 5_000);
    assert_ne!(p.state.message, before.message, "the countdown moved");
    assert!(p.only_countdown(&before));
    let p = plan(&d.spec, &before, &Observations::default(), 30_000);
    assert!(!p.only_countdown(&before), "the pause is over: a new step");
    assert!(Observations::default().is_empty());
    assert!(
        !Observations {
            verdict: Some(verdict(Outcome::Pass)),
            ..Default::default()
        }
        .is_empty()
    );
}

#[test]
fn the_controller_asks_the_strategy_what_to_measure() {
    let mut d = Driver::new(spec(BLUE_GREEN));
    assert!(
        qa_due(&d.spec, &d.state).is_none(),
        "green is not staged yet"
    );
    d.idle();
    assert_eq!(
        qa_due(&d.spec, &d.state).map(|q| q.dataset.as_str()),
        Some("holdout.jsonl")
    );
    d.tick(Observations {
        qa: Some(crate::analysis::qa::QaResult {
            rows: 1,
            failures: 0,
            accuracy: Some(1.0),
            mean_abs_error: None,
            passed: true,
            reason: "fine".into(),
        }),
        ..Default::default()
    });
    assert!(qa_due(&d.spec, &d.state).is_none(), "the gate ran");

    let mut d = Driver::new(spec(SHADOW));
    assert!(counts_comparisons(&d.spec, &d.state).is_none());
    d.idle();
    assert!(counts_comparisons(&d.spec, &d.state).is_some(), "mirroring");
}
