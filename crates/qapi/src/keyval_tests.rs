use proptest::prelude::*;
use serde_json::json;

use super::*;

fn kv(s: &str) -> Value {
    parse_keyval(s, None).unwrap()
}

fn kv_err(s: &str, implied: Option<&str>) -> String {
    parse_keyval(s, implied).unwrap_err().to_string()
}

#[test]
fn test_parse_keyval_flat_pairs_parsed() {
    assert_eq!(kv("a=1,b=x"), json!({"a": "1", "b": "x"}));
    assert_eq!(kv(""), json!({}));
    assert_eq!(kv("a=1,"), json!({"a": "1"}));
    assert_eq!(kv("a="), json!({"a": ""}));
}

#[test]
fn test_parse_keyval_double_comma_escapes_comma() {
    assert_eq!(kv("a=x,,y,b=2"), json!({"a": "x,y", "b": "2"}));
    assert_eq!(kv("a=x,,"), json!({"a": "x,"}));
    assert_eq!(kv("a=,,,,"), json!({"a": ",,"}));
}

#[test]
fn test_parse_keyval_dotted_keys_nest() {
    assert_eq!(
        kv("cache.direct=on,cache.no-flush=off,x=1"),
        json!({"cache": {"direct": "on", "no-flush": "off"}, "x": "1"})
    );
}

#[test]
fn test_parse_keyval_numeric_fragments_make_lists() {
    assert_eq!(kv("a.0=x,a.1=y"), json!({"a": ["x", "y"]}));
    assert_eq!(kv("a.1=y,a.0=x"), json!({"a": ["x", "y"]}));
    assert_eq!(
        kv("b.0.node=n,b.0.name=m"),
        json!({"b": [{"node": "n", "name": "m"}]})
    );
    assert_eq!(kv("a.0.0=x"), json!({"a": [["x"]]}));
}

#[test]
fn test_parse_keyval_list_gap_reports_missing() {
    assert_eq!(kv_err("a.1=x", None), "Parameter 'a.0' missing");
    assert_eq!(kv_err("a.0=x,a.2=y", None), "Parameter 'a.1' missing");
    assert_eq!(
        kv_err("a.0=x,a.99999999999999999999=y", None),
        "Parameter 'a.1' missing"
    );
    assert_eq!(kv_err("x.a.0=x,x.a.3=y", None), "Parameter 'x.a.1' missing");
}

#[test]
fn test_parse_keyval_mixed_index_and_member_inconsistent() {
    assert_eq!(
        kv_err("a.0=x,a.b=1", None),
        "Parameters 'a.*' used inconsistently"
    );
    assert_eq!(
        kv_err("a=1,a.b=2", None),
        "Parameters 'a.*' used inconsistently"
    );
    assert_eq!(
        kv_err("a.b=2,a=1", None),
        "Parameters 'a.*' used inconsistently"
    );
    assert_eq!(
        kv_err("a.b.c=2,a.b=1", None),
        "Parameters 'a.b.*' used inconsistently"
    );
}

#[test]
fn test_parse_keyval_repeated_key_last_wins() {
    assert_eq!(kv("a=1,a=2"), json!({"a": "2"}));
    assert_eq!(kv("a.b=1,a.b=2"), json!({"a": {"b": "2"}}));
}

#[test]
fn test_parse_keyval_implied_key_desugared() {
    let v = parse_keyval("null-co,node-name=a", Some("driver")).unwrap();
    assert_eq!(v, json!({"driver": "null-co", "node-name": "a"}));
    let v = parse_keyval("driver=x", Some("driver")).unwrap();
    assert_eq!(v, json!({"driver": "x"}));
    // Only the first element can use the implied key.
    assert_eq!(
        kv_err("a=1,nbd", Some("type")),
        "Expected '=' after parameter 'nbd'"
    );
    let v = parse_keyval("iothread", Some("qom-type")).unwrap();
    assert_eq!(v, json!({"qom-type": "iothread"}));
}

#[test]
fn test_parse_keyval_syntax_errors_match_qemu() {
    assert_eq!(
        kv_err("null-co,node-name", Some("driver")),
        "Expected '=' after parameter 'node-name'"
    );
    assert_eq!(kv_err("null-co,=x", Some("driver")), "Invalid parameter ''");
    assert_eq!(
        kv_err("null-co,,node-name=a", Some("driver")),
        "Invalid parameter ''"
    );
    assert_eq!(kv_err("unix", None), "Expected '=' after parameter 'unix'");
    assert_eq!(kv_err("a.=1", None), "Invalid parameter 'a.'");
    assert_eq!(kv_err(".a=1", None), "Invalid parameter '.a'");
    assert_eq!(kv_err("0=1", None), "Invalid parameter '0'");
    assert_eq!(kv_err("a.1b=1", None), "Invalid parameter 'a.1b'");
    assert_eq!(kv_err("a b=1", None), "Invalid parameter 'a b'");
    let long = "k".repeat(128);
    assert_eq!(
        kv_err(&format!("{long}=1"), None),
        format!("Parameter '{long}' is too long")
    );
    assert_eq!(
        kv_err(&format!("a.{long}=1"), None),
        format!("Parameter fragment '{long}' is too long")
    );
}

