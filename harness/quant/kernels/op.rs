//! The fused 4-bit linear as a candle custom op with a backward, so QLoRA training runs on it:
//! `y = x · Wᵀ` with the packed codes and f32 block scales held as device tensors, and
//! `∂L/∂x = ∂L/∂y · W` by the transposed op (itself differentiable). The weight is frozen:
//! no gradient flows to the codes or scales. The LoRA term is added by the caller with
//! ordinary candle ops, which carry the gradients of A and B.
//!
//! The op computes in f32 on f32 tensors. A bf16 or f16 compute dtype is the same op with the
//! weight [`Rounding`] set, fed an input already cast to the compute dtype, its f32 output
//! cast back: bf16 products are exact in f32, so this is a bf16 matmul with f32 accumulation.

use candle_core::{backend::BackendStorage, CpuStorage, CustomOp3, Device, Layout, Shape, Tensor};

use super::isa::Isa;
use super::matmul::{matmul_nn, matmul_nt};
use super::round::Rounding;
use super::view::Q4View;
use crate::error::{Error, Result};
use crate::quant::Quantized4;

/// A 4-bit weight `[rows, cols]` ready for the fused kernels on one device.
#[derive(Debug, Clone)]
pub struct Packed4 {
    /// Packed codes, u8 `[ceil(rows·cols / 2)]`.
    pub packed: Tensor,
    /// Block scales (nested scales already decoded), f32 `[blocks]`.
    pub scales: Tensor,
    /// The operation (shape, code table, blocksize).
    pub op: QLinearOp,
}

impl Packed4 {
    /// Upload a 2-D quantized weight to `device`.
    pub fn new(q: &Quantized4, device: &Device) -> Result<Self> {
        q.validate()?;
        let [rows, cols] = q.shape[..] else {
            return Err(Error::Msg(format!("a 4-bit linear weight must be 2-D, got shape {:?}", q.shape)));
        };
        let scales = q.block_scales();
        let packed = Tensor::from_slice(&q.packed, q.packed.len(), device)?;
        let scales = Tensor::from_slice(&scales, scales.len(), device)?;
        let op = QLinearOp {
            code: *q.quant_type.code(),
            blocksize: q.blocksize,
            rows,
            cols,
            transposed: false,
            round: Rounding::NONE,
        };
        Ok(Packed4 { packed, scales, op })
    }

    /// The same weight with every decoded value cast by `round` (shares the device buffers).
    pub fn with_rounding(&self, round: Rounding) -> Self {
        Packed4 { op: QLinearOp { round, ..self.op }, ..self.clone() }
    }

    /// `x · Wᵀ` for `x` of shape `[..., cols]` in f32 (differentiable in `x`).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let Some((&last, lead)) = dims.split_last() else {
            return Err(Error::Msg("4-bit linear: a scalar input".into()));
        };
        if last != self.op.cols {
            return Err(Error::Msg(format!("4-bit linear: input has {last} features, the weight {}", self.op.cols)));
        }
        let m: usize = lead.iter().product();
        let y = x.reshape((m, last))?.contiguous()?.apply_op3(&self.packed, &self.scales, self.op)?;
        let mut out = lead.to_vec();
        out.push(self.op.rows);
        Ok(y.reshape(out)?)
    }
}

/// `x [M, cols] → x · Wᵀ [M, rows]`, or transposed `g [M, rows] → g · W [M, cols]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QLinearOp {
    /// The 16 code values.
    pub code: [f32; 16],
    /// Elements per block.
    pub blocksize: usize,
    /// Output features of the forward.
    pub rows: usize,
    /// Input features of the forward.
    pub cols: usize,
    /// The backward direction.
    pub transposed: bool,
    /// The casts each decoded weight goes through.
    pub round: Rounding,
}

impl QLinearOp {
    fn flip(&self) -> Self {
        QLinearOp { transposed: !self.transposed, ..*self }
    }

    /// (input features, output features) of this direction.
    fn io(&self) -> (usize, usize) {
        if self.transposed {
            (self.rows, self.cols)
        } else {
            (self.cols, self.rows)
        }
    }

