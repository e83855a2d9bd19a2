//! The strict field reader, every JSON tunecheck reads: a field of the wrong type is an error
//! naming the file and the field (never a default: `"bnb_4bit_quant_type": 4` is not FP4,
//! `"bnb_4bit_use_double_quant": "true"` is not false, `"use_dora": "yes"` is not accepted);
//! fields that change the computation and are not implemented are refused by name; unknown
//! harmless fields are accepted. The messages are pinned in `golden/strict_field_errors.snap`.

use crate::common;

use std::path::Path;

use candle_core::Device;
use serde_json::{json, Value};

use common::copy;

fn edit_json(path: &Path, f: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

/// The error of `r`, with the temp directory shown as `<dir>`.
fn err<T>(r: tunecheck::Result<T>, dir: &Path) -> String {
    match r {
        Ok(_) => panic!("accepted"),
        Err(e) => e.to_string().replace(&dir.display().to_string(), "<dir>"),
    }
}

/// A named edit of a JSON file.
type Edit<'a> = (&'a str, &'a dyn Fn(&mut Value));

/// Each edit of a copy of `src`'s `file`, loaded with `load`: (what, error).
fn cases(
    src: &str,
    file: &str,
    load: &dyn Fn(&Path) -> tunecheck::Result<()>,
    edits: &[Edit],
) -> Vec<(String, String)> {
    edits
        .iter()
        .map(|(what, edit)| {
            let tmp = copy(src);
            edit_json(&tmp.path().join(file), edit);
            let e = err(load(tmp.path()), tmp.path());
            assert!(e.contains(file), "{what}: the error does not name {file}: {e}");
            (what.to_string(), e)
        })
        .collect()
}

fn set(k: &'static str, v: Value) -> impl Fn(&mut Value) {
    move |j: &mut Value| j[k] = v.clone()
}

fn set_q(k: &'static str, v: Value) -> impl Fn(&mut Value) {
    move |j: &mut Value| j["quantization_config"][k] = v.clone()
}

#[test]
fn mistyped_and_unimplemented_fields_are_errors_naming_file_and_field() {
    let mut out: Vec<(String, String)> = Vec::new();
    let model = |d: &Path| tunecheck::io::hf::load(d, &Device::Cpu, None).map(drop);
    let adapter = |d: &Path| tunecheck::io::peft::read(d).map(drop);

    out.extend(cases(
        "models/llama_bnb_nf4_dq",
        "config.json",
        &model,
        &[
            ("quant_type 4", &set_q("bnb_4bit_quant_type", json!(4))),
            ("double_quant \"true\"", &set_q("bnb_4bit_use_double_quant", json!("true"))),
            ("compute_dtype 16", &set_q("bnb_4bit_compute_dtype", json!(16))),
            ("load_in_8bit", &set_q("load_in_8bit", json!(true))),
            ("skip modules", &set_q("llm_int8_skip_modules", json!(["q_proj"]))),
            ("load_in_4bit \"yes\"", &set_q("load_in_4bit", json!("yes"))),
        ],
    ));
    out.extend(cases(
        "models/llama_gqa",
        "config.json",
        &model,
        &[
            ("hidden_size \"16\"", &set("hidden_size", json!("16"))),
            ("tie_word_embeddings \"false\"", &set("tie_word_embeddings", json!("false"))),
            ("rms_norm_eps \"1e-6\"", &set("rms_norm_eps", json!("1e-6"))),
            ("rope factor \"8\"", &|j: &mut Value| {
                j["rope_parameters"] = json!({"rope_type": "linear", "factor": "8", "rope_theta": 10000.0})
            }),
        ],
    ));
    out.extend(cases(
        "adapters/llama_lora_r4",
        "adapter_config.json",
        &adapter,
        &[
            ("use_dora \"yes\"", &set("use_dora", json!("yes"))),
            ("use_dora true", &set("use_dora", json!(true))),
            ("bias all", &set("bias", json!("all"))),
            ("lora_bias", &set("lora_bias", json!(true))),
            ("layers_to_transform", &set("layers_to_transform", json!([0]))),
            ("rank_pattern", &set("rank_pattern", json!({"q_proj": 8}))),
            ("alpha_pattern", &set("alpha_pattern", json!({"q_proj": 8}))),
            ("fan_in_fan_out", &set("fan_in_fan_out", json!(true))),
            ("exclude_modules", &set("exclude_modules", json!(["q_proj"]))),
            ("trainable_token_indices", &set("trainable_token_indices", json!([5]))),
            ("target_parameters", &set("target_parameters", json!(["mlp.experts"]))),
            ("kasa_config", &set("kasa_config", json!({}))),
            ("r \"4\"", &set("r", json!("4"))),
            ("lora_alpha \"8\"", &set("lora_alpha", json!("8"))),
            ("use_rslora 1", &set("use_rslora", json!(1))),
            ("modules_to_save [1]", &set("modules_to_save", json!([1]))),
        ],
    ));

    // A bitsandbytes quant-state blob with a mistyped blocksize.
    let state = json!({"quant_type": "nf4", "blocksize": "64", "dtype": "float32", "shape": [4, 64]});
    let e = tunecheck::io::bnb::parse_quant_state(
        &serde_json::to_vec(&state).unwrap(),
        Path::new("model.safetensors"),
        "m.weight.quant_state.bitsandbytes__nf4",
        tunecheck::quant::QuantType::Nf4,
        &[4, 64],
    );
    out.push(("quant state blocksize \"64\"".into(), err(e, Path::new("/nonexistent"))));

    // The shard index, the trainer state and the save manifest.
    let tmp = tempfile::tempdir().unwrap();
    let spec = tunecheck::spec::ArchSpec::tiny(tunecheck::spec::Family::Llama);
    let w = tunecheck::weights::generate(&spec, 1, &Device::Cpu).unwrap();
    let dir = tmp.path().join("m");
    tunecheck::io::hf::save(&dir, &spec, &w, tunecheck::io::hf::Sharding::MaxBytes(20_000)).unwrap();
    std::fs::remove_file(dir.join(tunecheck::io::manifest::MANIFEST)).unwrap();
    edit_json(&dir.join("model.safetensors.index.json"), |j| j["weight_map"]["lm_head.weight"] = json!(3));
    out.push(("index entry 3".into(), err(model(&dir), tmp.path())));
    tunecheck::io::hf::save(&dir, &spec, &w, tunecheck::io::hf::Sharding::Single).unwrap();
    edit_json(&dir.join(tunecheck::io::manifest::MANIFEST), |j| j["files"]["config.json"]["bytes"] = json!("10"));
    out.push(("manifest bytes \"10\"".into(), err(model(&dir), tmp.path())));

    use tunecheck::subject::{reference, Trainer};
    let setup = tunecheck::subject::Setup {
        weights: w,
        lora: tunecheck::adapt::LoraConfig { target_modules: vec!["q_proj".into()], ..Default::default() },
        quant: None,
        train: tunecheck::train::TrainConfig::default(),
        adapter_seed: 3,
        spec,
    };
    let ck = tmp.path().join("ck");
    reference(&setup, &Device::Cpu).unwrap().save(&ck).unwrap();
    std::fs::remove_file(ck.join(tunecheck::io::manifest::MANIFEST)).unwrap();
    let state = ck.join(tunecheck::train::checkpoint::STATE);
    edit_json(&state, |j| j["optimizer_step"] = json!("3"));
    out.push((
        "trainer state step \"3\"".into(),
        err(tunecheck::train::checkpoint::load(&Device::Cpu, &ck), tmp.path()),
    ));
    edit_json(&state, |j| {
        j["optimizer_step"] = json!(3);
        j["train_config"]["max_grad_norm"] = json!("1.0");
    });
    out.push((
        "trainer state max_grad_norm \"1.0\"".into(),
        err(tunecheck::train::checkpoint::load(&Device::Cpu, &ck), tmp.path()),
    ));

    let text: String = out.iter().map(|(what, e)| format!("{what}\n  {e}\n")).collect();
    common::golden().bind(|| insta::assert_snapshot!("strict_field_errors", text));
}

#[test]
fn unknown_harmless_fields_are_accepted() {
    let tmp = copy("adapters/llama_lora_r4");
    edit_json(&tmp.path().join("adapter_config.json"), |j| {
        j["a_field_from_a_future_peft"] = json!({"anything": [1, 2]});
        j["init_lora_weights"] = json!("gaussian");
        j["runtime_config"] = json!({"ephemeral_gpu_offload": false});
        j["use_dora"] = json!(false);
        j["layers_pattern"] = Value::Null;
        j["rank_pattern"] = json!({});
    });
    tunecheck::io::peft::read(tmp.path()).unwrap();
    let tmp = copy("models/llama_gqa");
    edit_json(&tmp.path().join("config.json"), |j| {
        j["transformers_version"] = json!("9.9.9");
        j["some_new_field"] = json!([true]);
    });
    tunecheck::io::hf::load(tmp.path(), &Device::Cpu, None).unwrap();
}
