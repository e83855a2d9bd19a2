//! Masked causal-LM loss: position t predicts token t+1; label −100 is ignored. Returns the
//! *sum* over unmasked tokens and their count, so gradient accumulation can normalise by the
//! total token count across micro-batches (not by each micro-batch's own count).

use candle_core::{DType, Tensor, D};

use crate::error::{Error, Result};

pub use crate::data::batch::{count_tokens, IGNORE};

/// Sum of token losses and the number of tokens in it.
#[derive(Debug, Clone)]
pub struct LossSum {
    /// Σ −log p(label) over unmasked positions, a scalar f32 tensor (differentiable).
    pub sum: Tensor,
    /// Number of unmasked positions.
    pub tokens: usize,
}

/// Loss of `logits` `[b, s, vocab]` against `labels` (`[b][s]`, unshifted, −100 masked).
pub fn causal_lm_loss(logits: &Tensor, labels: &[Vec<i64>]) -> Result<LossSum> {
    let (b, s, vocab) = logits.dims3()?;
    if labels.len() != b || labels.iter().any(|r| r.len() != s) {
        return Err(Error::Msg(format!("labels must be [{b}][{s}] to match the logits")));
    }
    let device = logits.device();
    if s < 2 {
        return Ok(LossSum { sum: Tensor::zeros((), DType::F32, device)?, tokens: 0 });
    }
    let mut targets = Vec::with_capacity(b * (s - 1));
    let mut mask = Vec::with_capacity(b * (s - 1));
    for row in labels {
        for &l in &row[1..] {
            if l == IGNORE {
                targets.push(0u32);
                mask.push(0f32);
            } else if l < 0 || l as usize >= vocab {
                return Err(Error::Msg(format!("label {l} is out of range (vocab {vocab}, or -100 to ignore)")));
            } else {
                targets.push(l as u32);
                mask.push(1f32);
            }
        }
    }
    let tokens = mask.iter().filter(|&&m| m > 0.0).count();
    let n = b * (s - 1);
    let lg = logits.narrow(1, 0, s - 1)?.to_dtype(DType::F32)?.reshape((n, vocab))?;
    let max = lg.max_keepdim(D::Minus1)?.detach();
    let lse = (lg.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + max)?;
    let targets = Tensor::from_vec(targets, (n, 1), device)?;
    let picked = lg.gather(&targets, D::Minus1)?;
    let mask = Tensor::from_vec(mask, (n, 1), device)?;
    let sum = ((lse - picked)? * mask)?.sum_all()?;
    Ok(LossSum { sum, tokens })
}
