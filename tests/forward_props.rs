//! Forward-pass properties over `arb_spec()`: bitwise determinism (and train == eval without
//! dropout), causality, KV-cache decode == full forward with identical greedy generations.
//!
//! Default 24 cases per property; `PROPTEST_CASES=N` overrides (nightly: 1000+).

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
    #![proptest_config(ProptestConfig::with_cases(24))]

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
        forward::kv_cache_matches(&m, &ids, split, 3).map_err(|e| TestCaseError::fail(e.to_string()))?;
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
