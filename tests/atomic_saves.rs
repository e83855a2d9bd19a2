//! Nothing lost: a save that fails at any of its file writes (an injected fault that leaves a
//! half-written temp file) leaves the previous checkpoint byte-for-byte intact, loadable with
//! the same bits, and no temp files behind; the next clean save lands completely.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Device;
use tunecheck::io::faults::inject_write_failure;
use tunecheck::io::hf::{self, Sharding};
use tunecheck::io::manifest::MANIFEST;
use tunecheck::spec::{ArchSpec, Family};

fn snapshot(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for p in std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()) {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if p.is_file() {
            out.insert(name, std::fs::read(&p).unwrap());
        } else if p.is_dir() {
            out.extend(snapshot(&p).into_iter().map(|(k, v)| (format!("{name}/{k}"), v)));
        }
    }
    out
}

/// Fail the `k`-th write of `save` for k = 0, 1, ... until it succeeds; after each failure
/// the directory must equal `before` and `check` must pass. Returns how many writes failed.
fn every_failure_point(dir: &Path, save: impl Fn() -> tunecheck::Result<()>, check: impl Fn()) -> usize {
    let before = snapshot(dir);
    for k in 0.. {
        inject_write_failure(Some(k));
        let r = save();
        inject_write_failure(None);
        match r {
            Ok(()) => return k,
            Err(e) => {
                assert!(e.to_string().contains("injected"), "{e}");
                assert_eq!(snapshot(dir), before, "write {k} failed and the directory changed");
                check();
            }
        }
    }
    unreachable!()
}

fn weights_bits(dir: &Path) -> BTreeMap<String, Vec<u32>> {
    let ck = hf::load(dir, &Device::Cpu, None).unwrap();
    ck.weights
        .iter()
        .map(|(k, t)| {
            (k.clone(), t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|f| f.to_bits()).collect())
        })
        .collect()
}

#[test]
fn failed_model_saves_keep_the_previous_checkpoint() {
    for sharding in [Sharding::Single, Sharding::MaxBytes(40_000)] {
        let tmp = tempfile::tempdir().unwrap();
        let spec = ArchSpec::tiny(Family::Gemma2);
        let v1 = tunecheck::weights::generate(&spec, 1, &Device::Cpu).unwrap();
        let v2 = tunecheck::weights::generate(&spec, 2, &Device::Cpu).unwrap();
        hf::save(tmp.path(), &spec, &v1, sharding).unwrap();
        let bits1 = weights_bits(tmp.path());
        // The second save switches layout too, so stale files must also survive a failure.
        let other = if matches!(sharding, Sharding::Single) { Sharding::MaxBytes(40_000) } else { Sharding::Single };
        let failed = every_failure_point(
            tmp.path(),
            || hf::save(tmp.path(), &spec, &v2, other),
            || assert_eq!(weights_bits(tmp.path()), bits1),
        );
        assert!(failed >= 2, "{sharding:?}: only {failed} writes");
        let bits2 = weights_bits(tmp.path());
        assert_ne!(bits2, bits1);
        let want: BTreeMap<String, Vec<u32>> = v2
            .iter()
            .map(|(k, t)| {
                (k.clone(), t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|f| f.to_bits()).collect())
            })
            .collect();
        assert_eq!(bits2, want);
        assert_eq!(debris(tmp.path()), Vec::<String>::new());
        // No file of the previous layout is left behind.
        let names: Vec<String> = snapshot(tmp.path()).into_keys().collect();
        match other {
            Sharding::Single => assert_eq!(names, ["config.json", "model.safetensors", MANIFEST]),
            Sharding::MaxBytes(_) => {
                assert!(!names.contains(&"model.safetensors".to_string()), "{names:?}");
                assert!(
                    names.iter().all(|n| n == "config.json" || n == MANIFEST || n.starts_with("model")),
                    "{names:?}"
                );
            }
        }
    }
    // A smaller sharded save over a larger one removes the extra shards.
    let tmp = tempfile::tempdir().unwrap();
    let spec = ArchSpec::tiny(Family::Llama);
    let w = tunecheck::weights::generate(&spec, 1, &Device::Cpu).unwrap();
    hf::save(tmp.path(), &spec, &w, Sharding::MaxBytes(10_000)).unwrap();
    let many = snapshot(tmp.path()).len();
    hf::save(tmp.path(), &spec, &w, Sharding::MaxBytes(60_000)).unwrap();
    let few = snapshot(tmp.path());
    assert!(few.len() < many, "{} files after {many}", few.len());
    let index: serde_json::Value = serde_json::from_slice(&few["model.safetensors.index.json"]).unwrap();
    let listed: std::collections::BTreeSet<&str> =
        index["weight_map"].as_object().unwrap().values().map(|v| v.as_str().unwrap()).collect();
    let shards: std::collections::BTreeSet<&str> =
        few.keys().map(String::as_str).filter(|k| k.starts_with("model-")).collect();
    assert_eq!(listed, shards);
}

