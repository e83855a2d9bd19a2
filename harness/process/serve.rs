//! The driver side of the protocol around any [`Factory`]: reads requests from stdin and
//! answers on stdout. `tunecheck driver` serves the reference trainer (or a mutant) with it,
//! so the protocol, [`ProcessTrainer`](crate::process::ProcessTrainer) and the failure
//! handling are tested in `cargo test` without Python. [`DriverFault`]s make it misbehave on
//! purpose (die, print garbage, hang, write wrong shapes) for those tests.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::io::fields::Fields;
use crate::io::st::write_safetensors;
use crate::model::Mode;
use crate::process::wire::{self, PREFIX};
use crate::subject::{Factory, FitPlan, Setup, Trainer};

/// A planted protocol failure: at the first request for `op` (at every one with `always`), do
/// `kind`. Written `OP:KIND` or `OP:KIND:always`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DriverFault {
    /// The operation (`build`, `step`, `logits`, ...).
    pub op: String,
    /// What to do.
    pub kind: FaultKind,
    /// At every request for `op`, not only the first.
    pub always: bool,
}

/// Ways a driver can break the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// Exit with status 3 without answering (after a line on stderr).
    Die,
    /// Answer with a line that is not JSON.
    Garbage,
    /// Never answer.
    Hang,
    /// Write the answer's tensor file with a wrong shape.
    BadShape,
    /// Answer `{"ok": false}` with a message.
    Error,
    /// Answer `{"ok": false, "kind": "unsupported"}`: the case is beyond the subject.
    Unsupported,
}

impl std::str::FromStr for DriverFault {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let (op, kind) = s.split_once(':').ok_or_else(|| Error::field("--fault", format!("`{s}` is not OP:KIND")))?;
        let (kind, always) = match kind.strip_suffix(":always") {
            Some(k) => (k, true),
            None => (kind, false),
        };
        let kind = match kind {
            "die" => FaultKind::Die,
            "garbage" => FaultKind::Garbage,
            "hang" => FaultKind::Hang,
            "bad_shape" => FaultKind::BadShape,
            "error" => FaultKind::Error,
            "unsupported" => FaultKind::Unsupported,
            other => {
                return Err(Error::field(
                    "--fault",
                    format!("`{other}` is not die, garbage, hang, bad_shape, error or unsupported"),
                ))
            }
        };
        Ok(DriverFault { op: op.to_string(), kind, always })
    }
}

/// Read the setup directory written by [`wire::write_setup`] back into a [`Setup`].
pub fn read_setup(dir: &Path) -> Result<Setup> {
    let ck = crate::io::hf::load(&dir.join("base"), &Device::Cpu, None)?;
    let adapter = crate::io::peft::read(&dir.join("adapter"))?;
    let path = dir.join("train.json");
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let v = Fields::parse(&bytes, &path)?;
    let c = Fields::new(&v, Some(&path), "")?;
    for k in ["quantization", "adapter_seed", "train", "adapter_init"] {
        if !c.present(k) {
            return Err(c.bad(k, "missing"));
        }
    }
    let quant = c.opt_object("quantization")?.map(|q| crate::io::config::quant_from_fields(&q)).transpose()?;
    let adapter_seed = c.u64("adapter_seed")?;
    let train = crate::train::checkpoint::config_from_value(c.object().get("train").unwrap_or(&Value::Null), &path)?;
    let mut lora = adapter.lora;
    lora.init = match c.opt_object("adapter_init")? {
        None => crate::adapt::LoraInit::Default,
        Some(init) => crate::adapt::LoraInit::NonZero(init.f64("b_std")? as f32),
    };
    Ok(Setup { spec: ck.spec, weights: ck.weights, lora, quant, train, adapter_seed })
}

/// Check that `subject`'s LoRA factors start from the values in `dir/adapter` (bitwise): a
/// driver that rebuilds the initial adapter from the seed must arrive at the same tensors.
/// (Full `modules_to_save` copies come from the base, which a trainer may legitimately fix.)
fn check_initial_adapter(subject: &dyn Trainer, dir: &Path) -> Result<()> {
    let adapter = crate::io::peft::read(&dir.join("adapter"))?;
    let file = dir.join("adapter").join(crate::io::peft::WEIGHTS);
    let trainable: BTreeMap<String, Tensor> = subject.trainable().into_iter().collect();
    for (name, want) in adapter.tensors.iter().filter(|(n, _)| n.contains(".lora_")) {
        let got = trainable.get(name).ok_or_else(|| Error::tensor(&file, name, "the subject has no such trainable"))?;
        // Compared in the subject's dtype: a trainer may keep its master weights in another.
        let got = got.to_device(&Device::Cpu)?;
        if !crate::props::bitwise_equal(&got, &want.to_dtype(got.dtype())?)? {
            return Err(Error::tensor(&file, name, "the rebuilt initial value differs from the file's"));
        }
    }
    Ok(())
}

