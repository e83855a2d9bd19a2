//! The AVX2 fused dot product with byte-plane lookups: the path `matmul_nt` takes on AVX2 for
//! rows that start on a 32-element boundary (`cols` a multiple of 32), blocks of at least 32,
//! and weights that are either plain f32 (no rounding) or rounded to bf16 last (a
//! bf16-compute QLoRA layer, whatever the original dtype). Same bits as every other path.
//!
//! Why: the plain AVX2 loop looks a weight up in a block's 16-entry table with two 8-entry
//! `vpermps` and a `vblendvps`; per 16 weights that is four permutes, two blends, two byte
//! unpacks, zero-extensions, variable shifts and masks before the two FMAs — 9.75 cycles per 16
//! weights on Zen 3 (`llvm-mca -mcpu=znver3`), bound by the two shuffle pipes, where the FMA
//! limit is 1. Here a step takes 64 weights (32 bytes of codes) at once: the high and low
//! nibbles are split with one shift and two masks, and each half (32 indices) is looked up
//! with `vpshufb` (a 16-entry byte table per 128-bit lane) in byte planes of a table, then put
//! back together into f32 with byte and word unpacks:
//! - **f32 weights**: the code table's four byte planes (fixed for the call), 12 shuffles per
//!   32 weights, then a multiply by the block scales and the FMA — 18 cycles per 64 weights in
//!   `llvm-mca` (4.5 per 16). Measured on one Zen 3 core, the 1×4096×4096 matvec went from 3.69
//!   to 2.90 ms (1.09 ms on two; candle's Q4K 1.60 ms and 714 µs in the same run).
//! - **bf16-rounded weights**: an f32 holding a bf16 value has its low two bytes zero, so only
//!   bytes 2 and 3 need looking up, and a byte unpack gives each weight's bf16 bits as a word;
//!   a dword then holds two weights, the high one an f32 once the low word is masked off (the
//!   vector ALU pipes, not the shuffle ones) and the low one once shifted up. The table is the
//!   block's own, `round(code · scale)` (the rounding can't come after the lookup): the other
//!   AVX2 paths' table of the block (`simd`'s `table256`), cut into its two byte planes with
//!   four shuffles. Measured on one Zen 3 core (1×4096×4096, blocksize 64, best of 150): 2.2 ms
//!   against 3.8 ms on the general AVX2 loop; with blocksize 256 (a table every fourth step)
//!   1.6 ms, below the f32 mode's 1.8 ms — at blocksize 64 the per-block table is a quarter
//!   of the time.
//!
//! The unpacks leave the weights in a fixed permuted order inside the eight registers of a
//! step: register ρ (0..8), dword p = 4l + s (l the 128-bit lane, s 0..4, j = ρ mod 4) holds
//! step element `32l + 8j + 2s + ρ/4` in the f32 mode and `32l + 16⌊j/2⌋ + 4s + 2(j mod 2) +
//! ρ/4` in the bf16 one (ρ < 4: the high nibbles, even elements; else the low ones). So the
//! inputs are permuted the same way once per call ([`permute_input`]), each register
//! accumulates with its own FMA chain, and before the reduction the accumulators are put back
//! where the fixed order keeps them: element e of a step is lane `e mod 16` of chain `e / 16`
//! (a step is four 16-element chunks, chains 0..4). Every lane of every chain sees the same
//! fused multiply-adds in the same order as on the other paths, and the weight is
//! `round(code · scale)`, as the other paths' table entries are: the bits are the same.

use super::isa::Isa;
use super::round::Prec;
use super::view::Q4View;

/// Elements per step.
pub(super) const STEP: usize = 64;

