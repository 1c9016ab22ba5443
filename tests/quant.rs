//! bitsandbytes 4-bit quantization tests (`tuner::quant`, docs/model-math.md §4).
//!
//! Fixtures (made by `scripts/gen_fixtures.py` with bitsandbytes 0.50.2 on the CPU; see
//! tests/fixtures/README.md): `bnb/quant.safetensors` holds `quantize_4bit` /
//! `dequantize_4bit` cases, and `models/llama-bnb4/` a checkpoint transformers saved with
//! NF4 + double quant from the fp32 `models/llama/` weights. Everything bnb produced is
//! compared byte for byte: codes, absmax, nested absmax, offset, tables, the quant_state
//! JSON and the dequantized output (exact, 0 ulp).

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use tch::{Kind, Tensor};
use tuner::quant::{dynamic_map, Absmax, QuantTensor, QuantType, FP4_TABLE, NF4_TABLE};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn load(path: &std::path::Path) -> HashMap<String, Tensor> {
    assert!(path.exists(), "missing fixture {} (regenerate: scripts/gen_fixtures.py)", path.display());
    Tensor::read_safetensors(path).expect("readable safetensors").into_iter().collect()
}

/// The raw bytes of a tensor (any dtype), row-major.
fn bytes(t: &Tensor) -> Vec<u8> {
    let t = t.to_device(tch::Device::Cpu).reshape([-1]).contiguous();
    let t = if t.kind() == Kind::Uint8 { t } else { t.view_dtype(Kind::Uint8) };
    Vec::<u8>::try_from(&t).expect("u8 data")
}

/// Asserts two tensors have the same dtype, element count and bytes; reports mismatches.
fn assert_same_bytes(what: &str, got: &Tensor, want: &Tensor) {
    assert_eq!(got.kind(), want.kind(), "{what}: dtype");
    assert_eq!(got.numel(), want.numel(), "{what}: numel ({:?} vs {:?})", got.size(), want.size());
    let (g, w) = (bytes(got), bytes(want));
    let bad = g.iter().zip(&w).filter(|(a, b)| a != b).count();
    assert_eq!(bad, 0, "{what}: {bad} of {} bytes differ", w.len());
}

fn f32s(t: &Tensor) -> Vec<f32> {
    Vec::<f32>::try_from(&t.to_kind(Kind::Float).reshape([-1]).contiguous()).expect("f32 data")
}

/// A `get` over a map of tensors.
fn getter(map: &HashMap<String, Tensor>) -> impl Fn(&str) -> Option<Tensor> + '_ {
    move |name: &str| map.get(name).map(Tensor::shallow_clone)
}

/// Compares every tensor of `q` with the bnb fixture case `case` in `fx`.
fn check_case(case: &str, q: &QuantTensor, fx: &HashMap<String, Tensor>) {
    let t = |suffix: &str| fx.get(&format!("{case}.{suffix}")).unwrap_or_else(|| panic!("{case}.{suffix} missing"));
    assert_same_bytes(&format!("{case} codes"), &q.codes, t("codes"));
    assert_same_bytes(&format!("{case} quant_map"), &q.quant_map, t("quant_map"));
    match &q.absmax {
        Absmax::Plain(a) => assert_same_bytes(&format!("{case} absmax"), a, t("absmax")),
        Absmax::Nested { codes, code, absmax, offset, blocksize } => {
            assert_eq!(*blocksize, 256);
            assert_same_bytes(&format!("{case} absmax codes"), codes, t("absmax"));
            assert_same_bytes(&format!("{case} nested_absmax"), absmax, t("nested_absmax"));
            assert_same_bytes(&format!("{case} nested_quant_map"), code, t("nested_quant_map"));
            assert_eq!(offset.to_bits(), (t("offset").double_value(&[]) as f32).to_bits(), "{case} offset");
        }
    }
    assert_same_bytes(&format!("{case} effective absmax"), &q.absmax.values(), t("absmax_dequant"));
    // dequantize_4bit output: computed in the input dtype, stored widened to f32.
    let deq = q.dequantize(q.dtype);
    assert_eq!(deq.kind(), q.dtype);
    assert_eq!(deq.size(), t("input").size());
    assert_same_bytes(&format!("{case} dequant"), &deq.to_kind(Kind::Float), t("dequant"));
    // The checkpoint JSON.
    let saved = q.to_bnb("p");
    let qs = saved.iter().find(|(k, _)| k.starts_with("p.weight.quant_state.")).expect("quant_state saved");
    assert_same_bytes(&format!("{case} quant_state json"), &qs.1, t("quant_state"));
}

