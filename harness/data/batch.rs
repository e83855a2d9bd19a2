//! A micro-batch of token ids and labels, the label that keeps a position out of the loss,
//! and the count of positions that enter it.

use candle_core::{Device, Tensor};

use crate::error::{Error, Result};

/// The label of a position that does not enter the loss (PyTorch's `ignore_index`).
pub const IGNORE: i64 = -100;

/// Positions that enter the loss after the causal shift: labels other than [`IGNORE`],
/// without each row's first (it has no preceding token to predict it from).
pub fn count_tokens(labels: &[Vec<i64>]) -> usize {
    labels.iter().map(|row| row.iter().skip(1).filter(|&&l| l != IGNORE).count()).sum()
}

/// A micro-batch: token ids and labels (`-100` masks a position), `[batch][seq]`, and which
/// positions attention may read.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Token ids.
    pub ids: Vec<Vec<u32>>,
    /// Labels, unshifted (position t's label is token t; the loss shifts).
    pub labels: Vec<Vec<i64>>,
    /// transformers' `attention_mask` (1 = a real token, 0 = padding no position may attend
    /// to); `None` means all ones. Right padding needs none (causal attention keeps padding
    /// after a sequence invisible to it); left padding does. Rope positions stay `0..seq` for
    /// every row, as transformers computes them when training.
    pub attention_mask: Option<Vec<Vec<u8>>>,
}

impl Batch {
    /// Left-pad `seqs` with `pad` to the longest: padded positions get label −100 and
    /// attention mask 0.
    pub fn left_padded(seqs: &[Vec<u32>], pad: u32) -> Self {
        let s = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let fill = |q: &Vec<u32>| s - q.len();
        let ids = seqs.iter().map(|q| std::iter::repeat_n(pad, fill(q)).chain(q.iter().copied()).collect()).collect();
        let labels = seqs
            .iter()
            .map(|q| std::iter::repeat_n(IGNORE, fill(q)).chain(q.iter().map(|&t| t as i64)).collect())
            .collect();
        let mask =
            seqs.iter().map(|q| std::iter::repeat_n(0u8, fill(q)).chain(q.iter().map(|_| 1)).collect()).collect();
        Batch { ids, labels, attention_mask: Some(mask) }
    }

    /// The attention mask as an f32 `[batch, seq]` tensor on `device`, or `None` (all ones);
    /// a mask whose shape differs from the ids' is an error.
    pub fn mask_tensor(&self, device: &Device) -> Result<Option<Tensor>> {
        let Some(m) = &self.attention_mask else { return Ok(None) };
        let (b, s) = (self.ids.len(), self.ids.first().map_or(0, Vec::len));
        if m.len() != b || m.iter().any(|r| r.len() != s) {
            return Err(Error::Msg(format!("attention_mask is not [{b}, {s}] like input_ids")));
        }
        if m.iter().flatten().all(|&x| x == 1) {
            return Ok(None);
        }
        let v: Vec<f32> = m.iter().flatten().map(|&x| f32::from(x != 0)).collect();
        Ok(Some(Tensor::from_vec(v, (b, s), device)?))
    }

    /// Right-pad `seqs` with `pad` to the longest; padded positions get label −100.
    pub fn from_sequences(seqs: &[Vec<u32>], pad: u32) -> Self {
        let s = seqs.iter().map(Vec::len).max().unwrap_or(0);
        let ids = seqs.iter().map(|q| q.iter().copied().chain(std::iter::repeat(pad)).take(s).collect()).collect();
        let labels = seqs
            .iter()
            .map(|q| q.iter().map(|&t| t as i64).chain(std::iter::repeat(IGNORE)).take(s).collect())
            .collect();
        Batch { ids, labels, attention_mask: None }
    }

    /// Positions that enter the loss.
    pub fn tokens(&self) -> usize {
        count_tokens(&self.labels)
    }

    /// The ids as a `[batch, seq]` u32 tensor on `device`.
    pub fn ids_tensor(&self, device: &Device) -> Result<Tensor> {
        let b = self.ids.len();
        let s = self.ids.first().map_or(0, Vec::len);
        Ok(Tensor::from_vec(self.ids.iter().flatten().copied().collect::<Vec<_>>(), (b, s), device)?)
    }
}
