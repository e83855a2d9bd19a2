//! The crate's error type: every failure names the file, tensor or field it is about.

use std::path::{Path, PathBuf};

/// Errors from tunecheck. Bad input is always reported with the file and the key or field
/// that is wrong; tunecheck never panics on input it reads.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A spec or `config.json` field is missing, malformed or inconsistent.
    #[error("{}: field `{field}`: {msg}", display_path(.file))]
    Config {
        /// The config file, or `None` for a spec built in code.
        file: Option<PathBuf>,
        /// The field (JSON key) at fault.
        field: String,
        /// What is wrong with it.
        msg: String,
    },
    /// A checkpoint tensor is missing, unexpected, of the wrong shape or dtype, or unreadable.
    #[error("{}: tensor `{key}`: {msg}", .file.display())]
    Tensor {
        /// The file that holds (or should hold) the tensor.
        file: PathBuf,
        /// The tensor name.
        key: String,
        /// What is wrong with it.
        msg: String,
    },
    /// A file could not be parsed as a whole (bad header, bad JSON, ...).
    #[error("{}: {msg}", .file.display())]
    File {
        /// The file at fault.
        file: PathBuf,
        /// What is wrong with it.
        msg: String,
    },
    /// An operating-system error on a path.
    #[error("{}: {source}", .path.display())]
    Io {
        /// The path the operation was on.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// An error from candle while computing.
    #[error("candle: {0}")]
    Candle(#[from] candle_core::Error),
    /// A batch holds untrained tokens (all-zero rows of `embed_tokens`/`lm_head`) while those
    /// rows are frozen: training on them would give a silent NaN or a model that never learns
    /// them, so the trainer refuses.
    #[error(
        "the batch contains untrained tokens {ids:?} (all-zero rows of embed_tokens/lm_head) while embed_tokens \
         and lm_head are frozen: their gradients cannot fix them. Make embed_tokens/lm_head trainable \
         (modules_to_save), fix the rows (UntrainedPolicy::FixMean), or remove the tokens"
    )]
    UntrainedTokens {
        /// The untrained ids found in the batch, ascending.
        ids: Vec<u32>,
    },
    /// Training produced a non-finite number (loss or gradient norm) at an optimizer step.
    #[error("non-finite {what} {value} at optimizer step {step}")]
    NonFinite {
        /// `loss` or `gradient norm`.
        what: &'static str,
        /// The value (NaN or ±inf).
        value: f64,
        /// The optimizer step (0-based) that produced it.
        step: usize,
    },
    /// A trainer in another process (a driver) failed an operation: it died, hung past the
    /// timeout, broke the protocol, wrote a missing or wrongly shaped file, or reported an
    /// error. `msg` carries the driver's last stderr lines.
    #[error("driver, operation `{op}`: {msg}")]
    Driver {
        /// The protocol operation (`build`, `step`, ...).
        op: String,
        /// What went wrong, with the driver's stderr.
        msg: String,
    },
    /// The subject cannot take this case (a framework version's own limit on a configuration,
    /// e.g. heads that do not divide the hidden size): the case is set aside and the reason
    /// shown as a skip, never counted as run.
    #[error("the subject cannot take this case: {what}")]
    Unsupported {
        /// Why, in the subject's words.
        what: String,
    },
    /// Anything else, with a message that says what and where.
    #[error("{0}")]
    Msg(String),
}

fn display_path(p: &Option<PathBuf>) -> String {
    match p {
        Some(p) => p.display().to_string(),
        None => "config".to_string(),
    }
}

impl Error {
    /// A config error on a spec built in code (no file).
    pub fn field(field: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Config { file: None, field: field.into(), msg: msg.into() }
    }

    /// Attach a file to a config error that has none.
    pub fn in_file(self, path: &Path) -> Self {
        match self {
            Error::Config { file: None, field, msg } => Error::Config { file: Some(path.to_path_buf()), field, msg },
            other => other,
        }
    }

    /// An I/O error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        Error::Io { path: path.to_path_buf(), source }
    }

    /// A tensor-level error in `file`.
    pub fn tensor(file: &Path, key: impl Into<String>, msg: impl Into<String>) -> Self {
        Error::Tensor { file: file.to_path_buf(), key: key.into(), msg: msg.into() }
    }

    /// A whole-file error.
    pub fn file(file: &Path, msg: impl Into<String>) -> Self {
        Error::File { file: file.to_path_buf(), msg: msg.into() }
    }
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
