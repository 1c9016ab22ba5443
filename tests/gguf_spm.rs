//! GGUF export and import of SentencePiece vocabularies (`tuner::gguf::spm`,
//! `tuner::gguf::spm_vocab`) on tests/fixtures/spm (written by scripts/gen_spm_fixture.py: a
//! Gemma-layout and a Llama-layout SentencePiece BPE model of 512 pieces, each with the HF
//! tokenizer transformers makes from it and a tiny random model).
//!
//! Expected values come from that fixture's expected.json: the pieces, scores and types as
//! sentencepiece's own protobuf module decodes them, and per text the ids of the HF tokenizer
//! (and of sentencepiece). The GGUF files are read back by tuner and by gguf-py
//! (scripts/spm_gguf_check.py), which also tokenizes with transformers' GGUF loader.

use crate::common::*;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tuner::gguf::export::{check_supported, write_gguf, GgufType, Vocab};
use tuner::gguf::import::import_gguf;
use tuner::gguf::spm::{PieceType, SpmModel, SpmModelType};
use tuner::gguf::spm_vocab::SpmSource;
use tuner::gguf::GgufFile;

const MODELS: [&str; 2] = ["gemma3", "llama"];

fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures/spm").join(name)
}

fn expected(name: &str) -> Value {
    let all: Value = serde_json::from_str(&std::fs::read_to_string(fixture("expected.json")).unwrap()).unwrap();
    all[name].clone()
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A copy of fixture folder `name` under `dir`, without the files in `drop`.
fn copy_without(name: &str, dir: &Path, drop: &[&str]) -> PathBuf {
    let to = dir.join(name);
    std::fs::create_dir_all(&to).unwrap();
    for e in std::fs::read_dir(fixture(name)).unwrap() {
        let e = e.unwrap();
        let file = e.file_name().to_string_lossy().into_owned();
        if !drop.contains(&file.as_str()) {
            std::fs::copy(e.path(), to.join(&file)).unwrap();
        }
    }
    to
}

/// `dir` exported as an F16 GGUF file into `out`.
fn export(dir: &Path, out: &Path, name: &str) -> PathBuf {
    let path = out.join(format!("{name}.gguf"));
    write_gguf(dir, &path, GgufType::F16, name).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    path
}

fn strings(g: &GgufFile, key: &str) -> Vec<String> {
    g.get_array(key).unwrap().unwrap().iter().map(|v| v.as_str().unwrap().to_string()).collect()
}

fn ints(g: &GgufFile, key: &str) -> Vec<i64> {
    g.get_array(key).unwrap().unwrap().iter().map(|v| v.as_i64().unwrap()).collect()
}

fn floats(g: &GgufFile, key: &str) -> Vec<f64> {
    g.get_array(key).unwrap().unwrap().iter().map(|v| v.as_f64().unwrap()).collect()
}

/// The fixture's texts and the HF tokenizer's ids for them.
fn texts(name: &str) -> Vec<(String, Vec<u32>)> {
    expected(name)["strings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let ids = r["hf"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect();
            (r["text"].as_str().unwrap().to_string(), ids)
        })
        .collect()
}

/// Import `gguf` into `out` and check that its tokenizer.json encodes every text of fixture
/// `name` as the HF tokenizer does; returns the loaded tokenizer.
fn assert_import_encodes_like_hf(gguf: &Path, out: &Path, name: &str) -> tokenizers::Tokenizer {
    import_gguf(gguf, out).unwrap_or_else(|e| panic!("{name}: {e:#}"));
    let tok = tokenizers::Tokenizer::from_file(out.join("tokenizer.json")).unwrap();
    for (text, want) in texts(name) {
        let got = tok.encode(text.as_str(), true).unwrap().get_ids().to_vec();
        assert_eq!(got, want, "{name}: {text:?}");
    }
    tok
}

