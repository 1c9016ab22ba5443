//! Tokenizers both ways: a Hugging Face `tokenizer.json` (byte-level BPE) as GGUF's
//! `tokenizer.ggml.*` key/values for export, and those key/values back as `tokenizer.json`,
//! `tokenizer_config.json` and `generation_config.json` for import.
//!
//! Follows the GGUF specification's "Standardized key-value pairs" (tokenizer section), what
//! llama.cpp's `convert_hf_to_gguf.py` writes for a `gpt2`-model vocabulary
//! (`_set_vocab_gpt2`, `get_vocab_base`: tokens padded with `[PADn]` up to the embedding's row
//! count, token types normal 1 / control 3 / user-defined 4 / unused 5, `does_token_look_special`,
//! gguf-py's `SpecialVocab` for special ids and add_bos/add_eos) and the `tokenizers` library's
//! `tokenizer.json` format. SentencePiece vocabularies (`llama` model) are in
//! [`super::spm_vocab`], which shares the helpers here.

use super::read::GgufFile;
use super::types::{GgufArray, GgufValue, GgufValueType};
use crate::util;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;

/// A metadata array of strings.
pub fn string_array(items: Vec<String>) -> GgufValue {
    GgufValue::Array(GgufArray {
        elem_type: GgufValueType::String,
        items: items.into_iter().map(GgufValue::String).collect(),
    })
}

/// The llama.cpp pre-tokenizer name for a tokenizer.json's pre-tokenizer; an error
/// for byte-level BPE splits llama.cpp would apply differently and for non-BPE tokenizers.
pub fn pre_tokenizer_name(tok: &Value) -> Result<&'static str> {
    const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
    let model = &tok["model"];
    if model["type"].as_str() != Some("BPE") {
        bail!(
            "GGUF export writes byte-level BPE (gpt2-style) tokenizers only; this tokenizer.json has a `{}` model",
            model["type"].as_str().unwrap_or("unknown")
        );
    }
    if model["byte_fallback"].as_bool() == Some(true) {
        bail!(
            "GGUF export: this is a SentencePiece-style BPE tokenizer (byte_fallback), which is written as a `llama` \
             vocabulary (gguf::spm_vocab), not as byte-level BPE"
        );
    }
    let pre = &tok["pre_tokenizer"];
    let byte_level =
        |v: &Value, regex: bool| v["type"] == "ByteLevel" && v["use_regex"].as_bool().unwrap_or(true) == regex;
    let name = match pre["type"].as_str() {
        Some("ByteLevel") if byte_level(pre, true) => Some("gpt-2"),
        Some("Sequence") => {
            let parts = pre["pretokenizers"].as_array().map(Vec::as_slice).unwrap_or(&[]);
            match parts {
                [d, b] if d["type"] == "Digits" && d["individual_digits"] == true && byte_level(b, true) => {
                    Some("smollm")
                }
                [s, b] if s["type"] == "Split" && byte_level(b, false) => match s["pattern"]["Regex"].as_str() {
                    Some(LLAMA3) => Some("llama-bpe"),
                    Some(QWEN2) => Some("qwen2"),
                    _ => None,
                },
                _ => None,
            }
        }
        _ => None,
    };
    name.ok_or_else(|| {
        anyhow!(
            "GGUF export: the tokenizer's pre-tokenizer ({}) is not one tuner can name for llama.cpp \
             (known: GPT-2 byte-level, SmolLM digits + byte-level, the Llama 3 and Qwen2 regex splits); \
             refusing rather than writing a GGUF that splits text differently",
            serde_json::to_string(pre).unwrap_or_default()
        )
    })
}

/// The content of a special-token entry of tokenizer_config.json (a string or `{content}`).
pub(super) fn token_content(v: &Value) -> Option<&str> {
    match v {
        Value::String(s) => Some(s),
        Value::Object(o) => o.get("content").and_then(Value::as_str),
        _ => None,
    }
}

