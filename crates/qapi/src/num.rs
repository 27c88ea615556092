//! Scalar parsers with the exact acceptance rules qemu applies to keyval strings
//! (`qapi_bool_parse`, `qemu_strtoi64`/`qemu_strtou64` with base 0, `qemu_strtosz`).

/// `on|yes|true|y` and `off|no|false|n`, case-sensitive as in qemu.
pub(crate) fn parse_bool(s: &str) -> Option<bool> {
    match s {
        "on" | "yes" | "true" | "y" => Some(true),
        "off" | "no" | "false" | "n" => Some(false),
        _ => None,
    }
}

fn skip_space(s: &str) -> &str {
    s.trim_start_matches([' ', '\t', '\n', '\x0b', '\x0c', '\r'])
}

/// Splits an optional sign off; returns (negative, rest).
fn split_sign(s: &str) -> (bool, &str) {
    if let Some(rest) = s.strip_prefix('-') {
        (true, rest)
    } else {
        (false, s.strip_prefix('+').unwrap_or(s))
    }
}

/// The magnitude of an unsigned C integer literal with base 0 (hex `0x`, octal `0`,
/// decimal); the whole string must be consumed.
fn magnitude(s: &str) -> Option<u64> {
    let (digits, radix) = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        (h, 16)
    } else if s.len() > 1 && s.starts_with('0') {
        (&s[1..], 8)
    } else {
        (s, 10)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    u64::from_str_radix(digits, radix).ok()
}

/// `qemu_strtoi64(s, NULL, 0, ...)`.
pub(crate) fn strtoi64(s: &str) -> Option<i64> {
    let (neg, rest) = split_sign(skip_space(s));
    let mag = magnitude(rest)?;
    if neg {
        0i64.checked_sub_unsigned(mag)
    } else {
        i64::try_from(mag).ok()
    }
}

/// `qemu_strtou64(s, NULL, 0, ...)`: like `strtoull`, a leading minus negates modulo 2^64.
pub(crate) fn strtou64(s: &str) -> Option<u64> {
    let (neg, rest) = split_sign(skip_space(s));
    let mag = magnitude(rest)?;
    Some(if neg { mag.wrapping_neg() } else { mag })
}

/// `qemu_strtod_finite`.
pub(crate) fn strtod(s: &str) -> Option<f64> {
    let v: f64 = skip_space(s).parse().ok()?;
    v.is_finite().then_some(v)
}

fn suffix_mul(c: u8) -> Option<u64> {
    let shift = match c.to_ascii_uppercase() {
        b'B' => 0,
        b'K' => 10,
        b'M' => 20,
        b'G' => 30,
        b'T' => 40,
        b'P' => 50,
        b'E' => 60,
        _ => return None,
    };
    Some(1u64 << shift)
}

/// Keep this many fraction digits; more cannot change a 64-bit result meaningfully and the
/// bound keeps the fixed-point product inside `u128`.
const MAX_FRACTION_DIGITS: usize = 18;

