//! Trainer checkpoints that stand on their own: the adapter as a PEFT directory (which records
//! the base's 4-bit configuration), the base model as a Hugging Face checkpoint in `base/`
//! (its `config.json` carries the original dtype), `optimizer.safetensors` (AdamW moments) and
//! `trainer_state.json` (optimizer step, schedule step, epoch and the position inside it, the
//! training configuration and the dropout stream's position). [`load`] needs nothing but the directory, and a run resumed
//! from it continues bitwise like one that never stopped. The save is one crash-safe directory
//! save: a kill at any point leaves the old or the new checkpoint.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::Device;
use serde_json::{json, Value};

use crate::adapt::QuantConfig;
use crate::error::{Error, Result};
use crate::io::atomic::Staged;
use crate::io::fields::Fields;
use crate::io::peft;
use crate::io::st::{hosted, stage_tensors, StFile};
use crate::spec::{dtype_name, parse_dtype};
use crate::train::optim::{AdamWConfig, Schedule};
use crate::train::trainer::{EvalStrategy, RefTrainer, TrainConfig, TrainFaults};
use crate::train::untrained::UntrainedPolicy;

/// The trainer state file name.
pub const STATE: &str = "trainer_state.json";
/// The optimizer moments file name.
pub const OPTIMIZER: &str = "optimizer.safetensors";
/// The base model's sub-directory.
pub const BASE: &str = "base";

/// Save the base, adapter, optimizer moments, configuration and progress of `tr` into `dir`,
/// as one crash-safe directory save.
pub fn save(tr: &RefTrainer, dir: &Path, base_model: &str) -> Result<()> {
    crate::io::hf::check_savable(tr.spec(), tr.base_weights())?;
    crate::io::atomic::save_dir(dir, &owns, |st| write_into(st, tr, base_model))
}

/// The top-level names a trainer checkpoint owns in its directory.
pub fn owns(name: &str) -> bool {
    peft::owns(name) || name == STATE || name == OPTIMIZER || name == BASE
}

fn write_into(st: &mut Staged, tr: &RefTrainer, base_model: &str) -> Result<()> {
    peft::write_into(st, tr.model(), tr.lora(), tr.saved_params(), tr.quant(), base_model)?;
    crate::io::hf::write_into(st, &format!("{BASE}/"), tr.spec(), tr.base_weights(), crate::io::hf::Sharding::Single)?;
    let moments = if tr.faults().skip_optimizer_state { BTreeMap::new() } else { tr.optimizer().state_tensors()? };
    stage_tensors(st, OPTIMIZER, hosted(&moments)?)?;
    let (schedule_step, epoch) = tr.progress();
    let state = json!({
        "optimizer_step": tr.optimizer().step,
        "schedule_step": schedule_step,
        "epoch": epoch,
        "window_in_epoch": tr.window_in_epoch(),
        "dropout_word_pos": tr.model().dropout_word_pos().to_string(),
        "train_config": config_to_json(tr.config()),
    });
    let bytes = serde_json::to_vec_pretty(&state).map_err(|e| Error::Msg(e.to_string()))?;
    st.write(STATE, &bytes)
}

/// What a faulty reload does differently (mutants only; all off by default).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ReloadFaults {
    /// Quantize the base with this configuration instead of the recorded one.
    pub quant: Option<QuantConfig>,
    /// Keep the recorded 4-bit configuration but compute in this dtype.
    pub compute_dtype: Option<candle_core::DType>,
    /// Load the base in this dtype instead of the one its `config.json` records.
    pub base_dtype: Option<candle_core::DType>,
}

/// Load a trainer saved by [`save`] from `dir` alone, onto `device`.
pub fn load(device: &Device, dir: &Path) -> Result<RefTrainer> {
    load_with(device, dir, TrainFaults::default(), ReloadFaults::default())
}

/// [`load`] with planted bugs (mutants only).
pub fn load_with(device: &Device, dir: &Path, faults: TrainFaults, reload: ReloadFaults) -> Result<RefTrainer> {
    crate::io::atomic::check_dir(dir)?;
    let base = crate::io::hf::load(&dir.join(BASE), device, reload.base_dtype)?;
    if base.quant.is_some() {
        return Err(Error::file(&dir.join(BASE), "the saved base must be dense (its 4-bit config is in the adapter)"));
    }
    let adapter = peft::read(dir)?;
    let cfg_path = dir.join(peft::CONFIG);
    let mut quant = match adapter.base_quant {
        Some(q) => q,
        None => {
            return Err(Error::Config {
                file: Some(cfg_path),
                field: peft::QUANT_KEY.into(),
                msg: "missing: a trainer checkpoint records the base's quantization (null when dense)".into(),
            })
        }
    };
    if let Some(q) = reload.quant {
        quant = quant.map(|_| q);
    }
    if let (Some(d), Some(q)) = (reload.compute_dtype, quant.as_mut()) {
        q.compute_dtype = d;
    }
    let (st_path, v) = read_state(dir)?;
    let root = Fields::new(&v, Some(&st_path), "")?;
    let cfg = config_from_json(&root.object_field("train_config")?)?;
    let lora = crate::adapt::LoraConfig { init: crate::adapt::lora::LoraInit::Default, ..adapter.lora.clone() };
    let mut tr = RefTrainer::build(&base.spec, &base.weights, &lora, quant, cfg, 0, faults)?;
    restore_values(&mut tr, dir, &adapter.tensors, &root)?;
    if faults.schedule_not_restored {
        tr.restart_schedule_keep_carried_lr();
    }
    Ok(tr)
}

