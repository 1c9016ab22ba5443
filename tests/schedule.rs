//! Learning-rate schedules against transformers' own values (tests/fixtures/schedule, written by
//! scripts/gen_schedule_fixture.py with transformers 5.17), the warmup of `warmup_ratio`, and the
//! step count of an epochs-based run.

use tuner::recipe::{LrScheduler, TrainSection};
use tuner::train::schedule::{min_lr_rate, total_steps, warmup_steps, Schedule};

fn case_section(c: &serde_json::Value, base: f64) -> TrainSection {
    let kind: LrScheduler = serde_json::from_value(c["kind"].clone()).unwrap();
    let warmup = c["warmup"].as_f64().unwrap();
    let mut t = TrainSection { lr_scheduler: kind, learning_rate: base, ..Default::default() };
    if warmup >= 1.0 || warmup == 0.0 {
        t.warmup_steps = warmup as u64;
    } else {
        t.warmup_ratio = Some(warmup);
    }
    t.min_lr = c["kwargs"]["min_lr"].as_f64();
    t.min_lr_rate = c["kwargs"]["min_lr_rate"].as_f64();
    t
}

#[test]
fn schedules_match_transformers_step_by_step() {
    let path = tuner_root().join("tests/fixtures/schedule/transformers_lr.json");
    let fx: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let base = fx["base_lr"].as_f64().unwrap();
    let cases = fx["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 7);
    for c in cases {
        let name = c["name"].as_str().unwrap();
        let total = c["total"].as_u64().unwrap();
        let t = case_section(c, base);
        assert_eq!(warmup_steps(&t, total), c["warmup_steps"].as_u64().unwrap(), "{name}: warmup");
        let s = Schedule::for_train(&t, total);
        let lrs = c["lrs"].as_array().unwrap();
        assert_eq!(lrs.len() as u64, total);
        for (step, want) in lrs.iter().enumerate() {
            let want = want.as_f64().unwrap();
            let got = s.lr(step as u64);
            assert!((got - want).abs() <= 1e-12 * base, "{name} step {step}: tuner {got}, transformers {want}");
        }
    }
}

fn tuner_root() -> std::path::PathBuf {
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn cosine_with_min_lr_ends_at_its_floor() {
    let t = TrainSection {
        lr_scheduler: LrScheduler::CosineWithMinLr,
        learning_rate: 1e-3,
        warmup_steps: 0,
        min_lr: Some(1e-4),
        ..Default::default()
    };
    assert_eq!(min_lr_rate(&t), 0.1);
    let s = Schedule::for_train(&t, 10);
    assert!((s.lr(0) - 1e-3).abs() < 1e-15);
    // Half way: the midpoint between the base and the floor.
    assert!((s.lr(5) - 5.5e-4).abs() < 1e-15, "{}", s.lr(5));
    assert!((s.lr(10) - 1e-4).abs() < 1e-15);
}

#[test]
fn warmup_ratio_rounds_up_like_transformers() {
    let t = TrainSection { warmup_ratio: Some(0.03), ..Default::default() };
    assert_eq!(warmup_steps(&t, 100), 3);
    assert_eq!(warmup_steps(&t, 101), 4); // ceil(3.03)
    assert_eq!(warmup_steps(&t, 1), 1);
    let t = TrainSection { warmup_steps: 7, ..Default::default() };
    assert_eq!(warmup_steps(&t, 1000), 7);
}

#[test]
fn epochs_become_steps_over_micro_batches_accumulation_and_processes() {
    // 10 micro-batches an epoch (e.g. 19 rows at micro-batch 2), 4 micro-batches a step.
    let t = TrainSection { epochs: Some(1.0), max_steps: None, ..Default::default() };
    assert_eq!(total_steps(&t, 10, 4).unwrap(), 3); // ceil(10 / 4)
    let t3 = TrainSection { epochs: Some(3.0), ..t.clone() };
    assert_eq!(total_steps(&t3, 10, 4).unwrap(), 8); // ceil(30 / 4): steps run across epoch ends
                                                     // Accumulation 2 on 4 processes: 8 micro-batches a step.
    assert_eq!(total_steps(&t3, 10, 8).unwrap(), 4); // ceil(30 / 8)
    let half = TrainSection { epochs: Some(0.5), ..t.clone() };
    assert_eq!(total_steps(&half, 10, 4).unwrap(), 2); // ceil(5 / 4)
    assert_eq!(total_steps(&half, 1, 64).unwrap(), 1); // never 0
    let steps = TrainSection { max_steps: Some(7), epochs: None, ..t.clone() };
    assert_eq!(total_steps(&steps, 10, 4).unwrap(), 7);
    let neither = TrainSection { max_steps: None, epochs: None, ..t };
    assert!(total_steps(&neither, 10, 4).is_err());
}
