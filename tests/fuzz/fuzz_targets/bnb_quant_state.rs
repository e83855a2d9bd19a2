//! Any bytes as a bitsandbytes `quant_state` JSON blob: parse and check it against the
//! expected code and shape, never panic. (Whole 4-bit checkpoints go through
//! `safetensors_file`-style loading in `tests/fuzz_bytes.rs`.)
#![no_main]
use libfuzzer_sys::fuzz_target;
use tunecheck::quant::QuantType;

fuzz_target!(|data: &[u8]| {
    let file = std::path::Path::new("model.safetensors");
    let key = "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4";
    for qt in [QuantType::Nf4, QuantType::Fp4] {
        let _ = tunecheck::io::bnb::parse_quant_state(data, file, key, qt, &[64, 64]);
    }
});
