//! P3 — save → load in a fresh subject, built from the directory alone (no setup, no 4-bit,
//! LoRA or training config), gives bitwise identical eval logits, seeded samples and trainable
//! tensors; the continuation after the reload equals the run that never stopped; and a `fit`
//! stopped in the middle of an epoch, saved, loaded and fitted to the end equals the fit that
//! never stopped (the position inside the epoch travels too: no batch seen twice or skipped).
//!
//! The subject trains before it saves — two steps, so that at least one runs at a learning
//! rate above 0 whatever the warmup — so a save that writes anything but the trained values is
//! seen; and the continuation runs three steps across a changing schedule, comparing each
//! step's learning rate and the trained tensors, so a scheduler, optimizer moments, dropout RNG
//! or data position that are not restored fail it even where the first step after the reload
//! still uses the learning rate the optimizer carried. The recipe is drawn (optimizer,
//! schedule, clipping, LoRA dropout 0 or 0.1). The 4-bit config with its original and compute
//! dtypes, the adapter, the optimizer moments, the schedule and data position and the RNG
//! state all travel with the checkpoint.
//! Bitwise because the same computation runs on the same values: any difference means
//! something was not saved, or was restored differently.

use candle_core::Device;

use crate::error::{Error, Result};
use crate::io::scratch::Scratch;
use crate::model::Mode;
use crate::props::property::Property;
use crate::props::{bitwise_equal, rel_l2, Check, Violation};
use crate::strategy::{random_batches, Draws};
use crate::subject::{Capabilities, Factory, FitPlan, Setup, Trainer};

const ID: &str = "P3/save_reload_bitwise";

/// The catalogue entry.
pub const PROPERTY: Property = Property {
    id: "P3",
    test_name: "p3_save_reload_bitwise",
    title: "save -> load bitwise, resume bitwise",
    invariant: "train 2 steps (one at lr > 0), save, load from the directory alone: eval logits, seeded samples \
                and trainable tensors identical; 3 more steps after the reload == the same steps without it (lr and \
                tensors at each); a fit stopped mid-epoch, reloaded and finished == the uninterrupted fit (4-bit \
                config and dtypes, optimizer moments, schedule, data position and RNG state travel)",
    tolerance: "bitwise in every dtype (same computation, same values)",
    needs: Capabilities { save_load: true, ..Capabilities::none() },
    draws: Draws { dropout: &[0.0, 0.1], ..Draws::TRAINING },
    ..Property::trainer(check)
};

fn fail(code: &'static str, detail: String) -> Check {
    Err(Violation::new(ID, code, detail).into())
}

fn same_trainables(a: &dyn Trainer, b: &dyn Trainer, code: &'static str, when: &str) -> Check {
    let (ta, tb) = (a.trainable(), b.trainable());
    if ta.len() != tb.len() {
        return fail(code, format!("{} trainable tensors vs {} {when}", ta.len(), tb.len()));
    }
    for ((na, va), (nb, vb)) in ta.iter().zip(&tb) {
        if na != nb {
            return fail(code, format!("trainable `{na}` is `{nb}` {when}"));
        }
        if !bitwise_equal(va, vb)? {
            return fail(code, format!("trainable `{na}` differs {when}: rel L2 {:.3e}", rel_l2(vb, va)?));
        }
    }
    Ok(())
}

/// Steps before the save (with warmup w ≤ 2 drawn, step 1 runs at lr 1/w of the peak or
/// more) and after the reload.
pub const STEPS_BEFORE: usize = 2;
/// Steps of the continuation compared after the reload.
pub const STEPS_AFTER: usize = 3;

