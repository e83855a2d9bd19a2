//! Checkpoints larger than memory: the streamed forward (a decoder layer at a time from the
//! memory map) gives the whole model's logits bitwise, streamed quantization writes what the
//! in-memory quantizer writes, streamed synthesis writes what `generate` + `save` write, and
//! `tunecheck inspect` / `quantize` of a checkpoint keep their peak resident memory far below
//! its size (measured on a child process with `wait4`; the 8B-scale numbers inside a 4 GiB
//! memory cgroup are produced by `benches/memory_8b.sh` and quoted in the README).

use std::path::Path;
use std::process::Command;

use candle_core::{DType, Device, Tensor};
use tunecheck::adapt::QuantConfig;
use tunecheck::io::hf::{self, Lazy, Sharding};
use tunecheck::loader::{self, Streamed};
use tunecheck::props::bitwise_equal;
use tunecheck::spec::{ArchSpec, Family};
use tunecheck::Mode;

fn ids(spec: &ArchSpec) -> Tensor {
    let v = spec.vocab_size as u32;
    Tensor::from_vec((0..24u32).map(|i| (i * 7 + 3) % v).collect::<Vec<_>>(), (2, 12), &Device::Cpu).unwrap()
}

fn streamed(dir: &Path, ids: &Tensor) -> Tensor {
    let lazy = Lazy::open(dir, None).unwrap();
    Streamed::open(&lazy, &Device::Cpu, None).unwrap().forward(ids, Mode::Eval).unwrap()
}

#[test]
fn streamed_forward_is_the_whole_models_bitwise() {
    for family in [Family::Llama, Family::Gemma, Family::Gemma2, Family::Gemma3] {
        for dtype in [DType::F32, DType::BF16] {
            let tmp = tempfile::tempdir().unwrap();
            let spec = ArchSpec { dtype, ..ArchSpec::tiny(family) };
            let w = tunecheck::weights::generate(&spec, 3, &Device::Cpu).unwrap();
            hf::save(tmp.path(), &spec, &w, Sharding::MaxBytes(20_000)).unwrap();
            let whole = loader::open(tmp.path(), &Device::Cpu, None).unwrap().model;
            let want = whole.forward(&ids(&spec), Mode::Eval).unwrap();
            assert!(bitwise_equal(&streamed(tmp.path(), &ids(&spec)), &want).unwrap(), "{family:?} {dtype:?}");
            // A 4-bit checkpoint streams too.
            let q = tmp.path().join("q");
            tunecheck::io::quantize::quantize_dir(tmp.path(), &q, &QuantConfig::default(), 20_000).unwrap();
            let whole = loader::open(&q, &Device::Cpu, None).unwrap().model;
            let want = whole.forward(&ids(&spec), Mode::Eval).unwrap();
            assert!(bitwise_equal(&streamed(&q, &ids(&spec)), &want).unwrap(), "{family:?} {dtype:?} 4-bit");
        }
    }
    // A shell alone refuses to run without its layers.
    let tmp = tempfile::tempdir().unwrap();
    let spec = ArchSpec::tiny(Family::Llama);
    hf::save(tmp.path(), &spec, &tunecheck::weights::generate(&spec, 3, &Device::Cpu).unwrap(), Sharding::Single)
        .unwrap();
    let lazy = Lazy::open(tmp.path(), None).unwrap();
    let e = Streamed::open(&lazy, &Device::Cpu, None)
        .unwrap()
        .shell()
        .forward(&ids(&spec), Mode::Eval)
        .unwrap_err()
        .to_string();
    assert!(e.contains("decoder layer 0 is not loaded"), "{e}");
}

