//! Every integration test in one test binary (crash-safety, which re-executes itself as the
//! process it kills, is its own). One binary links candle once instead of once per file, and
//! the tests of every file share the test harness's threads. Each file below is a module
//! named for what it tests; run one with `cargo test --test all <module>::`.
//!
//! Tests of different files run concurrently in one process: none may change the process
//! environment or the working directory (a test that needs a variable set runs the binary
//! with it, as `cli` does for `TUNECHECK_REQUIRE_CUDA`).

mod common;

mod atomic_saves;
mod bad_input;
mod bnb_checkpoint;
mod checkpoint_io;
mod ci_formats;
mod cli;
mod config;
mod conformance;
mod cuda_source;
mod device;
mod driver;
mod forward_props;
mod fuzz_bytes;
mod goldens;
mod inspect;
mod kernels;
mod mutants;
mod nf4;
mod parity;
mod peft;
mod report;
mod shrinking;
mod streaming;
mod strict_fields;
mod torch_conventions;
mod trainer_props;
mod training;
mod verdicts;
mod weights;

/// With `autotests = false` a file added to `tests/` is compiled only if it is declared here:
/// every `tests/*.rs` must be a module above or a `[[test]]` target of its own.
#[test]
fn every_test_file_is_compiled() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let this = include_str!("all.rs");
    let manifest = include_str!("../Cargo.toml");
    let mut files = 0;
    for e in std::fs::read_dir(&dir).unwrap() {
        let path = e.unwrap().path();
        let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else { continue };
        if path.extension().is_none_or(|x| x != "rs") || stem == "all" {
            continue;
        }
        files += 1;
        let own_target = manifest.contains(&format!("[[test]]\nname = \"{stem}\""));
        assert!(
            this.contains(&format!("\nmod {stem};\n")) || own_target,
            "tests/{stem}.rs is neither a module of tests/all.rs nor a [[test]] in Cargo.toml: it never runs"
        );
    }
    assert!(files > 20, "only {files} test files found in {}", dir.display());
}
