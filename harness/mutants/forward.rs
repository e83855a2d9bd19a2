//! Planted forward-pass bugs: faults in tunecheck's own model, each with the model property
//! that must fail on it.

use crate::model::Faults;
use crate::props::forward::ModelProperty;
use crate::spec::Family;

/// One planted forward-pass bug and the model property that must fail on it.
#[derive(Debug, Clone, Copy)]
pub struct ForwardMutant {
    /// Short id.
    pub name: &'static str,
    /// The real-world bug it reproduces.
    pub bug: &'static str,
    /// The faults planted in the reference model.
    pub faults: Faults,
    /// The property that must catch it.
    pub caught_by: ModelProperty,
    /// The family it is run on (some bugs only exist where the feature does, e.g. windows).
    pub family: Family,
}
/// The mutants of the forward-pass properties.
pub fn forward_mutants() -> Vec<ForwardMutant> {
    vec![
        ForwardMutant {
            name: "eval_fast_path_wrong_norm",
            bug: "separate eval-only path with the wrong RMSNorm convention (Llama 3.1 model.eval() collapse)",
            faults: Faults { eval_path_wrong_norm: true, ..Faults::default() },
            caught_by: ModelProperty::Deterministic,
            family: Family::Gemma,
        },
        ForwardMutant {
            name: "mask_leaks_next_token",
            bug: "causal mask off by one: each position attends the next token",
            faults: Faults { mask_leaks_next_token: true, ..Faults::default() },
            caught_by: ModelProperty::Causal,
            family: Family::Llama,
        },
        ForwardMutant {
            name: "cache_restarts_positions",
            bug: "KV-cache decode restarts rope positions at 0 for every new token",
            faults: Faults { cache_restarts_positions: true, ..Faults::default() },
            caught_by: ModelProperty::KvCache,
            family: Family::Llama,
        },
        ForwardMutant {
            name: "cache_ignores_window",
            bug: "KV-cache decode attends beyond the sliding window (Gemma 2/3 local layers)",
            faults: Faults { cache_ignores_window: true, ..Faults::default() },
            caught_by: ModelProperty::KvCache,
            family: Family::Gemma2,
        },
    ]
}
