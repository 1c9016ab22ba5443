#!/usr/bin/env bash
# Runs on the GPU machine (see ../shared/GPU.md): the CUDA path against the CPU path on the
# committed tiny fixtures, all in one go, plus a first throughput reading on a random-init
# Llama-3.2-1B-shaped model. Prints a table; writes JSON and logs under $OUT.
#
#   (here)  cargo build --release && mkdir -p .device && cp "$(target)/release/tuner" .device/ && strip .device/tuner
#   (there) bash scripts/gpu_check.sh
set -u
TL=$(python3 -c 'import torch,os;print(os.path.dirname(torch.__file__))')/lib
export LD_LIBRARY_PATH=$TL RUST_LOG=warn HF_HUB_OFFLINE=1
T=$(pwd)/${TUNER_BIN:-.device/tuner}
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
W=$(mktemp -d)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader

SECTIONS=${SECTIONS:-123}
if [[ $SECTIONS == *1* ]]; then
echo "== 1. tuner score: CPU fp32 vs CUDA fp32 / bf16 on every fixture family"
for f in llama llama-tied mistral qwen2 qwen3 llama-bnb4 gemma2 gemma3 gemma3n gemma3n-bnb4; do
  for cfg in "cpu fp32" "cuda fp32" "cuda bf16"; do
    set -- $cfg
    "$T" score --model tests/fixtures/models/$f --data tests/fixtures/score/texts.jsonl --json --device $1 --dtype $2 > "$OUT/score-$f-$1-$2.json" 2>"$OUT/score-$f-$1-$2.err" || echo "score $f $cfg FAILED: $(tail -3 "$OUT/score-$f-$1-$2.err")"
  done
done
python3 - "$OUT" <<'PY'
import json, sys, os
out = sys.argv[1]
print(f"{'family':<12} {'HF fp32':>10} {'cpu fp32':>10} {'cuda fp32':>10} {'cuda bf16':>10}  max rel (fp32) / (bf16)")
for f in ["llama", "llama-tied", "mistral", "qwen2", "qwen3", "llama-bnb4", "gemma2", "gemma3", "gemma3n", "gemma3n-bnb4"]:
    ref = json.load(open(f"tests/fixtures/models/{f}/score.json"))["mean_loss"]
    r = {}
    for k in ["cpu-fp32", "cuda-fp32", "cuda-bf16"]:
        p = f"{out}/score-{f}-{k}.json"
        r[k] = json.load(open(p))["mean_loss"] if os.path.getsize(p) else float("nan")
    rel = lambda a: abs(a - ref) / abs(ref)
    print(f"{f:<12} {ref:>10.6f} {r['cpu-fp32']:>10.6f} {r['cuda-fp32']:>10.6f} {r['cuda-bf16']:>10.6f}  {rel(r['cuda-fp32']):.1e} / {rel(r['cuda-bf16']):.1e}")
PY

fi
if [[ $SECTIONS == *2* ]]; then
echo "== 2. train on the llama fixture: CPU fp32 vs CUDA fp32 vs CUDA bf16 (20 steps), and a SIGKILL + resume on CUDA"
mk_recipe() { # dir device dtype
  mkdir -p "$1"; cp -r tests/fixtures/models/llama "$1/model"
  cat > "$1/r.toml" <<EOF
[run]
name = "t"
output_dir = "runs"
seed = 7
[model]
source = "model"
dtype = "$3"
[lora]
r = 4
alpha = 8
[prompt]
template = "{input}\n{output}"
[dataset]
source = "$(pwd)/datasets/requests-json/train.jsonl"
eval_ratio = 0.05
max_samples = 400
[train]
device = "$2"
max_seq_length = 192
micro_batch_size = 4
gradient_accumulation_steps = 2
max_steps = 20
learning_rate = 1e-2
warmup_steps = 1
save_steps = 4
EOF
}
for cfg in "cpu fp32" "cuda fp32" "cuda bf16" "cuda fp16" "cuda-b fp32"; do
  set -- $cfg
  dev=${1%-b}
  mk_recipe "$W/$1-$2" "$dev" "$2"
  "$T" run "$W/$1-$2/r.toml" --until train > "$OUT/train-$1-$2.log" 2>&1 || echo "train $cfg FAILED: $(tail -3 "$OUT/train-$1-$2.log")"
