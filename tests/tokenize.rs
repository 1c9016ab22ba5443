//! The tokenize stage: labels and masks, templates, byte-identical shards for
//! any thread count, resume after a kill, bad rows, stats.

use crate::common::*;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tuner::data::shards;

fn tokenize(recipe: &Path, extra: &[&str]) -> (i32, String) {
    let mut args = vec!["run", recipe.to_str().unwrap(), "--until", "tokenize"];
    args.extend_from_slice(extra);
    let (code, _, err) = run(&args);
    (code, err)
}

/// Every file of a stage dir except the manifest (which records a time), by name.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| e.file_name() != "manifest.json")
        .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
        .collect()
}

fn setup(extra: &str) -> (tempfile::TempDir, PathBuf) {
    let d = tmp();
    let model = tiny_model(&d.path().join("model"));
    let r = tiny_recipe(d.path(), &model, &requests_train(), extra);
    (d, r)
}

fn decode(ids: &[i32]) -> String {
    use std::str::FromStr;
    let tok = tokenizers::Tokenizer::from_str(&tiny_tokenizer_json()).unwrap();
    tok.decode(&ids.iter().map(|t| *t as u32).collect::<Vec<_>>(), false).unwrap()
}

#[test]
fn shards_are_byte_identical_for_1_2_and_8_threads() {
    let mut outputs = vec![];
    for threads in ["1", "2", "8"] {
        let (d, r) = setup("");
        let (code, err) = tokenize(&r, &["--threads", threads]);
        assert_eq!(code, 0, "{err}");
        let f = files(&d.path().join("runs/t/tokenize"));
        // 2400 rows, 10% held out for eval, 50 rows a shard.
        assert_eq!(f.keys().filter(|k| k.starts_with("train-") && k.ends_with(".arrow")).count(), 44);
        assert_eq!(f.keys().filter(|k| k.starts_with("eval-") && k.ends_with(".arrow")).count(), 5);
        outputs.push(f);
    }
    assert!(outputs[0] == outputs[1] && outputs[1] == outputs[2], "shards differ between thread counts");
}

#[test]
fn labels_mask_the_prompt_and_train_the_response_and_eos() {
    let (d, r) = setup("");
    let (code, err) = tokenize(&r, &[]);
    assert_eq!(code, 0, "{err}");
    let dir = d.path().join("runs/t/tokenize");
    let ex = &shards::read(&dir.join("train-00000.arrow")).unwrap()[0];
    assert_eq!(ex.input_ids.len(), ex.labels.len());
    let first_trained = ex.labels.iter().position(|l| *l != -100).unwrap();
    assert!(ex.labels[first_trained..].iter().all(|l| *l != -100), "the response is one trained run");
    assert_eq!(&ex.labels[first_trained..], &ex.input_ids[first_trained..]);
    assert_eq!(*ex.input_ids.last().unwrap(), 257, "EOS (<|im_end|>) appended");
    let prompt = decode(&ex.input_ids[..first_trained]);
    let response = decode(&ex.input_ids[first_trained..]);
    assert!(prompt.starts_with("Below is an instruction that describes a task"), "{prompt}");
    assert!(prompt.ends_with("### Response:\n"), "{prompt}");
    assert!(response.starts_with("{\"intent\":\"") && response.ends_with("}<|im_end|>"), "{response}");
    // The printed example marks the trained part.
    assert!(err.contains("⟦{\"intent\":"), "{err}");

    let stats: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("stats.json")).unwrap()).unwrap();
    assert_eq!(stats["train"]["rows"], 2160);
    assert_eq!(stats["eval"]["rows"], 240);
    assert_eq!(stats["train"]["truncated_rows"], 0);
    let frac = stats["train"]["trained_fraction"].as_f64().unwrap();
    assert!(frac > 0.1 && frac < 0.6, "{frac}");
    let hist: u64 =
        stats["train"]["length_histogram"].as_array().unwrap().iter().map(|b| b["rows"].as_u64().unwrap()).sum();
    assert_eq!(hist, 2160);
}

#[test]
fn truncation_is_counted_and_all_tokens_can_be_trained() {
    let (d, r) = setup("");
    let (code, err) =
        tokenize(&r, &["--set", "train.max_seq_length=200", "--set", "prompt.train_on_responses_only=false"]);
    assert_eq!(code, 0, "{err}");
    let dir = d.path().join("runs/t/tokenize");
    let stats: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("stats.json")).unwrap()).unwrap();
    assert!(stats["train"]["truncated_rows"].as_u64().unwrap() > 100, "{stats}");
    assert_eq!(stats["train"]["trained_fraction"], 1.0);
    assert_eq!(stats["train"]["max_length"], 200);
    let ex = &shards::read(&dir.join("train-00000.arrow")).unwrap()[0];
    assert_eq!(ex.labels, ex.input_ids);
}

