//! `tuner serve` over real HTTP on loopback: every endpoint against the engine run
//! in-process on the same model (greedy and seeded sampling, stop strings), SSE
//! streams, JSON errors for bad input, 50 concurrent clients, cancellation when a
//! client goes away, 503 when the queue is full, 500 when generation fails, and a
//! clean stop on Ctrl-C; the official `openai` Python client (scripts/openai_client_check.py)
//! against `--served-model-name` and `--api-key`; `/generate`'s `max_length`. Each test starts its own server (`--port 0`, the port read
//! from the `listening on` line) and kills it when it ends, passing or not.

use crate::common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};
use tuner::data::template::Message;
use tuner::generate::{Completion, Generator, SamplingParams};
use tuner::recipe::Dtype;

/// Bound on every wait: server start, socket reads, log lines.
const WAIT: Duration = Duration::from_secs(60);

/// A running `tuner serve`; killed on drop.
struct Server {
    child: Child,
    port: u16,
    log: Arc<Mutex<String>>,
}

impl Server {
    fn start(model: &Path, extra: &[&str], rust_log: &str) -> Server {
        Server::start_env(model, extra, rust_log, &[])
    }

    fn start_env(model: &Path, extra: &[&str], rust_log: &str, env: &[(&str, &str)]) -> Server {
        let mut child = tuner()
            .env("RUST_LOG", rust_log)
            .envs(env.iter().copied())
            .args(["serve", "--model", model.to_str().unwrap(), "--port", "0", "--device", "cpu", "--dtype", "fp32"])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("tuner serve starts");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("listening on http://") {
                    let _ = tx.send(addr.rsplit(':').next().and_then(|p| p.parse::<u16>().ok()));
                }
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let mut server = Server { child, port: 0, log };
        match rx.recv_timeout(WAIT) {
            Ok(Some(port)) => server.port = port,
            _ => panic!("no `listening on http://…:PORT` line from tuner serve; stderr:\n{}", server.log()),
        }
        server
    }

    fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    fn get(&self, path: &str) -> Reply {
        http(self.port, "GET", path, b"")
    }

    fn post(&self, path: &str, body: &Value) -> Reply {
        http(self.port, "POST", path, body.to_string().as_bytes())
    }

    /// Wait (bounded) for a stderr line that contains `needle` and return it.
    fn wait_log(&self, needle: &str) -> String {
        let t = Instant::now();
        while t.elapsed() < WAIT {
            if let Some(l) = self.log().lines().find(|l| l.contains(needle)) {
                return l.to_string();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("no log line with {needle:?}:\n{}", self.log())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP response: status, lower-cased head, and the body (de-chunked).
struct Reply {
    status: u16,
    head: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {} {}", self.status, self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|l| l.strip_prefix(&format!("{name}: ")))
    }

    /// Server-Sent Events as (event name, data); keep-alive comments are dropped.
    fn events(&self) -> Vec<(String, String)> {
        assert_eq!(self.header("content-type"), Some("text/event-stream"), "{}", self.head);
        let mut out = vec![];
        for block in self.body.split("\n\n") {
            let (mut name, mut data) = ("message".to_string(), vec![]);
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    name = v.to_string();
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data.push(v);
                }
            }
            if !data.is_empty() {
                out.push((name, data.join("\n")));
            }
        }
        out
    }
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

fn send(s: &mut TcpStream, method: &str, path: &str, body: &[u8]) {
    send_with(s, method, path, body, "");
}

/// `send` with `extra` header lines (each ending in `\r\n`).
fn send_with(s: &mut TcpStream, method: &str, path: &str, body: &[u8], extra: &str) {
    let head = format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n", body.len());
    // A server that refuses a body early may close before reading all of it.
    let _ = s.write_all(head.as_bytes()).and_then(|_| s.write_all(body));
}

fn http(port: u16, method: &str, path: &str, body: &[u8]) -> Reply {
    http_with(port, method, path, body, "")
}

fn http_with(port: u16, method: &str, path: &str, body: &[u8], extra: &str) -> Reply {
    let mut s = connect(port);
    send_with(&mut s, method, path, body, extra);
    let mut raw = vec![];
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
    }
    parse_reply(&raw)
}

fn parse_reply(raw: &[u8]) -> Reply {
    let text = String::from_utf8_lossy(raw).into_owned();
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or_else(|| panic!("no HTTP head in {text:?}"));
    let head = head.to_lowercase();
    let status =
        head.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or_else(|| panic!("bad status line: {head}"));
    let body = if head.contains("transfer-encoding: chunked") { dechunk(rest) } else { rest.to_string() };
    Reply { status, head, body }
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].strip_prefix("\r\n").unwrap_or(&rest[n..]);
    }
    out
}

