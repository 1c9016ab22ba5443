#!/usr/bin/env python3
"""The guide's job (guide_race.sh), part 3: per-peer JSON for tuner runs, the data summary, and the
race table (the markdown printed last).

    guide_report.py tuner RUN_DIR LOG --out JSON [--peer tuner]   # a tuner run -> the peers' JSON shape
    guide_report.py stamp JSON --peer P --shape S --rc RC --log LOG --limit L --t-launch T --t-exit T
    guide_report.py data RUN_DIR --out JSON [--steps 60] [--pad-multiple 8]
    guide_report.py line JSON                                       # one line on a peer's result
    guide_report.py table OUT [--json OUT/summary.json] [--timed-from 6]

A peer's JSON ({tuner,tuner-seed2,tuner-x,hf,unsloth}.json in OUT/<shape>/): "steps" (per optimizer
step: loss, lr, grad_norm, tokens, trained_tokens, step_s; the Python peers add padded_tokens),
load_s, first_step_s (from the start of loading), peak_bytes (training; on CUDA the allocator peak
after setup, on the CPU tuner reports peak RSS), and from `stamp` (guide_race.sh's clock around
the process): wall_s = launch -> exit, to_adapter_s = launch -> the adapter file's mtime.

Derived here, the same way for every peer:
- trained tok/s = Σ trained tokens / Σ step seconds, over all steps and over steps >= --timed-from
  (6: after the 5 warm-up steps of the schedule; also after compilation and allocator warm-up);
  trained tokens = labels != -100 after the one-position shift (tuner's trained_tokens);
- final loss = the last step's; last-5 = mean and standard deviation of the last 5 steps' losses
  (what one number of a 60-step run can be trusted to: the rows differ from step to step);
- checks: every peer got the same tokens and trained tokens at every step; step 1's loss agrees
  (LoRA B = 0: the base model's loss on the same rows, the same for any correct trainer), and
  step 2's too when step 1's lr is 0 (the linear warm-up starts at 0);
- noise: tuner-seed2 (run.seed + 1: another LoRA init and data order) against tuner: the
  difference of their last-5 means is the seed-to-seed spread a peer's final loss is read
  against.
Writes OUT/<shape>/curves.csv (loss per step per peer) and loss.png (quality_report.plot:
matplotlib, or a plain PNG), OUT/summary.json; prints the table.
"""
import argparse
import glob
import json
import math
import os
import re
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

ORDER = {"tuner": 0, "tuner-seed2": 1, "tuner-x": 2, "hf": 3, "unsloth": 4}
NAMES = {"tuner": "tuner", "tuner-seed2": "tuner, run.seed + 1 (noise)", "tuner-x": "tuner, TUNER_X_SET",
         "hf": "HF transformers + peft + bnb", "unsloth": "Unsloth"}
STEP_KEYS = ("step", "loss", "lr", "grad_norm", "tokens", "padded_tokens", "trained_tokens", "step_s")


def load(path):
    try:
        return json.load(open(path))
    except Exception:  # noqa: BLE001
        return {}


