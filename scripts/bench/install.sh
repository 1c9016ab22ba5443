#!/usr/bin/env bash
# Install the peers' wheels (fetched by fetch_wheels.sh into .device/wheels) on the GPU machine,
# into a git-ignored folder that later device calls find again (while the machine stays warm):
#
#   bash scripts/bench/install.sh          # -> .device/pysite; use with PYTHONPATH=.device/pysite
#
# Idempotent: a stamp of the wheel set skips a second install. Core wheels are always installed;
# each wheel under extras/ only when the GPU python cannot already import its module at the
# minimum version listed in extras/modules.txt (so a working copy that the image has is never shadowed). No network: pip runs with --no-index --no-deps (or, if
# that python has no pip, the wheels are unpacked directly: they are plain zips).
# Env: PYTHON (python3), BENCH_WHEELS (.device/wheels), BENCH_SITE (.device/pysite), FORCE=1.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PY=${PYTHON:-python3}
WHEELS=$(realpath -m "${BENCH_WHEELS:-$ROOT/.device/wheels}")
SITE=$(realpath -m "${BENCH_SITE:-$ROOT/.device/pysite}")
# Work from a scratch folder: the repo's datasets/ and kernels/ folders would otherwise shadow
# the `datasets` and `kernels` packages for `python -c`.
cd "$(mktemp -d)"

check() {
  echo "== import check (PYTHONPATH=$SITE)"
  PYTHONPATH=$SITE "$PY" - <<'PY' || true
import importlib, importlib.util, os
for m in ["bitsandbytes", "trl", "datasets", "pyarrow", "pandas", "torchao", "unsloth_zoo", "gguf"]:
    if importlib.util.find_spec(m) is None:
        print(f"  {m:14s} MISSING")
        continue
    try:
        mod = importlib.import_module(m) if m != "unsloth_zoo" else None
        v = getattr(mod, "__version__", "") if mod else ""
        print(f"  {m:14s} found {v} ({os.path.dirname(importlib.util.find_spec(m).origin)})")
    except Exception as e:
        print(f"  {m:14s} FAILED: {type(e).__name__}: {e}")
PY
  # unsloth must be imported first in its own process (it patches transformers on import).
  if PYTHONPATH=$SITE HF_HUB_OFFLINE=1 UNSLOTH_DISABLE_STATISTICS=1 timeout 600 "$PY" -c \
      "import unsloth; from unsloth import FastLanguageModel, FastModel; print('  unsloth        OK', unsloth.__version__)" \
      > "$SITE.unsloth-check.log" 2>&1; then
    grep "unsloth        OK" "$SITE.unsloth-check.log"
  else
    echo "  unsloth        FAILED (last lines of $SITE.unsloth-check.log):"
    tail -5 "$SITE.unsloth-check.log" | sed 's/^/    /'
  fi
}

[ -d "$WHEELS" ] || { echo "install: no wheels at $WHEELS; run scripts/bench/fetch_wheels.sh on the dev machine and carry .device/wheels" >&2; exit 1; }
stamp=$( (cd "$WHEELS" && find . -name '*.whl' -printf '%p %s\n' | sort; "$PY" -c 'import sys;print(sys.version)') | sha256sum | cut -c1-16)
if [ "${FORCE:-0}" != 1 ] && [ -f "$SITE/.bench-stamp" ] && [ "$(cat "$SITE/.bench-stamp")" = "$stamp" ]; then
  echo "install: $SITE is up to date ($stamp)"
  check
  exit 0
fi

wheels=("$WHEELS"/*.whl)
if [ -f "$WHEELS/extras/modules.txt" ]; then
  while read -r w mod minv; do
    [ -n "$w" ] || continue
    # "ok VERSION" when the GPU python imports $mod at >= minv, else why not
    have=$(PYTHONPATH='' "$PY" - "$mod" "${minv:-0}" 2>/dev/null <<'PY' || echo "not importable"
import importlib, sys
from packaging.version import Version
m = importlib.import_module(sys.argv[1])
v = getattr(m, "__version__", None) or getattr(m, "VERSION", None) or "0"
if not isinstance(v, str):
    v = ".".join(map(str, v))
print(("ok " if Version(v) >= Version(sys.argv[2]) else "too old: ") + v)
PY
)
    case $have in
      ok*) echo "install: the image has $mod ${have#ok }; not installing $w" ;;
      *) echo "install: $mod: $have; installing $w"; wheels+=("$WHEELS/extras/$w") ;;
    esac
  done < "$WHEELS/extras/modules.txt"
fi

rm -rf "$SITE.tmp"
mkdir -p "$SITE.tmp"
echo "install: ${#wheels[@]} wheels -> $SITE"
if "$PY" -m pip --version >/dev/null 2>&1; then
  "$PY" -m pip install --quiet --no-deps --no-index --no-warn-script-location --disable-pip-version-check \
    --target "$SITE.tmp" "${wheels[@]}"
else
  echo "install: $PY has no pip; unpacking the wheels directly"
  "$PY" - "$SITE.tmp" "${wheels[@]}" <<'PY'
import sys, zipfile, os, shutil
target = sys.argv[1]
for w in sys.argv[2:]:
    with zipfile.ZipFile(w) as z:
        for n in z.namelist():
            parts = n.split("/")
            # <dist>.data/{purelib,platlib}/x -> x; other .data kinds (scripts, headers) are skipped
            if parts[0].endswith(".data"):
                if len(parts) > 2 and parts[1] in ("purelib", "platlib"):
                    dest = os.path.join(target, *parts[2:])
                else:
                    continue
            else:
                dest = os.path.join(target, *parts)
            if n.endswith("/"):
                continue
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with z.open(n) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
            mode = (z.getinfo(n).external_attr >> 16) & 0o777
            if mode:
                os.chmod(dest, mode)
    print("  unpacked", os.path.basename(w))
PY
fi
echo "$stamp" > "$SITE.tmp/.bench-stamp"
rm -rf "$SITE"
mv "$SITE.tmp" "$SITE"
check
