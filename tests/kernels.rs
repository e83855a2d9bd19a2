//! The fast 4-bit kernels against the reference: P9 on every instruction set this CPU has,
//! its mutants caught, the same bits on every instruction set and thread count, bf16
//! rounding as `half`, the candle op's forward and backward, the QLoRA base in every
//! original/compute dtype pair against the dense casts, and CUDA vs CPU when a GPU exists.

use candle_core::{DType, Device, Tensor, Var};
use half::bf16;
use tunecheck::mutants::KernelBug;
use tunecheck::props::p9_kernels::kernels_match_oracle;
use tunecheck::props::runner::PropConfig;
use tunecheck::quant::kernels::{
    dequantize_bf16_into, dequantize_f32_into, matmul_nn, matmul_nt, Isa, Packed4, Q4View,
};
use tunecheck::quant::{quantize, QuantType, Quantized4};

fn cfg() -> PropConfig {
    PropConfig { cases: 8, seed: 7, ..PropConfig::default() }
}

fn values(n: usize, seed: u64) -> Vec<f32> {
    use rand_core::{RngCore, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| (rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0).collect()
}

fn big(rows: usize, cols: usize, bs: usize, qt: QuantType, dq: bool) -> Quantized4 {
    quantize(&values(rows * cols, 1), &[rows, cols], qt, bs, dq).unwrap()
}

#[test]
fn p9_holds_on_every_isa() {
    for isa in Isa::available() {
        let out = kernels_match_oracle(&isa, &cfg());
        assert!(out.passed(), "{}: {out:?}", isa.name());
    }
}

#[test]
fn p9_catches_every_kernel_mutant() {
    for bug in KernelBug::ALL {
        let out = kernels_match_oracle(&bug, &cfg());
        assert!(out.violates("P9", None), "P9 did not catch the {} mutant: {out:?}", bug.name());
    }
}

/// Run `f` on a one-thread rayon pool.
fn single_thread<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(f)
}

#[test]
fn same_bits_on_every_isa_and_thread_count() {
    // Large enough for the threaded paths; odd cols so rows start mid-byte and mid-block;
    // cols a multiple of 32 for AVX2's byte-plane path (whole 64-element steps, then one
    // 32-element rest with two blocks of 32 per step; and steps only, one block per step);
    // 8192 columns: batches go through several weight panels per thread, the last one short.
    for (rows, cols, bs, dq) in
        [(96, 771, 64, true), (64, 1024, 256, false), (40, 160, 32, true), (9, 64, 64, false), (150, 8192, 128, false)]
    {
        let q = big(rows, cols, bs, QuantType::Nf4, dq);
        let scales = q.block_scales();
        let v = Q4View::new(&q.packed, &scales, q.quant_type.code(), bs, rows, cols).unwrap();
        let m = 5;
        let x = values(m * cols, 2);
        let g = values(m * rows, 3);
        let run = |isa: Isa| {
            let mut y = vec![0f32; m * rows];
            let mut dx = vec![0f32; m * cols];
            let mut w = vec![0f32; rows * cols];
            matmul_nt(&v, &x, m, &mut y, isa).unwrap();
            matmul_nn(&v, &g, m, &mut dx, isa).unwrap();
            dequantize_f32_into(&v, isa, &mut w).unwrap();
            let bits = |s: &[f32]| s.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            (bits(&y), bits(&dx), bits(&w))
        };
        let base = run(Isa::Scalar);
        assert_eq!(base.2, q.dequantize().iter().map(|f| f.to_bits()).collect::<Vec<_>>());
        for isa in Isa::available() {
            assert_eq!(run(isa), base, "{} differs from scalar", isa.name());
            assert_eq!(single_thread(|| run(isa)), base, "{} on one thread differs", isa.name());
        }
        // Rounded weights (the compute-dtype casts), bf16 last among them: AVX2's two-plane
        // path where the shape allows it.
        use tunecheck::quant::kernels::{Prec, Rounding};
        for round in
            [[Prec::Bf16, Prec::Bf16], [Prec::F32, Prec::Bf16], [Prec::F16, Prec::Bf16], [Prec::F32, Prec::F16]]
        {
            let vr = v.with_rounding(Rounding(round));
            let prod = |isa: Isa| {
                let mut y = vec![0f32; m * rows];
                matmul_nt(&vr, &x, m, &mut y, isa).unwrap();
                y.iter().map(|f| f.to_bits()).collect::<Vec<_>>()
            };
            let want = prod(Isa::Scalar);
            for isa in Isa::available() {
                assert_eq!(prod(isa), want, "{} differs from scalar, {round:?}", isa.name());
                assert_eq!(single_thread(|| prod(isa)), want, "{} on one thread differs, {round:?}", isa.name());
            }
        }
    }
}

