//! A serde `Deserializer` over `serde_json::Value` that applies qemu's input visitor rules.
//!
//! * [`InputMode::Qmp`]: JSON types must match exactly (a string for a bool is an error).
//! * [`InputMode::Keyval`]: every scalar is a string and is converted to what the target
//!   type asks for: bools from `on|off|yes|no|true|false|y|n`, integers from decimal, hex
//!   or octal, sizes (see [`Size`]) with binary suffixes, numbers from decimal text.
//!
//! Errors carry qemu's wording and the dotted path of the failing member
//! (`cache.direct`; list elements are `a.0` for keyval and `a[0]` for QMP). As in qemu,
//! enum and integer-range errors name only the member itself.
//!
//! Struct members are visited in declaration order and unknown members last, so with
//! several faults the first reported is usually the one qemu reports.
//!
//! Limitation: serde's internally tagged enums (`#[serde(tag = "type")]`) and
//! `#[serde(flatten)]` buffer their input before the target type is known, so keyval
//! coercion cannot apply inside them (and paths in their errors are those of the
//! enclosing node). Use [`crate::Raw`] and [`crate::raw::flat_union`] for qemu's flat
//! unions instead; the types in [`crate::options`] do.

use serde::de::{self, DeserializeOwned, DeserializeSeed, IntoDeserializer, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::error::{Error, Pending};
use crate::num;

/// How the input was written, which decides how strictly scalars are typed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InputMode {
    /// JSON (QMP, or a JSON command-line argument): types must match exactly.
    Qmp,
    /// keyval text: all scalars are strings converted on demand.
    Keyval,
}

/// Deserializes `T` from `v` with qemu's rules for `mode`.
pub fn from_value<T: DeserializeOwned>(v: &Value, mode: InputMode) -> Result<T, Error> {
    from_value_at(v, mode, Path::default())
}

pub(crate) fn from_value_at<T: DeserializeOwned>(
    v: &Value,
    mode: InputMode,
    path: Path,
) -> Result<T, Error> {
    T::deserialize(ValueDe { v, mode, path })
}

/// One step in the path from the root to a member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Seg {
    Key(String),
    Index(usize),
}

/// The location of a node inside the input, for error messages.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Path(Vec<Seg>);

impl Path {
    pub(crate) fn key(&self, key: &str) -> Path {
        let mut p = self.0.clone();
        p.push(Seg::Key(key.to_owned()));
        Path(p)
    }

    fn index(&self, i: usize) -> Path {
        let mut p = self.0.clone();
        p.push(Seg::Index(i));
        Path(p)
    }

    /// qemu's `full_name()`: `a.b.0` for keyval, `a.b[0]` for QMP.
    pub fn full_name(&self, mode: InputMode) -> String {
        let mut s = String::new();
        for seg in &self.0 {
            match seg {
                Seg::Key(k) => {
                    if !s.is_empty() {
                        s.push('.');
                    }
                    s.push_str(k);
                }
                Seg::Index(i) if mode == InputMode::Keyval => s.push_str(&format!(".{i}")),
                Seg::Index(i) => s.push_str(&format!("[{i}]")),
            }
        }
        if s.is_empty() {
            s.push_str("null");
        }
        s
    }

    /// The member's own name, as qemu's enum and range checks report it.
    pub fn name(&self) -> &str {
        match self.0.last() {
            Some(Seg::Key(k)) => k,
            _ => "null",
        }
    }

    pub(crate) fn to_value(&self) -> Value {
        Value::Array(
            self.0
                .iter()
                .map(|s| match s {
                    Seg::Key(k) => Value::String(k.clone()),
                    Seg::Index(i) => Value::from(*i),
                })
                .collect(),
        )
    }

    pub(crate) fn from_value(v: &Value) -> Path {
        let segs = v.as_array().map_or(&[][..], Vec::as_slice);
        Path(
            segs.iter()
                .filter_map(|s| match s {
                    Value::String(k) => Some(Seg::Key(k.clone())),
                    Value::Number(n) => n
                        .as_u64()
                        .and_then(|i| usize::try_from(i).ok())
                        .map(Seg::Index),
                    _ => None,
                })
                .collect(),
        )
    }
}

