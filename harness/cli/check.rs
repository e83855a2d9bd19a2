//! `tunecheck check` (the property suite on the reference, a named mutant, every mutant, or an
//! outside trainer behind a driver) and `tunecheck driver` (the reference or a trainer mutant
//! served over the driver protocol).

use std::time::{Duration, Instant};

use crate::cli::{CmdResult, Failure, Outcome};
use crate::props::catalogue::{selects, CATALOGUE};
use crate::props::runner::{PropConfig, Verdict};
use crate::report::check::{mutant_table, progress_mutant, progress_row, progress_subject_row, table};
use crate::spec::Family;
use crate::suite::{self, MutantRow, Options, Row};

/// Shrinking steps against an outside trainer: a driver rebuilds its subject (a model load)
/// at every step.
pub const DRIVER_SHRINK_ITERS: u32 = 24;

/// The arguments of `check`.
#[derive(Debug, Clone)]
pub struct CheckArgs {
    /// Device name.
    pub device: String,
    /// Random cases per family and property.
    pub cases: u32,
    /// Seed of the case generator.
    pub seed: u64,
    /// Family names (empty: all).
    pub families: Vec<String>,
    /// Property ids or `forward` (empty: all).
    pub properties: Vec<String>,
    /// Fail on any skip.
    pub strict: bool,
    /// JSON instead of a table.
    pub json: bool,
    /// Run every planted-bug mutant against its property.
    pub mutants: bool,
    /// Run this one mutant as the subject.
    pub mutant: Option<String>,
    /// A driver command to judge instead of the reference.
    pub trainer: Option<String>,
    /// Seconds each driver operation may take.
    pub timeout: Option<f64>,
}

/// Run `check`; `progress` receives one line per finished row (none with `--json`).
pub fn check(a: &CheckArgs, progress: &mut dyn FnMut(&str)) -> CmdResult {
    let device = crate::cli::device(&a.device)?;
    if a.cases == 0 {
        return Err(Failure::usage("--cases 0 runs nothing: a property that runs no case has not been checked"));
    }
    let mut families = Vec::new();
    for f in &a.families {
        match Family::from_name(f) {
            Some(x) => families.push(x),
            None => return Err(Failure::usage(format!("unknown family `{f}` (llama, gemma, gemma2, gemma3)"))),
        }
    }
    if families.is_empty() {
        families = Family::ALL.to_vec();
    }
    for p in &a.properties {
        if !CATALOGUE.iter().any(|e| selects(p, e)) {
            let ids: Vec<&str> = CATALOGUE.iter().map(|p| p.id).collect();
            return Err(Failure::usage(format!("unknown property `{p}` (forward, {})", ids.join(", "))));
        }
    }
    let named = match &a.mutant {
        Some(n) => Some(crate::mutants::by_name(n).ok_or_else(|| {
            let names: Vec<&str> = crate::mutants::catalogue().iter().map(|m| m.name).collect();
            Failure::usage(format!("unknown mutant `{n}` ({})", names.join(", ")))
        })?),
        None => None,
    };
    let opts = Options {
        cases: a.cases,
        seed: a.seed,
        families,
        properties: a.properties.clone(),
        strict: a.strict,
        mutant: a.mutant.clone(),
        max_shrink_iters: if a.trainer.is_some() {
            DRIVER_SHRINK_ITERS
        } else {
            PropConfig::default().max_shrink_iters
        },
    };
    let start = Instant::now();
    let mut say = |line: String| {
        if !a.json {
            progress(&line);
        }
    };
    if let Some(cmd) = &a.trainer {
        if a.mutants || named.is_some() {
            return Err(Failure::usage(
                "--trainer judges an outside trainer; it cannot be combined with --mutants or --mutant",
            ));
        }
        if !device.is_cpu() {
            return Err(Failure::usage("--trainer runs where the driver runs; use --device cpu"));
        }
        let timeout = match a.timeout {
            Some(t) if t.is_finite() && t > 0.0 => Duration::from_secs_f64(t),
            Some(t) => return Err(Failure::usage(format!("--timeout {t}: not a positive number of seconds"))),
            None => crate::process::ProcessFactory::timeout_from_env()?,
        };
        let factory =
            crate::process::ProcessFactory::start(cmd, timeout).map_err(|e| Failure::failed(e.to_string()))?;
        let h = factory.hello();
        say(format!("subject: {} {} via `{cmd}`", h.framework, h.version));
        let total = suite::subject_properties(&opts).len();
        let mut done = 0;
        let rows = suite::run_subject(&factory, &device, &opts, |r: &Row| {
            done += 1;
            say(progress_subject_row(done, total, start.elapsed().as_secs_f64(), r));
        });
        return Ok(rows_outcome(&rows, a.json));
    }
    if a.mutants {
        let total = if named.is_some() { 1 } else { crate::mutants::catalogue().len() };
        let mut done = 0;
        let rows = suite::run_mutants(&device, &opts, |r: &MutantRow| {
            done += 1;
            say(progress_mutant(done, total, start.elapsed().as_secs_f64(), r));
        });
        let text = if a.json { format!("{}\n", crate::report::json(&rows)) } else { mutant_table(&rows) };
        return Ok(Outcome::print(text, u8::from(!rows.iter().all(|r| r.caught))));
    }
    let rows = match named {
        Some(m) => suite::run_as_subject(&m, &device, &opts),
        None => {
            let total = suite::row_count(&opts);
            let mut done = 0;
            suite::run(&device, &opts, |r: &Row| {
                done += 1;
                say(progress_row(done, total, start.elapsed().as_secs_f64(), r));
            })
        }
    };
    Ok(rows_outcome(&rows, a.json))
}

/// The table (or JSON) of `rows`; exit code 1 when a row failed or none ran.
fn rows_outcome(rows: &[Row], json: bool) -> Outcome {
    let text = if json { format!("{}\n", crate::report::json(&rows)) } else { table(rows) };
    if rows.is_empty() {
        return Outcome { stdout: text, stderr: "tunecheck check: no property was selected\n".into(), code: 1 };
    }
    let ok = rows.iter().all(|r| r.verdict.passed() || matches!(r.verdict, Verdict::Skipped { .. }));
    Outcome::print(text, u8::from(!ok))
}

/// Serve the reference (or the trainer mutant `mutant`) over the driver protocol on
/// stdin/stdout, misbehaving as `faults` ask.
pub fn driver(mutant: Option<&str>, faults: &[String]) -> CmdResult {
    let faults = faults
        .iter()
        .map(|f| f.parse::<crate::process::serve::DriverFault>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| Failure::usage(e.to_string()))?;
    let result = match mutant {
        None => crate::process::serve::serve(&crate::subject::Reference, faults),
        Some(n) => match crate::mutants::catalogue().iter().filter(|m| m.name == n).find_map(|m| m.trainer_bug()) {
            Some(bug) => crate::process::serve::serve(&crate::mutants::Mutant(bug), faults),
            None => {
                let names: Vec<&str> =
                    crate::mutants::catalogue().iter().filter(|m| m.trainer_bug().is_some()).map(|m| m.name).collect();
                return Err(Failure::usage(format!("`{n}` is not a trainer mutant ({})", names.join(", "))));
            }
        },
    };
    result.map(|()| Outcome::default()).map_err(|e| Failure::failed(e.to_string()))
}
