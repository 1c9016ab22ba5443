#!/usr/bin/env python3
"""Peer baseline: HF transformers + peft + bitsandbytes QLoRA on random token ids.

    peer_hf.py MODEL_DIR --out JSON [--steps 7] [--warmup 1] [--seq 2048] [--batch 2]

Setup (shared/reference/peers-h200.md): NF4 with double quant and bf16 compute; LoRA r=16,
alpha=32, dropout 0 on q/k/v/o/gate/up/down; gradient checkpointing (non-reentrant); SDPA;
bitsandbytes PagedAdamW8bit, lr 2e-4, weight decay 0.01 (tuner's default); gradients clipped
at 1.0 (tuner's default; off with --max-grad-norm 0); bf16 autocast as Trainer(bf16=True) does
(off with --no-autocast); random token ids, labels = inputs, micro-batch 2, GA 1.
Gemma 3n: llm_int8_skip_modules = lm_head + AltUp's prediction_coefs/correction_coefs/modality_router.

Reports (JSON): tokens/s (median over the steps after --warmup), peak GiB
(torch.cuda.max_memory_allocated over the training steps, reset after setup as tuner does; the
peak while loading is reported apart), first-step seconds (start of loading -> end of the first
optimizer step), MFU (bench_common.py), the loss of every step.

CPU smoke test (no GPU): --device cpu. bitsandbytes' paged 8-bit optimizer needs CUDA, so on
the CPU bitsandbytes runs it unpaged (it warns); --no-quant loads bf16 weights without 4-bit
quantization, should bitsandbytes' CPU 4-bit path fail (bitsandbytes 0.50.2 runs it fine).
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bc.add_common_args(ap)
    ap.add_argument("--no-quant", action="store_true", help="bf16 base without bitsandbytes (CPU smoke only)")
    ap.add_argument("--no-grad-ckpt", action="store_true")
    a = ap.parse_args()

    report = {"peer": "hf", "ok": False, "model_dir": os.path.abspath(a.model_dir), "shape": bc.shape_info(a.model_dir)}
    try:
        run(a, report)
    except BaseException as e:  # noqa: BLE001 - record any failure for race.sh
        bc.fail_json(a.out, report, e)
        return 1
    bc.write_json(a.out, report)
    bc.print_summary("hf", report)
    return 0


def run(a, report):
    import torch
    import transformers
    import peft
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig
    from peft import LoraConfig, get_peft_model

    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch sees no GPU")
    cfg = AutoConfig.from_pretrained(a.model_dir)
    tcfg = bc.text_config(cfg)
    is_gemma3n = tcfg.model_type.startswith("gemma3n")
    quant = not a.no_quant
    import bitsandbytes as bnb

    report["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                          "peft": peft.__version__, "bitsandbytes": bnb.__version__}
    clock = bc.Clock(dev)
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)

    # ---- load (the first-step clock starts here)
    t0 = clock.now()
    kw = dict(dtype=torch.bfloat16, attn_implementation="sdpa", device_map={"": (dev.index or 0) if cuda else "cpu"})
    if quant:
        qkw = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                   bnb_4bit_compute_dtype=torch.bfloat16)
        if is_gemma3n:
            qkw["llm_int8_skip_modules"] = bc.GEMMA3N_SKIP
        kw["quantization_config"] = BitsAndBytesConfig(**qkw)
    model = AutoModelForCausalLM.from_pretrained(a.model_dir, **kw)
    model.config.use_cache = False
    if not a.no_grad_ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lcfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=bc.TARGETS, bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lcfg)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    # On the CPU bitsandbytes runs the same 8-bit optimizer unpaged (it warns).
    opt = bnb.optim.PagedAdamW8bit(params, lr=a.lr, weight_decay=a.weight_decay)
    opt_name = "bnb.PagedAdamW8bit" + ("" if cuda else " (unpaged on CPU)")
    t_loaded = clock.now()
    peak_load = torch.cuda.max_memory_allocated(dev) if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)

    n_lora = sum(p.numel() for p in params)
    n_quant = sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit")
    report["settings"] = {
        "steps": a.steps, "warmup": a.warmup, "seq": a.seq, "batch": a.batch, "lr": a.lr,
        "weight_decay": a.weight_decay, "max_grad_norm": a.max_grad_norm, "optimizer": opt_name,
        "quant": "nf4+dq bf16 compute" if quant else "none (bf16)", "autocast_bf16": not a.no_autocast,
        "grad_ckpt": (not a.no_grad_ckpt) and bool(getattr(model, "is_gradient_checkpointing", True)),
        "attn": model.config._attn_implementation, "lora": "r16 a32 d0 " + ",".join(bc.TARGETS),
        "skip_modules": bc.GEMMA3N_SKIP if (quant and is_gemma3n) else None, "device": str(dev),
    }
    report.update({"trainable_params": n_lora, "linear4bit_modules": n_quant, "load_s": t_loaded - t0})

    step_s, losses, first_step = bc.train_loop("hf", model, params, opt, cfg, a, dev, clock, t0)
    peak = torch.cuda.max_memory_allocated(dev) if cuda else None
    bc.finish(report, a, cfg, step_s, losses, first_step, peak, peak_load)


if __name__ == "__main__":
    sys.exit(main())
