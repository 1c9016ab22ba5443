//! The command line: `tuner run | validate | status | plan | import | score | generate | serve | verify`. Parses arguments with clap,
//! sets up logging and Ctrl-C, calls into the library, prints the error chain
//! and returns the exit code.

use crate::error::{exit_code, Failure};
use crate::pipeline::{self, RunContext, RunOptions};
use crate::recipe;
use anyhow::Result;
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tch::Device;

#[derive(Parser, Debug)]
#[command(name = "tuner", version, about = "Fine-tune open LLMs (LoRA and QLoRA) from TOML recipes")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args, Debug, Clone)]
struct RecipeArgs {
    /// The recipe file.
    recipe: PathBuf,
    /// Override a recipe key, e.g. `--set train.max_steps=10` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the pipeline: fetch → tokenize → train → evaluate → export.
    Run(RunArgs),
    /// Compare a finished run with its recipe's expectation file.
    Verify {
        /// The run dir.
        run_dir: PathBuf,
        /// The expectation file (default: the run's recipe's `<name>.expected.json`).
        #[arg(long, value_name = "FILE")]
        expected: Option<PathBuf>,
    },
    /// Estimate memory per component before anything is allocated.
    Plan {
        #[command(flatten)]
        recipe: RecipeArgs,
        #[arg(long)]
        run_dir: Option<PathBuf>,
        /// Print JSON: {"device", "shape", "items": [{"component", "bytes", "note"}], "total_bytes"}.
        #[arg(long)]
        json: bool,
    },
    /// Check a recipe without loading a model; reports every problem at once.
    Validate {
        #[command(flatten)]
        recipe: RecipeArgs,
    },
    /// Turn an Axolotl YAML or a TRL SFTConfig / transformers TrainingArguments config (JSON or
    /// YAML) into a tuner recipe; what cannot be carried over is listed, with reasons.
    Import {
        /// The config file.
        config: PathBuf,
        /// Write the recipe here (atomically); stdout when left out.
        #[arg(short = 'o', long = "output", value_name = "RECIPE")]
        output: Option<PathBuf>,
        /// Which tool wrote the config (default: told from its keys).
        #[arg(long = "from", value_enum)]
        from: Option<crate::import::Tool>,
        /// Replace the output file if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Score a JSONL dataset ({"text"} or {"messages"} rows): per-row and mean loss, perplexity.
    Score {
        #[command(flatten)]
        model: crate::model::open::ModelArgs,
        /// The JSONL file.
        #[arg(long)]
        data: PathBuf,
        /// Print {"rows", "tokens", "mean_loss", "perplexity", "per_row": [{"tokens", "loss"}]}.
        #[arg(long)]
        json: bool,
    },
    /// One training step's LoRA gradients on given rows (no optimizer step), through the path
    /// `tuner run` trains with; names where a NaN/inf first appears. For comparing with HF +
    /// peft (scripts/grad_parity.py) and for reporting a non-finite gradient on a checkpoint.
    Grads(GradsArgs),
    /// Check tuner's CUDA kernels (kernels/*.cu) against their CPU references on a GPU;
    /// `--bench` also times each against the card's copy bandwidth. Exits non-zero on a mismatch.
    Kernels {
        /// cuda | cuda:N.
        #[arg(long, default_value = "cuda")]
        device: recipe::DeviceSpec,
        #[arg(long)]
        bench: bool,
    },
    /// Generate text: `--prompt` prints one completion (streamed); without it, chat on the
    /// terminal (one message per line; /reset, /exit; end of input quits).
    Generate {
        #[command(flatten)]
        model: crate::model::open::ModelArgs,
        /// The prompt (encoded with the tokenizer's special tokens, e.g. BOS).
        #[arg(long)]
        prompt: Option<String>,
        /// Upper bound on generated tokens.
        #[arg(long, default_value_t = 256)]
        max_new_tokens: usize,
        /// Sampling temperature; 0 = greedy.
        #[arg(long, allow_negative_numbers = true, default_value_t = 0.0)]
        temperature: f64,
        /// Keep the k most likely tokens (0 = off).
        #[arg(long, default_value_t = 0)]
        top_k: usize,
        /// Nucleus sampling: keep the most likely tokens up to this probability mass (1 = off).
        #[arg(long, allow_negative_numbers = true, default_value_t = 1.0)]
        top_p: f64,
        /// Penalty on tokens already in the sequence, HF semantics (1 = off).
        #[arg(long, allow_negative_numbers = true, default_value_t = 1.0)]
        repetition_penalty: f64,
        /// Seed of the sampling draws.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Stop when the text contains this string; it is not printed (repeatable).
        #[arg(long, value_name = "STR")]
        stop: Vec<String>,
        /// Send --prompt as one user message through the model's chat template.
        #[arg(long)]
        chat: bool,
    },
    /// Serve a model over HTTP: /generate, OpenAI-compatible /v1/completions and
    /// /v1/chat/completions (SSE streaming), /v1/models, /health.
    Serve(crate::serve::ServeArgs),
    /// Show each stage of a run: missing, complete, stale, running or interrupted.
    Status {
        /// A recipe or a run dir.
        target: PathBuf,
        #[arg(long = "set", value_name = "KEY=VALUE")]
        set: Vec<String>,
        #[arg(long)]
        run_dir: Option<PathBuf>,
        /// Print JSON: {"run_dir", "stages": [{"name", "state", "artifacts"}]}.
        #[arg(long)]
        json: bool,
    },
}

/// `tuner run`'s flags.
#[derive(clap::Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    recipe: RecipeArgs,
    /// Run dir (default: <recipe dir>/<run.output_dir>/<run.name>).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Stop after this stage.
    #[arg(long, value_name = "STAGE")]
    until: Option<String>,
    /// Re-run from this stage on, even if complete.
    #[arg(long, value_name = "STAGE")]
    from: Option<String>,
    /// Worker threads for tokenize (results do not depend on it).
    #[arg(long)]
    threads: Option<usize>,
    /// Print the memory plan and stop; nothing is loaded.
    #[arg(long)]
    dry_run: bool,
    /// After the run, compare it with the recipe's `<name>.expected.json`; drift exits 1.
    #[arg(long)]
    verify: bool,
    /// After the run, record the recipe's `<name>.expected.json`.
    #[arg(long)]
    write_expected: bool,
    /// The expectation file for --verify/--write-expected (default: `<recipe dir>/<name>.expected.json`),
    /// e.g. one recorded for a CI-sized `--set` variant of the recipe.
    #[arg(long, value_name = "FILE")]
    expected: Option<PathBuf>,
    /// Train and evaluate on N GPUs of this host, one worker process each (data parallel,
    /// NCCL); overrides `[train] gpus`. torchrun/Slurm variables, when set, take precedence.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    gpus: Option<u64>,
}

