//! QLoRA kernel benchmarks: each group holds tunecheck's kernel and its peers at the same
//! shape, so ratios come from one report. `cargo bench --bench qlora` (add `-- --quick` for a
//! fast look). `TUNECHECK_ISA=avx2|scalar` caps the instruction set to measure fallbacks.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, Var};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use half::bf16;
use std::hint::black_box;
use tunecheck::adapt::Quant4Linear;
use tunecheck::quant::kernels::{dequantize_bf16_into, dequantize_f32_into, matmul_nt, Isa, Packed4, Q4View, Rounding};
use tunecheck::quant::{quantize, QuantType, Quantized4};
use tunecheck_benches::values;

struct Weight {
    dense: Vec<f32>,
    q: Quantized4,
    scales: Vec<f32>,
}

impl Weight {
    fn new(rows: usize, cols: usize) -> Self {
        let dense = values(rows * cols, 1);
        let q = quantize(&dense, &[rows, cols], QuantType::Nf4, 64, true).expect("quantize");
        let scales = q.block_scales();
        Weight { dense, q, scales }
    }
    fn view(&self) -> Q4View<'_> {
        let (r, c) = (self.q.shape[0], self.q.shape[1]);
        Q4View::new(&self.q.packed, &self.scales, self.q.quant_type.code(), 64, r, c).expect("view")
    }
}

fn dequantize(c: &mut Criterion) {
    let isa = Isa::best();
    for (rows, cols) in [(1024, 1024), (4096, 4096)] {
        let w = Weight::new(rows, cols);
        let v = w.view();
        let n = rows * cols;
        let mut g = c.benchmark_group("nf4_dequantize");
        g.sample_size(20);
        let mut out = vec![0f32; n];
        let src = vec![1f32; n];
        g.throughput(Throughput::Bytes((n * 4) as u64));
        let id = |name: &str| BenchmarkId::new(name, format!("{rows}x{cols}/f32"));
        g.bench_function(id("tunecheck"), |b| b.iter(|| dequantize_f32_into(&v, isa, black_box(&mut out)).unwrap()));
        g.bench_function(id("reference"), |b| b.iter(|| black_box(w.q.dequantize())));
        g.bench_function(id("memcpy"), |b| b.iter(|| black_box(&mut out).copy_from_slice(black_box(&src))));
        let mut out16 = vec![bf16::ZERO; n];
        let src16 = vec![bf16::ONE; n];
        g.throughput(Throughput::Bytes((n * 2) as u64));
        let id = |name: &str| BenchmarkId::new(name, format!("{rows}x{cols}/bf16"));
        g.bench_function(id("tunecheck"), |b| b.iter(|| dequantize_bf16_into(&v, isa, black_box(&mut out16)).unwrap()));
        g.bench_function(id("reference"), |b| {
            b.iter(|| black_box(w.q.dequantize().into_iter().map(bf16::from_f32).collect::<Vec<_>>()))
        });
        g.bench_function(id("memcpy"), |b| b.iter(|| black_box(&mut out16).copy_from_slice(black_box(&src16))));
        g.finish();
    }
}

/// `x [m, k] · Wᵀ` for W `[n, k]`: the fused kernel and its peers.
fn products(c: &mut Criterion, group: &str, m: usize, n: usize, k: usize) {
    let isa = Isa::best();
    let dev = Device::Cpu;
    let w = Weight::new(n, k);
    let v = w.view();
    let xs = values(m * k, 2);
    let x = Tensor::from_vec(xs.clone(), (m, k), &dev).unwrap();
    let wt = Tensor::from_vec(w.dense.clone(), (n, k), &dev).unwrap();
    let mut g = c.benchmark_group(group);
    g.sample_size(10);
    g.throughput(Throughput::Elements((m * n * k) as u64));
    let id = |name: &str| BenchmarkId::new(name, format!("{m}x{k}x{n}"));
    let mut y = vec![0f32; m * n];
    g.bench_function(id("tunecheck_fused"), |b| b.iter(|| matmul_nt(&v, black_box(&xs), m, &mut y, isa).unwrap()));
    // The same kernel with bf16-rounded weights (bf16 compute): one rounded table per block.
    let vb = v.with_rounding(Rounding::new(DType::F32, DType::BF16).unwrap());
    g.bench_function(id("tunecheck_fused_bf16w"), |b| {
        b.iter(|| matmul_nt(&vb, black_box(&xs), m, &mut y, isa).unwrap())
    });
    let mut scratch = vec![0f32; n * k];
    g.bench_function(id("dequantize_then_matmul"), |b| {
        b.iter(|| {
            dequantize_f32_into(&v, isa, &mut scratch).unwrap();
            let wd = Tensor::from_slice(&scratch, (n, k), &dev).unwrap();
            black_box(x.matmul(&wd.t().unwrap()).unwrap())
        })
    });
    g.bench_function(id("candle_f32"), |b| b.iter(|| black_box(x.matmul(&wt.t().unwrap()).unwrap())));
    for (name, dt) in
        [("candle_q4_0", GgmlDType::Q4_0), ("candle_q4k", GgmlDType::Q4K), ("candle_q8_0", GgmlDType::Q8_0)]
    {
        let qm = QMatMul::from_qtensor(QTensor::quantize(&wt, dt).unwrap()).unwrap();
        g.bench_function(id(name), |b| b.iter(|| black_box(qm.forward(&x).unwrap())));
    }
    g.finish();
}

