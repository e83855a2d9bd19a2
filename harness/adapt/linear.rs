//! The projection layer of the model: a dense or 4-bit frozen base plus an optional LoRA
//! term, `y = base(x) + (dropout(x)·Aᵀ·Bᵀ)·scale`. Every op has a backward: gradients reach
//! the input and A/B (and a dense base when it is trainable); a 4-bit base is a constant.

use candle_core::{DType, Tensor};

pub use crate::adapt::dropout::Ctx;
use crate::adapt::qlora::Quant4Linear;
use crate::error::Result;

/// The frozen (or fully trained) weight of a projection.
#[derive(Debug, Clone)]
pub enum Base {
    /// A dense `[out, in]` weight (a `Var` when trained in full).
    Dense(Tensor),
    /// A 4-bit weight, frozen.
    Quant4(Box<Quant4Linear>),
}

/// A LoRA term on a projection.
#[derive(Debug, Clone)]
pub struct LoraPart {
    /// `[r, in]` (a `Var` when training; may be f32 master weights under a bf16 model).
    pub a: Tensor,
    /// `[out, r]`.
    pub b: Tensor,
    /// `alpha / r` or `alpha / √r`.
    pub scale: f64,
    /// Dropout on the adapter input, train mode only.
    pub dropout: f64,
}

/// A projection: base plus optional LoRA.
#[derive(Debug, Clone)]
pub struct Linear {
    /// The base weight.
    pub base: Base,
    /// The adapter, if any.
    pub lora: Option<LoraPart>,
}

fn matmul_t(x: &Tensor, w: &Tensor) -> candle_core::Result<Tensor> {
    let dims = x.dims().to_vec();
    let last = *dims.last().expect("rank >= 1");
    let rows: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape((rows, last))?.matmul(&w.t()?)?;
    let mut out = dims;
    *out.last_mut().expect("rank >= 1") = w.dim(0)?;
    y.reshape(out)
}

impl Linear {
    /// A dense projection without adapter.
    pub fn dense(weight: Tensor) -> Self {
        Linear { base: Base::Dense(weight), lora: None }
    }

    /// `(out, in)` of the weight.
    pub fn dims(&self) -> (usize, usize) {
        match &self.base {
            Base::Dense(w) => (w.dim(0).unwrap_or(0), w.dim(1).unwrap_or(0)),
            Base::Quant4(q) => (q.q.shape[0], q.q.shape[1]),
        }
    }

    /// The base output alone.
    pub fn base_forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match &self.base {
            Base::Dense(w) => matmul_t(x, &w.to_dtype(x.dtype())?)?,
            Base::Quant4(q) => q.forward(x)?,
        })
    }

    /// Forward with dropout per `ctx`.
    pub fn forward_ctx(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let y = self.base_forward(x)?;
        let Some(l) = &self.lora else { return Ok(y) };
        let xin = ctx.dropout(x, l.dropout)?;
        let a = l.a.to_dtype(x.dtype())?;
        let b = l.b.to_dtype(x.dtype())?;
        let delta = (matmul_t(&matmul_t(&xin, &a)?, &b)? * l.scale)?;
        Ok((y + delta)?)
    }

    /// [`Linear::forward_ctx`] in eval mode with a dense bf16 base multiplied `rows` output rows
    /// at a time.
    /// candle's CPU backend multiplies bf16 by widening the whole right-hand storage to f32 at
    /// once, so a 128k-row head would need twice its own size again; here each chunk is widened
    /// on its own (the same f32 products, so the same values). Other bases and dtypes, and
    /// weights of at most `rows` rows, go through [`Linear::forward_ctx`] unchanged.
    pub fn forward_chunked(&self, x: &Tensor, rows: usize, ctx: &Ctx) -> Result<Tensor> {
        let w = match &self.base {
            Base::Dense(w)
                if !ctx.train && w.dtype() == DType::BF16 && x.dtype() == DType::BF16 && w.dim(0)? > rows =>
            {
                w
            }
            _ => return self.forward_ctx(x, ctx),
        };
        let out = w.dim(0)?;
        let x32 = x.to_dtype(DType::F32)?;
        let mut parts = Vec::with_capacity(out.div_ceil(rows));
        for start in (0..out).step_by(rows.max(1)) {
            let chunk = w.narrow(0, start, rows.min(out - start))?.to_dtype(DType::F32)?;
            parts.push(matmul_t(&x32, &chunk)?.to_dtype(DType::BF16)?);
        }
        let y = Tensor::cat(&parts, x.rank() - 1)?;
        let Some(l) = &self.lora else { return Ok(y) };
        let a = l.a.to_dtype(x.dtype())?;
        let b = l.b.to_dtype(x.dtype())?;
        Ok((y + (matmul_t(&matmul_t(x, &a)?, &b)? * l.scale)?)?)
    }

    /// Fold the adapter into a dense base (`W += B·A·scale`) and drop it; returns the delta
    /// so that [`Linear::unmerge`] can restore the adapter. A 4-bit base cannot be merged
    /// without requantizing, which changes the function: that is an error.
    pub fn merge(&mut self) -> Result<Option<LoraPart>> {
        let Some(l) = self.lora.take() else { return Ok(None) };
        match &self.base {
            Base::Dense(w) => {
                let d = crate::adapt::lora::delta(&l.a, &l.b, l.scale, w.dtype())?;
                self.base = Base::Dense((w.detach() + d)?);
                Ok(Some(l))
            }
            Base::Quant4(_) => {
                self.lora = Some(l);
                Err(crate::error::Error::Msg(
                    "cannot merge LoRA into a 4-bit base without requantizing (dequantize the base first)".into(),
                ))
            }
        }
    }

    /// Undo [`Linear::merge`]: subtract the delta and put the adapter back.
    pub fn unmerge(&mut self, l: LoraPart) -> Result<()> {
        if let Base::Dense(w) = &self.base {
            let d = crate::adapt::lora::delta(&l.a, &l.b, l.scale, w.dtype())?;
            self.base = Base::Dense((w.detach() - d)?);
        }
        self.lora = Some(l);
        Ok(())
    }
}
