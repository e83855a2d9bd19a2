//! Adapters injected while a model loads: every projection gets its base (dense from the var
//! builder, or a ready 4-bit base) and, when targeted, its LoRA pair; the embedding gets its
//! LoRA, and `modules_to_save` their full trainable copies.
//!
//! The LoRA values are either drawn from a seed (a new adapter) or taken from a saved adapter
//! by name, every one checked for presence and shape. The trainable parameters come back as
//! `Var`s (master weights, f32 unless reproducing the low-precision-master bug) under PEFT's
//! adapter keys without the `base_model.model.` prefix:
//! `model.layers.0.self_attn.q_proj.lora_A.weight`, `model.embed_tokens.lora_embedding_A`,
//! `model.embed_tokens.weight`, `lm_head.weight`.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;

use crate::adapt::embed::EmbedLora;
use crate::adapt::linear::{Base, Linear, LoraPart};
use crate::adapt::lora::{LoraConfig, LoraInit};
use crate::error::{Error, Result};
use crate::spec::ArchSpec;
use crate::weights::{stream, uniform};

/// Trainable parameters by name.
pub type Params = Vec<(String, Var)>;

/// Bases supplied instead of dense weights from the var builder, by module path
/// (e.g. `model.layers.0.self_attn.q_proj`).
pub type Bases = BTreeMap<String, Base>;

/// Where the LoRA values come from.
#[derive(Debug, Clone)]
pub enum LoraValues {
    /// A new adapter drawn from `seed`, stored in `master` dtype.
    Seeded {
        /// The adapter seed.
        seed: u64,
        /// The dtype of the trainable copies.
        master: DType,
    },
    /// A saved adapter's tensors by parameter name (f32 copies are made); `what` names their
    /// file in errors.
    Saved {
        /// The tensors, without the `base_model.model.` prefix.
        values: BTreeMap<String, Tensor>,
        /// The file they came from.
        what: String,
    },
}

/// What to inject while loading: 4-bit bases and an optional adapter. Collects the trainable
/// parameters in a fixed order (layer projections, the head, the embedding LoRA,
/// `modules_to_save` in config order).
#[derive(Debug, Default)]
pub struct Inject {
    bases: Bases,
    lora: Option<(LoraConfig, LoraValues)>,
    params: Params,
}

fn var(t: &Tensor, dtype: DType) -> Result<Var> {
    Ok(Var::from_tensor(&t.to_dtype(dtype)?)?)
}

impl Inject {
    /// Nothing to inject: dense bases from the var builder, no adapter.
    pub fn none() -> Self {
        Inject::default()
    }

    /// Use these ready bases (e.g. 4-bit) instead of the var builder's dense weights.
    pub fn with_bases(mut self, bases: Bases) -> Self {
        self.bases = bases;
        self
    }

    /// Put the adapter `cfg` on the model with values from `values`.
    pub fn with_lora(mut self, cfg: LoraConfig, values: LoraValues) -> Self {
        self.lora = Some((cfg, values));
        self
    }

    /// Check the adapter against the architecture before anything is loaded.
    pub fn check(&self, spec: &ArchSpec) -> Result<()> {
        let Some((cfg, _)) = &self.lora else { return Ok(()) };
        cfg.validate()?;
        if spec.tie_word_embeddings && (cfg.targets("lm_head") || cfg.modules_to_save.iter().any(|m| m == "lm_head")) {
            return Err(Error::field(
                "target_modules",
                "lm_head is tied to embed_tokens; adapt or save embed_tokens instead",
            ));
        }
        Ok(())
    }

    /// The base of the projection `name` under `vb`: the ready base at its path, or the dense
    /// `[out, inp]` weight from `vb`.
    pub fn base(&self, vb: &VarBuilder, out: usize, inp: usize, name: &str) -> Result<Linear> {
        let path = module_path(vb, name);
        match self.bases.get(&path) {
            Some(base) => {
                let l = Linear { base: base.clone(), lora: None };
                if l.dims() != (out, inp) {
                    return Err(Error::Msg(format!("{path}: base has shape {:?}, expected [{out}, {inp}]", l.dims())));
                }
                Ok(l)
            }
            None => Ok(Linear::dense(vb.get((out, inp), &format!("{name}.weight"))?)),
        }
    }

    /// [`Inject::base`] with the LoRA pair put on when the adapter targets it.
    pub fn projection(&mut self, vb: &VarBuilder, out: usize, inp: usize, name: &str) -> Result<Linear> {
        let mut l = self.base(vb, out, inp, name)?;
        let path = module_path(vb, name);
        self.adapt(&path, &mut l)?;
        Ok(l)
    }

    /// Put the LoRA pair for the projection at `path` on `lin` when the adapter targets it.
    pub fn adapt(&mut self, path: &str, lin: &mut Linear) -> Result<()> {
        let Some((cfg, values)) = &mut self.lora else { return Ok(()) };
        let leaf = path.rsplit('.').next().unwrap_or(path);
        if !cfg.targets(leaf) {
            return Ok(());
        }
        let (out, inp) = lin.dims();
        let device = lin_device(lin);
        let (na, nb) = (format!("{path}.lora_A.weight"), format!("{path}.lora_B.weight"));
        let (va, vb) = match values {
            LoraValues::Seeded { seed, master } => {
                let (a, b) = cfg.init_pair(*seed, path, inp, out, &device)?;
                (var(&a, *master)?, var(&b, *master)?)
            }
            LoraValues::Saved { values, what } => {
                (take(values, what, &na, &[cfg.r, inp], &device)?, take(values, what, &nb, &[out, cfg.r], &device)?)
            }
        };
        lin.lora = Some(LoraPart {
            a: va.as_tensor().clone(),
            b: vb.as_tensor().clone(),
            scale: cfg.scale(),
            dropout: cfg.dropout,
        });
        self.params.push((na, va));
        self.params.push((nb, vb));
        Ok(())
    }

