//! safetensors ↔ candle: memory-mapped reading with errors that name the file and tensor,
//! and writing named tensors (a standalone file atomically, or a file of a directory save).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype as StDtype, SafeTensors, View};

use crate::error::{Error, Result};
use crate::io::atomic::{write_atomic, Staged};

/// Tensors of at least this many bytes are copied out of the map in slices of this size.
const LARGE: usize = 64 << 20;

/// A memory-mapped safetensors file.
pub struct StFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
}

impl StFile {
    /// Map `path` and check its header.
    pub fn open(path: &Path) -> Result<Self> {
        if path.is_dir() {
            return Err(Error::file(path, "is a directory, expected a .safetensors file"));
        }
        let file = File::open(path).map_err(|e| Error::io(path, e))?;
        // SAFETY: the map is read-only; tunecheck never writes a file it has mapped (saves go
        // to a temp file and are renamed over, which leaves the mapped inode intact).
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))?;
        let f = StFile { path: path.to_path_buf(), mmap };
        f.parse()?;
        Ok(f)
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The parsed header and data.
    pub fn parse(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.mmap)
            .map_err(|e| Error::file(&self.path, format!("not a valid safetensors file: {e}")))
    }

    /// Names of the tensors in the file, sorted.
    pub fn names(&self) -> Result<Vec<String>> {
        let mut v: Vec<String> = self.parse()?.names().into_iter().map(str::to_string).collect();
        v.sort();
        Ok(v)
    }

    /// Dtype and shape of `key`, if present.
    pub fn info(&self, key: &str) -> Result<Option<(StDtype, Vec<usize>)>> {
        let st = self.parse()?;
        Ok(st.tensor(key).ok().map(|t| (t.dtype(), t.shape().to_vec())))
    }

    /// The stored bytes of `key`, borrowed from the memory map.
    pub fn view(&self, key: &str) -> Result<safetensors::tensor::TensorView<'_>> {
        self.parse()?.tensor(key).map_err(|_| Error::tensor(&self.path, key, "missing"))
    }

    /// Drop the pages holding `key`'s bytes from this process (they stay in the page cache and
    /// are read again on the next access): a pass that streams a large file a tensor at a time
    /// then keeps its resident memory near one tensor.
    pub fn release(&self, key: &str) {
        if let Ok(v) = self.view(key) {
            let data = v.data();
            let start = data.as_ptr() as usize - self.mmap.as_ptr() as usize;
            self.release_range(start, data.len());
        }
    }

    /// [`StFile::release`] for a byte range of the file.
    pub fn release_range(&self, start: usize, len: usize) {
        // SAFETY: the map is read-only and private; dropping its pages only makes the next
        // read fault them in from the file again, with the same contents.
        let _ = unsafe { self.mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len) };
    }

    /// Load `key` as a candle tensor on the host with its stored dtype.
    pub fn load(&self, key: &str) -> Result<Tensor> {
        let st = self.parse()?;
        let view = st.tensor(key).map_err(|_| Error::tensor(&self.path, key, "missing"))?;
        let dtype = candle_dtype(view.dtype())
            .ok_or_else(|| Error::tensor(&self.path, key, format!("dtype {:?} is not supported", view.dtype())))?;
        let bad = |e: candle_core::Error| Error::tensor(&self.path, key, format!("unreadable data: {e}"));
        let data = view.data();
        let (elem, n) = (view.dtype().bitsize() / 8, view.shape().iter().product::<usize>());
        if data.len() < LARGE || elem == 0 || data.len() != n * elem || cfg!(target_endian = "big") {
            return Tensor::from_raw_buffer(data, dtype, view.shape(), &Device::Cpu).map_err(bad);
        }
        // A large tensor: copy it in slices, dropping each slice's mapped pages once copied, so
        // it is resident once (not once in the copy and once in the map).
        let start = data.as_ptr() as usize - self.mmap.as_ptr() as usize;
        let copy = |out: &mut [u8]| {
            for (i, dst) in out.chunks_mut(LARGE).enumerate() {
                dst.copy_from_slice(&data[i * LARGE..i * LARGE + dst.len()]);
                self.release_range(start + i * LARGE, dst.len());
            }
        };
        macro_rules! typed {
            ($t:ty) => {{
                let mut v: Vec<$t> = vec![<$t>::default(); n];
                // SAFETY: a plain-old-data slice viewed as its bytes, for a byte copy of
                // little-endian values into their native layout (x86 and ARM are little-endian).
                copy(unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut u8, n * elem) });
                Tensor::from_vec(v, view.shape(), &Device::Cpu).map_err(bad)
            }};
        }
        match dtype {
            DType::BF16 => typed!(half::bf16),
            DType::F16 => typed!(half::f16),
            DType::F32 => typed!(f32),
            DType::F64 => typed!(f64),
            _ => Tensor::from_raw_buffer(data, dtype, view.shape(), &Device::Cpu).map_err(bad),
        }
    }

    /// Load `key` and require a floating dtype and `shape`; returns it cast to `dtype` on `device`.
    pub fn load_float(&self, key: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let (st_dtype, got) = self.info(key)?.ok_or_else(|| Error::tensor(&self.path, key, "missing"))?;
        if !matches!(st_dtype, StDtype::F32 | StDtype::F16 | StDtype::BF16 | StDtype::F64) {
            return Err(Error::tensor(
                &self.path,
                key,
                format!("dtype {st_dtype:?} is not a float type (F32, BF16, F16, F64)"),
            ));
        }
        if got != shape {
            return Err(Error::tensor(&self.path, key, format!("shape {got:?}, expected {shape:?}")));
        }
        Ok(self.load(key)?.to_dtype(dtype)?.to_device(device)?)
    }
}