/// `tuner grads`'s flags.
#[derive(clap::Args, Debug)]
struct GradsArgs {
    /// An HF folder, a bnb-4bit folder or a .gguf file.
    #[arg(long)]
    model: PathBuf,
    /// A PEFT adapter folder; its tensors are used as stored (B may be non-zero).
    #[arg(long)]
    adapter: PathBuf,
    /// JSONL rows {"input_ids": [...], "labels": [...]} (labels -100 where not trained,
    /// unshifted); all rows form one right-padded micro-batch.
    #[arg(long)]
    data: PathBuf,
    /// Where to write the fp32 gradients (safetensors, PEFT adapter keys).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value = "auto")]
    dtype: recipe::Dtype,
    /// auto | cpu | cuda | cuda:N.
    #[arg(long, default_value = "auto")]
    device: recipe::DeviceSpec,
    /// Quantize the base linears at load, as a QLoRA recipe does.
    #[arg(long, value_enum, default_value = "none")]
    quantize: GradsQuant,
    /// Pad id (default: the one training uses, the tokenizer's <|endoftext|> or its EOS).
    #[arg(long)]
    pad_id: Option<i64>,
    /// Without gradient checkpointing (one autograd pass).
    #[arg(long)]
    no_checkpointing: bool,
    /// Without the CUDA kernels and hand-written backward (the reference path).
    #[arg(long)]
    no_kernels: bool,
}

/// `tuner grads --quantize`.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum GradsQuant {
    None,
    /// NF4, blocks of 64, double quant (the QLoRA default).
    Nf4,
}

