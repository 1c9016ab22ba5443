//! Fetch stage: make the base model and the dataset files available locally,
//! validated and hashed.
//!
//! - A local HF folder is checked in place (config.json, tokenizer.json, single
//!   or sharded safetensors) and hashed.
//! - A `.gguf` file is imported into an HF-layout folder under `fetch/model/`.
//! - `hf:ORG/NAME` is downloaded through the hub client into the Hugging Face hub cache.
//!
//! Writes `model.json` and `data.json`, which the later stages read.

use crate::hub::HubClient;
use crate::pipeline::{self, RunContext, Stage};
use crate::recipe::Source;
use crate::util;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The fetch stage.
pub struct Fetch;

/// `fetch/model.json`: where the model is and what it is.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelRecord {
    /// "local", "gguf" or "hub".
    pub kind: String,
    /// The HF-layout folder the later stages load.
    pub dir: PathBuf,
    /// `model_type` from config.json.
    pub model_type: String,
    /// Hub commit, for hub sources.
    pub commit: Option<String>,
    /// sha256 of each file in `dir` that the model uses (and of the GGUF file).
    pub files: BTreeMap<String, String>,
}

/// One dataset file.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DataFile {
    pub path: PathBuf,
    pub sha256: String,
}

/// `fetch/data.json`: the dataset files, train and (optionally) eval.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DataRecord {
    pub train: Vec<DataFile>,
    pub eval: Vec<DataFile>,
    /// With `[[dataset.sources]]`: the files of each source, in recipe order (`train` is all of them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sources: Vec<Vec<DataFile>>,
}

/// Read `fetch/model.json` of a run.
pub fn model_record(ctx: &RunContext) -> Result<ModelRecord> {
    util::read_json(&ctx.stage_dir("fetch").join("model.json"))
}

/// The base model of a recipe for `tuner plan`: a local folder or `.gguf` file as the recipe
/// names it, or for a hub source the folder this run's fetch stage downloaded.
pub fn model_path(l: &crate::recipe::Loaded, run_dir: &Path) -> Result<PathBuf> {
    match l.source(&l.recipe.model.source) {
        Source::Local(p) => Ok(p),
        Source::Hub { repo } => util::read_json::<ModelRecord>(&run_dir.join("fetch").join("model.json"))
            .map(|m| m.dir)
            .with_context(|| {
                format!("the shape of `{repo}` is known once it is fetched: run `tuner run RECIPE --until fetch` first")
            }),
    }
}

/// Read `fetch/data.json` of a run.
pub fn data_record(ctx: &RunContext) -> Result<DataRecord> {
    util::read_json(&ctx.stage_dir("fetch").join("data.json"))
}

/// Files of a local dataset source: the file itself, or the supported files in a folder (sorted).
pub fn local_data_files(p: &Path) -> Result<Vec<PathBuf>> {
    if p.is_file() {
        return Ok(vec![p.to_path_buf()]);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(p)
        .with_context(|| format!("cannot list {}", p.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|f| f.is_file() && crate::recipe::data_file_kind(f).is_some())
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{} holds no .{} files", p.display(), crate::recipe::validate::DATA_EXTENSIONS.join("/."));
    }
    Ok(files)
}

/// Check an HF model folder: config.json with a model_type, a loadable
/// tokenizer.json, and complete safetensors (single, or sharded with an index).
/// Returns the model_type and the files the model uses.
pub fn validate_model_dir(dir: &Path) -> Result<(String, Vec<String>)> {
    let cfg_path = dir.join("config.json");
    let cfg: serde_json::Value = util::read_json(&cfg_path)?;
    // Multimodal checkpoints (Gemma 3/3n) keep the decoder's type in text_config.
    let model_type = cfg
        .get("model_type")
        .and_then(|v| v.as_str())
        .with_context(|| format!("{}: no `model_type`; is this an HF model folder?", cfg_path.display()))?
        .to_string();
    let mut files = vec!["config.json".to_string()];
    let tok = dir.join("tokenizer.json");
    if !tok.is_file() {
        bail!(
            "{} has no tokenizer.json; export the fast tokenizer with transformers (`tokenizer.save_pretrained`)",
            dir.display()
        );
    }
    tokenizers::Tokenizer::from_file(&tok)
        .map_err(|e| anyhow::anyhow!("{}: cannot load tokenizer: {e}", tok.display()))?;
    files.push("tokenizer.json".into());
    for extra in ["tokenizer_config.json", "generation_config.json", "special_tokens_map.json", "tokenizer.model"] {
        if dir.join(extra).is_file() {
            files.push(extra.into());
        }
    }
    let index = dir.join("model.safetensors.index.json");
    let shards: Vec<String> = if index.is_file() {
        let idx: serde_json::Value = util::read_json(&index)?;
        let map = idx
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{}: no `weight_map`", index.display()))?;
        let mut s: Vec<String> = map.values().filter_map(|v| v.as_str().map(str::to_string)).collect();
        s.sort();
        s.dedup();
        files.push("model.safetensors.index.json".into());
        s
    } else if dir.join("model.safetensors").is_file() {
        vec!["model.safetensors".into()]
    } else {
        bail!("{} has no model.safetensors or model.safetensors.index.json", dir.display());
    };
    for shard in &shards {
        let p = dir.join(shard);
        check_safetensors_header(&p)?;
        files.push(shard.clone());
    }
    Ok((model_type, files))
}

/// Read a safetensors header and check that the data section is as long as it says.
pub fn check_safetensors_header(p: &Path) -> Result<()> {
    use std::io::Read;
    let mut f = std::fs::File::open(p).with_context(|| format!("missing safetensors shard {}", p.display()))?;
    let len = f.metadata()?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).with_context(|| format!("{}: truncated safetensors file", p.display()))?;
    let hlen = u64::from_le_bytes(n);
    if hlen > len.saturating_sub(8) || hlen > 100 << 20 {
        bail!("{}: corrupt safetensors header (length {hlen})", p.display());
    }
    let mut h = vec![0u8; hlen as usize];
    f.read_exact(&mut h)?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&h).with_context(|| format!("{}: safetensors header is not JSON", p.display()))?;
    let end = header
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .filter_map(|(_, v)| v.get("data_offsets").and_then(|o| o.get(1)).and_then(|e| e.as_u64()))
        .max()
        .unwrap_or(0);
    if 8 + hlen + end > len {
        bail!("{}: truncated: the header needs {} bytes of data, the file has {}", p.display(), end, len - 8 - hlen);
    }
    Ok(())
}

