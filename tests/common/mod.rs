//! Helpers shared by the integration tests.

/// insta settings that keep snapshots in `golden/` without module prefixes.
#[allow(dead_code)]
pub fn golden() -> insta::Settings {
    let mut s = insta::Settings::clone_current();
    s.set_snapshot_path(concat!(env!("CARGO_MANIFEST_DIR"), "/golden"));
    s.set_prepend_module_to_snapshot(false);
    s
}

/// A path under `fixtures/`.
#[allow(dead_code)]
pub fn fixture(p: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(p)
}

/// A copy of the fixture directory `src` in a fresh temp dir, to damage.
#[allow(dead_code)]
pub fn copy(src: &str) -> tempfile::TempDir {
    let tmp = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(fixture(src)).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, tmp.path().join(f.file_name().unwrap())).unwrap();
    }
    tmp
}
