//! The fused 4-bit products, never materialising the dequantized weight `W [rows, cols]`:
//! - [`matmul_nt`]: `y = x · Wᵀ` (the forward of a 4-bit linear; a matrix-vector product
//!   when `x` has one row). For batches of at least 4 rows on AVX-512 and AVX2, a panel of
//!   weight rows (about 256 KiB) is decoded once into a scratch buffer and multiplied four
//!   rows at a time by a 4×4 register tile (`simd::tile_dots`). Otherwise weights are decoded once per 16 and reused across up
//!   to 2 (AVX2, portable) or 4 (AVX-512) input rows; on AVX2, f32 or bf16-rounded weights in
//!   rows of a multiple of 32 (blocks ≥ 32) are looked up by byte planes (`permuted`), the
//!   inputs permuted once per call. Threads split the output features.
//! - [`matmul_nn`]: `dx = g · W` (the backward with respect to the input). Threads split
//!   the input features; each weight row piece is decoded once into a small scratch buffer.
//!
//! Every output element is computed by one thread in a fixed order, so results do not
//! depend on the thread count, the batch size or the instruction set.

use rayon::prelude::*;

use super::isa::Isa;
use super::permuted;
use super::simd;
use super::view::Q4View;
use crate::error::{Error, Result};

/// Below this many multiply-adds one thread does it all.
const PAR_MIN: usize = 1 << 16;

fn check(v: &Q4View, isa: Isa, what: &str, a: (usize, usize), b: (usize, usize)) -> Result<()> {
    if !isa.supported() {
        return Err(Error::Msg(format!("this CPU cannot run the {} kernels", isa.name())));
    }
    if a.0 != a.1 || b.0 != b.1 {
        return Err(Error::Msg(format!(
            "{what}: buffers of {} and {} values do not fit a {}x{} weight (expected {} and {})",
            a.0, b.0, v.rows, v.cols, a.1, b.1
        )));
    }
    Ok(())
}

/// Rows of x per decoded weight chunk.
fn group(isa: Isa) -> usize {
    // Four accumulators per row must stay in registers: 16 of the 32 zmm, 16 of the 16 ymm
    // (AVX2 then spills a little; the bits are the same either way).
    if isa == Isa::Avx512 {
        4
    } else {
        2
    }
}

/// The dot products of weight row `o` with input rows `x[m0..m0+n]`, into `out[..n]`
/// (`n` ≤ [`group`]'s largest, 4).
fn row_dots(v: &Q4View, isa: Isa, o: usize, x: &[f32], m0: usize, n: usize, out: &mut [f32]) {
    let (s, e) = (o * v.cols, (o + 1) * v.cols);
    let c = v.cols;
    let xr = |r: usize| &x[(m0 + r) * c..(m0 + r + 1) * c];
    macro_rules! go {
        ($($k:literal),*) => {
            match n {
                $($k => {
                    let d = simd::dot::<$k>(isa, v, s, e, std::array::from_fn(xr));
                    out[..$k].copy_from_slice(&d);
                })*
                _ => unreachable!("group sizes are 1..=4"),
            }
        };
    }
    // Only the sizes `group` can ask for are compiled (each is a separate SIMD kernel).
    go!(1, 2, 3, 4);
}

/// [`row_dots`] on the permuted path: `xp` holds every input row permuted
/// ([`permuted::permute_input`]).
#[allow(clippy::too_many_arguments)]
fn row_dots_permuted(v: &Q4View, isa: Isa, o: usize, x: &[f32], xp: &[f32], m0: usize, n: usize, out: &mut [f32]) {
    let (s, e) = (o * v.cols, (o + 1) * v.cols);
    let (c, cp) = (v.cols, v.cols / permuted::STEP * permuted::STEP);
    let xr = |r: usize| &x[(m0 + r) * c..(m0 + r + 1) * c];
    let xpr = |r: usize| &xp[(m0 + r) * cp..(m0 + r + 1) * cp];
    macro_rules! go {
        ($($k:literal),*) => {
            match n {
                $($k => {
                    let d = permuted::dot::<$k>(isa, v, s, e, std::array::from_fn(xr), std::array::from_fn(xpr));
                    out[..$k].copy_from_slice(&d);
                })*
                _ => unreachable!("group sizes are 1..=4"),
            }
        };
    }
    go!(1, 2, 3, 4);
}

