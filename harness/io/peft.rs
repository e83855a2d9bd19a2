//! PEFT LoRA adapter directories: `adapter_config.json` + `adapter_model.safetensors`, with
//! PEFT's key names (`base_model.model.<module>.lora_A.weight`, `lora_embedding_A/B`,
//! `modules_to_save` copies as `<module>.weight`, `embed_tokens.base_layer.weight` when PEFT
//! saved the embedding with an embedding adapter).
//!
//! tunecheck also records the base model's 4-bit configuration under
//! `tunecheck_base_quantization` (PEFT ignores the key); loading checks it against the base
//! the adapter is applied to, so a reload on a differently quantized base is an error instead
//! of a silent change of function.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use crate::adapt::inject::Params;
use crate::adapt::lora::{LoraConfig, LoraInit};
use crate::adapt::qlora::QuantConfig;
use crate::error::{Error, Result};
use crate::io::atomic::Staged;
use crate::io::fields::{is_empty, is_false, Fields};
use crate::io::st::{hosted, stage_tensors, StFile};
use crate::model::Transformer;
use crate::spec::ArchSpec;

/// The adapter config file name.
pub const CONFIG: &str = "adapter_config.json";
/// The adapter weights file name.
pub const WEIGHTS: &str = "adapter_model.safetensors";
/// PEFT's key prefix for a causal LM.
pub const PREFIX: &str = "base_model.model.";
/// tunecheck's key in `adapter_config.json` for the base's quantization.
pub const QUANT_KEY: &str = "tunecheck_base_quantization";

/// A parsed adapter directory.
#[derive(Debug, Clone)]
pub struct Adapter {
    /// The LoRA configuration.
    pub lora: LoraConfig,
    /// The base's quantization as recorded: `None` when not recorded (PEFT-made adapters),
    /// `Some(None)` for an unquantized base, `Some(Some(q))` for a 4-bit one.
    pub base_quant: Option<Option<QuantConfig>>,
    /// Tensors by parameter name (PEFT keys without the prefix).
    pub tensors: BTreeMap<String, Tensor>,
    /// `base_model_name_or_path`.
    pub base_model: Option<String>,
}

fn cfg_err(path: &Path, field: &str, msg: impl Into<String>) -> Error {
    Error::Config { file: Some(path.to_path_buf()), field: field.into(), msg: msg.into() }
}

/// `adapter_config.json` fields that change what the adapter computes and that tunecheck does
/// not implement: the value each must have (absent and `null` are fine too), and what it would do.
/// A refused field: its name, the values that are fine, and what it would change.
type Refused = (&'static str, fn(&Value) -> bool, &'static str);

const REFUSED: &[Refused] = &[
    ("use_dora", is_false, "DoRA (weight-decomposed LoRA) is not implemented"),
    ("fan_in_fan_out", is_false, "transposed (Conv1D) base weights are not implemented"),
    ("bias", |v| v == "none", "trained biases are not implemented (none)"),
    ("lora_bias", is_false, "a bias on lora_B is not implemented"),
    ("layers_to_transform", |_| false, "adapting a subset of layers is not implemented"),
    ("rank_pattern", is_empty, "per-module ranks are not implemented"),
    ("alpha_pattern", is_empty, "per-module alphas are not implemented"),
    ("exclude_modules", is_empty, "excluding modules from the targets is not implemented"),
    ("target_parameters", is_empty, "LoRA on parameters (not modules) is not implemented"),
    ("trainable_token_indices", |_| false, "trainable token rows are not implemented"),
    ("layer_replication", |_| false, "layer replication is not implemented"),
    ("use_qalora", is_false, "QA-LoRA is not implemented"),
    ("alora_invocation_tokens", |_| false, "activated LoRA is not implemented"),
    ("megatron_config", |_| false, "Megatron-parallel layers are not implemented"),
    ("arrow_config", |_| false, "Arrow routing is not implemented"),
    ("kasa_config", |_| false, "KaSA (singular-value adaptation) is not implemented"),
    ("monteclora_config", |_| false, "Monte Carlo LoRA is not implemented"),
    ("use_bdlora", |_| false, "block-diagonal LoRA is not implemented"),
    ("velora_config", |_| false, "VeLoRA's compressed backward pass is not implemented"),
];

