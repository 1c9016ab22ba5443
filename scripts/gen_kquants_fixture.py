#!/usr/bin/env python3
"""Write tests/fixtures/kquants/kquants.gguf: rows of f32 quantized by llama.cpp's own C code.

    /root/.cache/tuner/venv/bin/python scripts/gen_kquants_fixture.py          # rewrite the fixture
    /root/.cache/tuner/venv/bin/python scripts/gen_kquants_fixture.py --check  # regenerate, fail on any byte change

The C code is llama.cpp as vendored in the PyPI sdist llama-cpp-python==0.3.36 (llama.cpp
0.5.0-dev, ggml 0.25.3), fetched with `pip download --no-binary llama-cpp-python` (76 MB,
cached under $TUNER_HOME/kquants/; nothing is installed). Its ggml/src/ggml-quants.c is compiled
as ggml builds it into ggml-base (`cc -O3 -DNDEBUG -std=gnu11`, no -march, so no fused
multiply-add on x86-64) together with a small harness that calls quantize_row_q4_K_ref,
quantize_row_q6_K_ref, quantize_row_q5_0_ref and quantize_row_q8_0_ref: what llama-quantize
runs for those types without an importance matrix. The reverse direction is gguf-py's
`gguf.quants.dequantize` (gguf==0.17.1, numpy==2.3.5).

The GGUF holds (written with gguf-py's GGUFWriter):
- `input`: F32 [ROWS, 256], deterministic pseudo-random rows (a fixed xorshift32, no numpy RNG)
  and edge cases: all zero, constant, negative only, large outliers, sub-blocks of very
  different magnitude (6-bit scales with high bits), one zero sub-block, tiny values
  (subnormal f16 scales), values near the f16 range, ties;
- `q4_k`, `q6_k`, `q5_0`, `q8_0`: those rows quantized by the C code (raw ggml blocks);
- `q4_k.dequant`, ...: gguf-py's dequantization of those blocks, F32 [ROWS, 256].
"""

import argparse
import hashlib
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"
PINS = {"gguf": "0.17.1", "numpy": "2.3.5"}
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests/fixtures/kquants/kquants.gguf"
N = 256

HARNESS = r"""
// Reads n f32 from stdin, writes quantize_row_<type>_ref's blocks to stdout.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "ggml-common.h"
#include "ggml-quants.h"
// Symbols ggml-quants.c references outside the reference functions (never called here).
void ggml_abort(const char * file, int line, const char * fmt, ...) { (void)fmt; fprintf(stderr, "abort %s:%d\n", file, line); abort(); }
size_t ggml_row_size(enum ggml_type type, int64_t ne) { (void)type; (void)ne; abort(); }
const char * ggml_type_name(enum ggml_type type) { (void)type; return "?"; }
size_t ggml_type_size(enum ggml_type type) { (void)type; abort(); }
int main(int argc, char ** argv) {
    if (argc != 3) return 2;
    int64_t n = atoll(argv[2]);
    float * x = malloc(n * sizeof(float));
    if (fread(x, sizeof(float), n, stdin) != (size_t)n) return 3;
    void * y = malloc(n * 2); size_t bytes;
    if (!strcmp(argv[1], "q4_k")) { quantize_row_q4_K_ref(x, y, n); bytes = n / QK_K * sizeof(block_q4_K); }
    else if (!strcmp(argv[1], "q6_k")) { quantize_row_q6_K_ref(x, y, n); bytes = n / QK_K * sizeof(block_q6_K); }
    else if (!strcmp(argv[1], "q5_0")) { quantize_row_q5_0_ref(x, y, n); bytes = n / QK5_0 * sizeof(block_q5_0); }
    else if (!strcmp(argv[1], "q8_0")) { quantize_row_q8_0_ref(x, y, n); bytes = n / QK8_0 * sizeof(block_q8_0); }
    else return 4;
    fwrite(y, 1, bytes, stdout);
    return 0;
}
"""


class XorShift:
    """xorshift32, so the inputs do not depend on numpy's generators."""

    def __init__(self, seed):
        self.s = seed & 0xFFFFFFFF or 1

    def u32(self):
        s = self.s
        s ^= (s << 13) & 0xFFFFFFFF
        s ^= s >> 17
        s ^= (s << 5) & 0xFFFFFFFF
        self.s = s
        return s

    def uniform(self, lo, hi):
        return lo + (hi - lo) * (self.u32() / 2**32)

    def normal(self):
        # Irwin-Hall: sum of 12 uniforms minus 6.
        return sum(self.u32() / 2**32 for _ in range(12)) - 6.0


