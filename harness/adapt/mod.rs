//! Adapters over the base model: LoRA (rsLoRA, dropout, merge/unmerge) on any projection and
//! on the embeddings, over an f32/bf16 base or a frozen 4-bit base (QLoRA).

pub mod attach;
pub mod linear;
pub mod lora;
pub mod qlora;

pub use linear::{Base, Linear, LoraPart};
pub use lora::{LoraConfig, LoraInit};
pub use qlora::{Quant4Linear, QuantConfig};