fn context(
    r: recipe::Loaded,
    run_dir: Option<PathBuf>,
    threads: Option<usize>,
    interrupted: Arc<AtomicBool>,
) -> Result<RunContext> {
    let run_dir = run_dir.unwrap_or_else(|| r.default_run_dir());
    let threads = threads.unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1));
    Ok(RunContext { recipe: r, run_dir, threads, interrupted, hub: crate::hub::HubConfig::from_env()?, dist: None })
}

/// "cpu" or "cuda": where a recipe's training ran (what an expectation file is valid for).
fn device_name(device: recipe::DeviceSpec) -> Result<String> {
    Ok(if device.resolve().is_cuda() { "cuda" } else { "cpu" }.to_string())
}

/// `tuner import`: convert, list what was left behind, write (or print) and validate the recipe.
fn import(config: &Path, output: Option<&Path>, from: Option<crate::import::Tool>, force: bool) -> Result<()> {
    let (tool, draft) = crate::import::import(config, from).map_err(|e| Failure::Usage(format!("{e:#}")))?;
    let text = crate::import::render(&draft, &config.display().to_string(), tool);
    for (k, why) in &draft.dropped {
        eprintln!("not carried over: {k}: {why}");
    }
    for n in &draft.notes {
        eprintln!("note: {n}");
    }
    let Some(out) = output else {
        print!("{text}");
        return Ok(());
    };
    if out.exists() && !force {
        return Err(Failure::Usage(format!("{} exists; pass --force to replace it", out.display())).into());
    }
    crate::util::write_atomic(out, text.as_bytes())?;
    eprintln!("wrote {} ({} config, {} key(s) not carried over)", out.display(), tool.name(), draft.dropped.len());
    if let Err(e) = recipe::load(out, &[]) {
        eprintln!("the recipe needs editing before it runs:\n{e:#}");
    }
    Ok(())
}

