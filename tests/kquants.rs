//! K-quants and the `q4_k_m` GGUF export: tuner's ports of llama.cpp's reference quantizers
//! give the bytes llama.cpp's own C code gives (tests/fixtures/kquants/kquants.gguf, written by
//! scripts/gen_kquants_fixture.py from the llama-cpp-python 0.3.36 sdist), tuner's dequantizers
//! give gguf-py's values, the Q4_K_M type mix follows llama.cpp's `llama_tensor_get_type`, and a
//! q4_k_m export reads back through tuner's importer with logits near the original model's.

use crate::common::*;
use std::path::{Path, PathBuf};
use tch::{Device, Kind, Tensor};
use tuner::export::gguf::{quantize_q8_0, write_gguf, GgufType};
use tuner::gguf::kquants::{self, TensorSpec};
use tuner::gguf::{dequantize, GgmlType, GgufFile};
use tuner::model::{self, Batch, LoadOptions};

fn fixture() -> GgufFile {
    GgufFile::open(repo().join("tests/fixtures/kquants/kquants.gguf")).unwrap()
}

/// The fixture's row names (what each 256-value row exercises).
fn row_names(g: &GgufFile) -> Vec<String> {
    g.get_array("fixture.rows").unwrap().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect()
}

#[test]
fn quantizers_give_llama_cpp_bytes() {
    let g = fixture();
    let names = row_names(&g);
    let (input, shape) = g.tensor_f32("input").unwrap();
    assert_eq!(shape, [names.len(), 256]);
    type Quantizer = fn(&[f32]) -> Vec<u8>;
    let cases: [(&str, Quantizer); 4] = [
        ("q4_k", kquants::quantize_q4_k),
        ("q6_k", kquants::quantize_q6_k),
        ("q5_0", kquants::quantize_q5_0),
        ("q8_0", quantize_q8_0),
    ];
    for (ty, quantize) in cases {
        let want = g.tensor_data(ty).unwrap();
        let per_row = want.len() / names.len();
        for (r, name) in names.iter().enumerate() {
            let got = quantize(&input[r * 256..(r + 1) * 256]);
            let want = &want[r * per_row..(r + 1) * per_row];
            let first = got.iter().zip(want).position(|(a, b)| a != b);
            assert!(first.is_none(), "{ty} row `{name}`: byte {} differs from llama.cpp's", first.unwrap());
            assert_eq!(got.len(), want.len());
        }
    }
}

#[test]
fn dequantizers_give_gguf_py_values() {
    let g = fixture();
    let names = row_names(&g);
    let (input, _) = g.tensor_f32("input").unwrap();
    for (name, ty) in [("q4_k", GgmlType::Q4_K), ("q6_k", GgmlType::Q6_K), ("q5_0", GgmlType::Q5_0)] {
        assert_eq!(g.tensor(name).unwrap().ggml_type, ty);
        let got = dequantize(ty, g.tensor_data(name).unwrap(), input.len()).unwrap();
        let (want, _) = g.tensor_f32(&format!("{name}.dequant")).unwrap();
        for (i, (a, b)) in got.iter().zip(&want).enumerate() {
            // gguf-py computes in numpy f32; a different order may move the last bit.
            assert!(
                (a - b).abs() <= 1e-6 * b.abs().max(1e-30),
                "{name} row `{}` value {i}: {a} vs {b}",
                names[i / 256]
            );
        }
        // And the round trip is close to the input where the row is representable.
        let row = names.iter().position(|n| n == "normal").unwrap();
        let err = (0..256).map(|i| (got[row * 256 + i] - input[row * 256 + i]).abs()).fold(0f32, f32::max);
        let bound = if ty == GgmlType::Q6_K { 0.08 } else { 0.3 };
        assert!(err < bound, "{name}: round-trip error {err} on `normal`");
    }
    let (zero, _) = g.tensor_f32("q4_k.dequant").unwrap();
    let r = names.iter().position(|n| n == "zero").unwrap();
    assert!(zero[r * 256..(r + 1) * 256].iter().all(|&v| v == 0.0), "an all-zero block stays zero");
}

