"""Shared pieces of the peer benchmark harness: FLOPs per token, MFU, step statistics, JSON out.

MFU follows the reference measurements (shared/reference/peers-h200.md), so figures compare:

    FLOPs/token = 6·N + 3.5·A
    N = weights of every matmul in the model (each nn.Linear of the HF module tree, lm_head
        included, counted once when tied; embedding lookups excluded). 6N = forward (2N) +
        recompute under gradient checkpointing (2N) + activation gradients (2N); a frozen base
        has no weight gradients, and the LoRA matmuls are left out (about 1% here).
    A = forward attention FLOPs/token = Σ_layers 4·n_heads·head_dim·c, with c the keys per query:
        T for a full-attention layer, min(T, window) for a sliding one (QKᵀ and PV, 2·c·d each).
        The factor 3.5 covers forward, recompute and backward (2.5× forward).
        This counts c = T (no causal halving); that is the convention that reproduces the
        reference's MFU figures (Llama-3.1-8B: 8,023 tok/s -> 0.50; Llama-3.2-1B: 27,725 -> 0.30).
    MFU = FLOPs/token × tokens/s ÷ 781e12 (the bf16 dense matmul rate measured on the H200).
"""
import json
import math
import os
import statistics
import sys
import time

PEAK_FLOPS = 781e12
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Gemma 3n: keep AltUp's tiny linears out of bitsandbytes (its in-place clamp of
# prediction_coefs fails on uint8 weights); lm_head is listed again because the list replaces
# transformers' default one.
GEMMA3N_SKIP = ["lm_head", "prediction_coefs", "correction_coefs", "modality_router"]


def text_config(cfg):
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def linear_params(cfg):
    """Weights of all nn.Linear modules of the model built from `cfg` on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    seen, n = set(), 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            n += m.weight.numel()
    return n


def attention_flops_fwd(cfg, seq):
    """Forward attention FLOPs per token (see the module doc)."""
    c = text_config(cfg)
    layers = c.num_hidden_layers
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    types = getattr(c, "layer_types", None) or ["full_attention"] * layers
    window = getattr(c, "sliding_window", None)
    use_sw = getattr(c, "use_sliding_window", True)  # Qwen2 configs carry a window they don't use
    total = 0
    for t in types[:layers]:
        keys = min(seq, window) if (t == "sliding_attention" and window and use_sw) else seq
        total += 4 * heads * head_dim * keys
    return total


def flops_per_token(cfg, seq):
    n = linear_params(cfg)
    a = attention_flops_fwd(cfg, seq)
    return 6 * n + 3.5 * a, n, a


def random_id_limit(cfg):
    """Token ids are drawn below this: the vocabulary, or Gemma 3n's smaller per-layer table."""
    c = text_config(cfg)
    hi = c.vocab_size
    per_layer = getattr(c, "vocab_size_per_layer_input", None)
    return min(hi, per_layer) if per_layer else hi


def step_stats(step_s, tokens_per_step, warmup):
    """Median tokens/s over the steps after `warmup`."""
    timed = step_s[warmup:] or step_s
    tps = [tokens_per_step / s for s in timed]
    return {
        "tokens_per_s": statistics.median(tps),
        "tokens_per_s_mean": sum(tps) / len(tps),
        "tokens_per_s_steps": [round(x, 1) for x in tps],
        "timed_steps": len(timed),
    }


def mfu(fpt, tokens_per_s):
    return fpt * tokens_per_s / PEAK_FLOPS


def shape_info(model_dir):
    p = os.path.join(model_dir, "bench_shape.json")
    return json.load(open(p)) if os.path.exists(p) else {}


def write_json(path, obj):
    if not path:
        print(json.dumps(obj, indent=1))
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def fail_json(path, base, exc):
    """Record a failure (race.sh tolerates one peer failing and shows the error)."""
    import traceback

    tb = traceback.format_exc()
    base = dict(base)
    base.update({"ok": False, "error": f"{type(exc).__name__}: {exc}"[:2000], "traceback": tb[-6000:]})
    write_json(path, base)
    print(tb, file=sys.stderr)


def log_tail(log, n=25):
    """The last n lines of a log file ("" when there is none)."""
    if not os.path.exists(log):
        return ""
    return "\n".join(open(log, errors="replace").read().strip().splitlines()[-n:])


