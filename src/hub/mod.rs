//! Hugging Face hub client: resolves revisions to commits and downloads model and
//! dataset files into the standard Hugging Face hub cache, over blocking HTTP (ureq 3).
//!
//! It follows the hub's public HTTP layout, the same one `huggingface_hub` uses:
//!
//! * `GET {endpoint}/api/{models|datasets}/{repo}/revision/{revision}` answers JSON with
//!   the commit `sha` and the `siblings` (`rfilename`, optional `size`) of that commit;
//!   the revision is percent-encoded as one path segment (`refs%2Fconvert%2Fparquet`).
//! * `GET {endpoint}/{repo}/resolve/{commit}/{file}` (datasets under `/datasets/`) serves
//!   a file, small files directly and large (LFS) files by a redirect to a CDN. The hub's
//!   own response carries `X-Linked-Etag` (LFS: the sha256 of the content) or `ETag`
//!   (the git blob id); that ETag names the file in the cache, and a 64-hex one is
//!   checked against the downloaded bytes.
//! * Failures carry `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`,
//!   `GatedRepo`) and `X-Error-Message`, which make the errors here precise.
//!
//! The cache is huggingface_hub's (see `hub/cache.rs`): `{cache}/models--{org}--{name}/` with
//! `blobs/{etag}`, `refs/{revision}` and `snapshots/{commit}/{file}` symlinks, so a model
//! transformers already downloaded is not fetched again, and what tuner downloads loads
//! in transformers or vLLM. Offline, a revision resolves through `refs/` and a commit's
//! files are those in its snapshot folder; tuner also records each commit's full file
//! list under `.tuner/` so that a pinned, fully cached commit needs no network online.
//! Downloads stream into `blobs/{etag}.incomplete`, resume with `Range: bytes=N-` (for
//! files the hub serves by redirect, i.e. LFS files, whose ETag is known before the
//! body), and are renamed into place only when complete and verified. An LFS file that
//! earlier versions of tuner downloaded into their private layout (`~/.cache/tuner/hub`)
//! is hard-linked from there instead, once its sha256 matches the hub's.
//!
//! Nothing here reads the environment: [`HubConfig::from_env`] does, once, and callers
//! pass the resulting [`HubConfig`] to [`HubClient::new`].

pub(crate) mod cache;
mod select;

pub use select::{is_model_file, select_converted_split_files, select_split_files};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::fmt;
use std::fs;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::progress::{Progress, Unit};
use cache::RepoCache;

/// The public hub; the default for `HF_ENDPOINT`.
pub const DEFAULT_ENDPOINT: &str = "https://huggingface.co";

/// The branch the hub's dataset viewer writes parquet conversions of datasets to.
pub const PARQUET_CONVERSION_REVISION: &str = "refs/convert/parquet";

/// The most redirects one request follows.
const MAX_REDIRECTS: usize = 10;

/// Where and how to reach the hub. Build it once with [`HubConfig::from_env`] (or by
/// hand) and pass it to [`HubClient::new`].
#[derive(Clone)]
pub struct HubConfig {
    /// Base URL of the hub, without a trailing slash (`HF_ENDPOINT`).
    pub endpoint: String,
    /// Access token sent as `Authorization: Bearer …` to the endpoint's host (`HF_TOKEN`).
    pub token: Option<String>,
    /// No network at all; everything comes from the cache (`HF_HUB_OFFLINE=1`).
    pub offline: bool,
    /// Root of the Hugging Face hub cache (the folder holding `models--…`, `datasets--…`).
    pub cache_dir: PathBuf,
    /// tuner's own cache, for what is not a hub download (GGUF files imported to HF folders).
    pub tuner_cache_dir: PathBuf,
    /// Show a progress bar while downloading (only ever drawn when stderr is a terminal).
    pub progress: bool,
    /// HTTP(S) proxy URL for every request, if any.
    pub proxy: Option<String>,
}

impl fmt::Debug for HubConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubConfig")
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("offline", &self.offline)
            .field("cache_dir", &self.cache_dir)
            .field("tuner_cache_dir", &self.tuner_cache_dir)
            .field("progress", &self.progress)
            .field("proxy", &self.proxy)
            .finish()
    }
}

impl HubConfig {
    /// A configuration for the public hub with the given hub cache folder (tuner's own
    /// cache is its parent folder): no token, online, progress bars on (when stderr is a
    /// terminal), no proxy.
    pub fn new(cache_dir: impl Into<PathBuf>) -> Self {
        let cache_dir: PathBuf = cache_dir.into();
        HubConfig {
            endpoint: DEFAULT_ENDPOINT.to_string(),
            token: None,
            offline: false,
            tuner_cache_dir: cache_dir.parent().unwrap_or(&cache_dir).to_path_buf(),
            cache_dir,
            progress: true,
            proxy: None,
        }
    }

    /// Read the configuration from the process environment (see [`HubConfig::from_vars`]);
    /// relative cache folders are made absolute against the current directory.
    pub fn from_env() -> Result<Self> {
        let mut c = Self::from_vars(|name| std::env::var(name).ok())?;
        for dir in [&mut c.cache_dir, &mut c.tuner_cache_dir] {
            if let Ok(abs) = std::path::absolute(&*dir) {
                *dir = abs;
            }
        }
        Ok(c)
    }

    /// Build the configuration from variables looked up by `var` (empty values count
    /// as unset), by huggingface_hub's rules (its `constants.py`) where it has one:
    ///
    /// * `HF_ENDPOINT`: hub URL, default <https://huggingface.co>;
    /// * `HF_HOME`: default `$XDG_CACHE_HOME/huggingface`, else `~/.cache/huggingface`;
    /// * `HF_TOKEN`, else `HUGGING_FACE_HUB_TOKEN`, else the token file that
    ///   `hf auth login` writes (`HF_TOKEN_PATH`, else `$HF_HOME/token`);
    /// * `HF_HUB_OFFLINE` (else `TRANSFORMERS_OFFLINE`): `1`, `true`, `yes` or `on`, any
    ///   case, turns the network off;
    /// * hub cache: `TUNER_HUB_CACHE` (a tuner-only override), else `HF_HUB_CACHE`, else
    ///   `HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`;
    /// * tuner's own cache: `TUNER_CACHE`, else `$XDG_CACHE_HOME/tuner`, else `~/.cache/tuner`;
    /// * proxy: `HTTPS_PROXY`/`HTTP_PROXY` (by the endpoint's scheme), else `ALL_PROXY`,
    ///   either case, unless `NO_PROXY` names the endpoint's host.
    ///
    /// A leading `~` in a path is the home folder (`HOME`).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let get = |name: &str| var(name).map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
        let home = get("HOME").map(PathBuf::from);
        let path = |name: &str| get(name).map(|v| expand_home(&v, home.as_deref()));