#[test]
fn tokenizer_model_reads_as_sentencepiece_decodes_it() {
    for name in MODELS {
        let m = SpmModel::read(&fixture(name).join("tokenizer.model")).unwrap();
        let table = expected(name)["table"].as_array().unwrap().clone();
        assert_eq!(m.pieces.len(), 512, "{name}");
        for (i, (p, want)) in m.pieces.iter().zip(&table).enumerate() {
            assert_eq!(p.piece, want[0].as_str().unwrap(), "{name}: piece {i}");
            assert_eq!(p.score, want[1].as_f64().unwrap() as f32, "{name}: score of {i}");
            assert_eq!(p.kind as i64, want[2].as_i64().unwrap(), "{name}: type of {i}");
        }
        assert_eq!((m.model_type, m.byte_fallback), (SpmModelType::Bpe, true), "{name}");
        assert_eq!((m.normalizer_name.as_str(), m.remove_extra_whitespaces), ("identity", false), "{name}");
        // A BPE model's scores: 0 for the special and byte pieces, then minus the merge order.
        let first = m.pieces.iter().position(|p| p.kind == PieceType::Normal).unwrap();
        assert_eq!(first, if name == "gemma3" { 263 } else { 259 }, "{name}: specials and 256 bytes first");
        assert!(m.pieces[..first].iter().all(|p| p.score == 0.0), "{name}");
        assert!(m.pieces[first..].iter().enumerate().all(|(k, p)| p.score == -(k as f32)), "{name}");
    }
    let g = SpmModel::read(&fixture("gemma3").join("tokenizer.model")).unwrap();
    assert_eq!((g.pad_id, g.eos_id, g.bos_id, g.unk_id, g.add_dummy_prefix), (0, 1, 2, 3, false));
    assert_eq!(g.pieces[5].kind, PieceType::UserDefined);
    assert_eq!((g.pieces[7].piece.as_str(), g.pieces[7].kind), ("<0x00>", PieceType::Byte));
    let l = SpmModel::read(&fixture("llama").join("tokenizer.model")).unwrap();
    assert_eq!((l.unk_id, l.bos_id, l.eos_id, l.pad_id, l.add_dummy_prefix), (0, 1, 2, -1, true));
    assert_eq!((l.pieces[0].piece.as_str(), l.pieces[0].kind), ("<unk>", PieceType::Unknown));
}

