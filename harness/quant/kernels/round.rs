//! The rounding a dequantized weight goes through before it meets the input. bitsandbytes'
//! `Linear4bit` decodes `code · absmax` in f32, casts it to the weight's original dtype
//! (`quant_state.dtype`), then to `bnb_4bit_compute_dtype`; a bf16-compute QLoRA layer
//! therefore multiplies bf16-rounded weights. The kernels apply these (at most two) roundings
//! to the 16 scaled code values of a block once, so the hot loops only look values up.

use candle_core::DType;

use crate::error::{Error, Result};

/// One cast of an f32 value: to itself, to bf16 or to f16 (round to nearest even, as
/// `half` and candle's `to_dtype` do), read back as f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Prec {
    /// No rounding.
    #[default]
    F32,
    /// bfloat16 (8 significant bits, f32 range).
    Bf16,
    /// IEEE half (11 significant bits, max 65504).
    F16,
}

impl Prec {
    /// The precision of a float dtype.
    pub fn of(dtype: DType) -> Result<Prec> {
        match dtype {
            DType::F32 => Ok(Prec::F32),
            DType::BF16 => Ok(Prec::Bf16),
            DType::F16 => Ok(Prec::F16),
            d => Err(Error::Msg(format!("4-bit weights are cast to f32, bf16 or f16, not {d:?}"))),
        }
    }

    /// `x` cast to this precision and back.
    #[inline]
    pub fn apply(self, x: f32) -> f32 {
        match self {
            Prec::F32 => x,
            Prec::Bf16 => half::bf16::from_f32(x).to_f32(),
            Prec::F16 => half::f16::from_f32(x).to_f32(),
        }
    }

    /// The CUDA kernels' code for it (0, 1, 2).
    pub fn code(self) -> i32 {
        self as i32
    }
}

/// The casts after decoding: first to the original dtype, then to the compute dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Rounding(pub [Prec; 2]);

impl Rounding {
    /// No rounding: the f32 weight as decoded.
    pub const NONE: Rounding = Rounding([Prec::F32, Prec::F32]);

    /// The casts of a weight quantized from `orig` and multiplied in `compute`.
    pub fn new(orig: DType, compute: DType) -> Result<Rounding> {
        Ok(Rounding([Prec::of(orig)?, Prec::of(compute)?]))
    }

    /// Whether this leaves every value as it is.
    #[inline]
    pub fn is_none(self) -> bool {
        self == Rounding::NONE
    }

    /// `x` through both casts.
    #[inline]
    pub fn apply(self, x: f32) -> f32 {
        self.0[1].apply(self.0[0].apply(x))
    }
}
