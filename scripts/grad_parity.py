#!/usr/bin/env python3
"""First-step LoRA gradients of tuner (`tuner grads`) against HF transformers + peft.

Two modes:

  gpu       build random-init models of every family in several ways, a random nonzero LoRA adapter and
            alpaca-shaped rows; run `tuner grads` and HF+peft on the same model, adapter, rows and pad id;
            compare the gradients module by module. Meant for the H200 machine (bf16, CUDA):

                python3 scripts/grad_parity.py gpu [--tuner .device/tuner] [--families llama,gemma3n]
                        [--inits hf_default,make_model] [--shapes small,e4b] [--fp32-ref all|small|none]

            On the CPU (exact math): --device cpu --dtype fp32 --shapes small
            --tuner /root/.cache/tuner/target/release/tuner. --hf-only skips tuner (a smoke test of the HF side).
            Measured: the default gpu run (36 small cases + 3 E4B, fp32 references included) takes ~135 s on the H200
            (each E4B model is built, saved as ~16 GB of bf16 and deleted once both sides have read it); the small
            cases in fp32 on this 2-core CPU take ~1 minute idle (~4 minutes beside a cargo build).

            Shapes: `small` = a toy config per family (llama, qwen2 and gemma3n are make_model.py's --tiny shapes);
            `e4b` = Gemma 3n with the default Gemma3nTextConfig() (the E4B text decoder, ~8B parameters with its
            per-layer embeddings; built on the GPU). config.json's bos/eos/pad ids are the tokenizer's (as make_model.py
            sets them), except in special_ids_differ. Inits (each saved as bf16 with save_pretrained):
              hf_default          torch.manual_seed(0); XForCausalLM(config) in fp32 (transformers' init, which zeroes
                                  the embedding row at config.pad_token_id), cast to bf16
              make_model          scripts/bench/make_model.py's: seed 0, XForCausalLM._from_config(config, dtype=bf16)
                                  on the device (transformers 5.17's init zeroes the pad row here as well)
              zero_pad_row        make_model, then the pad row of embed_tokens (and Gemma 3n's embed_tokens_per_layer)
                                  zeroed explicitly
              nonzero_pad_row     make_model, then those rows filled with N(0, initializer_range): the control
              special_ids_differ  hf_default with config.json pad 0 / eos 1 / bos 2 while the tokenizer keeps its own
                                  (296/296/299 chatml, 296/297/298 gemma); tuner runs WITHOUT --pad-id and HF pads with
                                  the id tuner picks (the tokenizer's <|endoftext|>, else its eos); the rows contain the
                                  ids 0, 1 and 2 (row 0 is zeroed by the init) as ordinary tokens
              qk_norm_scaled      make_model, then every q_norm/k_norm weight x 0.25 (gemma3n only by default). Gemma 3n
                                  scales attention logits by 1.0 on RMS-normalised q and k, so with transformers' norm
                                  init (weights 1) the logits have std ~sqrt(head_dim): 16 at E4B's head_dim 256. That
                                  saturated softmax makes the model chaotic: at E4B, HF fp32 sdpa vs HF fp32 eager give
                                  LoRA gradients with cos ~0 (-0.05..-0.22), losses 1e-3 apart and a gradient norm of
                                  ~2.5e6; with q/k norms x0.25 (logit std ~1) the two agree to cos 0.99999 and the norm
                                  is ~5 (H200, 2026-12-02). Trained checkpoints have small q/k norm weights. So at
                                  hf_default/make_model only finiteness, the loss and the token count say something at
                                  E4B; qk_norm_scaled is the case where gradient directions can be compared.
            Every other case passes --pad-id = config.pad_token_id (the zeroed row) to tuner, and HF pads with it.
            Adapter: peft LoraConfig r=16, alpha=32, dropout 0, q/k/v/o/gate/up/down_proj; A peft's default init, B
            N(0, 0.02); saved by peft (fp32). Rows: 4 rows of 300/173/88/41 tokens (small) or 2 of 600/217 (e4b), random
            ids (no special id; below Gemma 3n's vocab_size_per_layer_input), the first 40% labelled -100.
            HF: bf16 on the device, sdpa attention (eager for Gemma 2's softcap), PeftModel.from_pretrained(
            is_trainable=True), no gradient checkpointing. tuner: `tuner grads --dtype bf16 --device cuda` (its real
            training path: kernels, hand-written backward, checkpointing; add flags with --tuner-arg).

  fixtures  CPU, fp32, deterministic, pinned versions (like scripts/gen_fixtures.py): write tests/fixtures/grads/
            (rows, adapter, HF's fp32 gradients and meta.json for llama, qwen3, gemma2, gemma3n, from the tiny
            fixture models with the embedding row at the pad id zeroed). See tests/fixtures/grads/README.md.

                /root/.cache/tuner/venv/bin/python scripts/grad_parity.py fixtures           # (re)write
                /root/.cache/tuner/venv/bin/python scripts/grad_parity.py fixtures --check   # byte-compare
                /root/.cache/tuner/venv/bin/python scripts/grad_parity.py fixtures --verify-tuner TUNER  # tuner vs them

Definitions shared with `tuner grads`:
  rows: {"input_ids": [...], "labels": [...]} (labels not shifted; -100 = not trained); position t is trained to
  predict labels[t+1]. All rows form one micro-batch, right-padded with the pad id to the longest row,
  attention_mask 0 on pads. loss = sum of NLL over trained tokens / number of trained tokens (one sum over the
  batch). Gradients are fp32 under the PEFT adapter keys (base_model.model.<module>.lora_A.weight / .lora_B.weight).

Pass/fail rule (gpu mode), per case:
  * tuner exits 0, reports no nonfinite keys, and every gradient in its file is finite; HF's are finite too;
  * the same set of keys on both sides; trained_tokens equal; the loss within 1e-2 relative (bf16/fp16) or
    1e-4 (fp32);
  * for every tensor (each lora_A and lora_B on its own) whose HF gradient is not ~0: cosine >= 0.99 and
    |norm_tuner / norm_hf - 1| <= 0.05;
  * "~0": a tensor whose HF gradient norm is <= 1e-6 x the largest HF gradient norm of the case (numerically zero:
    it cannot reach the loss). It passes when tuner's is <= 1e-4 x that largest norm too; cosine and ratio are not
    computed for it (they are meaningless there). With the adapters used here (B nonzero) none is expected.
  * with a fp32 reference (HF again, the same bf16 checkpoint loaded in fp32: --fp32-ref, on by default when the
    compared dtype is bf16/fp16), a case that misses the thresholds against HF in the same dtype still passes
    when it meets the SAME thresholds against the fp32 reference (it is then at least as close to the exact math;
    the verdict says "pass (fp32 ref)"). The table also shows how far HF's own bf16 run is from fp32.
  * bf16 noise floor. Where HF's OWN bf16 gradients miss the thresholds against its fp32 ones, the thresholds cannot
    tell a tuner bug from rounding: Gemma 3n at transformers' init (see qk_norm_scaled). Small shape: HF bf16 vs
    fp32 min cos ~0.93-0.95 on every layer, HF eager-bf16 vs sdpa-bf16 just as far apart, while the other families
    sit at >= 0.999; rounding only the Linear outputs (or only the RMSNorm outputs) of an fp32 run gives ~0.984.
    E4B: HF bf16 vs fp32 cos ~0. Such a case, missing the thresholds against both references, is reported as
    "noisy (bf16)", not as a pass: inconclusive at this precision (its exact-math check is the CPU fp32 run, and
    qk_norm_scaled the comparable variant). It is still a FAIL when it is grossly off: sum over tensors of
    (1 - cos) vs fp32 > 3x HF bf16's; and, where HF's own bf16 run passes these, a tensor with cos vs fp32 < 0.5 or
    the median norm ratio vs fp32 off by > 5% (noise scatters ratios around 1; a scale bug shifts them all).
    --strict turns "noisy" into a failure.
Exit 1 on any failure, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import filecmp
import hashlib
import importlib.metadata as md
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts" / "bench"))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "gemma3n"]
INITS = ["hf_default", "make_model", "zero_pad_row", "nonzero_pad_row", "special_ids_differ", "qk_norm_scaled"]
E4B_INITS = ["hf_default", "make_model", "qk_norm_scaled"]  # default inits for the E4B-like shape (~16 GB each on disk)
QK_SCALE = 0.25  # qk_norm_scaled: q_norm/k_norm weights x this (attention logits / 16)
QK_DEFAULT_FAMILIES = {"gemma3n"}  # qk_norm_scaled runs by default only where the attention scaling is 1.0

COS_MIN = 0.99
RATIO_TOL = 0.05
ZERO_REL = 1e-6  # HF grad norm <= ZERO_REL * max norm of the case: "~0"
ZERO_PASS = 1e-4  # ... and tuner's must then be <= ZERO_PASS * max norm
LOSS_TOL = {"bf16": 1e-2, "fp16": 1e-2, "fp32": 1e-4}
NOISE_K_SUM = 3.0  # "noisy" cases: sum over tensors of (1 - cos) vs fp32 <= 3x HF bf16's, else FAIL
NOISE_COS_GROSS = 0.5  # ... and no tensor with cos vs fp32 below this


def log(msg: str) -> None:
    print(f"[grad_parity {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def dumps(obj) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


def seed_for(*parts) -> int:
    h = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def versions() -> dict:
    out = {}
    for name in ("torch", "transformers", "peft", "safetensors", "numpy", "tokenizers"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer helpers (special ids read from the files, no transformers tokenizer needed)
# ---------------------------------------------------------------------------------------------------------------


def tokenizer_ids(tok_dir: Path) -> dict:
    """bos/eos/pad ids of a tokenizer folder and the pad id tuner picks by default (its `<|endoftext|>` token,
    else its eos), as src/train/mod.rs does."""
    tok = json.loads((tok_dir / "tokenizer.json").read_text())
    tc = json.loads((tok_dir / "tokenizer_config.json").read_text())
    added = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    vocab = tok.get("model", {}).get("vocab", {})

    def tid(name):
        if isinstance(name, dict):
            name = name.get("content")
        if name is None:
            return None
        return added.get(name, vocab.get(name))

    out = {k: tid(tc.get(f"{k}_token")) for k in ("bos", "eos", "pad")}
    out["tuner_pad"] = added.get("<|endoftext|>", out["eos"])
    out["size"] = max(list(added.values()) + list(vocab.values())) + 1
    return out


def as_list(x) -> list:
    if x is None:
        return []
    return list(x) if isinstance(x, (list, tuple)) else [x]


# ---------------------------------------------------------------------------------------------------------------
# HF side: loss and LoRA gradients
# ---------------------------------------------------------------------------------------------------------------


def peft_key(param_name: str) -> str:
    """peft parameter name -> adapter_model.safetensors key (drop the adapter name)."""
    return param_name.replace(".default.", ".")


def padded_batch(rows, pad_id: int, device):
    import torch

    t = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.int64)
    labels = torch.full((len(rows), t), -100, dtype=torch.int64)
    mask = torch.zeros((len(rows), t), dtype=torch.int64)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        ids[i, :n] = torch.tensor(r["input_ids"])
        labels[i, :n] = torch.tensor(r["labels"])
        mask[i, :n] = 1
    # Shifted targets: position t predicts labels[t+1]; the last position of every row predicts nothing.
    targets = torch.cat([labels[:, 1:], torch.full((len(rows), 1), -100, dtype=torch.int64)], 1)
    return ids.to(device), mask.to(device), None, targets.to(device)


def packed_batch(rows, device):
    """All rows concatenated into one row; positions restart at 0 per document and, with attention_mask=None,
    transformers (masking_utils.find_packed_sequence_indices) keeps each document to itself (sliding windows
    included). The last position of each document predicts nothing (no cross-document target)."""
    import torch

    ids, pos, targets = [], [], []
    for r in rows:
        n = len(r["input_ids"])
        ids += r["input_ids"]
        pos += list(range(n))
        targets += r["labels"][1:] + [-100]
    t = lambda x: torch.tensor([x], dtype=torch.int64).to(device)  # noqa: E731
    return t(ids), None, t(pos), t(targets)


def hf_loss_and_grads(pm, batch) -> dict:
    """One forward/backward of a PeftModel on a batch from padded_batch/packed_batch."""
    import torch
    import torch.nn.functional as F

    ids, mask, pos, targets = batch
    for p in pm.parameters():
        p.grad = None
    kw = dict(input_ids=ids, use_cache=False)
    if mask is not None:
        kw["attention_mask"] = mask
    if pos is not None:
        kw["position_ids"] = pos
    logits = pm(**kw).logits.float()
    n = int((targets != -100).sum())
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum")
    loss = nll / n
    loss.backward()
    grads = {}
    for name, p in pm.named_parameters():
        if "lora_" in name and p.requires_grad:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            grads[peft_key(name)] = g.detach().float().cpu().contiguous()
    return {"loss": float(loss.detach()), "trained_tokens": n, "grads": grads}


def grad_norm(grads: dict) -> float:
    return math.sqrt(sum(float(g.double().pow(2).sum()) for g in grads.values()))


# ---------------------------------------------------------------------------------------------------------------
# Comparison
# ---------------------------------------------------------------------------------------------------------------


def compare(ref: dict, got: dict) -> dict:
    """Per-tensor cosine and norm ratio of `got` against `ref` (see the module doc for the ~0 rule)."""
    import torch

    missing = sorted(set(ref) - set(got))
    extra = sorted(set(got) - set(ref))
    nonfinite = sorted(k for k, g in got.items() if not bool(torch.isfinite(g).all()))
    ref_nonfinite = sorted(k for k, g in ref.items() if not bool(torch.isfinite(g).all()))
    norms = {k: float(g.double().norm()) for k, g in ref.items()}
    gmax = max([v for v in norms.values() if math.isfinite(v)] or [0.0])
    min_cos, worst_ratio, worst_key, zero_keys, bad, per = 1.0, 1.0, None, [], [], {}
    for k in sorted(set(ref) & set(got)):
        if k in nonfinite or k in ref_nonfinite:
            continue
        a, b = ref[k].double().flatten(), got[k].double().flatten()
        if a.shape != b.shape:
            bad.append(f"{k}: shape {tuple(got[k].shape)} vs {tuple(ref[k].shape)}")
            continue
        na, nb = float(a.norm()), float(b.norm())
        if na <= ZERO_REL * gmax:
            zero_keys.append(k)
            if nb > ZERO_PASS * gmax:
                bad.append(f"{k}: HF gradient ~0 (norm {na:.3g}) but tuner's norm is {nb:.3g}")
            continue
        cos = float(a.dot(b)) / (na * nb) if nb > 0 else 0.0
        ratio = nb / na
        per[k] = (cos, ratio)
        if cos < min_cos:
            min_cos = cos
        if abs(ratio - 1) > abs(worst_ratio - 1):
            worst_ratio, worst_key = ratio, k
        if cos < COS_MIN or abs(ratio - 1) > RATIO_TOL:
            bad.append(f"{k}: cos {cos:.5f}, norm ratio {ratio:.4f}")
    ok = not (missing or extra or nonfinite or ref_nonfinite or bad)
    return {
        "ok": ok,
        "min_cos": min_cos,
        "worst_ratio": worst_ratio,
        "worst_ratio_key": worst_key,
        "missing": missing,
        "extra": extra,
        "nonfinite": nonfinite,
        "ref_nonfinite": ref_nonfinite,
        "zero_keys": zero_keys,
        "bad": bad[:20],
        "n_bad": len(bad),
        "n_keys": len(ref),
        "per_tensor": per,  # key -> (cos, ratio); dropped from the JSON report unless --per-tensor
    }


def noise_floor_check(t32: dict, h32: dict) -> tuple[bool, dict]:
    """Gross-error checks for a case where HF's own bf16 gradients miss the thresholds against fp32 (see the module
    doc): tuner vs fp32 (t32) against HF-bf16 vs fp32 (h32). e = 1 - cos. The median-ratio and cos < 0.5 checks
    apply only where HF's own bf16 run passes them (at a chaotic init it passes neither)."""
    import statistics

    keys = sorted(t32["per_tensor"])
    if not keys or set(t32["per_tensor"]) != set(h32["per_tensor"]):
        return False, {"bad": ["tensor sets differ"], "n_bad": 1}
    et = {k: 1 - t32["per_tensor"][k][0] for k in keys}
    eh = {k: 1 - h32["per_tensor"][k][0] for k in keys}
    sum_t, sum_h = sum(et.values()), sum(eh.values())
    med_t = statistics.median(t32["per_tensor"][k][1] for k in keys)
    med_h = statistics.median(h32["per_tensor"][k][1] for k in keys)
    problems = []
    if sum_t > NOISE_K_SUM * sum_h:
        problems.append(f"sum(1-cos) vs fp32 {sum_t:.4g} > {NOISE_K_SUM} x HF bf16's {sum_h:.4g}")
    if abs(med_h - 1) <= RATIO_TOL and abs(med_t - 1) > RATIO_TOL:
        problems.append(f"median norm ratio vs fp32 {med_t:.4f}, HF bf16's {med_h:.4f} (a scale error, not noise)")
    gross_h = [k for k in keys if 1 - eh[k] < NOISE_COS_GROSS]
    gross = [k for k in keys if 1 - et[k] < NOISE_COS_GROSS]
    if gross and not gross_h:
        problems.append(f"{len(gross)} tensors with cos vs fp32 < {NOISE_COS_GROSS}, e.g. {gross[0]} "
                        f"({1 - et[gross[0]]:.4f}; HF bf16 {1 - eh[gross[0]]:.4f})")
    return not problems, {"sum_e_tuner": sum_t, "sum_e_hf": sum_h, "median_ratio": med_t, "median_ratio_hf": med_h,
                          "gross_tensors": len(gross), "gross_tensors_hf": len(gross_h), "bad": problems,
                          "n_bad": len(problems)}


