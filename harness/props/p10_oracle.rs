//! P10 — agreement with the oracle, step by step: for the same setup (base, initial adapter,
//! optimizer, schedule, accumulation, all drawn like real configurations), at every one of 4
//! optimizer steps over 3 micro-batches with uneven token counts, the subject's count of
//! unmasked target tokens after the shift, its step loss, its learning rate and its gradients
//! equal the reference's at the subject's current values; and what its optimizer did — each
//! trainable tensor after the step — equals AdamW (torch's, with transformers' parameter groups:
//! no decay for biases and norm weights) applied to the subject's own gradients, clipped as
//! torch clips them, at the scheduled learning rate.
//!
//! Comparing with the reference catches normalisation bugs that comparing a subject with
//! itself cannot see — a denominator that miscounts tokens the same way in every path, a loss
//! averaged per micro-batch, a schedule one step off — because the reference follows
//! transformers' and torch's conventions exactly (pinned by `fixtures/optim/`, produced with
//! torch and transformers). Replaying the optimizer on the subject's own gradients separates
//! the optimizer from the gradients: its arithmetic is elementwise and well conditioned, so the
//! bound is a few units of roundoff and a weight-decay term (`lr·wd·p`, 1e-4 of the weight at
//! lr 1e-2 and wd 0.01) stands out by two orders of magnitude.
//!
//! Tolerances (error analysis):
//! - tokens exact; learning rate 1e-9 relative (the same formula in f64);
//! - loss and gradients against the f64 oracle, within 20 × the reference's own error in the
//!   effective dtype (see [`crate::props::p8_gradients`]); loss anchor..cap f32 1e-6..1e-5,
//!   f16 5e-4..5e-3, bf16 4e-3..2e-2; gradients as P8;
//! - each element after the step: `|p − p̂| ≤ 16·u·(|p̂| + lr·(|m̂| + â)/(√v̂ + ε))`, where p̂ is
//!   the replay in f64, m̂ and v̂ its bias-corrected moments, â the bias-corrected average of
//!   |g| (what a rounding of m can be relative to), and u the unit roundoff of the precision the
//!   subject holds that tensor in (f32, or bf16/f16 when every value of the tensor is one: then
//!   the moments are held that way too, and the bound is that much looser).

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};

use crate::error::Result;
use crate::props::oracle::{step_at, OracleStep};
use crate::props::p8_gradients::judge_gradients;
use crate::props::property::Property;
use crate::props::tolerance::{effective_dtype, observe, unit_roundoff, Bound};
use crate::props::{within, Check, Violation};
use crate::strategy::{random_batches, Draws};
use crate::subject::{Factory, Setup};
use crate::train::optim::decays;
use crate::train::StepReport;

const ID: &str = "P10/oracle_agreement";

/// Optimizer steps compared.
pub const STEPS: usize = 4;
/// The element bound's multiple of the unit roundoff.
pub const UPDATE_ULPS: f64 = 16.0;

/// The catalogue entry.
pub const PROPERTY: Property = Property {
    id: "P10",
    test_name: "p10_oracle_agreement",
    title: "agrees with the reference trainer",
    invariant: "at each of 4 steps over 3 uneven micro-batches (drawn optimizer, schedule and clipping): unmasked \
                target tokens after the shift, step loss, learning rate and gradients equal the reference's at the \
                subject's values; every trainable tensor after the step equals AdamW (torch's, transformers' \
                parameter groups) replayed on the subject's own gradients",
    tolerance: "tokens exact; lr 1e-9; loss and gradients vs f64 within 20 × the reference's own error (loss f32 \
                1e-6..1e-5, f16 5e-4..5e-3, bf16 4e-3..2e-2; gradients as P8); each element after a step within \
                16·u·(|p| + lr·(|m̂|+â)/(√v̂+ε)), u of the precision the tensor is held in",
    grad_accum: 3,
    draws: Draws::TRAINING,
    ..Property::trainer(check)
};

/// The loss bound for effective dtype `dtype`.
pub fn loss_bound(dtype: DType) -> Bound {
    let (anchor, cap) = match dtype {
        DType::BF16 => (4e-3, 2e-2),
        DType::F16 => (5e-4, 5e-3),
        _ => (1e-6, 1e-5),
    };
    Bound { anchor, cap, factor: 20.0 }
}

fn fail(code: &'static str, detail: String) -> Check {
    Err(Violation::new(ID, code, detail).into())
}

