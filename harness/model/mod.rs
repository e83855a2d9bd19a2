//! The synthetic transformer: layers, the decoder stack for every family, the KV cache and
//! greedy generation.

pub mod cache;
pub mod generate;
pub mod layers;
pub mod transformer;

pub use cache::KvCache;
pub use transformer::{Faults, Mode, Transformer};
