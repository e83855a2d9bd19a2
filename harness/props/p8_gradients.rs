//! P8 — gradients reach every trainable tensor and are right: every trainable tensor gets a
//! finite, non-zero gradient on a batch that exercises it (adapters start with non-zero B, so
//! A's gradient is not trivially zero); each gradient agrees with an independent computation
//! — the reference trainer loaded with the subject's current trainable values and re-run in
//! f64 (a 4-bit base as the dense weight it multiplies); and an optimizer step changes
//! trainable and no frozen tensor. Catches fused ops without a backward, which detach part of
//! the graph silently — everywhere (zero gradients), or in one layer only (finite, non-zero
//! and wrong).
//!
//! Tolerance (error analysis): a gradient computed in precision `u` is off the exact one by
//! `u·κ` of the step's gradient scale, where `κ` depends on the model and the batch (deep,
//! narrow random models cancel a lot). The floor measures it on the case: the reference in the
//! setup's own precision (the effective dtype: a 4-bit base's compute dtype when coarser)
//! against the same f64 oracle. Each tensor's error — relative to its own gradient, or to the
//! step's RMS gradient when its own is smaller (a tensor whose gradient nearly cancels is not
//! held to its own tiny norm) — may be 20 × its floor, at least the anchor and at most the cap:
//! f32 1e-5..1e-3, f16 2e-3..1e-1, bf16 1e-2..5e-1. A tensor whose floor is above cap / 20 is
//! one the dtype cannot compute closely enough to judge (bf16 on a 4-wide random model gets
//! some gradients wrong by more than their size): it is not compared, and the fraction is
//! reported. A detached path changes f32 gradients by 2e-1 to O(1), so the f32 setups are
//! where this clause bites; in bf16 it catches only gross detachment.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::props::compare::grad_diff;
use crate::props::oracle::{step_at, OracleStep};
use crate::props::property::Property;
use crate::props::tolerance::{count, effective_dtype, observe, Bound};
use crate::props::{bitwise_equal, within, Check, Violation};
use crate::strategy::{random_batches, Draws};
use crate::subject::{Factory, Setup};

const ID: &str = "P8/gradients";

/// The catalogue entry.
pub const PROPERTY: Property = Property {
    id: "P8",
    test_name: "p8_gradients_reach_and_correct",
    title: "gradients reach every tensor, match f64",
    invariant: "every trainable tensor gets a finite non-zero gradient equal to an independent re-run (the reference \
                with the subject's values, f64 for dense bases); a step changes every trainable and no frozen tensor",
    tolerance: "per tensor vs the f64 oracle (relative to its gradient or the step's RMS): clamp(20 × the \
                reference's own error in the effective dtype, anchor, cap): f32 1e-5..1e-3, f16 2e-3..1e-1, bf16 \
                1e-2..5e-1; the rest exact",
    draws: Draws::OPTIMIZER,
    ..Property::trainer(check)
};

/// What [`judge_gradients`] counts: the tensors it could not judge.
pub const UNJUDGED: &str = "gradient tensors not judged (the reference's own error in this dtype is over cap / 20)";

/// The per-tensor bound for effective dtype `dtype`.
pub fn bound(dtype: DType) -> Bound {
    let (anchor, cap) = match dtype {
        DType::BF16 => (1e-2, 5e-1),
        DType::F16 => (2e-3, 1e-1),
        _ => (1e-5, 1e-3),
    };
    Bound { anchor, cap, factor: 20.0 }
}

fn fail(code: &'static str, detail: String) -> Check {
    Err(Violation::new(ID, code, detail).into())
}