fn rel(a: f64, b: f64) -> f64 {
    if a == b {
        0.0
    } else {
        (a - b).abs() / b.abs().max(f64::MIN_POSITIVE)
    }
}

fn host64(t: &Tensor) -> Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

/// Check P10 on one setup.
pub fn check(f: &dyn Factory, device: &Device, setup: &Setup) -> Check {
    let mut subject = f.build(setup, device)?;
    let k = setup.train.grad_accum.max(1);
    let data = random_batches(setup.spec.vocab_size, setup.adapter_seed ^ 0x0ac1e, STEPS * k, 2, 9);
    let mut replay = Replay::new(setup);
    // Deep copies: a trainer may update its tensors in place.
    let copies = |v: Vec<(String, Tensor)>| -> Result<Vec<(String, Tensor)>> {
        v.into_iter().map(|(n, x)| Ok((n, x.copy()?))).collect()
    };
    let mut values = copies(subject.trainable())?;
    for (step, window) in data.chunks(k).enumerate() {
        let grads = subject.gradients(window)?;
        let oracle = step_at(setup, &values, window)?;
        let report = subject.train_step(window)?;
        // The count first: a miscounted denominator shows as a count, whatever the dtype.
        compare_step(step, &report, &oracle, setup)?;
        if let Some(name) = grads.keys().find(|n| !oracle.exact.contains_key(*n)) {
            return fail(
                "gradient_mismatch",
                format!("step {step}: the subject has a gradient for `{name}`, which the reference does not train"),
            );
        }
        if let Some((name, e, tol, floor)) =
            judge_gradients(setup, &oracle, &grads, "gradients vs f64 oracle at each step, per tensor")?
        {
            return fail(
                "gradient_mismatch",
                format!(
                    "step {step}: `{name}`: gradient over {k} micro-batches vs the f64 oracle {e:.3e} > {tol:.1e} (the \
                     reference's own error {floor:.1e})"
                ),
            );
        }
        let after = copies(subject.trainable())?;
        replay.step(step, &values, &grads, &after)?;
        values = after;
    }
    Ok(())
}

fn compare_step(step: usize, a: &StepReport, oracle: &OracleStep, setup: &Setup) -> Check {
    if a.tokens != oracle.tokens {
        return fail(
            "token_count",
            format!(
                "step {step}: the subject counts {} unmasked target tokens, the reference {} (after the shift)",
                a.tokens, oracle.tokens
            ),
        );
    }
    let floor = rel(oracle.own_loss, oracle.exact_loss);
    if let Some(tol) = loss_bound(effective_dtype(setup)).judgeable(floor) {
        let e = rel(a.loss, oracle.exact_loss);
        observe("step loss vs f64 oracle, relative", e, tol);
        if !within(e, tol) {
            return fail(
                "loss_mismatch",
                format!(
                    "step {step}: loss {} vs the oracle's {}: relative error {e:.3e} > {tol:.1e} (the reference's own \
                     {floor:.1e})",
                    a.loss, oracle.exact_loss
                ),
            );
        }
    }
    let lr = setup.train.optim.lr * setup.train.schedule.factor(step);
    if !within(rel(a.lr, lr), 1e-9) {
        return fail("lr_mismatch", format!("step {step}: learning rate {} vs the schedule's {lr}", a.lr));
    }
    Ok(())
}

/// AdamW replayed in f64 on a subject's own gradients: torch's `clip_grad_norm_` over all of
/// them, then per tensor (a tensor without a gradient is skipped and its step count stays)
/// decoupled decay where transformers applies it, the moments, bias corrections and update.
struct Replay {
    cfg: crate::train::TrainConfig,
    m: BTreeMap<String, Vec<f64>>,
    v: BTreeMap<String, Vec<f64>>,
    /// Bias-corrected average of |g| before correction (what a rounding of m is relative to).
    a: BTreeMap<String, Vec<f64>>,
    t: BTreeMap<String, i32>,
}

impl Replay {
    fn new(setup: &Setup) -> Self {
        Replay {
            cfg: setup.train.clone(),
            m: BTreeMap::new(),
            v: BTreeMap::new(),
            a: BTreeMap::new(),
            t: BTreeMap::new(),
        }
    }

