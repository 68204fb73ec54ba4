//! The one table of an enum's names is its serde attributes: this reads a
//! unit variant's serde name back (`Phase::RolledBack` → `rolled_back`) so
//! `Display` and metric labels print exactly what the JSON, the event
//! history and the store hold, without a second hand-written table.

use serde::Serialize;
use serde::ser::{Error as _, Impossible};

/// The serde name of a unit variant (after `rename`/`rename_all`), or None
/// for anything else (a variant with data, an untagged catch-all).
pub fn variant_name<T: Serialize + ?Sized>(value: &T) -> Option<&'static str> {
    value.serialize(NameOnly).ok()
}

/// `Display` for enums of unit variants, printing each variant's serde name.
#[macro_export]
macro_rules! display_from_serde {
    ($($ty:ty),* $(,)?) => {
        $(impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(
                    $crate::records::variant_name(self).expect("a unit variant has a serde name"),
                )
            }
        })*
    };
}

/// A serializer that only accepts a unit variant and returns its name.
struct NameOnly;

#[derive(Debug)]
struct NotAUnitVariant;

impl std::fmt::Display for NotAUnitVariant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("not a unit variant")
    }
}

impl std::error::Error for NotAUnitVariant {}

impl serde::ser::Error for NotAUnitVariant {
    fn custom<M: std::fmt::Display>(_: M) -> Self {
        NotAUnitVariant
    }
}

type Refused<T = &'static str> = Result<T, NotAUnitVariant>;

fn refuse<T>() -> Refused<T> {
    Err(NotAUnitVariant::custom(""))
}

macro_rules! refuse_scalars {
    ($($method:ident($ty:ty)),* $(,)?) => {
        $(fn $method(self, _: $ty) -> Refused { refuse() })*
    };
}

impl serde::Serializer for NameOnly {
    type Ok = &'static str;
    type Error = NotAUnitVariant;
    type SerializeSeq = Impossible<&'static str, NotAUnitVariant>;
    type SerializeTuple = Impossible<&'static str, NotAUnitVariant>;
    type SerializeTupleStruct = Impossible<&'static str, NotAUnitVariant>;
    type SerializeTupleVariant = Impossible<&'static str, NotAUnitVariant>;
    type SerializeMap = Impossible<&'static str, NotAUnitVariant>;
    type SerializeStruct = Impossible<&'static str, NotAUnitVariant>;
    type SerializeStructVariant = Impossible<&'static str, NotAUnitVariant>;

    refuse_scalars!(
        serialize_bool(bool),
        serialize_i8(i8),
        serialize_i16(i16),
        serialize_i32(i32),
        serialize_i64(i64),
        serialize_u8(u8),
        serialize_u16(u16),
        serialize_u32(u32),
        serialize_u64(u64),
        serialize_f32(f32),
        serialize_f64(f64),
        serialize_char(char),
        serialize_str(&str),
        serialize_bytes(&[u8]),
        serialize_unit_struct(&'static str),
    );

    fn serialize_unit_variant(self, _: &'static str, _: u32, variant: &'static str) -> Refused {
        Ok(variant)
    }

    fn serialize_none(self) -> Refused {
        refuse()
    }
    fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Refused {
        refuse()
    }
    fn serialize_unit(self) -> Refused {
        refuse()
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(self, _: &'static str, _: &T) -> Refused {
        refuse()
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Refused {
        refuse()
    }
    fn serialize_seq(self, _: Option<usize>) -> Refused<Self::SerializeSeq> {
        refuse()
    }
    fn serialize_tuple(self, _: usize) -> Refused<Self::SerializeTuple> {
        refuse()
    }
    fn serialize_tuple_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Refused<Self::SerializeTupleStruct> {
        refuse()
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Refused<Self::SerializeTupleVariant> {
        refuse()
    }
    fn serialize_map(self, _: Option<usize>) -> Refused<Self::SerializeMap> {
        refuse()
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Refused<Self::SerializeStruct> {
        refuse()
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Refused<Self::SerializeStructVariant> {
        refuse()
    }
}

#[cfg(test)]
mod tests {
    use super::variant_name;

    #[derive(serde::Serialize)]
    #[serde(rename_all = "snake_case")]
    enum Sample {
        RolledBack,
        #[serde(rename = "post-promotion")]
        PostPromotion,
        Data(u32),
        #[serde(untagged)]
        Other(String),
    }

    #[test]
    fn names_come_from_serde_and_only_unit_variants_have_one() {
        assert_eq!(variant_name(&Sample::RolledBack), Some("rolled_back"));
        assert_eq!(variant_name(&Sample::PostPromotion), Some("post-promotion"));
        assert_eq!(variant_name(&Sample::Data(1)), None);
        assert_eq!(variant_name(&Sample::Other("x".into())), None);
        assert_eq!(variant_name(&3u8), None);
    }
}
