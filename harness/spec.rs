//! `ArchSpec`: the architecture of one synthetic (or real) model and its validation
//! (`config.json` reading and writing lives in `io/config.rs`), and the tensor names and shapes
//! a spec implies.
//!
//! One type covers Llama (2/3, GQA, tied or untied, Llama-3 rope scaling), Gemma 1, Gemma 2
//! (soft-caps, alternating sliding window, four norms per layer, `query_pre_attn_scalar`) and
//! Gemma 3 text (q/k norms, 5 local : 1 global with separate rope bases). The family decides
//! the conventions that are not fields (norm offset, embedding scale, MLP activation, norms per
//! layer); everything else is an explicit field so a property can vary it.

use candle_core::DType;

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
    /// The name transformers' `layer_types` uses.
    pub fn as_str(self) -> &'static str {
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
        tensor_shapes(self).iter().map(|(_, s)| s.iter().product::<usize>()).sum()
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

/// Every tensor name of `spec` with its shape, in HF naming; `lm_head.weight` only when untied.
pub fn tensor_shapes(spec: &ArchSpec) -> Vec<(String, Vec<usize>)> {
    let (h, hd, i) = (spec.hidden_size, spec.head_dim, spec.intermediate_size);
    let q = spec.num_heads * hd;
    let kv = spec.num_kv_heads * hd;
    let mut out = vec![("model.embed_tokens.weight".to_string(), vec![spec.vocab_size, h])];
    for l in 0..spec.num_layers {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
        out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
        out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
        if spec.family.has_qk_norm() {
            out.push((format!("{p}.self_attn.q_norm.weight"), vec![hd]));
            out.push((format!("{p}.self_attn.k_norm.weight"), vec![hd]));
        }
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        if spec.family.has_sandwich_norms() {
            out.push((format!("{p}.pre_feedforward_layernorm.weight"), vec![h]));
            out.push((format!("{p}.post_feedforward_layernorm.weight"), vec![h]));
        }
        out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
        out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
        out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
    }
    out.push(("model.norm.weight".to_string(), vec![h]));
    if !spec.tie_word_embeddings {
        out.push(("lm_head.weight".to_string(), vec![spec.vocab_size, h]));
    }
    out
}
