//! What Ferry checks in an ONNX file before ONNX Runtime sees it: that the
//! model is self-contained. A tensor whose data lives in an external file
//! (`TensorProto.data_location = EXTERNAL`, `external_data` entries naming a
//! path) would be read by ONNX Runtime from a path relative to the server's
//! working directory: bytes the artifact digest does not cover, and a way
//! for whoever may register a model to read files off the host.
//!
//! The check walks the protobuf wire format directly, by field number, and
//! only into the messages that can hold tensors (graphs, nodes, attributes,
//! functions, training graphs, sparse tensors); every other field is
//! skipped without being copied, so a model's weights are never duplicated.
//! Pure: bytes in, verdict out. A file that is not valid protobuf is not
//! this module's to refuse: ONNX Runtime refuses it with its own message.

/// How deep messages may nest (graph → node → attribute → graph is three
/// levels): protobuf's own default recursion limit, so a model nested
/// deeper than this is one ONNX Runtime's parser refuses as well.
pub const MAX_DEPTH: usize = 100;

/// Why a model is not self-contained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotSelfContained {
    /// A tensor keeps its data in an external file.
    ExternalData {
        tensor: String,
        location: Option<String>,
    },
    /// Messages nest deeper than [`MAX_DEPTH`], where the walk stops looking.
    TooDeep,
    /// An ONNX Runtime format (`.ort`) file: a flatbuffer, whose tensors may
    /// also point outside the file, and which this check does not read.
    OrtFormat,
}

impl std::fmt::Display for NotSelfContained {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NotSelfContained::ExternalData { tensor, location } => {
                let tensor: String = tensor.chars().take(64).collect();
                write!(
                    f,
                    "initializer {tensor:?} keeps its data in an external file"
                )?;
                if let Some(location) = location {
                    let location: String = location.chars().take(128).collect();
                    write!(f, " ({location:?})")?;
                }
                write!(
                    f,
                    "; Ferry stores a model as one self-contained file whose every byte is digested: \
                     re-export it with the data inside (onnx.save_model(..., save_as_external_data=False)), \
                     or onnx.load it with load_external_data=True and save it again"
                )
            }
            NotSelfContained::TooDeep => write!(
                f,
                "the model's graphs nest deeper than {MAX_DEPTH} protobuf levels, more than Ferry checks; \
                 flatten its subgraphs (If/Loop/Scan bodies)"
            ),
            NotSelfContained::OrtFormat => write!(
                f,
                "this is an ONNX Runtime format (.ort) file; Ferry serves ONNX files (.onnx), whose \
                 tensors it checks stay inside the file: register the .onnx model it was converted from"
            ),
        }
    }
}

/// The messages the walk enters, by what their fields hold.
#[derive(Clone, Copy)]
enum Kind {
    Model,
    TrainingInfo,
    Function,
    Graph,
    Node,
    Attribute,
    Sparse,
    Tensor,
}

impl Kind {
    /// The message a length-delimited field of this kind holds, when it is
    /// one that can lead to a tensor (field numbers from onnx.proto).
    fn child(self, field: u64) -> Option<Kind> {
        use Kind::*;
        Some(match (self, field) {
            (Model, 7) => Graph,
            (Model, 20) => TrainingInfo,
            (Model, 25) => Function,
            (TrainingInfo, 1 | 2) => Graph,
            (Function, 7) => Node,
            (Function, 11) => Attribute,
            (Graph, 1) => Node,
            (Graph, 5) => Tensor,
            (Graph, 15) => Sparse,
            (Node, 5) => Attribute,
            (Attribute, 5 | 10) => Tensor,
            (Attribute, 6 | 11) => Graph,
            (Attribute, 22 | 23) => Sparse,
            (Sparse, 1 | 2) => Tensor,
            _ => return None,
        })
    }
}

