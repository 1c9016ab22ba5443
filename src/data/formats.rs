//! Row formats: what a dataset row holds, turned into what the prompt renderer reads.
//!
//! - text (TRL's `dataset_text_field`, Axolotl's `completion`): one field, trained whole;
//! - alpaca: instruction / input / output fields, rendered by `prompt.template`;
//! - messages (OpenAI chat, as TRL and transformers' `apply_chat_template` take it): a list of
//!   {role, content} with roles system/user/assistant/tool and assistant `tool_calls`, checked
//!   by the renderer;
//! - sharegpt (Axolotl's `sharegpt` / `chat_template` with `from`/`value`): `conversations` of
//!   {from, value}, from human/gpt/system/tool (or user/assistant), rewritten as messages.
//!
//! `auto` decides per row: the messages field, else `conversations`, else alpaca.

use crate::recipe::DataFormat;
use serde_json::{Map, Value};
use std::sync::Arc;

/// How one source's rows are read (a resolved `format` with its text field).
#[derive(Debug, Clone, PartialEq, Default)]
pub enum RowFormat {
    #[default]
    Auto,
    Alpaca,
    /// Plain text from this field.
    Text(Arc<str>),
    Messages,
    ShareGpt,
}

impl RowFormat {
    /// From the recipe: `format`, with `text_field` (which makes "auto" plain text).
    pub fn new(format: DataFormat, text_field: Option<&str>) -> RowFormat {
        match format.resolve(text_field) {
            DataFormat::Auto => RowFormat::Auto,
            DataFormat::Alpaca => RowFormat::Alpaca,
            DataFormat::Text => RowFormat::Text(Arc::from(text_field.unwrap_or(crate::recipe::DEFAULT_TEXT_FIELD))),
            DataFormat::Messages => RowFormat::Messages,
            DataFormat::Sharegpt => RowFormat::ShareGpt,
        }
    }
}

/// A row ready to render: fields for `prompt.template` (alpaca fields, or a conversation under
/// `prompt.messages_field`), or plain text trained whole.
#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    Fields(Map<String, Value>),
    Text(String),
}

/// The ShareGPT conversation field.
pub const CONVERSATIONS_FIELD: &str = "conversations";

/// Read a row in its format. Errors name the field (`conversations[2].from`), and the caller
/// adds the file and line.
pub fn normalize(row: &Map<String, Value>, format: &RowFormat, messages_field: &str) -> Result<Content, String> {
    match format {
        RowFormat::Text(field) => match row.get(&**field) {
            Some(Value::String(s)) => Ok(Content::Text(s.clone())),
            None | Some(Value::Null) => Err(format!("missing field `{field}` (the text of a plain-text row)")),
            Some(other) => Err(format!("field `{field}`: expected a string, found {}", type_name(other))),
        },
        RowFormat::Alpaca => {
            let mut m = row.clone();
            m.remove(messages_field);
            Ok(Content::Fields(m))
        }
        RowFormat::Messages if !row.contains_key(messages_field) => {
            Err(format!("missing field `{messages_field}` (dataset.format = \"messages\")"))
        }
        RowFormat::ShareGpt => from_sharegpt(row, messages_field).map(Content::Fields),
        RowFormat::Auto if !row.contains_key(messages_field) && row.contains_key(CONVERSATIONS_FIELD) => {
            from_sharegpt(row, messages_field).map(Content::Fields)
        }
        RowFormat::Messages | RowFormat::Auto => Ok(Content::Fields(row.clone())),
    }
}

/// How a JSON value's type reads in a message.
pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The chat role of a ShareGPT `from` (Axolotl's default mapping).
fn sharegpt_role(from: &str) -> Option<&'static str> {
    Some(match from {
        "human" | "user" => "user",
        "gpt" | "assistant" => "assistant",
        "system" => "system",
        "tool" => "tool",
        _ => return None,
    })
}

/// `conversations: [{from, value}]` → `messages_field: [{role, content}]` (a row-level `tools`
/// list is kept).
fn from_sharegpt(row: &Map<String, Value>, messages_field: &str) -> Result<Map<String, Value>, String> {
    let f = CONVERSATIONS_FIELD;
    let turns = match row.get(f) {
        Some(Value::Array(a)) => a,
        None | Some(Value::Null) => return Err(format!("missing field `{f}` (dataset.format = \"sharegpt\")")),
        Some(other) => {
            return Err(format!("field `{f}`: expected a list of {{from, value}} objects, found {}", type_name(other)))
        }
    };
    let mut messages = Vec::with_capacity(turns.len());
    for (i, t) in turns.iter().enumerate() {
        let obj = t.as_object().ok_or_else(|| format!("`{f}[{i}]`: expected an object with from and value"))?;
        let from = match obj.get("from") {
            Some(Value::String(s)) => s.as_str(),
            None | Some(Value::Null) => return Err(format!("`{f}[{i}].from`: missing")),
            Some(other) => return Err(format!("`{f}[{i}].from`: expected a string, found {}", type_name(other))),
        };
        let role = sharegpt_role(from).ok_or_else(|| {
            format!("`{f}[{i}].from`: expected \"human\", \"gpt\", \"system\" or \"tool\" (or \"user\", \"assistant\"), found {from:?}")
        })?;
        let value = match obj.get("value") {
            Some(Value::String(s)) => s.clone(),
            None | Some(Value::Null) => return Err(format!("`{f}[{i}].value`: missing")),
            Some(other) => return Err(format!("`{f}[{i}].value`: expected a string, found {}", type_name(other))),
        };
        messages.push(serde_json::json!({ "role": role, "content": value }));
    }
    if !messages.iter().any(|m| m["role"] == "assistant") {
        return Err(format!("field `{f}`: no \"gpt\" turn to train on"));
    }
    let mut out = Map::new();
    out.insert(messages_field.to_string(), Value::Array(messages));
    if let Some(tools) = row.get("tools") {
        out.insert("tools".into(), tools.clone());
    }
    Ok(out)
}
