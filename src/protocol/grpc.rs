//! The Open Inference Protocol's gRPC messages (generated at build time from
//! `proto/grpc_predict_v2.proto`, in [`pb`]) and their translation to and
//! from Ferry's typed tensors, both directions: requests a client sends
//! (typed `contents` or `raw_input_contents`), answers Ferry sends (raw, as
//! Triton does), and the same for a remote gRPC server Ferry calls.
//!
//! Decoding never allocates from a declared shape, only from the contents
//! that arrived, so a hostile shape costs nothing; every refusal names the
//! tensor and what to change, in the words of the REST decoder.

use super::ProtocolError;
use super::check_id;
use super::tensor::{DataType, Tensor, TensorData, element_count};

/// The generated `inference` package: messages, the service's client and
/// its server trait.
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("inference");
}

use pb::InferTensorContents;
use pb::model_infer_request::InferInputTensor;

/// A decoded `ModelInferRequest`.
#[derive(Debug, Clone, PartialEq)]
pub struct GrpcRequest {
    pub model: String,
    /// `model_version`; `None` when empty (the routed version answers).
    pub version: Option<String>,
    /// The client's id; `None` when empty (Ferry makes one).
    pub id: Option<String>,
    pub inputs: Vec<Tensor>,
    /// Outputs asked for, in order; empty means all of them.
    pub outputs: Vec<String>,
}

/// Decodes a gRPC inference request into tensors. Inputs carry their data
/// either all in `raw_input_contents` (one entry per input, in order) or
/// each in its typed `contents`, never both.
pub fn decode_request(req: pb::ModelInferRequest) -> Result<GrpcRequest, ProtocolError> {
    let id = Some(req.id).filter(|id| !id.is_empty());
    if let Some(id) = &id {
        check_id(id)?;
    }
    let raw = req.raw_input_contents;
    if !raw.is_empty() && raw.len() != req.inputs.len() {
        return Err(ProtocolError::Contents {
            tensor: "(request)".into(),
            why: format!(
                "raw_input_contents has {} entries for {} inputs; give one per input, in the order of inputs",
                raw.len(),
                req.inputs.len()
            ),
        });
    }
    let mut raw = raw.into_iter();
    let mut inputs: Vec<Tensor> = Vec::with_capacity(req.inputs.len());
    for input in req.inputs {
        if inputs.iter().any(|t| t.name == input.name) {
            return Err(ProtocolError::Duplicate(input.name));
        }
        let InferInputTensor {
            name,
            datatype,
            shape,
            contents,
            ..
        } = input;
        let raw = raw.next();
        if raw.is_some() && contents.is_some() {
            return Err(ProtocolError::Contents {
                tensor: name,
                why: "has both contents and raw_input_contents; give one of them".into(),
            });
        }
        inputs.push(decode_tensor(
            name,
            &datatype,
            shape,
            contents,
            raw.as_deref(),
        )?);
    }
    let mut outputs: Vec<String> = Vec::with_capacity(req.outputs.len());
    for o in req.outputs {
        if outputs.contains(&o.name) {
            return Err(ProtocolError::Duplicate(o.name));
        }
        outputs.push(o.name);
    }
    Ok(GrpcRequest {
        model: req.model_name,
        version: Some(req.model_version).filter(|v| !v.is_empty()),
        id,
        inputs,
        outputs,
    })
}

/// Decodes the outputs of a `ModelInferResponse` (from a remote server):
/// raw contents when it sent them, typed contents otherwise.
pub fn decode_response(resp: pb::ModelInferResponse) -> Result<Vec<Tensor>, ProtocolError> {
    let mut raw = resp.raw_output_contents.into_iter();
    resp.outputs
        .into_iter()
        .map(|o| {
            let raw = raw.next();
            decode_tensor(o.name, &o.datatype, o.shape, o.contents, raw.as_deref())
        })
        .collect()
}

/// One tensor from its datatype, shape and either raw little-endian bytes
/// or typed contents.
fn decode_tensor(
    name: String,
    datatype: &str,
    shape: Vec<i64>,
    contents: Option<InferTensorContents>,
    raw: Option<&[u8]>,
) -> Result<Tensor, ProtocolError> {
    let dt = DataType::parse(datatype).ok_or_else(|| ProtocolError::DataType {
        tensor: name.clone(),
        datatype: datatype.chars().take(32).collect(),
    })?;
    let expected = element_count(&shape).map_err(|why| ProtocolError::Shape {
        tensor: name.clone(),
        shape: shape.clone(),
        why,
    })?;
    let data = match (raw, contents) {
        (Some(bytes), _) => {
            let size = dt.byte_size() as u64;
            if bytes.len() as u64 != expected.saturating_mul(size) {
                return Err(ProtocolError::Contents {
                    tensor: name,
                    why: format!(
                        "shape {shape:?} of {dt} needs {} bytes of raw contents but {} were given",
                        expected.saturating_mul(size),
                        bytes.len()
                    ),
                });
            }
            TensorData::from_le_bytes(dt, bytes).map_err(|bad| ProtocolError::Element {
                tensor: name.clone(),
                index: bad.index,
                value: bad.value,
                datatype: dt.as_str(),
            })?
        }
        (None, Some(contents)) => typed(&name, dt, contents)?,
        (None, None) => {
            return Err(ProtocolError::Contents {
                tensor: name,
                why: "has no data: give its contents, or raw_input_contents for every input".into(),
            });
        }
    };
    if data.len() as u64 != expected {
        return Err(ProtocolError::ElementCount {
            tensor: name,
            shape,
            expected,
            got: data.len() as u64,
        });
    }
    Ok(Tensor { name, shape, data })
}

