//! src/generate and the KV cache: greedy parity with HF `generate` on left-padded batches,
//! cached vs uncached logits, stop strings, length and EOS, sampling determinism and the
//! processors, `tuner generate` one-shot and interactive, and the GGUF quickstart model.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use serde_json::Value;
use tch::{Device, Kind, Tensor};
use tuner::data::template::Message;
use tuner::data::tokenizer::Tok;
use tuner::generate::sampling::process;
use tuner::generate::{Completion, FinishReason, Generator, SamplingParams};
use tuner::model::{self, Batch, CausalLm, Config, KvCache, Linear, LoadOptions};

use crate::common::{repo, run, tmp, tuner};

const FAMILIES: [&str; 9] = ["llama", "llama-tied", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "gemma3n"];

fn fixture(name: &str) -> PathBuf {
    repo().join("tests/fixtures/models").join(name)
}

fn load_model(name: &str) -> Box<dyn CausalLm> {
    let opts = LoadOptions { dtype: Kind::Float, device: Device::Cpu, quantize: None, cuda_kernels: true };
    model::load(&fixture(name), &opts).unwrap()
}

fn generator(name: &str) -> Generator {
    Generator::from_parts(load_model(name), Tok::load(&fixture(name)).unwrap(), Device::Cpu)
}

/// The same model without its own cache path: exercises `CausalLm::layer_cached`'s default.
struct NoCache(Box<dyn CausalLm>);

impl CausalLm for NoCache {
    fn config(&self) -> &Config {
        self.0.config()
    }
    fn embed(&self, batch: &Batch) -> Tensor {
        self.0.embed(batch)
    }
    fn num_layers(&self) -> usize {
        self.0.num_layers()
    }
    fn layer(&self, i: usize, h: &Tensor, batch: &Batch, train: bool) -> Tensor {
        self.0.layer(i, h, batch, train)
    }
    fn norm(&self, h: &Tensor) -> Tensor {
        self.0.norm(h)
    }
    fn lm_head_weight(&self) -> Tensor {
        self.0.lm_head_weight()
    }
    fn logits(&self, h_normed: &Tensor) -> Tensor {
        self.0.logits(h_normed)
    }
    fn linears_mut(&mut self) -> Vec<(String, &mut Linear)> {
        self.0.linears_mut()
    }
    fn linears(&self) -> Vec<(String, &Linear)> {
        self.0.linears()
    }
}

fn reference(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture(name).join("generate.json")).unwrap()).unwrap()
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().unwrap().iter().map(|x| x.as_u64().unwrap() as u32).collect()
}

fn greedy(n: usize) -> SamplingParams {
    SamplingParams { max_new_tokens: n, ..SamplingParams::default() }
}

/// Generate and also collect each prompt's streamed text.
fn generate_streamed(g: &Generator, prompts: &[String], p: &SamplingParams) -> (Vec<Completion>, Vec<String>) {
    let mut streamed = vec![String::new(); prompts.len()];
    let done = g
        .generate(prompts, p, &mut |i, d| {
            streamed[i].push_str(d);
            true
        })
        .unwrap();
    (done, streamed)
}

/// HF's tokens cut at the first token we also stop at (HF stops on config eos only).
fn expected_tokens(g: &Generator, hf: &[u32]) -> (Vec<u32>, FinishReason) {
    match hf.iter().position(|t| g.eos_ids.contains(t)) {
        Some(k) => (hf[..=k].to_vec(), FinishReason::Eos),
        None => (hf.to_vec(), FinishReason::Length),
    }
}

