//! The trainer properties (P1, P3, P5, P8) over the `Trainer` trait: the reference passes each
//! for every adapter kind (LoRA, QLoRA-NF4, full embeddings); each planted-bug mutant fails
//! exactly the property built for it. Default 4 cases per adapter kind; PROPTEST_CASES scales.

use candle_core::Device;
use tunecheck::mutants::{factory, TrainerBug};
use tunecheck::props::runner::{PropConfig, PropOutcome};
use tunecheck::props::{p1_modes, p3_reload, p5_accumulation, p8_gradients};
use tunecheck::subject::reference;

fn run_all<T: tunecheck::subject::Trainer>(
    f: &impl Fn(&tunecheck::subject::Setup, &Device) -> tunecheck::Result<T>,
    cfg: &PropConfig,
) -> Vec<(&'static str, PropOutcome)> {
    let d = Device::Cpu;
    vec![
        ("P1", p1_modes::eval_train_equivalence(f, &d, cfg)),
        ("P3", p3_reload::save_reload(f, &d, cfg)),
        ("P5", p5_accumulation::accumulation(f, &d, cfg)),
        ("P8", p8_gradients::gradient_reach(f, &d, cfg)),
    ]
}

#[test]
fn reference_passes_every_trainer_property() {
    // Failures of the reference persist next to this file (commit them).
    let cfg = PropConfig { cases: 4, seed: 1, source_file: Some(file!()) };
    for (p, o) in run_all(&reference, &cfg) {
        assert!(matches!(o, PropOutcome::Passed { .. }), "{p}: {o:?}");
    }
}

#[test]
fn each_mutant_fails_exactly_its_property() {
    for bug in TrainerBug::ALL {
        // Mutant failures are expected: keep them out of the regression file.
        let cfg = PropConfig { cases: 4, seed: 1, source_file: None };
        let results = run_all(&factory(bug), &cfg);
        for (p, o) in &results {
            let should_fail = *p == bug.caught_by();
            assert_eq!(
                !o.ok(),
                should_fail,
                "{} vs {p}: expected {}",
                bug.name(),
                if should_fail { "FAIL" } else { "pass" }
            );
            match o {
                PropOutcome::Failed { detail, .. } => println!("{:<28} {p}: FAIL {detail}", bug.name()),
                _ => println!("{:<28} {p}: pass", bug.name()),
            }
        }
    }
}
