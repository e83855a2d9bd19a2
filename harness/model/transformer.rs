//! The decoder-only transformer for every family, built the way candle's model files are:
//! each part ([`DecoderLayer`], its attention and MLP) owns a `load(vb, spec, ..)` and a
//! `forward`, and adapters (LoRA, 4-bit bases, `modules_to_save`) are injected as the parts
//! load ([`Inject`]).
//!
//! One file serves Llama and Gemma 1/2/3 because they differ in a handful of switches that
//! the spec already names (norm convention, embedding scale, activation, sandwich norms,
//! q/k norms, soft-caps, per-layer window and rope). Forward runs in [`Mode::Train`] or
//! [`Mode::Eval`] on the same path: dropout is the only difference, and only when p > 0.

use std::sync::Mutex;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use rand_chacha::ChaCha8Rng;

use crate::adapt::dropout::Ctx;
use crate::adapt::embed::EmbedLora;
use crate::adapt::inject::Inject;
use crate::adapt::linear::{Base, Linear};
use crate::error::{Error, Result};
use crate::model::attention::Step;
use crate::model::cache::KvCache;
pub use crate::model::decoder::DecoderLayer;
pub use crate::model::faults::Faults;
use crate::model::layers::{mask_with_lookahead, rope_tables, soft_cap, RmsNorm};
use crate::spec::{ArchSpec, Rope};

/// Train or eval mode. Without dropout the two must give bitwise identical logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Dropout active (when its probability is > 0).
    Train,
    /// Dropout off.
    Eval,
}

/// The synthetic (or loaded) model.
#[derive(Debug)]
pub struct Transformer {
    spec: ArchSpec,
    embed: Tensor,
    embed_lora: Option<EmbedLora>,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    lm_head: Linear,
    device: Device,
    dropout_rng: Mutex<ChaCha8Rng>,
    faults: Faults,
}

/// Rows of the output head multiplied at a time by [`Transformer::forward_streamed`].
pub const HEAD_CHUNK_ROWS: usize = 16_384;

/// Supplies decoder layer `i` to [`Transformer::forward_streamed`].
pub type NextLayer<'a> = &'a mut dyn FnMut(usize) -> Result<DecoderLayer>;

impl Transformer {
    /// Build from a var builder rooted at the checkpoint root (HF names, `model.` prefix).
    pub fn load(vb: VarBuilder, spec: &ArchSpec) -> Result<Self> {
        Self::load_injected(vb, spec, &mut Inject::none())
    }

    /// [`Transformer::load`] with adapters and ready bases injected from `inj` as each part
    /// loads; the trainable parameters are then in `inj` ([`Inject::finish`]).
    pub fn load_injected(vb: VarBuilder, spec: &ArchSpec, inj: &mut Inject) -> Result<Self> {
        let mut t = Self::shell_parts(&vb, spec, inj)?;
        t.layers = (0..spec.num_layers).map(|i| DecoderLayer::load(&vb, spec, i, inj)).collect::<Result<_>>()?;
        t.adapt_shell(inj)?;
        Ok(t)
    }

    /// Decoder layer `i` from `vb` (the model's root), with adapters from `inj`.
    pub fn load_layer(vb: &VarBuilder, spec: &ArchSpec, i: usize, inj: &mut Inject) -> Result<DecoderLayer> {
        DecoderLayer::load(vb, spec, i, inj)
    }

    /// The model without decoder layers (embedding, final norm, head, with their adapters):
    /// run it with [`Transformer::forward_streamed`], which takes the layers one at a time.
    pub fn load_shell(vb: VarBuilder, spec: &ArchSpec, inj: &mut Inject) -> Result<Self> {
        let mut t = Self::shell_parts(&vb, spec, inj)?;
        t.adapt_shell(inj)?;
        Ok(t)
    }