    /// The codes and scales of a CPU call as a checked view.
    fn view<'a>(&'a self, p: &'a [u8], lp: &Layout, sc: &'a [f32], ls: &Layout) -> candle_core::Result<Q4View<'a>> {
        let (p, sc) = (contiguous(p, lp, "codes")?, contiguous(sc, ls, "scales")?);
        Ok(Q4View::new(p, sc, &self.code, self.blocksize, self.rows, self.cols)
            .map_err(candle_core::Error::wrap)?
            .with_rounding(self.round))
    }

    fn check_input(&self, l: &Layout) -> candle_core::Result<usize> {
        let (fin, _) = self.io();
        match l.dims() {
            [m, k] if *k == fin => Ok(*m),
            d => candle_core::bail!("{}: input of shape {d:?}, expected [M, {fin}]", self.name()),
        }
    }
}

fn contiguous<'a, T>(v: &'a [T], l: &Layout, what: &str) -> candle_core::Result<&'a [T]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("4-bit linear: {what} is not contiguous"),
    }
}

impl CustomOp3 for QLinearOp {
    fn name(&self) -> &'static str {
        if self.transposed {
            "tunecheck-q4-linear-t"
        } else {
            "tunecheck-q4-linear"
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let m = self.check_input(l1)?;
        let (CpuStorage::F32(x), CpuStorage::U8(p), CpuStorage::F32(s)) = (s1, s2, s3) else {
            candle_core::bail!(
                "{}: expected f32 input, u8 codes, f32 scales; got {:?}, {:?}, {:?}",
                self.name(),
                s1.dtype(),
                s2.dtype(),
                s3.dtype()
            );
        };
        let x = contiguous(x, l1, "input")?;
        let v = self.view(p, l2, s, l3)?;
        let (_, fout) = self.io();
        let mut y = vec![0f32; m * fout];
        let isa = Isa::best();
        if self.transposed { matmul_nn(&v, x, m, &mut y, isa) } else { matmul_nt(&v, x, m, &mut y, isa) }
            .map_err(candle_core::Error::wrap)?;
        Ok((CpuStorage::F32(y), Shape::from((m, fout))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let m = self.check_input(l1)?;
        super::cuda::qlinear_fwd(self, m, s1, l1, s2, l2, s3, l3)
    }

    fn bwd(
        &self,
        _x: &Tensor,
        packed: &Tensor,
        scales: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // y = x·Wᵀ ⇒ ∂x = ∂y·W (and for the transposed op, ∂g = ∂dx·Wᵀ); codes are constants.
        let gx = grad.contiguous()?.apply_op3(packed, scales, self.flip())?;
        Ok((Some(gx), None, None))
    }
}

impl Packed4 {
    /// The dequantized weight `[rows, cols]` in f32 on this device, rounded as the products
    /// see it (the fast kernels; bitwise equal to the reference on the CPU).
    pub fn dequantize(&self) -> Result<Tensor> {
        Ok(self.packed.apply_op2_no_bwd(&self.scales, &DequantOp(self.op))?)
    }
}

/// `(codes, scales) → W [rows, cols]` in f32 (no backward: the weight is frozen).
#[derive(Debug, Clone, Copy)]
struct DequantOp(QLinearOp);

impl candle_core::CustomOp2 for DequantOp {
    fn name(&self) -> &'static str {
        "tunecheck-q4-dequantize"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (CpuStorage::U8(p), CpuStorage::F32(s)) = (s1, s2) else {
            candle_core::bail!("{}: expected u8 codes and f32 scales", self.name());
        };
        let v = self.0.view(p, l1, s, l2)?;
        let mut out = vec![0f32; v.numel()];
        super::dequant::dequantize_f32_into(&v, Isa::best(), &mut out).map_err(candle_core::Error::wrap)?;
        Ok((CpuStorage::F32(out), Shape::from((v.rows, v.cols))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let op = &self.0;
        let out = super::cuda::dequant(op, s1, l1, s2, l2)?;
        Ok((out, Shape::from((op.rows, op.cols))))
    }
}
