//! `ArchSpec`: the architecture of one synthetic (or real) model, its validation, and its
//! reading from and writing to a Hugging Face `config.json`.
//!
//! One type covers Llama (2/3, GQA, tied or untied, Llama-3 rope scaling), Gemma 1, Gemma 2
//! (soft-caps, alternating sliding window, four norms per layer, `query_pre_attn_scalar`) and
//! Gemma 3 text (q/k norms, 5 local : 1 global with separate rope bases). The family decides
//! the conventions that are not fields (norm offset, embedding scale, MLP activation, norms per
//! layer); everything else is an explicit field so a property can vary it.
//!
//! `config.json` is read in both placements transformers has used: 4.x (`rope_theta`,
//! `rope_scaling`, `rope_local_base_freq` at top level, layer pattern derived) and 5.x
//! (`rope_parameters`, possibly one entry per layer type, and explicit `layer_types`). The
//! explicit fields win when both are present. It is written in the 5.x placement, with the
//! 4.x top-level fields alongside so older readers load it too.

use std::path::Path;

use candle_core::DType;
use serde_json::{json, Map, Value};

use crate::error::{Error, Result};

/// The model family: decides conventions that are not spelled out as fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Family {
    /// Llama 2/3: unscaled embedding, `w·x̂` RMSNorm, SwiGLU.
    Llama,
    /// Gemma 1: `√hidden`-scaled embedding, `(1+w)·x̂` RMSNorm, GeGLU (tanh gelu), tied head.
    Gemma,
    /// Gemma 2: Gemma 1 plus four norms per layer, soft-capping, alternating sliding window.
    Gemma2,
    /// Gemma 3 (text): Gemma 2 layout plus q/k norms, 5 local : 1 global layers, two rope bases.
    Gemma3,
}

impl Family {
    /// All families, in a fixed order.
    pub const ALL: [Family; 4] = [Family::Llama, Family::Gemma, Family::Gemma2, Family::Gemma3];

    /// transformers' `model_type`.
    pub fn model_type(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Gemma => "gemma",
            Family::Gemma2 => "gemma2",
            Family::Gemma3 => "gemma3_text",
        }
    }

    /// transformers' causal-LM class name.
    pub fn architecture(self) -> &'static str {
        match self {
            Family::Llama => "LlamaForCausalLM",
            Family::Gemma => "GemmaForCausalLM",
            Family::Gemma2 => "Gemma2ForCausalLM",
            Family::Gemma3 => "Gemma3ForCausalLM",
        }
    }

    /// Parse a `model_type`.
    pub fn from_model_type(s: &str) -> Option<Family> {
        match s {
            "llama" => Some(Family::Llama),
            "gemma" => Some(Family::Gemma),
            "gemma2" => Some(Family::Gemma2),
            "gemma3_text" | "gemma3" => Some(Family::Gemma3),
            _ => None,
        }
    }

    /// The short name used on the command line and in the driver protocol (`llama`, `gemma`,
    /// `gemma2`, `gemma3`).
    pub fn short_name(self) -> &'static str {
        match self {
            Family::Llama => "llama",
            Family::Gemma => "gemma",
            Family::Gemma2 => "gemma2",
            Family::Gemma3 => "gemma3",
        }
    }

    /// Parse a short name as used on the command line (`llama`, `gemma`, `gemma2`, `gemma3`).
    pub fn from_name(s: &str) -> Option<Family> {
        Family::from_model_type(&s.to_ascii_lowercase())
    }

    /// True for the Gemma families (norm `(1+w)`, scaled embedding, GeGLU).
    pub fn is_gemma(self) -> bool {
        !matches!(self, Family::Llama)
    }

    /// Gemma 2 and 3 have a post-attention norm and a pre/post-feedforward norm pair.
    pub fn has_sandwich_norms(self) -> bool {
        matches!(self, Family::Gemma2 | Family::Gemma3)
    }

    /// Gemma 3 normalises q and k over `head_dim` before rope.
    pub fn has_qk_norm(self) -> bool {
        matches!(self, Family::Gemma3)
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::Llama => "llama",
            Family::Gemma => "gemma",
            Family::Gemma2 => "gemma2",
            Family::Gemma3 => "gemma3",
        })
    }
}

