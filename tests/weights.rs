//! Seeded weights: pinned bits for a fixed seed (a change in the generator shows up here),
//! independence from generation order, family norm conventions, zero-row planting.

use crate::common;

use candle_core::{DType, Device};
use tunecheck::spec::{ArchSpec, Family};
use tunecheck::weights;

#[test]
fn seed_zero_bits_are_pinned() {
    let mut report = String::new();
    for family in Family::ALL {
        let spec = ArchSpec::tiny(family);
        let w = weights::generate(&spec, 0, &Device::Cpu).unwrap();
        for name in ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight", "model.norm.weight"] {
            let v = w[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let bits: Vec<String> = v.iter().take(4).map(|x| format!("{:08x}", x.to_bits())).collect();
            let sum: f64 = v.iter().map(|&x| x as f64).sum();
            report.push_str(&format!("{family} {name}: first {} sum {sum:.6}\n", bits.join(" ")));
        }
    }
    common::golden().bind(|| insta::assert_snapshot!("weights_seed0", report));
}

#[test]
fn a_tensor_depends_only_on_seed_and_name() {
    // Same name in two different specs with the same shape → same values.
    let a = ArchSpec::tiny(Family::Llama);
    let mut b = a.clone();
    b.num_layers = 1;
    b.layer_types.truncate(1);
    let wa = weights::generate(&a, 5, &Device::Cpu).unwrap();
    let wb = weights::generate(&b, 5, &Device::Cpu).unwrap();
    let k = "model.layers.0.mlp.down_proj.weight";
    assert!(tunecheck::props::bitwise_equal(&wa[k], &wb[k]).unwrap());
}

#[test]
fn norm_conventions_per_family() {
    for family in Family::ALL {
        let spec = ArchSpec::tiny(family);
        let w = weights::generate(&spec, 3, &Device::Cpu).unwrap();
        let mean = w["model.norm.weight"].mean_all().unwrap().to_scalar::<f32>().unwrap();
        let want = if family.is_gemma() { 0.0 } else { 1.0 };
        assert!((mean - want).abs() < 0.1, "{family}: norm mean {mean}");
    }
}

#[test]
fn planted_zero_rows_are_zero_in_embed_and_head() {
    let mut spec = ArchSpec::tiny(Family::Llama);
    spec.tie_word_embeddings = false;
    let mut w = weights::generate(&spec, 1, &Device::Cpu).unwrap();
    weights::plant_zero_rows(&mut w, &[3, 60]).unwrap();
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        let rows = w[name].to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
        for (i, r) in rows.iter().enumerate() {
            let zero = r.iter().all(|&x| x == 0.0);
            assert_eq!(zero, i == 3 || i == 60, "{name} row {i}");
        }
    }
    let e = weights::plant_zero_rows(&mut w, &[64]).unwrap_err().to_string();
    assert!(e.contains("model.embed_tokens.weight") && e.contains("64"), "{e}");
}