def save(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


# ---- tuner run -> JSON

def cmd_tuner(a):
    rep = {"peer": a.peer, "ok": False, "run_dir": os.path.abspath(a.run_dir), "steps": []}
    log = open(a.log, errors="replace").read() if os.path.exists(a.log) else ""
    try:
        import quality_common as qc

        rec = qc.read_recipe(a.run_dir)
        t = rec["train"]
        rep["settings"] = {"seed": rec["run"]["seed"], "device": t["device"], "dtype": rec["model"]["dtype"],
                           "optimizer": t["optimizer"], "lr": t["learning_rate"], "scheduler": t["lr_scheduler"],
                           "warmup_steps": t["warmup_steps"], "weight_decay": t["weight_decay"],
                           "max_grad_norm": t["max_grad_norm"], "micro_batch_size": t["micro_batch_size"],
                           "gradient_accumulation_steps": t["gradient_accumulation_steps"], "packing": t["packing"],
                           "pad_to_multiple_of": t.get("pad_to_multiple_of"), "max_seq_length": t["max_seq_length"],
                           "steps": t["max_steps"], "coalesce": t.get("coalesce"), "cuda_kernels": t.get("cuda_kernels")}
    except Exception as e:  # noqa: BLE001
        rep["error"] = f"no resolved recipe: {e}"
    mp = os.path.join(a.run_dir, "train", "metrics.jsonl")
    rows = [json.loads(l) for l in open(mp) if l.strip()] if os.path.exists(mp) else []
    rep["steps"] = [{k: r.get(k) for k in STEP_KEYS if k in r} for r in rows]
    if rows:
        rep["peak_bytes"] = max(r.get("peak_mem_bytes", 0) for r in rows)
        rep["peak_is_rss"] = rows[-1].get("mem_source") != "cuda_allocator_peak"
    for key, pat in (("load_s", r"loaded in ([0-9.]+)s"), ("first_step_s", r"first step done ([0-9.]+)\s*s after the start of loading"),
                     ("train_loop_s", r"train: \d+ steps in ([0-9.]+)s")):
        m = re.search(pat, log)
        rep[key] = float(m.group(1)) if m else None
    m = re.search(r"packed varlen passes of up to (\d+) tokens", log)
    rep["coalesce_tokens"] = int(m.group(1)) if m else None
    m = re.search(r"train: (\S+) on (\S+) \((\w+)\), LoRA r=(\d+) on (\d+) modules \((\d+) trainable", log)
    if m:
        rep["trainable_params"] = int(m.group(6))
        rep["lora_modules"] = int(m.group(5))
    rep["adapter_dir"] = os.path.join(os.path.abspath(a.run_dir), "train", "adapter")
    want = rep.get("settings", {}).get("steps")
    done = os.path.exists(os.path.join(rep["adapter_dir"], "adapter_model.safetensors"))
    if rows and len(rows) == want and done:
        rep["ok"] = True
    else:
        tail = " | ".join(log.strip().splitlines()[-3:])[-600:]
        rep.setdefault("error", f"incomplete run ({len(rows)} of {want} steps, adapter {'saved' if done else 'missing'}): {tail}")
    save(a.out, rep)
    return 0


# ---- the shell's view of a process -> JSON

def cmd_stamp(a):
    import bench_common as bc

    r = load(a.json)
    if not r.get("steps") and os.path.exists(a.json + ".steps.jsonl"):
        r["steps"] = [json.loads(l) for l in open(a.json + ".steps.jsonl") if l.strip()]
    tail = bc.log_tail(a.log)
    msg = bc.note_exit(r, a.rc, a.limit, tail)
    if not r and not msg:
        r = {"ok": False, "error": "no result written", "log_tail": tail}
    r.setdefault("peer", a.peer)
    r["shape_name"] = a.shape
    r["exit_code"] = a.rc
    r["t_launch"] = a.t_launch
    r["wall_s"] = a.t_exit - a.t_launch
    ad = r.get("adapter_dir")
    f = os.path.join(ad, "adapter_model.safetensors") if ad else None
    if f and os.path.exists(f) and os.path.getmtime(f) >= a.t_launch:
        r["to_adapter_s"] = os.path.getmtime(f) - a.t_launch
    elif not r.get("ok"):
        r["to_adapter_s"] = None
    save(a.json, r)
    return 0


def cmd_line(a):
    """One line on a peer's result, for the race's log."""
    r = load(a.json)
    st = r.get("steps") or []
    parts = [f"  {r.get('peer', '?')}: {len(st)} steps"]
    if r.get("wall_s") is not None:
        parts.append(f"wall {r['wall_s']:.1f}s")
    if st:
        parts.append(f"loss {st[0]['loss']:.4f} -> {st[-1]['loss']:.4f}")
    parts.append("ok" if r.get("ok") else "FAILED: " + str(r.get("error", ""))[:240].replace("\n", " "))
    print(", ".join(parts))
    return 0


# ---- what the run trains

def summary(xs):
    xs = sorted(xs)
    if not xs:
        return {}
    q = lambda p: xs[min(len(xs) - 1, int(p * (len(xs) - 1) + 0.5))]  # noqa: E731
    return {"n": len(xs), "min": xs[0], "p10": q(0.1), "p50": q(0.5), "p90": q(0.9), "p99": q(0.99), "max": xs[-1],
            "mean": round(statistics.fmean(xs), 1), "over_1000": sum(1 for x in xs if x > 1000)}


def cmd_data(a):
    import quality_common as qc

    rec = qc.read_recipe(a.run_dir)
    t = rec["train"]
    ex = qc.read_split(a.run_dir, "train")
    steps = a.steps or int(t["max_steps"])
    mbs, ga = int(t["micro_batch_size"]), int(t["gradient_accumulation_steps"])
    ld = qc.Loader(ex, mbs, int(rec["run"]["seed"]), bool(t["packing"]), int(t["max_seq_length"]))
    lens, per_step = [], []
    pad_longest = pad_mult = 0
    for _ in range(steps):
        tok = trained = 0
        for _ in range(ga):
            ids, lab, _ = ld.next()
            n = [len(r) for r in ids]
            lens.extend(n)
            tok += sum(n)
            trained += qc.trained_tokens(lab)
            longest = max(n)
            pad_longest += len(n) * longest
            pad_mult += len(n) * (-(-longest // a.pad_multiple) * a.pad_multiple)
        per_step.append({"tokens": tok, "trained_tokens": trained})
    all_lens = [len(e[0]) for e in ex]
    real = sum(lens)
    out = {"examples": len(ex), "example_tokens": summary(all_lens),
           "trained_rows": summary(lens), "steps": steps,
           "tokens": real, "trained_tokens": sum(s["trained_tokens"] for s in per_step),
           "padded_tokens_longest": pad_longest, f"padded_tokens_x{a.pad_multiple}": pad_mult,
           "padding_overhead_longest": pad_longest / max(real, 1) - 1,
           f"padding_overhead_x{a.pad_multiple}": pad_mult / max(real, 1) - 1,
           "per_step": per_step}
    save(a.out, out)
    tr = out["trained_rows"]
    print(f"data: {len(ex)} examples; the {steps} steps train {len(lens)} rows: tokens p10 {tr['p10']} median {tr['p50']} "
          f"mean {tr['mean']} p90 {tr['p90']} max {tr['max']} ({tr['over_1000']} over 1,000); {real:,} tokens, "
          f"{out['trained_tokens']:,} trained; padding to the longest row adds {out['padding_overhead_longest']:.0%}, "
          f"to a multiple of {a.pad_multiple} {out[f'padding_overhead_x{a.pad_multiple}']:.0%}")
    return 0


# ---- the table

def derive(r, timed_from):
    st = [s for s in r.get("steps") or [] if s.get("loss") is not None]
    d = {"steps_done": len(st)}
    if not st:
        return d

    def rate(rows, key):
        secs = sum(s.get("step_s") or 0 for s in rows)
        n = sum(s.get(key) or 0 for s in rows)
        return n / secs if secs > 0 and rows else None

    warm = [s for s in st if s["step"] >= timed_from]
    losses = [s["loss"] for s in st]
    last = losses[-5:]
    d.update({
        "trained_tok_s_all": rate(st, "trained_tokens"), "trained_tok_s_warm": rate(warm, "trained_tokens"),
        "tok_s_warm": rate(warm, "tokens"), "train_steps_s": sum(s.get("step_s") or 0 for s in st),
        "loss_step1": losses[0], "loss_step2": losses[1] if len(losses) > 1 else None, "lr_step1": st[0].get("lr"),
        "final_loss": losses[-1], "last5_mean": statistics.fmean(last),
        "last5_sd": statistics.stdev(last) if len(last) > 1 else None,
        "peak_gib": r["peak_bytes"] / 2**30 if r.get("peak_bytes") else None,
        "peak_load_gib": r["peak_load_bytes"] / 2**30 if r.get("peak_load_bytes") else None,
    })
    return d


def fmt(x, spec="", none="—"):
    return none if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def cmd_table(a):
    import quality_report as qr

    results = {}
    for p in sorted(glob.glob(os.path.join(a.out, "*", "*.json"))):
        shape, peer = os.path.basename(os.path.dirname(p)), os.path.splitext(os.path.basename(p))[0]
        if peer in ORDER:
            results.setdefault(shape, {})[peer] = load(p) or {"ok": False, "error": f"unreadable {p}"}
    head = ("| shape | peer | steps | wall s | → adapter s | load s | first step s | trained tok/s, all | "
            f"trained tok/s, steps {a.timed_from}+ | peak GiB | loss step 1 | final loss | last 5: mean ± sd |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    ratio_lines = ["| shape | peer | tuner ÷ peer: wall | trained tok/s (steps %d+) | peak | final loss − tuner | last-5 mean − tuner |" % a.timed_from,
                   "|---|---|---|---|---|---|---|"]
    notes, summary_out = [], {}
    for shape in sorted(results):
        runs = results[shape]
        sdir = os.path.join(a.out, shape)
        der = {p: derive(r, a.timed_from) for p, r in runs.items()}
        for peer in sorted(runs, key=lambda k: ORDER[k]):
            r, d = runs[peer], der[peer]
            name = NAMES[peer] + (" ⚠" if r.get("warning") else "")
            want = (r.get("settings") or {}).get("steps")
            steps = f"{d['steps_done']}" + (f"/{want}" if want and d["steps_done"] != want else "")
            if not r.get("ok"):
                err = (r.get("error") or "failed").strip().splitlines()
                err = (err[-1] if err else "failed")[:120].replace("|", "/")
                name += f" — FAILED: {err}"
            peak = fmt(d.get("peak_gib"), ".2f") + (" (RSS)" if r.get("peak_is_rss") and d.get("peak_gib") else "")
            sd = d.get("last5_sd")
            last5 = f"{d['last5_mean']:.4f} ± {sd:.4f}" if d.get("last5_mean") is not None and sd is not None else fmt(d.get("last5_mean"), ".4f")
            lines.append(
                f"| {shape} | {name} | {steps} | {fmt(r.get('wall_s'), '.1f')} | {fmt(r.get('to_adapter_s'), '.1f')} "
                f"| {fmt(r.get('load_s'), '.1f')} | {fmt(r.get('first_step_s'), '.1f')} | {fmt(d.get('trained_tok_s_all'), ',.0f')} "
                f"| {fmt(d.get('trained_tok_s_warm'), ',.0f')} | {peak} | {fmt(d.get('loss_step1'), '.4f')} "
                f"| {fmt(d.get('final_loss'), '.4f')} | {last5} |")
            summary_out.setdefault(shape, {})[peer] = {
                "ok": bool(r.get("ok")), "error": r.get("error"), "warning": r.get("warning"),
                "wall_s": r.get("wall_s"), "to_adapter_s": r.get("to_adapter_s"), "load_s": r.get("load_s"),
                "first_step_s": r.get("first_step_s"), **d}
        t = runs.get("tuner")
        td = der.get("tuner", {})
        for peer in sorted(runs, key=lambda k: ORDER[k]):
            if peer in ("tuner", "tuner-seed2") or t is None or not der[peer].get("steps_done"):
                continue
            d = der[peer]
            rw = ratio(t.get("wall_s"), runs[peer].get("wall_s")) if (t.get("ok") and runs[peer].get("ok")) else None
            rt = ratio(td.get("trained_tok_s_warm"), d.get("trained_tok_s_warm"))
            rp = ratio(td.get("peak_gib"), d.get("peak_gib"))
            df = (d["final_loss"] - td["final_loss"]) if (td.get("final_loss") is not None and d["steps_done"] == td["steps_done"]) else None
            dl = (d["last5_mean"] - td["last5_mean"]) if (td.get("last5_mean") is not None and d["steps_done"] == td["steps_done"]) else None
            x = lambda v: fmt(v, ".2f") + ("×" if v is not None else "")  # noqa: E731
            ratio_lines.append(f"| {shape} | {NAMES[peer]} | {x(rw)} | {x(rt)} | {x(rp)} "
                               f"| {fmt(df, '+.4f')} | {fmt(dl, '+.4f')} |")
            summary_out[shape][peer]["tuner_over_peer"] = {"wall": rw, "trained_tok_s_warm": rt, "peak": rp}
        notes.extend(checks(shape, runs, der))
        dj = load(os.path.join(sdir, "data.json"))
        if dj.get("trained_rows"):
            tr = dj["trained_rows"]
            notes.append(f"{shape}: the {dj['steps']} steps train {tr['n']} rows of {dj['examples']}: tokens per row p10 {tr['p10']}, "
                         f"median {tr['p50']}, mean {tr['mean']}, p90 {tr['p90']}, max {tr['max']} ({tr['over_1000']} over 1,000); "
                         f"{dj['tokens']:,} tokens, {dj['trained_tokens']:,} trained; padding to the longest row of a micro-batch "
                         f"adds {dj['padding_overhead_longest']:.0%} (HF/Unsloth, ×8: "
                         f"{dj.get('padding_overhead_x8', float('nan')):.0%}), tuner computes none (varlen attention)")
            summary_out[shape]["data"] = {k: v for k, v in dj.items() if k != "per_step"}
        curves(sdir, shape, runs, qr)
    out = ["\n".join(lines), "", "\n".join(ratio_lines), ""] + [f"- {n}" for n in notes]
    text = "\n".join(out)
    print(text)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(text + "\n")
    if a.json:
        save(a.json, summary_out)
    return 0


def checks(shape, runs, der):
    """Same data at every step; step-1 (and step-2) loss agreement; tuner's seed-to-seed spread."""
    notes = []
    ref = runs.get("tuner")
    if ref and ref.get("steps"):
        rs = {s["step"]: s for s in ref["steps"]}
        for peer in ("hf", "unsloth", "tuner-x"):
            st = (runs.get(peer) or {}).get("steps") or []
            if not st:
                continue
            bad = [s["step"] for s in st if s["step"] in rs and (s.get("tokens"), s.get("trained_tokens"))
                   != (rs[s["step"]].get("tokens"), rs[s["step"]].get("trained_tokens"))]
            notes.append(f"{shape}: {peer} and tuner trained the same tokens and trained tokens at every step ({len(st)} steps)"
                         if not bad else f"{shape}: ⚠ {peer} and tuner differ in tokens or trained tokens at steps {bad[:8]}")
        t1 = der["tuner"].get("loss_step1")
        parts = []
        for peer in ("hf", "unsloth"):
            x = der.get(peer, {}).get("loss_step1")
            if x is not None and t1 is not None:
                parts.append(f"{peer} {x:.4f} ({x - t1:+.4f})")
        if t1 is not None and parts:
            lr0 = der["tuner"].get("lr_step1")
            notes.append(f"{shape}: step 1 loss (LoRA B = 0: the base model on the same rows) tuner {t1:.4f}, " + ", ".join(parts)
                         + (f"; step 2 (step 1's lr is {lr0:g}, so the adapter has not moved): tuner "
                            f"{der['tuner']['loss_step2']:.4f}, " + ", ".join(
                                f"{p} {der[p]['loss_step2']:.4f}" for p in ("hf", "unsloth") if der.get(p, {}).get("loss_step2") is not None)
                            if lr0 == 0 and der["tuner"].get("loss_step2") is not None else ""))
    s2 = der.get("tuner-seed2", {})
    t = der.get("tuner", {})
    if s2.get("last5_mean") is not None and t.get("last5_mean") is not None and s2["steps_done"] == t["steps_done"]:
        notes.append(f"{shape}: noise: tuner with run.seed + 1 (another LoRA init and data order) ends at last-5 mean "
                     f"{s2['last5_mean']:.4f} vs {t['last5_mean']:.4f} ({s2['last5_mean'] - t['last5_mean']:+.4f}); final loss "
                     f"{s2['final_loss']:.4f} vs {t['final_loss']:.4f}; a peer's last-5 mean within about this of tuner's is "
                     f"within seed-to-seed noise")
    elif t.get("last5_sd") is not None:
        notes.append(f"{shape}: noise: no second tuner seed in this call; the last 5 steps' losses of tuner's run spread by "
                     f"sd {t['last5_sd']:.4f} (different rows each step)")
    return notes


def curves(sdir, shape, runs, qr):
    tags = [p for p in sorted(runs, key=lambda k: ORDER[k]) if runs[p].get("steps")]
    if not tags:
        return
    n = max(len(runs[p]["steps"]) for p in tags)
    by = {p: {s["step"]: s for s in runs[p]["steps"]} for p in tags}
    with open(os.path.join(sdir, "curves.csv"), "w") as f:
        f.write("step," + ",".join(f"{p}_loss" for p in tags) + "," + ",".join(f"{p}_trained_tokens" for p in tags) + "\n")
        for k in range(1, n + 1):
            row = [str(k)] + [fmt((by[p].get(k) or {}).get("loss"), ".6f", "") for p in tags]
            row += [fmt((by[p].get(k) or {}).get("trained_tokens"), "d", "") for p in tags]
            f.write(",".join(row) + "\n")
    try:
        qr.plot(sdir, tags, {p: {"metrics": runs[p]["steps"]} for p in tags},
                title=f"{shape}: the guide's job (QLoRA, batch 2 × GA 4, 60 steps): train loss per step")
    except Exception as e:  # noqa: BLE001 - the CSV stands without the picture
        print(f"guide_report: no loss.png for {shape}: {e}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sp = ap.add_subparsers(dest="cmd", required=True)
    t = sp.add_parser("tuner")
    t.add_argument("run_dir")
    t.add_argument("log")
    t.add_argument("--out", required=True)
    t.add_argument("--peer", default="tuner")
    s = sp.add_parser("stamp")
    s.add_argument("json")
    s.add_argument("--peer", required=True)
    s.add_argument("--shape", required=True)
    s.add_argument("--rc", type=int, required=True)
    s.add_argument("--log", required=True)
    s.add_argument("--limit", default="?")
    s.add_argument("--t-launch", type=float, required=True)
    s.add_argument("--t-exit", type=float, required=True)
    d = sp.add_parser("data")
    d.add_argument("run_dir")
    d.add_argument("--out", required=True)
    d.add_argument("--steps", type=int, default=None)
    d.add_argument("--pad-multiple", type=int, default=8)
    ln = sp.add_parser("line")
    ln.add_argument("json")
    b = sp.add_parser("table")
    b.add_argument("out")
    b.add_argument("--json", default=None)
    b.add_argument("--timed-from", type=int, default=6)
    a = ap.parse_args()
    return {"tuner": cmd_tuner, "stamp": cmd_stamp, "data": cmd_data, "line": cmd_line, "table": cmd_table}[a.cmd](a)


if __name__ == "__main__":
    sys.exit(main())
