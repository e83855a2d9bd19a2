//! P2 — untrained tokens never give a silent NaN: with zero rows in `embed_tokens`/`lm_head`
//! for tokens that occur in the data (Llama-3 base's reserved and chat-template tokens), a
//! trainer whose token rows are frozen either refuses with the typed untrained-token error
//! naming those ids, or fixes the rows of *both* matrices first; one whose rows are trainable
//! trains with finite losses, gradients and parameters, and its loss on that data falls.

use candle_core::{DType, Device};

use crate::error::{Error, Result};
use crate::props::property::Property;
use crate::props::{Check, Violation};
use crate::strategy::random_batches;
use crate::subject::{Factory, Setup};
use crate::train::untrained::zero_rows;

const ID: &str = "P2/untrained_tokens";

/// The catalogue entry.
pub const PROPERTY: Property = Property {
    id: "P2",
    test_name: "p2_untrained_tokens",
    title: "untrained tokens: refuse, fix or train finite",
    invariant: "zero rows (embed_tokens and lm_head) for tokens in the data: frozen rows → the typed refusal naming \
                the ids, or rows fixed in both matrices; trainable rows → finite losses, gradients and parameters, \
                and the loss falls over 8 steps",
    tolerance: "exact (finite / non-zero rows / strictly lower loss) in every dtype",
    ..Property::trainer(check)
};

fn fail(code: &'static str, detail: String) -> Check {
    Err(Violation::new(ID, code, detail).into())
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
pub fn check(f: &dyn Factory, device: &Device, setup: &Setup) -> Check {
    let (mut setup, ids) = with_untrained(setup)?;
    // No warmup: eight full-size steps on one batch must reduce its loss.
    setup.train.schedule.warmup_steps = 0;
    let mut t = f.build(&setup, device)?;
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
            Err(Error::UntrainedTokens { ids: named }) if step == 0 && !rows_trainable => {
                if ids.iter().all(|i| named.contains(i)) {
                    return Ok(()); // the typed refusal, naming the planted ids
                }
                return fail("wrong_refusal", format!("refused naming {named:?}, but the planted ids are {ids:?}"));
            }
            Err(Error::NonFinite { what, value, step: s }) => {
                return fail("non_finite", format!("optimizer step {s}: {what} {value}"))
            }
            Err(e) if !rows_trainable && step == 0 => {
                return fail("wrong_refusal", format!("frozen rows: step 0 failed with an untyped error: {e}"))
            }
            Err(e) => return fail("step_failed", format!("step {step} failed: {e}")),
            Ok(r) if !r.loss.is_finite() || !r.grad_norm.is_finite() => {
                return fail("non_finite", format!("step {step}: loss {} grad norm {}", r.loss, r.grad_norm))
            }
            Ok(r) => losses.push(r.loss),
        }
    }
    for (name, v) in t.trainable() {
        if v.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?.iter().any(|x| !x.is_finite()) {
            return fail("non_finite", format!("trainable `{name}` became non-finite"));
        }
    }
    if rows_trainable {
        let (before, after) = (losses[0], losses[losses.len() - 1]);
        if after >= before {
            return fail(
                "no_descent",
                format!("loss on data with untrained tokens did not fall: {before:.4} → {after:.4}"),
            );
        }
        return Ok(());
    }
    // Frozen and not refused: the rows must have been fixed, in the embedding and in an
    // untied head alike (a tied head is the embedding).
    let frozen = t.frozen();
    let mut seen = 0;
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        let Some((_, m)) = frozen.iter().find(|(n, _)| n == name) else { continue };
        seen += 1;
        let still = zero_rows(m, crate::train::untrained::DEFAULT_THRESHOLD)?;
        if let Some(id) = ids.iter().find(|i| still.contains(i)) {
            return fail(
                "not_fixed",
                format!("trained on untrained token {id} with frozen `{name}` without refusing or fixing its row"),
            );
        }
    }
    if seen == 0 {
        return fail(
            "not_fixed",
            "frozen rows, no refusal, and no embed_tokens/lm_head among the frozen tensors".into(),
        );
    }
    Ok(())
}
