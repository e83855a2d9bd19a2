//! Training data: micro-batches and the ignore label, the fixture tokenizer, and a learnable
//! synthetic task with padded batches.

pub mod batch;
pub mod task;
pub mod tokenizer;

pub use batch::{Batch, IGNORE};
pub use task::SuccessorTask;
