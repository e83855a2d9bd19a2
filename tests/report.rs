//! What the command line prints: the `check` and mutant tables keep their columns aligned
//! whatever the content (a long subject or clause name widens its column instead of pushing
//! the ones after it), and the progress lines of `train` and `inspect`.

use tunecheck::props::runner::Verdict;
use tunecheck::report::check::{mutant_table, table};
use tunecheck::report::{scan_progress, train_progress};
use tunecheck::suite::{MutantRow, Row};

fn row(family: &str, property: &'static str, title: &'static str, verdict: Verdict) -> Row {
    Row {
        family: family.into(),
        property,
        title,
        device: "cpu".into(),
        subject: "reference".into(),
        verdict,
        seconds: 0.0,
    }
}

fn passed(n: u32) -> Verdict {
    Verdict::passed_all(n)
}

/// The byte offsets where each of `words` starts in `line` (searching left to right).
fn starts(line: &str, words: &[&str]) -> Vec<usize> {
    let mut from = 0;
    words
        .iter()
        .map(|w| {
            let at = from + line[from..].find(w).unwrap_or_else(|| panic!("`{w}` not in `{line}`"));
            from = at + w.len();
            at
        })
        .collect()
}

#[test]
fn check_table_columns_fit_their_content() {
    let rows = vec![
        row("llama", "F1", "deterministic", passed(16)),
        row("transformers 5.23.0 + peft 0.21.2", "P10", "agrees with the reference trainer", passed(12)),
        row("all", "P6", "devices agree", Verdict::Skipped { reason: "no CUDA device".into() }),
    ];
    let t = table(&rows);
    let lines: Vec<&str> = t.lines().collect();
    let header = starts(lines[0], &["family", "id", "property", "cases", "result"]);
    assert_eq!(lines[1].len(), lines[0].len(), "the rule spans the header:\n{t}");
    assert!(lines[1].chars().all(|c| c == '-'));
    for (line, words) in [
        (lines[2], ["llama", "F1", "deterministic", "16", "pass"]),
        (lines[3], ["transformers", "P10", "agrees", "12", "pass"]),
        (lines[4], ["all", "P6", "devices", "0", "skip"]),
    ] {
        let at = starts(line, &words);
        // Every column starts where its header does; the right-aligned case count ends where
        // `cases` ends.
        assert_eq!([at[0], at[1], at[2], at[4]], [header[0], header[1], header[2], header[4]], "{line}\n{t}");
        assert_eq!(at[3] + words[3].len(), header[3] + "cases".len(), "{line}\n{t}");
    }
    assert!(t.contains("2 passed, 0 failed, 1 skipped"), "{t}");
    assert!(t.contains("skip all / P6: no CUDA device"), "{t}");
}

#[test]
fn mutant_table_columns_fit_their_content() {
    let m = |mutant: &'static str, expected_code: Option<&'static str>, caught: bool| MutantRow {
        mutant,
        bug: "a planted bug",
        property: "P4",
        expected_code,
        family: "all".into(),
        verdict: passed(4),
        caught,
    };
    let rows = vec![
        m("short", None, true),
        m("a_rather_long_mutant_name_for_the_table", Some("a_very_long_expected_clause_code_name"), false),
    ];
    let t = mutant_table(&rows);
    let lines: Vec<&str> = t.lines().collect();
    let header = starts(lines[0], &["mutant", "family", "property", "expected", "result"]);
    assert_eq!(lines[1].len(), lines[0].len(), "{t}");
    for (line, words) in [
        (lines[2], ["short", "all", "P4", "(any)", "caught"]),
        (lines[3], ["a_rather_long", "all", "P4", "a_very_long", "MISSED"]),
    ] {
        assert_eq!(starts(line, &words), header, "{line}\n{t}");
    }
    assert!(t.contains("1/2 mutants caught"), "{t}");
    assert!(t.contains("NOT CAUGHT: the property pass on this mutant"), "{t}");
}

#[test]
fn progress_lines_rewrite_in_place_and_end_with_a_newline() {
    assert_eq!(train_progress(3, 50, 1.23456), "\rstep  3/50  loss 1.2346\x1b[K");
    assert_eq!(train_progress(50, 50, 0.5), "\rstep 50/50  loss 0.5000\x1b[K\n");
    let file = std::path::Path::new("/x/model-00001-of-00002.safetensors");
    let mut shown = None;
    assert_eq!(scan_progress(&mut shown, file, 10, 1 << 20), "", "small checkpoints scan silently");
    let big = 100usize << 20;
    let first = scan_progress(&mut shown, file, 0, big);
    assert!(first.starts_with("\rscanning   0% (0.00 / 0.10 GiB) model-00001-of-00002.safetensors"), "{first:?}");
    assert_eq!(scan_progress(&mut shown, file, 1, big), "", "no new percentage, no new line");
    assert!(scan_progress(&mut shown, file, big / 2, big).contains(" 50% "));
    assert!(scan_progress(&mut shown, file, big, big).ends_with("\x1b[K\n"));
}
