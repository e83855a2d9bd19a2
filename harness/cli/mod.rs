//! The commands behind the `tunecheck` binary, as library functions: each validates its
//! input, runs, and returns an [`Outcome`] (what to print and the exit code) or a
//! [`Failure`]. The binary only parses arguments, prints, and maps the result to an exit code
//! in one place.
//!
//! Exit codes: 0 success, 1 a property failed (or a finding, or a driver that would not
//! start), 2 unusable input or arguments.

pub mod check;
pub mod files;

/// What a finished command prints and its exit code.
#[derive(Debug, Default)]
pub struct Outcome {
    /// For stdout (tables, reports, JSON).
    pub stdout: String,
    /// For stderr (the human summary line of a command with `--json` off, or a closing note).
    pub stderr: String,
    /// 0 or 1.
    pub code: u8,
}

impl Outcome {
    /// A finished command's result: the JSON object on stdout with `--json`, else the human
    /// line on stderr.
    pub fn done(json: bool, human: String, value: serde_json::Value) -> Self {
        if json {
            Outcome { stdout: format!("{}\n", crate::report::json(&value)), ..Outcome::default() }
        } else {
            Outcome { stderr: format!("{human}\n"), ..Outcome::default() }
        }
    }

    /// `text` on stdout with exit code `code`.
    pub fn print(text: String, code: u8) -> Self {
        Outcome { stdout: text, stderr: String::new(), code }
    }
}

/// A command that could not finish: its message and exit code.
#[derive(Debug)]
pub struct Failure {
    /// What went wrong (printed after `tunecheck <command>: `).
    pub msg: String,
    /// 1 or 2.
    pub code: u8,
}

impl Failure {
    /// Unusable input or arguments (exit code 2).
    pub fn usage(msg: impl Into<String>) -> Self {
        Failure { msg: msg.into(), code: 2 }
    }

    /// The run itself failed (exit code 1).
    pub fn failed(msg: impl Into<String>) -> Self {
        Failure { msg: msg.into(), code: 1 }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.msg)
    }
}

impl From<crate::Error> for Failure {
    fn from(e: crate::Error) -> Self {
        Failure::usage(e.to_string())
    }
}

impl From<candle_core::Error> for Failure {
    fn from(e: candle_core::Error) -> Self {
        Failure::usage(e.to_string())
    }
}

/// A command's result.
pub type CmdResult = std::result::Result<Outcome, Failure>;

/// Parse a device name (`cpu`, `cuda`, `cuda:N`).
pub fn device(name: &str) -> std::result::Result<candle_core::Device, Failure> {
    crate::device::parse(name).map_err(Failure::usage)
}
