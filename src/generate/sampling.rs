//! Next-token choice: the sampling parameters, the logits processors in HF order (repetition
//! penalty, temperature, top-k, top-p), greedy argmax, and a seeded per-sequence draw.
//!
//! Reference: transformers `generation/logits_process.py` (`RepetitionPenaltyLogitsProcessor`:
//! a seen token's logit is divided by the penalty when positive, multiplied when negative;
//! `TemperatureLogitsWarper`; `TopKLogitsWarper`: drop logits below the k-th largest;
//! `TopPLogitsWarper`: sort ascending, drop tokens whose cumulative probability is
//! ≤ 1 − top_p, always keep the most likely one) and `GenerationMixin._sample` (processors
//! run for greedy decoding too, then argmax; sampling draws from softmax). The draw uses our own
//! SplitMix64 stream per sequence instead of torch's global generator, so the same seed gives
//! the same tokens on the same device, independently of the other prompts in the batch.

use anyhow::Result;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor};

use crate::error::Failure;

/// How tokens are chosen and when generation stops.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// Upper bound on generated tokens per prompt (EOS included).
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 = greedy (argmax).
    pub temperature: f64,
    /// Keep the k most likely tokens; 0 = off.
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability sums to ≥ top_p; 1 = off.
    pub top_p: f64,
    /// HF repetition penalty over every token already in the sequence (prompt included); 1 = off.
    pub repetition_penalty: f64,
    /// Seed of the draw (prompt i uses its own stream derived from seed and i).
    pub seed: u64,
    /// Stop when the text contains one of these; the output is cut before it.
    pub stop: Vec<String>,
}

impl Default for SamplingParams {
    /// Greedy, 256 new tokens, no penalty, no stop strings.
    fn default() -> SamplingParams {
        SamplingParams {
            max_new_tokens: 256,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 0,
            stop: vec![],
        }
    }
}

impl SamplingParams {
    /// Check every field; all problems are reported together as a usage error.
    pub fn validate(&self) -> Result<()> {
        let mut problems = vec![];
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            problems.push(format!("temperature must be ≥ 0 (found `{}`)", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            problems.push(format!("top_p must be in (0, 1] (found `{}`)", self.top_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            problems.push(format!("repetition_penalty must be > 0 (found `{}`)", self.repetition_penalty));
        }
        if self.stop.iter().any(String::is_empty) {
            problems.push("stop strings must not be empty".to_string());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Failure::Usage(problems.join("; ")).into())
        }
    }

    /// Whether the next token is the argmax.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }
}

/// Apply the processors to f32 logits `[B, V]`: repetition penalty where `seen` `[B, V]` (bool)
/// is set, then (when sampling) temperature, top-k and top-p; dropped tokens get −∞.
pub fn process(logits: &Tensor, seen: Option<&Tensor>, p: &SamplingParams) -> Tensor {
    let mut x = logits.shallow_clone();
    if let (Some(seen), true) = (seen, p.repetition_penalty != 1.0) {
        let penalized = (&x * p.repetition_penalty).where_self(&x.lt(0.0), &(&x / p.repetition_penalty));
        x = penalized.where_self(seen, &x);
    }
    if p.is_greedy() {
        return x;
    }
    x = &x / p.temperature; // not `/=`: x may share storage with the caller's logits
    let vocab = x.size()[1];
    if p.top_k > 0 && (p.top_k as i64) < vocab {
        let (top, _) = x.topk(p.top_k as i64, -1, true, true);
        let kth = top.narrow(1, p.top_k as i64 - 1, 1);
        x = x.masked_fill(&x.lt_tensor(&kth), f64::NEG_INFINITY);
    }
    if p.top_p < 1.0 {
        let (sorted, idx) = x.sort(-1, false); // ascending
        let cum = sorted.softmax(-1, Kind::Float).cumsum(-1, Kind::Float);
        let drop_sorted = cum.le(1.0 - p.top_p);
        let _ = drop_sorted.narrow(1, vocab - 1, 1).fill_(0); // keep the most likely token
        let drop = drop_sorted.scatter(1, &idx, &drop_sorted);
        x = x.masked_fill(&drop, f64::NEG_INFINITY);
    }
    x
}

/// The next token of every row of processed logits `[B, V]`: argmax when greedy, else the
/// inverse-CDF draw of softmax at row r's uniform `units[r]` (from its [`Rng`]).
pub(crate) fn choose(processed: &Tensor, p: &SamplingParams, units: &[f64]) -> Result<Vec<i64>> {
    if p.is_greedy() {
        let ids = processed.argmax(-1, false).to_device(Device::Cpu);
        return Ok(Vec::<i64>::try_from(&ids)?);
    }
    let probs = processed.softmax(-1, Kind::Float).to_device(Device::Cpu).contiguous();
    let vocab = probs.size()[1] as usize;
    let flat = Vec::<f32>::try_from(&probs.view([-1]))?;
    Ok(flat.chunks(vocab).zip(units).map(|(row, &u)| draw(row, u) as i64).collect())
}

/// Inverse-CDF draw: the first index whose running sum exceeds `u` × total.
fn draw(probs: &[f32], u: f64) -> usize {
    let total: f64 = probs.iter().map(|&x| x as f64).sum();
    let target = u * total;
    let mut acc = 0.0;
    let mut last = 0;
    for (i, &x) in probs.iter().enumerate() {
        if x > 0.0 {
            acc += x as f64;
            last = i;
            if acc > target {
                return i;
            }
        }
    }
    last
}

/// SplitMix64 (Steele et al. 2014): a small seedable generator, one per sequence.
#[derive(Debug, Clone)]
pub(crate) struct Rng(crate::data::SplitMix64);

impl Rng {
    /// The stream of sequence `index` under `seed`.
    pub fn new(seed: u64, index: usize) -> Rng {
        let mut r = crate::data::SplitMix64(seed ^ (index as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
        r.next_u64();
        Rng(r)
    }

    /// Uniform in [0, 1) with 53 random bits.
    pub fn unit(&mut self) -> f64 {
        self.0.unit()
    }
}
