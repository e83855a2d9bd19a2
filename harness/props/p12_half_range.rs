//! P12 — half precision keeps its range: a bf16/f16 model whose residual stream has realistic
//! magnitudes (the embedding scaled so that the first hidden state's RMS is 300, as in Gemma,
//! whose scaled activations reach hundreds) gives finite eval logits that track the same model
//! built in f32 from the same values. Every partial sum that can leave fp16's range (65 504) —
//! the RMSNorm variance `mean(x²)` above |x| ≈ 256, softmax, the loss — must be computed in
//! f32, as transformers does; a fast path that squares fp16 activations returns zeros or
//! inf/NaN (the Gemma fp16 overflow).
//!
//! Tolerance (relative L2 of eval logits vs the f32 build): f16 2e-2, bf16 1e-1 — the
//! activations' own rounding (2⁻¹¹ and 2⁻⁸ per operation) over a few layers; measured on the
//! reference over 60 random setups: worst f16 2.4e-3, bf16 3.9e-2.

use candle_core::{DType, Device};

use crate::error::Result;
use crate::model::Mode;
use crate::props::property::{Property, HALF_DTYPES};
use crate::props::{rel_l2, within, Check, Violation};
use crate::strategy::{random_batches, AdapterKind};
use crate::subject::{Factory, Setup};

const ID: &str = "P12/half_precision_range";

/// RMS of the first hidden state the check scales the embedding to.
pub const TARGET_RMS: f64 = 300.0;

/// The catalogue entry.
pub const PROPERTY: Property = Property {
    id: "P12",
    test_name: "p12_half_precision_range",
    title: "half precision keeps range (fp16 overflow)",
    invariant: "bf16/f16 model with realistic activations (first hidden state RMS 300): eval logits finite and \
                close to the same model built in f32",
    tolerance: "rel L2 vs the f32 build: f16 2e-2, bf16 1e-1 (activation rounding over a few layers)",
    kinds: &[AdapterKind::Lora, AdapterKind::QLora],
    dtypes: &HALF_DTYPES,
    ..Property::trainer(check)
};

/// Relative-L2 bound of eval logits in `dtype` against the f32 build.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F16 => 2e-2,
        _ => 1e-1,
    }
}

/// The setup with `embed_tokens` scaled so that the first hidden state (after Gemma's
/// `√hidden`) has RMS [`TARGET_RMS`], in `dtype`.
pub fn with_large_activations(setup: &Setup, dtype: DType) -> Result<Setup> {
    let mut s = setup.clone();
    let f32_weights = crate::weights::cast(&setup.weights, DType::F32)?;
    let embed = &f32_weights["model.embed_tokens.weight"];
    let rms = embed.sqr()?.mean_all()?.to_scalar::<f32>()?.sqrt() as f64;
    let family_scale = if setup.spec.family.is_gemma() { (setup.spec.hidden_size as f64).sqrt() } else { 1.0 };
    let factor = TARGET_RMS / (rms * family_scale).max(1e-12);
    let mut w = f32_weights;
    let scaled = (w["model.embed_tokens.weight"].clone() * factor)?;
    w.insert("model.embed_tokens.weight".into(), scaled);
    s.spec.dtype = dtype;
    s.weights = crate::weights::cast(&w, dtype)?;
    Ok(s)
}

/// Check P12 on one setup.
pub fn check(f: &dyn Factory, device: &Device, setup: &Setup) -> Check {
    let dtype = setup.spec.dtype;
    let half = with_large_activations(setup, dtype)?;
    // The f32 build holds exactly the half model's values.
    let mut full = half.clone();
    full.spec.dtype = DType::F32;
    full.weights = crate::weights::cast(&half.weights, DType::F32)?;
    let batch = &random_batches(setup.spec.vocab_size, setup.adapter_seed, 1, 3, 10)[0];
    let ids = batch.ids_tensor(device)?;
    let lh = f.build(&half, device)?.logits(&ids, Mode::Eval)?.to_dtype(DType::F32)?;
    let lf = f.build(&full, device)?.logits(&ids, Mode::Eval)?;
    let bad = lh.flatten_all()?.to_vec1::<f32>()?.iter().filter(|x| !x.is_finite()).count();
    if bad > 0 {
        return Err(Violation::new(
            ID,
            "non_finite",
            format!("{bad} of {} {dtype:?} eval logits are inf/NaN (the f32 build's are finite)", lh.elem_count()),
        )
        .into());
    }
    let tol = tolerance(dtype);
    let err = rel_l2(&lh, &lf)?;
    if !within(err, tol) {
        return Err(Violation::new(
            ID,
            "precision_mismatch",
            format!("{dtype:?} eval logits vs the f32 build: rel L2 {err:.3e} > {tol:e}"),
        )
        .into());
    }
    Ok(())
}
