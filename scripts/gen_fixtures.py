#!/usr/bin/env python3
"""Deterministic generator for the HF-parity test fixtures under tests/fixtures/.

Usage (pinned environment, CPU only):
    /root/.cache/tuner/venv/bin/python scripts/gen_fixtures.py            # (re)write tests/fixtures/
    /root/.cache/tuner/venv/bin/python scripts/gen_fixtures.py --check    # regenerate into a temp dir, exit 1 on any byte difference
    /root/.cache/tuner/venv/bin/python scripts/gen_fixtures.py --out DIR  # write somewhere else

What it writes (see the generated tests/fixtures/README.md for the full description):
    tokenizers/<variant>/          three byte-level BPE tokenizers built here with the `tokenizers` library
    models/<family>/               tiny random-weight HF models (config.json, model.safetensors, tokenizer files)
                                   plus reference.safetensors / reference.json / score.json computed by
                                   HF transformers in fp32 with attn_implementation="eager"
    models/<family>/generate.json  HF greedy `generate` tokens on a left-padded batch of two prompts (llama, llama-tied,
                                   mistral, qwen2, qwen3, phi3, gemma2, gemma3, gemma3n), written after README.md
    models/llama-bnb4/             the `llama` model saved by transformers as a bitsandbytes NF4 double-quant checkpoint
    models/gemma3n-bnb4/           the `gemma3n` model quantized the same way, in Gemma3nForConditionalGeneration's
                                   multimodal key layout (written last)
    bnb/quant.safetensors          bitsandbytes.functional.quantize_4bit / dequantize_4bit cases
    score/texts.jsonl              the texts scored in every models/<family>/score.json

Every random number comes from a torch.Generator seeded from sha256(SEED, family, tensor name), the CPU runs
single-threaded with torch.use_deterministic_algorithms(True), and nothing depends on set or hash ordering,
so two runs on the same machine give byte-identical files.
"""

from __future__ import annotations

import argparse
import copy
import filecmp
import hashlib
import importlib.metadata as md
import json
import math
import os
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path

PINNED = {
    "torch": "2.11.0",
    "transformers": "5.17.0",
    "bitsandbytes": "0.50.2",
    "peft": "0.21.0",
}
INSTALL_HINT = "pip install torch==2.11.0 transformers==5.17.0 bitsandbytes==0.50.2 peft==0.21.0"


def check_versions() -> dict[str, str]:
    found = {}
    bad = []
    for name, want in PINNED.items():
        try:
            got = md.version(name)
        except md.PackageNotFoundError:
            got = None
        found[name] = got
        # torch wheels carry a local tag such as "+cu130" or "+cpu"; the release number must match exactly.
        if got is None or got.split("+")[0] != want:
            bad.append(f"  {name}: need {want}, found {got}")
    for name in ("safetensors", "numpy", "tokenizers"):
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            bad.append(f"  {name}: not installed")
    if bad:
        sys.stderr.write(
            "gen_fixtures.py needs the pinned library versions, because the fixtures are the output of these exact\n"
            "implementations:\n" + "\n".join(bad) + "\n"
            f"Install them with:\n  {INSTALL_HINT}\n"
            "(the project venv is /root/.cache/tuner/venv; run /root/.cache/tuner/venv/bin/python scripts/gen_fixtures.py)\n"
        )
        sys.exit(2)
    return found


VERSIONS = check_versions()

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ["CUDA_VISIBLE_DEVICES"] = ""  # CPU only, even where a GPU exists

import logging  # noqa: E402

logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors  # noqa: E402

import transformers  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig  # noqa: E402

import bitsandbytes  # noqa: E402,F401
import bitsandbytes.functional as bnbf  # noqa: E402
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()

SEED = 20261128
ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "tests" / "fixtures"
REGEN_CMD = "/root/.cache/tuner/venv/bin/python scripts/gen_fixtures.py"

T_REF = 12  # reference sequence length
N_PAD = 3  # right padding of row 1
N_MERGES = 40


def setup_determinism() -> None:
    torch.manual_seed(SEED)
    np.random.seed(SEED % (2**32))
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # can only be set once per process (--check generates a second time)
        pass


def seed_for(*parts: str) -> int:
    h = hashlib.sha256("/".join([str(SEED), *parts]).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def gen(*parts: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed_for(*parts))


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


# ---------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------

# Text the merges are learned from (written for this fixture).
BPE_TRAINING_TEXT = """\
The tiny model reads the text one token at a time. The tokenizer splits the text into pieces,
and the model predicts the next piece from the pieces before it. When the model is right the loss
is small; when it is wrong the loss is large. We train the model on the training set, then we test
it on the test set, and we write the numbers into a table. The table shows the loss, the number of
tokens and the time it took. Then we change the learning rate and the rank of the adapter, and we
train it again. There is no magic in it: the weights move a little in the direction that makes the
loss smaller, and after enough steps the model starts to get the text right.
"""

# Texts for reference.safetensors (row 0 and row 1).
REF_TEXTS = [
    "The model reads the text and predicts the next token in the sequence, one piece at a time.",
    "Small models are tested with tiny random weights, and that is enough.",
]

# Texts for the score fixture (tests/fixtures/score/texts.jsonl).
SCORE_TEXTS = [
    "The tokenizer splits the text into pieces.",
    "In 2024 the train left at 7:45 and arrived 3 hours and 20 minutes later.",
    "Café crème costs €3.50 at the naïve little bistro, n'est-ce pas?",
    "Große Straße, Ωmega and 日本語のテキスト mixed with an emoji 🙂 at the end.",
    "We train the model again with a learning rate of 0.0002 and rank 16.",
]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {}
    extra = 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def learn_merges(text: str, n_new_tokens: int) -> list[tuple[str, str]]:
    """Plain greedy BPE over ByteLevel pre-tokenized words: most frequent adjacent pair first,
    ties broken by the lexicographically smallest pair. Deterministic."""
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    words = Counter(piece for piece, _ in pre.pre_tokenize_str(text))
    seqs = {w: list(w) for w in words}
    merges: list[tuple[str, str]] = []
    seen_tokens: set[str] = set()
    while len(seen_tokens) < n_new_tokens:
        pairs: Counter = Counter()
        for w in sorted(words):
            s = seqs[w]
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += words[w]
        if not pairs:
            break
        (a, b), _ = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        merges.append((a, b))
        seen_tokens.add(a + b)
        for w in words:
            s = seqs[w]
            out = []
            i = 0
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return merges


CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

GEMMA_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}{%- set role = 'model' %}{%- else %}{%- set role = message['role'] %}{%- endif %}"
    "{{- '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<start_of_turn>model\\n' }}{%- endif %}"
)

# Tokenizer variants. All share the 256 byte tokens and the learned merges; they differ in special tokens
# and in whether encode(add_special_tokens=True) prepends a BOS (TemplateProcessing).
TOKENIZER_VARIANTS = {
    # Qwen-style: no BOS is added.
    "chatml": {
        "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>"],
        "bos": None,
        "add_bos": False,
        "eos": "<|endoftext|>",
        "pad": "<|endoftext|>",
        "template": CHATML_TEMPLATE,
    },
    # Llama-3-style: same vocabulary, but encode(add_special_tokens=True) prepends <|begin_of_text|>.
    "chatml-bos": {
        "specials": ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>"],
        "bos": "<|begin_of_text|>",
        "add_bos": True,
        "eos": "<|endoftext|>",
        "pad": "<|endoftext|>",
        "template": CHATML_TEMPLATE,
    },
    # Gemma-style: <bos> is prepended, <pad> pads.
    "gemma": {
        "specials": ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"],
        "bos": "<bos>",
        "add_bos": True,
        "eos": "<eos>",
        "pad": "<pad>",
        "template": GEMMA_TEMPLATE,
    },
}


def build_tokenizer(variant: str, merges: list[tuple[str, str]]) -> Tokenizer:
    spec = TOKENIZER_VARIANTS[variant]
    b2u = bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    for a, b in merges:
        if a + b not in vocab:
            vocab[a + b] = len(vocab)
    bpe = models.BPE(vocab=vocab, merges=list(merges), fuse_unk=False, byte_fallback=False)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in spec["specials"]])
    byte_level = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    if spec["add_bos"]:
        bos = spec["bos"]
        bos_id = tok.token_to_id(bos)
        tmpl = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, bos_id)]
        )
        tok.post_processor = processors.Sequence([byte_level, tmpl])
    else:
        tok.post_processor = byte_level
    return tok


