#!/usr/bin/env bash
# Download (here, with pip) and trim the wheels the peer benchmarks need on the GPU machine
# (Ubuntu 24.04, python 3.12 in /opt/torch/.venv with torch 2.11.0+cu130, transformers 5.17.0,
# peft 0.21.0 already there, no network). Writes them to .device/wheels/ (git-ignored), which
# travels alone in one device call (scripts/bench/install.sh installs it there).
#
#   scripts/bench/fetch_wheels.sh            # -> .device/wheels/{*.whl, extras/*.whl}
#
# Env: DEST (default .device/wheels), PYVER (3.12; 3.11 gives a set for testing on this machine),
#      EXTRAS=0 (leave out the extras), LIMIT_MIB (56: fail above it; the tree, ~8 MB, travels too).
#
# core/   : what the peers import that the GPU venv lacks for sure (bitsandbytes; Unsloth and its
#           import-time dependencies: unsloth_zoo, trl, datasets, torchao, ...; gguf, pure Python,
#           for transformers' GGUF import in quality.sh).
# extras/ : import-time dependencies of datasets/unsloth_zoo that a plain torch+transformers+peft
#           venv lacks (pyarrow, pandas, xxhash, requests, pillow, ...). install.sh installs each
#           one only where the GPU python cannot already import it (at datasets' minimum
#           version), so a system copy that works is never shadowed.
# Trimmed: unsloth -> unsloth/, unsloth_cli/ (its studio/ web app is 26 MB); bitsandbytes -> only
# the CPU and CUDA 13.0 libraries (torch cu130); pyarrow -> no flight/S3/headers/sources/tests;
# pandas -> no tests; pillow -> no AVIF; torchao -> no top-level test/ package. Large compiled
# wheels are recompressed with LZMA (pip and zipfile read it).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
HERE=$ROOT/scripts/bench
DEST=${DEST:-$ROOT/.device/wheels}
PYVER=${PYVER:-3.12}
EXTRAS=${EXTRAS:-1}
LIMIT_MIB=${LIMIT_MIB:-56}
TUNER_HOME=${TUNER_HOME:-$HOME/.cache/tuner}
PY=${PY:-$TUNER_HOME/venv/bin/python}
[ -x "$PY" ] || PY=python3
CP=cp${PYVER/./}
RAW=${RAW:-$TUNER_HOME/bench-wheels/raw-$CP}

CORE=(
  bitsandbytes==0.50.2
  unsloth==2026.10.9 unsloth_zoo==2026.10.9
  trl==1.15.0 datasets==4.8.5 torchao==0.18.0 cut_cross_entropy==25.1.1
  dill==0.4.1 multiprocess==0.70.19
  tyro==1.0.17 docstring_parser==0.18.0 shtab==1.13.0 typeguard==4.6.1
  msgspec==0.22.0 json5==0.17.3 nest_asyncio==1.6.0 structlog==26.1.0
  gguf==0.17.1
)
# distribution==version  import-name  minimum version (install.sh skips a wheel whose module the
# GPU python already imports at that version or newer; the minimums are datasets 4.8.5's)
EXTRA_LIST=(
  "pyarrow==26.0.1 pyarrow 21.0.0"
  "pandas==3.1.1 pandas 0"
  "xxhash==4.1.0 xxhash 0"
  "requests==2.34.2 requests 2.32.2"
  "urllib3==2.8.0 urllib3 1.26"
  "charset_normalizer==3.5.3 charset_normalizer 2"
  "python_dateutil==4.0.0 dateutil 2.8.2"
  "six==1.17.0 six 0"
  "pillow==13.0.0 PIL 0"
)

download() { # specs...
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version "$PYVER" --implementation cp --abi "$CP" \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d "$RAW" "$@"
}

mkdir -p "$RAW"
echo "== downloading into $RAW (python $PYVER)"
download "${CORE[@]}"
specs=()
for e in "${EXTRA_LIST[@]}"; do specs+=("${e%% *}"); done
[ "$EXTRAS" = 1 ] && download "${specs[@]}"

