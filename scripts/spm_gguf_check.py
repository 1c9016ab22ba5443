#!/usr/bin/env python3
"""Read a GGUF file's SentencePiece (`llama`) vocabulary with gguf-py and tokenize with transformers' GGUF loader.

Used by tests/gguf_spm.rs; run with the bootstrap venv's python, ~/.cache/tuner/venv (gguf==0.17.1,
transformers==5.17.0, as pinned in scripts/bootstrap):

  spm_gguf_check.py FILE --texts TEXTS.json

Prints one JSON object:
- `metadata`: every `tokenizer.*` key/value as gguf-py's GGUFReader reads it (arrays in full);
- `transformers`: `{"ids": [...]}`, one list per text of TEXTS.json (a JSON list of strings),
  from `AutoTokenizer.from_pretrained(folder, gguf_file=name)` with special tokens added, or
  `{"error": "..."}` when transformers cannot build a tokenizer from this file. transformers
  builds its own tokenizer from the GGUF keys (for `llama` files a BPE with merges made from
  the scores; for Gemma architectures a Unigram over the pieces), so its ids are a check of
  the keys, not of tuner's importer.
"""

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import gguf  # noqa: E402
from gguf_inspect import plain  # noqa: E402  (scripts/ is on sys.path when run as a script)


def transformers_ids(path: Path, texts: list[str]) -> dict:
    try:
        import transformers
        from transformers import AutoTokenizer

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        return {"class": type(tok).__name__, "ids": [tok.encode(t) for t in texts]}
    except Exception as e:  # reported, not raised: which files transformers reads is part of the answer
        return {"error": f"{type(e).__name__}: {e}"}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", type=Path)
    ap.add_argument("--texts", type=Path, required=True, help="a JSON list of strings to tokenize")
    args = ap.parse_args()
    texts = json.loads(args.texts.read_text(encoding="utf-8"))
    reader = gguf.GGUFReader(args.file)
    meta = {name: plain(field.contents()) for name, field in reader.fields.items() if name.startswith("tokenizer.")}
    json.dump({"metadata": meta, "transformers": transformers_ids(args.file.resolve(), texts)}, sys.stdout)


if __name__ == "__main__":
    main()
