//! P1 — eval path = train path: with dropout 0, train-mode logits equal eval-mode logits
//! bitwise (the same computation); the KV-cache decode equals the full forward within the
//! dtype tolerance (different matmul shapes: f32 1e-5 relative L2) and greedy generations
//! are identical; eval argmax does not collapse to one id where train mode does not.

use candle_core::{DType, Device, Tensor, D};

use crate::error::Result;
use crate::model::Mode;
use crate::props::forward::path_tolerance;
use crate::props::runner::{run, PropConfig, PropOutcome};
use crate::props::{bitwise_equal, rel_l2, Check, Violation};
use crate::strategy::{arb_setup, random_batches, AdapterKind};
use crate::subject::{Capabilities, Setup, Trainer};

const ID: &str = "P1/eval_train_equivalence";

fn fail(detail: String) -> Check {
    Err(Violation { property: ID, detail }.into())
}

fn argmax_ids(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.to_dtype(DType::F32)?.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?)
}

/// Check P1 on one setup.
pub fn check<T: Trainer>(factory: &impl Fn(&Setup, &Device) -> Result<T>, device: &Device, setup: &Setup) -> Check {
    let t = factory(setup, device)?;
    let batch = &random_batches(setup.spec.vocab_size, setup.adapter_seed, 1, 3, 10)[0];
    let ids = batch.ids_tensor(device)?;
    let eval = t.logits(&ids, Mode::Eval)?;
    let train = t.logits(&ids, Mode::Train)?;
    if !bitwise_equal(&train, &eval)? {
        return fail(format!("dropout is 0 but train and eval logits differ: rel L2 {:.3e}", rel_l2(&train, &eval)?));
    }
    let (e_ids, t_ids) = (argmax_ids(&eval)?, argmax_ids(&train)?);
    let distinct = |v: &[u32]| v.iter().collect::<std::collections::BTreeSet<_>>().len();
    if e_ids.len() >= 16 && distinct(&e_ids) == 1 && distinct(&t_ids) > 1 {
        return fail(format!("eval argmax collapsed to token {} at all {} positions", e_ids[0], e_ids.len()));
    }
    if t.capabilities().kv_cache {
        let s = ids.dim(1)?;
        if let Some(cached) = t.cached_logits(&ids, s.div_ceil(2))? {
            let tol = path_tolerance(setup.spec.dtype);
            let err = rel_l2(&cached, &eval)?;
            if err.is_nan() || err > tol {
                return fail(format!("KV-cache decode vs full forward: rel L2 {err:.3e} > {tol:.0e}"));
            }
        }
        let prompt = ids.narrow(1, 0, 2)?;
        let decoded = t.decode(&prompt, 4)?;
        let reference = crate::model::generate::greedy_with(|x| t.logits(x, Mode::Eval), &prompt, 4)?;
        if decoded != reference {
            return fail(format!("greedy decode {decoded:?} differs from full-forward greedy {reference:?}"));
        }
    }
    Ok(())
}

/// Run P1 for every adapter kind.
pub fn eval_train_equivalence<T: Trainer>(
    factory: &impl Fn(&Setup, &Device) -> Result<T>,
    device: &Device,
    cfg: &PropConfig,
) -> PropOutcome {
    let mut cases = 0;
    for kind in AdapterKind::ALL {
        let needs = Capabilities { quant4: kind == AdapterKind::QLora, ..Capabilities::none() };
        match run(factory, device, needs, arb_setup(kind, 1), cfg, check) {
            PropOutcome::Passed { cases: c } => cases += c,
            PropOutcome::Skipped(_) => {}
            failed => return failed,
        }
    }
    PropOutcome::Passed { cases }
}
