//! The driver protocol end to end, without Python: `tunecheck driver` serves the reference
//! trainer (every trainer property must pass through the protocol) and each trainer mutant
//! (each must be caught by its property, in the expected clause, through the protocol); and a
//! driver that dies, prints garbage, hangs, writes wrongly shaped files or refuses gives a
//! failing verdict naming the operation, within the timeout, leaving no process behind.

use std::time::{Duration, Instant};

use crate::common;

use candle_core::Device;
use tunecheck::process::ProcessFactory;
use tunecheck::props::catalogue;
use tunecheck::props::runner::{run, FailReason, PropConfig, Verdict};
use tunecheck::spec::Family;
use tunecheck::suite::{self, Options};

fn driver(args: &str) -> String {
    format!("{} driver {args}", env!("CARGO_BIN_EXE_tunecheck"))
}

fn start(args: &str, timeout: Duration) -> ProcessFactory {
    ProcessFactory::start(&driver(args), timeout).unwrap()
}

/// Processes whose command line contains `marker`.
fn processes_with(marker: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else { continue };
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(marker) && pid != std::process::id() {
                out.push(pid);
            }
        }
    }
    out
}

#[test]
fn reference_passes_every_trainer_property_through_the_protocol() {
    let f = start("", Duration::from_secs(120));
    assert_eq!(f.hello().framework, "tunecheck");
    let opts = Options { families: vec![Family::Llama, Family::Gemma2], ..Options::new(4, 3) };
    let rows = suite::run_subject(&f, &Device::Cpu, &opts, |_| {});
    assert_eq!(rows.len(), suite::subject_properties(&opts).len());
    assert!(rows.len() >= 8, "only {} trainer properties", rows.len());
    for r in &rows {
        assert!(r.verdict.passed(), "{}: {:?}", r.property, r.verdict);
        assert!(r.verdict.cases_run() > 0, "{}: ran no case", r.property);
    }
}

#[test]
fn every_trainer_mutant_is_caught_through_the_protocol() {
    let mutants: Vec<_> = tunecheck::mutants::catalogue().into_iter().filter(|m| m.trainer_bug().is_some()).collect();
    assert!(mutants.len() >= 15, "{} trainer mutants", mutants.len());
    // Two workers (each with its own drivers): the mutants are independent.
    let missed: Vec<String> = common::in_parallel(&mutants, |m| {
        let bug = m.trainer_bug().unwrap();
        let f = start(&format!("--mutant {}", m.name), Duration::from_secs(120));
        let p = catalogue::by_id(m.caught_by).unwrap();
        // Shrinking as `check --trainer` does against a driver (each step rebuilds the
        // subject in the driver process).
        let mut cfg = PropConfig {
            cases: 3,
            seed: 0,
            max_shrink_iters: tunecheck::cli::check::DRIVER_SHRINK_ITERS,
            ..PropConfig::default()
        };
        cfg.kinds = bug.kinds();
        cfg.precondition = bug.precondition();
        if let Some(fam) = bug.family() {
            cfg.families = vec![fam];
        }
        let v = run(p, &f, &Device::Cpu, &cfg);
        (!v.violates(m.caught_by, m.code)).then(|| format!("{} ({} {:?}): {v:?}", m.name, m.caught_by, m.code))
    })
    .into_iter()
    .flatten()
    .collect();
    assert!(missed.is_empty(), "mutants not caught through the driver:\n{}", missed.join("\n"));
}

/// Run P3 (which uses build, step, save, load, logits, tensors and fit) against a driver with
/// `fault`, expecting an error verdict naming `op` within `limit`.
fn faulty(fault: &str, op: &str, timeout: Duration, limit: Duration, expect: &str) {
    let marker = format!("marker_{}_{}", fault.replace(':', "_"), std::process::id());
    let started = Instant::now();
    {
        let f = start(&format!("--fault {fault} --fault {marker}:error"), timeout);
        let p = catalogue::by_id("P3").unwrap();
        let cfg = PropConfig { cases: 2, seed: 1, families: vec![Family::Llama], ..PropConfig::default() };
        let v = run(p, &f, &Device::Cpu, &cfg);
        let Verdict::Failed { reason, detail, .. } = &v else { panic!("{fault}: expected a failure, got {v:?}") };
        assert_eq!(reason, &FailReason::Error, "{fault}: {detail}");
        assert!(detail.contains(&format!("operation `{op}`")), "{fault}: the failure must name `{op}`: {detail}");
        assert!(detail.contains(expect), "{fault}: expected `{expect}` in: {detail}");
    }
    let took = started.elapsed();
    assert!(took < limit, "{fault}: took {took:?}, limit {limit:?}");
    // Dropping the factory stops every driver it started.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !processes_with(&marker).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(processes_with(&marker), Vec::<u32>::new(), "{fault}: driver processes left behind");
}

#[test]
fn a_driver_that_dies_fails_naming_the_operation_with_its_stderr() {
    faulty("step:die", "step", Duration::from_secs(60), Duration::from_secs(60), "planted fault: dying during `step`");
}

