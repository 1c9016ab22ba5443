//! Recipes: TOML → [`Recipe`], validated once by [`load`].
//!
//! `load` reads the file with spans (toml_edit) so that every message can name
//! its line, applies `--set section.key=value` overrides, then runs all checks
//! in `validate` and reports every problem at once.

pub mod aliases;
pub mod dataset;
pub mod diagnostic;
pub mod prompt;
pub mod schema;
pub mod validate;

pub use dataset::{data_file_kind, DataFormat, SourceEntry, SplitSpec, DEFAULT_TEXT_FIELD};
pub use prompt::{parse_format, Piece, PromptTemplate};
pub use schema::*;
pub use validate::{classify_source, Diagnostic, Source};

use crate::error::Failure;
use std::path::{Path, PathBuf};

/// A validated recipe and where it came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The recipe with every default filled in (and `run.name` set).
    pub recipe: Recipe,
    /// The recipe file as given on the command line.
    pub path: PathBuf,
    /// The folder relative paths resolve against.
    pub dir: PathBuf,
    /// The `--set KEY=VALUE` overrides applied on top of the file, in order.
    pub overrides: Vec<String>,
    /// What the recipe leaves out that a user may not expect, located (not errors).
    pub warnings: Vec<Diagnostic>,
}

impl Loaded {
    /// Resolve a local path written in the recipe against the recipe's folder.
    pub fn resolve(&self, p: &str) -> PathBuf {
        self.dir.join(p)
    }

    /// Classify a `source` string of this recipe.
    pub fn source(&self, s: &str) -> Source {
        classify_source(s, &self.dir)
    }

    /// The default run dir: `<recipe dir>/<run.output_dir>/<run.name>`.
    pub fn default_run_dir(&self) -> PathBuf {
        self.dir.join(&self.recipe.run.output_dir).join(&self.recipe.run.name)
    }

    /// The resolved recipe as TOML (every default written out).
    pub fn resolved_toml(&self) -> String {
        toml::to_string(&self.recipe).unwrap_or_default()
    }
}

/// All problems in one recipe; Display lists one per line.
#[derive(Debug)]
pub struct RecipeErrors(pub Vec<Diagnostic>);

impl std::fmt::Display for RecipeErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let n = self.0.len();
        writeln!(f, "invalid recipe ({n} problem{}):", if n == 1 { "" } else { "s" })?;
        for d in &self.0 {
            writeln!(f, "  {d}")?;
        }
        Ok(())
    }
}

/// toml_edit's message, with the key named where it leaves it out (a duplicate key).
fn toml_problem(src: &str, msg: &str, span: Option<std::ops::Range<usize>>) -> String {
    let Some(span) = span.filter(|_| msg.starts_with("duplicate key")) else { return msg.to_string() };
    let key = src.get(span.clone()).unwrap_or("").trim().trim_matches('"');
    if key.is_empty() || msg.contains(key) {
        return msg.to_string();
    }
    // The section: the last `[name]` header before the key.
    let section = src[..span.start.min(src.len())]
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| l.starts_with('[') && l.ends_with(']'))
        .map(|l| format!("{}.", l.trim_matches(|c| c == '[' || c == ']').trim()))
        .unwrap_or_default();
    let first = src[..span.start.min(src.len())].rfind(&format!("\n{key}")).map(|o| line_of(src, o + 1));
    let earlier = first.map(|l| format!(" (first set on line {l})")).unwrap_or_default();
    format!("duplicate key `{section}{key}`{earlier}: a key may be set once per section; delete one of them")
}

fn line_of(src: &str, offset: usize) -> usize {
    src[..offset.min(src.len())].bytes().filter(|b| *b == b'\n').count() + 1
}

/// Record `file:line` for every section and key, from toml_edit's spans.
fn key_locations(doc: &toml_edit::Document<&str>, src: &str, file: &str) -> validate::Locations {
    let mut locs = validate::Locations::new();
    for (section, item) in doc.as_table().iter() {
        if let Some((key, _)) = doc.as_table().get_key_value(section) {
            if let Some(span) = key.span().or_else(|| item.span()) {
                locs.insert(section.to_string(), format!("{file}:{}", line_of(src, span.start)));
            }
        }
        let inner = match item {
            toml_edit::Item::Table(t) => Some(t.iter().map(|(k, _)| k.to_string()).collect::<Vec<_>>()),
            toml_edit::Item::Value(toml_edit::Value::InlineTable(t)) => {
                Some(t.iter().map(|(k, _)| k.to_string()).collect())
            }
            _ => None,
        };
        for key in inner.unwrap_or_default() {
            let span = match item {
                toml_edit::Item::Table(t) => t.get_key_value(&key).and_then(|(k, v)| k.span().or_else(|| v.span())),
                toml_edit::Item::Value(toml_edit::Value::InlineTable(t)) => {
                    t.get_key_value(&key).and_then(|(k, v)| k.span().or_else(|| v.span()))
                }
                _ => None,
            };
            if let Some(span) = span {
                locs.insert(format!("{section}.{key}"), format!("{file}:{}", line_of(src, span.start)));
            }
            if let Some(toml_edit::Item::ArrayOfTables(a)) = item.as_table().and_then(|t| t.get(&key)) {
                array_locations(a, &format!("{section}.{key}"), src, file, &mut locs);
            }
        }
    }
    locs
}

