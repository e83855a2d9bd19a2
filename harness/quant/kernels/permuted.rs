//! The AVX2 fused dot product with byte-plane lookups, for plain f32 weights (no rounding),
//! rows that start on a 32-element boundary (`cols` a multiple of 32) and blocks of at least
//! 32: the path `matmul_nt` takes on AVX2 where it applies. Same bits as every other path.
//!
//! Why: the plain AVX2 loop looks a weight up in a block's 16-entry table with two 8-entry
//! `vpermps` and a `vblendvps`; per 16 weights that is four permutes, two blends, two byte
//! unpacks, zero-extensions, variable shifts and masks before the two FMAs — 9.75 cycles per 16
//! weights on Zen 3 (`llvm-mca -mcpu=znver3`), bound by the two shuffle pipes, where the FMA
//! limit is 1. Here a step takes 64 weights (32 bytes of codes) at once: the high and low
//! nibbles are split with one shift and two masks, and each half (32 indices) is looked up in
//! the code table's four byte planes with `vpshufb` (a 16-entry byte table per 128-bit lane)
//! and put back together into f32 with two rounds of byte and word unpacks: 12 shuffles per 32
//! weights, then a multiply by the block scales and the FMA — 18 cycles per 64 weights in
//! `llvm-mca` (4.5 per 16). Measured on one Zen 3 core, the 1×4096×4096 matvec went from 3.69
//! to 2.90 ms (1.09 ms on two; candle's Q4K 1.60 ms and 714 µs in the same run).
//!
//! The unpacks leave the weights in a fixed permuted order inside the eight registers of a
//! step: register ρ (0..8), dword p = 4l + s (l the 128-bit lane, s 0..4) holds step element
//! `32l + 8(ρ mod 4) + 2s + ρ/4` (ρ < 4: the high nibbles, even elements; else the low ones).
//! So the inputs are permuted the same way once per call ([`permute_input`]), each register
//! accumulates with its own FMA chain, and before the reduction the accumulators are put back
//! where the fixed order keeps them: element e of a step is lane `e mod 16` of chain `e / 16`
//! (a step is four 16-element chunks, chains 0..4). Every lane of every chain sees the same
//! fused multiply-adds in the same order as on the other paths, and the weight is
//! `code · scale` rounded once, as the table entries are: the bits are the same.

use super::isa::Isa;
use super::view::Q4View;

/// Elements per step.
pub(super) const STEP: usize = 64;

/// `R` input rows as they are and permuted ([`permute_input`]).
type Inputs<'a, const R: usize> = ([&'a [f32]; R], [&'a [f32]; R]);

/// Whether [`dot`] applies to `v` on `isa`.
pub(super) fn applies(isa: Isa, v: &Q4View) -> bool {
    isa == Isa::Avx2 && v.round.is_none() && v.shift >= 5 && v.cols.is_multiple_of(32) && v.cols >= STEP
}

/// Step element held at position `i` (0..64) of a step's registers.
#[inline]
fn element(i: usize) -> usize {
    let (rho, p) = (i / 8, i % 8);
    32 * (p / 4) + 8 * (rho % 4) + 2 * (p % 4) + rho / 4
}

/// One input row in the order the step registers hold the weights: every whole step of
/// [`STEP`] elements from the row start permuted, the rest left out.
pub(super) fn permute_input(x: &[f32]) -> Vec<f32> {
    let n = x.len() / STEP * STEP;
    let mut out = vec![0f32; n];
    for (o, xs) in out.chunks_exact_mut(STEP).zip(x.chunks_exact(STEP)) {
        for (i, v) in o.iter_mut().enumerate() {
            *v = xs[element(i)];
        }
    }
    out
}

/// The dot products of weight row flat `[s, e)` (`s` a multiple of 32, `e − s` = `v.cols`)
/// with `R` input rows, given each as it is (`xs`) and permuted (`xps`, [`permute_input`]).
pub(super) fn dot<const R: usize>(
    isa: Isa,
    v: &Q4View,
    s: usize,
    e: usize,
    xs: [&[f32]; R],
    xps: [&[f32]; R],
) -> [f32; R] {
    assert!(applies(isa, v) && s.is_multiple_of(32) && e - s == v.cols, "the permuted dot does not apply here");
    assert!(xs.iter().all(|x| x.len() == v.cols) && xps.iter().all(|x| x.len() == v.cols / STEP * STEP));
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: `applies` checked AVX2 (the caller checked `isa.supported()`); the lengths are
        // checked above.
        unsafe { x86::dot_avx2::<R>(v, (s, e), (xs, xps)) }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        unreachable!("AVX2 only")
    }
}

