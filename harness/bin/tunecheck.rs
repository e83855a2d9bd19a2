//! The `tunecheck` command line: `check` runs the property suite on synthetic models,
//! `logits` runs a Hugging Face checkpoint on token ids.
//!
//! Exit codes: 0 success, 1 a property failed, 2 unusable input or arguments.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;

use candle_core::{DType, Device, Tensor};
use clap::{Parser, Subcommand};

use tunecheck::io::{hf, st};
use tunecheck::suite::{self, Options};
use tunecheck::{Family, Mode};

#[derive(Parser)]
#[command(
    name = "tunecheck",
    version,
    about = "Catch the silent bugs of LLM fine-tuning stacks with property tests on synthetic Llama/Gemma models"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run every property on seeded synthetic models of each family and print a table.
    Check {
        /// Device: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Random cases per family and property.
        #[arg(long, default_value_t = 16)]
        cases: u32,
        /// Seed of the case generator (same seed, same cases).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Only these families (llama, gemma, gemma2, gemma3); repeatable. Default: all.
        #[arg(long)]
        family: Vec<String>,
        /// Only these properties (F1, P1, P2, ..., or `forward` for F1-F3); repeatable. Default: all.
        #[arg(long)]
        property: Vec<String>,
        /// Fail on any skip (a skipped adapter kind, dtype, capability or device).
        #[arg(long)]
        strict: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Run each planted-bug mutant against the property that must catch it instead.
        #[arg(long)]
        mutants: bool,
        /// Run the property of this one planted-bug mutant against it (what a mutant's replay
        /// line does); exits 1 when the property catches it.
        #[arg(long)]
        mutant: Option<String>,
        /// Judge the trainer behind this driver command (the driver protocol, e.g.
        /// "python harness/drivers/transformers_peft.py") instead of the reference: every
        /// trainer property the driver can take; what it cannot is shown as skipped.
        #[arg(long)]
        trainer: Option<String>,
        /// Seconds each driver operation may take before the driver is killed and the
        /// property fails (default: $TUNECHECK_DRIVER_TIMEOUT, else 300).
        #[arg(long)]
        timeout: Option<f64>,
    },
    /// Speak the driver protocol on stdin/stdout around the reference trainer (or a planted-bug
    /// mutant): the Rust driver that tests the protocol, and an example for driver authors.
    Driver {
        /// Serve this trainer mutant instead of the reference.
        #[arg(long)]
        mutant: Option<String>,
        /// Misbehave on purpose at the first request for an operation: OP:KIND with KIND one of
        /// die, garbage, hang, bad_shape, error, unsupported (for testing the protocol's failure handling).
        #[arg(long)]
        fault: Vec<String>,
    },
    /// Write a seeded synthetic checkpoint (config.json + model.safetensors) that transformers loads.
    Synth {
        /// Family of the built-in tiny spec (llama, gemma, gemma2, gemma3); ignored with --config.
        #[arg(long, default_value = "llama")]
        family: String,
        /// Use this config.json instead of the built-in tiny spec.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Weight seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output directory (created; existing files are replaced atomically).
        #[arg(long)]
        out: PathBuf,
        /// Split weights into shards of at most this many bytes (writes an index).
        #[arg(long)]
        shard_bytes: Option<usize>,
        /// Print the result as JSON on stdout (for CI).
        #[arg(long)]
        json: bool,
    },
    /// Fine-tune a LoRA adapter on the synthetic successor task and save it as a PEFT directory.
    Train {
        /// Base model directory (vocab must cover the fixture tokenizer's 65 ids).
        #[arg(long)]
        model: PathBuf,
        /// Output adapter directory.
        #[arg(long)]
        out: PathBuf,
        /// Optimizer steps.
        #[arg(long, default_value_t = 50)]
        steps: usize,
        /// LoRA rank.
        #[arg(long, default_value_t = 4)]
        rank: usize,
        /// Modules to adapt (comma-separated PEFT names).
        #[arg(long, default_value = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")]
        targets: String,
        /// Quantize the base to 4 bits first (QLoRA): nf4 or fp4.
        #[arg(long)]
        quant: Option<String>,
        /// Seed of the adapter init and the data.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Print the result as JSON on stdout (for CI).
        #[arg(long)]
        json: bool,
    },
    /// Quantize a checkpoint's projections to 4 bits and save it as transformers + bitsandbytes do.
    Quantize {
        /// Dense Hugging Face model directory.
        #[arg(long)]
        model: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// 4-bit code: nf4 or fp4.
        #[arg(long, default_value = "nf4")]
        quant: String,
        /// Elements per block (power of two, 32..=4096; bitsandbytes uses 64).
        #[arg(long, default_value_t = 64)]
        blocksize: usize,
        /// Quantize the block scales too (bnb_4bit_use_double_quant).
        #[arg(long)]
        double_quant: bool,
        /// bnb_4bit_compute_dtype: f32, bf16 or f16.
        #[arg(long, default_value = "f32")]
        compute_dtype: String,
        /// Print the result as JSON on stdout (for CI).
        #[arg(long)]
        json: bool,
    },
    /// Compute eval-mode logits of a checkpoint for token ids.
    Logits {
        /// Hugging Face model directory (config.json + model.safetensors or shards).
        #[arg(long)]
        model: PathBuf,
        /// safetensors file with int64 `input_ids` / `input_ids_<suffix>` tensors [batch, seq].
        #[arg(long)]
        input: Option<PathBuf>,
        /// Comma-separated token ids, one sequence per flag; repeatable.
        #[arg(long, action = clap::ArgAction::Append)]
        ids: Vec<String>,
        /// Write float32 `logits` / `logits_<suffix>` [batch, seq, vocab] here instead of a summary.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Device: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// PEFT LoRA adapter directory to apply on top of the model.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Print the result as JSON on stdout (for CI).
        #[arg(long)]
        json: bool,
    },
    /// Inspect a checkpoint: untrained tokens, NaN/Inf, dtype, 4-bit config, probe forward
    ///
    /// Lists untrained token rows of embed_tokens/lm_head with their token strings (flagged
    /// when special or used by the chat template), tensors with NaN/Inf, whether the device
    /// computes in the checkpoint's dtype, the 4-bit config and whether an adapter's recorded
    /// base config matches it, parameter counts, and a probe forward (finite logits? argmax
    /// collapsed?). Exit code 0 clean, 1 findings, 2 unusable input.
    Inspect {
        /// Hugging Face model directory (config.json + safetensors; tokenizer files optional).
        dir: PathBuf,
        /// PEFT adapter directory whose recorded base quantization is checked and applied in the probe.
        #[arg(long)]
        adapter: Option<PathBuf>,
        /// Device for the dtype check and the probe: cpu, cuda or cuda:N.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Driver { mutant, fault } => driver(mutant.as_deref(), &fault),
        Cmd::Check { device, cases, seed, family, property, strict, json, mutants, mutant, trainer, timeout } => {
            check(CheckArgs {
                device,
                cases,
                seed,
                families: family,
                properties: property,
                strict,
                json,
                mutants,
                mutant,
                trainer,
                timeout,
            })
        }
        Cmd::Quantize { model, out, quant, blocksize, double_quant, compute_dtype, json } => {
            set_json(json);
            report("quantize", quantize(&model, &out, &quant, blocksize, double_quant, &compute_dtype))
        }
        Cmd::Train { model, out, steps, rank, targets, quant, seed, json } => {
            set_json(json);
            report("train", train(&model, &out, steps, rank, &targets, quant.as_deref(), seed))
        }
        Cmd::Synth { family, config, seed, out, shard_bytes, json } => {
            set_json(json);
            match synth(&family, config, seed, &out, shard_bytes) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tunecheck synth: {e}");
                    ExitCode::from(2)
                }
            }
        }
        Cmd::Inspect { dir, adapter, device, json } => inspect(&dir, adapter.as_deref(), &device, json),
        Cmd::Logits { model, input, ids, out, device, adapter, json } => {
            set_json(json);
            match logits(&model, input, &ids, out, &device, adapter.as_deref()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tunecheck logits: {e}");
                    ExitCode::from(2)
                }
            }
        }
    }
}

