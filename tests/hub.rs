//! Hub client tests, against a small threaded HTTP/1.1 server on 127.0.0.1 that
//! serves in-memory model and dataset repos in the hub's URL layout: the revision API,
//! `resolve` URLs (LFS files by a 302 to a CDN on another host name, with `X-Linked-Etag` sha256),
//! range requests, a gated repo, hub-style 404s, and fault injection (a response cut
//! short, a server that ignores `Range`, corrupted bytes); it answers HEAD too, so that the
//! real `huggingface_hub` (scripts/hub_cache_interop.py) downloads from it. Downloads land in
//! the Hugging Face hub cache layout (blobs/refs/snapshots), checked on disk and both ways
//! against huggingface_hub. The committed Gemma 3n recipe runs against it, with stand-ins
//! under its own repo names.

use crate::common::{python, repo, tmp, tuner};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;
use tch::Tensor;
use tuner::hub::{
    is_model_file, select_converted_split_files, select_split_files, HubClient, HubConfig, HubError, RepoKind,
};

// ---------------------------------------------------------------------------------------
// The fake hub.

#[derive(Clone)]
struct FakeFile {
    name: String,
    data: Vec<u8>,
    /// Served like an LFS file: the hub answers 302 to `/cdn/{sha256}` with X-Linked-Etag.
    lfs: bool,
}

struct FakeRepo {
    /// "models" or "datasets".
    kind: &'static str,
    id: String,
    /// Named revisions (branches, `refs/convert/parquet`) → commit.
    refs: Vec<(String, String)>,
    commits: HashMap<String, Vec<FakeFile>>,
    /// A gated repo: files need `Authorization: Bearer {token}`.
    token: Option<String>,
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    range: Option<String>,
    auth: Option<String>,
}

#[derive(Default)]
struct Faults {
    /// `{repo}/{file}` → body bytes sent before the connection is dropped (once).
    cut: HashMap<String, usize>,
    /// Answer every range request with the whole file (200).
    ignore_range: bool,
    /// `{repo}/{file}` whose bytes are served with one byte flipped.
    corrupt: HashSet<String>,
}

struct State {
    addr: SocketAddr,
    repos: Vec<FakeRepo>,
    seen: Mutex<Vec<Seen>>,
    faults: Mutex<Faults>,
}

struct Server {
    state: Arc<State>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
    workers: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

impl Server {
    fn start(repos: Vec<FakeRepo>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let state = Arc::new(State { addr, repos, seen: Mutex::new(vec![]), faults: Mutex::new(Faults::default()) });
        let stop = Arc::new(AtomicBool::new(false));
        let workers: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let accept = {
            let (state, stop, workers) = (state.clone(), stop.clone(), workers.clone());
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = conn else { continue };
                    let state = state.clone();
                    let handle = std::thread::spawn(move || serve(&state, stream));
                    workers.lock().unwrap().push(handle);
                }
            })
        };
        Server { state, stop, accept: Some(accept), workers }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.state.addr)
    }

    fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    fn requests(&self) -> usize {
        self.state.seen.lock().unwrap().len()
    }

    fn faults(&self) -> std::sync::MutexGuard<'_, Faults> {
        self.state.faults.lock().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.state.addr, Duration::from_secs(1));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
        for h in self.workers.lock().unwrap().drain(..) {
            let _ = h.join();
        }
    }
}

struct Reply {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    /// Send only this many body bytes, then drop the connection.
    cut: Option<usize>,
}

impl Reply {
    fn new(status: u16, body: Vec<u8>) -> Reply {
        Reply { status, headers: vec![], body, cut: None }
    }
    fn error(status: u16, code: &str, message: &str) -> Reply {
        let mut r = Reply::new(status, message.as_bytes().to_vec());
        r.headers.push(("X-Error-Code".into(), code.into()));
        r.headers.push(("X-Error-Message".into(), message.into()));
        r
    }
    fn header(mut self, k: &str, v: impl Into<String>) -> Reply {
        self.headers.push((k.into(), v.into()));
        self
    }
}

fn serve(state: &State, stream: TcpStream) {
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok();
    stream.set_write_timeout(Some(Duration::from_secs(2))).ok();
    let Ok(read_half) = stream.try_clone() else { return };
    let mut reader = BufReader::new(read_half);
    let mut request_line = String::new();
    if reader.read_line(&mut request_line).unwrap_or(0) == 0 {
        return; // the shutdown wake-up, or a client that went away
    }
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
    }
    let mut parts = request_line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or("").to_string());
    state.seen.lock().unwrap().push(Seen {
        method: method.to_string(),
        path: path.clone(),
        range: headers.get("range").cloned(),
        auth: headers.get("authorization").cloned(),
    });
    let reply = match method {
        "GET" | "HEAD" => route(state, &path, &headers),
        _ => Reply::new(405, vec![]),
    };
    write_reply(stream, reply, method == "HEAD");
}