def tokenizer_config(variant: str, tok: Tokenizer) -> dict:
    spec = TOKENIZER_VARIANTS[variant]
    added = {}
    for s in spec["specials"]:
        added[str(tok.token_to_id(s))] = {
            "content": s,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
    return {
        "add_bos_token": spec["add_bos"],
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "bos_token": spec["bos"],
        "chat_template": spec["template"],
        "clean_up_tokenization_spaces": False,
        "eos_token": spec["eos"],
        "model_max_length": 128,
        "pad_token": spec["pad"],
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": None,
    }


def write_tokenizer_files(folder: Path, variant: str, tok: Tokenizer) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"), pretty=True)
    write_text(folder / "tokenizer_config.json", dumps(tokenizer_config(variant, tok)))


CHAT_MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 2 + 2?"},
    {"role": "assistant", "content": " Four. "},
    {"role": "user", "content": "And in French?"},
]


def write_chat_example(folder: Path, tok: Tokenizer) -> None:
    """Render the chat template with transformers' own apply_chat_template, as a check for the Rust renderer."""
    at = AutoTokenizer.from_pretrained(str(folder))
    rendered = at.apply_chat_template(CHAT_MESSAGES, tokenize=False)
    with_prompt = at.apply_chat_template(CHAT_MESSAGES, tokenize=False, add_generation_prompt=True)
    example = {
        "messages": CHAT_MESSAGES,
        "rendered": rendered,
        "rendered_add_generation_prompt": with_prompt,
        "ids_add_generation_prompt": tok.encode(with_prompt, add_special_tokens=False).ids,
        "note": "rendered by transformers apply_chat_template; ids from tokenizers encode(rendered, add_special_tokens=False)",
    }
    write_text(folder / "chat_example.json", dumps(example))


def token_ids(tok: Tokenizer, variant: str) -> dict:
    spec = TOKENIZER_VARIANTS[variant]
    return {
        "bos": tok.token_to_id(spec["bos"]) if spec["bos"] else None,
        "eos": tok.token_to_id(spec["eos"]),
        "pad": tok.token_to_id(spec["pad"]),
    }


# ---------------------------------------------------------------------------
# Model families
# ---------------------------------------------------------------------------

