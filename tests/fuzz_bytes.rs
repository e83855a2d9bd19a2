//! Byte-mutation fuzzing of every loader over valid fixture files: flipped bytes, truncation,
//! inserted and deleted ranges, lying header lengths. Each loader must return `Ok` or an
//! error naming the file — never panic (a panic fails the proptest). `PROPTEST_CASES` scales it.

use std::path::{Path, PathBuf};

use candle_core::Device;
use proptest::prelude::*;

fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(p)
}

/// One edit of a byte string.
#[derive(Debug, Clone)]
enum Edit {
    Flip {
        at: usize,
        byte: u8,
    },
    Truncate {
        at: usize,
    },
    Insert {
        at: usize,
        bytes: Vec<u8>,
    },
    Delete {
        at: usize,
        len: usize,
    },
    /// Overwrite 8 bytes (e.g. the safetensors header length) with a value.
    Word {
        at: usize,
        value: u64,
    },
}

fn arb_edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Edit::Flip { at, byte }),
        any::<usize>().prop_map(|at| Edit::Truncate { at }),
        (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(at, bytes)| Edit::Insert { at, bytes }),
        (any::<usize>(), 1usize..64).prop_map(|(at, len)| Edit::Delete { at, len }),
        (0usize..64, prop_oneof![Just(0u64), Just(u64::MAX), Just(1 << 40), any::<u64>()])
            .prop_map(|(at, value)| Edit::Word { at, value }),
    ]
}

fn apply(mut b: Vec<u8>, edits: &[Edit]) -> Vec<u8> {
    for e in edits {
        let n = b.len().max(1);
        match e {
            Edit::Flip { at, byte } => {
                if !b.is_empty() {
                    let i = at % b.len();
                    b[i] ^= byte | 1;
                }
            }
            Edit::Truncate { at } => b.truncate(at % n),
            Edit::Insert { at, bytes } => {
                let i = at % n;
                b.splice(i.min(b.len())..i.min(b.len()), bytes.iter().copied());
            }
            Edit::Delete { at, len } => {
                let i = (at % n).min(b.len());
                let j = (i + len).min(b.len());
                b.drain(i..j);
            }
            Edit::Word { at, value } => {
                if b.len() >= at + 8 {
                    b[*at..at + 8].copy_from_slice(&value.to_le_bytes());
                }
            }
        }
    }
    b
}

/// Copy `src` into a temp dir, replace `file` by its mutation, run `load` on the dir.
fn mutate_and_load(
    src: &Path,
    file: &str,
    edits: &[Edit],
    load: impl Fn(&Path) -> tunecheck::Result<()>,
) -> Result<(), TestCaseError> {
    let tmp = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    for f in std::fs::read_dir(src).unwrap() {
        let f = f.unwrap().path();
        if f.is_file() {
            std::fs::copy(&f, tmp.path().join(f.file_name().unwrap())).unwrap();
        }
    }
    let bytes = std::fs::read(src.join(file)).unwrap();
    std::fs::write(tmp.path().join(file), apply(bytes, edits)).unwrap();
    if let Err(e) = load(tmp.path()) {
        let msg = e.to_string();
        prop_assert!(!msg.is_empty());
        prop_assert!(!msg.contains('\n') || msg.lines().count() < 20, "overlong error: {msg}");
    }
    Ok(())
}

fn cfg() -> ProptestConfig {
    ProptestConfig { cases: 48, failure_persistence: None, ..ProptestConfig::default() }
}

fn load_model(dir: &Path) -> tunecheck::Result<()> {
    tunecheck::loader::open(dir, &Device::Cpu, None).map(|_| ())
}

proptest! {
    #![proptest_config(cfg())]

    #[test]
    fn model_loader_never_panics(
        m in prop_oneof![Just("llama_gqa"), Just("gemma3"), Just("llama_bnb_nf4_dq"), Just("gemma2_bnb_fp4")],
        file in prop_oneof![Just("config.json"), Just("model.safetensors")],
        edits in proptest::collection::vec(arb_edit(), 1..4),
    ) {
        mutate_and_load(&fixture(&format!("models/{m}")), file, &edits, load_model)?;
    }

    #[test]
    fn sharded_index_loader_never_panics(edits in proptest::collection::vec(arb_edit(), 1..4), which in 0usize..3) {
        // A sharded copy of a fixture: the index and the shards get mutated.
        let src = tempfile::tempdir().unwrap();
        let ck = tunecheck::io::hf::load(&fixture("models/llama_gqa"), &Device::Cpu, None).unwrap();
        tunecheck::io::hf::save(src.path(), &ck.spec, &ck.weights, tunecheck::io::hf::Sharding::MaxBytes(30_000)).unwrap();
        let mut files: Vec<String> = std::fs::read_dir(src.path()).unwrap()
            .map(|f| f.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|f| f.ends_with(".json") || f.ends_with(".safetensors"))
            .collect();
        files.sort();
        let file = files[which % files.len()].clone();
        mutate_and_load(src.path(), &file, &edits, load_model)?;
    }

    #[test]
    fn adapter_loader_never_panics(
        a in prop_oneof![Just("llama_lora_r4"), Just("gemma3_lora_save_embed"), Just("tunecheck_written")],
        file in prop_oneof![Just("adapter_config.json"), Just("adapter_model.safetensors")],
        edits in proptest::collection::vec(arb_edit(), 1..4),
    ) {
        mutate_and_load(&fixture(&format!("adapters/{a}")), file, &edits, |d| tunecheck::io::peft::read(d).map(|_| ()))?;
    }

    #[test]
    fn tokenizer_loader_never_panics(edits in proptest::collection::vec(arb_edit(), 1..4)) {
        let src = tempfile::tempdir().unwrap();
        std::fs::copy(fixture("tokenizer.json"), src.path().join("tokenizer.json")).unwrap();
        mutate_and_load(src.path(), "tokenizer.json", &edits, |d| {
            tunecheck::data::tokenizer::load(&d.join("tokenizer.json")).map(|_| ())
        })?;
    }

    #[test]
    fn inspect_never_panics(
        file in prop_oneof![Just("config.json"), Just("model.safetensors")],
        edits in proptest::collection::vec(arb_edit(), 1..3),
    ) {
        mutate_and_load(&fixture("models/llama_bnb_nf4_dq"), file, &edits, |d| {
            tunecheck::inspect::inspect(d, None, &Device::Cpu, |_, _, _| {}).map(|_| ())
        })?;
    }
}