    /// Embedding, final norm and the head's base.
    fn shell_parts(vb: &VarBuilder, spec: &ArchSpec, inj: &Inject) -> Result<Self> {
        spec.validate()?;
        inj.check(spec)?;
        let h = spec.hidden_size;
        let vm = vb.pp("model");
        let embed = vm.get((spec.vocab_size, h), "embed_tokens.weight")?;
        let lm_head = if spec.tie_word_embeddings {
            Linear::dense(embed.clone())
        } else {
            inj.base(vb, spec.vocab_size, h, "lm_head")?
        };
        Ok(Transformer {
            spec: spec.clone(),
            device: embed.device().clone(),
            embed,
            embed_lora: None,
            layers: Vec::new(),
            norm: RmsNorm::load(&vm, h, "norm", spec)?,
            lm_head,
            dropout_rng: Mutex::new(crate::weights::stream(0, "dropout")),
            faults: Faults::default(),
        })
    }

    /// The shell's adapters: LoRA on an untied head, on the embedding, and the trainable
    /// copies of `modules_to_save` (a tied head follows a trained embedding only with
    /// `ensure_weight_tying`; PEFT's default leaves it on the base matrix).
    fn adapt_shell(&mut self, inj: &mut Inject) -> Result<()> {
        if !self.spec.tie_word_embeddings {
            inj.adapt("lm_head", &mut self.lm_head)?;
        }
        self.embed_lora = inj.embed_lora(self.spec.vocab_size, self.spec.hidden_size, &self.device)?;
        let retie = inj.retie();
        for (module, t) in inj.saved_modules(&self.embed, &self.lm_head)? {
            if module == "embed_tokens" {
                if self.spec.tie_word_embeddings && retie {
                    self.lm_head.base = Base::Dense(t.clone());
                }
                self.embed = t;
            } else {
                self.lm_head.base = Base::Dense(t);
            }
        }
        Ok(())
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
        let (fused, no_eps, half) = (faults.fused_rms_norm, faults.norm_without_eps, faults.norm_variance_in_half);
        self.norm.plant(fused, no_eps, half);
        let last = self.layers.len().saturating_sub(1);
        for (i, l) in self.layers.iter_mut().enumerate() {
            let block = fused || (faults.fused_last_layer_norms && i == last);
            l.plant_norms(block, block || faults.fused_qk_norms, no_eps, half);
        }
    }

    /// The planted bugs of this model (none for a reference model).
    pub fn faults(&self) -> Faults {
        self.faults
    }

