//! The typed settings of `[dataset]` that are more than a word: the row format
//! (`dataset.format`), the split with an optional slice (`dataset.split`, the syntax of
//! HF `datasets`' `ReadInstruction` strings: `train[:10%]`, `train[100:200]`), one entry of a
//! mixture (`[[dataset.sources]]`), and the dataset file kinds tuner reads. Parsed once here;
//! validation reports a bad value at its key, the fetch and tokenize stages read the types.
//!
//! Slices follow `datasets.arrow_reader` exactly: a percent boundary `p` of a split with `n`
//! rows is `int(round(p * n / 100.0))` (Python's round: halves to even) under the default
//! rounding `closest`, or `p * trunc(n / 100)` under `(pct1_dropremainder)`; a slice is in
//! percent when either boundary has `%`; negative boundaries count from the end and everything
//! is clamped to `0..=n`.

use serde::{Deserialize, Serialize};
use std::path::Path;

/// `dataset.format` (and `format` of a `[[dataset.sources]]` entry): how a row is read.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum DataFormat {
    /// Per row: `prompt.messages_field` (OpenAI messages), else `conversations` (ShareGPT), else
    /// the instruction/input/output fields; with `dataset.text_field` set, plain text.
    #[default]
    Auto,
    /// instruction / input / output fields (`prompt.*_field`).
    Alpaca,
    /// One text field (`dataset.text_field`, default "text"), trained whole (TRL's
    /// `dataset_text_field`, Axolotl's `completion`).
    Text,
    /// OpenAI chat: `messages` of {role, content}, roles system/user/assistant/tool, assistant
    /// `tool_calls`, an optional row-level `tools` list.
    Messages,
    /// ShareGPT: `conversations` of {from, value}; from is human/gpt/system/tool (or
    /// user/assistant, as Axolotl accepts).
    Sharegpt,
}

impl DataFormat {
    /// The recipe word.
    pub fn name(self) -> &'static str {
        match self {
            DataFormat::Auto => "auto",
            DataFormat::Alpaca => "alpaca",
            DataFormat::Text => "text",
            DataFormat::Messages => "messages",
            DataFormat::Sharegpt => "sharegpt",
        }
    }

    /// The format rows are read in, given the text field setting (`auto` with a text field is text).
    pub fn resolve(self, text_field: Option<&str>) -> DataFormat {
        match (self, text_field) {
            (DataFormat::Auto, Some(_)) => DataFormat::Text,
            (f, _) => f,
        }
    }

    /// Whether rows of this format need a chat template ("chat" or "chatml").
    pub fn is_chat(self) -> bool {
        matches!(self, DataFormat::Messages | DataFormat::Sharegpt)
    }
}

/// The field plain-text rows are read from when `dataset.text_field` is not set.
pub const DEFAULT_TEXT_FIELD: &str = "text";

/// The rounding of percent slice boundaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rounding {
    /// `int(round(p * n / 100))`, halves to even (the default of `datasets`).
    Closest,
    /// `p * trunc(n / 100)`: every percent the same size; needs n ≥ 100.
    Pct1DropRemainder,
}

/// `[from:to]` of a split spec, as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slice {
    pub from: Option<i64>,
    pub to: Option<i64>,
    /// Both boundaries are percents (either was written with `%`).
    pub percent: bool,
    pub rounding: Rounding,
}

/// `dataset.split`: a split name and an optional slice, e.g. `train[:10%]`. Written back as the
/// same string.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct SplitSpec {
    /// The split name (the hub split to fetch).
    pub name: String,
    pub slice: Option<Slice>,
    text: String,
}

impl Default for SplitSpec {
    fn default() -> Self {
        SplitSpec { name: "train".into(), slice: None, text: "train".into() }
    }
}

const SPLIT_SYNTAX: &str =
    "expected a split name with an optional slice, as in HF datasets: `train`, `train[:10%]`, `train[10%:]`, `train[:1000]`, `train[100:200]`";

fn parse_bound(s: &str) -> Result<(Option<i64>, bool), String> {
    let (num, pct) = match s.strip_suffix('%') {
        Some(n) => (n, true),
        None => (s, false),
    };
    if num.is_empty() {
        return if pct { Err("`%` without a number".into()) } else { Ok((None, false)) };
    }
    let digits = num.strip_prefix('-').unwrap_or(num);
    if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!("`{s}` is not a whole number (or a whole percent)"));
    }
    num.parse::<i64>().map(|v| (Some(v), pct)).map_err(|_| format!("`{s}` is out of range"))
}

