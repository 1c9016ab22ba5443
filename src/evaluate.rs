//! Evaluation: the base model (before) and base + trained adapter (after), on the same eval
//! tokens and the same prompts.
//!
//! - Eval loss and perplexity over the eval split's trained tokens (the same token-sum
//!   normalisation as training).
//! - Generations on the eval prompts, rendered with the recipe's template (greedy unless
//!   `[eval] temperature` > 0).
//! - Task metrics from `[eval] metrics`: `exact_match` (trimmed text equality) and
//!   `json_fields` (the fraction of the expected JSON object's key/values that the generated
//!   object has, 0 when it does not parse).
//!
//! [`run`] returns the report (`{"before": {...}, "after": {...}, ...}`) and [`report_md`]
//! renders it; the evaluate stage (`stages/evaluate.rs`) reads the inputs from the run folder
//! and writes `report.json` and `report.md`.

use crate::data::shards::Example;
use crate::data::template::Renderer;
use crate::data::tokenizer::Tok;
use crate::dist::Dist;
use crate::generate::{Generator, SamplingParams};
use crate::progress::{Progress, Unit};
use crate::recipe::{Metric, Recipe};
use crate::train::step;
use anyhow::Result;
use serde_json::{json, Map, Value};
use std::path::Path;
use std::sync::atomic::AtomicBool;

/// The first JSON object in `text` (from the first `{` to its matching `}`), parsed.
pub fn first_json_object(text: &str) -> Option<Map<String, Value>> {
    let start = text.find('{')?;
    let (mut depth, mut in_str, mut esc) = (0i32, false, false);
    for (i, c) in text[start..].char_indices() {
        match c {
            _ if esc => esc = false,
            '\\' if in_str => esc = true,
            '"' => in_str = !in_str,
            '{' if !in_str => depth += 1,
            '}' if !in_str => {
                depth -= 1;
                if depth == 0 {
                    return serde_json::from_str::<Value>(&text[start..start + i + 1]).ok()?.as_object().cloned();
                }
            }
            _ => {}
        }
    }
    None
}

/// The fraction of `expected`'s key/values that `generated` reproduces (0 when it has no JSON object).
pub fn json_fields(generated: &str, expected: &str) -> Option<f64> {
    let want = first_json_object(expected)?;
    if want.is_empty() {
        return None;
    }
    let got = first_json_object(generated).unwrap_or_default();
    Some(want.iter().filter(|(k, v)| got.get(*k) == Some(v)).count() as f64 / want.len() as f64)
}

/// Trimmed equality.
pub fn exact_match(generated: &str, expected: &str) -> f64 {
    f64::from(generated.trim() == expected.trim())
}

struct Sample {
    prompt: String,
    expected: String,
}

fn metrics_of(metrics: &[Metric], outputs: &[String], samples: &[Sample]) -> Map<String, Value> {
    let mut m = Map::new();
    for metric in metrics {
        let scores: Vec<f64> = outputs
            .iter()
            .zip(samples)
            .filter_map(|(g, s)| match metric {
                Metric::ExactMatch => Some(exact_match(g, &s.expected)),
                Metric::JsonFields => json_fields(g, &s.expected),
            })
            .collect();
        let mean = if scores.is_empty() { 0.0 } else { scores.iter().sum::<f64>() / scores.len() as f64 };
        m.insert(metric.name().to_string(), json!(mean));
    }
    m
}

/// What evaluation needs, resolved from the run folder by the evaluate stage.
pub struct EvalInputs<'a> {
    pub recipe: &'a Recipe,
    /// The base model's HF folder.
    pub model_dir: &'a Path,
    /// The trained adapter (PEFT folder), applied for the "after" half.
    pub adapter_dir: &'a Path,
    /// The tokenized eval examples for the loss; empty when there is no eval split (then no loss).
    pub examples: Vec<Example>,
    /// Raw rows whose prompts are generated on (the eval rows, else the first training rows).
    pub rows: Vec<Map<String, Value>>,
    /// Set by Ctrl-C.
    pub interrupted: &'a AtomicBool,
    /// The process group when this process is one rank of several.
    pub dist: Option<&'a Dist>,
}