fn check_greedy_parity(name: &str, g: &Generator) {
    let r = reference(name);
    let prompts: Vec<String> =
        r["prompts"].as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect();
    let n = r["max_new_tokens"].as_u64().unwrap() as usize;
    for (p, want) in prompts.iter().zip(r["prompt_ids"].as_array().unwrap()) {
        assert_eq!(g.encode_prompt(p).unwrap(), ids(want), "{name}: prompt ids");
    }
    let (done, streamed) = generate_streamed(g, &prompts, &greedy(n));
    for (i, c) in done.iter().enumerate() {
        let (tokens, finish) = expected_tokens(g, &ids(&r["generated"][i]));
        assert_eq!(c.tokens, tokens, "{name}: prompt {i} (batched, left-padded)");
        assert_eq!(c.finish_reason, finish, "{name}: prompt {i}");
        assert_eq!(streamed[i], c.text, "{name}: prompt {i}: the stream adds up to the text");
        let alone = g.generate(&prompts[i..=i], &greedy(n), &mut |_, _| true).unwrap();
        assert_eq!(alone[0].tokens, c.tokens, "{name}: prompt {i} alone");
    }
    // Repetition penalty: HF parity, and it changes the output.
    let rp = &r["repetition_penalty"];
    let i = rp["prompt"].as_u64().unwrap() as usize;
    let p = SamplingParams { repetition_penalty: rp["penalty"].as_f64().unwrap(), ..greedy(n) };
    let got = g.generate(&prompts[i..=i], &p, &mut |_, _| true).unwrap();
    assert_eq!(got[0].tokens, expected_tokens(g, &ids(&rp["generated"])).0, "{name}: repetition penalty");
    assert_ne!(got[0].tokens, done[i].tokens, "{name}: the penalty changes the output");
}

#[test]
fn greedy_matches_hf_generate_for_every_family() {
    for name in FAMILIES {
        check_greedy_parity(name, &generator(name));
    }
}

#[test]
fn the_default_cache_path_matches_hf_too() {
    for name in ["llama", "mistral"] {
        let g =
            Generator::from_parts(Box::new(NoCache(load_model(name))), Tok::load(&fixture(name)).unwrap(), Device::Cpu);
        check_greedy_parity(name, &g);
    }
}

/// max |a − b| / max |b|.
fn rel(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[])
}

/// Left-padded batch of `rows`: (ids, mask, positions).
fn left_padded(rows: &[Vec<i64>]) -> (Tensor, Tensor, Tensor) {
    let w = rows.iter().map(Vec::len).max().unwrap();
    let ids: Vec<i64> =
        rows.iter().flat_map(|r| std::iter::repeat_n(0, w - r.len()).chain(r.iter().copied())).collect();
    let mask: Vec<i64> =
        rows.iter().flat_map(|r| std::iter::repeat_n(0, w - r.len()).chain(std::iter::repeat_n(1, r.len()))).collect();
    let ids = Tensor::from_slice(&ids).view([rows.len() as i64, w as i64]);
    let mask = Tensor::from_slice(&mask).view([rows.len() as i64, w as i64]);
    let pos = (mask.cumsum(1, Kind::Int64) - 1).clamp_min(0);
    (ids, mask, pos)
}

fn check_cache_equals_recompute(name: &str, m: &dyn CausalLm) {
    let _g = tch::no_grad_guard();
    let r = reference(name);
    let mut rows: Vec<Vec<i64>> =
        r["prompt_ids"].as_array().unwrap().iter().map(|p| ids(p).into_iter().map(i64::from).collect()).collect();
    let (input, mask, pos) = left_padded(&rows);
    let mut cache = KvCache::new(m.num_layers());
    let batch = Batch::at(input.shallow_clone(), Some(mask.shallow_clone()), pos.shallow_clone());
    let cached = m.forward_cached(&batch, &mut cache);
    let full = m.forward(&batch);
    let real = mask.ne(0).unsqueeze(-1).expand_as(&full);
    let err = rel(&cached.masked_select(&real), &full.masked_select(&real));
    assert!(err <= 1e-5, "{name}: prefill rel err {err:e}");
    assert_eq!(cache.len(0), input.size()[1]);
    let mut mask = mask;
    let mut last = cached.select(1, -1);
    let mut worst = err;
    for step in 0..8 {
        let next: Vec<i64> = Vec::<i64>::try_from(&last.argmax(-1, false)).unwrap();
        for (row, t) in rows.iter_mut().zip(&next) {
            row.push(*t);
        }
        mask = Tensor::cat(&[&mask, &mask.ones_like().narrow(1, 0, 1)], 1);
        let pos = mask.cumsum(1, Kind::Int64).narrow(1, mask.size()[1] - 1, 1) - 1;
        let step_batch = Batch::at(Tensor::from_slice(&next).view([-1, 1]), Some(mask.shallow_clone()), pos);
        let got = m.forward_cached(&step_batch, &mut cache).select(1, 0);
        let (input, full_mask, full_pos) = left_padded(&rows);
        assert!(full_mask.equal(&mask));
        let want = m.forward(&Batch::at(input, Some(full_mask), full_pos)).select(1, -1);
        let err = rel(&got, &want);
        worst = worst.max(err);
        assert!(err <= 1e-5, "{name}: step {step} rel err {err:e}");
        last = got;
    }
    eprintln!("cache {name}: max rel err {worst:.2e}");
}

