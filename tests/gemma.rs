//! Gemma 3n training: checkpointed gradients through KV sharing and AltUp equal plain autograd
//! and finite differences, a pre-quantized multimodal-layout checkpoint trains on the CPU with
//! PEFT keys under `model.language_model`, and Gemma's chat template trains `<end_of_turn>`,
//! which also stops generation; its adapter and merged export load in transformers + peft with
//! tuner's logits. (HF logit parity of the Gemma families lives in `model`,
//! `score` and `generate`.)

use crate::common::*;
use serde_json::Value;
use std::path::Path;
use tch::{Device, Kind, Tensor};
use tuner::model::{self, CausalLm};
use tuner::train::{data, step};

fn load_gemma3n(quantize: bool) -> Box<dyn CausalLm> {
    lora_fixture("gemma3n", quantize, 5, 3)
}

/// Two rows longer than the sliding window (4), of different lengths (padding), ids < 296.
fn batch() -> Vec<data::MicroBatch> {
    let rows: Vec<Vec<i64>> =
        vec![(0..14).map(|k| (k * 29 + 5) % 290).collect(), (0..10).map(|k| (k * 17 + 40) % 290).collect()];
    let labels =
        rows.iter().map(|r| r.iter().enumerate().map(|(k, x)| if k < 3 { -100 } else { *x }).collect()).collect();
    vec![data::MicroBatch { input_ids: rows, labels, seq_ids: None }]
}

