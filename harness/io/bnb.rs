//! transformers' bitsandbytes 4-bit serialisation. Per quantized weight `P.weight`:
//!
//! | key | content |
//! |---|---|
//! | `P.weight` | uint8 packed codes `[ceil(n/2), 1]` |
//! | `P.weight.absmax` | f32 per block, or uint8 codes with double quantization |
//! | `P.weight.quant_map` | f32 `[16]`, the 4-bit code table |
//! | `P.weight.nested_absmax` | f32 per 256 blocks (double quantization) |
//! | `P.weight.nested_quant_map` | f32 `[256]`, the 8-bit dynamic map (double quantization) |
//! | `P.weight.quant_state.bitsandbytes__nf4` | uint8 bytes of a JSON object: quant_type, blocksize, dtype, shape, and nested_blocksize, nested_dtype, nested_offset |
//!
//! and `quantization_config` in `config.json`. Only the projections are quantized;
//! embeddings, norms and `lm_head` stay dense, as transformers does.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::{json, Value};

use crate::adapt::qlora::{Quant4Linear, QuantConfig};
use crate::error::{Error, Result};
use crate::io::fields::Fields;
use crate::io::layout::Opened;
use crate::io::st::StFile;
use crate::quant::codes::dynamic_map_signed;
use crate::quant::{Absmax, QuantType, Quantized4};
use crate::spec::{dtype_name, parse_dtype};

fn load_kind(st: &StFile, key: &str, want: DType) -> Result<Tensor> {
    let t = st.load(key)?;
    if t.dtype() != want {
        return Err(Error::tensor(st.path(), key, format!("dtype {:?}, expected {want:?}", t.dtype())));
    }
    Ok(t)
}

fn f32_vec(st: &StFile, key: &str) -> Result<Vec<f32>> {
    Ok(load_kind(st, key, DType::F32)?.flatten_all()?.to_vec1::<f32>()?)
}

fn u8_vec(st: &StFile, key: &str) -> Result<Vec<u8>> {
    Ok(load_kind(st, key, DType::U8)?.flatten_all()?.to_vec1::<u8>()?)
}

/// Read the 4-bit weight of module `path` (expected logical `shape`); returns the linear and
/// every key it used.
pub fn read_linear(
    opened: &Opened,
    listing: &Path,
    path: &str,
    shape: &[usize],
    cfg: &QuantConfig,
    device: &Device,
) -> Result<(Quant4Linear, Vec<String>)> {
    let w = format!("{path}.weight");
    let qt = cfg.quant_type;
    let state_key = format!("{w}.quant_state.bitsandbytes__{}", qt.name());
    let mut used = vec![w.clone(), state_key.clone()];
    let st = opened.file_of(&state_key, listing).map_err(|_| {
        let other = QuantType::parse(if qt == QuantType::Nf4 { "fp4" } else { "nf4" }).unwrap_or(qt);
        let other_key = format!("{w}.quant_state.bitsandbytes__{}", other.name());
        if opened.index.contains_key(&other_key) {
            Error::tensor(
                listing,
                &state_key,
                format!(
                    "missing, but `{other_key}` exists: the checkpoint is {} while quantization_config says {}",
                    other.name(),
                    qt.name()
                ),
            )
        } else {
            Error::tensor(listing, &state_key, "missing (is this a 4-bit checkpoint?)")
        }
    })?;
    let bytes = u8_vec(st, &state_key)?;
    let state = parse_quant_state(&bytes, st.path(), &state_key, qt, shape)?;
    let (blocksize, orig_dtype) = (state.blocksize, state.orig_dtype);
    let packed_file = opened.file_of(&w, listing)?;
    let packed = u8_vec(packed_file, &w)?;
    let map_key = format!("{w}.quant_map");
    used.push(map_key.clone());
    let map = f32_vec(opened.file_of(&map_key, listing)?, &map_key)?;
    if map.iter().map(|v| v.to_bits()).ne(qt.code().iter().map(|v| v.to_bits())) {
        return Err(Error::tensor(listing, &map_key, format!("is not bitsandbytes' {} table", qt.name())));
    }
    let absmax_key = format!("{w}.absmax");
    used.push(absmax_key.clone());
    let absmax_file = opened.file_of(&absmax_key, listing)?;
    let absmax = if let Some((nested_blocksize, offset)) = state.nested {
        let nested_key = format!("{w}.nested_absmax");
        let nmap_key = format!("{w}.nested_quant_map");
        used.push(nested_key.clone());
        used.push(nmap_key.clone());
        let nmap = f32_vec(opened.file_of(&nmap_key, listing)?, &nmap_key)?;
        if nmap.iter().map(|v| v.to_bits()).ne(dynamic_map_signed().iter().map(|v| v.to_bits())) {
            return Err(Error::tensor(listing, &nmap_key, "is not bitsandbytes' signed dynamic map"));
        }
        Absmax::Nested {
            codes: u8_vec(absmax_file, &absmax_key)?,
            nested_absmax: f32_vec(opened.file_of(&nested_key, listing)?, &nested_key)?,
            nested_blocksize,
            offset,
        }
    } else {
        Absmax::Plain(f32_vec(absmax_file, &absmax_key)?)
    };
    let q = Quantized4 { packed, quant_type: qt, blocksize, shape: shape.to_vec(), absmax };
    let lin = Quant4Linear::new(q, orig_dtype, cfg.compute_dtype, device).map_err(|e| match e {
        Error::Config { field, msg, .. } => Error::tensor(listing, &w, format!("{field}: {msg}")),
        other => other,
    })?;
    Ok((lin, used))
}

