//! AdamW with f32 state over f32 master weights, a warmup + cosine schedule, and global
//! gradient-norm clipping. The state (moments and step) is explicit so it can be saved and
//! resumed: an epoch boundary must not reset it.

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

/// Linear warmup then cosine decay to `min_ratio · lr` at `total_steps`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    /// Steps of linear warmup.
    pub warmup_steps: usize,
    /// Step at which the cosine reaches its floor.
    pub total_steps: usize,
    /// Floor as a fraction of the peak.
    pub min_ratio: f64,
}

impl Schedule {
    /// The multiplier of the peak learning rate at optimizer step `step` (0-based).
    pub fn factor(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// AdamW state over named parameters.
#[derive(Debug, Clone)]
pub struct AdamW {
    /// Hyper-parameters.
    pub cfg: AdamWConfig,
    /// Steps taken.
    pub step: usize,
    m: BTreeMap<String, Tensor>,
    v: BTreeMap<String, Tensor>,
}

impl AdamW {
    /// Fresh state.
    pub fn new(cfg: AdamWConfig) -> Self {
        AdamW { cfg, step: 0, m: BTreeMap::new(), v: BTreeMap::new() }
    }

    /// One update of every parameter that has a gradient, at learning rate `lr`.
    pub fn apply(&mut self, params: &[(String, Var)], grads: &BTreeMap<String, Tensor>, lr: f64) -> Result<()> {
        self.step += 1;
        let t = self.step as i32;
        let (b1, b2) = (self.cfg.beta1, self.cfg.beta2);
        let c1 = 1.0 - b1.powi(t);
        let c2 = 1.0 - b2.powi(t);
        for (name, var) in params {
            let Some(g) = grads.get(name) else { continue };
            let g = g.to_dtype(DType::F32)?;
            let m = match self.m.get(name) {
                Some(m) => ((m * b1)? + (&g * (1.0 - b1))?)?,
                None => (&g * (1.0 - b1))?,
            };
            let v = match self.v.get(name) {
                Some(v) => ((v * b2)? + (g.sqr()? * (1.0 - b2))?)?,
                None => (g.sqr()? * (1.0 - b2))?,
            };
            let p = var.as_tensor().to_dtype(DType::F32)?;
            let update = ((&m / c1)? / ((&v / c2)?.sqrt()? + self.cfg.eps)?)?;
            let decayed = (&p * (1.0 - lr * self.cfg.weight_decay))?;
            let new = (decayed - (update * lr)?)?;
            var.set(&new.to_dtype(var.dtype())?)?;
            self.m.insert(name.clone(), m);
            self.v.insert(name.clone(), v);
        }
        Ok(())
    }

    /// The moments as named tensors (`exp_avg.<name>`, `exp_avg_sq.<name>`), for saving.
    pub fn state_tensors(&self) -> BTreeMap<String, Tensor> {
        let mut out = BTreeMap::new();
        for (k, t) in &self.m {
            out.insert(format!("exp_avg.{k}"), t.clone());
        }
        for (k, t) in &self.v {
            out.insert(format!("exp_avg_sq.{k}"), t.clone());
        }
        out
    }

    /// Restore moments saved by [`AdamW::state_tensors`] and the step count.
    pub fn restore(&mut self, step: usize, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
        self.step = step;
        self.m.clear();
        self.v.clear();
        for (k, t) in tensors {
            if let Some(n) = k.strip_prefix("exp_avg_sq.") {
                self.v.insert(n.to_string(), t.to_dtype(DType::F32)?);
            } else if let Some(n) = k.strip_prefix("exp_avg.") {
                self.m.insert(n.to_string(), t.to_dtype(DType::F32)?);
            } else {
                return Err(Error::Msg(format!("optimizer state: unexpected tensor `{k}`")));
            }
        }
        Ok(())
    }

    /// Forget every moment and the step count (a planted bug: an epoch-boundary reset).
    pub fn reset(&mut self) {
        self.step = 0;
        self.m.clear();
        self.v.clear();
    }
}

/// Global L2 norm of `grads`.
pub fn global_norm(grads: &BTreeMap<String, Tensor>) -> Result<f64> {
    let mut total = 0f64;
    for g in grads.values() {
        total += g.to_dtype(DType::F32)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    Ok(total.sqrt())
}

/// Scale `grads` so their global norm is at most `max_norm`; returns the norm before clipping.
pub fn clip(grads: &mut BTreeMap<String, Tensor>, max_norm: f64) -> Result<f64> {
    let norm = global_norm(grads)?;
    if norm.is_finite() && norm > max_norm {
        let s = max_norm / (norm + 1e-6);
        for g in grads.values_mut() {
            *g = (&*g * s)?;
        }
    }
    Ok(norm)
}
