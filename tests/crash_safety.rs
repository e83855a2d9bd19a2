//! Kill -9 at every step of every kind of save: the directory afterwards loads and holds the
//! old or the new checkpoint byte for byte, never a mix, and the next save leaves no debris.
//!
//! This test binary is its own child process: run with `TC_CRASH_CHILD="KIND SEED DIR"` it
//! performs one save and exits; the parent first counts the save's fault points
//! (`TUNECHECK_FAULT_TRACE`), then reruns it killed at each one (`TUNECHECK_KILL_AT`), for
//! each kind (model, sharded model, 4-bit model, adapter, trainer checkpoint), over an
//! existing checkpoint with the atomic exchange and with the rename-aside fallback, and into
//! a directory that does not exist yet. A second part injects the kill from outside with
//! `strace` at every `rename`, `renameat2`, `fsync` and `write` of `tunecheck synth`, when
//! strace is installed (the skip is printed otherwise; `TUNECHECK_REQUIRE_STRACE=1` fails it).

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::Device;
use tunecheck::io::manifest::MANIFEST;
use tunecheck::spec::{ArchSpec, Family};

const CHILD_ENV: &str = "TC_CRASH_CHILD";
const KINDS: [&str; 5] = ["model", "sharded", "quant4", "adapter", "checkpoint"];

fn main() {
    if let Ok(args) = std::env::var(CHILD_ENV) {
        let mut it = args.splitn(3, ' ');
        let (kind, seed, dir) = (it.next().unwrap(), it.next().unwrap().parse().unwrap(), it.next().unwrap());
        save(kind, seed, Path::new(dir)).unwrap();
        return;
    }
    let filter: Vec<String> = std::env::args().skip(1).filter(|a| !a.starts_with('-')).collect();
    let mut failed = 0;
    let mut run = |name: &str, f: &dyn Fn()| {
        if !filter.is_empty() && !filter.iter().any(|p| name.contains(p.as_str())) {
            return;
        }
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        println!("test {name} ... {}", if r.is_ok() { "ok" } else { "FAILED" });
        failed += r.is_err() as usize;
    };
    for kind in KINDS {
        run(&format!("kill_at_every_step::{kind}::exchange"), &|| kill_at_every_step(kind, false, true));
        run(&format!("kill_at_every_step::{kind}::fallback"), &|| kill_at_every_step(kind, true, true));
    }
    run("kill_at_every_step::model::first_save", &|| kill_at_every_step("model", false, false));
    run("torn_directories_are_reported", &torn_directories_are_reported);
    run("strace_kills_synth_at_every_syscall", &strace_kills_synth_at_every_syscall);
    if failed > 0 {
        eprintln!("{failed} crash-safety test(s) failed");
        std::process::exit(1);
    }
}

fn spec_of(kind: &str) -> ArchSpec {
    ArchSpec::tiny(if kind == "quant4" || kind == "checkpoint" { Family::Llama } else { Family::Gemma2 })
}

/// One save of `kind` with weights from `seed` into `dir`.
fn save(kind: &str, seed: u64, dir: &Path) -> tunecheck::Result<()> {
    use tunecheck::io::hf::{self, Sharding};
    let spec = spec_of(kind);
    let w = tunecheck::weights::generate(&spec, seed, &Device::Cpu)?;
    let quant = tunecheck::adapt::QuantConfig {
        compute_dtype: candle_core::DType::F32,
        ..tunecheck::adapt::QuantConfig::default()
    };
    match kind {
        "model" => hf::save(dir, &spec, &w, Sharding::Single),
        "sharded" => hf::save(dir, &spec, &w, Sharding::MaxBytes(30_000 + 10_000 * seed as usize)),
        "quant4" => tunecheck::io::quantize::save_quantized(dir, &spec, &w, &quant),
        "adapter" | "checkpoint" => {
            use tunecheck::subject::{reference, Trainer};
            let setup = tunecheck::subject::Setup {
                weights: w,
                lora: tunecheck::adapt::LoraConfig {
                    target_modules: vec!["q_proj".into(), "v_proj".into()],
                    ..tunecheck::adapt::LoraConfig::default()
                },
                quant: (kind == "checkpoint").then_some(quant),
                train: tunecheck::train::TrainConfig::default(),
                adapter_seed: seed + 10,
                spec,
            };
            let mut tr = reference(&setup, &Device::Cpu)?;
            tr.train_step(&tunecheck::strategy::random_batches(setup.spec.vocab_size, seed, 1, 2, 6))?;
            if kind == "checkpoint" {
                tr.save(dir)
            } else {
                tunecheck::io::peft::save(dir, tr.model(), tr.lora(), tr.params(), tr.quant(), "synthetic")
            }
        }
        other => panic!("unknown kind {other}"),
    }
}

