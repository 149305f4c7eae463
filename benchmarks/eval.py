"""Benchmark evaluation throughput: questions/s answered one at a time vs in batches, same questions.

    .venv/bin/python benchmarks/eval.py [--images 12] [--batches 1 16] [--new-tokens 8] [--threads 2]

The demo model's shape (configs/models/lingcloud-tiny-llm.json: LLaMA, hidden 64, 2 layers, around
the demo tokenizer; the IPN around the tiny CLIP's text tower, as ``configs/demo.yaml`` builds it),
with random weights: speed does not depend on what the weights learned. Image features are random
(the CLIP encoder is left out; it is the same cost either way). The questions are the demo's
held-out MME-layout set (generation, ``--new-tokens`` greedy tokens) and SEED-Bench-layout set (four
choices ranked by likelihood), run through ``lmeye.eval`` exactly as ``lmeye eval`` runs them, each
batch size into a fresh output folder. Prints questions/s per batch size and the ratio to the first.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmeye.demo.benchsets import heldout_items, write_benchsets  # noqa: E402
from lmeye.eval.ipn_answerer import IPNAnswerer  # noqa: E402
from lmeye.eval.run import evaluate  # noqa: E402
from lmeye.model import IPN, build_ipn  # noqa: E402
from lmeye.model.demo import build_tiny_llm  # noqa: E402
from lmeye.model.testing import FEATURE_DIM, PATCH_SHAPE, tiny_clip_checkpoint, tiny_model_config, tiny_tokenizer  # noqa: E402

DEMO_LLM = Path(__file__).resolve().parents[1] / "configs" / "models" / "lingcloud-tiny-llm.json"


def build(root: str) -> IPN:
    spec = json.loads(DEMO_LLM.read_text())
    sizes = {k: spec[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                                  "num_key_value_heads", "max_position_embeddings")}
    llm = build_tiny_llm(f"{root}/llm", "llama", tiny_tokenizer(), **sizes)
    cfg = tiny_model_config(llm, tiny_clip_checkpoint(f"{root}/clip.safetensors"), max_length=spec["max_position_embeddings"])
    ipn = build_ipn(cfg, FEATURE_DIM, PATCH_SHAPE)
    ipn.eval()
    return ipn


def featurize(images):
    rng = np.random.default_rng(0)
    return [(rng.standard_normal(FEATURE_DIM).astype(np.float32), rng.standard_normal(PATCH_SHAPE).astype(np.float32)) for _ in images]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=12, help="held-out demo images (MME: 8 questions each; SEED: 4-5)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as root:
        ipn = build(root)
        sets = write_benchsets(f"{root}/sets", heldout_items(args.images, seed=1), image_size=64, seed=0)
        answerer = IPNAnswerer(ipn, featurize, FEATURE_DIM, max_new_tokens=args.new_tokens, name="bench")
        for benchmark, data in (("mme", sets.mme), ("seedbench", sets.seedbench)):
            base = None
            for b in args.batches:
                with torch.no_grad():
                    start = time.perf_counter()
                    result = evaluate(benchmark, answerer, data, f"{root}/out_{benchmark}_{b}", batch_size=b)
                    seconds = time.perf_counter() - start
                rate = result["questions"] / seconds
                base = base or rate
                print(f"{benchmark:9s} batch {b:3d}: {result['questions']} questions in {seconds:6.2f} s = {rate:7.1f} q/s "
                      f"(x{rate / base:.2f} of batch {args.batches[0]})", flush=True)


if __name__ == "__main__":
    main()
