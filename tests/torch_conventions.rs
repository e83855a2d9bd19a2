//! The reference trainer's optimizer arithmetic against numbers produced by torch and
//! transformers (`fixtures/optim/`, made by `fixtures/gen_optim.py`): the learning rate of
//! every step of transformers' cosine schedule with warmup (with and without a floor), and the
//! weights after five AdamW steps with token-normalised gradient accumulation, torch's
//! gradient clipping, weight decay, warmup + cosine, and a parameter that misses a step
//! (per-parameter step counts).

use std::collections::BTreeMap;
use std::path::PathBuf;

use candle_core::{Device, Tensor, Var};
use serde_json::Value;
use tunecheck::io::st::StFile;
use tunecheck::train::optim::{clip, AdamW, AdamWConfig, Schedule};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/optim").join(name)
}

fn json(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name)).unwrap()).unwrap()
}

#[test]
fn schedule_matches_transformers_at_every_step() {
    let cases = json("schedule.json");
    let mut checked = 0;
    for c in cases.as_array().unwrap() {
        let s = Schedule {
            warmup_steps: c["warmup"].as_u64().unwrap() as usize,
            total_steps: c["total"].as_u64().unwrap() as usize,
            min_ratio: c["min_lr_rate"].as_f64().unwrap(),
        };
        for (step, want) in c["lr"].as_array().unwrap().iter().enumerate() {
            let want = want.as_f64().unwrap();
            let got = s.factor(step);
            assert!((got - want).abs() <= 1e-12, "{s:?} step {step}: tunecheck {got}, transformers {want}");
            checked += 1;
        }
    }
    assert!(checked > 50, "only {checked} learning rates checked");
}

#[test]
fn first_step_with_warmup_trains_at_zero() {
    let s = Schedule { warmup_steps: 3, total_steps: 10, min_ratio: 0.0 };
    assert_eq!(s.factor(0), 0.0);
    assert_eq!(s.factor(3), 1.0);
    assert!(s.factor(10).abs() < 1e-15, "cosine decays to 0 by default");
}

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a - b).unwrap().sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    let n = b.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    (d / n).sqrt()
}

#[test]
fn five_adamw_steps_match_torch() {
    let meta = json("adamw.json");
    let st = StFile::open(&fixture("adamw.safetensors")).unwrap();
    let hp = |k: &str| meta[k].as_f64().unwrap();
    let cfg = AdamWConfig {
        lr: hp("lr"),
        beta1: meta["betas"][0].as_f64().unwrap(),
        beta2: meta["betas"][1].as_f64().unwrap(),
        eps: hp("eps"),
        weight_decay: hp("weight_decay"),
    };
    let schedule = Schedule { warmup_steps: hp("warmup") as usize, total_steps: hp("total") as usize, min_ratio: 0.0 };
    let names = ["a", "b", "c"];
    let params: Vec<(String, Var)> = names
        .iter()
        .map(|n| (n.to_string(), Var::from_tensor(&st.load(&format!("init.{n}")).unwrap()).unwrap()))
        .collect();
    let mut opt = AdamW::new(cfg);
    let tokens = meta["tokens"].as_array().unwrap();
    for (step, counts) in tokens.iter().enumerate() {
        let counts: Vec<u64> = counts.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect();
        let total: u64 = counts.iter().sum();
        // Each micro-batch contributes the gradient of its loss sum over the step's tokens.
        let mut grads = BTreeMap::new();
        for n in names {
            let mut acc: Option<Tensor> = None;
            for m in 0..counts.len() {
                let Ok(Some(_)) = st.info(&format!("grad_sum.{step}.{m}.{n}")) else { continue };
                let g = (st.load(&format!("grad_sum.{step}.{m}.{n}")).unwrap() / total as f64).unwrap();
                acc = Some(match acc {
                    Some(a) => (a + g).unwrap(),
                    None => g,
                });
            }
            if let Some(a) = acc {
                grads.insert(n.to_string(), a);
            }
        }
        let lr = cfg.lr * schedule.factor(step);
        let want_lr = meta["lr_used"][step].as_f64().unwrap();
        assert!((lr - want_lr).abs() <= 1e-12 * cfg.lr, "step {step}: lr {lr}, torch {want_lr}");
        let norm = clip(&mut grads, hp("max_grad_norm")).unwrap();
        let want_norm = meta["grad_norm"][step].as_f64().unwrap();
        assert!((norm - want_norm).abs() <= 1e-6 * want_norm, "step {step}: grad norm {norm}, torch {want_norm}");
        opt.apply(&params, &grads, lr).unwrap();
        for (n, var) in &params {
            let want = st.load(&format!("after.{step}.{n}")).unwrap();
            let r = rel(var.as_tensor(), &want);
            assert!(r <= 1e-5, "step {step}, `{n}`: relative L2 error {r:.3e} against torch (limit 1e-5)");
        }
    }
    for n in names {
        let want = meta["state_steps"][n].as_u64().unwrap() as usize;
        assert_eq!(opt.param_step(n), want, "`{n}`: per-parameter step count");
    }
    assert_eq!(opt.param_step("c"), 4, "the fixture must have a parameter that missed a step");
}

#[test]
fn clipping_scales_just_below_max_norm_like_torch() {
    // torch scales by min(1, max/(norm + 1e-6)) unconditionally: a norm of exactly max_norm is
    // scaled by max/(max + 1e-6) < 1.
    let g = Tensor::new(&[3f32, 4.0], &Device::Cpu).unwrap();
    let mut grads = BTreeMap::from([("g".to_string(), g)]);
    let norm = clip(&mut grads, 5.0).unwrap();
    assert_eq!(norm, 5.0);
    let v = grads["g"].to_vec1::<f32>().unwrap();
    assert!(v[0] < 3.0 && (v[0] as f64 - 3.0 * 5.0 / (5.0 + 1e-6)).abs() < 1e-6, "{v:?}");
}