fn inspect(dir: &std::path::Path, adapter: Option<&std::path::Path>, device: &str, json: bool) -> ExitCode {
    use std::io::IsTerminal;
    let device = match tunecheck::device::parse(device) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("tunecheck inspect: {e}");
            return ExitCode::from(2);
        }
    };
    // A progress line on a terminal only, for checkpoints worth waiting for (≥ 64 MiB).
    let tty = std::io::stderr().is_terminal();
    let mut shown = 0usize;
    let progress = |file: &std::path::Path, done: usize, total: usize| {
        if !tty || total < (64 << 20) {
            return;
        }
        let pct = done * 100 / total.max(1);
        if pct != shown || done == total {
            shown = pct;
            let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            eprint!(
                "\rscanning {pct:>3}% ({:.2} / {:.2} GiB) {name}\x1b[K",
                done as f64 / 1073741824.0,
                total as f64 / 1073741824.0
            );
            if done == total {
                eprintln!();
            }
        }
    };
    match tunecheck::inspect::inspect(dir, adapter, &device, progress) {
        Ok(r) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            } else {
                print!("{}", tunecheck::inspect::render(&r));
            }
            ExitCode::from(r.exit_code())
        }
        Err(e) => {
            eprintln!("tunecheck inspect: {e}");
            ExitCode::from(2)
        }
    }
}

