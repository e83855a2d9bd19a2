//! The property catalogue: one [`Property`] descriptor per invariant (id, test name, the
//! invariant and its tolerances in words, the adapter kinds, dtypes and capabilities it needs,
//! and the check). Everything else comes from here: `conformance!` stamps one test per entry
//! (through [`for_each_property!`](crate::for_each_property)), `tunecheck check` runs every entry, the mutant
//! matrix names entries, and the README's property table is rendered from it by
//! [`crate::report::readme::property_table`] (a test keeps
//! it in sync). A new property is one file with its `PROPERTY` constant plus one line in
//! `for_each_property!`.

use candle_core::Device;

pub use crate::props::property::{Body, Property, TrainerCheck, ALL_DTYPES, HALF_DTYPES};
use crate::props::runner::{PropConfig, Verdict};
use crate::subject::Factory;

/// Which catalogue ids a `--property` word selects: an id, or `forward` for F1–F3.
pub fn selects(word: &str, p: &Property) -> bool {
    p.id.eq_ignore_ascii_case(word) || (word.eq_ignore_ascii_case("forward") && matches!(p.body, Body::Forward(_)))
}

/// Calls `$callback! { [extra tokens] test_name => path::TO::PROPERTY, ... }` with every
/// catalogue entry (the one list of properties; [`CATALOGUE`] and `conformance!` are made
/// from it). `$callback` is a macro name in scope at the call site.
#[macro_export]
macro_rules! for_each_property {
    ($callback:ident $(, $($extra:tt)*)?) => {
        $callback! {
            [$($($extra)*)?]
            f1_forward_deterministic => $crate::props::forward::DETERMINISTIC,
            f2_forward_causal => $crate::props::forward::CAUSAL,
            f3_forward_kv_cache => $crate::props::forward::KV_CACHE,
            p1_eval_train_equivalence => $crate::props::p1_modes::PROPERTY,
            p2_untrained_tokens => $crate::props::p2_untrained::PROPERTY,
            p3_save_reload_bitwise => $crate::props::p3_reload::PROPERTY,
            p4_descent_and_epochs => $crate::props::p4_descent::PROPERTY,
            p5_accumulation_equivalence => $crate::props::p5_accumulation::PROPERTY,
            p6_cpu_vs_cuda => $crate::props::p6_devices::PROPERTY,
            p7_nf4_round_trip => $crate::props::p7_nf4::PROPERTY,
            p8_gradients_reach_and_correct => $crate::props::p8_gradients::PROPERTY,
            p9_kernels_match_oracle => $crate::props::p9_kernels::PROPERTY,
            p10_oracle_agreement => $crate::props::p10_oracle::PROPERTY,
            p11_no_precision_stall => $crate::props::p11_precision::PROPERTY,
            p12_half_precision_range => $crate::props::p12_half_range::PROPERTY,
            p13_dropout => $crate::props::p13_dropout::PROPERTY,
            p14_untrained_token_guard => $crate::props::p14_untrained_guard::PROPERTY,
        }
    };
}

macro_rules! catalogue_table {
    ([] $($test:ident => $prop:path),* $(,)?) => {
        /// Every property, in report order.
        pub static CATALOGUE: &[&Property] = &[$(&$prop),*];
        /// The test name each entry is stamped under by `conformance!`, in catalogue order.
        pub static STAMPED_NAMES: &[&str] = &[$(stringify!($test)),*];
    };
}
crate::for_each_property!(catalogue_table);

/// The property with id `id`.
pub fn by_id(id: &str) -> Option<&'static Property> {
    CATALOGUE.iter().copied().find(|p| p.id.eq_ignore_ascii_case(id))
}

/// Which subjects a property judges, for tables.
pub fn subject_word(p: &Property) -> &'static str {
    match p.body {
        Body::Trainer(_) => "trainer",
        Body::CrossDevice(_) => "trainer, CPU vs CUDA",
        Body::Kernels(_) => "tunecheck's 4-bit kernels",
        Body::Forward(_) => "tunecheck's model, per family",
    }
}

/// The body of one `conformance!` test: run `p` against `factory` on the named device
/// (skipped with a message when absent), strict under `TUNECHECK_STRICT=1`, and panic with
/// the report on failure.
#[doc(hidden)]
pub fn conformance_test(p: &Property, factory: &dyn Factory, device: &str, source_file: &'static str) {
    let cfg =
        PropConfig { cases: 4, seed: 0, source_file: Some(source_file), ..PropConfig::default() }.with_env_strict();
    let device = match p.body {
        // Not about the device under test: run once, in the `cpu` module.
        Body::CrossDevice(_) | Body::Kernels(_) | Body::Forward(_) if device != "cpu" => {
            eprintln!("{}: runs in the cpu module", p.test_name);
            return;
        }
        Body::CrossDevice(_) | Body::Kernels(_) | Body::Forward(_) => Some(Device::Cpu),
        _ => crate::device::for_test(device),
    };
    let Some(device) = device else {
        if cfg.strict {
            panic!("{}: TUNECHECK_STRICT=1 and the device is missing", p.test_name);
        }
        return;
    };
    let mut v = crate::props::runner::run(p, factory, &device, &cfg);
    if let Verdict::Failed { replay, .. } = &mut v {
        *replay = Some(format!(
            "cargo test {} (proptest replays the persisted failing case first; PROPTEST_CASES as in this run)",
            p.test_name
        ));
    }
    v.assert(p.test_name);
}