/// Check P3 on one setup.
pub fn check(f: &dyn Factory, device: &Device, setup: &Setup) -> Check {
    let mut t = f.build(setup, device)?;
    let data = random_batches(setup.spec.vocab_size, setup.adapter_seed, STEPS_BEFORE + STEPS_AFTER + 1, 2, 8);
    let initial: Vec<(String, candle_core::Tensor)> =
        t.trainable().into_iter().map(|(n, v)| Ok((n, v.copy()?))).collect::<Result<_>>()?;
    let mut lrs = Vec::new();
    for b in &data[..STEPS_BEFORE] {
        lrs.push(t.train_step(std::slice::from_ref(b))?.lr);
    }
    if lrs.iter().all(|&lr| lr <= 0.0) {
        return Err(Error::Msg(format!(
            "P3 needs a trained subject before the save, but its {STEPS_BEFORE} steps ran at learning rates {lrs:?}"
        ))
        .into());
    }
    if same_values(&initial, &t.trainable())? {
        return fail(
            "not_trained",
            format!("{STEPS_BEFORE} steps at learning rates {lrs:?} changed no trainable tensor"),
        );
    }
    let dir = Scratch::new("p3")?;
    t.save(&dir.0)?;
    let mut u = f.load(device, &dir.0)?;
    let ids = data[STEPS_BEFORE].ids_tensor(device)?;
    let (a, b) = (t.logits(&ids, Mode::Eval)?, u.logits(&ids, Mode::Eval)?);
    if !bitwise_equal(&a, &b)? {
        return fail("logits_differ", format!("eval logits differ after reload: rel L2 {:.3e}", rel_l2(&b, &a)?));
    }
    let prompt = ids.narrow(1, 0, 1)?;
    let (sa, sb) = (t.sample(&prompt, 4, 7)?, u.sample(&prompt, 4, 7)?);
    if sa != sb {
        return fail("samples_differ", format!("seeded samples differ after reload: {sa:?} vs {sb:?}"));
    }
    same_trainables(t.as_ref(), u.as_ref(), "trainable_differ", "after reload")?;
    for (i, b) in data[STEPS_BEFORE + 1..].iter().enumerate() {
        let (ra, rb) = (t.train_step(std::slice::from_ref(b))?, u.train_step(std::slice::from_ref(b))?);
        if ra.lr != rb.lr {
            return fail(
                "resume_differs",
                format!(
                    "step {} after the reload ran at learning rate {} where the uninterrupted run used {}: the \
                     schedule was not restored",
                    i + 1,
                    rb.lr,
                    ra.lr
                ),
            );
        }
        let when = format!("after {} more step(s) (reloaded vs uninterrupted)", i + 1);
        same_trainables(t.as_ref(), u.as_ref(), "resume_differs", &when)?;
    }
    resume_mid_epoch(f, device, setup)
}

/// True when two lists of named tensors are bitwise equal.
fn same_values(a: &[(String, candle_core::Tensor)], b: &[(String, candle_core::Tensor)]) -> Result<bool> {
    if a.len() != b.len() {
        return Ok(false);
    }
    for ((na, va), (nb, vb)) in a.iter().zip(b) {
        if na != nb || !bitwise_equal(va, vb)? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Batches per epoch and the step after which the interrupted fit stops (inside epoch 2).
const EPOCH_BATCHES: usize = 4;
const STOP_AFTER: usize = 6;

/// A fit over 2 epochs stopped after [`STOP_AFTER`] steps, saved, loaded and finished equals
/// the fit that never stopped.
fn resume_mid_epoch(f: &dyn Factory, device: &Device, setup: &Setup) -> Check {
    let k = setup.train.grad_accum.max(1);
    let data = random_batches(setup.spec.vocab_size, setup.adapter_seed ^ 0x5eed, EPOCH_BATCHES * k, 2, 8);
    let mut straight = f.build(setup, device)?;
    let whole = straight.fit(&data, &[], FitPlan::epochs(2))?;
    let mut first = f.build(setup, device)?;
    first.fit(&data, &[], FitPlan { epochs: 2, max_steps: Some(STOP_AFTER) })?;
    let dir = Scratch::new("p3-mid-epoch")?;
    first.save(&dir.0)?;
    drop(first);
    let mut second = f.load(device, &dir.0)?;
    let rest = second.fit(&data, &[], FitPlan::epochs(2))?;
    let want = whole.train.len().saturating_sub(STOP_AFTER);
    if rest.train.len() != want {
        return fail(
            "resume_mid_epoch",
            format!(
                "a fit stopped after {STOP_AFTER} of {} steps and resumed from its checkpoint took {} more steps, \
                 not {want}: batches of the interrupted epoch were repeated or skipped",
                whole.train.len(),
                rest.train.len()
            ),
        );
    }
    same_trainables(straight.as_ref(), second.as_ref(), "resume_mid_epoch", "after a mid-epoch stop, reload and finish")
}
