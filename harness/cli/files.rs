//! The commands that read and write model directories: `synth` (a seeded checkpoint),
//! `quantize` (to 4 bits as bitsandbytes saves it), `train` (the fine-tune recipe: a LoRA
//! adapter on the synthetic successor task, saved for PEFT), `logits` (eval logits of a
//! checkpoint with an optional adapter) and `inspect` (the checkpoint doctor).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::adapt::{LoraConfig, QuantConfig};
use crate::cli::{CmdResult, Failure, Outcome};
use crate::io::{hf, st};
use crate::quant::QuantType;
use crate::spec::Family;
use crate::Mode;

/// `synth`: write the seeded checkpoint of `config` (or the tiny spec of `family`) to `out`,
/// a tensor at a time (an 8B spec never needs its size in memory).
pub fn synth(
    family: &str,
    config: Option<&Path>,
    seed: u64,
    out: &Path,
    shard_bytes: Option<usize>,
    json: bool,
) -> CmdResult {
    let spec = match config {
        Some(p) => crate::io::config::read(p)?,
        None => {
            let f = Family::from_name(family)
                .ok_or_else(|| Failure::usage(format!("unknown family `{family}` (llama, gemma, gemma2, gemma3)")))?;
            crate::ArchSpec::tiny(f)
        }
    };
    let sharding = shard_bytes.map_or(hf::Sharding::Single, hf::Sharding::MaxBytes);
    hf::save_generated(out, &spec, sharding, &mut |key| crate::weights::generate_one(&spec, seed, key, &Device::Cpu))?;
    Ok(Outcome::done(
        json,
        format!(
            "wrote {} ({}, {} parameters, seed {seed}) to {}",
            spec.family,
            spec.family.architecture(),
            spec.num_parameters(),
            out.display()
        ),
        json!({
            "out": out,
            "model_type": spec.family.model_type(),
            "parameters": spec.num_parameters(),
            "seed": seed,
        }),
    ))
}

/// The 4-bit configuration `quantize` writes.
#[derive(Debug, Clone)]
pub struct QuantArgs {
    /// `nf4` or `fp4`.
    pub quant: String,
    /// Elements per block.
    pub blocksize: usize,
    /// Quantize the block scales too.
    pub double_quant: bool,
    /// `f32`, `bf16` or `f16`.
    pub compute_dtype: String,
    /// Largest file (bytes) before the checkpoint is sharded (`None`: transformers' 50 GB).
    pub shard_bytes: Option<usize>,
}

fn quant_type(name: &str) -> Result<QuantType, Failure> {
    QuantType::parse(name).ok_or_else(|| Failure::usage(format!("--quant: `{name}` is not nf4 or fp4")))
}

/// `quantize`: the projections of `model` to 4 bits, saved to `out` as transformers +
/// bitsandbytes save them, a layer at a time.
pub fn quantize(model: &Path, out: &Path, q: &QuantArgs, json: bool) -> CmdResult {
    let quant_type = quant_type(&q.quant)?;
    let blocksize = q.blocksize;
    crate::quant::blockwise::check_blocksize(blocksize)
        .map_err(|_| Failure::usage(format!("--blocksize: {blocksize} is not a power of two in 32..=4096")))?;
    let compute_dtype = crate::spec::parse_dtype(&q.compute_dtype)
        .ok_or_else(|| Failure::usage(format!("--compute-dtype: `{}` is not f32, bf16 or f16", q.compute_dtype)))?;
    let cfg = QuantConfig { quant_type, blocksize, double_quant: q.double_quant, compute_dtype };
    let max = q.shard_bytes.unwrap_or(crate::io::quantize::DEFAULT_MAX_SHARD_BYTES);
    if max == 0 {
        return Err(Failure::usage("--shard-bytes 0: a shard must hold at least one byte"));
    }
    crate::io::quantize::quantize_dir(model, out, &cfg, max)?;
    let layers = crate::io::config::read(&model.join(hf::CONFIG))?.num_layers;
    Ok(Outcome::done(
        json,
        format!("wrote {} 4-bit checkpoint ({layers} layers) to {}", quant_type.name(), out.display()),
        json!({"out": out, "quantization_config": crate::io::config::quant_to_json(&cfg), "layers": layers}),
    ))
}

