//! Training: the masked causal-LM loss, AdamW with a schedule and clipping, and the
//! reference trainer (gradient accumulation by total token count, epochs, eval).

pub mod checkpoint;
pub mod loss;
pub mod optim;
pub mod trainer;
pub mod untrained;

pub use crate::data::batch::{Batch, IGNORE};
pub use loss::causal_lm_loss;
pub use trainer::{EvalStrategy, History, RefTrainer, StepReport, TrainConfig};
