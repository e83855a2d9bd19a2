//! AdamW with f32 state over f32 master weights, a warmup + cosine schedule, and global
//! gradient-norm clipping, each following torch's and transformers' conventions exactly (pinned
//! by `fixtures/optim/`, produced with torch and transformers). The state (moments and
//! per-parameter step counts) is explicit so it can be saved and resumed: an epoch boundary
//! must not reset it.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var};

use crate::error::{Error, Result};

/// AdamW hyper-parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// Peak learning rate.
    pub lr: f64,
    /// First-moment decay.
    pub beta1: f64,
    /// Second-moment decay.
    pub beta2: f64,
    /// Denominator epsilon (kept in f32 state: 1e-8 underflows in f16).
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig { lr: 1e-2, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.0 }
    }
}

/// Linear warmup then cosine decay, exactly as transformers'
/// `get_cosine_with_min_lr_schedule_with_warmup` (`get_cosine_schedule_with_warmup` when
/// `min_ratio` is 0): the factor at optimizer step `s` (0-based; transformers steps its
/// scheduler after the optimizer, so step `s` trains at `lambda(s)`) is `s / warmup` during
/// warmup (the first step trains at 0), then
/// `min_ratio + (1 − min_ratio) · ½(1 + cos(π · progress))` with
/// `progress = (s − warmup) / max(1, total − warmup)`. Like transformers, the cosine is not
/// clamped at `total`: past it the factor rises again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Steps of linear warmup.
    pub warmup_steps: usize,
    /// Step at which the cosine reaches its floor.
    pub total_steps: usize,
    /// Floor as a fraction of the peak (transformers' `min_lr_rate`; 0 by default).
    pub min_ratio: f64,
}

impl Schedule {
    /// The multiplier of the peak learning rate at optimizer step `step` (0-based).
    pub fn factor(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return step as f64 / self.warmup_steps.max(1) as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = (step - self.warmup_steps) as f64 / span as f64;
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        (cosine * (1.0 - self.min_ratio) + self.min_ratio).max(0.0)
    }
}

/// AdamW as torch's `torch.optim.AdamW` computes it (single-tensor path), with the weight decay
/// of transformers' parameter groups ([`decays`]): per parameter, `p ← p·(1 − lr·wd)`, `m ← m + (g − m)(1 − β₁)`, `v ← β₂v + (1 − β₂)g²`, then
/// `p ← p − lr/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)` where `t` is *that parameter's* step
/// count: a parameter without a gradient at some step is skipped and its count does not move,
/// as torch keeps `state[p]["step"]` per parameter.
#[derive(Debug, Clone)]
pub struct AdamW {
    /// Hyper-parameters.
    pub cfg: AdamWConfig,
    /// Optimizer steps taken (each may update any subset of the parameters).
    pub step: usize,
    m: BTreeMap<String, Tensor>,
    v: BTreeMap<String, Tensor>,
    steps: BTreeMap<String, usize>,
}

impl AdamW {
    /// Fresh state.
    pub fn new(cfg: AdamWConfig) -> Self {
        AdamW { cfg, step: 0, m: BTreeMap::new(), v: BTreeMap::new(), steps: BTreeMap::new() }
    }

    /// One update of every parameter that has a gradient, at learning rate `lr`.
    pub fn apply(&mut self, params: &[(String, Var)], grads: &BTreeMap<String, Tensor>, lr: f64) -> Result<()> {
        self.step += 1;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        for (name, var) in params {
            let Some(g) = grads.get(name) else { continue };
            let g = g.to_dtype(DType::F32)?;
            let t = self.steps.get(name).copied().unwrap_or(0) + 1;
            let m = match self.m.get(name) {
                Some(m) => (m + ((&g - m)? * (1.0 - b1))?)?,
                None => (&g * (1.0 - b1))?,
            };
            let v = match self.v.get(name) {
                Some(v) => ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?,
                None => (g.sqr()? * (1.0 - b2))?,
            };
            let c1 = 1.0 - b1.powi(t as i32);
            let c2_sqrt = (1.0 - b2.powi(t as i32)).sqrt();
            let p = var.as_tensor().to_dtype(DType::F32)?;
            let wd = if decays(name) { self.cfg.weight_decay } else { 0.0 };
            let decayed = (&p * (1.0 - lr * wd))?;
            let denom = ((v.sqrt()? / c2_sqrt)? + self.cfg.eps)?;
            let new = (decayed - ((&m / denom)? * (lr / c1))?)?;
            var.set(&new.to_dtype(var.dtype())?)?;
            self.m.insert(name.clone(), m);
            self.v.insert(name.clone(), v);
            self.steps.insert(name.clone(), t);
        }
        Ok(())
    }