fn bnb_cases(fx: &HashMap<String, Tensor>) -> Vec<String> {
    let cases: BTreeSet<String> = fx.keys().filter_map(|k| k.strip_suffix(".input").map(str::to_string)).collect();
    cases.into_iter().collect()
}

fn case_params(case: &str) -> (QuantType, bool) {
    let qt = if case.contains("_nf4_") {
        QuantType::Nf4
    } else if case.contains("_fp4_") {
        QuantType::Fp4
    } else {
        panic!("case {case}: no quant type in the name")
    };
    (qt, case.ends_with("_dq"))
}

#[test]
fn tables_match_bnb() {
    let fx = load(&fixtures().join("bnb/quant.safetensors"));
    let cases = bnb_cases(&fx);
    let nf4 = cases.iter().find(|c| c.contains("_nf4_")).expect("an nf4 case");
    let fp4 = cases.iter().find(|c| c.contains("_fp4_")).expect("an fp4 case");
    let dq = cases.iter().find(|c| c.ends_with("_dq")).expect("a dq case");
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(&NF4_TABLE), bits(&f32s(&fx[&format!("{nf4}.quant_map")])));
    assert_eq!(bits(&FP4_TABLE), bits(&f32s(&fx[&format!("{fp4}.quant_map")])));
    assert_eq!(bits(&dynamic_map()), bits(&f32s(&fx[&format!("{dq}.nested_quant_map")])));
    // Spot values from docs/model-math.md §4.3.
    assert_eq!(dynamic_map()[127], 0.0);
    assert_eq!(dynamic_map()[255], 1.0);
    assert_eq!(dynamic_map()[0].to_bits(), 0xbf7e3333);
    assert_eq!(FP4_TABLE[8].to_bits(), 0, "FP4 code 8 is +0 in bnb's table (Python's -0 is the integer 0)");
}

#[test]
fn quantize_is_byte_identical_to_bnb() {
    let fx = load(&fixtures().join("bnb/quant.safetensors"));
    let cases = bnb_cases(&fx);
    assert!(cases.len() >= 12, "expected the fixture cases, found {cases:?}");
    for case in &cases {
        let (qt, dq) = case_params(case);
        let input = &fx[&format!("{case}.input")];
        let q = QuantTensor::quantize(input, qt, 64, dq).expect("quantize");
        assert_eq!(q.shape, input.size());
        assert_eq!(q.dtype, input.kind());
        assert_eq!(matches!(q.absmax, Absmax::Nested { .. }), dq);
        check_case(case, &q, &fx);
    }
}

#[test]
fn from_bnb_reads_fixture_cases() {
    let fx = load(&fixtures().join("bnb/quant.safetensors"));
    for case in bnb_cases(&fx) {
        let (qt, dq) = case_params(&case);
        // The case's tensors under checkpoint names.
        let mut ckpt = HashMap::new();
        let mut put = |name: &str, suffix: &str| {
            if let Some(t) = fx.get(&format!("{case}.{suffix}")) {
                ckpt.insert(format!("layer.{name}"), t.shallow_clone());
            }
        };
        put("weight", "codes");
        put("weight.absmax", "absmax");
        put("weight.quant_map", "quant_map");
        put("weight.nested_absmax", "nested_absmax");
        put("weight.nested_quant_map", "nested_quant_map");
        put(&format!("weight.quant_state.bitsandbytes__{}", qt.name()), "quant_state");
        let q = QuantTensor::from_bnb("layer", &getter(&ckpt)).expect("parses").expect("quantized");
        assert_eq!(q.quant_type, qt);
        assert_eq!(q.blocksize, 64);
        assert_eq!(matches!(q.absmax, Absmax::Nested { .. }), dq);
        check_case(&case, &q, &fx);
        assert!(QuantTensor::from_bnb("other", &getter(&ckpt)).expect("no error").is_none());
    }
}

