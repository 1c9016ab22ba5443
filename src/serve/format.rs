//! Response bodies: `/generate`'s own shape and OpenAI's `text_completion`,
//! `chat.completion` and their streamed chunks (reference: the OpenAI API reference
//! for completions and chat completions; vLLM's server for the same conventions).
//!
//! Streams: `/generate` sends `data: {"text": delta}` per delta, then one
//! `event: done` with `{"generated_text", "finish_reason", "tokens"}`; the OpenAI
//! endpoints send chunks (chat: a first chunk with the role), a last chunk with the
//! finish reason, a usage chunk when `stream_options.include_usage`, then
//! `data: [DONE]`. A failure mid-stream is an `event: error` (`/generate`) or a
//! `data: {"error": …}` chunk (OpenAI) before the end.

use crate::generate::{Completion, FinishReason};
use crate::serve::api::{ApiError, Endpoint};
use serde_json::{json, Value};

/// What every response of one request shares.
#[derive(Debug, Clone)]
pub struct Meta {
    /// `cmpl-…` / `chatcmpl-…`.
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    /// The served model's id.
    pub model: String,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Add a usage chunk to OpenAI streams.
    pub include_usage: bool,
}

/// One Server-Sent Event: an optional `event:` name and its `data:`.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    /// The event name (`None`: the default "message").
    pub name: Option<&'static str>,
    /// The data line.
    pub data: String,
}

impl SseEvent {
    fn data(v: Value) -> SseEvent {
        SseEvent { name: None, data: v.to_string() }
    }
}

/// `eos` / `stop` / `length`, as `/generate` reports it.
pub fn reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Eos => "eos",
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

/// OpenAI's `finish_reason`: an EOS token or a stop string is `stop`.
fn openai_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Eos | FinishReason::Stop => "stop",
        FinishReason::Length => "length",
    }
}

fn usage(m: &Meta, c: &Completion) -> Value {
    json!({"prompt_tokens": m.prompt_tokens, "completion_tokens": c.tokens.len(), "total_tokens": m.prompt_tokens + c.tokens.len()})
}

fn chunk(e: Endpoint, m: &Meta, choice: Value) -> Value {
    let object = if e == Endpoint::Chat { "chat.completion.chunk" } else { "text_completion" };
    json!({"id": m.id, "object": object, "created": m.created, "model": m.model, "choices": [choice]})
}

/// The whole (non-streamed) response body.
pub fn complete(e: Endpoint, m: &Meta, c: &Completion) -> Value {
    match e {
        Endpoint::Generate => {
            json!({"generated_text": c.text, "finish_reason": reason(c.finish_reason), "tokens": c.tokens.len()})
        }
        Endpoint::Completions => json!({
            "id": m.id, "object": "text_completion", "created": m.created, "model": m.model,
            "choices": [{"index": 0, "text": c.text, "logprobs": null, "finish_reason": openai_reason(c.finish_reason)}],
            "usage": usage(m, c),
        }),
        Endpoint::Chat => json!({
            "id": m.id, "object": "chat.completion", "created": m.created, "model": m.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": c.text}, "logprobs": null, "finish_reason": openai_reason(c.finish_reason)}],
            "usage": usage(m, c),
        }),
    }
}

/// Events sent before any text (chat: the role).
pub fn opening(e: Endpoint, m: &Meta) -> Vec<SseEvent> {
    match e {
        Endpoint::Chat => vec![SseEvent::data(chunk(
            e,
            m,
            json!({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null}),
        ))],
        _ => vec![],
    }
}

/// The event carrying a text delta.
pub fn delta(e: Endpoint, m: &Meta, text: &str) -> SseEvent {
    SseEvent::data(match e {
        Endpoint::Generate => json!({"text": text}),
        Endpoint::Completions => {
            chunk(e, m, json!({"index": 0, "text": text, "logprobs": null, "finish_reason": null}))
        }
        Endpoint::Chat => {
            chunk(e, m, json!({"index": 0, "delta": {"content": text}, "logprobs": null, "finish_reason": null}))
        }
    })
}

/// The events that end a stream that finished.
pub fn closing(e: Endpoint, m: &Meta, c: &Completion) -> Vec<SseEvent> {
    let last = match e {
        Endpoint::Generate => return vec![SseEvent { name: Some("done"), data: complete(e, m, c).to_string() }],
        Endpoint::Completions => {
            json!({"index": 0, "text": "", "logprobs": null, "finish_reason": openai_reason(c.finish_reason)})
        }
        Endpoint::Chat => {
            json!({"index": 0, "delta": {}, "logprobs": null, "finish_reason": openai_reason(c.finish_reason)})
        }
    };
    let mut out = vec![SseEvent::data(chunk(e, m, last))];
    if m.include_usage {
        let object = if e == Endpoint::Chat { "chat.completion.chunk" } else { "text_completion" };
        out.push(SseEvent::data(json!({"id": m.id, "object": object, "created": m.created, "model": m.model, "choices": [], "usage": usage(m, c)})));
    }
    out.push(SseEvent { name: None, data: "[DONE]".into() });
    out
}

/// The events that end a stream that failed.
pub fn failure(e: Endpoint, err: &ApiError) -> Vec<SseEvent> {
    match e {
        Endpoint::Generate => vec![SseEvent { name: Some("error"), data: err.body().to_string() }],
        _ => vec![SseEvent::data(err.body()), SseEvent { name: None, data: "[DONE]".into() }],
    }
}
