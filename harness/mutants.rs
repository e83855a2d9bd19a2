//! Planted-bug subjects ("mutants"): each reproduces a real-world bug and names the property
//! that must catch it. A property that no mutant fails is not done.

use crate::model::Faults;
use crate::spec::Family;
use crate::suite::ModelProperty;

/// One planted bug and the property that must fail on it.
#[derive(Debug, Clone, Copy)]
pub struct Mutant {
    /// Short id.
    pub name: &'static str,
    /// The real-world bug it reproduces.
    pub bug: &'static str,
    /// The faults planted in the reference model.
    pub faults: Faults,
    /// The property that must catch it.
    pub caught_by: ModelProperty,
    /// The family it is run on (some bugs only exist where the feature does, e.g. windows).
    pub family: Family,
}

/// The mutants of the forward-pass properties.
pub fn forward_mutants() -> Vec<Mutant> {
    vec![
        Mutant {
            name: "eval_fast_path_wrong_norm",
            bug: "separate eval-only path with the wrong RMSNorm convention (Llama 3.1 model.eval() collapse)",
            faults: Faults { eval_path_wrong_norm: true, ..Faults::default() },
            caught_by: ModelProperty::Deterministic,
            family: Family::Gemma,
        },
        Mutant {
            name: "mask_leaks_next_token",
            bug: "causal mask off by one: each position attends the next token",
            faults: Faults { mask_leaks_next_token: true, ..Faults::default() },
            caught_by: ModelProperty::Causal,
            family: Family::Llama,
        },
        Mutant {
            name: "cache_restarts_positions",
            bug: "KV-cache decode restarts rope positions at 0 for every new token",
            faults: Faults { cache_restarts_positions: true, ..Faults::default() },
            caught_by: ModelProperty::KvCache,
            family: Family::Llama,
        },
        Mutant {
            name: "cache_ignores_window",
            bug: "KV-cache decode attends beyond the sliding window (Gemma 2/3 local layers)",
            faults: Faults { cache_ignores_window: true, ..Faults::default() },
            caught_by: ModelProperty::KvCache,
            family: Family::Gemma2,
        },
    ]
}

/// A planted bug in a trainer, reproducing a reported failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrainerBug {
    /// P1: an eval-only fast path with the wrong norm convention (Llama 3.1 `model.eval()`).
    EvalFastPathWrongNorm,
    /// P3: reload with transformers' default 4-bit config (fp4, no double quant) instead of
    /// the recorded one, ignoring the record (the QLoRA Gemma save/reload drift).
    ReloadWithDefaultQuant,
    /// P5: gradient accumulation normalised per micro-batch (the 2024 bug).
    PerMicroBatchMean,
    /// P8: candle's fused RMSNorm (no backward) in the training path.
    FusedRmsNorm,
    /// P2: frozen embeddings trained on data with untrained (zero-row) tokens, silently.
    IgnoreUntrained,
    /// P4: optimizer state reset at every epoch boundary.
    ResetAtEpoch,
}

impl TrainerBug {
    /// Every trainer bug.
    pub const ALL: [TrainerBug; 6] = [
        TrainerBug::EvalFastPathWrongNorm,
        TrainerBug::IgnoreUntrained,
        TrainerBug::ReloadWithDefaultQuant,
        TrainerBug::ResetAtEpoch,
        TrainerBug::PerMicroBatchMean,
        TrainerBug::FusedRmsNorm,
    ];

    /// Short id.
    pub fn name(self) -> &'static str {
        match self {
            TrainerBug::EvalFastPathWrongNorm => "eval_fast_path_wrong_norm",
            TrainerBug::ReloadWithDefaultQuant => "reload_with_default_quant",
            TrainerBug::PerMicroBatchMean => "per_microbatch_mean",
            TrainerBug::FusedRmsNorm => "fused_rms_norm_no_backward",
            TrainerBug::IgnoreUntrained => "frozen_embeddings_untrained_tokens",
            TrainerBug::ResetAtEpoch => "optimizer_reset_at_epoch",
        }
    }

    /// The real-world bug it reproduces.
    pub fn description(self) -> &'static str {
        match self {
            TrainerBug::EvalFastPathWrongNorm => {
                "eval-only fast path with the wrong norm (Llama 3.1 model.eval() collapse)"
            }
            TrainerBug::ReloadWithDefaultQuant => {
                "reload with transformers' default 4-bit config (fp4, no double quant)"
            }
            TrainerBug::PerMicroBatchMean => "gradient accumulation normalised per micro-batch (the 2024 bug)",
            TrainerBug::FusedRmsNorm => "fused rms_norm without backward in the training path",
            TrainerBug::IgnoreUntrained => {
                "frozen embeddings trained on untrained (zero-row) tokens without refusing or fixing"
            }
            TrainerBug::ResetAtEpoch => "optimizer state reset at the epoch boundary (the 0.07 -> 4.83 spike)",
        }
    }

    /// The property that must catch it.
    pub fn caught_by(self) -> &'static str {
        match self {
            TrainerBug::EvalFastPathWrongNorm => "P1",
            TrainerBug::ReloadWithDefaultQuant => "P3",
            TrainerBug::PerMicroBatchMean => "P5",
            TrainerBug::FusedRmsNorm => "P8",
            TrainerBug::IgnoreUntrained => "P2",
            TrainerBug::ResetAtEpoch => "P4",
        }
    }
}