/// Whether an added token that is not marked special looks like a control token
/// (llama.cpp's `does_token_look_special`).
pub(super) fn looks_special(t: &str) -> bool {
    ["<pad>", "<mask>", "<2mass>", "[@BOS@]"].contains(&t)
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<｜") && t.ends_with("｜>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// The chat template of an HF folder: tokenizer_config.json's (a string, or the `default`
/// of a list of named templates), else `chat_template.jinja`.
pub fn chat_template(dir: &Path) -> Option<String> {
    let tc: Value = util::read_json(&dir.join("tokenizer_config.json")).ok()?;
    match &tc["chat_template"] {
        Value::String(s) => return Some(s.clone()),
        Value::Array(list) => {
            let pick = list.iter().find(|t| t["name"] == "default").or_else(|| list.first());
            if let Some(s) = pick.and_then(|t| t["template"].as_str()) {
                return Some(s.to_string());
            }
        }
        _ => {}
    }
    std::fs::read_to_string(dir.join("chat_template.jinja")).ok()
}

/// The vocabulary of a tokenizer.json padded to `vocab_size` rows: token strings (`[PADn]` for
/// unused ids), their GGUF token types, and the id of each string.
type VocabTable = (Vec<String>, Vec<i32>, HashMap<String, u32>);

fn vocab_table(tok: &Value, vocab_size: usize, shown: &str) -> Result<VocabTable> {
    let vocab = tok["model"]["vocab"].as_object().with_context(|| format!("{shown}: no model.vocab"))?;
    let mut tokens: Vec<Option<String>> = vec![None; vocab_size];
    let mut types = vec![5i32; vocab_size];
    let mut ids: HashMap<String, u32> = HashMap::new();
    let mut place = |t: &str, id: u64, ty: i32| -> Result<()> {
        let slot = tokens.get_mut(id as usize).ok_or_else(|| {
            anyhow!("{shown}: token {t:?} has id {id}, beyond the model's {vocab_size} embedding rows")
        })?;
        *slot = Some(t.to_string());
        types[id as usize] = ty;
        ids.insert(t.to_string(), id as u32);
        Ok(())
    };
    for (t, id) in vocab {
        place(t, id.as_u64().with_context(|| format!("{shown}: bad id for {t:?}"))?, 1)?;
    }
    for a in tok["added_tokens"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        let (Some(t), Some(id)) = (a["content"].as_str(), a["id"].as_u64()) else { continue };
        let ty = if a["special"].as_bool() == Some(true) || looks_special(t) { 3 } else { 4 };
        place(t, id, ty)?;
    }
    let tokens = tokens.into_iter().enumerate().map(|(i, t)| t.unwrap_or_else(|| format!("[PAD{i}]"))).collect();
    Ok((tokens, types, ids))
}

/// The merges of a tokenizer.json as `"a b"` strings (either stored form).
fn merges_of(tok: &Value, shown: &str) -> Result<Vec<String>> {
    tok["model"]["merges"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or(&[])
        .iter()
        .map(|m| match m {
            Value::String(s) => Ok(s.clone()),
            Value::Array(p) if p.len() == 2 => {
                Ok(format!("{} {}", p[0].as_str().unwrap_or(""), p[1].as_str().unwrap_or("")))
            }
            other => Err(anyhow!("{shown}: merge {other} is neither \"a b\" nor [a, b]")),
        })
        .collect()
}

/// add_bos/add_eos as the tokenizer.json post-processor's `TemplateProcessing` adds them (what
/// tuner trained with), if it has one.
pub(super) fn template_flags(
    tok: &Value,
    ids: &HashMap<String, u32>,
    bos: Option<u32>,
    eos: Option<u32>,
) -> Option<(bool, bool)> {
    let pp = &tok["post_processor"];
    let template = if pp["type"] == "TemplateProcessing" {
        Some(pp)
    } else {
        pp["processors"].as_array().and_then(|ps| ps.iter().find(|p| p["type"] == "TemplateProcessing"))
    }?;
    let special_id_of = |piece: &Value| piece["SpecialToken"]["id"].as_str().and_then(|c| ids.get(c).copied());
    let single = template["single"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let first = single.first().and_then(special_id_of);
    let last = single.last().and_then(special_id_of);
    Some((first.is_some() && first == bos, last.is_some() && last == eos))
}

/// add_bos/add_eos: what the tokenizer.json post-processor does, else tokenizer_config.json's flags.
fn add_flags(tok: &Value, tc: &Value, ids: &HashMap<String, u32>, bos: Option<u32>, eos: Option<u32>) -> (bool, bool) {
    template_flags(tok, ids, bos, eos).unwrap_or_else(|| {
        (tc["add_bos_token"].as_bool().unwrap_or(false), tc["add_eos_token"].as_bool().unwrap_or(false))
    })
}

/// `tokenizer.*` key/values of a byte-level BPE tokenizer.json, padded to `vocab_size` tokens.
pub fn tokenizer_metadata(dir: &Path, vocab_size: usize, pre: &str) -> Result<Vec<(String, GgufValue)>> {
    let tok: Value = util::read_json(&dir.join("tokenizer.json"))?;
    let tc: Value = util::read_json(&dir.join("tokenizer_config.json")).unwrap_or(Value::Null);
    let cfg: Value = util::read_json(&dir.join("config.json")).unwrap_or(Value::Null);
    let shown = dir.join("tokenizer.json").display().to_string();
    let (tokens, types, ids) = vocab_table(&tok, vocab_size, &shown)?;
    let merges = merges_of(&tok, &shown)?;

    // Special tokens: tokenizer_config.json's, else config.json's ids (llama.cpp's SpecialVocab order).
    let special = |key: &str, cfg_key: &str| -> Option<u32> {
        token_content(&tc[key]).and_then(|c| ids.get(c).copied()).or_else(|| match &cfg[cfg_key] {
            Value::Array(a) => a.first().and_then(Value::as_u64).map(|x| x as u32),
            v => v.as_u64().map(|x| x as u32),
        })
    };
    let bos = special("bos_token", "bos_token_id");
    let eos = special("eos_token", "eos_token_id");
    let pad = special("pad_token", "pad_token_id");
    let unk = token_content(&tc["unk_token"]).and_then(|c| ids.get(c).copied());
    let (add_bos, add_eos) = add_flags(&tok, &tc, &ids, bos, eos);
    let prefix_space = |v: &Value| v["type"] == "ByteLevel" && v["add_prefix_space"] == true;
    let pre_tok = &tok["pre_tokenizer"];
    let add_space_prefix =
        prefix_space(pre_tok) || pre_tok["pretokenizers"].as_array().is_some_and(|ps| ps.iter().any(prefix_space));

    let mut m: Vec<(String, GgufValue)> = vec![
        ("tokenizer.ggml.model".into(), GgufValue::String("gpt2".into())),
        ("tokenizer.ggml.pre".into(), GgufValue::String(pre.into())),
        ("tokenizer.ggml.tokens".into(), string_array(tokens)),
        (
            "tokenizer.ggml.token_type".into(),
            GgufValue::Array(GgufArray {
                elem_type: GgufValueType::I32,
                items: types.into_iter().map(GgufValue::I32).collect(),
            }),
        ),
        ("tokenizer.ggml.merges".into(), string_array(merges)),
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
    if add_space_prefix {
        m.push(("tokenizer.ggml.add_space_prefix".into(), GgufValue::Bool(true)));
    }
    if let Some(t) = chat_template(dir) {
        m.push(("tokenizer.chat_template".into(), GgufValue::String(t)));
    }
    Ok(m)
}

/// The vocabulary strings (`tokenizer.ggml.tokens`).
pub(super) fn vocab_tokens(g: &GgufFile) -> Result<Vec<&str>> {
    let shown = g.path().display();
    let tokens = g
        .get_array("tokenizer.ggml.tokens")?
        .ok_or_else(|| anyhow!("{shown} has no tokenizer.ggml.tokens; cannot build a tokenizer"))?;
    tokens
        .iter()
        .enumerate()
        .map(|(i, t)| t.as_str().ok_or_else(|| anyhow!("{shown}: tokenizer.ggml.tokens[{i}] is not a string")))
        .collect()
}

/// The content of the token whose id is stored under metadata `key`, if any.
fn special_token<'t>(g: &GgufFile, tokens: &[&'t str], key: &str) -> Result<Option<&'t str>> {
    match g.get_u64(key)? {
        None => Ok(None),
        Some(id) => tokens.get(id as usize).copied().map(Some).ok_or_else(|| {
            anyhow!("{}: {key} = {id} is outside the vocabulary ({} tokens)", g.path().display(), tokens.len())
        }),
    }
}

/// The GGUF token types (`tokenizer.ggml.token_type`; all normal when absent), one per token.
pub(super) fn token_types(g: &GgufFile, n: usize) -> Result<Vec<i64>> {
    let shown = g.path().display();
    let types: Vec<i64> = match g.get_array("tokenizer.ggml.token_type")? {
        None => vec![1; n],
        Some(a) => a
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_i64().ok_or_else(|| anyhow!("{shown}: tokenizer.ggml.token_type[{i}] is not an integer"))
            })
            .collect::<Result<_>>()?,
    };
    if types.len() != n {
        bail!("{shown}: {} token types for {n} tokens", types.len());
    }
    Ok(types)
}

