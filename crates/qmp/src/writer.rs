//! JSON output byte-for-byte like qemu's monitor.
//!
//! qemu stores objects in a hash table of 512 buckets and prints members in
//! bucket order (newest first within a bucket), so its key order looks
//! random but is deterministic; clients and test suites that compare text
//! see exactly that order. We reproduce it with the same string hash.
//! Other details that match qemu: `": "` and `", "` separators, every
//! non-ASCII character escaped as `\uXXXX` (upper-case hex, surrogate pairs
//! above U+FFFF), doubles printed like C's `%.17g`, pretty mode indenting by
//! four spaces with empty containers split over two lines, and `\r\n` line
//! endings (the monitor turns every `\n` into `\r\n`).

use std::fmt::Write as _;

use serde_json::{Map, Number, Value};

use crate::parser::is_valid_codepoint;

const BUCKETS: u32 = 512;

/// qemu's QDict bucket for `key` (the tdb hash over its modified UTF-8).
fn bucket(key: &str) -> u32 {
    let mut bytes = Vec::with_capacity(key.len() + 2);
    for c in key.chars() {
        if c == '\0' {
            bytes.extend_from_slice(&[0xC0, 0x80]);
        } else {
            let mut buf = [0u8; 4];
            bytes.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
        }
    }
    let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
    let mut value = 0x238F_13AFu32.wrapping_mul(len);
    for (i, &b) in bytes.iter().enumerate() {
        let shift = (i * 5 % 24) as u32;
        value = value.wrapping_add(u32::from(b) << shift);
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345) % BUCKETS
}

/// Members of `map` in the order qemu would print (and iterate) them.
pub fn qdict_order(map: &Map<String, Value>) -> Vec<(&String, &Value)> {
    let mut entries: Vec<(u32, usize, &String, &Value)> = map
        .iter()
        .enumerate()
        .map(|(i, (k, v))| (bucket(k), i, k, v))
        .collect();
    // Within a bucket the most recently inserted key comes first.
    entries.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    entries.into_iter().map(|(_, _, k, v)| (k, v)).collect()
}

/// Serialise `value` as qemu does, without the trailing line ending.
pub fn to_json(value: &Value, pretty: bool) -> String {
    let mut out = String::new();
    write_value(&mut out, value, pretty, 0);
    out
}

/// Serialise one monitor message, line ending included.
pub fn to_message(value: &Value, pretty: bool) -> String {
    let mut out = to_json(value, pretty);
    out.push_str("\r\n");
    out
}

fn newline(out: &mut String, pretty: bool, level: usize) {
    if pretty {
        out.push_str("\r\n");
        for _ in 0..level {
            out.push_str("    ");
        }
    }
}

fn write_value(out: &mut String, value: &Value, pretty: bool, level: usize) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_string(out, s),
        Value::Array(list) => {
            out.push('[');
            for (i, item) in list.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                    out.push_str(if pretty { "" } else { " " });
                }
                newline(out, pretty, level + 1);
                write_value(out, item, pretty, level + 1);
            }
            close(out, ']', pretty, level);
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, v)) in qdict_order(map).into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                    out.push_str(if pretty { "" } else { " " });
                }
                newline(out, pretty, level + 1);
                write_string(out, k);
                out.push_str(": ");
                write_value(out, v, pretty, level + 1);
            }
            close(out, '}', pretty, level);
        }
    }
}

fn close(out: &mut String, bracket: char, pretty: bool, level: usize) {
    // qemu puts the closing bracket on its own line even for empty containers.
    newline(out, pretty, level);
    out.push(bracket);
}

fn write_number(out: &mut String, n: &Number) {
    if let Some(i) = n.as_i64() {
        let _ = write!(out, "{i}");
    } else if let Some(u) = n.as_u64() {
        let _ = write!(out, "{u}");
    } else if let Some(f) = n.as_f64() {
        out.push_str(&format_g17(f));
    }
}

/// C's `printf("%.17g", f)` for finite `f`.
pub(crate) fn format_g17(f: f64) -> String {
    const PRECISION: i32 = 17;
    if f == 0.0 {
        return if f.is_sign_negative() { "-0" } else { "0" }.to_owned();
    }
    // 17 significant digits, correctly rounded, in scientific form.
    let sci = format!("{:.*e}", (PRECISION - 1) as usize, f);
    let Some((mantissa, exp)) = sci.split_once('e') else {
        return sci;
    };
    let exp: i32 = exp.parse().unwrap_or(0);
    if !(-4..PRECISION).contains(&exp) {
        let mantissa = trim_fraction(mantissa);
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{mantissa}e{sign}{:02}", exp.unsigned_abs());
    }
    let decimals = (PRECISION - 1 - exp).max(0) as usize;
    trim_fraction(&format!("{f:.decimals$}")).to_owned()
}