#[test]
fn fp16_scales_round_like_ggml() {
    for v in [0.0f32, -0.0, 1.0, 1.0 / 63.0, 65504.0, 65519.0, 6.1e-5, 1e-7, 3e-8, -2.75e-3] {
        assert_eq!(kquants::fp32_to_fp16(v), half::f16::from_f32(v).to_bits(), "{v}");
    }
    assert_eq!(kquants::fp32_to_fp16(65520.0), 0x7C00, "overflow rounds to infinity");
    assert_eq!(kquants::fp32_to_fp16(f32::NAN), 0x7E00);
    assert_eq!(kquants::fp16_to_fp32(0x3C00), 1.0);
}

fn types(specs: &[(String, Vec<usize>)], n_layer: usize) -> Vec<(String, GgmlType)> {
    let s: Vec<TensorSpec> = specs.iter().map(|(n, s)| TensorSpec { name: n, shape: s }).collect();
    specs.iter().map(|(n, _)| n.clone()).zip(kquants::q4_k_m_types(&s, n_layer)).collect()
}

/// The tensors of a Llama GGUF in tuner's file order (embedding, layers, norm, output).
fn llama_specs(n_layer: usize, hidden: usize, ff: usize, kv: usize, tied: bool) -> Vec<(String, Vec<usize>)> {
    let mut v = vec![("rope_freqs.weight".to_string(), vec![32]), ("token_embd.weight".into(), vec![320, hidden])];
    for i in 0..n_layer {
        for (part, shape) in [
            ("attn_norm", vec![hidden]),
            ("ffn_down", vec![hidden, ff]),
            ("ffn_gate", vec![ff, hidden]),
            ("ffn_up", vec![ff, hidden]),
            ("ffn_norm", vec![hidden]),
            ("attn_k", vec![kv, hidden]),
            ("attn_output", vec![hidden, hidden]),
            ("attn_q", vec![hidden, hidden]),
            ("attn_v", vec![kv, hidden]),
        ] {
            v.push((format!("blk.{i}.{part}.weight"), shape));
        }
    }
    v.push(("output_norm.weight".into(), vec![hidden]));
    if !tied {
        v.push(("output.weight".into(), vec![320, hidden]));
    }
    v
}

fn ty_of(t: &[(String, GgmlType)], name: &str) -> GgmlType {
    t.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no {name}")).1
}

