//! Dataset formats and sources: plain text (`dataset.text_field`), ShareGPT, OpenAI messages
//! with tool calls, gzipped JSON Lines, HF-style split slices and weighted mixtures; bad rows of
//! each format named by file, line and key, or skipped; recipe mistakes located.

use crate::common::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use tuner::data::shards::{self, Example};

/// A fixture under datasets/.
fn fixture(rel: &str) -> String {
    repo().join("datasets").join(rel).display().to_string()
}

/// A recipe over the tiny model (in `dir/model`) with `dataset` as the body of `[dataset]`
/// (which may end in `[[dataset.sources]]` tables) and `extra` sections.
fn recipe(dir: &Path, dataset: &str, extra: &str) -> PathBuf {
    if !dir.join("model").exists() {
        tiny_model(&dir.join("model"));
    }
    let text = format!(
        "{extra}\n[run]\nname = \"t\"\noutput_dir = \"runs\"\n\n[model]\nsource = \"model\"\n\n[train]\nmax_seq_length = 1024\nmax_steps = 2\n\n[dataset]\nshard_rows = 50\n{dataset}\n"
    );
    let p = dir.join("recipe.toml");
    std::fs::write(&p, text).unwrap();
    p
}

fn tokenize(recipe: &Path, extra: &[&str]) -> (i32, String) {
    let mut args = vec!["run", recipe.to_str().unwrap(), "--until", "tokenize"];
    args.extend_from_slice(extra);
    let (code, _, err) = run(&args);
    (code, err)
}

/// Every example of a split, shard after shard.
fn examples(dir: &Path, split: &str) -> Vec<Example> {
    let mut names: Vec<String> = std::fs::read_dir(dir.join("runs/t/tokenize"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&format!("{split}-")) && n.ends_with(".arrow"))
        .collect();
    names.sort();
    names.iter().flat_map(|n| shards::read(&dir.join("runs/t/tokenize").join(n)).unwrap()).collect()
}

fn stats(dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("runs/t/tokenize/stats.json")).unwrap()).unwrap()
}

fn decode(ids: &[i32]) -> String {
    use std::str::FromStr;
    let tok = tokenizers::Tokenizer::from_str(&tiny_tokenizer_json()).unwrap();
    tok.decode(&ids.iter().map(|t| *t as u32).collect::<Vec<_>>(), false).unwrap()
}

/// A ChatML template that writes tools the way Qwen2.5's does: the row's `tools` in a system
/// turn, assistant `tool_calls` as `<tool_call>` lines, `tool` messages as `<tool_response>`.
const TOOLS_TEMPLATE: &str = r#"{%- if tools %}{{ '<|im_start|>system
Tools: ' + (tools | tojson) + '<|im_end|>
' }}{%- endif %}{%- for m in messages %}{%- if m.role == 'assistant' and m.tool_calls %}{{ '<|im_start|>assistant
' }}{%- for c in m.tool_calls %}{{ '<tool_call>' + (c.function | tojson) + '</tool_call>' }}{%- endfor %}{{ '<|im_end|>
' }}{%- elif m.role == 'tool' %}{{ '<|im_start|>user
<tool_response>' + m.content + '</tool_response><|im_end|>
' }}{%- else %}{{ '<|im_start|>' + m.role + '
' + m.content + '<|im_end|>
' }}{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant
' }}{%- endif %}"#;