/// Checks that every tensor of an ONNX `ModelProto` keeps its data inside
/// the file. `Ok` also for bytes that are not valid protobuf (see the
/// module's doc).
pub fn check_self_contained(model: &[u8]) -> Result<(), NotSelfContained> {
    // ONNX Runtime also loads its own flatbuffer format, recognised by the
    // file identifier "ORTM" after the root offset.
    if model.get(4..8) == Some(b"ORTM") {
        return Err(NotSelfContained::OrtFormat);
    }
    match walk(model, Kind::Model, 0) {
        Ok(()) | Err(Stop::Malformed) => Ok(()),
        Err(Stop::Found(why)) => Err(why),
    }
}

enum Stop {
    Found(NotSelfContained),
    Malformed,
}

fn walk(mut buf: &[u8], kind: Kind, depth: usize) -> Result<(), Stop> {
    if depth > MAX_DEPTH {
        return Err(Stop::Found(NotSelfContained::TooDeep));
    }
    let mut name = None;
    let mut external = false;
    let mut location = None;
    while !buf.is_empty() {
        let (field, value) = next_field(&mut buf)?;
        match (kind, field, value) {
            (Kind::Tensor, 8, Value::Bytes(b)) => name = Some(String::from_utf8_lossy(b)),
            (Kind::Tensor, 14, Value::Varint(1)) => external = true,
            (Kind::Tensor, 13, Value::Bytes(entry)) => {
                external = true;
                if let Some(value) = location_entry(entry)? {
                    location = Some(String::from_utf8_lossy(value).into_owned());
                }
            }
            (_, _, Value::Bytes(b)) => {
                if let Some(child) = kind.child(field) {
                    walk(b, child, depth + 1)?;
                }
            }
            _ => {}
        }
    }
    if external {
        return Err(Stop::Found(NotSelfContained::ExternalData {
            tensor: name.unwrap_or_default().into_owned(),
            location,
        }));
    }
    Ok(())
}

/// The value of a `StringStringEntryProto` (key 1, value 2) whose key is
/// `location`.
fn location_entry(mut buf: &[u8]) -> Result<Option<&[u8]>, Stop> {
    let (mut key, mut value) = (None, None);
    while !buf.is_empty() {
        match next_field(&mut buf)? {
            (1, Value::Bytes(b)) => key = Some(b),
            (2, Value::Bytes(b)) => value = Some(b),
            _ => {}
        }
    }
    Ok(value.filter(|_| key == Some(b"location".as_slice())))
}

enum Value<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Other,
}

/// Reads one field (its number and value) off the front of `buf`.
fn next_field<'a>(buf: &mut &'a [u8]) -> Result<(u64, Value<'a>), Stop> {
    let tag = varint(buf)?;
    let field = tag >> 3;
    if field == 0 {
        return Err(Stop::Malformed);
    }
    let value = match tag & 7 {
        0 => Value::Varint(varint(buf)?),
        1 => {
            skip(buf, 8)?;
            Value::Other
        }
        2 => {
            let len = usize::try_from(varint(buf)?).map_err(|_| Stop::Malformed)?;
            let (bytes, rest) = buf.split_at_checked(len).ok_or(Stop::Malformed)?;
            *buf = rest;
            Value::Bytes(bytes)
        }
        3 => {
            skip_group(buf, field, 0)?;
            Value::Other
        }
        5 => {
            skip(buf, 4)?;
            Value::Other
        }
        _ => return Err(Stop::Malformed),
    };
    Ok((field, value))
}

/// Skips a (deprecated) group up to its end tag; groups cannot hold ONNX
/// messages, but a valid file may carry one in an unknown field.
fn skip_group(buf: &mut &[u8], field: u64, depth: usize) -> Result<(), Stop> {
    if depth > MAX_DEPTH {
        return Err(Stop::Malformed);
    }
    loop {
        let tag = varint(buf)?;
        match tag & 7 {
            0 => {
                varint(buf)?;
            }
            1 => skip(buf, 8)?,
            2 => {
                let len = usize::try_from(varint(buf)?).map_err(|_| Stop::Malformed)?;
                skip(buf, len)?;
            }
            3 => skip_group(buf, tag >> 3, depth + 1)?,
            4 if tag >> 3 == field => return Ok(()),
            5 => skip(buf, 4)?,
            _ => return Err(Stop::Malformed),
        }
    }
}

