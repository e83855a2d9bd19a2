//! QLoRA kernel benchmarks: each group holds tunecheck's kernel and its peers at the same
//! shape and the same thread count — 1 and 2 threads, each entry run inside a rayon pool of
//! that size with `RAYON_NUM_THREADS` set to it (candle's CPU matmul reads the variable, its
//! quantized matmul and tunecheck's kernels use the pool) — and the run ends with a table of
//! ratios, tunecheck against each peer, from this run's medians and best samples only.
//! `cargo bench --bench qlora` (add `-- --quick` for a fast look, `-- nf4_matvec` to filter).
//! `TUNECHECK_ISA=avx2|scalar` caps the instruction set to measure fallbacks.

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor, Var};
use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, BenchmarkId, Criterion, Throughput};
use half::bf16;
use std::collections::BTreeSet;
use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Instant;
use tunecheck::adapt::Quant4Linear;
use tunecheck::quant::kernels::{dequantize_bf16_into, dequantize_f32_into, matmul_nt, Isa, Packed4, Q4View, Rounding};
use tunecheck::quant::{quantize, QuantType, Quantized4};
use tunecheck_benches::values;

/// The thread counts every entry is measured at.
const THREADS: [usize; 2] = [1, 2];

/// An entry: group, function, parameter (shape and thread count).
type Entry = (String, String, String);

/// The entries this run measured.
static RAN: Mutex<BTreeSet<Entry>> = Mutex::new(BTreeSet::new());

/// A criterion group that measures every entry at a given thread count and remembers what it
/// measured for the ratio table.
struct Group<'a> {
    g: BenchmarkGroup<'a, WallTime>,
    name: String,
}

impl<'a> Group<'a> {
    fn new(c: &'a mut Criterion, name: &str) -> Self {
        Group { g: c.benchmark_group(name), name: name.to_string() }
    }

    /// Measure `f` as `function` at `param` with `threads` threads (candle and tunecheck
    /// alike): inside a rayon pool of that size, with `RAYON_NUM_THREADS` set to it (candle's
    /// CPU matmul reads the variable on every call; nothing else runs meanwhile).
    fn bench(&mut self, threads: usize, function: &str, param: &str, mut f: impl FnMut() + Send) {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().expect("thread pool");
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
        let param = format!("{param}/t{threads}");
        let key = (self.name.clone(), function.to_string(), param.clone());
        self.g.bench_function(BenchmarkId::new(function, &param), |b| {
            // Called only for the entries the command line's filter selects.
            RAN.lock().unwrap().insert(key.clone());
            // One hand-over to the pool per batch of iterations, timed inside it.
            b.iter_custom(|iters| {
                pool.install(|| {
                    let start = Instant::now();
                    for _ in 0..iters {
                        f();
                    }
                    start.elapsed()
                })
            })
        });
    }
}

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
        let mut g = Group::new(c, "nf4_dequantize");
        g.g.sample_size(20);
        let mut out = vec![0f32; n];
        let src = vec![1f32; n];
        let mut out16 = vec![bf16::ZERO; n];
        let src16 = vec![bf16::ONE; n];
        for t in THREADS {
            g.g.throughput(Throughput::Bytes((n * 4) as u64));
            let p = format!("{rows}x{cols}/f32");
            g.bench(t, "tunecheck", &p, || dequantize_f32_into(&v, isa, black_box(&mut out)).unwrap());
            g.bench(t, "reference", &p, || drop(black_box(w.q.dequantize())));
            // Single-threaded whatever the pool: the bandwidth of one core.
            g.bench(t, "memcpy", &p, || black_box(&mut out).copy_from_slice(black_box(&src)));
            g.g.throughput(Throughput::Bytes((n * 2) as u64));
            let p = format!("{rows}x{cols}/bf16");
            g.bench(t, "tunecheck", &p, || dequantize_bf16_into(&v, isa, black_box(&mut out16)).unwrap());
            g.bench(t, "reference", &p, || {
                drop(black_box(w.q.dequantize().into_iter().map(bf16::from_f32).collect::<Vec<_>>()))
            });
            g.bench(t, "memcpy", &p, || black_box(&mut out16).copy_from_slice(black_box(&src16)));
        }
        g.g.finish();
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
    let mut g = Group::new(c, group);
    g.g.sample_size(10);
    g.g.throughput(Throughput::Elements((m * n * k) as u64));
    let p = format!("{m}x{k}x{n}");
    let mut y = vec![0f32; m * n];
    // The same kernel with bf16-rounded weights (bf16 compute): one rounded table per block.
    let vb = v.with_rounding(Rounding::new(DType::F32, DType::BF16).unwrap());
    let mut scratch = vec![0f32; n * k];
    let quantized: Vec<(&str, QMatMul)> =
        [("candle_q4_0", GgmlDType::Q4_0), ("candle_q4k", GgmlDType::Q4K), ("candle_q8_0", GgmlDType::Q8_0)]
            .into_iter()
            .map(|(name, dt)| (name, QMatMul::from_qtensor(QTensor::quantize(&wt, dt).unwrap()).unwrap()))
            .collect();
    for t in THREADS {
        g.bench(t, "tunecheck_fused", &p, || matmul_nt(&v, black_box(&xs), m, &mut y, isa).unwrap());
        g.bench(t, "tunecheck_fused_bf16w", &p, || matmul_nt(&vb, black_box(&xs), m, &mut y, isa).unwrap());
        g.bench(t, "dequantize_then_matmul", &p, || {
            dequantize_f32_into(&v, isa, &mut scratch).unwrap();
            let wd = Tensor::from_slice(&scratch, (n, k), &dev).unwrap();
            drop(black_box(x.matmul(&wd.t().unwrap()).unwrap()))
        });
        g.bench(t, "candle_f32", &p, || drop(black_box(x.matmul(&wt.t().unwrap()).unwrap())));
        for (name, qm) in &quantized {
            g.bench(t, name, &p, || drop(black_box(qm.forward(&x).unwrap())));
        }
    }
    g.g.finish();
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
    let mut g = Group::new(c, "qlora_linear");
    g.g.sample_size(10);
    g.g.throughput(Throughput::Elements((m * n * k) as u64));
    let ql = Quant4Linear::new(w.q.clone(), DType::F32, DType::BF16, &dev).unwrap();
    let dense16 = dense.to_dtype(DType::BF16).unwrap();
    let q16_fwd = || (ql.forward(x.as_tensor()).unwrap() + lora(x.as_tensor()).unwrap()).unwrap();
    let d16_fwd = || {
        let y = x.as_tensor().to_dtype(DType::BF16).unwrap().matmul(&dense16.t().unwrap()).unwrap();
        (y.to_dtype(DType::F32).unwrap() + lora(x.as_tensor()).unwrap()).unwrap()
    };
    let entries: [(&str, &(dyn Fn() -> Tensor + Sync)); 4] = [
        ("tunecheck_nf4", &q_fwd),
        ("candle_f32", &d_fwd),
        ("tunecheck_nf4_bf16", &q16_fwd),
        ("candle_bf16", &d16_fwd),
    ];
    for t in THREADS {
        for (name, fwd) in entries {
            g.bench(t, name, &format!("forward/{m}x{k}x{n}/r{r}"), || drop(black_box(fwd())));
            g.bench(t, name, &format!("forward_backward/{m}x{k}x{n}/r{r}"), || {
                drop(black_box(fwd().sum_all().unwrap().backward().unwrap()))
            });
        }
    }
    g.g.finish();
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

