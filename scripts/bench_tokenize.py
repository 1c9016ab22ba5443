#!/usr/bin/env python3
"""Tokenize throughput: tuner's tokenize stage against HF `datasets.map` with the fast
tokenizer, on the same rows, the same tokenizer and the same machine, in one run.

Both sides do the same work: render the Alpaca prompt, tokenize prompt and response
separately, mask the prompt labels (-100), append EOS, truncate, and write Arrow files.

    scripts/bench_tokenize.py [--rows 48000] [--threads 2] [--repeats 3] [--write docs/benchmarks.md]

Needs scripts/bootstrap to have run (the venv, the SmolLM2 GGUF) and installs the pinned
transformers/datasets into the venv if they are missing.
"""
import argparse, json, os, shutil, statistics, subprocess, sys, tempfile, time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HOME = Path(os.environ.get("TUNER_HOME", Path.home() / ".cache/tuner"))
VENV_PY = HOME / "venv/bin/python"
PINS = ["transformers==5.17.0", "datasets==4.8.5"]

ALPACA_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides further "
                     "context. Write a response that appropriately completes the request.\n\n### Instruction:\n"
                     "{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately completes "
                   "the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")

HF_SIDE = r'''
import sys, time, json
t0 = time.perf_counter()
import datasets
from transformers import PreTrainedTokenizerFast
datasets.disable_progress_bars()
data, tok_dir, out, nproc, max_len = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
W, N = json.loads(sys.argv[6]), json.loads(sys.argv[7])
tok = PreTrainedTokenizerFast(tokenizer_file=tok_dir + "/tokenizer.json")
eos = tok.convert_tokens_to_ids(json.load(open(tok_dir + "/tokenizer_config.json"))["eos_token"])
t_import = time.perf_counter() - t0
t1 = time.perf_counter()
ds = datasets.load_dataset("json", data_files=data, split="train", cache_dir=out + "/cache")
def fn(batch):
    prompts = [(W if i else N).format(instruction=s, input=i) for s, i in zip(batch["instruction"], batch["input"])]
    p = tok(prompts, add_special_tokens=True)["input_ids"]
    r = tok(batch["output"], add_special_tokens=False)["input_ids"]
    ids, labels, lens = [], [], []
    for a, b in zip(p, r):
        x = (a + b + [eos])[:max_len]
        y = ([-100] * len(a) + b + [eos])[:max_len]
        ids.append(x); labels.append(y); lens.append(len(x))
    return {"input_ids": ids, "labels": labels, "length": lens}
ds = ds.map(fn, batched=True, num_proc=nproc if nproc > 1 else None, remove_columns=ds.column_names)
ds.save_to_disk(out + "/saved")
tokens = sum(ds["length"])
print(json.dumps({"seconds": time.perf_counter() - t1, "import_seconds": t_import, "rows": len(ds), "tokens": tokens}))
'''


def sh(cmd, **kw):
    return subprocess.run(cmd, check=True, text=True, capture_output=True, **kw)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=48000)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write", help="append the result table to this markdown file")
    a = ap.parse_args()

    try:
        sh([str(VENV_PY), "-c", "import transformers, datasets"])
    except subprocess.CalledProcessError:
        sh([str(VENV_PY), "-m", "pip", "install", "-q", *PINS])
    versions = json.loads(sh([str(VENV_PY), "-c", "import json,transformers,datasets,tokenizers;print(json.dumps({'transformers':transformers.__version__,'datasets':datasets.__version__,'tokenizers':tokenizers.__version__}))"]).stdout)

    sh(["cargo", "build", "--release", "--quiet", "--bin", "tuner"], cwd=ROOT)
    target = json.loads(sh(["cargo", "metadata", "--format-version", "1", "--no-deps"], cwd=ROOT).stdout)["target_directory"]
    tuner = Path(target) / "release/tuner"

    work = Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
    try:
        src = (ROOT / "datasets/requests-json/train.jsonl").read_text().splitlines()
        rows = [src[i % len(src)] for i in range(a.rows)]
        data = work / "data.jsonl"
        data.write_text("\n".join(rows) + "\n")
        gguf = ROOT / "models/SmolLM2-135M-Instruct.Q4_1.gguf"
        recipe = work / "bench.toml"
        recipe.write_text(f'''[run]
name = "bench"
output_dir = "runs"
[model]
source = "{gguf}"
[dataset]
source = "{data}"
shuffle = false
shard_rows = 2000
[prompt]
template = "alpaca"
[train]
max_seq_length = 256
max_steps = 1
''')
        env = dict(os.environ, RUST_LOG="warn")
        sh([str(tuner), "run", str(recipe), "--until", "fetch"], env=env)
        tok_dir = work / "runs/bench/fetch/model"

        t_rows, h_rows = [], []
        for rep in range(a.repeats):
            t0 = time.perf_counter()
            sh([str(tuner), "run", str(recipe), "--until", "tokenize", "--from", "tokenize", "--threads", str(a.threads)], env=env)
            t_rows.append(time.perf_counter() - t0)
            stats = json.loads((work / "runs/bench/tokenize/stats.json").read_text())
            out = work / f"hf{rep}"
            out.mkdir()
            r = json.loads(sh([str(VENV_PY), "-c", HF_SIDE, str(data), str(tok_dir), str(out), str(a.threads), "256",
                               json.dumps(ALPACA_WITH_INPUT), json.dumps(ALPACA_NO_INPUT)], env=env).stdout)
            h_rows.append(r["seconds"])
            shutil.rmtree(out)
        t_tokens, h_tokens = stats["train"]["tokens"], r["tokens"]
        assert stats["train"]["rows"] == r["rows"] == a.rows, (stats["train"]["rows"], r["rows"])
        assert t_tokens == h_tokens, f"token counts differ: tuner {t_tokens}, HF {h_tokens}"
        tm, hm = statistics.median(t_rows), statistics.median(h_rows)
        cpu = sh(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo | cut -d: -f2"]).stdout.strip()
        table = f"""
## Tokenize throughput (scripts/bench_tokenize.py)

Same {a.rows:,} Alpaca rows (datasets/requests-json/train.jsonl repeated), same SmolLM2-135M tokenizer,
same work (prompt render, separate prompt/response encoding, label masking, EOS, truncation to 256, Arrow
output), {a.threads} threads / processes, median of {a.repeats}, on {os.cpu_count()} cores ({cpu}).
tuner's time is the whole `tuner run --from tokenize --until tokenize` process; HF's is `load_dataset` +
`map(batched=True, num_proc={a.threads})` + `save_to_disk`, after imports.
HF side: transformers {versions['transformers']}, datasets {versions['datasets']}, tokenizers {versions['tokenizers']}.

| tool | seconds | rows/s | tokens/s | ratio |
|---|---|---|---|---|
| tuner tokenize | {tm:.2f} | {a.rows / tm:,.0f} | {t_tokens / tm:,.0f} | {hm / tm:.2f}× |
| HF datasets.map | {hm:.2f} | {a.rows / hm:,.0f} | {h_tokens / hm:,.0f} | 1.00× |

Both produced {t_tokens:,} tokens. Command: `scripts/bench_tokenize.py --rows {a.rows} --threads {a.threads} --repeats {a.repeats}`.
"""
        print(table)
        if a.write:
            p = ROOT / a.write
            p.parent.mkdir(parents=True, exist_ok=True)
            with open(p, "a") as f:
                f.write(table)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