# ---------------------------------------------------------------------------------------------------------------
# gpu mode: model shapes and inits
# ---------------------------------------------------------------------------------------------------------------

# Small shapes. llama, qwen2 and gemma3n reuse scripts/bench/make_model.py's --tiny shapes (llama-8b: untied, GQA
# 4/1, llama3 rope; qwen2.5-7b: qkv bias, head_dim 8; gemma3n-e4b: 10 layers, 5 KV-shared, sparsity on 3, PLE vocab
# 384 < 512); the others are written here in the same spirit (vocab 512, windows of 32 < the row lengths).
SMALL = {
    "llama": dict(make_model="llama-8b"),
    "mistral": dict(arch="MistralForCausalLM", tokenizer="chatml-bos", cfg=dict(
        model_type="mistral", vocab_size=512, hidden_size=64, intermediate_size=224, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=32, max_position_embeddings=4096,
        tie_word_embeddings=False)),
    "qwen2": dict(make_model="qwen2.5-7b"),
    "qwen3": dict(arch="Qwen3ForCausalLM", tokenizer="chatml", cfg=dict(
        model_type="qwen3", vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=4096,
        tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})),
    "gemma2": dict(arch="Gemma2ForCausalLM", tokenizer="gemma", cfg=dict(
        model_type="gemma2", vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=24,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=32,
        layer_types=["sliding_attention", "full_attention"] * 2, max_position_embeddings=4096)),
    "gemma3": dict(arch="Gemma3ForCausalLM", tokenizer="gemma", cfg=dict(
        model_type="gemma3_text", vocab_size=512, hidden_size=64, intermediate_size=192, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=32,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        max_position_embeddings=4096)),
    "gemma3n": dict(make_model="gemma3n-e4b"),
}