fn hash_files(dir: &Path, names: &[String], cache: &mut util::HashCache) -> Result<BTreeMap<String, String>> {
    names.iter().map(|n| Ok((n.clone(), cache.sha256(&dir.join(n))?))).collect()
}

/// Which hub split of a dataset: split name, config, revision.
struct HubPick<'a> {
    split: &'a str,
    config: &'a str,
    revision: &'a str,
}

impl<'a> HubPick<'a> {
    /// `[dataset]`'s own keys, with the split `split`.
    fn of(d: &'a crate::recipe::DatasetSection, split: &'a str) -> HubPick<'a> {
        HubPick { split, config: &d.config, revision: &d.revision }
    }

    /// A `[[dataset.sources]]` entry, with `[dataset]`'s keys where it leaves them unset.
    fn entry(d: &'a crate::recipe::DatasetSection, e: &'a crate::recipe::SourceEntry) -> HubPick<'a> {
        HubPick {
            split: e.split.as_ref().map_or(&d.split.name, |s| &s.name),
            config: e.config.as_deref().unwrap_or(&d.config),
            revision: e.revision.as_deref().unwrap_or(&d.revision),
        }
    }
}

fn data_files(
    ctx: &RunContext,
    source: &str,
    pick: &HubPick,
    hub: &HubClient,
    cache: &mut util::HashCache,
) -> Result<Vec<DataFile>> {
    let paths = match ctx.recipe.source(source) {
        Source::Local(p) => local_data_files(&p)?.into_iter().map(|p| std::fs::canonicalize(&p).unwrap_or(p)).collect(),
        // Hub files stay at their snapshot path: canonicalizing would follow the symlink to
        // `blobs/{etag}`, which has no file extension.
        Source::Hub { repo } => {
            let config = Some(pick.config).filter(|c| !c.is_empty());
            hub.fetch_dataset_split(&repo, pick.revision, config, pick.split)?
        }
    };
    paths.into_iter().map(|p| Ok(DataFile { sha256: cache.sha256(&p)?, path: p })).collect::<Result<Vec<_>>>()
}

