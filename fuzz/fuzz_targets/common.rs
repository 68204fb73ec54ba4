//! What the V2 decoding targets share: how an input becomes a body and its
//! `Inference-Header-Content-Length`, and the check that every decoded
//! tensor holds exactly the elements its shape says.

use ferry::protocol::tensor::{Tensor, element_count};

/// `B` + a big-endian u16 header length + the body, or else the whole
/// input is a JSON body.
pub fn body_and_header(data: &[u8]) -> (&[u8], Option<String>) {
    match data {
        [b'B', hi, lo, body @ ..] => (body, Some(u16::from_be_bytes([*hi, *lo]).to_string())),
        _ => (data, None),
    }
}

pub fn assert_counts_match_shapes(tensors: &[Tensor]) {
    for t in tensors {
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
