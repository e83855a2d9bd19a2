//! The CUDA skip/require policy: without a usable GPU a CUDA test is skipped with a message,
//! and `TUNECHECK_REQUIRE_CUDA=1` turns that skip into a failure (for GPU CI).

#[test]
fn cuda_skip_becomes_a_failure_when_required() {
    if tunecheck::device::cuda().is_ok() {
        eprintln!("a CUDA device exists here: nothing to skip");
        return;
    }
    std::env::remove_var(tunecheck::device::REQUIRE_CUDA_ENV);
    assert!(tunecheck::device::cuda_or_skip("policy test").is_none());
    std::env::set_var(tunecheck::device::REQUIRE_CUDA_ENV, "1");
    let r = std::panic::catch_unwind(|| tunecheck::device::cuda_or_skip("policy test"));
    std::env::remove_var(tunecheck::device::REQUIRE_CUDA_ENV);
    assert!(r.is_err(), "TUNECHECK_REQUIRE_CUDA=1 must fail when no GPU is usable");
    assert_eq!(tunecheck::device::parse("cpu").map(|d| tunecheck::device::name(&d)), Ok("cpu".to_string()));
    assert!(tunecheck::device::parse("tpu").is_err());
}
