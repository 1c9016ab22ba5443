#!/usr/bin/env python3
"""Collect and compare the quality runs of quality.sh: loss curves, eval losses, noise.

    quality_report.py tuner RUN_DIR LOG --tag TAG --out JSON   # one tuner run -> the peers' JSON shape
    quality_report.py table QDIR                               # all QDIR/*.json -> curves.csv, loss.png,
                                                               #   summary.json, table.md (printed)

A run's JSON: {"peer", "tag", "ok", "settings": {"seed"...}, "metrics": [{"step", "loss", "lr",
"grad_norm", "tokens", "trained_tokens", "step_s"}], "eval": {"before", "after", ...}}.

Compared, for the first seed (run twice by each tool) and the other seeds (once):
- same-seed repeat: r1 vs r2 of each tool, per-step max |Δ loss| and |Δ eval loss|;
- seed to seed: the first seed vs each other seed, |Δ| of the mean loss of the last 10 steps
  and of the eval loss (the curves see different data orders, so no per-step difference);
- tuner − HF, same seed: per step (same data, same initial adapter), the mean of the last 10
  steps, the eval loss before (base model) and after; and HF's eval of tuner's adapter, which
  separates eval-code differences from training differences;
- the data order: tuner's and HF's per-step token and trained-token counts must be equal.
loss.png: matplotlib when importable, otherwise a plain PNG drawn here (no text; the table
names the colours and the axis ranges).
"""
import argparse
import glob
import json
import os
import re
import struct
import sys
import zlib

COLOURS = [("blue", (31, 119, 180)), ("orange", (255, 127, 14)), ("green", (44, 160, 44)),
           ("red", (214, 39, 40)), ("purple", (148, 103, 189)), ("brown", (140, 86, 75)),
           ("pink", (227, 119, 194)), ("grey", (127, 127, 127))]


DIGITS = {  # 3x5 glyphs, one int per row (bit 2 = left column)
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7), "4": (5, 5, 7, 1, 1),
    "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1), "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7),
    ".": (0, 0, 0, 0, 2), "-": (0, 0, 7, 0, 0),
}


def collect_tuner(a):
    rep = {"peer": "tuner", "tag": a.tag, "ok": False, "run_dir": os.path.abspath(a.run_dir)}
    log = open(a.log, errors="replace").read() if os.path.exists(a.log) else ""
    try:
        import tomllib

        with open(os.path.join(a.run_dir, "recipe.resolved.toml"), "rb") as f:
            rec = tomllib.load(f)
        t = rec["train"]
        rep["settings"] = {"seed": rec["run"]["seed"], "device": t["device"], "dtype": rec["model"]["dtype"],
                           "optimizer": t["optimizer"], "lr": t["learning_rate"], "scheduler": t["lr_scheduler"],
                           "warmup_steps": t["warmup_steps"], "weight_decay": t["weight_decay"],
                           "max_grad_norm": t["max_grad_norm"], "micro_batch_size": t["micro_batch_size"],
                           "gradient_accumulation_steps": t["gradient_accumulation_steps"],
                           "max_seq_length": t["max_seq_length"], "max_steps": t["max_steps"]}
    except Exception as e:  # noqa: BLE001
        rep["error"] = f"no resolved recipe: {e}"
    mp = os.path.join(a.run_dir, "train", "metrics.jsonl")
    if os.path.exists(mp):
        rows = [json.loads(l) for l in open(mp) if l.strip()]
        rep["metrics"] = [{k: r.get(k) for k in ("step", "loss", "lr", "grad_norm", "tokens", "trained_tokens", "step_s")}
                          for r in rows]
    ep = os.path.join(a.run_dir, "evaluate", "report.json")
    if os.path.exists(ep):
        r = json.load(open(ep))
        rep["eval"] = {"before": r.get("before", {}).get("eval_loss"), "after": r.get("after", {}).get("eval_loss"),
                       "rows": r.get("eval_rows")}
    m = re.search(r"train: \d+ steps in ([0-9.]+)s", log)
    if m:
        rep["train_s"] = float(m.group(1))
    want = rep.get("settings", {}).get("max_steps")
    if rep.get("metrics") and rep.get("eval") and rep["eval"].get("after") is not None and len(rep["metrics"]) == want:
        rep["ok"] = True
    else:
        rep.setdefault("error", "incomplete run: " + " | ".join(log.strip().splitlines()[-3:])[-600:])
    with open(a.out, "w") as f:
        json.dump(rep, f, indent=1)
    return 0


