//! `tunecheck inspect`: what is wrong with a checkpoint people already have. Untrained token
//! rows (with their strings, flagged when special or in the chat template), NaN/Inf tensors,
//! the dtype and whether this device computes in it, the 4-bit config and whether an
//! adapter's recorded base config matches, parameter counts, and a probe forward (finite?
//! argmax collapsed to one id?). Findings make exit code 1; unusable input is an error (2).

pub mod scan;
pub mod tokens;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde::Serialize;

use crate::error::Result;
use crate::spec::dtype_name;

/// One untrained token row.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Untrained {
    /// Token id.
    pub id: u32,
    /// Token string, when the checkpoint has a tokenizer.
    pub token: Option<String>,
    /// A special token of the tokenizer.
    pub special: bool,
    /// Appears in the chat template (the Llama-3 base failure).
    pub in_chat_template: bool,
    /// The matrices in which the row is zero.
    pub tensors: Vec<String>,
}

/// A tensor with non-finite values.
#[derive(Debug, Clone, Serialize)]
pub struct NonFinite {
    /// Key.
    pub tensor: String,
    /// File.
    pub file: PathBuf,
    /// NaN count.
    pub nan: usize,
    /// ±Inf count.
    pub inf: usize,
}

/// The probe forward.
#[derive(Debug, Clone, Serialize)]
pub struct Probe {
    /// Positions evaluated.
    pub positions: usize,
    /// Every logit finite.
    pub finite: bool,
    /// Distinct argmax ids over the positions.
    pub distinct_argmax: usize,
    /// All positions predict the same id.
    pub collapsed: bool,
}

/// The adapter check.
#[derive(Debug, Clone, Serialize)]
pub struct AdapterCheck {
    /// Adapter directory.
    pub dir: PathBuf,
    /// `match`, `mismatch` or `not recorded`.
    pub base_quantization: String,
    /// Explanation.
    pub detail: String,
}

/// Everything `inspect` found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The checkpoint directory.
    pub dir: PathBuf,
    /// Model family.
    pub family: String,
    /// `torch_dtype` of the config.
    pub dtype: String,
    /// The device checked.
    pub device: String,
    /// Whether the device computes in that dtype (a tiny matmul ran).
    pub dtype_supported: bool,
    /// Parameters (4-bit weights counted as their logical elements).
    pub parameters: usize,
    /// Tensors per stored dtype.
    pub tensors_by_dtype: std::collections::BTreeMap<String, usize>,
    /// `quantization_config`, when 4-bit.
    pub quantization: Option<serde_json::Value>,
    /// Untrained token rows.
    pub untrained: Vec<Untrained>,
    /// Whether a tokenizer.json was found (token strings need it).
    pub tokenizer: bool,
    /// Tensors with NaN/Inf.
    pub non_finite: Vec<NonFinite>,
    /// The adapter check.
    pub adapter: Option<AdapterCheck>,
    /// The probe forward (absent when the model could not be built; see `findings`).
    pub probe: Option<Probe>,
    /// One line per problem; empty means clean.
    pub findings: Vec<String>,
}

impl Report {
    /// 0 clean, 1 findings.
    pub fn exit_code(&self) -> u8 {
        u8::from(!self.findings.is_empty())
    }
}

fn is_quant_aux(name: &str) -> bool {
    [".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map"].iter().any(|s| name.ends_with(s))
        || name.contains(".quant_state.")
}

fn dtype_works(dtype: DType, device: &Device) -> bool {
    let t = || -> candle_core::Result<Tensor> {
        Tensor::ones((2, 2), dtype, device)?.matmul(&Tensor::ones((2, 2), dtype, device)?)
    };
    t().is_ok()
}

