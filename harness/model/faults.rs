//! Planted bugs in the model's forward, for mutation testing only (all off by default): each
//! reproduces a real failure so that the property meant to catch it can be shown to fail.

/// Planted forward bugs (see [`crate::mutants`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    /// An eval-only "fast path" whose final norm uses the other family's convention
    /// (the Llama 3.1 `model.eval()` collapse: a separate inference path that drifted).
    pub eval_path_wrong_norm: bool,
    /// Cached decode restarts rope positions at 0 for every chunk.
    pub cache_restarts_positions: bool,
    /// Cached decode ignores the sliding window.
    pub cache_ignores_window: bool,
    /// The causal mask lets each position see the next token.
    pub mask_leaks_next_token: bool,
    /// Every RMSNorm uses candle's fused kernel, which has no backward: gradients stop at the
    /// norms, yet the loss can still fall through the layers after them.
    pub fused_rms_norm: bool,
    /// Only the last decoder layer's norms are fused (no backward): every gradient stays
    /// finite and non-zero, but those of parameters before that layer are wrong.
    pub fused_last_layer_norms: bool,
    /// Only Gemma 3's q/k norms are fused (no backward).
    pub fused_qk_norms: bool,
    /// Eval mode runs a separate fast path that reads the hidden states from a buffer the
    /// decoder never filled: every position gets the same logits, so the argmax collapses.
    pub eval_path_unfilled_buffer: bool,
    /// Every RMSNorm divides by `√mean(x²)` without epsilon: an all-zero input (an untrained
    /// token's embedding) becomes 0/0 = NaN.
    pub norm_without_eps: bool,
    /// Every RMSNorm squares its input in the model dtype: in fp16, |x| > 256 overflows to inf
    /// and the norm returns zeros (Gemma's scaled activations reach hundreds).
    pub norm_variance_in_half: bool,
    /// Dropout stays active in eval mode (a module left in train mode: PEFT's `get_peft_model`
    /// returning an eval-mode model in train mode, the first cause named for a QLoRA adapter
    /// that predicts differently after save and reload).
    pub eval_keeps_dropout: bool,
    /// Train mode applies no dropout (a dropout module built with p = 0, or never called).
    pub train_ignores_dropout: bool,
}
