#!/usr/bin/env bash
# The longest sequence tuner trains within a memory limit (issue 6 §3: "the longest sequence that
# fits in 80 GB"), on the GPU machine, in one call: one random-init model of the shape (kept between
# probes), then one short tuner run per sequence length in $SEQS (micro-batch 1, the race's
# settings otherwise: NF4, LoRA r16 on the 7 projections, gradient checkpointing, 8-bit AdamW),
# each through race.sh, ascending, until a run fails or its allocator peak passes $LIMIT_GIB. The
# card has more than the limit (an H200 has 141 GiB), so a run that needs more than the limit
# still completes and is reported as not fitting. Prints a table last.
#
#   bash scripts/bench/longest_seq.sh                              # llama-8b, offload on and off
#   SHAPE=llama-1b SEQS="65536 131072" bash scripts/bench/longest_seq.sh
#
# Env (defaults): SHAPE=llama-8b  SEQS="65536 98304 131072 163840 196608 262144"  LIMIT_GIB=80
#   PEERS="tuner-offload tuner" (one probe series each)  STEPS=2 (the second step is the timed one)
#   BUDGET_S=570 (the whole call)  OUT=${OUT:-/tmp/bench-out}  and race.sh's TUNER_BIN, PYTHON, SCRATCH.
# DEVICE=cpu TINY=1 SEQS="64 128" LIMIT_GIB=1 runs the same loop on a toy model on the CPU.
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
START=$(date +%s)
SHAPE=${SHAPE:-llama-8b}
SEQS=${SEQS:-"65536 98304 131072 163840 196608 262144"}
LIMIT_GIB=${LIMIT_GIB:-80}
PEERS=${PEERS:-"tuner-offload tuner"}
STEPS=${STEPS:-2}
BUDGET_S=${BUDGET_S:-570}
OUT=$(realpath -m "${OUT:-/tmp/bench-out}")
RES=$OUT/longest_seq.tsv
mkdir -p "$OUT"
: > "$RES"
left() { echo $((BUDGET_S - ($(date +%s) - START))); }
for peer in $PEERS; do
  for s in $SEQS; do
    budget=$(left)
    if [ "$budget" -lt 60 ]; then
      echo "longest_seq: $peer seq $s skipped: ${budget}s of the budget left"
      printf '%s\t%s\tskipped\t\t\t\n' "$peer" "$s" >> "$RES"
      break
    fi
    o=$OUT/$peer-$s
    PEERS=$peer SEQ=$s BATCH=1 STEPS=$STEPS WARMUP=1 KEEP_MODELS=1 BUDGET_S=$budget OUT=$o \
      bash "$ROOT/scripts/bench/race.sh" "$SHAPE" > "$o.log" 2>&1
    row=$(python3 - "$o/$SHAPE/$peer.json" "$LIMIT_GIB" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except (OSError, ValueError) as e:
    print(f"failed\t\t\tno result ({type(e).__name__})"); sys.exit()
peak = d.get("peak_gib")
if not d.get("ok") or peak is None:
    print(f"failed\t{peak or ''}\t\texit {d.get('exit_code')}"); sys.exit()
fits = "fits" if peak <= float(sys.argv[2]) else "over"
steps = d.get("step_s") or []
last = f"{steps[-1]:.1f} s" if steps else ""
print(f"{fits}\t{peak:.2f}\t{d.get('tokens_per_s') or 0:.0f}\t{last}")
PY
)
    printf '%s\t%s\t%s\n' "$peer" "$s" "$row" >> "$RES"
    echo "longest_seq: $peer seq $s: $row"
    case $row in fits*) ;; *) break ;; esac
  done
done
echo
echo "== longest_seq: $SHAPE, micro-batch 1, limit $LIMIT_GIB GiB (allocator peak)"
python3 - "$RES" <<'PY'
import sys
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1]) if l.strip()]
print("| peer | seq | result | peak GiB | tokens/s | last step |")
print("|---|---|---|---|---|---|")
for r in rows:
    r += [""] * (6 - len(r))
    print("| " + " | ".join(r[:6]) + " |")
best = {}
for r in rows:
    if r[2] == "fits":
        best[r[0]] = max(best.get(r[0], 0), int(r[1]))
for p, s in best.items():
    print(f"longest that fits: {p} {s:,} tokens")
PY
