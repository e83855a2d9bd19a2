//! QLoRA's frozen base: a 4-bit quantized weight with its bitsandbytes configuration, run on
//! the fused 4-bit kernels in every compute dtype (the weight is never kept dequantized).

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::quant::kernels::{Packed4, Rounding};
use crate::quant::{quantize, QuantType, Quantized4};

/// transformers' `BitsAndBytesConfig` for 4-bit loading, the fields that change the function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantConfig {
    /// `bnb_4bit_quant_type`.
    pub quant_type: QuantType,
    /// Elements per block (bitsandbytes fixes 64 for `Linear4bit`; other sizes are allowed here).
    pub blocksize: usize,
    /// `bnb_4bit_use_double_quant`.
    pub double_quant: bool,
    /// `bnb_4bit_compute_dtype`.
    pub compute_dtype: DType,
}

impl Default for QuantConfig {
    /// The QLoRA paper's recipe: NF4, double quantization, blocksize 64, bf16 compute.
    fn default() -> Self {
        QuantConfig { quant_type: QuantType::Nf4, blocksize: 64, double_quant: true, compute_dtype: DType::BF16 }
    }
}

impl QuantConfig {
    /// What transformers' `BitsAndBytesConfig(load_in_4bit=True)` means when nothing else is
    /// given: FP4, no double quantization, f32 compute. Relying on these on reload silently
    /// changes the function of an NF4 checkpoint.
    pub fn transformers_defaults() -> Self {
        QuantConfig { quant_type: QuantType::Fp4, blocksize: 64, double_quant: false, compute_dtype: DType::F32 }
    }
}

/// A frozen 4-bit weight `[out, in]` on its device, with the dtypes that fix its function.
#[derive(Debug, Clone)]
pub struct Quant4Linear {
    /// The packed codes and scales.
    pub q: Quantized4,
    /// The dtype the weight had before quantization (`quant_state.dtype`).
    pub orig_dtype: DType,
    /// The dtype the matmul runs in.
    pub compute_dtype: DType,
    /// The fused kernels' form of the weight, rounding each decoded value to the original
    /// then the compute dtype, as bitsandbytes' `dequantize → .to(orig) → .to(compute)`.
    pub packed: Packed4,
}

impl Quant4Linear {
    /// Wrap quantized data and upload it to `device`.
    pub fn new(q: Quantized4, orig_dtype: DType, compute_dtype: DType, device: &Device) -> Result<Self> {
        q.validate()?;
        if q.shape.len() != 2 {
            return Err(Error::Msg(format!("a 4-bit linear weight must be 2-D, got shape {:?}", q.shape)));
        }
        let packed = Packed4::new(&q, device)?.with_rounding(Rounding::new(orig_dtype, compute_dtype)?);
        Ok(Quant4Linear { q, orig_dtype, compute_dtype, packed })
    }

    /// Quantize a dense `[out, in]` weight with `cfg`.
    pub fn quantize(w: &Tensor, cfg: &QuantConfig) -> Result<Self> {
        let shape = w.dims().to_vec();
        let values = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let q = quantize(&values, &shape, cfg.quant_type, cfg.blocksize, cfg.double_quant)?;
        Self::new(q, w.dtype(), cfg.compute_dtype, w.device())
    }

    /// The weight the product multiplies, `[out, in]` in the compute dtype (computed on
    /// demand: for listings and tests, not for the forward).
    pub fn dequantized(&self) -> Result<Tensor> {
        Ok(self.packed.dequantize()?.to_dtype(self.compute_dtype)?)
    }

    /// bitsandbytes' `Linear4bit` forward: cast the input to the compute dtype, multiply by
    /// the weight cast through the original and compute dtypes (accumulating in f32), cast the
    /// product to the compute dtype and back to the input's. Differentiable in `x`; the weight
    /// is a constant.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let xc = x.to_dtype(self.compute_dtype)?.to_dtype(DType::F32)?;
        Ok(self.packed.forward(&xc)?.to_dtype(self.compute_dtype)?.to_dtype(x.dtype())?)
    }
}