/// A prefill too large for the written-out attention (SDPA path) and the steps after it.
#[test]
fn long_prefill_through_sdpa_then_steps_match_recomputation() {
    let _g = tch::no_grad_guard();
    for name in ["mistral", "qwen3"] {
        let m = load_model(name);
        let ids: Vec<i64> = (0..2100).map(|i| (i * 37 + 11) % 290).collect();
        let mut cache = KvCache::new(m.num_layers());
        let prefill = Batch::new(Tensor::from_slice(&ids).view([1, -1]), None);
        let cached = m.forward_cached(&prefill, &mut cache);
        let err = rel(&cached, &m.forward(&prefill));
        assert!(err <= 1e-5, "{name}: long prefill rel err {err:e}");
        let (mut ids, mut last) = (ids, cached.select(1, -1));
        for _ in 0..2 {
            let next = last.argmax(-1, false).int64_value(&[0]);
            ids.push(next);
            let n = ids.len() as i64;
            let step =
                Batch::at(Tensor::from_slice(&[next]).view([1, 1]), None, Tensor::from_slice(&[n - 1]).view([1, 1]));
            let got = m.forward_cached(&step, &mut cache).select(1, 0);
            let want = m.forward(&Batch::new(Tensor::from_slice(&ids).view([1, -1]), None)).select(1, -1);
            let err = rel(&got, &want);
            assert!(err <= 1e-5, "{name}: step after a long prefill rel err {err:e}");
            last = got;
        }
    }
}

#[test]
fn cached_logits_equal_uncached_recomputation() {
    for name in FAMILIES {
        check_cache_equals_recompute(name, load_model(name).as_ref());
    }
    check_cache_equals_recompute("mistral", &NoCache(load_model("mistral")));
}

fn prompts(name: &str) -> Vec<String> {
    reference(name)["prompts"].as_array().unwrap().iter().map(|x| x.as_str().unwrap().to_string()).collect()
}

#[test]
fn stop_strings_cut_the_text_and_the_stream_never_passes_them() {
    let g = generator("llama");
    let ps = prompts("llama");
    let full = g.generate(&ps[..1], &greedy(20), &mut |_, _| true).unwrap().remove(0);
    // A 2-character ASCII piece from the middle of the text, not at its start.
    let chars: Vec<(usize, char)> = full.text.char_indices().collect();
    let k = (2..chars.len() - 1)
        .find(|&k| chars[k].1.is_ascii_graphic() && chars[k + 1].1.is_ascii_graphic())
        .expect("an ASCII pair in the greedy text");
    let stop = full.text[chars[k].0..chars[k].0 + 2].to_string();
    let cut = full.text.find(&stop).unwrap();
    let p = SamplingParams { stop: vec!["never appears \u{1F600}".into(), stop.clone()], ..greedy(20) };
    let (done, streamed) = generate_streamed(&g, &ps[..1], &p);
    assert_eq!(done[0].finish_reason, FinishReason::Stop, "stop {stop:?} in {:?}", full.text);
    assert_eq!(done[0].text, full.text[..cut], "stop {stop:?}");
    assert_eq!(streamed[0], done[0].text);
    assert!(done[0].tokens.len() < full.tokens.len());
    assert_eq!(done[0].tokens[..], full.tokens[..done[0].tokens.len()]);
}

