//! Trainer checkpoints: the adapter as a PEFT directory plus `trainer_state.json` (optimizer
//! step, schedule step, epoch) and `optimizer.safetensors` (AdamW moments), so a run resumed
//! from a checkpoint continues bitwise like one that never stopped. Every file is atomic.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::io::atomic::write_atomic;
use crate::io::peft;
use crate::io::st::{write_safetensors, StFile};
use crate::train::trainer::RefTrainer;

/// The trainer state file name.
pub const STATE: &str = "trainer_state.json";
/// The optimizer moments file name.
pub const OPTIMIZER: &str = "optimizer.safetensors";

/// Save the adapter, optimizer moments and progress of `tr` into `dir`.
pub fn save(tr: &RefTrainer, dir: &Path, base_model: &str) -> Result<()> {
    crate::io::atomic::transaction(|| save_inner(tr, dir, base_model))
}

fn save_inner(tr: &RefTrainer, dir: &Path, base_model: &str) -> Result<()> {
    peft::save(dir, tr.lora(), tr.params(), tr.quant(), base_model)?;
    write_safetensors(&dir.join(OPTIMIZER), &tr.optimizer().state_tensors())?;
    let (schedule_step, epoch) = tr.progress();
    let state = json!({
        "optimizer_step": tr.optimizer().step,
        "schedule_step": schedule_step,
        "epoch": epoch,
    });
    let bytes = serde_json::to_vec_pretty(&state).map_err(|e| Error::Msg(e.to_string()))?;
    write_atomic(&dir.join(STATE), &bytes)
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
    crate::adapt::attach::load_values(tr.params(), &adapter.tensors, &dir.join(peft::WEIGHTS).display().to_string())?;
    let st_path = dir.join(STATE);
    let text = std::fs::read_to_string(&st_path).map_err(|e| Error::io(&st_path, e))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| Error::file(&st_path, format!("not valid JSON: {e}")))?;
    let field = |k: &str| -> Result<usize> {
        v.get(k).and_then(Value::as_u64).map(|x| x as usize).ok_or_else(|| Error::Config {
            file: Some(st_path.clone()),
            field: k.into(),
            msg: "missing or not a non-negative integer".into(),
        })
    };
    let (opt_step, schedule_step, epoch) = (field("optimizer_step")?, field("schedule_step")?, field("epoch")?);
    let opt = StFile::open(&dir.join(OPTIMIZER))?;
    let device = tr.model().device().clone();
    let mut moments = BTreeMap::new();
    for k in opt.names()? {
        moments.insert(k.clone(), opt.load(&k)?.to_device(&device)?);
    }
    tr.optimizer_mut().restore(opt_step, &moments)?;
    tr.set_progress(schedule_step, epoch);
    Ok(())
}
