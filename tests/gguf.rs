//! GGUF reader (`tuner::gguf`) and importer (`tuner::gguf::import`) tests, on the real
//! quickstart model SmolLM2-135M-Instruct Q4_1 (`models/`, a symlink made by
//! scripts/bootstrap) and on small GGUF files written here following the GGUF spec.
//!
//! The expected numbers (sha256 of dequantized tensors as little-endian f32, single
//! values, token ids) were computed once in Python: tensors with the `gguf` package
//! 0.17.1 (`gguf.quants.dequantize`) and numpy, the Q/K un-permutation with numpy's
//! `w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)`
//! (and, identically, transformers 5.24's own GGUF loader); token ids with the
//! `tokenizers` package, from a BPE built directly from the GGUF vocabulary and merges
//! with SmolLM2's pre-tokenizer (Digits + ByteLevel) (and, identically, transformers'
//! GGUF tokenizer conversion).

// The float constants are exact f32 values, written out in full on purpose.
#![allow(clippy::excessive_precision)]

use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::OnceLock;
use tuner::gguf::import::{import_gguf, unpermute_rows, ImportSummary};
use tuner::gguf::names::{HfSource, Names};
use tuner::gguf::tokenizer::tokenizer_json;
use tuner::gguf::GgufArch;
use tuner::gguf::{dequantize, GgmlType, GgufFile, GgufValue, GgufValueType};

const MODEL: &str = "models/SmolLM2-135M-Instruct.Q4_1.gguf";

fn model_path() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join(MODEL);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/bootstrap (it fetches the quickstart model and links it there)",
        p.display()
    );
    p
}

fn model() -> &'static GgufFile {
    static M: OnceLock<GgufFile> = OnceLock::new();
    M.get_or_init(|| GgufFile::open(model_path()).expect("the quickstart GGUF opens"))
}

struct Imported {
    dir: PathBuf,
    summary: ImportSummary,
}

/// The quickstart model imported once per test process. A `TempDir` in a static
/// would never be dropped (and leak ~540 MB a run), so the folder is named after
/// this process under cargo's test temp dir, and folders of dead processes are
/// removed first.
fn imported() -> &'static Imported {
    static I: OnceLock<Imported> = OnceLock::new();
    I.get_or_init(|| {
        let base = Path::new(env!("CARGO_TARGET_TMPDIR"));
        fs::create_dir_all(base).expect("test temp dir");
        if Path::new("/proc/self").exists() {
            for entry in fs::read_dir(base).expect("read test temp dir").flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if let Some(pid) = name.strip_prefix("gguf-import-") {
                    if !Path::new("/proc").join(pid).exists() {
                        let _ = fs::remove_dir_all(entry.path());
                    }
                }
            }
        }
        let dir = base.join(format!("gguf-import-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let summary = import_gguf(&model_path(), &dir).expect("import of the quickstart GGUF");
        Imported { dir, summary }
    })
}

fn sha_f32(values: &[f32]) -> String {
    let mut h = Sha256::new();
    for v in values {
        h.update(v.to_le_bytes());
    }
    hex::encode(h.finalize())
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&fs::read_to_string(path).expect("read json")).expect("valid json")
}

/// A read-only map of the imported model.safetensors.
fn safetensors_map() -> &'static memmap2::Mmap {
    static S: OnceLock<memmap2::Mmap> = OnceLock::new();
    S.get_or_init(|| {
        let f = fs::File::open(imported().dir.join("model.safetensors")).expect("open model.safetensors");
        unsafe { memmap2::Mmap::map(&f) }.expect("map model.safetensors")
    })
}

fn st_tensor(name: &str) -> (Vec<f32>, Vec<usize>) {
    let st = safetensors::SafeTensors::deserialize(safetensors_map()).expect("safetensors parses");
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
    let v = t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    (v, t.shape().to_vec())
}

// -----------------------------------------------------------------------------
// A minimal GGUF writer, for files the real model cannot provide.

