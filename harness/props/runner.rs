//! The one runner of every trainer property: a seeded proptest per (property, adapter kind)
//! over [`arb_setup`], shrinking failures to the smallest setup, persisting them next to the
//! caller's source file, and returning an honest [`Verdict`]: the cases that actually ran,
//! every skip with its reason, and a failure with its typed reason and a replay line.
//!
//! Rules: zero executed cases is a failure, never a pass; `PROPTEST_CASES=0` is an error;
//! with `strict` any skip is a failure. The same `seed` gives the same cases for every
//! property, so `tunecheck check --seed S` replays all of them.

use std::cell::Cell;

use candle_core::{DType, Device};
use proptest::strategy::{Strategy, ValueTree};
use proptest::test_runner::{
    Config, FileFailurePersistence, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner,
};
use serde::Serialize;

use crate::props::catalogue::{Body, Property};
use crate::props::Failure;
use crate::spec::short_dtype_name;
use crate::spec::Family;
use crate::strategy::{arb_setup, AdapterKind};
use crate::subject::{Capabilities, Factory, Setup};

/// How a property run is configured.
#[derive(Debug, Clone)]
pub struct PropConfig {
    /// Cases to run per adapter kind (`PROPTEST_CASES` overrides when set).
    pub cases: u32,
    /// Seed of the case generator.
    pub seed: u64,
    /// The caller's source file (`file!()`), for proptest's regression file; `None` keeps
    /// failures in memory only.
    pub source_file: Option<&'static str>,
    /// Turn every skip into a failure (`--strict`, `TUNECHECK_STRICT=1`).
    pub strict: bool,
    /// Model families the setups are drawn from (shrinking toward the first).
    pub families: Vec<Family>,
    /// Shrinking steps after a failure (0: report the first failing case as found).
    pub max_shrink_iters: u32,
    /// Only these adapter kinds of each property (`None`: all of them).
    pub kinds: Option<Vec<AdapterKind>>,
}

impl Default for PropConfig {
    fn default() -> Self {
        PropConfig {
            cases: 4,
            seed: 0,
            source_file: None,
            strict: false,
            families: Family::ALL.to_vec(),
            max_shrink_iters: 256,
            kinds: None,
        }
    }
}

impl PropConfig {
    /// The case count after `PROPTEST_CASES`; zero or an unreadable value is an error.
    pub fn effective_cases(&self) -> Result<u32, String> {
        let cases = match std::env::var("PROPTEST_CASES") {
            Ok(v) => v.trim().parse::<u32>().map_err(|_| format!("PROPTEST_CASES=`{v}` is not a whole number"))?,
            Err(_) => self.cases,
        };
        if cases == 0 {
            return Err("zero cases requested (PROPTEST_CASES=0 or --cases 0): a property that runs no case has \
                        not been checked"
                .into());
        }
        Ok(cases)
    }

    /// The proptest failure persistence for this configuration: beside `source_file` when set.
    pub fn persistence(&self) -> Option<Box<dyn proptest::test_runner::FailurePersistence>> {
        self.source_file.map(|_| {
            Box::new(FileFailurePersistence::WithSource("proptest-regressions"))
                as Box<dyn proptest::test_runner::FailurePersistence>
        })
    }

    /// `strict` also when `TUNECHECK_STRICT=1` is set.
    pub fn with_env_strict(mut self) -> Self {
        self.strict |= std::env::var("TUNECHECK_STRICT").is_ok_and(|v| v == "1");
        self
    }
}

/// Why a property failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum FailReason {
    /// The invariant does not hold: property id and the clause that broke.
    Violated {
        /// Property id (`P3`).
        property: String,
        /// The clause (`logits_differ`, ...).
        code: String,
    },
    /// The subject or the check returned an error instead of an answer.
    Error,
    /// No case ran (nothing executed is not a pass).
    NoCases,
    /// The run was configured so that nothing can run (`PROPTEST_CASES=0`, ...).
    Config,
    /// Something was skipped under `--strict`.
    Strict,
}

