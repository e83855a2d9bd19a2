//! `config.json` ↔ [`ArchSpec`], and its `quantization_config` ↔ [`QuantConfig`], read with the
//! strict field reader.
//!
//! `config.json` is read in both placements transformers has used: 4.x (`rope_theta`,
//! `rope_scaling`, `rope_local_base_freq` at top level, layer pattern derived) and 5.x
//! (`rope_parameters`, possibly one entry per layer type, and explicit `layer_types`). The
//! explicit fields win when both are present. It is written in the 5.x placement, with the
//! 4.x top-level fields alongside so older readers load it too.

use std::path::Path;

use candle_core::DType;
use serde_json::{json, Map, Value};

use crate::adapt::QuantConfig;
use crate::error::Result;
use crate::io::fields::Fields;
use crate::quant::QuantType;
use crate::spec::{default_layer_types, dtype_name, parse_dtype, ArchSpec, Family, LayerType, Rope, RopeScaling};

/// Parse a `config.json` value (4.x or 5.x placement) and validate it.
pub fn parse(v: &Value) -> Result<ArchSpec> {
    let c = Fields::new(v, None, "")?;
    let model_type = c.str("model_type")?;
    let family = Family::from_model_type(model_type).ok_or_else(|| {
        c.bad("model_type", format!("`{model_type}` is not supported (llama, gemma, gemma2, gemma3_text)"))
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
                return Err(c.bad(
                    "num_attention_heads",
                    format!("{num_heads} does not divide hidden_size = {hidden_size} and no head_dim is given"),
                ));
            }
            hidden_size / num_heads
        }
    };
    for act_key in ["hidden_act", "hidden_activation"] {
        if let Some(a) = c.opt_str(act_key)? {
            let want = if family.is_gemma() { ["gelu_pytorch_tanh", "gelu_pytorch_tanh"] } else { ["silu", "swish"] };
            if !want.contains(&a) {
                return Err(c.bad(act_key, format!("`{a}` is not supported for {family} (expected {})", want[0])));
            }
        }
    }
    if c.opt_bool("use_bidirectional_attention")? == Some(true) {
        return Err(c.bad("use_bidirectional_attention", "bidirectional attention is not a causal LM; not supported"));
    }
    for flag in ["attention_bias", "mlp_bias"] {
        if c.opt_bool(flag)? == Some(true) {
            return Err(c.bad(flag, "biases are not supported"));
        }
    }
    let dtype =
        match c.opt_str("dtype")?.map(|s| ("dtype", s)).or(c.opt_str("torch_dtype")?.map(|s| ("torch_dtype", s))) {
            None => DType::F32,
            Some((field, s)) => {
                parse_dtype(s).ok_or_else(|| c.bad(field, format!("`{s}` is not float32, bfloat16 or float16")))?
            }
        };

    let sliding_window = c.opt_usize("sliding_window")?.or(match family {
        Family::Gemma2 | Family::Gemma3 => Some(4096),
        _ => None,
    });
    let layer_types = match c.object().get("layer_types") {
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, t)| match t.as_str() {
                Some("full_attention") => Ok(LayerType::Full),
                Some("sliding_attention") => Ok(LayerType::Sliding),
                _ => Err(c.bad(
                    &format!("layer_types[{i}]"),
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
                return Err(c.bad("sliding_window_pattern", "must be at least 1"));
            }
            default_layer_types(family, num_layers, pattern)
        }
        Some(other) => return Err(c.bad("layer_types", format!("expected an array, got {other}"))),
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
            Family::Gemma2 => c.f64_or_null("attn_logit_softcapping", Some(50.0))?,
            Family::Gemma3 => c.f64_or_null("attn_logit_softcapping", None)?,
            _ => None,
        },
        final_logit_softcapping: match family {
            Family::Gemma2 => c.f64_or_null("final_logit_softcapping", Some(30.0))?,
            Family::Gemma3 => c.f64_or_null("final_logit_softcapping", None)?,
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
pub fn read(path: &Path) -> Result<ArchSpec> {
    let bytes = std::fs::read(path).map_err(|e| crate::error::Error::io(path, e))?;
    let v = Fields::parse(&bytes, path)?;
    parse(&v).map_err(|e| e.in_file(path))
}

/// The `config.json` transformers loads for this spec (5.x fields plus 4.x top-level rope).
pub fn to_json(spec: &ArchSpec) -> Value {
    let f = spec.family;
    let mut m = Map::new();
    m.insert("architectures".into(), json!([f.architecture()]));
    m.insert("model_type".into(), json!(f.model_type()));
    m.insert("vocab_size".into(), json!(spec.vocab_size));
    // No padding token: transformers' Gemma configs default to `pad_token_id` 0, which makes
    // `nn.Embedding(padding_idx=0)` drop every gradient of token 0's row — a different
    // model from the one this spec describes (where every row trains).
    m.insert("pad_token_id".into(), Value::Null);
    m.insert("hidden_size".into(), json!(spec.hidden_size));
    m.insert("intermediate_size".into(), json!(spec.intermediate_size));
    m.insert("num_hidden_layers".into(), json!(spec.num_layers));
    m.insert("num_attention_heads".into(), json!(spec.num_heads));
    m.insert("num_key_value_heads".into(), json!(spec.num_kv_heads));
    m.insert("head_dim".into(), json!(spec.head_dim));
    m.insert("max_position_embeddings".into(), json!(spec.max_position_embeddings));
    m.insert("rms_norm_eps".into(), json!(spec.rms_norm_eps));
    m.insert("tie_word_embeddings".into(), json!(spec.tie_word_embeddings));
    m.insert("attention_bias".into(), json!(false));
    m.insert("attention_dropout".into(), json!(spec.attention_dropout));
    if spec.residual_dropout > 0.0 {
        m.insert("residual_dropout".into(), json!(spec.residual_dropout));
    }
    let act_key = if f.is_gemma() { "hidden_activation" } else { "hidden_act" };
    m.insert(act_key.into(), json!(if f.is_gemma() { "gelu_pytorch_tanh" } else { "silu" }));
    if f == Family::Llama {
        m.insert("mlp_bias".into(), json!(false));
    }
    let dt = dtype_name(spec.dtype);
    m.insert("dtype".into(), json!(dt));
    m.insert("torch_dtype".into(), json!(dt));
    // Rope: 4.x top-level fields, and 5.x rope_parameters.
    m.insert("rope_theta".into(), json!(spec.rope.theta));
    m.insert("rope_scaling".into(), rope_scaling_json(&spec.rope.scaling));
    if f == Family::Gemma3 {
        m.insert("rope_local_base_freq".into(), json!(spec.rope_local.theta));
        m.insert(
            "rope_parameters".into(),
            json!({
                "full_attention": rope_parameters_json(&spec.rope),
                "sliding_attention": rope_parameters_json(&spec.rope_local),
            }),
        );
    } else {
        m.insert("rope_parameters".into(), rope_parameters_json(&spec.rope));
    }
    if let Some(q) = spec.query_pre_attn_scalar {
        // transformers 5 types this field as int; write integral values as integers.
        let v = if q.fract() == 0.0 && q.abs() < 1e15 { json!(q as i64) } else { json!(q) };
        m.insert("query_pre_attn_scalar".into(), v);
    }
    if matches!(f, Family::Gemma2 | Family::Gemma3) {
        m.insert("attn_logit_softcapping".into(), json!(spec.attn_logit_softcapping));
        m.insert("final_logit_softcapping".into(), json!(spec.final_logit_softcapping));
    }
    if let Some(w) = spec.sliding_window {
        m.insert("sliding_window".into(), json!(w));
    }
    if f != Family::Llama || spec.layer_types.contains(&LayerType::Sliding) {
        m.insert("layer_types".into(), json!(spec.layer_types.iter().map(|t| t.as_str()).collect::<Vec<_>>()));
    }
    m.insert("use_cache".into(), json!(true));
    Value::Object(m)
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
    if v.is_null() {
        return Ok(Rope::plain(theta));
    }
    let c = Fields::new(v, None, field)?;
    let theta = c.opt_f64("rope_theta")?.unwrap_or(theta);
    let kind = match c.opt_str("rope_type")? {
        Some(t) => t,
        None => c.opt_str("type")?.unwrap_or("default"),
    };
    let scaling = match kind {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear { factor: c.f64("factor")? },
        "llama3" => RopeScaling::Llama3 {
            factor: c.f64("factor")?,
            low_freq_factor: c.f64("low_freq_factor")?,
            high_freq_factor: c.f64("high_freq_factor")?,
            original_max_position_embeddings: c.usize("original_max_position_embeddings")?,
        },
        other => return Err(c.bad("rope_type", format!("`{other}` is not supported (default, linear, llama3)"))),
    };
    Ok(Rope { theta, scaling })
}

fn parse_rope(c: &Fields<'_>, family: Family) -> Result<(Rope, Rope)> {
    let top_theta = c.opt_f64("rope_theta")?;
    let local_theta = c.opt_f64("rope_local_base_freq")?;
    if let Some(params) = c.object().get("rope_parameters").filter(|v| !v.is_null()) {
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
    let full = parse_rope_object("rope_scaling", c.object().get("rope_scaling").unwrap_or(&Value::Null), theta)?;
    let local = if family == Family::Gemma3 { Rope::plain(local_theta.unwrap_or(10_000.0)) } else { full };
    Ok((full, local))
}

/// Read `path` (a `config.json`): its `quantization_config`, if any.
pub fn read_quant(path: &Path) -> Result<Option<QuantConfig>> {
    let bytes = std::fs::read(path).map_err(|e| crate::error::Error::io(path, e))?;
    let v = Fields::parse(&bytes, path)?;
    let c = Fields::new(&v, Some(path), "")?;
    c.opt_object("quantization_config")?.map(|q| quant_from_fields(&q)).transpose()
}

/// Parse a `quantization_config` object (errors without a file; see [`read_quant`]).
pub fn parse_quant(v: &Value) -> Result<QuantConfig> {
    quant_from_fields(&Fields::new(v, None, "quantization_config")?)
}

/// Parse a `quantization_config` object. Missing fields take transformers' defaults (the trap
/// this crate exists to catch is then visible in the returned value); a field of the wrong
/// type is an error; 8-bit loading and skipped modules other than `lm_head` are refused.
pub fn quant_from_fields(o: &Fields<'_>) -> Result<QuantConfig> {
    let d = QuantConfig::transformers_defaults();
    let method = o.opt_str("quant_method")?.unwrap_or("bitsandbytes");
    if method != "bitsandbytes" {
        return Err(o.bad("quant_method", format!("`{method}` is not supported (bitsandbytes)")));
    }
    o.refuse_unless("load_in_8bit", crate::io::fields::is_false, "8-bit bitsandbytes weights are not implemented")?;
    if o.opt_bool("load_in_4bit")? != Some(true) {
        return Err(o.bad("load_in_4bit", "only 4-bit bitsandbytes checkpoints are supported (expected true)"));
    }
    o.refuse_unless(
        "llm_int8_skip_modules",
        |v| v.as_array().is_some_and(|a| a.iter().all(|m| m == "lm_head")),
        "keeping modules other than lm_head unquantized is not implemented",
    )?;
    let quant_type = match o.opt_str("bnb_4bit_quant_type")? {
        None => d.quant_type,
        Some(s) => {
            QuantType::parse(s).ok_or_else(|| o.bad("bnb_4bit_quant_type", format!("`{s}` is not nf4 or fp4")))?
        }
    };
    let compute_dtype = match o.opt_str("bnb_4bit_compute_dtype")? {
        None => d.compute_dtype,
        Some(s) => parse_dtype(s)
            .ok_or_else(|| o.bad("bnb_4bit_compute_dtype", format!("`{s}` is not float32, bfloat16 or float16")))?,
    };
    if let Some(s) = o.opt_str("bnb_4bit_quant_storage")? {
        if s != "uint8" {
            return Err(o.bad("bnb_4bit_quant_storage", format!("`{s}` is not supported (uint8)")));
        }
    }
    Ok(QuantConfig {
        quant_type,
        blocksize: o.opt_usize("tunecheck_blocksize")?.unwrap_or(d.blocksize),
        double_quant: o.opt_bool("bnb_4bit_use_double_quant")?.unwrap_or(d.double_quant),
        compute_dtype,
    })
}

/// The `quantization_config` object of `config.json`.
pub fn quant_to_json(q: &QuantConfig) -> Value {
    let mut v = json!({
        "quant_method": "bitsandbytes",
        "load_in_4bit": true,
        "load_in_8bit": false,
        "bnb_4bit_quant_type": q.quant_type.name(),
        "bnb_4bit_use_double_quant": q.double_quant,
        "bnb_4bit_compute_dtype": dtype_name(q.compute_dtype),
        "bnb_4bit_quant_storage": "uint8",
        "llm_int8_skip_modules": null,
    });
    if q.blocksize != 64 {
        // transformers has no field for it (bitsandbytes' Linear4bit uses 64); each tensor's
        // quant_state also records it.
        v["tunecheck_blocksize"] = json!(q.blocksize);
    }
    v
}
