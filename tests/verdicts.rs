//! Verdicts cannot lie: a run that executes no case fails, a skipped adapter kind or dtype is
//! reported with its reason (and fails under `strict`), `PROPTEST_CASES=0` is an error, the
//! same seed replays the same cases for every property, and the README's property table is the
//! catalogue's.

use std::path::Path;

use candle_core::Device;
use tunecheck::props::catalogue::{by_id, Property, CATALOGUE, STAMPED_NAMES};
use tunecheck::props::runner::{run, FailReason, PropConfig, Verdict};
use tunecheck::report::readme::property_table;
use tunecheck::subject::{reference, Capabilities, Factory, Setup, Trainer};

/// The reference, declaring fewer capabilities.
struct Limited(Capabilities);

impl Factory for Limited {
    fn name(&self) -> String {
        "limited".into()
    }
    fn capabilities(&self) -> Capabilities {
        self.0
    }
    fn build(&self, setup: &Setup, device: &Device) -> tunecheck::Result<Box<dyn Trainer>> {
        Ok(Box::new(reference(setup, device)?))
    }
    fn load(&self, device: &Device, dir: &Path) -> tunecheck::Result<Box<dyn Trainer>> {
        Ok(Box::new(tunecheck::train::checkpoint::load(device, dir)?))
    }
}

fn p1() -> &'static Property {
    by_id("P1").unwrap()
}

fn cfg() -> PropConfig {
    PropConfig { cases: 2, seed: 5, ..PropConfig::default() }
}

#[test]
fn a_skipped_kind_and_dtype_are_visible_and_fail_under_strict() {
    let mut caps = Capabilities::all();
    (caps.quant4, caps.f16) = (false, false);
    let v = run(p1(), &Limited(caps), &Device::Cpu, &cfg());
    let Verdict::Passed { cases_run, skipped, .. } = &v else { panic!("{v:?}") };
    assert_eq!(*cases_run, 4, "two kinds × 2 cases ran");
    assert!(skipped.iter().any(|s| s == "f16: the subject does not declare `f16`"), "{skipped:?}");
    assert!(skipped.iter().any(|s| s == "qlora_nf4: the subject does not declare `quant4`"), "{skipped:?}");
    assert_eq!(v.word(), "pass*");
    let strict = run(p1(), &Limited(caps), &Device::Cpu, &PropConfig { strict: true, ..cfg() });
    assert!(matches!(&strict, Verdict::Failed { reason: FailReason::Strict, .. }), "{strict:?}");
}

#[test]
fn nothing_run_is_a_skip_with_its_reason_never_a_pass() {
    // P3 needs save/load: a subject without it is skipped, with the reason.
    let mut caps = Capabilities::all();
    caps.save_load = false;
    let v = run(by_id("P3").unwrap(), &Limited(caps), &Device::Cpu, &cfg());
    assert!(matches!(&v, Verdict::Skipped { reason } if reason.contains("save_load")), "{v:?}");
    assert!(!v.passed());
    // Every kind skipped: a skip, not a pass with zero cases.
    let mut none = Capabilities::all();
    (none.quant4, none.train_embeddings) = (false, false);
    let only_full = Property {
        kinds: &[tunecheck::strategy::AdapterKind::QLora, tunecheck::strategy::AdapterKind::FullEmbeddings],
        ..*p1()
    };
    let v = run(&only_full, &Limited(none), &Device::Cpu, &cfg());
    assert!(matches!(&v, Verdict::Skipped { .. }), "{v:?}");
    assert_eq!(v.cases_run(), 0);
}

#[test]
fn zero_executed_cases_is_a_failure() {
    // A precondition no setup meets: proptest runs nothing, and that is not a pass.
    let never = Property { filter: Some(|_| false), ..*p1() };
    let v = run(&never, &tunecheck::subject::Reference, &Device::Cpu, &cfg());
    assert!(matches!(&v, Verdict::Failed { reason: FailReason::NoCases, .. }), "{v:?}");
    let no_kinds = Property { kinds: &[], ..*p1() };
    let v = run(&no_kinds, &tunecheck::subject::Reference, &Device::Cpu, &cfg());
    assert!(matches!(&v, Verdict::Failed { reason: FailReason::NoCases, .. }), "{v:?}");
}

