//! Planted trainer bugs, each reproducing a reported failure, and [`Mutant`]: the reference
//! trainer with one of them planted, as a factory value that carries the bug through save and
//! load.

use candle_core::DType;

use crate::model::Faults;
use crate::spec::Family;
use crate::train::checkpoint::ReloadFaults;
use crate::train::trainer::TrainFaults;

/// A planted bug in a trainer, reproducing a reported failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainerBug {
    /// P1: an eval-only fast path with the wrong norm convention.
    EvalFastPathWrongNorm,
    /// P1: an eval-only fast path (its own function) that reads an unfilled hidden-state
    /// buffer, so the argmax collapses to one id (Llama 3.1 `model.eval()`).
    EvalPathCollapse,
    /// P2: frozen embeddings trained on data with untrained (zero-row) tokens, silently.
    IgnoreUntrained,
    /// P2: trainable zero rows left as they are, and RMSNorm without epsilon: 0/0 = NaN.
    ZeroRowsNormWithoutEps,
    /// P3: reload with transformers' default 4-bit config (fp4, no double quant).
    ReloadWithDefaultQuant,
    /// P3: reload with the recorded 4-bit config but bf16 compute whatever was recorded.
    ReloadComputeDtype,
    /// P3: reload the base in f32 whatever dtype its config records.
    ReloadBaseDtype,
    /// P3: the optimizer moments are not saved; a resumed run restarts Adam.
    OptimizerStateNotSaved,
    /// P3: a fit resumed mid-epoch starts the epoch again (the data position is lost).
    ResumeRestartsEpoch,
    /// P3: the scheduler is not restored on reload (the first step uses the carried lr).
    SchedulerNotRestored,
    /// P3: a save writes the adapter as it was built, not as trained.
    SaveInitialAdapter,
    /// P3: the dropout RNG's position is not restored on reload.
    RngNotRestored,
    /// P4: optimizer state reset at every epoch boundary.
    ResetAtEpoch,
    /// P4: learning-rate schedule restarted at every epoch boundary.
    ScheduleRestartAtEpoch,
    /// P4: the short last accumulation window of an epoch divided by the configured count.
    PartialWindowOverK,
    /// P4: eval skipped although asked for.
    SkipEval,
    /// P5: gradient accumulation normalised per micro-batch (the 2024 bug).
    PerMicroBatchMean,
    /// P10: tokens counted before the causal shift, in every path alike.
    TokensBeforeShift,
    /// P10: the configured weight decay is ignored.
    WeightDecayDropped,
    /// P10: weight decay 0 configured, torch's AdamW default 0.01 applied.
    WeightDecayDefault,
    /// P13: dropout active in eval mode.
    EvalKeepsDropout,
    /// P13: no dropout in train mode.
    TrainIgnoresDropout,
    /// P8: candle's fused RMSNorm (no backward) everywhere in the training path.
    FusedRmsNorm,
    /// P8: a fused norm without backward in the last decoder layer only.
    FusedLastLayerNorms,
    /// P8: Gemma 3's q/k norms fused without backward.
    FusedQkNorms,
    /// P11: master weights (and so the updates) held in bf16.
    HalfPrecisionMaster,
    /// P12: RMSNorm's `mean(x²)` in fp16, which overflows on Gemma-sized activations.
    NormVarianceInHalf,
}

impl TrainerBug {
    /// Every trainer bug.
    pub const ALL: [TrainerBug; 27] = [
        TrainerBug::EvalFastPathWrongNorm,
        TrainerBug::EvalPathCollapse,
        TrainerBug::IgnoreUntrained,
        TrainerBug::ZeroRowsNormWithoutEps,
        TrainerBug::ReloadWithDefaultQuant,
        TrainerBug::ReloadComputeDtype,
        TrainerBug::ReloadBaseDtype,
        TrainerBug::OptimizerStateNotSaved,
        TrainerBug::ResumeRestartsEpoch,
        TrainerBug::SchedulerNotRestored,
        TrainerBug::SaveInitialAdapter,
        TrainerBug::RngNotRestored,
        TrainerBug::ResetAtEpoch,
        TrainerBug::ScheduleRestartAtEpoch,
        TrainerBug::PartialWindowOverK,
        TrainerBug::SkipEval,
        TrainerBug::PerMicroBatchMean,
        TrainerBug::TokensBeforeShift,
        TrainerBug::WeightDecayDropped,
        TrainerBug::WeightDecayDefault,
        TrainerBug::EvalKeepsDropout,
        TrainerBug::TrainIgnoresDropout,
        TrainerBug::FusedRmsNorm,
        TrainerBug::FusedLastLayerNorms,
        TrainerBug::FusedQkNorms,
        TrainerBug::HalfPrecisionMaster,
        TrainerBug::NormVarianceInHalf,
    ];

