//! P7 — NF4/FP4 quantization: dequant(quant(x)) within half the widest code gap of each
//! block's scale; requantizing decoded values reproduces them; and the packed bytes and
//! scales of two bitsandbytes reference cases (embedded below, from `fixtures/bnb/`) are
//! reproduced bit for bit. The property takes the quantizer as a function so another
//! implementation (or a mutant with the nibbles swapped) can be checked the same way.

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use crate::error::Result;
use crate::props::property::{Body, Property};
use crate::props::runner::{FailReason, PropConfig, Verdict};
use crate::quant::blockwise::error_bound;
use crate::quant::{QuantType, Quantized4};

/// The catalogue entry (tunecheck's quantizer; [`nf4_round_trip`] takes any other).
pub const PROPERTY: Property = Property {
    id: "P7",
    test_name: "p7_nf4_round_trip",
    title: "nf4/fp4 round trip, bitsandbytes bytes",
    invariant: "block error bound; quant∘dequant idempotent; bitsandbytes' packed bytes and absmax reproduced",
    tolerance: "exact bytes; error ≤ half the widest code gap × block absmax",
    kinds: &[],
    dtypes: &[],
    needs: crate::subject::Capabilities::none(),
    grad_accum: 1,
    filter: None,
    draws: crate::strategy::Draws::NONE,
    body: Body::Kernels(|cfg| nf4_round_trip(crate::quant::quantize, cfg)),
};

fn violated(code: &str, detail: String) -> Verdict {
    Verdict::failed_with(
        FailReason::Violated { property: "P7".into(), code: code.into() },
        format!("P7/nf4 violated [{code}]: {detail}"),
    )
}

/// A 4-bit quantizer: values, shape, code, blocksize, double quantization.
pub type Quantizer = fn(&[f32], &[usize], QuantType, usize, bool) -> Result<Quantized4>;

/// bitsandbytes' `nf4_b32_odd` case: input bits, shape, packed bytes, absmax bits.
pub const NF4_B32_ODD: (&[u32], [usize; 2], &[u8], &[u32]) = (
    &[
        0xbfd52262, 0x3f6bb61c, 0xbfa65571, 0xc02858cc, 0xbf99cdcc, 0xc00c1057, 0x3f7d3191, 0x3f7dde72, 0xbde457d5,
        0x3e14ad50, 0x3cc714ca, 0x3f038236, 0x3e54a358, 0x3f727093, 0xbeec9252, 0xbf232cb1, 0xbe3a3ba2, 0xbf36f6d4,
        0x3e9910dc, 0x3e80f573, 0xbf5cce66, 0x3efa3cc2, 0x3ef012e2, 0xbd2fde3c, 0x3eb71eca, 0xbf67d832, 0x3d91c4b4,
        0x3d107428, 0xbf10d9dc, 0x3f6afdf5, 0x3e996c08, 0x3e35bf8e, 0xbeb07be9, 0x3e6b203a, 0x3ee00b1e, 0x3e8aa47e,
        0xbf097ce2, 0x402ed4f0, 0xbf8f2641, 0xbda9134a, 0xc02906d8, 0x3f0af7e4, 0x3f8eb379, 0xc04ea434, 0xbeb71118,
        0xbdff36a6, 0x3e4a307d, 0xbcd74864, 0x3e3003b6, 0xbe8e6b80, 0x3cb55b56, 0x3e13e529, 0xbdb8c417, 0x3f29ef14,
        0xbec868ee, 0xbdc61e24, 0x3cab9a44, 0x3edb7c3e, 0x3f69f398, 0xbda17536, 0xbeab9ef7, 0x3f443971, 0xbe5e5e6c,
    ],
    [7, 9],
    &[
        27, 32, 49, 187, 120, 121, 139, 84, 100, 136, 73, 151, 147, 119, 91, 136, 104, 152, 94, 55, 25, 176, 103, 135,
        134, 120, 122, 103, 121, 167, 106, 103,
    ],
    &[0x402858cc, 0x404ea434],
);
/// bitsandbytes' `fp4_b32_odd` case: input bits, shape, packed bytes, absmax bits.
pub const FP4_B32_ODD: (&[u32], [usize; 2], &[u8], &[u32]) = (
    &[
        0xbf94f3b9, 0xc0092c4a, 0x3f20b344, 0x4085ed5a, 0xc0093346, 0xbf772c0f, 0x3eb4b0c2, 0xbfb1dd60, 0xbfeb4ea8,
        0x3e107e92, 0xc0122698, 0xbfabf056, 0xbfd47954, 0xbf75ad34, 0xbf4eb1fc, 0x3fc22a96, 0x3e77b8b0, 0xc011d89f,
        0x3e09927b, 0xbf8326f0, 0xbf25d6ac, 0x3f966c9c, 0x3ed4bd88, 0xbe67aea0, 0x3ebe5f43, 0x3e280372, 0xbe380f23,
        0xbe995836, 0x3e374526, 0x3e90165d, 0xbde924b6, 0x3e9d828d, 0xbeba8d81,
    ],
    [3, 11],
    &[253, 99, 223, 28, 209, 220, 207, 228, 29, 31, 231, 105, 97, 153, 17, 145, 176],
    &[0x4085ed5a, 0x3eba8d81],
);

