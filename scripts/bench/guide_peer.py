#!/usr/bin/env python3
"""The guide's job (guide_race.sh), part 2: the two Python peers, HF transformers + peft +
bitsandbytes and Unsloth, training on tuner's tokenized rows in tuner's order.

    guide_peer.py hf|unsloth MODEL_DIR --run-dir TUNER_RUN --out JSON [--adapter-dir DIR]
        [--device cuda] [--t-launch EPOCH] [--pad-multiple 8] [--workdir DIR]

TUNER_RUN is a tuner run dir after `tuner run RECIPE --until tokenize`; every setting comes from
its recipe.resolved.toml (guide_job.py writes the recipe), the rows from its Arrow shards.

Same for both peers, as the guide's SFTTrainer would do it:
- data: the shards' examples, micro-batches in tuner's order (quality_common.Loader: SplitMix64
  shuffle per epoch, micro_batch_size rows each, no packing), right-padded to the longest row
  rounded up to a multiple of --pad-multiple (8, as DataCollatorForSeq2Seq(pad_to_multiple_of=8)),
  attention mask 0 and labels -100 on the padding; labels -100 on the prompt (tuner's shards);
- loss: model(input_ids, attention_mask, labels, num_items_in_batch=N) with N the step's trained
  tokens (labels != -100 after the shift) over its gradient_accumulation_steps micro-batches,
  i.e. summed NLL / N, as transformers' Trainer does; backward per micro-batch; the step's loss
  is the sum of the micro-batches' losses;
- bf16 weights and bf16 autocast around the forward on CUDA (Trainer(bf16=True)); fp32 on the CPU;
- bitsandbytes PagedAdamW8bit (betas 0.9/0.999, eps 1e-8; unpaged on the CPU), the recipe's
  weight decay, clip at max_grad_norm, and the lr of optimizer step s set by hand from the
  recipe's schedule (quality_common.lr_at = get_linear_schedule_with_warmup);
- LoRA r/alpha/dropout/targets from the recipe, bias "none", initialised from --lora-seed
  (default run.seed); the final adapter saved with save_pretrained into --adapter-dir.
HF: AutoModelForCausalLM with BitsAndBytesConfig(NF4, double quant, bf16 compute; Gemma 3n keeps
AltUp's small linears and lm_head unquantized), SDPA, non-reentrant gradient checkpointing, peft
get_peft_model. Unsloth: FastLanguageModel (FastModel for Gemma 3n) .from_pretrained(load_in_4bit,
max_seq_length) and .get_peft_model(use_gradient_checkpointing=True, as the guide sets it;
--unsloth-gc unsloth for its offloaded variant, random_state=--lora-seed).

Reports (JSON): per step loss, lr, grad norm, tokens (non-padding), padded tokens, trained tokens,
step seconds (synchronised); load seconds; first step seconds from the start of loading; seconds
from --t-launch (the shell's clock when it started this process) to the saved adapter; peak GPU
memory while training (reset after setup, as tuner does) and while loading. Each step is also
appended to JSON.steps.jsonl as it ends, so a peer cut off by its time limit still shows how far
it got. guide_report.py turns these into the table.
"""
import argparse
import json
import math
import os
import signal
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("peer", choices=["hf", "unsloth"])
    ap.add_argument("model_dir")
    ap.add_argument("--run-dir", required=True, help="tuner run dir after its tokenize stage")
    ap.add_argument("--out", required=True)
    ap.add_argument("--adapter-dir", default=None, help="save the final adapter here (default: next to --out)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--t-launch", type=float, default=None, help="epoch seconds when the process was launched")
    ap.add_argument("--pad-multiple", type=int, default=8)
    ap.add_argument("--steps", type=int, default=None, help="default: the recipe's max_steps")
    ap.add_argument("--lora-seed", type=int, default=None, help="default: the recipe's run.seed")
    ap.add_argument("--optim", choices=["paged_adamw_8bit", "adamw_8bit"], default="paged_adamw_8bit")
    ap.add_argument("--unsloth-gc", choices=["true", "unsloth"], default="true",
                    help="Unsloth's use_gradient_checkpointing: True or \"unsloth\" (offloaded)")
    ap.add_argument("--workdir", default=None, help="cwd while running (Unsloth writes unsloth_compiled_cache/ there)")
    a = ap.parse_args()
    t_launch = a.t_launch if a.t_launch is not None else time.time()
    a.model_dir, a.run_dir, a.out = map(os.path.abspath, (a.model_dir, a.run_dir, a.out))
    a.adapter_dir = os.path.abspath(a.adapter_dir or os.path.splitext(a.out)[0] + "-adapter")
    if a.workdir:
        os.makedirs(a.workdir, exist_ok=True)
        os.chdir(a.workdir)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")

    rep = {"peer": a.peer, "ok": False, "model_dir": a.model_dir, "run_dir": a.run_dir, "steps": [],
           "t_launch": t_launch}
    steps_path = a.out + ".steps.jsonl"
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    if os.path.exists(steps_path):
        os.remove(steps_path)

    def on_term(signum, _frame):  # `timeout` sends SIGTERM: leave a JSON that says how far we got
        raise SystemExit(f"stopped by signal {signum} (time limit)")

    signal.signal(signal.SIGTERM, on_term)
    try:
        run(a, rep, t_launch, steps_path)
    except BaseException as e:  # noqa: BLE001 - guide_race.sh records the failure and goes on
        import traceback

        tb = traceback.format_exc()
        rep.update({"ok": False, "error": f"{type(e).__name__}: {e}"[:2000], "traceback": tb[-6000:]})
        write(a.out, rep)
        print(tb, file=sys.stderr)
        return 1
    write(a.out, rep)
    return 0


