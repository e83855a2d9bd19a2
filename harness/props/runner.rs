//! The one runner of every trainer property: a seeded proptest per (property, adapter kind)
//! over [`arb_setup`], shrinking failures to the smallest setup (the simplest draw first:
//! [`SimplestFirst`]), persisting them next to the caller's source file, and returning an
//! honest [`Verdict`]: the cases that actually ran, every skip with its reason, and a failure
//! with its typed reason and a replay line.
//!
//! Rules: zero executed cases is a failure, never a pass; `PROPTEST_CASES=0` is an error;
//! with `strict` any skip is a failure. The same `seed` gives the same cases for every
//! property, so `tunecheck check --seed S` replays all of them.

use std::cell::Cell;

use candle_core::{DType, Device};
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};

use crate::device::pin_thread_count;
use crate::props::property::{Body, Property};
use crate::props::seeding::seeded;
use crate::props::shrink::SimplestFirst;
pub use crate::props::verdict::{nondeterministic, reason_of};
pub use crate::props::verdict::{FailReason, PropConfig, Verdict};
use crate::props::Failure;
use crate::spec::short_dtype_name;
use crate::spec::Family;
use crate::strategy::{arb_setup, AdapterKind};
use crate::subject::{Capabilities, Factory, Setup};

/// Draws a property's precondition may reject in one run before the run is aborted.
pub const MAX_PRECONDITION_REJECTS: u32 = 4096;

/// Draws of one adapter kind the subject may refuse as unsupported, in a row and before it has
/// taken any, before the kind counts as one it cannot take (a skip naming the reasons). A
/// subject that takes one draw in `p` refuses 128 in a row with probability (1 − 1/p)^128: for
/// p = 12 (one fixed 4-bit configuration among the 12 tunecheck draws) 1.4e-5.
pub const UNSUPPORTED_STREAK: u32 = 128;

/// A summary of a setup for reports: its config.json and adapter / training knobs.
pub fn describe(s: &Setup) -> serde_json::Value {
    serde_json::json!({
        "config": crate::io::config::to_json(&s.spec),
        "lora": {
            "r": s.lora.r, "alpha": s.lora.alpha, "use_rslora": s.lora.use_rslora,
            "target_modules": s.lora.target_modules, "modules_to_save": s.lora.modules_to_save,
        },
        "quantization_config": s.quant.as_ref().map(crate::io::config::quant_to_json),
        "grad_accum": s.train.grad_accum,
        "recipe": {
            "learning_rate": s.train.optim.lr, "weight_decay": s.train.optim.weight_decay,
            "adam_beta1": s.train.optim.beta1, "adam_beta2": s.train.optim.beta2, "adam_epsilon": s.train.optim.eps,
            "warmup_steps": s.train.schedule.warmup_steps, "min_lr_ratio": s.train.schedule.min_ratio,
            "total_steps": s.train.schedule.total_steps, "max_grad_norm": s.train.max_grad_norm,
            "lora_dropout": s.lora.dropout,
        },
        "adapter_seed": s.adapter_seed,
    })
}

/// The capabilities an adapter kind needs.
pub fn kind_needs(kind: AdapterKind, grad_accum: usize) -> Capabilities {
    Capabilities {
        quant4: kind == AdapterKind::QLora,
        train_embeddings: kind == AdapterKind::FullEmbeddings,
        grad_accum: grad_accum > 1,
        ..Capabilities::none()
    }
}

