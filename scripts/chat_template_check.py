"""Render conversations through an HF folder's chat template with transformers, for tests/export.rs.

Usage: chat_template_check.py FOLDER CASES.json
CASES.json is a list of {"messages": [{"role", "content"}...], "add_generation_prompt": bool};
prints a JSON list of the rendered strings (`AutoTokenizer.apply_chat_template(tokenize=False)`).
"""
import json
import sys

from transformers import AutoTokenizer


def main() -> None:
    folder, cases_file = sys.argv[1], sys.argv[2]
    tok = AutoTokenizer.from_pretrained(folder)
    with open(cases_file, encoding="utf-8") as f:
        cases = json.load(f)
    out = [
        tok.apply_chat_template(c["messages"], tokenize=False, add_generation_prompt=c["add_generation_prompt"])
        for c in cases
    ]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