/// `qemu_strtosz`: a byte count with an optional binary suffix (`B K M G T P E`, any case)
/// and an optional decimal fraction when a suffix other than `B` is present; `0x` hex
/// is accepted without fraction or suffix.
pub(crate) fn strtosz(s: &str) -> Option<u64> {
    let s = skip_space(s);
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        return u64::from_str_radix(hex, 16).ok();
    }
    let bytes = s.as_bytes();
    let int_end = bytes
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(bytes.len());
    let (int_part, mut rest) = s.split_at(int_end);
    let mut fraction = "";
    if let Some(after_dot) = rest.strip_prefix('.') {
        let frac_end = after_dot
            .bytes()
            .position(|b| !b.is_ascii_digit())
            .unwrap_or(after_dot.len());
        fraction = &after_dot[..frac_end];
        rest = &after_dot[frac_end..];
        if fraction.is_empty() && int_part.is_empty() {
            return None;
        }
    } else if int_part.is_empty() {
        return None;
    }
    let mul = match rest.as_bytes() {
        [] => 1,
        [c] => suffix_mul(*c)?,
        _ => return None,
    };
    let has_fraction = fraction.bytes().any(|b| b != b'0');
    if mul == 1 && has_fraction {
        return None;
    }
    let int: u128 = if int_part.is_empty() {
        0
    } else {
        u128::from(int_part.parse::<u64>().ok()?)
    };
    let frac_digits = &fraction[..fraction.len().min(MAX_FRACTION_DIGITS)];
    let mut frac_bytes = 0u128;
    if !frac_digits.is_empty() {
        let num: u128 = frac_digits.parse().ok()?;
        let den = 10u128.pow(u32::try_from(frac_digits.len()).ok()?);
        // Round half up, as qemu does.
        frac_bytes = (num * u128::from(mul) * 2 + den) / (den * 2);
    }
    let total = int.checked_mul(u128::from(mul))?.checked_add(frac_bytes)?;
    u64::try_from(total).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_bool_aliases_accepted() {
        for t in ["on", "yes", "true", "y"] {
            assert_eq!(parse_bool(t), Some(true));
        }
        for f in ["off", "no", "false", "n"] {
            assert_eq!(parse_bool(f), Some(false));
        }
        assert_eq!(parse_bool("ON"), None);
        assert_eq!(parse_bool(""), None);
    }

    #[test]
    fn test_strtoi64_bases_parsed() {
        assert_eq!(strtoi64("10"), Some(10));
        assert_eq!(strtoi64("0x10"), Some(16));
        assert_eq!(strtoi64("010"), Some(8));
        assert_eq!(strtoi64(" -5"), Some(-5));
        assert_eq!(strtoi64("-0x10"), Some(-16));
        assert_eq!(strtoi64("-9223372036854775808"), Some(i64::MIN));
        assert_eq!(strtoi64("9223372036854775808"), None);
        assert_eq!(strtoi64("1k"), None);
        assert_eq!(strtoi64(""), None);
        assert_eq!(strtoi64("0x"), None);
        assert_eq!(strtoi64("08"), None);
    }

    #[test]
    fn test_strtou64_negative_wraps() {
        assert_eq!(strtou64("-1"), Some(u64::MAX));
        assert_eq!(strtou64("18446744073709551615"), Some(u64::MAX));
        assert_eq!(strtou64("18446744073709551616"), None);
    }

    #[test]
    fn test_strtosz_suffixes_scaled() {
        assert_eq!(strtosz("0"), Some(0));
        assert_eq!(strtosz("512"), Some(512));
        assert_eq!(strtosz("1k"), Some(1024));
        assert_eq!(strtosz("1K"), Some(1024));
        assert_eq!(strtosz("2M"), Some(2 << 20));
        assert_eq!(strtosz("1G"), Some(1 << 30));
        assert_eq!(strtosz("1T"), Some(1 << 40));
        assert_eq!(strtosz("1P"), Some(1 << 50));
        assert_eq!(strtosz("15E"), Some(15 << 60));
        assert_eq!(strtosz("16E"), None);
        assert_eq!(strtosz("1.5k"), Some(1536));
        assert_eq!(strtosz(".5k"), Some(512));
        assert_eq!(strtosz("1.5"), None);
        assert_eq!(strtosz("1.0"), Some(1));
        assert_eq!(strtosz("1.5B"), None);
        assert_eq!(strtosz("0x10"), Some(16));
        assert_eq!(strtosz("0x10k"), None);
        assert_eq!(strtosz("-1"), None);
        assert_eq!(strtosz("1kk"), None);
        assert_eq!(strtosz("k"), None);
        assert_eq!(strtosz(""), None);
        assert_eq!(strtosz("18446744073709551615"), Some(u64::MAX));
        assert_eq!(strtosz("18446744073709551616"), None);
    }
}
