//! `tuner serve`: an HTTP server over one model. `POST /generate` (this crate's own
//! shape), OpenAI-compatible `POST /v1/completions` and `POST /v1/chat/completions`
//! (with SSE streaming), `GET /v1/models[/ID]` and `GET /health`; with `--api-key`, every
//! route but `/health` wants `Authorization: Bearer KEY` (as vLLM's `--api-key`).
//!
//! Shape (as vLLM and TGI do it): an async HTTP front end (axum on a small tokio
//! runtime) and one generation thread that owns the model; the two meet at a bounded
//! [`queue::Queue`]. Files: [`api`] (request parsing and errors), [`queue`],
//! [`worker`] (the generation thread, batching), [`format`] (response bodies),
//! [`routes`] (handlers and streams).
//!
//! Run: `tuner serve --model tests/fixtures/models/llama --port 8080`, then
//! `curl -d '{"prompt": "Hello", "max_new_tokens": 8}' localhost:8080/generate`.

pub mod api;
pub mod error;
pub mod format;
pub mod queue;
pub mod routes;
pub mod worker;

use crate::error::Failure;
use anyhow::{Context, Result};
use std::future::IntoFuture;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long open connections may take to finish after Ctrl-C.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// The `tuner serve` flags.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    #[command(flatten)]
    pub model: crate::model::open::ModelArgs,
    /// Address to bind (0.0.0.0 exposes the server to the network).
    #[arg(long, default_value = "127.0.0.1")]
    pub host: String,
    /// Port; 0 lets the OS pick one (the `listening on` line says which).
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// Largest request body; bigger ones get 413.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_body_bytes: usize,
    /// Largest `max_new_tokens` / `max_tokens` a request may ask for; more gets 400.
    #[arg(long, default_value_t = 2048)]
    pub max_new_tokens_cap: usize,
    /// Requests that may wait for the model (besides the batch being formed); more get 503 with Retry-After.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Most greedy requests with equal parameters generated together in one batch.
    #[arg(long, default_value_t = 8)]
    pub max_batch: usize,
    /// The model id that /v1/models, /health and responses report and that requests' `model`
    /// must name (default: the --model path as given).
    #[arg(long, value_name = "NAME")]
    pub served_model_name: Option<String>,
    /// Require `Authorization: Bearer KEY` on every route but /health (401 otherwise).
    #[arg(long, value_name = "KEY", env = "TUNER_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
}

/// Load the model, listen, and serve until `interrupted` is set (Ctrl-C); then stop
/// taking connections, give open ones [`SHUTDOWN_GRACE`] to finish, and return.
/// `cache` is the cache root for GGUF imports.
pub fn run(args: &ServeArgs, cache: &Path, interrupted: Arc<AtomicBool>) -> Result<()> {
    for (name, v) in [
        ("--queue", args.queue),
        ("--max-batch", args.max_batch),
        ("--max-new-tokens-cap", args.max_new_tokens_cap),
        ("--max-body-bytes", args.max_body_bytes),
    ] {
        if v == 0 {
            return Err(Failure::Usage(format!("{name} must be at least 1")).into());
        }
    }
    if args.api_key.as_deref() == Some("") {
        return Err(Failure::Usage("--api-key (or TUNER_API_KEY) must not be empty".into()).into());
    }
    let model_id = match &args.served_model_name {
        Some(n) if n.trim().is_empty() => {
            return Err(Failure::Usage("--served-model-name must not be empty".into()).into())
        }
        Some(n) => n.clone(),
        None => args.model.model.display().to_string(),
    };
    let queue = Arc::new(queue::Queue::new(args.queue));
    let spec = worker::LoadSpec { model: args.model.clone(), cache: cache.to_path_buf() };
    let (info, _worker) = worker::spawn(spec, queue.clone(), args.max_batch, interrupted.clone())?;
    let limits = api::Limits { max_new_tokens_cap: args.max_new_tokens_cap };
    let state = Arc::new(routes::AppState::new(
        queue.clone(),
        model_id,
        info.context,
        limits,
        args.max_body_bytes,
        args.api_key.clone(),
    ));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("serve")
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = rt.block_on(serve(args, state, interrupted));
    // Refuse new work and drop the waiting jobs; the worker ends once its batch stops
    // (generation in progress is cancelled through `interrupted`).
    queue.close();
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

async fn serve(args: &ServeArgs, state: Arc<routes::AppState>, interrupted: Arc<AtomicBool>) -> Result<()> {
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("cannot listen on {}:{}", args.host, args.port))?;
    let addr = listener.local_addr().context("cannot read the bound address")?;
    log::info!(
        "serving {} as `{}` (context {} tokens, queue {}, batches of up to {}, API key {})",
        args.model.model.display(),
        state.model_id,
        state.context,
        args.queue,
        args.max_batch,
        if state.api_key.is_some() { "required" } else { "not required" }
    );
    eprintln!("listening on http://{addr}");
    let flag = interrupted.clone();
    let signal = async move {
        while !flag.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    let server = axum::serve(listener, routes::router(state)).with_graceful_shutdown(signal).into_future();
    let deadline = async {
        while !interrupted.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        r = server => r.context("the HTTP server failed")?,
        _ = deadline => log::warn!("connections still open {} s after Ctrl-C; closing them", SHUTDOWN_GRACE.as_secs()),
    }
    eprintln!("server stopped");
    Ok(())
}
