//! One repository's folder in the Hugging Face hub cache, in the layout `huggingface_hub`
//! reads and writes (its `file_download.py`: `repo_folder_name`, `hf_hub_download`,
//! `_create_symlink`, `_cache_commit_hash_for_specific_revision`; `try_to_load_from_cache`),
//! so that transformers, vLLM and tuner share one copy of every file:
//!
//! ```text
//! {cache}/{models|datasets}--{org}--{name}/
//!     blobs/{etag}                the bytes, named by the hub's ETag of the file: the sha256
//!                                 for LFS files (`X-Linked-Etag`), the git blob sha1 for others
//!     blobs/{etag}.incomplete     a download in progress, resumed with `Range`
//!     refs/{revision}             the commit a branch or tag last resolved to, no newline
//!                                 (`refs/convert/parquet` nests: `refs/refs/convert/parquet`)
//!     snapshots/{commit}/{path}   a relative symlink to `../../blobs/{etag}` (one more `../`
//!                                 per folder level of `path`)
//!     .tuner/{commit}.json        tuner's own record of the commit's file list (optional)
//! ```
//!
//! huggingface_hub's own extras (`.no_exist/`, `trees/`, `{cache}/.locks/`) are neither
//! needed nor written. A cache without `.tuner/` (written by huggingface_hub) is read
//! through `refs/` and the snapshot folder alone. Every write is atomic (temp + rename).

use anyhow::{Context, Result};
use std::fs;
use std::path::{Path, PathBuf};

use super::{is_commit_sha, RepoInfo, Sibling};

/// The folder of one repository in the cache; only paths, nothing is read until asked.
#[derive(Debug, Clone)]
pub(crate) struct RepoCache {
    dir: PathBuf,
}

impl RepoCache {
    /// `{root}/{plural}--{org}--{name}`: huggingface_hub's `repo_folder_name`, every `/` of
    /// the repo id replaced by `--`.
    pub(crate) fn new(root: &Path, plural: &str, repo_id: &str) -> RepoCache {
        RepoCache { dir: root.join(format!("{plural}--{}", repo_id.replace('/', "--"))) }
    }

    /// The repository's folder.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// `refs/{revision}`, one folder level per `/` of the revision.
    pub(crate) fn ref_path(&self, revision: &str) -> PathBuf {
        let mut p = self.dir.join("refs");
        p.extend(revision.split('/'));
        p
    }

    /// The commit `refs/{revision}` holds, if it holds a full sha (surrounding whitespace is
    /// ignored: huggingface_hub writes none, hand-made files may end with a newline).
    pub(crate) fn read_ref(&self, revision: &str) -> Option<String> {
        let text = fs::read_to_string(self.ref_path(revision)).ok()?;
        let sha = text.trim();
        is_commit_sha(sha).then(|| sha.to_string())
    }

    /// Record that `revision` points to `commit`, as huggingface_hub does: the bare sha, no
    /// newline; rewritten only when it changed. The commit's snapshot folder is created too,
    /// since `huggingface_hub`'s cache scan treats a ref to a missing snapshot as corruption.
    pub(crate) fn write_ref(&self, revision: &str, commit: &str) -> Result<()> {
        let snapshot = self.snapshot_dir(commit);
        fs::create_dir_all(&snapshot).with_context(|| format!("cannot create folder {}", snapshot.display()))?;
        if revision == commit || self.read_ref(revision).as_deref() == Some(commit) {
            return Ok(());
        }
        crate::util::write_atomic(&self.ref_path(revision), commit.as_bytes())
    }

    /// `snapshots/{commit}`.
    pub(crate) fn snapshot_dir(&self, commit: &str) -> PathBuf {
        self.dir.join("snapshots").join(commit)
    }

    /// `snapshots/{commit}/{file}`: where a file of a commit is read from.
    pub(crate) fn pointer(&self, commit: &str, file: &str) -> PathBuf {
        let mut p = self.snapshot_dir(commit);
        p.extend(file.split('/'));
        p
    }

    /// `blobs/{etag}`.
    pub(crate) fn blob(&self, etag: &str) -> PathBuf {
        self.dir.join("blobs").join(etag)
    }

    /// `blobs/{etag}.incomplete`: the partial download of a blob.
    pub(crate) fn partial(&self, etag: &str) -> PathBuf {
        self.dir.join("blobs").join(format!("{etag}.incomplete"))
    }

