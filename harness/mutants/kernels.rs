//! Planted bugs in the 4-bit kernels, each caught by P9.

/// Planted bugs in 4-bit kernels, each caught by P9 (`props::p9_kernels`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelBug {
    /// The SIMD loop handles whole 16-lane chunks and forgets the remainder of each row.
    DroppedTail,
    /// Each weight row uses its first block's scale for every block (a per-row scale cache
    /// that is never refreshed).
    StaleRowScale,
    /// The bf16/f16 compute path multiplies the f32 weights, skipping the casts to the
    /// original and compute dtypes (a fast path that is not the function being trained).
    UnroundedWeights,
}

impl KernelBug {
    /// Every kernel mutant.
    pub const ALL: [KernelBug; 3] = [KernelBug::DroppedTail, KernelBug::StaleRowScale, KernelBug::UnroundedWeights];

    /// Short name.
    pub fn name(self) -> &'static str {
        match self {
            KernelBug::DroppedTail => "dropped-tail",
            KernelBug::StaleRowScale => "stale-row-scale",
            KernelBug::UnroundedWeights => "unrounded-weights",
        }
    }

    /// The real-world bug it reproduces.
    pub fn description(self) -> &'static str {
        match self {
            KernelBug::DroppedTail => "SIMD loop forgets the last <16 columns of each row",
            KernelBug::StaleRowScale => "a row's first block scale reused for all its blocks",
            KernelBug::UnroundedWeights => "bf16/f16 compute multiplies unrounded f32 weights",
        }
    }

    /// The weight this mutant computes with (row-major), from the reference decode.
    fn weights(self, v: &crate::quant::kernels::Q4View) -> Vec<f32> {
        let mut w = vec![0f32; v.numel()];
        self.dequantize_into(v, &mut w);
        for o in 0..v.rows {
            let row = &mut w[o * v.cols..(o + 1) * v.cols];
            match self {
                KernelBug::DroppedTail => {
                    let keep = row.len() / 16 * 16;
                    row[keep..].iter_mut().for_each(|x| *x = 0.0);
                }
                KernelBug::UnroundedWeights => {}
                KernelBug::StaleRowScale => {
                    let first = v.scales[(o * v.cols) / v.blocksize];
                    for (i, x) in row.iter_mut().enumerate() {
                        let s = v.scales[(o * v.cols + i) / v.blocksize];
                        if s != 0.0 {
                            *x = *x / s * first;
                        }
                    }
                }
            }
        }
        w
    }

    /// The decode this mutant sees: correct, but for the skipped casts.
    fn dequantize_into(self, v: &crate::quant::kernels::Q4View, out: &mut [f32]) {
        let v = match self {
            KernelBug::UnroundedWeights => v.with_rounding(crate::quant::kernels::Rounding::NONE),
            _ => *v,
        };
        crate::quant::kernels::dequantize_f32_into(&v, crate::quant::kernels::Isa::Scalar, out).expect("sizes match");
    }
}

impl crate::props::p9_kernels::Q4Kernels for KernelBug {
    fn name(&self) -> String {
        format!("mutant/{}", KernelBug::name(*self))
    }
    fn dequantize(&self, v: &crate::quant::kernels::Q4View, out: &mut [f32]) {
        self.dequantize_into(v, out);
    }
    fn matmul_nt(&self, v: &crate::quant::kernels::Q4View, x: &[f32], m: usize, y: &mut [f32]) {
        let w = self.weights(v);
        for mi in 0..m {
            for o in 0..v.rows {
                y[mi * v.rows + o] =
                    (0..v.cols).map(|i| x[mi * v.cols + i] as f64 * w[o * v.cols + i] as f64).sum::<f64>() as f32;
            }
        }
    }
    fn matmul_nn(&self, v: &crate::quant::kernels::Q4View, g: &[f32], m: usize, dx: &mut [f32]) {
        let w = self.weights(v);
        for mi in 0..m {
            for i in 0..v.cols {
                dx[mi * v.cols + i] =
                    (0..v.rows).map(|o| g[mi * v.rows + o] as f64 * w[o * v.cols + i] as f64).sum::<f64>() as f32;
            }
        }
    }
}
