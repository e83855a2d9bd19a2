//! The CUDA skip/require policy: without a usable GPU a CUDA test is skipped with a message,
//! and `TUNECHECK_REQUIRE_CUDA=1` turns that skip into a failure (for GPU CI). The policy is
//! tested on a probed result and a variable's value, so no test changes the process
//! environment (tests of every file share one process); `tests/cli.rs` runs the binary with
//! the variable set.

use candle_core::Device;
use tunecheck::device::{name, parse, required_by, skip_or_fail};

#[test]
fn a_missing_gpu_is_skipped_unless_required() {
    let absent = || Err::<Device, _>("no usable CUDA device: test".to_string());
    assert!(skip_or_fail("policy test", absent(), false).is_none());
    let r = std::panic::catch_unwind(|| skip_or_fail("policy test", absent(), true));
    let msg = *r.expect_err("a required GPU that is absent must fail").downcast::<String>().unwrap();
    assert!(msg.contains("CUDA required by TUNECHECK_REQUIRE_CUDA=1 but unavailable: no usable CUDA"), "{msg}");
    assert!(skip_or_fail("policy test", Ok(Device::Cpu), true).is_some());
}

#[test]
fn only_unset_empty_or_zero_leaves_cuda_optional() {
    for (v, want) in [(None, false), (Some(""), false), (Some("0"), false), (Some("1"), true), (Some("yes"), true)] {
        assert_eq!(required_by(v), want, "{v:?}");
    }
}

#[test]
fn device_names_parse() {
    assert_eq!(parse("cpu").map(|d| name(&d)), Ok("cpu".to_string()));
    assert!(parse("tpu").unwrap_err().contains("unknown device `tpu`"));
    assert!(parse("cuda:x").unwrap_err().contains("expected cuda:N"));
}
