//! Crash-safe saves. A directory save ([`save_dir`]) writes every file into a hidden sibling
//! staging directory, fsyncs each file and directory, writes the manifest, and then swaps the
//! staging directory with the target in one step (`renameat2(RENAME_EXCHANGE)` on Linux; a
//! plain rename when the target does not exist yet). A process killed at any instant — any
//! write, fsync, link or rename — leaves the target as the complete old or the complete new
//! save, never a mix; what it leaves beside it is a staging directory that the next save of
//! that target removes.
//!
//! Where the exchange is unavailable (another OS, a filesystem without it), the target is
//! renamed aside and the staging directory renamed in; a kill between the two leaves no target,
//! and [`settle`] (called by every load and save) renames the old one back.
//!
//! Files in the target that the save does not own (a tokenizer, a README) are carried into the
//! new directory as hard links. Single files outside a directory save use [`write_atomic`]:
//! temp file, fsync, rename, directory fsync.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::io::faults::{self, point};
use crate::io::manifest::{self, Entry, Manifest, MANIFEST};

/// Environment variable that forces the rename-aside fallback (for testing it on Linux).
pub const NO_EXCHANGE_ENV: &str = "TUNECHECK_NO_EXCHANGE";

/// Marks the hidden siblings a save creates: `.NAME.tunecheck-stage-PID-SEQ` while staging
/// (and the old contents after the exchange), `.NAME.tunecheck-old-PID-SEQ` in the fallback.
const STAGE: &str = "tunecheck-stage";
const OLD: &str = "tunecheck-old";

/// A directory being saved: files are written under [`Staged::root`] and land together.
pub struct Staged {
    root: PathBuf,
    save_id: String,
    files: BTreeMap<String, Entry>,
}

impl Staged {
    /// The staging directory (write through [`Staged::write`], not directly).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The save id that safetensors files of this save carry in their metadata.
    pub fn save_id(&self) -> &str {
        &self.save_id
    }

    /// Write `bytes` as `rel` (a `/`-separated path; parent directories are created), fsynced.
    pub fn write(&mut self, rel: &str, bytes: &[u8]) -> Result<()> {
        let path = self.root.join(rel);
        if let Some(parent) = path.parent() {
            if !parent.is_dir() {
                point("mkdir", parent);
                fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            }
        }
        write_synced(&path, bytes)?;
        let sha256 = (!manifest::is_safetensors(rel)).then(|| manifest::sha256_hex(bytes));
        self.files.insert(rel.to_string(), Entry { bytes: bytes.len() as u64, sha256 });
        Ok(())
    }

    /// Write `rel` with `write_file(path)` (for writers that stream to a path themselves, such
    /// as safetensors' `serialize_to_file`), then fsync it and record it.
    pub fn write_with(&mut self, rel: &str, write_file: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
        let path = self.root.join(rel);
        if let Some(parent) = path.parent() {
            if !parent.is_dir() {
                point("mkdir", parent);
                fs::create_dir_all(parent).map_err(|e| Error::io(parent, e))?;
            }
        }
        point("create", &path);
        point("write", &path);
        write_file(&path)?;
        if faults::write_fails() {
            let len = fs::metadata(&path).map_err(|e| Error::io(&path, e))?.len();
            let f = fs::OpenOptions::new().write(true).open(&path).map_err(|e| Error::io(&path, e))?;
            f.set_len(len / 2).map_err(|e| Error::io(&path, e))?;
            return Err(Error::io(&path, std::io::Error::other("injected write failure (testing hook)")));
        }
        point("fsync", &path);
        let f = File::open(&path).map_err(|e| Error::io(&path, e))?;
        f.sync_all().map_err(|e| Error::io(&path, e))?;
        let bytes = f.metadata().map_err(|e| Error::io(&path, e))?.len();
        let sha256 = if manifest::is_safetensors(rel) {
            None
        } else {
            Some(manifest::sha256_hex(&fs::read(&path).map_err(|e| Error::io(&path, e))?))
        };
        self.files.insert(rel.to_string(), Entry { bytes, sha256 });
        Ok(())
    }

    /// Top-level names written so far.
    fn written_top(&self) -> std::collections::BTreeSet<String> {
        self.files.keys().map(|k| k.split('/').next().unwrap_or(k).to_string()).collect()
    }
}

/// Create, write and fsync one file (fault points before each step).
fn write_synced(path: &Path, bytes: &[u8]) -> Result<()> {
    point("create", path);
    let mut f = File::create(path).map_err(|e| Error::io(path, e))?;
    let half = bytes.len() / 2;
    f.write_all(&bytes[..half]).map_err(|e| Error::io(path, e))?;
    if faults::write_fails() {
        return Err(Error::io(path, std::io::Error::other("injected write failure (testing hook)")));
    }
    point("write", path);
    f.write_all(&bytes[half..]).map_err(|e| Error::io(path, e))?;
    point("fsync", path);
    f.sync_all().map_err(|e| Error::io(path, e))
}

