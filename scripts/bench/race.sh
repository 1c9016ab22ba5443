#!/usr/bin/env bash
# Race tuner against HF transformers+peft+bitsandbytes and Unsloth on random-init models of real
# shapes, in one call on the GPU machine; prints a markdown table last (tuner ÷ peer ratios).
#
#   bash scripts/bench/race.sh llama-1b llama-8b        # shapes: llama-1b llama-8b qwen2.5-7b gemma3n-e4b
#
# Per shape: make_model.py (bf16 random init on the GPU, under $SCRATCH), then each of $PEERS in
# its own process with its own timeout; a peer that fails or times out is recorded (its JSON says
# why) and the race goes on. Results: $OUT/<shape>/<peer>.json and .log, $OUT/summary.json,
# $OUT/table.md. The whole call keeps within $BUDGET_S (a device call may last 600 s): a step that
# no longer fits is skipped and says so.
#
# Needs: .device/tuner (stripped release binary), the peers' wheels installed by install.sh into
# .device/pysite (race.sh runs install.sh itself when .device/wheels is there but not installed).
#
# Peers: tuner (the defaults), tuner-ref (cuda_kernels = false), tuner-offload (offload_activations = "on"),
#   tuner-keep (offload_activations = "off": the layer inputs kept on the GPU), hf, unsloth.
# Env (defaults): PEERS="tuner hf unsloth"  STEPS=7 (warm-up included)  WARMUP=1  SEQ=2048  BATCH=2
#   OUT=${OUT:-/tmp/bench-out}  SCRATCH=/tmp/bench  BUDGET_S=570  KEEP_MODELS=0 (1 keeps them for a later call)
#   T_MODEL=300 T_TUNER=420 T_HF=420 T_UNSLOTH=540 (per-step timeouts, cut to what the budget has left)
#   TUNER_BIN=.device/tuner  PYTHON=python3  BENCH_SITE=.device/pysite
#   DEVICE=cuda  TINY=0 (DEVICE=cpu TINY=1 runs the whole race on toy models, for testing without a GPU)
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$ROOT/scripts/bench
START=$(date +%s)
PEERS=${PEERS:-"tuner hf unsloth"}
STEPS=${STEPS:-7} WARMUP=${WARMUP:-1} SEQ=${SEQ:-2048} BATCH=${BATCH:-2}
OUT=$(realpath -m "${OUT:-/tmp/bench-out}")
SCRATCH=$(realpath -m "${SCRATCH:-/tmp/bench}")
BUDGET_S=${BUDGET_S:-570}
KEEP_MODELS=${KEEP_MODELS:-0}
T_MODEL=${T_MODEL:-300} T_TUNER=${T_TUNER:-420} T_HF=${T_HF:-420} T_UNSLOTH=${T_UNSLOTH:-540}
PY=${PYTHON:-python3}
TUNER_BIN=${TUNER_BIN:-$ROOT/.device/tuner}
SITE=$(realpath -m "${BENCH_SITE:-$ROOT/.device/pysite}")
DEVICE=${DEVICE:-cuda}
TINY=${TINY:-0}
[ $# -ge 1 ] || { sed -n 2,8p "$0"; exit 2; }
case $TUNER_BIN in /*) ;; *) TUNER_BIN=$ROOT/$TUNER_BIN ;; esac
for shape in "$@"; do
  case $shape in llama-1b|llama-8b|qwen2.5-7b|gemma3n-e4b|*-bnb4) ;; *) echo "race: unknown shape $shape (llama-1b llama-8b qwen2.5-7b gemma3n-e4b, or one of them + -bnb4: saved pre-quantized)" >&2; exit 2 ;; esac
done

RACE_TAG=race
# shellcheck source=race_lib.sh
. "$HERE/race_lib.sh"   # left, say, limit, skip, bench_env, show_machine, peer_site, show_tuner, model_time, make_model, peer_time
bench_env

# record() JSON PEER SHAPE RC LOG LIMIT: make sure JSON says what happened (a peer killed by the
# timeout writes nothing; a tuner run is summarized from its metrics even when cut short).
record() {
  "$PY" - "$HERE" "$@" <<'PY'
import json, os, sys
sys.path.insert(0, sys.argv[1])
from bench_common import log_tail, note_exit
path, peer, shape, rc, log, lim = sys.argv[2:8]
rc = int(rc)
r = {}
if os.path.exists(path):
    try:
        r = json.load(open(path))
    except Exception:
        r = {}
note_exit(r, rc, lim, log_tail(log))
r.setdefault("peer", peer)
r["shape_name"] = shape
r["exit_code"] = rc
json.dump(r, open(path, "w"), indent=1)
PY
}

say "shapes: $*; peers: $PEERS; steps $STEPS (warm-up $WARMUP), seq $SEQ, batch $BATCH, device $DEVICE; out $OUT"
show_machine
peer_site $PEERS
[[ " $PEERS " == *" tuner "* ]] && show_tuner

for shape in "$@"; do
  D=$OUT/$shape
  mkdir -p "$D"
  W=$SCRATCH/work-$shape
  rm -rf "$W"
  mkdir -p "$W"
  M=$SCRATCH/models/$shape
  [ "$TINY" = 1 ] && M=$M-tiny
  # -- the model
  model_time "$shape" "$D" $PEERS || continue
  lim=$(limit "$T_MODEL")
  say "$shape: making the model in $M"
  make_model "$shape" "$M" "$D" "$lim" $PEERS || continue
  for p in $PEERS; do
    J=$D/$p.json L=$D/$p.log
    rm -f "$J"
    case $p in
      tuner|tuner-ref|tuner-offload|tuner-keep) lim=$(limit "$T_TUNER") ;;
      hf) lim=$(limit "$T_HF") ;;
      unsloth) lim=$(limit "$T_UNSLOTH") ;;
      *) skip "$J" "$p" "$shape" "unknown peer $p"; continue ;;
    esac
    peer_time "$J" "$p" "$shape" || continue
    say "$shape: $p (limit ${lim}s)"
    case $p in
      tuner|tuner-ref|tuner-offload|tuner-keep)
        # tuner-ref: the same run on the reference path (no CUDA kernels, autograd backward);
        # tuner-offload / tuner-keep: with the checkpointed layer inputs in pinned host memory / on the GPU.
        set_ref=()
        [ "$p" = tuner-ref ] && set_ref=(--set train.cuda_kernels=false)
        [ "$p" = tuner-offload ] && set_ref=(--set train.offload_activations=on)
        [ "$p" = tuner-keep ] && set_ref=(--set train.offload_activations=off)
        if [ ! -x "$TUNER_BIN" ]; then skip "$J" "$p" "$shape" "no tuner binary at $TUNER_BIN"; continue; fi
        "$PY" "$HERE/tuner_recipe.py" "$shape" "$M" "$W/$p" --steps "$STEPS" --seq "$SEQ" --batch "$BATCH" --device "$DEVICE" > "$L" 2>&1
        (cd "$W" && LD_LIBRARY_PATH=$TL timeout -k 10 "$lim" "$TUNER_BIN" run "$W/$p/recipe.toml" "${set_ref[@]}" --run-dir "$W/$p/run" --until train) >> "$L" 2>&1
        rc=$?
        "$PY" "$HERE/summarize_tuner.py" "$W/$p/run" "$L" --out "$J" --warmup "$WARMUP" --model-dir "$M" >> "$L" 2>&1
        ;;
      hf)
        (cd "$W" && timeout -k 10 "$lim" "$PY" "$HERE/peer_hf.py" "$M" --out "$J" --steps "$STEPS" --warmup "$WARMUP" \
          --seq "$SEQ" --batch "$BATCH" --device "$DEVICE") > "$L" 2>&1
        rc=$?
        ;;
      unsloth)
        (cd "$W" && timeout -k 10 "$lim" "$PY" "$HERE/peer_unsloth.py" "$M" --out "$J" --steps "$STEPS" --warmup "$WARMUP" \
          --seq "$SEQ" --batch "$BATCH" --device "$DEVICE" --workdir "$W/unsloth") > "$L" 2>&1
        rc=$?
        ;;
    esac
    record "$J" "$p" "$shape" "$rc" "$L" "$lim"
    grep -h "^$p: [0-9,]* tok/s" "$L" | tail -1 || true
    [ $rc = 0 ] || say "$shape: $p failed (rc $rc): $(tail -2 "$L" | tr '\n' ' ' | cut -c1-300)"
  done
  [ "$KEEP_MODELS" = 1 ] || rm -rf "$M"
done

say "done"
echo
"$PY" "$HERE/report.py" "$OUT" --json "$OUT/summary.json" | tee "$OUT/table.md"
