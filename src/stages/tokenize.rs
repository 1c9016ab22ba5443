//! Tokenize stage: rows (each source cut to its split slice, sources mixed by weight) → row
//! format → prompt template → token ids and labels → Arrow IPC shards, written in parallel with
//! rayon. The bytes do not depend on the thread count: rows are sliced, mixed, split and
//! shuffled before the parallel part, and each shard is a pure function of its rows.
//!
//! Each shard is written atomically and followed by a small sidecar
//! (`<shard>.json`) carrying the stage fingerprint; an interrupted run keeps
//! every shard whose sidecar matches.

use crate::data::formats::{normalize, Content};
use crate::data::mix::{self, SourcePlan};
use crate::data::rows::{read_rows, Row};
use crate::data::shards::{self, Example};
use crate::data::template::{Renderer, Segment};
use crate::data::tokenizer::Tok;
use crate::pipeline::{self, RunContext, Stage};
use crate::recipe::OnBadRow;
use crate::stages::fetch;
use crate::util;
use anyhow::{bail, Context, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Without an eval split: the first training rows (raw fields), whose prompts evaluate generates
/// on, labelled as training prompts.
pub const TRAIN_SAMPLE_FILE: &str = "train_sample_rows.jsonl";
const TRAIN_SAMPLE_ROWS: usize = 16;

/// The tokenize stage.
pub struct Tokenize;

/// The sidecar of one shard, also its entry in `shards.json`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ShardInfo {
    pub file: String,
    pub split: String,
    pub fingerprint: String,
    /// Examples written.
    pub rows: u64,
    /// Malformed rows skipped (`on_bad_row = "skip"`).
    pub skipped: u64,
    /// Rows with no trained token left (e.g. the response fell past max_seq_length).
    pub empty: u64,
    pub truncated: u64,
    pub tokens: u64,
    pub trained_tokens: u64,
    pub lengths: Vec<u32>,
    pub sha256: String,
    /// A few skipped rows, for the report.
    pub skipped_examples: Vec<String>,
}

/// The examples of one split (`train` or `eval`) of a run's tokenize stage, in shard order.
pub fn read_split(ctx: &RunContext, split: &str) -> Result<Vec<Example>> {
    let dir = ctx.stage_dir("tokenize");
    let infos: Vec<ShardInfo> = util::read_json(&dir.join("shards.json"))?;
    let mut out = vec![];
    for i in infos.iter().filter(|i| i.split == split) {
        out.extend(shards::read(&dir.join(&i.file))?);
    }
    Ok(out)
}