/// Load `dir` the way its kind is loaded (this also checks the manifest).
fn load(kind: &str, dir: &Path) -> tunecheck::Result<()> {
    match kind {
        "model" | "sharded" | "quant4" => tunecheck::io::hf::load(dir, &Device::Cpu, None).map(drop),
        "adapter" => tunecheck::io::peft::read(dir).map(drop),
        _ => tunecheck::train::checkpoint::load(&Device::Cpu, dir).map(drop),
    }
}

/// Every file under `dir` by relative path, without the manifest (its save id differs per save).
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    for p in std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()) {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if p.is_dir() {
            out.extend(files(&p).into_iter().map(|(k, v)| (format!("{name}/{k}"), v)));
        } else if name != MANIFEST {
            out.insert(name, std::fs::read(&p).unwrap());
        }
    }
    out
}

/// Safetensors files carry the save id in their header: compare them without it.
fn without_ids(mut m: BTreeMap<String, Vec<u8>>) -> BTreeMap<String, Vec<u8>> {
    for (k, v) in m.iter_mut() {
        if k.ends_with(".safetensors") {
            let n = u64::from_le_bytes(v[..8].try_into().unwrap()) as usize;
            let mut header: serde_json::Value = serde_json::from_slice(&v[8..8 + n]).unwrap();
            if let Some(meta) = header.get_mut("__metadata__").and_then(|m| m.as_object_mut()) {
                meta.remove(tunecheck::io::manifest::SAVE_ID_KEY);
            }
            let mut out = serde_json::to_vec(&header).unwrap();
            out.extend_from_slice(&v[8 + n..]);
            *v = out;
        }
    }
    m
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.path().is_dir() {
            copy_tree(&e.path(), &to.join(e.file_name()));
        } else {
            std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

fn debris(dir: &Path) -> Vec<String> {
    let name = dir.file_name().unwrap().to_string_lossy().into_owned();
    std::fs::read_dir(dir.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!(".{name}.")))
        .collect()
}

fn child(kind: &str, seed: u64, dir: &Path, fallback: bool, env: &[(&str, String)]) -> std::process::Output {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.env(CHILD_ENV, format!("{kind} {seed} {}", dir.display()));
    c.env_remove(tunecheck::io::faults::KILL_AT_ENV).env_remove(tunecheck::io::faults::TRACE_ENV);
    if fallback {
        c.env(tunecheck::io::atomic::NO_EXCHANGE_ENV, "1");
    } else {
        c.env_remove(tunecheck::io::atomic::NO_EXCHANGE_ENV);
    }
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

/// What a directory holds after a kill: the old save, the new one, or nothing (first save).
#[derive(Debug, PartialEq, Eq, PartialOrd, Ord, Clone, Copy)]
enum Found {
    Nothing,
    Old,
    New,
}

fn kill_at_every_step(kind: &str, fallback: bool, over_existing: bool) {
    let tmp = tempfile::tempdir().unwrap();
    let (old_dir, new_dir, target) = (tmp.path().join("old"), tmp.path().join("new"), tmp.path().join("ck"));
    save(kind, 1, &old_dir).unwrap();
    save(kind, 2, &new_dir).unwrap();
    let (old, new) = (without_ids(files(&old_dir)), without_ids(files(&new_dir)));
    assert_ne!(old, new, "{kind}: seeds 1 and 2 must save different bytes");
    let reset = |target: &Path| {
        let _ = std::fs::remove_dir_all(target);
        if over_existing {
            copy_tree(&old_dir, target);
        }
    };
    reset(&target);
    let out = child(kind, 2, &target, fallback, &[(tunecheck::io::faults::TRACE_ENV, "1".into())]);
    assert!(out.status.success(), "{kind}: traced save failed: {}", String::from_utf8_lossy(&out.stderr));
    let trace = String::from_utf8_lossy(&out.stderr);
    let points: Vec<&str> = trace.lines().filter(|l| l.starts_with("tunecheck fault point ")).collect();
    assert!(points.len() >= 8, "{kind}: only {} fault points", points.len());
    for what in ["create", "write", "fsync", if over_existing && !fallback { "exchange" } else { "rename" }] {
        assert!(points.iter().any(|p| p.contains(&format!(": {what} "))), "{kind}: no `{what}` point in {points:?}");
    }
    let mut seen = BTreeMap::new();
    for n in 1..=points.len() {
        reset(&target);
        let out = child(kind, 2, &target, fallback, &[(tunecheck::io::faults::KILL_AT_ENV, n.to_string())]);
        assert_eq!(out.status.signal(), Some(libc::SIGKILL), "{kind}: not killed at point {n} ({})", points[n - 1]);
        let found = if !target.exists() && !over_existing {
            Found::Nothing
        } else {
            if let Err(e) = load(kind, &target) {
                panic!("{kind}: killed at point {n} ({}): the directory does not load: {e}", points[n - 1]);
            }
            let now = without_ids(files(&target));
            if now == old {
                Found::Old
            } else if now == new {
                Found::New
            } else {
                let differ: Vec<&String> =
                    now.keys().chain(old.keys()).filter(|k| now.get(*k) != old.get(*k)).collect();
                panic!(
                    "{kind}: killed at point {n} ({}): a mix of two saves; differs from old in {differ:?}",
                    points[n - 1]
                );
            }
        };
        *seen.entry(found).or_insert(0) += 1;
    }
    let first = if over_existing { Found::Old } else { Found::Nothing };
    assert!(
        seen.get(&first).copied().unwrap_or(0) > 0 && seen.get(&Found::New).copied().unwrap_or(0) > 0,
        "{kind}: {seen:?}"
    );
    // The next complete save lands and cleans whatever the kills left beside the directory.
    let out = child(kind, 2, &target, fallback, &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(without_ids(files(&target)), new);
    assert_eq!(debris(&target), Vec::<String>::new(), "{kind}: debris after a clean save");
    println!(
        "  {kind} ({}): {} fault points, after the kill old {} / new {} / nothing {}",
        if fallback {
            "fallback"
        } else if over_existing {
            "exchange"
        } else {
            "first save"
        },
        points.len(),
        seen.get(&Found::Old).unwrap_or(&0),
        seen.get(&Found::New).unwrap_or(&0),
        seen.get(&Found::Nothing).unwrap_or(&0)
    );
}

fn torn_directories_are_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    save("sharded", 2, &a).unwrap();
    save("sharded", 2, &b).unwrap();
    let shard = std::fs::read_dir(&a)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("model-00002"))
        .expect("a second shard");
    // Same weights, another save: the shard's bytes differ only in its save id.
    std::fs::copy(b.join(&shard), a.join(&shard)).unwrap();
    let e = load("sharded", &a).unwrap_err().to_string();
    assert!(e.contains("torn checkpoint") && e.contains(&shard) && e.contains("another save"), "{e}");
    // A hand-edited JSON file of the save.
    save("model", 1, &b).unwrap();
    let mut cfg = std::fs::read(b.join("config.json")).unwrap();
    let digit = cfg.iter().position(u8::is_ascii_digit).unwrap();
    cfg[digit] = if cfg[digit] == b'9' { b'8' } else { cfg[digit] + 1 };
    std::fs::write(b.join("config.json"), cfg).unwrap();
    let e = load("model", &b).unwrap_err().to_string();
    assert!(e.contains("torn checkpoint") && e.contains("config.json") && e.contains("SHA-256"), "{e}");
    // A truncated shard and a missing file.
    save("adapter", 1, &b).unwrap();
    let w = b.join(tunecheck::io::peft::WEIGHTS);
    let bytes = std::fs::read(&w).unwrap();
    std::fs::write(&w, &bytes[..bytes.len() - 4]).unwrap();
    let e = load("adapter", &b).unwrap_err().to_string();
    assert!(e.contains("torn checkpoint") && e.contains("bytes where the save wrote"), "{e}");
    std::fs::remove_file(&w).unwrap();
    let e = load("adapter", &b).unwrap_err().to_string();
    assert!(e.contains("torn checkpoint") && e.contains("is missing"), "{e}");
    // Without a manifest (a checkpoint written by transformers) nothing is checked.
    save("model", 1, &b).unwrap();
    std::fs::remove_file(b.join(MANIFEST)).unwrap();
    load("model", &b).unwrap();
}

/// The `tunecheck` binary built for this test run.
fn tunecheck_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_tunecheck"))
}

