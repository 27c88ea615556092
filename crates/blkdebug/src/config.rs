//! blkdebug's `config` file: qemu's ini dialect read by its QemuOpts
//! config parser.
//!
//! ```text
//! # comment (only in the first column)
//! [inject-error]
//! event = "l2_update"
//! errno = "28"
//!
//! [set-state]
//! event = "write_aio"
//! state = "1"
//! new_state = "2"
//! ```
//!
//! Values must be quoted: as in qemu, an unquoted value reads as the empty
//! string, and a line `key="v"` (no blanks around `=`) names a key
//! `key="v"`. Sections may carry an id (`[inject-error "a"]`). Errors use
//! qemu's wording; key and value errors are found while reading, rule
//! errors (event, iotype) afterwards, error sections before state sections.

use qsd_block::DebugEvent;

use crate::rules::{InjectSpec, IoType, SetStateSpec};

/// A problem with a blkdebug config file (qemu's message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// The rules a config file defines, in file order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigRules {
    /// `[inject-error]` sections.
    pub inject: Vec<InjectSpec>,
    /// `[set-state]` sections.
    pub set_state: Vec<SetStateSpec>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Group {
    Inject,
    SetState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    Number,
    Bool,
}

/// One section with its values (the last of repeated keys wins).
#[derive(Debug)]
struct Section {
    group: Group,
    values: Vec<(&'static str, Value)>,
}

#[derive(Debug, Clone)]
enum Value {
    Str(String),
    Number(u64),
    Bool(bool),
}

impl Group {
    fn from_name(name: &str) -> Result<Self, ConfigError> {
        match name {
            "inject-error" => Ok(Group::Inject),
            "set-state" => Ok(Group::SetState),
            _ => Err(ConfigError(format!("There is no option group '{name}'"))),
        }
    }

    /// The keys a section accepts and their types.
    fn keys(self) -> &'static [(&'static str, Kind)] {
        match self {
            Group::Inject => &[
                ("event", Kind::Str),
                ("state", Kind::Number),
                ("iotype", Kind::Str),
                ("errno", Kind::Number),
                ("sector", Kind::Number),
                ("once", Kind::Bool),
                ("immediately", Kind::Bool),
            ],
            Group::SetState => &[
                ("event", Kind::Str),
                ("state", Kind::Number),
                ("new_state", Kind::Number),
            ],
        }
    }
}

impl Section {
    fn get(&self, key: &str) -> Option<&Value> {
        self.values
            .iter()
            .rev()
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v)
    }

    fn str(&self, key: &str) -> Option<&str> {
        match self.get(key) {
            Some(Value::Str(s)) => Some(s),
            _ => None,
        }
    }

    /// Numbers are unsigned in QemuOpts; rules read them as C integers.
    fn num(&self, key: &str) -> Option<i64> {
        match self.get(key) {
            Some(Value::Number(n)) => Some(*n as i64),
            _ => None,
        }
    }

    fn bool(&self, key: &str) -> Option<bool> {
        match self.get(key) {
            Some(Value::Bool(b)) => Some(*b),
            _ => None,
        }
    }

    fn set(&mut self, key: &str, raw: &str) -> Result<(), ConfigError> {
        let Some(&(name, kind)) = self.group.keys().iter().find(|(k, _)| *k == key) else {
            return Err(ConfigError(format!("Invalid parameter '{key}'")));
        };
        let value = match kind {
            Kind::Str => Value::Str(raw.to_string()),
            Kind::Number => Value::Number(parse_number(name, raw)?),
            Kind::Bool => Value::Bool(parse_bool(name, raw)?),
        };
        self.values.push((name, value));
        Ok(())
    }

    fn event(&self) -> Result<DebugEvent, ConfigError> {
        let name = self
            .str("event")
            .ok_or_else(|| ConfigError("Missing event name for rule".into()))?;
        DebugEvent::from_name(name).ok_or_else(|| invalid_value(name))
    }

    fn inject(&self) -> Result<InjectSpec, ConfigError> {
        let event = self.event()?;
        let iotype = match self.str("iotype") {
            Some(t) => Some(IoType::from_name(t).ok_or_else(|| invalid_value(t))?),
            None => None,
        };
        Ok(InjectSpec {
            event,
            state: self.num("state"),
            iotype,
            errno: self.num("errno"),
            sector: self.num("sector"),
            once: self.bool("once"),
            immediately: self.bool("immediately"),
        })
    }

    fn set_state(&self) -> Result<SetStateSpec, ConfigError> {
        Ok(SetStateSpec {
            event: self.event()?,
            state: self.num("state"),
            // qemu reads a missing new_state as 0.
            new_state: self.num("new_state").unwrap_or(0),
        })
    }
}

