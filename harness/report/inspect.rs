//! `tunecheck inspect`'s report for a terminal.

use crate::inspect::Report;

/// The report as text for a terminal.
pub fn render(r: &Report) -> String {
    let mut s = format!("checkpoint  {}\n", r.dir.display());
    s.push_str(&format!(
        "model       {} · {} parameters · dtype {} ({} on {})\n",
        r.family,
        r.parameters,
        r.dtype,
        if r.dtype_supported { "supported" } else { "NOT supported" },
        r.device
    ));
    let dts: Vec<String> = r.tensors_by_dtype.iter().map(|(d, n)| format!("{n} {d}")).collect();
    s.push_str(&format!("tensors     {}\n", dts.join(", ")));
    s.push_str(&format!("4-bit       {}\n", r.quantization.as_ref().map_or("none".to_string(), |q| q.to_string())));
    if let Some(a) = &r.adapter {
        s.push_str(&format!(
            "adapter     {} · base quantization {}: {}\n",
            a.dir.display(),
            a.base_quantization,
            a.detail
        ));
    }
    if r.untrained.is_empty() {
        s.push_str("untrained   none\n");
    } else {
        s.push_str(&format!(
            "untrained   {} rows{}\n",
            r.untrained.len(),
            if r.tokenizer { "" } else { " (no tokenizer.json: ids only)" }
        ));
        for u in &r.untrained {
            let mut flags = Vec::new();
            if u.special {
                flags.push("special");
            }
            if u.in_chat_template {
                flags.push("chat template");
            }
            s.push_str(&format!(
                "  {:>7}  {:<32} {:<24} {}\n",
                u.id,
                u.token.as_deref().unwrap_or("?"),
                flags.join(", "),
                u.tensors.join(", ")
            ));
        }
    }
    for n in &r.non_finite {
        s.push_str(&format!("non-finite  {}: {} NaN, {} Inf\n", n.tensor, n.nan, n.inf));
    }
    if let Some(p) = &r.probe {
        s.push_str(&format!(
            "probe       {} positions · logits {} · {} distinct argmax ids{}\n",
            p.positions,
            if p.finite { "finite" } else { "NOT finite" },
            p.distinct_argmax,
            if p.collapsed { " (COLLAPSED)" } else { "" }
        ));
    }
    if r.findings.is_empty() {
        s.push_str("\nclean\n");
    } else {
        s.push_str(&format!("\n{} finding(s):\n", r.findings.len()));
        for f in &r.findings {
            s.push_str(&format!("  - {f}\n"));
        }
    }
    s
}
