#!/usr/bin/env python3
"""Write tests/fixtures/spm/: two tiny models with SentencePiece tokenizers, for GGUF export/import.

    /root/.cache/tuner/venv/bin/python scripts/gen_spm_fixture.py          # rewrite the fixture
    /root/.cache/tuner/venv/bin/python scripts/gen_spm_fixture.py --check  # regenerate in a temp dir, fail on any byte change

Two SentencePiece BPE models (vocab 512, byte_fallback, identity normalization, no whitespace
collapsing) are trained by sentencepiece on tests/fixtures/spm/corpus.txt (committed, hand-written):

- gemma3/: Gemma's layout: <pad> 0, <eos> 1, <bos> 2, <unk> 3, control <mask> 4, user-defined
  <start_of_turn> 5 / <end_of_turn> 6, add_dummy_prefix false, split_digits. The HF tokenizer is
  transformers' GemmaTokenizer made from that tokenizer.model (add_bos_token) plus one special
  added token beyond the pieces, <image_soft_token> = 512, as Gemma 3 has one at 262144.
  tokenizer_config.json is written in the Hub's (transformers 4.x) layout, with
  `added_tokens_decoder` and a chat template. The model: Gemma3ForCausalLM, vocab_size 520.
- llama/: Llama 2's layout: <unk> 0, <s> 1, </s> 2, add_dummy_prefix true. The HF tokenizer is
  transformers' LlamaTokenizer made from that tokenizer.model plus one non-special added token
  <code> = 512; tokenizer_config.json as transformers 5.17 writes it (no added_tokens_decoder).
  The model: LlamaForCausalLM, vocab_size 516.

Each model folder: config.json, generation_config.json, model.safetensors (random fp32 weights,
torch seeded), tokenizer.model, tokenizer.json, tokenizer_config.json. expected.json holds, per
model, the pieces, scores and types as sentencepiece's own protobuf module decodes them, and per
string the ids of the HF tokenizer as saved (AutoTokenizer on the folder, special tokens added)
and of sentencepiece itself (with BOS prepended), and whether they agree.
"""

import argparse
import filecmp
import importlib.metadata as md
import io
import json
import os
import sys
import tempfile
from pathlib import Path

PINS = {
    "sentencepiece": "0.2.1",
    "transformers": "5.17.0",
    "tokenizers": "0.23.3",
    "torch": "2.11.0",
    "safetensors": "0.8.0",
}
ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "tests/fixtures/spm"
CORPUS = OUT / "corpus.txt"
SEED = 20261203
# Files under OUT that this script does not write.
HAND_WRITTEN = {"corpus.txt", "README.md"}

STRINGS = [
    "Hello world",
    "The café serves crêpes, naïve pastries and coffee at 7:45.",
    "Numbers like 3.14159 and 1,000,000 split digit by digit in Gemma.",
    "  two leading spaces,  double  spaces and a trailing one ",
    "line one\nline two\tafter a tab",
    "emoji 🙂 and 漢字 fall back to bytes",
    "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n",
    "an image: <image_soft_token> and <code>x = 1</code>",
    "",
]

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{{ '<start_of_turn>' + message['role'] + '\\n' + message['content']"
    " + '<end_of_turn>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


def check_pins():
    bad = []
    for name, want in PINS.items():
        try:
            got = md.version(name)
        except md.PackageNotFoundError:
            got = None
        if got is None or got.split("+")[0] != want:
            bad.append(f"  {name}: need {want}, found {got}")
    if bad:
        sys.exit(
            "gen_spm_fixture.py needs the pinned versions (the fixture is their output):\n" + "\n".join(bad)
            + "\nInstall them into the project venv: /root/.cache/tuner/venv/bin/pip install "
            + " ".join(f"{k}=={v}" for k, v in PINS.items())
        )


check_pins()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import sentencepiece as spm  # noqa: E402
from sentencepiece import sentencepiece_model_pb2  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AddedToken,
    AutoTokenizer,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GemmaTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaTokenizer,
)

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()


def piece_table(proto: bytes) -> list:
    """[piece, score, type] per id, decoded by sentencepiece's own protobuf module (the types are
    the proto's, which GGUF shares: normal 1, unknown 2, control 3, user-defined 4, unused 5, byte 6)."""
    m = sentencepiece_model_pb2.ModelProto()
    m.ParseFromString(proto)
    return [[p.piece, p.score, p.type] for p in m.pieces]


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def train_spm(**options) -> bytes:
    """A SentencePiece BPE model trained on the corpus (deterministic: one thread, no sampling)."""
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=buf,
        model_type="bpe",
        vocab_size=512,
        character_coverage=1.0,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        num_threads=1,
        minloglevel=2,
        **options,
    )
    return buf.getvalue()


