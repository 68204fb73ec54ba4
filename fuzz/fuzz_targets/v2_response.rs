//! V2 inference responses as remote versions send them back (JSON, or JSON
//! plus binary tensors). Input layout: `common.rs`.
//!
//! Checks: decoding never panics, and decoded outputs hold exactly the
//! elements their shapes say.
#![no_main]

use ferry::protocol::codec::decode_response_json;
use libfuzzer_sys::fuzz_target;

#[path = "common.rs"]
mod common;

fuzz_target!(|data: &[u8]| {
    let (body, header) = common::body_and_header(data);
    if let Ok(outputs) = decode_response_json(body, header.as_deref()) {
        common::assert_counts_match_shapes(&outputs);
    }
});