/// Hand-made ModelProto records: fields the reader does not use are skipped by wire type,
/// `int32` ids may be negative (ten-byte varints), absent fields take the proto's defaults.
#[test]
fn model_proto_wire_format_edge_cases() {
    fn varint(mut v: u64, out: &mut Vec<u8>) {
        loop {
            let b = (v & 0x7f) as u8;
            v >>= 7;
            if v == 0 {
                out.push(b);
                return;
            }
            out.push(b | 0x80);
        }
    }
    fn record(field: u64, payload: &[u8], out: &mut Vec<u8>) {
        varint(field << 3 | 2, out);
        varint(payload.len() as u64, out);
        out.extend(payload);
    }
    let mut piece = Vec::new();
    record(1, "▁hi".as_bytes(), &mut piece);
    piece.push(2 << 3 | 5);
    piece.extend((-7.5f32).to_le_bytes());
    let mut bare = Vec::new();
    record(1, b"x", &mut bare); // no score, no type: 0.0 and NORMAL
    let mut trainer = Vec::new();
    varint(3 << 3, &mut trainer);
    varint(2, &mut trainer); // model_type BPE
    varint(43 << 3, &mut trainer);
    varint(-1i64 as u64, &mut trainer); // pad_id -1: ten bytes
    varint(51 << 3 | 5, &mut trainer); // a float field the reader skips
    trainer.extend(0.5f32.to_le_bytes());
    varint(52 << 3 | 1, &mut trainer); // a 64-bit field (wire type 1), skipped
    trainer.extend(7u64.to_le_bytes());
    let mut proto = Vec::new();
    record(1, &piece, &mut proto);
    record(1, &bare, &mut proto);
    record(2, &trainer, &mut proto);
    record(4, b"self test data, skipped", &mut proto);
    let m = SpmModel::parse(&proto).unwrap();
    assert_eq!(m.pieces.len(), 2);
    assert_eq!((m.pieces[0].piece.as_str(), m.pieces[0].score, m.pieces[0].kind), ("▁hi", -7.5, PieceType::Normal));
    assert_eq!((m.pieces[1].score, m.pieces[1].kind), (0.0, PieceType::Normal));
    assert_eq!((m.model_type, m.pad_id, m.unk_id, m.bos_id, m.eos_id), (SpmModelType::Bpe, -1, 0, 1, 2));
    assert!(m.add_dummy_prefix && m.remove_extra_whitespaces && !m.byte_fallback, "proto defaults");

    let err = |bytes: &[u8]| format!("{:#}", SpmModel::parse(bytes).unwrap_err());
    assert!(err(&proto[..proto.len() - 3]).contains("truncated"), "{}", err(&proto[..proto.len() - 3]));
    assert!(err(&[]).contains("no pieces"));
    assert!(err(&[1 << 3 | 3]).contains("wire type 3"), "groups are not part of a ModelProto");
    assert!(err(&[0, 0]).contains("field number 0"));
    let mut bad_utf8 = Vec::new();
    record(1, &[0xff, 0xfe], &mut bad_utf8);
    let mut p = Vec::new();
    record(1, &bad_utf8, &mut p);
    let e = err(&p);
    assert!(e.contains("piece 0") && e.contains("not UTF-8"), "{e}");
    let mut bad_type = Vec::new();
    record(1, b"y", &mut bad_type);
    bad_type.extend([3 << 3, 9]);
    let mut p = Vec::new();
    record(1, &bad_type, &mut p);
    assert!(err(&p).contains("unknown piece type 9"), "{}", err(&p));
}

/// tokens, scores and types as `_create_vocab_sentencepiece` writes them for fixture `name`:
/// the pieces, then the HF added tokens (score -1000; control when special, else
/// user-defined; the unknown piece stays unknown), `[PADn]` rows up to the embedding's size.
fn llama_cpp_vocab(name: &str) -> (Vec<String>, Vec<f64>, Vec<i64>) {
    let e = expected(name);
    let rows = e["vocab_size"].as_u64().unwrap() as usize;
    let mut tokens: Vec<String> = (0..rows).map(|i| format!("[PAD{i}]")).collect();
    let mut scores = vec![-10000.0; rows];
    let mut types = vec![5i64; rows];
    for (i, p) in e["table"].as_array().unwrap().iter().enumerate() {
        tokens[i] = p[0].as_str().unwrap().to_string();
        scores[i] = p[1].as_f64().unwrap();
        types[i] = p[2].as_i64().unwrap();
    }
    for a in json(&fixture(name).join("tokenizer.json"))["added_tokens"].as_array().unwrap() {
        let i = a["id"].as_u64().unwrap() as usize;
        tokens[i] = a["content"].as_str().unwrap().to_string();
        scores[i] = -1000.0;
        types[i] = if types[i] == 2 {
            2
        } else if a["special"] == true {
            3
        } else {
            4
        };
    }
    (tokens, scores, types)
}

