//! The reference trainer: a synthetic (or loaded) base, optionally quantized to 4 bits, an
//! adapter (LoRA and/or full `modules_to_save`), AdamW with f32 master weights and state,
//! gradient accumulation normalised by the total number of unmasked tokens across the
//! micro-batches of a step, epochs that keep optimizer and schedule state, and evaluation.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor};

use crate::adapt::inject::{Bases, Inject, LoraValues, Params};
use crate::adapt::linear::Base;
use crate::adapt::lora::LoraConfig;
use crate::adapt::qlora::QuantConfig;
use crate::data::batch::{Batch, IGNORE};
use crate::error::{Error, Result};
use crate::model::{Mode, Transformer};
use crate::spec::ArchSpec;
use crate::train::loss::causal_lm_loss;
use crate::train::optim::{clip, AdamW, AdamWConfig, Schedule};
use crate::train::untrained::{self, UntrainedPolicy};
use crate::weights::Weights;

/// When to evaluate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvalStrategy {
    /// Never.
    No,
    /// Every N optimizer steps.
    Steps(usize),
    /// At the end of every epoch.
    Epoch,
}

/// Planted trainer bugs (mutants only); all off by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrainFaults {
    /// Normalise each micro-batch by its own token count, then average (the 2024 bug).
    pub per_microbatch_mean: bool,
    /// Reset the optimizer moments at every epoch boundary (the schedule goes on): the first
    /// step after it moves every parameter by ±lr, a loss spike at the boundary.
    pub reset_at_epoch: bool,
    /// Skip evaluation even when asked.
    pub skip_eval: bool,
    /// Train on untrained tokens with frozen embeddings without refusing or fixing them.
    pub ignore_untrained: bool,
    /// Restart the learning-rate schedule (warmup and cosine) at every epoch boundary.
    pub restart_schedule_at_epoch: bool,
    /// In [`RefTrainer::fit`], a partial accumulation window at the end of an epoch is divided
    /// by the configured number of micro-batches instead of its own tokens (transformers'
    /// last-window bug): that step's gradient shrinks by `len / grad_accum`.
    pub partial_window_over_k: bool,
    /// Save no optimizer moments (the step count is saved): a resumed run restarts Adam.
    pub skip_optimizer_state: bool,
    /// Leave trainable all-zero token rows as they are (no fix to the mean) before training.
    pub keep_zero_rows: bool,
    /// A fit resumed in the middle of an epoch starts that epoch again from its first batch
    /// (the position inside the epoch is not restored): the batches before the stop are seen
    /// twice.
    pub resume_restarts_epoch: bool,
    /// Count the unmasked tokens of a step before the causal shift (position 0's label
    /// included), in every path alike: every gradient and the reported loss shrink by
    /// `tokens / (tokens + rows)` (transformers' `num_items_in_batch` once counted this way).
    pub tokens_before_shift: bool,
    /// The optimizer ignores the configured weight decay.
    pub drop_weight_decay: bool,
    /// Weight decay 0 configured, torch's `AdamW` default 0.01 applied.
    pub default_weight_decay: bool,
    /// A reloaded trainer does not restore the schedule: its first step uses the learning
    /// rate the optimizer carried (as torch's optimizer state holds it), then the schedule
    /// starts again from step 1.
    pub schedule_not_restored: bool,
    /// A save writes the adapter values as they were when the trainer was built, not the
    /// trained ones (a stale copy of the state dict).
    pub save_initial_adapter: bool,
    /// A reload does not restore the dropout RNG's position: the continuation draws the masks
    /// the run drew from its start.
    pub rng_not_restored: bool,
}

/// Trainer configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainConfig {
    /// AdamW hyper-parameters.
    pub optim: AdamWConfig,
    /// Learning-rate schedule.
    pub schedule: Schedule,
    /// Clip the global gradient norm to this.
    pub max_grad_norm: Option<f64>,
    /// Micro-batches per optimizer step.
    pub grad_accum: usize,
    /// Passes over the training data in [`RefTrainer::fit`].
    pub epochs: usize,
    /// When to evaluate in [`RefTrainer::fit`].
    pub eval: EvalStrategy,
    /// Dtype of the trainable master weights (f32; bf16 only to reproduce update stalls).
    pub master_dtype: DType,
    /// What to do with untrained tokens in the data.
    pub untrained: UntrainedPolicy,
    /// Dropout stream seed.
    pub seed: u64,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            optim: AdamWConfig::default(),
            schedule: Schedule { warmup_steps: 5, total_steps: 200, min_ratio: 0.0 },
            max_grad_norm: Some(1.0),
            grad_accum: 1,
            epochs: 1,
            eval: EvalStrategy::No,
            master_dtype: DType::F32,
            untrained: UntrainedPolicy::Refuse,
            seed: 0,
        }
    }
}

