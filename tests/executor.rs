//! The staged executor: skip, re-run on change, --from, incomplete stages,
//! the lock, status, and the run records.

use crate::common::*;
use serde_json::Value;
use std::path::Path;

fn status_json(recipe: &Path) -> Value {
    let (code, out, err) = run(&["status", recipe.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

fn states(v: &Value) -> Vec<String> {
    v["stages"].as_array().unwrap().iter().map(|s| s["state"].as_str().unwrap().to_string()).collect()
}

fn small_dataset(dir: &Path, n: usize) -> std::path::PathBuf {
    let p = dir.join("data.jsonl");
    let text: String = (0..n)
        .map(|i| format!("{{\"instruction\":\"Add {i} and 1.\",\"input\":\"\",\"output\":\"{}\"}}\n", i + 1))
        .collect();
    std::fs::write(&p, text).unwrap();
    p
}

#[test]
fn until_stops_after_the_named_stage() {
    let d = tmp();
    let recipe = train_recipe(d.path(), "max_steps = 1");
    let recipe_text = std::fs::read_to_string(&recipe).unwrap().replace("max_steps = 6\n", "");
    std::fs::write(&recipe, recipe_text + "\n[eval]\nmax_samples = 2\nmax_new_tokens = 2\n").unwrap();
    let (code, _, err) = run(&["run", recipe.to_str().unwrap(), "--until", "evaluate"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(states(&status_json(&recipe)), ["complete", "complete", "complete", "complete", "missing"]);
}

#[test]
fn stages_are_skipped_rerun_on_change_and_forced_with_from() {
    let d = tmp();
    let model = tiny_model(&d.path().join("model"));
    let data = small_dataset(d.path(), 120);
    let recipe = tiny_recipe(d.path(), &model, &data, "");
    let rd = d.path().join("runs/t");

    let (code, _, err) = run(&["run", recipe.to_str().unwrap(), "--until", "tokenize"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("fetch: running") && err.contains("tokenize: running"), "{err}");
    assert_eq!(states(&status_json(&recipe)), ["complete", "complete", "missing", "missing", "missing"]);
    assert!(rd.join("recipe.resolved.toml").is_file());
    let lock: Value = serde_json::from_str(&std::fs::read_to_string(rd.join("tuner.lock.json")).unwrap()).unwrap();
    assert_eq!(lock["tuner_version"], env!("CARGO_PKG_VERSION"));
    assert!(lock["libtorch_version"].as_str().unwrap().starts_with("2.11.0"), "{lock}");
    assert_eq!(lock["stages"]["fetch"]["dataset"]["train"][0]["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(lock["stages"]["tokenize"]["tokenizer_sha256"].as_str().unwrap().len(), 64);
    assert!(!rd.join(".lock").exists(), "the lock is released");

    // Nothing changed: both stages are skipped and their files untouched.
    let manifest = std::fs::read(rd.join("tokenize/manifest.json")).unwrap();
    let (code, _, err) = run(&["run", recipe.to_str().unwrap(), "--until", "tokenize"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("fetch: up to date, skipped") && err.contains("tokenize: up to date, skipped"), "{err}");
    assert_eq!(std::fs::read(rd.join("tokenize/manifest.json")).unwrap(), manifest);

    // A tokenize key changed: fetch is skipped, tokenize re-runs.
    let (code, _, err) =
        run(&["run", recipe.to_str().unwrap(), "--until", "tokenize", "--set", "train.max_seq_length=64"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("fetch: up to date, skipped") && err.contains("tokenize: inputs changed, running again"),
        "{err}"
    );
    // Status against the original recipe now calls tokenize stale.
    assert_eq!(states(&status_json(&recipe))[..2], ["complete", "stale"]);

    // The dataset changed: fetch re-runs, and so does tokenize after it.
    small_dataset(d.path(), 130);
    let (code, _, err) = run(&["run", recipe.to_str().unwrap(), "--until", "tokenize"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("fetch: inputs changed") && err.contains("tokenize: inputs changed"), "{err}");

    // --from forces a stage even when complete.
    let (code, _, err) = run(&["run", recipe.to_str().unwrap(), "--until", "tokenize", "--from", "tokenize"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("fetch: up to date, skipped") && err.contains("tokenize: running"), "{err}");

    // Status on the run dir itself, in JSON.
    let (code, out, _) = run(&["status", rd.to_str().unwrap(), "--json"]);
    assert_eq!(code, 0);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["run_dir"], rd.to_str().unwrap());
    assert_eq!(v["stages"][1]["name"], "tokenize");
    assert_eq!(states(&v), ["complete", "complete", "missing", "missing", "missing"]);
    let arts: Vec<&str> = v["stages"][1]["artifacts"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert!(arts.iter().any(|a| a.ends_with("tokenize/train-00000.arrow")), "{arts:?}");
    assert!(arts.iter().any(|a| a.ends_with("tokenize/stats.json")), "{arts:?}");
}

#[test]
fn unknown_stage_names_are_usage_errors() {
    let d = tmp();
    let model = tiny_model(&d.path().join("model"));
    let data = small_dataset(d.path(), 20);
    let recipe = tiny_recipe(d.path(), &model, &data, "");
    let (code, _, err) = run(&["run", recipe.to_str().unwrap(), "--until", "tokenise"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("--until tokenise: unknown stage; stages are fetch, tokenize, train, evaluate, export"),
        "{err}"
    );
}

#[test]
fn a_live_lock_refuses_and_a_stale_lock_is_taken_over() {
    let d = tmp();
    let model = tiny_model(&d.path().join("model"));
    let data = small_dataset(d.path(), 20);
    let recipe = tiny_recipe(d.path(), &model, &data, "");
    let rd = d.path().join("runs/t");
    std::fs::create_dir_all(&rd).unwrap();

    // A live holder: a sleeping child process.
    let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
    std::fs::write(rd.join(".lock"), format!("{{\"pid\":{},\"started_unix\":0,\"stage\":\"tokenize\"}}", child.id()))
        .unwrap();
    let (code, _, err) = run(&["run", recipe.to_str().unwrap(), "--until", "fetch"]);
    assert_eq!(code, 1);
    assert!(err.contains(&format!("is in use by another tuner process (pid {})", child.id())), "{err}");
    let v = status_json(&recipe);
    assert_eq!(states(&v)[1], "running");
    child.kill().unwrap();
    child.wait().unwrap();

    // The holder is dead: its lock is stale and taken over with a message.
    let (code, _, err) = run(&["run", recipe.to_str().unwrap(), "--until", "fetch"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains(&format!("taking over a stale lock in {} left by pid {}", rd.display(), child.id())), "{err}");
    assert!(!rd.join(".lock").exists());
}

#[test]
fn an_interrupted_stage_shows_as_interrupted() {
    let d = tmp();
    let model = tiny_model(&d.path().join("model"));
    let data = small_dataset(d.path(), 20);
    let recipe = tiny_recipe(d.path(), &model, &data, "");
    let rd = d.path().join("runs/t");
    assert_eq!(run(&["run", recipe.to_str().unwrap(), "--until", "fetch"]).0, 0);
    // A tokenize dir with partial files and no manifest.
    std::fs::create_dir_all(rd.join("tokenize")).unwrap();
    std::fs::write(rd.join("tokenize/train-00000.arrow"), b"partial").unwrap();
    assert_eq!(states(&status_json(&recipe))[..2], ["complete", "interrupted"]);
    let (code, _, err) = run(&["run", recipe.to_str().unwrap(), "--until", "tokenize"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("tokenize: resuming"), "{err}");
    assert_eq!(states(&status_json(&recipe))[..2], ["complete", "complete"]);
}

#[test]
fn a_broken_model_folder_fails_fetch_with_the_reason() {
    let d = tmp();
    let model = tiny_model(&d.path().join("model"));
    let data = small_dataset(d.path(), 20);
    let recipe = tiny_recipe(d.path(), &model, &data, "");
    // Truncate the safetensors file: the header promises more data than there is.
    let st = model.join("model.safetensors");
    let bytes = std::fs::read(&st).unwrap();
    std::fs::write(&st, &bytes[..bytes.len() - 100]).unwrap();
    let (code, _, err) = run(&["run", recipe.to_str().unwrap(), "--until", "fetch"]);
    assert_eq!(code, 1);
    assert!(err.contains("model.safetensors: truncated"), "{err}");
    assert!(!d.path().join("runs/t/fetch/manifest.json").exists());
}
