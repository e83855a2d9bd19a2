//! Reproducible property runs: the seeded proptest RNG (ChaCha, so a seed replays a run).

use proptest::test_runner::{RngAlgorithm, TestRng};

/// The proptest RNG for a property seed (ChaCha, so runs replay).
pub fn seeded(seed: u64) -> TestRng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    TestRng::from_seed(RngAlgorithm::ChaCha, &key)
}
