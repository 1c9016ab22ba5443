"""Learning rates of transformers' schedules, step by step, for tests/schedule.rs.

Writes tests/fixtures/schedule/transformers_lr.json: for each case, the lr every optimizer step
0..total-1 uses (LambdaLR's value before each scheduler.step(), as Trainer steps them), from
transformers.get_scheduler with the warmup that TrainingArguments.get_warmup_steps gives.
Run with the pinned versions of scripts/bootstrap (transformers 5.17.0, torch 2.11):

    /root/.cache/tuner/venv/bin/python scripts/gen_schedule_fixture.py
"""

import json
import pathlib

import torch
import transformers
from transformers import TrainingArguments, get_scheduler

BASE = 2e-4
CASES = [
    # name, lr_scheduler_type, warmup_steps (int steps, or a float < 1: the ratio), total, scheduler kwargs
    ("linear_warmup4", "linear", 4, 20, {}),
    ("cosine_warmup3", "cosine", 3, 17, {}),
    ("constant_with_warmup5", "constant_with_warmup", 5, 12, {}),
    ("cosine_min_lr_rate", "cosine_with_min_lr", 3, 25, {"min_lr_rate": 0.1}),
    ("cosine_min_lr", "cosine_with_min_lr", 0, 10, {"min_lr": 5e-5}),
    ("cosine_min_lr_ratio_warmup", "cosine_with_min_lr", 0.1, 37, {"min_lr_rate": 0.25}),
    ("linear_ratio", "linear", 0.03, 101, {}),
]


def main():
    out = {"transformers": transformers.__version__, "torch": torch.__version__, "base_lr": BASE, "cases": []}
    for name, kind, warmup, total, kwargs in CASES:
        args = TrainingArguments(output_dir="/tmp/unused", warmup_steps=warmup, report_to=[])
        steps = args.get_warmup_steps(total)
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=BASE)
        sched = get_scheduler(kind, opt, num_warmup_steps=steps, num_training_steps=total, scheduler_specific_kwargs=kwargs)
        lrs = []
        for _ in range(total):
            lrs.append(sched.get_last_lr()[0])
            opt.step()
            sched.step()
        out["cases"].append(
            {"name": name, "kind": kind, "warmup": warmup, "warmup_steps": steps, "total": total, "kwargs": kwargs, "lrs": lrs}
        )
    path = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/schedule/transformers_lr.json"
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
