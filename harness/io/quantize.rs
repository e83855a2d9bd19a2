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

/// Quantize the dense checkpoint in `src` into `dir` (`tunecheck quantize`) streaming: one
/// decoder layer at a time is read from the memory map, quantized and written as its own
/// shard (`model-00001-of-N.safetensors`, N = layers + 1, with an index); the embedding,
/// final norm and head go to the last shard straight from the map. Peak memory is about one
/// layer, whatever the checkpoint's size. The result loads like [`save_quantized`]'s.
pub fn quantize_dir(src: &Path, dir: &Path, cfg: &QuantConfig) -> Result<()> {
    let lazy = crate::io::hf::Lazy::open(src, None)?;
    if lazy.quant.is_some() {
        return Err(Error::file(src, "is already quantized"));
    }
    let spec = lazy.spec.clone();
    let n = spec.num_layers + 1;
    let shard = |k: usize| format!("model-{:05}-of-{n:05}.safetensors", k + 1);
    let mut config = crate::io::config::to_json(&spec);
    config["quantization_config"] = crate::io::config::quant_to_json(cfg);
    let cfg_bytes = serde_json::to_vec_pretty(&config).map_err(|e| Error::Msg(e.to_string()))?;
    let cpu = Device::Cpu;
    crate::io::atomic::save_dir(dir, &crate::io::hf::owns, |st| {
        let mut weight_map = serde_json::Map::new();
        let mut total = 0usize;
        for k in 0..n {
            let prefix = format!("model.layers.{k}.");
            let in_shard = |key: &str| {
                if k < spec.num_layers {
                    key.starts_with(&prefix)
                } else {
                    !key.starts_with("model.layers.")
                }
            };
            let mut out: Vec<(String, crate::io::st::OutTensor<'_>)> = Vec::new();
            for (key, shape) in tensor_shapes(&spec).into_iter().filter(|(key, _)| in_shard(key)) {
                let path = key.strip_suffix(".weight").unwrap_or(&key);
                let leaf = path.rsplit('.').next().unwrap_or(path);
                if PROJECTIONS.contains(&leaf) {
                    let (w, _) = lazy.load_where(&cpu, |x| x == key)?;
                    let lin = Quant4Linear::quantize(&w[&key], cfg)
                        .map_err(|e| Error::Msg(format!("tensor `{key}`: {e}")))?;
                    for (name, t) in linear_tensors(path, &lin)? {
                        out.push((name, crate::io::st::OutTensor::Host(crate::io::st::host(&t)?)));
                    }
                    continue;
                }
                let view = lazy.view(&key, &shape)?;
                if crate::io::st::candle_dtype(view.dtype()) == Some(spec.dtype) {
                    out.push((key.clone(), crate::io::st::OutTensor::Mapped(view)));
                } else {
                    let (w, _) = lazy.load_where(&cpu, |x| x == key)?;
                    out.push((key.clone(), crate::io::st::OutTensor::Host(crate::io::st::host(&w[&key])?)));
                }
            }
            for (name, t) in &out {
                total += safetensors::View::data_len(t);
                weight_map.insert(name.clone(), serde_json::json!(shard(k)));
            }
            let names: Vec<String> = out.iter().map(|(name, _)| name.clone()).collect();
            crate::io::st::stage_views(st, &shard(k), out)?;
            for name in names {
                lazy.release(&name);
            }
        }
        let index = serde_json::json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        st.write(crate::io::hf::INDEX, &serde_json::to_vec_pretty(&index).map_err(|e| Error::Msg(e.to_string()))?)?;
        st.write(CONFIG, &cfg_bytes)
    })
}