# Row lengths (prompt = the first ~40%, labelled -100).
ROW_LENGTHS = {"small": [300, 173, 88, 41], "e4b": [600, 217]}


def tok_dir_for(name: str) -> Path:
    return ROOT / "tests" / "fixtures" / "tokenizers" / name


def build_config(family: str, shape: str, init: str):
    """(config, architecture, tokenizer folder) of a case."""
    import make_model as mm
    from transformers import AutoConfig

    if shape == "e4b":
        assert family == "gemma3n"
        cfg, arch = mm.build_config("gemma3n-e4b", tiny=False)  # Gemma3nTextConfig() + the tokenizer's ids
        tok = ROOT / mm.SHAPES["gemma3n-e4b"]["tokenizer"]
    else:
        spec = SMALL[family]
        if "make_model" in spec:
            cfg, arch = mm.build_config(spec["make_model"], tiny=True)
            tok = ROOT / mm.SHAPES[spec["make_model"]]["tokenizer"]
        else:
            kw = dict(spec["cfg"])
            tok = tok_dir_for(spec["tokenizer"])
            kw.update(mm.special_ids(str(tok)))
            cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
            arch = spec["arch"]
    if init == "special_ids_differ":
        # config.json's ids are not the tokenizer's: pad 0, eos 1, bos 2 (byte tokens of the fixture tokenizers).
        cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id = 0, 1, 2
    cfg.architectures = [arch]
    return cfg, arch, tok


def embed_tables(model) -> list:
    """(name, weight) of the input embedding tables whose row at the pad id matters."""
    out = []
    for name, p in model.named_parameters():
        if name.endswith("embed_tokens.weight") or name.endswith("embed_tokens_per_layer.weight"):
            out.append((name, p))
    return out


def build_model(cfg, arch: str, init: str, device: str):
    """The base model of a case, in bf16 (as saved)."""
    import torch
    import transformers

    cls = getattr(transformers, arch)
    if init in ("hf_default", "special_ids_differ"):
        # The way transformers makes a checkpoint: default init in fp32 (zeroes the row at config.pad_token_id),
        # then cast.
        torch.manual_seed(0)
        with torch.device(device):
            model = cls(cfg)
        model.to(torch.bfloat16)
    else:
        # scripts/bench/make_model.py: transformers' init straight in bf16 on the device, seed 0.
        torch.manual_seed(0)
        with torch.device(device):
            model = cls._from_config(cfg, dtype=torch.bfloat16)
    pad = cfg.pad_token_id
    if init == "qk_norm_scaled":
        with torch.no_grad():
            scaled = [p.mul_(QK_SCALE) for n, p in model.named_parameters()
                      if n.endswith("q_norm.weight") or n.endswith("k_norm.weight")]
        if not scaled:
            raise ValueError(f"{arch} has no q_norm/k_norm weights to scale")
    if init in ("zero_pad_row", "nonzero_pad_row"):
        g = torch.Generator(device="cpu").manual_seed(seed_for("pad_row", arch))
        with torch.no_grad():
            for _, w in embed_tables(model):
                if pad is not None and pad < w.shape[0]:
                    if init == "zero_pad_row":
                        w[pad].zero_()
                    else:  # a control: the pad row as random as any other
                        w[pad].copy_((torch.randn(w.shape[1], generator=g) * cfg.initializer_range).to(w.dtype))
    return model


def pad_row_zero(model, pad_id: int) -> bool:
    return all(bool((w[pad_id] == 0).all()) for _, w in embed_tables(model) if pad_id < w.shape[0])


