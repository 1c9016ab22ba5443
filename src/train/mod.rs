//! The training loop, written out (nanoGPT-style): learning rate, micro-steps,
//! clip, step, log, checkpoint. Submodules hold the pieces: `data` (batches and
//! the resumable cursor), `step` (forward/backward with layer checkpointing and
//! chunked cross-entropy), `optim` (AdamW, 8-bit AdamW), `schedule`,
//! `checkpoint`, `plot` (the loss curve, redrawn at every logging interval) and
//! `tensorboard` (event files under `tb/`).

pub mod checkpoint;
pub mod data;
pub mod offload;
pub mod optim;
pub mod plot;
pub mod probe;
pub mod schedule;
pub mod step;
pub mod tensorboard;

use crate::data::shards::Example;
use crate::dist::Dist;
use crate::error::Failure;
use crate::model::lora;
use crate::progress::{Progress, Unit};
use crate::recipe::{DeviceSpec, Recipe, Switch, TargetModules, TrainSection};
use crate::util;
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use tch::{Device, Kind};

/// When `train.device = "auto"` resolved to the CPU: why, in a sentence for the log.
pub fn cpu_fallback_reason(setting: DeviceSpec, device: Device) -> Option<String> {
    if setting != DeviceSpec::Auto || device.is_cuda() {
        return None;
    }
    let build = crate::util::libtorch_version();
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

/// The op census when `TUNER_OP_CENSUS=1` ([`crate::kernels::op_census`]); it reports with the
/// step's phase timings (`RUST_LOG=tuner::train::step=debug`).
fn op_census() -> Result<Option<crate::kernels::op_census::OpCensus>> {
    match std::env::var("TUNER_OP_CENSUS").as_deref() {
        Err(_) | Ok("0") | Ok("") => Ok(None),
        Ok("1") => {
            let c = crate::kernels::op_census::OpCensus::start()?;
            if !log::log_enabled!(target: "tuner::train::step", log::Level::Debug) {
                log::warn!("TUNER_OP_CENSUS=1 reports with RUST_LOG=tuner::train::step=debug, which is not set");
            }
            log::info!("op census on: libtorch calls are counted per step phase (each costs ~1 µs more)");
            Ok(Some(c))
        }
        Ok(v) => anyhow::bail!("TUNER_OP_CENSUS={v:?}: expected 1 (on) or 0 (off)"),
    }
}

/// Whether to offload the checkpointed layer inputs (`train.offload_activations`): "on" and
/// "auto" apply only on CUDA with gradient checkpointing; "auto" follows `tuner plan`'s decision
/// (`planned`, [`crate::plan::auto_offload`]: on where the host has room). Says what it decided.
fn offload_activations(t: &TrainSection, planned: Option<bool>, device: Device) -> Result<bool> {
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
        Switch::Auto => possible && planned.unwrap_or(false),
    };
    if on {
        crate::train::offload::Offloader::new(device, 1)?;
        eprintln!("train: offloading the checkpointed layer inputs to pinned host memory (train.offload_activations)");
    }
    Ok(on)
}

/// What training needs, resolved from the run folder by the train stage.
pub struct TrainInputs<'a> {
    pub recipe: &'a Recipe,
    /// The base model's HF folder.
    pub model_dir: &'a Path,
    /// How the adapter names its base (`base_model_name_or_path`).
    pub base_name: String,
    /// The tokenized training examples, in shard order.
    pub examples: Vec<Example>,
    /// The tokenized eval examples, for `train.eval_steps` (empty when off).
    pub eval_examples: Vec<Example>,
    /// The train fingerprint: checkpoints written under another one are set aside.
    pub fingerprint: &'a str,
    /// `tuner plan`'s decision for `offload_activations = "auto"` ([`crate::plan::auto_offload`]).
    pub planned_offload: Option<bool>,
    /// Set by Ctrl-C: training stops after the step, with a checkpoint.
    pub interrupted: &'a AtomicBool,
    /// The process group when this process is one rank of several.
    pub dist: Option<&'a Dist>,
}

