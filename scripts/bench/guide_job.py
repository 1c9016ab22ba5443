#!/usr/bin/env python3
"""The guide's job (guide_race.sh), part 1: Alpaca-shaped rows with yahma/alpaca-cleaned's token
lengths, and the tuner recipe of the Unsloth Gemma 3n guide's training run on them.

    guide_job.py SHAPE MODEL_DIR OUTDIR [--rows 600] [--seed 42] [--steps 60] [--seq 2048] [--device cuda]
    guide_job.py --stats [--rows 600] [--seed 42] [--tokenizer DIR]     # the sampled lengths only

Writes OUTDIR/data.jsonl ({"instruction", "input", "output"} per row), OUTDIR/recipe.toml and
OUTDIR/rows.json (each row's sampled target and measured token counts, and their summary).

The recipe is recipes/gemma3n-alpaca.toml's training part (the guide: batch 2 x accumulation 4,
warm-up 5, lr 2e-4 linear, adamw_8bit, weight decay 0.01, seed 42, max_seq_length 2048, gradient
checkpointing, log every step, no packing, dynamic padding, LoRA r16/alpha 32/dropout 0 on the
seven projections, QLoRA NF4, the "### 指令" / "### 回答" template, responses only, EOS appended),
with the model and data swapped for local files, max_steps = --steps, no eval split, and no
checkpoint before the last step (the guide's trainer saves none in 60 steps).

Row lengths. The text is synthetic (the models are random-init with a ~300-token fixture
tokenizer); what is kept from the real data is how many tokens each row has. Source: the histogram
"Distribution of prompt lengths" in the README of github.com/gururise/AlpacaDataCleaned
(assets/prompt_length_distribution.png, committed 2023-04-09 with the cleaned release that
yahma/alpaca-cleaned mirrors; 51,760 rows). Its bars were read off the image pixel by pixel
(1 px = 17 rows): 100 bins of 15.5 tokens from 44 to ~1,594; 51,465 rows fall in the visible bars
below 726 tokens, so ~295 rows (0.57%) lie in the invisible tail 726..1,594. Those counts are the
length of the whole training prompt in LLaMA tokens with the Stanford Alpaca template (its
shortest rows, ~44, are the template's ~40 tokens plus a few), so a row's content (instruction +
input + output) is taken as the sampled length minus 40 (54 when the row has an input: that
template variant is longer). The histogram as read (tail included): median 185, mean 231, 90th
percentile 450, 99th 658, 0.35% of rows over 1,000 tokens, maximum ~1,594.

Sampling, deterministic from --seed (Python's random.Random): a bin by its count, uniform within
the bin; the tail beyond 726 as bins whose counts fall geometrically from 8 by 0.985 per bin
(summing to ~300 rows, the missing ones; the image cannot show the tail's shape, so that shape is
an assumption); an input on 40% of the rows (the Stanford Alpaca README: "around 40% of the
examples have an input"); the instruction ~ lognormal(median 14 tokens, sigma 0.45), the input ~
lognormal(median 20, sigma 1.0) capped at 60% of what is left, the output the rest. With
--min-long N (default 2) at least N rows are over 1,000 tokens: 0.35% of 600 rows is 2.1 on
average, and the floor makes sure a draw does not leave the run without that tail. Rows are capped
at --seq tokens. With the defaults (600 rows, seed 42, the fixture tokenizer) the rows have
(template, BOS and EOS included) median 177 tokens, mean 217, 90th percentile 444, 99th 586,
maximum 1,287, two over 1,000 (both drawn, none from the floor).

Row text: words of a 2,000-word synthetic lexicon drawn with Zipf frequencies (so the loss can keep
falling after the model has learnt the letters), each field cut to its sampled token count with
MODEL_DIR's tokenizer (tokenizers). The template's own tokens are counted by that tokenizer: with
the byte-level fixture (its CJK characters are 3 tokens each) the template, BOS and EOS add 27
tokens to a row, where a real tokenizer would add roughly 10-15; the content lengths follow the
histogram. The lengths tuner actually trains are in its tokenize shards; guide_report.py data
summarises them.
"""
import argparse
import bisect
import json
import math
import os
import random
import statistics
import string
import sys

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TEMPLATE = "### 指令\n{instruction}\n{input}\n\n### 回答\n{output}"  # recipes/gemma3n-alpaca.toml