#[test]
fn sentencepiece_vocabularies_export_as_llama_cpp_writes_them() {
    let out = tmp();
    for name in MODELS {
        let support = check_supported(&fixture(name)).unwrap();
        assert_eq!(support.vocab, Vocab::SentencePiece(SpmSource::Model), "{name}");
        let g = GgufFile::open(export(&fixture(name), out.path(), name)).unwrap();
        assert_eq!(g.get_str("tokenizer.ggml.model").unwrap(), Some("llama"), "{name}");
        assert_eq!(g.get_str("tokenizer.ggml.pre").unwrap(), Some("default"), "{name}");
        let (tokens, scores, types) = llama_cpp_vocab(name);
        assert_eq!(strings(&g, "tokenizer.ggml.tokens"), tokens, "{name}");
        assert_eq!(floats(&g, "tokenizer.ggml.scores"), scores, "{name}");
        assert_eq!(ints(&g, "tokenizer.ggml.token_type"), types, "{name}");
        let id = |k: &str| g.get_u64(&format!("tokenizer.ggml.{k}")).unwrap();
        let flag = |k: &str| g.get_bool(&format!("tokenizer.ggml.{k}")).unwrap();
        let template = g.get_str("tokenizer.chat_template").unwrap().map(str::to_string);
        if name == "gemma3" {
            assert_eq!(tokens.len(), 520);
            assert_eq!((&tokens[5][..], types[5]), ("<start_of_turn>", 4), "user-defined in the proto");
            assert_eq!((&tokens[512][..], types[512], scores[512]), ("<image_soft_token>", 3, -1000.0));
            assert_eq!((&tokens[519][..], types[519], scores[519]), ("[PAD519]", 5, -10000.0));
            assert_eq!([id("bos_token_id"), id("eos_token_id"), id("unknown_token_id")], [Some(2), Some(1), Some(3)]);
            assert_eq!(id("padding_token_id"), Some(0));
            assert_eq!(flag("add_space_prefix"), Some(false), "Gemma: as Gemma3Model.set_vocab writes it");
            assert!(template.unwrap().contains("<start_of_turn>"));
        } else {
            assert_eq!(tokens.len(), 516);
            assert_eq!((&tokens[0][..], types[0]), ("<unk>", 2));
            assert_eq!((&tokens[512][..], types[512]), ("<code>", 4), "a non-special added token");
            assert_eq!([id("bos_token_id"), id("eos_token_id"), id("unknown_token_id")], [Some(1), Some(2), Some(0)]);
            assert_eq!(id("padding_token_id"), None, "the model has no pad piece (pad_id -1)");
            assert_eq!(flag("add_space_prefix"), Some(true), "the model's add_dummy_prefix");
            assert_eq!(template, None);
        }
        assert_eq!((flag("add_bos_token"), flag("add_eos_token")), (Some(true), Some(false)), "{name}");
    }
}

#[test]
fn imported_sentencepiece_gguf_tokenizes_like_the_hf_tokenizer() {
    let out = tmp();
    for name in MODELS {
        let gguf = export(&fixture(name), out.path(), name);
        let dir = out.path().join(format!("{name}-imported"));
        let tok = assert_import_encodes_like_hf(&gguf, &dir, name);
        let hf = tokenizers::Tokenizer::from_file(fixture(name).join("tokenizer.json")).unwrap();
        for text in ["Hello world", "line one\nline two\tafter a tab", "emoji 🙂 and 漢字 fall back to bytes"] {
            let ids = hf.encode(text, true).unwrap().get_ids().to_vec();
            assert_eq!(tok.decode(&ids, true).unwrap(), text, "{name}: decodes back");
        }
        let tc = json(&dir.join("tokenizer_config.json"));
        let (bos, eos) = if name == "gemma3" { ("<bos>", "<eos>") } else { ("<s>", "</s>") };
        assert_eq!((tc["bos_token"].as_str(), tc["eos_token"].as_str()), (Some(bos), Some(eos)), "{name}");
        assert_eq!(tc["add_bos_token"], true, "{name}");
        let rebuilt = json(&dir.join("tokenizer.json"));
        if name == "gemma3" {
            assert_eq!(rebuilt["normalizer"]["type"], "Replace", "Gemma's layout: spaces become ▁, no prefix");
        } else {
            assert_eq!(rebuilt["pre_tokenizer"]["type"], "Metaspace", "Llama's layout: ▁ before the first word");
        }
    }
}

