//! The suite behind `tunecheck check`: every catalogue property — the forward properties of
//! tunecheck's model once per family, the others against a subject factory (the reference, or
//! a named mutant) — each reported as a row with an honest [`Verdict`], the
//! cases that actually ran, every skip with its reason, and a replay line that reproduces a
//! failure; and the mutant matrix, where each mutant must be caught by its property for the
//! expected reason.

use candle_core::Device;
use serde::Serialize;

use crate::model::Faults;
use crate::mutants::{MutantInfo, MutantSubject};
use crate::props::catalogue::{self, Property, CATALOGUE};
use crate::props::runner::{PropConfig, Verdict};
use crate::spec::Family;
use crate::subject::{Factory, Reference};

pub use crate::props::forward::ModelProperty;

/// One row of the report.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Family checked (`all` for catalogue properties, which draw every family).
    pub family: String,
    /// Property id (`P3`, or the forward property's id).
    pub property: &'static str,
    /// Its title.
    pub title: &'static str,
    /// Device name.
    pub device: String,
    /// The subject (`reference`, `mutant/...`, `tunecheck kernels`).
    pub subject: String,
    /// The verdict: cases run, skips with reasons, or the failure with its replay line.
    pub verdict: Verdict,
    /// Wall time the row took, in seconds.
    pub seconds: f64,
}

/// Options for a run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Cases per family for the forward properties; a quarter of it (at least 2) per adapter
    /// kind for the trainer properties; 8× it for the 4-bit kernel properties.
    pub cases: u32,
    /// Seed of the case generator.
    pub seed: u64,
    /// Families for the forward properties.
    pub families: Vec<Family>,
    /// Only these property ids (`forward`, `P1`, ...); empty: all.
    pub properties: Vec<String>,
    /// Any skip is a failure.
    pub strict: bool,
    /// Run this mutant instead of the reference (by name).
    pub mutant: Option<String>,
    /// Shrinking steps after a failure (each rebuilds a subject: keep it small for a driver
    /// process).
    pub max_shrink_iters: u32,
    /// Wall-time budget for shrinking one failure (`None`: no limit).
    pub max_shrink_time: Option<std::time::Duration>,
    /// Run only partition `k` of `n` (1-based): the rows whose index in the whole run is
    /// `k − 1` modulo `n`, so the partitions together are exactly the whole run.
    pub partition: Option<(usize, usize)>,
    /// Only these adapter kinds for the trainer properties (`None`: every kind a property
    /// exercises).
    pub kinds: Option<Vec<crate::strategy::AdapterKind>>,
}

impl Options {
    /// Default options with `cases` and `seed`, every family and property.
    pub fn new(cases: u32, seed: u64) -> Self {
        Options {
            cases,
            seed,
            families: Family::ALL.to_vec(),
            properties: Vec::new(),
            strict: false,
            mutant: None,
            max_shrink_iters: PropConfig::default().max_shrink_iters,
            max_shrink_time: None,
            partition: None,
            kinds: None,
        }
    }

    /// Whether row `index` of the whole run (0-based, in run order) is in this run's partition.
    pub fn in_partition(&self, index: usize) -> bool {
        self.partition.is_none_or(|(k, n)| index % n == k - 1)
    }

    fn wants(&self, p: &Property) -> bool {
        self.properties.is_empty() || self.properties.iter().any(|w| catalogue::selects(w, p))
    }

    /// Cases per adapter kind for the trainer properties.
    pub fn trainer_cases(&self) -> u32 {
        self.cases.div_ceil(4).max(2)
    }

    /// The `tunecheck check` line that replays property `id` against the subject named by
    /// `subject_args` (`--mutant NAME`, or empty for the reference): the same cases, seed,
    /// families (`family` for a forward row) and strictness.
    pub fn replay_with(&self, id: &str, device: &Device, family: Option<Family>, subject_args: &str) -> String {
        let mut s = format!(
            "tunecheck check --property {id} --device {} --cases {} --seed {}",
            crate::device::name(device),
            self.cases,
            self.seed
        );
        let families = match family {
            Some(f) => vec![f],
            None if self.families.len() < Family::ALL.len() => self.families.clone(),
            None => Vec::new(),
        };
        for f in families {
            s.push_str(&format!(" --family {f}"));
        }
        for k in self.kinds.iter().flatten() {
            s.push_str(&format!(" --kind {}", k.name()));
        }
        if self.strict {
            s.push_str(" --strict");
        }
        if !subject_args.is_empty() {
            s.push(' ');
            s.push_str(subject_args);
        }
        s
    }