/// `trainer_state.json` of `dir`, parsed.
fn read_state(dir: &Path) -> Result<(std::path::PathBuf, Value)> {
    let st_path = dir.join(STATE);
    let bytes = std::fs::read(&st_path).map_err(|e| Error::io(&st_path, e))?;
    let v = Fields::parse(&bytes, &st_path)?;
    Ok((st_path, v))
}

/// Restore adapter values, optimizer moments and progress saved by [`save`] into `tr`,
/// which must have been built with the same base, adapter config and quantization.
pub fn resume(tr: &mut RefTrainer, dir: &Path) -> Result<()> {
    let adapter = peft::read(dir)?;
    // The initialisation is not saved (it no longer matters once values are loaded).
    let saved = crate::adapt::LoraConfig { init: tr.lora().init, ..adapter.lora.clone() };
    if saved != *tr.lora() {
        return Err(Error::Config {
            file: Some(dir.join(peft::CONFIG)),
            field: "(adapter)".into(),
            msg: format!("saved adapter {:?} differs from the trainer's {:?}", adapter.lora, tr.lora()),
        });
    }
    if let Some(recorded) = &adapter.base_quant {
        if recorded.as_ref() != tr.quant() {
            return Err(Error::Config {
                file: Some(dir.join(peft::CONFIG)),
                field: peft::QUANT_KEY.into(),
                msg: "the checkpoint was trained on a differently quantized base".into(),
            });
        }
    }
    let (st_path, v) = read_state(dir)?;
    restore_values(tr, dir, &adapter.tensors, &Fields::new(&v, Some(&st_path), "")?)
}

/// Load adapter values, optimizer moments, progress and the dropout stream's position (`f`:
/// the parsed `trainer_state.json`) into `tr`.
fn restore_values(
    tr: &mut RefTrainer,
    dir: &Path,
    tensors: &BTreeMap<String, candle_core::Tensor>,
    f: &Fields,
) -> Result<()> {
    crate::adapt::inject::load_values(tr.params(), tensors, &dir.join(peft::WEIGHTS).display().to_string())?;
    let (opt_step, schedule_step, epoch) = (f.usize("optimizer_step")?, f.usize("schedule_step")?, f.usize("epoch")?);
    let opt_path = dir.join(OPTIMIZER);
    let opt = StFile::open(&opt_path)?;
    let device = tr.model().device().clone();
    let mut moments = BTreeMap::new();
    for k in opt.names()? {
        moments.insert(k.clone(), opt.load(&k)?.to_device(&device)?);
    }
    tr.optimizer_mut().restore(opt_step, &moments).map_err(|e| Error::Msg(format!("{}: {e}", opt_path.display())))?;
    tr.set_progress(schedule_step, epoch);
    tr.set_window_in_epoch(f.usize("window_in_epoch")?);
    let pos: u128 = f.str("dropout_word_pos")?.parse().map_err(|_| f.bad("dropout_word_pos", "not an integer"))?;
    if !tr.faults().rng_not_restored {
        tr.model().set_dropout_word_pos(pos);
    }
    Ok(())
}

/// The training configuration as `trainer_state.json` records it.
pub fn config_to_json(c: &TrainConfig) -> Value {
    json!({
        "learning_rate": c.optim.lr,
        "adam_beta1": c.optim.beta1,
        "adam_beta2": c.optim.beta2,
        "adam_epsilon": c.optim.eps,
        "weight_decay": c.optim.weight_decay,
        "warmup_steps": c.schedule.warmup_steps,
        "total_steps": c.schedule.total_steps,
        "min_lr_ratio": c.schedule.min_ratio,
        "max_grad_norm": c.max_grad_norm,
        "gradient_accumulation_steps": c.grad_accum,
        "num_train_epochs": c.epochs,
        "eval_strategy": match c.eval {
            EvalStrategy::No => json!("no"),
            EvalStrategy::Epoch => json!("epoch"),
            EvalStrategy::Steps(n) => json!({"steps": n}),
        },
        "master_dtype": dtype_name(c.master_dtype),
        "untrained_tokens": match c.untrained {
            UntrainedPolicy::Refuse => "refuse",
            UntrainedPolicy::FixMean => "fix_mean",
        },
        "seed": c.seed,
    })
}

