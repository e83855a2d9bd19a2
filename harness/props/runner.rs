//! Running a property over a strategy of setups against a subject factory: a seeded proptest
//! run that shrinks failures, persists them next to the caller's source file, and reports
//! the minimal counterexample.

use candle_core::Device;
use proptest::strategy::Strategy;
use proptest::test_runner::{
    Config, FileFailurePersistence, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner,
};

use crate::error::Result;
use crate::props::{Check, Failure};
use crate::subject::{Capabilities, Setup, Trainer};

/// How a property run is configured.
#[derive(Debug, Clone)]
pub struct PropConfig {
    /// Cases to try (`PROPTEST_CASES` overrides when set).
    pub cases: u32,
    /// Seed of the case generator.
    pub seed: u64,
    /// The caller's source file (`file!()`), for proptest's regression file; `None` keeps
    /// failures in memory only.
    pub source_file: Option<&'static str>,
}

impl Default for PropConfig {
    fn default() -> Self {
        PropConfig { cases: 8, seed: 0, source_file: None }
    }
}

impl PropConfig {
    /// The case count after `PROPTEST_CASES`.
    pub fn effective_cases(&self) -> u32 {
        std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(self.cases)
    }
}

/// The result of a property run.
#[derive(Debug, Clone)]
pub enum PropOutcome {
    /// Every case held.
    Passed {
        /// Cases run.
        cases: u32,
    },
    /// Skipped: the subject lacks a needed capability (or a device is missing).
    Skipped(String),
    /// A (shrunk) counterexample.
    Failed {
        /// What was violated, with numbers.
        detail: String,
        /// The minimal setup's `config.json` and other knobs, as JSON.
        minimal: serde_json::Value,
    },
}

impl PropOutcome {
    /// True unless failed.
    pub fn ok(&self) -> bool {
        !matches!(self, PropOutcome::Failed { .. })
    }

    /// Panic with a report on failure; print a skip message on skip.
    pub fn assert(&self, property: &str) {
        match self {
            PropOutcome::Passed { .. } => {}
            PropOutcome::Skipped(why) => eprintln!("SKIPPED {property}: {why}"),
            PropOutcome::Failed { detail, minimal } => panic!(
                "{property} failed: {detail}\nminimal case: {}\nreplay: PROPTEST_CASES=... cargo test {property}",
                serde_json::to_string_pretty(minimal).unwrap_or_default()
            ),
        }
    }
}

/// A summary of a setup for reports: its config.json and adapter / training knobs.
pub fn describe(s: &Setup) -> serde_json::Value {
    serde_json::json!({
        "config": s.spec.to_config_json(),
        "lora": {
            "r": s.lora.r, "alpha": s.lora.alpha, "use_rslora": s.lora.use_rslora,
            "target_modules": s.lora.target_modules, "modules_to_save": s.lora.modules_to_save,
        },
        "quantization_config": s.quant.map(|q| q.to_json()),
        "grad_accum": s.train.grad_accum,
        "adapter_seed": s.adapter_seed,
    })
}

/// Run `check` on subjects built by `factory` over `strategy`, shrinking failures. A check
/// may return [`Failure::Error`] wrapping an `Unsupported` message to skip.
pub fn run<T, F, S>(
    factory: &F,
    device: &Device,
    needs: Capabilities,
    strategy: S,
    cfg: &PropConfig,
    check: impl Fn(&F, &Device, &Setup) -> Check,
) -> PropOutcome
where
    T: Trainer,
    F: Fn(&Setup, &Device) -> Result<T>,
    S: Strategy<Value = Setup>,
{
    // Capability check on a probe subject.
    let mut probe_rng = TestRunner::new_with_rng(Config::default(), seeded(cfg.seed));
    if let Ok(tree) = strategy.new_tree(&mut probe_rng) {
        use proptest::strategy::ValueTree;
        let setup = tree.current();
        match factory(&setup, device) {
            Ok(t) => {
                if let Some(missing) = lacking(t.capabilities(), needs) {
                    return PropOutcome::Skipped(format!("the subject does not declare `{missing}`"));
                }
            }
            Err(e) => return PropOutcome::Skipped(format!("the subject could not be built: {e}")),
        }
    }
    let cases = cfg.effective_cases();
    let persistence = cfg.source_file.map(|_| {
        Box::new(FileFailurePersistence::WithSource("proptest-regressions"))
            as Box<dyn proptest::test_runner::FailurePersistence>
    });
    let config = Config {
        cases,
        source_file: cfg.source_file,
        failure_persistence: persistence,
        max_shrink_iters: 256,
        ..Config::default()
    };
    let mut runner = TestRunner::new_with_rng(config, seeded(cfg.seed));
    let result = runner.run(&strategy, |setup| {
        check(factory, device, &setup).map_err(|f| match f {
            Failure::Violated(v) => TestCaseError::fail(v.to_string()),
            Failure::Error(e) => TestCaseError::fail(format!("error: {e}")),
        })
    });
    match result {
        Ok(()) => PropOutcome::Passed { cases },
        Err(TestError::Fail(why, setup)) => PropOutcome::Failed { detail: why.to_string(), minimal: describe(&setup) },
        Err(TestError::Abort(why)) => {
            PropOutcome::Failed { detail: format!("aborted: {why}"), minimal: serde_json::Value::Null }
        }
    }
}

/// The proptest RNG for a property seed (ChaCha, so runs replay).
pub fn seeded(seed: u64) -> TestRng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    TestRng::from_seed(RngAlgorithm::ChaCha, &key)
}

fn lacking(have: Capabilities, need: Capabilities) -> Option<&'static str> {
    [
        (need.kv_cache && !have.kv_cache, "kv_cache"),
        (need.save_load && !have.save_load, "save_load"),
        (need.quant4 && !have.quant4, "quant4"),
        (need.grad_accum && !have.grad_accum, "grad_accum"),
        (need.train_embeddings && !have.train_embeddings, "train_embeddings"),
    ]
    .into_iter()
    .find(|(missing, _)| *missing)
    .map(|(_, name)| name)
}
