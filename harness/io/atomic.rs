//! Atomic file writes: write a temp file beside the target, fsync it, rename it over the
//! target, fsync the directory. A write that fails leaves the previous file untouched.
//!
//! A checkpoint is several files, so every saver runs inside [`transaction`]: each file is
//! first *staged* (temp file written and fsynced); only when all of them are staged are they
//! renamed into place, then stale files removed. A failure while staging (disk full, an
//! interrupted write, an injected fault) deletes the temp files and leaves every previous file
//! as it was; the renames themselves are the only window, microseconds long.

use std::cell::RefCell;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

#[derive(Default)]
struct Tx {
    depth: usize,
    staged: Vec<(PathBuf, PathBuf)>,
    remove: Vec<PathBuf>,
}

thread_local! {
    static TX: RefCell<Tx> = RefCell::new(Tx::default());
    static FAIL_AFTER: RefCell<Option<usize>> = const { RefCell::new(None) };
}

/// Testing hook: let `n` more file writes succeed on this thread, then make the next one
/// fail halfway through (half its bytes written to the temp file). `None` disarms it.
#[doc(hidden)]
pub fn inject_write_failure(n: Option<usize>) {
    FAIL_AFTER.with(|f| *f.borrow_mut() = n);
}

fn injected() -> bool {
    FAIL_AFTER.with(|f| {
        let mut f = f.borrow_mut();
        match *f {
            Some(0) => {
                *f = None;
                true
            }
            Some(n) => {
                *f = Some(n - 1);
                false
            }
            None => false,
        }
    })
}

/// Run `f` as one all-or-nothing save: files written inside are staged and renamed into place
/// only if `f` succeeds; removals requested with [`remove_later`] happen after the renames.
/// Nested transactions join the outermost one.
pub fn transaction<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    /// Leaves the transaction even if `f` panics: the outermost level then drops its staged
    /// temp files, so a later save on this thread is not silently staged forever.
    struct Level;
    impl Drop for Level {
        fn drop(&mut self) {
            if std::thread::panicking() {
                let staged = TX.with(|t| {
                    let mut t = t.borrow_mut();
                    t.depth -= 1;
                    if t.depth == 0 {
                        t.remove.clear();
                        std::mem::take(&mut t.staged)
                    } else {
                        Vec::new()
                    }
                });
                discard(&staged);
            }
        }
    }
    TX.with(|t| t.borrow_mut().depth += 1);
    let level = Level;
    let out = f();
    std::mem::forget(level);
    let (outer, staged, remove) = TX.with(|t| {
        let mut t = t.borrow_mut();
        t.depth -= 1;
        if t.depth == 0 {
            (true, std::mem::take(&mut t.staged), std::mem::take(&mut t.remove))
        } else {
            (false, Vec::new(), Vec::new())
        }
    });
    if !outer {
        return out;
    }
    if out.is_err() {
        discard(&staged);
        return out;
    }
    for (i, (tmp, path)) in staged.iter().enumerate() {
        if let Err(e) = fs::rename(tmp, path) {
            discard(&staged[i..]);
            return Err(Error::io(path, e));
        }
    }
    for p in &remove {
        remove_existing(p)?;
    }
    let dirs: std::collections::BTreeSet<&Path> = staged.iter().filter_map(|(_, p)| p.parent()).collect();
    for d in dirs {
        sync_dir(d);
    }
    out
}

/// Delete staged temp files that will not be renamed into place.
fn discard(staged: &[(PathBuf, PathBuf)]) {
    for (tmp, _) in staged {
        let _ = fs::remove_file(tmp);
    }
}

/// Remove `path` (if it exists) once the surrounding transaction commits; at once outside one.
pub fn remove_later(path: &Path) -> Result<()> {
    let queued = TX.with(|t| {
        let mut t = t.borrow_mut();
        if t.depth > 0 {
            t.remove.push(path.to_path_buf());
            true
        } else {
            false
        }
    });
    if queued {
        return Ok(());
    }
    remove_existing(path)
}

/// Remove `path`; a file that is already gone is fine.
fn remove_existing(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(Error::io(path, e)),
    }
}

fn sync_dir(dir: &Path) {
    if dir.as_os_str().is_empty() {
        return;
    }
    // Persist the renames; not every platform lets a directory be opened for sync.
    if let Ok(d) = File::open(dir) {
        let _ = d.sync_all();
    }
}

fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Write `bytes` to `path` atomically (staged until commit inside a [`transaction`]).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path(path);
    let in_tx = TX.with(|t| t.borrow().depth > 0);
    let result = (|| -> std::io::Result<()> {
        let mut f = File::create(&tmp)?;
        if injected() {
            f.write_all(&bytes[..bytes.len() / 2])?;
            return Err(std::io::Error::other("injected write failure (testing hook)"));
        }
        f.write_all(bytes)?;
        f.sync_all()?;
        if !in_tx {
            fs::rename(&tmp, path)?;
            if let Some(dir) = path.parent() {
                sync_dir(dir);
            }
        }
        Ok(())
    })();
    match result {
        Ok(()) => {
            if in_tx {
                TX.with(|t| t.borrow_mut().staged.push((tmp, path.to_path_buf())));
            }
            Ok(())
        }
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            Err(Error::io(path, e))
        }
    }
}

/// Create `dir` (and parents); an existing non-directory at that path is an error naming it.
pub fn ensure_dir(dir: &Path) -> Result<()> {
    if dir.exists() && !dir.is_dir() {
        return Err(Error::file(dir, "exists and is not a directory"));
    }
    fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))
}