/// The rows of both splits, as the recipe asks: the sources read (sliced and mixed), shuffled
/// from the seed, the eval share held out, `max_samples` kept. Also what each source gave.
fn split_rows(ctx: &RunContext, data: &fetch::DataRecord) -> Result<(Vec<Row>, Vec<Row>, Vec<mix::SourceUse>)> {
    let r = &ctx.recipe.recipe;
    let (mut train, uses) = read_train(ctx, data)?;
    let mut eval = read_source(&data.eval, &mix::eval_plan(&r.dataset))?;
    if uses.len() > 1 {
        for u in &uses {
            let w = u.weight.map(|w| format!(", weight {w}")).unwrap_or_default();
            eprintln!("tokenize: source {} ({}): {} of {} rows{w}", u.source, u.split, u.used, u.rows);
        }
    }
    if train.is_empty() {
        bail!(
            "the dataset has no rows ({})",
            data.train.iter().map(|f| f.path.display().to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    if r.dataset.shuffle {
        crate::data::shuffle(&mut train, r.run.seed);
    }
    if let Some(ratio) = r.dataset.eval_ratio {
        let n = ((train.len() as f64 * ratio).round() as usize).clamp(1, train.len().saturating_sub(1).max(1));
        eval = train.split_off(train.len() - n);
    }
    if let Some(m) = r.dataset.max_samples {
        train.truncate(m as usize);
    }
    Ok((train, eval, uses))
}

/// Per split ("train", "eval"): rows, skipped, dropped and truncated rows, tokens, trained
/// tokens, the longest row and a length histogram, over the shards' sidecars.
fn split_stats(infos: &[ShardInfo], max_seq_length: u32) -> serde_json::Map<String, serde_json::Value> {
    let sum =
        |split: &str, f: &dyn Fn(&ShardInfo) -> u64| infos.iter().filter(|i| i.split == split).map(f).sum::<u64>();
    let mut stats = serde_json::Map::new();
    for split in ["train", "eval"] {
        let tokens = sum(split, &|i| i.tokens);
        let trained = sum(split, &|i| i.trained_tokens);
        let lengths = infos.iter().filter(|i| i.split == split).flat_map(|i| i.lengths.iter().copied());
        stats.insert(split.into(), serde_json::json!({
            "rows": sum(split, &|i| i.rows),
            "skipped_bad_rows": sum(split, &|i| i.skipped),
            "dropped_empty_rows": sum(split, &|i| i.empty),
            "truncated_rows": sum(split, &|i| i.truncated),
            "tokens": tokens,
            "trained_tokens": trained,
            "trained_fraction": if tokens > 0 { trained as f64 / tokens as f64 } else { 0.0 },
            "max_length": infos.iter().filter(|i| i.split == split).flat_map(|i| i.lengths.iter().copied()).max().unwrap_or(0),
            "length_histogram": histogram(lengths, max_seq_length, 16),
            "shards": infos.iter().filter(|i| i.split == split).count(),
        }));
    }
    stats
}

/// The stage's summary line, and a warning when rows lost every trained token to truncation.
fn log_summary(stats: &serde_json::Map<String, serde_json::Value>, max_seq_length: u64) {
    let t = &stats["train"];
    eprintln!(
        "tokenize: train {} rows, {} tokens ({:.1}% trained), {} truncated, {} skipped; eval {} rows",
        t["rows"],
        t["tokens"],
        t["trained_fraction"].as_f64().unwrap_or(0.0) * 100.0,
        t["truncated_rows"],
        t["skipped_bad_rows"],
        stats["eval"]["rows"]
    );
    if t["dropped_empty_rows"].as_u64().unwrap_or(0) > 0 {
        log::warn!(
            "{} train rows had no trained token left after truncation to train.max_seq_length = {}; raise it to keep them",
            t["dropped_empty_rows"], max_seq_length
        );
    }
}

/// Encode one row into an example: template segments (or plain text, trained whole) tokenized
/// one by one, EOS appended (not after a chat template's end-of-turn marker), prompt labels
/// masked, truncated. Ok(None) when nothing is trained.
pub fn encode_row(
    content: &Content,
    renderer: &Renderer,
    tok: &Tok,
    add_eos: bool,
    responses_only: bool,
    max_len: usize,
) -> Result<(Option<Example>, bool), String> {
    let (segs, chat) = match content {
        Content::Text(text) => (vec![Segment { text: text.clone(), trained: true }], false),
        Content::Fields(fields) => (renderer.render(fields)?, renderer.is_chat()),
    };
    let mut ids: Vec<i32> = vec![];
    let mut labels: Vec<i32> = vec![];
    for (i, seg) in segs.iter().enumerate() {
        let part = if i == 0 { tok.encode_start(&seg.text)? } else { tok.encode(&seg.text, false)? };
        for t in part {
            ids.push(t as i32);
            labels.push(if seg.trained || !responses_only { t as i32 } else { -100 });
        }
    }
    // Chat templates end each response with their own end-of-turn marker (`<|im_end|>`,
    // `<end_of_turn>`, `<|eot_id|>`), which is trained and stops generation: nothing is appended.
    if add_eos && !chat && ids.last() != Some(&(tok.eos_id as i32)) {
        ids.push(tok.eos_id as i32);
        labels.push(tok.eos_id as i32);
    }
    let truncated = ids.len() > max_len;
    ids.truncate(max_len);
    labels.truncate(max_len);
    if labels.iter().all(|l| *l == -100) {
        return Ok((None, truncated));
    }
    Ok((Some(Example { input_ids: ids, labels }), truncated))
}

struct Job<'a> {
    split: &'static str,
    index: usize,
    rows: &'a [Row],
}

impl Job<'_> {
    fn file(&self) -> String {
        format!("{}-{:05}.arrow", self.split, self.index)
    }
}

struct Shared<'a> {
    ctx: &'a RunContext,
    dir: &'a Path,
    fp: &'a str,
    renderer: Renderer,
    tok: Tok,
}

