//! The one strict reader for every JSON object tunecheck reads (`config.json` and its
//! `quantization_config`, `adapter_config.json`, bitsandbytes quant-state blobs, the shard
//! index, `trainer_state.json`, the save manifest): a field of the wrong type is an error
//! naming the file and the field, never a default; unknown fields are accepted; fields that
//! would change the computation in a way tunecheck does not implement are refused by name
//! ([`Fields::refuse_unless`]).
//!
//! A JSON `null` counts as absent, as transformers and PEFT write unset options as `null`.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::error::{Error, Result};

/// Typed access to one JSON object's fields.
#[derive(Clone)]
pub struct Fields<'a> {
    obj: &'a Map<String, Value>,
    file: Option<PathBuf>,
    prefix: String,
}

/// A short rendering of a JSON value for error messages.
pub fn show(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        format!("{}…", s.chars().take(60).collect::<String>())
    } else {
        s
    }
}

impl<'a> Fields<'a> {
    /// The object `v` read from `file` (`None` for a value built in code; attach it later with
    /// [`Error::in_file`]); `prefix` (e.g. `"quantization_config"`) is put before field names.
    pub fn new(v: &'a Value, file: Option<&Path>, prefix: &str) -> Result<Self> {
        match v {
            Value::Object(obj) => Ok(Fields { obj, file: file.map(Path::to_path_buf), prefix: prefix.to_string() }),
            other => Err(Error::Config {
                file: file.map(Path::to_path_buf),
                field: if prefix.is_empty() { "(root)".to_string() } else { prefix.to_string() },
                msg: format!("expected a JSON object, got {}", show(other)),
            }),
        }
    }

    /// Parse `bytes` as the JSON object of `file`.
    pub fn parse(bytes: &[u8], file: &Path) -> Result<Value> {
        serde_json::from_slice(bytes).map_err(|e| Error::file(file, format!("not valid JSON: {e}")))
    }

    /// The full name of field `k`.
    pub fn name(&self, k: &str) -> String {
        if self.prefix.is_empty() {
            k.to_string()
        } else {
            format!("{}.{k}", self.prefix)
        }
    }

    /// An error about field `k`.
    pub fn bad(&self, k: &str, msg: impl Into<String>) -> Error {
        Error::Config { file: self.file.clone(), field: self.name(k), msg: msg.into() }
    }

    /// The raw object.
    pub fn object(&self) -> &'a Map<String, Value> {
        self.obj
    }

    /// Field `k` unless absent or `null`.
    pub fn get(&self, k: &str) -> Option<&'a Value> {
        self.obj.get(k).filter(|v| !v.is_null())
    }

    /// Whether field `k` is present at all (even as `null`).
    pub fn present(&self, k: &str) -> bool {
        self.obj.contains_key(k)
    }

    fn want<T>(&self, k: &str, v: Option<T>) -> Result<T> {
        v.ok_or_else(|| self.bad(k, "missing"))
    }

    /// A required string.
    pub fn str(&self, k: &str) -> Result<&'a str> {
        let v = self.opt_str(k)?;
        self.want(k, v)
    }

    /// An optional string.
    pub fn opt_str(&self, k: &str) -> Result<Option<&'a str>> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(self.bad(k, format!("expected a string, got {}", show(v)))),
        }
    }

    /// A required non-negative integer below 2^32.
    pub fn usize(&self, k: &str) -> Result<usize> {
        let v = self.opt_usize(k)?;
        self.want(k, v)
    }

    /// An optional non-negative integer below 2^32.
    pub fn opt_usize(&self, k: &str) -> Result<Option<usize>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|&n| n <= u32::MAX as u64)
                .map(|n| Some(n as usize))
                .ok_or_else(|| self.bad(k, format!("expected a non-negative integer below 2^32, got {}", show(v)))),
        }
    }

    /// A required non-negative 64-bit integer.
    pub fn u64(&self, k: &str) -> Result<u64> {
        match self.get(k) {
            None => Err(self.bad(k, "missing")),
            Some(v) => {
                v.as_u64().ok_or_else(|| self.bad(k, format!("expected a non-negative integer, got {}", show(v))))
            }
        }
    }

    /// A required number.
    pub fn f64(&self, k: &str) -> Result<f64> {
        let v = self.opt_f64(k)?;
        self.want(k, v)
    }

    /// An optional number.
    pub fn opt_f64(&self, k: &str) -> Result<Option<f64>> {
        match self.get(k) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| self.bad(k, format!("expected a number, got {}", show(v)))),
        }
    }

    /// A number whose explicit `null` means "off" and whose absence means `default`.
    pub fn f64_or_null(&self, k: &str, default: Option<f64>) -> Result<Option<f64>> {
        match self.obj.get(k) {
            None => Ok(default),
            Some(Value::Null) => Ok(None),
            Some(v) => {
                v.as_f64().map(Some).ok_or_else(|| self.bad(k, format!("expected a number or null, got {}", show(v))))
            }
        }
    }

    /// A required boolean.
    pub fn bool(&self, k: &str) -> Result<bool> {
        let v = self.opt_bool(k)?;
        self.want(k, v)
    }

    /// An optional boolean (`"true"` as a string is an error, not true).
    pub fn opt_bool(&self, k: &str) -> Result<Option<bool>> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(self.bad(k, format!("expected true or false, got {}", show(v)))),
        }
    }

    /// An optional list of strings.
    pub fn opt_str_list(&self, k: &str) -> Result<Option<Vec<String>>> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Array(a)) => a
                .iter()
                .map(|x| {
                    x.as_str()
                        .map(str::to_string)
                        .ok_or_else(|| self.bad(k, format!("entry {} is not a string", show(x))))
                })
                .collect::<Result<Vec<_>>>()
                .map(Some),
            Some(v) => Err(self.bad(k, format!("expected a list of strings, got {}", show(v)))),
        }
    }

    /// An optional nested object, read with this reader's file and `k` added to the prefix.
    pub fn opt_object(&self, k: &str) -> Result<Option<Fields<'a>>> {
        match self.get(k) {
            None => Ok(None),
            Some(v @ Value::Object(_)) => Fields::new(v, self.file.as_deref(), &self.name(k)).map(Some),
            Some(v) => Err(self.bad(k, format!("expected an object, got {}", show(v)))),
        }
    }

    /// A required nested object.
    pub fn object_field(&self, k: &str) -> Result<Fields<'a>> {
        let v = self.opt_object(k)?;
        self.want(k, v)
    }

    /// Refuse field `k` unless it is absent, `null`, or `ok(value)`: the field changes the
    /// computation in a way tunecheck does not implement (`what` says how), so reading past it
    /// would silently compute something else.
    pub fn refuse_unless(&self, k: &str, ok: impl Fn(&Value) -> bool, what: &str) -> Result<()> {
        match self.get(k) {
            Some(v) if !ok(v) => Err(self.bad(k, format!("{} is not supported: {what}", show(v)))),
            _ => Ok(()),
        }
    }
}

/// `false` (and absent) is fine; for [`Fields::refuse_unless`].
pub fn is_false(v: &Value) -> bool {
    v == &Value::Bool(false)
}

/// An empty list or object (and absent) is fine; for [`Fields::refuse_unless`].
pub fn is_empty(v: &Value) -> bool {
    match v {
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}
