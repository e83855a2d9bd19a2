//! Known outcomes: what a framework's CI pins. Each row of a `check` run has a one-word
//! outcome — `pass`, `skip`, `fail:<clause>` or `error` — and an expected-outcomes file lists
//! them, one row per line:
//!
//! ```text
//! # transformers + PEFT neither refuse nor fix untrained rows (comments are kept by --bless)
//! P14     fail:not_fixed
//! P1      pass
//! F1      llama   pass        # a row of one family: property, family, outcome
//! ```
//!
//! `check --expect FILE` compares a run with the file and succeeds when every row that ran
//! has its expected outcome (failures included: a known finding is not a regression), naming
//! each change otherwise; `--bless` writes the file from the run, keeping the comments above
//! each entry and the entries of rows this run did not produce (another `--partition`, a
//! filtered `--property`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use crate::error::{Error, Result};
use crate::props::runner::{FailReason, Verdict};
use crate::suite::Row;

/// A row's one-word outcome.
pub fn outcome(v: &Verdict) -> String {
    match v {
        Verdict::Passed { .. } => "pass".into(),
        Verdict::Skipped { .. } => "skip".into(),
        Verdict::Failed { reason: FailReason::Violated { code, .. }, .. } => format!("fail:{code}"),
        Verdict::Failed { .. } => "error".into(),
    }
}

/// A row's key: (property id, family; `all` for rows over every family).
pub type Key = (String, String);

/// The key of `row`.
pub fn key(row: &Row) -> Key {
    (row.property.to_string(), row.family.clone())
}

/// One entry of an expected-outcomes file, with the comment lines above it.
#[derive(Debug, Clone, PartialEq)]
struct Entry {
    key: Key,
    outcome: String,
    comments: Vec<String>,
}

/// An expected-outcomes file.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Expected {
    entries: Vec<Entry>,
    /// Comment lines after the last entry.
    trailing: Vec<String>,
}

fn valid_outcome(o: &str) -> bool {
    matches!(o, "pass" | "skip" | "error")
        || o.strip_prefix("fail:")
            .is_some_and(|c| !c.is_empty() && c.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_'))
}

impl Expected {
    /// Parse the text of `path`; an unknown property, family or outcome, a malformed line or
    /// a duplicate row is an error naming the file and line.
    pub fn parse(text: &str, path: &Path) -> Result<Expected> {
        let bad =
            |n: usize, msg: String| Error::Config { file: Some(path.to_path_buf()), field: format!("line {n}"), msg };
        let mut entries: Vec<Entry> = Vec::new();
        let mut pending = Vec::new();
        let mut seen = BTreeSet::new();
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let content = line.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                if line.trim_start().starts_with('#') {
                    pending.push(line.to_string());
                }
                continue;
            }
            let words: Vec<&str> = content.split_whitespace().collect();
            let (prop, family, outcome) = match words.as_slice() {
                [p, o] => (*p, "all", *o),
                [p, f, o] => (*p, *f, *o),
                _ => return Err(bad(n, format!("`{content}` is not `property [family] outcome`"))),
            };
            let Some(p) = crate::props::catalogue::by_id(prop) else {
                return Err(bad(n, format!("unknown property `{prop}`")));
            };
            if family != "all" && crate::spec::Family::from_name(family).is_none() {
                return Err(bad(n, format!("unknown family `{family}` (all, llama, gemma, gemma2, gemma3)")));
            }
            if !valid_outcome(outcome) {
                return Err(bad(n, format!("`{outcome}` is not pass, skip, error or fail:<clause>")));
            }
            let key = (p.id.to_string(), family.to_string());
            if !seen.insert(key.clone()) {
                return Err(bad(n, format!("a second line for {} {}", key.0, key.1)));
            }
            entries.push(Entry { key, outcome: outcome.to_string(), comments: std::mem::take(&mut pending) });
        }
        Ok(Expected { entries, trailing: pending })
    }

    /// Read and parse `path`.
    pub fn read(path: &Path) -> Result<Expected> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Expected::parse(&text, path)
    }

    /// The expected outcome of `key`, if listed.
    pub fn get(&self, key: &Key) -> Option<&str> {
        self.entries.iter().find(|e| &e.key == key).map(|e| e.outcome.as_str())
    }

    /// Every change of `rows` against the file, one line each with the row's detail: an
    /// outcome that differs, and a row the file does not list.
    pub fn changes(&self, rows: &[Row]) -> Vec<String> {
        let mut out = Vec::new();
        for r in rows {
            let k = key(r);
            let got = outcome(&r.verdict);
            let label = if k.1 == "all" { k.0.clone() } else { format!("{} {}", k.0, k.1) };
            match self.get(&k) {
                Some(want) if want == got => {}
                Some(want) => out.push(format!("{label}: expected {want}, got {got}{}", detail(&r.verdict))),
                None => out.push(format!("{label}: not in the expected outcomes, got {got}{}", detail(&r.verdict))),
            }
        }
        out
    }

    /// Entries whose rows `rows` does not contain (run elsewhere, or not selected here).
    pub fn not_run(&self, rows: &[Row]) -> Vec<Key> {
        let ran: BTreeSet<Key> = rows.iter().map(key).collect();
        self.entries.iter().filter(|e| !ran.contains(&e.key)).map(|e| e.key.clone()).collect()
    }

    /// This file updated from `rows`: each row's outcome (new rows appended in run order), the
    /// comments above kept entries, and the entries of rows not run kept as they were.
    /// A file of comments only (a new file's header) keeps them above its first row.
    pub fn blessed(&self, rows: &[Row]) -> Expected {
        let mut entries = self.entries.clone();
        let mut trailing = self.trailing.clone();
        if entries.is_empty() && !rows.is_empty() {
            let header = std::mem::take(&mut trailing);
            entries.push(Entry { key: key(&rows[0]), outcome: outcome(&rows[0].verdict), comments: header });
        }
        for r in rows {
            let k = key(r);
            let o = outcome(&r.verdict);
            match entries.iter_mut().find(|e| e.key == k) {
                Some(e) => e.outcome = o,
                None => entries.push(Entry { key: k, outcome: o, comments: Vec::new() }),
            }
        }
        Expected { entries, trailing }
    }

    /// The file's text.
    pub fn render(&self) -> String {
        let mut s = String::new();
        for e in &self.entries {
            for c in &e.comments {
                s.push_str(c);
                s.push('\n');
            }
            if e.key.1 == "all" {
                s.push_str(&format!("{}\t{}\n", e.key.0, e.outcome));
            } else {
                s.push_str(&format!("{}\t{}\t{}\n", e.key.0, e.key.1, e.outcome));
            }
        }
        for c in &self.trailing {
            s.push_str(c);
            s.push('\n');
        }
        s
    }

    /// The outcomes by key (for tests and reports).
    pub fn outcomes(&self) -> BTreeMap<Key, String> {
        self.entries.iter().map(|e| (e.key.clone(), e.outcome.clone())).collect()
    }
}

fn detail(v: &Verdict) -> String {
    match v {
        Verdict::Failed { detail, replay, .. } => {
            let first = detail.lines().next().unwrap_or("");
            match replay {
                Some(r) => format!(" — {first}\n    replay: {r}"),
                None => format!(" — {first}"),
            }
        }
        Verdict::Skipped { reason } => format!(" — {reason}"),
        Verdict::Passed { .. } => String::new(),
    }
}
