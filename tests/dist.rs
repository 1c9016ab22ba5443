//! Data parallel (src/dist): environment parsing (torchrun, Slurm, our launcher), the
//! rank split of each step's micro-batches, gradient buckets, batching rules, and real
//! two-process runs on the CPU over libtorch's c10d gloo backend (the same launcher,
//! store, leader/follower protocol and gradient path as NCCL on GPUs): the loss curve
//! equals one process's at the same effective batch, evaluate on two ranks equals one,
//! a killed worker stops the run, another world size is refused, and a rerun resumes to
//! the uninterrupted adapter.

use crate::common::*;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tch::Kind;
use tuner::dist::env::{first_host, from_env, Rendezvous, WorldEnv};

fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
    let m: HashMap<String, String> = pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    move |k| m.get(k).cloned()
}

#[test]
fn torchrun_slurm_and_launcher_variables_give_the_world() {
    assert_eq!(from_env(env_of(&[])).unwrap(), None);
    assert_eq!(
        from_env(env_of(&[("WORLD_SIZE", "1"), ("RANK", "0")])).unwrap(),
        None,
        "a world of one is the single-process path"
    );
    let w = from_env(env_of(&[
        ("RANK", "3"),
        ("WORLD_SIZE", "8"),
        ("LOCAL_RANK", "1"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("MASTER_ADDR", "n0"),
        ("MASTER_PORT", "29501"),
    ]))
    .unwrap();
    assert_eq!(
        w,
        Some(WorldEnv {
            rank: 3,
            world_size: 8,
            local_rank: 1,
            local_world_size: 2,
            rendezvous: Rendezvous::Tcp { host: "n0".into(), port: 29501, serve: false, prefix: "tuner/0/".into() },
            launcher: "torchrun"
        })
    );
    let w = from_env(env_of(&[
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_RANK", "1"),
        ("TUNER_DIST_STORE", "file:/r/.dist/store-9"),
    ]))
    .unwrap()
    .unwrap();
    assert_eq!(w.rendezvous, Rendezvous::File(PathBuf::from("/r/.dist/store-9")));
    assert_eq!((w.local_world_size, w.launcher), (2, "tuner --gpus"));
    let w = from_env(env_of(&[
        ("SLURM_PROCID", "5"),
        ("SLURM_NTASKS", "8"),
        ("SLURM_LOCALID", "1"),
        ("SLURM_NTASKS_PER_NODE", "4(x2)"),
        ("SLURM_JOB_NODELIST", "gpu[07-08]"),
    ]))
    .unwrap()
    .unwrap();
    assert_eq!(
        w,
        WorldEnv {
            rank: 5,
            world_size: 8,
            local_rank: 1,
            local_world_size: 4,
            rendezvous: Rendezvous::Tcp { host: "gpu07".into(), port: 29500, serve: false, prefix: "tuner/0/".into() },
            launcher: "slurm"
        }
    );
    // Rank 0 serves the store, unless torchrun's elastic agent already does; restarts get their own keys.
    let base = [("WORLD_SIZE", "2"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "7")];
    let tcp = |extra: &[(&str, &str)]| from_env(env_of(&[&base[..], extra].concat())).unwrap().unwrap().rendezvous;
    assert_eq!(
        tcp(&[("RANK", "0")]),
        Rendezvous::Tcp { host: "h".into(), port: 7, serve: true, prefix: "tuner/0/".into() }
    );
    assert_eq!(
        tcp(&[("RANK", "0"), ("TORCHELASTIC_USE_AGENT_STORE", "True"), ("TORCHELASTIC_RESTART_COUNT", "2")]),
        Rendezvous::Tcp { host: "h".into(), port: 7, serve: false, prefix: "tuner/2/".into() }
    );
    // torchrun's variables win over Slurm's (torchrun inside an allocation).
    let w = from_env(env_of(&[
        ("SLURM_PROCID", "0"),
        ("SLURM_NTASKS", "1"),
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "h"),
        ("MASTER_PORT", "1"),
    ]))
    .unwrap()
    .unwrap();
    assert_eq!((w.rank, w.launcher), (1, "torchrun"));
}