enum V {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    S(&'static str),
    Arr(u32, Vec<V>),
    U64(u64),
    I64(i64),
    F64(f64),
}

fn tag(v: &V) -> u32 {
    match v {
        V::U8(_) => 0,
        V::I8(_) => 1,
        V::U16(_) => 2,
        V::I16(_) => 3,
        V::U32(_) => 4,
        V::I32(_) => 5,
        V::F32(_) => 6,
        V::Bool(_) => 7,
        V::S(_) => 8,
        V::Arr(..) => 9,
        V::U64(_) => 10,
        V::I64(_) => 11,
        V::F64(_) => 12,
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend((s.len() as u64).to_le_bytes());
    out.extend(s.as_bytes());
}

fn put_val(out: &mut Vec<u8>, v: &V) {
    match v {
        V::U8(x) => out.push(*x),
        V::I8(x) => out.push(*x as u8),
        V::U16(x) => out.extend(x.to_le_bytes()),
        V::I16(x) => out.extend(x.to_le_bytes()),
        V::U32(x) => out.extend(x.to_le_bytes()),
        V::I32(x) => out.extend(x.to_le_bytes()),
        V::F32(x) => out.extend(x.to_le_bytes()),
        V::Bool(x) => out.push(*x as u8),
        V::S(s) => put_str(out, s),
        V::Arr(t, items) => {
            out.extend(t.to_le_bytes());
            out.extend((items.len() as u64).to_le_bytes());
            items.iter().for_each(|i| put_val(out, i));
        }
        V::U64(x) => out.extend(x.to_le_bytes()),
        V::I64(x) => out.extend(x.to_le_bytes()),
        V::F64(x) => out.extend(x.to_le_bytes()),
    }
}

/// A GGUF file: `tensors` are (name, GGUF dims innermost first, ggml type tag, data).
fn mini_gguf(version: u32, kvs: &[(&str, V)], tensors: &[(&str, Vec<u64>, u32, Vec<u8>)], align: usize) -> Vec<u8> {
    let mut out = b"GGUF".to_vec();
    out.extend(version.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    out.extend((kvs.len() as u64).to_le_bytes());
    for (k, v) in kvs {
        put_str(&mut out, k);
        out.extend(tag(v).to_le_bytes());
        put_val(&mut out, v);
    }
    let mut offset = 0usize;
    let mut offsets = Vec::new();
    for (name, dims, ty, data) in tensors {
        put_str(&mut out, name);
        out.extend((dims.len() as u32).to_le_bytes());
        dims.iter().for_each(|d| out.extend(d.to_le_bytes()));
        out.extend(ty.to_le_bytes());
        out.extend((offset as u64).to_le_bytes());
        offsets.push(offset);
        offset = (offset + data.len()).div_ceil(align) * align;
    }
    out.resize(out.len().div_ceil(align) * align, 0);
    let start = out.len();
    for ((_, _, _, data), off) in tensors.iter().zip(offsets) {
        out.resize(start + off, 0);
        out.extend(data);
    }
    out
}

fn write_tmp(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, bytes).expect("write temp gguf");
    p
}

/// f16 by hand: sign, 5-bit exponent (bias 15), 10-bit mantissa; normal numbers only.
fn f16_by_hand(bits: u16) -> f64 {
    let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = ((bits >> 10) & 0x1F) as i32;
    let mant = (bits & 0x3FF) as f64;
    assert!(exp > 0 && exp < 31, "test helper handles normal numbers only");
    sign * (1.0 + mant / 1024.0) * 2f64.powi(exp - 15)
}

// -----------------------------------------------------------------------------
// Reader: the real model.

#[test]
fn metadata_of_the_quickstart_model() {
    let g = model();
    assert_eq!(g.version(), 3);
    assert_eq!(g.architecture(), Some("llama"));
    assert_eq!(g.alignment(), 32);
    assert_eq!(g.data_offset(), 1_785_664);
    assert_eq!(g.metadata().len(), 33);
    assert_eq!(g.tensors().len(), 272);
    assert_eq!(g.get_u64("llama.block_count").unwrap(), Some(30));
    assert_eq!(g.get_u64("llama.embedding_length").unwrap(), Some(576));
    assert_eq!(g.get_u64("llama.feed_forward_length").unwrap(), Some(1536));
    assert_eq!(g.get_u64("llama.attention.head_count").unwrap(), Some(9));
    assert_eq!(g.get_u64("llama.attention.head_count_kv").unwrap(), Some(3));
    assert_eq!(g.get_u64("llama.vocab_size").unwrap(), Some(49152));
    assert_eq!(g.get_u64("llama.context_length").unwrap(), Some(8192));
    assert_eq!(g.get("llama.attention.layer_norm_rms_epsilon"), Some(&GgufValue::F32(1e-5)));
    assert_eq!(g.get("llama.rope.freq_base"), Some(&GgufValue::F32(100000.0)));
    assert_eq!(g.get_str("tokenizer.ggml.model").unwrap(), Some("gpt2"));
    assert_eq!(g.get_str("tokenizer.ggml.pre").unwrap(), Some("smollm"));
    assert_eq!(g.get_bool("tokenizer.ggml.add_bos_token").unwrap(), Some(false));
    // Keys keep file order.
    let keys: Vec<&str> = g.metadata().keys().take(3).collect();
    assert_eq!(keys, ["general.architecture", "general.type", "general.name"]);
    // Arrays: typed, with all elements.
    let tokens = g.get("tokenizer.ggml.tokens").unwrap();
    match tokens {
        GgufValue::Array(a) => {
            assert_eq!(a.elem_type, GgufValueType::String);
            assert_eq!(a.items.len(), 49152);
            assert_eq!(a.items[1].as_str(), Some("<|im_start|>"));
            assert_eq!(a.items[2].as_str(), Some("<|im_end|>"));
        }
        other => panic!("tokens: {other:?}"),
    }
    let types = g.get_array("tokenizer.ggml.token_type").unwrap().unwrap();
    assert_eq!(types.iter().filter(|t| t.as_i64() == Some(3)).count(), 17);
    assert_eq!(g.get_array("tokenizer.ggml.merges").unwrap().unwrap().len(), 48900);
    assert_eq!(g.get_array("general.languages").unwrap().unwrap(), &[GgufValue::String("en".into())]);
    assert!(g.get_str("tokenizer.chat_template").unwrap().unwrap().starts_with("{% for message in messages %}"));
    // Typed getters refuse the wrong type, naming key and file.
    let err = g.get_u64("general.name").unwrap_err().to_string();
    assert!(err.contains("general.name") && err.contains(MODEL), "{err}");
}

#[test]
fn tensor_infos_of_the_quickstart_model() {
    let g = model();
    let e = g.tensor("token_embd.weight").unwrap();
    assert_eq!(e.ggml_type, GgmlType::Q8_0);
    assert_eq!(e.dims, [576, 49152]);
    assert_eq!(e.shape(), [49152, 576]);
    assert_eq!(e.offset, 0);
    assert_eq!(e.n_bytes(), Some(30_081_024));
    let q = g.tensor("blk.0.attn_q.weight").unwrap();
    assert_eq!((q.ggml_type, q.offset, q.n_bytes()), (GgmlType::Q4_1, 32_020_992, Some(207_360)));
    let k = g.tensor("blk.0.attn_k.weight").unwrap();
    assert_eq!((k.shape(), k.offset), (vec![192, 576], 31_744_512));
    let d = g.tensor("blk.29.ffn_down.weight").unwrap();
    assert_eq!((d.shape(), d.offset), (vec![576, 1536], 78_845_184));
    let n = g.tensor("output_norm.weight").unwrap();
    assert_eq!((n.ggml_type, n.shape(), n.offset), (GgmlType::F32, vec![576], 96_574_464));
    assert!(g.tensor("output.weight").is_none(), "SmolLM2 ties its embeddings");
    let mut counts = std::collections::HashMap::new();
    for t in g.tensors() {
        *counts.entry(t.ggml_type).or_insert(0) += 1;
    }
    assert_eq!(counts[&GgmlType::Q4_1], 210);
    assert_eq!(counts[&GgmlType::F32], 61);
    assert_eq!(counts[&GgmlType::Q8_0], 1);
}

#[test]
fn q8_0_block_matches_hand_computation() {
    let g = model();
    let raw = g.tensor_data("token_embd.weight").unwrap();
    assert_eq!(hex::encode(&raw[..34]), "3219d60d13f7e5ee08d02aa801de56818608fd21dbee104fe81efaf9e21128391fb1");
    let (v, shape) = g.tensor_f32("token_embd.weight").unwrap();
    assert_eq!(shape, [49152, 576]);
    // Block 0: d = f16 0x1932 = 1.298828125 * 2^-9; values are d * (signed byte).
    let d = f16_by_hand(u16::from_le_bytes([raw[0], raw[1]]));
    assert_eq!(d, 0.002536773681640625);
    for j in 0..32 {
        let q = raw[2 + j] as i8 as f64;
        assert_eq!(v[j] as f64, d * q, "element {j}");
    }
    assert_eq!(v[0], -0.10654449462890625); // -42 * d
                                            // Values from Python gguf.
    assert_eq!(&v[..4], &[-0.10654449462890625, 0.032978057861328125, 0.048198699951171875, -0.022830963134765625]);
    assert_eq!(
        &v[1000 * 576 + 100..1000 * 576 + 103],
        &[0.0642242431640625, -0.058872222900390625, -0.09098434448242188]
    );
    assert_eq!(v[49151 * 576 + 575], -0.0417022705078125);
    assert_eq!(sha_f32(&v), "3fd491c8066dd9dc1a2bf6796701526c82817d95c0ecabacdef3013c2b8bbbaa");
}

#[test]
fn q4_1_block_matches_hand_computation() {
    let g = model();
    let raw = g.tensor_data("blk.0.attn_q.weight").unwrap();
    assert_eq!(hex::encode(&raw[..20]), "0f30d8b9458765406f65164b677664502267655a");
    let (v, shape) = g.tensor_f32("blk.0.attn_q.weight").unwrap();
    assert_eq!(shape, [576, 576]);
    // d = f16 0x300f, m = f16 0xb9d8; element j < 16 is the low nibble of byte j,
    // element j + 16 the high nibble; value = q * d + m.
    let d = f16_by_hand(u16::from_le_bytes([raw[0], raw[1]]));
    let m = f16_by_hand(u16::from_le_bytes([raw[2], raw[3]]));
    assert_eq!((d, m), (0.1268310546875, -0.73046875));
    for j in 0..16 {
        let lo = (raw[4 + j] & 0x0F) as f64;
        let hi = (raw[4 + j] >> 4) as f64;
        assert_eq!(v[j] as f64, lo * d + m, "element {j}");
        assert_eq!(v[j + 16] as f64, hi * d + m, "element {}", j + 16);
    }
    assert_eq!(v[0], -0.0963134765625); // 5 * d + m
                                        // Values from Python gguf.
    let every5: Vec<f32> = v[..32].iter().step_by(5).copied().collect();
    assert_eq!(
        every5,
        [
            -0.0963134765625,
            -0.0963134765625,
            -0.22314453125,
            0.537841796875,
            0.030517578125,
            0.1573486328125,
            0.030517578125
        ]
    );
    assert_eq!(v[5 * 576 + 7], -0.3916015625);
    assert_eq!(v[575 * 576 + 575], -0.255859375);
    assert_eq!(sha_f32(&v), "aa74111ad24c3624a20374d2026fd1f50bfe2520252e3c9aef4a666a28593cc8");
}

#[test]
fn whole_tensors_match_python_gguf() {
    let g = model();
    let (down, shape) = g.tensor_f32("blk.29.ffn_down.weight").unwrap();
    assert_eq!(shape, [576, 1536]);
    assert_eq!(sha_f32(&down), "c19605745425a11e704e305ce3d27b632c406195d39eb3377e9cfb140ac643d1");
    let (norm, shape) = g.tensor_f32("output_norm.weight").unwrap();
    assert_eq!(shape, [576]);
    assert_eq!(&norm[..3], &[1.7578125, 1.8203125, 1.78125]);
    assert_eq!(sha_f32(&norm), "3b87f8e27335e67fc08f159cabfd2d18f205d6c5b225a6f978153552bf01d559");
}

/// Synthetic blocks for every supported quantized type: bytes from a fixed formula,
/// scales set to exact f16 values; sha256 and end values from Python `gguf.quants.dequantize`.
#[test]
fn synthetic_blocks_match_python_gguf() {
    let cases: [(GgmlType, &str, f32, f32); 8] = [
        (GgmlType::Q4_0, "adb82601f6064ddb77146b3dbe8f5713f6ae54b7ed22e7c274bfcc109f0d8af1", 0.109375, 0.140625),
        (GgmlType::Q4_1, "7f3308be5df319ab9a61d42c444fcc07d4ced81cf84009bc0da01d4984537bef", -0.359375, 0.171875),
        (GgmlType::Q5_0, "002bea3a5170df788875a2a8e24c7519c0cfad7c68de71dfeffec52a53de6e58", 0.046875, -0.375),
        (GgmlType::Q5_1, "549c10f4e552d9ac4ceae97920216e3066c07a5e9fe462dba4028a375d1ef65c", -0.046875, -0.015625),
        (GgmlType::Q8_0, "c5ec68849ef57cb216e9d3d49d2846f293f03fb22e3dad3b2b9ffa356a99dc40", 1.234375, -3.046875),
        (GgmlType::Q4_K, "1e06a6160c646f1c7f1d5d0e537b0c28ea17a4a093b8d4cc60b5196e3e3abdb9", 24.453125, 10.578125),
        (GgmlType::Q5_K, "795766dedc0a8a7f0e0771e01ae86b373295465ac00c1768f63fc5d6bd3a0475", 28.75, 30.40625),
        (GgmlType::Q6_K, "06766ff75303c1b913817f7cf0d18314aa5e9ea2c87fbd2090e5b209e97320b7", -1.203125, -109.6875),
    ];
    const BLOCKS: usize = 3;
    for (ty, sha, first, last) in cases {
        let (bs, ts) = ty.block_layout().unwrap();
        let (bs, ts) = (bs as usize, ts as usize);
        let mut b: Vec<u8> = (0..ts * BLOCKS).map(|i| ((i * 37 + (i >> 5) * 11 + 5) & 0xFF) as u8).collect();
        for k in 0..BLOCKS {
            let o = k * ts;
            let d = half::f16::from_f32(0.015625 * (k + 1) as f32).to_le_bytes();
            let m = half::f16::from_f32(-0.5 + 0.125 * k as f32).to_le_bytes();
            if ty == GgmlType::Q6_K {
                b[o + 208..o + 210].copy_from_slice(&d);
            } else {
                b[o..o + 2].copy_from_slice(&d);
                if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1 | GgmlType::Q4_K | GgmlType::Q5_K) {
                    b[o + 2..o + 4].copy_from_slice(&m);
                }
            }
        }
        let v = dequantize(ty, &b, bs * BLOCKS).unwrap();
        assert_eq!((v[0], v[v.len() - 1]), (first, last), "{ty}");
        assert_eq!(sha_f32(&v), sha, "{ty}");
    }
    // F16 and BF16 from bit patterns (no inf/NaN; F16 includes subnormals).
    let bits: Vec<u8> = (0..100u32).flat_map(|i| (((i * 40503 + 12345) & 0xBFFF) as u16).to_le_bytes()).collect();
    let v = dequantize(GgmlType::F16, &bits, 100).unwrap();
    assert_eq!((v[0], v[99]), (0.1319580078125, 0.00731658935546875));
    assert_eq!(sha_f32(&v), "76d7e2c450587ab33f0a1c78639153393143f4b5f11b1da93a7b4af8bddbb28b");
    let v = dequantize(GgmlType::BF16, &bits, 100).unwrap();
    assert_eq!((v[0], v[99]), (6.730260793119669e-10, 5.378659215064807e-20));
    assert_eq!(sha_f32(&v), "5edeab083372c319f92ca2c568dc6c53ae1007e86954b753e32757d4026253ae");
    // Size mismatches are errors, not panics.
    assert!(dequantize(GgmlType::Q8_0, &[0u8; 33], 32).is_err());
    assert!(dequantize(GgmlType::Q8_0, &[0u8; 34], 31).is_err());
}

// -----------------------------------------------------------------------------
// Reader: small files and errors.

#[test]
fn reads_every_value_type_alignment_and_v2() {
    let dir = tempfile::tempdir().unwrap();
    let f32s: Vec<u8> = (0..6).flat_map(|i| (i as f32 * 1.5).to_le_bytes()).collect();
    let f16s: Vec<u8> =
        [1.0f32, -2.5, 0.125, 65504.0].iter().flat_map(|x| half::f16::from_f32(*x).to_le_bytes()).collect();
    let bytes = mini_gguf(
        2,
        &[
            ("general.alignment", V::U32(64)),
            ("u8", V::U8(200)),
            ("i8", V::I8(-100)),
            ("u16", V::U16(60000)),
            ("i16", V::I16(-30000)),
            ("i32", V::I32(-7)),
            ("f32", V::F32(0.25)),
            ("bool", V::Bool(true)),
            ("str", V::S("héllo")),
            ("u64", V::U64(1 << 40)),
            ("i64", V::I64(-(1 << 40))),
            ("f64", V::F64(-0.5)),
            ("nested", V::Arr(9, vec![V::Arr(4, vec![V::U32(1), V::U32(2)]), V::Arr(4, vec![])])),
            ("empty", V::Arr(8, vec![])),
        ],
        &[("a", vec![3, 2], 0, f32s), ("b", vec![4], 1, f16s)],
        64,
    );
    let p = write_tmp(dir.path(), "small.gguf", &bytes);
    let g = GgufFile::open(&p).unwrap();
    assert_eq!(g.version(), 2);
    assert_eq!(g.alignment(), 64);
    assert_eq!(g.data_offset() % 64, 0);
    assert_eq!(g.get("u8"), Some(&GgufValue::U8(200)));
    assert_eq!(g.get("i8"), Some(&GgufValue::I8(-100)));
    assert_eq!(g.get("u16"), Some(&GgufValue::U16(60000)));
    assert_eq!(g.get("i16"), Some(&GgufValue::I16(-30000)));
    assert_eq!(g.get("i32").and_then(GgufValue::as_i64), Some(-7));
    assert!(g.get_u64("i32").unwrap_err().to_string().contains("INT32"));
    assert_eq!(g.get_f64("f32").unwrap(), Some(0.25));
    assert_eq!(g.get_bool("bool").unwrap(), Some(true));
    assert_eq!(g.get_str("str").unwrap(), Some("héllo"));
    assert_eq!(g.get_u64("u64").unwrap(), Some(1 << 40));
    assert_eq!(g.get("i64").and_then(GgufValue::as_i64), Some(-(1 << 40)));
    assert_eq!(g.get("f64"), Some(&GgufValue::F64(-0.5)));
    let nested = g.get_array("nested").unwrap().unwrap();
    assert_eq!(nested[0].as_array().unwrap(), &[GgufValue::U32(1), GgufValue::U32(2)]);
    match g.get("empty") {
        Some(GgufValue::Array(a)) => assert_eq!((a.elem_type, a.items.len()), (GgufValueType::String, 0)),
        other => panic!("{other:?}"),
    }
    assert_eq!(g.metadata().keys().collect::<Vec<_>>()[..3], ["general.alignment", "u8", "i8"]);
    let (a, shape) = g.tensor_f32("a").unwrap();
    assert_eq!(shape, [2, 3]);
    assert_eq!(a, [0.0, 1.5, 3.0, 4.5, 6.0, 7.5]);
    assert_eq!(g.tensor("b").unwrap().offset % 64, 0);
    assert_eq!(g.tensor_f32("b").unwrap(), (vec![1.0, -2.5, 0.125, 65504.0], vec![4]));
    let err = g.tensor_f32("nope").unwrap_err().to_string();
    assert!(err.contains("no tensor `nope`") && err.contains("small.gguf"), "{err}");
}

#[test]
fn bad_magic_and_versions_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut bytes = mini_gguf(3, &[], &[], 32);
    bytes[..4].copy_from_slice(b"GGML");
    let p = write_tmp(dir.path(), "bad.gguf", &bytes);
    let err = GgufFile::open(&p).unwrap_err().to_string();
    assert!(err.contains("is not a GGUF file") && err.contains("bad magic") && err.contains("bad.gguf"), "{err}");

