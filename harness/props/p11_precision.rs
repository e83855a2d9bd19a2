//! P11 — no precision stall: a bf16/f16 model trained at a small learning rate (1e-5, the low
//! end of fine-tuning rates) keeps its updates. After 8 AdamW steps on one batch, at least
//! half of the elements of every trainable tensor have changed. Adam moves every element with
//! a non-zero gradient by about the learning rate per step, far below the spacing of bf16
//! values of typical adapter weights (2.4e-4 at 0.05): master weights or optimizer state held
//! in half precision round those updates away, so training silently stops (Gemma-3's constant
//! eval loss in fp16/bf16), while f32 master weights accumulate them. Only elements whose
//! gradient at the first step is non-zero count (rows of tokens not in the batch do not move).

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::props::property::{Property, HALF_DTYPES};
use crate::props::{Check, Violation};
use crate::strategy::random_batches;
use crate::subject::{Factory, Setup};

const ID: &str = "P11/precision_stall";

/// Learning rate of the check.
pub const LR: f64 = 1e-5;
/// Steps taken.
pub const STEPS: usize = 8;
/// Fraction of each tensor's elements that must change.
pub const MIN_CHANGED: f64 = 0.5;

/// The catalogue entry.
pub const PROPERTY: Property = Property {
    id: "P11",
    test_name: "p11_no_precision_stall",
    title: "small updates not lost to half precision",
    invariant: "bf16/f16 model, lr 1e-5, 8 AdamW steps on one batch: at least half of the elements with a gradient \
                change in every trainable tensor (updates accumulate in f32 master weights, not in half precision)",
    tolerance: "exact count; ≥ 50 % of elements changed (f32 masters change ~100 %, bf16 masters ~0 % at this lr)",
    dtypes: &HALF_DTYPES,
    ..Property::trainer(check)
};

/// Of the elements with a non-zero gradient `g`, the fraction that differ between `a` and `b`
/// (`None` when no element has a gradient).
fn changed_fraction(a: &Tensor, b: &Tensor, g: &Tensor) -> Result<Option<f64>> {
    let host = |t: &Tensor| -> Result<Vec<f64>> { Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?) };
    let (a, b, g) = (host(a)?, host(b)?, host(g)?);
    let live: Vec<usize> = (0..g.len()).filter(|&i| g[i] != 0.0).collect();
    if live.is_empty() {
        return Ok(None);
    }
    let n = live.iter().filter(|&&i| a[i] != b[i]).count();
    Ok(Some(n as f64 / live.len() as f64))
}

/// Check P11 on one setup.
pub fn check(f: &dyn Factory, device: &Device, setup: &Setup) -> Check {
    let mut setup = setup.clone();
    setup.train.optim.lr = LR;
    setup.train.schedule.warmup_steps = 0;
    setup.train.max_grad_norm = None;
    let mut t = f.build(&setup, device)?;
    let batch = random_batches(setup.spec.vocab_size, setup.adapter_seed, 1, 3, 10);
    let before: Vec<(String, Tensor)> =
        t.trainable().into_iter().map(|(n, x)| Ok((n, x.copy()?))).collect::<Result<_>>()?;
    let grads = t.gradients(&batch)?;
    for _ in 0..STEPS {
        t.train_step(&batch)?;
    }
    for ((name, a), (_, b)) in before.iter().zip(t.trainable()) {
        let Some(g) = grads.get(name) else { continue };
        let Some(frac) = changed_fraction(a, &b, g)? else { continue };
        if frac < MIN_CHANGED {
            return Err(Violation::new(
                ID,
                "stall",
                format!(
                    "`{name}` ({:?}): only {:.1} % of its elements with a gradient changed in {STEPS} steps at lr {LR:.0e} (≥ {:.0} % \
                     required): updates are lost to half-precision rounding",
                    b.dtype(),
                    100.0 * frac,
                    100.0 * MIN_CHANGED
                ),
            )
            .into());
        }
    }
    Ok(())
}