/// Evaluate before and after; returns the report on rank 0 (None on the other ranks).
///
/// With several processes the eval batches and the generation batches are split by rank (batch
/// k on rank k mod world, the same batches as one process), the sums all-reduced and the texts
/// gathered on rank 0.
pub fn run(mut inp: EvalInputs) -> Result<Option<Map<String, Value>>> {
    let (r, e) = (inp.recipe, &inp.recipe.eval);
    let mut examples = std::mem::take(&mut inp.examples);
    if e.max_loss_rows > 0 {
        examples.truncate(e.max_loss_rows as usize);
    }
    let has_eval = !examples.is_empty();
    let shard = inp.dist.map(|d| (d.world.rank, d.world.world_size)).unwrap_or((0, 1));
    let device = inp.dist.map(|d| d.device).unwrap_or_else(|| r.train.device.resolve());
    let kind = crate::model::open::compute_kind(r.model.dtype, device);
    let tok = Tok::load(inp.model_dir)?;
    let renderer = Renderer::new(&r.prompt, tok.chat_template.as_deref(), &tok.bos_token, &tok.eos_token)
        .map_err(|m| anyhow::anyhow!(m))?;
    let samples: Vec<Sample> = inp
        .rows
        .iter()
        .filter_map(|row| renderer.prompt_text(row).ok())
        .take(e.max_samples as usize)
        .map(|(prompt, expected)| Sample { prompt, expected })
        .collect();
    let o = step::StepOptions {
        checkpointing: false,
        pad_id: crate::model::open::pad_id(&tok),
        pad_multiple: 1,
        device,
        seed: r.run.seed,
        loss_scale: 1.0,
        hand_backward: false,
        offload: false,
        profile: None,
        coalesce: None,
        detect_anomaly: false,
        op_census: None,
    };
    let mut model = crate::model::open::load_for_recipe(inp.model_dir, r, device)?;
    crate::model::dequantize_linears(model.as_mut(), kind);
    let loss_rows = if has_eval { examples.len() } else { 0 };
    let bar = Progress::leader(shard.0 == 0, 2 * (loss_rows + samples.len()) as u64, "evaluate", Unit::Items("rows"));
    let mut generator = Generator::from_parts(model, tok, device);
    let mut results = Map::new();
    let mut outputs: Vec<Vec<String>> = vec![];
    for phase in ["before", "after"] {
        if phase == "after" {
            crate::model::open::apply_adapter(generator.model.as_mut(), inp.adapter_dir)?;
        }
        let half = Half { inp: &inp, examples: &examples, samples: &samples, o: &o, shard, bar: &bar };
        let Some((m, texts)) = half.run(&mut generator, phase)? else { continue };
        results.insert(phase.into(), Value::Object(m));
        outputs.push(texts);
    }
    bar.finish();
    if shard.0 != 0 {
        return Ok(None);
    }
    let shown: Vec<Value> = samples
        .iter()
        .zip(outputs[0].iter().zip(&outputs[1]))
        .take(5)
        .map(|(s, (b, a))| json!({"prompt": s.prompt, "expected": s.expected, "before": b, "after": a}))
        .collect();
    let tokens: i64 = examples.iter().map(|x| x.labels.iter().skip(1).filter(|l| **l != -100).count() as i64).sum();
    results.insert("eval_rows".into(), json!(examples.len()));
    results.insert("prompts_from".into(), json!(if has_eval { "eval" } else { "train" }));
    results.insert("eval_tokens".into(), json!(tokens));
    results.insert("generation_samples".into(), json!(samples.len()));
    results.insert("samples".into(), json!(shown));
    Ok(Some(results))
}

/// One half's metrics and generated texts.
type HalfResult = (Map<String, Value>, Vec<String>);

/// One half of the evaluation (before or after the adapter): loss, generations, metrics.
struct Half<'a> {
    inp: &'a EvalInputs<'a>,
    examples: &'a [Example],
    samples: &'a [Sample],
    o: &'a step::StepOptions,
    shard: (usize, usize),
    bar: &'a Progress,
}

