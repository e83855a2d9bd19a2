//! The inner loops, one per instruction set, all computing the same bits:
//! - `decode`: `out[k] = round(code[q(f)] · scale(f))` over a flat range, where `round` is the
//!   view's `Rounding` (none for a plain dequantize);
//! - `dot`: for R input rows at once, `Σ_k w(f_k) · x[k]` with `w` as in `decode`. From the
//!   first even flat index the row is cut into 16-element chunks; chunk `c` accumulates with
//!   fused multiply-adds into accumulator `c mod 4` (four independent chains hide the FMA
//!   latency), 16 lanes each. The result is `tree((a0 + a1) + (a2 + a3)) + tail`, with the
//!   fixed tree `(l + l⁺⁸) → (+⁴) → (+²) → (+¹)` and a sequential fused tail (an odd leading
//!   element and the last `< 16`);
//! - `axpy`: `y[k] = fma(a, w[k], y[k])`.
//!
//! The SIMD paths build one 16-entry table per block, `round(code · scale)`, and look every
//! weight up in it: the same values as multiplying after the lookup, one multiply per block.
//! The caller has checked that the chosen [`Isa`] is supported by this CPU.

use super::isa::Isa;
use super::view::Q4View;

/// `round(code · scale)` of flat element `f` (the reference's value).
#[inline]
pub(super) fn weight(v: &Q4View, f: usize) -> f32 {
    v.round.apply(v.code[v.nibble(f)] * v.scales[v.block(f)])
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
pub(super) fn tree(l: &[f32; 16]) -> f32 {
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
        // The loops are instantiated with and without rounding: the rounding code (constants,
        // branches) in the plain loop would cost registers the accumulators need.
        Isa::Avx512 if v.round.is_none() => unsafe { x86::dot_avx512::<R, false>(v, s, e, xs) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx512 => unsafe { x86::dot_avx512::<R, true>(v, s, e, xs) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 if v.round.is_none() => unsafe { x86::dot_avx2::<R, false>(v, s, e, xs) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::dot_avx2::<R, true>(v, s, e, xs) },
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

/// Rows of a tile of [`tile_dots`]: input rows and weight rows.
pub(super) const TILE: usize = 4;

/// The 4×4 dot products of decoded weight rows `ws` with input rows `xs` (all `n` long, `n`
/// even: each row starts at an even flat index, so there is no head element), in exactly the
/// order of [`dot`]: chunk `c` into chain `c mod 4`, `tree((c0 + c1) + (c2 + c3)) + tail`. The
/// chains are computed one after the other, so a 4×4 register tile serves all 16 outputs:
/// every weight load feeds four inputs and every input load four weights. AVX-512 and AVX2
/// (`None` on the portable path: the caller uses [`dot`], which gives the same bits).
pub(super) fn tile_dots(isa: Isa, ws: [&[f32]; TILE], xs: [&[f32]; TILE], n: usize) -> Option<[[f32; TILE]; TILE]> {
    assert!(n.is_multiple_of(2) && ws.iter().chain(&xs).all(|r| r.len() >= n), "tile rows hold n values, n even");
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the caller checked `isa.supported()`; the lengths are checked above.
        Isa::Avx512 => Some(unsafe { x86::tile_avx512(ws, xs, n) }),
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => Some(unsafe { x86::tile_avx2(ws, xs, n) }),
        _ => None,
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod x86 {
    //! AVX2+FMA(+F16C) and AVX-512F versions. Unaligned loads throughout; every pointer
    //! offset is bounded by the slice lengths checked in the safe callers.

    use super::super::round::Prec;
    use super::{head, rest, weight, Q4View};
    use std::arch::x86_64::*;

    /// `_mm*_cvtps_ph` rounding: nearest even, no exceptions.
    const RNE: i32 = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;

    // ---- AVX-512 ----------------------------------------------------------------------

    /// The 16 table entries at `p` (high nibble first) for 8 packed bytes.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn codes16(p: *const u8, table: __m512) -> __m512 {
        let b = _mm_loadl_epi64(p as *const __m128i);
        let d = _mm_unpacklo_epi8(b, b);
        let w = _mm512_cvtepu8_epi32(d);
        let idx = _mm512_srlv_epi32(w, _mm512_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0));
        // permutexvar reads the low 4 bits of each index: the low nibble needs no mask.
        _mm512_permutexvar_ps(idx, table)
    }

    /// 32 table entries for 16 packed bytes at `p`.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn codes32(p: *const u8, table: __m512) -> (__m512, __m512) {
        let b = _mm_loadu_si128(p as *const __m128i);
        let sh = _mm512_setr_epi32(4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0, 4, 0);
        let lo = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(b, b)), sh);
        let hi = _mm512_srlv_epi32(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(b, b)), sh);
        (_mm512_permutexvar_ps(lo, table), _mm512_permutexvar_ps(hi, table))
    }

    /// 16 values cast to `p` and back; `nan_free` when no lane is NaN (bf16 then needs no
    /// NaN fix-up: adding the rounding bias to an infinity leaves it infinite).
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn round512(x: __m512, p: Prec, nan_free: bool) -> __m512 {
        match p {
            Prec::F32 => x,
            Prec::Bf16 if nan_free => {
                let b = _mm512_castps_si512(x);
                let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(b), _mm512_set1_epi32(1));
                let r = _mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)), lsb);
                _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32(0xffff_0000u32 as i32)))
            }
            Prec::Bf16 => _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(bf16x16(x)))),
            Prec::F16 => _mm512_cvtph_ps(_mm512_cvtps_ph::<RNE>(x)),
        }
    }

    /// One block's table: `round(code · scale)`. Codes are finite, so a finite scale makes
    /// no NaN.
    #[inline]
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn table512(v: &Q4View, code: __m512, scale: f32) -> __m512 {
        let t = _mm512_mul_ps(code, _mm512_set1_ps(scale));
        if v.round.is_none() {
            t
        } else {
            let ok = scale.is_finite();
            round512(round512(t, v.round.0[0], ok), v.round.0[1], ok)
        }
    }

    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub(super) unsafe fn decode_avx512(v: &Q4View, s: usize, e: usize, out: &mut [f32]) {
        let code = _mm512_loadu_ps(v.code.as_ptr());
        for (ss, se, scale) in v.segments(s, e) {
            let t = table512(v, code, scale);
            let mut f = ss;
            if f % 2 == 1 {
                out[f - s] = weight(v, f);
                f += 1;
            }
            let o = out.as_mut_ptr();
            let p = v.packed.as_ptr();
            while f + 32 <= se {
                let (a, b) = codes32(p.add(f / 2), t);
                _mm512_storeu_ps(o.add(f - s), a);
                _mm512_storeu_ps(o.add(f + 16 - s), b);
                f += 32;
            }
            while f + 16 <= se {
                _mm512_storeu_ps(o.add(f - s), codes16(p.add(f / 2), t));
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
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn bf16x16(x: __m512) -> __m256i {
        let b = _mm512_castps_si512(x);
        let hi = _mm512_srli_epi32(b, 16);
        let lsb = _mm512_and_si512(hi, _mm512_set1_epi32(1));
        let r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x7fff)), lsb), 16);
        let nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
        let q = _mm512_or_si512(hi, _mm512_set1_epi32(0x40));
        _mm512_cvtepi32_epi16(_mm512_mask_blend_epi32(nan, r, q))
    }

    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub(super) unsafe fn decode_bf16_avx512(v: &Q4View, s: usize, e: usize, out: &mut [u16]) {
        let code = _mm512_loadu_ps(v.code.as_ptr());
        for (ss, se, scale) in v.segments(s, e) {
            let t = table512(v, code, scale);
            let mut f = ss;
            if f % 2 == 1 {
                out[f - s] = super::bf16_bits(weight(v, f));
                f += 1;
            }
            let o = out.as_mut_ptr();
            let p = v.packed.as_ptr();
            while f + 32 <= se {
                let (a, b) = codes32(p.add(f / 2), t);
                _mm256_storeu_si256(o.add(f - s) as *mut __m256i, bf16x16(a));
                _mm256_storeu_si256(o.add(f + 16 - s) as *mut __m256i, bf16x16(b));
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
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    unsafe fn tree512(a: __m512) -> f32 {
        let lo = _mm512_castps512_ps256(a);
        let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1));
        tree256(_mm256_add_ps(lo, hi))
    }

    /// The tree from 8 lanes: `(+⁴) → (+²) → (+¹)`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tree256(s8: __m256) -> f32 {
        let s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
        let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
        _mm_cvtss_f32(_mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1)))
    }

    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    #[allow(unused_assignments)] // the table cache's last update in the unrolled tail
    pub(super) unsafe fn dot_avx512<const R: usize, const ROUND: bool>(
        v: &Q4View,
        s: usize,
        e: usize,
        xs: [&[f32]; R],
    ) -> [f32; R] {
        let code = _mm512_loadu_ps(v.code.as_ptr());
        let mut tail = [0f32; R];
        let mut f = head(v, s, e, &xs, &mut tail);
        let z = _mm512_setzero_ps();
        let (mut a0, mut a1, mut a2, mut a3) = ([z; R], [z; R], [z; R], [z; R]);
        // The table of block `cur_b`.
        let (mut cur_b, mut cur_t) = (usize::MAX, z);
        let p = v.packed.as_ptr();
        let xp: [*const f32; R] = std::array::from_fn(|r| xs[r].as_ptr().wrapping_sub(s));
        // No function calls in the loop bodies: they would spill every accumulator.
        macro_rules! table {
            ($b:expr) => {{
                let b = $b;
                if cur_b != b {
                    cur_b = b;
                    let sc = *v.scales.get_unchecked(b);
                    cur_t = if ROUND { table512(v, code, sc) } else { _mm512_mul_ps(code, _mm512_set1_ps(sc)) };
                }
                cur_t
            }};
        }
        // One 16-element chunk into accumulator `$a`.
        macro_rules! chunk {
            ($a:ident) => {{
                let b0 = v.block(f);
                let w = if b0 == v.block(f + 15) {
                    codes16(p.add(f / 2), table!(b0))
                } else {
                    // Blocks hold at least 32 elements: a chunk straddles one boundary at most.
                    let first = ((b0 + 1) << v.shift) - f;
                    let w0 = codes16(p.add(f / 2), table!(b0));
                    let w1 = codes16(p.add(f / 2), table!(b0 + 1));
                    _mm512_mask_blend_ps(((1u32 << first) - 1) as __mmask16, w1, w0)
                };
                for r in 0..R {
                    $a[r] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xp[r].wrapping_add(f)), $a[r]);
                }
                f += 16;
            }};
        }
        // A chunk whose weights are already looked up.
        macro_rules! chunk_w {
            ($a:ident, $w:expr, $off:expr) => {{
                let w = $w;
                for r in 0..R {
                    $a[r] = _mm512_fmadd_ps(w, _mm512_loadu_ps(xp[r].wrapping_add(f + $off)), $a[r]);
                }
            }};
        }
        while f + 64 <= e {
            let b = v.block(f);
            if b == v.block(f + 63) {
                // Four chunks inside one block: one table, no per-chunk checks.
                let t = table!(b);
                let (c0, c1) = codes32(p.add(f / 2), t);
                let (c2, c3) = codes32(p.add(f / 2 + 16), t);
                chunk_w!(a0, c0, 0);
                chunk_w!(a1, c1, 16);
                chunk_w!(a2, c2, 32);
                chunk_w!(a3, c3, 48);
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

    /// See `tile_dots`: outputs `[input row][weight row]`.
    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
    pub(super) unsafe fn tile_avx512(ws: [&[f32]; 4], xs: [&[f32]; 4], n: usize) -> [[f32; 4]; 4] {
        let z = _mm512_setzero_ps();
        let chunks = n / 16;
        // Chain sums [chain][input row][weight row].
        let mut cs = [[[z; 4]; 4]; 4];
        for (k, ck) in cs.iter_mut().enumerate() {
            let mut acc = [[z; 4]; 4];
            let mut c = k;
            while c < chunks {
                let off = 16 * c;
                let w: [__m512; 4] = std::array::from_fn(|j| _mm512_loadu_ps(ws[j].as_ptr().add(off)));
                for i in 0..4 {
                    let xv = _mm512_loadu_ps(xs[i].as_ptr().add(off));
                    for j in 0..4 {
                        acc[i][j] = _mm512_fmadd_ps(w[j], xv, acc[i][j]);
                    }
                }
                c += 4;
            }
            *ck = acc;
        }
        let mut out = [[0f32; 4]; 4];
        for i in 0..4 {
            for j in 0..4 {
                let l = _mm512_add_ps(_mm512_add_ps(cs[0][i][j], cs[1][i][j]), _mm512_add_ps(cs[2][i][j], cs[3][i][j]));
                let mut tail = 0f32;
                for f in chunks * 16..n {
                    tail = ws[j][f].mul_add(xs[i][f], tail);
                }
                out[i][j] = tree512(l) + tail;
            }
        }
        out
    }

    #[target_feature(enable = "avx512f,avx2,fma,f16c")]
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

    /// 8 table entries for 4 packed bytes at `p`; `tl`/`th` are entries 0..8 and 8..16.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
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

    /// 8 values cast to `p` and back (bf16 as `half`: nearest even, quiet NaN); `nan_free`
    /// as in `round512`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn round256(x: __m256, p: Prec, nan_free: bool) -> __m256 {
        match p {
            Prec::F32 => x,
            Prec::Bf16 if nan_free => {
                let b = _mm256_castps_si256(x);
                let lsb = _mm256_and_si256(_mm256_srli_epi32::<16>(b), _mm256_set1_epi32(1));
                let r = _mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7fff)), lsb);
                _mm256_castsi256_ps(_mm256_and_si256(r, _mm256_set1_epi32(0xffff_0000u32 as i32)))
            }
            Prec::Bf16 => {
                let b = _mm256_castps_si256(x);
                let hi = _mm256_srli_epi32::<16>(b);
                let lsb = _mm256_and_si256(hi, _mm256_set1_epi32(1));
                let r = _mm256_srli_epi32::<16>(_mm256_add_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x7fff)), lsb));
                let q = _mm256_or_si256(hi, _mm256_set1_epi32(0x40));
                let nan = _mm256_castps_si256(_mm256_cmp_ps::<_CMP_UNORD_Q>(x, x));
                _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_blendv_epi8(r, q, nan)))
            }
            Prec::F16 => _mm256_cvtph_ps(_mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(x)),
        }
    }

    /// One block's table halves: `round(code · scale)` (NaN-free when the scale is finite).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in crate::quant::kernels) unsafe fn table256(
        v: &Q4View,
        cl: __m256,
        ch: __m256,
        scale: f32,
    ) -> (__m256, __m256) {
        let sc = _mm256_set1_ps(scale);
        let (l, h) = (_mm256_mul_ps(cl, sc), _mm256_mul_ps(ch, sc));
        if v.round.is_none() {
            (l, h)
        } else {
            let ([r0, r1], ok) = (v.round.0, scale.is_finite());
            (round256(round256(l, r0, ok), r1, ok), round256(round256(h, r0, ok), r1, ok))
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn decode_avx2(v: &Q4View, s: usize, e: usize, out: &mut [f32]) {
        let cl = _mm256_loadu_ps(v.code.as_ptr());
        let ch = _mm256_loadu_ps(v.code.as_ptr().add(8));
        for (ss, se, scale) in v.segments(s, e) {
            let (tl, th) = table256(v, cl, ch, scale);
            let mut f = ss;
            if f % 2 == 1 {
                out[f - s] = weight(v, f);
                f += 1;
            }
            let o = out.as_mut_ptr();
            let p = v.packed.as_ptr();
            while f + 8 <= se {
                _mm256_storeu_ps(o.add(f - s), codes8(p.add(f / 2), tl, th));
                f += 8;
            }
            while f < se {
                out[f - s] = weight(v, f);
                f += 1;
            }
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    #[allow(unused_assignments)] // the table cache's last update in the unrolled tail
    pub(super) unsafe fn dot_avx2<const R: usize, const ROUND: bool>(
        v: &Q4View,
        s: usize,
        e: usize,
        xs: [&[f32]; R],
    ) -> [f32; R] {
        let cl = _mm256_loadu_ps(v.code.as_ptr());
        let ch = _mm256_loadu_ps(v.code.as_ptr().add(8));
        let mut tail = [0f32; R];
        let mut f = head(v, s, e, &xs, &mut tail);
        let z = _mm256_setzero_ps();
        // Accumulator q as (lanes 0..8, lanes 8..16).
        let (mut a0l, mut a0h, mut a1l, mut a1h) = ([z; R], [z; R], [z; R], [z; R]);
        let (mut a2l, mut a2h, mut a3l, mut a3h) = ([z; R], [z; R], [z; R], [z; R]);
        // The table of block `cur_b`.
        let (mut cur_b, mut cur_l, mut cur_h) = (usize::MAX, z, z);
        let p = v.packed.as_ptr();
        let xp: [*const f32; R] = std::array::from_fn(|r| xs[r].as_ptr().wrapping_sub(s));
        macro_rules! table {
            ($b:expr) => {{
                let b = $b;
                if cur_b != b {
                    cur_b = b;
                    let sc = *v.scales.get_unchecked(b);
                    (cur_l, cur_h) = if ROUND {
                        table256(v, cl, ch, sc)
                    } else {
                        let s = _mm256_set1_ps(sc);
                        (_mm256_mul_ps(cl, s), _mm256_mul_ps(ch, s))
                    };
                }
                (cur_l, cur_h)
            }};
        }
        macro_rules! chunk {
            ($lo:ident, $hi:ident) => {{
                let b0 = v.block(f);
                let (w0, w1) = if b0 == v.block(f + 15) {
                    let (tl, th) = table!(b0);
                    (codes8(p.add(f / 2), tl, th), codes8(p.add(f / 2 + 4), tl, th))
                } else {
                    // At most one boundary in a chunk; lanes before it take the first table.
                    let first = _mm256_set1_epi32((((b0 + 1) << v.shift) - f) as i32);
                    let m0 = _mm256_cmpgt_epi32(first, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
                    let m1 = _mm256_cmpgt_epi32(first, _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15));
                    let (al, ah) = table!(b0);
                    let (x0, x1) = (codes8(p.add(f / 2), al, ah), codes8(p.add(f / 2 + 4), al, ah));
                    let (bl, bh) = table!(b0 + 1);
                    let (y0, y1) = (codes8(p.add(f / 2), bl, bh), codes8(p.add(f / 2 + 4), bl, bh));
                    (
                        _mm256_blendv_ps(y0, x0, _mm256_castsi256_ps(m0)),
                        _mm256_blendv_ps(y1, x1, _mm256_castsi256_ps(m1)),
                    )
                };
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

    /// See `tile_dots`: outputs `[input row][weight row]`. A 16-lane chain is two 8-lane
    /// halves, each lane accumulating on its own, so each (chain, half) is computed in turn, for
    /// two weight rows at a time: 8 accumulators, 2 weight registers, one input register; per 8
    /// fused multiply-adds 6 loads.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn tile_avx2(ws: [&[f32]; 4], xs: [&[f32]; 4], n: usize) -> [[f32; 4]; 4] {
        let z = _mm256_setzero_ps();
        let chunks = n / 16;
        // Chain sums [chain][half][input row][weight row], carried across pieces of the rows
        // small enough for the eight rows' pieces to stay in L1 (32 chunks: 16 KiB); each lane
        // still sees its chunks in order.
        const PIECE: usize = 32;
        let mut cs = [[[[z; 4]; 4]; 2]; 4];
        for c0 in (0..chunks).step_by(PIECE) {
            let c1 = (c0 + PIECE).min(chunks);
            for (k, ck) in cs.iter_mut().enumerate() {
                for (h, ch) in ck.iter_mut().enumerate() {
                    for j0 in [0, 2] {
                        let mut acc: [[__m256; 2]; 4] = std::array::from_fn(|i| [ch[i][j0], ch[i][j0 + 1]]);
                        let mut c = c0 + k;
                        while c < c1 {
                            let off = 16 * c + 8 * h;
                            let w0 = _mm256_loadu_ps(ws[j0].as_ptr().add(off));
                            let w1 = _mm256_loadu_ps(ws[j0 + 1].as_ptr().add(off));
                            for (i, a) in acc.iter_mut().enumerate() {
                                let xv = _mm256_loadu_ps(xs[i].as_ptr().add(off));
                                a[0] = _mm256_fmadd_ps(w0, xv, a[0]);
                                a[1] = _mm256_fmadd_ps(w1, xv, a[1]);
                            }
                            c += 4;
                        }
                        for (i, a) in acc.iter().enumerate() {
                            ch[i][j0] = a[0];
                            ch[i][j0 + 1] = a[1];
                        }
                    }
                }
            }
        }
        let mut out = [[0f32; 4]; 4];
        for i in 0..4 {
            for j in 0..4 {
                let half = |h: usize| {
                    _mm256_add_ps(
                        _mm256_add_ps(cs[0][h][i][j], cs[1][h][i][j]),
                        _mm256_add_ps(cs[2][h][i][j], cs[3][h][i][j]),
                    )
                };
                let mut tail = 0f32;
                for f in chunks * 16..n {
                    tail = ws[j][f].mul_add(xs[i][f], tail);
                }
                out[i][j] = tree256(_mm256_add_ps(half(0), half(1))) + tail;
            }
        }
        out
    }

    #[target_feature(enable = "avx2,fma,f16c")]
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
