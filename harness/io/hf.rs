//! Hugging Face model directories: `config.json` plus `model.safetensors`, or shards listed
//! in `model.safetensors.index.json`, with transformers' tensor names.
//!
//! Loading checks the set of tensors exactly against the spec: a missing, unexpected,
//! wrongly-shaped or non-float tensor is an error naming the file and the key. A save replaces
//! the directory's model files as one crash-safe unit, dropping those of the other layout
//! (single vs sharded) so a directory never holds two disagreeing copies.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device};
use serde_json::json;

use crate::adapt::inject::Bases;
use crate::adapt::linear::Base;
use crate::adapt::lora::PROJECTIONS;
use crate::adapt::qlora::QuantConfig;
use crate::error::{Error, Result};
use crate::io::atomic::{save_dir, Staged};
use crate::io::layout::{layout, open_all, Layout};
pub use crate::io::layout::{owns, Opened, CONFIG, INDEX, SINGLE};
use crate::io::st::{host, stage_tensors};
use crate::spec::tensor_shapes;
use crate::spec::ArchSpec;
use crate::weights::Weights;

/// A checkpoint loaded from disk.
pub struct Checkpoint {
    /// The architecture from `config.json`.
    pub spec: ArchSpec,
    /// The dense weights, cast to the spec's dtype, on the requested device (every tensor
    /// of the spec except 4-bit projections).
    pub weights: Weights,
    /// The 4-bit configuration from `quantization_config`, if any.
    pub quant: Option<QuantConfig>,
    /// The 4-bit projections by module path (empty when not quantized).
    pub bases: Bases,
}

/// A checkpoint directory opened without loading its tensors: the config, the 4-bit
/// configuration and the memory-mapped files, with the set of keys checked against the spec.
/// [`Lazy::load_where`] then loads any part of it, so a model larger than memory can be
/// streamed (a layer at a time).
pub struct Lazy {
    /// The architecture from `config.json` (dtype possibly overridden).
    pub spec: ArchSpec,
    /// The 4-bit configuration from `quantization_config`, if any.
    pub quant: Option<QuantConfig>,
    layout: Layout,
    opened: Opened,
}

impl Lazy {
    /// Open `dir` (checking its save manifest, `config.json`, the file layout, and that every
    /// stored key belongs to the spec), reading tensors in `dtype` when given.
    pub fn open(dir: &Path, dtype: Option<DType>) -> Result<Self> {
        crate::io::atomic::check_dir(dir)?;
        if !dir.is_dir() {
            return Err(Error::file(dir, "is not a directory"));
        }
        let cfg_path = dir.join(CONFIG);
        let mut spec = crate::io::config::read(&cfg_path)?;
        let quant = crate::io::config::read_quant(&cfg_path)?;
        if let Some(d) = dtype {
            spec.dtype = d;
        }
        let layout = layout(dir)?;
        let opened = open_all(&layout)?;
        let lazy = Lazy { spec, quant, layout, opened };
        lazy.check_keys()?;
        Ok(lazy)
    }

    /// Whether `key` is a 4-bit projection's weight or one of its quantization tensors.
    fn quantized_key(&self, key: &str) -> bool {
        self.quant.is_some()
            && key
                .split_once(".weight")
                .is_some_and(|(path, _)| path.rsplit('.').next().is_some_and(|leaf| PROJECTIONS.contains(&leaf)))
    }

    /// Every stored key is a tensor of the spec (or 4-bit state of one of its projections).
    fn check_keys(&self) -> Result<()> {
        let expected: std::collections::BTreeSet<String> =
            tensor_shapes(&self.spec).into_iter().map(|(k, _)| k).collect();
        let spec = &self.spec;
        if self.quant.is_none() {
            // The clearest message first: a 4-bit weight in a checkpoint whose config says dense.
            let opened = &self.opened;
            for (key, _) in tensor_shapes(spec) {
                if ["nf4", "fp4"]
                    .iter()
                    .any(|q| opened.index.contains_key(&format!("{key}.quant_state.bitsandbytes__{q}")))
                {
                    let st = opened.file_of(&key, &self.layout.listing)?;
                    return Err(Error::tensor(
                        st.path(),
                        &key,
                        "is 4-bit (it has a bitsandbytes quant_state) but config.json has no quantization_config",
                    ));
                }
            }
        }
        if let Some(extra) = self.opened.index.keys().find(|k| !expected.contains(*k) && !self.quantized_key(k)) {
            let file = &self.opened.index[extra];
            let why = if extra == "lm_head.weight" && spec.tie_word_embeddings {
                "unexpected: tie_word_embeddings is true, so the head is embed_tokens".to_string()
            } else if extra.contains(".weight.") && self.quant.is_none() {
                "unexpected: looks like 4-bit quantization state but config.json has no quantization_config".to_string()
            } else {
                format!("unexpected for a {} model with {} layers", spec.family, spec.num_layers)
            };
            return Err(Error::tensor(file, extra, why));
        }
        Ok(())
    }