/// Reads the typed contents field that matches `dt`, refusing values out of
/// the datatype's range rather than wrapping them.
fn typed(name: &str, dt: DataType, c: InferTensorContents) -> Result<TensorData, ProtocolError> {
    fn narrow<S: Copy + std::fmt::Display, T: TryFrom<S>>(
        name: &str,
        dt: DataType,
        values: Vec<S>,
    ) -> Result<Vec<T>, ProtocolError> {
        values
            .into_iter()
            .enumerate()
            .map(|(index, v)| {
                T::try_from(v).map_err(|_| ProtocolError::Element {
                    tensor: name.to_string(),
                    index,
                    value: v.to_string(),
                    datatype: dt.as_str(),
                })
            })
            .collect()
    }
    Ok(match dt {
        DataType::Bool => TensorData::Bool(c.bool_contents),
        DataType::Int8 => TensorData::Int8(narrow(name, dt, c.int_contents)?),
        DataType::Int16 => TensorData::Int16(narrow(name, dt, c.int_contents)?),
        DataType::Int32 => TensorData::Int32(c.int_contents),
        DataType::Int64 => TensorData::Int64(c.int64_contents),
        DataType::Uint8 => TensorData::Uint8(narrow(name, dt, c.uint_contents)?),
        DataType::Uint16 => TensorData::Uint16(narrow(name, dt, c.uint_contents)?),
        DataType::Uint32 => TensorData::Uint32(c.uint_contents),
        DataType::Uint64 => TensorData::Uint64(c.uint64_contents),
        DataType::Fp32 => TensorData::Fp32(c.fp32_contents),
        DataType::Fp64 => TensorData::Fp64(c.fp64_contents),
        DataType::Fp16 => {
            return Err(ProtocolError::Contents {
                tensor: name.to_string(),
                why: "FP16 has no typed contents field; send it in raw_input_contents".into(),
            });
        }
    })
}

/// The raw little-endian bytes of each tensor, in order.
fn raw_contents(tensors: &[Tensor]) -> Vec<Vec<u8>> {
    tensors
        .iter()
        .map(|t| {
            let mut bytes = Vec::with_capacity(t.data.len() * t.datatype().byte_size());
            t.data.write_le_bytes(&mut bytes);
            bytes
        })
        .collect()
}

/// An answer as Triton sends it: output metadata, and the data in
/// `raw_output_contents`.
pub fn encode_response(
    model: String,
    version: String,
    id: String,
    outputs: &[Tensor],
) -> pb::ModelInferResponse {
    pb::ModelInferResponse {
        model_name: model,
        model_version: version,
        id,
        parameters: Default::default(),
        outputs: outputs
            .iter()
            .map(|t| pb::model_infer_response::InferOutputTensor {
                name: t.name.clone(),
                datatype: t.datatype().as_str().into(),
                shape: t.shape.clone(),
                parameters: Default::default(),
                contents: None,
            })
            .collect(),
        raw_output_contents: raw_contents(outputs),
    }
}