/// Without tokenizer.model, a byte-fallback BPE tokenizer.json is written as the same
/// vocabulary (tokens and types), with scores from the merge ranks, and imports back to a
/// tokenizer that encodes like it.
#[test]
fn byte_fallback_tokenizer_json_exports_as_a_sentencepiece_vocabulary() {
    let out = tmp();
    for name in MODELS {
        let with_model = GgufFile::open(export(&fixture(name), out.path(), name)).unwrap();
        let dir = copy_without(name, out.path(), &["tokenizer.model"]);
        assert_eq!(check_supported(&dir).unwrap().vocab, Vocab::SentencePiece(SpmSource::TokenizerJson));
        let gguf = export(&dir, out.path(), &format!("{name}-json"));
        let g = GgufFile::open(&gguf).unwrap();
        assert_eq!(g.get_str("tokenizer.ggml.model").unwrap(), Some("llama"));
        for key in ["tokens", "token_type"] {
            let key = format!("tokenizer.ggml.{key}");
            assert_eq!(g.get(&key), with_model.get(&key), "{name}: {key} as from tokenizer.model");
        }
        for key in [
            "bos_token_id",
            "eos_token_id",
            "unknown_token_id",
            "padding_token_id",
            "add_bos_token",
            "add_space_prefix",
        ] {
            let key = format!("tokenizer.ggml.{key}");
            assert_eq!(g.get(&key), with_model.get(&key), "{name}: {key}");
        }
        // Scores: minus the rank of the first merge producing the token; normal tokens no merge
        // produces below every merge; bytes and the unknown token 0; added tokens -1000.
        let tj = json(&dir.join("tokenizer.json"));
        let merges = tj["model"]["merges"].as_array().unwrap();
        let mut first: HashMap<String, usize> = HashMap::new();
        for (rank, m) in merges.iter().enumerate() {
            first.entry(format!("{}{}", m[0].as_str().unwrap(), m[1].as_str().unwrap())).or_insert(rank);
        }
        let tokens = strings(&g, "tokenizer.ggml.tokens");
        let types = ints(&g, "tokenizer.ggml.token_type");
        let scores = floats(&g, "tokenizer.ggml.scores");
        let added: Vec<usize> =
            tj["added_tokens"].as_array().unwrap().iter().map(|a| a["id"].as_u64().unwrap() as usize).collect();
        let mut merged = 0;
        for (i, t) in tokens.iter().enumerate() {
            let want = match types[i] {
                _ if added.contains(&i) => -1000.0,
                1 => first.get(t).map_or(-(merges.len() as f64), |r| -(*r as f64)),
                5 => -10000.0,
                _ => 0.0,
            };
            assert_eq!(scores[i], want, "{name}: score of {t:?}");
            merged += usize::from(types[i] == 1 && first.contains_key(t));
        }
        assert!(merged > 150, "{name}: {merged} tokens come from merges");
        assert_eq!(scores[tokens.iter().position(|t| t == "▁the").unwrap()], -(first["▁the"] as f64));
        let imported = out.path().join(format!("{name}-json-imported"));
        assert_import_encodes_like_hf(&gguf, &imported, name);
    }
}

#[test]
fn a_corrupted_tokenizer_model_is_refused_naming_the_file() {
    let out = tmp();
    let dir = copy_without("gemma3", out.path(), &[]);
    let model = dir.join("tokenizer.model");
    let bytes = std::fs::read(&model).unwrap();
    std::fs::write(&model, &bytes[..bytes.len() / 2]).unwrap();
    let msg = format!("{:#}", check_supported(&dir).unwrap_err());
    assert!(
        msg.contains(&model.display().to_string())
            && msg.contains("not a valid SentencePiece model")
            && msg.contains("truncated"),
        "{msg}"
    );
    let gguf = out.path().join("broken.gguf");
    assert!(write_gguf(&dir, &gguf, GgufType::F16, "broken").is_err());
    assert!(!gguf.exists(), "nothing is written for a refused model");

    std::fs::write(&model, b"this is not a protobuf").unwrap();
    let msg = format!("{:#}", check_supported(&dir).unwrap_err());
    assert!(msg.contains("tokenizer.model") && msg.contains("not a valid SentencePiece model"), "{msg}");

    // More pieces than embedding rows: the tokenizer is not this model's.
    std::fs::write(&model, &bytes).unwrap();
    let mut cfg = json(&dir.join("config.json"));
    cfg["vocab_size"] = 500.into();
    std::fs::write(dir.join("config.json"), cfg.to_string()).unwrap();
    let msg = format!("{:#}", write_gguf(&dir, &gguf, GgufType::F16, "small").unwrap_err());
    assert!(msg.contains("has 512 pieces") && msg.contains("only 500 rows"), "{msg}");
}

