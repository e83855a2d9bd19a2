//! Self-attention for every family: q/k/v/o projections (LoRA and 4-bit bases injected as
//! they load), Gemma 3's q/k norms, rotate-half rope, grouped-query heads, scores scaled then
//! soft-capped (Gemma 2) then masked, softmax in f32, attention dropout in train mode.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;

use crate::adapt::dropout::Ctx;
use crate::adapt::inject::Inject;
use crate::adapt::linear::Linear;
use crate::error::Result;
use crate::model::cache::KvCache;
use crate::model::layers::{apply_rope, repeat_kv, soft_cap, softmax_last, RmsNorm};
use crate::spec::ArchSpec;

/// What one attention call needs besides its input: this layer's mask and rope tables,
/// the padding bias, and the dropout context.
pub struct Step<'a> {
    /// Additive causal (and window) mask `[q, kv]`.
    pub mask: &'a Tensor,
    /// Additive padding bias `[batch, 1, 1, kv]`, if the batch is padded.
    pub pad_bias: Option<&'a Tensor>,
    /// Rope cos table `[q, head_dim]`.
    pub cos: &'a Tensor,
    /// Rope sin table `[q, head_dim]`.
    pub sin: &'a Tensor,
    /// Train mode and the dropout stream.
    pub ctx: &'a Ctx<'a>,
}

/// The shape and numeric switches attention takes from the spec.
#[derive(Debug, Clone, Copy)]
struct Config {
    layer: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    scale: f64,
    softcap: Option<f64>,
    dropout: f64,
    dtype: DType,
}

/// One layer's self-attention.
#[derive(Debug, Clone)]
pub struct Attention {
    pub(crate) q: Linear,
    pub(crate) k: Linear,
    pub(crate) v: Linear,
    pub(crate) o: Linear,
    pub(crate) q_norm: Option<RmsNorm>,
    pub(crate) k_norm: Option<RmsNorm>,
    cfg: Config,
}

impl Attention {
    /// Load layer `layer`'s attention from `vb` (rooted at `model.layers.{layer}.self_attn`).
    pub fn load(vb: &VarBuilder, spec: &ArchSpec, layer: usize, inj: &mut Inject) -> Result<Self> {
        let (h, hd) = (spec.hidden_size, spec.head_dim);
        let qk_norm = |name: &str| -> Result<Option<RmsNorm>> {
            if spec.family.has_qk_norm() {
                Ok(Some(RmsNorm::load(vb, hd, name, spec)?))
            } else {
                Ok(None)
            }
        };
        Ok(Attention {
            q: inj.projection(vb, spec.num_heads * hd, h, "q_proj")?,
            k: inj.projection(vb, spec.num_kv_heads * hd, h, "k_proj")?,
            v: inj.projection(vb, spec.num_kv_heads * hd, h, "v_proj")?,
            o: inj.projection(vb, h, spec.num_heads * hd, "o_proj")?,
            q_norm: qk_norm("q_norm")?,
            k_norm: qk_norm("k_norm")?,
            cfg: Config {
                layer,
                heads: spec.num_heads,
                kv_heads: spec.num_kv_heads,
                head_dim: hd,
                scale: spec.attn_scale(),
                softcap: spec.attn_logit_softcapping,
                dropout: spec.attention_dropout,
                dtype: spec.dtype,
            },
        })
    }

    /// Attention output `[batch, seq, hidden]` for `x` `[batch, seq, hidden]`, appending this
    /// layer's keys and values to `cache` when given.
    pub fn forward(&self, x: &Tensor, step: &Step, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let c = &self.cfg;
        let ctx = step.ctx;
        let (b, s, _) = x.dims3()?;
        let q = self.q.forward_ctx(x, ctx)?.reshape((b, s, c.heads, c.head_dim))?;
        let k = self.k.forward_ctx(x, ctx)?.reshape((b, s, c.kv_heads, c.head_dim))?;
        let v = self.v.forward_ctx(x, ctx)?.reshape((b, s, c.kv_heads, c.head_dim))?;
        let (q, k) = match (&self.q_norm, &self.k_norm) {
            (Some(qn), Some(kn)) => (candle_core::Module::forward(qn, &q)?, candle_core::Module::forward(kn, &k)?),
            _ => (q, k),
        };
        let q = apply_rope(&q.transpose(1, 2)?.contiguous()?, step.cos, step.sin)?;
        let k = apply_rope(&k.transpose(1, 2)?.contiguous()?, step.cos, step.sin)?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let (k, v) = match cache {
            Some(cache) => cache.append(c.layer, k, v)?,
            None => (k, v),
        };
        let n_rep = c.heads / c.kv_heads;
        let k = repeat_kv(&k, n_rep)?.contiguous()?;
        let v = repeat_kv(&v, n_rep)?.contiguous()?;

        let mut scores = (q.matmul(&k.t()?)? * c.scale)?;
        if let Some(cap) = c.softcap {
            scores = soft_cap(&scores, cap)?;
        }
        let mut scores = scores.to_dtype(DType::F32)?.broadcast_add(step.mask)?;
        if let Some(p) = step.pad_bias {
            scores = scores.broadcast_add(p)?;
        }
        let probs = ctx.dropout(&softmax_last(&scores)?.to_dtype(c.dtype)?, c.dropout)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, c.heads * c.head_dim))?;
        self.o.forward_ctx(&out, ctx)
    }
}
