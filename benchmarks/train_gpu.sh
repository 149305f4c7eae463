#!/usr/bin/env bash
# Stage 2 (instruct) on GPUs: a ~1B-parameter LLaMA (random weights, frozen), ViT-L-14-sized
# features (768-d pooled, 256 x 1024 patch tokens), bf16, DeepSpeed ZeRO-2, a few hundred steps.
# Prints samples/s, tokens/s and model FLOPs utilisation (MFU).
#
#   bash benchmarks/train_gpu.sh [STEPS=300] [WORKERS=all GPUs] [PEAK_TFLOPS=989]
#
# PEAK_TFLOPS: the card's dense bf16 peak per GPU (H100/H200 SXM 989, A100 312).
# MFU counts the frozen LLM as 4*N*tokens (forward + activation gradients, no weight gradients)
# and the IPN's trainable weights as 6*N*tokens; RVII's CLIP text tower is left out (a lower bound).
# Needs the real IPN (lmeye.model) for its tokenizer and model; nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS=${1:-300}
WORKERS=${2:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
PEAK_TFLOPS=${3:-989}
WORK=${WORK:-/tmp/lingcloud-train-gpu}
export PYTHONPATH=$PWD RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1
PY=${PY:-python}

$PY - "$STEPS" "$WORKERS" "$PEAK_TFLOPS" "$WORK" <<'PYEOF'
import importlib.util, json, math, statistics, sys
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

from lmeye.config import load_config
from lmeye.model.demo import ensure_demo_llm
from lmeye.uid import uid_for
from pipelines.train import run

steps, workers, peak, work = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), Path(sys.argv[4])
micro, images = 16, 2048
work.mkdir(parents=True, exist_ok=True)
spec = importlib.util.spec_from_file_location("_fake_ipn_file", Path("tests/lmeye/train/fake_ipn.py"))
tables = importlib.util.module_from_spec(spec)
spec.loader.exec_module(tables)  # only its table builders

rows = steps * micro * workers
if not (work / "features" / "_manifest.json").exists():  # 2,048 images of ViT-L-14-sized features
    uids = [uid_for(f"http://img/{i}.jpg") for i in range(images)]
    tables.write_features(work / "features", uids, dim=768, patch=(256, 1024))
    answers = ("red", "blue", "a green circle at the top left on a white background")
    data = [{"sample_id": uid_for(f"sample/{i}"), "uid": uids[i % images], "task": "vqa",
             "split": "train" if i < rows else "validation",
             "conversation": [{"role": "user", "content": f"Question {i}: what colour is the circle?"},
                              {"role": "assistant", "content": answers[i % 3]}]} for i in range(rows + 64)]
    tables.write_instructions(work / "instructions", data, shards=max(1, rows // 4096))

base = load_config(None, {"data.root": str(work)})
tok_dir = ensure_demo_llm(base)
llm_dir = work / "llama-1b"
if not (llm_dir / "config.json").exists():
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=2048, intermediate_size=5632, num_hidden_layers=16,
                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=2048)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(llm_dir)
    tok.save_pretrained(llm_dir)
cfg_llm = LlamaConfig.from_pretrained(llm_dir)
h, L, f, v = cfg_llm.hidden_size, cfg_llm.num_hidden_layers, cfg_llm.intermediate_size, cfg_llm.vocab_size
n_llm = L * (4 * h * h + 3 * h * f) + 2 * v * h

cfg = load_config(None, {
    "data.root": str(work), "model.llm": str(llm_dir), "model.dtype": "bfloat16",
    "train.instructions": str(work / "instructions"), "train.features": str(work / "features"),
    "train.output": str(work / "out"), "train.resume": "never", "train.num_workers": workers,
    "train.use_gpu": True, "train.cpus_per_worker": 2, "train.zero_stage": 2, "train.precision": "bf16",
    "train.micro_batch_size": micro, "train.checkpoint_every": 10**6, "train.log_every": 20,
    "train.val_max_rows": 64, "train.shuffle_buffer": 1024,
    "train.stages": [{"name": "instruct", "trainable": "instruct", "train_visual_mapping": True, "max_steps": steps}],
})
summary = run(cfg)
print(summary.render())
recs = [json.loads(l) for l in open(work / "out" / "instruct" / "metrics.jsonl")][10:]  # after warm-up
sps = statistics.median(r["samples_per_s"] for r in recs)
tps = statistics.median(r["tokens_per_s"] for r in recs)
from safetensors import safe_open
model_dir = work / "out" / "instruct" / "model"
n_train = 0
for p in model_dir.glob("*.safetensors"):
    with safe_open(str(p), "pt") as sf:
        n_train += sum(math.prod(sf.get_slice(k).get_shape()) for k in sf.keys())
flops = (4 * n_llm + 6 * n_train) * tps
print(f"LLM {n_llm / 1e9:.2f}B frozen, IPN {n_train / 1e6:.1f}M trainable, {workers} GPU(s)")
print(f"samples/s {sps:.1f}  tokens/s {tps:.0f}  MFU {flops / (workers * peak * 1e12):.1%} (peak {peak:g} TFLOPS/GPU)")
PYEOF