/// Gives an error produced by a serde `Visitor` its location.
pub(crate) fn locate(mut err: Error, path: &Path, mode: InputMode) -> Error {
    match err.take_pending() {
        None => err,
        Some(Pending::MissingField(f)) => Error::missing(&path.key(&f).full_name(mode)),
        Some(Pending::UnknownField(f)) => Error::unexpected(&path.key(&f).full_name(mode)),
        Some(Pending::UnknownVariant(v)) => Error::bad_enum(path.name(), &v),
        Some(Pending::InvalidType(exp)) => Error::invalid_type(&path.full_name(mode), &exp),
        Some(Pending::InvalidValue(exp)) => Error::expects(&path.full_name(mode), &exp),
    }
}

/// Magic newtype names understood by [`ValueDe`].
pub(crate) const SIZE_TOKEN: &str = "$qsd_qapi::Size";
pub(crate) const RAW_TOKEN: &str = "$qsd_qapi::Raw";

/// A byte count of qemu's QAPI type `size`: in keyval input it accepts suffixes
/// (`512`, `64k`, `1.5G`, `0x1000`); over QMP it is an unsigned integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Size(pub u64);

impl serde::Serialize for Size {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl<'de> Visitor<'de> for SizeVisitor {
            type Value = Size;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("size")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Size, E> {
                Ok(Size(v))
            }
            fn visit_newtype_struct<D: de::Deserializer<'de>>(
                self,
                d: D,
            ) -> Result<Size, D::Error> {
                u64::deserialize(d).map(Size)
            }
        }
        d.deserialize_newtype_struct(SIZE_TOKEN, SizeVisitor)
    }
}

/// `#[serde(deserialize_with = "qsd_qapi::de::size")]` for `u64` fields qemu declares
/// as `size`.
pub fn size<'de, D: de::Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    Size::deserialize(d).map(|s| s.0)
}

/// `#[serde(deserialize_with = "qsd_qapi::de::opt_size")]` for `Option<u64>` fields.
pub fn opt_size<'de, D: de::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Option::<Size>::deserialize(d).map(|s| s.map(|s| s.0))
}

/// The deserializer for one node of the input.
pub(crate) struct ValueDe<'a> {
    pub(crate) v: &'a Value,
    pub(crate) mode: InputMode,
    pub(crate) path: Path,
}

impl<'a> ValueDe<'a> {
    fn full(&self) -> String {
        self.path.full_name(self.mode)
    }

    fn type_err(&self, expected: &str) -> Error {
        Error::invalid_type(&self.full(), expected)
    }

    fn locate(&self, e: Error) -> Error {
        locate(e, &self.path, self.mode)
    }

