//! The `tunecheck` binary: `logits` on the transformers fixtures (file and `--ids` input,
//! summary and `--out`), its errors and exit codes, and `check` on the built-in default.

use std::path::PathBuf;
use std::process::Command;

use candle_core::DType;
use tunecheck::io::st::StFile;
use tunecheck::props::rel_l2;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tunecheck"))
}

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/models").join(name)
}

#[test]
fn logits_file_matches_transformers() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["llama_gqa", "gemma2_window", "gemma3"] {
        let out = dir.path().join(format!("{name}.safetensors"));
        let reference = fixture(name).join("reference.safetensors");
        let st = bin()
            .args(["logits", "--model"])
            .arg(fixture(name))
            .arg("--input")
            .arg(&reference)
            .arg("--out")
            .arg(&out)
            .status()
            .unwrap();
        assert!(st.success(), "{name}");
        let got = StFile::open(&out).unwrap();
        assert_eq!(got.names().unwrap(), vec!["logits".to_string()]);
        let got = got.load("logits").unwrap();
        assert_eq!(got.dtype(), DType::F32);
        let want = StFile::open(&reference).unwrap().load("logits").unwrap();
        let err = rel_l2(&got, &want).unwrap();
        assert!(err <= 1e-5, "{name}: {err:.3e}");
    }
}

#[test]
fn logits_ids_flags_and_suffixed_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("o.safetensors");
    let st = bin()
        .args(["logits", "--ids", "1,2,3", "--ids", "4,5", "--model"])
        .arg(fixture("gemma"))
        .arg("--out")
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    let f = StFile::open(&out).unwrap();
    assert_eq!(f.names().unwrap(), vec!["logits_ids0", "logits_ids1"]);
    assert_eq!(f.load("logits_ids0").unwrap().dims(), &[1, 3, 64]);
    assert_eq!(f.load("logits_ids1").unwrap().dims(), &[1, 2, 64]);

    let summary = bin().args(["logits", "--ids", "1,2,3", "--model"]).arg(fixture("gemma")).output().unwrap();
    assert!(summary.status.success());
    let text = String::from_utf8(summary.stdout).unwrap();
    assert!(text.contains("logits: shape [1, 3, 64], finite: true"), "{text}");
}

#[test]
fn logits_bad_input_exits_2_with_a_named_reason() {
    let dir = tempfile::tempdir().unwrap();
    // A float input_ids tensor is the wrong type.
    let bad = dir.path().join("bad.safetensors");
    let t = candle_core::Tensor::zeros((1, 3), DType::F32, &candle_core::Device::Cpu).unwrap();
    tunecheck::io::st::write_safetensors(&bad, &[("input_ids".to_string(), t)].into()).unwrap();
    let o = bin().args(["logits", "--model"]).arg(fixture("gemma")).arg("--input").arg(&bad).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    let e = String::from_utf8(o.stderr).unwrap();
    assert!(e.contains("tensor `input_ids`: dtype F32, expected I64"), "{e}");
    // Out-of-range token id.
    let o = bin().args(["logits", "--ids", "1,999", "--model"]).arg(fixture("gemma")).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8(o.stderr).unwrap().contains("token id 999 is out of range"));
    // Not a model directory.
    let o = bin().args(["logits", "--ids", "1", "--model"]).arg(dir.path()).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8(o.stderr).unwrap().contains("config.json"));
    // No input at all.
    let o = bin().args(["logits", "--model"]).arg(fixture("gemma")).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
}

fn has_gpu() -> bool {
    tunecheck::device::cuda().is_ok()
}