def make_rows(cfg, lengths: list, exclude: set, insert: list, seed: int) -> list:
    """Alpaca-shaped rows: random token ids (none in `exclude`), the first ~40% a prompt labelled -100, the rest
    trained. `insert`: ids placed on purpose at a few positions >= 1 (in the prompt and in the response)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    # Gemma3nForCausalLM looks every id up in the per-layer table too (only the multimodal model masks ids past
    # vocab_size_per_layer_input), so ids stay below both vocabularies.
    top = min(cfg.vocab_size, getattr(cfg, "vocab_size_per_layer_input", None) or cfg.vocab_size)
    pool = torch.tensor([i for i in range(top) if i not in exclude], dtype=torch.int64)
    rows = []
    for n in lengths:
        ids = pool[torch.randint(len(pool), (n,), generator=g)].tolist()
        prompt = max(1, int(n * 0.4))
        for j, tok in enumerate(insert):
            for at in (1 + j, prompt + 1 + j, n - 1 - j):
                if 1 <= at < n:
                    ids[at] = tok
        labels = [-100] * prompt + ids[prompt:]
        rows.append({"input_ids": ids, "labels": labels})
    return rows


def write_rows(path: Path, rows: list) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps({"input_ids": r["input_ids"], "labels": r["labels"]}) + "\n")


def make_adapter(model, out: Path, r: int, alpha: int, b_std: float, seed: int, save_dtype=None) -> None:
    """A random nonzero LoRA adapter saved with peft: A with peft's default (Kaiming-uniform) init, B normal.
    peft's get_peft_model injects the layers into `model` in place; they are removed again (unload)."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    lc = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(TARGETS), bias="none")
    pm = get_peft_model(model, lc)
    with torch.no_grad():
        for name, p in sorted(pm.named_parameters(), key=lambda kv: kv[0]):
            if "lora_B" in name:
                g = torch.Generator().manual_seed(seed_for(seed, name))
                p.copy_(torch.randn(p.shape, generator=g) * b_std)
            if save_dtype is not None and "lora_" in name:
                p.copy_(p.to(save_dtype))  # the values the stored (narrower) file will hold
    pm.save_pretrained(str(out))
    pm.unload()


# ---------------------------------------------------------------------------------------------------------------
# gpu mode: running one case
# ---------------------------------------------------------------------------------------------------------------


def torch_lib_dir() -> str:
    import torch

    return os.path.join(os.path.dirname(torch.__file__), "lib")


def run_tuner(a, case: dict) -> dict:
    cmd = [a.tuner, "grads", "--model", str(case["model_dir"]), "--adapter", str(case["adapter_dir"]),
           "--data", str(case["rows_path"]), "--out", str(case["grads_path"]), "--dtype", a.dtype,
           "--device", a.device]
    if case["pass_pad_id"]:
        cmd += ["--pad-id", str(case["pad_id"])]
    cmd += a.tuner_arg
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = torch_lib_dir() + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    (case["dir"] / "tuner.stdout").write_text(p.stdout)
    (case["dir"] / "tuner.stderr").write_text(p.stderr)
    out = {"cmd": " ".join(cmd), "rc": p.returncode, "seconds": dt}
    if p.returncode != 0:
        out["error"] = (p.stderr.strip().splitlines() or ["(no stderr)"])[-8:]
        return out
    info = None
    for line in reversed(p.stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                info = json.loads(line)
                break
            except json.JSONDecodeError:
                pass
    if info is None:
        out["error"] = ["no JSON line on stdout"]
        return out
    from safetensors.torch import load_file

    out.update(info)
    out["grads"] = {k: v.float() for k, v in load_file(str(case["grads_path"])).items()}
    return out


def hf_case(a, case: dict, dtype_name: str) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    t0 = time.perf_counter()
    kw = dict(dtype=dtype, attn_implementation=case["attn"])
    try:
        model = AutoModelForCausalLM.from_pretrained(str(case["model_dir"]), device_map={"": a.device}, **kw)
    except ImportError:  # device_map wants accelerate on some installs
        model = AutoModelForCausalLM.from_pretrained(str(case["model_dir"]), **kw).to(a.device)
    pm = PeftModel.from_pretrained(model, str(case["adapter_dir"]), is_trainable=True)
    pm.train()
    res = hf_loss_and_grads(pm, padded_batch(case["rows"], case["pad_id"], a.device))
    del pm, model
    if a.device.startswith("cuda"):
        torch.cuda.empty_cache()
    res["seconds"] = time.perf_counter() - t0
    return res


def prepare_case(a, family: str, init: str, shape: str, work: Path) -> dict:
    import torch

    t0 = time.perf_counter()
    cfg, arch, tok = build_config(family, shape, init)
    tids = tokenizer_ids(tok)
    d = work / f"{family}-{init}-{shape}"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    model = build_model(cfg, arch, init, a.device)
    if init == "special_ids_differ":
        pad_id, pass_pad = tids["tuner_pad"], False  # tuner picks its own pad (tokenizer's <|endoftext|> / eos)
    else:
        pad_id, pass_pad = cfg.pad_token_id, True  # the row transformers' init zeroes
    assert pad_id is not None and pad_id < cfg.vocab_size, (family, init, pad_id)
    zero = pad_row_zero(model, pad_id)
    mdir = d / "model"
    model.save_pretrained(str(mdir), max_shard_size="5GB")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tok / f, mdir / f)
    tc = json.loads((mdir / "tokenizer_config.json").read_text())
    tc["model_max_length"] = 131072
    (mdir / "tokenizer_config.json").write_text(dumps(tc))
    exclude = {0, 1, 2, pad_id, tids["tuner_pad"]}
    for x in as_list(cfg.pad_token_id) + as_list(cfg.eos_token_id) + as_list(cfg.bos_token_id):
        exclude.add(x)
    for k in ("bos", "eos", "pad"):
        if tids[k] is not None:
            exclude.add(tids[k])
    insert = [0, 1, 2] if init == "special_ids_differ" else []
    rows = make_rows(cfg, ROW_LENGTHS[shape], exclude, insert, seed_for("rows", family, shape))
    rows_path = d / "rows.jsonl"
    write_rows(rows_path, rows)
    adir = d / "adapter"
    make_adapter(model, adir, r=16, alpha=32, b_std=0.02, seed=seed_for("lora", family, init, shape))
    del model
    if a.device.startswith("cuda"):
        torch.cuda.empty_cache()
    attn = a.attn if a.attn != "auto" else ("eager" if family == "gemma2" else "sdpa")
    log(f"{family}/{init}/{shape}: built {arch} in {time.perf_counter() - t0:.1f}s (pad {pad_id}, pad row zero: {zero})")
    return {"family": family, "init": init, "shape": shape, "dir": d, "model_dir": mdir, "adapter_dir": adir,
            "rows_path": rows_path, "grads_path": d / "tuner_grads.safetensors", "rows": rows, "pad_id": pad_id,
            "pass_pad_id": pass_pad, "pad_row_zero": zero, "attn": attn, "arch": arch,
            "config_pad_id": cfg.pad_token_id}


