//! Byte-level JSON lexer with qemu's extensions and error recovery.
//!
//! The lexer is a state machine fed one byte at a time. It recognises the
//! same token language as qemu's monitor: RFC 8259 JSON plus single-quoted
//! strings and the `\'` escape. String contents are not validated here (that
//! is the parser's job); the lexer only rejects control characters, `0xFE`
//! and `0xFF` inside strings.
//!
//! On a lexical error the offending text (including the byte that made it
//! invalid) is reported and the lexer enters recovery: it skips input until a
//! structural character, an ASCII control character other than tab, or one
//! of the impossible UTF-8 bytes `0xFE`/`0xFF`, and resumes there. Clients
//! rely on this to resynchronise a confused monitor by sending `0xFF`.

/// Kind of a complete token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TokenKind {
    LCurly,
    RCurly,
    LSquare,
    RSquare,
    Colon,
    Comma,
    Integer,
    Float,
    Keyword,
    String,
}

/// What the lexer hands to its consumer.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum LexEvent<'a> {
    /// A complete token and its source text.
    Token(TokenKind, &'a [u8]),
    /// Invalid input; the text includes the byte that made it invalid.
    Error(&'a [u8]),
    /// One token grew beyond the size limit and was dropped.
    TokenTooLarge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Start,
    Recovery,
    DqString,
    DqEscape,
    SqString,
    SqEscape,
    Zero,
    Sign,
    Digits,
    Mantissa,
    MantissaDigits,
    ExpE,
    ExpSign,
    ExpDigits,
    Keyword,
}

/// Result of one transition.
enum Step {
    /// Consume the byte and move to a state.
    Go(State),
    /// Consume the byte; it completes a token.
    Emit(TokenKind),
    /// The token ended before this byte; emit it and look at the byte again.
    EmitBefore(TokenKind),
    /// Consume the byte; the token is invalid.
    Error,
    /// Leave recovery and look at the byte again from the start state.
    Resync,
    /// Consume and discard the byte (whitespace, skipped garbage).
    Skip(State),
}

fn is_ws(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\r' | b'\n')
}

fn structural(b: u8) -> Option<TokenKind> {
    Some(match b {
        b'{' => TokenKind::LCurly,
        b'}' => TokenKind::RCurly,
        b'[' => TokenKind::LSquare,
        b']' => TokenKind::RSquare,
        b':' => TokenKind::Colon,
        b',' => TokenKind::Comma,
        _ => return None,
    })
}

fn step_start(b: u8) -> Step {
    if let Some(kind) = structural(b) {
        return Step::Emit(kind);
    }
    match b {
        b'"' => Step::Go(State::DqString),
        b'\'' => Step::Go(State::SqString),
        b'0' => Step::Go(State::Zero),
        b'1'..=b'9' => Step::Go(State::Digits),
        b'-' => Step::Go(State::Sign),
        b'a'..=b'z' => Step::Go(State::Keyword),
        _ if is_ws(b) => Step::Skip(State::Start),
        _ => Step::Error,
    }
}

fn step_recovery(b: u8) -> Step {
    let resync = (b < 0x20 && b != b'\t') || b >= 0xFE || structural(b).is_some();
    if resync {
        Step::Resync
    } else {
        Step::Skip(State::Recovery)
    }
}

fn step_string(b: u8, quote: u8, body: State, escape: State) -> Step {
    match b {
        _ if b == quote => Step::Emit(TokenKind::String),
        b'\\' => Step::Go(escape),
        0x20..=0xFD => Step::Go(body),
        _ => Step::Error,
    }
}

fn step_escape(b: u8, body: State) -> Step {
    match b {
        0x20..=0xFD => Step::Go(body),
        _ => Step::Error,
    }
}

fn step_number(state: State, b: u8) -> Step {
    let digit = b.is_ascii_digit();
    match state {
        State::Zero if digit => Step::Error,
        State::Zero if b == b'.' => Step::Go(State::Mantissa),
        State::Zero => Step::EmitBefore(TokenKind::Integer),
        State::Sign if b == b'0' => Step::Go(State::Zero),
        State::Sign if digit => Step::Go(State::Digits),
        State::Digits if digit => Step::Go(State::Digits),
        State::Digits if b == b'.' => Step::Go(State::Mantissa),
        State::Digits | State::MantissaDigits if b == b'e' || b == b'E' => Step::Go(State::ExpE),
        State::Digits => Step::EmitBefore(TokenKind::Integer),
        State::Mantissa if digit => Step::Go(State::MantissaDigits),
        State::MantissaDigits if digit => Step::Go(State::MantissaDigits),
        State::MantissaDigits => Step::EmitBefore(TokenKind::Float),
        State::ExpE if b == b'+' || b == b'-' => Step::Go(State::ExpSign),
        State::ExpE | State::ExpSign | State::ExpDigits if digit => Step::Go(State::ExpDigits),
        State::ExpDigits => Step::EmitBefore(TokenKind::Float),
        _ => Step::Error,
    }
}

fn step(state: State, b: u8) -> Step {
    match state {
        State::Start => step_start(b),
        State::Recovery => step_recovery(b),
        State::DqString => step_string(b, b'"', State::DqString, State::DqEscape),
        State::SqString => step_string(b, b'\'', State::SqString, State::SqEscape),
        State::DqEscape => step_escape(b, State::DqString),
        State::SqEscape => step_escape(b, State::SqString),
        State::Keyword if b.is_ascii_lowercase() => Step::Go(State::Keyword),
        State::Keyword => Step::EmitBefore(TokenKind::Keyword),
        _ => step_number(state, b),
    }
}

/// The lexer state: current state and the text of the token being built.
#[derive(Debug)]
pub(crate) struct Lexer {
    state: State,
    token: Vec<u8>,
    max_token: usize,
}

impl Lexer {
    pub(crate) fn new(max_token: usize) -> Self {
        Self {
            state: State::Start,
            token: Vec::new(),
            max_token,
        }
    }

    /// Feed one byte, reporting events to `out`.
    pub(crate) fn feed_byte(&mut self, b: u8, out: &mut dyn FnMut(LexEvent<'_>)) {
        loop {
            match step(self.state, b) {
                Step::Go(next) => {
                    self.token.push(b);
                    self.state = next;
                }
                Step::Skip(next) => {
                    self.token.clear();
                    self.state = next;
                }
                Step::Emit(kind) => {
                    self.token.push(b);
                    out(LexEvent::Token(kind, &self.token));
                    self.reset(State::Start);
                }
                Step::EmitBefore(kind) => {
                    out(LexEvent::Token(kind, &self.token));
                    self.reset(State::Start);
                    continue;
                }
                Step::Error => {
                    self.token.push(b);
                    out(LexEvent::Error(&self.token));
                    self.reset(State::Recovery);
                }
                Step::Resync => {
                    self.reset(State::Start);
                    continue;
                }
            }
            break;
        }
        if self.token.len() > self.max_token {
            // Like qemu: drop the token, report it and restart lexing.
            out(LexEvent::TokenTooLarge);
            self.reset(State::Start);
        }
    }

    /// End of input: terminate or reject whatever token is in progress.
    pub(crate) fn flush(&mut self, out: &mut dyn FnMut(LexEvent<'_>)) {
        // Bounded: each iteration either reaches Start or moves to Recovery,
        // which resynchronises on the next iteration.
        for _ in 0..3 {
            match self.state {
                State::Start => return,
                State::Recovery => self.reset(State::Start),
                state => match step(state, 0) {
                    Step::EmitBefore(kind) => {
                        out(LexEvent::Token(kind, &self.token));
                        self.reset(State::Start);
                    }
                    _ => {
                        out(LexEvent::Error(&self.token));
                        self.reset(State::Recovery);
                    }
                },
            }
        }
    }

    fn reset(&mut self, state: State) {
        self.token.clear();
        self.state = state;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, Eq)]
    enum Ev {
        T(TokenKind, String),
        E(String),
        Big,
    }

    fn lex(input: &[u8]) -> Vec<Ev> {
        let mut lexer = Lexer::new(1 << 20);
        let mut evs = Vec::new();
        let mut push = |e: LexEvent<'_>| {
            evs.push(match e {
                LexEvent::Token(k, t) => Ev::T(k, String::from_utf8_lossy(t).into_owned()),
                LexEvent::Error(t) => Ev::E(String::from_utf8_lossy(t).into_owned()),
                LexEvent::TokenTooLarge => Ev::Big,
            })
        };
        for &b in input {
            lexer.feed_byte(b, &mut push);
        }
        lexer.flush(&mut push);
        evs
    }

    fn t(k: TokenKind, s: &str) -> Ev {
        Ev::T(k, s.to_owned())
    }

    #[test]
    fn test_lexer_numbers_and_keywords_split_correctly() {
        use TokenKind::*;
        assert_eq!(
            lex(b"[0,-1.5e+3,12,true]"),
            vec![
                t(LSquare, "["),
                t(Integer, "0"),
                t(Comma, ","),
                t(Float, "-1.5e+3"),
                t(Comma, ","),
                t(Integer, "12"),
                t(Comma, ","),
                t(Keyword, "true"),
                t(RSquare, "]"),
            ]
        );
    }

    #[test]
    fn test_lexer_strings_with_structural_chars_are_one_token() {
        use TokenKind::*;
        assert_eq!(
            lex(br#""{[\"]}" 'a"b\''"#),
            vec![t(String, r#""{[\"]}""#), t(String, r#"'a"b\''"#)]
        );
    }

    #[test]
    fn test_lexer_error_includes_offending_byte_then_recovers() {
        use TokenKind::*;
        // A space does not end recovery; a newline does.
        assert_eq!(lex(b"01 x"), vec![Ev::E("01".into())]);
        assert_eq!(lex(b"01\nx"), vec![Ev::E("01".into()), t(Keyword, "x")]);
        assert_eq!(lex(b"-}{"), vec![Ev::E("-}".into()), t(LCurly, "{")]);
        // Recovery skips to the next structural character.
        assert_eq!(lex(b"@abc def,"), vec![Ev::E("@".into()), t(Comma, ",")]);
    }

    #[test]
    fn test_lexer_ff_in_string_resyncs_at_brace() {
        use TokenKind::*;
        let evs = lex(b"\"ab\xff{");
        assert_eq!(evs, vec![Ev::E("\"ab\u{FFFD}".into()), t(LCurly, "{")]);
    }

    #[test]
    fn test_lexer_flush_unterminated_string_reports_error() {
        assert_eq!(lex(b"\"abc"), vec![Ev::E("\"abc".into())]);
        assert_eq!(lex(b"12"), vec![t(TokenKind::Integer, "12")]);
    }

    #[test]
    fn test_lexer_oversized_token_is_reported() {
        let mut lexer = Lexer::new(4);
        let mut big = 0;
        for &b in b"\"abcdefg" {
            lexer.feed_byte(b, &mut |e| {
                if e == LexEvent::TokenTooLarge {
                    big += 1;
                }
            });
        }
        assert_eq!(big, 1);
    }
}
