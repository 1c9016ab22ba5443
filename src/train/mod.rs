//! The training loop, written out (nanoGPT-style): learning rate, micro-steps,
//! clip, step, log, checkpoint. Submodules hold the pieces: `data` (batches and
//! the resumable cursor), `step` (forward/backward with layer checkpointing and
//! chunked cross-entropy), `optim` (AdamW, 8-bit AdamW), `schedule`,
//! `checkpoint`, and `plot` (the loss curve).

pub mod checkpoint;
pub mod data;
pub mod offload;
pub mod optim;
pub mod plot;
pub mod probe;
pub mod schedule;
pub mod step;

use crate::error::Failure;
use crate::model::lora;
use crate::pipeline::RunContext;
use crate::progress::{Progress, Unit};
use crate::recipe::{DeviceSpec, Recipe, Switch, TargetModules};
use crate::util;
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use tch::{Device, Kind};

/// When `train.device = "auto"` resolved to the CPU: why, in a sentence for the log.
pub fn cpu_fallback_reason(setting: DeviceSpec, device: Device) -> Option<String> {
    if setting != DeviceSpec::Auto || device.is_cuda() {
        return None;
    }
    let build = crate::pipeline::libtorch_version();
    Some(if build.contains("+cpu") {
        format!("this libtorch ({build}) is a CPU-only build")
    } else {
        format!("libtorch {build} sees no CUDA device (no NVIDIA GPU or driver here, a driver too old for its CUDA version, or CUDA_VISIBLE_DEVICES hides the GPUs)")
    })
}

/// The LoRA settings of a recipe.
pub fn lora_spec(r: &Recipe) -> lora::LoraSpec {
    let targets = match &r.lora.target_modules {
        TargetModules::List(v) => lora::Targets::Names(v.clone()),
        TargetModules::Pattern(p) if p == "all-linear" => lora::Targets::AllLinear,
        TargetModules::Pattern(p) => lora::Targets::Regex(p.clone()),
    };
    lora::LoraSpec {
        r: r.lora.r as i64,
        alpha: r.lora.alpha,
        dropout: r.lora.dropout,
        use_rslora: r.lora.use_rslora,
        targets,
    }
}

/// The kernel-profile window from `TUNER_CUDA_PROFILE=STEP:LAYER` ([`step::ProfileWindow`]), on
/// CUDA only; a malformed value is an error that says the expected form.
fn profile_window(device: Device) -> Result<Option<step::ProfileWindow>> {
    let Ok(v) = std::env::var("TUNER_CUDA_PROFILE") else { return Ok(None) };
    let w = step::ProfileWindow::parse(&v)
        .with_context(|| format!("TUNER_CUDA_PROFILE={v:?}: expected STEP:LAYER, e.g. 2:10"))?;
    if !device.is_cuda() {
        log::warn!("TUNER_CUDA_PROFILE is set but training runs on {device:?}; no profile window");
        return Ok(None);
    }
    log::info!("CUDA profiler window: layer {} of step {}, first micro-batch (forward and backward)", w.layer, w.step);
    Ok(Some(w))
}

/// Whether to offload the checkpointed layer inputs (`train.offload_activations`): "on" and
/// "auto" apply only on CUDA with gradient checkpointing; "auto" when `tuner plan`'s estimate
/// exceeds 90% of the device's memory. Says what it decided.
fn offload_activations(ctx: &RunContext, dir: &Path, device: Device) -> Result<bool> {
    let t = &ctx.recipe.recipe.train;
    let possible = device.is_cuda() && t.gradient_checkpointing;
    let on = match t.offload_activations {
        Switch::Off => false,
        Switch::On if !possible => {
            log::warn!(
                "train.offload_activations = \"on\" needs a CUDA device and gradient checkpointing; not offloading"
            );
            false
        }
        Switch::On => true,
        Switch::Auto if !possible => false,
        Switch::Auto => {
            let Device::Cuda(i) = device else { return Ok(false) };
            let planned = crate::plan::estimate(&ctx.recipe, dir).map(|p| p.total_bytes).unwrap_or(0);
            let total = crate::device_mem::cuda_total_bytes(i).unwrap_or(u64::MAX);
            planned as f64 > 0.9 * total as f64
        }
    };
    if on {
        crate::train::offload::Offloader::new(device, 1)?;
        eprintln!("train: offloading the checkpointed layer inputs to pinned host memory (train.offload_activations)");
    }
    Ok(on)
}