        let endpoint = match get("HF_ENDPOINT") {
            Some(e) => e.trim_end_matches('/').to_string(),
            None => DEFAULT_ENDPOINT.to_string(),
        };
        if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
            bail!("HF_ENDPOINT must be an http:// or https:// URL, got `{endpoint}`");
        }

        let xdg_cache = path("XDG_CACHE_HOME").or_else(|| home.as_ref().map(|h| h.join(".cache")));
        let hf_home = path("HF_HOME").or_else(|| xdg_cache.as_ref().map(|c| c.join("huggingface")));

        let token = match get("HF_TOKEN").or_else(|| get("HUGGING_FACE_HUB_TOKEN")) {
            Some(t) => Some(t),
            None => {
                let file = path("HF_TOKEN_PATH").or_else(|| hf_home.as_ref().map(|h| h.join("token")));
                file.and_then(|p| fs::read_to_string(p).ok()).map(|t| t.trim().to_string()).filter(|t| !t.is_empty())
            }
        };

        let offline = get("HF_HUB_OFFLINE")
            .or_else(|| get("TRANSFORMERS_OFFLINE"))
            .map(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
            .unwrap_or(false);

        let cache_dir = path("TUNER_HUB_CACHE")
            .or_else(|| path("HF_HUB_CACHE"))
            .or_else(|| path("HUGGINGFACE_HUB_CACHE"))
            .or_else(|| hf_home.as_ref().map(|h| h.join("hub")))
            .ok_or_else(|| {
                anyhow!("cannot choose the hub cache folder: HOME is not set; set HF_HOME or HF_HUB_CACHE")
            })?;
        let tuner_cache_dir = path("TUNER_CACHE")
            .or_else(|| xdg_cache.as_ref().map(|c| c.join("tuner")))
            .ok_or_else(|| anyhow!("cannot choose tuner's cache folder: HOME is not set; set TUNER_CACHE"))?;

        let https = endpoint.starts_with("https://");
        let proxy_vars: &[&str] = if https {
            &["HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"]
        } else {
            &["HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"]
        };
        let mut proxy = proxy_vars.iter().find_map(|n| get(n));
        if let Some(no_proxy) = get("NO_PROXY").or_else(|| get("no_proxy")) {
            let host = url_origin(&endpoint).map(|o| o.host).unwrap_or_default();
            if no_proxy_matches(&no_proxy, &host) {
                proxy = None;
            }
        }
        if let Some(p) = &proxy {
            ureq::Proxy::new(p).map_err(|e| anyhow!("invalid proxy URL `{p}` in the environment: {e}"))?;
        }

        Ok(HubConfig { endpoint, token, offline, cache_dir, tuner_cache_dir, progress: true, proxy })
    }
}

/// `~` or `~/…` with the home folder put in (when known), as Python's `expanduser`.
fn expand_home(value: &str, home: Option<&Path>) -> PathBuf {
    match (value.strip_prefix('~'), home) {
        (Some(""), Some(h)) => h.to_path_buf(),
        (Some(rest), Some(h)) if rest.starts_with('/') => h.join(rest.trim_start_matches('/')),
        _ => PathBuf::from(value),
    }
}

/// Whether a `NO_PROXY` list (comma separated hosts, `.suffix` or `*`) covers `host`.
fn no_proxy_matches(list: &str, host: &str) -> bool {
    list.split(',').map(str::trim).filter(|e| !e.is_empty()).any(|entry| {
        let entry = entry.trim_start_matches("*.").trim_start_matches('.');
        entry == "*"
            || host.eq_ignore_ascii_case(entry)
            || host.to_ascii_lowercase().ends_with(&format!(".{}", entry.to_ascii_lowercase()))
    })
}

/// The two kinds of hub repositories tuner reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RepoKind {
    /// A model repository (`/api/models/…`, files at `/{repo}/resolve/…`).
    Model,
    /// A dataset repository (`/api/datasets/…`, files at `/datasets/{repo}/resolve/…`).
    Dataset,
}

impl RepoKind {
    /// The plural used in API paths and as the cache folder: `models` or `datasets`.
    pub fn plural(self) -> &'static str {
        match self {
            RepoKind::Model => "models",
            RepoKind::Dataset => "datasets",
        }
    }

    /// Path prefix of this kind's file URLs: empty for models, `datasets/` for datasets.
    fn url_prefix(self) -> &'static str {
        match self {
            RepoKind::Model => "",
            RepoKind::Dataset => "datasets/",
        }
    }
}

impl fmt::Display for RepoKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RepoKind::Model => "model",
            RepoKind::Dataset => "dataset",
        })
    }
}

/// One file of a commit, as the revision API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sibling {
    /// Path of the file inside the repository, `/`-separated.
    pub rfilename: String,
    /// Size in bytes, when the API reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

/// A commit of a repository and the files in it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoInfo {
    /// The 40-hex commit sha.
    pub sha: String,
    /// Every file of the commit.
    #[serde(default)]
    pub siblings: Vec<Sibling>,
}

/// Downloaded files of one commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// The 40-hex commit sha the revision resolved to.
    pub commit: String,
    /// The commit's snapshot folder in the cache (`…/snapshots/{commit}`); every file of
    /// the repo lives below it at its repository path, as a symlink into `blobs/`.
    pub dir: PathBuf,
    /// Paths of the downloaded files in the snapshot folder, sorted by repository path.
    pub files: Vec<PathBuf>,
}

