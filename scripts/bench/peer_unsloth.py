#!/usr/bin/env python3
"""Peer baseline: Unsloth QLoRA on random token ids, same settings and metrics as peer_hf.py.

    peer_unsloth.py MODEL_DIR --out JSON [--steps 7] [--warmup 1] [--seq 2048] [--batch 2]

FastLanguageModel (FastModel for Gemma 3n; --api to force one): load_in_4bit (Unsloth's own
BitsAndBytesConfig: NF4, double quant, bf16 compute), LoRA r=16, alpha=32, dropout 0 on
q/k/v/o/gate/up/down, use_gradient_checkpointing="unsloth" (per-layer checkpoints offloaded to
the CPU), bitsandbytes PagedAdamW8bit lr 2e-4, weight decay 0.01, clip 1.0, the same timed loop
as peer_hf.py (bench_common.train_loop: model(input_ids, labels=input_ids), backward, step).
Unsloth compiles its blocks with torch.compile on the first step, so its first step is long.

Environment (race.sh sets it): PYTHONPATH with the installed wheels (install.sh),
HF_HUB_OFFLINE=1, UNSLOTH_DISABLE_STATISTICS=1. The script runs in --workdir (default: a fresh
temporary folder) so Unsloth's compile cache does not land in the repo. Needs a GPU (the
Unsloth GPU path); on a machine without one, Unsloth switches to its separate CPU backend.
"""
import argparse
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    bc.add_common_args(ap)
    ap.add_argument("--api", choices=["auto", "FastLanguageModel", "FastModel"], default="auto",
                    help="auto: FastModel for Gemma 3n, FastLanguageModel otherwise")
    ap.add_argument("--no-quant", action="store_true", help="16-bit LoRA instead of 4-bit (smoke tests only)")
    ap.add_argument("--workdir", default=None, help="cwd while running (Unsloth writes unsloth_compiled_cache/ there)")
    a = ap.parse_args()
    a.model_dir = os.path.abspath(a.model_dir)
    if a.out:
        a.out = os.path.abspath(a.out)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    workdir = a.workdir or tempfile.mkdtemp(prefix="bench-unsloth-")
    os.makedirs(workdir, exist_ok=True)
    os.chdir(workdir)

    report = {"peer": "unsloth", "ok": False, "model_dir": a.model_dir, "shape": bc.shape_info(a.model_dir),
              "workdir": workdir}
    try:
        run(a, report)
    except BaseException as e:  # noqa: BLE001 - record any failure for race.sh
        bc.fail_json(a.out, report, e)
        return 1
    bc.write_json(a.out, report)
    bc.print_summary("unsloth", report)
    return 0


def run(a, report):
    # Unsloth must be imported before transformers / peft: it patches them on import.
    import unsloth
    from unsloth import FastLanguageModel, FastModel
    import torch
    import transformers
    import peft
    import bitsandbytes as bnb
    from transformers import AutoConfig

    dev = torch.device(a.device)
    cuda = dev.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch sees no GPU")
    cfg = AutoConfig.from_pretrained(a.model_dir)
    is_gemma3n = bc.text_config(cfg).model_type.startswith("gemma3n")
    api = a.api if a.api != "auto" else ("FastModel" if is_gemma3n else "FastLanguageModel")
    Fast = FastModel if api == "FastModel" else FastLanguageModel
    report["versions"] = {"unsloth": unsloth.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                          "peft": peft.__version__, "bitsandbytes": bnb.__version__}
    try:
        import unsloth_zoo
        report["versions"]["unsloth_zoo"] = getattr(unsloth_zoo, "__version__", "?")
    except Exception:  # noqa: BLE001
        pass
    clock = bc.Clock(dev)
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)

    # ---- load (the first-step clock starts here)
    t0 = clock.now()
    model, _tokenizer = Fast.from_pretrained(
        model_name=a.model_dir,
        max_seq_length=a.seq,
        dtype=torch.bfloat16,
        load_in_4bit=not a.no_quant,
        load_in_16bit=a.no_quant,
        full_finetuning=False,
        use_gradient_checkpointing="unsloth",
    )
    model = Fast.get_peft_model(
        model,
        r=16,
        lora_alpha=32,
        lora_dropout=0.0,
        target_modules=bc.TARGETS,
        bias="none",
        use_gradient_checkpointing="unsloth",
        random_state=a.seed,
    )
    if hasattr(Fast, "for_training"):
        Fast.for_training(model)
    else:
        model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = bnb.optim.PagedAdamW8bit(params, lr=a.lr, weight_decay=a.weight_decay)
    t_loaded = clock.now()
    peak_load = torch.cuda.max_memory_allocated(dev) if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats(dev)

    report["settings"] = {
        "api": api, "steps": a.steps, "warmup": a.warmup, "seq": a.seq, "batch": a.batch, "lr": a.lr,
        "weight_decay": a.weight_decay, "max_grad_norm": a.max_grad_norm,
        "optimizer": "bnb.PagedAdamW8bit" + ("" if cuda else " (unpaged on CPU)"),
        "quant": "unsloth load_in_4bit (nf4+dq)" if not a.no_quant else "none (16-bit LoRA)",
        "autocast_bf16": not a.no_autocast, "grad_ckpt": "unsloth",
        "lora": "r16 a32 d0 " + ",".join(bc.TARGETS), "device": str(dev),
    }
    report.update({
        "trainable_params": sum(p.numel() for p in params),
        "linear4bit_modules": sum(1 for m in model.modules() if type(m).__name__ == "Linear4bit"),
        "load_s": t_loaded - t0,
    })

    step_s, losses, first_step = bc.train_loop("unsloth", model, params, opt, cfg, a, dev, clock, t0)
    peak = torch.cuda.max_memory_allocated(dev) if cuda else None
    bc.finish(report, a, cfg, step_s, losses, first_step, peak, peak_load)


if __name__ == "__main__":
    sys.exit(main())
