//! Pure evaluation of a rollout's checks over one window of metrics: the
//! candidate's numbers against absolute bounds, and against the stable
//! version's numbers over the same window with a significance test, so a
//! rollout is neither rolled back on noise nor promoted on luck. No I/O:
//! external checks are fetched by the controller and passed in.
//!
//! A window with fewer than `min_requests` candidate requests is
//! inconclusive — never a pass, never a failure.

pub mod qa;
pub mod report;
pub mod stats;

use serde::{Deserialize, Serialize};

use crate::metrics::Summary;
use crate::spec::{Check, Condition, Metric};

/// How a window (or one check) came out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Pass,
    Fail,
    Inconclusive,
}

/// One check's result, with the numbers it used.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CheckResult {
    /// The check as written, e.g. `latency_p99_ms max 1.5 x stable`.
    pub check: String,
    pub outcome: Outcome,
    pub candidate: Option<f64>,
    pub stable: Option<f64>,
    /// The significance test's p-value, when one was used.
    pub p_value: Option<f64>,
    /// Why, in words.
    pub reason: String,
}

/// A window's verdict.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Verdict {
    pub outcome: Outcome,
    pub candidate_requests: u64,
    pub stable_requests: u64,
    pub checks: Vec<CheckResult>,
    /// The verdict in one line, naming the deciding checks.
    pub reason: String,
}

/// What an external check answered (fetched by the controller).
#[derive(Debug, Clone, PartialEq)]
pub enum External {
    /// A webhook's own verdict.
    Verdict(Outcome, String),
    /// A Prometheus query's value.
    Value(f64),
    /// The check could not be fetched (counts as inconclusive).
    Unavailable(String),
}

/// The settings that shape a verdict.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub min_requests: u64,
    pub confidence: f64,
}

fn fmt(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.4}")
    }
}

fn metric_value(m: Metric, s: &Summary, stable: Option<&Summary>) -> Option<f64> {
    match m {
        Metric::ErrorRate => s.error_rate,
        Metric::LatencyP50Ms => s.latency_p50_ms,
        Metric::LatencyP95Ms => s.latency_p95_ms,
        Metric::LatencyP99Ms => s.latency_p99_ms,
        Metric::Requests => Some(s.requests as f64),
        Metric::Agreement => s.agreement,
        Metric::Accuracy => s.accuracy,
        Metric::PredictionShift => {
            let stable = stable?;
            let a: Vec<(i64, u64)> = s.classes.iter().map(|(k, v)| (*k, *v)).collect();
            let b: Vec<(i64, u64)> = stable.classes.iter().map(|(k, v)| (*k, *v)).collect();
            stats::population_stability_index(&a, &b)
        }
    }
}

/// The (successes, trials) behind a rate metric, for the proportion test.
fn counts(m: Metric, s: &Summary) -> Option<(u64, u64)> {
    match m {
        Metric::ErrorRate => Some((s.errors, s.requests)),
        Metric::Accuracy => Some((s.correct, s.labelled)),
        Metric::Agreement => Some((s.agree, s.agree + s.disagree)),
        _ => None,
    }
}

fn latency_quantile(m: Metric) -> Option<f64> {
    match m {
        Metric::LatencyP50Ms => Some(0.5),
        Metric::LatencyP95Ms => Some(0.95),
        Metric::LatencyP99Ms => Some(0.99),
        _ => None,
    }
}