/// A failure the caller may want to tell apart (found with `downcast_ref` on the
/// `anyhow::Error`); every message names the repository and, where there is one, the file.
#[derive(Debug, thiserror::Error)]
pub enum HubError {
    /// Offline mode and the revision is not in the cache.
    #[error("offline mode (HF_HUB_OFFLINE=1): `{repo}` revision `{revision}` is not in the cache at {}; run once with network access or unset HF_HUB_OFFLINE", path.display())]
    RevisionNotCached {
        /// Repository id.
        repo: String,
        /// The revision asked for.
        revision: String,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// Offline mode and a file is not in the cache.
    #[error("offline mode (HF_HUB_OFFLINE=1): file `{file}` of `{repo}` (commit {commit}) is not in the cache at {}; run once with network access or unset HF_HUB_OFFLINE", path.display())]
    FileNotCached {
        /// Repository id.
        repo: String,
        /// The commit.
        commit: String,
        /// The repository path of the file.
        file: String,
        /// Where it was looked for.
        path: PathBuf,
    },
    /// The hub answered with an error status.
    #[error("{message}")]
    Status {
        /// The HTTP status.
        status: u16,
        /// The URL that failed.
        url: String,
        /// The full explanation.
        message: String,
    },
    /// The hub could not be reached at all.
    #[error("{message}")]
    Unreachable {
        /// The configured endpoint.
        endpoint: String,
        /// The full explanation.
        message: String,
    },
    /// A download stopped before the whole file arrived; the partial file is kept.
    #[error("{message}")]
    Interrupted {
        /// The `.incomplete` file, which the next attempt resumes.
        partial: PathBuf,
        /// The full explanation.
        message: String,
    },
    /// The downloaded bytes do not hash to the sha256 the hub announced.
    #[error("sha256 mismatch for `{file}` of `{repo}`: the hub announced {expected}, the downloaded bytes hash to {actual}; the download was deleted and nothing was cached")]
    Checksum {
        /// Repository id.
        repo: String,
        /// Repository path of the file.
        file: String,
        /// The sha256 the hub announced.
        expected: String,
        /// The sha256 of what arrived.
        actual: String,
    },
}

/// A checked repository id.
#[derive(Debug, Clone)]
struct RepoId {
    /// As given: `org/name` (or a bare legacy `name`).
    full: String,
}

impl RepoId {
    fn parse(repo: &str) -> Result<RepoId> {
        let ok_part = |s: &str| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && !s.starts_with('.')
                && !s.contains("--")
                && s.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        let parts: Vec<&str> = repo.split('/').collect();
        match parts.as_slice() {
            [org, name] if ok_part(org) && ok_part(name) => Ok(RepoId { full: repo.to_string() }),
            [name] if ok_part(name) => Ok(RepoId { full: repo.to_string() }),
            _ => bail!(
                "invalid hub repository id `{repo}`: expected `org/name` (letters, digits, `-`, `_`, `.`; no `--`)"
            ),
        }
    }
}

impl fmt::Display for RepoId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

/// Whether `s` is a full commit sha (40 lowercase hex digits).
pub fn is_commit_sha(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// A relative `/`-separated path that cannot leave its folder.
fn check_rel_path(what: &str, p: &str) -> Result<()> {
    let bad = p.is_empty()
        || p.starts_with('/')
        || p.contains('\\')
        || p.chars().any(|c| c.is_control())
        || p.split('/').any(|seg| seg.is_empty() || seg == "." || seg == "..");
    if bad {
        bail!("invalid {what} `{p}`");
    }
    Ok(())
}

/// Percent-encode everything except RFC 3986 unreserved characters (and `/` when asked).
fn encode_path(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Scheme, lower-cased host and port (defaulted) of a URL.
#[derive(Debug, PartialEq, Eq)]
struct Origin {
    scheme: String,
    host: String,
    port: u16,
}

fn url_origin(url: &str) -> Option<Origin> {
    let (scheme, rest) = url.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let authority = authority.rsplit_once('@').map(|(_, h)| h).unwrap_or(authority);
    let default_port = if scheme == "https" { 443 } else { 80 };
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']')?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().ok()?,
            None => default_port,
        };
        (format!("[{h}]"), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), p.parse().ok()?),
            None => (authority.to_string(), default_port),
        }
    };
    Some(Origin { scheme, host: host.to_ascii_lowercase(), port })
}

/// Resolve a `Location` header against the URL that answered with it.
fn join_url(base: &str, location: &str) -> Result<String> {
    let lower = location.to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        return Ok(location.to_string());
    }
    let (scheme, rest) = base.split_once("://").ok_or_else(|| anyhow!("bad URL `{base}`"))?;
    if let Some(r) = location.strip_prefix("//") {
        return Ok(format!("{scheme}://{r}"));
    }
    let host_end = rest.find('/').unwrap_or(rest.len());
    let origin = format!("{scheme}://{}", &rest[..host_end]);
    if location.starts_with('/') {
        return Ok(format!("{origin}{location}"));
    }
    let path = &rest[host_end..];
    let path = &path[..path.find(['?', '#']).unwrap_or(path.len())];
    let dir = &path[..path.rfind('/').map(|i| i + 1).unwrap_or(0)];
    let dir = if dir.is_empty() { "/" } else { dir };
    Ok(format!("{origin}{dir}{location}"))
}

/// What [`HubClient::get`] does once the hub named a file's ETag.
enum Hop {
    /// Follow the redirect, asking for the bytes from this offset on, if any.
    Follow(Option<u64>),
    /// Stop and return the redirect itself (the blob is already cached).
    Stop,
}

/// A response after redirects, with what the hub said on its own hops.
struct Reply {
    status: u16,
    url: String,
    response: ureq::http::Response<ureq::Body>,
    /// `X-Linked-Etag` of any hop, else the first `ETag` of the endpoint's own answers.
    etag: Option<String>,
    /// `X-Linked-Size` of any hop.
    linked_size: Option<u64>,
    /// The `Range: bytes=N-` start the final request carried.
    range: Option<u64>,
}

