//! Training: the masked causal-LM loss, AdamW with a schedule and clipping, and the
//! reference trainer (gradient accumulation by total token count, epochs, eval).

pub mod checkpoint;
pub mod loss;
pub mod optim;
pub mod trainer;
pub mod untrained;

pub use loss::{causal_lm_loss, IGNORE};
pub use trainer::{Batch, EvalStrategy, History, RefTrainer, StepReport, TrainConfig};
