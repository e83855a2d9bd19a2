//! Untrained tokens: rows of `embed_tokens` / `lm_head` that are (near) zero, as in Llama-3
//! base's reserved and chat-template tokens. Detect them, fix them to the mean of the trained
//! rows (as Unsloth does), or refuse to train on data that contains them while those modules
//! are frozen — never a silent NaN.

use candle_core::{DType, Tensor};

use crate::error::{Error, Result};
use crate::weights::Weights;

/// What to do when the training data contains untrained tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UntrainedPolicy {
    /// Error when such tokens occur in a batch while `embed_tokens`/`lm_head` are frozen;
    /// when they are trainable, fix the rows to the mean first (zero rows amplify gradients
    /// by 1/√eps per RMSNorm and overflow f32 in deep models).
    Refuse,
    /// Set untrained rows to the mean of the trained rows before training.
    FixMean,
}

/// Default threshold on a row's largest |value|: only (near-)exact zeros count.
pub const DEFAULT_THRESHOLD: f32 = 1e-16;

/// Row ids of `[vocab, hidden]` matrix `t` whose largest |value| is ≤ `threshold`.
pub fn zero_rows(t: &Tensor, threshold: f32) -> Result<Vec<u32>> {
    let rows = t.to_dtype(DType::F32)?.abs()?.max_keepdim(1)?.flatten_all()?.to_vec1::<f32>()?;
    Ok(rows.iter().enumerate().filter(|(_, &m)| m <= threshold).map(|(i, _)| i as u32).collect())
}

/// Untrained token ids in `weights`: the union over `embed_tokens` and an untied `lm_head`.
pub fn detect(weights: &Weights, threshold: f32) -> Result<Vec<u32>> {
    let mut ids = Vec::new();
    for name in crate::weights::token_matrices(weights) {
        ids.extend(zero_rows(&weights[name], threshold)?);
    }
    ids.sort_unstable();
    ids.dedup();
    Ok(ids)
}

/// Set rows `ids` of `embed_tokens` and `lm_head` to the mean of the other rows.
pub fn fix_mean(weights: &mut Weights, ids: &[u32]) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    for name in crate::weights::token_matrices(weights).into_iter().map(str::to_string).collect::<Vec<_>>() {
        let t = &weights[&name];
        let (rows, cols) = t.dims2()?;
        let host = t.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        let trained: Vec<usize> = (0..rows).filter(|r| !ids.contains(&(*r as u32))).collect();
        if trained.is_empty() {
            return Err(Error::Msg(format!("tensor `{name}`: every row is untrained; nothing to take the mean of")));
        }
        let mut mean = vec![0f64; cols];
        for &r in &trained {
            for (m, v) in mean.iter_mut().zip(&host[r]) {
                *m += *v as f64;
            }
        }
        let mean: Vec<f32> = mean.iter().map(|m| (m / trained.len() as f64) as f32).collect();
        let mut out = host;
        for &i in ids {
            out[i as usize] = mean.clone();
        }
        let flat: Vec<f32> = out.into_iter().flatten().collect();
        let fixed = Tensor::from_vec(flat, (rows, cols), t.device())?.to_dtype(t.dtype())?;
        weights.insert(name, fixed);
    }
    Ok(())
}

/// The untrained ids that occur in `ids`.
pub fn occurring(untrained: &[u32], ids: &[Vec<u32>]) -> Vec<u32> {
    let mut found: Vec<u32> = ids.iter().flatten().copied().filter(|t| untrained.binary_search(t).is_ok()).collect();
    found.sort_unstable();
    found.dedup();
    found
}