/// The result of running one property.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    /// Every case that ran held; `skipped` lists what did not run and why.
    Passed {
        /// Cases that actually ran.
        cases_run: u32,
        /// Adapter kinds, dtypes or capabilities not exercised, each with its reason.
        skipped: Vec<String>,
    },
    /// Nothing could run, for this reason.
    Skipped {
        /// Why.
        reason: String,
    },
    /// A (shrunk) counterexample, or a run that could not count as a pass.
    Failed {
        /// Why, typed.
        reason: FailReason,
        /// The violation or error of the minimal case, with numbers.
        detail: String,
        /// The minimal setup's `config.json`, adapter and training knobs (null when none).
        minimal: serde_json::Value,
        /// Cases run before the failure (including the failing one).
        cases_run: u32,
        /// A command that reproduces this failure, filled in by whoever knows how the run was
        /// started (`tunecheck check`, a `conformance!` test); `None` from [`run`] itself.
        replay: Option<String>,
    },
}

impl Verdict {
    /// True only for a pass (a skip is not a pass).
    pub fn passed(&self) -> bool {
        matches!(self, Verdict::Passed { .. })
    }

    /// True for a failure.
    pub fn failed(&self) -> bool {
        matches!(self, Verdict::Failed { .. })
    }

    /// Cases that actually ran.
    pub fn cases_run(&self) -> u32 {
        match self {
            Verdict::Passed { cases_run, .. } | Verdict::Failed { cases_run, .. } => *cases_run,
            Verdict::Skipped { .. } => 0,
        }
    }

    /// Every skip, for reports.
    pub fn skips(&self) -> Vec<String> {
        match self {
            Verdict::Passed { skipped, .. } => skipped.clone(),
            Verdict::Skipped { reason } => vec![reason.clone()],
            Verdict::Failed { .. } => Vec::new(),
        }
    }

    /// `pass`, `skip` or `FAIL`.
    pub fn word(&self) -> &'static str {
        match self {
            Verdict::Passed { skipped, .. } if skipped.is_empty() => "pass",
            Verdict::Passed { .. } => "pass*",
            Verdict::Skipped { .. } => "skip",
            Verdict::Failed { .. } => "FAIL",
        }
    }

    /// True when this is a violation of `property` (and of clause `code`, when given).
    pub fn violates(&self, property: &str, code: Option<&str>) -> bool {
        match self {
            Verdict::Failed { reason: FailReason::Violated { property: p, code: c }, .. } => {
                p == property && code.is_none_or(|want| want == c)
            }
            _ => false,
        }
    }

    /// For `#[test]`s: panic on failure with the report (a skip fails under `strict` through
    /// the runner); print every skip so that it is seen.
    pub fn assert(&self, test: &str) {
        for s in self.skips() {
            eprintln!("SKIPPED {test}: {s}");
        }
        if let Verdict::Failed { detail, minimal, replay, cases_run, .. } = self {
            panic!(
                "{test} failed after {cases_run} case(s): {detail}\nminimal case: {}\nreplay: {}",
                serde_json::to_string_pretty(minimal).unwrap_or_default(),
                replay.as_deref().unwrap_or("rerun this test (the failing case is persisted beside it)")
            );
        }
        if let Verdict::Passed { cases_run, .. } = self {
            eprintln!("{test}: {cases_run} case(s) passed");
        }
    }

    /// A failure without a case (a configuration that cannot run, nothing run, ...).
    pub fn failed_with(reason: FailReason, detail: impl Into<String>) -> Self {
        Verdict::Failed { reason, detail: detail.into(), minimal: serde_json::Value::Null, cases_run: 0, replay: None }
    }
}

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

/// Pin candle's thread count for this process (to the value candle itself would choose) by
/// setting `RAYON_NUM_THREADS` when it is unset. candle 0.11 reads that variable on every
/// matmul and, when it is absent, works the default out again from `/proc` and `/sys` — about
/// 7 files opened per matmul, which made property runs on tiny models 5× slower (mostly
/// kernel time; measured with `strace -c`: 27 251 `openat` calls for one P4 run). Setting it
/// to the same number changes no thread count and no result. A value the user set is kept.
pub fn pin_thread_count() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            let n = candle_core::utils::get_num_threads();
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
    });
}

