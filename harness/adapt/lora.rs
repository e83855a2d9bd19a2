//! LoRA configuration (PEFT's `LoraConfig` fields that change the function) and seeded
//! initialisation of the A/B matrices.

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::weights::{stream, uniform};

/// How B is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LoraInit {
    /// PEFT's default: A Kaiming-uniform-like, B zero (the adapter starts as the identity).
    Default,
    /// B also random with this standard deviation: tests that compare adapted outputs need
    /// a non-zero B, or every adapter looks correct.
    NonZero(f32),
}

/// The projections LoRA can target, PEFT names.
pub const PROJECTIONS: [&str; 7] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];

/// A LoRA adapter's shape and scaling.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraConfig {
    /// Rank.
    pub r: usize,
    /// `lora_alpha`.
    pub alpha: f64,
    /// Scale by `alpha / √r` instead of `alpha / r`.
    pub use_rslora: bool,
    /// Dropout on the adapter input, train mode only.
    pub dropout: f64,
    /// Module names adapted: any of [`PROJECTIONS`], plus `embed_tokens` and `lm_head`.
    pub target_modules: Vec<String>,
    /// Modules trained in full and saved with the adapter (`embed_tokens`, `lm_head`).
    pub modules_to_save: Vec<String>,
    /// Initialisation of B.
    pub init: LoraInit,
    /// With tied embeddings and `embed_tokens` in `modules_to_save`, keep the head tied to
    /// the trained copy. PEFT's default (false) unties them: the head keeps the base matrix.
    pub ensure_weight_tying: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            r: 4,
            alpha: 8.0,
            use_rslora: false,
            dropout: 0.0,
            target_modules: PROJECTIONS.iter().map(|s| s.to_string()).collect(),
            modules_to_save: Vec::new(),
            init: LoraInit::Default,
            ensure_weight_tying: false,
        }
    }
}

impl LoraConfig {
    /// The adapter output scale: `alpha / r`, or `alpha / √r` with rsLoRA.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }

    /// Check the config; errors name the field.
    pub fn validate(&self) -> Result<()> {
        if self.r == 0 {
            return Err(Error::field("r", "must be at least 1"));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(Error::field("lora_alpha", format!("must be > 0, got {}", self.alpha)));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(Error::field("lora_dropout", format!("must be in [0, 1), got {}", self.dropout)));
        }
        for t in &self.target_modules {
            if !PROJECTIONS.contains(&t.as_str()) && t != "embed_tokens" && t != "lm_head" {
                return Err(Error::field(
                    "target_modules",
                    format!("`{t}` is not a projection, embed_tokens or lm_head"),
                ));
            }
        }
        for m in &self.modules_to_save {
            if m != "embed_tokens" && m != "lm_head" {
                return Err(Error::field("modules_to_save", format!("`{m}` is not embed_tokens or lm_head")));
            }
            if self.target_modules.contains(m) {
                return Err(Error::field("modules_to_save", format!("`{m}` is also a LoRA target")));
            }
        }
        Ok(())
    }

    /// True when module `name` (a PEFT leaf name like `q_proj`) is adapted.
    pub fn targets(&self, leaf: &str) -> bool {
        self.target_modules.iter().any(|t| t == leaf)
    }

    /// Seeded `(A [r, in], B [out, r])` for the module at `path` (f32, on `device`).
    /// A: uniform with bound 1/√in (Kaiming-uniform with a = √5, as PEFT); B per [`LoraInit`].
    pub fn init_pair(
        &self,
        seed: u64,
        path: &str,
        inp: usize,
        out: usize,
        device: &Device,
    ) -> Result<(Tensor, Tensor)> {
        let a_std = (1.0 / inp as f32).sqrt() / 3f32.sqrt();
        let a = uniform(&mut stream(seed, &format!("{path}.lora_A")), self.r * inp, 0.0, a_std);
        let b = match self.init {
            LoraInit::Default => vec![0f32; out * self.r],
            LoraInit::NonZero(std) => uniform(&mut stream(seed, &format!("{path}.lora_B")), out * self.r, 0.0, std),
        };
        Ok((
            Tensor::from_vec(a, (self.r, inp), &Device::Cpu)?.to_device(device)?,
            Tensor::from_vec(b, (out, self.r), &Device::Cpu)?.to_device(device)?,
        ))
    }
}

/// `B·A·scale` as a dense `[out, in]` delta in `dtype`.
pub fn delta(a: &Tensor, b: &Tensor, scale: f64, dtype: DType) -> Result<Tensor> {
    Ok((b.to_dtype(DType::F32)?.matmul(&a.to_dtype(DType::F32)?)? * scale)?.to_dtype(dtype)?)
}
