#!/usr/bin/env python3
"""Opt-in check: tuner's GGUF exports run in llama.cpp itself (llama-cpp-python) with the logits
of the merged HF model, and tuner's q4_k_m file equals llama.cpp's own `llama-quantize ... Q4_K_M`.

    pip install llama-cpp-python==0.3.36        # compiles llama.cpp: ~25-40 min on 2 busy cores
    python scripts/llama_cpp_check.py --tuner target/release/tuner [--work DIR] [--json OUT]

Not part of scripts/test or CI: installing llama-cpp-python builds llama.cpp from source, which
does not fit CI's time (see README, "GGUF export"). Needs torch==2.11.0, transformers==5.17.0,
gguf==0.17.1 and llama-cpp-python==0.3.36 importable from this Python.

Two models, each trained for 2 steps by `tuner run` (dense base, LoRA r 4) and exported with
`export.merged_dtype = "fp16"` and `export.gguf = ["f16", "q8_0", "q4_k_m"]`:
- `llama`: tests/fixtures/models/llama (rows of 64 and 96: Q4_K_M falls back to Q5_0/Q8_0);
- `wide`: a random 256-wide Llama made here (8 layers, 4 heads of 64, 2 KV heads, MLP 512, the
  fixture's tokenizer, fp16), so Q4_K and Q6_K apply.
For each GGUF: llama.cpp's logits (CPU, all positions) on the fixture's two token rows against
transformers' on export/merged (fp32, eager); the figure is max|a-b| / max|b| over both rows, as
tuner's tests measure it, and the top-1 agreement. Then llama.cpp quantizes tuner's f16 file to
Q4_K_M (`llama_model_quantize`, ftype 15): since the merged weights are fp16, both quantize the
same values, and every tensor's type and bytes are compared with tuner's q4_k_m file.
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests/fixtures/models/llama"


def recipe(dir_, model):
    text = f"""[run]
name = "t"
output_dir = "runs"
seed = 7

[model]
source = "{model}"

[quantization]
method = "none"

[lora]
r = 4
alpha = 8

[prompt]
template = "{{input}}\\n{{output}}"

[dataset]
source = "{ROOT / 'datasets/requests-json/train.jsonl'}"
eval_ratio = 0.05
max_samples = 64

[train]
max_seq_length = 192
micro_batch_size = 4
gradient_accumulation_steps = 1
max_steps = 2
learning_rate = 3e-3
warmup_steps = 1

[export]
adapter = false
merged = true
merged_dtype = "fp16"
gguf = ["f16", "q8_0", "q4_k_m"]
"""
    p = dir_ / "recipe.toml"
    p.write_text(text)
    return p


def wide_model(dir_):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((FIXTURE / "config.json").read_text())
    cfg.update(hidden_size=256, intermediate_size=512, num_hidden_layers=8, head_dim=64, initializer_range=0.08)
    cfg.pop("torch_dtype", None)
    torch.manual_seed(20261202)
    model = LlamaForCausalLM(LlamaConfig(**cfg)).to(torch.float16)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    dir_.mkdir(parents=True)
    model.save_pretrained(dir_)
    for f in ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]:
        shutil.copy(FIXTURE / f, dir_ / f)
    return dir_


def token_rows():
    from safetensors.torch import load_file

    ids = load_file(str(FIXTURE / "reference.safetensors"))["input_ids"]
    return [row.tolist() for row in ids]


def hf_logits(merged, rows):
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return [m(input_ids=torch.tensor([r])).logits[0].float().numpy() for r in rows]


def llama_cpp_logits(gguf_path, rows):
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf_path), logits_all=True, n_ctx=64, n_threads=2, verbose=False)
    out = []
    for r in rows:
        llm.reset()
        llm.eval(r)
        out.append(np.array(llm.scores[: len(r)], dtype=np.float32))
    del llm
    return out


def compare(a_rows, b_rows):
    import numpy as np

    a, b = np.concatenate(a_rows), np.concatenate(b_rows)
    rel = float(np.abs(a - b).max() / np.abs(b).max())
    top1 = float((a.argmax(-1) == b.argmax(-1)).mean())
    return rel, top1


def llama_quantize(src, dst):
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = 15  # LLAMA_FTYPE_MOSTLY_Q4_K_M
    params.nthread = 1
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc})")


def compare_files(ours, theirs):
    import gguf

    a = {t.name: t for t in gguf.GGUFReader(str(ours)).tensors}
    b = {t.name: t for t in gguf.GGUFReader(str(theirs)).tensors}
    if set(a) != set(b):
        return {"error": f"tensor names differ: {sorted(set(a) ^ set(b))}"}
    same_type = [n for n in a if a[n].tensor_type == b[n].tensor_type]
    same_bytes = [n for n in same_type if bytes(a[n].data.tobytes()) == bytes(b[n].data.tobytes())]
    return {
        "tensors": len(a),
        "same_type": len(same_type),
        "same_bytes": len(same_bytes),
        "differ": sorted(set(a) - set(same_bytes)),
        "types": {n: a[n].tensor_type.name for n in sorted(a)},
        "llama_cpp_types": {n: b[n].tensor_type.name for n in sorted(b) if b[n].tensor_type != a[n].tensor_type},
    }


def check(name, model, tuner, work, rows):
    case = work / name
    case.mkdir(parents=True)
    r = recipe(case, model)
    proc = subprocess.run([str(tuner), "run", str(r)], cwd=case, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"tuner run failed for {name}:\n{proc.stderr[-4000:]}")
    export = case / "runs/t/export"
    want = hf_logits(export / "merged", rows)
    result = {"logits": {}}
    for ty in ["f16", "q8_0", "q4_k_m"]:
        rel, top1 = compare(llama_cpp_logits(export / f"gguf/model-{ty}.gguf", rows), want)
        result["logits"][ty] = {"rel": rel, "top1": top1}
    ref = case / "llama-quantize-q4_k_m.gguf"
    llama_quantize(export / "gguf/model-f16.gguf", ref)
    result["llama_quantize"] = compare_files(export / "gguf/model-q4_k_m.gguf", ref)
    rel, top1 = compare(llama_cpp_logits(ref, rows), want)
    result["logits"]["llama-quantize q4_k_m"] = {"rel": rel, "top1": top1}
    return result


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tuner", required=True, help="the tuner binary")
    ap.add_argument("--work", help="folder for the runs (default: a temp dir, removed)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    import llama_cpp

    tuner = Path(args.tuner).resolve()
    tmp = None if args.work else tempfile.TemporaryDirectory()
    work = Path(args.work or tmp.name).resolve()
    work.mkdir(parents=True, exist_ok=True)
    rows = token_rows()
    results = {"llama_cpp_python": llama_cpp.__version__}
    results["llama"] = check("llama", FIXTURE, tuner, work, rows)
    results["wide"] = check("wide", wide_model(work / "wide-base"), tuner, work, rows)
    for name in ["llama", "wide"]:
        r = results[name]
        for ty, v in r["logits"].items():
            print(f"{name:6} {ty:22} rel logit error {v['rel']:.3e}  top-1 agreement {v['top1']:.3f}")
        q = r["llama_quantize"]
        print(f"{name:6} q4_k_m vs llama-quantize: {q['same_type']}/{q['tensors']} same type, "
              f"{q['same_bytes']}/{q['tensors']} same bytes {q['differ'] or ''}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
