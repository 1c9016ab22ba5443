//! The evaluate stage: before/after eval loss on the same tokens, generations,
//! task metrics, report.json and report.md.

use crate::common::*;
use serde_json::Value;
use tuner::evaluate::{exact_match, first_json_object, json_fields};

#[test]
fn task_metrics_score_what_they_say() {
    let want = r#"{"intent":"book_table","people":4,"day":"friday"}"#;
    assert_eq!(json_fields(want, want), Some(1.0));
    assert_eq!(json_fields(r#"{"intent":"book_table","people":5,"day":"friday"} and more"#, want), Some(2.0 / 3.0));
    assert_eq!(json_fields("sure! {\"intent\": \"book_table\"}", want), Some(1.0 / 3.0));
    assert_eq!(json_fields("no json here", want), Some(0.0));
    assert_eq!(json_fields("{\"a\":1}", "not json"), None);
    assert_eq!(first_json_object(r#"x {"a":"}{","b":{"c":1}} y"#).unwrap()["b"]["c"], 1);
    assert_eq!(exact_match(" Paris\n", "Paris"), 1.0);
    assert_eq!(exact_match("Paris.", "Paris"), 0.0);
}

#[test]
fn evaluate_reports_before_and_after_on_the_same_tokens() {
    let d = tmp();
    let r = train_recipe(d.path(), "");
    let text = std::fs::read_to_string(&r).unwrap().replace("max_steps = 6", "max_steps = 20").replace("learning_rate = 3e-3", "learning_rate = 1e-2")
        + "\n[eval]\nmetrics = [\"json_fields\", \"exact_match\"]\nmax_samples = 6\nmax_new_tokens = 8\nbatch_size = 4\n";
    std::fs::write(&r, text).unwrap();
    let (code, _, err) = run(&["run", r.to_str().unwrap(), "--until", "evaluate"]);
    assert_eq!(code, 0, "{err}");
    let ev = d.path().join("runs/t/evaluate");
    let rep: Value = serde_json::from_str(&std::fs::read_to_string(ev.join("report.json")).unwrap()).unwrap();
    let (before, after) = (rep["before"]["eval_loss"].as_f64().unwrap(), rep["after"]["eval_loss"].as_f64().unwrap());
    assert!(after < before - 1.0, "eval loss {before} → {after}");
    assert!((rep["after"]["perplexity"].as_f64().unwrap() - after.exp()).abs() < 1e-6 * after.exp());
    for phase in ["before", "after"] {
        for k in ["json_fields", "exact_match"] {
            let v = rep[phase][k].as_f64().unwrap();
            assert!((0.0..=1.0).contains(&v), "{phase}.{k} = {v}");
        }
    }
    assert_eq!(rep["eval_rows"], 120, "5% of the 2400 rows held out (max_samples caps train rows only)");
    assert_eq!(rep["generation_samples"], 6);
    assert_eq!(rep["samples"].as_array().unwrap().len(), 5);
    assert!(rep["samples"][0]["expected"].as_str().unwrap().starts_with("{\"intent\":"));
    let md = std::fs::read_to_string(ev.join("report.md")).unwrap();
    assert!(md.contains("| eval_loss |") && md.contains("![train loss](loss.png)") && md.contains("### 1"), "{md}");
    assert!(ev.join("loss.png").is_file());
    // The run record carries the numbers too.
    let lock: Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("runs/t/tuner.lock.json")).unwrap()).unwrap();
    assert_eq!(lock["stages"]["evaluate"]["after"]["eval_loss"], rep["after"]["eval_loss"]);
}

/// Issue 19: a recipe without an eval split trains, evaluates (generations on training prompts,
/// labelled so, no eval loss) and exports, as with HF or Axolotl; `validate` warns.
#[test]
fn a_recipe_without_an_eval_split_trains_evaluates_on_training_prompts_and_exports() {
    let d = tmp();
    let r = train_recipe(d.path(), "");
    let text = std::fs::read_to_string(&r).unwrap().replace("eval_ratio = 0.05\n", "").replace("max_steps = 6", "max_steps = 2")
        + "\n[eval]\nmetrics = [\"json_fields\"]\nmax_samples = 3\nmax_new_tokens = 4\n\n[export]\nadapter = true\nmerged = false\n";
    std::fs::write(&r, text).unwrap();
    let (code, out, err) = run(&["validate", r.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(": ok")
            && err.contains("warning:")
            && err.contains("recipe.toml:")
            && err.contains("no eval split"),
        "{out}{err}"
    );
    let (code, _, err) = run(&["run", r.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let ev = d.path().join("runs/t/evaluate");
    let rep: Value = serde_json::from_str(&std::fs::read_to_string(ev.join("report.json")).unwrap()).unwrap();
    assert_eq!(rep["prompts_from"], "train");
    assert_eq!(rep["eval_rows"], 0);
    assert_eq!(rep["generation_samples"], 3);
    assert!(rep["after"].get("eval_loss").is_none() && rep["after"]["json_fields"].as_f64().is_some(), "{rep}");
    let md = std::fs::read_to_string(ev.join("report.md")).unwrap();
    assert!(md.contains("**No eval split**") && !md.contains("| eval_loss |"), "{md}");
    assert!(d.path().join("runs/t/export/adapter/adapter_model.safetensors").is_file(), "export ran");
}
