#!/usr/bin/env bash
# The guide's job as a race (issue 15 §2): the training run of the Unsloth Gemma 3n E4B guide
# (Alpaca rows of varied length, batch 2 × accumulation 4, 60 steps, warm-up 5, lr 2e-4 linear,
# adamw_8bit, weight decay 0.01, seed 42, max_seq_length 2048, no packing, dynamic padding,
# gradient checkpointing, bf16, QLoRA NF4, LoRA r16/alpha 32/dropout 0 on the seven projections)
# by tuner, by HF transformers + peft + bitsandbytes and by Unsloth, on random-init models of real
# shapes, one shape per device call; prints a markdown table last.
#
#   EXPORT=$OUT OUT=/tmp/guide-out bash scripts/bench/guide_race.sh llama-8b      # one call
#   EXPORT=$OUT OUT=/tmp/guide-out bash scripts/bench/guide_race.sh gemma3n-e4b   # the next call
#
# Per shape: make_model.py (bf16 random init on the GPU); guide_job.py (600 alpaca-cleaned-shaped
# rows + the recipe); `tuner run --until tokenize` (the rows every peer trains, as Arrow shards);
# guide_report.py data (what the 60 steps train); then each of $PEERS in its own process with its
# own timeout, timed by this script from launch to exit:
#   tuner    `tuner run RECIPE --from train --until train`: load + quantize, 60 steps, the adapter
#   hf       guide_peer.py hf: imports, load + quantize, 60 steps on tuner's shards, the adapter
#   unsloth  guide_peer.py unsloth: the same with Unsloth's FastLanguageModel / FastModel
#   tuner-x  tuner with --set $TUNER_X_SET too (e.g. "train.coalesce=off"), its own run dir
# and, with NOISE=1, when the time left allows it, tuner-seed2: tuner again with run.seed + 1
# (another LoRA init and data order; its own tokenize, untimed) for the seed-to-seed spread.
# A peer that fails or runs out of time is recorded (its JSON says why, and how many steps it did)
# and the race goes on. Results: $OUT/<shape>/{<peer>.json,<peer>.log,data.json,curves.csv,
# loss.png}, $OUT/summary.json, $OUT/table.md; with EXPORT=DIR also DIR/guide-<shapes>.tgz (all
# of $OUT), DIR/table.md and DIR/loss-<shape>.png (the device returns at most 8 files from $OUT,
# so write the results elsewhere and export these; note EXPORT=$OUT comes before OUT=...).
# The whole call keeps within $BUDGET_S (a device call may last 600 s): each step's timeout is cut
# to what is left, and a step that no longer fits is recorded as skipped.
#
# Needs: .device/tuner (stripped release binary); the peers' wheels installed by install.sh into
# .device/pysite (run here from .device/wheels when not installed yet, inside the budget).
# Env (defaults): PEERS="tuner hf unsloth" (in this order)  NOISE=1  STEPS=60  ROWS=600  SEED=42
#   SEQ=2048 (max_seq_length)  PAD_MULTIPLE=8 (the Python peers' padding)  TIMED_FROM=6 (tok/s after warm-up)
#   OUT=/tmp/guide-out  EXPORT=  SCRATCH=/tmp/guide  BUDGET_S=570  KEEP_MODELS=0
#   T_MODEL=300 T_TOKENIZE=180 T_TUNER=360 T_HF=420 T_UNSLOTH=540 (per-step timeouts, cut to the budget)
#   TUNER_SET="" (extra KEY=VALUE --set for every tuner run)  TUNER_X_SET="" (tuner-x's own)
#   UNSLOTH_GC=true (or unsloth: its offloaded checkpointing)
#   MODEL_INIT=make_model (or hf_default: transformers' own fp32 init cast to bf16, see make_model.py)
#   TUNER_BIN=.device/tuner  PYTHON=python3  BENCH_SITE=.device/pysite
#   DEVICE=cuda  TINY=0 (DEVICE=cpu TINY=1 STEPS=3 runs the whole race on toy models on a CPU)
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$ROOT/scripts/bench
START=$(date +%s)
PEERS=${PEERS:-"tuner hf unsloth"}
NOISE=${NOISE:-1}
STEPS=${STEPS:-60} ROWS=${ROWS:-600} SEED=${SEED:-42} SEQ=${SEQ:-2048}
PAD_MULTIPLE=${PAD_MULTIPLE:-8} TIMED_FROM=${TIMED_FROM:-6}
OUT=$(realpath -m "${OUT:-/tmp/guide-out}")
EXPORT=${EXPORT:-}
SCRATCH=$(realpath -m "${SCRATCH:-/tmp/guide}")
BUDGET_S=${BUDGET_S:-570}
KEEP_MODELS=${KEEP_MODELS:-0}
T_MODEL=${T_MODEL:-300} T_TOKENIZE=${T_TOKENIZE:-180} T_TUNER=${T_TUNER:-360} T_HF=${T_HF:-420} T_UNSLOTH=${T_UNSLOTH:-540}
TUNER_SET=${TUNER_SET:-} TUNER_X_SET=${TUNER_X_SET:-}
UNSLOTH_GC=${UNSLOTH_GC:-true}
PY=${PYTHON:-python3}
TUNER_BIN=${TUNER_BIN:-$ROOT/.device/tuner}
SITE=$(realpath -m "${BENCH_SITE:-$ROOT/.device/pysite}")
DEVICE=${DEVICE:-cuda}
TINY=${TINY:-0}
[ $# -ge 1 ] || { sed -n 2,12p "$0"; exit 2; }
case $TUNER_BIN in /*) ;; *) TUNER_BIN=$ROOT/$TUNER_BIN ;; esac
for shape in "$@"; do
  case $shape in llama-1b|llama-8b|qwen2.5-7b|gemma3n-e4b) ;; *) echo "guide_race: unknown shape $shape (llama-1b llama-8b qwen2.5-7b gemma3n-e4b)" >&2; exit 2 ;; esac
done
for p in $PEERS; do
  case $p in tuner|tuner-x|hf|unsloth) ;; *) echo "guide_race: unknown peer $p (tuner tuner-x hf unsloth; tuner-seed2 comes with NOISE=1)" >&2; exit 2 ;; esac
done

RACE_TAG=guide
# shellcheck source=race_lib.sh
. "$HERE/race_lib.sh"   # left, say, limit, skip, bench_env, show_machine, peer_site, show_tuner, model_time, make_model, peer_time
bench_env

now() { date +%s.%N; }
sets() { local kv; for kv in "$@"; do printf -- '--set\n%s\n' "$kv"; done; }
TSETS=()
[ -n "$TUNER_SET" ] && mapfile -t TSETS < <(sets $TUNER_SET)

say "shapes: $*; peers: $PEERS (noise run: $NOISE); $STEPS steps, $ROWS rows, seed $SEED, max_seq_length $SEQ, device $DEVICE; out $OUT"
show_machine
peer_site $PEERS
show_tuner

# run_tuner PEER RUN_DIR JSON LOG LIMIT [KEY=VALUE...]: the timed `--from train --until train`
run_tuner() {
  local p=$1 rd=$2 j=$3 l=$4 lim=$5 t0 t1 rc
  shift 5
  local xs=("${TSETS[@]}")
  [ $# -gt 0 ] && mapfile -t -O "${#xs[@]}" xs < <(sets "$@")
  t0=$(now)
  (cd "$W" && LD_LIBRARY_PATH=$TL timeout -k 10 "$lim" "$TUNER_BIN" run "$JOB/recipe.toml" --run-dir "$rd" \
     --from train --until train "${xs[@]}") >> "$l" 2>&1
  rc=$?
  t1=$(now)
  "$PY" "$HERE/guide_report.py" tuner "$rd" "$l" --out "$j" --peer "$p" >> "$l" 2>&1
  "$PY" "$HERE/guide_report.py" stamp "$j" --peer "$p" --shape "$shape" --rc $rc --log "$l" --limit "$lim" --t-launch "$t0" --t-exit "$t1"
  return $rc
}

# tokenize_into RUN_DIR LOG LIMIT [KEY=VALUE...]: fetch + tokenize (untimed); a copied hash cache
# spares a second run dir hashing the model again
tokenize_into() {
  local rd=$1 l=$2 lim=$3
  shift 3
  local xs=("${TSETS[@]}")
  [ $# -gt 0 ] && mapfile -t -O "${#xs[@]}" xs < <(sets "$@")
  mkdir -p "$rd"
  [ -f "$W/tuner/.hashes.json" ] && [ "$rd" != "$W/tuner" ] && cp "$W/tuner/.hashes.json" "$rd/"
  (cd "$W" && LD_LIBRARY_PATH=$TL timeout -k 10 "$lim" "$TUNER_BIN" run "$JOB/recipe.toml" --run-dir "$rd" \
     --until tokenize "${xs[@]}") >> "$l" 2>&1
}

for shape in "$@"; do
  D=$OUT/$shape
  rm -rf "$D"
  mkdir -p "$D"
  W=$SCRATCH/work-$shape
  rm -rf "$W"
  mkdir -p "$W"
  JOB=$W/job
  M=$SCRATCH/models/$shape
  [ "$TINY" = 1 ] && M=$M-tiny
  all=$PEERS
  [ "$NOISE" = 1 ] && all="$all tuner-seed2"
  # -- the model
  model_time "$shape" "$D" $all || continue
  lim=$(limit "$T_MODEL")
  say "$shape: making the model in $M (limit ${lim}s)"
  make_model "$shape" "$M" "$D" "$lim" $all || continue
  # -- the rows and the recipe, then tuner's tokenize: the shards every peer reads
  "$PY" "$HERE/guide_job.py" "$shape" "$M" "$JOB" --rows "$ROWS" --seed "$SEED" --steps "$STEPS" --seq "$SEQ" \
    --device "$DEVICE" > "$D/job.log" 2>&1 || { say "$shape: guide_job.py failed: $(tail -2 "$D/job.log" | tr '\n' ' ')"; }
  cat "$D/job.log"
  cp "$JOB/recipe.toml" "$JOB/rows.json" "$D/" 2>/dev/null
  why=
  if [ ! -f "$JOB/recipe.toml" ]; then why="no recipe (guide_job.py failed)"
  elif [ ! -x "$TUNER_BIN" ]; then why="no tuner binary at $TUNER_BIN: no tokenized rows for any peer"
  else
    lim=$(limit "$T_TOKENIZE")
    t0=$(date +%s)
    say "$shape: tuner fetch + tokenize (limit ${lim}s, untimed)"
    tokenize_into "$W/tuner" "$D/tokenize.log" "$lim"
    grep -h "^tokenize: \|done in" "$D/tokenize.log" | tail -3
    if [ -f "$W/tuner/tokenize/shards.json" ]; then
      "$PY" "$HERE/guide_report.py" data "$W/tuner" --out "$D/data.json" --steps "$STEPS" --pad-multiple "$PAD_MULTIPLE"
      say "$shape: rows tokenized in $(( $(date +%s) - t0 ))s"
    else
      why="tuner's tokenize failed: $(tail -2 "$D/tokenize.log" | tr '\n' ' ' | cut -c1-300)"
    fi
  fi
  if [ -n "$why" ]; then
    for p in $all; do skip "$D/$p.json" "$p" "$shape" "$why"; done
    [ "$KEEP_MODELS" = 1 ] || rm -rf "$M"
    continue
  fi
  # -- the peers
  tuner_wall=
  for p in $all; do
    J=$D/$p.json L=$D/$p.log
    rm -f "$J" "$J.steps.jsonl"
    case $p in
      tuner|tuner-x|tuner-seed2) lim=$(limit "$T_TUNER") ;;
      hf) lim=$(limit "$T_HF") ;;
      unsloth) lim=$(limit "$T_UNSLOTH") ;;
    esac
    if [ "$p" = tuner-seed2 ]; then
      # only when a second tuner run fits: tuner's wall time + 30 s for its tokenize and the report
      if [ -z "$tuner_wall" ]; then
        skip "$J" "$p" "$shape" "skipped: no completed tuner run in this call to compare with"
        continue
      fi
      need=$(( tuner_wall + 30 ))
      if [ $(( $(left) - 10 )) -lt "$need" ]; then
        skip "$J" "$p" "$shape" "skipped: ${need}s needed for a second tuner run, $(( $(left) - 10 ))s left"
        continue
      fi
    elif ! peer_time "$J" "$p" "$shape"; then
      continue
    fi
    say "$shape: $p (limit ${lim}s)"
    case $p in
      tuner)
        run_tuner tuner "$W/tuner" "$J" "$L" "$lim"
        rc=$?
        tuner_wall=$("$PY" -c 'import json,sys; r=json.load(open(sys.argv[1])); print(int(r["wall_s"]) if r.get("ok") else "")' "$J" 2>/dev/null)
        ;;
      tuner-x|tuner-seed2)
        extra=()
        [ "$p" = tuner-x ] && extra=($TUNER_X_SET)
        [ "$p" = tuner-seed2 ] && extra=("run.seed=$((SEED + 1))")
        tokenize_into "$W/$p" "$L" "$(limit 120)" "${extra[@]}"
        lim=$(limit "$T_TUNER")
        run_tuner "$p" "$W/$p" "$J" "$L" "$lim" "${extra[@]}"
        rc=$?
        ;;
      hf|unsloth)
        t0=$(now)
        timeout -k 10 "$lim" "$PY" "$HERE/guide_peer.py" "$p" "$M" --run-dir "$W/tuner" --out "$J" \
          --adapter-dir "$W/$p-adapter" --device "$DEVICE" --t-launch "$t0" --pad-multiple "$PAD_MULTIPLE" \
          --steps "$STEPS" --unsloth-gc "$UNSLOTH_GC" --workdir "$W/$p-work" > "$L" 2>&1
        rc=$?
        t1=$(now)
        "$PY" "$HERE/guide_report.py" stamp "$J" --peer "$p" --shape "$shape" --rc $rc --log "$L" --limit "$lim" \
          --t-launch "$t0" --t-exit "$t1"
        ;;
    esac
    "$PY" "$HERE/guide_report.py" line "$J"
  done
  [ "$KEEP_MODELS" = 1 ] || rm -rf "$M"
done

say "done"
echo
"$PY" "$HERE/guide_report.py" table "$OUT" --json "$OUT/summary.json" --timed-from "$TIMED_FROM"
if [ -n "$EXPORT" ]; then
  EXPORT=$(realpath -m "$EXPORT")
  if [ "$EXPORT" = "$OUT" ]; then
    say "EXPORT is OUT itself: nothing to bundle"
  else
    mkdir -p "$EXPORT"
    name=guide-$(echo "$*" | tr ' ' '_').tgz
    tar czf "$EXPORT/$name" -C "$OUT" . && cp "$OUT/table.md" "$EXPORT/"
    for shape in "$@"; do [ -f "$OUT/$shape/loss.png" ] && cp "$OUT/$shape/loss.png" "$EXPORT/loss-$shape.png"; done
    say "exported $EXPORT/$name ($(du -h "$EXPORT/$name" | cut -f1)), table.md, loss-<shape>.png"
  fi
fi
