//! The suite behind `tunecheck check`: each property run as a seeded proptest over a family's
//! specs, shrunk to a minimal counterexample on failure, and reported as a table or JSON.

use candle_core::Device;
use proptest::strategy::Strategy;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestError, TestRng, TestRunner};
use serde::Serialize;

use crate::model::{Faults, Transformer};
use crate::props::{self, Check, Failure};
use crate::spec::{ArchSpec, Family};
use crate::strategy::{arb_batch, arb_family};
use crate::weights;

/// A property the suite runs on a model and a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelProperty {
    /// Two forwards bitwise equal; train == eval without dropout.
    Deterministic,
    /// Logits at t independent of tokens after t.
    Causal,
    /// Cached decode == full forward; identical greedy generations.
    KvCache,
}

impl ModelProperty {
    /// Every property, in report order.
    pub const ALL: [ModelProperty; 3] = [ModelProperty::Deterministic, ModelProperty::Causal, ModelProperty::KvCache];

    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            ModelProperty::Deterministic => "deterministic (train == eval, bitwise)",
            ModelProperty::Causal => "causal (future tokens ignored, bitwise)",
            ModelProperty::KvCache => "kv-cache decode == full forward",
        }
    }

    /// Short id for JSON and test names.
    pub fn id(self) -> &'static str {
        match self {
            ModelProperty::Deterministic => "deterministic",
            ModelProperty::Causal => "causal",
            ModelProperty::KvCache => "kv_cache",
        }
    }

    /// Check this property on `model` with `ids`.
    pub fn check(self, model: &Transformer, ids: &[Vec<u32>]) -> Check {
        let s = ids.first().map_or(0, Vec::len);
        match self {
            ModelProperty::Deterministic => props::forward::deterministic_and_mode_free(model, ids),
            ModelProperty::Causal => props::forward::causal(model, ids, s / 2),
            ModelProperty::KvCache => props::forward::kv_cache_matches(model, ids, s.div_ceil(2), 3),
        }
    }
}

/// One row of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    /// Family checked.
    pub family: String,
    /// Property id.
    pub property: &'static str,
    /// Device name.
    pub device: String,
    /// Cases that ran.
    pub cases: u32,
    /// `pass` or `FAIL`.
    pub passed: bool,
    /// The violation or error of the minimal counterexample.
    pub detail: Option<String>,
    /// The minimal counterexample's spec as `config.json`, on failure.
    pub minimal_config: Option<serde_json::Value>,
    /// The minimal counterexample's weight seed and batch, on failure.
    pub minimal_case: Option<(u64, Vec<Vec<u32>>)>,
    /// The command that replays this check.
    pub replay: String,
}

/// Options for a run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Proptest cases per (family, property).
    pub cases: u32,
    /// Seed of the case generator.
    pub seed: u64,
    /// Families to check.
    pub families: Vec<Family>,
}

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
    let w = weights::generate(spec, seed, device)?;
    let model = Transformer::from_weights(spec, &w)?.with_faults(faults);
    prop.check(&model, ids)
}

/// Run every property for every family in `opts` on `device`; `progress` is told each row.
pub fn run(device: &Device, opts: &Options, mut progress: impl FnMut(&Outcome)) -> Vec<Outcome> {
    let mut out = Vec::new();
    for &family in &opts.families {
        for prop in ModelProperty::ALL {
            let row = run_property(device, family, prop, opts.cases, opts.seed, Faults::default());
            progress(&row);
            out.push(row);
        }
    }
    out
}

/// One mutant's result: whether its property caught it, with the shrunk counterexample.
#[derive(Debug, Clone, Serialize)]
pub struct MutantOutcome {
    /// Mutant id.
    pub mutant: &'static str,
    /// The real-world bug it reproduces.
    pub bug: &'static str,
    /// The property run against it, and its result (`passed == false` means caught).
    pub outcome: Outcome,
}

impl MutantOutcome {
    /// True when the property failed on the mutant, as it must.
    pub fn caught(&self) -> bool {
        !self.outcome.passed
    }
}