/// Run trainer property `prop` against subjects from `factory` on `device`.
pub fn run(prop: &Property, factory: &dyn Factory, device: &Device, cfg: &PropConfig) -> Verdict {
    pin_thread_count();
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
        return finish(cfg, Verdict::Skipped { reason: format!("the subject does not declare `{missing}`") });
    }
    let mut skipped = Vec::new();
    let dtypes: Vec<DType> = prop
        .dtypes
        .iter()
        .copied()
        .filter(|&d| {
            let ok = caps.supports_dtype(d);
            if !ok {
                skipped.push(format!(
                    "{}: the subject does not declare `{}`",
                    short_dtype_name(d),
                    short_dtype_name(d)
                ));
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
    let mut cases_run = 0u32;
    if !dtypes.is_empty() && !families.is_empty() {
        for &kind in prop.kinds.iter().filter(|k| cfg.kinds.as_ref().is_none_or(|only| only.contains(k))) {
            if let Some(missing) = caps.lacking(&kind_needs(kind, prop.grad_accum)) {
                skipped.push(format!("{}: the subject does not declare `{missing}`", kind.name()));
                continue;
            }
            let counter = Cell::new(0u32);
            // Shrinking keeps the kind of the first failure: a smaller setup that fails a
            // different clause (or errors) is not a smaller example of *this* failure.
            let first: std::cell::RefCell<Option<String>> = Default::default();
            let strategy = arb_setup(kind, prop.grad_accum, dtypes.clone(), families.clone());
            let filter = prop.filter;
            let strategy = strategy.prop_filter("the property's precondition", move |s| filter.is_none_or(|f| f(s)));
            let config = Config {
                cases,
                source_file: cfg.source_file,
                failure_persistence: cfg.persistence(),
                max_shrink_iters: cfg.max_shrink_iters,
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
            let result = runner.run(&strategy, |setup| {
                if halted.borrow().is_some() {
                    return Ok(());
                }
                counter.set(counter.get() + 1);
                match check(factory, &device, &setup) {
                    Ok(()) => Ok(()),
                    Err(Failure::Error(crate::error::Error::Unsupported { what })) => {
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
    finish(cfg, Verdict::Passed { cases_run, skipped })
}

/// The typed reason and the detail of a check's failure on a (shrunk) case; `what` names the
/// check in the detail of an error.
pub fn reason_of(f: &Failure, what: &str) -> (FailReason, String) {
    match f {
        Failure::Violated(v) => {
            (FailReason::Violated { property: v.id().to_string(), code: v.code.to_string() }, v.to_string())
        }
        Failure::Error(e) => (FailReason::Error, format!("{what} error: {e}")),
    }
}

/// The reason when a shrunk case that failed passes on a re-run.
pub fn nondeterministic(what: &str) -> (FailReason, String) {
    (FailReason::Error, format!("{what}: the shrunk case failed once and passed when re-run (nondeterminism)"))
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
        Verdict::Passed { cases_run: 0, skipped } if skipped.is_empty() => {
            return Verdict::failed_with(FailReason::NoCases, "no case ran")
        }
        Verdict::Passed { cases_run: 0, skipped } => Verdict::Skipped { reason: skipped.join("; ") },
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

/// The proptest RNG for a property seed (ChaCha, so runs replay).
pub fn seeded(seed: u64) -> TestRng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    TestRng::from_seed(RngAlgorithm::ChaCha, &key)
}

/// The first setup `prop` would draw for `kind` with `seed` (for probes and tests).
pub fn first_setup(prop: &Property, kind: AdapterKind, seed: u64) -> Option<Setup> {
    let mut runner = TestRunner::new_with_rng(Config::default(), seeded(sub_seed(seed, prop.id, kind)));
    arb_setup(kind, prop.grad_accum, prop.dtypes.to_vec(), Family::ALL.to_vec())
        .new_tree(&mut runner)
        .ok()
        .map(|t| t.current())
}
