//! The trainer properties (P1–P5, P8) over the `Trainer` trait: the reference passes each
//! for every adapter kind (LoRA, QLoRA-NF4, full embeddings); each planted-bug mutant fails
//! exactly the property built for it. Default 4 cases per adapter kind; PROPTEST_CASES scales.

mod common;

use candle_core::Device;
use tunecheck::mutants::{factory, TrainerBug};
use tunecheck::props::runner::{PropConfig, PropOutcome};
use tunecheck::props::{p1_modes, p2_untrained, p3_reload, p4_descent, p5_accumulation, p8_gradients};
use tunecheck::subject::reference;

fn run_all<T: tunecheck::subject::Trainer>(
    f: &impl Fn(&tunecheck::subject::Setup, &Device) -> tunecheck::Result<T>,
    cfg: &PropConfig,
) -> Vec<(&'static str, PropOutcome)> {
    let d = Device::Cpu;
    vec![
        ("P1", p1_modes::eval_train_equivalence(f, &d, cfg)),
        ("P2", p2_untrained::untrained_tokens(f, &d, cfg)),
        ("P3", p3_reload::save_reload(f, &d, cfg)),
        ("P4", p4_descent::descent(f, &d, cfg)),
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

/// Every mutant fails the property built for it. Some bugs legitimately break more than one
/// invariant (no gradient through a fused norm also stops the loss from falling): the whole
/// matrix is pinned as a golden snapshot so a change in what catches what is reviewed.
#[test]
fn each_mutant_fails_its_property_matrix_pinned() {
    let mut matrix = String::from("mutant                              P1   P2   P3   P4   P5   P8\n");
    let mut minimal_cases = String::from("\nshrunk counterexamples (the property built for each mutant):\n");
    for bug in TrainerBug::ALL {
        // Mutant failures are expected: keep them out of the regression file.
        let cfg = PropConfig { cases: 4, seed: 1, source_file: None };
        let results = run_all(&factory(bug), &cfg);
        let own = results.iter().find(|(p, _)| *p == bug.caught_by()).expect("property exists");
        assert!(!own.1.ok(), "{} was not caught by {}", bug.name(), bug.caught_by());
        if let PropOutcome::Failed { minimal, .. } = &own.1 {
            minimal_cases.push_str(&format!(
                "{}: {}\n",
                bug.name(),
                tunecheck::suite::summarize(minimal).unwrap_or_else(|| "(no setup)".into())
            ));
        }
        matrix.push_str(&format!("{:<34}", bug.name()));
        for (p, o) in &results {
            let cell = match (o.ok(), *p == bug.caught_by()) {
                (false, true) => "FAIL*",
                (false, false) => "fail ",
                (true, _) => "pass ",
            };
            matrix.push_str(&format!(" {cell}"));
        }
        matrix.push('\n');
    }
    matrix.push_str("(FAIL* = the property built for that mutant)\n");
    matrix.push_str(&minimal_cases);
    common::golden().bind(|| insta::assert_snapshot!("trainer_mutant_matrix", matrix));
}