    /// Load the spec's tensors whose keys satisfy `want` onto `device`: dense tensors cast to
    /// the spec's dtype, 4-bit projections as bases by module path.
    pub fn load_where(&self, device: &Device, want: impl Fn(&str) -> bool) -> Result<(Weights, Bases)> {
        let (spec, quant, opened, listing) = (&self.spec, &self.quant, &self.opened, &self.layout.listing);
        let mut weights = Weights::new();
        let mut bases = Bases::new();
        for (key, shape) in tensor_shapes(spec) {
            if !want(&key) {
                continue;
            }
            let path = key.strip_suffix(".weight").unwrap_or(&key);
            let leaf = path.rsplit('.').next().unwrap_or(path);
            if let (Some(q), true) = (quant, PROJECTIONS.contains(&leaf)) {
                let (lin, used) = crate::io::bnb::read_linear(opened, listing, path, &shape, q, device)?;
                for k in used {
                    self.release(&k);
                }
                bases.insert(path.to_string(), Base::Quant4(Box::new(lin)));
                continue;
            }
            // (A 4-bit weight under a dense config was refused by `open`.)
            let st = opened.file_of(&key, listing)?;
            weights.insert(key.clone(), st.load_float(&key, &shape, spec.dtype, device)?);
            st.release(&key);
        }
        Ok((weights, bases))
    }

    /// The stored bytes of tensor `key` (borrowed from the memory map), which must have
    /// `shape`.
    pub fn view(&self, key: &str, shape: &[usize]) -> Result<safetensors::tensor::TensorView<'_>> {
        let st = self.opened.file_of(key, &self.layout.listing)?;
        let v = st.view(key)?;
        if v.shape() != shape {
            return Err(Error::tensor(st.path(), key, format!("shape {:?}, expected {shape:?}", v.shape())));
        }
        Ok(v)
    }

    /// Drop the mapped pages of `key` (see [`crate::io::st::StFile::release`]).
    pub fn release(&self, key: &str) {
        if let Ok(st) = self.opened.file_of(key, &self.layout.listing) {
            st.release(key);
        }
    }
}

/// Load a checkpoint directory onto `device`, cast to the config's dtype (or `dtype` when
/// given). A `quantization_config` in `config.json` makes the projections 4-bit bases read
/// from transformers' bitsandbytes serialisation.
pub fn load(dir: &Path, device: &Device, dtype: Option<DType>) -> Result<Checkpoint> {
    let lazy = Lazy::open(dir, dtype)?;
    let (weights, bases) = lazy.load_where(device, |_| true)?;
    Ok(Checkpoint { spec: lazy.spec, weights, quant: lazy.quant, bases })
}

/// How to split weights into files when saving.
#[derive(Debug, Clone, Copy, Default)]
pub enum Sharding {
    /// One `model.safetensors`.
    #[default]
    Single,
    /// Shards of at most this many bytes (a larger tensor gets a shard of its own) and an index;
    /// one plain `model.safetensors` when everything fits in one, as transformers writes.
    MaxBytes(usize),
}

/// Save `spec` + `weights` as a transformers-loadable directory, as one crash-safe unit (see
/// [`crate::io::atomic`]); weights are checked against the spec first so a bad call writes
/// nothing.
pub fn save(dir: &Path, spec: &ArchSpec, weights: &Weights, sharding: Sharding) -> Result<()> {
    check_savable(spec, weights)?;
    save_dir(dir, &owns, |st| write_into(st, "", spec, weights, sharding))
}