done
# Kill a CUDA run after its step-8 checkpoint, then resume it.
mk_recipe "$W/kill" cuda fp32
"$T" run "$W/kill/r.toml" --until train > "$OUT/train-kill-1.log" 2>&1 &
pid=$!
for i in $(seq 1 600); do [ -f "$W/kill/runs/t/train/checkpoints/step-000008/progress.json" ] && break; sleep 0.1; done
kill -9 $pid; wait $pid 2>/dev/null
"$T" run "$W/kill/r.toml" --until train > "$OUT/train-kill-2.log" 2>&1 || echo "resume FAILED: $(tail -3 "$OUT/train-kill-2.log")"
python3 - "$W" <<'PY'
import json, sys, hashlib
w = sys.argv[1]
def losses(d): return [json.loads(l)["loss"] for l in open(f"{w}/{d}/runs/t/train/metrics.jsonl")]
def sha(d): return hashlib.sha256(open(f"{w}/{d}/runs/t/train/adapter/adapter_model.safetensors", "rb").read()).hexdigest()[:16]
runs = {d: losses(d) for d in ["cpu-fp32", "cuda-fp32", "cuda-bf16", "cuda-fp16", "cuda-b-fp32", "kill"]}
c = runs["cpu-fp32"]
for d, l in runs.items():
    dev = max(abs(a - b) / abs(b) for a, b in zip(l, c))
    print(f"{d:<12} loss {l[0]:.4f} -> {l[-1]:.4f}  max rel dev from CPU {dev:.2e}  adapter {sha(d)}")
print("CUDA fp32 run-to-run identical:", sha("cuda-fp32") == sha("cuda-b-fp32"))
print("CUDA killed+resumed identical to uninterrupted:", sha("kill") == sha("cuda-fp32"))
PY

fi
if [[ $SECTIONS == *3* ]]; then
echo "== 3. first throughput reading: random-init Llama-3.2-1B shape, NF4 + LoRA r16 x7, seq 2048 packed, micro-batch 2, bf16"
python3 - "$W/l1b" <<'PY'
import sys, torch, shutil, glob
from transformers import LlamaConfig, LlamaForCausalLM
cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=64, rope_theta=500000.0, tie_word_embeddings=True, max_position_embeddings=131072,
                  rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                  bos_token_id=299, eos_token_id=296, pad_token_id=296)
with torch.device("cuda"):
    m = LlamaForCausalLM(cfg).to(torch.bfloat16)
m.save_pretrained(sys.argv[1])
for f in glob.glob("tests/fixtures/tokenizers/chatml-bos/tokenizer*"):
    shutil.copy(f, sys.argv[1])
PY
cat > "$W/l1b.toml" <<EOF
[run]
name = "l1b"
output_dir = "runs"
[model]
source = "l1b"
[lora]
r = 16
alpha = 32
[prompt]
template = "{input}\n{output}"
[dataset]
source = "$(pwd)/datasets/requests-json/train.jsonl"
[train]
max_seq_length = 2048
packing = true
micro_batch_size = 2
gradient_accumulation_steps = 1
max_steps = 8
warmup_steps = 1
save_steps = 100
memory_log_steps = 4
EOF
( while true; do nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits; sleep 0.5; done ) > "$OUT/smi.txt" &
smi=$!
"$T" run "$W/l1b.toml" --until train > "$OUT/train-1b.log" 2>&1 || echo "1B train FAILED: $(tail -5 "$OUT/train-1b.log")"
kill $smi
python3 - "$W" "$OUT" <<'PY'
import json, sys, statistics
w, out = sys.argv[1], sys.argv[2]
m = [json.loads(l) for l in open(f"{w}/runs/l1b/train/metrics.jsonl")]
tps = statistics.median(x["tokens_per_s"] for x in m[2:])
peak = max(int(x) for x in open(f"{out}/smi.txt").read().split() if x.strip().isdigit())
print(f"1B shape: median {tps:,.0f} tok/s over steps 3-{len(m)}, allocator peak {m[-1]['peak_mem_bytes']/2**30:.2f} GiB ({m[-1].get('mem_source')}), nvidia-smi peak {peak/1024:.2f} GiB, loss {m[0]['loss']:.3f} -> {m[-1]['loss']:.3f}")
PY
grep -h "first step\|loaded in\|GPU memory" "$OUT/train-1b.log"
fi
