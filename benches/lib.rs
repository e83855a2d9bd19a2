//! What tunecheck's criterion benchmarks share: seeded inputs. The benchmarks themselves are
//! this package's `[[bench]]` targets (`forward.rs`, `qlora.rs`); the package exists so that
//! criterion is compiled only by `cargo bench`.

use rand_core::{RngCore, SeedableRng};

/// `n` values uniform in ±0.05 from a ChaCha8 stream seeded with `seed`: weight-like inputs,
/// the same on every run.
pub fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| ((rng.next_u32() >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 0.1).collect()
}
