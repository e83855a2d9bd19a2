//! The 4-bit kernels' CUDA C compiles with NVRTC, which needs no GPU: built with
//! `--features nvrtc` and a libnvrtc on the loader path (CI installs Debian's `libnvrtc11.2`),
//! the source is compiled to PTX and every entry point is checked to be there. Without the
//! feature, or without libnvrtc, the test says it was skipped; `TUNECHECK_REQUIRE_NVRTC=1`
//! turns that skip into a failure.

use tunecheck::quant::kernels::cuda_src::{KERNELS, SOURCE};

fn skip(why: &str) {
    assert!(
        std::env::var("TUNECHECK_REQUIRE_NVRTC").as_deref() != Ok("1"),
        "TUNECHECK_REQUIRE_NVRTC=1 but the CUDA source was not compiled: {why}"
    );
    eprintln!("SKIPPED cuda_source_compiles_with_nvrtc: {why}");
}

#[test]
fn every_kernel_is_in_the_source() {
    for k in KERNELS {
        assert!(SOURCE.contains(&format!("__global__ void {k}(")), "{k} missing from the CUDA source");
    }
}

#[cfg(feature = "nvrtc")]
#[test]
fn cuda_source_compiles_with_nvrtc() {
    // cudarc panics when it cannot load libnvrtc: that is a skip, not a compile error.
    let ptx = match std::panic::catch_unwind(tunecheck::quant::kernels::cuda_src::compile) {
        Err(_) => return skip("libnvrtc could not be loaded (see the message above)"),
        Ok(r) => r.unwrap_or_else(|log| panic!("NVRTC rejected the 4-bit kernels:\n{log}")),
    };
    for k in KERNELS {
        assert!(ptx.contains(&format!(".entry {k}(")), "PTX has no entry point {k}");
    }
    // The f16 rounding is the PTX conversion pair, not a call to a missing library.
    assert!(ptx.contains("cvt.rn.f16.f32") && ptx.contains("cvt.f32.f16"), "f16 casts missing from the PTX");
    assert!(!ptx.contains(".extern .func"), "the PTX calls a function it does not define");
}

#[cfg(not(feature = "nvrtc"))]
#[test]
fn cuda_source_compiles_with_nvrtc() {
    skip("built without the `nvrtc` feature (cargo test --features nvrtc --test all cuda_source::)");
}