fn generator(model: &Path, cache: &Path) -> Generator {
    let args = tuner::model::open::ModelArgs {
        model: model.to_path_buf(),
        adapter: None,
        dtype: Dtype::Fp32,
        device: tuner::recipe::DeviceSpec::Cpu,
    };
    Generator::load(&args, cache).unwrap()
}

fn engine(g: &Generator, prompt: &str, p: &SamplingParams) -> Completion {
    g.generate(&[prompt.to_string()], p, &mut |_, _| true).unwrap().remove(0)
}

fn greedy(n: usize) -> SamplingParams {
    SamplingParams { max_new_tokens: n, ..SamplingParams::default() }
}

fn reason(c: &Completion) -> Value {
    serde_json::to_value(c.finish_reason).unwrap()
}

fn openai_reason(c: &Completion) -> &'static str {
    if reason(c) == "length" {
        "length"
    } else {
        "stop"
    }
}

/// The llama fixture made for long generations: a 4096-token context, 21 more special tokens
/// (the last, `<|x320|>` = id 320, is outside the model's vocabulary), and that token as the
/// only EOS (`<|im_end|>` renamed), so greedy decoding always runs to `max_new_tokens`.
fn long_model(dir: &Path) -> PathBuf {
    let m = fixture_model("llama", dir);
    let edit = |file: &str, f: &dyn Fn(&mut Value)| {
        let mut v: Value = serde_json::from_str(&std::fs::read_to_string(m.join(file)).unwrap()).unwrap();
        f(&mut v);
        std::fs::write(m.join(file), v.to_string()).unwrap();
    };
    edit("config.json", &|v| {
        v["max_position_embeddings"] = json!(4096);
        v["eos_token_id"] = json!(320);
    });
    edit("generation_config.json", &|v| v["eos_token_id"] = json!(320));
    edit("tokenizer_config.json", &|v| v["eos_token"] = json!("<|x320|>"));
    edit("tokenizer.json", &|v| {
        let added = v["added_tokens"].as_array_mut().unwrap();
        for t in added.iter_mut().filter(|t| t["content"] == "<|im_end|>") {
            t["content"] = json!("<|im_stop|>");
        }
        for id in 300..=320 {
            added.push(json!({"id": id, "content": format!("<|x{id}|>"), "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}));
        }
    });
    m
}

#[test]
fn serve_answers_every_endpoint_as_the_engine_does_and_stops_on_ctrl_c() {
    let d = tmp();
    let model = fixture_model("llama", &d.path().join("model"));
    let mut srv = Server::start(&model, &[], "warn");
    let g = generator(&model, d.path());
    let name = model.display().to_string();

    let h = srv.get("/health");
    assert_eq!((h.status, h.json()["status"].clone(), h.json()["model"].clone()), (200, json!("ok"), json!(name)));
    let m = srv.get("/v1/models").json();
    assert_eq!(
        (m["object"].as_str(), m["data"][0]["id"].as_str(), m["data"][0]["max_model_len"].as_u64()),
        (Some("list"), Some(name.as_str()), Some(64))
    );

    // Greedy /generate equals Generator::generate.
    let want = engine(&g, "Hello world", &greedy(8));
    assert!(!want.tokens.is_empty());
    let r = srv.post("/generate", &json!({"prompt": "Hello world", "max_new_tokens": 8}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let full = json!({"generated_text": want.text, "finish_reason": reason(&want), "tokens": want.tokens.len()});
    assert_eq!(r.json(), full);

    // Seeded sampling equals the engine with the same parameters, run after run.
    let sampled = SamplingParams {
        max_new_tokens: 8,
        temperature: 0.9,
        top_k: 40,
        top_p: 0.95,
        repetition_penalty: 1.1,
        seed: 7,
        stop: vec![],
    };
    let want_s = engine(&g, "Hello world", &sampled);
    let body = json!({"prompt": "Hello world", "max_new_tokens": 8, "temperature": 0.9, "top_k": 40, "top_p": 0.95, "repetition_penalty": 1.1, "seed": 7});
    for _ in 0..2 {
        assert_eq!(srv.post("/generate", &body).json()["generated_text"], json!(want_s.text));
    }

    // A stop string cuts the text as the engine does (a list or a single string).
    let stop: String = want.text.chars().skip(2).take(1).collect();
    if !stop.is_empty() {
        let want_stop = engine(&g, "Hello world", &SamplingParams { stop: vec![stop.clone()], ..greedy(8) });
        let r = srv.post("/generate", &json!({"prompt": "Hello world", "max_new_tokens": 8, "stop": stop}));
        assert_eq!(r.json()["generated_text"], json!(want_stop.text));
        assert_eq!(r.json()["finish_reason"], reason(&want_stop));
    }

    // OpenAI completions, usage counted in tokens.
    let prompt_tokens = g.encode_prompt("Hello world").unwrap().len();
    let c = srv
        .post(
            "/v1/completions",
            &json!({"model": name, "prompt": "Hello world", "max_tokens": 8, "temperature": 0, "n": 1}),
        )
        .json();
    assert_eq!(c["object"], "text_completion");
    assert_eq!(c["model"], json!(name));
    assert!(c["id"].as_str().unwrap().starts_with("cmpl-"));
    assert_eq!(c["choices"][0]["text"], json!(want.text));
    assert_eq!(c["choices"][0]["finish_reason"], openai_reason(&want));
    assert_eq!(
        c["usage"],
        json!({"prompt_tokens": prompt_tokens, "completion_tokens": want.tokens.len(), "total_tokens": prompt_tokens + want.tokens.len()})
    );

    // OpenAI chat goes through the chat template.
    let messages = vec![
        Message { role: "system".into(), content: "Be brief.".into() },
        Message { role: "user".into(), content: "Hi there".into() },
    ];
    let want_chat = engine(&g, &g.chat_prompt(&messages).unwrap(), &greedy(8));
    let chat_body = json!({"model": name, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "Hi there"}]}], "max_tokens": 8, "temperature": 0});
    let c = srv.post("/v1/chat/completions", &chat_body).json();
    assert_eq!(c["object"], "chat.completion");
    assert_eq!(c["choices"][0]["message"], json!({"role": "assistant", "content": want_chat.text}));
    assert_eq!(c["choices"][0]["finish_reason"], openai_reason(&want_chat));
    assert_eq!(c["usage"]["completion_tokens"], json!(want_chat.tokens.len()));

    // Streams: the deltas add up to the non-streamed text; the last event ends the stream.
    let ev = srv.post("/generate", &json!({"prompt": "Hello world", "max_new_tokens": 8, "stream": true})).events();
    let (last, deltas) = ev.split_last().unwrap();
    assert_eq!(last.0, "done");
    assert_eq!(serde_json::from_str::<Value>(&last.1).unwrap(), full);
    let text: String = deltas
        .iter()
        .map(|(n, d)| {
            assert_eq!(n, "message");
            serde_json::from_str::<Value>(d).unwrap()["text"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(text, want.text);

    let ev = srv.post("/v1/completions", &json!({"prompt": "Hello world", "max_tokens": 8, "temperature": 0, "stream": true, "stream_options": {"include_usage": true}})).events();
    assert_eq!(ev.last().unwrap().1, "[DONE]");
    let chunks: Vec<Value> = ev[..ev.len() - 1].iter().map(|(_, d)| serde_json::from_str(d).unwrap()).collect();
    let (usage, chunks) = chunks.split_last().unwrap();
    assert_eq!(usage["usage"]["completion_tokens"], json!(want.tokens.len()));
    assert!(chunks.iter().all(|c| c["object"] == "text_completion" && c["id"] == chunks[0]["id"]));
    assert_eq!(chunks.iter().map(|c| c["choices"][0]["text"].as_str().unwrap()).collect::<String>(), want.text);
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], openai_reason(&want));
    assert!(chunks[..chunks.len() - 1].iter().all(|c| c["choices"][0]["finish_reason"].is_null()));

    let mut stream_body = chat_body.clone();
    stream_body["stream"] = json!(true);
    let ev = srv.post("/v1/chat/completions", &stream_body).events();
    assert_eq!(ev.last().unwrap().1, "[DONE]");
    let chunks: Vec<Value> = ev[..ev.len() - 1].iter().map(|(_, d)| serde_json::from_str(d).unwrap()).collect();
    assert!(chunks.iter().all(|c| c["object"] == "chat.completion.chunk"));
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let text: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(text, want_chat.text);
    assert_eq!(chunks.last().unwrap()["choices"][0]["finish_reason"], openai_reason(&want_chat));

    // Ctrl-C: the server stops by itself, exit code 0.
    assert_eq!(unsafe { libc::kill(srv.child.id() as i32, libc::SIGINT) }, 0);
    let t = Instant::now();
    let status = loop {
        if let Some(s) = srv.child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(20), "still running 20 s after SIGINT:\n{}", srv.log());
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(0), "{}", srv.log());
    std::thread::sleep(Duration::from_millis(100));
    assert!(srv.log().contains("server stopped"), "{}", srv.log());
}

#[test]
fn serve_refuses_bad_requests_with_json_errors_that_name_the_problem() {
    let d = tmp();
    let model = fixture_model("llama", &d.path().join("model"));
    let srv = Server::start(&model, &["--max-new-tokens-cap", "32", "--max-body-bytes", "4096"], "warn");
    let long = "a".repeat(300); // over the fixture's 64-token context
    let cases: Vec<(&str, String, u16, &str, Value)> = vec![
        ("/generate", "{\"prompt\": ".into(), 400, "the body is not valid JSON", Value::Null),
        ("/generate", "[1, 2]".into(), 400, "the body must be a JSON object (found an array)", Value::Null),
        (
            "/generate",
            json!({"prompt": 5}).to_string(),
            400,
            "`prompt` must be a string (found a number)",
            json!("prompt"),
        ),
        ("/generate", json!({"max_new_tokens": 4}).to_string(), 400, "missing field `prompt`", json!("prompt")),
        (
            "/generate",
            json!({"prompt": "a", "max_new_tokens": 33}).to_string(),
            400,
            "over this server's cap of 32",
            json!("max_new_tokens"),
        ),
        (
            "/generate",
            json!({"prompt": "a", "max_new_tokens": -1}).to_string(),
            400,
            "`max_new_tokens` must be ≥ 0",
            json!("max_new_tokens"),
        ),
        (
            "/generate",
            json!({"prompt": "a", "max_new_tokens": 2.5}).to_string(),
            400,
            "`max_new_tokens` must be an integer",
            json!("max_new_tokens"),
        ),
        (
            "/generate",
            json!({"prompt": "a", "temprature": 1}).to_string(),
            400,
            "unknown field `temprature`",
            json!("temprature"),
        ),
        (
            "/generate",
            json!({"prompt": "a", "temperature": "hot"}).to_string(),
            400,
            "`temperature` must be a number (found a string)",
            json!("temperature"),
        ),
        (
            "/generate",
            json!({"prompt": "a", "temperature": -1}).to_string(),
            400,
            "`temperature` must be ≥ 0",
            json!("temperature"),
        ),
        ("/generate", json!({"prompt": "a", "top_p": 0}).to_string(), 400, "`top_p` must be in (0, 1]", json!("top_p")),
        (
            "/generate",
            json!({"prompt": "a", "stop": [1]}).to_string(),
            400,
            "`stop[0]` must be a string",
            json!("stop"),
        ),
        (
            "/generate",
            json!({"prompt": "a", "stream": "yes"}).to_string(),
            400,
            "`stream` must be a boolean",
            json!("stream"),
        ),
        ("/generate", json!({"prompt": long}).to_string(), 400, "the model's context is 64 tokens", json!("prompt")),
        (
            "/generate",
            json!({"prompt": long, "stream": true}).to_string(),
            400,
            "the model's context is 64 tokens",
            json!("prompt"),
        ),
        (
            "/generate",
            json!({"prompt": "a".repeat(5000)}).to_string(),
            413,
            "over this server's limit of 4096 bytes",
            Value::Null,
        ),
        ("/v1/completions", json!({"prompt": "a", "n": 2}).to_string(), 400, "only n = 1", json!("n")),
        (
            "/v1/completions",
            json!({"prompt": "a", "max_tokens": 100}).to_string(),
            400,
            "`max_tokens` is 100, over this server's cap of 32",
            json!("max_tokens"),
        ),
        ("/v1/completions", json!({"prompt": ["a", "b"]}).to_string(), 400, "holds 2 prompts", json!("prompt")),
        (
            "/v1/completions",
            json!({"prompt": "a", "logprobs": 5}).to_string(),
            400,
            "`logprobs` is not supported",
            json!("logprobs"),
        ),
        ("/v1/chat/completions", json!({"messages": []}).to_string(), 400, "`messages` is empty", json!("messages")),
        (
            "/v1/chat/completions",
            json!({"messages": "hi"}).to_string(),
            400,
            "`messages` must be a list",
            json!("messages"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"content": "x"}]}).to_string(),
            400,
            "missing field `messages[0].role`",
            json!("messages"),
        ),
        // An unknown field is ignored (with a warning), so what is missing is `messages`.
        ("/v1/chat/completions", json!({"prompt": "x"}).to_string(), 400, "missing field `messages`", json!("messages")),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}})
                .to_string(),
            400,
            "{\"type\": \"json_object\"} is not supported by this server",
            json!("response_format"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}}).to_string(),
            400,
            "`response_format.type` must be \"text\"",
            json!("response_format"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}]}).to_string(),
            400,
            "`tools` is not supported by this server",
            json!("tools"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"}).to_string(),
            400,
            "`tool_choice` is not supported",
            json!("tool_choice"),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "tool", "content": "4", "tool_call_id": "c1"}]}).to_string(),
            400,
            "`messages[0].tool_call_id` is not supported by this server",
            json!("messages"),
        ),
        ("/v1/completions", json!({"prompt": "a", "model": "gpt-4o"}).to_string(), 404, "The model `gpt-4o` does not exist", json!("model")),
        (
            "/generate",
            json!({"prompt": "a", "max_length": 8, "max_new_tokens": 4}).to_string(),
            400,
            "not both",
            json!("max_length"),
        ),
        ("/generate", json!({"prompt": "a", "max_length": 0}).to_string(), 400, "`max_length` must be at least 1", json!("max_length")),
    ];
    for (path, body, status, message, param) in cases {
        let r = http(srv.port, "POST", path, body.as_bytes());
        let what = format!("{path} {}: {} {}", &body[..body.len().min(80)], r.status, r.body);
        assert_eq!(r.status, status, "{what}");
        assert_eq!(r.header("content-type"), Some("application/json"), "{what}");
        let e = &r.json()["error"];
        assert!(e["message"].as_str().unwrap().contains(message), "{what}");
        assert_eq!(e["param"], param, "{what}");
        assert!(e["type"].is_string(), "{what}");
    }
    // Fields the server does not know are ignored on the OpenAI endpoints, each named in a warning;
    // known fields at values that change nothing are taken silently.
    let body = json!({"prompt": "Hello", "max_tokens": 2, "temperature": 0, "frobnicate": 1, "metadata": {"a": "b"}, "n": 1, "user": "u", "logit_bias": {}, "stream_options": null});
    let r = srv.post("/v1/completions", &body);
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(srv.wait_log("`frobnicate`").contains("/v1/completions: ignoring the request field"));
    srv.wait_log("`metadata`");
    assert!(!srv.log().contains("`user`") && !srv.log().contains("`logit_bias`"), "{}", srv.log());
    let r = srv.post("/v1/chat/completions", &json!({"messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "temperature": 0, "response_format": {"type": "text"}, "tools": [], "tool_choice": "none", "store": false}));
    assert_eq!(r.status, 200, "{}", r.body);
    srv.wait_log("/v1/chat/completions: ignoring the request field `store`");
    let history = json!([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "refusal": null, "tool_calls": [], "mood": "calm"}, {"role": "user", "content": "z"}]);
    let r = srv.post("/v1/chat/completions", &json!({"messages": history, "max_tokens": 2, "temperature": 0}));
    assert_eq!(r.status, 200, "{}", r.body);
    srv.wait_log("ignoring the message field `messages[1].mood`");
    assert!(!srv.log().contains("`messages[1].refusal`") && !srv.log().contains("`messages[1].tool_calls`"));
    let r = srv.post("/v1/completions", &json!({"prompt": "a", "model": "gpt-4o"}));
    assert_eq!(
        (r.json()["error"]["code"].as_str(), r.json()["error"]["type"].as_str()),
        (Some("model_not_found"), Some("invalid_request_error"))
    );
    let r = srv.get("/nope");
    assert_eq!((r.status, r.json()["error"]["type"].as_str()), (404, Some("not_found_error")));
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("no route for GET /nope"));
    let r = srv.get("/generate");
    assert_eq!(r.status, 405);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("use POST"));
    // Still serving, and a default max_new_tokens is lowered to the cap, then to the context.
    assert_eq!(srv.get("/health").status, 200);
    let r = srv.post("/generate", &json!({"prompt": "Hello"}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.json()["tokens"].as_u64().unwrap() <= 32);
}

