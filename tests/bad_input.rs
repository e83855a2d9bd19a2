//! Bad input, every loader: each class of damage gives an error naming the file and the key
//! or field, never a panic. The messages are pinned in `golden/bad_input_errors.snap`
//! (temp paths shown as `<dir>`).

use crate::common;

use std::path::Path;

use candle_core::Device;
use serde_json::{json, Value};

use common::{copy, fixture};

/// A safetensors file as (header JSON, data).
fn st_read(path: &Path) -> (serde_json::Map<String, Value>, Vec<u8>) {
    let b = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(b[..8].try_into().unwrap()) as usize;
    let h: Value = serde_json::from_slice(&b[8..8 + n]).unwrap();
    (h.as_object().unwrap().clone(), b[8 + n..].to_vec())
}

fn st_write(path: &Path, header: &serde_json::Map<String, Value>, data: &[u8]) {
    let mut h = serde_json::to_vec(header).unwrap();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h);
    out.extend(data);
    std::fs::write(path, out).unwrap();
}

/// Rebuild a safetensors file with `f` applied to its (name, dtype, shape, bytes) list.
fn st_rewrite(path: &Path, f: impl FnOnce(&mut Vec<(String, String, Vec<usize>, Vec<u8>)>)) {
    let (h, data) = st_read(path);
    let mut ts: Vec<(String, String, Vec<usize>, Vec<u8>)> = h
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| {
            let o = v["data_offsets"].as_array().unwrap();
            let (a, b) = (o[0].as_u64().unwrap() as usize, o[1].as_u64().unwrap() as usize);
            let shape = v["shape"].as_array().unwrap().iter().map(|d| d.as_u64().unwrap() as usize).collect();
            (k.clone(), v["dtype"].as_str().unwrap().to_string(), shape, data[a..b].to_vec())
        })
        .collect();
    f(&mut ts);
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut out = Vec::new();
    for (k, dt, shape, bytes) in ts {
        header.insert(k, json!({"dtype": dt, "shape": shape, "data_offsets": [out.len(), out.len() + bytes.len()]}));
        out.extend(bytes);
    }
    st_write(path, &header, &out);
}

fn edit_json(path: &Path, f: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(path, serde_json::to_vec_pretty(&v).unwrap()).unwrap();
}

fn load_model(dir: &Path) -> String {
    match tunecheck::loader::open(dir, &Device::Cpu, None).map(|_| ()) {
        Ok(()) => "loaded (expected an error)".into(),
        Err(e) => e.to_string().replace(&dir.display().to_string(), "<dir>"),
    }
}

fn load_adapter(dir: &Path) -> String {
    match tunecheck::io::peft::read(dir) {
        Ok(_) => "loaded (expected an error)".into(),
        Err(e) => e.to_string().replace(&dir.display().to_string(), "<dir>"),
    }
}

