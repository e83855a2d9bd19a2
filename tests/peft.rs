//! PEFT adapters: adapters saved by Python PEFT (`fixtures/gen_peft.py`) give PEFT's logits in
//! tunecheck (1e-5 relative L2, f32), and so does one saved by tunecheck and loaded by PEFT for
//! the reference; tunecheck's saved adapters reload bitwise; the base's
//! quantization recorded with an adapter is checked on load; bad adapter files are named.

use crate::common;

use std::path::PathBuf;

use candle_core::{DType, Device};
use rstest::rstest;
use tunecheck::adapt::{LoraConfig, LoraInit, QuantConfig};
use tunecheck::io::{hf, peft, st::StFile};
use tunecheck::loader;
use tunecheck::props::{bitwise_equal, rel_l2};
use tunecheck::train::{RefTrainer, TrainConfig};
use tunecheck::{Mode, Transformer};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[rstest]
#[case::llama_lora_r4("llama_lora_r4", "llama_gqa")]
#[case::llama_rslora_embed_head("llama_rslora_embed_head", "llama_gqa")]
#[case::gemma2_lora_mlp("gemma2_lora_mlp", "gemma2_window")]
#[case::gemma3_lora_save_embed("gemma3_lora_save_embed", "gemma3")]
// LoRA on embed_tokens and lm_head: PEFT saves both base matrices beside the adapter.
#[case::llama_lora_embed_head("llama_lora_embed_head", "llama_gqa")]
// The same over a vocabulary resized from 96 to 101 before training, and a resized vocabulary
// without embedding targets (PEFT then saves the plain matrices).
#[case::llama_lora_embed_head_resized("llama_lora_embed_head_resized", "llama_gqa")]
#[case::llama_lora_resized("llama_lora_resized", "llama_gqa")]
// Written by `tunecheck train` (LoRA on embed_tokens and lm_head too), loaded by PEFT for the
// reference: the other direction.
#[case::tunecheck_written("tunecheck_written", "llama_gqa")]
fn python_peft_adapters_match(#[case] adapter: &str, #[case] base: &str) {
    let adir = root().join("fixtures/adapters").join(adapter);
    let ck = hf::load(&root().join("fixtures/models").join(base), &Device::Cpu, None).unwrap();
    let a = peft::read(&adir).unwrap();
    let expect = if adapter == "tunecheck_written" { Some(None) } else { None };
    assert_eq!(a.base_quant, expect, "PEFT-made adapters record no quantization; ours record none-quantized");
    let model = loader::checkpoint(&ck, Some((&a, &adir))).unwrap().model;
    let (ids, want) = peft_reference(&adir);
    let got = model.forward(&ids, Mode::Eval).unwrap().to_dtype(DType::F32).unwrap();
    let err = rel_l2(&got, &want).unwrap();
    assert!(err <= 1e-5, "{adapter}: rel L2 {err:.3e}");
    // The adapter matters: without it the logits are far off (or, over a resized vocabulary,
    // the base cannot even read the new token ids).
    match Transformer::from_weights(&ck.spec, &ck.weights).unwrap().forward(&ids, Mode::Eval) {
        Ok(plain) => assert!(rel_l2(&plain, &want).unwrap() > 1e-3, "{adapter}: the adapter changes nothing"),
        Err(e) => {
            assert!(adapter.contains("resized") && e.to_string().contains("out of range"), "{adapter}: {e}");
            assert_eq!(model.spec().vocab_size, 101);
        }
    }
}

/// The ids and PEFT's eval logits stored beside a fixture adapter.
fn peft_reference(adir: &std::path::Path) -> (candle_core::Tensor, candle_core::Tensor) {
    let reference = StFile::open(&adir.join("reference.safetensors")).unwrap();
    (reference.load("input_ids").unwrap(), reference.load("logits").unwrap())
}

fn trained(quant: Option<QuantConfig>) -> (RefTrainer, hf::Checkpoint) {
    let ck = hf::load(&root().join("fixtures/models/llama_gqa"), &Device::Cpu, None).unwrap();
    let lora = LoraConfig {
        r: 3,
        alpha: 5.0,
        use_rslora: true,
        target_modules: vec!["q_proj".into(), "down_proj".into(), "embed_tokens".into()],
        modules_to_save: vec!["lm_head".into()],
        init: LoraInit::NonZero(0.1),
        ..LoraConfig::default()
    };
    let tr = RefTrainer::new(&ck.spec, &ck.weights, &lora, quant, TrainConfig::default(), 5).unwrap();
    (tr, ck)
}