/// Run (or resume) training, writing checkpoints, `metrics.jsonl`, `adapter/` and `loss.png`
/// into `dir`; returns the files written (none on ranks other than 0).
pub fn run(mut inp: TrainInputs, dir: &Path) -> Result<Vec<PathBuf>> {
    let examples = std::mem::take(&mut inp.examples);
    let mut s = Session::open(&inp, examples, dir)?;
    let t = &inp.recipe.train;
    let t_run = std::time::Instant::now();
    for step in s.start..s.total {
        let t0 = std::time::Instant::now();
        let (res, lr, grad_norm) = s.step(step)?;
        let done = step + 1;
        let secs = t0.elapsed().as_secs_f64();
        let eval = s.eval_due(done)?;
        s.log(done, &res, lr, grad_norm, secs, eval)?;
        let stop = s.stop_requested();
        if s.leader && (done.is_multiple_of(t.save_steps) || done == s.total || stop) {
            s.save(done)?;
        }
        if stop && done < s.total {
            s.bar.abandon();
            return Err(Failure::Interrupted(format!(
                "training stopped after step {done} of {}; a checkpoint was written; run the same command again to resume",
                s.total
            ))
            .into());
        }
    }
    s.bar.finish();
    if !s.leader {
        return Ok(vec![]);
    }
    s.finish(t_run)
}

/// fp16's dynamic loss scaling (torch.cuda.amp.GradScaler's rule): start at 2^16, halve and
/// skip the step on non-finite gradients, double after 2000 good steps. Off (scale 1, every
/// step taken), for other dtypes.
struct LossScaler {
    on: bool,
    scale: f64,
    good_steps: u64,
}

impl LossScaler {
    fn new(on: bool) -> LossScaler {
        LossScaler { on, scale: if on { 65536.0 } else { 1.0 }, good_steps: 0 }
    }

    /// After a backward whose unscaled gradient norm is `raw_norm`: whether to take the
    /// optimizer step, adjusting the scale.
    fn update(&mut self, raw_norm: f64, step: u64) -> bool {
        if self.on && !raw_norm.is_finite() {
            self.scale /= 2.0;
            self.good_steps = 0;
            log::warn!("step {step}: non-finite fp16 gradients; step skipped, loss scale lowered to {}", self.scale);
            return false;
        }
        self.good_steps += 1;
        if self.on && self.good_steps.is_multiple_of(2000) {
            self.scale *= 2.0;
        }
        true
    }
}

/// One training run's state, from loading to the adapter.
struct Session<'a> {
    inp: &'a TrainInputs<'a>,
    dir: &'a Path,
    model: Box<dyn crate::model::CausalLm>,
    opt: optim::AdamW,
    loader: data::Loader,
    cursor: data::Cursor,
    batching: crate::recipe::Batching,
    opts: step::StepOptions,
    scaler: LossScaler,
    /// LoRA parameters shared with the process group (empty on one process).
    dist_params: Vec<tch::Tensor>,
    /// Whether any rank was interrupted during the last step (all-reduced with its loss).
    stop_all: bool,
    rank: usize,
    world: usize,
    leader: bool,
    start: u64,
    total: u64,
    history: Vec<serde_json::Value>,
    metrics: Box<dyn Write>,
    /// TensorBoard events under `tb/` (rank 0).
    tb: Option<tensorboard::EventWriter>,
    bar: Progress,
    t_load: std::time::Instant,
    first_step_logged: bool,
}