fn invalid_value(v: &str) -> ConfigError {
    ConfigError(format!("invalid parameter value: {v}"))
}

/// QemuOpts numbers: C `strtoull` with base 0 (decimal, 0x hex, 0 octal;
/// a leading '-' negates modulo 2^64), the whole text.
fn parse_number(name: &str, raw: &str) -> Result<u64, ConfigError> {
    let bad = || ConfigError(format!("Parameter '{name}' expects a number"));
    let s = raw.trim_start_matches(is_c_space);
    let (neg, s) = match s.as_bytes().first() {
        Some(b'-') => (true, &s[1..]),
        Some(b'+') => (false, &s[1..]),
        _ => (false, s),
    };
    let (radix, digits) = if let Some(h) = s.strip_prefix("0x").or(s.strip_prefix("0X")) {
        (16, h)
    } else if s.len() > 1 && s.starts_with('0') {
        (8, &s[1..])
    } else {
        (10, s)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(bad());
    }
    let n = u64::from_str_radix(digits, radix)
        .map_err(|_| ConfigError(format!("Value '{raw}' is too large for parameter '{name}'")))?;
    Ok(if neg { n.wrapping_neg() } else { n })
}

fn parse_bool(name: &str, raw: &str) -> Result<bool, ConfigError> {
    match raw {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => Err(ConfigError(format!(
            "Parameter '{name}' expects 'on' or 'off'"
        ))),
    }
}

/// `isspace` of the C locale.
fn is_c_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\u{0b}' | '\u{0c}' | '\r')
}

/// A cursor that matches like `sscanf` does.
struct Scan<'a>(&'a str);

impl<'a> Scan<'a> {
    /// A blank in the format: any run of white space, possibly empty.
    fn blanks(&mut self) {
        self.0 = self.0.trim_start_matches(is_c_space);
    }

    fn literal(&mut self, c: char) -> bool {
        match self.0.strip_prefix(c) {
            Some(rest) => {
                self.0 = rest;
                true
            }
            None => false,
        }
    }

    /// `%Ns`: skip white space, then up to `max` non-blank characters.
    fn word(&mut self, max: usize) -> Option<&'a str> {
        self.blanks();
        self.take_while(max, |c| !is_c_space(c))
    }

    /// `%N[^x]`: up to `max` characters other than `stop`, at least one.
    fn until(&mut self, max: usize, stop: char) -> Option<&'a str> {
        self.take_while(max, |c| c != stop)
    }

    fn take_while(&mut self, max: usize, ok: impl Fn(char) -> bool) -> Option<&'a str> {
        let end = self
            .0
            .char_indices()
            .take(max)
            .find(|&(_, c)| !ok(c))
            .map_or_else(
                || {
                    self.0
                        .char_indices()
                        .nth(max)
                        .map_or(self.0.len(), |(i, _)| i)
                },
                |(i, _)| i,
            );
        if end == 0 {
            return None;
        }
        let (word, rest) = self.0.split_at(end);
        self.0 = rest;
        Some(word)
    }
}

/// What one line of the file is.
#[derive(Debug, PartialEq, Eq)]
enum Line<'a> {
    Skip,
    Group(&'a str, Option<&'a str>),
    Pair(&'a str, &'a str),
    Error,
}

