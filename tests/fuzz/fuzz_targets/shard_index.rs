//! Any bytes as `model.safetensors.index.json` beside valid shards: load, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
#[path = "common.rs"]
mod common;

static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let dir = DIR.get_or_init(|| {
        let dir = common::scratch(None);
        let ck = tunecheck::io::hf::load(&common::fixture("models/llama_gqa"), &candle_core::Device::Cpu, None)
            .expect("fixture");
        tunecheck::io::hf::save(&dir, &ck.spec, &ck.weights, tunecheck::io::hf::Sharding::MaxBytes(30_000))
            .expect("save");
        dir
    });
    std::fs::write(dir.join("model.safetensors.index.json"), data).expect("write");
    let _ = tunecheck::io::hf::load(dir, &candle_core::Device::Cpu, None);
});
