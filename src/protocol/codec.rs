//! Decoding V2 inference requests and encoding responses, as JSON and with the
//! binary tensor data extension (a JSON header, then raw little-endian tensors).

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use super::tensor::{DataType, Tensor, TensorData, element_count};
use super::{ProtocolError, check_id};

/// JSON nesting deeper than this in `data` is refused (tensors of rank > 32
/// do not exist in practice, and deep nesting is a way to exhaust the stack).
const MAX_DATA_DEPTH: usize = 32;

/// A decoded inference request.
#[derive(Debug, Clone, PartialEq)]
pub struct InferRequest {
    /// The client's request id, echoed in the response.
    pub id: Option<String>,
    /// Request-level parameters, passed through untouched.
    pub parameters: Map<String, Value>,
    pub inputs: Vec<Tensor>,
    /// Outputs the client asked for; empty means all of them.
    pub outputs: Vec<RequestedOutput>,
    /// `parameters.binary_data_output`: the default for outputs that do not say.
    pub binary_output: bool,
}

/// One output named in the request, and whether it should come back binary.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestedOutput {
    pub name: String,
    pub binary: Option<bool>,
}

/// What a version answered, ready to encode.
#[derive(Debug, Clone, PartialEq)]
pub struct InferResponse {
    pub model_name: String,
    pub model_version: String,
    pub id: String,
    pub outputs: Vec<Tensor>,
}

/// A tensor as it appears in JSON, before its data is typed. The data stays
/// raw text until its datatype is known, then is read straight into typed
/// elements: a JSON tree of it would take about 20 times the body's size.
#[derive(Deserialize)]
struct RawTensor<'a> {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    #[serde(default, borrow)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct RawRequest<'a> {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    #[serde(borrow)]
    inputs: Vec<RawTensor<'a>>,
    #[serde(default)]
    outputs: Option<Vec<RawOutput>>,
}

#[derive(Deserialize)]
struct RawOutput {
    name: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
}

#[derive(Deserialize)]
struct RawResponse<'a> {
    #[serde(default, borrow)]
    outputs: Vec<RawTensor<'a>>,
}

/// Splits a body into its JSON part and binary part, using the value of
/// `Inference-Header-Content-Length` when the client sent it.
fn split_body<'a>(
    body: &'a [u8],
    header_len: Option<&str>,
) -> Result<(&'a [u8], &'a [u8]), ProtocolError> {
    match header_len {
        None => Ok((body, &[])),
        Some(h) => {
            // Digits only: Rust's parser would also take "+110".
            let n: usize = Some(h.trim())
                .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|d| d.parse().ok())
                .filter(|n| *n <= body.len())
                .ok_or_else(|| ProtocolError::HeaderLength {
                    header: h.chars().take(32).collect(),
                    body: body.len(),
                })?;
            Ok(body.split_at(n))
        }
    }
}

fn json_error(e: serde_json::Error) -> ProtocolError {
    ProtocolError::Json(e.to_string())
}

/// Decodes a request body (JSON, or JSON header + binary tensors when
/// `header_len` is the `Inference-Header-Content-Length` value).
pub fn decode_request(
    body: &[u8],
    header_len: Option<&str>,
) -> Result<InferRequest, ProtocolError> {
    let (json, binary) = split_body(body, header_len)?;
    let raw: RawRequest = serde_json::from_slice(json).map_err(json_error)?;
    // An empty id is as good as none: Ferry makes one.
    let id = raw.id.filter(|id| !id.is_empty());
    if let Some(id) = &id {
        check_id(id)?;
    }
    let parameters = raw.parameters.unwrap_or_default();
    let binary_output = parameters
        .get("binary_data_output")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    let inputs = decode_tensors(raw.inputs, binary)?;
    let mut outputs = Vec::new();
    for o in raw.outputs.unwrap_or_default() {
        if outputs.iter().any(|x: &RequestedOutput| x.name == o.name) {
            return Err(ProtocolError::Duplicate(o.name));
        }
        let binary = o
            .parameters
            .as_ref()
            .and_then(|p| p.get("binary_data"))
            .and_then(Value::as_bool);
        outputs.push(RequestedOutput {
            name: o.name,
            binary,
        });
    }
    Ok(InferRequest {
        id,
        parameters,
        inputs,
        outputs,
        binary_output,
    })
}

/// Decodes the outputs of a V2 response (as sent by a remote server).
pub fn decode_response_json(
    body: &[u8],
    header_len: Option<&str>,
) -> Result<Vec<Tensor>, ProtocolError> {
    let (json, binary) = split_body(body, header_len)?;
    let raw: RawResponse = serde_json::from_slice(json).map_err(json_error)?;
    decode_tensors(raw.outputs, binary)
}