    /// [`Options::replay_with`] for the reference or the mutant named in the options.
    pub fn replay(&self, id: &str, device: &Device, family: Option<Family>) -> String {
        let args = self.mutant.as_ref().map(|m| format!("--mutant {m}")).unwrap_or_default();
        self.replay_with(id, device, family, &args)
    }

    fn prop_config(&self) -> PropConfig {
        PropConfig {
            cases: self.trainer_cases(),
            seed: self.seed,
            strict: self.strict,
            families: self.families.clone(),
            max_shrink_iters: self.max_shrink_iters,
            max_shrink_time: self.max_shrink_time,
            kinds: self.kinds.clone(),
            ..PropConfig::default()
        }
    }
}

/// Run one forward property over seeded cases of `family` (with `faults` planted, for
/// mutants), shrinking any failure; the replay line is filled in.
pub fn run_forward(device: &Device, family: Family, prop: ModelProperty, opts: &Options, faults: Faults) -> Verdict {
    let cfg = PropConfig { cases: opts.cases, families: vec![family], ..opts.prop_config() };
    let mut v = crate::props::forward::run_family(prop, family, device, &cfg, faults);
    set_replay(&mut v, opts.replay(prop.id(), device, Some(family)));
    v
}

/// Run catalogue property `p` against `factory` with the suite's options.
pub fn run_catalogue(p: &Property, factory: &dyn Factory, device: &Device, opts: &Options) -> Verdict {
    let cfg = match p.body {
        catalogue::Body::Kernels(_) => PropConfig { cases: opts.cases, ..opts.prop_config() },
        _ => opts.prop_config(),
    };
    let mut v = crate::props::runner::run(p, factory, device, &cfg);
    if let Verdict::Failed { replay, .. } = &mut v {
        // Only a subject the command line can rebuild has a replay line.
        *replay = factory.replay_args().map(|args| opts.replay_with(p.id, device, None, &args));
    }
    v
}

/// Run every catalogue property (or those in `opts.properties`, in `opts.partition`) against
/// the reference: the forward properties one row per family, the rest one row each;
/// `progress` is told each row.
pub fn run(device: &Device, opts: &Options, mut progress: impl FnMut(&Row)) -> Vec<Row> {
    let mut out = Vec::new();
    let mut index = 0;
    for p in CATALOGUE.iter().filter(|p| opts.wants(p)) {
        let families: Vec<Option<Family>> = match p.body {
            catalogue::Body::Forward(_) => opts.families.iter().copied().map(Some).collect(),
            _ => vec![None],
        };
        for family in families {
            index += 1;
            if !opts.in_partition(index - 1) {
                continue;
            }
            let start = std::time::Instant::now();
            let verdict = match (p.body, family) {
                (catalogue::Body::Forward(prop), Some(f)) => run_forward(device, f, prop, opts, Faults::default()),
                _ => run_catalogue(p, &Reference, device, opts),
            };
            let row = Row {
                family: family.map_or("all".to_string(), |f| f.to_string()),
                property: p.id,
                title: p.title,
                device: crate::device::name(device),
                subject: subject_name(p, &Reference),
                verdict,
                seconds: start.elapsed().as_secs_f64(),
            };
            progress(&row);
            out.push(row);
        }
    }
    out
}

/// Run every trainer property (or those in `opts.properties`, in `opts.partition`) against an
/// outside subject made by `factory` — a driver process, say — one row each. The forward and
/// kernel properties judge tunecheck's own model and kernels, and P6 compares devices of
/// tunecheck's own trainer, so they are not run; `progress` is told each row.
pub fn run_subject(factory: &dyn Factory, device: &Device, opts: &Options, mut progress: impl FnMut(&Row)) -> Vec<Row> {
    let mut out = Vec::new();
    for (i, p) in subject_properties(opts).into_iter().enumerate() {
        if !opts.in_partition(i) {
            continue;
        }
        let start = std::time::Instant::now();
        let verdict = run_catalogue(p, factory, device, opts);
        let row = Row {
            family: "all".into(),
            property: p.id,
            title: p.title,
            device: crate::device::name(device),
            subject: factory.name(),
            verdict,
            seconds: start.elapsed().as_secs_f64(),
        };
        progress(&row);
        out.push(row);
    }
    out
}

/// The catalogue properties [`run_subject`] runs for `opts`.
pub fn subject_properties(opts: &Options) -> Vec<&'static Property> {
    CATALOGUE.iter().copied().filter(|p| opts.wants(p) && matches!(p.body, catalogue::Body::Trainer(_))).collect()
}