    /// The state as named tensors (`exp_avg.<name>`, `exp_avg_sq.<name>`, and each
    /// parameter's step count as an i64 scalar `step.<name>`), for saving.
    pub fn state_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for (k, t) in &self.m {
            out.insert(format!("exp_avg.{k}"), t.clone());
            let device = t.device();
            let steps = self.steps.get(k).copied().unwrap_or(0) as i64;
            out.insert(format!("step.{k}"), Tensor::new(steps, device)?);
        }
        for (k, t) in &self.v {
            out.insert(format!("exp_avg_sq.{k}"), t.clone());
        }
        Ok(out)
    }

    /// Restore the state saved by [`AdamW::state_tensors`] and the optimizer step count. Every
    /// parameter with moments must have its step count and both moments.
    pub fn restore(&mut self, step: usize, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        self.step = step;
        self.m.clear();
        self.v.clear();
        self.steps.clear();
        for (k, t) in tensors {
            if let Some(n) = k.strip_prefix("exp_avg_sq.") {
                self.v.insert(n.to_string(), t.to_dtype(DType::F32)?);
            } else if let Some(n) = k.strip_prefix("exp_avg.") {
                self.m.insert(n.to_string(), t.to_dtype(DType::F32)?);
            } else if let Some(n) = k.strip_prefix("step.") {
                let s = t.to_dtype(DType::I64)?.to_scalar::<i64>().map_err(|_| {
                    Error::Msg(format!("optimizer state: `{k}` is not a scalar step count (shape {:?})", t.dims()))
                })?;
                let s = usize::try_from(s)
                    .map_err(|_| Error::Msg(format!("optimizer state: `{k}` is a negative step count ({s})")))?;
                self.steps.insert(n.to_string(), s);
            } else {
                return Err(Error::Msg(format!("optimizer state: unexpected tensor `{k}`")));
            }
        }
        for n in self.m.keys().chain(self.v.keys()).chain(self.steps.keys()) {
            for (what, present) in [
                ("exp_avg", self.m.contains_key(n)),
                ("exp_avg_sq", self.v.contains_key(n)),
                ("step", self.steps.contains_key(n)),
            ] {
                if !present {
                    return Err(Error::Msg(format!("optimizer state: `{what}.{n}` is missing")));
                }
            }
        }
        Ok(())
    }

    /// The step count of parameter `name` (0 before its first update).
    pub fn param_step(&self, name: &str) -> usize {
        self.steps.get(name).copied().unwrap_or(0)
    }

    /// Forget every moment and the step count (a planted bug: an epoch-boundary reset).
    pub fn reset(&mut self) {
        self.step = 0;
        self.m.clear();
        self.v.clear();
        self.steps.clear();
    }
}

/// Whether parameter `name` gets weight decay, as transformers' `Trainer` builds its two
/// parameter groups (`get_decay_parameter_names`): not biases, not the weights of norm layers
/// (any name containing `bias`, `layernorm` or `rmsnorm`, a segment `norm`, or a segment
/// ending in `_norm`, lower-cased); everything else, LoRA factors and `modules_to_save`
/// copies included, decays.
pub fn decays(name: &str) -> bool {
    let lower = name.to_lowercase();
    let norm_segment = lower.split('.').any(|seg| seg == "norm" || seg.ends_with("_norm"));
    !(lower.contains("bias") || lower.contains("layernorm") || lower.contains("rmsnorm") || norm_segment)
}

/// Global L2 norm of `grads`.
pub fn global_norm(grads: &BTreeMap<String, Tensor>) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.values() {
        total += g.to_dtype(DType::F32)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(total.sqrt())
}

/// Clip as torch's `clip_grad_norm_`: scale every gradient by
/// `min(1, max_norm / (norm + 1e-6))` (so a norm just below `max_norm` is scaled by slightly
/// less than 1 too); returns the global norm before clipping. A non-finite norm leaves the
/// gradients as they are (the caller refuses the step).
pub fn clip(grads: &mut BTreeMap<String, Tensor>, max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    let coef = (max_norm / (norm + 1e-6)).min(1.0);
    if norm.is_finite() && coef < 1.0 {
        for g in grads.values_mut() {
            *g = (&*g * coef)?;
        }
    }
    Ok(norm)
}
