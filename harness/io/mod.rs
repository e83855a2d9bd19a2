//! Reading and writing checkpoints: safetensors files, Hugging Face model directories, and
//! the crash-safe saves every write goes through (with their manifest and fault points).

pub mod atomic;
pub mod bnb;
pub mod config;
pub mod faults;
pub mod fields;
pub mod hf;
pub mod layout;
pub mod manifest;
pub mod peft;
pub mod quantize;
pub mod scratch;
pub mod st;
