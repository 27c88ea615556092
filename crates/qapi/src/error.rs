//! The crate's error type. Messages follow qemu's wording because they reach QMP clients
//! and the command line verbatim.

use std::fmt::Display;

/// What went wrong, for callers that need to branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Malformed keyval or JSON text.
    Syntax,
    /// The input asked for help (`help` or `?`) where the caller did not expect it.
    HelpRequested,
    /// A mandatory member is absent.
    Missing,
    /// A member the type does not know.
    Unexpected,
    /// A member has the wrong JSON type.
    InvalidType,
    /// A member has the right type but an unacceptable value.
    InvalidValue,
    /// Any other failure (including errors raised by hand-written `Deserialize` impls).
    Other,
}

/// An error whose location inside the input is not known yet; the deserializer fills in
/// the dotted path when the error passes through the node that knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Pending {
    MissingField(String),
    UnknownField(String),
    UnknownVariant(String),
    InvalidType(String),
    InvalidValue(String),
}

/// Error from parsing or deserializing QAPI input. `Display` is the qemu-style message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    kind: ErrorKind,
    message: String,
    pending: Option<Pending>,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            pending: None,
        }
    }

    pub(crate) fn syntax(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Syntax, message)
    }

    pub(crate) fn missing(full_name: &str) -> Self {
        Self::new(
            ErrorKind::Missing,
            format!("Parameter '{full_name}' is missing"),
        )
    }

    pub(crate) fn unexpected(full_name: &str) -> Self {
        Self::new(
            ErrorKind::Unexpected,
            format!("Parameter '{full_name}' is unexpected"),
        )
    }

    pub(crate) fn invalid_type(full_name: &str, expected: &str) -> Self {
        Self::new(
            ErrorKind::InvalidType,
            format!("Invalid parameter type for '{full_name}', expected: {expected}"),
        )
    }

    /// qemu's `QERR_INVALID_PARAMETER_VALUE`: "Parameter 'x' expects ...".
    pub(crate) fn expects(name: &str, what: &str) -> Self {
        Self::new(
            ErrorKind::InvalidValue,
            format!("Parameter '{name}' expects {what}"),
        )
    }

    pub(crate) fn bad_enum(name: &str, value: &str) -> Self {
        Self::new(
            ErrorKind::InvalidValue,
            format!("Parameter '{name}' does not accept value '{value}'"),
        )
    }

    fn pending(pending: Pending, fallback: String) -> Self {
        Error {
            kind: ErrorKind::Other,
            message: fallback,
            pending: Some(pending),
        }
    }

    /// The qemu-style message (same as `Display`).
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The category of the error.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub(crate) fn take_pending(&mut self) -> Option<Pending> {
        self.pending.take()
    }
}

impl serde::de::Error for Error {
    fn custom<T: Display>(msg: T) -> Self {
        Self::new(ErrorKind::Other, msg.to_string())
    }

    fn invalid_type(unexp: serde::de::Unexpected<'_>, exp: &dyn serde::de::Expected) -> Self {
        Self::pending(
            Pending::InvalidType(exp.to_string()),
            format!("invalid type: {unexp}, expected {exp}"),
        )
    }

    fn invalid_value(unexp: serde::de::Unexpected<'_>, exp: &dyn serde::de::Expected) -> Self {
        Self::pending(
            Pending::InvalidValue(exp.to_string()),
            format!("invalid value: {unexp}, expected {exp}"),
        )
    }

    fn unknown_variant(variant: &str, _expected: &'static [&'static str]) -> Self {
        Self::pending(
            Pending::UnknownVariant(variant.to_owned()),
            format!("Parameter 'null' does not accept value '{variant}'"),
        )
    }

    fn unknown_field(field: &str, _expected: &'static [&'static str]) -> Self {
        Self::pending(
            Pending::UnknownField(field.to_owned()),
            format!("Parameter '{field}' is unexpected"),
        )
    }

    fn missing_field(field: &'static str) -> Self {
        Self::pending(
            Pending::MissingField(field.to_owned()),
            format!("Parameter '{field}' is missing"),
        )
    }
}
