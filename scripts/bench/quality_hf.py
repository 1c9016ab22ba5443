#!/usr/bin/env python3
"""The HF transformers + peft + bitsandbytes side of the quality comparison (quality.sh): QLoRA
with a tuner run's settings, on that run's tokenized examples in tuner's order, from tuner's
initial adapter; then the eval loss before and after, as tuner's evaluate stage computes it.

    quality_hf.py MODEL_DIR --run-dir TUNER_RUN --out JSON [--device cuda] [--tuner-adapter DIR]

MODEL_DIR: an HF folder with the base weights (quality_gguf.py writes one from the GGUF with
transformers' importer). TUNER_RUN: a tuner run dir after its tokenize stage; its
recipe.resolved.toml gives every setting (seed, steps, lr, schedule, warm-up, optimizer, weight
decay, clipping, micro-batch, accumulation, LoRA r/alpha/dropout/targets, quantization, dtype).

Same as tuner (src/train/*):
- data: the run's Arrow shards, batched and ordered by quality_common.Loader (tuner's Loader),
  right-padded to the longest row with an attention mask; labels -100 on prompt and padding;
- loss: summed token NLL over every micro-batch of the optimizer step / their trained-token count
  (not a mean of per-batch means), logits in fp32;
- LoRA: A = tuner's initial A (same SplitMix64 stream, quality_common.lora_a_init), B = 0;
- optimizer: adamw_8bit -> bitsandbytes AdamW8bit (blockwise, min_8bit_size 4096, as tuner's
  8-bit AdamW); adamw -> torch.optim.AdamW; betas (0.9, 0.999), eps 1e-8; clip at
  max_grad_norm; lr per optimizer step from quality_common.lr_at (= transformers'
  get_*_schedule_with_warmup);
- NF4/FP4 with bitsandbytes (blocksize 64, double quant as the recipe says), compute dtype = the
  recipe's dtype ("auto": bf16 on CUDA, fp32 on the CPU), bf16 autocast on CUDA as
  Trainer(bf16=True); non-reentrant gradient checkpointing when the recipe asks for it; SDPA;
- eval: the eval split in shard order, eval.batch_size rows at a time, summed NLL / tokens;
  "before" with the adapter disabled. With --tuner-adapter, also the eval loss of tuner's final
  adapter computed by this code (separates eval-code differences from training differences).
"""
import argparse
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import quality_common as qc  # noqa: E402

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir")
    ap.add_argument("--run-dir", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tuner-adapter", default=None, help="tuner's train/adapter to evaluate with this code too")
    ap.add_argument("--wait-adapter", type=float, default=0,
                    help="seconds to wait for --tuner-adapter to appear (tuner running alongside)")
    ap.add_argument("--save-adapter", default=None, help="write the final adapter here (peft save_pretrained)")
    ap.add_argument("--tag", default="hf")
    a = ap.parse_args()
    rep = {"peer": "hf", "tag": a.tag, "ok": False, "run_dir": os.path.abspath(a.run_dir), "model_dir": os.path.abspath(a.model_dir)}
    try:
        run(a, rep)
    except BaseException as e:  # noqa: BLE001 - quality.sh reports the failure and goes on
        import traceback

        rep.update({"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-4000:]})
        write(a.out, rep)
        traceback.print_exc()
        return 1
    write(a.out, rep)
    return 0


def write(path, rep):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(rep, f, indent=1)
    os.replace(path + ".tmp", path)


def summed_nll(model, ids, lab, mask, autocast_dtype, dev):
    """Σ NLL over positions t whose label[t+1] != -100 (fp32 logits), and that count."""
    import torch
    import torch.nn.functional as F

    with torch.autocast(device_type=dev.type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    logits = logits[:, :-1, :].float()
    target = lab[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100, reduction="sum")
    return nll, int((target != -100).sum().item())


def eval_loss(model, examples, batch, pad_id, autocast_dtype, dev):
    import torch

    tot, n = 0.0, 0
    with torch.no_grad():
        for k in range(0, len(examples), batch):
            chunk = examples[k:k + batch]
            ids, lab, mask, _ = qc.pad_batch([e[0] for e in chunk], [e[1] for e in chunk], pad_id, dev)
            s, c = summed_nll(model, ids, lab, mask, autocast_dtype, dev)
            tot += s.double().item()
            n += c
    return tot / max(n, 1), n


def run(a, rep):
    import torch
    import transformers
    import peft
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from peft import LoraConfig, get_peft_model

    try:  # no per-tensor progress bars in the logs
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass
    t_start = time.time()
    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch sees no GPU")
    rec = qc.read_recipe(a.run_dir)
    t, lo, q, ev = rec["train"], rec["lora"], rec["quantization"], rec["eval"]
    seed = int(rec["run"]["seed"])
    dtype_name = rec["model"]["dtype"]
    kind = {"auto": torch.bfloat16 if cuda else torch.float32, "bf16": torch.bfloat16, "fp32": torch.float32,
            "fp16": torch.float16}[dtype_name]
    if kind == torch.float16:
        raise RuntimeError("fp16 needs tuner's dynamic loss scaling; not mirrored here")
    if t.get("packing"):
        raise RuntimeError("train.packing = true is not mirrored here (document-masked attention)")
    if q["method"] != "none" and int(q["block_size"]) != 64:
        raise RuntimeError("bitsandbytes' 4-bit blocksize is 64 here; the recipe has " + str(q["block_size"]))
    if isinstance(lo["target_modules"], str):
        raise RuntimeError("lora.target_modules must be a list here")
    autocast_dtype = kind if (cuda and kind != torch.float32) else None
    torch.manual_seed(seed)
    rep["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                       "bitsandbytes": bnb.__version__}

    # ---- data, exactly tuner's
    train = qc.read_split(a.run_dir, "train")
    evals = qc.read_split(a.run_dir, "eval")
    loader = qc.Loader(train, int(t["micro_batch_size"]), seed, bool(t["packing"]), int(t["max_seq_length"]))
    pad_id = 0  # <|endoftext|> in SmolLM2's vocabulary (tuner's pad); masked out either way

    # ---- model
    kw = dict(dtype=kind, attn_implementation="sdpa", device_map={"": dev.index or 0} if cuda else {"": "cpu"})
    if q["method"] != "none":
        kw["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=q["method"], bnb_4bit_use_double_quant=bool(q["double_quant"]),
            bnb_4bit_compute_dtype=kind)
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, **kw)
    model.config.use_cache = False
    if t.get("gradient_checkpointing"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = list(lo["target_modules"])
    model = get_peft_model(model, LoraConfig(r=int(lo["r"]), lora_alpha=float(lo["alpha"]), lora_dropout=float(lo["dropout"]),
                                             target_modules=targets, bias="none", use_rslora=bool(lo.get("use_rslora", False)),
                                             task_type="CAUSAL_LM"))
    # tuner's initial A: one stream over the adapted modules in tuner's module order
    mods = {n[len("base_model.model."):]: m for n, m in model.named_modules()
            if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})}
    n_layers = model.config.num_hidden_layers
    order = []
    for l in range(n_layers):
        for part, names in (("self_attn", ATTN), ("mlp", MLP)):
            for nm in names:
                p = f"model.layers.{l}.{part}.{nm}"
                if p in mods:
                    order.append(p)
    if len(order) != len(mods):
        raise RuntimeError(f"adapted modules outside tuner's llama order: {sorted(set(mods) - set(order))[:5]}")
    init = qc.lora_a_init(seed, [(p, int(lo["r"]), mods[p].in_features) for p in order])
    with torch.no_grad():
        for p in order:
            A = mods[p].lora_A["default"].weight
            A.copy_(torch.from_numpy(init[p]).to(A.device, A.dtype))
            mods[p].lora_B["default"].weight.zero_()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt_kind = t["optimizer"]
    lr0, wd = float(t["learning_rate"]), float(t["weight_decay"])
    if opt_kind == "adamw_8bit":
        opt = bnb.optim.AdamW8bit(params, lr=lr0, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
        opt_name = "bitsandbytes AdamW8bit"
    elif opt_kind == "adamw":
        opt = torch.optim.AdamW(params, lr=lr0, betas=(0.9, 0.999), eps=1e-8, weight_decay=wd)
        opt_name = "torch AdamW"
    else:
        raise RuntimeError(f"optimizer {opt_kind!r} not mirrored")
    rep["load_s"] = time.time() - t0
    rep["settings"] = {
        "seed": seed, "device": str(dev), "dtype": str(kind), "autocast": str(autocast_dtype), "optimizer": opt_name,
        "lr": lr0, "scheduler": t["lr_scheduler"], "warmup_steps": t["warmup_steps"], "weight_decay": wd,
        "max_grad_norm": t["max_grad_norm"], "micro_batch_size": t["micro_batch_size"],
        "gradient_accumulation_steps": t["gradient_accumulation_steps"], "max_seq_length": t["max_seq_length"],
        "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
        "quant": f"{q['method']} dq={q['double_quant']} block {q['block_size']}",
        "lora": f"r{lo['r']} alpha {lo['alpha']} dropout {lo['dropout']} {','.join(targets)}",
        "attn": model.config._attn_implementation, "trainable_params": sum(p.numel() for p in params),
        "linear4bit_modules": sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit"),
    }
    total = int(t["max_steps"])
    ga = int(t["gradient_accumulation_steps"])
    max_norm = float(t["max_grad_norm"])
    rows = []
    t_train = time.time()
    for s in range(total):
        ts = time.time()
        lr = qc.lr_at(t["lr_scheduler"], lr0, s, int(t["warmup_steps"]), total)
        for g in opt.param_groups:
            g["lr"] = lr
        micro = [loader.next() for _ in range(ga)]
        denom = sum(qc.trained_tokens(m[1]) for m in micro)
        nll = 0.0
        for ids_rows, lab_rows, _ in micro:
            ids, lab, mask, _ = qc.pad_batch(ids_rows, lab_rows, pad_id, dev)
            s_nll, _ = summed_nll(model, ids, lab, mask, autocast_dtype, dev)
            (s_nll / max(denom, 1)).backward()
            nll += s_nll.detach().double().item()
        if max_norm > 0:
            gn = torch.nn.utils.clip_grad_norm_(params, max_norm).item()
        else:
            gn = torch.norm(torch.stack([p.grad.float().norm() for p in params if p.grad is not None])).item()
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = nll / max(denom, 1)
        if cuda:
            torch.cuda.synchronize()
        row = {"step": s + 1, "loss": loss, "lr": lr, "grad_norm": gn,
               "tokens": sum(len(r) for m in micro for r in m[0]), "trained_tokens": denom, "step_s": time.time() - ts}
        rows.append(row)
        if not math.isfinite(loss):
            raise RuntimeError(f"loss became {loss} at step {s + 1}")
        if (s + 1) % 10 == 0 or s == 0 or s + 1 == total:
            print(f"{a.tag}: step {s + 1}/{total} loss {loss:.4f} lr {lr:.2e} grad {gn:.3f}", file=sys.stderr, flush=True)
    rep["train_s"] = time.time() - t_train
    rep["metrics"] = rows

    model.eval()
    # bitsandbytes 0.50 on a CPU with AVX512-BF16 repacks a Linear4bit's weight for a bf16 CPU
    # kernel the first time it runs in eval mode on an input without grad: the eval loss then
    # moves by ~1e-3 from dequantize + fp32 matmul (what training and tuner compute). Keeping the
    # 4-bit linears in training mode avoids that path; it changes nothing else (no dropout
    # there) and nothing on CUDA, where the path does not exist.
    for m in model.modules():
        if type(m).__name__ == "Linear4bit":
            m.train()
    eb = int(ev.get("batch_size", 8))
    after, n_tok = eval_loss(model, evals, eb, pad_id, autocast_dtype, dev)
    with model.disable_adapter():
        before, _ = eval_loss(model, evals, eb, pad_id, autocast_dtype, dev)
    rep["eval"] = {"before": before, "after": after, "tokens": n_tok, "rows": len(evals)}
    print(f"{a.tag}: eval loss before {before:.4f} after {after:.4f} ({n_tok} tokens)", file=sys.stderr)
    if a.save_adapter:
        model.save_pretrained(a.save_adapter)
    if a.tuner_adapter:
        deadline = time.time() + a.wait_adapter
        files = [os.path.join(a.tuner_adapter, f) for f in ("adapter_config.json", "adapter_model.safetensors")]
        while not all(os.path.exists(f) for f in files) and time.time() < deadline:
            time.sleep(2)
    if a.tuner_adapter and not os.path.exists(os.path.join(a.tuner_adapter, "adapter_model.safetensors")):
        print(f"{a.tag}: no tuner adapter at {a.tuner_adapter}; no cross-evaluation", file=sys.stderr)
    elif a.tuner_adapter:
        from safetensors.torch import load_file
        from peft import set_peft_model_state_dict

        sd = load_file(os.path.join(a.tuner_adapter, "adapter_model.safetensors"))
        res = set_peft_model_state_dict(model, sd)
        unexpected = list(getattr(res, "unexpected_keys", []) or [])
        if unexpected:
            raise RuntimeError(f"tuner's adapter keys not in the peft model: {unexpected[:3]}")
        cross, _ = eval_loss(model, evals, eb, pad_id, autocast_dtype, dev)
        rep["eval"]["tuner_adapter_by_hf"] = cross
        print(f"{a.tag}: eval loss of tuner's adapter computed here {cross:.4f}", file=sys.stderr)
    rep["ok"] = True
    rep["wall_s"] = time.time() - t_start


if __name__ == "__main__":
    sys.exit(main())