/// What one optimizer step did.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Token-weighted mean loss over the step's micro-batches.
    pub loss: f64,
    /// Tokens in the loss.
    pub tokens: usize,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Learning rate used.
    pub lr: f64,
}

/// Loss curves from [`RefTrainer::fit`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    /// (optimizer step, epoch, train loss).
    pub train: Vec<(usize, usize, f64)>,
    /// (optimizer step, eval loss).
    pub eval: Vec<(usize, f64)>,
}

/// The reference trainer.
pub struct RefTrainer {
    spec: ArchSpec,
    /// The base weights as given (before any fix or quantization): saved with checkpoints so
    /// that a load needs nothing but the directory.
    base: Weights,
    model: Transformer,
    params: Params,
    opt: AdamW,
    cfg: TrainConfig,
    lora: LoraConfig,
    quant: Option<QuantConfig>,
    untrained: Vec<u32>,
    /// Steps since the schedule last started (equal to the optimizer step unless reset).
    schedule_step: usize,
    epoch: usize,
    /// Accumulation windows of the current epoch already trained (a fit stopped mid-epoch
    /// resumes after them, as transformers skips the batches it has seen).
    window_in_epoch: usize,
    /// A learning rate the next step uses instead of the schedule's (the
    /// `schedule_not_restored` fault only).
    carried_lr: Option<f64>,
    /// The adapter values at build (the `save_initial_adapter` fault only).
    initial: Option<Params>,
    faults: TrainFaults,
}

impl RefTrainer {
    /// Build a trainer from a spec and base weights (on their device), with adapter `lora`
    /// (seeded by `adapter_seed`), optionally a 4-bit base, and `cfg`.
    pub fn new(
        spec: &ArchSpec,
        weights: &Weights,
        lora: &LoraConfig,
        quant: Option<QuantConfig>,
        cfg: TrainConfig,
        adapter_seed: u64,
    ) -> Result<Self> {
        Self::build(spec, weights, lora, quant, cfg, adapter_seed, TrainFaults::default())
    }

    /// [`RefTrainer::new`] with planted bugs (mutants only); faults that act while building
    /// (`keep_zero_rows`) need them here.
    pub fn build(
        spec: &ArchSpec,
        weights: &Weights,
        lora: &LoraConfig,
        quant: Option<QuantConfig>,
        cfg: TrainConfig,
        adapter_seed: u64,
        faults: TrainFaults,
    ) -> Result<Self> {
        if cfg.grad_accum == 0 {
            return Err(Error::field("grad_accum", "must be at least 1"));
        }
        let base = weights.clone();
        let mut weights = weights.clone();
        let found = untrained::detect(&weights, untrained::DEFAULT_THRESHOLD)?;
        // Trainable token rows that start at exactly zero are not safe either: a zero
        // embedding stays zero through every residual branch, and each RMSNorm it meets
        // multiplies the gradient by 1/√eps (1e3 at eps 1e-6), so a deep model's gradient
        // overflows f32 to inf/NaN at the first step (found by P2). Fix them first, as when
        // asked to.
        let rows_trainable = lora.modules_to_save.iter().any(|m| m == "embed_tokens" || m == "lm_head");
        let fix = cfg.untrained == UntrainedPolicy::FixMean || (rows_trainable && !faults.keep_zero_rows);
        let untrained = if fix && !found.is_empty() {
            untrained::fix_mean(&mut weights, &found)?;
            Vec::new()
        } else {
            found
        };
        if weights.is_empty() {
            return Err(Error::Msg("no weights".into()));
        }
        let bases = match &quant {
            Some(q) => crate::loader::quantize_bases(spec, &weights, q)?,
            None => Bases::new(),
        };
        let values = LoraValues::Seeded { seed: adapter_seed, master: cfg.master_dtype };
        let inject = Inject::none().with_bases(bases).with_lora(lora.clone(), values);
        let crate::loader::Loaded { model, params } = crate::loader::build(spec, &weights, inject)?;
        model.set_dropout_seed(cfg.seed);
        let mut optim = cfg.optim;
        if faults.drop_weight_decay {
            optim.weight_decay = 0.0;
        }
        if faults.default_weight_decay && optim.weight_decay == 0.0 {
            optim.weight_decay = 0.01;
        }
        let initial = if faults.save_initial_adapter {
            Some(
                params
                    .iter()
                    .map(|(n, v)| Ok((n.clone(), candle_core::Var::from_tensor(&v.as_tensor().copy()?)?)))
                    .collect::<Result<Params>>()?,
            )
        } else {
            None
        };
        Ok(RefTrainer {
            spec: spec.clone(),
            base,
            model,
            params,
            opt: AdamW::new(optim),
            cfg,
            lora: lora.clone(),
            quant,
            untrained,
            schedule_step: 0,
            epoch: 0,
            window_in_epoch: 0,
            carried_lr: None,
            initial,
            faults,
        })
    }

