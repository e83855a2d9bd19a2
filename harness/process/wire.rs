//! The driver protocol's data: the handshake, the setup directory tunecheck writes for
//! `build`, batch files, and the tensor files a driver answers with (checked for names,
//! shapes and finiteness of layout before use). The protocol itself is documented in
//! `harness/drivers/PROTOCOL.md`; [`VERSION`] is its version.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::io::st::{write_safetensors, StFile};
use crate::spec::{short_dtype_name, Family};
use crate::subject::{Capabilities, Setup};
use crate::train::Batch;

/// The protocol version this tunecheck speaks.
pub const VERSION: u64 = 1;

/// PEFT's key prefix: tensors in protocol files are keyed as PEFT saves an adapter.
pub const PREFIX: &str = crate::io::peft::PREFIX;

/// What a driver said about itself in its `hello` answer.
#[derive(Debug, Clone)]
pub struct Hello {
    /// The framework under test, e.g. `transformers+peft`.
    pub framework: String,
    /// Its version(s), free text, e.g. `transformers 4.45.2, peft 0.13.2, torch 2.4.1`.
    pub version: String,
    /// Optional abilities.
    pub capabilities: Capabilities,
    /// Families the driver can build, and the reason for each it cannot.
    pub families: Vec<Family>,
    /// Why a family is not supported, by family.
    pub unsupported: BTreeMap<String, String>,
}

fn bad_hello(msg: impl std::fmt::Display) -> Error {
    Error::Driver { op: "hello".into(), msg: msg.to_string() }
}

impl Hello {
    /// Parse and check a `hello` answer.
    pub fn parse(v: &Value) -> Result<Hello> {
        let version = v.get("protocol").and_then(Value::as_u64).ok_or_else(|| bad_hello("no integer `protocol`"))?;
        if version != VERSION {
            return Err(bad_hello(format!("the driver speaks protocol {version}; this tunecheck speaks {VERSION}")));
        }
        let text = |k: &str| -> Result<String> {
            v.get(k).and_then(Value::as_str).map(str::to_string).ok_or_else(|| bad_hello(format!("no string `{k}`")))
        };
        let caps = v.get("capabilities").and_then(Value::as_object).ok_or_else(|| bad_hello("no `capabilities`"))?;
        let flag = |k: &str| -> Result<bool> {
            match caps.get(k) {
                None => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                Some(other) => Err(bad_hello(format!("capability `{k}` is {other}, not a boolean"))),
            }
        };
        for k in caps.keys() {
            if !CAPABILITY_NAMES.contains(&k.as_str()) {
                return Err(bad_hello(format!("unknown capability `{k}` (known: {})", CAPABILITY_NAMES.join(", "))));
            }
        }
        let mut capabilities = Capabilities::none();
        capabilities.save_load = flag("save_load")?;
        capabilities.quant4 = flag("quant4")?;
        capabilities.grad_accum = flag("grad_accum")?;
        capabilities.train_embeddings = flag("train_embeddings")?;
        capabilities.bf16 = flag("bf16")?;
        capabilities.f16 = flag("f16")?;
        capabilities.dropout = flag("dropout")?;
        capabilities.reproducible_dropout = flag("reproducible_dropout")?;
        // Incremental decoding is not part of the protocol: P1's cache clause needs the Rust
        // trait.
        capabilities.kv_cache = false;
        let names = v.get("families").and_then(Value::as_array).ok_or_else(|| bad_hello("no `families` list"))?;
        let mut families = Vec::new();
        for n in names {
            let s = n.as_str().ok_or_else(|| bad_hello(format!("family {n} is not a string")))?;
            families.push(
                Family::from_name(s)
                    .ok_or_else(|| bad_hello(format!("unknown family `{s}` (llama, gemma, gemma2, gemma3)")))?,
            );
        }
        let mut unsupported = BTreeMap::new();
        if let Some(u) = v.get("unsupported").and_then(Value::as_object) {
            for (k, why) in u {
                unsupported.insert(k.clone(), why.as_str().unwrap_or("(no reason given)").to_string());
            }
        }
        Ok(Hello { framework: text("framework")?, version: text("version")?, capabilities, families, unsupported })
    }
}

/// A typed refusal in an error answer (`"kind"`): `untrained_tokens` with `ids`,
/// `non_finite` with `what`, `value` and `step`, or `unsupported` (the case is beyond what the
/// framework version takes; set aside as a skip). Properties tell these apart from crashes.
pub fn refusal(answer: &Value) -> Option<Error> {
    match answer.get("kind").and_then(Value::as_str)? {
        "untrained_tokens" => {
            let ids =
                answer.get("ids")?.as_array()?.iter().map(|x| x.as_u64().map(|x| x as u32)).collect::<Option<_>>()?;
            Some(Error::UntrainedTokens { ids })
        }
        "unsupported" => Some(Error::Unsupported {
            what: answer.get("error").and_then(Value::as_str).unwrap_or("(no reason given)").to_string(),
        }),
        "non_finite" => {
            let what = match answer.get("what").and_then(Value::as_str) {
                Some("loss") => "loss",
                Some("gradient norm") => "gradient norm",
                _ => "value",
            };
            let value = answer.get("value").and_then(Value::as_f64).unwrap_or(f64::NAN);
            let step = answer.get("step").and_then(Value::as_u64).unwrap_or(0) as usize;
            Some(Error::NonFinite { what, value, step })
        }
        _ => None,
    }
}