/// Rows [`run`] produces for `opts` (for progress counters).
pub fn row_count(opts: &Options) -> usize {
    let all: usize = CATALOGUE
        .iter()
        .filter(|p| opts.wants(p))
        .map(|p| if matches!(p.body, catalogue::Body::Forward(_)) { opts.families.len() } else { 1 })
        .sum();
    (0..all).filter(|&i| opts.in_partition(i)).count()
}

fn subject_name(p: &Property, f: &dyn Factory) -> String {
    match p.body {
        catalogue::Body::Kernels(_) => "tunecheck kernels".into(),
        catalogue::Body::Forward(_) => "tunecheck model".into(),
        _ => f.name(),
    }
}

/// One mutant's result.
#[derive(Debug, Clone, Serialize)]
pub struct MutantRow {
    /// Mutant id.
    pub mutant: &'static str,
    /// The real-world bug it reproduces.
    pub bug: &'static str,
    /// The property that must catch it.
    pub property: &'static str,
    /// The clause it must trip (`None`: any violation of the property).
    pub expected_code: Option<&'static str>,
    /// Family (forward mutants) or `all`.
    pub family: String,
    /// The property's verdict on the mutant.
    pub verdict: Verdict,
    /// True when the property failed with a violation of the expected clause.
    pub caught: bool,
}

/// Run mutant `m`'s property against it.
pub fn run_mutant(m: &MutantInfo, device: &Device, opts: &Options) -> MutantRow {
    let opts = Options { mutant: Some(m.name.to_string()), ..opts.clone() };
    let (family, verdict) = match m.subject {
        MutantSubject::Forward(f) => {
            (f.family.to_string(), run_forward(device, f.family, f.caught_by, &opts, f.faults))
        }
        MutantSubject::Trainer(bug) => {
            let p = catalogue::by_id(bug.caught_by()).expect("a mutant names a catalogue property");
            // Run where the real bug happens (Gemma 3's q/k norms exist only there; a 4-bit
            // reload bug needs a 4-bit base).
            let opts = match bug.family() {
                Some(f) => Options { families: vec![f], ..opts.clone() },
                None => opts.clone(),
            };
            let family = bug.family().map_or("all".to_string(), |f| f.to_string());
            let mut cfg = opts.prop_config();
            cfg.kinds = bug.kinds();
            cfg.precondition = bug.precondition();
            let mut v = crate::props::runner::run(p, &crate::mutants::Mutant(bug), device, &cfg);
            set_replay(&mut v, opts.replay(p.id, device, None));
            (family, v)
        }
        MutantSubject::SwappedNibbles => {
            let cfg = PropConfig { cases: opts.cases, ..opts.prop_config() };
            let mut v = crate::props::p7_nf4::nf4_round_trip(crate::props::p7_nf4::swapped_nibbles, &cfg);
            set_replay(&mut v, opts.replay("P7", device, None));
            ("all".to_string(), v)
        }
        MutantSubject::Kernel(k) => {
            let cfg = PropConfig { cases: opts.cases, ..opts.prop_config() };
            let mut v = crate::props::p9_kernels::kernels_match_oracle(&k, &cfg);
            set_replay(&mut v, opts.replay("P9", device, None));
            ("all".to_string(), v)
        }
    };
    let caught = verdict.violates(m.caught_by, m.code);
    MutantRow { mutant: m.name, bug: m.bug, property: m.caught_by, expected_code: m.code, family, verdict, caught }
}

fn set_replay(v: &mut Verdict, line: String) {
    if let Verdict::Failed { replay, .. } = v {
        *replay = Some(line);
    }
}

/// Run every mutant (or the one in `opts.mutant`; those in `opts.partition`) against the
/// property that must catch it.
pub fn run_mutants(device: &Device, opts: &Options, mut progress: impl FnMut(&MutantRow)) -> Vec<MutantRow> {
    crate::mutants::catalogue()
        .iter()
        .filter(|m| opts.mutant.as_deref().is_none_or(|n| n == m.name))
        .enumerate()
        .filter(|(i, _)| opts.in_partition(*i))
        .map(|(_, m)| {
            let row = run_mutant(m, device, opts);
            progress(&row);
            row
        })
        .collect()
}

/// Run a named mutant as the subject of `check` (what a replay line does): the rows its
/// property produces, which must fail.
pub fn run_as_subject(m: &MutantInfo, device: &Device, opts: &Options) -> Vec<Row> {
    let start = std::time::Instant::now();
    let row = run_mutant(m, device, opts);
    let title = catalogue::by_id(m.caught_by).map_or(m.caught_by, |p| p.title);
    vec![Row {
        seconds: start.elapsed().as_secs_f64(),
        family: row.family,
        property: m.caught_by,
        title,
        device: crate::device::name(device),
        subject: format!("mutant/{}", m.name),
        verdict: row.verdict,
    }]
}
