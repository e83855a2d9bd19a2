//! Reading and writing checkpoints: safetensors files, Hugging Face model directories, and
//! the crash-safe saves every write goes through (with their manifest and fault points).

pub mod atomic;
pub mod bnb;
pub mod faults;
pub mod hf;
pub mod manifest;
pub mod peft;
pub mod st;