#[test]
fn a_driver_that_prints_garbage_fails_naming_the_operation() {
    faulty("save:garbage", "save", Duration::from_secs(60), Duration::from_secs(60), "not protocol JSON");
}

#[test]
fn a_driver_that_hangs_is_killed_at_the_timeout() {
    faulty("logits:hang", "logits", Duration::from_secs(2), Duration::from_secs(40), "timeout");
}

#[test]
fn a_driver_that_writes_wrong_shapes_fails_naming_file_and_tensor() {
    faulty("logits:bad_shape", "logits", Duration::from_secs(60), Duration::from_secs(60), "tensor `logits` has shape");
}

#[test]
fn a_driver_error_answer_is_a_failure_with_its_message() {
    faulty("build:error", "build", Duration::from_secs(60), Duration::from_secs(60), "planted fault: `build` refused");
}

#[test]
fn a_case_the_driver_declares_unsupported_is_set_aside_and_shown() {
    let f = start("--fault build:unsupported", Duration::from_secs(60));
    let p = catalogue::by_id("P5").unwrap();
    let cfg = PropConfig { cases: 2, seed: 1, families: vec![Family::Llama], ..PropConfig::default() };
    match run(p, &f, &Device::Cpu, &cfg) {
        Verdict::Passed { cases_run, skipped, .. } => {
            assert!(cases_run >= 2, "the set-aside case must not count: {cases_run}");
            assert!(
                skipped.iter().any(|s| s.contains("some cases set aside") && s.contains("beyond this subject")),
                "{skipped:?}"
            );
        }
        v => panic!("expected a pass with the set-aside case shown, got {v:?}"),
    }
}

#[test]
fn an_adapter_kind_the_driver_refuses_every_time_is_a_skip_with_the_reason_not_zero_cases() {
    let f = start("--fault build:unsupported:always", Duration::from_secs(60));
    let p = catalogue::by_id("P5").unwrap();
    let cfg = PropConfig { cases: 2, seed: 1, families: vec![Family::Llama], ..PropConfig::default() };
    match run(p, &f, &Device::Cpu, &cfg) {
        Verdict::Skipped { reason } => {
            for kind in ["lora", "qlora_nf4", "full_embeddings"] {
                assert!(reason.contains(&format!("{kind}: no case the subject takes (128 draws in a row")), "{reason}");
            }
            assert!(reason.contains("beyond this subject"), "the refusal's reason is shown: {reason}");
        }
        v => panic!("expected a skip naming the refusals, got {v:?}"),
    }
}

#[test]
fn a_driver_that_cannot_start_or_speaks_another_protocol_is_a_clear_error() {
    let e = ProcessFactory::start("/nonexistent/driver --x", Duration::from_secs(5)).err().unwrap().to_string();
    assert!(e.contains("cannot start `/nonexistent/driver --x`"), "{e}");
    let e = ProcessFactory::start(
        "sh -c 'read l; echo {\\\"id\\\":1,\\\"ok\\\":true,\\\"protocol\\\":99}'",
        Duration::from_secs(5),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("protocol 99"), "{e}");
    let e = ProcessFactory::start("sh -c 'exit 7'", Duration::from_secs(5)).err().unwrap().to_string();
    assert!(e.contains("operation `hello`") && e.contains("exit status: 7"), "{e}");
}

#[test]
fn a_capability_a_driver_lacks_is_skipped_with_its_reason_where_it_gives_one() {
    // `unsupported` may name a capability as well as a family: the skip carries the reason.
    let script = r#"read l; echo '{"id":1,"ok":true,"protocol":1,"framework":"fake","version":"0","capabilities":{"grad_accum":true},"families":["llama"],"unsupported":{"f16":"float16 becomes bfloat16 on CPU"}}'; read l"#;
    let f = ProcessFactory::start(&format!("sh -c {}", shell_quote(script)), Duration::from_secs(5)).unwrap();
    assert_eq!(
        tunecheck::subject::Factory::lacking_reason(&f, "f16").as_deref(),
        Some("float16 becomes bfloat16 on CPU")
    );
    assert_eq!(tunecheck::subject::Factory::lacking_reason(&f, "bf16"), None);
    // P12 draws bf16 and f16 models only: with neither declared, it is skipped naming both,
    // the f16 one with the driver's reason.
    let p = catalogue::by_id("P12").unwrap();
    let cfg = PropConfig { cases: 2, families: vec![Family::Llama], ..PropConfig::default() };
    match run(p, &f, &Device::Cpu, &cfg) {
        Verdict::Skipped { reason } => {
            assert!(
                reason.contains("f16: the subject does not declare `f16`: float16 becomes bfloat16 on CPU"),
                "{reason}"
            );
            assert!(reason.contains("bf16: the subject does not declare `bf16`"), "{reason}");
        }
        v => panic!("expected a skip, got {v:?}"),
    }
}

