//! How another framework uses tunecheck: implement `Trainer` for its own type (here a thin
//! wrapper, written with the public API only, as an outside crate would), make a factory value
//! from a build and a load function, and stamp every catalogue property with `conformance!` on
//! CPU and CUDA (skipped without a GPU).

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use tunecheck::subject::{factory, reference, Capabilities, FitPlan, Setup, Trainer};
use tunecheck::train::{Batch, History, RefTrainer, StepReport};
use tunecheck::Mode;

/// "Their" trainer: here backed by tunecheck's reference, behind the trait.
pub struct OutsideTrainer(RefTrainer);

fn build(setup: &Setup, device: &Device) -> tunecheck::Result<OutsideTrainer> {
    Ok(OutsideTrainer(reference(setup, device)?))
}

fn load(device: &Device, dir: &Path) -> tunecheck::Result<OutsideTrainer> {
    Ok(OutsideTrainer(tunecheck::train::checkpoint::load(device, dir)?))
}

impl Trainer for OutsideTrainer {
    fn logits(&self, ids: &Tensor, mode: Mode) -> tunecheck::Result<Tensor> {
        Trainer::logits(&self.0, ids, mode)
    }
    fn decode(&self, prompt: &Tensor, n: usize) -> tunecheck::Result<Vec<Vec<u32>>> {
        self.0.decode(prompt, n)
    }
    fn cached_logits(&self, ids: &Tensor, prefill: usize) -> tunecheck::Result<Option<Tensor>> {
        self.0.cached_logits(ids, prefill)
    }
    fn gradients(&self, micro: &[Batch]) -> tunecheck::Result<BTreeMap<String, Tensor>> {
        Trainer::gradients(&self.0, micro)
    }
    fn train_step(&mut self, micro: &[Batch]) -> tunecheck::Result<StepReport> {
        Trainer::train_step(&mut self.0, micro)
    }
    fn eval_loss(&self, batches: &[Batch]) -> tunecheck::Result<f64> {
        Trainer::eval_loss(&self.0, batches)
    }
    fn trainable(&self) -> Vec<(String, Tensor)> {
        Trainer::trainable(&self.0)
    }
    fn frozen(&self) -> Vec<(String, Tensor)> {
        Trainer::frozen(&self.0)
    }
    fn save(&self, dir: &Path) -> tunecheck::Result<()> {
        self.0.save(dir)
    }
    fn fit(&mut self, train: &[Batch], eval: &[Batch], plan: FitPlan) -> tunecheck::Result<History> {
        Trainer::fit(&mut self.0, train, eval, plan)
    }
}

tunecheck::conformance!(factory("outside", Capabilities::all(), build, load), devices = [cpu, cuda]);