/// The reference trainer with one planted bug.
pub struct MutantTrainer {
    inner: crate::train::RefTrainer,
    bug: TrainerBug,
}

impl MutantTrainer {
    /// Build the reference from `setup` and plant `bug`.
    pub fn new(setup: &crate::subject::Setup, device: &candle_core::Device, bug: TrainerBug) -> crate::Result<Self> {
        let mut inner = crate::subject::reference(setup, device)?;
        match bug {
            TrainerBug::EvalFastPathWrongNorm => {
                inner.model_mut().set_faults(Faults { eval_path_wrong_norm: true, ..Faults::default() })
            }
            TrainerBug::FusedRmsNorm => {
                inner.model_mut().set_faults(Faults { fused_rms_norm: true, ..Faults::default() })
            }
            TrainerBug::PerMicroBatchMean => {
                inner = inner
                    .with_faults(crate::train::trainer::TrainFaults { per_microbatch_mean: true, ..Default::default() })
            }
            TrainerBug::IgnoreUntrained => {
                inner = inner
                    .with_faults(crate::train::trainer::TrainFaults { ignore_untrained: true, ..Default::default() })
            }
            TrainerBug::ResetAtEpoch => {
                inner =
                    inner.with_faults(crate::train::trainer::TrainFaults { reset_at_epoch: true, ..Default::default() })
            }
            TrainerBug::ReloadWithDefaultQuant => {}
        }
        Ok(MutantTrainer { inner, bug })
    }
}

/// A factory for mutant `bug`, usable wherever a subject factory is.
pub fn factory(
    bug: TrainerBug,
) -> impl Fn(&crate::subject::Setup, &candle_core::Device) -> crate::Result<MutantTrainer> {
    move |setup, device| MutantTrainer::new(setup, device, bug)
}

impl crate::subject::Trainer for MutantTrainer {
    fn capabilities(&self) -> crate::subject::Capabilities {
        self.inner.capabilities()
    }
    fn logits(&self, ids: &candle_core::Tensor, mode: crate::Mode) -> crate::Result<candle_core::Tensor> {
        crate::subject::Trainer::logits(&self.inner, ids, mode)
    }
    fn decode(&self, prompt: &candle_core::Tensor, n: usize) -> crate::Result<Vec<Vec<u32>>> {
        self.inner.decode(prompt, n)
    }
    fn cached_logits(&self, ids: &candle_core::Tensor, prefill: usize) -> crate::Result<Option<candle_core::Tensor>> {
        self.inner.cached_logits(ids, prefill)
    }
    fn gradients(
        &self,
        micro: &[crate::train::Batch],
    ) -> crate::Result<std::collections::BTreeMap<String, candle_core::Tensor>> {
        crate::subject::Trainer::gradients(&self.inner, micro)
    }
    fn train_step(&mut self, micro: &[crate::train::Batch]) -> crate::Result<crate::train::StepReport> {
        crate::subject::Trainer::train_step(&mut self.inner, micro)
    }
    fn eval_loss(&self, batches: &[crate::train::Batch]) -> crate::Result<f64> {
        crate::subject::Trainer::eval_loss(&self.inner, batches)
    }
    fn trainable(&self) -> Vec<(String, candle_core::Tensor)> {
        self.inner.trainable()
    }
    fn fit(
        &mut self,
        train: &[crate::train::Batch],
        eval: &[crate::train::Batch],
        epochs: usize,
    ) -> crate::Result<crate::train::History> {
        crate::subject::Trainer::fit(&mut self.inner, train, eval, epochs)
    }
    fn frozen(&self) -> Vec<(String, candle_core::Tensor)> {
        self.inner.frozen()
    }
    fn save(&self, dir: &std::path::Path) -> crate::Result<()> {
        self.inner.save(dir)?;
        record_bug(dir, self.bug)
    }
    fn load(setup: &crate::subject::Setup, device: &candle_core::Device, dir: &std::path::Path) -> crate::Result<Self> {
        // Only this mutant's load differs; the others reload like the reference (their bug
        // is elsewhere), which this signature cannot know: the bug rides in a side file.
        let bug = read_bug(dir).unwrap_or(TrainerBug::EvalFastPathWrongNorm);
        if bug != TrainerBug::ReloadWithDefaultQuant {
            let mut m = MutantTrainer::new(setup, device, bug)?;
            crate::train::checkpoint::resume(&mut m.inner, dir)?;
            return Ok(m);
        }
        let mut wrong = setup.clone();
        wrong.quant = Some(crate::adapt::QuantConfig::transformers_defaults());
        let inner = crate::subject::reference(&wrong, device)?;
        let a = crate::io::peft::read(dir)?;
        crate::adapt::attach::load_values(inner.params(), &a.tensors, "adapter")?;
        Ok(MutantTrainer { inner, bug })
    }
}