    /// The keyval string of a scalar, or qemu's error for a non-string.
    fn keyval_str(&self) -> Result<&'a str, Error> {
        match self.v {
            Value::String(s) => Ok(s),
            _ => Err(self.type_err("string")),
        }
    }

    fn bool(&self) -> Result<bool, Error> {
        match (self.mode, self.v) {
            (InputMode::Qmp, Value::Bool(b)) => Ok(*b),
            (InputMode::Qmp, _) => Err(self.type_err("boolean")),
            (InputMode::Keyval, _) => num::parse_bool(self.keyval_str()?)
                .ok_or_else(|| Error::expects(&self.full(), "'on' or 'off'")),
        }
    }

    fn i64(&self) -> Result<i64, Error> {
        match (self.mode, self.v) {
            (InputMode::Qmp, Value::Number(n)) => {
                n.as_i64().ok_or_else(|| self.type_err("integer"))
            }
            (InputMode::Qmp, _) => Err(self.type_err("integer")),
            (InputMode::Keyval, _) => num::strtoi64(self.keyval_str()?)
                .ok_or_else(|| Error::expects(&self.full(), "integer")),
        }
    }

    fn u64(&self) -> Result<u64, Error> {
        match (self.mode, self.v) {
            // qemu accepts negative numbers for unsigned members and casts them.
            (InputMode::Qmp, Value::Number(n)) => n
                .as_u64()
                .or_else(|| n.as_i64().map(|i| i as u64))
                .ok_or_else(|| self.type_err("integer")),
            (InputMode::Qmp, _) => Err(self.type_err("integer")),
            (InputMode::Keyval, _) => num::strtou64(self.keyval_str()?)
                .ok_or_else(|| Error::expects(&self.full(), "integer")),
        }
    }

    fn size(&self) -> Result<u64, Error> {
        match self.mode {
            InputMode::Qmp => self.u64(),
            InputMode::Keyval => {
                num::strtosz(self.keyval_str()?).ok_or_else(|| Error::expects(&self.full(), "size"))
            }
        }
    }

    fn signed(&self, min: i64, max: i64, c_type: &str) -> Result<i64, Error> {
        let v = self.i64()?;
        if v < min || v > max {
            return Err(Error::expects(self.path.name(), c_type));
        }
        Ok(v)
    }

    fn unsigned(&self, max: u64, c_type: &str) -> Result<u64, Error> {
        let v = self.u64()?;
        if v > max {
            return Err(Error::expects(self.path.name(), c_type));
        }
        Ok(v)
    }

    fn f64(&self) -> Result<f64, Error> {
        match (self.mode, self.v) {
            (InputMode::Qmp, Value::Number(n)) => n.as_f64().ok_or_else(|| self.type_err("number")),
            (InputMode::Qmp, _) => Err(self.type_err("number")),
            (InputMode::Keyval, _) => num::strtod(self.keyval_str()?)
                .ok_or_else(|| Error::expects(&self.full(), "number")),
        }
    }

    fn str(&self) -> Result<&'a str, Error> {
        match self.v {
            Value::String(s) => Ok(s),
            _ => Err(self.type_err("string")),
        }
    }

    fn object(&self) -> Result<&'a Map<String, Value>, Error> {
        match self.v {
            Value::Object(m) => Ok(m),
            _ => Err(self.type_err("object")),
        }
    }

    fn child(&self, v: &'a Value, path: Path) -> ValueDe<'a> {
        ValueDe {
            v,
            mode: self.mode,
            path,
        }
    }

    fn map_access(&self, entries: Vec<(&'a String, &'a Value)>) -> MapDe<'a> {
        MapDe {
            entries: entries.into_iter(),
            value: None,
            mode: self.mode,
            path: self.path.clone(),
        }
    }

    fn visit_raw<'de, V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let mode = match self.mode {
            InputMode::Qmp => Value::from("qmp"),
            InputMode::Keyval => Value::from("keyval"),
        };
        let path = self.path.to_value();
        let items = [mode, path, self.v.clone()];
        let seq = SeqDe {
            items: items.iter().enumerate(),
            mode: InputMode::Qmp,
            path: Path::default(),
        };
        visitor.visit_seq(seq)
    }
}

macro_rules! signed_methods {
    ($($method:ident $visit:ident $t:ty, $c:literal;)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            let v = self.signed(i64::from(<$t>::MIN), i64::from(<$t>::MAX), $c)?;
            let v = <$t>::try_from(v).map_err(|_| Error::expects(self.path.name(), $c))?;
            visitor.$visit(v).map_err(|e| self.locate(e))
        }
    )*};
}

macro_rules! unsigned_methods {
    ($($method:ident $visit:ident $t:ty, $c:literal;)*) => {$(
        fn $method<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
            let v = self.unsigned(u64::from(<$t>::MAX), $c)?;
            let v = <$t>::try_from(v).map_err(|_| Error::expects(self.path.name(), $c))?;
            visitor.$visit(v).map_err(|e| self.locate(e))
        }
    )*};
}

