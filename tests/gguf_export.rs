//! GGUF export of the Phi-3, Gemma 2, Gemma 3 and Gemma 3n fixture models (`tuner::gguf::export`):
//! what gguf-py reads back (tensor names against gguf-py's own name map, shapes, metadata
//! values against the fixture configs and llama.cpp's converter), the values as llama.cpp
//! stores them (Gemma 2/3 norms as `1 + w`, Gemma 3n's stacked AltUp projections and padded
//! per-layer embedding), and the round trip: tuner's own import of each file gives the logits of
//! the HF folder whose matrices are rounded to f16 as the file stores them.

use crate::common::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};
use tuner::gguf::export::{write_gguf, GgufType};
use tuner::gguf::import::import_gguf;
use tuner::gguf::{GgmlType, GgufFile};
use tuner::model::{self, Batch, CausalLm, LoadOptions};

const FAMILIES: [&str; 4] = ["phi3", "gemma2", "gemma3", "gemma3n"];

fn fixture(family: &str) -> PathBuf {
    repo().join("tests/fixtures/models").join(family)
}

/// The fixture exported as F16 GGUF into `dir`.
fn export(family: &str, dir: &Path) -> PathBuf {
    let path = dir.join(format!("{family}.gguf"));
    write_gguf(&fixture(family), &path, GgufType::F16, family).unwrap_or_else(|e| panic!("{family}: {e:#}"));
    path
}

/// scripts/gguf_inspect.py's report on `file` (gguf-py 0.17.1), with gguf-py's names for `hf`'s tensors.
fn inspect(file: &Path, hf: &Path) -> Value {
    let o = std::process::Command::new(python())
        .arg(repo().join("scripts/gguf_inspect.py"))
        .arg(file)
        .arg("--hf")
        .arg(hf)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "gguf_inspect.py failed:\n{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn hf_tensors(dir: &Path) -> Vec<(String, Tensor)> {
    Tensor::read_safetensors(dir.join("model.safetensors")).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.to_kind(Kind::Float).contiguous().view([-1])).unwrap()
}

/// f32 values as an f16 round trip would leave them.
fn f16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|x| half::f16::from_f32(*x).to_f32()).collect()
}

/// Metadata the converter writes for each fixture (values from its config.json).
fn expected_metadata(family: &str) -> Vec<(&'static str, Value)> {
    let inf = json!("-inf");
    match family {
        "phi3" => vec![
            ("phi3.context_length", json!(64)),
            ("phi3.embedding_length", json!(64)),
            ("phi3.feed_forward_length", json!(96)),
            ("phi3.block_count", json!(2)),
            ("phi3.attention.head_count", json!(4)),
            ("phi3.attention.head_count_kv", json!(2)),
            ("phi3.rope.dimension_count", json!(16)),
            ("phi3.rope.freq_base", json!(10000.0)),
            ("phi3.attention.sliding_window", json!(5)),
            ("phi3.rope.scaling.original_context_length", json!(4096)),
        ],
        "gemma2" => vec![
            ("gemma2.attention.key_length", json!(16)),
            ("gemma2.attn_logit_softcapping", json!(50.0)),
            ("gemma2.final_logit_softcapping", json!(30.0)),
            ("gemma2.attention.sliding_window", json!(4)),
            ("gemma2.attention.sliding_window_pattern", json!([true, false, true, false])),
        ],
        "gemma3" => vec![
            ("gemma3.rope.freq_base", json!(1e6)),
            ("gemma3.rope.freq_base_swa", json!(1e4)),
            ("gemma3.rope.scaling.type", json!("linear")),
            ("gemma3.rope.scaling.factor", json!(8.0)),
            ("gemma3.attention.sliding_window", json!(4)),
            ("gemma3.attention.sliding_window_pattern", json!([true, true, false, true])),
        ],
        _ => vec![
            ("gemma3n.feed_forward_length", json!([96, 96, 128, 64, 96, 128])),
            ("gemma3n.altup.active_idx", json!(0)),
            ("gemma3n.altup.num_inputs", json!(4)),
            ("gemma3n.embedding_length_per_layer_input", json!(16)),
            ("gemma3n.attention.shared_kv_layers", json!(3)),
            ("gemma3n.final_logit_softcapping", json!(30.0)),
            ("gemma3n.rope.freq_base", json!(1e6)),
            ("gemma3n.rope.freq_base_swa", json!(1e4)),
            ("gemma3n.attention.sliding_window_pattern", json!([true, true, false, true, true, false])),
            // torch.distributions.Normal(0, 1).icdf of 0.95, 0.95, 0.75, 0, 0, 0 (as the converter).
            ("gemma3n.activation_sparsity_scale", json!([1.6448536, 1.6448536, 0.6744898, inf, inf, inf])),
        ],
    }
}