def rows():
    r = XorShift(20261202)
    out = []
    out.append(("normal", [r.normal() for _ in range(N)]))
    out.append(("zero", [0.0] * N))
    out.append(("constant", [0.37] * N))
    out.append(("constant_negative", [-2.5] * N))
    out.append(("negative_only", [-r.uniform(0.1, 3.0) for _ in range(N)]))
    out.append(("positive_only", [r.uniform(0.5, 1.5) for _ in range(N)]))
    outl = [0.01 * r.normal() for _ in range(N)]
    for i, v in [(3, 1000.0), (77, -800.0), (200, 250.0)]:
        outl[i] = v
    out.append(("outliers", outl))
    out.append(("magnitudes", [r.normal() * 10.0 ** ((i // 32) - 4) for i in range(N)]))
    one_zero = [r.normal() for _ in range(N)]
    one_zero[64:96] = [0.0] * 32
    one_zero[160:176] = [0.0] * 16
    out.append(("zero_subblock", one_zero))
    out.append(("tiny", [r.normal() * 1e-6 for _ in range(N)]))
    out.append(("near_f16_max", [r.uniform(-60000.0, 60000.0) for _ in range(N)]))
    out.append(("ties", [(i % 17 - 8) * 0.5 for i in range(N)]))
    out.append(("weights_like", [r.normal() * 0.02 for _ in range(N)]))
    # Every value as the f32 the C code reads.
    return [(name, [struct.unpack("<f", struct.pack("<f", v))[0] for v in vals]) for name, vals in out]


def check_pins():
    import gguf  # noqa: F401
    import numpy
    from importlib.metadata import version

    got = {"gguf": version("gguf"), "numpy": numpy.__version__}
    if got != PINS:
        sys.exit(f"need {PINS}, have {got}: pip install " + " ".join(f"{k}=={v}" for k, v in PINS.items()))


def sdist(cache):
    name = f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    path = cache / name
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-deps",
             "--no-binary", "llama-cpp-python", "-d", str(cache), f"llama-cpp-python=={LLAMA_CPP_PYTHON}"],
            check=True,
        )
    return path


def build_harness(tar_path, work):
    prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON}/vendor/llama.cpp/"
    with tarfile.open(tar_path) as t:
        members = [m for m in t.getmembers() if m.name.startswith(prefix + "ggml/") and m.isfile()]
        t.extractall(work, members=members, filter="data")
    ggml = work / prefix / "ggml"
    (work / "harness.c").write_text(HARNESS)
    exe = work / "harness"
    cc = os.environ.get("CC", "cc")
    subprocess.run(
        [cc, "-O3", "-DNDEBUG", "-std=gnu11", "-I", str(ggml / "include"), "-I", str(ggml / "src"),
         str(work / "harness.c"), str(ggml / "src/ggml-quants.c"), "-lm", "-o", str(exe)],
        check=True,
    )
    return exe


def quantize(exe, values, ty):
    data = struct.pack(f"<{len(values)}f", *values)
    return subprocess.run([str(exe), ty, str(len(values))], input=data, capture_output=True, check=True).stdout


def write(out_path, cache):
    import gguf
    import numpy as np
    from gguf.quants import dequantize

    named = rows()
    flat = [v for _, vals in named for v in vals]
    inputs = np.array(flat, dtype=np.float32).reshape(len(named), N)
    with tempfile.TemporaryDirectory() as d:
        exe = build_harness(sdist(cache), Path(d))
        blocks = {ty: quantize(exe, flat, ty) for ty in ["q4_k", "q6_k", "q5_0", "q8_0"]}
    qtypes = {
        "q4_k": gguf.GGMLQuantizationType.Q4_K,
        "q6_k": gguf.GGMLQuantizationType.Q6_K,
        "q5_0": gguf.GGMLQuantizationType.Q5_0,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
    }
    w = gguf.GGUFWriter(str(out_path), "kquants-fixture")
    w.add_string("fixture.source", f"llama-cpp-python=={LLAMA_CPP_PYTHON} sdist, ggml/src/ggml-quants.c, cc -O3 -DNDEBUG")
    w.add_string("fixture.dequantize", f"gguf=={PINS['gguf']} gguf.quants.dequantize, numpy=={PINS['numpy']}")
    w.add_array("fixture.rows", [name for name, _ in named])
    w.add_tensor("input", inputs)
    for ty, qt in qtypes.items():
        raw = np.frombuffer(blocks[ty], dtype=np.uint8).reshape(len(named), -1)
        w.add_tensor(ty, raw, raw_dtype=qt)
    for ty, qt in qtypes.items():
        raw = np.frombuffer(blocks[ty], dtype=np.uint8).reshape(len(named), -1)
        w.add_tensor(f"{ty}.dequant", dequantize(raw, qt).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="regenerate in a temp dir and compare bytes")
    args = ap.parse_args()
    check_pins()
    cache = Path(os.environ.get("TUNER_HOME", Path.home() / ".cache/tuner")) / "kquants"
    if args.check:
        with tempfile.TemporaryDirectory() as d:
            fresh = Path(d) / "kquants.gguf"
            write(fresh, cache)
            a, b = fresh.read_bytes(), OUT.read_bytes()
            if a != b:
                sys.exit(f"{OUT} differs from a fresh run ({hashlib.sha256(b).hexdigest()[:12]} vs "
                         f"{hashlib.sha256(a).hexdigest()[:12]})")
            print(f"{OUT.relative_to(ROOT)}: identical ({len(a)} bytes)")
        return
    OUT.parent.mkdir(parents=True, exist_ok=True)
    tmp = OUT.with_suffix(".gguf.tmp")
    write(tmp, cache)
    os.replace(tmp, OUT)
    print(f"wrote {OUT.relative_to(ROOT)} ({OUT.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
