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

use crate::adapt::attach::{attach, load_values, Params};
use crate::adapt::lora::{LoraConfig, LoraInit};
use crate::adapt::qlora::QuantConfig;
use crate::error::{Error, Result};
use crate::io::atomic::Staged;
use crate::io::st::{hosted, stage_tensors, StFile};
use crate::model::Transformer;

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

/// Parse an `adapter_config.json` value.
pub fn parse_config(v: &Value, path: &Path) -> Result<(LoraConfig, Option<Option<QuantConfig>>, Option<String>)> {
    let o = v.as_object().ok_or_else(|| cfg_err(path, "(root)", "not a JSON object"))?;
    let get = |k: &str| o.get(k).filter(|x| !x.is_null());
    match get("peft_type").and_then(Value::as_str) {
        Some("LORA") => {}
        Some(other) => return Err(cfg_err(path, "peft_type", format!("`{other}` is not supported (LORA)"))),
        None => return Err(cfg_err(path, "peft_type", "missing")),
    }
    let r = get("r").and_then(Value::as_u64).ok_or_else(|| cfg_err(path, "r", "missing or not a positive integer"))?
        as usize;
    let alpha = get("lora_alpha")
        .and_then(Value::as_f64)
        .ok_or_else(|| cfg_err(path, "lora_alpha", "missing or not a number"))?;
    let dropout = get("lora_dropout")
        .map_or(Ok(0.0), |x| x.as_f64().ok_or_else(|| cfg_err(path, "lora_dropout", "not a number")))?;
    let use_rslora = get("use_rslora")
        .map_or(Ok(false), |x| x.as_bool().ok_or_else(|| cfg_err(path, "use_rslora", "not a boolean")))?;
    let names = |k: &str| -> Result<Vec<String>> {
        match get(k) {
            None => Ok(Vec::new()),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_str().map(str::to_string).ok_or_else(|| cfg_err(path, k, format!("entry {x} is not a string")))
                })
                .collect(),
            Some(Value::String(s)) => {
                Err(cfg_err(path, k, format!("a regular expression (`{s}`) is not supported; list the module names")))
            }
            Some(x) => Err(cfg_err(path, k, format!("expected a list of module names, got {x}"))),
        }
    };
    let target_modules = names("target_modules")?;
    let modules_to_save = names("modules_to_save")?;
    for (k, unsupported) in [("use_dora", "DoRA"), ("fan_in_fan_out", "fan_in_fan_out")] {
        if get(k).and_then(Value::as_bool) == Some(true) {
            return Err(cfg_err(path, k, format!("{unsupported} is not supported")));
        }
    }
    if let Some(b) = get("bias").and_then(Value::as_str) {
        if b != "none" {
            return Err(cfg_err(path, "bias", format!("`{b}` is not supported (none)")));
        }
    }
    for k in ["rank_pattern", "alpha_pattern"] {
        if get(k).and_then(Value::as_object).is_some_and(|m| !m.is_empty()) {
            return Err(cfg_err(path, k, "per-module ranks or alphas are not supported"));
        }
    }
    if get("layers_to_transform").is_some() {
        return Err(cfg_err(path, "layers_to_transform", "adapting a subset of layers is not supported"));
    }
    let lora = LoraConfig {
        r,
        alpha,
        use_rslora,
        dropout,
        target_modules,
        modules_to_save,
        init: LoraInit::Default,
        ensure_weight_tying: get("ensure_weight_tying").and_then(Value::as_bool).unwrap_or(false),
    };
    lora.validate().map_err(|e| match e {
        Error::Config { field, msg, .. } => cfg_err(path, &field, msg),
        other => other,
    })?;
    let base_quant = match o.get(QUANT_KEY) {
        None => None,
        Some(Value::Null) => Some(None),
        Some(q) => Some(Some(QuantConfig::from_json(q).map_err(|e| match e {
            Error::Config { field, msg, .. } => cfg_err(path, &format!("{QUANT_KEY}.{field}"), msg),
            other => other,
        })?)),
    };
    let base_model = get("base_model_name_or_path").and_then(Value::as_str).map(str::to_string);
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
            let show =
                |q: Option<&QuantConfig>| q.map_or("none (unquantized)".to_string(), |q| q.to_json().to_string());
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

/// Take the frozen embedding PEFT saves beside an embedding adapter
/// (`embed_tokens.base_layer.weight`) out of `values`, checked against the base's shape `dims`.
pub fn take_base_embed(values: &mut BTreeMap<String, Tensor>, dims: &[usize], dir: &Path) -> Result<Option<Tensor>> {
    let Some(base_embed) = values.remove("model.embed_tokens.base_layer.weight") else {
        return Ok(None);
    };
    if base_embed.dims() != dims {
        return Err(Error::tensor(
            &dir.join(WEIGHTS),
            format!("{PREFIX}model.embed_tokens.base_layer.weight"),
            format!("shape {:?}, expected {dims:?}", base_embed.dims()),
        ));
    }
    Ok(Some(base_embed))
}

/// Attach a read adapter to `model` (whose base has quantization `base_quant`), loading
/// its values; returns the parameters (f32, trainable for further fine-tuning).
pub fn apply(
    model: &mut Transformer,
    adapter: &Adapter,
    base_quant: Option<&QuantConfig>,
    dir: &Path,
) -> Result<Params> {
    check_base_quant(adapter, base_quant, dir)?;
    let mut values = adapter.tensors.clone();
    let dims = model.embed().dims().to_vec();
    if let Some(base_embed) = take_base_embed(&mut values, &dims, dir)? {
        // PEFT saves the embedding next to an embedding adapter; it is frozen.
        let t = base_embed.to_dtype(model.spec().dtype)?.to_device(model.device())?;
        model.set_embed(t, true)?;
    }
    let params = attach(model, &adapter.lora, 0, candle_core::DType::F32)?;
    load_values(&params, &values, &dir.join(WEIGHTS).display().to_string())?;
    Ok(params)
}

/// Write `params` of an adapter with `lora` as a PEFT directory, recording the base's
/// quantization, as one crash-safe directory save.
pub fn save(
    dir: &Path,
    lora: &LoraConfig,
    params: &Params,
    base_quant: Option<&QuantConfig>,
    base_model: &str,
) -> Result<()> {
    crate::io::atomic::save_dir(dir, &owns, |st| write_into(st, lora, params, base_quant, base_model))
}

/// The top-level names an adapter save owns in its directory.
pub fn owns(name: &str) -> bool {
    name == CONFIG || name == WEIGHTS
}

/// Write the adapter's files into a directory save.
pub(crate) fn write_into(
    st: &mut Staged,
    lora: &LoraConfig,
    params: &Params,
    base_quant: Option<&QuantConfig>,
    base_model: &str,
) -> Result<()> {
    let mut tensors = BTreeMap::new();
    for (name, v) in params {
        tensors.insert(format!("{PREFIX}{name}"), v.as_tensor().to_device(&Device::Cpu)?);
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
        QUANT_KEY: base_quant.map_or(Value::Null, QuantConfig::to_json),
    });
    stage_tensors(st, WEIGHTS, hosted(&tensors)?)?;
    let bytes = serde_json::to_vec_pretty(&cfg).map_err(|e| Error::Msg(e.to_string()))?;
    st.write(CONFIG, &bytes)
}
