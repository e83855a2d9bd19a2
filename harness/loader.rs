//! Model assembly, the one place that turns parts into a model: base weights (in memory, a
//! checkpoint directory, or a checkpoint streamed a decoder layer at a time), an optional
//! adapter (new and seeded, or saved by PEFT or tunecheck, with any base weights saved beside
//! it), and an optional 4-bit base. `logits`, `inspect`, the trainer and the trait subjects
//! all build their models here; `io/` only reads and writes the files.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::adapt::inject::{Bases, Inject, LoraValues, Params};
use crate::adapt::linear::Base;
use crate::adapt::lora::{LoraConfig, PROJECTIONS};
use crate::adapt::qlora::{Quant4Linear, QuantConfig};
use crate::error::{Error, Result};
use crate::io::hf::{Checkpoint, Lazy};
use crate::io::peft::{self, Adapter, SavedBase};
use crate::model::{DecoderLayer, Mode, Transformer};
use crate::spec::ArchSpec;
use crate::weights::Weights;

/// A model and the trainable parameters its adapter added (empty without one).
#[derive(Debug)]
pub struct Loaded {
    /// The model, adapters in place.
    pub model: Transformer,
    /// The adapter's parameters as `Var`s, in a fixed order.
    pub params: Params,
}

/// A saved adapter and the directory it was read from (for error messages).
pub type SavedAdapter<'a> = (&'a Adapter, &'a Path);

/// Build a model from dense `weights` (on their device) with what `inj` injects.
pub fn build(spec: &ArchSpec, weights: &Weights, mut inj: Inject) -> Result<Loaded> {
    let device =
        weights.values().next().map(|t| t.device().clone()).ok_or_else(|| Error::Msg("no weights given".into()))?;
    let map = weights.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    let model = Transformer::load_injected(VarBuilder::from_tensors(map, spec.dtype, &device), spec, &mut inj)?;
    Ok(Loaded { model, params: inj.finish()? })
}

/// Quantize every projection of `weights` with `q` (the head and embedding stay dense), as
/// bitsandbytes' `Linear4bit` does when a model loads in 4-bit.
pub fn quantize_bases(spec: &ArchSpec, weights: &Weights, q: &QuantConfig) -> Result<Bases> {
    let mut bases = Bases::new();
    for (name, t) in weights {
        let Some(path) = name.strip_suffix(".weight") else {
            continue;
        };
        let leaf = path.rsplit('.').next().unwrap_or(path);
        if PROJECTIONS.contains(&leaf) {
            bases.insert(path.to_string(), Base::Quant4(Box::new(Quant4Linear::quantize(t, q)?)));
        }
    }
    debug_assert_eq!(bases.len(), spec.num_layers * PROJECTIONS.len());
    Ok(bases)
}

/// The model of a loaded checkpoint (4-bit projections included), with a saved adapter.
pub fn checkpoint(ck: &Checkpoint, adapter: Option<SavedAdapter>) -> Result<Loaded> {
    let (mut spec, mut weights, mut bases) = (ck.spec.clone(), ck.weights.clone(), ck.bases.clone());
    let inj = match adapter {
        None => Inject::none(),
        Some((a, dir)) => {
            let values = adapter_values(a, ck.quant.as_ref(), dir, &mut spec, &mut weights, &mut bases)?;
            saved_lora(a, dir, values)
        }
    };
    build(&spec, &weights, inj.with_bases(bases))
}

/// Read the checkpoint in `dir` on `device` and build its model, with the adapter in
/// `adapter_dir` when given.
pub fn open(dir: &Path, device: &Device, adapter_dir: Option<&Path>) -> Result<Loaded> {
    let ck = crate::io::hf::load(dir, device, None)?;
    let adapter = adapter_dir.map(|d| peft::read(d).map(|a| (a, d))).transpose()?;
    checkpoint(&ck, adapter.as_ref().map(|(a, d)| (a, *d)))
}