/// The fields of a bitsandbytes `quant_state` JSON blob that change the function.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantState {
    /// Elements per block.
    pub blocksize: usize,
    /// The weight's dtype before quantization.
    pub orig_dtype: DType,
    /// `(nested_blocksize, nested_offset)` when the scales are double-quantized.
    pub nested: Option<(usize, f32)>,
}

/// Parse the `quant_state.bitsandbytes__{nf4,fp4}` blob stored as `key` in `file`, checking it
/// against the expected code and logical shape; errors name the file and key.
pub fn parse_quant_state(bytes: &[u8], file: &Path, key: &str, qt: QuantType, shape: &[usize]) -> Result<QuantState> {
    let err = |m: String| Error::tensor(file, key, m);
    let meta: Value = serde_json::from_slice(bytes).map_err(|e| err(format!("not a JSON quant state: {e}")))?;
    let c = Fields::new(&meta, Some(file), key)?;
    let qt_name = c.str("quant_type")?;
    if qt_name != qt.name() {
        return Err(c.bad("quant_type", format!("`{qt_name}`, expected `{}` (the key's suffix)", qt.name())));
    }
    let blocksize = c.usize("blocksize")?;
    let dtype = c.str("dtype")?;
    let orig_dtype =
        parse_dtype(dtype).ok_or_else(|| c.bad("dtype", format!("`{dtype}` is not float32, bfloat16 or float16")))?;
    let got_shape: Vec<usize> = match c.get("shape") {
        Some(Value::Array(a)) => a
            .iter()
            .map(|x| {
                x.as_u64().map(|n| n as usize).ok_or_else(|| c.bad("shape", format!("entry {x} is not an integer")))
            })
            .collect::<Result<_>>()?,
        other => return Err(c.bad("shape", format!("expected a list of integers, got {other:?}"))),
    };
    if got_shape != shape {
        return Err(err(format!("shape {got_shape:?}, expected {shape:?}")));
    }
    let nested = if c.present("nested_offset") {
        Some((c.usize("nested_blocksize")?, c.f64("nested_offset")? as f32))
    } else {
        None
    };
    Ok(QuantState { blocksize, orig_dtype, nested })
}

/// The tensors transformers writes for one quantized weight `P.weight`.
pub fn linear_tensors(path: &str, lin: &Quant4Linear) -> Result<BTreeMap<String, Tensor>> {
    let cpu = Device::Cpu;
    let q = &lin.q;
    let w = format!("{path}.weight");
    let mut out = BTreeMap::new();
    out.insert(w.clone(), Tensor::from_vec(q.packed.clone(), (q.packed.len(), 1), &cpu)?);
    out.insert(format!("{w}.quant_map"), Tensor::new(&q.quant_type.code()[..], &cpu)?);
    let mut meta = json!({
        "quant_type": q.quant_type.name(),
        "blocksize": q.blocksize,
        "dtype": dtype_name(lin.orig_dtype),
        "shape": q.shape,
    });
    match &q.absmax {
        Absmax::Plain(a) => {
            out.insert(format!("{w}.absmax"), Tensor::new(a.as_slice(), &cpu)?);
        }
        Absmax::Nested { codes, nested_absmax, nested_blocksize, offset } => {
            out.insert(format!("{w}.absmax"), Tensor::new(codes.as_slice(), &cpu)?);
            out.insert(format!("{w}.nested_absmax"), Tensor::new(nested_absmax.as_slice(), &cpu)?);
            out.insert(format!("{w}.nested_quant_map"), Tensor::new(dynamic_map_signed().as_slice(), &cpu)?);
            meta["nested_blocksize"] = json!(nested_blocksize);
            meta["nested_dtype"] = json!("float32");
            meta["nested_offset"] = json!(*offset as f64);
        }
    }
    let bytes = serde_json::to_vec(&meta).map_err(|e| Error::Msg(e.to_string()))?;
    let n = bytes.len();
    out.insert(format!("{w}.quant_state.bitsandbytes__{}", q.quant_type.name()), Tensor::from_vec(bytes, n, &cpu)?);
    Ok(out)
}