/// Attention kind of one layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerType {
    /// Causal attention over the whole prefix.
    Full,
    /// Causal attention over the last `sliding_window` positions (query included).
    Sliding,
}

impl LayerType {
    fn as_str(self) -> &'static str {
        match self {
            LayerType::Full => "full_attention",
            LayerType::Sliding => "sliding_attention",
        }
    }
}

/// Rescaling of rope inverse frequencies.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// Plain rope.
    None,
    /// Position interpolation: every inverse frequency divided by `factor`.
    Linear {
        /// Divisor of the inverse frequencies.
        factor: f64,
    },
    /// Llama 3.1 wavelength-band rescaling.
    Llama3 {
        /// Divisor for low frequencies.
        factor: f64,
        /// Wavelength band lower factor.
        low_freq_factor: f64,
        /// Wavelength band upper factor.
        high_freq_factor: f64,
        /// The pre-training context length.
        original_max_position_embeddings: usize,
    },
}

/// Rope parameters of one layer type.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rope {
    /// Base (`rope_theta`).
    pub theta: f64,
    /// Frequency rescaling.
    pub scaling: RopeScaling,
}

impl Rope {
    /// Plain rope with base `theta`.
    pub fn plain(theta: f64) -> Self {
        Rope { theta, scaling: RopeScaling::None }
    }

    /// Inverse frequencies for a rotary dimension `dim`, in the order transformers uses.
    pub fn inv_freq(&self, dim: usize) -> Vec<f32> {
        // transformers computes base ** (arange(0, dim, 2).float() / dim) in float32.
        let base: Vec<f32> =
            (0..dim).step_by(2).map(|i| 1.0f32 / (self.theta as f32).powf(i as f32 / dim as f32)).collect();
        match self.scaling {
            RopeScaling::None => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor as f32).collect(),
            RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                let old = original_max_position_embeddings as f32;
                let (factor, lo, hi) = (factor as f32, low_freq_factor as f32, high_freq_factor as f32);
                let low_wavelen = old / lo;
                let high_wavelen = old / hi;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        let scaled = if wavelen > low_wavelen { f / factor } else { f };
                        let medium = wavelen >= high_wavelen && wavelen <= low_wavelen; // wavelen is finite here
                        if medium {
                            let smooth = (old / wavelen - lo) / (hi - lo);
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        } else {
                            scaled
                        }
                    })
                    .collect()
            }
        }
    }
}

/// The architecture of a decoder-only model of one of the supported families.
#[derive(Debug, Clone, PartialEq)]
pub struct ArchSpec {
    /// Family conventions.
    pub family: Family,
    /// Vocabulary size (rows of `embed_tokens` and `lm_head`).
    pub vocab_size: usize,
    /// Residual width.
    pub hidden_size: usize,
    /// MLP inner width.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (GQA when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Longest position the model is configured for.
    pub max_position_embeddings: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Rope of full-attention layers.
    pub rope: Rope,
    /// Rope of sliding-window layers (Gemma 3's local base); equal to `rope` elsewhere.
    pub rope_local: Rope,
    /// Share `embed_tokens` as the output head.
    pub tie_word_embeddings: bool,
    /// Attention scores are scaled by `query_pre_attn_scalar^-0.5` when set, else `head_dim^-0.5`.
    pub query_pre_attn_scalar: Option<f64>,
    /// `tanh(s/c)·c` on attention scores before the mask (Gemma 2).
    pub attn_logit_softcapping: Option<f64>,
    /// `tanh(z/c)·c` on the final logits (Gemma 2).
    pub final_logit_softcapping: Option<f64>,
    /// Window of sliding layers.
    pub sliding_window: Option<usize>,
    /// Attention kind per layer.
    pub layer_types: Vec<LayerType>,
    /// Dropout on attention probabilities, train mode only.
    pub attention_dropout: f64,
    /// Dropout on each residual branch output, train mode only (tunecheck's own field).
    pub residual_dropout: f64,
    /// Compute dtype (weights are stored and computed in it).
    pub dtype: DType,
}

