//! P10 — agreement with the oracle: for the same setup (base, initial adapter, optimizer,
//! schedule, accumulation), the subject's gradients of a step over 3 micro-batches with uneven
//! token counts, its step loss, its count of unmasked target tokens after the shift and its
//! learning rate equal the reference trainer's, and after 4 optimizer steps (warmup 2, so the
//! first step trains at lr 0 as transformers' schedule does) its trainable tensors do too.
//!
//! This catches normalisation bugs that comparing a subject with itself cannot see — a
//! denominator that miscounts tokens the same way in every path, a loss averaged per
//! micro-batch, a schedule one step off — because the reference follows transformers' and
//! torch's conventions exactly (pinned by `fixtures/optim/`, produced with torch and
//! transformers).
//!
//! Tolerances (relative; fixed per dtype): f32 — loss 1e-5, gradients 1e-4 per tensor
//! (relative L2), trainable tensors after 4 steps 1e-3 per tensor (Adam's first steps move
//! each element by about ±lr whatever the gradient's size, so a last-bit difference in a
//! near-zero gradient element becomes an lr-sized one); bf16 — loss 2e-2, gradients 5e-1,
//! tensors 5e-2; f16 — loss 5e-3, gradients 1e-1, tensors 2e-2 (two implementations rounding
//! in a different order, bounded like P8). The learning rate: 1e-9 relative; tokens: exact.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};

use crate::props::property::Property;
use crate::props::{rel_l2, within, Check, Violation};
use crate::strategy::random_batches;
use crate::subject::{reference, Factory, Setup, Trainer};
use crate::train::StepReport;

const ID: &str = "P10/oracle_agreement";

/// The catalogue entry.
pub const PROPERTY: Property = Property {
    id: "P10",
    test_name: "p10_oracle_agreement",
    title: "agrees with the reference trainer",
    invariant: "same setup as the reference: gradients over 3 uneven micro-batches, step loss, unmasked target tokens \
                after the shift and learning rate equal the reference's; trainable tensors equal after 4 steps \
                (warmup 2, cosine, clipping)",
    tolerance: "relative: f32 loss 1e-5, gradients 1e-4, tensors after 4 steps 1e-3; bf16 2e-2 / 5e-1 / 5e-2; f16 \
                5e-3 / 1e-1 / 2e-2; lr 1e-9; tokens exact",
    grad_accum: 3,
    ..Property::trainer(check)
};

/// (loss, gradient, tensors-after-steps) relative bounds for `dtype`.
pub fn tolerances(dtype: DType) -> (f64, f64, f64) {
    match dtype {
        DType::BF16 => (2e-2, 5e-1, 5e-2),
        DType::F16 => (5e-3, 1e-1, 2e-2),
        _ => (1e-5, 1e-4, 1e-3),
    }
}

fn fail(code: &'static str, detail: String) -> Check {
    Err(Violation::new(ID, code, detail).into())
}

fn worst(
    got: &BTreeMap<String, Tensor>,
    want: &BTreeMap<String, Tensor>,
    tol: f64,
) -> crate::error::Result<Option<(String, f64)>> {
    let mut worst: Option<(String, f64)> = None;
    for (name, w) in want {
        let e = match got.get(name) {
            Some(g) => rel_l2(g, w)?,
            None => f64::INFINITY,
        };
        if !within(e, tol) && worst.as_ref().is_none_or(|(_, x)| e > *x || e.is_nan()) {
            worst = Some((name.clone(), e));
        }
    }
    Ok(worst)
}

fn rel(a: f64, b: f64) -> f64 {
    if a == b {
        0.0
    } else {
        (a - b).abs() / b.abs().max(f64::MIN_POSITIVE)
    }
}

fn compare_step(step: usize, a: &StepReport, b: &StepReport, tol_loss: f64) -> Check {
    if a.tokens != b.tokens {
        return fail(
            "token_count",
            format!(
                "step {step}: the subject counts {} unmasked target tokens, the reference {} (after the shift)",
                a.tokens, b.tokens
            ),
        );
    }
    let e = rel(a.loss, b.loss);
    if !within(e, tol_loss) {
        return fail(
            "loss_mismatch",
            format!(
                "step {step}: loss {} vs the reference's {}: relative error {e:.3e} > {tol_loss:e}",
                a.loss, b.loss
            ),
        );
    }
    if !within(rel(a.lr, b.lr), 1e-9) {
        return fail("lr_mismatch", format!("step {step}: learning rate {} vs the reference's {}", a.lr, b.lr));
    }
    Ok(())
}

/// Check P10 on one setup.
pub fn check(f: &dyn Factory, device: &Device, setup: &Setup) -> Check {
    let mut setup = setup.clone();
    setup.train.schedule.warmup_steps = 2;
    setup.train.schedule.total_steps = 6;
    let mut subject = f.build(&setup, device)?;
    let mut oracle = reference(&setup, device)?;
    let (tol_loss, tol_grad, tol_tensors) = tolerances(setup.spec.dtype);
    let k = setup.train.grad_accum.max(1);
    let data = random_batches(setup.spec.vocab_size, setup.adapter_seed ^ 0x0ac1e, 4 * k, 2, 9);

    let got = subject.gradients(&data[..k])?;
    let (want, _, _) = oracle.gradients(&data[..k], crate::model::Mode::Train)?;
    // The first step's token count and loss are reported before the gradients: a miscounted
    // denominator shows as a count, whatever the dtype's gradient tolerance.
    let first = (subject.train_step(&data[..k])?, Trainer::train_step(&mut oracle, &data[..k])?);
    compare_step(0, &first.0, &first.1, tol_loss)?;
    if let Some(name) = got.keys().find(|n| !want.contains_key(*n)) {
        return fail(
            "gradient_mismatch",
            format!("the subject has a gradient for `{name}`, which the reference does not train"),
        );
    }
    if let Some((name, e)) = worst(&got, &want, tol_grad)? {
        return fail(
            "gradient_mismatch",
            format!("`{name}`: gradient over {k} micro-batches vs the reference: rel L2 {e:.3e} > {tol_grad:e}"),
        );
    }

    for (step, window) in data.chunks(k).enumerate().skip(1) {
        let a = subject.train_step(window)?;
        let b = Trainer::train_step(&mut oracle, window)?;
        compare_step(step, &a, &b, tol_loss)?;
    }
    let got: BTreeMap<String, Tensor> = subject.trainable().into_iter().collect();
    let want: BTreeMap<String, Tensor> = Trainer::trainable(&oracle).into_iter().collect();
    if let Some((name, e)) = worst(&got, &want, tol_tensors)? {
        return fail(
            "tensors_mismatch",
            format!("`{name}` after 4 steps vs the reference: rel L2 {e:.3e} > {tol_tensors:e}"),
        );
    }
    Ok(())
}