#[test]
fn q4_k_m_types_follow_llama_cpp() {
    // 8 layers: use_more_bits picks layers 0, 3, 6, 7 (first and last eighth, every third between).
    let t = types(&llama_specs(8, 256, 512, 128, false), 8);
    assert_eq!(ty_of(&t, "rope_freqs.weight"), GgmlType::F32);
    assert_eq!(ty_of(&t, "token_embd.weight"), GgmlType::Q4_K, "untied: the embedding is an ordinary tensor");
    assert_eq!(ty_of(&t, "output.weight"), GgmlType::Q6_K);
    assert_eq!(ty_of(&t, "output_norm.weight"), GgmlType::F32);
    for i in 0..8 {
        let more = if [0, 3, 6, 7].contains(&i) { GgmlType::Q6_K } else { GgmlType::Q4_K };
        assert_eq!(ty_of(&t, &format!("blk.{i}.attn_v.weight")), more, "attn_v {i}");
        assert_eq!(ty_of(&t, &format!("blk.{i}.ffn_down.weight")), more, "ffn_down {i}");
        for part in ["attn_q", "attn_k", "attn_output", "ffn_gate", "ffn_up"] {
            assert_eq!(ty_of(&t, &format!("blk.{i}.{part}.weight")), GgmlType::Q4_K, "{part} {i}");
        }
        assert_eq!(ty_of(&t, &format!("blk.{i}.attn_norm.weight")), GgmlType::F32);
    }
    // 32 layers: llama.cpp's familiar pattern (0-3, 28-31, and 6, 9, ..., 27).
    let t = types(&llama_specs(32, 256, 512, 128, false), 32);
    let q6: Vec<usize> = (0..32).filter(|i| ty_of(&t, &format!("blk.{i}.ffn_down.weight")) == GgmlType::Q6_K).collect();
    assert_eq!(q6, [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]);

    // Tied: the embedding doubles as the output and gets the output's Q6_K.
    let t = types(&llama_specs(8, 256, 512, 128, true), 8);
    assert_eq!(ty_of(&t, "token_embd.weight"), GgmlType::Q6_K);

    // Rows that are not a multiple of 256 fall back: Q4_K -> Q5_0, Q6_K -> Q8_0, and F16 when
    // not a multiple of 32 either; the output becomes Q8_0 (and then F16 the same way).
    let t = types(&llama_specs(2, 64, 96, 32, false), 2);
    assert_eq!(ty_of(&t, "token_embd.weight"), GgmlType::Q5_0);
    assert_eq!(ty_of(&t, "output.weight"), GgmlType::Q8_0);
    assert_eq!(ty_of(&t, "blk.0.attn_v.weight"), GgmlType::Q5_0);
    assert_eq!(ty_of(&t, "blk.1.attn_v.weight"), GgmlType::Q8_0, "use_more_bits(1, 2)");
    assert_eq!(ty_of(&t, "blk.0.ffn_down.weight"), GgmlType::Q5_0, "rows of 96");
    assert_eq!(ty_of(&t, "blk.1.ffn_down.weight"), GgmlType::Q8_0);
    let t = types(&llama_specs(2, 48, 80, 32, true), 2);
    assert_eq!(ty_of(&t, "token_embd.weight"), GgmlType::F16, "rows of 48: Q8_0 does not fit");
    assert_eq!(ty_of(&t, "blk.0.attn_q.weight"), GgmlType::F16);
    assert_eq!(ty_of(&t, "blk.0.ffn_down.weight"), GgmlType::F16, "rows of 80");
}

fn load_logits(dir: &Path, ids: &Tensor) -> Tensor {
    let m =
        model::load(dir, &LoadOptions { dtype: Kind::Float, device: Device::Cpu, quantize: None, cuda_kernels: true })
            .unwrap();
    tch::no_grad(|| m.forward(&Batch::new(ids.shallow_clone(), None)).to_kind(Kind::Float))
}

fn fixture_ids() -> Tensor {
    let t = Tensor::read_safetensors(repo().join("tests/fixtures/models/llama/reference.safetensors")).unwrap();
    t.into_iter().find(|(n, _)| n == "input_ids").unwrap().1
}

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[])
}

