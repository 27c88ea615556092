//! Token list to JSON value, with qemu's error messages.
//!
//! The streamer hands over the tokens of exactly one top-level value. Strings
//! are decoded here: escapes (including `\'`), surrogate pairs, and modified
//! UTF-8 (`C0 80` is accepted for U+0000). Surrogates, noncharacters and
//! overlong encodings are rejected, as qemu does.

use serde_json::{Map, Number, Value};

use crate::lexer::TokenKind;
use crate::ParseError;

/// One token of the current message: its kind and its text in the buffer.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Token {
    pub(crate) kind: TokenKind,
    pub(crate) start: usize,
    pub(crate) end: usize,
}

struct Parser<'a> {
    text: &'a [u8],
    tokens: &'a [Token],
    pos: usize,
}

type PResult<T> = Result<T, ParseError>;

fn err<T>(msg: impl std::fmt::Display) -> PResult<T> {
    Err(ParseError::new(format!("JSON parse error, {msg}")))
}

/// Parse the tokens of one message.
pub(crate) fn parse(text: &[u8], tokens: &[Token]) -> Result<Value, ParseError> {
    let mut parser = Parser {
        text,
        tokens,
        pos: 0,
    };
    parser.value()
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<Token> {
        self.tokens.get(self.pos).copied()
    }

    fn pop(&mut self) -> PResult<Token> {
        let tok = self.peek();
        self.pos += 1;
        tok.map_or_else(|| err("premature EOI"), Ok)
    }

    fn text_of(&self, tok: Token) -> &'a [u8] {
        self.text.get(tok.start..tok.end).unwrap_or_default()
    }

    fn value(&mut self) -> PResult<Value> {
        let Some(tok) = self.peek() else {
            return err("premature EOI");
        };
        match tok.kind {
            TokenKind::LCurly => self.object(),
            TokenKind::LSquare => self.array(),
            TokenKind::Integer | TokenKind::Float => {
                self.pos += 1;
                number(tok.kind, self.text_of(tok))
            }
            TokenKind::String => {
                self.pos += 1;
                string(self.text_of(tok)).map(Value::String)
            }
            TokenKind::Keyword => {
                self.pos += 1;
                keyword(self.text_of(tok))
            }
            _ => err("expecting value"),
        }
    }

    fn object(&mut self) -> PResult<Value> {
        self.pos += 1; // '{'
        let mut map = Map::new();
        match self.peek() {
            None => return err("premature EOI"),
            Some(t) if t.kind == TokenKind::RCurly => {
                self.pos += 1;
                return Ok(Value::Object(map));
            }
            Some(_) => {}
        }
        loop {
            self.pair(&mut map)?;
            match self.pop()?.kind {
                TokenKind::RCurly => return Ok(Value::Object(map)),
                TokenKind::Comma => {}
                _ => return err("expected separator in dict"),
            }
        }
    }

    fn pair(&mut self, map: &mut Map<String, Value>) -> PResult<()> {
        if self.peek().is_none() {
            return err("premature EOI");
        }
        let Value::String(key) = self.value()? else {
            return err("key is not a string in object");
        };
        if self.pop()?.kind != TokenKind::Colon {
            return err("missing : in object pair");
        }
        let value = self.value()?;
        if map.contains_key(&key) {
            return err("duplicate key");
        }
        map.insert(key, value);
        Ok(())
    }

    fn array(&mut self) -> PResult<Value> {
        self.pos += 1; // '['
        let mut list = Vec::new();
        match self.peek() {
            None => return err("premature EOI"),
            Some(t) if t.kind == TokenKind::RSquare => {
                self.pos += 1;
                return Ok(Value::Array(list));
            }
            Some(_) => {}
        }
        loop {
            list.push(self.value()?);
            match self.pop()?.kind {
                TokenKind::RSquare => return Ok(Value::Array(list)),
                TokenKind::Comma => {}
                _ => return err("expected separator in list"),
            }
        }
    }
}