MODELS = {
    "gemma3": {
        "spm": dict(
            pad_id=0, eos_id=1, bos_id=2, unk_id=3,
            pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
            control_symbols=["<mask>"], user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
            add_dummy_prefix=False, split_digits=True, allow_whitespace_only_pieces=True,
        ),
        "tokenizer": GemmaTokenizer,
        "added": AddedToken("<image_soft_token>", special=True, normalized=False),
        "config": lambda: Gemma3TextConfig(
            vocab_size=520, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, head_dim=16, max_position_embeddings=64, query_pre_attn_scalar=16,
            sliding_window=4, layer_types=["sliding_attention", "full_attention"],
            pad_token_id=0, eos_token_id=1, bos_token_id=2,
        ),
        "model": Gemma3ForCausalLM,
    },
    "llama": {
        "spm": dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1),
        "tokenizer": LlamaTokenizer,
        "added": AddedToken("<code>", special=False, normalized=False),
        "config": lambda: LlamaConfig(
            vocab_size=516, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
            tie_word_embeddings=False,
        ),
        "model": LlamaForCausalLM,
    },
}


def hub_style_config(name: str, saved: dict, added_tokens: list[dict]) -> dict:
    """tokenizer_config.json: gemma3 in the Hub's (transformers 4.x) layout; llama as transformers
    5.17 saves it, without the keys that hold this run's temp paths."""
    if name == "gemma3":
        return {
            "add_bos_token": True,
            "add_eos_token": False,
            "added_tokens_decoder": {
                str(a["id"]): {k: a[k] for k in ("content", "lstrip", "normalized", "rstrip", "single_word", "special")}
                for a in added_tokens
            },
            "bos_token": "<bos>",
            "chat_template": GEMMA_TEMPLATE,
            "clean_up_tokenization_spaces": False,
            "eos_token": "<eos>",
            "model_max_length": 64,
            "pad_token": "<pad>",
            "spaces_between_special_tokens": False,
            "tokenizer_class": "GemmaTokenizer",
            "unk_token": "<unk>",
            "use_default_system_prompt": False,
        }
    cfg = {k: v for k, v in saved.items() if k not in ("vocab_file", "is_local", "local_files_only")}
    cfg["model_max_length"] = 64
    return cfg


def write_model(out: Path, name: str, spec: dict) -> dict:
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    proto = train_spm(**spec["spm"])
    (folder / "tokenizer.model").write_bytes(proto)

    # The HF tokenizer, made by transformers from tokenizer.model, saved, then re-read as users load it.
    with tempfile.TemporaryDirectory() as src, tempfile.TemporaryDirectory() as saved_dir:
        (Path(src) / "tokenizer.model").write_bytes(proto)
        tok = spec["tokenizer"].from_pretrained(src, add_bos_token=True)
        tok.add_tokens([spec["added"]])
        tok.save_pretrained(saved_dir)
        tj = json.loads((Path(saved_dir) / "tokenizer.json").read_text(encoding="utf-8"))
        saved_cfg = json.loads((Path(saved_dir) / "tokenizer_config.json").read_text(encoding="utf-8"))
    (folder / "tokenizer.json").write_text(json.dumps(tj, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(dumps(hub_style_config(name, saved_cfg, tj["added_tokens"])), encoding="utf-8")

    torch.manual_seed(SEED)
    model = spec["model"](spec["config"]()).eval()
    model.save_pretrained(folder, safe_serialization=True)

    hf = AutoTokenizer.from_pretrained(folder)
    sp = spm.SentencePieceProcessor(model_proto=proto)
    rows = []
    for s in STRINGS:
        hf_ids = hf.encode(s)
        sp_ids = [sp.bos_id()] + sp.encode(s)
        rows.append({"text": s, "hf": hf_ids, "sentencepiece": sp_ids, "agree": hf_ids == sp_ids})
    return {
        "pieces": sp.get_piece_size(),
        "table": piece_table(proto),
        "vocab_size": model.config.vocab_size,
        "special": {"bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id()},
        "added": {a["content"]: a["id"] for a in tj["added_tokens"] if a["id"] >= sp.get_piece_size()},
        "strings": rows,
    }


def generate(out: Path) -> None:
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    expected = {name: write_model(out, name, spec) for name, spec in MODELS.items()}
    (out / "expected.json").write_text(dumps(expected), encoding="utf-8")


def written(root: Path) -> list[str]:
    return sorted(
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name not in HAND_WRITTEN
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="regenerate in a temp dir and compare bytes")
    args = ap.parse_args()
    if not CORPUS.is_file():
        sys.exit(f"{CORPUS} is missing: it is the committed training text")
    if args.check:
        with tempfile.TemporaryDirectory() as d:
            fresh = Path(d)
            generate(fresh)
            a, b = written(fresh), written(OUT)
            diffs = [f"only in one tree: {p}" for p in sorted(set(a) ^ set(b))]
            diffs += [f"differs: {p}" for p in sorted(set(a) & set(b)) if not filecmp.cmp(fresh / p, OUT / p, shallow=False)]
        if diffs:
            sys.exit("\n".join(diffs) + f"\n{len(diffs)} difference(s) against {OUT.relative_to(ROOT)}")
        print(f"{OUT.relative_to(ROOT)}: identical ({len(a)} files)")
        return
    generate(OUT)
    files = written(OUT)
    total = sum((OUT / p).stat().st_size for p in files)
    print(f"wrote {len(files)} files ({total:,} bytes) under {OUT.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
