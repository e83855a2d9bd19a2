//! The `Trainer` trait: what another framework implements so that every tunecheck property
//! runs against *its* model and trainer. The built-in [`RefTrainer`] implements it (and must
//! pass everything); each trainer mutant is the reference with one planted bug (and must fail
//! its property, in the expected clause).
//!
//! A property builds subjects through a [`Factory`], a value: `build(&Setup, &Device)` makes a
//! fresh subject from a setup chosen by the property (spec, seeded base weights on the host,
//! adapter and training configuration); `load(&Device, dir)` makes one from a directory that
//! [`Trainer::save`] wrote, and nothing else — the 4-bit config, dtypes, adapter config,
//! optimizer state, schedule position and RNG state must all come back from the directory.
//! Optional abilities are declared by the factory in [`Capabilities`]; a property that needs
//! one the subject lacks is reported as skipped with the reason, never as passed.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::adapt::{LoraConfig, QuantConfig};
use crate::data::Batch;
use crate::error::Result;
use crate::model::Mode;
use crate::spec::ArchSpec;
use crate::train::trainer::{EvalStrategy, RefTrainer, StepReport, TrainConfig};
use crate::weights::Weights;

/// Optional abilities of a subject, declared by its [`Factory`] before anything is built.
/// Construct with [`Capabilities::all`] or [`Capabilities::none`] and switch fields; new
/// fields may be added (non-exhaustive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Capabilities {
    /// Incremental decoding with a KV cache ([`Trainer::decode`]).
    pub kv_cache: bool,
    /// Saving to and loading from a directory.
    pub save_load: bool,
    /// A 4-bit (NF4/FP4) frozen base.
    pub quant4: bool,
    /// Several micro-batches per optimizer step.
    pub grad_accum: bool,
    /// Training `embed_tokens` / `lm_head` in full.
    pub train_embeddings: bool,
    /// Models held and computed in bfloat16.
    pub bf16: bool,
    /// Models held and computed in float16.
    pub f16: bool,
    /// LoRA dropout (`lora_dropout` > 0): active in train mode only.
    pub dropout: bool,
    /// Train-mode dropout drawn from the setup's seed: two subjects built from one setup draw
    /// the same masks.
    pub reproducible_dropout: bool,
}

impl Capabilities {
    /// Everything.
    pub const fn all() -> Self {
        Capabilities {
            kv_cache: true,
            save_load: true,
            quant4: true,
            grad_accum: true,
            train_embeddings: true,
            bf16: true,
            f16: true,
            dropout: true,
            reproducible_dropout: true,
        }
    }

    /// Nothing optional (f32 only).
    pub const fn none() -> Self {
        Capabilities {
            kv_cache: false,
            save_load: false,
            quant4: false,
            grad_accum: false,
            train_embeddings: false,
            bf16: false,
            f16: false,
            dropout: false,
            reproducible_dropout: false,
        }
    }

    /// Whether models in `dtype` are supported (f32 always is).
    pub fn supports_dtype(&self, dtype: DType) -> bool {
        match dtype {
            DType::BF16 => self.bf16,
            DType::F16 => self.f16,
            _ => true,
        }
    }

    /// The first capability in `need` that `self` lacks, by field name.
    pub fn lacking(&self, need: &Capabilities) -> Option<&'static str> {
        [
            (need.kv_cache && !self.kv_cache, "kv_cache"),
            (need.save_load && !self.save_load, "save_load"),
            (need.quant4 && !self.quant4, "quant4"),
            (need.grad_accum && !self.grad_accum, "grad_accum"),
            (need.train_embeddings && !self.train_embeddings, "train_embeddings"),
            (need.bf16 && !self.bf16, "bf16"),
            (need.f16 && !self.f16, "f16"),
            (need.dropout && !self.dropout, "dropout"),
            (need.reproducible_dropout && !self.reproducible_dropout, "reproducible_dropout"),
        ]
        .into_iter()
        .find(|(missing, _)| *missing)
        .map(|(_, name)| name)
    }
}

/// How far [`Trainer::fit`] trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FitPlan {
    /// Train until this many epochs are complete (counting those of earlier calls).
    pub epochs: usize,
    /// Stop after this many optimizer steps of this call.
    pub max_steps: Option<usize>,
}

impl FitPlan {
    /// `epochs` complete epochs, no step limit.
    pub fn epochs(epochs: usize) -> Self {
        FitPlan { epochs, max_steps: None }
    }
}