    /// Short id.
    pub fn name(self) -> &'static str {
        match self {
            TrainerBug::EvalFastPathWrongNorm => "eval_fast_path_wrong_norm",
            TrainerBug::EvalPathCollapse => "eval_fast_path_collapse",
            TrainerBug::IgnoreUntrained => "frozen_embeddings_untrained_tokens",
            TrainerBug::ZeroRowsNormWithoutEps => "zero_rows_norm_without_eps",
            TrainerBug::ReloadWithDefaultQuant => "reload_with_default_quant",
            TrainerBug::ReloadComputeDtype => "reload_ignores_compute_dtype",
            TrainerBug::ReloadBaseDtype => "reload_ignores_base_dtype",
            TrainerBug::OptimizerStateNotSaved => "optimizer_state_not_saved",
            TrainerBug::ResumeRestartsEpoch => "resume_restarts_epoch",
            TrainerBug::SchedulerNotRestored => "scheduler_not_restored",
            TrainerBug::SaveInitialAdapter => "save_writes_initial_adapter",
            TrainerBug::RngNotRestored => "dropout_rng_not_restored",
            TrainerBug::ResetAtEpoch => "optimizer_reset_at_epoch",
            TrainerBug::ScheduleRestartAtEpoch => "schedule_restart_at_epoch",
            TrainerBug::PartialWindowOverK => "short_window_over_k",
            TrainerBug::SkipEval => "eval_skipped",
            TrainerBug::PerMicroBatchMean => "per_microbatch_mean",
            TrainerBug::TokensBeforeShift => "tokens_before_shift",
            TrainerBug::WeightDecayDropped => "weight_decay_dropped",
            TrainerBug::WeightDecayDefault => "weight_decay_torch_default",
            TrainerBug::EvalKeepsDropout => "eval_keeps_dropout",
            TrainerBug::TrainIgnoresDropout => "train_ignores_dropout",
            TrainerBug::FusedRmsNorm => "fused_rms_norm_no_backward",
            TrainerBug::FusedLastLayerNorms => "fused_norm_one_layer",
            TrainerBug::FusedQkNorms => "fused_qk_norms_gemma3",
            TrainerBug::HalfPrecisionMaster => "half_precision_master",
            TrainerBug::NormVarianceInHalf => "fp16_norm_variance_overflow",
        }
    }

    /// The real-world bug it reproduces.
    pub fn description(self) -> &'static str {
        match self {
            TrainerBug::EvalFastPathWrongNorm => "eval-only fast path with the wrong RMSNorm convention",
            TrainerBug::EvalPathCollapse => {
                "eval-only fast path reads an unfilled buffer: argmax collapses to one id (Llama 3.1 model.eval())"
            }
            TrainerBug::IgnoreUntrained => {
                "frozen embeddings trained on untrained (zero-row) tokens without refusing or fixing"
            }
            TrainerBug::ZeroRowsNormWithoutEps => "trainable zero rows kept, RMSNorm without epsilon: NaN at step 0",
            TrainerBug::ReloadWithDefaultQuant => {
                "reload with transformers' default 4-bit config (fp4, no double quant)"
            }
            TrainerBug::ReloadComputeDtype => "reload ignores the recorded bnb_4bit_compute_dtype (bf16 always)",
            TrainerBug::ReloadBaseDtype => "reload loads the base in f32 whatever torch_dtype was saved",
            TrainerBug::OptimizerStateNotSaved => "checkpoint without optimizer moments: resume restarts Adam",
            TrainerBug::ResumeRestartsEpoch => "resume from a mid-epoch checkpoint repeats the epoch's first batches",
            TrainerBug::SchedulerNotRestored => {
                "scheduler not restored on reload: the first step uses the carried lr, then the schedule restarts"
            }
            TrainerBug::SaveInitialAdapter => "save writes the adapter as initialised (a stale state dict), not as trained",
            TrainerBug::RngNotRestored => "dropout RNG not restored on reload: the continuation redraws the first masks",
            TrainerBug::ResetAtEpoch => "optimizer state reset at the epoch boundary (the 0.07 -> 4.83 spike)",
            TrainerBug::ScheduleRestartAtEpoch => "learning-rate schedule restarted at every epoch (warmup again)",
            TrainerBug::PartialWindowOverK => {
                "short last accumulation window divided by gradient_accumulation_steps, not its own tokens"
            }
            TrainerBug::SkipEval => "eval strategy set, eval never runs",
            TrainerBug::PerMicroBatchMean => "gradient accumulation normalised per micro-batch (the 2024 bug)",
            TrainerBug::TokensBeforeShift => {
                "loss normalised by the tokens counted before the causal shift (position 0 included), alike in every path"
            }
            TrainerBug::WeightDecayDropped => "the optimizer ignores the configured weight decay",
            TrainerBug::WeightDecayDefault => "weight_decay 0 configured, torch AdamW's default 0.01 applied",
            TrainerBug::EvalKeepsDropout => "LoRA dropout active in eval mode (a module left in train mode)",
            TrainerBug::TrainIgnoresDropout => "LoRA dropout configured but never applied in train mode",
            TrainerBug::FusedRmsNorm => "fused rms_norm without backward in the training path",
            TrainerBug::FusedLastLayerNorms => {
                "fused rms_norm without backward in one layer: wrong, non-zero gradients"
            }
            TrainerBug::FusedQkNorms => "Gemma 3 q/k norms fused without backward",
            TrainerBug::HalfPrecisionMaster => "bf16 master weights: small updates round away (constant eval loss)",
            TrainerBug::NormVarianceInHalf => "RMSNorm squares fp16 activations: Gemma's scaled activations overflow",
        }
    }

    /// The property that must catch it.
    pub fn caught_by(self) -> &'static str {
        match self {
            TrainerBug::EvalFastPathWrongNorm | TrainerBug::EvalPathCollapse => "P1",
            TrainerBug::IgnoreUntrained => "P14",
            TrainerBug::ZeroRowsNormWithoutEps => "P2",
            TrainerBug::ReloadWithDefaultQuant
            | TrainerBug::ReloadComputeDtype
            | TrainerBug::ReloadBaseDtype
            | TrainerBug::OptimizerStateNotSaved
            | TrainerBug::ResumeRestartsEpoch
            | TrainerBug::SchedulerNotRestored
            | TrainerBug::SaveInitialAdapter
            | TrainerBug::RngNotRestored => "P3",
            TrainerBug::ResetAtEpoch
            | TrainerBug::ScheduleRestartAtEpoch
            | TrainerBug::PartialWindowOverK
            | TrainerBug::SkipEval => "P4",
            TrainerBug::PerMicroBatchMean => "P5",
            TrainerBug::TokensBeforeShift | TrainerBug::WeightDecayDropped | TrainerBug::WeightDecayDefault => "P10",
            TrainerBug::EvalKeepsDropout | TrainerBug::TrainIgnoresDropout => "P13",
            TrainerBug::FusedRmsNorm | TrainerBug::FusedLastLayerNorms | TrainerBug::FusedQkNorms => "P8",
            TrainerBug::HalfPrecisionMaster => "P11",
            TrainerBug::NormVarianceInHalf => "P12",
        }
    }

    /// The clause of [`TrainerBug::caught_by`] it must trip (`None`: any).
    pub fn code(self) -> Option<&'static str> {
        Some(match self {
            TrainerBug::EvalFastPathWrongNorm => "train_eval_differ",
            TrainerBug::EvalPathCollapse => "collapse",
            TrainerBug::IgnoreUntrained => "not_fixed",
            TrainerBug::ZeroRowsNormWithoutEps => "non_finite",
            TrainerBug::ReloadWithDefaultQuant | TrainerBug::ReloadComputeDtype | TrainerBug::ReloadBaseDtype => {
                "logits_differ"
            }
            TrainerBug::OptimizerStateNotSaved => "resume_differs",
            TrainerBug::ResumeRestartsEpoch => "resume_mid_epoch",
            TrainerBug::SchedulerNotRestored | TrainerBug::RngNotRestored => "resume_differs",
            TrainerBug::SaveInitialAdapter => "logits_differ",
            TrainerBug::ResetAtEpoch | TrainerBug::ScheduleRestartAtEpoch | TrainerBug::PartialWindowOverK => {
                "epoch_boundary"
            }
            TrainerBug::SkipEval => "eval_missing",
            TrainerBug::PerMicroBatchMean => "accumulation_mismatch",
            TrainerBug::TokensBeforeShift => "token_count",
            TrainerBug::WeightDecayDropped | TrainerBug::WeightDecayDefault => "update_mismatch",
            TrainerBug::EvalKeepsDropout => "eval_dropout",
            TrainerBug::TrainIgnoresDropout => "dropout_inactive",
            TrainerBug::FusedLastLayerNorms => "gradient_mismatch",
            TrainerBug::FusedRmsNorm | TrainerBug::FusedQkNorms => return None,
            TrainerBug::HalfPrecisionMaster => "stall",
            TrainerBug::NormVarianceInHalf => return None,
        })
    }

    /// The only adapter kinds where the bug exists, when it is specific to some (a 4-bit
    /// reload bug needs a 4-bit base).
    pub fn kinds(self) -> Option<Vec<crate::strategy::AdapterKind>> {
        match self {
            TrainerBug::ReloadWithDefaultQuant | TrainerBug::ReloadComputeDtype | TrainerBug::ReloadBaseDtype => {
                Some(vec![crate::strategy::AdapterKind::QLora])
            }
            _ => None,
        }
    }

    /// The setups where the bug exists, when it needs more than any. A fused norm in the last
    /// layer gives wrong-but-non-zero gradients only where a layer precedes it and the layer's
    /// own projections still get a gradient: with Gemma 2/3's norms after attention and the
    /// MLP, it cuts the last layer's projections off entirely (no gradient: the
    /// `fused_rms_norm_no_backward` mutant's symptom). Reloading with bf16 compute changes
    /// nothing where the recorded compute dtype is bf16, nor in a bf16 model computing in f32
    /// (the inputs and weights are bf16 values already, and the f32 product is rounded to
    /// bf16 either way). An RNG position matters only where dropout draws from it.
    pub fn precondition(self) -> Option<fn(&crate::subject::Setup) -> bool> {
        match self {
            TrainerBug::FusedLastLayerNorms => Some(|s| s.spec.num_layers >= 2 && !s.spec.family.has_sandwich_norms()),
            // Without dropout no mask is drawn, so no RNG position matters.
            TrainerBug::RngNotRestored => Some(|s| s.lora.dropout > 0.0),
            TrainerBug::ReloadComputeDtype => Some(|s| {
                s.quant.is_some_and(|q| {
                    q.compute_dtype != DType::BF16 && !(s.spec.dtype == DType::BF16 && q.compute_dtype == DType::F32)
                })
            }),
            _ => None,
        }
    }

    /// The only family where the bug exists, when it is specific to one.
    pub fn family(self) -> Option<Family> {
        match self {
            TrainerBug::FusedQkNorms => Some(Family::Gemma3),
            _ => None,
        }
    }

    fn model_faults(self) -> Faults {
        match self {
            TrainerBug::EvalFastPathWrongNorm => Faults { eval_path_wrong_norm: true, ..Faults::default() },
            TrainerBug::EvalPathCollapse => Faults { eval_path_unfilled_buffer: true, ..Faults::default() },
            TrainerBug::ZeroRowsNormWithoutEps => Faults { norm_without_eps: true, ..Faults::default() },
            TrainerBug::FusedRmsNorm => Faults { fused_rms_norm: true, ..Faults::default() },
            TrainerBug::FusedLastLayerNorms => Faults { fused_last_layer_norms: true, ..Faults::default() },
            TrainerBug::FusedQkNorms => Faults { fused_qk_norms: true, ..Faults::default() },
            TrainerBug::NormVarianceInHalf => Faults { norm_variance_in_half: true, ..Faults::default() },
            TrainerBug::EvalKeepsDropout => Faults { eval_keeps_dropout: true, ..Faults::default() },
            TrainerBug::TrainIgnoresDropout => Faults { train_ignores_dropout: true, ..Faults::default() },
            _ => Faults::default(),
        }
    }

    fn train_faults(self) -> TrainFaults {
        let mut f = TrainFaults::default();
        match self {
            TrainerBug::IgnoreUntrained => f.ignore_untrained = true,
            TrainerBug::ZeroRowsNormWithoutEps => f.keep_zero_rows = true,
            TrainerBug::OptimizerStateNotSaved => f.skip_optimizer_state = true,
            TrainerBug::ResumeRestartsEpoch => f.resume_restarts_epoch = true,
            TrainerBug::ResetAtEpoch => f.reset_at_epoch = true,
            TrainerBug::ScheduleRestartAtEpoch => f.restart_schedule_at_epoch = true,
            TrainerBug::PartialWindowOverK => f.partial_window_over_k = true,
            TrainerBug::SkipEval => f.skip_eval = true,
            TrainerBug::PerMicroBatchMean => f.per_microbatch_mean = true,
            TrainerBug::TokensBeforeShift => f.tokens_before_shift = true,
            TrainerBug::WeightDecayDropped => f.drop_weight_decay = true,
            TrainerBug::WeightDecayDefault => f.default_weight_decay = true,
            TrainerBug::SchedulerNotRestored => f.schedule_not_restored = true,
            TrainerBug::SaveInitialAdapter => f.save_initial_adapter = true,
            TrainerBug::RngNotRestored => f.rng_not_restored = true,
            _ => {}
        }
        f
    }

    fn reload_faults(self) -> ReloadFaults {
        match self {
            TrainerBug::ReloadWithDefaultQuant => {
                ReloadFaults { quant: Some(crate::adapt::QuantConfig::transformers_defaults()), ..Default::default() }
            }
            TrainerBug::ReloadComputeDtype => ReloadFaults { compute_dtype: Some(DType::BF16), ..Default::default() },
            TrainerBug::ReloadBaseDtype => ReloadFaults { base_dtype: Some(DType::F32), ..Default::default() },
            _ => ReloadFaults::default(),
        }
    }
}

