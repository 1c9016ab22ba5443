#!/usr/bin/env python3
"""The peers' metrics for a tuner run, from its train/metrics.jsonl and its stderr log.

    summarize_tuner.py RUN_DIR LOG --out JSON [--warmup 1] [--model-dir DIR]

tokens/s: median of the metrics rows' tokens_per_s (tokens of the step / step seconds) over the
steps after --warmup; peak GiB: the largest peak_mem_bytes (on CUDA the allocator peak since the
model was loaded, as the Python peers measure it; on the CPU the peak RSS); first step: the
"train: first step done X s after the start of loading" line of LOG; MFU: bench_common's formula
with the model's config (from --model-dir, or the run's recipe.resolved.toml) and max_seq_length.
"""
import argparse
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_common as bc  # noqa: E402


def resolved_recipe(run_dir):
    p = os.path.join(run_dir, "recipe.resolved.toml")
    if not os.path.exists(p):
        return {}
    try:
        import tomllib
    except ImportError:  # python < 3.11
        return {}
    with open(p, "rb") as f:
        return tomllib.load(f)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir")
    ap.add_argument("log")
    ap.add_argument("--out", default=None)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--model-dir", default=None)
    a = ap.parse_args()

    report = {"peer": "tuner", "ok": False, "run_dir": os.path.abspath(a.run_dir), "log": os.path.abspath(a.log)}
    try:
        summarize(a, report)
    except Exception as e:  # noqa: BLE001
        bc.fail_json(a.out, report, e)
        return 1
    bc.write_json(a.out, report)
    bc.print_summary("tuner", report)
    return 0


def summarize(a, report):
    log = open(a.log, errors="replace").read() if os.path.exists(a.log) else ""
    metrics_path = os.path.join(a.run_dir, "train", "metrics.jsonl")
    if not os.path.exists(metrics_path):
        tail = "\n".join(log.strip().splitlines()[-15:])
        raise RuntimeError(f"no {metrics_path}; the end of the log:\n{tail}")
    rows = [json.loads(l) for l in open(metrics_path) if l.strip()]
    if not rows:
        raise RuntimeError(f"{metrics_path} is empty")
    rec = resolved_recipe(a.run_dir)
    model_dir = a.model_dir or rec.get("model", {}).get("source")
    t = rec.get("train", {})
    seq = int(t.get("max_seq_length", 2048))
    m = re.search(r"train: first step done ([0-9.]+)\s*s after the start of loading", log)
    first = float(m.group(1)) if m else None
    loaded = re.search(r"loaded in ([0-9.]+)s", log)

    timed = rows[a.warmup:] or rows
    tps = sorted(r["tokens_per_s"] for r in timed)
    import statistics

    med = statistics.median(tps)
    peak = max(r.get("peak_mem_bytes", 0) for r in rows)
    report.update({
        "ok": True,
        "model_dir": model_dir, "shape": bc.shape_info(model_dir) if model_dir else {},
        "settings": {"seq": seq, "batch": t.get("micro_batch_size"), "steps": len(rows), "warmup": a.warmup,
                     "packing": t.get("packing"), "optimizer": t.get("optimizer"), "device": t.get("device"),
                     "mem_source": rows[-1].get("mem_source")},
        "tokens_per_s": med,
        "tokens_per_s_mean": sum(r["tokens_per_s"] for r in timed) / len(timed),
        "tokens_per_s_steps": [round(r["tokens_per_s"], 1) for r in timed],
        "timed_steps": len(timed),
        "step_s": [r.get("step_s") for r in rows],
        "tokens_per_step": [r.get("tokens") for r in rows],
        "losses": [r.get("loss") for r in rows],
        "first_step_s": first,
        "load_s": float(loaded.group(1)) if loaded else None,
        "peak_gib": bc.gib(peak),
        "peak_is_rss": rows[-1].get("mem_source") != "cuda_allocator_peak",
    })
    full = [r.get("tokens") for r in rows if r.get("tokens") is not None]
    if full and t.get("micro_batch_size") and any(x != seq * int(t["micro_batch_size"]) for x in full):
        report["warning"] = f"some steps trained fewer than {seq}×{t['micro_batch_size']} tokens: {full}"
    if model_dir and os.path.exists(os.path.join(model_dir, "config.json")):
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model_dir)
        fpt, n_lin, attn = bc.flops_per_token(cfg, seq)
        report.update({"flops_per_token": fpt, "linear_params": n_lin, "attn_flops_fwd_per_token": attn,
                       "mfu": bc.mfu(fpt, med)})
    else:
        report["mfu"] = None
    if first is None:
        report["first_step_s"] = None
        report["warning"] = (report.get("warning", "") + " no 'first step done' line in the log").strip()


if __name__ == "__main__":
    sys.exit(main())
