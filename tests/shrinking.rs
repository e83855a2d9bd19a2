//! Shrinking tries the simplest draw first ([`SimplestFirst`]): when that draw fails, it is the
//! minimal case after one check; when it passes, shrinking reaches exactly what proptest's
//! own shrinking reaches, one check later.

use std::cell::Cell;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestError, TestRunner};
use tunecheck::props::seeding::seeded;
use tunecheck::props::shrink::SimplestFirst;

type Draw = (u64, u64, Vec<u8>);

fn draws() -> impl Strategy<Value = Draw> {
    (100u64..1000, 0u64..1_000_000, proptest::sample::subsequence(vec![1u8, 2, 3, 4, 5, 6, 7], 1..=7))
}

/// Run `fails` over `strategy` from seed 5 with shrinking; the minimal failing draw and the
/// number of checks made (first case included).
fn shrink<S: Strategy<Value = Draw>>(strategy: S, fails: impl Fn(&Draw) -> bool) -> (Draw, u32) {
    let calls = Cell::new(0u32);
    let config = Config { cases: 16, max_shrink_iters: 1024, failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new_with_rng(config, seeded(5));
    let result = runner.run(&strategy, |d| {
        calls.set(calls.get() + 1);
        if fails(&d) {
            Err(TestCaseError::fail("fails"))
        } else {
            Ok(())
        }
    });
    match result {
        Err(TestError::Fail(_, d)) => (d, calls.get()),
        other => panic!("expected a failure, got {other:?}"),
    }
}

#[test]
fn a_failing_simplest_draw_is_the_minimal_case_after_one_check() {
    let (plain, plain_calls) = shrink(draws(), |_| true);
    let (fast, fast_calls) = shrink(SimplestFirst::new(draws()), |_| true);
    // Every range at its start, the subsequence down to one element.
    assert_eq!((fast.0, fast.1, fast.2.len()), (100, 0, 1), "{fast:?}");
    assert_eq!(fast, plain, "the same minimum as proptest's own shrinking");
    assert_eq!(fast_calls, 2, "the failing case and the simplest draw");
    assert!(plain_calls > 20, "proptest's shrinking took only {plain_calls} checks: nothing to save");
}

#[test]
fn a_passing_simplest_draw_falls_back_to_proptests_shrinking_one_check_later() {
    // Fails only from 300 in the first value and with 4 in the subsequence.
    let fails = |d: &Draw| d.0 >= 300 && d.2.contains(&4);
    let (plain, plain_calls) = shrink(draws(), fails);
    let (fast, fast_calls) = shrink(SimplestFirst::new(draws()), fails);
    assert_eq!(fast, plain);
    assert_eq!((fast.0, fast.1, fast.2.as_slice()), (300, 0, &[4u8][..]), "{fast:?}");
    assert_eq!(fast_calls, plain_calls + 1, "one check for the simplest draw");
}

#[test]
fn passing_cases_never_shrink() {
    let calls = Cell::new(0u32);
    let config = Config { cases: 16, failure_persistence: None, ..Config::default() };
    let mut runner = TestRunner::new_with_rng(config, seeded(5));
    runner
        .run(&SimplestFirst::new(draws()), |_| {
            calls.set(calls.get() + 1);
            Ok(())
        })
        .unwrap();
    assert_eq!(calls.get(), 16);
}