/// Run each mutant's property against it; every one must be caught.
pub fn run_mutants(device: &Device, opts: &Options, mut progress: impl FnMut(&MutantOutcome)) -> Vec<MutantOutcome> {
    let mut out = Vec::new();
    for m in crate::mutants::forward_mutants() {
        let outcome = run_property(device, m.family, m.caught_by, opts.cases, opts.seed, m.faults);
        let row = MutantOutcome { mutant: m.name, bug: m.bug, outcome };
        progress(&row);
        out.push(row);
    }
    out
}

/// A table of mutant outcomes.
pub fn mutant_table(rows: &[MutantOutcome]) -> String {
    let mut s = format!("{:<28} {:<8} {:<14} {}\n", "mutant", "family", "property", "result");
    s.push_str(&format!("{}\n", "-".repeat(64)));
    for r in rows {
        s.push_str(&format!(
            "{:<28} {:<8} {:<14} {}\n",
            r.mutant,
            r.outcome.family,
            r.outcome.property,
            if r.caught() { "caught" } else { "MISSED" }
        ));
    }
    let caught = rows.iter().filter(|r| r.caught()).count();
    s.push_str(&format!("\n{caught}/{} mutants caught\n", rows.len()));
    for r in rows {
        s.push_str(&format!("\n{} ({}):\n", r.mutant, r.bug));
        match &r.outcome.detail {
            Some(d) => s.push_str(&format!("  {d}\n")),
            None => s.push_str("  NOT CAUGHT: the property passed on this mutant\n"),
        }
        if let Some((seed, ids)) = &r.outcome.minimal_case {
            s.push_str(&format!("  minimal case: weight seed {seed}, ids {ids:?}\n"));
        }
        if let Some(summary) = r.outcome.minimal_config.as_ref().and_then(summarize) {
            s.push_str(&format!("  minimal setup: {summary}\n"));
        }
    }
    s
}

/// One line for a minimal counterexample: model sizes, and adapter when present.
pub fn summarize(v: &serde_json::Value) -> Option<String> {
    let cfg = v.get("config").unwrap_or(v);
    let model = format!(
        "{} layers={} hidden={} heads={}/{} head_dim={} vocab={}",
        cfg.get("model_type")?.as_str()?,
        cfg.get("num_hidden_layers")?,
        cfg.get("hidden_size")?,
        cfg.get("num_attention_heads")?,
        cfg.get("num_key_value_heads")?,
        cfg.get("head_dim")?,
        cfg.get("vocab_size")?
    );
    Some(match v.get("lora") {
        Some(l) => format!(
            "{model}; lora r={} targets={} save={}; 4-bit={}",
            l["r"],
            l["target_modules"],
            l["modules_to_save"],
            v.get("quantization_config").is_some_and(|q| !q.is_null())
        ),
        None => model,
    })
}

/// Run one property over `cases` seeded cases of `family`, shrinking any failure.
pub fn run_property(
    device: &Device,
    family: Family,
    prop: ModelProperty,
    cases: u32,
    seed: u64,
    faults: Faults,
) -> Outcome {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &key);
    let config = Config { cases, failure_persistence: None, max_shrink_iters: 4096, ..Config::default() };
    let mut runner = TestRunner::new_with_rng(config, rng);
    let result = runner.run(&case_strategy(family), |(spec, ids, w_seed)| {
        run_case(prop, device, &spec, &ids, w_seed, faults).map_err(|f| TestCaseError::fail(f.to_string()))
    });
    let device_name = crate::device::name(device);
    let replay = format!("tunecheck check --device {device_name} --family {family} --cases {cases} --seed {seed}");
    let mut row = Outcome {
        family: family.to_string(),
        property: prop.id(),
        device: device_name,
        cases,
        passed: true,
        detail: None,
        minimal_config: None,
        minimal_case: None,
        replay,
    };
    match result {
        Ok(()) => {}
        Err(TestError::Fail(why, (spec, ids, w_seed))) => {
            row.passed = false;
            row.detail = Some(why.to_string());
            row.minimal_config = Some(spec.to_config_json());
            row.minimal_case = Some((w_seed, ids));
        }
        Err(TestError::Abort(why)) => {
            row.passed = false;
            row.detail = Some(format!("aborted: {why}"));
        }
    }
    row
}

