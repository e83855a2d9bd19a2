//! P8 — gradient reach: every trainable tensor receives a finite, non-zero gradient on a
//! batch that exercises it (adapters start with non-zero B, so A's gradient is not trivially
//! zero), and an optimizer step changes trainable tensors and leaves frozen ones bitwise
//! unchanged. Catches fused ops without a backward, which detach the graph silently while
//! the loss still falls through the layers after them.

use candle_core::{DType, Device};
use proptest::strategy::Strategy;

use crate::error::Result;
use crate::props::runner::{run, PropConfig, PropOutcome};
use crate::props::{bitwise_equal, Check, Violation};
use crate::strategy::{arb_setup, random_batches, AdapterKind};
use crate::subject::{Capabilities, Setup, Trainer};

const ID: &str = "P8/gradient_reach";

fn fail(detail: String) -> Check {
    Err(Violation { property: ID, detail }.into())
}

/// Check P8 on one setup.
pub fn check<T: Trainer>(factory: &impl Fn(&Setup, &Device) -> Result<T>, device: &Device, setup: &Setup) -> Check {
    let mut t = factory(setup, device)?;
    // Long enough rows that every position and layer is exercised.
    let batch = random_batches(setup.spec.vocab_size, setup.adapter_seed, 1, 3, 10);
    let grads = t.gradients(&batch)?;
    for (name, _) in t.trainable() {
        let Some(g) = grads.get(&name) else { return fail(format!("trainable `{name}` received no gradient")) };
        let v = g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        if let Some(x) = v.iter().find(|x| !x.is_finite()) {
            return fail(format!("`{name}` has a non-finite gradient ({x})"));
        }
        if v.iter().all(|&x| x == 0.0) {
            return fail(format!("`{name}` received an all-zero gradient"));
        }
    }
    // Deep copies: a trainer may update its tensors in place.
    let copy = |v: Vec<(String, candle_core::Tensor)>| -> Result<Vec<(String, candle_core::Tensor)>> {
        v.into_iter().map(|(n, x)| Ok((n, x.copy()?))).collect()
    };
    let frozen_before = copy(t.frozen())?;
    let trained_before = copy(t.trainable())?;
    t.train_step(&batch)?;
    for ((name, a), (_, b)) in frozen_before.iter().zip(t.frozen()) {
        if !bitwise_equal(a, &b)? {
            return fail(format!("frozen `{name}` changed in an optimizer step"));
        }
    }
    for ((name, a), (_, b)) in trained_before.iter().zip(t.trainable()) {
        if bitwise_equal(a, &b)? {
            return fail(format!("trainable `{name}` did not change in an optimizer step"));
        }
    }
    Ok(())
}

/// Run P8 for every adapter kind.
pub fn gradient_reach<T: Trainer>(
    factory: &impl Fn(&Setup, &Device) -> Result<T>,
    device: &Device,
    cfg: &PropConfig,
) -> PropOutcome {
    let mut cases = 0;
    for kind in AdapterKind::ALL {
        let needs = Capabilities { quant4: kind == AdapterKind::QLora, ..Capabilities::none() };
        // A window of 1 makes every key irrelevant (each query sees only itself, softmax = 1),
        // so k_proj's gradient is structurally zero there: not a batch that exercises it.
        let setups =
            arb_setup(kind, 1).prop_filter("sliding window ≥ 2", |s| s.spec.sliding_window.is_none_or(|w| w >= 2));
        match run(factory, device, needs, setups, cfg, check) {
            PropOutcome::Passed { cases: c } => cases += c,
            PropOutcome::Skipped(_) => {}
            failed => return failed,
        }
    }
    PropOutcome::Passed { cases }
}
