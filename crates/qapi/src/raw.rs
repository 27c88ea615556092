//! [`Raw`]: a captured input node that remembers its [`InputMode`] and location, so
//! hand-written `Deserialize` impls (qemu's flat unions, driver-specific options) can
//! decide what to parse next and still get keyval coercion and qemu's error paths.

use serde::de::{self, DeserializeOwned, Visitor};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::de::{from_value_at, InputMode, Path, RAW_TOKEN};
use crate::error::Error;

/// An input node captured during deserialization.
///
/// Deserializing a `Raw` through [`crate::from_value`] keeps the mode and path; through
/// any other deserializer (e.g. `serde_json::from_str`) it assumes QMP mode at the root.
#[derive(Debug, Clone, PartialEq)]
pub struct Raw {
    /// The node's JSON (strings only, for keyval input).
    pub value: Value,
    /// How the input was written.
    pub mode: InputMode,
    path: Path,
}

impl Raw {
    /// A root node.
    pub fn new(value: Value, mode: InputMode) -> Self {
        Raw {
            value,
            mode,
            path: Path::default(),
        }
    }

    /// Deserializes the node into `T` with the node's mode, reporting errors with paths
    /// relative to the original root.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, Error> {
        from_value_at(&self.value, self.mode, self.path.clone())
    }

    /// The member `key` of an object node, if present.
    pub fn member(&self, key: &str) -> Option<Raw> {
        self.value.get(key).map(|v| Raw {
            value: v.clone(),
            mode: self.mode,
            path: self.path.key(key),
        })
    }

    /// The dotted name of this node as qemu prints it (`null` for the root).
    pub fn full_name(&self) -> String {
        self.path.full_name(self.mode)
    }

    /// The node's own member name (`null` for the root and list elements), which qemu
    /// uses in enum, range and alternate errors.
    pub fn name(&self) -> &str {
        self.path.name()
    }

    /// The dotted name of member `key` of this node.
    pub fn member_name(&self, key: &str) -> String {
        self.path.key(key).full_name(self.mode)
    }

    /// `Parameter '<path>.key' is missing`.
    pub fn missing(&self, key: &str) -> Error {
        Error::missing(&self.member_name(key))
    }

    /// `Parameter '<path>.key' is unexpected`.
    pub fn unexpected(&self, key: &str) -> Error {
        Error::unexpected(&self.member_name(key))
    }

    /// "Parameter 'key' does not accept value 'value'".
    pub fn bad_value(&self, key: &str, value: &str) -> Error {
        Error::bad_enum(key, value)
    }

    /// The node's object members, or qemu's type error.
    pub fn as_object(&self) -> Result<&Map<String, Value>, Error> {
        match &self.value {
            Value::Object(m) => Ok(m),
            _ => Err(Error::invalid_type(&self.full_name(), "object")),
        }
    }

    /// Splits an object node into (members named in `keys`, all others); both halves keep
    /// this node's location.
    pub fn split(&self, keys: &[&str]) -> Result<(Raw, Raw), Error> {
        let m = self.as_object()?;
        let (picked, rest): (Map<String, Value>, Map<String, Value>) = m
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .partition(|(k, _)| keys.contains(&k.as_str()));
        let with = |value| Raw {
            value: Value::Object(value),
            mode: self.mode,
            path: self.path.clone(),
        };
        Ok((with(picked), with(rest)))
    }
}

impl serde::Serialize for Raw {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.value.serialize(s)
    }
}

impl<'de> Deserialize<'de> for Raw {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct RawVisitor;
        impl<'de> Visitor<'de> for RawVisitor {
            type Value = Raw;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("any JSON value")
            }
            // Our own deserializer hands over (mode, path, value).
            fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Raw, A::Error> {
                let mode: String = next(&mut seq)?;
                let path: Value = next(&mut seq)?;
                let value: Value = next(&mut seq)?;
                let mode = if mode == "keyval" {
                    InputMode::Keyval
                } else {
                    InputMode::Qmp
                };
                Ok(Raw {
                    value,
                    mode,
                    path: Path::from_value(&path),
                })
            }
            fn visit_newtype_struct<D: de::Deserializer<'de>>(self, d: D) -> Result<Raw, D::Error> {
                Value::deserialize(d).map(|v| Raw::new(v, InputMode::Qmp))
            }
        }
        fn next<'de, A: de::SeqAccess<'de>, T: Deserialize<'de>>(
            seq: &mut A,
        ) -> Result<T, A::Error> {
            seq.next_element()?
                .ok_or_else(|| de::Error::custom("incomplete captured node"))
        }
        d.deserialize_newtype_struct(RAW_TOKEN, RawVisitor)
    }
}

/// Deserializes one of qemu's flat unions: the base members (listed in `base_keys`,
/// including the discriminator) go into `B`, which must name the discriminator as an
/// enum; `variant` then builds the variant part from the remaining members.
///
/// Use it from a hand-written `Deserialize` impl:
/// `let raw = Raw::deserialize(d)?; flat_union(&raw, KEYS, |base, rest| ...).map_err(D::Error::custom)`.
pub fn flat_union<B, V, F>(raw: &Raw, base_keys: &[&str], variant: F) -> Result<(B, V), Error>
where
    B: DeserializeOwned,
    F: FnOnce(&B, &Raw) -> Result<V, Error>,
{
    let (base, rest) = raw.split(base_keys)?;
    let base: B = base.parse()?;
    let v = variant(&base, &rest)?;
    Ok((base, v))
}