impl ArchSpec {
    /// A small default spec of `family`, valid and quick to run.
    pub fn tiny(family: Family) -> Self {
        let num_layers = if family == Family::Gemma3 { 6 } else { 2 };
        let mut s = ArchSpec {
            family,
            vocab_size: 64,
            hidden_size: 32,
            intermediate_size: 48,
            num_layers,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 8,
            max_position_embeddings: 128,
            rms_norm_eps: 1e-6,
            rope: Rope::plain(10_000.0),
            rope_local: Rope::plain(10_000.0),
            tie_word_embeddings: family.is_gemma(),
            query_pre_attn_scalar: None,
            attn_logit_softcapping: None,
            final_logit_softcapping: None,
            sliding_window: None,
            layer_types: vec![LayerType::Full; num_layers],
            attention_dropout: 0.0,
            residual_dropout: 0.0,
            dtype: DType::F32,
        };
        match family {
            Family::Llama | Family::Gemma => {}
            Family::Gemma2 => {
                s.query_pre_attn_scalar = Some(16.0);
                s.attn_logit_softcapping = Some(50.0);
                s.final_logit_softcapping = Some(30.0);
                s.sliding_window = Some(4);
                s.layer_types = default_layer_types(family, num_layers, 6);
            }
            Family::Gemma3 => {
                s.query_pre_attn_scalar = Some(16.0);
                s.sliding_window = Some(4);
                s.rope = Rope::plain(1_000_000.0);
                s.layer_types = default_layer_types(family, num_layers, 6);
            }
        }
        s
    }

    /// The attention-score scale.
    pub fn attn_scale(&self) -> f64 {
        match self.query_pre_attn_scalar {
            Some(q) => q.powf(-0.5),
            None => (self.head_dim as f64).powf(-0.5),
        }
    }

    /// Rope of layer `i`.
    pub fn rope_for(&self, i: usize) -> &Rope {
        match self.layer_types.get(i) {
            Some(LayerType::Sliding) => &self.rope_local,
            _ => &self.rope,
        }
    }

    /// Window of layer `i`, `None` for full attention.
    pub fn window_for(&self, i: usize) -> Option<usize> {
        match self.layer_types.get(i) {
            Some(LayerType::Sliding) => self.sliding_window,
            _ => None,
        }
    }

    /// Number of parameters, counting a tied head once.
    pub fn num_parameters(&self) -> usize {
        crate::weights::tensor_shapes(self).iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    }

