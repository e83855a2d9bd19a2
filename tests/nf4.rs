//! NF4/FP4 against bitsandbytes fixtures (`fixtures/gen_bnb.py`): packed bytes and absmax
//! exact, double-quant codes exact except bitsandbytes' known neighbouring-code quirk, our
//! dequantization equal to bitsandbytes'; plus round-trip properties.

use proptest::prelude::*;
use tunecheck::io::st::StFile;
use tunecheck::quant::blockwise::{error_bound, quantize, Absmax, QuantType, NESTED_BLOCKSIZE};
use tunecheck::quant::codes::{dynamic_map_signed, CodeBook};

fn fixtures() -> StFile {
    StFile::open(std::path::Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/bnb/quant.safetensors"))).unwrap()
}

fn f32s(f: &StFile, k: &str) -> Vec<f32> {
    f.load(k).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

fn u8s(f: &StFile, k: &str) -> Vec<u8> {
    f.load(k).unwrap().flatten_all().unwrap().to_vec1::<u8>().unwrap()
}

#[test]
fn dynamic_map_matches_bitsandbytes() {
    let f = fixtures();
    let want = f32s(&f, "dynamic_map");
    let got = dynamic_map_signed();
    assert_eq!(got.len(), 256);
    for (i, (a, b)) in got.iter().zip(&want).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "dynamic map entry {i}: {a} vs {b}");
    }
}

/// The stored map is bitsandbytes' construction: for exponents 0..7, the midpoints of
/// linspace(0.1, 1, 2^i + 1) times 10^(i−6), both signs, plus 0 and 1 — within float rounding.
#[test]
fn dynamic_map_follows_its_construction() {
    let mut v = vec![0.0f64, 1.0];
    for i in 0..7 {
        let n = 2usize.pow(i) + 1;
        for k in 0..n - 1 {
            let a = 0.1 + 0.9 * k as f64 / (n - 1) as f64;
            let b = 0.1 + 0.9 * (k + 1) as f64 / (n - 1) as f64;
            let m = (a + b) / 2.0 * 10f64.powi(i as i32 - 6);
            v.push(m);
            v.push(-m);
        }
    }
    v.sort_by(f64::total_cmp);
    let got = dynamic_map_signed();
    assert_eq!(v.len(), 256);
    for (a, b) in got.iter().zip(&v) {
        assert!((*a as f64 - b).abs() <= b.abs() * 1e-6, "{a} vs {b}");
    }
}