#[test]
fn failed_quantized_and_trainer_saves_keep_the_previous_checkpoint() {
    use tunecheck::adapt::QuantConfig;
    let tmp = tempfile::tempdir().unwrap();
    let spec = ArchSpec::tiny(Family::Llama);
    let v1 = tunecheck::weights::generate(&spec, 1, &Device::Cpu).unwrap();
    let v2 = tunecheck::weights::generate(&spec, 2, &Device::Cpu).unwrap();
    let cfg = QuantConfig { compute_dtype: candle_core::DType::F32, ..QuantConfig::default() };
    tunecheck::io::quantize::save_quantized(tmp.path(), &spec, &v1, &cfg).unwrap();
    let before = snapshot(tmp.path());
    let failed = every_failure_point(
        tmp.path(),
        || tunecheck::io::quantize::save_quantized(tmp.path(), &spec, &v2, &cfg),
        || assert!(hf::load(tmp.path(), &Device::Cpu, None).is_ok()),
    );
    assert!(failed >= 2);
    assert_ne!(snapshot(tmp.path()), before);

    // A trainer checkpoint (adapter + optimizer + progress), through the Trainer trait.
    use tunecheck::subject::{reference, Trainer};
    let spec = ArchSpec::tiny(Family::Llama);
    let setup = tunecheck::subject::Setup {
        weights: tunecheck::weights::generate(&spec, 5, &Device::Cpu).unwrap(),
        lora: tunecheck::adapt::LoraConfig {
            target_modules: vec!["q_proj".into(), "v_proj".into()],
            ..tunecheck::adapt::LoraConfig::default()
        },
        quant: Some(cfg),
        train: tunecheck::train::TrainConfig::default(),
        adapter_seed: 6,
        spec,
    };
    let mut tr = reference(&setup, &Device::Cpu).unwrap();
    let dir = tempfile::tempdir().unwrap();
    tr.save(dir.path()).unwrap();
    let saved = snapshot(dir.path());
    let batches = tunecheck::strategy::random_batches(setup.spec.vocab_size, 7, 1, 2, 6);
    tr.train_step(&batches).unwrap();
    let failed = every_failure_point(
        dir.path(),
        || tr.save(dir.path()),
        || {
            let back = tunecheck::train::checkpoint::load(&Device::Cpu, dir.path()).unwrap();
            assert_eq!(snapshot(dir.path()), saved);
            drop(back);
        },
    );
    assert!(failed >= 2, "trainer save wrote {failed} files");
    assert_ne!(snapshot(dir.path()), saved);
}

/// Hidden siblings of `dir` a save left behind.
fn debris(dir: &Path) -> Vec<String> {
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    std::fs::read_dir(dir.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!(".{name}.tunecheck-")))
        .collect()
}

#[test]
fn a_panic_or_error_inside_a_save_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("ck");
    let r = std::panic::catch_unwind(|| {
        let _ = tunecheck::io::atomic::save_dir(&target, &|_| false, |st| -> tunecheck::Result<()> {
            st.write("a.json", b"staged")?;
            panic!("a saver bug");
        });
    });
    assert!(r.is_err());
    assert!(!target.exists(), "a panicked save must not land");
    assert_eq!(debris(&target), Vec::<String>::new());
    let r = tunecheck::io::atomic::save_dir(&target, &|_| false, |st| -> tunecheck::Result<()> {
        st.write("a.json", b"staged")?;
        Err(tunecheck::Error::Msg("the saver gave up".into()))
    });
    assert!(r.is_err());
    assert!(!target.exists());
    assert_eq!(debris(&target), Vec::<String>::new());
    tunecheck::io::atomic::save_dir(&target, &|_| false, |st| st.write("a.json", b"now")).unwrap();
    assert_eq!(std::fs::read(target.join("a.json")).unwrap(), b"now");
    assert_eq!(debris(&target), Vec::<String>::new());
}

#[test]
fn files_a_save_does_not_own_are_kept_and_owned_ones_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    let spec = ArchSpec::tiny(Family::Llama);
    let w = tunecheck::weights::generate(&spec, 1, &Device::Cpu).unwrap();
    hf::save(&dir, &spec, &w, Sharding::MaxBytes(10_000)).unwrap();
    std::fs::write(dir.join("tokenizer.json"), b"{}").unwrap();
    std::fs::create_dir(dir.join("notes")).unwrap();
    std::fs::write(dir.join("notes/readme.txt"), b"mine").unwrap();
    hf::save(&dir, &spec, &w, Sharding::Single).unwrap();
    let names: Vec<String> = snapshot(&dir).into_keys().collect();
    assert_eq!(names, ["config.json", "model.safetensors", "notes/readme.txt", "tokenizer.json", MANIFEST]);
    assert_eq!(std::fs::read(dir.join("notes/readme.txt")).unwrap(), b"mine");
}