impl Reply {
    fn header(&self, name: &str) -> Option<String> {
        header(&self.response, name)
    }
}

fn header<B>(resp: &ureq::http::Response<B>, name: &str) -> Option<String> {
    resp.headers().get(name).and_then(|v| v.to_str().ok()).map(|s| s.trim().to_string())
}

/// An ETag without `W/` and quotes, as huggingface_hub's `_normalize_etag` leaves it.
fn clean_etag(raw: &str) -> String {
    raw.trim().trim_start_matches("W/").trim_matches('"').to_string()
}

/// Whether an ETag can name a blob file: letters, digits, `-`, `_`, `.`, not leading,
/// at most 200 characters (the hub's are 40 or 64 hex digits).
fn is_blob_name(etag: &str) -> bool {
    !etag.is_empty()
        && etag.len() <= 200
        && !etag.starts_with('.')
        && !etag.ends_with(".incomplete")
        && etag.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Parse `Content-Range: bytes START-END/TOTAL` into (START, TOTAL if known).
fn parse_content_range(v: &str) -> Option<(u64, Option<u64>)> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, total) = rest.split_once('/')?;
    let (start, _end) = range.split_once('-')?;
    let start = start.trim().parse().ok()?;
    let total = total.trim().parse().ok();
    Some((start, total))
}

/// Downloads from the hub into the cache. Cheap to share by reference across threads.
pub struct HubClient {
    config: HubConfig,
    agent: ureq::Agent,
}

impl fmt::Debug for HubClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HubClient").field("config", &self.config).finish()
    }
}

impl HubClient {
    /// A client for `config`. A proxy URL that does not parse is ignored with a warning
    /// ([`HubConfig::from_env`] rejects those up front).
    pub fn new(config: HubConfig) -> HubClient {
        let proxy = config.proxy.as_deref().and_then(|p| match ureq::Proxy::new(p) {
            Ok(p) => Some(p),
            Err(e) => {
                log::warn!("ignoring invalid proxy URL `{p}`: {e}");
                None
            }
        });
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .proxy(proxy)
            .user_agent(format!("tuner/{}", env!("CARGO_PKG_VERSION")))
            .accept_encoding("identity")
            .timeout_connect(Some(Duration::from_secs(30)))
            .timeout_recv_response(Some(Duration::from_secs(120)))
            .timeout_per_read(Some(Duration::from_secs(120)))
            .build()
            .into();
        HubClient { config, agent }
    }

    /// The configuration this client was built with.
    pub fn config(&self) -> &HubConfig {
        &self.config
    }

    fn repo_cache(&self, kind: RepoKind, id: &RepoId) -> RepoCache {
        RepoCache::new(&self.config.cache_dir, kind.plural(), &id.full)
    }

    /// The snapshot folder of one commit of a repository in the cache (it may not exist yet).
    pub fn commit_dir(&self, kind: RepoKind, repo: &str, commit: &str) -> Result<PathBuf> {
        let id = RepoId::parse(repo)?;
        Ok(self.repo_cache(kind, &id).snapshot_dir(commit))
    }

    /// The commit the cache knows `revision` as, if any: a sha with a recorded file list
    /// or a snapshot folder, else what `refs/{revision}` holds.
    fn cached_commit(&self, kind: RepoKind, id: &RepoId, revision: &str) -> Option<String> {
        let cache = self.repo_cache(kind, id);
        if is_commit_sha(revision) && (cache.read_listing(revision).is_some() || cache.snapshot_dir(revision).is_dir())
        {
            return Some(revision.to_string());
        }
        cache.read_ref(revision)
    }

    /// The file list of `revision` of a repository: from the cache when `revision` is a
    /// commit sha whose list tuner recorded, or when offline; else from the revision API
    /// (which also records `refs/{revision}` and the list in the cache).
    pub fn repo_info(&self, kind: RepoKind, repo: &str, revision: &str) -> Result<RepoInfo> {
        let id = RepoId::parse(repo)?;
        check_rel_path("revision", revision)?;
        let cache = self.repo_cache(kind, &id);
        if is_commit_sha(revision) {
            if let Some(info) = cache.read_listing(revision) {
                return Ok(info);
            }
        }
        if self.config.offline {
            return self.offline_info(kind, &id, revision);
        }

        let url = format!(
            "{}/api/{}/{}/revision/{}",
            self.config.endpoint,
            kind.plural(),
            id.full,
            encode_path(revision, false)
        );
        let mut reply =
            self.get(&url, &|_| Hop::Follow(None)).map_err(|e| self.unreachable(e, kind, &id, Some(revision), &url))?;
        if reply.status != 200 {
            return Err(self.status_error(&reply, kind, &id, Some(revision), None));
        }
        let text = reply
            .response
            .body_mut()
            .with_config()
            .limit(256 << 20)
            .read_to_string()
            .map_err(|e| anyhow!("reading the file list of {kind} `{id}` at `{revision}` from {url}: {e}"))?;
        let mut info: RepoInfo = serde_json::from_str(&text).with_context(|| {
            format!("the hub's answer for {kind} `{id}` at `{revision}` ({url}) is not the expected JSON")
        })?;
        if !is_commit_sha(&info.sha) {
            bail!(
                "the hub's answer for {kind} `{id}` at `{revision}` ({url}) has no valid commit sha (got `{}`)",
                info.sha
            );
        }
        info.siblings.retain(|s| match check_rel_path("file name", &s.rfilename) {
            Ok(()) => true,
            Err(_) => {
                log::warn!("{kind} `{id}`: skipping unsafe file name `{}` listed by the hub", s.rfilename);
                false
            }
        });
        info.siblings.sort_by(|a, b| a.rfilename.cmp(&b.rfilename));

        cache.write_listing(&info).with_context(|| format!("caching the file list of {kind} `{id}`"))?;
        cache
            .write_ref(revision, &info.sha)
            .with_context(|| format!("caching the ref `{revision}` of {kind} `{id}`"))?;
        Ok(info)
    }

