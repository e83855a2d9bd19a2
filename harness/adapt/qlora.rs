//! QLoRA's frozen base: a 4-bit quantized weight with its bitsandbytes configuration, run on
//! the fused 4-bit kernels in every compute dtype (the weight is never kept dequantized).

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::quant::kernels::{Packed4, Rounding};
use crate::quant::{quantize, QuantType, Quantized4};
use crate::spec::{dtype_name, parse_dtype};

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

    /// The `quantization_config` object of `config.json`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "quant_method": "bitsandbytes",
            "load_in_4bit": true,
            "load_in_8bit": false,
            "bnb_4bit_quant_type": self.quant_type.name(),
            "bnb_4bit_use_double_quant": self.double_quant,
            "bnb_4bit_compute_dtype": dtype_name(self.compute_dtype),
            "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": null,
        });
        if self.blocksize != 64 {
            // transformers has no field for it (bitsandbytes' Linear4bit uses 64); each tensor's
            // quant_state also records it.
            v["tunecheck_blocksize"] = serde_json::json!(self.blocksize);
        }
        v
    }

    /// Parse a `quantization_config` object; missing fields take transformers' defaults
    /// (the trap this crate exists to catch is then visible in the returned value).
    pub fn from_json(v: &serde_json::Value) -> Result<Self> {
        let o = v.as_object().ok_or_else(|| Error::field("quantization_config", "not an object"))?;
        let d = Self::transformers_defaults();
        let method = o.get("quant_method").and_then(|m| m.as_str()).unwrap_or("bitsandbytes");
        if method != "bitsandbytes" {
            return Err(Error::field(
                "quantization_config.quant_method",
                format!("`{method}` is not supported (bitsandbytes)"),
            ));
        }
        if o.get("load_in_4bit").and_then(|b| b.as_bool()) != Some(true) {
            return Err(Error::field(
                "quantization_config.load_in_4bit",
                "only 4-bit bitsandbytes checkpoints are supported",
            ));
        }
        let quant_type = match o.get("bnb_4bit_quant_type").and_then(|s| s.as_str()) {
            None => d.quant_type,
            Some(s) => QuantType::parse(s).ok_or_else(|| {
                Error::field("quantization_config.bnb_4bit_quant_type", format!("`{s}` is not nf4 or fp4"))
            })?,
        };
        let compute_dtype = match o.get("bnb_4bit_compute_dtype").and_then(|s| s.as_str()) {
            None => d.compute_dtype,
            Some(s) => parse_dtype(s).ok_or_else(|| {
                Error::field(
                    "quantization_config.bnb_4bit_compute_dtype",
                    format!("`{s}` is not float32, bfloat16 or float16"),
                )
            })?,
        };
        if let Some(s) = o.get("bnb_4bit_quant_storage").and_then(|s| s.as_str()) {
            if s != "uint8" {
                return Err(Error::field(
                    "quantization_config.bnb_4bit_quant_storage",
                    format!("`{s}` is not supported (uint8)"),
                ));
            }
        }
        Ok(QuantConfig {
            quant_type,
            blocksize: o.get("tunecheck_blocksize").and_then(|b| b.as_u64()).map_or(d.blocksize, |b| b as usize),
            double_quant: o.get("bnb_4bit_use_double_quant").and_then(|b| b.as_bool()).unwrap_or(d.double_quant),
            compute_dtype,
        })
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

    /// bitsandbytes' `Linear4bit` forward in `compute`: cast the input to the compute dtype,
    /// multiply by the weight cast through the original and compute dtypes (accumulating in
    /// f32), cast the product to the compute dtype and back to the input's. Differentiable in
    /// `x`; the weight is a constant.
    pub fn forward_in(&self, x: &Tensor, compute: DType) -> Result<Tensor> {
        let op = if compute == self.compute_dtype {
            self.packed.clone()
        } else {
            self.packed.with_rounding(Rounding::new(self.orig_dtype, compute)?)
        };
        let xc = x.to_dtype(compute)?.to_dtype(DType::F32)?;
        Ok(op.forward(&xc)?.to_dtype(compute)?.to_dtype(x.dtype())?)
    }
}