def write(path, rep):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(rep, f, indent=1)
    os.replace(path + ".tmp", path)


def load_hf(a, rec, dev, kind, rep):
    import torch
    import bench_common as bc
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig
    from peft import LoraConfig, get_peft_model

    lo, q, t = rec["lora"], rec["quantization"], rec["train"]
    cfg = AutoConfig.from_pretrained(a.model_dir)
    is_gemma3n = bc.text_config(cfg).model_type.startswith("gemma3n")
    kw = dict(dtype=kind, attn_implementation="sdpa", device_map={"": (dev.index or 0) if dev.type == "cuda" else "cpu"})
    if q["method"] != "none":
        qkw = dict(load_in_4bit=True, bnb_4bit_quant_type=q["method"], bnb_4bit_use_double_quant=bool(q["double_quant"]),
                   bnb_4bit_compute_dtype=kind)
        if is_gemma3n:
            qkw["llm_int8_skip_modules"] = bc.GEMMA3N_SKIP
        kw["quantization_config"] = BitsAndBytesConfig(**qkw)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, **kw)
    model.config.use_cache = False
    if t.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(a.lora_seed)
    model = get_peft_model(model, LoraConfig(
        r=int(lo["r"]), lora_alpha=float(lo["alpha"]), lora_dropout=float(lo["dropout"]),
        target_modules=list(lo["target_modules"]), bias="none", use_rslora=bool(lo.get("use_rslora", False)),
        task_type="CAUSAL_LM"))
    model.train()
    rep["settings"].update({
        "quant": f"bnb {q['method']} dq={q['double_quant']} compute {kind}" if q["method"] != "none" else "none",
        "skip_modules": bc.GEMMA3N_SKIP if is_gemma3n else None, "attn": model.config._attn_implementation,
        "grad_ckpt": "non-reentrant" if getattr(model, "is_gradient_checkpointing", False) else "off",
    })
    return model


