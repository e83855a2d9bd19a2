//! `tunecheck check`'s report for a terminal: the table of property rows, the mutant table,
//! every skip and failure spelled out with its minimal case and replay line, and the one-line
//! progress entries printed while the suite runs. Columns are as wide as their content.

use crate::props::runner::Verdict;
use crate::suite::{MutantRow, Row};

/// The progress line of one finished row: `[ 3/24]   12.5s  llama   P1   pass`.
pub fn progress_row(done: usize, total: usize, secs: f64, r: &Row) -> String {
    format!("[{done:>2}/{total}] {secs:6.1}s  {:<7} {:<14} {}", r.family, r.property, r.verdict.word())
}

/// The progress line of one property against an outside trainer.
pub fn progress_subject_row(done: usize, total: usize, secs: f64, r: &Row) -> String {
    format!("[{done:>2}/{total}] {secs:6.1}s  {:<14} {}", r.property, r.verdict.word())
}

/// The progress line of one finished mutant.
pub fn progress_mutant(done: usize, total: usize, secs: f64, r: &MutantRow) -> String {
    format!("[{done:>2}/{total}] {secs:6.1}s  {:<36} {}", r.mutant, if r.caught { "caught" } else { "MISSED" })
}

/// The widest of `cells` (in characters), at least `min`: columns fit their content.
fn width<'a>(cells: impl Iterator<Item = &'a str>, min: usize) -> usize {
    cells.map(|c| c.chars().count()).max().unwrap_or(0).max(min)
}

fn pad(s: &str, width: usize) -> String {
    let n = s.chars().count();
    if n >= width {
        s.to_string()
    } else {
        format!("{s}{}", " ".repeat(width - n))
    }
}

/// A fixed-width table of rows for a terminal, with every skip and failure spelled out.
pub fn table(rows: &[Row]) -> String {
    let family_w = width(rows.iter().map(|r| r.family.as_str()), 8);
    let id_w = width(rows.iter().map(|r| r.property), 4);
    let title_w = width(rows.iter().map(|r| r.title), 8);
    let mut s = format!(
        "{} {} {} {:>6}  {}\n",
        pad("family", family_w),
        pad("id", id_w),
        pad("property", title_w),
        "cases",
        "result"
    );
    s.push_str(&format!("{}\n", "-".repeat(family_w + 1 + id_w + 1 + title_w + 1 + 6 + 2 + 6)));
    for r in rows {
        s.push_str(&format!(
            "{} {} {} {:>6}  {}\n",
            pad(&r.family, family_w),
            pad(r.property, id_w),
            pad(r.title, title_w),
            r.verdict.cases_run(),
            r.verdict.word()
        ));
    }
    let failed = rows.iter().filter(|r| r.verdict.failed()).count();
    let skipped = rows.iter().filter(|r| matches!(r.verdict, Verdict::Skipped { .. })).count();
    let passed = rows.len() - failed - skipped;
    s.push_str(&format!("\n{passed} passed, {failed} failed, {skipped} skipped\n"));
    for r in rows {
        for why in r.verdict.skips() {
            s.push_str(&format!("skip {} / {}: {why}\n", r.family, r.property));
        }
    }
    let measured: Vec<(&Row, &crate::props::tolerance::Measured)> =
        rows.iter().flat_map(|r| r.verdict.measured().iter().map(move |m| (r, m))).collect();
    if !measured.is_empty() {
        s.push_str("\nmeasured on the passing cases (worst value / its bound there):\n");
        for (r, m) in measured {
            s.push_str(&format!("  {} {} {}\n", pad(&r.family, family_w), pad(r.property, id_w), m.line()));
        }
    }
    for r in rows {
        if let Verdict::Failed { detail, minimal, replay, cases_run, .. } = &r.verdict {
            s.push_str(&format!("\nFAIL {} / {} after {cases_run} case(s): {detail}\n", r.family, r.property));
            for line in failure_lines(minimal, replay.as_deref()) {
                s.push_str(&format!("  {line}\n"));
            }
        }
    }
    s
}