/// The adapter's own tensors, after checking the recorded base quantization and putting the
/// base weights saved with it into `weights` (resizing the vocabulary of `spec` when they do).
fn adapter_values(
    adapter: &Adapter,
    base_quant: Option<&QuantConfig>,
    dir: &Path,
    spec: &mut ArchSpec,
    weights: &mut Weights,
    bases: &mut Bases,
) -> Result<BTreeMap<String, Tensor>> {
    peft::check_base_quant(adapter, base_quant, dir)?;
    let mut values = adapter.tensors.clone();
    let saved = peft::take_saved_base(&mut values, &adapter.lora);
    apply_saved_base(spec, weights, bases, saved, dir)?;
    Ok(values)
}

fn saved_lora(adapter: &Adapter, dir: &Path, values: BTreeMap<String, Tensor>) -> Inject {
    let what = dir.join(peft::WEIGHTS).display().to_string();
    Inject::none().with_lora(adapter.lora.clone(), LoraValues::Saved { values, what })
}

const EMBED: &str = "model.embed_tokens.weight";
const HEAD: &str = "lm_head.weight";

/// Replace the frozen embedding and head with those saved beside an adapter, possibly with
/// another vocabulary size. An untied model needs a head with as many rows as the embedding;
/// a tied one takes its head from the embedding, and a head saved for it must equal it.
/// Errors name the adapter's weights file.
fn apply_saved_base(
    spec: &mut ArchSpec,
    weights: &mut Weights,
    bases: &mut Bases,
    saved: SavedBase,
    dir: &Path,
) -> Result<()> {
    if saved.is_empty() {
        return Ok(());
    }
    saved.vocab(spec, dir)?;
    let bad = |msg: &str| Error::file(&dir.join(peft::WEIGHTS), msg);
    let device = weights.get(EMBED).map(|t| t.device().clone()).ok_or_else(|| bad("the base has no embedding"))?;
    let cast = |t: Tensor| -> Result<Tensor> { Ok(t.to_dtype(spec.dtype)?.to_device(&device)?) };
    let embed = match saved.embed {
        Some((_, t)) => cast(t)?,
        None => weights[EMBED].clone(),
    };
    let head = saved.head.map(|(_, t)| cast(t)).transpose()?;
    let (v, h) = (embed.dim(0)?, spec.hidden_size);
    let head = match (spec.tie_word_embeddings, head) {
        (true, None) => None,
        (true, Some(t)) => {
            let same = t.dims() == embed.dims()
                && t.to_dtype(DType::F32)?.sub(&embed.to_dtype(DType::F32)?)?.abs()?.max_all()?.to_scalar::<f32>()?
                    == 0.0;
            if !same {
                return Err(bad("lm_head is tied to embed_tokens but a different head was given"));
            }
            None
        }
        (false, None) if v == spec.vocab_size => {
            if bases.contains_key("lm_head") {
                return Err(bad("a 4-bit lm_head cannot be kept"));
            }
            None
        }
        (false, None) => {
            return Err(bad(&format!(
                "the vocabulary changes from {} to {v} rows but no lm_head of that size was given",
                spec.vocab_size
            )))
        }
        (false, Some(t)) => {
            if t.dims() != [v, h] {
                return Err(bad(&format!("lm_head: shape {:?}, expected [{v}, {h}]", t.dims())));
            }
            Some(t)
        }
    };
    if let Some(t) = head {
        bases.remove("lm_head");
        weights.insert(HEAD.to_string(), t);
    }
    spec.vocab_size = v;
    weights.insert(EMBED.to_string(), embed);
    Ok(())
}

/// A checkpoint streamed a decoder layer at a time (inference only): the shell (embedding,
/// final norm, head, with their adapters) stays loaded, each layer is read from the memory
/// map, adapted and dropped in turn, so peak memory is the shell plus one layer.
pub struct Streamed<'a> {
    lazy: &'a Lazy,
    shell: Transformer,
    device: Device,
    /// The adapter's per-layer part, when there is an adapter.
    layers: Option<LayerValues>,
}

