//! Training data: micro-batches and the ignore label, the fixture tokenizer, the tokenizer of a
//! synthetic vocabulary (written beside a checkpoint for the stacks that load one), and a
//! learnable synthetic task with padded batches.

pub mod batch;
pub mod task;
pub mod tokenizer;
pub mod vocab;

pub use batch::{Batch, IGNORE};
pub use task::SuccessorTask;