/// The error answer for `e`, typed when it is a refusal (see [`refusal`]).
pub fn error_answer(e: &Error) -> Value {
    let mut v = json!({"ok": false, "error": e.to_string()});
    match e {
        Error::UntrainedTokens { ids } => {
            v["kind"] = "untrained_tokens".into();
            v["ids"] = json!(ids);
        }
        Error::NonFinite { what, value, step } => {
            v["kind"] = "non_finite".into();
            v["what"] = (*what).into();
            // JSON has no NaN: a non-finite value is sent as null and read back as NaN.
            v["value"] = serde_json::Number::from_f64(*value).map_or(Value::Null, Value::Number);
            v["step"] = (*step).into();
        }
        _ => {}
    }
    v
}

/// Capability names a driver may declare in `hello`.
pub const CAPABILITY_NAMES: [&str; 8] =
    ["save_load", "quant4", "grad_accum", "train_embeddings", "bf16", "f16", "dropout", "reproducible_dropout"];

/// `capabilities` as a `hello` answer declares them.
pub fn capabilities_json(c: &Capabilities) -> Value {
    json!({
        "save_load": c.save_load,
        "quant4": c.quant4,
        "grad_accum": c.grad_accum,
        "train_embeddings": c.train_embeddings,
        "bf16": c.bf16,
        "f16": c.f16,
        "dropout": c.dropout,
        "reproducible_dropout": c.reproducible_dropout,
    })
}

/// Write the directory a driver builds a subject from: `base/` (a Hugging Face checkpoint of
/// the synthetic base in its dtype, with a tokenizer of its vocabulary), for a 4-bit setup
/// `base-4bit/` (the same base pre-quantized, as transformers + bitsandbytes save it), `adapter/` (a PEFT adapter directory holding tunecheck's
/// seeded initial values, B non-zero) and `train.json` (the training configuration, the 4-bit
/// configuration, the dtype, and the seed and B scale the initial adapter was drawn with, for
/// drivers that rebuild it rather than read it).
pub fn write_setup(dir: &Path, setup: &Setup) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    crate::io::hf::save(&dir.join("base"), &setup.spec, &setup.weights, crate::io::hf::Sharding::Single)?;
    // The stacks that load a tokenizer with the model (TRL, Unsloth, LLaMA-Factory) need one.
    crate::data::vocab::write(&dir.join("base"), &setup.spec)?;
    // The initial adapter: tunecheck's seeded LoRA factors, and full copies of the base's
    // `modules_to_save` tensors as they are (untrained rows included: fixing them is the
    // trainer's job).
    let host_weights = setup
        .weights
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_device(&Device::Cpu)?)))
        .collect::<Result<crate::weights::Weights>>()?;
    // A 4-bit setup's base also as a pre-quantized checkpoint, written as transformers +
    // bitsandbytes save a 4-bit model, for drivers that load one instead of quantizing the
    // dense base at load.
    if let Some(q) = setup.quant.as_ref() {
        let qdir = dir.join("base-4bit");
        crate::io::quantize::save_quantized(&qdir, &setup.spec, &host_weights, q)?;
        crate::data::vocab::write(&qdir, &setup.spec)?;
    }
    let values = crate::adapt::LoraValues::Seeded { seed: setup.adapter_seed, master: DType::F32 };
    let inject = crate::adapt::Inject::none().with_lora(setup.lora.clone(), values);
    let crate::loader::Loaded { model, params } = crate::loader::build(&setup.spec, &host_weights, inject)?;
    crate::io::peft::save(&dir.join("adapter"), &model, &setup.lora, &params, setup.quant.as_ref(), "base")?;
    let train = json!({
        "protocol": VERSION,
        "family": setup.spec.family.short_name(),
        "dtype": short_dtype_name(setup.spec.dtype),
        "quantization": setup.quant.as_ref().map_or(Value::Null, crate::io::config::quant_to_json),
        "adapter_seed": setup.adapter_seed,
        "adapter_init": match setup.lora.init {
            crate::adapt::LoraInit::Default => Value::Null,
            crate::adapt::LoraInit::NonZero(s) => json!({"b_std": s}),
        },
        "train": crate::train::checkpoint::config_to_json(&setup.train),
    });
    let bytes = serde_json::to_vec_pretty(&train).map_err(|e| Error::Msg(e.to_string()))?;
    crate::io::atomic::write_atomic(&dir.join("train.json"), &bytes)
}

