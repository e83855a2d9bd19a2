//! The decoder-only transformer for every family, loaded candle-style with `load(vb, spec)`.
//!
//! One file serves Llama and Gemma 1/2/3 because they differ in a handful of switches that
//! the spec already names (norm convention, embedding scale, activation, sandwich norms,
//! q/k norms, soft-caps, per-layer window and rope). Forward runs in [`Mode::Train`] or
//! [`Mode::Eval`] on the same path: dropout is the only difference, and only when p > 0.

use std::sync::Mutex;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::VarBuilder;
use rand_chacha::ChaCha8Rng;

use crate::adapt::linear::{Base, Ctx, Linear};
use crate::error::{Error, Result};
use crate::model::cache::KvCache;
use crate::model::layers::{
    apply_rope, dropout, mask_with_lookahead, repeat_kv, rope_tables, soft_cap, softmax_last, RmsNorm,
};
use crate::spec::ArchSpec;

/// Train or eval mode. Without dropout the two must give bitwise identical logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Dropout active (when its probability is > 0).
    Train,
    /// Dropout off.
    Eval,
}

#[derive(Debug, Clone)]
struct Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
}

#[derive(Debug, Clone)]
struct Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
    gelu: bool,
}

impl Mlp {
    fn forward(&self, x: &Tensor, ctx: &Ctx) -> Result<Tensor> {
        let g = self.gate.forward_ctx(x, ctx)?;
        // Gemma: tanh-approximate gelu (candle's `gelu` is the tanh form); Llama: silu.
        let g = if self.gelu { g.gelu()? } else { g.silu()? };
        self.down.forward_ctx(&(g * self.up.forward_ctx(x, ctx)?)?, ctx)
    }
}

/// LoRA on the embedding: `embed(x) + (A[:, x]ᵀ·Bᵀ)·scale` (PEFT `lora_embedding_A/B`).
#[derive(Debug, Clone)]
pub struct EmbedLora {
    /// `[r, vocab]`.
    pub a: Tensor,
    /// `[hidden, r]`.
    pub b: Tensor,
    /// `alpha / r` or `alpha / √r`.
    pub scale: f64,
}

/// One decoder layer (norms, attention, MLP), loadable on its own to stream a model too large
/// for memory through [`Transformer::forward_streamed`].
#[derive(Debug, Clone)]
pub struct Layer {
    input_norm: RmsNorm,
    attn: Attention,
    post_attn_norm: RmsNorm,
    /// Gemma 2/3 only: (pre_feedforward, post_feedforward).
    ff_norms: Option<(RmsNorm, RmsNorm)>,
    mlp: Mlp,
}

impl Layer {
    /// The layer's projections by path inside the layer (`self_attn.q_proj`, `mlp.up_proj`).
    pub fn linears_mut(&mut self) -> Vec<(&'static str, &mut Linear)> {
        vec![
            ("self_attn.q_proj", &mut self.attn.q),
            ("self_attn.k_proj", &mut self.attn.k),
            ("self_attn.v_proj", &mut self.attn.v),
            ("self_attn.o_proj", &mut self.attn.o),
            ("mlp.gate_proj", &mut self.mlp.gate),
            ("mlp.up_proj", &mut self.mlp.up),
            ("mlp.down_proj", &mut self.mlp.down),
        ]
    }
}

/// Planted bugs for mutation testing (see [`crate::mutants`]); all off by default. Each
/// reproduces a real failure so that the property meant to catch it can be shown to fail.
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
}

/// The synthetic (or loaded) model.
#[derive(Debug)]
pub struct Transformer {
    spec: ArchSpec,
    embed: Tensor,
    embed_lora: Option<EmbedLora>,
    layers: Vec<Layer>,
    norm: RmsNorm,
    lm_head: Linear,
    device: Device,
    dropout_rng: Mutex<ChaCha8Rng>,
    faults: Faults,
}

/// Rows of the output head multiplied at a time by [`Transformer::forward_streamed`].
pub const HEAD_CHUNK_ROWS: usize = 16_384;

/// Bases supplied instead of dense weights from the var builder, by module path
/// (e.g. `model.layers.0.self_attn.q_proj`).
pub type Bases = std::collections::BTreeMap<String, Base>;

