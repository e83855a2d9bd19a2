//! Tensor comparisons used by the properties: bitwise equality, relative L2, max |Δ|.

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
