//! Any bytes as `tokenizer.json`: load, never panic (tokenizers' own panics are caught).
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;
#[path = "common.rs"]
mod common;

static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let dir = DIR.get_or_init(|| common::scratch(None));
    let p = dir.join("tokenizer.json");
    std::fs::write(&p, data).expect("write");
    let _ = tunecheck::data::tokenizer::load(&p);
});
