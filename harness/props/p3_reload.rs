//! P3 — save → load in a fresh trainer gives bitwise identical eval logits, identical seeded
//! samples and identical trainable tensors; the 4-bit configuration and compute dtype travel
//! with the checkpoint. Bitwise because the same computation runs on the same values: any
//! difference means something was not saved, or was restored differently.

use candle_core::Device;

use crate::error::Result;
use crate::model::Mode;
use crate::props::runner::{run, PropConfig, PropOutcome};
use crate::props::{bitwise_equal, rel_l2, Check, Violation};
use crate::strategy::{arb_setup, random_batches, AdapterKind};
use crate::subject::{Capabilities, Setup, Trainer};

const ID: &str = "P3/save_reload_bitwise";

fn fail(detail: String) -> Check {
    Err(Violation { property: ID, detail }.into())
}

/// A scratch directory removed on drop.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new() -> Result<Self> {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "tunecheck-p3-{}-{}",
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

/// Check P3 on one setup.
pub fn check<T: Trainer>(factory: &impl Fn(&Setup, &Device) -> Result<T>, device: &Device, setup: &Setup) -> Check {
    let mut t = factory(setup, device)?;
    let data = random_batches(setup.spec.vocab_size, setup.adapter_seed, 2, 2, 8);
    t.train_step(&data[..1])?;
    let dir = Scratch::new()?;
    t.save(&dir.0)?;
    let u = T::load(setup, device, &dir.0)?;
    let ids = data[1].ids_tensor(device)?;
    let (a, b) = (t.logits(&ids, Mode::Eval)?, u.logits(&ids, Mode::Eval)?);
    if !bitwise_equal(&a, &b)? {
        return fail(format!("eval logits differ after reload: rel L2 {:.3e}", rel_l2(&a, &b)?));
    }
    let prompt = ids.narrow(1, 0, 1)?;
    let (sa, sb) = (t.sample(&prompt, 4, 7)?, u.sample(&prompt, 4, 7)?);
    if sa != sb {
        return fail(format!("seeded samples differ after reload: {sa:?} vs {sb:?}"));
    }
    let (ta, tb) = (t.trainable(), u.trainable());
    if ta.len() != tb.len() {
        return fail(format!("{} trainable tensors before, {} after reload", ta.len(), tb.len()));
    }
    for ((na, va), (nb, vb)) in ta.iter().zip(&tb) {
        if na != nb || !bitwise_equal(va, vb)? {
            return fail(format!("trainable tensor `{na}` differs after reload"));
        }
    }
    Ok(())
}

/// Run P3 for every adapter kind.
pub fn save_reload<T: Trainer>(
    factory: &impl Fn(&Setup, &Device) -> Result<T>,
    device: &Device,
    cfg: &PropConfig,
) -> PropOutcome {
    let mut cases = 0;
    for kind in AdapterKind::ALL {
        let needs = Capabilities { save_load: true, quant4: kind == AdapterKind::QLora, ..Capabilities::none() };
        match run(factory, device, needs, arb_setup(kind, 1), cfg, check) {
            PropOutcome::Passed { cases: c } => cases += c,
            PropOutcome::Skipped(why) => return PropOutcome::Skipped(why),
            failed => return failed,
        }
    }
    PropOutcome::Passed { cases }
}