/// A saved adapter's LoRA pairs for the decoder layers of a streamed model.
struct LayerValues {
    lora: LoraConfig,
    /// The adapter's weights file, for errors.
    what: String,
    /// Tensors by layer.
    per_layer: Vec<BTreeMap<String, Tensor>>,
}

impl<'a> Streamed<'a> {
    /// Open the shell of `lazy` on `device`, with a saved adapter: its base weights, the
    /// shell's adapters, and each layer's LoRA pairs set aside for the layers.
    pub fn open(lazy: &'a Lazy, device: &Device, adapter: Option<SavedAdapter>) -> Result<Self> {
        let (weights, mut bases) = lazy.load_where(device, |k| !k.starts_with("model.layers."))?;
        let (mut spec, mut weights) = (lazy.spec.clone(), weights);
        let (inj, layers) = match adapter {
            None => (Inject::none(), None),
            Some((a, dir)) => {
                let values = adapter_values(a, lazy.quant.as_ref(), dir, &mut spec, &mut weights, &mut bases)?;
                let what = dir.join(peft::WEIGHTS).display().to_string();
                let (top, per_layer) = split_layers(values, spec.num_layers, &what)?;
                (saved_lora(a, dir, top), Some(LayerValues { lora: a.lora.clone(), what, per_layer }))
            }
        };
        let mut inj = inj.with_bases(bases);
        let map = weights.into_iter().collect();
        let shell = Transformer::load_shell(VarBuilder::from_tensors(map, spec.dtype, device), &spec, &mut inj)?;
        inj.finish()?;
        Ok(Streamed { lazy, shell, device: device.clone(), layers })
    }

    /// The architecture (with the vocabulary an adapter's saved base weights set).
    pub fn spec(&self) -> &ArchSpec {
        self.shell.spec()
    }

    /// The shell alone (it refuses a plain forward: its layers are not loaded).
    pub fn shell(&self) -> &Transformer {
        &self.shell
    }

    /// Decoder layer `i`, read and adapted.
    pub fn layer(&self, i: usize) -> Result<DecoderLayer> {
        let prefix = format!("model.layers.{i}.");
        let (weights, bases) = self.lazy.load_where(&self.device, |k| k.starts_with(&prefix))?;
        let mut inj = Inject::none().with_bases(bases);
        if let Some(LayerValues { lora, what, per_layer }) = &self.layers {
            let values = LoraValues::Saved { values: per_layer[i].clone(), what: what.clone() };
            inj = inj.with_lora(lora.clone(), values);
        }
        let map = weights.into_iter().collect();
        let vb = VarBuilder::from_tensors(map, self.shell.spec().dtype, &self.device);
        let layer = Transformer::load_layer(&vb, self.shell.spec(), i, &mut inj)?;
        inj.finish()?;
        Ok(layer)
    }

    /// Logits of `ids`, streaming every layer through once.
    pub fn forward(&self, ids: &Tensor, mode: Mode) -> Result<Tensor> {
        self.shell.forward_streamed(ids, mode, &mut |i| self.layer(i))
    }
}

/// Split an adapter's tensors into the shell's and each decoder layer's; a key naming a
/// layer the model does not have does not belong to the adapter.
type LayerSplit = (BTreeMap<String, Tensor>, Vec<BTreeMap<String, Tensor>>);
fn split_layers(values: BTreeMap<String, Tensor>, num_layers: usize, what: &str) -> Result<LayerSplit> {
    let mut top = BTreeMap::new();
    let mut layers = vec![BTreeMap::new(); num_layers];
    for (k, t) in values {
        match k.strip_prefix("model.layers.") {
            None => {
                top.insert(k, t);
            }
            Some(rest) => {
                let i = rest.split('.').next().and_then(|s| s.parse::<usize>().ok()).filter(|i| *i < num_layers);
                let Some(i) = i else {
                    return Err(Error::Msg(format!("{what}: tensor `{k}` does not belong to this adapter")));
                };
                layers[i].insert(k, t);
            }
        }
    }
    Ok((top, layers))
}
