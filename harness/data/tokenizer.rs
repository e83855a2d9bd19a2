//! The tiny fixture tokenizer (`fixtures/tokenizer.json`, embedded in the crate): word level,
//! with Llama-3-style special, reserved and chat-template tokens.

use tokenizers::Tokenizer;

use crate::error::{Error, Result};

/// The fixture's JSON, embedded so users need no path.
pub const FIXTURE_JSON: &str = include_str!("../../fixtures/tokenizer.json");

/// Token ids of the fixture's special tokens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Specials {
    /// `<pad>`.
    pub pad: u32,
    /// `<bos>`.
    pub bos: u32,
    /// `<eos>`.
    pub eos: u32,
    /// `<|reserved_special_token_N|>`: untrained rows in a Llama-3 base.
    pub reserved: Vec<u32>,
    /// Chat-template tokens (`<|start_header_id|>`, `<|end_header_id|>`, `<|eot_id|>`).
    pub chat: Vec<u32>,
    /// The ordinary words `w0`, `w1`, ...
    pub words: Vec<u32>,
}

/// Load the embedded fixture tokenizer. (Parsed through `FromStr`, which the tokenizers crate
/// compiles itself: the generic `from_bytes` would instantiate its whole deserializer in this
/// crate again, about 6 % of tunecheck's compile.)
pub fn fixture() -> Result<Tokenizer> {
    FIXTURE_JSON.parse::<Tokenizer>().map_err(|e| Error::Msg(format!("fixtures/tokenizer.json: {e}")))
}

/// Load a `tokenizer.json` from disk; errors name the file. The text is checked as JSON
/// first, and the tokenizers crate's own parse runs behind `catch_unwind`: tokenizers 0.23
/// panics (instead of erroring) on some malformed `decoder` sections, found by
/// `tests/fuzz_bytes.rs`.
pub fn load(path: &std::path::Path) -> Result<Tokenizer> {
    let bad = |m: String| Error::file(path, format!("not a valid tokenizer.json: {m}"));
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    let text = std::str::from_utf8(&bytes).map_err(|e| bad(format!("not UTF-8 ({e})")))?;
    serde_json::from_str::<serde_json::Value>(text).map_err(|e| bad(format!("not JSON ({e})")))?;
    match std::panic::catch_unwind(|| text.parse::<Tokenizer>()) {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(bad(e.to_string())),
        Err(_) => Err(bad("the tokenizers crate panicked while parsing it".into())),
    }
}

fn id(t: &Tokenizer, s: &str) -> Result<u32> {
    t.token_to_id(s).ok_or_else(|| Error::Msg(format!("tokenizer has no token `{s}`")))
}

/// The special ids of a tokenizer laid out like the fixture.
pub fn specials(t: &Tokenizer) -> Result<Specials> {
    let mut reserved = Vec::new();
    while let Some(i) = t.token_to_id(&format!("<|reserved_special_token_{}|>", reserved.len())) {
        reserved.push(i);
    }
    let mut words = Vec::new();
    while let Some(i) = t.token_to_id(&format!("w{}", words.len())) {
        words.push(i);
    }
    Ok(Specials {
        pad: id(t, "<pad>")?,
        bos: id(t, "<bos>")?,
        eos: id(t, "<eos>")?,
        reserved,
        chat: vec![id(t, "<|start_header_id|>")?, id(t, "<|end_header_id|>")?, id(t, "<|eot_id|>")?],
        words,
    })
}