/// Parse a training configuration written by [`config_to_json`] (read from `file`, named in
/// errors); every field is required and typed.
pub fn config_from_value(v: &Value, file: &Path) -> Result<TrainConfig> {
    config_from_json(&Fields::new(v, Some(file), "")?)
}

/// Parse [`config_to_json`]'s object; every field is required and typed.
fn config_from_json(f: &Fields) -> Result<TrainConfig> {
    let eval = match f.get("eval_strategy") {
        Some(Value::String(s)) if s == "no" => EvalStrategy::No,
        Some(Value::String(s)) if s == "epoch" => EvalStrategy::Epoch,
        Some(Value::Object(o)) => match o.get("steps").and_then(Value::as_u64) {
            Some(n) => EvalStrategy::Steps(n as usize),
            None => return Err(f.bad("eval_strategy", "expected \"no\", \"epoch\" or {\"steps\": N}")),
        },
        _ => return Err(f.bad("eval_strategy", "expected \"no\", \"epoch\" or {\"steps\": N}")),
    };
    let untrained = match f.str("untrained_tokens")? {
        "refuse" => UntrainedPolicy::Refuse,
        "fix_mean" => UntrainedPolicy::FixMean,
        other => return Err(f.bad("untrained_tokens", format!("`{other}` is not refuse or fix_mean"))),
    };
    let master = f.str("master_dtype")?;
    Ok(TrainConfig {
        optim: AdamWConfig {
            lr: f.f64("learning_rate")?,
            beta1: f.f64("adam_beta1")?,
            beta2: f.f64("adam_beta2")?,
            eps: f.f64("adam_epsilon")?,
            weight_decay: f.f64("weight_decay")?,
        },
        schedule: Schedule {
            warmup_steps: f.usize("warmup_steps")?,
            total_steps: f.usize("total_steps")?,
            min_ratio: f.f64("min_lr_ratio")?,
        },
        max_grad_norm: if f.present("max_grad_norm") {
            f.f64_or_null("max_grad_norm", None)?
        } else {
            return Err(f.bad("max_grad_norm", "missing"));
        },
        grad_accum: f.usize("gradient_accumulation_steps")?,
        epochs: f.usize("num_train_epochs")?,
        eval,
        master_dtype: parse_dtype(master)
            .ok_or_else(|| f.bad("master_dtype", format!("`{master}` is not float32, bfloat16 or float16")))?,
        untrained,
        seed: f.u64("seed")?,
    })
}

impl RefTrainer {
    /// Start the reference trainer from an existing PEFT LoRA adapter directory (made by PEFT
    /// or by tunecheck) over `weights`: the adapter's configuration and values, a fresh
    /// optimizer and schedule under `cfg`. An adapter that records a 4-bit base different from
    /// `quant` is refused.
    pub fn from_adapter_dir(
        spec: &crate::spec::ArchSpec,
        weights: &crate::weights::Weights,
        adapter_dir: &Path,
        quant: Option<QuantConfig>,
        cfg: TrainConfig,
    ) -> Result<RefTrainer> {
        let adapter = peft::read(adapter_dir)?;
        peft::check_base_quant(&adapter, quant.as_ref(), adapter_dir)?;
        let mut values = adapter.tensors.clone();
        let mut weights = weights.clone();
        let mut spec = spec.clone();
        let saved = peft::take_saved_base(&mut values, &adapter.lora);
        if !saved.is_empty() {
            // PEFT saves the frozen embeddings beside an adapter on them or over a resized
            // vocabulary: they are the base's.
            spec.vocab_size = saved.vocab(&spec, adapter_dir)?;
            let key = "model.embed_tokens.weight";
            let device =
                weights.get(key).ok_or_else(|| Error::Msg(format!("the base has no `{key}`")))?.device().clone();
            for (name, t) in [(key, saved.embed), ("lm_head.weight", saved.head)] {
                if let Some((_, t)) = t {
                    if name == "lm_head.weight" && spec.tie_word_embeddings {
                        continue;
                    }
                    weights.insert(name.to_string(), t.to_dtype(spec.dtype)?.to_device(&device)?);
                }
            }
        }
        let tr = RefTrainer::new(&spec, &weights, &adapter.lora, quant, cfg, 0)?;
        let file = adapter_dir.join(peft::WEIGHTS);
        crate::adapt::inject::load_values(tr.params(), &values, &file.display().to_string())?;
        Ok(tr)
    }
}