    fn listing_path(&self, commit: &str) -> PathBuf {
        self.dir.join(".tuner").join(format!("{commit}.json"))
    }

    /// tuner's recorded file list of `commit`, if there is one and it is for that commit.
    pub(crate) fn read_listing(&self, commit: &str) -> Option<RepoInfo> {
        let text = fs::read_to_string(self.listing_path(commit)).ok()?;
        serde_json::from_str::<RepoInfo>(&text).ok().filter(|i| i.sha == commit)
    }

    /// Record the file list of a commit (commits never change, so it stays true).
    pub(crate) fn write_listing(&self, info: &RepoInfo) -> Result<()> {
        crate::util::write_json_atomic(&self.listing_path(&info.sha), info)
    }

    /// The files present in `snapshots/{commit}` (links whose blob is missing, and
    /// `.incomplete` files, do not count), sorted; `None` when the folder does not exist.
    pub(crate) fn list_snapshot(&self, commit: &str) -> Result<Option<Vec<Sibling>>> {
        let dir = self.snapshot_dir(commit);
        if !dir.is_dir() {
            return Ok(None);
        }
        let mut out = Vec::new();
        list_files(&dir, "", &mut out)?;
        out.sort_by(|a, b| a.rfilename.cmp(&b.rfilename));
        Ok(Some(out))
    }

    /// Point `snapshots/{commit}/{file}` at `blobs/{etag}` with a relative symlink (a copy
    /// of the blob where symlinks do not exist), replacing whatever was there atomically.
    /// Returns the pointer's path.
    pub(crate) fn link(&self, commit: &str, file: &str, etag: &str) -> Result<PathBuf> {
        let pointer = self.pointer(commit, file);
        let parent = pointer.parent().context("a pointer path has a parent")?;
        fs::create_dir_all(parent).with_context(|| format!("cannot create folder {}", parent.display()))?;
        let tmp = crate::util::temp_path(&pointer);
        let _ = fs::remove_file(&tmp);
        make_link(&self.blob(etag), &relative_blob_target(file, etag), &tmp)?;
        fs::rename(&tmp, &pointer)
            .with_context(|| format!("cannot rename {} to {}", tmp.display(), pointer.display()))?;
        Ok(pointer)
    }
}

/// The symlink target from `snapshots/{commit}/{file}` to `blobs/{etag}`: `../../blobs/{etag}`
/// plus one `../` per folder in `file`.
pub(crate) fn relative_blob_target(file: &str, etag: &str) -> PathBuf {
    let depth = file.matches('/').count();
    let mut p = PathBuf::new();
    for _ in 0..depth + 2 {
        p.push("..");
    }
    p.join("blobs").join(etag)
}

#[cfg(unix)]
fn make_link(_blob: &Path, target: &Path, at: &Path) -> Result<()> {
    std::os::unix::fs::symlink(target, at)
        .with_context(|| format!("cannot create the symlink {} -> {}", at.display(), target.display()))
}

#[cfg(not(unix))]
fn make_link(blob: &Path, _target: &Path, at: &Path) -> Result<()> {
    // huggingface_hub's fallback where symlinks are unavailable: a copy of the blob.
    fs::copy(blob, at).map(|_| ()).with_context(|| format!("cannot copy {} to {}", blob.display(), at.display()))
}

/// Whether `name` is a temp file of [`crate::util::temp_path`] (`.{name}.tmp.{pid}`).
fn is_temp_name(name: &str) -> bool {
    name.starts_with('.')
        && name.rsplit_once(".tmp.").is_some_and(|(_, pid)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()))
}

/// Every readable file under `dir` (following symlinks; not `.incomplete` ones), as
/// repository paths with their sizes.
fn list_files(dir: &Path, prefix: &str, out: &mut Vec<Sibling>) -> Result<()> {
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let rel = if prefix.is_empty() { name.clone() } else { format!("{prefix}/{name}") };
        // fs::metadata follows the snapshot's symlinks; a dangling one (blob deleted) is skipped.
        let Ok(meta) = fs::metadata(entry.path()) else { continue };
        if meta.is_dir() {
            list_files(&entry.path(), &rel, out)?;
        } else if !name.ends_with(".incomplete") && !is_temp_name(&name) {
            out.push(Sibling { rfilename: rel, size: Some(meta.len()) });
        }
    }
    Ok(())
}
