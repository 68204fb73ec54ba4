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
    check(&mut Memory { buf: model, at: 0 }, model.len() as u64)
}

/// [`check_self_contained`] of a model file, read as the walk goes: the
/// tensors' data is skipped, never loaded, so a large model costs a read
/// buffer.
pub fn check_file(path: &std::path::Path) -> std::io::Result<Result<(), NotSelfContained>> {
    let file = std::fs::File::open(path)?;
    let len = file.metadata()?.len();
    let mut input = Reader {
        file: std::io::BufReader::with_capacity(64 << 10, file),
        at: 0,
        len,
        failed: None,
    };
    let verdict = check(&mut input, len);
    match input.failed {
        Some(e) => Err(e),
        None => Ok(verdict),
    }
}

fn check(input: &mut dyn Input, len: u64) -> Result<(), NotSelfContained> {
    // ONNX Runtime also loads its own flatbuffer format, recognised by the
    // file identifier "ORTM" after the root offset.
    let head = input.take(8.min(len as usize), 8);
    if head.as_ref().is_ok_and(|h| h.get(4..8) == Some(b"ORTM")) {
        return Err(NotSelfContained::OrtFormat);
    }
    if input.rewind().is_err() {
        return Ok(());
    }
    match walk(input, len, Kind::Model, 0) {
        Ok(()) | Err(Stop::Malformed) => Ok(()),
        Err(Stop::Found(why)) => Err(why),
    }
}

enum Stop {
    Found(NotSelfContained),
    Malformed,
}

/// What the walk reads: bytes in memory, or a file read as it goes.
trait Input {
    fn byte(&mut self) -> Result<u8, Stop>;
    fn skip(&mut self, n: u64) -> Result<(), Stop>;
    /// The next `n` bytes, of which at most the first `keep` are returned
    /// (the rest skipped): names and locations, never tensor data.
    fn take(&mut self, n: usize, keep: usize) -> Result<Vec<u8>, Stop>;
    /// Bytes read so far.
    fn at(&self) -> u64;
    fn rewind(&mut self) -> Result<(), Stop>;
}

struct Memory<'a> {
    buf: &'a [u8],
    at: usize,
}

impl Input for Memory<'_> {
    fn byte(&mut self) -> Result<u8, Stop> {
        let b = *self.buf.get(self.at).ok_or(Stop::Malformed)?;
        self.at += 1;
        Ok(b)
    }
    fn skip(&mut self, n: u64) -> Result<(), Stop> {
        let to = usize::try_from(n)
            .ok()
            .and_then(|n| self.at.checked_add(n))
            .filter(|to| *to <= self.buf.len())
            .ok_or(Stop::Malformed)?;
        self.at = to;
        Ok(())
    }
    fn take(&mut self, n: usize, keep: usize) -> Result<Vec<u8>, Stop> {
        let start = self.at;
        self.skip(n as u64)?;
        Ok(self.buf[start..start + n.min(keep)].to_vec())
    }
    fn at(&self) -> u64 {
        self.at as u64
    }
    fn rewind(&mut self) -> Result<(), Stop> {
        self.at = 0;
        Ok(())
    }
}

struct Reader {
    file: std::io::BufReader<std::fs::File>,
    at: u64,
    len: u64,
    /// A read error (not a malformed file): the caller reports it.
    failed: Option<std::io::Error>,
}

impl Reader {
    fn io<T>(&mut self, r: std::io::Result<T>) -> Result<T, Stop> {
        r.map_err(|e| {
            self.failed = Some(e);
            Stop::Malformed
        })
    }
}

impl Input for Reader {
    fn byte(&mut self) -> Result<u8, Stop> {
        use std::io::Read;
        if self.at >= self.len {
            return Err(Stop::Malformed);
        }
        let mut b = [0u8; 1];
        let read = self.file.read_exact(&mut b);
        self.io(read)?;
        self.at += 1;
        Ok(b[0])
    }
    fn skip(&mut self, n: u64) -> Result<(), Stop> {
        let to = self
            .at
            .checked_add(n)
            .filter(|to| *to <= self.len)
            .ok_or(Stop::Malformed)?;
        let step = i64::try_from(n).map_err(|_| Stop::Malformed)?;
        let sought = self.file.seek_relative(step);
        self.io(sought)?;
        self.at = to;
        Ok(())
    }
    fn take(&mut self, n: usize, keep: usize) -> Result<Vec<u8>, Stop> {
        use std::io::Read;
        if self.at.saturating_add(n as u64) > self.len {
            return Err(Stop::Malformed);
        }
        let mut out = vec![0u8; n.min(keep)];
        let read = self.file.read_exact(&mut out);
        self.io(read)?;
        self.at += out.len() as u64;
        self.skip((n - out.len()) as u64)?;
        Ok(out)
    }
    fn at(&self) -> u64 {
        self.at
    }
    fn rewind(&mut self) -> Result<(), Stop> {
        use std::io::Seek;
        let rewound = self.file.rewind();
        self.io(rewound)?;
        self.at = 0;
        Ok(())
    }
}

