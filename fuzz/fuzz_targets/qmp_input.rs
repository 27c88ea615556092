//! Fuzz the QMP input path: JSON framing, request validation, negotiation
//! and reply formatting, with no runtime and no sockets.
//!
//! Properties checked besides "no panic":
//! - splitting the input into chunks does not change what comes out;
//! - what the writer prints reads back as the same value, and printing it
//!   again gives text of the same length (member order may differ, as in qemu).
#![no_main]

use libfuzzer_sys::fuzz_target;
use qsd_qmp::{to_json, Action, CommandInfo, JsonStreamer, Limits, ParseError, Session};
use serde_json::Value;

/// Small limits so the fuzzer reaches them.
const LIMITS: Limits = Limits {
    max_size: 4096,
    max_tokens: 256,
    max_depth: 32,
};

/// Items per input whose printing is round-tripped. Each check costs a dozen
/// parse and print passes; checking every item of inputs that hold twenty
/// values made the target about ten times slower under the sanitizer.
const ROUNDTRIP_CHECKS: usize = 8;

fn run(chunks: &mut dyn Iterator<Item = &[u8]>) -> Vec<Result<Value, ParseError>> {
    let mut streamer = JsonStreamer::with_limits(LIMITS);
    let mut out = Vec::new();
    for chunk in chunks {
        out.extend(streamer.feed(chunk));
    }
    out.extend(streamer.finish());
    out
}

fn lookup(name: &str) -> Option<CommandInfo> {
    match name {
        "query-version" => Some(CommandInfo { allow_oob: false }),
        "oob-ok" => Some(CommandInfo { allow_oob: true }),
        _ => None,
    }
}

/// Parse text that must hold exactly one value.
fn parse_one(text: &str) -> Value {
    let mut streamer = JsonStreamer::new();
    let mut items = streamer.feed(text.as_bytes());
    items.extend(streamer.finish());
    match items.as_slice() {
        [Ok(v)] => v.clone(),
        _ => panic!("writer output is not one valid value: {text:?} -> {items:?}"),
    }
}

fn check_roundtrip(value: &Value) {
    for pretty in [false, true] {
        // Printing may normalise once (3.0 prints as 3 and reads back as an
        // integer; -0.0 prints as -0 and reads back as 0), then reads back as
        // the same value. The text itself need not repeat: members that share
        // one of qemu's hash buckets print newest first, so each print/parse
        // pass swaps them, exactly as qemu does. serde_json's map equality
        // ignores member order.
        let once = parse_one(&to_json(value, pretty));
        let second = to_json(&once, pretty);
        let twice = parse_one(&second);
        assert_eq!(once, twice, "printed value does not read back: {second}");
        let third = to_json(&twice, pretty);
        assert_eq!(second.len(), third.len(), "printing is not stable");
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&split, input)) = data.split_first() else {
        return;
    };
    let whole = run(&mut std::iter::once(input));
    let chunk = usize::from(split % 16) + 1;
    let chunked = run(&mut input.chunks(chunk));
    assert_eq!(whole, chunked, "chunking changed the result");

    let mut session = Session::new();
    for (i, item) in whole.into_iter().enumerate() {
        let check = i < ROUNDTRIP_CHECKS;
        if let (true, Ok(value)) = (check, &item) {
            check_roundtrip(value);
        }
        let reply = match session.handle(item, lookup) {
            Action::Reply(reply) => reply,
            Action::Dispatch(req) => {
                qsd_qmp::success_response(Value::Object(req.arguments), req.id)
            }
        };
        if check {
            check_roundtrip(&reply);
        }
    }
});