fn strace_kills_synth_at_every_syscall() {
    if Command::new("strace").arg("-V").output().map(|o| !o.status.success()).unwrap_or(true) {
        let why = "SKIP strace_kills_synth_at_every_syscall: strace is not installed (apt-get install strace)";
        assert!(std::env::var_os("TUNECHECK_REQUIRE_STRACE").is_none(), "{why}");
        println!("  {why}");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("ck");
    let synth = |seed: u64, out: &Path, strace: Option<(&str, usize)>| {
        let mut args: Vec<String> = Vec::new();
        if let Some((call, n)) = strace {
            args = ["-f", "-qq", "-o", "/dev/null", "-e"].map(String::from).to_vec();
            args.push(format!("inject={call}:signal=SIGKILL:when={n}"));
            args.push(tunecheck_bin().display().to_string());
        }
        args.extend(
            ["synth", "--family", "gemma2", "--seed", &seed.to_string(), "--shard-bytes", "30000", "--out"]
                .map(String::from),
        );
        args.push(out.display().to_string());
        let prog = if strace.is_some() { PathBuf::from("strace") } else { tunecheck_bin() };
        Command::new(prog).args(&args).output().unwrap()
    };
    let (old_dir, new_dir) = (tmp.path().join("old"), tmp.path().join("new"));
    assert!(synth(1, &old_dir, None).status.success());
    assert!(synth(2, &new_dir, None).status.success());
    let (old, new) = (without_ids(files(&old_dir)), without_ids(files(&new_dir)));
    let mut total = 0;
    for call in ["rename", "renameat2", "fsync", "write"] {
        for n in 1.. {
            let _ = std::fs::remove_dir_all(&target);
            copy_tree(&old_dir, &target);
            let out = synth(2, &target, Some((call, n)));
            let now = without_ids(files(&target));
            assert!(now == old || now == new, "strace kill at {call} #{n}: a mix of two saves");
            load("sharded", &target).unwrap_or_else(|e| panic!("strace kill at {call} #{n}: {e}"));
            if out.status.success() && now == new {
                break; // fewer than n such calls: the save completed
            }
            total += 1;
            assert!(n < 200, "{call}: no end");
        }
    }
    assert!(total >= 10, "only {total} syscalls killed");
    println!("  strace: {total} kills at rename/renameat2/fsync/write of `tunecheck synth`, each old or new");
}