def verdict(a, case: dict, hf: dict, ref32: dict | None, tun: dict | None) -> dict:
    import torch

    res = {k: case[k] for k in ("family", "init", "shape", "pad_id", "pass_pad_id", "pad_row_zero", "attn", "arch")}
    res["rows"] = [len(r["input_ids"]) for r in case["rows"]]
    res["hf_loss"] = hf["loss"]
    res["trained_tokens"] = hf["trained_tokens"]
    res["hf_grad_norm"] = grad_norm(hf["grads"])
    res["hf_seconds"] = hf["seconds"]
    problems = []
    hf_bad = sorted(k for k, g in hf["grads"].items() if not bool(torch.isfinite(g).all()))
    if hf_bad or not math.isfinite(hf["loss"]):
        problems.append(f"HF itself is nonfinite (loss {hf['loss']}, {len(hf_bad)} keys)")
    h32 = None
    if ref32 is not None:
        h32 = compare(ref32["grads"], hf["grads"])
        res["hf_vs_fp32"] = slim(h32, a)
        res["fp32_loss"] = ref32["loss"]
    if tun is None:
        res["verdict"] = "hf-only" if not problems else "FAIL"
        res["problems"] = problems
        return res
    res["tuner_seconds"] = tun.get("seconds")
    res["tuner_cmd"] = tun.get("cmd")
    if tun.get("rc") != 0 or "error" in tun:
        problems.append(f"tuner failed (rc {tun.get('rc')}): " + " | ".join(tun.get("error", [])))
        res["verdict"], res["problems"] = "FAIL", problems
        return res
    res["tuner_loss"] = tun.get("loss")
    res["tuner_trained_tokens"] = tun.get("trained_tokens")
    res["tuner_grad_norm"] = tun.get("grad_norm")
    res["tuner_nonfinite"] = tun.get("nonfinite", [])
    if tun.get("nonfinite"):
        problems.append(f"tuner reports {len(tun['nonfinite'])} nonfinite gradients, e.g. {tun['nonfinite'][:3]}")
    if tun.get("trained_tokens") != hf["trained_tokens"]:
        problems.append(f"trained_tokens {tun.get('trained_tokens')} vs HF {hf['trained_tokens']}")
    tl = tun.get("loss")
    tol = LOSS_TOL[a.dtype]
    if not isinstance(tl, (int, float)) or not math.isfinite(tl) or abs(tl - hf["loss"]) > tol * abs(hf["loss"]):
        ok32 = ref32 is not None and isinstance(tl, (int, float)) and abs(tl - ref32["loss"]) <= tol * abs(ref32["loss"])
        if not ok32:
            problems.append(f"loss {tl} vs HF {hf['loss']:.6f} (tolerance {tol} relative)")
    c = compare(hf["grads"], tun["grads"])
    res["cmp"] = slim(c, a)
    res["min_cos"], res["worst_ratio"], res["finite"] = c["min_cos"], c["worst_ratio"], not c["nonfinite"]
    how = "pass"
    c32 = None
    if ref32 is not None:
        c32 = compare(ref32["grads"], tun["grads"])
        res["cmp_fp32"] = slim(c32, a)
        res["min_cos_fp32"], res["worst_ratio_fp32"] = c32["min_cos"], c32["worst_ratio"]
    if not c["ok"]:
        structural = c["missing"] or c["extra"] or c["nonfinite"] or c["ref_nonfinite"]
        if c32 is not None and c32["ok"]:
            how = "pass (fp32 ref)"
        elif c32 is not None and not structural and not h32["ok"] and not (h32["missing"] or h32["extra"]):
            ok, info = noise_floor_check(c32, h32)
            res["noise_floor"] = info
            if ok:
                how = "noisy (bf16)"
            else:
                problems.append(f"beyond HF's own bf16 noise ({info['n_bad']} problems): " + "; ".join(info["bad"][:3]))
        if how == "pass":
            if c["missing"] or c["extra"]:
                problems.append(f"keys: {len(c['missing'])} missing in tuner (e.g. {c['missing'][:2]}), "
                                f"{len(c['extra'])} extra (e.g. {c['extra'][:2]})")
            if c["nonfinite"]:
                problems.append(f"{len(c['nonfinite'])} nonfinite tensors in tuner's file, e.g. {c['nonfinite'][:3]}")
            if c["bad"] and "noise_floor" not in res:
                problems.append(f"{c['n_bad']} tensors off: " + "; ".join(c["bad"][:4]))
            if not problems:
                problems.append("comparison failed")
    res["verdict"] = "FAIL" if problems else how
    res["problems"] = problems
    return res


def slim(c: dict, a) -> dict:
    """A comparison for the JSON report: per-tensor numbers only with --per-tensor."""
    out = {k: v for k, v in c.items() if k != "per_tensor"}
    if getattr(a, "per_tensor", False):
        out["per_tensor"] = {k: {"cos": v[0], "ratio": v[1]} for k, v in c["per_tensor"].items()}
    return out


def fmt(x, spec):
    if isinstance(x, (int, float)) and not isinstance(x, bool):
        return format(x, spec)
    return "-".rjust(int(spec.split(".")[0]))


def print_table(results: list, dtype: str) -> None:
    hdr = (f"{'family':<8} {'init':<18} {'shape':<5} {'pad':>6} {'pad0':<4} {'tok':>5} {'hf loss':>9} {'tuner loss':>10} "
           f"{'min cos':>8} {'worst ratio':>11} {'finite':<6} {'cos/fp32':>8} {'hf cos/fp32':>11} {'tuner s':>7}  verdict")
    print()
    print(f"LoRA gradients, tuner vs HF+peft ({dtype}); pass: cos >= {COS_MIN} and |ratio-1| <= {RATIO_TOL} per tensor")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        fin = r.get("finite")
        print(f"{r['family']:<8} {r['init']:<18} {r['shape']:<5} {r['pad_id']:>6} {('yes' if r['pad_row_zero'] else 'no'):<4} "
              f"{r['trained_tokens']:>5} {fmt(r['hf_loss'], '9.5f')} {fmt(r.get('tuner_loss'), '10.5f')} "
              f"{fmt(r.get('min_cos'), '8.5f')} {fmt(r.get('worst_ratio'), '11.4f')} "
              f"{('-' if fin is None else 'yes' if fin else 'NO'):<6} {fmt(r.get('min_cos_fp32'), '8.5f')} "
              f"{fmt((r.get('hf_vs_fp32') or {}).get('min_cos'), '11.5f')} {fmt(r.get('tuner_seconds'), '7.1f')}  {r['verdict']}")
    for r in results:
        for p in r.get("problems", []):
            print(f"  {r['family']}/{r['init']}/{r['shape']}: {p}")
        nf = r.get("noise_floor")
        if nf and r["verdict"].startswith("noisy"):
            print(f"  {r['family']}/{r['init']}/{r['shape']}: noisy: sum(1-cos) vs fp32 tuner {nf['sum_e_tuner']:.4g}, "
                  f"HF {nf['sum_e_hf']:.4g}; median norm ratio vs fp32 tuner {nf['median_ratio']:.4f}, "
                  f"HF {nf['median_ratio_hf']:.4f}; tensors with cos < {NOISE_COS_GROSS}: tuner {nf['gross_tensors']}, "
                  f"HF {nf['gross_tensors_hf']}")