/// Loss and LoRA gradients of one step; `hand` takes the family's own layer backward
/// (`CausalLm::layer_backward`, as on CUDA) in the checkpointed backward.
fn grads(m: &dyn CausalLm, checkpointing: bool, hand: bool) -> (f64, Vec<(String, Tensor)>) {
    for (_, p) in named_params(m) {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    let o = step::StepOptions {
        checkpointing,
        pad_id: 296,
        pad_multiple: 1,
        device: Device::Cpu,
        seed: 1,
        loss_scale: 1.0,
        hand_backward: hand,
        offload: false,
        profile: None,
        coalesce: None,
        detect_anomaly: false,
        op_census: None,
    };
    let r = step::forward_backward(m, &batch(), 0, &o);
    (r.loss, named_params(m).into_iter().map(|(n, p)| (n, p.grad().copy())).collect())
}

fn named_params(m: &dyn CausalLm) -> Vec<(String, Tensor)> {
    let mut out = vec![];
    for (name, lin) in m.linears() {
        if let Some(l) = &lin.lora {
            out.push((format!("{name}.lora_A"), l.a.shallow_clone()));
            out.push((format!("{name}.lora_B"), l.b.shallow_clone()));
        }
    }
    out
}

#[test]
fn gemma3n_checkpointed_gradients_equal_autograd_and_reach_the_kv_producers() {
    for quantize in [false, true] {
        let m = load_gemma3n(quantize);
        let (l_plain, g_plain) = grads(m.as_ref(), false, false);
        // Checkpointed, through autograd and through Gemma 3n's layer backward (its streams'
        // gradients assembled by hand).
        for hand in [false, true] {
            let (l_ck, g_ck) = grads(m.as_ref(), true, hand);
            assert!((l_plain - l_ck).abs() < 1e-5 * l_plain, "loss {l_plain} vs {l_ck}");
            for ((n, a), (_, b)) in g_plain.iter().zip(&g_ck) {
                let scale = a.abs().max().double_value(&[]);
                assert!(scale > 0.0, "{n}: no gradient");
                let e = (a - b).abs().max().double_value(&[]) / scale;
                assert!(
                    e < 1e-4,
                    "{n} (nf4 {quantize}, hand {hand}): checkpointed gradient differs by {e:.2e} relative"
                );
            }
        }
    }
    // Finite differences along the gradient of the sliding producer's k_proj (layer 1; layers 3
    // and 4 read its K): the analytic gradient must include the sharers' paths.
    let m = load_gemma3n(false);
    let (loss, g) = grads(m.as_ref(), true, true);
    let (name, grad) = g.iter().find(|(n, _)| n == "model.layers.1.self_attn.k_proj.lora_B").unwrap();
    let norm = grad.norm().double_value(&[]);
    let dir = grad / norm;
    let param = named_params(m.as_ref()).into_iter().find(|(n, _)| n == name).unwrap().1;
    let eps = 1e-2;
    let eval = |delta: f64| {
        let _g = tch::no_grad_guard();
        let mut p = param.shallow_clone();
        let _ = p.g_add_(&(&dir * delta));
        let o = step::StepOptions {
            checkpointing: false,
            pad_id: 296,
            pad_multiple: 1,
            device: Device::Cpu,
            seed: 1,
            loss_scale: 1.0,
            hand_backward: false,
            offload: false,
            profile: None,
            coalesce: None,
            detect_anomaly: false,
            op_census: None,
        };
        let (nll, n) = step::eval_nll(m.as_ref(), &batch()[0], &o);
        let _ = p.g_add_(&(&dir * -delta));
        nll / n as f64
    };
    let fd = (eval(eps) - eval(-eps)) / (2.0 * eps);
    assert!((eval(0.0) - loss).abs() < 1e-5 * loss);
    assert!((fd - norm).abs() < 0.02 * norm, "finite difference {fd:.6} vs analytic {norm:.6}");
}

fn metrics(run_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(run_dir.join("train/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_bnb_gemma3n_checkpoint_in_the_multimodal_layout_trains_on_cpu() {
    let d = tmp();
    let model = fixture_model("gemma3n-bnb4", &d.path().join("model"));
    let chat = repo().join("datasets/chat/train.jsonl");
    let extra = "micro_batch_size = 4\ngradient_accumulation_steps = 2\nlearning_rate = 1e-2\nwarmup_steps = 1\n\n[prompt]\ntemplate = \"chat\"\n\n[lora]\nr = 8\nalpha = 16\ntarget_modules = [\"q_proj\", \"k_proj\", \"v_proj\", \"o_proj\", \"gate_proj\", \"up_proj\", \"down_proj\"]\n";
    let r = tiny_recipe(d.path(), &model, &chat, extra);
    let text = std::fs::read_to_string(&r)
        .unwrap()
        .replace("max_seq_length = 1024", "max_seq_length = 128")
        .replace("max_steps = 2", "max_steps = 16");
    std::fs::write(&r, text).unwrap();
    let (code, _, err) = run(&["run", r.to_str().unwrap(), "--until", "train"]);
    assert_eq!(code, 0, "{err}");
    let rd = d.path().join("runs/t");
    let m = metrics(&rd);
    let mean = |s: &[Value]| s.iter().map(|v| v["loss"].as_f64().unwrap()).sum::<f64>() / s.len() as f64;
    let (first, last) = (mean(&m[..3]), mean(&m[13..]));
    assert!(last < 0.8 * first, "loss {first:.3} → {last:.3}");
    let tensors = Tensor::read_safetensors(rd.join("train/adapter/adapter_model.safetensors")).unwrap();
    let names: Vec<&str> = tensors.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        names.contains(&"base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight"),
        "{names:?}"
    );
    assert!(names.contains(&"base_model.model.model.language_model.layers.2.self_attn.v_proj.lora_B.weight"));
    assert!(
        !names.iter().any(|n| n.contains("layers.3.self_attn.k_proj") || n.contains("layers.5.self_attn.v_proj")),
        "no LoRA on KV-shared k/v"
    );
    assert_eq!(names.len(), 2 * (6 * 7 - 3 * 2));
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(rd.join("train/adapter/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["r"], 8);
}

#[test]
fn gemma_chat_template_trains_end_of_turn_and_generation_stops_on_it() {
    let d = tmp();
    let model = fixture_model("gemma3n", &d.path().join("model"));
    let chat = repo().join("datasets/chat/train.jsonl");
    let r = tiny_recipe(d.path(), &model, &chat, "\n[prompt]\ntemplate = \"chat\"\n");
    let (code, _, err) = run(&["run", r.to_str().unwrap(), "--until", "tokenize"]);
    assert_eq!(code, 0, "{err}");
    let tok = tokenizers::Tokenizer::from_file(model.join("tokenizer.json")).unwrap();
    let ex = &tuner::data::shards::read(&d.path().join("runs/t/tokenize/train-00000.arrow")).unwrap()[0];
    let decode = |ids: &[i32]| tok.decode(&ids.iter().map(|t| *t as u32).collect::<Vec<_>>(), false).unwrap();
    assert!(decode(&ex.input_ids).starts_with("<bos><start_of_turn>user\n"), "{}", decode(&ex.input_ids));
    let runs = trained_runs(&ex.input_ids, &ex.labels);
    assert!(runs.len() >= 2, "two assistant turns");
    for run in &runs {
        let text = decode(run);
        assert!(
            text.ends_with("<end_of_turn>") && !text.contains("<start_of_turn>") && !text.contains("user"),
            "{text:?}"
        );
    }
    let args = tuner::model::open::ModelArgs {
        model: model.clone(),
        adapter: None,
        dtype: tuner::recipe::Dtype::Fp32,
        device: tuner::recipe::DeviceSpec::Cpu,
    };
    let g = tuner::generate::Generator::load(&args, &d.path().join("cache")).unwrap();
    assert!(g.eos_ids.contains(&tok.token_to_id("<end_of_turn>").unwrap()), "{:?}", g.eos_ids);
}

#[test]
fn a_gemma3n_adapter_and_merged_export_load_in_transformers_and_peft_with_the_same_logits() {
    let d = tmp();
    let model = fixture_model("gemma3n", &d.path().join("model"));
    let chat = repo().join("datasets/chat/train.jsonl");
    let extra = "learning_rate = 1e-2\nwarmup_steps = 1\n\n[prompt]\ntemplate = \"chat\"\n\n[lora]\nr = 4\nalpha = 8\n\n[eval]\nmax_samples = 2\nmax_new_tokens = 4\n\n[export]\nadapter = true\nmerged = true\nmerged_dtype = \"fp32\"\n";
    let r = tiny_recipe(d.path(), &model, &chat, extra);
    let text = std::fs::read_to_string(&r)
        .unwrap()
        .replace("max_seq_length = 1024", "max_seq_length = 96")
        .replace("max_steps = 2", "max_steps = 4");
    std::fs::write(&r, text).unwrap();
    let (code, _, err) = run(&["run", r.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    let ex = d.path().join("runs/t/export");
    let ids: Vec<Vec<i64>> =
        vec![(0..12).map(|k| (k * 23 + 7) % 290).collect(), (0..12).map(|k| (k * 11 + 100) % 290).collect()];
    let path = |p: &Path| p.display().to_string();
    let (report, ts) = check_script(&[
        "--base".into(),
        path(&model),
        "--adapter".into(),
        path(&ex.join("adapter")),
        "--merged".into(),
        path(&ex.join("merged")),
        "--ids".into(),
        serde_json::to_string(&ids).unwrap(),
    ]);
    assert_eq!(report["peft"]["lora_modules"], 6 * 7 - 3 * 2, "{report}");
    for k in ["missing_keys", "unexpected_keys", "mismatched_keys"] {
        let v = &report["merged"][k];
        assert!(v.is_null() || v.as_array().is_some_and(|a| a.is_empty()), "merged {k}: {v}");
    }
    let get = |n: &str| ts.iter().find(|(k, _)| k == n).unwrap().1.shallow_clone();
    let flat: Vec<i64> = ids.concat();
    let batch = || model::Batch::new(Tensor::from_slice(&flat).view([2, 12]), None);
    let opts = model::LoadOptions { dtype: Kind::Float, device: Device::Cpu, quantize: None, cuda_kernels: true };
    let rel = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]);
    // PEFT puts the adapter on the dense base: tuner's dense base + adapter.
    let mut dense = model::load(&model, &opts).unwrap();
    tuner::model::open::apply_adapter(dense.as_mut(), &ex.join("adapter")).unwrap();
    let want_dense = tch::no_grad(|| dense.forward(&batch()));
    // The recipe trained QLoRA: the merged export is the dequantized NF4 base + adapter.
    let nf4 = model::LoadOptions { quantize: Some((tuner::quant::QuantType::Nf4, 64, true)), ..opts };
    let mut qlora = model::load(&model, &nf4).unwrap();
    tuner::model::open::apply_adapter(qlora.as_mut(), &ex.join("adapter")).unwrap();
    let want = tch::no_grad(|| qlora.forward(&batch()));
    let base = tch::no_grad(|| model::load(&model, &opts).unwrap().forward(&batch()));
    let (peft, merged, effect) =
        (rel(&get("peft_logits"), &want_dense), rel(&get("merged_logits"), &want), rel(&base, &want_dense));
    eprintln!(
        "gemma3n export: PEFT vs tuner {peft:.2e}, HF merged vs tuner QLoRA {merged:.2e}, adapter effect {effect:.2e}"
    );
    assert!(peft <= 1e-4 && merged <= 1e-4, "PEFT {peft:e}, merged {merged:e}");
    assert!(effect > 1e-3, "the adapter changes the logits by only {effect:e}");
}

/// The transformers init zeroes the embedding row at the pad id (`padding_idx`); tuner pads with
/// that id and its padding attends only to padding, so Gemma 3n's streams stay exactly zero at
/// the pads through every layer. The final AltUp collapse then differentiated `sqrt` at 0 and
/// the NaN reached every LoRA gradient (issue 15). Packed rows with padding, checkpointed, as
/// training runs them: every gradient finite and equal to the unpadded rows' gradients.
#[test]
fn a_zero_pad_embedding_row_keeps_gemma3n_gradients_finite() {
    let d = tmp();
    let pad = 296i64;
    let dir = edited_fixture("gemma3n", &d.path().join("model"), |name, t| {
        if name.ends_with("embed_tokens.weight") || name.ends_with("embed_tokens_per_layer.weight") {
            let _ = t.get(pad).fill_(0.0);
            t
        } else {
            t
        }
    });
    let opts = model::LoadOptions { dtype: Kind::Float, device: Device::Cpu, quantize: None, cuda_kernels: true };
    let mut m = model::load(&dir, &opts).unwrap();
    let spec = tuner::model::lora::LoraSpec {
        r: 4,
        alpha: 8.0,
        dropout: 0.0,
        use_rslora: false,
        targets: tuner::model::lora::Targets::AllLinear,
    };
    tuner::model::lora::attach(m.as_mut(), &spec, 3).unwrap();
    tch::manual_seed(11);
    tch::no_grad(|| {
        for mut p in tuner::model::lora::trainable_parameters(m.as_ref()).into_iter().filter(|p| p.size()[1] == 4) {
            p.copy_(&(Tensor::randn(p.size(), (Kind::Float, Device::Cpu)) * 0.1));
        }
    });
    // Two packed rows of two documents each; the shorter row is padded with `pad`.
    let row = |a: i64, n: i64| -> Vec<i64> { (0..n).map(|k| (k * 31 + a) % 290).collect() };
    let (r0, r1) = ([row(5, 9), row(40, 7)].concat(), [row(70, 6), row(100, 5)].concat());
    let mk = |rows: Vec<Vec<i64>>, docs: Vec<Vec<i64>>| {
        let labels =
            rows.iter().map(|r| r.iter().enumerate().map(|(k, x)| if k < 2 { -100 } else { *x }).collect()).collect();
        data::MicroBatch { input_ids: rows, labels, seq_ids: Some(docs) }
    };
    let docs = |n0: usize, n1: usize| [vec![0i64; n0], vec![1i64; n1]].concat();
    let padded = mk(vec![r0.clone(), r1.clone()], vec![docs(9, 7), docs(6, 5)]);
    let alone = [mk(vec![r0], vec![docs(9, 7)]), mk(vec![r1], vec![docs(6, 5)])];
    let run = |micro: &[data::MicroBatch]| {
        let params = tuner::model::lora::trainable_parameters(m.as_ref());
        for p in &params {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        let o = step::StepOptions {
            checkpointing: true,
            pad_id: pad,
            pad_multiple: 1,
            device: Device::Cpu,
            seed: 1,
            loss_scale: 1.0,
            hand_backward: false,
            offload: false,
            profile: None,
            coalesce: None,
            detect_anomaly: true,
            op_census: None,
        };
        let r = step::forward_backward(m.as_ref(), micro, 0, &o);
        (r, params.iter().map(|p| p.grad().copy()).collect::<Vec<_>>())
    };
    let (r_pad, g_pad) = run(std::slice::from_ref(&padded));
    assert!(r_pad.anomaly.is_none(), "{:?}", r_pad.anomaly);
    assert!(r_pad.loss.is_finite());
    let (r_alone, g_alone) = run(&alone);
    assert!((r_pad.loss - r_alone.loss).abs() < 1e-5 * r_alone.loss, "{} vs {}", r_pad.loss, r_alone.loss);
    for (a, b) in g_pad.iter().zip(&g_alone) {
        assert_eq!(a.isfinite().all().int64_value(&[]), 1, "a non-finite LoRA gradient");
        let e = (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[]).max(1e-12);
        assert!(e < 1e-4, "padded vs unpadded gradient differs by {e:.2e}");
    }
}
