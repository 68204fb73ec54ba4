//! V2 inference responses as remote versions send them back (JSON, or JSON
//! plus binary tensors). Input layout as in `v2_request`.
//!
//! Checks: decoding never panics, and decoded outputs hold exactly the
//! elements their shapes say.
#![no_main]

use ferry::protocol::codec::decode_response_json;
use ferry::protocol::tensor::element_count;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (body, header) = match data {
        [b'B', hi, lo, body @ ..] => (body, Some(u16::from_be_bytes([*hi, *lo]).to_string())),
        _ => (data, None),
    };
    if let Ok(outputs) = decode_response_json(body, header.as_deref()) {
        for t in &outputs {
            let n = element_count(&t.shape).expect("a decoded shape has a count");
            assert_eq!(
                t.data.len() as u64,
                n,
                "tensor {} shape {:?}",
                t.name,
                t.shape
            );
        }
    }
});
