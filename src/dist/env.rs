//! Where this process stands in a multi-process run, read from the environment the way
//! the launchers set it: torchrun (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `LOCAL_WORLD_SIZE`,
//! `MASTER_ADDR`, `MASTER_PORT`), Slurm's `srun` (`SLURM_PROCID`, `SLURM_NTASKS`,
//! `SLURM_LOCALID`, `SLURM_NTASKS_PER_NODE`, the master from `MASTER_ADDR` or the first host
//! of `SLURM_JOB_NODELIST`), and `tuner run --gpus N`, which sets torchrun's variables plus
//! `TUNER_DIST_STORE=file:PATH` (a FileStore in the run dir instead of a TCP port). Under
//! torchrun's elastic agent (`TORCHELASTIC_USE_AGENT_STORE=True`) the agent already serves
//! the store on MASTER_PORT and every rank connects as a client, as torch.distributed does.
//!
//! A pure function of a variable lookup, so the CLI reads the real environment once and
//! tests pass maps.

use anyhow::{bail, Result};
use std::path::PathBuf;

/// How the ranks find each other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rendezvous {
    /// c10d TCPStore on `host:port`, served by rank 0 (`serve` on rank 0), or by torchrun's
    /// agent when it says so (`TORCHELASTIC_USE_AGENT_STORE=True`: every rank is a client).
    /// Keys go under `prefix` (`tuner/<TORCHELASTIC_RESTART_COUNT>/`), so a restarted attempt
    /// never reads the last one's.
    Tcp { host: String, port: u16, serve: bool, prefix: String },
    /// c10d FileStore at this path (one host).
    File(PathBuf),
}

/// This process's place in the world.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorldEnv {
    pub rank: usize,
    pub world_size: usize,
    /// Rank on this host: the CUDA device index this process trains on.
    pub local_rank: usize,
    pub local_world_size: usize,
    pub rendezvous: Rendezvous,
    /// "tuner --gpus", "torchrun" or "slurm".
    pub launcher: &'static str,
}

/// The default c10d port (torchrun's).
pub const DEFAULT_PORT: u16 = 29500;

fn parse<T: std::str::FromStr>(name: &str, v: &str) -> Result<T> {
    match v.trim().parse() {
        Ok(x) => Ok(x),
        Err(_) => bail!("environment variable {name}={v:?}: expected a non-negative integer"),
    }
}

/// The first host of a Slurm node list: `gpu[03-04,07]` → `gpu03`, `a,b` → `a`.
pub fn first_host(nodelist: &str) -> Option<String> {
    let s = nodelist.trim();
    let head_end = s.find([',', '[']).unwrap_or(s.len());
    let head = &s[..head_end];
    if s[head_end..].starts_with('[') {
        let inside = &s[head_end + 1..];
        let first = inside.split([',', '-', ']']).next()?;
        return (!first.is_empty()).then(|| format!("{head}{first}"));
    }
    (!head.is_empty()).then(|| head.to_string())
}

/// Slurm's `SLURM_NTASKS_PER_NODE`: `4` or `4(x2)` or `4(x2),3` → the first count.
fn tasks_per_node(v: &str) -> Option<usize> {
    v.split([',', '(']).next()?.trim().parse().ok()
}

