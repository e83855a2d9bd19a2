//! P5 — gradient accumulation: k micro-batches with uneven numbers of unmasked tokens give
//! the same gradients as one batch holding all their sequences, over all tensors together and
//! per tensor.
//!
//! Tolerance (error analysis): the two are equal in exact arithmetic; in floating point they
//! differ by how each token sum is associated and by how each row's forward and backward is
//! rounded at different batch shapes (a CPU GEMM picks other kernels for 20 rows than for 66,
//! and a deep, narrow random model amplifies the last-bit differences: measured up to 6e-5
//! relative in f32 on a 3-layer Gemma 2). The property measures that floor on the subject
//! itself, with two pairs that are equal in exact arithmetic and involve no accumulation: the
//! merged batch against the same rows reversed and padded 3 columns longer, and each
//! micro-batch alone against the merged batch with every other row's labels masked (the same
//! rows at the merged batch's shape). It allows `20 × floor`, never less than the anchor of the
//! effective dtype (the coarser of the model dtype and a 4-bit base's compute dtype: each
//! micro-batch's gradient is rounded to that precision before it is summed, ~u per
//! micro-batch), nor less than what that rounding can add where the micro-batches' shares
//! cancel (`4·u·(Σᵢ wᵢ‖gᵢ‖ + ‖g‖)/‖g‖`, with each micro-batch's gradient alone `gᵢ` and its
//! share of the tokens `wᵢ`), and never more than the cap: global anchor..cap f32 1e-5..2e-3,
//! bf16 1e-2..8e-2, f16 2e-3..3e-2; per tensor (relative to the tensor's gradient or to the
//! step's RMS gradient, whichever is larger) up to f32 5e-2, bf16 3e-1, f16 2e-1. A floor above
//! the cap is itself a violation (gradients that depend on row order or padding). Normalising
//! per micro-batch (the 2024 bug) is off by ~1e-1 and more.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::props::compare::{grad_diff, GradDiff};
use crate::props::property::Property;
use crate::props::tolerance::{effective_dtype, observe, unit_roundoff, Bound};
use crate::props::{within, Check, Violation};
use crate::strategy::random_batches;
use crate::subject::{Factory, Setup, Trainer};
use crate::train::{Batch, IGNORE};

const ID: &str = "P5/accumulation_equivalence";

/// The catalogue entry.
pub const PROPERTY: Property = Property {
    id: "P5",
    test_name: "p5_accumulation_equivalence",
    title: "accumulation == one big batch",
    invariant: "3 micro-batches with uneven token counts == one batch of all their rows: gradients over all tensors \
                and per tensor; gradients independent of row order and padding",
    tolerance: "rel L2 ≤ clamp(max(20 × floor, 4·u·cancellation), anchor, cap), the floor measured on the subject \
                (rows reversed and padded; each micro-batch alone vs at the merged shape); effective dtype's global \
                anchor..cap f32 1e-5..2e-3, bf16 1e-2..8e-2, f16 2e-3..3e-2; per tensor cap f32 5e-2, bf16 3e-1, f16 \
                2e-1",
    grad_accum: 3,
    ..Property::trainer(check)
};

/// The global and per-tensor bounds for effective dtype `dtype`.
pub fn bounds(dtype: DType) -> (Bound, Bound) {
    let (anchor, cap, tensor_cap) = match dtype {
        DType::BF16 => (1e-2, 8e-2, 3e-1),
        DType::F16 => (2e-3, 3e-2, 2e-1),
        _ => (1e-5, 2e-3, 5e-2),
    };
    (Bound { anchor, cap, factor: FLOOR_FACTOR }, Bound { anchor, cap: tensor_cap, factor: FLOOR_FACTOR })
}

/// How far above the subject's own measured floor accumulation may land.
pub const FLOOR_FACTOR: f64 = 20.0;

fn fail(code: &'static str, detail: String) -> Check {
    Err(Violation::new(ID, code, detail).into())
}