#[test]
fn quantization_matches_bitsandbytes() {
    let f = fixtures();
    let names: std::collections::BTreeSet<String> =
        f.names().unwrap().iter().filter_map(|n| n.strip_suffix(".input").map(str::to_string)).collect();
    assert!(names.len() >= 9, "{names:?}");
    for name in names {
        let qt = if name.starts_with("nf4") { QuantType::Nf4 } else { QuantType::Fp4 };
        let bs: usize = name.split('_').nth(1).unwrap()[1..].parse().unwrap();
        let dq = name.ends_with("_dq");
        let input = f.load(&format!("{name}.input")).unwrap();
        let shape = input.dims().to_vec();
        let x = input.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let q = quantize(&x, &shape, qt, bs, dq).unwrap();
        q.validate().unwrap();
        // The code table travels with the state.
        let code = f32s(&f, &format!("{name}.code"));
        assert_eq!(&code[..], &qt.code()[..], "{name}: code table");
        // Packed 4-bit data: always exact.
        assert_eq!(q.packed, u8s(&f, &format!("{name}.packed")), "{name}: packed bytes");
        match &q.absmax {
            Absmax::Plain(a) => {
                let want = f32s(&f, &format!("{name}.absmax"));
                assert_eq!(
                    a.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "{name}: absmax"
                );
            }
            Absmax::Nested { codes, nested_absmax, nested_blocksize, offset } => {
                assert_eq!(*nested_blocksize, NESTED_BLOCKSIZE);
                let want_offset = f32s(&f, &format!("{name}.nested_offset"))[0];
                assert!(
                    (offset - want_offset).abs() <= want_offset.abs() * 1e-6,
                    "{name}: offset {offset} vs {want_offset}"
                );
                let want_nested = f32s(&f, &format!("{name}.nested_absmax"));
                for (a, b) in nested_absmax.iter().zip(&want_nested) {
                    assert!((a - b).abs() <= b.abs() * 1e-6, "{name}: nested absmax {a} vs {b}");
                }
                // bitsandbytes' CPU 8-bit search sometimes picks the neighbouring code: allow
                // |Δcode| ≤ 1 on at most 5 % of the scales, exact elsewhere.
                let want_codes = u8s(&f, &format!("{name}.absmax"));
                let off: Vec<usize> =
                    codes.iter().zip(&want_codes).enumerate().filter(|(_, (a, b))| a != b).map(|(i, _)| i).collect();
                for &i in &off {
                    assert!(
                        (codes[i] as i32 - want_codes[i] as i32).abs() <= 1,
                        "{name}: scale code {i}: {} vs {}",
                        codes[i],
                        want_codes[i]
                    );
                }
                assert!(off.len() * 20 <= codes.len(), "{name}: {} of {} scale codes differ", off.len(), codes.len());
            }
        }
        // Dequantization. bitsandbytes' native CPU dequantize uses the wrong block scale when
        // the last dimension is not a multiple of the blocksize, so it is the oracle
        // only where it is; elsewhere the oracle is the formula code[q]·absmax applied to
        // bitsandbytes' own state.
        let bnb = f32s(&f, &format!("{name}.dequant"));
        let got = q.dequantize();
        assert_eq!(got.len(), bnb.len());
        let max_abs = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        let tol = if dq { 2e-2 * max_abs } else { 0.0 };
        let bnb_trustworthy = shape.last().unwrap().is_multiple_of(bs);
        let packed = u8s(&f, &format!("{name}.packed"));
        // bitsandbytes' own block scales, decoded from its nested state when double-quantized.
        let bnb_scales: Vec<f32> = if dq {
            let map = dynamic_map_signed();
            let nested = f32s(&f, &format!("{name}.nested_absmax"));
            let offset = f32s(&f, &format!("{name}.nested_offset"))[0];
            u8s(&f, &format!("{name}.absmax"))
                .iter()
                .enumerate()
                .map(|(j, &c)| map[c as usize] * nested[j / NESTED_BLOCKSIZE] + offset)
                .collect()
        } else {
            f32s(&f, &format!("{name}.absmax"))
        };
        for (i, a) in got.iter().enumerate() {
            let want = if bnb_trustworthy {
                bnb[i]
            } else {
                let byte = packed[i / 2];
                let c = if i % 2 == 0 { byte >> 4 } else { byte & 15 };
                code[c as usize] * bnb_scales[i / bs]
            };
            assert!((a - want).abs() <= tol, "{name}: dequant[{i}] {a} vs {want}");
        }
    }
}

#[test]
fn nearest_code_ties_go_to_the_lower_code() {
    let book = CodeBook::new(&tunecheck::quant::codes::NF4);
    let mid = (tunecheck::quant::codes::NF4[7] + tunecheck::quant::codes::NF4[8]) / 2.0;
    assert_eq!(book.nearest(mid), 7);
    assert_eq!(book.nearest(f32::from_bits(mid.to_bits() + 1)), 8);
    assert_eq!(book.nearest(-1.0), 0);
    assert_eq!(book.nearest(1.0), 15);
}

#[test]
fn bad_blocksizes_are_rejected_by_name() {
    for bs in [0, 16, 48, 8192] {
        let e = quantize(&[1.0; 64], &[64], QuantType::Nf4, bs, false).unwrap_err().to_string();
        assert!(e.contains("blocksize"), "{e}");
    }
    let e = quantize(&[1.0, f32::NAN], &[2], QuantType::Nf4, 64, false).unwrap_err().to_string();
    assert!(e.contains("not finite"), "{e}");
}

