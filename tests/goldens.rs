//! Golden numbers: torchtune-style loss curves for fixed seeds per family and adapter (rounded
//! to 4 decimals so they hold on any x86-64 with AVX2+FMA), the NF4/FP4 tables, and the
//! manifest (names, shapes, dtypes) of a saved checkpoint and adapter.

use crate::common;

use candle_core::{DType, Device};
use tunecheck::adapt::{LoraConfig, QuantConfig};
use tunecheck::data::{tokenizer, SuccessorTask};
use tunecheck::spec::{ArchSpec, Family};
use tunecheck::train::{RefTrainer, TrainConfig};

#[test]
fn loss_curves_per_family_and_adapter() {
    let tok = tokenizer::fixture().unwrap();
    let task = SuccessorTask::new(tokenizer::specials(&tok).unwrap(), 3, 16);
    let data = task.batches(7, 20, 4, 8);
    let mut out = String::from("family  adapter    step:  1      5      10     15     20\n");
    for family in Family::ALL {
        let mut spec = ArchSpec::tiny(family);
        spec.vocab_size = 65;
        let w = tunecheck::weights::generate(&spec, 11, &Device::Cpu).unwrap();
        for (name, quant) in
            [("lora", None), ("qlora_nf4", Some(QuantConfig { compute_dtype: DType::F32, ..QuantConfig::default() }))]
        {
            let mut tr = RefTrainer::new(&spec, &w, &LoraConfig::default(), quant, TrainConfig::default(), 12).unwrap();
            let h = tr.fit(&data, &[]).unwrap();
            let pick: Vec<String> = [0, 4, 9, 14, 19].iter().map(|&i| format!("{:.4}", h.train[i].2)).collect();
            out.push_str(&format!("{:<7} {:<10} {}\n", family.to_string(), name, pick.join(" ")));
        }
    }
    common::golden().bind(|| insta::assert_snapshot!("loss_curves", out));
}

#[test]
fn nf4_and_fp4_tables() {
    let mut out = String::new();
    for (name, t) in [("nf4", &tunecheck::quant::codes::NF4), ("fp4", &tunecheck::quant::codes::FP4)] {
        out.push_str(&format!("{name}:\n"));
        for (i, v) in t.iter().enumerate() {
            out.push_str(&format!("  {i:2} {:08x} {v:+.9}\n", v.to_bits()));
        }
    }
    common::golden().bind(|| insta::assert_snapshot!("code_tables", out));
}

#[test]
fn checkpoint_and_adapter_manifests() {
    let dir = tempfile::tempdir().unwrap();
    let spec = ArchSpec::tiny(Family::Gemma3);
    let w = tunecheck::weights::generate(&spec, 0, &Device::Cpu).unwrap();
    let q = QuantConfig { compute_dtype: DType::F32, ..QuantConfig::default() };
    tunecheck::io::quantize::save_quantized(&dir.path().join("q4"), &spec, &w, &q).unwrap();
    let lora = LoraConfig { modules_to_save: vec!["embed_tokens".into()], ..LoraConfig::default() };
    let tr = RefTrainer::new(&spec, &w, &lora, Some(q), TrainConfig::default(), 0).unwrap();
    tunecheck::train::checkpoint::save(&tr, &dir.path().join("adapter"), "tiny").unwrap();
    let mut out = String::new();
    for (label, file) in [
        ("4-bit checkpoint", "q4/model.safetensors"),
        ("adapter", "adapter/adapter_model.safetensors"),
        ("optimizer", "adapter/optimizer.safetensors"),
    ] {
        let f = tunecheck::io::st::StFile::open(&dir.path().join(file)).unwrap();
        out.push_str(&format!("{label} ({file}):\n"));
        for n in f.names().unwrap().iter().filter(|n| !n.contains("layers.") || n.contains("layers.0.")) {
            let (dt, shape) = f.info(n).unwrap().unwrap();
            out.push_str(&format!("  {n} {dt:?} {shape:?}\n"));
        }
    }
    common::golden().bind(|| insta::assert_snapshot!("manifests", out));
}