    /// Every projection with its PEFT module path (`model.layers.{i}.self_attn.q_proj`, ...,
    /// and `lm_head` when untied), in a fixed order.
    pub fn linears(&self) -> Vec<(String, &Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            out.extend(l.projections().map(|(p, lin)| (format!("model.layers.{i}.{p}"), lin)));
        }
        if !self.spec.tie_word_embeddings {
            out.push(("lm_head".to_string(), &self.lm_head));
        }
        out
    }

    /// Mutable [`Transformer::linears`].
    pub fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter_mut().enumerate() {
            out.extend(l.projections_mut().map(|(p, lin)| (format!("model.layers.{i}.{p}"), lin)));
        }
        if !self.spec.tie_word_embeddings {
            out.push(("lm_head".to_string(), &mut self.lm_head));
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
        self.run(ids, mode, None, None, None)
    }

    /// [`Transformer::forward`] with transformers' `attention_mask` (`[batch, seq]`, 1 = token,
    /// 0 = padding that no position attends to; `None` = all ones). Positions stay `0..seq`.
    pub fn forward_masked(&self, ids: &Tensor, attention_mask: Option<&Tensor>, mode: Mode) -> Result<Tensor> {
        self.run(ids, mode, attention_mask, None, None)
    }

    /// [`Transformer::forward`] for a shell ([`Transformer::load_shell`]): each decoder layer
    /// comes from `next_layer(i)` when it is needed and is dropped after, so peak memory is the
    /// shell plus one layer.
    pub fn forward_streamed(&self, ids: &Tensor, mode: Mode, next_layer: NextLayer) -> Result<Tensor> {
        self.run(ids, mode, None, None, Some(next_layer))
    }

    /// Logits for the new positions `ids`, appending their keys and values to `cache`.
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache, mode: Mode) -> Result<Tensor> {
        self.run(ids, mode, None, Some(cache), None)
    }

    /// A fresh cache for this model.
    pub fn new_cache(&self) -> KvCache {
        KvCache::new(self.spec.num_layers)
    }

    fn run(
        &self,
        ids: &Tensor,
        mode: Mode,
        attention_mask: Option<&Tensor>,
        mut cache: Option<&mut KvCache>,
        mut next_layer: Option<NextLayer>,
    ) -> Result<Tensor> {
        crate::device::pin_thread_count();
        if mode == Mode::Eval && cache.is_none() && self.faults.eval_path_unfilled_buffer {
            return self.eval_fast_path_unfilled_buffer(ids);
        }
        let (ids, b, s) = self.check_ids(ids)?;
        let pad_bias = self.pad_bias(attention_mask, cache.is_some(), b, s)?;
        let dropout_on = match mode {
            Mode::Train => !self.faults.train_ignores_dropout,
            Mode::Eval => self.faults.eval_keeps_dropout,
        };
        let ctx = Ctx { train: dropout_on, rng: &self.dropout_rng };
        let mut x = self.embed_tokens(&ids, b, s)?;
        let mut positions = Positions::new(self, s, cache.as_ref().map(|c| c.len()));
        let streamed = next_layer.is_some();
        for i in 0..self.spec.num_layers {
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
            let (mask, cos, sin) = positions.for_layer(i)?;
            let step = Step { mask: &mask, pad_bias: pad_bias.as_ref(), cos: &cos, sin: &sin, ctx: &ctx };
            x = layer.forward(&x, &step, cache.as_deref_mut())?;
        }
        let x = if mode == Mode::Eval && self.faults.eval_path_wrong_norm {
            self.norm.with_convention_flipped().forward(&x)?
        } else {
            self.norm.forward(&x)?
        };
        // A streamed model is one too large for memory: multiply its head in row chunks.
        let logits = if streamed {
            self.lm_head.forward_chunked(&x, HEAD_CHUNK_ROWS, &ctx)?
        } else {
            self.lm_head.forward_ctx(&x, &ctx)?
        };
        self.cap_logits(logits)
    }

    /// `ids` as u32 on the model's device with `(batch, seq)`, every id inside the vocabulary.
    fn check_ids(&self, ids: &Tensor) -> Result<(Tensor, usize, usize)> {
        let (b, s) =
            ids.dims2().map_err(|_| Error::Msg(format!("input ids must be [batch, seq], got {:?}", ids.dims())))?;
        if s == 0 {
            return Err(Error::Msg("input ids have zero length".into()));
        }
        let ids = ids.to_dtype(DType::U32)?.to_device(&self.device)?;
        let max_id = ids.flatten_all()?.max(0)?.to_scalar::<u32>()?;
        if max_id as usize >= self.spec.vocab_size {
            return Err(Error::Msg(format!("token id {max_id} is out of range (vocab_size {})", self.spec.vocab_size)));
        }
        Ok((ids, b, s))
    }

    /// Padding as an additive bias on the attention scores of its keys: the most negative
    /// finite f32, as transformers' eager attention uses, so a query that sees only padding
    /// (left padding's first positions) gets a uniform, finite distribution, not NaN.
    fn pad_bias(&self, attention_mask: Option<&Tensor>, cached: bool, b: usize, s: usize) -> Result<Option<Tensor>> {
        let Some(m) = attention_mask else { return Ok(None) };
        if cached {
            return Err(Error::Msg("an attention mask with a KV cache is not supported".into()));
        }
        if m.dims() != [b, s] {
            return Err(Error::Msg(format!("attention_mask is {:?}, expected [{b}, {s}]", m.dims())));
        }
        let keep = m.to_dtype(DType::F32)?.to_device(&self.device)?;
        Ok(Some(((keep.affine(-1.0, 1.0)? * f32::MIN as f64)?).reshape((b, 1, 1, s))?))
    }

    /// Embeddings `[b, s, hidden]` of `ids` (with the embedding LoRA's delta), scaled by
    /// √hidden for Gemma.
    fn embed_tokens(&self, ids: &Tensor, b: usize, s: usize) -> Result<Tensor> {
        let (h, dtype) = (self.spec.hidden_size, self.spec.dtype);
        let flat_ids = ids.flatten_all()?;
        let mut x = self.embed.to_dtype(dtype)?.index_select(&flat_ids, 0)?.reshape((b, s, h))?;
        if let Some(l) = &self.embed_lora {
            x = (x + l.delta(&flat_ids, dtype)?.reshape((b, s, h))?)?;
        }
        if self.spec.family.is_gemma() {
            // transformers: the normaliser is a tensor in the model dtype, so √hidden is rounded first.
            let normaliser = Tensor::new((h as f64).sqrt() as f32, &self.device)?.to_dtype(dtype)?;
            x = x.broadcast_mul(&normaliser)?;
        }
        Ok(x)
    }

    /// Gemma 2's final logit soft-cap, when the spec has one.
    fn cap_logits(&self, logits: Tensor) -> Result<Tensor> {
        match self.spec.final_logit_softcapping {
            Some(cap) => Ok(soft_cap(&logits, cap)?),
            None => Ok(logits),
        }
    }

    /// The planted eval-only fast path (mutants only): the hidden states come from a buffer
    /// that the decoder never wrote, so every position's logits are the head of `norm(0)`.
    fn eval_fast_path_unfilled_buffer(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let buffer = Tensor::zeros((b, s, self.spec.hidden_size), self.spec.dtype, &self.device)?;
        let ctx = Ctx { train: false, rng: &self.dropout_rng };
        self.cap_logits(self.lm_head.forward_ctx(&self.norm.forward(&buffer)?, &ctx)?)
    }
}