/// A trainer mutant as a factory value: the reference with `bug` planted at build and at
/// load (the bug travels in the value, not in the checkpoint).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mutant(pub TrainerBug);

impl crate::subject::Factory for Mutant {
    fn name(&self) -> String {
        format!("mutant/{}", self.0.name())
    }
    fn replay_args(&self) -> Option<String> {
        Some(format!("--mutant {}", self.0.name()))
    }
    fn capabilities(&self) -> crate::subject::Capabilities {
        crate::subject::Capabilities::all()
    }
    fn build(
        &self,
        setup: &crate::subject::Setup,
        device: &candle_core::Device,
    ) -> crate::Result<Box<dyn crate::subject::Trainer>> {
        let mut cfg = setup.train.clone();
        if self.0 == TrainerBug::HalfPrecisionMaster {
            cfg.master_dtype = DType::BF16;
        }
        let weights: crate::weights::Weights =
            setup.weights.iter().map(|(k, t)| Ok((k.clone(), t.to_device(device)?))).collect::<crate::Result<_>>()?;
        let mut tr = crate::train::RefTrainer::build(
            &setup.spec,
            &weights,
            &setup.lora,
            setup.quant,
            cfg,
            setup.adapter_seed,
            self.0.train_faults(),
        )?;
        tr.model_mut().set_faults(self.0.model_faults());
        Ok(Box::new(tr))
    }
    fn load(
        &self,
        device: &candle_core::Device,
        dir: &std::path::Path,
    ) -> crate::Result<Box<dyn crate::subject::Trainer>> {
        let mut tr = crate::train::checkpoint::load_with(device, dir, self.0.train_faults(), self.0.reload_faults())?;
        tr.model_mut().set_faults(self.0.model_faults());
        Ok(Box::new(tr))
    }
}