/// The tiled form of [`matmul_nt`] for `yt [rows, m]` rows `o0..`: a panel of weight rows
/// (as many as fit in about 256 KiB, a multiple of [`simd::TILE`]) is decoded once into a
/// scratch buffer, then for each group of [`simd::TILE`] input rows every tile of the panel
/// is multiplied by a register tile. The panel and one input group stay in L2 while they are
/// reused (with one tile per decode the whole input was streamed again for every four weight
/// rows). Same bits as the row-by-row form.
fn fill_tiled(v: &Q4View, isa: Isa, x: &[f32], m: usize, o0: usize, yt: &mut [f32]) {
    const T: usize = simd::TILE;
    let c = v.cols;
    let nrows = yt.len() / m;
    let panel = ((PANEL_FLOATS / c) / T * T).max(T);
    let mut scratch = vec![0f32; panel.min(nrows.next_multiple_of(T)) * c];
    for p0 in (0..nrows).step_by(panel) {
        let np = panel.min(nrows - p0);
        for j in 0..np {
            let o = o0 + p0 + j;
            simd::decode(isa, v, o * c, (o + 1) * c, &mut scratch[j * c..(j + 1) * c]);
        }
        for m0 in (0..m).step_by(T) {
            let nm = T.min(m - m0);
            let xs: [&[f32]; T] = std::array::from_fn(|i| {
                let r = m0 + i.min(nm - 1);
                &x[r * c..(r + 1) * c]
            });
            for b0 in (0..np).step_by(T) {
                let nb = T.min(np - b0);
                // Short tiles repeat their last row; the repeats' results are dropped.
                let ws: [&[f32]; T] = std::array::from_fn(|j| {
                    let r = b0 + j.min(nb - 1);
                    &scratch[r * c..(r + 1) * c]
                });
                let d = simd::tile_dots(isa, ws, xs, c).expect("tiled only where supported");
                for (i, di) in d.iter().enumerate().take(nm) {
                    for (j, dij) in di.iter().enumerate().take(nb) {
                        yt[(p0 + b0 + j) * m + m0 + i] = *dij;
                    }
                }
            }
        }
    }
}

/// Decoded weight values per panel of [`fill_tiled`] (256 KiB of f32: half of a 512 KiB L2, as
/// on Zen 3, leaving room for an input group).
const PANEL_FLOATS: usize = 1 << 16;