#[test]
fn bf16_output_rounds_like_half() {
    let q = big(33, 517, 128, QuantType::Fp4, true);
    let mut scales = q.block_scales();
    // A NaN scale and a value that rounds up to infinity must convert like `half` too.
    scales[3] = f32::NAN;
    scales[5] = f32::MAX;
    let v = Q4View::new(&q.packed, &scales, q.quant_type.code(), 128, 33, 517).unwrap();
    let mut want = vec![0f32; v.numel()];
    dequantize_f32_into(&v, Isa::Scalar, &mut want).unwrap();
    let want: Vec<u16> = want.iter().map(|f| bf16::from_f32(*f).to_bits()).collect();
    for isa in Isa::available() {
        let mut got = vec![bf16::ZERO; v.numel()];
        dequantize_bf16_into(&v, isa, &mut got).unwrap();
        let got: Vec<u16> = got.iter().map(|b| b.to_bits()).collect();
        assert_eq!(got, want, "{}", isa.name());
    }
}

#[test]
fn rounded_weights_with_non_finite_scales_match_half_on_every_isa() {
    // 301 columns: the general paths; 320: AVX2's byte-plane path too.
    for cols in [301, 320] {
        non_finite_scales_case(9, cols);
    }
}

fn non_finite_scales_case(rows: usize, cols: usize) {
    use tunecheck::quant::kernels::{Prec, Rounding};
    let q = big(rows, cols, 64, QuantType::Nf4, false);
    let mut scales = q.block_scales();
    // NaN, ±infinity (code 0 × ∞ is NaN), a value that rounds up to infinity, and one in f16's
    // subnormal range.
    scales[2] = f32::NAN;
    scales[4] = f32::INFINITY;
    scales[6] = -f32::INFINITY;
    scales[8] = f32::MAX;
    scales[10] = 3e-6;
    let plain = Q4View::new(&q.packed, &scales, q.quant_type.code(), 64, rows, cols).unwrap();
    let mut w = vec![0f32; plain.numel()];
    dequantize_f32_into(&plain, Isa::Scalar, &mut w).unwrap();
    let ps = [Prec::F32, Prec::Bf16, Prec::F16];
    for round in ps.iter().flat_map(|a| ps.iter().map(move |b| Rounding([*a, *b]))) {
        let v = plain.with_rounding(round);
        let want: Vec<u32> = w.iter().map(|x| round.apply(*x).to_bits()).collect();
        for isa in Isa::available() {
            let mut got = vec![0f32; v.numel()];
            dequantize_f32_into(&v, isa, &mut got).unwrap();
            let got: Vec<u32> = got.iter().map(|x| x.to_bits()).collect();
            assert_eq!(got, want, "{} {:?}", isa.name(), round.0);
            // The products look weights up in the same tables: y = W·e_i picks column i.
            for i in [0, 77, cols - 1] {
                let mut e = vec![0f32; cols];
                e[i] = 1.0;
                let mut y = vec![0f32; rows];
                matmul_nt(&v, &e, 1, &mut y, isa).unwrap();
                for o in 0..rows {
                    // 0·NaN and 0·∞ are NaN: only rows whose weights are all finite pick cleanly.
                    let row = &want[o * cols..(o + 1) * cols];
                    if row.iter().all(|b| f32::from_bits(*b).is_finite()) {
                        assert_eq!(y[o].to_bits(), row[i], "{} {:?} W[{o},{i}]", isa.name(), round.0);
                    }
                }
            }
        }
    }
}