/// A request to a remote gRPC server: the inputs in `raw_input_contents`,
/// every output asked for.
pub fn encode_request(
    model: &str,
    version: Option<&str>,
    id: Option<&str>,
    inputs: &[Tensor],
) -> pb::ModelInferRequest {
    pb::ModelInferRequest {
        model_name: model.into(),
        model_version: version.unwrap_or_default().into(),
        id: id.unwrap_or_default().into(),
        parameters: Default::default(),
        inputs: inputs
            .iter()
            .map(|t| InferInputTensor {
                name: t.name.clone(),
                datatype: t.datatype().as_str().into(),
                shape: t.shape.clone(),
                parameters: Default::default(),
                contents: None,
            })
            .collect(),
        outputs: Vec::new(),
        raw_input_contents: raw_contents(inputs),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(
        name: &str,
        datatype: &str,
        shape: Vec<i64>,
        contents: Option<InferTensorContents>,
    ) -> InferInputTensor {
        InferInputTensor {
            name: name.into(),
            datatype: datatype.into(),
            shape,
            parameters: Default::default(),
            contents,
        }
    }

    fn request(inputs: Vec<InferInputTensor>, raw: Vec<Vec<u8>>) -> pb::ModelInferRequest {
        pb::ModelInferRequest {
            model_name: "m".into(),
            inputs,
            raw_input_contents: raw,
            ..Default::default()
        }
    }

    fn fp32(values: Vec<f32>) -> Option<InferTensorContents> {
        Some(InferTensorContents {
            fp32_contents: values,
            ..Default::default()
        })
    }

    #[test]
    fn typed_and_raw_contents_decode_to_the_same_tensor() {
        let typed = decode_request(request(
            vec![input("x", "FP32", vec![1, 2], fp32(vec![1.5, -2.0]))],
            vec![],
        ))
        .unwrap();
        let mut raw = Vec::new();
        TensorData::Fp32(vec![1.5, -2.0]).write_le_bytes(&mut raw);
        let rawed = decode_request(request(
            vec![input("x", "FP32", vec![1, 2], None)],
            vec![raw],
        ))
        .unwrap();
        assert_eq!(typed, rawed);
        assert_eq!(typed.inputs[0].data, TensorData::Fp32(vec![1.5, -2.0]));
        assert_eq!((typed.version, typed.id), (None, None));
    }

    #[test]
    fn a_response_round_trips_through_raw_contents() {
        let outputs = vec![
            Tensor {
                name: "label".into(),
                shape: vec![2],
                data: TensorData::Int64(vec![0, 1]),
            },
            Tensor {
                name: "p".into(),
                shape: vec![2, 1],
                data: TensorData::Fp16(vec![half::f16::ONE; 2]),
            },
        ];
        let resp = encode_response("m".into(), "2".into(), "id-1".into(), &outputs);
        assert_eq!(resp.model_version, "2");
        assert_eq!(decode_response(resp).unwrap(), outputs);
        let req = encode_request("m", Some("3"), Some("r-9"), &outputs);
        assert_eq!(req.id, "r-9");
        let back = decode_request(req).unwrap();
        assert_eq!((back.version.as_deref(), back.inputs), (Some("3"), outputs));
    }

    #[test]
    fn every_bad_input_is_refused_naming_the_tensor() {
        let cases: Vec<(pb::ModelInferRequest, &str)> = vec![
            (
                request(
                    vec![input("x", "FP32", vec![1, 3], fp32(vec![1.0]))],
                    vec![],
                ),
                "tensor \"x\": shape [1, 3] needs 3 elements but 1 were given",
            ),
            (
                request(vec![input("x", "STRING", vec![1], fp32(vec![1.0]))], vec![]),
                "datatype \"STRING\" is not supported",
            ),
            (
                request(vec![input("x", "FP32", vec![-1], fp32(vec![]))], vec![]),
                "dimension -1 is negative",
            ),
            (
                request(vec![input("x", "FP32", vec![1], None)], vec![]),
                "tensor \"x\" has no data",
            ),
            (
                request(vec![input("x", "FP32", vec![2], None)], vec![vec![0; 4]]),
                "needs 8 bytes of raw contents but 4 were given",
            ),
            (
                request(
                    vec![
                        input("x", "FP32", vec![1], None),
                        input("y", "FP32", vec![1], None),
                    ],
                    vec![vec![0; 4]],
                ),
                "raw_input_contents has 1 entries for 2 inputs",
            ),
            (
                request(
                    vec![input("x", "FP32", vec![1], fp32(vec![1.0]))],
                    vec![vec![0; 4]],
                ),
                "both contents and raw_input_contents",
            ),
            (
                request(
                    vec![
                        input("x", "FP32", vec![1], fp32(vec![1.0])),
                        input("x", "FP32", vec![1], fp32(vec![1.0])),
                    ],
                    vec![],
                ),
                "tensor \"x\" is given more than once",
            ),
            (
                request(
                    vec![input(
                        "x",
                        "INT8",
                        vec![1],
                        Some(InferTensorContents {
                            int_contents: vec![300],
                            ..Default::default()
                        }),
                    )],
                    vec![],
                ),
                "element 0 (300) is not a valid INT8 value",
            ),
            (
                request(vec![input("x", "BOOL", vec![1], None)], vec![vec![7]]),
                "element 0 (byte 7) is not a valid BOOL value",
            ),
            (
                request(vec![input("x", "FP16", vec![1], fp32(vec![1.0]))], vec![]),
                "FP16 has no typed contents field",
            ),
            (
                pb::ModelInferRequest {
                    id: "a\nb".into(),
                    ..request(vec![], vec![])
                },
                "request id is invalid",
            ),
            (
                pb::ModelInferRequest {
                    outputs: vec![
                        pb::model_infer_request::InferRequestedOutputTensor {
                            name: "o".into(),
                            parameters: Default::default()
                        };
                        2
                    ],
                    ..request(vec![], vec![])
                },
                "tensor \"o\" is given more than once",
            ),
        ];
        for (req, want) in cases {
            let got = decode_request(req).unwrap_err().to_string();
            assert!(got.contains(want), "{got:?} should contain {want:?}");
        }
    }

    #[test]
    fn a_huge_declared_shape_allocates_nothing() {
        let err = decode_request(request(
            vec![input("x", "FP32", vec![1 << 40, 1 << 20], fp32(vec![1.0]))],
            vec![],
        ))
        .unwrap_err();
        assert!(
            matches!(err, ProtocolError::ElementCount { got: 1, .. }),
            "{err}"
        );
    }
}