#[test]
fn every_class_of_bad_input_names_the_file_and_key() {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut case = |name: &str, msg: String| out.push((name.to_string(), msg));
    let w = "model.safetensors";

    // --- safetensors ------------------------------------------------------------------
    let d = copy("models/llama_gqa");
    let b = std::fs::read(d.path().join(w)).unwrap();
    std::fs::write(d.path().join(w), &b[..b.len() - 100]).unwrap();
    case("safetensors: truncated data", load_model(d.path()));

    let d = copy("models/llama_gqa");
    let mut b = std::fs::read(d.path().join(w)).unwrap();
    b[..8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    std::fs::write(d.path().join(w), &b).unwrap();
    case("safetensors: header length larger than the file", load_model(d.path()));

    let d = copy("models/llama_gqa");
    let mut b = std::fs::read(d.path().join(w)).unwrap();
    b[..8].copy_from_slice(&16u64.to_le_bytes());
    std::fs::write(d.path().join(w), &b).unwrap();
    case("safetensors: header length cuts the JSON", load_model(d.path()));

    let d = copy("models/llama_gqa");
    let (mut h, data) = st_read(&d.path().join(w));
    h["lm_head.weight"]["data_offsets"][1] = json!(data.len() + 4096);
    st_write(&d.path().join(w), &h, &data);
    case("safetensors: offsets beyond the data", load_model(d.path()));

    let d = copy("models/llama_gqa");
    let (mut h, data) = st_read(&d.path().join(w));
    let first = h["model.norm.weight"]["data_offsets"].clone();
    h["model.layers.0.input_layernorm.weight"]["data_offsets"] = first;
    st_write(&d.path().join(w), &h, &data);
    case("safetensors: overlapping offsets", load_model(d.path()));

    let d = copy("models/llama_gqa");
    let mut b = std::fs::read(d.path().join(w)).unwrap();
    b[9] = 0xff;
    b[10] = 0xfe;
    std::fs::write(d.path().join(w), &b).unwrap();
    case("safetensors: header not UTF-8", load_model(d.path()));

    let d = copy("models/llama_gqa");
    st_rewrite(&d.path().join(w), |ts| {
        let t = ts.iter_mut().find(|t| t.0 == "model.norm.weight").unwrap();
        t.1 = "I32".into();
    });
    case("safetensors: wrong dtype", load_model(d.path()));

    let d = copy("models/llama_gqa");
    st_rewrite(&d.path().join(w), |ts| {
        let t = ts.iter_mut().find(|t| t.0 == "model.layers.1.self_attn.k_proj.weight").unwrap();
        t.2.reverse();
    });
    case("safetensors: wrong shape", load_model(d.path()));

    let d = copy("models/llama_gqa");
    st_rewrite(&d.path().join(w), |ts| ts.retain(|t| t.0 != "model.layers.1.mlp.down_proj.weight"));
    case("safetensors: missing tensor", load_model(d.path()));

    let d = copy("models/llama_gqa");
    st_rewrite(&d.path().join(w), |ts| {
        ts.push(("model.layers.9.extra.weight".into(), "F32".into(), vec![2], vec![0; 8]))
    });
    case("safetensors: unexpected tensor", load_model(d.path()));

    let d = copy("models/llama_gqa");
    std::fs::remove_file(d.path().join(w)).unwrap();
    std::fs::create_dir(d.path().join(w)).unwrap();
    case("safetensors: a directory where the file should be", load_model(d.path()));

    // --- config.json --------------------------------------------------------------------
    let d = copy("models/gemma3");
    std::fs::write(d.path().join("config.json"), b"{\"model_type\": \"gemma3_text\", ").unwrap();
    case("config.json: truncated JSON", load_model(d.path()));

    let d = copy("models/gemma3");
    edit_json(&d.path().join("config.json"), |v| v["num_key_value_heads"] = json!(3));
    case("config.json: kv heads do not divide heads", load_model(d.path()));

    let d = copy("models/gemma3");
    edit_json(&d.path().join("config.json"), |v| {
        v.as_object_mut().unwrap().remove("hidden_size");
    });
    case("config.json: missing field", load_model(d.path()));

    let d = copy("models/gemma3");
    edit_json(&d.path().join("config.json"), |v| v["model_type"] = json!("mamba"));
    case("config.json: unknown model_type", load_model(d.path()));

    let d = copy("models/gemma3");
    edit_json(&d.path().join("config.json"), |v| v["vocab_size"] = json!(1u64 << 40));
    case("config.json: absurd size", load_model(d.path()));

    // --- sharded index -------------------------------------------------------------------
    let sharded = |f: &dyn Fn(&Path)| -> String {
        let d = tempfile::tempdir().unwrap();
        let ck = tunecheck::io::hf::load(&fixture("models/llama_gqa"), &Device::Cpu, None).unwrap();
        tunecheck::io::hf::save(d.path(), &ck.spec, &ck.weights, tunecheck::io::hf::Sharding::MaxBytes(30_000))
            .unwrap();
        // Damage as a checkpoint written by transformers would have it (no save manifest):
        // the loader's own checks are under test here, the manifest's in crash_safety.rs.
        std::fs::remove_file(d.path().join(tunecheck::io::manifest::MANIFEST)).unwrap();
        f(d.path());
        load_model(d.path())
    };
    let index = "model.safetensors.index.json";
    case(
        "index: weight_map missing",
        sharded(&|p| {
            edit_json(&p.join(index), |v| {
                v.as_object_mut().unwrap().remove("weight_map");
            })
        }),
    );
    case(
        "index: shard file missing",
        sharded(&|p| std::fs::remove_file(p.join("model-00002-of-00004.safetensors")).unwrap()),
    );
    case(
        "index: key listed in the wrong shard",
        sharded(&|p| {
            edit_json(&p.join(index), |v| {
                let cur = v["weight_map"]["lm_head.weight"].as_str().unwrap().to_string();
                let other =
                    v["weight_map"].as_object().unwrap().values().find(|f| f.as_str() != Some(&cur)).unwrap().clone();
                v["weight_map"]["lm_head.weight"] = other;
            })
        }),
    );
    case(
        "index: path outside the directory",
        sharded(&|p| edit_json(&p.join(index), |v| v["weight_map"]["lm_head.weight"] = json!("../../etc/passwd"))),
    );

    // --- bitsandbytes 4-bit ---------------------------------------------------------------
    let q = "model.layers.0.self_attn.q_proj.weight";
    let d = copy("models/llama_bnb_nf4_dq");
    st_rewrite(&d.path().join(w), |ts| {
        let t = ts.iter_mut().find(|t| t.0 == format!("{q}.quant_state.bitsandbytes__nf4")).unwrap();
        t.3 = b"{\"quant_type\": \"nf4\", \"blocksize\": ".to_vec();
        t.2 = vec![t.3.len()];
    });
    case("bnb: quant_state JSON truncated", load_model(d.path()));

    let d = copy("models/llama_bnb_nf4_dq");
    st_rewrite(&d.path().join(w), |ts| {
        let t = ts.iter_mut().find(|t| t.0 == format!("{q}.absmax")).unwrap();
        t.3.truncate(t.3.len() - 1);
        t.2 = vec![t.3.len()];
    });
    case("bnb: absmax length wrong", load_model(d.path()));

    let d = copy("models/llama_bnb_nf4_dq");
    st_rewrite(&d.path().join(w), |ts| ts.retain(|t| t.0 != format!("{q}.nested_absmax")));
    case("bnb: nested_absmax missing", load_model(d.path()));

    let d = copy("models/llama_bnb_nf4_dq");
    edit_json(&d.path().join("config.json"), |v| v["quantization_config"]["bnb_4bit_quant_type"] = json!("int3"));
    case("bnb: quant type unknown", load_model(d.path()));

    // --- PEFT adapters --------------------------------------------------------------------
    let d = copy("adapters/llama_lora_r4");
    edit_json(&d.path().join("adapter_config.json"), |v| {
        v.as_object_mut().unwrap().remove("peft_type");
    });
    case("adapter: peft_type missing", load_adapter(d.path()));

    let d = copy("adapters/llama_lora_r4");
    edit_json(&d.path().join("adapter_config.json"), |v| v["r"] = json!(-1));
    case("adapter: negative rank", load_adapter(d.path()));

    let d = copy("adapters/llama_lora_r4");
    std::fs::remove_file(d.path().join("adapter_model.safetensors")).unwrap();
    case("adapter: weights missing", load_adapter(d.path()));

    let d = copy("adapters/llama_lora_r4");
    std::fs::write(d.path().join("adapter_config.json"), [0xffu8, 0xfe, 0x00]).unwrap();
    case("adapter: config not UTF-8", load_adapter(d.path()));

    let d = copy("adapters/llama_lora_r4");
    let base = tunecheck::io::hf::load(&fixture("models/llama_gqa"), &Device::Cpu, None).unwrap();
    st_rewrite(&d.path().join("adapter_model.safetensors"), |ts| {
        let t = ts.iter_mut().find(|t| t.0.contains("lora_A")).unwrap();
        t.2 = vec![t.2[1], t.2[0]];
    });
    let msg = match tunecheck::io::peft::read(d.path()) {
        Err(e) => e.to_string(),
        Ok(a) => match tunecheck::loader::checkpoint(&base, Some((&a, d.path()))) {
            Ok(_) => "loaded (expected an error)".into(),
            Err(e) => e.to_string(),
        },
    };
    case("adapter: tensor shape wrong", msg.replace(&d.path().display().to_string(), "<dir>"));

    // --- tokenizer.json -------------------------------------------------------------------
    let d = tempfile::tempdir().unwrap();
    let tj = std::fs::read(fixture("tokenizer.json")).unwrap();
    std::fs::write(d.path().join("tokenizer.json"), &tj[..tj.len() / 3]).unwrap();
    let msg = match tunecheck::data::tokenizer::load(&d.path().join("tokenizer.json")) {
        Ok(_) => "loaded (expected an error)".into(),
        Err(e) => e.to_string().replace(&d.path().display().to_string(), "<dir>"),
    };
    case("tokenizer.json: truncated", msg);

    // --- the directory itself ----------------------------------------------------------------
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("model"), b"x").unwrap();
    case("directory: is a file", load_model(&d.path().join("model")).replace(&d.path().display().to_string(), "<dir>"));

    let text: String = out.iter().map(|(k, v)| format!("{k}\n  {v}\n")).collect();
    for (k, v) in &out {
        assert!(!v.starts_with("loaded"), "{k}: {v}");
        assert!(v.contains('`') || v.contains("<dir>") || v.contains(".json"), "{k}: the message names no file: {v}");
    }
    common::golden().bind(|| insta::assert_snapshot!("bad_input_errors", text));
}

#[test]
fn unreadable_files_are_errors_not_panics() {
    use std::os::unix::fs::PermissionsExt;
    let d = copy("models/llama_gqa");
    let p = d.path().join("model.safetensors");
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o000)).unwrap();
    let readable = std::fs::File::open(&p).is_ok();
    let msg = load_model(d.path());
    if readable {
        // Running as root: permissions do not apply, the load succeeds.
        assert!(msg.starts_with("loaded"), "{msg}");
    } else {
        assert!(msg.contains("model.safetensors") && msg.to_lowercase().contains("permission"), "{msg}");
    }
}