    /// The embedding LoRA (`[r, vocab]`, `[hidden, r]`) when the adapter targets
    /// `embed_tokens`. PEFT initialises it the other way round from projections: A zero,
    /// B normal.
    pub fn embed_lora(&mut self, vocab: usize, hidden: usize, device: &Device) -> Result<Option<EmbedLora>> {
        let Some((cfg, values)) = &mut self.lora else { return Ok(None) };
        if !cfg.targets("embed_tokens") {
            return Ok(None);
        }
        let p = "model.embed_tokens";
        let (na, nb) = (format!("{p}.lora_embedding_A"), format!("{p}.lora_embedding_B"));
        let (va, vb) = match values {
            LoraValues::Seeded { seed, master } => {
                let b = uniform(&mut stream(*seed, &nb), hidden * cfg.r, 0.0, 1.0);
                let a = match cfg.init {
                    LoraInit::Default => vec![0f32; cfg.r * vocab],
                    LoraInit::NonZero(std) => uniform(&mut stream(*seed, &na), cfg.r * vocab, 0.0, std),
                };
                (
                    var(&Tensor::from_vec(a, (cfg.r, vocab), device)?, *master)?,
                    var(&Tensor::from_vec(b, (hidden, cfg.r), device)?, *master)?,
                )
            }
            LoraValues::Saved { values, what } => {
                (take(values, what, &na, &[cfg.r, vocab], device)?, take(values, what, &nb, &[hidden, cfg.r], device)?)
            }
        };
        let l = EmbedLora { a: va.as_tensor().clone(), b: vb.as_tensor().clone(), scale: cfg.scale() };
        self.params.push((na, va));
        self.params.push((nb, vb));
        Ok(Some(l))
    }

    /// The trainable full copies of `modules_to_save`, in config order: `embed_tokens` from
    /// `embed`, `lm_head` from the dense `head` (a 4-bit head is an error).
    pub fn saved_modules(&mut self, embed: &Tensor, head: &Linear) -> Result<Vec<(String, Tensor)>> {
        let Some((cfg, values)) = &mut self.lora else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for m in cfg.modules_to_save.clone() {
            let (name, from) = match m.as_str() {
                "embed_tokens" => ("model.embed_tokens.weight", embed.clone()),
                "lm_head" => match &head.base {
                    Base::Dense(w) => ("lm_head.weight", w.clone()),
                    Base::Quant4(_) => return Err(Error::Msg("lm_head is 4-bit; it cannot be trained in full".into())),
                },
                other => {
                    return Err(Error::field("modules_to_save", format!("`{other}` is not embed_tokens or lm_head")))
                }
            };
            let v = match values {
                LoraValues::Seeded { master, .. } => var(&from, *master)?,
                LoraValues::Saved { values, what } => take(values, what, name, from.dims(), from.device())?,
            };
            out.push((m.clone(), v.as_tensor().clone()));
            self.params.push((name.to_string(), v));
        }
        Ok(out)
    }

    /// Whether the head stays tied to a trained embedding copy.
    pub fn retie(&self) -> bool {
        self.lora.as_ref().is_some_and(|(c, _)| c.ensure_weight_tying)
    }

    /// The trainable parameters; with saved values, every one must have been used.
    pub fn finish(self) -> Result<Params> {
        if let Some((_, LoraValues::Saved { values, what })) = &self.lora {
            if let Some(extra) = values.keys().next() {
                return Err(Error::Msg(format!("{what}: tensor `{extra}` does not belong to this adapter")));
            }
        }
        Ok(self.params)
    }
}

/// The module path of `name` under `vb` (`model.layers.0.self_attn.q_proj`, or `lm_head` at
/// the root).
fn module_path(vb: &VarBuilder, name: &str) -> String {
    if vb.prefix().is_empty() {
        name.to_string()
    } else {
        format!("{}.{name}", vb.prefix())
    }
}

fn lin_device(l: &Linear) -> Device {
    match &l.base {
        Base::Dense(w) => w.device().clone(),
        Base::Quant4(q) => q.packed.packed.device().clone(),
    }
}

/// Take the saved tensor `name` (checking its shape) as an f32 `Var` on `device`.
fn take(values: &mut BTreeMap<String, Tensor>, what: &str, name: &str, dims: &[usize], device: &Device) -> Result<Var> {
    let t = values.remove(name).ok_or_else(|| Error::Msg(format!("{what}: tensor `{name}` is missing")))?;
    if t.dims() != dims {
        return Err(Error::Msg(format!("{what}: tensor `{name}` has shape {:?}, expected {dims:?}", t.dims())));
    }
    Ok(Var::from_tensor(&t.to_dtype(DType::F32)?.to_device(device)?)?)
}

/// Load saved values into existing parameters (resuming a trainer); every name must match in
/// both directions.
pub fn load_values(params: &Params, values: &BTreeMap<String, Tensor>, what: &str) -> Result<()> {
    for (name, v) in params {
        let t = values.get(name).ok_or_else(|| Error::Msg(format!("{what}: tensor `{name}` is missing")))?;
        if t.dims() != v.dims() {
            return Err(Error::Msg(format!(
                "{what}: tensor `{name}` has shape {:?}, expected {:?}",
                t.dims(),
                v.dims()
            )));
        }
        v.set(&t.to_dtype(v.dtype())?.to_device(v.device())?)?;
    }
    if let Some(extra) = values.keys().find(|k| !params.iter().any(|(n, _)| n == *k)) {
        return Err(Error::Msg(format!("{what}: tensor `{extra}` does not belong to this adapter")));
    }
    Ok(())
}
