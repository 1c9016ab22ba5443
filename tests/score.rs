//! `tuner score` against the HF reference numbers of every fixture family.

use crate::common::*;
use serde_json::Value;

fn score(model: &std::path::Path, extra: &[&str]) -> Value {
    let data = repo().join("tests/fixtures/score/texts.jsonl");
    let mut args = vec![
        "score",
        "--model",
        model.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--json",
        "--device",
        "cpu",
    ];
    args.extend_from_slice(extra);
    let (code, out, err) = run(&args);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

#[test]
fn score_matches_hf_for_every_family() {
    for family in [
        "llama",
        "llama-tied",
        "mistral",
        "qwen2",
        "qwen3",
        "phi3",
        "llama-bnb4",
        "gemma2",
        "gemma3",
        "gemma3n",
        "gemma3n-bnb4",
    ] {
        let dir = repo().join("tests/fixtures/models").join(family);
        let want: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("score.json")).unwrap()).unwrap();
        let got = score(&dir, &[]);
        assert_eq!(got["rows"], want["rows"], "{family}");
        assert_eq!(got["tokens"], want["tokens"], "{family}");
        let rel = |a: &Value, b: &Value| (a.as_f64().unwrap() - b.as_f64().unwrap()).abs() / b.as_f64().unwrap().abs();
        assert!(
            rel(&got["mean_loss"], &want["mean_loss"]) < 1e-4,
            "{family}: {} vs {}",
            got["mean_loss"],
            want["mean_loss"]
        );
        assert!(rel(&got["perplexity"], &want["perplexity"]) < 1e-3, "{family}");
        for (g, w) in got["per_row"].as_array().unwrap().iter().zip(want["per_row"].as_array().unwrap()) {
            assert_eq!(g["tokens"], w["tokens"], "{family}");
            assert!(rel(&g["loss"], &w["loss"]) < 1e-4, "{family}: row {g} vs {w}");
        }
    }
}

#[test]
fn score_with_a_trained_adapter_differs_and_bad_input_is_named() {
    let d = tmp();
    let r = train_recipe(d.path(), "");
    assert_eq!(run(&["run", r.to_str().unwrap(), "--until", "train"]).0, 0);
    let base = score(&d.path().join("model"), &[]);
    let adapter = d.path().join("runs/t/train/adapter");
    let tuned = score(&d.path().join("model"), &["--adapter", adapter.to_str().unwrap()]);
    assert_eq!(base["tokens"], tuned["tokens"]);
    assert_ne!(base["mean_loss"], tuned["mean_loss"], "the adapter changes the model");

    let bad = d.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"text\": \"ok\"}\n{\"txt\": 1}\n").unwrap();
    let (code, _, err) =
        run(&["score", "--model", d.path().join("model").to_str().unwrap(), "--data", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains(&format!("{}:2: expected {{\"text\": …}} or {{\"messages\": […]}}", bad.display())), "{err}");
    let (code, _, err) = run(&["score", "--model", "/nope", "--data", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("--model /nope: expected an HF model folder or a .gguf file"), "{err}");
}

#[test]
fn score_reads_the_gguf_quickstart_model() {
    let d = tmp();
    let data = d.path().join("t.jsonl");
    std::fs::write(&data, "{\"messages\": [{\"role\": \"user\", \"content\": \"What is the capital of France?\"}, {\"role\": \"assistant\", \"content\": \"The capital of France is Paris.\"}]}\n").unwrap();
    let gguf = repo().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let (code, out, err) = tuner()
        .args(["score", "--model", gguf.to_str().unwrap(), "--data", data.to_str().unwrap(), "--json"])
        .env("TUNER_CACHE", d.path())
        .output()
        .map(|o| {
            (
                o.status.code().unwrap(),
                String::from_utf8_lossy(&o.stdout).into_owned(),
                String::from_utf8_lossy(&o.stderr).into_owned(),
            )
        })
        .unwrap();
    assert_eq!(code, 0, "{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    // transformers 5.17.0 (eager, fp32) on the imported folder, same chat template
    // (with SmolLM2's default system prompt) and tokens: 45 tokens, mean NLL 3.520992702907986.
    assert_eq!(v["tokens"], 45);
    let loss = v["mean_loss"].as_f64().unwrap();
    assert!((loss - 3.520992702907986).abs() < 1e-4 * 3.52, "{v}");
}