impl<'de> de::Deserializer<'de> for ValueDe<'_> {
    type Error = Error;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let r = match self.v {
            Value::Null => visitor.visit_unit(),
            Value::Bool(b) => visitor.visit_bool(*b),
            Value::Number(n) => {
                if let Some(u) = n.as_u64() {
                    visitor.visit_u64(u)
                } else if let Some(i) = n.as_i64() {
                    visitor.visit_i64(i)
                } else {
                    visitor.visit_f64(n.as_f64().unwrap_or(f64::NAN))
                }
            }
            Value::String(s) => visitor.visit_str(s),
            Value::Array(a) => visitor.visit_seq(self.seq_access(a)),
            Value::Object(m) => visitor.visit_map(self.map_access(m.iter().collect())),
        };
        r.map_err(|e| self.locate(e))
    }

    fn deserialize_bool<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let b = self.bool()?;
        visitor.visit_bool(b).map_err(|e| self.locate(e))
    }

    signed_methods! {
        deserialize_i8 visit_i8 i8, "int8_t";
        deserialize_i16 visit_i16 i16, "int16_t";
        deserialize_i32 visit_i32 i32, "int32_t";
    }

    unsigned_methods! {
        deserialize_u8 visit_u8 u8, "uint8_t";
        deserialize_u16 visit_u16 u16, "uint16_t";
        deserialize_u32 visit_u32 u32, "uint32_t";
    }

    fn deserialize_i64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let v = self.i64()?;
        visitor.visit_i64(v).map_err(|e| self.locate(e))
    }

    fn deserialize_u64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let v = self.u64()?;
        visitor.visit_u64(v).map_err(|e| self.locate(e))
    }

    fn deserialize_f32<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_f64(visitor)
    }

    fn deserialize_f64<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let v = self.f64()?;
        visitor.visit_f64(v).map_err(|e| self.locate(e))
    }

    fn deserialize_char<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_str<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let s = self.str()?;
        visitor.visit_str(s).map_err(|e| self.locate(e))
    }

    fn deserialize_string<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_bytes<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_byte_buf<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    /// A present member is `Some`, even `null`: like qemu, `null` for an optional bool is
    /// a type error, not "absent".
    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_some(self)
    }

    fn deserialize_unit<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.v {
            Value::Null => visitor.visit_unit().map_err(|e| self.locate(e)),
            _ => Err(self.type_err("null")),
        }
    }

    fn deserialize_unit_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_unit(visitor)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Error> {
        match name {
            SIZE_TOKEN => {
                let v = self.size()?;
                visitor.visit_u64(v).map_err(|e| self.locate(e))
            }
            RAW_TOKEN => self.visit_raw(visitor),
            _ => visitor.visit_newtype_struct(self),
        }
    }

    fn deserialize_seq<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        match self.v {
            Value::Array(a) => visitor
                .visit_seq(self.seq_access(a))
                .map_err(|e| self.locate(e)),
            _ => Err(self.type_err("array")),
        }
    }

    fn deserialize_tuple<V: Visitor<'de>>(
        self,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_tuple_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _len: usize,
        visitor: V,
    ) -> Result<V::Value, Error> {
        self.deserialize_seq(visitor)
    }

    fn deserialize_map<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        let m = self.object()?;
        visitor
            .visit_map(self.map_access(m.iter().collect()))
            .map_err(|e| self.locate(e))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        let m = self.object()?;
        // Declared members first, in declaration order, then the unknown ones: this is
        // the order in which qemu's generated visitors find problems.
        let mut entries: Vec<(&String, &Value)> =
            fields.iter().filter_map(|f| m.get_key_value(*f)).collect();
        entries.extend(m.iter().filter(|(k, _)| !fields.contains(&k.as_str())));
        visitor
            .visit_map(self.map_access(entries))
            .map_err(|e| self.locate(e))
    }

    fn deserialize_enum<V: Visitor<'de>>(
        self,
        _name: &'static str,
        _variants: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        let r = match self.v {
            Value::String(s) => visitor.visit_enum(s.as_str().into_deserializer()),
            Value::Object(m) if m.len() == 1 && self.mode == InputMode::Qmp => {
                visitor.visit_enum(EnumDe { de: &self, map: m })
            }
            _ => return Err(self.type_err("string")),
        };
        r.map_err(|e| self.locate(e))
    }

    fn deserialize_identifier<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        self.deserialize_str(visitor)
    }

    fn deserialize_ignored_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Error> {
        visitor.visit_unit()
    }
}

