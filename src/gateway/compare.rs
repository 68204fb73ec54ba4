//! Comparing a shadow's answer with the primary's, and the predicted class
//! of an output (DESIGN.md §5): the output's value when it has one element
//! per row (a `label` output), else the arg-max of the row's elements (a
//! `probabilities` output).

use super::policy::{Compare, CompareMode};
use crate::protocol::Tensor;

/// The predicted class of each row of an output.
pub fn predicted_classes(t: &Tensor) -> Vec<i64> {
    let values = t.data.to_f64();
    let rows = t.shape.first().copied().unwrap_or(1).max(1) as usize;
    if values.is_empty() {
        return Vec::new();
    }
    let per_row = values.len() / rows.max(1);
    if per_row <= 1 {
        return values.iter().map(|v| *v as i64).collect();
    }
    values
        .chunks(per_row)
        .map(|row| {
            row.iter()
                .enumerate()
                .fold((0usize, f64::NEG_INFINITY), |best, (i, v)| {
                    if *v > best.1 { (i, *v) } else { best }
                })
                .0 as i64
        })
        .collect()
}

/// The predicted class of an answer's first row: from the `label` output
/// when there is one, else from the first output.
pub fn answer_class(outputs: &[Tensor]) -> Option<i64> {
    outputs
        .iter()
        .find(|t| t.name == "label")
        .or(outputs.first())
        .and_then(|t| predicted_classes(t).first().copied())
}

/// Whether the shadow's outputs agree with the primary's on the compared
/// output. `None` when the output is missing from either side.
pub fn agree(primary: &[Tensor], shadow: &[Tensor], compare: &Compare) -> Option<bool> {
    let find = |ts: &[Tensor]| ts.iter().find(|t| t.name == compare.output).cloned();
    let (p, s) = (find(primary)?, find(shadow)?);
    if p.shape != s.shape {
        return Some(false);
    }
    Some(match compare.mode {
        CompareMode::Class => predicted_classes(&p) == predicted_classes(&s),
        CompareMode::Abs => {
            let (a, b) = (p.data.to_f64(), s.data.to_f64());
            a.len() == b.len()
                && a.iter()
                    .zip(&b)
                    .all(|(x, y)| (x - y).abs() <= compare.tolerance)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::TensorData;

    fn probs(v: Vec<f32>) -> Tensor {
        Tensor {
            name: "probabilities".into(),
            shape: vec![(v.len() / 2) as i64, 2],
            data: TensorData::Fp32(v),
        }
    }

    fn class_mode() -> Compare {
        Compare {
            output: "probabilities".into(),
            mode: CompareMode::Class,
            tolerance: 0.0,
        }
    }

    #[test]
    fn classes_from_labels_and_from_probabilities() {
        let labels = Tensor {
            name: "label".into(),
            shape: vec![3],
            data: TensorData::Int64(vec![1, 0, 1]),
        };
        assert_eq!(predicted_classes(&labels), vec![1, 0, 1]);
        assert_eq!(
            predicted_classes(&probs(vec![0.9, 0.1, 0.2, 0.8])),
            vec![0, 1]
        );
    }

    #[test]
    fn class_mode_ignores_small_differences_abs_mode_does_not() {
        let a = [probs(vec![0.9, 0.1, 0.2, 0.8])];
        let b = [probs(vec![0.8, 0.2, 0.3, 0.7])];
        let c = [probs(vec![0.4, 0.6, 0.2, 0.8])];
        assert_eq!(agree(&a, &b, &class_mode()), Some(true));
        assert_eq!(agree(&a, &c, &class_mode()), Some(false));
        let abs = Compare {
            mode: CompareMode::Abs,
            tolerance: 0.05,
            ..class_mode()
        };
        assert_eq!(agree(&a, &b, &abs), Some(false));
        let abs = Compare {
            tolerance: 0.11,
            ..abs
        };
        assert_eq!(agree(&a, &b, &abs), Some(true));
        let other = Compare {
            output: "scores".into(),
            ..class_mode()
        };
        assert_eq!(agree(&a, &b, &other), None);
    }
}