def gpu_main(a) -> int:
    import torch

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("grad_parity: --device cuda but torch sees no GPU", file=sys.stderr)
        return 2
    if a.dtype == "bf16" and a.device == "cpu":
        log("note: bf16 on the CPU is slow in HF; --dtype fp32 is the exact-math check")
    families = [f for f in a.families.split(",") if f]
    inits = [i for i in a.inits.split(",") if i] if a.inits else None
    shapes = [s for s in a.shapes.split(",") if s]
    for f in families:
        if f not in FAMILIES:
            print(f"grad_parity: unknown family {f!r} (known: {', '.join(FAMILIES)})", file=sys.stderr)
            return 2
    for i in inits or []:
        if i not in INITS:
            print(f"grad_parity: unknown init {i!r} (known: {', '.join(INITS)})", file=sys.stderr)
            return 2
    for s in shapes:
        if s not in ROW_LENGTHS:
            print(f"grad_parity: unknown shape {s!r} (small, e4b)", file=sys.stderr)
            return 2
    cases = []
    for s in shapes:
        for f in families:
            if s == "e4b" and f != "gemma3n":
                continue
            for i in (inits or (E4B_INITS if s == "e4b" else INITS)):
                if i == "qk_norm_scaled" and f not in (QK_DEFAULT_FAMILIES if not inits else {"qwen3", "gemma3", "gemma3n"}):
                    continue  # no q/k norms (llama, mistral, qwen2), or by default: not needed there
                cases.append((f, i, s))
    if not cases:
        print("grad_parity: no case selected", file=sys.stderr)
        return 2
    if not a.hf_only and not os.access(a.tuner, os.X_OK):
        print(f"grad_parity: no tuner binary at {a.tuner} (--tuner PATH, or --hf-only)", file=sys.stderr)
        return 2
    if a.device == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="grad_parity-"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"{len(cases)} cases, device {a.device}, dtype {a.dtype}, work dir {work}, tuner {'(skipped)' if a.hf_only else a.tuner}")
    t_start = time.perf_counter()
    jobs = a.jobs or (4 if a.device.startswith("cuda") else 1)
    pool = cf.ThreadPoolExecutor(max_workers=jobs)
    pending = []  # (case, future, hf, ref32)
    lock = threading.Lock()

    def cleanup_when_done(case, fut):
        # Big folders go as soon as both sides have read them (E4B is ~16 GB).
        with lock:
            case["refs"] -= 1
            if case["refs"] == 0 and not a.keep and case["shape"] == "e4b":
                shutil.rmtree(case["model_dir"], ignore_errors=True)

    results = []
    for (f, i, s) in cases:
        try:
            case = prepare_case(a, f, i, s, work)
        except Exception as e:  # noqa: BLE001 - a case that cannot be built is a harness failure, reported
            log(f"{f}/{i}/{s}: could not build: {type(e).__name__}: {e}")
            results.append({"family": f, "init": i, "shape": s, "pad_id": -1, "pad_row_zero": False,
                            "trained_tokens": 0, "hf_loss": None, "verdict": "FAIL",
                            "problems": [f"build failed: {type(e).__name__}: {e}"]})
            continue
        case["refs"] = 1 if a.hf_only else 2
        fut = None
        if not a.hf_only:
            fut = pool.submit(run_tuner, a, case)
            fut.add_done_callback(lambda _f, c=case: cleanup_when_done(c, _f))
        try:
            hf = hf_case(a, case, a.dtype)
            ref32 = None
            want32 = a.fp32_ref == "all" or (a.fp32_ref == "small" and s == "small")
            if want32 and a.dtype != "fp32":
                ref32 = hf_case(a, case, "fp32")
        except Exception as e:  # noqa: BLE001 - reported as a failed case; tuner's run is still awaited
            log(f"{f}/{i}/{s}: HF side failed: {type(e).__name__}: {e}")
            results.append({"family": f, "init": i, "shape": s, "pad_id": case["pad_id"],
                            "pad_row_zero": case["pad_row_zero"], "trained_tokens": 0, "hf_loss": None,
                            "verdict": "FAIL", "problems": [f"HF side failed: {type(e).__name__}: {e}"]})
            cleanup_when_done(case, None)
            if fut is not None:
                fut.result()
            continue
        log(f"{f}/{i}/{s}: HF loss {hf['loss']:.6f} over {hf['trained_tokens']} tokens, grad norm {grad_norm(hf['grads']):.4g} "
            f"({hf['seconds']:.1f}s)")
        cleanup_when_done(case, None)
        pending.append((case, fut, hf, ref32))
    for case, fut, hf, ref32 in pending:
        try:
            tun = fut.result() if fut is not None else None
        except Exception as e:  # noqa: BLE001 - e.g. an unreadable gradient file
            tun = {"rc": -1, "error": [f"{type(e).__name__}: {e}"]}
        r = verdict(a, case, hf, ref32, tun)
        results.append(r)
        if tun is not None:
            log(f"{case['family']}/{case['init']}/{case['shape']}: tuner {tun.get('seconds', 0):.1f}s -> {r['verdict']}")
    pool.shutdown()
    order = {c: n for n, c in enumerate(cases)}
    results.sort(key=lambda r: order.get((r["family"], r["init"], r["shape"]), 0))
    total = time.perf_counter() - t_start
    print_table(results, a.dtype)
    failed = [r for r in results if r["verdict"] == "FAIL" or (a.strict and r["verdict"].startswith("noisy"))]
    noisy = [r for r in results if r["verdict"].startswith("noisy")]
    note = (f", {len(noisy)} noisy (inconclusive in {a.dtype}: HF's own {a.dtype} run misses the thresholds against "
            f"fp32; see the module doc)") if noisy else ""
    print(f"\n{len(results)} cases, {len(failed)} failed{note}, {total:.0f}s total")
    report = {"device": a.device, "dtype": a.dtype, "tuner": None if a.hf_only else a.tuner, "tuner_args": a.tuner_arg,
              "thresholds": {"cos_min": COS_MIN, "ratio_tol": RATIO_TOL, "zero_rel": ZERO_REL, "zero_pass": ZERO_PASS,
                             "loss_tol": LOSS_TOL[a.dtype]},
              "versions": versions(), "seconds": total, "ok": not failed, "results": results}
    if torch.cuda.is_available() and a.device.startswith("cuda"):
        report["gpu"] = torch.cuda.get_device_name()
    dests = [Path(a.json)] if a.json else []
    if os.environ.get("OUT"):
        dests.append(Path(os.environ["OUT"]) / "grad_parity.json")
    for p in dests:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(dumps(report))
        log(f"wrote {p}")
    if not a.keep and not a.work:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if failed else 0


# ---------------------------------------------------------------------------------------------------------------
# fixtures mode
# ---------------------------------------------------------------------------------------------------------------

FIX_FAMILIES = ["llama", "qwen3", "gemma2", "gemma3n"]
FIX_SEED = 20261202
FIX_ROWS = [(24, 5), (17, 3), (11, 6)]  # (length, prompt tokens labelled -100)
FIX_R, FIX_ALPHA, FIX_B_STD = 4, 8, 0.1
FIX_PINNED = {"torch": "2.11.0", "transformers": "5.17.0", "peft": "0.21.0"}
FIX_CMD = "/root/.cache/tuner/venv/bin/python scripts/grad_parity.py fixtures"
DEFAULT_FIX_OUT = ROOT / "tests" / "fixtures" / "grads"


def check_pinned() -> dict:
    found = versions()
    bad = [f"  {k}: need {v}, found {found.get(k)}" for k, v in FIX_PINNED.items()
           if found.get(k) is None or found[k].split("+")[0] != v]
    if bad:
        sys.stderr.write("grad_parity.py fixtures needs the pinned versions (the fixtures are their output):\n"
                         + "\n".join(bad) + "\nUse /root/.cache/tuner/venv/bin/python (scripts/bootstrap installs it).\n")
        sys.exit(2)
    return found


def fix_rows(family: str) -> list:
    import torch

    g = torch.Generator().manual_seed(seed_for(FIX_SEED, family, "rows"))
    rows = []
    for n, prompt in FIX_ROWS:
        ids = torch.randint(0, 296, (n,), generator=g).tolist()  # byte and merge tokens only: no special ids
        rows.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return rows


def load_fixture_model(src: Path, zeroed: list):
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(src), attn_implementation="eager", dtype=torch.float32)
    params = dict(m.named_parameters())
    with torch.no_grad():
        for z in zeroed:
            params[z["tensor"]][z["row"]].zero_()
    return m