impl SplitSpec {
    /// Parse `name` or `name[from:to]` with an optional `(closest)` / `(pct1_dropremainder)`.
    pub fn parse(s: &str) -> Result<SplitSpec, String> {
        let bad = |why: String| Err(format!("{SPLIT_SYNTAX}; found {s:?}: {why}"));
        let (head, rounding) = match s.strip_suffix(')').and_then(|h| h.rsplit_once('(')) {
            Some((h, "closest")) => (h, Some(Rounding::Closest)),
            Some((h, "pct1_dropremainder")) => (h, Some(Rounding::Pct1DropRemainder)),
            Some((_, r)) => return bad(format!("unknown rounding `{r}` (closest or pct1_dropremainder)")),
            None => (s, None),
        };
        if head.contains('+') {
            return bad("combining splits with `+` is not supported; list each part under [[dataset.sources]]".into());
        }
        let (name, slice) = match head.split_once('[') {
            None => (head, None),
            Some((name, rest)) => {
                let Some(inner) = rest.strip_suffix(']') else { return bad("the slice has no closing `]`".into()) };
                let Some((a, b)) = inner.split_once(':') else {
                    return bad("a slice needs a `:` (`[from:to]`; a single index is not a slice)".into());
                };
                let ((from, fp), (to, tp)) = match (parse_bound(a.trim()), parse_bound(b.trim())) {
                    (Ok(x), Ok(y)) => (x, y),
                    (Err(e), _) | (_, Err(e)) => return bad(e),
                };
                let percent = fp || tp;
                for v in [from, to].into_iter().flatten() {
                    if percent && v.abs() > 100 {
                        return bad(format!("percent boundaries must be within -100% and 100%, found {v}%"));
                    }
                }
                (name, Some(Slice { from, to, percent, rounding: rounding.unwrap_or(Rounding::Closest) }))
            }
        };
        let word = |w: &str| !w.is_empty() && w.chars().all(|c| c.is_alphanumeric() || c == '_' || c == '-');
        if !name.split('.').all(word) {
            return bad("the split name is made of letters, digits, `_` and `-`".into());
        }
        if rounding.is_some() && !slice.is_some_and(|s| s.percent) {
            return bad("a rounding applies to percent slices only".into());
        }
        Ok(SplitSpec { name: name.to_string(), slice, text: s.to_string() })
    }

    /// The setting as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The rows `from..to` this spec keeps of a split with `n` rows (`0..n` without a slice).
    pub fn range(&self, n: usize) -> Result<std::ops::Range<usize>, String> {
        let Some(sl) = self.slice else { return Ok(0..n) };
        let n_i = n as i64;
        let pct = |p: i64| -> Result<i64, String> {
            match sl.rounding {
                Rounding::Closest => Ok((p as f64 * n as f64 / 100.0).round_ties_even() as i64),
                Rounding::Pct1DropRemainder if n < 100 => Err(format!(
                    "split {:?}: pct1_dropremainder rounding needs at least 100 rows, the split has {n}",
                    self.text
                )),
                Rounding::Pct1DropRemainder => Ok(p * (n_i / 100)),
            }
        };
        let (mut from, mut to) = if sl.percent {
            (sl.from.map(pct).transpose()?.unwrap_or(0), sl.to.map(pct).transpose()?.unwrap_or(n_i))
        } else {
            (sl.from.unwrap_or(0), sl.to.unwrap_or(n_i))
        };
        if from < 0 {
            from = (n_i + from).max(0);
        }
        if to < 0 {
            to = (n_i + to).max(0);
        }
        let (from, to) = (from.min(n_i) as usize, to.min(n_i) as usize);
        Ok(from..to.max(from))
    }
}

impl TryFrom<String> for SplitSpec {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        SplitSpec::parse(&s)
    }
}

impl From<SplitSpec> for String {
    fn from(s: SplitSpec) -> String {
        s.text
    }
}

impl std::fmt::Display for SplitSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// One `[[dataset.sources]]` entry: a source of a mixture. Unset keys take the value of the
/// same key in `[dataset]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SourceEntry {
    /// A local file or folder, or `hf:ORG/NAME`.
    pub source: String,
    pub format: Option<DataFormat>,
    pub text_field: Option<String>,
    pub split: Option<SplitSpec>,
    pub config: Option<String>,
    pub revision: Option<String>,
    /// This source's share of the mixture's rows (weights are normalised by their sum).
    /// Unset on every entry: the sources are concatenated, every row once.
    pub weight: Option<f64>,
}

/// Dataset file kinds the tokenize stage reads, by how the file name ends.
pub const DATA_EXTENSIONS: [&str; 7] = ["jsonl", "json", "jsonl.gz", "json.gz", "csv", "parquet", "arrow"];

/// The kind of a dataset file (an entry of [`DATA_EXTENSIONS`]), or None if tuner does not read it.
pub fn data_file_kind(path: &Path) -> Option<&'static str> {
    let name = path.file_name()?.to_str()?.to_ascii_lowercase();
    let mut kinds: Vec<&'static str> = DATA_EXTENSIONS.to_vec();
    kinds.sort_by_key(|k| std::cmp::Reverse(k.len()));
    kinds.into_iter().find(|k| name.ends_with(&format!(".{k}")))
}