/// `ck`'s dense weights as a checkpoint quantized with `quant` (its projections quantized).
fn with_quant(ck: &hf::Checkpoint, quant: Option<QuantConfig>) -> hf::Checkpoint {
    let bases = match &quant {
        Some(q) => loader::quantize_bases(&ck.spec, &ck.weights, q).unwrap(),
        None => Default::default(),
    };
    hf::Checkpoint { spec: ck.spec.clone(), weights: ck.weights.clone(), quant, bases }
}

#[test]
fn saved_adapter_reloads_bitwise() {
    for quant in [None, Some(QuantConfig { compute_dtype: DType::F32, ..QuantConfig::default() })] {
        let (tr, ck) = trained(quant);
        let dir = tempfile::tempdir().unwrap();
        peft::save(dir.path(), tr.model(), tr.lora(), tr.params(), tr.quant(), "fixtures/models/llama_gqa").unwrap();
        let a = peft::read(dir.path()).unwrap();
        assert_eq!(a.base_quant, Some(quant));
        // A fresh model of the same base (quantized the same way) with the adapter applied.
        let loader::Loaded { model, params } =
            loader::checkpoint(&with_quant(&ck, quant), Some((&a, dir.path()))).unwrap();
        for (name, v) in tr.params() {
            let (_, w) = params.iter().find(|(n, _)| n == name).unwrap();
            assert!(bitwise_equal(v.as_tensor(), w.as_tensor()).unwrap(), "{name}");
        }
        let ids = candle_core::Tensor::new(&[[1u32, 5, 9, 2, 7, 3]], &Device::Cpu).unwrap();
        let a = tr.logits(&ids, Mode::Eval).unwrap();
        let b = model.forward(&ids, Mode::Eval).unwrap();
        assert!(bitwise_equal(&a, &b).unwrap(), "quant={}: logits differ after reload", quant.is_some());
    }
}

#[test]
fn quantization_mismatch_on_reload_is_an_error() {
    let q = QuantConfig { compute_dtype: DType::F32, ..QuantConfig::default() };
    let (tr, ck) = trained(Some(q));
    let dir = tempfile::tempdir().unwrap();
    peft::save(dir.path(), tr.model(), tr.lora(), tr.params(), tr.quant(), "base").unwrap();
    let a = peft::read(dir.path()).unwrap();
    for wrong in
        [None, Some(QuantConfig::transformers_defaults()), Some(QuantConfig { compute_dtype: DType::BF16, ..q })]
    {
        let e = loader::checkpoint(&with_quant(&ck, wrong), Some((&a, dir.path()))).unwrap_err().to_string();
        assert!(e.contains("tunecheck_base_quantization") && e.contains("adapter_config.json"), "{e}");
    }
}

#[test]
fn bad_adapter_files_are_named() {
    let (tr, _) = trained(None);
    let mut report = String::new();
    type Breaker = Box<dyn Fn(&std::path::Path)>;
    let cases: Vec<(&str, Breaker)> = vec![
        ("not_lora", Box::new(|d| patch(d, "peft_type", serde_json::json!("PREFIX_TUNING")))),
        ("regex_targets", Box::new(|d| patch(d, "target_modules", serde_json::json!(".*proj")))),
        ("dora", Box::new(|d| patch(d, "use_dora", serde_json::json!(true)))),
        ("zero_rank", Box::new(|d| patch(d, "r", serde_json::json!(0)))),
        ("unknown_target", Box::new(|d| patch(d, "target_modules", serde_json::json!(["q_proj", "attn"])))),
        (
            "missing_tensor",
            Box::new(|d| edit(d, |m| drop(m.remove("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight")))),
        ),
        (
            "extra_tensor",
            Box::new(|d| {
                edit(d, |m| {
                    let t = m["base_model.model.lm_head.weight"].clone();
                    m.insert("base_model.model.model.norm.weight".into(), t);
                })
            }),
        ),
        (
            "wrong_shape",
            Box::new(|d| {
                edit(d, |m| {
                    let t = candle_core::Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap();
                    m.insert("base_model.model.model.layers.1.mlp.down_proj.lora_B.weight".into(), t);
                })
            }),
        ),
        (
            "bad_prefix",
            Box::new(|d| {
                edit(d, |m| {
                    let t = m.remove("base_model.model.lm_head.weight").unwrap();
                    m.insert("lm_head.weight".into(), t);
                })
            }),
        ),
        (
            "resized_embed_without_head",
            Box::new(|d| {
                edit(d, |m| {
                    let t = candle_core::Tensor::ones((101, 32), DType::F32, &Device::Cpu).unwrap();
                    m.insert("base_model.model.model.embed_tokens.base_layer.weight".into(), t);
                })
            }),
        ),
        (
            "base_layer_wrong_width",
            Box::new(|d| {
                edit(d, |m| {
                    let t = candle_core::Tensor::ones((96, 31), DType::F32, &Device::Cpu).unwrap();
                    m.insert("base_model.model.model.embed_tokens.base_layer.weight".into(), t);
                })
            }),
        ),
    ];
    for (name, break_it) in cases {
        let dir = tempfile::tempdir().unwrap();
        peft::save(dir.path(), tr.model(), tr.lora(), tr.params(), None, "base").unwrap();
        // Damaged as a PEFT-written adapter would be (no save manifest): the loader's own
        // checks are under test here.
        std::fs::remove_file(dir.path().join(tunecheck::io::manifest::MANIFEST)).unwrap();
        break_it(dir.path());
        let ck = hf::load(&root().join("fixtures/models/llama_gqa"), &Device::Cpu, None).unwrap();
        let e = peft::read(dir.path()).and_then(|a| loader::checkpoint(&ck, Some((&a, dir.path()))).map(|_| ()));
        let msg = e.expect_err(name).to_string().replace(&dir.path().display().to_string(), "$DIR");
        report.push_str(&format!("{name}: {msg}\n"));
    }
    common::golden().bind(|| insta::assert_snapshot!("adapter_errors", report));
}

