//! Dataset sources: each source's rows cut to its split slice (`train[:10%]`, as HF datasets
//! slices), then several sources mixed by weight. All of it runs before tokenizing, on one
//! thread, from the recipe seed, so the tokenized shards do not depend on the thread count.
//!
//! A weight is the source's share of the mixture's rows: with weights w_i (normalised by their
//! sum) and n_i rows per source, the mixture has N = Σ n_i rows, of which c_i = N·w_i/Σw come
//! from source i (rounded by largest remainder so that they add up to N). This is
//! `interleave_datasets(probabilities=…)` of HF datasets with exact counts instead of a coin
//! flip per row. A source asked for fewer rows than it has gives a seeded sample of them; one
//! asked for more repeats all its rows as often as fits and samples the rest. Without weights
//! the sources are concatenated, every row once (as Axolotl concatenates its `datasets`).

use crate::data::formats::RowFormat;
use crate::data::rows::Row;
use crate::recipe::{DatasetSection, SplitSpec};

/// How one source is read: its label (for messages), format, split and weight.
#[derive(Debug, Clone)]
pub struct SourcePlan {
    pub label: String,
    pub format: RowFormat,
    pub split: SplitSpec,
    pub weight: Option<f64>,
}

/// The training sources of `[dataset]`: `source`, or each `[[dataset.sources]]` entry with the
/// `[dataset]` keys it leaves unset.
pub fn train_plans(d: &DatasetSection) -> Vec<SourcePlan> {
    if d.sources.is_empty() {
        let format = RowFormat::new(d.format, d.text_field.as_deref());
        return vec![SourcePlan { label: d.source.clone(), format, split: d.split.clone(), weight: None }];
    }
    d.sources
        .iter()
        .map(|s| SourcePlan {
            label: s.source.clone(),
            format: RowFormat::new(s.format.unwrap_or(d.format), s.text_field.as_deref().or(d.text_field.as_deref())),
            split: s.split.clone().unwrap_or_else(|| d.split.clone()),
            weight: s.weight,
        })
        .collect()
}

/// The eval source (`eval_source`): `[dataset]`'s format, `eval_split` (default: `split`'s name, unsliced).
pub fn eval_plan(d: &DatasetSection) -> SourcePlan {
    let split = d.eval_split.clone().unwrap_or_else(|| SplitSpec::parse(&d.split.name).unwrap_or_default());
    let format = RowFormat::new(d.format, d.text_field.as_deref());
    SourcePlan { label: d.eval_source.clone(), format, split, weight: None }
}

/// Keep the rows of `split`'s slice and mark them with `format`. Err says why the slice cannot apply.
pub fn apply_plan(mut rows: Vec<Row>, plan: &SourcePlan) -> Result<Vec<Row>, String> {
    let range = plan.split.range(rows.len()).map_err(|e| format!("{}: {e}", plan.label))?;
    rows.truncate(range.end);
    rows.drain(..range.start);
    for r in &mut rows {
        r.format = plan.format.clone();
    }
    Ok(rows)
}

/// Rows per source in the mixture: shares `weights` of Σ `sizes` rows, by largest remainder
/// (ties to the earlier source).
pub fn mixture_counts(sizes: &[usize], weights: &[f64]) -> Vec<usize> {
    let total: usize = sizes.iter().sum();
    let sum: f64 = weights.iter().sum();
    let exact: Vec<f64> = weights.iter().map(|w| total as f64 * w / sum).collect();
    let mut counts: Vec<usize> = exact.iter().map(|x| x.floor() as usize).collect();
    let mut order: Vec<usize> = (0..sizes.len()).collect();
    order.sort_by(|&a, &b| {
        let (fa, fb) = (exact[a] - exact[a].floor(), exact[b] - exact[b].floor());
        fb.partial_cmp(&fa).unwrap_or(std::cmp::Ordering::Equal).then(a.cmp(&b))
    });
    let short = total.saturating_sub(counts.iter().sum());
    for &i in order.iter().take(short) {
        counts[i] += 1;
    }
    counts
}

/// `count` rows of `rows`: whole passes in order, then a seeded sample (kept in order) of the rest.
fn take(rows: &[Row], count: usize, seed: u64) -> Vec<Row> {
    let n = rows.len();
    let mut out = Vec::with_capacity(count);
    for _ in 0..count / n {
        out.extend_from_slice(rows);
    }
    let mut idx: Vec<usize> = (0..n).collect();
    crate::data::shuffle(&mut idx, seed);
    let mut picked = idx[..count % n].to_vec();
    picked.sort_unstable();
    out.extend(picked.into_iter().map(|i| rows[i].clone()));
    out
}

/// What the mixture took from one source, for stats.json and the log.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SourceUse {
    pub source: String,
    pub split: String,
    /// Rows after the split slice.
    pub rows: usize,
    pub weight: Option<f64>,
    /// Rows in the mixture.
    pub used: usize,
}

/// Mix the sources' rows (already sliced): concatenated without weights, by weight otherwise.
/// Rows come out grouped by source, in source order; `dataset.shuffle` mixes them afterwards.
pub fn mix(sources: Vec<(SourcePlan, Vec<Row>)>, seed: u64) -> Result<(Vec<Row>, Vec<SourceUse>), String> {
    let sizes: Vec<usize> = sources.iter().map(|(_, r)| r.len()).collect();
    let weighted = sources.iter().all(|(p, _)| p.weight.is_some()) && sources.len() > 1;
    let counts = if weighted {
        mixture_counts(&sizes, &sources.iter().map(|(p, _)| p.weight.unwrap_or(1.0)).collect::<Vec<_>>())
    } else {
        sizes.clone()
    };
    let mut out = Vec::with_capacity(counts.iter().sum());
    let mut uses = vec![];
    for (i, ((plan, rows), count)) in sources.into_iter().zip(counts).enumerate() {
        if rows.is_empty() && count > 0 {
            return Err(format!("{} (split {}) has no rows, but its weight asks for {count}", plan.label, plan.split));
        }
        let source_seed = seed ^ (i as u64 + 1).wrapping_mul(0xD6E8_FEB8_6659_FD93);
        if count == rows.len() {
            out.extend(rows.iter().cloned());
        } else {
            out.extend(take(&rows, count, source_seed));
        }
        uses.push(SourceUse {
            source: plan.label.clone(),
            split: plan.split.to_string(),
            rows: rows.len(),
            weight: plan.weight,
            used: count,
        });
    }
    Ok((out, uses))
}