fn matvec(c: &mut Criterion) {
    products(c, "nf4_matvec", 1, 4096, 4096);
}

fn matmul(c: &mut Criterion) {
    products(c, "nf4_matmul", 64, 4096, 4096);
}

/// A LoRA linear (r = 16) over a 4-bit base vs over an f32 base, forward and forward+backward
/// (gradients to the input and A/B); and the bf16-compute QLoRA base (f32 input, as under
/// f32 master weights) vs candle's bf16 matmul on a dense bf16 weight.
fn qlora_linear(c: &mut Criterion) {
    let (m, n, k, r) = (64, 2048, 2048, 16);
    let dev = Device::Cpu;
    let w = Weight::new(n, k);
    let packed = Packed4::new(&w.q, &dev).unwrap();
    let dense = Tensor::from_vec(w.dense.clone(), (n, k), &dev).unwrap();
    let a = Var::from_tensor(&Tensor::from_vec(values(r * k, 3), (r, k), &dev).unwrap()).unwrap();
    let bm = Var::from_tensor(&Tensor::from_vec(values(n * r, 4), (n, r), &dev).unwrap()).unwrap();
    let x = Var::from_tensor(&Tensor::from_vec(values(m * k, 5), (m, k), &dev).unwrap()).unwrap();
    let lora = |x: &Tensor| x.matmul(&a.t().unwrap()).unwrap().matmul(&bm.t().unwrap()).unwrap() * 2.0;
    let q_fwd = || (packed.forward(x.as_tensor()).unwrap() + lora(x.as_tensor()).unwrap()).unwrap();
    let d_fwd = || (x.as_tensor().matmul(&dense.t().unwrap()).unwrap() + lora(x.as_tensor()).unwrap()).unwrap();
    let mut g = c.benchmark_group("qlora_linear");
    g.sample_size(10);
    g.throughput(Throughput::Elements((m * n * k) as u64));
    let id = |name: &str, what: &str| BenchmarkId::new(name, format!("{what}/{m}x{k}x{n}/r{r}"));
    let ql = Quant4Linear::new(w.q.clone(), DType::F32, DType::BF16, &dev).unwrap();
    let dense16 = dense.to_dtype(DType::BF16).unwrap();
    let q16_fwd = || (ql.forward(x.as_tensor()).unwrap() + lora(x.as_tensor()).unwrap()).unwrap();
    let d16_fwd = || {
        let y = x.as_tensor().to_dtype(DType::BF16).unwrap().matmul(&dense16.t().unwrap()).unwrap();
        (y.to_dtype(DType::F32).unwrap() + lora(x.as_tensor()).unwrap()).unwrap()
    };
    let entries: [(&str, &dyn Fn() -> Tensor); 4] = [
        ("tunecheck_nf4", &q_fwd),
        ("candle_f32", &d_fwd),
        ("tunecheck_nf4_bf16", &q16_fwd),
        ("candle_bf16", &d16_fwd),
    ];
    for (name, fwd) in entries {
        g.bench_function(id(name, "forward"), |b| b.iter(|| black_box(fwd())));
        g.bench_function(id(name, "forward_backward"), |b| {
            b.iter(|| black_box(fwd().sum_all().unwrap().backward().unwrap()))
        });
    }
    g.finish();
}

/// CUDA (when built with `--features cuda` and a GPU is present): dequantize and the fused
/// matvec against a device-to-device copy of the same output bytes (the bandwidth roofline).
fn cuda(c: &mut Criterion) {
    let dev = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("SKIPPED cuda benchmarks: {e}");
            return;
        }
    };
    let (rows, cols) = (4096, 4096);
    let w = Weight::new(rows, cols);
    let packed = Packed4::new(&w.q, &dev).unwrap();
    let out_like = Tensor::zeros((rows, cols), candle_core::DType::F32, &dev).unwrap();
    let x = Tensor::from_vec(values(cols, 2), (1, cols), &dev).unwrap();
    let sync = || dev.synchronize().unwrap();
    let mut g = c.benchmark_group("cuda_nf4");
    g.throughput(Throughput::Bytes((rows * cols * 4) as u64));
    g.bench_function(BenchmarkId::new("tunecheck_dequantize", "4096x4096/f32"), |b| {
        b.iter(|| {
            black_box(packed.dequantize().unwrap());
            sync()
        })
    });
    g.bench_function(BenchmarkId::new("memcpy_dtod", "4096x4096/f32"), |b| {
        b.iter(|| {
            black_box(out_like.copy().unwrap());
            sync()
        })
    });
    g.throughput(Throughput::Elements((rows * cols) as u64));
    g.bench_function(BenchmarkId::new("tunecheck_fused_matvec", "1x4096x4096"), |b| {
        b.iter(|| {
            black_box(packed.forward(&x).unwrap());
            sync()
        })
    });
    g.finish();
}

criterion_group!(benches, dequantize, matvec, matmul, qlora_linear, cuda);
criterion_main!(benches);
