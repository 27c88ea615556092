//! Fuzzes the option parsers and the coercing deserializer: any input must produce a
//! value or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qsd_qapi::options::{
    split_blockdev, BlockExportOptions, ChardevSocketOptions, IothreadProps, MonitorOptions,
    NbdServerOptions, NbdServerStartArgs, ObjectAddArgs,
};
use qsd_qapi::{from_value, keyval, parse_option};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // The first byte picks the implied key so every option's shape gets exercised.
    let implied = match data.first().map(|b| b % 6) {
        Some(0) => Some("driver"),
        Some(1) => Some("type"),
        Some(2) => Some("qom-type"),
        Some(3) => Some("chardev"),
        Some(4) => None,
        _ => Some("backend"),
    };
    let _ = keyval::parse_keyval_with_help(text, implied);
    if let Ok(opts) = keyval::parse_qemu_opts(text, Some("backend")) {
        let _ = ChardevSocketOptions::from_opts(&opts.value);
    }
    let Ok((value, mode)) = parse_option(text, implied) else {
        return;
    };
    let _ = split_blockdev(value.clone(), mode);
    let _ = from_value::<BlockExportOptions>(&value, mode);
    let _ = from_value::<NbdServerOptions>(&value, mode);
    let _ = from_value::<NbdServerStartArgs>(&value, mode);
    let _ = from_value::<MonitorOptions>(&value, mode);
    if let Ok(obj) = from_value::<ObjectAddArgs>(&value, mode) {
        let _ = obj.props::<IothreadProps>();
    }
    let _ = from_value::<serde_json::Value>(&value, mode);
});
