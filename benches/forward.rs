//! criterion: forward pass and KV-cache decode of the synthetic models, per family.
//! `cargo bench --bench forward` (add `-- --quick` for a fast look).

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use tunecheck::spec::{ArchSpec, Family};
use tunecheck::{weights, Mode, Transformer};

fn medium(family: Family) -> ArchSpec {
    let mut s = ArchSpec::tiny(family);
    s.vocab_size = 512;
    s.hidden_size = 256;
    s.intermediate_size = 512;
    s.num_heads = 8;
    s.num_kv_heads = 4;
    s.head_dim = 32;
    if family == Family::Gemma2 || family == Family::Gemma3 {
        s.query_pre_attn_scalar = Some(32.0);
        s.sliding_window = Some(32);
    }
    s
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("forward");
    for family in Family::ALL {
        let spec = medium(family);
        let w = weights::generate(&spec, 0, &Device::Cpu).unwrap();
        let m = Transformer::from_weights(&spec, &w).unwrap();
        let (b, s) = (4usize, 64usize);
        let ids: Vec<u32> = (0..b * s).map(|i| (i * 7 % spec.vocab_size) as u32).collect();
        let ids = Tensor::from_vec(ids, (b, s), &Device::Cpu).unwrap();
        g.throughput(Throughput::Elements((b * s) as u64));
        g.bench_with_input(BenchmarkId::new("full_4x64", family), &ids, |bch, ids| {
            bch.iter(|| m.forward(ids, Mode::Eval).unwrap())
        });
        g.throughput(Throughput::Elements(1));
        let one = Tensor::from_vec(vec![1u32], (1, 1), &Device::Cpu).unwrap();
        g.bench_function(BenchmarkId::new("decode_1_after_64", family), |bch| {
            bch.iter_batched(
                || {
                    let mut cache = m.new_cache();
                    m.forward_cached(&ids.narrow(0, 0, 1).unwrap(), &mut cache, Mode::Eval).unwrap();
                    cache
                },
                |mut cache| m.forward_cached(&one, &mut cache, Mode::Eval).unwrap(),
                criterion::BatchSize::SmallInput,
            )
        });
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