/// One reference case: code, input, shape, packed bytes, absmax.
type RefCase = (QuantType, Vec<f32>, Vec<usize>, Vec<u8>, Vec<f32>);

fn reference_cases() -> Vec<RefCase> {
    [(QuantType::Nf4, NF4_B32_ODD), (QuantType::Fp4, FP4_B32_ODD)]
        .into_iter()
        .map(|(qt, (x, shape, packed, absmax))| {
            (
                qt,
                x.iter().map(|b| f32::from_bits(*b)).collect(),
                shape.to_vec(),
                packed.to_vec(),
                absmax.iter().map(|b| f32::from_bits(*b)).collect(),
            )
        })
        .collect()
}

/// Check the bitsandbytes reference cases (blocksize 32, 63 values: odd count, partial block).
pub fn matches_bitsandbytes(quantize: Quantizer) -> std::result::Result<(), String> {
    for (qt, x, shape, packed, absmax) in reference_cases() {
        let q = quantize(&x, &shape, qt, 32, false).map_err(|e| e.to_string())?;
        if q.packed != packed {
            let at = q.packed.iter().zip(&packed).position(|(a, b)| a != b).unwrap_or(0);
            return Err(format!(
                "{}: packed byte {at} is {:#04x}, bitsandbytes wrote {:#04x}",
                qt.name(),
                q.packed.get(at).copied().unwrap_or(0),
                packed[at]
            ));
        }
        if q.block_scales().iter().map(|v| v.to_bits()).ne(absmax.iter().map(|v| v.to_bits())) {
            return Err(format!("{}: absmax differs from bitsandbytes", qt.name()));
        }
    }
    Ok(())
}

/// Run P7 against `quantize` (8 × `cfg.cases` random vectors from `cfg.seed`).
pub fn nf4_round_trip(quantize: Quantizer, cfg: &PropConfig) -> Verdict {
    if let Err(detail) = matches_bitsandbytes(quantize) {
        return violated("bitsandbytes_bytes", detail);
    }
    let cases = match cfg.effective_cases() {
        Ok(c) => c * 8,
        Err(e) => return Verdict::failed_with(FailReason::Config, e),
    };
    let config =
        Config { cases, source_file: cfg.source_file, failure_persistence: cfg.persistence(), ..Config::default() };
    let mut runner = TestRunner::new_with_rng(config, crate::props::seeding::seeded(cfg.seed));
    let strategy = (1usize..300, prop_oneof![Just(32usize), Just(64), Just(128)], any::<bool>(), any::<bool>())
        .prop_flat_map(|(n, bs, nf4, dq)| (proptest::collection::vec(-50f32..50f32, n), Just(bs), Just(nf4), Just(dq)));
    let result = runner.run(&strategy, |(x, bs, nf4, dq)| {
        let qt = if nf4 { QuantType::Nf4 } else { QuantType::Fp4 };
        let q = quantize(&x, &[x.len()], qt, bs, dq).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let y = q.dequantize();
        let scales = q.block_scales();
        for (i, (a, b)) in x.iter().zip(&y).enumerate() {
            let blk = i / bs;
            let am = x[blk * bs..((blk + 1) * bs).min(x.len())].iter().fold(0f32, |m, v| m.max(v.abs()));
            let bound = error_bound(qt, am) + (scales[blk] - am).abs() * 1.0001 + 1e-6;
            if (a - b).abs() > bound {
                return Err(TestCaseError::fail(format!("element {i}: {a} decoded as {b}, bound {bound}")));
            }
        }
        let plain =
            quantize(&x, &[x.len()], qt, bs, false).map_err(|e| TestCaseError::fail(e.to_string()))?.dequantize();
        let requant = quantize(&plain, &[plain.len()], qt, bs, false)
            .map_err(|e| TestCaseError::fail(e.to_string()))?
            .dequantize();
        if requant.iter().map(|v| (v + 0.0).to_bits()).ne(plain.iter().map(|v| (v + 0.0).to_bits())) {
            return Err(TestCaseError::fail("quant(dequant(q)) changed the decoded values"));
        }
        Ok(())
    });
    match result {
        Ok(()) => Verdict::passed_all(cases),
        Err(e) => violated("round_trip", e.to_string()),
    }
}

/// A mutant quantizer: the reference with the two nibbles of every byte swapped (element
/// 2i in the *low* nibble), the classic packing bug.
pub fn swapped_nibbles(x: &[f32], shape: &[usize], qt: QuantType, bs: usize, dq: bool) -> Result<Quantized4> {
    let mut q = crate::quant::quantize(x, shape, qt, bs, dq)?;
    for b in &mut q.packed {
        *b = b.rotate_left(4);
    }
    Ok(q)
}
