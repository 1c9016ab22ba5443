//! Training checkpoints, crash-safe: each is written as `step-NNNNNN.tmp/`, then
//! renamed to `step-NNNNNN/`, with `progress.json` written last inside it (after
//! llm.c's write-then-rename and DONE-last). A folder without progress.json is
//! never resumed from. The newest `keep` are kept.

use crate::train::data::Cursor;
use crate::util;
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::Tensor;

/// Everything besides tensors that a resumed run needs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    /// Optimizer steps completed.
    pub step: u64,
    pub total_steps: u64,
    pub cursor: Cursor,
    /// The train stage fingerprint this checkpoint belongs to.
    pub fingerprint: String,
    /// How randomness is reproduced: every RNG draw is seeded from (run.seed, step,
    /// micro-batch, layer) and the data order from (run.seed, epoch), so the
    /// seed and the cursor are the whole RNG state.
    pub rng: String,
    pub seed: u64,
    /// Optimizer step counter (bias correction).
    pub optimizer_step: u64,
    /// fp16 loss scale, if used.
    pub loss_scale: f64,
    /// Written by a multi-process run only (absent, and so unchanged, for one process).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub world: Option<World>,
}

/// The world a multi-process checkpoint was written by, and each rank's place in the data
/// stream and its RNG. Every rank reads the same shared cursor (`Progress::cursor`) and
/// trains the `rank`-th block of each step's micro-batches, so its next micro-batch is a
/// function of the cursor; its dropout seed is derived from `run.seed` and the rank.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct World {
    pub world_size: usize,
    pub micro_batch_size: usize,
    pub accum_per_rank: usize,
    pub effective_batch: usize,
    pub ranks: Vec<RankState>,
}

/// One rank's data position and RNG at a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RankState {
    pub rank: usize,
    /// The shared cursor (every rank holds the same).
    pub cursor: Cursor,
    /// The rank's first micro-batch within each step's `accum_per_rank × world_size`.
    pub first_micro_in_step: usize,
    /// The seed its dropout masks are drawn from (mixed with step, micro-batch and layer).
    pub dropout_seed: u64,
}

impl World {
    /// The record for a run of `world_size` processes at `cursor`.
    pub fn of(world_size: usize, b: &crate::recipe::Batching, seed: u64, cursor: Cursor) -> World {
        World {
            world_size,
            micro_batch_size: b.micro_batch_size,
            accum_per_rank: b.accum_per_rank,
            effective_batch: b.effective_batch(),
            ranks: (0..world_size)
                .map(|rank| RankState {
                    rank,
                    cursor,
                    first_micro_in_step: rank * b.accum_per_rank,
                    dropout_seed: crate::dist::dropout_seed(seed, rank),
                })
                .collect(),
        }
    }
}

/// Refuse to resume a checkpoint written by another number of processes: the effective
/// batch, the data split and the dropout streams would change mid-run.
pub fn check_world(p: &Progress, path: &Path, world_size: usize, b: &crate::recipe::Batching) -> anyhow::Result<()> {
    let theirs = p.world.as_ref().map(|w| w.world_size).unwrap_or(1);
    if theirs != world_size {
        let eff =
            p.world.as_ref().map(|w| w.effective_batch.to_string()).unwrap_or_else(|| "that of one process".into());
        anyhow::bail!(
            "{}: this checkpoint (step {}) was written by {theirs} process(es) (effective batch {eff}); this run has {world_size} (effective batch {}). \
             Resume with the same number of processes (`--gpus {theirs}`), or train afresh with `--from train`",
            path.display(),
            p.step,
            b.effective_batch()
        );
    }
    Ok(())
}

/// The checkpoints folder of a train stage dir.
pub fn dir(stage_dir: &Path) -> PathBuf {
    stage_dir.join("checkpoints")
}

fn name(step: u64) -> String {
    format!("step-{step:06}")
}

/// Write a checkpoint atomically and prune old ones.
pub fn save(
    stage_dir: &Path,
    p: &Progress,
    adapter: &[(String, Tensor)],
    optim: &[(String, Tensor)],
    keep: usize,
) -> Result<PathBuf> {
    let root = dir(stage_dir);
    std::fs::create_dir_all(&root)?;
    let final_dir = root.join(name(p.step));
    let tmp = root.join(format!("{}.tmp", name(p.step)));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    let cpu = |v: &[(String, Tensor)]| -> Vec<(String, Tensor)> {
        v.iter().map(|(n, t)| (n.clone(), t.to_device(tch::Device::Cpu).contiguous())).collect()
    };
    Tensor::write_safetensors(&cpu(adapter), tmp.join("adapter.safetensors"))
        .context("cannot write adapter weights")?;
    Tensor::write_safetensors(&cpu(optim), tmp.join("optimizer.safetensors"))
        .context("cannot write optimizer state")?;
    util::write_json_atomic(&tmp.join("progress.json"), p)?;
    for f in ["adapter.safetensors", "optimizer.safetensors"] {
        if let Ok(file) = std::fs::File::open(tmp.join(f)) {
            file.sync_all().ok();
        }
    }
    if final_dir.exists() {
        std::fs::remove_dir_all(&final_dir)?;
    }
    std::fs::rename(&tmp, &final_dir).with_context(|| format!("cannot rename {} into place", tmp.display()))?;
    if let Ok(d) = std::fs::File::open(&root) {
        d.sync_all().ok();
    }
    let mut all = list(stage_dir);
    while all.len() > keep.max(1) {
        let (_, old) = all.remove(0);
        std::fs::remove_dir_all(&old).ok();
    }
    Ok(final_dir)
}

/// Complete checkpoints (those with progress.json), oldest first.
pub fn list(stage_dir: &Path) -> Vec<(Progress, PathBuf)> {
    let mut out: Vec<(Progress, PathBuf)> = std::fs::read_dir(dir(stage_dir))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.path())
                .filter(|p| p.is_dir() && !p.to_string_lossy().ends_with(".tmp"))
                .filter_map(|p| util::read_json::<Progress>(&p.join("progress.json")).ok().map(|pr| (pr, p)))
                .collect()
        })
        .unwrap_or_default();
    out.sort_by_key(|(p, _)| p.step);
    out
}

/// Tensors by name, as safetensors files hold them.
pub type NamedTensors = Vec<(String, Tensor)>;

/// Load the tensors of a checkpoint: (adapter, optimizer state).
pub fn load(path: &Path) -> Result<(NamedTensors, NamedTensors)> {
    let a = Tensor::read_safetensors(path.join("adapter.safetensors"))
        .with_context(|| format!("{}: cannot read adapter weights", path.display()))?;
    let o = Tensor::read_safetensors(path.join("optimizer.safetensors"))
        .with_context(|| format!("{}: cannot read optimizer state", path.display()))?;
    Ok((a, o))
}