/// The fine-tune recipe of `train`.
#[derive(Debug, Clone)]
pub struct Recipe {
    /// Optimizer steps (one micro-batch of 8 sequences each).
    pub steps: usize,
    /// LoRA rank (alpha is twice the rank).
    pub rank: usize,
    /// Comma-separated PEFT module names.
    pub targets: String,
    /// `nf4` or `fp4` for QLoRA (f32 compute), or none.
    pub quant: Option<String>,
    /// Seed of the adapter init and the data.
    pub seed: u64,
}

/// `train`: fine-tune a LoRA adapter on the base in `model` by `recipe` and save it to `out`
/// as a PEFT directory. `on_step(step, steps, loss)` follows each optimizer step.
pub fn train(
    model: &Path,
    out: &Path,
    recipe: &Recipe,
    json: bool,
    on_step: &mut dyn FnMut(usize, usize, f64),
) -> CmdResult {
    use crate::data::{tokenizer, SuccessorTask};
    use crate::train::{RefTrainer, TrainConfig};
    let ck = hf::load(model, &Device::Cpu, None)?;
    let quant = match &recipe.quant {
        None => None,
        Some(q) => {
            Some(QuantConfig { quant_type: quant_type(q)?, compute_dtype: DType::F32, ..QuantConfig::default() })
        }
    };
    let lora = LoraConfig {
        r: recipe.rank,
        alpha: 2.0 * recipe.rank as f64,
        target_modules: recipe.targets.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect(),
        ..LoraConfig::default()
    };
    let tok = tokenizer::fixture()?;
    if ck.spec.vocab_size < tok.get_vocab_size(true) {
        return Err(Failure::usage(format!(
            "the model's vocab ({}) does not cover the fixture tokenizer ({})",
            ck.spec.vocab_size,
            tok.get_vocab_size(true)
        )));
    }
    let (steps, seed) = (recipe.steps, recipe.seed);
    let task = SuccessorTask::new(tokenizer::specials(&tok)?, seed, 16);
    let data = task.batches(seed, steps, 8, 10);
    let mut tr = RefTrainer::new(&ck.spec, &ck.weights, &lora, quant, TrainConfig::default(), seed)?;
    let probe = &data[..data.len().min(4)];
    let before = tr.eval_loss(probe)?;
    // One step at a time (the same steps as one `fit`), to follow the loss.
    for step in 1..=data.len() {
        let h = tr.fit_until(&data, &[], Some(1))?;
        if let Some((_, _, loss)) = h.train.last() {
            on_step(step, data.len(), *loss);
        }
    }
    let after = tr.eval_loss(probe)?;
    crate::io::peft::save(out, tr.model(), tr.lora(), tr.params(), tr.quant(), &model.display().to_string())?;
    Ok(Outcome::done(
        json,
        format!("trained {steps} steps: loss {before:.4} -> {after:.4}; adapter written to {}", out.display()),
        json!({"out": out, "steps": steps, "loss_before": before, "loss_after": after}),
    ))
}