fn linear(vb: &VarBuilder, out: usize, inp: usize, name: &str, bases: &Bases) -> Result<Linear> {
    let path = if vb.prefix().is_empty() { name.to_string() } else { format!("{}.{name}", vb.prefix()) };
    match bases.get(&path) {
        Some(base) => {
            let l = Linear { base: base.clone(), lora: None, force_compute_dtype: None };
            if l.dims() != (out, inp) {
                return Err(Error::Msg(format!("{path}: base has shape {:?}, expected [{out}, {inp}]", l.dims())));
            }
            Ok(l)
        }
        None => Ok(Linear::dense(vb.get((out, inp), &format!("{name}.weight"))?)),
    }
}

fn norm(vb: &VarBuilder, n: usize, name: &str, spec: &ArchSpec) -> Result<RmsNorm> {
    Ok(RmsNorm::new(vb.get(n, &format!("{name}.weight"))?, spec.rms_norm_eps, spec.family.is_gemma()))
}

impl Transformer {
    /// Build from a var builder rooted at the checkpoint root (HF names, `model.` prefix).
    pub fn load(vb: VarBuilder, spec: &ArchSpec) -> Result<Self> {
        Self::load_with_bases(vb, spec, &Bases::new())
    }

    /// [`Transformer::load`] with some projections given as ready bases (e.g. 4-bit).
    pub fn load_with_bases(vb: VarBuilder, spec: &ArchSpec, bases: &Bases) -> Result<Self> {
        let mut t = Self::load_shell(vb.clone(), spec, bases)?;
        t.layers = (0..spec.num_layers).map(|i| Self::load_layer(&vb, spec, i, bases)).collect::<Result<_>>()?;
        Ok(t)
    }

    /// Decoder layer `i` from `vb` (the model's root).
    pub fn load_layer(vb: &VarBuilder, spec: &ArchSpec, i: usize, bases: &Bases) -> Result<Layer> {
        let (h, hd) = (spec.hidden_size, spec.head_dim);
        let lb = vb.pp("model").pp(format!("layers.{i}"));
        let ab = lb.pp("self_attn");
        let attn = Attention {
            q: linear(&ab, spec.num_heads * hd, h, "q_proj", bases)?,
            k: linear(&ab, spec.num_kv_heads * hd, h, "k_proj", bases)?,
            v: linear(&ab, spec.num_kv_heads * hd, h, "v_proj", bases)?,
            o: linear(&ab, h, spec.num_heads * hd, "o_proj", bases)?,
            q_norm: if spec.family.has_qk_norm() { Some(norm(&ab, hd, "q_norm", spec)?) } else { None },
            k_norm: if spec.family.has_qk_norm() { Some(norm(&ab, hd, "k_norm", spec)?) } else { None },
        };
        let mb = lb.pp("mlp");
        let mlp = Mlp {
            gate: linear(&mb, spec.intermediate_size, h, "gate_proj", bases)?,
            up: linear(&mb, spec.intermediate_size, h, "up_proj", bases)?,
            down: linear(&mb, h, spec.intermediate_size, "down_proj", bases)?,
            gelu: spec.family.is_gemma(),
        };
        let ff_norms = if spec.family.has_sandwich_norms() {
            Some((norm(&lb, h, "pre_feedforward_layernorm", spec)?, norm(&lb, h, "post_feedforward_layernorm", spec)?))
        } else {
            None
        };
        Ok(Layer {
            input_norm: norm(&lb, h, "input_layernorm", spec)?,
            attn,
            post_attn_norm: norm(&lb, h, "post_attention_layernorm", spec)?,
            ff_norms,
            mlp,
        })
    }