/// Save a directory as one unit: `f` writes the new contents into a [`Staged`] directory,
/// which then replaces `target` atomically. `owns(name)` says which top-level names of an
/// existing target belong to this kind of save (they are replaced or dropped); every other
/// entry is carried over. An error or panic in `f` leaves `target` untouched.
pub fn save_dir<T>(target: &Path, owns: &dyn Fn(&str) -> bool, f: impl FnOnce(&mut Staged) -> Result<T>) -> Result<T> {
    let (parent, name) = split(target)?;
    settle(target)?;
    let target = resolved(target)?;
    if target.exists() && !target.is_dir() {
        return Err(Error::file(&target, "exists and is not a directory"));
    }
    if !parent.as_os_str().is_empty() && !parent.is_dir() {
        fs::create_dir_all(&parent).map_err(|e| Error::io(&parent, e))?;
    }
    remove_debris(&parent, &name);
    let root = sibling(&parent, &name, STAGE);
    point("mkdir", &root);
    fs::create_dir(&root).map_err(|e| Error::io(&root, e))?;
    /// Removes the staging directory unless the save committed (error or panic in `f`).
    struct Cleanup<'a>(&'a Path, bool);
    impl Drop for Cleanup<'_> {
        fn drop(&mut self) {
            if !self.1 {
                let _ = fs::remove_dir_all(self.0);
            }
        }
    }
    let mut guard = Cleanup(&root, false);
    let mut st = Staged { root: root.clone(), save_id: manifest::new_save_id(), files: BTreeMap::new() };
    let out = f(&mut st)?;
    if target.is_dir() {
        let written = st.written_top();
        carry_over(&target, &st.root, &|n: &str| n == MANIFEST || owns(n) || written.contains(n))?;
    }
    let m = Manifest { save_id: st.save_id.clone(), files: std::mem::take(&mut st.files) };
    write_synced(&root.join(MANIFEST), &m.to_json())?;
    sync_tree(&root)?;
    commit(&root, &target, &parent)?;
    guard.1 = true;
    Ok(out)
}

/// Hard-link (or copy) every top-level entry of `from` not `skip`ped into `to`.
fn carry_over(from: &Path, to: &Path, skip: &dyn Fn(&str) -> bool) -> Result<()> {
    for e in fs::read_dir(from).map_err(|e| Error::io(from, e))? {
        let e = e.map_err(|e| Error::io(from, e))?;
        let name = e.file_name().to_string_lossy().into_owned();
        if skip(&name) {
            continue;
        }
        link_tree(&e.path(), &to.join(&name))?;
    }
    Ok(())
}

fn link_tree(from: &Path, to: &Path) -> Result<()> {
    let meta = fs::symlink_metadata(from).map_err(|e| Error::io(from, e))?;
    point("link", to);
    if meta.file_type().is_symlink() {
        let target = fs::read_link(from).map_err(|e| Error::io(from, e))?;
        std::os::unix::fs::symlink(target, to).map_err(|e| Error::io(to, e))
    } else if meta.is_dir() {
        fs::create_dir(to).map_err(|e| Error::io(to, e))?;
        for e in fs::read_dir(from).map_err(|e| Error::io(from, e))? {
            let e = e.map_err(|e| Error::io(from, e))?;
            link_tree(&e.path(), &to.join(e.file_name()))?;
        }
        Ok(())
    } else if fs::hard_link(from, to).is_ok() {
        Ok(())
    } else {
        fs::copy(from, to).map(drop).map_err(|e| Error::io(to, e))?;
        File::open(to).and_then(|f| f.sync_all()).map_err(|e| Error::io(to, e))
    }
}

/// fsync every directory under `root`, deepest first, then `root`.
fn sync_tree(root: &Path) -> Result<()> {
    for e in fs::read_dir(root).map_err(|e| Error::io(root, e))? {
        let e = e.map_err(|e| Error::io(root, e))?;
        if e.file_type().map_err(|err| Error::io(&e.path(), err))?.is_dir() {
            sync_tree(&e.path())?;
        }
    }
    point("fsync", root);
    sync_dir(root)
}

/// Put the complete staging directory `root` in place of `target`.
fn commit(root: &Path, target: &Path, parent: &Path) -> Result<()> {
    if !target.exists() {
        point("rename", target);
        fs::rename(root, target).map_err(|e| Error::io(target, e))?;
        point("fsync", parent);
        return sync_dir(parent);
    }
    if std::env::var_os(NO_EXCHANGE_ENV).is_none() {
        point("exchange", target);
        match exchange(root, target) {
            Ok(()) => {
                point("fsync", parent);
                sync_dir(parent)?;
                // `root` now holds the previous contents.
                point("remove", root);
                let _ = fs::remove_dir_all(root);
                return Ok(());
            }
            Err(e) if exchange_unsupported(&e) => {}
            Err(e) => return Err(Error::io(target, e)),
        }
    }
    let (_, name) = split(target)?;
    let old = sibling(parent, &name, OLD);
    point("rename", &old);
    fs::rename(target, &old).map_err(|e| Error::io(target, e))?;
    point("rename", target);
    fs::rename(root, target).map_err(|e| Error::io(target, e))?;
    point("fsync", parent);
    sync_dir(parent)?;
    point("remove", &old);
    let _ = fs::remove_dir_all(&old);
    Ok(())
}