/// The reduction of canonical accumulators `[chain][lane]` and the elements after the steps
/// (fewer than 64, a multiple of 32: whole chunks, chains 0 and 1), as every path does it.
fn finish(v: &Q4View, mut acc: [[f32; 16]; 4], mut f: usize, s: usize, e: usize, x: &[f32]) -> f32 {
    let mut c = 0;
    while f + 16 <= e {
        for (j, a) in acc[c % 4].iter_mut().enumerate() {
            *a = super::simd::weight(v, f + j).mul_add(x[f - s + j], *a);
        }
        f += 16;
        c += 1;
    }
    debug_assert_eq!(f, e, "rows of whole chunks leave no tail");
    let l: [f32; 16] = std::array::from_fn(|j| (acc[0][j] + acc[1][j]) + (acc[2][j] + acc[3][j]));
    // The other paths add their (here empty) tail sum: `+ 0.0` turns a −0 into +0 there too.
    let tail = 0f32;
    super::simd::tree(&l) + tail
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{element, finish, Inputs, Q4View, STEP};
    use std::arch::x86_64::*;

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_avx2<const R: usize>(v: &Q4View, row: (usize, usize), ins: Inputs<'_, R>) -> [f32; R] {
        let ((s, e), (xs, xps)) = (row, ins);
        // Byte k of every code value, in both 128-bit lanes.
        let mut planes = [[0u8; 16]; 4];
        for (i, c) in v.code.iter().enumerate() {
            for (k, b) in c.to_le_bytes().into_iter().enumerate() {
                planes[k][i] = b;
            }
        }
        let t: [__m256i; 4] =
            std::array::from_fn(|k| _mm256_broadcastsi128_si256(_mm_loadu_si128(planes[k].as_ptr() as *const __m128i)));
        let nibble = _mm256_set1_epi8(15);
        let mut acc = [[_mm256_setzero_ps(); 8]; R];
        let p = v.packed.as_ptr();
        let xp: [*const f32; R] = std::array::from_fn(|r| xps[r].as_ptr());
        let mut f = s;
        while f + STEP <= e {
            let b = _mm256_loadu_si256(p.add(f / 2) as *const __m256i);
            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(b), nibble);
            let lo = _mm256_and_si256(b, nibble);
            // Lane 0 holds step elements 0..32, lane 1 32..64: one block each (blocks ≥ 32).
            let s0 = *v.scales.get_unchecked(f >> v.shift);
            let s1 = *v.scales.get_unchecked((f + 32) >> v.shift);
            let scale = _mm256_setr_m128(_mm_set1_ps(s0), _mm_set1_ps(s1));
            let off = f - s;
            macro_rules! half {
                ($idx:expr, $base:expr) => {{
                    let idx = $idx;
                    let p0 = _mm256_shuffle_epi8(t[0], idx);
                    let p1 = _mm256_shuffle_epi8(t[1], idx);
                    let p2 = _mm256_shuffle_epi8(t[2], idx);
                    let p3 = _mm256_shuffle_epi8(t[3], idx);
                    let (u0, u1) = (_mm256_unpacklo_epi8(p0, p1), _mm256_unpackhi_epi8(p0, p1));
                    let (u2, u3) = (_mm256_unpacklo_epi8(p2, p3), _mm256_unpackhi_epi8(p2, p3));
                    let d = [
                        _mm256_unpacklo_epi16(u0, u2),
                        _mm256_unpackhi_epi16(u0, u2),
                        _mm256_unpacklo_epi16(u1, u3),
                        _mm256_unpackhi_epi16(u1, u3),
                    ];
                    for (j, dj) in d.into_iter().enumerate() {
                        let w = _mm256_mul_ps(_mm256_castsi256_ps(dj), scale);
                        let rho = $base + j;
                        for r in 0..R {
                            let x = _mm256_loadu_ps(xp[r].add(off + 8 * rho));
                            acc[r][rho] = _mm256_fmadd_ps(w, x, acc[r][rho]);
                        }
                    }
                }};
            }
            half!(hi, 0);
            half!(lo, 4);
            f += STEP;
        }
        std::array::from_fn(|r| {
            // Back to the fixed order: step element e is lane e mod 16 of chain e / 16.
            let mut canon = [[0f32; 16]; 4];
            let mut regs = [0f32; STEP];
            for (rho, a) in acc[r].iter().enumerate() {
                _mm256_storeu_ps(regs.as_mut_ptr().add(8 * rho), *a);
            }
            for (i, val) in regs.iter().enumerate() {
                let el = element(i);
                canon[el / 16][el % 16] = *val;
            }
            finish(v, canon, f, s, e, xs[r])
        })
    }
}
