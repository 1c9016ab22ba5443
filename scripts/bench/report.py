#!/usr/bin/env python3
"""The race table: read OUT/<shape>/<peer>.json and print markdown, tuner against each peer.

    report.py OUT [--json OUT/summary.json]

Ratios are tuner ÷ peer: tokens/s above 1 means tuner is faster; peak memory and first-step
time below 1 mean tuner uses less / gets there sooner.
"""
import argparse
import glob
import json
import os

ORDER = {"tuner": 0, "tuner-ref": 1, "tuner-offload": 2, "tuner-keep": 3, "hf": 4, "unsloth": 5}
NAMES = {"tuner": "tuner", "tuner-ref": "tuner, reference path (cuda_kernels = false)", "tuner-offload": "tuner, activations offloaded (offload_activations = on)", "tuner-keep": "tuner, activations kept on the GPU (offload_activations = off)", "hf": "HF transformers + peft + bnb", "unsloth": "Unsloth"}


def fmt(x, spec):
    return "—" if x is None else format(x, spec)


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    results = {}
    for p in sorted(glob.glob(os.path.join(a.out, "*", "*.json"))):
        shape = os.path.basename(os.path.dirname(p))
        peer = os.path.splitext(os.path.basename(p))[0]
        if peer not in ORDER:
            continue
        try:
            results.setdefault(shape, {})[peer] = json.load(open(p))
        except Exception as e:  # noqa: BLE001
            results.setdefault(shape, {})[peer] = {"ok": False, "error": f"unreadable {p}: {e}"}

    lines = [
        "| shape | peer | tokens/s | peak GiB | first step s | MFU | loss first → last | tuner÷peer tokens/s | tuner÷peer peak | tuner÷peer first step |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for shape in sorted(results):
        runs = results[shape]
        t = runs.get("tuner") if runs.get("tuner", {}).get("ok") else None
        for peer in sorted(runs, key=lambda k: ORDER.get(k, 9)):
            r = runs[peer]
            name = NAMES.get(peer, peer)
            if not r.get("ok"):
                err = (r.get("error") or "failed").strip().splitlines()
                err = err[-1] if err else "failed"
                lines.append(f"| {shape} | {name} | FAILED: {err[:140].replace('|', '/')} | | | | | | | |")
                summary.setdefault(shape, {})[peer] = {"ok": False, "error": r.get("error")}
                continue
            tps, peak, first, m = r.get("tokens_per_s"), r.get("peak_gib"), r.get("first_step_s"), r.get("mfu")
            losses = [x for x in r.get("losses", []) if x is not None]
            loss = f"{losses[0]:.3f} → {losses[-1]:.3f}" if losses else "—"
            rt = rp = rf = None
            if t is not None and peer != "tuner":
                rt = ratio(t.get("tokens_per_s"), tps)
                rp = ratio(t.get("peak_gib"), peak)
                rf = ratio(t.get("first_step_s"), first)
            peak_s = fmt(peak, ".2f") + (" (RSS)" if r.get("peak_is_rss") else "")
            note = " ⚠" if r.get("warning") else ""
            lines.append(
                f"| {shape} | {name}{note} | {fmt(tps, ',.0f')} | {peak_s} | {fmt(first, '.1f')} | {fmt(m, '.3f')} | {loss} "
                f"| {fmt(rt, '.2f') + '×' if rt else '—'} | {fmt(rp, '.2f') + '×' if rp else '—'} | {fmt(rf, '.2f') + '×' if rf else '—'} |"
            )
            summary.setdefault(shape, {})[peer] = {
                "ok": True, "tokens_per_s": tps, "peak_gib": peak, "first_step_s": first, "mfu": m,
                "tuner_over_peer": {"tokens_per_s": rt, "peak": rp, "first_step": rf} if peer != "tuner" else None,
                "warning": r.get("warning"),
            }
    print("\n".join(lines))
    warns = [(s, p, results[s][p]["warning"]) for s in results for p in results[s] if results[s][p].get("warning")]
    for s, p, w in warns:
        print(f"\n⚠ {s} / {p}: {w}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