/// Drop `rope_scaling` from a model folder's config.json (tuner's importer does not read
/// llama.cpp's `rope_freqs.weight`, which the Llama-3 scaling exports).
fn plain_rope(dir: &Path) {
    let p = dir.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    cfg.as_object_mut().unwrap().remove("rope_scaling");
    std::fs::write(&p, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
}

/// A copy of the HF folder `src` at `dst` whose 2-D weights went through the quantizer of
/// their type in the GGUF `g` and back (rows are whole blocks, so Q/K's row permutation in the
/// file does not change the values).
fn fake_quantized(src: &Path, g: &GgufFile, dst: &Path) {
    std::fs::create_dir_all(dst).unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    let tensors: Vec<(String, Tensor)> = Tensor::read_safetensors(src.join("model.safetensors"))
        .unwrap()
        .into_iter()
        .map(|(name, t)| {
            if t.dim() != 2 {
                return (name, t);
            }
            let ty = g
                .tensor(&tuner::gguf::names::Names::of(tuner::gguf::GgufArch::Llama).to_gguf(&name).unwrap().name)
                .unwrap()
                .ggml_type;
            let v = Vec::<f32>::try_from(t.to_kind(Kind::Float).contiguous().view([-1])).unwrap();
            let bytes = match ty {
                GgmlType::Q8_0 => quantize_q8_0(&v),
                GgmlType::F16 => v.iter().flat_map(|x| half::f16::from_f32(*x).to_bits().to_le_bytes()).collect(),
                other => kquants::quantize(other, &v).unwrap(),
            };
            let back = dequantize(ty, &bytes, v.len()).unwrap();
            (name, Tensor::from_slice(&back).view(t.size().as_slice()))
        })
        .collect();
    Tensor::write_safetensors(&tensors, dst.join("model.safetensors")).unwrap();
}

/// Export `dir` (without rope scaling) as q4_k_m and import it back. Returns the relative
/// logit error of the import against `dir`, after checking that the import has exactly the
/// logits of `dir` with every weight quantized and dequantized in memory (the file adds nothing).
fn round_trip(dir: &Path, out: &Path) -> f64 {
    let path = out.join("plain-q4_k_m.gguf");
    write_gguf(dir, &path, GgufType::Q4KM, "t").unwrap();
    let imported = out.join("imported");
    tuner::gguf::import::import_gguf(&path, &imported).unwrap();
    let fake = out.join("fake-quantized");
    fake_quantized(dir, &GgufFile::open(&path).unwrap(), &fake);
    let ids = fixture_ids();
    let got = load_logits(&imported, &ids);
    let exact = rel(&got, &load_logits(&fake, &ids));
    assert!(exact <= 1e-6, "import vs in-memory quantization: rel logit error {exact:e}");
    rel(&got, &load_logits(dir, &ids))
}

#[test]
fn q4_k_m_export_of_the_llama_fixture_falls_back_to_32_blocks() {
    // Rows of 64 and 96: no tensor can be Q4_K/Q6_K, as llama-quantize would also find.
    let d = tmp();
    let src = repo().join("tests/fixtures/models/llama");
    let path = d.path().join("model-q4_k_m.gguf");
    let summary = write_gguf(&src, &path, GgufType::Q4KM, "t").unwrap();
    assert_eq!(summary.types.get("Q5_0"), Some(&13), "{:?}", summary.types);
    assert_eq!(summary.types.get("Q8_0"), Some(&3), "{:?}", summary.types);
    assert_eq!(summary.f16_fallback.len(), 16, "every 2-D tensor falls back");
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.get_u64("general.file_type").unwrap(), Some(15));
    let ty = |n: &str| g.tensor(n).unwrap().ggml_type;
    assert_eq!(ty("token_embd.weight"), GgmlType::Q5_0);
    assert_eq!(ty("output.weight"), GgmlType::Q8_0);
    assert_eq!(ty("blk.0.attn_v.weight"), GgmlType::Q5_0);
    assert_eq!(ty("blk.1.attn_v.weight"), GgmlType::Q8_0);
    assert_eq!(ty("blk.1.ffn_down.weight"), GgmlType::Q8_0);
    assert_eq!(ty("blk.0.attn_norm.weight"), GgmlType::F32);
    assert_eq!(ty("rope_freqs.weight"), GgmlType::F32);
    // The embedding's bytes are quantize_row_q5_0_ref of the checkpoint's values.
    let emb = tuner::model::Weights::open(&src).unwrap().get("model.embed_tokens.weight").unwrap();
    let v = Vec::<f32>::try_from(emb.to_kind(Kind::Float).contiguous().view([-1])).unwrap();
    assert_eq!(g.tensor_data("token_embd.weight").unwrap(), kquants::quantize_q5_0(&v).as_slice());
    let plain = fixture_model("llama", &d.path().join("plain"));
    plain_rope(&plain);
    let err = round_trip(&plain, d.path());
    // Measured 0.30 (max |Δ| / max |logit|): 5-bit weights in a random model whose std-0.2
    // weights amplify every change layer by layer (Q8_0 measures 0.01 in tests/export.rs).
    eprintln!("q4_k_m round trip of the llama fixture (Q5_0/Q8_0): rel logit error {err:.3e}");
    assert!(err < 0.4, "rel logit error {err:e}");
}