/// What a failure report adds to its detail: the minimal setup in short, the whole minimal
/// case, and the replay line (each when known).
pub fn failure_lines(minimal: &serde_json::Value, replay: Option<&str>) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(summary) = summarize(minimal) {
        out.push(format!("minimal setup: {summary}"));
    }
    if !minimal.is_null() {
        out.push(format!("minimal case: {minimal}"));
    }
    if let Some(line) = replay {
        out.push(format!("replay: {line}"));
    }
    out
}

/// A table of mutant outcomes.
pub fn mutant_table(rows: &[MutantRow]) -> String {
    let name_w = width(rows.iter().map(|r| r.mutant), 8);
    let family_w = width(rows.iter().map(|r| r.family.as_str()), 8);
    let id_w = width(rows.iter().map(|r| r.property), 8);
    let code_w = width(rows.iter().map(|r| r.expected_code.unwrap_or("(any)")), 8);
    let mut s = format!(
        "{} {} {} {}  {}\n",
        pad("mutant", name_w),
        pad("family", family_w),
        pad("property", id_w),
        pad("expected", code_w),
        "result"
    );
    s.push_str(&format!("{}\n", "-".repeat(name_w + 1 + family_w + 1 + id_w + 1 + code_w + 2 + 6)));
    for r in rows {
        s.push_str(&format!(
            "{} {} {} {}  {}\n",
            pad(r.mutant, name_w),
            pad(&r.family, family_w),
            pad(r.property, id_w),
            pad(r.expected_code.unwrap_or("(any)"), code_w),
            if r.caught { "caught" } else { "MISSED" }
        ));
    }
    let caught = rows.iter().filter(|r| r.caught).count();
    s.push_str(&format!("\n{caught}/{} mutants caught\n", rows.len()));
    for r in rows {
        s.push_str(&format!("\n{} ({}):\n", r.mutant, r.bug));
        match &r.verdict {
            Verdict::Failed { detail, minimal, replay, .. } => {
                if !r.caught {
                    s.push_str("  NOT CAUGHT for the expected reason:\n");
                }
                s.push_str(&format!("  {detail}\n"));
                if let Some(summary) = summarize(minimal) {
                    s.push_str(&format!("  minimal setup: {summary}\n"));
                }
                if let Some(line) = replay {
                    s.push_str(&format!("  replay: {line}\n"));
                }
            }
            other => s.push_str(&format!("  NOT CAUGHT: the property {} on this mutant\n", other.word())),
        }
    }
    s
}

/// One line for a minimal counterexample: model sizes and dtype, and adapter when present.
pub fn summarize(v: &serde_json::Value) -> Option<String> {
    let cfg = v.get("config")?;
    let model = format!(
        "{} {} layers={} hidden={} heads={}/{} head_dim={} vocab={}",
        cfg.get("model_type")?.as_str()?,
        cfg.get("torch_dtype").or_else(|| cfg.get("dtype")).and_then(|d| d.as_str()).unwrap_or("?"),
        cfg.get("num_hidden_layers")?,
        cfg.get("hidden_size")?,
        cfg.get("num_attention_heads")?,
        cfg.get("num_key_value_heads")?,
        cfg.get("head_dim")?,
        cfg.get("vocab_size")?
    );
    Some(match v.get("lora") {
        Some(l) => {
            let quant = v.get("quantization_config").filter(|q| !q.is_null()).map_or("none".to_string(), |q| {
                format!(
                    "{} compute {}",
                    q["bnb_4bit_quant_type"].as_str().unwrap_or("?"),
                    q["bnb_4bit_compute_dtype"].as_str().unwrap_or("?")
                )
            });
            let mut s = format!(
                "{model}; lora r={} targets={} save={}; 4-bit={quant}; grad_accum={}",
                l["r"], l["target_modules"], l["modules_to_save"], v["grad_accum"]
            );
            if let Some(r) = v.get("recipe") {
                s.push_str(&format!(
                    "; lr={} wd={} betas=({}, {}) eps={} warmup={} min_lr_ratio={} total={} clip={} dropout={}",
                    r["learning_rate"],
                    r["weight_decay"],
                    r["adam_beta1"],
                    r["adam_beta2"],
                    r["adam_epsilon"],
                    r["warmup_steps"],
                    r["min_lr_ratio"],
                    r["total_steps"],
                    r["max_grad_norm"],
                    r["lora_dropout"]
                ));
            }
            s
        }
        None => model,
    })
}
