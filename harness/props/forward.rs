//! Forward-pass invariants of tunecheck's own model, per family (catalogue entries F1–F3):
//! determinism and train == eval without dropout, causality, and KV-cache decode == full
//! forward (with identical greedy generations); each a seeded proptest over one family's specs,
//! a batch and a weight seed, shrunk to the smallest model.
//!
//! Tolerances: the same computation on the same path must be bitwise identical in any dtype
//! (candle's CPU kernels are deterministic: no atomics, a fixed reduction order). The cached
//! decode runs different matmul shapes, so its rounding differs: f32 gets 1e-5 relative L2
//! (the transformers anchor for different paths), bf16 2e-2 and f16 5e-3.

use candle_core::{DType, Device, Tensor};
use proptest::strategy::Strategy;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};

use crate::error::Result;
use crate::model::generate::{greedy_cached, greedy_uncached};
use crate::model::{Faults, Mode, Transformer};
use crate::props::compare::{greedy_agree, Greedy};
pub use crate::props::property::ModelProperty;
use crate::props::property::{Body, Property};
use crate::props::verdict::{FailReason, PropConfig, Verdict};
use crate::props::{bitwise_equal, rel_l2, Check, Violation};
use crate::spec::{ArchSpec, Family};
use crate::strategy::{arb_batch, arb_family};
use crate::subject::Capabilities;

impl ModelProperty {
    /// Every property, in report order.
    pub const ALL: [ModelProperty; 3] = [ModelProperty::Deterministic, ModelProperty::Causal, ModelProperty::KvCache];

    /// Short name.
    pub fn name(self) -> &'static str {
        self.property().title
    }

    /// Catalogue id (`F1`, `F2`, `F3`).
    pub fn id(self) -> &'static str {
        self.property().id
    }

    /// The catalogue entry.
    pub fn property(self) -> &'static Property {
        match self {
            ModelProperty::Deterministic => &DETERMINISTIC,
            ModelProperty::Causal => &CAUSAL,
            ModelProperty::KvCache => &KV_CACHE,
        }
    }

    /// Check this property on `model` with `ids`.
    pub fn check(self, model: &Transformer, ids: &[Vec<u32>], floor: f64) -> Check {
        let s = ids.first().map_or(0, Vec::len);
        match self {
            ModelProperty::Deterministic => deterministic_and_mode_free(model, ids),
            ModelProperty::Causal => causal(model, ids, s / 2),
            ModelProperty::KvCache => kv_cache_matches(model, ids, split_of(ids), 3, floor),
        }
    }
}

const fn forward_entry(
    id: &'static str,
    test_name: &'static str,
    title: &'static str,
    invariant: &'static str,
    tolerance: &'static str,
    p: ModelProperty,
) -> Property {
    Property {
        id,
        test_name,
        title,
        invariant,
        tolerance,
        kinds: &[],
        dtypes: &[DType::F32],
        needs: Capabilities::none(),
        grad_accum: 1,
        filter: None,
        draws: crate::strategy::Draws::NONE,
        body: Body::Forward(p),
    }
}

/// F1: determinism.
pub const DETERMINISTIC: Property = forward_entry(
    "F1",
    "f1_forward_deterministic",
    "deterministic (train == eval, bitwise)",
    "tunecheck's model, per family: two eval forwards bitwise equal; train == eval without dropout",
    "bitwise (same computation)",
    ModelProperty::Deterministic,
);
/// F2: causality.
pub const CAUSAL: Property = forward_entry(
    "F2",
    "f2_forward_causal",
    "causal (future tokens ignored, bitwise)",
    "tunecheck's model, per family: logits at t unchanged (bitwise) when the tokens after t change",
    "bitwise",
    ModelProperty::Causal,
);
/// F3: KV cache.
pub const KV_CACHE: Property = forward_entry(
    "F3",
    "f3_forward_kv_cache",
    "kv-cache decode == full forward",
    "tunecheck's model, per family: prefill then one token at a time from the KV cache == the full forward; \
     greedy generation identical with and without the cache",
    "rel L2 ≤ clamp(2 × (each path's own rounding error vs f64, summed), 1e-5, 1e-4) in f32 (other matmul shapes); \
     tokens equal up to a near-tie",
    ModelProperty::KvCache,
);

fn case_strategy(f: Family) -> impl Strategy<Value = (ArchSpec, Vec<Vec<u32>>, u64)> {
    arb_family(f).prop_flat_map(|spec| {
        let v = spec.vocab_size;
        (proptest::strategy::Just(spec), arb_batch(v, 2, 10), 0u64..1_000_000)
    })
}

