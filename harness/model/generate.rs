//! Greedy generation, with and without the KV cache; the two must give the same tokens.

use candle_core::{DType, Tensor, D};

use crate::error::Result;
use crate::model::transformer::{Mode, Transformer};

/// Greedily extend each row of `prompt` (`[batch, seq]`) by `new_tokens` tokens, decoding one
/// position at a time from the KV cache. Returns the new tokens, `[batch][new_tokens]`.
pub fn greedy_cached(model: &Transformer, prompt: &Tensor, new_tokens: usize) -> Result<Vec<Vec<u32>>> {
    let mut cache = model.new_cache();
    let (b, _) = prompt.dims2()?;
    let mut out = vec![Vec::with_capacity(new_tokens); b];
    let mut logits = model.forward_cached(prompt, &mut cache, Mode::Eval)?;
    for step in 0..new_tokens {
        let next = last_argmax(&logits)?;
        for (row, &t) in out.iter_mut().zip(&next) {
            row.push(t);
        }
        if step + 1 < new_tokens {
            let ids = Tensor::from_vec(next, (b, 1), model.device())?;
            logits = model.forward_cached(&ids, &mut cache, Mode::Eval)?;
        }
    }
    Ok(out)
}

/// The same as [`greedy_cached`] but re-running the full forward on the whole sequence at
/// every step (the reference the cache must reproduce).
pub fn greedy_uncached(model: &Transformer, prompt: &Tensor, new_tokens: usize) -> Result<Vec<Vec<u32>>> {
    let (b, _) = prompt.dims2()?;
    let mut seq = prompt.to_dtype(DType::U32)?.to_device(model.device())?;
    let mut out = vec![Vec::with_capacity(new_tokens); b];
    for _ in 0..new_tokens {
        let logits = model.forward(&seq, Mode::Eval)?;
        let next = last_argmax(&logits)?;
        for (row, &t) in out.iter_mut().zip(&next) {
            row.push(t);
        }
        let col = Tensor::from_vec(next, (b, 1), model.device())?;
        seq = Tensor::cat(&[&seq, &col], 1)?;
    }
    Ok(out)
}

/// Argmax of the last position of logits `[batch, seq, vocab]`, one id per row.
pub fn last_argmax(logits: &Tensor) -> Result<Vec<u32>> {
    let s = logits.dim(1)?;
    let last = logits.narrow(1, s - 1, 1)?.squeeze(1)?.to_dtype(DType::F32)?;
    Ok(last.argmax(D::Minus1)?.to_vec1::<u32>()?)
}