fn evaluate_metric(
    metric: Metric,
    condition: Condition,
    min_difference_ms: Option<f64>,
    candidate: &Summary,
    stable: &Summary,
    alpha: f64,
) -> CheckResult {
    let name = format!("{} {}", metric.as_str(), condition.describe());
    let c = metric_value(metric, candidate, Some(stable));
    let s = metric_value(metric, stable, Some(stable));
    let result = |outcome, p_value, reason: String| CheckResult {
        check: name.clone(),
        outcome,
        candidate: c,
        stable: s,
        p_value,
        reason,
    };
    let Some(cv) = c else {
        return result(
            Outcome::Inconclusive,
            None,
            format!("no candidate {} in this window", metric.as_str()),
        );
    };
    let absolute = |bound: f64, worse: bool, word: &str| {
        if worse {
            result(
                Outcome::Fail,
                None,
                format!(
                    "candidate {} {} {word} {}",
                    metric.as_str(),
                    fmt(cv),
                    fmt(bound)
                ),
            )
        } else {
            result(
                Outcome::Pass,
                None,
                format!(
                    "candidate {} {} within {}",
                    metric.as_str(),
                    fmt(cv),
                    fmt(bound)
                ),
            )
        }
    };
    match condition {
        Condition::Max(b) => return absolute(b, cv > b, ">"),
        Condition::Min(b) => return absolute(b, cv < b, "<"),
        _ => {}
    }
    let Some(sv) = s else {
        return result(
            Outcome::Inconclusive,
            None,
            format!(
                "no stable {} in this window to compare with",
                metric.as_str()
            ),
        );
    };
    // The bound as a value, and whether exceeding or falling short is worse.
    let (k, d, upper) = match condition {
        Condition::MaxVsStable(k) => (k, 0.0, true),
        Condition::MinVsStable(k) => (k, 0.0, false),
        Condition::MaxDeltaVsStable(d) => (1.0, d, true),
        Condition::MinDeltaVsStable(d) => (1.0, d, false),
        Condition::Max(_) | Condition::Min(_) => unreachable!("absolute conditions returned above"),
    };
    let bound = k * sv + d;
    let beyond = if upper { cv > bound } else { cv < bound };
    let bound_text = match condition {
        Condition::MaxVsStable(k) | Condition::MinVsStable(k) => {
            format!("{k} x stable {}", fmt(sv))
        }
        _ => format!("stable {} {d:+}", fmt(sv)),
    };
    let word = if upper { ">" } else { "<" };
    if !beyond {
        return result(
            Outcome::Pass,
            None,
            format!(
                "candidate {} {} within {bound_text}",
                metric.as_str(),
                fmt(cv)
            ),
        );
    }
    // Beyond the bound: does the difference matter at all?
    let worse_by = if upper { cv - sv } else { sv - cv };
    if let Some(floor) = min_difference_ms.filter(|floor| worse_by < *floor) {
        return result(
            Outcome::Pass,
            None,
            format!(
                "candidate {} {} {word} {bound_text}, but only {} ms {} (min_difference_ms {floor})",
                metric.as_str(),
                fmt(cv),
                fmt(worse_by.max(0.0)),
                if upper { "slower" } else { "faster" }
            ),
        );
    }
    // Is it significant?
    let p = if let Some((x_c, n_c)) = counts(metric, candidate) {
        let (x_s, n_s) = counts(metric, stable).unwrap_or((0, 0));
        Some(if upper {
            stats::proportion_exceeds(x_c, n_c, x_s, n_s, k, d)
        } else {
            stats::proportion_falls_short(x_c, n_c, x_s, n_s, k, d)
        })
    } else if latency_quantile(metric).is_some() {
        let cand: Vec<(f64, u32)> = candidate.latency.buckets().collect();
        let stab: Vec<(f64, u32)> = stable.latency.buckets().collect();
        Some(if upper {
            stats::mann_whitney_greater(&cand, &stab)
        } else {
            stats::mann_whitney_greater(&stab, &cand)
        })
    } else {
        None // no test for this metric: the observed value decides
    };
    match p {
        Some(p) if p >= alpha => result(
            Outcome::Pass,
            Some(p),
            format!(
                "candidate {} {} {word} {bound_text}, but not significantly (p={p:.3})",
                metric.as_str(),
                fmt(cv)
            ),
        ),
        _ => result(
            Outcome::Fail,
            p,
            format!(
                "candidate {} {} {word} {bound_text}{}",
                metric.as_str(),
                fmt(cv),
                p.map_or(String::new(), |p| format!(", p={p:.3}"))
            ),
        ),
    }
}

fn evaluate_external(check: &Check, result: Option<&External>) -> CheckResult {
    let (name, condition) = match check {
        Check::Prometheus {
            query,
            condition,
            address,
        } => (
            format!("prometheus {query:?} at {address} {}", condition.describe()),
            Some(*condition),
        ),
        Check::Webhook { url } => (format!("webhook {url}"), None),
        Check::Metric { .. } => unreachable!("metric checks are evaluated separately"),
    };
    let out = |outcome, candidate, reason: String| CheckResult {
        check: name.clone(),
        outcome,
        candidate,
        stable: None,
        p_value: None,
        reason,
    };
    match (result, condition) {
        (Some(External::Verdict(o, why)), _) => out(*o, None, why.clone()),
        (Some(External::Value(v)), Some(Condition::Max(b))) if *v > b => out(
            Outcome::Fail,
            Some(*v),
            format!("{name}: value {} > {}", fmt(*v), fmt(b)),
        ),
        (Some(External::Value(v)), Some(Condition::Min(b))) if *v < b => out(
            Outcome::Fail,
            Some(*v),
            format!("{name}: value {} < {}", fmt(*v), fmt(b)),
        ),
        (Some(External::Value(v)), _) => out(
            Outcome::Pass,
            Some(*v),
            format!("value {} within bound", fmt(*v)),
        ),
        (Some(External::Unavailable(why)), _) => out(Outcome::Inconclusive, None, why.clone()),
        (None, _) => out(Outcome::Inconclusive, None, "not fetched".into()),
    }
}

