//! Typed tensors: the V2 datatypes Ferry serves and their element storage.

use half::f16;
use serde::ser::{Serialize, SerializeSeq, Serializer};
use serde_json::Value;

/// A V2 tensor datatype that Ferry can carry (BYTES and others are refused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "&'static str")]
pub enum DataType {
    Bool,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp16,
    Fp32,
    Fp64,
}

impl DataType {
    pub const ALL: [DataType; 12] = [
        DataType::Bool,
        DataType::Uint8,
        DataType::Uint16,
        DataType::Uint32,
        DataType::Uint64,
        DataType::Int8,
        DataType::Int16,
        DataType::Int32,
        DataType::Int64,
        DataType::Fp16,
        DataType::Fp32,
        DataType::Fp64,
    ];

    /// The V2 name, e.g. `FP32`.
    pub fn as_str(self) -> &'static str {
        match self {
            DataType::Bool => "BOOL",
            DataType::Uint8 => "UINT8",
            DataType::Uint16 => "UINT16",
            DataType::Uint32 => "UINT32",
            DataType::Uint64 => "UINT64",
            DataType::Int8 => "INT8",
            DataType::Int16 => "INT16",
            DataType::Int32 => "INT32",
            DataType::Int64 => "INT64",
            DataType::Fp16 => "FP16",
            DataType::Fp32 => "FP32",
            DataType::Fp64 => "FP64",
        }
    }

    pub fn parse(name: &str) -> Option<DataType> {
        DataType::ALL.into_iter().find(|d| d.as_str() == name)
    }

    /// Bytes per element in the binary tensor data extension.
    pub fn byte_size(self) -> usize {
        match self {
            DataType::Bool | DataType::Uint8 | DataType::Int8 => 1,
            DataType::Uint16 | DataType::Int16 | DataType::Fp16 => 2,
            DataType::Uint32 | DataType::Int32 | DataType::Fp32 => 4,
            DataType::Uint64 | DataType::Int64 | DataType::Fp64 => 8,
        }
    }
}

impl std::fmt::Display for DataType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl TryFrom<String> for DataType {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        DataType::parse(&s).ok_or_else(|| format!("unsupported datatype {s:?}"))
    }
}

impl From<DataType> for &'static str {
    fn from(d: DataType) -> &'static str {
        d.as_str()
    }
}

/// The elements of a tensor, row-major, in their native type.
#[derive(Debug, Clone, PartialEq)]
pub enum TensorData {
    Bool(Vec<bool>),
    Uint8(Vec<u8>),
    Uint16(Vec<u16>),
    Uint32(Vec<u32>),
    Uint64(Vec<u64>),
    Int8(Vec<i8>),
    Int16(Vec<i16>),
    Int32(Vec<i32>),
    Int64(Vec<i64>),
    Fp16(Vec<f16>),
    Fp32(Vec<f32>),
    Fp64(Vec<f64>),
}

/// Applies `$body` to the vector inside any variant, bound as `$v`.
macro_rules! each_variant {
    ($data:expr, $v:ident => $body:expr) => {
        match $data {
            TensorData::Bool($v) => $body,
            TensorData::Uint8($v) => $body,
            TensorData::Uint16($v) => $body,
            TensorData::Uint32($v) => $body,
            TensorData::Uint64($v) => $body,
            TensorData::Int8($v) => $body,
            TensorData::Int16($v) => $body,
            TensorData::Int32($v) => $body,
            TensorData::Int64($v) => $body,
            TensorData::Fp16($v) => $body,
            TensorData::Fp32($v) => $body,
            TensorData::Fp64($v) => $body,
        }
    };
}
pub(crate) use each_variant;

/// Why one element could not be read: the caller adds the tensor's name.
#[derive(Debug)]
pub struct BadElement {
    pub index: usize,
    pub value: String,
}

impl TensorData {
    pub fn datatype(&self) -> DataType {
        match self {
            TensorData::Bool(_) => DataType::Bool,
            TensorData::Uint8(_) => DataType::Uint8,
            TensorData::Uint16(_) => DataType::Uint16,
            TensorData::Uint32(_) => DataType::Uint32,
            TensorData::Uint64(_) => DataType::Uint64,
            TensorData::Int8(_) => DataType::Int8,
            TensorData::Int16(_) => DataType::Int16,
            TensorData::Int32(_) => DataType::Int32,
            TensorData::Int64(_) => DataType::Int64,
            TensorData::Fp16(_) => DataType::Fp16,
            TensorData::Fp32(_) => DataType::Fp32,
            TensorData::Fp64(_) => DataType::Fp64,
        }
    }

