//! CUDA versions of the 4-bit kernels (feature `cuda`): the CUDA C of [`super::cuda_src`]
//! compiled once per process with NVRTC (no nvcc step in the build beyond what candle needs),
//! loaded into candle's device and launched on its stream. Accumulation order differs from the CPU kernels, so CPU vs
//! CUDA is compared with a tolerance (P6), never bitwise.

use std::sync::OnceLock;

use candle_core::cuda_backend::cudarc::driver::{LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::WrapErr;
use candle_core::{CudaStorage, Layout, Shape};

use super::op::QLinearOp;

const MODULE: &str = "tunecheck_q4";

/// The PTX text, compiled once.
fn ptx() -> candle_core::Result<&'static str> {
    static PTX: OnceLock<Result<String, String>> = OnceLock::new();
    PTX.get_or_init(super::cuda_src::compile)
        .as_deref()
        .map_err(|e| candle_core::Error::Msg(format!("compiling the tunecheck 4-bit CUDA kernels: {e}")))
}

fn i32_of(v: usize, what: &str) -> candle_core::Result<i32> {
    i32::try_from(v).map_err(|_| candle_core::Error::Msg(format!("4-bit CUDA kernel: {what} = {v} exceeds i32")))
}

/// The forward (or transposed) 4-bit linear on CUDA.
#[allow(clippy::too_many_arguments)]
pub(super) fn qlinear_fwd(
    op: &QLinearOp,
    m: usize,
    s1: &CudaStorage,
    l1: &Layout,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> candle_core::Result<(CudaStorage, Shape)> {
    let dev = s1.device.clone();
    let offsets = |l: &Layout, what: &str| {
        l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg(format!("4-bit linear: {what} is not contiguous")))
    };
    let (a1, b1) = offsets(l1, "input")?;
    let (a2, b2) = offsets(l2, "codes")?;
    let (a3, b3) = offsets(l3, "scales")?;
    let x = s1.as_cuda_slice::<f32>()?.slice(a1..b1);
    let p = s2.as_cuda_slice::<u8>()?.slice(a2..b2);
    let s = s3.as_cuda_slice::<f32>()?.slice(a3..b3);
    let code = dev.cuda_stream().clone_htod(&op.code[..]).w()?;
    let (bs, rows, cols, mm) =
        (i32_of(op.blocksize, "blocksize")?, i32_of(op.rows, "rows")?, i32_of(op.cols, "cols")?, i32_of(m, "M")?);
    let (r0, r1) = (op.round.0[0].code(), op.round.0[1].code());
    let fout = if op.transposed { op.cols } else { op.rows };
    // SAFETY: every element is written by the kernel below.
    let out = unsafe { dev.alloc::<f32>(m * fout)? };
    let gy = (m.clamp(1, 65535)) as u32;
    let (name, cfg) = if op.transposed {
        (
            "tc_q4_nn",
            LaunchConfig {
                grid_dim: (op.cols.div_ceil(256) as u32, gy, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            },
        )
    } else {
        ("tc_q4_nt", LaunchConfig { grid_dim: (op.rows as u32, gy, 1), block_dim: (128, 1, 1), shared_mem_bytes: 0 })
    };
    if m > 0 && fout > 0 {
        let func = dev.get_or_load_custom_func(name, MODULE, ptx()?)?;
        let mut b = func.builder();
        b.arg(&x);
        b.arg(&p);
        b.arg(&s);
        b.arg(&code);
        b.arg(&bs);
        b.arg(&r0);
        b.arg(&r1);
        b.arg(&rows);
        b.arg(&cols);
        b.arg(&mm);
        b.arg(&out);
        // SAFETY: argument types and counts match the kernel signature; bounds are in the kernel.
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), Shape::from((m, fout))))
}

/// Dequantize on CUDA: packed codes and f32 scales (device slices) → f32 `[rows·cols]`,
/// rounded as `op` says.
pub(super) fn dequant(
    op: &QLinearOp,
    s2: &CudaStorage,
    l2: &Layout,
    s3: &CudaStorage,
    l3: &Layout,
) -> candle_core::Result<CudaStorage> {
    let dev = s2.device.clone();
    let (a2, b2) = l2.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("codes not contiguous".into()))?;
    let (a3, b3) = l3.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("scales not contiguous".into()))?;
    let p = s2.as_cuda_slice::<u8>()?.slice(a2..b2);
    let s = s3.as_cuda_slice::<f32>()?.slice(a3..b3);
    let n = op.rows * op.cols;
    let code = dev.cuda_stream().clone_htod(&op.code[..]).w()?;
    // SAFETY: every element is written by the kernel below.
    let out = unsafe { dev.alloc::<f32>(n)? };
    if n > 0 {
        let func = dev.get_or_load_custom_func("tc_q4_dequant", MODULE, ptx()?)?;
        let bs = i32_of(op.blocksize, "blocksize")?;
        let (r0, r1) = (op.round.0[0].code(), op.round.0[1].code());
        let nn = n as i64;
        let mut b = func.builder();
        b.arg(&p);
        b.arg(&s);
        b.arg(&code);
        b.arg(&bs);
        b.arg(&r0);
        b.arg(&r1);
        b.arg(&nn);
        b.arg(&out);
        let cfg = LaunchConfig {
            grid_dim: (n.div_ceil(256).min(65535 * 16) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: as above.
        unsafe { b.launch(cfg) }.w()?;
    }
    Ok(CudaStorage::wrap_cuda_slice(out, dev))
}
