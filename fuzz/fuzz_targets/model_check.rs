//! The checks a model passes before ONNX Runtime sees it or a warm-up
//! allocates for it. Input: the bytes of a would-be ONNX file.
//!
//! Checks: the external-data walk never panics, whatever the bytes, and
//! names the tensor it found; warm-up inputs built from declared shapes
//! (the input read as little-endian i64 dimensions) never exceed the byte
//! cap, and a refused shape never allocates.
#![no_main]

use ferry::protocol::DataType;
use ferry::runtime::inspect::{NotSelfContained, check_self_contained};
use ferry::runtime::{Signature, TensorSpec};
use libfuzzer_sys::fuzz_target;

const CAP: u64 = 1 << 20;

fuzz_target!(|data: &[u8]| {
    if let Err(why) = check_self_contained(data) {
        let shown = why.to_string();
        match why {
            NotSelfContained::ExternalData { .. } => assert!(shown.contains("external file")),
            NotSelfContained::TooDeep => assert!(shown.contains("nest deeper")),
            NotSelfContained::OrtFormat => {
                assert!(shown.contains(".ort"));
                assert_eq!(data.get(4..8), Some(b"ORTM".as_slice()));
            }
        }
    }
    let shape: Vec<i64> = data
        .chunks_exact(8)
        .take(8)
        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let signature = Signature {
        inputs: vec![TensorSpec {
            name: "x".into(),
            datatype: DataType::Fp32,
            shape,
        }],
        outputs: vec![],
    };
    if let Ok(inputs) = signature.warmup_inputs(CAP) {
        let bytes: usize = inputs.iter().map(|t| t.data.len() * 4).sum();
        assert!(bytes as u64 <= CAP, "{bytes} bytes of warm-up over the cap");
    }
});