/// The train examples of a run's tokenize stage, in shard order.
pub fn read_split(tokenize_dir: &Path, split: &str) -> Result<Vec<crate::data::shards::Example>> {
    let infos: Vec<crate::stages::tokenize::ShardInfo> = util::read_json(&tokenize_dir.join("shards.json"))?;
    let mut out = vec![];
    for i in infos.iter().filter(|i| i.split == split) {
        out.extend(crate::data::shards::read(&tokenize_dir.join(&i.file))?);
    }
    Ok(out)
}

/// Run (or resume) training in `dir` for a run whose train fingerprint is `fp`.
pub fn run(ctx: &RunContext, dir: &Path, fp: &str) -> Result<Vec<PathBuf>> {
    let r = &ctx.recipe.recipe;
    let t = &r.train;
    let model_rec = crate::stages::fetch::model_record(ctx)?;
    let tok = crate::data::tokenizer::Tok::load(&model_rec.dir)?;
    let examples = read_split(&ctx.stage_dir("tokenize"), "train")?;
    if examples.is_empty() {
        bail!("the tokenize stage produced no training examples");
    }
    // With several processes (crate::dist) each rank trains on its own device and draws
    // its block of every step's micro-batches; rank 0 alone writes files.
    let dist = ctx.dist.as_ref();
    let (rank, world) = dist.map(|d| (d.world.rank, d.world.world_size)).unwrap_or((0, 1));
    let leader = rank == 0;
    let device = match dist {
        Some(d) => d.device,
        None => t.device.resolve(),
    };
    let batching = crate::recipe::batching(t, world).map_err(Failure::Usage)?;
    if let (Some(why), true) = (cpu_fallback_reason(t.device, device), leader) {
        eprintln!("train: training on the CPU (train.device = \"auto\"): {why}");
    }
    let t_load = std::time::Instant::now();
    let mut model = crate::model::open::load_for_recipe(&model_rec.dir, r, device)?;
    let names = lora::attach(model.as_mut(), &lora_spec(r), r.run.seed as i64)?;
    let params = lora::trainable_parameters(model.as_ref());
    let n_params: i64 = params.iter().map(|p| p.numel() as i64).sum();
    let dist_params: Vec<tch::Tensor> =
        if dist.is_some() { params.iter().map(|p| p.shallow_clone()).collect() } else { vec![] };
    if leader {
        eprintln!(
            "train: {} on {:?} ({:?}), LoRA r={} on {} modules ({} trainable parameters), loaded in {:.1}s",
            model_rec.model_type,
            device,
            crate::model::open::compute_kind(r.model.dtype, device),
            r.lora.r,
            names.len(),
            n_params,
            t_load.elapsed().as_secs_f64()
        );
    }
    let mut opt = optim::AdamW::new(
        params,
        t.optimizer,
        optim::AdamWConfig { weight_decay: t.weight_decay, ..Default::default() },
    );
    let loader =
        data::Loader::new(examples, t.micro_batch_size as usize, r.run.seed, t.packing, t.max_seq_length as usize);
    let ga = batching.accum_per_rank;
    let micro_per_step = batching.micro_per_step();
    let total = schedule::total_steps(t, loader.micro_batches_per_epoch(), micro_per_step)?;

    if world > 1 && leader {
        eprintln!(
            "train: {world} processes; effective batch {} = micro-batch {} × accumulation {} × {world} processes{}",
            batching.effective_batch(),
            batching.micro_batch_size,
            ga,
            if t.keep_effective_batch {
                format!(" (train.keep_effective_batch: accumulation {} / {world})", t.gradient_accumulation_steps)
            } else {
                String::new()
            }
        );
    }

    // Resume from the newest checkpoint of this fingerprint; set older runs' checkpoints aside.
    let mut start = 0u64;
    let mut cursor = data::Cursor::default();
    if let Some(d) = dist {
        // Rank 0 decides (and sets old checkpoints aside); the others load what it names.
        let decided = d.agree("train-resume", || resume_decision(dir, fp, world, &batching))?;
        let step: u64 = decided.parse().unwrap_or(0);
        if step > 0 {
            let (p, path) = checkpoint::list(dir).into_iter().find(|(p, _)| p.step == step).with_context(|| {
                format!("rank {rank}: checkpoint step {step} is not readable here (is the run dir shared?)")
            })?;
            let (adapter, optim_state) = checkpoint::load(&path)?;
            lora::load_adapter_tensors(model.as_mut(), &adapter)?;
            opt.load_state(&optim_state, p.optimizer_step)?;
            start = p.step;
            cursor = p.cursor;
            if leader {
                eprintln!("train: resuming from {} (step {start} of {total})", path.display());
            }
        }
        // Every rank starts from rank 0's adapter (identical by construction; made certain).
        d.broadcast_params(&dist_params)?;
    }
    let ckpts = if dist.is_some() { vec![] } else { checkpoint::list(dir) };
    if ckpts.iter().any(|(p, _)| p.fingerprint != fp) {
        let aside = dir.join(format!(
            "checkpoints.old-{}",
            util::sha256_bytes(format!("{:?}", ckpts.last().map(|c| &c.0.fingerprint)).as_bytes())[..8].to_owned()
        ));
        std::fs::rename(checkpoint::dir(dir), &aside)?;
        eprintln!(
            "train: the recipe changed since the last checkpoints; training afresh (old checkpoints kept in {})",
            aside.display()
        );
    } else if let Some((p, path)) = ckpts.last() {
        checkpoint::check_world(p, path, 1, &batching)?;
        let (adapter, optim_state) = checkpoint::load(path)?;
        lora::load_adapter_tensors(model.as_mut(), &adapter)?;
        opt.load_state(&optim_state, p.optimizer_step)?;
        start = p.step;
        cursor = p.cursor;
        eprintln!("train: resuming from {} (step {start} of {total})", path.display());
    }
    let metrics_path = dir.join("metrics.jsonl");
    let mut history: Vec<serde_json::Value> = std::fs::read_to_string(&metrics_path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["step"].as_u64().is_some_and(|s| s <= start))
        .collect();
    let text: String = history.iter().map(|v| format!("{v}\n")).collect();
    let mut metrics: Box<dyn Write> = if leader {
        util::write_atomic(&metrics_path, text.as_bytes())?;
        Box::new(std::fs::OpenOptions::new().append(true).open(&metrics_path)?)
    } else {
        Box::new(std::io::sink())
    };

    // fp16 trains with dynamic loss scaling: start at 2^16, halve and skip the step on
    // non-finite gradients, double after 2000 good steps (torch.cuda.amp.GradScaler's rule).
    let fp16 = crate::model::open::compute_kind(r.model.dtype, device) == Kind::Half;
    let mut loss_scale = if fp16 { 65536.0 } else { 1.0 };
    let mut good_steps = 0u64;
    if let Some((p, _)) = checkpoint::list(dir).last().filter(|(p, _)| p.fingerprint == fp && p.step == start) {
        loss_scale = p.loss_scale;
    }
    let cuda_index = match device {
        Device::Cuda(i) => Some(i),
        _ => None,
    };
    if let Some(i) = cuda_index {
        crate::device_mem::reset_cuda_peak(i);
    }
    let mut opts = step::StepOptions {
        checkpointing: t.gradient_checkpointing,
        pad_id: crate::model::open::pad_id(&tok),
        pad_multiple: t.pad_to_multiple_of as usize,
        device,
        seed: crate::dist::dropout_seed(r.run.seed, rank),
        loss_scale,
        hand_backward: device.is_cuda() && t.cuda_kernels,
        offload: offload_activations(ctx, dir, device)?,
        profile: profile_window(device)?,
        coalesce: {
            let c = model.config();
            step::coalesce_budget(
                t,
                device,
                crate::model::open::compute_kind(r.model.dtype, device),
                c.head_dim,
                c.attn_logit_softcapping.is_some(),
            )
        },
        detect_anomaly: t.detect_anomaly,
    };
    if leader {
        if let Some(n) = opts.coalesce {
            eprintln!("train: each step's {micro_per_step} micro-batches run as packed varlen passes of up to {n} tokens (train.coalesce)");
        }
    }
    let bar = Progress::leader(leader, total, "train", Unit::Items("steps"));
    bar.set_position(start);
    let epoch_len = loader.micro_batches_per_epoch().max(1) as f64;
    let t_run = std::time::Instant::now();
    let mut first_step_logged = false;
    for s in start..total {
        let t0 = std::time::Instant::now();
        // The step's micro-batches come from one cursor shared by every rank; rank r trains
        // the r-th block of `ga` (all of them on one process).
        let mut micro: Vec<data::MicroBatch> = (0..micro_per_step).map(|_| loader.next(&mut cursor)).collect();
        let micro: Vec<data::MicroBatch> = micro.drain(crate::dist::shard_range(rank, ga)).collect();
        let lr = schedule::Schedule::for_train(t, total).lr(s);
        opt.zero_grad();
        opts.loss_scale = loss_scale;
        let mut res = step::forward_backward(model.as_ref(), &micro, s, &opts);
        let mut stop_all = false;
        if let Some(d) = dist {
            // Σ NLL, Σ trained tokens, Σ tokens and the stop flag over the world; then the
            // gradients, re-weighted from this rank's token count to the world's.
            let local_trained = res.trained_tokens as f64;
            let mut v = [
                res.loss * local_trained,
                local_trained,
                res.tokens as f64,
                ctx.interrupted.load(Ordering::SeqCst) as u8 as f64,
            ];
            d.all_reduce_f64(&mut v)
                .with_context(|| format!("rank {rank}: step {} stopped: another rank failed or timed out", s + 1))?;
            let weight = if v[1] > 0.0 { local_trained / v[1] } else { 0.0 };
            d.all_reduce_grads(&dist_params, weight)
                .with_context(|| format!("rank {rank}: step {} stopped: another rank failed or timed out", s + 1))?;
            res = step::StepResult {
                loss: v[0] / v[1].max(1.0),
                trained_tokens: v[1] as i64,
                tokens: v[2] as i64,
                anomaly: res.anomaly,
            };
            stop_all = v[3] > 0.0;
        }
        if fp16 {
            opt.scale_grads(1.0 / loss_scale);
        }
        let raw_norm = opt.clip_grad_norm(0.0);
        // fp16's loss scaler handles overflowing gradients below; anything else non-finite stops
        // the run before the adapter is touched, saying where it first appeared.
        if !res.loss.is_finite() || (!fp16 && !raw_norm.is_finite()) {
            let found = match res.anomaly.clone() {
                Some(a) => Some(a),
                None => {
                    opt.zero_grad();
                    step::forward_backward(
                        model.as_ref(),
                        &micro,
                        s,
                        &step::StepOptions { detect_anomaly: true, ..opts },
                    )
                    .anomaly
                }
            };
            let mut e = anyhow::anyhow!(nonfinite_report(
                s + 1,
                res.loss,
                raw_norm,
                found.as_ref(),
                crate::model::open::compute_kind(r.model.dtype, device)
            ));
            if dist.is_some() {
                e = e.context(format!("rank {rank}"));
            }
            return Err(e);
        }
        let grad_norm = if raw_norm.is_finite() { opt.clip_grad_norm(t.max_grad_norm) } else { raw_norm };
        if fp16 && !raw_norm.is_finite() {
            loss_scale /= 2.0;
            good_steps = 0;
            log::warn!("step {}: non-finite fp16 gradients; step skipped, loss scale lowered to {loss_scale}", s + 1);
        } else {
            let t_opt = std::time::Instant::now();
            opt.step(lr);
            if log::log_enabled!(target: "tuner::train::step", log::Level::Debug) {
                // What the optimizer adds to the peak (its f32 temporaries), beside the step's phases.
                if let Some(i) = cuda_index {
                    tch::Cuda::synchronize(i as i64);
                }
                let peak = cuda_index
                    .and_then(crate::device_mem::cuda)
                    .map(|m| format!(", peak so far {:.2} GiB", m.peak_allocated as f64 / (1u64 << 30) as f64));
                log::debug!(target: "tuner::train::step", "optimizer step {:.1} ms{}", t_opt.elapsed().as_secs_f64() * 1e3, peak.unwrap_or_default());
            }
            good_steps += 1;
            if fp16 && good_steps.is_multiple_of(2000) {
                loss_scale *= 2.0;
            }
        }
        let done = s + 1;
        let secs = t0.elapsed().as_secs_f64();
        let (mut peak, rss) = crate::device_mem::rss_bytes();
        let gpu = cuda_index.and_then(crate::device_mem::cuda);
        if let Some(g) = gpu {
            peak = g.peak_allocated as u64;
        }
        let epoch = (cursor.epoch as f64 + cursor.index as f64 / epoch_len).min(cursor.epoch as f64 + 1.0);
        let mut row = json!({
            "step": done, "epoch": (epoch * 1000.0).round() / 1000.0, "loss": res.loss, "lr": lr, "grad_norm": grad_norm,
            "tokens": res.tokens, "trained_tokens": res.trained_tokens, "tokens_per_s": res.tokens as f64 / secs.max(1e-9),
            "step_s": secs, "peak_mem_bytes": peak,
            "mem_source": if gpu.is_some() { "cuda_allocator_peak" } else { "rss_peak" },
            "loss_scale": loss_scale,
        });
        if world > 1 {
            row["world_size"] = json!(world);
            row["effective_batch"] = json!(batching.effective_batch());
        }
        writeln!(metrics, "{row}")?;
        history.push(row);
        if !first_step_logged && leader {
            eprintln!("train: first step done {:.1}s after the start of loading", t_load.elapsed().as_secs_f64());
            first_step_logged = true;
        }
        if done % t.logging_steps == 0 || done == total {
            let msg = format!(
                "step {done}/{total} loss {:.4} lr {:.2e} grad {:.3} {:.0} tok/s",
                res.loss,
                lr,
                grad_norm,
                res.tokens as f64 / secs.max(1e-9)
            );
            if !bar.is_bar() && leader {
                // This line carries the ETA: the plain progress line is not due again for a while.
                bar.touch();
                bar.set_position(done);
                let eta = bar.eta().map(|e| format!(", ETA {}", crate::progress::duration(e))).unwrap_or_default();
                eprintln!("train: {msg} epoch {epoch:.2}{eta}");
            }
            bar.set_message(msg);
        }
        if leader && t.memory_log_steps > 0 && done % t.memory_log_steps == 0 {
            let gib = |b: i64| b as f64 / 1073741824.0;
            match gpu {
                Some(g) => eprintln!(
                    "train: GPU memory at step {done}: allocated {:.2} GiB, peak {:.2} GiB, reserved {:.2} GiB (peak {:.2} GiB)",
                    gib(g.allocated), gib(g.peak_allocated), gib(g.reserved), gib(g.peak_reserved)
                ),
                None => eprintln!("train: memory at step {done}: peak RSS {:.2} GiB, current {:.2} GiB", gib(peak as i64), gib(rss as i64)),
            }
        }
        bar.set_position(done);
        let stop = if dist.is_some() { stop_all } else { ctx.interrupted.load(Ordering::SeqCst) };
        if leader && (done % t.save_steps == 0 || done == total || stop) {
            let p = checkpoint::Progress {
                step: done,
                total_steps: total,
                cursor,
                fingerprint: fp.to_string(),
                rng: "derived from run.seed, step, micro-batch and layer; data order from run.seed and epoch".into(),
                seed: r.run.seed,
                optimizer_step: opt.step,
                loss_scale,
                world: (world > 1).then(|| checkpoint::World::of(world, &batching, r.run.seed, cursor)),
            };
            checkpoint::save(
                dir,
                &p,
                &lora::adapter_tensors(model.as_ref()),
                &opt.state_tensors(),
                t.keep_checkpoints as usize,
            )?;
        }
        if stop && done < total {
            bar.abandon();
            return Err(Failure::Interrupted(format!(
                "training stopped after step {done} of {total}; a checkpoint was written; run the same command again to resume"
            ))
            .into());
        }
    }
    bar.finish();
    if !leader {
        return Ok(vec![]);
    }
    let first = history.first().and_then(|v| v["loss"].as_f64()).unwrap_or(f64::NAN);
    let last = history.last().and_then(|v| v["loss"].as_f64()).unwrap_or(f64::NAN);
    eprintln!("train: {} steps in {:.1}s; loss {first:.4} → {last:.4}", total - start, t_run.elapsed().as_secs_f64());

    let base_name = match ctx.recipe.source(&r.model.source) {
        crate::recipe::Source::Hub { repo } => repo,
        crate::recipe::Source::Local(p) => p.display().to_string(),
    };
    let mut files = crate::model::open::write_peft_adapter(&dir.join("adapter"), model.as_ref(), r, &base_name)?;
    let losses: Vec<(f64, f64)> =
        history.iter().filter_map(|v| Some((v["step"].as_f64()?, v["loss"].as_f64()?))).collect();
    plot::line_png(&dir.join("loss.png"), "train loss", &losses)?;
    files.push(dir.join("loss.png"));
    files.push(metrics_path);
    Ok(files)
}

