//! `tunecheck check` (the property suite on the reference, a named mutant, every mutant, or an
//! outside trainer behind a driver) and `tunecheck driver` (the reference or a trainer mutant
//! served over the driver protocol).

use std::time::{Duration, Instant};

use crate::cli::{CmdResult, Failure, Outcome};
use crate::props::catalogue::{selects, CATALOGUE};
use crate::props::runner::{PropConfig, Verdict};
use crate::report::check::{mutant_table, progress_mutant, progress_row, progress_subject_row, table};
use crate::spec::Family;
use crate::strategy::AdapterKind;
use crate::suite::{self, MutantRow, Options, Row};

/// Shrinking steps against an outside trainer: a driver rebuilds its subject (a model load)
/// at every step.
pub const DRIVER_SHRINK_ITERS: u32 = 24;

/// Default wall-time budget for shrinking one failure of an outside trainer, in seconds.
pub const DRIVER_SHRINK_SECS: f64 = 180.0;

/// The arguments of `check` (parsed by the `tunecheck` binary; each field's doc is its
/// `--help` text).
#[derive(Debug, Clone, clap::Args)]
pub struct CheckArgs {
    /// Device: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Random cases per family and property.
    #[arg(long, default_value_t = 16)]
    pub cases: u32,
    /// Seed of the case generator (same seed, same cases).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Only these families (llama, gemma, gemma2, gemma3); repeatable. Default: all.
    #[arg(long = "family", value_name = "FAMILY")]
    pub families: Vec<String>,
    /// Only these properties (F1, P1, P2, ..., or `forward` for F1-F3); repeatable. Default: all.
    #[arg(long = "property", value_name = "ID")]
    pub properties: Vec<String>,
    /// Only these adapter kinds for the trainer properties (lora, qlora_nf4, full_embeddings);
    /// repeatable. Default: every kind each property exercises; a property exercising none of
    /// them is shown as skipped.
    #[arg(long = "kind", value_name = "KIND")]
    pub kinds: Vec<String>,
    /// Fail on any skip (a skipped adapter kind, dtype, capability or device).
    #[arg(long)]
    pub strict: bool,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Run each planted-bug mutant against the property that must catch it instead.
    #[arg(long)]
    pub mutants: bool,
    /// Run the property of this one planted-bug mutant against it (what a mutant's replay
    /// line does); exits 1 when the property catches it.
    #[arg(long)]
    pub mutant: Option<String>,
    /// Judge the trainer behind this driver command (the driver protocol, e.g.
    /// "python harness/drivers/transformers_peft.py") instead of the reference: every
    /// trainer property the driver can take; what it cannot is shown as skipped.
    #[arg(long)]
    pub trainer: Option<String>,
    /// Seconds each driver operation may take before the driver is killed and the
    /// property fails (default: $TUNECHECK_DRIVER_TIMEOUT, else 300).
    #[arg(long)]
    pub timeout: Option<f64>,
    /// Seconds shrinking one failure may take; when they run out, the smallest failing
    /// case found so far is reported (default: 180 with --trainer, else no limit).
    #[arg(long, value_name = "SECS")]
    pub shrink_time: Option<f64>,
    /// Compare every row's outcome (pass, skip, fail:<clause>, error) with this file of
    /// known outcomes (lines `property [family] outcome`, # comments): exit 0 when all
    /// match, failures included; 1 naming each change.
    #[arg(long, value_name = "FILE")]
    pub expect: Option<std::path::PathBuf>,
    /// With --expect FILE: write FILE from this run (keeping its comments and the rows this
    /// run did not produce) instead of comparing.
    #[arg(long, requires = "expect")]
    pub bless: bool,
    /// Write the rows as JUnit XML (a testcase per property and family) to FILE.
    #[arg(long, value_name = "FILE")]
    pub junit: Option<std::path::PathBuf>,
    /// Run only partition K of N (K/N): row i of the whole run is in partition (i mod N) + 1,
    /// so the partitions together are exactly the whole run.
    #[arg(long, value_name = "K/N")]
    pub partition: Option<String>,
}

