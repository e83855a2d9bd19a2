//! A borrowed view of a 4-bit matrix `[rows, cols]` in bitsandbytes layout, with its block
//! scales already decoded to f32 and the rounding its decoded weights go through: what every
//! kernel reads.

use super::round::Rounding;
use crate::error::{Error, Result};

/// Packed codes (high nibble first), one f32 scale per block, the code table.
#[derive(Debug, Clone, Copy)]
pub struct Q4View<'a> {
    /// `ceil(rows·cols / 2)` bytes.
    pub packed: &'a [u8],
    /// `ceil(rows·cols / blocksize)` scales.
    pub scales: &'a [f32],
    /// The 16 code values.
    pub code: &'a [f32; 16],
    /// Elements per block (a power of two, at least 32).
    pub blocksize: usize,
    /// Output features.
    pub rows: usize,
    /// Input features.
    pub cols: usize,
    /// `log2(blocksize)`: block of flat index `f` is `f >> shift` (no division in hot loops).
    pub(crate) shift: u32,
    /// The casts applied to each decoded `code · scale` (none unless set).
    pub(crate) round: Rounding,
}

impl<'a> Q4View<'a> {
    /// Check the lengths; errors name the field.
    pub fn new(
        packed: &'a [u8],
        scales: &'a [f32],
        code: &'a [f32; 16],
        blocksize: usize,
        rows: usize,
        cols: usize,
    ) -> Result<Self> {
        crate::quant::blockwise::check_blocksize(blocksize)?;
        let n = rows * cols;
        if packed.len() != n.div_ceil(2) {
            return Err(Error::field("weight", format!("{} packed bytes for {rows}x{cols}", packed.len())));
        }
        if scales.len() != n.div_ceil(blocksize) {
            return Err(Error::field(
                "absmax",
                format!("{} scales for {rows}x{cols} in blocks of {blocksize}", scales.len()),
            ));
        }
        Ok(Q4View {
            packed,
            scales,
            code,
            blocksize,
            rows,
            cols,
            shift: blocksize.trailing_zeros(),
            round: Rounding::NONE,
        })
    }

    /// The same view with every decoded weight rounded by `round` (what a product in a
    /// lower compute dtype multiplies).
    pub fn with_rounding(self, round: Rounding) -> Self {
        Q4View { round, ..self }
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.rows * self.cols
    }

    /// The block of flat element `f`.
    #[inline]
    pub(crate) fn block(&self, f: usize) -> usize {
        f >> self.shift
    }

    /// The code index of flat element `f`.
    #[inline]
    pub(crate) fn nibble(&self, f: usize) -> usize {
        let b = self.packed[f / 2];
        (if f.is_multiple_of(2) { b >> 4 } else { b & 0x0f }) as usize
    }

    /// Split the flat range `[start, end)` at block boundaries: `(start, end, scale)` pieces.
    pub(crate) fn segments(&self, start: usize, end: usize) -> impl Iterator<Item = (usize, usize, f32)> + '_ {
        let bs = self.blocksize;
        let mut s = start;
        std::iter::from_fn(move || {
            if s >= end {
                return None;
            }
            let block = self.block(s);
            let e = ((block + 1) * bs).min(end);
            let seg = (s, e, self.scales[block]);
            s = e;
            Some(seg)
        })
    }
}