    /// Offline: the revision through `refs/`, the files from tuner's recorded list, else
    /// those in the snapshot folder (a cache huggingface_hub wrote).
    fn offline_info(&self, kind: RepoKind, id: &RepoId, revision: &str) -> Result<RepoInfo> {
        let cache = self.repo_cache(kind, id);
        let not_cached = || HubError::RevisionNotCached {
            repo: id.full.clone(),
            revision: revision.to_string(),
            path: cache.dir().to_path_buf(),
        };
        let commit = self.cached_commit(kind, id, revision).ok_or_else(not_cached)?;
        if let Some(info) = cache.read_listing(&commit) {
            return Ok(info);
        }
        match cache.list_snapshot(&commit)? {
            Some(siblings) => Ok(RepoInfo { sha: commit, siblings }),
            None => Err(not_cached().into()),
        }
    }

    /// The commit sha `revision` (branch, tag or sha) of a repository points to. A sha
    /// whose file list is cached, and anything in offline mode, needs no network.
    pub fn resolve_revision(&self, kind: RepoKind, repo: &str, revision: &str) -> Result<String> {
        Ok(self.repo_info(kind, repo, revision)?.sha)
    }

    /// One file of a commit, downloaded into the cache unless it is already there;
    /// returns its path in the commit's snapshot folder. A `commit` that is not a sha is
    /// resolved first.
    pub fn download_file(&self, kind: RepoKind, repo: &str, commit: &str, filename: &str) -> Result<PathBuf> {
        let id = RepoId::parse(repo)?;
        check_rel_path("file name", filename)?;
        let commit =
            if is_commit_sha(commit) { commit.to_string() } else { self.resolve_revision(kind, repo, commit)? };
        self.ensure_file(kind, &id, &commit, filename)
    }

    fn ensure_file(&self, kind: RepoKind, id: &RepoId, commit: &str, filename: &str) -> Result<PathBuf> {
        let cache = self.repo_cache(kind, id);
        let pointer = cache.pointer(commit, filename);
        if pointer.is_file() {
            return Ok(pointer);
        }
        if self.config.offline {
            return Err(HubError::FileNotCached {
                repo: id.full.clone(),
                commit: commit.to_string(),
                file: filename.to_string(),
                path: pointer,
            }
            .into());
        }
        self.fetch(kind, id, &cache, commit, filename)
    }

    /// Download a file into `blobs/{etag}` (through `blobs/{etag}.incomplete`, resumed when
    /// present; nothing when the blob is already there, e.g. from another commit), verify
    /// it, and link it into the commit's snapshot folder. Returns the link's path.
    fn fetch(&self, kind: RepoKind, id: &RepoId, cache: &RepoCache, commit: &str, filename: &str) -> Result<PathBuf> {
        let url = format!(
            "{}/{}{}/resolve/{}/{}",
            self.config.endpoint,
            kind.url_prefix(),
            id.full,
            commit,
            encode_path(filename, true)
        );
        let mut from_scratch = false;
        let legacy = self.legacy_file(kind, id, commit, filename);
        let mut try_legacy = legacy.is_some();
        loop {
            // Decided once the hub's own answer named the file's ETag (before any redirect).
            let next = |etag: Option<&str>| {
                let Some(etag) = etag.filter(|e| is_blob_name(e)) else { return Hop::Follow(None) };
                if cache.blob(etag).is_file() || (try_legacy && is_sha256(etag)) {
                    return Hop::Stop;
                }
                let have =
                    if from_scratch { 0 } else { fs::metadata(cache.partial(etag)).map(|m| m.len()).unwrap_or(0) };
                Hop::Follow((have > 0).then_some(have))
            };
            let mut reply = self.get(&url, &next).map_err(|e| self.unreachable(e, kind, id, None, &url))?;
            if !matches!(reply.status, 200 | 206 | 301..=308 | 416) {
                return Err(self.status_error(&reply, kind, id, Some(commit), Some(filename)));
            }
            let Some(etag) = reply.etag.clone().filter(|e| is_blob_name(e)) else {
                bail!(
                    "the answer for file `{filename}` of {kind} `{id}` ({url}) has no usable ETag (got {:?}), \
                     which names the file in the hub cache; is HF_ENDPOINT ({}) a Hugging Face hub?",
                    reply.etag.as_deref().unwrap_or("none"),
                    self.config.endpoint
                );
            };
            let blob = cache.blob(&etag);
            if try_legacy && is_sha256(&etag) && !blob.is_file() {
                try_legacy = false;
                let reused = match &legacy {
                    Some(old) => reuse_legacy(old, &blob, &etag)?,
                    None => false,
                };
                if !reused && (301..=308).contains(&reply.status) {
                    continue; // stopped at the redirect for a copy that turned out different
                }
            }
            if blob.is_file() {
                log::debug!("`{filename}` of `{id}`: blob {etag} is already in the cache");
                return cache.link(commit, filename, &etag);
            }
            let part = cache.partial(&etag);
            let blobs = blob.parent().context("a blob path has a parent")?;
            fs::create_dir_all(blobs).with_context(|| format!("cannot create folder {}", blobs.display()))?;
            let (start, total) = match reply.status {
                200 => {
                    let len = reply.response.body().content_length().or(reply.linked_size);
                    (0, len)
                }
                206 if reply.range.is_some() => {
                    let cr = reply.header("content-range").and_then(|v| parse_content_range(&v));
                    match cr {
                        Some((s, total)) if Some(s) == reply.range => (s, total),
                        _ if !from_scratch => {
                            log::warn!("`{filename}` of `{id}`: unusable partial answer to a resumed download; starting over");
                            from_scratch = true;
                            continue;
                        }
                        _ => bail!("`{filename}` of `{id}`: the server answered a range request with an unexpected Content-Range ({url})"),
                    }
                }
                416 if reply.range.is_some() && !from_scratch => {
                    // The partial file is not a prefix the server can continue: start over.
                    from_scratch = true;
                    continue;
                }
                _ => return Err(self.status_error(&reply, kind, id, Some(commit), Some(filename))),
            };
            let expected_sha = is_sha256(&etag).then_some(etag.as_str());
            self.stream(&mut reply, id, filename, &part, &blob, start, total, expected_sha)?;
            return cache.link(commit, filename, &etag);
        }
    }

