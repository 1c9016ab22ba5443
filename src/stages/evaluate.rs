//! Evaluate stage: the base model (before) and base + trained adapter (after), on the same
//! eval tokens and the same eval prompts. The work is in `crate::evaluate`; this stage reads
//! the tokenized eval split, the prompt rows, the model folder and the adapter from the run
//! folder, and writes the report.
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

use crate::pipeline::{self, RunContext, Stage};
use crate::util;
use anyhow::{Context, Result};
use serde_json::{json, Map, Value};
use std::path::{Path, PathBuf};

/// The evaluate stage.
pub struct Evaluate;

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
        let examples = super::tokenize::read_split(ctx, "eval")?;
        // No eval split (HF and Axolotl never require one): generations on the first training
        // prompts, labelled so, and no eval loss.
        let has_eval = !examples.is_empty();
        let rows_file = if has_eval { "eval_rows.jsonl" } else { super::tokenize::TRAIN_SAMPLE_FILE };
        if !has_eval && ctx.dist.as_ref().is_none_or(|d| d.is_leader()) {
            eprintln!("evaluate: no eval split; generating on {} training prompts instead (they were trained on), without an eval loss", rows_file);
        }
        let rows: Vec<Map<String, Value>> = std::fs::read_to_string(ctx.stage_dir("tokenize").join(rows_file))
            .with_context(|| format!("tokenize/{rows_file} is missing; run again with --from tokenize"))?
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok()?.as_object().cloned())
            .collect();
        let model = super::fetch::model_record(ctx)?;
        let adapter_dir = ctx.stage_dir("train").join("adapter");
        let report = crate::evaluate::run(crate::evaluate::EvalInputs {
            recipe: r,
            model_dir: &model.dir,
            adapter_dir: &adapter_dir,
            examples,
            rows,
            interrupted: &ctx.interrupted,
            dist: ctx.dist.as_ref(),
        })?;
        let Some(results) = report else { return Ok(vec![]) };
        util::write_json_atomic(&dir.join("report.json"), &Value::Object(results.clone()))?;
        let mut files = vec![dir.join("report.json"), dir.join("report.md")];
        let curve = ctx.stage_dir("train").join("loss.png");
        if curve.is_file() {
            std::fs::copy(&curve, dir.join("loss.png"))?;
            files.push(dir.join("loss.png"));
        }
        let md = crate::evaluate::report_md(r, &results, curve.is_file());
        util::write_atomic(&dir.join("report.md"), md.as_bytes())?;
        pipeline::record(&ctx.run_dir, "evaluate", json!({ "before": results["before"], "after": results["after"] }))?;
        Ok(files)
    }

    fn distributed(&self) -> bool {
        true
    }
}
