#!/usr/bin/env bash
# Stage-2 (instruct) training speed of the IPN on one GPU, offline, with torch and transformers alone:
# a random ~1.1B LLaMA saved and loaded locally, a random ViT-L-14-sized CLIP text tower built from
# its sizes, ViT-L-14-shaped features; forward + backward + AdamW step timed directly (no Ray,
# DeepSpeed, open_clip or pydantic needed, nothing downloaded, no demo LLM trained).
# Prints samples/s, tokens/s, MFU and peak GPU memory (the formulas: benchmarks/train_gpu.py).
#
#   bash benchmarks/train_gpu.sh [--steps 30] [--micro-batch 16] [--peak-tflops 989]   # H100/H200 SXM: 989, A100: 312
#   bash benchmarks/train_gpu.sh --size tiny --device cpu --steps 3                    # seconds on a CPU (tests run it)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "${PY:-python}" benchmarks/train_gpu.py "$@"
