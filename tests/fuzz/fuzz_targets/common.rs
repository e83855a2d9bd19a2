//! Shared by the fuzz targets: a scratch directory (in /dev/shm when present) and fixtures.

use std::path::{Path, PathBuf};

/// The repository's fixtures folder.
pub fn fixture(p: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures").join(p)
}

/// A per-process scratch directory holding a copy of fixture directory `src` (if any).
pub fn scratch(src: Option<&str>) -> PathBuf {
    let base = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    let dir = base.join(format!("tunecheck-fuzz-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    if let Some(src) = src {
        for f in std::fs::read_dir(fixture(src)).expect("fixture") {
            let f = f.expect("entry").path();
            std::fs::copy(&f, dir.join(f.file_name().expect("name"))).expect("copy");
        }
    }
    dir
}