    /// Check the spec for consistency; the error names the field at fault.
    pub fn validate(&self) -> Result<()> {
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_layers),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err(Error::field(field, "must be at least 1, got 0"));
            }
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return Err(Error::field(
                "num_key_value_heads",
                format!("{} does not divide num_attention_heads = {}", self.num_kv_heads, self.num_heads),
            ));
        }
        if self.family == Family::Llama && !self.hidden_size.is_multiple_of(self.num_heads) {
            // transformers' LlamaConfig rejects this even when head_dim is explicit.
            return Err(Error::field(
                "num_attention_heads",
                format!(
                    "{} does not divide hidden_size = {} (transformers requires it for Llama)",
                    self.num_heads, self.hidden_size
                ),
            ));
        }
        if !self.head_dim.is_multiple_of(2) {
            return Err(Error::field("head_dim", format!("rope needs an even head_dim, got {}", self.head_dim)));
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps.is_finite()) {
            return Err(Error::field("rms_norm_eps", format!("must be > 0, got {}", self.rms_norm_eps)));
        }
        for (field, rope) in [("rope_theta", &self.rope), ("rope_local_base_freq", &self.rope_local)] {
            if !(rope.theta > 1.0 && rope.theta.is_finite()) {
                return Err(Error::field(field, format!("must be > 1, got {}", rope.theta)));
            }
            match rope.scaling {
                RopeScaling::None => {}
                RopeScaling::Linear { factor } => {
                    if !(factor > 0.0 && factor.is_finite()) {
                        return Err(Error::field("rope_scaling.factor", format!("must be > 0, got {factor}")));
                    }
                }
                RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
                    if !(factor > 0.0 && factor.is_finite()) {
                        return Err(Error::field("rope_scaling.factor", format!("must be > 0, got {factor}")));
                    }
                    if !(low_freq_factor > 0.0 && high_freq_factor > low_freq_factor) {
                        return Err(Error::field(
                            "rope_scaling.high_freq_factor",
                            format!(
                                "must exceed low_freq_factor > 0, got low {low_freq_factor}, high {high_freq_factor}"
                            ),
                        ));
                    }
                    if original_max_position_embeddings == 0 {
                        return Err(Error::field(
                            "rope_scaling.original_max_position_embeddings",
                            "must be at least 1",
                        ));
                    }
                }
            }
        }
        if self.layer_types.len() != self.num_layers {
            return Err(Error::field(
                "layer_types",
                format!("has {} entries but num_hidden_layers = {}", self.layer_types.len(), self.num_layers),
            ));
        }
        let any_sliding = self.layer_types.contains(&LayerType::Sliding);
        match self.sliding_window {
            Some(0) => return Err(Error::field("sliding_window", "must be at least 1, got 0")),
            None if any_sliding => {
                return Err(Error::field("sliding_window", "layer_types has sliding layers but no window is set"))
            }
            _ => {}
        }
        for (field, v) in [
            ("query_pre_attn_scalar", self.query_pre_attn_scalar),
            ("attn_logit_softcapping", self.attn_logit_softcapping),
            ("final_logit_softcapping", self.final_logit_softcapping),
        ] {
            if let Some(v) = v {
                if !(v > 0.0 && v.is_finite()) {
                    return Err(Error::field(field, format!("must be > 0 when set, got {v}")));
                }
            }
        }
        for (field, p) in [("attention_dropout", self.attention_dropout), ("residual_dropout", self.residual_dropout)] {
            if !(0.0..1.0).contains(&p) {
                return Err(Error::field(field, format!("must be in [0, 1), got {p}")));
            }
        }
        // f64 is for in-memory oracles (P8's re-run), never a checkpoint dtype.
        if !matches!(self.dtype, DType::F32 | DType::BF16 | DType::F16 | DType::F64) {
            return Err(Error::field("dtype", format!("{:?} is not a float compute dtype", self.dtype)));
        }
        if self.family == Family::Gemma && !self.tie_word_embeddings {
            // transformers' Gemma always ties; an untied Gemma is not a Gemma checkpoint.
            return Err(Error::field("tie_word_embeddings", "Gemma ties embeddings; false is not supported"));
        }
        Ok(())
    }

    /// Parse a `config.json` value (4.x or 5.x placement) and validate it.
    pub fn from_config_json(v: &Value) -> Result<Self> {
        let obj = v.as_object().ok_or_else(|| Error::field("(root)", "config.json is not a JSON object"))?;
        let c = Cfg(obj);
        let model_type = c.str("model_type")?;
        let family = Family::from_model_type(model_type).ok_or_else(|| {
            Error::field("model_type", format!("`{model_type}` is not supported (llama, gemma, gemma2, gemma3_text)"))
        })?;
        let hidden_size = c.usize("hidden_size")?;
        let num_heads = c.usize("num_attention_heads")?;
        let num_layers = c.usize("num_hidden_layers")?;
        let num_kv_heads = c.opt_usize("num_key_value_heads")?.unwrap_or(num_heads);
        let head_dim = match c.opt_usize("head_dim")? {
            Some(h) => h,
            None if family.is_gemma() => 256,
            None => {
                if num_heads == 0 || hidden_size % num_heads != 0 {
                    return Err(Error::field(
                        "num_attention_heads",
                        format!("{num_heads} does not divide hidden_size = {hidden_size} and no head_dim is given"),
                    ));
                }
                hidden_size / num_heads
            }
        };
        for act_key in ["hidden_act", "hidden_activation"] {
            if let Some(a) = c.opt_str(act_key)? {
                let want =
                    if family.is_gemma() { ["gelu_pytorch_tanh", "gelu_pytorch_tanh"] } else { ["silu", "swish"] };
                if !want.contains(&a) {
                    return Err(Error::field(
                        act_key,
                        format!("`{a}` is not supported for {family} (expected {})", want[0]),
                    ));
                }
            }
        }
        if c.opt_bool("use_bidirectional_attention")? == Some(true) {
            return Err(Error::field(
                "use_bidirectional_attention",
                "bidirectional attention is not a causal LM; not supported",
            ));
        }
        for flag in ["attention_bias", "mlp_bias"] {
            if c.opt_bool(flag)? == Some(true) {
                return Err(Error::field(flag, "biases are not supported"));
            }
        }
        let dtype =
            match c.opt_str("dtype")?.map(|s| ("dtype", s)).or(c.opt_str("torch_dtype")?.map(|s| ("torch_dtype", s))) {
                None => DType::F32,
                Some((field, s)) => parse_dtype(s)
                    .ok_or_else(|| Error::field(field, format!("`{s}` is not float32, bfloat16 or float16")))?,
            };

        let sliding_window = c.opt_usize("sliding_window")?.or(match family {
            Family::Gemma2 | Family::Gemma3 => Some(4096),
            _ => None,
        });
        let layer_types = match obj.get("layer_types") {
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, t)| match t.as_str() {
                    Some("full_attention") => Ok(LayerType::Full),
                    Some("sliding_attention") => Ok(LayerType::Sliding),
                    _ => Err(Error::field(
                        format!("layer_types[{i}]"),
                        format!("{t} is not \"full_attention\" or \"sliding_attention\""),
                    )),
                })
                .collect::<Result<Vec<_>>>()?,
            Some(Value::Null) | None => {
                let pattern = match c.opt_usize("sliding_window_pattern")? {
                    Some(p) => p,
                    None => c.opt_usize("_sliding_window_pattern")?.unwrap_or(6),
                };
                if pattern == 0 {
                    return Err(Error::field("sliding_window_pattern", "must be at least 1"));
                }
                default_layer_types(family, num_layers, pattern)
            }
            Some(other) => return Err(Error::field("layer_types", format!("expected an array, got {other}"))),
        };

        let (rope, rope_local) = parse_rope(&c, family)?;
        let tie_default = family.is_gemma();
        let spec = ArchSpec {
            family,
            vocab_size: c.usize("vocab_size")?,
            hidden_size,
            intermediate_size: c.usize("intermediate_size")?,
            num_layers,
            num_heads,
            num_kv_heads,
            head_dim,
            max_position_embeddings: c.opt_usize("max_position_embeddings")?.unwrap_or(8192),
            rms_norm_eps: c.opt_f64("rms_norm_eps")?.unwrap_or(1e-6),
            rope,
            rope_local,
            tie_word_embeddings: c.opt_bool("tie_word_embeddings")?.unwrap_or(tie_default),
            query_pre_attn_scalar: match family {
                Family::Gemma2 | Family::Gemma3 => Some(c.opt_f64("query_pre_attn_scalar")?.unwrap_or(256.0)),
                _ => None,
            },
            attn_logit_softcapping: match family {
                Family::Gemma2 => c.opt_f64_or_null("attn_logit_softcapping", Some(50.0))?,
                Family::Gemma3 => c.opt_f64_or_null("attn_logit_softcapping", None)?,
                _ => None,
            },
            final_logit_softcapping: match family {
                Family::Gemma2 => c.opt_f64_or_null("final_logit_softcapping", Some(30.0))?,
                Family::Gemma3 => c.opt_f64_or_null("final_logit_softcapping", None)?,
                _ => None,
            },
            sliding_window,
            layer_types,
            attention_dropout: c.opt_f64("attention_dropout")?.unwrap_or(0.0),
            residual_dropout: c.opt_f64("residual_dropout")?.unwrap_or(0.0),
            dtype,
        };
        spec.validate()?;
        Ok(spec)
    }

    /// Read and validate `path` (a `config.json`); errors name the file and field.
    pub fn from_config_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| Error::file(path, format!("not valid JSON: {e}")))?;
        Self::from_config_json(&v).map_err(|e| e.in_file(path))
    }

    /// The `config.json` transformers loads for this spec (5.x fields plus 4.x top-level rope).
    pub fn to_config_json(&self) -> Value {
        let f = self.family;
        let mut m = Map::new();
        m.insert("architectures".into(), json!([f.architecture()]));
        m.insert("model_type".into(), json!(f.model_type()));
        m.insert("vocab_size".into(), json!(self.vocab_size));
        // No padding token: transformers' Gemma configs default to `pad_token_id` 0, which makes
        // `nn.Embedding(padding_idx=0)` drop every gradient of token 0's row — a different
        // model from the one this spec describes (where every row trains).
        m.insert("pad_token_id".into(), Value::Null);
        m.insert("hidden_size".into(), json!(self.hidden_size));
        m.insert("intermediate_size".into(), json!(self.intermediate_size));
        m.insert("num_hidden_layers".into(), json!(self.num_layers));
        m.insert("num_attention_heads".into(), json!(self.num_heads));
        m.insert("num_key_value_heads".into(), json!(self.num_kv_heads));
        m.insert("head_dim".into(), json!(self.head_dim));
        m.insert("max_position_embeddings".into(), json!(self.max_position_embeddings));
        m.insert("rms_norm_eps".into(), json!(self.rms_norm_eps));
        m.insert("tie_word_embeddings".into(), json!(self.tie_word_embeddings));
        m.insert("attention_bias".into(), json!(false));
        m.insert("attention_dropout".into(), json!(self.attention_dropout));
        if self.residual_dropout > 0.0 {
            m.insert("residual_dropout".into(), json!(self.residual_dropout));
        }
        let act_key = if f.is_gemma() { "hidden_activation" } else { "hidden_act" };
        m.insert(act_key.into(), json!(if f.is_gemma() { "gelu_pytorch_tanh" } else { "silu" }));
        if f == Family::Llama {
            m.insert("mlp_bias".into(), json!(false));
        }
        let dt = dtype_name(self.dtype);
        m.insert("dtype".into(), json!(dt));
        m.insert("torch_dtype".into(), json!(dt));
        // Rope: 4.x top-level fields, and 5.x rope_parameters.
        m.insert("rope_theta".into(), json!(self.rope.theta));
        m.insert("rope_scaling".into(), rope_scaling_json(&self.rope.scaling));
        if f == Family::Gemma3 {
            m.insert("rope_local_base_freq".into(), json!(self.rope_local.theta));
            m.insert(
                "rope_parameters".into(),
                json!({
                    "full_attention": rope_parameters_json(&self.rope),
                    "sliding_attention": rope_parameters_json(&self.rope_local),
                }),
            );
        } else {
            m.insert("rope_parameters".into(), rope_parameters_json(&self.rope));
        }
        if let Some(q) = self.query_pre_attn_scalar {
            // transformers 5 types this field as int; write integral values as integers.
            let v = if q.fract() == 0.0 && q.abs() < 1e15 { json!(q as i64) } else { json!(q) };
            m.insert("query_pre_attn_scalar".into(), v);
        }
        if matches!(f, Family::Gemma2 | Family::Gemma3) {
            m.insert("attn_logit_softcapping".into(), json!(self.attn_logit_softcapping));
            m.insert("final_logit_softcapping".into(), json!(self.final_logit_softcapping));
        }
        if let Some(w) = self.sliding_window {
            m.insert("sliding_window".into(), json!(w));
        }
        if f != Family::Llama || self.layer_types.contains(&LayerType::Sliding) {
            m.insert("layer_types".into(), json!(self.layer_types.iter().map(|t| t.as_str()).collect::<Vec<_>>()));
        }
        m.insert("use_cache".into(), json!(true));
        Value::Object(m)
    }
}