fn decode_tensors(raw: Vec<RawTensor<'_>>, binary: &[u8]) -> Result<Vec<Tensor>, ProtocolError> {
    let mut rest = binary;
    let mut out: Vec<Tensor> = Vec::with_capacity(raw.len());
    for t in raw {
        if out.iter().any(|x| x.name == t.name) {
            return Err(ProtocolError::Duplicate(t.name));
        }
        let datatype = DataType::parse(&t.datatype).ok_or_else(|| ProtocolError::DataType {
            tensor: t.name.clone(),
            datatype: t.datatype.chars().take(32).collect(),
        })?;
        let expected = element_count(&t.shape).map_err(|why| ProtocolError::Shape {
            tensor: t.name.clone(),
            shape: t.shape.clone(),
            why,
        })?;
        let binary_size = t
            .parameters
            .as_ref()
            .and_then(|p| p.get("binary_data_size"))
            .map(|v| {
                v.as_u64().ok_or_else(|| {
                    ProtocolError::Binary(format!(
                        "tensor \"{}\": binary_data_size must be a non-negative integer",
                        t.name
                    ))
                })
            })
            .transpose()?;
        let count_error = |got: u64| ProtocolError::ElementCount {
            tensor: t.name.clone(),
            shape: t.shape.clone(),
            expected,
            got,
        };
        let data = match (binary_size, &t.data) {
            (Some(size), _) => {
                let size = usize::try_from(size).unwrap_or(usize::MAX);
                if size > rest.len() {
                    return Err(ProtocolError::Binary(format!(
                        "tensor \"{}\" announces {size} bytes but only {} remain in the body",
                        t.name,
                        rest.len()
                    )));
                }
                let elem = datatype.byte_size();
                if size % elem != 0 {
                    return Err(ProtocolError::Binary(format!(
                        "tensor \"{}\": {size} bytes is not a whole number of {datatype} elements ({elem} bytes each)",
                        t.name
                    )));
                }
                let got = (size / elem) as u64;
                if got != expected {
                    return Err(count_error(got));
                }
                let (bytes, tail) = rest.split_at(size);
                rest = tail;
                TensorData::from_le_bytes(datatype, bytes).map_err(|e| ProtocolError::Element {
                    tensor: t.name.clone(),
                    index: e.index,
                    value: e.value,
                    datatype: datatype.as_str(),
                })?
            }
            (None, Some(raw)) => {
                let (data, got) = json_data(raw, datatype, expected).map_err(|e| match e {
                    DataError::Depth(why) | DataError::Json(why) => ProtocolError::Shape {
                        tensor: t.name.clone(),
                        shape: t.shape.clone(),
                        why,
                    },
                    DataError::Element(e) => ProtocolError::Element {
                        tensor: t.name.clone(),
                        index: e.index,
                        value: e.value,
                        datatype: datatype.as_str(),
                    },
                })?;
                if got != expected {
                    return Err(count_error(got));
                }
                data
            }
            (None, None) => return Err(ProtocolError::MissingData { tensor: t.name }),
        };
        out.push(Tensor {
            name: t.name,
            shape: t.shape,
            data,
        });
    }
    if !rest.is_empty() {
        return Err(ProtocolError::Binary(format!(
            "{} bytes follow the last tensor; every binary tensor needs parameters.binary_data_size",
            rest.len()
        )));
    }
    Ok(out)
}

/// Why a tensor's JSON data could not be read.
enum DataError {
    Depth(String),
    Element(super::tensor::BadElement),
    Json(String),
}

/// Reads a tensor's JSON data — nested arrays, row-major — straight into
/// typed elements, keeping at most `expected` of them; returns them and how
/// many elements the data holds.
fn json_data(
    raw: &RawValue,
    datatype: DataType,
    expected: u64,
) -> Result<(TensorData, u64), DataError> {
    use serde::de::DeserializeSeed;
    // Every element takes at least two bytes of text ("0,").
    let room = expected.min(raw.get().len() as u64 / 2 + 1) as usize;
    let mut data = TensorData::with_capacity(datatype, room);
    let (mut count, mut failed) = (0u64, None);
    let flat = Flat {
        out: &mut data,
        count: &mut count,
        expected,
        depth: 0,
        failed: &mut failed,
    };
    let mut de = serde_json::Deserializer::from_str(raw.get());
    match flat.deserialize(&mut de) {
        Ok(()) => Ok((data, count)),
        Err(e) => Err(failed.unwrap_or_else(|| DataError::Json(e.to_string()))),
    }
}

/// A visitor that walks nested arrays and appends each scalar as it meets
/// it; past `expected` elements it only counts.
struct Flat<'s> {
    out: &'s mut TensorData,
    count: &'s mut u64,
    expected: u64,
    depth: usize,
    failed: &'s mut Option<DataError>,
}

