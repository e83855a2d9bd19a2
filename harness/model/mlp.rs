//! The gated MLP: `down(act(gate(x)) · up(x))`, silu for Llama and tanh-approximate gelu
//! for Gemma (candle's `gelu` is the tanh form), with LoRA and 4-bit bases injected as the
//! projections load.

use candle_core::Tensor;
use candle_nn::VarBuilder;

use crate::adapt::dropout::Ctx;
use crate::adapt::inject::Inject;
use crate::adapt::linear::Linear;
use crate::error::Result;
use crate::spec::ArchSpec;

/// One layer's MLP.
#[derive(Debug, Clone)]
pub struct Mlp {
    pub(crate) gate: Linear,
    pub(crate) up: Linear,
    pub(crate) down: Linear,
    gelu: bool,
}

impl Mlp {
    /// Load from `vb` (rooted at `model.layers.{i}.mlp`).
    pub fn load(vb: &VarBuilder, spec: &ArchSpec, inj: &mut Inject) -> Result<Self> {
        let (h, m) = (spec.hidden_size, spec.intermediate_size);
        Ok(Mlp {
            gate: inj.projection(vb, m, h, "gate_proj")?,
            up: inj.projection(vb, m, h, "up_proj")?,
            down: inj.projection(vb, h, m, "down_proj")?,
            gelu: spec.family.is_gemma(),
        })
    }

    /// `[batch, seq, hidden]` → `[batch, seq, hidden]`.
    pub fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let g = self.gate.forward_ctx(x, ctx)?;
        let g = if self.gelu { g.gelu()? } else { g.silu()? };
        self.down.forward_ctx(&(g * self.up.forward_ctx(x, ctx)?)?, ctx)
    }
}