    let p = write_tmp(dir.path(), "v1.gguf", &mini_gguf(1, &[], &[], 32));
    let err = GgufFile::open(&p).unwrap_err().to_string();
    assert!(err.contains("version 1") && err.contains("v1.gguf"), "{err}");

    let mut bytes = mini_gguf(3, &[], &[], 32);
    bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
    let p = write_tmp(dir.path(), "be.gguf", &bytes);
    assert!(GgufFile::open(&p).unwrap_err().to_string().contains("big-endian"));

    let p = write_tmp(dir.path(), "tiny.gguf", b"GG");
    assert!(GgufFile::open(&p).unwrap_err().to_string().contains("not a GGUF file"));

    let missing = dir.path().join("missing.gguf");
    assert!(GgufFile::open(&missing).unwrap_err().to_string().contains("missing.gguf"));
}

#[test]
fn truncated_files_name_file_and_culprit() {
    let dir = tempfile::tempdir().unwrap();
    let full = fs::read(model_path()).unwrap();
    // Cut inside the token list: the metadata key is named.
    let p = write_tmp(dir.path(), "cut-header.gguf", &full[..100_000]);
    let err = GgufFile::open(&p).unwrap_err().to_string();
    assert!(
        err.contains("truncated") && err.contains("cut-header.gguf") && err.contains("tokenizer.ggml.tokens"),
        "{err}"
    );
    // Cut inside the first tensor's data: the tensor is named.
    let p = write_tmp(dir.path(), "cut-data.gguf", &full[..2_000_000]);
    let err = GgufFile::open(&p).unwrap_err().to_string();
    assert!(err.contains("truncated") && err.contains("cut-data.gguf") && err.contains("`token_embd.weight`"), "{err}");
    // Cut just before the last byte: the last tensor in the file is named.
    let p = write_tmp(dir.path(), "cut-end.gguf", &full[..full.len() - 1]);
    let err = GgufFile::open(&p).unwrap_err().to_string();
    assert!(err.contains("truncated") && err.contains("`output_norm.weight`"), "{err}");
}

