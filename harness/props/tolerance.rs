//! Tolerances that follow from the arithmetic, and what a run measured against them.
//!
//! A comparison between two computations of the same quantity is bounded by the unit roundoff
//! `u` of the least precise dtype on the path times a condition number `κ` of the computation:
//! `|a − b| ≲ u·κ·scale`. The dtype part is a fact ([`unit_roundoff`], [`effective_dtype`]:
//! a 4-bit base computing in bf16 rounds every product to bf16 even in an f32 model); the
//! condition is measured on the case itself — the same quantity computed twice by the
//! reference in ways equal in exact arithmetic, or the reference's own error against an f64
//! re-run — and the bound is that floor times a safety factor, never below a few units of
//! roundoff ([`Bound::anchor`]) and never above the largest error the property accepts
//! ([`Bound::cap`], where it stops promising to see a bug).
//!
//! Every bounded comparison also records its worst value against its bound ([`observe`]): the
//! runner attaches the worst ratio of a passing run to its verdict, so a report shows how
//! close a correct subject came (a train/eval difference within tolerance is still a separate
//! path, and is reported as measured).

use std::cell::RefCell;
use std::collections::BTreeMap;

use candle_core::DType;
use serde::Serialize;

use crate::subject::Setup;

/// The unit roundoff of `dtype` (half the spacing of values at 1): f32 2⁻²⁴, bf16 2⁻⁸, f16
/// 2⁻¹¹, f64 2⁻⁵³.
pub fn unit_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => f64::EPSILON / 2.0,
        DType::BF16 => 2f64.powi(-8),
        DType::F16 => 2f64.powi(-11),
        _ => 2f64.powi(-24),
    }
}

/// The least precise of two float dtypes.
pub fn coarser(a: DType, b: DType) -> DType {
    if unit_roundoff(a) >= unit_roundoff(b) {
        a
    } else {
        b
    }
}

/// The dtype that limits a setup's precision: the model dtype, or a 4-bit base's compute
/// dtype when that is coarser (an f32 model over an NF4 base computing in f16 rounds every
/// base product to f16, and its gradients with it).
pub fn effective_dtype(setup: &Setup) -> DType {
    match &setup.quant {
        Some(q) => coarser(setup.spec.dtype, q.compute_dtype),
        None => setup.spec.dtype,
    }
}

/// Relative-L2 tolerance between two computation paths of the same logits in `dtype` (a
/// KV-cache decode and a full forward; train and eval mode of a framework whose two modes
/// run different code): different matmul shapes and op orders round differently, and every
/// layer carries the difference on. f32 1e-5 (≈ 170 u: the paths agree to a few ulps per op
/// and the small random models amplify by up to ~100), f16 5e-3 (≈ 10 u), bf16 2e-2 (≈ 5 u:
/// with 8 bits the rounding of each layer's output dominates, and it is not amplified much
/// further). A separate path that computes something else — a wrong norm, a collapsed
/// argmax, a 2.17 mean logit gap — is orders of magnitude beyond.
pub fn path_tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 2e-2,
        DType::F16 => 5e-3,
        _ => 1e-5,
    }
}

/// The bound between two computation paths of the same logits, from a measured floor `f`: the
/// sum of how far each path's precision moves its logits from the same path in f64. Two
/// correct paths are equal in exact arithmetic, so by the triangle inequality they differ by at
/// most `f`; allowed `2f`, at least [`path_tolerance`], at most 10 × it (beyond it the
/// comparison is not made).
pub fn path_bound(dtype: DType) -> Bound {
    let anchor = path_tolerance(dtype);
    Bound { anchor, cap: 10.0 * anchor, factor: 2.0 }
}

/// A tolerance from a measured floor: `clamp(factor × floor, anchor, cap)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bound {
    /// The least tolerance, for a floor measured at (or near) zero: a few units of roundoff.
    pub anchor: f64,
    /// The largest tolerance: beyond it the property no longer promises to see a bug, and a
    /// floor above it is itself a finding.
    pub cap: f64,
    /// How far another correct implementation may land from the reference's own rounding.
    pub factor: f64,
}