/// This process's world, or None when it runs alone (no variables, or a world of 1).
pub fn from_env(get: impl Fn(&str) -> Option<String>) -> Result<Option<WorldEnv>> {
    let req = |name: &str, why: &str| -> Result<String> {
        match get(name) {
            Some(v) if !v.trim().is_empty() => Ok(v),
            _ => bail!("environment variable {name} is not set; {why}"),
        }
    };
    if let Some(world) = get("WORLD_SIZE") {
        let world_size: usize = parse("WORLD_SIZE", &world)?;
        if world_size <= 1 {
            return Ok(None);
        }
        let why = format!("WORLD_SIZE={world_size} asks for a multi-process run (torchrun sets RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT)");
        let rank: usize = parse("RANK", &req("RANK", &why)?)?;
        let local_rank: usize = match get("LOCAL_RANK") {
            Some(v) => parse("LOCAL_RANK", &v)?,
            None => bail!("environment variable LOCAL_RANK is not set; {why}"),
        };
        let local_world_size: usize = match get("LOCAL_WORLD_SIZE") {
            Some(v) => parse("LOCAL_WORLD_SIZE", &v)?,
            None => world_size,
        };
        let (rendezvous, launcher) = match get("TUNER_DIST_STORE") {
            Some(v) => match v.strip_prefix("file:") {
                Some(p) if !p.is_empty() => (Rendezvous::File(PathBuf::from(p)), "tuner --gpus"),
                _ => bail!("environment variable TUNER_DIST_STORE={v:?}: expected file:PATH"),
            },
            None => {
                let host = req("MASTER_ADDR", &why)?;
                let port: u16 = parse("MASTER_PORT", &req("MASTER_PORT", &why)?)?;
                let agent = get("TORCHELASTIC_USE_AGENT_STORE").is_some_and(|v| v.eq_ignore_ascii_case("true"));
                let attempt = get("TORCHELASTIC_RESTART_COUNT").unwrap_or_else(|| "0".into());
                (
                    Rendezvous::Tcp {
                        host,
                        port,
                        serve: rank == 0 && !agent,
                        prefix: format!("tuner/{}/", attempt.trim()),
                    },
                    "torchrun",
                )
            }
        };
        return check(WorldEnv { rank, world_size, local_rank, local_world_size, rendezvous, launcher }).map(Some);
    }
    if let (Some(procid), Some(ntasks)) = (get("SLURM_PROCID"), get("SLURM_NTASKS")) {
        let world_size: usize = parse("SLURM_NTASKS", &ntasks)?;
        if world_size <= 1 {
            return Ok(None);
        }
        let why = format!("SLURM_NTASKS={world_size} asks for a multi-process run (launch one task per GPU with srun)");
        let rank: usize = parse("SLURM_PROCID", &procid)?;
        let local_rank: usize = parse("SLURM_LOCALID", &req("SLURM_LOCALID", &why)?)?;
        let local_world_size = get("SLURM_NTASKS_PER_NODE").and_then(|v| tasks_per_node(&v)).unwrap_or(world_size);
        let host = match get("MASTER_ADDR") {
            Some(h) if !h.trim().is_empty() => h,
            _ => {
                let list = get("SLURM_JOB_NODELIST").or_else(|| get("SLURM_NODELIST"));
                match list.as_deref().and_then(first_host) {
                    Some(h) => h,
                    None => {
                        bail!("environment variable MASTER_ADDR is not set and SLURM_JOB_NODELIST names no host; {why}")
                    }
                }
            }
        };
        let port = match get("MASTER_PORT") {
            Some(v) => parse("MASTER_PORT", &v)?,
            None => DEFAULT_PORT,
        };
        let rendezvous = Rendezvous::Tcp { host, port, serve: rank == 0, prefix: "tuner/0/".into() };
        return check(WorldEnv { rank, world_size, local_rank, local_world_size, rendezvous, launcher: "slurm" })
            .map(Some);
    }
    Ok(None)
}

fn check(w: WorldEnv) -> Result<WorldEnv> {
    if w.rank >= w.world_size {
        bail!(
            "rank {} is outside a world of {} processes (RANK/SLURM_PROCID must be below WORLD_SIZE/SLURM_NTASKS)",
            w.rank,
            w.world_size
        );
    }
    if w.local_rank >= w.local_world_size.max(1) {
        bail!(
            "local rank {} is outside the {} processes of this host (LOCAL_RANK must be below LOCAL_WORLD_SIZE)",
            w.local_rank,
            w.local_world_size
        );
    }
    Ok(w)
}
