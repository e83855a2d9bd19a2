//! Fast 4-bit kernels: dequantize, and the fused 4-bit matrix products QLoRA runs on, for the
//! CPU (AVX-512, AVX2+FMA, portable) and CUDA (behind the `cuda` feature). The reference
//! [`crate::quant::Quantized4::dequantize`] stays the oracle they are tested against.
//!
//! Numerics are part of the contract, so goldens hold on every machine:
//! - a decoded weight is `round(code[q] · absmax[block])`, where `round` is the view's
//!   [`Rounding`] (none, or the casts to the original and compute dtypes that bitsandbytes
//!   applies): **bitwise equal** to the reference cast with `half` on every instruction set;
//!   bf16 output rounds to nearest even, as `half` does;
//! - the fused products accumulate in a fixed order that every instruction set reproduces
//!   bit for bit (four chains of 16 lanes with fused multiply-adds, a fixed reduction tree,
//!   a sequential tail; see `simd`), and one output row never depends on the other rows of
//!   the batch or on the thread count.

pub mod dequant;
pub mod isa;
pub mod matmul;
pub mod op;
mod permuted;
pub mod round;
mod simd;
mod view;

#[cfg(feature = "cuda")]
pub mod cuda;
pub mod cuda_src;

pub use dequant::{dequantize_bf16_into, dequantize_f32_into};
pub use isa::Isa;
pub use matmul::{matmul_nn, matmul_nt};
pub use op::{Packed4, QLinearOp};
pub use round::{Prec, Rounding};
pub use view::Q4View;