/// Send `r`; a HEAD answer announces the body's length but sends none.
fn write_reply(mut stream: TcpStream, r: Reply, head_only: bool) {
    let reason = match r.status {
        200 => "OK",
        206 => "Partial Content",
        302 => "Found",
        401 => "Unauthorized",
        404 => "Not Found",
        416 => "Range Not Satisfiable",
        _ => "Other",
    };
    let mut head =
        format!("HTTP/1.1 {} {reason}\r\nContent-Length: {}\r\nConnection: close\r\n", r.status, r.body.len());
    for (k, v) in &r.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    let body = if head_only { &[][..] } else { &r.body[..r.cut.unwrap_or(r.body.len()).min(r.body.len())] };
    let _ = stream.write_all(head.as_bytes()).and_then(|_| stream.write_all(body)).and_then(|_| stream.flush());
    let _ = stream.shutdown(Shutdown::Both);
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
        if let (b'%', Some(Ok(v))) = (b[i], hex.map(|h| u8::from_str_radix(h, 16))) {
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn route(state: &State, path: &str, headers: &HashMap<String, String>) -> Reply {
    let path = path.split('?').next().unwrap_or("");
    if let Some(rest) = path.strip_prefix("/api/") {
        // /api/{models|datasets}/{org}/{name}/revision/{rev}
        let p: Vec<&str> = rest.splitn(5, '/').collect();
        if p.len() != 5 || p[3] != "revision" {
            return Reply::new(404, b"no such API".to_vec());
        }
        let id = format!("{}/{}", p[1], p[2]);
        let Some(repo) = state.repos.iter().find(|r| r.kind == p[0] && r.id == id) else {
            return Reply::error(404, "RepoNotFound", "Repository not found");
        };
        let Some(commit) = resolve_rev(repo, &percent_decode(p[4])) else {
            return Reply::error(404, "RevisionNotFound", "Invalid rev id");
        };
        let siblings: Vec<_> =
            repo.commits[&commit].iter().map(|f| serde_json::json!({ "rfilename": f.name })).collect();
        let json = serde_json::json!({ "id": repo.id, "sha": commit, "private": false, "siblings": siblings });
        return Reply::new(200, json.to_string().into_bytes()).header("Content-Type", "application/json");
    }
    if let Some(sha) = path.strip_prefix("/cdn/") {
        // The "CDN": content by sha256, no auth.
        for repo in &state.repos {
            for files in repo.commits.values() {
                if let Some(f) = files.iter().find(|f| f.lfs && sha256_hex(&f.data) == sha) {
                    let key = format!("{}/{}", repo.id, f.name);
                    return serve_bytes(state, &key, &f.data, headers).header("ETag", format!("\"{sha}\""));
                }
            }
        }
        return Reply::new(404, vec![]);
    }
    // /{org}/{name}/resolve/{rev}/{file} or /datasets/{org}/{name}/resolve/{rev}/{file}
    let (kind, rest) = match path.strip_prefix("/datasets/") {
        Some(r) => ("datasets", r),
        None => ("models", path.trim_start_matches('/')),
    };
    let p: Vec<&str> = rest.splitn(5, '/').collect();
    if p.len() != 5 || p[2] != "resolve" {
        return Reply::new(404, vec![]);
    }
    let id = format!("{}/{}", p[0], p[1]);
    let Some(repo) = state.repos.iter().find(|r| r.kind == kind && r.id == id) else {
        return Reply::error(404, "RepoNotFound", "Repository not found");
    };
    if let Some(token) = &repo.token {
        if headers.get("authorization") != Some(&format!("Bearer {token}")) {
            return Reply::error(401, "GatedRepo", &format!("Access to model {id} is restricted."));
        }
    }
    let Some(commit) = resolve_rev(repo, &percent_decode(p[3])) else {
        return Reply::error(404, "RevisionNotFound", "Invalid rev id");
    };
    let name = percent_decode(p[4]);
    let Some(f) = repo.commits[&commit].iter().find(|f| f.name == name) else {
        return Reply::error(404, "EntryNotFound", "Entry not found");
    };
    if f.lfs {
        let sha = sha256_hex(&f.data);
        return Reply::new(302, vec![])
            // Another host name for the same server: the CDN is not the hub, so no token goes
            // there, and huggingface_hub's HEAD stops at this redirect as it does at the hub's.
            .header("Location", format!("http://localhost:{}/cdn/{sha}", state.addr.port()))
            .header("X-Linked-Etag", format!("\"{sha}\""))
            .header("X-Linked-Size", f.data.len().to_string())
            .header("ETag", format!("\"{sha}\""))
            .header("X-Repo-Commit", commit);
    }
    // Small files: the hub's ETag is the git blob id (40 hex), not a sha256.
    let key = format!("{id}/{}", f.name);
    serve_bytes(state, &key, &f.data, headers)
        .header("ETag", format!("\"{}\"", etag_of(f)))
        .header("X-Repo-Commit", commit)
}

fn resolve_rev(repo: &FakeRepo, rev: &str) -> Option<String> {
    if repo.commits.contains_key(rev) {
        return Some(rev.to_string());
    }
    repo.refs.iter().find(|(name, _)| name == rev).map(|(_, c)| c.clone())
}

/// The file's bytes, honouring `Range: bytes=N-` and the injected faults.
fn serve_bytes(state: &State, key: &str, data: &[u8], headers: &HashMap<String, String>) -> Reply {
    let mut faults = state.faults.lock().unwrap();
    let mut data = data.to_vec();
    if faults.corrupt.contains(key) {
        data[0] ^= 0xff;
    }
    let cut = faults.cut.remove(key);
    let start = match headers.get("range") {
        Some(r) if !faults.ignore_range => {
            r.strip_prefix("bytes=").and_then(|r| r.strip_suffix('-')).and_then(|n| n.parse::<usize>().ok())
        }
        _ => None,
    };
    let len = data.len();
    let mut reply = match start {
        Some(s) if s >= len => return Reply::new(416, vec![]).header("Content-Range", format!("bytes */{len}")),
        Some(s) => Reply::new(206, data[s..].to_vec()).header("Content-Range", format!("bytes {s}-{}/{len}", len - 1)),
        None => Reply::new(200, data),
    };
    reply.cut = cut;
    reply.header("Accept-Ranges", "bytes")
}

// ---------------------------------------------------------------------------------------
// Repo contents.

/// A fake 40-hex commit id.
fn commit_id(seed: &str) -> String {
    sha256_hex(seed.as_bytes())[..40].to_string()
}

/// Deterministic pseudo-random bytes.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..len)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 33) as u8
        })
        .collect()
}

/// The ETag the fake hub gives a file, which names its blob in the cache: the sha256 for
/// LFS files, a 40-hex stand-in for the git blob sha1 for the others.
fn etag_of(f: &FakeFile) -> String {
    let sha = sha256_hex(&f.data);
    if f.lfs {
        sha
    } else {
        sha[..40].to_string()
    }
}

fn small(name: &str, text: &str) -> FakeFile {
    FakeFile { name: name.into(), data: text.as_bytes().to_vec(), lfs: false }
}

fn lfs(name: &str, data: Vec<u8>) -> FakeFile {
    FakeFile { name: name.into(), data, lfs: true }
}

const MODEL: &str = "tiny-org/tiny-model";
const GATED: &str = "tiny-org/gated";
const SHARDED: &str = "tiny-org/sharded";
const TOKEN: &str = "hf_gated_token";
const WEIGHTS_LEN: usize = 200_000;

fn main_commit() -> String {
    commit_id("tiny-model main")
}
fn old_commit() -> String {
    commit_id("tiny-model v0")
}
/// A commit of the tiny model that changes only README.md: its other blobs are main's.
fn v2_commit() -> String {
    commit_id("tiny-model v2")
}
fn conversion_commit() -> String {
    commit_id("ds-csv parquet")
}

