//! Writing 4-bit checkpoints the way transformers + bitsandbytes write them: from weights in
//! memory ([`save_quantized`]) or streamed from a dense checkpoint directory a layer at a time
//! ([`quantize_dir`], `tunecheck quantize`). The format's tensors come from
//! [`crate::io::bnb`]; the files are written as one crash-safe directory save.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use crate::adapt::lora::PROJECTIONS;
use crate::adapt::qlora::{Quant4Linear, QuantConfig};
use crate::error::{Error, Result};
use crate::io::bnb::linear_tensors;
use crate::io::layout::{CONFIG, SINGLE};
use crate::io::st::StreamedFile;
use crate::spec::{tensor_shapes, ArchSpec};
use crate::weights::Weights;

/// Quantize the projections of a dense checkpoint and save it the way transformers +
/// bitsandbytes do (`tunecheck quantize`), as one crash-safe directory save.
pub fn save_quantized(dir: &Path, spec: &ArchSpec, weights: &Weights, cfg: &QuantConfig) -> Result<()> {
    let mut out: BTreeMap<String, Tensor> = BTreeMap::new();
    for (key, _) in tensor_shapes(spec) {
        let t = weights.get(&key).ok_or_else(|| Error::Msg(format!("cannot quantize: tensor `{key}` is missing")))?;
        let path = key.strip_suffix(".weight").unwrap_or(&key);
        let leaf = path.rsplit('.').next().unwrap_or(path);
        if PROJECTIONS.contains(&leaf) {
            let lin = Quant4Linear::quantize(t, cfg).map_err(|e| Error::Msg(format!("tensor `{key}`: {e}")))?;
            out.extend(linear_tensors(path, &lin)?);
        } else {
            out.insert(key.clone(), t.to_dtype(spec.dtype)?.to_device(&Device::Cpu)?);
        }
    }
    let mut config = crate::io::config::to_json(spec);
    config["quantization_config"] = crate::io::config::quant_to_json(cfg);
    let cfg_bytes = serde_json::to_vec_pretty(&config).map_err(|e| Error::Msg(e.to_string()))?;
    let hosted = crate::io::st::hosted(&out)?;
    crate::io::atomic::save_dir(dir, &crate::io::hf::owns, |st| {
        crate::io::st::stage_tensors(st, SINGLE, hosted)?;
        st.write(CONFIG, &cfg_bytes)
    })
}

/// transformers' default largest shard (`save_pretrained(max_shard_size="50GB")` in 5.x):
/// below it a checkpoint is one `model.safetensors`.
pub const DEFAULT_MAX_SHARD_BYTES: usize = 50_000_000_000;

/// The tensors of one decoder layer (or, after the last, of the embedding, final norm and
/// head) are a group: the unit read, quantized and written at a time.
fn group_keys(spec: &ArchSpec, k: usize) -> Vec<(String, Vec<usize>)> {
    let prefix = format!("model.layers.{k}.");
    tensor_shapes(spec)
        .into_iter()
        .filter(
            |(key, _)| if k < spec.num_layers { key.starts_with(&prefix) } else { !key.starts_with("model.layers.") },
        )
        .collect()
}

/// A group's tensors (key, shape), the names it is written under, and an upper bound of its
/// bytes.
type Group = (Vec<(String, Vec<usize>)>, Vec<String>, usize);

fn is_projection(key: &str) -> Option<&str> {
    let path = key.strip_suffix(".weight")?;
    let leaf = path.rsplit('.').next().unwrap_or(path);
    PROJECTIONS.contains(&leaf).then_some(path)
}

/// The names a projection's 4-bit form is saved under, and an upper bound of its bytes (the
/// quant state's JSON is at most 1 KiB).
fn projection_plan(path: &str, shape: &[usize], cfg: &QuantConfig) -> (Vec<String>, usize) {
    let n: usize = shape.iter().product();
    let blocks = n.div_ceil(cfg.blocksize);
    let w = format!("{path}.weight");
    let mut names = vec![w.clone(), format!("{w}.quant_map"), format!("{w}.absmax")];
    let mut bytes = n.div_ceil(2) + 16 * 4 + 1024;
    if cfg.double_quant {
        names.push(format!("{w}.nested_absmax"));
        names.push(format!("{w}.nested_quant_map"));
        bytes += blocks + blocks.div_ceil(256) * 4 + 256 * 4;
    } else {
        bytes += blocks * 4;
    }
    names.push(format!("{w}.quant_state.bitsandbytes__{}", cfg.quant_type.name()));
    (names, bytes)
}