#[test]
fn unsupported_tensor_type_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = mini_gguf(3, &[], &[("blk.0.attn_q.weight", vec![256, 1], 10, vec![0u8; 84])], 32);
    let p = write_tmp(dir.path(), "q2k.gguf", &bytes);
    let g = GgufFile::open(&p).unwrap();
    assert_eq!(g.tensor("blk.0.attn_q.weight").unwrap().ggml_type, GgmlType::Q2_K);
    let err = g.tensor_f32("blk.0.attn_q.weight").unwrap_err().to_string();
    assert_eq!(
        err,
        format!(
            "unsupported GGUF tensor type Q2_K in `blk.0.attn_q.weight` of {}; supported: F32, F16, BF16, F64, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K",
            p.display()
        )
    );
    // Raw bytes stay available.
    assert_eq!(g.tensor_data("blk.0.attn_q.weight").unwrap().len(), 84);
}

// -----------------------------------------------------------------------------
// Importer.

#[test]
fn unpermute_follows_the_documented_reshape() {
    // 8 rows, 2 heads, 1 column (half = 2): within a head, GGUF row 2i + j -> HF row 2j + i;
    // numpy: arange(8).reshape(2, 2, 2, 1).swapaxes(1, 2).reshape(8) = [0 2 1 3 4 6 5 7].
    let w: Vec<f32> = (0..8).map(|x| x as f32).collect();
    assert_eq!(unpermute_rows(&w, 8, 2).unwrap(), [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]);
    // 12 rows, 1 head, 2 columns: arange(24).reshape(1, 6, 2, 2).swapaxes(1, 2).reshape(12, 2).
    let w: Vec<f32> = (0..24).map(|x| x as f32).collect();
    let rows: Vec<usize> = unpermute_rows(&w, 12, 1).unwrap().chunks(2).map(|r| r[0] as usize / 2).collect();
    assert_eq!(rows, [0, 2, 4, 6, 8, 10, 1, 3, 5, 7, 9, 11]);
    assert!(unpermute_rows(&w, 12, 5).is_err());
}