fn listing(v: &[(String, Tensor)], prefix: &str) -> Value {
    Value::Array(v.iter().map(|(n, t)| json!([format!("{prefix}{n}"), t.dims()])).collect())
}

struct Server<'a> {
    factory: &'a dyn Factory,
    subject: Option<Box<dyn Trainer>>,
    faults: Vec<DriverFault>,
}

fn path_of(req: &Value, k: &str) -> Result<PathBuf> {
    req.get(k).and_then(Value::as_str).map(PathBuf::from).ok_or_else(|| Error::field(k, "missing or not a path"))
}

fn batches_of(req: &Value, k: &str) -> Result<Vec<crate::train::Batch>> {
    let list = req.get(k).and_then(Value::as_array).ok_or_else(|| Error::field(k, "missing or not a list"))?;
    list.iter()
        .map(|p| wire::read_batch(Path::new(p.as_str().ok_or_else(|| Error::field(k, "entry is not a path"))?)))
        .collect()
}

impl Server<'_> {
    fn subject(&mut self) -> Result<&mut Box<dyn Trainer>> {
        self.subject.as_mut().ok_or_else(|| Error::Msg("no subject: send `build` or `load` first".into()))
    }

    fn fault(&mut self, op: &str) -> Option<FaultKind> {
        let i = self.faults.iter().position(|f| f.op == op)?;
        if self.faults[i].always {
            return Some(self.faults[i].kind);
        }
        Some(self.faults.remove(i).kind)
    }

    fn describe(&mut self) -> Result<Value> {
        let s = self.subject()?;
        let trainable = s.trainable();
        let frozen = s.frozen();
        let probe = Tensor::zeros((1, 1), candle_core::DType::U32, &Device::Cpu)?;
        let vocab = s.logits(&probe, Mode::Eval)?.dim(2)?;
        Ok(json!({"vocab_size": vocab, "trainable": listing(&trainable, PREFIX), "frozen": listing(&frozen, "")}))
    }

    fn write(&self, out: &Path, tensors: BTreeMap<String, Tensor>, bad_shape: bool) -> Result<()> {
        let tensors = if bad_shape {
            tensors.into_iter().map(|(k, t)| Ok((k, t.flatten_all()?))).collect::<Result<_>>()?
        } else {
            tensors
        };
        write_safetensors(out, &tensors)
    }

    fn handle(&mut self, op: &str, req: &Value, bad_shape: bool) -> Result<Value> {
        Ok(match op {
            "hello" => json!({
                "protocol": wire::VERSION,
                "framework": "tunecheck",
                "version": format!("{} ({})", env!("CARGO_PKG_VERSION"), self.factory.name()),
                "capabilities": wire::capabilities_json(&self.factory.capabilities()),
                "families": crate::spec::Family::ALL.iter().map(|&f| f.short_name()).collect::<Vec<_>>(),
            }),
            "build" => {
                let dir = path_of(req, "setup")?;
                let setup = read_setup(&dir)?;
                let subject = self.factory.build(&setup, &Device::Cpu)?;
                check_initial_adapter(subject.as_ref(), &dir)?;
                self.subject = Some(subject);
                self.describe()?
            }
            "load" => {
                self.subject = Some(self.factory.load(&Device::Cpu, &path_of(req, "dir")?)?);
                self.describe()?
            }
            "reset" => {
                self.subject = None;
                json!({})
            }
            "logits" => {
                let b = wire::read_batch(&path_of(req, "batch")?)?;
                let mode = match req.get("mode").and_then(Value::as_str) {
                    Some("train") => Mode::Train,
                    Some("eval") => Mode::Eval,
                    _ => return Err(Error::field("mode", "not `train` or `eval`")),
                };
                let s = self.subject()?;
                let logits = s.logits(&b.ids_tensor(&Device::Cpu)?, mode)?.to_dtype(candle_core::DType::F32)?;
                self.write(&path_of(req, "out")?, BTreeMap::from([("logits".to_string(), logits)]), bad_shape)?;
                json!({})
            }
            "gradients" => {
                let micro = batches_of(req, "batches")?;
                let tokens: usize = micro.iter().map(|b| b.tokens()).sum();
                let g = self.subject()?.gradients(&micro)?;
                let g = g.into_iter().map(|(k, v)| (format!("{PREFIX}{k}"), v)).collect();
                self.write(&path_of(req, "out")?, g, bad_shape)?;
                json!({"tokens": tokens})
            }
            "step" => {
                let micro = batches_of(req, "batches")?;
                let r = self.subject()?.train_step(&micro)?;
                json!({"loss": r.loss, "tokens": r.tokens, "grad_norm": r.grad_norm, "lr": r.lr})
            }
            "eval_loss" => {
                let b = batches_of(req, "batches")?;
                json!({"loss": self.subject()?.eval_loss(&b)?})
            }
            "fit" => {
                let train = batches_of(req, "train")?;
                let eval = batches_of(req, "eval")?;
                let epochs =
                    req.get("epochs").and_then(Value::as_u64).ok_or_else(|| Error::field("epochs", "missing"))?;
                let max_steps = req.get("max_steps").and_then(Value::as_u64).map(|x| x as usize);
                let h = self.subject()?.fit(&train, &eval, FitPlan { epochs: epochs as usize, max_steps })?;
                json!({
                    "train": h.train.iter().map(|(s, e, l)| json!([s, e, l])).collect::<Vec<_>>(),
                    "eval": h.eval.iter().map(|(s, l)| json!([s, l])).collect::<Vec<_>>(),
                })
            }
            "tensors" => {
                let which = req.get("which").and_then(Value::as_str).unwrap_or("");
                let s = self.subject()?;
                let (list, prefix) = match which {
                    "trainable" => (s.trainable(), PREFIX),
                    "frozen" => (s.frozen(), ""),
                    other => return Err(Error::field("which", format!("`{other}` is not trainable or frozen"))),
                };
                let map = list.into_iter().map(|(k, v)| (format!("{prefix}{k}"), v)).collect();
                self.write(&path_of(req, "out")?, map, bad_shape)?;
                json!({})
            }
            "save" => {
                let dir = path_of(req, "dir")?;
                self.subject()?.save(&dir)?;
                json!({})
            }
            other => return Err(Error::field("op", format!("unknown operation `{other}`"))),
        })
    }
}