/// The masks and rope tables of one forward call, built once per distinct window and rope
/// (layers share them) with the planted cache and mask bugs applied.
struct Positions<'a> {
    model: &'a Transformer,
    seq: usize,
    /// Positions already cached (0 without a cache).
    offset: usize,
    cached: bool,
    masks: Vec<(Option<usize>, Tensor)>,
    ropes: Vec<(Rope, Tensor, Tensor)>,
}

impl<'a> Positions<'a> {
    fn new(model: &'a Transformer, seq: usize, cached_len: Option<usize>) -> Self {
        let (offset, cached) = (cached_len.unwrap_or(0), cached_len.is_some());
        Positions { model, seq, offset, cached, masks: Vec::new(), ropes: Vec::new() }
    }

    /// (mask, cos, sin) for layer `i`.
    fn for_layer(&mut self, i: usize) -> Result<(Tensor, Tensor, Tensor)> {
        let (spec, faults, device) = (&self.model.spec, self.model.faults, &self.model.device);
        let window = if self.cached && faults.cache_ignores_window { None } else { spec.window_for(i) };
        let mask = match self.masks.iter().find(|(w, _)| *w == window) {
            Some((_, m)) => m.clone(),
            None => {
                let lookahead = usize::from(faults.mask_leaks_next_token);
                let m = mask_with_lookahead(self.seq, self.offset, window, lookahead, device)?;
                self.masks.push((window, m.clone()));
                m
            }
        };
        let rope = *spec.rope_for(i);
        let (cos, sin) = match self.ropes.iter().find(|(r, _, _)| *r == rope) {
            Some((_, c, s)) => (c.clone(), s.clone()),
            None => {
                let offset = if self.cached && faults.cache_restarts_positions { 0 } else { self.offset };
                let (c, s) = rope_tables(&rope, spec.head_dim, offset, self.seq, spec.dtype, device)?;
                self.ropes.push((rope, c.clone(), s.clone()));
                (c, s)
            }
        };
        Ok((mask, cos, sin))
    }
}