/// The layer pattern transformers derives when `layer_types` is absent.
pub fn default_layer_types(family: Family, num_layers: usize, pattern: usize) -> Vec<LayerType> {
    (0..num_layers)
        .map(|i| match family {
            Family::Llama | Family::Gemma => LayerType::Full,
            // Gemma 2: `not bool(layer_idx % 2)` is sliding, i.e. even layers.
            Family::Gemma2 if i % 2 == 0 => LayerType::Sliding,
            Family::Gemma2 => LayerType::Full,
            // Gemma 3: sliding unless (i + 1) is a multiple of the pattern.
            Family::Gemma3 if (i + 1) % pattern != 0 => LayerType::Sliding,
            Family::Gemma3 => LayerType::Full,
        })
        .collect()
}

/// Parse a dtype name as used in `config.json`.
pub fn parse_dtype(s: &str) -> Option<DType> {
    match s {
        "float32" | "f32" => Some(DType::F32),
        "bfloat16" | "bf16" => Some(DType::BF16),
        "float16" | "f16" | "half" => Some(DType::F16),
        _ => None,
    }
}

/// The `config.json` name of a dtype.
pub fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        DType::F64 => "float64",
        _ => "float32",
    }
}

/// The short name of a dtype in tunecheck's reports and flags (`f32`, `bf16`, `f16`, `f64`).
pub fn short_dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bf16",
        DType::F16 => "f16",
        DType::F64 => "f64",
        _ => "f32",
    }
}

