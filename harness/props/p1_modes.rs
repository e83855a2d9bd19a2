//! P1 — eval path = train path: with dropout 0, train-mode logits equal eval-mode logits
//! within the dtype's path tolerance (a framework may run different code in its two modes and
//! round differently; the measured difference is reported), and both are finite; the eval
//! argmax does not collapse to one id where the train argmax does not (checked first, on its
//! own: a separate eval-only fast path can collapse whatever else it does); the KV-cache decode
//! equals the full forward within the path tolerance (different matmul shapes) and greedy
//! generations agree, up to a near-tie of the two chosen tokens' logits. "Within tolerance"
//! is measured on the case: how far the setup's own precision moves the reference's logits from
//! the same path in f64 — for each of the two paths compared (train and eval both run the full
//! forward; the KV cache is another path); two correct paths are equal in exact arithmetic, so
//! they differ by at most the sum (the triangle inequality) — times 2, at least the path
//! tolerance and at most 10 × it (a deep half-precision model amplifies its rounding; beyond
//! the cap the case is counted as not judged). Bitwise equality of
//! the two modes is F1's clause for tunecheck's own model; for any subject, the bug this
//! property exists for (one token id everywhere, a mean logit gap of 2.17) is far beyond the
//! tolerance. The precision is the setup's effective dtype (a 4-bit base's compute dtype when
//! coarser than the model's).

use candle_core::{DType, Device, Tensor, D};

use crate::error::Result;
use crate::model::Mode;
use crate::props::compare::{greedy_agree, Greedy};
use crate::props::oracle::logits_floors;
use crate::props::property::Property;
use crate::props::tolerance::{count, effective_dtype, observe, path_bound};
use crate::props::{rel_l2, within, Check, Violation};
use crate::strategy::random_batches;
use crate::subject::{Factory, Setup};

const ID: &str = "P1/eval_train_equivalence";

/// What P1 counts: cases whose logits the dtype cannot compute closely enough to compare paths.
pub const UNJUDGED: &str = "cases not judged (2 × the logits' rounding floor is over 10 × the path tolerance)";
/// What P1 counts for the KV cache: cases whose cached path the dtype cannot judge.
pub const UNJUDGED_KV: &str = "KV-cache cases not judged (2 × the two paths' rounding is over 10 × the path tolerance)";

/// The catalogue entry.
pub const PROPERTY: Property = Property {
    id: "P1",
    test_name: "p1_eval_train_equivalence",
    title: "train == eval, no collapse, kv-cache",
    invariant: "dropout 0: train logits == eval logits within tolerance (the difference reported), both finite; eval \
                argmax not collapsed to one id where train's is not (checked first, on its own); KV-cache decode == \
                full forward; greedy decode identical up to near-ties",
    tolerance: "train/eval and KV cache rel L2 ≤ clamp(2 × the two paths' rounding vs f64, summed, path tolerance, \
                10 × it) in the effective dtype (path tolerance f32 1e-5, bf16 2e-2, f16 5e-3: other op orders); \
                greedy tokens equal up to a near-tie (two logits within 2·tol·‖logits‖)",
    ..Property::trainer(check)
};

fn fail(code: &'static str, detail: String) -> Check {
    Err(Violation::new(ID, code, detail).into())
}

fn argmax_ids(logits: &Tensor) -> Result<Vec<u32>> {
    Ok(logits.to_dtype(DType::F32)?.argmax(D::Minus1)?.flatten_all()?.to_vec1::<u32>()?)
}

fn non_finite(logits: &Tensor) -> Result<usize> {
    Ok(logits.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?.iter().filter(|x| !x.is_finite()).count())
}

/// Check P1 on one setup.
pub fn check(f: &dyn Factory, device: &Device, setup: &Setup) -> Check {
    let t = f.build(setup, device)?;
    let batch = &random_batches(setup.spec.vocab_size, setup.adapter_seed, 1, 4, 10)[0];
    let ids = batch.ids_tensor(device)?;
    let eval = t.logits(&ids, Mode::Eval)?;
    let train = t.logits(&ids, Mode::Train)?;
    for (name, l) in [("eval", &eval), ("train", &train)] {
        let bad = non_finite(l)?;
        if bad > 0 {
            return fail("non_finite", format!("{bad} of {} {name}-mode logits are NaN/inf", l.elem_count()));
        }
    }
    let (e_ids, t_ids) = (argmax_ids(&eval)?, argmax_ids(&train)?);
    let distinct = |v: &[u32]| v.iter().collect::<std::collections::BTreeSet<_>>().len();
    if distinct(&e_ids) == 1 && distinct(&t_ids) > 1 {
        return fail(
            "collapse",
            format!(
                "eval argmax collapsed to token {} at all {} positions (train mode: {} distinct ids)",
                e_ids[0],
                e_ids.len(),
                distinct(&t_ids)
            ),
        );
    }
    // Two paths of the same logits differ by their rounding: by at most the sum of how far
    // each one's precision moves it from the same path in f64, measured on the reference (train
    // and eval are both its full forward; the KV cache is another path).
    let s = ids.dim(1)?;
    let (full_floor, cached_floor) = logits_floors(setup, &ids, s.div_ceil(2))?;
    let bound = path_bound(effective_dtype(setup));
    let floor = 2.0 * full_floor;
    let judged = bound.judgeable(floor);
    count(UNJUDGED, usize::from(judged.is_none()), 1);
    let Some(tol) = judged else { return Ok(()) };
    let gap = rel_l2(&train, &eval)?;
    observe("train vs eval logits, rel L2", gap, tol);
    if !within(gap, tol) {
        return fail(
            "train_eval_differ",
            format!(
                "dropout is 0 but train and eval logits differ: rel L2 {gap:.3e} > {tol:.1e} (this model's rounding \
                 floor {floor:.1e})"
            ),
        );
    }
    if f.capabilities().kv_cache {
        let floor = full_floor + cached_floor;
        let judged = bound.judgeable(floor);
        count(UNJUDGED_KV, usize::from(judged.is_none()), 1);
        let Some(tol) = judged else { return Ok(()) };
        if let Some(cached) = t.cached_logits(&ids, s.div_ceil(2))? {
            let err = rel_l2(&cached, &eval)?;
            observe("KV-cache vs full forward logits, rel L2", err, tol);
            if !within(err, tol) {
                return fail(
                    "kv_cache",
                    format!(
                        "KV-cache decode vs full forward: rel L2 {err:.3e} > {tol:.1e} (rounding floor {floor:.1e})"
                    ),
                );
            }
        }
        let prompt = ids.narrow(1, 0, 2)?;
        let decoded = t.decode(&prompt, 4)?;
        let reference = crate::model::generate::greedy_with(|x| t.logits(x, Mode::Eval), &prompt, 4)?;
        match greedy_agree(&decoded, &reference, &prompt, |x| t.logits(x, Mode::Eval), tol)? {
            Greedy::Differ(detail) => return fail("decode", detail),
            Greedy::NearTie { margin, allowance, .. } => {
                observe("greedy decode near-tie, logit margin", margin, allowance)
            }
            Greedy::Same => {}
        }
    }
    Ok(())
}
