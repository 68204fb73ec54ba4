//! The A/B report of a rollout's two arms (DESIGN.md §3): per version,
//! requests, error rate, latency percentiles, accuracy where labels exist and
//! the predicted-class distribution, with confidence intervals, and the
//! significance of each difference.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::stats;
use crate::metrics::Summary;

/// A rate with its Wilson score interval.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Rate {
    pub value: f64,
    pub low: f64,
    pub high: f64,
    pub count: u64,
    pub of: u64,
}

fn z_for(confidence: f64) -> f64 {
    // Two-sided z by bisection on the normal CDF.
    let target = 1.0 - (1.0 - confidence) / 2.0;
    let (mut lo, mut hi) = (0.0, 10.0);
    for _ in 0..60 {
        let mid = (lo + hi) / 2.0;
        if stats::normal_cdf(mid) < target {
            lo = mid
        } else {
            hi = mid
        }
    }
    (lo + hi) / 2.0
}

fn wilson(count: u64, of: u64, z: f64) -> Option<Rate> {
    if of == 0 {
        return None;
    }
    let n = of as f64;
    let p = count as f64 / n;
    let denom = 1.0 + z * z / n;
    let centre = (p + z * z / (2.0 * n)) / denom;
    let half = z * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt() / denom;
    Some(Rate {
        value: p,
        low: (centre - half).max(0.0),
        high: (centre + half).min(1.0),
        count,
        of,
    })
}

/// One arm of the comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Arm {
    pub version: String,
    pub requests: u64,
    pub error_rate: Option<Rate>,
    pub latency_p50_ms: Option<f64>,
    pub latency_p95_ms: Option<f64>,
    pub latency_p99_ms: Option<f64>,
    pub accuracy: Option<Rate>,
    #[schema(value_type = Object)]
    pub classes: BTreeMap<i64, u64>,
}

/// A difference between the arms and how likely it is to be chance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Difference {
    pub metric: String,
    /// Candidate minus stable (for latency: the p50 difference in ms).
    pub difference: Option<f64>,
    /// Two-sided p-value of a test of that same quantity: two proportions
    /// for rates, Mood's median test for the p50.
    pub p_value: Option<f64>,
    /// The p-value is below 1 − confidence and the difference is not zero: a
    /// tie (the same value, or for latency the same 2 % sketch bucket) is
    /// never significant.
    pub significant: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Report {
    pub confidence: f64,
    /// Seconds of traffic the report covers.
    pub seconds: u64,
    pub stable: Arm,
    pub candidate: Arm,
    pub differences: Vec<Difference>,
    /// Population stability index between the arms' predicted classes.
    pub prediction_shift: Option<f64>,
    /// With several instances: whether the window holds every instance's
    /// buckets (absent on a single node).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<crate::metrics::cluster::Completeness>,
}

fn arm(version: &str, s: &Summary, z: f64) -> Arm {
    Arm {
        version: version.to_string(),
        requests: s.requests,
        error_rate: wilson(s.errors, s.requests, z),
        latency_p50_ms: s.latency_p50_ms,
        latency_p95_ms: s.latency_p95_ms,
        latency_p99_ms: s.latency_p99_ms,
        accuracy: wilson(s.correct, s.labelled, z),
        classes: s.classes.clone(),
    }
}