/// Parse an `adapter_config.json` value, refusing the fields (and values) tunecheck cannot
/// honour, each named in the error.
pub fn parse_config(v: &Value, path: &Path) -> Result<(LoraConfig, Option<Option<QuantConfig>>, Option<String>)> {
    let c = Fields::new(v, Some(path), "")?;
    match c.str("peft_type")? {
        "LORA" => {}
        other => return Err(c.bad("peft_type", format!("`{other}` is not supported (LORA)"))),
    }
    for flag in ["use_dora", "fan_in_fan_out", "lora_bias", "use_qalora"] {
        c.opt_bool(flag)?;
    }
    for (field, ok, what) in REFUSED {
        c.refuse_unless(field, ok, what)?;
    }
    let r = c.usize("r")?;
    let names = |k: &str| -> Result<Vec<String>> {
        if let Some(Value::String(s)) = c.get(k) {
            return Err(c.bad(k, format!("a regular expression (`{s}`) is not supported; list the module names")));
        }
        Ok(c.opt_str_list(k)?.unwrap_or_default())
    };
    let lora = LoraConfig {
        r,
        alpha: c.f64("lora_alpha")?,
        use_rslora: c.opt_bool("use_rslora")?.unwrap_or(false),
        dropout: c.opt_f64("lora_dropout")?.unwrap_or(0.0),
        target_modules: names("target_modules")?,
        modules_to_save: names("modules_to_save")?,
        init: LoraInit::Default,
        ensure_weight_tying: c.opt_bool("ensure_weight_tying")?.unwrap_or(false),
    };
    // Harmless fields, still typed.
    c.opt_str("task_type")?;
    c.opt_bool("inference_mode")?;
    lora.validate().map_err(|e| match e {
        Error::Config { field, msg, .. } => cfg_err(path, &field, msg),
        other => other,
    })?;
    let base_quant = match c.object().get(QUANT_KEY) {
        None => None,
        Some(Value::Null) => Some(None),
        Some(_) => Some(Some(crate::io::config::quant_from_fields(&c.object_field(QUANT_KEY)?)?)),
    };
    let base_model = c.opt_str("base_model_name_or_path")?.map(str::to_string);
    Ok((lora, base_quant, base_model))
}

