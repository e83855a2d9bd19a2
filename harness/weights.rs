//! Seeded synthetic weights: every tensor is drawn on the host from its own ChaCha8 stream,
//! keyed by (seed, tensor name), then cast and moved to the device.
//!
//! Same seed → same bits, on every run, device and thread count, independent of the order in
//! which tensors are generated. Values are uniform with a chosen standard deviation (uniform
//! rather than Gaussian so that no libm transcendental enters the bits). Matrices get
//! std 1/√fan_in; norm weights follow the family's convention (Llama w ≈ 1, Gemma w ≈ 0 used
//! as 1 + w) with a small spread so that a norm applied wrongly changes the output.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

use crate::error::{Error, Result};
use crate::spec::{tensor_shapes, ArchSpec};

/// Named tensors, sorted by name (HF names).
pub type Weights = BTreeMap<String, Tensor>;

/// True for the 1-D norm weights.
pub fn is_norm(name: &str) -> bool {
    name.ends_with("norm.weight")
}

/// A ChaCha8 stream for `(seed, name)`: the seed is the key, a hash of the name the stream.
pub fn stream(seed: u64, name: &str) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(b"tunechk1");
    let mut rng = ChaCha8Rng::from_seed(key);
    rng.set_stream(fnv1a64(name.as_bytes()));
    rng
}

/// FNV-1a, 64-bit: a stable, dependency-free hash of a tensor name.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// `n` values uniform on `[mean - √3·std, mean + √3·std)` (so with standard deviation `std`).
pub fn uniform(rng: &mut ChaCha8Rng, n: usize, mean: f32, std: f32) -> Vec<f32> {
    let half_width = std * 3f32.sqrt();
    (0..n)
        .map(|_| {
            // 24 random bits → [0, 1) exactly representable in f32.
            let u = (rng.next_u32() >> 8) as f32 * (1.0 / (1u32 << 24) as f32);
            mean + half_width * (2.0 * u - 1.0)
        })
        .collect()
}

/// The host values of tensor `name` with `shape` for `spec` and `seed`.
pub fn tensor_values(spec: &ArchSpec, seed: u64, name: &str, shape: &[usize]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let mut rng = stream(seed, name);
    if is_norm(name) {
        let mean = if spec.family.is_gemma() { 0.0 } else { 1.0 };
        uniform(&mut rng, n, mean, 0.1)
    } else {
        let fan_in = *shape.last().unwrap_or(&1) as f32;
        uniform(&mut rng, n, 0.0, fan_in.sqrt().recip())
    }
}

/// All weights of `spec` from `seed`, in `spec.dtype` on `device`.
pub fn generate(spec: &ArchSpec, seed: u64, device: &Device) -> Result<Weights> {
    spec.validate()?;
    let mut out = Weights::new();
    for (name, shape) in tensor_shapes(spec) {
        let values = tensor_values(spec, seed, &name, &shape);
        let t = Tensor::from_vec(values, shape.as_slice(), &Device::Cpu)?.to_dtype(spec.dtype)?.to_device(device)?;
        out.insert(name, t);
    }
    Ok(out)
}

/// The one weight `name` of [`generate`]'s result, computed alone (same bits).
pub fn generate_one(spec: &ArchSpec, seed: u64, name: &str, device: &Device) -> Result<Tensor> {
    let shape = tensor_shapes(spec)
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, s)| s)
        .ok_or_else(|| Error::Msg(format!("`{name}` is not a tensor of this spec")))?;
    let values = tensor_values(spec, seed, name, &shape);
    Ok(Tensor::from_vec(values, shape.as_slice(), &Device::Cpu)?.to_dtype(spec.dtype)?.to_device(device)?)
}

/// The embedding-like matrices whose rows are tokens: `embed_tokens` and (untied) `lm_head`.
pub fn token_matrices(weights: &Weights) -> Vec<&str> {
    ["model.embed_tokens.weight", "lm_head.weight"].into_iter().filter(|k| weights.contains_key(*k)).collect()
}

/// Set rows `ids` of `embed_tokens` and `lm_head` to zero: Llama-3 base's untrained
/// reserved and chat-template tokens. Errors name the tensor when an id is out of range.
pub fn plant_zero_rows(weights: &mut Weights, ids: &[u32]) -> Result<()> {
    for name in token_matrices(weights).into_iter().map(str::to_string).collect::<Vec<_>>() {
        let t = &weights[&name];
        let (rows, cols) = t.dims2()?;
        if let Some(&bad) = ids.iter().find(|&&i| i as usize >= rows) {
            return Err(Error::Msg(format!("tensor `{name}`: token id {bad} is out of range (vocab {rows})")));
        }
        let mut keep = vec![1f32; rows];
        for &i in ids {
            keep[i as usize] = 0.0;
        }
        let mask = Tensor::from_vec(keep, (rows, 1), t.device())?.to_dtype(t.dtype())?;
        let zeroed = t.broadcast_mul(&mask)?;
        debug_assert_eq!(zeroed.dims2()?, (rows, cols));
        weights.insert(name, zeroed);
    }
    Ok(())
}

/// Cast every tensor to `dtype`.
pub fn cast(weights: &Weights, dtype: DType) -> Result<Weights> {
    weights.iter().map(|(k, t)| Ok((k.clone(), t.to_dtype(dtype)?))).collect()
}