#[test]
fn serve_answers_50_concurrent_clients() {
    let d = tmp();
    let model = fixture_model("llama", &d.path().join("model"));
    let srv = Server::start(&model, &[], "warn");
    let g = generator(&model, d.path());
    // Prompts of different lengths, so that batches are left-padded.
    let prompts: Vec<String> = ["Hi", "Hello there", "Request number 3:", "a much longer prompt than the others", "x"]
        .map(String::from)
        .to_vec();
    let want: Vec<String> = prompts.iter().map(|p| engine(&g, p, &greedy(6)).text).collect();
    let port = srv.port;
    let clients: Vec<_> = (0..50)
        .map(|i| {
            let prompt = prompts[i % 5].clone();
            std::thread::spawn(move || match i % 3 {
                0 => {
                    let r = http(
                        port,
                        "POST",
                        "/generate",
                        json!({"prompt": prompt, "max_new_tokens": 6}).to_string().as_bytes(),
                    );
                    (r.status, r.json()["generated_text"].as_str().map(str::to_string))
                }
                1 => {
                    let body = json!({"prompt": prompt, "max_tokens": 6, "temperature": 0});
                    let r = http(port, "POST", "/v1/completions", body.to_string().as_bytes());
                    (r.status, r.json()["choices"][0]["text"].as_str().map(str::to_string))
                }
                _ => {
                    let r = http(
                        port,
                        "POST",
                        "/generate",
                        json!({"prompt": prompt, "max_new_tokens": 6, "stream": true}).to_string().as_bytes(),
                    );
                    let ev = r.events();
                    let text = ev
                        .iter()
                        .filter(|(n, _)| n == "message")
                        .map(|(_, d)| serde_json::from_str::<Value>(d).unwrap()["text"].as_str().unwrap().to_string());
                    (r.status, Some(text.collect::<String>()))
                }
            })
        })
        .collect();
    for (i, c) in clients.into_iter().enumerate() {
        let (status, text) = c.join().unwrap();
        assert_eq!(status, 200, "client {i}:\n{}", srv.log());
        assert_eq!(text.as_deref(), Some(want[i % 5].as_str()), "client {i}");
    }
}

