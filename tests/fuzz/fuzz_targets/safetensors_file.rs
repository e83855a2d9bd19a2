//! Any bytes as `model.safetensors` of a Llama checkpoint: load, build, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
#[path = "common.rs"]
mod common;

static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let dir = DIR.get_or_init(|| common::scratch(Some("models/llama_gqa")));
    std::fs::write(dir.join("model.safetensors"), data).expect("write");
    if let Ok(ck) = tunecheck::io::hf::load(dir, &candle_core::Device::Cpu, None) {
        let _ = tunecheck::loader::checkpoint(&ck, None);
    }
});