/// Classify one line (with its newline, as `fgets` returns it).
fn classify(line: &str) -> Line<'_> {
    if line.starts_with('\n') || line.starts_with('#') {
        return Line::Skip;
    }
    if let Some(rest) = line.strip_prefix('[') {
        // "[%63s \"%63[^\"]\"]"
        let mut s = Scan(rest);
        if let Some(group) = s.word(63) {
            s.blanks();
            if s.literal('"') {
                if let Some(id) = s.until(63, '"') {
                    return Line::Group(group, Some(id));
                }
            }
        }
        // "[%63[^]]]"
        if let Some(group) = Scan(rest).until(63, ']') {
            return Line::Group(group, None);
        }
    }
    // " %63s = \"%1023[^\"]\"", then " %63s = \"\""
    let mut s = Scan(line);
    let Some(key) = s.word(63) else {
        return Line::Error;
    };
    s.blanks();
    if s.literal('=') {
        s.blanks();
        if s.literal('"') {
            if let Some(value) = s.until(1023, '"') {
                return Line::Pair(key, value);
            }
        }
    }
    // The second pattern matched its first conversion: an empty value.
    Line::Pair(key, "")
}

/// qemu's rule for QemuOpts ids.
fn id_wellformed(id: &str) -> bool {
    let mut chars = id.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'))
}