fn assert_meta(family: &str, meta: &Value) {
    assert_eq!(meta["general.architecture"], family, "{family}");
    assert_eq!(meta["tokenizer.ggml.model"], "gpt2", "{family}");
    for (key, want) in expected_metadata(family) {
        let got = &meta[key];
        let close = match (got, &want) {
            (Value::Array(g), Value::Array(w)) => g.len() == w.len() && g.iter().zip(w).all(|(g, w)| same(g, w)),
            _ => same(got, &want),
        };
        assert!(close, "{family}: {key} = {got}, expected {want}");
    }
    if family == "gemma2" || family == "gemma3" {
        // query_pre_attn_scalar 24 / 32 over head_dim 16: the scale llama.cpp cannot infer.
        let s = if family == "gemma2" { 24.0f64 } else { 32.0 };
        assert!(same(&meta[format!("{family}.attention.scale")], &json!(1.0 / s.sqrt())), "{family}");
    }
    assert!(meta.get(format!("{family}.attention.key_length")).is_some() || family == "phi3");
}

/// Numbers equal to f32 precision; anything else equal.
fn same(a: &Value, b: &Value) -> bool {
    match (a.as_f64(), b.as_f64()) {
        (Some(x), Some(y)) => (x - y).abs() <= 1e-6 * y.abs().max(1e-30),
        _ => a == b,
    }
}

/// The GGUF names of the fixture's tensors per llama.cpp (gguf-py 0.17.1's TensorNameMap where it
/// knows the architecture; for gemma3n, llama.cpp's current `constants.py` / `tensor_mapping.py`).
fn expected_names(family: &str, report: &Value, hf: &[(String, Tensor)]) -> BTreeSet<String> {
    if let Some(mapped) = report["mapped"].as_object() {
        return mapped
            .iter()
            .map(|(k, v)| v.as_str().unwrap_or_else(|| panic!("{family}: gguf-py has no name for `{k}`")).to_string())
            .collect();
    }
    assert_eq!(family, "gemma3n");
    let layer = [
        "attn_norm",
        "attn_q",
        "attn_k",
        "attn_v",
        "attn_output",
        "attn_q_norm",
        "attn_k_norm",
        "post_attention_norm",
        "ffn_norm",
        "ffn_gate",
        "ffn_up",
        "ffn_down",
        "post_ffw_norm",
        "inp_gate",
        "proj",
        "post_norm",
        "altup_correct_coef",
        "altup_correct_scale",
        "altup_predict_coef",
        "altup_router",
        "altup_router_norm",
        "laurel_l",
        "laurel_r",
        "laurel_post_norm",
    ];
    let top = [
        "token_embd",
        "output_norm",
        "per_layer_token_embd",
        "per_layer_model_proj",
        "per_layer_proj_norm",
        "altup_proj",
        "altup_unembd_proj",
    ];
    let layers = hf.iter().filter(|(n, _)| n.ends_with("input_layernorm.weight")).count();
    // The fixture's last 3 layers (num_kv_shared_layers) reuse earlier K/V and store no k/v
    // projections nor k norm.
    let own_kv = |i: usize, p: &str| i < layers - 3 || !["attn_k", "attn_v", "attn_k_norm"].contains(&p);
    let mut names: BTreeSet<String> = top.iter().map(|t| format!("{t}.weight")).collect();
    names.extend(
        (0..layers)
            .flat_map(|i| layer.iter().filter(move |p| own_kv(i, p)).map(move |p| format!("blk.{i}.{p}.weight"))),
    );
    names
}

#[test]
fn phi3_and_gemma_gguf_names_shapes_and_metadata_read_back_in_gguf_py() {
    let out = tmp();
    for family in FAMILIES {
        let path = export(family, out.path());
        let report = inspect(&path, &fixture(family));
        assert_meta(family, &report["metadata"]);
        let hf = hf_tensors(&fixture(family));
        let tensors = report["tensors"].as_array().unwrap();
        let got: BTreeSet<String> = tensors.iter().map(|t| t["name"].as_str().unwrap().to_string()).collect();
        assert_eq!(got, expected_names(family, &report, &hf), "{family}: tensor names");
        let shape = |n: &str| tensors.iter().find(|t| t["name"] == n).unwrap()["shape"].clone();
        let ty = |n: &str| tensors.iter().find(|t| t["name"] == n).unwrap()["type"].clone();
        assert_eq!(ty("blk.0.attn_norm.weight"), "F32", "{family}: norms stay F32");
        assert_eq!(ty("blk.0.ffn_down.weight"), "F16", "{family}");
        match family {
            "phi3" => {
                assert_eq!(shape("blk.0.attn_qkv.weight"), json!([128, 64]), "fused q, k, v");
                assert_eq!(shape("blk.1.ffn_up.weight"), json!([192, 64]), "fused gate and up");
                assert_eq!(shape("output.weight"), json!([320, 64]), "untied head");
            }
            "gemma3n" => {
                assert_eq!(shape("altup_proj.weight"), json!([3, 64, 64]), "three streams stacked");
                assert_eq!(shape("altup_unembd_proj.weight"), json!([3, 64, 64]));
                assert_eq!(shape("per_layer_token_embd.weight"), json!([384, 96]), "padded to the vocabulary");
                assert_eq!(shape("blk.5.altup_correct_scale.weight"), json!([64]));
                assert_eq!(shape("blk.2.ffn_gate.weight"), json!([128, 64]), "per-layer MLP width");
            }
            _ => assert!(!got.contains("output.weight"), "{family}: tied head is not written"),
        }
    }
}

