//! The devices properties run on, and the skip/require policy for CUDA.
//!
//! A test that needs a GPU calls [`cuda_or_skip`]: without a usable CUDA device it prints
//! why it was skipped and returns `None`, unless `TUNECHECK_REQUIRE_CUDA=1` is set, in which
//! case the skip is a failure (for GPU CI, where a missing device is a broken runner).

use candle_core::Device;

/// Name of the environment variable that turns a CUDA skip into a failure.
pub const REQUIRE_CUDA_ENV: &str = "TUNECHECK_REQUIRE_CUDA";

/// The first CUDA device, or the reason there is none (no `cuda` feature, no driver, no GPU).
pub fn cuda() -> Result<Device, String> {
    if !candle_core::utils::cuda_is_available() {
        return Err("tunecheck was built without the `cuda` feature".into());
    }
    // `Device::cuda_if_available` does not fall back when the driver finds no device:
    // ask for the device and turn its error into the reason.
    Device::new_cuda(0).map_err(|e| format!("no usable CUDA device: {e}"))
}

/// True when `TUNECHECK_REQUIRE_CUDA` is set to something other than `0` or empty.
pub fn cuda_required() -> bool {
    std::env::var(REQUIRE_CUDA_ENV).is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The CUDA device for a test named `what`; `None` (with a printed skip) when there is none,
/// or a panic when [`REQUIRE_CUDA_ENV`] demands one.
pub fn cuda_or_skip(what: &str) -> Option<Device> {
    match cuda() {
        Ok(d) => Some(d),
        Err(why) if cuda_required() => {
            panic!("{what}: CUDA required by {REQUIRE_CUDA_ENV}=1 but unavailable: {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED {what} on cuda: {why} (set {REQUIRE_CUDA_ENV}=1 to make this a failure)");
            None
        }
    }
}

/// Parse a device name: `cpu`, `cuda` or `cuda:N`.
pub fn parse(name: &str) -> Result<Device, String> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "cuda" => cuda(),
        s if s.starts_with("cuda:") => {
            let n: usize = s[5..].parse().map_err(|_| format!("`{s}`: expected cuda:N"))?;
            if !candle_core::utils::cuda_is_available() {
                return Err("tunecheck was built without the `cuda` feature".into());
            }
            Device::new_cuda(n).map_err(|e| format!("{s}: {e}"))
        }
        other => Err(format!("unknown device `{other}` (cpu, cuda, cuda:N)")),
    }
}

/// A short name for reports: `cpu` or `cuda:N`.
pub fn name(d: &Device) -> String {
    match d.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// The device named `name` for a stamped test: `cpu`, or CUDA via [`cuda_or_skip`] (`None`
/// with a printed skip when absent, a panic under `TUNECHECK_REQUIRE_CUDA=1`).
pub fn for_test(name: &str) -> Option<Device> {
    match name {
        "cpu" => Some(Device::Cpu),
        "cuda" => cuda_or_skip("conformance"),
        other => panic!("conformance!: unknown device `{other}` (cpu, cuda)"),
    }
}
