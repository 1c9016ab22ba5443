//! Shared test helpers: the tuner binary, temp dirs, and a tiny HF model folder
//! (byte-level BPE tokenizer with ChatML special tokens, a one-tensor safetensors).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn repo() -> PathBuf {
    // TUNER_TEST_REPO: the checkout when the test binary runs elsewhere (the GPU machine).
    std::env::var_os("TUNER_TEST_REPO").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// A `tuner` command with logging quiet unless asked for.
pub fn tuner() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tuner"));
    c.env("RUST_LOG", "warn").env("HF_HUB_OFFLINE", "1");
    c
}

/// Run `tuner` with args; return (exit code, stdout, stderr).
pub fn run(args: &[&str]) -> (i32, String, String) {
    let out: Output = tuner().args(args).output().expect("tuner binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A fresh temp dir.
pub fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("temp dir")
}

/// GPT-2's byte → printable-char table used by byte-level BPE.
fn byte_chars() -> Vec<char> {
    let mut keep: Vec<u32> = (33..=126).chain(161..=172).chain(174..=255).collect();
    let mut map = vec!['\0'; 256];
    for b in &keep {
        map[*b as usize] = char::from_u32(*b).unwrap();
    }
    let mut n = 0;
    for b in 0..256u32 {
        if !keep.contains(&b) {
            map[b as usize] = char::from_u32(256 + n).unwrap();
            n += 1;
            keep.push(b);
        }
    }
    map
}

/// A byte-level BPE tokenizer.json with 256 byte tokens, a few merges, and
/// `<|im_start|>` = 256, `<|im_end|>` = 257, `<|endoftext|>` = 258.
pub fn tiny_tokenizer_json() -> String {
    let chars = byte_chars();
    let mut vocab = serde_json::Map::new();
    for (i, c) in chars.iter().enumerate() {
        vocab.insert(c.to_string(), serde_json::json!(i));
    }
    for (i, s) in ["<|im_start|>", "<|im_end|>", "<|endoftext|>"].iter().enumerate() {
        vocab.insert(s.to_string(), serde_json::json!(256 + i));
    }
    // A few merges so that the BPE model is exercised: "th", "he", "in".
    let merges = [("t", "h"), ("h", "e"), ("i", "n")];
    for (k, (a, b)) in merges.iter().enumerate() {
        vocab.insert(format!("{a}{b}"), serde_json::json!(259 + k));
    }
    let special = |id: u32, s: &str| serde_json::json!({"id": id, "content": s, "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true});
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(256, "<|im_start|>"), special(257, "<|im_end|>"), special(258, "<|endoftext|>")],
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
            "vocab": vocab,
            "merges": merges.iter().map(|(a, b)| format!("{a} {b}")).collect::<Vec<_>>(),
        }
    })
    .to_string()
}

/// A ChatML Jinja chat template, as SmolLM2 and Qwen ship it.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// Write a tiny HF model folder (llama config, tokenizer, one-tensor safetensors) into `dir`.
pub fn tiny_model(dir: &Path) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tiny_tokenizer_json()).unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        serde_json::json!({"bos_token": null, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>", "chat_template": CHATML_TEMPLATE}).to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::json!({
            "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 262, "hidden_size": 8,
            "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
            "eos_token_id": 257, "torch_dtype": "float32"
        })
        .to_string(),
    )
    .unwrap();
    let data: Vec<u8> = (0..262 * 8).flat_map(|i| ((i as f32) * 0.001).to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![262, 8], &data).unwrap();
    safetensors::serialize_to_file([("model.embed_tokens.weight", view)], None, &dir.join("model.safetensors"))
        .unwrap();
    dir.to_path_buf()
}