#[test]
fn streamed_quantization_writes_what_the_in_memory_quantizer_writes() {
    for (family, cfg) in [
        (Family::Llama, QuantConfig::default()),
        (Family::Gemma2, QuantConfig { double_quant: false, ..QuantConfig::transformers_defaults() }),
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let spec = ArchSpec { dtype: DType::BF16, ..ArchSpec::tiny(family) };
        let w = tunecheck::weights::generate(&spec, 4, &Device::Cpu).unwrap();
        let dense = tmp.path().join("dense");
        hf::save(&dense, &spec, &w, Sharding::Single).unwrap();
        let (a, b, one) = (tmp.path().join("a"), tmp.path().join("b"), tmp.path().join("one"));
        tunecheck::io::quantize::save_quantized(&a, &spec, &w, &cfg).unwrap();
        // Shards of at most a byte: every layer (and the shell) in a shard of its own.
        tunecheck::io::quantize::quantize_dir(&dense, &b, &cfg, 1).unwrap();
        // Below transformers' default shard size: one plain file, no index, same bytes.
        tunecheck::io::quantize::quantize_dir(&dense, &one, &cfg, tunecheck::io::quantize::DEFAULT_MAX_SHARD_BYTES)
            .unwrap();
        let mut files: Vec<String> =
            std::fs::read_dir(&one).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        files.sort();
        assert_eq!(files, ["config.json", "model.safetensors", "tunecheck-save.json"], "{family:?}");
        let c1 = hf::load(&one, &Device::Cpu, None).unwrap();
        let (ca, cb) = (hf::load(&a, &Device::Cpu, None).unwrap(), hf::load(&b, &Device::Cpu, None).unwrap());
        assert_eq!(ca.quant, cb.quant);
        assert_eq!(ca.weights.keys().collect::<Vec<_>>(), cb.weights.keys().collect::<Vec<_>>());
        for (k, t) in &ca.weights {
            assert!(bitwise_equal(t, &cb.weights[k]).unwrap(), "{k}");
            assert!(bitwise_equal(t, &c1.weights[k]).unwrap(), "{k} (one file)");
        }
        let x = ids(&spec);
        let (la, lb) = (
            loader::checkpoint(&ca, None).unwrap().model.forward(&x, Mode::Eval).unwrap(),
            loader::checkpoint(&cb, None).unwrap().model.forward(&x, Mode::Eval).unwrap(),
        );
        assert!(bitwise_equal(&la, &lb).unwrap(), "{family:?}: the streamed 4-bit model computes differently");
        let shards = std::fs::read_dir(&b)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().starts_with("model-"))
            .count();
        assert_eq!(shards, spec.num_layers + 1);
        // A quantized input is refused, naming it.
        let e = tunecheck::io::quantize::quantize_dir(&a, &tmp.path().join("c"), &cfg, 1).unwrap_err().to_string();
        assert!(e.contains("already quantized"), "{e}");
    }
}

#[test]
fn streamed_synthesis_writes_what_generate_and_save_write() {
    let spec = ArchSpec { dtype: DType::BF16, ..ArchSpec::tiny(Family::Gemma3) };
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let w = tunecheck::weights::generate(&spec, 9, &Device::Cpu).unwrap();
    hf::save(&a, &spec, &w, Sharding::MaxBytes(25_000)).unwrap();
    hf::save_generated(&b, &spec, Sharding::MaxBytes(25_000), &mut |k| {
        tunecheck::weights::generate_one(&spec, 9, k, &Device::Cpu)
    })
    .unwrap();
    let files = |d: &Path| {
        let mut v: Vec<String> =
            std::fs::read_dir(d).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    };
    assert_eq!(files(&a), files(&b));
    let (ca, cb) = (hf::load(&a, &Device::Cpu, None).unwrap(), hf::load(&b, &Device::Cpu, None).unwrap());
    for (k, t) in &ca.weights {
        assert!(bitwise_equal(t, &cb.weights[k]).unwrap(), "{k}");
    }
}

/// Run `cmd` and return its exit status and peak resident set (KiB) from `wait4`.
#[allow(clippy::zombie_processes)] // reaped by `wait4` below, which std cannot see
fn peak_rss_kib(cmd: &mut Command) -> (i32, i64) {
    let child = cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::null()).spawn().unwrap();
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: plain syscall on our own child; `rusage` is written by the kernel.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(r, pid, "wait4 failed");
    (status, usage.ru_maxrss)
}

/// A Llama-shaped bf16 checkpoint of about 290 MB whose decoder layers (24 MB each) dominate:
/// a pass that holds the model needs its size, one that streams needs about one layer.
#[test]
fn inspect_and_quantize_stream_within_a_fraction_of_the_checkpoint() {
    let bin = env!("CARGO_BIN_EXE_tunecheck");
    let tmp = tempfile::tempdir().unwrap();
    let mut spec = ArchSpec::tiny(Family::Llama);
    spec.vocab_size = 512;
    spec.hidden_size = 1024;
    spec.intermediate_size = 3072;
    spec.num_heads = 8;
    spec.num_kv_heads = 8;
    spec.head_dim = 128;
    spec.num_layers = 12;
    spec.layer_types = tunecheck::spec::default_layer_types(Family::Llama, 12, 6);
    spec.dtype = DType::BF16;
    let cfg = tmp.path().join("config.json");
    std::fs::write(&cfg, serde_json::to_vec(&tunecheck::io::config::to_json(&spec)).unwrap()).unwrap();
    let model = tmp.path().join("model");
    let out = Command::new(bin)
        .args(["synth", "--seed", "1", "--shard-bytes", "100000000", "--config"])
        .arg(&cfg)
        .arg("--out")
        .arg(&model)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let size_kib = (spec.num_parameters() * 2 / 1024) as i64;
    let (st, inspect) = peak_rss_kib(Command::new(bin).arg("inspect").arg(&model));
    assert!(st == 0 || st == 256, "inspect exit status {st}");
    let (st, quantize) = peak_rss_kib(
        Command::new(bin).arg("quantize").arg("--model").arg(&model).arg("--out").arg(tmp.path().join("q")),
    );
    assert_eq!(st, 0, "quantize failed");
    // The measure can see a whole model: computing logits loads every layer.
    let (st, whole) = peak_rss_kib(Command::new(bin).arg("logits").arg("--model").arg(&model).args(["--ids", "1,2,3"]));
    assert_eq!(st, 0, "logits failed");
    println!("checkpoint {size_kib} KiB; peak RSS: inspect {inspect} KiB, quantize {quantize} KiB, logits (whole model) {whole} KiB");
    assert!(whole > size_kib, "the whole-model run peaked at {whole} KiB for a {size_kib} KiB model");
    assert!(inspect < size_kib / 2, "inspect peaked at {inspect} KiB for a {size_kib} KiB checkpoint");
    assert!(quantize < size_kib / 2, "quantize peaked at {quantize} KiB for a {size_kib} KiB checkpoint");
}

