//! Feeds text to blkdebug's config file parser (qemu's ini dialect).
//! Checks: parsing is deterministic; comment and blank lines added at the
//! end of a file that ends in a newline change nothing; accepted rules,
//! written back as a config file, parse to the same rules.
#![no_main]

use std::fmt::Write;

use libfuzzer_sys::fuzz_target;
use qsd_blkdebug::{parse_config, ConfigRules};

fn num(out: &mut String, key: &str, v: Option<i64>) {
    if let Some(v) = v {
        // QemuOpts numbers are unsigned; the parser reads them modulo 2^64.
        let _ = writeln!(out, "{key} = \"{}\"", v as u64);
    }
}

fn flag(out: &mut String, key: &str, v: Option<bool>) {
    if let Some(v) = v {
        let _ = writeln!(out, "{key} = \"{}\"", if v { "on" } else { "off" });
    }
}

fn render(rules: &ConfigRules) -> String {
    let mut out = String::new();
    for r in &rules.inject {
        let _ = writeln!(out, "[inject-error]\nevent = \"{}\"", r.event.as_str());
        num(&mut out, "state", r.state);
        if let Some(t) = r.iotype {
            let _ = writeln!(out, "iotype = \"{}\"", t.as_str());
        }
        num(&mut out, "errno", r.errno);
        num(&mut out, "sector", r.sector);
        flag(&mut out, "once", r.once);
        flag(&mut out, "immediately", r.immediately);
    }
    for r in &rules.set_state {
        let _ = writeln!(out, "[set-state]\nevent = \"{}\"", r.event.as_str());
        num(&mut out, "state", r.state);
        num(&mut out, "new_state", Some(r.new_state));
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let r = parse_config(text);
    assert_eq!(r, parse_config(text), "not deterministic");
    if text.is_empty() || text.ends_with('\n') {
        let more = format!("{text}\n# comment [inject-error]\n\n");
        assert_eq!(
            r,
            parse_config(&more),
            "trailing comment changed the result"
        );
    }
    if let Ok(rules) = r {
        let again = render(&rules);
        assert_eq!(
            parse_config(&again).as_ref(),
            Ok(&rules),
            "rules do not round-trip:\n{again}"
        );
    }
});
