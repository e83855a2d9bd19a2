//! Forward-pass properties over `arb_spec()`: bitwise determinism (and train == eval without
//! dropout), causality, KV-cache decode == full forward with identical greedy generations.
//!
//! Default 64 cases per property; `PROPTEST_CASES=N` overrides (nightly: 1000+).

use candle_core::Device;
use proptest::prelude::*;
use tunecheck::props::forward;
use tunecheck::strategy::arb_case;
use tunecheck::{weights, Transformer};

fn build(spec: &tunecheck::ArchSpec, seed: u64) -> Transformer {
    let w = weights::generate(spec, seed, &Device::Cpu).unwrap();
    Transformer::from_weights(spec, &w).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn two_forwards_are_bitwise_identical((spec, ids, seed) in arb_case()) {
        let m = build(&spec, seed);
        forward::deterministic_and_mode_free(&m, &ids).map_err(|e| TestCaseError::fail(e.to_string()))?;
    }

    #[test]
    fn logits_at_t_ignore_tokens_after_t((spec, ids, seed) in arb_case(), t in 0usize..12) {
        let m = build(&spec, seed);
        forward::causal(&m, &ids, t).map_err(|e| TestCaseError::fail(e.to_string()))?;
    }

    #[test]
    fn kv_cache_decode_equals_full_forward((spec, ids, seed) in arb_case(), split in 1usize..12) {
        let m = build(&spec, seed);
        forward::kv_cache_matches(&m, &ids, split, 3, 0.0).map_err(|e| TestCaseError::fail(e.to_string()))?;
    }

    #[test]
    fn same_seed_same_bits((spec, _ids, seed) in arb_case()) {
        let a = weights::generate(&spec, seed, &Device::Cpu).unwrap();
        let b = weights::generate(&spec, seed, &Device::Cpu).unwrap();
        for (k, t) in &a {
            prop_assert!(tunecheck::props::bitwise_equal(t, &b[k]).unwrap(), "{k} differs between two generations");
        }
        let c = weights::generate(&spec, seed.wrapping_add(1), &Device::Cpu).unwrap();
        prop_assert!(!tunecheck::props::bitwise_equal(&a["model.embed_tokens.weight"], &c["model.embed_tokens.weight"]).unwrap());
    }
}

/// With dropout > 0, train mode differs from eval, is reproducible for a fixed dropout seed,
/// and eval ignores dropout entirely.
#[test]
fn dropout_only_in_train_mode_and_seeded() {
    use tunecheck::{ArchSpec, Family, Mode};
    for family in Family::ALL {
        let mut spec = ArchSpec::tiny(family);
        spec.attention_dropout = 0.2;
        spec.residual_dropout = 0.1;
        let m = build(&spec, 1);
        let ids = forward::ids_tensor(&m, &[vec![1, 2, 3, 4, 5, 6]]).unwrap();
        let e1 = m.forward(&ids, Mode::Eval).unwrap();
        m.set_dropout_seed(9);
        let t1 = m.forward(&ids, Mode::Train).unwrap();
        m.set_dropout_seed(9);
        let t2 = m.forward(&ids, Mode::Train).unwrap();
        let e2 = m.forward(&ids, Mode::Eval).unwrap();
        let eq = |a, b| tunecheck::props::bitwise_equal(a, b).unwrap();
        assert!(eq(&t1, &t2), "{family}: same dropout seed, different train logits");
        assert!(!eq(&t1, &e1), "{family}: dropout had no effect in train mode");
        assert!(eq(&e1, &e2), "{family}: eval mode used dropout");
    }
}

/// The KV cache also holds in bf16 and f16, within the dtype tolerances.
#[test]
fn kv_cache_in_half_precision() {
    use tunecheck::{ArchSpec, Family};
    for family in Family::ALL {
        for dtype in [candle_core::DType::BF16, candle_core::DType::F16] {
            let mut spec = ArchSpec::tiny(family);
            spec.dtype = dtype;
            let m = build(&spec, 2);
            forward::kv_cache_matches(&m, &[vec![3, 1, 4, 1, 5, 9, 2, 6], vec![2, 7, 1, 8, 2, 8, 1, 8]], 3, 0, 0.0)
                .unwrap_or_else(|e| panic!("{family} {dtype:?}: {e}"));
        }
    }
}