/// The BPE vocabulary, the added tokens (control and user-defined ones) and the number of
/// duplicate strings skipped.
fn vocab_json(g: &GgufFile, tokens: &[&str], types: &[i64]) -> (Map<String, Value>, Vec<Value>, usize) {
    let mut vocab = Map::with_capacity(tokens.len());
    let mut added = Vec::new();
    let mut duplicates = 0usize;
    for (id, (tok, ty)) in tokens.iter().zip(types).enumerate() {
        if vocab.contains_key(*tok) {
            duplicates += 1;
            continue;
        }
        vocab.insert(tok.to_string(), json!(id));
        // GGUF token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
        if *ty == 3 || *ty == 4 {
            added.push(json!({
                "id": id, "content": tok, "single_word": false, "lstrip": false, "rstrip": false,
                "normalized": false, "special": *ty == 3,
            }));
        }
    }
    if duplicates > 0 {
        log::warn!(
            "{}: {duplicates} duplicate token string(s) in the vocabulary; kept the first id of each",
            g.path().display()
        );
    }
    (vocab, added, duplicates)
}

/// `tokenizer.ggml.merges` as `[a, b]` pairs.
fn merges_json(g: &GgufFile) -> Result<Vec<Value>> {
    let shown = g.path().display();
    let merges_raw = g
        .get_array("tokenizer.ggml.merges")?
        .ok_or_else(|| anyhow!("{shown} has no tokenizer.ggml.merges; a gpt2 tokenizer needs them"))?;
    let mut merges = Vec::with_capacity(merges_raw.len());
    for (i, m) in merges_raw.iter().enumerate() {
        let m = m.as_str().ok_or_else(|| anyhow!("{shown}: tokenizer.ggml.merges[{i}] is not a string"))?;
        match m.split_once(' ') {
            Some((a, b)) if !a.is_empty() && !b.is_empty() && !b.contains(' ') => merges.push(json!([a, b])),
            _ => bail!("{shown}: tokenizer.ggml.merges[{i}] = {m:?} is not two tokens separated by one space"),
        }
    }
    Ok(merges)
}

