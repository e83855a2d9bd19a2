//! Parity with transformers: the committed fixtures (made by `fixtures/gen_reference.py`)
//! hold a checkpoint, input ids, transformers' eval logits and its cached greedy generation.
//! Our logits must match within 1e-5 relative L2 in f32, and our cached and uncached greedy
//! generations must both equal transformers' tokens.

use std::path::PathBuf;

use candle_core::{DType, Device};
use rstest::rstest;
use tunecheck::io::{hf, st::StFile};
use tunecheck::model::generate::{greedy_cached, greedy_uncached};
use tunecheck::props::rel_l2;
use tunecheck::{Family, Mode, Transformer};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/models").join(name)
}

#[rstest]
#[case::llama_gqa("llama_gqa", Family::Llama)]
#[case::llama_tied_odd("llama_tied_odd", Family::Llama)]
#[case::gemma("gemma", Family::Gemma)]
#[case::gemma2_window("gemma2_window", Family::Gemma2)]
#[case::gemma3("gemma3", Family::Gemma3)]
fn logits_and_generation_match_transformers(#[case] name: &str, #[case] family: Family) {
    let dir = fixture(name);
    let ckpt = hf::load(&dir, &Device::Cpu, None).unwrap();
    assert_eq!(ckpt.spec.family, family);
    let model = Transformer::from_weights(&ckpt.spec, &ckpt.weights).unwrap();
    let reference = StFile::open(&dir.join("reference.safetensors")).unwrap();
    let ids = reference.load("input_ids").unwrap();
    let want = reference.load("logits").unwrap();
    let got = model.forward(&ids, Mode::Eval).unwrap().to_dtype(DType::F32).unwrap();
    let err = rel_l2(&got, &want).unwrap();
    assert!(err <= 1e-5, "{name}: rel L2 {err:.3e} > 1e-5");

    let generated = reference.load("generated").unwrap().to_dtype(DType::U32).unwrap().to_vec2::<u32>().unwrap();
    let n = generated[0].len();
    assert_eq!(greedy_cached(&model, &ids, n).unwrap(), generated, "{name}: cached greedy");
    assert_eq!(greedy_uncached(&model, &ids, n).unwrap(), generated, "{name}: uncached greedy");
}

/// The sliding window really is shorter than the sequence in the Gemma 2/3 fixtures, so the
/// parity above exercises the window mask (and Gemma 3's global layer).
#[test]
fn fixtures_exercise_windows_and_global_layers() {
    let g2 = hf::load(&fixture("gemma2_window"), &Device::Cpu, None).unwrap().spec;
    assert!(
        g2.sliding_window.unwrap() < 11 && g2.attn_logit_softcapping.is_some() && g2.final_logit_softcapping.is_some()
    );
    let g3 = hf::load(&fixture("gemma3"), &Device::Cpu, None).unwrap().spec;
    assert_eq!(g3.layer_types.iter().filter(|t| **t == tunecheck::LayerType::Full).count(), 1);
    assert_ne!(g3.rope, g3.rope_local);
}