/// Loads `models/<name>/model.safetensors` and `reference.json`.
fn model(name: &str) -> (HashMap<String, Tensor>, serde_json::Value) {
    let dir = fixtures().join("models").join(name);
    let tensors = load(&dir.join("model.safetensors"));
    let text = std::fs::read_to_string(dir.join("reference.json")).expect("reference.json");
    (tensors, serde_json::from_str(&text).expect("reference.json parses"))
}

fn names(reference: &serde_json::Value, key: &str) -> Vec<String> {
    reference[key]
        .as_array()
        .unwrap_or_else(|| panic!("reference.json has no `{key}` list"))
        .iter()
        .map(|v| v.as_str().expect("a name").to_string())
        .collect()
}

#[test]
fn llama_bnb4_checkpoint_round_trips() {
    let (ckpt, reference) = model("llama-bnb4");
    let (dense, _) = model("llama");
    let get = getter(&ckpt);
    let quantized = names(&reference, "quantized_tensors");
    assert!(!quantized.is_empty());
    for name in &quantized {
        let prefix = name.strip_suffix(".weight").unwrap_or(name);
        let q =
            QuantTensor::from_bnb(prefix, &get).expect("parses").unwrap_or_else(|| panic!("{prefix} not quantized"));
        assert_eq!(q.quant_type, QuantType::Nf4, "{prefix}");
        assert!(matches!(q.absmax, Absmax::Nested { .. }), "{prefix}: double quant");
        assert_eq!(q.dtype, Kind::Float, "{prefix}");
        // Saving gives back exactly the checkpoint's tensors (names, dtypes, shapes, bytes).
        let saved = q.to_bnb(prefix);
        assert_eq!(saved.len(), 6, "{prefix}");
        for (k, t) in &saved {
            let want = ckpt.get(k).unwrap_or_else(|| panic!("{k} not in the checkpoint"));
            assert_eq!(t.size(), want.size(), "{k} shape");
            assert_same_bytes(k, t, want);
        }
        // Reading what we saved gives identical bytes again.
        let resaved: HashMap<String, Tensor> = saved.into_iter().collect();
        let q2 = QuantTensor::from_bnb(prefix, &getter(&resaved)).expect("parses").expect("quantized");
        assert_same_bytes(prefix, &q2.dequantize(Kind::Float), &q.dequantize(Kind::Float));
        // transformers quantized the fp32 weight of models/llama with bnb: so must we.
        let w = dense.get(name).unwrap_or_else(|| panic!("{name} not in models/llama"));
        assert_eq!(q.shape, w.size(), "{prefix} shape");
        let mine = QuantTensor::quantize(w, QuantType::Nf4, 64, true).expect("quantize");
        for ((k, a), (_, b)) in mine.to_bnb(prefix).iter().zip(q.to_bnb(prefix).iter()) {
            assert_same_bytes(&format!("requantized {k}"), a, b);
        }
        // Dequantized error against the original weight stays within the NF4 step.
        let deq = q.dequantize(Kind::Float);
        let rel = f64::try_from((&deq - w).abs().mean(Kind::Float) / w.abs().mean(Kind::Float)).expect("scalar");
        assert!(rel < 0.12, "{prefix}: relative mean abs error {rel}");
    }
    // Embeddings, norms and lm_head are not quantized.
    let plain = names(&reference, "unquantized_tensors");
    assert!(!plain.is_empty());
    for name in plain.iter().filter(|n| n.ends_with(".weight")) {
        let prefix = name.strip_suffix(".weight").unwrap_or(name);
        assert!(QuantTensor::from_bnb(prefix, &get).expect("no error").is_none(), "{prefix} is not quantized");
    }
}

/// Mean |dequant(quant(w)) − w| / mean |w| on a seeded N(0, 1) matrix.
fn relative_error(qt: QuantType, dq: bool, kind: Kind) -> f64 {
    tch::manual_seed(1234);
    let w = Tensor::randn([256, 384], (Kind::Float, tch::Device::Cpu)).to_kind(kind);
    let q = QuantTensor::quantize(&w, qt, 64, dq).expect("quantize");
    let d = q.dequantize(Kind::Float);
    let w = w.to_kind(Kind::Float);
    f64::try_from((&d - &w).abs().mean(Kind::Float) / w.abs().mean(Kind::Float)).expect("scalar")
}

