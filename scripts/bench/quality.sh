#!/usr/bin/env bash
# Quality comparison (issue 6, section 4): QLoRA of the real SmolLM2-135M-Instruct on the shipped
# requests-json dataset, by tuner and by HF transformers + peft + bitsandbytes, with the same
# settings, the same examples in the same order and the same initial adapter; each run repeated
# to measure run-to-run noise, and a second seed for the seed-to-seed spread. One call on the GPU
# machine; prints a markdown table last.
#
#   SMOL_GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf bash scripts/bench/quality.sh
#
# Per seed in $SEEDS (the first one $REPEATS times, the others once), interleaved:
#   tuner run recipes/bench/quality.toml --until evaluate (fetch: tuner's GGUF import; tokenize;
#     train; evaluate: eval loss before/after), each repetition in a fresh run dir;
#   quality_gguf.py (once): transformers' own GGUF import, compared tensor by tensor with tuner's,
#     saved as the HF peer's model folder;
#   quality_hf.py: HF + peft + bitsandbytes on that tuner run's tokenized shards, settings from its
#     recipe.resolved.toml.
# Results: $OUT/quality/{tuner,hf}-s<seed>-r<k>.json and .log, curves.csv, loss.png, summary.json,
# table.md, weights_check.json. quality_report.py explains the comparisons.
#
# Env (defaults): SMOL_GGUF (required)  DEVICE=cuda  STEPS=100  SEQ=256  SEEDS="42 7"  REPEATS=2
#   WARMUP (10, or 1 when STEPS < 20)  OPTIM (recipe: adamw_8bit; or adamw)  LR  MBS  GA (recipe: 5e-4, 4, 2)
#   EVAL_ROWS=0 (all 240 eval rows; N: the first N, for a quick CPU run)  PEERS="tuner hf"
#   PARALLEL (1 on a GPU: tuner's runs in the background while HF's run; 0 on the CPU: one at a time)
#   OUT=${OUT:-/tmp/bench-out}  SCRATCH=/tmp/bench-quality  BUDGET_S=570 (the whole call)  T_RUN=400 (one run)
#   TUNER_BIN=.device/tuner
#   PYTHON=python3  BENCH_SITE=.device/pysite (bitsandbytes, gguf; made by install.sh)
#   BENCH_WHEELS=.device/wheels (when BENCH_SITE lacks bitsandbytes or gguf, their two wheels are
#   installed from here into $SCRATCH/pysite)
# CPU smoke run (no GPU; ~10 min on 2 cores):
#   DEVICE=cpu STEPS=3 SEEDS="42 7" EVAL_ROWS=24 SMOL_GGUF=$PWD/models/SmolLM2-135M-Instruct.Q4_1.gguf \
#     TUNER_BIN=~/.cache/tuner/target/release/tuner PYTHON=~/.cache/tuner/venv/bin/python bash scripts/bench/quality.sh
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$ROOT/scripts/bench
START=$(date +%s)
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-100} SEQ=${SEQ:-256} SEEDS=${SEEDS:-"42 7"} REPEATS=${REPEATS:-2}
if [ "$STEPS" -lt 20 ]; then WARMUP=${WARMUP:-1}; else WARMUP=${WARMUP:-10}; fi
EVAL_ROWS=${EVAL_ROWS:-0}
PARALLEL=${PARALLEL:-}
[ -n "$PARALLEL" ] || { [ "$DEVICE" = cpu ] && PARALLEL=0 || PARALLEL=1; }
PEERS=${PEERS:-"tuner hf"}
OUT=$(realpath -m "${OUT:-/tmp/bench-out}")
Q=$OUT/quality
SCRATCH=$(realpath -m "${SCRATCH:-/tmp/bench-quality}")
BUDGET_S=${BUDGET_S:-570}
T_RUN=${T_RUN:-400}
PY=${PYTHON:-python3}
TUNER_BIN=${TUNER_BIN:-$ROOT/.device/tuner}
case $TUNER_BIN in /*) ;; *) TUNER_BIN=$ROOT/$TUNER_BIN ;; esac
SITE=$(realpath -m "${BENCH_SITE:-$ROOT/.device/pysite}")
WHEELS=$(realpath -m "${BENCH_WHEELS:-$ROOT/.device/wheels}")
RECIPE=$ROOT/recipes/bench/quality.toml
[ -n "${SMOL_GGUF:-}" ] && [ -f "$SMOL_GGUF" ] || { echo "quality: set SMOL_GGUF to the SmolLM2-135M-Instruct .gguf file (found: '${SMOL_GGUF:-}')" >&2; exit 2; }
SMOL_GGUF=$(realpath "$SMOL_GGUF")

mkdir -p "$Q" "$SCRATCH"
rm -f "$Q"/*.json "$Q"/*.log "$Q"/curves.csv "$Q"/loss.png "$Q"/table.md
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export HF_HOME=${HF_HOME:-$SCRATCH/hf-home}
TL=$("$PY" -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib

left() { echo $((BUDGET_S - ($(date +%s) - START))); }
say() { echo "[quality +$(( $(date +%s) - START ))s] $*"; }
# a step's timeout: its own limit, cut to what the budget has left (10 s kept to report)
limit() { local l; l=$(( $(left) - 10 )); [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }

say "device $DEVICE, $STEPS steps, seq $SEQ, seeds $SEEDS (first ×$REPEATS), warm-up $WARMUP, eval rows ${EVAL_ROWS/#0/all}; out $Q"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || say "no nvidia-smi"
sha=$(sha256sum "$SMOL_GGUF" | cut -c1-16)
say "model $SMOL_GGUF ($(stat -c %s "$SMOL_GGUF") bytes, sha256 $sha…)"

# ---- Python side: bitsandbytes and gguf (from BENCH_SITE, or their wheels into a scratch site)
have() { PYTHONPATH=$1 "$PY" -c "import importlib.util,sys; sys.exit(0 if importlib.util.find_spec('$2') else 1)" 2>/dev/null; }
PP=$SITE
for mod in bitsandbytes gguf; do
  if ! have "$PP" $mod; then
    w=$(ls "$WHEELS"/$mod-*.whl 2>/dev/null | head -1)
    if [ -n "$w" ]; then
      say "installing $(basename "$w") into $SCRATCH/pysite"
      if "$PY" -m pip --version >/dev/null 2>&1; then
        "$PY" -m pip install --quiet --no-deps --no-index --disable-pip-version-check --target "$SCRATCH/pysite" "$w" || say "pip failed for $w"
      else
        "$PY" -c 'import sys,zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' "$w" "$SCRATCH/pysite"
      fi
      PP=$SITE:$SCRATCH/pysite
    else
      say "no $mod in $SITE and no $mod wheel in $WHEELS"
    fi
  fi
done
export PYTHONPATH=$PP${PYTHONPATH:+:$PYTHONPATH}
"$PY" -c 'import torch,transformers,peft;print("torch",torch.__version__,"| transformers",transformers.__version__,"| peft",peft.__version__)' 2>&1 | tail -1
"$PY" -c 'import bitsandbytes as b;print("bitsandbytes",b.__version__)' 2>&1 | tail -1
"$PY" -c 'import gguf,importlib.metadata as m;print("gguf",m.version("gguf"))' 2>&1 | tail -1
LD_LIBRARY_PATH=$TL "$TUNER_BIN" --version 2>&1 | head -1

# ---- the settings every tuner run gets (the HF peer reads them back from recipe.resolved.toml)
W=$SCRATCH/work
rm -rf "$W"
mkdir -p "$W"
SETS=(--set "model.source=$SMOL_GGUF" --set "train.device=$DEVICE" --set "train.max_steps=$STEPS"
      --set "train.max_seq_length=$SEQ" --set "train.warmup_steps=$WARMUP")
[ -n "${OPTIM:-}" ] && SETS+=(--set "train.optimizer=$OPTIM")
[ -n "${LR:-}" ] && SETS+=(--set "train.learning_rate=$LR")
[ -n "${MBS:-}" ] && SETS+=(--set "train.micro_batch_size=$MBS")
[ -n "${GA:-}" ] && SETS+=(--set "train.gradient_accumulation_steps=$GA")
if [ "$EVAL_ROWS" -gt 0 ]; then
  head -n "$EVAL_ROWS" "$ROOT/datasets/requests-json/eval.jsonl" > "$W/eval.jsonl"
  SETS+=(--set "dataset.eval_source=$W/eval.jsonl")
fi

run_tuner() { # SEED REP
  local tag=tuner-s$1-r$2 rd=$W/tuner-s$1-r$2 lim
  lim=$(limit "$T_RUN")
  if [ "$lim" -lt 30 ]; then say "$tag: skipped (out of time budget)"; return 1; fi
  say "$tag (limit ${lim}s)"
  (cd "$W" && LD_LIBRARY_PATH=$TL timeout -k 10 "$lim" "$TUNER_BIN" run "$RECIPE" --run-dir "$rd" --until evaluate \
     "${SETS[@]}" --set "run.seed=$1") > "$Q/$tag.log" 2>&1
  local rc=$?
  "$PY" "$HERE/quality_report.py" tuner "$rd" "$Q/$tag.log" --tag "$tag" --out "$Q/$tag.json"
  grep -hE "^train: [0-9]+ steps in|^evaluate: (before|after)" "$Q/$tag.log" | sed "s/^/  $tag: /"
  [ $rc = 0 ] || say "$tag failed (rc $rc): $(tail -3 "$Q/$tag.log" | tr '\n' ' ' | cut -c1-300)"
  return $rc
}

HF_MODEL=
hf_model() { # make the HF peer's model folder once, from tuner run dir $1 (for the weight check)
  [ -n "$HF_MODEL" ] && return 0
  local lim
  lim=$(limit 120)
  say "transformers' GGUF import (limit ${lim}s)"
  timeout -k 10 "$lim" "$PY" "$HERE/quality_gguf.py" "$SMOL_GGUF" "$W/hf-model" --tuner-model "$1/fetch/model" \
    --json "$Q/weights_check.json" --fallback > "$Q/gguf_import.log" 2>&1
  local rc=$?
  grep -h "^quality_gguf\|^  " "$Q/gguf_import.log" | head -8
  if [ $rc = 0 ] || [ $rc = 3 ]; then HF_MODEL=$W/hf-model; return 0; fi
  say "the GGUF import failed (rc $rc): $(tail -2 "$Q/gguf_import.log" | tr '\n' ' ' | cut -c1-300)"
  return 1
}

run_hf() { # SEED REP
  local tag=hf-s$1-r$2 rd=$W/tuner-s$1-r1 lim
  if [ ! -f "$rd/tokenize/shards.json" ]; then say "$tag: skipped (no tokenized shards in $rd)"; return 1; fi
  hf_model "$rd" || return 1
  lim=$(limit "$T_RUN")
  if [ "$lim" -lt 30 ]; then say "$tag: skipped (out of time budget)"; return 1; fi
  say "$tag (limit ${lim}s)"
  local xa=()
  [ -f "$rd/train/adapter/adapter_model.safetensors" ] && [ "$2" = 1 ] && xa=(--tuner-adapter "$rd/train/adapter")
  [ "$2" = 1 ] && [ "$PARALLEL" = 1 ] && has tuner && xa=(--tuner-adapter "$rd/train/adapter" --wait-adapter 150)
  (cd "$W" && timeout -k 10 "$lim" "$PY" "$HERE/quality_hf.py" "$HF_MODEL" --run-dir "$rd" --out "$Q/$tag.json" \
     --device "$DEVICE" --tag "$tag" "${xa[@]}") > "$Q/$tag.log" 2>&1
  local rc=$?
  grep -h "^$tag: \(step $STEPS/\|eval\)" "$Q/$tag.log" | sed 's/^/  /'
  if [ $rc != 0 ]; then
    say "$tag failed (rc $rc): $(grep -v Warning "$Q/$tag.log" | tail -2 | tr '\n' ' ' | cut -c1-300)"
    [ -f "$Q/$tag.json" ] || "$PY" -c 'import json,sys; json.dump({"peer":"hf","tag":sys.argv[2],"ok":False,"error":sys.argv[3]},open(sys.argv[1],"w"))' \
      "$Q/$tag.json" "$tag" "exit code $rc (timed out after ${lim}s if 124/137)"
  fi
  return $rc
}

# (seed, repetition) pairs: the first seed $REPEATS times, the others once
PAIRS=()
first=1
for seed in $SEEDS; do
  reps=1
  [ $first = 1 ] && reps=$REPEATS
  first=0
  for rep in $(seq 1 "$reps"); do PAIRS+=("$seed:$rep"); done
done
tokenize_only() { # SEED: fetch + tokenize in the seed's first tuner run dir (the HF peer reads its shards)
  [ -f "$W/tuner-s$1-r1/tokenize/shards.json" ] && return 0
  (cd "$W" && LD_LIBRARY_PATH=$TL timeout -k 10 "$(limit 120)" "$TUNER_BIN" run "$RECIPE" --run-dir "$W/tuner-s$1-r1" \
     --until tokenize "${SETS[@]}" --set "run.seed=$1") > "$Q/tokenize-s$1.log" 2>&1 \
    || say "tokenize for seed $1 failed: $(tail -2 "$Q/tokenize-s$1.log" | tr '\n' ' ' | cut -c1-300)"
}
has() { [[ " $PEERS " == *" $1 "* ]]; }

if [ "$PARALLEL" = 1 ] && has tuner && has hf; then
  # tuner's runs in the background, HF's in the foreground, on the same GPU: results do not depend
  # on it (the same kernels run), only the step times do, and they are not what is compared here.
  for seed in $SEEDS; do tokenize_only "$seed"; done
  hf_model "$W/tuner-s${SEEDS%% *}-r1" || true
  (for p in "${PAIRS[@]}"; do run_tuner "${p%%:*}" "${p##*:}"; done) > "$Q/tuner-chain.log" 2>&1 &
  chain=$!
  for p in "${PAIRS[@]}"; do run_hf "${p%%:*}" "${p##*:}"; done
  wait $chain
  cat "$Q/tuner-chain.log"
else
  for p in "${PAIRS[@]}"; do
    seed=${p%%:*} rep=${p##*:}
    has tuner && run_tuner "$seed" "$rep"
    if has hf; then
      has tuner || tokenize_only "$seed"
      run_hf "$seed" "$rep"
    fi
  done
fi

say "done"
echo
"$PY" "$HERE/quality_report.py" table "$Q" --seeds $SEEDS
