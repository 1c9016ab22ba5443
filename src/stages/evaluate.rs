//! Evaluate stage: the base model (before) and base + trained adapter (after),
//! on the same eval tokens and the same eval prompts.
//!
//! - Eval loss and perplexity over the eval split's trained tokens (the same
//!   token-sum normalisation as training).
//! - Generations on the eval prompts, rendered with the recipe's template
//!   (greedy unless `[eval] temperature` > 0).
//! - Task metrics from `[eval] metrics`: `exact_match` (trimmed text equality)
//!   and `json_fields` (the fraction of the expected JSON object's key/values
//!   that the generated object has, 0 when it does not parse).
//!
//! Writes `report.json` (`{"before": {...}, "after": {...}, ...}`) and
//! `report.md` (a before/after table, samples side by side, the loss curve).

use crate::data::template::Renderer;
use crate::data::tokenizer::Tok;
use crate::generate::{Generator, SamplingParams};
use crate::model::CausalLm;
use crate::pipeline::{self, RunContext, Stage};
use crate::progress::{Progress, Unit};
use crate::recipe::Metric;
use crate::train::{data, step};
use crate::util;
use anyhow::{Context, Result};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

/// The evaluate stage.
pub struct Evaluate;

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

/// Summed NLL and trained-token count over the eval examples, in shard order, batched;
/// with several processes, rank r takes batches r, r + world, … (`shard` = (rank, world)).
/// `bar` counts rows (each rank's batch stands for one batch per rank).
fn eval_loss(
    model: &dyn CausalLm,
    examples: &[crate::data::shards::Example],
    batch: usize,
    o: &step::StepOptions,
    shard: (usize, usize),
    bar: &Progress,
) -> (f64, i64) {
    let (mut nll, mut n) = (0.0, 0i64);
    for (_, chunk) in examples.chunks(batch.max(1)).enumerate().filter(|(k, _)| k % shard.1 == shard.0) {
        let mb = data::MicroBatch {
            input_ids: chunk.iter().map(|e| e.input_ids.iter().map(|x| *x as i64).collect()).collect(),
            labels: chunk.iter().map(|e| e.labels.iter().map(|x| *x as i64).collect()).collect(),
            seq_ids: None,
        };
        let (s, k) = step::eval_nll(model, &mb, o);
        nll += s;
        n += k;
        bar.inc((chunk.len() * shard.1) as u64);
    }
    (nll, n)
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

impl Stage for Evaluate {
    fn name(&self) -> &'static str {
        "evaluate"
    }

    fn inputs(&self, ctx: &RunContext) -> Result<Value> {
        let r = &ctx.recipe.recipe;
        Ok(json!({ "eval": r.eval, "prompt": r.prompt, "dtype": r.model.dtype, "device": r.train.device }))
    }

    fn run(&self, ctx: &RunContext, dir: &Path, _fp: &str) -> Result<Vec<PathBuf>> {
        let r = &ctx.recipe.recipe;
        let e = &r.eval;
        let tok_dir = ctx.stage_dir("tokenize");
        let mut examples = crate::train::read_split(&tok_dir, "eval")?;
        if e.max_loss_rows > 0 {
            examples.truncate(e.max_loss_rows as usize);
        }
        // No eval split (HF and Axolotl never require one): generations on the first training
        // prompts, labelled so, and no eval loss.
        let has_eval = !examples.is_empty();
        let rows_file = if has_eval { "eval_rows.jsonl" } else { crate::stages::tokenize::TRAIN_SAMPLE_FILE };
        if !has_eval {
            eprintln!("evaluate: no eval split; generating on {} training prompts instead (they were trained on), without an eval loss", rows_file);
        }
        if let Some(d) = ctx.dist.as_ref().filter(|d| d.is_leader()) {
            d.announce(&format!("evaluate {_fp}"))?;
        }
        // With several processes (crate::dist) the eval batches and the generation batches are
        // split by rank (batch k on rank k mod world, the same batches as one process), the
        // sums all-reduced and the texts gathered on rank 0, which alone writes the report.
        let dist = ctx.dist.as_ref();
        let shard = dist.map(|d| (d.world.rank, d.world.world_size)).unwrap_or((0, 1));
        let leader = shard.0 == 0;
        let model_rec = crate::stages::fetch::model_record(ctx)?;
        let device = match dist {
            Some(d) => d.device,
            None => r.train.device.resolve(),
        };
        let kind = crate::model::open::compute_kind(r.model.dtype, device);
        let tok = Tok::load(&model_rec.dir)?;
        let pad_id = crate::model::open::pad_id(&tok);
        let renderer = Renderer::new(&r.prompt, tok.chat_template.as_deref(), &tok.bos_token, &tok.eos_token)
            .map_err(|m| anyhow::anyhow!(m))?;
        let rows: Vec<Map<String, Value>> = std::fs::read_to_string(tok_dir.join(rows_file))
            .with_context(|| format!("tokenize/{rows_file} is missing; run again with --from tokenize"))?
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok()?.as_object().cloned())
            .collect();
        let samples: Vec<Sample> = rows
            .iter()
            .filter_map(|row| renderer.prompt_text(row).ok())
            .take(e.max_samples as usize)
            .map(|(prompt, expected)| Sample { prompt, expected })
            .collect();

        let mut model = crate::model::open::load_for_recipe(&model_rec.dir, r, device)?;
        crate::model::dequantize_linears(model.as_mut(), kind);
        let o = step::StepOptions {
            checkpointing: false,
            pad_id,
            pad_multiple: 1,
            device,
            seed: r.run.seed,
            loss_scale: 1.0,
            hand_backward: false,
            offload: false,
            profile: None,
            coalesce: None,
            detect_anomaly: false,
        };
        let params = SamplingParams {
            max_new_tokens: e.max_new_tokens as usize,
            temperature: e.temperature,
            seed: r.run.seed,
            ..SamplingParams::default()
        };
        let loss_rows = if has_eval { examples.len() } else { 0 };
        let bar = Progress::leader(leader, 2 * (loss_rows + samples.len()) as u64, "evaluate", Unit::Items("rows"));
        let mut generator = Generator::from_parts(model, tok, device);
        let mut results = Map::new();
        let mut outputs: Vec<Vec<String>> = vec![];
        for phase in ["before", "after"] {
            if phase == "after" {
                crate::model::open::apply_adapter(generator.model.as_mut(), &ctx.stage_dir("train").join("adapter"))?;
            }
            let t_loss = std::time::Instant::now();
            let (mut nll, mut n) = if has_eval {
                eval_loss(generator.model.as_ref(), &examples, e.batch_size as usize, &o, shard, &bar)
            } else {
                (0.0, 0)
            };
            if let Some(d) = dist {
                let mut v = [nll, n as f64];
                d.all_reduce_f64(&mut v)?;
                (nll, n) = (v[0], v[1] as i64);
            }
            let loss = nll / n.max(1) as f64;
            let (loss_s, t_gen) = (t_loss.elapsed().as_secs_f64(), std::time::Instant::now());
            let mut texts = vec![];
            for (_, chunk) in
                samples.chunks(e.batch_size.max(1) as usize).enumerate().filter(|(k, _)| k % shard.1 == shard.0)
            {
                ctx.check_interrupted("evaluate stopped")?;
                let prompts: Vec<String> = chunk.iter().map(|s| s.prompt.clone()).collect();
                let done = generator.generate(&prompts, &params, &mut |_, _| true)?;
                texts.extend(done.into_iter().map(|c| c.text));
                bar.inc((chunk.len() * shard.1) as u64);
            }
            if let Some(d) = dist {
                let all = d.gather_json(&format!("evaluate-{phase}"), &json!(texts))?;
                let Some(all) = all else { continue };
                texts = interleave_batches(
                    all.iter().map(|v| serde_json::from_value(v.clone()).unwrap_or_default()).collect(),
                    e.batch_size.max(1) as usize,
                );
            }
            let mut m = metrics_of(&e.metrics, &texts, &samples);
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
                samples.len(),
                if has_eval { "eval" } else { "training" }
            );
            results.insert(phase.into(), Value::Object(m));
            outputs.push(texts);
        }
        bar.finish();
        if !leader {
            return Ok(vec![]);
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
        util::write_json_atomic(&dir.join("report.json"), &Value::Object(results.clone()))?;

        let mut files = vec![dir.join("report.json"), dir.join("report.md")];
        let curve = ctx.stage_dir("train").join("loss.png");
        if curve.is_file() {
            std::fs::copy(&curve, dir.join("loss.png"))?;
            files.push(dir.join("loss.png"));
        }
        util::write_atomic(&dir.join("report.md"), report_md(r, &results, curve.is_file()).as_bytes())?;
        pipeline::record(&ctx.run_dir, "evaluate", json!({ "before": results["before"], "after": results["after"] }))?;
        Ok(files)
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

fn report_md(r: &crate::recipe::Recipe, res: &Map<String, Value>, curve: bool) -> String {
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