    /// The file in the private cache layout of earlier versions of tuner (`{tuner cache}/hub/
    /// {models|datasets}/{org}/{name}/{commit}/{file}`, `_` as the org of a bare name), if there.
    fn legacy_file(&self, kind: RepoKind, id: &RepoId, commit: &str, filename: &str) -> Option<PathBuf> {
        let (org, name) = id.full.split_once('/').unwrap_or(("_", &id.full));
        let mut p = self.config.tuner_cache_dir.join("hub").join(kind.plural()).join(org).join(name).join(commit);
        p.extend(filename.split('/'));
        p.is_file().then_some(p)
    }

    /// Write the body at `start` of `part`, check size and sha256, rename to `dest` (the blob).
    #[allow(clippy::too_many_arguments)]
    fn stream(
        &self,
        reply: &mut Reply,
        id: &RepoId,
        filename: &str,
        part: &Path,
        dest: &Path,
        start: u64,
        total: Option<u64>,
        expected_sha: Option<&str>,
    ) -> Result<()> {
        let mut hasher = Sha256::new();
        let mut file = if start == 0 {
            fs::File::create(part).with_context(|| format!("cannot create {}", part.display()))?
        } else {
            // Hash the bytes we already have, then append.
            if expected_sha.is_some() {
                let mut f = fs::File::open(part).with_context(|| format!("cannot open {}", part.display()))?;
                let mut prefix = (&mut f).take(start);
                std::io::copy(&mut prefix, &mut HashWriter(&mut hasher))
                    .with_context(|| format!("cannot read {}", part.display()))?;
            }
            let f = fs::OpenOptions::new()
                .append(true)
                .open(part)
                .with_context(|| format!("cannot open {}", part.display()))?;
            if f.metadata().map(|m| m.len()).unwrap_or(0) != start {
                bail!("{} changed while resuming; delete it and retry", part.display());
            }
            f
        };
        if start > 0 {
            log::info!("resuming `{filename}` of `{id}` at byte {start}");
        } else {
            log::info!("downloading `{filename}` of `{id}`");
        }

        let bar = self.progress_bar(filename, total, start);
        let mut written = start;
        let mut buf = vec![0u8; 256 << 10];
        let mut reader = reply.response.body_mut().as_reader();
        let interrupted = |written: u64, cause: String| {
            HubError::Interrupted {
            partial: part.to_path_buf(),
            message: format!(
                "download of `{filename}` from `{id}` was interrupted after {written}{} bytes ({cause}); run again to resume from {}",
                total.map(|t| format!(" of {t}")).unwrap_or_default(),
                part.display()
            ),
        }
        };
        loop {
            match reader.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    file.write_all(&buf[..n]).with_context(|| format!("cannot write {}", part.display()))?;
                    hasher.update(&buf[..n]);
                    written += n as u64;
                    bar.set_position(written);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    bar.abandon();
                    file.sync_data().ok();
                    return Err(interrupted(written, e.to_string()).into());
                }
            }
        }
        bar.finish();
        file.sync_all().with_context(|| format!("cannot write {}", part.display()))?;
        drop(file);

        if let Some(t) = total {
            if written < t {
                return Err(interrupted(written, "the connection closed early".into()).into());
            }
            if written > t {
                fs::remove_file(part).ok();
                bail!("download of `{filename}` from `{id}` got {written} bytes, more than the announced {t}; deleted it, run again");
            }
        }
        if let Some(expected) = expected_sha {
            let actual = hex::encode(hasher.finalize());
            if !actual.eq_ignore_ascii_case(expected) {
                fs::remove_file(part).ok();
                return Err(HubError::Checksum {
                    repo: id.full.clone(),
                    file: filename.to_string(),
                    expected: expected.to_string(),
                    actual,
                }
                .into());
            }
        }
        fs::rename(part, dest).with_context(|| format!("cannot rename {} to {}", part.display(), dest.display()))?;
        Ok(())
    }

    fn progress_bar(&self, filename: &str, total: Option<u64>, start: u64) -> Progress {
        if !self.config.progress {
            return Progress::hidden();
        }
        if !std::io::stderr().is_terminal() {
            let p = Progress::new(total.unwrap_or(0), &format!("download {filename}"), Unit::Bytes);
            p.set_position(start);
            return p;
        }
        let (bar, template) = match total {
            Some(t) => {
                (indicatif::ProgressBar::new(t), "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
            }
            None => (indicatif::ProgressBar::new_spinner(), "{spinner} {msg} {bytes} {bytes_per_sec}"),
        };
        if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message(filename.to_string());
        bar.set_position(start);
        Progress::from_bar(bar)
    }

    /// Every file of `revision` for which `allow(path)` holds, downloaded (or found in
    /// the cache). The result's files are sorted by repository path.
    pub fn snapshot(
        &self,
        kind: RepoKind,
        repo: &str,
        revision: &str,
        allow: &dyn Fn(&str) -> bool,
    ) -> Result<Snapshot> {
        let info = self.repo_info(kind, repo, revision)?;
        let names: Vec<String> = info.siblings.iter().map(|s| s.rfilename.clone()).filter(|n| allow(n)).collect();
        self.materialize(kind, repo, &info.sha, names)
    }

    fn materialize(&self, kind: RepoKind, repo: &str, commit: &str, names: Vec<String>) -> Result<Snapshot> {
        let id = RepoId::parse(repo)?;
        let dir = self.repo_cache(kind, &id).snapshot_dir(commit);
        let names: BTreeSet<String> = names.into_iter().collect();
        let mut files = Vec::with_capacity(names.len());
        for name in &names {
            check_rel_path("file name", name)?;
            files.push(self.ensure_file(kind, &id, commit, name)?);
        }
        Ok(Snapshot { commit: commit.to_string(), dir, files })
    }

    /// The files of a model repo tuner needs (see [`is_model_file`]). With a
    /// `model.safetensors.index.json`, only the shards it lists are taken (repos such as
    /// Mistral's also carry a `consolidated.safetensors` copy); else `model.safetensors`
    /// when present, else every top-level `.safetensors`.
    pub fn fetch_model(&self, repo: &str, revision: &str) -> Result<Snapshot> {
        let info = self.repo_info(RepoKind::Model, repo, revision)?;
        let names: BTreeSet<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
        if !names.contains("config.json") {
            bail!(
                "model `{repo}` at `{revision}` (commit {}) has no config.json; is it a transformers model repo?",
                info.sha
            );
        }
        let mut wanted: Vec<String> =
            names.iter().filter(|n| is_model_file(n) && !n.ends_with(".safetensors")).map(|n| n.to_string()).collect();

        const INDEX: &str = "model.safetensors.index.json";
        let weights: Vec<String> = if names.contains(INDEX) {
            let id = RepoId::parse(repo)?;
            let path = self.ensure_file(RepoKind::Model, &id, &info.sha, INDEX)?;
            let index: serde_json::Value = crate::util::read_json(&path)?;
            let map = index
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| anyhow!("{INDEX} of model `{repo}` has no `weight_map`"))?;
            let shards: BTreeSet<String> = map.values().filter_map(|v| v.as_str().map(str::to_string)).collect();
            for s in &shards {
                if !names.contains(s.as_str()) {
                    bail!(
                        "{INDEX} of model `{repo}` (commit {}) lists shard `{s}`, which is not in the repo",
                        info.sha
                    );
                }
            }
            shards.into_iter().collect()
        } else if names.contains("model.safetensors") {
            vec!["model.safetensors".to_string()]
        } else {
            names.iter().filter(|n| !n.contains('/') && n.ends_with(".safetensors")).map(|n| n.to_string()).collect()
        };
        if weights.is_empty() {
            let other: Vec<&str> = names
                .iter()
                .copied()
                .filter(|n| [".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack"].iter().any(|e| n.ends_with(e)))
                .collect();
            bail!(
                "model `{repo}` at `{revision}` (commit {}) has no .safetensors weights{}; tuner loads safetensors only",
                info.sha,
                if other.is_empty() { String::new() } else { format!(" (found: {})", other.join(", ")) }
            );
        }
        wanted.extend(weights);
        self.materialize(RepoKind::Model, repo, &info.sha, wanted)
    }

    /// The data files of one split of a dataset repo, downloaded, sorted by repository
    /// path. Files are picked by [`select_split_files`]; when none match, the hub's
    /// parquet conversion (`refs/convert/parquet`) is tried with
    /// [`select_converted_split_files`].
    pub fn fetch_dataset_split(
        &self,
        repo: &str,
        revision: &str,
        config: Option<&str>,
        split: &str,
    ) -> Result<Vec<PathBuf>> {
        if split.is_empty() || split.contains(['/', '*', '\\']) {
            bail!("invalid split name `{split}`");
        }
        if let Some(c) = config {
            if c.is_empty() || c.contains(['/', '*', '\\']) {
                bail!("invalid dataset config name `{c}`");
            }
        }
        let info = self.repo_info(RepoKind::Dataset, repo, revision)?;
        let names: Vec<&str> = info.siblings.iter().map(|s| s.rfilename.as_str()).collect();
        let chosen = select_split_files(&names, config, split);
        if !chosen.is_empty() {
            return Ok(self.materialize(RepoKind::Dataset, repo, &info.sha, chosen)?.files);
        }

        let what = match config {
            Some(c) => format!("split `{split}` (config `{c}`)"),
            None => format!("split `{split}`"),
        };
        let listing = {
            let shown: Vec<&str> = names.iter().copied().take(20).collect();
            let more = names.len().saturating_sub(shown.len());
            format!("{}{}", shown.join(", "), if more > 0 { format!(", … ({more} more)") } else { String::new() })
        };
        let converted = match self.repo_info(RepoKind::Dataset, repo, PARQUET_CONVERSION_REVISION) {
            Ok(c) => c,
            Err(e) => {
                return Err(anyhow!(
                    "dataset `{repo}` at `{revision}` (commit {}) has no data files for {what}; files: [{listing}]; \
                     its parquet conversion ({PARQUET_CONVERSION_REVISION}) is not available either: {e:#}",
                    info.sha
                ))
            }
        };
        let conv_names: Vec<&str> = converted.siblings.iter().map(|s| s.rfilename.as_str()).collect();
        let chosen = select_converted_split_files(&conv_names, config, split);
        if chosen.is_empty() {
            bail!(
                "dataset `{repo}` has no data files for {what}, neither at `{revision}` (files: [{listing}]) \
                 nor in its parquet conversion {PARQUET_CONVERSION_REVISION} (commit {})",
                converted.sha
            );
        }
        log::info!("dataset `{repo}`: {what} taken from its parquet conversion ({PARQUET_CONVERSION_REVISION})");
        Ok(self.materialize(RepoKind::Dataset, repo, &converted.sha, chosen)?.files)
    }

    /// GET `url`, following up to [`MAX_REDIRECTS`] redirects by hand: the token goes
    /// only to the endpoint's own origin (never to a CDN). The first request carries no
    /// `Range`; at the first redirect that follows an answer naming the ETag (or that
    /// leaves the endpoint), `next` decides whether to go on, and from which byte.
    fn get(&self, url: &str, next: &dyn Fn(Option<&str>) -> Hop) -> std::result::Result<Reply, ureq::Error> {
        let endpoint = url_origin(&self.config.endpoint);
        let mut current = url.to_string();
        let mut etag: Option<String> = None;
        let mut linked_etag: Option<String> = None;
        let mut linked_size: Option<u64> = None;
        let mut range: Option<u64> = None;
        let mut decided = false;
        let mut hop = 0;
        loop {
            let own_origin = endpoint.is_some() && url_origin(&current) == endpoint;
            let mut req = self.agent.get(current.as_str());
            if let (Some(token), true) = (&self.config.token, own_origin) {
                req = req.header("Authorization", format!("Bearer {token}"));
            }
            if let Some(off) = range {
                req = req.header("Range", format!("bytes={off}-"));
            }
            log::debug!("GET {current}{}", range.map(|o| format!(" (from byte {o})")).unwrap_or_default());
            let response = req.call()?;
            let status = response.status().as_u16();
            if linked_etag.is_none() {
                linked_etag = header(&response, "x-linked-etag").map(|e| clean_etag(&e));
            }
            if etag.is_none() && own_origin {
                etag = header(&response, "etag").map(|e| clean_etag(&e));
            }
            if linked_size.is_none() {
                linked_size = header(&response, "x-linked-size").and_then(|s| s.parse().ok());
            }
            let location = header(&response, "location");
            let known = linked_etag.clone().or(etag.clone());
            let reply =
                |response, current| Reply { status, url: current, response, etag: known.clone(), linked_size, range };
            match (status, location) {
                (301 | 302 | 303 | 307 | 308, Some(loc)) if hop < MAX_REDIRECTS => {
                    let target = join_url(&current, &loc).map_err(|e| ureq::Error::BadUri(e.to_string()))?;
                    if !decided && (known.is_some() || url_origin(&target) != endpoint) {
                        decided = true;
                        match next(known.as_deref()) {
                            Hop::Stop => return Ok(reply(response, current)),
                            Hop::Follow(r) => range = r,
                        }
                    }
                    current = target;
                    hop += 1;
                }
                (301 | 302 | 303 | 307 | 308, Some(_)) => return Err(ureq::Error::TooManyRedirects),
                _ => return Ok(reply(response, current)),
            }
        }
    }

    /// The error for a request that got no HTTP answer.
    fn unreachable(
        &self,
        err: ureq::Error,
        kind: RepoKind,
        id: &RepoId,
        revision: Option<&str>,
        url: &str,
    ) -> anyhow::Error {
        let cached = revision.and_then(|r| self.cached_commit(kind, id, r).map(|c| (r, c)));
        let hint = match cached {
            Some((r, c)) => format!(
                "; {kind} `{id}` at `{r}` is in the cache (commit {c}): set HF_HUB_OFFLINE=1 to use it without network access"
            ),
            None => "; check the network connection and HF_ENDPOINT".to_string(),
        };
        HubError::Unreachable {
            endpoint: self.config.endpoint.clone(),
            message: format!("cannot reach the hub at {} (GET {url}): {err}{hint}", self.config.endpoint),
        }
        .into()
    }

    /// The error for an HTTP answer that is not the one wanted.
    fn status_error(
        &self,
        reply: &Reply,
        kind: RepoKind,
        id: &RepoId,
        revision: Option<&str>,
        file: Option<&str>,
    ) -> anyhow::Error {
        let status = reply.status;
        let url = &reply.url;
        let code = reply.header("x-error-code").unwrap_or_default();
        let hub_says = reply.header("x-error-message").map(|m| format!(" (hub: {m})")).unwrap_or_default();
        let rev = revision.map(|r| format!(" at `{r}`")).unwrap_or_default();
        let target = match file {
            Some(f) => format!("file `{f}` of {kind} `{id}`{rev}"),
            None => format!("{kind} `{id}`{rev}"),
        };
        let message = match status {
            401 | 403 => {
                let why = if code == "GatedRepo" {
                    format!("`{id}` is a gated repo: accept its conditions at {}/{}{id}", self.config.endpoint, kind.url_prefix())
                } else {
                    format!("`{id}` is private or gated (or does not exist)")
                };
                let fix = if self.config.token.is_some() {
                    "the token in HF_TOKEN was rejected or has no access to it; check the token and that its account was granted access"
                } else {
                    "no token is set: set HF_TOKEN (or HUGGING_FACE_HUB_TOKEN) to an access token of an account that has access"
                };
                format!("HTTP {status} for {target} ({url}): {why}; {fix}{hub_says}")
            }
            404 => {
                let what = match code.as_str() {
                    "RepoNotFound" => format!(
                        "{kind} repository `{id}` not found (check the name; a private repo also needs HF_TOKEN)"
                    ),
                    "RevisionNotFound" => format!("revision `{}` of {kind} `{id}` not found", revision.unwrap_or("?")),
                    "EntryNotFound" => format!("{target} not found"),
                    _ => format!("not found: {target} (the repo, the revision or the file does not exist)"),
                };
                format!("HTTP 404 ({url}): {what}{hub_says}")
            }
            429 => format!("HTTP 429 for {target} ({url}): rate limited by the hub; wait and retry (a token in HF_TOKEN raises the limit){hub_says}"),
            500..=599 => format!("HTTP {status} for {target} ({url}): the hub had a server error; retry later{hub_says}"),
            _ => format!("HTTP {status} for {target} ({url}){hub_says}"),
        };
        HubError::Status { status, url: url.clone(), message }.into()
    }
}