#[test]
fn tensor_names_map_to_hf_llama() {
    let names = Names::of(GgufArch::Llama);
    let hf = |g: &str| match names.to_hf(g) {
        Some(HfSource::One(n)) => Some(n),
        _ => None,
    };
    assert_eq!(hf("token_embd.weight").as_deref(), Some("model.embed_tokens.weight"));
    assert_eq!(hf("output.weight").as_deref(), Some("lm_head.weight"));
    assert_eq!(hf("output_norm.weight").as_deref(), Some("model.norm.weight"));
    assert_eq!(hf("blk.12.attn_output.weight").as_deref(), Some("model.layers.12.self_attn.o_proj.weight"));
    assert_eq!(hf("blk.0.ffn_norm.weight").as_deref(), Some("model.layers.0.post_attention_layernorm.weight"));
    assert_eq!(hf("blk.3.attn_norm.weight").as_deref(), Some("model.layers.3.input_layernorm.weight"));
    assert_eq!(hf("blk.3.ffn_gate.weight").as_deref(), Some("model.layers.3.mlp.gate_proj.weight"));
    assert_eq!(hf("blk.3.attn_k.bias").as_deref(), Some("model.layers.3.self_attn.k_proj.bias"));
    assert_eq!(hf("rope_freqs.weight"), None);
    assert_eq!(hf("blk.x.attn_q.weight"), None);
}