def load_unsloth(a, rec, dev, kind, rep):
    import bench_common as bc
    from unsloth import FastLanguageModel, FastModel
    from transformers import AutoConfig

    lo, q, t = rec["lora"], rec["quantization"], rec["train"]
    cfg = AutoConfig.from_pretrained(a.model_dir)
    is_gemma3n = bc.text_config(cfg).model_type.startswith("gemma3n")
    Fast = FastModel if is_gemma3n else FastLanguageModel
    gc = True if a.unsloth_gc == "true" else "unsloth"
    if not t.get("gradient_checkpointing"):
        gc = False
    model, _tok = Fast.from_pretrained(
        model_name=a.model_dir, max_seq_length=int(t["max_seq_length"]), dtype=kind,
        load_in_4bit=q["method"] != "none", full_finetuning=False, use_gradient_checkpointing=gc)
    model = Fast.get_peft_model(
        model, r=int(lo["r"]), lora_alpha=float(lo["alpha"]), lora_dropout=float(lo["dropout"]),
        target_modules=list(lo["target_modules"]), bias="none", use_gradient_checkpointing=gc,
        random_state=a.lora_seed, use_rslora=bool(lo.get("use_rslora", False)))
    if hasattr(Fast, "for_training"):
        Fast.for_training(model)
    else:
        model.train()
    rep["settings"].update({"api": Fast.__name__, "quant": "unsloth load_in_4bit (nf4 + double quant)",
                            "grad_ckpt": repr(gc)})
    return model