impl<'a> Session<'a> {
    /// Load the model with fresh LoRA adapters, build the optimizer and the data loader,
    /// resume from the newest checkpoint of this fingerprint, and open `metrics.jsonl`.
    fn open(inp: &'a TrainInputs<'a>, examples: Vec<Example>, dir: &'a Path) -> Result<Session<'a>> {
        let (r, t) = (inp.recipe, &inp.recipe.train);
        if examples.is_empty() {
            bail!("the tokenize stage produced no training examples");
        }
        // With several processes (crate::dist) each rank trains on its own device and draws
        // its block of every step's micro-batches; rank 0 alone writes files.
        let (rank, world) = inp.dist.map(|d| (d.world.rank, d.world.world_size)).unwrap_or((0, 1));
        let leader = rank == 0;
        let device = inp.dist.map(|d| d.device).unwrap_or_else(|| t.device.resolve());
        let compute = crate::model::open::compute_kind(r.model.dtype, device);
        let batching = crate::recipe::batching(t, world).map_err(Failure::Usage)?;
        if let (Some(why), true) = (cpu_fallback_reason(t.device, device), leader) {
            eprintln!("train: training on the CPU (train.device = \"auto\"): {why}");
        }
        let t_load = std::time::Instant::now();
        let tok = crate::data::tokenizer::Tok::load(inp.model_dir)?;
        let mut model = crate::model::open::load_for_recipe(inp.model_dir, r, device)?;
        let names = lora::attach(model.as_mut(), &lora_spec(r), r.run.seed as i64)?;
        let params = lora::trainable_parameters(model.as_ref());
        let n_params: i64 = params.iter().map(|p| p.numel() as i64).sum();
        let dist_params = if inp.dist.is_some() { params.iter().map(|p| p.shallow_clone()).collect() } else { vec![] };
        if leader {
            eprintln!(
                "train: {} on {device:?} ({compute:?}), LoRA r={} on {} modules ({n_params} trainable parameters), loaded in {:.1}s",
                model.config().model_type,
                r.lora.r,
                names.len(),
                t_load.elapsed().as_secs_f64()
            );
        }
        let opt = optim::AdamW::new(
            params,
            t.optimizer,
            optim::AdamWConfig { weight_decay: t.weight_decay, ..Default::default() },
        )
        .with_kernels(model.kernels());
        let loader =
            data::Loader::new(examples, t.micro_batch_size as usize, r.run.seed, t.packing, t.max_seq_length as usize);
        let micro_per_step = batching.micro_per_step();
        let total = schedule::total_steps(t, loader.micro_batches_per_epoch(), micro_per_step)?;
        if world > 1 && leader {
            eprintln!("train: {}", describe_world(t, &batching));
        }
        let coalesce = {
            let c = model.config();
            step::coalesce_budget(t, device, compute, c.head_dim, c.attn_logit_softcapping.is_some())
        };
        let opts = step::StepOptions {
            checkpointing: t.gradient_checkpointing,
            pad_id: crate::model::open::pad_id(&tok),
            pad_multiple: t.pad_to_multiple_of as usize,
            device,
            seed: crate::dist::dropout_seed(r.run.seed, rank),
            loss_scale: 1.0,
            hand_backward: device.is_cuda() && t.cuda_kernels,
            offload: offload_activations(t, inp.planned_offload, device)?,
            profile: profile_window(device)?,
            coalesce,
            detect_anomaly: t.detect_anomaly,
            op_census: op_census()?,
        };
        let mut s = Session {
            inp,
            dir,
            model,
            opt,
            loader,
            cursor: data::Cursor::default(),
            batching,
            opts,
            scaler: LossScaler::new(compute == Kind::Half),
            dist_params,
            stop_all: false,
            rank,
            world,
            leader,
            start: 0,
            total,
            history: vec![],
            metrics: Box::new(std::io::sink()),
            tb: None,
            bar: Progress::hidden(),
            t_load,
            first_step_logged: false,
        };
        s.begin()?;
        Ok(s)
    }

    /// Resume, open the metrics, reset the device's peak counter and start the progress bar.
    fn begin(&mut self) -> Result<()> {
        self.resume()?;
        self.open_metrics()?;
        if let Device::Cuda(i) = self.opts.device {
            crate::device_mem::reset_cuda_peak(i);
        }
        if let (Some(n), true) = (self.opts.coalesce, self.leader) {
            let micro_per_step = self.batching.micro_per_step();
            eprintln!("train: each step's {micro_per_step} micro-batches run as packed varlen passes of up to {n} tokens (train.coalesce)");
        }
        let t = &self.inp.recipe.train;
        if t.eval_steps > 0 && self.inp.eval_examples.is_empty() && self.leader {
            log::warn!(
                "train.eval_steps = {} but the run has no eval split; no eval loss while training",
                t.eval_steps
            );
        }
        self.bar = Progress::leader(self.leader, self.total, "train", Unit::Items("steps"));
        self.bar.set_position(self.start);
        Ok(())
    }

    /// Continue from the newest checkpoint of this fingerprint; set older recipes' checkpoints
    /// aside. With several processes rank 0 decides and the others load what it names.
    fn resume(&mut self) -> Result<()> {
        let (dir, fp) = (self.dir, self.inp.fingerprint);
        let chosen = if let Some(d) = self.inp.dist {
            let decided = d.agree("train-resume", || resume_decision(dir, fp, self.world, &self.batching))?;
            let step: u64 = decided.parse().unwrap_or(0);
            let found = (step > 0)
                .then(|| {
                    checkpoint::list(dir).into_iter().find(|(p, _)| p.step == step).with_context(|| {
                        format!(
                            "rank {}: checkpoint step {step} is not readable here (is the run dir shared?)",
                            self.rank
                        )
                    })
                })
                .transpose()?;
            found
        } else {
            let ckpts = checkpoint::list(dir);
            if ckpts.iter().any(|(p, _)| p.fingerprint != fp) {
                set_aside(dir, &ckpts)?;
                None
            } else if let Some((p, path)) = ckpts.last() {
                checkpoint::check_world(p, path, 1, &self.batching)?;
                Some((p.clone(), path.clone()))
            } else {
                None
            }
        };
        if let Some((p, path)) = chosen {
            let (adapter, optim_state) = checkpoint::load(&path)?;
            lora::load_adapter_tensors(self.model.as_mut(), &adapter)?;
            self.opt.load_state(&optim_state, p.optimizer_step)?;
            self.start = p.step;
            self.cursor = p.cursor;
            self.scaler.scale = p.loss_scale;
            if self.leader {
                eprintln!("train: resuming from {} (step {} of {})", path.display(), self.start, self.total);
            }
        }
        if let Some(d) = self.inp.dist {
            // Every rank starts from rank 0's adapter (identical by construction; made certain).
            d.broadcast_params(&self.dist_params)?;
        }
        Ok(())
    }

    /// `metrics.jsonl` up to the resumed step (rank 0; the others write nowhere).
    fn open_metrics(&mut self) -> Result<()> {
        let path = self.dir.join("metrics.jsonl");
        self.history = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["step"].as_u64().is_some_and(|s| s <= self.start))
            .collect();
        if self.leader {
            let text: String = self.history.iter().map(|v| format!("{v}\n")).collect();
            util::write_atomic(&path, text.as_bytes())?;
            self.metrics = Box::new(std::fs::OpenOptions::new().append(true).open(&path)?);
            self.tb = Some(tensorboard::EventWriter::create(&self.dir.join("tb"))?);
        }
        Ok(())
    }

