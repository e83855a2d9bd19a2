//! The README's property table, rendered from the catalogue with the mutants each property
//! must catch (the README holds it between markers; `tests/verdicts.rs` keeps it current).

/// The README's property table (the README holds it between markers; a test compares).
pub fn property_table() -> String {
    let mut s = String::from(
        "| id | test (`conformance!`) | invariant | tolerance (why) | kinds · dtypes | recipe drawn | mutants it must catch |\n\
         |----|------|-----------|-----------------|----------------|--------------|-----------------------|\n",
    );
    for p in crate::props::catalogue::CATALOGUE {
        let kinds = if p.kinds.is_empty() {
            crate::props::catalogue::subject_word(p).to_string()
        } else {
            p.kinds.iter().map(|k| k.name()).collect::<Vec<_>>().join(", ")
        };
        let dtypes = p.dtypes.iter().map(|&d| crate::spec::short_dtype_name(d)).collect::<Vec<_>>().join("/");
        let mutants = crate::mutants::catalogue()
            .iter()
            .filter(|m| m.caught_by == p.id)
            .map(|m| format!("`{}`", m.name))
            .collect::<Vec<_>>()
            .join(", ");
        let draws = match p.body {
            crate::props::catalogue::Body::Trainer(_) | crate::props::catalogue::Body::CrossDevice(_) => {
                p.draws.words()
            }
            _ => "—".into(),
        };
        s.push_str(&format!(
            "| {} | `{}` | {} | {} | {} · {} | {} | {} |\n",
            p.id,
            p.test_name,
            p.invariant,
            p.tolerance,
            kinds,
            if dtypes.is_empty() { "—".into() } else { dtypes },
            draws,
            if mutants.is_empty() { "— (needs a GPU)".to_string() } else { mutants }
        ));
    }
    s
}
