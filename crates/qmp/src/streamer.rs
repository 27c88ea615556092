//! Splitting a byte stream into top-level JSON values.
//!
//! Bytes arrive in arbitrary chunks. Tokens are collected while braces and
//! brackets are open; when the nesting count returns to zero (or goes
//! negative, as after a stray `}`), the collected tokens are parsed and the
//! value or error is emitted. Lexical errors, limit violations and parse
//! errors all discard the collected tokens, so the next value starts clean.

use serde_json::Value;

use crate::lexer::{LexEvent, Lexer, TokenKind};
use crate::parser::{self, Token};

/// A JSON syntax or limit error; its text is what qemu puts in `desc`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{desc}")]
pub struct ParseError {
    desc: String,
}

impl ParseError {
    pub(crate) fn new(desc: String) -> Self {
        Self { desc }
    }

    /// The error description, e.g. `JSON parse error, expecting value`.
    pub fn desc(&self) -> &str {
        &self.desc
    }
}

/// Bounds on one message; the defaults are qemu's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Total bytes of all tokens of one message, and of any single token.
    pub max_size: usize,
    /// Tokens in one message.
    pub max_tokens: usize,
    /// Open braces plus open brackets.
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_size: 64 << 20,
            max_tokens: 2 << 20,
            max_depth: 1024,
        }
    }
}

/// Incremental JSON message splitter and parser (no I/O).
#[derive(Debug)]
pub struct JsonStreamer {
    lexer: Lexer,
    pending: Pending,
}

/// Tokens of the message being collected.
#[derive(Debug)]
struct Pending {
    limits: Limits,
    text: Vec<u8>,
    tokens: Vec<Token>,
    braces: i64,
    brackets: i64,
}

impl Default for JsonStreamer {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonStreamer {
    /// A streamer with qemu's limits.
    pub fn new() -> Self {
        Self::with_limits(Limits::default())
    }

    /// A streamer with custom limits.
    pub fn with_limits(limits: Limits) -> Self {
        Self {
            lexer: Lexer::new(limits.max_size),
            pending: Pending {
                limits,
                text: Vec::new(),
                tokens: Vec::new(),
                braces: 0,
                brackets: 0,
            },
        }
    }

    /// Feed bytes; returns every value (or error) completed by them, in order.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Result<Value, ParseError>> {
        let mut out = Vec::new();
        let pending = &mut self.pending;
        let mut sink = |ev: LexEvent<'_>| pending.on_event(ev, &mut out);
        for &b in bytes {
            self.lexer.feed_byte(b, &mut sink);
        }
        out
    }

    /// End of input: complete or reject whatever is buffered.
    pub fn finish(&mut self) -> Vec<Result<Value, ParseError>> {
        let mut out = Vec::new();
        let pending = &mut self.pending;
        self.lexer.flush(&mut |ev| pending.on_event(ev, &mut out));
        if !pending.tokens.is_empty() {
            out.push(pending.parse());
        }
        out
    }

    /// Whether a partial message is buffered.
    pub fn is_idle(&self) -> bool {
        self.pending.tokens.is_empty()
    }
}

impl Pending {
    fn on_event(&mut self, ev: LexEvent<'_>, out: &mut Vec<Result<Value, ParseError>>) {
        match ev {
            LexEvent::Token(kind, text) => {
                if let Some(item) = self.push(kind, text) {
                    out.push(item);
                }
            }
            LexEvent::Error(text) => {
                // qemu prints the token as a C string: it stops at a NUL.
                let shown = text.split(|&b| b == 0).next().unwrap_or_default();
                let desc = format!(
                    "JSON parse error, stray '{}'",
                    String::from_utf8_lossy(shown)
                );
                out.push(self.fail(&desc));
            }
            LexEvent::TokenTooLarge => out.push(self.fail("JSON token size limit exceeded")),
        }
    }

    fn push(&mut self, kind: TokenKind, text: &[u8]) -> Option<Result<Value, ParseError>> {
        match kind {
            TokenKind::LCurly => self.braces += 1,
            TokenKind::RCurly => self.braces -= 1,
            TokenKind::LSquare => self.brackets += 1,
            TokenKind::RSquare => self.brackets -= 1,
            _ => {}
        }
        let limits = self.limits;
        if self.text.len() + text.len() + 1 > limits.max_size {
            return Some(self.fail("JSON token size limit exceeded"));
        }
        if self.tokens.len() + 1 > limits.max_tokens {
            return Some(self.fail("JSON token count limit exceeded"));
        }
        let depth = self.braces + self.brackets;
        if depth > 0 && depth.unsigned_abs() > limits.max_depth as u64 {
            return Some(self.fail("JSON nesting depth limit exceeded"));
        }
        let start = self.text.len();
        self.text.extend_from_slice(text);
        self.tokens.push(Token {
            kind,
            start,
            end: self.text.len(),
        });
        let open = self.braces > 0 || self.brackets > 0;
        if open && self.braces >= 0 && self.brackets >= 0 {
            return None;
        }
        Some(self.parse())
    }

    fn parse(&mut self) -> Result<Value, ParseError> {
        let result = parser::parse(&self.text, &self.tokens);
        self.reset();
        result
    }

