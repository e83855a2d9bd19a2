//! Blockwise 4-bit quantization (NF4 / FP4) bit-compatible with bitsandbytes, with optional
//! double quantization of the block scales; and the reference (slow, obviously correct)
//! dequantization every faster kernel is checked against.
//!
//! Facts matched (bitsandbytes' torch reference path, `quantize_4bit` default backend):
//! - the tensor is flattened row-major and cut into blocks of `blocksize`; a partial last
//!   block gets its own absmax;
//! - full blocks are scaled by `x · (1 / absmax)` with absmax floored at 1e-38 for the
//!   division only (a zero block stores absmax 0 and decodes to zeros); the partial block is
//!   scaled by `x / absmax` with the floored absmax stored — both quirks reproduced;
//! - clamp to [-1, 1], nearest code by midpoints (ties to the lower code);
//! - element 2i in the high nibble, 2i+1 in the low nibble, an odd count zero-padded;
//! - double quantization: `offset = mean(absmax)`, then `absmax − offset` quantized with the
//!   signed 8-bit dynamic map in blocks of 256, its own absmax kept in f32.

use crate::error::{Error, Result};
use crate::quant::codes::{dynamic_map_signed, CodeBook, FP4, NF4};

/// Which 4-bit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantType {
    /// NormalFloat4.
    Nf4,
    /// bitsandbytes' FP4.
    Fp4,
}

impl QuantType {
    /// The code values by index.
    pub fn code(self) -> &'static [f32; 16] {
        match self {
            QuantType::Nf4 => &NF4,
            QuantType::Fp4 => &FP4,
        }
    }

    /// `nf4` or `fp4`.
    pub fn name(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }

    /// Parse `nf4` / `fp4`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "nf4" => Some(QuantType::Nf4),
            "fp4" => Some(QuantType::Fp4),
            _ => None,
        }
    }
}

/// The nested block size bitsandbytes uses for double quantization.
pub const NESTED_BLOCKSIZE: usize = 256;

/// Block scales, plain or double-quantized.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// One f32 per block.
    Plain(Vec<f32>),
    /// 8-bit codes of `absmax − offset` under the dynamic map, with per-256-block scales.
    Nested {
        /// One code per block.
        codes: Vec<u8>,
        /// One f32 scale per `nested_blocksize` codes.
        nested_absmax: Vec<f32>,
        /// Block size of the nested quantization.
        nested_blocksize: usize,
        /// The subtracted mean.
        offset: f32,
    },
}

/// A 4-bit quantized tensor: packed codes plus everything needed to decode them.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized4 {
    /// Two codes per byte, high nibble first; `ceil(n / 2)` bytes.
    pub packed: Vec<u8>,
    /// Code type.
    pub quant_type: QuantType,
    /// Elements per block.
    pub blocksize: usize,
    /// Logical shape of the original tensor.
    pub shape: Vec<usize>,
    /// Block scales.
    pub absmax: Absmax,
}

/// Check a 4-bit blocksize: a power of two from 32 to 4096.
pub fn check_blocksize(blocksize: usize) -> Result<()> {
    if !(32..=4096).contains(&blocksize) || !blocksize.is_power_of_two() {
        return Err(Error::field("blocksize", format!("{blocksize} is not a power of two in 32..=4096")));
    }
    Ok(())
}

/// Quantize `x` (row-major values of a tensor of `shape`).
pub fn quantize(
    x: &[f32],
    shape: &[usize],
    quant_type: QuantType,
    blocksize: usize,
    double_quant: bool,
) -> Result<Quantized4> {
    check_blocksize(blocksize)?;
    let n: usize = shape.iter().product();
    if n != x.len() {
        return Err(Error::Msg(format!("quantize: {} values for shape {shape:?}", x.len())));
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return Err(Error::Msg(format!("quantize: value {} at flat index {i} is not finite", x[i])));
    }
    let book = CodeBook::new(quant_type.code());
    let full_blocks = n / blocksize;
    let rem = n % blocksize;
    let mut absmax = Vec::with_capacity(full_blocks + usize::from(rem > 0));
    let mut codes = vec![0u8; n + n % 2];
    for b in 0..full_blocks {
        let blk = &x[b * blocksize..(b + 1) * blocksize];
        let am = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
        let inv = 1.0 / am.max(1e-38);
        for (c, &v) in codes[b * blocksize..].iter_mut().zip(blk) {
            *c = book.nearest((v * inv).clamp(-1.0, 1.0));
        }
        absmax.push(am);
    }
    if rem > 0 {
        let start = full_blocks * blocksize;
        let blk = &x[start..];
        let am = blk.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-38);
        for (c, &v) in codes[start..].iter_mut().zip(blk) {
            *c = book.nearest((v / am).clamp(-1.0, 1.0));
        }
        absmax.push(am);
    }
    if n % 2 == 1 {
        // bitsandbytes pads the scaled values with 0.0 before the search.
        codes[n] = book.nearest(0.0);
    }
    let packed = codes.chunks(2).map(|p| (p[0] << 4) | p[1]).collect();
    let absmax = if double_quant { nest(&absmax) } else { Absmax::Plain(absmax) };
    Ok(Quantized4 { packed, quant_type, blocksize, shape: shape.to_vec(), absmax })
}