    /// The planted bugs (all off outside mutants).
    pub fn faults(&self) -> TrainFaults {
        self.faults
    }

    /// The base weights as given to [`RefTrainer::new`].
    pub fn base_weights(&self) -> &Weights {
        &self.base
    }

    /// Frozen tensors by name, as stored: the embedding and head when not trained, dense
    /// projections, and a 4-bit base's packed codes and block scales.
    pub fn frozen(&self) -> Vec<(String, Tensor)> {
        let mut out = Vec::new();
        let trained: Vec<&str> = self.params.iter().map(|(n, _)| n.as_str()).collect();
        if !trained.contains(&"model.embed_tokens.weight") {
            out.push(("model.embed_tokens.weight".to_string(), self.model.embed().clone()));
        }
        for (path, lin) in self.model.linears() {
            let name = format!("{path}.weight");
            if trained.contains(&name.as_str()) {
                continue;
            }
            match &lin.base {
                Base::Dense(w) => out.push((name, w.clone())),
                Base::Quant4(q) => {
                    out.push((format!("{name}.scales"), q.packed.scales.clone()));
                    out.push((name, q.packed.packed.clone()));
                }
            }
        }
        out
    }

    /// Plant trainer bugs (mutants only).
    pub fn with_faults(mut self, faults: TrainFaults) -> Self {
        self.faults = faults;
        self
    }

    /// The model.
    pub fn model(&self) -> &Transformer {
        &self.model
    }

    /// Mutable model (e.g. to plant forward faults).
    pub fn model_mut(&mut self) -> &mut Transformer {
        &mut self.model
    }

    /// The architecture.
    pub fn spec(&self) -> &ArchSpec {
        &self.spec
    }

    /// Trainable parameters by name.
    pub fn params(&self) -> &Params {
        &self.params
    }

    /// The adapter configuration.
    pub fn lora(&self) -> &LoraConfig {
        &self.lora
    }

    /// The 4-bit configuration of the base, if quantized.
    pub fn quant(&self) -> Option<&QuantConfig> {
        self.quant.as_ref()
    }

    /// The configuration.
    pub fn config(&self) -> &TrainConfig {
        &self.cfg
    }

    /// The optimizer (for saving its state).
    pub fn optimizer(&self) -> &AdamW {
        &self.opt
    }

    /// Mutable optimizer (for restoring its state).
    pub fn optimizer_mut(&mut self) -> &mut AdamW {
        &mut self.opt
    }

    /// Set the number of epochs and the eval strategy for the next [`RefTrainer::fit`].
    pub fn set_epochs(&mut self, epochs: usize, eval: EvalStrategy) {
        self.cfg.epochs = epochs;
        self.cfg.eval = eval;
    }

    /// (schedule step, epoch), for saving and resuming.
    pub fn progress(&self) -> (usize, usize) {
        (self.schedule_step, self.epoch)
    }

    /// Restore (schedule step, epoch).
    pub fn set_progress(&mut self, schedule_step: usize, epoch: usize) {
        self.schedule_step = schedule_step;
        self.epoch = epoch;
    }