/// Where criterion keeps its estimates: `$CARGO_TARGET_DIR/criterion`, else the workspace's
/// `target/criterion`.
fn criterion_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("criterion")
}

/// The directory of an entry's results (criterion replaces the characters a file name cannot
/// hold with `_`).
fn entry_dir(dir: &std::path::Path, (group, function, param): &Entry) -> PathBuf {
    let safe = |s: &str| s.replace(['?', '"', '/', '\\', '*', '<', '>', ':', '|', '^'], "_");
    dir.join(safe(group)).join(safe(function)).join(safe(param)).join("new")
}

/// This run's median and best of an entry, in nanoseconds per iteration: criterion's median
/// estimate (`estimates.json`) and the fastest sample (`sample.json`: total time / iterations
/// per sample). Interference from elsewhere on the machine only adds time, so the best is the
/// steadier figure on a shared machine.
fn median_best_ns(dir: &std::path::Path, key: &Entry) -> Option<(f64, f64)> {
    let d = entry_dir(dir, key);
    let read = |f: &str| -> Option<serde_json::Value> { serde_json::from_slice(&std::fs::read(d.join(f)).ok()?).ok() };
    let median = read("estimates.json")?["median"]["point_estimate"].as_f64()?;
    let sample = read("sample.json")?;
    let (iters, times) = (sample["iters"].as_array()?, sample["times"].as_array()?);
    let best =
        iters.iter().zip(times).filter_map(|(i, t)| Some(t.as_f64()? / i.as_f64()?)).fold(f64::INFINITY, f64::min);
    best.is_finite().then_some((median, best))
}

fn human(ns: f64) -> String {
    match ns {
        x if x >= 1e9 => format!("{:.2} s", x / 1e9),
        x if x >= 1e6 => format!("{:.2} ms", x / 1e6),
        x if x >= 1e3 => format!("{:.1} µs", x / 1e3),
        x => format!("{x:.0} ns"),
    }
}

/// The ratio table: for every group, shape and thread count this run measured, each
/// tunecheck entry against each peer (peer time / tunecheck time, of the medians and of the
/// best samples: above 1, tunecheck is faster).
fn ratio_table(dir: &std::path::Path) -> String {
    let ran = RAN.lock().unwrap().clone();
    let times: Vec<(Entry, (f64, f64))> =
        ran.into_iter().filter_map(|k| median_best_ns(dir, &k).map(|m| (k, m))).collect();
    let mut out = String::from(
        "\nratios from this run (peer time / tunecheck time, of the medians and of the best samples; above 1: \
         tunecheck faster)\n\n\
         | group | shape / threads | tunecheck entry | median | best | peer | median | best | ratio (median) | ratio (best) |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
    );
    for ((g, f, p), (m, b)) in times.iter().filter(|((_, f, _), _)| f.starts_with("tunecheck")) {
        for ((g2, f2, p2), (m2, b2)) in &times {
            if g2 == g && p2 == p && !f2.starts_with("tunecheck") {
                out.push_str(&format!(
                    "| {g} | {p} | {f} | {} | {} | {f2} | {} | {} | {:.2}× | {:.2}× |\n",
                    human(*m),
                    human(*b),
                    human(*m2),
                    human(*b2),
                    m2 / m,
                    b2 / b
                ));
            }
        }
    }
    out
}

fn main() {
    let dir = criterion_dir();
    let mut c = Criterion::default().output_directory(&dir).configure_from_args();
    dequantize(&mut c);
    matvec(&mut c);
    matmul(&mut c);
    qlora_linear(&mut c);
    cuda(&mut c);
    c.final_summary();
    if !RAN.lock().unwrap().is_empty() {
        println!("{}", ratio_table(&dir));
    }
}