/// Compares the candidate arm with the stable arm.
pub fn compare(
    stable_version: &str,
    stable: &Summary,
    candidate_version: &str,
    candidate: &Summary,
    confidence: f64,
    seconds: u64,
) -> Report {
    let z = z_for(confidence);
    let alpha = 1.0 - confidence;
    let mut differences = Vec::new();
    let mut diff = |metric: &str, difference: Option<f64>, p: Option<f64>| {
        differences.push(Difference {
            metric: metric.into(),
            difference,
            p_value: p,
            significant: p.is_some_and(|p| p < alpha) && difference.is_some_and(|d| d != 0.0),
        });
    };
    diff(
        "error_rate",
        candidate
            .error_rate
            .zip(stable.error_rate)
            .map(|(c, s)| c - s),
        stats::proportions_differ(
            candidate.errors,
            candidate.requests,
            stable.errors,
            stable.requests,
        ),
    );
    let cand: Vec<(f64, u32)> = candidate.latency.buckets().collect();
    let stab: Vec<(f64, u32)> = stable.latency.buckets().collect();
    diff(
        "latency_p50_ms",
        candidate
            .latency_p50_ms
            .zip(stable.latency_p50_ms)
            .map(|(c, s)| c - s),
        stats::medians_differ(&cand, &stab),
    );
    diff(
        "accuracy",
        candidate.accuracy.zip(stable.accuracy).map(|(c, s)| c - s),
        stats::proportions_differ(
            candidate.correct,
            candidate.labelled,
            stable.correct,
            stable.labelled,
        ),
    );
    let a: Vec<(i64, u64)> = candidate.classes.iter().map(|(k, v)| (*k, *v)).collect();
    let b: Vec<(i64, u64)> = stable.classes.iter().map(|(k, v)| (*k, *v)).collect();
    Report {
        confidence,
        seconds,
        stable: arm(stable_version, stable, z),
        candidate: arm(candidate_version, candidate, z),
        differences,
        prediction_shift: stats::population_stability_index(&a, &b),
        cluster: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wilson_intervals_contain_the_rate() {
        let r = wilson(10, 100, z_for(0.95)).unwrap();
        assert!(
            (r.low - 0.0552).abs() < 0.001 && (r.high - 0.1744).abs() < 0.001,
            "{r:?}"
        );
        assert!((z_for(0.95) - 1.96).abs() < 0.001);
        assert_eq!(wilson(0, 0, 1.96), None);
    }

    fn latency(samples: &[(f64, u32)]) -> Summary {
        let mut sketch = crate::metrics::sketch::Sketch::default();
        for (ms, n) in samples {
            for _ in 0..*n {
                sketch.add(ms / 1000.0);
            }
        }
        Summary {
            requests: sketch.count(),
            latency_p50_ms: sketch.quantile(0.5).map(|s| s * 1000.0),
            latency: sketch,
            ..Summary::default()
        }
    }

    fn p50(r: &Report) -> &Difference {
        r.differences
            .iter()
            .find(|d| d.metric == "latency_p50_ms")
            .unwrap()
    }

    /// The same p50 with a heavier upper half: the printed difference is
    /// zero, so it is not called significant (it was, on a rank test of the
    /// whole distribution).
    #[test]
    fn a_zero_latency_difference_is_never_significant() {
        let stable = latency(&[(1.0, 600), (2.0, 400)]);
        let candidate = latency(&[(1.0, 510), (2.0, 490)]);
        let r = compare("1", &stable, "2", &candidate, 0.95, 60);
        let d = p50(&r);
        assert_eq!(d.difference, Some(0.0), "{d:?}");
        assert!(!d.significant, "{d:?}");
    }

    /// The p-value is of the p50 difference itself: a slower median is
    /// significant, a slower tail under the same median is not.
    #[test]
    fn the_latency_test_is_of_the_median() {
        let stable = latency(&[(1.0, 300), (2.0, 300), (4.0, 300)]);
        let slower = latency(&[(1.0, 100), (4.0, 400), (8.0, 400)]);
        let r = compare("1", &stable, "2", &slower, 0.95, 60);
        let d = p50(&r);
        assert!(d.difference.unwrap() > 1.0 && d.significant, "{d:?}");
        let tail = latency(&[(1.0, 300), (2.0, 300), (40.0, 300)]);
        let r = compare("1", &stable, "2", &tail, 0.95, 60);
        assert!(!p50(&r).significant, "{:?}", p50(&r));
    }

    #[test]
    fn a_real_difference_in_accuracy_is_significant() {
        let stable = Summary {
            requests: 1000,
            labelled: 1000,
            correct: 920,
            accuracy: Some(0.92),
            ..Summary::default()
        };
        let candidate = Summary {
            requests: 1000,
            labelled: 1000,
            correct: 960,
            accuracy: Some(0.96),
            ..Summary::default()
        };
        let r = compare("1", &stable, "2", &candidate, 0.95, 60);
        let acc = r
            .differences
            .iter()
            .find(|d| d.metric == "accuracy")
            .unwrap();
        assert!(acc.significant, "{acc:?}");
        assert!((acc.difference.unwrap() - 0.04).abs() < 1e-9);
    }
}
