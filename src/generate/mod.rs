//! Text generation with a KV cache: batched prompts (left padding), greedy or sampled
//! decoding, stop on EOS / end-of-turn tokens, stop strings or a length limit, and streamed
//! text deltas. Used by `tuner generate`, `tuner serve` and the evaluate stage.
//!
//! Reference: transformers `GenerationMixin.generate` / `_sample` (left-padded batches with
//! `position_ids = cumsum(attention_mask) − 1`, one forward over the prompt then one token per
//! step over the cache, processors before argmax or the draw; a finished sequence stops), with
//! vLLM's output conventions (stop strings cut the text, EOS is counted in `tokens` but not
//! shown, special tokens are skipped in the text). Greedy output equals HF `generate`
//! token for token (tests/generate.rs).
//!
//! Files: [`sampling`] (parameters, processors, the seeded draw), `stream` (what text can be
//! shown, stop strings), [`terminal`] (the `tuner generate` command).

pub mod sampling;
mod stream;
pub mod terminal;

use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::data::template::{Message, Renderer};
use crate::data::tokenizer::Tok;
use crate::error::Failure;
use crate::model::{Batch, CausalLm, KvCache};
use sampling::Rng;
pub use sampling::SamplingParams;
use stream::TextStream;

/// End-of-turn tokens of common chat formats; each one the vocabulary has also ends generation.
const END_OF_TURN: [&str; 3] = ["<|im_end|>", "<end_of_turn>", "<|eot_id|>"];

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// An EOS or end-of-turn token.
    Eos,
    /// A stop string, or the caller cancelled it.
    Stop,
    /// `max_new_tokens` were generated.
    Length,
}

/// One prompt's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Completion {
    /// The generated text: special tokens skipped, the EOS token not shown, cut before a stop string.
    pub text: String,
    /// Every generated token id, the final EOS included (also those past a stop string's start).
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub finish_reason: FinishReason,
}

/// A model with its tokenizer, ready to generate.
pub struct Generator {
    /// The model (adapters attached, if any).
    pub model: Box<dyn CausalLm>,
    /// Its tokenizer, chat template and special tokens.
    pub tok: Tok,
    /// Where inputs are placed (the model's device).
    pub device: Device,
    /// Tokens that end a sequence: the tokenizer's EOS, config.json and generation_config.json
    /// `eos_token_id`, and end-of-turn tokens ([`END_OF_TURN`]) present in the vocabulary.
    pub eos_ids: Vec<u32>,
}

/// One sequence's state during generation.
struct Seq {
    tokens: Vec<u32>,
    stream: TextStream,
    rng: Rng,
    finish: Option<FinishReason>,
}

impl Generator {
    /// Load a model for generation: an HF folder, a bnb-4bit folder, a `.gguf` file (imported
    /// once into `cache`), or a run's export; `adapter` is a PEFT adapter folder to attach.
    pub fn load(args: &crate::model::open::ModelArgs, cache: &Path) -> Result<Generator> {
        let opened = args.open(cache)?;
        let dir = opened.dir;
        let tok = Tok::load(&dir)?;
        let mut g = Generator::from_parts(opened.model, tok, opened.device);
        let gen_cfg = dir.join("generation_config.json");
        if gen_cfg.is_file() {
            let v: serde_json::Value = crate::util::read_json(&gen_cfg)?;
            let ids = match v.get("eos_token_id") {
                Some(serde_json::Value::Array(a)) => a.iter().filter_map(serde_json::Value::as_u64).collect(),
                Some(x) => x.as_u64().into_iter().collect(),
                None => vec![],
            };
            for id in ids {
                push_unique(&mut g.eos_ids, id as u32);
            }
        }
        Ok(g)
    }

    /// A generator over an already loaded model and tokenizer.
    pub fn from_parts(model: Box<dyn CausalLm>, tok: Tok, device: Device) -> Generator {
        let mut eos_ids = vec![tok.eos_id];
        for &id in &model.config().eos_token_ids {
            if let Ok(id) = u32::try_from(id) {
                push_unique(&mut eos_ids, id);
            }
        }
        for t in END_OF_TURN {
            if let Some(id) = tok.tokenizer.token_to_id(t) {
                push_unique(&mut eos_ids, id);
            }
        }
        Generator { model, tok, device, eos_ids }
    }

