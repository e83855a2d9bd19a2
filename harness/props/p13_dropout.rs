//! P13 — LoRA dropout acts in train mode and only there: with `lora_dropout` > 0, two eval-mode
//! forwards are identical and equal the same model built with dropout 0 (eval mode must not
//! drop anything: a module left in train mode after `get_peft_model`, or an eval path that
//! keeps dropout, makes a QLoRA adapter predict differently after save and reload); a
//! train-mode forward differs from eval by far more than rounding (dropout is applied at all);
//! and, where the subject declares `reproducible_dropout`, two subjects built from the same
//! setup draw the same train-mode masks (bitwise equal train logits).
//!
//! So that dropout's effect stands far above rounding in every dtype, the setups adapt every
//! projection and start with B large (standard deviation 1): the LoRA term is then as large as
//! the base's, and dropping 10 % of its inputs moves the logits by ~1e-1 relative, against a
//! path tolerance of at most 2e-2 (bf16).
//!
//! Tolerances: eval vs eval bitwise (the same computation); eval vs the dropout-0 model within
//! the path tolerance of the effective dtype (f32 1e-5, f16 5e-3, bf16 2e-2; the same
//! computation in a correct trainer, though another module type may run); train vs eval at
//! least 2 × that tolerance apart, and 4 × what the subject's train and eval modes differ by
//! without dropout (another code path in train mode rounds differently; measured on the
//! reference: dropout moves the logits ≥ 0.145 relative in bf16, 7 × the tolerance).

use candle_core::Device;

use crate::adapt::lora::{LoraInit, PROJECTIONS};
use crate::model::Mode;
use crate::props::property::Property;
use crate::props::tolerance::{effective_dtype, observe, path_tolerance};
use crate::props::{bitwise_equal, rel_l2, within, Check, Violation};
use crate::strategy::{random_batches, Draws};
use crate::subject::{Capabilities, Factory, Setup};

const ID: &str = "P13/dropout";

/// How far above the path tolerance train mode must be from eval mode.
pub const ACTIVE_FACTOR: f64 = 2.0;
/// B's standard deviation in P13's setups.
pub const B_STD: f32 = 1.0;

/// The catalogue entry.
pub const PROPERTY: Property = Property {
    id: "P13",
    test_name: "p13_dropout",
    title: "dropout in train mode only",
    invariant: "lora_dropout > 0: two eval forwards identical and equal to the same model with dropout 0; train mode \
                differs from eval (dropout applied); with reproducible_dropout, two subjects from one setup draw the \
                same train-mode masks",
    tolerance: "eval vs eval and train vs train bitwise; eval vs the dropout-0 model within the path tolerance (f32 \
                1e-5, f16 5e-3, bf16 2e-2); train vs eval ≥ 2 × that and ≥ 4 × the modes' difference without dropout (LoRA \
                on every projection, B std 1)",
    needs: Capabilities { dropout: true, ..Capabilities::none() },
    draws: Draws { dropout: &[0.1, 0.3], ..Draws::NONE },
    ..Property::trainer(check)
};

fn fail(code: &'static str, detail: String) -> Check {
    Err(Violation::new(ID, code, detail).into())
}

/// The setup P13 runs: every projection adapted, B large.
pub fn dropout_setup(setup: &Setup) -> Setup {
    let mut s = setup.clone();
    s.lora.target_modules = PROJECTIONS.iter().map(|p| p.to_string()).collect();
    s.lora.init = LoraInit::NonZero(B_STD);
    s
}

/// Check P13 on one setup.
pub fn check(f: &dyn Factory, device: &Device, setup: &Setup) -> Check {
    let setup = dropout_setup(setup);
    let p = setup.lora.dropout;
    let t = f.build(&setup, device)?;
    let ids = random_batches(setup.spec.vocab_size, setup.adapter_seed, 1, 3, 10)[0].ids_tensor(device)?;
    let eval = t.logits(&ids, Mode::Eval)?;
    let again = t.logits(&ids, Mode::Eval)?;
    if !bitwise_equal(&eval, &again)? {
        return fail(
            "eval_dropout",
            format!(
                "lora_dropout {p}: two eval-mode forwards differ (rel L2 {:.3e}): dropout acts in eval mode",
                rel_l2(&again, &eval)?
            ),
        );
    }
    let tol = path_tolerance(effective_dtype(&setup));
    let mut plain = setup.clone();
    plain.lora.dropout = 0.0;
    let plain = f.build(&plain, device)?;
    let without = plain.logits(&ids, Mode::Eval)?;
    let gap = rel_l2(&eval, &without)?;
    observe("eval vs the same model without dropout, rel L2", gap, tol);
    if !within(gap, tol) {
        return fail(
            "eval_dropout",
            format!("lora_dropout {p}: eval logits differ from the same model with dropout 0 by rel L2 {gap:.3e} > {tol:.0e}"),
        );
    }
    let train = t.logits(&ids, Mode::Train)?;
    let moved = rel_l2(&train, &eval)?;
    // What the subject's two modes differ by without dropout (another code path in train mode
    // rounds differently): dropout must move the logits well beyond that too.
    let modes = rel_l2(&plain.logits(&ids, Mode::Train)?, &without)?;
    let least = (ACTIVE_FACTOR * tol).max(2.0 * ACTIVE_FACTOR * modes);
    observe("train vs eval with dropout, rel L2 (the least allowed, over the measured)", least, moved);
    if moved.is_nan() || moved < least {
        return fail(
            "dropout_inactive",
            format!(
                "lora_dropout {p}: train-mode logits are within rel L2 {moved:.3e} of eval mode (< {least:.1e}; without \
                 dropout the modes differ by {modes:.1e}): no dropout applied"
            ),
        );
    }
    if f.capabilities().reproducible_dropout {
        let other = f.build(&setup, device)?.logits(&ids, Mode::Train)?;
        if !bitwise_equal(&train, &other)? {
            return fail(
                "dropout_not_reproducible",
                format!(
                    "lora_dropout {p}: two subjects built from one setup give different train-mode logits (rel L2 {:.3e}) \
                     although the subject declares reproducible_dropout",
                    rel_l2(&other, &train)?
                ),
            );
        }
    }
    Ok(())
}
