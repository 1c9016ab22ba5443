//! The pipeline's stages, one module each, behind [`crate::pipeline::Stage`].

pub mod fetch;
pub mod evaluate;
pub mod export;
pub mod train;
pub mod tokenize;

use crate::pipeline::{Incomplete, RunContext, Stage};
use std::path::{Path, PathBuf};

/// A stage that later work will build: it stops the run as incomplete, never as success.
pub struct NotYet(pub &'static str);

impl Stage for NotYet {
    fn name(&self) -> &'static str {
        self.0
    }
    fn inputs(&self, _: &RunContext) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::Value::Null)
    }
    fn run(&self, _: &RunContext, _: &Path, _: &str) -> anyhow::Result<Vec<PathBuf>> {
        Err(Incomplete(self.0.to_string()).into())
    }
}
