//! The bounded queue between the HTTP handlers and the generation worker.
//!
//! Handlers [`Queue::push`] a [`Job`] and read its [`Event`]s from a channel; the
//! worker thread pops jobs in arrival order. A full queue refuses new jobs at once
//! (the handler answers 503), so a burst never grows memory without bound. A job
//! whose client has gone away (its event receiver dropped) is skipped.

use crate::data::template::Message;
use crate::generate::{Completion, SamplingParams};
use crate::serve::error::ApiError;
use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use tokio::sync::mpsc::UnboundedSender;

/// What to complete: raw text, or chat messages rendered through the model's template.
#[derive(Debug, Clone)]
pub enum Prompt {
    /// Text, encoded as given (with the tokenizer's BOS handling).
    Text(String),
    /// Messages for the chat template, ending with the generation prompt.
    Chat(Vec<Message>),
}

/// One validated request.
#[derive(Debug, Clone)]
pub struct Request {
    /// The prompt.
    pub prompt: Prompt,
    /// Sampling; `max_new_tokens` is the request's (already under the server's cap) and
    /// the worker lowers it to what the model's context leaves after the prompt.
    pub sampling: SamplingParams,
    /// `/generate`'s `max_length`: prompt plus new tokens, as in transformers' `generate`. The
    /// worker sets `max_new_tokens` to `max_length − prompt tokens`, which must be at least 1
    /// and at most `sampling.max_new_tokens` (the server's cap).
    pub max_length: Option<usize>,
}

/// What the worker reports about a job, in this order: `Started`, any number of
/// `Delta`s, then `Done`; or `Failed` at any point.
#[derive(Debug)]
pub enum Event {
    /// The prompt was accepted; generation follows.
    Started {
        /// Prompt length in tokens.
        prompt_tokens: usize,
    },
    /// New text.
    Delta(String),
    /// Generation finished.
    Done(Completion),
    /// The request was refused (4xx) or generation failed (5xx).
    Failed(ApiError),
}

/// A request on its way to the worker.
#[derive(Debug)]
pub struct Job {
    /// Server-unique request number (for logs).
    pub id: u64,
    /// What to generate.
    pub request: Request,
    /// Where the worker reports; dropping the receiver cancels the job.
    pub events: UnboundedSender<Event>,
}

/// Why [`Queue::push`] refused a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushError {
    /// `capacity` jobs are already waiting.
    Full,
    /// The server is shutting down, or the worker has stopped.
    Closed,
}

struct State {
    jobs: VecDeque<Job>,
    closed: bool,
}

/// A bounded FIFO of jobs shared by the handlers (producers) and the worker (consumer).
pub struct Queue {
    state: Mutex<State>,
    wake: Condvar,
    capacity: usize,
}

impl Queue {
    /// A queue that holds at most `capacity` waiting jobs.
    pub fn new(capacity: usize) -> Queue {
        Queue { state: Mutex::new(State { jobs: VecDeque::new(), closed: false }), wake: Condvar::new(), capacity }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Add a job, or refuse it when the queue is full or closed.
    pub fn push(&self, job: Job) -> Result<(), PushError> {
        let mut s = self.lock();
        if s.closed {
            return Err(PushError::Closed);
        }
        if s.jobs.len() >= self.capacity {
            return Err(PushError::Full);
        }
        s.jobs.push_back(job);
        drop(s);
        self.wake.notify_one();
        Ok(())
    }

    /// The oldest job, waiting for one when `block`; `None` when closed (or empty and not `block`).
    pub fn pop(&self, block: bool) -> Option<Job> {
        let mut s = self.lock();
        loop {
            if s.closed {
                return None;
            }
            if let Some(job) = s.jobs.pop_front() {
                return Some(job);
            }
            if !block {
                return None;
            }
            s = self.wake.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Jobs waiting now.
    pub fn len(&self) -> usize {
        self.lock().jobs.len()
    }

    /// Whether no job is waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether the queue takes no more jobs (shutdown, or the worker has stopped).
    pub fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// The most jobs that may wait.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Refuse new jobs, drop the waiting ones (their clients see the channel close) and
    /// wake the worker so that it stops.
    pub fn close(&self) {
        let mut s = self.lock();
        s.closed = true;
        s.jobs.clear();
        drop(s);
        self.wake.notify_all();
    }
}