fn process(job: &Job, s: &Shared) -> Result<ShardInfo> {
    let path = s.dir.join(job.file());
    let sidecar = s.dir.join(format!("{}.json", job.file()));
    if let Ok(info) = util::read_json::<ShardInfo>(&sidecar) {
        if info.fingerprint == s.fp && path.is_file() && util::sha256_file(&path)? == info.sha256 {
            return Ok(info);
        }
    }
    s.ctx.check_interrupted("tokenize stopped")?;
    let r = &s.ctx.recipe.recipe;
    let max_len = r.train.max_seq_length as usize;
    let mut examples = vec![];
    let mut info = ShardInfo {
        file: job.file(),
        split: job.split.into(),
        fingerprint: s.fp.into(),
        rows: 0,
        skipped: 0,
        empty: 0,
        truncated: 0,
        tokens: 0,
        trained_tokens: 0,
        lengths: vec![],
        sha256: String::new(),
        skipped_examples: vec![],
    };
    let mut errors = vec![];
    for row in job.rows {
        let result = row_content(row, &r.prompt.messages_field).and_then(|c| {
            encode_row(&c, &s.renderer, &s.tok, r.prompt.add_eos, r.prompt.train_on_responses_only, max_len)
        });
        match result {
            Ok((Some(ex), truncated)) => {
                info.truncated += truncated as u64;
                info.tokens += ex.input_ids.len() as u64;
                info.trained_tokens += ex.labels.iter().filter(|l| **l != -100).count() as u64;
                info.lengths.push(ex.input_ids.len() as u32);
                examples.push(ex);
            }
            Ok((None, _)) => info.empty += 1,
            Err(msg) => {
                let m = format!("{}: {msg}", row.location());
                if r.dataset.on_bad_row == OnBadRow::Skip {
                    info.skipped += 1;
                    if info.skipped_examples.len() < 5 {
                        info.skipped_examples.push(m);
                    }
                } else {
                    errors.push(m);
                }
            }
        }
    }
    if !errors.is_empty() {
        let more = if errors.len() > 5 { format!("\n  … and {} more", errors.len() - 5) } else { String::new() };
        bail!(
            "malformed dataset rows:\n  {}{more}\nfix the rows, or set dataset.on_bad_row = \"skip\" to count and skip them",
            errors.iter().take(5).cloned().collect::<Vec<_>>().join("\n  ")
        );
    }
    info.rows = examples.len() as u64;
    let bytes = shards::encode(&examples)?;
    info.sha256 = util::sha256_bytes(&bytes);
    util::write_atomic(&path, &bytes)?;
    util::write_json_atomic(&sidecar, &info)?;
    Ok(info)
}

/// A row read in its source's format (Err: why it is malformed, without the location).
fn row_content(row: &Row, messages_field: &str) -> Result<Content, String> {
    row.fields.as_ref().map_err(|e| e.clone()).and_then(|f| normalize(f, &row.format, messages_field))
}

/// The rows of one source: its files in order, cut to its split slice.
fn read_source(files: &[fetch::DataFile], plan: &SourcePlan) -> Result<Vec<Row>> {
    let mut rows = vec![];
    for f in files {
        rows.extend(read_rows(&f.path)?);
    }
    mix::apply_plan(rows, plan).map_err(|e| anyhow::anyhow!(e))
}

/// The training rows: each source sliced, then mixed; and what each source gave.
fn read_train(ctx: &RunContext, data: &fetch::DataRecord) -> Result<(Vec<Row>, Vec<mix::SourceUse>)> {
    let plans = mix::train_plans(&ctx.recipe.recipe.dataset);
    let groups = if data.sources.is_empty() { vec![data.train.clone()] } else { data.sources.clone() };
    if groups.len() != plans.len() {
        bail!(
            "fetch/data.json lists {} dataset sources, the recipe {}; run again with --from fetch",
            groups.len(),
            plans.len()
        );
    }
    let mut parts = vec![];
    for (plan, files) in plans.into_iter().zip(&groups) {
        let rows = read_source(files, &plan)?;
        parts.push((plan, rows));
    }
    mix::mix(parts, ctx.recipe.recipe.run.seed).map_err(|e| anyhow::anyhow!(e))
}

