//! The HTTP routes (axum): `GET /health`, `GET /v1/models`, `POST /generate`,
//! `POST /v1/completions`, `POST /v1/chat/completions`; every error, 404 and 405
//! included, is a JSON body (see [`ApiError`]).
//!
//! A generation handler parses the body, queues a [`Job`] (503 + `Retry-After` when
//! the queue is full), waits for the worker to accept the prompt (so a bad prompt is
//! still a 4xx, streaming or not), then collects the result or streams it as
//! Server-Sent Events. When the client goes away, the handler or stream is dropped,
//! which drops the job's event receiver and so cancels the generation.

use crate::serve::api::{self, ApiError, Endpoint, Limits};
use crate::serve::format::{self, Meta, SseEvent};
use crate::serve::queue::{Event, Job, PushError, Queue};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderValue, Method, StatusCode, Uri};
use axum::response::sse::{self, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::stream::{self, Stream};
use serde_json::{json, Value};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// What the handlers share.
pub struct AppState {
    /// The worker's queue.
    pub queue: Arc<Queue>,
    /// The model id reported by `/health`, `/v1/models` and responses.
    pub model_id: String,
    /// The model's context in tokens.
    pub context: usize,
    /// Request limits.
    pub limits: Limits,
    /// `--max-body-bytes`, for the 413 message.
    pub max_body_bytes: usize,
    /// Unix seconds at start.
    pub created: u64,
    /// Request counter (ids and default seeds).
    pub requests: AtomicU64,
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl AppState {
    /// State for a server over `queue`.
    pub fn new(queue: Arc<Queue>, model_id: String, context: usize, limits: Limits, max_body_bytes: usize) -> AppState {
        AppState { queue, model_id, context, limits, max_body_bytes, created: unix_now(), requests: AtomicU64::new(0) }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = json_response(status, &self.body());
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

fn json_response(status: StatusCode, v: &Value) -> Response {
    (status, [(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], v.to_string()).into_response()
}

/// The router over `state`; bodies over `max_body_bytes` are refused with 413.
pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.max_body_bytes;
    Router::new()
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/generate", post(generate))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn health(State(s): State<Arc<AppState>>) -> Response {
    if s.queue.is_closed() {
        return json_response(
            StatusCode::SERVICE_UNAVAILABLE,
            &json!({"status": "unavailable", "model": s.model_id, "queued": 0}),
        );
    }
    json_response(StatusCode::OK, &json!({"status": "ok", "model": s.model_id, "queued": s.queue.len()}))
}

async fn models(State(s): State<Arc<AppState>>) -> Response {
    let m = json!({"id": s.model_id, "object": "model", "created": s.created, "owned_by": "tuner", "max_model_len": s.context});
    json_response(StatusCode::OK, &json!({"object": "list", "data": [m]}))
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!(
        "no route for {method} {}; routes: GET /health, GET /v1/models, POST /generate, POST /v1/completions, POST /v1/chat/completions",
        uri.path()
    ))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    let want = if matches!(uri.path(), "/health" | "/v1/models") { "GET" } else { "POST" };
    ApiError::method_not_allowed(format!("{method} is not allowed on {}; use {want}", uri.path()))
}

async fn generate(State(s): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    handle(s, Endpoint::Generate, body).await.unwrap_or_else(IntoResponse::into_response)
}

async fn completions(State(s): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    handle(s, Endpoint::Completions, body).await.unwrap_or_else(IntoResponse::into_response)
}

async fn chat(State(s): State<Arc<AppState>>, body: Result<Bytes, BytesRejection>) -> Response {
    handle(s, Endpoint::Chat, body).await.unwrap_or_else(IntoResponse::into_response)
}

fn stopped() -> ApiError {
    ApiError::internal("the generation worker stopped before answering")
}

async fn handle(
    s: Arc<AppState>,
    endpoint: Endpoint,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large(format!(
                "the request body is over this server's limit of {} bytes (--max-body-bytes)",
                s.max_body_bytes
            ))
        } else {
            ApiError::invalid(format!("cannot read the request body: {}", r.body_text()))
        }
    })?;
    let n = s.requests.fetch_add(1, Ordering::Relaxed);
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0);
    let parsed = api::parse(endpoint, &body, &s.limits, nanos ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15))?;
    let (tx, mut rx) = unbounded_channel();
    s.queue.push(Job { id: n, request: parsed.request, events: tx }).map_err(|e| match e {
        PushError::Full => ApiError::busy(
            format!("the server is busy: {} requests are already waiting; retry shortly", s.queue.capacity()),
            1,
        ),
        PushError::Closed => ApiError::busy("the server is shutting down (or its generation worker has stopped)", 5),
    })?;
    let prompt_tokens = match rx.recv().await {
        Some(Event::Started { prompt_tokens }) => prompt_tokens,
        Some(Event::Failed(e)) => return Err(e),
        _ => return Err(stopped()),
    };
    let prefix = if endpoint == Endpoint::Chat { "chatcmpl" } else { "cmpl" };
    let meta = Meta {
        id: format!("{prefix}-{nanos:x}{n:x}"),
        created: unix_now(),
        model: s.model_id.clone(),
        prompt_tokens,
        include_usage: parsed.include_usage,
    };
    if parsed.stream {
        return Ok(Sse::new(events(endpoint, meta, rx)).keep_alive(KeepAlive::default()).into_response());
    }
    loop {
        match rx.recv().await {
            Some(Event::Done(c)) => return Ok(json_response(StatusCode::OK, &format::complete(endpoint, &meta, &c))),
            Some(Event::Failed(e)) => return Err(e),
            Some(Event::Started { .. } | Event::Delta(_)) => {}
            None => return Err(stopped()),
        }
    }
}

/// The SSE stream of one request: opening events, deltas, then the closing (or failure) events.
fn events(
    endpoint: Endpoint,
    meta: Meta,
    rx: UnboundedReceiver<Event>,
) -> impl Stream<Item = Result<sse::Event, Infallible>> {
    let out: VecDeque<SseEvent> = format::opening(endpoint, &meta).into();
    stream::unfold((rx, out, false), move |(mut rx, mut out, mut ended)| {
        let meta = meta.clone();
        async move {
            loop {
                if let Some(e) = out.pop_front() {
                    let ev = match e.name {
                        Some(name) => sse::Event::default().event(name),
                        None => sse::Event::default(),
                    };
                    return Some((Ok(ev.data(e.data)), (rx, out, ended)));
                }
                if ended {
                    return None;
                }
                match rx.recv().await {
                    Some(Event::Delta(t)) => out.push_back(format::delta(endpoint, &meta, &t)),
                    Some(Event::Started { .. }) => {}
                    Some(Event::Done(c)) => {
                        out.extend(format::closing(endpoint, &meta, &c));
                        ended = true;
                    }
                    Some(Event::Failed(e)) => {
                        out.extend(format::failure(endpoint, &e));
                        ended = true;
                    }
                    None => {
                        out.extend(format::failure(endpoint, &stopped()));
                        ended = true;
                    }
                }
            }
        }
    })
}
