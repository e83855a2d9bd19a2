//! # tunecheck
//!
//! Property tests that catch the silent bugs of LLM fine-tuning stacks — eval path ≠ train
//! path, untrained tokens turning into NaN, save/reload drift, loss that does not descend —
//! on small synthetic Llama- and Gemma-shaped models that match transformers numerically.
//!
//! The data flow is the module layout:
//!
//! ```text
//! spec (ArchSpec + seed) → weights (seeded ChaCha, host) → model (candle, any device)
//!        ▲ strategy (proptest arb_*)                              │
//!        └──────────── props (invariants) ◄──────────────────────┘ → report
//! ```
//!
//! In data-flow order:
//!
//! - [`spec`]: the architecture, validated, and the tensor names and shapes it implies;
//! - [`strategy`]: proptest strategies that shrink toward the smallest model;
//! - [`weights`]: seeded weights, the same bits on every run and device;
//! - [`quant`]: NF4/FP4 codes, blockwise 4-bit quantization, the fused 4-bit kernels;
//! - [`adapt`]: what the model injects as its parts load — projections with dense or 4-bit
//!   bases plus LoRA, embedding LoRA, `modules_to_save` — and the seeded dropout;
//! - [`model`]: attention, MLP and decoder layer, each with its own `load` and `forward`, the
//!   transformer (Llama, Gemma 1/2/3), KV cache, greedy generation, streaming a layer at a time;
//! - [`io`]: formats on disk — `config.json`, Hugging Face checkpoints (single or sharded),
//!   bitsandbytes 4-bit, PEFT adapters — read with one strict field reader and saved crash-safe;
//! - [`loader`]: the one place a model is assembled from weights or a checkpoint, an adapter
//!   and a 4-bit base;
//! - [`data`]: micro-batches and the ignore label, the fixture tokenizer, the synthetic task;
//! - [`train`]: the reference trainer (loss, AdamW, schedules, accumulation, checkpoints);
//! - [`subject`]: the `Trainer` trait and the `Factory` value properties build subjects with;
//! - [`process`]: trainers in other processes (transformers + PEFT, any language) behind the
//!   same trait, through a versioned JSON-lines protocol;
//! - [`props`]: the invariants, one file each, described by [`props::property`], listed in
//!   [`props::catalogue`], run by [`props::runner`] (shrinking the simplest draw first:
//!   [`props::shrink`]) with honest verdicts ([`props::verdict`]);
//! - [`mutants`]: planted-bug subjects, each with the property and clause that must catch it;
//! - [`suite`]: what `tunecheck check` runs (or one `--partition` of it);
//! - [`outcomes`]: a row's one-word outcome and the expected-outcomes files a framework's CI
//!   pins (`check --expect`, `--bless`);
//! - [`inspect`]: `tunecheck inspect`, the checkpoint doctor;
//! - [`report`]: what the command line prints (tables, the inspect report, JSON, progress);
//! - [`cli`]: the commands behind the `tunecheck` binary;
//! - [`conformance!`]: one test per catalogue property in the calling crate;
//! - [`device`] and [`error`]: devices with the CUDA skip/require policy, and the error type.

pub mod adapt;
pub mod cli;
pub mod conformance;
pub mod data;
pub mod device;
pub mod error;
pub mod inspect;
pub mod io;
pub mod loader;
pub mod model;
pub mod mutants;
pub mod outcomes;
pub mod process;
pub mod props;
pub mod quant;
pub mod report;
pub mod spec;
pub mod strategy;
pub mod subject;
pub mod suite;
pub mod train;
pub mod weights;

pub use candle_core;
pub use error::{Error, Result};
pub use model::{KvCache, Mode, Transformer};
pub use spec::{ArchSpec, Family, LayerType, Rope, RopeScaling};