/// Rows as the evaluate stage reads them back: fields in the form the renderer takes (ShareGPT
/// rewritten as messages); plain-text and malformed rows have no prompt and are left out.
fn rows_jsonl<'a>(rows: impl Iterator<Item = &'a Row>, messages_field: &str, limit: usize) -> String {
    rows.filter_map(|r| match row_content(r, messages_field) {
        Ok(Content::Fields(f)) => Some(format!("{}\n", serde_json::Value::Object(f))),
        _ => None,
    })
    .take(limit)
    .collect()
}

/// A histogram of lengths: `bins` equal-width buckets over 0..=max.
pub fn histogram(lengths: impl Iterator<Item = u32>, max: u32, bins: u32) -> Vec<serde_json::Value> {
    let width = max.div_ceil(bins).max(1);
    let mut counts = vec![0u64; bins as usize];
    for l in lengths {
        counts[((l.saturating_sub(1)) / width).min(bins - 1) as usize] += 1;
    }
    counts
        .iter()
        .enumerate()
        .map(|(i, c)| serde_json::json!({"from": i as u32 * width + 1, "to": (i as u32 + 1) * width, "rows": c}))
        .collect()
}

/// Show one example with its trained part marked, so users see what is learned.
pub fn show_example(ex: &Example, tok: &Tok) -> String {
    let mut out = String::new();
    let mut i = 0;
    while i < ex.input_ids.len() {
        let trained = ex.labels[i] != -100;
        let mut j = i;
        while j < ex.input_ids.len() && (ex.labels[j] != -100) == trained {
            j += 1;
        }
        let ids: Vec<u32> = ex.input_ids[i..j].iter().map(|t| *t as u32).collect();
        let text = tok.decode(&ids);
        if trained {
            out.push_str(&format!("⟦{text}⟧"));
        } else {
            out.push_str(&text);
        }
        i = j;
    }
    out
}