impl Flat<'_> {
    fn scalar<E: serde::de::Error>(self, v: Value) -> Result<(), E> {
        let index = *self.count;
        *self.count += 1;
        if index >= self.expected {
            return Ok(());
        }
        self.out.push_json(index as usize, &v).map_err(|e| {
            *self.failed = Some(DataError::Element(e));
            E::custom("bad element")
        })
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Flat<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Flat<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a number, a boolean, or an array of them")
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        use serde::de::Error;
        if self.depth >= MAX_DATA_DEPTH {
            *self.failed = Some(DataError::Depth(format!(
                "data is nested deeper than {MAX_DATA_DEPTH} levels"
            )));
            return Err(A::Error::custom("too deep"));
        }
        loop {
            let inner = Flat {
                out: &mut *self.out,
                count: &mut *self.count,
                expected: self.expected,
                depth: self.depth + 1,
                failed: &mut *self.failed,
            };
            if seq.next_element_seed(inner)?.is_none() {
                return Ok(());
            }
        }
    }

    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<(), E> {
        self.scalar(Value::from(v))
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<(), E> {
        self.scalar(Value::from(v))
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<(), E> {
        self.scalar(Value::from(v))
    }
    fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<(), E> {
        self.scalar(Value::from(v))
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
        self.scalar(Value::from(v))
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        self.scalar(Value::Null)
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        let object = Value::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
        self.scalar(object)
    }
}

#[derive(Serialize)]
struct TensorOut<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [i64],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<BinarySize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<&'a TensorData>,
}

#[derive(Serialize)]
struct BinarySize {
    binary_data_size: usize,
}

#[derive(Serialize)]
struct ResponseOut<'a> {
    model_name: &'a str,
    model_version: &'a str,
    id: &'a str,
    outputs: Vec<TensorOut<'a>>,
}

/// Encodes a response. Each output is paired with whether it goes binary.
/// Returns the body and, when any output is binary, the length of the JSON
/// header (the value of `Inference-Header-Content-Length`).
pub fn encode_response(
    response: &InferResponse,
    binary: impl Fn(&Tensor) -> bool,
) -> (Vec<u8>, Option<usize>) {
    let mut tail = Vec::new();
    let mut outputs = Vec::with_capacity(response.outputs.len());
    for t in &response.outputs {
        if binary(t) {
            let before = tail.len();
            t.data.write_le_bytes(&mut tail);
            outputs.push(TensorOut {
                name: &t.name,
                datatype: t.datatype().as_str(),
                shape: &t.shape,
                parameters: Some(BinarySize {
                    binary_data_size: tail.len() - before,
                }),
                data: None,
            });
        } else {
            outputs.push(TensorOut {
                name: &t.name,
                datatype: t.datatype().as_str(),
                shape: &t.shape,
                parameters: None,
                data: Some(&t.data),
            });
        }
    }
    let mut body = serde_json::to_vec(&ResponseOut {
        model_name: &response.model_name,
        model_version: &response.model_version,
        id: &response.id,
        outputs,
    })
    .expect("a response always serialises");
    if tail.is_empty() && !response.outputs.iter().any(&binary) {
        return (body, None);
    }
    let json_len = body.len();
    body.extend_from_slice(&tail);
    (body, Some(json_len))
}

/// A remote's answer, rewritten to say which model and version answered.
pub struct Rewritten {
    pub body: Vec<u8>,
    pub json_len: Option<usize>,
    /// The answer's id (the client's, echoed by the remote) or the fallback.
    pub id: String,
    /// The first row's value of a `label` output, when the answer is JSON.
    pub class: Option<i64>,
}

/// Whether a request body may name the outputs it wants: its JSON part
/// holds the key `"outputs"` (or cannot be split from its binary part).
/// Cheap and conservative, for deciding without decoding whether a body can
/// be copied as it is; a tensor named "outputs" also says yes.
pub fn names_outputs(body: &[u8], header_len: Option<&str>) -> bool {
    const KEY: &[u8] = b"\"outputs\"";
    split_body(body, header_len).map_or(true, |(json, _)| json.windows(KEY.len()).any(|w| w == KEY))
}

/// The client's `id` in a request body's JSON part, read without decoding
/// the tensors (they are skipped); `None` when it names none. Only a body
/// holding the bytes `"id"` is read at all (this runs on every
/// passed-through request). Refused as the decoded path refuses it: an id
/// that is not a string, or not printable.
pub fn request_id(body: &[u8], header_len: Option<&str>) -> Result<Option<String>, ProtocolError> {
    #[derive(Deserialize)]
    struct Head {
        id: Option<String>,
    }
    let (json, _) = split_body(body, header_len)?;
    if memchr::memmem::find(json, b"\"id\"").is_none() {
        return Ok(None);
    }
    let head: Head = serde_json::from_slice(json).map_err(json_error)?;
    if let Some(id) = &head.id {
        check_id(id)?;
    }
    Ok(head.id)
}

