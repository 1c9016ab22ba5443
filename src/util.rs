//! Small file helpers shared by every stage: atomic writes (temp file, fsync,
//! rename), sha256 of files and bytes.

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// The temp path used while `path` is being written: same folder, so rename is atomic.
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp.{}", std::process::id()))
}

/// Write `bytes` to `path` atomically: a reader sees the old file or the whole new one.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create folder {}", dir.display()))?;
    }
    let tmp = temp_path(path);
    let mut f = fs::File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(bytes).with_context(|| format!("cannot write {}", tmp.display()))?;
    f.sync_all().ok();
    drop(f);
    fs::rename(&tmp, path).with_context(|| format!("cannot rename {} to {}", tmp.display(), path.display()))?;
    Ok(())
}

/// Serialize `value` as pretty JSON and write it atomically.
pub fn write_json_atomic<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut s = serde_json::to_string_pretty(value)?;
    s.push('\n');
    write_atomic(path, s.as_bytes())
}

/// Read and parse a JSON file, naming the file in any error.
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let s = fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&s).with_context(|| format!("{}: invalid JSON", path.display()))
}

/// Hex sha256 of a byte slice.
pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Hex sha256 of a file's contents, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// sha256 of files, remembered by (path, size, mtime) so that unchanged large
/// files are not read again on every run.
pub struct HashCache {
    path: PathBuf,
    entries: std::collections::BTreeMap<String, (u64, i128, String)>,
    dirty: bool,
}

impl HashCache {
    /// Open (or start) the cache stored at `path`.
    pub fn open(path: &Path) -> HashCache {
        let entries = read_json(path).unwrap_or_default();
        HashCache { path: path.to_path_buf(), entries, dirty: false }
    }

    /// The file's sha256, from the cache when its size and mtime are unchanged.
    pub fn sha256(&mut self, file: &Path) -> Result<String> {
        let meta = fs::metadata(file).with_context(|| format!("cannot read {}", file.display()))?;
        let mtime = meta
            .modified()
            .ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_nanos() as i128)
            .unwrap_or(-1);
        let key = fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf()).display().to_string();
        if let Some((size, t, h)) = self.entries.get(&key) {
            if *size == meta.len() && *t == mtime {
                return Ok(h.clone());
            }
        }
        let h = sha256_file(file)?;
        self.entries.insert(key, (meta.len(), mtime, h.clone()));
        self.dirty = true;
        Ok(h)
    }

    /// Write the cache back (best effort: it is only a cache).
    pub fn save(&mut self) {
        if self.dirty && write_json_atomic(&self.path, &self.entries).is_ok() {
            self.dirty = false;
        }
    }
}

/// The libtorch version tch was built against.
pub fn libtorch_version() -> String {
    let dir = option_env!("TUNER_LIBTORCH_DIR").unwrap_or("");
    let version_file = Path::new(dir).join("../version.py");
    std::fs::read_to_string(version_file)
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("__version__")).map(|l| l.split('\'').nth(1).unwrap_or("").to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}