    /// One optimizer step (0-based `s`): its micro-batches forward and backward, the gradients
    /// summed over the process group, clipped, and applied. Returns the step's result, its
    /// learning rate and the gradient norm before clipping.
    fn step(&mut self, s: u64) -> Result<(step::StepResult, f64, f64)> {
        let t = &self.inp.recipe.train;
        let t_start = std::time::Instant::now();
        let ga = self.batching.accum_per_rank;
        // The step's micro-batches come from one cursor shared by every rank; rank r trains
        // the r-th block of `ga` (all of them on one process).
        let mut micro: Vec<data::MicroBatch> =
            (0..self.batching.micro_per_step()).map(|_| self.loader.next(&mut self.cursor)).collect();
        let micro: Vec<data::MicroBatch> = micro.drain(crate::dist::shard_range(self.rank, ga)).collect();
        let lr = schedule::Schedule::for_train(t, self.total).lr(s);
        self.opt.zero_grad();
        self.opts.loss_scale = self.scaler.scale;
        let before = t_start.elapsed();
        let mut res = step::forward_backward(self.model.as_ref(), &micro, s, &self.opts);
        let t_after = std::time::Instant::now();
        if let Some(d) = self.inp.dist {
            res = self.reduce(d, res, s)?;
        }
        if self.scaler.on {
            self.opt.scale_grads(1.0 / self.scaler.scale);
        }
        let raw_norm = self.opt.grad_norm();
        // fp16's loss scaler handles overflowing gradients; anything else non-finite stops
        // the run before the adapter is touched, saying where it first appeared.
        if !res.loss.is_finite() || (!self.scaler.on && !raw_norm.is_finite()) {
            return Err(self.nonfinite(&res, raw_norm, &micro, s));
        }
        if raw_norm.is_finite() {
            self.opt.clip_grads(raw_norm, t.max_grad_norm);
        }
        let grad_norm = raw_norm;
        let after = t_after.elapsed();
        if self.scaler.update(raw_norm, s + 1) {
            let t_opt = std::time::Instant::now();
            self.opt.step(lr);
            self.debug_step_host(before, after, t_opt);
        }
        Ok((res, lr, grad_norm))
    }