    /// Token ids of a prompt: `encode(text, add_special_tokens=true)`, except that a prompt
    /// that already starts with the BOS token's text (a rendered chat template) gets no second BOS.
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        self.tok.encode_start(text).map_err(|e| anyhow!(e))
    }

    /// Render messages with the model's chat template, `add_generation_prompt = true`.
    pub fn chat_prompt(&self, messages: &[Message]) -> Result<String> {
        let tpl = self.chat_template()?;
        Renderer::apply_chat_template(tpl, messages, true, &self.tok.bos_token, &self.tok.eos_token)
            .map_err(|e| anyhow!(e))
    }

    /// The model's chat template, or a usage error naming where it would come from.
    pub fn chat_template(&self) -> Result<&str> {
        self.tok.chat_template.as_deref().ok_or_else(|| {
            Failure::Usage(
                "the model has no chat template (no `chat_template` in tokenizer_config.json and no chat_template.jinja); give a raw prompt instead".into(),
            )
            .into()
        })
    }

    /// Generate for a batch of prompts, each tokenized with [`Generator::encode_prompt`]
    /// (add_special_tokens = true; use [`Generator::chat_prompt`] first for a conversation).
    ///
    /// `on_delta(i, text)` receives prompt i's text as it grows (only complete UTF-8, never past
    /// a stop string's start); returning false cancels that prompt (finish reason `Stop`).
    /// A prompt stops at an EOS or end-of-turn token, a stop string (the text is cut before it)
    /// or `max_new_tokens`.
    pub fn generate(
        &self,
        prompts: &[String],
        p: &SamplingParams,
        on_delta: &mut dyn FnMut(usize, &str) -> bool,
    ) -> Result<Vec<Completion>> {
        p.validate()?;
        let ids = prompts
            .iter()
            .enumerate()
            .map(|(i, s)| self.encode_prompt(s).with_context(|| format!("cannot tokenize prompt {i}")))
            .collect::<Result<Vec<_>>>()?;
        self.generate_ids(&ids, p, on_delta)
    }

    /// [`Generator::generate`] on prompts given as token ids.
    pub fn generate_ids(
        &self,
        prompts: &[Vec<u32>],
        p: &SamplingParams,
        on_delta: &mut dyn FnMut(usize, &str) -> bool,
    ) -> Result<Vec<Completion>> {
        p.validate()?;
        let vocab = self.model.config().vocab_size;
        for (i, ids) in prompts.iter().enumerate() {
            if ids.is_empty() {
                return Err(Failure::Usage(format!("prompt {i} has no tokens: there is nothing to continue")).into());
            }
            if let Some(bad) = ids.iter().find(|&&t| i64::from(t) >= vocab) {
                bail!("prompt {i}: token id {bad} is outside the model's vocabulary of {vocab}");
            }
        }
        let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let limit = self.model.config().max_position_embeddings as usize;
        if longest + p.max_new_tokens > limit {
            log::warn!(
                "prompt ({longest} tokens) + max_new_tokens ({}) exceeds the model's context of {limit} positions",
                p.max_new_tokens
            );
        }
        let mut seqs: Vec<Seq> = (0..prompts.len())
            .map(|i| Seq { tokens: vec![], stream: TextStream::new(&p.stop), rng: Rng::new(p.seed, i), finish: None })
            .collect();
        if p.max_new_tokens > 0 && !prompts.is_empty() {
            self.decode_loop(prompts, p, &mut seqs, on_delta)?;
        }
        seqs.into_iter()
            .map(|s| {
                let text = s.stream.final_text(&self.text_of(&s.tokens)?);
                Ok(Completion { text, tokens: s.tokens, finish_reason: s.finish.unwrap_or(FinishReason::Length) })
            })
            .collect()
    }

    /// Prefill the left-padded batch, then one token per step for the unfinished sequences.
    fn decode_loop(
        &self,
        prompts: &[Vec<u32>],
        p: &SamplingParams,
        seqs: &mut [Seq],
        on_delta: &mut dyn FnMut(usize, &str) -> bool,
    ) -> Result<()> {
        let _no_grad = tch::no_grad_guard();
        let dev = self.device;
        let n = prompts.len() as i64;
        let width = prompts.iter().map(Vec::len).max().unwrap_or(0);
        let mut ids = vec![0i64; prompts.len() * width];
        let mut real = vec![0i64; prompts.len() * width];
        for (r, row) in prompts.iter().enumerate() {
            let pad = width - row.len();
            for (j, &t) in row.iter().enumerate() {
                ids[r * width + pad + j] = i64::from(t);
                real[r * width + pad + j] = 1;
            }
            // Padding repeats the row's first token, so marking `ids` as seen marks the prompt only.
            for j in 0..pad {
                ids[r * width + j] = i64::from(row[0]);
            }
        }
        let width = width as i64;
        let input = Tensor::from_slice(&ids).view([n, width]).to_device(dev);
        let real = Tensor::from_slice(&real).view([n, width]).to_device(dev);
        let positions = (real.cumsum(1, Kind::Int64) - 1).clamp_min(0); // (B, T)
                                                                        // The key mask is only needed when some prompt is padded.
        let padded = prompts.iter().any(|r| r.len() as i64 != width);
        let mut mask = padded.then_some(real);
        let mut last_pos = positions.narrow(1, width - 1, 1); // (B, 1)
        let vocab = self.model.config().vocab_size;
        let mut seen = (p.repetition_penalty != 1.0)
            .then(|| Tensor::zeros([n, vocab], (Kind::Bool, dev)).scatter_value(1, &input, 1));
        let mut cache = KvCache::new(self.model.num_layers());
        let mut active: Vec<usize> = (0..prompts.len()).collect();
        let prefill = Batch::at(input, mask.as_ref().map(Tensor::shallow_clone), positions);
        let mut logits = self.next_logits(&prefill, &mut cache);
        loop {
            let processed = sampling::process(&logits, seen.as_ref(), p);
            let units: Vec<f64> =
                if p.is_greedy() { vec![] } else { active.iter().map(|&i| seqs[i].rng.unit()).collect() };
            let next = sampling::choose(&processed, p, &units)?;
            let mut keep: Vec<i64> = vec![];
            for (r, &i) in active.iter().enumerate() {
                self.step(i, next[r] as u32, p, &mut seqs[i], on_delta)?;
                if seqs[i].finish.is_none() {
                    keep.push(r as i64);
                }
            }
            if keep.is_empty() {
                return Ok(());
            }
            let mut next_t = Tensor::from_slice(&next).view([-1, 1]).to_device(dev); // (B, 1)
            if let Some(s) = seen.as_mut() {
                *s = s.scatter_value(1, &next_t, 1);
            }
            if keep.len() < active.len() {
                let idx = Tensor::from_slice(&keep).to_device(dev);
                cache.select_rows(&idx);
                mask = mask.map(|m| m.index_select(0, &idx));
                last_pos = last_pos.index_select(0, &idx);
                next_t = next_t.index_select(0, &idx);
                seen = seen.map(|s| s.index_select(0, &idx));
                active = keep.iter().map(|&r| active[r as usize]).collect();
            }
            mask = mask.map(|m| Tensor::cat(&[&m, &m.ones_like().narrow(1, 0, 1)], 1));
            last_pos = &last_pos + 1; // not `+=`: last_pos is a view of the prefill positions, which a cache may hold
            let batch = Batch::at(next_t, mask.as_ref().map(Tensor::shallow_clone), last_pos.shallow_clone());
            logits = self.next_logits(&batch, &mut cache);
        }
    }

    /// Append token `t` to sequence `i` and decide whether it has finished; stream its text.
    fn step(
        &self,
        i: usize,
        t: u32,
        p: &SamplingParams,
        s: &mut Seq,
        on_delta: &mut dyn FnMut(usize, &str) -> bool,
    ) -> Result<()> {
        s.tokens.push(t);
        if self.eos_ids.contains(&t) {
            s.finish = Some(FinishReason::Eos);
        } else {
            let u = s.stream.update(&self.text_of(&s.tokens)?);
            if (!u.delta.is_empty() && !on_delta(i, &u.delta)) || u.stopped {
                s.finish = Some(FinishReason::Stop); // cancelled by the caller, or a stop string
                return Ok(());
            }
            if s.tokens.len() >= p.max_new_tokens {
                s.finish = Some(FinishReason::Length);
            }
        }
        if s.finish.is_some() {
            let rest = s.stream.finish(&self.text_of(&s.tokens)?);
            if !rest.is_empty() {
                on_delta(i, &rest);
            }
        }
        Ok(())
    }

    /// The text of generated tokens: a final EOS dropped, special tokens skipped.
    fn text_of(&self, tokens: &[u32]) -> Result<String> {
        let shown = match tokens.last() {
            Some(t) if self.eos_ids.contains(t) => &tokens[..tokens.len() - 1],
            _ => tokens,
        };
        self.tok.tokenizer.decode(shown, true).map_err(|e| anyhow!("cannot decode generated tokens: {e}"))
    }

    /// Run the new tokens of `batch` through the model with the cache; f32 logits `[B, V]` of
    /// each row's last position.
    fn next_logits(&self, batch: &Batch, cache: &mut KvCache) -> Tensor {
        let m = self.model.as_ref();
        let mut h = m.embed(batch);
        for i in 0..m.num_layers() {
            h = m.layer_cached(i, &h, batch, cache);
        }
        let t = h.size()[1];
        m.logits(&m.norm(&h.narrow(1, t - 1, 1))).squeeze_dim(1).to_kind(Kind::Float)
    }
}

fn push_unique(v: &mut Vec<u32>, id: u32) {
    if !v.contains(&id) {
        v.push(id);
    }
}