/// Parse a config file's text into rules.
pub fn parse_config(text: &str) -> Result<ConfigRules, ConfigError> {
    let mut sections: Vec<Section> = Vec::new();
    let mut ids: Vec<(Group, String)> = Vec::new();
    for line in text.split_inclusive('\n') {
        match classify(line) {
            Line::Skip => {}
            Line::Group(name, id) => {
                let group = Group::from_name(name)?;
                if let Some(id) = id {
                    if !id_wellformed(id) {
                        return Err(ConfigError("Parameter 'id' expects an identifier".into()));
                    }
                    if ids.iter().any(|(g, i)| *g == group && i == id) {
                        return Err(ConfigError(format!("Duplicate ID '{id}' for {name}")));
                    }
                    ids.push((group, id.to_string()));
                }
                sections.push(Section {
                    group,
                    values: Vec::new(),
                });
            }
            Line::Pair(key, value) => {
                let section = sections
                    .last_mut()
                    .ok_or_else(|| ConfigError("no group defined".into()))?;
                section.set(key, value)?;
            }
            Line::Error => return Err(ConfigError("parse error".into())),
        }
    }
    let mut rules = ConfigRules::default();
    for s in sections.iter().filter(|s| s.group == Group::Inject) {
        rules.inject.push(s.inject()?);
    }
    for s in sections.iter().filter(|s| s.group == Group::SetState) {
        rules.set_state.push(s.set_state()?);
    }
    Ok(rules)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        parse_config(text).unwrap_err().0
    }

    #[test]
    fn test_parse_config_reads_sections_in_order() {
        let text = "# rules\n\n[set-state]\nevent = \"write_aio\"\nstate = \"1\"\n\
                    new_state = \"2\"\n[inject-error]\nevent = \"l2_update\"\n\
                    errno = \"0x1c\"\nsector = \"-1\"\nonce = \"on\"\n\
                    iotype = \"write\"\n[inject-error \"b\"]\n  event   =   \"read_aio\"  \n";
        let r = parse_config(text).unwrap();
        assert_eq!(r.inject.len(), 2);
        let a = &r.inject[0];
        assert_eq!(a.event, DebugEvent::L2Update);
        assert_eq!(a.errno, Some(28));
        assert_eq!(a.sector, Some(-1));
        assert_eq!(a.once, Some(true));
        assert_eq!(a.iotype, Some(IoType::Write));
        assert_eq!(r.inject[1].event, DebugEvent::ReadAio);
        assert_eq!(r.inject[1].errno, None);
        assert_eq!(
            r.set_state,
            vec![SetStateSpec {
                event: DebugEvent::WriteAio,
                state: Some(1),
                new_state: 2
            }]
        );
    }

    #[test]
    fn test_parse_config_empty_text_has_no_rules() {
        assert_eq!(parse_config("").unwrap(), ConfigRules::default());
    }

    #[test]
    fn test_parse_config_unquoted_value_reads_as_empty() {
        assert_eq!(
            err("[inject-error]\nevent = read_aio\n"),
            "invalid parameter value: "
        );
        assert_eq!(
            err("[inject-error]\nevent=\"read_aio\"\n"),
            "Invalid parameter 'event=\"read_aio\"'"
        );
    }

    #[test]
    fn test_parse_config_errors_use_qemu_wording() {
        assert_eq!(err("[inject-error]\n"), "Missing event name for rule");
        assert_eq!(
            err("[bogus]\nevent = \"read_aio\"\n"),
            "There is no option group 'bogus'"
        );
        assert_eq!(
            err("[inject-error]\nevent = \"nope\"\n"),
            "invalid parameter value: nope"
        );
        assert_eq!(
            err("[inject-error]\nevent = \"read_aio\"\nfoo = \"1\"\n"),
            "Invalid parameter 'foo'"
        );
        assert_eq!(
            err("[inject-error]\nevent = \"read_aio\"\nerrno = \"5k\"\n"),
            "Parameter 'errno' expects a number"
        );
        assert_eq!(
            err("[inject-error]\nevent = \"read_aio\"\nonce = \"maybe\"\n"),
            "Parameter 'once' expects 'on' or 'off'"
        );
        assert_eq!(err("event = \"read_aio\"\n"), "no group defined");
        assert_eq!(err("[inject-error]\n   \n"), "parse error");
        assert_eq!(err("[inject-error]\n  # c\n"), "Invalid parameter '#'");
        assert_eq!(
            err("[inject-error]\niotype = \"xx\"\nevent = \"read_aio\"\n"),
            "invalid parameter value: xx"
        );
        assert_eq!(
            err("[set-state]\nevent = \"read_aio\"\nnew_state = \"abc\"\n"),
            "Parameter 'new_state' expects a number"
        );
        assert_eq!(
            err("[inject-error\nevent = \"read_aio\"\n"),
            "There is no option group 'inject-error\n'"
        );
    }

    #[test]
    fn test_parse_config_key_errors_come_before_rule_errors() {
        // The missing event of the first section is found only after the
        // whole file was read.
        assert_eq!(
            err("[inject-error]\n[inject-error]\nbad = \"1\"\n"),
            "Invalid parameter 'bad'"
        );
        // Error sections are checked before state sections.
        assert_eq!(
            err("[set-state]\nevent = \"x\"\n[inject-error]\nevent = \"y\"\n"),
            "invalid parameter value: y"
        );
    }

    #[test]
    fn test_parse_config_last_repeated_key_wins_and_defaults() {
        let r = parse_config(
            "[inject-error]\nerrno = \"5\"\nerrno = \"6\"\nevent = \"read_aio\"\n\
             [set-state]\nevent = \"read_aio\"\n",
        )
        .unwrap();
        assert_eq!(r.inject[0].errno, Some(6));
        assert_eq!(r.set_state[0].new_state, 0);
        assert_eq!(r.set_state[0].state, None);
    }

    #[test]
    fn test_parse_config_section_ids_checked() {
        assert!(parse_config("[inject-error \"a\"]\nevent = \"read_aio\"\n").is_ok());
        assert_eq!(
            err("[inject-error \"a\"]\nevent = \"read_aio\"\n[inject-error \"a\"]\n"),
            "Duplicate ID 'a' for inject-error"
        );
        assert_eq!(
            err("[inject-error \"1a\"]\n"),
            "Parameter 'id' expects an identifier"
        );
    }

    #[test]
    fn test_parse_number_follows_strtoull() {
        assert_eq!(parse_number("n", "010").unwrap(), 8);
        assert_eq!(parse_number("n", "0").unwrap(), 0);
        assert_eq!(parse_number("n", " 42").unwrap(), 42);
        assert_eq!(parse_number("n", "-3").unwrap() as i64, -3);
        assert!(parse_number("n", "").is_err());
        assert!(parse_number("n", "0x").is_err());
        assert!(parse_number("n", "12 ").is_err());
        assert_eq!(
            parse_number("n", "99999999999999999999").unwrap_err().0,
            "Value '99999999999999999999' is too large for parameter 'n'"
        );
    }
}