/// A fixed-width table of outcomes for a terminal.
pub fn table(rows: &[Outcome]) -> String {
    let mut s = format!("{:<8} {:<42} {:>6}  {}\n", "family", "property", "cases", "result");
    s.push_str(&format!("{}\n", "-".repeat(68)));
    for r in rows {
        let name = ModelProperty::ALL
            .iter()
            .find(|p| p.id() == r.property)
            .map(|p| p.name())
            .or_else(|| {
                TRAINER_PROPERTIES.iter().chain(&KERNEL_PROPERTIES).find(|(id, _)| *id == r.property).map(|(_, n)| *n)
            })
            .unwrap_or(r.property);
        s.push_str(&format!(
            "{:<8} {:<42} {:>6}  {}\n",
            r.family,
            name,
            r.cases,
            if r.passed { "pass" } else { "FAIL" }
        ));
    }
    let failed: Vec<&Outcome> = rows.iter().filter(|r| !r.passed).collect();
    s.push_str(&format!("\n{} passed, {} failed\n", rows.len() - failed.len(), failed.len()));
    for r in failed {
        s.push_str(&format!("\nFAIL {} / {}: {}\n", r.family, r.property, r.detail.as_deref().unwrap_or("")));
        if let Some((seed, ids)) = &r.minimal_case {
            s.push_str(&format!("  minimal case: weight seed {seed}, ids {ids:?}\n"));
        }
        if let Some(cfg) = &r.minimal_config {
            s.push_str(&format!("  minimal config.json: {cfg}\n"));
        }
        s.push_str(&format!("  replay: {}\n", r.replay));
    }
    s
}

impl From<Failure> for TestCaseError {
    fn from(f: Failure) -> Self {
        TestCaseError::fail(f.to_string())
    }
}

/// Number of mutants `check --mutants` runs (forward, trainer and kernel).
pub const MUTANT_COUNT: usize = 4 + crate::mutants::TrainerBug::ALL.len() + 1 + crate::mutants::KernelBug::ALL.len();

/// The 4-bit properties (CPU kernels, whatever the device), by id.
pub const KERNEL_PROPERTIES: [(&str, &str); 2] =
    [("P7", "nf4/fp4 round trip, bitsandbytes bytes"), ("P9", "fast 4-bit kernels == reference")];

/// The trainer properties over the [`crate::subject::Trainer`] trait, by id.
pub const TRAINER_PROPERTIES: [(&str, &str); 6] = [
    ("P1", "train == eval, kv-cache, no collapse"),
    ("P2", "untrained tokens: refuse, fix or train finite"),
    ("P3", "save -> load bitwise, 4-bit config travels"),
    ("P4", "loss descends, eval runs, epochs seamless"),
    ("P5", "accumulation == one big batch"),
    ("P8", "gradients reach every trainable tensor"),
];

/// Run trainer property `id` (P1, P3, P5, P8) against subjects from `factory`.
pub fn run_trainer_property<T: crate::subject::Trainer>(
    id: &str,
    factory: &impl Fn(&crate::subject::Setup, &Device) -> crate::Result<T>,
    device: &Device,
    cfg: &crate::props::runner::PropConfig,
) -> crate::props::runner::PropOutcome {
    use crate::props::{p1_modes, p2_untrained, p3_reload, p4_descent, p5_accumulation, p8_gradients};
    match id {
        "P1" => p1_modes::eval_train_equivalence(factory, device, cfg),
        "P2" => p2_untrained::untrained_tokens(factory, device, cfg),
        "P3" => p3_reload::save_reload(factory, device, cfg),
        "P4" => p4_descent::descent(factory, device, cfg),
        "P5" => p5_accumulation::accumulation(factory, device, cfg),
        "P8" => p8_gradients::gradient_reach(factory, device, cfg),
        other => crate::props::runner::PropOutcome::Skipped(format!("unknown property {other}")),
    }
}