    /// Replay step `step` from `before` with `grads` and compare with the subject's `after`.
    fn step(
        &mut self,
        step: usize,
        before: &[(String, Tensor)],
        grads: &BTreeMap<String, Tensor>,
        after: &[(String, Tensor)],
    ) -> Check {
        let c = &self.cfg.optim;
        let lr = c.lr * self.cfg.schedule.factor(step);
        let mut g64: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        let mut norm2 = 0f64;
        for (name, g) in grads {
            let v = host64(g)?;
            norm2 += v.iter().map(|x| x * x).sum::<f64>();
            g64.insert(name.as_str(), v);
        }
        let coef = match self.cfg.max_grad_norm {
            Some(max) => (max / (norm2.sqrt() + 1e-6)).min(1.0),
            None => 1.0,
        };
        if after.len() != before.len() {
            return fail(
                "update_mismatch",
                format!("step {step}: {} trainable tensors, then {}", before.len(), after.len()),
            );
        }
        for ((name, p0), (name_after, p1)) in before.iter().zip(after) {
            if name != name_after {
                return fail("update_mismatch", format!("step {step}: trainable `{name}` became `{name_after}`"));
            }
            let (p0, p1) = (host64(p0)?, host64(p1)?);
            let u = unit_roundoff(held_in(&p0, &p1));
            let Some(g) = g64.get(name.as_str()) else {
                if let Some(i) = (0..p0.len()).find(|&i| p0[i] != p1[i]) {
                    return fail(
                        "update_mismatch",
                        format!(
                            "step {step}: `{name}` had no gradient but changed at element {i}: {} → {}",
                            p0[i], p1[i]
                        ),
                    );
                }
                continue;
            };
            let t = self.t.entry(name.clone()).or_insert(0);
            *t += 1;
            let (b1, b2) = (c.beta1, c.beta2);
            let c1 = 1.0 - b1.powi(*t);
            let c2 = 1.0 - b2.powi(*t);
            let n = p0.len();
            let m = self.m.entry(name.clone()).or_insert_with(|| vec![0.0; n]);
            let v = self.v.entry(name.clone()).or_insert_with(|| vec![0.0; n]);
            let a = self.a.entry(name.clone()).or_insert_with(|| vec![0.0; n]);
            let wd = if decays(name) { c.weight_decay } else { 0.0 };
            let mut worst: Option<(usize, f64, f64, f64)> = None;
            for i in 0..n {
                let gi = g[i] * coef;
                m[i] = b1 * m[i] + (1.0 - b1) * gi;
                v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                a[i] = b1 * a[i] + (1.0 - b1) * gi.abs();
                let (mh, ah, sv) = (m[i] / c1, a[i] / c1, (v[i] / c2).sqrt());
                let want = p0[i] * (1.0 - lr * wd) - lr * mh / (sv + c.eps);
                let bound = UPDATE_ULPS * u * (want.abs() + lr * (mh.abs() + ah) / (sv + c.eps));
                let err = (p1[i] - want).abs();
                observe(
                    "each element after a step vs AdamW replayed on the subject's gradients",
                    err,
                    bound.max(f64::MIN_POSITIVE),
                );
                if !within(err, bound) && worst.is_none_or(|w| err / bound > w.1 / w.2) {
                    worst = Some((i, err, bound, want));
                }
            }
            if let Some((i, err, bound, want)) = worst {
                // The difference read as a decay term: p − p̂ = −lr·d·p.
                let implied = (want - p1[i]) / (lr * p0[i]);
                return fail(
                    "update_mismatch",
                    format!(
                        "step {step}: `{name}`[{i}] is {} after the step, AdamW on the subject's own gradients gives \
                         {want} (lr {lr:e}, weight decay {wd}, clip coefficient {coef:.6}): |Δ| {err:.3e} > {bound:.1e} \
                         (the difference is what an extra weight decay of {implied:+.4} would do)",
                        p1[i]
                    ),
                );
            }
        }
        Ok(())
    }
}

/// The precision a subject holds a tensor in, read off its values before and after a step:
/// bf16 or f16 when every value is one (an f32 tensor's values after an Adam step are not),
/// else f32.
fn held_in(before: &[f64], after: &[f64]) -> DType {
    let all = |f: fn(f64) -> f64| before.iter().chain(after).all(|&x| f(x) == x);
    if all(|x| half::bf16::from_f64(x).to_f64()) {
        DType::BF16
    } else if all(|x| half::f16::from_f64(x).to_f64()) {
        DType::F16
    } else {
        DType::F32
    }
}
