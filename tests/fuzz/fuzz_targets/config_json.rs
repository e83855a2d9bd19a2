//! Any bytes as `config.json`: parse the spec and the 4-bit config, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        if let Ok(spec) = tunecheck::io::config::parse(&v) {
            let _ = tunecheck::io::config::to_json(&spec);
        }
        if let Some(q) = v.get("quantization_config") {
            let _ = tunecheck::io::config::parse_quant(q);
        }
    }
});