/// `R` input rows as they are and permuted ([`permute_input`]).
type Inputs<'a, const R: usize> = ([&'a [f32]; R], [&'a [f32]; R]);

/// Whether [`dot`] applies to `v` on `isa`.
pub(super) fn applies(isa: Isa, v: &Q4View) -> bool {
    isa == Isa::Avx2
        && (v.round.is_none() || bf16_last(v))
        && v.shift >= 5
        && v.cols.is_multiple_of(32)
        && v.cols >= STEP
}

/// Whether the weights' last cast is to bf16 (their f32 bits end in two zero bytes).
fn bf16_last(v: &Q4View) -> bool {
    v.round.0[1] == Prec::Bf16
}

/// Step element held at position `i` (0..64) of a step's registers, in the f32 mode or
/// (`bf16`) the bf16 one (see the module header).
#[inline]
fn element(i: usize, bf16: bool) -> usize {
    let (rho, p) = (i / 8, i % 8);
    let (j, l, s) = (rho % 4, p / 4, p % 4);
    if bf16 {
        32 * l + 16 * (j / 2) + 4 * s + 2 * (j % 2) + rho / 4
    } else {
        32 * l + 8 * j + 2 * s + rho / 4
    }
}

/// One input row in the order the step registers hold the weights of `v` (whose path is
/// [`dot`]): every whole step of [`STEP`] elements from the row start permuted, the rest left
/// out.
pub(super) fn permute_input(v: &Q4View, x: &[f32]) -> Vec<f32> {
    let bf16 = bf16_last(v);
    let n = x.len() / STEP * STEP;
    let mut out = vec![0f32; n];
    for (o, xs) in out.chunks_exact_mut(STEP).zip(x.chunks_exact(STEP)) {
        for (i, val) in o.iter_mut().enumerate() {
            *val = xs[element(i, bf16)];
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
        unsafe {
            if bf16_last(v) {
                x86::dot_avx2::<R, true>(v, (s, e), (xs, xps))
            } else {
                x86::dot_avx2::<R, false>(v, (s, e), (xs, xps))
            }
        }
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
    use super::super::simd::x86::table256;
    use super::{element, finish, Inputs, Q4View, STEP};
    use std::arch::x86_64::*;

    // The table building below is written as macros: a `#[target_feature]` function can't be
    // `#[inline(always)]`, and a call per step would spill the accumulators (every vector
    // register is caller-saved).

    /// Bytes 2 and 3 of one block's table `round(code · scale)` (the other paths' table,
    /// bf16 last), as dwords: lane 0 `[b2(0..4), b3(0..4), b2(8..12), b3(8..12)]`, lane 1 the
    /// same for entries 4..8 and 12..16.
    macro_rules! bf16_entries {
        ($v:expr, $code:expr, $scale:expr) => {{
            let (code, scale): ((__m256, __m256), f32) = ($code, $scale);
            let (l, h) = table256($v, code.0, code.1, scale);
            let (l, h) = (_mm256_castps_si256(l), _mm256_castps_si256(h));
            const Z: i8 = -128; // pshufb: a set high bit gives 0
            let il = _mm256_setr_epi8(
                2, 6, 10, 14, 3, 7, 11, 15, Z, Z, Z, Z, Z, Z, Z, Z, //
                2, 6, 10, 14, 3, 7, 11, 15, Z, Z, Z, Z, Z, Z, Z, Z,
            );
            let ih = _mm256_setr_epi8(
                Z, Z, Z, Z, Z, Z, Z, Z, 2, 6, 10, 14, 3, 7, 11, 15, //
                Z, Z, Z, Z, Z, Z, Z, Z, 2, 6, 10, 14, 3, 7, 11, 15,
            );
            _mm256_or_si256(_mm256_shuffle_epi8(l, il), _mm256_shuffle_epi8(h, ih))
        }};
    }

    /// The lookup tables of a step whose lane 0 is in the block of scale `s.0` and lane 1 in
    /// that of `s.1` (`same`: one block): `[plane 2, plane 3]`, each lane its block's.
    macro_rules! bf16_tables {
        ($v:expr, $code:expr, $s:expr, $same:expr) => {{
            let (s, same): ((f32, f32), bool) = ($s, $same);
            let m0 = bf16_entries!($v, $code, s.0);
            let i2 = _mm256_setr_epi32(0, 4, 2, 6, 0, 4, 2, 6);
            let i3 = _mm256_setr_epi32(1, 5, 3, 7, 1, 5, 3, 7);
            let (a2, a3) = (_mm256_permutevar8x32_epi32(m0, i2), _mm256_permutevar8x32_epi32(m0, i3));
            if same {
                [a2, a3]
            } else {
                let m1 = bf16_entries!($v, $code, s.1);
                let (b2, b3) = (_mm256_permutevar8x32_epi32(m1, i2), _mm256_permutevar8x32_epi32(m1, i3));
                [_mm256_blend_epi32::<0xf0>(a2, b2), _mm256_blend_epi32::<0xf0>(a3, b3)]
            }
        }};
    }

    /// `R` dot products of one weight row; `BF16`: the weights are rounded to bf16 last (the
    /// per-block two-plane tables), else plain f32 (the code table's four planes, then the scale).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot_avx2<const R: usize, const BF16: bool>(
        v: &Q4View,
        row: (usize, usize),
        ins: Inputs<'_, R>,
    ) -> [f32; R] {
        let ((s, e), (xs, xps)) = (row, ins);
        // f32: byte k of every code value, in both 128-bit lanes.
        let mut planes = [[0u8; 16]; 4];
        if !BF16 {
            for (i, c) in v.code.iter().enumerate() {
                for (k, b) in c.to_le_bytes().into_iter().enumerate() {
                    planes[k][i] = b;
                }
            }
        }
        let t: [__m256i; 4] =
            std::array::from_fn(|k| _mm256_broadcastsi128_si256(_mm_loadu_si128(planes[k].as_ptr() as *const __m128i)));
        // bf16: the planes of bytes 2 and 3 of the tables of the blocks `cur` (lane 0, lane 1).
        let code = (_mm256_loadu_ps(v.code.as_ptr()), _mm256_loadu_ps(v.code.as_ptr().add(8)));
        let mut cur = (usize::MAX, usize::MAX);
        let [mut t2, mut t3] = [_mm256_setzero_si256(); 2];
        let high = _mm256_set1_epi32(0xffff_0000u32 as i32);
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
            let (b0, b1) = (f >> v.shift, (f + 32) >> v.shift);
            let s0 = *v.scales.get_unchecked(b0);
            let s1 = *v.scales.get_unchecked(b1);
            let scale = if b0 == b1 { _mm256_set1_ps(s0) } else { _mm256_setr_m128(_mm_set1_ps(s0), _mm_set1_ps(s1)) };
            if BF16 && cur != (b0, b1) {
                [t2, t3] = bf16_tables!(v, code, (s0, s1), b0 == b1);
                cur = (b0, b1);
            }
            let off = f - s;
            macro_rules! half {
                ($idx:expr, $base:expr) => {{
                    let idx = $idx;
                    let d = if BF16 {
                        let p2 = _mm256_shuffle_epi8(t2, idx);
                        let p3 = _mm256_shuffle_epi8(t3, idx);
                        let (u0, u1) = (_mm256_unpacklo_epi8(p2, p3), _mm256_unpackhi_epi8(p2, p3));
                        // A dword of u holds two words (two weights' bf16 bits): the high one
                        // is an f32 once the low one is masked off (vector ALU), the low one
                        // once shifted up.
                        [
                            _mm256_slli_epi32::<16>(u0),
                            _mm256_and_si256(u0, high),
                            _mm256_slli_epi32::<16>(u1),
                            _mm256_and_si256(u1, high),
                        ]
                    } else {
                        let p0 = _mm256_shuffle_epi8(t[0], idx);
                        let p1 = _mm256_shuffle_epi8(t[1], idx);
                        let p2 = _mm256_shuffle_epi8(t[2], idx);
                        let p3 = _mm256_shuffle_epi8(t[3], idx);
                        let (u0, u1) = (_mm256_unpacklo_epi8(p0, p1), _mm256_unpackhi_epi8(p0, p1));
                        let (u2, u3) = (_mm256_unpacklo_epi8(p2, p3), _mm256_unpackhi_epi8(p2, p3));
                        [
                            _mm256_unpacklo_epi16(u0, u2),
                            _mm256_unpackhi_epi16(u0, u2),
                            _mm256_unpacklo_epi16(u1, u3),
                            _mm256_unpackhi_epi16(u1, u3),
                        ]
                    };
                    for (j, dj) in d.into_iter().enumerate() {
                        let w =
                            if BF16 { _mm256_castsi256_ps(dj) } else { _mm256_mul_ps(_mm256_castsi256_ps(dj), scale) };
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
                let el = element(i, BF16);
                canon[el / 16][el % 16] = *val;
            }
            finish(v, canon, f, s, e, xs[r])
        })
    }
}
