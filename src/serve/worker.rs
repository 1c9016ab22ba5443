//! The generation worker: one thread that loads and owns the [`Generator`] (tch models
//! stay on the thread that made them) and serves the [`Queue`] in arrival order.
//!
//! Each job is first *admitted*: its prompt is rendered (chat template) and tokenized,
//! checked against the model's context, and its `max_new_tokens` lowered to what the
//! context leaves. Admitted greedy jobs with identical sampling parameters run together
//! as one batch (up to `max_batch`); sampled jobs run alone, because each prompt's
//! random stream depends on its row in the batch. A panic or an error inside generation
//! fails that batch's requests (500) and the worker goes on with the next job. A job
//! whose client has gone away is skipped, and its generation stops at the next delta.

use crate::generate::{Generator, SamplingParams};
use crate::serve::api::ApiError;
use crate::serve::queue::{Event, Job, Prompt, Queue};
use anyhow::{Context, Result};
use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

/// What the worker loads.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// The model, adapter, dtype and device.
    pub model: crate::model::open::ModelArgs,
    /// Cache root for GGUF imports.
    pub cache: PathBuf,
}

/// What the HTTP side needs to know about the loaded model.
#[derive(Debug, Clone, Copy)]
pub struct ModelInfo {
    /// The model's context in tokens (`max_position_embeddings`).
    pub context: usize,
}

/// A job ready to run: its tokens and final sampling parameters.
struct Admitted {
    job: Job,
    ids: Vec<u32>,
    sampling: SamplingParams,
    queued: Instant,
}

struct Worker {
    gen: Generator,
    context: usize,
    queue: Arc<Queue>,
    max_batch: usize,
    stop: Arc<AtomicBool>,
}

/// Start the worker thread, load the model on it and wait until it is ready.
/// `stop` set cancels the generation in progress; [`Queue::close`] ends the thread.
pub fn spawn(
    spec: LoadSpec,
    queue: Arc<Queue>,
    max_batch: usize,
    stop: Arc<AtomicBool>,
) -> Result<(ModelInfo, JoinHandle<()>)> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<ModelInfo>>();
    let handle = std::thread::Builder::new()
        .name("generate".into())
        .spawn(move || {
            let loaded = catch_unwind(AssertUnwindSafe(|| Generator::load(&spec.model, &spec.cache)));
            let gen = match loaded {
                Ok(Ok(g)) => g,
                Ok(Err(e)) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
                Err(panic) => {
                    let _ = ready_tx.send(Err(anyhow::anyhow!("loading the model panicked: {}", panic_text(&*panic))));
                    return;
                }
            };
            let context = usize::try_from(gen.model.config().max_position_embeddings).unwrap_or(0);
            if ready_tx.send(Ok(ModelInfo { context })).is_err() {
                return;
            }
            Worker { gen, context, queue, max_batch: max_batch.max(1), stop }.run();
        })
        .context("cannot start the generation thread")?;
    let info = ready_rx.recv().context("the generation thread stopped while loading the model")??;
    Ok((info, handle))
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

/// Closes the queue when the worker ends, by return or by panic, so that no request
/// waits for a thread that is gone.
struct CloseOnExit(Arc<Queue>);

impl Drop for CloseOnExit {
    fn drop(&mut self) {
        self.0.close();
    }
}

impl Worker {
    fn run(self) {
        let _close = CloseOnExit(self.queue.clone());
        let mut ready: VecDeque<Admitted> = VecDeque::new();
        loop {
            if ready.is_empty() {
                match self.queue.pop(true) {
                    Some(job) => self.admit(job, &mut ready),
                    None => return,
                }
            }
            while ready.len() < self.max_batch {
                match self.queue.pop(false) {
                    Some(job) => self.admit(job, &mut ready),
                    None => break,
                }
            }
            let Some(first) = ready.pop_front() else { continue };
            let mut batch = vec![first];
            if batch[0].sampling.is_greedy() {
                let mut i = 0;
                while i < ready.len() && batch.len() < self.max_batch {
                    if ready[i].sampling == batch[0].sampling {
                        batch.extend(ready.remove(i));
                    } else {
                        i += 1;
                    }
                }
            }
            batch.retain(|a| !a.job.events.is_closed());
            if !batch.is_empty() {
                self.run_batch(batch);
            }
        }
    }

