//! Every forward-pass property fails on its planted-bug mutant (and passes on the reference),
//! and the shrunk counterexample is the smallest model: pinned as a golden snapshot.

mod common;

use candle_core::Device;
use tunecheck::model::Faults;
use tunecheck::mutants::forward_mutants;
use tunecheck::suite::{run_property, Options};

#[test]
fn every_forward_mutant_is_caught_with_a_minimal_counterexample() {
    let opts = Options { cases: 16, seed: 0, families: vec![] };
    let mut report = String::new();
    for m in forward_mutants() {
        let reference = run_property(&Device::Cpu, m.family, m.caught_by, opts.cases, opts.seed, Faults::default());
        assert!(reference.passed, "{}: reference fails {:?}: {:?}", m.name, m.caught_by, reference.detail);
        let o = run_property(&Device::Cpu, m.family, m.caught_by, opts.cases, opts.seed, m.faults);
        assert!(!o.passed, "mutant {} was not caught by {:?}", m.name, m.caught_by);
        let cfg = o.minimal_config.as_ref().unwrap();
        let (seed, ids) = o.minimal_case.clone().unwrap();
        assert_eq!(cfg["num_hidden_layers"], 1, "{}: shrinking should reach one layer", m.name);
        report.push_str(&format!(
            "{} [{} / {}]\n  {}\n  minimal: layers {} hidden {} heads {}/{} head_dim {} vocab {} window {}; weight seed {seed}; ids {ids:?}\n",
            m.name,
            m.family,
            o.property,
            o.detail.unwrap(),
            cfg["num_hidden_layers"],
            cfg["hidden_size"],
            cfg["num_attention_heads"],
            cfg["num_key_value_heads"],
            cfg["head_dim"],
            cfg["vocab_size"],
            cfg.get("sliding_window").map_or("-".to_string(), |w| w.to_string()),
        ));
    }
    common::golden().bind(|| insta::assert_snapshot!("forward_mutants", report));
}