/// The weights hold exactly the spec's tensors with its shapes.
pub(crate) fn check_savable(spec: &ArchSpec, weights: &Weights) -> Result<()> {
    spec.validate()?;
    let expected: BTreeMap<String, Vec<usize>> = tensor_shapes(spec).into_iter().collect();
    for (k, shape) in &expected {
        let t = weights.get(k).ok_or_else(|| Error::Msg(format!("cannot save: tensor `{k}` is missing")))?;
        if t.dims() != shape.as_slice() {
            return Err(Error::Msg(format!("cannot save: tensor `{k}` has shape {:?}, expected {shape:?}", t.dims())));
        }
    }
    if let Some(extra) = weights.keys().find(|k| !expected.contains_key(*k)) {
        return Err(Error::Msg(format!("cannot save: tensor `{extra}` is not part of the spec")));
    }
    Ok(())
}

/// Write the model's files under `prefix` (`""` or `"base/"`) of a directory save.
pub(crate) fn write_into(
    st: &mut Staged,
    prefix: &str,
    spec: &ArchSpec,
    weights: &Weights,
    sharding: Sharding,
) -> Result<()> {
    check_savable(spec, weights)?;
    write_generated(st, prefix, spec, sharding, &mut |k| Ok(weights[k].clone()))
}

/// Save a model whose tensors come from `produce(key)` one shard at a time (a seeded model
/// larger than memory: `tunecheck synth` of an 8B spec), as one crash-safe directory save.
pub fn save_generated(
    dir: &Path,
    spec: &ArchSpec,
    sharding: Sharding,
    produce: &mut dyn FnMut(&str) -> Result<candle_core::Tensor>,
) -> Result<()> {
    spec.validate()?;
    save_dir(dir, &owns, |st| write_generated(st, "", spec, sharding, produce))
}

/// One planned file of a save: its name and its tensors' keys and shapes.
type ShardPlan = (String, Vec<(String, Vec<usize>)>);

/// The shards of a save, in key order, split at `sharding`'s size.
fn plan(spec: &ArchSpec, sharding: Sharding) -> Vec<ShardPlan> {
    let shapes: BTreeMap<String, Vec<usize>> = tensor_shapes(spec).into_iter().collect();
    let max = match sharding {
        Sharding::Single => return vec![(SINGLE.to_string(), shapes.into_iter().collect())],
        Sharding::MaxBytes(max) => max,
    };
    let mut groups: Vec<Vec<(String, Vec<usize>)>> = vec![Vec::new()];
    let mut size = 0usize;
    for (k, shape) in shapes {
        let bytes = shape.iter().product::<usize>() * spec.dtype.size_in_bytes();
        if !groups.last().expect("one shard").is_empty() && size + bytes > max {
            groups.push(Vec::new());
            size = 0;
        }
        size += bytes;
        groups.last_mut().expect("one shard").push((k, shape));
    }
    let n = groups.len();
    if n == 1 {
        // Below the shard size transformers writes one plain file, without an index.
        return vec![(SINGLE.to_string(), groups.remove(0))];
    }
    groups.into_iter().enumerate().map(|(i, g)| (format!("model-{:05}-of-{:05}.safetensors", i + 1, n), g)).collect()
}

fn write_generated(
    st: &mut Staged,
    prefix: &str,
    spec: &ArchSpec,
    sharding: Sharding,
    produce: &mut dyn FnMut(&str) -> Result<candle_core::Tensor>,
) -> Result<()> {
    let cfg = serde_json::to_vec_pretty(&crate::io::config::to_json(spec)).map_err(|e| Error::Msg(e.to_string()))?;
    let shards = plan(spec, sharding);
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    for (file, keys) in &shards {
        let mut hosted = Vec::with_capacity(keys.len());
        for (k, shape) in keys {
            let t = produce(k)?;
            if t.dims() != shape.as_slice() {
                return Err(Error::Msg(format!(
                    "cannot save: tensor `{k}` has shape {:?}, expected {shape:?}",
                    t.dims()
                )));
            }
            let h = host(&t.to_dtype(spec.dtype)?)?;
            total += h.nbytes();
            weight_map.insert(k.clone(), json!(file));
            hosted.push((k.clone(), h));
        }
        stage_tensors(st, &format!("{prefix}{file}"), hosted)?;
    }
    if shards.len() > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let bytes = serde_json::to_vec_pretty(&index).map_err(|e| Error::Msg(e.to_string()))?;
        st.write(&format!("{prefix}{INDEX}"), &bytes)?;
    }
    st.write(&format!("{prefix}{CONFIG}"), &cfg)
}