    /// Render and tokenize the prompt, fit the length to the context, announce `Started`.
    fn admit(&self, job: Job, ready: &mut VecDeque<Admitted>) {
        if job.events.is_closed() {
            return;
        }
        let checked = catch_unwind(AssertUnwindSafe(|| self.check(&job)))
            .unwrap_or_else(|p| Err(ApiError::internal(format!("preparing the prompt panicked: {}", panic_text(&*p)))));
        match checked {
            Ok((ids, sampling)) => {
                if job.events.send(Event::Started { prompt_tokens: ids.len() }).is_ok() {
                    ready.push_back(Admitted { job, ids, sampling, queued: Instant::now() });
                }
            }
            Err(e) => {
                let _ = job.events.send(Event::Failed(e));
            }
        }
    }

    fn check(&self, job: &Job) -> Result<(Vec<u32>, SamplingParams), ApiError> {
        let r = &job.request;
        let (text, field) = match &r.prompt {
            Prompt::Text(t) => (t.clone(), "prompt"),
            Prompt::Chat(m) => (
                self.gen
                    .chat_prompt(m)
                    .map_err(|e| ApiError::field("messages", format!("cannot apply the chat template: {e:#}")))?,
                "messages",
            ),
        };
        let ids = self
            .gen
            .encode_prompt(&text)
            .map_err(|e| ApiError::field(field, format!("cannot tokenize the prompt: {e:#}")))?;
        if ids.is_empty() {
            return Err(ApiError::field(field, "the prompt is empty (no tokens): there is nothing to continue"));
        }
        if ids.len() >= self.context {
            return Err(ApiError::field(
                field,
                format!(
                    "the prompt is {} tokens; the model's context is {} tokens, which leaves no room to generate",
                    ids.len(),
                    self.context
                ),
            ));
        }
        let mut sampling = r.sampling.clone();
        if let Some(total) = r.max_length {
            sampling.max_new_tokens = new_tokens_of_max_length(total, ids.len(), sampling.max_new_tokens)?;
        }
        sampling.max_new_tokens = sampling.max_new_tokens.min(self.context - ids.len());
        sampling.validate().map_err(|e| ApiError::invalid(format!("{e:#}")))?;
        Ok((ids, sampling))
    }

    fn run_batch(&self, batch: Vec<Admitted>) {
        let started = Instant::now();
        let ids: Vec<Vec<u32>> = batch.iter().map(|a| a.ids.clone()).collect();
        let sampling = batch[0].sampling.clone();
        let stop = &self.stop;
        let mut on_delta = |i: usize, text: &str| -> bool {
            if stop.load(Ordering::SeqCst) {
                return false;
            }
            batch.get(i).is_some_and(|a| a.job.events.send(Event::Delta(text.to_string())).is_ok())
        };
        let result = catch_unwind(AssertUnwindSafe(|| self.gen.generate_ids(&ids, &sampling, &mut on_delta)));
        let ms = started.elapsed().as_millis();
        match result {
            Ok(Ok(completions)) => {
                for (a, c) in batch.iter().zip(completions) {
                    log::info!(
                        "request {}: {} prompt + {} new tokens, {:?}, waited {} ms, generated in {ms} ms (batch of {})",
                        a.job.id,
                        a.ids.len(),
                        c.tokens.len(),
                        c.finish_reason,
                        started.duration_since(a.queued).as_millis(),
                        batch.len()
                    );
                    let _ = a.job.events.send(Event::Done(c));
                }
            }
            Ok(Err(e)) => self.fail(&batch, format!("generation failed: {e:#}")),
            Err(p) => self.fail(&batch, format!("generation panicked: {}", panic_text(&*p))),
        }
    }

    fn fail(&self, batch: &[Admitted], message: String) {
        log::error!("{message}");
        for a in batch {
            let _ = a.job.events.send(Event::Failed(ApiError::internal(message.clone())));
        }
    }
}

/// The new tokens that `max_length` (prompt + new, as transformers counts it) leaves after a
/// prompt of `prompt` tokens; refused when that is none or more than `cap`.
fn new_tokens_of_max_length(total: usize, prompt: usize, cap: usize) -> Result<usize, ApiError> {
    if total <= prompt {
        return Err(ApiError::field(
            "max_length",
            format!("`max_length` is {total}, but the prompt alone is {prompt} tokens; `max_length` counts the prompt and the new tokens (as in transformers' generate): raise it, or give `max_new_tokens` instead"),
        ));
    }
    let new = total - prompt;
    if new > cap {
        return Err(ApiError::field(
            "max_length",
            format!("`max_length` {total} leaves {new} new tokens after the {prompt}-token prompt, over this server's cap of {cap} (--max-new-tokens-cap); the request is refused, not clamped"),
        ));
    }
    Ok(new)
}