fn run_case(
    prop: ModelProperty,
    device: &Device,
    spec: &ArchSpec,
    ids: &[Vec<u32>],
    seed: u64,
    faults: Faults,
) -> Check {
    let w = crate::weights::generate(spec, seed, device)?;
    let model = Transformer::from_weights(spec, &w)?.with_faults(faults);
    // How far this model's precision moves its logits from the same model in f64: the
    // rounding floor two paths of the logits are judged against.
    // Each path against itself in f64 (the planted faults included, so a faulty path's own
    // error is still only its rounding): the two paths differ by at most the sum.
    let floor = match prop {
        ModelProperty::KvCache => {
            let exact_spec = ArchSpec { dtype: DType::F64, ..spec.clone() };
            let exact =
                Transformer::from_weights(&exact_spec, &crate::weights::cast(&w, DType::F64)?)?.with_faults(faults);
            let x = ids_tensor(&model, ids)?;
            let split = split_of(ids);
            crate::props::oracle::rel_l2_f64(&model.forward(&x, Mode::Eval)?, &exact.forward(&x, Mode::Eval)?)?
                + crate::props::oracle::rel_l2_f64(
                    &cached_logits(&model, &x, split)?,
                    &cached_logits(&exact, &x, split)?,
                )?
        }
        _ => 0.0,
    };
    prop.check(&model, ids, floor)
}

/// Where F3 splits a batch of `ids` into prefill and single-token steps.
fn split_of(ids: &[Vec<u32>]) -> usize {
    ids.first().map_or(0, Vec::len).div_ceil(2)
}

/// Logits of `x` computed incrementally: `split` positions at once, then one at a time from
/// the KV cache.
pub fn cached_logits(model: &Transformer, x: &Tensor, split: usize) -> Result<Tensor> {
    let s = x.dim(1)?;
    let split = split.clamp(1, s);
    let mut cache = model.new_cache();
    let mut parts = vec![model.forward_cached(&x.narrow(1, 0, split)?, &mut cache, Mode::Eval)?];
    for p in split..s {
        parts.push(model.forward_cached(&x.narrow(1, p, 1)?, &mut cache, Mode::Eval)?);
    }
    Ok(Tensor::cat(&parts, 1)?)
}

/// Run forward property `prop` over `cfg.cases` seeded cases of `family` (on a model with
/// `faults` planted, for mutants), shrinking any failure to the smallest model.
pub fn run_family(prop: ModelProperty, family: Family, device: &Device, cfg: &PropConfig, faults: Faults) -> Verdict {
    let cases = match cfg.effective_cases() {
        Ok(c) => c,
        Err(e) => return Verdict::failed_with(FailReason::Config, e),
    };
    let config = Config {
        cases,
        source_file: cfg.source_file,
        failure_persistence: cfg.persistence(),
        max_shrink_iters: 4096,
        ..Config::default()
    };
    let mut runner = TestRunner::new_with_rng(config, crate::props::seeding::seeded(cfg.seed));
    let ran = std::cell::Cell::new(0u32);
    crate::props::tolerance::clear_observed();
    let result = runner.run(&case_strategy(family), |(spec, ids, w_seed)| {
        ran.set(ran.get() + 1);
        run_case(prop, device, &spec, &ids, w_seed, faults).map_err(|f| TestCaseError::fail(f.to_string()))
    });
    match result {
        Ok(()) => Verdict::Passed {
            cases_run: cases,
            skipped: Vec::new(),
            measured: crate::props::tolerance::take_observed(),
        },
        Err(TestError::Fail(_, (spec, ids, w_seed))) => {
            let (reason, detail) = match run_case(prop, device, &spec, &ids, w_seed, faults) {
                Err(f) => crate::props::verdict::reason_of(&f, prop.id()),
                Ok(()) => crate::props::verdict::nondeterministic(prop.id()),
            };
            Verdict::Failed {
                reason,
                detail,
                minimal: serde_json::json!({"config": crate::io::config::to_json(&spec), "weight_seed": w_seed, "ids": ids, "family": family.to_string()}),
                cases_run: ran.get().min(cases),
                replay: None,
            }
        }
        Err(TestError::Abort(why)) => Verdict::failed_with(FailReason::NoCases, format!("aborted: {why}")),
    }
}

/// Run forward property `prop` for every family of `cfg.families`; the first failure stops.
pub fn run(prop: ModelProperty, device: &Device, cfg: &PropConfig, faults: Faults) -> Verdict {
    let mut cases_run = 0;
    let mut all = Vec::new();
    for &family in &cfg.families {
        match run_family(prop, family, device, cfg, faults) {
            Verdict::Passed { cases_run: c, measured, .. } => {
                cases_run += c;
                all.push(measured);
            }
            other => return other,
        }
    }
    Verdict::Passed { cases_run, skipped: Vec::new(), measured: crate::props::tolerance::worst_of(all) }
}

