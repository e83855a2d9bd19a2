//! Reading and writing checkpoints: safetensors files, Hugging Face model directories, and
//! the atomic writes every save goes through.

pub mod atomic;
pub mod bnb;
pub mod hf;
pub mod peft;
pub mod st;
