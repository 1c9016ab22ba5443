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
# Peers: tuner, tuner-ref (cuda_kernels = false), tuner-offload (offload_activations = "on"), hf, unsloth.
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

mkdir -p "$OUT" "$SCRATCH"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 NCCL_NVLS_ENABLE=0
export TOKENIZERS_PARALLELISM=false HF_HOME=${HF_HOME:-$SCRATCH/hf-home} PYTHONUNBUFFERED=1
TL=$("$PY" -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib

left() { echo $((BUDGET_S - ($(date +%s) - START))); }
say() { echo "[race +$(( $(date +%s) - START ))s] $*"; }
# the timeout for a step: its own limit, cut to what the budget has left (minus 10 s to report)
limit() { local l; l=$(( $(left) - 10 )); [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }

# record() JSON PEER SHAPE RC LOG LIMIT: make sure JSON says what happened (a peer killed by the
# timeout writes nothing; a tuner run is summarized from its metrics even when cut short).
record() {
  "$PY" - "$@" <<'PY'
import json, os, sys
path, peer, shape, rc, log, lim = sys.argv[1:7]
rc = int(rc)
r = {}
if os.path.exists(path):
    try:
        r = json.load(open(path))
    except Exception:
        r = {}
tail = ""
if os.path.exists(log):
    tail = "\n".join(open(log, errors="replace").read().strip().splitlines()[-25:])
msg = None
if rc in (124, 137):
    msg = f"timed out after {lim}s"
elif rc != 0:
    msg = f"exit code {rc}"
if msg:
    if r.get("ok"):
        r["warning"] = (r.get("warning", "") + f" {msg}").strip()
    else:
        r.setdefault("error", msg)
        if msg not in r["error"]:
            r["error"] = f"{msg}: {r['error']}"
        r["ok"] = False
        r.setdefault("log_tail", tail)
r.setdefault("peer", peer)
r["shape_name"] = shape
r["exit_code"] = rc
json.dump(r, open(path, "w"), indent=1)
PY
}

skip() { # JSON PEER SHAPE WHY
  "$PY" -c 'import json,sys; json.dump({"peer":sys.argv[2],"shape_name":sys.argv[3],"ok":False,"error":sys.argv[4]},open(sys.argv[1],"w"))' "$@"
  say "$2 on $3: $4"
}

say "shapes: $*; peers: $PEERS; steps $STEPS (warm-up $WARMUP), seq $SEQ, batch $BATCH, device $DEVICE; out $OUT"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader 2>/dev/null || say "no nvidia-smi"
"$PY" -c 'import torch,transformers,peft;print("torch",torch.__version__,"cuda",torch.version.cuda,"| transformers",transformers.__version__,"| peft",peft.__version__)'

need_site=0
for p in $PEERS; do [ "$p" = hf ] || [ "$p" = unsloth ] && need_site=1; done
if [ $need_site = 1 ] && [ ! -f "$SITE/.bench-stamp" ]; then
  if [ -d "$ROOT/.device/wheels" ]; then
    say "installing the peers' wheels (install.sh)"
    PYTHON=$PY BENCH_SITE=$SITE bash "$HERE/install.sh" > "$OUT/install.log" 2>&1 || say "install.sh failed (see $OUT/install.log)"
    tail -12 "$OUT/install.log"
  else
    say "no $SITE and no .device/wheels: the HF and Unsloth peers will fail (run fetch_wheels.sh here, install.sh there)"
  fi
fi
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
if [[ " $PEERS " == *" tuner "* ]]; then
  if [ -x "$TUNER_BIN" ]; then
    LD_LIBRARY_PATH=$TL "$TUNER_BIN" --version 2>&1 | head -1
  else
    say "no tuner binary at $TUNER_BIN"
  fi
fi

tiny=()
[ "$TINY" = 1 ] && tiny=(--tiny)
for shape in "$@"; do
  D=$OUT/$shape
  mkdir -p "$D"
  W=$SCRATCH/work-$shape
  rm -rf "$W"
  mkdir -p "$W"
  M=$SCRATCH/models/$shape
  [ "$TINY" = 1 ] && M=$M-tiny
  # -- the model
  lim=$(limit "$T_MODEL")
  if [ $(( $(left) - 10 )) -lt 20 ]; then
    for p in $PEERS; do skip "$D/$p.json" "$p" "$shape" "skipped: out of time budget before making the model"; done
    continue
  fi
  say "$shape: making the model in $M"
  timeout -k 10 "$lim" "$PY" "$HERE/make_model.py" "$shape" "$M" "${tiny[@]}" --device "$DEVICE" > "$D/make_model.log" 2>&1
  rc=$?
  grep -h "make_model:" "$D/make_model.log"
  if [ $rc != 0 ]; then
    say "$shape: make_model failed (rc $rc): $(tail -3 "$D/make_model.log" | tr '\n' ' ')"
    for p in $PEERS; do skip "$D/$p.json" "$p" "$shape" "make_model failed (rc $rc): $(tail -1 "$D/make_model.log")"; done
    continue
  fi
  for p in $PEERS; do
    J=$D/$p.json L=$D/$p.log
    rm -f "$J"
    case $p in
      tuner|tuner-ref|tuner-offload) lim=$(limit "$T_TUNER") ;;
      hf) lim=$(limit "$T_HF") ;;
      unsloth) lim=$(limit "$T_UNSLOTH") ;;
      *) skip "$J" "$p" "$shape" "unknown peer $p"; continue ;;
    esac
    if [ $(( $(left) - 10 )) -lt 30 ]; then
      skip "$J" "$p" "$shape" "skipped: out of time budget ($(left)s left)"
      continue
    fi
    say "$shape: $p (limit ${lim}s)"
    case $p in
      tuner|tuner-ref|tuner-offload)
        # tuner-ref: the same run on the reference path (no CUDA kernels, autograd backward);
        # tuner-offload: with the checkpointed layer inputs in pinned host memory.
        set_ref=()
        [ "$p" = tuner-ref ] && set_ref=(--set train.cuda_kernels=false)
        [ "$p" = tuner-offload ] && set_ref=(--set train.offload_activations=on)
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
