//! Every forward-pass property fails on its planted-bug mutant for the expected reason (and
//! passes on the reference), and the shrunk counterexample is the smallest model: pinned as a
//! golden snapshot.

use crate::common;

use candle_core::Device;
use tunecheck::model::Faults;
use tunecheck::mutants::forward_mutants;
use tunecheck::props::runner::Verdict;
use tunecheck::suite::{run_forward, Options};

#[test]
fn every_forward_mutant_is_caught_with_a_minimal_counterexample() {
    let opts = Options::new(16, 0);
    let mut report = String::new();
    for m in forward_mutants() {
        let reference = run_forward(&Device::Cpu, m.family, m.caught_by, &opts, Faults::default());
        assert!(reference.passed(), "{}: reference fails {:?}: {reference:?}", m.name, m.caught_by);
        let o = run_forward(&Device::Cpu, m.family, m.caught_by, &opts, m.faults);
        assert!(
            o.violates(m.caught_by.id(), None),
            "mutant {} was not caught by {:?} for a violation: {o:?}",
            m.name,
            m.caught_by
        );
        let Verdict::Failed { detail, minimal, .. } = o else { unreachable!() };
        let cfg = &minimal["config"];
        assert_eq!(cfg["num_hidden_layers"], 1, "{}: shrinking should reach one layer", m.name);
        report.push_str(&format!(
            "{} [{} / {}]\n  {}\n  minimal: layers {} hidden {} heads {}/{} head_dim {} vocab {} window {}; weight seed {}; ids {}\n",
            m.name,
            m.family,
            m.caught_by.id(),
            detail,
            cfg["num_hidden_layers"],
            cfg["hidden_size"],
            cfg["num_attention_heads"],
            cfg["num_key_value_heads"],
            cfg["head_dim"],
            cfg["vocab_size"],
            cfg.get("sliding_window").map_or("-".to_string(), |w| w.to_string()),
            minimal["weight_seed"],
            minimal["ids"],
        ));
    }
    common::golden().bind(|| insta::assert_snapshot!("forward_mutants", report));
}