#[test]
fn kernels_refuse_wrong_sizes_with_a_message() {
    let q = big(4, 64, 64, QuantType::Nf4, false);
    let scales = q.block_scales();
    let v = Q4View::new(&q.packed, &scales, q.quant_type.code(), 64, 4, 64).unwrap();
    let err = matmul_nt(&v, &[0.0; 10], 1, &mut [0.0; 4], Isa::Scalar).unwrap_err().to_string();
    assert!(err.contains("matmul_nt") && err.contains("4x64"), "{err}");
    let err = Q4View::new(&q.packed[1..], &scales, q.quant_type.code(), 64, 4, 64).unwrap_err().to_string();
    assert!(err.contains("weight"), "{err}");
    let err = Q4View::new(&q.packed, &scales[1..], q.quant_type.code(), 64, 4, 64).unwrap_err().to_string();
    assert!(err.contains("absmax"), "{err}");
}

#[test]
fn candle_op_forward_and_backward_match_dense() {
    let dev = Device::Cpu;
    let (rows, cols) = (24, 97);
    let q = big(rows, cols, 32, QuantType::Nf4, true);
    let p = Packed4::new(&q, &dev).unwrap();
    let w = Tensor::from_vec(q.dequantize(), (rows, cols), &dev).unwrap();
    assert_eq!(
        p.dequantize().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        w.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
    let x = Var::from_tensor(&Tensor::from_vec(values(2 * 3 * cols, 9), (2, 3, cols), &dev).unwrap()).unwrap();
    let t = Tensor::from_vec(values(2 * 3 * rows, 10), (2, 3, rows), &dev).unwrap();
    let fused = p.forward(x.as_tensor()).unwrap();
    let dense = x.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap();
    assert_eq!(fused.dims(), &[2, 3, rows]);
    let rel = tunecheck::props::rel_l2(&fused, &dense).unwrap();
    assert!(rel < 1e-6, "forward rel L2 {rel}");
    // Gradient with respect to the input through a loss that weights every output.
    let gf = (fused * &t).unwrap().sum_all().unwrap().backward().unwrap();
    let gd = (dense * &t).unwrap().sum_all().unwrap().backward().unwrap();
    let (a, b) = (gf.get(x.as_tensor()).unwrap(), gd.get(x.as_tensor()).unwrap());
    let rel = tunecheck::props::rel_l2(a, b).unwrap();
    assert!(rel < 1e-6, "input gradient rel L2 {rel}");
}

/// Every (original, compute) dtype pair bitsandbytes allows.
const DTYPE_PAIRS: [(DType, DType); 7] = [
    (DType::F32, DType::F32),
    (DType::F32, DType::BF16),
    (DType::F32, DType::F16),
    (DType::BF16, DType::BF16),
    (DType::BF16, DType::F32),
    (DType::F16, DType::F16),
    (DType::BF16, DType::F16),
];

/// `x` cast to `dtype` and back to f32.
fn through(x: &Tensor, dtype: DType) -> Tensor {
    x.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap()
}

#[test]
fn qlora_base_in_every_dtype_is_the_dense_casts() {
    use tunecheck::adapt::Quant4Linear;
    let dev = Device::Cpu;
    let (rows, cols) = (40, 131);
    // Values large enough that f16 rounding bites (and bf16/f16 disagree).
    let raw: Vec<f32> = values(rows * cols, 21).iter().map(|v| v * 3000.0).collect();
    let q = quantize(&raw, &[rows, cols], QuantType::Nf4, 64, true).unwrap();
    let w32 = Tensor::from_vec(q.dequantize(), (rows, cols), &dev).unwrap();
    let xv = Tensor::from_vec(values(3 * 5 * cols, 22), (3, 5, cols), &dev).unwrap();
    let t = Tensor::from_vec(values(3 * 5 * rows, 23), (3, 5, rows), &dev).unwrap();
    for (orig, compute) in DTYPE_PAIRS {
        let what = format!("{orig:?} weight, {compute:?} compute");
        let ql = Quant4Linear::new(q.clone(), orig, compute, &dev).unwrap();
        // The weight the product sees: bitsandbytes' dequantize → .to(orig) → .to(compute).
        let w = w32.to_dtype(orig).unwrap().to_dtype(compute).unwrap();
        assert!(tunecheck::props::bitwise_equal(&ql.dequantized().unwrap(), &w).unwrap(), "{what}: weight");
        // Forward against an f32 product of the cast operands, rounded to the compute dtype.
        let x = Var::from_tensor(&xv).unwrap();
        let y = ql.forward(x.as_tensor()).unwrap();
        assert_eq!((y.dims(), y.dtype()), (&[3usize, 5, rows][..], DType::F32), "{what}");
        let wf = w.to_dtype(DType::F32).unwrap();
        let dense = through(x.as_tensor(), compute).broadcast_matmul(&wf.t().unwrap()).unwrap();
        let want = through(&dense, compute);
        // Two f32 sums in different orders round to the same value or a neighbour.
        let ulp = match compute {
            DType::BF16 => 2f64.powi(-8),
            DType::F16 => 2f64.powi(-11),
            _ => 1e-6,
        };
        let rel = tunecheck::props::rel_l2(&y, &want).unwrap();
        assert!(rel < ulp, "{what}: forward rel L2 {rel}");
        // Reordering an f32 sum (error ~2⁻²⁴) rarely moves its rounding: nearly all outputs
        // are the same bits. Unrounded weights (error ~2⁻⁹ per term) would move many.
        let f = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let (a, b) = (f(&y), f(&want));
        let differ = a.iter().zip(&b).filter(|(p, q)| p.to_bits() != q.to_bits()).count();
        if compute != DType::F32 {
            assert!(differ * 100 <= a.len(), "{what}: {differ} of {} outputs differ from the f32 sum", a.len());
        }
        // And against candle's own matmul in the compute dtype (the old dense path).
        let candle = x.as_tensor().to_dtype(compute).unwrap().broadcast_matmul(&w.t().unwrap()).unwrap();
        let rel = tunecheck::props::rel_l2(&y, &candle.to_dtype(DType::F32).unwrap()).unwrap();
        assert!(rel < 2.0 * ulp, "{what}: forward vs candle rel L2 {rel}");
        // The input gradient flows through the casts and the transposed product.
        let g = (y * &t).unwrap().sum_all().unwrap().backward().unwrap();
        let gx = g.get(x.as_tensor()).unwrap();
        let want = through(&through(&t, compute).broadcast_matmul(&wf).unwrap(), compute);
        let rel = tunecheck::props::rel_l2(gx, &want).unwrap();
        assert!(rel < ulp, "{what}: input gradient rel L2 {rel}");
    }
}

#[test]
fn cuda_kernels_match_cpu() {
    let Some(gpu) = tunecheck::device::cuda_or_skip("cuda_kernels_match_cpu") else { return };
    let (rows, cols) = (300, 515);
    let q = big(rows, cols, 64, QuantType::Nf4, true);
    let cpu = Packed4::new(&q, &Device::Cpu).unwrap();
    let cuda = Packed4::new(&q, &gpu).unwrap();
    let wc = cpu.dequantize().unwrap();
    let wg = cuda.dequantize().unwrap().to_device(&Device::Cpu).unwrap();
    assert!(tunecheck::props::bitwise_equal(&wc, &wg).unwrap(), "CUDA dequantize differs");
    let x = Tensor::from_vec(values(7 * cols, 4), (7, cols), &Device::Cpu).unwrap();
    let yc = cpu.forward(&x).unwrap();
    let xg = Var::from_tensor(&x.to_device(&gpu).unwrap()).unwrap();
    let yg = cuda.forward(xg.as_tensor()).unwrap();
    let rel = tunecheck::props::rel_l2(&yc, &yg.to_device(&Device::Cpu).unwrap()).unwrap();
    assert!(rel < 1e-5, "CUDA forward rel L2 {rel}");
    let grad = yg.sum_all().unwrap().backward().unwrap();
    let gx = grad.get(xg.as_tensor()).unwrap().to_device(&Device::Cpu).unwrap();
    let want = Tensor::ones((7, rows), candle_core::DType::F32, &Device::Cpu).unwrap().matmul(&wc).unwrap();
    let rel = tunecheck::props::rel_l2(&gx, &want).unwrap();
    assert!(rel < 1e-5, "CUDA input gradient rel L2 {rel}");
}
