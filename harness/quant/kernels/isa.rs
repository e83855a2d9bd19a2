//! Which CPU instruction set a kernel runs with, detected at run time. Every choice gives the
//! same bits; the choice only changes speed. `TUNECHECK_ISA=scalar|avx2|avx512` caps it (for
//! benchmarking the fallbacks); properties iterate over [`Isa::available`].

use std::sync::OnceLock;

/// A CPU code path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// Portable Rust (`f32::mul_add` for the fused multiply-adds).
    Scalar,
    /// x86-64 AVX2 + FMA + F16C (8 lanes, two registers per 16-lane step).
    Avx2,
    /// x86-64 AVX-512F (16 lanes, one-instruction 16-entry table lookup).
    Avx512,
}

impl Isa {
    /// Lower-case name.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Scalar => "scalar",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Whether this CPU can run it.
    pub fn supported(self) -> bool {
        match self {
            Isa::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                    && std::arch::is_x86_feature_detected!("f16c")
            }
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => std::arch::is_x86_feature_detected!("avx512f") && Isa::Avx2.supported(),
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// Every code path this CPU can run, slowest first.
    pub fn available() -> Vec<Isa> {
        [Isa::Scalar, Isa::Avx2, Isa::Avx512].into_iter().filter(|i| i.supported()).collect()
    }

    /// The fastest supported path, capped by `TUNECHECK_ISA` when set (detected once).
    pub fn best() -> Isa {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(|| {
            let cap = match std::env::var("TUNECHECK_ISA").ok().as_deref() {
                Some("scalar") => Isa::Scalar,
                Some("avx2") => Isa::Avx2,
                _ => Isa::Avx512,
            };
            Isa::available().into_iter().filter(|i| *i <= cap).max().unwrap_or(Isa::Scalar)
        })
    }
}