# norm: "mul" = y = w * x_hat (Llama/Qwen/Mistral/Gemma3n), "one_plus" = y = (1 + w) * x_hat (Gemma 2/3).
# std: normal std for Linear weights, keyed by regex on the parameter name (first match wins; "" = default).
FAMILIES = [
    {
        "name": "llama",
        "arch": "LlamaForCausalLM",
        "tokenizer": "chatml-bos",
        "config_style": "hub",
        "norm": "mul",
        "config": dict(
            model_type="llama",
            vocab_size=320,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        ),
        "exercises": "untied lm_head; GQA 4 heads / 2 kv heads; llama3 rope scaling (orig 16, factor 8) that changes every frequency; eps 1e-5; intermediate 96 (so the bnb4 down_proj [64, 96] has 64-blocks that span rows)",
    },
    {
        "name": "llama-tied",
        "arch": "LlamaForCausalLM",
        "tokenizer": "chatml-bos",
        "config_style": "v5",
        "norm": "mul",
        "config": dict(
            model_type="llama",
            vocab_size=320,
            hidden_size=48,
            intermediate_size=80,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=64,
            rms_norm_eps=1e-5,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        ),
        "exercises": "tied embeddings (no lm_head.weight in the file); explicit head_dim 16 != hidden/heads = 12; no rope scaling; theta 5e5",
    },
    {
        "name": "mistral",
        "arch": "MistralForCausalLM",
        "tokenizer": "chatml-bos",
        "config_style": "hub",
        "norm": "mul",
        "config": dict(
            model_type="mistral",
            vocab_size=320,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=16,
            max_position_embeddings=64,
            rms_norm_eps=1e-5,
            sliding_window=4,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        "exercises": "sliding_window 4 on every layer (sequence length 12); GQA 4 heads / 1 kv head; untied; explicit head_dim 16 != hidden/heads = 12 (Mistral-Nemo's shape: 5120 / 32 heads with head_dim 128)",
    },
    {
        "name": "qwen2",
        "arch": "Qwen2ForCausalLM",
        "tokenizer": "chatml",
        "config_style": "hub",
        "norm": "mul",
        "std": {r"\.bias$": 0.5},
        "config": dict(
            model_type="qwen2",
            vocab_size=320,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
        "exercises": "q/k/v bias (random, std 0.5), o without bias; tied; eps 1e-6; theta 1e6; no BOS added by the tokenizer",
    },
    {
        "name": "qwen3",
        "arch": "Qwen3ForCausalLM",
        "tokenizer": "chatml",
        "config_style": "v5",
        "norm": "mul",
        "config": dict(
            model_type="qwen3",
            vocab_size=320,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=64,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
            attention_bias=False,
            use_sliding_window=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
        "exercises": "q_norm/k_norm with random weights in [0.5,1.5]; explicit head_dim 16 with hidden 48 and 4 heads; tied",
    },
    {
        "name": "phi3",
        "arch": "Phi3ForCausalLM",
        "tokenizer": "chatml-bos",
        "config_style": "hub",
        "norm": "mul",
        "config": dict(
            model_type="phi3",
            vocab_size=320,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            rms_norm_eps=1e-5,
            sliding_window=5,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        "exercises": "fused qkv_proj (GQA 4 heads / 2 kv heads: q, k, v column blocks of 64/32/32) and fused gate_up_proj (gate rows first); sliding_window 5; untied",
    },
    {
        "name": "gemma2",
        "arch": "Gemma2ForCausalLM",
        "tokenizer": "gemma",
        "config_style": "hub",
        "norm": "one_plus",
        "embed_std": 0.3,
        "std": {r"self_attn\.(q|k)_proj\.weight$": 0.6},
        "final_norm": (0.5, 1.5),
        "config": dict(
            model_type="gemma2",
            vocab_size=320,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=64,
            rms_norm_eps=1e-6,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
            tie_word_embeddings=True,
            hidden_activation="gelu_pytorch_tanh",
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
        "exercises": "attention softcap 50 (q/k weights std 0.6 so some scores pass 50); final softcap 30 (embed std 0.3, final norm (1+w) in [1.5,2.5]: logits std ~5, the largest pass 30); query_pre_attn_scalar 24 != head_dim 16; sliding window 4 on even layers; (1+w) norms; GeGLU; sqrt(hidden) embed scale",
    },
    {
        "name": "gemma3",
        "arch": "Gemma3ForCausalLM",
        "tokenizer": "gemma",
        "config_style": "hub",
        "norm": "one_plus",
        "config": dict(
            model_type="gemma3_text",
            vocab_size=320,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=64,
            rms_norm_eps=1e-6,
            query_pre_attn_scalar=32,
            attn_logit_softcapping=None,
            final_logit_softcapping=None,
            sliding_window=4,
            sliding_window_pattern=3,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
            tie_word_embeddings=True,
            hidden_activation="gelu_pytorch_tanh",
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        ),
        "exercises": "q_norm/k_norm (1+w) with random w; layer_types with sliding layers (window 4); rope_local_base_freq 1e4 on sliding layers; rope_theta 1e6 + linear factor 8 on the full layer only; query_pre_attn_scalar 32",
    },
    {
        "name": "gemma3n",
        "arch": "Gemma3nForCausalLM",
        "tokenizer": "gemma",
        "config_style": "v5",
        "norm": "mul",
        "embed_std": 0.3,
        "final_norm": (1.5, 2.5),
        "config": dict(
            model_type="gemma3n_text",
            vocab_size=384,
            vocab_size_per_layer_input=320,
            hidden_size=64,
            hidden_size_per_layer_input=16,
            intermediate_size=[96, 96, 128, 64, 96, 128],
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            max_position_embeddings=64,
            rms_norm_eps=1e-6,
            sliding_window=4,
            layer_types=[
                "sliding_attention",
                "sliding_attention",
                "full_attention",
                "sliding_attention",
                "sliding_attention",
                "full_attention",
            ],
            num_kv_shared_layers=3,
            activation_sparsity_pattern=[0.95, 0.95, 0.75, 0.0, 0.0, 0.0],
            altup_num_inputs=4,
            altup_active_idx=0,
            altup_coef_clip=120.0,
            altup_correct_scale=True,
            laurel_rank=8,
            final_logit_softcapping=30.0,
            tie_word_embeddings=True,
            hidden_activation="gelu_pytorch_tanh",
            rope_parameters={
                "full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        ),
        "exercises": "6 layers, layers 3-5 KV-shared (3,4 read layer 1's K/V, 5 reads layer 2's); activation sparsity 0.95/0.95/0.75 on layers 0-2; per-layer intermediate_size list; AltUp 4 streams; LAuReL rank 8; PLE (hidden_size_per_layer_input 16, vocab_size_per_layer_input 320 < vocab_size 384); final softcap 30 (embed std 0.3, final norm w in [1.5,2.5]); w (not 1+w) norms with random weights; scale-free v_norm; attention scaling 1.0",
    },
]

FAMILY_BY_NAME = {f["name"]: f for f in FAMILIES}


def param_kind(name: str) -> str:
    leaf = name.rsplit(".", 2)
    if name.endswith(".bias"):
        return "bias"
    if name.endswith("correct_output_scale"):
        return "scale"
    if name.endswith("embed_tokens.weight") or name.endswith("embed_tokens_per_layer.weight"):
        return "embed"
    if name.endswith(".weight") and "norm" in leaf[-2]:
        return "norm"
    return "linear"


def init_weights(model: torch.nn.Module, fam: dict) -> None:
    """Overwrite every parameter with seeded random values (std 0.2 instead of HF's 0.02 etc.)."""
    import re

    std_rules = fam.get("std", {})
    norm_style = fam["norm"]
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            g = gen(fam["name"], name)
            kind = param_kind(name)
            if kind == "norm":
                if name in ("model.norm.weight",) and "final_norm" in fam:
                    lo, hi = fam["final_norm"]
                elif norm_style == "mul":
                    lo, hi = 0.5, 1.5
                else:  # one_plus: the effective scale 1 + w lies in [0.5, 1.5]
                    lo, hi = -0.5, 0.5
                val = lo + (hi - lo) * torch.rand(p.shape, generator=g, dtype=torch.float32)
            elif kind == "scale":
                val = 0.5 + torch.rand(p.shape, generator=g, dtype=torch.float32)
            elif kind == "embed":
                val = torch.randn(p.shape, generator=g, dtype=torch.float32) * fam.get("embed_std", 0.2)
            else:
                std = 0.2
                for pat, s in std_rules.items():
                    if re.search(pat, name):
                        std = s
                        break
                val = torch.randn(p.shape, generator=g, dtype=torch.float32) * std
            p.copy_(val)


def hub_style_config(cfg: dict) -> dict:
    """Rewrite transformers-5 `rope_parameters` into the rope_theta / rope_scaling (/ rope_local_base_freq)
    fields found in most Hub config.json files, and `dtype` into `torch_dtype`."""
    out = dict(cfg)
    rp = out.pop("rope_parameters")
    if "full_attention" in rp:  # per-layer-type (Gemma 3 / 3n)
        full = dict(rp["full_attention"])
        sliding = dict(rp["sliding_attention"])
        out["rope_theta"] = full.pop("rope_theta")
        out["rope_local_base_freq"] = sliding.pop("rope_theta")
        assert sliding == {"rope_type": "default"}, sliding
        out["rope_scaling"] = None if full == {"rope_type": "default"} else full
    else:
        rp = dict(rp)
        out["rope_theta"] = rp.pop("rope_theta")
        out["rope_scaling"] = None if rp == {"rope_type": "default"} else rp
    if "dtype" in out:
        out["torch_dtype"] = out.pop("dtype")
    return dict(sorted(out.items()))


def make_config(fam: dict, ids: dict):
    kw = dict(fam["config"])
    model_type = kw.pop("model_type")
    kw.update(bos_token_id=ids["bos"], eos_token_id=ids["eos"], pad_token_id=ids["pad"])
    cfg = AutoConfig.for_model(model_type, **kw)
    cfg.architectures = [fam["arch"]]
    cfg._attn_implementation = "eager"
    return cfg


def load_eager(folder: Path, **kw):
    m = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="eager", dtype=torch.float32, **kw)
    m.eval()
    return m


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb), (set(sa) ^ set(sb))
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------------------
# References
# ---------------------------------------------------------------------------


def reference_batch(tok: Tokenizer, pad_id: int):
    rows = [tok.encode(t, add_special_tokens=True).ids for t in REF_TEXTS]
    assert len(rows[0]) >= T_REF and len(rows[1]) >= T_REF - N_PAD, [len(r) for r in rows]
    r0 = rows[0][:T_REF]
    r1 = rows[1][: T_REF - N_PAD] + [pad_id] * N_PAD
    input_ids = torch.tensor([r0, r1], dtype=torch.int64)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, T_REF - N_PAD :] = 0
    return input_ids, attention_mask


@torch.no_grad()
def compute_reference(model, input_ids, attention_mask) -> dict:
    out = model(input_ids=input_ids, attention_mask=attention_mask)
    logits = out.logits.float()
    labels = input_ids.clone()
    labels[attention_mask == 0] = -100
    hf_loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.float()
    shift_logits = logits[:, :-1, :]
    shift_labels = labels[:, 1:]
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), ignore_index=-100, reduction="none"
    ).reshape(shift_labels.shape)
    valid = shift_labels != -100
    per_row = (nll * valid).sum(1) / valid.sum(1)
    # HF's loss is the mean over all non-ignored tokens of the batch; check we agree on the definition.
    mine = (nll * valid).sum() / valid.sum()
    assert torch.allclose(mine, hf_loss, rtol=1e-6, atol=0), (mine, hf_loss)
    return {
        "input_ids": input_ids.contiguous(),
        "attention_mask": attention_mask.contiguous(),
        "logits": logits.contiguous(),
        "loss_per_row": per_row.float().contiguous(),
        "loss": hf_loss.reshape(()).contiguous(),
    }


@torch.no_grad()
def compute_score(model, tok: Tokenizer) -> dict:
    per_row = []
    total = 0.0
    count = 0
    for text in SCORE_TEXTS:
        ids = tok.encode(text, add_special_tokens=True).ids
        x = torch.tensor([ids], dtype=torch.int64)
        logits = model(input_ids=x).logits.float()[0]
        nll = F.cross_entropy(logits[:-1], x[0, 1:], reduction="none")
        n = len(ids) - 1
        s = float(nll.double().sum())
        per_row.append({"tokens": n, "loss": s / n})
        total += s
        count += n
    mean = total / count
    return {"rows": len(SCORE_TEXTS), "tokens": count, "mean_loss": mean, "perplexity": math.exp(mean), "per_row": per_row}


def rel_change(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


@torch.no_grad()
def feature_checks(fam: dict, folder: Path, model, ref: dict) -> dict:
    """Turn each exercised feature off and measure how much the logits move (max|d| / max|logits|).
    Every value must be far above the 1e-4 parity tolerance, or the fixture would not test the feature."""
    name = fam["name"]
    x, m, base = ref["input_ids"], ref["attention_mask"], ref["logits"]

    def with_config(**changes):
        cfg = AutoConfig.from_pretrained(str(folder))
        for k, v in changes.items():
            setattr(cfg, k, v)
        alt = load_eager(folder, config=cfg)
        return alt(input_ids=x, attention_mask=m).logits.float()

    def with_weights(fn):
        alt = load_eager(folder)
        fn(alt)
        return alt(input_ids=x, attention_mask=m).logits.float()

    def rope_default(rp):
        return {"rope_type": "default", "rope_theta": rp["rope_theta"]}

    checks = {}
    if name == "llama":
        cfg = AutoConfig.from_pretrained(str(folder))
        checks["llama3_rope_scaling"] = rel_change(base, with_config(rope_parameters=rope_default(cfg.rope_parameters)))
    elif name == "llama-tied":
        checks["head_dim_rope_theta"] = rel_change(
            base, with_config(rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        )
    elif name == "mistral":
        checks["sliding_window"] = rel_change(base, with_config(sliding_window=None))
    elif name == "phi3":
        checks["sliding_window"] = rel_change(base, with_config(sliding_window=None))

        def swap_gate_up(mm):
            # gate and up exchanged: the reading order of the fused rows matters
            for layer in mm.model.layers:
                w = layer.mlp.gate_up_proj.weight
                w.copy_(torch.cat(w.chunk(2, 0)[::-1], 0))

        checks["gate_up_order"] = rel_change(base, with_weights(swap_gate_up))
    elif name == "qwen2":

        def zero_bias(mm):
            for n_, p in mm.named_parameters():
                if n_.endswith(".bias"):
                    p.zero_()

        checks["qkv_bias"] = rel_change(base, with_weights(zero_bias))
    elif name == "qwen3":

        def unit_qk_norm(mm):
            for n_, p in mm.named_parameters():
                if n_.endswith("q_norm.weight") or n_.endswith("k_norm.weight"):
                    p.fill_(1.0)

        checks["qk_norm_weights"] = rel_change(base, with_weights(unit_qk_norm))
    elif name == "gemma2":
        checks["attn_logit_softcapping"] = rel_change(base, with_config(attn_logit_softcapping=None))
        checks["final_logit_softcapping"] = rel_change(base, with_config(final_logit_softcapping=None))
        checks["sliding_window"] = rel_change(base, with_config(sliding_window=64))
        checks["query_pre_attn_scalar"] = rel_change(base, with_config(query_pre_attn_scalar=16))
        sdpa = AutoModelForCausalLM.from_pretrained(str(folder), attn_implementation="sdpa", dtype=torch.float32).eval()
        checks["sdpa_instead_of_eager"] = rel_change(base, sdpa(input_ids=x, attention_mask=m).logits.float())
    elif name == "gemma3":
        cfg = AutoConfig.from_pretrained(str(folder))
        rp = json.loads(json.dumps(cfg.rope_parameters))
        rp_nolinear = dict(rp, full_attention=rope_default(rp["full_attention"]))
        checks["linear_rope_scaling_on_full"] = rel_change(base, with_config(rope_parameters=rp_nolinear))
        rp_local = dict(rp, sliding_attention={"rope_type": "default", "rope_theta": 1000000.0})
        checks["rope_local_base_freq"] = rel_change(base, with_config(rope_parameters=rp_local))
        checks["sliding_window"] = rel_change(base, with_config(sliding_window=64))

        def unit_qk_norm(mm):
            for n_, p in mm.named_parameters():
                if n_.endswith("q_norm.weight") or n_.endswith("k_norm.weight"):
                    p.zero_()

        checks["qk_norm_weights"] = rel_change(base, with_weights(unit_qk_norm))
    elif name == "gemma3n":
        checks["activation_sparsity"] = rel_change(base, with_config(activation_sparsity_pattern=[0.0] * 6))
        # the Gemma3nTextConfig field is a plain float (None is rejected): a huge cap is the identity here
        checks["final_logit_softcapping"] = rel_change(base, with_config(final_logit_softcapping=1e9))
        checks["sliding_window"] = rel_change(base, with_config(sliding_window=64))
        # Shared layers read the producer's K/V with and without a cache (docs/model-math.md §1.6, transformers 5.17).
        with_cache = model(input_ids=x, attention_mask=m, use_cache=True).logits.float()
        no_cache = model(input_ids=x, attention_mask=m, use_cache=False).logits.float()
        assert torch.equal(with_cache, no_cache), "gemma3n: use_cache changes the logits"
        checks["use_cache_true_vs_false"] = rel_change(with_cache, no_cache)
    for k, v in checks.items():
        if k in ("use_cache_true_vs_false",):
            continue
        assert v > 1e-2, f"{name}: feature check {k} moved the logits by only {v:.3g}"
    return checks


def check_autotokenizer(folder: Path, tok: Tokenizer) -> bool:
    """docs/model-math.md §6: AutoTokenizer may differ from the folder's tokenizer.json; record whether it does here."""
    try:
        at = AutoTokenizer.from_pretrained(str(folder))
    except Exception as e:  # pragma: no cover - informational only
        return f"AutoTokenizer failed: {type(e).__name__}"
    for t in REF_TEXTS + SCORE_TEXTS:
        if at(t, add_special_tokens=True)["input_ids"] != tok.encode(t, add_special_tokens=True).ids:
            return False
    return True


# ---------------------------------------------------------------------------
# bitsandbytes 4-bit
# ---------------------------------------------------------------------------


def unpack_nibbles(codes: np.ndarray, n: int) -> np.ndarray:
    b = codes.reshape(-1).astype(np.uint8)
    out = np.empty(b.size * 2, dtype=np.uint8)
    out[0::2] = b >> 4  # first element: HIGH nibble (docs/model-math.md §4.3)
    out[1::2] = b & 0xF
    return out[:n]


def effective_absmax(state) -> np.ndarray:
    if state.nested:
        q = state.absmax.numpy().astype(np.int64)
        code2 = state.state2.code.numpy().astype(np.float32)
        a2 = state.state2.absmax.numpy().astype(np.float32)
        blk = np.arange(q.size) // state.state2.blocksize
        return (code2[q] * a2[blk] + np.float32(state.offset.item())).astype(np.float32)
    return state.absmax.numpy().astype(np.float32)


def verify_4bit(inp: torch.Tensor, packed: torch.Tensor, state, deq: torch.Tensor) -> dict:
    """Independent numpy re-derivation of the docs/model-math.md §4.3 layout and math; returns mismatch counts."""
    x = inp.float().reshape(-1).numpy()
    n = x.size
    bs = state.blocksize
    qmap = state.code.numpy().astype(np.float32)
    nib = unpack_nibbles(packed.numpy(), n)
    amax_eff = effective_absmax(state)
    blk = np.arange(n) // bs
    # dequant: w_i = quant_map[nibble_i] * absmax_{i // 64}, in f32, then cast to the input dtype
    mine = torch.from_numpy((qmap[nib] * amax_eff[blk]).astype(np.float32)).to(inp.dtype).float().numpy()
    deq_np = deq.float().reshape(-1).numpy()
    dequant_mismatch = int(np.sum(mine.view(np.uint32) != deq_np.view(np.uint32)))
    # quantize: per block absmax (f32), x * (1/absmax), nearest table entry, ties to the lower table index
    nblocks = -(-n // bs)
    raw_amax = np.array([np.abs(x[i * bs : (i + 1) * bs]).max() for i in range(nblocks)], dtype=np.float32)
    codes = np.empty(n, dtype=np.uint8)
    sorted_idx = np.argsort(qmap, kind="stable")
    for i in range(nblocks):
        seg = x[i * bs : (i + 1) * bs]
        a = raw_amax[i]
        inv = np.float32(1.0) / max(a, np.float32(1e-38))
        s = np.clip(seg * inv, -1, 1).astype(np.float32)
        d = np.abs(s[:, None] - qmap[sorted_idx][None, :])
        codes[i * bs : i * bs + seg.size] = sorted_idx[np.argmin(d, axis=1)]
    value_mismatch = int(np.sum(qmap[codes] != qmap[nib]))  # compare values (FP4 has +0 and -0 codes)
    code_mismatch = int(np.sum(codes != nib))
    pad_nibble = int(packed.numpy().reshape(-1)[-1] & 0xF) if n % 2 else None
    return {
        "dequant_bit_mismatches": dequant_mismatch,
        "requantize_value_mismatches": value_mismatch,
        "requantize_code_mismatches": code_mismatch,
        "odd_padding_low_nibble": pad_nibble,
        "blocks": nblocks,
        "nested_blocks": int(state.state2.absmax.numel()) if state.nested else 0,
        "raw_absmax_max_abs_err": float(np.abs(amax_eff - raw_amax).max()),
    }


def dequantize_flat(packed: torch.Tensor, state) -> torch.Tensor:
    """bitsandbytes.functional.dequantize_4bit with the state's shape flattened to 1-D, reshaped back.

    bnb 0.50.2's native CPU dequantize_4bit kernel (used when shape[-1] is even) indexes absmax as
    row * (shape[-1] // blocksize) + col // blocksize, i.e. it assumes blocks never span rows. For a weight whose
    row length is not a multiple of the blocksize (e.g. [64, 96]) that picks the wrong absmax for most elements.
    quantize_4bit (and CUDA) use row-major blocks of 64 consecutive elements that do span rows (docs/model-math.md §4.3);
    with a 1-D shape the CPU kernel sees a single row and is correct."""
    flat = copy.copy(state)
    flat.shape = torch.Size([state.shape.numel()])
    return bnbf.dequantize_4bit(packed, flat).reshape(state.shape)


def bnb_inputs() -> dict[str, torch.Tensor]:
    g = gen("bnb", "inputs")
    a = torch.randn(64, 96, generator=g) * 0.1
    a[3, 5] = 1.5  # an outlier so one block has a much larger absmax than the others
    b = (torch.randn(33, 17, generator=g) * 2.0).to(torch.bfloat16)
    c = torch.randn(300, 64, generator=g) * torch.linspace(0.01, 3.0, 300).unsqueeze(1)  # absmax spread over decades
    z = torch.randn(2, 64, generator=g)
    z[0].zero_()  # an all-zero block (docs/model-math.md §6: some shared-layer weights are all zero)
    return {"f32_64x96": a, "bf16_33x17": b, "f32_300x64": c, "f32_zero_block_2x64": z}


def gen_bnb(out: Path) -> dict:
    tensors = {}
    report = {}
    for iname, inp in bnb_inputs().items():
        for qt in ("nf4", "fp4"):
            for cs in (True, False):
                case = f"{iname}_{qt}_{'dq' if cs else 'nodq'}"
                packed, st = bnbf.quantize_4bit(inp, blocksize=64, compress_statistics=cs, quant_type=qt)
                deq = dequantize_flat(packed, st)
                assert deq.dtype == inp.dtype and deq.shape == inp.shape
                # bnb's own pure-PyTorch reference kernel must agree bit for bit
                ref_impl = _dequantize_4bit_compute(
                    packed.reshape(-1), torch.from_numpy(effective_absmax(st)), st.code, 64, tuple(inp.shape), inp.dtype
                )
                assert torch.equal(ref_impl.view(torch.int16 if inp.dtype == torch.bfloat16 else torch.int32),
                                   deq.view(torch.int16 if inp.dtype == torch.bfloat16 else torch.int32)), case
                native = bnbf.dequantize_4bit(packed, st).reshape(inp.shape)
                rep = verify_4bit(inp, packed, st, deq)
                rep["native_cpu_kernel_mismatches"] = int((native.float() != deq.float()).sum())
                assert rep["dequant_bit_mismatches"] == 0, (case, rep)
                assert rep["requantize_value_mismatches"] == 0, (case, rep)
                report[case] = rep
                tensors[f"{case}.input"] = inp.clone().contiguous()
                tensors[f"{case}.codes"] = packed.contiguous()
                tensors[f"{case}.absmax"] = st.absmax.contiguous()
                tensors[f"{case}.quant_map"] = st.code.float().contiguous()
                tensors[f"{case}.absmax_dequant"] = torch.from_numpy(effective_absmax(st)).contiguous()
                if cs:
                    tensors[f"{case}.nested_absmax"] = st.state2.absmax.float().contiguous()
                    tensors[f"{case}.nested_quant_map"] = st.state2.code.float().contiguous()
                    tensors[f"{case}.offset"] = st.offset.float().reshape(()).contiguous()
                packed_dict = st.as_dict(packed=True)
                tensors[f"{case}.quant_state"] = packed_dict[f"quant_state.bitsandbytes__{qt}"].contiguous()
                tensors[f"{case}.dequant"] = deq.float().contiguous()
    (out / "bnb").mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "bnb" / "quant.safetensors"), metadata={"generator": "scripts/gen_fixtures.py"})
    write_text(out / "bnb" / "checks.json", dumps(report))
    return report


def dequantized_state_dict(folder: Path):
    """Load a bnb-4bit model.safetensors and dequantize every quantized Linear with
    bitsandbytes.functional.dequantize_4bit (docs/model-math.md §6: CPU Linear4bit.forward can fail)."""
    sd = load_file(str(folder / "model.safetensors"))
    quantized = sorted(k[: -len(".quant_state.bitsandbytes__nf4")] for k in sd if k.endswith(".quant_state.bitsandbytes__nf4"))
    out = {}
    consumed = set()
    layout = {}
    for w in quantized:
        parts = {k[len(w) + 1 :]: v for k, v in sd.items() if k.startswith(w + ".")}
        consumed.update(w + "." + k for k in parts)
        qs = bnbf.QuantState.from_dict(dict(parts), device=torch.device("cpu"))
        deq = dequantize_flat(sd[w], qs).float()
        # re-derive with numpy as a cross-check of the on-disk layout
        n = deq.numel()
        nib = unpack_nibbles(sd[w].numpy(), n)
        mine = qs.code.numpy()[nib] * effective_absmax(qs)[np.arange(n) // qs.blocksize]
        assert np.array_equal(mine.astype(np.float32), deq.reshape(-1).numpy()), w
        out[w] = deq
        consumed.add(w)
        layout[w] = {
            "shape": list(qs.shape),
            "weight": [str(sd[w].dtype).replace("torch.", ""), list(sd[w].shape)],
            "absmax": [str(sd[w + ".absmax"].dtype).replace("torch.", ""), list(sd[w + ".absmax"].shape)],
            "quant_state": bytes(sd[w + ".quant_state.bitsandbytes__nf4"].tolist()).decode(),
        }
    for k, v in sd.items():
        if k not in consumed:
            out[k] = v
    return out, quantized, layout


# ---------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------


def num_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def write_reference(folder: Path, fam_name: str, ref: dict, tok: Tokenizer, extra: dict) -> dict:
    save_file(ref, str(folder / "reference.safetensors"), metadata={"generator": "scripts/gen_fixtures.py"})
    ids = ref["input_ids"].tolist()
    mask = ref["attention_mask"].tolist()
    info = {
        "family": fam_name,
        "texts": REF_TEXTS,
        "note": "row 0 = first 12 tokens of texts[0]; row 1 = first 9 tokens of texts[1] then 3 pad tokens (attention_mask 0). "
        "Tokens from the `tokenizers` library, encode(text, add_special_tokens=True), on this folder's tokenizer.json.",
        "input_ids": ids,
        "attention_mask": mask,
        "tokens": [[tok.id_to_token(i) for i in row] for row in ids],
        "decoded": [tok.decode([i for i, mm in zip(row, mr) if mm], skip_special_tokens=False) for row, mr in zip(ids, mask)],
        "loss": float(ref["loss"]),
        "loss_per_row": [float(v) for v in ref["loss_per_row"]],
        "logits_shape": list(ref["logits"].shape),
        "versions": {k: VERSIONS[k] for k in sorted(VERSIONS)},
    }
    info.update(extra)
    write_text(folder / "reference.json", dumps(info))
    return info


def gen_family(out: Path, fam: dict, toks: dict) -> dict:
    folder = out / "models" / fam["name"]
    folder.mkdir(parents=True, exist_ok=True)
    variant = fam["tokenizer"]
    tok = toks[variant]
    ids = token_ids(tok, variant)
    cfg = make_config(fam, ids)
    cls = getattr(transformers, fam["arch"])
    torch.manual_seed(seed_for(fam["name"], "from_config"))
    model = cls._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    init_weights(model, fam)
    model.eval()
    model.save_pretrained(str(folder), safe_serialization=True)
    if fam["config_style"] == "hub":
        raw = json.loads((folder / "config.json").read_text())
        write_text(folder / "config.json", json.dumps(hub_style_config(raw), indent=2, sort_keys=True) + "\n")
    write_tokenizer_files(folder, variant, tok)

    # Everything below uses the model re-loaded from the folder, so the files as written are what is tested.
    reloaded = load_eager(folder)
    assert_same_state(model, reloaded)
    assert reloaded.config.rope_parameters == model.config.rope_parameters, (
        reloaded.config.rope_parameters,
        model.config.rope_parameters,
    )
    x, m = reference_batch(tok, ids["pad"])
    ref = compute_reference(reloaded, x, m)
    checks = feature_checks(fam, folder, reloaded, ref)
    score = compute_score(reloaded, tok)
    write_text(folder / "score.json", dumps(score))
    saved_keys = sorted(load_file(str(folder / "model.safetensors")).keys())
    extra = {
        "architecture": fam["arch"],
        "config_style": fam["config_style"],
        "exercises": fam["exercises"],
        "num_params": num_params(reloaded),
        "tokenizer_variant": variant,
        "special_token_ids": ids,
        "autotokenizer_agrees": check_autotokenizer(folder, tok),
        "feature_checks_rel_logit_change": checks,
        "safetensors_keys": saved_keys,
    }
    info = write_reference(folder, fam["name"], ref, tok, extra)
    return {"family": fam["name"], "params": info["num_params"], "loss": info["loss"], "score_mean_loss": score["mean_loss"]}


def load_bnb4(src: Path):
    """`src` loaded by transformers as a bitsandbytes NF4 + double-quant model (fp32 compute, CPU)."""
    qcfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    return AutoModelForCausalLM.from_pretrained(
        str(src), quantization_config=qcfg, device_map="cpu", dtype=torch.float32, attn_implementation="eager"
    )


def gen_bnb_model(out: Path, toks: dict) -> dict:
    src = out / "models" / "llama"
    folder = out / "models" / "llama-bnb4"
    folder.mkdir(parents=True, exist_ok=True)
    fam = FAMILY_BY_NAME["llama"]
    variant = fam["tokenizer"]
    tok = toks[variant]
    ids = token_ids(tok, variant)
    qmodel = load_bnb4(src)
    qmodel.save_pretrained(str(folder), safe_serialization=True)
    write_tokenizer_files(folder, variant, tok)
    del qmodel

    sd, quantized, layout = dequantized_state_dict(folder)
    cfg = AutoConfig.from_pretrained(str(folder))
    del cfg.quantization_config
    cfg._attn_implementation = "eager"
    plain = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    plain.load_state_dict(sd, strict=True)
    plain.eval()
    x, m = reference_batch(tok, ids["pad"])
    ref = compute_reference(plain, x, m)
    base = load_file(str(src / "reference.safetensors"))["logits"]
    score = compute_score(plain, tok)
    write_text(folder / "score.json", dumps(score))
    raw_cfg = json.loads((folder / "config.json").read_text())
    extra = {
        "architecture": "LlamaForCausalLM",
        "config_style": "v5",
        "exercises": "the `llama` model saved by transformers with BitsAndBytesConfig(load_in_4bit, nf4, double quant, compute fp32) on CPU; "
        "reference = every quantized weight dequantized with bitsandbytes.functional.dequantize_4bit into a plain fp32 LlamaForCausalLM",
        "num_params_dequantized": num_params(plain),
        "tokenizer_variant": variant,
        "special_token_ids": ids,
        "quantization_config": raw_cfg.get("quantization_config"),
        "quantized_tensors": quantized,
        "unquantized_tensors": sorted(k for k in sd if k not in quantized),
        "quantized_layout": layout,
        "feature_checks_rel_logit_change": {"quantization_error_vs_llama": rel_change(base, ref["logits"])},
        "safetensors_keys": sorted(load_file(str(folder / "model.safetensors")).keys()),
    }
    info = write_reference(folder, "llama-bnb4", ref, tok, extra)
    return {"family": "llama-bnb4", "params": info["num_params_dequantized"], "loss": info["loss"], "score_mean_loss": score["mean_loss"]}


# What this script writes under tests/fixtures/; grads/ (scripts/grad_parity.py) and plan/
# (scripts/bench/make_model.py) belong to other scripts and are never touched or listed here.
OWNED = ("README.md", "bnb", "models", "score", "tokenizers")


def owned_files(root: Path) -> list[Path]:
    files = []
    for name in OWNED:
        p = root / name
        files += [p] if p.is_file() else sorted(q for q in p.rglob("*") if q.is_file())
    return sorted(files)


def file_table(out: Path) -> list[tuple[str, int, str]]:
    rows = []
    for p in owned_files(out):
        if p.is_file():
            rows.append((p.relative_to(out).as_posix(), p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()))
    return rows


def write_readme(out: Path, summary: list[dict], bnb_report: dict, merges: list, toks: dict) -> None:
    fam_rows = "\n".join(
        f"| `{s['family']}` | {s['arch']} | {s['params']:,} | {s['loss']:.6f} | {s['score_mean_loss']:.6f} | {s['exercises']} |"
        for s in summary
    )
    tok_rows = "\n".join(
        f"| `{v}` | {', '.join(f'`{t}`={toks[v].token_to_id(t)}' for t in spec['specials'])} | "
        f"{'`' + spec['bos'] + '` prepended' if spec['add_bos'] else 'nothing added'} | `{spec['eos']}` | `{spec['pad']}` |"
        for v, spec in TOKENIZER_VARIANTS.items()
    )
    case_names = sorted(bnb_report)
    text = f"""# Test fixtures (generated)

**Do not edit by hand.** Everything here is written by `scripts/gen_fixtures.py`; regenerate with

```
{REGEN_CMD}            # rewrite tests/fixtures/
{REGEN_CMD} --check    # regenerate in a temp dir and fail on any byte difference
```

Pinned versions (the script refuses to run with others; `{INSTALL_HINT}`):
{chr(10).join(f'- {k} {VERSIONS[k]}' for k in sorted(VERSIONS))}

All numbers come from HF transformers on CPU in fp32 with `attn_implementation="eager"` (the SDPA path drops
Gemma 2's attention softcap), single-threaded, `torch.use_deterministic_algorithms(True)`. Re-running on the same
machine gives byte-identical files; a different CPU may change the last bits of the fp32 references (well inside the
1e-4 relative tolerance the Rust tests use). Seeds: `SEED = {SEED}`, one `torch.Generator` per tensor seeded from
sha256(SEED, family, tensor name).

## Tokenizers (`tokenizers/<variant>/`, copied into each model folder)

Byte-level BPE built with the `tokenizers` library: ids 0..255 are the 256 bytes (GPT-2 byte-to-unicode alphabet,
id = byte value), ids 256..{255 + len(set(a + b for a, b in merges))} are {len(merges)} merges learned greedily (most frequent
pair, ties by smallest pair) from a short English paragraph in the script, then the special tokens. Pre-tokenizer
ByteLevel(add_prefix_space=false, GPT-2 regex), decoder ByteLevel, no normalizer. `tokenizer_config.json` has
bos/eos/pad and a chat template (ChatML, or Gemma turns for the `gemma` variant); `chat_example.json` (only under
`tokenizers/`) has a conversation rendered by transformers' `apply_chat_template` and its ids.

| variant | special tokens | encode(add_special_tokens=True) | eos | pad |
| --- | --- | --- | --- | --- |
{tok_rows}

Compute token ids with the `tokenizers` library (Rust: the `tokenizers` crate) on the folder's `tokenizer.json`.
`reference.json` records in `autotokenizer_agrees` whether `transformers.AutoTokenizer` gives the same ids.

## Models (`models/<family>/`)

Each folder: `config.json`, `generation_config.json`, `model.safetensors` (fp32, `save_pretrained`),
`tokenizer.json`, `tokenizer_config.json`, `reference.safetensors`, `reference.json`, `score.json`.
Weights are random with std 0.2 (not HF's 0.02) so logits differ a lot between positions; every norm weight,
bias and scale is random and non-trivial (`w` in [0.5, 1.5] for `w·x` norms, `w` in [-0.5, 0.5] for Gemma's
`(1+w)·x` norms, unless noted).

`config_style`: `hub` folders have `config.json` rewritten from transformers-5's `rope_parameters` into the
`rope_theta` / `rope_scaling` (/ `rope_local_base_freq`) / `torch_dtype` fields found in most Hub checkpoints;
`v5` folders keep what transformers 5.17 writes (`rope_parameters`, per layer type for Gemma 3n, and `dtype`). A
loader must accept both. In both cases the references are computed from the model re-loaded from the folder.

| family | class | params | ref loss | score mean_loss | exercises |
| --- | --- | --- | --- | --- | --- |
{fam_rows}

`reference.safetensors`:
- `input_ids` int64 [2, {T_REF}]: row 0 = first {T_REF} tokens of `texts[0]`; row 1 = first {T_REF - N_PAD} tokens of
  `texts[1]` followed by {N_PAD} pad tokens (right padding).
- `attention_mask` int64 [2, {T_REF}] (0 on the pads). Positions are the default 0..{T_REF - 1} for both rows.
- `logits` fp32 [2, {T_REF}, V]: `model(input_ids, attention_mask).logits` (after any final softcap). Padded query
  positions are included; they attend to the real tokens only.
- `loss_per_row` fp32 [2]: mean token cross-entropy of each row, labels = input_ids shifted by one, pads ignored.
- `loss` fp32 []: HF's own `model(input_ids, attention_mask, labels).loss` with labels = -100 on the pads (= the
  token-weighted mean over both rows, not the mean of the two row losses).

`reference.json`: the texts, ids, token strings, decoded text, losses as decimals, versions, parameter count,
the list of tensor names in `model.safetensors`, and `feature_checks_rel_logit_change`: for each exercised feature,
max|Δlogits|/max|logits| when that feature is switched off (all > 1e-2, i.e. a wrong implementation of it cannot
pass a 1e-4 test).

`score.json` (texts in `score/texts.jsonl`): each row encoded with `encode(text, add_special_tokens=True)`, run
alone (no padding) through the HF model; token i ≥ 1 is predicted from the tokens before it. `tokens` = number of
predicted tokens, `mean_loss` = total NLL / tokens, per-row `loss` = the row's mean NLL, `perplexity` = exp(mean_loss).

### `models/llama-bnb4/`

The `llama` folder loaded with `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)` on CPU and `save_pretrained` (the layout of
unsloth `*-bnb-4bit` repos): per quantized Linear `P.weight` U8 [n/2, 1], `P.weight.absmax` U8, `P.weight.quant_map`
F32 [16], `P.weight.nested_absmax` F32, `P.weight.nested_quant_map` F32 [256],
`P.weight.quant_state.bitsandbytes__nf4` U8 (JSON). Embeddings, norms and `lm_head` stay fp32. `reference.json`
lists `quantized_tensors`, `unquantized_tensors` and each quant_state JSON. The references were computed by
dequantizing every quantized weight with `bitsandbytes.functional.dequantize_4bit` into a plain fp32
`LlamaForCausalLM` (bnb's CPU `Linear4bit.forward` is not used).

## bitsandbytes 4-bit cases (`bnb/quant.safetensors`, `bnb/checks.json`)

`bitsandbytes.functional.quantize_4bit(input, blocksize=64, quant_type=..., compress_statistics=...)` on CPU, then
`dequantize_4bit`. Case name = `<input>_<nf4|fp4>_<dq|nodq>` (`dq` = compress_statistics=True, double quant).
Inputs: `f32_64x96` (fp32, one outlier), `bf16_33x17` (bf16, 561 elements: odd count so the last byte has a padding
low nibble, partial last block of 49), `f32_300x64` (fp32, 300 absmax blocks so double quant has 2 nested blocks of
256), `f32_zero_block_2x64` (fp32, first 64-block all zeros: absmax 0).

Tensors per case `<case>`:
- `<case>.input`: the input (fp32 or bf16, original shape)
- `<case>.codes`: U8 [(n+1)/2, 1], packed codes; element 2j in the HIGH nibble, 2j+1 in the low nibble
- `<case>.absmax`: U8 [blocks] with double quant, else F32 [blocks]
- `<case>.absmax_dequant`: F32 [blocks], the effective absmax (`nested_quant_map[absmax]·nested_absmax[j/256] + offset` for dq)
- `<case>.quant_map`: F32 [16], the NF4 or FP4 table
- `<case>.nested_absmax`: F32 [ceil(blocks/256)] (dq only)
- `<case>.nested_quant_map`: F32 [256], the signed dynamic map (dq only)
- `<case>.offset`: F32 [], mean of the raw absmax (dq only)
- `<case>.quant_state`: U8, the packed quant_state JSON exactly as a checkpoint stores it
- `<case>.dequant`: F32, `dequantize_4bit` output (computed in the input dtype, then widened to f32; shape of input)

Cases: {', '.join(f'`{c}`' for c in case_names)}.

The script re-derives every case in numpy from docs/model-math.md §4.3 and asserts: (1) unpacking with the first element in
the **high** nibble and computing `quant_map[code]·absmax` reproduces `dequantize_4bit` bit for bit (0 mismatches in
every case); (2) re-quantizing (block absmax, `x·(1/absmax)`, nearest table value, ties to the lower value) gives the
same table values for every element. `bnb/checks.json` records the counts. Observed bitsandbytes 0.50.2 (CPU)
behaviour worth knowing:
- The padding nibble of an odd element count is the code of 0.0, not a literal 0: 7 for NF4, 0 for FP4.
- An all-zero block is stored with absmax 0 and codes 7 (NF4) / 0 (FP4); it dequantizes to zeros.
- FP4 has two zero codes (0 = +0, 8 = −0). The CPU quantizer (`bucketize` on the sorted table's midpoints) gives
  code 8 to tiny *positive* values and code 0 to tiny negative ones (CUDA's kernel takes the sign from the input).
  Dequantized values are equal (±0), so compare values, not codes, there (`requantize_code_mismatches` counts these).
- The CPU quantizer multiplies by `1/absmax` in full blocks but divides by absmax in a partial last block.
- bnb's native CPU `dequantize_4bit` kernel (used when shape[-1] is even) assumes 64-blocks never span rows: for
  `[64, 96]` it returns wrong values (`native_cpu_kernel_mismatches` in checks.json). `.dequant` here is computed
  with the state's shape flattened to 1-D (one row), which matches the row-major block layout, bnb's pure-PyTorch
  reference kernel and the numpy re-derivation.

## Score texts (`score/texts.jsonl`)

{len(SCORE_TEXTS)} rows `{{"text": ...}}`, with digits, accented letters, CJK and an emoji.

## Files

| file | bytes | sha256 |
| --- | --- | --- |
{{FILES}}
"""
    rows = file_table(out)
    text = text.replace(
        "{FILES}", "\n".join(f"| `{p}` | {size:,} | `{h[:16]}…` |" for p, size, h in rows if p != "README.md")
    )
    total = sum(size for p, size, _ in rows if p != "README.md")
    text += f"\nTotal (without this README): {total:,} bytes.\n"
    write_text(out / "README.md", text)


def generate(out: Path) -> list[dict]:
    setup_determinism()
    if out.exists() and any(out.iterdir()):
        readme = out / "README.md"
        if not (readme.is_file() and readme.read_text(encoding="utf-8").startswith("# Test fixtures (generated)")):
            sys.exit(f"refusing to replace {out}: it is not empty and has no generated README.md")
        for name in OWNED:
            p = out / name
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)

    merges = learn_merges(BPE_TRAINING_TEXT, N_MERGES)
    toks = {v: build_tokenizer(v, merges) for v in TOKENIZER_VARIANTS}
    for v, tok in toks.items():
        write_tokenizer_files(out / "tokenizers" / v, v, tok)
        write_chat_example(out / "tokenizers" / v, tok)
        assert tok.get_vocab_size(with_added_tokens=True) <= 320

    write_text(
        out / "score" / "texts.jsonl",
        "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in SCORE_TEXTS),
    )

    summary = []
    for fam in FAMILIES:
        print(f"[gen_fixtures] {fam['name']} ...", flush=True)
        s = gen_family(out, fam, toks)
        s.update(arch=fam["arch"], exercises=fam["exercises"])
        summary.append(s)
    print("[gen_fixtures] llama-bnb4 ...", flush=True)
    s = gen_bnb_model(out, toks)
    s.update(arch="LlamaForCausalLM (bnb nf4)", exercises="pre-quantized NF4 + double-quant checkpoint of `llama`")
    summary.append(s)
    print("[gen_fixtures] bnb quantize_4bit cases ...", flush=True)
    bnb_report = gen_bnb(out)
    write_readme(out, summary, bnb_report, merges, toks)
    print("[gen_fixtures] generation references ...", flush=True)
    gen_generation(out, toks)
    print("[gen_fixtures] gemma3n-bnb4 ...", flush=True)
    summary.append(gen_gemma3n_bnb(out, toks))
    return summary


# ---------------------------------------------------------------------------
# Generation references (models/<family>/generate.json), written after README.md so that everything
# above stays byte-identical; `tuner generate` must reproduce these greedy tokens exactly.
# ---------------------------------------------------------------------------

GEN_FAMILIES = ["llama", "llama-tied", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3", "gemma3n"]
GEN_PROMPTS = [
    "The model reads the text and predicts",
    "When the model is right the loss is small; when it is wrong the loss is large.",
]
GEN_NEW_TOKENS = 20
GEN_REPETITION_PENALTY = 1.5


@torch.no_grad()
def hf_greedy(model, rows: list[list[int]], pad_id: int, **kw) -> list[list[int]]:
    """model.generate(do_sample=False) on left-padded rows; each row's new tokens, cut after the first EOS."""
    width = max(len(r) for r in rows)
    input_ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], dtype=torch.int64)
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.int64)
    out = model.generate(
        input_ids=input_ids,
        attention_mask=attention_mask,
        do_sample=False,
        max_new_tokens=GEN_NEW_TOKENS,
        pad_token_id=pad_id,
        **kw,
    )
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    result = []
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in eos), len(row))
        result.append(row[:cut])
    return result