/// Double-quantize block scales.
fn nest(absmax: &[f32]) -> Absmax {
    // Mean in f64, rounded once: within an ulp of torch's f32 mean.
    let offset = (absmax.iter().map(|&v| v as f64).sum::<f64>() / absmax.len().max(1) as f64) as f32;
    let centred: Vec<f32> = absmax.iter().map(|&v| v - offset).collect();
    let (codes, nested_absmax) = quantize_blockwise_8bit(&centred, NESTED_BLOCKSIZE);
    Absmax::Nested { codes, nested_absmax, nested_blocksize: NESTED_BLOCKSIZE, offset }
}

/// 8-bit blockwise quantization with the signed dynamic map: codes and per-block absmax.
pub fn quantize_blockwise_8bit(x: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let book = CodeBook::new(&dynamic_map_signed());
    let mut codes = Vec::with_capacity(x.len());
    let mut scales = Vec::with_capacity(x.len().div_ceil(blocksize));
    for blk in x.chunks(blocksize) {
        let am = blk.iter().fold(0f32, |m, v| m.max(v.abs()));
        scales.push(am);
        let inv = if am > 0.0 { 1.0 / am } else { 0.0 };
        codes.extend(blk.iter().map(|&v| book.nearest((v * inv).clamp(-1.0, 1.0))));
    }
    (codes, scales)
}

/// Decode 8-bit blockwise codes: `map[code] · absmax[block]`.
pub fn dequantize_blockwise_8bit(codes: &[u8], absmax: &[f32], blocksize: usize) -> Vec<f32> {
    let map = dynamic_map_signed();
    codes.iter().enumerate().map(|(i, &c)| map[c as usize] * absmax[i / blocksize]).collect()
}

impl Quantized4 {
    /// Number of logical elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Number of blocks.
    pub fn num_blocks(&self) -> usize {
        self.numel().div_ceil(self.blocksize)
    }

    /// The f32 absmax of every block (decoding nested scales: `map[c]·s + offset`).
    pub fn block_scales(&self) -> Vec<f32> {
        match &self.absmax {
            Absmax::Plain(v) => v.clone(),
            Absmax::Nested { codes, nested_absmax, nested_blocksize, offset } => {
                dequantize_blockwise_8bit(codes, nested_absmax, *nested_blocksize).iter().map(|v| v + offset).collect()
            }
        }
    }

    /// The 4-bit code of element `i`.
    #[inline]
    pub fn code_at(&self, i: usize) -> u8 {
        let byte = self.packed[i / 2];
        if i.is_multiple_of(2) {
            byte >> 4
        } else {
            byte & 0x0f
        }
    }

    /// Reference dequantization to f32, row-major: `code[q] · absmax[block]`.
    pub fn dequantize(&self) -> Vec<f32> {
        let code = self.quant_type.code();
        let scales = self.block_scales();
        (0..self.numel()).map(|i| code[self.code_at(i) as usize] * scales[i / self.blocksize]).collect()
    }

    /// The reference dequantization as a tensor of the logical shape in `dtype` on `device`
    /// (f32 values rounded once to bf16/f16, as bitsandbytes' `.to(dtype)`).
    pub fn dequantize_tensor(
        &self,
        dtype: candle_core::DType,
        device: &candle_core::Device,
    ) -> Result<candle_core::Tensor> {
        Ok(candle_core::Tensor::from_vec(self.dequantize(), self.shape.as_slice(), device)?.to_dtype(dtype)?)
    }

    /// Check internal consistency (lengths of packed data and scales); errors name the field.
    pub fn validate(&self) -> Result<()> {
        check_blocksize(self.blocksize)?;
        let n = self.numel();
        if self.packed.len() != n.div_ceil(2) {
            return Err(Error::field(
                "weight",
                format!("{} packed bytes for {n} values, expected {}", self.packed.len(), n.div_ceil(2)),
            ));
        }
        let blocks = self.num_blocks();
        match &self.absmax {
            Absmax::Plain(v) if v.len() != blocks => {
                Err(Error::field("absmax", format!("{} scales for {blocks} blocks", v.len())))
            }
            Absmax::Nested { codes, nested_absmax, nested_blocksize, .. } => {
                if codes.len() != blocks {
                    return Err(Error::field("absmax", format!("{} codes for {blocks} blocks", codes.len())));
                }
                if *nested_blocksize == 0 || nested_absmax.len() != blocks.div_ceil(*nested_blocksize) {
                    return Err(Error::field(
                        "nested_absmax",
                        format!("{} scales for {blocks} codes in blocks of {nested_blocksize}", nested_absmax.len()),
                    ));
                }
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// The worst-case absolute error of one element in a block with scale `absmax`: half the
/// widest gap between neighbouring codes, times the scale.
pub fn error_bound(quant_type: QuantType, absmax: f32) -> f32 {
    let mut v: Vec<f32> = quant_type.code().to_vec();
    v.sort_by(f32::total_cmp);
    let widest = v.windows(2).map(|w| w[1] - w[0]).fold(0f32, f32::max);
    widest / 2.0 * absmax * (1.0 + 1e-6)
}