/// Run trainer property `prop` against subjects from `factory` on `device`.
pub fn run(prop: &Property, factory: &dyn Factory, device: &Device, cfg: &PropConfig) -> Verdict {
    pin_thread_count();
    crate::props::tolerance::clear_observed();
    let cases = match cfg.effective_cases() {
        Ok(c) => c,
        Err(e) => return Verdict::failed_with(FailReason::Config, e),
    };
    let (check, device) = match &prop.body {
        Body::Trainer(c) => (*c, device.clone()),
        Body::CrossDevice(c) => match crate::device::cuda() {
            Ok(gpu) => (*c, gpu),
            Err(why) if crate::device::cuda_required() => {
                return Verdict::failed_with(
                    FailReason::Config,
                    format!(
                        "{}: CUDA required by {}=1 but unavailable: {why}",
                        prop.id,
                        crate::device::REQUIRE_CUDA_ENV
                    ),
                )
            }
            Err(_) => {
                return finish(
                    cfg,
                    Verdict::Skipped {
                        reason: "no CUDA device (TUNECHECK_REQUIRE_CUDA=1 makes this a failure)".into(),
                    },
                )
            }
        },
        Body::Kernels(run) => return finish(cfg, run(&PropConfig { cases, ..cfg.clone() })),
        Body::Forward(p) => {
            return finish(cfg, crate::props::forward::run(*p, device, cfg, crate::model::Faults::default()))
        }
    };
    let caps = factory.capabilities();
    if let Some(missing) = caps.lacking(&prop.needs) {
        return finish(cfg, Verdict::Skipped { reason: not_declared(factory, missing) });
    }
    let mut skipped = Vec::new();
    let dtypes: Vec<DType> = prop
        .dtypes
        .iter()
        .copied()
        .filter(|&d| {
            let ok = caps.supports_dtype(d);
            if !ok {
                skipped.push(format!("{}: {}", short_dtype_name(d), not_declared(factory, short_dtype_name(d))));
            }
            ok
        })
        .collect();
    if cfg.families.is_empty() {
        return Verdict::failed_with(FailReason::Config, "no model family to draw setups from");
    }
    let supported = factory.families();
    let families: Vec<Family> = cfg
        .families
        .iter()
        .copied()
        .filter(|f| match supported.iter().find(|(g, _)| g == f) {
            Some((_, Some(why))) => {
                skipped.push(format!("{}: {why}", f.short_name()));
                false
            }
            _ => true,
        })
        .collect();
    if let Some(only) = &cfg.kinds {
        if !prop.kinds.is_empty() && !prop.kinds.iter().any(|k| only.contains(k)) {
            let names = |ks: &[AdapterKind]| ks.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ");
            return finish(
                cfg,
                Verdict::Skipped {
                    reason: format!("it exercises {}, none of the kinds selected ({})", names(prop.kinds), names(only)),
                },
            );
        }
    }
    let mut cases_run = 0u32;
    if !dtypes.is_empty() && !families.is_empty() {
        for &kind in prop.kinds.iter().filter(|k| cfg.kinds.as_ref().is_none_or(|only| only.contains(k))) {
            if let Some(missing) = caps.lacking(&kind_needs(kind, prop.grad_accum)) {
                skipped.push(format!("{}: {}", kind.name(), not_declared(factory, missing)));
                continue;
            }
            let counter = Cell::new(0u32);
            let precondition = cfg.precondition;
            // Shrinking keeps the kind of the first failure: a smaller setup that fails a
            // different clause (or errors) is not a smaller example of *this* failure.
            let first: std::cell::RefCell<Option<String>> = Default::default();
            let strategy = SimplestFirst::new(
                arb_setup(
                    kind,
                    prop.grad_accum,
                    dtypes.clone(),
                    families.clone(),
                    prop.filter.into_iter().collect(),
                    prop.draws,
                )
                .prop_filter("the planted bug's precondition", move |s| precondition.is_none_or(|f| f(s))),
            );
            let config = Config {
                cases,
                source_file: cfg.source_file,
                failure_persistence: cfg.persistence(),
                max_shrink_iters: cfg.max_shrink_iters,
                max_shrink_time: cfg.max_shrink_time.map_or(0, |d| d.as_millis().clamp(1, u32::MAX as u128) as u32),
                // A precondition that rejects 4096 draws in a row is one no setup meets: the run
                // aborts (zero cases, a failure) instead of drawing proptest's default 65 536.
                max_local_rejects: MAX_PRECONDITION_REJECTS,
                ..Config::default()
            };
            let mut runner = TestRunner::new_with_rng(config, seeded(sub_seed(cfg.seed, prop.id, kind)));
            // A driver failure (a trainer process that died, hung or broke the protocol) is
            // about the driver, not the case: it is reported with the case that met it,
            // unshrunk, so that a hanging driver costs one timeout, not one per shrink step.
            let halted: std::cell::RefCell<Option<(FailReason, String)>> = Default::default();
            // Cases the subject declares beyond it (a framework version's limits): set aside,
            // shown as skips, never counted as run.
            let unsupported: std::cell::RefCell<Vec<String>> = Default::default();
            // Refusals in a row before the first taken case: past UNSUPPORTED_STREAK the kind is
            // one the subject cannot take at all (every draw is refused without asking it again,
            // and the kind is shown as skipped with the reasons, not as a run of zero cases).
            let refused = Cell::new(0u32);
            let taken = Cell::new(0u32);
            let result = runner.run(&strategy, |setup| {
                if halted.borrow().is_some() {
                    return Ok(());
                }
                if taken.get() == 0 && refused.get() >= UNSUPPORTED_STREAK {
                    return Err(TestCaseError::reject("the subject takes no case of this kind"));
                }
                counter.set(counter.get() + 1);
                match check(factory, &device, &setup) {
                    Ok(()) => {
                        taken.set(taken.get() + 1);
                        Ok(())
                    }
                    Err(Failure::Error(crate::error::Error::Unsupported { what })) => {
                        refused.set(refused.get() + 1);
                        let mut u = unsupported.borrow_mut();
                        if !u.contains(&what) {
                            u.push(what.clone());
                        }
                        Err(TestCaseError::reject(what))
                    }
                    Err(f) => {
                        if matches!(f, Failure::Error(crate::error::Error::Driver { .. })) {
                            *halted.borrow_mut() = Some(reason_of(&f, prop.id));
                            return Err(TestCaseError::fail(f.to_string()));
                        }
                        let key = failure_key(&f);
                        let mut first = first.borrow_mut();
                        match first.as_deref() {
                            Some(k) if k != key => Ok(()),
                            _ => {
                                *first = Some(key);
                                Err(TestCaseError::fail(f.to_string()))
                            }
                        }
                    }
                }
            });
            for what in unsupported.borrow().iter() {
                skipped.push(format!("{}: some cases set aside: {what}", kind.name()));
            }
            match result {
                Ok(()) => cases_run += cases,
                Err(TestError::Fail(_, setup)) => {
                    // Re-run the minimal case for its typed reason (the check is deterministic).
                    let recorded = halted.borrow_mut().take();
                    let (reason, detail) = match recorded {
                        Some(r) => r,
                        None => match check(factory, &device, &setup) {
                            Err(f) => reason_of(&f, prop.id),
                            Ok(()) => nondeterministic(prop.id),
                        },
                    };
                    return Verdict::Failed {
                        reason,
                        detail,
                        minimal: describe(&setup),
                        cases_run: cases_run + cases.min(counter.get()),
                        replay: None,
                    };
                }
                Err(TestError::Abort(_)) if taken.get() == 0 && refused.get() >= UNSUPPORTED_STREAK => {
                    skipped.push(format!(
                        "{}: no case the subject takes ({} draws in a row refused as unsupported)",
                        kind.name(),
                        refused.get()
                    ));
                }
                Err(TestError::Abort(why)) => {
                    return Verdict::Failed {
                        reason: FailReason::NoCases,
                        detail: format!("{} ({}): aborted: {why}", prop.id, kind.name()),
                        minimal: serde_json::Value::Null,
                        cases_run,
                        replay: None,
                    };
                }
            }
        }
    }
    finish(cfg, Verdict::Passed { cases_run, skipped, measured: crate::props::tolerance::take_observed() })
}