def note_exit(r, rc, limit, tail):
    """Make a peer's result r (a dict, changed in place) say how the race's timeout saw its process
    end (race.sh's record, guide_report.py stamp): exit code 124/137 is "timed out after LIMITs",
    another non-zero one "exit code RC"; a result that is ok gets that as a warning, any other is
    not ok, with it in front of its error and with the log's tail. Returns it (None for rc 0)."""
    msg = None
    if rc in (124, 137):
        msg = f"timed out after {limit}s"
    elif rc != 0:
        msg = f"exit code {rc}"
    if msg:
        if r.get("ok"):
            r["warning"] = (r.get("warning", "") + f" {msg}").strip()
        else:
            r.setdefault("error", msg)
            if msg not in r["error"]:
                r["error"] = f"{msg}: {r['error']}"
            r["ok"] = False
            r.setdefault("log_tail", tail)
    return msg


class Clock:
    """Wall clock with device synchronisation."""

    def __init__(self, device):
        import torch

        self.torch = torch
        self.cuda = str(device).startswith("cuda")

    def now(self):
        if self.cuda:
            self.torch.cuda.synchronize()
        return time.perf_counter()


def train_loop(tag, model, params, opt, cfg, a, dev, clock, t0):
    """The timed loop both Python peers share: random ids (labels = inputs), forward under bf16
    autocast, backward, clip, optimizer step. Returns (step seconds, losses, first-step seconds
    counted from t0, the start of loading)."""
    import torch

    gen = torch.Generator(device="cpu").manual_seed(a.seed)
    hi = random_id_limit(cfg)
    step_s, losses, first_step = [], [], None
    for s in range(a.steps):
        ids = torch.randint(0, hi, (a.batch, a.seq), generator=gen).to(dev)
        t = clock.now()
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=not a.no_autocast):
            out = model(input_ids=ids, labels=ids)
        loss_t = out.loss
        del out
        loss_t.backward()
        if a.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, a.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = loss_t.item()
        end = clock.now()
        if first_step is None:
            first_step = end - t0
        step_s.append(end - t)
        losses.append(loss)
        if not math.isfinite(loss):
            raise RuntimeError(f"{tag}: loss became {loss} at step {s + 1}")
        print(f"{tag}: step {s + 1}/{a.steps} loss {loss:.4f} {a.batch * a.seq / (end - t):,.0f} tok/s "
              f"({end - t:.2f}s)", file=sys.stderr, flush=True)
    return step_s, losses, first_step


def add_common_args(ap):
    ap.add_argument("model_dir")
    ap.add_argument("--out", default=None, help="JSON report path (default: print)")
    ap.add_argument("--steps", type=int, default=7, help="optimizer steps, warm-up included")
    ap.add_argument("--warmup", type=int, default=1, help="steps left out of the tokens/s median")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--weight-decay", type=float, default=0.01)
    ap.add_argument("--max-grad-norm", type=float, default=1.0, help="0: no clipping")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-autocast", action="store_true", help="no bf16 autocast around the forward")
    ap.add_argument("--seed", type=int, default=0)


def finish(report, a, cfg, step_s, losses, first_step, peak, peak_load):
    st = step_stats(step_s, a.batch * a.seq, a.warmup)
    report.update(st)
    report.update({
        "ok": True, "step_s": step_s, "losses": losses, "first_step_s": first_step,
        "peak_gib": gib(peak), "peak_load_gib": gib(peak_load), "mfu": None,
    })
    try:
        fpt, n_lin, attn = flops_per_token(cfg, a.seq)
        report.update({"flops_per_token": fpt, "linear_params": n_lin, "attn_flops_fwd_per_token": attn,
                       "mfu": mfu(fpt, st["tokens_per_s"])})
    except Exception as e:  # noqa: BLE001 - the measurement stands without it
        report["mfu_error"] = f"{type(e).__name__}: {e}"


def print_summary(name, r):
    peak = "n/a (CPU)" if r.get("peak_gib") is None else f"{r['peak_gib']:.2f} GiB"
    first = "n/a" if r.get("first_step_s") is None else f"{r['first_step_s']:.1f}s"
    m = "n/a" if r.get("mfu") is None else f"{r['mfu']:.3f}"
    print(f"{name}: {r['tokens_per_s']:,.0f} tok/s (median of {r['timed_steps']}), peak {peak}, "
          f"first step {first}, MFU {m}, "
          f"loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}", file=sys.stderr)


def gib(b):
    return None if b is None else b / 2**30


def finite(x):
    return x if (x is not None and math.isfinite(x)) else None