def gen_generation(out: Path, toks: dict) -> None:
    for name in GEN_FAMILIES:
        fam = FAMILY_BY_NAME[name]
        variant = fam["tokenizer"]
        tok = toks[variant]
        ids = token_ids(tok, variant)
        folder = out / "models" / name
        model = load_eager(folder)
        if name == "gemma3n":
            # Greedy picks can land in [vocab_size_per_layer_input, vocab_size), which Gemma3nForCausalLM cannot
            # look up in its per-layer table; map them to row 0 as Gemma3nModel (the multimodal model) does.
            text = model.model
            orig = text.get_per_layer_inputs
            vp = model.config.vocab_size_per_layer_input
            text.get_per_layer_inputs = lambda ids: orig(torch.where((ids >= 0) & (ids < vp), ids, torch.zeros_like(ids)))
        rows = [tok.encode(p, add_special_tokens=True).ids for p in GEN_PROMPTS]
        assert len(rows[0]) != len(rows[1]), "the batch must need padding"
        window = model.config.sliding_window if name == "mistral" or name.startswith("gemma") else None
        assert window is None or min(len(r) for r in rows) > window, "prompts must be longer than the sliding window"
        assert max(len(r) for r in rows) + GEN_NEW_TOKENS <= model.config.max_position_embeddings
        batched = hf_greedy(model, rows, ids["pad"])
        single = [hf_greedy(model, [r], ids["pad"])[0] for r in rows]
        assert batched == single, (name, batched, single)
        penalty = hf_greedy(model, [rows[0]], ids["pad"], repetition_penalty=GEN_REPETITION_PENALTY)[0]
        info = {
            "note": "HF model.generate(do_sample=False, max_new_tokens, pad_token_id) in fp32, eager attention, on the "
            "prompts left-padded into one batch (pad = special_token_ids.pad, attention_mask 0 on the pads); "
            "`generated` = each row's new tokens, cut after the first eos (included). Running each prompt alone gives "
            "the same tokens. `repetition_penalty` = prompt 0 alone with repetition_penalty set.",
            "prompts": GEN_PROMPTS,
            "prompt_ids": rows,
            "max_new_tokens": GEN_NEW_TOKENS,
            "special_token_ids": ids,
            "eos_token_id": model.generation_config.eos_token_id,
            "generated": batched,
            "repetition_penalty": {"penalty": GEN_REPETITION_PENALTY, "prompt": 0, "generated": penalty},
        }
        write_text(folder / "generate.json", dumps(info))


