//! 4-bit quantization compatible with bitsandbytes: code tables, blockwise NF4/FP4 with
//! double quantization, and the reference dequantization.

pub mod blockwise;
pub mod codes;
pub mod kernels;

pub use blockwise::{quantize, Absmax, QuantType, Quantized4};
