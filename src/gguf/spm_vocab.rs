//! SentencePiece vocabularies (`tokenizer.ggml.model = "llama"`) both ways: an HF folder's
//! `tokenizer.model` — or, without one, a `tokenizer.json` BPE with `byte_fallback` — as GGUF
//! key/values for export, and those key/values back as a `tokenizer.json` for import.
//!
//! Export follows llama.cpp's `convert_hf_to_gguf.py`:
//! - `_set_vocab_sentencepiece` / `_create_vocab_sentencepiece`: model `llama`, pre `default`,
//!   one token per embedding row: the pieces with their scores and types (GGUF's token types are
//!   the proto's: normal 1, unknown 2, control 3, user-defined 4, unused 5, byte 6), rows beyond
//!   the pieces `[PADn]` with score -10000 and type unused; `added_tokens.json` entries as
//!   user-defined, then `tokenizer_config.json`'s `added_tokens_decoder` (and the same list in
//!   `tokenizer.json`'s `added_tokens`) as control when special or `does_token_look_special`,
//!   else user-defined with `▁` turned back into spaces, each with score -1000. Two deviations:
//!   the proto's own user-defined pieces are written as user-defined (the converter reads them
//!   as normal and relies on `added_tokens_decoder` listing them, which HF's conversion does),
//!   and the unknown piece keeps its type when an added-token list marks it special;
//! - gguf-py's `SpecialVocab` for bos/eos/unk/pad ids (tokenizer_config.json's tokens, then
//!   config.json's `*_token_id`, then the trainer's ids in the model) and add_bos/add_eos (the
//!   tokenizer.json post-processor when it has one, then tokenizer_config.json's flags, else the
//!   SentencePiece defaults: BOS yes, EOS no); the chat template;
//! - `add_space_prefix`: false for the Gemma family (`Gemma2Model` / `Gemma3Model.set_vocab`),
//!   else tokenizer_config.json's `add_prefix_space` as `LlamaModel.set_vocab` writes it, else
//!   the model's `normalizer_spec.add_dummy_prefix` (written out, where the converter leaves the
//!   key absent and llama.cpp defaults to true).
//!
//! Without `tokenizer.model`, a byte-fallback BPE `tokenizer.json` is written the same way, as
//! gguf-py's `LlamaHfVocab` (`_set_vocab_llama_hf`) reads one: `<0xXX>` tokens are bytes, special
//! added tokens control, other added tokens user-defined. `LlamaHfVocab` gives every token the
//! placeholder score -1000, which leaves llama.cpp's score-ordered merging without an order;
//! tuner instead scores each token produced by a merge with minus the rank of the first merge
//! that produces it (the order SentencePiece's own BPE scores have), normal tokens no merge
//! produces below every merge, so llama.cpp merges in the tokenizer.json's order.
//!
//! Import builds what transformers' Llama and Gemma fast tokenizers hold (tokenizers'
//! `tokenizer.json`): a BPE with `byte_fallback` and `fuse_unk` whose merges come from the
//! scores as transformers' `generate_merges` derives them (every split of a normal token into
//! two tokens, ordered by the token's score, then by longer left part, longer right part);
//! with `add_space_prefix` (llama.cpp's default) the Llama layout (no normalizer, `Metaspace`
//! pre-tokenizer prepending `▁` to the first word, a decoder that strips it), without it
//! Gemma's (`Replace(" ", "▁")` normalizer, no prefix). Control, unknown and user-defined tokens
//! are added tokens. A Unigram SentencePiece vocabulary is rebuilt as this BPE too (llama.cpp
//! itself tokenizes every `llama` vocabulary by merging on scores), so it only approximates
//! the original Unigram segmentation.

use super::arch::GgufArch;
use super::hparams::Meta;
use super::read::GgufFile;
use super::spm::{PieceType, SpmModel, SpmModelType};
use super::tokenizer::{
    chat_template, looks_special, post_processor_json, string_array, template_flags, token_content, token_types,
    vocab_tokens,
};
use super::types::{GgufArray, GgufValue, GgufValueType};
use crate::util;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::Path;

