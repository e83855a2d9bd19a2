//! The devices properties run on, and the skip/require policy for CUDA.
//!
//! A test that needs a GPU calls [`cuda_or_skip`]: without a usable CUDA device it prints
//! why it was skipped and returns `None`, unless `TUNECHECK_REQUIRE_CUDA=1` is set, in which
//! case the skip is a failure (for GPU CI, where a missing device is a broken runner).
//!
//! It also pins candle's CPU thread count once per process ([`pin_thread_count`]), which every
//! forward pass and property run does before computing.

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
    required_by(std::env::var(REQUIRE_CUDA_ENV).ok().as_deref())
}

/// Whether a value of [`REQUIRE_CUDA_ENV`] (`None` when unset) demands a GPU: anything but
/// unset, empty or `0`.
pub fn required_by(value: Option<&str>) -> bool {
    value.is_some_and(|v| !v.is_empty() && v != "0")
}

/// The CUDA device for a test named `what`; `None` (with a printed skip) when there is none,
/// or a panic when [`REQUIRE_CUDA_ENV`] demands one.
pub fn cuda_or_skip(what: &str) -> Option<Device> {
    skip_or_fail(what, cuda(), cuda_required())
}

/// The skip/require policy on an already-probed device: the device, or `None` with a printed
/// skip, or a panic naming the reason when `required`.
pub fn skip_or_fail(what: &str, probed: Result<Device, String>, required: bool) -> Option<Device> {
    match probed {
        Ok(d) => Some(d),
        Err(why) if required => {
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

/// Pin candle's CPU thread count for this process (to the value candle itself would choose) by
/// setting `RAYON_NUM_THREADS` when it is unset. candle 0.11 reads that variable on every
/// matmul and, when it is absent, works the default (the physical core count) out again by
/// reading and parsing `/proc/cpuinfo` — 27 251 opens for one P4 run, 28 130 in 15 s of
/// training, which made runs on tiny models 3–5× slower. Setting it to the same number
/// changes no thread count and no result. A value the user set is kept. Called by every
/// forward pass of [`crate::model::Transformer`] and every property run; a `Once` makes the
/// later calls an atomic load.
pub fn pin_thread_count() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if std::env::var_os("RAYON_NUM_THREADS").is_none() {
            let n = candle_core::utils::get_num_threads();
            std::env::set_var("RAYON_NUM_THREADS", n.to_string());
        }
    });
}