#[test]
fn serve_cancels_gone_clients_refuses_when_full_and_survives_failures() {
    let d = tmp();
    let model = long_model(&d.path().join("model"));
    let srv =
        Server::start(&model, &["--queue", "1", "--max-batch", "1", "--max-new-tokens-cap", "4000"], "tuner=info");
    let long = json!({"prompt": "Hello", "max_new_tokens": 3000, "stream": true});
    // 3000 tokens take seconds: long enough to be cut short.
    let open_stream = || {
        let mut s = connect(srv.port);
        send(&mut s, "POST", "/generate", long.to_string().as_bytes());
        let mut seen = vec![];
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&seen).contains("data: ") {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "stream closed early: {}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
        s
    };

    // Request 0: a client that leaves mid-stream stops its generation.
    let s = open_stream();
    let _ = s.shutdown(Shutdown::Both);
    drop(s);
    let line = srv.wait_log("request 0:");
    assert!(line.contains("Stop"), "{line}");
    let r = srv.post("/generate", &json!({"prompt": "Hello", "max_new_tokens": 4})); // request 1
    assert_eq!((r.status, r.json()["tokens"].as_u64()), (200, Some(4)), "{}", r.body);

    // Request 2: the same for a client that leaves while waiting for a whole answer.
    let mut s = connect(srv.port);
    send(&mut s, "POST", "/generate", json!({"prompt": "Hello", "max_new_tokens": 3000}).to_string().as_bytes());
    std::thread::sleep(Duration::from_millis(300));
    drop(s);
    let line = srv.wait_log("request 2:");
    assert!(line.contains("Stop"), "{line}");

    // Queue of one: request 3 generates, request 4 waits, request 5 is refused with 503.
    let busy = open_stream();
    let port = srv.port;
    let waiting = std::thread::spawn(move || {
        http(port, "POST", "/generate", json!({"prompt": "Hi", "max_new_tokens": 4}).to_string().as_bytes())
    });
    let t = Instant::now();
    while srv.get("/health").json()["queued"] != 1 {
        assert!(t.elapsed() < WAIT, "request 4 never queued");
        std::thread::sleep(Duration::from_millis(10));
    }
    let r = srv.post("/generate", &json!({"prompt": "Hi", "max_new_tokens": 4}));
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("busy"));
    drop(busy);
    let r = waiting.join().unwrap();
    assert_eq!((r.status, r.json()["tokens"].as_u64()), (200, Some(4)), "{}", r.body);

    // A generation that fails is a 500 JSON error; the next request is served.
    let r = srv.post("/generate", &json!({"prompt": "Hello <|x320|>", "max_new_tokens": 4}));
    assert_eq!(r.status, 500, "{}", r.body);
    assert_eq!(r.json()["error"]["type"], "server_error");
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("outside the model's vocabulary"), "{}", r.body);
    let r = srv.post("/v1/completions", &json!({"prompt": "Hello", "max_tokens": 4, "temperature": 0}));
    assert_eq!(r.status, 200, "{}", r.body);
}