    pub fn len(&self) -> usize {
        each_variant!(self, v => v.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `n` zero elements (`false` for BOOL): the warm-up input.
    pub fn zeros(datatype: DataType, n: usize) -> TensorData {
        match datatype {
            DataType::Bool => TensorData::Bool(vec![false; n]),
            DataType::Uint8 => TensorData::Uint8(vec![0; n]),
            DataType::Uint16 => TensorData::Uint16(vec![0; n]),
            DataType::Uint32 => TensorData::Uint32(vec![0; n]),
            DataType::Uint64 => TensorData::Uint64(vec![0; n]),
            DataType::Int8 => TensorData::Int8(vec![0; n]),
            DataType::Int16 => TensorData::Int16(vec![0; n]),
            DataType::Int32 => TensorData::Int32(vec![0; n]),
            DataType::Int64 => TensorData::Int64(vec![0; n]),
            DataType::Fp16 => TensorData::Fp16(vec![f16::ZERO; n]),
            DataType::Fp32 => TensorData::Fp32(vec![0.0; n]),
            DataType::Fp64 => TensorData::Fp64(vec![0.0; n]),
        }
    }

    /// Reads little-endian elements (the binary tensor data extension).
    /// `bytes.len()` must be a multiple of the element size.
    pub fn from_le_bytes(datatype: DataType, bytes: &[u8]) -> Result<TensorData, BadElement> {
        macro_rules! read {
            ($variant:ident, $t:ty) => {
                TensorData::$variant(
                    bytes
                        .chunks_exact(size_of::<$t>())
                        .map(|c| <$t>::from_le_bytes(c.try_into().expect("exact chunk")))
                        .collect(),
                )
            };
        }
        Ok(match datatype {
            DataType::Bool => {
                let mut out = Vec::with_capacity(bytes.len());
                for (index, b) in bytes.iter().enumerate() {
                    match b {
                        0 => out.push(false),
                        1 => out.push(true),
                        other => {
                            return Err(BadElement {
                                index,
                                value: format!("byte {other}"),
                            });
                        }
                    }
                }
                TensorData::Bool(out)
            }
            DataType::Uint8 => TensorData::Uint8(bytes.to_vec()),
            DataType::Int8 => TensorData::Int8(bytes.iter().map(|b| *b as i8).collect()),
            DataType::Uint16 => read!(Uint16, u16),
            DataType::Uint32 => read!(Uint32, u32),
            DataType::Uint64 => read!(Uint64, u64),
            DataType::Int16 => read!(Int16, i16),
            DataType::Int32 => read!(Int32, i32),
            DataType::Int64 => read!(Int64, i64),
            DataType::Fp16 => read!(Fp16, f16),
            DataType::Fp32 => read!(Fp32, f32),
            DataType::Fp64 => read!(Fp64, f64),
        })
    }

    /// Appends the elements little-endian (the binary tensor data extension).
    pub fn write_le_bytes(&self, out: &mut Vec<u8>) {
        match self {
            TensorData::Bool(v) => out.extend(v.iter().map(|b| *b as u8)),
            TensorData::Uint8(v) => out.extend_from_slice(v),
            TensorData::Int8(v) => out.extend(v.iter().map(|b| *b as u8)),
            TensorData::Uint16(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
            TensorData::Uint32(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
            TensorData::Uint64(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
            TensorData::Int16(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
            TensorData::Int32(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
            TensorData::Int64(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
            TensorData::Fp16(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
            TensorData::Fp32(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
            TensorData::Fp64(v) => v.iter().for_each(|x| out.extend(x.to_le_bytes())),
        }
    }

    /// Reads JSON elements (already flattened) as `datatype`, refusing values
    /// that are out of range or of the wrong kind rather than rounding them.
    /// (Requests are decoded element by element with [`Self::push_json`].)
    #[cfg(test)]
    pub fn from_json(datatype: DataType, values: &[&Value]) -> Result<TensorData, BadElement> {
        let mut out = TensorData::with_capacity(datatype, values.len());
        for (i, v) in values.iter().enumerate() {
            out.push_json(i, v)?;
        }
        Ok(out)
    }

    /// An empty tensor of `datatype` with room for `n` elements.
    pub fn with_capacity(datatype: DataType, n: usize) -> TensorData {
        macro_rules! empty {
            ($variant:ident) => {
                TensorData::$variant(Vec::with_capacity(n))
            };
        }
        match datatype {
            DataType::Bool => empty!(Bool),
            DataType::Uint8 => empty!(Uint8),
            DataType::Uint16 => empty!(Uint16),
            DataType::Uint32 => empty!(Uint32),
            DataType::Uint64 => empty!(Uint64),
            DataType::Int8 => empty!(Int8),
            DataType::Int16 => empty!(Int16),
            DataType::Int32 => empty!(Int32),
            DataType::Int64 => empty!(Int64),
            DataType::Fp16 => empty!(Fp16),
            DataType::Fp32 => empty!(Fp32),
            DataType::Fp64 => empty!(Fp64),
        }
    }

    /// Appends one JSON element (the `index`-th, for the error), refusing a
    /// value out of range or of the wrong kind rather than rounding it.
    pub fn push_json(&mut self, index: usize, v: &Value) -> Result<(), BadElement> {
        let bad = || {
            let mut value = v.to_string();
            value.truncate(64);
            BadElement { index, value }
        };
        macro_rules! int {
            ($out:ident, $t:ty, $get:ident) => {
                $out.push(
                    v.$get()
                        .and_then(|x| <$t>::try_from(x).ok())
                        .ok_or_else(bad)?,
                )
            };
        }
        match self {
            TensorData::Bool(out) => out.push(v.as_bool().ok_or_else(bad)?),
            TensorData::Uint8(out) => int!(out, u8, as_u64),
            TensorData::Uint16(out) => int!(out, u16, as_u64),
            TensorData::Uint32(out) => int!(out, u32, as_u64),
            TensorData::Uint64(out) => int!(out, u64, as_u64),
            TensorData::Int8(out) => int!(out, i8, as_i64),
            TensorData::Int16(out) => int!(out, i16, as_i64),
            TensorData::Int32(out) => int!(out, i32, as_i64),
            TensorData::Int64(out) => int!(out, i64, as_i64),
            TensorData::Fp16(out) => out.push(f16::from_f64(v.as_f64().ok_or_else(bad)?)),
            TensorData::Fp32(out) => {
                let x = v.as_f64().ok_or_else(bad)?;
                if x.is_finite() && x.abs() > f32::MAX as f64 {
                    return Err(bad());
                }
                out.push(x as f32);
            }
            TensorData::Fp64(out) => out.push(v.as_f64().ok_or_else(bad)?),
        }
        Ok(())
    }

    /// Joins tensors' elements end to end (row-major data concatenated
    /// along the first dimension); `None` when the datatypes differ.
    pub fn concat(parts: &[&TensorData]) -> Option<TensorData> {
        macro_rules! join {
            ($variant:ident) => {{
                let mut out = Vec::new();
                for p in parts {
                    match p {
                        TensorData::$variant(v) => out.extend_from_slice(v),
                        _ => return None,
                    }
                }
                TensorData::$variant(out)
            }};
        }
        Some(match parts.first()? {
            TensorData::Bool(_) => join!(Bool),
            TensorData::Uint8(_) => join!(Uint8),
            TensorData::Uint16(_) => join!(Uint16),
            TensorData::Uint32(_) => join!(Uint32),
            TensorData::Uint64(_) => join!(Uint64),
            TensorData::Int8(_) => join!(Int8),
            TensorData::Int16(_) => join!(Int16),
            TensorData::Int32(_) => join!(Int32),
            TensorData::Int64(_) => join!(Int64),
            TensorData::Fp16(_) => join!(Fp16),
            TensorData::Fp32(_) => join!(Fp32),
            TensorData::Fp64(_) => join!(Fp64),
        })
    }

    /// Elements `start..start + len`.
    pub fn slice(&self, start: usize, len: usize) -> TensorData {
        macro_rules! cut {
            ($variant:ident, $v:expr) => {
                TensorData::$variant($v[start..start + len].to_vec())
            };
        }
        match self {
            TensorData::Bool(v) => cut!(Bool, v),
            TensorData::Uint8(v) => cut!(Uint8, v),
            TensorData::Uint16(v) => cut!(Uint16, v),
            TensorData::Uint32(v) => cut!(Uint32, v),
            TensorData::Uint64(v) => cut!(Uint64, v),
            TensorData::Int8(v) => cut!(Int8, v),
            TensorData::Int16(v) => cut!(Int16, v),
            TensorData::Int32(v) => cut!(Int32, v),
            TensorData::Int64(v) => cut!(Int64, v),
            TensorData::Fp16(v) => cut!(Fp16, v),
            TensorData::Fp32(v) => cut!(Fp32, v),
            TensorData::Fp64(v) => cut!(Fp64, v),
        }
    }

    /// The elements as `f64`, for comparing predictions across versions.
    pub fn to_f64(&self) -> Vec<f64> {
        match self {
            TensorData::Bool(v) => v.iter().map(|b| *b as u8 as f64).collect(),
            TensorData::Fp16(v) => v.iter().map(|x| x.to_f64()).collect(),
            TensorData::Uint8(v) => v.iter().map(|x| *x as f64).collect(),
            TensorData::Uint16(v) => v.iter().map(|x| *x as f64).collect(),
            TensorData::Uint32(v) => v.iter().map(|x| *x as f64).collect(),
            TensorData::Uint64(v) => v.iter().map(|x| *x as f64).collect(),
            TensorData::Int8(v) => v.iter().map(|x| *x as f64).collect(),
            TensorData::Int16(v) => v.iter().map(|x| *x as f64).collect(),
            TensorData::Int32(v) => v.iter().map(|x| *x as f64).collect(),
            TensorData::Int64(v) => v.iter().map(|x| *x as f64).collect(),
            TensorData::Fp32(v) => v.iter().map(|x| *x as f64).collect(),
            TensorData::Fp64(v) => v.clone(),
        }
    }
}

/// JSON form: a flat array of numbers (FP16 written as ordinary numbers).
impl Serialize for TensorData {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            TensorData::Fp16(v) => {
                let mut seq = s.serialize_seq(Some(v.len()))?;
                for x in v {
                    seq.serialize_element(&x.to_f32())?;
                }
                seq.end()
            }
            TensorData::Bool(v) => v.serialize(s),
            TensorData::Uint8(v) => v.serialize(s),
            TensorData::Uint16(v) => v.serialize(s),
            TensorData::Uint32(v) => v.serialize(s),
            TensorData::Uint64(v) => v.serialize(s),
            TensorData::Int8(v) => v.serialize(s),
            TensorData::Int16(v) => v.serialize(s),
            TensorData::Int32(v) => v.serialize(s),
            TensorData::Int64(v) => v.serialize(s),
            TensorData::Fp32(v) => v.serialize(s),
            TensorData::Fp64(v) => v.serialize(s),
        }
    }
}

/// A named tensor with its shape (row-major data).
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<i64>,
    pub data: TensorData,
}

impl Tensor {
    pub fn datatype(&self) -> DataType {
        self.data.datatype()
    }
}

/// Number of elements a shape holds, or why it cannot be a tensor's shape.
pub fn element_count(shape: &[i64]) -> Result<u64, String> {
    let mut n: u64 = 1;
    for &d in shape {
        if d < 0 {
            return Err(format!("dimension {d} is negative"));
        }
        n = n
            .checked_mul(d as u64)
            .ok_or_else(|| "the element count overflows".to_string())?;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn le_bytes_round_trip_every_datatype() {
        for dt in DataType::ALL {
            let zeros = TensorData::zeros(dt, 3);
            let mut bytes = Vec::new();
            zeros.write_le_bytes(&mut bytes);
            assert_eq!(bytes.len(), 3 * dt.byte_size(), "{dt}");
            assert_eq!(TensorData::from_le_bytes(dt, &bytes).unwrap(), zeros);
        }
        let v = TensorData::Fp32(vec![1.5, -2.25]);
        let mut bytes = Vec::new();
        v.write_le_bytes(&mut bytes);
        assert_eq!(
            TensorData::from_le_bytes(DataType::Fp32, &bytes).unwrap(),
            v
        );
    }

    #[test]
    fn json_refuses_out_of_range_and_wrong_kind() {
        let big = serde_json::json!(300);
        let neg = serde_json::json!(-1);
        let frac = serde_json::json!(1.5);
        let text = serde_json::json!("1");
        assert!(TensorData::from_json(DataType::Uint8, &[&big]).is_err());
        assert!(TensorData::from_json(DataType::Uint32, &[&neg]).is_err());
        assert!(TensorData::from_json(DataType::Int64, &[&frac]).is_err());
        assert!(TensorData::from_json(DataType::Fp32, &[&text]).is_err());
        assert!(TensorData::from_json(DataType::Bool, &[&big]).is_err());
        let huge = serde_json::json!(1e300);
        assert!(TensorData::from_json(DataType::Fp32, &[&huge]).is_err());
        assert_eq!(
            TensorData::from_json(DataType::Int8, &[&neg]).unwrap(),
            TensorData::Int8(vec![-1])
        );
    }

    #[test]
    fn bool_bytes_other_than_0_and_1_are_refused() {
        assert!(TensorData::from_le_bytes(DataType::Bool, &[0, 1, 2]).is_err());
    }

    #[test]
    fn element_count_rejects_negative_and_overflow() {
        assert_eq!(element_count(&[2, 3]), Ok(6));
        assert_eq!(element_count(&[]), Ok(1));
        assert!(element_count(&[-1, 3]).is_err());
        assert!(element_count(&[i64::MAX, i64::MAX]).is_err());
    }
}
