#!/usr/bin/env python3
"""Summarise an Nsight Compute CSV of kernel durations: the kernels of a profile window.

    TUNER_CUDA_PROFILE=2:3 ncu --profile-from-start off --metrics gpu__time_duration.sum \
        --cache-control none --clock-control none --csv --log-file ncu.csv tuner run recipe.toml ...
    ncu_summary.py ncu.csv [--top 25] [--list kernels.tsv]

Prints the kernel count and summed GPU time, then the kernels grouped by name (template arguments
and parameter lists dropped), largest total first, with their share. --list writes every kernel in
launch order (id, µs, grid, block, name), to see which op of a layer a kernel belongs to.
"""
import argparse
import csv
import re
import sys
from collections import defaultdict

UNIT = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "second": 1e6, "s": 1e6}


def short(name):
    """`ns::kernel<first template arguments…>`: the parameter list dropped, the template arguments
    cut to 60 characters (for libtorch's elementwise kernels they name the functor)."""
    name = re.sub(r"\)\s*$", "", name)
    name = name.split("(")[0] if "<" not in name.split("(")[0] else name
    m = re.match(r"^(?:void\s+)?([^<(]+)(<.*)?", name.strip())
    if not m:
        return name[:100]
    base, targs = m.group(1).strip(), m.group(2) or ""
    if targs:
        depth, end = 0, len(targs)
        for i, ch in enumerate(targs):
            depth += ch == "<"
            depth -= ch == ">"
            if depth == 0:
                end = i + 1
                break
        inner = targs[1 : end - 1]
        targs = "<" + (inner[:60] + "…" if len(inner) > 60 else inner) + ">"
    return base + targs


def rows(path):
    with open(path, newline="", errors="replace") as f:
        lines = [ln for ln in f if ln.startswith('"')]  # ncu prefixes its own log lines with ==
    for r in csv.DictReader(lines):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        v = float(r["Metric Value"].replace(",", ""))
        yield int(r["ID"]), r["Kernel Name"], v * UNIT.get(r.get("Metric Unit", "usecond"), 1.0), r.get("Grid Size", ""), r.get("Block Size", "")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--list")
    a = ap.parse_args()
    ks = sorted(rows(a.csv))
    if not ks:
        sys.exit(f"ncu_summary: no gpu__time_duration.sum rows in {a.csv}")
    total = sum(k[2] for k in ks)
    print(f"{len(ks)} kernels, {total / 1e3:.2f} ms of GPU time")
    by = defaultdict(lambda: [0, 0.0])
    for _, n, us, _, _ in ks:
        by[short(n)][0] += 1
        by[short(n)][1] += us
    print(f"{'share':>6} {'ms':>8} {'calls':>6}  kernel")
    for n, (c, us) in sorted(by.items(), key=lambda kv: -kv[1][1])[: a.top]:
        print(f"{100 * us / total:5.1f}% {us / 1e3:8.3f} {c:6d}  {n[:90]}")
    if a.list:
        with open(a.list, "w") as f:
            for i, n, us, g, b in ks:
                f.write(f"{i}\t{us:.1f}\t{g}\t{b}\t{short(n)}\n")


if __name__ == "__main__":
    main()
