#!/usr/bin/env python3
"""Load the GGUF with transformers' own importer (gguf_file=, needs the `gguf` package), save it as
an HF folder for the HF peer, and compare every tensor with what tuner's importer wrote.

    quality_gguf.py MODEL.gguf OUT_DIR --tuner-model RUN/fetch/model [--json REPORT.json]

Both importers dequantize to float32; the comparison is over every tensor of tuner's
model.safetensors (transformers names; tied lm_head left out as both tie it). Q and K rows are
stored permuted in a llama GGUF (llama.cpp's convert script interleaves the rotary halves):
an importer that forgets to un-permute them gives the same shapes with wrong values, so the
report names the tensor with the largest difference. A non-zero exit when any tensor differs by
more than --tol (default 0: they should be bit-identical).

When transformers cannot load the GGUF (no gguf package), --fallback copies tuner's folder
instead and says so in the report: the peer then trains on tuner's import (same weights by
construction, no independent check).
"""
import argparse
import json
import os
import shutil
import sys
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("gguf")
    ap.add_argument("out_dir")
    ap.add_argument("--tuner-model", required=True, help="tuner's imported folder: <run>/fetch/model")
    ap.add_argument("--json", default=None)
    ap.add_argument("--tol", type=float, default=0.0)
    ap.add_argument("--fallback", action="store_true", help="copy tuner's folder if transformers cannot load the GGUF")
    a = ap.parse_args()

    import torch
    from safetensors import safe_open

    try:  # no per-tensor progress bars in the logs
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass
    rep = {"gguf": os.path.abspath(a.gguf), "tuner_model": os.path.abspath(a.tuner_model), "out_dir": os.path.abspath(a.out_dir)}
    t0 = time.time()
    try:
        import gguf  # noqa: F401 - transformers needs it
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            os.path.dirname(os.path.abspath(a.gguf)), gguf_file=os.path.basename(a.gguf), dtype=torch.float32)
    except Exception as e:  # noqa: BLE001
        rep["error"] = f"transformers could not load the GGUF: {type(e).__name__}: {e}"[:1000]
        print(f"quality_gguf: {rep['error']}", file=sys.stderr)
        if not a.fallback:
            write(a.json, rep)
            return 1
        shutil.rmtree(a.out_dir, ignore_errors=True)
        shutil.copytree(a.tuner_model, a.out_dir)
        rep.update({"source": "tuner's import (fallback)", "checked": False})
        write(a.json, rep)
        print("quality_gguf: the HF peer uses tuner's imported folder (no independent import check)", file=sys.stderr)
        return 0
    rep["load_s"] = time.time() - t0
    sd = model.state_dict()
    worst, n, bad = (0.0, None), 0, []
    with safe_open(os.path.join(a.tuner_model, "model.safetensors"), "pt") as f:
        keys = list(f.keys())
        for k in keys:
            t = f.get_tensor(k).float()
            if k not in sd:
                bad.append(f"{k}: not in the transformers model")
                continue
            h = sd[k].float()
            if h.shape != t.shape:
                bad.append(f"{k}: shape {tuple(h.shape)} vs tuner {tuple(t.shape)}")
                continue
            d = (h - t).abs().max().item()
            n += 1
            if d > worst[0] or worst[1] is None:
                worst = (d, k)
            if d > a.tol:
                rel = d / max(t.abs().max().item(), 1e-30)
                bad.append(f"{k}: max |diff| {d:.3e} (relative to its max {rel:.3e})")
    missing = [k for k in sd if k not in keys and not k.startswith("lm_head")]
    # the config values the forward depends on
    tc = json.load(open(os.path.join(a.tuner_model, "config.json")))
    hc = model.config
    cdiff = []
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "rms_norm_eps", "vocab_size", "tie_word_embeddings", "hidden_act", "max_position_embeddings"):
        if tc.get(k) != getattr(hc, k, None):
            cdiff.append(f"{k}: tuner {tc.get(k)!r} vs transformers {getattr(hc, k, None)!r}")
    rp = getattr(hc, "rope_parameters", None) or {}
    h_theta = rp.get("rope_theta", getattr(hc, "rope_theta", None)) if isinstance(rp, dict) else getattr(hc, "rope_theta", None)
    if tc.get("rope_theta") != h_theta:
        cdiff.append(f"rope_theta: tuner {tc.get('rope_theta')!r} vs transformers {h_theta!r}")
    rep["config_diff"] = cdiff
    rep.update({
        "source": "transformers gguf_file import", "checked": True, "tensors_compared": n,
        "max_abs_diff": worst[0], "max_abs_diff_tensor": worst[1], "mismatches": bad[:20], "n_mismatches": len(bad),
        "only_in_transformers": missing[:20],
        "tie_word_embeddings": bool(getattr(model.config, "tie_word_embeddings", False)),
    })
    os.makedirs(a.out_dir, exist_ok=True)
    # save_pretrained refuses a model loaded from GGUF (its quantizer is marked not
    # serializable): write the dequantized float32 tensors and a plain config ourselves.
    from safetensors.torch import save_file

    cfg = model.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg.dtype = "float32"
    cfg.save_pretrained(a.out_dir)
    tied = rep["tie_word_embeddings"]
    save_file({k: v.detach().contiguous() for k, v in sd.items() if not (tied and k == "lm_head.weight")},
              os.path.join(a.out_dir, "model.safetensors"), metadata={"format": "pt"})
    write(a.json, rep)
    verdict = "identical" if not bad else f"{len(bad)} tensors differ"
    print(f"quality_gguf: transformers' GGUF import vs tuner's: {n} tensors, {verdict}, "
          f"max |diff| {worst[0]:.3e} ({worst[1]}); loaded in {rep['load_s']:.1f}s", file=sys.stderr)
    for b in bad[:5]:
        print(f"  {b}", file=sys.stderr)
    return 0 if not bad else 3


def write(path, rep):
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(rep, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