def run(a, rep, t_launch, steps_path):
    if a.peer == "unsloth":
        import unsloth  # noqa: F401 - before transformers and peft: it patches them on import
    import torch
    import transformers
    import peft
    import bitsandbytes as bnb
    import quality_common as qc

    try:  # no per-tensor progress bars in the logs
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch sees no GPU")
    rec = qc.read_recipe(a.run_dir)
    t, lo = rec["train"], rec["lora"]
    if t.get("packing"):
        raise RuntimeError("the guide's job has packing = false; this peer does not pack")
    if isinstance(lo["target_modules"], str):
        raise RuntimeError("lora.target_modules must be a list here")
    kind = {"auto": torch.bfloat16 if cuda else torch.float32, "bf16": torch.bfloat16, "fp32": torch.float32}.get(rec["model"]["dtype"])
    if kind is None:
        raise RuntimeError(f"model.dtype {rec['model']['dtype']!r} not mirrored here")
    autocast = cuda and kind == torch.bfloat16
    seed = int(rec["run"]["seed"])
    if a.lora_seed is None:
        a.lora_seed = seed
    total = int(a.steps or t["max_steps"])
    ga, mbs = int(t["gradient_accumulation_steps"]), int(t["micro_batch_size"])
    lr0, wd, max_norm = float(t["learning_rate"]), float(t["weight_decay"]), float(t["max_grad_norm"])
    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                "bitsandbytes": bnb.__version__}
    if a.peer == "unsloth":
        import unsloth

        versions["unsloth"] = unsloth.__version__
        try:
            import unsloth_zoo

            versions["unsloth_zoo"] = getattr(unsloth_zoo, "__version__", "?")
        except Exception:  # noqa: BLE001
            pass
    rep["versions"] = versions
    rep["settings"] = {
        "device": str(dev), "dtype": str(kind), "autocast_bf16": autocast, "seed": seed, "lora_seed": a.lora_seed,
        "steps": total, "micro_batch_size": mbs, "gradient_accumulation_steps": ga, "max_seq_length": t["max_seq_length"],
        "pad_multiple": a.pad_multiple, "lr": lr0, "scheduler": t["lr_scheduler"], "warmup_steps": t["warmup_steps"],
        "weight_decay": wd, "max_grad_norm": max_norm,
        "optimizer": ("bnb.PagedAdamW8bit" if a.optim == "paged_adamw_8bit" else "bnb.AdamW8bit") + ("" if cuda else " (unpaged on CPU)"),
        "lora": f"r{lo['r']} alpha {lo['alpha']} dropout {lo['dropout']} {','.join(lo['target_modules'])}",
        "loss": "sum NLL / trained tokens of the step (num_items_in_batch)",
    }
    rep["t_imported"] = time.time() - t_launch

    # ---- data: tuner's examples and order
    train = qc.read_split(a.run_dir, "train")
    loader = qc.Loader(train, mbs, seed, False, int(t["max_seq_length"]))

    # ---- model, adapter, optimizer (the first-step clock starts here)
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
        torch.cuda.synchronize(dev)
    t0 = time.time()
    model = (load_hf if a.peer == "hf" else load_unsloth)(a, rec, dev, kind, rep)
    pad_id = model.config.pad_token_id if getattr(model.config, "pad_token_id", None) is not None else 0
    if isinstance(pad_id, list):
        pad_id = pad_id[0]
    params = [p for p in model.parameters() if p.requires_grad]
    Opt = bnb.optim.PagedAdamW8bit if a.optim == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    opt = Opt(params, lr=lr0, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
    if cuda:
        torch.cuda.synchronize(dev)
    t_loaded = time.time()
    peak_load = torch.cuda.max_memory_allocated(dev) if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)
    rep.update({"load_s": t_loaded - t0, "trainable_params": sum(p.numel() for p in params),
                "linear4bit_modules": sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit")})
    print(f"{a.peer}: loaded in {t_loaded - t0:.1f}s ({t_loaded - t_launch:.1f}s after launch), "
          f"{rep['trainable_params']:,} trainable parameters", file=sys.stderr, flush=True)

    # ---- the 60 steps
    sf = open(steps_path, "a")
    for s in range(total):
        ts = time.time()
        lr = qc.lr_at(t["lr_scheduler"], lr0, s, int(t["warmup_steps"]), int(t["max_steps"]))
        for g in opt.param_groups:
            g["lr"] = lr
        micro = [loader.next() for _ in range(ga)]
        denom = sum(qc.trained_tokens(m[1]) for m in micro)
        n_items = torch.tensor(max(denom, 1), device=dev)
        loss_t = torch.zeros((), device=dev, dtype=torch.float32)
        padded = 0
        for ids_rows, lab_rows, _ in micro:
            ids, lab, mask, p = qc.pad_batch(ids_rows, lab_rows, pad_id, dev, a.pad_multiple)
            padded += p
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=autocast):
                out = model(input_ids=ids, attention_mask=mask, labels=lab, num_items_in_batch=n_items)
            l = out.loss
            del out
            l.backward()
            loss_t += l.detach().float()
        if max_norm > 0:
            gn = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        else:
            gn = float(torch.norm(torch.stack([p.grad.float().norm() for p in params if p.grad is not None])))
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = float(loss_t)
        if cuda:
            torch.cuda.synchronize(dev)
        te = time.time()
        if s == 0:
            rep["first_step_s"] = te - t0
        row = {"step": s + 1, "loss": loss, "lr": lr, "grad_norm": gn,
               "tokens": sum(len(r) for m in micro for r in m[0]), "padded_tokens": padded,
               "trained_tokens": denom, "step_s": te - ts}
        rep["steps"].append(row)
        sf.write(json.dumps(row) + "\n")
        sf.flush()
        if not math.isfinite(loss):
            raise RuntimeError(f"loss became {loss} at step {s + 1}")
        print(f"{a.peer}: step {s + 1}/{total} loss {loss:.4f} lr {lr:.2e} grad {gn:.3f} "
              f"{denom / (te - ts):,.0f} trained tok/s ({te - ts:.2f}s)", file=sys.stderr, flush=True)
    sf.close()
    rep["peak_bytes"] = torch.cuda.max_memory_allocated(dev) if cuda else None
    rep["peak_load_bytes"] = peak_load
    rep["train_s"] = time.time() - t_loaded

    model.save_pretrained(a.adapter_dir)
    rep["to_adapter_s"] = time.time() - t_launch
    rep["adapter_dir"] = a.adapter_dir
    rep["ok"] = True
    print(f"{a.peer}: adapter saved to {a.adapter_dir}, {rep['to_adapter_s']:.1f}s after launch", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