/// Concatenate the sequences of `micro` into one batch, padded to the longest (plus `extra`).
pub fn merge(micro: &[Batch], extra: usize) -> Batch {
    let s = micro.iter().flat_map(|b| b.ids.iter().map(Vec::len)).max().unwrap_or(0) + extra;
    let mut ids = Vec::new();
    let mut labels = Vec::new();
    for b in micro {
        for (i, l) in b.ids.iter().zip(&b.labels) {
            ids.push(i.iter().copied().chain(std::iter::repeat(0)).take(s).collect());
            labels.push(l.iter().copied().chain(std::iter::repeat(IGNORE)).take(s).collect());
        }
    }
    Batch { ids, labels, attention_mask: None }
}

/// Units of roundoff an accumulated gradient may be off per unit of cancellation: each of the
/// k = 3 micro-batch gradients is rounded to the working precision before the sum, and so is
/// the one-batch gradient it is compared with (1 u each at worst), and each sum over a
/// micro-batch's tokens rounds on the way (a half-precision GEMM at another length); measured
/// up to 2.1 u per unit in f16 (a 1-layer Llama, seed 54 of the soak), so 4.
pub const ACC_ULPS: f64 = 4.0;

/// How much the accumulated sum cancels, global and per tensor: `(Σᵢ wᵢ‖gᵢ‖ + ‖g‖) / ‖g‖`,
/// `gᵢ` micro-batch i's gradient alone (normalised by its own tokens), `wᵢ = nᵢ / N` its share
/// of the step's tokens, `g` the one-batch gradient; per tensor relative to the larger of the
/// tensor's gradient and the step's RMS gradient at its size, as [`grad_diff`] judges. The
/// rounding of each `wᵢgᵢ` to the working precision is ~u of its size, and the sum carries it.
fn cancellation(alone: &[(f64, BTreeMap<String, Tensor>)], merged: &BTreeMap<String, Tensor>) -> Result<GradDiff> {
    let norm = |t: &Tensor| -> Result<f64> { Ok(t.to_dtype(DType::F64)?.sqr()?.sum_all()?.to_scalar::<f64>()?.sqrt()) };
    let (mut all2, mut n_all) = (0f64, 0usize);
    for g in merged.values() {
        all2 += norm(g)?.powi(2);
        n_all += g.elem_count();
    }
    let mut per_tensor = BTreeMap::new();
    let mut parts_all = all2.sqrt();
    for (name, g) in merged {
        let mut parts = norm(g)?;
        for (w, a) in alone {
            if let Some(x) = a.get(name) {
                parts += w * norm(x)?;
            }
        }
        let scale = norm(g)?.max((all2 * g.elem_count() as f64 / n_all.max(1) as f64).sqrt()).max(1e-30);
        per_tensor.insert(name.clone(), parts / scale);
    }
    for (w, a) in alone {
        let a2: f64 = a.values().map(|x| norm(x).map(|v| v * v)).sum::<Result<f64>>()?;
        parts_all += w * a2.sqrt();
    }
    Ok(GradDiff { per_tensor, global: parts_all / all2.sqrt().max(1e-30) })
}