/// Quantize the dense checkpoint in `src` into `dir` (`tunecheck quantize`), streaming: one
/// group (a decoder layer, then the embedding, final norm and head) at a time is read from the
/// memory map, quantized and appended to its file, so peak memory is about one layer whatever
/// the checkpoint's size. As transformers saves: one `model.safetensors` when the whole fits in
/// `max_shard_bytes`, else shards of at most that size (whole groups; a larger group gets a
/// shard of its own) with an index. The result loads like [`save_quantized`]'s.
pub fn quantize_dir(src: &Path, dir: &Path, cfg: &QuantConfig, max_shard_bytes: usize) -> Result<()> {
    let lazy = crate::io::hf::Lazy::open(src, None)?;
    if lazy.quant.is_some() {
        return Err(Error::file(src, "is already quantized"));
    }
    let spec = lazy.spec.clone();
    crate::quant::blockwise::check_blocksize(cfg.blocksize)?;
    // Plan: every group's names and an upper bound of its bytes, packed into shards.
    let groups: Vec<Group> = (0..=spec.num_layers)
        .map(|k| {
            let keys = group_keys(&spec, k);
            let (mut names, mut bytes) = (Vec::new(), 0usize);
            for (key, shape) in &keys {
                match is_projection(key) {
                    Some(path) => {
                        let (n, b) = projection_plan(path, shape, cfg);
                        names.extend(n);
                        bytes += b;
                    }
                    None => {
                        names.push(key.clone());
                        bytes += shape.iter().product::<usize>() * spec.dtype.size_in_bytes();
                    }
                }
            }
            (keys, names, bytes)
        })
        .collect();
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0usize;
    for (g, (_, _, bytes)) in groups.iter().enumerate() {
        if !shards.last().expect("one shard").is_empty() && size + bytes > max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        size += bytes;
        shards.last_mut().expect("one shard").push(g);
    }
    let n = shards.len();
    let file_name =
        |i: usize| if n == 1 { SINGLE.to_string() } else { format!("model-{:05}-of-{n:05}.safetensors", i + 1) };
    let mut config = crate::io::config::to_json(&spec);
    config["quantization_config"] = crate::io::config::quant_to_json(cfg);
    let cfg_bytes = serde_json::to_vec_pretty(&config).map_err(|e| Error::Msg(e.to_string()))?;
    let cpu = Device::Cpu;
    crate::io::atomic::save_dir(dir, &crate::io::hf::owns, |st| {
        let mut weight_map = serde_json::Map::new();
        let mut total = 0usize;
        let meta = crate::io::st::save_metadata(st);
        for (i, shard) in shards.iter().enumerate() {
            let file = file_name(i);
            let room = 256 + shard.iter().flat_map(|&g| &groups[g].1).map(|n| StreamedFile::room_for(n)).sum::<usize>();
            st.write_with(&file, |path| {
                let mut out = StreamedFile::create(path, room)?;
                for &g in shard {
                    for (key, shape) in &groups[g].0 {
                        let mut written = Vec::new();
                        match is_projection(key) {
                            Some(path) => {
                                let (w, _) = lazy.load_where(&cpu, |x| x == key)?;
                                let lin = Quant4Linear::quantize(&w[key], cfg)
                                    .map_err(|e| Error::Msg(format!("tensor `{key}`: {e}")))?;
                                for (name, t) in linear_tensors(path, &lin)? {
                                    let h = crate::io::st::host(&t)?;
                                    out.push_view(&name, &h)?;
                                    total += h.nbytes();
                                    written.push(name);
                                }
                            }
                            None => {
                                let view = lazy.view(key, shape)?;
                                if crate::io::st::candle_dtype(view.dtype()) == Some(spec.dtype) {
                                    out.push_view(key, &view)?;
                                    total += view.data().len();
                                } else {
                                    let (w, _) = lazy.load_where(&cpu, |x| x == key)?;
                                    let h = crate::io::st::host(&w[key])?;
                                    out.push_view(key, &h)?;
                                    total += h.nbytes();
                                }
                                written.push(key.clone());
                            }
                        }
                        lazy.release(key);
                        for name in written {
                            weight_map.insert(name, serde_json::json!(file));
                        }
                    }
                }
                out.finish(&meta)
            })?;
        }
        if n > 1 {
            let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
            st.write(crate::io::hf::INDEX, &serde_json::to_vec_pretty(&index).map_err(|e| Error::Msg(e.to_string()))?)?;
        }
        st.write(CONFIG, &cfg_bytes)
    })
}