def gen_fixture_family(out: Path, family: str) -> dict:
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file, save_file

    src = ROOT / "tests" / "fixtures" / "models" / family
    cfg = json.loads((src / "config.json").read_text())
    tids = tokenizer_ids(src)
    pad = tids["pad"]
    zeroed = [{"tensor": "model.embed_tokens.weight", "row": pad}]
    if "vocab_size_per_layer_input" in cfg and pad < cfg["vocab_size_per_layer_input"]:
        zeroed.append({"tensor": "model.embed_tokens_per_layer.weight", "row": pad})
    d = out / family
    d.mkdir(parents=True, exist_ok=True)
    rows = fix_rows(family)
    write_rows(d / "rows.jsonl", rows)

    # Adapter: r=4 on the seven projections, A peft's default init, B normal; stored in bf16 (half the bytes; the
    # fp32 model below uses exactly these values, upcast).
    base = load_fixture_model(src, zeroed)
    tied = base.get_input_embeddings().weight.data_ptr() == base.get_output_embeddings().weight.data_ptr()
    with tempfile.TemporaryDirectory() as td:
        make_adapter(base, Path(td), FIX_R, FIX_ALPHA, FIX_B_STD, seed_for(FIX_SEED, family, "lora"), torch.bfloat16)
        tensors = load_file(str(Path(td) / "adapter_model.safetensors"))
        acfg = json.loads((Path(td) / "adapter_config.json").read_text())
    acfg["base_model_name_or_path"] = f"tests/fixtures/models/{family}"
    acfg["target_modules"] = sorted(acfg["target_modules"])  # peft keeps a set: its order changes run to run
    ad = d / "adapter"
    ad.mkdir(exist_ok=True)
    (ad / "adapter_config.json").write_text(dumps(dict(sorted(acfg.items()))))
    tensors = {k: tensors[k].to(torch.bfloat16).contiguous() for k in sorted(tensors)}
    save_file(tensors, str(ad / "adapter_model.safetensors"), metadata={"format": "pt"})
    del base

    # HF gradients: a fresh model with the rows zeroed, the adapter loaded by peft as a user would.
    base = load_fixture_model(src, zeroed)
    pm = PeftModel.from_pretrained(base, str(ad), is_trainable=True)
    pm.train()
    for name, p in pm.named_parameters():  # the adapter went through bf16 and back unchanged
        if "lora_" in name:
            assert torch.equal(p.detach(), tensors[peft_key(name)].float()), name
    padded = hf_loss_and_grads(pm, padded_batch(rows, pad, "cpu"))
    packed = hf_loss_and_grads(pm, packed_batch(rows, "cpu"))
    assert sorted(padded["grads"]) == sorted(tensors), "gradient keys != adapter keys"
    for res in (padded, packed):
        assert math.isfinite(res["loss"]) and all(bool(torch.isfinite(g).all()) for g in res["grads"].values())
    grads = {k: padded["grads"][k] for k in sorted(padded["grads"])}
    save_file(grads, str(d / "hf_grads.safetensors"), metadata={"format": "pt"})
    diff = max(float((packed["grads"][k] - g).abs().max()) / max(float(g.abs().max()), 1e-30) for k, g in grads.items())
    c = compare(grads, packed["grads"])
    assert c["ok"] and diff < 1e-4, (family, diff, c)
    meta = {
        "family": family,
        "model": f"tests/fixtures/models/{family}",
        "pad_id": pad,
        "pad_token": json.loads((src / "tokenizer_config.json").read_text())["pad_token"],
        "tuner_default_pad_id": tids["tuner_pad"],
        "zeroed_rows": zeroed,
        "tied_embeddings": tied,
        "rows": [{"length": len(r["input_ids"]), "prompt": sum(1 for x in r["labels"] if x == -100)} for r in rows],
        "trained_tokens": padded["trained_tokens"],
        "loss": padded["loss"],
        "grad_norm": grad_norm(grads),
        "lora": {"r": FIX_R, "lora_alpha": FIX_ALPHA, "scale": FIX_ALPHA / FIX_R, "target_modules": sorted(TARGETS),
                 "b_std": FIX_B_STD, "dtype": "bfloat16", "keys": len(tensors)},
        "hf": {"dtype": "float32", "attn_implementation": "eager", "device": "cpu",
               "batch": "rows right-padded with pad_id to the longest row, attention_mask 0 on pads"},
        "packed": {
            "layout": "the three rows concatenated into one row of "
                      f"{sum(len(r['input_ids']) for r in rows)} tokens; position_ids restart at 0 per document; "
                      "no attention_mask (transformers detects the documents from the position_ids and keeps each "
                      "to itself, sliding windows included); the last token of a document predicts nothing",
            "position_ids": sum([list(range(len(r["input_ids"]))) for r in rows], []),
            "loss": packed["loss"],
            "trained_tokens": packed["trained_tokens"],
            "grads_file": None,
            "max_rel_diff_vs_hf_grads": diff,
            "min_cos_vs_hf_grads": c["min_cos"],
            "note": "the packed gradients equal hf_grads.safetensors up to fp32 rounding (max_rel_diff_vs_hf_grads, "
                    "per tensor max|diff| / max|g|), so they are not stored again: compare a packed run with "
                    "hf_grads.safetensors",
        },
        "versions": VERSIONS_FIX,
    }
    (d / "meta.json").write_text(dumps(meta))
    return meta


FIX_README = """\
# LoRA gradient fixtures (generated)

**Do not edit by hand.** Written by `scripts/grad_parity.py fixtures`; regenerate or check with

```
{cmd}            # rewrite tests/fixtures/grads/
{cmd} --check    # regenerate in a temp dir and fail on any byte difference
```

Pinned versions (the script refuses others): {pinned}. Also used: {others}.
HF transformers + peft on the CPU in fp32, `attn_implementation="eager"`, single-threaded,
`torch.use_deterministic_algorithms(True)`. Same machine -> byte-identical files; another CPU may move the last bits.

## What each `<family>/` holds

The model is the existing fixture `tests/fixtures/models/<family>/` (not copied) with one modification, listed in
`meta.json` `zeroed_rows`: the input embedding row at the tokenizer's pad id set to 0 (`model.embed_tokens.weight`,
and for Gemma 3n also `model.embed_tokens_per_layer.weight` when the pad id < `vocab_size_per_layer_input`). That
is what transformers' own init does for `config.pad_token_id` (nn.Embedding padding_idx). With tied embeddings
(qwen3, gemma2, gemma3n) the zeroed row is also lm_head's row. A loader applies the same edit to the loaded tensor.

- `rows.jsonl`: 3 rows `{{"input_ids": [...], "labels": [...]}}` of {lengths} tokens; the first {prompts} labels are
  -100; ids are byte/merge tokens (< 296, never a special token). Position t is trained to predict labels[t+1].
- `adapter/`: a PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`), r={r}, lora_alpha={alpha}
  (scale {scale}), dropout 0, on q/k/v/o/gate/up/down_proj (Gemma 3n's KV-shared layers have no k/v). A: peft's
  default Kaiming-uniform init; B: normal, std {bstd} (nonzero, so A gets gradients too). Stored in **bf16** to keep
  the folder small; the fp32 HF model uses exactly these values (upcast). `base_model_name_or_path` is the fixture
  folder, `target_modules` sorted.
- `hf_grads.safetensors`: fp32 gradients of every lora_A / lora_B under the adapter's own keys
  (`base_model.model.<module path>.lora_A.weight`), for one micro-batch of the 3 rows right-padded with `pad_id`
  to the longest row, attention_mask 0 on the pads, and loss = sum of NLL over the trained tokens / their count.
- `meta.json`: `pad_id` (the tokenizer's pad token, 296 here; pass it as `tuner grads --pad-id`: tuner's default,
  `tuner_default_pad_id`, is the eos 297 for the gemma tokenizer), `zeroed_rows`, `loss`, `trained_tokens`,
  `grad_norm`, the LoRA settings, versions, and `packed`.
- `packed` (in meta.json): the same rows concatenated into ONE row, position_ids restarting at 0 per document, each
  document attending only to itself (transformers detects the documents from the position_ids when there is no
  attention_mask; sliding windows still apply within a document), the last token of each document predicting
  nothing. Its loss and trained tokens are recorded; its gradients equal `hf_grads.safetensors` to fp32 rounding
  (`max_rel_diff_vs_hf_grads`), so they are not stored twice: a packed tuner run is compared with
  `hf_grads.safetensors`.

Suggested tolerance for tuner in fp32 on the CPU: per tensor max|Δ| <= 1e-4 · max|g| (the packed/padded difference
of HF itself is ~1e-6 and below). `{cmd} --verify-tuner TUNER` applies it: it writes each model with the rows
zeroed to a temp folder, runs `TUNER grads --dtype fp32 --device cpu --pad-id <pad_id>` and compares.

| family | pad id | zeroed rows | tied | trained tokens | loss | grad norm | keys | packed rel diff |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |
{table}

## Files

| file | bytes | sha256 |
| --- | --- | --- |
{files}

Total (without this README): {total:,} bytes.
"""


def file_table(out: Path) -> list:
    rows = []
    for p in sorted(out.rglob("*")):
        if p.is_file() and p.name != "README.md":
            rows.append((p.relative_to(out).as_posix(), p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()))
    return rows


VERSIONS_FIX: dict = {}