fn skip(buf: &mut &[u8], n: usize) -> Result<(), Stop> {
    *buf = buf.get(n..).ok_or(Stop::Malformed)?;
    Ok(())
}

fn varint(buf: &mut &[u8]) -> Result<u64, Stop> {
    let mut value = 0u64;
    for i in 0..10 {
        let (&byte, rest) = buf.split_first().ok_or(Stop::Malformed)?;
        *buf = rest;
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(Stop::Malformed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn varint_bytes(mut v: u64, out: &mut Vec<u8>) {
        while v >= 0x80 {
            out.push((v as u8) | 0x80);
            v >>= 7;
        }
        out.push(v as u8);
    }

    /// A length-delimited field.
    fn msg(field: u64, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        varint_bytes(field << 3 | 2, &mut out);
        varint_bytes(body.len() as u64, &mut out);
        out.extend_from_slice(body);
        out
    }

    fn int(field: u64, v: u64) -> Vec<u8> {
        let mut out = Vec::new();
        varint_bytes(field << 3, &mut out);
        varint_bytes(v, &mut out);
        out
    }

    /// A TensorProto named `name` with raw data, external when `location` is given.
    fn tensor(name: &str, location: Option<&str>) -> Vec<u8> {
        let mut t = [int(2, 1), msg(8, name.as_bytes()), msg(9, &[0; 16])].concat();
        if let Some(location) = location {
            let entry = [msg(1, b"location"), msg(2, location.as_bytes())].concat();
            t.extend(msg(13, &entry));
            t.extend(int(14, 1));
        }
        t
    }

    fn graph_with_initializer(t: &[u8]) -> Vec<u8> {
        [msg(2, b"g"), msg(5, t)].concat()
    }

    fn model(graph: &[u8]) -> Vec<u8> {
        [int(1, 8), msg(7, graph)].concat()
    }

    /// A node whose attribute (field `attr_field`) holds `value`.
    fn node_with_attribute(attr_field: u64, value: &[u8]) -> Vec<u8> {
        let attribute = [msg(1, b"body"), msg(attr_field, value)].concat();
        [msg(4, b"Loop"), msg(5, &attribute)].concat()
    }

    fn external(tensor: &str, location: &str) -> Result<(), NotSelfContained> {
        Err(NotSelfContained::ExternalData {
            tensor: tensor.into(),
            location: Some(location.into()),
        })
    }

    #[test]
    fn a_self_contained_model_passes_and_an_external_initializer_is_named() {
        let inside = model(&graph_with_initializer(&tensor("w", None)));
        assert_eq!(check_self_contained(&inside), Ok(()));
        let outside = model(&graph_with_initializer(&tensor("w", Some("secret.bin"))));
        assert_eq!(check_self_contained(&outside), external("w", "secret.bin"));
        let shown = check_self_contained(&outside).unwrap_err().to_string();
        assert!(
            shown.starts_with(
                "initializer \"w\" keeps its data in an external file (\"secret.bin\")"
            ) && shown.contains("save_as_external_data=False"),
            "{shown}"
        );
    }

    #[test]
    fn data_location_alone_or_entries_alone_count_as_external() {
        let flag_only = [msg(8, b"w"), int(14, 1)].concat();
        assert!(check_self_contained(&model(&graph_with_initializer(&flag_only))).is_err());
        let entry = [msg(1, b"location"), msg(2, b"x")].concat();
        let entries_only = [msg(8, b"w"), msg(13, &entry)].concat();
        assert_eq!(
            check_self_contained(&model(&graph_with_initializer(&entries_only))),
            external("w", "x")
        );
    }

    #[test]
    fn nested_subgraphs_sparse_tensors_and_function_bodies_are_walked() {
        let hidden = tensor("deep", Some("sub/dir/secret.bin"));
        // A Loop body (attribute g) whose own node holds a tensor attribute (t).
        let inner = msg(1, &node_with_attribute(5, &hidden));
        let outer = msg(1, &node_with_attribute(6, &inner));
        assert_eq!(
            check_self_contained(&model(&outer)),
            external("deep", "sub/dir/secret.bin")
        );
        // graphs (11) and tensors (10), repeated attribute fields.
        let repeated = msg(
            1,
            &node_with_attribute(11, &msg(1, &node_with_attribute(10, &hidden))),
        );
        assert!(check_self_contained(&model(&repeated)).is_err());
        // A sparse initializer's values.
        let sparse = msg(15, &msg(1, &hidden));
        assert!(check_self_contained(&model(&sparse)).is_err());
        // A sparse tensor attribute's indices.
        let sparse_attr = msg(1, &node_with_attribute(22, &msg(2, &hidden)));
        assert!(check_self_contained(&model(&sparse_attr)).is_err());
        // A function body's node (ModelProto.functions → FunctionProto.node).
        let function = [msg(1, b"f"), msg(7, &node_with_attribute(5, &hidden))].concat();
        let with_function = [
            model(&graph_with_initializer(&tensor("w", None))),
            msg(25, &function),
        ]
        .concat();
        assert_eq!(
            check_self_contained(&with_function),
            external("deep", "sub/dir/secret.bin")
        );
        // Training graphs (ModelProto.training_info → initialization).
        let training = msg(20, &msg(1, &graph_with_initializer(&hidden)));
        assert!(check_self_contained(&[model(&[]), training].concat()).is_err());
    }

    #[test]
    fn unknown_fields_and_groups_are_skipped_not_trusted() {
        // A group in an unknown field, then the external tensor.
        let mut graph = Vec::new();
        varint_bytes(99 << 3 | 3, &mut graph);
        graph.extend(int(1, 5));
        varint_bytes(99 << 3 | 4, &mut graph);
        graph.extend(msg(5, &tensor("w", Some("s"))));
        assert_eq!(check_self_contained(&model(&graph)), external("w", "s"));
        // Fixed-width fields elsewhere are skipped.
        let mut fixed = vec![(3 << 3 | 5) as u8, 0, 0, 0, 0, (4 << 3 | 1) as u8];
        fixed.extend([0; 8]);
        fixed.extend(graph_with_initializer(&tensor("w", None)));
        assert_eq!(check_self_contained(&model(&fixed)), Ok(()));
    }

    #[test]
    fn nesting_is_bounded_and_garbage_is_left_to_onnx_runtime() {
        let mut graph = graph_with_initializer(&tensor("w", None));
        for _ in 0..40 {
            graph = msg(1, &node_with_attribute(6, &graph));
        }
        assert_eq!(
            check_self_contained(&model(&graph)),
            Err(NotSelfContained::TooDeep)
        );
        assert_eq!(check_self_contained(b"this is not an onnx model"), Ok(()));
        assert_eq!(check_self_contained(&[0xff; 20]), Ok(()));
        // A length that runs past the end.
        assert_eq!(check_self_contained(&[7 << 3 | 2, 0x7f, 1, 2]), Ok(()));
    }

    #[test]
    fn onnx_runtime_format_files_are_refused() {
        let mut ort = vec![0x1c, 0, 0, 0];
        ort.extend_from_slice(b"ORTM");
        ort.extend_from_slice(&[0; 32]);
        assert!(matches!(
            check_self_contained(&ort),
            Err(NotSelfContained::OrtFormat)
        ));
        assert!(
            check_self_contained(b"\x08\x07").is_ok(),
            "an ONNX model's first bytes"
        );
    }
}