# ---------------------------------------------------------------------------
# models/gemma3n-bnb4: the `gemma3n` model quantized by transformers + bitsandbytes and laid out as a
# Gemma3nForConditionalGeneration checkpoint (the layout of unsloth/gemma-3n-e4b-it-bnb-4bit). Written last so
# that everything above stays byte-identical.
# ---------------------------------------------------------------------------

GEMMA3N_BNB_README = """
### `models/gemma3n-bnb4/` (written after the table above)

The `gemma3n` model loaded with `BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)` on CPU (no skip list, so the tiny AltUp
linears `prediction_coefs` [16, 4], `correction_coefs` [4, 4] and `modality_router` are quantized too) and saved by
`save_pretrained`; then laid out as `Gemma3nForConditionalGeneration` saves it: every key `model.X` becomes
`model.language_model.X`, config.json becomes `{"model_type": "gemma3n", "text_config": {...}, "quantization_config":
{...}}`, and two stand-in tower tensors are added (`model.vision_tower.timm_model.conv_stem.conv.weight`, and a
4-bit `model.audio_tower.conformer.0.ffw_layer_start.ffw_layer_1` with its quant_state keys) that a text decoder must
skip (transformers cannot build the real vision tower here: it needs timm). Reference logits: every quantized weight
dequantized with `bitsandbytes.functional.dequantize_4bit` into a plain fp32 `Gemma3nForCausalLM`, eager attention.
"""