/// The candle dtype of a safetensors dtype, if candle has it.
pub fn candle_dtype(d: StDtype) -> Option<DType> {
    Some(match d {
        StDtype::U8 => DType::U8,
        StDtype::U32 => DType::U32,
        StDtype::I64 => DType::I64,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        StDtype::F32 => DType::F32,
        StDtype::F64 => DType::F64,
        _ => return None,
    })
}

fn st_dtype(d: DType) -> Result<StDtype> {
    Ok(match d {
        DType::U8 => StDtype::U8,
        DType::U32 => StDtype::U32,
        DType::I64 => StDtype::I64,
        DType::F16 => StDtype::F16,
        DType::BF16 => StDtype::BF16,
        DType::F32 => StDtype::F32,
        DType::F64 => StDtype::F64,
        other => return Err(Error::Msg(format!("dtype {other:?} cannot be written to safetensors"))),
    })
}

/// A tensor copied to host bytes, ready to serialise.
pub struct HostTensor {
    dtype: StDtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl HostTensor {
    /// Copy `t` to the host as little-endian bytes.
    pub fn from_tensor(t: &Tensor) -> Result<Self> {
        let shape = t.dims().to_vec();
        let t = t.to_device(&Device::Cpu)?.flatten_all()?;
        let data: Vec<u8> = match t.dtype() {
            DType::U8 => t.to_vec1::<u8>()?,
            DType::U32 => t.to_vec1::<u32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::I64 => t.to_vec1::<i64>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::F16 => t.to_vec1::<half::f16>()?.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
            DType::BF16 => t.to_vec1::<half::bf16>()?.iter().flat_map(|v| v.to_bits().to_le_bytes()).collect(),
            DType::F32 => t.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::F64 => t.to_vec1::<f64>()?.iter().flat_map(|v| v.to_le_bytes()).collect(),
            other => return Err(Error::Msg(format!("dtype {other:?} cannot be written to safetensors"))),
        };
        Ok(HostTensor { dtype: st_dtype(t.dtype())?, shape, data })
    }

    /// Byte size of the data.
    pub fn nbytes(&self) -> usize {
        self.data.len()
    }
}

impl View for HostTensor {
    fn dtype(&self) -> StDtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// Copy `t` to host bytes keeping its shape.
pub fn host(t: &Tensor) -> Result<HostTensor> {
    HostTensor::from_tensor(t)
}

/// Serialise `tensors` (with `{"format": "pt"}` metadata, as transformers writes) to `path`
/// atomically.
pub fn write_safetensors(path: &Path, tensors: &BTreeMap<String, Tensor>) -> Result<()> {
    write_atomic(path, &serialize(path, hosted(tensors)?)?)
}

/// Copy every tensor of `tensors` to the host.
pub fn hosted(tensors: &BTreeMap<String, Tensor>) -> Result<Vec<(String, HostTensor)>> {
    tensors.iter().map(|(k, t)| Ok((k.clone(), host(t)?))).collect()
}

/// Write already-copied tensors as `rel` of a directory save; the file's metadata carries the
/// save id beside transformers' `{"format": "pt"}`.
pub fn stage_tensors(st: &mut Staged, rel: &str, tensors: Vec<(String, HostTensor)>) -> Result<()> {
    stage_views(st, rel, tensors)
}

/// Write tensors as `rel` of a directory save, streaming each one's bytes to the file (a view
/// may borrow from a mapped input file, so nothing is copied in memory).
pub fn stage_views<V: View>(st: &mut Staged, rel: &str, tensors: Vec<(String, V)>) -> Result<()> {
    let meta = save_metadata(st);
    st.write_with(rel, |path| {
        safetensors::serialize_to_file(tensors, Some(meta), path)
            .map_err(|e| Error::file(path, format!("cannot serialise: {e}")))
    })
}

fn serialize(path: &Path, tensors: Vec<(String, HostTensor)>) -> Result<Vec<u8>> {
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    safetensors::serialize(tensors, Some(meta)).map_err(|e| Error::file(path, format!("cannot serialise: {e}")))
}

/// A tensor to write: bytes on the host, or a view into a mapped safetensors file.
pub enum OutTensor<'a> {
    /// Copied or computed bytes.
    Host(HostTensor),
    /// Bytes borrowed from an input file's memory map.
    Mapped(safetensors::tensor::TensorView<'a>),
}

impl View for OutTensor<'_> {
    fn dtype(&self) -> StDtype {
        match self {
            OutTensor::Host(h) => h.dtype(),
            OutTensor::Mapped(v) => v.dtype(),
        }
    }
    fn shape(&self) -> &[usize] {
        match self {
            OutTensor::Host(h) => View::shape(h),
            OutTensor::Mapped(v) => v.shape(),
        }
    }
    fn data(&self) -> Cow<'_, [u8]> {
        match self {
            OutTensor::Host(h) => h.data(),
            OutTensor::Mapped(v) => Cow::Borrowed(v.data()),
        }
    }
    fn data_len(&self) -> usize {
        match self {
            OutTensor::Host(h) => h.data_len(),
            OutTensor::Mapped(v) => v.data().len(),
        }
    }
}

