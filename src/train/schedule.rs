//! Learning-rate schedules as a pure function of the optimizer step, with the
//! semantics of transformers' `get_{linear,cosine,constant}_schedule_with_warmup` and
//! `get_cosine_with_min_lr_schedule_with_warmup` (transformers 5.x `optimization.py`):
//! optimizer step `s` (0-based) uses `base · s / warmup` during warmup (so the
//! very first step has lr 0, as in HF), then decays to 0 (or to the floor) at `total`.
//!
//! Also the two numbers a schedule needs from the recipe: the total steps of an epochs-based run
//! ([`total_steps`]) and the warmup of a `warmup_ratio` ([`warmup_steps`]).

use crate::recipe::{LrScheduler, TrainSection};

/// One run's learning-rate schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub kind: LrScheduler,
    /// `train.learning_rate`.
    pub base: f64,
    /// Warmup steps (already resolved from `warmup_ratio`).
    pub warmup: u64,
    /// Optimizer steps of the run.
    pub total: u64,
    /// `cosine_with_min_lr`'s floor as a fraction of `base` (0 for the other kinds).
    pub min_lr_rate: f64,
}

impl Schedule {
    /// The schedule of `[train]` for a run of `total` optimizer steps.
    pub fn for_train(t: &TrainSection, total: u64) -> Schedule {
        Schedule {
            kind: t.lr_scheduler,
            base: t.learning_rate,
            warmup: warmup_steps(t, total),
            total,
            min_lr_rate: min_lr_rate(t),
        }
    }

    /// The learning rate used by optimizer step `step` (0-based).
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup {
            return self.base * step as f64 / self.warmup as f64;
        }
        let decay = self.total.saturating_sub(self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / decay).clamp(0.0, 1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        match self.kind {
            LrScheduler::Constant => self.base,
            LrScheduler::Linear => self.base * (1.0 - progress),
            LrScheduler::Cosine => self.base * cosine,
            // transformers: factor · (1 − rate) + rate, clamped at 0.
            LrScheduler::CosineWithMinLr => self.base * (cosine * (1.0 - self.min_lr_rate) + self.min_lr_rate).max(0.0),
        }
    }
}

/// The learning rate used by optimizer step `step` (0-based) of `total` steps, for a schedule
/// without a floor (`min_lr_rate` 0).
pub fn lr_at(kind: LrScheduler, base: f64, step: u64, warmup: u64, total: u64) -> f64 {
    Schedule { kind, base, warmup, total, min_lr_rate: 0.0 }.lr(step)
}

/// Warmup steps: `ceil(total × warmup_ratio)` when the ratio is set (transformers'
/// `TrainingArguments.get_warmup_steps`, in the same f64 arithmetic), else `warmup_steps`.
pub fn warmup_steps(t: &TrainSection, total: u64) -> u64 {
    match t.warmup_ratio {
        Some(r) => (total as f64 * r).ceil() as u64,
        None => t.warmup_steps,
    }
}

/// `cosine_with_min_lr`'s floor as a fraction of the base rate: `min_lr_rate`, or
/// `min_lr / learning_rate` (transformers' conversion), else 0.
pub fn min_lr_rate(t: &TrainSection) -> f64 {
    match (t.min_lr_rate, t.min_lr) {
        (Some(rate), _) => rate,
        (None, Some(lr)) => lr / t.learning_rate,
        (None, None) => 0.0,
    }
}

/// The optimizer steps of a run: `train.max_steps` when set; for `train.epochs = E`,
///
/// `max(1, ceil(E × micro_batches_per_epoch / micro_per_step))`
///
/// where `micro_batches_per_epoch = ceil(rows / micro_batch_size)` (rows: the tokenized training
/// examples, or the packed rows with `train.packing`) and `micro_per_step` is the micro-batches
/// of one optimizer step over all processes (`accumulation per process × processes`; see
/// `recipe::batching`). The loader runs one stream of micro-batches through the epochs, a step
/// taking the next `micro_per_step` of them across an epoch's end, so these are the fewest steps
/// that see every row E times. For E = 1 it equals transformers'
/// `ceil(batches / accumulation)`; for several epochs transformers rounds each epoch up to whole
/// steps (a short last step per epoch) and may count a few more.
pub fn total_steps(t: &TrainSection, micro_batches_per_epoch: u64, micro_per_step: usize) -> anyhow::Result<u64> {
    match (t.max_steps, t.epochs) {
        (Some(s), _) => Ok(s),
        (None, Some(e)) => {
            Ok(((e * micro_batches_per_epoch as f64) / micro_per_step.max(1) as f64).ceil().max(1.0) as u64)
        }
        (None, None) => anyhow::bail!("set train.max_steps or train.epochs"),
    }
}