def gen_gemma3n_bnb(out: Path, toks: dict) -> dict:
    src = out / "models" / "gemma3n"
    folder = out / "models" / "gemma3n-bnb4"
    folder.mkdir(parents=True, exist_ok=True)
    fam = FAMILY_BY_NAME["gemma3n"]
    variant = fam["tokenizer"]
    tok = toks[variant]
    ids = token_ids(tok, variant)
    qmodel = load_bnb4(src)
    with tempfile.TemporaryDirectory() as td:
        qmodel.save_pretrained(td, safe_serialization=True)
        del qmodel
        sd, quantized, layout = dequantized_state_dict(Path(td))
        raw = load_file(str(Path(td) / "model.safetensors"))
        text_cfg = json.loads((Path(td) / "config.json").read_text())
    # Re-key to the multimodal layout and add stand-in tower tensors.
    mm = {("model.language_model." + k[len("model."):]) if k.startswith("model.") else k: v for k, v in raw.items()}
    g = gen("gemma3n-bnb4", "towers")
    mm["model.vision_tower.timm_model.conv_stem.conv.weight"] = torch.randn(8, 3, 3, 3, generator=g)
    aud = "model.audio_tower.conformer.0.ffw_layer_start.ffw_layer_1.weight"
    donor = "model.layers.0.mlp.gate_proj.weight"
    for k, v in raw.items():
        if k == donor or k.startswith(donor + "."):
            mm[aud + k[len(donor):]] = v.clone()
    save_file(dict(sorted(mm.items())), str(folder / "model.safetensors"), metadata={"format": "pt"})
    qc = text_cfg.pop("quantization_config")
    text_cfg.pop("architectures", None)
    wrapper = {
        "architectures": ["Gemma3nForConditionalGeneration"],
        "model_type": "gemma3n",
        "text_config": text_cfg,
        "quantization_config": qc,
        "vision_config": {"model_type": "gemma3n_vision", "note": "stand-in: tower not built (needs timm)"},
        "audio_config": {"model_type": "gemma3n_audio", "note": "stand-in: tower not built"},
        "eos_token_id": text_cfg.get("eos_token_id"),
        "pad_token_id": text_cfg.get("pad_token_id"),
        "bos_token_id": text_cfg.get("bos_token_id"),
        "transformers_version": text_cfg.get("transformers_version"),
    }
    write_text(folder / "config.json", json.dumps(wrapper, indent=2, sort_keys=True) + "\n")
    shutil.copy(src / "generation_config.json", folder / "generation_config.json")
    write_tokenizer_files(folder, variant, tok)

    cfg = AutoConfig.from_pretrained(str(src))
    plain = transformers.Gemma3nForCausalLM._from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(sd, strict=False)
    assert list(missing) == ["lm_head.weight"] and not unexpected, (missing, unexpected)
    plain.tie_weights()
    assert plain.lm_head.weight.data_ptr() == plain.model.embed_tokens.weight.data_ptr()
    plain.eval()
    x, m = reference_batch(tok, ids["pad"])
    ref = compute_reference(plain, x, m)
    base = load_file(str(src / "reference.safetensors"))["logits"]
    score = compute_score(plain, tok)
    write_text(folder / "score.json", dumps(score))
    extra = {
        "architecture": "Gemma3nForConditionalGeneration (text tower, bnb nf4)",
        "config_style": "multimodal wrapper with text_config",
        "exercises": "pre-quantized NF4 + double-quant Gemma 3n in the multimodal key layout (model.language_model.*), "
        "quantized AltUp coefficient linears, tower tensors to skip",
        "num_params_dequantized": num_params(plain),
        "tokenizer_variant": variant,
        "special_token_ids": ids,
        "quantization_config": qc,
        "quantized_tensors": ["model.language_model." + k[len("model."):] for k in quantized],
        "quantized_layout": layout,
        "feature_checks_rel_logit_change": {"quantization_error_vs_gemma3n": rel_change(base, ref["logits"])},
        "safetensors_keys": sorted(mm.keys()),
    }
    info = write_reference(folder, "gemma3n-bnb4", ref, tok, extra)
    with open(out / "README.md", "a", encoding="utf-8") as f:
        f.write(GEMMA3N_BNB_README)
    return {"family": "gemma3n-bnb4", "params": info["num_params_dequantized"], "loss": info["loss"], "score_mean_loss": score["mean_loss"]}


