//! `tuner grads` against HF + peft: the first-step LoRA gradients of each family (llama, qwen3,
//! gemma2, gemma3n) on the fixtures of tests/fixtures/grads (scripts/grad_parity.py fixtures: HF
//! transformers 5.17 + peft 0.21, fp32, CPU), with the embedding row at the pad id zeroed as
//! transformers' init leaves it, padded rows, a non-zero B: every gradient equal to HF's within
//! fp32 rounding, and finite (Gemma 3n gave NaN here before issue 15's fix).

use crate::common::*;
use serde_json::Value;
use tch::{Kind, Tensor};

#[test]
fn tuner_grads_match_hf_and_peft_on_every_fixture_family() {
    for family in ["llama", "qwen3", "gemma2", "gemma3n"] {
        let fx = repo().join("tests/fixtures/grads").join(family);
        let meta: Value = serde_json::from_str(&std::fs::read_to_string(fx.join("meta.json")).unwrap()).unwrap();
        let d = tmp();
        let zeroed: Vec<(String, i64)> = meta["zeroed_rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|z| (z["tensor"].as_str().unwrap().to_string(), z["row"].as_i64().unwrap()))
            .collect();
        assert!(!zeroed.is_empty());
        let model = edited_fixture(family, &d.path().join("model"), |name, t| {
            for (_, row) in zeroed.iter().filter(|(n, _)| n == name) {
                let _ = t.get(*row).fill_(0.0);
            }
            t
        });
        let out = d.path().join("grads.safetensors");
        let pad = meta["pad_id"].as_i64().unwrap().to_string();
        let s = |p: &std::path::Path| p.to_str().unwrap().to_string();
        let (code, stdout, err) = run(&[
            "grads",
            "--model",
            &s(&model),
            "--adapter",
            &s(&fx.join("adapter")),
            "--data",
            &s(&fx.join("rows.jsonl")),
            "--out",
            &s(&out),
            "--dtype",
            "fp32",
            "--device",
            "cpu",
            "--pad-id",
            &pad,
        ]);
        assert_eq!(code, 0, "{family}: {err}");
        let report: Value = serde_json::from_str(stdout.trim()).unwrap();
        assert_eq!(report["nonfinite"], serde_json::json!([]), "{family}: {report}");
        assert!(report["anomaly"].is_null(), "{family}: {report}");
        assert_eq!(report["trained_tokens"], meta["trained_tokens"], "{family}");
        let (l, l_hf) = (report["loss"].as_f64().unwrap(), meta["loss"].as_f64().unwrap());
        assert!((l - l_hf).abs() < 1e-5 * l_hf, "{family}: loss {l} vs HF {l_hf}");
        let ours = Tensor::read_safetensors(&out).unwrap();
        let hf = Tensor::read_safetensors(fx.join("hf_grads.safetensors")).unwrap();
        assert_eq!(ours.len(), hf.len(), "{family}: key count");
        let mut worst = 0.0f64;
        for (k, want) in &hf {
            let (_, got) =
                ours.iter().find(|(n, _)| n == k).unwrap_or_else(|| panic!("{family}: tuner has no gradient for {k}"));
            let want = want.to_kind(Kind::Double);
            let scale = want.abs().max().double_value(&[]);
            assert!(scale > 0.0, "{family}: HF's gradient of {k} is zero");
            worst = worst.max((got.to_kind(Kind::Double) - &want).abs().max().double_value(&[]) / scale);
        }
        eprintln!("{family}: tuner grads vs HF + peft, worst relative difference {worst:.2e}");
        assert!(worst < 1e-4, "{family}: gradients differ from HF + peft by {worst:.2e} relative");
    }
}