    /// The model without decoder layers (embedding, final norm, head): run it with
    /// [`Transformer::forward_streamed`], which takes the layers one at a time.
    pub fn load_shell(vb: VarBuilder, spec: &ArchSpec, bases: &Bases) -> Result<Self> {
        spec.validate()?;
        let h = spec.hidden_size;
        let vm = vb.pp("model");
        let embed = vm.get((spec.vocab_size, h), "embed_tokens.weight")?;
        let layers = Vec::new();
        let final_norm = norm(&vm, h, "norm", spec)?;
        let lm_head = if spec.tie_word_embeddings {
            Linear::dense(embed.clone())
        } else {
            linear(&vb, spec.vocab_size, h, "lm_head", bases)?
        };
        Ok(Transformer {
            spec: spec.clone(),
            device: embed.device().clone(),
            embed,
            embed_lora: None,
            layers,
            norm: final_norm,
            lm_head,
            dropout_rng: Mutex::new(crate::weights::stream(0, "dropout")),
            faults: Faults::default(),
        })
    }

    /// Build from named weights (e.g. [`crate::weights::generate`]) on their device.
    pub fn from_weights(spec: &ArchSpec, weights: &crate::weights::Weights) -> Result<Self> {
        let device =
            weights.values().next().map(|t| t.device().clone()).ok_or_else(|| Error::Msg("no weights given".into()))?;
        let map = weights.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        Self::load(VarBuilder::from_tensors(map, spec.dtype, &device), spec)
    }

    /// The same model with planted bugs (mutation testing only).
    pub fn with_faults(mut self, faults: Faults) -> Self {
        self.set_faults(faults);
        self
    }

    /// Plant bugs in place (mutation testing only).
    pub fn set_faults(&mut self, faults: Faults) {
        self.faults = faults;
        let fused = faults.fused_rms_norm;
        let no_eps = faults.norm_without_eps;
        let half_var = faults.norm_variance_in_half;
        self.norm.fused = fused;
        self.norm.no_eps = no_eps;
        self.norm.variance_in_input_dtype = half_var;
        let last = self.layers.len().saturating_sub(1);
        for (i, l) in self.layers.iter_mut().enumerate() {
            let layer_fused = fused || (faults.fused_last_layer_norms && i == last);
            for n in [&mut l.input_norm, &mut l.post_attn_norm] {
                n.fused = layer_fused;
                n.no_eps = no_eps;
                n.variance_in_input_dtype = half_var;
            }
            if let Some((a, b)) = &mut l.ff_norms {
                for n in [a, b] {
                    n.fused = layer_fused;
                    n.no_eps = no_eps;
                    n.variance_in_input_dtype = half_var;
                }
            }
            for n in [&mut l.attn.q_norm, &mut l.attn.k_norm].into_iter().flatten() {
                n.fused = layer_fused || faults.fused_qk_norms;
                n.no_eps = no_eps;
                n.variance_in_input_dtype = half_var;
            }
        }
    }

    /// The planted bugs of this model (none for a reference model).
    pub fn faults(&self) -> Faults {
        self.faults
    }

