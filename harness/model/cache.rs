//! The KV cache for incremental decoding: per layer, the keys (after rope) and values seen so
//! far, `[batch, kv_heads, seq, head_dim]`, before GQA repetition.
//!
//! Sliding-window layers keep every position too and mask by window, so a cached decode and a
//! full forward see exactly the same keys.

use candle_core::Tensor;

use crate::error::Result;

/// Keys and values of every layer for the positions decoded so far.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    /// An empty cache for `num_layers` layers.
    pub fn new(num_layers: usize) -> Self {
        KvCache { layers: vec![None; num_layers] }
    }

    /// Number of positions cached.
    pub fn len(&self) -> usize {
        match self.layers.first() {
            Some(Some((k, _))) => k.dim(2).unwrap_or(0),
            _ => 0,
        }
    }

    /// True when nothing is cached yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Append `k`, `v` of layer `i` and return the full keys and values.
    pub fn append(&mut self, i: usize, k: Tensor, v: Tensor) -> Result<(Tensor, Tensor)> {
        let slot = &mut self.layers[i];
        let (k, v) = match slot.take() {
            None => (k, v),
            Some((pk, pv)) => (Tensor::cat(&[&pk, &k], 2)?, Tensor::cat(&[&pv, &v], 2)?),
        };
        *slot = Some((k.clone(), v.clone()));
        Ok((k, v))
    }
}