/// `[[section.key]]` entries: `section.key[i]` at each header and `section.key[i].k` at each key
/// (the array itself at its first entry).
fn array_locations(a: &toml_edit::ArrayOfTables, dotted: &str, src: &str, file: &str, locs: &mut validate::Locations) {
    for (i, t) in a.iter().enumerate() {
        let Some(span) = t.span() else { continue };
        let at = format!("{file}:{}", line_of(src, span.start));
        locs.entry(dotted.to_string()).or_insert_with(|| at.clone());
        locs.insert(format!("{dotted}[{i}]"), at);
        for (k, v) in t.iter() {
            let kspan = t.get_key_value(k).and_then(|(key, _)| key.span()).or_else(|| v.span());
            if let Some(kspan) = kspan {
                locs.insert(format!("{dotted}[{i}].{k}"), format!("{file}:{}", line_of(src, kspan.start)));
            }
        }
    }
}

/// Parse the value of a `--set` override as TOML, falling back to a bare string.
fn parse_override_value(v: &str) -> toml::Value {
    match format!("v = {v}").parse::<toml::Table>() {
        Ok(mut t) => t.remove("v").unwrap_or_else(|| toml::Value::String(v.to_string())),
        Err(_) => toml::Value::String(v.to_string()),
    }
}

/// Apply `--set SECTION.KEY=VALUE` overrides to the table, recording each key's location as
/// `--set KEY`; malformed ones become diagnostics.
fn apply_overrides(
    table: &mut toml::Table,
    locs: &mut validate::Locations,
    overrides: &[String],
    diags: &mut Vec<Diagnostic>,
) {
    for o in overrides {
        let Some((key, value)) = o.split_once('=') else {
            diags.push(Diagnostic {
                location: format!("--set {o}"),
                text: "expected SECTION.KEY=VALUE, e.g. train.max_steps=10".into(),
            });
            continue;
        };
        let key = key.trim();
        let Some((section, name)) = key.split_once('.') else {
            diags.push(Diagnostic {
                location: format!("--set {o}"),
                text: format!("expected SECTION.KEY=VALUE, found key `{key}`"),
            });
            continue;
        };
        let sect = table.entry(section.to_string()).or_insert_with(|| toml::Value::Table(Default::default()));
        if let Some(t) = sect.as_table_mut() {
            t.insert(name.to_string(), parse_override_value(value.trim()));
        }
        locs.insert(key.to_string(), format!("--set {key}"));
        locs.entry(section.to_string()).or_insert_with(|| format!("--set {key}"));
    }
}

