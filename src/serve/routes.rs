//! The HTTP routes (axum): `GET /health`, `GET /v1/models`, `GET /v1/models/{id}`,
//! `POST /generate`, `POST /v1/completions`, `POST /v1/chat/completions`; every error, 404 and
//! 405 included, is a JSON body (see [`ApiError`]). With an API key, a middleware answers 401
//! on every route but `/health` unless the request carries `Authorization: Bearer KEY`
//! (compared in time independent of where the keys differ; the key is never logged or echoed).
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
use axum::extract::{DefaultBodyLimit, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::middleware::{self, Next};
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
    /// `--api-key`: the bearer token every route but `/health` requires.
    pub api_key: Option<String>,
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl AppState {
    /// State for a server over `queue`.
    pub fn new(
        queue: Arc<Queue>,
        model_id: String,
        context: usize,
        limits: Limits,
        max_body_bytes: usize,
        api_key: Option<String>,
    ) -> AppState {
        let requests = AtomicU64::new(0);
        AppState { queue, model_id, context, limits, max_body_bytes, created: unix_now(), requests, api_key }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = json_response(status, &self.body());
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == 401 {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
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
        .route("/v1/models/{*id}", get(model))
        .route("/generate", post(generate))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state)
}

/// Whole-string equality that reads every byte of equally long strings.
fn same_key(given: &[u8], want: &[u8]) -> bool {
    given.len() == want.len() && given.iter().zip(want).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
}

/// The bearer token of `Authorization`, if the header has that form.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then_some(token.trim())
}

/// 401 unless the server has no key, the route is `/health`, or the bearer token is the key.
async fn auth(State(s): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let Some(want) = s.api_key.as_deref() else { return next.run(req).await };
    if req.uri().path() == "/health" {
        return next.run(req).await;
    }
    match bearer(req.headers()) {
        Some(given) if same_key(given.as_bytes(), want.as_bytes()) => next.run(req).await,
        Some(_) => ApiError::unauthorized(
            "Incorrect API key provided: the bearer token is not this server's --api-key",
            Some("invalid_api_key"),
        )
        .into_response(),
        None => ApiError::unauthorized(
            "You didn't provide an API key: this server was started with --api-key; send `Authorization: Bearer KEY`",
            None,
        )
        .into_response(),
    }
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

fn model_card(s: &AppState) -> Value {
    json!({"id": s.model_id, "object": "model", "created": s.created, "owned_by": "tuner", "max_model_len": s.context})
}

async fn models(State(s): State<Arc<AppState>>) -> Response {
    json_response(StatusCode::OK, &json!({"object": "list", "data": [model_card(&s)]}))
}

async fn model(State(s): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    if id == s.model_id {
        return json_response(StatusCode::OK, &model_card(&s));
    }
    ApiError::model_not_found(&id, &s.model_id).into_response()
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(format!(
        "no route for {method} {}; routes: GET /health, GET /v1/models, GET /v1/models/ID, POST /generate, POST /v1/completions, POST /v1/chat/completions",
        uri.path()
    ))
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    let want = if uri.path() == "/health" || uri.path().starts_with("/v1/models") { "GET" } else { "POST" };
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
    let parsed = api::parse(endpoint, &body, &s.limits, &s.model_id, nanos ^ n.wrapping_mul(0x9E37_79B9_7F4A_7C15))?;
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
