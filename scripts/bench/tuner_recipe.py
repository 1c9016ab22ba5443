#!/usr/bin/env python3
"""Write a tuner recipe and a synthetic dataset that train with the peers' settings.

    tuner_recipe.py SHAPE MODEL_DIR OUTDIR [--steps 7] [--seq 2048] [--batch 2] [--device cuda]
    tuner run OUTDIR/recipe.toml --run-dir OUTDIR/run --until train     # fetch -> tokenize -> train

Settings (as peer_hf.py / peer_unsloth.py): NF4 + double quant, bf16, LoRA r=16 alpha=32 dropout 0
on q/k/v/o/gate/up/down, gradient checkpointing, 8-bit AdamW lr 2e-4 constant (no warm-up),
weight decay 0.01, clip 1.0, micro-batch 2, GA 1, sequence 2048, packing on.

Data: OUTDIR/data.jsonl, one {"text": ...} row per sequence of every step, each row random words
that tokenize to more than --seq tokens with the model's tokenizer, so every example is cut to
exactly --seq tokens and every packed row is one full document (no padding, plain causal
attention, like the peers' random ids; tokenize reports the rows as truncated). The template is
"{text}" with train_on_responses_only = false, so every token is trained, as labels = inputs.
Checkpoints are pushed past the end (save_steps > steps); only the final adapter is written.
"""
import argparse
import json
import os
import random
import string
import sys

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def count_tokens(model_dir, text):
    """Token count with the model's tokenizer (tokenizers is a transformers dependency), or None."""
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return None
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    return len(tok.encode(text, add_special_tokens=False).ids)


def make_row(rng, n_words):
    return " ".join("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 9))) for _ in range(n_words))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", help="a name for the run (llama-1b, llama-8b, qwen2.5-7b, gemma3n-e4b, ...)")
    ap.add_argument("model_dir")
    ap.add_argument("outdir")
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--device", default="cuda", help='train.device: "cuda", "cpu" or "auto"')
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    model_dir = os.path.abspath(a.model_dir)
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        sys.exit(f"tuner_recipe: {model_dir} has no config.json")
    if not os.path.exists(os.path.join(model_dir, "tokenizer.json")):
        sys.exit(f"tuner_recipe: {model_dir} has no tokenizer.json")
    out = os.path.abspath(a.outdir)
    os.makedirs(out, exist_ok=True)

    # Rows: enough words that every row tokenizes to more than seq tokens (checked when possible).
    rng = random.Random(a.seed)
    rows = a.steps * a.batch + a.batch
    n_words = a.seq  # a word is at least one token with any tokenizer
    probe = make_row(random.Random(a.seed + 1), n_words)
    n_tok = count_tokens(model_dir, probe)
    if n_tok is not None:
        n_words = max(16, int(n_words * 1.25 * a.seq / max(n_tok, 1)) + 16)
    shortest = None
    with open(os.path.join(out, "data.jsonl"), "w") as f:
        for _ in range(rows):
            text = make_row(rng, n_words)
            if n_tok is not None:
                k = count_tokens(model_dir, text)
                while k <= a.seq:
                    text += " " + make_row(rng, n_words)
                    k = count_tokens(model_dir, text)
                shortest = k if shortest is None else min(shortest, k)
            f.write(json.dumps({"text": text}) + "\n")

    recipe = f"""# Written by scripts/bench/tuner_recipe.py: the peers' settings (scripts/bench/peer_hf.py).
[run]
name = "bench-{a.shape}"
output_dir = "runs"
seed = {a.seed}

[model]
source = {json.dumps(model_dir)}
dtype = "bf16"

[quantization]
method = "nf4"
double_quant = true
block_size = 64

[lora]
r = 16
alpha = 32
dropout = 0.0
target_modules = {json.dumps(TARGETS)}

[prompt]
template = "{{text}}"
output_field = "text"
train_on_responses_only = false
add_eos = false

[dataset]
source = {json.dumps(os.path.join(out, "data.jsonl"))}
shuffle = false

[train]
device = {json.dumps(a.device)}
max_seq_length = {a.seq}
packing = true
micro_batch_size = {a.batch}
gradient_accumulation_steps = 1
max_steps = {a.steps}
learning_rate = 2e-4
lr_scheduler = "constant"
warmup_steps = 0
optimizer = "adamw_8bit"
weight_decay = 0.01
max_grad_norm = 1.0
gradient_checkpointing = true
logging_steps = 1
memory_log_steps = {a.steps}
save_steps = {a.steps + 1000}
keep_checkpoints = 1
"""
    with open(os.path.join(out, "recipe.toml"), "w") as f:
        f.write(recipe)
    extra = f", shortest {shortest} tokens" if shortest is not None else " (token counts not checked: no tokenizers module)"
    print(f"tuner_recipe: {out}/recipe.toml and data.jsonl ({rows} rows of > {a.seq} tokens{extra})")


if __name__ == "__main__":
    main()