fn patch(dir: &std::path::Path, key: &str, value: serde_json::Value) {
    let p = dir.join(peft::CONFIG);
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    v[key] = value;
    std::fs::write(&p, v.to_string()).unwrap();
}

fn edit(dir: &std::path::Path, f: impl FnOnce(&mut std::collections::BTreeMap<String, candle_core::Tensor>)) {
    let p = dir.join(peft::WEIGHTS);
    let st = StFile::open(&p).unwrap();
    let mut m: std::collections::BTreeMap<String, candle_core::Tensor> =
        st.names().unwrap().into_iter().map(|k| (k.clone(), st.load(&k).unwrap())).collect();
    drop(st);
    f(&mut m);
    tunecheck::io::st::write_safetensors(&p, &m).unwrap();
}

/// The reference trainer starts from a PEFT-made adapter directory: its eval logits are PEFT's
/// (1e-5 relative L2), its trainable tensors the file's, and it trains from there.
#[rstest]
#[case::llama_rslora_embed_head("llama_rslora_embed_head", "llama_gqa")]
#[case::gemma3_lora_save_embed("gemma3_lora_save_embed", "gemma3")]
#[case::llama_lora_embed_head("llama_lora_embed_head", "llama_gqa")]
#[case::llama_lora_embed_head_resized("llama_lora_embed_head_resized", "llama_gqa")]
#[case::llama_lora_resized("llama_lora_resized", "llama_gqa")]
fn reference_starts_from_a_peft_adapter_dir(#[case] adapter: &str, #[case] base: &str) {
    let adir = root().join("fixtures/adapters").join(adapter);
    let ck = hf::load(&root().join("fixtures/models").join(base), &Device::Cpu, None).unwrap();
    let mut tr = RefTrainer::from_adapter_dir(&ck.spec, &ck.weights, &adir, None, TrainConfig::default()).unwrap();
    let (ids, want) = peft_reference(&adir);
    let got = tr.logits(&ids, Mode::Eval).unwrap().to_dtype(DType::F32).unwrap();
    let err = rel_l2(&got, &want).unwrap();
    assert!(err <= 1e-5, "{adapter}: rel L2 {err:.3e}");
    let file = peft::read(&adir).unwrap();
    for (name, v) in tr.params() {
        assert!(bitwise_equal(v.as_tensor(), &file.tensors[name]).unwrap(), "{adapter}: `{name}` is not the file's");
    }
    let batch = tunecheck::strategy::random_batches(tr.spec().vocab_size, 1, 1, 2, 8);
    let r = tr.train_step(&batch).unwrap();
    assert!(r.loss.is_finite() && r.tokens > 0);
    // A 4-bit base that the adapter does not record is refused, naming the field.
    let written = root().join("fixtures/adapters/tunecheck_written");
    let e = RefTrainer::from_adapter_dir(
        &ck.spec,
        &ck.weights,
        &written,
        Some(QuantConfig::transformers_defaults()),
        TrainConfig::default(),
    );
    if base == "llama_gqa" {
        let e = e.err().expect("a quantization mismatch must be refused").to_string();
        assert!(e.contains("tunecheck_base_quantization"), "{e}");
    }
}
