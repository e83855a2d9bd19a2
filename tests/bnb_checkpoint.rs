//! transformers' bitsandbytes 4-bit checkpoints: ones written by transformers
//! (`fixtures/gen_bnb_model.py`) match their dequantized f32 path; tunecheck's own round-trip
//! bitwise; a QLoRA adapter reapplied on a base quantized the same way gives bitwise the
//! trainer's logits; bad 4-bit files are named.

use crate::common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rstest::rstest;
use tunecheck::adapt::{Base, LoraConfig, LoraInit, QuantConfig};
use tunecheck::io::{hf, peft, st::StFile};
use tunecheck::loader;
use tunecheck::props::{bitwise_equal, rel_l2};
use tunecheck::quant::QuantType;
use tunecheck::train::{RefTrainer, TrainConfig};
use tunecheck::Mode;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[rstest]
#[case::llama_nf4_double_quant("llama_bnb_nf4_dq", QuantType::Nf4, true)]
#[case::gemma2_fp4("gemma2_bnb_fp4", QuantType::Fp4, false)]
fn transformers_4bit_checkpoints_match_their_f32_path(#[case] name: &str, #[case] qt: QuantType, #[case] dq: bool) {
    let dir = root().join("fixtures/models").join(name);
    let ck = hf::load(&dir, &Device::Cpu, None).unwrap();
    let q = ck.quant.unwrap();
    assert_eq!((q.quant_type, q.double_quant, q.compute_dtype), (qt, dq, DType::F32));
    assert_eq!(ck.bases.len(), ck.spec.num_layers * 7, "every projection is 4-bit");
    assert!(ck.weights.contains_key("model.embed_tokens.weight") && !ck.weights.keys().any(|k| k.contains("proj")));
    let model = loader::checkpoint(&ck, None).unwrap().model;
    let r = StFile::open(&dir.join("reference.safetensors")).unwrap();
    let got = model.forward(&r.load("input_ids").unwrap(), Mode::Eval).unwrap();
    let err = rel_l2(&got, &r.load("logits").unwrap()).unwrap();
    assert!(err <= 1e-5, "{name}: rel L2 {err:.3e}");
}

fn quantized_copy(src: &Path, cfg: &QuantConfig) -> tempfile::TempDir {
    let ck = hf::load(src, &Device::Cpu, None).unwrap();
    let out = tempfile::tempdir().unwrap();
    tunecheck::io::quantize::save_quantized(out.path(), &ck.spec, &ck.weights, cfg).unwrap();
    out
}

#[test]
fn own_4bit_checkpoints_round_trip_bitwise() {
    let src = root().join("fixtures/models/gemma3");
    for cfg in [
        QuantConfig { compute_dtype: DType::F32, ..QuantConfig::default() },
        QuantConfig { quant_type: QuantType::Fp4, blocksize: 32, double_quant: false, compute_dtype: DType::BF16 },
    ] {
        let dir = quantized_copy(&src, &cfg);
        let ck = hf::load(dir.path(), &Device::Cpu, None).unwrap();
        assert_eq!(ck.quant, Some(cfg), "the 4-bit config travels with the checkpoint");
        let dense = hf::load(&src, &Device::Cpu, None).unwrap();
        let expect = loader::quantize_bases(&dense.spec, &dense.weights, &cfg).unwrap();
        for (path, base) in &ck.bases {
            let (Base::Quant4(a), Base::Quant4(b)) = (base, &expect[path]) else { panic!("{path} not 4-bit") };
            assert_eq!(a.q, b.q, "{path}: quantized data differs after reload");
            assert!(bitwise_equal(&a.dequantized().unwrap(), &b.dequantized().unwrap()).unwrap(), "{path}");
        }
    }
}

#[test]
fn qlora_adapter_on_a_requantized_base_reproduces_the_trainer_bitwise() {
    let src = root().join("fixtures/models/llama_gqa");
    let dense = hf::load(&src, &Device::Cpu, None).unwrap();
    let cfg = QuantConfig { compute_dtype: DType::F32, ..QuantConfig::default() };
    let lora = LoraConfig { init: LoraInit::NonZero(0.1), ..LoraConfig::default() };
    let tr = RefTrainer::new(&dense.spec, &dense.weights, &lora, Some(cfg), TrainConfig::default(), 9).unwrap();
    let adir = tempfile::tempdir().unwrap();
    peft::save(adir.path(), tr.model(), tr.lora(), tr.params(), tr.quant(), "llama_gqa").unwrap();
    let qdir = quantized_copy(&src, &cfg);
    let ck = hf::load(qdir.path(), &Device::Cpu, None).unwrap();
    let a = peft::read(adir.path()).unwrap();
    let model = loader::checkpoint(&ck, Some((&a, adir.path()))).unwrap().model;
    let ids = Tensor::new(&[[1u32, 4, 9, 16, 25, 36, 49]], &Device::Cpu).unwrap();
    let want = tr.logits(&ids, Mode::Eval).unwrap();
    let got = model.forward(&ids, Mode::Eval).unwrap();
    assert!(bitwise_equal(&got, &want).unwrap(), "rel L2 {:.3e}", rel_l2(&got, &want).unwrap());
    // Reloading on the dense base, or with transformers' defaults, is refused.
    assert!(loader::checkpoint(&dense, Some((&a, adir.path()))).is_err());
}