#[test]
fn import_writes_an_hf_folder() {
    let imp = imported();
    assert_eq!(imp.summary.architecture, "llama");
    assert_eq!(imp.summary.tensors, 272);
    assert_eq!(imp.summary.params, 134_515_008);
    for name in
        ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    {
        let p = imp.dir.join(name);
        assert!(p.is_file(), "{name} missing");
        assert!(imp.summary.files.contains(&p), "{name} not reported");
    }
    let leftovers: Vec<_> = fs::read_dir(&imp.dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "temp files left: {leftovers:?}");
    assert_eq!(fs::metadata(imp.dir.join("model.safetensors")).unwrap().len() / 1_000_000, 538);
}

#[test]
fn import_config_values() {
    let dir = &imported().dir;
    let c = read_json(&dir.join("config.json"));
    assert_eq!(c["architectures"], serde_json::json!(["LlamaForCausalLM"]));
    assert_eq!(c["model_type"], "llama");
    assert_eq!(c["hidden_size"], 576);
    assert_eq!(c["intermediate_size"], 1536);
    assert_eq!(c["num_hidden_layers"], 30);
    assert_eq!(c["num_attention_heads"], 9);
    assert_eq!(c["num_key_value_heads"], 3);
    assert_eq!(c["head_dim"], 64);
    assert_eq!(c["rms_norm_eps"].as_f64(), Some(1e-5));
    assert_eq!(c["rope_theta"].as_f64(), Some(100000.0));
    assert_eq!(c["max_position_embeddings"], 8192);
    assert_eq!(c["vocab_size"], 49152);
    assert_eq!(c["tie_word_embeddings"], true);
    assert_eq!(
        (c["bos_token_id"].as_u64(), c["eos_token_id"].as_u64(), c["pad_token_id"].as_u64()),
        (Some(1), Some(2), Some(2))
    );
    assert_eq!(c["torch_dtype"], "float32");
    assert_eq!(c["hidden_act"], "silu");
    assert!(c["rope_scaling"].is_null());

    let t = read_json(&dir.join("tokenizer_config.json"));
    assert_eq!(t["bos_token"], "<|im_start|>");
    assert_eq!(t["eos_token"], "<|im_end|>");
    assert_eq!(t["pad_token"], "<|im_end|>");
    assert_eq!(t["unk_token"], "<|endoftext|>");
    assert_eq!(t["add_bos_token"], false);
    assert_eq!(t["model_max_length"], 8192);
    assert_eq!(t["chat_template"].as_str(), model().get_str("tokenizer.chat_template").unwrap());

    let gcfg = read_json(&dir.join("generation_config.json"));
    assert_eq!(gcfg, serde_json::json!({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}));
}