# The AlpacaDataCleaned histogram as read off the image: (left edge of the bin, rows); bins of 15.5
# LLaMA tokens; the visible bars end at 726.
BIN_W = 15.5
HIST = [
    (44, 946), (60, 3482), (75, 5949), (91, 4411), (106, 2890), (122, 2383), (137, 1859), (153, 2011),
    (168, 1842), (184, 1792), (199, 1724), (215, 1487), (230, 1335), (246, 1420), (261, 1183), (277, 1234),
    (292, 1082), (308, 1065), (323, 1217), (339, 1065), (354, 1099), (370, 1132), (385, 946), (401, 1115),
    (416, 879), (432, 862), (447, 811), (463, 659), (478, 592), (494, 507), (509, 456), (525, 338),
    (540, 321), (556, 237), (571, 203), (587, 186), (602, 186), (618, 152), (633, 135), (649, 101),
    (664, 68), (680, 51), (695, 34), (711, 17),
]
TAIL_FIRST, TAIL_DECAY, TAIL_END = 8.0, 0.985, 1594  # the invisible tail: 726..1594, ~295 rows
STANFORD_TEMPLATE = 40  # LLaMA tokens of the Stanford Alpaca prompt without input (54 with one)
STANFORD_TEMPLATE_INPUT = 54
P_INPUT = 0.40


def bins():
    """[(left edge, weight)] over the whole range, the tail included."""
    out = [(float(a), float(c)) for a, c in HIST]
    edge, w = HIST[-1][0] + BIN_W, TAIL_FIRST
    while edge < TAIL_END:
        out.append((edge, w))
        edge += BIN_W
        w *= TAIL_DECAY
    return out


