#!/usr/bin/env bash
# Where tuner's early SmolLM2 loss curve sits between bf16 with PEFT's rounding order and exact
# (fp32) math: the QLoRA of recipes/bench/quality.toml by tuner alone, one seed, in three forms:
#   bf16         the default (CUDA kernels on: gate/up add the adapter's output inside the base
#                GEMM's f32 accumulator, rounded once)
#   bf16-nokern  train.cuda_kernels = false (every projection rounds its base output to bf16
#                first and adds the adapter's after, as PEFT does)
#   fp32         model.dtype = fp32
# and prints each one's per-step loss against the HF + peft curve of a quality.sh run (HF_CSV,
# column hf-s<seed>-r1), then the mean difference over steps 1-30 and 31-100.
#
#   SMOL_GGUF=/tmp/smol.gguf bash scripts/bench/quality_precision.sh
#
# Env (defaults): SMOL_GGUF (required)  SEED=42  TUNER_BIN=.device/tuner  OUT=/tmp/bench-out
#   HF_CSV=docs/img/quality-smollm2-curves-7e3c630.csv  PYTHON=python3
# Writes $OUT/precision/curves.csv (step, hf-bf16, tuner-bf16, tuner-bf16-nokern, tuner-fp32).
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
SEED=${SEED:-42}
TUNER_BIN=${TUNER_BIN:-$ROOT/.device/tuner}
OUT=$(realpath -m "${OUT:-/tmp/bench-out}")/precision
HF_CSV=${HF_CSV:-$ROOT/docs/img/quality-smollm2-curves-7e3c630.csv}
PY=${PYTHON:-python3}
[ -n "${SMOL_GGUF:-}" ] && [ -f "$SMOL_GGUF" ] || { echo "quality_precision: set SMOL_GGUF to the SmolLM2-135M-Instruct .gguf file" >&2; exit 2; }
TL=$("$PY" -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
mkdir -p "$OUT"
status=0
for v in bf16: bf16-nokern:train.cuda_kernels=false fp32:model.dtype=fp32; do
  tag=${v%%:*} set=${v#*:}
  rd=$OUT/run-$tag
  rm -rf "$rd"
  extra=(); [ -n "$set" ] && extra=(--set "$set")
  LD_LIBRARY_PATH=$TL timeout 300 "$TUNER_BIN" run "$ROOT/recipes/bench/quality.toml" --run-dir "$rd" --until train \
    --set "model.source=$SMOL_GGUF" --set train.device=cuda --set "run.seed=$SEED" "${extra[@]}" > "$OUT/$tag.log" 2>&1
  rc=$?; echo "$tag rc=$rc"; [ $rc = 0 ] || status=1
done
"$PY" - "$OUT" "$HF_CSV" "$SEED" <<'PY'
import csv, json, pathlib, sys
out, hf_csv, seed = pathlib.Path(sys.argv[1]), sys.argv[2], sys.argv[3]
hf = {int(r["step"]): float(r[f"hf-s{seed}-r1"]) for r in csv.DictReader(open(hf_csv))}
runs = {}
for tag in ["bf16", "bf16-nokern", "fp32"]:
    f = next((out / f"run-{tag}").rglob("metrics.jsonl"), None)
    if f:
        runs[tag] = {j["step"]: j["loss"] for j in map(json.loads, open(f)) if "loss" in j}
steps = sorted(s for s in hf if all(s in r for r in runs.values()))
with open(out / "curves.csv", "w") as f:
    f.write("step,hf-bf16," + ",".join(f"tuner-{t}" for t in runs) + "\n")
    for s in steps:
        f.write(f"{s},{hf[s]:.6f}," + ",".join(f"{runs[t][s]:.6f}" for t in runs) + "\n")
print("| run | step 6 | mean − HF, steps 1–30 | mean − HF, steps 31–100 | last − HF |")
print("|---|---|---|---|---|")
print(f"| HF + peft, bf16 | {hf[6]:.4f} | — | — | — |")
for t, r in runs.items():
    d = {s: r[s] - hf[s] for s in steps}
    early = [d[s] for s in steps if s <= 30]
    late = [d[s] for s in steps if s > 30]
    print(f"| tuner {t} | {r[6]:.4f} | {sum(early)/len(early):+.4f} | {sum(late)/max(len(late),1):+.4f} | {d[steps[-1]]:+.4f} |")
PY
exit $status
