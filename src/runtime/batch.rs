//! Adaptive batching, as Triton and MLServer do it: requests that arrive
//! together are merged along the first (batch) dimension into one run, and
//! the outputs are split back per request. Pure data shuffling; the worker
//! decides when to batch.

use crate::protocol::{Tensor, TensorData};

/// Merges requests' inputs into one batch. Returns the merged inputs and
/// each request's row count, or `None` when the requests cannot be merged
/// (different input names, datatypes or non-batch dimensions).
pub fn merge(requests: &[Vec<Tensor>]) -> Option<(Vec<Tensor>, Vec<usize>)> {
    let first = requests.first()?;
    let mut rows = Vec::with_capacity(requests.len());
    for req in requests {
        if req.len() != first.len() {
            return None;
        }
        let r = req.first()?.shape.first().copied()?;
        if r < 0 || req.iter().any(|t| t.shape.first() != Some(&r)) {
            return None;
        }
        rows.push(r as usize);
    }
    let mut merged = Vec::with_capacity(first.len());
    for (i, template) in first.iter().enumerate() {
        let mut parts = Vec::with_capacity(requests.len());
        for req in requests {
            let t = req.iter().find(|t| t.name == template.name)?;
            if t.shape[1..] != template.shape[1..] || t.datatype() != template.datatype() {
                return None;
            }
            parts.push(&t.data);
        }
        let _ = i;
        let mut shape = template.shape.clone();
        shape[0] = rows.iter().sum::<usize>() as i64;
        merged.push(Tensor {
            name: template.name.clone(),
            shape,
            data: TensorData::concat(&parts)?,
        });
    }
    Some((merged, rows))
}

/// Splits a batch's outputs back into one set per request; `None` when an
/// output does not have the batch as its first dimension.
pub fn split(outputs: Vec<Tensor>, rows: &[usize]) -> Option<Vec<Vec<Tensor>>> {
    let total: usize = rows.iter().sum();
    let mut per_request: Vec<Vec<Tensor>> = rows
        .iter()
        .map(|_| Vec::with_capacity(outputs.len()))
        .collect();
    for out in outputs {
        if out.shape.first().copied() != Some(total as i64) || total == 0 {
            return None;
        }
        let per_row = out.data.len() / total;
        let mut start = 0;
        for (i, r) in rows.iter().enumerate() {
            let mut shape = out.shape.clone();
            shape[0] = *r as i64;
            per_request[i].push(Tensor {
                name: out.name.clone(),
                shape,
                data: out.data.slice(start * per_row, r * per_row),
            });
            start += r;
        }
    }
    Some(per_request)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(rows: usize, base: f32) -> Vec<Tensor> {
        vec![Tensor {
            name: "x".into(),
            shape: vec![rows as i64, 2],
            data: TensorData::Fp32((0..rows * 2).map(|i| base + i as f32).collect()),
        }]
    }

    #[test]
    fn merge_then_split_gives_each_request_its_rows() {
        let (merged, rows) = merge(&[input(1, 0.0), input(2, 10.0), input(1, 20.0)]).unwrap();
        assert_eq!(rows, vec![1, 2, 1]);
        assert_eq!(merged[0].shape, vec![4, 2]);
        assert_eq!(
            merged[0].data,
            TensorData::Fp32(vec![0.0, 1.0, 10.0, 11.0, 12.0, 13.0, 20.0, 21.0])
        );
        // An identity model: the outputs are the inputs.
        let back = split(merged, &rows).unwrap();
        assert_eq!(back[1][0].shape, vec![2, 2]);
        assert_eq!(
            back[1][0].data,
            TensorData::Fp32(vec![10.0, 11.0, 12.0, 13.0])
        );
        assert_eq!(back[2][0].data, TensorData::Fp32(vec![20.0, 21.0]));
    }

    #[test]
    fn requests_that_differ_are_not_merged() {
        let mut other = input(1, 0.0);
        other[0].shape = vec![1, 1];
        other[0].data = TensorData::Fp32(vec![0.0]);
        assert!(merge(&[input(1, 0.0), other]).is_none());
        let mut typed = input(1, 0.0);
        typed[0].data = TensorData::Fp64(vec![0.0, 1.0]);
        assert!(merge(&[input(1, 0.0), typed]).is_none());
        // An output without the batch dimension cannot be split.
        let scalar = vec![Tensor {
            name: "s".into(),
            shape: vec![],
            data: TensorData::Fp32(vec![1.0]),
        }];
        assert!(split(scalar, &[1, 1]).is_none());
    }
}