/// A Llama folder like the fixture but 256 wide (so K-quants apply): 4 layers, 4 heads of 64,
/// 2 KV heads, MLP 512, untied, random weights (std 0.05, norms in [0.5, 1.5]).
fn wide_llama(dir: &Path) -> PathBuf {
    fixture_model("llama", dir);
    let cfg_path = dir.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    for (k, v) in [("hidden_size", 256), ("intermediate_size", 512), ("num_hidden_layers", 4), ("head_dim", 64)] {
        cfg[k] = v.into();
    }
    std::fs::write(&cfg_path, serde_json::to_string_pretty(&cfg).unwrap()).unwrap();
    tch::manual_seed(20261202);
    let randn = |s: &[i64]| Tensor::randn(s, (Kind::Float, Device::Cpu)) * 0.05;
    let norm = |n: i64| Tensor::rand([n], (Kind::Float, Device::Cpu)) + 0.5;
    let mut t: Vec<(String, Tensor)> = vec![
        ("model.embed_tokens.weight".into(), randn(&[320, 256]) * 10.0),
        ("lm_head.weight".into(), randn(&[320, 256])),
    ];
    t.push(("model.norm.weight".into(), norm(256)));
    for i in 0..4 {
        let p = format!("model.layers.{i}.");
        for (n, s) in [
            ("self_attn.q_proj", [256, 256]),
            ("self_attn.k_proj", [128, 256]),
            ("self_attn.v_proj", [128, 256]),
            ("self_attn.o_proj", [256, 256]),
            ("mlp.gate_proj", [512, 256]),
            ("mlp.up_proj", [512, 256]),
            ("mlp.down_proj", [256, 512]),
        ] {
            t.push((format!("{p}{n}.weight"), randn(&s)));
        }
        t.push((format!("{p}input_layernorm.weight"), norm(256)));
        t.push((format!("{p}post_attention_layernorm.weight"), norm(256)));
    }
    Tensor::write_safetensors(&t, dir.join("model.safetensors")).unwrap();
    dir.to_path_buf()
}

#[test]
fn q4_k_m_export_of_a_256_wide_llama() {
    let d = tmp();
    let src = wide_llama(&d.path().join("model"));
    let path = d.path().join("model-q4_k_m.gguf");
    write_gguf(&src, &path, GgufType::Q4KM, "t").unwrap();
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.get_u64("general.file_type").unwrap(), Some(15));
    let ty = |n: &str| g.tensor(n).unwrap().ggml_type;
    assert_eq!(ty("token_embd.weight"), GgmlType::Q4_K);
    assert_eq!(ty("output.weight"), GgmlType::Q6_K);
    // use_more_bits(i, 4): layers 2 and 3.
    for (i, want) in [(0, GgmlType::Q4_K), (1, GgmlType::Q4_K), (2, GgmlType::Q6_K), (3, GgmlType::Q6_K)] {
        assert_eq!(ty(&format!("blk.{i}.attn_v.weight")), want, "attn_v {i}");
        assert_eq!(ty(&format!("blk.{i}.ffn_down.weight")), want, "ffn_down {i}");
        assert_eq!(ty(&format!("blk.{i}.attn_q.weight")), GgmlType::Q4_K);
        assert_eq!(ty(&format!("blk.{i}.ffn_up.weight")), GgmlType::Q4_K);
        assert_eq!(ty(&format!("blk.{i}.ffn_norm.weight")), GgmlType::F32);
    }
    let w = tuner::model::Weights::open(&src).unwrap();
    let values = |n: &str| Vec::<f32>::try_from(w.get(n).unwrap().contiguous().view([-1])).unwrap();
    assert_eq!(g.tensor_data("output.weight").unwrap(), kquants::quantize_q6_k(&values("lm_head.weight")).as_slice());
    assert_eq!(
        g.tensor_data("blk.0.ffn_up.weight").unwrap(),
        kquants::quantize_q4_k(&values("model.layers.0.mlp.up_proj.weight")).as_slice()
    );
    plain_rope(&src);
    let err = round_trip(&src, d.path());
    // Measured 0.195 (max |Δ| / max |logit|) for this Q4_K/Q6_K mix of random weights.
    eprintln!("q4_k_m round trip of a 256-wide llama: rel logit error {err:.3e}");
    assert!(err < 0.3, "rel logit error {err:e}");
}