#[test]
fn import_safetensors_names_shapes_and_values() {
    let st = safetensors::SafeTensors::deserialize(safetensors_map()).unwrap();
    let names: HashSet<String> = st.names().into_iter().map(String::from).collect();
    assert_eq!(names.len(), 272);
    assert!(!names.contains("lm_head.weight"));
    for l in [0, 29] {
        for m in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
            "mlp.down_proj",
            "input_layernorm",
            "post_attention_layernorm",
        ] {
            assert!(names.contains(&format!("model.layers.{l}.{m}.weight")), "layer {l} {m}");
        }
    }
    for (name, t) in st.tensors() {
        assert_eq!(t.dtype(), safetensors::Dtype::F32, "{name}");
    }
    let (e, shape) = st_tensor("model.embed_tokens.weight");
    assert_eq!(shape, [49152, 576]);
    assert_eq!(sha_f32(&e), "3fd491c8066dd9dc1a2bf6796701526c82817d95c0ecabacdef3013c2b8bbbaa");
    let (n, _) = st_tensor("model.norm.weight");
    assert_eq!(sha_f32(&n), "3b87f8e27335e67fc08f159cabfd2d18f205d6c5b225a6f978153552bf01d559");
    let (d, shape) = st_tensor("model.layers.29.mlp.down_proj.weight");
    assert_eq!(shape, [576, 1536]);
    assert_eq!(sha_f32(&d), "c19605745425a11e704e305ce3d27b632c406195d39eb3377e9cfb140ac643d1");
    // The header declares format "pt" (transformers requires it).
    let mut n = [0u8; 8];
    n.copy_from_slice(&safetensors_map()[..8]);
    let header: serde_json::Value =
        serde_json::from_slice(&safetensors_map()[8..8 + u64::from_le_bytes(n) as usize]).unwrap();
    assert_eq!(header["__metadata__"]["format"], "pt");
}

#[test]
fn import_unpermutes_q_and_k() {
    // numpy on python-gguf data: w.reshape(n_head, rows//n_head//2, 2, cols).swapaxes(1, 2).reshape(rows, cols)
    let (q, shape) = st_tensor("model.layers.0.self_attn.q_proj.weight");
    assert_eq!(shape, [576, 576]);
    assert_eq!(sha_f32(&q), "54b377bbfa2deab945dfdba7fb59e0ca3eb74329358bd1b53b635b3ff37c1a56");
    assert_eq!(&q[576..576 + 3], &[-0.1591796875, 0.39794921875, -0.0198974609375]);
    assert_eq!(q[32 * 576 + 10], 0.03369140625);
    assert_eq!(q[100 * 576 + 200], 0.002197265625);
    let (k, shape) = st_tensor("model.layers.0.self_attn.k_proj.weight");
    assert_eq!(shape, [192, 576]);
    assert_eq!(sha_f32(&k), "814d239237d0643a10d9468d42e617b687ef032f85ad617389de27cf27f6fd34");
    assert_eq!(k[33 * 576 + 1], 0.22955322265625);
    let (q29, _) = st_tensor("model.layers.29.self_attn.q_proj.weight");
    assert_eq!(sha_f32(&q29), "2f39f8002e96772faadb7667719e615167fe314589ce699ce97a007e33f2f298");

    // Row by row against the GGUF rows: head h, HF row j*32 + i <- GGUF row 2i + j.
    let (raw, _) = model().tensor_f32("blk.0.attn_q.weight").unwrap();
    for h in 0..9 {
        for i in 0..32 {
            for j in 0..2 {
                let (dst, src) = (h * 64 + j * 32 + i, h * 64 + 2 * i + j);
                assert_eq!(q[dst * 576..(dst + 1) * 576], raw[src * 576..(src + 1) * 576], "row {dst}");
            }
        }
    }
    // V is not permuted.
    let (v, _) = st_tensor("model.layers.0.self_attn.v_proj.weight");
    assert_eq!(v, model().tensor_f32("blk.0.attn_v.weight").unwrap().0);
}

/// Token ids from the Python `tokenizers` package (a BPE built from the GGUF vocab and
/// merges with SmolLM2's Digits + ByteLevel pre-tokenizer; transformers' GGUF
/// conversion gives the same ids).
const KNOWN: [(&str, &[u32]); 7] = [
    ("Hello, world!", &[19556, 28, 905, 17]),
    ("The year 2024 has 365 days.", &[504, 713, 216, 34, 32, 34, 36, 553, 216, 35, 38, 37, 2009, 30]),
    ("naïve café — 日本語 🤗", &[3546, 46494, 37366, 1841, 17097, 241, 115, 40993, 179, 120, 248, 15107, 114, 241]),
    ("line one\nline two\n\n  indented\tTab", &[1311, 582, 198, 1311, 827, 8866, 641, 6574, 197, 30064]),
    (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
        &[1, 4093, 198, 1780, 314, 216, 34, 27, 34, 47, 2, 198, 1, 520, 9531, 198],
    ),
    ("def f(x):\n    return x**2  # comment", &[1604, 275, 24, 104, 727, 472, 1003, 1792, 828, 34, 216, 907, 5189]),
    (" leading space and trailing  ", &[2899, 1898, 284, 35079, 256]),
];

