//! Tensor comparisons used by the properties: bitwise equality, relative L2, max |Δ|.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};

use crate::error::Result;

fn host_f32(t: &Tensor) -> Result<Vec<f32>> {
    Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

/// True when both tensors have the same shape, dtype and bits (NaN payloads included).
pub fn bitwise_equal(a: &Tensor, b: &Tensor) -> Result<bool> {
    if a.dims() != b.dims() || a.dtype() != b.dtype() {
        return Ok(false);
    }
    let a = crate::io::st::host(a)?;
    let b = crate::io::st::host(b)?;
    Ok(safetensors::View::data(&a) == safetensors::View::data(&b))
}

/// `‖a − b‖₂ / max(‖b‖₂, tiny)`, computed in f64 on the host; `inf` on a shape mismatch or
/// any non-finite value.
pub fn rel_l2(a: &Tensor, b: &Tensor) -> Result<f64> {
    if a.dims() != b.dims() {
        return Ok(f64::INFINITY);
    }
    let (a, b) = (host_f32(a)?, host_f32(b)?);
    let (mut num, mut den) = (0f64, 0f64);
    for (x, y) in a.iter().zip(&b) {
        if !x.is_finite() || !y.is_finite() {
            return Ok(f64::INFINITY);
        }
        num += (*x as f64 - *y as f64).powi(2);
        den += (*y as f64).powi(2);
    }
    Ok(num.sqrt() / den.sqrt().max(1e-30))
}

/// Largest absolute elementwise difference (`inf` on a shape mismatch).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    if a.dims() != b.dims() {
        return Ok(f64::INFINITY);
    }
    let (a, b) = (host_f32(a)?, host_f32(b)?);
    Ok(a.iter().zip(&b).map(|(x, y)| (*x as f64 - *y as f64).abs()).fold(0.0, f64::max))
}

/// `x ≤ bound`, false for NaN: a comparison that cannot pass by accident.
pub fn within(x: f64, bound: f64) -> bool {
    x <= bound
}

/// How two greedy generations of the same prompt compare.
#[derive(Debug, Clone, PartialEq)]
pub enum Greedy {
    /// Every token equal.
    Same,
    /// Equal up to a step where the two chosen tokens' logits are within the path tolerance
    /// (a near-tie that rounding may break either way); nothing after it is compared.
    NearTie {
        /// The row and step of the first difference.
        row: usize,
        /// Decode step of the first difference.
        step: usize,
        /// `|l[a] − l[b]|` at that step, in the full forward's logits.
        margin: f64,
        /// What the path tolerance allows there.
        allowance: f64,
    },
    /// A difference that is not a near-tie.
    Differ(String),
}

/// Compare greedy generations `got` (e.g. from a KV cache) with `want` (full forwards) after
/// each row of `prompt` `[batch, seq]`. At the first step where a row differs, the full
/// forward's logits of the common prefix decide: when the two chosen tokens' logits are within
/// `2 · tol · ‖logits‖₂` (the most a rel-L2 error of `tol` can move one logit, twice), the
/// generations are a near-tie and agree; otherwise they differ.
pub fn greedy_agree(
    got: &[Vec<u32>],
    want: &[Vec<u32>],
    prompt: &Tensor,
    logits_of: impl Fn(&Tensor) -> Result<Tensor>,
    tol: f64,
) -> Result<Greedy> {
    if got.len() != want.len() || got.iter().zip(want).any(|(a, b)| a.len() != b.len()) {
        return Ok(Greedy::Differ(format!("greedy decode {got:?} differs in shape from full-forward greedy {want:?}")));
    }
    let mut tie = None;
    for (row, (a, b)) in got.iter().zip(want).enumerate() {
        let Some(step) = (0..a.len()).find(|&j| a[j] != b[j]) else { continue };
        let mut seq: Vec<u32> = prompt.get(row)?.to_dtype(DType::U32)?.to_vec1::<u32>()?;
        seq.extend_from_slice(&b[..step]);
        let n = seq.len();
        let ids = Tensor::from_vec(seq, (1, n), prompt.device())?;
        let logits = logits_of(&ids)?;
        let last = host_f32(&logits.get(0)?.get(n - 1)?)?;
        let norm = last.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let margin = (last[a[step] as usize] as f64 - last[b[step] as usize] as f64).abs();
        let allowance = 2.0 * tol * norm;
        if !within(margin, allowance) {
            return Ok(Greedy::Differ(format!(
                "greedy decode {got:?} differs from full-forward greedy {want:?}: row {row} step {step} picks {} \
                 where the full forward picks {}, logit margin {margin:.3e} > {allowance:.3e} (not a near-tie)",
                a[step], b[step]
            )));
        }
        tie.get_or_insert(Greedy::NearTie { row, step, margin, allowance });
    }
    Ok(tie.unwrap_or(Greedy::Same))
}

