//! Any bytes as one projection's bitsandbytes `quant_state` JSON blob in a 4-bit checkpoint:
//! load the checkpoint, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use std::collections::BTreeMap;
use std::sync::OnceLock;
#[path = "common.rs"]
mod common;

const KEY: &str = "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4";

struct Setup {
    dir: std::path::PathBuf,
    tensors: BTreeMap<String, (safetensors::Dtype, Vec<usize>, Vec<u8>)>,
}

static SETUP: OnceLock<Setup> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let s = SETUP.get_or_init(|| {
        let dir = common::scratch(Some("models/llama_bnb_nf4_dq"));
        let bytes = std::fs::read(dir.join("model.safetensors")).expect("fixture");
        let st = safetensors::SafeTensors::deserialize(&bytes).expect("valid fixture");
        let tensors =
            st.tensors().into_iter().map(|(k, v)| (k, (v.dtype(), v.shape().to_vec(), v.data().to_vec()))).collect();
        Setup { dir, tensors }
    });
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = s
        .tensors
        .iter()
        .map(|(k, (dt, shape, bytes))| {
            let (shape, bytes) = if k == KEY { (vec![data.len()], data) } else { (shape.clone(), bytes.as_slice()) };
            (k.clone(), safetensors::tensor::TensorView::new(*dt, shape, bytes).expect("consistent view"))
        })
        .collect();
    let out = safetensors::serialize(views, None).expect("serialise");
    std::fs::write(s.dir.join("model.safetensors"), out).expect("write");
    let _ = tunecheck::io::hf::load(&s.dir, &candle_core::Device::Cpu, None);
});
