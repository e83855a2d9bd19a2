//! One pass over every tensor of a checkpoint, read in place from the memory map (a
//! multi-GB file never needs its size in RAM): dtype, element count, NaN/Inf counts, and for
//! the token matrices the ids of rows whose largest |value| is at most a threshold.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use safetensors::Dtype;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::io::layout::{layout, open_all};

/// What the scan saw in one tensor.
#[derive(Debug, Clone, Serialize)]
pub struct TensorScan {
    /// Checkpoint key.
    pub name: String,
    /// File it lives in.
    pub file: PathBuf,
    /// safetensors dtype name.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<usize>,
    /// NaN values.
    pub nan: usize,
    /// ±Inf values.
    pub inf: usize,
}

/// The scan of a whole checkpoint.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    /// Every tensor, by key.
    pub tensors: BTreeMap<String, TensorScan>,
    /// Near-zero rows of `model.embed_tokens.weight` and `lm_head.weight`, by key.
    pub zero_rows: BTreeMap<String, Vec<u32>>,
}

/// The token matrices whose zero rows are untrained tokens.
pub const TOKEN_MATRICES: [&str; 2] = ["model.embed_tokens.weight", "lm_head.weight"];

/// Decode element `i` of float data (little-endian) as f32.
fn value(dtype: Dtype, data: &[u8], i: usize) -> f32 {
    match dtype {
        Dtype::F32 => f32::from_le_bytes([data[4 * i], data[4 * i + 1], data[4 * i + 2], data[4 * i + 3]]),
        Dtype::F16 => f16::from_le_bytes([data[2 * i], data[2 * i + 1]]).to_f32(),
        Dtype::BF16 => bf16::from_le_bytes([data[2 * i], data[2 * i + 1]]).to_f32(),
        Dtype::F64 => f64::from_le_bytes(data[8 * i..8 * i + 8].try_into().unwrap_or([0; 8])) as f32,
        _ => 0.0,
    }
}

fn is_float(d: Dtype) -> bool {
    matches!(d, Dtype::F32 | Dtype::F16 | Dtype::BF16 | Dtype::F64)
}

/// Scan the checkpoint in `dir`; `progress(file, bytes_done, bytes_total)` is called after
/// every tensor (tensor data bytes over all files).
pub fn scan(dir: &Path, threshold: f32, mut progress: impl FnMut(&Path, usize, usize)) -> Result<Scan> {
    if !dir.is_dir() {
        return Err(Error::file(dir, "is not a directory"));
    }
    let lay = layout(dir)?;
    let opened = open_all(&lay)?;
    let mut out = Scan::default();
    let mut total = 0usize;
    for file in opened.files.values() {
        total += file.parse()?.tensors().iter().map(|(_, v)| v.data().len()).sum::<usize>();
    }
    let mut done = 0usize;
    for (path, file) in &opened.files {
        let st = file.parse()?;
        for (name, view) in st.tensors() {
            let dtype = view.dtype();
            let shape = view.shape().to_vec();
            let data = view.data();
            let n: usize = shape.iter().product();
            let (mut nan, mut inf) = (0, 0);
            if is_float(dtype) {
                for i in 0..n {
                    let v = value(dtype, data, i);
                    nan += usize::from(v.is_nan());
                    inf += usize::from(v.is_infinite());
                }
                if TOKEN_MATRICES.contains(&name.as_str()) && shape.len() == 2 && shape[1] > 0 {
                    let cols = shape[1];
                    let rows = (0..shape[0])
                        .filter(|r| (0..cols).all(|c| value(dtype, data, r * cols + c).abs() <= threshold))
                        .map(|r| r as u32)
                        .collect();
                    out.zero_rows.insert(name.clone(), rows);
                }
            }
            done += data.len();
            file.release(&name);
            progress(path, done, total);
            out.tensors.insert(
                name.clone(),
                TensorScan { name, file: path.clone(), dtype: format!("{dtype:?}"), shape, nan, inf },
            );
        }
    }
    Ok(out)
}
