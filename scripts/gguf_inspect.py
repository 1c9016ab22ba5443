#!/usr/bin/env python3
"""Read a GGUF file with gguf-py and say what it holds, for tests/gguf.rs.

Run with /root/.cache/tuner/venv/bin/python (gguf==0.17.1, as pinned in scripts/bootstrap):

  gguf_inspect.py FILE [--hf DIR]

Prints one JSON object: `metadata` (every key/value, arrays in full; non-finite floats as
strings), `tensors` (name, row-major shape, ggml type name, in file order) and, with --hf,
`mapped`: each tensor name of DIR's safetensors mapped by gguf-py's own TensorNameMap for the
file's architecture (null when gguf-py has no name for it), or `mapped: null` when this gguf-py
does not know the architecture (0.17.1 predates gemma3n).
"""

import argparse
import json
import math
import sys

import gguf


def plain(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def mapped_names(arch_name, hf_dir, n_blocks):
    from safetensors import safe_open

    arch = next((a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name), None)
    if arch is None:
        return None
    names = gguf.get_tensor_name_map(arch, n_blocks)
    out = {}
    with safe_open(f"{hf_dir}/model.safetensors", "pt") as f:
        for key in f.keys():
            out[key] = names.get_name(key, try_suffixes=(".weight", ".bias"))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("--hf")
    args = ap.parse_args()
    reader = gguf.GGUFReader(args.file)
    meta = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        meta[name] = plain(field.contents())
    tensors = [
        {"name": t.name, "shape": [int(x) for x in reversed(t.shape)], "type": t.tensor_type.name}
        for t in reader.tensors
    ]
    report = {"metadata": meta, "tensors": tensors}
    if args.hf:
        arch = meta["general.architecture"]
        report["mapped"] = mapped_names(arch, args.hf, int(meta[f"{arch}.block_count"]))
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main()