/// Write a recipe into `dir/recipe.toml` that trains on the tiny model and the
/// given dataset; `extra` is appended (more keys or sections).
pub fn tiny_recipe(dir: &Path, model: &Path, dataset: &Path, extra: &str) -> PathBuf {
    let text = format!(
        r#"[run]
name = "t"
output_dir = "runs"

[model]
source = "{}"

[dataset]
source = "{}"
eval_ratio = 0.1
shard_rows = 50

[train]
max_seq_length = 1024
max_steps = 2
{extra}
"#,
        model.strip_prefix(dir).unwrap_or(model).display(),
        dataset.display()
    );
    let p = dir.join("recipe.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// The generated Alpaca-format training set shipped in the repo.
pub fn requests_train() -> PathBuf {
    repo().join("datasets/requests-json/train.jsonl")
}

/// Copy a committed fixture model (tests/fixtures/models/<name>) into `dir`.
pub fn fixture_model(name: &str, dir: &Path) -> PathBuf {
    let src = repo().join("tests/fixtures/models").join(name);
    std::fs::create_dir_all(dir).unwrap();
    for e in std::fs::read_dir(&src).unwrap_or_else(|_| panic!("missing fixture {}", src.display())).flatten() {
        std::fs::copy(e.path(), dir.join(e.file_name())).unwrap();
    }
    dir.to_path_buf()
}

/// A recipe that trains the `llama` fixture on the shipped request→JSON data with a
/// short inline prompt (byte-level tokens keep rows short), in a few seconds on a CPU.
pub fn train_recipe(dir: &Path, extra_train: &str) -> PathBuf {
    fixture_model("llama", &dir.join("model"));
    let text = format!(
        r#"[run]
name = "t"
output_dir = "runs"
seed = 7

[model]
source = "model"

[lora]
r = 4
alpha = 8

[prompt]
template = "{{input}}\n{{output}}"

[dataset]
source = "{}"
eval_ratio = 0.05
max_samples = 400

[train]
max_seq_length = 192
micro_batch_size = 4
gradient_accumulation_steps = 2
max_steps = 6
learning_rate = 3e-3
warmup_steps = 1
save_steps = 2
keep_checkpoints = 2
{extra_train}
"#,
        requests_train().display()
    );
    let p = dir.join("recipe.toml");
    std::fs::write(&p, text).unwrap();
    p
}

/// The runs of consecutive trained tokens (label ≠ −100) of an example.
pub fn trained_runs(ids: &[i32], labels: &[i32]) -> Vec<Vec<i32>> {
    let mut runs = vec![];
    let mut cur = vec![];
    for (t, l) in ids.iter().zip(labels) {
        if *l != -100 {
            cur.push(*t);
        } else if !cur.is_empty() {
            runs.push(std::mem::take(&mut cur));
        }
    }
    if !cur.is_empty() {
        runs.push(cur);
    }
    runs
}

/// The pinned Python of scripts/bootstrap (transformers, peft, bitsandbytes).
pub fn python() -> PathBuf {
    let home = std::env::var("TUNER_HOME").map(PathBuf::from).unwrap_or_else(|_| {
        PathBuf::from(std::env::var("HOME").unwrap_or_else(|_| "/root".into())).join(".cache/tuner")
    });
    let p = home.join("venv/bin/python");
    assert!(p.is_file(), "{} is missing: run scripts/bootstrap", p.display());
    p
}

/// Run scripts/check_export.py (transformers, peft, bitsandbytes) with `args` and `--out`;
/// returns its JSON report and the tensors it wrote.
pub fn check_script(args: &[String]) -> (serde_json::Value, Vec<(String, tch::Tensor)>) {
    let out = tmp();
    let file = out.path().join("out.safetensors");
    let o = std::process::Command::new(python())
        .arg(repo().join("scripts/check_export.py"))
        .args(args)
        .arg("--out")
        .arg(&file)
        .env("TRANSFORMERS_VERBOSITY", "error")
        .env("HF_HUB_OFFLINE", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "check_export.py failed:\n{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    let report: serde_json::Value =
        serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    (report, tch::Tensor::read_safetensors(&file).unwrap())
}

/// A fixture model (fp32, CPU; NF4 when `quantize`) with LoRA r4/alpha 8 on every linear
/// (init seed `init_seed`) and B drawn from N(0, 0.1²) with seed `b_seed`, so that gradients
/// reach A too.
pub fn lora_fixture(name: &str, quantize: bool, init_seed: i64, b_seed: i64) -> Box<dyn tuner::model::CausalLm> {
    lora_fixture_seeded(name, quantize, init_seed, b_seed, tch::Device::Cpu, tch::Kind::Float)
}

/// `n` synthetic tokenized examples for the fixtures' 290-token vocabulary: example i has
/// 9 + step·i tokens, the first 4 untrained (label -100).
#[allow(dead_code)]
pub fn examples(n: usize, step: i32) -> Vec<tuner::data::shards::Example> {
    (0..n)
        .map(|i| {
            let ids: Vec<i32> = (0..(9 + step * i as i32)).map(|k| (k * 7 + i as i32 * 13) % 290).collect();
            let labels = ids.iter().enumerate().map(|(k, x)| if k < 4 { -100 } else { *x }).collect();
            tuner::data::shards::Example { input_ids: ids, labels }
        })
        .collect()
}

/// [`lora_fixture`] (seeds 3 and 11) on `device` in `dtype`.
#[allow(dead_code)]
pub fn lora_fixture_on(
    name: &str,
    quantize: bool,
    device: tch::Device,
    dtype: tch::Kind,
) -> Box<dyn tuner::model::CausalLm> {
    lora_fixture_seeded(name, quantize, 3, 11, device, dtype)
}

/// [`lora_fixture_on`] with the CUDA kernels off (every block on its reference path), dense.
#[allow(dead_code)]
pub fn lora_fixture_reference_on(name: &str, device: tch::Device, dtype: tch::Kind) -> Box<dyn tuner::model::CausalLm> {
    lora_fixture_with(name, false, 3, 11, device, dtype, false)
}

fn lora_fixture_seeded(
    name: &str,
    quantize: bool,
    init_seed: i64,
    b_seed: i64,
    device: tch::Device,
    dtype: tch::Kind,
) -> Box<dyn tuner::model::CausalLm> {
    lora_fixture_with(name, quantize, init_seed, b_seed, device, dtype, true)
}

fn lora_fixture_with(
    name: &str,
    quantize: bool,
    init_seed: i64,
    b_seed: i64,
    device: tch::Device,
    dtype: tch::Kind,
    cuda_kernels: bool,
) -> Box<dyn tuner::model::CausalLm> {
    use tuner::model::{self, lora};
    let quantize = quantize.then_some((tuner::quant::QuantType::Nf4, 64, true));
    let mut m = model::load(
        &repo().join("tests/fixtures/models").join(name),
        &model::LoadOptions { dtype, device, quantize, cuda_kernels },
    )
    .unwrap();
    let spec = lora::LoraSpec { r: 4, alpha: 8.0, dropout: 0.0, use_rslora: false, targets: lora::Targets::AllLinear };
    lora::attach(m.as_mut(), &spec, init_seed).unwrap();
    tch::manual_seed(b_seed);
    let _g = tch::no_grad_guard();
    for p in lora::trainable_parameters(m.as_ref()) {
        if p.size()[1] == 4 {
            let mut p = p;
            p.copy_(&(tch::Tensor::randn(p.size(), (tch::Kind::Float, tch::Device::Cpu)) * 0.1).to_device(device));
        }
    }
    m
}

/// A copy of fixture `name` in `dir` whose weights pass through `edit(name, tensor)` (e.g. to
/// zero an embedding row or plant a NaN); returns the folder.
#[allow(dead_code)]
pub fn edited_fixture(name: &str, dir: &Path, edit: impl Fn(&str, tch::Tensor) -> tch::Tensor) -> PathBuf {
    fixture_model(name, dir);
    let file = dir.join("model.safetensors");
    let tensors: Vec<(String, tch::Tensor)> = tch::Tensor::read_safetensors(&file)
        .unwrap()
        .into_iter()
        .map(|(n, t)| {
            let t = edit(&n, t);
            (n, t)
        })
        .collect();
    tch::Tensor::write_safetensors(&tensors, &file).unwrap();
    dir.to_path_buf()
}

/// Say that a test did not run here, past libtest's output capture (which only takes the print
/// macros), so a GPU-only test on a CPU machine reads as skipped rather than as passed.
pub fn skipped(test: &str, why: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
}