fn status(target: &Path, set: &[String], run_dir: Option<PathBuf>, json: bool) -> Result<()> {
    let never = Arc::new(AtomicBool::new(false));
    let (dir, ctx) = if target.is_dir() {
        // A run dir: compare with its recipe when that still loads.
        let rec: Option<pipeline::RunRecord> = crate::util::read_json(&target.join("tuner.lock.json")).ok();
        let ctx = rec
            .and_then(|r| recipe::load(Path::new(&r.recipe_path), set).ok())
            .and_then(|r| context(r, Some(target.to_path_buf()), None, never.clone()).ok());
        (target.to_path_buf(), ctx)
    } else {
        let ctx = context(recipe::load(target, set)?, run_dir, None, never.clone())?;
        (ctx.run_dir.clone(), Some(ctx))
    };
    let stages = pipeline::status(&dir, &crate::stages::all(), ctx.as_ref())?;
    if json {
        let v = serde_json::json!({
            "run_dir": dir.display().to_string(),
            "stages": stages.iter().map(|s| serde_json::json!({"name": s.name, "state": s.state, "fingerprint": s.fingerprint, "artifacts": s.artifacts})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("run dir: {}", dir.display());
        for s in &stages {
            let fp = s.fingerprint.as_deref().map(|f| &f[..12.min(f.len())]).unwrap_or("-");
            println!("  {:<9} {:<12} {:<12} {} artifacts", s.name, s.state, fp, s.artifacts.len());
        }
    }
    Ok(())
}

/// `tuner run` in this process (one process, or rank 0 of several): the pipeline, then
/// --write-expected / --verify.
fn lead(
    ctx: &RunContext,
    ra: &RecipeArgs,
    from: Option<String>,
    until: Option<String>,
    verify: bool,
    write_expected: bool,
    expected: Option<PathBuf>,
) -> Result<()> {
    pipeline::run(ctx, &crate::stages::all(), &RunOptions { from, until })?;
    let device = device_name(ctx.recipe.recipe.train.device)?;
    let expected = expected.unwrap_or_else(|| crate::verify::expected_path(&ra.recipe));
    if write_expected {
        crate::verify::write_expected(&expected, &ra.set, &ctx.run_dir, &device)?;
        eprintln!("wrote {}", expected.display());
    }
    if verify {
        crate::verify::verify(&expected, &ra.set, &ctx.run_dir, &device)?;
    }
    Ok(())
}

/// `tuner run`: the pipeline in this process, the launcher of `--gpus N` workers, or one rank
/// of several.
fn run(a: RunArgs, interrupted: Arc<AtomicBool>) -> Result<()> {
    let RunArgs { recipe: ra, run_dir, until, from, threads, dry_run, verify, write_expected, expected, gpus } = a;
    let r = recipe::load(&ra.recipe, &ra.set)?;
    let mut ctx = context(r, run_dir, threads, interrupted)?;
    if dry_run {
        let model = crate::stages::fetch::model_path(&ctx.recipe, &ctx.run_dir)?;
        eprint!("{}", crate::plan::render(&crate::plan::estimate(&ctx.recipe.recipe, &model)?));
        return Ok(());
    }
    // Several processes: launch them (`--gpus N`), or be one of them (torchrun, Slurm,
    // or our own launcher's variables). See crate::dist.
    let t = &ctx.recipe.recipe.train;
    let world = crate::dist::env::from_env(|k| std::env::var(k).ok()).map_err(|e| Failure::Usage(format!("{e:#}")))?;
    let gpus = gpus.unwrap_or(t.gpus) as usize;
    match world {
        None if gpus > 1 => {
            if let Some(why) = recipe::effective_batch_problem(t, gpus) {
                return Err(Failure::Usage(why).into());
            }
            if let recipe::DeviceSpec::Cuda(Some(_)) = t.device {
                return Err(Failure::Usage(format!("--gpus {gpus} starts one process per GPU (each on cuda:LOCAL_RANK), but train.device = \"{}\" names one GPU; set it to \"auto\" or \"cuda\"", t.device)).into());
            }
            return crate::dist::launch::run(gpus, &ctx.run_dir);
        }
        None => {}
        Some(w) => {
            let timeout = std::time::Duration::from_secs(t.collective_timeout_s);
            ctx.dist = Some(crate::dist::Dist::connect(w, t.device, timeout)?);
            let d = ctx.dist.as_ref().expect("just set");
            if !d.is_leader() {
                return crate::stages::follow(&ctx);
            }
            let res = lead(&ctx, &ra, from, until, verify, write_expected, expected);
            let told = d.finish(res.is_ok());
            return res.and(told);
        }
    }
    lead(&ctx, &ra, from, until, verify, write_expected, expected)
}

/// `tuner grads`.
fn grads(a: GradsArgs) -> Result<()> {
    let GradsArgs { model, adapter, data, out, dtype, device, quantize, pad_id, no_checkpointing, no_kernels } = a;
    let device = device.resolve();
    let hub = crate::hub::HubConfig::from_env()?;
    let cache = hub.tuner_cache_dir.clone();
    let dir = crate::model::open::resolve_dir(&model, &cache)?;
    let report = crate::train::probe::run(crate::train::probe::GradsInputs {
        model_dir: &dir,
        adapter: &adapter,
        rows: crate::train::probe::read_rows(&data)?,
        kind: crate::model::open::compute_kind(dtype, device),
        device,
        quantize: match quantize {
            GradsQuant::None => None,
            GradsQuant::Nf4 => Some((crate::quant::QuantType::Nf4, 64, true)),
        },
        pad_id,
        checkpointing: !no_checkpointing,
        kernels: !no_kernels,
    })?;
    crate::train::probe::write(&report, &out)?;
    println!("{}", serde_json::to_string(&report)?);
    if let Some(a) = &report.anomaly {
        eprintln!("grads: the first non-finite value appeared in {a}");
    }
    Ok(())
}

/// `tuner kernels`.
fn kernels(device: recipe::DeviceSpec, bench: bool) -> Result<()> {
    let device = device.resolve();
    let Device::Cuda(ordinal) = device else {
        return Err(Failure::Usage("tuner kernels needs a CUDA device (--device cuda[:N])".into()).into());
    };
    if !tch::Cuda::is_available() {
        return Err(Failure::Usage("no CUDA device is visible to libtorch".into()).into());
    }
    let k = crate::kernels::Kernels::compile(ordinal)?;
    let rows = crate::kernels::check::run(&k, device, bench, 0);
    let bw = bench.then(|| crate::kernels::check::copy_bandwidth(device));
    print!("{}", crate::kernels::check::table(&rows, bw));
    let bad: Vec<&str> = rows.iter().filter(|r| !r.ok()).map(|r| r.name.as_str()).collect();
    if !bad.is_empty() {
        anyhow::bail!("{} kernel(s) differ from their reference: {}", bad.len(), bad.join(", "));
    }
    Ok(())
}

fn dispatch(cli: Cli, interrupted: Arc<AtomicBool>) -> Result<()> {
    match cli.command {
        Command::Run(a) => run(a, interrupted),
        Command::Grads(a) => grads(a),
        Command::Kernels { device, bench } => kernels(device, bench),
        Command::Verify { run_dir, expected } => {
            let rec: pipeline::RunRecord = crate::util::read_json(&run_dir.join("tuner.lock.json"))
                .map_err(|e| Failure::Usage(format!("{} is not a run dir: {e}", run_dir.display())))?;
            let recipe_path = PathBuf::from(&rec.recipe_path);
            let r = recipe::load(&recipe_path, &rec.overrides)?;
            let expected = expected.unwrap_or_else(|| crate::verify::expected_path(&recipe_path));
            crate::verify::verify(&expected, &rec.overrides, &run_dir, &device_name(r.recipe.train.device)?)
        }
        Command::Plan { recipe: ra, run_dir, json } => {
            let r = recipe::load(&ra.recipe, &ra.set)?;
            let run_dir = run_dir.unwrap_or_else(|| r.default_run_dir());
            let p = crate::plan::estimate(&r.recipe, &crate::stages::fetch::model_path(&r, &run_dir)?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&p)?);
            } else {
                print!("{}", crate::plan::render(&p));
            }
            Ok(())
        }
        Command::Validate { recipe: ra } => {
            let r = recipe::load(&ra.recipe, &ra.set)?;
            for w in &r.warnings {
                eprintln!("warning: {w}");
            }
            println!("{}: ok (run dir {})", ra.recipe.display(), r.default_run_dir().display());
            Ok(())
        }
        Command::Status { target, set, run_dir, json } => status(&target, &set, run_dir, json),
        Command::Import { config, output, from, force } => import(&config, output.as_deref(), from, force),
        Command::Serve(args) => {
            let hub = crate::hub::HubConfig::from_env()?;
            let cache = hub.tuner_cache_dir.clone();
            crate::serve::run(&args, &cache, interrupted)
        }
        Command::Generate {
            model,
            prompt,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            repetition_penalty,
            seed,
            stop,
            chat,
        } => {
            let hub = crate::hub::HubConfig::from_env()?;
            let cache = hub.tuner_cache_dir.clone();
            let params = crate::generate::SamplingParams {
                max_new_tokens,
                temperature,
                top_k,
                top_p,
                repetition_penalty,
                seed,
                stop,
            };
            let args = crate::generate::terminal::GenerateArgs { model, prompt, chat, params, cache };
            crate::generate::terminal::run(&args, &interrupted)
        }
        Command::Score { model, data, json } => {
            let hub = crate::hub::HubConfig::from_env()?;
            let cache = hub.tuner_cache_dir.clone();
            let s = crate::score::run(&model, &data, &cache)?;
            if json {
                println!("{}", serde_json::to_string(&s)?);
            } else {
                println!(
                    "rows {}  tokens {}  mean loss {:.6}  perplexity {:.4}",
                    s.rows, s.tokens, s.mean_loss, s.perplexity
                );
            }
            Ok(())
        }
    }
}

/// Entry point for the binary: returns the process exit code.
pub fn main() -> i32 {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).format_timestamp(None).init();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() { 2 } else { 0 };
        }
    };
    let interrupted = Arc::new(AtomicBool::new(false));
    let flag = interrupted.clone();
    let _ = ctrlc::set_handler(move || {
        if flag.swap(true, Ordering::SeqCst) {
            eprintln!("\ninterrupted again: stopping now");
            std::process::exit(130);
        }
        eprintln!("\ninterrupt: finishing the current step, then stopping (Ctrl-C again to stop at once)");
    });
    match dispatch(cli, interrupted) {
        Ok(()) => 0,
        Err(e) => {
            match e.downcast_ref::<Failure>() {
                Some(Failure::Usage(msg)) => eprintln!("error: {msg}"),
                _ => eprintln!("error: {e:#}"),
            }
            exit_code(&e)
        }
    }
}
