//! What a property run is told (its configuration) and what it concludes: an honest verdict
//! — passed with the cases actually run, skipped with the reason, or failed with the clause,
//! the numbers, the minimal case and a replay line.

use proptest::test_runner::FileFailurePersistence;
use serde::Serialize;

use crate::props::tolerance::Measured;
use crate::props::Failure;
use crate::spec::Family;
use crate::strategy::AdapterKind;

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
    /// Wall-time budget for shrinking one failure (`None`: no limit); when it runs out, the
    /// smallest failing case found so far is reported.
    pub max_shrink_time: Option<std::time::Duration>,
    /// A precondition on the setup on top of the property's own (a planted bug that exists
    /// only where the model has two layers, or where a 4-bit base computes in another dtype
    /// than the bug forces): draws failing it are redrawn.
    pub precondition: Option<fn(&crate::subject::Setup) -> bool>,
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
            max_shrink_time: None,
            precondition: None,
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
        /// The worst each bounded comparison came to its bound over the cases, worst ratio
        /// first (empty for exact comparisons).
        #[serde(skip_serializing_if = "Vec::is_empty", default)]
        measured: Vec<Measured>,
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
        /// started (`tunecheck check`, a `conformance!` test); `None` from [`crate::props::runner::run`] itself.
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

    /// A pass of `cases_run` cases with nothing skipped and nothing measured.
    pub fn passed_all(cases_run: u32) -> Self {
        Verdict::Passed { cases_run, skipped: Vec::new(), measured: Vec::new() }
    }

    /// What a pass measured against its bounds (empty otherwise).
    pub fn measured(&self) -> &[Measured] {
        match self {
            Verdict::Passed { measured, .. } => measured,
            _ => &[],
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
