//! `conformance!`: stamps one `#[test]` per catalogue property × device in the *calling*
//! crate, so a framework whose trainer implements [`crate::subject::Trainer`] gets every
//! property as a test, and proptest regression files land next to its own test file
//! (`file!()` expands there).
//!
//! ```no_run
//! // tests/tunecheck.rs in your crate; `Reference` stands in for your own factory, any
//! // value implementing `tunecheck::subject::Factory` (see `tunecheck::subject::factory`).
//! use tunecheck::subject::Reference;
//! tunecheck::conformance!(Reference, devices = [cpu, cuda]);
//! # fn main() {}
//! ```
//!
//! Each device becomes a module (`cpu::p1_eval_train_equivalence`, `cuda::...`), with one test
//! per entry of [`crate::props::catalogue::CATALOGUE`]. A missing CUDA device prints
//! `SKIPPED` (a failure with `TUNECHECK_REQUIRE_CUDA=1`); every skipped adapter kind, dtype or
//! capability is printed, and `TUNECHECK_STRICT=1` makes any skip a failure. Properties that do
//! not depend on the device under test (CPU vs CUDA, the 4-bit kernels) run in the `cpu`
//! module only. Case counts: 4 per adapter kind by default, `PROPTEST_CASES` overrides (0 is
//! an error).

/// Stamp the property tests for a subject factory on the given devices (default `[cpu]`).
#[macro_export]
macro_rules! conformance {
    ($factory:expr) => {
        $crate::conformance!($factory, devices = [cpu]);
    };
    ($factory:expr, devices = [$($dev:ident),+ $(,)?]) => {
        $(
            #[allow(non_snake_case)]
            mod $dev {
                #[allow(unused_imports)]
                use super::*;
                use $crate::__conformance_stamp;
                $crate::for_each_property!(__conformance_stamp, $factory, $dev);
            }
        )+
    };
}

/// One `#[test]` per catalogue entry (used by [`conformance!`]).
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_stamp {
    ([$factory:expr, $dev:ident] $($test:ident => $prop:path),* $(,)?) => {
        $(
            #[test]
            fn $test() {
                $crate::props::catalogue::conformance_test(&$prop, &$factory, stringify!($dev), file!());
            }
        )*
    };
}
