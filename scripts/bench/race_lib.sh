# Shared shell pieces of the two races, sourced (not run) by scripts/bench/race.sh and
# scripts/bench/guide_race.sh: the clock and budget helpers, the environment every peer runs in,
# the banner, the peers' wheel install, a peer recorded as skipped, and making the model.
#
#   . "$HERE/race_lib.sh"     # after the script has read its env knobs
#
# Plain functions only; nothing runs on sourcing. They read the caller's variables:
#   RACE_TAG (the log prefix: race, guide)  START (date +%s at launch)  BUDGET_S
#   ROOT HERE PY OUT SCRATCH SITE TUNER_BIN DEVICE TINY; TL (set by bench_env)

# seconds left of the budget
left() { echo $((BUDGET_S - ($(date +%s) - START))); }
say() { echo "[$RACE_TAG +$(( $(date +%s) - START ))s] $*"; }
# the timeout for a step: its own limit, cut to what the budget has left (minus 10 s to report)
limit() { local l; l=$(( $(left) - 10 )); [ "$l" -lt "$1" ] && echo "$l" || echo "$1"; }

skip() { # JSON PEER SHAPE WHY
  "$PY" -c 'import json,sys; json.dump({"peer":sys.argv[2],"shape_name":sys.argv[3],"ok":False,"error":sys.argv[4]},open(sys.argv[1],"w"))' "$@"
  say "$2 on $3: $4"
}

# bench_env: $OUT and $SCRATCH made, the offline environment every peer runs in exported, and TL
# set to torch's lib folder (LD_LIBRARY_PATH for tuner)
bench_env() {
  mkdir -p "$OUT" "$SCRATCH"
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 NCCL_NVLS_ENABLE=0
  export TOKENIZERS_PARALLELISM=false HF_HOME=${HF_HOME:-$SCRATCH/hf-home} PYTHONUNBUFFERED=1
  TL=$("$PY" -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
}

# show_machine: the GPU and the Python stack
show_machine() {
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader 2>/dev/null || say "no nvidia-smi"
  "$PY" -c 'import torch,transformers,peft;print("torch",torch.__version__,"cuda",torch.version.cuda,"| transformers",transformers.__version__,"| peft",peft.__version__)'
}

# peer_site PEER...: when hf or unsloth is among them and $SITE has no stamp, install.sh from
# .device/wheels (log in $OUT/install.log); then $SITE goes on PYTHONPATH
peer_site() {
  local p need_site=0
  for p in "$@"; do [ "$p" = hf ] || [ "$p" = unsloth ] && need_site=1; done
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
}

# show_tuner: tuner's version line, or that there is no binary
show_tuner() {
  if [ -x "$TUNER_BIN" ]; then
    LD_LIBRARY_PATH=$TL "$TUNER_BIN" --version 2>&1 | head -1
  else
    say "no tuner binary at $TUNER_BIN"
  fi
}

# model_time SHAPE SHAPE_DIR PEER...: 0 when the budget still has room to make the model, else
# every peer is recorded as skipped (SHAPE_DIR/PEER.json) and 1
model_time() {
  local shape=$1 d=$2 p
  shift 2
  [ $(( $(left) - 10 )) -lt 20 ] || return 0
  for p in "$@"; do skip "$d/$p.json" "$p" "$shape" "skipped: out of time budget before making the model"; done
  return 1
}

# make_model SHAPE MODEL_DIR SHAPE_DIR LIMIT PEER...: make_model.py (toy size with TINY=1) under
# its timeout, log in SHAPE_DIR/make_model.log; on failure every peer is recorded as failed and 1
make_model() {
  local shape=$1 m=$2 d=$3 lim=$4 p rc tiny=()
  shift 4
  [ "$TINY" = 1 ] && tiny=(--tiny)
  timeout -k 10 "$lim" "$PY" "$HERE/make_model.py" "$shape" "$m" "${tiny[@]}" --device "$DEVICE" --init "${MODEL_INIT:-make_model}" > "$d/make_model.log" 2>&1
  rc=$?
  grep -h "make_model:" "$d/make_model.log"
  [ $rc != 0 ] || return 0
  say "$shape: make_model failed (rc $rc): $(tail -3 "$d/make_model.log" | tr '\n' ' ')"
  for p in "$@"; do skip "$d/$p.json" "$p" "$shape" "make_model failed (rc $rc): $(tail -1 "$d/make_model.log")"; done
  return 1
}

# peer_time JSON PEER SHAPE: 0 when the budget has room for a peer (30 s besides the 10 s to
# report), else the peer is recorded as skipped and 1
peer_time() {
  [ $(( $(left) - 10 )) -lt 30 ] || return 0
  skip "$1" "$2" "$3" "skipped: out of time budget ($(left)s left)"
  return 1
}