/// A safetensors file written one tensor at a time, for outputs larger than memory whose
/// tensors are only known as they are produced (a layer quantized at a time). Room for the
/// header is reserved up front (`header_room` bytes, an upper bound the caller computes from
/// the names it will write); tensors are appended as they come; [`StreamedFile::finish`]
/// writes the header into the room, padded with spaces as the format allows. Written through
/// [`Staged::write_with`], so it is fsynced and recorded like every other file of a save.
pub struct StreamedFile {
    file: std::io::BufWriter<File>,
    path: PathBuf,
    room: usize,
    offset: usize,
    /// Bytes appended since the written pages were last flushed and dropped from the cache.
    unflushed: usize,
    entries: Vec<(String, StDtype, Vec<usize>, usize, usize)>,
}

/// Bytes a [`StreamedFile`] appends before it writes them out and drops them from the page
/// cache: a multi-gigabyte file otherwise fills the cache with dirty pages, which count
/// against a memory limit (a cgroup's) although nothing reads them again.
const FLUSH_EVERY: usize = 256 << 20;

impl StreamedFile {
    /// Start `path` with `header_room` bytes (rounded up to 8) reserved for the header.
    pub fn create(path: &Path, header_room: usize) -> Result<StreamedFile> {
        use std::io::Write;
        let room = header_room.div_ceil(8) * 8;
        let mut file = std::io::BufWriter::new(File::create(path).map_err(|e| Error::io(path, e))?);
        file.write_all(&vec![b' '; 8 + room]).map_err(|e| Error::io(path, e))?;
        Ok(StreamedFile { file, path: path.to_path_buf(), room, offset: 0, unflushed: 0, entries: Vec::new() })
    }