#[test]
fn import_tokenizer_round_trips_and_matches_known_ids() {
    let tok = tokenizers::Tokenizer::from_file(imported().dir.join("tokenizer.json")).unwrap();
    assert_eq!(tok.get_vocab_size(true), 49152);
    assert_eq!(tok.token_to_id("<|im_start|>"), Some(1));
    assert_eq!(tok.token_to_id("<|im_end|>"), Some(2));
    for (text, ids) in KNOWN {
        let enc = tok.encode(text, true).unwrap();
        assert_eq!(enc.get_ids(), ids, "{text:?}");
        assert_eq!(tok.decode(enc.get_ids(), false).unwrap(), text, "{text:?}");
    }
    // Digits are split one by one; ChatML markers are single special tokens.
    let enc = tok.encode("<|im_start|>12345<|im_end|>", true).unwrap();
    assert_eq!(enc.get_tokens(), ["<|im_start|>", "1", "2", "3", "4", "5", "<|im_end|>"]);
    assert_eq!(enc.get_ids()[0], 1);
    assert_eq!(*enc.get_ids().last().unwrap(), 2);
    // add_bos_token is false: nothing is added.
    assert_eq!(tok.encode("Hi", true).unwrap().get_ids(), tok.encode("Hi", false).unwrap().get_ids());
    // Special tokens are dropped when asked.
    assert_eq!(tok.decode(&[1, 19556, 2], true).unwrap(), "Hello");
}

#[test]
fn tokenizer_adds_bos_only_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let kvs = |add_bos: bool| {
        vec![
            ("tokenizer.ggml.model", V::S("gpt2")),
            ("tokenizer.ggml.pre", V::S("smollm")),
            ("tokenizer.ggml.tokens", V::Arr(8, vec![V::S("<s>"), V::S("a"), V::S("b"), V::S("ab"), V::S("<u>")])),
            ("tokenizer.ggml.token_type", V::Arr(5, vec![V::I32(3), V::I32(1), V::I32(1), V::I32(1), V::I32(4)])),
            ("tokenizer.ggml.merges", V::Arr(8, vec![V::S("a b")])),
            ("tokenizer.ggml.bos_token_id", V::U32(0)),
            ("tokenizer.ggml.add_bos_token", V::Bool(add_bos)),
        ]
    };
    for add_bos in [true, false] {
        let p = write_tmp(dir.path(), "tok.gguf", &mini_gguf(3, &kvs(add_bos), &[], 32));
        let json = tokenizer_json(&GgufFile::open(&p).unwrap()).unwrap();
        let tok = tokenizers::Tokenizer::from_str(&json.to_string()).unwrap();
        let ids = tok.encode("ab<u>a", true).unwrap().get_ids().to_vec();
        assert_eq!(ids, if add_bos { vec![0, 3, 4, 1] } else { vec![3, 4, 1] });
        let added = json["added_tokens"].as_array().unwrap();
        assert_eq!((added[0]["special"].as_bool(), added[1]["special"].as_bool()), (Some(true), Some(false)));
    }
}

#[test]
fn sentencepiece_vocabulary_without_scores_and_other_architectures_are_refused() {
    // A `llama` (SentencePiece) vocabulary is rebuilt from its scores (tests/gguf_spm.rs);
    // without them there is no merge order, and the error says so.
    let dir = tempfile::tempdir().unwrap();
    let kvs = [
        ("tokenizer.ggml.model", V::S("llama")),
        ("tokenizer.ggml.tokens", V::Arr(8, vec![V::S("<unk>"), V::S("a"), V::S("b")])),
    ];
    let p = write_tmp(dir.path(), "spm.gguf", &mini_gguf(3, &kvs, &[], 32));
    let err = tokenizer_json(&GgufFile::open(&p).unwrap()).unwrap_err().to_string();
    assert!(err.contains("no tokenizer.ggml.scores") && err.contains("spm.gguf"), "{err}");
    let p = write_tmp(dir.path(), "rwkv.gguf", &mini_gguf(3, &[("tokenizer.ggml.model", V::S("rwkv"))], &[], 32));
    let err = tokenizer_json(&GgufFile::open(&p).unwrap()).unwrap_err().to_string();
    assert!(err.contains("`rwkv` is not supported") && err.contains("llama (SentencePiece)"), "{err}");

    let p = write_tmp(dir.path(), "qwen.gguf", &mini_gguf(3, &[("general.architecture", V::S("qwen2"))], &[], 32));
    let out = dir.path().join("out");
    let err = import_gguf(&p, &out).unwrap_err().to_string();
    assert!(
        err.contains("`qwen2` is not supported") && err.contains("supported: llama") && err.contains("qwen.gguf"),
        "{err}"
    );
    assert!(!out.exists(), "nothing is written for a refused file");
}