    /// Σ NLL, Σ trained tokens, Σ tokens and the stop flag over the world; then the gradients,
    /// re-weighted from this rank's token count to the world's.
    fn reduce(&mut self, d: &Dist, res: step::StepResult, s: u64) -> Result<step::StepResult> {
        let local_trained = res.trained_tokens as f64;
        let mut v = [
            res.loss * local_trained,
            local_trained,
            res.tokens as f64,
            self.inp.interrupted.load(Ordering::SeqCst) as u8 as f64,
        ];
        let failed = || format!("rank {}: step {} stopped: another rank failed or timed out", self.rank, s + 1);
        d.all_reduce_f64(&mut v).with_context(failed)?;
        let weight = if v[1] > 0.0 { local_trained / v[1] } else { 0.0 };
        d.all_reduce_grads(&self.dist_params, weight).with_context(failed)?;
        self.stop_all = v[3] > 0.0;
        Ok(step::StepResult {
            loss: v[0] / v[1].max(1.0),
            trained_tokens: v[1] as i64,
            tokens: v[2] as i64,
            anomaly: res.anomaly,
        })
    }

    /// The error for a non-finite step, after re-running it with checks to find where.
    fn nonfinite(
        &mut self,
        res: &step::StepResult,
        raw_norm: f64,
        micro: &[data::MicroBatch],
        s: u64,
    ) -> anyhow::Error {
        let found = res.anomaly.clone().or_else(|| {
            self.opt.zero_grad();
            let checked = step::StepOptions { detect_anomaly: true, ..self.opts };
            step::forward_backward(self.model.as_ref(), micro, s, &checked).anomaly
        });
        let kind = crate::model::open::compute_kind(self.inp.recipe.model.dtype, self.opts.device);
        let e = anyhow::anyhow!(nonfinite_report(s + 1, res.loss, raw_norm, found.as_ref(), kind));
        if self.inp.dist.is_some() {
            e.context(format!("rank {}", self.rank))
        } else {
            e
        }
    }

    /// With `RUST_LOG=tuner::train::step=debug`: the time around the passes (`before`: the batch
    /// and zeroing the gradients; `after`: the gradient norm and clipping, which waits for the
    /// backward to finish on the device), the optimizer's time and what it adds to the peak (its
    /// temporaries), beside the step's phases.
    fn debug_step_host(&self, before: std::time::Duration, after: std::time::Duration, t_opt: std::time::Instant) {
        if !log::log_enabled!(target: "tuner::train::step", log::Level::Debug) {
            return;
        }
        let cuda = match self.opts.device {
            Device::Cuda(i) => Some(i),
            _ => None,
        };
        if let Some(i) = cuda {
            tch::Cuda::synchronize(i as i64);
        }
        let peak = cuda
            .and_then(crate::device_mem::cuda)
            .map(|m| format!(", peak so far {:.2} GiB", m.peak_allocated as f64 / (1u64 << 30) as f64));
        let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
        log::debug!(
            target: "tuner::train::step",
            "around the passes: batch + zero grads {:.1} ms, norm + clip {:.1} ms, optimizer step {:.1} ms{}",
            ms(before),
            ms(after),
            ms(t_opt.elapsed()),
            peak.unwrap_or_default()
        );
    }