/// Gradients (or any named tensors) compared tensor by tensor and as a whole.
#[derive(Debug, Clone, PartialEq)]
pub struct GradDiff {
    /// Per tensor: `‖a_T − b_T‖ / max(‖b_T‖, ρ_T)`, with `ρ_T = ‖b‖·√(n_T / n)` the step's
    /// RMS gradient scaled to the tensor's size. A tensor whose gradient is small next to the
    /// rest (a key projection behind a narrow window, a layer whose terms cancel) is judged
    /// against the scale the step's rounding works at, not against its own near-zero norm;
    /// `inf` when `a` lacks the tensor or a value is not finite.
    pub per_tensor: BTreeMap<String, f64>,
    /// `‖a − b‖ / ‖b‖` over every tensor of `b` together.
    pub global: f64,
}

impl GradDiff {
    /// The tensor with the largest error (NaN counts as largest), if any.
    pub fn worst(&self) -> Option<(&str, f64)> {
        self.per_tensor
            .iter()
            .max_by(|a, b| a.1.is_nan().cmp(&b.1.is_nan()).then(a.1.total_cmp(b.1)))
            .map(|(k, v)| (k.as_str(), *v))
    }
}

/// Compare `a` with `b` (the reference side) per [`GradDiff`], in f64 on the host.
pub fn grad_diff(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) -> Result<GradDiff> {
    let host64 = |t: &Tensor| -> Result<Vec<f64>> { Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?) };
    let mut parts: Vec<(String, f64, f64, usize, bool)> = Vec::new(); // (name, ‖a−b‖², ‖b‖², n, ok)
    let (mut num, mut den, mut n_all) = (0f64, 0f64, 0usize);
    for (k, y) in b {
        let yv = host64(y)?;
        let d2: f64 = yv.iter().map(|v| v * v).sum();
        den += d2;
        n_all += yv.len();
        match a.get(k) {
            Some(x) if x.dims() == y.dims() => {
                let xv = host64(x)?;
                let ok = xv.iter().chain(&yv).all(|v| v.is_finite());
                let e2: f64 = xv.iter().zip(&yv).map(|(p, q)| (p - q).powi(2)).sum();
                num += e2;
                parts.push((k.clone(), e2, d2, yv.len(), ok));
            }
            _ => parts.push((k.clone(), f64::INFINITY, d2, yv.len(), false)),
        }
    }
    let rms2 = den / n_all.max(1) as f64;
    let per_tensor = parts
        .into_iter()
        .map(|(k, e2, d2, n, ok)| {
            let v = if !ok { f64::INFINITY } else { e2.sqrt() / d2.max(rms2 * n as f64).sqrt().max(1e-30) };
            (k, v)
        })
        .collect();
    let global = if num.is_finite() { num.sqrt() / den.sqrt().max(1e-30) } else { f64::INFINITY };
    Ok(GradDiff { per_tensor, global })
}