    /// Every projection with its PEFT module path (`model.layers.{i}.self_attn.q_proj`, ...,
    /// and `lm_head` when untied), in a fixed order.
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            out.extend(l.linears_mut().into_iter().map(|(p, lin)| (format!("model.layers.{i}.{p}"), lin)));
        }
        if !self.spec.tie_word_embeddings {
            out.push(("lm_head".to_string(), &mut self.lm_head));
        }
        out
    }

    /// Read-only view of [`Transformer::linears_mut`].
    pub fn linears(&self) -> Vec<(String, &Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.self_attn.q_proj"), &l.attn.q));
            out.push((format!("{p}.self_attn.k_proj"), &l.attn.k));
            out.push((format!("{p}.self_attn.v_proj"), &l.attn.v));
            out.push((format!("{p}.self_attn.o_proj"), &l.attn.o));
            out.push((format!("{p}.mlp.gate_proj"), &l.mlp.gate));
            out.push((format!("{p}.mlp.up_proj"), &l.mlp.up));
            out.push((format!("{p}.mlp.down_proj"), &l.mlp.down));
        }
        if !self.spec.tie_word_embeddings {
            out.push(("lm_head".to_string(), &self.lm_head));
        }
        out
    }

    /// The embedding matrix `[vocab, hidden]`.
    pub fn embed(&self) -> &Tensor {
        &self.embed
    }

    /// The output head `[vocab, hidden]` (the embedding when tied).
    pub fn lm_head(&self) -> &Linear {
        &self.lm_head
    }

    /// Replace the embedding (e.g. with a trainable `Var`); a tied head follows it when
    /// `retie` (PEFT's `modules_to_save` copy leaves the head on the old matrix otherwise).
    pub fn set_embed(&mut self, t: Tensor, retie: bool) -> Result<()> {
        if t.dims() != self.embed.dims() {
            return Err(Error::Msg(format!("embed_tokens: shape {:?}, expected {:?}", t.dims(), self.embed.dims())));
        }
        if self.spec.tie_word_embeddings && retie {
            self.lm_head.base = Base::Dense(t.clone());
        }
        self.embed = t;
        Ok(())
    }

    /// Replace an untied head's dense weight (e.g. with a trainable `Var`).
    pub fn set_lm_head(&mut self, t: Tensor) -> Result<()> {
        if self.spec.tie_word_embeddings {
            return Err(Error::Msg("lm_head is tied to embed_tokens; set the embedding instead".into()));
        }
        self.lm_head.base = Base::Dense(t);
        Ok(())
    }

    /// Replace the frozen embedding and head together, possibly with another vocabulary size
    /// (a base whose vocabulary was resized, as a PEFT adapter saved over it carries it). An
    /// untied model needs `head` with as many rows as `embed`; a tied one takes its head from
    /// `embed`, and a `head` given for it must equal `embed`. Call before attaching adapters.
    pub fn set_vocab(&mut self, embed: Tensor, head: Option<Tensor>) -> Result<()> {
        let h = self.spec.hidden_size;
        let (v, eh) = embed.dims2()?;
        if eh != h || v == 0 {
            return Err(Error::Msg(format!("embed_tokens: shape {:?}, expected [vocab, {h}]", embed.dims())));
        }
        if self.embed_lora.is_some() || self.lm_head.lora.is_some() {
            return Err(Error::Msg("the vocabulary must be set before adapters are attached".into()));
        }
        let head = match (self.spec.tie_word_embeddings, head) {
            (true, None) => embed.clone(),
            (true, Some(t)) => {
                let same = t.dims() == embed.dims()
                    && t.to_dtype(DType::F32)?
                        .sub(&embed.to_dtype(DType::F32)?)?
                        .abs()?
                        .max_all()?
                        .to_scalar::<f32>()?
                        == 0.0;
                if !same {
                    return Err(Error::Msg("lm_head is tied to embed_tokens but a different head was given".into()));
                }
                embed.clone()
            }
            (false, None) if v == self.spec.vocab_size => match &self.lm_head.base {
                Base::Dense(t) => t.clone(),
                Base::Quant4(_) => return Err(Error::Msg("a 4-bit lm_head cannot be kept".into())),
            },
            (false, None) => {
                return Err(Error::Msg(format!(
                    "the vocabulary changes from {} to {v} rows but no lm_head of that size was given",
                    self.spec.vocab_size
                )))
            }
            (false, Some(t)) => {
                if t.dims() != [v, h] {
                    return Err(Error::Msg(format!("lm_head: shape {:?}, expected [{v}, {h}]", t.dims())));
                }
                t
            }
        };
        self.spec.vocab_size = v;
        self.embed = embed;
        self.lm_head.base = Base::Dense(head);
        Ok(())
    }

    /// Attach (or remove) LoRA on the embedding.
    pub fn set_embed_lora(&mut self, l: Option<EmbedLora>) {
        self.embed_lora = l;
    }

    /// The embedding LoRA, if any.
    pub fn embed_lora(&self) -> Option<&EmbedLora> {
        self.embed_lora.as_ref()
    }

    /// Planted bug (mutants only): run every 4-bit base in `dtype` regardless of its config.
    pub fn force_quant_compute_dtype(&mut self, dtype: DType) {
        for (_, l) in self.linears_mut() {
            l.force_compute_dtype = Some(dtype);
        }
    }

    /// The spec the model was built from.
    pub fn spec(&self) -> &ArchSpec {
        &self.spec
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Reseed the dropout stream (train mode with p > 0 is reproducible given the seed).
    pub fn set_dropout_seed(&self, seed: u64) {
        *self.dropout_rng.lock().unwrap_or_else(|e| e.into_inner()) = crate::weights::stream(seed, "dropout");
    }

    /// Position of the dropout stream (32-bit words drawn since its seed), for checkpoints.
    pub fn dropout_word_pos(&self) -> u128 {
        self.dropout_rng.lock().unwrap_or_else(|e| e.into_inner()).get_word_pos()
    }

    /// Move the dropout stream to `pos` (after [`Transformer::set_dropout_seed`]).
    pub fn set_dropout_word_pos(&self, pos: u128) {
        self.dropout_rng.lock().unwrap_or_else(|e| e.into_inner()).set_word_pos(pos);
    }

    /// Logits `[batch, seq, vocab]` (in the model dtype) for `ids` `[batch, seq]` (u32/i64).
    pub fn forward(&self, ids: &Tensor, mode: Mode) -> Result<Tensor> {
        self.forward_inner(ids, None, mode, None, None)
    }

    /// [`Transformer::forward`] with transformers' `attention_mask` (`[batch, seq]`, 1 = token,
    /// 0 = padding that no position attends to; `None` = all ones). Positions stay `0..seq`.
    pub fn forward_masked(&self, ids: &Tensor, attention_mask: Option<&Tensor>, mode: Mode) -> Result<Tensor> {
        self.forward_inner(ids, None, mode, None, attention_mask)
    }

    /// [`Transformer::forward`] for a shell ([`Transformer::load_shell`]): each decoder layer
    /// comes from `next_layer(i)` when it is needed and is dropped after, so peak memory is the
    /// shell plus one layer.
    pub fn forward_streamed(
        &self,
        ids: &Tensor,
        mode: Mode,
        next_layer: &mut dyn FnMut(usize) -> Result<Layer>,
    ) -> Result<Tensor> {
        self.forward_inner(ids, None, mode, Some(next_layer), None)
    }

    /// Logits for the new positions `ids`, appending their keys and values to `cache`.
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache, mode: Mode) -> Result<Tensor> {
        self.forward_inner(ids, Some(cache), mode, None, None)
    }

    /// A fresh cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.spec.num_layers)
    }

    /// The planted eval-only fast path (mutants only): the hidden states come from a buffer
    /// that the decoder never wrote, so every position's logits are the head of `norm(0)`.
    fn eval_fast_path_unfilled_buffer(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let buffer = Tensor::zeros((b, s, self.spec.hidden_size), self.spec.dtype, &self.device)?;
        let ctx = Ctx { train: false, rng: &self.dropout_rng };
        let mut logits = self.lm_head.forward_ctx(&self.norm.forward(&buffer)?, &ctx)?;
        if let Some(cap) = self.spec.final_logit_softcapping {
            logits = soft_cap(&logits, cap)?;
        }
        Ok(logits)
    }

    fn forward_inner(
        &self,
        ids: &Tensor,
        mut cache: Option<&mut KvCache>,
        mode: Mode,
        mut next_layer: Option<&mut dyn FnMut(usize) -> Result<Layer>>,
        attention_mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        if mode == Mode::Eval && cache.is_none() && self.faults.eval_path_unfilled_buffer {
            return self.eval_fast_path_unfilled_buffer(ids);
        }
        let spec = &self.spec;
        let (b, s) =
            ids.dims2().map_err(|_| Error::Msg(format!("input ids must be [batch, seq], got {:?}", ids.dims())))?;
        if s == 0 {
            return Err(Error::Msg("input ids have zero length".into()));
        }
        let ids = ids.to_dtype(DType::U32)?.to_device(&self.device)?;
        let max_id = ids.flatten_all()?.max(0)?.to_scalar::<u32>()?;
        if max_id as usize >= spec.vocab_size {
            return Err(Error::Msg(format!("token id {max_id} is out of range (vocab_size {})", spec.vocab_size)));
        }
        // Padding as an additive bias on the attention scores of its keys: the most negative
        // finite f32, as transformers' eager attention uses, so a query that sees only padding
        // (left padding's first positions) gets a uniform, finite distribution, not NaN.
        let pad_bias = match attention_mask {
            None => None,
            Some(_) if cache.is_some() => {
                return Err(Error::Msg("an attention mask with a KV cache is not supported".into()))
            }
            Some(m) => {
                if m.dims() != [b, s] {
                    return Err(Error::Msg(format!("attention_mask is {:?}, expected [{b}, {s}]", m.dims())));
                }
                let keep = m.to_dtype(DType::F32)?.to_device(&self.device)?;
                Some(((keep.affine(-1.0, 1.0)? * f32::MIN as f64)?).reshape((b, 1, 1, s))?)
            }
        };
        let offset = cache.as_ref().map_or(0, |c| c.len());
        let cached = cache.is_some();
        let rope_offset = if cached && self.faults.cache_restarts_positions { 0 } else { offset };
        let lookahead = usize::from(self.faults.mask_leaks_next_token);
        let dtype = spec.dtype;
        let train_dropout = mode == Mode::Train;

        let flat_ids = ids.flatten_all()?;
        let mut x = self.embed.to_dtype(dtype)?.index_select(&flat_ids, 0)?.reshape((b, s, spec.hidden_size))?;
        if let Some(l) = &self.embed_lora {
            // PEFT: the delta is part of embed_tokens' output, before Gemma's √hidden scaling.
            let after_a = l.a.t()?.to_dtype(dtype)?.contiguous()?.index_select(&flat_ids, 0)?; // [b·s, r]
            let d = (after_a.matmul(&l.b.t()?.to_dtype(dtype)?)? * l.scale)?;
            x = (x + d.reshape((b, s, spec.hidden_size))?)?;
        }
        let ctx = Ctx { train: train_dropout, rng: &self.dropout_rng };
        if spec.family.is_gemma() {
            // transformers: the normaliser is a tensor in the model dtype, so √hidden is rounded first.
            let normaliser = Tensor::new((spec.hidden_size as f64).sqrt() as f32, &self.device)?.to_dtype(dtype)?;
            x = x.broadcast_mul(&normaliser)?;
        }

        let mut masks: Vec<(Option<usize>, Tensor)> = Vec::new();
        let mut ropes: Vec<(crate::spec::Rope, Tensor, Tensor)> = Vec::new();
        let streamed = next_layer.is_some();
        for i in 0..spec.num_layers {
            let loaded;
            let layer = match (self.layers.get(i), next_layer.as_mut()) {
                (Some(l), _) => l,
                (None, Some(load)) => {
                    loaded = load(i)?;
                    &loaded
                }
                (None, None) => {
                    return Err(Error::Msg(format!(
                        "decoder layer {i} is not loaded (a shell runs with forward_streamed)"
                    )))
                }
            };
            let window = if cached && self.faults.cache_ignores_window { None } else { spec.window_for(i) };
            let mask = match masks.iter().find(|(w, _)| *w == window) {
                Some((_, m)) => m.clone(),
                None => {
                    let m = mask_with_lookahead(s, offset, window, lookahead, &self.device)?;
                    masks.push((window, m.clone()));
                    m
                }
            };
            let rope = *spec.rope_for(i);
            let (cos, sin) = match ropes.iter().find(|(r, _, _)| *r == rope) {
                Some((_, c, s_)) => (c.clone(), s_.clone()),
                None => {
                    let (c, s_) = rope_tables(&rope, spec.head_dim, rope_offset, s, dtype, &self.device)?;
                    ropes.push((rope, c.clone(), s_.clone()));
                    (c, s_)
                }
            };

            let residual = x.clone();
            let hnorm = layer.input_norm.forward(&x)?;
            let attn = self.attention(
                i,
                &layer.attn,
                &hnorm,
                &mask,
                pad_bias.as_ref(),
                &cos,
                &sin,
                cache.as_deref_mut(),
                &ctx,
            )?;
            let attn = if spec.family.has_sandwich_norms() { layer.post_attn_norm.forward(&attn)? } else { attn };
            let attn = self.residual_dropout(&attn, train_dropout)?;
            x = (residual + attn)?;

            let residual = x.clone();
            let hnorm = match &layer.ff_norms {
                Some((pre, _)) => pre.forward(&x)?,
                None => layer.post_attn_norm.forward(&x)?,
            };
            let mut ff = layer.mlp.forward(&hnorm, &ctx)?;
            if let Some((_, post)) = &layer.ff_norms {
                ff = post.forward(&ff)?;
            }
            let ff = self.residual_dropout(&ff, train_dropout)?;
            x = (residual + ff)?;
        }
        let x = if mode == Mode::Eval && self.faults.eval_path_wrong_norm {
            self.norm.with_convention_flipped().forward(&x)?
        } else {
            self.norm.forward(&x)?
        };
        // A streamed model is one too large for memory: multiply its head in row chunks.
        let mut logits = if streamed {
            self.lm_head.forward_chunked(&x, HEAD_CHUNK_ROWS, &ctx)?
        } else {
            self.lm_head.forward_ctx(&x, &ctx)?
        };
        if let Some(cap) = spec.final_logit_softcapping {
            logits = soft_cap(&logits, cap)?;
        }
        Ok(logits)
    }

    fn residual_dropout(&self, x: &Tensor, train: bool) -> Result<Tensor> {
        if !train || self.spec.residual_dropout <= 0.0 {
            return Ok(x.clone());
        }
        let mut rng = self.dropout_rng.lock().unwrap_or_else(|e| e.into_inner());
        dropout(x, self.spec.residual_dropout, &mut rng)
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: usize,
        a: &Attention,
        x: &Tensor,
        mask: &Tensor,
        pad_bias: Option<&Tensor>,
        cos: &Tensor,
        sin: &Tensor,
        cache: Option<&mut KvCache>,
        ctx: &Ctx,
    ) -> Result<Tensor> {
        let train = ctx.train;
        let spec = &self.spec;
        let (b, s, _) = x.dims3()?;
        let hd = spec.head_dim;
        let q = a.q.forward_ctx(x, ctx)?.reshape((b, s, spec.num_heads, hd))?;
        let k = a.k.forward_ctx(x, ctx)?.reshape((b, s, spec.num_kv_heads, hd))?;
        let v = a.v.forward_ctx(x, ctx)?.reshape((b, s, spec.num_kv_heads, hd))?;
        let (q, k) = match (&a.q_norm, &a.k_norm) {
            (Some(qn), Some(kn)) => (qn.forward(&q)?, kn.forward(&k)?),
            _ => (q, k),
        };
        let q = apply_rope(&q.transpose(1, 2)?.contiguous()?, cos, sin)?;
        let k = apply_rope(&k.transpose(1, 2)?.contiguous()?, cos, sin)?;
        let v = v.transpose(1, 2)?.contiguous()?;
        let (k, v) = match cache {
            Some(c) => c.append(layer, k, v)?,
            None => (k, v),
        };
        let n_rep = spec.num_heads / spec.num_kv_heads;
        let k = repeat_kv(&k, n_rep)?.contiguous()?;
        let v = repeat_kv(&v, n_rep)?.contiguous()?;

        let mut scores = (q.matmul(&k.t()?)? * spec.attn_scale())?;
        if let Some(cap) = spec.attn_logit_softcapping {
            scores = soft_cap(&scores, cap)?;
        }
        let mut scores = scores.to_dtype(DType::F32)?.broadcast_add(mask)?;
        if let Some(p) = pad_bias {
            scores = scores.broadcast_add(p)?;
        }
        let mut probs = softmax_last(&scores)?.to_dtype(spec.dtype)?;
        if train && spec.attention_dropout > 0.0 {
            let mut rng = self.dropout_rng.lock().unwrap_or_else(|e| e.into_inner());
            probs = dropout(&probs, spec.attention_dropout, &mut rng)?;
        }
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, s, spec.num_heads * hd))?;
        a.o.forward_ctx(&out, ctx)
    }
}

/// Argmax over the last dimension of logits `[.., vocab]`, as u32.
pub fn argmax_last(logits: &Tensor) -> Result<Tensor> {
    Ok(logits.to_dtype(DType::F32)?.argmax(D::Minus1)?)
}