static JSON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

fn set_json(on: bool) {
    let _ = JSON.set(on);
}

/// Report a result: the human line on stderr, or the JSON object on stdout with `--json`.
fn done(human: String, json: serde_json::Value) {
    if JSON.get().copied().unwrap_or(false) {
        println!("{}", serde_json::to_string_pretty(&json).unwrap_or_default());
    } else {
        eprintln!("{human}");
    }
}

/// Print an error for `cmd` and map it to exit code 2 (unusable input).
fn report(cmd: &str, r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tunecheck {cmd}: {e}");
            ExitCode::from(2)
        }
    }
}

struct CheckArgs {
    device: String,
    cases: u32,
    seed: u64,
    families: Vec<String>,
    properties: Vec<String>,
    strict: bool,
    json: bool,
    mutants: bool,
    mutant: Option<String>,
    trainer: Option<String>,
    timeout: Option<f64>,
}

fn driver(mutant: Option<&str>, faults: &[String]) -> ExitCode {
    let faults: Result<Vec<_>, _> =
        faults.iter().map(|f| f.parse::<tunecheck::process::serve::DriverFault>()).collect();
    let faults = match faults {
        Ok(f) => f,
        Err(e) => {
            eprintln!("tunecheck driver: {e}");
            return ExitCode::from(2);
        }
    };
    let result = match mutant {
        None => tunecheck::process::serve::serve(&tunecheck::subject::Reference, faults),
        Some(n) => match tunecheck::mutants::catalogue().iter().filter(|m| m.name == n).find_map(|m| m.trainer_bug()) {
            Some(bug) => tunecheck::process::serve::serve(&tunecheck::mutants::Mutant(bug), faults),
            None => {
                let names: Vec<&str> = tunecheck::mutants::catalogue()
                    .iter()
                    .filter(|m| m.trainer_bug().is_some())
                    .map(|m| m.name)
                    .collect();
                eprintln!("tunecheck driver: `{n}` is not a trainer mutant ({})", names.join(", "));
                return ExitCode::from(2);
            }
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tunecheck driver: {e}");
            ExitCode::from(1)
        }
    }
}

