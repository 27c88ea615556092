//! qemu's keyval syntax (`util/keyval.c`), as used by `--blockdev`, `--export`,
//! `--object`, `--nbd-server` and `--monitor`, plus JSON option arguments.
//!
//! ```text
//! key-vals     = [ key-val { ',' key-val } [ ',' ] ]
//! key-val      = key '=' val
//! key          = key-fragment { '.' key-fragment }
//! val          = { [^,] | ',,' }
//! ```
//!
//! Dotted keys build nested objects, numeric fragments build lists (indexes must be
//! contiguous from 0), the last of repeated keys wins, and leaves are strings. With an
//! implied key the first element may omit `key=` (its value then cannot contain `,` or
//! `=`). A bare `help` or `?` element is a help request.
//!
//! Deviation from qemu: nesting deeper than [`MAX_DEPTH`] levels is rejected so that
//! hostile input cannot exhaust the stack in later recursive passes.

use serde_json::{Map, Value};

use crate::de::InputMode;
use crate::error::{Error, ErrorKind};

/// Longest key fragment qemu accepts is 127 bytes.
const MAX_FRAGMENT_LEN: usize = 127;
/// Maximum number of key fragments in one key.
pub const MAX_DEPTH: usize = 64;

/// Parses keyval text into a JSON object whose leaves are strings.
///
/// A help request (`help` or `?`) fails with [`ErrorKind::HelpRequested`] and qemu's
/// message "Help is not available for this option"; use [`parse_keyval_with_help`] where
/// help is meaningful.
pub fn parse_keyval(input: &str, implied_key: Option<&str>) -> Result<Value, Error> {
    let (value, help) = parse_inner(input, implied_key, false)?;
    debug_assert!(!help);
    Ok(value)
}

/// Like [`parse_keyval`], but a help request is reported as `true` in the result instead
/// of an error; the other parameters are still parsed so context-specific help can be
/// printed (`--object iothread,help`).
pub fn parse_keyval_with_help(
    input: &str,
    implied_key: Option<&str>,
) -> Result<(Value, bool), Error> {
    parse_inner(input, implied_key, true)
}

/// Parses an option argument the way qemu-storage-daemon does: text starting with `{` is
/// a JSON object (strict QMP typing applies), anything else is keyval.
pub fn parse_option(input: &str, implied_key: Option<&str>) -> Result<(Value, InputMode), Error> {
    if input.starts_with('{') {
        return parse_json_object(input).map(|v| (v, InputMode::Qmp));
    }
    parse_keyval(input, implied_key).map(|v| (v, InputMode::Keyval))
}

fn parse_json_object(input: &str) -> Result<Value, Error> {
    match serde_json::from_str::<Value>(input) {
        Ok(v @ Value::Object(_)) => Ok(v),
        // Unreachable for input starting with '{', kept for robustness.
        Ok(_) => Err(Error::syntax("JSON value must be an object")),
        Err(e) if e.is_eof() => Err(Error::syntax("JSON parse error, premature EOI")),
        Err(e) if e.to_string().starts_with("trailing characters") => {
            Err(Error::syntax("Expecting at most one JSON value"))
        }
        Err(e) => Err(Error::syntax(format!("JSON parse error, {e}"))),
    }
}

fn parse_inner(
    input: &str,
    implied_key: Option<&str>,
    allow_help: bool,
) -> Result<(Value, bool), Error> {
    let mut root = Map::new();
    let mut help = false;
    let mut rest = input;
    let mut implied = implied_key;
    while !rest.is_empty() {
        rest = parse_one(&mut root, rest, implied, &mut help)?;
        implied = None;
    }
    if help && !allow_help {
        return Err(Error::new(
            ErrorKind::HelpRequested,
            "Help is not available for this option",
        ));
    }
    let mut path = Vec::new();
    let value = listify(root, &mut path)?;
    Ok((value, help))
}

/// Length of a help request at the start of `s` (qemu's `starts_with_help_option`).
fn help_len(s: &str) -> usize {
    if s.starts_with('?') {
        1
    } else if s.starts_with("help") {
        4
    } else {
        0
    }
}

/// Parses one element; returns the remaining input.
fn parse_one<'a>(
    root: &mut Map<String, Value>,
    params: &'a str,
    implied_key: Option<&str>,
    help: &mut bool,
) -> Result<&'a str, Error> {
    let len = params.find(['=', ',']).unwrap_or(params.len());
    let has_eq = params[len..].starts_with('=');
    if len > 0 && !has_eq {
        if help_len(params) == len {
            *help = true;
            return Ok(skip_comma(&params[len..]));
        }
        if let Some(key) = implied_key {
            let fragments = split_key(key, key.len())?;
            put_leaf(root, key, &fragments, params[..len].to_owned())?;
            return Ok(skip_comma(&params[len..]));
        }
    }
    let fragments = split_key(params, len)?;
    let key = &params[..len];
    if !has_eq {
        return Err(Error::syntax(format!(
            "Expected '=' after parameter '{key}'"
        )));
    }
    let (value, rest) = scan_value(&params[len + 1..]);
    put_leaf(root, key, &fragments, value)?;
    Ok(rest)
}