fn rope_scaling_json(s: &RopeScaling) -> Value {
    match *s {
        RopeScaling::None => Value::Null,
        RopeScaling::Linear { factor } => json!({"rope_type": "linear", "factor": factor}),
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => json!({
            "rope_type": "llama3",
            "factor": factor,
            "low_freq_factor": low_freq_factor,
            "high_freq_factor": high_freq_factor,
            "original_max_position_embeddings": original_max_position_embeddings,
        }),
    }
}

fn rope_parameters_json(r: &Rope) -> Value {
    let mut v = match rope_scaling_json(&r.scaling) {
        Value::Null => json!({"rope_type": "default"}),
        v => v,
    };
    v["rope_theta"] = json!(r.theta);
    v
}

/// Read a rope-parameters object (`rope_scaling` or a `rope_parameters` entry); `theta`
/// is the base to use when the object has none.
fn parse_rope_object(field: &str, v: &Value, theta: f64) -> Result<Rope> {
    let o = match v {
        Value::Null => return Ok(Rope::plain(theta)),
        Value::Object(o) => o,
        other => return Err(Error::field(field, format!("expected an object, got {other}"))),
    };
    let c = Cfg(o);
    let sub = |k: &str| format!("{field}.{k}");
    let theta = c.opt_f64("rope_theta").map_err(|_| Error::field(sub("rope_theta"), "not a number"))?.unwrap_or(theta);
    let kind = match c.opt_str("rope_type")? {
        Some(t) => t,
        None => c.opt_str("type")?.unwrap_or("default"),
    };
    let num = |k: &str| -> Result<f64> {
        o.get(k).and_then(Value::as_f64).ok_or_else(|| Error::field(sub(k), "missing or not a number"))
    };
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: num("factor")? },
        "llama3" => RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: o
                .get("original_max_position_embeddings")
                .and_then(Value::as_u64)
                .ok_or_else(|| Error::field(sub("original_max_position_embeddings"), "missing or not an integer"))?
                as usize,
        },
        other => {
            return Err(Error::field(sub("rope_type"), format!("`{other}` is not supported (default, linear, llama3)")))
        }
    };
    Ok(Rope { theta, scaling })
}