    /// The step's row in `metrics.jsonl`, its line every `logging_steps`, and the memory line
    /// every `memory_log_steps`.
    fn log(
        &mut self,
        done: u64,
        res: &step::StepResult,
        lr: f64,
        grad_norm: f64,
        secs: f64,
        eval: Option<f64>,
    ) -> Result<()> {
        let t = &self.inp.recipe.train;
        let (mut peak, rss) = crate::device_mem::rss_bytes();
        let gpu = match self.opts.device {
            Device::Cuda(i) => crate::device_mem::cuda(i),
            _ => None,
        };
        if let Some(g) = gpu {
            peak = g.peak_allocated as u64;
        }
        let epoch_len = self.loader.micro_batches_per_epoch().max(1) as f64;
        let c = self.cursor;
        let epoch = (c.epoch as f64 + c.index as f64 / epoch_len).min(c.epoch as f64 + 1.0);
        let tok_s = res.tokens as f64 / secs.max(1e-9);
        let mut row = json!({
            "step": done, "epoch": (epoch * 1000.0).round() / 1000.0, "loss": res.loss, "lr": lr, "grad_norm": grad_norm,
            "tokens": res.tokens, "trained_tokens": res.trained_tokens, "tokens_per_s": tok_s,
            "step_s": secs, "peak_mem_bytes": peak,
            "mem_source": if gpu.is_some() { "cuda_allocator_peak" } else { "rss_peak" },
            "loss_scale": self.scaler.scale,
        });
        if let Some(e) = eval {
            row["eval_loss"] = json!(e);
        }
        if self.world > 1 {
            row["world_size"] = json!(self.world);
            row["effective_batch"] = json!(self.batching.effective_batch());
        }
        writeln!(self.metrics, "{row}")?;
        if let Some(tb) = self.tb.as_mut() {
            tb.scalars(done, &tb_scalars(&row))?;
        }
        self.history.push(row);
        if !self.first_step_logged && self.leader {
            eprintln!("train: first step done {:.1}s after the start of loading", self.t_load.elapsed().as_secs_f64());
            self.first_step_logged = true;
        }
        if done.is_multiple_of(t.logging_steps) || done == self.total {
            let msg = format!(
                "step {done}/{} loss {:.4} lr {lr:.2e} grad {grad_norm:.3} {tok_s:.0} tok/s",
                self.total, res.loss
            );
            if !self.bar.is_bar() && self.leader {
                // This line carries the ETA: the plain progress line is not due again for a while.
                self.bar.touch();
                self.bar.set_position(done);
                let eta = self.bar.eta().map(|e| format!(", ETA {}", crate::progress::duration(e))).unwrap_or_default();
                eprintln!("train: {msg} epoch {epoch:.2}{eta}");
            }
            self.bar.set_message(msg);
            if self.leader {
                plot::loss_png(&self.dir.join("loss.png"), &self.history)?;
            }
        }
        if self.leader && t.memory_log_steps > 0 && done.is_multiple_of(t.memory_log_steps) {
            let gib = |b: i64| b as f64 / 1073741824.0;
            match gpu {
                Some(g) => eprintln!(
                    "train: GPU memory at step {done}: allocated {:.2} GiB, peak {:.2} GiB, reserved {:.2} GiB (peak {:.2} GiB)",
                    gib(g.allocated), gib(g.peak_allocated), gib(g.reserved), gib(g.peak_reserved)
                ),
                None => eprintln!("train: memory at step {done}: peak RSS {:.2} GiB, current {:.2} GiB", gib(peak as i64), gib(rss as i64)),
            }
        }
        self.bar.set_position(done);
        Ok(())
    }

    /// The mean loss over the eval examples when `train.eval_steps` falls due after `done`
    /// steps (all ranks take part, each its share of the batches, summed over the group).
    fn eval_due(&mut self, done: u64) -> Result<Option<f64>> {
        let t = &self.inp.recipe.train;
        if t.eval_steps == 0 || !done.is_multiple_of(t.eval_steps) || self.inp.eval_examples.is_empty() {
            return Ok(None);
        }
        let (mut nll, mut n) = step::eval_loss(
            self.model.as_ref(),
            &self.inp.eval_examples,
            t.micro_batch_size as usize,
            &self.opts,
            (self.rank, self.world),
            &Progress::hidden(),
        );
        if let Some(d) = self.inp.dist {
            let mut v = [nll, n as f64];
            d.all_reduce_f64(&mut v)?;
            (nll, n) = (v[0], v[1] as i64);
        }
        Ok((n > 0).then(|| nll / n as f64))
    }

    /// Ctrl-C: on one process this process's flag; with several, any rank's (all-reduced).
    fn stop_requested(&self) -> bool {
        if self.inp.dist.is_some() {
            self.stop_all
        } else {
            self.inp.interrupted.load(Ordering::SeqCst)
        }
    }

