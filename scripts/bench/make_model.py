#!/usr/bin/env python3
"""Build a random-init bf16 model of a real shape and save it as an HF folder (safetensors,
config, generation config, a tokenizer), for the peer benchmarks.

    make_model.py SHAPE OUTDIR [--tiny] [--device cuda|cpu] [--force]
    make_model.py SHAPE-bnb4 OUTDIR ...     # the same model saved pre-quantized by bitsandbytes

SHAPE: llama-1b (Llama-3.2-1B), llama-8b (Llama-3.1-8B), qwen2.5-7b (Qwen2.5-7B),
gemma3n-e4b (Gemma3nForCausalLM with the default Gemma3nTextConfig: the E4B text decoder).
SHAPE-bnb4 (e.g. gemma3n-e4b-bnb4) saves the model as transformers + bitsandbytes write a
pre-quantized checkpoint (NF4, double quant, bf16 compute; the small AltUp modules and lm_head
left unquantized, as in unsloth/gemma-3n-e4b-it-bnb-4bit): needs bitsandbytes and a GPU.
--tiny keeps the structure (GQA ratio, rope scaling, tying, layer types) at toy size, for CPU tests.
--config-only writes just config.json (no weights, no torch needed), e.g. for `tuner plan`, which
reads only the shape: tests/fixtures/plan/ holds these for the shapes raced on the H200.

The weights are initialised on the target device in bf16 (fast on the GPU); --init hf_default
instead builds the model as a transformers user does (torch.manual_seed(seed), XForCausalLM(config)
in fp32 on the device, cast to bf16): the model of issue 15's NaN. Any tokenizer works
since the benchmarks feed random token ids; the one copied here (from tests/fixtures, ~300 tokens)
sets the config's bos/eos/pad ids. A folder already holding the same shape is kept unless --force.
"""
import argparse
import json
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}

SHAPES = {
    "llama-1b": dict(
        family="llama", tokenizer="tests/fixtures/tokenizers/chatml-bos",
        cfg=dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=64, rope_theta=500000.0,
                 rope_scaling=dict(LLAMA3_ROPE, factor=32.0), max_position_embeddings=131072,
                 rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu"),
        tiny=dict(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=8),
    ),
    "llama-8b": dict(
        family="llama", tokenizer="tests/fixtures/tokenizers/chatml-bos",
        cfg=dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=500000.0,
                 rope_scaling=dict(LLAMA3_ROPE, factor=8.0), max_position_embeddings=131072,
                 rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu"),
        tiny=dict(vocab_size=512, hidden_size=64, intermediate_size=224, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=1, head_dim=16),
    ),
    "qwen2.5-7b": dict(
        family="qwen2", tokenizer="tests/fixtures/tokenizers/chatml",
        cfg=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, rope_theta=1000000.0,
                 max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                 use_sliding_window=False, sliding_window=131072, max_window_layers=28, hidden_act="silu"),
        tiny=dict(vocab_size=512, hidden_size=56, intermediate_size=296, num_hidden_layers=2,
                  num_attention_heads=7, num_key_value_heads=1, max_window_layers=2),
    ),
    "gemma3n-e4b": dict(
        family="gemma3n", tokenizer="tests/fixtures/tokenizers/gemma",
        cfg=dict(),  # Gemma3nTextConfig() defaults are the E4B text decoder
        tiny=dict(vocab_size=512, vocab_size_per_layer_input=384, hidden_size=64, hidden_size_per_layer_input=16,
                  intermediate_size=128, num_hidden_layers=10, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, num_kv_shared_layers=5, laurel_rank=8, sliding_window=32,
                  layer_types=(["sliding_attention"] * 4 + ["full_attention"]) * 2,
                  activation_sparsity_pattern=[0.95] * 3 + [0.0] * 7, max_position_embeddings=4096),
    ),
}


def special_ids(tok_dir):
    tok = json.load(open(os.path.join(tok_dir, "tokenizer.json")))
    tc = json.load(open(os.path.join(tok_dir, "tokenizer_config.json")))
    ids = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    out = {}
    for k in ("bos", "eos", "pad"):
        name = tc.get(f"{k}_token")
        if isinstance(name, dict):
            name = name.get("content")
        if name is not None and name in ids:
            out[f"{k}_token_id"] = ids[name]
    return out