fn parse_rope(c: &Cfg<'_>, family: Family) -> Result<(Rope, Rope)> {
    let top_theta = c.opt_f64("rope_theta")?;
    let local_theta = c.opt_f64("rope_local_base_freq")?;
    if let Some(params) = c.0.get("rope_parameters").filter(|v| !v.is_null()) {
        let per_type = params.get("full_attention").is_some() || params.get("sliding_attention").is_some();
        if per_type {
            let full = parse_rope_object(
                "rope_parameters.full_attention",
                params.get("full_attention").unwrap_or(&Value::Null),
                top_theta.unwrap_or(if family == Family::Gemma3 { 1_000_000.0 } else { 10_000.0 }),
            )?;
            let local = match params.get("sliding_attention") {
                Some(v) => parse_rope_object("rope_parameters.sliding_attention", v, local_theta.unwrap_or(10_000.0))?,
                None => full,
            };
            return Ok((full, local));
        }
        let r = parse_rope_object("rope_parameters", params, top_theta.unwrap_or(10_000.0))?;
        let local = if family == Family::Gemma3 { Rope::plain(local_theta.unwrap_or(10_000.0)) } else { r };
        return Ok((r, local));
    }
    let theta = top_theta.unwrap_or(if family == Family::Gemma3 { 1_000_000.0 } else { 10_000.0 });
    let full = parse_rope_object("rope_scaling", c.0.get("rope_scaling").unwrap_or(&Value::Null), theta)?;
    let local = if family == Family::Gemma3 { Rope::plain(local_theta.unwrap_or(10_000.0)) } else { full };
    Ok((full, local))
}