#[test]
fn max_new_tokens_eos_and_cancel_end_sequences() {
    let mut g = generator("qwen2");
    let ps = prompts("qwen2");
    let (done, _) = generate_streamed(&g, &ps, &greedy(5));
    assert!(done.iter().all(|c| c.tokens.len() == 5 && c.finish_reason == FinishReason::Length));
    let none = g.generate(&ps, &greedy(0), &mut |_, _| true).unwrap();
    assert!(none.iter().all(|c| c.tokens.is_empty() && c.text.is_empty() && c.finish_reason == FinishReason::Length));

    // EOS: make prompt 0's third greedy token an EOS; prompt 1 runs on to the limit.
    let eos = done[0].tokens[2];
    assert!(!done[1].tokens.contains(&eos), "pick another token for this test");
    g.eos_ids.push(eos);
    let (stopped, streamed) = generate_streamed(&g, &ps, &greedy(5));
    assert_eq!(stopped[0].tokens, done[0].tokens[..3]);
    assert_eq!(stopped[0].finish_reason, FinishReason::Eos);
    assert_eq!(stopped[0].text, g.tok.tokenizer.decode(&done[0].tokens[..2], true).unwrap());
    assert_eq!(streamed[0], stopped[0].text);
    assert_eq!(stopped[1], done[1], "the other prompt is unaffected");
    g.eos_ids.pop();

    // Cancel: returning false from on_delta stops that prompt only.
    let mut calls = 0;
    let cancelled = g
        .generate(&ps, &greedy(8), &mut |i, _| {
            calls += usize::from(i == 0);
            i != 0
        })
        .unwrap();
    assert_eq!(calls, 1);
    assert_eq!(cancelled[0].finish_reason, FinishReason::Stop);
    assert!(cancelled[0].tokens.len() < 8);
    assert_eq!(cancelled[1].tokens.len(), 8);
}

#[test]
fn sampling_is_seeded_and_top_k_1_is_greedy() {
    let g = generator("llama-tied");
    let ps = prompts("llama-tied");
    let sample = |seed: u64, prompts: &[String]| {
        let p = SamplingParams { temperature: 1.0, seed, ..greedy(12) };
        g.generate(prompts, &p, &mut |_, _| true).unwrap()
    };
    let a = sample(7, &ps);
    assert_eq!(a, sample(7, &ps), "same seed, same tokens");
    assert_eq!(sample(7, &ps[..1])[0], a[0], "prompt 0's draws do not depend on the other prompts");
    let distinct: std::collections::HashSet<Vec<u32>> = (0..6).map(|s| sample(s, &ps[..1]).remove(0).tokens).collect();
    assert!(distinct.len() >= 3, "temperature 1 varies across seeds: {distinct:?}");

    let base = g.generate(&ps, &greedy(12), &mut |_, _| true).unwrap();
    for p in [
        SamplingParams { temperature: 0.7, top_k: 1, seed: 3, ..greedy(12) },
        SamplingParams { temperature: 0.7, top_p: 1e-6, seed: 3, ..greedy(12) },
    ] {
        assert_eq!(g.generate(&ps, &p, &mut |_, _| true).unwrap(), base, "{p:?}");
    }
}

#[test]
fn processors_follow_hf_semantics() {
    let probs = Tensor::from_slice(&[0.5f32, 0.2, 0.15, 0.1, 0.05]).view([1, 5]);
    let logits = probs.log();
    let kept = |p: SamplingParams| -> Vec<bool> {
        let out = process(&logits, None, &SamplingParams { temperature: 1.0, ..p });
        Vec::<bool>::try_from(&out.isfinite().view([-1])).unwrap()
    };
    let d = SamplingParams::default();
    let before = logits.copy();
    let _ = process(&logits, None, &SamplingParams { temperature: 0.5, ..d.clone() });
    assert!(logits.equal(&before), "the input logits are left as they were");
    assert_eq!(kept(SamplingParams { top_p: 0.65, ..d.clone() }), [true, true, false, false, false]);
    assert_eq!(kept(SamplingParams { top_p: 0.75, ..d.clone() }), [true, true, true, false, false]);
    assert_eq!(kept(SamplingParams { top_p: 0.01, ..d.clone() }), [true, false, false, false, false]);
    assert_eq!(kept(SamplingParams { top_k: 2, ..d.clone() }), [true, true, false, false, false]);
    assert_eq!(kept(SamplingParams { top_k: 2, top_p: 0.5, ..d.clone() }), [true, false, false, false, false]);
    // Temperature divides; penalty divides positive and multiplies negative logits of seen tokens.
    let x = Tensor::from_slice(&[2.0f32, -2.0, 1.0]).view([1, 3]);
    let seen = Tensor::from_slice(&[true, true, false]).view([1, 3]);
    let out = process(&x, Some(&seen), &SamplingParams { repetition_penalty: 2.0, temperature: 0.5, ..d.clone() });
    assert_eq!(Vec::<f32>::try_from(&out.view([-1])).unwrap(), [2.0, -8.0, 2.0]);
    let bad = SamplingParams { temperature: -1.0, top_p: 0.0, repetition_penalty: 0.0, stop: vec![String::new()], ..d };
    let msg = format!("{:#}", bad.validate().unwrap_err());
    for part in [
        "temperature must be ≥ 0 (found `-1`)",
        "top_p must be in (0, 1]",
        "repetition_penalty must be > 0",
        "stop strings must not be empty",
    ] {
        assert!(msg.contains(part), "{msg}");
    }
}

