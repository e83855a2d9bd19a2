//! P5 — gradient accumulation: k micro-batches with uneven numbers of unmasked tokens give
//! the same gradients as one batch holding all their sequences. Tolerance (f32): 1e-5
//! relative L2 over all gradients together (the different-path anchor: the sums run in
//! another order), and 1e-4 per tensor (a tiny tensor's own rel. error can exceed 1e-5 from
//! rounding alone: measured 1.04e-5 on a 6-wide Gemma 3). Normalising per micro-batch (the
//! 2024 bug) weights tokens of short micro-batches more and is off by ~1e-1.

use candle_core::Device;

use crate::error::Result;
use crate::props::runner::{run, PropConfig, PropOutcome};
use crate::props::{rel_l2, Check, Violation};
use crate::strategy::{arb_setup, random_batches, AdapterKind};
use crate::subject::{Capabilities, Setup, Trainer};
use crate::train::{Batch, IGNORE};

const ID: &str = "P5/accumulation_equivalence";

/// Concatenate the sequences of `micro` into one batch, padded to the longest.
pub fn merge(micro: &[Batch]) -> Batch {
    let s = micro.iter().flat_map(|b| b.ids.iter().map(Vec::len)).max().unwrap_or(0);
    let mut ids = Vec::new();
    let mut labels = Vec::new();
    for b in micro {
        for (i, l) in b.ids.iter().zip(&b.labels) {
            ids.push(i.iter().copied().chain(std::iter::repeat(0)).take(s).collect());
            labels.push(l.iter().copied().chain(std::iter::repeat(IGNORE)).take(s).collect());
        }
    }
    Batch { ids, labels }
}

/// Check P5 on one setup.
pub fn check<T: Trainer>(factory: &impl Fn(&Setup, &Device) -> Result<T>, device: &Device, setup: &Setup) -> Check {
    let t = factory(setup, device)?;
    let micro = random_batches(setup.spec.vocab_size, setup.adapter_seed, 3, 2, 9);
    let merged = merge(&micro);
    let ga = t.gradients(&micro)?;
    let gb = t.gradients(std::slice::from_ref(&merged))?;
    let tol = crate::props::forward::path_tolerance(setup.spec.dtype);
    let counts: Vec<usize> = micro.iter().map(Batch::tokens).collect();
    let (mut num, mut den) = (0f64, 0f64);
    for (name, a) in &ga {
        let Some(b) = gb.get(name) else {
            return Err(
                Violation { property: ID, detail: format!("`{name}` has a gradient only when accumulated") }.into()
            );
        };
        let err = rel_l2(a, b)?;
        if err.is_nan() || err > 10.0 * tol {
            return Err(Violation {
                property: ID,
                detail: format!(
                    "`{name}`: accumulated over micro-batches with {counts:?} tokens vs one batch: rel L2 {err:.3e} > {:.0e}",
                    10.0 * tol
                ),
            }
            .into());
        }
        let bn = b.to_dtype(candle_core::DType::F32)?.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
        num += (err * bn.sqrt()).powi(2);
        den += bn;
    }
    let global = num.sqrt() / den.sqrt().max(1e-30);
    if global > tol {
        return Err(Violation {
            property: ID,
            detail: format!(
                "all gradients, micro-batches with {counts:?} tokens vs one batch: rel L2 {global:.3e} > {tol:.0e}"
            ),
        }
        .into());
    }
    Ok(())
}

/// Run P5 for every adapter kind.
pub fn accumulation<T: Trainer>(
    factory: &impl Fn(&Setup, &Device) -> Result<T>,
    device: &Device,
    cfg: &PropConfig,
) -> PropOutcome {
    let mut cases = 0;
    for kind in AdapterKind::ALL {
        let needs = Capabilities { grad_accum: true, quant4: kind == AdapterKind::QLora, ..Capabilities::none() };
        match run(factory, device, needs, arb_setup(kind, 3), cfg, check) {
            PropOutcome::Passed { cases: c } => cases += c,
            PropOutcome::Skipped(why) => return PropOutcome::Skipped(why),
            failed => return failed,
        }
    }
    PropOutcome::Passed { cases }
}