fn check(a: CheckArgs) -> ExitCode {
    let usage = |msg: String| {
        eprintln!("tunecheck check: {msg}");
        ExitCode::from(2)
    };
    let device = match tunecheck::device::parse(&a.device) {
        Ok(d) => d,
        Err(e) => return usage(e),
    };
    if a.cases == 0 {
        return usage("--cases 0 runs nothing: a property that runs no case has not been checked".into());
    }
    let mut families = Vec::new();
    for f in &a.families {
        match Family::from_name(f) {
            Some(x) => families.push(x),
            None => return usage(format!("unknown family `{f}` (llama, gemma, gemma2, gemma3)")),
        }
    }
    if families.is_empty() {
        families = Family::ALL.to_vec();
    }
    for p in &a.properties {
        if !tunecheck::props::catalogue::CATALOGUE.iter().any(|e| tunecheck::props::catalogue::selects(p, e)) {
            let ids: Vec<&str> = tunecheck::props::catalogue::CATALOGUE.iter().map(|p| p.id).collect();
            return usage(format!("unknown property `{p}` (forward, {})", ids.join(", ")));
        }
    }
    let named = match &a.mutant {
        Some(n) => match tunecheck::mutants::by_name(n) {
            Some(m) => Some(m),
            None => {
                let names: Vec<&str> = tunecheck::mutants::catalogue().iter().map(|m| m.name).collect();
                return usage(format!("unknown mutant `{n}` ({})", names.join(", ")));
            }
        },
        None => None,
    };
    let opts = Options {
        cases: a.cases,
        seed: a.seed,
        families,
        properties: a.properties.clone(),
        strict: a.strict,
        mutant: a.mutant.clone(),
        // A driver rebuilds its subject (a model load) at every shrinking step.
        max_shrink_iters: if a.trainer.is_some() {
            24
        } else {
            tunecheck::props::runner::PropConfig::default().max_shrink_iters
        },
    };
    let start = std::time::Instant::now();
    let json = a.json;
    if let Some(cmd) = &a.trainer {
        if a.mutants || named.is_some() {
            return usage(
                "--trainer judges an outside trainer; it cannot be combined with --mutants or --mutant".into(),
            );
        }
        if !device.is_cpu() {
            return usage("--trainer runs where the driver runs; use --device cpu".into());
        }
        let timeout = match a.timeout {
            Some(t) if t.is_finite() && t > 0.0 => std::time::Duration::from_secs_f64(t),
            Some(t) => return usage(format!("--timeout {t}: not a positive number of seconds")),
            None => match tunecheck::process::ProcessFactory::timeout_from_env() {
                Ok(t) => t,
                Err(e) => return usage(e.to_string()),
            },
        };
        let factory = match tunecheck::process::ProcessFactory::start(cmd, timeout) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("tunecheck check: {e}");
                return ExitCode::from(1);
            }
        };
        if !json {
            let h = factory.hello();
            eprintln!("subject: {} {} via `{cmd}`", h.framework, h.version);
        }
        let total = suite::subject_properties(&opts).len();
        let mut done = 0;
        let rows = suite::run_subject(&factory, &device, &opts, |r: &suite::Row| {
            done += 1;
            if !json {
                let t = start.elapsed().as_secs_f64();
                eprintln!("[{done:>2}/{total}] {t:6.1}s  {:<14} {}", r.property, r.verdict.word());
            }
        });
        return finish_rows(&rows, json);
    }
    if a.mutants {
        let total = if named.is_some() { 1 } else { tunecheck::mutants::catalogue().len() };
        let mut done = 0;
        let rows = suite::run_mutants(&device, &opts, |r: &suite::MutantRow| {
            done += 1;
            if !json {
                let t = start.elapsed().as_secs_f64();
                eprintln!(
                    "[{done:>2}/{total}] {t:6.1}s  {:<36} {}",
                    r.mutant,
                    if r.caught { "caught" } else { "MISSED" }
                );
            }
        });
        if json {
            println!("{}", serde_json::to_string_pretty(&rows).unwrap_or_default());
        } else {
            print!("{}", suite::mutant_table(&rows));
        }
        return if rows.iter().all(|r| r.caught) { ExitCode::SUCCESS } else { ExitCode::from(1) };
    }
    let rows = match &named {
        Some(m) => suite::run_as_subject(m, &device, &opts),
        None => {
            let total = suite::row_count(&opts);
            let mut done = 0;
            suite::run(&device, &opts, |r: &suite::Row| {
                done += 1;
                if !json {
                    let t = start.elapsed().as_secs_f64();
                    eprintln!("[{done:>2}/{total}] {t:6.1}s  {:<7} {:<14} {}", r.family, r.property, r.verdict.word());
                }
            })
        }
    };
    finish_rows(&rows, json)
}

