//! Export stage: the trained run as a PEFT adapter, a merged HF model, an NF4
//! (bitsandbytes) model and GGUF files with an Ollama Modelfile, as `[export]` asks.
//! The work is in `crate::export`; this is the [`Stage`] wrapper.

use crate::pipeline::{RunContext, Stage};
use anyhow::Result;
use std::path::{Path, PathBuf};

/// The export stage.
pub struct Export;

impl Stage for Export {
    fn name(&self) -> &'static str {
        "export"
    }

    fn inputs(&self, ctx: &RunContext) -> Result<serde_json::Value> {
        // The train fingerprint (and through it the whole recipe up to training) is
        // chained in by the executor; only [export] is this stage's own.
        Ok(serde_json::json!({ "export": ctx.recipe.recipe.export }))
    }

    fn run(&self, ctx: &RunContext, dir: &Path, fp: &str) -> Result<Vec<PathBuf>> {
        crate::export::run(ctx, dir, fp)
    }
}
