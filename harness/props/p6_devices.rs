//! P6 — CPU and CUDA agree: the same setup built on both gives eval logits within the
//! cross-device tolerance (f32 1e-4 relative L2: different kernels and reduction orders;
//! bf16 2e-2, f16 5e-3), and a checkpoint saved on the CPU loads on the GPU with bitwise
//! identical trainable tensors. Without a CUDA device the property is skipped with the reason
//! (`TUNECHECK_REQUIRE_CUDA=1` fails instead).

use candle_core::{DType, Device};

use crate::io::scratch::Scratch;
use crate::model::Mode;
use crate::props::property::{Body, Property, ALL_DTYPES};
use crate::props::{bitwise_equal, rel_l2, within, Check, Violation};
use crate::strategy::{random_batches, AdapterKind};
use crate::subject::{Capabilities, Factory, Setup};

const ID: &str = "P6/cpu_vs_cuda";

/// The catalogue entry.
pub const PROPERTY: Property = Property {
    id: "P6",
    test_name: "p6_cpu_vs_cuda",
    title: "CPU == CUDA, CPU checkpoint loads on CUDA",
    invariant: "CPU and CUDA eval logits agree; a checkpoint saved on the CPU loads on CUDA with bitwise identical \
                trainable tensors",
    tolerance: "rel L2 f32 1e-4, bf16 2e-2, f16 5e-3 (other kernels and reduction orders); reload bitwise",
    kinds: &[AdapterKind::Lora, AdapterKind::QLora],
    dtypes: &ALL_DTYPES,
    needs: Capabilities { save_load: true, ..Capabilities::none() },
    grad_accum: 1,
    filter: None,
    draws: crate::strategy::Draws::NONE,
    body: Body::CrossDevice(check),
};

/// Cross-device tolerance for `dtype`.
pub fn tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::BF16 => 2e-2,
        DType::F16 => 5e-3,
        _ => 1e-4,
    }
}

/// Check P6 on one setup (`gpu` is the CUDA device).
pub fn check(f: &dyn Factory, gpu: &Device, setup: &Setup) -> Check {
    let cpu = Device::Cpu;
    let a = f.build(setup, &cpu)?;
    let b = f.build(setup, gpu)?;
    let batch = &random_batches(setup.spec.vocab_size, setup.adapter_seed, 1, 2, 8)[0];
    let la = a.logits(&batch.ids_tensor(&cpu)?, Mode::Eval)?;
    let lb = b.logits(&batch.ids_tensor(gpu)?, Mode::Eval)?.to_device(&cpu)?;
    let tol = tolerance(setup.spec.dtype);
    let err = rel_l2(&lb, &la)?;
    if !within(err, tol) {
        return Err(Violation::new(
            ID,
            "logits_differ",
            format!("CUDA vs CPU eval logits: rel L2 {err:.3e} > {tol:.0e}"),
        )
        .into());
    }
    let dir = Scratch::new("p6")?;
    a.save(&dir.0)?;
    let loaded = f.load(gpu, &dir.0)?;
    for ((name, x), (_, y)) in a.trainable().iter().zip(loaded.trainable()) {
        if !bitwise_equal(x, &y.to_device(&cpu)?)? {
            return Err(Violation::new(
                ID,
                "reload_differs",
                format!("`{name}` saved on CPU differs after loading on CUDA"),
            )
            .into());
        }
    }
    Ok(())
}