/// Where a SentencePiece vocabulary comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpmSource {
    /// `tokenizer.model` (SentencePiece's own file).
    Model,
    /// A `tokenizer.json` BPE with `byte_fallback` (no `tokenizer.model` in the folder).
    TokenizerJson,
}

/// Score of the `[PADn]` rows (`_create_vocab_sentencepiece`).
const PAD_SCORE: f32 = -10000.0;
/// Score of added tokens (`_create_vocab_sentencepiece`).
const ADDED_SCORE: f32 = -1000.0;
const SPACE_MARK: &str = "\u{2581}";

/// Whether `tok` (a parsed tokenizer.json) is a SentencePiece-style BPE: `byte_fallback` set.
pub fn is_byte_fallback_bpe(tok: &Value) -> bool {
    tok["model"]["type"] == "BPE" && tok["model"]["byte_fallback"].as_bool() == Some(true)
}

/// The SentencePiece source of the HF folder `dir`, if it has one: `tokenizer.model` (read and
/// checked here, so a broken file is refused before any work), else a byte-fallback BPE
/// `tokenizer.json`.
pub fn source(dir: &Path, tok: &Value) -> Result<Option<SpmSource>> {
    let model = dir.join("tokenizer.model");
    if model.is_file() {
        let m = SpmModel::read(&model)?;
        if m.model_type != SpmModelType::Bpe {
            log::warn!(
                "{}: a {} SentencePiece model; llama.cpp tokenizes every `llama` vocabulary by merging pieces in score order, \
                 which only approximates {} segmentation",
                model.display(),
                m.model_type.name(),
                m.model_type.name()
            );
        }
        return Ok(Some(SpmSource::Model));
    }
    Ok(is_byte_fallback_bpe(tok).then_some(SpmSource::TokenizerJson))
}

/// The vocabulary being assembled: one entry per embedding row.
struct Table {
    tokens: Vec<String>,
    scores: Vec<f32>,
    types: Vec<i32>,
}

impl Table {
    fn new(rows: usize) -> Table {
        Table {
            tokens: (0..rows).map(|i| format!("[PAD{i}]")).collect(),
            scores: vec![PAD_SCORE; rows],
            types: vec![PieceType::Unused as i32; rows],
        }
    }

    fn set(&mut self, id: usize, token: String, score: f32, kind: PieceType) {
        self.tokens[id] = token;
        self.scores[id] = score;
        self.types[id] = kind as i32;
    }

    fn id_of(&self, token: &str) -> Option<u32> {
        self.tokens.iter().position(|t| t == token).map(|i| i as u32)
    }

    /// Apply HF's added tokens (`(id, content, special)`) as `_create_vocab_sentencepiece`
    /// applies `added_tokens_decoder`.
    fn add_hf_tokens(&mut self, added: &[(u64, String, bool)], shown: &str) -> Result<()> {
        let rows = self.tokens.len();
        for (id, content, special) in added {
            let i = usize::try_from(*id).ok().filter(|i| *i < rows).ok_or_else(|| {
                anyhow!(
                    "{shown}: added token {content:?} has id {id}, beyond the model's {rows} embedding rows; \
                     resize the embedding (or remove the token) before exporting"
                )
            })?;
            if self.types[i] == PieceType::Unknown as i32 {
                // The unknown piece stays unknown (llama.cpp would retype it as control).
                self.scores[i] = ADDED_SCORE;
            } else if *special || looks_special(content) {
                self.set(i, content.clone(), ADDED_SCORE, PieceType::Control);
            } else {
                self.set(i, content.replace(SPACE_MARK, " "), ADDED_SCORE, PieceType::UserDefined);
            }
        }
        Ok(())
    }
}

/// `(id, content, special)` of tokenizer.json's `added_tokens` and tokenizer_config.json's
/// `added_tokens_decoder`, in that order.
fn hf_added_tokens(tok: &Value, tc: &Value) -> Vec<(u64, String, bool)> {
    let mut out = Vec::new();
    for a in tok["added_tokens"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        if let (Some(id), Some(c)) = (a["id"].as_u64(), a["content"].as_str()) {
            out.push((id, c.to_string(), a["special"].as_bool() == Some(true)));
        }
    }
    if let Some(dec) = tc["added_tokens_decoder"].as_object() {
        for (id, a) in dec {
            if let (Ok(id), Some(c)) = (id.parse::<u64>(), a["content"].as_str()) {
                out.push((id, c.to_string(), a["special"].as_bool() == Some(true)));
            }
        }
    }
    out
}

