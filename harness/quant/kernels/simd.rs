//! The inner loops, one per instruction set, all computing the same bits:
//! - `decode`: `out[k] = code[q(f)] · scale(f)` over a flat range (one rounding);
//! - `dot`: for R input rows at once, `Σ_k w(f_k) · x[k]` with `w = code · scale` rounded as
//!   in `decode`. From the first even flat index the row is cut into 16-element chunks;
//!   chunk `c` accumulates with fused multiply-adds into accumulator `c mod 4` (four
//!   independent chains hide the FMA latency), 16 lanes each. The result is
//!   `tree((a0 + a1) + (a2 + a3)) + tail`, with the fixed tree `(l + l⁺⁸) → (+⁴) → (+²) → (+¹)`
//!   and a sequential fused tail (an odd leading element and the last `< 16`);
//! - `axpy`: `y[k] = fma(a, w[k], y[k])`.
//!
//! The caller has checked that the chosen [`Isa`] is supported by this CPU.

use super::isa::Isa;
use super::view::Q4View;

/// `code · scale` of flat element `f` (the reference's rounding).
#[inline]
fn weight(v: &Q4View, f: usize) -> f32 {
    v.code[v.nibble(f)] * v.scales[v.block(f)]
}

/// Decode flat `[s, e)` into `out` (`e − s` values).
pub(super) fn decode(isa: Isa, v: &Q4View, s: usize, e: usize, out: &mut [f32]) {
    debug_assert_eq!(out.len(), e - s);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller checked `isa.supported()`.
        Isa::Avx512 => unsafe { x86::decode_avx512(v, s, e, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::decode_avx2(v, s, e, out) },
        _ => {
            for (f, o) in (s..e).zip(out.iter_mut()) {
                *o = weight(v, f);
            }
        }
    }
}

/// bf16 bits of `x`, round to nearest even; NaN stays a quiet NaN (as `half::bf16::from_f32`).
#[inline]
pub(super) fn bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if b & 0x7fff_ffff > 0x7f80_0000 {
        return ((b >> 16) | 0x0040) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// Decode flat `[s, e)` into bf16 bits.
pub(super) fn decode_bf16(isa: Isa, v: &Q4View, s: usize, e: usize, out: &mut [u16]) {
    debug_assert_eq!(out.len(), e - s);
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller checked `isa.supported()`.
        Isa::Avx512 => unsafe { x86::decode_bf16_avx512(v, s, e, out) },
        _ => {
            // AVX2 and portable: decode a block-sized piece to f32, then round.
            let mut buf = [0f32; 256];
            let mut f = s;
            while f < e {
                let n = (e - f).min(buf.len());
                decode(isa, v, f, f + n, &mut buf[..n]);
                for (o, x) in out[f - s..f - s + n].iter_mut().zip(&buf[..n]) {
                    *o = bf16_bits(*x);
                }
                f += n;
            }
        }
    }
}

/// The fixed reduction tree over 16 lanes.
#[inline]
fn tree(l: &[f32; 16]) -> f32 {
    let s8: [f32; 8] = std::array::from_fn(|j| l[j] + l[j + 8]);
    let s4: [f32; 4] = std::array::from_fn(|j| s8[j] + s8[j + 4]);
    let s2 = [s4[0] + s4[2], s4[1] + s4[3]];
    s2[0] + s2[1]
}

/// Dot products of the weights at flat `[s, e)` with `R` input slices (each `e − s` long).
pub(super) fn dot<const R: usize>(isa: Isa, v: &Q4View, s: usize, e: usize, xs: [&[f32]; R]) -> [f32; R] {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller checked `isa.supported()`.
        Isa::Avx512 => unsafe { x86::dot_avx512(v, s, e, xs) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::dot_avx2(v, s, e, xs) },
        _ => dot_scalar(v, s, e, xs),
    }
}

