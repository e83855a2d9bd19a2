//! What the command line prints: the `check` table and the mutant table ([`check`]), the
//! `inspect` report ([`inspect`]), the README's property table ([`readme`]), JUnit XML for
//! `--junit` ([`junit`]), JSON for `--json` ([`json`]), and the progress lines of `train` and `inspect` on a terminal.
//! Rendering only: every function returns text.

pub mod check;
pub mod inspect;
pub mod junit;
pub mod readme;

/// `value` as pretty-printed JSON (an unserializable value prints as an empty string).
pub fn json(value: &impl serde::Serialize) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default()
}

/// The `train` progress line for a terminal (rewritten in place; a newline after the last
/// step).
pub fn train_progress(step: usize, total: usize, loss: f64) -> String {
    let end = if step == total { "\n" } else { "" };
    format!("\rstep {step:>w$}/{total}  loss {loss:.4}\x1b[K{end}", w = total.to_string().len())
}

/// The `inspect` scan progress line for a terminal, for checkpoints worth waiting for
/// (≥ 64 MiB): rewritten in place when the percentage changes (`shown` holds the last one
/// printed), a newline at the end; empty when there is nothing new to show.
pub fn scan_progress(shown: &mut Option<usize>, file: &std::path::Path, done: usize, total: usize) -> String {
    if total < (64 << 20) {
        return String::new();
    }
    let pct = done * 100 / total.max(1);
    if *shown == Some(pct) && done != total {
        return String::new();
    }
    *shown = Some(pct);
    let name = file.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let end = if done == total { "\n" } else { "" };
    format!(
        "\rscanning {pct:>3}% ({:.2} / {:.2} GiB) {name}\x1b[K{end}",
        done as f64 / 1073741824.0,
        total as f64 / 1073741824.0
    )
}