/// An adapter on a streamed model (shell parts first, LoRA pairs per layer as each is loaded)
/// computes what the adapter applied to the whole model computes, bitwise — including saved
/// base matrices over a resized vocabulary, embedding LoRA, LoRA on the head and
/// `modules_to_save` copies.
#[test]
fn adapters_apply_to_a_streamed_model_bitwise() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    for (adapter, base) in [
        ("llama_lora_embed_head_resized", "llama_gqa"),
        ("llama_rslora_embed_head", "llama_gqa"),
        ("gemma3_lora_save_embed", "gemma3"),
        ("gemma2_lora_mlp", "gemma2_window"),
    ] {
        let (adir, bdir) = (root.join("adapters").join(adapter), root.join("models").join(base));
        let a = tunecheck::io::peft::read(&adir).unwrap();
        let whole = loader::open(&bdir, &Device::Cpu, Some(&adir)).unwrap().model;
        let x = ids(whole.spec());
        let want = whole.forward(&x, Mode::Eval).unwrap();
        let lazy = Lazy::open(&bdir, None).unwrap();
        let got = Streamed::open(&lazy, &Device::Cpu, Some((&a, &adir))).unwrap().forward(&x, Mode::Eval).unwrap();
        assert!(bitwise_equal(&got, &want).unwrap(), "{adapter}");
    }
}

/// The streamed head's row chunks (each widened to f32 on its own instead of the whole
/// matrix, as candle's CPU bf16 matmul does) give the same bits as one product.
#[test]
fn a_head_multiplied_in_row_chunks_is_bitwise_the_whole_product() {
    use tunecheck::adapt::linear::{Ctx, Linear};
    let spec = ArchSpec { dtype: DType::BF16, ..ArchSpec::tiny(Family::Llama) };
    let w = tunecheck::weights::generate(&spec, 2, &Device::Cpu).unwrap();
    let head = w["lm_head.weight"].clone();
    let x = w["model.embed_tokens.weight"].narrow(0, 0, 6).unwrap().reshape((2, 3, spec.hidden_size)).unwrap();
    let lin = Linear::dense(head.clone());
    let rng = std::sync::Mutex::new(tunecheck::weights::stream(0, "x"));
    let ctx = Ctx { train: false, rng: &rng };
    let whole = lin.forward_ctx(&x, &ctx).unwrap();
    for rows in [1, 7, head.dim(0).unwrap() - 1] {
        let chunked = lin.forward_chunked(&x, rows, &ctx).unwrap();
        assert!(bitwise_equal(&chunked, &whole).unwrap(), "{rows} rows at a time");
    }
}

/// A streamed model checks a saved adapter as the whole model does: a tensor for a layer the
/// model does not have, a missing layer tensor and a wrongly shaped one are errors naming the
/// adapter's weights file and the tensor.
#[test]
fn a_bad_adapter_on_a_streamed_model_is_named() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let (adir, bdir) = (root.join("adapters/llama_rslora_embed_head"), root.join("models/llama_gqa"));
    let good = tunecheck::io::peft::read(&adir).unwrap();
    let lazy = Lazy::open(&bdir, None).unwrap();
    let x = ids(&lazy.spec);
    let q0 = "model.layers.0.self_attn.q_proj.lora_A.weight";
    let run = |a: &tunecheck::io::peft::Adapter| {
        Streamed::open(&lazy, &Device::Cpu, Some((a, &adir)))
            .and_then(|s| s.forward(&x, Mode::Eval))
            .unwrap_err()
            .to_string()
    };
    let mut extra = good.clone();
    let t = extra.tensors[q0].clone();
    extra.tensors.insert("model.layers.99.self_attn.q_proj.lora_A.weight".into(), t);
    let e = run(&extra);
    assert!(
        e.contains("adapter_model.safetensors") && e.contains("model.layers.99.") && e.contains("does not belong"),
        "{e}"
    );
    let mut missing = good.clone();
    missing.tensors.remove(q0);
    let e = run(&missing);
    assert!(e.contains("adapter_model.safetensors") && e.contains(q0) && e.contains("is missing"), "{e}");
    let mut shape = good.clone();
    let t = shape.tensors[q0].narrow(1, 0, 3).unwrap();
    shape.tensors.insert(q0.into(), t);
    let e = run(&shape);
    assert!(e.contains(q0) && e.contains("has shape"), "{e}");
}
