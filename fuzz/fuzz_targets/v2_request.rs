//! V2 inference requests as clients send them: JSON, or a JSON header plus
//! binary tensors. Input: `B` + a big-endian u16 `Inference-Header-Content-Length`
//! + the body, or else the whole input is a JSON body.
//!
//! Checks: decoding never panics; a decoded request holds exactly the
//! elements its shapes say; re-encoded as JSON (as Ferry forwards it to a
//! remote version) it decodes to the same tensors.
#![no_main]

use ferry::protocol::codec::{decode_request, encode_request_json};
use ferry::protocol::tensor::TensorData;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let (body, header) = common::body_and_header(data);
    let Ok(request) = decode_request(body, header.as_deref()) else {
        return;
    };
    common::assert_counts_match_shapes(&request.inputs);
    // JSON has no NaN or infinity: only finite tensors can be forwarded as JSON.
    if request.inputs.iter().all(|t| finite(&t.data)) {
        let json = encode_request_json(request.id.as_deref(), &request.inputs);
        let again = decode_request(&json, None).unwrap_or_else(|e| {
            panic!(
                "re-encoded request does not decode: {e}\n{}",
                String::from_utf8_lossy(&json)
            )
        });
        assert_eq!(again.inputs, request.inputs);
        assert_eq!(again.id, request.id);
    }
});

fn finite(data: &TensorData) -> bool {
    match data {
        TensorData::Fp16(v) => v.iter().all(|x| x.is_finite()),
        TensorData::Fp32(v) => v.iter().all(|x| x.is_finite()),
        TensorData::Fp64(v) => v.iter().all(|x| x.is_finite()),
        _ => true,
    }
}
