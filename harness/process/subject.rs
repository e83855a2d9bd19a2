//! [`ProcessFactory`] and [`ProcessTrainer`]: a trainer in another process (any language)
//! judged by every property through the driver protocol. The factory starts drivers, keeps
//! idle ones for the next `build` (heavy imports happen once per driver), and starts a fresh
//! driver for every `load` so that a reload shares nothing in memory with the subject that
//! saved. Every answer is checked (names, shapes); any protocol failure is an error naming
//! the operation with the driver's stderr.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::Duration;

use candle_core::{Device, Tensor};
use serde_json::{json, Value};

use crate::error::{Error, Result};
use crate::model::Mode;
use crate::process::child::{driver_error, Child};
use crate::process::wire::{self, Hello, WorkDir, PREFIX};
use crate::spec::Family;
use crate::subject::{Capabilities, Factory, FitPlan, Setup, Trainer};
use crate::train::{Batch, History, StepReport};

/// Environment variable with the per-operation timeout in seconds.
pub const TIMEOUT_ENV: &str = "TUNECHECK_DRIVER_TIMEOUT";
/// Idle drivers kept for the next `build` (each holds its framework in memory).
const MAX_IDLE: usize = 2;
/// Default per-operation timeout.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// Makes [`ProcessTrainer`]s by starting the driver command.
pub struct ProcessFactory {
    command: String,
    timeout: Duration,
    hello: Hello,
    idle: Rc<RefCell<Vec<Child>>>,
    /// A driver started ahead of need, importing while other work goes on: the next `load`
    /// takes it, so that a fresh driver rarely costs a cold start.
    spare: RefCell<Option<Child>>,
    work: Rc<WorkDir>,
}

impl ProcessFactory {
    /// Start one driver, check its handshake and keep it for the first subject. `timeout`
    /// bounds every operation (the handshake included).
    pub fn start(command: &str, timeout: Duration) -> Result<ProcessFactory> {
        let work = Rc::new(WorkDir::new()?);
        let (child, hello) = spawn(command, &work, timeout)?;
        Ok(ProcessFactory {
            command: command.to_string(),
            timeout,
            hello,
            idle: Rc::new(RefCell::new(vec![child])),
            spare: RefCell::new(None),
            work,
        })
    }

    /// The per-operation timeout from [`TIMEOUT_ENV`], else [`DEFAULT_TIMEOUT`].
    pub fn timeout_from_env() -> Result<Duration> {
        match std::env::var(TIMEOUT_ENV) {
            Err(_) => Ok(DEFAULT_TIMEOUT),
            Ok(s) => s
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x > 0.0)
                .map(Duration::from_secs_f64)
                .ok_or_else(|| Error::field(TIMEOUT_ENV, format!("`{s}` is not a positive number of seconds"))),
        }
    }

    /// What the driver said in its handshake.
    pub fn hello(&self) -> &Hello {
        &self.hello
    }

    fn child(&self, fresh: bool) -> Result<Child> {
        if !fresh {
            if let Some(c) = self.idle.borrow_mut().pop() {
                return Ok(c);
            }
        }
        let spare = self.spare.borrow_mut().take();
        let child = match spare {
            Some(c) => handshake(c, self.timeout)?.0,
            None => spawn(&self.command, &self.work, self.timeout)?.0,
        };
        if fresh {
            *self.spare.borrow_mut() = Some(start_process(&self.command, &self.work)?);
        }
        Ok(child)
    }

    fn subject(&self, mut child: Child, op: &str, request: Value) -> Result<ProcessTrainer> {
        let answer = match child.call(op, request, self.timeout) {
            Ok(a) => a,
            Err(e) => {
                // A driver that answered (refusing this setup) serves the next one.
                if child.usable() && self.idle.borrow().len() < MAX_IDLE {
                    self.idle.borrow_mut().push(child);
                }
                return Err(e);
            }
        };
        let names = expect_tensor_list(op, &answer, "trainable", &child)?;
        let frozen = expect_tensor_list(op, &answer, "frozen", &child)?;
        let vocab =
            answer.get("vocab_size").and_then(Value::as_u64).filter(|&v| v > 0).ok_or_else(|| {
                driver_error(op, "the answer has no positive integer `vocab_size`", &child.stderr_tail())
            })? as usize;
        Ok(ProcessTrainer {
            child: RefCell::new(Some(child)),
            idle: self.idle.clone(),
            work: self.work.clone(),
            timeout: self.timeout,
            vocab,
            trainable: names,
            frozen,
        })
    }
}

