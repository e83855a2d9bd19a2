//! Any bytes as `adapter_config.json` next to a valid adapter: read, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
#[path = "common.rs"]
mod common;

static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = tunecheck::io::peft::parse_config(&v, std::path::Path::new("adapter_config.json"));
    }
    let dir = DIR.get_or_init(|| common::scratch(Some("adapters/llama_lora_r4")));
    std::fs::write(dir.join("adapter_config.json"), data).expect("write");
    let _ = tunecheck::io::peft::read(dir);
});