fn trainer_row(id: &str, device: &Device, cases: u32, seed: u64, o: crate::props::runner::PropOutcome) -> Outcome {
    use crate::props::runner::PropOutcome;
    let name = TRAINER_PROPERTIES.iter().find(|(p, _)| *p == id).map_or(id, |(p, _)| p);
    let mut row = Outcome {
        family: "all".into(),
        property: name_static(name),
        device: crate::device::name(device),
        cases,
        passed: true,
        detail: None,
        minimal_config: None,
        minimal_case: None,
        replay: format!("tunecheck check --device {} --cases {cases} --seed {seed}", crate::device::name(device)),
    };
    match o {
        PropOutcome::Passed { .. } => {}
        PropOutcome::Skipped(why) => row.detail = Some(format!("skipped: {why}")),
        PropOutcome::Failed { detail, minimal } => {
            row.passed = false;
            row.detail = Some(detail);
            row.minimal_config = Some(minimal);
        }
    }
    row
}

fn name_static(id: &str) -> &'static str {
    TRAINER_PROPERTIES.iter().chain(&KERNEL_PROPERTIES).find(|(p, _)| *p == id).map_or("?", |(p, _)| p)
}

/// Run the 4-bit properties: P7 on the reference quantizer, P9 on the fastest kernels.
pub fn run_kernels(cases: u32, seed: u64, mut progress: impl FnMut(&Outcome)) -> Vec<Outcome> {
    let cfg = crate::props::runner::PropConfig { cases, seed, source_file: None };
    let p7 = crate::props::p7_nf4::nf4_round_trip(crate::quant::quantize, &cfg);
    let p9 = crate::props::p9_kernels::kernels_match_oracle(&crate::quant::kernels::Isa::best(), &cfg);
    [("P7", p7), ("P9", p9)]
        .into_iter()
        .map(|(id, o)| {
            let row = trainer_row(id, &Device::Cpu, cases, seed, o);
            progress(&row);
            row
        })
        .collect()
}

/// Run the 4-bit mutants (swapped nibbles under P7, kernel bugs under P9); each must fail.
pub fn run_kernel_mutants(cases: u32, seed: u64, mut progress: impl FnMut(&MutantOutcome)) -> Vec<MutantOutcome> {
    use crate::mutants::KernelBug;
    let cfg = crate::props::runner::PropConfig { cases, seed, source_file: None };
    let mut rows = vec![MutantOutcome {
        mutant: "swapped_nibbles",
        bug: "element 2i packed in the low nibble (bitsandbytes puts it high)",
        outcome: trainer_row(
            "P7",
            &Device::Cpu,
            cases,
            seed,
            crate::props::p7_nf4::nf4_round_trip(crate::props::p7_nf4::swapped_nibbles, &cfg),
        ),
    }];
    progress(&rows[0]);
    for bug in KernelBug::ALL {
        let row = MutantOutcome {
            mutant: bug.name(),
            bug: bug.description(),
            outcome: trainer_row(
                "P9",
                &Device::Cpu,
                cases,
                seed,
                crate::props::p9_kernels::kernels_match_oracle(&bug, &cfg),
            ),
        };
        progress(&row);
        rows.push(row);
    }
    rows
}

/// Run every trainer property against the reference trainer (`cases` per adapter kind).
pub fn run_trainer(device: &Device, cases: u32, seed: u64, mut progress: impl FnMut(&Outcome)) -> Vec<Outcome> {
    let cfg = crate::props::runner::PropConfig { cases, seed, source_file: None };
    TRAINER_PROPERTIES
        .iter()
        .map(|(id, _)| {
            let o = run_trainer_property(id, &crate::subject::reference, device, &cfg);
            let row = trainer_row(id, device, cases, seed, o);
            progress(&row);
            row
        })
        .collect()
}

/// Run each trainer mutant against its property (it must fail).
pub fn run_trainer_mutants(
    device: &Device,
    cases: u32,
    seed: u64,
    mut progress: impl FnMut(&MutantOutcome),
) -> Vec<MutantOutcome> {
    use crate::mutants::{factory, TrainerBug};
    let cfg = crate::props::runner::PropConfig { cases, seed, source_file: None };
    TrainerBug::ALL
        .iter()
        .map(|bug| {
            let o = run_trainer_property(bug.caught_by(), &factory(*bug), device, &cfg);
            let row = MutantOutcome {
                mutant: bug.name(),
                bug: bug.description(),
                outcome: trainer_row(bug.caught_by(), device, cases, seed, o),
            };
            progress(&row);
            row
        })
        .collect()
}
