//! The Open Inference Protocol (KServe V2 / Triton REST): request and response
//! types, the JSON and binary tensor codecs, and the error body.
//!
//! This module knows nothing about routing or models: it turns bytes into typed
//! tensors and back, and says precisely what is wrong with malformed input.
//! Layout: [`tensor`] (datatypes and typed tensor data), [`codec`] (decoding
//! requests, encoding responses, both for JSON and the binary extension),
//! [`signature`] (a model's inputs and outputs: what its clients must send),
//! [`grpc`] (the gRPC messages and their tensors, both directions).

pub mod codec;
pub mod grpc;
pub mod signature;
pub mod tensor;

pub use codec::{
    InferRequest, InferResponse, RequestedOutput, Rewritten, decode_request, decode_response_json,
    encode_request_json, encode_response, names_outputs, request_id, rewrite_response,
};
pub use signature::{Signature, TensorSpec};
pub use tensor::{DataType, Tensor, TensorData};

/// Header that announces the binary tensor data extension: the length of the
/// JSON header at the start of the body; binary tensor data follows it.
pub const HEADER_CONTENT_LENGTH: &str = "inference-header-content-length";

/// A request's id, in Ferry's answers and in what Ferry sends a remote
/// version (its body may not carry it: a passed-through body is the
/// client's, as sent).
pub const REQUEST_ID_HEADER: &str = "x-ferry-request-id";

/// Why a request body could not be understood. Every variant becomes a 400
/// with a message that names the tensor and what to change.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ProtocolError {
    /// The body (or the JSON header part of it) is not valid JSON of the V2 shape.
    #[error("request body is not a valid inference request: {0}")]
    Json(String),
    /// `Inference-Header-Content-Length` is not a number or exceeds the body.
    #[error(
        "Inference-Header-Content-Length {header} is invalid for a body of {body} bytes; it must be the length of the JSON part"
    )]
    HeaderLength { header: String, body: usize },
    /// A datatype outside the supported set.
    #[error(
        "tensor \"{tensor}\": datatype \"{datatype}\" is not supported; use one of BOOL, INT8, INT16, INT32, INT64, UINT8, UINT16, UINT32, UINT64, FP16, FP32, FP64"
    )]
    DataType { tensor: String, datatype: String },
    /// A negative dimension or a shape whose element count overflows.
    #[error("tensor \"{tensor}\": shape {shape:?} is invalid: {why}")]
    Shape {
        tensor: String,
        shape: Vec<i64>,
        why: String,
    },
    /// The number of elements given does not match the shape.
    #[error("tensor \"{tensor}\": shape {shape:?} needs {expected} elements but {got} were given")]
    ElementCount {
        tensor: String,
        shape: Vec<i64>,
        expected: u64,
        got: u64,
    },
    /// An element that is not a value of the tensor's datatype.
    #[error("tensor \"{tensor}\": element {index} ({value}) is not a valid {datatype} value")]
    Element {
        tensor: String,
        index: usize,
        value: String,
        datatype: &'static str,
    },
    /// An input with neither `data` nor `binary_data_size`.
    #[error(
        "tensor \"{tensor}\" has no data: give \"data\" or, with the binary extension, parameters.binary_data_size"
    )]
    MissingData { tensor: String },
    /// The binary part of the body is shorter or longer than the tensors announce.
    #[error("binary tensor data: {0}")]
    Binary(String),
    /// The same input or output named twice.
    #[error("tensor \"{0}\" is given more than once")]
    Duplicate(String),
    /// gRPC tensor contents that do not fit the tensor (missing, doubled,
    /// or raw bytes of the wrong length).
    #[error("tensor \"{tensor}\" {why}")]
    Contents { tensor: String, why: String },
    /// A client's request id that Ferry will not remember or echo.
    #[error(
        "request id is invalid: {0}; an id is 1 to {MAX_ID_BYTES} printable ASCII characters (or leave it out and Ferry makes one)"
    )]
    Id(String),
}

impl ProtocolError {
    /// The error said of a remote's answer rather than of a request.
    pub fn of_answer(&self) -> String {
        match self {
            ProtocolError::Json(why) => why.clone(),
            ProtocolError::HeaderLength { header, body } => format!(
                "its Inference-Header-Content-Length {header} does not fit its {body} bytes"
            ),
            other => other.to_string(),
        }
    }
}

/// The longest request id a client may send (it is echoed in a header and
/// remembered for delayed labels).
pub const MAX_ID_BYTES: usize = 256;

/// Whether a request id may be remembered and echoed: 1 to
/// [`MAX_ID_BYTES`] printable ASCII characters (space included).
pub fn check_id(id: &str) -> Result<(), ProtocolError> {
    if id.is_empty() {
        return Err(ProtocolError::Id("it is empty".into()));
    }
    if id.len() > MAX_ID_BYTES {
        return Err(ProtocolError::Id(format!("it is {} bytes long", id.len())));
    }
    if let Some(c) = id.chars().find(|c| !(' '..='~').contains(c)) {
        return Err(ProtocolError::Id(format!("it contains {c:?}")));
    }
    Ok(())
}