/// Environment variable naming the driver's own work directory.
pub const WORK_ENV: &str = "TUNECHECK_DRIVER_WORK";

/// Start the driver with its own empty work directory (inside tunecheck's, named in
/// [`WORK_ENV`] and made its `TMPDIR`, so that whatever its libraries put in the temp
/// directory — torch's compile caches, say — lands there too), which tunecheck removes once
/// the driver is gone.
fn start_process(command: &str, work: &WorkDir) -> Result<Child> {
    let dir = work.fresh("driver", "");
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    let env = [
        ("TUNECHECK_PROTOCOL", wire::VERSION.to_string()),
        (WORK_ENV, dir.display().to_string()),
        ("TMPDIR", dir.display().to_string()),
    ];
    let mut child = match Child::spawn(command, &env) {
        Ok(c) => c,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
    };
    child.own_dir(dir);
    Ok(child)
}

fn spawn(command: &str, work: &WorkDir, timeout: Duration) -> Result<(Child, Hello)> {
    handshake(start_process(command, work)?, timeout)
}

fn handshake(mut child: Child, timeout: Duration) -> Result<(Child, Hello)> {
    let answer = child.call("hello", json!({"protocol": wire::VERSION}), timeout)?;
    let hello = Hello::parse(&answer)
        .map_err(|e| Error::Msg(format!("{e}\n--- driver stderr ---\n{}", child.stderr_tail())))?;
    Ok((child, hello))
}

/// `[[name, [shape...]], ...]` from an answer.
fn expect_tensor_list(op: &str, answer: &Value, key: &str, child: &Child) -> Result<Vec<(String, Vec<usize>)>> {
    let bad = |msg: String| driver_error(op, msg, &child.stderr_tail());
    let list =
        answer.get(key).and_then(Value::as_array).ok_or_else(|| bad(format!("the answer has no `{key}` list")))?;
    list.iter()
        .map(|e| {
            let pair = e.as_array().filter(|a| a.len() == 2);
            let name = pair.and_then(|a| a[0].as_str());
            let shape = pair
                .and_then(|a| a[1].as_array())
                .and_then(|s| s.iter().map(|d| d.as_u64().map(|x| x as usize)).collect());
            match (name, shape) {
                (Some(n), Some(s)) => Ok((n.to_string(), s)),
                _ => Err(bad(format!("`{key}` entry {e} is not [name, [dims...]]"))),
            }
        })
        .collect()
}

impl Factory for ProcessFactory {
    fn name(&self) -> String {
        format!("{} {} ({})", self.hello.framework, self.hello.version, self.command)
    }

    fn replay_args(&self) -> Option<String> {
        Some(format!("--trainer {}", shell_words::quote(&self.command)))
    }

    fn capabilities(&self) -> Capabilities {
        self.hello.capabilities
    }

    fn lacking_reason(&self, capability: &str) -> Option<String> {
        self.hello.unsupported.get(capability).cloned()
    }

    fn families(&self) -> Vec<(Family, Option<String>)> {
        Family::ALL
            .iter()
            .map(|&f| {
                let why = (!self.hello.families.contains(&f)).then(|| {
                    let name = f.short_name();
                    self.hello.unsupported.get(name).cloned().unwrap_or_else(|| "not declared by the driver".into())
                });
                (f, why)
            })
            .collect()
    }