fn skip_comma(s: &str) -> &str {
    s.strip_prefix(',').unwrap_or(s)
}

/// Reads a value up to a single `,`; `,,` stands for a literal comma.
fn scan_value(s: &str) -> (String, &str) {
    let mut value = String::new();
    let mut rest = s;
    loop {
        match rest.find(',') {
            None => {
                value.push_str(rest);
                return (value, "");
            }
            Some(i) => {
                value.push_str(&rest[..i]);
                if rest[i + 1..].starts_with(',') {
                    value.push(',');
                    rest = &rest[i + 2..];
                } else {
                    return (value, &rest[i + 1..]);
                }
            }
        }
    }
}

/// Length of the QAPI name at the start of `s` (qemu's `parse_qapi_name(s, false)`),
/// including a downstream `__RFQDN_` prefix; 0 if there is none.
fn qapi_name_len(s: &str) -> usize {
    let b = s.as_bytes();
    let mut p = 0;
    if b.first() == Some(&b'_') {
        if b.get(1) != Some(&b'_') {
            return 0;
        }
        p = 2;
        while p < b.len() && (b[p].is_ascii_alphanumeric() || b[p] == b'-' || b[p] == b'.') {
            p += 1;
        }
        if b.get(p) != Some(&b'_') {
            return 0;
        }
        p += 1;
    }
    if !b.get(p).is_some_and(u8::is_ascii_alphabetic) {
        return 0;
    }
    p += 1;
    while p < b.len() && (b[p].is_ascii_alphanumeric() || b[p] == b'-' || b[p] == b'_') {
        p += 1;
    }
    p
}

/// Splits `params[..key_end]` into fragments, validating each as qemu does. Returns the
/// fragments with the byte offset where each ends.
fn split_key(params: &str, key_end: usize) -> Result<Vec<(&str, usize)>, Error> {
    let key = &params[..key_end];
    let mut fragments = Vec::new();
    let mut s = 0;
    loop {
        let tail = &params[s..];
        let len = if s != 0 && tail.starts_with(|c: char| c.is_ascii_digit()) {
            tail.bytes().take_while(u8::is_ascii_digit).count()
        } else {
            qapi_name_len(tail)
        };
        if len == 0 || (s + len < key_end && params.as_bytes()[s + len] != b'.') {
            return Err(Error::syntax(format!("Invalid parameter '{key}'")));
        }
        if len > MAX_FRAGMENT_LEN {
            let what = if s != 0 || s + len != key_end {
                "Parameter fragment"
            } else {
                "Parameter"
            };
            let frag = &params[s..s + len];
            return Err(Error::syntax(format!("{what} '{frag}' is too long")));
        }
        fragments.push((&params[s..s + len], s + len));
        if fragments.len() > MAX_DEPTH {
            return Err(Error::syntax(format!(
                "Parameter '{key}' is nested too deeply"
            )));
        }
        s += len;
        if s >= key_end {
            return Ok(fragments);
        }
        s += 1; // the '.'
    }
}

fn inconsistent(prefix: &str) -> Error {
    Error::syntax(format!("Parameters '{prefix}.*' used inconsistently"))
}

/// Stores `value` at the path given by `fragments`, creating objects on the way.
fn put_leaf(
    root: &mut Map<String, Value>,
    key: &str,
    fragments: &[(&str, usize)],
    value: String,
) -> Result<(), Error> {
    let Some(((last, _), inner)) = fragments.split_last() else {
        return Err(Error::syntax(format!("Invalid parameter '{key}'")));
    };
    let mut cur = root;
    for (frag, end) in inner {
        let slot = cur
            .entry((*frag).to_owned())
            .or_insert_with(|| Value::Object(Map::new()));
        match slot {
            Value::Object(m) => cur = m,
            _ => return Err(inconsistent(&key[..*end])),
        }
    }
    match cur.get_mut(*last) {
        Some(Value::Object(_)) => Err(inconsistent(key)),
        Some(slot) => {
            *slot = Value::String(value);
            Ok(())
        }
        None => {
            cur.insert((*last).to_owned(), Value::String(value));
            Ok(())
        }
    }
}