whl() { # dist==ver -> the downloaded wheel's path (exactly one)
  local name=${1%%==*} ver=${1##*==}
  local norm
  norm=$(echo "$name" | tr 'A-Z-.' 'a-z__')
  local hits=()
  for f in "$RAW"/*.whl; do
    local b
    b=$(basename "$f")
    local bn
    bn=$(echo "${b%%-*}" | tr 'A-Z-.' 'a-z__')
    local bv
    bv=$(echo "$b" | cut -d- -f2)
    [ "$bn" = "$norm" ] && [ "$bv" = "$ver" ] && hits+=("$f")
  done
  [ ${#hits[@]} = 1 ] || { echo "fetch_wheels: expected one wheel for $1 in $RAW, found ${#hits[@]}" >&2; exit 1; }
  echo "${hits[0]}"
}

rm -rf "$DEST.tmp"
mkdir -p "$DEST.tmp/extras"
REPACK="$PY $HERE/repack_wheel.py"
echo "== trimming into $DEST"
for s in "${CORE[@]}"; do
  f=$(whl "$s")
  case ${s%%==*} in
    bitsandbytes)
      $REPACK "$f" "$DEST.tmp" --lzma --drop 'bitsandbytes/libbitsandbytes_cuda1[!3]*' \
        --drop 'bitsandbytes/libbitsandbytes_cuda132*' --drop 'bitsandbytes/libbitsandbytes_rocm*' \
        --drop 'bitsandbytes/libbitsandbytes_xpu*' ;;
    unsloth) $REPACK "$f" "$DEST.tmp" --keep-top unsloth --keep-top unsloth_cli ;;
    torchao) $REPACK "$f" "$DEST.tmp" --lzma --drop 'test/*' ;;
    *) cp "$f" "$DEST.tmp/" ;;
  esac
done
if [ "$EXTRAS" = 1 ]; then
  : > "$DEST.tmp/extras/modules.txt"
  for e in "${EXTRA_LIST[@]}"; do
    read -r s mod minv <<< "$e"
    f=$(whl "$s")
    case ${s%%==*} in
      pyarrow)
        $REPACK "$f" "$DEST.tmp/extras" --lzma --drop 'pyarrow/include/*' --drop 'pyarrow/src/*' \
          --drop 'pyarrow/tests/*' --drop '*flight*' --drop '*_s3*' --drop '*_pyarrow_cpp_tests*' \
          --drop 'pyarrow/libarrow_python.so' --drop 'pyarrow/libarrow_python.so.*.*.*' \
          --drop 'pyarrow/libarrow_python_parquet_encryption.so' \
          --drop 'pyarrow/libarrow_python_parquet_encryption.so.*.*.*' \
          --drop '*.pyx' --drop '*.pxd' --drop '*.pxi' --drop '*.h' ;;
      pandas) $REPACK "$f" "$DEST.tmp/extras" --lzma --drop 'pandas/tests/*' ;;
      pillow) $REPACK "$f" "$DEST.tmp/extras" --lzma --drop 'PIL/_avif*' --drop 'pillow.libs/libavif*' ;;
      *) cp "$f" "$DEST.tmp/extras/" ;;
    esac
    echo "$(basename "$f") $mod $minv" >> "$DEST.tmp/extras/modules.txt"
  done
fi
rm -rf "$DEST"
mv "$DEST.tmp" "$DEST"

echo "== $DEST"
( cd "$DEST" && find . -name '*.whl' -printf '%s %p\n' | sort -rn | awk '{printf "%8.2f MiB  %s\n", $1/1048576, $2}' )
total=$(find "$DEST" -type f -printf '%s\n' | awk '{s+=$1} END {print s}')
awk -v t="$total" -v l="$LIMIT_MIB" 'BEGIN {printf "total %.1f MiB (limit %d MiB; the device call carries .device/wheels alone)\n", t/1048576, l}'
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "fetch_wheels: over the limit; try EXTRAS=0 if the GPU python already has pyarrow/pandas/pillow" >&2
  exit 1
fi
