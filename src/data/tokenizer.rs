//! The model's tokenizer (tokenizer.json through the `tokenizers` crate) with the
//! special tokens and chat template from tokenizer_config.json / config.json.

use crate::util;
use anyhow::{Context, Result};
use std::path::Path;
use tokenizers::Tokenizer;

/// A loaded tokenizer and what the prompt code needs to know about it.
pub struct Tok {
    pub tokenizer: Tokenizer,
    pub bos_token: String,
    pub eos_token: String,
    /// The id appended after each response (EOS, or the end-of-turn token).
    pub eos_id: u32,
    pub chat_template: Option<String>,
    /// sha256 of tokenizer.json.
    pub hash: String,
}

fn token_string(v: Option<&serde_json::Value>) -> Option<String> {
    match v? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    }
}

impl Tok {
    /// Load from an HF model folder.
    pub fn load(dir: &Path) -> Result<Tok> {
        let path = dir.join("tokenizer.json");
        let tokenizer = Tokenizer::from_file(&path)
            .map_err(|e| anyhow::anyhow!("{}: cannot load tokenizer: {e}", path.display()))?;
        let tc: serde_json::Value = if dir.join("tokenizer_config.json").is_file() {
            util::read_json(&dir.join("tokenizer_config.json"))?
        } else {
            serde_json::Value::Null
        };
        let cfg: serde_json::Value = util::read_json(&dir.join("config.json")).unwrap_or(serde_json::Value::Null);
        let bos_token = token_string(tc.get("bos_token")).unwrap_or_default();
        let mut eos_token = token_string(tc.get("eos_token")).unwrap_or_default();
        let eos_from_config = cfg
            .get("eos_token_id")
            .and_then(|v| v.as_u64().or_else(|| v.as_array().and_then(|a| a.first()).and_then(|x| x.as_u64())));
        let eos_id = match tokenizer.token_to_id(&eos_token) {
            Some(id) => id,
            None => {
                let id = eos_from_config.map(|x| x as u32).with_context(|| {
                    format!(
                        "{}: no eos_token in tokenizer_config.json and no eos_token_id in config.json",
                        dir.display()
                    )
                })?;
                eos_token = tokenizer.id_to_token(id).unwrap_or_default();
                id
            }
        };
        let chat_template = match tc.get("chat_template") {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            _ => std::fs::read_to_string(dir.join("chat_template.jinja")).ok(),
        };
        Ok(Tok { tokenizer, bos_token, eos_token, eos_id, chat_template, hash: util::sha256_file(&path)? })
    }

    /// Encode text; `special` adds the tokenizer's BOS/EOS post-processing.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<u32>, String> {
        self.tokenizer.encode(text, special).map(|e| e.get_ids().to_vec()).map_err(|e| format!("tokenizer failed: {e}"))
    }

    /// The ids of the start of a sequence: `encode(text, true)`, except that text already starting
    /// with the BOS token's text (a rendered chat template: Gemma, Llama 3) gets no second BOS —
    /// what transformers does by tokenizing `apply_chat_template` output without special tokens.
    pub fn encode_start(&self, text: &str) -> Result<Vec<u32>, String> {
        let mut ids = self.encode(text, true)?;
        let bos = self.bos_token.as_str();
        if !bos.is_empty() && text.starts_with(bos) {
            if let Some(id) = self.tokenizer.token_to_id(bos) {
                if ids.len() >= 2 && ids[0] == id && ids[1] == id {
                    ids.remove(0);
                }
            }
        }
        Ok(ids)
    }

    /// Decode ids to text, keeping special tokens visible.
    pub fn decode(&self, ids: &[u32]) -> String {
        self.tokenizer.decode(ids, false).unwrap_or_default()
    }
}