/// Judge `got` (a subject's gradients over `batch` at its trainable `values`) against the f64
/// oracle, each tensor within [`bound`] of its floor: the worst tensor over its tolerance, if
/// any, as (name, error, tolerance, floor). A tensor whose floor puts it beyond the cap (in
/// half precision, a narrow random model can get a gradient wrong by more than its size) is
/// not judged, and such tensors are counted ([`UNJUDGED`]); finiteness and
/// non-zero gradients are checked for every tensor regardless. `what` names the comparison in
/// measurements.
pub fn judge_gradients(
    setup: &Setup,
    oracle: &OracleStep,
    got: &BTreeMap<String, Tensor>,
    what: &'static str,
) -> Result<Option<(String, f64, f64, f64)>> {
    let floor = grad_diff(&oracle.own, &oracle.exact)?;
    let host: BTreeMap<String, Tensor> =
        got.iter().map(|(n, g)| Ok((n.clone(), g.to_device(&Device::Cpu)?))).collect::<Result<_>>()?;
    let diff = grad_diff(&host, &oracle.exact)?;
    let b = bound(effective_dtype(setup));
    let mut worst: Option<(String, f64, f64, f64)> = None;
    let mut unjudged = 0usize;
    for (name, &e) in &diff.per_tensor {
        let f = floor.per_tensor.get(name).copied().unwrap_or(0.0);
        let Some(tol) = b.judgeable(f) else {
            unjudged += 1;
            continue;
        };
        observe(what, e, tol);
        if !within(e, tol) && worst.as_ref().is_none_or(|w| e / tol > w.1 / w.2 || e.is_nan()) {
            worst = Some((name.clone(), e, tol, f));
        }
    }
    count(UNJUDGED, unjudged, diff.per_tensor.len());
    Ok(worst)
}

/// Check P8 on one setup.
pub fn check(f: &dyn Factory, device: &Device, setup: &Setup) -> Check {
    // No warmup: with transformers' schedule the first step of a warmup trains at lr 0, and
    // the step below must move every trainable tensor.
    let mut setup = setup.clone();
    setup.train.schedule.warmup_steps = 0;
    let setup = &setup;
    let mut t = f.build(setup, device)?;
    // Long enough rows that every position and layer is exercised.
    let batch = random_batches(setup.spec.vocab_size, setup.adapter_seed, 1, 3, 10);
    let grads = t.gradients(&batch)?;
    let trainable = t.trainable();
    for (name, _) in &trainable {
        let Some(g) = grads.get(name) else {
            return fail("no_gradient", format!("trainable `{name}` received no gradient"));
        };
        let v = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if let Some(x) = v.iter().find(|x| !x.is_finite()) {
            return fail("non_finite", format!("`{name}` has a non-finite gradient ({x})"));
        }
        if v.iter().all(|&x| x == 0.0) {
            return fail("zero_gradient", format!("`{name}` received an all-zero gradient"));
        }
    }
    if let Some(name) = grads.keys().find(|n| !trainable.iter().any(|(t, _)| t == *n)) {
        return fail("gradient_mismatch", format!("a gradient for `{name}`, which is not a trainable tensor"));
    }
    let oracle = step_at(setup, &trainable, &batch)?;
    if let Some((name, e, tol, floor)) = judge_gradients(setup, &oracle, &grads, "gradient vs f64 oracle, per tensor")?
    {
        return fail(
            "gradient_mismatch",
            format!("`{name}`: gradient vs the f64 oracle {e:.3e} > {tol:.1e} (the reference's own error {floor:.1e})"),
        );
    }
    // Deep copies: a trainer may update its tensors in place.
    let copy = |v: Vec<(String, Tensor)>| -> Result<Vec<(String, Tensor)>> {
        v.into_iter().map(|(n, x)| Ok((n, x.copy()?))).collect()
    };
    let frozen_before = copy(t.frozen())?;
    let trained_before = copy(trainable)?;
    t.train_step(&batch)?;
    for ((name, a), (_, b)) in frozen_before.iter().zip(t.frozen()) {
        if !bitwise_equal(a, &b)? {
            return fail("frozen_changed", format!("frozen `{name}` changed in an optimizer step"));
        }
    }
    for ((name, a), (_, b)) in trained_before.iter().zip(t.trainable()) {
        if bitwise_equal(a, &b)? {
            return fail("not_updated", format!("trainable `{name}` did not change in an optimizer step"));
        }
    }
    Ok(())
}