#[test]
fn incomplete_or_bad_variables_are_named() {
    let err = |pairs: &[(&str, &str)]| format!("{:#}", from_env(env_of(pairs)).unwrap_err());
    let e = err(&[("WORLD_SIZE", "2"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")]);
    assert!(e.contains("environment variable RANK is not set; WORLD_SIZE=2 asks for a multi-process run"), "{e}");
    let e = err(&[("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("MASTER_PORT", "1")]);
    assert!(e.contains("MASTER_ADDR is not set"), "{e}");
    let e = err(&[("WORLD_SIZE", "two")]);
    assert!(e.contains("WORLD_SIZE=\"two\": expected a non-negative integer"), "{e}");
    let e = err(&[("WORLD_SIZE", "2"), ("RANK", "2"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")]);
    assert!(e.contains("rank 2 is outside a world of 2 processes"), "{e}");
    let e =
        err(&[("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "99999")]);
    assert!(e.contains("MASTER_PORT=\"99999\""), "{e}");
    let e = err(&[("SLURM_PROCID", "0"), ("SLURM_NTASKS", "2"), ("SLURM_LOCALID", "0")]);
    assert!(e.contains("MASTER_ADDR is not set and SLURM_JOB_NODELIST names no host"), "{e}");
    let e = err(&[("WORLD_SIZE", "2"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("TUNER_DIST_STORE", "tcp:x")]);
    assert!(e.contains("TUNER_DIST_STORE=\"tcp:x\": expected file:PATH"), "{e}");
    // A bad environment is a usage error of `tuner run` (exit 2), before anything runs.
    let d = tmp();
    let r = train_recipe(d.path(), "");
    let out = tuner()
        .args(["run", r.to_str().unwrap(), "--until", "fetch"])
        .env("WORLD_SIZE", "2")
        .env("RANK", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("LOCAL_RANK is not set"));
}

#[test]
fn slurm_node_lists_give_their_first_host() {
    assert_eq!(first_host("gpu[03-04,07]").as_deref(), Some("gpu03"));
    assert_eq!(first_host("a01,b02").as_deref(), Some("a01"));
    assert_eq!(first_host("node-7").as_deref(), Some("node-7"));
    assert_eq!(first_host("n[1,3]").as_deref(), Some("n1"));
    assert_eq!(first_host(""), None);
}

#[test]
fn ranks_partition_each_steps_micro_batches_and_rank_0_keeps_the_seed() {
    for (world, per_rank) in [(1, 4), (2, 2), (4, 1), (3, 5)] {
        let mut seen: Vec<usize> = (0..world).flat_map(|r| tuner::dist::shard_range(r, per_rank)).collect();
        seen.sort();
        assert_eq!(seen, (0..world * per_rank).collect::<Vec<_>>(), "world {world}");
    }
    assert_eq!(tuner::dist::shard_range(1, 3), 3..6);
    assert_eq!(tuner::dist::dropout_seed(7, 0), 7, "a world of one draws the same masks as before");
    let seeds: Vec<u64> = (0..4).map(|r| tuner::dist::dropout_seed(7, r)).collect();
    assert_eq!(seeds, (0..4).map(|r| tuner::dist::dropout_seed(7, r)).collect::<Vec<_>>(), "deterministic");
    assert!(seeds[1] != seeds[2] && seeds[1] != 7 && seeds[3] != seeds[2]);
}

#[test]
fn gradient_buckets_keep_dtypes_apart_and_respect_the_cap() {
    let items = [
        (Kind::Float, 10),
        (Kind::Float, 10),
        (Kind::BFloat16, 4),
        (Kind::Float, 30),
        (Kind::Float, 5),
        (Kind::BFloat16, 4),
    ];
    assert_eq!(tuner::dist::buckets(&items, 20), vec![vec![0, 1], vec![3], vec![4], vec![2, 5]]);
    assert_eq!(tuner::dist::buckets(&items, 1 << 20), vec![vec![0, 1, 3, 4], vec![2, 5]]);
    assert_eq!(tuner::dist::buckets(&[], 8), Vec::<Vec<usize>>::new());
}

#[test]
fn effective_batch_is_micro_times_accumulation_times_processes() {
    let mut t =
        tuner::recipe::TrainSection { micro_batch_size: 4, gradient_accumulation_steps: 4, ..Default::default() };
    let b = tuner::recipe::batching(&t, 2).unwrap();
    assert_eq!((b.accum_per_rank, b.micro_per_step(), b.effective_batch()), (4, 8, 32));
    t.keep_effective_batch = true;
    let b = tuner::recipe::batching(&t, 2).unwrap();
    assert_eq!((b.accum_per_rank, b.micro_per_step(), b.effective_batch()), (2, 4, 16));
    assert_eq!(tuner::recipe::batching(&t, 1).unwrap().effective_batch(), 16);
    let e = tuner::recipe::batching(&t, 3).unwrap_err();
    assert!(e.contains("train.keep_effective_batch = true needs train.gradient_accumulation_steps (4) to be a multiple of the number of processes (3)"), "{e}");

    // `tuner validate` names the keys; so does `tuner run --gpus` before starting anything.
    let d = tmp();
    let r = train_recipe(d.path(), "keep_effective_batch = true");
    let (code, _, err) = run(&["validate", r.to_str().unwrap(), "--set", "train.gpus=3"]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(
            "train.keep_effective_batch: train.keep_effective_batch = true needs train.gradient_accumulation_steps (2)"
        ),
        "{err}"
    );
    let (code, _, err) =
        run(&["validate", r.to_str().unwrap(), "--set", "train.gpus=2", "--set", "train.device=\"cuda:1\""]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("train.device: \"cuda:1\" names one GPU, but train.gpus = 2"), "{err}");
    let (code, _, err) = run(&["validate", r.to_str().unwrap(), "--set", "train.gpus=0"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("train.gpus"), "{err}");
    let (code, _, err) = run(&["run", r.to_str().unwrap(), "--gpus", "3"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("a multiple of the number of processes (3)"), "{err}");
    assert!(!d.path().join("runs/t/fetch").exists(), "nothing ran");
}

#[test]
fn generated_texts_come_back_in_batch_order() {
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    // 7 prompts, batch 2, 2 ranks: rank 0 did batches 0 and 2 (a,b,e,f), rank 1 batches 1 and 3 (c,d,g).
    let out = tuner::evaluate::interleave_batches(vec![s(&["a", "b", "e", "f"]), s(&["c", "d", "g"])], 2);
    assert_eq!(out, s(&["a", "b", "c", "d", "e", "f", "g"]));
    assert_eq!(tuner::evaluate::interleave_batches(vec![s(&["a"]), vec![]], 2), s(&["a"]));
}

// ---- two processes on the CPU (gloo) ----

fn metrics(run_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(run_dir.join("train/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn cpu_recipe(dir: &Path, extra: &str) -> PathBuf {
    train_recipe(dir, &format!("device = \"cpu\"\n{extra}"))
}

#[test]
fn two_cpu_processes_follow_one_process_at_the_same_effective_batch() {
    let d = tmp();
    let r = cpu_recipe(d.path(), "");
    let r = r.to_str().unwrap();
    let (one, two) = (d.path().join("one"), d.path().join("two"));
    let (one_s, two_s) = (one.to_str().unwrap(), two.to_str().unwrap());
    // One process, accumulation 4 (effective batch 16) …
    let (code, _, err) =
        run(&["run", r, "--until", "train", "--run-dir", one_s, "--set", "train.gradient_accumulation_steps=4"]);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("dist:"), "one process is the plain path: {err}");
    // … and two processes keeping that effective batch (accumulation 4 / 2 per process).
    let (code, _, err) = run(&[
        "run",
        r,
        "--until",
        "train",
        "--run-dir",
        two_s,
        "--gpus",
        "2",
        "--set",
        "train.gradient_accumulation_steps=4",
        "--set",
        "train.keep_effective_batch=true",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("launch: 2 worker processes"), "{err}");
    assert!(
        err.contains("dist: rank 1 of 2") && err.contains("gloo on Cpu") && err.contains("collective timeout 600s"),
        "{err}"
    );
    assert!(err.contains("effective batch 16 = micro-batch 4 × accumulation 2 × 2 processes"), "{err}");
    let (a, b) = (metrics(&one), metrics(&two));
    assert_eq!(a.len(), 6);
    assert_eq!(b.len(), 6, "rank 0 alone writes metrics");
    for (x, y) in a.iter().zip(&b) {
        let (lx, ly) = (x["loss"].as_f64().unwrap(), y["loss"].as_f64().unwrap());
        assert!((lx - ly).abs() < 1e-6 * lx.abs(), "step {}: loss {lx} vs {ly}", x["step"]);
        let (gx, gy) = (x["grad_norm"].as_f64().unwrap(), y["grad_norm"].as_f64().unwrap());
        assert!((gx - gy).abs() < 1e-5 * gx.abs(), "step {}: grad norm {gx} vs {gy}", x["step"]);
        assert_eq!(x["trained_tokens"], y["trained_tokens"], "the same examples per step");
        assert_eq!(y["world_size"], 2);
        assert_eq!(y["effective_batch"], 16);
        assert!(x.get("world_size").is_none());
    }
    assert!(a[5]["loss"].as_f64().unwrap() < a[0]["loss"].as_f64().unwrap());
    // The checkpoints say who wrote them; one process's do not change.
    let two: Value = serde_json::from_str(
        &std::fs::read_to_string(two.join("train/checkpoints/step-000006/progress.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(two["world"]["world_size"], 2);
    assert_eq!(two["world"]["effective_batch"], 16);
    assert_eq!(two["world"]["ranks"][1]["first_micro_in_step"], 2);
    assert_eq!(two["world"]["ranks"][0]["dropout_seed"], 7);
    let one: Value = serde_json::from_str(
        &std::fs::read_to_string(one.join("train/checkpoints/step-000006/progress.json")).unwrap(),
    )
    .unwrap();
    assert!(one.get("world").is_none(), "{one}");
}

#[test]
fn evaluate_on_two_processes_reports_what_one_does() {
    let d = tmp();
    let r = cpu_recipe(d.path(), "max_steps = 2\n\n[eval]\nmax_samples = 5\nmax_new_tokens = 6\nbatch_size = 2");
    let text = std::fs::read_to_string(&r).unwrap().replace("max_steps = 6\n", "");
    std::fs::write(&r, text).unwrap();
    let r = r.to_str().unwrap();
    let (code, _, err) = run(&[
        "run",
        r,
        "--until",
        "evaluate",
        "--run-dir",
        d.path().join("one").to_str().unwrap(),
        "--set",
        "train.gradient_accumulation_steps=4",
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, _, err) =
        run(&["run", r, "--until", "evaluate", "--gpus", "2", "--run-dir", d.path().join("two").to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let report = |p: &str| -> Value {
        serde_json::from_str(&std::fs::read_to_string(d.path().join(p).join("evaluate/report.json")).unwrap()).unwrap()
    };
    let (a, b) = (report("one"), report("two"));
    for phase in ["before", "after"] {
        let (x, y) = (a[phase]["eval_loss"].as_f64().unwrap(), b[phase]["eval_loss"].as_f64().unwrap());
        assert!((x - y).abs() < 1e-6 * x, "{phase}: {x} vs {y}");
    }
    assert_eq!(
        a["before"]["eval_loss"], b["before"]["eval_loss"],
        "the base model's loss: same batches, summed over ranks"
    );
    assert_eq!(a["samples"], b["samples"], "generations gathered back in order");
    assert_eq!(b["generation_samples"], 5);
}

fn worker_pids(launcher: u32) -> Vec<i32> {
    std::fs::read_to_string(format!("/proc/{launcher}/task/{launcher}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

fn adapter_bytes(run_dir: &Path) -> Vec<u8> {
    std::fs::read(run_dir.join("train/adapter/adapter_model.safetensors")).unwrap()
}

#[test]
fn a_killed_worker_stops_the_run_and_the_rerun_resumes_on_the_same_world_size() {
    // Uninterrupted two-process reference.
    let d1 = tmp();
    let r1 = cpu_recipe(d1.path(), "");
    let (code, _, err) = run(&["run", r1.to_str().unwrap(), "--until", "train", "--gpus", "2"]);
    assert_eq!(code, 0, "{err}");
    let reference = adapter_bytes(&d1.path().join("runs/t"));

    // Kill rank 1 with SIGKILL once rank 0 has written the step-2 checkpoint.
    let d2 = tmp();
    let r2 = cpu_recipe(d2.path(), "");
    let r2 = r2.to_str().unwrap();
    let ck = d2.path().join("runs/t/train/checkpoints/step-000002/progress.json");
    let child = tuner()
        .args(["run", r2, "--until", "train", "--gpus", "2"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while !ck.exists() && t0.elapsed().as_secs() < 120 {
        std::thread::sleep(Duration::from_millis(2));
    }
    let pids = worker_pids(child.id());
    assert_eq!(pids.len(), 2, "two workers: {pids:?}");
    unsafe { libc::kill(pids[1], libc::SIGKILL) };
    let killed = Instant::now();
    let out = child.wait_with_output().unwrap();
    let stopped_in = killed.elapsed();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(stopped_in < Duration::from_secs(15), "the run stopped {stopped_in:?} after the kill: {err}");
    assert!(err.contains(&format!("worker rank 1 (pid {}) was killed by signal 9 (SIGKILL)", pids[1])), "{err}");
    assert!(err.contains("run the same command again to resume"), "{err}");
    // Rank 0 is gone too (no orphan).
    assert!(
        !Path::new(&format!("/proc/{}", pids[0])).exists()
            || std::fs::read_to_string(format!("/proc/{}/stat", pids[0])).unwrap_or_default().contains(") Z ")
    );
    assert!(!d2.path().join("runs/t/train/adapter").exists());

    // One process may not resume a two-process checkpoint …
    let (code, _, err) = run(&["run", r2, "--until", "train"]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("was written by 2 process(es) (effective batch 16); this run has 1 (effective batch 8)"),
        "{err}"
    );
    assert!(err.contains("Resume with the same number of processes (`--gpus 2`)"), "{err}");
    // … two do, and finish with the uninterrupted run's adapter.
    let (code, _, err) = run(&["run", r2, "--until", "train", "--gpus", "2"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("train: resuming from"), "{err}");
    let m = metrics(&d2.path().join("runs/t"));
    assert_eq!(m.iter().map(|v| v["step"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 2, 3, 4, 5, 6]);
    assert_eq!(
        adapter_bytes(&d2.path().join("runs/t")),
        reference,
        "resumed two-process adapter differs from the uninterrupted one"
    );
}

#[test]
fn torchrun_style_workers_meet_on_a_tcp_store_and_train_like_the_launcher() {
    // Reference: `--gpus 2` (FileStore in the run dir).
    let d1 = tmp();
    let r1 = cpu_recipe(d1.path(), "");
    let (code, _, err) = run(&["run", r1.to_str().unwrap(), "--until", "train", "--gpus", "2"]);
    assert_eq!(code, 0, "{err}");
    // Two plain `tuner run`s with torchrun's variables, meeting on a TCPStore served by rank 0.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let d2 = tmp();
    let r2 = cpu_recipe(d2.path(), "");
    let workers: Vec<std::process::Child> = (0..2)
        .map(|rank| {
            tuner()
                .args(["run", r2.to_str().unwrap(), "--until", "train"])
                .envs([
                    ("RANK", rank.to_string()),
                    ("WORLD_SIZE", "2".into()),
                    ("LOCAL_RANK", rank.to_string()),
                    ("LOCAL_WORLD_SIZE", "2".into()),
                ])
                .envs([
                    ("MASTER_ADDR", "127.0.0.1".to_string()),
                    ("MASTER_PORT", port.to_string()),
                    ("OMP_NUM_THREADS", "1".into()),
                ])
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<std::process::Output> = workers.into_iter().map(|c| c.wait_with_output().unwrap()).collect();
    let err0 = String::from_utf8_lossy(&outs[0].stderr);
    let err1 = String::from_utf8_lossy(&outs[1].stderr);
    assert_eq!(outs[0].status.code(), Some(0), "{err0}");
    assert_eq!(outs[1].status.code(), Some(0), "{err1}");
    assert!(err0.contains(&format!("dist: rank 0 of 2 (local rank 0 of 2, launched by torchrun), gloo on Cpu, rendezvous tcp://127.0.0.1:{port} (serving)")), "{err0}");
    assert!(
        err0.contains("fetch: running") && !err1.contains("fetch: running"),
        "fetch and tokenize run once, on rank 0: {err1}"
    );
    assert!(!err1.contains("train: step"), "rank 1 logs nothing of the loop: {err1}");
    assert_eq!(adapter_bytes(&d2.path().join("runs/t")), adapter_bytes(&d1.path().join("runs/t")));
}
