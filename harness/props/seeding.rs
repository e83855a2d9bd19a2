//! Reproducible property runs: the seeded proptest RNG (ChaCha, so a seed replays a run) and
//! candle's thread count pinned once per process.

use proptest::test_runner::{RngAlgorithm, TestRng};

/// The proptest RNG for a property seed (ChaCha, so runs replay).
pub fn seeded(seed: u64) -> TestRng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    TestRng::from_seed(RngAlgorithm::ChaCha, &key)
}

/// Pin candle's thread count for this process (to the value candle itself would choose) by
/// setting `RAYON_NUM_THREADS` when it is unset. candle 0.11 reads that variable on every
/// matmul and, when it is absent, works the default out again from `/proc` and `/sys` — about
/// 7 files opened per matmul, which made property runs on tiny models 5× slower (mostly
/// kernel time; measured with `strace -c`: 27 251 `openat` calls for one P4 run). Setting it
/// to the same number changes no thread count and no result. A value the user set is kept.
pub fn pin_thread_count() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            let n = candle_core::utils::get_num_threads();
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
    });
}