    fn fail(&mut self, desc: &str) -> Result<Value, ParseError> {
        self.reset();
        Err(ParseError::new(desc.to_owned()))
    }

    fn reset(&mut self) {
        self.braces = 0;
        self.brackets = 0;
        self.tokens.clear();
        self.text.clear();
        // Do not keep a huge buffer around after one large message.
        if self.text.capacity() > 1 << 20 {
            self.text.shrink_to(64 << 10);
            self.tokens.shrink_to(4096);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn descs(items: Vec<Result<Value, ParseError>>) -> Vec<Result<Value, String>> {
        items
            .into_iter()
            .map(|r| r.map_err(|e| e.desc().to_owned()))
            .collect()
    }

    fn feed_all(input: &[u8]) -> Vec<Result<Value, String>> {
        let mut s = JsonStreamer::new();
        let mut out = s.feed(input);
        out.extend(s.finish());
        descs(out)
    }

    #[test]
    fn test_streamer_chunked_input_yields_same_values() {
        let input = br#"{"execute": "a", "arguments": {"x": [1, {"y": "}]"}]}} {"b": 'q\'}'}"#;
        let whole = feed_all(input);
        assert_eq!(whole.len(), 2);
        for chunk in 1..input.len() {
            let mut s = JsonStreamer::new();
            let mut out = Vec::new();
            for piece in input.chunks(chunk) {
                out.extend(s.feed(piece));
            }
            out.extend(s.finish());
            assert_eq!(descs(out), whole, "chunk size {chunk}");
        }
    }

    #[test]
    fn test_streamer_nested_and_escaped_strings_parse() {
        let out = feed_all(br#"{"a": {"b": [[], {}, "x\"}{", "\\"]}}"#);
        assert_eq!(out, vec![Ok(json!({"a": {"b": [[], {}, "x\"}{", "\\"]}}))]);
    }

    #[test]
    fn test_streamer_stray_close_brace_reports_expecting_value() {
        let out = feed_all(b"}\n{\"a\":1}}");
        let e = Err("JSON parse error, expecting value".to_owned());
        assert_eq!(out, vec![e.clone(), Ok(json!({"a": 1})), e]);
    }

    #[test]
    fn test_streamer_garbage_then_recovery() {
        let out = feed_all(b"garbage\n{\"a\":3\xff{\"a\":4}");
        assert_eq!(
            out,
            vec![
                Err("JSON parse error, invalid keyword 'garbage'".to_owned()),
                Err("JSON parse error, stray '\u{FFFD}'".to_owned()),
                Ok(json!({"a": 4})),
            ]
        );
    }

    #[test]
    fn test_streamer_parse_errors_match_qemu_texts() {
        let cases: &[(&[u8], &str)] = &[
            (b"{\"a\" \"x\"}", "missing : in object pair"),
            (b"{1:2}", "key is not a string in object"),
            (b"[1 2]", "expected separator in list"),
            (b"{\"a\":1 \"b\":2}", "expected separator in dict"),
            (b"{\"a\":1,\"a\":2}", "duplicate key"),
            (b"[1,]", "expecting value"),
            (b"01", "stray '01'"),
            (b"\"a\x01b\"", "stray '\"a\u{1}'"),
            (b"\x00", "stray ''"),
        ];
        for (input, want) in cases {
            let out = feed_all(input);
            let want = format!("JSON parse error, {want}");
            assert_eq!(out.first(), Some(&Err(want)), "input {input:?}");
        }
    }

    #[test]
    fn test_streamer_depth_limit_errors_then_resets() {
        let mut input = vec![b'['; 1025];
        input.extend_from_slice(b"]]");
        let out = feed_all(&input);
        assert_eq!(
            out,
            vec![
                Err("JSON nesting depth limit exceeded".to_owned()),
                Err("JSON parse error, expecting value".to_owned()),
                Err("JSON parse error, expecting value".to_owned()),
            ]
        );
        let mut ok = vec![b'['; 1024];
        ok.extend(vec![b']'; 1024]);
        assert!(matches!(feed_all(&ok).as_slice(), [Ok(_)]));
    }

    #[test]
    fn test_streamer_size_and_count_limits_are_enforced() {
        let limits = Limits {
            max_size: 32,
            max_tokens: 5,
            max_depth: 8,
        };
        let mut s = JsonStreamer::with_limits(limits);
        let out = descs(s.feed(b"[1,2,3,4]"));
        assert_eq!(out[0], Err("JSON token count limit exceeded".to_owned()));
        let mut s = JsonStreamer::with_limits(limits);
        let out = descs(s.feed(b"[\"0123456789\", \"0123456789\", \"0123456789\"]"));
        assert_eq!(out[0], Err("JSON token size limit exceeded".to_owned()));
        // Still usable afterwards.
        assert_eq!(descs(s.feed(b"{}")), vec![Ok(json!({}))]);
    }

    #[test]
    fn test_streamer_finish_with_open_object_reports_premature_eoi() {
        let out = feed_all(b"{\"a\": 1");
        assert_eq!(out, vec![Err("JSON parse error, premature EOI".to_owned())]);
    }
}