/// The driver's own work directory, as a driver in another language keeps one: the one
/// tunecheck hands over in [`WORK_ENV`](crate::process::subject::WORK_ENV) (tunecheck removes
/// it), else one of its own under the temp directory, removed after a clean `shutdown` — so a
/// driver killed right after answering leaves it behind, which is why tunecheck hands one over.
/// It holds `driver.log`, the operations served.
struct Work {
    dir: PathBuf,
    own: bool,
    log: Option<std::fs::File>,
}

impl Work {
    fn open() -> Work {
        let (dir, own) = match std::env::var_os(crate::process::subject::WORK_ENV) {
            Some(d) => (PathBuf::from(d), false),
            None => (std::env::temp_dir().join(format!("tunecheck-driver-{}", std::process::id())), true),
        };
        let log = std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::OpenOptions::new().create(true).append(true).open(dir.join("driver.log")))
            .map_err(|e| eprintln!("driver: no work directory {}: {e}", dir.display()))
            .ok();
        Work { dir, own, log }
    }

    fn note(&mut self, op: &str) {
        if let Some(f) = self.log.as_mut() {
            let _ = writeln!(f, "{op}");
        }
    }

    fn close(mut self) {
        self.log = None;
        if self.own {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// Serve `factory` over stdin/stdout until `shutdown` or end of input.
pub fn serve(factory: &dyn Factory, faults: Vec<DriverFault>) -> Result<()> {
    let stdin = std::io::stdin();
    let mut stdout = std::io::stdout();
    let mut server = Server { factory, subject: None, faults };
    let mut work = Work::open();
    for line in stdin.lock().lines() {
        let line = line.map_err(|e| Error::Msg(format!("reading stdin: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        let req: Value = match serde_json::from_str(&line) {
            Ok(v) => v,
            Err(e) => {
                eprintln!("driver: request is not JSON ({e}): {line}");
                continue;
            }
        };
        let id = req.get("id").cloned().unwrap_or(Value::Null);
        let op = req.get("op").and_then(Value::as_str).unwrap_or("").to_string();
        let fault = server.fault(&op);
        work.note(&op);
        match fault {
            Some(FaultKind::Die) => {
                eprintln!("driver: planted fault: dying during `{op}`");
                std::process::exit(3);
            }
            Some(FaultKind::Hang) => {
                eprintln!("driver: planted fault: hanging during `{op}`");
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(3600));
                }
            }
            Some(FaultKind::Garbage) => {
                writeln!(stdout, "Loading checkpoint shards: 100%|##########| 1/1").ok();
                stdout.flush().ok();
                continue;
            }
            _ => {}
        }
        let answer = if op == "shutdown" {
            json!({"id": id, "ok": true})
        } else if fault == Some(FaultKind::Error) {
            json!({"id": id, "ok": false, "error": format!("planted fault: `{op}` refused")})
        } else if fault == Some(FaultKind::Unsupported) {
            json!({"id": id, "ok": false, "kind": "unsupported", "error": format!("planted: `{op}` beyond this subject")})
        } else {
            match server.handle(&op, &req, fault == Some(FaultKind::BadShape)) {
                Ok(mut v) => {
                    v["id"] = id;
                    v["ok"] = json!(true);
                    v
                }
                Err(e) => {
                    let mut v = wire::error_answer(&e);
                    v["id"] = id;
                    v
                }
            }
        };
        writeln!(stdout, "{answer}").map_err(|e| Error::Msg(format!("writing stdout: {e}")))?;
        stdout.flush().map_err(|e| Error::Msg(format!("writing stdout: {e}")))?;
        if op == "shutdown" {
            break;
        }
    }
    work.close();
    Ok(())
}