/// The pre-tokenizer for `tokenizer.ggml.pre` (GPT-2 byte-level splitting when unknown, with a warning).
fn pre_tokenizer_json(g: &GgufFile) -> Result<Value> {
    let add_prefix_space = g.get_bool("tokenizer.ggml.add_space_prefix")?.unwrap_or(false);
    let byte_level = json!({
        "type": "ByteLevel", "add_prefix_space": add_prefix_space, "trim_offsets": true, "use_regex": true
    });
    Ok(match g.get_str("tokenizer.ggml.pre")? {
        Some("smollm") => json!({
            "type": "Sequence",
            "pretokenizers": [{ "type": "Digits", "individual_digits": true }, byte_level],
        }),
        Some("gpt-2") => byte_level,
        other => {
            log::warn!(
                "{}: no exact pre-tokenizer for tokenizer.ggml.pre = {}; using GPT-2 byte-level splitting, which may split some texts differently from llama.cpp",
                g.path().display(),
                other.unwrap_or("(absent)")
            );
            byte_level
        }
    })
}

/// The `TemplateProcessing` post-processor that adds BOS/EOS as `tokenizer.ggml.add_*_token` say.
pub(super) fn post_processor_json(g: &GgufFile, tokens: &[&str]) -> Result<Value> {
    let shown = g.path().display();
    let add_bos = g.get_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false);
    let add_eos = g.get_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false);
    let bos = special_token(g, tokens, "tokenizer.ggml.bos_token_id")?;
    let eos = special_token(g, tokens, "tokenizer.ggml.eos_token_id")?;
    let mut special_tokens = Map::new();
    let mut single = Vec::new();
    let mut pair = Vec::new();
    let piece = |tok: &str, type_id: u32| json!({ "SpecialToken": { "id": tok, "type_id": type_id } });
    let wrap = |seq: &str, type_id: u32, out: &mut Vec<Value>| -> Result<()> {
        if add_bos {
            let b = bos.ok_or_else(|| anyhow!("{shown}: add_bos_token is set but there is no bos_token_id"))?;
            out.push(piece(b, type_id));
        }
        out.push(json!({ "Sequence": { "id": seq, "type_id": type_id } }));
        if add_eos {
            let e = eos.ok_or_else(|| anyhow!("{shown}: add_eos_token is set but there is no eos_token_id"))?;
            out.push(piece(e, type_id));
        }
        Ok(())
    };
    wrap("A", 0, &mut single)?;
    wrap("A", 0, &mut pair)?;
    wrap("B", 1, &mut pair)?;
    for (flag, key, tok) in
        [(add_bos, "tokenizer.ggml.bos_token_id", bos), (add_eos, "tokenizer.ggml.eos_token_id", eos)]
    {
        if let (true, Some(id), Some(tok)) = (flag, g.get_u64(key)?, tok) {
            special_tokens.insert(tok.to_string(), json!({ "id": tok, "ids": [id], "tokens": [tok] }));
        }
    }
    Ok(json!({ "type": "TemplateProcessing", "single": single, "pair": pair, "special_tokens": special_tokens }))
}