fn model_files() -> Vec<FakeFile> {
    vec![
        small(".gitattributes", "*.safetensors filter=lfs\n"),
        small("README.md", "# tiny model\n"),
        small("config.json", r#"{"model_type":"llama","hidden_size":8,"num_hidden_layers":1}"#),
        small("generation_config.json", r#"{"eos_token_id":2}"#),
        small("special_tokens_map.json", r#"{"eos_token":"</s>"}"#),
        small("tokenizer.json", r#"{"version":"1.0","model":{"type":"BPE"}}"#),
        small("tokenizer_config.json", r#"{"model_max_length":64}"#),
        small("tokenizer.model", "\n\u{7}\n\u{5}<unk>"),
        lfs("model.safetensors", noise(WEIGHTS_LEN, 1)),
        lfs("pytorch_model.bin", noise(3000, 2)),
        lfs("model.gguf", noise(1000, 3)),
        small("onnx/model.onnx", "onnx"),
    ]
}

fn model_repos() -> Vec<FakeRepo> {
    let v2: Vec<FakeFile> = model_files()
        .into_iter()
        .map(|f| if f.name == "README.md" { small("README.md", "# tiny model, v2\n") } else { f })
        .collect();
    let mut old = vec![small("config.json", r#"{"model_type":"llama","hidden_size":4}"#)];
    old.push(lfs("model.safetensors", noise(5000, 9)));
    let shards_index = serde_json::json!({
        "metadata": {"total_size": 3000},
        "weight_map": {
            "a.weight": "model-00001-of-00002.safetensors",
            "b.weight": "model-00002-of-00002.safetensors",
            "c.weight": "model-00001-of-00002.safetensors",
        }
    });
    vec![
        FakeRepo {
            kind: "models",
            id: MODEL.into(),
            refs: vec![("main".into(), main_commit()), ("v0".into(), old_commit()), ("v2".into(), v2_commit())],
            commits: HashMap::from([(main_commit(), model_files()), (old_commit(), old), (v2_commit(), v2)]),
            token: None,
        },
        FakeRepo {
            kind: "models",
            id: SHARDED.into(),
            refs: vec![("main".into(), commit_id("sharded"))],
            commits: HashMap::from([(
                commit_id("sharded"),
                vec![
                    small("config.json", r#"{"model_type":"llama"}"#),
                    small("model.safetensors.index.json", &shards_index.to_string()),
                    lfs("model-00001-of-00002.safetensors", noise(1500, 4)),
                    lfs("model-00002-of-00002.safetensors", noise(1500, 5)),
                    lfs("consolidated.safetensors", noise(3000, 6)),
                    small("tokenizer.json", "{}"),
                ],
            )]),
            token: None,
        },
        FakeRepo {
            kind: "models",
            id: GATED.into(),
            refs: vec![("main".into(), commit_id("gated"))],
            commits: HashMap::from([(
                commit_id("gated"),
                vec![small("config.json", r#"{"model_type":"llama"}"#), lfs("model.safetensors", noise(4000, 7))],
            )]),
            token: Some(TOKEN.into()),
        },
    ]
}

fn dataset_repo(id: &str, files: Vec<FakeFile>) -> FakeRepo {
    let c = commit_id(id);
    FakeRepo {
        kind: "datasets",
        id: id.into(),
        refs: vec![("main".into(), c.clone())],
        commits: HashMap::from([(c, files)]),
        token: None,
    }
}

fn dataset_repos() -> Vec<FakeRepo> {
    let pq = |name: &str, seed: u64| lfs(name, noise(700, seed));
    let mut csv =
        // A loading script and raw text: nothing `datasets` reads without running code, so the
        // parquet conversion branch is the way in.
        dataset_repo("tiny-org/ds-csv", vec![small("README.md", "csv data"), small("ds-csv.py", "# loader\n"), small("raw/data.txt", "a,b\n1,2\n")]);
    csv.refs.push(("refs/convert/parquet".into(), conversion_commit()));
    csv.commits.insert(
        conversion_commit(),
        vec![
            pq("default/test/0000.parquet", 30),
            pq("default/train/0000.parquet", 31),
            pq("default/train/0001.parquet", 32),
        ],
    );
    vec![
        dataset_repo(
            "tiny-org/ds-data",
            vec![
                small("README.md", "---\nconfigs: []\n---\n"),
                pq("data/train-00001-of-00002.parquet", 11),
                pq("data/train-00000-of-00002.parquet", 10),
                pq("data/test-00000-of-00001.parquet", 12),
            ],
        ),
        dataset_repo(
            "tiny-org/ds-config",
            vec![
                pq("fr/train/0000.parquet", 20),
                pq("en/train/0001.parquet", 21),
                pq("en/train/0000.parquet", 22),
                pq("en/validation/0000.parquet", 23),
            ],
        ),
        dataset_repo(
            "tiny-org/ds-json",
            vec![
                small("README.md", "json"),
                small("train.jsonl", "{\"text\":\"a\"}\n"),
                small("test.jsonl", "{\"text\":\"b\"}\n"),
            ],
        ),
        csv,
    ]
}

fn all_repos() -> Vec<FakeRepo> {
    let mut v = model_repos();
    v.extend(dataset_repos());
    v
}

fn fake_file(repo: &str, commit: &str, name: &str) -> FakeFile {
    let repos = all_repos();
    let r = repos.iter().find(|r| r.id == repo).expect("repo");
    r.commits[commit].iter().find(|f| f.name == name).expect("file").clone()
}

fn file_data(repo: &str, commit: &str, name: &str) -> Vec<u8> {
    fake_file(repo, commit, name).data
}

/// `{cache}/{models|datasets}--{org}--{name}`, huggingface_hub's `repo_folder_name`.
fn repo_folder(cache: &Path, kind: &str, repo: &str) -> PathBuf {
    cache.join(format!("{kind}--{}", repo.replace('/', "--")))
}

/// `{repo folder}/snapshots/{commit}`.
fn snapshot_dir(cache: &Path, kind: &str, repo: &str, commit: &str) -> PathBuf {
    repo_folder(cache, kind, repo).join("snapshots").join(commit)
}

// ---------------------------------------------------------------------------------------
// Helpers.

fn client(server: &Server, cache: &Path, token: Option<&str>, offline: bool) -> HubClient {
    let mut config = HubConfig::new(cache);
    config.endpoint = server.endpoint();
    config.token = token.map(str::to_string);
    config.offline = offline;
    config.progress = false;
    HubClient::new(config)
}

/// Repository paths of `files` below `dir`.
fn rel_names(dir: &Path, files: &[PathBuf]) -> Vec<String> {
    files
        .iter()
        .map(|f| f.strip_prefix(dir).expect("file under the snapshot dir").to_string_lossy().replace('\\', "/"))
        .collect()
}

/// Every file under `dir`, relative, sorted.
fn walk(dir: &Path) -> Vec<String> {
    fn go(d: &Path, base: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                go(&p, base, out);
            } else {
                out.push(p.strip_prefix(base).unwrap().to_string_lossy().into_owned());
            }
        }
    }
    let mut out = vec![];
    go(dir, dir, &mut out);
    out.sort();
    out
}

fn err_text(e: &anyhow::Error) -> String {
    format!("{e:#}")
}

/// Run scripts/hub_cache_interop.py (the real huggingface_hub) on the hub cache `cache`:
/// `write` downloads `files` from `endpoint`; `read` (no endpoint: HF_HUB_OFFLINE=1) loads
/// them from the cache and returns the script's JSON report.
fn interop(
    mode: &str,
    endpoint: Option<&str>,
    cache: &Path,
    kind: &str,
    id: &str,
    files: &[&str],
) -> serde_json::Value {
    let mut cmd = std::process::Command::new(python());
    cmd.arg(repo().join("scripts/hub_cache_interop.py"))
        .args([mode, kind, id, "main"])
        .args(files)
        .env("HF_HUB_CACHE", cache)
        .env("HF_HOME", cache.with_file_name("hf-home"))
        .env("HF_HUB_DISABLE_TELEMETRY", "1")
        .env("HF_HUB_DISABLE_XET", "1")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .env_remove("HF_TOKEN")
        .env_remove("HUGGINGFACE_HUB_CACHE");
    match endpoint {
        Some(e) => cmd.env("HF_ENDPOINT", e).env("HF_HUB_OFFLINE", "0"),
        None => cmd.env("HF_ENDPOINT", "http://127.0.0.1:9").env("HF_HUB_OFFLINE", "1"),
    };
    let out = cmd.output().expect("the venv python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "hub_cache_interop.py {mode} {id}:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    match mode {
        "read" => serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {stdout}")),
        _ => serde_json::Value::Null,
    }
}

/// The files `fetch_model` takes from MODEL.
const MODEL_FILES: [&str; 7] = [
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
];

// ---------------------------------------------------------------------------------------
// Tests.

#[test]
fn snapshot_main_resolves_and_downloads_only_allowed_files() {
    let server = Server::start(all_repos());
    let cache = tempfile::tempdir().unwrap();
    let hub = client(&server, cache.path(), None, false);

    let snap = hub.snapshot(RepoKind::Model, MODEL, "main", &is_model_file).unwrap();
    assert_eq!(snap.commit, main_commit());
    assert_eq!(snap.dir, snapshot_dir(cache.path(), "models", MODEL, &main_commit()));
    let expected = [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer.model",
        "tokenizer_config.json",
    ];
    assert_eq!(rel_names(&snap.dir, &snap.files), expected);
    for (name, path) in expected.iter().zip(&snap.files) {
        assert_eq!(std::fs::read(path).unwrap(), file_data(MODEL, &main_commit(), name), "{name}");
    }
    // Nothing else was downloaded, and nothing half-done is left.
    assert_eq!(walk(&snap.dir), expected);
    let ref_main = std::fs::read_to_string(repo_folder(cache.path(), "models", MODEL).join("refs/main")).unwrap();
    assert_eq!(ref_main, main_commit(), "the bare sha, no newline, as huggingface_hub writes and reads it");

    // The server saw exactly one API call, one resolve per allowed file, and the LFS
    // file went through the CDN redirect.
    let seen = server.seen();
    let api: Vec<_> = seen.iter().filter(|s| s.path.starts_with("/api/")).collect();
    assert_eq!(api.len(), 1);
    assert_eq!(api[0].path, "/api/models/tiny-org/tiny-model/revision/main");
    let mut resolved: Vec<String> = seen
        .iter()
        .filter_map(|s| s.path.strip_prefix(&format!("/tiny-org/tiny-model/resolve/{}/", main_commit())))
        .map(str::to_string)
        .collect();
    resolved.sort();
    assert_eq!(resolved, expected);
    assert_eq!(seen.iter().filter(|s| s.path.starts_with("/cdn/")).count(), 1);
    assert!(seen.iter().all(|s| s.auth.is_none()), "no token configured, none sent");

    // Again at `main`: the branch is re-resolved (one API call), nothing re-downloaded.
    let before = server.requests();
    let again = hub.snapshot(RepoKind::Model, MODEL, "main", &is_model_file).unwrap();
    assert_eq!(again, snap);
    assert_eq!(server.requests(), before + 1);
}

#[test]
fn pinned_commit_downloads_that_commit_and_then_needs_no_network() {
    let server = Server::start(all_repos());
    let cache = tempfile::tempdir().unwrap();
    let hub = client(&server, cache.path(), None, false);

    let old = old_commit();
    let snap = hub.snapshot(RepoKind::Model, MODEL, &old, &is_model_file).unwrap();
    assert_eq!(snap.commit, old);
    assert_eq!(rel_names(&snap.dir, &snap.files), ["config.json", "model.safetensors"]);
    assert_eq!(std::fs::read_to_string(&snap.files[0]).unwrap(), r#"{"model_type":"llama","hidden_size":4}"#);
    assert_eq!(std::fs::read(&snap.files[1]).unwrap(), noise(5000, 9));
    assert!(server.seen().iter().any(|s| s.path == format!("/api/models/tiny-org/tiny-model/revision/{old}")));

    let before = server.requests();
    assert!(before >= 3);
    assert_eq!(hub.snapshot(RepoKind::Model, MODEL, &old, &is_model_file).unwrap(), snap);
    assert_eq!(hub.resolve_revision(RepoKind::Model, MODEL, &old).unwrap(), old);
    let path = hub.download_file(RepoKind::Model, MODEL, &old, "config.json").unwrap();
    assert_eq!(path, snap.files[0]);
    assert_eq!(server.requests(), before, "a fully cached pinned commit must not touch the network");
}

#[test]
fn fetch_model_takes_the_shards_the_index_lists() {
    let server = Server::start(all_repos());
    let cache = tempfile::tempdir().unwrap();
    let hub = client(&server, cache.path(), None, false);

    let snap = hub.fetch_model(SHARDED, "main").unwrap();
    assert_eq!(
        rel_names(&snap.dir, &snap.files),
        [
            "config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            "model.safetensors.index.json",
            "tokenizer.json",
        ]
    );
    assert_eq!(std::fs::read(&snap.files[2]).unwrap(), noise(1500, 5));
    assert!(!snap.dir.join("consolidated.safetensors").exists());

    let snap = hub.fetch_model(MODEL, "main").unwrap();
    assert_eq!(walk(&snap.dir).len(), 7);
    assert!(!snap.dir.join("pytorch_model.bin").exists() && !snap.dir.join("model.gguf").exists());

    let filter = [
        "config.json",
        "model.safetensors",
        "a/model.safetensors",
        "pytorch_model.bin",
        "model.pt",
        "x.gguf",
        "model.onnx",
        "chat_template.jinja",
        "tokenizer.model",
        "a/tokenizer.model",
    ];
    let taken: Vec<&str> = filter.into_iter().filter(|n| is_model_file(n)).collect();
    assert_eq!(taken, ["config.json", "model.safetensors", "chat_template.jinja", "tokenizer.model"]);
}

#[test]
fn interrupted_download_resumes_with_a_range_request() {
    let server = Server::start(all_repos());
    let cache = tempfile::tempdir().unwrap();
    let hub = client(&server, cache.path(), None, false);
    let commit = main_commit();
    let cut = 77_777;
    server.faults().cut.insert(format!("{MODEL}/model.safetensors"), cut);

    let err = hub.download_file(RepoKind::Model, MODEL, &commit, "model.safetensors").unwrap_err();
    let dest = snapshot_dir(cache.path(), "models", MODEL, &commit).join("model.safetensors");
    let sha = sha256_hex(&noise(WEIGHTS_LEN, 1));
    let part = repo_folder(cache.path(), "models", MODEL).join("blobs").join(format!("{sha}.incomplete"));
    match err.downcast_ref::<HubError>() {
        Some(HubError::Interrupted { partial, .. }) => assert_eq!(partial, &part),
        _ => panic!("expected an interrupted download, got: {err:#}"),
    }
    assert!(err_text(&err).contains("model.safetensors") && err_text(&err).contains(MODEL), "{err:#}");
    assert!(!dest.exists(), "an incomplete file must not be placed");
    let have = std::fs::metadata(&part).unwrap().len();
    assert_eq!(have, cut as u64);

    let path = hub.download_file(RepoKind::Model, MODEL, &commit, "model.safetensors").unwrap();
    assert_eq!(path, dest);
    assert_eq!(std::fs::read(&dest).unwrap(), noise(WEIGHTS_LEN, 1));
    assert!(!part.exists());
    assert_eq!(std::fs::read_link(&dest).unwrap(), Path::new("../../blobs").join(&sha));
    let ranged: Vec<Seen> = server.seen().into_iter().filter(|s| s.path.starts_with("/cdn/")).collect();
    assert_eq!(ranged.len(), 2);
    assert_eq!(ranged[0].range, None);
    assert_eq!(ranged[1].range.as_deref(), Some(format!("bytes={have}-").as_str()));
}

#[test]
fn resume_starts_over_when_the_server_ignores_the_range() {
    let server = Server::start(all_repos());
    let cache = tempfile::tempdir().unwrap();
    let hub = client(&server, cache.path(), None, false);
    let commit = main_commit();
    server.faults().cut.insert(format!("{MODEL}/model.safetensors"), 50_000);
    assert!(hub.download_file(RepoKind::Model, MODEL, &commit, "model.safetensors").is_err());

    server.faults().ignore_range = true;
    let path = hub.download_file(RepoKind::Model, MODEL, &commit, "model.safetensors").unwrap();
    // Appending the 200 body to the partial file would give 250 000 bytes.
    assert_eq!(std::fs::read(&path).unwrap(), noise(WEIGHTS_LEN, 1));
    let last = server.seen().into_iter().rfind(|s| s.path.starts_with("/cdn/")).unwrap();
    assert_eq!(last.range.as_deref(), Some("bytes=50000-"));
}

#[test]
fn sha256_mismatch_is_an_error_and_caches_nothing() {
    let server = Server::start(all_repos());
    let cache = tempfile::tempdir().unwrap();
    let hub = client(&server, cache.path(), None, false);
    let commit = main_commit();
    server.faults().corrupt.insert(format!("{MODEL}/model.safetensors"));

    let err = hub.download_file(RepoKind::Model, MODEL, &commit, "model.safetensors").unwrap_err();
    let expected = sha256_hex(&noise(WEIGHTS_LEN, 1));
    match err.downcast_ref::<HubError>() {
        Some(HubError::Checksum { expected: e, actual, file, .. }) => {
            assert_eq!(e, &expected);
            assert_ne!(actual, &expected);
            assert_eq!(file, "model.safetensors");
        }
        _ => panic!("expected a checksum error, got: {err:#}"),
    }
    assert!(err_text(&err).contains("sha256 mismatch"), "{err:#}");
    let dir = snapshot_dir(cache.path(), "models", MODEL, &commit);
    assert_eq!(walk(&dir), Vec::<String>::new(), "no file may be linked");
    let blobs = repo_folder(cache.path(), "models", MODEL).join("blobs");
    assert_eq!(walk(&blobs), Vec::<String>::new(), "neither the blob nor a partial one may stay");

    // A snapshot fails the same way and places nothing either.
    assert!(hub.snapshot(RepoKind::Model, MODEL, "main", &|n| n == "model.safetensors").is_err());
    assert!(!dir.join("model.safetensors").exists());

    // Once the server is healthy the same call succeeds and verifies.
    server.faults().corrupt.clear();
    let path = hub.download_file(RepoKind::Model, MODEL, &commit, "model.safetensors").unwrap();
    assert_eq!(sha256_hex(&std::fs::read(path).unwrap()), expected);
}

#[test]
fn gated_repo_needs_hf_token() {
    let server = Server::start(all_repos());
    let cache = tempfile::tempdir().unwrap();

    let anonymous = client(&server, cache.path(), None, false);
    let err = anonymous.fetch_model(GATED, "main").unwrap_err();
    let text = err_text(&err);
    assert!(
        text.contains("401") && text.contains("HF_TOKEN") && text.contains(GATED) && text.contains("gated"),
        "{text}"
    );
    assert!(text.contains("config.json"), "names the file: {text}");

    let wrong = client(&server, cache.path(), Some("hf_wrong"), false);
    let text = err_text(&wrong.fetch_model(GATED, "main").unwrap_err());
    assert!(text.contains("401") && text.contains("rejected"), "{text}");

    let before = server.requests();
    let hub = client(&server, cache.path(), Some(TOKEN), false);
    let snap = hub.fetch_model(GATED, "main").unwrap();
    assert_eq!(rel_names(&snap.dir, &snap.files), ["config.json", "model.safetensors"]);
    assert_eq!(std::fs::read(&snap.files[1]).unwrap(), noise(4000, 7));
    let seen = server.seen();
    let resolves: Vec<&Seen> = seen[before..].iter().filter(|s| s.path.contains("/resolve/")).collect();
    assert_eq!(resolves.len(), 2);
    assert!(resolves.iter().all(|s| s.auth.as_deref() == Some("Bearer hf_gated_token")));
    let cdn: Vec<&Seen> = seen[before..].iter().filter(|s| s.path.starts_with("/cdn/")).collect();
    assert!(cdn.len() == 1 && cdn[0].auth.is_none(), "the token never leaves the hub: {cdn:?}");
}

#[test]
fn not_found_errors_name_what_is_missing() {
    let server = Server::start(all_repos());
    let cache = tempfile::tempdir().unwrap();
    let hub = client(&server, cache.path(), None, false);

    let text = err_text(&hub.resolve_revision(RepoKind::Model, "tiny-org/nope", "main").unwrap_err());
    assert!(text.contains("404") && text.contains("`tiny-org/nope`") && text.contains("not found"), "{text}");

    let text = err_text(&hub.resolve_revision(RepoKind::Model, MODEL, "no-such-branch").unwrap_err());
    assert!(text.contains("404") && text.contains("revision `no-such-branch`"), "{text}");

    let err = hub.download_file(RepoKind::Model, MODEL, &main_commit(), "nope.txt").unwrap_err();
    assert!(matches!(err.downcast_ref::<HubError>(), Some(HubError::Status { status: 404, .. })));
    let text = err_text(&err);
    assert!(text.contains("404") && text.contains("`nope.txt`") && text.contains(MODEL), "{text}");

    let text = err_text(&hub.snapshot(RepoKind::Dataset, MODEL, "main", &|_| true).unwrap_err());
    assert!(text.contains("dataset repository `tiny-org/tiny-model` not found"), "{text}");

    assert!(hub.resolve_revision(RepoKind::Model, "../etc", "main").is_err());
    assert!(hub.download_file(RepoKind::Model, MODEL, &main_commit(), "../x").is_err());
}

#[test]
fn offline_mode_uses_the_cache_and_says_what_is_missing() {
    let server = Server::start(all_repos());
    let cache = tempfile::tempdir().unwrap();
    let online = client(&server, cache.path(), None, false);
    let snap = online.snapshot(RepoKind::Model, MODEL, "main", &is_model_file).unwrap();

    let before = server.requests();
    let offline = client(&server, cache.path(), None, true);
    assert_eq!(offline.resolve_revision(RepoKind::Model, MODEL, "main").unwrap(), main_commit());
    assert_eq!(offline.snapshot(RepoKind::Model, MODEL, "main", &is_model_file).unwrap(), snap);
    assert_eq!(offline.fetch_model(MODEL, "main").unwrap().files, snap.files);

    // A repo never fetched: the exact message.
    let err = offline.fetch_model("tiny-org/other", "main").unwrap_err();
    let path = repo_folder(cache.path(), "models", "tiny-org/other");
    assert_eq!(
        err.to_string(),
        format!(
            "offline mode (HF_HUB_OFFLINE=1): `tiny-org/other` revision `main` is not in the cache at {}; \
             run once with network access or unset HF_HUB_OFFLINE",
            path.display()
        )
    );
    // A branch never resolved, and a file never downloaded.
    let text = err_text(&offline.resolve_revision(RepoKind::Model, MODEL, "v0").unwrap_err());
    assert!(text.starts_with("offline mode (HF_HUB_OFFLINE=1): `tiny-org/tiny-model` revision `v0`"), "{text}");
    let err = offline.snapshot(RepoKind::Model, MODEL, "main", &|_| true).unwrap_err();
    match err.downcast_ref::<HubError>() {
        Some(HubError::FileNotCached { file, .. }) => assert_eq!(file, ".gitattributes"),
        _ => panic!("expected a missing-file error, got: {err:#}"),
    }
    assert_eq!(server.requests(), before, "offline mode must not touch the network");
}

#[test]
fn unreachable_hub_names_the_endpoint_and_suggests_offline_mode() {
    let server = Server::start(all_repos());
    let endpoint = server.endpoint();
    let cache = tempfile::tempdir().unwrap();
    client(&server, cache.path(), None, false).fetch_model(MODEL, "main").unwrap();
    drop(server); // nothing listens there any more: connection refused

    let mut config = HubConfig::new(cache.path());
    config.endpoint = endpoint.clone();
    config.progress = false;
    let hub = HubClient::new(config);
    let err = hub.fetch_model(MODEL, "main").unwrap_err();
    assert!(matches!(err.downcast_ref::<HubError>(), Some(HubError::Unreachable { .. })), "{err:#}");
    let text = err_text(&err);
    assert!(text.contains(&endpoint) && text.contains("HF_HUB_OFFLINE=1"), "{text}");

    let text = err_text(&hub.fetch_model("tiny-org/other", "main").unwrap_err());
    assert!(text.contains(&endpoint) && !text.contains("HF_HUB_OFFLINE=1"), "{text}");
}

#[test]
fn dataset_splits_follow_the_common_layouts() {
    let server = Server::start(all_repos());
    let cache = tempfile::tempdir().unwrap();
    let hub = client(&server, cache.path(), None, false);
    let dir = |repo: &str, commit: &str| snapshot_dir(cache.path(), "datasets", repo, commit);

    // data/{split}-*.parquet, sorted by name whatever the listing order.
    let ds = "tiny-org/ds-data";
    let c = commit_id(ds);
    let train = hub.fetch_dataset_split(ds, "main", None, "train").unwrap();
    assert_eq!(
        rel_names(&dir(ds, &c), &train),
        ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"]
    );
    assert_eq!(std::fs::read(&train[1]).unwrap(), noise(700, 11));
    let test = hub.fetch_dataset_split(ds, "main", None, "test").unwrap();
    assert_eq!(rel_names(&dir(ds, &c), &test), ["data/test-00000-of-00001.parquet"]);

    // {config}/{split}/*.parquet
    let ds = "tiny-org/ds-config";
    let files = hub.fetch_dataset_split(ds, "main", Some("en"), "train").unwrap();
    assert_eq!(rel_names(&dir(ds, &commit_id(ds)), &files), ["en/train/0000.parquet", "en/train/0001.parquet"]);
    assert_eq!(std::fs::read(&files[0]).unwrap(), noise(700, 22));

    // Top-level JSON lines named after the split.
    let ds = "tiny-org/ds-json";
    let files = hub.fetch_dataset_split(ds, "main", None, "train").unwrap();
    assert_eq!(rel_names(&dir(ds, &commit_id(ds)), &files), ["train.jsonl"]);
    assert_eq!(std::fs::read_to_string(&files[0]).unwrap(), "{\"text\":\"a\"}\n");

    // Nothing usable at main: the parquet conversion branch, with its name encoded.
    let ds = "tiny-org/ds-csv";
    let files = hub.fetch_dataset_split(ds, "main", None, "train").unwrap();
    assert_eq!(
        rel_names(&dir(ds, &conversion_commit()), &files),
        ["default/train/0000.parquet", "default/train/0001.parquet"]
    );
    assert_eq!(std::fs::read(&files[1]).unwrap(), noise(700, 32));
    assert!(server.seen().iter().any(|s| s.path == "/api/datasets/tiny-org/ds-csv/revision/refs%2Fconvert%2Fparquet"));
    let conv_ref = repo_folder(cache.path(), "datasets", ds).join("refs/refs/convert/parquet");
    assert_eq!(std::fs::read_to_string(conv_ref).unwrap(), conversion_commit());

    // Offline, the conversion resolves from the cache too.
    let before = server.requests();
    let offline = client(&server, cache.path(), None, true);
    assert_eq!(offline.fetch_dataset_split(ds, "main", None, "train").unwrap(), files);
    assert_eq!(server.requests(), before);

    let text = err_text(&hub.fetch_dataset_split(ds, "main", None, "nosuch").unwrap_err());
    assert!(text.contains("split `nosuch`") && text.contains(ds) && text.contains("raw/data.txt"), "{text}");
}

#[test]
fn split_selection_layouts() {
    let names = [
        "README.md",
        "data/train.parquet",
        "data/pretrain.parquet",
        "data/validation.parquet",
        "cfg/train-00001-of-00002.parquet",
        "cfg/train-00000-of-00002.parquet",
        "cfg/test-00000-of-00001.parquet",
    ];
    assert_eq!(select_split_files(&names, None, "train"), ["data/train.parquet"]);
    assert_eq!(
        select_split_files(&names, Some("cfg"), "train"),
        ["cfg/train-00000-of-00002.parquet", "cfg/train-00001-of-00002.parquet"]
    );
    // Fuzzy fallback: `*test*` but never `latest` for `test`, nor `pretrain` for `train`.
    assert_eq!(select_split_files(&names, None, "test"), ["cfg/test-00000-of-00001.parquet"]);
    let names = ["train/a.parquet", "train/b.parquet", "test/a.parquet"];
    assert_eq!(select_split_files(&names, None, "train"), ["train/a.parquet", "train/b.parquet"]);
    let names = ["x/my_train_1.parquet", "x/pretrain.parquet", "x/latest.parquet"];
    assert_eq!(select_split_files(&names, None, "train"), ["x/my_train_1.parquet"]);
    assert!(select_split_files(&names, None, "test").is_empty());
    let names = ["train.json", "test.json", "train.jsonl"];
    assert_eq!(select_split_files(&names, None, "train"), ["train.jsonl"]);
    assert_eq!(select_split_files(&names, None, "test"), ["test.json"]);
    // Gzipped JSON lines, as a repo of `.jsonl.gz` shards has them.
    let names = ["README.md", "train-00000.jsonl.gz", "train-00001.jsonl.gz", "test.json.gz"];
    assert_eq!(select_split_files(&names, None, "train"), ["train-00000.jsonl.gz", "train-00001.jsonl.gz"]);
    assert_eq!(select_split_files(&names, None, "test"), ["test.json.gz"]);

    let conv = ["plain_text/train/0001.parquet", "plain_text/train/0000.parquet", "plain_text/test/0000.parquet"];
    assert_eq!(
        select_converted_split_files(&conv, None, "train"),
        ["plain_text/train/0000.parquet", "plain_text/train/0001.parquet"]
    );
    assert!(select_converted_split_files(&conv, Some("default"), "train").is_empty());
    let conv = ["default/partial-train/0000.parquet"];
    assert_eq!(select_converted_split_files(&conv, None, "train"), ["default/partial-train/0000.parquet"]);
    // One data file without a split name is the train split (yahma/alpaca-cleaned), and only that.
    let names = [".gitattributes", "README.md", "alpaca_data_cleaned.json"];
    assert_eq!(select_split_files(&names, None, "train"), ["alpaca_data_cleaned.json"]);
    assert!(select_split_files(&names, None, "test").is_empty());
    assert!(select_split_files(&["a.json", "b.json"], None, "train").is_empty());
}

#[test]
fn config_from_variables() {
    let vars = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    };
    let home = tempfile::tempdir().unwrap();
    let h = home.path().to_string_lossy().into_owned();

    let v = vars(&[("HOME", &h)]);
    let c = HubConfig::from_vars(|k| v.get(k).cloned()).unwrap();
    assert_eq!(c.endpoint, "https://huggingface.co");
    assert_eq!(c.token, None);
    assert!(!c.offline);
    assert_eq!(c.cache_dir, home.path().join(".cache/huggingface/hub"));
    assert_eq!(c.tuner_cache_dir, home.path().join(".cache/tuner"));
    assert_eq!(c.proxy, None);

    let v = vars(&[
        ("HOME", &h),
        ("HF_ENDPOINT", "http://mirror.local:8080/"),
        ("HUGGING_FACE_HUB_TOKEN", "hf_old"),
        ("HF_HUB_OFFLINE", "TRUE"),
        ("HF_HOME", "/data/hf"),
    ]);
    let c = HubConfig::from_vars(|k| v.get(k).cloned()).unwrap();
    assert_eq!(c.endpoint, "http://mirror.local:8080");
    assert_eq!(c.token.as_deref(), Some("hf_old"));
    assert!(c.offline);
    assert_eq!(c.cache_dir, PathBuf::from("/data/hf/hub"));
    assert_eq!(c.tuner_cache_dir, home.path().join(".cache/tuner"), "HF_HOME is the hub's, not tuner's");
    assert!(!format!("{c:?}").contains("hf_old"), "Debug must not print the token");

    let v = vars(&[
        ("HOME", &h),
        ("HF_TOKEN", "hf_new"),
        ("HUGGING_FACE_HUB_TOKEN", "hf_old"),
        ("TUNER_HUB_CACHE", "/c"),
        ("HF_HUB_OFFLINE", "0"),
    ]);
    let c = HubConfig::from_vars(|k| v.get(k).cloned()).unwrap();
    assert_eq!(c.token.as_deref(), Some("hf_new"));
    assert_eq!(c.cache_dir, PathBuf::from("/c"));
    assert!(!c.offline);

    // The hub cache by huggingface_hub's precedence, `~` expanded; XDG_CACHE_HOME moves both caches.
    let v = vars(&[
        ("HOME", &h),
        ("HF_HOME", "/data/hf"),
        ("HUGGINGFACE_HUB_CACHE", "/legacy"),
        ("HF_HUB_CACHE", "~/hub"),
        ("TUNER_CACHE", "~"),
    ]);
    let c = HubConfig::from_vars(|k| v.get(k).cloned()).unwrap();
    assert_eq!(c.cache_dir, home.path().join("hub"));
    assert_eq!(c.tuner_cache_dir, home.path());
    let v = vars(&[("HOME", &h), ("HF_HOME", "/data/hf"), ("HUGGINGFACE_HUB_CACHE", "/legacy")]);
    assert_eq!(HubConfig::from_vars(|k| v.get(k).cloned()).unwrap().cache_dir, PathBuf::from("/legacy"));
    let v = vars(&[("HOME", &h), ("XDG_CACHE_HOME", "/xdg")]);
    let c = HubConfig::from_vars(|k| v.get(k).cloned()).unwrap();
    assert_eq!((c.cache_dir, c.tuner_cache_dir), (PathBuf::from("/xdg/huggingface/hub"), PathBuf::from("/xdg/tuner")));
    assert!(HubConfig::from_vars(|_| None).unwrap_err().to_string().contains("HOME is not set"));

    // TRANSFORMERS_OFFLINE counts only when HF_HUB_OFFLINE is unset, as in huggingface_hub.
    let v = vars(&[("HOME", &h), ("TRANSFORMERS_OFFLINE", "1")]);
    assert!(HubConfig::from_vars(|k| v.get(k).cloned()).unwrap().offline);
    let v = vars(&[("HOME", &h), ("TRANSFORMERS_OFFLINE", "1"), ("HF_HUB_OFFLINE", "0")]);
    assert!(!HubConfig::from_vars(|k| v.get(k).cloned()).unwrap().offline);

    // The token file `huggingface-cli login` writes.
    std::fs::create_dir_all(home.path().join(".cache/huggingface")).unwrap();
    std::fs::write(home.path().join(".cache/huggingface/token"), "hf_file\n").unwrap();
    let v = vars(&[("HOME", &h)]);
    assert_eq!(HubConfig::from_vars(|k| v.get(k).cloned()).unwrap().token.as_deref(), Some("hf_file"));

    let v = vars(&[("HOME", &h), ("HTTPS_PROXY", "http://proxy:3128"), ("NO_PROXY", "localhost,.huggingface.co")]);
    assert_eq!(HubConfig::from_vars(|k| v.get(k).cloned()).unwrap().proxy, None);
    let v = vars(&[("HOME", &h), ("HTTPS_PROXY", "http://proxy:3128")]);
    assert_eq!(HubConfig::from_vars(|k| v.get(k).cloned()).unwrap().proxy.as_deref(), Some("http://proxy:3128"));

    let v = vars(&[("HOME", &h), ("HF_ENDPOINT", "huggingface.co")]);
    assert!(HubConfig::from_vars(|k| v.get(k).cloned()).unwrap_err().to_string().contains("HF_ENDPOINT"));
}

/// recipes/gemma3n-alpaca.toml, unchanged but for the run dir, against a local hub that serves
/// stand-ins under the recipe's own repo names: the bnb-4bit Gemma 3n fixture (multimodal
/// layout) as `unsloth/gemma-3n-e4b-it-bnb-4bit`, and 400 instruction/input/output rows as the
/// single `alpaca_data_cleaned.json` of `yahma/alpaca-cleaned`. All five stages run with the
/// seed's settings (4-bit base, r16/alpha 32 on seven projections, 2 × 4, 60 steps, adamw_8bit).
#[test]
fn the_gemma3n_recipe_runs_unchanged_against_hub_stand_ins() {
    let fx = repo().join("tests/fixtures/models/gemma3n-bnb4");
    let mut files = vec![small(".gitattributes", "*.safetensors filter=lfs\n")];
    for e in std::fs::read_dir(&fx).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("reference") || name == "score.json" {
            continue;
        }
        let data = std::fs::read(e.path()).unwrap();
        files.push(if name.ends_with(".safetensors") { lfs(&name, data) } else { FakeFile { name, data, lfs: false } });
    }
    let rows: Vec<serde_json::Value> = std::fs::read_to_string(repo().join("datasets/requests-json/train.jsonl"))
        .unwrap()
        .lines()
        .take(400)
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let data = vec![
        small("README.md", "# stand-in for yahma/alpaca-cleaned\n"),
        lfs("alpaca_data_cleaned.json", serde_json::to_vec(&rows).unwrap()),
    ];
    let server = Server::start(vec![
        FakeRepo {
            kind: "models",
            id: "unsloth/gemma-3n-e4b-it-bnb-4bit".into(),
            refs: vec![("main".into(), commit_id("gemma3n stand-in"))],
            commits: HashMap::from([(commit_id("gemma3n stand-in"), files)]),
            token: None,
        },
        FakeRepo {
            kind: "datasets",
            id: "yahma/alpaca-cleaned".into(),
            refs: vec![("main".into(), commit_id("alpaca stand-in"))],
            commits: HashMap::from([(commit_id("alpaca stand-in"), data)]),
            token: None,
        },
    ]);
    let d = tmp();
    let run_dir = d.path().join("run");
    let out = tuner()
        .env_remove("HF_HUB_OFFLINE")
        .env("HF_ENDPOINT", server.endpoint())
        .env("HF_HOME", d.path().join("hf"))
        .env("HF_TOKEN", "")
        .args([
            "run",
            repo().join("recipes/gemma3n-alpaca.toml").to_str().unwrap(),
            "--run-dir",
            run_dir.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    let metrics = std::fs::read_to_string(run_dir.join("train/metrics.jsonl")).unwrap();
    let rows: Vec<serde_json::Value> = metrics.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 60);
    let loss = |r: &[serde_json::Value]| r.iter().map(|v| v["loss"].as_f64().unwrap()).sum::<f64>() / r.len() as f64;
    // A random-init tiny model at the guide's lr 2e-4: the loss falls, slowly.
    assert!(loss(&rows[55..]) < 0.93 * loss(&rows[..5]), "loss {} → {}", loss(&rows[..5]), loss(&rows[55..]));
    assert!(err.contains("memory at step 10"), "memory is printed every 10 steps: {err}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("evaluate/report.json")).unwrap()).unwrap();
    let (before, after) =
        (report["before"]["eval_loss"].as_f64().unwrap(), report["after"]["eval_loss"].as_f64().unwrap());
    assert!(after < before, "eval loss {before} → {after}");
    let adapter = Tensor::read_safetensors(run_dir.join("export/adapter/adapter_model.safetensors")).unwrap();
    assert!(adapter
        .iter()
        .any(|(n, _)| n == "base_model.model.model.language_model.layers.0.mlp.down_proj.lora_B.weight"));
    for sub in ["merged", "nf4"] {
        let cfg: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(run_dir.join("export").join(sub).join("config.json")).unwrap(),
        )
        .unwrap();
        assert_eq!(cfg["model_type"], "gemma3n", "{sub} keeps the multimodal config");
    }
    // The merged export scores like base + adapter on the recipe's eval rows (the merge gate ran).
    let gate: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run_dir.join("export/merge_check.json")).unwrap()).unwrap();
    assert!(gate["passed"].as_bool().unwrap_or(false), "{gate}");
}

#[test]
fn downloads_form_the_hugging_face_cache_layout() {
    let server = Server::start(all_repos());
    let cache = tempfile::tempdir().unwrap();
    let hub = client(&server, cache.path(), None, false);
    let snap = hub.fetch_model(MODEL, "main").unwrap();
    let folder = repo_folder(cache.path(), "models", MODEL);
    let top: Vec<String> = std::fs::read_dir(&folder)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    assert_eq!(top, [".tuner", "blobs", "refs", "snapshots"]);

    // One blob per file, named by its ETag; each snapshot entry a relative symlink to it.
    let blobs = folder.join("blobs");
    let mut etags: Vec<String> = MODEL_FILES.iter().map(|n| etag_of(&fake_file(MODEL, &main_commit(), n))).collect();
    etags.sort();
    assert_eq!(walk(&blobs), etags);
    assert_eq!(rel_names(&snap.dir, &snap.files), MODEL_FILES);
    for (name, path) in MODEL_FILES.iter().zip(&snap.files) {
        let f = fake_file(MODEL, &main_commit(), name);
        assert!(std::fs::symlink_metadata(path).unwrap().file_type().is_symlink(), "{name}");
        assert_eq!(std::fs::read_link(path).unwrap(), Path::new("../../blobs").join(etag_of(&f)), "{name}");
        assert_eq!(std::fs::read(path).unwrap(), f.data, "{name}");
    }
    assert_eq!(std::fs::read_to_string(folder.join("refs/main")).unwrap(), main_commit());

    // A file two folders down links two levels further up.
    let ds = "tiny-org/ds-config";
    let files = hub.fetch_dataset_split(ds, "main", Some("en"), "train").unwrap();
    let f = fake_file(ds, &commit_id(ds), "en/train/0000.parquet");
    assert_eq!(files[0], snapshot_dir(cache.path(), "datasets", ds, &commit_id(ds)).join("en/train/0000.parquet"));
    assert_eq!(std::fs::read_link(&files[0]).unwrap(), Path::new("../../../../blobs").join(etag_of(&f)));
    assert_eq!(std::fs::read(&files[0]).unwrap(), f.data);

    // Commit v2 changes only README.md: its files link to main's blobs, and the weights are
    // not fetched again (the hub's redirect names the blob, which is there: the CDN is not asked).
    let cdn = |s: &Server| s.seen().iter().filter(|r| r.path.starts_with("/cdn/")).count();
    let cdn_before = cdn(&server);
    let v2 = hub.fetch_model(MODEL, "v2").unwrap();
    assert_eq!(v2.commit, v2_commit());
    assert_eq!(walk(&blobs), etags);
    assert_eq!(cdn(&server), cdn_before);
    for (a, b) in snap.files.iter().zip(&v2.files) {
        assert_eq!(std::fs::read_link(a).unwrap(), std::fs::read_link(b).unwrap());
    }
    assert_eq!(std::fs::read_to_string(folder.join("refs/v2")).unwrap(), v2_commit());
}

/// huggingface_hub downloads from the local hub (its HEAD + GET protocol); tuner then loads
/// that cache offline, without any tuner metadata, and online without downloading again.
#[test]
fn a_cache_written_by_huggingface_hub_loads_in_tuner_offline() {
    let server = Server::start(all_repos());
    let d = tmp();
    let cache = d.path().join("hub");
    let mut files = MODEL_FILES.to_vec();
    files.push("README.md");
    interop("write", Some(&server.endpoint()), &cache, "model", MODEL, &files);
    let ds = "tiny-org/ds-data";
    let ds_files = ["data/train-00000-of-00002.parquet", "data/train-00001-of-00002.parquet"];
    interop("write", Some(&server.endpoint()), &cache, "dataset", ds, &ds_files);
    let folder = repo_folder(&cache, "models", MODEL);
    assert!(folder.join("blobs").is_dir() && folder.join("refs/main").is_file());
    assert!(!folder.join(".tuner").exists(), "written by huggingface_hub alone");

    let before = server.requests();
    let offline = client(&server, &cache, None, true);
    let snap = offline.fetch_model(MODEL, "main").unwrap();
    assert_eq!(snap.commit, main_commit());
    assert_eq!(snap.dir, snapshot_dir(&cache, "models", MODEL, &main_commit()));
    assert_eq!(rel_names(&snap.dir, &snap.files), MODEL_FILES);
    for (name, path) in MODEL_FILES.iter().zip(&snap.files) {
        assert_eq!(std::fs::read(path).unwrap(), file_data(MODEL, &main_commit(), name), "{name}");
    }
    let train = offline.fetch_dataset_split(ds, "main", None, "train").unwrap();
    assert_eq!(rel_names(&snapshot_dir(&cache, "datasets", ds, &commit_id(ds)), &train), ds_files);
    assert_eq!(std::fs::read(&train[1]).unwrap(), noise(700, 11));
    // What huggingface_hub did not download is missing, and said so.
    let text = err_text(&offline.fetch_dataset_split(ds, "main", None, "test").unwrap_err());
    assert!(text.contains("split `test`") && text.contains("offline mode (HF_HUB_OFFLINE=1)"), "{text}");
    let err = offline.download_file(RepoKind::Model, MODEL, "main", "model.gguf").unwrap_err();
    assert!(matches!(err.downcast_ref::<HubError>(), Some(HubError::FileNotCached { .. })), "{err:#}");
    assert_eq!(server.requests(), before, "offline mode must not touch the network");

    // Online, the branch is resolved (one API call) and every file is already there.
    let online = client(&server, &cache, None, false);
    assert_eq!(online.fetch_model(MODEL, "main").unwrap(), snap);
    let seen: Vec<String> = server.seen()[before..].iter().map(|s| format!("{} {}", s.method, s.path)).collect();
    assert_eq!(seen, ["GET /api/models/tiny-org/tiny-model/revision/main"]);
}

/// tuner downloads a model and a dataset split; huggingface_hub loads both offline
/// (`hf_hub_download` and `snapshot_download` with `local_files_only`), and its cache scan
/// finds nothing wrong.
#[test]
fn what_tuner_downloads_loads_in_huggingface_hub_offline() {
    let server = Server::start(all_repos());
    let d = tmp();
    let cache = d.path().join("hub");
    let hub = client(&server, &cache, None, false);
    let snap = hub.fetch_model(MODEL, "main").unwrap();
    let ds = "tiny-org/ds-config";
    let ds_files = hub.fetch_dataset_split(ds, "main", Some("en"), "train").unwrap();
    drop(server);

    let report = interop("read", None, &cache, "model", MODEL, &MODEL_FILES);
    for (name, path) in MODEL_FILES.iter().zip(&snap.files) {
        let got = &report["files"][name];
        assert_eq!(got["path"], path.to_string_lossy().as_ref(), "{name}");
        assert_eq!(got["sha256"], sha256_hex(&file_data(MODEL, &main_commit(), name)), "{name}");
    }
    assert_eq!(report["snapshot"], snap.dir.to_string_lossy().as_ref());
    assert_eq!(report["warnings"], serde_json::json!([]), "huggingface_hub's cache scan: {report}");
    assert_eq!(
        report["repos"],
        serde_json::json!([
            {"repo_id": ds, "repo_type": "dataset", "nb_files": 2, "refs": ["main"], "revisions": [commit_id(ds)]},
            {"repo_id": MODEL, "repo_type": "model", "nb_files": 7, "refs": ["main"], "revisions": [main_commit()]},
        ])
    );

    let names = ["en/train/0000.parquet", "en/train/0001.parquet"];
    let report = interop("read", None, &cache, "dataset", ds, &names);
    for (name, path) in names.iter().zip(&ds_files) {
        assert_eq!(report["files"][name]["path"], path.to_string_lossy().as_ref(), "{name}");
        assert_eq!(report["files"][name]["sha256"], sha256_hex(&file_data(ds, &commit_id(ds), name)), "{name}");
    }
}

/// A model in the private layout of earlier versions of tuner: weights whose sha256 is the
/// hub's ETag are hard-linked into the hub cache instead of downloaded; a copy that differs
/// is downloaded.
#[test]
fn weights_in_the_old_private_cache_are_reused_not_downloaded() {
    use std::os::unix::fs::MetadataExt;
    let server = Server::start(all_repos());
    let d = tmp();
    let mut config = HubConfig::new(d.path().join("hf/hub"));
    config.endpoint = server.endpoint();
    config.progress = false;
    config.tuner_cache_dir = d.path().join("tuner");
    let old = |repo: &str, commit: &str, file: &str| {
        let p = d.path().join("tuner/hub/models").join(repo).join(commit).join(file);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        p
    };
    let weights = old(MODEL, &main_commit(), "model.safetensors");
    std::fs::write(&weights, noise(WEIGHTS_LEN, 1)).unwrap();
    let c = commit_id("sharded");
    std::fs::write(old(SHARDED, &c, "model-00001-of-00002.safetensors"), noise(1500, 4)).unwrap();
    std::fs::write(old(SHARDED, &c, "model-00002-of-00002.safetensors"), noise(1500, 99)).unwrap();
    let hub = HubClient::new(config);
    let cdn = |s: &Server| -> Vec<String> {
        s.seen().into_iter().filter(|r| r.path.starts_with("/cdn/")).map(|r| r.path).collect()
    };

    let snap = hub.fetch_model(MODEL, "main").unwrap();
    let blob =
        repo_folder(&d.path().join("hf/hub"), "models", MODEL).join("blobs").join(sha256_hex(&noise(WEIGHTS_LEN, 1)));
    assert_eq!(std::fs::read(snap.dir.join("model.safetensors")).unwrap(), noise(WEIGHTS_LEN, 1));
    assert_eq!(std::fs::metadata(&weights).unwrap().ino(), std::fs::metadata(&blob).unwrap().ino(), "a hard link");
    assert_eq!(cdn(&server), Vec::<String>::new());

    let snap = hub.fetch_model(SHARDED, "main").unwrap();
    assert_eq!(std::fs::read(snap.dir.join("model-00001-of-00002.safetensors")).unwrap(), noise(1500, 4));
    assert_eq!(std::fs::read(snap.dir.join("model-00002-of-00002.safetensors")).unwrap(), noise(1500, 5));
    assert_eq!(cdn(&server), [format!("/cdn/{}", sha256_hex(&noise(1500, 5)))]);
}