/// The floor — the larger difference of two accumulation-free pairs that are equal in exact
/// arithmetic — and the accumulation's cancellation (global, and per tensor).
fn floor(
    t: &dyn Trainer,
    micro: &[Batch],
    merged: &Batch,
    at_merged: &BTreeMap<String, Tensor>,
) -> Result<(GradDiff, GradDiff)> {
    // The same merged batch, rows reversed and 3 columns longer.
    let mut shuffled = merge(micro, 3);
    shuffled.ids.reverse();
    shuffled.labels.reverse();
    let mut worst = grad_diff(&t.gradients(std::slice::from_ref(&shuffled))?, at_merged)?;
    // Each micro-batch alone, and at the merged batch's shape with the other rows masked.
    let mut row = 0;
    let total: usize = micro.iter().map(Batch::tokens).sum();
    let mut alone = Vec::new();
    for b in micro {
        let mut masked = merged.clone();
        for (r, labels) in masked.labels.iter_mut().enumerate() {
            if r < row || r >= row + b.ids.len() {
                labels.iter_mut().for_each(|l| *l = IGNORE);
            }
        }
        row += b.ids.len();
        let g = t.gradients(std::slice::from_ref(b))?;
        let d = grad_diff(&g, &t.gradients(std::slice::from_ref(&masked))?)?;
        worst.global = worst.global.max(d.global);
        for (k, v) in d.per_tensor {
            let e = worst.per_tensor.entry(k).or_insert(0.0);
            *e = e.max(v);
        }
        alone.push((b.tokens() as f64 / total.max(1) as f64, g));
    }
    Ok((worst, cancellation(&alone, at_merged)?))
}

/// Check P5 on one setup.
pub fn check(f: &dyn Factory, device: &Device, setup: &Setup) -> Check {
    let t = f.build(setup, device)?;
    let micro = random_batches(setup.spec.vocab_size, setup.adapter_seed, 3, 2, 9);
    let merged = merge(&micro, 0);
    let ga = t.gradients(&micro)?;
    let gb = t.gradients(std::slice::from_ref(&merged))?;
    let counts: Vec<usize> = micro.iter().map(Batch::tokens).collect();
    if let Some(name) = gb.keys().find(|k| !ga.contains_key(*k)).or_else(|| ga.keys().find(|k| !gb.contains_key(*k))) {
        return fail("missing_gradient", format!("`{name}` has a gradient in only one of the two runs"));
    }
    let dtype = effective_dtype(setup);
    let (global, per_tensor) = bounds(dtype);
    let (floor, cancel) = floor(t.as_ref(), &micro, &merged, &gb)?;
    // The larger of the floor's multiple and the accumulation's own rounding, never over the cap.
    let rounding = |kappa: f64| ACC_ULPS * unit_roundoff(dtype) * kappa;
    if !within(floor.global, global.cap) {
        return fail(
            "order_dependent",
            format!(
                "the same rows reversed and padded, or at another batch shape, change the gradients by rel L2 {:.3e} \
                 > cap {:.0e}",
                floor.global, global.cap
            ),
        );
    }
    let tol = global.tolerance(floor.global).max(rounding(cancel.global).min(global.cap));
    let diff = grad_diff(&ga, &gb)?;
    observe("accumulated vs one batch, all gradients rel L2", diff.global, tol);
    if !within(diff.global, tol) {
        let (name, worst) = diff.worst().unwrap_or(("(none)", f64::NAN));
        return fail(
            "accumulation_mismatch",
            format!(
                "micro-batches with {counts:?} tokens vs one batch: rel L2 {:.3e} > {tol:.1e} (measured floor {:.1e}); \
                 worst `{name}` {worst:.3e}",
                diff.global, floor.global
            ),
        );
    }
    for (name, &e) in &diff.per_tensor {
        let tensor_floor = floor.per_tensor.get(name).copied().unwrap_or(0.0);
        let kappa = cancel.per_tensor.get(name).copied().unwrap_or(1.0);
        let tensor_tol = per_tensor.tolerance(tensor_floor).max(rounding(kappa).min(per_tensor.cap));
        observe("accumulated vs one batch, per tensor", e, tensor_tol);
        if !within(e, tensor_tol) {
            return fail(
                "accumulation_mismatch",
                format!(
                    "micro-batches with {counts:?} tokens vs one batch: `{name}` {e:.3e} > {tensor_tol:.1e} (its floor \
                     {tensor_floor:.1e}, cancellation {kappa:.1}; all tensors {:.1e})",
                    diff.global
                ),
            );
        }
    }
    Ok(())
}