#[test]
fn chat_template_and_chatml_agree_and_mask_user_turns() {
    let chat = repo().join("datasets/chat/train.jsonl");
    let mut ids = vec![];
    for template in ["chat", "chatml"] {
        let d = tmp();
        let model = tiny_model(&d.path().join("model"));
        let r = tiny_recipe(d.path(), &model, &chat, &format!("\n[prompt]\ntemplate = \"{template}\"\n"));
        let (code, err) = tokenize(&r, &["--set", "train.max_seq_length=1024"]);
        assert_eq!(code, 0, "{template}: {err}");
        ids.push(shards::read(&d.path().join("runs/t/tokenize/train-00000.arrow")).unwrap());
    }
    assert_eq!(ids[0], ids[1], "the ChatML Jinja template and the built-in chatml give the same tokens");
    // In a multi-turn row, every trained run ends with <|im_end|> and no user text is trained.
    let multi = ids[0].iter().find(|e| decode(&e.input_ids).matches("<|im_start|>assistant").count() >= 2).unwrap();
    let runs = trained_runs(&multi.input_ids, &multi.labels);
    assert!(runs.len() >= 2);
    for run in &runs {
        let text = decode(run);
        assert!(text.ends_with("<|im_end|>") && !text.contains("<|im_start|>"), "{text:?}");
    }
}

#[test]
fn inline_format_template_splits_at_the_output_slot() {
    let (d, r) = setup("\n[prompt]\ntemplate = \"### 指令\\n{instruction}\\n{input}\\n\\n### 回答\\n{output}\"\n");
    let (code, err) = tokenize(&r, &[]);
    assert_eq!(code, 0, "{err}");
    let ex = &shards::read(&d.path().join("runs/t/tokenize/train-00000.arrow")).unwrap()[0];
    let first_trained = ex.labels.iter().position(|l| *l != -100).unwrap();
    let prompt = decode(&ex.input_ids[..first_trained]);
    assert!(prompt.starts_with("### 指令\n") && prompt.ends_with("\n\n### 回答\n"), "{prompt:?}");
}

#[test]
fn bad_rows_are_named_by_file_line_and_field_or_skipped() {
    let bad = repo().join("datasets/bad/requests-bad.jsonl");
    let d = tmp();
    let model = tiny_model(&d.path().join("model"));
    let r = tiny_recipe(d.path(), &model, &bad, "");
    let text = std::fs::read_to_string(&r).unwrap().replace("eval_ratio = 0.1", "shuffle = false");
    std::fs::write(&r, text).unwrap();
    let (code, err) = tokenize(&r, &[]);
    assert_eq!(code, 1, "{err}");
    let f = bad.display().to_string();
    assert!(err.contains(&format!("{f}:3: missing field `output`")), "{err}");
    assert!(err.contains(&format!("{f}:5: field `output`: expected a string, found the number 42")), "{err}");
    assert!(err.contains(&format!("{f}:7: invalid JSON")), "{err}");
    assert!(err.contains("dataset.on_bad_row = \"skip\""), "{err}");
    assert!(!d.path().join("runs/t/tokenize/manifest.json").exists());

    let (code, err) = tokenize(&r, &["--set", "dataset.on_bad_row=\"skip\""]);
    assert_eq!(code, 0, "{err}");
    let stats: Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("runs/t/tokenize/stats.json")).unwrap()).unwrap();
    assert_eq!(stats["train"]["skipped_bad_rows"], 3);
    assert_eq!(stats["train"]["rows"], 7);
    assert!(err.contains(&format!("tokenize: skipped {f}:3: missing field `output`")), "{err}");
}

#[test]
fn a_crashed_tokenize_keeps_finished_shards_and_resumes_to_the_same_bytes() {
    let (d, r) = setup("");
    let dir = d.path().join("runs/t/tokenize");
    assert_eq!(tokenize(&r, &["--threads", "1"]).0, 0);
    let reference = files(&dir);

    // Simulate a crash after some shards: no manifest, later shards missing, a stray temp file.
    std::fs::remove_file(dir.join("manifest.json")).unwrap();
    for i in 10..44 {
        std::fs::remove_file(dir.join(format!("train-{i:05}.arrow"))).ok();
        std::fs::remove_file(dir.join(format!("train-{i:05}.arrow.json"))).ok();
    }
    std::fs::remove_file(dir.join("stats.json")).unwrap();
    std::fs::write(dir.join(".train-00010.arrow.tmp.999"), b"half").unwrap();
    let kept = std::fs::metadata(dir.join("train-00003.arrow")).unwrap().modified().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    let (code, err) = tokenize(&r, &["--threads", "2"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("tokenize: resuming"), "{err}");
    assert_eq!(
        std::fs::metadata(dir.join("train-00003.arrow")).unwrap().modified().unwrap(),
        kept,
        "finished shards are kept"
    );
    let mut after = files(&dir);
    after.retain(|k, _| !k.contains(".tmp."));
    assert_eq!(after, reference);

    // A real SIGKILL at some point during the stage, then a rerun: same bytes.
    std::fs::remove_dir_all(&dir).unwrap();
    let mut child =
        tuner().args(["run", r.to_str().unwrap(), "--until", "tokenize", "--threads", "1"]).spawn().unwrap();
    let t0 = std::time::Instant::now();
    while !dir.join("train-00002.arrow.json").exists() && t0.elapsed().as_secs() < 20 {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let (code, err) = tokenize(&r, &["--threads", "2"]);
    assert_eq!(code, 0, "{err}");
    let mut after = files(&dir);
    after.retain(|k, _| !k.contains(".tmp."));
    assert_eq!(after, reference);
}
