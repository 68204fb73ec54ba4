//! gRPC inference requests as clients send them: a protobuf
//! `ModelInferRequest` with typed contents or `raw_input_contents`.
//!
//! Checks: decoding the message and then its tensors never panics; a
//! decoded request holds exactly the elements its shapes say; re-encoded as
//! Ferry sends it to a gRPC remote (raw contents), it decodes to the same
//! tensors and version.
#![no_main]

use ferry::protocol::grpc::{decode_request, encode_request, pb};
use libfuzzer_sys::fuzz_target;
use prost::Message;

#[path = "common.rs"]
#[allow(dead_code)] // body_and_header is for the REST targets
mod common;

fuzz_target!(|data: &[u8]| {
    let Ok(message) = pb::ModelInferRequest::decode(data) else {
        return;
    };
    let Ok(request) = decode_request(message) else {
        return;
    };
    common::assert_counts_match_shapes(&request.inputs);
    let again = encode_request(
        &request.model,
        request.version.as_deref(),
        request.id.as_deref(),
        &request.inputs,
    );
    let again =
        decode_request(pb::ModelInferRequest::decode(again.encode_to_vec().as_slice()).unwrap())
            .unwrap_or_else(|e| panic!("a re-encoded request does not decode: {e}"));
    assert_eq!(again.id, request.id, "the id goes with the request");
    assert_eq!(again.inputs.len(), request.inputs.len());
    for (a, b) in again.inputs.iter().zip(&request.inputs) {
        // NaN != NaN: compare the bits, as the bytes on the wire are.
        let (mut x, mut y) = (Vec::new(), Vec::new());
        a.data.write_le_bytes(&mut x);
        b.data.write_le_bytes(&mut y);
        assert_eq!(
            (&a.name, &a.shape, a.datatype(), x),
            (&b.name, &b.shape, b.datatype(), y)
        );
    }
    assert_eq!(again.version, request.version);
});