fn arb_tensor() -> impl Strategy<Value = (Vec<f32>, usize, QuantType, bool)> {
    (1usize..600, prop_oneof![Just(32usize), Just(64), Just(128), Just(256), Just(4096)], any::<bool>(), any::<bool>())
        .prop_flat_map(|(n, bs, nf4, dq)| {
            (
                proptest::collection::vec(-100f32..100f32, n),
                Just(bs),
                Just(if nf4 { QuantType::Nf4 } else { QuantType::Fp4 }),
                Just(dq),
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// dequant(quant(x)) is within half the widest code gap of every block's scale.
    #[test]
    fn round_trip_error_within_block_bound((x, bs, qt, dq) in arb_tensor()) {
        let q = quantize(&x, &[x.len()], qt, bs, dq).unwrap();
        let y = q.dequantize();
        let scales = q.block_scales();
        for (i, (a, b)) in x.iter().zip(&y).enumerate() {
            let blk = i / bs;
            let true_am = x[blk * bs..((blk + 1) * bs).min(x.len())].iter().fold(0f32, |m, v| m.max(v.abs()));
            // With double quantization the decoded scale itself is off by |s − s_true|.
            let bound = error_bound(qt, true_am) + (scales[blk] - true_am).abs() * 1.0001 + 1e-6;
            prop_assert!((a - b).abs() <= bound, "elem {i}: {a} vs {b}, bound {bound}");
        }
    }

    /// quant(dequant(q)) == q: re-quantizing decoded values gives the same codes (NF4), or
    /// codes that decode to the same values (FP4 has two codes for zero).
    #[test]
    fn requantizing_decoded_values_is_idempotent((x, bs, qt, _dq) in arb_tensor()) {
        let q = quantize(&x, &[x.len()], qt, bs, false).unwrap();
        let y = q.dequantize();
        let q2 = quantize(&y, &[y.len()], qt, bs, false).unwrap();
        if qt == QuantType::Nf4 {
            prop_assert_eq!(&q2.packed, &q.packed);
        }
        let bits = |v: Vec<f32>| v.iter().map(|f| (f + 0.0).to_bits()).collect::<Vec<_>>();
        prop_assert_eq!(bits(q2.dequantize()), bits(y));
    }
}

#[test]
fn dequantize_to_every_float_dtype() {
    let x: Vec<f32> = (0..256).map(|i| ((i as f32) * 0.37).sin() * 3.0).collect();
    let q = quantize(&x, &[4, 64], QuantType::Nf4, 64, true).unwrap();
    let f32s = q.dequantize();
    for dtype in [candle_core::DType::F32, candle_core::DType::BF16, candle_core::DType::F16] {
        let t = q.dequantize_tensor(dtype, &candle_core::Device::Cpu).unwrap();
        assert_eq!((t.dtype(), t.dims()), (dtype, &[4usize, 64][..]));
        let back = t.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let tol = match dtype {
            candle_core::DType::F32 => 0.0,
            candle_core::DType::BF16 => 8e-3,
            _ => 1e-3,
        };
        for (a, b) in back.iter().zip(&f32s) {
            assert!((a - b).abs() <= tol * b.abs().max(1e-3), "{dtype:?}: {a} vs {b}");
        }
    }
}

/// P7 as a property over a quantizer: the reference passes; a nibble-swapped packing (the
/// classic bug) is caught by the bitsandbytes bytes, and would decode wrongly.
#[test]
fn p7_passes_on_the_reference_and_catches_swapped_nibbles() {
    use tunecheck::props::p7_nf4::{nf4_round_trip, swapped_nibbles};
    use tunecheck::props::runner::PropConfig;
    let cfg = PropConfig::default();
    assert!(nf4_round_trip(tunecheck::quant::quantize, &cfg).passed());
    let bad = nf4_round_trip(swapped_nibbles, &cfg);
    assert!(bad.violates("P7", Some("bitsandbytes_bytes")), "swapped nibbles not caught: {bad:?}");
    match bad {
        tunecheck::props::runner::Verdict::Failed { detail, .. } => assert!(detail.contains("packed byte"), "{detail}"),
        other => panic!("swapped nibbles not caught: {other:?}"),
    }
}
