//! Request bodies of the three generation endpoints, parsed and checked by hand so
//! that every error names its field: `{"error": {"message", "type", "param", "code"}}`, the
//! shape OpenAI's API uses.
//!
//! Rules: `null` means absent. On the OpenAI endpoints a field this server does not know is
//! ignored with a warning in the log (OpenAI's clients send fields newer than the server, as
//! vLLM also accepts them); OpenAI fields it knows but does not implement are accepted only at
//! a value that does not change the result (`n: 1`, `echo: false`, `tools: []`,
//! `response_format: {"type": "text"}`, …) and refused (400) otherwise. `/generate`, this
//! crate's own shape, refuses unknown fields (400, naming them). A `model` other than the served
//! one (`--served-model-name`, else the `--model` path) is a 404 `model_not_found`.
//! `max_new_tokens`/`max_tokens` over `--max-new-tokens-cap` is refused (400), never clamped.
//! Defaults: `/generate` is greedy with 256 new tokens; `/v1/completions` samples at
//! temperature 1 with 16 new tokens; `/v1/chat/completions` samples at temperature 1 up to the
//! cap. Every limit is also lowered to what the model's context leaves after the prompt.
//!
//! `/generate` also takes `max_length` instead of `max_new_tokens`: as in transformers'
//! `generate`, the total length in tokens, prompt (BOS included) plus new tokens; the worker
//! turns it into `max_length − prompt tokens` new tokens once the prompt is tokenized.

use crate::data::template::Message;
use crate::generate::SamplingParams;
use crate::serve::queue::{Prompt, Request};
use serde_json::{Map, Value};

pub use super::error::ApiError;

/// Which endpoint a body was sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /generate`.
    Generate,
    /// `POST /v1/completions`.
    Completions,
    /// `POST /v1/chat/completions`.
    Chat,
}

/// A parsed body: the request for the worker and how to answer.
#[derive(Debug, Clone)]
pub struct Parsed {
    /// Prompt and sampling.
    pub request: Request,
    /// Answer with Server-Sent Events.
    pub stream: bool,
    /// OpenAI `stream_options.include_usage`: one more chunk with token counts.
    pub include_usage: bool,
}

/// Server-wide limits that parsing enforces.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The most new tokens one request may ask for.
    pub max_new_tokens_cap: usize,
}

const GENERATE_FIELDS: &[&str] = &[
    "prompt",
    "max_new_tokens",
    "max_length",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "seed",
    "stop",
    "stream",
];
const OPENAI_FIELDS: &[&str] = &[
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "seed",
    "stop",
    "stream",
    "stream_options",
    "n",
    "user",
    "echo",
    "logprobs",
    "top_logprobs",
    "presence_penalty",
    "frequency_penalty",
    "best_of",
    "suffix",
    "logit_bias",
    "response_format",
    "tools",
    "tool_choice",
    "functions",
    "function_call",
    "modalities",
    "audio",
];
const MAX_STOP: usize = 16;

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// The body's fields, read one by one; `null` counts as absent.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
}

impl<'a> Fields<'a> {
    fn get(&self, key: &str) -> Option<&'a Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn str(&self, key: &str) -> Result<Option<&'a str>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(ApiError::field(key, format!("`{key}` must be a string (found {})", type_name(v)))),
        }
    }

    fn bool(&self, key: &str) -> Result<Option<bool>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(ApiError::field(key, format!("`{key}` must be a boolean (found {})", type_name(v)))),
        }
    }

    fn number(&self, key: &str) -> Result<Option<f64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => n
                .as_f64()
                .filter(|x| x.is_finite())
                .map(Some)
                .ok_or_else(|| ApiError::field(key, format!("`{key}` must be a finite number"))),
            Some(v) => Err(ApiError::field(key, format!("`{key}` must be a number (found {})", type_name(v)))),
        }
    }

    /// A non-negative integer; negative integers are refused with the value named.
    fn uint(&self, key: &str) -> Result<Option<u64>, ApiError> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Number(n)) => match (n.as_u64(), n.as_i64()) {
                (Some(x), _) => Ok(Some(x)),
                (None, Some(x)) => Err(ApiError::field(key, format!("`{key}` must be ≥ 0 (found {x})"))),
                _ => Err(ApiError::field(key, format!("`{key}` must be an integer (found {n})"))),
            },
            Some(v) => Err(ApiError::field(key, format!("`{key}` must be an integer (found {})", type_name(v)))),
        }
    }

    /// `stop`: a string or a list of strings.
    fn stop(&self) -> Result<Vec<String>, ApiError> {
        let list = match self.get("stop") {
            None => return Ok(Vec::new()),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => a
                .iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s.clone()),
                    v => Err(ApiError::field("stop", format!("`stop[{i}]` must be a string (found {})", type_name(v)))),
                })
                .collect::<Result<Vec<_>, _>>()?,
            Some(v) => {
                return Err(ApiError::field(
                    "stop",
                    format!("`stop` must be a string or a list of strings (found {})", type_name(v)),
                ))
            }
        };
        if list.len() > MAX_STOP {
            return Err(ApiError::field(
                "stop",
                format!("`stop` has {} entries; at most {MAX_STOP} are allowed", list.len()),
            ));
        }
        if list.iter().any(String::is_empty) {
            return Err(ApiError::field("stop", "`stop` strings must not be empty"));
        }
        Ok(list)
    }

    /// An OpenAI field this server does not implement: accepted only at `default`.
    fn only_default(&self, key: &str, is_default: impl Fn(&Value) -> bool, default: &str) -> Result<(), ApiError> {
        match self.get(key) {
            Some(v) if !is_default(v) => {
                Err(ApiError::field(key, format!("`{key}` is not supported by this server (only {default})")))
            }
            _ => Ok(()),
        }
    }
}