def sample_lengths(rng, n, min_long, seq, overhead):
    """Per row: (has_input, instruction, input, output) token counts, and the row's total as
    `overhead(has_input) + fields`, for n rows; at least `min_long` rows over 1,000 tokens."""
    bs = bins()
    cum = []
    acc = 0.0
    for _, w in bs:
        acc += w
        cum.append(acc)

    def draw_len(lo=0.0):
        while True:
            k = bisect.bisect_right(cum, rng.random() * cum[-1])
            k = min(k, len(bs) - 1)
            x = bs[k][0] + rng.random() * BIN_W
            if x >= lo:
                return x

    def row(lo=0.0):
        has_input = rng.random() < P_INPUT
        total_llama = draw_len(lo)
        content = max(4, int(round(total_llama)) - (STANFORD_TEMPLATE_INPUT if has_input else STANFORD_TEMPLATE))
        content = min(content, seq - overhead(has_input))
        instr = max(3, min(int(round(rng.lognormvariate(math.log(14), 0.45))), content // 2))
        left = content - instr
        inp = 0
        if has_input:
            inp = max(1, min(int(round(rng.lognormvariate(math.log(20), 1.0))), int(left * 0.6)))
        out = max(1, content - instr - inp)
        return {"has_input": has_input, "instruction": instr, "input": inp, "output": out,
                "total": overhead(has_input) + instr + inp + out, "llama_prompt": round(total_llama, 1)}

    rows = [row() for _ in range(n)]
    long_rows = sum(1 for r in rows if r["total"] > 1000)
    k = n - 1
    while long_rows < min_long and k >= 0 and seq > 1000:
        if rows[k]["total"] <= 1000:
            # redrawn from the histogram's part above 1,000 tokens + this row's template (kept
            # only if it stays over 1,000 after the cap at seq)
            r = row(lo=1000 + STANFORD_TEMPLATE_INPUT + 16)
            if r["total"] > 1000:
                rows[k] = dict(r, floor=True)
                long_rows += 1
        k -= 1
    return rows


class Lexicon:
    """Synthetic words with Zipf frequencies and their token counts under a tokenizer."""

    def __init__(self, rng, tok, size=2000):
        words = set()
        while len(words) < size:
            words.add("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 10))))
        self.words = sorted(words)
        rng.shuffle(self.words)
        w = [1.0 / (k + 2.7) ** 1.07 for k in range(size)]
        self.cum = []
        acc = 0.0
        for x in w:
            acc += x
            self.cum.append(acc)
        self.tok = tok
        self.first = [self.count(x) for x in self.words]          # at the start of a field
        self.later = [self.count(" " + x) for x in self.words]    # after a space
        # one-token fillers to land exactly on a count (" n", " p" with the fixture; most letters
        # with a real tokenizer)
        self.fill = [" " + c for c in string.ascii_lowercase if self.count(" " + c) == 1] or ["."]

    def count(self, s):
        return len(self.tok.encode(s, add_special_tokens=False).ids) if self.tok else max(1, (len(s) + 3) // 4)

    def text(self, rng, n):
        """Words whose token count (as one field) is n."""
        parts, have = [], 0
        while have < n:
            k = min(bisect.bisect_right(self.cum, rng.random() * self.cum[-1]), len(self.words) - 1)
            c = self.later[k] if parts else self.first[k]
            if have + c > n:
                break
            parts.append((" " if parts else "") + self.words[k])
            have += c
        while have < n:
            if not parts:  # a field must start without a space
                k = min(range(len(self.words)), key=lambda i: self.first[i])
                parts.append(self.words[k])
                have += self.first[k]
                continue
            parts.append(rng.choice(self.fill))
            have += 1
        return "".join(parts)


def load_tokenizer(path):
    if not path:
        return None
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    f = os.path.join(path, "tokenizer.json")
    return Tokenizer.from_file(f) if os.path.exists(f) else None


def row_tokens(tok, row):
    """A row's tokens as tuner's tokenize stage counts them: the prompt segment encoded with the
    tokenizer's special tokens (BOS), the response without, EOS appended."""
    prompt = TEMPLATE.split("{output}")[0].format(**row)
    return len(tok.encode(prompt).ids) + len(tok.encode(row["output"], add_special_tokens=False).ids) + 1


def template_overhead(tok, has_input):
    """Tokens the template, BOS and EOS add to a row's fields."""
    if tok is None:
        return 14
    w = len(tok.encode("word", add_special_tokens=False).ids)
    probe = {"instruction": "word", "input": "word" if has_input else "", "output": "word"}
    return row_tokens(tok, probe) - (3 if has_input else 2) * w


def summary(xs):
    xs = sorted(xs)
    if not xs:
        return {}
    q = lambda p: xs[min(len(xs) - 1, int(p * (len(xs) - 1) + 0.5))]  # noqa: E731
    return {"n": len(xs), "min": xs[0], "p10": q(0.10), "p50": q(0.50), "p90": q(0.90), "p99": q(0.99),
            "max": xs[-1], "mean": round(statistics.fmean(xs), 1), "over_1000": sum(1 for x in xs if x > 1000)}


def recipe_text(a, model_dir, data):
    return f"""# Written by scripts/bench/guide_job.py: the training job of the Unsloth Gemma 3n guide
# (recipes/gemma3n-alpaca.toml) on a local random-init model and synthetic alpaca-cleaned-shaped rows.
[run]
name = "guide-{a.shape}"
seed = {a.seed}
output_dir = "runs"

[model]
source = {json.dumps(model_dir)}
dtype = "auto"                 # bf16 on CUDA, fp32 on the CPU

[quantization]
method = "nf4"
double_quant = true
block_size = 64

[lora]
r = 16
alpha = 32
dropout = 0.0
bias = "none"
use_rslora = false
target_modules = {json.dumps(TARGETS)}

[prompt]
template = {json.dumps(TEMPLATE, ensure_ascii=False)}
train_on_responses_only = true
add_eos = true

[dataset]
source = {json.dumps(data)}
shuffle = true

[train]
device = {json.dumps(a.device)}
max_seq_length = {a.seq}
packing = false
micro_batch_size = 2
gradient_accumulation_steps = 4
warmup_steps = 5
max_steps = {a.steps}
learning_rate = 2e-4
lr_scheduler = "linear"
optimizer = "adamw_8bit"
weight_decay = 0.01
max_grad_norm = 1.0
gradient_checkpointing = true
logging_steps = 1
memory_log_steps = 10
save_steps = {a.steps + 1000}
keep_checkpoints = 1
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", nargs="?", help="a name for the run (llama-8b, gemma3n-e4b, ...)")
    ap.add_argument("model_dir", nargs="?")
    ap.add_argument("outdir", nargs="?")
    ap.add_argument("--rows", type=int, default=600)
    ap.add_argument("--seed", type=int, default=42, help="run.seed, and the rows' seed")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seq", type=int, default=2048, help="train.max_seq_length (rows are capped at it)")
    ap.add_argument("--device", default="cuda", help='train.device: "cuda", "cpu" or "auto"')
    ap.add_argument("--min-long", type=int, default=2, help="at least this many rows over 1,000 tokens")
    ap.add_argument("--stats", action="store_true", help="print the sampled lengths and write nothing")
    ap.add_argument("--tokenizer", default=None, help="with --stats: a folder with tokenizer.json")
    a = ap.parse_args()

    if a.stats:
        model_dir = a.tokenizer or a.model_dir
    else:
        if not (a.shape and a.model_dir and a.outdir):
            ap.error("SHAPE MODEL_DIR OUTDIR are needed (or --stats)")
        model_dir = os.path.abspath(a.model_dir)
        if not os.path.exists(os.path.join(model_dir, "config.json")):
            sys.exit(f"guide_job: {model_dir} has no config.json")
    tok = load_tokenizer(model_dir)
    if tok is None and not a.stats:
        sys.exit(f"guide_job: no tokenizer.json in {model_dir} (or no `tokenizers` module): row lengths need it")
    over = {h: template_overhead(tok, h) for h in (False, True)}
    rng = random.Random(a.seed)
    lens = sample_lengths(rng, a.rows, a.min_long, a.seq, lambda h: over[h])
    stats = {"target_total": summary([r["total"] for r in lens]),
             "target_output": summary([r["output"] for r in lens]),
             "with_input": sum(r["has_input"] for r in lens), "template_overhead": over,
             "min_long_floor_rows": sum(1 for r in lens if r.get("floor"))}
    if a.stats:
        print(json.dumps(stats, indent=1))
        return 0

    lex = Lexicon(random.Random(a.seed ^ 0x1E7), tok)
    out = os.path.abspath(a.outdir)
    os.makedirs(out, exist_ok=True)
    data = os.path.join(out, "data.jsonl")
    measured = []
    with open(data, "w") as f:
        for r in lens:
            row = {"instruction": lex.text(rng, r["instruction"]),
                   "input": lex.text(rng, r["input"]) if r["has_input"] else "",
                   "output": lex.text(rng, r["output"])}
            r["measured"] = row_tokens(tok, row)
            measured.append(r["measured"])
            f.write(json.dumps(row) + "\n")
    stats["measured_total"] = summary(measured)
    with open(os.path.join(out, "recipe.toml"), "w") as f:
        f.write(recipe_text(a, model_dir, data))
    with open(os.path.join(out, "rows.json"), "w") as f:
        json.dump({"stats": stats, "rows": lens}, f, indent=0)
    m = stats["measured_total"]
    print(f"guide_job: {out}/recipe.toml, data.jsonl: {a.rows} rows, tokens per row (template, BOS/EOS "
          f"included) p10 {m['p10']} median {m['p50']} mean {m['mean']} p90 {m['p90']} p99 {m['p99']} max {m['max']}, "
          f"{m['over_1000']} over 1,000; {stats['with_input']} with an input")
    return 0


if __name__ == "__main__":
    sys.exit(main())