/// Build `tokenizer.json` (the `tokenizers` library format) from the `tokenizer.ggml.*`
/// metadata of a `gpt2` (byte-level BPE) GGUF tokenizer — or, for a `llama` (SentencePiece)
/// one, [`super::spm_vocab::tokenizer_json`] — and check that it loads with
/// `tokenizers::Tokenizer`.
pub fn tokenizer_json(g: &GgufFile) -> Result<Value> {
    let shown = g.path().display();
    match g.get_str("tokenizer.ggml.model")? {
        Some("gpt2") => {}
        Some("llama") => return super::spm_vocab::tokenizer_json(g),
        Some(other) => bail!(
            "{shown}: tokenizer model `{other}` is not supported; only gpt2 (byte-level BPE) and llama (SentencePiece) tokenizers are"
        ),
        None => bail!("{shown} has no tokenizer.ggml.model; cannot build a tokenizer"),
    }
    let tokens = vocab_tokens(g)?;
    let types = token_types(g, tokens.len())?;
    let merges = merges_json(g)?;
    let (vocab, added, duplicates) = vocab_json(g, &tokens, &types);
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": pre_tokenizer_json(g)?,
        "post_processor": post_processor_json(g, &tokens)?,
        "decoder": { "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true },
        "model": {
            "type": "BPE",
            "dropout": null,
            "unk_token": null,
            "continuing_subword_prefix": null,
            "end_of_word_suffix": null,
            "fuse_unk": false,
            "byte_fallback": false,
            "ignore_merges": false,
            "vocab": vocab,
            "merges": merges,
        },
    });

    loads_with_vocab(tokenizer, tokens.len() - duplicates, shown)
}

/// Check that a `tokenizer.json` rebuilt from GGUF metadata loads with `tokenizers::Tokenizer`
/// and has `expected` distinct tokens; returns it.
pub(super) fn loads_with_vocab(tokenizer: Value, expected: usize, shown: impl std::fmt::Display) -> Result<Value> {
    let text = serde_json::to_string(&tokenizer)?;
    let loaded = tokenizers::Tokenizer::from_str(&text)
        .map_err(|e| anyhow!("{shown}: the tokenizer.json rebuilt from its metadata does not load: {e}"))?;
    if loaded.get_vocab_size(true) != expected {
        bail!("{shown}: the rebuilt tokenizer has {} tokens, expected {expected}", loaded.get_vocab_size(true));
    }
    Ok(tokenizer)
}

/// `tokenizer_config.json`: special tokens, chat template, BOS flag, max length.
pub fn tokenizer_config_json(g: &GgufFile, model_max_length: usize) -> Result<Value> {
    let tokens = vocab_tokens(g)?;
    Ok(json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": special_token(g, &tokens, "tokenizer.ggml.bos_token_id")?,
        "eos_token": special_token(g, &tokens, "tokenizer.ggml.eos_token_id")?,
        "pad_token": special_token(g, &tokens, "tokenizer.ggml.padding_token_id")?,
        "unk_token": special_token(g, &tokens, "tokenizer.ggml.unknown_token_id")?,
        "add_bos_token": g.get_bool("tokenizer.ggml.add_bos_token")?.unwrap_or(false),
        "add_eos_token": g.get_bool("tokenizer.ggml.add_eos_token")?.unwrap_or(false),
        "chat_template": g.get_str("tokenizer.chat_template")?,
        "clean_up_tokenization_spaces": false,
        "model_max_length": model_max_length,
    }))
}

/// `generation_config.json`: BOS, EOS (plus end-of-turn when it differs) and pad ids.
pub fn generation_config_json(g: &GgufFile) -> Result<Value> {
    let eos = g.get_u64("tokenizer.ggml.eos_token_id")?;
    let eot = g.get_u64("tokenizer.ggml.eot_token_id")?;
    let eos_value = match (eos, eot) {
        (Some(e), Some(t)) if e != t => json!([e, t]),
        (Some(e), _) => json!(e),
        (None, Some(t)) => json!(t),
        (None, None) => Value::Null,
    };
    let mut m = Map::new();
    m.insert("bos_token_id".into(), json!(g.get_u64("tokenizer.ggml.bos_token_id")?));
    m.insert("eos_token_id".into(), eos_value);
    if let Some(p) = g.get_u64("tokenizer.ggml.padding_token_id")? {
        m.insert("pad_token_id".into(), json!(p));
    }
    Ok(Value::Object(m))
}