/// Typed field access on a JSON object; errors name the field.
struct Cfg<'a>(&'a Map<String, Value>);

impl Cfg<'_> {
    fn get(&self, k: &str) -> Option<&Value> {
        self.0.get(k).filter(|v| !v.is_null())
    }
    fn str(&self, k: &str) -> Result<&str> {
        self.opt_str(k)?.ok_or_else(|| Error::field(k, "missing"))
    }
    fn opt_str(&self, k: &str) -> Result<Option<&str>> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(Error::field(k, format!("expected a string, got {v}"))),
        }
    }
    fn usize(&self, k: &str) -> Result<usize> {
        self.opt_usize(k)?.ok_or_else(|| Error::field(k, "missing"))
    }
    fn opt_usize(&self, k: &str) -> Result<Option<usize>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|&n| n <= u32::MAX as u64)
                .map(|n| Some(n as usize))
                .ok_or_else(|| Error::field(k, format!("expected a non-negative integer below 2^32, got {v}"))),
        }
    }
    fn opt_f64(&self, k: &str) -> Result<Option<f64>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| Error::field(k, format!("expected a number, got {v}"))),
        }
    }
    /// A number whose explicit `null` means "off" and whose absence means `default`.
    fn opt_f64_or_null(&self, k: &str, default: Option<f64>) -> Result<Option<f64>> {
        match self.0.get(k) {
            None => Ok(default),
            Some(Value::Null) => Ok(None),
            Some(v) => {
                v.as_f64().map(Some).ok_or_else(|| Error::field(k, format!("expected a number or null, got {v}")))
            }
        }
    }
    fn opt_bool(&self, k: &str) -> Result<Option<bool>> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(Error::field(k, format!("expected true or false, got {v}"))),
        }
    }
}
