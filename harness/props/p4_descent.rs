//! P4 — the loss descends and epochs are seamless: on a learnable task (a seeded permutation
//! successor over the vocabulary) the second epoch's train loss is below the first's; eval
//! loss is produced at every epoch when asked and changes when the weights change; and two
//! epochs over the data leave the trainable tensors bitwise equal to one epoch over the data
//! twice — an epoch boundary must not reset optimizer or schedule state (the 0.07 → 4.83
//! spike). Bitwise: the same steps on the same values.

use candle_core::Device;

use crate::error::Result;
use crate::props::runner::{run, PropConfig, PropOutcome};
use crate::props::{bitwise_equal, Check, Violation};
use crate::strategy::{arb_setup, AdapterKind};
use crate::subject::{Capabilities, Setup, Trainer};
use crate::train::{Batch, IGNORE};

const ID: &str = "P4/descent_and_epochs";

fn fail(detail: String) -> Check {
    Err(Violation { property: ID, detail }.into())
}

/// `n` batches of a permutation-successor task over `vocab`: `t' = (a·t + 1) mod vocab` with
/// `a` coprime to `vocab`; the first token is random (its label masked).
pub fn successor_batches(vocab: usize, seed: u64, n: usize) -> Vec<Batch> {
    use rand_core::RngCore;
    let v = vocab as u64;
    let gcd = |mut a: u64, mut b: u64| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    let a = (3..).step_by(2).find(|&a| gcd(a, v) == 1).unwrap_or(1);
    let mut rng = crate::weights::stream(seed, "successor_batches_any_vocab");
    (0..n)
        .map(|_| {
            let seqs: Vec<Vec<u32>> = (0..4)
                .map(|_| {
                    let mut t = rng.next_u64() % v;
                    (0..8)
                        .map(|_| {
                            let cur = t as u32;
                            t = (a * t + 1) % v;
                            cur
                        })
                        .collect()
                })
                .collect();
            let mut b = Batch::from_sequences(&seqs, 0);
            for l in &mut b.labels {
                l[0] = IGNORE;
            }
            b
        })
        .collect()
}

/// Check P4 on one setup.
pub fn check<T: Trainer>(factory: &impl Fn(&Setup, &Device) -> Result<T>, device: &Device, setup: &Setup) -> Check {
    // Full learning rate from the first step: a warmup longer than an epoch would measure
    // the schedule, not the descent.
    let mut setup = setup.clone();
    setup.train.schedule.warmup_steps = 0;
    setup.train.schedule.total_steps = 16;
    let setup = &setup;
    let data = successor_batches(setup.spec.vocab_size, setup.adapter_seed, 8);
    let eval = &data[..2];
    let mut t = factory(setup, device)?;
    let h = t.fit(&data, eval, 2)?;
    if h.eval.len() != 2 {
        return fail(format!("asked for eval at each of 2 epochs, got {} eval losses", h.eval.len()));
    }
    if h.eval[0].1 == h.eval[1].1 {
        return fail(format!("eval loss stayed at {} while the weights trained", h.eval[0].1));
    }
    // Descent on train-mode losses (same batches, epoch 2 vs epoch 1), independent of the
    // eval path, which P1 checks.
    let mean = |e: usize| {
        let v: Vec<f64> = h.train.iter().filter(|x| x.1 == e).map(|x| x.2).collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let (first, second) = (mean(0), mean(1));
    if second >= first {
        return fail(format!("loss did not descend: epoch means {first:.4} → {second:.4}"));
    }
    let twice: Vec<Batch> = data.iter().chain(&data).cloned().collect();
    let mut once = factory(setup, device)?;
    once.fit(&twice, &[], 1)?;
    for ((name, a), (_, b)) in t.trainable().iter().zip(once.trainable()) {
        if !bitwise_equal(a, &b)? {
            return fail(format!(
                "`{name}` after 2 epochs differs from 1 epoch over the data twice: the epoch boundary reset state"
            ));
        }
    }
    Ok(())
}

/// Run P4 for every adapter kind.
pub fn descent<T: Trainer>(
    factory: &impl Fn(&Setup, &Device) -> Result<T>,
    device: &Device,
    cfg: &PropConfig,
) -> PropOutcome {
    let mut cases = 0;
    for kind in AdapterKind::ALL {
        let needs = Capabilities { quant4: kind == AdapterKind::QLora, ..Capabilities::none() };
        match run(factory, device, needs, arb_setup(kind, 1), cfg, check) {
            PropOutcome::Passed { cases: c } => cases += c,
            PropOutcome::Skipped(_) => {}
            failed => return failed,
        }
    }
    PropOutcome::Passed { cases }
}