fn as_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::invalid(format!("the body is not valid JSON: {e}")))?;
    match v {
        Value::Object(o) => Ok(o),
        v => Err(ApiError::invalid(format!("the body must be a JSON object (found {})", type_name(&v)))),
    }
}

fn check_known(obj: &Map<String, Value>, known: &[&str]) -> Result<(), ApiError> {
    for key in obj.keys() {
        if !known.contains(&key.as_str()) {
            let mut all = known.to_vec();
            all.sort_unstable();
            return Err(ApiError::field(
                key,
                format!("unknown field `{key}`; this endpoint takes: {}", all.join(", ")),
            ));
        }
    }
    Ok(())
}

/// OpenAI endpoints: fields outside `extra` and [`OPENAI_FIELDS`] are ignored, each with a warning.
fn warn_unknown(obj: &Map<String, Value>, extra: &[&str], endpoint: &str) {
    for key in obj.keys().filter(|k| !extra.contains(&k.as_str()) && !OPENAI_FIELDS.contains(&k.as_str())) {
        log::warn!("{endpoint}: ignoring the request field `{key}`, which this server does not know");
    }
}

fn prompt_text(f: &Fields, endpoint: Endpoint) -> Result<String, ApiError> {
    match f.get("prompt") {
        None => Err(ApiError::field("prompt", "missing field `prompt`")),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(a)) if endpoint == Endpoint::Completions => match a.as_slice() {
            [Value::String(s)] => Ok(s.clone()),
            [_] => Err(ApiError::field("prompt", "`prompt` must be a string (token-id prompts are not supported)")),
            _ => Err(ApiError::field(
                "prompt",
                format!("`prompt` holds {} prompts; this server takes one per request", a.len()),
            )),
        },
        Some(v) => Err(ApiError::field("prompt", format!("`prompt` must be a string (found {})", type_name(v)))),
    }
}

fn message(i: usize, v: &Value) -> Result<Message, ApiError> {
    let at = format!("messages[{i}]");
    let Value::Object(m) = v else {
        return Err(ApiError::field("messages", format!("`{at}` must be an object (found {})", type_name(v))));
    };
    message_extras(&at, m)?;
    let role = match m.get("role") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::String(_)) => return Err(ApiError::field("messages", format!("`{at}.role` is empty"))),
        None | Some(Value::Null) => return Err(ApiError::field("messages", format!("missing field `{at}.role`"))),
        Some(v) => {
            return Err(ApiError::field("messages", format!("`{at}.role` must be a string (found {})", type_name(v))))
        }
    };
    let content = match m.get("content") {
        Some(Value::String(s)) => s.clone(),
        None | Some(Value::Null) => String::new(),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    _ => {
                        return Err(ApiError::field(
                            "messages",
                            format!(
                            "`{at}.content[{j}]` must be {{\"type\": \"text\", \"text\": …}} (only text is supported)"
                        ),
                        ))
                    }
                }
            }
            text
        }
        Some(v) => {
            return Err(ApiError::field(
                "messages",
                format!("`{at}.content` must be a string or a list of text parts (found {})", type_name(v)),
            ))
        }
    };
    Ok(Message { role, content })
}