#[test]
fn bad_4bit_checkpoints_are_named() {
    let src = root().join("fixtures/models/llama_bnb_nf4_dq");
    let mut report = String::new();
    type Breaker = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Breaker)> = vec![
        ("config_says_fp4", Box::new(|d| patch_cfg(d, "bnb_4bit_quant_type", "fp4".into()))),
        ("no_quantization_config", Box::new(|d| patch_cfg_root(d, "quantization_config", serde_json::Value::Null))),
        ("missing_absmax", Box::new(|d| edit(d, |m| drop(m.remove("model.layers.1.mlp.up_proj.weight.absmax"))))),
        (
            "quant_map_altered",
            Box::new(|d| {
                edit(d, |m| {
                    let k = "model.layers.0.self_attn.k_proj.weight.quant_map";
                    let t = (m[k].clone() * 2.0).unwrap();
                    m.insert(k.into(), t);
                })
            }),
        ),
        (
            "state_not_json",
            Box::new(|d| {
                edit(d, |m| {
                    let t = Tensor::new(&b"{oops"[..], &Device::Cpu).unwrap();
                    m.insert("model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4".into(), t);
                })
            }),
        ),
        (
            "packed_truncated",
            Box::new(|d| {
                edit(d, |m| {
                    let k = "model.layers.0.mlp.gate_proj.weight";
                    let t = m[k].narrow(0, 0, 10).unwrap();
                    m.insert(k.into(), t);
                })
            }),
        ),
        (
            "absmax_wrong_dtype",
            Box::new(|d| {
                edit(d, |m| {
                    let k = "model.layers.0.self_attn.o_proj.weight.nested_absmax";
                    let t = m[k].to_dtype(DType::F16).unwrap();
                    m.insert(k.into(), t);
                })
            }),
        ),
    ];
    for (name, f) in cases {
        let dir = tempfile::tempdir().unwrap();
        for e in std::fs::read_dir(&src).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), dir.path().join(e.file_name())).unwrap();
        }
        f(dir.path());
        let e = hf::load(dir.path(), &Device::Cpu, None).err().unwrap_or_else(|| panic!("{name} loaded"));
        report.push_str(&format!("{name}: {}\n", e.to_string().replace(&dir.path().display().to_string(), "$DIR")));
    }
    common::golden().bind(|| insta::assert_snapshot!("bnb_checkpoint_errors", report));
}

fn patch_cfg_root(d: &Path, key: &str, v: serde_json::Value) {
    let p = d.join("config.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    c[key] = v;
    std::fs::write(&p, c.to_string()).unwrap();
}

fn patch_cfg(d: &Path, key: &str, v: serde_json::Value) {
    let p = d.join("config.json");
    let mut c: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    c["quantization_config"][key] = v;
    std::fs::write(&p, c.to_string()).unwrap();
}

fn edit(d: &Path, f: impl FnOnce(&mut std::collections::BTreeMap<String, Tensor>)) {
    let p = d.join(hf::SINGLE);
    let st = StFile::open(&p).unwrap();
    let mut m: std::collections::BTreeMap<String, Tensor> =
        st.names().unwrap().into_iter().map(|k| (k.clone(), st.load(&k).unwrap())).collect();
    drop(st);
    f(&mut m);
    tunecheck::io::st::write_safetensors(&p, &m).unwrap();
}

/// `fixtures/models/tunecheck_nf4_dq` was written by `tunecheck synth` + `quantize
/// --double-quant` and its reference logits computed by transformers + bitsandbytes from it:
/// transformers reads our serialisation as we do, and we still write those exact bytes.
#[test]
fn our_4bit_serialisation_is_what_transformers_read() {
    let dir = root().join("fixtures/models/tunecheck_nf4_dq");
    let ck = hf::load(&dir, &Device::Cpu, None).unwrap();
    let r = StFile::open(&dir.join("reference.safetensors")).unwrap();
    let got = loader::checkpoint(&ck, None).unwrap().model.forward(&r.load("input_ids").unwrap(), Mode::Eval).unwrap();
    let err = rel_l2(&got, &r.load("logits").unwrap()).unwrap();
    assert!(err <= 1e-5, "rel L2 {err:.3e}");
    let spec = tunecheck::io::config::read(&dir.join("config.json")).unwrap();
    let w = tunecheck::weights::generate(&spec, 5, &Device::Cpu).unwrap();
    let out = tempfile::tempdir().unwrap();
    tunecheck::io::quantize::save_quantized(out.path(), &spec, &w, &ck.quant.unwrap()).unwrap();
    let a = std::fs::read(out.path().join(hf::SINGLE)).unwrap();
    let b = std::fs::read(dir.join(hf::SINGLE)).unwrap();
    assert!(same_tensors(&a, &b), "the 4-bit bytes we write changed since transformers accepted them");
}

/// Two safetensors files hold the same tensors (names, dtypes, shapes, bytes); their headers
/// may differ in the save id a directory save adds to the metadata.
fn same_tensors(a: &[u8], b: &[u8]) -> bool {
    use safetensors::SafeTensors;
    let (a, b) = (SafeTensors::deserialize(a).unwrap(), SafeTensors::deserialize(b).unwrap());
    let mut na = a.names();
    let mut nb = b.names();
    na.sort();
    nb.sort();
    na == nb
        && na.iter().all(|k| {
            let (x, y) = (a.tensor(k).unwrap(), b.tensor(k).unwrap());
            x.dtype() == y.dtype() && x.shape() == y.shape() && x.data() == y.data()
        })
}
