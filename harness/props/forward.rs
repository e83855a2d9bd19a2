//! Forward-pass invariants of a model: determinism, train == eval without dropout, causality,
//! and KV-cache decode == full forward (with identical greedy generations).
//!
//! Tolerances: the same computation on the same path must be bitwise identical in any dtype
//! (candle's CPU kernels are deterministic; see DESIGN §7). The cached decode runs different
//! matmul shapes, so its rounding differs: f32 gets 1e-5 relative L2 (the transformers anchor
//! for different paths), bf16 2e-2 and f16 5e-3.

use candle_core::{DType, Tensor};

use crate::error::Result;
use crate::model::generate::{greedy_cached, greedy_uncached};
use crate::model::{Mode, Transformer};
use crate::props::{bitwise_equal, rel_l2, Check, Violation};

/// Relative-L2 tolerance between two different computation paths in `dtype`.
pub fn path_tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 2e-2,
        DType::F16 => 5e-3,
        _ => 1e-5,
    }
}

/// `[batch][seq]` ids as a u32 tensor on the model's device.
pub fn ids_tensor(model: &Transformer, ids: &[Vec<u32>]) -> Result<Tensor> {
    let b = ids.len();
    let s = ids.first().map_or(0, Vec::len);
    let flat: Vec<u32> = ids.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (b, s), model.device())?)
}

/// Two eval forwards of the same batch are bitwise identical, and so is a train-mode forward
/// when every dropout probability is zero.
pub fn deterministic_and_mode_free(model: &Transformer, ids: &[Vec<u32>]) -> Check {
    let x = ids_tensor(model, ids)?;
    let a = model.forward(&x, Mode::Eval)?;
    let b = model.forward(&x, Mode::Eval)?;
    if !bitwise_equal(&a, &b)? {
        return Err(Violation {
            property: "forward/deterministic",
            code: "deterministic",
            detail: format!("two eval forwards differ (rel L2 {:.3e})", rel_l2(&a, &b)?),
        }
        .into());
    }
    let spec = model.spec();
    if spec.attention_dropout == 0.0 && spec.residual_dropout == 0.0 {
        let t = model.forward(&x, Mode::Train)?;
        if !bitwise_equal(&t, &a)? {
            return Err(Violation {
                property: "forward/train_eq_eval",
                code: "train_eq_eval",
                detail: format!("dropout is 0 but train and eval logits differ (rel L2 {:.3e})", rel_l2(&t, &a)?),
            }
            .into());
        }
    }
    Ok(())
}

/// Logits at positions `0..=t` do not change (bitwise) when the tokens after `t` are replaced.
pub fn causal(model: &Transformer, ids: &[Vec<u32>], t: usize) -> Check {
    let s = ids.first().map_or(0, Vec::len);
    if t + 1 >= s {
        return Ok(());
    }
    let vocab = model.spec().vocab_size as u32;
    let changed: Vec<Vec<u32>> = ids
        .iter()
        .map(|row| row.iter().enumerate().map(|(j, &v)| if j > t { (v + 1) % vocab } else { v }).collect())
        .collect();
    let a = model.forward(&ids_tensor(model, ids)?, Mode::Eval)?.narrow(1, 0, t + 1)?;
    let b = model.forward(&ids_tensor(model, &changed)?, Mode::Eval)?.narrow(1, 0, t + 1)?;
    if !bitwise_equal(&a, &b)? {
        return Err(Violation {
            property: "forward/causal",
            code: "causal",
            detail: format!(
                "logits at positions 0..={t} changed when tokens after {t} changed (rel L2 {:.3e})",
                rel_l2(&a, &b)?
            ),
        }
        .into());
    }
    Ok(())
}

/// Prefill `split` tokens then decode the rest one at a time from the KV cache: the logits
/// match the full forward within [`path_tolerance`], and greedy generation of `new_tokens`
/// from the whole batch gives the same tokens with and without the cache.
pub fn kv_cache_matches(model: &Transformer, ids: &[Vec<u32>], split: usize, new_tokens: usize) -> Check {
    let x = ids_tensor(model, ids)?;
    let s = x.dim(1)?;
    let split = split.clamp(1, s);
    let full = model.forward(&x, Mode::Eval)?;
    let mut cache = model.new_cache();
    let mut parts = vec![model.forward_cached(&x.narrow(1, 0, split)?, &mut cache, Mode::Eval)?];
    for p in split..s {
        parts.push(model.forward_cached(&x.narrow(1, p, 1)?, &mut cache, Mode::Eval)?);
    }
    let cached = Tensor::cat(&parts, 1)?;
    let tol = path_tolerance(model.spec().dtype);
    let err = rel_l2(&cached, &full)?;
    if err.is_nan() || err > tol {
        return Err(Violation {
            property: "forward/kv_cache",
            code: "kv_cache",
            detail: format!("cached decode (prefill {split} of {s}) vs full forward: rel L2 {err:.3e} > {tol:.0e}"),
        }
        .into());
    }
    if new_tokens > 0 {
        let a = greedy_cached(model, &x, new_tokens)?;
        let b = greedy_uncached(model, &x, new_tokens)?;
        if a != b {
            return Err(Violation {
                property: "forward/kv_cache_generate",
                code: "kv_cache_generate",
                detail: format!("greedy tokens differ: cached {a:?} vs uncached {b:?}"),
            }
            .into());
        }
    }
    Ok(())
}
