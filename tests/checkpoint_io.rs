//! Hugging Face checkpoint directories: bitwise save → load round trips (single file and
//! sharded), and clear errors naming the file and key for every kind of bad checkpoint.

use crate::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use tunecheck::io::hf::{self, Sharding};
use tunecheck::io::st::write_safetensors;
use tunecheck::props::bitwise_equal;
use tunecheck::spec::{ArchSpec, Family};
use tunecheck::weights::{self, Weights};

fn saved(family: Family, sharding: Sharding) -> (tempfile::TempDir, ArchSpec, Weights) {
    let dir = tempfile::tempdir().unwrap();
    let spec = ArchSpec::tiny(family);
    let w = weights::generate(&spec, 7, &Device::Cpu).unwrap();
    hf::save(dir.path(), &spec, &w, sharding).unwrap();
    (dir, spec, w)
}

/// [`saved`] without the save manifest, as transformers would write it: damage to it is then
/// for the loader's own checks to find (the manifest's are tested in crash_safety.rs).
fn saved_foreign(family: Family, sharding: Sharding) -> (tempfile::TempDir, ArchSpec, Weights) {
    let (dir, spec, w) = saved(family, sharding);
    std::fs::remove_file(dir.path().join(tunecheck::io::manifest::MANIFEST)).unwrap();
    (dir, spec, w)
}

fn assert_same(a: &Weights, b: &Weights) {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    for (k, t) in a {
        assert!(bitwise_equal(t, &b[k]).unwrap(), "{k} differs after reload");
    }
}

#[test]
fn save_load_round_trip_is_bitwise_for_every_family() {
    for family in Family::ALL {
        for sharding in [Sharding::Single, Sharding::MaxBytes(4096)] {
            let (dir, spec, w) = saved(family, sharding);
            let ck = hf::load(dir.path(), &Device::Cpu, None).unwrap();
            assert_eq!(ck.spec, spec);
            assert_same(&w, &ck.weights);
        }
    }
}

#[test]
fn sharded_save_writes_an_index_and_replaces_the_single_file() {
    let (dir, _, w) = saved(Family::Llama, Sharding::Single);
    let spec = ArchSpec::tiny(Family::Llama);
    hf::save(dir.path(), &spec, &w, Sharding::MaxBytes(4096)).unwrap();
    assert!(!dir.path().join(hf::SINGLE).exists());
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join(hf::INDEX)).unwrap()).unwrap();
    let shards: std::collections::BTreeSet<&str> =
        index["weight_map"].as_object().unwrap().values().map(|v| v.as_str().unwrap()).collect();
    assert!(shards.len() > 1, "{shards:?}");
    assert_eq!(index["weight_map"].as_object().unwrap().len(), w.len());
    hf::save(dir.path(), &spec, &w, Sharding::Single).unwrap();
    assert!(!dir.path().join(hf::INDEX).exists());
    assert_same(&w, &hf::load(dir.path(), &Device::Cpu, None).unwrap().weights);
}

#[test]
fn bf16_checkpoint_loads_in_its_dtype_and_can_be_upcast() {
    let dir = tempfile::tempdir().unwrap();
    let mut spec = ArchSpec::tiny(Family::Gemma2);
    spec.dtype = DType::BF16;
    let w = weights::generate(&spec, 3, &Device::Cpu).unwrap();
    hf::save(dir.path(), &spec, &w, Sharding::Single).unwrap();
    let ck = hf::load(dir.path(), &Device::Cpu, None).unwrap();
    assert_eq!(ck.weights["model.norm.weight"].dtype(), DType::BF16);
    assert_same(&w, &ck.weights);
    let up = hf::load(dir.path(), &Device::Cpu, Some(DType::F32)).unwrap();
    assert_eq!(up.weights["model.norm.weight"].dtype(), DType::F32);
}

/// Rewrite the single weights file of `dir` through `edit`.
fn edit_weights(dir: &Path, edit: impl FnOnce(&mut BTreeMap<String, Tensor>)) {
    let ck = hf::load(dir, &Device::Cpu, None).unwrap();
    let mut w = ck.weights;
    edit(&mut w);
    write_safetensors(&dir.join(hf::SINGLE), &w).unwrap();
}

fn err(dir: &Path) -> String {
    match hf::load(dir, &Device::Cpu, None) {
        Ok(_) => panic!("{} loaded but should not", dir.display()),
        Err(e) => e.to_string().replace(&dir.display().to_string(), "$DIR"),
    }
}