/// qemu's `key_to_index`: an all-digit key as a list index, capped at `i32::MAX`.
fn key_to_index(key: &str) -> Option<usize> {
    if key.is_empty() || !key.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let cap = usize::try_from(i32::MAX).unwrap_or(usize::MAX);
    Some(key.parse::<usize>().map_or(cap, |i| i.min(cap)))
}

fn prefix_of(path: &[String]) -> String {
    path.iter().map(|p| format!("{p}.")).collect()
}

/// Turns objects whose keys are all list indexes into arrays, recursively.
fn listify(map: Map<String, Value>, path: &mut Vec<String>) -> Result<Value, Error> {
    let mut has_index = false;
    let mut has_member = false;
    let mut out = Map::with_capacity(map.len());
    for (key, value) in map {
        if key_to_index(&key).is_some() {
            has_index = true;
        } else {
            has_member = true;
        }
        let value = match value {
            Value::Object(inner) => {
                path.push(key.clone());
                let v = listify(inner, path)?;
                path.pop();
                v
            }
            other => other,
        };
        out.insert(key, value);
    }
    if has_index && has_member {
        let prefix = prefix_of(path);
        return Err(Error::syntax(format!(
            "Parameters '{prefix}*' used inconsistently"
        )));
    }
    if !has_index {
        return Ok(Value::Object(out));
    }
    // As in qemu: indexes beyond the element count leave a hole that is reported.
    let mut elements: Vec<Option<Value>> = vec![None; out.len()];
    let mut max_index = 0;
    for (key, value) in out {
        let index = key_to_index(&key).unwrap_or(usize::MAX);
        max_index = max_index.max(index);
        if let Some(slot) = elements.get_mut(index) {
            *slot = Some(value);
        }
    }
    let count = elements.len().min(max_index.saturating_add(1));
    let mut list = Vec::with_capacity(count);
    for (i, element) in elements.into_iter().take(count).enumerate() {
        match element {
            Some(v) => list.push(v),
            None => {
                let prefix = prefix_of(path);
                return Err(Error::syntax(format!("Parameter '{prefix}{i}' missing")));
            }
        }
    }
    if list.len() < max_index.saturating_add(1) {
        let prefix = prefix_of(path);
        let i = list.len();
        return Err(Error::syntax(format!("Parameter '{prefix}{i}' missing")));
    }
    Ok(Value::Array(list))
}

/// qemu's QemuOpts syntax (used by `--chardev`): flat `key=value` pairs where dots are
/// ordinary key characters, the first element may be a bare value for `implied_key`
/// (with `,,` escapes), and other bare elements are deprecated boolean flags
/// (`server` means `server=on`, `nowait` means `wait=off`).
#[derive(Debug, Clone, PartialEq)]
pub struct QemuOpts {
    /// Flat object of string values; the last of repeated keys wins.
    pub value: Value,
    /// Whether a bare `help` or `?` was given.
    pub help: bool,
    /// Deprecation warnings qemu would print (without the program prefix).
    pub warnings: Vec<String>,
}

/// Parses QemuOpts text; see [`QemuOpts`].
pub fn parse_qemu_opts(input: &str, implied_key: Option<&str>) -> Result<QemuOpts, Error> {
    let mut map = Map::new();
    let mut help = false;
    let mut warnings = Vec::new();
    let mut rest = input;
    let mut implied = implied_key;
    while !rest.is_empty() {
        let len = rest.find(['=', ',']).unwrap_or(rest.len());
        let (name, value, next) = if rest[len..].starts_with('=') {
            let (value, next) = scan_value(&rest[len + 1..]);
            (rest[..len].to_owned(), value, next)
        } else if let Some(key) = implied {
            let (value, next) = scan_value(rest);
            help |= is_help(&value);
            (key.to_owned(), value, next)
        } else {
            let flag = &rest[..len];
            let (name, value) = match flag.strip_prefix("no") {
                Some(n) => (n.to_owned(), "off"),
                None => (flag.to_owned(), "on"),
            };
            if is_help(&name) {
                help = true;
            } else {
                warnings.push(format!(
                    "short-form boolean option '{flag}' deprecated\nPlease use {name}={value} instead"
                ));
            }
            (name, value.to_owned(), skip_comma(&rest[len..]))
        };
        if help {
            break;
        }
        if name.is_empty() {
            return Err(Error::syntax("Invalid parameter ''"));
        }
        map.insert(name, Value::String(value));
        implied = None;
        rest = next;
    }
    Ok(QemuOpts {
        value: Value::Object(map),
        help,
        warnings,
    })
}

fn is_help(s: &str) -> bool {
    s == "help" || s == "?"
}

#[cfg(test)]
#[path = "keyval_tests.rs"]
mod tests;