    fn build(&self, setup: &Setup, device: &Device) -> Result<Box<dyn Trainer>> {
        if !device.is_cpu() {
            return Err(Error::Msg("a driver subject runs where its process runs; ask for the CPU device".into()));
        }
        let dir = self.work.fresh("setup", "");
        wire::write_setup(&dir, setup)?;
        let child = self.child(false)?;
        Ok(Box::new(self.subject(child, "build", json!({"setup": dir}))?))
    }

    fn load(&self, _device: &Device, dir: &Path) -> Result<Box<dyn Trainer>> {
        let child = self.child(true)?;
        Ok(Box::new(self.subject(child, "load", json!({"dir": dir}))?))
    }
}

/// A subject living in a driver process.
pub struct ProcessTrainer {
    child: RefCell<Option<Child>>,
    idle: Rc<RefCell<Vec<Child>>>,
    work: Rc<WorkDir>,
    timeout: Duration,
    vocab: usize,
    trainable: Vec<(String, Vec<usize>)>,
    frozen: Vec<(String, Vec<usize>)>,
}

impl ProcessTrainer {
    fn call(&self, op: &str, request: Value) -> Result<Value> {
        let mut slot = self.child.borrow_mut();
        let child = slot.as_mut().ok_or_else(|| driver_error(op, "the driver is gone", ""))?;
        child.call(op, request, self.timeout)
    }

    fn stderr(&self) -> String {
        self.child.borrow().as_ref().map(Child::stderr_tail).unwrap_or_default()
    }

    fn batch_files(&self, batches: &[Batch]) -> Result<Vec<PathBuf>> {
        batches
            .iter()
            .map(|b| {
                let p = self.work.fresh("batch", ".safetensors");
                wire::write_batch(&p, b)?;
                Ok(p)
            })
            .collect()
    }

    /// A number of the answer; `null` is a non-finite value (JSON has no NaN).
    fn number(&self, op: &str, answer: &Value, key: &str) -> Result<f64> {
        answer
            .get(key)
            .and_then(number_or_nan)
            .ok_or_else(|| driver_error(op, format!("the answer has no number `{key}`: {answer}"), &self.stderr()))
    }

    fn tensors(&self, which: &str) -> Result<Vec<(String, Tensor)>> {
        let op = format!("tensors/{which}");
        let out = self.work.fresh(which, ".safetensors");
        self.call("tensors", json!({"which": which, "out": out}))?;
        let want = if which == "trainable" { &self.trainable } else { &self.frozen };
        let mut got = wire::read_tensors(&op, &out, want, false, &Device::Cpu)?;
        let _ = std::fs::remove_file(&out);
        Ok(want.iter().map(|(n, _)| (strip(n), got.remove(n).expect("checked by read_tensors"))).collect())
    }
}

/// A JSON number, or NaN for `null` (how a driver sends a non-finite value).
fn number_or_nan(v: &Value) -> Option<f64> {
    match v {
        Value::Null => Some(f64::NAN),
        v => v.as_f64(),
    }
}

fn strip(name: &str) -> String {
    name.strip_prefix(PREFIX).unwrap_or(name).to_string()
}

impl Drop for ProcessTrainer {
    fn drop(&mut self) {
        let Some(mut child) = self.child.get_mut().take() else { return };
        // A driver that resets cleanly serves the next build; anything else is stopped.
        let room = self.idle.borrow().len() < MAX_IDLE;
        if room && child.usable() && child.call("reset", json!({}), self.timeout).is_ok() {
            self.idle.borrow_mut().push(child);
        } else {
            child.shutdown();
        }
    }
}

impl Trainer for ProcessTrainer {
    fn logits(&self, ids: &Tensor, mode: Mode) -> Result<Tensor> {
        let (b, s) = ids.dims2()?;
        let rows: Vec<Vec<u32>> = ids.to_vec2::<u32>()?;
        let batch = Batch {
            labels: rows.iter().map(|r| r.iter().map(|&x| x as i64).collect()).collect(),
            ids: rows,
            attention_mask: None,
        };
        let file = self.batch_files(std::slice::from_ref(&batch))?.remove(0);
        let out = self.work.fresh("logits", ".safetensors");
        let mode = match mode {
            Mode::Train => "train",
            Mode::Eval => "eval",
        };
        self.call("logits", json!({"batch": file, "mode": mode, "out": out}))?;
        let want = [("logits".to_string(), vec![b, s, self.vocab])];
        let mut got = wire::read_tensors("logits", &out, &want, false, ids.device())?;
        let _ = std::fs::remove_file(&out);
        Ok(got.remove("logits").expect("checked"))
    }