const BUG_FILE: &str = "tunecheck_mutant.txt";

fn read_bug(dir: &std::path::Path) -> Option<TrainerBug> {
    let s = std::fs::read_to_string(dir.join(BUG_FILE)).ok()?;
    TrainerBug::ALL.into_iter().find(|b| b.name() == s.trim())
}

impl MutantTrainer {
    /// The planted bug.
    pub fn bug(&self) -> TrainerBug {
        self.bug
    }
}

/// Save hook: mutants record which bug they carry so `load` can rebuild the same mutant.
pub fn record_bug(dir: &std::path::Path, bug: TrainerBug) -> crate::Result<()> {
    crate::io::atomic::write_atomic(&dir.join(BUG_FILE), bug.name().as_bytes())
}

/// Planted bugs in 4-bit kernels, each caught by P9 (`props::p9_kernels`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelBug {
    /// The SIMD loop handles whole 16-lane chunks and forgets the remainder of each row.
    DroppedTail,
    /// Each weight row uses its first block's scale for every block (a per-row scale cache
    /// that is never refreshed).
    StaleRowScale,
    /// The bf16/f16 compute path multiplies the f32 weights, skipping the casts to the
    /// original and compute dtypes (a fast path that is not the function being trained).
    UnroundedWeights,
}

impl KernelBug {
    /// Every kernel mutant.
    pub const ALL: [KernelBug; 3] = [KernelBug::DroppedTail, KernelBug::StaleRowScale, KernelBug::UnroundedWeights];

    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            KernelBug::DroppedTail => "dropped-tail",
            KernelBug::StaleRowScale => "stale-row-scale",
            KernelBug::UnroundedWeights => "unrounded-weights",
        }
    }

    /// The real-world bug it reproduces.
    pub fn description(self) -> &'static str {
        match self {
            KernelBug::DroppedTail => "SIMD loop forgets the last <16 columns of each row",
            KernelBug::StaleRowScale => "a row's first block scale reused for all its blocks",
            KernelBug::UnroundedWeights => "bf16/f16 compute multiplies unrounded f32 weights",
        }
    }

    /// The weight this mutant computes with (row-major), from the reference decode.
    fn weights(self, v: &crate::quant::kernels::Q4View) -> Vec<f32> {
        let mut w = vec![0f32; v.numel()];
        self.dequantize_into(v, &mut w);
        for o in 0..v.rows {
            let row = &mut w[o * v.cols..(o + 1) * v.cols];
            match self {
                KernelBug::DroppedTail => {
                    let keep = row.len() / 16 * 16;
                    row[keep..].iter_mut().for_each(|x| *x = 0.0);
                }
                KernelBug::UnroundedWeights => {}
                KernelBug::StaleRowScale => {
                    let first = v.scales[(o * v.cols) / v.blocksize];
                    for (i, x) in row.iter_mut().enumerate() {
                        let s = v.scales[(o * v.cols + i) / v.blocksize];
                        if s != 0.0 {
                            *x = *x / s * first;
                        }
                    }
                }
            }
        }
        w
    }

    /// The decode this mutant sees: correct, but for the skipped casts.
    fn dequantize_into(self, v: &crate::quant::kernels::Q4View, out: &mut [f32]) {
        let v = match self {
            KernelBug::UnroundedWeights => v.with_rounding(crate::quant::kernels::Rounding::NONE),
            _ => *v,
        };
        crate::quant::kernels::dequantize_f32_into(&v, crate::quant::kernels::Isa::Scalar, out).expect("sizes match");
    }
}

impl crate::props::p9_kernels::Q4Kernels for KernelBug {
    fn name(&self) -> String {
        format!("mutant/{}", KernelBug::name(*self))
    }
    fn dequantize(&self, v: &crate::quant::kernels::Q4View, out: &mut [f32]) {
        self.dequantize_into(v, out);
    }
    fn matmul_nt(&self, v: &crate::quant::kernels::Q4View, x: &[f32], m: usize, y: &mut [f32]) {
        let w = self.weights(v);
        for mi in 0..m {
            for o in 0..v.rows {
                y[mi * v.rows + o] =
                    (0..v.cols).map(|i| x[mi * v.cols + i] as f64 * w[o * v.cols + i] as f64).sum::<f64>() as f32;
            }
        }
    }
    fn matmul_nn(&self, v: &crate::quant::kernels::Q4View, g: &[f32], m: usize, dx: &mut [f32]) {
        let w = self.weights(v);
        for mi in 0..m {
            for i in 0..v.cols {
                dx[mi * v.cols + i] =
                    (0..v.rows).map(|o| g[mi * v.rows + o] as f64 * w[o * v.cols + i] as f64).sum::<f64>() as f32;
            }
        }
    }
}
