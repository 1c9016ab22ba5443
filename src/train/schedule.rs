//! Learning-rate schedules as a pure function of the optimizer step, with the
//! semantics of transformers' `get_{linear,cosine,constant}_schedule_with_warmup`:
//! optimizer step `s` (0-based) uses `base · s / warmup` during warmup (so the
//! very first step has lr 0, as in HF), then decays to 0 at `total`.

use crate::recipe::LrScheduler;

/// The learning rate used by optimizer step `step` (0-based) of `total` steps.
pub fn lr_at(kind: LrScheduler, base: f64, step: u64, warmup: u64, total: u64) -> f64 {
    if step < warmup {
        return base * step as f64 / warmup as f64;
    }
    let decay = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / decay).clamp(0.0, 1.0);
    match kind {
        LrScheduler::Constant => base,
        LrScheduler::Linear => base * (1.0 - progress),
        LrScheduler::Cosine => base * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    }
}
