//! The `Trainer` trait: what another framework implements so that every tunecheck property
//! runs against *its* model and trainer. The built-in [`RefTrainer`] implements it (and must
//! pass everything); each mutant implements it with one planted bug (and must fail exactly
//! its property).
//!
//! A property builds subjects through a *factory* `Fn(&Setup, &Device) -> Result<T>`: the
//! spec, base weights (seeded, on the host), adapter and training configuration are chosen by
//! the property; the subject decides how to hold them. Optional abilities are declared in
//! [`Capabilities`]; a property that needs one the subject lacks is skipped with a message.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::adapt::{LoraConfig, QuantConfig};
use crate::error::Result;
use crate::model::Mode;
use crate::spec::ArchSpec;
use crate::train::trainer::{Batch, EvalStrategy, RefTrainer, StepReport, TrainConfig};
use crate::weights::Weights;

/// Optional abilities of a subject. Construct with [`Capabilities::all`] or
/// [`Capabilities::none`] and switch fields; new fields may be added (non-exhaustive).
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
}

impl Capabilities {
    /// Everything.
    pub fn all() -> Self {
        Capabilities { kv_cache: true, save_load: true, quant4: true, grad_accum: true, train_embeddings: true }
    }

    /// Nothing optional.
    pub fn none() -> Self {
        Capabilities { kv_cache: false, save_load: false, quant4: false, grad_accum: false, train_embeddings: false }
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

impl Setup {
    /// The capabilities this setup needs.
    pub fn needs(&self) -> Capabilities {
        Capabilities {
            kv_cache: false,
            save_load: false,
            quant4: self.quant.is_some(),
            grad_accum: self.train.grad_accum > 1,
            train_embeddings: !self.lora.modules_to_save.is_empty(),
        }
    }
}

/// A model + trainer under test.
pub trait Trainer: Sized {
    /// Optional abilities.
    fn capabilities(&self) -> Capabilities;

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

    /// Build a fresh subject from `setup` and load what [`Trainer::save`] wrote in `dir`.
    fn load(setup: &Setup, device: &Device, dir: &Path) -> Result<Self>;

    /// Train `epochs` passes over `train` (one optimizer step per batch), returning the loss
    /// of every step and the eval loss at the end of every epoch (on `eval`, when not empty).
    /// Override when the subject has its own epoch logic (schedulers, shuffling, eval hooks):
    /// that logic is what the epoch-boundary property checks.
    fn fit(&mut self, train: &[Batch], eval: &[Batch], epochs: usize) -> Result<crate::train::History> {
        let mut h = crate::train::History::default();
        let mut step = 0;
        for epoch in 0..epochs {
            for b in train {
                step += 1;
                h.train.push((step, epoch, self.train_step(std::slice::from_ref(b))?.loss));
            }
            if !eval.is_empty() {
                h.eval.push((step, self.eval_loss(eval)?));
            }
        }
        Ok(h)
    }

    /// Seeded sampling of `new_tokens` tokens (temperature 1) after each row of `prompt`.
    fn sample(&self, prompt: &Tensor, new_tokens: usize, seed: u64) -> Result<Vec<Vec<u32>>> {
        crate::model::generate::sample_with(|ids| self.logits(ids, Mode::Eval), prompt, new_tokens, seed)
    }
}

/// Build a [`RefTrainer`] on `device` from `setup`.
pub fn reference(setup: &Setup, device: &Device) -> Result<RefTrainer> {
    let weights: Weights =
        setup.weights.iter().map(|(k, t)| Ok((k.clone(), t.to_device(device)?))).collect::<Result<_>>()?;
    RefTrainer::new(&setup.spec, &weights, &setup.lora, setup.quant, setup.train.clone(), setup.adapter_seed)
}

impl Trainer for RefTrainer {
    fn capabilities(&self) -> Capabilities {
        Capabilities::all()
    }

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
        let mut out = Vec::new();
        let trained: Vec<&str> = self.params().iter().map(|(n, _)| n.as_str()).collect();
        if !trained.contains(&"model.embed_tokens.weight") {
            out.push(("model.embed_tokens.weight".to_string(), self.model().embed().clone()));
        }
        for (path, lin) in self.model().linears() {
            let name = format!("{path}.weight");
            if trained.contains(&name.as_str()) {
                continue;
            }
            match &lin.base {
                crate::adapt::Base::Dense(w) => out.push((name, w.clone())),
                crate::adapt::Base::Quant4(q) => {
                    // What is stored: the packed codes and the block scales.
                    out.push((format!("{name}.scales"), q.packed.scales.clone()));
                    out.push((name, q.packed.packed.clone()));
                }
            }
        }
        out
    }

    fn save(&self, dir: &Path) -> Result<()> {
        crate::train::checkpoint::save(self, dir, "tunecheck-synthetic")
    }

    fn fit(&mut self, train: &[Batch], eval: &[Batch], epochs: usize) -> Result<crate::train::History> {
        self.set_epochs(epochs, if eval.is_empty() { EvalStrategy::No } else { EvalStrategy::Epoch });
        RefTrainer::fit(self, train, eval)
    }

    fn load(setup: &Setup, device: &Device, dir: &Path) -> Result<Self> {
        let mut tr = reference(setup, device)?;
        crate::train::checkpoint::resume(&mut tr, dir)?;
        Ok(tr)
    }
}