/// Put `old` (a file of tuner's old private cache) in place as `blob` when its bytes hash to
/// `sha256`, by a hard link (no copy, and the old cache can be deleted) or else a copy,
/// through a temp name. Returns whether it did.
fn reuse_legacy(old: &Path, blob: &Path, sha256: &str) -> Result<bool> {
    let actual = crate::util::sha256_file(old)?;
    if !actual.eq_ignore_ascii_case(sha256) {
        log::warn!("{} differs from the hub's file (sha256 {actual}, not {sha256}); downloading it", old.display());
        return Ok(false);
    }
    let dir = blob.parent().context("a blob path has a parent")?;
    fs::create_dir_all(dir).with_context(|| format!("cannot create folder {}", dir.display()))?;
    let tmp = crate::util::temp_path(blob);
    let _ = fs::remove_file(&tmp);
    if fs::hard_link(old, &tmp).is_err() {
        fs::copy(old, &tmp).with_context(|| format!("cannot copy {} to {}", old.display(), tmp.display()))?;
    }
    fs::rename(&tmp, blob).with_context(|| format!("cannot rename {} to {}", tmp.display(), blob.display()))?;
    log::info!("reused {} from tuner's old cache as {}", old.display(), blob.display());
    Ok(true)
}

/// Feeds written bytes to a hasher.
struct HashWriter<'a>(&'a mut Sha256);

impl Write for HashWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}
