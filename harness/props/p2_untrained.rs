//! P2 — untrained tokens never give a silent NaN: with zero rows in `embed_tokens`/`lm_head`
//! for tokens that occur in the data, a trainer whose token rows are frozen either refuses
//! to train (an error) or fixes the rows first; one whose rows are trainable trains with
//! finite losses, gradients and parameters, and its loss on that data falls.

use candle_core::{DType, Device};

use crate::error::Result;
use crate::props::runner::{run, PropConfig, PropOutcome};
use crate::props::{Check, Violation};
use crate::strategy::{arb_setup, random_batches, AdapterKind};
use crate::subject::{Capabilities, Setup, Trainer};
use crate::train::untrained::zero_rows;

const ID: &str = "P2/untrained_tokens";

fn fail(detail: String) -> Check {
    Err(Violation { property: ID, detail }.into())
}

/// The setup with the last two token ids' rows zeroed (Llama-3 base's reserved tokens).
pub fn with_untrained(setup: &Setup) -> Result<(Setup, Vec<u32>)> {
    let v = setup.spec.vocab_size as u32;
    let ids = vec![v - 2, v - 1];
    let mut s = setup.clone();
    crate::weights::plant_zero_rows(&mut s.weights, &ids)?;
    Ok((s, ids))
}

/// Check P2 on one setup.
pub fn check<T: Trainer>(factory: &impl Fn(&Setup, &Device) -> Result<T>, device: &Device, setup: &Setup) -> Check {
    let (mut setup, ids) = with_untrained(setup)?;
    // No warmup: eight full-size steps on one batch must reduce its loss.
    setup.train.schedule.warmup_steps = 0;
    let mut t = factory(&setup, device)?;
    let mut batch = random_batches(setup.spec.vocab_size, setup.adapter_seed, 1, 2, 8).remove(0);
    for (row, &id) in batch.ids.iter_mut().zip(ids.iter().cycle()) {
        row[1] = id;
    }
    for (row, &id) in batch.labels.iter_mut().zip(ids.iter().cycle()) {
        row[1] = id as i64;
    }
    let rows_trainable =
        t.trainable().iter().any(|(n, _)| n.starts_with("model.embed_tokens") || n.starts_with("lm_head"));
    // Train-mode losses of the same batch before each update: the first and the last.
    let mut losses = Vec::new();
    for step in 0..8 {
        match t.train_step(std::slice::from_ref(&batch)) {
            Err(_) if step == 0 && !rows_trainable => return Ok(()), // refused: allowed when frozen
            Err(e) => return fail(format!("step {step} failed: {e}")),
            Ok(r) if !r.loss.is_finite() || !r.grad_norm.is_finite() => {
                return fail(format!("step {step}: loss {} grad norm {}", r.loss, r.grad_norm))
            }
            Ok(r) => losses.push(r.loss),
        }
    }
    for (name, v) in t.trainable() {
        if v.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?.iter().any(|x| !x.is_finite()) {
            return fail(format!("trainable `{name}` became non-finite"));
        }
    }
    if rows_trainable {
        let (before, after) = (losses[0], losses[losses.len() - 1]);
        if after >= before {
            return fail(format!("loss on data with untrained tokens did not fall: {before:.4} → {after:.4}"));
        }
    } else if let Some((_, embed)) = t.frozen().into_iter().find(|(n, _)| n == "model.embed_tokens.weight") {
        let still = zero_rows(&embed, crate::train::untrained::DEFAULT_THRESHOLD)?;
        if ids.iter().any(|i| still.contains(i)) {
            return fail(format!(
                "trained on untrained tokens {ids:?} with frozen embeddings without refusing or fixing the rows"
            ));
        }
    }
    Ok(())
}

/// Run P2 for every adapter kind (frozen rows: LoRA, QLoRA; trainable rows: full embeddings).
pub fn untrained_tokens<T: Trainer>(
    factory: &impl Fn(&Setup, &Device) -> Result<T>,
    device: &Device,
    cfg: &PropConfig,
) -> PropOutcome {
    let mut cases = 0;
    for kind in AdapterKind::ALL {
        let needs = Capabilities {
            quant4: kind == AdapterKind::QLora,
            train_embeddings: kind == AdapterKind::FullEmbeddings,
            ..Capabilities::none()
        };
        match run(factory, device, needs, arb_setup(kind, 1), cfg, check) {
            PropOutcome::Passed { cases: c } => cases += c,
            PropOutcome::Skipped(_) => {}
            failed => return failed,
        }
    }
    PropOutcome::Passed { cases }
}
