//! Training data: the fixture tokenizer and a learnable synthetic task with padded batches.

pub mod task;
pub mod tokenizer;

pub use task::SuccessorTask;