impl Stage for Tokenize {
    fn name(&self) -> &'static str {
        "tokenize"
    }

    fn inputs(&self, ctx: &RunContext) -> Result<serde_json::Value> {
        let r = &ctx.recipe.recipe;
        let d = &r.dataset;
        let mut dataset = serde_json::json!({
            "eval_ratio": d.eval_ratio, "max_samples": d.max_samples, "shuffle": d.shuffle,
            "on_bad_row": d.on_bad_row, "shard_rows": d.shard_rows,
        });
        // Keys added later go in only when set, so that older runs keep their fingerprints.
        if d.format != crate::recipe::DataFormat::Auto {
            dataset["format"] = serde_json::json!(d.format);
        }
        if let Some(t) = &d.text_field {
            dataset["text_field"] = serde_json::json!(t);
        }
        if d.split.slice.is_some() {
            dataset["split"] = serde_json::json!(d.split);
        }
        if let Some(s) = &d.eval_split {
            dataset["eval_split"] = serde_json::json!(s);
        }
        if !d.sources.is_empty() {
            dataset["sources"] = serde_json::to_value(&d.sources)?;
        }
        Ok(serde_json::json!({
            "prompt": r.prompt,
            "dataset": dataset,
            "max_seq_length": r.train.max_seq_length,
            "seed": r.run.seed,
        }))
    }

    fn run(&self, ctx: &RunContext, dir: &Path, fp: &str) -> Result<Vec<PathBuf>> {
        let r = &ctx.recipe.recipe;
        let model = fetch::model_record(ctx)?;
        let data = fetch::data_record(ctx)?;
        let tok = Tok::load(&model.dir)?;
        let renderer =
            Renderer::new(&r.prompt, tok.chat_template.as_deref(), &tok.bos_token, &tok.eos_token).map_err(|e| {
                crate::error::Failure::Usage(format!("{}: prompt.template: {e}", ctx.recipe.path.display()))
            })?;

        let (train, eval, uses) = split_rows(ctx, &data)?;

        let per = r.dataset.shard_rows as usize;
        let mut jobs = vec![];
        for (split, rows) in [("train", &train), ("eval", &eval)] {
            for (index, chunk) in rows.chunks(per).enumerate() {
                jobs.push(Job { split, index, rows: chunk });
            }
        }
        // Remove shards of an earlier, different layout (e.g. shard_rows changed).
        let expected: std::collections::BTreeSet<String> = jobs.iter().map(|j| j.file()).collect();
        for entry in std::fs::read_dir(dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let shard = name.strip_suffix(".json").unwrap_or(&name);
            if shard.ends_with(".arrow") && !expected.contains(shard) {
                std::fs::remove_file(entry.path()).ok();
            }
        }

        // The raw eval rows, in split order: the evaluate stage renders their prompts and
        // compares generations with their responses.
        let eval_rows = rows_jsonl(eval.iter(), &r.prompt.messages_field, usize::MAX);
        util::write_atomic(&dir.join("eval_rows.jsonl"), eval_rows.as_bytes())?;
        // Without an eval split, evaluate shows generations on the first training prompts.
        let sample_rows =
            eval.is_empty().then(|| rows_jsonl(train.iter(), &r.prompt.messages_field, TRAIN_SAMPLE_ROWS));
        if let Some(text) = &sample_rows {
            util::write_atomic(&dir.join(TRAIN_SAMPLE_FILE), text.as_bytes())?;
        }

        let shared = Shared { ctx, dir, fp, renderer, tok };
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(ctx.threads.max(1))
            .build()
            .context("cannot start worker threads")?;
        let bar = crate::progress::Progress::new(jobs.len() as u64, "tokenize", crate::progress::Unit::Items("shards"));
        let results: Vec<Result<ShardInfo>> = pool.install(|| {
            jobs.par_iter()
                .map(|j| {
                    let r = process(j, &shared);
                    bar.inc(1);
                    r
                })
                .collect()
        });
        bar.finish();
        // An interruption wins over other errors; otherwise the first failing shard is reported.
        if results.iter().any(|r| r.as_ref().err().is_some_and(|e| crate::error::exit_code(e) == 130)) {
            return Err(crate::error::Failure::Interrupted(
                "tokenize stopped; finished shards are kept, run the same command again to resume".into(),
            )
            .into());
        }
        let infos: Vec<ShardInfo> = results.into_iter().collect::<Result<_>>()?;

        let mut stats = split_stats(&infos, r.train.max_seq_length as u32);
        let skipped: Vec<&String> = infos.iter().flat_map(|i| i.skipped_examples.iter()).take(5).collect();
        stats.insert("skipped_examples".into(), serde_json::json!(skipped));
        stats.insert("sources".into(), serde_json::json!(uses));
        stats.insert("tokenizer_sha256".into(), serde_json::json!(shared.tok.hash));
        util::write_json_atomic(&dir.join("stats.json"), &stats)?;
        util::write_json_atomic(&dir.join("shards.json"), &infos)?;
        pipeline::record(&ctx.run_dir, "tokenize", serde_json::json!({ "tokenizer_sha256": shared.tok.hash }))?;

        log_summary(&stats, r.train.max_seq_length);
        for s in &skipped {
            eprintln!("tokenize: skipped {s}");
        }
        if let Some(first) = infos.iter().find(|i| i.split == "train" && i.rows > 0) {
            if let Some(ex) = shards::read(&dir.join(&first.file))?.first() {
                eprintln!("tokenize: example (⟦…⟧ is trained, the rest is masked):\n{}", show_example(ex, &shared.tok));
            }
        }
        let mut artifacts: Vec<PathBuf> = infos.iter().map(|i| PathBuf::from(&i.file)).collect();
        artifacts.push("stats.json".into());
        artifacts.push("shards.json".into());
        artifacts.push("eval_rows.jsonl".into());
        if sample_rows.is_some() {
            artifacts.push(TRAIN_SAMPLE_FILE.into());
        }
        Ok(artifacts)
    }
}