impl Half<'_> {
    /// The metrics and the generated texts of `phase` (None on ranks other than 0).
    fn run(&self, generator: &mut Generator, phase: &str) -> Result<Option<HalfResult>> {
        let e = &self.inp.recipe.eval;
        let has_eval = !self.examples.is_empty();
        let t_loss = std::time::Instant::now();
        let (mut nll, mut n) = if has_eval {
            step::eval_loss(
                generator.model.as_ref(),
                self.examples,
                e.batch_size as usize,
                self.o,
                self.shard,
                self.bar,
            )
        } else {
            (0.0, 0)
        };
        if let Some(d) = self.inp.dist {
            let mut v = [nll, n as f64];
            d.all_reduce_f64(&mut v)?;
            (nll, n) = (v[0], v[1] as i64);
        }
        let loss = nll / n.max(1) as f64;
        let (loss_s, t_gen) = (t_loss.elapsed().as_secs_f64(), std::time::Instant::now());
        let params = SamplingParams {
            max_new_tokens: e.max_new_tokens as usize,
            temperature: e.temperature,
            seed: self.inp.recipe.run.seed,
            ..SamplingParams::default()
        };
        let mut texts = vec![];
        let batch = e.batch_size.max(1) as usize;
        for (_, chunk) in self.samples.chunks(batch).enumerate().filter(|(k, _)| k % self.shard.1 == self.shard.0) {
            crate::error::check_interrupted(self.inp.interrupted, "evaluate stopped")?;
            let prompts: Vec<String> = chunk.iter().map(|s| s.prompt.clone()).collect();
            let done = generator.generate(&prompts, &params, &mut |_, _| true)?;
            texts.extend(done.into_iter().map(|c| c.text));
            self.bar.inc((chunk.len() * self.shard.1) as u64);
        }
        if let Some(d) = self.inp.dist {
            let Some(all) = d.gather_json(&format!("evaluate-{phase}"), &json!(texts))? else { return Ok(None) };
            texts = interleave_batches(
                all.iter().map(|v| serde_json::from_value(v.clone()).unwrap_or_default()).collect(),
                batch,
            );
        }
        let mut m = metrics_of(&e.metrics, &texts, self.samples);
        if has_eval {
            m.insert("eval_loss".into(), json!(loss));
            m.insert("perplexity".into(), json!(loss.exp()));
        }
        let loss_part =
            if has_eval { format!("eval loss {loss:.4}") } else { "no eval loss (no eval split)".to_string() };
        let metric_part: String = m
            .iter()
            .filter(|(k, _)| !k.starts_with("eval") && *k != "perplexity")
            .map(|(k, v)| format!(", {k} {:.3}", v.as_f64().unwrap_or(0.0)))
            .collect();
        eprintln!(
            "evaluate: {phase}: {loss_part}{metric_part} (loss {loss_s:.1}s over {n} tokens, generation {:.1}s for {} {} prompts)",
            t_gen.elapsed().as_secs_f64(),
            self.samples.len(),
            if has_eval { "eval" } else { "training" }
        );
        Ok(Some((m, texts)))
    }
}

/// Texts generated batch-round-robin (rank r did batches r, r + world, …), back in order.
pub fn interleave_batches(per_rank: Vec<Vec<String>>, batch: usize) -> Vec<String> {
    let world = per_rank.len();
    let mut chunks: Vec<std::collections::VecDeque<Vec<String>>> =
        per_rank.into_iter().map(|v| v.chunks(batch).map(<[String]>::to_vec).collect()).collect();
    let mut out = vec![];
    'outer: for k in 0.. {
        match chunks[k % world].pop_front() {
            Some(c) => out.extend(c),
            None => break 'outer,
        }
    }
    out
}

/// `report.md`: the before/after table, the loss curve when there is one, and samples side by side.
pub fn report_md(r: &Recipe, res: &Map<String, Value>, curve: bool) -> String {
    let mut s = format!("# Evaluation: {}\n\n", r.run.name);
    if res["prompts_from"] == "train" {
        s.push_str(&format!(
            "Base model `{}`. **No eval split**: the {} prompts below are training prompts (the tuned model saw them), so these metrics show fit, not generalisation; there is no eval loss. Set `dataset.eval_ratio` or `dataset.eval_source` for a held-out evaluation.\n\n",
            r.model.source, res["generation_samples"]
        ));
    } else {
        s.push_str(&format!(
            "Base model `{}`, {} eval rows ({} trained tokens), {} prompts generated.\n\n",
            r.model.source, res["eval_rows"], res["eval_tokens"], res["generation_samples"]
        ));
    }
    s.push_str("| metric | before (base) | after (tuned) |\n|---|---|---|\n");
    if let (Some(b), Some(a)) = (res["before"].as_object(), res["after"].as_object()) {
        for (k, v) in b {
            s.push_str(&format!(
                "| {k} | {:.4} | {:.4} |\n",
                v.as_f64().unwrap_or(f64::NAN),
                a.get(k).and_then(|x| x.as_f64()).unwrap_or(f64::NAN)
            ));
        }
    }
    if curve {
        s.push_str("\n![train loss](loss.png)\n");
    }
    s.push_str("\n## Samples\n");
    for (i, x) in res["samples"].as_array().into_iter().flatten().enumerate() {
        let block = |v: &Value| format!("```\n{}\n```\n", v.as_str().unwrap_or("").trim_end());
        s.push_str(&format!(
            "\n### {}\n\nPrompt:\n{}\nExpected:\n{}\nBefore:\n{}\nAfter:\n{}",
            i + 1,
            block(&x["prompt"]),
            block(&x["expected"]),
            block(&x["before"]),
            block(&x["after"])
        ));
    }
    s
}