fn run_stdin(args: &[&str], input: &str) -> (i32, String, String) {
    let mut child =
        tuner().args(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn cli_prints_the_completion_and_rejects_bad_flags() {
    let dir = fixture("qwen3");
    let g = generator("qwen3");
    let prompt = prompts("qwen3").remove(0);
    let want = g.generate(std::slice::from_ref(&prompt), &greedy(12), &mut |_, _| true).unwrap().remove(0);
    let (code, out, err) =
        run(&["generate", "--model", path(&dir), "--prompt", &prompt, "--max-new-tokens", "12", "--device", "cpu"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, format!("{}\n", want.text));

    let chat = g.chat_prompt(&[Message { role: "user".into(), content: "hi".into() }]).unwrap();
    assert!(chat.ends_with("<|im_start|>assistant\n"), "{chat}");
    let want = g.generate(&[chat], &greedy(6), &mut |_, _| true).unwrap().remove(0);
    let (code, out, err) = run(&[
        "generate",
        "--model",
        path(&dir),
        "--prompt",
        "hi",
        "--chat",
        "--max-new-tokens",
        "6",
        "--device",
        "cpu",
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, format!("{}\n", want.text));

    let m = path(&dir);
    for (args, code, msg) in [
        (vec!["--temperature", "-1"], 2, "temperature must be ≥ 0 (found `-1`)"),
        (vec!["--top-p", "0"], 2, "top_p must be in (0, 1] (found `0`)"),
        (vec!["--dtype", "fp8"], 2, "invalid value 'fp8' for '--dtype <DTYPE>'"),
        (vec!["--device", "tpu"], 2, "invalid device \"tpu\", expected \"auto\", \"cpu\", \"cuda\" or \"cuda:N\""),
        (vec!["--max-new-tokens", "many"], 2, "invalid value 'many'"),
        (vec!["--stop", ""], 2, "stop strings must not be empty"),
    ] {
        let mut full = vec!["generate", "--model", m, "--prompt", "x"];
        full.extend(args.iter().copied());
        let (c, _, err) = run(&full);
        assert_eq!(c, code, "{args:?}: {err}");
        assert!(err.contains(msg), "{args:?}: {err}");
    }
    let (c, _, err) = run(&["generate", "--model", "/nope", "--prompt", "x"]);
    assert_eq!(c, 1, "{err}");
    assert!(err.contains("--model /nope: expected an HF model folder or a .gguf file"), "{err}");
}

#[test]
fn interactive_chat_answers_each_line_and_ends_at_eof() {
    let dir = fixture("llama");
    let g = generator("llama");
    let p = greedy(6);
    let reply =
        |msgs: &[Message]| g.generate(&[g.chat_prompt(msgs).unwrap()], &p, &mut |_, _| true).unwrap().remove(0).text;
    let user = |s: &str| Message { role: "user".into(), content: s.into() };
    let assistant = |s: &str| Message { role: "assistant".into(), content: s.into() };
    let r1 = reply(&[user("hello")]);
    let r2 = reply(&[user("hello"), assistant(&r1), user("and then?")]);
    let args = ["generate", "--model", path(&dir), "--max-new-tokens", "6", "--device", "cpu"];
    let (code, out, err) = run_stdin(&args, "hello\n\nand then?\n");
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, format!("{r1}\n{r2}\n"));

    // /reset forgets the conversation; /exit ends before the next line.
    let fresh = reply(&[user("and then?")]);
    let (code, out, err) = run_stdin(&args, "hello\n/reset\nand then?\n/exit\nignored\n");
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, format!("{r1}\n{fresh}\n"));
}

#[test]
fn quickstart_gguf_knows_the_capital_of_france() {
    let d = tmp();
    let gguf = repo().join("models/SmolLM2-135M-Instruct.Q4_1.gguf");
    let out = tuner()
        .args([
            "generate",
            "--model",
            path(&gguf),
            "--chat",
            "--prompt",
            "What is the capital of France?",
            "--max-new-tokens",
            "12",
            "--device",
            "cpu",
        ])
        .env("TUNER_CACHE", d.path())
        .output()
        .unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stdout.contains("Paris"), "{stdout}");
}
