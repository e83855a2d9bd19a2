//! P3 — save → load in a fresh subject, built from the directory alone (no setup, no 4-bit,
//! LoRA or training config), gives bitwise identical eval logits, seeded samples and trainable
//! tensors, and one more optimizer step after the reload equals the same step in the run that
//! never stopped; and a `fit` stopped in the middle of an epoch, saved, loaded and fitted to the
//! end equals the fit that never stopped (the position inside the epoch travels too: no batch
//! seen twice or skipped). The 4-bit config with its original and compute dtypes, the adapter,
//! the optimizer moments, the schedule and data position and the RNG state all travel with
//! the checkpoint.
//! Bitwise because the same computation runs on the same values: any difference means
//! something was not saved, or was restored differently.

use candle_core::Device;

use crate::error::Result;
use crate::model::Mode;
use crate::props::property::Property;
use crate::props::{bitwise_equal, rel_l2, Check, Violation};
use crate::strategy::random_batches;
use crate::subject::{Capabilities, Factory, FitPlan, Setup, Trainer};

const ID: &str = "P3/save_reload_bitwise";

/// The catalogue entry.
pub const PROPERTY: Property = Property {
    id: "P3",
    test_name: "p3_save_reload_bitwise",
    title: "save -> load bitwise, resume bitwise",
    invariant: "save, then load from the directory alone: eval logits, seeded samples and trainable tensors \
                identical; one more step after the reload == the same step without the reload; a fit stopped \
                mid-epoch, reloaded and finished == the uninterrupted fit (4-bit config and dtypes, optimizer \
                moments, schedule, data position and RNG state travel)",
    tolerance: "bitwise in every dtype (same computation, same values)",
    needs: Capabilities { save_load: true, ..Capabilities::none() },
    ..Property::trainer(check)
};

fn fail(code: &'static str, detail: String) -> Check {
    Err(Violation::new(ID, code, detail).into())
}

/// A scratch directory removed on drop.
pub struct Scratch(pub std::path::PathBuf);

impl Scratch {
    /// A new empty directory under the system temp dir, named after `what`.
    pub fn new(what: &str) -> Result<Self> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "tunecheck-{what}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&p).map_err(|e| crate::error::Error::io(&p, e))?;
        Ok(Scratch(p))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
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

/// Check P3 on one setup.
pub fn check(f: &dyn Factory, device: &Device, setup: &Setup) -> Check {
    let mut t = f.build(setup, device)?;
    let data = random_batches(setup.spec.vocab_size, setup.adapter_seed, 3, 2, 8);
    t.train_step(&data[..1])?;
    let dir = Scratch::new("p3")?;
    t.save(&dir.0)?;
    let mut u = f.load(device, &dir.0)?;
    let ids = data[1].ids_tensor(device)?;
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
    t.train_step(&data[2..3])?;
    u.train_step(&data[2..3])?;
    same_trainables(t.as_ref(), u.as_ref(), "resume_differs", "after one more step (reloaded vs uninterrupted)")?;
    resume_mid_epoch(f, device, setup)
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
