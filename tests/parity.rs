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

/// A left-padded batch with its `attention_mask` (`fixtures/models/*/left_padded.safetensors`,
/// from `gen_reference.py left_padded`): at every real position our logits match transformers'
/// within 1e-5 relative L2 per row; padded positions stay finite; and without the mask the
/// short rows change (the mask is what hides the padding).
#[rstest]
#[case::llama_gqa("llama_gqa")]
#[case::gemma2_window("gemma2_window")]
#[case::gemma3("gemma3")]
fn left_padded_batches_match_transformers(#[case] name: &str) {
    let dir = fixture(name);
    let ckpt = hf::load(&dir, &Device::Cpu, None).unwrap();
    let model = Transformer::from_weights(&ckpt.spec, &ckpt.weights).unwrap();
    let reference = StFile::open(&dir.join("left_padded.safetensors")).unwrap();
    let ids = reference.load("input_ids").unwrap();
    let mask = reference.load("attention_mask").unwrap();
    let want = reference.load("logits").unwrap();
    let got = model.forward_masked(&ids, Some(&mask), Mode::Eval).unwrap().to_dtype(DType::F32).unwrap();
    let unmasked = model.forward(&ids, Mode::Eval).unwrap().to_dtype(DType::F32).unwrap();
    let rows = mask.to_dtype(DType::U32).unwrap().to_vec2::<u32>().unwrap();
    let mut changed = 0;
    for (r, m) in rows.iter().enumerate() {
        let first = m.iter().position(|&x| x == 1).unwrap();
        let real = |t: &candle_core::Tensor| t.get(r).unwrap().narrow(0, first, m.len() - first).unwrap();
        let err = rel_l2(&real(&got), &real(&want)).unwrap();
        assert!(err <= 1e-5, "{name} row {r}: rel L2 {err:.3e} > 1e-5");
        if first > 0 && rel_l2(&real(&unmasked), &real(&want)).unwrap() > 1e-3 {
            changed += 1;
        }
    }
    assert!(changed > 0, "{name}: the mask changes nothing");
    let all: Vec<f32> = got.flatten_all().unwrap().to_vec1().unwrap();
    assert!(all.iter().all(|v| v.is_finite()), "{name}: padded positions are not finite");
}

/// `Batch::left_padded` masks the padding from attention and the loss, and the reference
/// trainer trains on it with finite losses; the driver protocol carries the mask.
#[test]
fn left_padded_batches_train_and_cross_the_protocol() {
    use tunecheck::train::Batch;
    let b = Batch::left_padded(&[vec![5, 6, 7, 8], vec![9, 10]], 0);
    assert_eq!(b.ids, vec![vec![5, 6, 7, 8], vec![0, 0, 9, 10]]);
    assert_eq!(b.labels[1], vec![-100, -100, 9, 10]);
    assert_eq!(b.attention_mask, Some(vec![vec![1, 1, 1, 1], vec![0, 0, 1, 1]]));
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("b.safetensors");
    tunecheck::process::wire::write_batch(&p, &b).unwrap();
    assert_eq!(tunecheck::process::wire::read_batch(&p).unwrap(), b);
    let ckpt = hf::load(&fixture("llama_gqa"), &Device::Cpu, None).unwrap();
    let lora = tunecheck::adapt::LoraConfig { target_modules: vec!["q_proj".into()], ..Default::default() };
    let mut tr = tunecheck::train::RefTrainer::new(
        &ckpt.spec,
        &ckpt.weights,
        &lora,
        None,
        tunecheck::train::TrainConfig::default(),
        1,
    )
    .unwrap();
    let r = tunecheck::subject::Trainer::train_step(&mut tr, &[b]).unwrap();
    assert!(r.loss.is_finite() && r.tokens == 5, "{r:?}");
}