impl<'a> ValueDe<'a> {
    fn seq_access(
        &self,
        items: &'a [Value],
    ) -> SeqDe<'a, std::iter::Enumerate<std::slice::Iter<'a, Value>>> {
        SeqDe {
            items: items.iter().enumerate(),
            mode: self.mode,
            path: self.path.clone(),
        }
    }
}

struct SeqDe<'a, I: Iterator<Item = (usize, &'a Value)>> {
    items: I,
    mode: InputMode,
    path: Path,
}

impl<'de, 'a, I: Iterator<Item = (usize, &'a Value)>> de::SeqAccess<'de> for SeqDe<'a, I> {
    type Error = Error;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, Error> {
        match self.items.next() {
            None => Ok(None),
            Some((i, v)) => seed
                .deserialize(ValueDe {
                    v,
                    mode: self.mode,
                    path: self.path.index(i),
                })
                .map(Some),
        }
    }
}

struct MapDe<'a> {
    entries: std::vec::IntoIter<(&'a String, &'a Value)>,
    value: Option<(&'a String, &'a Value)>,
    mode: InputMode,
    path: Path,
}

impl<'de> de::MapAccess<'de> for MapDe<'_> {
    type Error = Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Error> {
        match self.entries.next() {
            None => Ok(None),
            Some((k, v)) => {
                self.value = Some((k, v));
                let key: de::value::StrDeserializer<'_, Error> = k.as_str().into_deserializer();
                seed.deserialize(key)
                    .map(Some)
                    .map_err(|e| locate(e, &self.path, self.mode))
            }
        }
    }

    fn next_value_seed<T: DeserializeSeed<'de>>(&mut self, seed: T) -> Result<T::Value, Error> {
        let Some((k, v)) = self.value.take() else {
            return Err(de::Error::custom("map value requested before its key"));
        };
        seed.deserialize(ValueDe {
            v,
            mode: self.mode,
            path: self.path.key(k),
        })
    }
}

/// An externally tagged enum in JSON form: `{"variant": value}`.
struct EnumDe<'a, 'b> {
    de: &'b ValueDe<'a>,
    map: &'a Map<String, Value>,
}

impl<'de, 'a, 'b> de::EnumAccess<'de> for EnumDe<'a, 'b> {
    type Error = Error;
    type Variant = ValueDe<'a>;

    fn variant_seed<V: DeserializeSeed<'de>>(
        self,
        seed: V,
    ) -> Result<(V::Value, ValueDe<'a>), Error> {
        let Some((k, v)) = self.map.iter().next() else {
            return Err(self.de.type_err("string"));
        };
        let key: de::value::StrDeserializer<'_, Error> = k.as_str().into_deserializer();
        let variant = seed.deserialize(key)?;
        Ok((variant, self.de.child(v, self.de.path.key(k))))
    }
}

impl<'de> de::VariantAccess<'de> for ValueDe<'_> {
    type Error = Error;

    fn unit_variant(self) -> Result<(), Error> {
        match self.v {
            Value::Null => Ok(()),
            _ => Err(self.type_err("null")),
        }
    }

    fn newtype_variant_seed<T: DeserializeSeed<'de>>(self, seed: T) -> Result<T::Value, Error> {
        seed.deserialize(self)
    }

    fn tuple_variant<V: Visitor<'de>>(self, _len: usize, visitor: V) -> Result<V::Value, Error> {
        de::Deserializer::deserialize_seq(self, visitor)
    }

    fn struct_variant<V: Visitor<'de>>(
        self,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Error> {
        de::Deserializer::deserialize_struct(self, "", fields, visitor)
    }
}

#[cfg(test)]
#[path = "de_tests.rs"]
mod tests;