    /// An upper bound of the header bytes one tensor named `name` takes.
    pub fn room_for(name: &str) -> usize {
        // {"name":{"dtype":"BF16","shape":[d0,d1],"data_offsets":[b,e]}}, numbers ≤ 20 digits.
        name.len() + 160
    }

    /// Append one tensor.
    pub fn push(&mut self, name: &str, dtype: StDtype, shape: &[usize], data: &[u8]) -> Result<()> {
        use std::io::Write;
        let want = (shape.iter().product::<usize>() * dtype.bitsize()).div_ceil(8);
        if data.len() != want {
            return Err(Error::tensor(
                &self.path,
                name,
                format!("{} bytes for shape {shape:?} of {dtype:?}", data.len()),
            ));
        }
        self.file.write_all(data).map_err(|e| Error::io(&self.path, e))?;
        self.entries.push((name.to_string(), dtype, shape.to_vec(), self.offset, self.offset + data.len()));
        self.offset += data.len();
        self.unflushed += data.len();
        if self.unflushed >= FLUSH_EVERY {
            self.unflushed = 0;
            self.file.flush().map_err(|e| Error::io(&self.path, e))?;
            let f = self.file.get_ref();
            f.sync_data().map_err(|e| Error::io(&self.path, e))?;
            #[cfg(target_os = "linux")]
            // SAFETY: plain syscall on a file descriptor this struct owns; advice only.
            unsafe {
                use std::os::fd::AsRawFd;
                libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED);
            }
        }
        Ok(())
    }

    /// Append a tensor that implements safetensors' `View` (host bytes or a mapped view).
    pub fn push_view(&mut self, name: &str, v: &impl View) -> Result<()> {
        let data = v.data();
        self.push(name, v.dtype(), v.shape(), &data)
    }

    /// Write the header (with `metadata`) into the reserved room and close the file.
    pub fn finish(self, metadata: &HashMap<String, String>) -> Result<()> {
        use std::io::{Seek, SeekFrom, Write};
        let mut header = serde_json::Map::new();
        header.insert("__metadata__".into(), serde_json::json!(metadata));
        for (name, dtype, shape, start, end) in &self.entries {
            header.insert(
                name.clone(),
                serde_json::json!({"dtype": format!("{dtype:?}"), "shape": shape, "data_offsets": [start, end]}),
            );
        }
        let text = serde_json::to_string(&header).map_err(|e| Error::Msg(e.to_string()))?;
        if text.len() > self.room {
            return Err(Error::file(
                &self.path,
                format!(
                    "the header takes {} bytes, {} were reserved (a bug in the room estimate)",
                    text.len(),
                    self.room
                ),
            ));
        }
        let mut file = self.file.into_inner().map_err(|e| Error::io(&self.path, e.into_error()))?;
        file.seek(SeekFrom::Start(0)).map_err(|e| Error::io(&self.path, e))?;
        file.write_all(&(self.room as u64).to_le_bytes()).map_err(|e| Error::io(&self.path, e))?;
        file.write_all(text.as_bytes()).map_err(|e| Error::io(&self.path, e))?;
        Ok(())
    }
}

/// The header metadata every safetensors file of a save carries: the format and the save id.
pub fn save_metadata(st: &Staged) -> HashMap<String, String> {
    [("format".to_string(), "pt".to_string()), (crate::io::manifest::SAVE_ID_KEY.to_string(), st.save_id().to_string())]
        .into()
}
