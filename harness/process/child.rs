//! One driver process: spawned from a command line in its own process group, spoken to in
//! JSON lines over stdin/stdout with a deadline per request, its stderr kept (the tail) to be
//! shown with any failure. Dropping a [`Child`] kills its whole process group and reaps it, so
//! a driver that forks helpers leaves nothing behind; on Linux the driver also dies with
//! tunecheck (parent-death signal), even under `kill -9`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::process::{ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::error::{Error, Result};

/// Bytes of the driver's stderr kept for failure reports.
const STDERR_KEEP: usize = 16 * 1024;

/// A failure of the driver, naming the operation, with the driver's recent stderr.
pub fn driver_error(op: &str, msg: impl std::fmt::Display, stderr: &str) -> Error {
    let stderr = stderr.trim_end();
    let msg = if stderr.is_empty() {
        format!("{msg} (the driver wrote nothing to stderr)")
    } else {
        format!("{msg}\n--- driver stderr (last lines) ---\n{stderr}")
    };
    Error::Driver { op: op.to_string(), msg }
}

/// A running driver.
pub struct Child {
    command: String,
    process: std::process::Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<std::io::Result<String>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    next_id: u64,
    /// Set once the driver broke the protocol, died or timed out: it is not asked again.
    broken: bool,
    /// The work directory handed to the driver, removed once its process group is dead.
    work: Option<std::path::PathBuf>,
}

