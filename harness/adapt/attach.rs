//! Installing an adapter on a model: LoRA pairs on the targeted projections and the
//! embedding, and full trainable copies of `modules_to_save`, all as `Var`s (master weights,
//! f32 by default) that the optimizer updates in place.
//!
//! Parameter names are PEFT's adapter keys without the `base_model.model.` prefix:
//! `model.layers.0.self_attn.q_proj.lora_A.weight`, `model.embed_tokens.lora_embedding_A`,
//! `model.embed_tokens.weight`, `lm_head.weight`.

use std::collections::BTreeMap;

use candle_core::{DType, Tensor, Var};

use crate::adapt::linear::LoraPart;
use crate::adapt::lora::{LoraConfig, LoraInit};
use crate::error::{Error, Result};
use crate::model::transformer::EmbedLora;
use crate::model::Transformer;
use crate::weights::{stream, uniform};

/// Trainable parameters by name.
pub type Params = Vec<(String, Var)>;

fn var(t: &Tensor, dtype: DType) -> Result<Var> {
    Ok(Var::from_tensor(&t.to_dtype(dtype)?)?)
}

/// Attach `cfg` to `model` with seeded initial values; returns the trainable parameters,
/// stored in `master` dtype (f32 unless reproducing the low-precision-master bug).
pub fn attach(model: &mut Transformer, cfg: &LoraConfig, seed: u64, master: DType) -> Result<Params> {
    cfg.validate()?;
    let spec = model.spec().clone();
    if spec.tie_word_embeddings && (cfg.targets("lm_head") || cfg.modules_to_save.iter().any(|m| m == "lm_head")) {
        return Err(Error::field(
            "target_modules",
            "lm_head is tied to embed_tokens; adapt or save embed_tokens instead",
        ));
    }
    let device = model.device().clone();
    let scale = cfg.scale();
    let mut params = Params::new();
    for (path, lin) in model.linears_mut() {
        let leaf = path.rsplit('.').next().unwrap_or(&path).to_string();
        if !cfg.targets(&leaf) {
            continue;
        }
        let (out, inp) = lin.dims();
        let (a, b) = cfg.init_pair(seed, &path, inp, out, &device)?;
        let (va, vb) = (var(&a, master)?, var(&b, master)?);
        lin.lora = Some(LoraPart { a: va.as_tensor().clone(), b: vb.as_tensor().clone(), scale, dropout: cfg.dropout });
        params.push((format!("{path}.lora_A.weight"), va));
        params.push((format!("{path}.lora_B.weight"), vb));
    }
    if cfg.targets("embed_tokens") {
        let (vocab, hidden) = (spec.vocab_size, spec.hidden_size);
        let p = "model.embed_tokens";
        // PEFT initialises embedding LoRA the other way round: A zero, B normal.
        let (a, b) = match cfg.init {
            LoraInit::Default => (
                vec![0f32; cfg.r * vocab],
                uniform(&mut stream(seed, &format!("{p}.lora_embedding_B")), hidden * cfg.r, 0.0, 1.0),
            ),
            LoraInit::NonZero(std) => (
                uniform(&mut stream(seed, &format!("{p}.lora_embedding_A")), cfg.r * vocab, 0.0, std),
                uniform(&mut stream(seed, &format!("{p}.lora_embedding_B")), hidden * cfg.r, 0.0, 1.0),
            ),
        };
        let va = var(&Tensor::from_vec(a, (cfg.r, vocab), &device)?, master)?;
        let vb = var(&Tensor::from_vec(b, (hidden, cfg.r), &device)?, master)?;
        model.set_embed_lora(Some(EmbedLora { a: va.as_tensor().clone(), b: vb.as_tensor().clone(), scale }));
        params.push((format!("{p}.lora_embedding_A"), va));
        params.push((format!("{p}.lora_embedding_B"), vb));
    }
    for m in &cfg.modules_to_save {
        match m.as_str() {
            "embed_tokens" => {
                let v = var(model.embed(), master)?;
                model.set_embed(v.as_tensor().clone(), cfg.ensure_weight_tying)?;
                params.push(("model.embed_tokens.weight".into(), v));
            }
            "lm_head" => {
                let w = match &model.lm_head().base {
                    crate::adapt::Base::Dense(w) => w.clone(),
                    crate::adapt::Base::Quant4(_) => {
                        return Err(Error::Msg("lm_head is 4-bit; it cannot be trained in full".into()))
                    }
                };
                let v = var(&w, master)?;
                model.set_lm_head(v.as_tensor().clone())?;
                params.push(("lm_head.weight".into(), v));
            }
            other => return Err(Error::field("modules_to_save", format!("`{other}` is not embed_tokens or lm_head"))),
        }
    }
    Ok(params)
}

/// Load saved values into attached parameters; every name must match in both directions.
pub fn load_values(params: &Params, values: &BTreeMap<String, Tensor>, what: &str) -> Result<()> {
    for (name, v) in params {
        let t = values.get(name).ok_or_else(|| Error::Msg(format!("{what}: tensor `{name}` is missing")))?;
        if t.dims() != v.dims() {
            return Err(Error::Msg(format!(
                "{what}: tensor `{name}` has shape {:?}, expected {:?}",
                t.dims(),
                v.dims()
            )));
        }
        v.set(&t.to_dtype(v.dtype())?.to_device(v.device())?)?;
    }
    if let Some(extra) = values.keys().find(|k| !params.iter().any(|(n, _)| n == *k)) {
        return Err(Error::Msg(format!("{what}: tensor `{extra}` does not belong to this adapter")));
    }
    Ok(())
}