fn trim_fraction(s: &str) -> &str {
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.')
    } else {
        s
    }
}

fn write_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(c),
            _ => {
                let cp = u32::from(c);
                // qemu replaces noncharacters it cannot encode.
                let cp = if is_valid_codepoint(cp) { cp } else { 0xFFFD };
                if cp >= 0x10000 {
                    let v = cp - 0x10000;
                    let hi = 0xD800 | (v >> 10);
                    let lo = 0xDC00 | (v & 0x3FF);
                    let _ = write!(out, "\\u{hi:04X}\\u{lo:04X}");
                } else {
                    let _ = write!(out, "\\u{cp:04X}");
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn test_qdict_order_matches_qemu_samples() {
        let v = json!({"id": 1, "return": {}});
        assert_eq!(to_json(&v, false), r#"{"return": {}, "id": 1}"#);
        let v = json!({"error": {"desc": "d", "class": "c"}, "id": 1});
        assert_eq!(
            to_json(&v, false),
            r#"{"id": 1, "error": {"class": "c", "desc": "d"}}"#
        );
        let v = json!({"major": 10, "minor": 0, "micro": 2});
        assert_eq!(
            to_json(&v, false),
            r#"{"micro": 2, "minor": 0, "major": 10}"#
        );
        let v = json!({"event": "E", "timestamp": {"seconds": 1, "microseconds": 2}, "data": {}});
        assert_eq!(
            to_json(&v, false),
            r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "E", "data": {}}"#
        );
        let v = json!({"b": 1, "a": 2, "event": 3, "data": 4, "timestamp": 5});
        assert_eq!(
            to_json(&v, false),
            r#"{"timestamp": 5, "a": 2, "b": 1, "event": 3, "data": 4}"#
        );
    }

    #[test]
    fn test_string_escapes_match_qemu() {
        let v = json!("\u{e9}\u{1}/<>\u{2028} \u{1F600} \t\n\u{8}\u{c}\r\"\\ \u{7f} \u{0}");
        assert_eq!(
            to_json(&v, false),
            r#""\u00E9\u0001/<>\u2028 \uD83D\uDE00 \t\n\b\f\r\"\\ \u007F \u0000""#
        );
    }

    #[test]
    fn test_doubles_print_like_printf_g17() {
        let cases = [
            (1.5, "1.5"),
            (1e100, "1e+100"),
            (0.1, "0.10000000000000001"),
            (18446744073709551616.0, "1.8446744073709552e+19"),
            (-9223372036854775809.0, "-9.2233720368547758e+18"),
            (100.0, "100"),
            (1.25e-7, "1.2499999999999999e-07"),
            (-0.0, "-0"),
            (1e-5, "1.0000000000000001e-05"),
            (1e17, "1e+17"),
            (1e16, "10000000000000000"),
            (123456.789, "123456.789"),
            (1e-4, "0.0001"),
        ];
        for (f, want) in cases {
            assert_eq!(format_g17(f), want, "{f:e}");
        }
    }

    #[test]
    fn test_pretty_output_matches_qemu_layout() {
        let v = json!({"return": {}, "id": [1, {"a": 2}], "x": []});
        let want = "{\r\n    \"return\": {\r\n    },\r\n    \"id\": [\r\n        1,\r\n        {\r\n            \"a\": 2\r\n        }\r\n    ],\r\n    \"x\": [\r\n    ]\r\n}";
        let got = to_json(&v, true);
        // Key order is qemu's; check layout on a fixed-order rendering.
        assert!(got.starts_with("{\r\n    \""), "{got}");
        let single = json!({"return": {}});
        assert_eq!(
            to_json(&single, true),
            "{\r\n    \"return\": {\r\n    }\r\n}"
        );
        let nested = json!({"id": [1, {"a": 2}]});
        assert_eq!(
            to_json(&nested, true),
            "{\r\n    \"id\": [\r\n        1,\r\n        {\r\n            \"a\": 2\r\n        }\r\n    ]\r\n}"
        );
        assert_eq!(want.matches("\r\n").count(), got.matches("\r\n").count());
    }
}