/// The head element (odd start) into the tail sums; returns the first even flat index.
#[inline]
fn head<const R: usize>(v: &Q4View, s: usize, e: usize, xs: &[&[f32]; R], tail: &mut [f32; R]) -> usize {
    if s % 2 == 1 && s < e {
        let w = weight(v, s);
        for r in 0..R {
            tail[r] = w.mul_add(xs[r][0], tail[r]);
        }
        s + 1
    } else {
        s
    }
}

/// The remaining `< 16` elements from flat `f` into the tail sums.
#[inline]
fn rest<const R: usize>(v: &Q4View, s: usize, mut f: usize, e: usize, xs: &[&[f32]; R], tail: &mut [f32; R]) {
    while f < e {
        let w = weight(v, f);
        for r in 0..R {
            tail[r] = w.mul_add(xs[r][f - s], tail[r]);
        }
        f += 1;
    }
}

fn dot_scalar<const R: usize>(v: &Q4View, s: usize, e: usize, xs: [&[f32]; R]) -> [f32; R] {
    let mut tail = [0f32; R];
    let mut f = head(v, s, e, &xs, &mut tail);
    let mut acc = [[[0f32; 16]; 4]; R];
    let mut c = 0;
    while f + 16 <= e {
        for j in 0..16 {
            let w = weight(v, f + j);
            for r in 0..R {
                acc[r][c % 4][j] = w.mul_add(xs[r][f - s + j], acc[r][c % 4][j]);
            }
        }
        f += 16;
        c += 1;
    }
    rest(v, s, f, e, &xs, &mut tail);
    std::array::from_fn(|r| {
        let a = &acc[r];
        let l: [f32; 16] = std::array::from_fn(|j| (a[0][j] + a[1][j]) + (a[2][j] + a[3][j]));
        tree(&l) + tail[r]
    })
}