#[test]
fn bad_checkpoints_give_errors_naming_file_and_key() {
    let mut report = String::new();
    let mut case = |name: &str, break_it: &dyn Fn(&Path)| {
        let (dir, _, _) = saved_foreign(Family::Llama, Sharding::Single);
        break_it(dir.path());
        report.push_str(&format!("{name}: {}\n", err(dir.path())));
    };
    case("missing_tensor", &|d| edit_weights(d, |w| drop(w.remove("model.layers.1.mlp.up_proj.weight"))));
    case("extra_tensor", &|d| {
        edit_weights(d, |w| {
            drop(w.insert(
                "model.layers.9.mlp.up_proj.weight".into(),
                Tensor::zeros(4, DType::F32, &Device::Cpu).unwrap(),
            ))
        })
    });
    case("wrong_shape", &|d| {
        edit_weights(d, |w| {
            drop(w.insert("model.norm.weight".into(), Tensor::zeros(31, DType::F32, &Device::Cpu).unwrap()))
        })
    });
    case("wrong_dtype", &|d| {
        edit_weights(d, |w| {
            drop(w.insert("model.norm.weight".into(), Tensor::zeros(32, DType::I64, &Device::Cpu).unwrap()))
        })
    });
    case("tied_but_has_lm_head", &|d| {
        edit_weights(d, |w| {
            let e = w["model.embed_tokens.weight"].clone();
            w.insert("lm_head.weight".into(), e);
        });
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap();
        cfg["tie_word_embeddings"] = true.into();
        std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    });
    case("truncated_file", &|d| {
        let p = d.join(hf::SINGLE);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    });
    case("header_length_lies", &|d| {
        let p = d.join(hf::SINGLE);
        let mut bytes = std::fs::read(&p).unwrap();
        bytes[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
        std::fs::write(&p, &bytes).unwrap();
    });
    case("empty_file", &|d| std::fs::write(d.join(hf::SINGLE), b"").unwrap());
    case("no_weights", &|d| std::fs::remove_file(d.join(hf::SINGLE)).unwrap());
    case("no_config", &|d| std::fs::remove_file(d.join("config.json")).unwrap());
    case("config_inconsistent", &|d| {
        let mut cfg: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(d.join("config.json")).unwrap()).unwrap();
        cfg["num_key_value_heads"] = 3.into();
        std::fs::write(d.join("config.json"), cfg.to_string()).unwrap();
    });
    common::golden().bind(|| insta::assert_snapshot!("checkpoint_errors", report));
}

#[test]
fn bad_sharded_checkpoints_give_errors_naming_index_and_shard() {
    let mut report = String::new();
    let mut case = |name: &str, break_it: &dyn Fn(&Path)| {
        let (dir, _, _) = saved_foreign(Family::Gemma, Sharding::MaxBytes(4096));
        break_it(dir.path());
        report.push_str(&format!("{name}: {}\n", err(dir.path())));
    };
    let index = |d: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(d.join(hf::INDEX)).unwrap()).unwrap()
    };
    let shard_of = |d: &Path, key: &str| index(d)["weight_map"][key].as_str().unwrap().to_string();
    case("shard_missing", &|d| std::fs::remove_file(d.join(shard_of(d, "model.norm.weight"))).unwrap());
    case("index_lists_key_not_in_shard", &|d| {
        let mut v = index(d);
        let other = shard_of(d, "model.embed_tokens.weight");
        assert_ne!(other, shard_of(d, "model.norm.weight"));
        v["weight_map"]["model.norm.weight"] = other.into();
        std::fs::write(d.join(hf::INDEX), v.to_string()).unwrap();
    });
    case("index_missing_key", &|d| {
        let mut v = index(d);
        v["weight_map"].as_object_mut().unwrap().remove("model.norm.weight");
        std::fs::write(d.join(hf::INDEX), v.to_string()).unwrap();
    });
    case("index_path_escape", &|d| {
        let mut v = index(d);
        v["weight_map"]["model.norm.weight"] = format!("../{}", shard_of(d, "model.norm.weight")).into();
        std::fs::write(d.join(hf::INDEX), v.to_string()).unwrap();
    });
    case("index_not_json", &|d| std::fs::write(d.join(hf::INDEX), "{").unwrap());
    case("index_no_weight_map", &|d| std::fs::write(d.join(hf::INDEX), "{}").unwrap());
    common::golden().bind(|| insta::assert_snapshot!("sharded_checkpoint_errors", report));
}

#[test]
fn directory_that_is_a_file_is_an_error() {
    let f = tempfile::NamedTempFile::new().unwrap();
    let e = hf::load(f.path(), &Device::Cpu, None).err().unwrap().to_string();
    assert!(e.contains("is not a directory"), "{e}");
    let (_, spec, w) = saved(Family::Llama, Sharding::Single);
    let e = hf::save(f.path(), &spec, &w, Sharding::Single).unwrap_err().to_string();
    assert!(e.contains("not a directory"), "{e}");
}

#[test]
fn a_bad_save_leaves_the_previous_checkpoint_intact() {
    let (dir, spec, w) = saved(Family::Gemma3, Sharding::Single);
    let before: Vec<(PathBuf, Vec<u8>)> = ["config.json", hf::SINGLE, tunecheck::io::manifest::MANIFEST]
        .iter()
        .map(|n| (dir.path().join(n), std::fs::read(dir.path().join(n)).unwrap()))
        .collect();
    let mut broken = w.clone();
    broken.remove("model.norm.weight");
    let e = hf::save(dir.path(), &spec, &broken, Sharding::Single).unwrap_err().to_string();
    assert!(e.contains("model.norm.weight"), "{e}");
    for (p, bytes) in before {
        assert_eq!(std::fs::read(&p).unwrap(), bytes, "{} changed", p.display());
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 3, "{leftovers:?}");
}