def losses(r):
    return [m["loss"] for m in r.get("metrics", [])]


def tail_mean(r, k=10):
    x = losses(r)[-k:]
    return sum(x) / len(x) if x else None


def fmt(x, p=4):
    return "—" if x is None else f"{x:.{p}f}"


def fe(x):
    return "—" if x is None else f"{x:.2e}"


def dmax(a, b):
    la, lb = losses(a), losses(b)
    n = min(len(la), len(lb))
    if not n:
        return None, None
    d = [abs(la[i] - lb[i]) for i in range(n)]
    i = max(range(n), key=lambda k: d[k])
    return d[i], i + 1


def ev(r, k="after"):
    return (r.get("eval") or {}).get(k)


def sub(x, y):
    return None if x is None or y is None else x - y


def absd(x, y):
    return None if x is None or y is None else abs(x - y)


def table(a):
    q = a.qdir
    runs = {}
    for p in sorted(glob.glob(os.path.join(q, "*.json"))):
        if os.path.basename(p) in ("summary.json", "weights_check.json"):
            continue
        try:
            r = json.load(open(p))
        except Exception:  # noqa: BLE001
            continue
        if "peer" in r and "tag" in r:
            runs[r["tag"]] = r
    tags = sorted(runs, key=lambda t: (runs[t]["peer"] != "tuner", t))
    if not tags:
        print("quality: no runs found in", q)
        return 1
    steps = max((len(losses(runs[t])) for t in tags), default=0)
    # ---- curves.csv
    with open(os.path.join(q, "curves.csv"), "w") as f:
        f.write("step," + ",".join(tags) + "\n")
        for s in range(steps):
            vals = []
            for t in tags:
                ls = losses(runs[t])
                vals.append(f"{ls[s]:.6f}" if s < len(ls) else "")
            f.write(f"{s + 1}," + ",".join(vals) + "\n")
    plot_note = plot(q, tags, runs)

    def tag_of(peer, seed, rep):
        t = f"{peer}-s{seed}-r{rep}"
        return runs.get(t) if runs.get(t, {}).get("ok") else None

    seeds = []
    for t in tags:
        m = re.match(r"(\w+)-s(\d+)-r(\d+)$", t)
        if m and int(m.group(2)) not in seeds:
            seeds.append(int(m.group(2)))
    seeds = [s for s in (a.seeds or seeds)]
    s0 = seeds[0] if seeds else None
    out = ["## Quality: tuner vs HF transformers + peft + bitsandbytes (same data, order, seed)", ""]
    w = runs and next(iter(runs.values()))
    st = next((runs[t].get("settings") for t in tags if runs[t]["peer"] == "tuner" and runs[t].get("settings")), {}) or {}
    hst = next((runs[t].get("settings") for t in tags if runs[t]["peer"] == "hf" and runs[t].get("settings")), {}) or {}
    if st:
        out.append(f"Settings: {st.get('max_steps')} steps × {st.get('micro_batch_size')} × GA "
                   f"{st.get('gradient_accumulation_steps')}, seq ≤ {st.get('max_seq_length')}, {st.get('optimizer')} "
                   f"lr {st.get('lr')} {st.get('scheduler')} warm-up {st.get('warmup_steps')}, wd {st.get('weight_decay')}, "
                   f"clip {st.get('max_grad_norm')}, device {st.get('device')}, dtype {st.get('dtype')}"
                   + (f"; HF: {hst.get('optimizer')}, {hst.get('dtype')}, autocast {hst.get('autocast')}, "
                      f"{hst.get('quant')}, {hst.get('lora')}, grad ckpt {hst.get('gradient_checkpointing')}" if hst else ""))
        out.append("")
    out += ["| run | ok | loss step 1 | final loss | mean last 10 | eval before | eval after | train s |",
            "|---|---|---|---|---|---|---|---|"]
    for t in tags:
        r = runs[t]
        ls = losses(r)
        out.append(f"| {t} | {'yes' if r.get('ok') else 'NO: ' + str(r.get('error', ''))[:80]} | "
                   f"{fmt(ls[0] if ls else None)} | {fmt(ls[-1] if ls else None)} | {fmt(tail_mean(r))} | "
                   f"{fmt(ev(r, 'before'))} | {fmt(ev(r, 'after'))} | {fmt(r.get('train_s'), 1)} |")
    out.append("")
    summ = {"runs": {t: {"ok": runs[t].get("ok"), "final_loss": (losses(runs[t]) or [None])[-1], "tail10": tail_mean(runs[t]),
                         "eval_before": ev(runs[t], "before"), "eval_after": ev(runs[t], "after")} for t in tags}}
    cmp_rows = ["| comparison | max \\|Δ loss\\| over steps (at step) | Δ mean last 10 | Δ eval after | Δ eval before |",
                "|---|---|---|---|---|"]
    comps = {}
    for peer in ("tuner", "hf"):
        a1, a2 = tag_of(peer, s0, 1), tag_of(peer, s0, 2)
        if a1 and a2:
            d, at = dmax(a1, a2)
            comps[f"{peer} repeat (seed {s0})"] = {"max_step_diff": d, "tail10": absd(tail_mean(a1), tail_mean(a2)),
                                                 "eval_after": absd(ev(a1), ev(a2)), "eval_before": absd(ev(a1, "before"), ev(a2, "before"))}
            cmp_rows.append(f"| {peer}: same seed {s0}, run 1 vs 2 | {fe(d)} (step {at}) | {fe(absd(tail_mean(a1), tail_mean(a2)))} | "
                            f"{fe(absd(ev(a1), ev(a2)))} | {fe(absd(ev(a1, 'before'), ev(a2, 'before')))} |")
        for s in seeds[1:]:
            b = tag_of(peer, s, 1)
            if a1 and b:
                comps[f"{peer} seed {s0} vs {s}"] = {"tail10": absd(tail_mean(a1), tail_mean(b)), "eval_after": absd(ev(a1), ev(b))}
                cmp_rows.append(f"| {peer}: seed {s0} vs seed {s} | (other data order) | {fe(absd(tail_mean(a1), tail_mean(b)))} | "
                                f"{fe(absd(ev(a1), ev(b)))} | — |")
    order_notes = []
    for s in seeds:
        for rep in (1, 2):
            tu, hf = tag_of("tuner", s, rep), tag_of("hf", s, rep)
            if not (tu and hf):
                continue
            d, at = dmax(tu, hf)
            l1t, l1h = losses(tu)[0], losses(hf)[0]
            key = f"tuner - hf (seed {s}, run {rep})"
            comps[key] = {"max_step_diff": d, "max_step_diff_at": at, "step1": l1t - l1h,
                          "step1_rel": (l1t - l1h) / abs(l1h) if l1h else None,
                          "tail10": sub(tail_mean(tu), tail_mean(hf)), "eval_after": sub(ev(tu), ev(hf)),
                          "eval_before": sub(ev(tu, "before"), ev(hf, "before")),
                          "hf_eval_of_tuner_adapter_minus_tuner": sub((hf.get("eval") or {}).get("tuner_adapter_by_hf"), ev(tu))}
            cmp_rows.append(f"| tuner − HF: seed {s}, run {rep} (step 1: {l1t - l1h:+.2e}) | {fe(d)} (step {at}) | "
                            f"{sub(tail_mean(tu), tail_mean(hf)):+.2e} | {fe(sub(ev(tu), ev(hf)))} | "
                            f"{fe(sub(ev(tu, 'before'), ev(hf, 'before')))} |")
            mt, mh = tu.get("metrics", []), hf.get("metrics", [])
            same = len(mt) == len(mh) and all(x["tokens"] == y["tokens"] and x["trained_tokens"] == y["trained_tokens"] for x, y in zip(mt, mh))
            order_notes.append(f"seed {s} run {rep}: {'identical' if same else 'DIFFERENT'} token and trained-token counts at all {len(mt)} steps")
            comps[key]["data_order_identical"] = same
            cross = (hf.get("eval") or {}).get("tuner_adapter_by_hf")
            if cross is not None and rep == 1:
                order_notes.append(f"seed {s}: tuner's final adapter, eval loss by tuner {fmt(ev(tu), 6)}, by the HF code "
                                   f"{fmt(cross, 6)} (Δ {fe(ev(tu) - cross)})")
    out += cmp_rows + [""]
    if order_notes:
        out += ["Data order (per-step token counts, tuner vs HF) and eval code:", ""] + [f"- {n}" for n in order_notes] + [""]
    wc = os.path.join(q, "weights_check.json")
    if os.path.exists(wc):
        w = json.load(open(wc))
        if w.get("checked"):
            out.append(f"Weights: transformers' GGUF import vs tuner's, {w.get('tensors_compared')} tensors, max |Δ| "
                       f"{fe(w.get('max_abs_diff'))}, {w.get('n_mismatches')} mismatching; configs: "
                       f"{w.get('config_diff') or 'same'}.")
        else:
            out.append(f"Weights: {w.get('source')} ({w.get('error', '')[:200]})")
        out.append("")
    # verdict on the eval loss after training
    noise = [comps[k]["eval_after"] for k in comps if "repeat" in k and comps[k].get("eval_after") is not None]
    spread = [comps[k]["eval_after"] for k in comps if " vs " in k and comps[k].get("eval_after") is not None]
    gap = [abs(comps[k]["eval_after"]) for k in comps if k.startswith("tuner - hf") and comps[k].get("eval_after") is not None]
    if gap:
        g = max(gap)
        n = max(noise) if noise else None
        sp = max(spread) if spread else None
        v = f"|tuner − HF| eval loss after training: {fe(g)}; same-seed repeat spread {fe(n)}; seed-to-seed spread {fe(sp)}."
        if n is not None and g <= n:
            v += " Within run-to-run noise."
        elif sp is not None and g <= sp:
            v += " Larger than the same-seed repeat spread, within the seed-to-seed spread."
        elif sp is not None:
            v += " LARGER than the seed-to-seed spread: investigate."
        out += ["Verdict: " + v, ""]
        summ["verdict"] = v
    out += [f"Curves: {os.path.join(q, 'curves.csv')}; plot: {plot_note}", ""]
    summ["comparisons"] = comps
    with open(os.path.join(q, "summary.json"), "w") as f:
        json.dump(summ, f, indent=1)
    text = "\n".join(out)
    with open(os.path.join(q, "table.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


def plot(q, tags, runs, title="SmolLM2-135M QLoRA: tuner vs HF + peft + bitsandbytes", name="loss.png"):
    """Loss curves of runs[tag]["metrics"] into q/name (guide_report.py draws its curves here too)."""
    path = os.path.join(q, name)
    series = [(t, [(m["step"], m["loss"]) for m in runs[t].get("metrics", []) if m.get("loss") is not None]) for t in tags]
    series = [(t, s) for t, s in series if s]
    if not series:
        return "no data"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(9, 5), dpi=110)
        for i, (t, s) in enumerate(series):
            ax.plot([x for x, _ in s], [y for _, y in s], label=t, lw=1.2,
                    ls="-" if t.startswith("tuner") else "--", color=[c / 255 for c in COLOURS[i % 8][1]])
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("train loss (summed NLL / trained tokens)")
        ax.set_title(title)
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path)
        return f"{path} (matplotlib)"
    except Exception:  # noqa: BLE001 - fall back to a plain PNG
        pass
    W, H, M = 900, 500, 44
    xs = [x for _, s in series for x, _ in s]
    ys = [y for _, s in series for _, y in s]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    if x1 == x0:
        x1 = x0 + 1
    if y1 == y0:
        y1 = y0 + 1
    img = [[(255, 255, 255)] * W for _ in range(H)]

    def px(x, y, c):
        if 0 <= x < W and 0 <= y < H:
            img[y][x] = c

    for x in range(M, W - M):
        px(x, H - M, (0, 0, 0))
    for y in range(M, H - M + 1):
        px(M, y, (0, 0, 0))
    for k in range(1, 5):  # light grid at quarters
        gy = H - M - k * (H - 2 * M) // 4
        for x in range(M + 1, W - M, 3):
            px(x, gy, (210, 210, 210))

    def text(x, y, s, c=(60, 60, 60), k=2):
        """Digits, '.', '-' in a 3x5 pixel font scaled by k, left edge x, top y."""
        for ch in s:
            rows = DIGITS.get(ch)
            if rows:
                for r, bits in enumerate(rows):
                    for b in range(3):
                        if bits >> (2 - b) & 1:
                            for dx in range(k):
                                for dy in range(k):
                                    px(x + b * k + dx, y + r * k + dy, c)
            x += 4 * k

    for k in range(5):  # tick labels: loss at the quarters, steps at the ends and the middle
        yv = y0 + (y1 - y0) * k / 4
        text(2, H - M - k * (H - 2 * M) // 4 - 5, f"{yv:.2f}")
    for xv in (x0, (x0 + x1) // 2, x1):
        text(M + int((xv - x0) / (x1 - x0) * (W - 2 * M - 1)) - 8, H - M + 8, str(int(xv)))

    def to(x, y):
        return (M + int((x - x0) / (x1 - x0) * (W - 2 * M - 1)), H - M - int((y - y0) / (y1 - y0) * (H - 2 * M - 1)))

    legend = []
    for i, (t, s) in enumerate(series):
        name, c = COLOURS[i % 8]
        legend.append(f"{t}={name}")
        pts = [to(x, y) for x, y in s]
        for (ax_, ay), (bx, by) in zip(pts, pts[1:]):
            n = max(abs(bx - ax_), abs(by - ay), 1)
            for k in range(n + 1):
                if t.startswith("hf") and (k // 4) % 2:
                    continue  # dashed for HF
                px(ax_ + (bx - ax_) * k // n, ay + (by - ay) * k // n, c)
        for k, (lx, ly) in enumerate([(W - M - 20 - 14 * i, M - 20)]):
            for dx in range(10):
                for dy in range(10):
                    px(lx + dx, ly + dy, c)
    raw = b"".join(b"\x00" + bytes(v for p in row for v in p) for row in img)

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    return (f"{path} (plain PNG, numbers only: x = step {x0}..{x1}, y = train loss; solid tuner, dashed HF; "
            f"legend squares right to left at the top: {', '.join(legend)})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sp = ap.add_subparsers(dest="cmd", required=True)
    t = sp.add_parser("tuner")
    t.add_argument("run_dir")
    t.add_argument("log")
    t.add_argument("--tag", required=True)
    t.add_argument("--out", required=True)
    b = sp.add_parser("table")
    b.add_argument("qdir")
    b.add_argument("--seeds", type=int, nargs="*", default=None)
    a = ap.parse_args()
    return collect_tuner(a) if a.cmd == "tuner" else table(a)


if __name__ == "__main__":
    sys.exit(main())