#[test]
fn test_parse_keyval_downstream_prefix_is_one_fragment() {
    assert_eq!(kv("__com.redhat_x=1"), json!({"__com.redhat_x": "1"}));
}

#[test]
fn test_parse_keyval_help_detected() {
    let e = parse_keyval("help", Some("driver")).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::HelpRequested);
    assert_eq!(e.message(), "Help is not available for this option");
    assert_eq!(kv_err("null-co,help", Some("driver")), e.message());
    assert_eq!(kv_err("?", None), e.message());
    let (v, help) = parse_keyval_with_help("iothread,help", Some("qom-type")).unwrap();
    assert!(help);
    assert_eq!(v, json!({"qom-type": "iothread"}));
    let (_, help) = parse_keyval_with_help("help=1", None).unwrap();
    assert!(!help);
    let (v, help) = parse_keyval_with_help("helpme=1", None).unwrap();
    assert!(!help);
    assert_eq!(v, json!({"helpme": "1"}));
}

#[test]
fn test_parse_keyval_deep_nesting_rejected() {
    let key = vec!["a"; MAX_DEPTH + 1].join(".");
    assert!(parse_keyval(&format!("{key}=1"), None).is_err());
    let key = vec!["a"; MAX_DEPTH].join(".");
    assert!(parse_keyval(&format!("{key}=1"), None).is_ok());
}

#[test]
fn test_parse_option_json_object_is_qmp_mode() {
    let (v, mode) = parse_option(r#"{"driver":"null-co","size":1}"#, Some("driver")).unwrap();
    assert_eq!(mode, InputMode::Qmp);
    assert_eq!(v, json!({"driver": "null-co", "size": 1}));
    let (v, mode) = parse_option("null-co,size=1", Some("driver")).unwrap();
    assert_eq!(mode, InputMode::Keyval);
    assert_eq!(v, json!({"driver": "null-co", "size": "1"}));
}

#[test]
fn test_parse_option_bad_json_reported() {
    let e = parse_option(r#"{"driver":"null-co""#, None).unwrap_err();
    assert_eq!(e.message(), "JSON parse error, premature EOI");
    let e = parse_option(r#"{"driver":"null-co"}x"#, None).unwrap_err();
    assert_eq!(e.message(), "Expecting at most one JSON value");
    assert_eq!(e.kind(), ErrorKind::Syntax);
}

#[test]
fn test_parse_qemu_opts_flags_and_implied() {
    let o = parse_qemu_opts("socket,id=c,path=/tmp/a,,b,server,nowait", Some("backend")).unwrap();
    assert_eq!(
        o.value,
        json!({"backend": "socket", "id": "c", "path": "/tmp/a,b", "server": "on", "wait": "off"})
    );
    assert_eq!(o.warnings.len(), 2);
    assert!(o.warnings[0].starts_with("short-form boolean option 'server' deprecated"));
    assert!(!o.help);
    assert!(parse_qemu_opts("help", Some("backend")).unwrap().help);
    assert!(
        parse_qemu_opts("socket,help", Some("backend"))
            .unwrap()
            .help
    );
    let o = parse_qemu_opts("a.b=1", None).unwrap();
    assert_eq!(o.value, json!({"a.b": "1"}));
}

/// Renders a flat map of keys to values as keyval text, escaping commas.
fn render(pairs: &[(String, String)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", v.replace(',', ",,")))
        .collect::<Vec<_>>()
        .join(",")
}

proptest! {
    #[test]
    fn test_parse_keyval_roundtrip_flat_values_preserved(
        pairs in proptest::collection::vec(("[a-z][a-z0-9_-]{0,8}", "[^\u{0}]{0,12}"), 0..6)
    ) {
        let text = render(&pairs);
        let v = parse_keyval(&text, None).unwrap();
        let mut expected = Map::new();
        for (k, val) in &pairs {
            expected.insert(k.clone(), Value::String(val.clone()));
        }
        prop_assert_eq!(v.as_object().unwrap().len(), expected.len());
        for (k, val) in expected {
            prop_assert_eq!(&v[&k], &val);
        }
    }

    #[test]
    fn test_parse_keyval_roundtrip_lists_preserved(
        items in proptest::collection::vec("[^\u{0}]{0,6}", 1..8)
    ) {
        let text = items
            .iter()
            .enumerate()
            .rev()
            .map(|(i, v)| format!("l.{i}={}", v.replace(',', ",,")))
            .collect::<Vec<_>>()
            .join(",");
        let v = parse_keyval(&text, None).unwrap();
        let expected: Vec<Value> = items.into_iter().map(Value::String).collect();
        prop_assert_eq!(&v["l"], &Value::Array(expected));
    }

    #[test]
    fn test_parse_option_arbitrary_input_never_panics(s in "\\PC{0,40}") {
        let _ = parse_option(&s, Some("driver"));
        let _ = parse_keyval_with_help(&s, None);
        let _ = parse_qemu_opts(&s, Some("backend"));
    }
}