/// Give the tiny model in `dir/model` the tools template.
fn use_tools_template(dir: &Path) {
    let cfg = serde_json::json!({"bos_token": null, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": TOOLS_TEMPLATE});
    std::fs::write(dir.join("model/tokenizer_config.json"), cfg.to_string()).unwrap();
}

#[test]
fn text_rows_are_trained_whole_and_gzip_reads_the_same_rows() {
    let (mut runs, mut samples) = (vec![], vec![]);
    for (file, key) in [
        ("formats/text.jsonl", "text_field = \"text\""),
        ("formats/text.jsonl.gz", "text_field = \"text\""),
        ("formats/text.jsonl", "format = \"text\""),
    ] {
        let d = tmp();
        let r = recipe(d.path(), &format!("source = {:?}\n{key}", fixture(file)), "");
        let (code, err) = tokenize(&r, &[]);
        assert_eq!(code, 0, "{file}: {err}");
        runs.push(examples(d.path(), "train"));
        samples.push(std::fs::read_to_string(d.path().join("runs/t/tokenize/train_sample_rows.jsonl")).unwrap());
    }
    assert_eq!(runs[0], runs[1], ".jsonl.gz gives the rows of .jsonl");
    assert!(samples.iter().all(|s| s.is_empty()), "text rows have no prompt to generate from: {samples:?}");
    assert_eq!(runs[0], runs[2], "format = \"text\" reads the field `text`");
    let rows = &runs[0];
    assert_eq!(rows.len(), 40);
    for ex in rows {
        assert_eq!(ex.labels, ex.input_ids, "every token of a text row is trained");
        assert_eq!(*ex.input_ids.last().unwrap(), 257, "EOS appended");
    }
    // Each row is its text, whole, once.
    let want: BTreeSet<String> = std::fs::read_to_string(fixture("formats/text.jsonl"))
        .unwrap()
        .lines()
        .map(|l| format!("{}<|im_end|>", serde_json::from_str::<Value>(l).unwrap()["text"].as_str().unwrap()))
        .collect();
    let got: BTreeSet<String> = rows.iter().map(|e| decode(&e.input_ids)).collect();
    assert_eq!(got, want);
    assert!(got.iter().all(|t| t.starts_with("Request: ") && t.contains("\nJSON: {\"intent\":")));
}

#[test]
fn sharegpt_rows_train_as_the_same_conversations_in_messages_form() {
    // datasets/formats/sharegpt.jsonl holds the first 40 rows of datasets/chat/train.jsonl.
    let d = tmp();
    let messages: String = std::fs::read_to_string(fixture("chat/train.jsonl"))
        .unwrap()
        .lines()
        .take(40)
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(d.path().join("messages.jsonl"), messages).unwrap();
    let messages = d.path().join("messages.jsonl").display().to_string();
    let sharegpt = fixture("formats/sharegpt.jsonl");
    let mut runs = vec![];
    for (source, format, template) in [
        (&messages, "auto", "chatml"),
        (&sharegpt, "auto", "chatml"),
        (&sharegpt, "sharegpt", "chatml"),
        (&sharegpt, "sharegpt", "chat"),
    ] {
        let d = tmp();
        let r = recipe(
            d.path(),
            &format!("source = {source:?}\nformat = {format:?}"),
            &format!("[prompt]\ntemplate = {template:?}\n"),
        );
        let (code, err) = tokenize(&r, &[]);
        assert_eq!(code, 0, "{format} {template}: {err}");
        runs.push(examples(d.path(), "train"));
        // Evaluate reads the sample prompts back as messages rows.
        let sample = std::fs::read_to_string(d.path().join("runs/t/tokenize/train_sample_rows.jsonl")).unwrap();
        let first: Value = serde_json::from_str(sample.lines().next().unwrap()).unwrap();
        assert!(first["messages"][0]["content"].is_string() && first.get("conversations").is_none(), "{first}");
    }
    assert_eq!(runs[0].len(), 40);
    for (k, run) in runs.iter().enumerate().skip(1) {
        assert!(*run == runs[0], "run {k} differs from the messages rows");
    }
    // Loss on assistant turns only: each trained run is one assistant reply and its <|im_end|>.
    let multi = runs[1].iter().find(|e| trained_runs(&e.input_ids, &e.labels).len() >= 2).unwrap();
    for r in trained_runs(&multi.input_ids, &multi.labels) {
        let text = decode(&r);
        assert!(text.ends_with("<|im_end|>") && !text.contains("<|im_start|>"), "{text:?}");
    }
}

#[test]
fn tool_calls_train_where_the_template_writes_them_and_are_refused_where_it_cannot() {
    let tools = fixture("formats/tools.jsonl");
    let d = tmp();
    let r = recipe(
        d.path(),
        &format!("source = {tools:?}\nformat = \"messages\"\nshuffle = false"),
        "[prompt]\ntemplate = \"chat\"\n",
    );
    use_tools_template(d.path());
    let (code, err) = tokenize(&r, &[]);
    assert_eq!(code, 0, "{err}");
    let rows = examples(d.path(), "train");
    assert_eq!(rows.len(), 12);
    let ex = &rows[0];
    let text = decode(&ex.input_ids);
    assert!(text.starts_with("<|im_start|>system\nTools: [{"), "the row's tools reach the template: {text}");
    let trained: Vec<String> = trained_runs(&ex.input_ids, &ex.labels).iter().map(|r| decode(r)).collect();
    assert_eq!(trained.len(), 2, "{trained:?}");
    assert!(trained[0].starts_with("<tool_call>{") && trained[0].contains("get_weather"), "{trained:?}");
    assert!(trained[0].contains("Lisbon") && trained[0].ends_with("</tool_call><|im_end|>"), "{trained:?}");
    assert_eq!(trained[1], "It is 82 °F in Lisbon.<|im_end|>");
    assert!(text.contains("<tool_response>{\"temperature\":82,\"unit\":\"fahrenheit\"}</tool_response>"), "{text}");

    // The plain ChatML Jinja template cannot add a null content to a string (as in Python), and
    // leaves tool_calls out where the content is ""; the built-in "chatml" has no way to write them.
    let empty = d.path().join("tools-empty-content.jsonl");
    std::fs::write(&empty, std::fs::read_to_string(&tools).unwrap().replace("\"content\":null", "\"content\":\"\""))
        .unwrap();
    let empty = empty.display().to_string();
    for (source, template, want) in [
        (&tools, "chat", "chat template failed: "),
        (&empty, "chat", "`messages[1]`: the model's chat template does not write assistant tool_calls (the call to `get_weather` is missing"),
        (&tools, "chatml", "`messages[1]`: prompt.template = \"chatml\" has no way to write tool calls"),
    ] {
        let d = tmp();
        let r = recipe(d.path(), &format!("source = {source:?}\nshuffle = false"), &format!("[prompt]\ntemplate = {template:?}\n"));
        let (code, err) = tokenize(&r, &[]);
        assert_eq!(code, 1, "{err}");
        assert!(err.contains(&format!("{source}:1: {want}")), "{template}: {err}");
        if want.starts_with("chat template failed") {
            assert!(err.contains("(the row has tool calls or tool messages: does this model's chat template support tools?)"), "{err}");
        }
    }
}

#[test]
fn bad_rows_of_each_format_are_named_by_file_line_and_key_or_skipped() {
    let cases: [(&str, &str, &str, &[&str], u64); 3] = [
        (
            "bad/text-bad.jsonl",
            "text_field = \"text\"",
            "",
            &[":2: missing field `text`", ":4: field `text`: expected a string, found a number"],
            4,
        ),
        (
            "bad/sharegpt-bad.jsonl",
            "format = \"sharegpt\"",
            "[prompt]\ntemplate = \"chatml\"\n",
            &[
                ":2: `conversations[0].from`: expected \"human\", \"gpt\", \"system\" or \"tool\" (or \"user\", \"assistant\"), found \"bot\"",
                ":4: `conversations[2].value`: missing",
                ":5: field `conversations`: no \"gpt\" turn to train on",
            ],
            3,
        ),
        (
            "bad/tools-bad.jsonl",
            "format = \"messages\"",
            "[prompt]\ntemplate = \"chat\"\n",
            &[
                ":2: `messages[1].tool_calls[0].function.name`: missing",
                ":3: `messages[2]`: role must be system, user, assistant or tool, found \"function\"",
                ":4: `messages[0].tool_calls`: only assistant messages call tools, this one is \"user\"",
            ],
            2,
        ),
    ];
    for (file, key, extra, wants, good) in cases {
        let d = tmp();
        let path = fixture(file);
        let r = recipe(d.path(), &format!("source = {path:?}\n{key}\nshuffle = false"), extra);
        use_tools_template(d.path());
        let (code, err) = tokenize(&r, &[]);
        assert_eq!(code, 1, "{file}: {err}");
        for want in wants {
            assert!(err.contains(&format!("{path}{want}")), "{file}: missing {want:?} in\n{err}");
        }
        assert!(err.contains("dataset.on_bad_row = \"skip\""), "{err}");

        let (code, err) = tokenize(&r, &["--set", "dataset.on_bad_row=\"skip\""]);
        assert_eq!(code, 0, "{file}: {err}");
        let s = stats(d.path());
        assert_eq!(s["train"]["skipped_bad_rows"], wants.len() as u64, "{file}");
        assert_eq!(s["train"]["rows"], good, "{file}");
        assert!(err.contains(&format!("tokenize: skipped {path}{}", wants[0])), "{err}");
    }
}

#[test]
fn split_slices_are_the_rows_hf_datasets_gives() {
    use tuner::recipe::SplitSpec;
    let r = |s: &str, n: usize| SplitSpec::parse(s).unwrap().range(n).unwrap();
    assert_eq!(r("train", 7), 0..7);
    assert_eq!(r("train[:10%]", 2400), 0..240);
    assert_eq!(r("train[10%:]", 2400), 240..2400);
    assert_eq!(r("train[:1000]", 2400), 0..1000);
    assert_eq!(r("train[100:200]", 2400), 100..200);
    // int(round(p * n / 100.0)) with Python's round, halves to the even neighbour.
    assert_eq!(r("train[:10%]", 5), 0..0); // 0.5 → 0
    assert_eq!(r("train[:30%]", 5), 0..2); // 1.5 → 2
    assert_eq!(r("train[:50%]", 5), 0..2); // 2.5 → 2
    assert_eq!(r("train[:70%]", 5), 0..4); // 3.5 → 4
    assert_eq!(r("train[-10%:]", 15), 13..15); // round(-1.5) = -2
    assert_eq!(r("train[10:20%]", 200), 20..40, "one % makes both boundaries percents");
    assert_eq!(r("train[:-1]", 10), 0..9);
    assert_eq!(r("train[-3:]", 10), 7..10);
    assert_eq!(r("train[-30:]", 10), 0..10);
    assert_eq!(r("train[5:3]", 10), 5..5);
    assert_eq!(r("train[:5000]", 10), 0..10);
    assert_eq!(r("train[:50%](pct1_dropremainder)", 250), 0..100);
    assert!(SplitSpec::parse("train[:50%](pct1_dropremainder)").unwrap().range(50).is_err());
    for bad in
        ["train[:10%", "train[5]", "train[a:b]", "train[:150%]", "train[:10%]+test", "train[:5](closest)", "[:5]"]
    {
        assert!(SplitSpec::parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn a_split_slice_keeps_its_rows_before_tokenizing_and_changes_the_fingerprint() {
    let d = tmp();
    let source = requests_train().display().to_string();
    let r = recipe(d.path(), &format!("source = {source:?}\nsplit = \"train[100:200]\"\nshuffle = false"), "");
    let (code, err) = tokenize(&r, &[]);
    assert_eq!(code, 0, "{err}");
    let rows = examples(d.path(), "train");
    assert_eq!(rows.len(), 100);
    let lines: Vec<Value> =
        std::fs::read_to_string(requests_train()).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let first = decode(&rows[0].input_ids);
    assert!(first.contains(lines[100]["input"].as_str().unwrap()), "{first}");
    let last = decode(&rows[99].input_ids);
    assert!(last.contains(lines[199]["input"].as_str().unwrap()), "{last}");

    let (code, err) = tokenize(&r, &["--set", "dataset.split=\"train[:10%]\""]);
    assert_eq!(code, 0, "{err}");
    assert!(!err.contains("tokenize: up to date"), "a new slice re-tokenizes: {err}");
    assert_eq!(stats(d.path())["train"]["rows"], 240);
    let (code, err) = tokenize(&r, &["--set", "dataset.split=\"train[:10%]\""]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("tokenize: up to date"), "{err}");
    for set in ["dataset.format=\"alpaca\"", "dataset.text_field=\"input\""] {
        let (code, err) = tokenize(&r, &["--set", "dataset.split=\"train[:10%]\"", "--set", set]);
        assert_eq!(code, 0, "{err}");
        assert!(!err.contains("tokenize: up to date"), "{set} re-tokenizes: {err}");
    }
}

/// The mixture of the requests rows (weight 3) and the 40 text rows (weight 1).
fn mixture_recipe(dir: &Path, text_weight: u32) -> PathBuf {
    let body = format!(
        "\n[[dataset.sources]]\nsource = {:?}\nweight = 3\n\n[[dataset.sources]]\nsource = {:?}\nformat = \"text\"\nweight = {text_weight}\n",
        requests_train().display().to_string(),
        fixture("formats/text.jsonl")
    );
    recipe(dir, &body, "")
}

#[test]
fn weighted_sources_give_exact_shares_the_same_for_any_thread_count() {
    let mut outputs: Vec<BTreeMap<String, Vec<u8>>> = vec![];
    for threads in ["1", "4"] {
        let d = tmp();
        let r = mixture_recipe(d.path(), 1);
        let (code, err) = tokenize(&r, &["--threads", threads]);
        assert_eq!(code, 0, "{err}");
        let dir = d.path().join("runs/t/tokenize");
        outputs.push(
            std::fs::read_dir(&dir)
                .unwrap()
                .flatten()
                .filter(|e| e.file_name() != "manifest.json")
                .map(|e| (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap()))
                .collect(),
        );
        if threads == "4" {
            continue;
        }
        // 2400 + 40 rows in all; 3/4 of them from the requests, 1/4 from the 40 text rows.
        let s = stats(d.path());
        let uses: Vec<(u64, u64)> = s["sources"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| (u["rows"].as_u64().unwrap(), u["used"].as_u64().unwrap()))
            .collect();
        assert_eq!(uses, [(2400, 1830), (40, 610)]);
        assert!(err.contains("tokenize: source") && err.contains("610 of 40 rows, weight 1"), "{err}");
        let rows = examples(d.path(), "train");
        assert_eq!(rows.len(), 2440);
        let texts: Vec<String> =
            rows.iter().map(|e| decode(&e.input_ids)).filter(|t| t.starts_with("Request: ")).collect();
        assert_eq!(texts.len(), 610);
        // 610 = 15 × 40 + 10: every text row 15 times, 10 of them once more.
        let mut per: BTreeMap<&str, usize> = BTreeMap::new();
        for t in &texts {
            *per.entry(t.as_str()).or_default() += 1;
        }
        assert_eq!(per.len(), 40);
        assert_eq!(per.values().filter(|c| **c == 16).count(), 10);
        assert_eq!(per.values().filter(|c| **c == 15).count(), 30);
        // Shuffled together: the first shard already holds text rows.
        assert!(rows[..50].iter().any(|e| decode(&e.input_ids).starts_with("Request: ")));

        // A new weight re-tokenizes with the new shares.
        let r = mixture_recipe(d.path(), 3);
        let (code, err) = tokenize(&r, &[]);
        assert_eq!(code, 0, "{err}");
        assert!(!err.contains("tokenize: up to date"), "{err}");
        let s = stats(d.path());
        assert_eq!(s["sources"][0]["used"], 1220);
        assert_eq!(s["sources"][1]["used"], 1220);
        // The resolved recipe keeps the sources and loads back to the same settings.
        let resolved = d.path().join("runs/t/recipe.resolved.toml");
        let text = std::fs::read_to_string(&resolved).unwrap();
        assert!(text.contains("[[dataset.sources]]") && text.contains("format = \"text\""), "{text}");
        std::fs::write(d.path().join("resolved.toml"), &text).unwrap();
        let back = tuner::recipe::load(&d.path().join("resolved.toml"), &[]).unwrap();
        assert_eq!(back.recipe.dataset, tuner::recipe::load(&r, &[]).unwrap().recipe.dataset);
    }
    assert!(outputs[0] == outputs[1], "shards differ between 1 and 4 threads");
}

/// `tuner validate` on `body` next to the tiny model and a one-row data.jsonl; stderr with the dir removed.
fn validate(body: &str) -> (i32, String) {
    let d = tmp();
    tiny_model(&d.path().join("model"));
    std::fs::write(d.path().join("data.jsonl"), "{\"instruction\":\"a\",\"output\":\"b\"}\n").unwrap();
    let p = d.path().join("x.toml");
    std::fs::write(&p, body).unwrap();
    let (code, _out, err) = run(&["validate", p.to_str().unwrap()]);
    (code, err.replace(&format!("{}/", d.path().display()), ""))
}

#[test]
fn dataset_settings_are_checked_at_their_lines() {
    let body = r#"[model]
source = "model"

[train]
max_steps = 1

[dataset]
source = "data.jsonl"
split = "train[:10%"
eval_split = "test"
format = "sharegpt"
text_field = "text"
"#;
    let (code, err) = validate(body);
    assert_eq!(code, 2, "{err}");
    for want in [
        "x.toml:9: dataset.split: expected a split name with an optional slice, as in HF datasets: `train`, `train[:10%]`, `train[10%:]`, `train[:1000]`, `train[100:200]`; found \"train[:10%\": the slice has no closing `]`",
        "x.toml:10: dataset.eval_split: applies to dataset.eval_source, which is not set",
        "x.toml:12: dataset.text_field: applies to plain-text rows; dataset.format = \"sharegpt\" reads no text field",
        "prompt.template: dataset.format = \"sharegpt\" rows are conversations; set prompt.template = \"chat\"",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }

    let body = r#"[model]
source = "model"

[train]
max_steps = 1

[dataset]
source = "data.jsonl"

[[dataset.sources]]
source = "data.jsonl"
weight = 2

[[dataset.sources]]
source = "missing.jsonl"
wieght = 1
format = "sharegtp"
split = "train[5]"
"#;
    let (code, err) = validate(body);
    assert_eq!(code, 2, "{err}");
    for want in [
        "x.toml:16: unknown key `wieght` in [[dataset.sources]]; did you mean `weight`?",
        "x.toml:17: dataset.sources[1].format: expected one of \"auto\", \"alpaca\", \"text\", \"messages\", \"sharegpt\", found \"sharegtp\"; did you mean \"sharegpt\"?",
        "x.toml:18: dataset.sources[1].split: expected a split name",
        "x.toml:15: dataset.sources[1].source: missing.jsonl does not exist",
        "dataset.sources: set either dataset.source or [[dataset.sources]] entries, not both",
        "dataset.sources[1].weight: missing; set a weight on every [[dataset.sources]] entry, or on none",
    ] {
        assert!(err.contains(want), "missing {want:?} in:\n{err}");
    }

    // The committed mixture recipe loads.
    let chat_mix = tuner::recipe::load(&repo().join("recipes/chat-mix.toml"), &[]).unwrap();
    assert_eq!(chat_mix.recipe.dataset.sources.len(), 3);
    assert_eq!(chat_mix.recipe.dataset.sources[0].split.as_ref().unwrap().as_str(), "train[:90%]");

    // A good mixture passes.
    let good = body
        .replace("source = \"data.jsonl\"\n\n[[", "\n[[")
        .replace("missing.jsonl", "data.jsonl")
        .replace("wieght", "weight")
        .replace("sharegtp", "alpaca")
        .replace("train[5]", "train[:50%]");
    let (code, err) = validate(&good);
    assert_eq!(code, 0, "{good}\n{err}");
}