impl Child {
    /// Start `command` (split like a shell would, without running a shell; no pipes or
    /// redirections) with `env` added to its environment.
    pub fn spawn(command: &str, env: &[(&str, String)]) -> Result<Child> {
        let words = shell_words::split(command)
            .map_err(|e| Error::field("--trainer", format!("cannot split `{command}` into words: {e}")))?;
        let (program, args) =
            words.split_first().ok_or_else(|| Error::field("--trainer", "the driver command is empty"))?;
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
        for (k, v) in env {
            cmd.env(k, v);
        }
        #[cfg(target_os = "linux")]
        // SAFETY: `prctl` is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut process = cmd
            .spawn()
            .map_err(|e| Error::Msg(format!("driver: cannot start `{command}`: {e} (is `{program}` on PATH?)")))?;
        let stdout = process.stdout.take().expect("stdout is piped");
        let stderr_pipe = process.stderr.take().expect("stderr is piped");
        let (tx, lines) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let end = line.is_err();
                if tx.send(line).is_err() || end {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stderr_pipe);
            let mut buf = Vec::new();
            while r.read_until(b'\n', &mut buf).map(|n| n > 0).unwrap_or(false) {
                let mut s = sink.lock().unwrap_or_else(|p| p.into_inner());
                s.extend_from_slice(&buf);
                if s.len() > 2 * STDERR_KEEP {
                    let cut = s.len() - STDERR_KEEP;
                    s.drain(..cut);
                }
                buf.clear();
            }
        });
        let stdin = process.stdin.take();
        Ok(Child { command: command.to_string(), process, stdin, lines, stderr, next_id: 0, broken: false, work: None })
    }

    /// Take ownership of `dir` (the work directory given to the driver): it is removed after
    /// the driver's process group is killed, whether the driver ended cleanly or not.
    pub fn own_dir(&mut self, dir: std::path::PathBuf) {
        self.work = Some(dir);
    }

    /// The command line the driver was started with.
    pub fn command(&self) -> &str {
        &self.command
    }

    /// The last lines of the driver's stderr.
    pub fn stderr_tail(&self) -> String {
        let s = self.stderr.lock().unwrap_or_else(|p| p.into_inner());
        let start = s.len().saturating_sub(STDERR_KEEP);
        let text = String::from_utf8_lossy(&s[start..]).into_owned();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// Whether the driver may still be asked (it has not failed the protocol).
    pub fn usable(&self) -> bool {
        !self.broken
    }

    /// Send `request` (an object; `id` is added) and wait up to `timeout` for the answer with
    /// the same id. An answer `{"ok": false, "error": ...}` is returned as an error naming the
    /// operation; so are a dead driver, a line that is not JSON, a wrong id and a timeout (the
    /// driver is then killed).
    pub fn call(&mut self, op: &str, mut request: Value, timeout: Duration) -> Result<Value> {
        if self.broken {
            return Err(driver_error(op, "the driver failed an earlier operation and was stopped", ""));
        }
        let answer = self.exchange(op, &mut request, timeout);
        if answer.is_err() {
            self.broken = true;
            self.kill();
        }
        let answer = answer?;
        match answer.get("ok") {
            Some(Value::Bool(true)) => Ok(answer),
            Some(Value::Bool(false)) => Err(crate::process::wire::refusal(&answer).unwrap_or_else(|| {
                let msg = answer.get("error").and_then(Value::as_str).unwrap_or("(no `error` message)");
                driver_error(op, format!("the driver reported an error: {msg}"), &self.stderr_tail())
            })),
            _ => {
                self.broken = true;
                self.kill();
                Err(driver_error(op, format!("answer has no boolean `ok`: {answer}"), &self.stderr_tail()))
            }
        }
    }

    fn exchange(&mut self, op: &str, request: &mut Value, timeout: Duration) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let obj = request.as_object_mut().expect("requests are JSON objects");
        obj.insert("id".into(), id.into());
        obj.insert("op".into(), op.into());
        let mut line = request.to_string();
        line.push('\n');
        let write = self.stdin.as_mut().map(|w| w.write_all(line.as_bytes()).and_then(|()| w.flush()));
        if let Some(Err(e)) = write {
            let status = self.wait_briefly();
            return Err(driver_error(op, format!("cannot send the request ({e}); {status}"), &self.stderr_tail()));
        }
        match self.lines.recv_timeout(timeout) {
            Ok(Ok(text)) => {
                let v: Value = serde_json::from_str(&text).map_err(|e| {
                    driver_error(
                        op,
                        format!("the driver wrote a line that is not protocol JSON ({e}): `{}`", clip(&text, 200)),
                        &self.stderr_tail(),
                    )
                })?;
                match v.get("id").and_then(Value::as_u64) {
                    Some(got) if got == id => Ok(v),
                    got => Err(driver_error(
                        op,
                        format!("answer id {got:?} does not match request id {id}: `{}`", clip(&text, 200)),
                        &self.stderr_tail(),
                    )),
                }
            }
            Ok(Err(e)) => Err(driver_error(op, format!("reading the driver's stdout: {e}"), &self.stderr_tail())),
            Err(RecvTimeoutError::Timeout) => {
                self.kill();
                Err(driver_error(
                    op,
                    format!("no answer within {:.0} s (timeout); the driver was killed", timeout.as_secs_f64()),
                    &self.stderr_tail(),
                ))
            }
            Err(RecvTimeoutError::Disconnected) => {
                let status = self.wait_briefly();
                Err(driver_error(op, format!("the driver closed stdout: {status}"), &self.stderr_tail()))
            }
        }
    }

    /// Wait up to 2 s for the driver's exit status (then kill it), as text for reports.
    fn wait_briefly(&mut self) -> String {
        let until = Instant::now() + Duration::from_secs(2);
        loop {
            match self.process.try_wait() {
                Ok(Some(st)) => {
                    // Give the stderr reader a moment to drain what the driver wrote last.
                    std::thread::sleep(Duration::from_millis(50));
                    return format!("it exited with {st}");
                }
                Ok(None) if Instant::now() < until => std::thread::sleep(Duration::from_millis(20)),
                _ => {
                    self.kill();
                    return "it stopped answering and was killed".into();
                }
            }
        }
    }

    /// Kill the driver's process group and reap the driver.
    fn kill(&mut self) {
        self.stdin = None;
        let pid = self.process.id() as i32;
        // SAFETY: plain syscall; the group id is the driver's pid (it was spawned as leader).
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
        let _ = self.process.kill();
        let _ = self.process.wait();
    }

    /// Ask the driver to exit (bounded wait), then kill what is left of its group.
    pub fn shutdown(mut self) {
        if !self.broken {
            let _ = self.exchange("shutdown", &mut serde_json::json!({}), Duration::from_secs(5));
        }
        self.kill();
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.kill();
        if let Some(dir) = self.work.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(n).collect::<String>())
    }
}