    fn decode(&self, prompt: &Tensor, new_tokens: usize) -> Result<Vec<Vec<u32>>> {
        crate::model::generate::greedy_with(|ids| self.logits(ids, Mode::Eval), prompt, new_tokens)
    }

    fn cached_logits(&self, _ids: &Tensor, _prefill: usize) -> Result<Option<Tensor>> {
        Ok(None)
    }

    fn gradients(&self, micro: &[Batch]) -> Result<BTreeMap<String, Tensor>> {
        let files = self.batch_files(micro)?;
        let out = self.work.fresh("gradients", ".safetensors");
        self.call("gradients", json!({"batches": files, "out": out}))?;
        let got = wire::read_tensors("gradients", &out, &self.trainable, true, &Device::Cpu)?;
        let _ = std::fs::remove_file(&out);
        Ok(got.into_iter().map(|(n, t)| (strip(&n), t)).collect())
    }

    fn train_step(&mut self, micro: &[Batch]) -> Result<StepReport> {
        let files = self.batch_files(micro)?;
        let a = self.call("step", json!({"batches": files}))?;
        Ok(StepReport {
            loss: self.number("step", &a, "loss")?,
            tokens: self.number("step", &a, "tokens")? as usize,
            grad_norm: self.number("step", &a, "grad_norm")?,
            lr: self.number("step", &a, "lr")?,
        })
    }

    fn eval_loss(&self, batches: &[Batch]) -> Result<f64> {
        let files = self.batch_files(batches)?;
        let a = self.call("eval_loss", json!({"batches": files}))?;
        self.number("eval_loss", &a, "loss")
    }

    fn trainable(&self) -> Vec<(String, Tensor)> {
        // The trait has no error here: a driver failure is surfaced by the next operation
        // that can fail (the driver is then marked broken), and an empty list makes every
        // comparison that needs the tensors fail with a count mismatch.
        self.tensors("trainable").unwrap_or_else(|e| {
            eprintln!("tunecheck: {e}");
            Vec::new()
        })
    }

    fn frozen(&self) -> Vec<(String, Tensor)> {
        self.tensors("frozen").unwrap_or_else(|e| {
            eprintln!("tunecheck: {e}");
            Vec::new()
        })
    }

    fn save(&self, dir: &Path) -> Result<()> {
        self.call("save", json!({"dir": dir}))?;
        Ok(())
    }

    fn fit(&mut self, train: &[Batch], eval: &[Batch], plan: FitPlan) -> Result<History> {
        let (tf, ef) = (self.batch_files(train)?, self.batch_files(eval)?);
        let a =
            self.call("fit", json!({"train": tf, "eval": ef, "epochs": plan.epochs, "max_steps": plan.max_steps}))?;
        let bad = |k: &str| driver_error("fit", format!("`{k}` is not a list of numeric tuples: {a}"), &self.stderr());
        let rows = |k: &str, n: usize| -> Result<Vec<Vec<f64>>> {
            a.get(k)
                .and_then(Value::as_array)
                .ok_or_else(|| bad(k))?
                .iter()
                .map(|r| {
                    r.as_array()
                        .filter(|r| r.len() == n)
                        .and_then(|r| r.iter().map(number_or_nan).collect::<Option<Vec<f64>>>())
                        .ok_or_else(|| bad(k))
                })
                .collect()
        };
        Ok(History {
            train: rows("train", 3)?.into_iter().map(|r| (r[0] as usize, r[1] as usize, r[2])).collect(),
            eval: rows("eval", 2)?.into_iter().map(|r| (r[0] as usize, r[1])).collect(),
        })
    }
}