/// The skip reason for a capability the subject lacks, with the framework's own reason where it
/// gives one.
fn not_declared(factory: &dyn Factory, capability: &str) -> String {
    match factory.lacking_reason(capability) {
        Some(why) => format!("the subject does not declare `{capability}`: {why}"),
        None => format!("the subject does not declare `{capability}`"),
    }
}

/// What kind of failure `f` is: the violated property and clause, or `error`.
fn failure_key(f: &Failure) -> String {
    match f {
        Failure::Violated(v) => format!("{}/{}", v.id(), v.code),
        Failure::Error(_) => "error".into(),
    }
}

/// The last rules: zero cases run is a failure; under `strict` any skip is one.
fn finish(cfg: &PropConfig, v: Verdict) -> Verdict {
    let v = match v {
        Verdict::Passed { cases_run: 0, skipped, .. } if skipped.is_empty() => {
            return Verdict::failed_with(FailReason::NoCases, "no case ran")
        }
        Verdict::Passed { cases_run: 0, skipped, .. } => Verdict::Skipped { reason: skipped.join("; ") },
        other => other,
    };
    let skips = v.skips();
    if cfg.strict && !v.failed() && !skips.is_empty() {
        return Verdict::failed_with(FailReason::Strict, format!("--strict: skipped: {}", skips.join("; ")));
    }
    v
}

/// The seed of one (property, kind) sub-run: the same for every run with `seed`.
fn sub_seed(seed: u64, prop: &str, kind: AdapterKind) -> u64 {
    seed ^ crate::weights::fnv1a64(format!("{prop}/{}", kind.name()).as_bytes())
}

/// The first setup `prop` would draw for `kind` with `seed` (for probes and tests).
pub fn first_setup(prop: &Property, kind: AdapterKind, seed: u64) -> Option<Setup> {
    let mut runner = TestRunner::new_with_rng(Config::default(), seeded(sub_seed(seed, prop.id, kind)));
    arb_setup(
        kind,
        prop.grad_accum,
        prop.dtypes.to_vec(),
        Family::ALL.to_vec(),
        prop.filter.into_iter().collect(),
        prop.draws,
    )
    .new_tree(&mut runner)
    .ok()
    .map(|t| t.current())
}