/// The longest name or location kept for a message.
const KEEP: usize = 4096;

fn walk(input: &mut dyn Input, end: u64, kind: Kind, depth: usize) -> Result<(), Stop> {
    if depth > MAX_DEPTH {
        return Err(Stop::Found(NotSelfContained::TooDeep));
    }
    let mut name = None;
    let mut external = false;
    let mut location = None;
    while input.at() < end {
        let tag = varint(input)?;
        let field = tag >> 3;
        if field == 0 {
            return Err(Stop::Malformed);
        }
        match tag & 7 {
            0 => {
                let value = varint(input)?;
                if matches!(kind, Kind::Tensor) && field == 14 && value == 1 {
                    external = true;
                }
            }
            1 => input.skip(8)?,
            5 => input.skip(4)?,
            3 => skip_group(input, field, 0)?,
            2 => {
                let len = varint(input)?;
                let stop = input
                    .at()
                    .checked_add(len)
                    .filter(|s| *s <= end)
                    .ok_or(Stop::Malformed)?;
                let len = usize::try_from(len).map_err(|_| Stop::Malformed)?;
                match (kind, field) {
                    (Kind::Tensor, 8) => {
                        name = Some(String::from_utf8_lossy(&input.take(len, KEEP)?).into_owned())
                    }
                    (Kind::Tensor, 13) => {
                        external = true;
                        if let Some(value) = location_entry(&input.take(len, KEEP)?) {
                            location = Some(value);
                        }
                    }
                    _ => match kind.child(field) {
                        Some(child) => walk(input, stop, child, depth + 1)?,
                        None => input.skip(len as u64)?,
                    },
                }
                if input.at() != stop {
                    return Err(Stop::Malformed);
                }
            }
            _ => return Err(Stop::Malformed),
        }
    }
    if input.at() != end {
        return Err(Stop::Malformed);
    }
    if external {
        return Err(Stop::Found(NotSelfContained::ExternalData {
            tensor: name.unwrap_or_default(),
            location,
        }));
    }
    Ok(())
}

/// The value of a `StringStringEntryProto` (key 1, value 2) whose key is
/// `location`.
fn location_entry(entry: &[u8]) -> Option<String> {
    let input = &mut Memory { buf: entry, at: 0 };
    let (mut key, mut value) = (None, None);
    while input.at < entry.len() {
        let tag = varint(input).ok()?;
        match tag & 7 {
            2 => {
                let len = usize::try_from(varint(input).ok()?).ok()?;
                let bytes = input.take(len, KEEP).ok()?;
                match tag >> 3 {
                    1 => key = Some(bytes),
                    2 => value = Some(bytes),
                    _ => {}
                }
            }
            0 => {
                varint(input).ok()?;
            }
            _ => return None,
        }
    }
    value
        .filter(|_| key.as_deref() == Some(b"location".as_slice()))
        .map(|v| String::from_utf8_lossy(&v).into_owned())
}

/// Skips a (deprecated) group up to its end tag; groups cannot hold ONNX
/// messages, but a valid file may carry one in an unknown field.
fn skip_group(input: &mut dyn Input, field: u64, depth: usize) -> Result<(), Stop> {
    if depth > MAX_DEPTH {
        return Err(Stop::Malformed);
    }
    loop {
        let tag = varint(input)?;
        match tag & 7 {
            0 => {
                varint(input)?;
            }
            1 => input.skip(8)?,
            2 => {
                let len = varint(input)?;
                input.skip(len)?;
            }
            3 => skip_group(input, tag >> 3, depth + 1)?,
            4 if tag >> 3 == field => return Ok(()),
            5 => input.skip(4)?,
            _ => return Err(Stop::Malformed),
        }
    }
}

fn varint(input: &mut dyn Input) -> Result<u64, Stop> {
    let mut value = 0u64;
    for i in 0..10 {
        let byte = input.byte()?;
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

    #[test]
    fn a_file_is_checked_as_it_is_read_like_bytes_in_memory() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, bytes: &[u8]| {
            let path = dir.path().join(name);
            std::fs::write(&path, bytes).unwrap();
            path
        };
        let inner = graph_with_initializer(&tensor("w", Some("secret.bin")));
        let hidden = model(&msg(1, &node_with_attribute(6, &inner)));
        assert_eq!(
            check_file(&write("hidden.onnx", &hidden)).unwrap(),
            check_self_contained(&hidden)
        );
        assert!(check_file(&write("hidden.onnx", &hidden)).unwrap().is_err());
        let clean = model(&graph_with_initializer(&tensor("w", None)));
        assert!(check_file(&write("clean.onnx", &clean)).unwrap().is_ok());
        assert!(check_file(&write("garbage", &[0xff; 100])).unwrap().is_ok());
        assert!(check_file(&dir.path().join("missing")).is_err());
    }
}
