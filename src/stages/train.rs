//! Train stage: NF4 (or dense) base + LoRA adapters, trained on the tokenize
//! shards; resumable from checkpoints. The loop itself is in `crate::train`, which gets the
//! fetched model's folder and the tokenized examples from here.

use crate::pipeline::{RunContext, Stage};
use anyhow::Result;
use std::path::{Path, PathBuf};

/// The train stage.
pub struct Train;

impl Stage for Train {
    fn name(&self) -> &'static str {
        "train"
    }

    fn inputs(&self, ctx: &RunContext) -> Result<serde_json::Value> {
        let r = &ctx.recipe.recipe;
        // Logging-only keys do not change the result, so they stay out of the fingerprint.
        let mut train = serde_json::to_value(&r.train)?;
        if let Some(t) = train.as_object_mut() {
            for k in ["logging_steps", "memory_log_steps", "save_steps", "keep_checkpoints", "eval_steps"] {
                t.remove(k);
            }
            // The process count and the collective timeout are how, not what: they stay out
            // too (a checkpoint refuses a resume on another world size), and so does
            // keep_effective_batch when off, so one-process fingerprints are unchanged.
            for k in ["gpus", "collective_timeout_s"] {
                t.remove(k);
            }
            if !r.train.keep_effective_batch {
                t.remove("keep_effective_batch");
            }
            // A diagnostic switch, and coalescing left to "auto" (added after recipes were
            // recorded; the same loss and gradients up to rounding): out, so fingerprints of
            // recipes that do not set them are unchanged.
            t.remove("detect_anomaly");
            if r.train.coalesce == crate::recipe::Switch::Auto {
                t.remove("coalesce");
            }
        }
        Ok(serde_json::json!({
            "model": { "dtype": r.model.dtype },
            "quantization": r.quantization,
            "lora": r.lora,
            "train": train,
            "seed": r.run.seed,
        }))
    }

    fn run(&self, ctx: &RunContext, dir: &Path, fp: &str) -> Result<Vec<PathBuf>> {
        let r = &ctx.recipe.recipe;
        let model = super::fetch::model_record(ctx)?;
        let base_name = match ctx.recipe.source(&r.model.source) {
            crate::recipe::Source::Hub { repo } => repo,
            crate::recipe::Source::Local(p) => p.display().to_string(),
        };
        let planned_offload = (r.train.offload_activations == crate::recipe::Switch::Auto)
            .then(|| crate::plan::estimate(r, &model.dir).ok().map(|p| p.offload_activations))
            .flatten();
        let inputs = crate::train::TrainInputs {
            recipe: r,
            model_dir: &model.dir,
            base_name,
            examples: super::tokenize::read_split(ctx, "train")?,
            eval_examples: if r.train.eval_steps > 0 { super::tokenize::read_split(ctx, "eval")? } else { vec![] },
            fingerprint: fp,
            planned_offload,
            interrupted: &ctx.interrupted,
            dist: ctx.dist.as_ref(),
        };
        crate::train::run(inputs, dir)
    }

    fn distributed(&self) -> bool {
        true
    }
}
