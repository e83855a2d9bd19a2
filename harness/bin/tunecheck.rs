//! The `tunecheck` command line: argument parsing, printing, and one mapping from a
//! command's result to the exit code. The commands themselves live in `tunecheck::cli`.
//!
//! Exit codes: 0 success, 1 a property failed (or inspect found something), 2 unusable input
//! or arguments.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use tunecheck::cli::{self, check::CheckArgs, files, CmdResult};

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
    Check(CheckArgs),
    /// Speak the driver protocol on stdin/stdout around the reference trainer (or a planted-bug
    /// mutant): the Rust driver that tests the protocol, and an example for driver authors.
    Driver {
        /// Serve this trainer mutant instead of the reference.
        #[arg(long)]
        mutant: Option<String>,
        /// Misbehave on purpose at the first request for an operation: OP:KIND with KIND one of
        /// die, garbage, hang, bad_shape, error, unsupported; OP:KIND:always at every request for
        /// it (for testing the protocol's failure handling).
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
        /// Split weights into shards of at most this many bytes (with an index) when the
        /// checkpoint is larger (one model.safetensors below it, as transformers writes).
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
        /// Split into shards of at most this many bytes (with an index) when the checkpoint is
        /// larger; default transformers' 50 GB (one model.safetensors below it).
        #[arg(long)]
        shard_bytes: Option<usize>,
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

impl Cmd {
    fn name(&self) -> &'static str {
        match self {
            Cmd::Check(_) => "check",
            Cmd::Driver { .. } => "driver",
            Cmd::Synth { .. } => "synth",
            Cmd::Train { .. } => "train",
            Cmd::Quantize { .. } => "quantize",
            Cmd::Logits { .. } => "logits",
            Cmd::Inspect { .. } => "inspect",
        }
    }
}

fn main() -> ExitCode {
    let cmd = Cli::parse().cmd;
    let name = cmd.name();
    match run(cmd) {
        Ok(out) => {
            print!("{}", out.stdout);
            eprint!("{}", out.stderr);
            ExitCode::from(out.code)
        }
        Err(e) => {
            eprintln!("tunecheck {name}: {e}");
            ExitCode::from(e.code)
        }
    }
}

/// Progress lines go to stderr, on a terminal only.
fn on_terminal() -> bool {
    std::io::stderr().is_terminal()
}

fn run(cmd: Cmd) -> CmdResult {
    match cmd {
        Cmd::Driver { mutant, fault } => cli::check::driver(mutant.as_deref(), &fault),
        Cmd::Check(args) => cli::check::check(&args, &mut |line| eprintln!("{line}")),
        Cmd::Quantize { model, out, quant, blocksize, double_quant, compute_dtype, shard_bytes, json } => {
            let args = files::QuantArgs { quant, blocksize, double_quant, compute_dtype, shard_bytes };
            files::quantize(&model, &out, &args, json)
        }
        Cmd::Train { model, out, steps, rank, targets, quant, seed, json } => {
            let recipe = files::Recipe { steps, rank, targets, quant, seed };
            let tty = on_terminal();
            files::train(&model, &out, &recipe, json, &mut |step, total, loss| {
                if tty {
                    eprint!("{}", tunecheck::report::train_progress(step, total, loss));
                }
            })
        }
        Cmd::Synth { family, config, seed, out, shard_bytes, json } => {
            files::synth(&family, config.as_deref(), seed, &out, shard_bytes, json)
        }
        Cmd::Inspect { dir, adapter, device, json } => {
            let tty = on_terminal();
            let mut shown = None;
            files::inspect(&dir, adapter.as_deref(), &device, json, |file, done, total| {
                if tty {
                    eprint!("{}", tunecheck::report::scan_progress(&mut shown, file, done, total));
                }
            })
        }
        Cmd::Logits { model, input, ids, out, device, adapter, json } => {
            let inputs = files::logits_inputs(input.as_deref(), &ids)?;
            files::logits(&model, &inputs, out.as_ref(), &device, adapter.as_deref(), json)
        }
    }
}
