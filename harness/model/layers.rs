//! The building blocks of the decoder, written with candle ops that all have a backward
//! (no fused `rms_norm`, `rope` or `softmax_last_dim`: those detach the graph silently).
//!
//! Every numeric detail follows transformers' modeling files: RMSNorm in f32 then cast
//! (Llama `w·x̂`, Gemma `x̂·(1+w)`), rotate-half rope with cos/sin computed in f32, scores
//! scaled before soft-capping, soft-capping before the mask, softmax in f32.

use candle_core::{DType, Device, Module, Tensor, D};

use crate::error::Result;
use crate::spec::Rope;

/// RMSNorm in either convention, computed in f32 and cast back to the input dtype.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
    /// Gemma: scale by `1 + w` (in f32). Llama: `w · x̂` with x̂ cast back first.
    one_plus: bool,
    /// Planted bug (mutants only): use candle's fused `rms_norm`, which has no backward and
    /// silently detaches everything before it from the gradient.
    pub(crate) fused: bool,
    /// Planted bug (mutants only): no epsilon under the square root.
    pub(crate) no_eps: bool,
    /// Planted bug (mutants only): `mean(x²)` in the input dtype (fp16 overflows past 256).
    pub(crate) variance_in_input_dtype: bool,
}

impl RmsNorm {
    /// A norm with `weight`, `eps` and the Gemma `(1 + w)` convention when `one_plus`.
    pub fn new(weight: Tensor, eps: f64, one_plus: bool) -> Self {
        RmsNorm { weight, eps, one_plus, fused: false, no_eps: false, variance_in_input_dtype: false }
    }

    /// The norm `name` (`{name}.weight`, `[n]`) under `vb`, in the family's convention.
    pub fn load(vb: &candle_nn::VarBuilder, n: usize, name: &str, spec: &crate::spec::ArchSpec) -> Result<Self> {
        Ok(RmsNorm::new(vb.get(n, &format!("{name}.weight"))?, spec.rms_norm_eps, spec.family.is_gemma()))
    }

    /// Plant (or clear) the norm bugs of [`crate::model::Faults`] (mutants only).
    pub(crate) fn plant(&mut self, fused: bool, no_eps: bool, variance_in_input_dtype: bool) {
        self.fused = fused;
        self.no_eps = no_eps;
        self.variance_in_input_dtype = variance_in_input_dtype;
    }

    /// The same norm in the other family's convention (a planted bug for mutants).
    pub fn with_convention_flipped(&self) -> Self {
        RmsNorm { one_plus: !self.one_plus, ..self.clone() }
    }
}

impl Module for RmsNorm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        if self.fused {
            let alpha = if self.one_plus { (self.weight.to_dtype(DType::F32)? + 1.0)? } else { self.weight.clone() };
            return candle_nn::ops::rms_norm(&x.contiguous()?, &alpha.to_dtype(x.dtype())?, self.eps as f32);
        }
        let in_dtype = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let var = if self.variance_in_input_dtype {
            x.sqr()?.mean_keepdim(D::Minus1)?.to_dtype(DType::F32)?
        } else {
            xf.sqr()?.mean_keepdim(D::Minus1)?
        };
        let eps = if self.no_eps { 0.0 } else { self.eps };
        let normed = xf.broadcast_mul(&(var + eps)?.sqrt()?.recip()?)?;
        if self.one_plus {
            let w = (self.weight.to_dtype(DType::F32)? + 1.0)?;
            normed.broadcast_mul(&w)?.to_dtype(in_dtype)
        } else {
            normed.to_dtype(in_dtype)?.broadcast_mul(&self.weight)
        }
    }
}

/// cos/sin tables `[seq, head_dim]` for positions `offset..offset+seq`, in `dtype`.
pub fn rope_tables(
    rope: &Rope,
    head_dim: usize,
    offset: usize,
    seq: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Tensor, Tensor)> {
    let inv = rope.inv_freq(head_dim);
    let half = inv.len();
    let mut cos = Vec::with_capacity(seq * head_dim);
    let mut sin = Vec::with_capacity(seq * head_dim);
    for p in offset..offset + seq {
        let freqs: Vec<f32> = inv.iter().map(|f| p as f32 * f).collect();
        for _ in 0..2 {
            cos.extend(freqs.iter().map(|a| a.cos()));
            sin.extend(freqs.iter().map(|a| a.sin()));
        }
    }
    debug_assert_eq!(cos.len(), seq * 2 * half);
    let cos = Tensor::from_vec(cos, (seq, head_dim), device)?.to_dtype(dtype)?;
    let sin = Tensor::from_vec(sin, (seq, head_dim), device)?.to_dtype(dtype)?;
    Ok((cos, sin))
}

/// Apply rotate-half rope to `x` `[batch, heads, seq, head_dim]`.
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let x1 = x.narrow(D::Minus1, 0, d / 2)?;
    let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// Softmax over the last dimension from differentiable ops (the max is detached: it only
/// shifts, it does not change the value or the gradient).
pub fn softmax_last(x: &Tensor) -> candle_core::Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(D::Minus1)?;
    e.broadcast_div(&sum)
}

/// `tanh(x / cap) · cap`.
pub fn soft_cap(x: &Tensor, cap: f64) -> candle_core::Result<Tensor> {
    (x / cap)?.tanh()? * cap
}

/// Additive attention mask `[q, kv]` (0 or −∞) for queries at `offset..offset+q` attending
/// keys `0..offset+q`: causal, and within `window` positions (query included) when set.
pub fn causal_mask(q: usize, offset: usize, window: Option<usize>, device: &Device) -> Result<Tensor> {
    mask_with_lookahead(q, offset, window, 0, device)
}

/// [`causal_mask`] that also lets each query see `lookahead` future keys (0 is correct;
/// anything else is a planted bug for mutation testing).
pub fn mask_with_lookahead(
    q: usize,
    offset: usize,
    window: Option<usize>,
    lookahead: usize,
    device: &Device,
) -> Result<Tensor> {
    let kv = offset + q;
    let mut m = vec![0f32; q * kv];
    for i in 0..q {
        let qi = offset + i;
        for j in 0..kv {
            let visible = j <= qi + lookahead && (j > qi || window.is_none_or(|w| qi - j < w));
            if !visible {
                m[i * kv + j] = f32::NEG_INFINITY;
            }
        }
    }
    Ok(Tensor::from_vec(m, (q, kv), device)?)
}

/// Repeat each of `kv` heads `n_rep` times along dim 1: `[b, kv, s, d]` → `[b, kv·n_rep, s, d]`.
pub fn repeat_kv(x: &Tensor, n_rep: usize) -> candle_core::Result<Tensor> {
    if n_rep == 1 {
        return Ok(x.clone());
    }
    let (b, kv, s, d) = x.dims4()?;
    x.unsqueeze(2)?.expand((b, kv, n_rep, s, d))?.reshape((b, kv * n_rep, s, d))
}