    /// A checkpoint after `done` steps: adapter, optimizer state and the data cursor.
    fn save(&self, done: u64) -> Result<()> {
        let (r, t) = (self.inp.recipe, &self.inp.recipe.train);
        let p = checkpoint::Progress {
            step: done,
            total_steps: self.total,
            cursor: self.cursor,
            fingerprint: self.inp.fingerprint.to_string(),
            rng: "derived from run.seed, step, micro-batch and layer; data order from run.seed and epoch".into(),
            seed: r.run.seed,
            optimizer_step: self.opt.step,
            loss_scale: self.scaler.scale,
            world: (self.world > 1).then(|| checkpoint::World::of(self.world, &self.batching, r.run.seed, self.cursor)),
        };
        checkpoint::save(
            self.dir,
            &p,
            &lora::adapter_tensors(self.model.as_ref()),
            &self.opt.state_tensors(),
            t.keep_checkpoints as usize,
        )?;
        Ok(())
    }

    /// The trained adapter (PEFT layout) and the loss curve.
    fn finish(self, t_run: std::time::Instant) -> Result<Vec<PathBuf>> {
        let first = self.history.first().and_then(|v| v["loss"].as_f64()).unwrap_or(f64::NAN);
        let last = self.history.last().and_then(|v| v["loss"].as_f64()).unwrap_or(f64::NAN);
        eprintln!(
            "train: {} steps in {:.1}s; loss {first:.4} → {last:.4}",
            self.total - self.start,
            t_run.elapsed().as_secs_f64()
        );
        let dir = self.dir;
        let mut files = crate::model::open::write_peft_adapter(
            &dir.join("adapter"),
            self.model.as_ref(),
            self.inp.recipe,
            &self.inp.base_name,
        )?;
        plot::loss_png(&dir.join("loss.png"), &self.history)?;
        files.push(dir.join("loss.png"));
        files.push(dir.join("metrics.jsonl"));
        Ok(files)
    }
}

/// A `metrics.jsonl` row's TensorBoard scalars (`train/*`, and `eval/loss` where present).
fn tb_scalars(row: &serde_json::Value) -> Vec<(&'static str, f32)> {
    let keys = [
        ("train/loss", "loss"),
        ("train/lr", "lr"),
        ("train/grad_norm", "grad_norm"),
        ("train/tokens_per_s", "tokens_per_s"),
        ("train/peak_mem_bytes", "peak_mem_bytes"),
        ("eval/loss", "eval_loss"),
    ];
    keys.iter().filter_map(|(tag, k)| Some((*tag, row[*k].as_f64()? as f32))).collect()
}

/// The data-parallel batch of a multi-process run, for the log.
fn describe_world(t: &TrainSection, b: &crate::recipe::Batching) -> String {
    let world = b.world_size;
    let kept = if t.keep_effective_batch {
        format!(" (train.keep_effective_batch: accumulation {} / {world})", t.gradient_accumulation_steps)
    } else {
        String::new()
    };
    format!(
        "{world} processes; effective batch {} = micro-batch {} × accumulation {} × {world} processes{kept}",
        b.effective_batch(),
        b.micro_batch_size,
        b.accum_per_rank
    )
}

/// Move a folder of checkpoints written under another recipe aside (kept, not deleted).
fn set_aside(dir: &Path, ckpts: &[(checkpoint::Progress, PathBuf)]) -> Result<()> {
    let aside = dir.join(format!(
        "checkpoints.old-{}",
        util::sha256_bytes(format!("{:?}", ckpts.last().map(|c| &c.0.fingerprint)).as_bytes())[..8].to_owned()
    ));
    std::fs::rename(checkpoint::dir(dir), &aside)?;
    eprintln!(
        "train: the recipe changed since the last checkpoints; training afresh (old checkpoints kept in {})",
        aside.display()
    );
    Ok(())
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
        set_aside(dir, &ckpts)?;
        return Ok("0".into());
    }
    let Some((p, path)) = ckpts.last() else { return Ok("0".into()) };
    checkpoint::check_world(p, path, world, batching)?;
    Ok(p.step.to_string())
}