impl Stage for Fetch {
    fn name(&self) -> &'static str {
        "fetch"
    }

    fn inputs(&self, ctx: &RunContext) -> Result<serde_json::Value> {
        let r = &ctx.recipe.recipe;
        let mut cache = util::HashCache::open(&ctx.run_dir.join(".hashes.json"));
        let mut local = BTreeMap::new();
        // Local inputs are fingerprinted by content; hub inputs by repo and revision.
        match ctx.recipe.source(&r.model.source) {
            Source::Local(p) if p.is_file() => {
                local.insert("model".to_string(), cache.sha256(&p)?);
            }
            Source::Local(p) => {
                let (_, files) = validate_model_dir(&p)?;
                for (k, v) in hash_files(&p, &files, &mut cache)? {
                    local.insert(format!("model/{k}"), v);
                }
            }
            Source::Hub { .. } => {}
        }
        let d = &r.dataset;
        let entries = d.sources.iter().enumerate().map(|(i, e)| (format!("sources[{i}]"), &e.source));
        let named = [("dataset".to_string(), &d.source), ("eval_dataset".to_string(), &d.eval_source)];
        for (key, src) in named.into_iter().chain(entries) {
            if let (false, Source::Local(p)) = (src.is_empty(), ctx.recipe.source(src)) {
                for f in local_data_files(&p)? {
                    let name = f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                    local.insert(format!("{key}/{name}"), cache.sha256(&f)?);
                }
            }
        }
        cache.save();
        let mut dataset = serde_json::json!({
            "source": d.source, "eval_source": d.eval_source,
            "split": d.split, "config": d.config, "revision": d.revision,
        });
        // Keys added later go in only when set, so that older runs keep their fingerprints.
        if let Some(s) = &d.eval_split {
            dataset["eval_split"] = serde_json::json!(s);
        }
        if !d.sources.is_empty() {
            dataset["sources"] = serde_json::to_value(&d.sources)?;
        }
        Ok(serde_json::json!({
            "model": { "source": r.model.source, "revision": r.model.revision },
            "dataset": dataset,
            "local_files": local,
        }))
    }

    fn run(&self, ctx: &RunContext, dir: &Path, _fingerprint: &str) -> Result<Vec<PathBuf>> {
        let r = &ctx.recipe.recipe;
        let hub = HubClient::new(ctx.hub.clone());
        let mut cache = util::HashCache::open(&ctx.run_dir.join(".hashes.json"));
        let mut artifacts = vec![];

        let model = match ctx.recipe.source(&r.model.source) {
            Source::Local(p) if p.extension().is_some_and(|e| e == "gguf") => {
                let out = dir.join("model");
                crate::gguf::import::import_gguf(&p, &out).with_context(|| format!("cannot import {}", p.display()))?;
                let (model_type, files) = validate_model_dir(&out)?;
                let mut hashes = hash_files(&out, &files, &mut cache)?;
                hashes.insert(format!("source:{}", p.display()), cache.sha256(&p)?);
                artifacts.extend(files.iter().map(|f| PathBuf::from("model").join(f)));
                ModelRecord {
                    kind: "gguf".into(),
                    dir: std::fs::canonicalize(&out)?,
                    model_type,
                    commit: None,
                    files: hashes,
                }
            }
            Source::Local(p) => {
                let (model_type, files) = validate_model_dir(&p)?;
                let hashes = hash_files(&p, &files, &mut cache)?;
                ModelRecord {
                    kind: "local".into(),
                    dir: std::fs::canonicalize(&p)?,
                    model_type,
                    commit: None,
                    files: hashes,
                }
            }
            Source::Hub { repo } => {
                let snap = hub.fetch_model(&repo, &r.model.revision)?;
                let (model_type, files) = validate_model_dir(&snap.dir)?;
                let hashes = hash_files(&snap.dir, &files, &mut cache)?;
                ModelRecord {
                    kind: "hub".into(),
                    dir: snap.dir.clone(),
                    model_type,
                    commit: Some(snap.commit.clone()),
                    files: hashes,
                }
            }
        };
        ctx.check_interrupted("fetch stopped")?;
        let d = &r.dataset;
        let mut sources = vec![];
        for e in &d.sources {
            sources.push(data_files(ctx, &e.source, &HubPick::entry(d, e), &hub, &mut cache)?);
        }
        let eval_split = d.eval_split.as_ref().map_or(&d.split.name, |s| &s.name);
        let data = DataRecord {
            train: if sources.is_empty() {
                data_files(ctx, &d.source, &HubPick::of(d, &d.split.name), &hub, &mut cache)?
            } else {
                sources.concat()
            },
            eval: if d.eval_source.is_empty() {
                vec![]
            } else {
                data_files(ctx, &d.eval_source, &HubPick::of(d, eval_split), &hub, &mut cache)?
            },
            sources,
        };
        cache.save();
        util::write_json_atomic(&dir.join("model.json"), &model)?;
        util::write_json_atomic(&dir.join("data.json"), &data)?;
        pipeline::record(
            &ctx.run_dir,
            "fetch",
            serde_json::json!({
                "model": { "kind": model.kind, "dir": model.dir, "commit": model.commit, "files": model.files },
                "dataset": data,
            }),
        )?;
        artifacts.push("model.json".into());
        artifacts.push("data.json".into());
        Ok(artifacts)
    }
}