/// The error for a step whose loss or gradient norm is non-finite: the step, where the first
/// non-finite value appeared (`found`, from the step re-run with checks), and advice that fits
/// that place. No optimizer step was taken, so the last checkpoint is the adapter before it.
fn nonfinite_report(step: u64, loss: f64, grad_norm: f64, found: Option<&step::Anomaly>, kind: Kind) -> String {
    use step::Phase;
    let what = if loss.is_finite() {
        format!("the gradient norm became {grad_norm} (loss {loss:.4})")
    } else {
        format!("the loss became {loss}")
    };
    let mut msg = format!("train: {what} at step {step}");
    let Some(a) = found else {
        msg.push_str("; re-running the step with checks found no non-finite value (non-deterministic?); set train.detect_anomaly = true to check every step");
        return msg;
    };
    msg.push_str(&format!(". The first non-finite value appeared in {a}. "));
    let dtype = format!("{kind:?}").to_lowercase();
    let lr_note = if step == 1 {
        "This is the first step, before any update, so the learning rate is not the cause. "
    } else {
        ""
    };
    msg.push_str(lr_note);
    msg.push_str(&match a.phase {
        Phase::Embed => "The checkpoint's embedding table holds NaN/inf: check the model file.".to_string(),
        Phase::Forward if step == 1 => format!(
            "The base model's activations overflow {dtype} (or its weights hold NaN/inf): try model.dtype = \"fp32\" to confirm, and check the checkpoint (`tuner grads` runs this one step on chosen rows)."
        ),
        Phase::Forward | Phase::Loss if step > 1 => "The adapter diverged: lower train.learning_rate, raise train.warmup_steps, or keep train.max_grad_norm at 1.0.".to_string(),
        Phase::Forward | Phase::Loss => format!("The logits overflow {dtype} or the loss's inputs hold NaN/inf: try model.dtype = \"fp32\" to confirm."),
        Phase::Backward | Phase::LossBackward => format!(
            "The forward pass was finite, so this is a derivative at a singular point (a square root or a division by a norm that is zero) or an overflow of {dtype} in the backward: a defect in tuner's backward for this model. Please report it with the output of `tuner grads` on these rows; model.dtype = \"fp32\" or train.cuda_kernels = false may avoid it meanwhile."
        ),
    });
    msg
}

/// Rank 0's resume decision for a multi-process run: the step to resume from ("0": afresh,
/// old checkpoints of another recipe set aside), or an error when the newest checkpoint was
/// written by a different number of processes.
fn resume_decision(dir: &Path, fp: &str, world: usize, batching: &crate::recipe::Batching) -> Result<String> {
    let ckpts = checkpoint::list(dir);
    if ckpts.iter().any(|(p, _)| p.fingerprint != fp) {
        let aside = dir.join(format!(
            "checkpoints.old-{}",
            util::sha256_bytes(format!("{:?}", ckpts.last().map(|c| &c.0.fingerprint)).as_bytes())[..8].to_owned()
        ));
        std::fs::rename(checkpoint::dir(dir), &aside)?;
        eprintln!(
            "train: the recipe changed since the last checkpoints; training afresh (old checkpoints kept in {})",
            aside.display()
        );
        return Ok("0".into());
    }
    let Some((p, path)) = ckpts.last() else { return Ok("0".into()) };
    checkpoint::check_world(p, path, world, batching)?;
    Ok(p.step.to_string())
}