/// Inspect the checkpoint in `dir` (with the PEFT adapter in `adapter`) on `device`.
pub fn inspect(
    dir: &Path,
    adapter: Option<&Path>,
    device: &Device,
    progress: impl FnMut(&Path, usize, usize),
) -> Result<Report> {
    let spec = crate::io::config::read(&dir.join(crate::io::hf::CONFIG))?;
    let quant = crate::io::config::read_quant(&dir.join(crate::io::hf::CONFIG))?;
    let sc = scan::scan(dir, crate::train::untrained::DEFAULT_THRESHOLD, progress)?;
    let vocab = tokens::Vocab::load(dir)?;
    let mut findings = Vec::new();

    // Untrained rows, merged over the token matrices.
    let mut by_id: std::collections::BTreeMap<u32, Vec<String>> = Default::default();
    for (name, rows) in &sc.zero_rows {
        for id in rows {
            by_id.entry(*id).or_default().push(name.clone());
        }
    }
    let untrained: Vec<Untrained> = by_id
        .into_iter()
        .map(|(id, tensors)| Untrained {
            id,
            token: vocab.token(id),
            special: vocab.is_special(id),
            in_chat_template: vocab.in_chat_template(id),
            tensors,
        })
        .collect();
    if !untrained.is_empty() {
        let chat = untrained.iter().filter(|u| u.in_chat_template).count();
        findings.push(format!(
            "{} untrained token rows (all-zero in embed_tokens/lm_head){}: they give NaN or garbage unless those \
             modules are trained or the rows are fixed",
            untrained.len(),
            if chat > 0 { format!(", {chat} of them used by the chat template") } else { String::new() }
        ));
    }

    let mut non_finite = Vec::new();
    let mut parameters = 0;
    let mut by_dtype = std::collections::BTreeMap::new();
    for t in sc.tensors.values() {
        *by_dtype.entry(t.dtype.clone()).or_insert(0) += 1;
        let n: usize = t.shape.iter().product();
        if t.dtype == "U8" && t.name.ends_with(".weight") {
            parameters += 2 * n;
        } else if !is_quant_aux(&t.name) {
            parameters += n;
        }
        if t.nan + t.inf > 0 {
            findings.push(format!(
                "tensor `{}` in {} has {} NaN and {} Inf values",
                t.name,
                t.file.display(),
                t.nan,
                t.inf
            ));
            non_finite.push(NonFinite { tensor: t.name.clone(), file: t.file.clone(), nan: t.nan, inf: t.inf });
        }
    }

    let dtype_supported = dtype_works(spec.dtype, device);
    if !dtype_supported {
        findings.push(format!("{} cannot compute in {}", crate::device::name(device), dtype_name(spec.dtype)));
    }

    // The adapter's recorded base quantization.
    let read_adapter = match adapter {
        Some(a) => Some(crate::io::peft::read(a)?),
        None => None,
    };
    let adapter_check = match (adapter, &read_adapter) {
        (Some(a), Some(ad)) => {
            let show = |q: Option<&crate::adapt::QuantConfig>| {
                q.map_or("none".to_string(), |q| crate::io::config::quant_to_json(q).to_string())
            };
            let (status, detail) = match &ad.base_quant {
                None => {
                    ("not recorded", "the adapter does not record its base's quantization (PEFT does not)".to_string())
                }
                Some(r) if r.as_ref() == quant.as_ref() => ("match", format!("base quantization {}", show(r.as_ref()))),
                Some(r) => {
                    findings.push(format!(
                        "adapter {} was trained on a base quantized as {} but this base is {}",
                        a.display(),
                        show(r.as_ref()),
                        show(quant.as_ref())
                    ));
                    ("mismatch", format!("recorded {}, base {}", show(r.as_ref()), show(quant.as_ref())))
                }
            };
            Some(AdapterCheck { dir: a.to_path_buf(), base_quantization: status.into(), detail })
        }
        _ => None,
    };

    // The probe forward: seeded ordinary ids, eval mode.
    let probe = match probe(dir, device, &untrained, &vocab, read_adapter.as_ref(), adapter) {
        Ok(p) => {
            if !p.finite {
                findings.push("the probe forward produced non-finite logits".into());
            }
            if p.collapsed {
                findings.push(format!("argmax collapsed: all {} probe positions predict one id", p.positions));
            }
            Some(p)
        }
        Err(e) => {
            findings.push(format!("the probe forward could not run: {e}"));
            None
        }
    };

    Ok(Report {
        dir: dir.to_path_buf(),
        family: spec.family.model_type().to_string(),
        dtype: dtype_name(spec.dtype).to_string(),
        device: crate::device::name(device),
        dtype_supported,
        parameters,
        tensors_by_dtype: by_dtype,
        quantization: quant.as_ref().map(crate::io::config::quant_to_json),
        untrained,
        tokenizer: vocab.has_tokenizer(),
        non_finite,
        adapter: adapter_check,
        probe,
        findings,
    })
}

#[allow(clippy::too_many_arguments)]
fn probe(
    dir: &Path,
    device: &Device,
    untrained: &[Untrained],
    vocab: &tokens::Vocab,
    adapter: Option<&crate::io::peft::Adapter>,
    adapter_dir: Option<&Path>,
) -> Result<Probe> {
    use rand_core::{RngCore, SeedableRng};
    // The model is streamed from the memory map a decoder layer at a time (peak memory: the
    // embedding, the head and one layer), so a checkpoint larger than memory can be inspected;
    // an adapter goes on the shell and on each layer as it is loaded.
    let lazy = crate::io::hf::Lazy::open(dir, None)?;
    let saved = match (adapter, adapter_dir) {
        (Some(a), Some(d)) => Some((a, d)),
        _ => None,
    };
    let streamed = crate::loader::Streamed::open(&lazy, device, saved)?;
    let spec = streamed.spec().clone();
    let spec = &spec;
    let skip: std::collections::BTreeSet<u32> = untrained.iter().map(|u| u.id).collect();
    let ok: Vec<u32> = (0..spec.vocab_size as u32).filter(|i| !skip.contains(i) && !vocab.is_special(*i)).collect();
    let pool = if ok.is_empty() { (0..spec.vocab_size as u32).collect() } else { ok };
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(0);
    let (b, t) = (4usize, 16usize);
    let ids: Vec<u32> = (0..b * t).map(|_| pool[(rng.next_u32() as usize) % pool.len()]).collect();
    let ids = Tensor::from_vec(ids, (b, t), device)?;
    let logits = streamed.forward(&ids, crate::Mode::Eval)?.to_dtype(DType::F32)?;
    let flat = logits.flatten_all()?.to_vec1::<f32>()?;
    let finite = flat.iter().all(|v| v.is_finite());
    let arg = logits.argmax(candle_core::D::Minus1)?.flatten_all()?.to_vec1::<u32>()?;
    let distinct: std::collections::BTreeSet<u32> = arg.iter().copied().collect();
    Ok(Probe {
        positions: arg.len(),
        finite,
        distinct_argmax: distinct.len(),
        collapsed: distinct.len() == 1 && spec.vocab_size > 1 && arg.len() > 1,
    })
}