/// Everything a property asks a subject to be built from.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The architecture.
    pub spec: ArchSpec,
    /// Seeded base weights (HF names, host, `spec.dtype`).
    pub weights: Weights,
    /// The adapter to train.
    pub lora: LoraConfig,
    /// A 4-bit base, when asked.
    pub quant: Option<QuantConfig>,
    /// Optimizer, schedule, accumulation, epochs, eval, seed.
    pub train: TrainConfig,
    /// Seed of the adapter's initial values.
    pub adapter_seed: u64,
}

/// A model + trainer under test (object-safe: properties hold `Box<dyn Trainer>`).
pub trait Trainer {
    /// Logits `[batch, seq, vocab]` for ids `[batch, seq]` in `mode`.
    fn logits(&self, ids: &Tensor, mode: Mode) -> Result<Tensor>;

    /// Greedy decode of `new_tokens` tokens after each row of `prompt`, incrementally with a
    /// KV cache when the subject has one, else by full forwards.
    fn decode(&self, prompt: &Tensor, new_tokens: usize) -> Result<Vec<Vec<u32>>>;

    /// Logits of `ids` computed incrementally: the first `prefill` positions at once, then one
    /// position at a time from the KV cache (`None` when the subject has no cache).
    fn cached_logits(&self, ids: &Tensor, prefill: usize) -> Result<Option<Tensor>>;

    /// Gradients of one step's loss over `micro` (accumulated) for every trainable tensor,
    /// without updating anything.
    fn gradients(&self, micro: &[Batch]) -> Result<BTreeMap<String, Tensor>>;

    /// One optimizer step over the micro-batches `micro`.
    fn train_step(&mut self, micro: &[Batch]) -> Result<StepReport>;

    /// Token-weighted mean eval-mode loss over `batches`.
    fn eval_loss(&self, batches: &[Batch]) -> Result<f64>;

    /// Trainable tensors by name (current values).
    fn trainable(&self) -> Vec<(String, Tensor)>;

    /// Frozen tensors by name (current values; at least the base weights, as stored: a 4-bit
    /// base may list its packed codes and scales rather than a dequantized copy).
    fn frozen(&self) -> Vec<(String, Tensor)>;

    /// Save everything needed to continue or serve into `dir`.
    fn save(&self, dir: &Path) -> Result<()>;

    /// Train until `plan.epochs` passes over `train` are complete, one optimizer step per
    /// `grad_accum` micro-batches of the setup the subject was built from (the last window of
    /// an epoch may be short), returning the loss of every step and the eval loss at the end of
    /// every epoch (on `eval`, when not empty). With `plan.max_steps`, stop after that many
    /// steps of this call, possibly mid-epoch; a later call — on this subject or on one loaded
    /// from its checkpoint — continues with the next batch of that epoch. This is the
    /// subject's own loop (schedulers, epoch boundaries, eval hooks, resume): that loop is
    /// what the epoch-boundary and resume clauses check.
    fn fit(&mut self, train: &[Batch], eval: &[Batch], plan: FitPlan) -> Result<crate::train::History>;

    /// Seeded sampling of `new_tokens` tokens (temperature 1) after each row of `prompt`.
    fn sample(&self, prompt: &Tensor, new_tokens: usize, seed: u64) -> Result<Vec<Vec<u32>>> {
        crate::model::generate::sample_with(|ids| self.logits(ids, Mode::Eval), prompt, new_tokens, seed)
    }
}

/// Makes subjects: the value a property runs against.
pub trait Factory {
    /// A short name for reports (`reference`, `mutant/per_microbatch_mean`, ...).
    fn name(&self) -> String;

    /// Arguments of `tunecheck check` that rebuild this factory, for replay lines (`None`
    /// when the CLI cannot reach it, e.g. a trainer defined in another crate's tests).
    fn replay_args(&self) -> Option<String> {
        None
    }

    /// Optional abilities of the subjects it makes.
    fn capabilities(&self) -> Capabilities;

    /// Why the subjects lack a capability (by its protocol name, e.g. `f16`), where the
    /// framework says: shown with the skip.
    fn lacking_reason(&self, _capability: &str) -> Option<String> {
        None
    }

    /// Every model family with `None` when supported, else the reason it is not (a family a
    /// framework version lacks is skipped with that reason, never failed).
    fn families(&self) -> Vec<(crate::spec::Family, Option<String>)> {
        crate::spec::Family::ALL.iter().map(|&f| (f, None)).collect()
    }

    /// A fresh subject for `setup` on `device`.
    fn build(&self, setup: &Setup, device: &Device) -> Result<Box<dyn Trainer>>;

    /// A subject restored from `dir` (written by [`Trainer::save`]) on `device`: everything
    /// comes back from the directory.
    fn load(&self, device: &Device, dir: &Path) -> Result<Box<dyn Trainer>>;
}