fn finish_rows(rows: &[suite::Row], json: bool) -> ExitCode {
    if json {
        println!("{}", serde_json::to_string_pretty(&rows).unwrap_or_default());
    } else {
        print!("{}", suite::table(rows));
    }
    if rows.is_empty() {
        eprintln!("tunecheck check: no property was selected");
        return ExitCode::from(1);
    }
    if rows.iter().all(|r| r.verdict.passed() || matches!(r.verdict, tunecheck::props::runner::Verdict::Skipped { .. }))
    {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn quantize(
    model: &std::path::Path,
    out: &std::path::Path,
    quant: &str,
    blocksize: usize,
    double_quant: bool,
    compute_dtype: &str,
) -> anyhow::Result<()> {
    let quant_type = tunecheck::quant::QuantType::parse(quant)
        .ok_or_else(|| anyhow::anyhow!("--quant: `{quant}` is not nf4 or fp4"))?;
    tunecheck::quant::blockwise::check_blocksize(blocksize)
        .map_err(|_| anyhow::anyhow!("--blocksize: {blocksize} is not a power of two in 32..=4096"))?;
    let compute_dtype = tunecheck::spec::parse_dtype(compute_dtype)
        .ok_or_else(|| anyhow::anyhow!("--compute-dtype: `{compute_dtype}` is not f32, bf16 or f16"))?;
    let cfg = tunecheck::adapt::QuantConfig { quant_type, blocksize, double_quant, compute_dtype };
    tunecheck::io::quantize::quantize_dir(model, out, &cfg)?;
    let layers = tunecheck::io::config::read(&model.join(hf::CONFIG))?.num_layers;
    done(
        format!("wrote {} 4-bit checkpoint ({layers} layers) to {}", quant_type.name(), out.display()),
        serde_json::json!({"out": out, "quantization_config": tunecheck::io::config::quant_to_json(&cfg), "layers": layers}),
    );
    Ok(())
}

fn train(
    model: &std::path::Path,
    out: &std::path::Path,
    steps: usize,
    rank: usize,
    targets: &str,
    quant: Option<&str>,
    seed: u64,
) -> anyhow::Result<()> {
    use tunecheck::adapt::{LoraConfig, QuantConfig};
    use tunecheck::data::{tokenizer, SuccessorTask};
    use tunecheck::train::{RefTrainer, TrainConfig};
    let ck = hf::load(model, &Device::Cpu, None)?;
    let quant = match quant {
        None => None,
        Some(q) => Some(QuantConfig {
            quant_type: tunecheck::quant::QuantType::parse(q)
                .ok_or_else(|| anyhow::anyhow!("--quant: `{q}` is not nf4 or fp4"))?,
            compute_dtype: DType::F32,
            ..QuantConfig::default()
        }),
    };
    let lora = LoraConfig {
        r: rank,
        alpha: 2.0 * rank as f64,
        target_modules: targets.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect(),
        ..LoraConfig::default()
    };
    let tok = tokenizer::fixture()?;
    if ck.spec.vocab_size < tok.get_vocab_size(true) {
        anyhow::bail!(
            "the model's vocab ({}) does not cover the fixture tokenizer ({})",
            ck.spec.vocab_size,
            tok.get_vocab_size(true)
        );
    }
    let task = SuccessorTask::new(tokenizer::specials(&tok)?, seed, 16);
    let data = task.batches(seed, steps, 8, 10);
    let mut tr = RefTrainer::new(&ck.spec, &ck.weights, &lora, quant, TrainConfig::default(), seed)?;
    let before = tr.eval_loss(&data[..data.len().min(4)])?;
    tr.fit(&data, &[])?;
    let after = tr.eval_loss(&data[..data.len().min(4)])?;
    tunecheck::io::peft::save(out, tr.model(), tr.lora(), tr.params(), tr.quant(), &model.display().to_string())?;
    done(
        format!("trained {steps} steps: loss {before:.4} -> {after:.4}; adapter written to {}", out.display()),
        serde_json::json!({"out": out, "steps": steps, "loss_before": before, "loss_after": after}),
    );
    Ok(())
}

fn synth(
    family: &str,
    config: Option<PathBuf>,
    seed: u64,
    out: &std::path::Path,
    shard_bytes: Option<usize>,
) -> anyhow::Result<()> {
    let spec = match config {
        Some(p) => tunecheck::io::config::read(&p)?,
        None => {
            let f = Family::from_name(family)
                .ok_or_else(|| anyhow::anyhow!("unknown family `{family}` (llama, gemma, gemma2, gemma3)"))?;
            tunecheck::ArchSpec::tiny(f)
        }
    };
    let sharding = shard_bytes.map_or(hf::Sharding::Single, hf::Sharding::MaxBytes);
    // Tensor by tensor, a shard at a time: an 8B spec never needs its size in memory.
    hf::save_generated(out, &spec, sharding, &mut |key| {
        tunecheck::weights::generate_one(&spec, seed, key, &Device::Cpu)
    })?;
    done(
        format!(
            "wrote {} ({}, {} parameters, seed {seed}) to {}",
            spec.family,
            spec.family.architecture(),
            spec.num_parameters(),
            out.display()
        ),
        serde_json::json!({
            "out": out,
            "model_type": spec.family.model_type(),
            "parameters": spec.num_parameters(),
            "seed": seed,
        }),
    );
    Ok(())
}

fn parse_ids(s: &[String]) -> anyhow::Result<Vec<u32>> {
    s.iter().map(|x| x.trim().parse::<u32>().map_err(|_| anyhow::anyhow!("--ids: `{x}` is not a token id"))).collect()
}

fn logits(
    model_dir: &std::path::Path,
    input: Option<PathBuf>,
    ids: &[String],
    out: Option<PathBuf>,
    device: &str,
    adapter: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let device: Device = tunecheck::device::parse(device).map_err(anyhow::Error::msg)?;
    let mut inputs: BTreeMap<String, Tensor> = BTreeMap::new();
    if let Some(path) = &input {
        let f = st::StFile::open(path)?;
        for name in f.names()? {
            if name != "input_ids" && !name.starts_with("input_ids_") {
                continue;
            }
            let (dtype, shape) = f.info(&name)?.expect("listed tensor exists");
            if dtype != safetensors::Dtype::I64 {
                anyhow::bail!("{}: tensor `{name}`: dtype {dtype:?}, expected I64", path.display());
            }
            if shape.len() != 2 || shape[0] == 0 || shape[1] == 0 {
                anyhow::bail!(
                    "{}: tensor `{name}`: shape {shape:?}, expected [batch, seq] with both > 0",
                    path.display()
                );
            }
            inputs.insert(name.clone(), f.load(&name)?);
        }
        if inputs.is_empty() {
            anyhow::bail!("{}: no tensor named `input_ids` or `input_ids_<suffix>`", path.display());
        }
    }
    let many = ids.len() > 1;
    for (k, g) in ids.iter().enumerate() {
        let v = parse_ids(&g.split(',').map(str::to_string).collect::<Vec<_>>())?;
        if v.is_empty() {
            anyhow::bail!("--ids: empty sequence");
        }
        let name = if many || inputs.contains_key("input_ids") {
            format!("input_ids_ids{k}")
        } else {
            "input_ids".to_string()
        };
        let n = v.len();
        inputs.insert(name, Tensor::from_vec(v.into_iter().map(i64::from).collect::<Vec<_>>(), (1, n), &Device::Cpu)?);
    }
    if inputs.is_empty() {
        anyhow::bail!("nothing to run: give --input FILE or --ids 1,2,3");
    }
    let ckpt = hf::load(model_dir, &device, None)?;
    let mut model = ckpt.model()?;
    if let Some(adir) = adapter {
        let a = tunecheck::io::peft::read(adir)?;
        tunecheck::io::peft::apply(&mut model, &a, ckpt.quant.as_ref(), adir)?;
    }
    let mut outputs = BTreeMap::new();
    for (name, ids) in &inputs {
        let logits =
            model.forward(ids, Mode::Eval).map_err(|e| anyhow::anyhow!("input `{name}`: {e}"))?.to_dtype(DType::F32)?;
        let out_name = name.replacen("input_ids", "logits", 1);
        outputs.insert(out_name, logits);
    }
    match out {
        Some(path) => {
            st::write_safetensors(&path, &outputs)?;
            done(
                format!("wrote {} tensor(s) to {}", outputs.len(), path.display()),
                serde_json::json!({"out": path, "tensors": outputs.keys().collect::<Vec<_>>()}),
            );
        }
        None => {
            let mut summary = serde_json::Map::new();
            let mut text = format!(
                "model: {} ({} layers, vocab {}, {} parameters)\n",
                ckpt.spec.family,
                ckpt.spec.num_layers,
                ckpt.spec.vocab_size,
                ckpt.spec.num_parameters()
            );
            for (name, l) in &outputs {
                let am = l.argmax(candle_core::D::Minus1)?.to_vec2::<u32>()?;
                let finite = l.flatten_all()?.to_vec1::<f32>()?.iter().all(|x| x.is_finite());
                text.push_str(&format!("{name}: shape {:?}, finite: {finite}\n", l.dims()));
                for (r, row) in am.iter().enumerate() {
                    text.push_str(&format!("  row {r} argmax per position: {row:?}\n"));
                }
                summary.insert(name.clone(), serde_json::json!({"shape": l.dims(), "finite": finite, "argmax": am}));
            }
            if JSON.get().copied().unwrap_or(false) {
                println!("{}", serde_json::to_string_pretty(&summary).unwrap_or_default());
            } else {
                print!("{text}");
            }
        }
    }
    Ok(())
}