/// The table from `tokenizer.model` (plus `added_tokens.json`), `rows` long.
fn table_from_model(dir: &Path, rows: usize) -> Result<(Table, SpmModel)> {
    let path = dir.join("tokenizer.model");
    let m = SpmModel::read(&path)?;
    if m.pieces.len() > rows {
        bail!(
            "{} has {} pieces but the model's embedding has only {rows} rows (config.json vocab_size); \
             the tokenizer does not belong to this model",
            path.display(),
            m.pieces.len()
        );
    }
    let mut t = Table::new(rows);
    for (i, p) in m.pieces.iter().enumerate() {
        let token = match p.kind {
            PieceType::UserDefined => p.piece.replace(SPACE_MARK, " "),
            _ => p.piece.clone(),
        };
        t.set(i, token, p.score, p.kind);
    }
    let added = dir.join("added_tokens.json");
    if added.is_file() {
        let map: Map<String, Value> = util::read_json(&added)?;
        for (content, id) in map {
            let id =
                id.as_u64().with_context(|| format!("{}: the id of {content:?} is not a number", added.display()))?;
            match usize::try_from(id).ok().filter(|i| *i < rows) {
                Some(i) => t.set(i, content, ADDED_SCORE, PieceType::UserDefined),
                None => log::warn!("{}: token {content:?} has id {id}, beyond {rows} rows; ignored", added.display()),
            }
        }
    }
    Ok((t, m))
}

