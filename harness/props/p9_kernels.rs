//! P9 — fast 4-bit kernels equal the oracle: on random shapes (odd sizes, partial blocks,
//! rows straddling blocks, and rows of whole 64-element steps), every blocksize from 32 to
//! 4096, NF4 and FP4, plain and nested scales:
//! - dequantization is bitwise equal to [`Quantized4::dequantize`], cast through the
//!   case's rounding (none, or the original and compute dtypes of a bf16/f16 QLoRA layer:
//!   bitsandbytes multiplies the weight *after* those casts);
//! - `y = x·Wᵀ` and `dx = g·W` agree with an f64 product over those weights within
//!   `1e-5 · Σ|w·x|` (f32 accumulation over at most a few hundred terms: about `n·2⁻²⁴`);
//! - a row of `x·Wᵀ` is the same bits whether computed alone or in a batch.
//!
//! The kernels come in through [`Q4Kernels`], so another implementation — or a mutant — is
//! checked the same way.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestError, TestRunner};

use crate::props::property::{Body, Property};
use crate::props::runner::{FailReason, PropConfig, Verdict};
use crate::quant::kernels::{dequantize_f32_into, matmul_nn, matmul_nt, Isa, Prec, Q4View, Rounding};
use crate::quant::{quantize, QuantType, Quantized4};

/// The catalogue entry (tunecheck's fastest kernels on this CPU; [`kernels_match_oracle`]
/// takes any other implementation).
pub const PROPERTY: Property = Property {
    id: "P9",
    test_name: "p9_kernels_match_oracle",
    title: "fast 4-bit kernels == reference",
    invariant: "random shapes, blocksizes 32–4096, NF4/FP4, nested scales, every weight rounding (original then \
                compute dtype): dequantize equal; `x·Wᵀ` and `g·W` close to an f64 product; a row's result \
                independent of the batch",
    tolerance: "dequantize bitwise; products 1e-5·Σ|w·x| (f32 accumulation); batch rows bitwise",
    kinds: &[],
    dtypes: &[],
    needs: crate::subject::Capabilities::none(),
    grad_accum: 1,
    filter: None,
    draws: crate::strategy::Draws::NONE,
    body: Body::Kernels(|cfg| kernels_match_oracle(&crate::quant::kernels::Isa::best(), cfg)),
};

/// The three operations under test.
pub trait Q4Kernels: Sync {
    /// Name for reports.
    fn name(&self) -> String;
    /// `out = dequantize(v)`.
    fn dequantize(&self, v: &Q4View, out: &mut [f32]);
    /// `y [m, rows] = x [m, cols] · Wᵀ`.
    fn matmul_nt(&self, v: &Q4View, x: &[f32], m: usize, y: &mut [f32]);
    /// `dx [m, cols] = g [m, rows] · W`.
    fn matmul_nn(&self, v: &Q4View, g: &[f32], m: usize, dx: &mut [f32]);
}

/// tunecheck's kernels on one instruction set.
impl Q4Kernels for Isa {
    fn name(&self) -> String {
        format!("tunecheck/{}", Isa::name(*self))
    }
    fn dequantize(&self, v: &Q4View, out: &mut [f32]) {
        dequantize_f32_into(v, *self, out).expect("supported isa, matching sizes");
    }
    fn matmul_nt(&self, v: &Q4View, x: &[f32], m: usize, y: &mut [f32]) {
        matmul_nt(v, x, m, y, *self).expect("supported isa, matching sizes");
    }
    fn matmul_nn(&self, v: &Q4View, g: &[f32], m: usize, dx: &mut [f32]) {
        matmul_nn(v, g, m, dx, *self).expect("supported isa, matching sizes");
    }
}

/// One random case: the quantized weight, the batch size and the inputs.
#[derive(Debug, Clone)]
pub struct KernelCase {
    /// The weight.
    pub q: Quantized4,
    /// Input rows.
    pub m: usize,
    /// `[m, cols]`.
    pub x: Vec<f32>,
    /// `[m, rows]`.
    pub g: Vec<f32>,
    /// The casts of each decoded weight.
    pub round: Rounding,
}

/// A weight rounding: mostly none, else any pair of casts; shrinks toward none.
pub fn arb_rounding() -> impl Strategy<Value = Rounding> {
    let prec = || prop_oneof![Just(Prec::F32), Just(Prec::Bf16), Just(Prec::F16)];
    prop_oneof![2 => Just(Rounding::NONE), 3 => (prec(), prec()).prop_map(|(a, b)| Rounding([a, b]))]
}

