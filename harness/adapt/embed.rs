//! LoRA on the embedding, PEFT's `lora_embedding_A/B`: `embed(x) + (A[:, x]ᵀ·Bᵀ)·scale`.
//!
//! The delta is part of `embed_tokens`' output, so it is added before Gemma's √hidden
//! scaling of the embeddings.

use candle_core::{DType, Tensor};

use crate::error::Result;

/// LoRA on the embedding.
#[derive(Debug, Clone)]
pub struct EmbedLora {
    /// `[r, vocab]`.
    pub a: Tensor,
    /// `[hidden, r]`.
    pub b: Tensor,
    /// `alpha / r` or `alpha / √r`.
    pub scale: f64,
}

impl EmbedLora {
    /// The delta for the flattened token ids `flat_ids` (`[n]`, u32): `[n, hidden]` in `dtype`.
    pub fn delta(&self, flat_ids: &Tensor, dtype: DType) -> Result<Tensor> {
        let after_a = self.a.t()?.to_dtype(dtype)?.contiguous()?.index_select(flat_ids, 0)?; // [n, r]
        Ok((after_a.matmul(&self.b.t()?.to_dtype(dtype)?)? * self.scale)?)
    }
}
