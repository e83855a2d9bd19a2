//! Adapters, the parts the model injects as it loads: LoRA (rsLoRA, dropout, merge/unmerge) on
//! any projection and on the embeddings, over an f32/bf16 base or a frozen 4-bit base (QLoRA),
//! and the seeded dropout they share with the decoder.

pub mod dropout;
pub mod embed;
pub mod inject;
pub mod linear;
pub mod lora;
pub mod qlora;

pub use inject::{Bases, Inject, LoraValues, Params};
pub use linear::{Base, Linear, LoraPart};
pub use lora::{LoraConfig, LoraInit};
pub use qlora::{Quant4Linear, QuantConfig};