/// A message's fields besides role, content and name: tool calls (a non-empty `tool_calls`, a
/// `tool_call_id`, a `function_call`) are refused, since the chat template gets no tools; null
/// fields and an empty `tool_calls` (what a client sends back from a response) are ignored, and
/// so are other fields, each with a warning.
fn message_extras(at: &str, m: &Map<String, Value>) -> Result<(), ApiError> {
    for (k, v) in m.iter().filter(|(k, v)| !["role", "content", "name"].contains(&k.as_str()) && !v.is_null()) {
        let empty_calls = k == "tool_calls" && v.as_array().is_some_and(Vec::is_empty);
        if matches!(k.as_str(), "tool_calls" | "tool_call_id" | "function_call") && !empty_calls {
            return Err(ApiError::field(
                "messages",
                format!("`{at}.{k}` is not supported by this server: there is no function calling"),
            ));
        }
        if !empty_calls {
            log::warn!("/v1/chat/completions: ignoring the message field `{at}.{k}`, which this server does not know");
        }
    }
    Ok(())
}

fn messages(f: &Fields) -> Result<Vec<Message>, ApiError> {
    match f.get("messages") {
        None => Err(ApiError::field("messages", "missing field `messages`")),
        Some(Value::Array(a)) if a.is_empty() => Err(ApiError::field("messages", "`messages` is empty")),
        Some(Value::Array(a)) => a.iter().enumerate().map(|(i, v)| message(i, v)).collect(),
        Some(v) => {
            Err(ApiError::field("messages", format!("`messages` must be a list of messages (found {})", type_name(v))))
        }
    }
}

/// The fields OpenAI clients send that this server only takes at values that leave the result
/// as it is; `model` must name the served model.
fn openai_defaults(f: &Fields, served: &str) -> Result<(), ApiError> {
    if let Some(m) = f.str("model")?.filter(|m| *m != served) {
        return Err(ApiError::model_not_found(m, served));
    }
    let is = |x: f64| move |v: &Value| v.as_f64() == Some(x);
    let empty = |v: &Value| v.as_array().is_some_and(Vec::is_empty);
    let no_call = |v: &Value| matches!(v.as_str(), Some("none" | "auto"));
    f.only_default("n", is(1.0), "n = 1")?;
    f.only_default("best_of", is(1.0), "best_of = 1")?;
    f.only_default("presence_penalty", is(0.0), "0")?;
    f.only_default("frequency_penalty", is(0.0), "0")?;
    f.only_default("echo", |v| v == &Value::Bool(false), "false")?;
    f.only_default("logprobs", |v| v == &Value::Bool(false) || v.as_f64() == Some(0.0), "false, 0 or null")?;
    f.only_default("top_logprobs", is(0.0), "0 or null")?;
    f.only_default("suffix", |v| v.as_str() == Some(""), "null")?;
    f.only_default("logit_bias", |v| v.as_object().is_some_and(Map::is_empty), "{} or null")?;
    f.only_default("tools", empty, "[] or null: there is no function calling")?;
    f.only_default("functions", empty, "[] or null: there is no function calling")?;
    f.only_default("tool_choice", no_call, "\"none\", \"auto\" or null: there is no function calling")?;
    f.only_default("function_call", no_call, "\"none\", \"auto\" or null: there is no function calling")?;
    f.only_default("modalities", |v| v == &serde_json::json!(["text"]), "[\"text\"] or null")?;
    f.only_default("audio", |_| false, "null")?;
    response_format(f)?;
    f.str("user")?;
    Ok(())
}

/// `response_format`: `{"type": "text"}` is what the server does anyway; JSON modes are refused,
/// because nothing constrains the output to be JSON.
fn response_format(f: &Fields) -> Result<(), ApiError> {
    let Some(v) = f.get("response_format") else { return Ok(()) };
    let kind = match v {
        Value::Object(o) => o.get("type").and_then(Value::as_str),
        v => {
            return Err(ApiError::field(
                "response_format",
                format!("`response_format` must be an object like {{\"type\": \"text\"}} (found {})", type_name(v)),
            ))
        }
    };
    match kind {
        Some("text") => Ok(()),
        Some(t @ ("json_object" | "json_schema")) => Err(ApiError::field(
            "response_format",
            format!("`response_format` {{\"type\": \"{t}\"}} is not supported by this server: it does not constrain the output to JSON; omit it (or use {{\"type\": \"text\"}}) and ask for JSON in the prompt"),
        )),
        _ => Err(ApiError::field(
            "response_format",
            "`response_format.type` must be \"text\" (\"json_object\" and \"json_schema\" are not supported)",
        )),
    }
}

