//! The save manifest, `tunecheck-save.json`: what one save wrote, so that a directory holding
//! files of two different saves (a torn directory, whoever made it) is reported instead of
//! loaded.
//!
//! Every save gets a random save id. Each safetensors file it writes carries that id in its
//! header metadata (`__metadata__.tunecheck_save`, beside transformers' `format: pt`), and the
//! manifest lists every file with its size and, for files that are not safetensors (small
//! JSON), its SHA-256. Checking a directory therefore costs the headers and the small files,
//! never the tensor data, whatever the checkpoint's size. A directory without a manifest was
//! written by something else (transformers, PEFT) and is loaded as it is.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Component, Path};

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::io::fields::Fields;

/// The manifest's file name.
pub const MANIFEST: &str = "tunecheck-save.json";
/// The safetensors header metadata key holding the save id.
pub const SAVE_ID_KEY: &str = "tunecheck_save";
/// The manifest format tag.
pub const FORMAT: &str = "tunecheck-save/1";

/// One file of a save.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    /// Its size.
    pub bytes: u64,
    /// SHA-256 (hex) of its contents, for files that are not safetensors.
    pub sha256: Option<String>,
}

/// What one save wrote.
#[derive(Debug, Clone, PartialEq)]
pub struct Manifest {
    /// The save's random id.
    pub save_id: String,
    /// Files by path relative to the saved directory, `/`-separated.
    pub files: BTreeMap<String, Entry>,
}

/// A fresh save id: 128 bits from the clock, the process id and a counter, hashed.
pub fn new_save_id() -> String {
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut h = Sha256::new();
    h.update(now.to_le_bytes());
    h.update(std::process::id().to_le_bytes());
    h.update(seq.to_le_bytes());
    hex(&h.finalize()[..16])
}

/// SHA-256 of `bytes`, hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Whether a file is checked by the save id in its header rather than by a hash.
pub fn is_safetensors(rel: &str) -> bool {
    rel.ends_with(".safetensors")
}

impl Manifest {
    /// The manifest's bytes.
    pub fn to_json(&self) -> Vec<u8> {
        let files: Map<String, Value> = self
            .files
            .iter()
            .map(|(k, e)| {
                let mut o = json!({"bytes": e.bytes});
                if let Some(h) = &e.sha256 {
                    o["sha256"] = json!(h);
                }
                (k.clone(), o)
            })
            .collect();
        let v = json!({"format": FORMAT, "save_id": self.save_id, "files": files});
        serde_json::to_vec_pretty(&v).expect("a JSON value serialises")
    }

    /// Parse a manifest; a field of the wrong type or a path leaving the directory is an error
    /// naming `path` and the field.
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Self> {
        let v = Fields::parse(bytes, path)?;
        let c = Fields::new(&v, Some(path), "")?;
        let format = c.str("format")?;
        if format != FORMAT {
            return Err(c.bad("format", format!("`{format}` is not a format this version reads ({FORMAT})")));
        }
        let save_id = c.str("save_id")?.to_string();
        let list = c.object_field("files")?;
        let mut files = BTreeMap::new();
        for rel in list.object().keys() {
            if rel.is_empty() || !Path::new(rel).components().all(|x| matches!(x, Component::Normal(_))) {
                return Err(list.bad(rel, "is not a relative path inside the directory"));
            }
            let e = list.object_field(rel)?;
            let sha256 = e.opt_str("sha256")?.map(str::to_string);
            if let Some(h) = &sha256 {
                if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(e.bad("sha256", format!("expected 64 hex digits, got `{h}`")));
                }
            } else if !is_safetensors(rel) {
                return Err(e.bad("sha256", "missing (required for a file that is not safetensors)"));
            }
            files.insert(rel.clone(), Entry { bytes: e.u64("bytes")?, sha256 });
        }
        Ok(Manifest { save_id, files })
    }
}

/// The save id in a safetensors file's header metadata, if any.
pub fn header_save_id(path: &Path) -> Result<Option<String>> {
    let mut f = File::open(path).map_err(|e| Error::io(path, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len).map_err(|e| Error::io(path, e))?;
    let n = u64::from_le_bytes(len);
    if n > 100_000_000 {
        return Err(Error::file(path, format!("safetensors header of {n} bytes is implausibly large")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| Error::io(path, e))?;
    let v: Value = serde_json::from_slice(&header)
        .map_err(|e| Error::file(path, format!("safetensors header is not valid JSON: {e}")))?;
    Ok(v.get("__metadata__").and_then(|m| m.get(SAVE_ID_KEY)).and_then(Value::as_str).map(str::to_string))
}

/// Check that `dir` holds exactly what its last save wrote: every file the manifest lists is
/// there with its size, and carries the save id (safetensors) or its hash (other files). No
/// manifest: nothing to check. A mismatch is an error naming the file and saying the directory
/// mixes saves.
pub fn verify(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        return Ok(()); // the loader reports what is there instead
    }
    let path = dir.join(MANIFEST);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(&path, e)),
    };
    let m = Manifest::parse(&path, &bytes)?;
    let torn = |file: &Path, why: String| {
        Error::file(
            file,
            format!(
                "torn checkpoint: {why}; the directory does not hold one complete save (as {MANIFEST} \
                 describes it), so it is not loaded"
            ),
        )
    };
    for (rel, e) in &m.files {
        let file = dir.join(rel);
        let meta = match std::fs::metadata(&file) {
            Ok(meta) if meta.is_file() => meta,
            Ok(_) => return Err(torn(&file, "is not a regular file".into())),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Err(torn(&file, "is missing".into()));
            }
            Err(err) => return Err(Error::io(&file, err)),
        };
        if meta.len() != e.bytes {
            return Err(torn(&file, format!("has {} bytes where the save wrote {}", meta.len(), e.bytes)));
        }
        match &e.sha256 {
            Some(h) => {
                let got = sha256_hex(&std::fs::read(&file).map_err(|err| Error::io(&file, err))?);
                if &got != h {
                    return Err(torn(&file, "its contents differ from what the save wrote (SHA-256)".into()));
                }
            }
            None => match header_save_id(&file)? {
                Some(id) if id == m.save_id => {}
                Some(_) => return Err(torn(&file, "was written by another save".into())),
                None => return Err(torn(&file, "carries no save id (it was not written by this save)".into())),
            },
        }
    }
    Ok(())
}