/// Rewrites a passed-through answer's JSON header: `model_name` and
/// `model_version` become Ferry's, and its `id` is the request's (`id`,
/// sent with it: the client's or Ferry's own, whatever the remote said).
/// Binary tensor data after the header is kept as it is, and
/// so is every other member of the header, byte for byte and in its order:
/// only the id and the first value of a `label` output are read. The
/// header is read once, each member written out as it is met (this runs on
/// every passed-through request: a whole `Value` round trip cost 6 % of
/// it, a map of the members and a vector of the outputs 3 allocations per
/// member); the id is written last, once it is known. An answer that names
/// a member twice is refused: readers differ on which one counts.
pub fn rewrite_response(
    body: &[u8],
    header_len: Option<&str>,
    model: &str,
    version: &str,
    id: String,
) -> Result<Rewritten, ProtocolError> {
    use serde::de::DeserializeSeed;
    let (json, binary) = split_body(body, header_len)?;
    let mut out = Vec::with_capacity(json.len() + model.len() + version.len() + 80 + binary.len());
    out.extend_from_slice(b"{\"model_name\":");
    serde_json::to_writer(&mut out, model).expect("a string serialises");
    out.extend_from_slice(b",\"model_version\":");
    serde_json::to_writer(&mut out, version).expect("a string serialises");
    let mut de = serde_json::Deserializer::from_slice(json);
    let read = AnswerHead { out: &mut out }
        .deserialize(&mut de)
        .and_then(|read| de.end().map(|()| read))
        .map_err(|e| match e.classify() {
            serde_json::error::Category::Data => {
                ProtocolError::Json("the answer is not a JSON object".into())
            }
            _ => json_error(e),
        })?;
    if let Some(name) = read.repeated {
        // Readers of JSON differ on which of the two counts: the client
        // could be shown one and the label read from the other.
        return Err(ProtocolError::Json(format!(
            "the answer names the member \"{name}\" more than once"
        )));
    }
    match read.outputs {
        OutputsRead::Count(n) if n > 0 => {}
        OutputsRead::Count(_) => {
            return Err(ProtocolError::Json("the answer has no outputs".into()));
        }
        OutputsRead::Absent => {
            return Err(ProtocolError::Json(
                "the answer has no \"outputs\" member".into(),
            ));
        }
        OutputsRead::Malformed => {
            return Err(ProtocolError::Json(
                "the answer's \"outputs\" is not a list of named outputs".into(),
            ));
        }
    }
    out.extend_from_slice(b",\"id\":");
    serde_json::to_writer(&mut out, &id).expect("a string serialises");
    out.push(b'}');
    let json_len = (header_len.is_some()).then_some(out.len());
    out.extend_from_slice(binary);
    Ok(Rewritten {
        body: out,
        json_len,
        id,
        class: read.class,
    })
}

/// What [`rewrite_response`] reads of an answer's header while it copies
/// the other members.
struct HeadRead {
    class: Option<i64>,
    outputs: OutputsRead,
    /// A member named twice (readers of JSON differ on which one counts).
    repeated: Option<String>,
}

/// What an answer's `outputs` member was found to be.
enum OutputsRead {
    Absent,
    /// Not a list of objects that each have a `name`.
    Malformed,
    Count(usize),
}

/// The member names of one object so far: the first 16 in place (an
/// answer's header has a handful), any more in a set.
#[derive(Default)]
struct Names<'de> {
    first: [Option<std::borrow::Cow<'de, str>>; 16],
    more: std::collections::HashSet<std::borrow::Cow<'de, str>>,
}

impl<'de> Names<'de> {
    /// Whether `name` is new (then it is added).
    fn insert(&mut self, name: std::borrow::Cow<'de, str>) -> bool {
        let mut free = None;
        for (i, slot) in self.first.iter().enumerate() {
            match slot {
                Some(seen) if *seen == name => return false,
                Some(_) => {}
                None => {
                    free = Some(i);
                    break;
                }
            }
        }
        if self.more.contains(&*name) {
            return false;
        }
        match free {
            Some(i) => self.first[i] = Some(name),
            None => {
                self.more.insert(name);
            }
        }
        true
    }
}

/// Reads an answer's top-level object, appending each member but
/// `model_name`, `model_version` and `id` to `out` (after a comma) as it is.
struct AnswerHead<'o> {
    out: &'o mut Vec<u8>,
}

impl<'de> serde::de::DeserializeSeed<'de> for AnswerHead<'_> {
    type Value = HeadRead;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<HeadRead, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> serde::de::Visitor<'de> for AnswerHead<'_> {
    type Value = HeadRead;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<HeadRead, A::Error> {
        let mut read = HeadRead {
            class: None,
            outputs: OutputsRead::Absent,
            repeated: None,
        };
        let mut seen = Names::default();
        while let Some(Key(key)) = map.next_key()? {
            let value: &RawValue = map.next_value()?;
            // (A borrowed name's copy is free; an escaped one's is not, and
            // rare.)
            if read.repeated.is_none() && !seen.insert(key.clone()) {
                read.repeated = Some(key.chars().take(64).collect());
            }
            match &*key {
                // Ours replace them; the id is written last.
                "model_name" | "model_version" | "id" => {}
                other => {
                    if other == "outputs" {
                        (read.outputs, read.class) = match read_outputs(value.get()) {
                            Some((n, class)) => (OutputsRead::Count(n), class),
                            None => (OutputsRead::Malformed, None),
                        };
                    }
                    self.out.push(b',');
                    serde_json::to_writer(&mut *self.out, other).expect("a string serialises");
                    self.out.push(b':');
                    self.out.extend_from_slice(value.get().as_bytes());
                }
            }
        }
        Ok(read)
    }
}