/// A [`Factory`] from two functions, for trainers written against the typed API.
pub struct FnFactory<B, L> {
    name: String,
    capabilities: Capabilities,
    build: B,
    load: L,
}

/// Make a [`Factory`] named `name` from a build and a load function returning one type.
pub fn factory<T, B, L>(name: &str, capabilities: Capabilities, build: B, load: L) -> FnFactory<B, L>
where
    T: Trainer + 'static,
    B: Fn(&Setup, &Device) -> Result<T>,
    L: Fn(&Device, &Path) -> Result<T>,
{
    FnFactory { name: name.to_string(), capabilities, build, load }
}

impl<T, B, L> Factory for FnFactory<B, L>
where
    T: Trainer + 'static,
    B: Fn(&Setup, &Device) -> Result<T>,
    L: Fn(&Device, &Path) -> Result<T>,
{
    fn name(&self) -> String {
        self.name.clone()
    }
    fn capabilities(&self) -> Capabilities {
        self.capabilities
    }
    fn build(&self, setup: &Setup, device: &Device) -> Result<Box<dyn Trainer>> {
        Ok(Box::new((self.build)(setup, device)?))
    }
    fn load(&self, device: &Device, dir: &Path) -> Result<Box<dyn Trainer>> {
        Ok(Box::new((self.load)(device, dir)?))
    }
}

/// The reference trainer as a factory: what every property must pass.
#[derive(Debug, Clone, Copy, Default)]
pub struct Reference;

impl Factory for Reference {
    fn name(&self) -> String {
        "reference".into()
    }
    fn replay_args(&self) -> Option<String> {
        Some(String::new())
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::all()
    }
    fn build(&self, setup: &Setup, device: &Device) -> Result<Box<dyn Trainer>> {
        Ok(Box::new(reference(setup, device)?))
    }
    fn load(&self, device: &Device, dir: &Path) -> Result<Box<dyn Trainer>> {
        Ok(Box::new(crate::train::checkpoint::load(device, dir)?))
    }
}

/// Build a [`RefTrainer`] on `device` from `setup`.
pub fn reference(setup: &Setup, device: &Device) -> Result<RefTrainer> {
    let weights: Weights =
        setup.weights.iter().map(|(k, t)| Ok((k.clone(), t.to_device(device)?))).collect::<Result<_>>()?;
    RefTrainer::new(&setup.spec, &weights, &setup.lora, setup.quant, setup.train.clone(), setup.adapter_seed)
}

impl Trainer for RefTrainer {
    fn logits(&self, ids: &Tensor, mode: Mode) -> Result<Tensor> {
        RefTrainer::logits(self, ids, mode)
    }

    fn decode(&self, prompt: &Tensor, new_tokens: usize) -> Result<Vec<Vec<u32>>> {
        crate::model::generate::greedy_cached(self.model(), prompt, new_tokens)
    }

    fn cached_logits(&self, ids: &Tensor, prefill: usize) -> Result<Option<Tensor>> {
        let m = self.model();
        let s = ids.dim(1)?;
        let prefill = prefill.clamp(1, s);
        let mut cache = m.new_cache();
        let mut parts = vec![m.forward_cached(&ids.narrow(1, 0, prefill)?, &mut cache, Mode::Eval)?];
        for p in prefill..s {
            parts.push(m.forward_cached(&ids.narrow(1, p, 1)?, &mut cache, Mode::Eval)?);
        }
        Ok(Some(Tensor::cat(&parts, 1)?))
    }

    fn gradients(&self, micro: &[Batch]) -> Result<BTreeMap<String, Tensor>> {
        Ok(RefTrainer::gradients(self, micro, Mode::Train)?.0)
    }

    fn train_step(&mut self, micro: &[Batch]) -> Result<StepReport> {
        RefTrainer::train_step(self, micro)
    }

    fn eval_loss(&self, batches: &[Batch]) -> Result<f64> {
        RefTrainer::eval_loss(self, batches)
    }

    fn trainable(&self) -> Vec<(String, Tensor)> {
        self.params().iter().map(|(n, v)| (n.clone(), v.as_tensor().clone())).collect()
    }

    fn frozen(&self) -> Vec<(String, Tensor)> {
        RefTrainer::frozen(self)
    }

    fn save(&self, dir: &Path) -> Result<()> {
        crate::train::checkpoint::save(self, dir, "tunecheck-synthetic")
    }

    fn fit(&mut self, train: &[Batch], eval: &[Batch], plan: FitPlan) -> Result<crate::train::History> {
        self.set_epochs(plan.epochs, if eval.is_empty() { EvalStrategy::No } else { EvalStrategy::Epoch });
        RefTrainer::fit_until(self, train, eval, plan.max_steps)
    }
}
