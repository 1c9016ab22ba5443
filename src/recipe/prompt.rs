//! `prompt.template`, parsed once: a built-in prompt ("alpaca", "chatml", "chat") or an inline
//! format string such as `"### 指令\n{instruction}\n### 回答\n{output}"`, whose `{field}` slots
//! name row fields and whose `{output_field}` slot starts the response. Written back as the same
//! string. The renderer (data/template.rs) and the Ollama export read it; recipe validation
//! reports a bad one at its key.

use serde::{Deserialize, Serialize};

/// `prompt.template`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum PromptTemplate {
    /// The Stanford Alpaca prompt (with and without an input).
    #[default]
    Alpaca,
    /// ChatML turns over a messages field (or instruction/output).
    ChatMl,
    /// The tokenizer's own Jinja chat template.
    Chat,
    /// An inline format string with `{field}` slots (checked by [`parse_format`]).
    Inline(String),
}

/// The built-in names.
pub const BUILT_IN_TEMPLATES: [&str; 3] = ["alpaca", "chatml", "chat"];

impl PromptTemplate {
    /// Parse a template setting. Errors are whole sentences: "expected …, found …" for a word
    /// that is no template, or what is wrong with a format string.
    pub fn parse(s: &str) -> Result<PromptTemplate, String> {
        match s {
            "alpaca" => Ok(PromptTemplate::Alpaca),
            "chatml" => Ok(PromptTemplate::ChatMl),
            "chat" => Ok(PromptTemplate::Chat),
            t if !t.contains('{') => {
                let hint = crate::recipe::validate::did_you_mean(t, BUILT_IN_TEMPLATES.into_iter())
                    .map(|w| format!("; did you mean {w:?}?"))
                    .unwrap_or_default();
                Err(format!(
                    "expected \"alpaca\", \"chatml\", \"chat\" or a format string with {{field}} slots, found {t:?}{hint}"
                ))
            }
            t => parse_format(t).map(|_| PromptTemplate::Inline(t.to_string())),
        }
    }

    /// The setting as written.
    pub fn as_str(&self) -> &str {
        match self {
            PromptTemplate::Alpaca => "alpaca",
            PromptTemplate::ChatMl => "chatml",
            PromptTemplate::Chat => "chat",
            PromptTemplate::Inline(t) => t,
        }
    }
}

impl TryFrom<String> for PromptTemplate {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        PromptTemplate::parse(&s)
    }
}

impl From<PromptTemplate> for String {
    fn from(t: PromptTemplate) -> String {
        t.as_str().to_string()
    }
}

impl std::fmt::Display for PromptTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A piece of an inline format string.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    Text(String),
    Field(String),
}

/// Parse `"### 指令\n{instruction}\n### 回答\n{output}"` into pieces; `{{` and `}}` are literal braces.
pub fn parse_format(s: &str) -> Result<Vec<Piece>, String> {
    let mut out = vec![];
    let mut text = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '{' if chars.peek() == Some(&'{') => {
                chars.next();
                text.push('{');
            }
            '}' if chars.peek() == Some(&'}') => {
                chars.next();
                text.push('}');
            }
            '{' => {
                let mut name = String::new();
                loop {
                    match chars.next() {
                        Some('}') => break,
                        Some(ch) => name.push(ch),
                        None => {
                            return Err(format!(
                                "unclosed `{{{name}` in the format string; write `{{{{` for a literal brace"
                            ))
                        }
                    }
                }
                if name.is_empty() || !name.chars().all(|ch| ch.is_alphanumeric() || ch == '_') {
                    return Err(format!("`{{{name}}}` is not a field slot; slots look like `{{instruction}}`, literal braces are `{{{{` and `}}}}`"));
                }
                if !text.is_empty() {
                    out.push(Piece::Text(std::mem::take(&mut text)));
                }
                out.push(Piece::Field(name));
            }
            '}' => return Err("a lone `}` in the format string; write `}}` for a literal brace".into()),
            _ => text.push(c),
        }
    }
    if !text.is_empty() {
        out.push(Piece::Text(text));
    }
    Ok(out)
}