/// The table from a byte-fallback BPE `tokenizer.json`, `rows` long, scores from merge ranks;
/// `unk` is the unknown token's text.
fn table_from_json(tok: &Value, unk: Option<&str>, rows: usize, shown: &str) -> Result<Table> {
    let vocab = tok["model"]["vocab"].as_object().with_context(|| format!("{shown}: no model.vocab"))?;
    let merges = tok["model"]["merges"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    // The rank of the first merge producing each token.
    let mut first_rank: HashMap<String, usize> = HashMap::new();
    for (rank, m) in merges.iter().enumerate() {
        let (a, b) = match m {
            Value::String(s) => s.split_once(' ').map(|(a, b)| (a.to_string(), b.to_string())),
            Value::Array(p) if p.len() == 2 => {
                Some((p[0].as_str().unwrap_or("").into(), p[1].as_str().unwrap_or("").into()))
            }
            _ => None,
        }
        .ok_or_else(|| anyhow!("{shown}: merge {rank} ({m}) is neither \"a b\" nor [a, b]"))?;
        first_rank.entry(format!("{a}{b}")).or_insert(rank);
    }
    let below_merges = -(merges.len() as f32);
    let is_byte =
        |t: &str| t.len() == 6 && t.starts_with("<0x") && t.ends_with('>') && u8::from_str_radix(&t[3..5], 16).is_ok();
    let mut t = Table::new(rows);
    for (token, id) in vocab {
        let id = id.as_u64().with_context(|| format!("{shown}: bad id for {token:?}"))?;
        let i = usize::try_from(id)
            .ok()
            .filter(|i| *i < rows)
            .ok_or_else(|| anyhow!("{shown}: token {token:?} has id {id}, beyond the model's {rows} embedding rows"))?;
        let (score, kind) = if is_byte(token) {
            (0.0, PieceType::Byte)
        } else if Some(token.as_str()) == unk {
            (0.0, PieceType::Unknown)
        } else {
            (first_rank.get(token).map_or(below_merges, |r| -(*r as f32)), PieceType::Normal)
        };
        t.set(i, token.clone(), score, kind);
    }
    Ok(t)
}

/// The id under `key` of config.json (or its `text_config`): a number, or the first of a list.
fn config_id(cfg: &Value, key: &str) -> Option<u32> {
    let v = if cfg[key].is_null() { &cfg["text_config"][key] } else { &cfg[key] };
    match v {
        Value::Array(a) => a.first().and_then(Value::as_u64),
        v => v.as_u64(),
    }
    .and_then(|x| u32::try_from(x).ok())
}

/// Whether a byte-fallback tokenizer.json puts `▁` in front of the text (a `Metaspace`
/// pre-tokenizer that prepends, or a `Prepend("▁")` normalizer).
fn json_prepends_space(tok: &Value) -> bool {
    fn any(v: &Value, list: &str, f: &dyn Fn(&Value) -> bool) -> bool {
        f(v) || v[list].as_array().is_some_and(|xs| xs.iter().any(|x| any(x, list, f)))
    }
    let metaspace = |v: &Value| {
        v["type"] == "Metaspace"
            && match v["prepend_scheme"].as_str() {
                Some(s) => s != "never",
                None => v["add_prefix_space"].as_bool().unwrap_or(true),
            }
    };
    let prepend = |v: &Value| v["type"] == "Prepend" && v["prepend"] == SPACE_MARK;
    any(&tok["pre_tokenizer"], "pretokenizers", &metaspace) || any(&tok["normalizer"], "normalizers", &prepend)
}

/// `tokenizer.*` key/values of the SentencePiece vocabulary of `dir`, one token per embedding
/// row (`rows`), for a model of architecture `arch`.
pub fn metadata(dir: &Path, rows: usize, arch: GgufArch, source: SpmSource) -> Result<Meta> {
    let tok_path = dir.join("tokenizer.json");
    let tok: Value = if tok_path.is_file() { util::read_json(&tok_path)? } else { Value::Null };
    let tc: Value = util::read_json(&dir.join("tokenizer_config.json")).unwrap_or(Value::Null);
    let cfg: Value = util::read_json(&dir.join("config.json")).unwrap_or(Value::Null);
    let shown = tok_path.display().to_string();
    let added = hf_added_tokens(&tok, &tc);

    let (mut table, model) = match source {
        SpmSource::Model => {
            let (t, m) = table_from_model(dir, rows)?;
            (t, Some(m))
        }
        SpmSource::TokenizerJson => {
            // The BPE's unk_token, else tokenizer_config.json's (transformers' Llama tokenizer sets none on the BPE).
            let unk = tok["model"]["unk_token"].as_str().or_else(|| token_content(&tc["unk_token"]));
            (table_from_json(&tok, unk, rows, &shown)?, None)
        }
    };
    table.add_hf_tokens(&added, &shown)?;

    // Special ids (SpecialVocab): tokenizer_config.json's token among the added tokens, then
    // config.json's id; then the token anywhere in the vocabulary, then the trainer's id.
    let trainer = |f: fn(&SpmModel) -> i32| model.as_ref().map(f).and_then(|v| u32::try_from(v).ok());
    // An id outside the vocabulary is passed over, as `SpecialVocab._set_special_token` does.
    let special = |typ: &str, from_model: Option<u32>| -> Option<u32> {
        let content = token_content(&tc[format!("{typ}_token")]);
        let in_range = |id: &u32| (*id as usize) < rows;
        content
            .and_then(|c| added.iter().find(|a| a.1 == c).and_then(|a| u32::try_from(a.0).ok()))
            .filter(in_range)
            .or_else(|| config_id(&cfg, &format!("{typ}_token_id")).filter(in_range))
            .or_else(|| content.and_then(|c| table.id_of(c)))
            .or(from_model.filter(in_range))
    };
    let unk_from_json = tok["model"]["unk_token"].as_str().and_then(|u| table.id_of(u));
    let bos = special("bos", trainer(|m| m.bos_id));
    let eos = special("eos", trainer(|m| m.eos_id));
    let unk = special("unk", trainer(|m| m.unk_id).or(unk_from_json));
    let pad = special("pad", trainer(|m| m.pad_id));

    let mut ids: HashMap<String, u32> = HashMap::with_capacity(rows);
    for (i, t) in table.tokens.iter().enumerate() {
        ids.entry(t.clone()).or_insert(i as u32);
    }
    let (add_bos, add_eos) = template_flags(&tok, &ids, bos, eos).unwrap_or_else(|| {
        (tc["add_bos_token"].as_bool().unwrap_or(true), tc["add_eos_token"].as_bool().unwrap_or(false))
    });
    let gemma = matches!(arch, GgufArch::Gemma2 | GgufArch::Gemma3 | GgufArch::Gemma3n);
    let add_space_prefix = if gemma {
        false
    } else if let Some(b) = tc["add_prefix_space"].as_bool() {
        b
    } else {
        match &model {
            Some(m) => m.add_dummy_prefix,
            None => json_prepends_space(&tok),
        }
    };

    let Table { tokens, scores, types } = table;
    let mut m: Meta = vec![
        ("tokenizer.ggml.model".into(), GgufValue::String("llama".into())),
        ("tokenizer.ggml.pre".into(), GgufValue::String("default".into())),
        ("tokenizer.ggml.tokens".into(), string_array(tokens)),
        (
            "tokenizer.ggml.scores".into(),
            GgufValue::Array(GgufArray {
                elem_type: GgufValueType::F32,
                items: scores.into_iter().map(GgufValue::F32).collect(),
            }),
        ),
        (
            "tokenizer.ggml.token_type".into(),
            GgufValue::Array(GgufArray {
                elem_type: GgufValueType::I32,
                items: types.into_iter().map(GgufValue::I32).collect(),
            }),
        ),
    ];
    for (key, id) in [
        ("tokenizer.ggml.bos_token_id", bos),
        ("tokenizer.ggml.eos_token_id", eos),
        ("tokenizer.ggml.unknown_token_id", unk),
        ("tokenizer.ggml.padding_token_id", pad),
    ] {
        if let Some(id) = id {
            m.push((key.into(), GgufValue::U32(id)));
        }
    }
    m.push(("tokenizer.ggml.add_bos_token".into(), GgufValue::Bool(add_bos)));
    m.push(("tokenizer.ggml.add_eos_token".into(), GgufValue::Bool(add_eos)));
    m.push(("tokenizer.ggml.add_space_prefix".into(), GgufValue::Bool(add_space_prefix)));
    if let Some(t) = chat_template(dir) {
        m.push(("tokenizer.chat_template".into(), GgufValue::String(t)));
    }
    Ok(m)
}

/// `tokenizer.ggml.scores`, one per token.
fn token_scores(g: &GgufFile, n: usize) -> Result<Vec<f32>> {
    let shown = g.path().display();
    let scores = g.get_array("tokenizer.ggml.scores")?.ok_or_else(|| {
        anyhow!(
            "{shown} has no tokenizer.ggml.scores; a `llama` (SentencePiece) vocabulary needs them to order its merges"
        )
    })?;
    if scores.len() != n {
        bail!("{shown}: {} token scores for {n} tokens", scores.len());
    }
    scores
        .iter()
        .enumerate()
        .map(|(i, v)| {
            v.as_f64().map(|x| x as f32).ok_or_else(|| anyhow!("{shown}: tokenizer.ggml.scores[{i}] is not a number"))
        })
        .collect()
}

/// The merges of a score-ordered vocabulary: every split of a normal token into two normal
/// tokens, ordered by the token's score (highest first), then longer left part, longer right
/// part, then ids.
fn merges_from_scores(tokens: &[&str], types: &[i64], scores: &[f32], ids: &HashMap<&str, usize>) -> Vec<Value> {
    let normal = |id: usize| types[id] == PieceType::Normal as i64;
    let mut found: Vec<(f32, usize, usize, usize, usize, usize)> = Vec::new();
    for (id, tok) in tokens.iter().enumerate() {
        if !normal(id) || ids.get(tok) != Some(&id) {
            continue;
        }
        let n = tok.chars().count();
        for (k, (cut, _)) in tok.char_indices().enumerate().skip(1) {
            let (l, r) = tok.split_at(cut);
            if let (Some(&li), Some(&ri)) = (ids.get(l), ids.get(r)) {
                if normal(li) && normal(ri) {
                    found.push((scores[id], k, n - k, id, li, ri));
                }
            }
        }
    }
    found.sort_by(|a, b| {
        b.0.total_cmp(&a.0)
            .then(b.1.cmp(&a.1))
            .then(b.2.cmp(&a.2))
            .then(a.3.cmp(&b.3))
            .then(a.4.cmp(&b.4))
            .then(a.5.cmp(&b.5))
    });
    found.into_iter().map(|(_, _, _, _, l, r)| json!([tokens[l], tokens[r]])).collect()
}

/// Build `tokenizer.json` from the `tokenizer.ggml.*` metadata of a `llama` (SentencePiece)
/// vocabulary, and check that it loads with `tokenizers::Tokenizer`.
pub fn tokenizer_json(g: &GgufFile) -> Result<Value> {
    let shown = g.path().display();
    let tokens = vocab_tokens(g)?;
    let types = token_types(g, tokens.len())?;
    let scores = token_scores(g, tokens.len())?;

    let mut ids: HashMap<&str, usize> = HashMap::with_capacity(tokens.len());
    let mut vocab = Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    let mut duplicates = 0usize;
    for (id, (tok, ty)) in tokens.iter().zip(&types).enumerate() {
        if ids.contains_key(tok) {
            duplicates += 1;
            continue;
        }
        ids.insert(tok, id);
        vocab.insert(tok.to_string(), json!(id));
        // Control, unknown and user-defined tokens are matched whole, as HF's SentencePiece
        // tokenizers list them.
        if matches!(*ty, 2..=4) {
            added.push(json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": *ty != 4,
            }));
        }
    }
    if duplicates > 0 {
        log::warn!("{shown}: {duplicates} duplicate token string(s) in the vocabulary; kept the first id of each");
    }
    let normal_scores: Vec<f32> =
        scores.iter().zip(&types).filter(|(_, t)| **t == PieceType::Normal as i64).map(|(s, _)| *s).collect();
    if normal_scores.len() > 1 && normal_scores.iter().all(|s| *s == normal_scores[0]) {
        log::warn!(
            "{shown}: every normal token has the score {}, so the scores give the merges no order; \
             the rebuilt tokenizer may split words differently from the original",
            normal_scores[0]
        );
    }
    let merges = merges_from_scores(&tokens, &types, &scores, &ids);
    let unk = tokens.iter().zip(&types).find(|(_, t)| **t == PieceType::Unknown as i64).map(|(s, _)| *s);
    let unk = match g.get_u64("tokenizer.ggml.unknown_token_id")? {
        Some(id) => Some(*tokens.get(id as usize).ok_or_else(|| {
            anyhow!(
                "{shown}: tokenizer.ggml.unknown_token_id = {id} is outside the vocabulary ({} tokens)",
                tokens.len()
            )
        })?),
        None => unk,
    };

    let add_space_prefix = g.get_bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
    let byte_fallback_decoders = [
        json!({ "type": "Replace", "pattern": { "String": SPACE_MARK }, "content": " " }),
        json!({ "type": "ByteFallback" }),
        json!({ "type": "Fuse" }),
    ];
    let (normalizer, pre_tokenizer, decoder) = if add_space_prefix {
        let mut decoders = byte_fallback_decoders.to_vec();
        decoders.push(json!({ "type": "Strip", "content": " ", "start": 1, "stop": 0 }));
        (
            Value::Null,
            json!({ "type": "Metaspace", "replacement": SPACE_MARK, "prepend_scheme": "first", "split": false }),
            json!({ "type": "Sequence", "decoders": decoders }),
        )
    } else {
        (
            json!({ "type": "Replace", "pattern": { "String": " " }, "content": SPACE_MARK }),
            Value::Null,
            json!({ "type": "Sequence", "decoders": byte_fallback_decoders }),
        )
    };
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": post_processor_json(g, &tokens)?,
        "decoder": decoder,
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": unk,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": true,
            "byte_fallback": true,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    });

    super::tokenizer::loads_with_vocab(tokenizer, tokens.len() - duplicates, shown)
}