/// `y[k] = fma(a, w[k], y[k])`.
pub(super) fn axpy(isa: Isa, a: f32, w: &[f32], y: &mut [f32]) {
    debug_assert_eq!(w.len(), y.len());
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller checked `isa.supported()`.
        Isa::Avx512 => unsafe { x86::axpy_avx512(a, w, y) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::axpy_avx2(a, w, y) },
        _ => {
            for (y, w) in y.iter_mut().zip(w) {
                *y = a.mul_add(*w, *y);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    //! AVX2+FMA and AVX-512F versions. Unaligned loads throughout; every pointer offset is
    //! bounded by the slice lengths checked in the safe callers.

    use super::{head, rest, weight, Q4View};
    use std::arch::x86_64::*;

    // ---- AVX-512 ----------------------------------------------------------------------

    /// 16 code values from 8 packed bytes at `p` (high nibble first).
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn codes16(p: *const u8, table: __m512) -> __m512 {
        let b = _mm_loadl_epi64(p as *const __m128i);
        let d = _mm_unpacklo_epi8(b, b);
        let w = _mm512_cvtepu8_epi32(d);
        let idx = _mm512_srlv_epi32(w, _mm512_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0));
        // permutexvar reads the low 4 bits of each index: the low nibble needs no mask.
        _mm512_permutexvar_ps(idx, table)
    }

    /// 32 code values from 16 packed bytes at `p`.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn codes32(p: *const u8, table: __m512) -> (__m512, __m512) {
        let b = _mm_loadu_si128(p as *const __m128i);
        let sh = _mm512_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
        let lo = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, b)), sh);
        let hi = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(b, b)), sh);
        (_mm512_permutexvar_ps(lo, table), _mm512_permutexvar_ps(hi, table))
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn decode_avx512(v: &Q4View, s: usize, e: usize, out: &mut [f32]) {
        let table = _mm512_loadu_ps(v.code.as_ptr());
        for (ss, se, scale) in v.segments(s, e) {
            let sc = _mm512_set1_ps(scale);
            let mut f = ss;
            if f % 2 == 1 {
                out[f - s] = weight(v, f);
                f += 1;
            }
            let o = out.as_mut_ptr();
            let p = v.packed.as_ptr();
            while f + 32 <= se {
                let (a, b) = codes32(p.add(f / 2), table);
                _mm512_storeu_ps(o.add(f - s), _mm512_mul_ps(a, sc));
                _mm512_storeu_ps(o.add(f + 16 - s), _mm512_mul_ps(b, sc));
                f += 32;
            }
            while f + 16 <= se {
                _mm512_storeu_ps(o.add(f - s), _mm512_mul_ps(codes16(p.add(f / 2), table), sc));
                f += 16;
            }
            while f < se {
                out[f - s] = weight(v, f);
                f += 1;
            }
        }
    }

    /// Round 16 f32 to bf16 bits (nearest even, quiet NaN as `half`).
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn bf16x16(x: __m512) -> __m256i {
        let b = _mm512_castps_si512(x);
        let hi = _mm512_srli_epi32(b, 16);
        let lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
        let r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)), lsb), 16);
        let nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
        let q = _mm512_or_si512(hi, _mm512_set1_epi32(0x40));
        _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, r, q))
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn decode_bf16_avx512(v: &Q4View, s: usize, e: usize, out: &mut [u16]) {
        let table = _mm512_loadu_ps(v.code.as_ptr());
        for (ss, se, scale) in v.segments(s, e) {
            let sc = _mm512_set1_ps(scale);
            let mut f = ss;
            if f % 2 == 1 {
                out[f - s] = super::bf16_bits(weight(v, f));
                f += 1;
            }
            let o = out.as_mut_ptr();
            let p = v.packed.as_ptr();
            while f + 32 <= se {
                let (a, b) = codes32(p.add(f / 2), table);
                _mm256_storeu_si256(o.add(f - s) as *mut __m256i, bf16x16(_mm512_mul_ps(a, sc)));
                _mm256_storeu_si256(o.add(f + 16 - s) as *mut __m256i, bf16x16(_mm512_mul_ps(b, sc)));
                f += 32;
            }
            while f < se {
                out[f - s] = super::bf16_bits(weight(v, f));
                f += 1;
            }
        }
    }

    /// Horizontal sum by the fixed tree.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma")]
    unsafe fn tree512(a: __m512) -> f32 {
        let lo = _mm512_castps512_ps256(a);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1));
        tree256(_mm256_add_ps(lo, hi))
    }

    /// The tree from 8 lanes: `(+⁴) → (+²) → (+¹)`.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn tree256(s8: __m256) -> f32 {
        let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)))
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    #[allow(unused_assignments)] // the scale cache's last update in the unrolled tail
    pub(super) unsafe fn dot_avx512<const R: usize>(v: &Q4View, s: usize, e: usize, xs: [&[f32]; R]) -> [f32; R] {
        let table = _mm512_loadu_ps(v.code.as_ptr());
        let mut tail = [0f32; R];
        let mut f = head(v, s, e, &xs, &mut tail);
        let z = _mm512_setzero_ps();
        let (mut a0, mut a1, mut a2, mut a3) = ([z; R], [z; R], [z; R], [z; R]);
        let (mut cur_b, mut cur_s) = (usize::MAX, z);
        let p = v.packed.as_ptr();
        let xp: [*const f32; R] = std::array::from_fn(|r| xs[r].as_ptr().wrapping_sub(s));
        // One 16-element chunk into accumulator `$a`.
        macro_rules! chunk {
            ($a:ident) => {{
                let b0 = v.block(f);
                let sc = if b0 == v.block(f + 15) {
                    if cur_b != b0 {
                        cur_b = b0;
                        cur_s = _mm512_set1_ps(*v.scales.get_unchecked(b0));
                    }
                    cur_s
                } else {
                    // Blocks hold at least 32 elements: a chunk straddles one boundary at most.
                    // No function call here: it would spill every accumulator.
                    let first = ((b0 + 1) << v.shift) - f;
                    let s0 = _mm512_set1_ps(*v.scales.get_unchecked(b0));
                    let s1 = _mm512_set1_ps(*v.scales.get_unchecked(b0 + 1));
                    _mm512_mask_blend_ps(((1u32 << first) - 1) as __mmask16, s1, s0)
                };
                let w = _mm512_mul_ps(codes16(p.add(f / 2), table), sc);
                for r in 0..R {
                    $a[r] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xp[r].wrapping_add(f)), $a[r]);
                }
                f += 16;
            }};
        }
        // Four chunks inside one block: one scale, no per-chunk checks.
        macro_rules! chunk_s {
            ($a:ident, $codes:expr, $sc:expr, $off:expr) => {{
                let w = _mm512_mul_ps($codes, $sc);
                for r in 0..R {
                    $a[r] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xp[r].wrapping_add(f + $off)), $a[r]);
                }
            }};
        }
        while f + 64 <= e {
            if v.block(f) == v.block(f + 63) {
                let sc = _mm512_set1_ps(*v.scales.get_unchecked(v.block(f)));
                let (c0, c1) = codes32(p.add(f / 2), table);
                let (c2, c3) = codes32(p.add(f / 2 + 16), table);
                chunk_s!(a0, c0, sc, 0);
                chunk_s!(a1, c1, sc, 16);
                chunk_s!(a2, c2, sc, 32);
                chunk_s!(a3, c3, sc, 48);
                f += 64;
            } else {
                chunk!(a0);
                chunk!(a1);
                chunk!(a2);
                chunk!(a3);
            }
        }
        if f + 16 <= e {
            chunk!(a0);
        }
        if f + 16 <= e {
            chunk!(a1);
        }
        if f + 16 <= e {
            chunk!(a2);
        }
        rest(v, s, f, e, &xs, &mut tail);
        let mut out = [0f32; R];
        for r in 0..R {
            let l = _mm512_add_ps(_mm512_add_ps(a0[r], a1[r]), _mm512_add_ps(a2[r], a3[r]));
            out[r] = tree512(l) + tail[r];
        }
        out
    }

    #[target_feature(enable = "avx512f,avx2,fma")]
    pub(super) unsafe fn axpy_avx512(a: f32, w: &[f32], y: &mut [f32]) {
        let n = w.len().min(y.len());
        let av = _mm512_set1_ps(a);
        let mut k = 0;
        while k + 16 <= n {
            let yv = _mm512_loadu_ps(y.as_ptr().add(k));
            _mm512_storeu_ps(y.as_mut_ptr().add(k), _mm512_fmadd_ps(av, _mm512_loadu_ps(w.as_ptr().add(k)), yv));
            k += 16;
        }
        while k < n {
            y[k] = a.mul_add(w[k], y[k]);
            k += 1;
        }
    }

    // ---- AVX2 ---------------------------------------------------------------------------

    /// 8 code values from 4 packed bytes at `p`; `tl`/`th` are code[0..8] and code[8..16].
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn codes8(p: *const u8, tl: __m256, th: __m256) -> __m256 {
        let b = _mm_cvtsi32_si128((p as *const i32).read_unaligned());
        let d = _mm_unpacklo_epi8(b, b);
        let w = _mm256_cvtepu8_epi32(d);
        let idx =
            _mm256_and_si256(_mm256_srlv_epi32(w, _mm256_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0)), _mm256_set1_epi32(15));
        let lo = _mm256_permutevar8x32_ps(tl, idx);
        let hi = _mm256_permutevar8x32_ps(th, idx);
        _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)))
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn decode_avx2(v: &Q4View, s: usize, e: usize, out: &mut [f32]) {
        let tl = _mm256_loadu_ps(v.code.as_ptr());
        let th = _mm256_loadu_ps(v.code.as_ptr().add(8));
        for (ss, se, scale) in v.segments(s, e) {
            let sc = _mm256_set1_ps(scale);
            let mut f = ss;
            if f % 2 == 1 {
                out[f - s] = weight(v, f);
                f += 1;
            }
            let o = out.as_mut_ptr();
            let p = v.packed.as_ptr();
            while f + 8 <= se {
                _mm256_storeu_ps(o.add(f - s), _mm256_mul_ps(codes8(p.add(f / 2), tl, th), sc));
                f += 8;
            }
            while f < se {
                out[f - s] = weight(v, f);
                f += 1;
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[allow(unused_assignments)] // the scale cache's last update in the unrolled tail
    pub(super) unsafe fn dot_avx2<const R: usize>(v: &Q4View, s: usize, e: usize, xs: [&[f32]; R]) -> [f32; R] {
        let tl = _mm256_loadu_ps(v.code.as_ptr());
        let th = _mm256_loadu_ps(v.code.as_ptr().add(8));
        let mut tail = [0f32; R];
        let mut f = head(v, s, e, &xs, &mut tail);
        let z = _mm256_setzero_ps();
        // Accumulator q as (lanes 0..8, lanes 8..16).
        let (mut a0l, mut a0h, mut a1l, mut a1h) = ([z; R], [z; R], [z; R], [z; R]);
        let (mut a2l, mut a2h, mut a3l, mut a3h) = ([z; R], [z; R], [z; R], [z; R]);
        let (mut cur_b, mut cur_s) = (usize::MAX, z);
        let p = v.packed.as_ptr();
        let xp: [*const f32; R] = std::array::from_fn(|r| xs[r].as_ptr().wrapping_sub(s));
        macro_rules! chunk {
            ($lo:ident, $hi:ident) => {{
                let b0 = v.block(f);
                let (s0, s1) = if b0 == v.block(f + 15) {
                    if cur_b != b0 {
                        cur_b = b0;
                        cur_s = _mm256_set1_ps(*v.scales.get_unchecked(b0));
                    }
                    (cur_s, cur_s)
                } else {
                    // At most one boundary in a chunk; lanes before it take the first scale.
                    let first = _mm256_set1_epi32((((b0 + 1) << v.shift) - f) as i32);
                    let sa = _mm256_set1_ps(*v.scales.get_unchecked(b0));
                    let sb = _mm256_set1_ps(*v.scales.get_unchecked(b0 + 1));
                    let m0 = _mm256_cmpgt_epi32(first, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
                    let m1 = _mm256_cmpgt_epi32(first, _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15));
                    (
                        _mm256_blendv_ps(sb, sa, _mm256_castsi256_ps(m0)),
                        _mm256_blendv_ps(sb, sa, _mm256_castsi256_ps(m1)),
                    )
                };
                let w0 = _mm256_mul_ps(codes8(p.add(f / 2), tl, th), s0);
                let w1 = _mm256_mul_ps(codes8(p.add(f / 2 + 4), tl, th), s1);
                for r in 0..R {
                    let x = xp[r].wrapping_add(f);
                    $lo[r] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(x), $lo[r]);
                    $hi[r] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(x.add(8)), $hi[r]);
                }
                f += 16;
            }};
        }
        while f + 64 <= e {
            chunk!(a0l, a0h);
            chunk!(a1l, a1h);
            chunk!(a2l, a2h);
            chunk!(a3l, a3h);
        }
        if f + 16 <= e {
            chunk!(a0l, a0h);
        }
        if f + 16 <= e {
            chunk!(a1l, a1h);
        }
        if f + 16 <= e {
            chunk!(a2l, a2h);
        }
        rest(v, s, f, e, &xs, &mut tail);
        let mut out = [0f32; R];
        for r in 0..R {
            let lo = _mm256_add_ps(_mm256_add_ps(a0l[r], a1l[r]), _mm256_add_ps(a2l[r], a3l[r]));
            let hi = _mm256_add_ps(_mm256_add_ps(a0h[r], a1h[r]), _mm256_add_ps(a2h[r], a3h[r]));
            out[r] = tree256(_mm256_add_ps(lo, hi)) + tail[r];
        }
        out
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn axpy_avx2(a: f32, w: &[f32], y: &mut [f32]) {
        let n = w.len().min(y.len());
        let av = _mm256_set1_ps(a);
        let mut k = 0;
        while k + 8 <= n {
            let yv = _mm256_loadu_ps(y.as_ptr().add(k));
            _mm256_storeu_ps(y.as_mut_ptr().add(k), _mm256_fmadd_ps(av, _mm256_loadu_ps(w.as_ptr().add(k)), yv));
            k += 8;
        }
        while k < n {
            y[k] = a.mul_add(w[k], y[k]);
            k += 1;
        }
    }
}