/// The text the tokens `ids` spell: `▁` is a space, `<0xXX>` a byte.
fn spell(tokens: &[String], ids: &[usize]) -> String {
    let mut bytes = Vec::new();
    for &i in ids {
        let t = &tokens[i];
        match t.strip_prefix("<0x").and_then(|h| h.strip_suffix('>')).and_then(|h| u8::from_str_radix(h, 16).ok()) {
            Some(b) => bytes.push(b),
            None => bytes.extend(t.replace('\u{2581}', " ").as_bytes()),
        }
    }
    String::from_utf8(bytes).unwrap()
}

/// gguf-py reads the same vocabulary; transformers' GGUF loader tokenizes the llama file
/// exactly as sentencepiece does, and the Gemma file (which it reads as a Unigram) into pieces
/// of the same vocabulary that spell the text.
#[test]
fn gguf_py_and_transformers_read_the_exported_vocabularies() {
    let out = tmp();
    for name in MODELS {
        let gguf = export(&fixture(name), out.path(), name);
        let texts: Vec<String> = texts(name).into_iter().map(|(t, _)| t).collect();
        let texts_file = out.path().join(format!("{name}-texts.json"));
        std::fs::write(&texts_file, serde_json::to_string(&texts).unwrap()).unwrap();
        let o = std::process::Command::new(python())
            .arg(repo().join("scripts/spm_gguf_check.py"))
            .arg(&gguf)
            .arg("--texts")
            .arg(&texts_file)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "spm_gguf_check.py failed:\n{stdout}\n{}", String::from_utf8_lossy(&o.stderr));
        let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("{e}: {stdout}"));
        let meta = &report["metadata"];
        let (tokens, scores, types) = llama_cpp_vocab(name);
        assert_eq!(meta["tokenizer.ggml.model"], "llama");
        assert_eq!(meta["tokenizer.ggml.tokens"], serde_json::json!(tokens), "{name}");
        assert_eq!(meta["tokenizer.ggml.token_type"], serde_json::json!(types), "{name}");
        let got: Vec<f64> =
            meta["tokenizer.ggml.scores"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(got, scores, "{name}");
        assert_eq!(meta["tokenizer.ggml.add_space_prefix"], name == "llama", "{name}");

        // transformers ignores add_bos_token (no BOS) and reads Gemma files as a Unigram: the
        // llama file tokenizes exactly as sentencepiece does, the Gemma file into pieces that
        // spell the text (a different segmentation of the same vocabulary).
        let tf = &report["transformers"];
        let ids = tf["ids"].as_array().unwrap_or_else(|| panic!("{name}: transformers: {tf}"));
        let rows = expected(name)["strings"].as_array().unwrap().clone();
        assert_eq!(ids.len(), rows.len());
        for (got, row) in ids.iter().zip(&rows) {
            let text = row["text"].as_str().unwrap();
            let got: Vec<usize> = got.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
            if name == "llama" {
                let sp: Vec<usize> =
                    row["sentencepiece"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as usize).collect();
                assert_eq!(got, sp[1..], "{name}: {text:?}");
            } else {
                assert_eq!(spell(&tokens, &got), text, "{name}: transformers' pieces {got:?}");
            }
        }
    }
}
