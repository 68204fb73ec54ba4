//! The blue-green QA gate's arithmetic: parsing a labelled dataset (JSON Lines
//! of V2 request bodies plus `label`) and judging the answers green gave.
//! The controller runs the requests; this only counts.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::gateway::compare::predicted_classes;
use crate::protocol::Tensor;
use crate::spec::QaSpec;

/// One labelled request.
#[derive(Debug, Clone, PartialEq)]
pub struct QaRow {
    /// The V2 request body, without its label.
    pub request: Value,
    pub label: f64,
}

/// What the QA gate found; stored with the rollout and shown in its status.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct QaResult {
    pub rows: u64,
    /// Requests green failed to answer (counted as wrong).
    pub failures: u64,
    pub accuracy: Option<f64>,
    pub mean_abs_error: Option<f64>,
    pub passed: bool,
    pub reason: String,
}

/// Parses the dataset; the error names the line.
pub fn parse_dataset(text: &str) -> Result<Vec<QaRow>, String> {
    let mut rows = Vec::new();
    for (i, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let mut v: Value = serde_json::from_str(line)
            .map_err(|e| format!("QA dataset line {}: not JSON: {e}", i + 1))?;
        let label = v
            .as_object_mut()
            .and_then(|o| o.remove("label"))
            .and_then(|l| l.as_f64())
            .ok_or_else(|| {
                format!(
                    "QA dataset line {}: needs a numeric \"label\" (a class index or a value)",
                    i + 1
                )
            })?;
        rows.push(QaRow { request: v, label });
    }
    if rows.is_empty() {
        return Err("the QA dataset has no rows".into());
    }
    Ok(rows)
}

/// Judges green's answers (`None`: the request failed) against the labels.
pub fn judge(spec: &QaSpec, labels: &[f64], answers: &[Option<Vec<Tensor>>]) -> QaResult {
    let rows = labels.len() as u64;
    let failures = answers.iter().filter(|a| a.is_none()).count() as u64;
    let output = |a: &Option<Vec<Tensor>>| {
        a.as_ref()
            .and_then(|ts| ts.iter().find(|t| t.name == spec.output).cloned())
    };
    if let Some(min) = spec.min_accuracy {
        let correct = labels
            .iter()
            .zip(answers)
            .filter(|(label, a)| {
                output(a)
                    .and_then(|t| predicted_classes(&t).first().copied())
                    .is_some_and(|c| c as f64 == **label)
            })
            .count();
        let accuracy = correct as f64 / rows.max(1) as f64;
        let passed = accuracy >= min;
        QaResult {
            rows,
            failures,
            accuracy: Some(accuracy),
            mean_abs_error: None,
            passed,
            reason: format!(
                "QA accuracy {accuracy:.4} {} {min} on {rows} rows ({failures} failed)",
                if passed { ">=" } else { "<" }
            ),
        }
    } else {
        let max = spec.max_mean_abs_error.unwrap_or(0.0);
        let errors: Vec<f64> = labels
            .iter()
            .zip(answers)
            .map(|(label, a)| {
                output(a)
                    .and_then(|t| t.data.to_f64().first().copied())
                    .map_or(f64::INFINITY, |v| (v - label).abs())
            })
            .collect();
        let mae = errors.iter().sum::<f64>() / rows.max(1) as f64;
        let passed = mae <= max;
        QaResult {
            rows,
            failures,
            accuracy: None,
            mean_abs_error: Some(mae),
            passed,
            reason: format!(
                "QA mean absolute error {mae:.4} {} {max} on {rows} rows ({failures} failed)",
                if passed { "<=" } else { ">" }
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::TensorData;

    fn probs(p1: f32) -> Option<Vec<Tensor>> {
        Some(vec![Tensor {
            name: "probabilities".into(),
            shape: vec![1, 2],
            data: TensorData::Fp32(vec![1.0 - p1, p1]),
        }])
    }

    #[test]
    fn accuracy_gate_counts_failures_as_wrong() {
        let spec = QaSpec {
            dataset: "d".into(),
            content: None,
            output: "probabilities".into(),
            min_accuracy: Some(0.75),
            max_mean_abs_error: None,
        };
        let r = judge(
            &spec,
            &[1.0, 0.0, 1.0, 1.0],
            &[probs(0.9), probs(0.2), probs(0.7), None],
        );
        assert_eq!((r.rows, r.failures, r.accuracy), (4, 1, Some(0.75)));
        assert!(r.passed, "{}", r.reason);
        let r = judge(
            &spec,
            &[1.0, 0.0, 1.0, 1.0],
            &[probs(0.9), probs(0.8), probs(0.7), None],
        );
        assert!(!r.passed);
        assert_eq!(r.reason, "QA accuracy 0.5000 < 0.75 on 4 rows (1 failed)");
    }

    #[test]
    fn datasets_name_the_bad_line() {
        assert!(
            parse_dataset("{\"inputs\": [], \"label\": 1}\n\n{\"inputs\": []}\n")
                .unwrap_err()
                .contains("line 3")
        );
        assert_eq!(
            parse_dataset("{\"inputs\": [], \"label\": 1}\n").unwrap()[0].label,
            1.0
        );
        assert!(parse_dataset("").is_err());
    }
}