#[cfg(target_os = "linux")]
fn exchange(a: &Path, b: &Path) -> std::io::Result<()> {
    use std::ffi::CString;
    use std::os::unix::ffi::OsStrExt;
    let ca = CString::new(a.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    let cb = CString::new(b.as_os_str().as_bytes()).map_err(std::io::Error::other)?;
    // SAFETY: two valid NUL-terminated paths relative to the working directory.
    let r = unsafe { libc::renameat2(libc::AT_FDCWD, ca.as_ptr(), libc::AT_FDCWD, cb.as_ptr(), libc::RENAME_EXCHANGE) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(not(target_os = "linux"))]
fn exchange(_: &Path, _: &Path) -> std::io::Result<()> {
    Err(std::io::Error::from(std::io::ErrorKind::Unsupported))
}

fn exchange_unsupported(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::Unsupported
        || matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP))
}

/// The parent directory and the file name of `target`.
fn split(target: &Path) -> Result<(PathBuf, String)> {
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| Error::file(target, "cannot save to a path without a final name"))?;
    Ok((target.parent().map(Path::to_path_buf).unwrap_or_default(), name))
}

/// `target` with a symlink at its end resolved, so the exchange replaces the real directory.
fn resolved(target: &Path) -> Result<PathBuf> {
    match fs::symlink_metadata(target) {
        Ok(m) if m.file_type().is_symlink() => fs::canonicalize(target).map_err(|e| Error::io(target, e)),
        _ => Ok(target.to_path_buf()),
    }
}

fn sibling(parent: &Path, name: &str, kind: &str) -> PathBuf {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    parent.join(format!(".{name}.{kind}-{}-{seq}", std::process::id()))
}

/// The process id in a sibling's name, if `entry` is a sibling of `name` of `kind`.
fn sibling_pid(entry: &str, name: &str, kind: &str) -> Option<u32> {
    let rest = entry.strip_prefix(&format!(".{name}.{kind}-"))?;
    rest.split('-').next()?.parse().ok()
}

fn alive(pid: u32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    pid != std::process::id() && unsafe { libc::kill(pid as libc::pid_t, 0) } == 0
}

/// Remove staging and renamed-aside directories of `name` left by saves whose process is gone
/// (called after [`settle`], which has put back a renamed-aside directory that was needed).
fn remove_debris(parent: &Path, name: &str) {
    let dir = if parent.as_os_str().is_empty() { Path::new(".") } else { parent };
    let Ok(entries) = fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let entry = e.file_name().to_string_lossy().into_owned();
        if let Some(pid) = sibling_pid(&entry, name, STAGE).or_else(|| sibling_pid(&entry, name, OLD)) {
            if !alive(pid) {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
}

/// Finish what an interrupted save left: when `dir` is missing but a save had renamed it
/// aside (the fallback path), rename it back; then check the manifest. Every load calls it.
pub fn settle(dir: &Path) -> Result<()> {
    let (parent, name) = split(dir)?;
    if fs::symlink_metadata(dir).is_err() {
        let look = if parent.as_os_str().is_empty() { Path::new(".") } else { &parent };
        if let Ok(entries) = fs::read_dir(look) {
            let mut old: Vec<PathBuf> = entries
                .flatten()
                .filter(|e| sibling_pid(&e.file_name().to_string_lossy(), &name, OLD).is_some_and(|pid| !alive(pid)))
                .map(|e| e.path())
                .collect();
            old.sort();
            if let Some(last) = old.pop() {
                fs::rename(&last, dir).map_err(|e| Error::io(dir, e))?;
                sync_dir(look)?;
            }
        }
    }
    Ok(())
}

/// [`settle`] `dir`, then check that it holds one complete save (see [`manifest::verify`]).
pub fn check_dir(dir: &Path) -> Result<()> {
    settle(dir)?;
    manifest::verify(dir)
}

fn sync_dir(dir: &Path) -> Result<()> {
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    // Persist the entries; not every platform lets a directory be opened for sync.
    if let Ok(d) = File::open(dir) {
        d.sync_all().map_err(|e| Error::io(dir, e))?;
    }
    Ok(())
}

/// Write one file atomically: temp file beside it, fsync, rename over `path`, fsync the
/// directory. A failure leaves the previous file untouched and no temp file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    let result = write_synced(&tmp, bytes).and_then(|()| {
        point("rename", path);
        fs::rename(&tmp, path).map_err(|e| Error::io(path, e))?;
        sync_dir(path.parent().unwrap_or(Path::new("")))
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}