/// Evaluates every check over one window. `external` holds one answer per
/// external check, in the order the checks are listed.
pub fn evaluate(
    checks: &[Check],
    candidate: &Summary,
    stable: &Summary,
    external: &[External],
    settings: Settings,
) -> Verdict {
    let alpha = 1.0 - settings.confidence;
    let mut results = Vec::new();
    let mut ext = external.iter();
    for check in checks {
        results.push(match check {
            Check::Metric {
                metric,
                condition,
                min_difference_ms,
            } => evaluate_metric(
                *metric,
                *condition,
                *min_difference_ms,
                candidate,
                stable,
                alpha,
            ),
            other => evaluate_external(other, ext.next()),
        });
    }
    let too_few = candidate.requests < settings.min_requests;
    let failed: Vec<&CheckResult> = results
        .iter()
        .filter(|r| r.outcome == Outcome::Fail)
        .collect();
    let (outcome, reason) = if too_few {
        (
            Outcome::Inconclusive,
            format!(
                "inconclusive: {} candidate requests in the window, fewer than min_requests {}",
                candidate.requests, settings.min_requests
            ),
        )
    } else if !failed.is_empty() {
        (
            Outcome::Fail,
            failed
                .iter()
                .map(|r| r.reason.clone())
                .collect::<Vec<_>>()
                .join("; "),
        )
    } else if let Some(r) = results.iter().find(|r| r.outcome == Outcome::Inconclusive) {
        (Outcome::Inconclusive, format!("inconclusive: {}", r.reason))
    } else {
        (
            Outcome::Pass,
            format!(
                "all {} checks pass ({} candidate requests)",
                results.len(),
                candidate.requests
            ),
        )
    };
    Verdict {
        outcome,
        candidate_requests: candidate.requests,
        stable_requests: stable.requests,
        checks: results,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::sketch::Sketch;

    fn summary(requests: u64, errors: u64, latency_ms: f64) -> Summary {
        let mut latency = Sketch::default();
        for i in 0..requests {
            latency.add((latency_ms + (i % 10) as f64 * 0.1 * latency_ms) / 1000.0);
        }
        Summary {
            seconds: 10,
            requests,
            errors,
            error_rate: (requests > 0).then(|| errors as f64 / requests as f64),
            latency_p50_ms: latency.quantile(0.5).map(|s| s * 1000.0),
            latency_p95_ms: latency.quantile(0.95).map(|s| s * 1000.0),
            latency_p99_ms: latency.quantile(0.99).map(|s| s * 1000.0),
            latency,
            ..Summary::default()
        }
    }

    const SETTINGS: Settings = Settings {
        min_requests: 50,
        confidence: 0.95,
    };

    fn checks() -> Vec<Check> {
        vec![
            Check::Metric {
                metric: Metric::ErrorRate,
                condition: Condition::Max(0.01),
                min_difference_ms: None,
            },
            Check::Metric {
                metric: Metric::LatencyP99Ms,
                condition: Condition::MaxVsStable(1.5),
                min_difference_ms: Some(1.0),
            },
        ]
    }

    #[test]
    fn too_few_requests_is_inconclusive_even_when_every_request_failed() {
        let v = evaluate(
            &checks(),
            &summary(10, 10, 5.0),
            &summary(100, 0, 5.0),
            &[],
            SETTINGS,
        );
        assert_eq!(v.outcome, Outcome::Inconclusive);
        assert!(
            v.reason.contains("fewer than min_requests 50"),
            "{}",
            v.reason
        );
    }

    #[test]
    fn a_healthy_candidate_passes() {
        let v = evaluate(
            &checks(),
            &summary(400, 1, 5.0),
            &summary(4000, 5, 5.0),
            &[],
            SETTINGS,
        );
        assert_eq!(v.outcome, Outcome::Pass, "{v:?}");
    }

    #[test]
    fn an_erroring_candidate_fails_with_the_numbers() {
        let v = evaluate(
            &checks(),
            &summary(412, 17, 5.0),
            &summary(4000, 5, 5.0),
            &[],
            SETTINGS,
        );
        assert_eq!(v.outcome, Outcome::Fail);
        assert!(
            v.reason.contains("candidate error_rate 0.0413 > 0.0100"),
            "{}",
            v.reason
        );
    }

    #[test]
    fn a_slow_candidate_fails_the_ratio_with_significance() {
        let v = evaluate(
            &checks(),
            &summary(400, 0, 45.0),
            &summary(4000, 0, 1.0),
            &[],
            SETTINGS,
        );
        assert_eq!(v.outcome, Outcome::Fail);
        let r = &v.checks[1];
        assert_eq!(r.outcome, Outcome::Fail);
        assert!(r.p_value.unwrap() < 0.001);
        assert!(
            r.reason.starts_with("candidate latency_p99_ms"),
            "{}",
            r.reason
        );
    }

    /// The tour's canary: 0.29 ms against 0.12 ms is 2.4 times stable and
    /// significant on thousands of samples, but a fraction of a millisecond
    /// nobody would roll back for.
    #[test]
    fn a_latency_difference_under_min_difference_ms_cannot_fail() {
        let spec = |extra: &str| {
            crate::spec::RolloutSpec::from_yaml(&format!(
                "model: m\nversion: \"2\"\nstrategy: {{ basic: {{}} }}\nanalysis: {{ checks: [ {{ metric: latency_p99_ms, max_vs_stable: 1.5{extra} }} ] }}"
            ))
            .unwrap()
            .checks()
        };
        let (candidate, stable) = (summary(4000, 0, 0.25), summary(4000, 0, 0.1));
        let v = evaluate(&spec(""), &candidate, &stable, &[], SETTINGS);
        assert_eq!(v.outcome, Outcome::Pass, "{v:?}");
        assert!(
            v.checks[0]
                .reason
                .contains("ms slower (min_difference_ms 1)"),
            "{}",
            v.checks[0].reason
        );
        // Set to 0, the same numbers fail: the floor is what saved them.
        let v = evaluate(
            &spec(", min_difference_ms: 0"),
            &candidate,
            &stable,
            &[],
            SETTINGS,
        );
        assert_eq!(v.outcome, Outcome::Fail, "{v:?}");
        // A difference above the floor still fails with significance.
        let v = evaluate(
            &spec(", min_difference_ms: 5"),
            &summary(4000, 0, 45.0),
            &summary(4000, 0, 1.0),
            &[],
            SETTINGS,
        );
        assert_eq!(v.outcome, Outcome::Fail, "{v:?}");
    }

    #[test]
    fn a_small_excess_on_few_samples_is_not_significant() {
        // Error rate 3 of 60 vs 1 of 60, against max_vs_stable 1.0: beyond
        // the bound but noise.
        let checks = [Check::Metric {
            metric: Metric::ErrorRate,
            condition: Condition::MaxVsStable(1.0),
            min_difference_ms: None,
        }];
        let v = evaluate(
            &checks,
            &summary(60, 3, 5.0),
            &summary(60, 1, 5.0),
            &[],
            SETTINGS,
        );
        assert_eq!(v.outcome, Outcome::Pass, "{v:?}");
        assert!(v.checks[0].reason.contains("not significantly"));
    }

    #[test]
    fn external_checks_decide_too() {
        let checks = [
            Check::Prometheus {
                address: "http://p".into(),
                query: "q".into(),
                condition: Condition::Max(5.0),
            },
            Check::Webhook {
                url: "http://w".into(),
            },
        ];
        let c = summary(100, 0, 5.0);
        let v = evaluate(
            &checks,
            &c,
            &c,
            &[
                External::Value(7.0),
                External::Verdict(Outcome::Pass, "ok".into()),
            ],
            SETTINGS,
        );
        assert_eq!(v.outcome, Outcome::Fail);
        assert!(v.reason.contains("value 7.00 > 5.00"));
        assert!(
            v.reason.contains(r#"prometheus "q" at http://p"#),
            "the failing check is named: {}",
            v.reason
        );
        let v = evaluate(
            &checks,
            &c,
            &c,
            &[
                External::Value(1.0),
                External::Unavailable("timeout".into()),
            ],
            SETTINGS,
        );
        assert_eq!(v.outcome, Outcome::Inconclusive);
    }
}