#[test]
fn quantization_error_is_bounded() {
    // Measured (libtorch 2.11 CPU, seed 1234): NF4 0.0908 (0.0909 with double quant),
    // FP4 0.1203 (0.1204); bf16 input alike.
    for dq in [false, true] {
        let nf4 = relative_error(QuantType::Nf4, dq, Kind::Float);
        let fp4 = relative_error(QuantType::Fp4, dq, Kind::Float);
        assert!(nf4 > 0.08 && nf4 < 0.10, "nf4 dq={dq}: {nf4}");
        assert!(fp4 > 0.11 && fp4 < 0.13, "fp4 dq={dq}: {fp4}");
        assert!(nf4 < fp4, "NF4 beats FP4 on normal weights");
        let nf4_bf16 = relative_error(QuantType::Nf4, dq, Kind::BFloat16);
        assert!(nf4_bf16 < 0.10, "nf4 bf16 dq={dq}: {nf4_bf16}");
    }
}

#[test]
fn zero_blocks_dequantize_to_zero() {
    let w = Tensor::randn([4, 64], (Kind::Float, tch::Device::Cpu));
    let _ = w.narrow(0, 1, 2).fill_(0.0);
    for qt in [QuantType::Nf4, QuantType::Fp4] {
        for dq in [false, true] {
            let q = QuantTensor::quantize(&w, qt, 64, dq).expect("quantize");
            let d = q.dequantize(Kind::Float);
            assert_eq!(i64::try_from(d.isnan().sum(Kind::Int64)).expect("count"), 0, "{qt:?} dq={dq}: NaN");
            let zero_rows = f32s(&d.narrow(0, 1, 2));
            assert!(zero_rows.iter().all(|x| *x == 0.0), "{qt:?} dq={dq}: {zero_rows:?}");
            let live = f64::try_from((d.narrow(0, 0, 1) - w.narrow(0, 0, 1)).abs().max()).expect("scalar");
            assert!(live < 0.5, "{qt:?} dq={dq}: live block error {live}");
        }
        // A tensor of zeros only: every absmax (and, with double quant, the nested absmax) is 0.
        let z = Tensor::zeros([3, 33], (Kind::BFloat16, tch::Device::Cpu));
        for dq in [false, true] {
            let q = QuantTensor::quantize(&z, qt, 64, dq).expect("quantize");
            let d = q.dequantize(Kind::BFloat16);
            assert_eq!(d.size(), vec![3, 33]);
            assert!(f32s(&d).iter().all(|x| *x == 0.0), "{qt:?} dq={dq}: all-zero tensor");
        }
    }
}