/// A member's name, borrowed from the body unless it has escapes.
struct Key<'de>(std::borrow::Cow<'de, str>);

impl<'de: 'a, 'a> Deserialize<'de> for Key<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Name<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for Name<'a> {
            type Value = Key<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a member's name")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Key<'a>, E> {
                Ok(Key(std::borrow::Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Key<'a>, E> {
                Ok(Key(std::borrow::Cow::Owned(s.to_string())))
            }
        }
        d.deserialize_str(Name(std::marker::PhantomData))
    }
}

/// How many outputs an answer's `outputs` lists, and the first value of
/// the one named `label` when that is a JSON integer (a flat list's first
/// element); `None` when it is not a list of named outputs. Reads without
/// building the list.
fn read_outputs(outputs: &str) -> Option<(usize, Option<i64>)> {
    #[derive(Deserialize)]
    struct Output<'a> {
        #[serde(borrow)]
        name: Key<'a>,
        #[serde(borrow)]
        data: Option<&'a RawValue>,
    }
    struct Label;
    impl<'de> serde::de::Visitor<'de> for Label {
        type Value = (usize, Option<&'de RawValue>);
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list of outputs")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let (mut n, mut found) = (0, None);
            while let Some(o) = seq.next_element::<Output<'de>>()? {
                n += 1;
                if found.is_none() && o.name.0 == "label" {
                    found = Some(o.data);
                }
            }
            Ok((n, found.flatten()))
        }
    }
    struct First;
    impl<'de> serde::de::Visitor<'de> for First {
        type Value = Option<i64>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a list")
        }
        fn visit_seq<A: serde::de::SeqAccess<'de>>(
            self,
            mut seq: A,
        ) -> Result<Self::Value, A::Error> {
            let first = seq.next_element::<&RawValue>()?;
            while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
            Ok(first.and_then(|v| serde_json::from_str(v.get()).ok()))
        }
    }
    use serde::Deserializer as _;
    let (n, data) = serde_json::Deserializer::from_str(outputs)
        .deserialize_seq(Label)
        .ok()?;
    let label = data.and_then(|data| {
        serde_json::Deserializer::from_str(data.get())
            .deserialize_seq(First)
            .ok()
            .flatten()
    });
    Some((n, label))
}