def build_config(shape, tiny):
    s = SHAPES[shape]
    kw = dict(s["cfg"])
    if tiny:
        kw.update(s["tiny"])
    kw.update(special_ids(os.path.join(ROOT, s["tokenizer"])))
    if s["family"] == "llama":
        from transformers import LlamaConfig
        return LlamaConfig(**kw), "LlamaForCausalLM"
    if s["family"] == "qwen2":
        from transformers import Qwen2Config
        return Qwen2Config(**kw), "Qwen2ForCausalLM"
    from transformers import Gemma3nTextConfig
    return Gemma3nTextConfig(**kw), "Gemma3nForCausalLM"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("shape", choices=sorted(SHAPES) + [k + "-bnb4" for k in sorted(SHAPES)])
    ap.add_argument("outdir")
    ap.add_argument("--tiny", action="store_true", help="toy size of the same structure (CPU tests)")
    ap.add_argument("--device", default=None, help="where to initialise (default: cuda if available)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--force", action="store_true")
    ap.add_argument("--init", choices=["make_model", "hf_default"], default="make_model",
                    help="make_model: _from_config in bf16 (default); hf_default: XForCausalLM(config) in fp32, then bf16")
    ap.add_argument("--config-only", action="store_true", help="write config.json only (the shape, no weights)")
    a = ap.parse_args()

    if a.config_only:
        if a.shape.endswith("-bnb4"):
            sys.exit("make_model: --config-only takes a plain shape (a bnb4 folder's shape is the same)")
        cfg, arch = build_config(a.shape, a.tiny)
        cfg.architectures = [arch]
        cfg.dtype = "bfloat16"
        os.makedirs(a.outdir, exist_ok=True)
        cfg.to_json_file(os.path.join(a.outdir, "config.json"), use_diff=False)
        print(f"make_model: {a.shape} config.json -> {a.outdir}")
        return

    import torch
    import transformers

    bnb = a.shape.endswith("-bnb4")
    shape = a.shape[: -len("-bnb4")] if bnb else a.shape

    stamp = {"shape": a.shape, "tiny": a.tiny, "seed": a.seed, "init": a.init, "transformers": transformers.__version__}
    stamp_path = os.path.join(a.outdir, "bench_shape.json")
    if not a.force and os.path.exists(stamp_path):
        old = json.load(open(stamp_path))
        if all(old.get(k) == v for k, v in stamp.items() if k != "transformers"):
            print(f"make_model: {a.outdir} already holds {a.shape}{' (tiny)' if a.tiny else ''}; kept")
            return

    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg, arch = build_config(shape, a.tiny)
    cfg.architectures = [arch]
    t0 = time.perf_counter()
    torch.manual_seed(a.seed)
    cls = getattr(transformers, arch)
    with torch.device(device):
        if a.init == "hf_default":
            model = cls(cfg).to(torch.bfloat16)
        else:
            model = cls._from_config(cfg, dtype=torch.bfloat16)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t_init = time.perf_counter() - t0
    n_params = sum(p.numel() for p in model.parameters())

    tmp = a.outdir.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="5GB")
    del model
    if bnb:
        # Reload through bitsandbytes and save the quantized state dict in its place.
        qc = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            llm_int8_skip_modules=["lm_head", "prediction_coefs", "correction_coefs", "modality_router"])
        q = cls.from_pretrained(tmp, quantization_config=qc, dtype=torch.bfloat16, device_map={"": device})
        shutil.rmtree(tmp)
        q.save_pretrained(tmp, max_shard_size="5GB")
        del q
    tok_dir = os.path.join(ROOT, SHAPES[shape]["tokenizer"])
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tok_dir, f), tmp)
    tc_path = os.path.join(tmp, "tokenizer_config.json")
    tc = json.load(open(tc_path))
    tc["model_max_length"] = 131072  # the fixture's 128 would make tokenizers warn/truncate at 2048
    json.dump(tc, open(tc_path, "w"), indent=1)
    stamp.update({"architecture": arch, "parameters": n_params, "device": device})
    json.dump(stamp, open(os.path.join(tmp, "bench_shape.json"), "w"), indent=1)
    shutil.rmtree(a.outdir, ignore_errors=True)
    os.replace(tmp, a.outdir)
    size = sum(os.path.getsize(os.path.join(a.outdir, f)) for f in os.listdir(a.outdir))
    print(f"make_model: {a.shape}{' (tiny)' if a.tiny else ''} {arch}, {n_params / 1e6:,.1f}M parameters, "
          f"init {t_init:.1f}s on {device}, saved {size / 2**30:.2f} GiB in {time.perf_counter() - t0:.1f}s -> {a.outdir}")


if __name__ == "__main__":
    sys.exit(main())