/// Read an adapter directory (tensors on the host).
pub fn read(dir: &Path) -> Result<Adapter> {
    crate::io::atomic::check_dir(dir)?;
    if !dir.is_dir() {
        return Err(Error::file(dir, "is not an adapter directory"));
    }
    let cfg_path = dir.join(CONFIG);
    let text = std::fs::read_to_string(&cfg_path).map_err(|e| Error::io(&cfg_path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::file(&cfg_path, format!("not valid JSON: {e}")))?;
    let (lora, base_quant, base_model) = parse_config(&v, &cfg_path)?;
    let wpath = dir.join(WEIGHTS);
    let st = StFile::open(&wpath)?;
    let mut tensors = BTreeMap::new();
    for key in st.names()? {
        let name = key
            .strip_prefix(PREFIX)
            .ok_or_else(|| Error::tensor(&wpath, &key, format!("does not start with `{PREFIX}`")))?;
        tensors.insert(name.to_string(), st.load(&key)?);
    }
    Ok(Adapter { lora, base_quant, tensors, base_model })
}

/// Refuse an adapter whose recorded base quantization differs from `base_quant` (the base it
/// is about to be applied to); an adapter that records none (PEFT-made) is accepted.
pub fn check_base_quant(adapter: &Adapter, base_quant: Option<&QuantConfig>, dir: &Path) -> Result<()> {
    if let Some(recorded) = &adapter.base_quant {
        if recorded.as_ref() != base_quant {
            let show = |q: Option<&QuantConfig>| {
                q.map_or("none (unquantized)".to_string(), |q| crate::io::config::quant_to_json(q).to_string())
            };
            return Err(cfg_err(
                &dir.join(CONFIG),
                QUANT_KEY,
                format!(
                    "the adapter was trained on a base with quantization {} but is being applied to one with {}; \
                     reload the base with the recorded config",
                    show(recorded.as_ref()),
                    show(base_quant)
                ),
            ));
        }
    }
    Ok(())
}

/// Base weights PEFT saves beside an adapter: the frozen embedding and head when they are
/// LoRA targets (`embed_tokens.base_layer.weight`, `lm_head.base_layer.weight`), or the whole
/// matrices under their plain names when the vocabulary was resized and they are neither
/// targets nor `modules_to_save` (`save_embedding_layers="auto"`). They replace the base's.
#[derive(Debug, Default)]
pub struct SavedBase {
    /// The embedding `[vocab, hidden]` and its key.
    pub embed: Option<(String, Tensor)>,
    /// The head `[vocab, hidden]` and its key.
    pub head: Option<(String, Tensor)>,
}

/// Take the [`SavedBase`] tensors out of an adapter's `values`.
pub fn take_saved_base(values: &mut BTreeMap<String, Tensor>, lora: &LoraConfig) -> SavedBase {
    let mut take = |module: &str, key: &str| {
        let lora_key = format!("{key}.base_layer.weight");
        if let Some(t) = values.remove(&lora_key) {
            return Some((lora_key, t));
        }
        let plain = format!("{key}.weight");
        if lora.modules_to_save.iter().any(|m| m == module) {
            return None; // that key is the trainable copy
        }
        values.remove(&plain).map(|t| (plain, t))
    };
    SavedBase { embed: take("embed_tokens", "model.embed_tokens"), head: take("lm_head", "lm_head") }
}

impl SavedBase {
    /// Whether the adapter carries base weights.
    pub fn is_empty(&self) -> bool {
        self.embed.is_none() && self.head.is_none()
    }

    /// Check the saved matrices against `spec` (the base they replace): width `hidden_size`,
    /// embedding and head with the same rows, a changed vocabulary given for both matrices of
    /// an untied model. Returns the vocabulary size they define. Errors name `dir`'s weights
    /// file and the key.
    pub fn vocab(&self, spec: &ArchSpec, dir: &Path) -> Result<usize> {
        let file = dir.join(WEIGHTS);
        let mut rows = None;
        for (key, t) in self.embed.iter().chain(self.head.iter()) {
            let bad = |msg: String| Error::tensor(&file, format!("{PREFIX}{key}"), msg);
            let (v, h) =
                t.dims2().map_err(|_| bad(format!("shape {:?}, expected [vocab, {}]", t.dims(), spec.hidden_size)))?;
            if h != spec.hidden_size || v == 0 {
                return Err(bad(format!("shape {:?}, expected [vocab, {}]", t.dims(), spec.hidden_size)));
            }
            match rows {
                Some(r) if r != v => {
                    return Err(bad(format!("{v} rows, but the other saved embedding matrix has {r}")))
                }
                _ => rows = Some(v),
            }
        }
        let v = rows.unwrap_or(spec.vocab_size);
        if v != spec.vocab_size && !spec.tie_word_embeddings {
            for (present, key) in [(self.embed.is_some(), "model.embed_tokens"), (self.head.is_some(), "lm_head")] {
                if !present {
                    return Err(Error::tensor(
                        &file,
                        format!("{PREFIX}{key}.weight"),
                        format!("missing: the adapter resizes the vocabulary from {} to {v}", spec.vocab_size),
                    ));
                }
            }
        }
        Ok(v)
    }
}

/// Write `params` of an adapter with `lora` as a PEFT directory, recording the base's
/// quantization, as one crash-safe directory save.
///
/// `model` is the model the adapter is attached to: when `embed_tokens` or `lm_head` is a
/// LoRA target, its frozen matrix is saved beside the adapter as PEFT does
/// (`<module>.base_layer.weight`, `save_embedding_layers="auto"`).
pub fn save(
    dir: &Path,
    model: &Transformer,
    lora: &LoraConfig,
    params: &Params,
    base_quant: Option<&QuantConfig>,
    base_model: &str,
) -> Result<()> {
    crate::io::atomic::save_dir(dir, &owns, |st| write_into(st, model, lora, params, base_quant, base_model))
}

/// The top-level names an adapter save owns in its directory.
pub fn owns(name: &str) -> bool {
    name == CONFIG || name == WEIGHTS
}

/// Write the adapter's files into a directory save.
pub(crate) fn write_into(
    st: &mut Staged,
    model: &Transformer,
    lora: &LoraConfig,
    params: &Params,
    base_quant: Option<&QuantConfig>,
    base_model: &str,
) -> Result<()> {
    let mut tensors = BTreeMap::new();
    for (name, v) in params {
        tensors.insert(format!("{PREFIX}{name}"), v.as_tensor().to_device(&Device::Cpu)?);
    }
    let targeted = |m: &str| lora.target_modules.iter().any(|t| t == m);
    if targeted("embed_tokens") {
        tensors.insert(format!("{PREFIX}model.embed_tokens.base_layer.weight"), model.embed().to_device(&Device::Cpu)?);
    }
    if targeted("lm_head") {
        match &model.lm_head().base {
            crate::adapt::linear::Base::Dense(t) => {
                tensors.insert(format!("{PREFIX}lm_head.base_layer.weight"), t.to_device(&Device::Cpu)?);
            }
            crate::adapt::linear::Base::Quant4(_) => {
                return Err(Error::Msg("cannot save a 4-bit lm_head beside its adapter".into()))
            }
        }
    }
    let cfg = json!({
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "use_rslora": lora.use_rslora,
        "target_modules": lora.target_modules,
        "modules_to_save": if lora.modules_to_save.is_empty() { Value::Null } else { json!(lora.modules_to_save) },
        "ensure_weight_tying": lora.ensure_weight_tying,
        "bias": "none",
        "fan_in_fan_out": false,
        "use_dora": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layers_to_transform": null,
        "layers_pattern": null,
        "rank_pattern": {},
        "alpha_pattern": {},
        QUANT_KEY: base_quant.map_or(Value::Null, crate::io::config::quant_to_json),
    });
    stage_tensors(st, WEIGHTS, hosted(&tensors)?)?;
    let bytes = serde_json::to_vec_pretty(&cfg).map_err(|e| Error::Msg(e.to_string()))?;
    st.write(CONFIG, &bytes)
}