def compare_trees(a: Path, b: Path) -> list[str]:
    diffs = []
    fa = {p.relative_to(a).as_posix() for p in owned_files(a)}
    fb = {p.relative_to(b).as_posix() for p in owned_files(b)}
    for p in sorted(fa ^ fb):
        diffs.append(f"only in one tree: {p}")
    for p in sorted(fa & fb):
        if not filecmp.cmp(a / p, b / p, shallow=False):
            diffs.append(f"differs: {p}")
    return diffs


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder (default tests/fixtures)")
    ap.add_argument("--check", action="store_true", help="regenerate into a temp dir and compare with --out")
    args = ap.parse_args()
    if args.check:
        with tempfile.TemporaryDirectory() as td:
            fresh = Path(td) / "fixtures"
            generate(fresh)
            diffs = compare_trees(args.out, fresh)
        if diffs:
            print("\n".join(diffs))
            print(f"[gen_fixtures] {len(diffs)} difference(s) against {args.out}")
            return 1
        print(f"[gen_fixtures] {args.out} is up to date")
        return 0
    summary = generate(args.out)
    rows = file_table(args.out)
    total = sum(size for _, size, _ in rows)
    print()
    print(f"{'family':<12} {'params':>9} {'ref loss':>10} {'score loss':>10}")
    for s in summary:
        print(f"{s['family']:<12} {s['params']:>9,} {s['loss']:>10.6f} {s['score_mean_loss']:>10.6f}")
    print(f"\n{len(rows)} files, {total:,} bytes under {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