/// Write `batch` as a safetensors file: `input_ids`, `labels` (−100 masks a position; the
/// model shifts) and `attention_mask` (the batch's, all ones when it has none), each i64
/// `[batch, seq]`.
pub fn write_batch(path: &Path, batch: &Batch) -> Result<()> {
    let b = batch.ids.len();
    let s = batch.ids.first().map_or(0, Vec::len);
    let ids: Vec<i64> = batch.ids.iter().flatten().map(|&x| x as i64).collect();
    let labels: Vec<i64> = batch.labels.iter().flatten().copied().collect();
    let t = |v: Vec<i64>| Tensor::from_vec(v, (b, s), &Device::Cpu);
    let map = BTreeMap::from([
        ("input_ids".to_string(), t(ids)?),
        ("labels".to_string(), t(labels)?),
        (
            "attention_mask".to_string(),
            t(match &batch.attention_mask {
                Some(m) => m.iter().flatten().map(|&x| i64::from(x)).collect(),
                None => vec![1i64; b * s],
            })?,
        ),
    ]);
    write_safetensors(path, &map)
}

/// Read a batch file written by [`write_batch`].
pub fn read_batch(path: &Path) -> Result<Batch> {
    let st = StFile::open(path)?;
    let get = |k: &str| -> Result<Vec<Vec<i64>>> {
        let t = st.load(k)?.to_dtype(DType::I64)?;
        t.to_vec2::<i64>().map_err(|e| Error::tensor(path, k, format!("not a [batch, seq] tensor: {e}")))
    };
    let ids = get("input_ids")?;
    let labels = get("labels")?;
    let ids = ids
        .into_iter()
        .map(|row| {
            row.into_iter()
                .map(|x| u32::try_from(x).map_err(|_| Error::tensor(path, "input_ids", "negative id")))
                .collect()
        })
        .collect::<Result<Vec<Vec<u32>>>>()?;
    let mask = get("attention_mask")?;
    if mask.iter().flatten().any(|&x| x != 0 && x != 1) {
        return Err(Error::tensor(path, "attention_mask", "values other than 0 and 1"));
    }
    let attention_mask = if mask.iter().flatten().all(|&x| x == 1) {
        None
    } else {
        Some(mask.into_iter().map(|r| r.into_iter().map(|x| x as u8).collect()).collect())
    };
    Ok(Batch { ids, labels, attention_mask })
}

/// Read the tensor file a driver wrote for operation `op`: `want` gives every expected name
/// (protocol keys) and shape; extra and wrongly shaped tensors are errors naming the file and
/// tensor, and so are missing ones unless `partial` (a gradient file lists only the tensors
/// that received a gradient: a missing one is the property's finding, not a protocol error).
/// Returned as f32 on `device`, keyed by the names in `want`.
pub fn read_tensors(
    op: &str,
    path: &Path,
    want: &[(String, Vec<usize>)],
    partial: bool,
    device: &Device,
) -> Result<BTreeMap<String, Tensor>> {
    let fail = |msg: String| Error::Driver { op: op.to_string(), msg };
    let st = StFile::open(path).map_err(|e| fail(e.to_string()))?;
    let names = st.names()?;
    let mut out = BTreeMap::new();
    for (name, shape) in want {
        let Some((_, got)) = st.info(name)? else {
            if partial {
                continue;
            }
            return Err(fail(format!(
                "{}: tensor `{name}` is missing (the file has {} tensors)",
                path.display(),
                names.len()
            )));
        };
        if &got != shape {
            return Err(fail(format!("{}: tensor `{name}` has shape {got:?}, expected {shape:?}", path.display())));
        }
        out.insert(name.clone(), st.load(name)?.to_dtype(DType::F32)?.to_device(device)?);
    }
    if let Some(extra) = names.iter().find(|n| !want.iter().any(|(w, _)| w == *n)) {
        return Err(Error::Msg(format!("driver, operation `{op}`: {}: unexpected tensor `{extra}`", path.display())));
    }
    Ok(out)
}

/// A scratch work directory for one factory (removed on drop), handing out fresh paths.
pub struct WorkDir {
    dir: crate::io::scratch::Scratch,
    next: std::cell::Cell<u64>,
}

impl WorkDir {
    /// A new directory under the system temp dir.
    pub fn new() -> Result<WorkDir> {
        Ok(WorkDir { dir: crate::io::scratch::Scratch::new("driver")?, next: std::cell::Cell::new(0) })
    }

    /// A fresh path inside, named `<what>-<n><ext>`.
    pub fn fresh(&self, what: &str, ext: &str) -> PathBuf {
        let n = self.next.get();
        self.next.set(n + 1);
        self.dir.0.join(format!("{what}-{n}{ext}"))
    }
}