#[test]
fn layout_and_json() {
    // Odd element count, partial last block, bf16: 3·7 = 21 elements in one block.
    let w =
        Tensor::from_slice(&(0..21).map(|i| i as f32 - 10.0).collect::<Vec<_>>()).view([3, 7]).to_kind(Kind::BFloat16);
    let q = QuantTensor::quantize(&w, QuantType::Nf4, 64, false).expect("quantize");
    let codes = bytes(&q.codes);
    assert_eq!(codes.len(), 11);
    // Element 0: -10/10 = -1 → code 0, in the high nibble of byte 0; element 2: -0.8 → code 1
    // (-0.6962 is 0.104 away, -1.0 is 0.2 away), in the high nibble of byte 1.
    assert_eq!(codes[0], 0x00);
    assert_eq!(codes[1] >> 4, 1);
    assert_eq!(codes[5] >> 4, 7, "element 10 is 0.0 → code 7");
    assert_eq!(codes[5] & 0xF, 8, "element 11: 0.1 → 0.0796 is code 8");
    assert_eq!(codes[10] & 0xF, 7, "odd padding nibble is the code of 0.0");
    assert_eq!(codes[10] >> 4, 15, "10/10 = 1 → code 15");
    let saved = q.to_bnb("m.l");
    let names: Vec<&str> = saved.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        ["m.l.weight", "m.l.weight.absmax", "m.l.weight.quant_map", "m.l.weight.quant_state.bitsandbytes__nf4"]
    );
    assert_eq!(saved[0].1.size(), vec![11, 1]);
    let json = String::from_utf8(bytes(&saved[3].1)).expect("utf-8");
    assert_eq!(json, r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [3, 7]}"#);

    // One block, so the offset is its absmax, 10.4467315673828125 (an f32): a 17-digit tie
    // that Python writes rounded to even ("…812"), as bitsandbytes saved it.
    let mut v = vec![0.5f32; 64];
    v[9] = -10.446_732;
    let q = QuantTensor::quantize(&Tensor::from_slice(&v).view([1, 64]), QuantType::Fp4, 64, true).expect("quantize");
    let json = String::from_utf8(bytes(&q.to_bnb("y")[5].1)).expect("utf-8");
    assert!(json.ends_with(r#""nested_offset": 10.446731567382812}"#), "{json}");

    // A nested offset below 1e-4 uses Python's exponent notation: every absmax is 2^-17.
    let tiny = Tensor::full([2, 128], 2f64.powi(-17), (Kind::Float, tch::Device::Cpu));
    let q = QuantTensor::quantize(&tiny, QuantType::Fp4, 64, true).expect("quantize");
    let json = String::from_utf8(bytes(&q.to_bnb("x")[5].1)).expect("utf-8");
    assert_eq!(
        json,
        r#"{"quant_type": "fp4", "blocksize": 64, "dtype": "float32", "shape": [2, 128], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 7.62939453125e-06}"#
    );
    assert_eq!(q.nbytes(), 128 + 4 + 1024 + 4 + 64, "codes + absmax codes + dynamic map + nested absmax + fp4 map");

    // Non-uint8 quant_storage: the same bytes viewed as bf16 [(n+1)/4, 1].
    let w = Tensor::randn([8, 64], (Kind::Float, tch::Device::Cpu));
    let q = QuantTensor::quantize(&w, QuantType::Nf4, 64, true).expect("quantize");
    let mut ckpt: HashMap<String, Tensor> = q.to_bnb("a").into_iter().collect();
    let as_bf16 = ckpt["a.weight"].reshape([-1]).view_dtype(Kind::BFloat16).view([-1, 1]);
    ckpt.insert("a.weight".into(), as_bf16);
    let q2 = QuantTensor::from_bnb("a", &getter(&ckpt)).expect("parses").expect("quantized");
    assert_same_bytes("quant_storage=bfloat16", &q2.dequantize(Kind::Float), &q.dequantize(Kind::Float));

    // Lenient JSON: numbers as strings, extra keys, `torch.` prefixes.
    let lenient = r#"{"quant_type":"NF4","blocksize":"64","dtype":"torch.float32","shape":[8,64],"nested_blocksize":256.0,"nested_offset":"%O","extra":1}"#;
    let offset = match &q.absmax {
        Absmax::Nested { offset, .. } => *offset,
        Absmax::Plain(_) => unreachable!(),
    };
    let lenient = lenient.replace("%O", &format!("{offset:e}"));
    ckpt.insert("a.weight.quant_state.bitsandbytes__nf4".into(), Tensor::from_slice(lenient.as_bytes()));
    let q3 = QuantTensor::from_bnb("a", &getter(&ckpt)).expect("parses").expect("quantized");
    assert_same_bytes("lenient json", &q3.dequantize(Kind::Float), &q.dequantize(Kind::Float));

    // Missing pieces are errors that name the tensor.
    ckpt.remove("a.weight.absmax");
    let err = QuantTensor::from_bnb("a", &getter(&ckpt)).expect_err("absmax missing");
    assert!(format!("{err:#}").contains("a.weight.absmax"), "{err:#}");
}

#[test]
fn quantize_accepts_views_and_rejects_bad_input() {
    let w = Tensor::randn([96, 40], (Kind::Float, tch::Device::Cpu));
    let t = w.tr();
    let a = QuantTensor::quantize(&t, QuantType::Nf4, 64, true).expect("quantize a view");
    let b = QuantTensor::quantize(&t.contiguous(), QuantType::Nf4, 64, true).expect("quantize");
    assert_same_bytes("transposed view", &a.codes, &b.codes);
    assert_eq!(a.shape, vec![40, 96]);
    assert!(QuantTensor::quantize(&w, QuantType::Nf4, 48, false).is_err(), "blocksize 48");
    assert!(QuantTensor::quantize(&w.to_kind(Kind::Int64), QuantType::Nf4, 64, false).is_err(), "integer input");
    let moved = a.to_device(tch::Device::Cpu);
    assert_same_bytes("to_device", &moved.dequantize(Kind::Half), &a.dequantize(Kind::Half));
}
