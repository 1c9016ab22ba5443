//! The staged executor: fetch → tokenize → train → evaluate → export.
//!
//! Each stage writes into `<run dir>/<stage>/` and finishes by writing its
//! manifest atomically. A complete stage whose fingerprint matches is skipped; a
//! changed one re-runs with everything after it (fingerprints chain); an
//! interrupted one resumes from its own partial files. After llm.c's and
//! torchtune's crash-safe resume (write, rename, mark done last).

pub mod run_dir;

use crate::error::Failure;
use crate::hub::HubConfig;
use crate::recipe::Loaded;
use crate::util;
use anyhow::{Context, Result};
use run_dir::{Manifest, RunLock, FORMAT_VERSION};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Everything a stage may read: the recipe, the run dir and run-wide settings.
/// Passed explicitly; there is no global state.
pub struct RunContext {
    pub recipe: Loaded,
    pub run_dir: PathBuf,
    /// Worker threads for parallel stages (tokenize); does not change results.
    pub threads: usize,
    /// Set by Ctrl-C; long stages poll it and stop cleanly.
    pub interrupted: Arc<AtomicBool>,
    /// Hub endpoint, token, cache and offline mode.
    pub hub: HubConfig,
    /// The process group when this process is one rank of several (data parallel train
    /// and evaluate); None for a single process.
    pub dist: Option<crate::dist::Dist>,
}

impl RunContext {
    /// The folder of a stage.
    pub fn stage_dir(&self, stage: &str) -> PathBuf {
        self.run_dir.join(stage)
    }

    /// Err(Interrupted) once Ctrl-C was pressed.
    pub fn check_interrupted(&self, what: &str) -> Result<()> {
        crate::error::check_interrupted(&self.interrupted, what)
    }
}

/// One pipeline stage. The trait fixes the shape; stages share no code through it.
pub trait Stage {
    /// The stage's name, also its folder name.
    fn name(&self) -> &'static str;
    /// The inputs that decide this stage's output (recipe keys it reads, hashes
    /// of input files); the upstream manifest is chained in by the executor.
    fn inputs(&self, ctx: &RunContext) -> Result<serde_json::Value>;
    /// Do the work in `dir`, resuming from partial files whose own fingerprint is
    /// `fingerprint`; return the artifacts (paths relative to `dir`).
    fn run(&self, ctx: &RunContext, dir: &Path, fingerprint: &str) -> Result<Vec<PathBuf>>;
    /// Whether every rank of a multi-process run takes part (train, evaluate); the leader
    /// then tells the others to run it ([`crate::dist::Command::Stage`]). Otherwise rank 0
    /// runs it alone.
    fn distributed(&self) -> bool {
        false
    }
}

/// The index of a stage named on the command line (`--from`, `--until`) in `stages`.
pub fn stage_index(stages: &[Box<dyn Stage>], name: &str, flag: &str) -> Result<usize> {
    stages.iter().position(|s| s.name() == name).ok_or_else(|| {
        let names: Vec<&str> = stages.iter().map(|s| s.name()).collect();
        Failure::Usage(format!("{flag} {name}: unknown stage; stages are {}", names.join(", "))).into()
    })
}

/// The fingerprint of a stage: its inputs, the upstream stage's fingerprint and the format version.
pub fn fingerprint(stage: &str, inputs: &serde_json::Value, upstream: Option<&str>) -> String {
    let v = serde_json::json!({
        "format_version": FORMAT_VERSION,
        "stage": stage,
        "inputs": inputs,
        "upstream": upstream,
    });
    util::sha256_bytes(v.to_string().as_bytes())
}

/// Options for one `tuner run`.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    pub from: Option<String>,
    pub until: Option<String>,
}

/// What the run actually used: written to `<run>/tuner.lock.json` and updated by stages.
#[derive(Debug, Clone, Serialize, serde::Deserialize, Default)]
pub struct RunRecord {
    pub recipe_path: String,
    pub tuner_version: String,
    pub libtorch_version: String,
    /// Per stage: what it recorded (model revision and hashes, data hashes, tokenizer hash…).
    pub stages: serde_json::Map<String, serde_json::Value>,
    /// The `--set` overrides of the last `tuner run` on this dir.
    #[serde(default)]
    pub overrides: Vec<String>,
}

/// Merge `value` under `stage` into the run record (atomically rewritten).
pub fn record(run_dir: &Path, stage: &str, value: serde_json::Value) -> Result<()> {
    let path = run_dir.join("tuner.lock.json");
    let mut rec: RunRecord = util::read_json(&path).unwrap_or_default();
    rec.stages.insert(stage.to_string(), value);
    util::write_json_atomic(&path, &rec)
}