#[test]
fn families_a_driver_lacks_are_skipped_with_its_reason() {
    // A driver declaring only llama (a shell wrapper that edits the handshake is overkill: the
    // reference driver declares every family, so check the factory logic on a fake hello).
    let script = r#"read l; echo '{"id":1,"ok":true,"protocol":1,"framework":"fake","version":"0","capabilities":{},"families":["llama"],"unsupported":{"gemma3":"no Gemma 3 before transformers 4.50"}}'; read l"#;
    let f = ProcessFactory::start(&format!("sh -c {}", shell_quote(script)), Duration::from_secs(5)).unwrap();
    let fams = tunecheck::subject::Factory::families(&f);
    let why = |fam: Family| fams.iter().find(|(g, _)| *g == fam).unwrap().1.clone();
    assert_eq!(why(Family::Llama), None);
    assert_eq!(why(Family::Gemma3).as_deref(), Some("no Gemma 3 before transformers 4.50"));
    assert_eq!(why(Family::Gemma).as_deref(), Some("not declared by the driver"));
    // With only unsupported families selected, a property is skipped with the reasons.
    let p = catalogue::by_id("P5").unwrap();
    let cfg = PropConfig { cases: 2, families: vec![Family::Gemma3], ..PropConfig::default() };
    match run(p, &f, &Device::Cpu, &cfg) {
        Verdict::Skipped { reason } => assert!(reason.contains("no Gemma 3 before transformers 4.50"), "{reason}"),
        v => panic!("expected a skip, got {v:?}"),
    }
}

fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The setup directory carries a tokenizer of the synthetic vocabulary (for the stacks that
/// load one with the model): the tokenizers crate reads it, every id is one token, and the
/// config names the special tokens and a chat template.
#[test]
fn a_4bit_setup_has_its_base_pre_quantized_beside_the_dense_one() {
    use tunecheck::adapt::{Base, Quant4Linear};
    let p = catalogue::by_id("P10").unwrap();
    let kind = tunecheck::strategy::AdapterKind::QLora;
    let setup = tunecheck::props::runner::first_setup(p, kind, 3).unwrap();
    let q = setup.quant.unwrap();
    let dir = tempfile::tempdir().unwrap();
    tunecheck::process::wire::write_setup(dir.path(), &setup).unwrap();
    let pre = dir.path().join("base-4bit");
    let ck = tunecheck::io::hf::load(&pre, &Device::Cpu, None).unwrap();
    assert_eq!(ck.quant, Some(q), "the checkpoint's quantization_config is the setup's");
    assert!(!ck.bases.is_empty());
    for (path, base) in &ck.bases {
        let Base::Quant4(got) = base else { panic!("{path} is not 4-bit") };
        let want = Quant4Linear::quantize(setup.weights.get(&format!("{path}.weight")).unwrap(), &q).unwrap();
        assert_eq!(got.q, want.q, "{path}: the pre-quantized codes and scales are the setup's base quantized");
        assert_eq!(got.orig_dtype, setup.spec.dtype, "{path}");
    }
    for (k, w) in &ck.weights {
        let d = setup.weights.get(k).unwrap();
        assert!(tunecheck::props::compare::bitwise_equal(w, d).unwrap(), "{k}: dense tensors are the base's");
    }
    assert!(pre.join("tokenizer.json").is_file(), "the stacks that load a tokenizer with the model find one");
    // A dense setup has no pre-quantized base.
    let dense = tunecheck::props::runner::first_setup(p, tunecheck::strategy::AdapterKind::Lora, 3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    tunecheck::process::wire::write_setup(dir.path(), &dense).unwrap();
    assert!(!dir.path().join("base-4bit").exists());
}

#[test]
fn the_setup_base_has_a_tokenizer_of_its_vocabulary() {
    use tunecheck::data::vocab;
    let p = catalogue::by_id("P1").unwrap();
    let setup = tunecheck::props::runner::first_setup(p, tunecheck::strategy::AdapterKind::Lora, 3).unwrap();
    let dir = tempfile::tempdir().unwrap();
    tunecheck::process::wire::write_setup(dir.path(), &setup).unwrap();
    let base = dir.path().join("base");
    let tok = tunecheck::data::tokenizer::load(&base.join("tokenizer.json")).unwrap();
    assert_eq!(tok.get_vocab_size(true), setup.spec.vocab_size);
    for i in 0..setup.spec.vocab_size {
        assert_eq!(tok.token_to_id(&vocab::token(i)), Some(i as u32), "id {i}");
    }
    let enc = tok.encode("t5 t6 <s>", false).unwrap();
    assert_eq!(enc.get_ids(), &[5, 6, 1][..]);
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(base.join("tokenizer_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["tokenizer_class"], "PreTrainedTokenizerFast");
    assert_eq!(cfg["pad_token"], "<pad>");
    assert_eq!(cfg["eos_token"], "</s>");
    assert!(cfg["chat_template"].as_str().unwrap().contains("messages"));
    // The checkpoint still loads as it is (the tokenizer files are not the save's).
    tunecheck::io::hf::load(&base, &Device::Cpu, None).unwrap();
    assert!(vocab::files(4, 8).is_err(), "a vocabulary without room for the special tokens is refused");
}