def gen_fixtures(out: Path) -> list:
    import torch

    torch.manual_seed(FIX_SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    metas = []
    for fam in FIX_FAMILIES:
        t0 = time.perf_counter()
        m = gen_fixture_family(out, fam)
        metas.append(m)
        log(f"fixtures {fam}: loss {m['loss']:.6f} over {m['trained_tokens']} tokens, grad norm {m['grad_norm']:.4g}, "
            f"packed rel diff {m['packed']['max_rel_diff_vs_hf_grads']:.2g} ({time.perf_counter() - t0:.1f}s)")
    files = file_table(out)
    table = "\n".join(
        f"| `{m['family']}` | {m['pad_id']} | " + ", ".join(f"`{z['tensor']}`[{z['row']}]" for z in m["zeroed_rows"])
        + f" | {'yes' if m['tied_embeddings'] else 'no'} | {m['trained_tokens']} | {m['loss']:.6f} | {m['grad_norm']:.6g} "
        f"| {m['lora']['keys']} | {m['packed']['max_rel_diff_vs_hf_grads']:.2g} |" for m in metas)
    pinned = ", ".join(f"{k} {VERSIONS_FIX[k]}" for k in FIX_PINNED)
    others = ", ".join(f"{k} {VERSIONS_FIX[k]}" for k in VERSIONS_FIX if k not in FIX_PINNED)
    text = FIX_README.format(
        cmd=FIX_CMD, pinned=pinned, others=others, lengths="/".join(str(n) for n, _ in FIX_ROWS),
        prompts="/".join(str(p) for _, p in FIX_ROWS), r=FIX_R, alpha=FIX_ALPHA, scale=FIX_ALPHA / FIX_R,
        bstd=FIX_B_STD, table=table,
        files="\n".join(f"| `{n}` | {s:,} | `{h[:16]}…` |" for n, s, h in files), total=sum(s for _, s, _ in files))
    (out / "README.md").write_text(text)
    return metas


def compare_trees(a: Path, b: Path) -> list:
    fa = {p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file()}
    fb = {p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file()}
    diffs = [f"only in one tree: {p}" for p in sorted(fa ^ fb)]
    diffs += [f"differs: {p}" for p in sorted(fa & fb) if not filecmp.cmp(a / p, b / p, shallow=False)]
    return diffs


def verify_tuner_fixtures(a) -> int:
    """Run `tuner grads` (fp32, CPU) on every family of tests/fixtures/grads and compare with hf_grads.safetensors:
    per tensor max|diff| <= 1e-4 * max|g|, loss within 1e-5 relative, the same trained tokens."""
    import torch
    from safetensors.torch import load_file, save_file

    out = Path(a.out)
    bad = 0
    print(f"{'family':<8} {'loss hf':>10} {'loss tuner':>10} {'max rel diff':>12} {'min cos':>12}  verdict")
    for fam in FIX_FAMILIES:
        meta = json.loads((out / fam / "meta.json").read_text())
        src = ROOT / meta["model"]
        with tempfile.TemporaryDirectory() as td:
            mdir = Path(td) / "model"
            mdir.mkdir()
            for f in src.iterdir():
                if f.name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
                    shutil.copy(f, mdir / f.name)
            w = load_file(str(src / "model.safetensors"))
            for z in meta["zeroed_rows"]:
                w[z["tensor"]][z["row"]] = 0
            save_file(w, str(mdir / "model.safetensors"), metadata={"format": "pt"})
            case = {"dir": Path(td), "model_dir": mdir, "adapter_dir": out / fam / "adapter",
                    "rows_path": out / fam / "rows.jsonl", "grads_path": Path(td) / "grads.safetensors",
                    "pad_id": meta["pad_id"], "pass_pad_id": True}
            a.dtype, a.device = "fp32", "cpu"
            tun = run_tuner(a, case)
        if tun.get("rc") != 0 or "error" in tun:
            print(f"{fam:<8} tuner failed: {' | '.join(tun.get('error', []))}")
            bad += 1
            continue
        ref = load_file(str(out / fam / "hf_grads.safetensors"))
        c = compare(ref, tun["grads"])
        rel = max((float((tun["grads"][k] - g).abs().max()) / max(float(g.abs().max()), 1e-30)
                   for k, g in ref.items() if k in tun["grads"]), default=float("inf"))
        ok = (c["ok"] and rel <= 1e-4 and tun.get("trained_tokens") == meta["trained_tokens"]
              and abs(tun["loss"] - meta["loss"]) <= 1e-5 * abs(meta["loss"]))
        bad += not ok
        print(f"{fam:<8} {meta['loss']:>10.6f} {tun['loss']:>10.6f} {rel:>12.3g} {c['min_cos']:>12.9f}  "
              f"{'pass' if ok else 'FAIL'}")
    return 1 if bad else 0


def fixtures_main(a) -> int:
    global VERSIONS_FIX
    VERSIONS_FIX = check_pinned()
    out = Path(a.out)
    if a.verify_tuner:
        a.tuner, a.tuner_arg = a.verify_tuner, []
        return verify_tuner_fixtures(a)
    if a.check:
        with tempfile.TemporaryDirectory() as td:
            fresh = Path(td) / "grads"
            gen_fixtures(fresh)
            diffs = compare_trees(out, fresh)
        if diffs:
            print("\n".join(diffs))
            print(f"[grad_parity] {len(diffs)} difference(s) against {out}")
            return 1
        print(f"[grad_parity] {out} is up to date")
        return 0
    metas = gen_fixtures(out)
    files = file_table(out)
    size = sum(s for _, s, _ in files) + (out / "README.md").stat().st_size
    print(f"\n{'family':<8} {'tokens':>6} {'loss':>10} {'grad norm':>10} {'packed diff':>11}")
    for m in metas:
        print(f"{m['family']:<8} {m['trained_tokens']:>6} {m['loss']:>10.6f} {m['grad_norm']:>10.5g} "
              f"{m['packed']['max_rel_diff_vs_hf_grads']:>11.2g}")
    print(f"\n{len(files) + 1} files, {size:,} bytes under {out}")
    return 0


# ---------------------------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    g = sub.add_parser("gpu", help="tuner grads vs HF+peft on random-init models (H200; or --device cpu)")
    g.add_argument("--tuner", default=".device/tuner", help="tuner binary (default .device/tuner)")
    g.add_argument("--families", default=",".join(FAMILIES))
    g.add_argument("--inits", default=None,
                   help=f"comma list of {','.join(INITS)} (default: all for small, {','.join(E4B_INITS)} for e4b; "
                        "qk_norm_scaled only for gemma3n unless asked for)")
    g.add_argument("--shapes", default="small,e4b", help="small, e4b (Gemma 3n only: the default Gemma3nTextConfig)")
    g.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    g.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"], help="bf16 on cuda, fp32 on cpu")
    g.add_argument("--fp32-ref", default="all", choices=["small", "all", "none"],
                   help="also run HF in fp32 as the exact reference: all cases (default), small shapes only, or none; "
                        "ignored with --dtype fp32")
    g.add_argument("--attn", default="auto", choices=["auto", "eager", "sdpa"], help="HF attention (auto: eager for gemma2)")
    g.add_argument("--tuner-arg", action="append", default=[], help="extra argument for tuner grads (repeatable), "
                   "e.g. --tuner-arg=--no-kernels")
    g.add_argument("--jobs", type=int, default=0, help="tuner processes at once (default 4 on cuda, 1 on cpu)")
    g.add_argument("--hf-only", action="store_true", help="skip tuner (smoke test of the HF side)")
    g.add_argument("--work", default=None, help="work folder (default a temp dir, removed at the end)")
    g.add_argument("--keep", action="store_true", help="keep the work folder (and the E4B models)")
    g.add_argument("--strict", action="store_true", help='count "noisy (bf16)" cases as failures')
    g.add_argument("--per-tensor", action="store_true", help="per-tensor cos/ratio in the JSON report")
    g.add_argument("--json", default=None, help="also write the report here (and to $OUT/grad_parity.json if OUT is set)")
    fx = sub.add_parser("fixtures", help="write tests/fixtures/grads/ (CPU, fp32, pinned versions)")
    fx.add_argument("--out", default=str(DEFAULT_FIX_OUT))
    fx.add_argument("--check", action="store_true", help="regenerate into a temp dir and compare bytes with --out")
    fx.add_argument("--verify-tuner", metavar="TUNER", default=None,
                    help="instead: run `tuner grads` (fp32, CPU) on the existing fixtures and compare with hf_grads")
    a = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.mode == "fixtures" or (a.mode == "gpu" and a.device == "cpu"):
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if a.mode == "fixtures":
        return fixtures_main(a)
    if a.dtype is None:
        a.dtype = "fp32" if a.device == "cpu" else "bf16"
    if a.tuner and not os.path.isabs(a.tuner) and os.sep in a.tuner:
        a.tuner = str(Path.cwd() / a.tuner)
    return gpu_main(a)


if __name__ == "__main__":
    sys.exit(main())
