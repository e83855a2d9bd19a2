//! Invariants, one file per property, each a check that returns `Ok(())` or a [`Violation`]
//! carrying the numbers that broke it, described by a [`property::Property`]; [`catalogue`] lists
//! them all, [`runner`] runs them (shrinking failures with [`shrink`]) and [`verdict`] holds
//! what a run concludes.

pub mod catalogue;
pub mod compare;
pub mod forward;
pub mod oracle;
pub mod p10_oracle;
pub mod p11_precision;
pub mod p12_half_range;
pub mod p13_dropout;
pub mod p14_untrained_guard;
pub mod p1_modes;
pub mod p2_untrained;
pub mod p3_reload;
pub mod p4_descent;
pub mod p5_accumulation;
pub mod p6_devices;
pub mod p7_nf4;
pub mod p8_gradients;
pub mod p9_kernels;
pub mod property;
pub mod runner;
pub mod seeding;
pub mod shrink;
pub mod tolerance;
pub mod verdict;

pub use compare::{bitwise_equal, max_abs_diff, rel_l2, within};

/// A broken invariant: which one, which of its clauses, and the numbers.
#[derive(Debug, Clone, PartialEq)]
pub struct Violation {
    /// Property id and name, e.g. `P5/accumulation_equivalence` or `forward/kv_cache`.
    pub property: &'static str,
    /// The clause that broke, a short stable word (`collapse`, `gradient_mismatch`, ...):
    /// what a planted-bug mutant is expected to trip.
    pub code: &'static str,
    /// What was observed, with the numbers and the bound.
    pub detail: String,
}

impl Violation {
    /// A violation of `property`'s clause `code`.
    pub fn new(property: &'static str, code: &'static str, detail: impl Into<String>) -> Self {
        Violation { property, code, detail: detail.into() }
    }

    /// The property id before the `/` (`P5`, `forward`).
    pub fn id(&self) -> &'static str {
        self.property.split('/').next().unwrap_or(self.property)
    }
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} violated [{}]: {}", self.property, self.code, self.detail)
    }
}

impl std::error::Error for Violation {}

/// The outcome of checking one property: a violation, or an error that kept it from running.
#[derive(Debug)]
pub enum Failure {
    /// The invariant does not hold.
    Violated(Violation),
    /// The check could not run (bad spec, candle error, ...).
    Error(crate::error::Error),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Violated(v) => v.fmt(f),
            Failure::Error(e) => write!(f, "error: {e}"),
        }
    }
}

impl From<crate::error::Error> for Failure {
    fn from(e: crate::error::Error) -> Self {
        Failure::Error(e)
    }
}

impl From<candle_core::Error> for Failure {
    fn from(e: candle_core::Error) -> Self {
        Failure::Error(e.into())
    }
}

impl From<Violation> for Failure {
    fn from(v: Violation) -> Self {
        Failure::Violated(v)
    }
}

/// Result of a property check.
pub type Check = std::result::Result<(), Failure>;