/// Encodes a JSON request, as Ferry sends to a remote V2 server.
pub fn encode_request_json(id: Option<&str>, inputs: &[Tensor]) -> Vec<u8> {
    #[derive(Serialize)]
    struct RequestOut<'a> {
        #[serde(skip_serializing_if = "Option::is_none")]
        id: Option<&'a str>,
        inputs: Vec<TensorOut<'a>>,
    }
    let inputs = inputs
        .iter()
        .map(|t| TensorOut {
            name: &t.name,
            datatype: t.datatype().as_str(),
            shape: &t.shape,
            parameters: None,
            data: Some(&t.data),
        })
        .collect();
    serde_json::to_vec(&RequestOut { id, inputs }).expect("a request always serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_outputs_looks_at_the_json_part_only() {
        assert!(!names_outputs(br#"{"inputs": []}"#, None));
        assert!(names_outputs(
            br#"{"inputs": [], "outputs": [{"name": "label"}]}"#,
            None
        ));
        // The binary part is not JSON: the key there does not count.
        let mut body = br#"{"inputs": []}"#.to_vec();
        body.extend_from_slice(br#""outputs""#);
        assert!(!names_outputs(&body, Some("14")));
        assert!(names_outputs(&body, None));
        // A header length that does not fit: decode to get the real error.
        assert!(names_outputs(&body, Some("999")));
    }

    fn decode(s: &str) -> Result<InferRequest, ProtocolError> {
        decode_request(s.as_bytes(), None)
    }

    #[test]
    fn nested_and_flat_json_data_decode_alike() {
        let flat =
            decode(r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[1,2,3,4]}]}"#)
                .unwrap();
        let nested = decode(
            r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[[1,2],[3,4]]}]}"#,
        )
        .unwrap();
        assert_eq!(flat.inputs, nested.inputs);
        assert_eq!(
            flat.inputs[0].data,
            TensorData::Fp32(vec![1.0, 2.0, 3.0, 4.0])
        );
    }

    /// Found by the `v2_request` fuzz target: serde_json's default float
    /// parser is not correctly rounded, so an FP64 input could change by an
    /// ulp on decoding, and again when forwarded as JSON.
    #[test]
    fn fp64_values_decode_exactly_and_survive_forwarding() {
        let text = "23.219999954431332";
        let req = decode(&format!(
            r#"{{"inputs":[{{"name":"x","datatype":"FP64","shape":[1],"data":[{text}]}}]}}"#
        ))
        .unwrap();
        let exact: f64 = text.parse().unwrap();
        assert_eq!(req.inputs[0].data, TensorData::Fp64(vec![exact]));
        let forwarded = encode_request_json(None, &req.inputs);
        let again = decode_request(&forwarded, None).unwrap();
        assert_eq!(again.inputs, req.inputs);
    }

    #[test]
    fn element_count_mismatch_names_the_tensor() {
        let err =
            decode(r#"{"inputs":[{"name":"x","shape":[2,2],"datatype":"FP32","data":[1,2,3]}]}"#)
                .unwrap_err();
        assert_eq!(
            err.to_string(),
            "tensor \"x\": shape [2, 2] needs 4 elements but 3 were given"
        );
    }

    #[test]
    fn malformed_inputs_are_refused_with_reasons() {
        for (body, needle) in [
            ("{", "not a valid inference request"),
            (
                r#"{"inputs":[{"name":"x","shape":[1],"datatype":"BYTES","data":["a"]}]}"#,
                "BYTES",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[-1],"datatype":"FP32","data":[]}]}"#,
                "negative",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32"}]}"#,
                "has no data",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[1],"datatype":"INT8","data":[200]}]}"#,
                "not a valid INT8",
            ),
            (
                r#"{"inputs":[{"name":"x","shape":[1],"datatype":"FP32","data":[1]},{"name":"x","shape":[1],"datatype":"FP32","data":[1]}]}"#,
                "more than once",
            ),
        ] {
            let err = decode(body).unwrap_err().to_string();
            assert!(err.contains(needle), "{body}: {err}");
        }
        let deep = format!(
            r#"{{"inputs":[{{"name":"x","shape":[1],"datatype":"FP32","data":{}1{}}}]}}"#,
            "[".repeat(40),
            "]".repeat(40)
        );
        assert!(
            decode(&deep)
                .unwrap_err()
                .to_string()
                .contains("nested deeper")
        );
    }

    #[test]
    fn binary_request_decodes_and_checks_sizes() {
        let header = r#"{"inputs":[{"name":"x","shape":[2],"datatype":"FP32","parameters":{"binary_data_size":8}}],"parameters":{"binary_data_output":true}}"#;
        let mut body = header.as_bytes().to_vec();
        body.extend(1.5f32.to_le_bytes());
        body.extend(2.5f32.to_le_bytes());
        let len = header.len().to_string();
        let req = decode_request(&body, Some(&len)).unwrap();
        assert_eq!(req.inputs[0].data, TensorData::Fp32(vec![1.5, 2.5]));
        assert!(req.binary_output);
        // One byte short, one byte too many, and a bad header length.
        assert!(decode_request(&body[..body.len() - 1], Some(&len)).is_err());
        let mut longer = body.clone();
        longer.push(0);
        assert!(
            decode_request(&longer, Some(&len))
                .unwrap_err()
                .to_string()
                .contains("follow the last tensor")
        );
        assert!(matches!(
            decode_request(&body, Some("99999")),
            Err(ProtocolError::HeaderLength { .. })
        ));
    }

    #[test]
    fn a_passed_through_answer_is_renamed_and_keeps_its_binary_tail() {
        let head = br#"{"model_name":"remote-name","model_version":"9","outputs":[{"name":"label","datatype":"INT64","shape":[1],"parameters":{"binary_data_size":8}}]}"#;
        let mut body = head.to_vec();
        body.extend(1i64.to_le_bytes());
        let r = rewrite_response(
            &body,
            Some(&head.len().to_string()),
            "cancer",
            "2",
            "gen-1".into(),
        )
        .unwrap();
        let json_len = r.json_len.unwrap();
        let v: Value = serde_json::from_slice(&r.body[..json_len]).unwrap();
        assert_eq!(
            (
                v["model_name"].as_str(),
                v["model_version"].as_str(),
                v["id"].as_str()
            ),
            (Some("cancer"), Some("2"), Some("gen-1"))
        );
        assert_eq!(&r.body[json_len..], &1i64.to_le_bytes());
        assert_eq!(r.class, None, "binary data is not read");
        let json = br#"{"id":"c-1","outputs":[{"name":"label","datatype":"INT64","shape":[1],"data":[1]}]}"#;
        // The request's id wins over whatever the remote says.
        let r = rewrite_response(json, None, "cancer", "2", "mine".into()).unwrap();
        assert_eq!(
            (r.id.as_str(), r.class, r.json_len),
            ("mine", Some(1), None)
        );
        let v: Value = serde_json::from_slice(&r.body).unwrap();
        assert_eq!(v["id"], "mine");
        assert!(rewrite_response(b"[]", None, "m", "v", "x".into()).is_err());
    }

    #[test]
    fn a_requests_id_is_read_without_decoding_its_tensors() {
        let id = |body: &str| request_id(body.as_bytes(), None);
        assert_eq!(id(r#"{"inputs":[]}"#).unwrap(), None);
        assert_eq!(
            id(r#"{"id":"c-1","inputs":[{"data":[1,2]}]}"#)
                .unwrap()
                .as_deref(),
            Some("c-1")
        );
        assert_eq!(
            id(r#"{"inputs":[{"name":"id","data":[1]}]}"#).unwrap(),
            None
        );
        assert!(id(r#"{"id":7}"#).is_err(), "not a string");
        assert!(id(r#"{"id":"a\nb"}"#).is_err(), "not printable");
        // The binary part is not read.
        let mut body = br#"{"inputs":[]}"#.to_vec();
        body.extend_from_slice(br#""id""#);
        assert_eq!(request_id(&body, Some("13")).unwrap(), None);
    }

    #[test]
    fn a_rewritten_answer_keeps_every_other_member_as_it_was() {
        let json = br#"{"model_name":"r","id":"","parameters":{"x":[1,2.50]},
            "outputs":[{"name":"probabilities","data":[0.25]},{"name":"label","data":[7,3]}],
            "extra":"\u00e9"}"#;
        let r = rewrite_response(json, None, "can\"cer", "2", "gen-3".into()).unwrap();
        let text = String::from_utf8(r.body).unwrap();
        assert!(text.contains(r#""parameters":{"x":[1,2.50]}"#), "{text}");
        assert!(text.contains(r#""extra":"\u00e9""#), "{text}");
        let at = |key: &str| text.find(&format!("\"{key}\":")).unwrap();
        assert!(
            at("parameters") < at("outputs") && at("outputs") < at("extra"),
            "the members keep their order: {text}"
        );
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["model_name"], "can\"cer");
        assert_eq!(v["id"], "gen-3", "the remote's (empty) id is replaced");
        assert_eq!(v["outputs"][1]["data"], serde_json::json!([7, 3]));
        assert_eq!(v.as_object().unwrap().len(), 6);
        assert_eq!((r.id.as_str(), r.class), ("gen-3", Some(7)));
        let nested = br#"{"id":7,"outputs":[{"name":"label","data":[[1]]}]}"#;
        let r = rewrite_response(nested, None, "m", "v", "gen-4".into()).unwrap();
        assert_eq!((r.id.as_str(), r.class), ("gen-4", None));
        assert!(rewrite_response(b"{", None, "m", "v", "x".into()).is_err());
        // A member named twice, however it is written, and past the first
        // 16 names: refused, naming it.
        for twice in [
            r#"{"outputs":[{"name":"label","data":[1]}],"outputs":[{"name":"label","data":[2]}]}"#,
            r#"{"id":"a","\u0069d":"b"}"#,
            r#"{"model_name":"x","model_name":"y"}"#,
        ] {
            let e = rewrite_response(twice.as_bytes(), None, "m", "1", "g".into());
            assert!(
                matches!(&e, Err(ProtocolError::Json(m)) if m.contains("more than once")),
                "{twice}: {:?}",
                e.map(|r| r.id)
            );
        }
        let mut many: Vec<String> = (0..40).map(|i| format!(r#""k{i}":{i}"#)).collect();
        many.push(r#""outputs":[{"name":"p"}]"#.into());
        let ok = format!("{{{}}}", many.join(","));
        assert!(rewrite_response(ok.as_bytes(), None, "m", "1", "g".into()).is_ok());
        let late = format!(r#"{{{},"k3":0}}"#, many.join(","));
        assert!(rewrite_response(late.as_bytes(), None, "m", "1", "g".into()).is_err());
        let late = format!(r#"{{{},"k39":0}}"#, many.join(","));
        assert!(rewrite_response(late.as_bytes(), None, "m", "1", "g".into()).is_err());
        // An answer without outputs is no answer: refused, saying which way.
        for (answer, why) in [
            (r#"{"outputs":[]}"#, "the answer has no outputs"),
            (r#"{"id":"a"}"#, "the answer has no \"outputs\" member"),
            (
                r#"{"outputs":{"name":"label"}}"#,
                "the answer's \"outputs\" is not a list of named outputs",
            ),
            (
                r#"{"outputs":[{"data":[1]}]}"#,
                "the answer's \"outputs\" is not a list of named outputs",
            ),
        ] {
            let e = rewrite_response(answer.as_bytes(), None, "m", "1", "g".into());
            assert!(
                matches!(&e, Err(ProtocolError::Json(m)) if m == why),
                "{answer}: {:?}",
                e.map(|r| r.id)
            );
        }
    }

    #[test]
    fn response_encodes_binary_and_json_outputs_and_decodes_back() {
        let response = InferResponse {
            model_name: "m".into(),
            model_version: "1".into(),
            id: "r1".into(),
            outputs: vec![
                Tensor {
                    name: "label".into(),
                    shape: vec![2],
                    data: TensorData::Int64(vec![0, 1]),
                },
                Tensor {
                    name: "probabilities".into(),
                    shape: vec![2, 2],
                    data: TensorData::Fp32(vec![0.75, 0.25, 0.5, 0.5]),
                },
            ],
        };
        let (json_body, len) = encode_response(&response, |_| false);
        assert_eq!(len, None);
        assert_eq!(
            decode_response_json(&json_body, None).unwrap(),
            response.outputs
        );
        let (bin_body, len) = encode_response(&response, |t| t.name == "probabilities");
        let len = len.expect("binary output present");
        assert_eq!(bin_body.len(), len + 16);
        assert_eq!(
            decode_response_json(&bin_body, Some(&len.to_string())).unwrap(),
            response.outputs
        );
    }

    /// Property tests in the spirit of fuzzing, run on every `cargo test`:
    /// hostile bodies never panic the decoders, and whatever decodes is
    /// consistent (every tensor holds exactly the elements its shape says).
    mod hostile {
        use super::*;
        use proptest::prelude::*;
        use serde_json::json;

        const DATATYPES: &[&str] = &[
            "BOOL", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64",
            "FP16", "FP32", "FP64", "BYTES", "FP1024", "",
        ];

        fn json_value() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                any::<u64>().prop_map(Value::from),
                any::<f64>().prop_map(
                    |f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
                ),
                "[a-zA-Z0-9 ]{0,8}".prop_map(Value::from),
            ];
            leaf.prop_recursive(4, 32, 6, |inner| {
                prop::collection::vec(inner, 0..6).prop_map(Value::Array)
            })
        }

        fn tensor_json() -> impl Strategy<Value = Value> {
            (
                prop::sample::select(DATATYPES),
                prop::collection::vec(prop_oneof![-3i64..8, any::<i64>()], 0..4),
                prop::collection::vec(json_value(), 0..12),
                prop::option::of(0u64..64),
            )
                .prop_map(|(datatype, shape, data, binary_size)| {
                    let mut t =
                        json!({"name": "x", "datatype": datatype, "shape": shape, "data": data});
                    if let Some(n) = binary_size {
                        t["parameters"] = json!({"binary_data_size": n});
                        t.as_object_mut().unwrap().remove("data");
                    }
                    t
                })
        }

        fn check_consistent(req: &InferRequest) {
            for t in &req.inputs {
                let n = crate::protocol::tensor::element_count(&t.shape).unwrap();
                assert_eq!(
                    t.data.len() as u64,
                    n,
                    "tensor {} shape {:?}",
                    t.name,
                    t.shape
                );
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            #[test]
            fn arbitrary_bytes_never_panic(body in prop::collection::vec(any::<u8>(), 0..512), header in prop::option::of(0usize..600)) {
                let header = header.map(|h| h.to_string());
                if let Ok(req) = decode_request(&body, header.as_deref()) {
                    check_consistent(&req);
                }
                let _ = decode_response_json(&body, header.as_deref());
            }

            #[test]
            fn hostile_tensors_are_refused_or_consistent(inputs in prop::collection::vec(tensor_json(), 0..3), tail in prop::collection::vec(any::<u8>(), 0..96), lie in -8i64..8) {
                let header = serde_json::to_vec(&json!({"inputs": inputs})).unwrap();
                let mut body = header.clone();
                body.extend_from_slice(&tail);
                let len = (header.len() as i64 + lie).max(0).to_string();
                if let Ok(req) = decode_request(&body, Some(&len)) {
                    check_consistent(&req);
                }
                if let Ok(req) = decode_request(&header, None) {
                    check_consistent(&req);
                }
            }
        }
    }

    #[test]
    fn client_ids_are_short_and_printable_and_header_lengths_are_digits() {
        let body =
            |id: &str| serde_json::to_vec(&serde_json::json!({"id": id, "inputs": []})).unwrap();
        assert_eq!(
            decode_request(&body(&"x".repeat(256)), None)
                .unwrap()
                .id
                .unwrap()
                .len(),
            256
        );
        assert_eq!(
            decode_request(&body(""), None).unwrap().id,
            None,
            "empty: Ferry makes one"
        );
        for bad in [
            "x".repeat(257),
            "a\u{7f}b".into(),
            "tab\there".into(),
            "é".into(),
        ] {
            assert!(
                matches!(decode_request(&body(&bad), None), Err(ProtocolError::Id(_))),
                "{bad:?}"
            );
        }
        let json = br#"{"inputs":[]}"#;
        assert!(decode_request(json, Some("13")).is_ok());
        for bad in ["+13", "-0", " ", "1_3", "0x0d"] {
            assert!(
                matches!(
                    decode_request(json, Some(bad)),
                    Err(ProtocolError::HeaderLength { .. })
                ),
                "{bad:?}"
            );
        }
    }
}