pub use crate::props::tolerance::{path_bound, path_tolerance};

/// `[batch][seq]` ids as a u32 tensor on the model's device.
pub fn ids_tensor(model: &Transformer, ids: &[Vec<u32>]) -> Result<Tensor> {
    let b = ids.len();
    let s = ids.first().map_or(0, Vec::len);
    let flat: Vec<u32> = ids.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (b, s), model.device())?)
}

/// Two eval forwards of the same batch are bitwise identical, and so is a train-mode forward
/// when every dropout probability is zero.
pub fn deterministic_and_mode_free(model: &Transformer, ids: &[Vec<u32>]) -> Check {
    let x = ids_tensor(model, ids)?;
    let a = model.forward(&x, Mode::Eval)?;
    let b = model.forward(&x, Mode::Eval)?;
    if !bitwise_equal(&a, &b)? {
        return Err(Violation {
            property: "F1/deterministic",
            code: "deterministic",
            detail: format!("two eval forwards differ (rel L2 {:.3e})", rel_l2(&a, &b)?),
        }
        .into());
    }
    let spec = model.spec();
    if spec.attention_dropout == 0.0 && spec.residual_dropout == 0.0 {
        let t = model.forward(&x, Mode::Train)?;
        if !bitwise_equal(&t, &a)? {
            return Err(Violation {
                property: "F1/deterministic",
                code: "train_eq_eval",
                detail: format!("dropout is 0 but train and eval logits differ (rel L2 {:.3e})", rel_l2(&t, &a)?),
            }
            .into());
        }
    }
    Ok(())
}

/// Logits at positions `0..=t` do not change (bitwise) when the tokens after `t` are replaced.
pub fn causal(model: &Transformer, ids: &[Vec<u32>], t: usize) -> Check {
    let s = ids.first().map_or(0, Vec::len);
    if t + 1 >= s {
        return Ok(());
    }
    let vocab = model.spec().vocab_size as u32;
    let changed: Vec<Vec<u32>> = ids
        .iter()
        .map(|row| row.iter().enumerate().map(|(j, &v)| if j > t { (v + 1) % vocab } else { v }).collect())
        .collect();
    let a = model.forward(&ids_tensor(model, ids)?, Mode::Eval)?.narrow(1, 0, t + 1)?;
    let b = model.forward(&ids_tensor(model, &changed)?, Mode::Eval)?.narrow(1, 0, t + 1)?;
    if !bitwise_equal(&a, &b)? {
        return Err(Violation {
            property: "F2/causal",
            code: "causal",
            detail: format!(
                "logits at positions 0..={t} changed when tokens after {t} changed (rel L2 {:.3e})",
                rel_l2(&a, &b)?
            ),
        }
        .into());
    }
    Ok(())
}

/// Prefill `split` tokens then decode the rest one at a time from the KV cache: the logits
/// match the full forward within [`path_bound`] of the rounding `floor` (how far each path's
/// precision moves its logits from the same path in f64, summed; 0 when unknown: the path
/// tolerance), and greedy
/// generation of `new_tokens` from the whole batch gives the same tokens with and without the
/// cache, up to a near-tie.
pub fn kv_cache_matches(model: &Transformer, ids: &[Vec<u32>], split: usize, new_tokens: usize, floor: f64) -> Check {
    let x = ids_tensor(model, ids)?;
    let s = x.dim(1)?;
    let split = split.clamp(1, s);
    let full = model.forward(&x, Mode::Eval)?;
    let cached = cached_logits(model, &x, split)?;
    let tol = path_bound(model.spec().dtype).tolerance(floor);
    let err = rel_l2(&cached, &full)?;
    crate::props::tolerance::observe("KV-cache vs full forward logits, rel L2", err, tol);
    if err.is_nan() || err > tol {
        return Err(Violation {
            property: "F3/kv_cache",
            code: "kv_cache",
            detail: format!(
                "cached decode (prefill {split} of {s}) vs full forward: rel L2 {err:.3e} > {tol:.1e} (rounding floor \
                 {floor:.1e})"
            ),
        }
        .into());
    }
    if new_tokens > 0 {
        let a = greedy_cached(model, &x, new_tokens)?;
        let b = greedy_uncached(model, &x, new_tokens)?;
        if let Greedy::Differ(detail) = greedy_agree(&a, &b, &x, |ids| model.forward(ids, Mode::Eval), tol)? {
            return Err(Violation { property: "F3/kv_cache", code: "kv_cache_generate", detail }.into());
        }
    }
    Ok(())
}
