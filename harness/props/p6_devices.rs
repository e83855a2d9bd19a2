//! P6 — CPU and CUDA agree: the same setup built on both gives eval logits within the
//! cross-device tolerance (f32 1e-4 relative L2: different kernels and reduction orders, and
//! cuBLAS may use TF32-free but differently blocked sums; bf16 2e-2), and a checkpoint saved
//! on the CPU loads on the GPU with bitwise identical trainable tensors. Without a CUDA
//! device the property is skipped with a message (`TUNECHECK_REQUIRE_CUDA=1` fails instead).

use candle_core::{DType, Device};

use crate::error::Result;
use crate::model::Mode;
use crate::props::runner::{run, PropConfig, PropOutcome};
use crate::props::{bitwise_equal, rel_l2, Check, Violation};
use crate::strategy::{arb_setup, random_batches, AdapterKind};
use crate::subject::{Capabilities, Setup, Trainer};

const ID: &str = "P6/cpu_vs_cuda";

/// Cross-device tolerance for `dtype`.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 2e-2,
        DType::F16 => 5e-3,
        _ => 1e-4,
    }
}

fn check_pair<T: Trainer>(factory: &impl Fn(&Setup, &Device) -> Result<T>, gpu: &Device, setup: &Setup) -> Check {
    let cpu = Device::Cpu;
    let a = factory(setup, &cpu)?;
    let b = factory(setup, gpu)?;
    let batch = &random_batches(setup.spec.vocab_size, setup.adapter_seed, 1, 2, 8)[0];
    let la = a.logits(&batch.ids_tensor(&cpu)?, Mode::Eval)?;
    let lb = b.logits(&batch.ids_tensor(gpu)?, Mode::Eval)?.to_device(&cpu)?;
    let tol = tolerance(setup.spec.dtype);
    let err = rel_l2(&lb, &la)?;
    if err.is_nan() || err > tol {
        return Err(Violation {
            property: ID,
            detail: format!("CUDA vs CPU eval logits: rel L2 {err:.3e} > {tol:.0e}"),
        }
        .into());
    }
    let dir = std::env::temp_dir().join(format!("tunecheck-p6-{}-{}", std::process::id(), setup.adapter_seed));
    a.save(&dir)?;
    let loaded = T::load(setup, gpu, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    let loaded = loaded?;
    for ((name, x), (_, y)) in a.trainable().iter().zip(loaded.trainable()) {
        if !bitwise_equal(x, &y.to_device(&cpu)?)? {
            return Err(Violation {
                property: ID,
                detail: format!("`{name}` saved on CPU differs after loading on CUDA"),
            }
            .into());
        }
    }
    Ok(())
}

/// Run P6 (LoRA and QLoRA setups) when a CUDA device exists.
pub fn cpu_vs_cuda<T: Trainer>(factory: &impl Fn(&Setup, &Device) -> Result<T>, cfg: &PropConfig) -> PropOutcome {
    let Some(gpu) = crate::device::cuda_or_skip(ID) else {
        return PropOutcome::Skipped("no CUDA device".into());
    };
    let mut cases = 0;
    for kind in [AdapterKind::Lora, AdapterKind::QLora] {
        let needs = Capabilities { save_load: true, quant4: kind == AdapterKind::QLora, ..Capabilities::none() };
        match run(factory, &gpu, needs, arb_setup(kind, 1), cfg, |f, d, s| check_pair(f, d, s)) {
            PropOutcome::Passed { cases: c } => cases += c,
            other => return other,
        }
    }
    PropOutcome::Passed { cases }
}
