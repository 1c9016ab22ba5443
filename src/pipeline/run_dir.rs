//! The run dir on disk: the process lock, stage manifests and the run's records.
//!
//! Layout: `<run>/.lock` (pid of the process working here), `<run>/recipe.resolved.toml`,
//! `<run>/tuner.lock.json` (what the run actually used), and one folder per
//! stage holding its files and, written last and atomically, `manifest.json`.

use crate::util;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Bumped whenever a stage's on-disk format changes; part of every fingerprint.
pub const FORMAT_VERSION: u32 = 2;

/// One file a stage produced.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Artifact {
    /// Path relative to the stage folder.
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// Written atomically as a stage's last act: the stage is complete iff its
/// manifest exists and its fingerprint matches the current inputs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    pub stage: String,
    pub format_version: u32,
    /// sha256 over the stage's inputs (see `pipeline::fingerprint`).
    pub fingerprint: String,
    /// What went into the fingerprint, for humans.
    pub inputs: serde_json::Value,
    pub artifacts: Vec<Artifact>,
    pub finished_unix: u64,
    pub tuner_version: String,
}

/// Path of a stage's manifest.
pub fn manifest_path(stage_dir: &Path) -> PathBuf {
    stage_dir.join("manifest.json")
}

/// Read a stage's manifest, if it is there and parses.
pub fn read_manifest(stage_dir: &Path) -> Option<Manifest> {
    util::read_json(&manifest_path(stage_dir)).ok()
}

/// Hash the listed artifacts (paths relative to `stage_dir`).
pub fn describe_artifacts(stage_dir: &Path, files: &[PathBuf]) -> Result<Vec<Artifact>> {
    let mut out = Vec::new();
    for f in files {
        let full = if f.is_absolute() || f.starts_with(stage_dir) { f.clone() } else { stage_dir.join(f) };
        let rel = full.strip_prefix(stage_dir).unwrap_or(&full).to_string_lossy().into_owned();
        let size = fs::metadata(&full).with_context(|| format!("artifact {} is missing", full.display()))?.len();
        out.push(Artifact { path: rel, size, sha256: util::sha256_file(&full)? });
    }
    Ok(out)
}

/// Seconds since the epoch.
pub fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// What `.lock` holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LockInfo {
    pub pid: u32,
    pub started_unix: u64,
    /// The stage being worked on now ("" between stages).
    pub stage: String,
}

/// Whether a process with this pid is alive (signal 0 probes without signalling).
pub fn pid_alive(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    // SAFETY: kill with signal 0 only checks for existence and permission.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    r == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Read the lock of a run dir, if any.
pub fn read_lock(run_dir: &Path) -> Option<LockInfo> {
    util::read_json(&run_dir.join(".lock")).ok()
}

/// Held while a process works in a run dir; removed on drop.
#[derive(Debug)]
pub struct RunLock {
    path: PathBuf,
}

impl RunLock {
    /// Take the lock, refusing when a live process holds it and taking over a
    /// stale one (left by a dead process) with a message.
    pub fn acquire(run_dir: &Path) -> Result<RunLock> {
        fs::create_dir_all(run_dir).with_context(|| format!("cannot create run dir {}", run_dir.display()))?;
        let path = run_dir.join(".lock");
        for _ in 0..3 {
            match fs::OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(mut f) => {
                    let info = LockInfo { pid: std::process::id(), started_unix: now_unix(), stage: String::new() };
                    f.write_all(serde_json::to_string(&info)?.as_bytes())?;
                    f.sync_all().ok();
                    return Ok(RunLock { path });
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    match util::read_json::<LockInfo>(&path) {
                        Ok(info) if info.pid == std::process::id() => {
                            bail!("run dir {} is already locked by this process", run_dir.display())
                        }
                        Ok(info) if pid_alive(info.pid) => bail!(
                            "run dir {} is in use by another tuner process (pid {}); wait for it or stop it",
                            run_dir.display(),
                            info.pid
                        ),
                        Ok(info) => log::warn!(
                            "taking over a stale lock in {} left by pid {} (no longer running)",
                            run_dir.display(),
                            info.pid
                        ),
                        Err(_) => {
                            // A lock being written right now is briefly empty: give it a moment.
                            std::thread::sleep(std::time::Duration::from_millis(200));
                            if let Some(info) = read_lock(run_dir) {
                                if pid_alive(info.pid) {
                                    continue;
                                }
                            }
                            log::warn!("taking over an unreadable lock in {}", run_dir.display());
                        }
                    }
                    fs::remove_file(&path).ok();
                }
                Err(e) => return Err(e).with_context(|| format!("cannot create {}", path.display())),
            }
        }
        bail!("could not take the lock {}", path.display())
    }

    /// Record which stage is running, for `tuner status`.
    pub fn set_stage(&self, stage: &str) -> Result<()> {
        let mut info = util::read_json::<LockInfo>(&self.path)?;
        info.stage = stage.to_string();
        util::write_json_atomic(&self.path, &info)
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        fs::remove_file(&self.path).ok();
    }
}