/// The sampling fields common to every endpoint; `max_key` names the length field.
fn sampling(
    f: &Fields,
    max_key: &str,
    default_max: usize,
    default_temperature: f64,
    limits: &Limits,
    seed: u64,
) -> Result<SamplingParams, ApiError> {
    let cap = limits.max_new_tokens_cap;
    let max_new_tokens = match f.uint(max_key)? {
        None => default_max.min(cap),
        Some(0) => return Err(ApiError::field(max_key, format!("`{max_key}` must be at least 1"))),
        Some(n) if n > cap as u64 => {
            return Err(ApiError::field(max_key, format!("`{max_key}` is {n}, over this server's cap of {cap} (--max-new-tokens-cap); the request is refused, not clamped")))
        }
        Some(n) => n as usize,
    };
    let temperature = f.number("temperature")?.unwrap_or(default_temperature);
    if temperature < 0.0 {
        return Err(ApiError::field("temperature", format!("`temperature` must be ≥ 0 (found {temperature})")));
    }
    let top_p = f.number("top_p")?.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(ApiError::field("top_p", format!("`top_p` must be in (0, 1] (found {top_p})")));
    }
    let top_k = f.uint("top_k")?.unwrap_or(0) as usize;
    let repetition_penalty = f.number("repetition_penalty")?.unwrap_or(1.0);
    if repetition_penalty <= 0.0 {
        return Err(ApiError::field(
            "repetition_penalty",
            format!("`repetition_penalty` must be > 0 (found {repetition_penalty})"),
        ));
    }
    let seed = match f.get("seed") {
        Some(Value::Number(n)) if n.as_i64().is_some() || n.as_u64().is_some() => {
            n.as_u64().or(n.as_i64().map(|x| x as u64)).unwrap_or(seed)
        }
        Some(v) => return Err(ApiError::field("seed", format!("`seed` must be an integer (found {})", type_name(v)))),
        None => seed,
    };
    let mut p = SamplingParams::default();
    (p.max_new_tokens, p.temperature, p.top_k, p.top_p, p.repetition_penalty, p.seed) =
        (max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed);
    p.stop = f.stop()?;
    Ok(p)
}

/// `/generate`'s `max_length` (prompt + new tokens), which excludes `max_new_tokens`.
fn generate_max_length(f: &Fields) -> Result<Option<usize>, ApiError> {
    let Some(n) = f.uint("max_length")? else { return Ok(None) };
    if f.get("max_new_tokens").is_some() {
        return Err(ApiError::field(
            "max_length",
            "give `max_new_tokens` (new tokens) or `max_length` (prompt + new tokens, as in transformers), not both",
        ));
    }
    if n == 0 {
        return Err(ApiError::field("max_length", "`max_length` must be at least 1"));
    }
    Ok(Some(usize::try_from(n).unwrap_or(usize::MAX)))
}

/// Parse and check a body for `endpoint`. `served` is the model id requests may name; `seed`
/// is used when the body gives none.
pub fn parse(endpoint: Endpoint, body: &[u8], limits: &Limits, served: &str, seed: u64) -> Result<Parsed, ApiError> {
    let obj = as_object(body)?;
    let f = Fields { obj: &obj };
    let stream = f.bool("stream")?.unwrap_or(false);
    let mut max_length = None;
    let (prompt, sampling) = match endpoint {
        Endpoint::Generate => {
            check_known(&obj, GENERATE_FIELDS)?;
            let default = SamplingParams::default();
            max_length = generate_max_length(&f)?;
            // With `max_length`, the cap bounds the new tokens it leaves (checked by the worker).
            let default_max = if max_length.is_some() { limits.max_new_tokens_cap } else { default.max_new_tokens };
            let s = sampling(&f, "max_new_tokens", default_max, default.temperature, limits, default.seed)?;
            (Prompt::Text(prompt_text(&f, endpoint)?), s)
        }
        Endpoint::Completions => {
            warn_unknown(&obj, &["prompt"], "/v1/completions");
            openai_defaults(&f, served)?;
            (Prompt::Text(prompt_text(&f, endpoint)?), sampling(&f, "max_tokens", 16, 1.0, limits, seed)?)
        }
        Endpoint::Chat => {
            warn_unknown(&obj, &["messages", "max_completion_tokens"], "/v1/chat/completions");
            openai_defaults(&f, served)?;
            let key = if f.get("max_completion_tokens").is_some() { "max_completion_tokens" } else { "max_tokens" };
            (Prompt::Chat(messages(&f)?), sampling(&f, key, limits.max_new_tokens_cap, 1.0, limits, seed)?)
        }
    };
    let include_usage = match f.get("stream_options") {
        None => false,
        Some(Value::Object(o)) if endpoint != Endpoint::Generate => match o.get("include_usage") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(v) => {
                return Err(ApiError::field(
                    "stream_options",
                    format!("`stream_options.include_usage` must be a boolean (found {})", type_name(v)),
                ))
            }
        },
        Some(v) => {
            return Err(ApiError::field(
                "stream_options",
                format!("`stream_options` must be an object (found {})", type_name(v)),
            ))
        }
    };
    Ok(Parsed { request: Request { prompt, sampling, max_length }, stream, include_usage })
}