impl Bound {
    /// The tolerance for a measured floor (a NaN floor gives the anchor; the comparison then
    /// decides).
    pub fn tolerance(&self, floor: f64) -> f64 {
        if floor.is_nan() {
            return self.anchor;
        }
        (self.factor * floor).clamp(self.anchor, self.cap)
    }

    /// The tolerance for a measured floor, or `None` when `factor × floor` exceeds the cap: the
    /// reference itself cannot compute the quantity that closely at this precision, so the
    /// comparison cannot tell a bug from rounding and is not made (callers report how often).
    pub fn judgeable(&self, floor: f64) -> Option<f64> {
        (self.factor * floor <= self.cap).then(|| self.tolerance(floor))
    }
}

/// The worst a passing run came to one of its bounds, or a count over its cases.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Measured {
    /// What was compared (`train vs eval logits, rel L2`) or counted.
    pub what: String,
    /// The worst measured value (a count: how many).
    pub value: f64,
    /// The bound it was held to in that case (a count: out of how many).
    pub bound: f64,
    /// A count summed over the cases rather than a worst value.
    #[serde(skip_serializing_if = "std::ops::Not::not", default)]
    pub count: bool,
}

impl Measured {
    /// `value / bound` (0 when both are 0).
    pub fn ratio(&self) -> f64 {
        if self.value == 0.0 {
            0.0
        } else {
            self.value / self.bound
        }
    }

    /// One line for a report.
    pub fn line(&self) -> String {
        if self.count {
            format!("{} of {} {}", self.value, self.bound, self.what)
        } else {
            format!("{:.3e} / {:.1e}  {}", self.value, self.bound, self.what)
        }
    }
}

thread_local! {
    static OBSERVED: RefCell<BTreeMap<&'static str, (f64, f64, bool)>> = const { RefCell::new(BTreeMap::new()) };
}

/// Record that `what` measured `value` against `bound` in this case; the worst ratio of a run
/// is kept (per thread: a property runs its cases on one thread).
pub fn observe(what: &'static str, value: f64, bound: f64) {
    if !value.is_finite() || bound.is_nan() || bound <= 0.0 {
        return;
    }
    OBSERVED.with(|o| {
        let mut o = o.borrow_mut();
        let worse = o.get(what).is_none_or(|&(v, b, _)| value / bound > v / b);
        if worse {
            o.insert(what, (value, bound, false));
        }
    });
}

/// Count `hits` of `total` for `what` in this case (summed over the run's cases), for what a
/// comparison could not judge.
pub fn count(what: &'static str, hits: usize, total: usize) {
    OBSERVED.with(|o| {
        let mut o = o.borrow_mut();
        let e = o.entry(what).or_insert((0.0, 0.0, true));
        e.0 += hits as f64;
        e.1 += total as f64;
    });
}

/// Forget what was observed on this thread (the runner calls it before a run).
pub fn clear_observed() {
    OBSERVED.with(|o| o.borrow_mut().clear());
}

/// What was observed on this thread since [`clear_observed`], worst ratio first.
pub fn take_observed() -> Vec<Measured> {
    let mut v: Vec<Measured> = OBSERVED.with(|o| {
        std::mem::take(&mut *o.borrow_mut())
            .into_iter()
            .map(|(what, (value, bound, count))| Measured { what: what.to_string(), value, bound, count })
            .collect()
    });
    v.sort_by(|a, b| b.ratio().total_cmp(&a.ratio()));
    v
}

/// The worst entry per `what` across several runs' measurements (counts summed), worst ratio
/// first.
pub fn worst_of(runs: impl IntoIterator<Item = Vec<Measured>>) -> Vec<Measured> {
    let mut by: BTreeMap<String, Measured> = BTreeMap::new();
    for m in runs.into_iter().flatten() {
        match by.get_mut(&m.what) {
            Some(w) if m.count => {
                w.value += m.value;
                w.bound += m.bound;
            }
            Some(w) if m.ratio() > w.ratio() => *w = m,
            Some(_) => {}
            None => {
                by.insert(m.what.clone(), m);
            }
        }
    }
    let mut v: Vec<Measured> = by.into_values().collect();
    v.sort_by(|a, b| b.ratio().total_cmp(&a.ratio()));
    v
}
