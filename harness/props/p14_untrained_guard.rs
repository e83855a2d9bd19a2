//! P14 — the untrained-token guard: with zero rows in `embed_tokens`/`lm_head` for tokens that
//! occur in the data while those matrices are frozen (plain LoRA or QLoRA), a trainer either
//! refuses the first step with the typed untrained-token error naming those ids, or fixes the
//! rows of *both* matrices before training on them (an untied head included; a tied head is the
//! embedding). Training on them as they are leaves the model predicting nothing for those
//! tokens, and gives NaN as soon as any layer divides by their zero norm (Llama-3 base's
//! reserved and chat-template tokens; Unsloth's `fix_untrained_tokens`). This is a policy
//! guard, apart from the invariant that nothing is ever non-finite (P2).

use candle_core::Device;

use crate::error::Error;
use crate::props::p2_untrained::{batch_with, rows_trainable, with_untrained};
use crate::props::property::Property;
use crate::props::{Check, Violation};
use crate::strategy::AdapterKind;
use crate::subject::{Factory, Setup};
use crate::train::untrained::{zero_rows, DEFAULT_THRESHOLD};

const ID: &str = "P14/untrained_token_guard";

/// The catalogue entry.
pub const PROPERTY: Property = Property {
    id: "P14",
    test_name: "p14_untrained_token_guard",
    title: "frozen untrained tokens refused or fixed",
    invariant: "zero rows (embed_tokens and lm_head) for tokens in the data while both are frozen: the first step \
                is refused with the typed untrained-token error naming the ids, or the rows are fixed in both \
                matrices before training",
    tolerance: "exact (the named ids; rows no longer all-zero, |x| ≤ 1e-16)",
    kinds: &[AdapterKind::Lora, AdapterKind::QLora],
    ..Property::trainer(check)
};

fn fail(code: &'static str, detail: String) -> Check {
    Err(Violation::new(ID, code, detail).into())
}

/// Check P14 on one setup.
pub fn check(f: &dyn Factory, device: &Device, setup: &Setup) -> Check {
    let (setup, ids) = with_untrained(setup)?;
    let mut t = f.build(&setup, device)?;
    if rows_trainable(t.as_ref()) {
        return Err(
            Error::Msg("P14 judges frozen token rows, but the subject trains embed_tokens or lm_head".into()).into()
        );
    }
    let batch = batch_with(&setup, &ids);
    match t.train_step(std::slice::from_ref(&batch)) {
        Err(Error::UntrainedTokens { ids: named }) => {
            if ids.iter().all(|i| named.contains(i)) {
                return Ok(()); // the typed refusal, naming the planted ids
            }
            return fail("wrong_refusal", format!("refused naming {named:?}, but the planted ids are {ids:?}"));
        }
        // Trained on the rows as they are, and the step went non-finite: neither refused nor fixed.
        Err(Error::NonFinite { what, value, step }) => {
            return fail(
                "not_fixed",
                format!(
                    "trained on untrained tokens {ids:?} without refusing or fixing them: step {step} {what} {value}"
                ),
            )
        }
        Err(e) => return fail("wrong_refusal", format!("the first step failed with an untyped error: {e}")),
        Ok(_) => {}
    }
    // Not refused: the rows must have been fixed, in the embedding and in an untied head alike.
    let frozen = t.frozen();
    let mut seen = 0;
    for name in ["model.embed_tokens.weight", "lm_head.weight"] {
        let Some((_, m)) = frozen.iter().find(|(n, _)| n == name) else { continue };
        seen += 1;
        let still = zero_rows(m, DEFAULT_THRESHOLD)?;
        if let Some(id) = ids.iter().find(|i| still.contains(i)) {
            return fail(
                "not_fixed",
                format!("trained on untrained token {id} with frozen `{name}` without refusing or fixing its row"),
            );
        }
    }
    if seen == 0 {
        return fail("not_fixed", "no refusal, and no embed_tokens/lm_head among the frozen tensors".into());
    }
    Ok(())
}