/// Run `stages` (in order; `crate::stages::all()`) for a loaded recipe.
pub fn run(ctx: &RunContext, stages: &[Box<dyn Stage>], opts: &RunOptions) -> Result<()> {
    let from = opts.from.as_deref().map(|s| stage_index(stages, s, "--from")).transpose()?;
    let until =
        opts.until.as_deref().map(|s| stage_index(stages, s, "--until")).transpose()?.unwrap_or(stages.len() - 1);
    let lock = RunLock::acquire(&ctx.run_dir)?;
    util::write_atomic(&ctx.run_dir.join("recipe.resolved.toml"), ctx.recipe.resolved_toml().as_bytes())?;
    let rec_path = ctx.run_dir.join("tuner.lock.json");
    let mut rec: RunRecord = util::read_json(&rec_path).unwrap_or_default();
    rec.recipe_path = std::fs::canonicalize(&ctx.recipe.path).unwrap_or(ctx.recipe.path.clone()).display().to_string();
    rec.tuner_version = env!("CARGO_PKG_VERSION").into();
    rec.overrides = ctx.recipe.overrides.clone();
    rec.libtorch_version = util::libtorch_version();
    util::write_json_atomic(&rec_path, &rec)?;
    log::info!("run dir: {}", ctx.run_dir.display());
    for w in &ctx.recipe.warnings {
        log::warn!("{w}");
    }

    let mut upstream: Option<String> = None;
    for (i, stage) in stages.iter().enumerate().take(until + 1) {
        let name = stage.name();
        let dir = ctx.stage_dir(name);
        let inputs = stage.inputs(ctx).with_context(|| format!("stage `{name}`"))?;
        let fp = fingerprint(name, &inputs, upstream.as_deref());
        let forced = from.is_some_and(|f| i >= f);
        let existing = run_dir::read_manifest(&dir);
        if !forced && existing.as_ref().is_some_and(|m| m.fingerprint == fp) {
            eprintln!("{name}: up to date, skipped");
            upstream = Some(fp);
            continue;
        }
        if forced && dir.exists() {
            std::fs::remove_dir_all(&dir).with_context(|| format!("cannot clear {}", dir.display()))?;
        } else if existing.is_some() {
            eprintln!("{name}: inputs changed, running again");
            std::fs::remove_file(run_dir::manifest_path(&dir)).ok();
        } else if dir.exists() {
            eprintln!("{name}: resuming");
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
        lock.set_stage(name)?;
        eprintln!("{name}: running");
        let t0 = std::time::Instant::now();
        if let Some(d) = ctx.dist.as_ref().filter(|d| d.is_leader() && stage.distributed()) {
            d.announce(&crate::dist::Command::Stage { name: name.to_string(), fingerprint: fp.clone() })?;
        }
        let files = stage.run(ctx, &dir, &fp).with_context(|| format!("stage `{name}` failed"))?;
        let manifest = Manifest {
            stage: name.to_string(),
            format_version: FORMAT_VERSION,
            fingerprint: fp.clone(),
            inputs,
            artifacts: run_dir::describe_artifacts(&dir, &files)?,
            finished_unix: run_dir::now_unix(),
            tuner_version: env!("CARGO_PKG_VERSION").into(),
        };
        util::write_json_atomic(&run_dir::manifest_path(&dir), &manifest)?;
        eprintln!("{name}: done in {:.1}s", t0.elapsed().as_secs_f64());
        upstream = Some(fp);
    }
    lock.set_stage("")?;
    Ok(())
}

/// A stage's state as `tuner status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct StageStatus {
    pub name: String,
    /// missing | complete | stale | running | interrupted
    pub state: String,
    pub fingerprint: Option<String>,
    pub artifacts: Vec<String>,
}

/// The state of every stage of a run dir; with a recipe, fingerprints are compared too.
pub fn status(run_dir: &Path, stages: &[Box<dyn Stage>], ctx: Option<&RunContext>) -> Result<Vec<StageStatus>> {
    let lock = run_dir::read_lock(run_dir).filter(|l| run_dir::pid_alive(l.pid));
    let mut out = Vec::new();
    let mut upstream: Option<String> = None;
    for stage in stages {
        let name = stage.name();
        let dir = run_dir.join(name);
        let manifest = run_dir::read_manifest(&dir);
        let current_fp = match ctx {
            Some(c) => match stage.inputs(c) {
                Ok(inputs) => Some(fingerprint(name, &inputs, upstream.as_deref())),
                Err(_) => None,
            },
            _ => None,
        };
        let running = lock.as_ref().is_some_and(|l| l.stage == name);
        let state = if running {
            "running"
        } else if let Some(m) = &manifest {
            match &current_fp {
                Some(fp) if *fp != m.fingerprint => "stale",
                None if ctx.is_some() => "stale",
                _ => "complete",
            }
        } else if dir.is_dir() && std::fs::read_dir(&dir).map(|mut d| d.next().is_some()).unwrap_or(false) {
            "interrupted"
        } else {
            "missing"
        };
        upstream = current_fp;
        out.push(StageStatus {
            name: name.to_string(),
            state: state.to_string(),
            fingerprint: manifest.as_ref().map(|m| m.fingerprint.clone()),
            artifacts: manifest
                .map(|m| m.artifacts.iter().map(|a| dir.join(&a.path).display().to_string()).collect())
                .unwrap_or_default(),
        });
    }
    Ok(out)
}
