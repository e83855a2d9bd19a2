//! What a framework's CI consumes from `tunecheck check`: known outcomes (`--expect`,
//! `--bless`), JUnit XML (`--junit`, read back with an XML parser), deterministic partitions
//! (`--partition`), a bounded shrink (`--shrink-time`), and a run against a driver that leaves
//! nothing in the temp directory.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tunecheck"))
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// (property, family) → outcome of a `--json` run's rows.
fn outcomes(o: &Output) -> BTreeMap<(String, String), String> {
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(o)));
    v.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let v = &r["verdict"];
            let outcome = match v["verdict"].as_str().unwrap() {
                "passed" => "pass".to_string(),
                "skipped" => "skip".to_string(),
                _ if v["reason"]["kind"] == "violated" => format!("fail:{}", v["reason"]["code"].as_str().unwrap()),
                _ => "error".to_string(),
            };
            ((r["property"].as_str().unwrap().to_string(), r["family"].as_str().unwrap().to_string()), outcome)
        })
        .collect()
}

#[test]
fn expect_passes_on_known_outcomes_failures_included_and_names_each_change() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("expected.tsv");
    // A mutant's failure is a known outcome once blessed.
    let run = |extra: &[&str]| {
        bin()
            .args(["check", "--mutant", "eval_skipped", "--cases", "4", "--expect"])
            .arg(&file)
            .args(extra)
            .output()
            .unwrap()
    };
    std::fs::write(&file, "# the planted bug, pinned\nP4\tpass\n").unwrap();
    let o = run(&["--bless"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let blessed = std::fs::read_to_string(&file).unwrap();
    assert_eq!(blessed, "# the planted bug, pinned\nP4\tfail:eval_missing\n");
    // A new file of comments only (its header) keeps them above the rows.
    std::fs::write(&file, "# header\n# driver args: --x\n").unwrap();
    let o = run(&["--bless"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "# header\n# driver args: --x\nP4\tfail:eval_missing\n");
    let o = run(&[]);
    assert_eq!(o.status.code(), Some(0), "a known failure is not a change: {}", text(&o));
    assert!(text(&o).contains("every outcome as expected"), "{}", text(&o));
    // A changed outcome fails, naming the row, both outcomes and the detail.
    std::fs::write(&file, "P4 fail:epoch_boundary\n").unwrap();
    let o = run(&[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let t = text(&o);
    assert!(t.contains("P4: expected fail:epoch_boundary, got fail:eval_missing"), "{t}");
    assert!(t.contains("asked for eval at each of 2 epochs"), "{t}");
    // A row the file does not list is a change too.
    std::fs::write(&file, "P1 pass\n").unwrap();
    let o = run(&[]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains("P4: not in the expected outcomes, got fail:eval_missing"), "{}", text(&o));
    // A bad file is unusable input, named with its line.
    for (bad, why) in [
        ("P99 pass\n", "unknown property `P99`"),
        ("P4 passed\n", "`passed` is not pass, skip, error or fail:<clause>"),
        ("F1 mistral pass\n", "unknown family `mistral`"),
        ("P4 pass\nP4 skip\n", "a second line for P4 all"),
    ] {
        std::fs::write(&file, bad).unwrap();
        let o = run(&[]);
        assert_eq!(o.status.code(), Some(2), "{bad}: {}", text(&o));
        assert!(text(&o).contains(why) && text(&o).contains("expected.tsv"), "{bad}: {}", text(&o));
    }
    let o = bin().args(["check", "--bless"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "--bless needs --expect: {}", text(&o));
}

#[test]
fn junit_is_valid_xml_with_a_testcase_per_row_failures_and_skips() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("junit.xml");
    let o = bin()
        .args(["check", "--property", "F2", "--property", "P6", "--cases", "2", "--junit"])
        .arg(&file)
        .output()
        .unwrap();
    let xml = std::fs::read_to_string(&file).unwrap();
    let doc = roxmltree::Document::parse(&xml).unwrap_or_else(|e| panic!("{e}:\n{xml}"));
    let cases: Vec<roxmltree::Node> = doc.descendants().filter(|n| n.has_tag_name("testcase")).collect();
    assert_eq!(cases.len(), 5, "F2 per family and P6: {xml}");
    let suite = doc.descendants().find(|n| n.has_tag_name("testsuite")).unwrap();
    assert_eq!(suite.attribute("tests"), Some("5"));
    assert!(cases.iter().all(|c| c.attribute("time").is_some_and(|t| t.parse::<f64>().is_ok())));
    let names: Vec<&str> = cases.iter().map(|c| c.attribute("name").unwrap()).collect();
    assert!(names.contains(&"F2 gemma3: causal (future tokens ignored, bitwise)"), "{names:?}");
    let p6 = cases.iter().find(|c| c.attribute("name").unwrap().starts_with("P6 all")).unwrap();
    let gpu = o.status.success() && !xml.contains("<skipped");
    if !gpu {
        let skipped = p6.children().find(|n| n.has_tag_name("skipped")).expect("P6 is skipped without a GPU");
        assert!(skipped.attribute("message").unwrap().contains("no CUDA device"));
        assert_eq!(suite.attribute("skipped"), Some("1"));
    }
    // A failure carries the clause, the detail, the minimal setup and the replay line; a
    // detail with markup characters survives escaping.
    let o = bin()
        .args(["check", "--mutant", "per_microbatch_mean", "--cases", "4", "--junit"])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let xml = std::fs::read_to_string(&file).unwrap();
    let doc = roxmltree::Document::parse(&xml).unwrap_or_else(|e| panic!("{e}:\n{xml}"));
    let failure = doc.descendants().find(|n| n.has_tag_name("failure")).expect("a failure element");
    assert_eq!(failure.attribute("type"), Some("fail:accumulation_mismatch"));
    let body = failure.text().unwrap();
    assert!(body.contains("micro-batches with ["), "{body}");
    assert!(body.contains("minimal setup: llama float32"), "{body}");
    assert!(body.contains("replay: tunecheck check --property P5"), "{body}");
    assert_eq!(doc.descendants().find(|n| n.has_tag_name("testsuite")).unwrap().attribute("failures"), Some("1"));
    assert_eq!(
        tunecheck::report::junit::escape("a<b & \"c\" > 'd'\u{1}"),
        "a&lt;b &amp; &quot;c&quot; &gt; &apos;d&apos;\\u0001"
    );
}

#[test]
fn partitions_are_disjoint_and_together_the_whole_run() {
    let args = ["check", "--property", "forward", "--property", "P7", "--property", "P9", "--cases", "2", "--json"];
    let whole = outcomes(&bin().args(args).output().unwrap());
    assert_eq!(whole.len(), 14, "{whole:?}");
    let mut union = BTreeMap::new();
    for k in 1..=3 {
        let part = outcomes(&bin().args(args).args(["--partition", &format!("{k}/3")]).output().unwrap());
        assert!(!part.is_empty(), "partition {k}/3 is empty");
        for (key, o) in part {
            assert!(union.insert(key.clone(), o).is_none(), "{key:?} is in two partitions");
        }
    }
    assert_eq!(union, whole);
    for bad in ["0/3", "4/3", "1/0", "x", "1/2/3"] {
        let o = bin().args(["check", "--partition", bad]).output().unwrap();
        assert_eq!(o.status.code(), Some(2), "--partition {bad}: {}", text(&o));
    }
}

#[test]
fn a_bounded_shrink_still_reports_the_failure_and_its_smallest_case() {
    let o = bin()
        .args(["check", "--mutant", "optimizer_reset_at_epoch", "--cases", "8", "--shrink-time", "0.001", "--json"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["verdict"]["reason"]["code"], "epoch_boundary", "{v}");
    assert!(v[0]["verdict"]["minimal"]["config"].is_object(), "{v}");
    let o = bin().args(["check", "--shrink-time", "0"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}

/// Entries of `dir`, recursively, as paths relative to it.
fn entries(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        out.push(p.strip_prefix(dir).unwrap().display().to_string());
    }
    out.sort();
    out
}

#[test]
fn a_trainer_run_leaves_nothing_in_the_temp_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let driver = format!("{} driver", env!("CARGO_BIN_EXE_tunecheck"));
    // P3 saves and reloads (a fresh driver per load); P13 builds several subjects; the mutant
    // makes P4 fail and shrink.
    for (trainer, property) in
        [(driver.clone(), "P3"), (driver.clone(), "P13"), (format!("{driver} --mutant eval_skipped"), "P4")]
    {
        let o = bin()
            .args(["check", "--trainer", &trainer, "--property", property, "--cases", "4"])
            .env("TMPDIR", tmp.path())
            .output()
            .unwrap();
        assert!(o.status.code().is_some_and(|c| c <= 1), "{property}: {}", text(&o));
        assert_eq!(entries(tmp.path()), Vec::<String>::new(), "{property} left files behind");
    }
}
