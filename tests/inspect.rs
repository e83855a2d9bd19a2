//! `tunecheck inspect`: planted zero rows (not from the fixtures) are listed exactly, with
//! token strings and chat-template flags; NaN tensors and adapter/base 4-bit mismatches are
//! findings (exit 1); clean fixtures exit 0; corrupted variants of every fixture exit 2 with a
//! one-line reason and no panic.

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use tunecheck::io::hf::{self, Sharding};
use tunecheck::spec::{ArchSpec, Family};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tunecheck"))
}

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(p)
}

/// A Llama checkpoint over the fixture tokenizer with rows `zero` planted, a chat template.
fn planted(dir: &Path, zero: &[u32], sharding: Sharding) -> tunecheck::data::tokenizer::Specials {
    let tok = tunecheck::data::tokenizer::fixture().unwrap();
    let sp = tunecheck::data::tokenizer::specials(&tok).unwrap();
    let mut spec = ArchSpec::tiny(Family::Llama);
    spec.vocab_size = tok.get_vocab_size(true);
    let mut w = tunecheck::weights::generate(&spec, 11, &Device::Cpu).unwrap();
    tunecheck::weights::plant_zero_rows(&mut w, zero).unwrap();
    hf::save(dir, &spec, &w, sharding).unwrap();
    std::fs::copy(fixture("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
    let template = "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>{% endfor %}";
    std::fs::write(dir.join("tokenizer_config.json"), serde_json::json!({ "chat_template": template }).to_string())
        .unwrap();
    sp
}

#[test]
fn planted_zero_rows_are_listed_exactly_with_token_strings() {
    let tmp = tempfile::tempdir().unwrap();
    let tok = tunecheck::data::tokenizer::fixture().unwrap();
    let sp = tunecheck::data::tokenizer::specials(&tok).unwrap();
    let zero = vec![sp.reserved[2], sp.chat[2], sp.words[7]];
    planted(tmp.path(), &zero, Sharding::MaxBytes(20_000));
    let r = tunecheck::inspect::inspect(tmp.path(), None, &Device::Cpu, |_, _, _| {}).unwrap();
    let mut want = zero.clone();
    want.sort_unstable();
    assert_eq!(r.untrained.iter().map(|u| u.id).collect::<Vec<_>>(), want);
    for u in &r.untrained {
        assert_eq!(u.token.as_deref(), tok.id_to_token(u.id).as_deref());
        assert_eq!(u.in_chat_template, u.id == sp.chat[2], "{u:?}");
        assert_eq!(u.tensors, ["lm_head.weight", "model.embed_tokens.weight"]);
    }
    let eot = r.untrained.iter().find(|u| u.id == sp.chat[2]).unwrap();
    assert_eq!(eot.token.as_deref(), Some("<|eot_id|>"));
    assert!(eot.special);
    assert_eq!(r.exit_code(), 1);
    assert!(
        r.findings[0].contains("3 untrained token rows")
            && r.findings[0].contains("1 of them used by the chat template")
    );

    // The CLI: exit 1, token strings in the text, the same ids in JSON.
    let o = bin().arg("inspect").arg(tmp.path()).output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(text.contains("<|eot_id|>") && text.contains("chat template") && text.contains("w7"), "{text}");
    let o = bin().arg("inspect").arg(tmp.path()).arg("--json").output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let ids: Vec<u64> = v["untrained"].as_array().unwrap().iter().map(|u| u["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, want.iter().map(|&i| i as u64).collect::<Vec<_>>());
}

#[test]
fn nan_tensors_are_findings() {
    let tmp = tempfile::tempdir().unwrap();
    let spec = ArchSpec::tiny(Family::Gemma2);
    let mut w = tunecheck::weights::generate(&spec, 3, &Device::Cpu).unwrap();
    let key = "model.layers.1.mlp.up_proj.weight";
    let t = &w[key];
    let mut v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    v[5] = f32::NAN;
    v[9] = f32::INFINITY;
    w.insert(key.into(), Tensor::from_vec(v, t.dims(), &Device::Cpu).unwrap());
    hf::save(tmp.path(), &spec, &w, Sharding::Single).unwrap();
    let r = tunecheck::inspect::inspect(tmp.path(), None, &Device::Cpu, |_, _, _| {}).unwrap();
    assert_eq!(r.non_finite.len(), 1);
    assert_eq!((r.non_finite[0].tensor.as_str(), r.non_finite[0].nan, r.non_finite[0].inf), (key, 1, 1));
    assert!(r.findings.iter().any(|f| f.contains(key)), "{:?}", r.findings);
    assert!(r.findings.iter().any(|f| f.contains("non-finite logits")), "{:?}", r.findings);
    assert!(!r.tokenizer);
}

#[test]
fn clean_fixtures_exit_zero_and_adapter_quant_mismatch_is_a_finding() {
    for m in [
        "llama_gqa",
        "llama_tied_odd",
        "gemma",
        "gemma2_window",
        "gemma3",
        "llama_bnb_nf4_dq",
        "gemma2_bnb_fp4",
        "tunecheck_nf4_dq",
    ] {
        let o = bin().arg("inspect").arg(fixture(&format!("models/{m}"))).output().unwrap();
        assert_eq!(o.status.code(), Some(0), "{m}: {}", String::from_utf8_lossy(&o.stdout));
    }
    // An adapter recorded on an unquantized base, inspected over a 4-bit one.
    let o = bin()
        .arg("inspect")
        .arg(fixture("models/llama_bnb_nf4_dq"))
        .arg("--adapter")
        .arg(fixture("adapters/tunecheck_written"))
        .output()
        .unwrap();
    let text = String::from_utf8(o.stdout).unwrap();
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(text.contains("mismatch"), "{text}");
}

/// Every file of a fixture directory, damaged in several ways, gives exit 2 and one line.
#[test]
fn corrupted_fixtures_exit_two_with_one_line() {
    let mut cases = 0;
    let models: Vec<String> = std::fs::read_dir(fixture("models"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for m in &models {
        let src = fixture(&format!("models/{m}"));
        for file in ["config.json", "model.safetensors"] {
            let bytes = std::fs::read(src.join(file)).unwrap();
            let variants: Vec<(&str, Vec<u8>)> = vec![
                ("truncated", bytes[..bytes.len() / 2].to_vec()),
                ("empty", Vec::new()),
                ("header length lies", {
                    let mut b = bytes.clone();
                    b[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
                    b
                }),
                ("not utf-8", {
                    let mut b = bytes.clone();
                    b[10] = 0xff;
                    b[11] = 0xfe;
                    b
                }),
            ];
            for (what, data) in variants {
                let tmp = tempfile::tempdir().unwrap();
                for f in std::fs::read_dir(&src).unwrap() {
                    let f = f.unwrap().path();
                    std::fs::copy(&f, tmp.path().join(f.file_name().unwrap())).unwrap();
                }
                std::fs::write(tmp.path().join(file), &data).unwrap();
                let o = bin().arg("inspect").arg(tmp.path()).output().unwrap();
                let err = String::from_utf8(o.stderr).unwrap();
                assert_eq!(o.status.code(), Some(2), "{m}/{file} {what}: {err}");
                assert_eq!(err.trim_end().lines().count(), 1, "{m}/{file} {what}: {err}");
                assert!(err.contains(file), "{m}/{file} {what}: the reason should name the file: {err}");
                assert!(!err.contains("panicked"), "{err}");
                cases += 1;
            }
        }
    }
    // A directory that is a file, and a missing one.
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("file");
    std::fs::write(&f, b"x").unwrap();
    for p in [f, tmp.path().join("missing")] {
        let o = bin().arg("inspect").arg(&p).output().unwrap();
        assert_eq!(o.status.code(), Some(2));
        assert_eq!(String::from_utf8(o.stderr).unwrap().trim_end().lines().count(), 1);
    }
    assert_eq!(cases, models.len() * 8);

    // Every adapter fixture, damaged, given to --adapter: exit 2, one line naming the file.
    for a in std::fs::read_dir(fixture("adapters")).unwrap() {
        let src = a.unwrap().path();
        let base = if src.to_string_lossy().contains("gemma2") {
            "models/gemma2_window"
        } else if src.to_string_lossy().contains("gemma3") {
            "models/gemma3"
        } else {
            "models/llama_gqa"
        };
        for file in ["adapter_config.json", "adapter_model.safetensors"] {
            let bytes = std::fs::read(src.join(file)).unwrap();
            let tmp = tempfile::tempdir().unwrap();
            for f in std::fs::read_dir(&src).unwrap() {
                let f = f.unwrap().path();
                std::fs::copy(&f, tmp.path().join(f.file_name().unwrap())).unwrap();
            }
            std::fs::write(tmp.path().join(file), &bytes[..bytes.len() / 2]).unwrap();
            let o = bin().arg("inspect").arg(fixture(base)).arg("--adapter").arg(tmp.path()).output().unwrap();
            let err = String::from_utf8(o.stderr).unwrap();
            assert_eq!(o.status.code(), Some(2), "{}/{file}: {err}", src.display());
            assert_eq!(err.trim_end().lines().count(), 1, "{err}");
            assert!(err.contains(file), "{err}");
        }
    }
}