#[test]
fn proptest_cases_zero_is_an_error() {
    // Zero configured cases (what PROPTEST_CASES=0 gives; the CLI test sets the variable
    // itself) is an error. A PROPTEST_CASES set for a deeper run overrides the count.
    let cfg = PropConfig { cases: 0, ..PropConfig::default() };
    if std::env::var("PROPTEST_CASES").is_err() {
        let e = cfg.effective_cases().unwrap_err();
        assert!(e.contains("zero cases"), "{e}");
    }
    let v = run(p1(), &tunecheck::subject::Reference, &Device::Cpu, &cfg);
    if std::env::var("PROPTEST_CASES").is_err() {
        assert!(matches!(&v, Verdict::Failed { reason: FailReason::Config, .. }), "{v:?}");
    }
}

#[test]
fn the_same_seed_gives_the_same_cases_for_every_property() {
    for p in CATALOGUE.iter().filter(|p| !p.kinds.is_empty()) {
        for &kind in p.kinds {
            let a = tunecheck::props::runner::first_setup(p, kind, 11).unwrap();
            let b = tunecheck::props::runner::first_setup(p, kind, 11).unwrap();
            assert_eq!(a.spec, b.spec, "{}", p.id);
            assert_eq!(a.adapter_seed, b.adapter_seed, "{}", p.id);
            assert_eq!(a.quant, b.quant, "{}", p.id);
        }
    }
    // P7 and P9 are seeded too: the same seed, the same verdict with the same counts.
    for id in ["P7", "P9"] {
        let c = PropConfig { cases: 2, seed: 9, ..PropConfig::default() };
        let (a, b) = (
            run(by_id(id).unwrap(), &tunecheck::subject::Reference, &Device::Cpu, &c),
            run(by_id(id).unwrap(), &tunecheck::subject::Reference, &Device::Cpu, &c),
        );
        assert_eq!(format!("{a:?}"), format!("{b:?}"), "{id}");
    }
}

#[test]
fn catalogue_ids_and_stamped_names_are_unique_and_in_step() {
    assert_eq!(CATALOGUE.len(), STAMPED_NAMES.len());
    for p in CATALOGUE {
        let words = [p.id, p.test_name, p.title, p.invariant, p.tolerance];
        assert!(words.iter().all(|w| !w.is_empty()), "{p:?} keeps an empty word of Property::trainer");
    }
    for (p, name) in CATALOGUE.iter().zip(STAMPED_NAMES) {
        assert_eq!(p.test_name, *name, "the conformance! test name is the descriptor's");
    }
    let mut ids: Vec<&str> = CATALOGUE.iter().map(|p| p.id).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), CATALOGUE.len());
    // Every mutant names a catalogue property, and every property but P6 (which needs a GPU)
    // has at least one mutant it must catch.
    let mutants = tunecheck::mutants::catalogue();
    for m in &mutants {
        assert!(by_id(m.caught_by).is_some(), "{}", m.name);
    }
    for p in CATALOGUE.iter().filter(|p| p.id != "P6") {
        assert!(mutants.iter().any(|m| m.caught_by == p.id), "{} has no mutant", p.id);
    }
}

#[test]
fn readme_property_table_is_the_catalogue() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let (start, end) = ("<!-- catalogue:start -->\n", "<!-- catalogue:end -->");
    let a = readme.find(start).expect("README has the catalogue start marker") + start.len();
    let b = readme.find(end).expect("README has the catalogue end marker");
    let want = property_table();
    if std::env::var("TUNECHECK_BLESS_README").is_ok_and(|v| v == "1") && readme[a..b] != want {
        let updated = format!("{}{want}{}", &readme[..a], &readme[b..]);
        std::fs::write(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"), updated).unwrap();
        return;
    }
    assert!(
        readme[a..b] == want,
        "README's property table is out of date: run `TUNECHECK_BLESS_README=1 cargo test --test all verdicts::readme`, \
         or replace it with:\n{want}"
    );
}
