//! The synthetic transformer: the building blocks, attention, MLP and decoder layer (each
//! loading itself with its adapters injected), the decoder stack for every family, the KV
//! cache, planted forward bugs and greedy generation.

pub mod attention;
pub mod cache;
pub mod decoder;
pub mod faults;
pub mod generate;
pub mod layers;
pub mod mlp;
pub mod transformer;

pub use cache::KvCache;
pub use decoder::DecoderLayer;
pub use faults::Faults;
pub use transformer::{Mode, Transformer};