/// `y[m, o] = Σ_i x[m, i] · W[o, i]`; `x` is `[m, cols]`, `y` is `[m, rows]`, row-major.
pub fn matmul_nt(v: &Q4View, x: &[f32], m: usize, y: &mut [f32], isa: Isa) -> Result<()> {
    check(v, isa, "matmul_nt", (x.len(), m * v.cols), (y.len(), m * v.rows))?;
    if m == 0 || v.rows == 0 {
        return Ok(());
    }
    // Batches: a register tile over decoded rows, where the rows start at even flat indices.
    if matches!(isa, Isa::Avx512 | Isa::Avx2) && m >= simd::TILE && v.cols.is_multiple_of(2) && v.cols >= 16 {
        let mut yt = vec![0f32; m * v.rows];
        run_rows(v, m, &mut yt, |o0, yt| fill_tiled(v, isa, x, m, o0, yt));
        transpose_into(&yt, m, v.rows, y);
        return Ok(());
    }
    let g = group(isa);
    // AVX2 with byte-plane lookups where it applies: the inputs permuted once per call.
    let permuted: Option<Vec<f32>> =
        permuted::applies(isa, v).then(|| x.chunks(v.cols).flat_map(|r| permuted::permute_input(v, r)).collect());
    // Work on yᵀ [rows, m] so that each task owns a contiguous piece.
    let fill = |o0: usize, yt: &mut [f32]| {
        for (k, yo) in yt.chunks_mut(m).enumerate() {
            let mut m0 = 0;
            while m0 < m {
                let n = g.min(m - m0);
                match &permuted {
                    Some(xp) => row_dots_permuted(v, isa, o0 + k, x, xp, m0, n, &mut yo[m0..m0 + n]),
                    None => row_dots(v, isa, o0 + k, x, m0, n, &mut yo[m0..m0 + n]),
                }
                m0 += n;
            }
        }
    };
    if m == 1 {
        run_rows(v, m, y, fill);
        return Ok(());
    }
    let mut yt = vec![0f32; m * v.rows];
    run_rows(v, m, &mut yt, fill);
    transpose_into(&yt, m, v.rows, y);
    Ok(())
}

/// `y [m, rows] = ytᵀ`.
fn transpose_into(yt: &[f32], m: usize, rows: usize, y: &mut [f32]) {
    for (o, col) in yt.chunks(m).enumerate() {
        for (mi, val) in col.iter().enumerate() {
            y[mi * rows + o] = *val;
        }
    }
}

/// Split `[rows, m]` output over threads by weight rows.
fn run_rows(v: &Q4View, m: usize, yt: &mut [f32], fill: impl Fn(usize, &mut [f32]) + Sync) {
    if v.numel() * m < PAR_MIN {
        fill(0, yt);
        return;
    }
    let rows_per = v.rows.div_ceil(8 * rayon::current_num_threads()).max(1);
    yt.par_chunks_mut(rows_per * m).enumerate().for_each(|(t, c)| fill(t * rows_per, c));
}

/// `dx[m, i] = Σ_o g[m, o] · W[o, i]`; `g` is `[m, rows]`, `dx` is `[m, cols]`, row-major.
pub fn matmul_nn(v: &Q4View, g: &[f32], m: usize, dx: &mut [f32], isa: Isa) -> Result<()> {
    check(v, isa, "matmul_nn", (g.len(), m * v.rows), (dx.len(), m * v.cols))?;
    if m == 0 || v.cols == 0 {
        return Ok(());
    }
    let (rows, cols) = (v.rows, v.cols);
    // One task: columns [i0, i1) for every input row, accumulated over o in order.
    let task = |i0: usize, i1: usize| -> Vec<f32> {
        let w = i1 - i0;
        let mut acc = vec![0f32; m * w];
        let mut scratch = vec![0f32; w];
        for o in 0..rows {
            simd::decode(isa, v, o * cols + i0, o * cols + i1, &mut scratch);
            for (mi, a) in acc.chunks_mut(w).enumerate() {
                simd::axpy(isa, g[mi * rows + o], &scratch, a);
            }
        }
        acc
    };
    let width = if v.numel() * m < PAR_MIN {
        cols
    } else {
        (cols.div_ceil(4 * rayon::current_num_threads()).div_ceil(16) * 16).max(16)
    };
    let starts: Vec<usize> = (0..cols).step_by(width).collect();
    let parts: Vec<Vec<f32>> = if starts.len() == 1 {
        vec![task(0, cols)]
    } else {
        starts.par_iter().map(|&i0| task(i0, (i0 + width).min(cols))).collect()
    };
    for (&i0, part) in starts.iter().zip(&parts) {
        let w = (i0 + width).min(cols) - i0;
        for (mi, p) in part.chunks(w).enumerate() {
            dx[mi * cols + i0..mi * cols + i0 + w].copy_from_slice(p);
        }
    }
    Ok(())
}
