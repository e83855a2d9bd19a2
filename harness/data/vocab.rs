//! A tokenizer for a synthetic model's vocabulary, written beside a checkpoint so that the
//! stacks that refuse a directory without one (TRL's `SFTTrainer`, Unsloth, LLaMA-Factory all
//! load a tokenizer with the model) can load it. Word level over the whole vocabulary: ids 0–3
//! are `<pad>`, `<s>`, `</s>` and `<unk>`, id `i ≥ 4` is the word `t{i}`; words split on
//! whitespace; a chat template that joins the messages' contents with spaces. The files are the
//! ones `PreTrainedTokenizerFast.save_pretrained` writes: `tokenizer.json`,
//! `tokenizer_config.json` and `special_tokens_map.json`.
//!
//! The tokenizer only has to exist and be consistent: tunecheck hands every stack its ids
//! already tokenized, so nothing is ever encoded with it.

use std::path::Path;

use serde_json::{json, Map, Value};

use crate::error::{Error, Result};

/// The special tokens, by id.
pub const SPECIALS: [&str; 4] = ["<pad>", "<s>", "</s>", "<unk>"];

/// The smallest vocabulary that holds the special tokens and one word.
pub const MIN_VOCAB: usize = SPECIALS.len() + 1;

/// The chat template: the messages' contents joined with spaces.
pub const CHAT_TEMPLATE: &str =
    "{% for message in messages %}{{ message['content'] }}{% if not loop.last %} {% endif %}{% endfor %}";

/// The token string of id `i`.
pub fn token(i: usize) -> String {
    SPECIALS.get(i).map_or_else(|| format!("t{i}"), |s| s.to_string())
}

/// Special token `i` as `tokenizer_config.json`'s `added_tokens_decoder` lists it.
fn added(i: usize) -> Value {
    json!({"content": SPECIALS[i], "single_word": false, "lstrip": false, "rstrip": false, "normalized": false,
           "special": true})
}

/// The three files for a vocabulary of `vocab_size` tokens and sequences of at most `max_len`,
/// as (file name, JSON text).
pub fn files(vocab_size: usize, max_len: usize) -> Result<Vec<(&'static str, String)>> {
    if vocab_size < MIN_VOCAB {
        return Err(Error::field("vocab_size", format!("{vocab_size} cannot hold the 4 special tokens and a word")));
    }
    let mut vocab = Map::new();
    for i in 0..vocab_size {
        vocab.insert(token(i), json!(i));
    }
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": (0..SPECIALS.len())
            .map(|i| {
                let mut t = added(i);
                t["id"] = json!(i);
                t
            })
            .collect::<Vec<_>>(),
        "normalizer": null,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    });
    let decoder: Map<String, Value> = (0..SPECIALS.len()).map(|i| (i.to_string(), added(i))).collect();
    let config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "pad_token": "<pad>",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": false,
        "chat_template": CHAT_TEMPLATE,
        "added_tokens_decoder": decoder,
    });
    let specials = json!({"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"});
    let text = |v: &Value| serde_json::to_string_pretty(v).map_err(|e| Error::Msg(e.to_string()));
    Ok(vec![
        ("tokenizer.json", text(&tokenizer)?),
        ("tokenizer_config.json", text(&config)?),
        ("special_tokens_map.json", text(&specials)?),
    ])
}

/// Write the tokenizer files of `spec`'s vocabulary into `dir` (each file atomically).
pub fn write(dir: &Path, spec: &crate::spec::ArchSpec) -> Result<()> {
    for (name, text) in files(spec.vocab_size, spec.max_position_embeddings)? {
        crate::io::atomic::write_atomic(&dir.join(name), text.as_bytes())?;
    }
    Ok(())
}