fn keyword(text: &[u8]) -> PResult<Value> {
    match text {
        b"true" => Ok(Value::Bool(true)),
        b"false" => Ok(Value::Bool(false)),
        b"null" => Ok(Value::Null),
        _ => err(format_args!(
            "invalid keyword '{}'",
            String::from_utf8_lossy(text)
        )),
    }
}

/// Integers become i64 if they fit, else u64, else a double (as qemu's QNum).
fn number(kind: TokenKind, text: &[u8]) -> PResult<Value> {
    // The lexer only lets ASCII digits, signs, '.', 'e' and 'E' through.
    let s = std::str::from_utf8(text).unwrap_or_default();
    if kind == TokenKind::Integer {
        if let Ok(v) = s.parse::<i64>() {
            return Ok(Value::Number(v.into()));
        }
        if let Ok(v) = s.parse::<u64>() {
            return Ok(Value::Number(v.into()));
        }
    }
    // qemu would produce an infinity here; JSON values cannot hold one.
    match s.parse::<f64>().ok().and_then(Number::from_f64) {
        Some(n) => Ok(Value::Number(n)),
        None => err(format_args!("number '{s}' is out of range")),
    }
}

/// Whether qemu considers `cp` a valid character (not a surrogate, not a
/// noncharacter, in range).
pub(crate) fn is_valid_codepoint(cp: u32) -> bool {
    cp <= 0x10FFFF
        && !(0xD800..=0xDFFF).contains(&cp)
        && !(0xFDD0..=0xFDEF).contains(&cp)
        && (cp & 0xFFFE) != 0xFFFE
}

/// Four hex digits at `at`, or None if any is missing or not hex.
fn hex4(text: &[u8], at: usize) -> Option<u32> {
    let digits = text.get(at..at + 4)?;
    digits.iter().try_fold(0u32, |acc, &d| {
        let v = (d as char).to_digit(16)?;
        Some(acc << 4 | v)
    })
}

/// Decode a `\uXXXX` escape (and a following low surrogate) whose backslash
/// is at `beg`. Returns the character and the index after the escape.
fn unicode_escape(text: &[u8], beg: usize) -> PResult<(char, usize)> {
    let mut end = beg + 6;
    let mut cp = hex4(text, beg + 2);
    if let Some(hi @ 0xD800..=0xDBFF) = cp {
        if text.get(end) == Some(&b'\\') && text.get(end + 1) == Some(&b'u') {
            cp = match hex4(text, end + 2) {
                Some(lo @ 0xDC00..=0xDFFF) => {
                    end += 6;
                    Some(0x10000 + ((hi & 0x3FF) << 10) + (lo & 0x3FF))
                }
                _ => None,
            };
        }
    }
    match cp
        .filter(|&c| is_valid_codepoint(c))
        .and_then(char::from_u32)
    {
        Some(c) => Ok((c, end)),
        None => {
            let shown = text.get(beg..end.min(text.len())).unwrap_or_default();
            err(format_args!(
                "{} is not a valid Unicode character",
                String::from_utf8_lossy(shown)
            ))
        }
    }
}

/// Decode one modified-UTF-8 character starting at `i`.
fn utf8_char(text: &[u8], i: usize) -> Option<(char, usize)> {
    let b0 = *text.get(i)?;
    let (len, min, init) = match b0 {
        0x00..=0x7F => return Some((char::from(b0), i + 1)),
        0xC0..=0xDF => (2, 0x80, u32::from(b0 & 0x1F)),
        0xE0..=0xEF => (3, 0x800, u32::from(b0 & 0x0F)),
        0xF0..=0xF7 => (4, 0x10000, u32::from(b0 & 0x07)),
        _ => return None,
    };
    let mut cp = init;
    for k in 1..len {
        let b = *text.get(i + k)?;
        if b & 0xC0 != 0x80 {
            return None;
        }
        cp = cp << 6 | u32::from(b & 0x3F);
    }
    // Modified UTF-8 encodes U+0000 as the overlong C0 80.
    let overlong = cp < min && !(len == 2 && cp == 0);
    if overlong || !is_valid_codepoint(cp) {
        return None;
    }
    Some((char::from_u32(cp)?, i + len))
}

