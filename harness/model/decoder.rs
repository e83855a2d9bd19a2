//! One decoder layer: pre-norm attention and MLP blocks with residuals, Gemma 2/3's sandwich
//! norms (after attention, and around the MLP), residual dropout in train mode.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use crate::adapt::inject::Inject;
use crate::adapt::linear::Linear;
use crate::error::Result;
use crate::model::attention::{Attention, Step};
use crate::model::cache::KvCache;
use crate::model::layers::RmsNorm;
use crate::model::mlp::Mlp;
use crate::spec::ArchSpec;

/// One decoder layer, loadable on its own to stream a model too large for memory.
#[derive(Debug, Clone)]
pub struct DecoderLayer {
    input_norm: RmsNorm,
    attn: Attention,
    /// Llama: the norm before the MLP. Gemma 2/3: the norm after attention.
    post_attn_norm: RmsNorm,
    /// Gemma 2/3 only: (pre_feedforward, post_feedforward).
    ff_norms: Option<(RmsNorm, RmsNorm)>,
    mlp: Mlp,
    residual_dropout: f64,
}

/// The layer's projections in a fixed order with their paths inside the layer; one list
/// for both the shared and the mutable view.
macro_rules! projections {
    ($l:expr, $($r:tt)+) => {
        [
            ("self_attn.q_proj", $($r)+ $l.attn.q),
            ("self_attn.k_proj", $($r)+ $l.attn.k),
            ("self_attn.v_proj", $($r)+ $l.attn.v),
            ("self_attn.o_proj", $($r)+ $l.attn.o),
            ("mlp.gate_proj", $($r)+ $l.mlp.gate),
            ("mlp.up_proj", $($r)+ $l.mlp.up),
            ("mlp.down_proj", $($r)+ $l.mlp.down),
        ]
    };
}

impl DecoderLayer {
    /// Load layer `i` from `vb` (the model's root), injecting adapters from `inj`.
    pub fn load(vb: &VarBuilder, spec: &ArchSpec, i: usize, inj: &mut Inject) -> Result<Self> {
        let h = spec.hidden_size;
        let lb = vb.pp("model").pp(format!("layers.{i}"));
        let attn = Attention::load(&lb.pp("self_attn"), spec, i, inj)?;
        let mlp = Mlp::load(&lb.pp("mlp"), spec, inj)?;
        let ff_norms = if spec.family.has_sandwich_norms() {
            Some((
                RmsNorm::load(&lb, h, "pre_feedforward_layernorm", spec)?,
                RmsNorm::load(&lb, h, "post_feedforward_layernorm", spec)?,
            ))
        } else {
            None
        };
        Ok(DecoderLayer {
            input_norm: RmsNorm::load(&lb, h, "input_layernorm", spec)?,
            attn,
            post_attn_norm: RmsNorm::load(&lb, h, "post_attention_layernorm", spec)?,
            ff_norms,
            mlp,
            residual_dropout: spec.residual_dropout,
        })
    }

    /// The layer's output for `x` `[batch, seq, hidden]`.
    pub fn forward(&self, x: &Tensor, step: &Step, cache: Option<&mut KvCache>) -> Result<Tensor> {
        let sandwich = self.ff_norms.is_some();
        let attn = self.attn.forward(&self.input_norm.forward(x)?, step, cache)?;
        let attn = if sandwich { self.post_attn_norm.forward(&attn)? } else { attn };
        let x = (x + step.ctx.dropout(&attn, self.residual_dropout)?)?;

        let hnorm = match &self.ff_norms {
            Some((pre, _)) => pre.forward(&x)?,
            None => self.post_attn_norm.forward(&x)?,
        };
        let mut ff = self.mlp.forward(&hnorm, step.ctx)?;
        if let Some((_, post)) = &self.ff_norms {
            ff = post.forward(&ff)?;
        }
        Ok((x + step.ctx.dropout(&ff, self.residual_dropout)?)?)
    }

    /// The projections by path inside the layer (`self_attn.q_proj`, `mlp.up_proj`, ...).
    pub fn projections(&self) -> [(&'static str, &Linear); 7] {
        projections!(self, &)
    }

    /// Mutable [`DecoderLayer::projections`].
    pub fn projections_mut(&mut self) -> [(&'static str, &mut Linear); 7] {
        projections!(self, &mut)
    }

    /// Plant the norm bugs (mutants only): `block` on the block norms, `qk` on the q/k norms.
    pub(crate) fn plant_norms(&mut self, block: bool, qk: bool, no_eps: bool, half_variance: bool) {
        let ff = self.ff_norms.as_mut().map(|(a, b)| [a, b]).into_iter().flatten();
        for n in [&mut self.input_norm, &mut self.post_attn_norm].into_iter().chain(ff) {
            n.plant(block, no_eps, half_variance);
        }
        for n in [&mut self.attn.q_norm, &mut self.attn.k_norm].into_iter().flatten() {
            n.plant(qk, no_eps, half_variance);
        }
    }
}
