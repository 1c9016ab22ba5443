#!/usr/bin/env python3
"""Load tuner's exports with the reference Python stack and report what it sees.

Used by tests/export.rs (run with /root/.cache/tuner/venv/bin/python). Every part is
optional; each given folder or file is loaded the way users load it:

  --base DIR --adapter DIR   transformers (fp32, eager) + peft.PeftModel.from_pretrained
  --merged DIR               transformers AutoModelForCausalLM (fp32, eager)
  --nf4 DIR                  transformers + bitsandbytes (pre-quantized NF4 checkpoint, CPU)
  --gguf FILE (repeatable)   gguf-py's GGUFReader (tensor names, types, shapes, metadata)

Logits for the token ids given with --ids (a JSON list of equally long rows) and the
bitsandbytes dequantization of every NF4 weight go into the safetensors file --out;
a JSON summary goes to stdout. bitsandbytes' CPU Linear4bit.forward can fail on
some shapes (docs/model-math.md §6), so an NF4 forward error is reported, not raised.
"""

import argparse
import json
import sys

import torch


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long)).logits.float().contiguous()


def load_info(info):
    return {k: sorted(str(x) for x in v) for k, v in info.items() if isinstance(v, (list, set, tuple))}


def manual_dequant(packed, qs):
    """The bnb 4-bit format by its definition (docs/model-math.md §4.3), from the loaded QuantState:
    row-major codes, first element in the high nibble, one absmax per 64 consecutive values
    (blocks span rows), nested absmax dequantized blockwise plus the offset. Rounded to
    qs.dtype. bitsandbytes 0.50.2's CPU dequantize_4bit gets this wrong when a row is not a
    multiple of the block size (e.g. 64x96), so the tests compare with both."""
    from bitsandbytes.functional import dequantize_blockwise

    absmax = qs.absmax
    if qs.nested:
        absmax = dequantize_blockwise(qs.absmax, qs.state2) + qs.offset
    codes = packed.flatten()
    idx = torch.stack([(codes >> 4).long(), (codes & 15).long()], 1).flatten()
    n = 1
    for d in qs.shape:
        n *= d
    idx = idx[:n]
    scale = absmax.float().repeat_interleave(qs.blocksize)[:n]
    return (qs.code.float()[idx] * scale).view(*qs.shape).to(qs.dtype).float().contiguous()


def gguf_summary(path, index, tensors_out):
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(path)
    meta = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            value = field.contents()
        except Exception as e:  # an old gguf-py without contents()
            value = f"<unreadable: {e}>"
        if isinstance(value, list) and len(value) > 8:
            value = {"len": len(value), "head": value[:8]}
        meta[name] = value
    tensors = []
    for t in reader.tensors:
        shape = [int(x) for x in t.shape]
        tensors.append({"name": t.name, "type": t.tensor_type.name, "shape": shape})
        values = dequantize(t.data, t.tensor_type)
        tensors_out[f"gguf{index}.{t.name}"] = torch.from_numpy(values.astype("float32").reshape(list(reversed(shape)))).contiguous()
    return {"path": path, "tensors": tensors, "metadata": meta}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base")
    ap.add_argument("--adapter")
    ap.add_argument("--merged")
    ap.add_argument("--nf4")
    ap.add_argument("--gguf", action="append", default=[])
    ap.add_argument("--ids", default="[]", help="JSON list of token-id rows")
    ap.add_argument("--out", help="safetensors file for logits and dequantized weights")
    a = ap.parse_args()
    torch.manual_seed(0)
    ids = json.loads(a.ids)
    out = {}
    report = {}

    import transformers

    report["versions"] = {"torch": torch.__version__, "transformers": transformers.__version__}
    from transformers import AutoModelForCausalLM

    if a.adapter:
        from peft import PeftModel
        import peft

        report["versions"]["peft"] = peft.__version__
        base = AutoModelForCausalLM.from_pretrained(a.base, dtype=torch.float32, attn_implementation="eager")
        model = PeftModel.from_pretrained(base, a.adapter).eval()
        n_lora = sum(1 for n, _ in model.named_modules() if n.endswith(".lora_A.default"))
        report["peft"] = {"lora_modules": n_lora}
        if ids:
            out["peft_logits"] = logits_of(model, ids)
        del model, base

    if a.merged:
        model, info = AutoModelForCausalLM.from_pretrained(
            a.merged, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
        )
        report["merged"] = load_info(info)
        if ids:
            out["merged_logits"] = logits_of(model.eval(), ids)
        del model

    if a.nf4:
        import bitsandbytes as bnb
        from bitsandbytes.functional import dequantize_4bit

        report["versions"]["bitsandbytes"] = bnb.__version__
        model, info = AutoModelForCausalLM.from_pretrained(
            a.nf4, attn_implementation="eager", output_loading_info=True, device_map="cpu"
        )
        r = load_info(info)
        r["quantized"] = {}
        for name, mod in model.named_modules():
            if isinstance(mod, bnb.nn.Linear4bit):
                qs = mod.weight.quant_state
                out[f"nf4_dequant.{name}"] = dequantize_4bit(mod.weight.data, qs).float().contiguous()
                out[f"nf4_manual.{name}"] = manual_dequant(mod.weight.data, qs)
                r["quantized"][name] = {
                    "quant_type": qs.quant_type,
                    "blocksize": qs.blocksize,
                    "dtype": str(qs.dtype).replace("torch.", ""),
                    "nested": qs.nested,
                    "shape": list(qs.shape),
                }
        r["dense_dtypes"] = sorted({str(p.dtype).replace("torch.", "") for n, p in model.named_parameters() if "norm" in n or "embed" in n})
        r["forward_error"] = None
        if ids:
            try:
                out["nf4_logits"] = logits_of(model.eval(), ids)
            except Exception as e:  # CPU Linear4bit.forward, see the docstring
                r["forward_error"] = f"{type(e).__name__}: {e}"
        report["nf4"] = r
        del model

    report["gguf"] = [gguf_summary(p, i, out) for i, p in enumerate(a.gguf)]

    if a.out:
        from safetensors.torch import save_file

        save_file(out, a.out)
    report["tensors"] = sorted(out)
    json.dump(report, sys.stdout, default=str)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
