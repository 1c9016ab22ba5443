//! Watching a run (issue 18): TensorBoard event files under `train/tb/` read back with the
//! `tensorboard` package, `train.eval_steps` against the evaluate stage's eval loss, and
//! `loss.png` redrawn while training runs.

use crate::common::*;
use serde_json::Value;
use std::path::Path;

fn metrics(run_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(run_dir.join("train/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Every scalar of the event files under `dir`, by tag: [[step, value], …] (tensorboard's reader).
fn tb_scalars(dir: &Path) -> Value {
    let script = r#"
import json, sys
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
acc = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0})
acc.Reload()
print(json.dumps({t: [[e.step, e.value] for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}))
"#;
    let out = std::process::Command::new(python()).args(["-c", script, dir.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn tensorboard_events_and_eval_steps_match_the_metrics_and_the_evaluate_stage() {
    let d = tmp();
    let r = train_recipe(d.path(), "eval_steps = 3");
    let text = std::fs::read_to_string(&r).unwrap() + "\n[eval]\nmax_samples = 0\nbatch_size = 4\n";
    std::fs::write(&r, text).unwrap();
    let (code, _, err) = run(&["run", r.to_str().unwrap(), "--until", "evaluate"]);
    assert_eq!(code, 0, "{err}");
    let rd = d.path().join("runs/t");
    let m = metrics(&rd);
    assert_eq!(m.len(), 6);
    for row in &m {
        let step = row["step"].as_u64().unwrap();
        assert_eq!(row["eval_loss"].is_f64(), step % 3 == 0, "step {step}: {row}");
    }
    // The evaluate stage's loss on the same eval split, with the trained adapter.
    let rep: Value = serde_json::from_str(&std::fs::read_to_string(rd.join("evaluate/report.json")).unwrap()).unwrap();
    let (during, after) = (m[5]["eval_loss"].as_f64().unwrap(), rep["after"]["eval_loss"].as_f64().unwrap());
    assert!((during - after).abs() < 1e-4 * after, "eval loss at step 6 {during} vs evaluate {after}");
    assert!(m[2]["eval_loss"].as_f64().unwrap() > during, "eval loss falls: {} → {during}", m[2]["eval_loss"]);

    let s = tb_scalars(&rd.join("train/tb"));
    let mut tags: Vec<&str> = s.as_object().unwrap().keys().map(|k| k.as_str()).collect();
    tags.sort();
    assert_eq!(
        tags,
        ["eval/loss", "train/grad_norm", "train/loss", "train/lr", "train/peak_mem_bytes", "train/tokens_per_s"]
    );
    let loss = s["train/loss"].as_array().unwrap();
    assert_eq!(loss.len(), 6);
    for (row, ev) in m.iter().zip(loss) {
        assert_eq!(ev[0], row["step"]);
        assert_eq!(ev[1].as_f64().unwrap(), row["loss"].as_f64().unwrap() as f32 as f64, "step {}", row["step"]);
    }
    let eval = s["eval/loss"].as_array().unwrap();
    assert_eq!(eval.iter().map(|e| e[0].as_u64().unwrap()).collect::<Vec<_>>(), [3, 6]);
    assert_eq!(eval[1][1].as_f64().unwrap(), during as f32 as f64);
    assert_eq!(s["train/lr"][0][1].as_f64().unwrap(), 0.0);
}

/// The PNG's (width, height) from its IHDR.
fn png_size(png: &[u8]) -> (u32, u32) {
    assert_eq!(&png[1..4], b"PNG");
    let be = |b: &[u8]| u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    (be(&png[16..20]), be(&png[20..24]))
}

#[test]
fn loss_png_is_redrawn_while_training_runs() {
    let d = tmp();
    let r = train_recipe(d.path(), "");
    let text = std::fs::read_to_string(&r)
        .unwrap()
        .replace("max_steps = 6", "max_steps = 400")
        .replace("save_steps = 2", "save_steps = 1000");
    std::fs::write(&r, text).unwrap();
    let child = tuner()
        .args(["run", r.to_str().unwrap(), "--until", "train"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let train = d.path().join("runs/t/train");
    let lines = || std::fs::read_to_string(train.join("metrics.jsonl")).map(|s| s.lines().count()).unwrap_or(0);
    let wait_for = |n: usize| {
        let t0 = std::time::Instant::now();
        while lines() < n && t0.elapsed().as_secs() < 120 {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    };
    wait_for(2);
    let first = std::fs::read(train.join("loss.png")).unwrap();
    let n = lines();
    wait_for(n + 2);
    let second = std::fs::read(train.join("loss.png")).unwrap();
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(130), "{}", String::from_utf8_lossy(&out.stderr));
    assert_ne!(first, second, "loss.png is redrawn as steps are logged");
    // Loss panel and the learning-rate panel below it.
    assert_eq!(png_size(&second), (640, 592));
    assert!(std::fs::read(train.join("loss.png")).is_ok_and(|p| p[1..4] == *b"PNG"));
}
