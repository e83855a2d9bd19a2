//! P2 — untrained tokens never give a silent NaN: with zero rows in `embed_tokens`/`lm_head`
//! for tokens that occur in the data (Llama-3 base's reserved and chat-template tokens),
//! training keeps every loss, gradient norm and trainable tensor finite; when the rows are
//! trainable the loss on that data falls over 8 steps. A trainer may refuse such data with the
//! typed untrained-token error while the rows are frozen — that is a decision, not a NaN.
//! Whether a trainer refuses or fixes frozen untrained rows at all is a policy, judged on its
//! own by the untrained-token guard (P14), so a table tells a NaN from a missing guard.

use candle_core::{DType, Device};

use crate::data::Batch;
use crate::error::{Error, Result};
use crate::props::property::Property;
use crate::props::{Check, Violation};
use crate::strategy::{random_batches, Draws};
use crate::subject::{Factory, Setup};

const ID: &str = "P2/untrained_tokens";

/// Optimizer steps on the batch with untrained tokens.
pub const STEPS: usize = 8;

/// The catalogue entry.
pub const PROPERTY: Property = Property {
    id: "P2",
    test_name: "p2_untrained_tokens",
    title: "untrained tokens: finite, learn when trainable",
    invariant: "zero rows (embed_tokens and lm_head) for tokens in the data: 8 steps keep losses, gradient norms and \
                trainable tensors finite (a typed refusal while the rows are frozen is allowed); with trainable rows \
                the loss falls",
    tolerance: "exact (finite / strictly lower loss) in every dtype",
    draws: Draws::OPTIMIZER,
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

/// A batch of 2 rows holding the untrained `ids` at position 1 (as input and as label).
pub fn batch_with(setup: &Setup, ids: &[u32]) -> Batch {
    let mut batch = random_batches(setup.spec.vocab_size, setup.adapter_seed, 1, 2, 8).remove(0);
    for (row, &id) in batch.ids.iter_mut().zip(ids.iter().cycle()) {
        row[1] = id;
    }
    for (row, &id) in batch.labels.iter_mut().zip(ids.iter().cycle()) {
        row[1] = id as i64;
    }
    batch
}

/// Whether a subject trains the token rows (`embed_tokens` or `lm_head` is trainable).
pub fn rows_trainable(t: &dyn crate::subject::Trainer) -> bool {
    t.trainable().iter().any(|(n, _)| n.starts_with("model.embed_tokens") || n.starts_with("lm_head"))
}

/// Check P2 on one setup.
pub fn check(f: &dyn Factory, device: &Device, setup: &Setup) -> Check {
    let (mut setup, ids) = with_untrained(setup)?;
    // No warmup: eight full-size steps on one batch must reduce its loss.
    setup.train.schedule.warmup_steps = 0;
    let mut t = f.build(&setup, device)?;
    let batch = batch_with(&setup, &ids);
    let trainable = rows_trainable(t.as_ref());
    // Train-mode losses of the same batch before each update: the first and the last.
    let mut losses = Vec::new();
    for step in 0..STEPS {
        match t.train_step(std::slice::from_ref(&batch)) {
            // The frozen rows' guard refusing (P14 judges whether it names the right ids).
            Err(Error::UntrainedTokens { .. }) if step == 0 && !trainable => return Ok(()),
            Err(Error::NonFinite { what, value, step: s }) => {
                return fail("non_finite", format!("optimizer step {s}: {what} {value}"))
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
    if trainable {
        let (before, after) = (losses[0], losses[losses.len() - 1]);
        if after >= before {
            return fail(
                "no_descent",
                format!("loss on data with untrained tokens did not fall: {before:.4} → {after:.4}"),
            );
        }
    }
    Ok(())
}
