//! `conformance!`: stamps one `#[test]` per property × device in the *calling* crate, so a
//! framework that implements [`crate::subject::Trainer`] gets every property as a test, and
//! proptest regression files land next to its own test file (`file!()` expands there).
//!
//! ```no_run
//! // tests/tunecheck.rs in your crate; `reference` stands in for your own factory
//! // `fn(&Setup, &Device) -> tunecheck::Result<YourTrainer>` where `YourTrainer: Trainer`.
//! use tunecheck::subject::reference;
//! tunecheck::conformance!(reference, devices = [cpu, cuda]);
//! # fn main() {}
//! ```
//!
//! Each device becomes a module (`cpu::p1_eval_train_equivalence`, `cuda::...`). A missing
//! CUDA device prints `SKIPPED` (a failure with `TUNECHECK_REQUIRE_CUDA=1`). Case counts:
//! 4 per adapter kind by default, `PROPTEST_CASES` overrides.

/// Stamp the property tests for a subject factory on the given devices (default `[cpu]`).
#[macro_export]
macro_rules! conformance {
    ($factory:expr) => {
        $crate::conformance!($factory, devices = [cpu]);
    };
    ($factory:expr, devices = [$($dev:ident),+ $(,)?]) => {
        /// P6: CPU vs CUDA (skipped with a message without a GPU).
        #[test]
        fn p6_cpu_vs_cuda() {
            $crate::props::p6_devices::cpu_vs_cuda(
                &$factory,
                &$crate::props::runner::PropConfig { cases: 4, seed: 0, source_file: ::std::option::Option::Some(file!()) },
            )
            .assert("p6_cpu_vs_cuda");
        }

        $(
            #[allow(non_snake_case)]
            mod $dev {
                #[allow(unused_imports)]
                use super::*;

                fn __device() -> ::std::option::Option<$crate::candle_core::Device> {
                    $crate::device::for_test(stringify!($dev))
                }

                fn __cfg() -> $crate::props::runner::PropConfig {
                    $crate::props::runner::PropConfig { cases: 4, seed: 0, source_file: ::std::option::Option::Some(file!()) }
                }

                #[test]
                fn p1_eval_train_equivalence() {
                    if let ::std::option::Option::Some(d) = __device() {
                        $crate::props::p1_modes::eval_train_equivalence(&$factory, &d, &__cfg()).assert("p1_eval_train_equivalence");
                    }
                }

                #[test]
                fn p2_untrained_tokens() {
                    if let ::std::option::Option::Some(d) = __device() {
                        $crate::props::p2_untrained::untrained_tokens(&$factory, &d, &__cfg()).assert("p2_untrained_tokens");
                    }
                }

                #[test]
                fn p4_descent_and_epochs() {
                    if let ::std::option::Option::Some(d) = __device() {
                        $crate::props::p4_descent::descent(&$factory, &d, &__cfg()).assert("p4_descent_and_epochs");
                    }
                }

                #[test]
                fn p3_save_reload_bitwise() {
                    if let ::std::option::Option::Some(d) = __device() {
                        $crate::props::p3_reload::save_reload(&$factory, &d, &__cfg()).assert("p3_save_reload_bitwise");
                    }
                }

                #[test]
                fn p5_accumulation_equivalence() {
                    if let ::std::option::Option::Some(d) = __device() {
                        $crate::props::p5_accumulation::accumulation(&$factory, &d, &__cfg()).assert("p5_accumulation_equivalence");
                    }
                }

                #[test]
                fn p8_gradient_reach() {
                    if let ::std::option::Option::Some(d) = __device() {
                        $crate::props::p8_gradients::gradient_reach(&$factory, &d, &__cfg()).assert("p8_gradient_reach");
                    }
                }
            }
        )+
    };
}