prop_compose! {
    /// A random 4-bit weight, rounding and inputs; shrinks toward 1×1, blocksize 32, no
    /// rounding, one input row.
    pub fn arb_kernel_case()(
        rows in 1usize..24,
        // A quarter of the rows are whole 64-element steps (AVX2's byte-plane path).
        cols in prop_oneof![3 => 1usize..200, 1 => (1usize..4).prop_map(|k| 64 * k)],
        bs_log in 5u32..13,
        nf4 in any::<bool>(),
        dq in any::<bool>(),
        m in 1usize..10,
        seed in any::<u64>(),
        round in arb_rounding(),
    ) -> KernelCase {
        use rand_core::{RngCore, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut uni = |n: usize| -> Vec<f32> {
            (0..n).map(|_| (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32 * 4.0 - 2.0).collect()
        };
        let w = uni(rows * cols);
        let qt = if nf4 { QuantType::Nf4 } else { QuantType::Fp4 };
        let q = quantize(&w, &[rows, cols], qt, 1 << bs_log, dq).expect("finite values, valid blocksize");
        KernelCase { q, m, x: uni(m * cols), g: uni(m * rows), round }
    }
}

fn check_close(what: &str, got: &[f32], want: &[f64], mag: &[f64]) -> Result<(), TestCaseError> {
    for (i, ((g, w), a)) in got.iter().zip(want).zip(mag).enumerate() {
        let tol = 1e-5 * a + 1e-30;
        if (*g as f64 - w).abs() > tol {
            return Err(TestCaseError::fail(format!("{what}[{i}] = {g}, f64 reference {w} (tolerance {tol:.3e})")));
        }
    }
    Ok(())
}

/// `a [m, n_in] · B` in f64 with `B[j, out] = b(out, j)`: the products' sums and the sums of
/// their magnitudes (which scale the tolerance), each `[m, n_out]`.
fn reference(a: &[f32], m: usize, n_out: usize, n_in: usize, b: impl Fn(usize, usize) -> f32) -> (Vec<f64>, Vec<f64>) {
    let mut want = vec![0f64; m * n_out];
    let mut mag = vec![0f64; m * n_out];
    for mi in 0..m {
        for out in 0..n_out {
            for j in 0..n_in {
                let p = a[mi * n_in + j] as f64 * b(out, j) as f64;
                want[mi * n_out + out] += p;
                mag[mi * n_out + out] += p.abs();
            }
        }
    }
    (want, mag)
}

/// Check one case; `Err` describes the first violation.
pub fn check_case(k: &dyn Q4Kernels, c: &KernelCase) -> Result<(), TestCaseError> {
    let q = &c.q;
    let (rows, cols) = (q.shape[0], q.shape[1]);
    let scales = q.block_scales();
    let v = Q4View::new(&q.packed, &scales, q.quant_type.code(), q.blocksize, rows, cols)
        .map_err(|e| TestCaseError::fail(e.to_string()))?
        .with_rounding(c.round);
    let w: Vec<f32> = q.dequantize().into_iter().map(|x| c.round.apply(x)).collect();
    let mut got = vec![0f32; rows * cols];
    k.dequantize(&v, &mut got);
    if let Some(i) = got.iter().zip(&w).position(|(a, b)| a.to_bits() != b.to_bits()) {
        return Err(TestCaseError::fail(format!("dequantize[{i}] = {}, reference {}", got[i], w[i])));
    }
    // y = x·Wᵀ
    let m = c.m;
    let (want, mag) = reference(&c.x, m, rows, cols, |o, i| w[o * cols + i]);
    let mut y = vec![0f32; m * rows];
    k.matmul_nt(&v, &c.x, m, &mut y);
    check_close("x·Wᵀ", &y, &want, &mag)?;
    for mi in 0..m {
        let mut one = vec![0f32; rows];
        k.matmul_nt(&v, &c.x[mi * cols..(mi + 1) * cols], 1, &mut one);
        if one.iter().zip(&y[mi * rows..(mi + 1) * rows]).any(|(a, b)| a.to_bits() != b.to_bits()) {
            return Err(TestCaseError::fail(format!("row {mi} of x·Wᵀ differs when computed alone")));
        }
    }
    // dx = g·W
    let (want, mag) = reference(&c.g, m, cols, rows, |i, o| w[o * cols + i]);
    let mut dx = vec![0f32; m * cols];
    k.matmul_nn(&v, &c.g, m, &mut dx);
    check_close("g·W", &dx, &want, &mag)
}

/// Run P9 against `kernels` (8 × `cfg.cases` random cases from `cfg.seed`).
pub fn kernels_match_oracle(kernels: &dyn Q4Kernels, cfg: &PropConfig) -> Verdict {
    let cases = match cfg.effective_cases() {
        Ok(c) => c * 8,
        Err(e) => return Verdict::failed_with(FailReason::Config, e),
    };
    let config =
        Config { cases, source_file: cfg.source_file, failure_persistence: cfg.persistence(), ..Config::default() };
    let mut runner = TestRunner::new_with_rng(config, crate::props::seeding::seeded(cfg.seed));
    match runner.run(&arb_kernel_case(), |c| check_case(kernels, &c)) {
        Ok(()) => Verdict::passed_all(cases),
        Err(TestError::Fail(why, c)) => {
            let minimal = serde_json::json!({
                "rows": c.q.shape[0],
                "cols": c.q.shape[1],
                "blocksize": c.q.blocksize,
                "quant_type": c.q.quant_type.name(),
                "double_quant": matches!(c.q.absmax, crate::quant::Absmax::Nested { .. }),
                "input_rows": c.m,
                "rounding": format!("{:?}", c.round.0),
            });
            let code = match why.message() {
                m if m.starts_with("dequantize") => "dequantize",
                m if m.starts_with("row") => "batch_row",
                _ => "product",
            };
            Verdict::Failed {
                reason: FailReason::Violated { property: "P9".into(), code: code.into() },
                detail: format!("P9/{} violated [{code}]: {why}; minimal case {minimal}", kernels.name()),
                minimal,
                cases_run: 0,
                replay: None,
            }
        }
        Err(e) => Verdict::failed_with(FailReason::Error, format!("P9/{} could not run: {e}", kernels.name())),
    }
}
