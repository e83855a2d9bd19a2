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

/// Seeded sampling (temperature 1) of `new_tokens` tokens after each row of `prompt`, with
/// logits from `logits_of` on the whole sequence so far. The draw comes from a ChaCha stream
/// on the host: same logits and seed → same tokens.
pub fn sample_with(
    logits_of: impl Fn(&Tensor) -> Result<Tensor>,
    prompt: &Tensor,
    new_tokens: usize,
    seed: u64,
) -> Result<Vec<Vec<u32>>> {
    use rand_core::RngCore;
    let mut rng = crate::weights::stream(seed, "sampling");
    let (b, _) = prompt.dims2()?;
    let mut seq = prompt.to_dtype(DType::U32)?;
    let mut out = vec![Vec::with_capacity(new_tokens); b];
    for _ in 0..new_tokens {
        let logits = logits_of(&seq)?;
        let s = logits.dim(1)?;
        let last = logits.narrow(1, s - 1, 1)?.squeeze(1)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let mut next = Vec::with_capacity(b);
        for row in &last {
            let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let w: Vec<f64> = row.iter().map(|&z| ((z - max) as f64).exp()).collect();
            let total: f64 = w.iter().sum();
            let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * total;
            let mut acc = 0.0;
            let mut pick = w.len() - 1;
            for (i, wi) in w.iter().enumerate() {
                acc += wi;
                if u < acc {
                    pick = i;
                    break;
                }
            }
            next.push(pick as u32);
        }
        for (row, &t) in out.iter_mut().zip(&next) {
            row.push(t);
        }
        let col = Tensor::from_vec(next, (b, 1), seq.device())?;
        seq = Tensor::cat(&[&seq, &col], 1)?;
    }
    Ok(out)
}

/// Greedy generation with logits from `logits_of` on the whole sequence at every step.
pub fn greedy_with(
    logits_of: impl Fn(&Tensor) -> Result<Tensor>,
    prompt: &Tensor,
    new_tokens: usize,
) -> Result<Vec<Vec<u32>>> {
    let (b, _) = prompt.dims2()?;
    let mut seq = prompt.to_dtype(DType::U32)?;
    let mut out = vec![Vec::with_capacity(new_tokens); b];
    for _ in 0..new_tokens {
        let next = last_argmax(&logits_of(&seq)?)?;
        for (row, &t) in out.iter_mut().zip(&next) {
            row.push(t);
        }
        let col = Tensor::from_vec(next, (b, 1), seq.device())?;
        seq = Tensor::cat(&[&seq, &col], 1)?;
    }
    Ok(out)
}
