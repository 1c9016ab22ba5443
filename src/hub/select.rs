//! Which files of a hub repository tuner takes: the model files it loads
//! ([`is_model_file`]) and the data files of one dataset split, in the layouts the
//! `datasets` library reads ([`select_split_files`]) and in the hub's parquet conversion
//! branch ([`select_converted_split_files`]). Pure functions over repository paths.

use std::collections::BTreeSet;

/// Whether a model repo file is one tuner downloads: top-level `config.json`,
/// `generation_config.json`, `tokenizer.json`, `tokenizer_config.json`, `tokenizer.model`
/// (SentencePiece's model, which GGUF export writes from), `special_tokens_map.json`,
/// `chat_template.jinja`/`chat_template.json` (where newer repos keep the chat template),
/// `model.safetensors.index.json` and `*.safetensors`.
/// Not `.bin`, `.pt`, `.gguf`, ONNX, or anything in a subfolder.
pub fn is_model_file(name: &str) -> bool {
    if name.contains('/') {
        return false;
    }
    matches!(
        name,
        "config.json"
            | "generation_config.json"
            | "tokenizer.json"
            | "tokenizer_config.json"
            | "tokenizer.model"
            | "special_tokens_map.json"
            | "chat_template.jinja"
            | "chat_template.json"
            | "model.safetensors.index.json"
    ) || name.ends_with(".safetensors")
}

/// `*` matches any run of characters other than `/`; everything else matches itself.
fn glob_match(pattern: &[u8], name: &[u8]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => {
            for i in 0..=name.len() {
                if glob_match(rest, &name[i..]) {
                    return true;
                }
                if i < name.len() && name[i] == b'/' {
                    break;
                }
            }
            false
        }
        Some((c, rest)) => name.first() == Some(c) && glob_match(rest, &name[1..]),
    }
}

/// The names matching the first pattern (in order) that matches any, sorted.
fn first_layout<S: AsRef<str>>(names: &[S], patterns: &[String]) -> Vec<String> {
    for p in patterns {
        let mut hits: Vec<String> = names
            .iter()
            .map(|n| n.as_ref())
            .filter(|n| glob_match(p.as_bytes(), n.as_bytes()))
            .map(str::to_string)
            .collect();
        if !hits.is_empty() {
            hits.sort();
            return hits;
        }
    }
    Vec::new()
}

/// Whether `split` occurs in `path` between delimiters (`-`, `.`, `_`, space, `/`,
/// digits or the ends), so `train` matches `x/my_train-0.parquet` but not `pretrain.parquet`.
fn contains_split_token(path: &str, split: &str) -> bool {
    let delim = |c: Option<char>| c.is_none_or(|c| matches!(c, '-' | '.' | '_' | ' ' | '/') || c.is_ascii_digit());
    path.match_indices(split)
        .any(|(i, _)| delim(path[..i].chars().next_back()) && delim(path[i + split.len()..].chars().next()))
}

/// The data files of `split` among a dataset commit's files, sorted; empty when none.
/// The first layout that matches wins, in this order:
///
/// 1. with a config: `{config}/{split}-*.parquet`, `{config}/{split}.parquet`,
///    `{config}/{split}/*.parquet`;
/// 2. `data/{split}-*.parquet`, `data/{split}.parquet`, `{split}/*.parquet`,
///    `{split}-*.parquet`, `{split}.parquet`;
/// 3. top-level JSON lines / JSON named after the split: `{split}.jsonl`,
///    `{split}-*.jsonl`, `{split}.json`, `{split}-*.json`, and the same gzipped (`.jsonl.gz`,
///    `.json.gz`);
/// 4. any `.parquet` whose path holds the split as a delimited word (`*{split}*.parquet`),
///    under `{config}/` first when a config is given.
pub fn select_split_files<S: AsRef<str>>(names: &[S], config: Option<&str>, split: &str) -> Vec<String> {
    let mut patterns = Vec::new();
    if let Some(c) = config {
        patterns.push(format!("{c}/{split}-*.parquet"));
        patterns.push(format!("{c}/{split}.parquet"));
        patterns.push(format!("{c}/{split}/*.parquet"));
    }
    patterns.extend([
        format!("data/{split}-*.parquet"),
        format!("data/{split}.parquet"),
        format!("{split}/*.parquet"),
        format!("{split}-*.parquet"),
        format!("{split}.parquet"),
        format!("{split}.jsonl"),
        format!("{split}-*.jsonl"),
        format!("{split}.json"),
        format!("{split}-*.json"),
        format!("{split}.jsonl.gz"),
        format!("{split}-*.jsonl.gz"),
        format!("{split}.json.gz"),
        format!("{split}-*.json.gz"),
    ]);
    let hits = first_layout(names, &patterns);
    if !hits.is_empty() {
        return hits;
    }
    let fuzzy = |under: Option<&str>| -> Vec<String> {
        let mut v: Vec<String> = names
            .iter()
            .map(|n| n.as_ref())
            .filter(|n| n.ends_with(".parquet"))
            .filter(|n| under.is_none_or(|c| n.starts_with(&format!("{c}/"))))
            .filter(|n| {
                let stem = &n[..n.len() - ".parquet".len()];
                let stem = under.map_or(stem, |c| &stem[c.len() + 1..]);
                contains_split_token(stem, split)
            })
            .map(str::to_string)
            .collect();
        v.sort();
        v
    };
    if let Some(c) = config {
        let v = fuzzy(Some(c));
        if !v.is_empty() {
            return v;
        }
    }
    let v = fuzzy(None);
    if !v.is_empty() || split != "train" || config.is_some() {
        return v;
    }
    // A repo whose only data file carries no split name (yahma/alpaca-cleaned's
    // `alpaca_data_cleaned.json`) is one `train` split, as `datasets` reads it.
    let data: Vec<String> = names
        .iter()
        .map(|n| n.as_ref())
        .filter(|n| !n.starts_with('.') && [".json", ".jsonl", ".parquet", ".csv"].iter().any(|e| n.ends_with(e)))
        .map(str::to_string)
        .collect();
    if data.len() == 1 {
        data
    } else {
        vec![]
    }
}

/// The files of `split` in the hub's parquet conversion (`refs/convert/parquet`), sorted.
/// The config folder is `config`, else `default`, else the only top-level folder when
/// there is exactly one. Layouts: `{config}/{split}/*.parquet`,
/// `{config}/partial-{split}/*.parquet` (large datasets, converted in part), and the
/// older `{config}/*-{split}.parquet` and `{config}/*-{split}-*.parquet`.
pub fn select_converted_split_files<S: AsRef<str>>(names: &[S], config: Option<&str>, split: &str) -> Vec<String> {
    let cfg = match config {
        Some(c) => c.to_string(),
        None => {
            let dirs: BTreeSet<&str> =
                names.iter().filter_map(|n| n.as_ref().split_once('/').map(|(d, _)| d)).collect();
            if dirs.contains("default") || dirs.len() != 1 {
                "default".to_string()
            } else {
                dirs.into_iter().next().unwrap_or("default").to_string()
            }
        }
    };
    first_layout(
        names,
        &[
            format!("{cfg}/{split}/*.parquet"),
            format!("{cfg}/partial-{split}/*.parquet"),
            format!("{cfg}/*-{split}.parquet"),
            format!("{cfg}/*-{split}-*.parquet"),
        ],
    )
}
