//! JUnit XML for CI systems: one `<testcase>` per row (property and family), its time, a
//! `<failure>` for a violated clause or an `<error>` for a run that could not judge (each with
//! the detail, the minimal setup and the replay line), `<skipped>` with the reason, and the
//! measured margins and partial skips of a pass in `<system-out>`.

use crate::outcomes::outcome;
use crate::props::runner::{FailReason, Verdict};
use crate::report::check::failure_lines;
use crate::suite::Row;

/// XML-escape text for an attribute or element body.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // XML 1.0 allows no other control characters.
            c if (c as u32) < 0x20 && !matches!(c, '\n' | '\r' | '\t') => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out
}

/// The JUnit document of `rows`, as the test suite `name`.
pub fn render(name: &str, rows: &[Row]) -> String {
    let count = |f: &dyn Fn(&Verdict) -> bool| rows.iter().filter(|r| f(&r.verdict)).count();
    let failures = count(&|v| matches!(v, Verdict::Failed { reason: FailReason::Violated { .. }, .. }));
    let errors = count(&|v| v.failed()) - failures;
    let skipped = count(&|v| matches!(v, Verdict::Skipped { .. }));
    let time: f64 = rows.iter().map(|r| r.seconds).sum();
    let mut s = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    s.push_str(&format!(
        "<testsuites name=\"{n}\" tests=\"{t}\" failures=\"{failures}\" errors=\"{errors}\" skipped=\"{skipped}\" \
         time=\"{time:.3}\">\n  <testsuite name=\"{n}\" tests=\"{t}\" failures=\"{failures}\" errors=\"{errors}\" \
         skipped=\"{skipped}\" time=\"{time:.3}\">\n",
        n = escape(name),
        t = rows.len()
    ));
    for r in rows {
        s.push_str(&format!(
            "    <testcase classname=\"tunecheck.{}\" name=\"{} {}: {}\" time=\"{:.3}\">\n",
            escape(&r.subject),
            escape(r.property),
            escape(&r.family),
            escape(r.title),
            r.seconds
        ));
        match &r.verdict {
            Verdict::Failed { reason, detail, minimal, replay, cases_run } => {
                let tag = if matches!(reason, FailReason::Violated { .. }) { "failure" } else { "error" };
                let mut body = format!("{detail}\ncases run: {cases_run}\n");
                for line in failure_lines(minimal, replay.as_deref()) {
                    body.push_str(&format!("{line}\n"));
                }
                s.push_str(&format!(
                    "      <{tag} message=\"{}\" type=\"{}\">{}</{tag}>\n",
                    escape(detail.lines().next().unwrap_or("")),
                    escape(&outcome(&r.verdict)),
                    escape(&body)
                ));
            }
            Verdict::Skipped { reason } => s.push_str(&format!("      <skipped message=\"{}\"/>\n", escape(reason))),
            Verdict::Passed { cases_run, skipped, measured } => {
                let mut out = format!("{cases_run} case(s) passed\n");
                for m in measured {
                    out.push_str(&format!("measured: {}\n", m.line()));
                }
                for why in skipped {
                    out.push_str(&format!("skipped: {why}\n"));
                }
                s.push_str(&format!("      <system-out>{}</system-out>\n", escape(&out)));
            }
        }
        s.push_str("    </testcase>\n");
    }
    s.push_str("  </testsuite>\n</testsuites>\n");
    s
}