#[test]
fn check_passes_on_the_default_and_prints_cases_and_skips() {
    let o = bin().args(["check", "--cases", "4"]).output().unwrap();
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(o.status.success(), "{text}");
    // F1–F3 once per family (4), every other entry once.
    let rows = 4 * 3 + tunecheck::props::catalogue::CATALOGUE.len() - 3;
    if has_gpu() {
        assert!(text.contains(&format!("{rows} passed, 0 failed, 0 skipped")), "{text}");
    } else {
        // P6 needs a GPU: shown as a skip with its reason and 0 cases, never as a pass.
        assert!(text.contains(&format!("{} passed, 0 failed, 1 skipped", rows - 1)), "{text}");
        assert!(text.contains("skip all / P6: no CUDA device"), "{text}");
        let p6 = text.lines().find(|l| l.starts_with("all") && l.contains(" P6 ")).unwrap();
        assert!(p6.ends_with("0  skip"), "{p6}");
    }
    // The real number of cases: trainer properties run cases/4 (at least 2) per adapter kind.
    let p1 = text.lines().find(|l| l.starts_with("all") && l.contains(" P1 ")).unwrap();
    assert!(p1.ends_with(" 6  pass"), "{p1}");
    let j = bin().args(["check", "--cases", "2", "--family", "gemma3", "--json"]).output().unwrap();
    assert!(j.status.success());
    let v: serde_json::Value = serde_json::from_slice(&j.stdout).unwrap();
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), tunecheck::props::catalogue::CATALOGUE.len());
    assert!(rows.iter().all(|r| r["verdict"]["verdict"] != "failed"), "{v}");
    let bad = bin().args(["check", "--family", "mistral"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
    let bad = bin().args(["check", "--property", "P99"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn strict_fails_on_a_skip_and_zero_cases_is_an_error() {
    // Without a GPU, P6 is skipped: --strict turns that into a failure.
    if !has_gpu() {
        let o = bin().args(["check", "--strict", "--property", "P6"]).output().unwrap();
        let text = String::from_utf8(o.stdout).unwrap();
        assert_eq!(o.status.code(), Some(1), "{text}");
        assert!(text.contains("--strict: skipped: no CUDA device"), "{text}");
    }
    // With TUNECHECK_REQUIRE_CUDA=1 a missing GPU is a failure with the reason, not a panic.
    if !has_gpu() {
        let o = bin().args(["check", "--property", "P6"]).env("TUNECHECK_REQUIRE_CUDA", "1").output().unwrap();
        let text = String::from_utf8(o.stdout).unwrap();
        assert_eq!(o.status.code(), Some(1), "{text}");
        assert!(text.contains("CUDA required by TUNECHECK_REQUIRE_CUDA=1 but unavailable"), "{text}");
    }
    let o = bin().args(["check", "--cases", "0"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("runs nothing"));
    let o = bin().args(["check", "--property", "P1", "--cases", "4"]).env("PROPTEST_CASES", "0").output().unwrap();
    let text = String::from_utf8(o.stdout).unwrap();
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(text.contains("zero cases requested"), "{text}");
}

#[test]
fn kind_selects_the_adapter_kinds_and_a_property_without_them_is_a_skip() {
    let cases = |args: &[&str]| {
        let o = bin()
            .args(["check", "--property", "P1", "--cases", "2", "--family", "llama", "--json"])
            .args(args)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let rows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        rows[0]["verdict"]["cases_run"].as_u64().unwrap()
    };
    // Two cases per kind: three kinds by default, one with --kind.
    assert_eq!(cases(&[]), 6);
    assert_eq!(cases(&["--kind", "qlora_nf4"]), 2);
    assert_eq!(cases(&["--kind", "lora", "--kind", "full_embeddings"]), 4);
    // P14 exercises LoRA and QLoRA only: selecting neither is a skip saying so, not zero cases.
    let o = bin().args(["check", "--property", "P14", "--cases", "2", "--kind", "full_embeddings"]).output().unwrap();
    let text = String::from_utf8(o.stdout).unwrap();
    assert_eq!(o.status.code(), Some(0), "{text}");
    assert!(
        text.contains("skip all / P14: it exercises lora, qlora_nf4, none of the kinds selected (full_embeddings)"),
        "{text}"
    );
    let o = bin().args(["check", "--property", "P14", "--kind", "full_embeddings", "--strict"]).output().unwrap();
    assert_eq!(o.status.code(), Some(1), "--strict fails on that skip");
    let o = bin().args(["check", "--kind", "nope"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("unknown adapter kind `nope` (lora, qlora_nf4, full_embeddings)")
    );
    let o = bin().args(["check", "--mutants", "--kind", "lora"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "a mutant chooses its own kind");
    // A replay line keeps the selection.
    let opts = tunecheck::suite::Options {
        kinds: Some(vec![tunecheck::strategy::AdapterKind::QLora]),
        ..tunecheck::suite::Options::new(2, 0)
    };
    let line = opts.replay_with("P3", &candle_core::Device::Cpu, None, "--trainer 'python d.py'");
    assert_eq!(
        line,
        "tunecheck check --property P3 --device cpu --cases 2 --seed 0 --kind qlora_nf4 --trainer 'python d.py'"
    );
}

#[test]
fn check_mutants_catches_every_planted_bug_for_the_expected_reason() {
    let o = bin().args(["check", "--mutants"]).output().unwrap();
    let text = String::from_utf8(o.stdout).unwrap();
    assert!(o.status.success(), "{text}");
    let n = tunecheck::mutants::catalogue().len();
    assert!(n >= 24, "{n} mutants");
    assert!(text.contains(&format!("{n}/{n} mutants caught")), "{text}");
}

/// A printed replay line reproduces the failure it reports: for a trainer mutant (the mutant
/// is named, the shrunk case comes back from the seed), a forward mutant and a kernel mutant.
#[test]
fn printed_replay_lines_reproduce_their_failures() {
    for mutant in ["reload_ignores_compute_dtype", "cache_ignores_window", "stale-row-scale"] {
        let o = bin()
            .args(["check", "--mutants", "--json", "--cases", "4", "--seed", "3", "--mutant", mutant])
            .output()
            .unwrap();
        assert!(o.status.success(), "{mutant}: {}", String::from_utf8_lossy(&o.stderr));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let row = &v[0];
        assert_eq!(row["caught"], true, "{row}");
        let detail = row["verdict"]["detail"].as_str().unwrap().to_string();
        let replay = row["verdict"]["replay"].as_str().unwrap();
        assert!(replay.contains(&format!("--mutant {mutant}")) && replay.contains("--seed 3"), "{replay}");
        let args: Vec<&str> = replay.split_whitespace().skip(1).collect();
        let again = bin().args(&args).arg("--json").output().unwrap();
        assert_eq!(again.status.code(), Some(1), "{mutant}: replay `{replay}` did not fail");
        let w: serde_json::Value = serde_json::from_slice(&again.stdout).unwrap();
        assert_eq!(w[0]["verdict"]["detail"].as_str().unwrap(), detail, "{mutant}: replay gave another failure");
        assert_eq!(w[0]["verdict"]["minimal"], row["verdict"]["minimal"], "{mutant}");
    }
}

#[test]
fn every_subcommand_speaks_json_for_ci() {
    let tmp = tempfile::tempdir().unwrap();
    let m = tmp.path().join("m");
    let parse = |o: std::process::Output| -> serde_json::Value {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).expect("stdout is one JSON document")
    };
    let v = parse(bin().args(["synth", "--family", "gemma3", "--json", "--out"]).arg(&m).output().unwrap());
    assert_eq!(v["model_type"], "gemma3_text");
    let v = parse(
        bin().args(["quantize", "--json", "--model"]).arg(&m).arg("--out").arg(tmp.path().join("q")).output().unwrap(),
    );
    assert_eq!(v["quantization_config"]["bnb_4bit_quant_type"], "nf4");
    let v = parse(bin().args(["logits", "--ids", "1,2,3", "--json", "--model"]).arg(&m).output().unwrap());
    assert_eq!(v["logits"]["finite"], true);
    assert_eq!(v["logits"]["shape"], serde_json::json!([1, 3, 64]));
    let v = parse(bin().args(["inspect", "--json"]).arg(&m).output().unwrap());
    assert!(v["findings"].as_array().unwrap().is_empty());
}

/// candle 0.11 parses `/proc/cpuinfo` on every matmul unless `RAYON_NUM_THREADS` is set
/// (3–5× slower runs on tiny models): every forward pass pins the thread count first, so a
/// `logits` run opens that file once (19 times without the pin). Needs strace (skipped with
/// the reason otherwise; `TUNECHECK_REQUIRE_STRACE=1` makes that a failure).
#[test]
fn forward_passes_do_not_reparse_cpuinfo_per_matmul() {
    if Command::new("strace").arg("-V").output().is_err() {
        assert!(std::env::var_os("TUNECHECK_REQUIRE_STRACE").is_none(), "strace required but not installed");
        eprintln!("SKIPPED forward_passes_do_not_reparse_cpuinfo_per_matmul: strace is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace");
    let name = "llama_gqa";
    let st = Command::new("strace")
        .args(["-f", "-e", "trace=openat", "-o"])
        .arg(&trace)
        .arg(env!("CARGO_BIN_EXE_tunecheck"))
        .args(["logits", "--model"])
        .arg(fixture(name))
        .arg("--input")
        .arg(fixture(name).join("reference.safetensors"))
        .arg("--out")
        .arg(dir.path().join("o.safetensors"))
        .env_remove("RAYON_NUM_THREADS")
        .env_remove("CANDLE_NUM_THREADS")
        .status()
        .unwrap();
    assert!(st.success());
    let opens = std::fs::read_to_string(&trace).unwrap().matches("\"/proc/cpuinfo\"").count();
    assert!(opens <= 1, "/proc/cpuinfo opened {opens} times by one `logits` run: the thread count is not pinned");
}