/// `k/n` with 1 ≤ k ≤ n.
pub fn parse_partition(s: &str) -> Result<(usize, usize), Failure> {
    let bad = || Failure::usage(format!("--partition {s}: expected k/n with 1 ≤ k ≤ n (e.g. 2/4)"));
    let (k, n) = s.split_once('/').ok_or_else(bad)?;
    let (k, n) = (k.trim().parse::<usize>().map_err(|_| bad())?, n.trim().parse::<usize>().map_err(|_| bad())?);
    if n == 0 || k == 0 || k > n {
        return Err(bad());
    }
    Ok((k, n))
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
    let mut kinds = Vec::new();
    for k in &a.kinds {
        match AdapterKind::from_name(k) {
            Some(x) if !kinds.contains(&x) => kinds.push(x),
            Some(_) => {}
            None => {
                let names: Vec<&str> = AdapterKind::ALL.iter().map(|k| k.name()).collect();
                return Err(Failure::usage(format!("unknown adapter kind `{k}` ({})", names.join(", "))));
            }
        }
    }
    if !kinds.is_empty() && (a.mutants || a.mutant.is_some()) {
        return Err(Failure::usage("--kind selects the cases of a run's properties; a mutant chooses its own"));
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
    let partition = a.partition.as_deref().map(parse_partition).transpose()?;
    let shrink_secs = match a.shrink_time {
        Some(t) if t.is_finite() && t > 0.0 => Some(t),
        Some(t) => return Err(Failure::usage(format!("--shrink-time {t}: not a positive number of seconds"))),
        None => a.trainer.is_some().then_some(DRIVER_SHRINK_SECS),
    };
    if a.bless && a.expect.is_none() {
        return Err(Failure::usage("--bless writes the file named by --expect FILE; give --expect"));
    }
    if a.mutants && (a.expect.is_some() || a.junit.is_some()) {
        return Err(Failure::usage("--expect and --junit record property rows; --mutants has its own table"));
    }
    let expected = match &a.expect {
        Some(path) if a.bless && !path.exists() => Some(crate::outcomes::Expected::default()),
        Some(path) => Some(crate::outcomes::Expected::read(path)?),
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
        max_shrink_time: shrink_secs.map(Duration::from_secs_f64),
        partition,
        kinds: (!kinds.is_empty()).then_some(kinds),
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
        let total = (0..suite::subject_properties(&opts).len()).filter(|&i| opts.in_partition(i)).count();
        let mut done = 0;
        let rows = suite::run_subject(&factory, &device, &opts, |r: &Row| {
            done += 1;
            say(progress_subject_row(done, total, start.elapsed().as_secs_f64(), r));
        });
        return finish(a, &rows, expected.as_ref(), &format!("tunecheck check: {} {}", h.framework, h.version));
    }
    if a.mutants {
        let all = if named.is_some() { 1 } else { crate::mutants::catalogue().len() };
        let total = (0..all).filter(|&i| opts.in_partition(i)).count();
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
    let subject = a.mutant.as_ref().map_or("reference".to_string(), |m| format!("mutant/{m}"));
    finish(a, &rows, expected.as_ref(), &format!("tunecheck check: {subject}"))
}

/// The run's output and exit code: the table (or JSON), the JUnit file when asked, and with an
/// expected-outcomes file either the comparison (exit 0 when every outcome is as expected,
/// failures included; 1 naming each change) or, with `--bless`, the file rewritten.
fn finish(a: &CheckArgs, rows: &[Row], expected: Option<&crate::outcomes::Expected>, suite_name: &str) -> CmdResult {
    if let Some(path) = &a.junit {
        crate::io::atomic::write_atomic(path, crate::report::junit::render(suite_name, rows).as_bytes())?;
    }
    let mut out = rows_outcome(rows, a.json);
    let (Some(expected), Some(path)) = (expected, &a.expect) else { return Ok(out) };
    if a.bless {
        let blessed = expected.blessed(rows);
        crate::io::atomic::write_atomic(path, blessed.render().as_bytes())?;
        out.stderr.push_str(&format!(
            "tunecheck check: wrote {} ({} rows from this run)\n",
            path.display(),
            rows.len()
        ));
        out.code = u8::from(rows.is_empty());
        return Ok(out);
    }
    let changes = expected.changes(rows);
    let not_run = expected.not_run(rows);
    if !not_run.is_empty() {
        let names: Vec<String> =
            not_run.iter().map(|(p, f)| if f == "all" { p.clone() } else { format!("{p} {f}") }).collect();
        out.stderr.push_str(&format!(
            "tunecheck check: {} expected outcome(s) not run here (filtered, or in another partition): {}\n",
            names.len(),
            names.join(", ")
        ));
    }
    if changes.is_empty() {
        out.stderr.push_str(&format!(
            "tunecheck check: every outcome as expected in {} ({} rows)\n",
            path.display(),
            rows.len()
        ));
        out.code = u8::from(rows.is_empty());
    } else {
        out.stderr.push_str(&format!(
            "tunecheck check: {} outcome(s) changed from {}:\n",
            changes.len(),
            path.display()
        ));
        for c in &changes {
            out.stderr.push_str(&format!("  {c}\n"));
        }
        out.code = 1;
    }
    Ok(out)
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