fn simple_escape(b: u8) -> Option<char> {
    Some(match b {
        b'"' => '"',
        b'\'' => '\'',
        b'\\' => '\\',
        b'/' => '/',
        b'b' => '\u{8}',
        b'f' => '\u{c}',
        b'n' => '\n',
        b'r' => '\r',
        b't' => '\t',
        _ => return None,
    })
}

/// Decode a string token, quotes included.
fn string(text: &[u8]) -> PResult<String> {
    let Some((&quote, _)) = text.split_first() else {
        return err("premature EOI");
    };
    let mut out = String::with_capacity(text.len());
    let mut i = 1;
    while let Some(&b) = text.get(i) {
        if b == quote {
            return Ok(out);
        }
        if b == b'\\' {
            let esc = text.get(i + 1).copied().unwrap_or(0);
            if esc == b'u' {
                let (c, next) = unicode_escape(text, i)?;
                out.push(c);
                i = next;
            } else if let Some(c) = simple_escape(esc) {
                out.push(c);
                i += 2;
            } else {
                return err("invalid escape sequence in string");
            }
            continue;
        }
        match utf8_char(text, i) {
            Some((c, next)) => {
                out.push(c);
                i = next;
            }
            None => return err("invalid UTF-8 sequence in string"),
        }
    }
    // The lexer always closes strings; be defensive anyway.
    err("premature EOI")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(text: &[u8]) -> Result<String, String> {
        string(text).map_err(|e| e.to_string())
    }

    #[test]
    fn test_string_escapes_decode() {
        assert_eq!(
            s(br#""a\"\\\/\b\f\n\r\t\'""#).unwrap(),
            "a\"\\/\u{8}\u{c}\n\r\t'"
        );
        assert_eq!(s(br#"'x\u00e9\ud83d\ude00'"#).unwrap(), "x\u{e9}\u{1F600}");
        assert_eq!(s(b"\"\xc0\x80\"").unwrap(), "\0");
    }

    #[test]
    fn test_string_invalid_unicode_escape_messages_match_qemu() {
        let msg = |t: &[u8]| s(t).unwrap_err();
        assert_eq!(
            msg(br#""\ud800""#),
            r"JSON parse error, \ud800 is not a valid Unicode character"
        );
        assert_eq!(
            msg(br#""\u12""#),
            r#"JSON parse error, \u12" is not a valid Unicode character"#
        );
        assert_eq!(
            msg(br#""\ud83d\u0041""#),
            r"JSON parse error, \ud83d is not a valid Unicode character"
        );
        assert_eq!(
            msg(br#""\uFFFF""#),
            r"JSON parse error, \uFFFF is not a valid Unicode character"
        );
        assert_eq!(
            msg(br#""\x""#),
            "JSON parse error, invalid escape sequence in string"
        );
    }

    #[test]
    fn test_string_bad_utf8_is_rejected() {
        for bad in [
            &b"\"\xc3\""[..],
            b"\"\xef\xbf\xbf\"",
            b"\"\xc0\xaf\"",
            b"\"\xed\xa0\x80\"",
            b"\"\xf4\x90\x80\x80\"",
            b"\"\x80\"",
        ] {
            assert_eq!(
                s(bad).unwrap_err(),
                "JSON parse error, invalid UTF-8 sequence in string"
            );
        }
    }

    #[test]
    fn test_number_integer_ranges_follow_qnum() {
        let n = |t: &str, k| number(k, t.as_bytes()).unwrap();
        assert_eq!(
            n("-9223372036854775808", TokenKind::Integer),
            Value::from(i64::MIN)
        );
        assert_eq!(
            n("18446744073709551615", TokenKind::Integer),
            Value::from(u64::MAX)
        );
        assert!(n("18446744073709551616", TokenKind::Integer).is_f64());
        assert!(n("1E2", TokenKind::Float).is_f64());
        assert!(number(TokenKind::Float, b"1e400").is_err());
    }
}
