//! Fast dequantization of a whole 4-bit tensor into a caller's buffer, f32 or bf16, split
//! over threads for large tensors. Bitwise equal to the reference on every path.

use half::bf16;
use half::slice::HalfFloatSliceExt;
use rayon::prelude::*;

use super::isa::Isa;
use super::simd;
use super::view::Q4View;
use crate::error::{Error, Result};

/// Below this many elements one thread does it all.
const PAR_MIN: usize = 1 << 17;

fn check(v: &Q4View, isa: Isa, len: usize) -> Result<()> {
    if !isa.supported() {
        return Err(Error::Msg(format!("this CPU cannot run the {} kernels", isa.name())));
    }
    if len != v.numel() {
        return Err(Error::Msg(format!("dequantize: output holds {len} values, the tensor has {}", v.numel())));
    }
    Ok(())
}

/// Chunk length: whole blocks, about four chunks per thread.
fn chunk_len(v: &Q4View) -> usize {
    let per = v.numel().div_ceil(4 * rayon::current_num_threads()).max(1);
    per.div_ceil(v.blocksize) * v.blocksize
}

/// Fill `out` (the whole tensor) with `decode(start, end, piece)`, split over threads by
/// whole blocks when large.
fn fill<T: Send>(v: &Q4View, out: &mut [T], decode: impl Fn(usize, usize, &mut [T]) + Sync) {
    if out.len() < PAR_MIN {
        let n = out.len();
        decode(0, n, out);
        return;
    }
    let ch = chunk_len(v);
    out.par_chunks_mut(ch).enumerate().for_each(|(i, o)| {
        let s = i * ch;
        decode(s, s + o.len(), o);
    });
}

/// `out = dequantize(v)` in f32.
pub fn dequantize_f32_into(v: &Q4View, isa: Isa, out: &mut [f32]) -> Result<()> {
    check(v, isa, out.len())?;
    fill(v, out, |s, e, o| simd::decode(isa, v, s, e, o));
    Ok(())
}

/// `out = dequantize(v)` rounded once to bf16 (nearest even).
pub fn dequantize_bf16_into(v: &Q4View, isa: Isa, out: &mut [bf16]) -> Result<()> {
    check(v, isa, out.len())?;
    fill(v, out.reinterpret_cast_mut(), |s, e, o| simd::decode_bf16(isa, v, s, e, o));
    Ok(())
}