    /// The adapter values a save writes: the current ones (the initial ones under the
    /// `save_initial_adapter` fault).
    pub fn saved_params(&self) -> &Params {
        self.initial.as_ref().unwrap_or(&self.params)
    }

    /// After a reload, forget the schedule position as a trainer that does not restore its
    /// scheduler does (the `schedule_not_restored` fault): the next step still runs at the
    /// learning rate the optimizer carried, the ones after it from the schedule's step 1.
    pub fn restart_schedule_keep_carried_lr(&mut self) {
        self.carried_lr = Some(self.cfg.optim.lr * self.cfg.schedule.factor(self.schedule_step));
        self.schedule_step = 0;
    }

    /// Accumulation windows of the current epoch already trained.
    pub fn window_in_epoch(&self) -> usize {
        self.window_in_epoch
    }

    /// Restore the position inside the current epoch.
    pub fn set_window_in_epoch(&mut self, w: usize) {
        self.window_in_epoch = w;
    }

    /// Untrained token ids still present in the base (empty after a mean fix).
    pub fn untrained_tokens(&self) -> &[u32] {
        &self.untrained
    }

    /// True when the rows of untrained tokens can learn (embedding or head trainable).
    fn token_rows_trainable(&self) -> bool {
        self.params.iter().any(|(n, _)| n.starts_with("model.embed_tokens") || n.starts_with("lm_head"))
    }

    fn check_untrained(&self, batches: &[Batch]) -> Result<()> {
        if self.untrained.is_empty() || self.token_rows_trainable() || self.faults.ignore_untrained {
            return Ok(());
        }
        for b in batches {
            let found = untrained::occurring(&self.untrained, &b.ids);
            if !found.is_empty() {
                return Err(Error::UntrainedTokens { ids: found });
            }
        }
        Ok(())
    }

    /// Logits `[b, s, vocab]` (model dtype) of a batch.
    pub fn logits(&self, ids: &Tensor, mode: Mode) -> Result<Tensor> {
        self.model.forward(ids, mode)
    }

    /// Gradients of the step's loss with respect to every trainable parameter, normalised by
    /// the total number of unmasked tokens across `micro` (or per micro-batch under the fault),
    /// with the token-weighted mean loss and the token count.
    pub fn gradients(&self, micro: &[Batch], mode: Mode) -> Result<(BTreeMap<String, Tensor>, f64, usize)> {
        self.check_untrained(micro)?;
        let total: usize = if self.faults.tokens_before_shift {
            micro.iter().flat_map(|b| b.labels.iter().flatten()).filter(|&&l| l != IGNORE).count()
        } else {
            micro.iter().map(Batch::tokens).sum()
        };
        if total == 0 {
            return Err(Error::Msg("the step has no unmasked tokens".into()));
        }
        let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut loss_sum = 0f64;
        for b in micro {
            let dev = self.model.device();
            let logits = self.model.forward_masked(&b.ids_tensor(dev)?, b.mask_tensor(dev)?.as_ref(), mode)?;
            let l = causal_lm_loss(&logits, &b.labels)?;
            if l.tokens == 0 {
                continue;
            }
            loss_sum += l.sum.to_scalar::<f32>()? as f64;
            let denom = if self.faults.per_microbatch_mean { (l.tokens * micro.len()) as f64 } else { total as f64 };
            let g = (l.sum / denom)?.backward()?;
            for (name, var) in &self.params {
                if let Some(gv) = g.get(var.as_tensor()) {
                    let gv = gv.to_dtype(DType::F32)?;
                    let acc = match grads.remove(name) {
                        Some(prev) => (prev + gv)?,
                        None => gv,
                    };
                    grads.insert(name.clone(), acc);
                }
            }
        }
        Ok((grads, loss_sum / total as f64, total))
    }

    /// One optimizer step over `micro` (its micro-batches are accumulated).
    pub fn train_step(&mut self, micro: &[Batch]) -> Result<StepReport> {
        self.step_scaled(micro, 1.0)
    }

