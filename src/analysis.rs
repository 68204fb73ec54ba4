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

/// A figure as the verdicts print it: whole above 100, two places above
/// 1, four below (every view of a check uses this, so a value reads the
/// same in a reason and in a table).
pub fn figure(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.4}")
    }
}

/// A p-value as the verdicts print it: three places, and `<0.001` below
/// that (a rounded `0.000` would claim a certainty no test has).
pub fn p_value(p: f64) -> String {
    if p < 0.001 {
        "<0.001".into()
    } else {
        format!("{p:.3}")
    }
}

/// `p=0.044`, or `p<0.001`: a p-value as a reason says it.
pub fn p_is(p: f64) -> String {
    match p_value(p) {
        t if t.starts_with('<') => format!("p{t}"),
        t => format!("p={t}"),
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

/// One metric check being judged: its name and the two values, which every
/// result carries.
struct Judged {
    check: String,
    metric: &'static str,
    candidate: Option<f64>,
    stable: Option<f64>,
}

impl Judged {
    fn result(&self, outcome: Outcome, p_value: Option<f64>, reason: String) -> CheckResult {
        CheckResult {
            check: self.check.clone(),
            outcome,
            candidate: self.candidate,
            stable: self.stable,
            p_value,
            reason,
        }
    }

    /// Against an absolute bound: the observed value decides.
    fn absolute(&self, cv: f64, bound: f64, upper: bool) -> CheckResult {
        let (worse, word) = if upper {
            (cv > bound, ">")
        } else {
            (cv < bound, "<")
        };
        let metric = self.metric;
        if worse {
            self.result(
                Outcome::Fail,
                None,
                format!("candidate {metric} {} {word} {}", figure(cv), figure(bound)),
            )
        } else {
            self.result(
                Outcome::Pass,
                None,
                format!("candidate {metric} {} within {}", figure(cv), figure(bound)),
            )
        }
    }
}

/// A bound relative to stable's value: `k × stable + d`, an upper or a
/// lower one.
struct Relative {
    k: f64,
    d: f64,
    upper: bool,
    value: f64,
    /// How the bound reads, e.g. `1.5 x stable 12.000`.
    text: String,
}

impl Relative {
    /// The bound of a relative condition (None for an absolute one).
    fn of(condition: Condition, sv: f64) -> Option<Relative> {
        let (k, d, upper) = match condition {
            Condition::MaxVsStable(k) => (k, 0.0, true),
            Condition::MinVsStable(k) => (k, 0.0, false),
            Condition::MaxDeltaVsStable(d) => (1.0, d, true),
            Condition::MinDeltaVsStable(d) => (1.0, d, false),
            Condition::Max(_) | Condition::Min(_) => return None,
        };
        let text = match condition {
            Condition::MaxVsStable(k) | Condition::MinVsStable(k) => {
                format!("{k} x stable {}", figure(sv))
            }
            _ => format!("stable {} {}", figure(sv), crate::spec::signed(d)),
        };
        Some(Relative {
            k,
            d,
            upper,
            value: k * sv + d,
            text,
        })
    }

    fn beyond(&self, cv: f64) -> bool {
        if self.upper {
            cv > self.value
        } else {
            cv < self.value
        }
    }

    fn word(&self) -> &'static str {
        if self.upper { ">" } else { "<" }
    }
}

/// The p-value of the candidate being beyond the bound by chance: a
/// two-proportion test for rates, Mann-Whitney for latencies, None for a
/// metric without a test (the observed value decides).
fn significance(
    metric: Metric,
    candidate: &Summary,
    stable: &Summary,
    b: &Relative,
) -> Option<f64> {
    if let Some((x_c, n_c)) = counts(metric, candidate) {
        let (x_s, n_s) = counts(metric, stable).unwrap_or((0, 0));
        Some(if b.upper {
            stats::proportion_exceeds(x_c, n_c, x_s, n_s, b.k, b.d)
        } else {
            stats::proportion_falls_short(x_c, n_c, x_s, n_s, b.k, b.d)
        })
    } else if latency_quantile(metric).is_some() {
        let cand: Vec<(f64, u32)> = candidate.latency.buckets().collect();
        let stab: Vec<(f64, u32)> = stable.latency.buckets().collect();
        Some(if b.upper {
            stats::mann_whitney_greater(&cand, &stab)
        } else {
            stats::mann_whitney_greater(&stab, &cand)
        })
    } else {
        None
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
    let judged = Judged {
        check: format!("{} {}", metric.as_str(), condition.describe()),
        metric: metric.as_str(),
        candidate: metric_value(metric, candidate, Some(stable)),
        // Prediction shift is itself the comparison: stable has none.
        stable: (metric != Metric::PredictionShift)
            .then(|| metric_value(metric, stable, Some(stable)))
            .flatten(),
    };
    let name = metric.as_str();
    let Some(cv) = judged.candidate else {
        let reason = format!("no candidate {name} in this window");
        return judged.result(Outcome::Inconclusive, None, reason);
    };
    match condition {
        Condition::Max(b) => return judged.absolute(cv, b, true),
        Condition::Min(b) => return judged.absolute(cv, b, false),
        _ => {}
    }
    let Some(sv) = judged.stable else {
        let reason = format!("no stable {name} in this window to compare with");
        return judged.result(Outcome::Inconclusive, None, reason);
    };
    let b = Relative::of(condition, sv).expect("absolute conditions returned above");
    let (word, bound) = (b.word(), &b.text);
    if !b.beyond(cv) {
        let reason = format!("candidate {name} {} within {bound}", figure(cv));
        return judged.result(Outcome::Pass, None, reason);
    }
    // Beyond the bound: does the difference matter at all?
    let worse_by = if b.upper { cv - sv } else { sv - cv };
    if let Some(floor) = min_difference_ms.filter(|floor| worse_by < *floor) {
        let reason = format!(
            "candidate {name} {} {word} {bound}, but only {} ms {} (min_difference_ms {floor})",
            figure(cv),
            figure(worse_by.max(0.0)),
            if b.upper { "slower" } else { "faster" }
        );
        return judged.result(Outcome::Pass, None, reason);
    }
    // Is it significant?
    match significance(metric, candidate, stable, &b) {
        Some(p) if p >= alpha => judged.result(
            Outcome::Pass,
            Some(p),
            format!(
                "candidate {name} {} {word} {bound}, but not significantly ({})",
                figure(cv),
                p_is(p)
            ),
        ),
        p => judged.result(
            Outcome::Fail,
            p,
            format!(
                "candidate {name} {} {word} {bound}{}",
                figure(cv),
                p.map_or(String::new(), |p| format!(", {}", p_is(p)))
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
            format!("{name}: value {} > {}", figure(*v), figure(b)),
        ),
        (Some(External::Value(v)), Some(Condition::Min(b))) if *v < b => out(
            Outcome::Fail,
            Some(*v),
            format!("{name}: value {} < {}", figure(*v), figure(b)),
        ),
        (Some(External::Value(v)), _) => out(
            Outcome::Pass,
            Some(*v),
            format!("value {} within bound", figure(*v)),
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
            // The request counts are the verdict's own fields, which every
            // view shows beside this reason.
            match results.len() {
                1 => "its check passes".to_string(),
                n => format!("all {n} checks pass"),
            },
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
        // A p-value too small for three places reads as such, not `0.000`.
        assert!(
            r.reason.starts_with("candidate latency_p99_ms")
                && r.reason.ends_with("> 1.5 x stable 1.91, p<0.001"),
            "{}",
            r.reason
        );
        assert_eq!(p_value(0.0004), "<0.001");
        assert_eq!(p_value(0.0449), "0.045");
    }

    /// A bound of stable's value plus or minus a difference reads as the
    /// arithmetic it is, in the check's name and in its reason.
    #[test]
    fn a_delta_bound_reads_as_arithmetic() {
        let checks = [Check::Metric {
            metric: Metric::ErrorRate,
            condition: Condition::MaxDeltaVsStable(0.01),
            min_difference_ms: None,
        }];
        let v = evaluate(
            &checks,
            &summary(400, 40, 5.0),
            &summary(400, 4, 5.0),
            &[],
            SETTINGS,
        );
        assert_eq!(v.outcome, Outcome::Fail, "{v:?}");
        assert_eq!(v.checks[0].check, "error_rate max stable + 0.01");
        assert!(
            v.checks[0]
                .reason
                .starts_with("candidate error_rate 0.1000 > stable 0.0100 + 0.01, p"),
            "{}",
            v.checks[0].reason
        );
        assert_eq!(
            Condition::MinDeltaVsStable(-0.01).describe(),
            "min stable - 0.01"
        );
    }

    /// The tour's canary: 0.29 ms against 0.12 ms is 2.4 times stable and
    /// significant on thousands of samples, but a fraction of a millisecond
    /// nobody would roll back for.
    #[test]
    fn a_latency_difference_under_min_difference_ms_cannot_fail() {
        let spec = |extra: &str| {
            crate::spec::RolloutSpec::from_yaml(&format!(
                "model: m\nversion: \"2\"\nstrategy: {{ canary: {{ steps: [ {{ weight: 100 }} ] }} }}\nanalysis: {{ checks: [ {{ metric: latency_p99_ms, max_vs_stable: 1.5{extra} }} ] }}"
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