#[test]
fn gemma_gguf_values_follow_llama_cpp_conventions() {
    let out = tmp();
    for family in FAMILIES {
        let g = GgufFile::open(export(family, out.path())).unwrap();
        let names = tuner::gguf::names::Names::of(tuner::gguf::GgufArch::from_name(family).unwrap());
        let shift = if family == "gemma2" || family == "gemma3" { 1.0 } else { 0.0 };
        for (hf, t) in hf_tensors(&fixture(family)) {
            let target = names.to_gguf(&hf).unwrap();
            let (got, _) = g.tensor_f32(&target.name).unwrap();
            let mut want = values(&t);
            if t.dim() >= 2 {
                want = f16(&want);
            }
            if hf.ends_with("norm.weight") {
                want.iter_mut().for_each(|x| *x += shift);
            }
            let got = match target.stack_index {
                Some(i) => got[i * want.len()..(i + 1) * want.len()].to_vec(),
                None => got,
            };
            if hf == "model.embed_tokens_per_layer.weight" {
                assert!(got[want.len()..].iter().all(|x| *x == 0.0), "padding rows are zero");
            }
            assert_eq!(&got[..want.len()], &want[..], "{family}: {hf} ↔ {}", target.name);
        }
        if family == "gemma3n" {
            let ty = g.tensor("blk.0.altup_correct_scale.weight").unwrap().ggml_type;
            assert_eq!(ty, GgmlType::F32);
        }
    }
}

/// The fixture with every matrix rounded to f16 (what an F16 GGUF stores), in `dir`.
fn f16_copy(family: &str, dir: &Path) {
    let src = fixture(family);
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    let ts: Vec<(String, Tensor)> = hf_tensors(&src)
        .into_iter()
        .map(|(n, t)| {
            let t = if t.dim() >= 2 { t.to_kind(Kind::Half).to_kind(Kind::Float) } else { t.to_kind(Kind::Float) };
            (n, t)
        })
        .collect();
    Tensor::write_safetensors(&ts, dir.join("model.safetensors")).unwrap();
}

fn load(dir: &Path) -> Box<dyn CausalLm> {
    model::load(dir, &LoadOptions { dtype: Kind::Float, device: Device::Cpu, quantize: None, cuda_kernels: true })
        .unwrap_or_else(|e| panic!("{}: {e:#}", dir.display()))
}

fn logits(m: &dyn CausalLm, ids: &Tensor) -> Tensor {
    tch::no_grad(|| m.forward(&Batch::new(ids.shallow_clone(), None)).to_kind(Kind::Float))
}

#[test]
fn gemma_and_phi3_gguf_import_gives_the_exported_models_logits() {
    let mut errs = vec![];
    for family in FAMILIES {
        let out = tmp();
        let path = export(family, out.path());
        let imported = out.path().join("imported");
        let summary = import_gguf(&path, &imported).unwrap_or_else(|e| panic!("{family}: {e:#}"));
        assert_eq!(summary.architecture, family);
        let rounded = out.path().join("rounded");
        std::fs::create_dir_all(&rounded).unwrap();
        f16_copy(family, &rounded);
        let reference = Tensor::read_safetensors(fixture(family).join("reference.safetensors")).unwrap();
        let ids = reference.iter().find(|(n, _)| n == "input_ids").unwrap().1.shallow_clone();
        let want = logits(load(&rounded).as_ref(), &ids);
        let got = logits(load(&imported).as_ref(), &ids);
        let e = (&got - &want).abs().max().double_value(&[]) / want.abs().max().double_value(&[]);
        errs.push((family, e));
        assert!(e <= 1e-5, "{family}: imported logits differ by {e:e} (relative)");
    }
    eprintln!("GGUF export → import → logits vs the f16-rounded HF model: {errs:?}");
}
