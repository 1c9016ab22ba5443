//! The train stage: a falling loss, exact gradient accumulation, checkpointed
//! gradients equal to plain autograd, bit-exact resume after SIGKILL, Ctrl-C,
//! 8-bit AdamW against AdamW, and the PEFT adapter it writes.

use crate::common::*;
use serde_json::Value;
use std::path::Path;
use tch::{Device, Kind, Tensor};
use tuner::model::{lora, CausalLm};
use tuner::train::{data, optim, step};

fn metrics(run_dir: &Path) -> Vec<Value> {
    std::fs::read_to_string(run_dir.join("train/metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn training_lowers_the_loss_and_writes_a_peft_adapter() {
    let d = tmp();
    let r = train_recipe(d.path(), "");
    let text = std::fs::read_to_string(&r)
        .unwrap()
        .replace("max_steps = 6", "max_steps = 30")
        .replace("learning_rate = 3e-3", "learning_rate = 1e-2");
    std::fs::write(&r, text).unwrap();
    let (code, _, err) = run(&["run", r.to_str().unwrap(), "--until", "train"]);
    assert_eq!(code, 0, "{err}");
    let rd = d.path().join("runs/t");
    let m = metrics(&rd);
    assert_eq!(m.len(), 30);
    let mean = |s: &[Value]| s.iter().map(|v| v["loss"].as_f64().unwrap()).sum::<f64>() / s.len() as f64;
    let (first, last) = (mean(&m[..5]), mean(&m[25..]));
    assert!(last < 0.7 * first, "loss {first:.3} → {last:.3}");
    for k in ["epoch", "lr", "grad_norm", "tokens_per_s", "peak_mem_bytes"] {
        assert!(m[3][k].as_f64().is_some(), "{k} missing in {}", m[3]);
    }
    assert_eq!(m[0]["lr"], 0.0, "HF warmup: the first step has lr 0");
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(rd.join("train/adapter/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["r"], 4);
    assert_eq!(cfg["lora_alpha"], 8.0);
    let tensors = Tensor::read_safetensors(rd.join("train/adapter/adapter_model.safetensors")).unwrap();
    assert_eq!(tensors.len(), 2 * 7 * 2, "A and B for 7 modules in 2 layers");
    let (_, a) =
        tensors.iter().find(|(n, _)| n == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight").unwrap();
    assert_eq!(a.size(), [4, 64]);
    let png = std::fs::read(rd.join("train/loss.png")).unwrap();
    assert_eq!(&png[1..4], b"PNG");
    assert!(err.contains("train: first step done"), "{err}");
    // Off a terminal every logged step says how long is left.
    let line = err.lines().find(|l| l.starts_with("train: step 10/30 loss ")).unwrap_or_else(|| panic!("{err}"));
    assert!(line.contains(" epoch ") && line.contains(", ETA "), "{line}");
}

fn load_tiny(quantize: bool) -> Box<dyn CausalLm> {
    lora_fixture("llama", quantize, 3, 11)
}

fn grads(m: &dyn CausalLm, micro: &[data::MicroBatch], checkpointing: bool) -> (f64, Vec<Tensor>) {
    let params = lora::trainable_parameters(m);
    for p in &params {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    let o = step::StepOptions {
        checkpointing,
        pad_id: 296,
        pad_multiple: 1,
        device: Device::Cpu,
        seed: 1,
        loss_scale: 1.0,
        hand_backward: false,
        offload: false,
        profile: None,
        coalesce: None,
        detect_anomaly: false,
        op_census: None,
    };
    let r = step::forward_backward(m, micro, 0, &o);
    (r.loss, params.iter().map(|p| p.grad().copy()).collect())
}

fn max_rel(a: &[Tensor], b: &[Tensor]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| ((x - y).abs().max().double_value(&[])) / (y.abs().max().double_value(&[]) + 1e-12))
        .fold(0.0, f64::max)
}

#[test]
fn accumulation_and_checkpointing_give_the_same_gradients() {
    for quantize in [false, true] {
        let m = load_tiny(quantize);
        let loader = data::Loader::new(crate::common::examples(4, 3), 4, 0, false, 64);
        let mut c = data::Cursor::default();
        let one = vec![loader.next(&mut c)];
        let loader1 = data::Loader::new(crate::common::examples(4, 3), 1, 0, false, 64);
        let mut c1 = data::Cursor::default();
        let four: Vec<data::MicroBatch> = (0..4).map(|_| loader1.next(&mut c1)).collect();
        // The same four examples either way (the order within the step does not matter).
        let (l_ref, g_ref) = grads(m.as_ref(), &one, false);
        let (l_ga, g_ga) = grads(m.as_ref(), &four, false);
        let (l_ck, g_ck) = grads(m.as_ref(), &one, true);
        let (l_ga_ck, g_ga_ck) = grads(m.as_ref(), &four, true);
        assert!(
            g_ref.iter().all(|g| g.abs().sum(Kind::Float).double_value(&[]) > 0.0),
            "every adapter gets a gradient"
        );
        for (name, l, g) in [("bs1×GA4", l_ga, &g_ga), ("checkpointing", l_ck, &g_ck), ("both", l_ga_ck, &g_ga_ck)] {
            assert!((l - l_ref).abs() < 1e-5 * l_ref.abs(), "{name} (nf4 {quantize}): loss {l} vs {l_ref}");
            let e = max_rel(g, &g_ref);
            assert!(e < 1e-4, "{name} (nf4 {quantize}): gradients differ by {e:.2e} relative");
        }
    }
}

#[test]
fn lora_gradients_match_a_plain_autograd_reference() {
    // One linear, no model: the LoRA path's A/B gradients against autograd on the written-out formula.
    let m = load_tiny(false);
    let linears = m.linears();
    let (_, lin) = linears.iter().find(|(n, _)| n == "model.layers.0.mlp.up_proj").unwrap();
    let lora = lin.lora.as_ref().unwrap();
    let x = Tensor::randn([3, 64], (Kind::Float, Device::Cpu));
    let y = lin.forward(&x, true);
    let w = lin.dense_weight(Kind::Float);
    let a = lora.a.detach().copy().set_requires_grad(true);
    let b = lora.b.detach().copy().set_requires_grad(true);
    let y_ref = x.matmul(&w.tr()) + x.matmul(&a.tr()).matmul(&b.tr()) * lora.scale;
    assert!((&y - &y_ref).abs().max().double_value(&[]) < 1e-5);
    let up = Tensor::randn(y.size(), (Kind::Float, Device::Cpu));
    for p in [&lora.a, &lora.b] {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    (&y * &up).sum(Kind::Float).backward();
    (&y_ref * &up).sum(Kind::Float).backward();
    assert!(max_rel(&[lora.a.grad(), lora.b.grad()], &[a.grad(), b.grad()]) < 1e-5);
}

#[test]
fn eight_bit_adamw_tracks_adamw() {
    // Minimise ‖W − T‖² for a 96×64 matrix (6144 elements, above the 8-bit threshold), from the
    // same start with both optimizers, and compare the trajectories while they descend.
    let target = Tensor::randn([96, 64], (Kind::Float, Device::Cpu));
    let start = Tensor::randn([96, 64], (Kind::Float, Device::Cpu));
    let err0 = (&start - &target).norm().double_value(&[]);
    let mut finals = vec![];
    for kind in [tuner::recipe::Optimizer::Adamw, tuner::recipe::Optimizer::Adamw8bit] {
        let w = start.copy().set_requires_grad(true);
        let mut opt = optim::AdamW::new(
            vec![w.shallow_clone()],
            kind,
            optim::AdamWConfig { weight_decay: 0.01, ..Default::default() },
        );
        for _ in 0..40 {
            opt.zero_grad();
            (&w - &target).square().sum(Kind::Float).backward();
            opt.step(0.02);
        }
        finals.push(w.detach());
    }
    let e32 = (&finals[0] - &target).norm().double_value(&[]) / err0;
    let e8 = (&finals[1] - &target).norm().double_value(&[]) / err0;
    // Each step moves every weight by about lr: 40 steps close ~0.8 of the ~1.4 gap.
    assert!(e32 < 0.75 && e8 < 0.75, "error left: adamw {e32:.4}, 8-bit {e8:.4}");
    let moved = (&finals[0] - &start).norm().double_value(&[]);
    let gap = (&finals[0] - &finals[1]).norm().double_value(&[]) / moved;
    // Stated tolerance: the 8-bit trajectory stays within 8% of the fp32 one, relative to the
    // distance moved (measured: 4.9%; the error comes from 8-bit second moments).
    assert!(gap < 0.08, "8-bit AdamW drifted {gap:.4} from AdamW");
}

#[test]
fn parameters_stepped_together_move_as_if_stepped_alone() {
    // The optimizer keeps parameters in shared flat buffers (one kernel sequence per group); each
    // one's arithmetic, 8-bit blocks included, must be exactly what it gets in an optimizer of
    // its own. Sizes: fp32-state (< 4096) and 8-bit-state ones, matrices (weight decay) and a
    // vector (none), none a multiple of the 256-value block; the largest spans the step's 2M-value
    // chunk boundary at another point in the shared buffer than alone.
    let shapes: [&[i64]; 5] = [&[16, 300], &[7, 9], &[40, 130], &[333], &[1500, 1500]];
    let targets: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(*s, (Kind::Float, Device::Cpu))).collect();
    let starts: Vec<Tensor> = shapes.iter().map(|s| Tensor::randn(*s, (Kind::Float, Device::Cpu))).collect();
    let cfg = optim::AdamWConfig { weight_decay: 0.01, ..Default::default() };
    let run = |idx: &[usize], kind| {
        let ws: Vec<Tensor> = idx.iter().map(|&i| starts[i].copy().set_requires_grad(true)).collect();
        let mut opt = optim::AdamW::new(ws.iter().map(Tensor::shallow_clone).collect(), kind, cfg);
        for _ in 0..5 {
            opt.zero_grad();
            let loss = idx.iter().zip(&ws).map(|(&i, w)| (w - &targets[i]).square().sum(Kind::Float) * (i + 1) as f64);
            loss.fold(Tensor::zeros([], (Kind::Float, Device::Cpu)), |a, b| a + b).backward();
            assert!(opt.grad_norm() > 0.0);
            opt.step(0.03);
        }
        (ws, opt)
    };
    for kind in [tuner::recipe::Optimizer::Adamw, tuner::recipe::Optimizer::Adamw8bit] {
        let (together, opt) = run(&[0, 1, 2, 3, 4], kind);
        for i in 0..5 {
            let (alone, _) = run(&[i], kind);
            assert!((&together[i] - &starts[i]).abs().max().double_value(&[]) > 0.05, "{kind:?}: parameter {i} moved");
            assert!(alone[0].equal(&together[i]), "{kind:?}: parameter {i} moved differently together than alone");
        }
        // The state checkpoint (per parameter, as before the flat buffers) round-trips.
        let saved = opt.state_tensors();
        assert_eq!(saved.len(), if kind == tuner::recipe::Optimizer::Adamw { 10 } else { 3 * 4 + 2 * 2 });
        let fresh: Vec<Tensor> = together.iter().map(|w| w.detach().copy().set_requires_grad(true)).collect();
        let mut o3 = optim::AdamW::new(fresh.iter().map(Tensor::shallow_clone).collect(), kind, cfg);
        o3.load_state(&saved, 5).unwrap();
        for ((n1, t1), (n2, t2)) in saved.iter().zip(o3.state_tensors()) {
            assert_eq!(n1, &n2);
            assert!(t1.equal(&t2), "{n1} did not round-trip");
        }
    }
}

fn adapter_bytes(run_dir: &Path) -> Vec<u8> {
    std::fs::read(run_dir.join("train/adapter/adapter_model.safetensors")).unwrap()
}

#[test]
fn a_killed_run_resumes_to_a_bit_identical_adapter() {
    // Uninterrupted reference.
    let d1 = tmp();
    let r1 = train_recipe(d1.path(), "");
    let (code, _, err) = run(&["run", r1.to_str().unwrap(), "--until", "train"]);
    assert_eq!(code, 0, "{err}");
    let reference = adapter_bytes(&d1.path().join("runs/t"));

    // Killed with SIGKILL after the step-2 checkpoint, then run again.
    let d2 = tmp();
    let r2 = train_recipe(d2.path(), "");
    let ck = d2.path().join("runs/t/train/checkpoints/step-000002/progress.json");
    let mut child = tuner().args(["run", r2.to_str().unwrap(), "--until", "train"]).spawn().unwrap();
    let t0 = std::time::Instant::now();
    while !ck.exists() && t0.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(ck.exists(), "the step-2 checkpoint was written");
    let (code, _, err) = run(&["run", r2.to_str().unwrap(), "--until", "train"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("train: resuming from"), "{err}");
    assert_eq!(
        adapter_bytes(&d2.path().join("runs/t")),
        reference,
        "resumed adapter differs from the uninterrupted one"
    );
    let m = metrics(&d2.path().join("runs/t"));
    assert_eq!(m.iter().map(|v| v["step"].as_u64().unwrap()).collect::<Vec<_>>(), [1, 2, 3, 4, 5, 6]);
    // keep_checkpoints = 2: only the newest two remain.
    let mut left: Vec<String> = std::fs::read_dir(d2.path().join("runs/t/train/checkpoints"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(left, ["step-000004", "step-000006"]);
}

#[test]
fn ctrl_c_finishes_the_step_checkpoints_and_exits_130() {
    let d = tmp();
    let r = train_recipe(d.path(), "");
    let text = std::fs::read_to_string(&r)
        .unwrap()
        .replace("max_steps = 6", "max_steps = 400")
        .replace("save_steps = 2", "save_steps = 1000");
    std::fs::write(&r, text).unwrap();
    let child = tuner()
        .args(["run", r.to_str().unwrap(), "--until", "train"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let metrics_path = d.path().join("runs/t/train/metrics.jsonl");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&metrics_path).map(|s| s.lines().count()).unwrap_or(0) < 2
        && t0.elapsed().as_secs() < 120
    {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    assert!(err.contains("a checkpoint was written; run the same command again to resume"), "{err}");
    let cks = tuner::train::checkpoint::list(&d.path().join("runs/t/train"));
    assert_eq!(cks.len(), 1);
    assert!(cks[0].0.step >= 2 && cks[0].0.step < 400);
}

#[test]
fn a_changed_recipe_trains_afresh_and_keeps_old_checkpoints_aside() {
    let d = tmp();
    let r = train_recipe(d.path(), "");
    assert_eq!(run(&["run", r.to_str().unwrap(), "--until", "train"]).0, 0);
    let (code, _, err) = run(&["run", r.to_str().unwrap(), "--until", "train", "--set", "train.learning_rate=1e-3"]);
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("training afresh (old checkpoints kept in"), "{err}");
    let aside = std::fs::read_dir(d.path().join("runs/t/train"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("checkpoints.old-"))
        .count();
    assert_eq!(aside, 1);
}

#[test]
fn schedules_follow_transformers() {
    use tuner::recipe::LrScheduler::*;
    use tuner::train::schedule::lr_at;
    // Warmup: step s uses base·s/warmup, so the first step has lr 0.
    assert_eq!(lr_at(Linear, 1e-3, 0, 4, 10), 0.0);
    assert!((lr_at(Linear, 1e-3, 2, 4, 10) - 5e-4).abs() < 1e-15);
    // Linear: (total − s)/(total − warmup) after warmup.
    assert!((lr_at(Linear, 1e-3, 7, 4, 10) - 1e-3 * 3.0 / 6.0).abs() < 1e-15);
    assert_eq!(lr_at(Linear, 1e-3, 10, 4, 10), 0.0);
    // Cosine: half a cosine from base to 0.
    assert!((lr_at(Cosine, 1e-3, 7, 4, 10) - 1e-3 * 0.5 * (1.0 + (std::f64::consts::PI * 0.5).cos())).abs() < 1e-15);
    assert_eq!(lr_at(Constant, 1e-3, 9, 4, 10), 1e-3);
}

#[test]
fn packing_and_fp16_train_with_finite_falling_loss() {
    let d = tmp();
    let r = train_recipe(d.path(), "packing = true\npad_to_multiple_of = 8");
    let text = std::fs::read_to_string(&r)
        .unwrap()
        .replace("max_steps = 6", "max_steps = 8")
        .replace("learning_rate = 3e-3", "learning_rate = 1e-2")
        .replace("max_seq_length = 192", "max_seq_length = 1024");
    std::fs::write(&r, text).unwrap();
    let (code, _, err) = run(&["run", r.to_str().unwrap(), "--until", "train"]);
    assert_eq!(code, 0, "{err}");
    let m = metrics(&d.path().join("runs/t"));
    // Packed rows hold several examples: far more tokens per step than 8 single rows.
    assert!(m[0]["tokens"].as_i64().unwrap() > 8 * 150, "{}", m[0]);
    assert!(m[7]["loss"].as_f64().unwrap() < m[0]["loss"].as_f64().unwrap());

    let d = tmp();
    let r = train_recipe(d.path(), "");
    let text = std::fs::read_to_string(&r)
        .unwrap()
        .replace("[model]\nsource = \"model\"", "[model]\nsource = \"model\"\ndtype = \"fp16\"");
    std::fs::write(&r, text).unwrap();
    let (code, _, err) = run(&["run", r.to_str().unwrap(), "--until", "train"]);
    assert_eq!(code, 0, "{err}");
    let m = metrics(&d.path().join("runs/t"));
    assert!(m.iter().all(|v| v["loss"].as_f64().unwrap().is_finite()));
    assert_eq!(m[0]["loss_scale"], 65536.0);
    assert!(m[5]["loss"].as_f64().unwrap() < m[0]["loss"].as_f64().unwrap(), "{m:?}");
}

#[test]
fn profile_window_parses_step_and_layer_and_rejects_other_forms() {
    use tuner::train::step::ProfileWindow;
    assert_eq!(ProfileWindow::parse("2:10"), Some(ProfileWindow { step: 2, layer: 10 }));
    assert_eq!(ProfileWindow::parse(" 3 : 0 "), Some(ProfileWindow { step: 3, layer: 0 }));
    assert_eq!(ProfileWindow::parse("2"), None);
    assert_eq!(ProfileWindow::parse("a:1"), None);
    assert_eq!(ProfileWindow::parse("1:-1"), None);
}

fn grads_with(
    m: &dyn CausalLm,
    micro: &[data::MicroBatch],
    coalesce: Option<usize>,
) -> (step::StepResult, Vec<Tensor>) {
    let params = lora::trainable_parameters(m);
    for p in &params {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    let o = step::StepOptions {
        checkpointing: true,
        pad_id: 296,
        pad_multiple: 1,
        device: Device::Cpu,
        seed: 1,
        loss_scale: 1.0,
        hand_backward: false,
        offload: false,
        profile: None,
        coalesce,
        detect_anomaly: false,
        op_census: None,
    };
    let r = step::forward_backward(m, micro, 0, &o);
    (r, params.iter().map(|p| p.grad().copy()).collect())
}

/// Issue 15 §3: a step's micro-batches run as packed passes (one document per row, no padding)
/// give the step's loss and gradients: fp32 on the CPU agrees to rounding, for padded and for
/// packed micro-batches, in one pass or in several (a budget smaller than the step's tokens).
#[test]
fn coalesced_micro_batches_give_the_same_step() {
    for (family, packing) in [("llama", false), ("llama", true), ("gemma3n", false), ("gemma2", false)] {
        let m = lora_fixture(family, false, 3, 11);
        let loader = data::Loader::new(crate::common::examples(8, 3), 2, 0, packing, 40);
        let mut c = data::Cursor::default();
        let micro: Vec<data::MicroBatch> = (0..4).map(|_| loader.next(&mut c)).collect();
        let (r_ref, g_ref) = grads_with(m.as_ref(), &micro, None);
        let total: i64 = micro.iter().map(data::MicroBatch::tokens).sum();
        for budget in [10_000usize, 40] {
            let passes = step::coalesce(&micro, budget);
            assert_eq!(
                passes.iter().map(data::MicroBatch::trained_tokens).sum::<i64>(),
                r_ref.trained_tokens,
                "{family}: trained tokens"
            );
            assert_eq!(passes.iter().map(data::MicroBatch::tokens).sum::<i64>(), total);
            assert!(passes.iter().all(|p| p.input_ids.len() == 1
                && (p.tokens() as usize <= budget || p.seq_ids.as_ref().unwrap()[0].iter().all(|d| *d == 0))));
            if budget > total as usize {
                assert_eq!(passes.len(), 1);
            } else {
                assert!(passes.len() > 1);
            }
            let (r, g) = grads_with(m.as_ref(), &micro, Some(budget));
            assert_eq!(r.trained_tokens, r_ref.trained_tokens);
            assert!(
                (r.loss - r_ref.loss).abs() < 1e-6 * r_ref.loss,
                "{family} packing {packing} budget {budget}: loss {} vs {}",
                r.loss,
                r_ref.loss
            );
            let e = max_rel(&g, &g_ref);
            // fp32 rounding: the sums run in another order (one GEMM over the pass, not four).
            assert!(e < 5e-5, "{family} packing {packing} budget {budget}: gradients differ by {e:.2e} relative");
        }
    }
}

/// A later document's first token is never a target of the one before it, and documents keep
/// their own ids, when rows are coalesced.
#[test]
fn coalescing_masks_the_first_token_of_each_later_document() {
    let mb = |ids: Vec<Vec<i64>>, seq: Option<Vec<Vec<i64>>>| data::MicroBatch {
        labels: ids.clone(),
        input_ids: ids,
        seq_ids: seq,
    };
    let micro = [mb(vec![vec![1, 2, 3], vec![4, 5]], None), mb(vec![vec![6, 7, 8, 9]], Some(vec![vec![0, 0, 1, 1]]))];
    let passes = step::coalesce(&micro, 100);
    assert_eq!(passes.len(), 1);
    let p = &passes[0];
    assert_eq!(p.input_ids[0], vec![1, 2, 3, 4, 5, 6, 7, 8, 9]);
    assert_eq!(p.labels[0], vec![1, 2, 3, -100, 5, -100, 7, -100, 9]);
    assert_eq!(p.seq_ids.as_ref().unwrap()[0], vec![0, 0, 0, 1, 1, 2, 2, 3, 3]);
    let split = step::coalesce(&micro, 5);
    assert_eq!(
        split.iter().map(|p| p.input_ids[0].clone()).collect::<Vec<_>>(),
        vec![vec![1, 2, 3, 4, 5], vec![6, 7, 8, 9]]
    );
    assert_eq!(split[0].labels[0], vec![1, 2, 3, -100, 5]);
    assert_eq!(split[1].labels[0], vec![6, 7, -100, 9]);
    assert_eq!(split[1].seq_ids.as_ref().unwrap()[0], vec![0, 0, 1, 1]);
}

/// A NaN in the base weights stops the run at step 1 with the layer where it first appeared and
/// advice for that cause (not "lower the learning rate"), and leaves no adapter behind.
#[test]
fn a_non_finite_forward_is_reported_with_its_layer() {
    let d = tmp();
    let r = train_recipe(d.path(), "");
    edited_fixture("llama", &d.path().join("model"), |name, t| {
        if name == "model.layers.1.mlp.down_proj.weight" {
            let _ = t.get(0).get(0).fill_(f64::NAN);
            t
        } else {
            t
        }
    });
    let (code, _, err) =
        run(&["run", r.to_str().unwrap(), "--until", "train", "--set", "quantization.method=\"none\""]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("at step 1") && err.contains("the forward output of layer 1"), "{err}");
    assert!(err.contains("not the cause") && !err.contains("lower train.learning_rate"), "{err}");
    assert!(!d.path().join("runs/t/train/adapter").exists());
}

/// The training loss computes the logits as `softcap(h·Wᵀ)` from `lm_head_weight` and
/// `logit_softcap` and differentiates them itself (train/step.rs `chunked_ce_backward`): for
/// every family, that equals the family's own `logits`, and the loss and its gradient into the
/// final hidden state equal autograd through `cross_entropy(logits)` (ignored positions included).
#[test]
fn every_family_s_loss_equals_autograd_through_its_own_logits() {
    tch::manual_seed(7);
    for family in ["llama", "llama-tied", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "gemma3n"] {
        let m = lora_fixture(family, false, 3, 11);
        let hidden = m.config().hidden_size;
        let h = Tensor::randn([2, 6, hidden], (Kind::Float, Device::Cpu));
        let w = m.lm_head_weight();
        let raw = h.linear::<Tensor>(&w, None);
        let capped = match m.logit_softcap() {
            Some(c) => (&raw / c).tanh() * c,
            None => raw,
        };
        let e = (&capped - m.logits(&h)).abs().max().double_value(&[]);
        assert!(e < 1e-5, "{family}: logits differ from softcap(h·Wᵀ) by {e:.2e}");
        assert_eq!(m.logit_softcap().is_some(), family == "gemma2" || family == "gemma3n", "{family}");
        // The loss and dL/dh against autograd.
        let labels = Tensor::from_slice(&[5i64, 9, -100, 40, 2, 7, -100, -100, 11, 3, 250, 6]).view([2, 6]);
        let (denom, scale) = (7.0, 0.5);
        let x = h.set_requires_grad(true);
        let targets = Tensor::cat(&[labels.narrow(1, 1, 5), Tensor::full([2, 1], -100, (Kind::Int64, Device::Cpu))], 1);
        let logits = m.logits(&x).flatten(0, 1);
        let want = logits.cross_entropy_loss::<Tensor>(&targets.flatten(0, 1), None, tch::Reduction::Sum, -100, 0.0);
        let g_want = Tensor::run_backward(&[&want * (scale / denom)], &[&x], false, false).remove(0);
        let y = x.detach().set_requires_grad(true);
        let got = step::chunked_ce_backward(m.as_ref(), &y, &labels, denom, scale);
        let (lw, g) = (want.double_value(&[]), y.grad());
        assert!((got - lw).abs() < 1e-4 * lw, "{family}: loss {got} vs {lw}");
        let eg = (&g - &g_want).abs().max().double_value(&[]) / g_want.abs().max().double_value(&[]);
        assert!(eg < 1e-5, "{family}: dL/dh differs from autograd by {eg:.2e}");
    }
}