/// The inputs of `logits`: `input_ids` / `input_ids_<suffix>` tensors of a safetensors file
/// (int64 `[batch, seq]`) and comma-separated id lists.
pub fn logits_inputs(input: Option<&Path>, ids: &[String]) -> Result<BTreeMap<String, Tensor>, Failure> {
    let mut inputs: BTreeMap<String, Tensor> = BTreeMap::new();
    if let Some(path) = input {
        let f = st::StFile::open(path)?;
        for name in f.names()? {
            if name != "input_ids" && !name.starts_with("input_ids_") {
                continue;
            }
            let Some((dtype, shape)) = f.info(&name)? else { continue };
            let bad = |what: String| Failure::usage(format!("{}: tensor `{name}`: {what}", path.display()));
            if dtype != safetensors::Dtype::I64 {
                return Err(bad(format!("dtype {dtype:?}, expected I64")));
            }
            if shape.len() != 2 || shape[0] == 0 || shape[1] == 0 {
                return Err(bad(format!("shape {shape:?}, expected [batch, seq] with both > 0")));
            }
            inputs.insert(name.clone(), f.load(&name)?);
        }
        if inputs.is_empty() {
            return Err(Failure::usage(format!(
                "{}: no tensor named `input_ids` or `input_ids_<suffix>`",
                path.display()
            )));
        }
    }
    let many = ids.len() > 1;
    for (k, g) in ids.iter().enumerate() {
        let v = g
            .split(',')
            .map(|x| x.trim().parse::<u32>().map_err(|_| Failure::usage(format!("--ids: `{x}` is not a token id"))))
            .collect::<Result<Vec<_>, _>>()?;
        let name =
            if many || inputs.contains_key("input_ids") { format!("input_ids_ids{k}") } else { "input_ids".into() };
        let n = v.len();
        inputs.insert(name, Tensor::from_vec(v.into_iter().map(i64::from).collect::<Vec<_>>(), (1, n), &Device::Cpu)?);
    }
    if inputs.is_empty() {
        return Err(Failure::usage("nothing to run: give --input FILE or --ids 1,2,3"));
    }
    Ok(inputs)
}

/// `logits`: eval-mode logits of the checkpoint in `model_dir` (with the adapter in
/// `adapter`) for `inputs`, written to `out` as float32 `logits` / `logits_<suffix>`, or
/// summarised (shape, finiteness, argmax per position).
pub fn logits(
    model_dir: &Path,
    inputs: &BTreeMap<String, Tensor>,
    out: Option<&PathBuf>,
    device: &str,
    adapter: Option<&Path>,
    json: bool,
) -> CmdResult {
    let device = crate::cli::device(device)?;
    let model = crate::loader::open(model_dir, &device, adapter)?.model;
    let spec = model.spec();
    let mut outputs = BTreeMap::new();
    for (name, ids) in inputs {
        let logits = model
            .forward(ids, Mode::Eval)
            .map_err(|e| Failure::usage(format!("input `{name}`: {e}")))?
            .to_dtype(DType::F32)?;
        outputs.insert(name.replacen("input_ids", "logits", 1), logits);
    }
    if let Some(path) = out {
        st::write_safetensors(path, &outputs)?;
        return Ok(Outcome::done(
            json,
            format!("wrote {} tensor(s) to {}", outputs.len(), path.display()),
            json!({"out": path, "tensors": outputs.keys().collect::<Vec<_>>()}),
        ));
    }
    let mut summary = serde_json::Map::new();
    let mut text = format!(
        "model: {} ({} layers, vocab {}, {} parameters)\n",
        spec.family,
        spec.num_layers,
        spec.vocab_size,
        spec.num_parameters()
    );
    for (name, l) in &outputs {
        let am = l.argmax(candle_core::D::Minus1)?.to_vec2::<u32>()?;
        let finite = l.flatten_all()?.to_vec1::<f32>()?.iter().all(|x| x.is_finite());
        text.push_str(&format!("{name}: shape {:?}, finite: {finite}\n", l.dims()));
        for (r, row) in am.iter().enumerate() {
            text.push_str(&format!("  row {r} argmax per position: {row:?}\n"));
        }
        summary.insert(name.clone(), json!({"shape": l.dims(), "finite": finite, "argmax": am}));
    }
    Ok(Outcome::print(if json { format!("{}\n", crate::report::json(&summary)) } else { text }, 0))
}

/// `inspect`: the checkpoint doctor's report (exit code 1 with findings); `progress(file,
/// done, total)` follows the scan of the tensor files.
pub fn inspect(
    dir: &Path,
    adapter: Option<&Path>,
    device: &str,
    json: bool,
    progress: impl FnMut(&Path, usize, usize),
) -> CmdResult {
    let device = crate::cli::device(device)?;
    let r = crate::inspect::inspect(dir, adapter, &device, progress)?;
    let text = if json { format!("{}\n", crate::report::json(&r)) } else { crate::report::inspect::render(&r) };
    Ok(Outcome::print(text, r.exit_code()))
}