/// Read, override, validate. Errors are [`Failure::Usage`] (exit code 2).
pub fn load(path: &Path, overrides: &[String]) -> anyhow::Result<Loaded> {
    let file = path.display().to_string();
    let src = std::fs::read_to_string(path).map_err(|e| Failure::Usage(format!("cannot read recipe {file}: {e}")))?;
    let doc = toml_edit::Document::parse(src.as_str()).map_err(|e| {
        let line = e.span().map(|s| line_of(&src, s.start)).unwrap_or(1);
        Failure::Usage(format!("{file}:{line}: invalid TOML: {}", toml_problem(&src, e.message().trim(), e.span())))
    })?;
    let mut locs = key_locations(&doc, &src, &file);
    let mut table: toml::Table =
        src.parse().map_err(|e: toml::de::Error| Failure::Usage(format!("{file}: invalid TOML: {}", e.message())))?;

    let mut diags = Vec::new();
    apply_overrides(&mut table, &mut locs, overrides, &mut diags);

    let dir = path
        .parent()
        .map(Path::to_path_buf)
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or_else(|| PathBuf::from("."));
    aliases::resolve(&mut table, &mut locs, &mut diags);
    let loc = |key: &str| {
        locs.get(key).or_else(|| locs.get(key.split('.').next().unwrap_or(""))).cloned().unwrap_or_else(|| file.clone())
    };
    let notes = aliases::value_notes(&table, &loc);
    let bad = validate::check_keys(&table, &file, &locs, &mut diags);
    if !diags.is_empty() {
        // Every problem at once: the cross-key and file checks still run on the recipe without
        // the refused keys (their defaults stand in), leaving out what they say of those keys.
        let mut pruned = table.clone();
        for b in &bad {
            match b.split_once('.') {
                // `dataset.sources[i].key`: that key of entry i.
                Some((s, k)) if k.contains('[') => {
                    let entry = k.split_once('[').and_then(|(a, rest)| Some((a, rest.split_once("].")?)));
                    if let Some((arr, (i, key))) = entry {
                        let t = pruned.get_mut(s).and_then(toml::Value::as_table_mut);
                        let e = t.and_then(|t| t.get_mut(arr)).and_then(toml::Value::as_array_mut);
                        let e = e.and_then(|a| a.get_mut(i.parse::<usize>().unwrap_or(usize::MAX)));
                        if let Some(e) = e.and_then(toml::Value::as_table_mut) {
                            e.remove(key);
                        }
                    }
                }
                Some((s, k)) => {
                    if let Some(t) = pruned.get_mut(s).and_then(toml::Value::as_table_mut) {
                        t.remove(k);
                    }
                }
                None => {
                    pruned.remove(b.as_str());
                }
            }
        }
        if let Ok(r) = Recipe::deserialize_table(pruned) {
            let mut more = vec![];
            validate::check_semantics(&r, &dir, &loc, &mut more);
            let about_bad = |d: &Diagnostic| {
                bad.iter().any(|b| d.text.starts_with(&format!("{b}:")) || d.text.starts_with(&format!("{b}.")))
            };
            diags.extend(more.into_iter().filter(|d| !about_bad(d)));
        }
        return Err(Failure::Usage(RecipeErrors(diags).to_string().trim_end().to_string()).into());
    }
    let mut recipe = Recipe::deserialize_table(table).map_err(|e| Failure::Usage(format!("{file}: {e}")))?;
    if recipe.run.name.is_empty() {
        recipe.run.name = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "run".into());
    }
    validate::check_semantics(&recipe, &dir, &loc, &mut diags);
    if !diags.is_empty() {
        return Err(Failure::Usage(RecipeErrors(diags).to_string().trim_end().to_string()).into());
    }
    let mut warnings = notes;
    if recipe.dataset.eval_ratio.is_none() && recipe.dataset.eval_source.is_empty() {
        warnings.push(Diagnostic {
            location: loc("dataset"),
            text: "no eval split (dataset.eval_ratio or dataset.eval_source): evaluate reports generations on a few training prompts, without an eval loss".into(),
        });
    }
    Ok(Loaded { recipe, path: path.to_path_buf(), dir, overrides: overrides.to_vec(), warnings })
}

impl Recipe {
    /// Deserialize from a TOML table (types already checked key by key).
    pub fn deserialize_table(t: toml::Table) -> Result<Recipe, String> {
        use serde::Deserialize;
        Recipe::deserialize(toml::Value::Table(t)).map_err(|e| e.message().to_string())
    }
}

/// How one optimizer step's micro-batches are split over the processes of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Batching {
    pub micro_batch_size: usize,
    /// Micro-batches each process accumulates per optimizer step.
    pub accum_per_rank: usize,
    pub world_size: usize,
}

impl Batching {
    /// Examples (or packed rows) per optimizer step: micro × accumulation × processes.
    pub fn effective_batch(&self) -> usize {
        self.micro_batch_size * self.accum_per_rank * self.world_size
    }

    /// Micro-batches per optimizer step over all processes.
    pub fn micro_per_step(&self) -> usize {
        self.accum_per_rank * self.world_size
    }
}

/// The batching of `[train]` on `world_size` processes; Err names the keys at fault.
pub fn batching(t: &TrainSection, world_size: usize) -> Result<Batching, String> {
    let world_size = world_size.max(1);
    let ga = t.gradient_accumulation_steps as usize;
    let accum_per_rank = if t.keep_effective_batch && world_size > 1 {
        if !ga.is_multiple_of(world_size) {
            return Err(format!(
                "train.keep_effective_batch = true needs train.gradient_accumulation_steps ({ga}) to be a multiple of the number of processes ({world_size})"
            ));
        }
        ga / world_size
    } else {
        ga
    };
    Ok(Batching { micro_batch_size: t.micro_batch_size as usize, accum_per_rank, world_size })
}

/// Why `[train]` cannot run on `world_size` processes, if it cannot.
pub fn effective_batch_problem(t: &TrainSection, world_size: usize) -> Option<String> {
    batching(t, world_size).err()
}
