//! Train-mode dropout from a seeded host stream, shared by the adapters (LoRA input dropout)
//! and the decoder (attention and residual dropout).
//!
//! The mask is drawn on the host from a ChaCha stream, so a train-mode forward with p > 0 is
//! reproducible from its seed on every device; eval mode and p = 0 draw nothing.

use std::sync::Mutex;

use candle_core::Tensor;
use rand_chacha::ChaCha8Rng;
use rand_core::RngCore;

use crate::error::Result;

/// Whether dropout is active in this forward, and the stream it draws from.
pub struct Ctx<'a> {
    /// Train mode.
    pub train: bool,
    /// The seeded dropout stream.
    pub rng: &'a Mutex<ChaCha8Rng>,
}

impl Ctx<'_> {
    /// `x` with inverted dropout `p` in train mode; `x` itself in eval mode or when `p` ≤ 0
    /// (drawing nothing from the stream).
    pub fn dropout(&self, x: &Tensor, p: f64) -> Result<Tensor> {
        if !self.train || p <= 0.0 {
            return Ok(x.clone());
        }
        let mut rng = self.rng.lock().unwrap_or_else(|e| e.into_inner());
        dropout(x, p, &mut rng)
    }
}

/// Inverted dropout with a mask drawn on the host from `rng` (seeded, so reproducible).
pub fn dropout(x: &Tensor, p: f64, rng: &mut ChaCha8Rng) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    let n = x.elem_count();
    let keep = 1.0 - p;
    let threshold = (keep * (u32::MAX as f64)) as u32;
    let scale = (1.0 / keep) as f32;
    let mask: Vec<f32> = (0..n).map(|_| if rng.next_u32() < threshold { scale } else { 0.0 }).collect();
    let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
    Ok((x * mask)?)
}
