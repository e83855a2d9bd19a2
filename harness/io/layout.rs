//! Where the tensors of a Hugging Face model directory live: the file names transformers
//! uses (`config.json`, `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`), the index read strictly, and the opened (memory-mapped)
//! files with each key's file. Both the dense and the 4-bit readers build on it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::io::fields::Fields;
use crate::io::st::StFile;

/// The single-file weights name.
pub const SINGLE: &str = "model.safetensors";
/// The shard index name.
pub const INDEX: &str = "model.safetensors.index.json";
/// The config name.
pub const CONFIG: &str = "config.json";

/// Where each tensor of a checkpoint directory lives.
pub struct Layout {
    /// file → tensors in it.
    pub files: BTreeMap<PathBuf, Vec<String>>,
    /// The file that lists the tensors (the index when sharded, else the single file).
    pub listing: PathBuf,
}

pub fn layout(dir: &Path) -> Result<Layout> {
    let single = dir.join(SINGLE);
    let index = dir.join(INDEX);
    if single.exists() && !single.is_file() {
        return Err(Error::file(&single, "is not a regular file"));
    }
    if single.is_file() {
        let names = StFile::open(&single)?.names()?;
        return Ok(Layout { files: [(single.clone(), names)].into(), listing: single });
    }
    if !index.is_file() {
        return Err(Error::file(dir, format!("has neither {SINGLE} nor {INDEX}")));
    }
    let bytes = std::fs::read(&index).map_err(|e| Error::io(&index, e))?;
    let v = Fields::parse(&bytes, &index)?;
    let c = Fields::new(&v, Some(&index), "")?;
    if let Some(meta) = c.opt_object("metadata")? {
        meta.opt_f64("total_size")?;
    }
    let map = c.object_field("weight_map")?;
    let mut files: BTreeMap<PathBuf, Vec<String>> = BTreeMap::new();
    for key in map.object().keys() {
        let file = map.str(key)?;
        if file.contains('/') || file.contains('\\') || file.starts_with('.') {
            return Err(map.bad(key, format!("`{file}` is not a plain file name in the checkpoint directory")));
        }
        files.entry(dir.join(file)).or_default().push(key.clone());
    }
    Ok(Layout { files, listing: index })
}

/// The opened files of a checkpoint and where each key lives.
pub struct Opened {
    /// key → file path.
    pub index: BTreeMap<String, PathBuf>,
    /// file path → mapped file.
    pub files: BTreeMap<PathBuf, StFile>,
}

impl Opened {
    /// The file holding `key`, or a "missing" error naming `listing`.
    pub fn file_of(&self, key: &str, listing: &Path) -> Result<&StFile> {
        let path = self.index.get(key).ok_or_else(|| Error::tensor(listing, key, "missing"))?;
        Ok(&self.files[path])
    }
}

pub fn open_all(layout: &Layout) -> Result<Opened> {
    let mut index = BTreeMap::new();
    let mut files = BTreeMap::new();
    for (file, listed) in &layout.files {
        if !file.is_file() {
            return Err(Error::tensor(
                &layout.listing,
                &listed[0],
                format!("listed in {} which does not exist", file.display()),
            ));
        }
        let st = StFile::open(file)?;
        let present = st.names()?;
        for key in listed {
            if !present.contains(key) {
                return Err(Error::tensor(
                    file,
                    key,
                    format!("listed in {} but not in this file", layout.listing.display()),
                ));
            }
            index.insert(key.clone(), file.clone());
        }
        files.insert(file.clone(), st);
    }
    Ok(Opened { index, files })
}

/// The top-level names a model save owns in its directory (replaced or dropped by the next
/// save; anything else there is kept).
pub fn owns(name: &str) -> bool {
    name == CONFIG || name == SINGLE || name == INDEX || is_shard_name(name)
}

/// `model-NNNNN-of-NNNNN.safetensors`, the names transformers gives shards.
fn is_shard_name(name: &str) -> bool {
    let Some(rest) = name.strip_prefix("model-").and_then(|r| r.strip_suffix(".safetensors")) else {
        return false;
    };
    let b = rest.as_bytes();
    b.len() == 14 && &rest[5..9] == "-of-" && b[..5].iter().chain(&b[9..]).all(u8::is_ascii_digit)
}
