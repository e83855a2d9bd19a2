//! The independent computations a subject's gradients are judged against: the reference
//! trainer loaded with the subject's current trainable values, once in f64 (the oracle: as
//! close to exact as the model's definition allows) and once in the setup's own precision
//! (the floor: how far a correct trainer rounding in that precision lands from the oracle on
//! this very case). A subject's error against the oracle is then held to a multiple of the
//! floor ([`crate::props::tolerance::Bound`]).
//!
//! A 4-bit base enters the f64 oracle as the dense weight it multiplies: each block's codes
//! times its scale, rounded to the original and then the compute dtype as bitsandbytes'
//! `dequantize → .to(orig) → .to(compute)` does; the rounding of the activations to the
//! compute dtype is the subject's own arithmetic and shows in the floor.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};

use crate::adapt::qlora::Quant4Linear;
use crate::error::Result;
use crate::model::Mode;
use crate::subject::Setup;
use crate::train::{Batch, RefTrainer};

/// The reference trainer for `setup` on the CPU with its trainable tensors set to `values`.
pub fn reference_at(setup: &Setup, values: &[(String, Tensor)]) -> Result<RefTrainer> {
    let t = crate::subject::reference(setup, &Device::Cpu)?;
    load(&t, values)?;
    Ok(t)
}

fn load(t: &RefTrainer, values: &[(String, Tensor)]) -> Result<()> {
    let host: BTreeMap<String, Tensor> =
        values.iter().map(|(n, v)| Ok((n.clone(), v.to_device(&Device::Cpu)?))).collect::<Result<_>>()?;
    crate::adapt::inject::load_values(t.params(), &host, "the subject's trainable tensors")
}

/// `setup` in f64 with a dense base: a 4-bit base becomes the dense weight it multiplies.
pub fn f64_setup(setup: &Setup) -> Result<Setup> {
    let mut s = setup.clone();
    s.spec.dtype = DType::F64;
    let mut weights = crate::weights::cast(&setup.weights, DType::F64)?;
    if let Some(q) = setup.quant {
        for (name, w) in &setup.weights {
            let Some(path) = name.strip_suffix(".weight") else { continue };
            let leaf = path.rsplit('.').next().unwrap_or(path);
            if crate::adapt::lora::PROJECTIONS.contains(&leaf) {
                let lin = Quant4Linear::quantize(&w.to_device(&Device::Cpu)?, &q)?;
                weights.insert(name.clone(), lin.dequantized()?.to_dtype(DType::F64)?);
            }
        }
    }
    s.weights = weights;
    s.quant = None;
    Ok(s)
}

/// One step's gradients and loss from the oracle (f64) and from the reference in the setup's
/// own precision, both at the same trainable values.
#[derive(Debug, Clone)]
pub struct OracleStep {
    /// f64 gradients.
    pub exact: BTreeMap<String, Tensor>,
    /// f64 loss (token-weighted mean).
    pub exact_loss: f64,
    /// Gradients in the setup's own precision.
    pub own: BTreeMap<String, Tensor>,
    /// Loss in the setup's own precision.
    pub own_loss: f64,
    /// Unmasked target tokens of the step (after the shift).
    pub tokens: usize,
}

/// The oracle's and the reference's view of one step over `batches` at trainable `values`.
pub fn step_at(setup: &Setup, values: &[(String, Tensor)], batches: &[Batch]) -> Result<OracleStep> {
    let (exact, exact_loss, _) = reference_at(&f64_setup(setup)?, values)?.gradients(batches, Mode::Train)?;
    let (own, own_loss, tokens) = reference_at(setup, values)?.gradients(batches, Mode::Train)?;
    Ok(OracleStep { exact, exact_loss, own, own_loss, tokens })
}

/// How far rounding in the setup's own precision moves the reference's eval logits of `ids`
/// from the same computation in f64 (relative L2), for the setup's initial values: on the full
/// forward, and on the KV-cache path (`prefill` positions, then one at a time). Two correct
/// paths are equal in exact arithmetic, so they differ by at most the sum of their floors.
pub fn logits_floors(setup: &Setup, ids: &Tensor, prefill: usize) -> Result<(f64, f64)> {
    let ids = ids.to_device(&Device::Cpu)?;
    let own = crate::subject::reference(setup, &Device::Cpu)?;
    let exact = crate::subject::reference(&f64_setup(setup)?, &Device::Cpu)?;
    let full = rel_l2_f64(&own.logits(&ids, Mode::Eval)?, &exact.logits(&ids, Mode::Eval)?)?;
    let cached = rel_l2_f64(
        &crate::props::forward::cached_logits(own.model(), &ids, prefill)?,
        &crate::props::forward::cached_logits(exact.model(), &ids, prefill)?,
    )?;
    Ok((full, cached))
}

/// Relative L2 of `a` against `b`, both read in f64 (the f64 side not rounded to f32).
pub fn rel_l2_f64(a: &Tensor, b: &Tensor) -> Result<f64> {
    let (a, b) = (a.to_dtype(DType::F64)?, b.to_dtype(DType::F64)?);
    let num = (&a - &b)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt();
    Ok(num / b.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt().max(1e-300))
}
