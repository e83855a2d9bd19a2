//! Token strings for ids, from the checkpoint's own `tokenizer.json`, and whether each is a
//! special token or appears in the chat template of `tokenizer_config.json` — the tokens a
//! Llama-3 base leaves untrained and a chat fine-tune then feeds it.

use std::collections::BTreeSet;
use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::io::fields::Fields;

/// What the tokenizer files of a checkpoint say about token ids.
#[derive(Default)]
pub struct Vocab {
    tokenizer: Option<tokenizers::Tokenizer>,
    specials: BTreeSet<u32>,
    template: Option<String>,
}

impl Vocab {
    /// Read `tokenizer.json` and `tokenizer_config.json` from `dir` when present; a present
    /// but unreadable file is an error naming it.
    pub fn load(dir: &Path) -> Result<Self> {
        let mut v = Vocab::default();
        let tj = dir.join("tokenizer.json");
        if tj.is_file() {
            let t = crate::data::tokenizer::load(&tj)?;
            v.specials = t.get_added_tokens_decoder().iter().filter(|(_, a)| a.special).map(|(id, _)| *id).collect();
            v.tokenizer = Some(t);
        }
        let tc = dir.join("tokenizer_config.json");
        if tc.is_file() {
            let bytes = std::fs::read(&tc).map_err(|e| Error::io(&tc, e))?;
            let j = Fields::parse(&bytes, &tc)?;
            let c = Fields::new(&j, Some(&tc), "")?;
            v.template = match c.get("chat_template") {
                None => None,
                Some(Value::String(s)) => Some(s.clone()),
                // A list of named templates: search them all.
                Some(Value::Array(list)) => Some(
                    list.iter()
                        .enumerate()
                        .map(|(i, t)| Fields::new(t, Some(&tc), &format!("chat_template[{i}]"))?.str("template"))
                        .collect::<Result<Vec<_>>>()?
                        .join("\n"),
                ),
                Some(other) => {
                    return Err(c.bad("chat_template", format!("expected a string or a list of templates, got {other}")))
                }
            };
            if let Some(dec) = c.opt_object("added_tokens_decoder")? {
                for id in dec.object().keys() {
                    let tok = dec.object_field(id)?;
                    if tok.opt_bool("special")? == Some(true) {
                        let id = id.parse().map_err(|_| dec.bad(id, "is not a token id"))?;
                        v.specials.insert(id);
                    }
                }
            }
        }
        Ok(v)
    }

    /// Whether a tokenizer was found.
    pub fn has_tokenizer(&self) -> bool {
        self.tokenizer.is_some()
    }

    /// The token string of `id`.
    pub fn token(&self, id: u32) -> Option<String> {
        self.tokenizer.as_ref().and_then(|t| t.id_to_token(id))
    }

    /// Whether `id` is a special token.
    pub fn is_special(&self, id: u32) -> bool {
        self.specials.contains(&id)
    }

    /// Whether the token string of `id` appears in the chat template.
    pub fn in_chat_template(&self, id: u32) -> bool {
        match (&self.template, self.token(id)) {
            (Some(t), Some(s)) if !s.is_empty() => t.contains(&s),
            _ => false,
        }
    }
}
