//! The catalogue's trainer properties against the reference trainer (every one passes, for
//! every adapter kind and dtype, with no skip) and against every trainer mutant (each is caught
//! by its property for the expected reason). The whole matrix — which property catches which
//! mutant — is pinned as a golden snapshot, with the shrunk counterexamples. Default 4 cases
//! per adapter kind; PROPTEST_CASES scales.

use crate::common;

use candle_core::Device;
use tunecheck::mutants::{Mutant, TrainerBug};
use tunecheck::props::catalogue::{Body, Property, CATALOGUE};
use tunecheck::props::runner::{run, PropConfig, Verdict};
use tunecheck::subject::Reference;

fn trainer_props() -> Vec<&'static Property> {
    CATALOGUE.iter().copied().filter(|p| matches!(p.body, Body::Trainer(_))).collect()
}

#[test]
fn reference_passes_every_trainer_property_without_skips() {
    // Failures of the reference persist next to this file (commit them).
    let cfg = PropConfig { cases: 4, seed: 1, source_file: Some(file!()), strict: true, ..PropConfig::default() };
    for p in trainer_props() {
        let v = run(p, &Reference, &Device::Cpu, &cfg);
        assert!(v.passed(), "{}: {v:?}", p.id);
        assert_eq!(v.cases_run(), 4 * p.kinds.len() as u32, "{}: every case of every kind runs", p.id);
    }
}

/// Every mutant fails the property built for it, for the expected reason. Some bugs
/// legitimately break more than one invariant (no gradient through a fused norm also stops the
/// loss from falling): the matrix shows every cell. The cells are independent: two workers
/// compute them and the table is assembled in catalogue order.
#[test]
fn each_mutant_is_caught_by_its_property_matrix_pinned() {
    let props = trainer_props();
    let cells: Vec<(TrainerBug, &Property)> =
        TrainerBug::ALL.iter().flat_map(|&bug| props.iter().map(move |&p| (bug, p))).collect();
    let verdicts = common::in_parallel(&cells, |&(bug, p)| {
        let own = p.id == bug.caught_by();
        // Mutant failures are expected: keep them out of the regression file. Only the
        // mutant's own property shrinks (the other cells only say pass or fail).
        let cfg = PropConfig {
            cases: if own { 4 } else { 2 },
            seed: 1,
            families: bug.family().map_or(tunecheck::spec::Family::ALL.to_vec(), |f| vec![f]),
            max_shrink_iters: if own { 256 } else { 0 },
            kinds: bug.kinds(),
            precondition: bug.precondition(),
            ..PropConfig::default()
        };
        run(p, &Mutant(bug), &Device::Cpu, &cfg)
    });
    let mut matrix = format!("{:<36}", "mutant");
    for p in &props {
        matrix.push_str(&format!(" {:<5}", p.id));
    }
    matrix.push('\n');
    let mut minimal_cases = String::from("\nshrunk counterexamples (the property built for each mutant):\n");
    for (row, bug) in TrainerBug::ALL.iter().enumerate() {
        matrix.push_str(&format!("{:<36}", bug.name()));
        for (col, p) in props.iter().enumerate() {
            let v = &verdicts[row * props.len() + col];
            let own = p.id == bug.caught_by();
            if own {
                assert!(
                    v.violates(p.id, bug.code()),
                    "{} was not caught by {} for `{:?}`: {v:?}",
                    bug.name(),
                    p.id,
                    bug.code()
                );
                if let Verdict::Failed { minimal, detail, .. } = v {
                    minimal_cases.push_str(&format!(
                        "{}: {}\n    {}\n",
                        bug.name(),
                        tunecheck::report::check::summarize(minimal).unwrap_or_else(|| "(no setup)".into()),
                        detail
                    ));
                }
            }
            let cell = match (v, own) {
                (Verdict::Failed { .. }, true) => "FAIL*",
                (Verdict::Failed { .. }, false) => "fail ",
                (Verdict::Skipped { .. }, _) => "skip ",
                (Verdict::Passed { .. }, _) => "pass ",
            };
            matrix.push_str(&format!(" {cell}"));
        }
        matrix.push('\n');
    }
    matrix.push_str("(FAIL* = the property built for that mutant, failing for the expected reason)\n");
    matrix.push_str(&minimal_cases);
    common::golden().bind(|| insta::assert_snapshot!("trainer_mutant_matrix", matrix));
}
