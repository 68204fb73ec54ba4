//! A model's contract with its clients: input and output names, datatypes and
//! shapes (`-1` for a dimension of any size, such as the batch).

use serde::{Deserialize, Serialize};

use super::tensor::element_count;
use super::{DataType, Tensor, TensorData};

/// One input or output of a model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TensorSpec {
    pub name: String,
    #[schema(value_type = String, example = "FP32")]
    pub datatype: DataType,
    /// `-1` marks a dimension of any size.
    pub shape: Vec<i64>,
}

/// Inputs and outputs of a model version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Signature {
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
}

fn names(specs: &[TensorSpec]) -> String {
    specs
        .iter()
        .map(|s| s.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

impl Signature {
    /// The outputs this signature has, when `name` is not one of them (a
    /// signature that lists no outputs knows none: nothing to say).
    pub fn lacks_output(&self, name: &str) -> Option<String> {
        let has = self.outputs.is_empty() || self.outputs.iter().any(|o| o.name == name);
        (!has).then(|| names(&self.outputs))
    }

    /// Checks a request's inputs against the signature; the error says what
    /// the model expects.
    pub fn check_inputs(&self, inputs: &[Tensor]) -> Result<(), String> {
        for t in inputs {
            let Some(spec) = self.inputs.iter().find(|s| s.name == t.name) else {
                return Err(format!(
                    "unknown input \"{}\"; the model's inputs are: {}",
                    t.name,
                    names(&self.inputs)
                ));
            };
            if spec.datatype != t.datatype() {
                return Err(format!(
                    "input \"{}\" must be {}, not {}",
                    t.name,
                    spec.datatype,
                    t.datatype()
                ));
            }
            let fits = spec.shape.len() == t.shape.len()
                && spec
                    .shape
                    .iter()
                    .zip(&t.shape)
                    .all(|(want, got)| *want < 0 || want == got);
            if !fits {
                return Err(format!(
                    "input \"{}\" has shape {:?} but the model expects {:?} (-1: any size)",
                    t.name, t.shape, spec.shape
                ));
            }
        }
        if let Some(missing) = self
            .inputs
            .iter()
            .find(|s| !inputs.iter().any(|t| t.name == s.name))
        {
            return Err(format!(
                "missing input \"{}\" ({} {:?})",
                missing.name, missing.datatype, missing.shape
            ));
        }
        Ok(())
    }

    /// Checks that every requested output exists.
    pub fn check_outputs<'a>(
        &self,
        requested: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), String> {
        for name in requested {
            if !self.outputs.iter().any(|s| s.name == name) {
                return Err(format!(
                    "unknown output \"{name}\"; the model's outputs are: {}",
                    names(&self.outputs)
                ));
            }
        }
        Ok(())
    }

    /// How `other` breaks this signature's contract with clients: the same
    /// inputs (names, datatypes, shapes) and at least the same outputs (with
    /// the same datatypes and shapes). Empty when it keeps it.
    pub fn contract_differences(&self, other: &Signature) -> Vec<String> {
        let mut out = Vec::new();
        for want in &self.inputs {
            match other.inputs.iter().find(|s| s.name == want.name) {
                None => out.push(format!("input \"{}\" is missing", want.name)),
                Some(got) if got != want => out.push(format!(
                    "input \"{}\" is {} {:?}, not {} {:?}",
                    want.name, got.datatype, got.shape, want.datatype, want.shape
                )),
                Some(_) => {}
            }
        }
        for extra in other
            .inputs
            .iter()
            .filter(|s| !self.inputs.iter().any(|w| w.name == s.name))
        {
            out.push(format!(
                "input \"{}\" is new (clients do not send it)",
                extra.name
            ));
        }
        for want in &self.outputs {
            match other.outputs.iter().find(|s| s.name == want.name) {
                None => out.push(format!("output \"{}\" is missing", want.name)),
                Some(got) if got != want => out.push(format!(
                    "output \"{}\" is {} {:?}, not {} {:?}",
                    want.name, got.datatype, got.shape, want.datatype, want.shape
                )),
                Some(_) => {}
            }
        }
        out
    }

    /// A one-row input of zeros (any-size dimensions set to 1): the warm-up
    /// inference every version must pass before it takes traffic.
    ///
    /// The shapes are the model's (or a remote server's) declarations, so
    /// the bytes they take are checked against `max_bytes` before anything
    /// is allocated: a request must carry every input in one body of at most
    /// `--max-body-bytes`, so a model whose smallest request is larger can
    /// never be served, and its warm-up must not take the server's memory.
    pub fn warmup_inputs(&self, max_bytes: u64) -> Result<Vec<Tensor>, String> {
        let shapes: Vec<Vec<i64>> = self
            .inputs
            .iter()
            .map(|s| {
                s.shape
                    .iter()
                    .map(|d| if *d < 0 { 1 } else { *d })
                    .collect()
            })
            .collect();
        let mut total: u64 = 0;
        for (s, shape) in self.inputs.iter().zip(&shapes) {
            let bytes = element_count(shape)
                .ok()
                .and_then(|n| n.checked_mul(s.datatype.byte_size() as u64));
            total = bytes.and_then(|b| total.checked_add(b)).unwrap_or(u64::MAX);
            if total > max_bytes {
                let bytes = bytes.map_or("more than 2^64".to_string(), |b| b.to_string());
                let others = if self.inputs.len() > 1 {
                    " (with the inputs before it)"
                } else {
                    ""
                };
                return Err(format!(
                    "input \"{}\" is declared {} {:?}: the smallest request would carry {bytes} bytes of it{others}, \
                     more than the limit of {max_bytes} bytes on a request body (--max-body-bytes), so the model \
                     could never be served; declare the batch dimension as dynamic (-1) or the input smaller",
                    s.name, s.datatype, s.shape
                ));
            }
        }
        // Every size is known to fit under `max_bytes` from here on.
        Ok(self
            .inputs
            .iter()
            .zip(shapes)
            .map(|(s, shape)| {
                let n = element_count(&shape).unwrap_or(0) as usize;
                Tensor {
                    name: s.name.clone(),
                    shape,
                    data: TensorData::zeros(s.datatype, n),
                }
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sig() -> Signature {
        Signature {
            inputs: vec![TensorSpec {
                name: "input".into(),
                datatype: DataType::Fp32,
                shape: vec![-1, 3],
            }],
            outputs: vec![TensorSpec {
                name: "label".into(),
                datatype: DataType::Int64,
                shape: vec![-1],
            }],
        }
    }

    fn input(name: &str, shape: Vec<i64>, data: TensorData) -> Tensor {
        Tensor {
            name: name.into(),
            shape,
            data,
        }
    }

    #[test]
    fn accepts_any_batch_and_refuses_wrong_inputs_with_reasons() {
        let s = sig();
        assert!(
            s.check_inputs(&[input("input", vec![5, 3], TensorData::Fp32(vec![0.0; 15]))])
                .is_ok()
        );
        let err = s
            .check_inputs(&[input("x", vec![1, 3], TensorData::Fp32(vec![0.0; 3]))])
            .unwrap_err();
        assert_eq!(err, "unknown input \"x\"; the model's inputs are: input");
        let err = s
            .check_inputs(&[input("input", vec![1, 3], TensorData::Fp64(vec![0.0; 3]))])
            .unwrap_err();
        assert_eq!(err, "input \"input\" must be FP32, not FP64");
        let err = s
            .check_inputs(&[input("input", vec![1, 4], TensorData::Fp32(vec![0.0; 4]))])
            .unwrap_err();
        assert!(err.contains("expects [-1, 3]"), "{err}");
        assert!(
            s.check_inputs(&[])
                .unwrap_err()
                .starts_with("missing input \"input\"")
        );
        assert!(s.check_outputs(["label"]).is_ok());
        assert!(
            s.check_outputs(["probs"])
                .unwrap_err()
                .contains("outputs are: label")
        );
    }

    #[test]
    fn contract_differences_list_what_breaks() {
        let a = sig();
        assert!(a.contract_differences(&a).is_empty());
        let mut b = sig();
        b.inputs[0].shape = vec![-1, 4];
        b.outputs.clear();
        b.outputs.push(TensorSpec {
            name: "extra".into(),
            datatype: DataType::Fp32,
            shape: vec![-1],
        });
        assert_eq!(
            a.contract_differences(&b),
            vec![
                "input \"input\" is FP32 [-1, 4], not FP32 [-1, 3]".to_string(),
                "output \"label\" is missing".to_string()
            ]
        );
    }

    #[test]
    fn warmup_is_one_row_of_zeros() {
        let w = sig().warmup_inputs(64 << 20).unwrap();
        assert_eq!(w[0].shape, vec![1, 3]);
        assert_eq!(w[0].data, TensorData::Fp32(vec![0.0; 3]));
    }

    fn declaring(inputs: &[(&str, DataType, Vec<i64>)]) -> Signature {
        Signature {
            inputs: inputs
                .iter()
                .map(|(name, datatype, shape)| TensorSpec {
                    name: name.to_string(),
                    datatype: *datatype,
                    shape: shape.clone(),
                })
                .collect(),
            outputs: vec![],
        }
    }

    #[test]
    fn a_declared_input_larger_than_a_request_can_carry_is_refused_before_allocating() {
        let huge = declaring(&[("x", DataType::Fp32, vec![100_000, 100_000])]);
        let err = huge.warmup_inputs(64 << 20).unwrap_err();
        assert!(
            err.starts_with("input \"x\" is declared FP32 [100000, 100000]: the smallest request would carry 40000000000 bytes")
                && err.contains("limit of 67108864 bytes")
                && err.contains("--max-body-bytes"),
            "{err}"
        );
        // Exactly at the cap is fine; one byte over is not.
        let at = declaring(&[("x", DataType::Uint8, vec![-1, 1024])]);
        assert_eq!(at.warmup_inputs(1024).unwrap()[0].data.len(), 1024);
        assert!(at.warmup_inputs(1023).is_err());
        // Inputs add up.
        let two = declaring(&[
            ("a", DataType::Fp64, vec![64]),
            ("b", DataType::Fp64, vec![64]),
        ]);
        assert!(two.warmup_inputs(1024).is_ok());
        let err = two.warmup_inputs(1023).unwrap_err();
        assert!(
            err.contains("input \"b\"") && err.contains("with the inputs before it"),
            "{err}"
        );
    }

    #[test]
    fn shapes_whose_size_overflows_are_refused_not_wrapped() {
        for shape in [
            vec![i64::MAX, i64::MAX],
            vec![1 << 62, 4],
            vec![1 << 31, 1 << 31, 1 << 2],
        ] {
            let s = declaring(&[("x", DataType::Fp64, shape.clone())]);
            let err = s.warmup_inputs(u64::MAX - 1).unwrap_err();
            assert!(err.contains("more than 2^64 bytes"), "{shape:?}: {err}");
        }
        // Two inputs whose sum overflows.
        let s = declaring(&[
            ("a", DataType::Uint8, vec![i64::MAX]),
            ("b", DataType::Uint8, vec![i64::MAX]),
            ("c", DataType::Uint8, vec![i64::MAX]),
        ]);
        assert!(s.warmup_inputs(u64::MAX - 1).is_err());
    }
}
