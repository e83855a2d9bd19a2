//! Helpers shared by the integration tests.

/// insta settings that keep snapshots in `golden/` without module prefixes.
#[allow(dead_code)]
pub fn golden() -> insta::Settings {
    let mut s = insta::Settings::clone_current();
    s.set_snapshot_path(concat!(env!("CARGO_MANIFEST_DIR"), "/golden"));
    s.set_prepend_module_to_snapshot(false);
    s
}