    fn step_scaled(&mut self, micro: &[Batch], scale: f64) -> Result<StepReport> {
        let (mut grads, loss, tokens) = self.gradients(micro, Mode::Train)?;
        if scale != 1.0 {
            for g in grads.values_mut() {
                *g = (&*g * scale)?;
            }
        }
        if !loss.is_finite() {
            return Err(Error::NonFinite { what: "loss", value: loss, step: self.opt.step });
        }
        let grad_norm = match self.cfg.max_grad_norm {
            Some(m) => clip(&mut grads, m)?,
            None => crate::train::optim::global_norm(&grads)?,
        };
        if !grad_norm.is_finite() {
            return Err(Error::NonFinite { what: "gradient norm", value: grad_norm, step: self.opt.step });
        }
        let scheduled = self.cfg.optim.lr * self.cfg.schedule.factor(self.schedule_step);
        let lr = self.carried_lr.take().unwrap_or(scheduled);
        self.opt.apply(&self.params, &grads, lr)?;
        self.schedule_step += 1;
        Ok(StepReport { loss, tokens, grad_norm, lr })
    }

    /// Token-weighted mean loss over `batches` in eval mode (no gradient).
    pub fn eval_loss(&self, batches: &[Batch]) -> Result<f64> {
        let (mut sum, mut n) = (0f64, 0usize);
        for b in batches {
            let dev = self.model.device();
            let logits = self.model.forward_masked(&b.ids_tensor(dev)?, b.mask_tensor(dev)?.as_ref(), Mode::Eval)?;
            let l = causal_lm_loss(&logits.detach(), &b.labels)?;
            sum += l.sum.to_scalar::<f32>()? as f64;
            n += l.tokens;
        }
        if n == 0 {
            return Err(Error::Msg("the eval set has no unmasked tokens".into()));
        }
        Ok(sum / n as f64)
    }

    /// Train for `cfg.epochs` passes over `train` (grouped into steps of `grad_accum`
    /// micro-batches), evaluating on `eval` per the strategy. Asking for evaluation without
    /// eval data is an error, not a silent no-op.
    pub fn fit(&mut self, train: &[Batch], eval: &[Batch]) -> Result<History> {
        self.fit_until(train, eval, None)
    }

    /// [`RefTrainer::fit`], stopping after `max_steps` optimizer steps in this call (possibly
    /// in the middle of an epoch). A later call, on this trainer or on one loaded from its
    /// checkpoint, continues with the next window of the same epoch.
    pub fn fit_until(&mut self, train: &[Batch], eval: &[Batch], max_steps: Option<usize>) -> Result<History> {
        if self.cfg.eval != EvalStrategy::No && eval.is_empty() {
            return Err(Error::Msg("an eval strategy is set but the eval set is empty".into()));
        }
        let mut h = History::default();
        let start_epoch = self.epoch;
        let mut steps = 0;
        for epoch in start_epoch..self.cfg.epochs {
            if epoch > start_epoch && self.faults.reset_at_epoch {
                self.opt.reset();
            }
            if epoch > start_epoch && self.faults.restart_schedule_at_epoch {
                self.schedule_step = 0;
            }
            let skip = if self.faults.resume_restarts_epoch { 0 } else { self.window_in_epoch };
            for (w, chunk) in train.chunks(self.cfg.grad_accum).enumerate().skip(skip) {
                if max_steps.is_some_and(|m| steps >= m) {
                    return Ok(h);
                }
                let short = chunk.len() < self.cfg.grad_accum && self.faults.partial_window_over_k;
                let scale = if short { chunk.len() as f64 / self.cfg.grad_accum as f64 } else { 1.0 };
                let r = self.step_scaled(chunk, scale)?;
                steps += 1;
                self.window_in_epoch = w + 1;
                h.train.push((self.opt.step, epoch, r.loss));
                if let EvalStrategy::Steps(n) = self.cfg.eval {
                    if n > 0 && self.opt.step.is_multiple_of(n) && !self.faults.skip_eval {
                        h.eval.push((self.opt.step, self.eval_loss(eval)?));
                    }
                }
            }
            self.epoch = epoch + 1;
            self.window_in_epoch = 0;
            if self.cfg.eval == EvalStrategy::Epoch && !self.faults.skip_eval {
                h.eval.push((self.opt.step, self.eval_loss(eval)?));
            }
        }
        Ok(h)
    }
}