#[test]
fn serve_rejects_bad_flags() {
    let (code, _, err) = run(&["serve", "--model", "/nope", "--dtype", "fp8"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("invalid value 'fp8' for '--dtype <DTYPE>'"), "{err}");
    assert!(err.contains("[possible values: auto, bf16, fp16, fp32]"), "{err}");
    let (code, _, err) = run(&["serve", "--model", "/nope", "--queue", "0"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--queue must be at least 1"), "{err}");
    let (code, _, err) = run(&["serve", "--model", "/nope", "--served-model-name", " "]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--served-model-name must not be empty"), "{err}");
    let (code, _, err) = run(&["serve", "--model", "/nope", "--api-key", ""]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--api-key (or TUNER_API_KEY) must not be empty"), "{err}");
    let (code, _, err) = run(&["serve", "--model", "/nope", "--device", "cpu"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("/nope"), "{err}");
}

/// The engine's greedy/seeded result as the OpenAI endpoints report it.
fn expected(c: &Completion) -> Value {
    json!({"text": c.text, "tokens": c.tokens.len(), "finish_reason": openai_reason(c)})
}

#[test]
fn serve_works_with_the_openai_python_client_behind_a_served_name_and_an_api_key() {
    let d = tmp();
    let model = fixture_model("llama", &d.path().join("model"));
    // A longer context than the fixture's 64 tokens, for the follow-up conversation.
    let config = model.join("config.json");
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    v["max_position_embeddings"] = json!(512);
    std::fs::write(&config, v.to_string()).unwrap();
    let key = "sk-tuner-test-0123";
    let args = ["--served-model-name", "tiny-llama"];
    let srv = Server::start_env(&model, &args, "warn", &[("TUNER_API_KEY", key)]);
    let g = generator(&model, d.path());

    // The key (read from TUNER_API_KEY) guards every route but /health, with OpenAI's 401 bodies.
    let h = srv.get("/health");
    assert_eq!((h.status, h.json()["model"].as_str()), (200, Some("tiny-llama")), "{}", h.body);
    for (path, auth, code) in [
        ("/v1/models", "", Value::Null),
        ("/v1/models", "Authorization: Bearer sk-wrong\r\n", json!("invalid_api_key")),
        ("/v1/models", &format!("Authorization: Basic {key}\r\n"), Value::Null),
        ("/generate", "", Value::Null),
        ("/nope", "", Value::Null),
    ] {
        let method = if path == "/generate" { "POST" } else { "GET" };
        let r = http_with(srv.port, method, path, br#"{"prompt": "Hi"}"#, auth);
        assert_eq!((r.status, r.header("www-authenticate")), (401, Some("bearer")), "{path} {auth:?}: {}", r.body);
        let e = &r.json()["error"];
        assert_eq!((&e["type"], &e["code"]), (&json!("invalid_request_error"), &code), "{path} {auth:?}");
        assert!(!r.body.contains(key), "the key is echoed: {}", r.body);
    }
    let r = http_with(srv.port, "GET", "/v1/models", b"", &format!("Authorization: bearer {key}\r\n"));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["data"][0]["id"], "tiny-llama");
    let r = http_with(srv.port, "GET", "/v1/models/tiny-llama", b"", &format!("Authorization: Bearer {key}\r\n"));
    assert_eq!((r.status, r.json()["id"].as_str()), (200, Some("tiny-llama")), "{}", r.body);

    // What the engine gives for the script's requests.
    let prompt = "Hello world";
    let messages = vec![
        Message { role: "system".into(), content: "Be brief.".into() },
        Message { role: "user".into(), content: "Hi there".into() },
    ];
    let completion = engine(&g, prompt, &greedy(8));
    let chat_prompt = g.chat_prompt(&messages).unwrap();
    let chat = engine(&g, &chat_prompt, &greedy(8));
    let chat3 = engine(&g, &chat_prompt, &greedy(3));
    let sampled = engine(&g, prompt, &SamplingParams { temperature: 1.0, seed: 7, ..greedy(8) });
    let stop: String = completion.text.chars().skip(2).take(2).collect();
    assert_eq!(stop.chars().count(), 2, "the greedy text {:?} is too short for a stop string", completion.text);
    let stopped = engine(&g, prompt, &SamplingParams { stop: vec![stop.clone()], ..greedy(8) });
    assert!(stopped.text.len() < completion.text.len(), "{stopped:?}");
    let mut follow = messages.clone();
    follow.push(Message { role: "assistant".into(), content: chat.text.clone() });
    follow.push(Message { role: "user".into(), content: "More".into() });
    let after = engine(&g, &g.chat_prompt(&follow).unwrap(), &greedy(8));
    let expect = json!({
        "follow_up": "More", "after_follow_up": expected(&after),
        "prompt": prompt, "prompt_tokens": g.encode_prompt(prompt).unwrap().len(),
        "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}],
        "completion": expected(&completion), "chat": expected(&chat), "chat3": expected(&chat3),
        "sampled": sampled.text, "stop": stop, "stopped": stopped.text,
    });
    let file = d.path().join("expect.json");
    std::fs::write(&file, expect.to_string()).unwrap();

    let o = std::process::Command::new(python())
        .arg(repo().join("scripts/openai_client_check.py"))
        .args(["--base-url", &format!("http://127.0.0.1:{}/v1", srv.port), "--api-key", key, "--model", "tiny-llama"])
        .arg("--expect")
        .arg(&file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "openai_client_check.py failed:\n{stdout}\n{stderr}\nserver log:\n{}", srv.log());
    let report: Value = serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap();
    let checks = [
        "models.list",
        "models.retrieve",
        "completions",
        "completions.usage",
        "completions.model",
        "completions.stream",
        "completions.stream.usage",
        "chat",
        "chat.usage",
        "chat.max_completion_tokens",
        "chat.follow_up",
        "chat.stream.role",
        "chat.stream",
        "chat.stream.finish",
        "stop",
        "seed",
        "unknown field ignored",
        "json_object refused",
        "n > 1 refused",
        "model_not_found",
        "models.retrieve not found",
        "wrong api key",
    ];
    assert_eq!(report["checks"], json!(checks));
    srv.wait_log("/v1/chat/completions: ignoring the request field `tuner_test_unknown`");
}

#[test]
fn serve_takes_max_length_as_transformers_generate_counts_it() {
    let d = tmp();
    // A model without EOS, so every generation runs to its length.
    let model = long_model(&d.path().join("model"));
    let srv = Server::start(&model, &["--max-new-tokens-cap", "20"], "warn");
    let g = generator(&model, d.path());
    let prompt = "Hello world";
    let n = g.encode_prompt(prompt).unwrap().len();
    assert!(n >= 2, "{n}");
    // max_length counts the prompt (BOS included) and the new tokens.
    let want = engine(&g, prompt, &greedy(5));
    let r = srv.post("/generate", &json!({"prompt": prompt, "max_length": n + 5}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json(), json!({"generated_text": want.text, "finish_reason": "length", "tokens": 5}));
    let r = srv.post("/generate", &json!({"prompt": prompt, "max_length": n + 1}));
    assert_eq!(r.json()["tokens"], 1, "{}", r.body);
    for (max_length, message) in [
        (n, format!("`max_length` is {n}, but the prompt alone is {n} tokens")),
        (1, format!("`max_length` is 1, but the prompt alone is {n} tokens")),
        (n + 21, format!("leaves 21 new tokens after the {n}-token prompt, over this server's cap of 20")),
    ] {
        let r = srv.post("/generate", &json!({"prompt": prompt, "max_length": max_length}));
        assert_eq!(r.status, 400, "{}", r.body);
        assert_eq!(r.json()["error"]["param"], "max_length");
        assert!(r.json()["error"]["message"].as_str().unwrap().contains(&message), "{}", r.body);
    }
    // Streaming reads it the same way.
    let ev = srv.post("/generate", &json!({"prompt": prompt, "max_length": n + 20, "stream": true})).events();
    let done: Value = serde_json::from_str(&ev.last().unwrap().1).unwrap();
    assert_eq!(done["tokens"], 20);
}
