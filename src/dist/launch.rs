//! `tuner run RECIPE --gpus N` (or `[train] gpus = N`): one worker process per GPU on this
//! host, like torchrun's local launcher (torch/distributed/run.py): each worker is this
//! same binary with the same arguments and torchrun's variables (`RANK`, `WORLD_SIZE`,
//! `LOCAL_RANK`, `LOCAL_WORLD_SIZE`) plus `TUNER_DIST_STORE=file:<run dir>/.dist/store-PID`,
//! the rendezvous file, and `OMP_NUM_THREADS` = cores / N unless set. The launcher trains nothing; it watches the workers. When one
//! fails or dies, it stops the others (SIGTERM, then SIGKILL after a grace period), says
//! which rank died and how, and exits non-zero; the next `tuner run` resumes from the
//! newest checkpoint that rank 0 wrote.

use crate::error::Failure;
use anyhow::{bail, Context, Result};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

/// How long stopped workers get between SIGTERM and SIGKILL.
const GRACE: Duration = Duration::from_secs(10);

fn describe(s: ExitStatus) -> String {
    match (s.code(), s.signal()) {
        (Some(c), _) => format!("exited with status {c}"),
        (None, Some(sig)) => {
            format!("was killed by signal {sig}{}", if sig == libc::SIGKILL { " (SIGKILL)" } else { "" })
        }
        _ => "ended".into(),
    }
}

fn stop_all(children: &mut [(usize, Child)], done: &mut [Option<ExitStatus>]) {
    for (i, (_, c)) in children.iter().enumerate() {
        if done[i].is_none() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        }
    }
    let t0 = Instant::now();
    while done.iter().any(Option::is_none) && t0.elapsed() < GRACE {
        for (i, (_, c)) in children.iter_mut().enumerate() {
            if done[i].is_none() {
                done[i] = c.try_wait().ok().flatten();
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for (i, (_, c)) in children.iter_mut().enumerate() {
        if done[i].is_none() {
            c.kill().ok();
            done[i] = c.wait().ok();
        }
    }
}

/// Spawn `n` workers of this binary with this process's arguments and wait for them.
pub fn run(n: usize, run_dir: &Path) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find the tuner binary to start workers")?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let dist_dir = run_dir.join(".dist");
    std::fs::create_dir_all(&dist_dir).with_context(|| format!("cannot create {}", dist_dir.display()))?;
    let store = dist_dir.join(format!("store-{}", std::process::id()));
    std::fs::remove_file(&store).ok();
    eprintln!("launch: {n} worker processes (one per GPU), rendezvous file {}", store.display());
    // torchrun's rule against oversubscription: unless OMP_NUM_THREADS is set, each worker
    // gets its share of the cores for libtorch's CPU threads.
    let cores = std::thread::available_parallelism().map(|c| c.get()).unwrap_or(1);
    let omp = std::env::var("OMP_NUM_THREADS").unwrap_or_else(|_| (cores / n).max(1).to_string());
    let mut children: Vec<(usize, Child)> = vec![];
    for rank in 0..n {
        let child = Command::new(&exe)
            .args(&args)
            .env("OMP_NUM_THREADS", &omp)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_RANK", rank.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("TUNER_DIST_STORE", format!("file:{}", store.display()))
            .spawn();
        match child {
            Ok(c) => children.push((rank, c)),
            Err(e) => {
                let mut done = vec![None; children.len()];
                stop_all(&mut children, &mut done);
                bail!("cannot start worker rank {rank}: {e}");
            }
        }
    }
    let mut done: Vec<Option<ExitStatus>> = vec![None; n];
    let poll = |children: &mut [(usize, Child)], done: &mut [Option<ExitStatus>]| -> Result<()> {
        for (i, (_, c)) in children.iter_mut().enumerate() {
            if done[i].is_none() {
                done[i] = c.try_wait().context("cannot wait for a worker")?;
            }
        }
        Ok(())
    };
    let result = loop {
        poll(&mut children, &mut done)?;
        // Ctrl-C reaches every worker: each finishes the same step (the stop flag is
        // all-reduced), rank 0 checkpoints, all exit 130. Those are waited for, not stopped.
        let failed = |d: &Option<ExitStatus>| d.is_some_and(|s| !s.success() && s.code() != Some(130));
        if done.iter().any(failed) {
            // Name the cause among the failures seen first: a killed worker before one that
            // exited with an error (a follower fails after rank 0 has), then the lowest rank.
            let mut bad: Vec<usize> = (0..n).filter(|&i| failed(&done[i])).collect();
            bad.sort_by_key(|&i| (done[i].and_then(|s| s.signal()).is_none(), i));
            let i = bad[0];
            let s = done[i].expect("failed worker has a status");
            let (rank, pid) = (children[i].0, children[i].1.id());
            let others = done.iter().filter(|d| d.is_none()).count();
            stop_all(&mut children, &mut done);
            eprintln!(
                "launch: worker rank {rank} (pid {pid}) {}; stopped the other {others} running worker(s)",
                describe(s)
            );
            break Err(anyhow::anyhow!(
                "worker rank {rank} (pid {pid}) {}; the other workers were stopped. The newest checkpoint is kept: run the same command again to resume",
                describe(s)
            ));
        }
        if done.iter().all(Option::is_some) {
            if done.iter().any(|d| d.is_some_and(|s| s.code() == Some(130))) {
                break Err(Failure::Interrupted(
                    "the workers stopped after Ctrl-C; run the same command again to resume".into(),
                )
                .into());
            }
            break Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    std::fs::remove_file(&store).ok();
    result
}
